"""`fit --engine ray`: PatchCore's shards (features, shard coresets) on Ray actors give the local
sharded fit's bank and thresholds; other methods are a one-line error."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import ray
import torch

import anomalens
from tests.deploy.test_ray_engine import RAY_OPTIONS
from tests.test_cli import run

SMALL = ("--image-size", "64", "--param", "coreset_ratio=0.1", "--param", "batch_size=4")


def test_bad_options_are_one_line_errors(brick, tmp_path, monkeypatch, capsys) -> None:
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


@pytest.fixture
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, **RAY_OPTIONS)
    yield
    ray.shutdown()


@pytest.mark.usefixtures("local_ray")
def test_two_actors_give_the_local_sharded_bank(brick, tmp_path, monkeypatch, capsys) -> None:
    """16 images in shards of 6 (3 shards) on two one-CPU actors, against the local fit with
    one thread: the same bank, thresholds and scores."""
    shards = ("--param", "shard_images=6")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run(
            monkeypatch, capsys, "fit", brick, "-o", tmp_path / "local.safetensors", *SMALL, *shards
        )
    finally:
        torch.set_num_threads(threads)
    options = ("--engine", "ray", "--actors", "2")
    remote = run(
        monkeypatch,
        capsys,
        "fit",
        brick,
        "-o",
        tmp_path / "ray.safetensors",
        *SMALL,
        *shards,
        *options,
    )
    assert local[0] == remote[0] == 0, remote
    assert ray.is_initialized(), "a connection it did not make is left open"
    expected, got = (
        anomalens.load(tmp_path / "local.safetensors"),
        anomalens.load(tmp_path / "ray.safetensors"),
    )
    assert got.n_patches_ == expected.n_patches_
    assert len(got.memory_bank_) == len(expected.memory_bank_) == round(got.n_patches_ * 0.1)
    np.testing.assert_allclose(got.memory_bank_, expected.memory_bank_, rtol=1e-5, atol=1e-6)
    assert got.image_threshold_ == pytest.approx(expected.image_threshold_, rel=1e-5)
    test_images = sorted((brick / "test").rglob("*.png"))[:4]
    for want, prediction in zip(
        expected.predict(test_images), got.predict(test_images), strict=True
    ):
        assert prediction.score == pytest.approx(want.score, rel=1e-5)
