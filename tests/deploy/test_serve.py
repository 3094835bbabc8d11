"""The inspection service over real HTTP: uvicorn on 127.0.0.1 and httpx, every kind of bad
input, health checks while inference is busy, micro-batching of concurrent requests, the web page
in Debian's Chromium (Playwright), and `anomalens serve` as a command with two workers."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

import anomalens
from anomalens.data.mvtec import test_samples
from anomalens.deploy.serve import Settings, create_app

pytestmark = pytest.mark.slow  # started first by `make test` (tests/conftest.py)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MAX_UPLOAD = 2_000_000
MAX_PIXELS = 1_000_000
MAX_FILES = 8


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    """The service for `settings`, run by uvicorn in a thread on a free loopback port: (its URL,
    the app)."""
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    runner.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def running(patchcore_files) -> Iterator[tuple[str, FastAPI]]:
    """The service for the exported model with the default settings (micro-batching on)."""
    with serving(Settings(str(patchcore_files[1]), MAX_UPLOAD, MAX_PIXELS, MAX_FILES)) as running:
        yield running


@pytest.fixture(scope="module")
def server(running) -> str:
    return running[0]


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb's header)."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def ranked(brick: Path, patchcore_files) -> list[tuple[float, Path]]:
    """Test images of the synthetic category by the exported model's score, lowest first."""
    samples = test_samples(brick)
    model = anomalens.OnnxModel(patchcore_files[1])
    scores = model.decision_function([s.path for s in samples])
    return sorted(zip(scores.tolist(), [s.path for s in samples], strict=True))


def test_health_model_docs_and_page(server, patchcore_files) -> None:
    model = anomalens.load(patchcore_files[0])
    with httpx.Client(base_url=server, timeout=30) as client:
        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["model_id"].startswith("patchcore-")
        info = client.get("/v1/model").json()
        assert info["model_id"] == health["model_id"] and info["runtime"] == "onnxruntime"
        assert info["model"] == "patchcore" and info["format_version"] == 1
        assert info["thresholds"]["image"] == model.image_threshold_
        assert info["thresholds"]["pixel"] == model.pixel_threshold_
        # All 16 normal images end in the bank (2 of them also set the thresholds).
        assert info["n_train_images"] == 16 and info["params"]["coreset_ratio"] == 0.25
        assert info["limits"]["max_upload_bytes"] == MAX_UPLOAD
        assert info["batching"]["enabled"] and info["batching"]["batch_wait_ms"] == 2.0
        assert info["batching"]["max_batch"] == 16
        schema = client.get("/openapi.json").json()
        assert {"/v1/predict", "/v1/model", "/healthz"} <= set(schema["paths"])
        assert client.get("/docs").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and 'id="file"' in page.text and "/v1/predict" in page.text


def test_predict_several_images_with_heatmaps(server, ranked, patchcore_files) -> None:
    (_, normal), (_, defect) = ranked[0], ranked[-1]
    wide = np.asarray(Image.open(defect).convert("RGB").resize((200, 120)))
    files = [
        ("file", ("defect.png", defect.read_bytes(), "image/png")),
        ("file", ("normal.png", normal.read_bytes(), "image/png")),
        ("file", ("wide.png", png_bytes(wide), "application/octet-stream")),
    ]
    with httpx.Client(base_url=server, timeout=60) as client:
        body = client.post("/v1/predict", params={"heatmap": "true"}, files=files).json()
        plain = client.post("/v1/predict", files=files[:1]).json()
    model = anomalens.OnnxModel(patchcore_files[1])
    expected = model.predict([defect, normal, wide])
    results = body["results"]
    assert [r["filename"] for r in results] == ["defect.png", "normal.png", "wide.png"]
    for result, prediction in zip(results, expected, strict=True):
        assert result["score"] == pytest.approx(prediction.score, rel=1e-6)
        assert result["anomalous"] == prediction.label
        assert result["label"] == ("anomalous" if prediction.label else "normal")
        assert result["threshold"] == model.image_threshold_
        assert result["normalized_score"] == pytest.approx(result["score"] / result["threshold"])
        heatmap = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"])))
        assert heatmap.mode == "RGBA" and heatmap.size == (result["width"], result["height"])
        assert result["regions"] == [
            {key: pytest.approx(value, rel=1e-5) for key, value in region.to_dict().items()}
            for region in prediction.regions
        ]
    assert results[0]["label"] == "anomalous" and results[1]["score"] < results[0]["score"]
    assert results[0]["regions"] and not results[1]["anomalous"] and results[1]["regions"] == []
    for region in results[0]["regions"]:  # boxes and centroids in the image's own pixels
        x0, y0, x1, y1 = region["box"]
        assert 0 <= x0 < x1 <= results[0]["width"] and 0 <= y0 < y1 <= results[0]["height"]
        assert x0 <= region["centroid"][0] < x1 and y0 <= region["centroid"][1] < y1
        assert region["area"] <= (x1 - x0) * (y1 - y0) and region["max_score"] > 0
    assert (results[2]["width"], results[2]["height"]) == (200, 120)
    # the heatmap is opaque where the map is high: its peak lies where the anomaly map peaks
    alpha = np.asarray(Image.open(io.BytesIO(base64.b64decode(results[0]["heatmap_png"]))))[..., 3]
    peak = np.unravel_index(np.argmax(expected[0].anomaly_map), alpha.shape)
    assert alpha[peak] == alpha.max() > 0
    assert plain["results"][0]["heatmap_png"] is None
    assert plain["results"][0]["score"] == results[0]["score"]
    assert plain["results"][0]["regions"] == results[0]["regions"]


def test_min_region_area_leaves_out_small_regions(server, ranked) -> None:
    _, defect = ranked[-1]
    files = [("file", ("defect.png", defect.read_bytes(), "image/png"))]
    with httpx.Client(base_url=server, timeout=60) as client:
        (every,) = client.post("/v1/predict", files=files).json()["results"]
        areas = sorted(region["area"] for region in every["regions"])
        cut = areas[-1]  # keeps the largest region(s) only
        (large,) = client.post("/v1/predict", params={"min_region_area": cut}, files=files).json()[
            "results"
        ]
        (none,) = client.post(
            "/v1/predict", params={"min_region_area": areas[-1] + 1}, files=files
        ).json()["results"]
        refused = [
            client.post("/v1/predict", params={"min_region_area": bad}, files=files)
            for bad in ("-1", "2.5", "many")
        ]
    assert [r for r in every["regions"] if r["area"] >= cut] == large["regions"] != []
    assert none["anomalous"] and none["regions"] == [] and none["score"] == every["score"]
    for response in refused:
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "invalid_request" and "min_region_area" in body["detail"]


def _multipart_stream(size: int) -> Iterator[bytes]:
    yield b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
    yield b"Content-Type: image/png\r\n\r\n"
    for _ in range(size // 65536):
        yield b"\x00" * 65536
    yield b"\r\n--XyZ--\r\n"


def bad_requests(brick: Path) -> dict[str, tuple[dict, int, str, str]]:
    """name -> (httpx request arguments, status, error code, text in the detail)."""
    good = (brick / "train" / "good" / "000.png").read_bytes()
    bomb = png_bytes(Image.new("L", (1500, 1500), 128))  # 2.25 M pixels in a few kB
    return {
        "non-image bytes": (
            {"files": {"file": ("notes.png", b"just some text, no picture " * 20, "image/png")}},
            422,
            "unreadable_image",
            "notes.png: not a supported image file",
        ),
        "truncated png": (
            {"files": {"file": ("cut.png", good[: len(good) // 2], "image/png")}},
            422,
            "unreadable_image",
            "cut.png: image file is truncated",
        ),
        "decompression bomb": (
            {"files": {"file": ("bomb.png", bomb, "image/png")}},
            422,
            "unreadable_image",
            "decompression bomb",
        ),
        "bomb header": (
            {"files": {"file": ("huge.png", png_claiming_size(100_000, 100_000), "image/png")}},
            422,
            "unreadable_image",
            "huge.png",
        ),
        "empty upload": (
            {"files": {"file": ("empty.png", b"", "image/png")}},
            400,
            "empty_upload",
            "empty.png: the upload is empty",
        ),
        "over the size limit": (
            {"files": {"file": ("big.png", os.urandom(MAX_UPLOAD + 1000), "image/png")}},
            413,
            "too_large",
            f"limit of {MAX_UPLOAD} bytes",
        ),
        "over the size limit, chunked": (
            {
                "content": _multipart_stream(MAX_UPLOAD + 200_000),
                "headers": {"content-type": "multipart/form-data; boundary=XyZ"},
            },
            413,
            "too_large",
            f"limit of {MAX_UPLOAD} bytes",
        ),
        "json body": (
            {"json": {"image": "x"}},
            415,
            "unsupported_media_type",
            "multipart/form-data",
        ),
        "text part": (
            {"files": {"file": ("notes.txt", b"hello", "text/plain")}},
            415,
            "unsupported_media_type",
            "'text/plain' is not an image",
        ),
        "no file field": (
            {"files": {"picture": ("a.png", good, "image/png")}},
            400,
            "no_image",
            "field 'file'",
        ),
        "too many files": (
            {"files": [("file", (f"{i}.png", good, "image/png")) for i in range(MAX_FILES + 1)]},
            413,
            "too_many_files",
            f"at most {MAX_FILES}",
        ),
    }


BAD_INPUTS = (
    "non-image bytes",
    "truncated png",
    "decompression bomb",
    "bomb header",
    "empty upload",
    "over the size limit",
    "over the size limit, chunked",
    "json body",
    "text part",
    "no file field",
    "too many files",
)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_4xx_json_error(server, brick, case: str) -> None:
    cases = bad_requests(brick)
    assert set(cases) == set(BAD_INPUTS)
    arguments, status, code, text = cases[case]
    with httpx.Client(base_url=server, timeout=60) as client:
        response = client.post("/v1/predict", **arguments)
        assert response.status_code == status, response.text
        body = response.json()
        assert body["error"] == code and text in body["detail"]
        assert client.get("/healthz").status_code == 200


def test_health_answers_while_inference_is_busy(running, brick, monkeypatch) -> None:
    url, app = running
    detector = app.state.service.detector
    real_predict = detector.predict

    def slow_predict(images, **options):
        """The real model, made slow like a large one: 1.5 s a call, the GIL released as in
        real inference."""
        time.sleep(1.5)
        return real_predict(images, **options)

    monkeypatch.setattr(detector, "predict", slow_predict)
    files = {"file": ("hole.png", (brick / "test" / "hole" / "000.png").read_bytes(), "image/png")}
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        assert client.get("/healthz").status_code == 200  # connection opened before the rush
        busy = [pool.submit(httpx.post, f"{url}/v1/predict", files=files, timeout=60)]
        busy.append(pool.submit(httpx.post, f"{url}/v1/predict", files=files, timeout=60))
        time.sleep(0.3)
        for _ in range(5):
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            # on the event loop, a health check would wait for the 1.5 s inference to end
            assert time.perf_counter() - started < 0.5
            assert not all(future.done() for future in busy), "inference ended too early"
        answers = [future.result() for future in busy]
    assert [answer.status_code for answer in answers] == [200, 200]


def count_predict_calls(
    monkeypatch: pytest.MonkeyPatch, app: FastAPI, delay_s: float = 0.0
) -> list[int]:
    """Wrap the service's `predict`: the returned list gets each call's number of images. A call
    with an image 7 pixels wide fails (a model that cannot take it)."""
    detector = app.state.service.detector
    real_predict = detector.predict
    calls: list[int] = []

    def counted(images, **options):
        calls.append(len(images))
        time.sleep(delay_s)
        if any(image.shape[1] == 7 for image in images):
            raise RuntimeError("this model cannot take an image 7 pixels wide")
        return real_predict(images, **options)

    monkeypatch.setattr(detector, "predict", counted)
    return calls


def post_at_once(url: str, requests: list[tuple[dict, str, bytes]]) -> list[httpx.Response]:
    """POST each (query parameters, file name, bytes) from its own thread, all at the same time."""
    start = threading.Barrier(len(requests))

    def post(request: tuple[dict, str, bytes]) -> httpx.Response:
        params, name, data = request
        start.wait()
        files = {"file": (name, data, "image/png")}
        return httpx.post(f"{url}/v1/predict", params=params, files=files, timeout=120)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(post, requests))


def assert_scored_alone(result: dict, path: Path, model, min_region_area: int = 0) -> None:
    """`result` is what the model gives the image at `path` scored on its own."""
    (alone,) = model.predict([path], min_region_area=min_region_area)
    assert result["filename"] == path.name
    assert result["score"] == pytest.approx(alone.score, rel=1e-6)
    assert result["anomalous"] == alone.label
    assert result["regions"] == [
        {key: pytest.approx(value, rel=1e-5) for key, value in region.to_dict().items()}
        for region in alone.regions
    ]


@pytest.fixture(scope="module")
def batching(patchcore_files) -> Iterator[tuple[str, FastAPI]]:
    """A service that gathers up to 6 images for up to 2 s: 6 requests posted at once are one
    batch."""
    settings = Settings(
        str(patchcore_files[1]), MAX_UPLOAD, MAX_PIXELS, MAX_FILES, batch_wait_ms=2000, max_batch=6
    )
    with serving(settings) as running:
        yield running


def test_concurrent_requests_are_scored_together(
    batching, ranked, patchcore_files, monkeypatch
) -> None:
    url, app = batching
    calls = count_predict_calls(monkeypatch, app)
    model = anomalens.OnnxModel(patchcore_files[1])
    defect, other, normal, second = ranked[-1][1], ranked[-2][1], ranked[0][1], ranked[1][1]
    cut = max(region.area for region in model.predict([defect])[0].regions)
    requests = [
        ({"heatmap": "true"}, defect.name, defect.read_bytes()),
        ({"min_region_area": cut}, defect.name, defect.read_bytes()),
        ({}, "notes.png", b"just some text, no picture " * 20),
        ({"min_region_area": 3}, other.name, other.read_bytes()),
        ({"heatmap": "true"}, normal.name, normal.read_bytes()),
        ({}, second.name, second.read_bytes()),
    ]
    answers = post_at_once(url, requests)
    assert [answer.status_code for answer in answers] == [200, 200, 422, 200, 200, 200]
    assert answers[2].json()["error"] == "unreadable_image"
    # the 5 good images in fewer predict calls than requests (one, unless the posts straggle)
    assert sum(calls) == 5 and len(calls) < 5, calls
    first, large, third, fourth, fifth = [
        answer.json()["results"][0] for answer in answers[:2] + answers[3:]
    ]
    assert_scored_alone(first, defect, model)
    assert_scored_alone(large, defect, model, cut)
    assert large["regions"] == [r for r in first["regions"] if r["area"] >= cut] != []
    assert_scored_alone(third, other, model, 3)
    assert_scored_alone(fourth, normal, model)
    assert_scored_alone(fifth, second, model)
    assert first["heatmap_png"] and fourth["heatmap_png"]
    assert large["heatmap_png"] is None and fifth["heatmap_png"] is None
    batching = httpx.get(f"{url}/v1/model", timeout=30).json()["batching"]
    assert batching["enabled"] and (batching["batch_wait_ms"], batching["max_batch"]) == (2000, 6)


def test_a_batch_the_model_fails_on_is_scored_request_by_request(
    batching, ranked, patchcore_files, monkeypatch
) -> None:
    url, app = batching
    calls = count_predict_calls(monkeypatch, app)
    paths = [path for _, path in ranked[:5]]
    narrow = png_bytes(np.zeros((9, 7, 3), dtype=np.uint8))
    requests = [({}, path.name, path.read_bytes()) for path in paths]
    requests.insert(3, ({}, "narrow.png", narrow))
    answers = post_at_once(url, requests)
    assert [answer.status_code for answer in answers] == [200, 200, 200, 500, 200, 200]
    assert answers[3].json()["error"] == "internal_error"
    # the batch fails, then each request is scored alone
    assert sorted(calls) == [1] * 6 + [6] and calls[0] == 6, calls
    model = anomalens.OnnxModel(patchcore_files[1])
    for answer, path in zip(answers[:3] + answers[4:], paths, strict=True):
        assert_scored_alone(answer.json()["results"][0], path, model)


def test_batching_off_scores_one_request_at_a_time(ranked, patchcore_files, monkeypatch) -> None:
    settings = Settings(str(patchcore_files[1]), MAX_UPLOAD, MAX_PIXELS, batch_wait_ms=0)
    paths = [path for _, path in ranked[:6]]
    with serving(settings) as (url, app):
        # each call takes 0.2 s, so the other requests wait in the queue meanwhile
        calls = count_predict_calls(monkeypatch, app, delay_s=0.2)
        answers = post_at_once(url, [({}, path.name, path.read_bytes()) for path in paths])
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
    assert [answer.status_code for answer in answers] == [200] * 6
    assert calls == [1] * 6
    assert info["batching"] == {
        "enabled": False,
        "batch_wait_ms": 0.0,
        "max_batch": 16,
        "predict_calls": 6,
        "images_scored": 6,
    }
    model = anomalens.OnnxModel(patchcore_files[1])
    for answer, path in zip(answers, paths, strict=True):
        assert_scored_alone(answer.json()["results"][0], path, model)


def test_web_page_shows_verdict_and_heatmap(server, ranked, tmp_path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    (_, normal), (_, defect) = ranked[0], ranked[-1]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            page = browser.new_page()
            page.goto(server)
            sync_api.expect(page.locator("#model")).to_contain_text("patchcore")
            page.set_input_files("#file", str(defect))
            sync_api.expect(page.locator("#verdict")).to_have_text("ANOMALOUS", timeout=30_000)
            sync_api.expect(page.locator("#regions")).to_contain_text("defect region")
            page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
            assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
            box, heat = (
                page.locator("#image").bounding_box(),
                page.locator("#heatmap").bounding_box(),
            )
            assert box == heat, "the heatmap must lie exactly over the image"
            page.fill("#opacity", "25")
            assert page.eval_on_selector("#heatmap", "e => e.style.opacity") == "0.25"
            assert float(page.text_content("#score")) > float(page.text_content("#threshold"))
            page.set_input_files("#file", str(normal))
            sync_api.expect(page.locator("#history li")).to_have_count(2, timeout=30_000)
            sync_api.expect(page.locator("#filename")).to_contain_text(normal.name)
            sync_api.expect(page.locator("#regions")).to_have_text("")
            page.set_input_files("#file", str(not_an_image))
            sync_api.expect(page.locator("#error")).to_contain_text("not a supported image")
            page.locator("#history li").nth(1).click()
            sync_api.expect(page.locator("#verdict")).to_have_text("ANOMALOUS")
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()


def test_serve_command_with_two_workers(patchcore_files, brick) -> None:
    model_file, _ = patchcore_files
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = str(Path(anomalens.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from anomalens.cli import main; main()", "serve"]
    args = [str(model_file), "--port", str(port), "--workers", "2"]
    args += ["--batch-wait-ms", "20", "--max-batch", "4"]
    process = subprocess.Popen(command + args, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "anomalens serve did not come up"
            time.sleep(0.3)
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        assert info["runtime"] == "torch"
        assert info["batching"]["batch_wait_ms"] == 20.0 and info["batching"]["max_batch"] == 4
        image = (brick / "test" / "good" / "000.png").read_bytes()
        files = {"file": ("good.png", image, "image/png")}
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda _: httpx.post(f"{url}/v1/predict", files=files, timeout=120), range(4)
                )
            )
        assert [a.status_code for a in answers] == [200] * 4
        scores = [a.json()["results"][0]["score"] for a in answers]
        # batched together or alone, the same image: the same score up to the batch's float
        # rounding (oneDNN's kernels for a batch of 4 and of 1 differ in the last bits)
        assert max(scores) == pytest.approx(min(scores), rel=1e-6), scores
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_image_level_onnx_model_is_served_without_heatmaps(brick: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from anomalens.data.mvtec import training_images
    from anomalens.deploy.export import export_onnx

    model = anomalens.create("gaussian", image_size=64).fit(training_images(brick))
    onnx_file = export_onnx(model, tmp_path / "gaussian.onnx")
    app = create_app(Settings(str(onnx_file), MAX_UPLOAD, MAX_PIXELS, MAX_FILES))
    defect = next(s.path for s in test_samples(brick) if s.label)
    with TestClient(app) as client:
        response = client.post(
            "/v1/predict",
            params={"heatmap": "true"},
            files=[("file", ("defect.png", defect.read_bytes(), "image/png"))],
        )
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["heatmap_png"] is None
    assert result["score"] == pytest.approx(model.predict([defect])[0].score, rel=1e-4)
