"""Class-labelled image sets and the one-class protocol (e.g. Fashion-MNIST, CIFAR-10 folders).

Two layouts are read:

- IDX (MNIST, Fashion-MNIST; plain or gzip): ``<root>/train-images-idx3-ubyte[.gz]`` with
  ``train-labels-idx1-ubyte[.gz]``, and ``t10k-*`` (or ``test-*``) for the test split.
- Folder per class: ``<root>/train/<class>/*.png`` and ``<root>/test/<class>/*.png``.

The one-class protocol (Ruff et al. 2018, Golan & El-Yaniv 2018): one class is normal; the model
learns from that class's training images and is tested on the whole test set, where every image of
another class is anomalous (label 1).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalens.data.io import _image_files
from anomalens.errors import DataError

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


@dataclass(frozen=True)
class LabelledImages:
    """Images with integer class labels.

    ``images`` is a uint8 array (N, H, W[, C]) for IDX data, or a list of paths for folders;
    ``class_names[label]`` names each class.
    """

    images: np.ndarray | list[Path]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def of_class(self, label: int) -> np.ndarray | list[Path]:
        """The images whose label is `label`, in their stored order."""
        indices = np.flatnonzero(self.labels == label)
        if isinstance(self.images, np.ndarray):
            return self.images[indices]
        return [self.images[i] for i in indices]


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed or plain) as a numpy array in native byte order."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read IDX file {path}: {error}") from error
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated (header of {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"IDX file {path} holds {len(raw)} bytes, expected {expected} for shape {shape}"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write `array` as an IDX file (gzip-compressed when the name ends in .gz)."""
    path = Path(path)
    codes = {dtype.newbyteorder(">"): code for code, dtype in _IDX_TYPES.items()}
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in codes:
        raise DataError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + np.ascontiguousarray(array, dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def _idx_file(root: Path, split: str, kind: str) -> Path:
    ndim = "3" if kind == "images" else "1"
    for prefix in _IDX_PREFIXES[split]:
        for suffix in ("", ".gz"):
            candidate = root / f"{prefix}-{kind}-idx{ndim}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    raise DataError(
        f"no {split} {kind} in {root}: expected {_IDX_PREFIXES[split][0]}-{kind}-idx{ndim}-ubyte.gz"
    )


def _load_idx_split(root: Path, split: str) -> LabelledImages:
    images = read_idx(_idx_file(root, split, "images"))
    labels = read_idx(_idx_file(root, split, "labels")).astype(np.int64)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise DataError(f"{root}: {split} images must be uint8 (N, H, W[, C]), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{root}: {len(images)} {split} images but labels of shape {labels.shape}")
    names = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    return LabelledImages(images, labels, names)


def _load_folder_split(root: Path, split: str, class_names: list[str] | None) -> LabelledImages:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder} (expected {split}/<class>/ images)")
    names = class_names or sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not names:
        raise DataError(f"no class folders in {folder}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = _image_files(folder / name) if (folder / name).is_dir() else []
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise DataError(f"no images in the class folders of {folder}")
    return LabelledImages(paths, np.asarray(labels, np.int64), list(names))


def load_labelled(
    root: str | os.PathLike[str], split: str = "train", class_names: list[str] | None = None
) -> LabelledImages:
    """The `split` ("train" or "test") of an IDX dataset or a folder-per-class dataset.

    `class_names`, if given, names the IDX labels 0, 1, ... in order (IDX files store no names);
    for folders it fixes which class folders are read and their label order (default: sorted).
    """
    root = Path(root)
    if split not in _IDX_PREFIXES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if not root.is_dir():
        raise DataError(f"folder not found: {root}")
    if any(root.glob("*-idx*-ubyte*")):
        data = _load_idx_split(root, split)
        if class_names is not None:
            if len(class_names) < len(data.class_names):
                raise DataError(
                    f"{root}: {len(class_names)} class names for {len(data.class_names)} classes"
                )
            data = LabelledImages(data.images, data.labels, list(class_names))
        return data
    # The test split shares the train split's class order, so labels mean the same in both.
    if class_names is None and split == "test" and (root / "train").is_dir():
        class_names = _load_folder_split(root, "train", None).class_names
    return _load_folder_split(root, split, class_names)


def one_class_split(
    train: LabelledImages,
    test: LabelledImages,
    normal_class: int,
    max_train: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray | list[Path], np.ndarray | list[Path], np.ndarray]:
    """(training images of `normal_class`, all test images, test labels: 1 = another class).

    `max_train` keeps a seeded random subset of that many training images (for CPU budgets).
    """
    if not 0 <= normal_class < len(train.class_names):
        raise DataError(
            f"normal class {normal_class} out of range: {len(train.class_names)} classes"
        )
    normal = train.of_class(normal_class)
    if len(normal) == 0:
        raise DataError(f"no training images of class {train.class_names[normal_class]!r}")
    if max_train is not None and len(normal) > max_train:
        keep = np.sort(np.random.default_rng(seed).choice(len(normal), max_train, replace=False))
        normal = normal[keep] if isinstance(normal, np.ndarray) else [normal[i] for i in keep]
    labels = (test.labels != normal_class).astype(np.int64)
    return normal, test.images, labels
