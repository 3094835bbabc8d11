"""Shared fixtures: the synthetic demo category (small, fast) and a PatchCore fitted on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import anomalens
from anomalens.data.mvtec import training_images
from anomalens.data.synthetic import make_category

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

torch.set_num_threads(2)


def shared_dataset(name: str) -> Path:
    """Path of a real dataset in ../shared/datasets, or skip the test with the reason."""
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not found at {path} (it is present in CI)")
    return path


@pytest.fixture(scope="session")
def brick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MVTec-layout category (128 px images) built from the brick texture."""
    root = tmp_path_factory.mktemp("synthetic")
    return make_category(
        root, "brick", seed=0, n_train=16, n_test_good=6, n_test_defect=8, image_size=128
    )


@pytest.fixture(scope="session")
def fitted_patchcore(brick: Path):
    """PatchCore fitted on the brick category's normal images (small input, whole bank)."""
    model = anomalens.create("patchcore", image_size=128, coreset_ratio=0.25)
    return model.fit(training_images(brick))


@pytest.fixture(scope="session")
def patchcore_files(fitted_patchcore, tmp_path_factory) -> tuple[Path, Path]:
    """The fitted PatchCore saved as a model file and exported to ONNX by the CLI:
    (model.safetensors, model.onnx)."""
    from typer.testing import CliRunner

    from anomalens.cli import app

    folder = tmp_path_factory.mktemp("patchcore_files")
    model = fitted_patchcore.save(folder / "model.safetensors")
    onnx = folder / "model.onnx"
    result = CliRunner().invoke(app, ["export", str(model), "--format", "onnx", "-o", str(onnx)])
    assert result.exit_code == 0, result.output
    return model, onnx
