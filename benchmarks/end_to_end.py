"""End-to-end `anomalens predict` speed on MVTec AD bottle's 83 test images at 512 px.

    .venv/bin/python benchmarks/end_to_end.py [--data ../shared/datasets] [--repeats 5]
        [--baseline PATH_TO_AN_OLDER_CHECKOUT] [--json OUT.json]

Fits the default PatchCore on bottle's normal images, exports it to ONNX (fp32, and int8 when the
export supports `--int8`, calibrated on `train/good`), then times the whole command (decode, score,
overlays, results file) for each variant: torch, ONNX Runtime fp32, ONNX Runtime int8, and, with
`--baseline`, the torch predict of an older checkout (its `src/` on PYTHONPATH, fitting its own
model: "today's figure" before a change). Each timing runs in a fresh process that first does one
untimed warm-up run; variants alternate within each repeat and the medians are reported (the
machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

TIMED_RUN = """
import json, sys, time
from anomalens.cli import app
model, out, *folders = sys.argv[1:]
def once(target):
    app(["predict", model, *folders, "--out", target], standalone_mode=False)
once(out + "-warm-up")
started = time.perf_counter()
once(out)
print(json.dumps(time.perf_counter() - started))
"""


def timed(src: Path, model: Path, out: Path, folders: list[Path]) -> float:
    """Seconds of one `predict` run (after a warm-up run) in a fresh process using `src`."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-c", TIMED_RUN, str(model), str(out), *map(str, folders)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{model.name} with {src}: {result.stderr.strip()[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def cli(*args: str, src: Path = SRC) -> None:
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-m", "anomalens", *args], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="Also write the report here.")
    args = parser.parse_args()
    root = (args.data / "mvtec_bottle_512").resolve()
    folders = sorted(p for p in (root / "test").iterdir() if p.is_dir())
    n_images = sum(len(list(folder.glob("*.png"))) for folder in folders)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        model = work / "model.safetensors"
        cli("fit", str(root), "-o", str(model))
        cli("export", str(model), "-o", str(work / "fp32.onnx"))
        variants = {"torch": (SRC, model), "onnx fp32": (SRC, work / "fp32.onnx")}
        int8 = work / "int8.onnx"
        try:
            calibration = str(root / "train" / "good")
            cli("export", str(model), "-o", str(int8), "--int8", "--calibration", calibration)
            variants["onnx int8"] = (SRC, int8)
        except subprocess.CalledProcessError:
            print("int8 export not available; skipped", file=sys.stderr)
        if args.baseline is not None:
            # The older checkout fits its own model: its model files may differ.
            baseline_src, baseline_model = (
                args.baseline.resolve() / "src",
                work / "baseline.safetensors",
            )
            cli("fit", str(root), "-o", str(baseline_model), src=baseline_src)
            variants["torch, baseline"] = (baseline_src, baseline_model)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, (src, path) in variants.items():
                out = work / f"out-{name.replace(' ', '_').replace(',', '')}-{repeat}"
                seconds[name].append(timed(src, path, out, folders))
                print(f"{name}: {seconds[name][-1]:.2f} s", file=sys.stderr, flush=True)
    report = {
        "images": n_images,
        "seconds": seconds,
        "images_per_s": {k: n_images / statistics.median(v) for k, v in seconds.items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
