"""One-class benchmark: every class of a labelled image set in turn is normal, the rest anomalous.

    .venv/bin/python benchmarks/one_class.py --model rotnet \
        [--data ../shared/datasets/fashion_mnist] [--max-train 2000] [--param KEY=VALUE ...] \
        [--classes 0,1] [--threads 2] [--json OUT.json]

For each class: fit on (a seeded subsample of `--max-train`) training images of that class, score
the whole test set, image AUROC with every other class anomalous (Ruff et al. 2018, Golan &
El-Yaniv 2018). Prints per-class AUROC, fit and scoring seconds (wall and this process's CPU
seconds: the machine is shared, so CPU seconds are the load-independent cost), and the mean.

With an MVTec-layout folder as `--data` (e.g. ../shared/datasets/mvtec_bottle_512) it instead fits
on train/good and reports the image AUROC on test/ (`anomalens.evaluation.fit_and_evaluate`).

Fashion-MNIST is 28x28 grayscale: `SMALL_IMAGE_PARAMS` sets each model's input size for it
(native-size CNNs at 32 px, pretrained features at 96 px, the fine-tuned `cutpaste` at 64 px for
3 epochs to fit the CPU budget); `--param` overrides any of them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import anomalens
from anomalens.data.labelled import load_labelled, one_class_split
from anomalens.evaluation import fit_and_evaluate
from anomalens.evaluation.benchmark import run_info
from anomalens.evaluation.metrics import image_auroc

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

SMALL_IMAGE_PARAMS: dict[str, dict[str, Any]] = {
    "rotnet": {"image_size": 32},
    "deepsvdd": {"image_size": 32},
    "ocsvm": {"image_size": 96},
    "knn": {"image_size": 96},
    "gaussian": {"image_size": 96},
    "patchcore": {"image_size": 96},
    "cutpaste": {"image_size": 64, "max_epochs": 3},
}
"""Input sizes for 28x28 images: small CNNs at about native size, pretrained networks upsized."""


def parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def one_class(args: argparse.Namespace, params: dict[str, Any], report: dict) -> None:
    train = load_labelled(args.data)
    test = load_labelled(args.data, "test")
    names = train.class_names
    if len(names) == len(FASHION_MNIST_CLASSES) and "fashion" in args.data.name.lower():
        names = FASHION_MNIST_CLASSES
    classes = [int(c) for c in args.classes.split(",")] if args.classes else range(len(names))
    report.update(protocol="one-class", n_test=len(test), max_train=args.max_train, classes=[])
    started, cpu_started = time.perf_counter(), time.process_time()
    for normal_class in classes:
        images, test_images, labels = one_class_split(
            train, test, normal_class, args.max_train, seed=args.seed
        )
        detector = anomalens.create(args.model, **params)
        fit_started, fit_cpu = time.perf_counter(), time.process_time()
        detector.fit(list(images))
        fit_s, fit_cpu_s = time.perf_counter() - fit_started, time.process_time() - fit_cpu
        score_started, score_cpu = time.perf_counter(), time.process_time()
        scores = detector.decision_function(list(test_images))
        score_s, score_cpu_s = time.perf_counter() - score_started, time.process_time() - score_cpu
        row = {
            "class": normal_class,
            "name": names[normal_class],
            "image_auroc": image_auroc(labels, scores),
            "n_train": len(images),
            "fit_s": fit_s,
            "score_s": score_s,
            "fit_cpu_s": fit_cpu_s,
            "score_cpu_s": score_cpu_s,
        }
        for training in getattr(detector, "training_", {}).values():
            row.update(epochs=training["epochs"], stopped=training["stopped"])
        report["classes"].append(row)
        print(
            f"{normal_class} {row['name']:<12} AUROC {row['image_auroc']:.4f}  "
            f"fit {fit_s:6.1f}s ({fit_cpu_s:.0f} CPU s)  score {score_s:6.1f}s "
            f"({score_cpu_s:.0f} CPU s)  ({len(images)} train images)",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    aurocs = [row["image_auroc"] for row in report["classes"]]
    report["mean_image_auroc"] = float(np.mean(aurocs))
    report["total_s"] = time.perf_counter() - started
    report["total_cpu_s"] = time.process_time() - cpu_started
    print(
        f"mean AUROC {report['mean_image_auroc']:.4f}  total {report['total_s']:.0f}s "
        f"({report['total_cpu_s']:.0f} CPU s)"
    )


def mvtec(args: argparse.Namespace, params: dict[str, Any], report: dict) -> None:
    cpu_started = time.process_time()
    detector, evaluation = fit_and_evaluate(args.model, args.data, **params)
    metrics = evaluation.metrics
    metrics["fit_and_evaluate_cpu_s"] = time.process_time() - cpu_started
    if hasattr(detector, "recognition_accuracy"):  # rotnet: can it tell the transformations?
        good = [s.path for s in evaluation.samples if s.label == 0]
        metrics["recognition_accuracy_normal"] = detector.recognition_accuracy(good)
        metrics["transformations"] = len(detector.transformations_)
    if hasattr(detector, "classification_accuracy"):  # cutpaste: was the pretext task learned?
        good = [s.path for s in evaluation.samples if s.label == 0]
        metrics["classification_accuracy_normal"] = detector.classification_accuracy(good)
    if hasattr(detector, "training_"):
        metrics["training"] = detector.training_
    report.update(protocol="mvtec", metrics=metrics)
    print(
        f"{args.data.name}: image AUROC {metrics['image_auroc']:.4f}  fit {metrics['fit_s']:.1f}s"
        f"  predict {metrics['predict_ms_per_image']:.1f} ms/image"
        + "".join(
            f"  {key} {metrics[key]:.3f}"
            for key in (
                "recognition_accuracy_normal",
                "classification_accuracy_normal",
                "fit_and_evaluate_cpu_s",
            )
            if key in metrics
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/fashion_mnist"))
    parser.add_argument("--max-train", type=int, default=None, help="training images per class")
    parser.add_argument("--classes", default=None, help="comma-separated normal classes")
    parser.add_argument("--param", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    is_mvtec = (args.data / "train").is_dir() and (args.data / "test").is_dir()
    params = {} if is_mvtec else dict(SMALL_IMAGE_PARAMS.get(args.model, {}))
    params.update(parse_params(args.param), seed=args.seed)
    report: dict[str, Any] = {
        **run_info(),
        "model": args.model,
        "data": str(args.data),
        "params": params,
    }
    print(f"{args.model} on {args.data} with {params}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    (mvtec if is_mvtec else one_class)(args, params, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
