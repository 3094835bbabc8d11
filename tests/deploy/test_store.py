"""The station's store on both databases it supports: SQLite in the data directory and a real
PostgreSQL server (`postgres_server`, `tests/pg_server.py`). No model is fitted: the images are
tiny PNGs and the model versions fake files (the store only copies and hashes them)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import inspect, text

from anomalens.deploy.store import (
    STORED_HEATMAP_SIDE,
    Base,
    Inspection,
    InspectionStore,
    NewInspection,
    Review,
    database_url,
)
from anomalens.errors import DataError
from anomalens.evaluation.viz import heatmap_levels_png, heatmap_png, heatmap_png_from_levels

CONFIG = {
    "model": "patchcore",
    "fitted": {"image_threshold": 1.0, "pixel_threshold": 0.5, "n_train_images": 10},
}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the data directory) or an empty PostgreSQL database of the test's own."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def store(tmp_path: Path, url: str | None):
    store = InspectionStore(tmp_path / "data", url)
    yield store
    store.close()


def png(value: int, size: tuple[int, int] = (8, 6), kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value % 256, (value * 7) % 256, 3)).save(buffer, kind)
    return buffer.getvalue()


def model_file(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model-{content.hex()[:8]}.safetensors"
    path.write_bytes(content)
    return path


def add_version(store: InspectionStore, tmp_path: Path, content: bytes, **kwargs):
    options = {"source": "file", "parent": None, "activate": True} | kwargs
    return store.add_version(
        model_file(tmp_path / "files", content), CONFIG, {"n_validation_images": 2}, **options
    )


def item(index: int, version: int, *, anomalous: bool = False, heatmap: bool = False):
    anomaly_map = None
    if heatmap:
        anomaly_map = np.linspace(0, 1, 6 * 8, dtype=np.float32).reshape(6, 8) * (index + 1)
    return NewInspection(
        filename=f"image-{index}.png",
        image=png(index),
        width=8,
        height=6,
        model_version=version,
        score=float(index),
        threshold=2.5,
        anomalous=anomalous,
        regions=[{"box": [0, 0, 2, 2], "area": 4}] if anomalous else [],
        anomaly_map=anomaly_map,
        pixel_threshold=0.5 if heatmap else None,
    )


def assert_same_heatmap(shown: bytes, expected: bytes) -> None:
    """Same size, same alpha; colours at most one step of the 'jet' map apart."""
    shown_rgba = np.asarray(Image.open(io.BytesIO(shown))).astype(int)
    expected_rgba = np.asarray(Image.open(io.BytesIO(expected))).astype(int)
    assert shown_rgba.shape == expected_rgba.shape and shown_rgba.shape[-1] == 4
    assert np.array_equal(shown_rgba[..., 3], expected_rgba[..., 3])
    assert np.abs(shown_rgba[..., :3] - expected_rgba[..., :3]).max() <= 5


def test_kept_heatmap_levels_colour_as_the_live_heatmap() -> None:
    rng = np.random.default_rng(0)
    anomaly_map = rng.gamma(2.0, 0.5, size=(300, 700)).astype(np.float32)  # shrunk to 512 wide
    for threshold in (1.0, 2.5, 0.0):
        levels = heatmap_levels_png(anomaly_map, threshold, 512)
        assert Image.open(io.BytesIO(levels)).size == (512, 219)
        assert_same_heatmap(
            heatmap_png_from_levels(levels), heatmap_png(anomaly_map, threshold, 512)
        )


def test_a_postgresql_url_without_a_driver_gets_psycopg(tmp_path) -> None:
    assert database_url(tmp_path, None) == f"sqlite:///{tmp_path / 'inspections.db'}"
    for url in ("postgresql://u@h/db", "postgres://u@h/db"):
        assert database_url(tmp_path, url) == "postgresql+psycopg://u@h/db"
    assert database_url(tmp_path, "postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url(tmp_path, "sqlite:////x.db") == "sqlite:////x.db"


def test_migrations_create_the_schema_and_reopening_is_a_no_op(tmp_path, url) -> None:
    store = InspectionStore(tmp_path / "data", url)
    dialect = store.engine.dialect.name
    assert dialect == ("sqlite" if url is None else "postgresql")
    schema = inspect(store.engine)
    assert set(schema.get_table_names()) == {
        "alembic_version",
        "model_versions",
        "inspections",
        "reviews",
    }
    for table in Base.metadata.sorted_tables:  # the migration builds what the models describe
        columns = {c["name"]: c for c in schema.get_columns(table.name)}
        assert set(columns) == set(table.columns.keys()), table.name
        for column in table.columns:
            assert columns[column.name]["nullable"] == column.nullable, (table.name, column.name)
    indexed = {tuple(i["column_names"]) for i in schema.get_indexes("inspections")}
    assert {("created_at",), ("image_sha256",), ("anomalous",), ("review",)} <= indexed
    version = add_version(store, tmp_path, b"model one")
    (kept,) = store.add([item(0, version.version)])
    store.close()
    if url is None:
        assert (tmp_path / "data" / "inspections.db").is_file()
        assert {p.name for p in (tmp_path / "data").iterdir()} >= {"images", "heatmaps", "models"}

    again = InspectionStore(tmp_path / "data", url)  # migrated already: nothing to do
    with again.engine.connect() as connection:
        revisions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    assert revisions == [("0001",)]
    assert again.count() == 1 and again.all_ids() == {kept}
    assert [v.version for v in again.versions()] == [1]
    again.close()
    plain = InspectionStore(tmp_path / "data", url, upgrade=False)
    assert plain.get(kept) is not None
    plain.close()


def test_a_database_that_cannot_be_opened_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match=r"cannot open the database .*\*\*\*") as caught:
        InspectionStore(tmp_path, "postgresql://someone:secret@127.0.0.1:1/nothing")
    assert "secret" not in str(caught.value)


def test_add_get_and_the_files(store: InspectionStore, tmp_path) -> None:
    version = add_version(store, tmp_path, b"model one").version
    items = [item(0, version), item(1, version, anomalous=True, heatmap=True), item(0, version)]
    ids = store.add(items)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)  # 128 random bits, hex
    assert store.count() == 3 and store.all_ids() == set(ids)
    first, anomalous, repeat = (store.get(i) for i in ids)
    assert first is not None and anomalous is not None and repeat is not None
    assert first.filename == "image-0.png" and (first.width, first.height) == (8, 6)
    assert first.image_format == "png" and first.model_version == version
    assert first.score == 0.0 and first.threshold == 2.5 and first.anomalous is False
    assert first.regions == [] and first.heatmap_sha256 is None
    assert store.heatmap_path(first) is None and first.review is None
    assert anomalous.anomalous is True and anomalous.regions == [{"box": [0, 0, 2, 2], "area": 4}]
    # The uploaded bytes are kept as they came, once per content.
    assert store.image_path(first).read_bytes() == png(0)
    assert store.image_path(anomalous).read_bytes() == png(1)
    assert repeat.image_sha256 == first.image_sha256
    assert len(list((store.data_dir / "images").rglob("*"))) == 2 + 2  # 2 files, 2 folders
    kept = Image.open(store.heatmap_path(anomalous))  # the levels, in one channel
    assert kept.format == "PNG" and kept.mode == "L" and kept.size == (8, 6)
    shown = store.heatmap_png(anomalous)
    expected = heatmap_png(items[1].anomaly_map, 0.5, STORED_HEATMAP_SIDE)
    assert_same_heatmap(shown, expected)
    assert store.heatmap_png(first) is None
    store.heatmap_path(anomalous).write_bytes(expected)  # a heatmap kept whole: served as it is
    assert store.heatmap_png(anomalous) == expected
    assert store.get("0" * 32) is None
    assert not list((store.data_dir / "tmp").iterdir())  # written whole, then renamed


def test_list_filters_and_pages(store: InspectionStore, tmp_path) -> None:
    one = add_version(store, tmp_path, b"model one").version
    two = add_version(store, tmp_path, b"model two", parent=one).version
    ids = []
    for index in range(7):
        ids += store.add([item(index, one if index < 4 else two, anomalous=index % 3 == 0)])
    newest_first = list(reversed(ids))
    page, total = store.list()
    assert total == 7 and [r.id for r in page] == newest_first
    seen = []
    for offset in range(0, 7, 3):
        page, total = store.list(limit=3, offset=offset)
        assert total == 7 and len(page) == min(3, 7 - offset)
        seen += [r.id for r in page]
    assert seen == newest_first
    page, total = store.list(label="anomalous")
    assert total == 3 and {r.id for r in page} == {ids[0], ids[3], ids[6]}
    assert store.list(label="normal")[1] == 4
    assert {r.id for r in store.list(model_version=two)[0]} == set(ids[4:])
    store.review(ids[1], "false_alarm", None, "ann")
    store.review(ids[3], "defect", "crack", "ann")
    assert {r.id for r in store.list(review="reviewed")[0]} == {ids[1], ids[3]}
    assert store.list(review="unreviewed")[1] == 5
    assert [r.id for r in store.list(review="defect")[0]] == [ids[3]]
    assert store.list(review="normal")[1] == 0
    assert store.list(label="anomalous", review="unreviewed", model_version=two)[1] == 1
    # Time ranges: since inclusive, until exclusive, any time zone.
    middle = store.get(ids[3]).created_at
    assert {r.id for r in store.list(since=middle)[0]} == set(ids[3:])
    assert {r.id for r in store.list(until=middle)[0]} == set(ids[:3])
    elsewhere = middle.astimezone(timezone(timedelta(hours=-5)))
    assert {r.id for r in store.list(since=elsewhere)[0]} == set(ids[3:])
    assert store.list(since=middle + timedelta(days=1))[1] == 0
    # What the drift watch and updates read.
    scores = store.recent_scores(one, 3)
    assert [score for _, score, _ in scores] == [1.0, 2.0, 3.0]  # the newest 3, oldest first
    assert [s for _, s, _ in store.recent_scores(one, 10, anomalous=True)] == [0.0, 3.0]
    normal = store.recent_normal([one, two], 10)  # unreviewed, labelled normal, newest first
    assert [r.id for r in normal] == [ids[5], ids[4], ids[2]]
    store.mark_learned([ids[2], ids[4]], two)
    assert store.get(ids[2]).learned_in == two and store.get(ids[5]).learned_in is None


def test_reviews(store: InspectionStore, tmp_path) -> None:
    version = add_version(store, tmp_path, b"model one").version
    first, second = store.add([item(0, version, anomalous=True), item(1, version)])
    reviewed = store.review(first, "false_alarm", "dust on the lens", "ann")
    assert reviewed.review == "false_alarm" and reviewed.review_note == "dust on the lens"
    assert reviewed.reviewed_by == "ann"
    store.review(first, "defect", None, "bob")  # the latest review counts; all are kept
    row = store.get(first)
    assert (row.review, row.review_note, row.reviewed_by) == ("defect", None, "bob")
    store.review(second, "normal", None, "ann")
    with store.session() as session:
        history = session.query(Review).order_by(Review.id).all()
    assert [(r.inspection_id, r.verdict, r.reviewer) for r in history] == [
        (first, "false_alarm", "ann"),
        (first, "defect", "bob"),
        (second, "normal", "ann"),
    ]
    assert [r.id for r in store.reviewed(["false_alarm", "normal"])] == [second]
    assert [r.id for r in store.reviewed(["defect", "normal"])] == [first, second]
    with pytest.raises(DataError, match="verdict must be one of"):
        store.review(first, "maybe", None, "ann")
    with pytest.raises(KeyError):
        store.review("f" * 32, "defect", None, "ann")
    assert store.get(first).review == "defect"


def test_versions_activation_and_lineage(store: InspectionStore, tmp_path) -> None:
    assert store.versions() == [] and store.active() is None
    one = add_version(store, tmp_path, b"model one")
    assert (one.version, one.active, one.source, one.parent) == (1, True, "file", None)
    assert one.model == "patchcore" and one.image_threshold == 1.0 and one.pixel_threshold == 0.5
    assert one.n_train_images == 10 and one.validation == {"n_validation_images": 2}
    assert store.model_file(one).read_bytes() == b"model one"
    assert one.file.startswith("v1-") and one.file.endswith(".safetensors")
    same = add_version(store, tmp_path, b"model one", activate=False)  # the same bytes
    assert same.version == 1 and len(store.versions()) == 1
    two = add_version(store, tmp_path, b"model two", source="reviews", parent=1, activate=False)
    three = add_version(store, tmp_path, b"model three", source="reviews", parent=2)
    assert (two.version, two.active, two.parent) == (2, False, 1)
    assert three.active and store.active().version == 3
    assert [(v.version, v.active) for v in store.versions()] == [(1, False), (2, False), (3, True)]
    assert store.activate(1).active and store.active().version == 1  # roll back
    assert [v.active for v in store.versions()] == [True, False, False]
    assert store.lineage(3) == [3, 2, 1] and store.lineage(1) == [1]
    with pytest.raises(KeyError):
        store.activate(9)
    assert store.active().version == 1
    assert store.version(2).source == "reviews" and store.version(9) is None
    assert len(list((store.data_dir / "models").iterdir())) == 3


def test_timestamps_are_utc_aware(store: InspectionStore, tmp_path) -> None:
    before = datetime.now(UTC)
    version = add_version(store, tmp_path, b"model one")
    (kept,) = store.add([item(0, version.version)])
    store.review(kept, "normal", None, "ann")
    after = datetime.now(UTC)
    row = store.get(kept)
    stamps = [
        row.created_at,
        row.reviewed_at,
        store.version(1).created_at,
        store.list()[0][0].created_at,
        store.recent_scores(1, 1)[0][0],
    ]
    for stamp in stamps:
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=1) <= stamp <= after + timedelta(seconds=1)
    if store.engine.dialect.name == "postgresql":  # stored as UTC whatever the session's zone
        with store.engine.connect() as connection:
            connection.execute(text("SET TIME ZONE 'America/New_York'"))
            stored = connection.execute(text("SELECT created_at FROM inspections")).scalar_one()
        assert abs(stored - row.created_at.replace(tzinfo=None)) < timedelta(seconds=1)


def test_export_reviews_writes_the_mvtec_layout(store: InspectionStore, tmp_path) -> None:
    version = add_version(store, tmp_path, b"model one").version
    jpeg = item(5, version)
    jpeg.image = png(5, kind="JPEG")
    ids = store.add([item(0, version), item(1, version), item(2, version), jpeg, item(4, version)])
    store.review(ids[0], "defect", None, "ann")
    store.review(ids[1], "false_alarm", None, "ann")
    store.review(ids[2], "normal", None, "ann")
    store.review(ids[3], "defect", None, "ann")
    out = tmp_path / "export"
    assert store.export_reviews(out) == {"good": 2, "defect": 2}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [
            f"test/defect/{ids[0]}.png",
            f"test/defect/{ids[3]}.jpeg",
            f"test/good/{ids[1]}.png",
            f"test/good/{ids[2]}.png",
        ]
    )
    assert (out / "test" / "defect" / f"{ids[3]}.jpeg").read_bytes() == jpeg.image
    assert (out / "test" / "good" / f"{ids[1]}.png").read_bytes() == png(1)
    assert isinstance(store.get(ids[4]), Inspection)  # unreviewed: not exported
