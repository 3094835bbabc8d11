"""Shared fixtures: the synthetic demo category (small, fast), a PatchCore fitted on it, a
folder of its normal images with two unreadable files among them, and a throwaway PostgreSQL
server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import anomalens
from anomalens.data.mvtec import training_images
from anomalens.data.synthetic import make_category
from tests.pg_server import PostgresServer, PostgresUnavailable

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# the CPUs shared among the test workers (`make test` runs more workers than this machine's two
# cores: much of the suite waits on processes it starts, Ray's, servers', the CLI's)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


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


@pytest.fixture
def with_unreadable(brick: Path, tmp_path: Path) -> Path:
    """A folder of 4 normal brick images, a truncated PNG (`cut.png`) and a text file named
    `notes.png`."""
    folder = tmp_path / "good"
    folder.mkdir()
    images = training_images(brick)[:4]
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    data = images[0].read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("not an image\n", encoding="utf-8")
    return folder


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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (`tests/pg_server.py`; fsync off). Without
    server binaries the tests that use it are skipped, except under CI (env var CI set), where
    they fail: CI installs Debian's `postgresql` package (`.ci/run`)."""
    try:
        server = PostgresServer(durable=False)
    except PostgresUnavailable as error:
        unavailable = str(error)
    else:
        unavailable = ""
    if unavailable:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set and PostgreSQL cannot run: {unavailable}", pytrace=False)
        pytest.skip(f"PostgreSQL tests skipped: {unavailable}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL (`postgresql+psycopg://...`) of a database created on the session's server."""
    return postgres_server.create_database("anomalens")


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of an empty database of its own for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The heavy modules (marked `slow`) first: the test workers take modules in this order, so the
    longest start first and the short ones fill the end (the whole suite finishes sooner)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
