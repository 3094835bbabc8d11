"""The station under concurrent load, on SQLite and on PostgreSQL: no errors, and every request
answered 200 is in the store exactly once, also after the service is killed (`kill -9`) in the
middle of a load and started again on the same data directory. (A small version of
`benchmarks/station_load.py`, which measures the cost of storage at 8 clients x 400 requests.)"""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import anomalens
from anomalens.data.io import load_image
from anomalens.data.mvtec import test_samples
from anomalens.deploy.serve import Settings
from anomalens.deploy.store import Inspection, InspectionStore
from tests.deploy.test_serve import serving
from tests.pg_server import free_port

CLIENTS = 4
REQUESTS_PER_CLIENT = 30


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> str | None:
    """The store's database: None (SQLite in the data directory) or a fresh PostgreSQL one."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture(scope="module")
def station_model(fitted_patchcore, tmp_path_factory) -> Path:
    """The fitted PatchCore as a model file (what a station serves)."""
    return fitted_patchcore.save(tmp_path_factory.mktemp("station") / "model.safetensors")


@pytest.fixture(scope="module")
def sources(brick: Path) -> list[np.ndarray]:
    return [load_image(sample.path) for sample in test_samples(brick)]


def unique_png(sources: list[np.ndarray], index: int) -> bytes:
    """A different PNG for every `index` (a test image with seeded noise), as a camera sends."""
    rng = np.random.default_rng(index)
    image = sources[index % len(sources)].astype(np.int16)
    noisy = np.clip(image + rng.integers(-4, 5, size=image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "PNG")
    return buffer.getvalue()


class Load:
    """`clients` threads POSTing a different image each to /v1/predict (file name `<n>.png`)
    until `total` are sent or `stop` is set; what was answered 200 and what failed."""

    def __init__(self, url: str, sources: list[np.ndarray], clients: int, total: int) -> None:
        self.url, self.sources, self.total = url, sources, total
        self.lock = threading.Lock()
        self.sent = 0
        self.answered: list[tuple[str, str, bytes]] = []  # (name, inspection id, image)
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "the clients did not finish"

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                with self.lock:
                    if self.sent >= self.total:
                        return
                    index = self.sent
                    self.sent += 1
                name, image = f"{index:05d}.png", unique_png(self.sources, index)
                try:
                    response = client.post(
                        "/v1/predict", files={"file": (name, image, "image/png")}
                    )
                except httpx.HTTPError as error:
                    with self.lock:
                        self.errors.append(f"{name}: {error!r}")
                    continue
                with self.lock:
                    if response.status_code == 200:
                        (result,) = response.json()["results"]
                        self.answered.append((name, result["inspection_id"], image))
                    else:
                        self.errors.append(f"{name}: HTTP {response.status_code} {response.text}")


def stored_rows(data_dir: Path, db: str | None) -> list[tuple[str, str]]:
    """(id, file name) of every stored inspection, read straight from the database."""
    store = InspectionStore(data_dir, db, upgrade=False)
    try:
        with store.session() as session:
            return [tuple(row) for row in session.query(Inspection.id, Inspection.filename)]
    finally:
        store.close()


def assert_stored_once(answered: list[tuple[str, str, bytes]], rows: list[tuple[str, str]]):
    """Each answered request's inspection is in the store under its file name, and no request is
    stored twice."""
    ids = [inspection_id for _, inspection_id, _ in answered]
    assert all(ids) and len(set(ids)) == len(ids), "an inspection id answered twice"
    by_id = dict(rows)
    assert len(by_id) == len(rows)
    missing = [name for name, inspection_id, _ in answered if by_id.get(inspection_id) != name]
    assert not missing, f"answered but not stored: {missing[:5]}"
    names = Counter(name for _, name in rows)
    assert max(names.values(), default=1) == 1, "a request stored more than once"


def test_concurrent_requests_are_stored_exactly_once(station_model, sources, tmp_path, db):
    data_dir = tmp_path / "data"
    settings = Settings(str(station_model), data_dir=str(data_dir), db=db, batch_wait_ms=5)
    total = CLIENTS * REQUESTS_PER_CLIENT
    with serving(settings) as (url, app):
        load = Load(url, sources, CLIENTS, total).start()
        load.join(timeout=240)
        assert load.errors == []
        assert len(load.answered) == total
        # Checked while the service runs: a request is answered only once it is committed.
        rows = stored_rows(data_dir, db)
        assert len(rows) == total
        assert_stored_once(load.answered, rows)
        batching = app.state.service.describe()["batching"]
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/v1/inspections", params={"limit": 1}).json()["total"] == total
            name, inspection_id, image = load.answered[-1]
            assert client.get(f"/v1/inspections/{inspection_id}").json()["filename"] == name
            assert client.get(f"/v1/inspections/{inspection_id}/image").content == image
            heatmap = client.get(f"/v1/inspections/{inspection_id}/heatmap")
            assert heatmap.status_code == 200 and heatmap.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(heatmap.content)).mode == "RGBA"
    # The writer stored several requests per transaction: batches were formed under this load.
    assert batching["images_scored"] == total and batching["predict_calls"] < total


# ---- kill -9 in the middle of a load --------------------------------------------------------
def start_station(model: Path, data_dir: Path, db: str | None) -> tuple[subprocess.Popen, str]:
    """`anomalens serve MODEL --data-dir DIR [--db URL]` on a free port, once it answers."""
    port = free_port()
    source = str(Path(anomalens.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from anomalens.cli import main; main()", "serve", str(model)]
    command += ["--port", str(port), "--data-dir", str(data_dir), "--batch-wait-ms", "5"]
    if db is not None:
        command += ["--db", db]
    log = open(data_dir.parent / f"serve-{port}.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            output = (data_dir.parent / f"serve-{port}.log").read_text()
            pytest.fail(f"anomalens serve exited ({process.returncode}):\n{output[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "anomalens serve did not come up"
        time.sleep(0.2)


def test_answered_requests_survive_kill_9(station_model, sources, tmp_path, db) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    process, url = start_station(station_model, data_dir, db)
    try:
        load = Load(url, sources, CLIENTS, total=10_000).start()
        deadline = time.monotonic() + 60
        while len(load.answered) < 40:  # well into the load, requests in flight
            assert not load.errors, load.errors[:3]
            assert time.monotonic() < deadline, "too few requests answered"
            time.sleep(0.05)
        in_flight = load.sent - len(load.answered)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        load.stop.set()
        load.join(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    answered = list(load.answered)
    unanswered = load.sent - len(answered)  # in flight at the kill, or sent after it
    assert len(answered) >= 40 and in_flight > 0
    assert load.errors, "the requests in flight at the kill should have failed"
    if db is None:  # killed with its write-ahead log not checkpointed into the database
        assert (data_dir / "inspections.db-wal").is_file()

    # Started again on the same data directory (migrations, SQLite's WAL recovered), in this
    # process: a second `anomalens serve` would spend ~10 s importing torch again.
    settings = Settings(str(station_model), data_dir=str(data_dir), db=db)
    with serving(settings) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        for name, inspection_id, image in answered:
            response = client.get(f"/v1/inspections/{inspection_id}")
            assert response.status_code == 200, (name, response.text)
            assert response.json()["filename"] == name
            assert client.get(f"/v1/inspections/{inspection_id}/image").content == image
        assert client.get(f"/v1/inspections/{inspection_id}/heatmap").status_code == 200
        total = client.get("/v1/inspections", params={"limit": 1}).json()["total"]
        # Stored and not answered: only requests that were in flight at the kill.
        assert len(answered) <= total <= len(answered) + unanswered
        # The station keeps working after the crash.
        files = {"file": ("after.png", unique_png(sources, 99_999), "image/png")}
        after = client.post("/v1/predict", files=files)
        assert after.status_code == 200 and after.json()["results"][0]["model_version"] == 1
    rows = stored_rows(data_dir, db)
    assert_stored_once(answered, rows)
    assert len(rows) == total + 1
    store = InspectionStore(data_dir, db)
    try:
        assert [v.version for v in store.versions()] == [1]  # the restart added no version
        for row_id, _ in rows:  # a committed row always has its files
            row = store.get(row_id)
            assert store.image_path(row).is_file() and store.heatmap_path(row).is_file()
    finally:
        store.close()
    if db is None:
        with sqlite3.connect(data_dir / "inspections.db") as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
