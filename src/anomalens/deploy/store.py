"""The inspection station's store: every inspection, its review and the model versions, kept in a
database (SQLAlchemy: SQLite in the data directory by default, or PostgreSQL) with the images,
heatmaps and model files as files under the data directory.

- Images are kept once, content-addressed (`images/ab/<sha256>`), as the bytes that were uploaded;
  heatmaps likewise (`heatmaps/ab/<sha256>.png`), as the heatmap's 8-bit levels in a greyscale PNG
  (`heatmap_levels_png`; encoding the coloured PNG for every request cost the service ~30% of its
  throughput, benchmarks/RESULTS.md), coloured when one is looked at (`heatmap_png`). A file is
  written whole and renamed into place before the row naming it is committed, so a committed row
  always has its files.
- An inspection's id is 128 random bits (hex): its image URL cannot be guessed.
- Model versions (`models/v<N>-<sha12>.safetensors`) are numbered 1, 2, ...; exactly one is
  active. Each knows its parent (the version it was updated from), thresholds and validation
  figures; every inspection records the version that scored it.
- The schema is created and upgraded by Alembic migrations (`anomalens/deploy/migrations`).
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from anomalens.errors import DataError
from anomalens.evaluation.viz import heatmap_levels_png, heatmap_png_from_levels

VERDICTS = ("defect", "false_alarm", "normal")
"""A review: "defect" confirms an anomaly; "false_alarm" (an image called anomalous that is
normal) and "normal" (any image the engineer marks as normal) make the image one to learn from."""
NORMAL_VERDICTS = ("false_alarm", "normal")


class UTCDateTime(TypeDecorator[datetime]):
    """A UTC time: stored without a zone (SQLite keeps none), always read back as UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    file: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    model: Mapped[str] = mapped_column(String(64))
    image_threshold: Mapped[float] = mapped_column(Float)
    pixel_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_train_images: Mapped[int] = mapped_column(Integer)
    validation: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(32))
    parent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=False)


class Inspection(Base):
    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"), index=True)
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    anomalous: Mapped[bool] = mapped_column(Boolean, index=True)
    regions: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    heatmap_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    review: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    review_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    reviewed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    learned_in: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Review(Base):
    """Every review ever made (the inspection row holds the latest)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(ForeignKey("inspections.id"), index=True)
    verdict: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    reviewer: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


@dataclass
class NewInspection:
    """What the service hands the store for one scored image."""

    filename: str
    image: bytes
    width: int
    height: int
    model_version: int
    score: float
    threshold: float
    anomalous: bool
    regions: list[dict[str, Any]]
    anomaly_map: np.ndarray | None = None
    pixel_threshold: float | None = None


STORED_HEATMAP_SIDE = 512


def now() -> datetime:
    return datetime.now(UTC)


def database_url(data_dir: Path, url: str | None) -> str:
    """`url`, or the SQLite file `inspections.db` in `data_dir`. A PostgreSQL URL that names no
    driver (`postgresql://...`, `postgres://...`) gets psycopg 3, the one anomalens installs
    (SQLAlchemy's default for it is psycopg2)."""
    if not url:
        return f"sqlite:///{data_dir / 'inspections.db'}"
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare) :]
    return url


def shown_url(url: str) -> str:
    """The database URL with any password replaced by ***, for messages and logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a killed process
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("anomalens.deploy").joinpath("migrations"))
    )
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class InspectionStore:
    """The station's database and data directory."""

    def __init__(self, data_dir: str | Path, url: str | None = None, *, upgrade: bool = True):
        self.data_dir = Path(data_dir)
        for folder in ("images", "heatmaps", "models", "tmp"):
            (self.data_dir / folder).mkdir(parents=True, exist_ok=True)
        self.url = database_url(self.data_dir, url)
        try:
            self.engine = create_engine(self.url, pool_pre_ping=True)
        except Exception as error:
            raise DataError(f"cannot use the database {shown_url(self.url)}: {error}") from error
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        if upgrade:
            try:
                migrate(self.engine)
            except Exception as error:
                reason = str(error).splitlines()[0]
                raise DataError(
                    f"cannot open the database {shown_url(self.url)}: {reason}"
                ) from error

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---- files ----------------------------------------------------------------------------
    def _put(self, folder: str, data: bytes, suffix: str = "") -> str:
        """Write `data` under `folder` named by its SHA-256 (once; whole, then renamed)."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.data_dir / folder / digest[:2] / f"{digest}{suffix}"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            partial = self.data_dir / "tmp" / f"{digest}.{secrets.token_hex(4)}"
            with open(partial, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        return digest

    def _put_heatmap(self, item: NewInspection) -> str | None:
        if item.anomaly_map is None:
            return None
        threshold = item.pixel_threshold
        if threshold is None:  # no pixel threshold: colour by the map's own range
            threshold = float(item.anomaly_map.max())
        png = heatmap_levels_png(item.anomaly_map, threshold, STORED_HEATMAP_SIDE)
        return self._put("heatmaps", png, ".png")

    def image_path(self, inspection: Inspection) -> Path:
        digest = inspection.image_sha256
        return self.data_dir / "images" / digest[:2] / digest

    def heatmap_path(self, inspection: Inspection) -> Path | None:
        digest = inspection.heatmap_sha256
        return None if digest is None else self.data_dir / "heatmaps" / digest[:2] / f"{digest}.png"

    def heatmap_png(self, inspection: Inspection) -> bytes | None:
        """The inspection's heatmap as an RGBA PNG (as `?heatmap=true` answers it), or None."""
        path = self.heatmap_path(inspection)
        if path is None:
            return None
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            coloured = image.mode == "RGBA"  # a heatmap kept whole
        return data if coloured else heatmap_png_from_levels(data)

    # ---- inspections ----------------------------------------------------------------------
    def add(self, items: Sequence[NewInspection]) -> list[str]:
        """Store the images and heatmaps, then the rows in one transaction; their ids."""
        rows = []
        for item in items:
            image_format = _image_format(item.image)
            rows.append(
                Inspection(
                    id=secrets.token_hex(16),
                    created_at=now(),
                    filename=item.filename[:255],
                    image_sha256=self._put("images", item.image),
                    image_format=image_format,
                    width=item.width,
                    height=item.height,
                    model_version=item.model_version,
                    score=item.score,
                    threshold=item.threshold,
                    anomalous=item.anomalous,
                    regions=item.regions,
                    heatmap_sha256=self._put_heatmap(item),
                )
            )
        with self.session() as session, session.begin():
            session.add_all(rows)
        return [row.id for row in rows]

    def get(self, inspection_id: str) -> Inspection | None:
        with self.session() as session:
            return session.get(Inspection, inspection_id)

    def list(
        self,
        *,
        label: str | None = None,
        review: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: int | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Inspection], int]:
        """Inspections newest first, filtered: `label` "anomalous"/"normal"; `review` one of
        `VERDICTS`, "reviewed" or "unreviewed"; a time range; a model version. (page, total)."""
        query = select(Inspection)
        if label is not None:
            query = query.where(Inspection.anomalous.is_(label == "anomalous"))
        if review == "unreviewed":
            query = query.where(Inspection.review.is_(None))
        elif review == "reviewed":
            query = query.where(Inspection.review.is_not(None))
        elif review is not None:
            query = query.where(Inspection.review == review)
        if since is not None:
            query = query.where(Inspection.created_at >= since)
        if until is not None:
            query = query.where(Inspection.created_at < until)
        if model_version is not None:
            query = query.where(Inspection.model_version == model_version)
        with self.session() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery()))
            page = session.scalars(
                query.order_by(Inspection.created_at.desc(), Inspection.id)
                .limit(limit)
                .offset(offset)
            ).all()
        return list(page), int(total or 0)

    def review(
        self, inspection_id: str, verdict: str, note: str | None, reviewer: str
    ) -> Inspection:
        if verdict not in VERDICTS:
            raise DataError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        with self.session() as session, session.begin():
            inspection = session.get(Inspection, inspection_id)
            if inspection is None:
                raise KeyError(inspection_id)
            stamp = now()
            inspection.review, inspection.review_note = verdict, note
            inspection.reviewed_by, inspection.reviewed_at = reviewer, stamp
            session.add(
                Review(
                    inspection_id=inspection_id,
                    verdict=verdict,
                    note=note,
                    reviewer=reviewer,
                    created_at=stamp,
                )
            )
        return inspection

    def reviewed(self, verdicts: Iterable[str]) -> list[Inspection]:
        """Reviewed inspections with one of `verdicts`, oldest first."""
        with self.session() as session:
            query = select(Inspection).where(Inspection.review.in_(list(verdicts)))
            return list(session.scalars(query.order_by(Inspection.created_at, Inspection.id)))

    def recent_normal(self, versions: Sequence[int], limit: int) -> list[Inspection]:
        """The newest `limit` unreviewed inspections that one of `versions` labelled normal."""
        query = (
            select(Inspection)
            .where(Inspection.model_version.in_(list(versions)))
            .where(Inspection.anomalous.is_(False))
            .where(Inspection.review.is_(None))
            .order_by(Inspection.created_at.desc())
            .limit(limit)
        )
        with self.session() as session:
            return list(session.scalars(query))

    def mark_learned(self, inspection_ids: Sequence[str], version: int) -> None:
        with self.session() as session, session.begin():
            session.execute(
                update(Inspection)
                .where(Inspection.id.in_(list(inspection_ids)))
                .values(learned_in=version)
            )

    def recent_scores(
        self, version: int, window: int, *, anomalous: bool | None = None
    ) -> list[tuple[datetime, float, bool]]:
        """The newest `window` (time, score, anomalous) of `version`'s inspections, oldest first."""
        query = select(Inspection.created_at, Inspection.score, Inspection.anomalous).where(
            Inspection.model_version == version
        )
        if anomalous is not None:
            query = query.where(Inspection.anomalous.is_(anomalous))
        query = query.order_by(Inspection.created_at.desc()).limit(window)
        with self.session() as session:
            rows = session.execute(query).all()
        return [(row[0], float(row[1]), bool(row[2])) for row in reversed(rows)]

    def first_scores(
        self, version: int, count: int, *, anomalous: bool
    ) -> list[tuple[datetime, float]]:
        """The oldest `count` (time, score) of `version`'s inspections with that label."""
        query = (
            select(Inspection.created_at, Inspection.score)
            .where(Inspection.model_version == version)
            .where(Inspection.anomalous.is_(anomalous))
            .order_by(Inspection.created_at, Inspection.id)
            .limit(count)
        )
        with self.session() as session:
            return [(row[0], float(row[1])) for row in session.execute(query).all()]

    def count(self) -> int:
        with self.session() as session:
            return int(session.scalar(select(func.count()).select_from(Inspection)) or 0)

    def all_ids(self) -> set[str]:
        with self.session() as session:
            return set(session.scalars(select(Inspection.id)))

    # ---- model versions -------------------------------------------------------------------
    def versions(self) -> list[ModelVersion]:
        with self.session() as session:
            return list(session.scalars(select(ModelVersion).order_by(ModelVersion.version)))

    def version(self, number: int) -> ModelVersion | None:
        with self.session() as session:
            return session.get(ModelVersion, number)

    def active(self) -> ModelVersion | None:
        with self.session() as session:
            return session.scalars(select(ModelVersion).where(ModelVersion.active)).first()

    def model_file(self, version: ModelVersion) -> Path:
        return self.data_dir / "models" / version.file

    def add_version(
        self,
        model_file: Path,
        config: dict[str, Any],
        validation: dict[str, Any],
        *,
        source: str,
        parent: int | None,
        activate: bool,
    ) -> ModelVersion:
        """Copy `model_file` into the data directory as the next version (or return the version
        that already has these bytes), optionally making it the active one."""
        digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
        with self.session() as session:
            known = session.scalars(
                select(ModelVersion).where(ModelVersion.sha256 == digest)
            ).first()
        if known is not None:
            if activate:
                self.activate(known.version)
            return self.version(known.version) or known
        fitted = config["fitted"]
        for _ in range(5):  # two worker processes may number a version at once: retry
            with self.session() as session:
                number = int(session.scalar(select(func.max(ModelVersion.version))) or 0) + 1
            name = f"v{number}-{digest[:12]}{model_file.suffix}"
            target = self.data_dir / "models" / name
            if not target.exists():
                partial = self.data_dir / "tmp" / f"{name}.{secrets.token_hex(4)}"
                shutil.copyfile(model_file, partial)
                os.replace(partial, target)
            row = ModelVersion(
                version=number,
                created_at=now(),
                file=name,
                sha256=digest,
                model=config["model"],
                image_threshold=float(fitted["image_threshold"]),
                pixel_threshold=fitted.get("pixel_threshold"),
                n_train_images=int(fitted["n_train_images"]),
                validation=validation,
                source=source,
                parent=parent,
                active=False,
            )
            try:
                with self.session() as session, session.begin():
                    session.add(row)
            except IntegrityError:
                with self.session() as session:
                    known = session.scalars(
                        select(ModelVersion).where(ModelVersion.sha256 == digest)
                    ).first()
                if known is not None:
                    row = known
                    break
                continue
            break
        else:
            raise DataError("could not number the new model version (concurrent updates)")
        if activate:
            self.activate(row.version)
        return self.version(row.version) or row

    def activate(self, number: int) -> ModelVersion:
        with self.session() as session, session.begin():
            if session.get(ModelVersion, number) is None:
                raise KeyError(number)
            session.execute(update(ModelVersion).values(active=ModelVersion.version == number))
        return self.version(number)  # type: ignore[return-value]

    def lineage(self, number: int) -> list[int]:
        """`number` and the versions it was updated from, newest first."""
        parents = {v.version: v.parent for v in self.versions()}
        chain: list[int] = []
        current: int | None = number
        while current is not None and current not in chain:
            chain.append(current)
            current = parents.get(current)
        return chain

    # ---- export ---------------------------------------------------------------------------
    def export_reviews(self, folder: Path) -> dict[str, int]:
        """The reviewed images as an MVTec-layout test folder: `test/good/` (false alarms and
        images marked normal) and `test/defect/` (confirmed defects), each named
        `<inspection id>.<format>`. Returns the counts written."""
        counts = {"good": 0, "defect": 0}
        for inspection in self.reviewed(VERDICTS):
            kind = "defect" if inspection.review == "defect" else "good"
            target = folder / "test" / kind
            target.mkdir(parents=True, exist_ok=True)
            name = f"{inspection.id}.{inspection.image_format}"
            shutil.copyfile(self.image_path(inspection), target / name)
            counts[kind] += 1
        return counts


def _image_format(data: bytes) -> str:
    """The upload's file format as a file extension ("png", "jpeg", ...); the service only stores
    images it could decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.format or "bin").lower()
    except Exception:
        return "bin"
