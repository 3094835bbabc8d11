"""Incremental updates (`partial_fit`, `anomalens update`) and PatchCore's bounded coreset, on
the small synthetic brick category at 64 px."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

import anomalens
from anomalens.components.density import Moments, fit_gaussian, ledoit_wolf_precision
from anomalens.components.neighbors import greedy_coreset
from anomalens.core.model_file import CONFIG_KEY
from anomalens.data.mvtec import test_samples, training_images
from anomalens.errors import ParameterError
from anomalens.models import patchcore
from anomalens.models.patchcore import final_groups
from tests.test_cli import run


@pytest.fixture(scope="module")
def split(brick: Path) -> tuple[list[Path], list[Path], np.ndarray]:
    """(the 16 normal training images, the test images, their labels)."""
    samples = test_samples(brick)
    return training_images(brick), [s.path for s in samples], np.array([s.label for s in samples])


def auroc(model: anomalens.Detector, split) -> float:
    return roc_auc_score(split[2], model.decision_function(split[1]))


def test_moments_in_parts_give_the_mean_covariance_and_ledoit_wolf_of_the_whole() -> None:
    vectors = torch.randn(50, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vectors = vectors * 3 + 5
    moments = Moments.start(vectors[:10], fourth=True)
    moments.add(vectors[:20])
    moments.add(vectors[20:])
    mean, precision = fit_gaussian(vectors)  # sklearn's Ledoit-Wolf on the vectors themselves
    torch.testing.assert_close(moments.mean(), mean)
    torch.testing.assert_close(moments.covariance(), torch.cov(vectors.T))
    torch.testing.assert_close(ledoit_wolf_precision(moments), precision)


def test_padim_updated_with_the_second_half_equals_one_fit(split) -> None:
    images = split[0][:8]
    once = anomalens.create("padim", image_size=64).fit(images)
    updated = anomalens.create("padim", image_size=64).fit(images[:4]).partial_fit(images[4:])
    assert float(updated.count_) == float(once.count_) == len(images)
    torch.testing.assert_close(updated.mean_, once.mean_, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        updated._moments().covariance(), once._moments().covariance(), atol=1e-3, rtol=1e-3
    )
    assert updated.n_train_images_ == len(images)


def test_gaussian_update_gives_the_gaussian_of_all_the_images(split) -> None:
    """Through the `_update` hook: fit holds out images, so its public fit learns another set."""
    images = split[0][:8]
    once = anomalens.create("gaussian", image_size=64)
    updated = anomalens.create("gaussian", image_size=64)
    once._fit(images)
    updated._fit(images[:4])
    updated._update(images[4:])
    for want, have in zip(
        once.mean_ + once.precision_, updated.mean_ + updated.precision_, strict=True
    ):
        torch.testing.assert_close(have, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["patchcore", "knn"])
def test_two_halves_detect_as_well_as_one_fit(name: str, split) -> None:
    params = {"image_size": 64, **({"coreset_ratio": 0.1} if name == "patchcore" else {})}
    images = split[0]
    once = anomalens.create(name, **params).fit(images)
    updated = anomalens.create(name, **params).fit(images[:8]).partial_fit(images[8:])
    assert auroc(updated, split) >= auroc(once, split) - 0.05
    if name == "patchcore":
        assert updated.n_patches_ == once.n_patches_
        assert len(updated.memory_bank_) == len(once.memory_bank_)
    else:  # every image learned but the held-out ones
        assert len(updated.features_) == updated.n_train_images_ == len(images) - 2


def test_updates_are_recorded_saved_and_continue_after_load(split, tmp_path: Path) -> None:
    images = split[0]
    model = anomalens.create("padim", image_size=64).fit(images[:4])
    assert model.updates_ == []
    model.partial_fit(images[4:8], old_images=images[:4])
    (update,) = model.updates_
    assert datetime.fromisoformat(update["time"]).utcoffset().total_seconds() == 0
    assert update == update | {"images": 4, "learned": 4, "held_out_new": 1, "held_out_old": 1}
    assert model.n_validation_images_ == 2
    loaded = anomalens.load(model.save(tmp_path / "model.safetensors"))
    assert loaded.updates_ == model.updates_
    np.testing.assert_allclose(
        loaded.decision_function(split[1][:3]), model.decision_function(split[1][:3])
    )
    loaded.partial_fit(images[8:10])
    assert [u["images"] for u in loaded.updates_] == [4, 2]
    assert float(loaded.count_) == 10


def test_a_model_file_from_before_partial_fit_loads_but_cannot_update(split, tmp_path) -> None:
    images = split[0]
    path = anomalens.create("padim", image_size=64).fit(images[:4]).save(tmp_path / "new.st")
    with safe_open(str(path), framework="pt") as handle:
        config = json.loads(handle.metadata()[CONFIG_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    del config["fitted"]["updates"]
    old = {k: v for k, v in tensors.items() if k not in {"count", "shift", "total", "scatter"}}
    save_file(old, str(tmp_path / "old.st"), metadata={CONFIG_KEY: json.dumps(config)})
    model = anomalens.load(tmp_path / "old.st")
    assert model.updates_ == [] and len(model.decision_function(images[:2])) == 2
    with pytest.raises(ParameterError, match="predates partial_fit"):
        model.partial_fit(images[4:8])


def test_partial_fit_on_an_unfitted_model_is_fit(split) -> None:
    images = split[0][:6]
    fitted = anomalens.create("knn", image_size=64).fit(images)
    partial = anomalens.create("knn", image_size=64).partial_fit(images)
    assert partial.updates_ == [] and partial.image_threshold_ == fitted.image_threshold_


def test_a_detector_without_updates_says_so(split) -> None:
    model = anomalens.create("ocsvm", image_size=64).fit(split[0][:4])
    with pytest.raises(ParameterError, match="ocsvm does not support partial_fit"):
        model.partial_fit(split[0][4:8])


def test_bounded_coreset_scores_close_to_the_exact_one(split) -> None:
    params = {"image_size": 64, "coreset_ratio": 0.1}
    exact = anomalens.create("patchcore", **params).fit(split[0])
    bounded = anomalens.create("patchcore", shard_images=4, **params).fit(split[0])
    assert len(bounded.memory_bank_) == len(exact.memory_bank_)
    want, have = exact.decision_function(split[1]), bounded.decision_function(split[1])
    np.testing.assert_allclose(have, want, rtol=0.1)
    assert auroc(bounded, split) >= auroc(exact, split) - 0.05


def test_final_groups_are_consecutive_and_bounded() -> None:
    assert final_groups([10, 10, 10], 25) == [slice(0, 2), slice(2, 3)]
    assert final_groups([30, 5, 5], 25) == [slice(0, 1), slice(1, 3)]
    assert final_groups([5, 5], 25) == [slice(0, 2)]


def test_grouped_final_pass_keeps_the_ratio_and_the_scores(split, monkeypatch) -> None:
    params = {"image_size": 64, "coreset_ratio": 0.1}
    exact = anomalens.create("patchcore", **params).fit(split[0])
    calls = []

    def counted(features, *args, **kwargs):
        calls.append(len(features))
        return greedy_coreset(features, *args, **kwargs)

    monkeypatch.setattr(patchcore, "FINAL_PASS_PATCHES", 120)
    monkeypatch.setattr(patchcore, "greedy_coreset", counted)
    grouped = anomalens.create("patchcore", shard_images=4, **params).fit(split[0])
    shards = -(-len(split[0]) // 4)
    assert len(calls) > shards + 1 and max(calls[shards:]) <= 120  # groups, each bounded
    assert abs(len(grouped.memory_bank_) - len(exact.memory_bank_)) <= len(calls) - shards
    want, have = exact.decision_function(split[1]), grouped.decision_function(split[1])
    relative = np.abs(have - want) / want  # groups see fewer patches at once than one pass
    assert relative.max() < 0.15 and np.median(relative) < 0.05
    assert auroc(grouped, split) >= auroc(exact, split) - 0.05


def test_cli_update_round_trip_and_error(
    split, brick: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    model = anomalens.create("patchcore", image_size=64, coreset_ratio=0.1).fit(split[0])
    path, out = model.save(tmp_path / "model.safetensors"), tmp_path / "updated.safetensors"
    new = brick / "test" / "good"
    code, stdout, _ = run(monkeypatch, capsys, "update", path, new, "-o", out, "--old", brick)
    assert code == 0 and "update 1: image threshold" in stdout
    model = anomalens.load(out)
    assert model.updates_[0]["images"] == len(training_images(new))
    assert model.updates_[0]["held_out_old"] == 2  # 10% of the 16 training images
    missing = tmp_path / "missing"
    code, _, stderr = run(monkeypatch, capsys, "update", out, missing, "-o", out)
    assert code == 2 and stderr.strip() == f"error: not found: {missing}"
