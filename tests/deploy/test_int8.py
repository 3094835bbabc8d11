"""int8 export: a QDQ graph with the search left float, scores that agree with the float model,
thresholds re-estimated and recorded, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from scipy.stats import spearmanr

import anomalens
from anomalens.data.mvtec import test_samples, training_images
from anomalens.deploy import int8
from anomalens.errors import ExportError
from tests.deploy.test_export import run_cli


@pytest.fixture(scope="session")
def int8_file(patchcore_files, brick: Path) -> Path:
    """The fixture PatchCore exported by the CLI as an int8 graph, calibrated on its own
    training folder."""
    from typer.testing import CliRunner

    from anomalens.cli import app

    model_file, _ = patchcore_files
    path = model_file.with_name("int8.onnx")
    arguments = ["export", str(model_file), "-o", str(path), "--int8", "--calibration", str(brick)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # however the console wrapped it
    assert "memory-bank search int8" in printed and "identical verdicts" in printed
    return path


def test_int8_graph_quantises_the_features_and_the_bank_search(int8_file: Path) -> None:
    graph = onnx.load(str(int8_file))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMulIntegerToFloat", "ReduceMin"} <= ops
    made_by = {output: node for node in graph.graph.node for output in node.output}
    # the search over every patch is int8; the float product left is the worst patch's (ArgMin)
    for node in graph.graph.node:
        if node.op_type == "ReduceMin" and node.input[0].startswith("int8_search"):
            assert made_by[node.input[0]].op_type == "Add"
        if node.op_type in ("MatMul", "Gemm", "ArgMin", "ReduceL2"):
            assert all(
                made_by[name].op_type != "DequantizeLinear"
                for name in node.input
                if name in made_by
            ), node.name
    searched = [node for node in graph.graph.node if node.op_type == "MatMulIntegerToFloat"]
    assert len(searched) == 1 and searched[0].name.startswith("int8_search_0")
    stem = next(node for node in graph.graph.node if node.op_type == "Conv")
    assert made_by.get(stem.input[0]) is None or made_by[stem.input[0]].op_type != (
        "DequantizeLinear"
    ), "the stem reads stride 1: float"
    assert anomalens.load(int8_file).config["int8"]["search"] == "int8, a scale per patch"


def search_graph(bank: np.ndarray, alpha: float = -2.0) -> onnx.ModelProto:
    """A float graph as PatchCore exports its search: min over the bank of |v|^2 - 2 q.v."""
    make = onnx.helper.make_node
    nodes = [
        make("Transpose", ["bank"], ["bank_t"], perm=[1, 0]),
        make("Gemm", ["queries", "bank_t", "norms"], ["product"], alpha=alpha),
        make("ReduceMin", ["product", "axis"], ["closest"], keepdims=0),
    ]
    constants = {
        "bank": bank,
        "norms": (bank * bank).sum(axis=1),
        "axis": np.array([1], dtype=np.int64),
    }
    floats = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        nodes,
        "search",
        [onnx.helper.make_tensor_value_info("queries", floats, ["n", bank.shape[1]])],
        [onnx.helper.make_tensor_value_info("closest", floats, ["n"])],
        [onnx.numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def test_int8_search_is_close_to_the_exact_one_and_each_patch_its_own() -> None:
    import onnxruntime

    generator = np.random.default_rng(0)
    bank = generator.normal(2.0, 3.0, (300, 48)).astype(np.float32)
    queries = np.concatenate(
        [
            bank[:40] + generator.normal(0, 0.5, (40, 48)),  # near a bank patch
            generator.normal(2.0, 3.0, (40, 48)),  # typical
            generator.normal(2.0, 30.0, (8, 48)),  # far out, beyond any calibration range
        ]
    ).astype(np.float32)
    exact = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1).min(axis=1))

    graph = search_graph(bank)
    assert int8.quantise_search(graph) == 1
    assert {node.op_type for node in graph.graph.node} >= {"MatMulIntegerToFloat", "QuantizeLinear"}
    assert "Gemm" not in {node.op_type for node in graph.graph.node}
    onnx.checker.check_model(graph)
    session = onnxruntime.InferenceSession(graph.SerializeToString())

    def distances(rows: np.ndarray) -> np.ndarray:
        closest = session.run(None, {"queries": rows})[0]
        return np.sqrt(np.maximum(closest + (rows * rows).sum(axis=1), 0.0))

    approximate = distances(queries)
    # rounding costs a near patch ~0.5 of its 3.5 at most (a typical distance is 20), others <1%
    assert np.abs(approximate - exact).max() < 0.05 * np.median(exact[40:80])
    assert np.abs(approximate / exact - 1.0)[40:].max() < 0.01
    # a patch's rounding is its own: the same distance alone as in any batch
    alone = np.concatenate([distances(queries[i : i + 1]) for i in range(len(queries))])
    assert np.array_equal(alone, approximate)

    other = search_graph(bank, alpha=1.0)  # not a search: left as it is
    assert int8.quantise_search(other) == 0
    assert [node.op_type for node in other.graph.node] == ["Transpose", "Gemm", "ReduceMin"]


def test_int8_scores_agree_and_thresholds_are_its_own(
    int8_file: Path, patchcore_files, brick: Path
) -> None:
    model_file, _ = patchcore_files
    torch_model = anomalens.load(model_file)
    model = anomalens.load(int8_file)
    assert isinstance(model, anomalens.OnnxModel)
    paths = [sample.path for sample in test_samples(brick)]
    float_scores = torch_model.decision_function(paths)
    int8_scores = model.decision_function(paths)
    assert spearmanr(float_scores, int8_scores).statistic >= int8.MIN_SPEARMAN
    # every defect is still found; at most one normal image near the threshold changes verdict
    float_labels = [p.label for p in torch_model.predict(paths)]
    int8_labels = [p.label for p in model.predict(paths)]
    defects = [s.label == 1 for s in test_samples(brick)]
    assert all(label for label, defect in zip(int8_labels, defects, strict=True) if defect)
    assert sum(a != b for a, b in zip(float_labels, int8_labels, strict=True)) <= 1

    config = model.config
    record = config["int8"]
    assert config["fitted"]["threshold_source"] == "int8_calibration"
    assert model.threshold_source_ == "int8_calibration"
    assert model.image_threshold_ == config["fitted"]["image_threshold"]
    assert model.image_threshold_ != torch_model.image_threshold_
    assert model.pixel_threshold_ != torch_model.pixel_threshold_
    assert record["float_thresholds"] == {
        "image_threshold": torch_model.image_threshold_,
        "pixel_threshold": torch_model.pixel_threshold_,
    }
    count = len(training_images(brick))
    assert record["calibration_images"] + record["check_images"] == count
    assert record["agreement"]["spearman"] >= int8.MIN_SPEARMAN
    assert record["agreement"]["verdicts"] >= int8.MIN_VERDICT_AGREEMENT
    metadata = {p.key: p.value for p in onnx.load(str(int8_file)).metadata_props}
    assert json.loads(metadata["anomalens_preprocessing"])["size"] == [128, 128]


def test_int8_export_refuses_a_graph_that_disagrees(
    patchcore_files, brick: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    model_file, _ = patchcore_files
    monkeypatch.setattr(int8, "MIN_SPEARMAN", 1.01)
    monkeypatch.setattr(int8, "CALIBRATION_IMAGES", 2)
    monkeypatch.setattr(int8, "CHECK_IMAGES", 2)
    out = tmp_path / "refused.onnx"
    code, _, err = run_cli(
        monkeypatch, capsys, "export", model_file, "-o", out, "--int8", "--calibration", brick
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "does not agree with the float model" in err and "needs >= 1.01" in err
    assert not out.exists()


def test_int8_export_keeps_the_search_float_when_asked(
    patchcore_files, brick: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    model_file, _ = patchcore_files
    out = tmp_path / "float-search.onnx"
    code, printed, err = run_cli(
        monkeypatch, capsys, "export", model_file, "-o", out, "--int8", "--calibration", brick,
        "--float-search",
    )  # fmt: skip
    assert code == 0, err
    assert "features int8" in " ".join(printed.split())
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    assert "MatMulIntegerToFloat" not in ops and "ReduceMin" in ops
    assert anomalens.load(out).config["int8"]["search"] == "float"


def test_int8_needs_calibration_images(patchcore_files, tmp_path: Path, monkeypatch, capsys):
    model_file, _ = patchcore_files
    out = tmp_path / "x.onnx"
    code, _, err = run_cli(monkeypatch, capsys, "export", model_file, "-o", out, "--int8")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--int8 needs --calibration FOLDER" in err
    code, _, err = run_cli(
        monkeypatch, capsys, "export", model_file, "-o", out, "--calibration", tmp_path
    )
    assert code == 2 and "--calibration is only used with --int8" in err
    code, _, err = run_cli(monkeypatch, capsys, "export", model_file, "-o", out, "--float-search")
    assert code == 2 and "--float-search is only used with --int8" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(
        monkeypatch, capsys, "export", model_file, "-o", out, "--int8", "--calibration", empty
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no images in" in err
    assert not out.exists()
    few = [np.zeros((32, 32, 3), np.uint8)] * 3
    with pytest.raises(ExportError, match="at least 4 readable normal images"):
        int8.calibration_images(few)


def test_padim_int8_graph_absorbs_its_rounding(
    brick: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """PaDiM's int8 graph has its Gaussians widened by the rounding error measured on the normal
    images, so its normal maps keep the float model's level; without it they rise."""
    from anomalens.deploy.export import export_onnx

    images = training_images(brick)
    padim = anomalens.create("padim", image_size=128).fit(images)
    model_file = padim.save(tmp_path / "padim.safetensors")
    code, out, err = run_cli(
        monkeypatch, capsys, "export", model_file, "-o", tmp_path / "absorbed.onnx",
        "--int8", "--calibration", brick,
    )  # fmt: skip
    assert code == 0, err
    printed = " ".join(out.split())  # however the console wrapped it
    assert "the features' rounding (" in printed and "absorbed into its statistics" in printed
    record = anomalens.load(tmp_path / "absorbed.onnx").config["int8"]
    assert record["search"] == "float"  # PaDiM has no bank search to quantise
    error = record["absorbed_feature_error"]
    assert error["images"] == len(images) and 0.0 < error["relative_error"] < 0.3
    graph = onnx.load(str(tmp_path / "absorbed.onnx"))
    constants = [onnx.numpy_helper.to_array(tensor) for tensor in graph.graph.initializer]
    assert not any(np.array_equal(value, padim.mean_.numpy()) for value in constants)

    monkeypatch.setattr(type(padim), "feature_mean", None)
    float_path = export_onnx(padim, tmp_path / "padim.onnx")
    plain = int8.export_int8(padim, float_path, tmp_path / "plain.onnx", images)
    assert plain["absorbed_feature_error"] is None

    def normal_level(model) -> float:
        return float(np.mean([p.anomaly_map.mean() for p in model.predict(images)]))

    level = normal_level(padim)
    absorbed = abs(normal_level(anomalens.load(tmp_path / "absorbed.onnx")) - level)
    unabsorbed = abs(normal_level(anomalens.load(tmp_path / "plain.onnx")) - level)
    assert absorbed < unabsorbed
    sample = next(s for s in test_samples(brick) if s.label)
    float_map = padim.predict([sample.path])[0].anomaly_map
    int8_map = anomalens.load(tmp_path / "absorbed.onnx").predict([sample.path])[0].anomaly_map
    assert spearmanr(float_map.ravel(), int8_map.ravel()).statistic > 0.9
