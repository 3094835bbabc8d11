"""The command line, run in-process through its entry point (exit codes, files, one-line errors)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import anomalens
from anomalens.cli import main
from anomalens.evaluation.viz import REGION_COLOUR


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["anomalens", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
        sys.exit(0)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


@pytest.fixture(scope="module")
def model_file(brick: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "brick.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            sys,
            "argv",
            [
                "anomalens",
                "fit",
                str(brick),
                "-o",
                str(path),
                "--image-size",
                "128",
                "--param",
                "coreset_ratio=0.25",
            ],
        )
        with pytest.raises(SystemExit) as exit_info:
            main()
            sys.exit(0)
    assert exit_info.value.code in (0, None)
    return path


def test_fit_writes_a_model_file(model_file: Path) -> None:
    from anomalens.core.model_file import read_config

    config = read_config(model_file)
    assert config["params"]["coreset_ratio"] == 0.25 and config["params"]["image_size"] == 128


def test_predict_goes_on_past_bad_files(model_file, brick, tmp_path, monkeypatch, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((brick / "test").glob("*/000.png")):
        (images / f"{source.parent.name}.png").write_bytes(source.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    code, _, stderr = run(
        monkeypatch, capsys, "predict", model_file, images, tmp_path / "nope.png", "--out", out
    )
    assert code == 2
    with open(out / "results.csv", encoding="utf-8") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert set(rows) == {
        "foreign.png",
        "good.png",
        "hole.png",
        "scratch.png",
        "stain.png",
        "broken.png",
        "nope.png",
    }
    assert "broken.png" in rows["broken.png"]["error"] and rows["broken.png"]["score"] == ""
    assert "not found" in rows["nope.png"]["error"]
    assert float(rows["foreign.png"]["score"]) > float(rows["good.png"]["score"])
    assert rows["good.png"]["label"] == "0" and rows["foreign.png"]["label"] == "1"
    assert rows["hole.png"]["relative_path"] == "images/hole.png"
    overlays = out / "overlays" / "images"
    assert (overlays / "hole.png").is_file() and not (overlays / "broken.png").exists()
    assert "broken.png" in stderr and "Traceback" not in stderr


def test_evaluate_writes_metrics_json(model_file, brick, tmp_path, monkeypatch, capsys) -> None:
    code, _, _ = run(
        monkeypatch,
        capsys,
        "evaluate",
        model_file,
        brick,
        "--json",
        tmp_path / "m.json",
        "--out",
        tmp_path / "report",
    )
    assert code == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "aupro"):
        assert 0.5 < metrics[key] <= 1.0
    assert metrics["n_images"] == 14 and metrics["predict_ms_per_image"] > 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 14
    assert len(list((tmp_path / "report" / "overlays").glob("*/*.png"))) == 14
    regions = json.loads((tmp_path / "report" / "regions.json").read_text())
    assert len(regions) == 14 and page.count(", largest ") == sum(map(bool, regions.values())) > 0
    name, (first, *_) = next((name, found) for name, found in regions.items() if found)
    x0, y0, x1, y1 = first["box"]
    picture = np.asarray(
        Image.open(tmp_path / "report" / "overlays" / Path(name).with_suffix(".png"))
    )
    assert (picture[y0, x0:x1] == REGION_COLOUR).all() and (
        picture[y0:y1, x1 - 1] == REGION_COLOUR
    ).all()


FIT_SMALL = ["--model", "padim", "--backbone", "handcrafted", "--image-size", "64"]


def test_fit_skips_and_lists_unreadable_images(
    with_unreadable, tmp_path, monkeypatch, capsys
) -> None:
    model = tmp_path / "m.safetensors"
    code, stdout, stderr = run(monkeypatch, capsys, "fit", with_unreadable, "-o", model, *FIT_SMALL)
    assert code == 0, stderr
    assert stderr.splitlines() == [
        f"skipped unreadable image: {with_unreadable / 'cut.png'} (image file is truncated)",
        f"skipped unreadable image: {with_unreadable / 'notes.png'} (not a supported image file)",
    ]
    assert "skipped 2 unreadable image(s); saved" in " ".join(stdout.split())
    loaded = anomalens.load(model)
    assert [item["path"] for item in loaded.skipped_images_] == [
        str(with_unreadable / "cut.png"),
        str(with_unreadable / "notes.png"),
    ]
    code, stdout, _ = run(monkeypatch, capsys, "info", model)
    assert code == 0 and "notes.png" in stdout


@pytest.mark.parametrize("extra", [["--strict"], []])
def test_fit_strict_or_too_few_readable_images_exits_2(
    with_unreadable, extra, tmp_path, monkeypatch, capsys
) -> None:
    if not extra:  # one readable image is too few, strict or not
        for path in sorted(with_unreadable.glob("00*.png"))[1:]:
            path.unlink()
    model = tmp_path / "m.safetensors"
    code, _, stderr = run(
        monkeypatch, capsys, "fit", with_unreadable, "-o", model, *FIT_SMALL, *extra
    )
    assert code == 2 and not model.exists()
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    message = "cannot read image" if extra else "got 1 (2 unreadable image(s) skipped)"
    assert message in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "{tmp}/missing", "-o", "{tmp}/m.safetensors"], "not found"),
        (["fit", "{tmp}", "-o", "{tmp}/m.safetensors"], "no images"),
        (["predict", "{tmp}/bad.safetensors", "x.png", "--out", "{tmp}/o"], "not a readable"),
        (["evaluate", "{tmp}/missing.safetensors", "{tmp}"], "model file not found"),
        (["fit", "{tmp}", "-o", "m.safetensors", "--model", "nope"], "unknown model"),
        (["fit", "{tmp}", "-o", "m.safetensors", "--param", "oops"], "KEY=VALUE"),
    ],
)
def test_mistakes_give_one_line_and_status_2(tmp_path, monkeypatch, capsys, args, message) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    code, _, stderr = run(monkeypatch, capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert message in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(monkeypatch, capsys) -> None:
    code, _, stderr = run(monkeypatch, capsys, "fit")
    assert code == 2 and "Missing" in stderr


def test_models_lists_patchcore(monkeypatch, capsys) -> None:
    code, stdout, _ = run(monkeypatch, capsys, "models")
    assert code == 0 and "patchcore" in stdout.split()


def test_python_dash_m_runs_the_same_command_line() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "anomalens", "info", "missing.safetensors"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "missing.safetensors" in bad.stderr
