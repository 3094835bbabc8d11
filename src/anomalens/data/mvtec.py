"""Reader for the MVTec AD folder layout (also used by Magnetic Tile and the synthetic demo data).

::

    <category>/train/good/*.png
    <category>/test/<good|defect>/*.png
    <category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalens.data.io import _image_files, list_images, load_mask, stretch_mask
from anomalens.errors import DataError

GOOD = "good"
"""Name of the folder holding normal images."""


@dataclass(frozen=True)
class Sample:
    """One test image: ``label`` is 0 for normal and 1 for anomalous; ``defect`` is its folder."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None = None


def training_images(root: str | os.PathLike[str]) -> list[Path]:
    """Normal training images: ``root/train/good`` if present, else the images directly in root."""
    root = Path(root)
    good = root / "train" / GOOD
    if good.is_dir():
        return list_images(good)
    if (root / "train").is_dir():
        raise DataError(f"folder not found: {good} (MVTec layout keeps normal images there)")
    return list_images(root)


def test_samples(root: str | os.PathLike[str]) -> list[Sample]:
    """All images in ``root/test/*/`` sorted by defect folder, then file name.

    Images in ``test/good`` are normal; every other folder holds anomalous images whose mask is
    ``ground_truth/<defect>/<stem>_mask.png`` when that file exists.
    """
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise DataError(f"folder not found: {test}")
    samples = []
    folders = sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        defect = folder.name
        for path in _image_files(folder):
            if defect == GOOD:
                samples.append(Sample(path, 0, defect, None))
            else:
                mask = root / "ground_truth" / defect / f"{path.stem}_mask.png"
                samples.append(Sample(path, 1, defect, mask if mask.is_file() else None))
    if not samples:
        raise DataError(f"no images in {test}; expected test/good/ and test/<defect>/ folders")
    return samples


test_samples.__test__ = False  # type: ignore[attr-defined]  # keep pytest from collecting it


def load_sample_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray | None:
    """Ground-truth mask of ``sample`` as an ``HxW`` bool array of ``shape``.

    Normal samples give an all-False mask; anomalous samples without a mask file give None.
    A mask of a different size is resized with nearest-neighbour sampling.
    """
    height, width = shape
    if sample.label == 0:
        return np.zeros((height, width), dtype=bool)
    if sample.mask_path is None:
        return None
    return stretch_mask(load_mask(sample.mask_path), (height, width))
