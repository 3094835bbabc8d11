"""Reconstruction methods (autoencoder, vae, fanogan, dfr) on the real datasets.

    PYTHONPATH=src nice -n 5 .venv/bin/python benchmarks/reconstruction.py \
        [--data ../shared/datasets] [--models autoencoder vae fanogan dfr] [--json OUT.json]

Every method with its default settings through `anomalens.evaluation.fit_and_evaluate` on MVTec AD
bottle and magnetic tile (all training images): image AUROC, pixel AUROC, AUPRO, fit minutes (wall
clock, and the process's CPU time for fit + evaluation, since the machine is shared), predict
ms/image (evaluate's wall time per test image, decoding included) and how training ended. Then a
few other scoring settings of the same fitted model (no refit) to show what the defaults trade.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from anomalens.evaluation import evaluate, fit_and_evaluate
from anomalens.evaluation.benchmark import run_info

DATASETS = ("mvtec_bottle_512", "magnetic_tile")
MODELS = ("autoencoder", "vae", "fanogan", "dfr")
VARIANTS: dict[str, list[dict]] = {
    "autoencoder": [{"residual": "l2"}, {"image_score": "top_k"}],
    "vae": [{"image_score": "reconstruction"}, {"image_score": "max"}],
    "fanogan": [{"kappa": 0.0}, {"residual": "ssim"}],
    "dfr": [{"image_score": "top_k"}],
}
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def run(model: str, root: Path) -> dict:
    cpu = time.process_time()
    detector, evaluation = fit_and_evaluate(model, root)
    result = {
        **evaluation.metrics,
        "cpu_s": time.process_time() - cpu,
        "training": detector.training_,
        "params": detector.get_params(),
        "variants": [],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "params"}), flush=True)
    for variant in VARIANTS.get(model, []):
        defaults = {key: getattr(detector, key) for key in variant}
        for key, value in variant.items():
            setattr(detector, key, value)
        metrics = evaluate(detector, root).metrics
        result["variants"].append({"set": variant, **{k: metrics[k] for k in KEYS}})
        print(json.dumps(result["variants"][-1]), flush=True)
        for key, value in defaults.items():
            setattr(detector, key, value)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    report: dict = {
        **run_info(),
        "results": {},
    }
    for dataset in args.datasets:
        for model in args.models:
            print(f"== {model} on {dataset}", flush=True)
            report["results"][f"{model}/{dataset}"] = run(model, args.data / dataset)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=2, default=str))
    print(
        f"{'model':12} {'dataset':18} {'img AUROC':>9} {'px AUROC':>9} {'AUPRO':>7} "
        f"{'fit min':>8} {'CPU min':>8} {'ms/img':>7}"
    )
    for key, r in report["results"].items():
        model, dataset = key.split("/")
        print(
            f"{model:12} {dataset:18} {r['image_auroc']:9.3f} {r['pixel_auroc']:9.3f} "
            f"{r['aupro']:7.3f} {r['fit_s'] / 60:8.1f} {r['cpu_s'] / 60:8.1f} "
            f"{r['predict_ms_per_image']:7.1f}"
        )


if __name__ == "__main__":
    main()
