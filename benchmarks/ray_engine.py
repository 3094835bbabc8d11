"""`anomalens predict --engine ray` against the local engine, on one machine.

    .venv/bin/python benchmarks/ray_engine.py [--data ../shared/datasets] [--model FILE]
        [--repeats 3] [--copies 1] [--json benchmarks/out/ray_engine.json]

Fits the default PatchCore on MVTec AD bottle `train/good` (512 px; or takes `--model`), then
runs batch inspection of the 83 test images (decode, score, overlays, results.csv) with the local
engine (torch's default threads), Ray with 1 actor (all the machine's CPUs) and Ray with 2 actors
(half each), alternating in each repeat; reports the median seconds and images/s of each, and
checks that Ray's scores equal the local ones within 1e-5 relative, with the same labels; it also
times a fresh Python process importing anomalens (each actor's start-up). Each run
is timed from the model file to the finished results (model loads and actor start-ups included);
the Ray instance is started once before, as a running cluster would be. Bar: Ray with 1 actor at
most 15% slower than the local engine.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

import anomalens
from anomalens.data.inputs import collect_inputs
from anomalens.data.mvtec import training_images
from anomalens.deploy.batch import inspect_images
from anomalens.deploy.ray_engine import inspect_images_ray

ENGINES = ("local", "ray_1_actor", "ray_2_actors")
IMPORT = "import_in_a_fresh_process"
"""What each actor pays before its first image: a new Python process importing anomalens."""


def _run(engine: str, model: Path, inputs, out: Path) -> float:
    started = time.perf_counter()
    if engine == IMPORT:
        subprocess.run([sys.executable, "-c", "import anomalens"], check=True)
    elif engine == "local":
        inspect_images(anomalens.load(model), inputs, out)
    else:
        inspect_images_ray(model, inputs, out, actors=1 if engine == "ray_1_actor" else 2)
    return time.perf_counter() - started


def _results(out: Path) -> dict[str, tuple[float, int]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as handle:
        return {
            row["path"]: (float(row["score"]), int(row["label"])) for row in csv.DictReader(handle)
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--model", type=Path, help="a model file (default: fit PatchCore)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="inspect this many copies of the test split (distinct files: a larger run)",
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    root = args.data / "mvtec_bottle_512"
    with tempfile.TemporaryDirectory() as folder:
        tests = [root / "test"]
        for copy in range(1, args.copies):  # copies, not links: an input is read once by realpath
            tests.append(Path(folder) / f"copy{copy}")
            shutil.copytree(root / "test", tests[-1])
        inputs = collect_inputs(tests, recursive=True)
        model = args.model
        if model is None:
            model = (
                anomalens.create("patchcore")
                .fit(training_images(root))
                .save(Path(folder) / "patchcore.safetensors")
            )
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        cpus = int(ray.cluster_resources()["CPU"])
        seconds: dict[str, list[float]] = {engine: [] for engine in (*ENGINES, IMPORT)}
        agree: dict[str, dict[str, float | bool]] = {}
        for repeat in range(args.repeats):
            for engine in (*ENGINES, IMPORT):
                out = Path(folder) / f"{engine}-{repeat}"
                seconds[engine].append(_run(engine, model, inputs, out))
                print(f"repeat {repeat} {engine}: {seconds[engine][-1]:.2f} s", flush=True)
                if repeat == 0 and engine.startswith("ray"):
                    local, got = _results(Path(folder) / "local-0"), _results(out)
                    worst = max(abs(got[p][0] - s) / abs(s) for p, (s, _) in local.items())
                    same = all(got[p][1] == label for p, (_, label) in local.items())
                    agree[engine] = {"max_relative_score_difference": worst, "same_labels": same}
        ray.shutdown()
    medians = {engine: statistics.median(values) for engine, values in seconds.items()}
    overhead = medians["ray_1_actor"] / medians["local"] - 1
    report = {
        "images": len(inputs.images),
        "cpus": cpus,
        "seconds": seconds,
        "median_s": medians,
        "images_per_s": {engine: len(inputs.images) / medians[engine] for engine in ENGINES},
        "ray_1_actor_overhead": overhead,
        "bar_met": overhead <= 0.15,
        "agreement": agree,
        "scores_agree": all(
            a["max_relative_score_difference"] <= 1e-5 and a["same_labels"] for a in agree.values()
        ),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
