"""int8 against fp32: accuracy of PatchCore and PaDiM on MVTec AD bottle and Magnetic Tile.

    .venv/bin/python benchmarks/int8_accuracy.py [--data ../shared/datasets] [--json OUT.json]
        [--models patchcore padim] [--datasets mvtec_bottle_512 magnetic_tile]

For each detector (its defaults) and dataset: fit on `train/good`, export the fp32 ONNX graph and
the int8 one (`anomalens export --int8`, calibrated on the same `train/good` images), and
evaluate both graphs on the whole test split with `anomalens.evaluation.evaluate`. Prints image
AUROC, pixel AUROC and AUPRO of each, and the int8-minus-fp32 differences against the bars
(image AUROC within 0.003, pixel AUROC within 0.005, AUPRO within 0.01).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import anomalens
from anomalens.data.mvtec import training_images
from anomalens.deploy.export import export_onnx
from anomalens.deploy.int8 import export_int8
from anomalens.evaluation.evaluator import evaluate

BARS = {"image_auroc": 0.003, "pixel_auroc": 0.005, "aupro": 0.01}


def measure(model: str, root: Path, scratch: Path) -> dict:
    """fp32 and int8 metrics of `model` fitted on `root`'s normal training images."""
    images = training_images(root)
    started = time.perf_counter()
    detector = anomalens.create(model).fit(images)
    fit_s = time.perf_counter() - started
    float_path = export_onnx(detector, scratch / f"{model}-{root.name}.onnx")
    started = time.perf_counter()
    int8_path = scratch / f"{model}-{root.name}-int8.onnx"
    record = export_int8(detector, float_path, int8_path, images)
    int8_export_s = time.perf_counter() - started
    row: dict = {"model": model, "dataset": root.name, "n_train": len(images), "fit_s": fit_s}
    row["int8_export_s"] = int8_export_s
    row["check"] = record["agreement"]
    for graph, path in (("fp32", float_path), ("int8", int8_path)):
        metrics = evaluate(anomalens.OnnxModel(path), root).metrics
        row[graph] = {key: metrics[key] for key in (*BARS, "predict_ms_per_image", "n_images")}
    row["difference"] = {key: row["int8"][key] - row["fp32"][key] for key in BARS}
    row["within_bars"] = all(abs(row["difference"][key]) <= bar for key, bar in BARS.items())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--models", nargs="+", default=["patchcore", "padim"])
    parser.add_argument("--datasets", nargs="+", default=["mvtec_bottle_512", "magnetic_tile"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for dataset in args.datasets:
            for model in args.models:
                row = measure(model, args.data / dataset, Path(scratch))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| model | dataset | graph | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for graph in ("fp32", "int8", "difference"):
            values = row[graph]
            cells = " | ".join(
                f"{values[key]:+.4f}" if graph == "difference" else f"{values[key]:.4f}"
                for key in BARS
            )
            print(f"| {row['model']} | {row['dataset']} | {graph} | {cells} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
