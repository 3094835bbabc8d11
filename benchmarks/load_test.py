"""Load test of `anomalens serve` over loopback: concurrent clients, a fixed number of requests.

    .venv/bin/python benchmarks/load_test.py [--model MODEL] [--clients 8] [--requests 400]
        [--batch-wait-ms 0 --batch-wait-ms 2] [--max-batch 16] [--rounds 1]

Without `--model` it fits PatchCore with its defaults (256 px) on a synthetic category and serves
its ONNX export and its torch model in turn. Each run starts `anomalens serve` on 127.0.0.1 (a
free port) with one `--batch-wait-ms` (0: micro-batching off), lets `--clients` clients POST one
256x256 PNG each to /v1/predict until `--requests` have been sent, and reports throughput,
p50/p90/p95/p99 latency, errors, and the server's predict calls and mean batch (from /v1/model).
Every model is served with every wait in turn, `--rounds` times over, so that batching on and off
are compared within one run on the same machine load. Bounded: every run stops after
`--time-limit` seconds whatever happens, and nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

import anomalens
from anomalens.data.io import load_image
from anomalens.data.mvtec import test_samples, training_images
from anomalens.data.synthetic import make_category
from anomalens.deploy.export import export_onnx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(
    model: Path, port: int, workers: int, batch_wait_ms: float, max_batch: int
) -> subprocess.Popen:
    source = str(Path(anomalens.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from anomalens.cli import main; main()", "serve", str(model)]
    command += ["--host", HOST, "--port", str(port), "--workers", str(workers)]
    command += ["--batch-wait-ms", str(batch_wait_ms), "--max-batch", str(max_batch)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"anomalens serve exited with status {process.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise RuntimeError("anomalens serve did not come up within 180 s")


async def load(url: str, images: list[bytes], clients: int, requests: int, limit_s: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests:
            index = sent
            sent += 1
            files = {"file": (f"{index}.png", images[index % len(images)], "image/png")}
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/predict", files=files)
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                errors.append(repr(error))
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(client(http) for _ in range(clients))), timeout=limit_s
            )
        except TimeoutError:
            errors.append(f"stopped at the {limit_s} s time limit")
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": elapsed,
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered),
        "p90_ms": 1000 * ordered[min(len(ordered) - 1, int(0.90 * len(ordered)))],
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1000 * ordered[-1],
    }


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="model file(s) to serve")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        action="append",
        help="serve with this micro-batching wait (repeat; default: 0 and 2, off and on)",
    )
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="times to repeat the runs")
    parser.add_argument("--time-limit", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = make_category(scratch, "brick", n_train=30, image_size=256)
        models = args.model
        if not models:
            detector = anomalens.create("patchcore").fit(training_images(root))
            models = [
                export_onnx(detector, Path(scratch) / "model.onnx"),
                detector.save(Path(scratch) / "model.safetensors"),
            ]
        images = [png(load_image(s.path)) for s in test_samples(root)]
        report = []
        runs = [
            (model, wait)
            for _ in range(args.rounds)
            for model in models
            for wait in args.batch_wait_ms or [0.0, 2.0]
        ]
        for model, wait in runs:
            port = free_port()
            server = start_server(model, port, args.workers, wait, args.max_batch)
            try:
                url = f"http://{HOST}:{port}"
                asyncio.run(load(url, images[:2], 2, 4, 60))  # warm-up, not counted
                before = httpx.get(f"{url}/v1/model", timeout=60).json()["batching"]
                result = asyncio.run(
                    load(url, images, args.clients, args.requests, args.time_limit)
                )
                after = httpx.get(f"{url}/v1/model", timeout=60).json()["batching"]
            finally:
                server.terminate()
                server.wait(timeout=30)
            calls = after["predict_calls"] - before["predict_calls"]
            result.update(
                model=model.suffix,
                batch_wait_ms=wait,
                predict_calls=calls,
                mean_batch=(after["images_scored"] - before["images_scored"]) / max(calls, 1),
                max_batch=args.max_batch,
                workers=args.workers,
                image_px=256,
                load=os.getloadavg(),
            )
            report.append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
