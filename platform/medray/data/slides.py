"""Whole-slide images through OpenSlide (the `openslide-bin` wheel: no system library):
Aperio SVS, Hamamatsu NDPI, generic tiled TIFF (e.g. written by tifffile), MIRAX, ...

A slide is never cut into files. The import plans tiles: a tissue mask on a low-resolution
pyramid level (Otsu's threshold on colour saturation: stained tissue is coloured, glass is
white or grey),
a grid of `tile_size` tiles at a target microns per pixel (read from the pyramid level just
finer than the target, resized) or at a fixed level, and at most `max_tiles` of the tiles
that are mostly tissue. Each tile is a manifest URI naming its region,
`slide.svs#level=L&x=X&y=Y&w=W&size=S` (x, y in level-0 pixels, a W x W read at level L,
resized to S x S), and `read_region` reads it whenever a stage needs the pixels.

Slides on S3 are copied once per machine into a local cache (`$MEDRAY_SLIDE_CACHE`, default
~/.cache/medray/slides): OpenSlide reads local files only.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medray import storage
from medray.data.decode import DecodeError, fragment_uri, to_rgb8

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                  ".bif")  # fmt: skip
"""Files the slides importer opens; others in the source are quarantined as not slides."""
MASK_PIXELS_PER_TILE = 8
"""The mask level is the coarsest one that still gives a tile this many mask pixels a side."""
MASK_MAX_SIDE = 4096
"""A mask level larger than this is replaced by a thumbnail of this long side."""
MIN_SATURATION = 20
"""Floor for the Otsu threshold (0..255): a blank slide's noise is never called tissue."""
_OPEN_SLIDES = 16
_handles: OrderedDict[str, Any] = OrderedDict()
_handles_lock = threading.Lock()


@dataclass(frozen=True)
class Tile:
    level: int
    x: int
    """Top-left, level-0 pixels."""
    y: int
    w: int
    """Side read at `level`, in that level's pixels."""
    size: int
    """Side of the tile the model sees."""
    mpp: float | None
    """Microns per pixel of the tile as seen (None when the slide does not say)."""
    tissue: float
    """Fraction of the tile the mask calls tissue."""

    def uri(self, slide_uri: str) -> str:
        return fragment_uri(slide_uri, level=self.level, x=self.x, y=self.y, w=self.w,
                            size=self.size)  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("MEDRAY_SLIDE_CACHE") or Path.home() / ".cache/medray/slides")


def local_slide(uri: str) -> str:
    """A local path for the slide at `uri`: itself, or its copy in the cache (S3)."""
    if not storage.is_s3(uri):
        return uri
    key = hashlib.sha1(uri.encode()).hexdigest()[:16]
    path = cache_dir() / key / (uri.rsplit("/", 1)[-1] or "slide")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(storage.read_bytes(uri))
        os.replace(tmp, path)
    return str(path)


def open_slide(uri: str) -> Any:
    """An OpenSlide handle, kept open for the next tile of the same slide (LRU per process).
    DecodeError when OpenSlide cannot read the file; storage errors propagate."""
    import openslide

    with _handles_lock:
        if uri in _handles:
            _handles.move_to_end(uri)
            return _handles[uri]
    path = local_slide(uri)
    if not Path(path).exists():
        raise FileNotFoundError(f"{uri}: file not found")
    try:
        slide = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise DecodeError(uri, f"unreadable slide (OpenSlide: {exc})") from None
    with _handles_lock:
        _handles[uri] = slide
        while len(_handles) > _OPEN_SLIDES:  # dropped, not closed: a reader may still hold it
            _handles.popitem(last=False)
    return slide


def read_region(slide_uri: str, params: dict[str, int], name: str = "") -> np.ndarray:
    """The tile `params` (level, x, y, w, size) of a slide as uint8 (size, size, 3) RGB;
    transparent (outside the scanned area) is white."""
    import openslide

    level, w, size = params["level"], params["w"], params["size"]
    if w <= 0 or size <= 0:
        raise DecodeError(name or slide_uri, f"bad tile side w={w} size={size}")
    slide = open_slide(slide_uri)
    if not 0 <= level < slide.level_count:
        raise DecodeError(name or slide_uri, f"level {level} does not exist")
    try:
        region = slide.read_region((params["x"], params["y"]), level, (w, w))
    except openslide.OpenSlideError as exc:
        raise DecodeError(name or slide_uri, f"unreadable slide region ({exc})") from None
    if w != size:
        resample = Image.Resampling.BOX if w > size else Image.Resampling.BICUBIC
        region = region.resize((size, size), resample)
    return to_rgb8(np.asarray(region), name or slide_uri)


def base_mpp(slide: Any) -> float | None:
    """Microns per level-0 pixel (x), None when the slide does not record it."""
    value = slide.properties.get("openslide.mpp-x")
    try:
        mpp = float(value) if value is not None else None
    except ValueError:
        return None
    return mpp if mpp and mpp > 0 else None


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (N. Otsu, "A threshold selection method from
    gray-level histograms", IEEE Trans. SMC 1979): maximises the between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    weight = hist.cumsum()
    total = weight[-1]
    if total == 0:
        return 0
    mean = (hist * np.arange(256)).cumsum()
    w0, w1 = weight, total - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean[-1] * w0 - mean * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return int(np.argmax(between))


def tissue_mask(slide: Any, step: int) -> np.ndarray:
    """Bool mask over the whole slide at low resolution (the coarsest level that gives tiles
    of `step` level-0 pixels `MASK_PIXELS_PER_TILE` mask pixels a side): saturation above
    max(Otsu, MIN_SATURATION)."""
    fine_enough = [i for i, d in enumerate(slide.level_downsamples)
                   if step / float(d) >= MASK_PIXELS_PER_TILE]  # fmt: skip
    level = fine_enough[-1] if fine_enough else 0
    width, height = slide.level_dimensions[level]
    if max(width, height) > MASK_MAX_SIDE:
        image = slide.get_thumbnail((MASK_MAX_SIDE, MASK_MAX_SIDE))
    else:
        image = slide.read_region((0, 0), level, (width, height))
    rgb = to_rgb8(np.asarray(image), "tissue mask").astype(np.int16)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(high > 0, (high - low) * 255 // np.maximum(high, 1), 0)
    saturation = saturation.astype(np.uint8)
    return saturation > max(otsu_threshold(saturation), MIN_SATURATION)


def read_geometry(
    slide: Any, tile_size: int, mpp: float | None, level: int | None
) -> tuple[int, int, float | None]:
    """(level to read, side to read there, tile mpp) for tiles of `tile_size` at `mpp`
    microns per pixel, or at pyramid `level` when given. ValueError says why not."""
    base = base_mpp(slide)
    downsamples = [float(d) for d in slide.level_downsamples]
    if level is not None:
        if not 0 <= level < len(downsamples):
            raise ValueError(f"level {level} does not exist ({len(downsamples)} levels)")
        return level, tile_size, base * downsamples[level] if base else None
    if mpp is None:
        raise ValueError("give a target mpp or a level")
    if base is None:
        raise ValueError("the slide records no microns per pixel; import it with a level")
    factor = mpp / base  # level-0 pixels per tile pixel
    if factor < 0.9:
        raise ValueError(f"scanned at {base:g} mpp, coarser than the target {mpp:g} mpp")
    read_level = max(i for i, d in enumerate(downsamples) if d <= factor * 1.01 or i == 0)
    side = max(1, round(tile_size * factor / downsamples[read_level]))
    return read_level, side, mpp


def plan_tiles(
    slide: Any,
    tile_size: int,
    mpp: float | None,
    level: int | None,
    min_tissue: float,
    max_tiles: int,
    seed: int,
) -> list[Tile]:
    """Non-overlapping tiles whose tissue fraction is at least `min_tissue`, in row order;
    a seeded random `max_tiles` of them when there are more (0: all)."""
    read_level, side, tile_mpp = read_geometry(slide, tile_size, mpp, level)
    step = max(1, round(side * float(slide.level_downsamples[read_level])))  # level-0 pixels
    width, height = slide.dimensions
    cols, rows = width // step, height // step
    if not cols or not rows:
        return []
    mask = tissue_mask(slide, step)
    fraction = _cell_fractions(mask, cols, rows, step / width, step / height)
    ys, xs = np.nonzero(fraction >= min_tissue)
    if max_tiles and len(ys) > max_tiles:
        keep = np.sort(np.random.default_rng(seed).choice(len(ys), max_tiles, replace=False))
        ys, xs = ys[keep], xs[keep]
    return [
        Tile(read_level, int(x) * step, int(y) * step, side, tile_size, tile_mpp,
             round(float(fraction[y, x]), 3))
        for y, x in zip(ys, xs)
    ]  # fmt: skip


def _cell_fractions(mask: np.ndarray, cols: int, rows: int, fx: float, fy: float) -> np.ndarray:
    """Mean of `mask` over each grid cell (cell c covers [c*fx, (c+1)*fx) of the width)."""
    mh, mw = mask.shape
    integral = np.zeros((mh + 1, mw + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x_edges = np.minimum(np.round(np.arange(cols + 1) * fx * mw).astype(int), mw)
    y_edges = np.minimum(np.round(np.arange(rows + 1) * fy * mh).astype(int), mh)
    x0, x1 = x_edges[:-1], np.maximum(x_edges[1:], x_edges[:-1] + 1).clip(max=mw)
    y0, y1 = y_edges[:-1], np.maximum(y_edges[1:], y_edges[:-1] + 1).clip(max=mh)
    total = (
        integral[y1[:, None], x1[None, :]]
        - integral[y0[:, None], x1[None, :]]
        - integral[y1[:, None], x0[None, :]]
        + integral[y0[:, None], x0[None, :]]
    )
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return total / np.maximum(area, 1)
