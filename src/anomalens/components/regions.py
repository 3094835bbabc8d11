"""Defect regions: the connected components of a predicted mask, measured on the anomaly map."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from anomalens.errors import DataError, ParameterError

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Region:
    """One connected component of a mask (8-connected), in pixels of the mask's image.

    box: (x0, y0, x1, y1), x0/y0 inclusive, x1/y1 exclusive.
    area: pixels in the component; area_fraction: area / the image's pixels.
    centroid: (x, y), the mean of the component's pixel indices (pixel (x, y) is at (x, y)).
    max_score, mean_score: the anomaly map's maximum and mean over the component.
    """

    box: tuple[int, int, int, int]
    area: int
    area_fraction: float
    centroid: tuple[float, float]
    max_score: float
    mean_score: float

    def to_dict(self) -> dict[str, Any]:
        """The region as JSON-ready plain values (tuples as lists)."""
        return {
            "box": list(self.box),
            "area": self.area,
            "area_fraction": self.area_fraction,
            "centroid": list(self.centroid),
            "max_score": self.max_score,
            "mean_score": self.mean_score,
        }


def check_min_area(value: Any, field: str = "min_area") -> int:
    """`value` as an int; a `ParameterError` naming `field` unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ParameterError(f"{field} must be a whole number of pixels >= 0, got {value!r}")
    return int(value)


def find_regions(
    anomaly_map: np.ndarray, mask: np.ndarray, min_area: int = 0
) -> tuple[Region, ...]:
    """The 8-connected components of `mask` (HxW bool) with at least `min_area` pixels, measured
    on `anomaly_map` (HxW), highest `max_score` first."""
    min_area = check_min_area(min_area)
    if anomaly_map.shape != mask.shape:
        raise DataError(f"anomaly map {anomaly_map.shape} and mask {mask.shape} differ in shape")
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    # Each measurement is one pass over the mask's pixels (scipy's labelled `maximum` sorts the
    # whole image and `center_of_mass` rescans it): the same sums, in the same order.
    pixels = np.flatnonzero(mask)
    numbers = labels.ravel()[pixels]
    areas = np.bincount(numbers, minlength=count + 1)
    kept = np.flatnonzero(areas[1:] >= min_area) + 1
    if not kept.size:
        return ()
    values = anomaly_map.ravel()[pixels].astype(np.float64)  # one dtype: `maximum.at` is fast
    maxima = np.full(count + 1, -np.inf)
    np.maximum.at(maxima, numbers, values)
    weights = (values, *np.divmod(pixels, mask.shape[1]))
    means, ys, xs = (np.bincount(numbers, w, count + 1)[kept] / areas[kept] for w in weights)
    boxes = ndimage.find_objects(labels)
    regions = []
    for number, mean, y, x in zip(kept, means, ys, xs, strict=True):
        rows, columns = boxes[number - 1]
        regions.append(
            Region(
                box=(columns.start, rows.start, columns.stop, rows.stop),
                area=int(areas[number]),
                area_fraction=float(areas[number] / mask.size),
                centroid=(float(x), float(y)),
                max_score=float(maxima[number]),
                mean_score=float(mean),
            )
        )
    return tuple(sorted(regions, key=lambda region: -region.max_score))
