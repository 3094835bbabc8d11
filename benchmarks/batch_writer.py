"""What the streamed, synced results writer of `anomalens predict` costs.

    .venv/bin/python benchmarks/batch_writer.py [--data ../shared/datasets] [--repeats 5]

Fits PatchCore on MVTec AD bottle (512 px), then runs batch inspection of the 83 test images
(decode, score, overlays, results file) with rows streamed and fsynced batch by batch, and with
the same rows kept in memory and written once at the end; the two alternate in one run and the
medians are compared (the machine is shared). It also adds up the seconds the streamed, synced
appends themselves take (they run on the writer thread, beside the scoring).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import anomalens
from anomalens.data.inputs import collect_inputs
from anomalens.data.mvtec import training_images
from anomalens.deploy import batch


class Streamed(batch.CsvResults):
    """The streamed CSV, adding up the seconds its synced appends take."""

    seconds = 0.0

    def append(self, rows: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        super().append(rows)
        Streamed.seconds += time.perf_counter() - started


class WrittenAtTheEnd(batch.CsvResults):
    """The same CSV, every row held until `finish` (the writer before streaming)."""

    def open(self, resume: bool) -> set[str]:
        self._rows: list[dict[str, Any]] = []
        return super().open(resume)

    def append(self, rows: list[dict[str, Any]]) -> None:
        self._rows.extend(rows)

    def finish(self) -> Path:
        super().append(self._rows)
        return super().finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = args.data / "mvtec_bottle_512"
    model = anomalens.create("patchcore").fit(training_images(root))
    inputs = collect_inputs([root / "test"], recursive=True)
    seconds: dict[str, list[float]] = {"streamed": [], "at_the_end": []}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for name in seconds:
                out = Path(folder) / f"{name}-{repeat}"
                store = Streamed(out) if name == "streamed" else WrittenAtTheEnd(out)
                started = time.perf_counter()
                batch.inspect_images(model, inputs, out, store=store)
                seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    report = {
        "images": len(inputs.images),
        "seconds": seconds,
        "median_s": medians,
        "overhead": medians["streamed"] / medians["at_the_end"] - 1,
        "streamed_append_s_per_run": Streamed.seconds / args.repeats,
        "append_share_of_predict": Streamed.seconds / sum(seconds["streamed"]),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
