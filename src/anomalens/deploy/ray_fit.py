"""`anomalens fit --engine ray`: PatchCore's feature extraction and shard coresets on Ray actors.

The fit is the local one (`Detector.fit`: the held-out split, the leave-out scoring, the
thresholds, the final greedy pass over the union of the shard coresets); only the shards' work
moves. `RayShards` is PatchCore's `shard_map`: each shard of `shard_images` images goes to one of
a pool of `ShardWorker` actors, each of which fetches the model (its backbone) once, sets torch's
threads to its CPUs, reads its shard's images, extracts their patch features and returns only the
shard's greedy coreset and each kept patch's image index. The driver never holds more than the
shard coresets, so its peak memory depends on the shard size, not on the number of images, and,
with the same `shard_images` and seed, the bank is the local sharded fit's.

An actor that dies is restarted and its shard runs again (`max_restarts=-1`,
`max_task_retries=-1`). The images must be readable at the same paths on every node.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import torch

from anomalens.core.detector import Detector
from anomalens.data.preprocessing import ImageLike
from anomalens.deploy.ray_engine import actor_shape, connected, import_ray
from anomalens.errors import ParameterError
from anomalens.models.patchcore import PatchCore, ShardCoreset, Shards


def fit_ray(
    detector: Detector,
    images: Sequence[ImageLike],
    *,
    roi: ImageLike | None = None,
    strict: bool = False,
    address: str | None = None,
    actors: int | None = None,
) -> Detector:
    """`detector.fit(images, roi=roi, strict=strict)` with the shards' feature extraction and
    coresets on Ray, on `actors` actors (default: one per node with CPUs), each reserving an
    equal share of the cluster's CPUs. PatchCore only.

    Uses the Ray connection this process already has; otherwise connects to `address` (`auto`,
    `HOST:PORT`), or starts a local Ray instance sized to the machine, and disconnects at the
    end."""
    if not isinstance(detector, PatchCore):
        raise ParameterError(
            f"--engine ray fits patchcore only, not {getattr(detector, 'name', detector)}; "
            "fit it with --engine local"
        )
    if actors is not None and actors < 1:
        raise ParameterError(f"--actors must be at least 1, got {actors}")
    ray = import_ray()
    # actors have their own working folder: image files by absolute path
    images = [os.path.abspath(i) if isinstance(i, str | os.PathLike) else i for i in images]
    with connected(ray, address):
        count, cpus = actor_shape(ray, actors)
        detector.shard_map = RayShards(ray, count, cpus)
        try:
            detector.fit(images, roi=roi, strict=strict)
        finally:
            detector.shard_map = None
    return detector


class RayShards:
    """PatchCore's `shard_map` on Ray: a pool of `count` `ShardWorker` actors of `cpus` CPUs
    each, started for one coreset and stopped after it; results in shard order."""

    def __init__(self, ray: ModuleType, count: int, cpus: int) -> None:
        self.ray, self.count, self.cpus = ray, count, cpus

    def __call__(self, model: PatchCore, shards: Shards, reduce: bool) -> Iterator[ShardCoreset]:
        ray = self.ray
        shipped = copy.copy(model)  # the fitted state so far (the backbone), not this map
        shipped.shard_map = None
        shipped.memory_bank_ = None  # an update's bank stays with the driver
        # in a list, so that Ray hands tasks the reference, not the model: each actor gets it
        # once, and a restarted actor (no constructor arguments) gets it again
        model_ref = [ray.put(shipped)]
        worker = ray.remote(ShardWorker).options(
            num_cpus=self.cpus, max_restarts=-1, max_task_retries=-1
        )
        pool = [worker.remote() for _ in range(min(self.count, len(shards)))]
        try:
            yield from ray.util.ActorPool(pool).map(
                lambda actor, shard: actor.coreset.remote(model_ref, *shard, reduce), shards
            )
        finally:
            for actor in pool:
                ray.kill(actor)


class ShardWorker:
    """A Ray actor's work: the model fetched once (its first shard), then shard after shard
    turned into its `ShardCoreset` (`PatchCore.shard_coreset`)."""

    def __init__(self) -> None:
        self.ray = import_ray()
        cpus = self.ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.model: PatchCore | None = None

    def coreset(
        self, model_ref: list[Any], offset: int, images: list[ImageLike], reduce: bool
    ) -> ShardCoreset:
        if self.model is None:
            self.model = self.ray.get(model_ref[0])
        return self.model.shard_coreset(images, offset, reduce)
