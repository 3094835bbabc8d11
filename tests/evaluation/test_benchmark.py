"""The benchmark: model specs and parameters, one fresh process per row, results.json, report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from anomalens.errors import AnomalensError
from anomalens.evaluation.benchmark import ModelSpec, parse_models, run_benchmark


def test_parse_models_labels_and_parameters() -> None:
    specs = parse_models(
        "patchcore, padim,hc=padim",
        {"image_size": 128, "hc.backbone": "handcrafted", "padim.n_features": 50},
    )
    assert [(s.label, s.model) for s in specs] == [
        ("patchcore", "patchcore"),
        ("padim", "padim"),
        ("hc", "padim"),
    ]
    assert specs[0].params == {"image_size": 128}
    assert specs[1].params == {"image_size": 128, "n_features": 50}
    assert specs[2].params == {"image_size": 128, "backbone": "handcrafted"}
    for text, params, message in [
        ("nope", {}, "unknown model"),
        ("padim,padim", {}, "given twice"),
        ("a-b=padim", {}, "letters, digits"),
        ("padim", {"knn.k": 3}, "names no model"),
        ("padim,knn", {"k": 3}, "padim .padim. has no parameter 'k'"),
        ("", {}, "no models"),
    ]:
        with pytest.raises(AnomalensError, match=message):
            parse_models(text, params)


def test_benchmark_writes_rows_and_a_self_contained_report(brick: Path, tmp_path: Path) -> None:
    specs = [
        ModelSpec("hc", "padim", {"backbone": "handcrafted", "image_size": 64}),
        ModelSpec("broken", "padim", {"n_features": 0, "image_size": 64}),
    ]
    out = tmp_path / "bench"
    rows = run_benchmark(specs, [brick], out, speed_repeats=3, examples=2, command="test")
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["meta"]["command"] == "test"
    good, broken = rows
    assert good["dataset"] == "brick" and good["model"] == "hc" and "error" not in good
    for key in ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "aupro"):
        assert 0.0 <= good[key] <= 1.0
    assert good["image_auroc"] > 0.6
    assert good["fit_s"] > 0 and good["predict_ms_per_image"] > 0
    assert good["predict_ms_batch1"] > 0 and good["backbone_ms_batch1"] > 0
    assert good["peak_rss_mb"] >= good["peak_rss_fit_mb"] >= good["baseline_rss_mb"] > 0
    assert good["model_state_mb"] > 0 and good["params"]["backbone"] == "handcrafted"
    assert [e["label"] for e in good["examples"]] == [0, 0, 1, 1]
    assert "n_features" in broken["error"] and "image_auroc" not in broken
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 3, "ROC, PRO and example figures"
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http" not in page.replace("http-equiv", "")
    assert "broken" in page and "n_features" in page
