"""Class-labelled data: IDX files, folder-per-class layout, the one-class protocol."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.data.labelled import load_labelled, one_class_split, read_idx, write_idx
from anomalens.errors import DataError
from tests.conftest import shared_dataset


def _tiny_idx(root: Path, prefix: str, count: int, rng: np.random.Generator) -> None:
    images = rng.integers(0, 256, (count, 6, 5), dtype=np.uint8)
    labels = (np.arange(count) % 3).astype(np.uint8)
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_idx_round_trip(tmp_path: Path, name: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4).reshape(2, 3, 4) * 7 - 20).astype(dtype)
    if dtype is np.uint8:
        array = np.abs(array).astype(np.uint8)
    path = write_idx(tmp_path / name, array)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    if not name.endswith(".gz"):  # the big-endian header the format specifies
        assert raw[3] == 3 and int.from_bytes(raw[4:8], "big") == 2
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, array)


def test_idx_matches_the_published_format(tmp_path: Path) -> None:
    """A file built by hand, byte by byte, as MNIST's labels are stored."""
    raw = bytes([0, 0, 0x08, 1]) + (4).to_bytes(4, "big") + bytes([3, 1, 4, 1])
    (tmp_path / "labels.gz").write_bytes(gzip.compress(raw))
    assert read_idx(tmp_path / "labels.gz").tolist() == [3, 1, 4, 1]


def test_bad_idx_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "png")
    good = write_idx(tmp_path / "x.idx", np.zeros((3, 4, 4), np.uint8)).read_bytes()
    (tmp_path / "short.idx").write_bytes(good[:-5])
    with pytest.raises(DataError, match=r"short\.idx holds"):
        read_idx(tmp_path / "short.idx")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing.gz")


def test_idx_dataset_and_one_class_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _tiny_idx(tmp_path, "train", 30, rng)
    _tiny_idx(tmp_path, "t10k", 12, rng)
    train = load_labelled(tmp_path)
    test = load_labelled(tmp_path, "test", class_names=["a", "b", "c"])
    assert train.images.shape == (30, 6, 5) and train.class_names == ["0", "1", "2"]
    assert test.class_names == ["a", "b", "c"] and len(test) == 12
    normal, test_images, labels = one_class_split(train, test, 1)
    assert len(normal) == 10 and np.array_equal(normal, train.images[1::3])
    assert len(test_images) == 12 and labels.tolist() == [1, 0, 1] * 4
    subset, _, _ = one_class_split(train, test, 1, max_train=4, seed=3)
    assert len(subset) == 4 and all(any(np.array_equal(s, n) for n in normal) for s in subset)
    with pytest.raises(DataError, match="out of range"):
        one_class_split(train, test, 3)
    with pytest.raises(DataError, match="folder not found"):
        load_labelled(tmp_path / "nowhere", "test")


def test_folder_per_class(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("test", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    (tmp_path / "test" / "bird").mkdir()  # a class absent from train is not read
    train = load_labelled(tmp_path)
    test = load_labelled(tmp_path, "test")
    assert train.class_names == test.class_names == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    normal, images, labels = one_class_split(train, test, 1)
    assert [p.parent.name for p in normal] == ["dog"] * 3
    assert labels.tolist() == [1, 1, 0, 0] and len(images) == 4
    with pytest.raises(DataError, match="train"):
        load_labelled(tmp_path / "test")


def test_fashion_mnist() -> None:
    root = shared_dataset("fashion_mnist")
    test = load_labelled(root, "test")
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
