"""The station's HTTP routes (`anomalens serve MODEL --data-dir DIR`), the access check in front of
every route, and `/metrics` in Prometheus' text format.

- `GET /v1/inspections` (filters: `label`, `review`, `since`, `until`, `model_version`; paged by
  `limit` and `offset`, newest first), `GET /v1/inspections/{id}`, its `/image` and `/heatmap`,
  `POST /v1/inspections/{id}/review` (`{"verdict": "defect" | "false_alarm" | "normal",
  "note": ...}`, role `review`).
- `GET /v1/models`, `POST /v1/models/update` (learn from the reviews, role `admin`),
  `POST /v1/models/{version}/activate` (activate or roll back, role `admin`).
- `GET /v1/drift`: the drift statistic, and the recent scores for the page's plot.
- `GET /metrics`: requests, latency histogram, images by label, anomalous rate, drift statistic
  and warning, model version (this process's counts; each worker process keeps its own).
"""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field

from anomalens.deploy.access import COOKIE, Access, Grant, request_token
from anomalens.deploy.station import Station, StationError
from anomalens.deploy.store import Inspection, ModelVersion

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PUBLIC = ("/healthz",)


# ---- access --------------------------------------------------------------------------------
class RequireToken:
    """ASGI middleware: with tokens configured, every route but `/healthz` needs one (header
    `Authorization: Bearer ...` or the page's cookie); the holder goes in `scope["state"]`.
    `POST /login` (the page's form) checks a token and sets the cookie; `/logout` clears it."""

    def __init__(self, app: Any, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if path == "/login" and scope["method"] == "POST":
            await self._login(receive, send)
            return
        if path == "/logout":
            await _cookie_response(send, 303, "", clear=True)
            return
        grant = self.access.grant(request_token(headers))
        if grant is None and path not in PUBLIC:
            await _unauthorized(send, wants_page="text/html" in headers.get("accept", ""))
            return
        scope.setdefault("state", {})["grant"] = grant
        await self.app(scope, receive, send)

    async def _login(self, receive: Receive, send: Send) -> None:
        body = b""
        more = True
        while more and len(body) < 4096:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        from urllib.parse import parse_qs

        token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0].strip()
        if self.access.grant(token) is None or not self.access.required:
            await _unauthorized(send, wants_page=True, failed=True)
            return
        await _cookie_response(send, 303, token)


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>anomalens: sign in</title><style>body{{font:16px system-ui;margin:4em auto;max-width:24em}}
input{{font:inherit;width:100%;margin:.4em 0;padding:.3em}}</style></head><body>
<h1>anomalens inspection station</h1><p>{message}</p>
<form method="post" action="/login"><label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus>
<input type="submit" value="Sign in"></form></body></html>"""


async def _unauthorized(send: Send, *, wants_page: bool, failed: bool = False) -> None:
    if wants_page:
        message = "That token is not valid." if failed else "This station needs an access token."
        body = LOGIN_PAGE.format(message=html.escape(message)).encode()
        kind = b"text/html; charset=utf-8"
    else:
        body = (
            b'{"error":"unauthorized",'
            b'"detail":"a valid token is required (Authorization: Bearer ...)"}'
        )
        kind = b"application/json"
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", kind),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _cookie_response(send: Send, status: int, token: str, clear: bool = False) -> None:
    age = "0" if clear else "43200"
    cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={age}"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"location", b"/"),
                (b"set-cookie", cookie.encode("latin-1")),
                (b"content-length", b"0"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


def grant_of(request: Request) -> Grant:
    return request.scope["state"]["grant"]


def _role(role: str) -> Callable[[Request], Grant]:
    """A route dependency: the request's token must have `role` (or a higher one)."""

    def check(request: Request) -> Grant:
        grant = grant_of(request)
        if not grant.allows(role):
            detail = f"this needs the {role} role; the token has {grant.role}"
            raise StationError(403, "forbidden", detail)
        return grant

    return check


Inspector = Annotated[Grant, Depends(_role("inspect"))]
Reviewer = Annotated[Grant, Depends(_role("review"))]
Admin = Annotated[Grant, Depends(_role("admin"))]


# ---- metrics -------------------------------------------------------------------------------
class Metrics:
    """This process's Prometheus metrics (its own registry, so apps in one process don't mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "anomalens_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "anomalens_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.images = Counter(
            "anomalens_images", "Images scored, by verdict", ["label"], registry=self.registry
        )
        self.anomalous_rate = Gauge(
            "anomalens_anomalous_rate",
            "Fraction of the drift window's images labelled anomalous",
            registry=self.registry,
        )
        self.drift_statistic = Gauge(
            "anomalens_drift_statistic",
            "Kolmogorov-Smirnov statistic, recent normal scores vs validation scores",
            registry=self.registry,
        )
        self.drift_warning = Gauge(
            "anomalens_drift_warning", "1 when drift is detected", registry=self.registry
        )
        self.model_version = Gauge(
            "anomalens_model_version", "The active model version", registry=self.registry
        )


class MeasureRequests:
    """ASGI middleware counting requests by route template and status, and timing them."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, str(status["code"])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)


# ---- schemas -------------------------------------------------------------------------------
class ReviewIn(BaseModel):
    verdict: Literal["defect", "false_alarm", "normal"]
    note: str | None = Field(None, max_length=2000)


class ReviewOut(BaseModel):
    verdict: str
    note: str | None
    reviewer: str | None
    reviewed_at: datetime | None


class InspectionOut(BaseModel):
    id: str
    created_at: datetime
    filename: str
    width: int
    height: int
    model_version: int
    score: float
    threshold: float
    normalized_score: float | None
    label: str
    anomalous: bool
    regions: list[dict[str, Any]]
    review: ReviewOut | None
    learned_in: int | None
    image_url: str
    heatmap_url: str | None


class InspectionPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[InspectionOut]


class VersionOut(BaseModel):
    version: int
    created_at: datetime
    model: str
    file: str
    source: str = Field(description='"file" (given to serve) or "reviews" (an update).')
    parent: int | None
    active: bool
    image_threshold: float
    pixel_threshold: float | None
    n_train_images: int
    validation: dict[str, Any]


class VersionList(BaseModel):
    active: int | None
    versions: list[VersionOut]


def inspection_out(row: Inspection) -> InspectionOut:
    review = None
    if row.review is not None:
        review = ReviewOut(
            verdict=row.review,
            note=row.review_note,
            reviewer=row.reviewed_by,
            reviewed_at=row.reviewed_at,
        )
    return InspectionOut(
        id=row.id,
        created_at=row.created_at,
        filename=row.filename,
        width=row.width,
        height=row.height,
        model_version=row.model_version,
        score=row.score,
        threshold=row.threshold,
        normalized_score=row.score / row.threshold if row.threshold > 0 else None,
        label="anomalous" if row.anomalous else "normal",
        anomalous=row.anomalous,
        regions=row.regions,
        review=review,
        learned_in=row.learned_in,
        image_url=f"/v1/inspections/{row.id}/image",
        heatmap_url=None if row.heatmap_sha256 is None else f"/v1/inspections/{row.id}/heatmap",
    )


def version_out(row: ModelVersion) -> VersionOut:
    return VersionOut(
        version=row.version,
        created_at=row.created_at,
        model=row.model,
        file=row.file,
        source=row.source,
        parent=row.parent,
        active=row.active,
        image_threshold=row.image_threshold,
        pixel_threshold=row.pixel_threshold,
        n_train_images=row.n_train_images,
        validation=row.validation,
    )


IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "bmp": "image/bmp", "tiff": "image/tiff"}


# ---- routes --------------------------------------------------------------------------------
def add_station_routes(app: FastAPI, station: Station | None, metrics: Metrics) -> None:
    """The store's routes (404 with a hint when the service keeps nothing) and `/metrics`."""

    def need_station() -> Station:
        if station is None:
            raise StationError(
                404, "no_store", "this service keeps no inspections; start it with --data-dir DIR"
            )
        return station

    def found(inspection_id: str) -> Inspection:
        row = need_station().store.get(inspection_id)
        if row is None:
            raise StationError(404, "not_found", f"there is no inspection {inspection_id}")
        return row

    @app.get("/v1/inspections", response_model=InspectionPage)
    def inspections(
        _: Inspector,
        label: Annotated[Literal["anomalous", "normal"] | None, Query()] = None,
        review: Annotated[
            Literal["defect", "false_alarm", "normal", "reviewed", "unreviewed"] | None, Query()
        ] = None,
        since: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive.")] = None,
        until: Annotated[datetime | None, Query(description="ISO 8601 time, exclusive.")] = None,
        model_version: Annotated[int | None, Query(ge=1)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> InspectionPage:
        """Stored inspections, newest first, filtered and paged."""
        rows, total = need_station().store.list(
            label=label,
            review=review,
            since=since,
            until=until,
            model_version=model_version,
            limit=limit,
            offset=offset,
        )
        return InspectionPage(
            total=total, limit=limit, offset=offset, items=[inspection_out(r) for r in rows]
        )

    @app.get("/v1/inspections/{inspection_id}", response_model=InspectionOut)
    def inspection(inspection_id: str, _: Inspector) -> InspectionOut:
        return inspection_out(found(inspection_id))

    @app.get("/v1/inspections/{inspection_id}/image", response_class=FileResponse)
    def inspection_image(inspection_id: str, _: Inspector) -> FileResponse:
        """The image as it was uploaded."""
        row = found(inspection_id)
        return FileResponse(
            need_station().store.image_path(row),
            media_type=IMAGE_TYPES.get(row.image_format, "application/octet-stream"),
            headers={"Cache-Control": "private, max-age=86400"},
        )

    @app.get(
        "/v1/inspections/{inspection_id}/heatmap",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def inspection_heatmap(inspection_id: str, _: Inspector) -> Response:
        """The anomaly map as an RGBA PNG heatmap (transparent where normal)."""
        png = need_station().store.heatmap_png(found(inspection_id))
        if png is None:
            raise StationError(404, "not_found", "this model produces no anomaly maps")
        return Response(
            png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"}
        )

    @app.post("/v1/inspections/{inspection_id}/review", response_model=InspectionOut)
    def review(inspection_id: str, body: ReviewIn, grant: Reviewer) -> InspectionOut:
        """Mark an inspection: a confirmed defect, a false alarm, or normal (with a note)."""
        found(inspection_id)
        row = need_station().store.review(inspection_id, body.verdict, body.note, grant.name)
        return inspection_out(row)

    @app.get("/v1/models", response_model=VersionList)
    def models(_: Inspector) -> VersionList:
        """The model versions with their thresholds and validation figures."""
        rows = need_station().store.versions()
        active = next((r.version for r in rows if r.active), None)
        return VersionList(active=active, versions=[version_out(r) for r in rows])

    @app.post("/v1/models/update", response_model=VersionOut, status_code=201)
    async def update(_: Admin) -> VersionOut:
        """Learn the images reviewed as false alarm or normal (partial_fit), set the thresholds
        again, store the result as a new version and swap it in."""
        return version_out(await asyncio.to_thread(need_station().update_from_reviews))

    @app.post("/v1/models/{version}/activate", response_model=VersionOut)
    async def activate(version: int, _: Admin) -> VersionOut:
        """Make a version the active one (roll back or forward), without dropping requests."""
        return version_out(await asyncio.to_thread(need_station().activate, version))

    @app.get("/v1/drift")
    def drift(_: Inspector, points: Annotated[int, Query(ge=0, le=5000)] = 500) -> dict[str, Any]:
        """The drift test of the active version, and its latest `points` scores (time, score,
        anomalous) for a plot against the threshold."""
        current = need_station()
        value = dict(current.drift())
        model = current.model
        value["threshold"] = float(model.detector.image_threshold_)
        recent = current.store.recent_scores(model.version or 0, points) if points else []
        value["series"] = [
            {"time": stamp.isoformat(), "score": score, "anomalous": anomalous}
            for stamp, score, anomalous in recent
        ]
        return value

    @app.get("/metrics", include_in_schema=False)
    def metrics_page(_: Inspector) -> Response:
        if station is not None:
            value = station.drift()
            metrics.model_version.set(station.model.version or 0)
            if value["anomalous_rate"] is not None:
                metrics.anomalous_rate.set(value["anomalous_rate"])
            if value["statistic"] is not None:
                metrics.drift_statistic.set(value["statistic"])
            metrics.drift_warning.set(1 if value["warning"] else 0)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
