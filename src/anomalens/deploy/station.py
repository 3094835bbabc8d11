"""The inspection station behind `anomalens serve MODEL --data-dir DIR`: the store of inspections,
the model versions, learning from the operators' reviews, and the drift watch.

- **Recording**: a writer thread stores what the inference thread scored (image, heatmap, row),
  many requests per transaction, and only then lets the request be answered: a request answered
  200 is in the store.
- **Versions**: the model file given to `serve` is version 1 (or, when the data directory already
  has it, the store's active version stays active, so a restart keeps the updates). `activate`
  swaps a version in between two batches; requests keep being answered. Worker processes notice a
  version activated by another within a second.
- **Learning from reviews**: `update_from_reviews` takes the images reviewed as false alarms or
  normal that the active version's line has not learned yet and runs `partial_fit` on them; the
  thresholds are set again on held-out ones, on the reviewed normal images learned before and on
  the newest unreviewed images the line let pass (`partial_fit`'s `old_images`: a seeded tenth of
  them). The result is stored and activated as a new version.
- **Drift**: the recent scores of images the active version called normal against a reference,
  compared by a two-sample Kolmogorov-Smirnov test (Massey, 1951); a warning when its p-value
  falls below `alpha`. The reference is by default the version's baseline, the first `window`
  images it called normal at this station; or (`reference="validation"`) the scores of the
  held-out normal images its thresholds were set on. Those come from a model fitted on fewer
  images (or, for PatchCore, a bank without the image's own patches) and run high: on a 24-image
  synthetic brick fit their median was 22.4 against 20.2 for unseen normal images (PatchCore) and
  103.7 against 69.9 (PaDiM), which a two-sample test reads as drift on an unchanged line.
"""

from __future__ import annotations

import hashlib
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

import anomalens
from anomalens.core.model_file import read_config
from anomalens.deploy.store import (
    NORMAL_VERDICTS,
    InspectionStore,
    ModelVersion,
    NewInspection,
)
from anomalens.errors import AnomalensError

DEFAULT_DRIFT_WINDOW = 200
DEFAULT_DRIFT_ALPHA = 0.01
DEFAULT_DRIFT_MIN_SAMPLES = 30
REFRESH_SECONDS = 1.0
THRESHOLD_REFERENCE_IMAGES = 500


class StationError(AnomalensError):
    """A station request that cannot be done: HTTP `status` and a short `code`."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code = status, code


@dataclass(frozen=True)
class ActiveModel:
    """A loaded model version: what scores the next batch."""

    version: int | None
    detector: Any
    model_id: str


@dataclass(eq=False)
class Record:
    """A request's scored images on their way to the store; `done` gets their inspection ids, or
    the error that kept them out."""

    items: list[NewInspection]
    done: Callable[[list[str] | Exception], None]


@dataclass
class DriftSettings:
    """`reference`: "baseline" (the first `window` normal-labelled images the version scored
    here) or "validation" (the held-out normal images its thresholds were set on)."""

    window: int = DEFAULT_DRIFT_WINDOW
    alpha: float = DEFAULT_DRIFT_ALPHA
    reference: str = "baseline"

    @property
    def min_samples(self) -> int:
        return min(DEFAULT_DRIFT_MIN_SAMPLES, self.window)


@dataclass
class _Cached:
    at: float = -1e9
    value: dict[str, Any] = field(default_factory=dict)


def model_id(config: dict[str, Any], sha256: str) -> str:
    return f"{config['model']}-{sha256[:12]}"


def validation_figures(config: dict[str, Any]) -> dict[str, Any]:
    """A version's validation figures from its model file: the held-out normal images and the
    spread of their scores."""
    fitted = config["fitted"]
    scores = fitted.get("validation_scores") or []
    figures: dict[str, Any] = {"n_validation_images": int(fitted["n_validation_images"])}
    if scores:
        figures["validation_score_median"] = float(np.median(scores))
        figures["validation_score_max"] = float(np.max(scores))
    figures["threshold_source"] = fitted.get("threshold_source")
    return figures


class Station:
    """The store, the active model version and the writer thread of one service process."""

    def __init__(
        self, store: InspectionStore, model_file: Path, drift: DriftSettings | None = None
    ) -> None:
        self.store = store
        self.drift_settings = drift or DriftSettings()
        config = read_config(model_file)
        known = {v.sha256 for v in store.versions()}
        digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
        if digest not in known or store.active() is None:
            store.add_version(
                model_file,
                config,
                validation_figures(config),
                source="file",
                parent=None,
                activate=True,
            )
        self.model = self._load(store.active())  # type: ignore[arg-type]
        self.checked_at = time.monotonic()
        self.update_lock = threading.Lock()
        self.swap_lock = threading.Lock()
        self._drift = _Cached()
        self.records: queue.SimpleQueue[Record | None] = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write, name="anomalens-store", daemon=True)
        self.writer.start()

    def close(self) -> None:
        self.records.put(None)
        self.writer.join(timeout=30)
        self.store.close()

    # ---- versions -------------------------------------------------------------------------
    def _load(self, version: ModelVersion) -> ActiveModel:
        detector = anomalens.load(self.store.model_file(version))
        return ActiveModel(
            version.version, detector, model_id({"model": version.model}, version.sha256)
        )

    def refresh(self) -> ActiveModel:
        """The model for the next batch: at most once a second, look whether another process
        activated a different version, and load it if so."""
        if time.monotonic() - self.checked_at >= REFRESH_SECONDS:
            self.checked_at = time.monotonic()
            active = self.store.active()
            if active is not None and active.version != self.model.version:
                with self.swap_lock:
                    if active.version != self.model.version:
                        self.model = self._load(active)
        return self.model

    def activate(self, number: int) -> ModelVersion:
        """Make version `number` the active one and swap it in (between two batches)."""
        version = self.store.version(number)
        if version is None:
            raise StationError(404, "not_found", f"there is no model version {number}")
        loaded = self._load(version)
        with self.swap_lock:
            self.store.activate(number)
            self.model = loaded
        return self.store.version(number)  # type: ignore[return-value]

    def update_from_reviews(self) -> ModelVersion:
        """Learn the images reviewed as normal that the active version's line has not learned,
        set the thresholds again, store the result as a new version and activate it."""
        if not self.update_lock.acquire(blocking=False):
            raise StationError(409, "busy", "a model update is already running")
        try:
            active = self.store.active()
            assert active is not None
            lineage = set(self.store.lineage(active.version))
            normals = self.store.reviewed(NORMAL_VERDICTS)
            new = [i for i in normals if i.learned_in not in lineage]
            # Thresholds rest on normal images too: those learned before, and the newest
            # unreviewed images this line of versions let pass.
            old = [i for i in normals if i.learned_in in lineage]
            old += self.store.recent_normal(sorted(lineage), THRESHOLD_REFERENCE_IMAGES)
            if len(new) < 2:
                raise StationError(
                    409,
                    "too_few_reviews",
                    f"{len(new)} image(s) reviewed as false alarm or normal are not learned yet; "
                    "an update needs at least 2",
                )
            detector = anomalens.load(self.store.model_file(active))
            if not hasattr(detector, "partial_fit"):
                raise StationError(
                    409,
                    "cannot_update",
                    "an ONNX export cannot learn; serve the .safetensors model",
                )
            try:
                detector.partial_fit(
                    [str(self.store.image_path(i)) for i in new],
                    old_images=[str(self.store.image_path(i)) for i in old],
                )
            except AnomalensError as error:
                raise StationError(409, "cannot_update", str(error)) from error
            figures = validation_figures(detector.model_config())
            figures.update(self._reviewed_figures(detector))
            with tempfile.TemporaryDirectory(dir=self.store.data_dir / "tmp") as folder:
                path = detector.save(Path(folder) / "update.safetensors")
                version = self.store.add_version(
                    path,
                    read_config(path),
                    figures,
                    source="reviews",
                    parent=active.version,
                    activate=False,
                )
            self.store.mark_learned([i.id for i in new], version.version)
            return self.activate(version.version)
        finally:
            self.update_lock.release()

    def _reviewed_figures(self, detector: Any) -> dict[str, Any]:
        """How the new version labels the reviewed images (the newest 200 of each kind)."""
        figures: dict[str, Any] = {}
        for kind, verdicts in (("defects", ("defect",)), ("normals", NORMAL_VERDICTS)):
            reviewed = self.store.reviewed(verdicts)[-200:]
            if not reviewed:
                continue
            scores = detector.decision_function([str(self.store.image_path(i)) for i in reviewed])
            flagged = int(np.sum(scores > detector.image_threshold_))
            figures[f"reviewed_{kind}"] = len(reviewed)
            figures[f"reviewed_{kind}_flagged"] = flagged
        return figures

    # ---- recording ------------------------------------------------------------------------
    def record(self, record: Record) -> None:
        self.records.put(record)

    def _write(self) -> None:
        """The writer thread: the records waiting, stored in one transaction, then answered."""
        while True:
            first = self.records.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while True:
                try:
                    more = self.records.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._store(batch)
            if stop:
                return

    def _store(self, batch: list[Record]) -> None:
        try:
            ids = self.store.add([item for record in batch for item in record.items])
        except Exception as error:
            if len(batch) > 1:  # find the record that fails; store the others
                for record in batch:
                    self._store([record])
                return
            batch[0].done(error)
            return
        start = 0
        for record in batch:
            record.done(ids[start : start + len(record.items)])
            start += len(record.items)

    # ---- drift ----------------------------------------------------------------------------
    def drift(self, max_age: float = 2.0) -> dict[str, Any]:
        """The drift test of the active version (recomputed at most every `max_age` s, and at
        once when another version has become active): the scores of its latest `window`
        normal-labelled images against its reference, a two-sided two-sample Kolmogorov-Smirnov
        test."""
        model = self.model
        cached = self._drift
        if (
            time.monotonic() - cached.at < max_age
            and cached.value["model_version"] == model.version
        ):
            return cached.value
        settings = self.drift_settings
        version = model.version or 0
        latest = self.store.recent_scores(version, settings.window)
        labels = np.asarray([anomalous for _, _, anomalous in latest], dtype=bool)
        recent = self.store.recent_scores(version, settings.window, anomalous=False)
        value: dict[str, Any] = {
            "model_version": model.version,
            "reference": settings.reference,
            "window": settings.window,
            "alpha": settings.alpha,
            "min_samples": settings.min_samples,
            "anomalous_rate": float(labels.mean()) if len(labels) else None,
            "n_reference": 0,
            "n_recent": 0,
            "statistic": None,
            "p_value": None,
            "median_shift": None,
            "warning": False,
            "reason": None,
        }
        if settings.reference == "validation":
            kept = getattr(model.detector, "validation_scores_", None)
            reference = np.asarray([] if kept is None else kept)
            if len(reference) < 2:
                value["reason"] = "the model file keeps no validation scores (fit it again)"
        else:
            baseline = self.store.first_scores(version, settings.window, anomalous=False)
            reference = np.asarray([score for _, score in baseline])
            if len(baseline) < settings.window:
                value["reason"] = (
                    f"collecting the baseline: {len(baseline)} of the first {settings.window} "
                    "normal-labelled images of this version"
                )
            else:  # the recent images are those after the baseline
                recent = [row for row in recent if row[0] > baseline[-1][0]]
        scores = np.asarray([score for _, score, _ in recent])
        value["n_reference"], value["n_recent"] = len(reference), len(scores)
        if value["reason"] is None and len(scores) < settings.min_samples:
            value["reason"] = (
                f"{len(scores)} recent normal-labelled images; "
                f"the test needs {settings.min_samples}"
            )
        if value["reason"] is None:
            test = ks_2samp(scores, reference)
            value["statistic"] = float(test.statistic)
            value["p_value"] = float(test.pvalue)
            value["warning"] = bool(test.pvalue < settings.alpha)
            value["median_shift"] = float(np.median(scores) - np.median(reference))
        self._drift = _Cached(time.monotonic(), value)
        return value
