"""Unreadable training images: `fit` skips and lists them (model file included); `strict` raises."""

from __future__ import annotations

from pathlib import Path

import pytest

import anomalens
from anomalens.core.model_file import read_config
from anomalens.data.mvtec import training_images
from anomalens.errors import DataError, ImageReadError
from anomalens.models.tiled import tiled

FIXTURES = Path(__file__).parent / "fixtures"
PARAMS = {"backbone": "handcrafted", "image_size": 64}


@pytest.mark.parametrize(
    "make", [lambda: anomalens.create("padim", **PARAMS), lambda: tiled("padim", 64, 16, **PARAMS)]
)
def test_fit_skips_and_lists_unreadable_files(make, with_unreadable: Path, tmp_path) -> None:
    detector = make().fit(training_images(with_unreadable))
    skipped = detector.skipped_images_
    assert [Path(item["path"]).name for item in skipped] == ["cut.png", "notes.png"]
    assert "truncated" in skipped[0]["reason"] and "cut.png" not in skipped[0]["reason"]
    assert skipped[1]["reason"] == "not a supported image file"
    assert detector.n_train_images_ == (4 if detector.refit_on_all else 3)
    path = detector.save(tmp_path / "m.safetensors")
    assert read_config(path)["fitted"]["skipped_images"] == skipped
    assert anomalens.load(path).skipped_images_ == skipped


def test_strict_raises_on_the_first_unreadable_file(with_unreadable: Path) -> None:
    detector = anomalens.create("padim", **PARAMS)
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        detector.fit(training_images(with_unreadable), strict=True)
    assert not hasattr(detector, "image_threshold_")


def test_fewer_than_2_readable_images_is_an_error(with_unreadable: Path) -> None:
    images = [*training_images(with_unreadable)[:1], with_unreadable / "cut.png"]
    with pytest.raises(DataError, match=r"got 1 \(1 unreadable image\(s\) skipped\)"):
        anomalens.create("padim", **PARAMS).fit(images)


def test_a_model_file_without_the_list_loads_with_none_skipped() -> None:
    path = FIXTURES / "patchcore_v1.safetensors"
    assert "skipped_images" not in read_config(path)["fitted"]
    assert anomalens.load(path).skipped_images_ == []
