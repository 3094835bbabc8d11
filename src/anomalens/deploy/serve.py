"""HTTP inspection service: `anomalens serve MODEL` (FastAPI + uvicorn).

- `POST /v1/predict[?heatmap=true&min_region_area=N]`: one or more images as multipart field
  `file`; per image the score, verdict, threshold, normalised score (score / threshold), size,
  the defect regions of an anomalous image (`Region.to_dict()`, at least N pixels each) and, when
  asked, the anomaly map as a base64 RGBA PNG heatmap (colours of `anomalens.evaluation.viz`,
  transparent where normal).
- `GET /v1/model`: model name, parameters, thresholds, training-set size, format version, limits,
  batching settings and counts (predict calls, images scored).
- `GET /healthz`; OpenAPI docs at `/docs`; an inspection web page at `/`.

The model (`.safetensors` or an ONNX export) is loaded once per worker process. Decoding, inference
and heatmaps run on one dedicated thread, so requests queue for the CPU instead of fighting over it
while the event loop stays free for health checks. Micro-batching: the thread scores the requests
waiting and those that arrive until `batch_wait_ms` after the first of them (up to `max_batch`
images) with one `predict` call and hands each request its own results; `batch_wait_ms=0` scores
one request at a time.

Bad input is a 4xx JSON error `{"error", "detail"}`: a body over `max_upload_bytes` or more than
`max_files` files (413), not multipart or a part that is not an image (415), an empty or missing
upload (400), bytes that do not decode or an image of more than `max_pixels` (422; a request's
images together may have 4 x `max_pixels`), a bad query parameter (422).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import anomalens
from anomalens.core.model_file import read_config
from anomalens.data.io import decode_image
from anomalens.deploy.access import TOKEN_ENV, Access, read_tokens
from anomalens.deploy.station import (
    DEFAULT_DRIFT_ALPHA,
    DEFAULT_DRIFT_WINDOW,
    ActiveModel,
    DriftSettings,
    Record,
    Station,
    StationError,
    model_id,
)
from anomalens.deploy.station_api import MeasureRequests, Metrics, RequireToken, add_station_routes
from anomalens.deploy.store import InspectionStore, NewInspection
from anomalens.errors import ImageReadError, ParameterError, check_choice
from anomalens.evaluation.viz import heatmap_png

DEFAULT_MAX_UPLOAD_BYTES = 20_000_000
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MAX_FILES = 16
DEFAULT_BATCH_WAIT_MS = 2.0
DEFAULT_MAX_BATCH = 16
HEATMAP_MAX_SIDE = 1024
SETTINGS_ENV = "ANOMALENS_SERVE_SETTINGS"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Settings:
    """What `create_app` serves and the limits it enforces on uploads."""

    model: str
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = DEFAULT_MAX_FILES
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_batch: int = DEFAULT_MAX_BATCH
    data_dir: str | None = None
    """Keep every inspection (the station, `anomalens.deploy.station`); None: keep nothing."""
    db: str | None = None
    """SQLAlchemy URL of the store's database; None: SQLite in `data_dir`."""
    tokens: tuple[tuple[str, str, str], ...] = ()
    """(name, role, SHA-256 of the token) of each accepted token (`anomalens.deploy.access`)."""
    drift_window: int = DEFAULT_DRIFT_WINDOW
    drift_alpha: float = DEFAULT_DRIFT_ALPHA
    drift_reference: str = "baseline"


class ServiceError(Exception):
    """A request the service refuses: HTTP `status`, a short `code` and a one-line `detail`."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


# ---- response schemas (OpenAPI) ---------------------------------------------------------------
class RegionResult(BaseModel):
    box: list[int] = Field(
        description="[x0, y0, x1, y1] in pixels of the uploaded image, x1 and y1 exclusive."
    )
    area: int = Field(description="Pixels in the region.")
    area_fraction: float = Field(description="area / the image's pixels.")
    centroid: list[float] = Field(description="[x, y], the mean of the region's pixel indices.")
    max_score: float = Field(description="The anomaly map's maximum over the region.")
    mean_score: float = Field(description="The anomaly map's mean over the region.")


class ImageResult(BaseModel):
    filename: str
    score: float = Field(description="Anomaly score; higher = more anomalous.")
    label: str = Field(description='"anomalous" when score > threshold, else "normal".')
    anomalous: bool
    threshold: float = Field(description="The model's image threshold.")
    normalized_score: float | None = Field(
        description="score / threshold: above 1 is anomalous (null if the threshold is <= 0)."
    )
    width: int
    height: int
    regions: list[RegionResult] = Field(
        description="An anomalous image's defect regions (connected components of its mask), "
        "highest max_score first; empty for a normal image or a model without maps."
    )
    heatmap_png: str | None = Field(
        None,
        description="With ?heatmap=true: base64 RGBA PNG of the anomaly map at the image's "
        f"aspect ratio (longest side at most {HEATMAP_MAX_SIDE}), transparent where normal.",
    )
    inspection_id: str | None = Field(
        None, description="The stored inspection's id (null when the service keeps nothing)."
    )
    model_version: int | None = Field(
        None, description="The model version that scored the image (null without a store)."
    )


class PredictResponse(BaseModel):
    model_id: str
    results: list[ImageResult]


class ErrorResponse(BaseModel):
    error: str
    detail: str


class Health(BaseModel):
    status: str
    model_id: str
    model_version: int | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "empty or missing upload, malformed multipart body",
        401: "no token, or not a valid one (when the service requires tokens)",
        413: "request body over the size limit, or too many files",
        415: "not multipart/form-data, or a part that is not an image",
        422: "not a decodable image, more pixels than the limit, or a bad query parameter",
    }.items()
}


# ---- the model ------------------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One request waiting for the inference thread, and the future that gets its results."""

    parts: list[tuple[str, bytes]]
    heatmap: bool
    min_region_area: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[ImageResult]]
    arrived: float = field(default_factory=time.monotonic)


class Service:
    """The loaded model, its description and the single inference thread, which scores the
    requests waiting together as one batch."""

    def __init__(self, settings: Settings) -> None:
        path = Path(settings.model)
        self.settings = settings
        self.config = read_config(path)
        self.runtime = "onnxruntime" if path.suffix.lower() == ".onnx" else "torch"
        self.filename = path.name
        self.station: Station | None = None
        if settings.data_dir is not None:
            store = InspectionStore(settings.data_dir, settings.db)
            drift = DriftSettings(
                settings.drift_window, settings.drift_alpha, settings.drift_reference
            )
            self.station = Station(store, path, drift)
            self.fixed = self.station.model
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            self.fixed = ActiveModel(None, anomalens.load(path), model_id(self.config, digest))
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()  # None: stop
        self.predict_calls = self.images_scored = 0
        self.metrics = Metrics()
        self.worker = threading.Thread(target=self._work, name="anomalens-inference", daemon=True)
        self.worker.start()

    @property
    def model(self) -> ActiveModel:
        """The model version answering now."""
        return self.fixed if self.station is None else self.station.model

    @property
    def detector(self) -> Any:
        """The active version's model (a `Detector` or an `OnnxModel`)."""
        return self.model.detector

    @property
    def model_id(self) -> str:
        return self.model.model_id

    def close(self) -> None:
        """Stop the inference thread once it has answered the requests queued so far, then the
        store's writer once it has stored what was scored."""
        self.jobs.put(None)
        if self.station is not None:
            self.worker.join(timeout=60)
            self.station.close()

    def describe(self) -> dict[str, Any]:
        model = self.model
        detector = model.detector
        fitted = (
            self.config["fitted"] if model.version is None else detector.model_config()["fitted"]
        )
        return {
            "model_id": model.model_id,
            "model_version": model.version,
            "store": self.station is not None,
            "model": self.config["model"],
            "file": self.filename,
            "runtime": self.runtime,
            "format": self.config["format"],
            "format_version": self.config["format_version"],
            "anomalens_version": self.config.get("anomalens_version"),
            "params": self.config["params"],
            "image_size": detector.image_size,
            "produces_maps": detector.produces_maps,
            "thresholds": {
                "image": detector.image_threshold_,
                "pixel": detector.pixel_threshold_,
                "source": fitted["threshold_source"],
            },
            "n_train_images": fitted["n_train_images"],
            "n_validation_images": fitted["n_validation_images"],
            "limits": {
                "max_upload_bytes": self.settings.max_upload_bytes,
                "max_pixels": self.settings.max_pixels,
                "max_files": self.settings.max_files,
            },
            "batching": {
                "enabled": self.settings.batch_wait_ms > 0,
                "batch_wait_ms": self.settings.batch_wait_ms,
                "max_batch": self.settings.max_batch,
                "predict_calls": self.predict_calls,
                "images_scored": self.images_scored,
            },
        }

    async def inspect(
        self, parts: list[tuple[str, bytes]], heatmap: bool, min_region_area: int
    ) -> list[ImageResult]:
        """Decode, score and describe the uploads on the inference thread (one hop off the event
        loop and back: on a busy machine every thread hand-over costs a scheduling delay)."""
        loop = asyncio.get_running_loop()
        job = Job(parts, heatmap, min_region_area, loop, loop.create_future())
        self.jobs.put(job)
        return await job.future

    def _work(self) -> None:
        """The inference thread: batch after batch until `close`."""
        held: Job | None = None
        while True:
            first = held or self.jobs.get()
            if first is None:
                return
            batch, held = self._gather(first)
            self._run(batch)

    def _gather(self, first: Job) -> tuple[list[Job], Job | None]:
        """`first`, the jobs waiting and those that arrive until `batch_wait_ms` after `first` did,
        up to `max_batch` images (`first` alone when batching is off); a job that does not fit is
        held for the next batch."""
        batch, images = [first], len(first.parts)
        wait_s = self.settings.batch_wait_ms / 1000
        if wait_s <= 0:
            return batch, None
        deadline = first.arrived + wait_s
        while images < self.settings.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self.jobs.put(None)
                break
            if images + len(job.parts) > self.settings.max_batch:
                return batch, job
            batch.append(job)
            images += len(job.parts)
        return batch, None

    def _run(self, batch: list[Job]) -> None:
        """Decode each job's uploads (a bad one fails its own job), score the rest together."""
        decoded = []
        for job in batch:
            try:
                decoded.append((job, _decode_all(job.parts, self.settings.max_pixels)))
            except ImageReadError as error:
                _settle(job, ServiceError(422, "unreadable_image", str(error)))
            except Exception as error:
                _settle(job, error)
        if decoded:
            self._score(decoded)

    def _score(self, decoded: list[tuple[Job, list[np.ndarray]]]) -> None:
        """One `predict` call for the jobs' images (regions down to the smallest
        `min_region_area` asked, each job's own minimum applied in `result`); if it fails, each
        job is scored alone so that the error stays with the job that caused it."""
        images = [image for _, arrays in decoded for image in arrays]
        smallest = min(job.min_region_area for job, _ in decoded)
        model = self.model if self.station is None else self.station.refresh()
        try:
            predictions = model.detector.predict(images, min_region_area=smallest)
        except Exception as error:
            if len(decoded) == 1:
                _settle(decoded[0][0], error)
            else:
                for item in decoded:
                    self._score([item])
            return
        self.predict_calls += 1
        self.images_scored += len(images)
        for prediction in predictions:
            self.metrics.images.labels("anomalous" if prediction.label else "normal").inc()
        start = 0
        for job, arrays in decoded:
            own = predictions[start : start + len(arrays)]
            start += len(arrays)
            try:
                results = [
                    self.result(model, name, image, prediction, job.heatmap, job.min_region_area)
                    for (name, _), image, prediction in zip(job.parts, arrays, own, strict=True)
                ]
            except Exception as error:
                _settle(job, error)
            else:
                if self.station is None:
                    _settle(job, results)
                else:
                    self._record(model, job, arrays, own, results)

    def _record(
        self,
        model: ActiveModel,
        job: Job,
        arrays: list[np.ndarray],
        predictions: list[anomalens.Prediction],
        results: list[ImageResult],
    ) -> None:
        """Hand the job's inspections to the store's writer; the request is answered once they
        are stored (or with 503 if they cannot be)."""
        assert self.station is not None
        pixel_threshold = model.detector.pixel_threshold_
        items = [
            NewInspection(
                filename=result.filename,
                image=data,
                width=result.width,
                height=result.height,
                model_version=model.version or 0,
                score=result.score,
                threshold=result.threshold,
                anomalous=result.anomalous,
                regions=[region.to_dict() for region in prediction.regions],
                anomaly_map=prediction.anomaly_map,
                pixel_threshold=pixel_threshold,
            )
            for (_, data), prediction, result in zip(job.parts, predictions, results, strict=True)
        ]

        def stored(outcome: list[str] | Exception) -> None:
            if isinstance(outcome, Exception):
                detail = f"the inspection could not be stored ({type(outcome).__name__})"
                _settle(job, ServiceError(503, "store_unavailable", detail))
                return
            for result, inspection_id in zip(results, outcome, strict=True):
                result.inspection_id = inspection_id
                result.model_version = model.version
            _settle(job, results)

        self.station.record(Record(items, stored))

    def result(
        self,
        model: ActiveModel,
        name: str,
        image: np.ndarray,
        prediction: anomalens.Prediction,
        heatmap: bool,
        min_region_area: int,
    ) -> ImageResult:
        threshold = float(model.detector.image_threshold_)
        png = None
        if heatmap and prediction.anomaly_map is not None:
            png = _heatmap_png(prediction.anomaly_map, model.detector.pixel_threshold_)
        return ImageResult(
            filename=name,
            score=prediction.score,
            label="anomalous" if prediction.label else "normal",
            anomalous=prediction.label,
            threshold=threshold,
            normalized_score=prediction.score / threshold if threshold > 0 else None,
            width=image.shape[1],
            height=image.shape[0],
            regions=[
                RegionResult(**region.to_dict())
                for region in prediction.regions
                if region.area >= min_region_area
            ],
            heatmap_png=png,
            model_version=model.version,
        )


def _settle(job: Job, outcome: list[ImageResult] | Exception) -> None:
    """Hand `outcome` (results, or the error to raise) to the job's request on its event loop."""

    def deliver() -> None:
        if job.future.done():  # the client went away and the request was cancelled
            return
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the event loop is closed: the server has stopped
        job.loop.call_soon_threadsafe(deliver)


def _heatmap_png(anomaly_map: np.ndarray, threshold: float) -> str:
    """Base64 PNG of the map's heatmap, shrunk first to at most `HEATMAP_MAX_SIDE` a side."""
    return base64.b64encode(heatmap_png(anomaly_map, threshold, HEATMAP_MAX_SIDE)).decode()


def _decode_all(parts: list[tuple[str, bytes]], max_pixels: int) -> list[np.ndarray]:
    """Decode every upload; each image may have `max_pixels`, the request 4 x `max_pixels`."""
    arrays, total = [], 0
    for name, data in parts:
        arrays.append(decode_image(data, name, max_pixels))
        total += arrays[-1].shape[0] * arrays[-1].shape[1]
        if total > 4 * max_pixels:
            raise ImageReadError(
                f"{name}: the request's images have more than {4 * max_pixels} pixels in all"
            )
    return arrays


def _check_part(upload: UploadFile, data: bytes) -> str:
    name = upload.filename or "upload"
    kind = (upload.content_type or "").split(";")[0].strip().lower()
    if kind and not kind.startswith("image/") and kind != "application/octet-stream":
        raise ServiceError(
            415, "unsupported_media_type", f"{name}: content type {kind!r} is not an image"
        )
    if not data:
        raise ServiceError(400, "empty_upload", f"{name}: the upload is empty")
    return name


# ---- limits on the raw request ----------------------------------------------------------------
class UploadLimits:
    """ASGI middleware for POST /v1/predict: the body must be multipart and at most `max_bytes`
    (by Content-Length, and counted as it streams in for chunked uploads)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/predict":
            await self.app(scope, receive, send)
            return
        headers = {
            key.decode("latin-1").lower(): v.decode("latin-1") for key, v in scope["headers"]
        }
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "multipart/form-data":
            shown = kind or "no content type"
            message = f"send the images as multipart/form-data (field 'file'), not {shown}"
            await self._refuse(receive, send, ServiceError(415, "unsupported_media_type", message))
            return
        too_large = ServiceError(
            413, "too_large", f"the request body exceeds the limit of {self.max_bytes} bytes"
        )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(receive, send, too_large)
            return
        state = {"received": 0, "over": False, "started": False, "complete": False}

        async def counted() -> Message:
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            state["received"] += len(message.get("body", b""))
            state["complete"] = not message.get("more_body", False)
            if state["received"] > self.max_bytes:
                state["over"] = True
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not state["over"]:
                state["started"] = True
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await self._refuse(receive, send, too_large, drain=not state["complete"])

    async def _refuse(
        self, receive: Receive, send: Send, error: ServiceError, drain: bool = True
    ) -> None:
        """Read and drop the rest of the body (at most 4 x the limit, for at most 10 s, so that
        the client gets to read the answer), then answer with `error`."""
        budget = 4 * self.max_bytes
        more = drain
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while more and budget > 0:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    budget -= len(message.get("body", b""))
                    more = message.get("more_body", False)
        response = _error_response(error)
        await response({"type": "http"}, receive, send)


def _error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse({"error": error.code, "detail": error.detail}, status_code=error.status)


# ---- the application ----------------------------------------------------------------------------
def create_app(settings: Settings) -> FastAPI:
    """The FastAPI application serving `settings.model` (loaded here, once)."""
    service = Service(settings)
    page_html = resources.files("anomalens.deploy").joinpath("static/index.html").read_text("utf-8")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        title="anomalens inspection service",
        version=anomalens.__version__,
        description=f"Anomaly detection with the {service.config['model']} model "
        f"{service.model_id}. Upload images to `/v1/predict`; the web page is at `/`.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(UploadLimits, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequireToken, access=Access(list(settings.tokens)))
    app.add_middleware(MeasureRequests, metrics=service.metrics)
    add_station_routes(app, service.station, service.metrics)

    @app.exception_handler(ServiceError)
    async def service_error(_: Any, error: ServiceError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(StationError)
    async def station_error(_: Any, error: StationError) -> JSONResponse:
        return _error_response(ServiceError(error.status, error.code, str(error)))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Any, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg', '')}"
            for item in error.errors()
        )
        if any(item.get("loc", ())[-1:] == ("file",) for item in error.errors()):
            return _error_response(
                ServiceError(400, "no_image", "no image: send one or more files in field 'file'")
            )
        return _error_response(ServiceError(422, "invalid_request", problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Any, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(ServiceError(error.status_code, "http_error", str(error.detail)))

    @app.exception_handler(Exception)
    async def internal_error(_: Any, error: Exception) -> JSONResponse:
        detail = f"internal error ({type(error).__name__}); see the server log"
        return _error_response(ServiceError(500, "internal_error", detail))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: answers while inference is busy."""
        model = service.model
        return Health(status="ok", model_id=model.model_id, model_version=model.version)

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        """Model name, parameters, thresholds, training-set size, format version, limits."""
        return service.describe()

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(
        file: Annotated[list[UploadFile], File(description="One or more image files.")],
        heatmap: Annotated[
            bool, Query(description="Include the anomaly map as a base64 PNG heatmap.")
        ] = False,
        min_region_area: Annotated[
            int, Query(ge=0, description="Leave out defect regions of fewer pixels than this.")
        ] = 0,
    ) -> PredictResponse:
        """Score images: verdict, score against the threshold, defect regions, optional heatmap."""
        if len(file) > settings.max_files:
            raise ServiceError(
                413, "too_many_files", f"{len(file)} files; at most {settings.max_files}"
            )
        parts = []
        for upload in file:
            data = await upload.read()
            parts.append((_check_part(upload, data), data))
        results = await service.inspect(parts, heatmap, min_region_area)
        return PredictResponse(model_id=service.model_id, results=results)

    return app


def app_from_environment() -> FastAPI:
    """uvicorn factory for `serve` (each worker process builds its app from the settings)."""
    values = json.loads(os.environ[SETTINGS_ENV])
    values["tokens"] = tuple(tuple(entry) for entry in values["tokens"])
    return create_app(Settings(**values))


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    max_batch: int = DEFAULT_MAX_BATCH,
    *,
    data_dir: str | Path | None = None,
    db: str | None = None,
    token: str | None = None,
    tokens_file: Path | None = None,
    insecure: bool = False,
    drift_window: int = DEFAULT_DRIFT_WINDOW,
    drift_alpha: float = DEFAULT_DRIFT_ALPHA,
    drift_reference: str = "baseline",
) -> None:
    """Run the service with uvicorn until interrupted. `token` (or `ANOMALENS_TOKEN`) and
    `tokens_file` set who may use it; it refuses a non-loopback `host` without one unless
    `insecure`."""
    import uvicorn

    check_choice("drift_reference", drift_reference, ("baseline", "validation"))
    tokens = read_tokens(token or os.environ.get(TOKEN_ENV) or None, tokens_file)
    if not tokens and not insecure and not _loopback(host):
        raise ParameterError(
            f"refusing to listen on {host} without a token: give --token, ANOMALENS_TOKEN or "
            "--tokens-file (or --insecure to allow anyone who can reach the port)"
        )
    if db is not None and data_dir is None:
        raise ParameterError("--db needs --data-dir (the images and model versions live there)")
    settings = Settings(
        str(Path(model).resolve()),
        max_upload_bytes,
        max_pixels,
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
        data_dir=None if data_dir is None else str(Path(data_dir).resolve()),
        db=db,
        tokens=tuple(tokens),
        drift_window=drift_window,
        drift_alpha=drift_alpha,
        drift_reference=drift_reference,
    )
    read_config(settings.model)  # a bad model file fails here, with one line, before uvicorn
    if settings.data_dir is not None:  # migrate and register the model once, before the workers
        Station(InspectionStore(settings.data_dir, db), Path(settings.model)).close()
    os.environ[SETTINGS_ENV] = json.dumps(settings.__dict__)
    uvicorn.run(
        "anomalens.deploy.serve:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
    )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
