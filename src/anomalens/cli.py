"""The `anomalens` command line: a thin shell over the library.

Every user mistake (missing folder, unreadable image, bad model file, unknown option value) prints
one line on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import anomalens
from anomalens import progress
from anomalens.components.tiling import check_tiling
from anomalens.core.detector import Detector
from anomalens.core.model_file import read_config
from anomalens.core.scorer import Scorer
from anomalens.data.inputs import collect_inputs
from anomalens.data.io import to_rgb_array
from anomalens.data.mvtec import training_images
from anomalens.data.synthetic import TEXTURES, make_dataset
from anomalens.deploy.batch import FORMATS as BATCH_FORMATS
from anomalens.deploy.batch import BatchSummary, inspect_images
from anomalens.deploy.export import FORMATS, export_onnx
from anomalens.deploy.ray_engine import inspect_images_ray
from anomalens.deploy.ray_fit import fit_ray
from anomalens.errors import AnomalensError, DataError, ParameterError, check_choice
from anomalens.evaluation.benchmark import DEFAULT_MODELS, parse_models, run_benchmark
from anomalens.evaluation.evaluator import Evaluation
from anomalens.evaluation.evaluator import evaluate as evaluate_model
from anomalens.evaluation.report import write_page
from anomalens.evaluation.selection import auto_fit
from anomalens.evaluation.viz import ResultRow, overlay, save_png, write_results_page
from anomalens.models.tiled import tiled
from anomalens.outputs import check_writable_file, check_writable_folder

app = typer.Typer(
    help="Unsupervised visual anomaly detection: fit on normal images, find and localise defects.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True, soft_wrap=True)
"""Errors and warnings, one line each however long (a path is never wrapped in two)."""

RayAddress = Annotated[
    str | None,
    typer.Option(
        help="With --engine ray: the Ray cluster, auto or HOST:PORT (default: start a local "
        "Ray instance sized to this machine)."
    ),
]
ComputeThreads = Annotated[
    int | None,
    typer.Option(
        help="Compute threads: torch's, or ONNX Runtime's for an .onnx model (default: one per "
        "core)."
    ),
]

ENGINES = ("local", "ray")
METRIC_KEYS = ("image_auroc", "image_aupr", "image_f1_max", "pixel_auroc", "aupro")
DEMO_IMAGE_SIZE = 128
"""The demo images are 128 px: no model needs a larger input for them."""


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AnomalensError(f"--param expects KEY=VALUE, got {pair!r}")
        try:
            params[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            params[key.replace("-", "_")] = value
    return params


@app.command()
def fit(
    data: Annotated[
        Path,
        typer.Argument(
            help="MVTec category folder (uses train/good) or a folder of normal images."
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Model file to write (.safetensors).")
    ],
    model: Annotated[
        str | None, typer.Option(help="Detector name; see `anomalens models`. [default: patchcore]")
    ] = None,
    backbone: Annotated[str | None, typer.Option(help="timm backbone name.")] = None,
    weights: Annotated[
        str | None, typer.Option(help="Backbone weights: auto, random, or a local state-dict file.")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size in pixels.")] = None,
    resize: Annotated[
        str | None,
        typer.Option(
            help="How images reach the model: squash, keep (aspect ratio) or letterbox; "
            "patchcore's default, auto, keeps the aspect of training images of one elongated shape."
        ),
    ] = None,
    roi: Annotated[
        Path | None,
        typer.Option(help="Region-of-interest mask image (white = inspect), stored in the model."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="Any detector parameter, KEY=VALUE (repeatable).")
    ] = None,
    tile: Annotated[
        int | None,
        typer.Option(help="Cut images into SIZE-pixel tiles (learn and score at full detail)."),
    ] = None,
    tile_overlap: Annotated[int, typer.Option(help="Overlap of adjacent tiles, pixels.")] = 64,
    tile_stitch: Annotated[
        str, typer.Option(help="Combine overlapping tile maps by max or mean.")
    ] = "max",
    auto: Annotated[
        bool,
        typer.Option(
            "--auto",
            help="Choose method, backbone, layers, input size and resize mode by how well each "
            "candidate finds synthetic anomalies in held-out normal images.",
        ),
    ] = False,
    time_budget: Annotated[
        float, typer.Option(help="With --auto: seconds for the whole search and final fit.")
    ] = 600.0,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict/--no-strict",
            help="Stop at the first unreadable training image instead of skipping it.",
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="Where to extract features: local (this process) or ray (PatchCore only: each "
            "shard of shard_images images on a Ray actor, which returns its shard coreset)."
        ),
    ] = "local",
    address: RayAddress = None,
    actors: Annotated[
        int | None,
        typer.Option(
            help="With --engine ray: feature actors, sharing the cluster's CPUs equally "
            "(default: one per node)."
        ),
    ] = None,
) -> None:
    """Fit a detector on normal images and save it."""
    check_writable_file(output, "model file")
    check_choice("--engine", engine, ENGINES)
    if engine != "ray" and (address is not None or actors is not None):
        raise AnomalensError("--address and --actors need --engine ray")
    if engine == "ray" and auto:
        raise AnomalensError("--auto fits with the local engine; leave out --engine ray")
    if auto:
        given = {
            "--model": model,
            "--backbone": backbone,
            "--weights": weights,
            "--image-size": image_size,
            "--param": param,
            "--tile": tile,
        }
        clash = next((option for option, value in given.items() if value), None)
        if clash:
            raise AnomalensError(f"--auto chooses the detector and its settings; leave out {clash}")
        _auto_fit(data, output, time_budget, 0 if seed is None else seed, strict)
        return
    model = model or "patchcore"
    params = _parse_params(param or [])
    for key, value in (
        ("backbone", backbone),
        ("weights", weights),
        ("image_size", image_size),
        ("resize", resize),
        ("seed", seed),
    ):
        if value is not None:
            params[key] = value
    if tile is None:
        detector = anomalens.create(model, **params)
    else:
        check_tiling(tile, tile_overlap, tile_stitch)
        detector = tiled(model, tile, tile_overlap, tile_stitch, **params)
        model = f"{model} on {tile}-pixel tiles"
    if engine == "ray" and detector.name != "patchcore":
        raise AnomalensError(
            f"--engine ray fits patchcore only, not {model}; fit it with --engine local"
        )
    images = training_images(data)
    console.print(f"fitting [bold]{model}[/] on {len(images)} normal images from {data}")
    if engine == "ray":
        fit_ray(detector, images, roi=roi, strict=strict, address=address, actors=actors)
    else:
        detector.fit(images, roi=roi, strict=strict)
    detector.save(output)
    skipped = _report_skipped(detector.skipped_images_)
    console.print(
        f"image threshold {detector.image_threshold_:.4g}, thresholds set on "
        f"{detector.n_validation_images_} held-out normal images; {skipped}saved {output}"
    )


@app.command()
def update(
    model_file: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Model file from `anomalens fit`.")
    ],
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="NEW_NORMALS...",
            help="New normal images: folders (an MVTec category uses train/good) or image files.",
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Updated model file to write (.safetensors).")
    ],
    old: Annotated[
        Path | None,
        typer.Option(
            help="The normal images the model was fitted on (a folder; an MVTec category uses "
            "train/good): a held-out part of them sets the thresholds with the held-out new "
            "images. Without it, the held-out new images alone set them."
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict/--no-strict",
            help="Stop at the first unreadable image instead of skipping it.",
        ),
    ] = False,
) -> None:
    """Learn from more normal images without refitting (partial_fit), set the thresholds again
    and save the updated model. Supported by patchcore, padim, gaussian and knn."""
    check_writable_file(output, "model file")
    for item in [*inputs, *([] if old is None else [old])]:
        if not item.exists():
            raise DataError(f"not found: {item}")
    detector = anomalens.load(model_file)
    if not isinstance(detector, Detector):
        raise AnomalensError(f"{model_file} is an ONNX export; update its .safetensors model file")
    images = [
        path for item in inputs for path in (training_images(item) if item.is_dir() else [item])
    ]
    old_images = None if old is None else training_images(old)
    console.print(f"updating [bold]{detector.name}[/] with {len(images)} new normal images")
    skipped_before = len(detector.skipped_images_)
    detector.partial_fit(images, old_images=old_images, strict=strict)
    detector.save(output)
    skipped = _report_skipped(detector.skipped_images_[skipped_before:])
    record = detector.updates_[-1]
    pixel = detector.pixel_threshold_
    console.print(
        f"update {len(detector.updates_)}: image threshold {detector.image_threshold_:.4g}"
        + ("" if pixel is None else f", pixel threshold {pixel:.4g}")
        + f", set on {record['held_out_new']} held-out new and {record['held_out_old']} old "
        f"normal images; {detector.n_train_images_} images learned in all; {skipped}"
        f"saved {output}"
    )


def _auto_fit(data: Path, output: Path, time_budget: float, seed: int, strict: bool) -> None:

    images = training_images(data)
    console.print(
        f"choosing a detector for {len(images)} normal images from {data} "
        f"(time budget {time_budget:.0f} s)"
    )
    detector, _ = auto_fit(images, time_budget_s=time_budget, seed=seed, strict=strict)
    console.print(_selection_table(detector.selection_))
    detector.save(output)
    selection = detector.selection_
    skipped = _report_skipped(detector.skipped_images_)
    console.print(
        f"chose [bold]{selection['chosen']}[/] in {selection['seconds']:.0f} s; "
        f"image threshold {detector.image_threshold_:.4g}; {skipped}saved {output}"
    )


def _report_skipped(skipped: list[dict[str, str]]) -> str:
    """Print one line on stderr per unreadable training image left out; return the count for
    the summary line ("" when none)."""
    for item in skipped:
        errors.print(
            f"skipped unreadable image: {item['path']} ({item['reason']})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    return f"skipped {len(skipped)} unreadable image(s); " if skipped else ""


def _selection_table(selection: dict[str, Any]) -> Table:
    table = Table(title="--auto candidates (score: mean of synthetic image and pixel AUROC)")
    table.add_column("candidate")
    for header in ("synth. image AUROC", "synth. pixel AUROC", "score", "seconds"):
        table.add_column(header, justify="right")
    table.add_column("status")
    for row in selection["candidates"]:
        values = [row[key] for key in ("synthetic_image_auroc", "synthetic_pixel_auroc", "score")]
        cells = ["n/a" if v is None else f"{v:.3f}" for v in values]
        cells.append("" if row["seconds"] is None else f"{row['seconds']:.1f}")
        status = "chosen" if row["chosen"] else row["status"]
        table.add_row(row["candidate"], *cells, status, style="bold" if row["chosen"] else None)
    return table


@app.command()
def predict(
    model_file: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Model file from `anomalens fit` or `export`.")
    ],
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT...",
            help="Images, folders of images, or @list.txt (a text file of paths, one per line).",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the results file and heatmap overlays.")
    ],
    overlays: Annotated[bool, typer.Option(help="Write one heatmap overlay PNG per image.")] = True,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Read folders with all their subfolders.")
    ] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="Results file: csv (results.csv) or parquet.")
    ] = "csv",
    resume: Annotated[
        bool,
        typer.Option(help="Keep the results already in --out and score only the other images."),
    ] = False,
    min_region_area: Annotated[
        int, typer.Option(help="Defect regions smaller than this many pixels are dropped.")
    ] = 0,
    threads: ComputeThreads = None,
    engine: Annotated[
        str,
        typer.Option(help="Where to score: local (this process) or ray (a pool of Ray actors)."),
    ] = "local",
    address: RayAddress = None,
    actors: Annotated[
        int | None,
        typer.Option(
            help="With --engine ray: scoring actors, each loading the model once and sharing the "
            "cluster's CPUs equally (default: one per node)."
        ),
    ] = None,
) -> None:
    """Score images; stream one results row per image (path, relative_path, score, label,
    regions, overlay, error) and write heatmap overlays under out/overlays/<relative path>."""
    check_choice("--format", fmt, BATCH_FORMATS)
    check_choice("--engine", engine, ENGINES)
    if engine == "ray" and threads is not None:
        raise AnomalensError("--threads is for the local engine; each Ray actor uses its CPUs")
    if engine != "ray" and (address is not None or actors is not None):
        raise AnomalensError("--address and --actors need --engine ray")
    check_writable_folder(out, "--out folder")
    run: Callable[..., BatchSummary]
    if engine == "ray":
        run = partial(inspect_images_ray, model_file, address=address, actors=actors)
    else:
        _set_threads(threads)
        run = partial(inspect_images, anomalens.load(model_file, threads))
    collected = collect_inputs(inputs, recursive=recursive)
    try:
        summary = run(
            collected,
            out,
            fmt=fmt,
            resume=resume,
            overlays=overlays,
            min_region_area=min_region_area,
        )
    except KeyboardInterrupt:
        errors.print(
            f"interrupted: every row finished so far is kept in {out}; run the same command "
            "with --resume to go on",
            highlight=False,
        )
        raise typer.Exit(130) from None
    kept = f" ({summary.kept} kept from before)" if summary.kept else ""
    console.print(
        f"{summary.scored} images scored{kept}, {summary.anomalous} anomalous; "
        f"results in {summary.results}"
    )
    for path, reason in summary.failed:
        errors.print(f"[red]skipped[/] {escape(str(path))}: {escape(reason)}", highlight=False)
    if summary.failed:
        raise typer.Exit(2)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise AnomalensError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _metrics_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title)
    table.add_column("data")
    for header in ("image AUROC", "image AUPR", "image F1-max", "pixel AUROC", "AUPRO", "ms/image"):
        table.add_column(header, justify="right")
    for name, metrics in rows:
        values = [metrics.get(key) for key in (*METRIC_KEYS, "predict_ms_per_image")]
        table.add_row(name, *("n/a" if v is None else f"{v:.3f}" for v in values))
    return table


def _write_report(evaluation: Evaluation, detector: Scorer, out: Path, title: str) -> Path:
    """Overlays, regions.json (each image's defect regions) and the HTML results page."""
    rows = []
    regions: dict[str, list[dict[str, Any]]] = {}
    for sample, result in zip(evaluation.samples, evaluation.predictions, strict=True):
        image = to_rgb_array(sample.path)
        picture = image
        if result.anomaly_map is not None:
            picture = overlay(
                image,
                result.anomaly_map,
                detector.pixel_threshold_,
                result.mask,
                regions=result.regions,
            )
        name = f"{sample.defect}/{sample.path.name}"
        save_png(picture, out / "overlays" / sample.defect / f"{sample.path.stem}.png")
        rows.append(
            ResultRow(name, result.score, result.label, picture, sample.defect, result.regions)
        )
        regions[name] = [region.to_dict() for region in result.regions]
    page = write_results_page(
        out / "index.html", title, rows, evaluation.metrics, detector.image_threshold_
    )
    (out / "regions.json").write_text(json.dumps(regions, indent=2), encoding="utf-8")
    return page


@app.command()
def evaluate(
    model_file: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Model file from `anomalens fit`.")
    ],
    data: Annotated[
        Path, typer.Argument(help="MVTec-layout category folder with test/ (and ground_truth/).")
    ],
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the metrics as JSON here.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write overlays and an HTML page here.")
    ] = None,
    threads: ComputeThreads = None,
) -> None:
    """Metrics on an MVTec-layout test split (image AUROC/AUPR/F1-max, pixel AUROC, AUPRO)."""
    if json_file is not None:
        check_writable_file(json_file, "--json file")
    if out is not None:
        check_writable_folder(out, "--out folder")
    _set_threads(threads)
    detector = anomalens.load(model_file, threads)
    evaluation = evaluate_model(detector, data)
    console.print(_metrics_table(f"{detector.name} on {data}", [(data.name, evaluation.metrics)]))
    if json_file is not None:
        json_file.write_text(json.dumps(evaluation.metrics, indent=2), encoding="utf-8")
    if out is not None:
        page = _write_report(evaluation, detector, out, f"{detector.name} on {data.name}")
        console.print(f"report: {page}")


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the demo data and results.")
    ] = Path("demo-output"),
    model: Annotated[str, typer.Option(help="Detector name.")] = "patchcore",
) -> None:
    """Build the embedded synthetic dataset, fit on its normal images, evaluate, write a report."""
    check_writable_folder(out, "--out folder")

    data = out / "data"
    categories = [data / texture for texture in TEXTURES]
    if all(category.is_dir() for category in categories):
        console.print(f"using the demo dataset already in {data}")
    else:
        console.print("building the demo dataset (scikit-image textures + synthetic defects)")
        categories = make_dataset(data)
    results: list[tuple[str, dict[str, Any]]] = []
    pages = []
    for category in categories:
        images = training_images(category)
        detector = anomalens.create(model)
        detector.set_params(image_size=min(detector.image_size, DEMO_IMAGE_SIZE))
        console.print(f"[bold]{category.name}[/]: fitting {model} on {len(images)} normal images")
        detector.fit(images)
        detector.save(out / "models" / f"{category.name}.safetensors")
        evaluation = evaluate_model(detector, category)
        results.append((category.name, evaluation.metrics))
        pages.append(
            _write_report(evaluation, detector, out / category.name, f"{model} on {category.name}")
        )
    console.print(_metrics_table(f"{model} on the synthetic demo data", results))
    links = "".join(f'<li><a href="{p.relative_to(out)}">{p.parent.name}</a></li>' for p in pages)
    index = write_page(out / "index.html", "anomalens demo", f"<ul>{links}</ul>")
    console.print(f"heatmap overlays and results pages: [bold]{index.resolve()}[/]")


@app.command()
def benchmark(
    data: Annotated[
        list[Path],
        typer.Option("--data", help="MVTec-layout dataset folder(s): --data DIR [DIR...]."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for results.json and report.html.")],
    more_data: Annotated[list[Path] | None, typer.Argument(hidden=True)] = None,
    models: Annotated[
        str,
        typer.Option(help="Comma-separated model names; LABEL=MODEL runs one under a label."),
    ] = DEFAULT_MODELS,
    param: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE for every model, or LABEL.KEY=VALUE for one (repeatable)."),
    ] = None,
    speed_repeats: Annotated[
        int, typer.Option(help="Single-image predict timings per row (0: skip).")
    ] = 20,
    examples: Annotated[
        int, typer.Option(help="Worst normal / best-hidden anomalous images shown per row.")
    ] = 3,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads per row (default: torch's choice).")
    ] = None,
) -> None:
    """Fit and evaluate models on datasets, each row in a fresh process; write a report."""
    specs = parse_models(models, _parse_params(param or []))
    check_writable_folder(out, "--out folder")
    datasets = [*data, *(more_data or [])]
    console.print(f"benchmarking {len(specs)} model(s) on {len(datasets)} dataset(s)")
    rows = run_benchmark(
        specs,
        datasets,
        out,
        speed_repeats=speed_repeats,
        examples=examples,
        threads=threads,
        command=" ".join(["anomalens", *sys.argv[1:]]),
        on_row=lambda row: console.print(
            f"{row['dataset']} / {row['model']}: "
            + (row.get("error") or f"image AUROC {row['image_auroc']:.4f}")
        ),
    )
    console.print(_metrics_table("benchmark", [(f"{r['dataset']} {r['model']}", r) for r in rows]))
    console.print(f"results: {out / 'results.json'}, report: {out / 'report.html'}")
    failed = [row for row in rows if "error" in row]
    if failed:
        raise AnomalensError(f"{len(failed)} benchmark row(s) failed; see {out / 'results.json'}")


@app.command()
def export(
    model_file: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Model file from `anomalens fit`.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write (.onnx).")],
    fmt: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    int8: Annotated[
        bool,
        typer.Option(
            "--int8", help="Quantise the feature extractor to int8 (needs --calibration)."
        ),
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="With --int8: normal images to calibrate on and check with, e.g. the training "
            "folder (an MVTec category uses train/good).",
        ),
    ] = None,
    float_search: Annotated[
        bool,
        typer.Option(
            "--float-search",
            help="With --int8: keep PatchCore's memory-bank search float (by default it is an "
            "int8 product too, about 2x faster).",
        ),
    ] = False,
) -> None:
    """Export a model as one ONNX graph (pixels -> score, anomaly map) for ONNX Runtime."""
    if fmt not in FORMATS:
        raise AnomalensError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    if int8 and calibration is None:
        raise AnomalensError(
            "--int8 needs --calibration FOLDER: normal images, e.g. the model's training folder"
        )
    if (calibration is not None or float_search) and not int8:
        option = "--calibration" if calibration is not None else "--float-search"
        raise AnomalensError(f"{option} is only used with --int8")
    check_writable_file(output, "export file")
    images = None if calibration is None else training_images(calibration)
    detector = anomalens.load(model_file)
    path = export_onnx(
        detector, output, int8=int8, calibration=images, int8_search=not float_search
    )
    checked = "checked against torch"
    if int8:
        record = read_config(path)["int8"]
        agreement = record["agreement"]
        search = " and memory-bank search" if record.get("search", "float") != "float" else ""
        checked = (
            f"features{search} int8, checked against the float model on "
            f"{record['check_images']} held-out images and their synthetic defects: "
            f"Spearman {agreement['spearman']:.3f}, "
            f"{agreement['verdicts']:.1%} identical verdicts"
        )
        if record.get("absorbed_feature_error"):
            error = record["absorbed_feature_error"]["relative_error"]
            checked += f", the features' rounding ({error:.1%}) absorbed into its statistics"
    console.print(
        f"exported {detector.name} to {path} ({path.stat().st_size / 1e6:.1f} MB), {checked}; "
        f"use it with `anomalens predict {path} ...` or anomalens.OnnxModel"
    )


@app.command()
def serve(
    model_file: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Model file (.safetensors or .onnx).")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes, each with the model.")] = 1,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body, in MB.")] = 20.0,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="Micro-batching: score the requests waiting and those arriving up to this many "
            "ms after the first of them with one predict call; 0 turns it off (one request at a "
            "time).",
        ),
    ] = 2.0,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images in one micro-batch.")] = 16,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Keep every inspection, review and model version here (a station); the "
            "database is SQLite in this folder unless --db is given.",
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(help="Database URL instead of SQLite, e.g. postgresql://user@host/db."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Require this token (role admin) on every route but /healthz; or set "
            "ANOMALENS_TOKEN.",
            show_default=False,
        ),
    ] = None,
    tokens_file: Annotated[
        Path | None,
        typer.Option(help="File of tokens, one per line: NAME ROLE TOKEN (inspect/review/admin)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Allow a non-loopback --host without any token.")
    ] = False,
    drift_window: Annotated[
        int, typer.Option(min=10, help="Drift watch: compare the latest N inspections' scores.")
    ] = 200,
    drift_alpha: Annotated[
        float, typer.Option(min=0, max=1, help="Drift watch: warn below this p-value.")
    ] = 0.01,
    drift_reference: Annotated[
        str,
        typer.Option(
            help="Drift watch reference: 'baseline' (the first --drift-window images a version "
            "called normal here) or 'validation' (its held-out normal images' scores)."
        ),
    ] = "baseline",
) -> None:
    """Serve a model over HTTP: POST /v1/predict, GET /v1/model, /healthz, /docs, web page at /;
    with --data-dir the station's history, reviews, model versions, drift watch and /metrics."""
    # FastAPI and uvicorn are needed by this command only: imported on first use
    from anomalens.deploy.serve import serve as run_service

    run_service(
        model_file,
        host=host,
        port=port,
        workers=workers,
        max_upload_bytes=round(max_upload_mb * 1_000_000),
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
        data_dir=data_dir,
        db=db,
        token=token,
        tokens_file=tokens_file,
        insecure=insecure,
        drift_window=drift_window,
        drift_alpha=drift_alpha,
        drift_reference=drift_reference,
    )


reviews_app = typer.Typer(help="The station's reviews.", no_args_is_help=True)
app.add_typer(reviews_app, name="reviews")


@reviews_app.command("export")
def reviews_export(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to write (MVTec layout).")],
    data_dir: Annotated[Path, typer.Option(help="The station's data directory.")],
    db: Annotated[
        str | None, typer.Option(help="The station's database URL, if not SQLite.")
    ] = None,
) -> None:
    """Write the reviewed images as an MVTec-layout test set: DIR/test/good (false alarms and
    images marked normal) and DIR/test/defect (confirmed defects), for evaluate and calibrate."""
    from anomalens.deploy.store import InspectionStore

    if not (data_dir / "models").is_dir() and db is None:
        raise ParameterError(f"{data_dir} is not a station's data directory (no models/ folder)")
    store = InspectionStore(data_dir, db)
    try:
        counts = store.export_reviews(folder)
    finally:
        store.close()
    console.print(
        f"wrote {counts['good']} normal and {counts['defect']} defect images to {folder / 'test'}"
    )


@app.command()
def info(model_file: Annotated[Path, typer.Argument(metavar="MODEL")]) -> None:
    """Print a model file's (or ONNX export's) configuration: model, parameters, thresholds."""
    config = read_config(model_file)
    console.print_json(json.dumps(config))
    selection = config["fitted"].get("selection")
    if selection:
        console.print(_selection_table(selection))
        console.print(f"chosen by --auto: [bold]{selection['chosen']}[/]")


@app.command()
def models() -> None:
    """List the available detectors."""
    for name in anomalens.list_models():
        console.print(name)


def main() -> None:
    """Console-script entry point: one-line errors, exit status 2 for bad input."""
    progress.enable(sys.stderr.isatty())
    try:
        app()
    except AnomalensError as error:
        errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
