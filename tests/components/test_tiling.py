"""Tiling: grid geometry, stitching, lazy tiles, and a small defect that only tiling finds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

import anomalens
from anomalens.components.tiling import Stitcher, TiledImages, check_tiling, tile_grid, tile_starts
from anomalens.core.thresholds import threshold_at_fpr
from anomalens.errors import AnomalensError
from anomalens.evaluation.metrics import image_auroc
from anomalens.models.tiled import Tiled, subsampled, tiled

pytestmark = pytest.mark.slow  # started first by `make test` (tests/conftest.py)


def test_tiles_cover_the_image_with_the_requested_overlap() -> None:
    assert tile_starts(256, 64, 16) == [0, 48, 96, 144, 192]
    assert tile_starts(100, 64, 0) == [0, 36]  # last tile flush with the border
    assert tile_starts(50, 64, 16) == [0]
    for height, width, tile, overlap in [(300, 170, 64, 16), (64, 64, 64, 8), (1000, 30, 128, 0)]:
        covered = np.zeros((height, width), int)
        grid = tile_grid(height, width, tile, overlap)
        for top, left, h, w in grid:
            assert top + h <= height and left + w <= width
            assert (h, w) == (min(tile, height), min(tile, width))
            covered[top : top + h, left : left + w] += 1
        assert covered.min() >= 1
    for bad in [(4, 0, "max"), (64, 64, "max"), (64, -1, "max"), (64, 8, "median")]:
        with pytest.raises(AnomalensError):
            check_tiling(*bad)


@pytest.mark.parametrize(("mode", "overlap_value"), [("max", 3.0), ("mean", 2.0)])
def test_stitching_takes_max_or_mean_in_overlaps(mode: str, overlap_value: float) -> None:
    stitcher = Stitcher(8, 12, scale=1.0, mode=mode)
    stitcher.add((0, 0, 8, 8), np.full((8, 8), 1.0, np.float32))
    stitcher.add((0, 4, 8, 8), np.full((8, 8), 3.0, np.float32))
    result = stitcher.result()
    assert result.shape == (8, 12)
    assert (result[:, :4] == 1.0).all() and (result[:, 8:] == 3.0).all()
    assert (result[:, 4:8] == overlap_value).all()
    half = Stitcher(8, 12, scale=0.5, mode=mode)  # tiles scored at half resolution
    half.add((0, 0, 8, 8), np.full((4, 4), 1.0, np.float32))
    half.add((0, 4, 8, 8), np.full((4, 4), 3.0, np.float32))
    assert half.result().shape == (4, 6) and half.result((8, 12)).shape == (8, 12)


def test_tiled_images_serve_crops_lazily(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (100, 70, 3), dtype=np.uint8) for _ in range(2)]
    path = tmp_path / "a.png"
    Image.fromarray(arrays[0]).save(path)
    tiles = TiledImages([path, arrays[1]], 64, 16)
    assert len(tiles) == 2 * 4  # rows at 0 and 36, columns at 0 and 6
    np.testing.assert_array_equal(tiles[0], arrays[0][:64, :64])
    np.testing.assert_array_equal(tiles[3], arrays[0][36:100, 6:70])
    np.testing.assert_array_equal(tiles[-1], arrays[1][36:100, 6:70])
    assert [t.shape for t in tiles[2:6]] == [(64, 64, 3)] * 4


def stripes_scene(rng: np.random.Generator, size: int = 256, defect: bool = False):
    """Fine vertical stripes (1-pixel period 2) with noise. The defect is a soft-edged 12-pixel
    patch of horizontal stripes: obvious at full resolution, but resizing to a quarter averages
    both patterns to the same flat grey, so it vanishes."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.where(xx % 2 == 0, 0.3, 0.7)
    mask = np.zeros((size, size), bool)
    if defect:
        y, x = rng.integers(12, size - 24, size=2)
        mask[y : y + 12, x : x + 12] = True
        alpha = ndimage.gaussian_filter(mask.astype(float), 2)
        image = image * (1 - alpha) + alpha * np.where(yy % 2 == 0, 0.3, 0.7)
    image = image + rng.normal(0, 0.03, image.shape)
    rgb = np.clip(np.rint(np.repeat(image[..., None], 3, axis=2) * 255), 0, 255)
    return rgb.astype(np.uint8), mask


@pytest.fixture(scope="module")
def stripes():
    rng = np.random.default_rng(0)
    train = [stripes_scene(rng)[0] for _ in range(8)]
    normal = [stripes_scene(rng)[0] for _ in range(3)]
    defects = [stripes_scene(rng, defect=True) for _ in range(3)]
    return train, normal, defects


@pytest.fixture(scope="module")
def tiled_patchcore(stripes) -> Tiled:
    common = {"image_size": 64, "validation_fraction": 0.25, "coreset_ratio": 0.1}
    return tiled("patchcore", tile_size=64, tile_overlap=16, **common).fit(stripes[0])


def peak_near_defect(anomaly_map: np.ndarray, mask: np.ndarray, margin: int = 6) -> bool:
    peak = np.unravel_index(np.argmax(anomaly_map), mask.shape)
    return bool(ndimage.binary_dilation(mask, iterations=margin)[peak])


def test_resizing_misses_a_small_defect_that_tiling_finds(stripes, tiled_patchcore) -> None:
    train, normal, defects = stripes
    images = normal + [image for image, _ in defects]
    labels = [0] * len(normal) + [1] * len(defects)
    resized = anomalens.create(
        "patchcore", image_size=64, validation_fraction=0.25, coreset_ratio=0.1
    ).fit(train)
    for model, finds in [(resized, False), (tiled_patchcore, True)]:
        predictions = model.predict(images)
        auroc = image_auroc(labels, [p.score for p in predictions])
        peaks = [
            peak_near_defect(p.anomaly_map, mask)
            for p, (_, mask) in zip(predictions[len(normal) :], defects, strict=True)
        ]
        assert all(p.anomaly_map.shape == (256, 256) for p in predictions)
        if finds:
            assert auroc == 1.0 and all(peaks), (auroc, peaks)
        else:
            assert auroc <= 0.5 and not any(peaks), (auroc, peaks)


def test_tiled_thresholds_from_streamed_maps_equal_those_of_every_pixel(
    stripes, tiled_patchcore
) -> None:
    scores, pixels = tiled_patchcore._score_held_out(stripes[1])
    want_scores, maps = tiled_patchcore._score_all(stripes[1], "thresholds")
    np.testing.assert_array_equal(scores, want_scores)
    everything = np.concatenate([m.ravel() for m in maps])
    want = threshold_at_fpr(everything, tiled_patchcore.pixel_target_fpr)
    assert pixels.count == everything.size and pixels.threshold() == pytest.approx(want, rel=1e-12)


def test_subsampling_keeps_at_most_the_limit() -> None:
    for shape in [(1000, 1000), (1001, 999), (3, 5000), (64, 64)]:
        canvas = np.zeros(shape, dtype=np.float32)
        assert subsampled(canvas, 4096).size <= 4096
    assert subsampled(np.zeros((64, 64)), 4096).shape == (64, 64)


def test_tiled_model_saves_loads_and_checks_its_detector(
    tiled_patchcore, stripes, tmp_path
) -> None:
    from anomalens.core.model_file import read_config

    path = tiled_patchcore.save(tmp_path / "tiled.safetensors")
    config = read_config(path)
    assert config["model"] == "tiled" and config["params"]["tile_size"] == 64
    assert config["params"]["detector_params"]["coreset_ratio"] == 0.1
    loaded = anomalens.load(path)
    image = stripes[2][0][0]
    (a,), (b,) = tiled_patchcore.predict([image]), loaded.predict([image])
    assert a.score == b.score
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    with pytest.raises(AnomalensError, match="image-level"):
        tiled("knn", tile_size=64, tile_overlap=8, image_size=64).fit(stripes[0][:3])
    with pytest.raises(AnomalensError, match="on the tiled model itself"):
        Tiled("padim", {"seed": 3}, 64, 8).fit(stripes[0][:3])


def test_cli_fit_with_tiles(stripes, tmp_path: Path) -> None:
    from PIL import Image

    from anomalens.cli import app

    folder = tmp_path / "good"
    folder.mkdir()
    for n, image in enumerate(stripes[0][:4]):
        Image.fromarray(image).save(folder / f"{n}.png")
    model = tmp_path / "m.safetensors"
    args = ["fit", str(folder), "-o", str(model), "--model", "padim", "--image-size", "64"]
    args += ["--tile", "128", "--tile-overlap", "32", "--tile-stitch", "mean"]
    args += ["--param", "backbone=handcrafted"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = anomalens.load(model)
    assert isinstance(loaded, Tiled) and loaded.stitch == "mean" and loaded.tile_size == 128
    assert loaded.detector_params["backbone"] == "handcrafted"
    (prediction,) = loaded.predict([stripes[2][0][0]])
    assert prediction.anomaly_map.shape == (256, 256)
