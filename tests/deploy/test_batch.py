"""Batch inspection: streamed, resumable results that survive `kill -9`; no overlay collisions;
outputs checked before the work starts."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from anomalens.data.inputs import collect_inputs
from anomalens.data.synthetic import normal_crop
from anomalens.deploy.batch import CsvResults, inspect_images
from tests.test_cli import run

N_IMAGES = 240


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """N_IMAGES small brick images in two folders that share their file names."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        folder = root / ("line_a" if i % 2 == 0 else "line_b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(normal_crop("brick", rng, 64)).save(folder / f"{i // 2:03d}.png")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _arguments(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    folders = [str(images / "line_a"), str(images / "line_b")]
    return ["predict", str(model), *folders, "--out", str(out), "--threads", "1", *extra]


DEFAULT_SIGINT = (
    "import os, signal, sys; "
    "signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)
"""Run as `python -c DEFAULT_SIGINT ARGS...`: `python ARGS...` with Ctrl-C neither ignored nor
blocked, whatever the test worker's own signal state (a child inherits both)."""


def _command(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "anomalens", *_arguments(model, images, out, *extra)]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_kill_9_then_resume_loses_nothing(
    patchcore_files, many_images, tmp_path, monkeypatch, capsys, restore_threads
) -> None:
    """One uninterrupted run and the resumed one run here (one compute thread, as the killed
    process), so only the killed run pays a fresh process's start."""
    model, _ = patchcore_files
    whole = tmp_path / "whole"
    assert run(monkeypatch, capsys, *_arguments(model, many_images, whole))[0] == 0
    expected = {row["path"]: row for row in _rows(whole / "results.csv")}
    assert len(expected) == N_IMAGES

    cut = tmp_path / "cut"
    process = subprocess.Popen(
        _command(model, many_images, cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    partial = cut / "results.csv.partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if partial.exists() and partial.read_bytes().count(b"\n") > 40:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = partial.read_bytes().count(b"\n") - 1
    assert 40 <= written < N_IMAGES, "the run was killed part-way, with rows on disk"
    assert not (cut / "results.csv").exists()

    code, _, err = run(monkeypatch, capsys, *_arguments(model, many_images, cut, "--resume"))
    assert code == 0, err
    rows = _rows(cut / "results.csv")
    assert sorted(row["path"] for row in rows) == sorted(expected), "each image exactly once"
    for row in rows:
        assert row["score"] == expected[row["path"]]["score"]
        assert row["label"] == expected[row["path"]]["label"]
        assert (cut / row["overlay"]).is_file(), f"no overlay for {row['path']}"
    overlays = list((cut / "overlays").rglob("*.png"))
    assert len(overlays) == N_IMAGES, "two folders sharing names give as many overlays as images"
    assert not partial.exists()


def test_ctrl_c_keeps_the_rows_and_says_how_to_resume(
    patchcore_files, many_images, tmp_path
) -> None:
    model, _ = patchcore_files
    out = tmp_path / "out"
    command = [sys.executable, "-c", DEFAULT_SIGINT, *_command(model, many_images, out)[1:]]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    partial = out / "results.csv.partial"
    # The run goes on in short slices, stopped in between, and is interrupted while stopped: on a
    # busy machine it cannot finish between the look at its rows and the interrupt.
    deadline = time.monotonic() + 120
    process.send_signal(signal.SIGSTOP)
    while time.monotonic() < deadline and process.poll() is None:
        if partial.exists() and partial.read_bytes().count(b"\n") > 10:
            break
        process.send_signal(signal.SIGCONT)
        time.sleep(0.05)
        process.send_signal(signal.SIGSTOP)
    assert process.poll() is None, "the run ended before it could be interrupted"
    state = Path(f"/proc/{process.pid}/status").read_text().splitlines()
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, (stderr, [line for line in state if line.startswith("Sig")])
    assert "--resume" in stderr and "Traceback" not in stderr
    assert len(_rows(partial)) >= 10


def test_rows_keep_relative_paths_and_regions(fitted_patchcore, brick, tmp_path) -> None:
    found = collect_inputs([brick / "test" / "good", brick / "test" / "hole"])
    summary = inspect_images(fitted_patchcore, found, tmp_path / "out")
    rows = _rows(summary.results)
    assert len(rows) == len(found.images) == summary.scored
    assert [row["relative_path"] for row in rows] == [i.relative for i in found.images]
    direct = fitted_patchcore.predict([i.path for i in found.images])
    assert [float(row["score"]) for row in rows] == [p.score for p in direct], "same, in order"
    assert {row["relative_path"].split("/")[0] for row in rows} == {"good", "hole"}
    for row in rows:
        regions = json.loads(row["regions"])
        assert row["overlay"] == f"overlays/{row['relative_path']}"
        if row["label"] == "0":
            assert regions == [], "a normal image has no defect regions"
        for region in regions:
            x0, y0, x1, y1 = region["box"]
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128 and region["area"] > 0
    assert any(json.loads(row["regions"]) for row in rows if row["label"] == "1")


def test_parquet_results_resume_to_the_same_rows(fitted_patchcore, brick, tmp_path) -> None:
    found = collect_inputs([brick / "test"], recursive=True)
    whole = inspect_images(fitted_patchcore, found, tmp_path / "whole", fmt="parquet")
    first = collect_inputs([brick / "test" / "good"])
    inspect_images(fitted_patchcore, first, tmp_path / "parts", fmt="parquet", overlays=False)
    resumed = inspect_images(
        fitted_patchcore, found, tmp_path / "parts", fmt="parquet", resume=True, overlays=False
    )
    assert resumed.kept == len(first.images) and resumed.scored == len(found.images) - resumed.kept
    table = pq.read_table(resumed.results).to_pylist()
    reference = {row["path"]: row for row in pq.read_table(whole.results).to_pylist()}
    assert sorted(row["path"] for row in table) == sorted(reference)
    for row in table:
        assert row["score"] == reference[row["path"]]["score"]
    assert not (tmp_path / "parts" / "results.parquet.parts").exists()


def test_a_torn_last_line_is_dropped_on_resume(tmp_path) -> None:
    store = CsvResults(tmp_path)
    store.open(resume=False)
    row = {"path": "a.png", "relative_path": "a.png", "score": 1.5, "label": 1}
    store.append([{**row, "regions": "[]", "overlay": "", "error": ""}])
    with open(store.partial, "a", encoding="utf-8") as handle:
        handle.write("b.png,b.png,0.")  # a crash in the middle of a write
    assert CsvResults(tmp_path).open(resume=True) == {"a.png"}
    assert store.partial.read_text().endswith("[],,\n")


def test_bad_inputs_become_rows_and_exit_2(
    patchcore_files, brick, tmp_path, monkeypatch, capsys
) -> None:
    model_file, _ = patchcore_files
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes((brick / "test" / "good" / "000.png").read_bytes())
    os.symlink(tmp_path / "gone.png", images / "link.png")
    code, _, stderr = run(
        monkeypatch, capsys, "predict", model_file, images, "--out", tmp_path / "o"
    )
    rows = {row["relative_path"]: row for row in _rows(tmp_path / "o" / "results.csv")}
    assert code == 2 and set(rows) == {"good.png", "link.png"}
    assert rows["link.png"]["error"].startswith("dangling link") and "link.png" in stderr


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "{brick}", "-o", "{blocker}/model.safetensors"],
        ["predict", "{model}", "{brick}/test/good", "--out", "{blocker}/out"],
        ["evaluate", "{model}", "{brick}", "--json", "{blocker}/m.json"],
        ["export", "{model}", "-o", "{blocker}/m.onnx"],
        ["benchmark", "--data", "{brick}", "--out", "{blocker}/bench"],
    ],
)
def test_unwritable_outputs_fail_before_the_work(
    patchcore_files, brick, tmp_path, monkeypatch, capsys, args
) -> None:
    model_file, _ = patchcore_files
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    values = {"brick": brick, "blocker": blocker, "model": model_file}
    started = time.monotonic()
    code, stdout, stderr = run(monkeypatch, capsys, *[a.format(**values) for a in args])
    assert code == 2 and "cannot write" in stderr and "a-file" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert "fitting" not in stdout and time.monotonic() - started < 5
