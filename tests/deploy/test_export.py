"""ONNX export: one graph, parity with torch on the synthetic data, metadata, CLI, clear errors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import anomalens
from anomalens.cli import main
from anomalens.core.detector import Detector
from anomalens.data.io import load_image
from anomalens.data.mvtec import test_samples
from anomalens.deploy.export import export_onnx
from anomalens.errors import ExportError, ModelFileError, NotFittedError


def run_cli(monkeypatch, capsys, *args: object) -> tuple[int, str, str]:
    """Run `anomalens ARGS` in-process like the console script: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["anomalens", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_graph_is_one_onnx_model_with_the_search_inside(patchcore_files) -> None:
    _, onnx_file = patchcore_files
    graph = onnx.load(str(onnx_file))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["pixels"]
    assert [o.name for o in graph.graph.output] == ["score", "anomaly_map"]
    ops = {node.op_type for node in graph.graph.node}
    search = ops & {"MatMul", "Gemm"} and "ReduceMin" in ops  # addmm exports as Gemm
    assert search, "nearest-neighbour search must be in the graph"
    assert "Conv" in ops and "Gather" in ops
    # one index per image (its worst patch's neighbour, for the reweighting), not one per patch:
    # ONNX Runtime's ArgMin is ~10x slower than its ReduceMin
    fixed = onnx.ModelProto()
    fixed.CopyFrom(graph)
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, 3, 128, 128), strict=True):
        dim.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True).graph
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.value_info
    }
    argmins = [node.input[0] for node in inferred.node if node.op_type == "ArgMin"]
    assert argmins and all(shapes[name][0] == 1 for name in argmins), [shapes[n] for n in argmins]
    assert not onnx_file.with_suffix(".onnx.data").exists(), "weights must be inside the file"


def test_onnx_runtime_matches_torch_on_synthetic_data(patchcore_files, brick: Path) -> None:
    model_file, onnx_file = patchcore_files
    torch_model = anomalens.load(model_file)
    onnx_model = anomalens.OnnxModel(onnx_file)
    assert isinstance(anomalens.load(onnx_file), anomalens.OnnxModel)
    paths = [s.path for s in test_samples(brick)]
    images = [load_image(p) for p in paths]
    images.append(images[-1][:100, 20:])  # another size: maps follow the input image's size
    expected = torch_model.predict(images)
    got = onnx_model.predict(images)
    for want, have in zip(expected, got, strict=True):
        assert abs(have.score - want.score) <= 1e-4 * abs(want.score)
        assert have.anomaly_map.shape == want.anomaly_map.shape
        assert np.abs(have.anomaly_map - want.anomaly_map).max() <= 1e-3
        assert have.label == want.label
        clear = np.abs(want.anomaly_map - torch_model.pixel_threshold_) > 1e-3
        assert np.array_equal(have.mask[clear], want.mask[clear])
    assert sum(p.label for p in got) >= 6, "the defect images must still be found"
    # the batch dimension is free: batch 1 and an odd batch give the same numbers
    pixels = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    scores, maps = onnx_model.predict_batch(pixels)
    single, _ = onnx_model.predict_batch(pixels[:1])
    torch_scores, torch_maps = torch_model.predict_batch(pixels)
    assert maps.shape == (3, 128, 128)
    np.testing.assert_allclose(single, scores[:1], rtol=1e-5)
    np.testing.assert_allclose(scores, torch_scores, rtol=1e-4)
    np.testing.assert_allclose(maps, torch_maps, atol=1e-3)


def test_onnx_model_leaves_the_cores_to_onnx_runtime(patchcore_files, brick, monkeypatch) -> None:
    """torch resizes on one thread, in the caller's thread and the decoding one (its idle OpenMP
    workers would spin against ONNX Runtime's), and the caller's setting is put back."""
    from anomalens.data import preprocessing

    model = anomalens.load(patchcore_files[1])
    seen: dict[str, list[int]] = {"score": [], "load": []}
    score_batch, load_batch = model._score_batch, preprocessing._load_batch

    def scoring(pixels):
        seen["score"].append(torch.get_num_threads())
        return score_batch(pixels)

    def loading(*args):
        seen["load"].append(torch.get_num_threads())
        return load_batch(*args)

    monkeypatch.setattr(model, "_score_batch", scoring)
    monkeypatch.setattr(preprocessing, "_load_batch", loading)
    paths = [sample.path for sample in test_samples(brick)]
    assert len(paths) > model.batch_size  # more than one batch: the decoding thread runs
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.predict(paths)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(seen["score"]) == len(seen["load"]) == 2
    assert set(seen["score"]) == set(seen["load"]) == {1}


def test_threads_reach_onnx_runtime(patchcore_files, brick, tmp_path, monkeypatch, capsys):
    model = anomalens.load(patchcore_files[1], threads=1)
    assert model.session_.get_session_options().intra_op_num_threads == 1
    made: list[int | None] = []
    onnx_model = anomalens.OnnxModel

    def spy(path, threads=None):
        made.append(threads)
        return onnx_model(path, threads)

    monkeypatch.setattr(anomalens, "OnnxModel", spy)
    code, _, err = run_cli(
        monkeypatch, capsys, "predict", patchcore_files[1], brick / "test" / "good",
        "--out", tmp_path / "out", "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    assert made == [1]


def test_metadata_carries_thresholds_and_preprocessing(patchcore_files, monkeypatch, capsys):
    model_file, onnx_file = patchcore_files
    torch_model = anomalens.load(model_file)
    metadata = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    config = json.loads(metadata["anomalens_config"])
    assert config["model"] == "patchcore" and config["format_version"] == 1
    assert config["fitted"]["image_threshold"] == torch_model.image_threshold_
    assert config["fitted"]["pixel_threshold"] == torch_model.pixel_threshold_
    assert config["params"]["coreset_ratio"] == 0.25
    preprocessing = json.loads(metadata["anomalens_preprocessing"])
    assert preprocessing["size"] == [128, 128] and preprocessing["range"] == [0.0, 1.0]
    onnx_model = anomalens.OnnxModel(onnx_file)
    assert onnx_model.image_threshold_ == torch_model.image_threshold_
    assert onnx_model.image_size == 128 and onnx_model.name == "patchcore"
    code, out, _ = run_cli(monkeypatch, capsys, "info", onnx_file)
    assert code == 0 and json.loads(out)["fitted"] == config["fitted"]


def test_cli_predict_accepts_an_onnx_file(patchcore_files, brick, tmp_path, monkeypatch, capsys):
    model_file, onnx_file = patchcore_files
    images = brick / "test" / "hole"
    rows = {}
    for name, model in (("torch", model_file), ("onnx", onnx_file)):
        out = tmp_path / name
        code, _, err = run_cli(monkeypatch, capsys, "predict", model, images, "--out", out)
        assert code == 0, err
        with open(tmp_path / name / "results.csv", encoding="utf-8") as handle:
            rows[name] = list(csv.DictReader(handle))
        assert len(list((tmp_path / name / "overlays").glob("*.png"))) == len(rows[name])
    assert [r["label"] for r in rows["onnx"]] == [r["label"] for r in rows["torch"]]
    for want, have in zip(rows["torch"], rows["onnx"], strict=True):
        assert abs(float(have["score"]) - float(want["score"])) <= 1e-4 * float(want["score"])


class _ImageLevel(Detector):
    """A detector without an exportable graph (like a method that cannot be exported)."""

    name = "image_level_test"
    produces_maps = False


def test_methods_that_cannot_be_exported_say_so(tmp_path, patchcore_files, monkeypatch, capsys):
    model = _ImageLevel()
    model.image_threshold_ = 1.0
    with pytest.raises(ExportError, match="image_level_test models cannot be exported to ONNX"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(NotFittedError):
        export_onnx(anomalens.create("patchcore"), tmp_path / "y.onnx")
    model_file, onnx_file = patchcore_files
    code, _, err = run_cli(monkeypatch, capsys, "export", model_file, "--format=tflite", "-o=x")
    assert code == 2 and "unknown export format 'tflite'" in err
    code, _, err = run_cli(monkeypatch, capsys, "export", onnx_file, "-o", tmp_path / "z.onnx")
    assert code == 2 and "already an ONNX export" in err


def test_onnx_model_only_scores_and_bad_files_are_clear(patchcore_files, tmp_path) -> None:
    _, onnx_file = patchcore_files
    model = anomalens.OnnxModel(onnx_file)
    assert not any(hasattr(model, name) for name in ("fit", "save", "export_module"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(ModelFileError, match=r"garbage\.onnx"):
        anomalens.OnnxModel(garbage)
    foreign = tmp_path / "foreign.onnx"
    value = onnx.helper.make_tensor_value_info
    identity = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [value("x", onnx.TensorProto.FLOAT, [1])],
        [value("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(identity), str(foreign))
    with pytest.raises(ModelFileError, match="not an anomalens export"):
        anomalens.load(foreign)
    with pytest.raises(ModelFileError, match="not found"):
        anomalens.OnnxModel(tmp_path / "missing.onnx")


def test_handcrafted_features_cannot_be_exported(brick, tmp_path) -> None:
    from anomalens.data.mvtec import training_images

    model = anomalens.create("padim", backbone="handcrafted", image_size=64)
    model.fit(training_images(brick)[:6])
    with pytest.raises(ExportError, match="padim with backbone='handcrafted' cannot be exported"):
        export_onnx(model, tmp_path / "handcrafted.onnx")
    assert not (tmp_path / "handcrafted.onnx").exists()
