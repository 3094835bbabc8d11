"""Heatmap overlays and a small self-contained HTML page of results."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from anomalens.components.regions import Region
from anomalens.evaluation.report import write_page

REGION_COLOUR = (255, 0, 255)
"""Magenta: the region boxes stand out from the heatmap's 'jet' colours and the white outline."""
REGION_LINE = 2
"""Width of a region box's lines, pixels."""


def heatmap_rgb(anomaly_map: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Colour (HxWx3 uint8, 'jet') and opacity (HxW in [0, 1]) for a map.

    The colour scale is fixed by the model's pixel threshold, not by the image, so heatmaps of
    different images compare: half the threshold and below is transparent blue, the threshold is
    yellow-green, 1.5x the threshold and above is opaque red.
    """
    level = _level(anomaly_map, threshold)
    colours = (colormaps["jet"](level)[..., :3] * 255).astype(np.uint8)
    return colours, level


def _level(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    scale = threshold if threshold and np.isfinite(threshold) and threshold > 0 else 1.0
    return np.clip((anomaly_map / scale - 0.5), 0.0, 1.0)


def heatmap_rgba(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """`heatmap_rgb` as one HxWx4 uint8 image whose alpha is the opacity: it can be laid over
    the picture as it is (the web page of `anomalens serve` does so)."""
    colours, level = heatmap_rgb(anomaly_map, threshold)
    alpha = (level * 255).round().astype(np.uint8)
    return np.concatenate([colours, alpha[..., None]], axis=-1)


def heatmap_png(anomaly_map: np.ndarray, threshold: float, max_side: int) -> bytes:
    """PNG bytes of `heatmap_rgba`, the map shrunk first to at most `max_side` pixels a side."""
    return _png(heatmap_rgba(_shrunk(anomaly_map, max_side), threshold))


def heatmap_levels_png(anomaly_map: np.ndarray, threshold: float, max_side: int) -> bytes:
    """The heatmap's opacity (`heatmap_rgb`'s level, 0-255) as a greyscale PNG, the map shrunk
    first to at most `max_side` pixels a side: all that `heatmap_png` shows, for keeping. One
    channel and the fastest compression make it ~10x cheaper to encode than the coloured PNG;
    `heatmap_png_from_levels` colours it when it is looked at."""
    level = _level(_shrunk(anomaly_map, max_side), threshold)
    return _png((level * 255).round().astype(np.uint8), compress_level=1)


def heatmap_png_from_levels(levels_png: bytes) -> bytes:
    """The RGBA heatmap PNG of a `heatmap_levels_png` (alpha the same as `heatmap_png`'s; a
    colour may be one step of the 256-colour 'jet' map off, the level having been rounded)."""
    with Image.open(io.BytesIO(levels_png)) as image:
        alpha = np.asarray(image.convert("L"))
    colours = (colormaps["jet"](alpha / 255.0)[..., :3] * 255).astype(np.uint8)
    return _png(np.concatenate([colours, alpha[..., None]], axis=-1))


def _shrunk(anomaly_map: np.ndarray, max_side: int) -> np.ndarray:
    height, width = anomaly_map.shape
    scale = max_side / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized = Image.fromarray(anomaly_map).resize(size, Image.Resampling.BILINEAR)
        anomaly_map = np.asarray(resized)
    return anomaly_map


def _png(array: np.ndarray, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float,
    mask: np.ndarray | None = None,
    opacity: float = 0.6,
    regions: Sequence[Region] = (),
) -> np.ndarray:
    """The image with its heatmap blended in, the predicted mask outlined in white and each
    region's box drawn in magenta (inside the box's edge)."""
    colours, level = heatmap_rgb(anomaly_map, threshold)
    alpha = (opacity * level)[..., None]
    blended = image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    result = blended.round().astype(np.uint8)
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(mask.shape) // 200))
        result[edge] = 255
    for region in regions:
        x0, y0, x1, y1 = region.box
        result[y0 : min(y0 + REGION_LINE, y1), x0:x1] = REGION_COLOUR
        result[max(y1 - REGION_LINE, y0) : y1, x0:x1] = REGION_COLOUR
        result[y0:y1, x0 : min(x0 + REGION_LINE, x1)] = REGION_COLOUR
        result[y0:y1, max(x1 - REGION_LINE, x0) : x1] = REGION_COLOUR
    return result


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def png_data_uri(array: np.ndarray, max_side: int = 256) -> str:
    """A PNG `data:` URI (for self-contained HTML), downscaled to `max_side`."""
    image = Image.fromarray(array)
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class ResultRow:
    """One image on the results page."""

    name: str
    score: float
    label: bool
    overlay: np.ndarray
    truth: str = ""
    regions: Sequence[Region] = ()


def write_results_page(
    path: str | Path,
    title: str,
    rows: Sequence[ResultRow],
    metrics: dict[str, float | None] | None = None,
    threshold: float | None = None,
) -> Path:
    """A single HTML file, images inline, listing every image most anomalous first."""
    metric_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{'n/a' if v is None else f'{v:.4f}'}</td></tr>"
        for k, v in (metrics or {}).items()
        if isinstance(v, float | int) or v is None
    )
    cards = "".join(
        f'<figure class="{"bad" if r.label else "ok"}"><img src="{png_data_uri(r.overlay)}" '
        f'alt="{html.escape(r.name)}"><figcaption>{html.escape(r.name)}<br>score '
        f"{r.score:.4g} &rarr; <b>{'ANOMALOUS' if r.label else 'normal'}</b>"
        f"{_regions_line(r.regions)}"
        f"{'<br>truth: ' + html.escape(r.truth) if r.truth else ''}</figcaption></figure>"
        for r in sorted(rows, key=lambda r: -r.score)
    )
    threshold_line = "" if threshold is None else f"<p>Image threshold: {threshold:.4g}</p>"
    body = f"""{threshold_line}<table>{metric_rows}</table>
<p>Heatmap: blue = normal, red = anomalous; white outline = predicted defect mask;
magenta boxes = its regions in an image classified anomalous.
Red frame = classified anomalous.</p>{cards}"""
    style = (
        "figure{display:inline-block;margin:.4em;padding:.3em;border:3px solid #8c8;"
        "font-size:.8em}figure.bad{border-color:#d44}img{display:block;width:200px}"
    )
    return write_page(path, title, body, style)


def _regions_line(regions: Sequence[Region]) -> str:
    """A caption line: how many regions, and the largest one's area."""
    if not regions:
        return ""
    largest = max(regions, key=lambda region: region.area)
    return (
        f"<br>{len(regions)} region{'s' if len(regions) > 1 else ''}, largest "
        f"{largest.area} px ({largest.area_fraction:.2%})"
    )
