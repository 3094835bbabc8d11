"""`predict --engine ray`: the local engine's rows and overlays, scored by Ray actors, on a local
instance and on a three-node cluster on this machine; an actor killed mid-run loses nothing.
`fit --engine ray`: PatchCore's shards (features, shard coresets) on Ray actors give the local
sharded fit's bank and thresholds; other methods are a one-line error."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image
from ray.cluster_utils import Cluster

import anomalens
from anomalens.data.synthetic import normal_crop
from anomalens.deploy.ray_engine import CALL_CHUNKS, NEEDS_RAY, chunks_per_call
from tests.test_cli import run

pytestmark = pytest.mark.slow  # started first by `make test` (tests/conftest.py)

ACTOR = "ray::MapWorker(MapBatches(ChunkScorer))"
"""The process title of a scoring actor."""
SOURCE = str(Path(anomalens.__file__).resolve().parents[1])
RAY_OPTIONS = {
    "include_dashboard": False,
    "log_to_driver": False,
    "logging_level": logging.ERROR,
    # workers are separate processes: they import this checkout's anomalens
    "runtime_env": {"env_vars": {"PYTHONPATH": SOURCE}},
}


FIT_SMALL = ("--image-size", "64", "--param", "coreset_ratio=0.1", "--param", "batch_size=4")
"""A quick PatchCore fit for `fit --engine ray`."""


@pytest.fixture(scope="module")
def model(fitted_patchcore, tmp_path_factory) -> Path:
    return fitted_patchcore.save(tmp_path_factory.mktemp("ray_model") / "model.safetensors")


def _rows(out: Path) -> list[dict[str, str]]:
    if (out / "results.parquet").exists():
        table = pq.read_table(out / "results.parquet").to_pylist()
        return [{k: "" if v is None else str(v) for k, v in row.items()} for row in table]
    with open(out / "results.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _predict(monkeypatch, capsys, model: Path, inputs: list[Path], out: Path, *extra: str):
    return run(monkeypatch, capsys, "predict", model, *inputs, "-r", "--out", out, *extra)


def _assert_same(local: Path, ray_out: Path, *, exact: bool) -> None:
    """The same rows in the same order; overlays byte for byte when `exact` (same threads)."""
    expected, got = _rows(local), _rows(ray_out)
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    for want, row in zip(expected, got, strict=True):
        for column in ("relative_path", "label", "overlay", "error"):
            assert row[column] == want[column], (column, row["path"])
        if want["error"]:
            continue
        assert float(row["score"]) == pytest.approx(float(want["score"]), rel=1e-5)
        picture = (ray_out / row["overlay"]).read_bytes()
        if exact:
            assert row["regions"] == want["regions"]
            assert picture == (local / want["overlay"]).read_bytes()
        else:
            assert (
                Image.open(ray_out / row["overlay"]).size == Image.open(local / row["overlay"]).size
            )


def test_bad_options_are_one_line_errors(model, brick, tmp_path, monkeypatch, capsys):
    images = [brick / "test" / "good"]
    for extra, message in [
        (("--engine", "ray", "--actors", "0"), "--actors must be at least 1, got 0"),
        (("--address", "auto"), "--address and --actors need --engine ray"),
        (("--actors", "2"), "--address and --actors need --engine ray"),
        (("--engine", "spark"), "--engine must be one of local, ray; got 'spark'"),
        (("--engine", "ray", "--threads", "2"), "--threads is for the local engine"),
    ]:
        code, _, err = _predict(monkeypatch, capsys, model, images, tmp_path / "out", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, err = _predict(monkeypatch, capsys, model, images, tmp_path / "out", "--engine", "ray")
    assert (code, err.strip()) == (2, f"error: {NEEDS_RAY}")
    assert not ray.is_initialized()


def test_bad_fit_options_are_one_line_errors(brick, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "model.safetensors"
    for extra, message in [
        (("--model", "padim", "--engine", "ray"), "--engine ray fits patchcore only, not padim"),
        (
            ("--tile", "128", "--engine", "ray"),
            "--engine ray fits patchcore only, not patchcore on",
        ),
        (("--actors", "2"), "--address and --actors need --engine ray"),
        (("--engine", "spark"), "--engine must be one of local, ray; got 'spark'"),
        (("--engine", "ray", "--actors", "0"), "--actors must be at least 1, got 0"),
        (("--auto", "--engine", "ray"), "--auto fits with the local engine"),
    ]:
        code, _, err = run(monkeypatch, capsys, "fit", brick, "-o", out, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not ray.is_initialized()


def test_ray_is_imported_only_by_the_ray_engine() -> None:
    check = "import sys, anomalens.cli; assert 'ray' not in sys.modules"
    subprocess.run(
        [sys.executable, "-c", check], check=True, env={**os.environ, "PYTHONPATH": SOURCE}
    )


def test_starts_a_local_instance_and_shuts_it_down(
    model, brick, with_unreadable, tmp_path, monkeypatch, capsys
) -> None:
    """No Ray connection and no --address: a local instance sized to the machine, one actor with
    all its CPUs (so the local run here uses as many threads); bad images are rows."""
    inputs = [with_unreadable]
    threads = str(os.cpu_count())
    local = _predict(monkeypatch, capsys, model, inputs, tmp_path / "local", "--threads", threads)
    ray_run = _predict(monkeypatch, capsys, model, inputs, tmp_path / "ray", "--engine", "ray")
    assert local[0] == ray_run[0] == 2, ray_run  # exit 2: two inputs could not be read
    lines = ray_run[2].splitlines()  # one line per skipped file, however long its path
    assert any("cut.png" in line for line in lines) and any("notes.png" in line for line in lines)
    assert not ray.is_initialized()
    _assert_same(tmp_path / "local", tmp_path / "ray", exact=False)


@pytest.fixture(scope="class")
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, **RAY_OPTIONS)
    yield
    ray.shutdown()


@pytest.mark.usefixtures("local_ray")
class TestOnALocalInstance:
    """Two actors of one CPU each, against the local engine with one thread: the same bytes."""

    def test_same_rows_and_overlays_as_the_local_engine(
        self, model, brick, with_unreadable, tmp_path, monkeypatch, capsys
    ) -> None:
        inputs = [brick / "test", with_unreadable]
        local = _predict(monkeypatch, capsys, model, inputs, tmp_path / "local", "--threads", "1")
        ray_run = _predict(
            monkeypatch, capsys, model, inputs, tmp_path / "ray",
            "--engine", "ray", "--actors", "2", "--format", "parquet",
        )  # fmt: skip
        assert local[0] == ray_run[0] == 2, ray_run
        summary = "18 images scored, "
        assert local[1].startswith(summary) and ray_run[1].split(";")[0] == local[1].split(";")[0]
        assert ray.is_initialized(), "a connection it did not make is left open"
        _assert_same(tmp_path / "local", tmp_path / "ray", exact=True)
        assert len(_rows(tmp_path / "ray")) == 14 + 6

    def test_more_actors_than_cpus_is_an_error(self, model, brick, tmp_path, monkeypatch, capsys):
        inputs = [brick / "test" / "good"]
        options = ("--engine", "ray", "--actors", "3")
        code, _, err = _predict(monkeypatch, capsys, model, inputs, tmp_path / "out", *options)
        assert (code, err.strip()) == (
            2,
            "error: --actors 3 needs a CPU per actor; the Ray cluster has 2",
        )

    def test_resume_scores_only_what_is_missing(
        self, model, brick, tmp_path, monkeypatch, capsys
    ) -> None:
        """A run cut after 5 rows (of the local engine, one thread) resumed with Ray."""
        inputs = [brick / "test"]
        whole, cut = tmp_path / "whole", tmp_path / "cut"
        assert _predict(monkeypatch, capsys, model, inputs, whole, "--threads", "1")[0] == 0
        shutil.copytree(whole, cut)
        (cut / "results.csv").unlink()
        rows = _rows(whole)
        with open(cut / "results.csv.partial", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows[:5])
        for row in rows[5:]:
            (cut / row["overlay"]).unlink()
        options = ("--engine", "ray", "--actors", "2", "--resume")
        code, out, _ = _predict(monkeypatch, capsys, model, inputs, cut, *options)
        assert code == 0 and "9 images scored (5 kept from before)" in out
        _assert_same(whole, cut, exact=True)
        code, out, _ = _predict(monkeypatch, capsys, model, inputs, cut, *options)
        assert code == 0 and "0 images scored (14 kept from before)" in out
        _assert_same(whole, cut, exact=True)

    def test_two_actors_give_the_local_sharded_bank(
        self, brick, tmp_path, monkeypatch, capsys
    ) -> None:
        """16 images in shards of 6 (3 shards) on two one-CPU actors, against the local fit with
        one thread: the same bank, thresholds and scores."""
        fit = ("fit", brick, *FIT_SMALL, "--param", "shard_images=6", "-o")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            local = run(monkeypatch, capsys, *fit, tmp_path / "local.safetensors")
        finally:
            torch.set_num_threads(threads)
        options = ("--engine", "ray", "--actors", "2")
        remote = run(monkeypatch, capsys, *fit, tmp_path / "ray.safetensors", *options)
        assert local[0] == remote[0] == 0, remote
        assert ray.is_initialized(), "a connection it did not make is left open"
        expected = anomalens.load(tmp_path / "local.safetensors")
        got = anomalens.load(tmp_path / "ray.safetensors")
        assert got.n_patches_ == expected.n_patches_
        assert len(got.memory_bank_) == len(expected.memory_bank_) == round(got.n_patches_ * 0.1)
        np.testing.assert_allclose(got.memory_bank_, expected.memory_bank_, rtol=1e-5, atol=1e-6)
        assert got.image_threshold_ == pytest.approx(expected.image_threshold_, rel=1e-5)
        images = sorted((brick / "test").rglob("*.png"))[:4]
        for want, got_one in zip(expected.predict(images), got.predict(images), strict=True):
            assert got_one.score == pytest.approx(want.score, rel=1e-5)


def _descendants(title: str) -> list[int]:
    """Processes of this test (children, grandchildren...) whose command line starts `title`."""
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                titles[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().decode()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    ours = {os.getpid()}
    while grown := {pid for pid, parent in parents.items() if parent in ours} - ours:
        ours |= grown
    return sorted(pid for pid in ours if titles.get(pid, "").startswith(title))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A head without CPUs and two one-CPU worker nodes: every actor runs on a worker node."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, **RAY_OPTIONS)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_an_actor_killed_mid_run_on_a_cluster_loses_nothing(
    model, tmp_path, cluster, monkeypatch, capsys
) -> None:
    rng = np.random.default_rng(1)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(96):
        Image.fromarray(normal_crop("brick", rng, 128)).save(images / f"{i:03d}.png")
    local, out = tmp_path / "local", tmp_path / "ray"
    assert _predict(monkeypatch, capsys, model, [images], local, "--threads", "1")[0] == 0

    killed: list[tuple[list[int], int]] = []  # (the actors then, the first killed; rows stored)
    restarted: list[int] = []
    finished = threading.Event()

    def kill_one_actor_and_see_it_restart() -> None:
        partial = out / "results.csv.partial"
        while not killed and not finished.wait(0.02):
            stored = partial.read_bytes().count(b"\n") - 1 if partial.exists() else 0
            actors = _descendants(ACTOR)
            if stored > 0 and actors:
                os.kill(actors[0], signal.SIGKILL)
                killed.append((actors, stored))
        # The other actors wait (stopped) until Ray has restarted the killed one: on a busy machine
        # they would otherwise finish the run before the new actor process is seen.
        survivors = killed[0][0][1:] if killed else []
        for pid in survivors:
            os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 120
        try:
            while killed and not restarted and time.monotonic() < deadline:
                restarted.extend(set(_descendants(ACTOR)) - set(killed[0][0]))
                time.sleep(0.05)
        finally:
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    killer = threading.Thread(target=kill_one_actor_and_see_it_restart)
    killer.start()
    try:
        code, printed, err = _predict(monkeypatch, capsys, model, [images], out, "--engine", "ray")
    finally:
        finished.set()
        killer.join()
    assert code == 0, err
    assert "96 images scored" in printed
    assert killed and killed[0][1] < 96, "killed while images were still to score"
    assert restarted, "Ray started a new actor process"
    rows = _rows(out)
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in images.glob("*.png"))
    assert len({row["path"] for row in rows}) == len(rows) == 96, "each image exactly once"
    _assert_same(local, out, exact=True)


def test_chunks_per_call_fill_the_pipeline_and_spread_the_work() -> None:
    assert chunks_per_call(1000, 1) == CALL_CHUNKS, "long runs: the most per call"
    assert chunks_per_call(24, 3) == 2, "each of 3 actors gets 4 calls of 2 chunks"
    assert chunks_per_call(5, 2) == 1, "few chunks: one per call, spread over the actors"
    assert chunks_per_call(0, 1) == 1
