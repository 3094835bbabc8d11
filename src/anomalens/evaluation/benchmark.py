"""Benchmark any registered models on MVTec-layout datasets: results.json and a report.html.

    rows = run_benchmark(parse_models("patchcore,padim,hc=padim"), [bottle, tile], out,
                         params={"hc.backbone": "handcrafted", "image_size": 256})

Every (model, dataset) row runs in a fresh Python process, so its peak resident memory is its
own (in one process, peaks accumulate and freed memory is not returned) and no state leaks from
one row to the next. A row fits the model on ``train/good`` (timed), evaluates it on ``test``
(`anomalens.evaluation.evaluate`: every metric and the batched predict time), and times predict
on one image at a time against the model's own backbone forward, interleaved, as medians
(`batch1_speed`). `write_report` turns the rows into one self-contained HTML file: a metrics
table, ROC and PRO curves, and per dataset and model the worst-scored normal and the
best-hidden anomalous test images with heatmap and ground truth.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalens import progress
from anomalens.core.registry import create, model_class
from anomalens.core.scorer import Scorer
from anomalens.data.io import to_rgb_array
from anomalens.data.mvtec import Sample, load_sample_mask, test_samples, training_images
from anomalens.data.preprocessing import resize_to_tensor
from anomalens.errors import AnomalensError
from anomalens.evaluation.evaluator import Evaluation, evaluate
from anomalens.evaluation.memory import peak_rss_mb
from anomalens.evaluation.metrics import pro_curve
from anomalens.evaluation.report import write_page
from anomalens.evaluation.viz import overlay

DEFAULT_MODELS = "patchcore,padim,gaussian,knn"
_LABEL = re.compile(r"^[A-Za-z0-9_]+$")
TABLE_COLUMNS = (
    ("image_auroc", "image AUROC", "{:.4f}"),
    ("image_aupr", "image AUPR", "{:.4f}"),
    ("image_f1_max", "image F1-max", "{:.4f}"),
    ("pixel_auroc", "pixel AUROC", "{:.4f}"),
    ("aupro", "AUPRO", "{:.4f}"),
    ("fit_s", "fit s", "{:.1f}"),
    ("predict_ms_per_image", "predict ms/image", "{:.1f}"),
    ("predict_ms_batch1", "batch-1 predict ms", "{:.1f}"),
    ("backbone_ms_batch1", "backbone ms", "{:.1f}"),
    ("predict_backbone_ratio", "predict / backbone", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("model_state_mb", "model MB", "{:.1f}"),
)


@dataclass
class ModelSpec:
    """A model to benchmark: `label` names its rows (and its `label.key` parameters)."""

    label: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)


def parse_models(text: str, params: dict[str, Any] | None = None) -> list[ModelSpec]:
    """Specs from ``"patchcore,padim,hc=padim"`` (``LABEL=MODEL`` runs a model under another
    label, e.g. twice with different parameters) and `params`: ``"label.key"`` applies to that
    label only, a plain ``"key"`` to every model."""
    specs: list[ModelSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        label, _, model = item.rpartition("=")
        label = label or model
        if not _LABEL.match(label):
            raise AnomalensError(f"model label {label!r} must be letters, digits and _ only")
        if label in {spec.label for spec in specs}:
            raise AnomalensError(f"model label {label!r} is given twice; use LABEL=MODEL")
        model_class(model)
        specs.append(ModelSpec(label, model))
    if not specs:
        raise AnomalensError("no models to benchmark")
    by_label = {spec.label: spec for spec in specs}
    for key, value in (params or {}).items():
        label, dot, name = key.partition(".")
        if not dot:
            for spec in specs:
                spec.params[key] = value
        elif label in by_label:
            by_label[label].params[name] = value
        else:
            raise AnomalensError(f"parameter {key!r} names no model label ({', '.join(by_label)})")
    for spec in specs:
        model_class(spec.model).check_params(spec.params, f"{spec.label} ({spec.model})")
    return specs


def run_benchmark(
    specs: Sequence[ModelSpec],
    datasets: Sequence[str | Path],
    out: str | Path,
    *,
    speed_repeats: int = 20,
    examples: int = 3,
    threads: int | None = None,
    command: str = "",
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Fit and evaluate every spec on every dataset, each row in a fresh process; write
    ``out/results.json`` and ``out/report.html`` and return the rows. `threads`: torch threads
    per row (default: torch's own choice)."""
    out = Path(out)
    roots = [Path(d) for d in datasets]
    for root in roots:
        training_images(root)
        test_samples(root)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    rows = []
    for root in roots:
        for spec in specs:
            detail = out / "rows" / f"{root.name}__{spec.label}"
            row = _run_in_subprocess(spec, root, detail, speed_repeats, examples, threads)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    meta = run_info(command, threads)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_report(rows, out / "report.html", meta)
    return rows


def run_info(command: str = "", threads: int | None = None) -> dict[str, Any]:
    """When, where and with what a benchmark ran (its results' `meta`)."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{threads or torch.get_num_threads()} torch threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _run_in_subprocess(
    spec: ModelSpec,
    root: Path,
    detail: Path,
    speed_repeats: int,
    examples: int,
    threads: int | None,
) -> dict[str, Any]:
    job = {
        "threads": threads,
        "spec": asdict(spec),
        "dataset": str(root),
        "detail": str(detail),
        "speed_repeats": speed_repeats,
        "examples": examples,
    }
    row_file = detail.with_suffix(".json")
    row_file.unlink(missing_ok=True)
    status = subprocess.run(
        [sys.executable, "-m", "anomalens.evaluation.benchmark", json.dumps(job)], check=False
    ).returncode
    if row_file.is_file():
        return json.loads(row_file.read_text())
    return {
        "model": spec.label,
        "model_name": spec.model,
        "params": spec.params,
        "dataset": root.name,
        "error": f"benchmark worker exited with status {status} and wrote no result",
    }


# ---- one row, in its own process ---------------------------------------------------------------
def benchmark_row(
    spec: ModelSpec, root: Path, detail: Path, speed_repeats: int = 20, examples: int = 3
) -> dict[str, Any]:
    """Fit, evaluate and time one model on one dataset (call in a fresh process for honest
    memory figures); writes curves and example maps to ``detail.npz``."""
    row: dict[str, Any] = {
        "model": spec.label,
        "model_name": spec.model,
        "params": spec.params,
        "dataset": root.name,
        "dataset_path": str(root),
        "baseline_rss_mb": peak_rss_mb(),
    }
    detector = create(spec.model, **spec.params)
    started, cpu = time.perf_counter(), time.process_time()
    detector.fit(training_images(root))
    row["fit_s"] = time.perf_counter() - started
    row["fit_cpu_s"] = time.process_time() - cpu
    row["peak_rss_fit_mb"] = peak_rss_mb()
    evaluation = evaluate(detector, root)
    row.update(evaluation.metrics)
    row["peak_rss_mb"] = peak_rss_mb()
    row["model_state_mb"] = (
        sum(
            t.numel() * t.element_size()
            for k, t in detector._tensors().items()
            if "backbone." not in k
        )
        / 2**20
    )
    with tempfile.TemporaryDirectory() as folder:
        size = detector.save(Path(folder) / "model.safetensors").stat().st_size
    row["model_file_mb"] = size / 2**20
    if speed_repeats > 0:
        row.update(batch1_speed(detector, [s.path for s in evaluation.samples], speed_repeats))
    row["params"] = detector.get_params()

    arrays, row["examples"] = _curves_and_examples(detector, evaluation, examples)
    row["image_threshold"] = detector.image_threshold_
    row["pixel_threshold"] = detector.pixel_threshold_
    np.savez_compressed(detail.with_suffix(".npz"), **arrays)
    return row


def _curves_and_examples(
    detector: Scorer, evaluation: Evaluation, examples: int
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Labels and scores (for ROC curves), the PRO curve on a regular FPR grid, and the
    `examples` highest-scored normal and lowest-scored anomalous images with their maps."""
    samples, predictions = evaluation.samples, evaluation.predictions
    labels = np.array([s.label for s in samples])
    scores = np.array([p.score for p in predictions])
    arrays: dict[str, np.ndarray] = {"labels": labels, "scores": scores}
    if detector.produces_maps:
        masks = evaluation.masks
        usable = [i for i, mask in enumerate(masks) if mask is not None]
        if labels[usable].any():
            fpr, pro = pro_curve(
                [masks[i] for i in usable], [predictions[i].anomaly_map for i in usable]
            )
            grid = np.linspace(0.0, fpr[-1], 301)
            arrays["pro_fpr"], arrays["pro"] = grid, np.interp(grid, fpr, pro)
    normal = np.flatnonzero(labels == 0)
    anomalous = np.flatnonzero(labels == 1)
    chosen = [
        *normal[np.argsort(-scores[normal], kind="stable")][:examples],
        *anomalous[np.argsort(scores[anomalous], kind="stable")][:examples],
    ]
    shown = []
    for n, index in enumerate(chosen):
        sample, prediction = samples[index], predictions[index]
        shown.append(
            {
                "path": str(sample.path),
                "label": sample.label,
                "defect": sample.defect,
                "mask_path": None if sample.mask_path is None else str(sample.mask_path),
                "score": prediction.score,
            }
        )
        if prediction.anomaly_map is not None:
            arrays[f"map{n}"] = _shrink(prediction.anomaly_map).astype(np.float32)
    return arrays, shown


def _shrink(array: np.ndarray, side: int = 256) -> np.ndarray:
    step = max(1, int(np.ceil(max(array.shape[:2]) / side)))
    return array[::step, ::step]


def interleaved_speed(
    detectors: dict[str, Scorer], images: Sequence[Any], repeats: int = 20, batch_size: int = 1
) -> dict[str, dict[str, Any]]:
    """Per detector: median ms per image of ``predict`` on `batch_size` images already at its
    input size, and of its backbone's forward on the same tensor (None without `backbone_`).
    All calls are interleaved in one loop, so every detector and backbone sees the same machine
    load: on a shared machine only ratios within one run are meaningful."""
    count = min(len(images), repeats * batch_size)
    loaded = [to_rgb_array(image) for image in images[:count]]
    batches = [loaded[i : i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]
    inputs = {}
    for name, detector in detectors.items():
        tensors = [resize_to_tensor(batch, detector.image_size) for batch in batches]
        arrays = [list((t.permute(0, 2, 3, 1) * 255).round().byte().numpy()) for t in tensors]
        inputs[name] = list(zip(arrays, tensors, strict=True))
    times: dict[str, dict[str, list[float]]] = {n: {"predict": [], "backbone": []} for n in inputs}

    def run(name: str, arrays: list[np.ndarray], tensor: torch.Tensor, record: bool) -> None:
        detector = detectors[name]
        backbone = getattr(detector, "backbone_", None)
        if backbone is not None:
            started = time.perf_counter()
            backbone(tensor)
            if record:
                times[name]["backbone"].append(1000 * (time.perf_counter() - started) / len(arrays))
        started = time.perf_counter()
        detector.predict(arrays)
        if record:
            times[name]["predict"].append(1000 * (time.perf_counter() - started) / len(arrays))

    with torch.inference_mode():
        for step in range(len(batches) + min(5, len(batches))):
            for name in inputs:
                arrays, tensor = inputs[name][step % len(batches)]
                run(name, arrays, tensor, record=step >= min(5, len(batches)))
    results = {}
    for name, measured in times.items():
        predict = statistics.median(measured["predict"])
        forward = statistics.median(measured["backbone"]) if measured["backbone"] else None
        results[name] = {
            "predict_ms": predict,
            "backbone_ms": forward,
            "predict_backbone_ratio": predict / forward if forward else None,
            "repeats": len(measured["predict"]),
            "batch_size": batch_size,
        }
    return results


def batch1_speed(detector: Scorer, images: Sequence[Any], repeats: int = 20) -> dict[str, Any]:
    """`interleaved_speed` of one detector at batch 1: predict_ms_batch1, backbone_ms_batch1,
    predict_backbone_ratio and speed_repeats."""
    speed = interleaved_speed({"model": detector}, images, repeats, 1)["model"]
    return {
        "predict_ms_batch1": speed["predict_ms"],
        "backbone_ms_batch1": speed["backbone_ms"],
        "predict_backbone_ratio": speed["predict_backbone_ratio"],
        "speed_repeats": speed["repeats"],
    }


def _worker(job_text: str) -> None:
    progress.enable(sys.stderr.isatty())
    job = json.loads(job_text)
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    spec = ModelSpec(**job["spec"])
    detail = Path(job["detail"])
    try:
        row = benchmark_row(
            spec, Path(job["dataset"]), detail, job["speed_repeats"], job["examples"]
        )
    except Exception as error:  # the row reports it; the benchmark goes on
        row = {
            "model": spec.label,
            "model_name": spec.model,
            "params": spec.params,
            "dataset": Path(job["dataset"]).name,
            "error": f"{type(error).__name__}: {' '.join(str(error).split())}",
        }
    detail.with_suffix(".json").write_text(json.dumps(row, indent=2, default=float))


# ---- report ----------------------------------------------------------------------------------
def _figure_uri(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "n/a" if value is None else fmt.format(value)


def _curves(rows: list[dict[str, Any]], details: dict[int, Any], kind: str) -> str | None:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    figure, axes = plt.subplots(figsize=(4.5, 4))
    drawn = False
    for index, row in enumerate(rows):
        arrays = details.get(index)
        if arrays is None:
            continue
        if kind == "roc":
            fpr, tpr, _ = roc_curve(arrays["labels"], arrays["scores"])
            label = f"{row['model']} ({row['image_auroc']:.3f})"
        elif "pro" in arrays:
            fpr, tpr = arrays["pro_fpr"], arrays["pro"]
            label = f"{row['model']} ({row['aupro']:.3f})"
        else:
            continue
        axes.plot(fpr, tpr, label=label)
        drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axes.set_xlabel("false-positive rate" + (" (pixels)" if kind == "pro" else ""))
    axes.set_ylabel("true-positive rate" if kind == "roc" else "per-region overlap")
    axes.set_title("image ROC" if kind == "roc" else "PRO curve (FPR <= 0.3)")
    axes.legend(fontsize=8, loc="lower right")
    axes.grid(alpha=0.3)
    return _figure_uri(figure)


def _examples(row: dict[str, Any], arrays: Any) -> str | None:
    import matplotlib.pyplot as plt

    shown = row.get("examples") or []
    if not shown:
        return None
    figure, axes = plt.subplots(len(shown), 3, figsize=(6.6, 2.3 * len(shown)), squeeze=False)
    for n, example in enumerate(shown):
        image = _shrink(to_rgb_array(example["path"]))
        anomalous = bool(example["label"])
        heat = arrays.get(f"map{n}") if arrays is not None else None
        panels = [image, None, None]
        if heat is not None:
            heat = _resize_nearest(heat, image.shape[:2])
            panels[1] = overlay(image, heat, row.get("pixel_threshold") or 1.0)
        path = Path(example["path"])
        mask_path = example["mask_path"] and Path(example["mask_path"])
        panels[2] = load_sample_mask(
            Sample(path, int(anomalous), example["defect"], mask_path), image.shape[:2]
        )
        kind = "worst-scored normal" if not anomalous else "best-hidden anomalous"
        titles = [
            f"{kind}\n{example['defect']}/{path.name}",
            f"score {example['score']:.4g}",
            "ground truth",
        ]
        for axis, panel, title in zip(axes[n], panels, titles, strict=True):
            axis.axis("off")
            axis.set_title(title, fontsize=7)
            if panel is None:
                axis.text(0.5, 0.5, "n/a", ha="center", va="center", transform=axis.transAxes)
            else:
                axis.imshow(panel, cmap="gray", vmin=0, vmax=1) if panel.ndim == 2 else axis.imshow(
                    panel
                )
    figure.tight_layout()
    return _figure_uri(figure)


def _resize_nearest(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = (np.arange(shape[0]) * array.shape[0] // shape[0]).clip(0, array.shape[0] - 1)
    cols = (np.arange(shape[1]) * array.shape[1] // shape[1]).clip(0, array.shape[1] - 1)
    return array[rows][:, cols]


def write_report(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> Path:
    """One self-contained HTML file (figures inline as PNG): metrics table, ROC and PRO curves,
    and the worst-scored normal / best-hidden anomalous images of every row."""
    import matplotlib

    matplotlib.use("Agg")
    path = Path(path)
    details: dict[int, Any] = {}
    for index, row in enumerate(rows):
        npz = path.parent / "rows" / f"{row['dataset']}__{row['model']}.npz"
        if "error" not in row and npz.is_file():
            details[index] = dict(np.load(npz))
    header = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in TABLE_COLUMNS)
    body = "".join(
        f"<tr><td>{html.escape(row['dataset'])}</td><td>{html.escape(row['model'])}</td>"
        + (
            f'<td colspan="{len(TABLE_COLUMNS)}" class="error">{html.escape(row["error"])}</td>'
            if "error" in row
            else "".join(f"<td>{_cell(row, key, fmt)}</td>" for key, _, fmt in TABLE_COLUMNS)
        )
        + "</tr>"
        for row in rows
    )
    sections = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        indices = [i for i, row in enumerate(rows) if row["dataset"] == dataset and i in details]
        subset = [rows[i] for i in indices]
        sub_details = {n: details[i] for n, i in enumerate(indices)}
        parts = [f"<h2>{html.escape(dataset)}</h2><div>"]
        for kind in ("roc", "pro"):
            uri = _curves(subset, sub_details, kind)
            if uri:
                parts.append(f'<img src="{uri}" alt="{kind} curves">')
        parts.append("</div>")
        for n, row in enumerate(subset):
            uri = _examples(row, sub_details.get(n))
            if uri:
                parts.append(
                    f"<h3>{html.escape(row['model'])}: worst-scored normal and best-hidden "
                    f'anomalous test images</h3><img src="{uri}" alt="examples">'
                )
        sections.append("".join(parts))
    params = "".join(
        f"<li><b>{html.escape(row['model'])}</b> on {html.escape(row['dataset'])}: "
        f"<code>{html.escape(json.dumps(row.get('params', {})))}</code></li>"
        for row in rows
    )
    body = f"""<p>{html.escape(meta.get("date", ""))} &middot;
{html.escape(meta.get("machine", ""))} &middot; torch {html.escape(meta.get("torch", ""))}</p>
<p><code>{html.escape(meta.get("command", ""))}</code></p>
<table><tr><th>dataset</th><th>model</th>{header}</tr>{body}</table>
<p>predict ms/image: whole test split at the model's batch size, image decoding included.
batch-1: median of single-image predict calls against the backbone's own forward pass,
interleaved. Peak RSS: the row's own process (baseline after imports in results.json).
Model MB: fitted state without backbone weights.</p>
{"".join(sections)}<h2>Parameters</h2><ul>{params}</ul>"""
    style = (
        "table{font-size:.9em}th,td{padding:.2em .5em;text-align:right}"
        "td:nth-child(-n+2){text-align:left}td.error{color:#b00;text-align:left}"
        "img{margin:.3em;vertical-align:top}"
    )
    return write_page(path, "anomalens benchmark", body, style)


if __name__ == "__main__":
    _worker(sys.argv[1])
