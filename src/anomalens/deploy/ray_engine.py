"""`anomalens predict --engine ray`: batch inspection scored by a pool of Ray actors.

The run is the local engine's (`anomalens.deploy.batch.run_inspection`): the same chunks, rows,
overlays, results file and `--resume`; only the scoring moves. A Ray Data pipeline maps the chunks
(the paths of one local batch each, so every score is the same), a few per call, through
`ChunkScorer` actors. Each actor loads the model once, sets its threads (torch's, ONNX Runtime's)
to its CPUs, and runs the local engine's pipeline over its chunks: it decodes the images itself (an
unreadable one becomes an error row) while scoring the chunk before, and returns the rows and
overlay PNGs. The driver streams them, in input order, into the results store as they arrive.

An actor that dies (its process killed, its node lost) is restarted and its unfinished chunks run
again (Ray Data gives its actor pools `max_restarts=-1`, `max_task_retries=-1`); a chunk's rows
reach the driver once, when its task completes, so every image still has exactly one row. The
model file and the images must be readable at the same paths on every node (shared storage).

Ray is an optional dependency (`anomalens[ray]`), imported only when this engine runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

import anomalens
from anomalens.data.inputs import InputImage, Inputs
from anomalens.deploy.batch import (
    BatchSummary,
    Plan,
    ResultsStore,
    ScoredChunk,
    finish_chunk,
    run_inspection,
    score_pipelined,
    store_rows,
)
from anomalens.deploy.onnx_model import OnnxModel
from anomalens.errors import AnomalensError, ParameterError

NEEDS_RAY = "--engine ray needs Ray: pip install 'anomalens[ray]'"
CALL_CHUNKS = 8
"""The most chunks in one actor call."""
CALLS_PER_ACTOR = 4
"""The fewest calls each actor gets, where there are enough chunks."""


def import_ray() -> ModuleType:
    """The `ray` module, with Ray Data, or an `AnomalensError` saying how to install it."""
    try:
        # Ray is optional and heavy: imported only when the Ray engine runs
        import ray
        import ray.data
    except ImportError as error:
        raise AnomalensError(NEEDS_RAY) from error
    return ray


def inspect_images_ray(
    model_file: str | os.PathLike[str],
    inputs: Inputs,
    out: str | os.PathLike[str],
    *,
    fmt: str = "csv",
    resume: bool = False,
    overlays: bool = True,
    min_region_area: int = 0,
    address: str | None = None,
    actors: int | None = None,
) -> BatchSummary:
    """`anomalens.deploy.batch.inspect_images`, scored on Ray by `actors` actors (default: one
    per node with CPUs), each reserving an equal share of the cluster's CPUs.

    Uses the Ray connection this process already has; otherwise connects to `address` (`auto`,
    `HOST:PORT`), or starts a local Ray instance sized to the machine, and disconnects (shuts it
    down) at the end."""
    if actors is not None and actors < 1:
        raise ParameterError(f"--actors must be at least 1, got {actors}")
    ray = import_ray()
    # loaded here too: a bad file fails before any actor starts, and the batches are its own
    batch_size = anomalens.load(model_file).batch_size
    model = os.path.abspath(model_file)

    with connected(ray, address):
        count, cpus = actor_shape(ray, actors)

        def engine(plan: Plan, store: ResultsStore, out: Path) -> Iterator[list[dict[str, Any]]]:
            if not plan:  # a resumed run with every row written already
                return iter(())
            items = [
                {"index": index, "images": _describe(chunk, todo)}
                for index, (chunk, todo) in enumerate(plan)
            ]
            scored = ray.data.from_items(items).map_batches(
                ChunkScorer,
                fn_constructor_kwargs={
                    "model_file": model,
                    "overlays": overlays,
                    "min_region_area": min_region_area,
                },
                batch_size=chunks_per_call(len(plan), count),
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=count),
                num_cpus=cpus,
            )
            return _store_streamed(scored.iter_rows(), plan, store, out)

        return run_inspection(engine, batch_size, inputs, out, fmt=fmt, resume=resume)


@contextmanager
def connected(ray: ModuleType, address: str | None) -> Iterator[None]:
    """Ray connected, quietly: the current connection, or one made (and closed) here."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in input order, as the local engine
    context.enable_progress_bars = False  # anomalens draws its own
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if ray.is_initialized():
        yield
        return
    ray.init(
        address=address or "local",  # never a cluster that happens to run here, unless asked
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    try:
        yield
    finally:
        ray.shutdown()


def actor_shape(ray: ModuleType, actors: int | None) -> tuple[int, int]:
    """How many actors, and the CPUs each reserves: an equal share of the cluster's, no more
    than the smallest node has (so each node can hold one); more actors than CPUs is an error
    (they would wait for CPUs forever)."""
    nodes = [
        int(node["Resources"]["CPU"])
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("CPU", 0) >= 1
    ]
    if not nodes:
        raise AnomalensError("the Ray cluster has no node with a CPU to run actors on")
    count = actors or len(nodes)
    cpus = max(1, min(min(nodes), sum(nodes) // count))
    if sum(node // cpus for node in nodes) < count:
        raise AnomalensError(
            f"--actors {count} needs a CPU per actor; the Ray cluster has {sum(nodes)}"
        )
    return count, cpus


def chunks_per_call(chunks: int, actors: int) -> int:
    """How many chunks an actor scores per call: enough that its pipeline (decoding the next
    chunk, drawing the last one's overlays) is full most of the time, at most `CALL_CHUNKS`, and
    few enough that every actor gets `CALLS_PER_ACTOR` calls (so work spreads evenly, and a lost
    actor costs little to re-run)."""
    return max(1, min(CALL_CHUNKS, chunks // (actors * CALLS_PER_ACTOR)))


def _describe(chunk: list[InputImage], todo: set[Path]) -> str:
    """A chunk as an actor reads it: each image's absolute path (actors have their own working
    folder), relative path and whether it needs a row."""
    return json.dumps([[os.path.abspath(i.path), i.relative, i.path in todo] for i in chunk])


def _store_streamed(
    scored: Iterator[dict[str, Any]], plan: Plan, store: ResultsStore, out: Path
) -> Iterator[list[dict[str, Any]]]:
    """Store each chunk's rows and overlays once all of them have arrived; yield them."""
    gathered: dict[int, list[tuple[dict[str, Any], bytes]]] = {}
    for item in scored:
        index = int(item["index"])
        chunk, todo = plan[index]
        row = json.loads(item["row"])
        given = str(chunk[int(item["position"])].path)
        # the image named as given (as the local engine names it), not by the actor's absolute path
        row["error"] = row["error"].replace(row["path"], given)
        row["path"] = given
        gathered.setdefault(index, []).append((row, bytes(item["overlay"])))
        if len(gathered[index]) == len(todo):
            yield store_rows(out, store, gathered.pop(index))


class ChunkScorer:
    """A Ray actor's work: the model loaded once, then chunk after chunk scored into rows (JSON)
    and overlay PNGs, one output row per image that needs one."""

    def __init__(self, model_file: str, overlays: bool, min_region_area: int) -> None:
        ray = import_ray()
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        threads = max(1, int(cpus))
        torch.set_num_threads(threads)
        onnx = Path(model_file).suffix.lower() == ".onnx"
        self.scorer = OnnxModel(model_file, threads) if onnx else anomalens.load(model_file)
        self.overlays = overlays
        self.min_region_area = min_region_area

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan: Plan = []
        for described in batch["images"]:
            entries = json.loads(described)
            chunk = [InputImage(Path(path), relative) for path, relative, _ in entries]
            plan.append((chunk, {Path(path) for path, _, wanted in entries if wanted}))

        def finish(chunk: ScoredChunk) -> list[tuple[int, dict[str, Any], bytes]]:
            return finish_chunk(*chunk, self.overlays, self.scorer.pixel_threshold_)

        columns: dict[str, list[Any]] = {"index": [], "position": [], "row": [], "overlay": []}
        # the local engine's pipeline: the next chunk decoded and the last one's overlays drawn
        # while this one is scored
        finished = score_pipelined(self.scorer, plan, finish, self.min_region_area)
        for index, rows in zip(batch["index"], finished, strict=True):
            for position, row, picture in rows:
                for name, value in zip(
                    columns, (int(index), position, json.dumps(row), picture), strict=True
                ):
                    columns[name].append(value)
        return {name: np.array(values, dtype=object) for name, values in columns.items()}
