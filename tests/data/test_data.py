"""Tests for anomalens.data: image/mask loading, the MVTec reader and synthetic demo data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomalens.data as data
import anomalens.data.io as data_io
from anomalens.errors import DataError, ImageReadError


def _save(tmp_path: Path, name: str, image: Image.Image, **kwargs: object) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


# --- load_image: modes -------------------------------------------------------------------------


def test_load_grayscale(tmp_path: Path) -> None:
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = data.load_image(_save(tmp_path, "g.png", Image.fromarray(gray)))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_load_16bit_grayscale_scales_full_range(tmp_path: Path) -> None:
    values = np.array([[0, 257, 65535], [128, 129, 32896]], dtype=np.uint16)
    path = _save(tmp_path, "g16.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    out = data.load_image(path)
    np.testing.assert_array_equal(out[:, :, 0], [[0, 1, 255], [0, 1, 128]])
    assert (out == out[:, :, :1]).all()


def test_load_32bit_int_tiff(tmp_path: Path) -> None:
    image = Image.new("I", (3, 1))
    image.putdata([0, 65535, 70000])
    out = data.load_image(_save(tmp_path, "i.tif", image))
    np.testing.assert_array_equal(out[0, :, 1], [0, 255, 255])


def test_load_rgba_composites_onto_black(tmp_path: Path) -> None:
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
    out = data.load_image(_save(tmp_path, "a.png", Image.fromarray(rgba)))
    assert out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(out[0, 2], [100, 50, 25])


def test_load_la(tmp_path: Path) -> None:
    la = Image.merge("LA", [Image.new("L", (2, 1), 200), Image.new("L", (2, 1), 255)])
    la.putpixel((1, 0), (200, 0))
    out = data.load_image(_save(tmp_path, "la.png", la))
    np.testing.assert_array_equal(out[0], [[200, 200, 200], [0, 0, 0]])


def test_load_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    out = data.load_image(_save(tmp_path, "p.png", image))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 0, 255]])
    out = data.load_image(_save(tmp_path, "pt.png", image, transparency=0))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [0, 0, 255]])


def test_load_1bit(tmp_path: Path) -> None:
    image = Image.new("1", (3, 2))
    image.putpixel((1, 0), 1)
    out = data.load_image(_save(tmp_path, "b.png", image))
    assert out.shape == (2, 3, 3)
    assert out[0, 1].tolist() == [255, 255, 255] and out.sum() == 3 * 255


def test_load_cmyk_jpeg(tmp_path: Path) -> None:
    image = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red
    out = data.load_image(_save(tmp_path, "c.jpg", image, quality=95))
    assert out.shape == (6, 8, 3)
    red, green, blue = out.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


@pytest.mark.parametrize(("orientation", "expected"), [(6, [0, 0, 255]), (8, [255, 0, 0])])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, expected: list[int]) -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = [255, 0, 0]  # left half red
    rgb[:, 20:] = [0, 0, 255]  # right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path, "o.jpg", Image.fromarray(rgb), exif=exif, quality=95)
    out = data.load_image(path)
    assert out.shape == (40, 20, 3)
    # 6 rotates 90° clockwise (left half goes to the top), 8 counter-clockwise.
    np.testing.assert_allclose(out[-5:].reshape(-1, 3).mean(axis=0), expected, atol=20)


# --- load_image: errors ------------------------------------------------------------------------


def test_truncated_png_raises(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = _save(tmp_path, "whole.png", Image.fromarray(noise)).read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageReadError, match=r"cannot read image .*cut\.png"):
        data.load_image(path)


def test_random_bytes_raise(tmp_path: Path) -> None:
    path = tmp_path / "junk.png"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ImageReadError, match=r"junk\.png: not a supported image file"):
        data.load_image(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"nope\.png: file not found"):
        data.load_image(tmp_path / "nope.png")


def test_decompression_bomb_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path, "big.png", Image.new("RGB", (20, 20)))
    monkeypatch.setattr(data_io, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageReadError, match=r"big\.png: 20x20 pixels exceeds"):
        data.load_image(path)
    monkeypatch.setattr(data_io, "MAX_IMAGE_PIXELS", 10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own check also maps
    with pytest.raises(ImageReadError, match=r"big\.png: .*decompression bomb"):
        data.load_image(path)


# --- to_rgb_array / load_mask ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.array([[7]], np.uint8), 7),
        (np.array([[[7]]], np.uint8), 7),
        (np.array([[65535]], np.uint16), 255),
        (np.array([[True]]), 255),
        (np.array([[0.5]], np.float32), 128),
        (np.array([[1.7]], np.float64), 255),
        (np.array([[-0.2]], np.float64), 0),
        (np.array([[[10, 20, 30, 255]]], np.uint8), [10, 20, 30]),
    ],
)
def test_to_rgb_array_from_arrays(array: np.ndarray, expected: int | list[int]) -> None:
    out = data.to_rgb_array(array)
    assert out.shape == (1, 1, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], np.broadcast_to(expected, 3))


def test_to_rgb_array_from_pil_and_path(tmp_path: Path) -> None:
    image = Image.new("L", (4, 3), 9)
    assert data.to_rgb_array(image).shape == (3, 4, 3)
    path = _save(tmp_path, "x.png", image)
    np.testing.assert_array_equal(data.to_rgb_array(path), data.to_rgb_array(str(path)))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 2, 2), np.uint8), r"shape \(2, 2, 2\)"),
        (np.zeros((2, 2, 3, 1), np.uint8), r"shape \(2, 2, 3, 1\)"),
        (np.zeros((2, 2), np.int64), "dtype int64"),
        (np.full((2, 2), np.nan), "NaN"),
    ],
)
def test_to_rgb_array_rejects(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageReadError, match=message):
        data.to_rgb_array(array)


def test_load_mask_any_mode(tmp_path: Path) -> None:
    values = np.array([[0, 1], [0, 255]], np.uint8)
    expected = values > 0
    np.testing.assert_array_equal(
        data.load_mask(_save(tmp_path, "m.png", Image.fromarray(values))), expected
    )
    rgb = Image.fromarray(np.repeat(values[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(data.load_mask(_save(tmp_path, "m_rgb.png", rgb)), expected)
    sixteen = Image.fromarray(values.astype(np.uint16))
    np.testing.assert_array_equal(data.load_mask(_save(tmp_path, "m16.png", sixteen)), expected)


# --- list_images -------------------------------------------------------------------------------


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.TIFF", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in data.list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.TIFF"]


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"folder not found: .*missing"):
        data.list_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"folder not found: .*file\.png"):
        data.list_images(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images in .*empty; expected files ending in \.png"):
        data.list_images(tmp_path / "empty")


# --- MVTec reader on synthetic data ------------------------------------------------------------


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    return data.make_category(root, "grass", seed=3, n_train=5, n_test_good=3, n_test_defect=8)


def test_mvtec_reader(category: Path) -> None:
    train = data.training_images(category)
    assert [p.name for p in train] == [f"{i:03d}.png" for i in range(5)]
    samples = data.test_samples(category)
    assert len(samples) == 11
    assert [s.defect for s in samples] == sorted(s.defect for s in samples)
    assert {s.defect for s in samples} == {"good", *data.DEFECT_TYPES}
    for sample in samples:
        image = data.load_image(sample.path)
        assert image.shape == (128, 128, 3)
        mask = data.load_sample_mask(sample, image.shape[:2])
        assert mask is not None and mask.shape == (128, 128) and mask.dtype == bool
        if sample.label == 0:
            assert sample.defect == "good" and sample.mask_path is None and not mask.any()
        else:
            assert sample.mask_path == (
                category / "ground_truth" / sample.defect / f"{sample.path.stem}_mask.png"
            )
            assert 0.005 <= mask.mean() <= 0.05


def test_mvtec_mask_resized_and_missing(category: Path) -> None:
    sample = next(s for s in data.test_samples(category) if s.label == 1)
    full = data.load_sample_mask(sample, (128, 128))
    half = data.load_sample_mask(sample, (64, 64))
    assert full is not None and half is not None
    np.testing.assert_array_equal(half, full[1::2, 1::2])
    without = data.Sample(sample.path, 1, sample.defect, None)
    assert data.load_sample_mask(without, (128, 128)) is None


def test_training_images_plain_folder_and_errors(category: Path, tmp_path: Path) -> None:
    assert data.training_images(category / "train" / "good") == data.training_images(category)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"folder not found: .*train/good"):
        data.training_images(tmp_path)
    with pytest.raises(DataError, match=r"folder not found: .*test"):
        data.test_samples(tmp_path)
    (tmp_path / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images in .*test"):
        data.test_samples(tmp_path)


# --- synthetic data ----------------------------------------------------------------------------


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.png"))
    }


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    kwargs = {"n_train": 3, "n_test_good": 1, "n_test_defect": 4, "image_size": 64}
    first = data.make_dataset(tmp_path / "a", seed=5, **kwargs)
    second = data.make_dataset(tmp_path / "b", seed=5, **kwargs)
    other = data.make_dataset(tmp_path / "c", seed=6, **kwargs)
    assert [p.name for p in first] == list(data.TEXTURES)
    for a, b, c in zip(first, second, other, strict=True):
        digests = _digests(a)
        assert len(digests) == 3 + 1 + 4 + 4
        assert digests == _digests(b)
        assert all(digests[k] != v for k, v in _digests(c).items())


def test_make_category_refuses_non_empty_folder(category: Path) -> None:
    with pytest.raises(DataError, match="already exists"):
        data.make_category(category.parent, "grass")


@pytest.mark.parametrize("texture", data.TEXTURES)
@pytest.mark.parametrize("kind", data.DEFECT_TYPES)
def test_add_defect_mask_is_the_changed_region(texture: str, kind: str) -> None:
    rng = np.random.default_rng([data.TEXTURES.index(texture), data.DEFECT_TYPES.index(kind)])
    foreign = next(t for t in data.TEXTURES if t != texture)
    for _ in range(5):
        base = data.normal_crop(texture, rng)
        image, mask = data.add_defect(base, kind, rng, foreign_texture=foreign)
        assert image.shape == base.shape and image.dtype == np.uint8
        assert mask.shape == base.shape[:2] and mask.dtype == bool
        assert 0.005 <= mask.mean() <= 0.05
        np.testing.assert_array_equal(image[~mask], base[~mask])
        changed = (image != base).any(axis=-1)
        assert changed[mask].mean() > 0.9  # essentially every masked pixel is altered
        difference = np.abs(image.astype(int) - base.astype(int))[mask].mean()
        assert difference > 20  # clearly visible


def test_add_defect_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
        data.add_defect(np.zeros((64, 64, 3), np.uint8), "dent", np.random.default_rng(0))
