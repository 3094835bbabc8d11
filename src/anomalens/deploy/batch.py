"""Batch inspection that loses nothing: results streamed to disk batch by batch, resumable.

`inspect_images` scores a list of inputs (`anomalens.data.inputs`) and appends one row per image
to a results file, flushed and synced after every batch, so a run stopped at any point (Ctrl-C,
`kill -9`, power loss) keeps every row it finished. While running, the rows go to
`results.csv.partial` (CSV) or to `results.parquet.parts/part-NNNNNN.parquet` (Parquet, one
part per batch, each renamed into place whole); the final `results.csv` / `results.parquet` is
completed by an atomic rename at the end. `resume=True` keeps the rows already written and scores
only the images without one; images are batched on the same grid as in an uninterrupted run, so
every score is the same.

`run_inspection` is what every engine shares (results, resume, plan, progress): this module's
threads score in the calling process, `anomalens.deploy.ray_engine` on Ray actors.

Each row: `path`, `relative_path` (to the inputs' common folder), `score`, `label` (1 =
anomalous), `regions` (JSON list, see `Region.to_dict`), `overlay` (the overlay's path under the
output folder) and `error` (why an input could not be scored; empty otherwise).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from anomalens.core.prediction import Prediction
from anomalens.core.scorer import Scorer
from anomalens.data.inputs import InputImage, Inputs
from anomalens.data.io import to_rgb_array
from anomalens.errors import DataError, ImageReadError
from anomalens.evaluation.viz import overlay
from anomalens.outputs import check_writable_folder, replace_atomically
from anomalens.progress import make_progress

COLUMNS = ("path", "relative_path", "score", "label", "regions", "overlay", "error")
FORMATS = ("csv", "parquet")
AHEAD = 2
"""Chunks decoded ahead of the one being scored, and scored chunks waiting to be written."""
OVERLAYS = "overlays"
"""The folder, under the output folder, holding one overlay per image at its relative path."""

OVERLAY_COMPRESSION = 1
"""zlib level of the overlay PNGs: level 1 encodes a 512 px overlay about 4x faster than PIL's
default 6 (18 against 79 ms on this 2-core machine under load), for files about 20% larger; on
two cores the writer's encoding competes with the scoring, so it is on the run's critical path
(int8 `predict` on bottle: 3.5 s against 8.3 s at level 6; benchmarks/RESULTS.md)."""

T = TypeVar("T")

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("relative_path", pa.string()),
        ("score", pa.float64()),
        ("label", pa.int8()),
        ("regions", pa.string()),
        ("overlay", pa.string()),
        ("error", pa.string()),
    ]
)


@dataclass
class BatchSummary:
    """What one run did: rows written now, rows kept from before (`resume`), the anomalous
    count among the new rows, the inputs that failed, and the results file."""

    results: Path
    scored: int = 0
    kept: int = 0
    anomalous: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def overlay_name(relative: str) -> str:
    """An image's overlay path under `overlays/`: its relative path, `.png` added unless it is
    one already (so `a.jpg` and `a.png` side by side stay apart)."""
    return relative if relative.lower().endswith(".png") else f"{relative}.png"


def inspect_images(
    scorer: Scorer,
    inputs: Inputs,
    out: str | os.PathLike[str],
    *,
    fmt: str = "csv",
    resume: bool = False,
    overlays: bool = True,
    min_region_area: int = 0,
    store: ResultsStore | None = None,
) -> BatchSummary:
    """Score every input image, streaming rows (and overlays) into `out`; see the module doc.
    `store`: where the rows go (default: `results_store(out, fmt)`)."""

    def engine(plan: Plan, store: ResultsStore, out: Path) -> Iterator[list[dict[str, Any]]]:
        def write(chunk: ScoredChunk) -> list[dict[str, Any]]:
            # the overlays first, so a row on disk always has its overlay
            finished = finish_chunk(*chunk, overlays, scorer.pixel_threshold_)
            return store_rows(out, store, [(row, picture) for _, row, picture in finished])

        return score_pipelined(scorer, plan, write, min_region_area)

    return run_inspection(
        engine, scorer.batch_size, inputs, out, fmt=fmt, resume=resume, store=store
    )


Plan = list[tuple[list[InputImage], set[Path]]]
"""The chunks to score (the batches of an uninterrupted run), each with its images still to do."""
Engine = Callable[[Plan, "ResultsStore", Path], Iterator[list[dict[str, Any]]]]
"""What scores a plan: yields each chunk's new rows once its overlays and rows are stored."""
ScoredChunk = tuple[
    list[InputImage], set[Path], dict[int, np.ndarray], list[Prediction], list[dict[str, Any]]
]
"""A chunk, its images to do, its decoded images by position, their predictions, and its rows
(the error rows of the images that could not be read), as `finish_chunk` takes them."""


def run_inspection(
    engine: Engine,
    batch_size: int,
    inputs: Inputs,
    out: str | os.PathLike[str],
    *,
    fmt: str = "csv",
    resume: bool = False,
    store: ResultsStore | None = None,
) -> BatchSummary:
    """What every engine shares: open (or resume) the results, row the skipped inputs, plan the
    chunks of `batch_size` images, let `engine` score and store them, finish the results."""
    out = check_writable_folder(out)
    store = store or results_store(out, fmt)
    done = store.open(resume)
    summary = BatchSummary(store.final, kept=len(done))
    pending_skips = [s for s in inputs.skipped if str(s.path) not in done]
    if pending_skips:
        store.append([_error_row(s.path, s.relative, s.reason) for s in pending_skips])
        summary.failed.extend((str(s.path), s.reason) for s in pending_skips)
    plan = [
        (chunk, {image.path for image in chunk if str(image.path) not in done})
        for chunk in _chunks(inputs.images, batch_size)
    ]
    with make_progress() as bar:
        task = bar.add_task("inspecting", total=len(inputs.images), info="", unit="img")
        bar.advance(task, len(inputs.images) - sum(len(todo) for _, todo in plan))
        for rows in engine([p for p in plan if p[1]], store, out):
            summary.scored += sum(1 for row in rows if not row["error"])
            summary.anomalous += sum(1 for row in rows if row["label"] == 1)
            summary.failed.extend((row["path"], row["error"]) for row in rows if row["error"])
            bar.advance(task, len(rows))
    store.finish()
    return summary


def _chunks(images: list[InputImage], size: int) -> list[list[InputImage]]:
    """The batches of an uninterrupted run: a resumed run scores the same batches, so it gives the
    same scores."""
    return [images[start : start + size] for start in range(0, len(images), size)]


def score_pipelined(
    scorer: Scorer,
    plan: Plan,
    finish: Callable[[ScoredChunk], T],
    min_region_area: int,
) -> Iterator[T]:
    """`finish` of each planned chunk once scored, in order. Three stages overlap: a reader thread
    decodes the next chunks, the caller's thread scores, a writer thread runs `finish` (overlays,
    rows). At most `AHEAD` chunks wait in each queue, so memory stays bounded; on an interrupt,
    the chunks already scored are still finished."""
    with (
        ThreadPoolExecutor(1, "anomalens-read") as reader,
        ThreadPoolExecutor(1, "anomalens-write") as writer,
    ):
        reads = deque(reader.submit(read_chunk, chunk) for chunk, _ in plan[:AHEAD])
        writes: deque[Future[T]] = deque()
        for index, (chunk, todo) in enumerate(plan):
            if index + AHEAD < len(plan):
                reads.append(reader.submit(read_chunk, plan[index + AHEAD][0]))
            arrays, rows = reads.popleft().result()
            # The whole chunk is scored, as in an uninterrupted run: same batches, same scores.
            predictions = (
                scorer.predict(list(arrays.values()), min_region_area=min_region_area)
                if arrays
                else []
            )
            writes.append(writer.submit(finish, (chunk, todo, arrays, predictions, rows)))
            while len(writes) > AHEAD or (writes and writes[0].done()):
                yield writes.popleft().result()
        while writes:
            yield writes.popleft().result()


def read_chunk(chunk: list[InputImage]) -> tuple[dict[int, np.ndarray], list[dict[str, Any]]]:
    """The decoded images of `chunk` by position, and a row per position (error rows filled)."""
    arrays: dict[int, np.ndarray] = {}
    rows: list[dict[str, Any]] = [{} for _ in chunk]
    for i, image in enumerate(chunk):
        try:
            arrays[i] = to_rgb_array(image.path)
        except ImageReadError as error:
            rows[i] = _error_row(image.path, image.relative, str(error))
    return arrays, rows


def finish_chunk(
    chunk: list[InputImage],
    todo: set[Path],
    arrays: dict[int, np.ndarray],
    predictions: list[Prediction],
    rows: list[dict[str, Any]],
    overlays: bool,
    threshold: float | None,
) -> list[tuple[int, dict[str, Any], bytes]]:
    """For each `todo` image of a scored chunk: its position, its row and its overlay PNG
    (`b""` when none); `rows` holds the error rows of the images that could not be read."""
    pictures: dict[int, bytes] = {}
    for (i, array), prediction in zip(arrays.items(), predictions, strict=True):
        image = chunk[i]
        name = ""
        if overlays and prediction.anomaly_map is not None and image.path in todo:
            name = f"{OVERLAYS}/{overlay_name(image.relative)}"
            pictures[i] = overlay_png(array, prediction, threshold)
        rows[i] = _result_row(image, prediction, name)
    return [
        (i, rows[i], pictures.get(i, b"")) for i, image in enumerate(chunk) if image.path in todo
    ]


def store_rows(
    out: Path, store: ResultsStore, finished: list[tuple[dict[str, Any], bytes]]
) -> list[dict[str, Any]]:
    """Write the overlays, then append the rows (so a row on disk always has its overlay)."""
    for row, picture in finished:
        if picture:
            replace_atomically(picture, out / row["overlay"])
    rows = [row for row, _ in finished]
    store.append(rows)
    return rows


def overlay_png(image: np.ndarray, prediction: Prediction, threshold: float | None) -> bytes:
    """The heatmap overlay of a scored image, PNG-encoded."""
    picture = overlay(
        image, prediction.anomaly_map, threshold, prediction.mask, regions=prediction.regions
    )
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=OVERLAY_COMPRESSION)
    return buffer.getvalue()


def _result_row(image: InputImage, prediction: Prediction, picture: str) -> dict[str, Any]:
    return {
        "path": str(image.path),
        "relative_path": image.relative,
        "score": float(prediction.score),
        "label": int(prediction.label),
        "regions": json.dumps([region.to_dict() for region in prediction.regions]),
        "overlay": picture,
        "error": "",
    }


def _error_row(path: Path, relative: str, reason: str) -> dict[str, Any]:
    return {
        "path": str(path),
        "relative_path": relative,
        "score": None,
        "label": None,
        "regions": "[]",
        "overlay": "",
        "error": reason,
    }


def results_store(out: Path, fmt: str) -> ResultsStore:
    """The streamed results file of `fmt` (`csv` or `parquet`) in `out`."""
    if fmt == "csv":
        return CsvResults(out)
    if fmt == "parquet":
        return ParquetResults(out)
    raise DataError(f"unknown results format {fmt!r}; available: {', '.join(FORMATS)}")


class ResultsStore:
    """Rows appended batch by batch, durable once `append` returns, finished atomically."""

    final: Path

    def open(self, resume: bool) -> set[str]:
        """Start writing; with `resume`, keep the rows already written and return their paths."""
        raise NotImplementedError

    def append(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def finish(self) -> Path:
        raise NotImplementedError


class CsvResults(ResultsStore):
    """`results.csv`, written as `results.csv.partial` and renamed into place at the end."""

    def __init__(self, out: Path) -> None:
        self.final = out / "results.csv"
        self.partial = out / "results.csv.partial"
        self._file: io.TextIOWrapper | None = None

    def open(self, resume: bool) -> set[str]:
        if resume and not self.partial.exists() and self.final.exists():
            os.replace(self.final, self.partial)
        if not resume or not self.partial.exists():
            self.final.unlink(missing_ok=True)
            self._file = open(self.partial, "w", newline="", encoding="utf-8")  # noqa: SIM115
            csv.writer(self._file, lineterminator="\n").writerow(COLUMNS)
            self._sync()
            return set()
        _drop_torn_line(self.partial)
        with open(self.partial, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = tuple(next(reader, ()))
            if header != COLUMNS:
                raise DataError(
                    f"cannot resume from {self.partial}: its columns are {', '.join(header)}; "
                    f"expected {', '.join(COLUMNS)}"
                )
            done = {row[0] for row in reader if row}
        self._file = open(self.partial, "a", newline="", encoding="utf-8")  # noqa: SIM115
        return done

    def append(self, rows: list[dict[str, Any]]) -> None:
        assert self._file is not None
        writer = csv.writer(self._file, lineterminator="\n")
        writer.writerows([_csv_value(row[column]) for column in COLUMNS] for row in rows)
        self._sync()

    def finish(self) -> Path:
        assert self._file is not None
        self._file.close()
        os.replace(self.partial, self.final)
        return self.final

    def _sync(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())


class ParquetResults(ResultsStore):
    """`results.parquet`: one part per batch under `results.parquet.parts/` while running (each
    written whole, then renamed into place), joined into one file atomically at the end."""

    def __init__(self, out: Path) -> None:
        self.final = out / "results.parquet"
        self.parts = out / "results.parquet.parts"
        self._next = 0

    def open(self, resume: bool) -> set[str]:
        if not resume:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.final.unlink(missing_ok=True)
        self.parts.mkdir(exist_ok=True)
        for leftover in self.parts.glob(".*"):  # a part whose write was cut short
            leftover.unlink()
        if self.final.exists() and not self._part_files():
            os.replace(self.final, self.parts / _part_name(0))
        parts = self._part_files()
        self._next = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        return {
            path
            for part in parts
            for path in pq.read_table(part, columns=["path"])["path"].to_pylist()
        }

    def append(self, rows: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        replace_atomically(buffer.getvalue(), self.parts / _part_name(self._next))
        self._next += 1

    def finish(self) -> Path:
        parts = self._part_files()
        tables = [pq.read_table(part, schema=SCHEMA) for part in parts]
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        replace_atomically(buffer.getvalue(), self.final)
        shutil.rmtree(self.parts)
        return self.final

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))


def _part_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _drop_torn_line(path: Path) -> None:
    """Cut a last line that a crash left half-written (all complete lines end in a newline)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
