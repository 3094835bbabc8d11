"""Load test of the inspection station (issue 15): `anomalens serve` with storage off, on SQLite and
on PostgreSQL, interleaved in one run, and a check that every answered request is stored once.

    PYTHONPATH=src .venv/bin/python benchmarks/station_load.py [--model MODEL] [--clients 8]
        [--requests 400] [--turn 50] [--json OUT]

Without `--model` it fits PatchCore with its defaults (256 px) on a synthetic category and serves
its `.safetensors` file (what a station serves: an ONNX export cannot learn from reviews). It
starts a throwaway PostgreSQL server (`tests/pg_server.py`: initdb in a temporary folder, the
default durability settings, on 127.0.0.1), then three `anomalens serve MODEL` processes (1
worker, default micro-batching, each on a free loopback port): with no store, with `--data-dir`
(SQLite) and with `--data-dir --db` (PostgreSQL). Each gets 4 warm-up requests (not counted).

The load: `--clients` concurrent clients POST one 256x256 PNG each to /v1/predict, `--requests`
per server in all. The servers take turns, `--turn` requests at a time (the order rotated every
turn), so that the three share the machine's load as it drifts (on a shared machine it moves
throughput by tens of per cent within minutes); an idle server costs nothing. Every request's
image is different (seeded noise on the test images), as a camera's would be, so that the store
writes every image and heatmap.

Reported per server: throughput (its requests / the time its turns took), p50/p90/p99 latency,
errors, throughput against storage off (overall and the median of the turn-by-turn ratios), and
for the stores the exactly-once check, made while the servers still run (an answered request is
committed): the answered inspection ids are distinct, each is in the store under its request's
file name, every request's file name is there once, the store holds as many inspections as
requests were answered, and each stored inspection has its image file. Exits non-zero when any
request failed or the check did not hold. Bounded: every turn stops after `--time-limit` seconds,
and nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/pg_server.py: the throwaway PostgreSQL server

import anomalens  # noqa: E402
from anomalens.data.io import load_image  # noqa: E402
from anomalens.data.mvtec import test_samples, training_images  # noqa: E402
from anomalens.data.synthetic import make_category  # noqa: E402
from anomalens.deploy.store import Inspection, InspectionStore  # noqa: E402
from tests.pg_server import PostgresServer, free_port  # noqa: E402

HOST = "127.0.0.1"
WARMUP = 4
STORAGES = ("off", "sqlite", "postgresql")


def start_server(model: Path, port: int, store_args: list[str]) -> subprocess.Popen:
    source = str(Path(anomalens.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from anomalens.cli import main; main()", "serve", str(model)]
    command += ["--host", HOST, "--port", str(port), *store_args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = process.stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"anomalens serve exited with status {process.returncode}: {error}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise RuntimeError("anomalens serve did not come up within 180 s")


async def load(
    url: str, images: list[bytes], names: list[str], clients: int, limit_s: float
) -> dict:
    """POST images[i] as names[i] from `clients` concurrent clients: the latencies, the errors,
    the (name, inspection id) of every request answered 200, and the seconds it all took."""
    latencies: list[float] = []
    errors: list[str] = []
    answered: list[tuple[str, str | None]] = []
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < len(images):
            index = sent
            sent += 1
            files = {"file": (names[index], images[index], "image/png")}
            started = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/predict", files=files)
                if response.status_code == 200:
                    (result,) = response.json()["results"]
                    answered.append((names[index], result["inspection_id"]))
                else:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                errors.append(repr(error))
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(client(http) for _ in range(clients))), timeout=limit_s
            )
        except TimeoutError:
            errors.append(f"stopped at the {limit_s} s time limit")
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "answered": answered, "seconds": elapsed}


def exactly_once(
    data_dir: Path, db: str | None, answered: list[tuple[str, str | None]]
) -> dict[str, object]:
    """Check the store against the answered requests (see the module's docstring)."""
    store = InspectionStore(data_dir, db, upgrade=False)
    try:
        with store.session() as session:
            rows = session.query(Inspection.id, Inspection.filename, Inspection.image_sha256).all()
        without_file = sum(
            not (store.data_dir / "images" / digest[:2] / digest).is_file() for _, _, digest in rows
        )
    finally:
        store.close()
    stored = {row_id: name for row_id, name, _ in rows}
    names = Counter(name for _, name, _ in rows)
    ids = [inspection_id for _, inspection_id in answered]
    problems = []
    if any(i is None for i in ids):
        problems.append("an answer without an inspection id")
    if len(set(ids)) != len(ids):
        problems.append("two answers with one inspection id")
    absent = [i for name, i in answered if stored.get(i) != name]
    if absent:
        problems.append(f"{len(absent)} answered inspection(s) not in the store under their name")
    twice = [name for name, _ in answered if names[name] != 1]
    if twice:
        problems.append(f"{len(twice)} answered request(s) stored other than once")
    if len(rows) != len(answered):
        problems.append(f"{len(rows)} inspections stored for {len(answered)} answered requests")
    if without_file:
        problems.append(f"{without_file} stored inspection(s) without their image file")
    return {"stored": len(rows), "exactly_once": not problems, "problems": problems}


def unique_images(sources: list[np.ndarray], count: int, seed: int = 0) -> list[bytes]:
    """`count` different PNGs: the source images in turn with seeded noise (+-4 grey levels)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        source = sources[index % len(sources)].astype(np.int16)
        noise = rng.integers(-4, 5, size=source.shape, dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(source + noise, 0, 255).astype(np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


class Station:
    """One `anomalens serve` process under test (no store, SQLite or PostgreSQL) and what its
    clients measured."""

    def __init__(self, model: Path, storage: str, scratch: Path, postgres: PostgresServer):
        self.storage = storage
        self.data_dir: Path | None = None
        self.db: str | None = None
        store_args: list[str] = []
        if storage != "off":
            self.data_dir = scratch / f"data-{storage}"
            store_args = ["--data-dir", str(self.data_dir)]
            if storage == "postgresql":
                self.db = postgres.create_database("station")
                store_args += ["--db", self.db]
        port = free_port()
        self.process = start_server(model, port, store_args)
        self.url = f"http://{HOST}:{port}"
        self.latencies: list[float] = []
        self.seconds = 0.0
        self.errors: list[str] = []
        self.answered: list[tuple[str, str | None]] = []
        self.turns: list[float] = []  # each turn's throughput

    def run(
        self, images: list[bytes], names: list[str], clients: int, limit_s: float, *, count=True
    ) -> None:
        result = asyncio.run(load(self.url, images, names, clients, limit_s))
        self.errors += result["errors"]
        self.answered += result["answered"]  # warm-up included: it is stored too
        if count:
            self.latencies += result["latencies"]
            self.seconds += result["seconds"]
            self.turns.append(len(result["latencies"]) / result["seconds"])

    def report(self, clients: int) -> dict[str, object]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float:
            return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        batching = httpx.get(f"{self.url}/v1/model", timeout=60).json()["batching"]
        report: dict[str, object] = {
            "storage": self.storage,
            "clients": clients,
            "requests": len(ordered),
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
            "seconds": self.seconds,
            "throughput_rps": len(ordered) / self.seconds,
            "p50_ms": 1000 * statistics.median(ordered),
            "p90_ms": quantile(0.90),
            "p99_ms": quantile(0.99),
            "max_ms": 1000 * ordered[-1],
            "turns": len(self.turns),
            "predict_calls": batching["predict_calls"],
            "images_scored": batching["images_scored"],
        }
        if self.data_dir is not None:  # while the server runs: answered = committed
            report.update(exactly_once(self.data_dir, self.db, self.answered))
        return report

    def stop(self) -> dict[str, object]:
        self.process.terminate()
        self.process.wait(timeout=60)
        if self.data_dir is None:
            return {}
        files = [p for p in self.data_dir.rglob("*") if p.is_file()]
        return {
            "data_bytes": sum(p.stat().st_size for p in files),
            "heatmap_files": sum(1 for p in files if p.parent.parent.name == "heatmaps"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model file to serve")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="per server")
    parser.add_argument("--turn", type=int, default=50, help="requests per turn")
    parser.add_argument("--storage", action="append", choices=STORAGES, help="default: all")
    parser.add_argument("--time-limit", type=float, default=600.0, help="per turn, seconds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    storages = args.storage or list(STORAGES)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as folder, PostgresServer.started() as postgres:
        scratch = Path(folder)
        root = make_category(scratch / "category", "brick", n_train=30, image_size=256)
        model = args.model
        if model is None:
            detector = anomalens.create("patchcore").fit(training_images(root))
            model = detector.save(scratch / "model.safetensors")
        sources = [load_image(s.path) for s in test_samples(root)]
        images = unique_images(sources, WARMUP + args.requests)
        stations: dict[str, Station] = {}
        try:
            for storage in storages:
                stations[storage] = Station(model, storage, scratch, postgres)
            for storage, station in stations.items():
                names = [f"{storage}-warm-{i}.png" for i in range(WARMUP)]
                station.run(images[:WARMUP], names, 2, 120, count=False)
            starts = range(WARMUP, WARMUP + args.requests, args.turn)
            for turn, start in enumerate(starts):
                order = storages[turn % len(storages) :] + storages[: turn % len(storages)]
                part = range(start, min(start + args.turn, WARMUP + args.requests))
                for storage in order:
                    names = [f"{storage}-{i:05d}.png" for i in part]
                    batch = images[part.start : part.stop]
                    stations[storage].run(batch, names, args.clients, args.time_limit)
                loads.append(os.getloadavg()[0])
                shown = ", ".join(f"{s} {stations[s].turns[-1]:.1f}" for s in storages)
                print(f"turn {turn + 1}/{len(starts)} (req/s): {shown}", flush=True)
            report = [stations[s].report(args.clients) for s in storages]
        finally:
            files = {s: station.stop() for s, station in stations.items()}
    off = stations.get("off")
    for result in report:
        result.update(files[str(result["storage"])])
        result.update(model=model.suffix, load_min=min(loads), load_max=max(loads))
        if off is not None:
            own = stations[str(result["storage"])]
            result["throughput_vs_off"] = off.seconds / own.seconds  # same requests
            ratios = [a / b for a, b in zip(own.turns, off.turns, strict=True)]
            result["turn_ratio_median"] = statistics.median(ratios)
        print(json.dumps(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    failed = [r for r in report if r["errors"] or not r.get("exactly_once", True)]
    if failed:
        sys.exit(f"{len(failed)} server(s) had errors or failed the exactly-once check")


if __name__ == "__main__":
    main()
