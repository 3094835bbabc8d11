"""The detector contract, checked once for every registered model on tiny data.

Constructors store parameters unchanged and `fit` leaves them so (resolved values such as the
layers go to fitted attributes), a clone built from `get_params()` refits to the same scores, the
same seed gives the same model, predict repeats itself, a model file round-trips, and an ONNX
export reproduces the torch model wherever the method supports export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import anomalens
from anomalens.data.mvtec import test_samples, training_images
from anomalens.deploy.export import export_onnx
from anomalens.errors import ExportError, ParameterError

pytestmark = pytest.mark.slow  # started first by `make test` (tests/conftest.py)

# The smallest settings that still exercise each method (input 64 px unless given).
CASES = {
    "patchcore": {"coreset_ratio": 0.1},
    "patchcore-handcrafted": {"backbone": "handcrafted", "coreset_ratio": 0.1},
    "padim": {},
    "padim-handcrafted": {"backbone": "handcrafted"},
    "gaussian": {},
    "knn": {},
    "ocsvm": {},
    "tiled": {
        "detector": "padim",
        "detector_params": {"backbone": "handcrafted"},
        "tile_size": 64,
        "tile_overlap": 16,
    },
    "dfr": {"max_epochs": 2},
    "autoencoder": {"max_epochs": 2},
    "vae": {"max_epochs": 2},
    "fanogan": {"max_epochs": 2},
    "fastflow": {"max_epochs": 2, "flow_steps": 2, "time_budget_s": None},
    "cflow": {"max_epochs": 2, "flow_steps": 2, "time_budget_s": None},
    "deepsvdd": {"image_size": 32, "max_epochs": 2},
    "deepsvdd-pretrained": {"max_epochs": 2, "pretrained": True},
    "rotnet": {"image_size": 32, "max_epochs": 2, "translation": 0.25},
    "cutpaste": {"max_epochs": 1, "batch_size": 4},
}
INCREMENTAL = {"patchcore", "padim", "gaussian", "knn"}
NOT_EXPORTABLE = {"fastflow", "cflow", "tiled", "patchcore-handcrafted", "padim-handcrafted"}


def model_name(case: str) -> str:
    return case.split("-")[0]


def test_every_registered_model_is_covered() -> None:
    assert {model_name(case) for case in CASES} == set(anomalens.list_models())


@pytest.mark.parametrize("name", anomalens.list_models())
def test_every_model_round_trips_its_parameters(name: str) -> None:
    model = anomalens.create(name)
    params = model.get_params()
    assert params, f"{name} exposes no parameters"
    assert anomalens.create(name, **params).get_params() == params
    assert not [key for key in vars(model) if key.endswith("_")], "constructor must not fit"
    assert repr(model).startswith(type(model).__name__ + "(")
    assert model.set_params(seed=7) is model and model.get_params()["seed"] == 7
    with pytest.raises(anomalens.AnomalensError, match="no parameter 'sede'"):
        model.set_params(sede=7)


@pytest.fixture(scope="module")
def data(brick: Path) -> tuple[list[Path], list[Path]]:
    return training_images(brick)[:8], [s.path for s in test_samples(brick)[-3:]]


@pytest.fixture(scope="module", params=sorted(CASES))
def fitted(request, data) -> tuple[str, dict, anomalens.Detector]:
    """(case, parameters before fit, the fitted model)."""
    case = request.param
    model = anomalens.create(model_name(case), **{"image_size": 64, "seed": 7, **CASES[case]})
    before = model.get_params()
    return case, before, model.fit(data[0])


def assert_same(a: list[anomalens.Prediction], b: list[anomalens.Prediction]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.score == y.score and x.label == y.label
        if x.anomaly_map is None:
            assert y.anomaly_map is None
        else:
            np.testing.assert_array_equal(x.anomaly_map, y.anomaly_map)


def test_fit_leaves_the_parameters_unchanged(fitted) -> None:
    _, before, model = fitted
    assert model.get_params() == before


def test_a_clone_from_get_params_refits_to_the_same_model(fitted, data) -> None:
    _, _, model = fitted
    clone = anomalens.create(model.name, **model.get_params()).fit(data[0])
    assert clone.image_threshold_ == model.image_threshold_
    first = model.predict(data[1])
    assert_same(first, clone.predict(data[1]))
    assert_same(first, model.predict(data[1]))


def test_the_model_file_round_trips(fitted, data, tmp_path: Path) -> None:
    _, before, model = fitted
    loaded = anomalens.load(model.save(tmp_path / "model.safetensors"))
    assert type(loaded) is type(model) and loaded.get_params() == before
    assert loaded.fitted_config() == model.fitted_config()
    assert_same(model.predict(data[1]), loaded.predict(data[1]))


def test_partial_fit_leaves_the_parameters_unchanged(fitted, data, tmp_path: Path) -> None:
    """Updated after a save and load (the fixture stays as fitted); the others refuse it."""
    case, before, model = fitted
    loaded = anomalens.load(model.save(tmp_path / "model.safetensors"))
    if model_name(case) not in INCREMENTAL:
        with pytest.raises(ParameterError, match="does not support partial_fit"):
            loaded.partial_fit(data[0][:4])
        return
    loaded.partial_fit(data[0][:4])
    assert loaded.get_params() == before
    assert [u["images"] for u in loaded.updates_] == [4]


def test_onnx_export_reproduces_the_model_where_supported(fitted, data, tmp_path: Path) -> None:
    case, _, model = fitted
    if case in NOT_EXPORTABLE:
        with pytest.raises(ExportError):
            export_onnx(model, tmp_path / "model.onnx")
        return
    onnx_model = anomalens.OnnxModel(export_onnx(model, tmp_path / "model.onnx"))
    for want, have in zip(model.predict(data[1]), onnx_model.predict(data[1]), strict=True):
        assert abs(have.score - want.score) <= 1e-4 * abs(want.score)
        assert have.label == want.label
        if want.anomaly_map is None:
            assert have.anomaly_map is None
        else:
            assert np.abs(have.anomaly_map - want.anomaly_map).max() <= 1e-3
