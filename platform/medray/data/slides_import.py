"""`medray data import slides`: whole-slide images (a folder or s3:// prefix, searched
recursively) into tiles in the manifest, planned by `medray.data.slides.plan_tiles`.

A row is one tile: `uri` names the slide region (`slide.svs#level=..&x=..&y=..&w=..&size=..`)
unless `slides.write_tiles` writes PNGs; extra columns `slide` (path relative to the source),
`level`, `x`, `y` (level-0 pixels), `mpp` and `tissue`. The slide is the unit of the split:
`patient_id` is the labels table's patient when it has one, else the slide, and the
`splits` fractions divide slides (or patients), stratified by label, not tiles; so the
tiles of one slide (or patient) never straddle train and test. Slide-level labels come from a table
keyed by slide (path relative to the source, file name, or name without extension).
Files that are not slides, slides OpenSlide cannot read and slides without tissue go to
quarantine with the reason; every kept tile has been read once.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import dataclass

from PIL import Image

from medray import storage, workdir
from medray.data.config import DataConfig
from medray.data.decode import DecodeError
from medray.data.importers import Candidate, UncertainPolicy, finish_import, list_files
from medray.data.labels import LabelRow, LabelTable, read_label_table
from medray.data.manifest import ImportResult
from medray.data.parallel import thread_map
from medray.data.slides import SLIDE_SUFFIXES, Tile, open_slide, plan_tiles, read_region
from medray.data.splits import assign_splits


@dataclass
class SlideLabels:
    """Slide-level labels: a table with a slide column and label columns (CheXpert-style
    findings or one class column, as `import_csv`), optionally a patient column."""

    table: str
    label_columns: list[str]
    slide_column: str = "slide"
    patient_column: str | None = None
    uncertain: UncertainPolicy = "ignore"


def import_slides(source: str, cfg: DataConfig, labels: SlideLabels | None = None) -> ImportResult:
    """Plan, read once and record the tissue tiles of every slide under `source`."""
    root = storage.resolve(source)
    files = list_files(root)
    if not files:
        raise FileNotFoundError(f"{source}: no files found")
    table = (
        read_label_table(labels.table, labels.slide_column, labels.label_columns,
                         labels.uncertain, labels.patient_column)
        if labels else None
    )  # fmt: skip
    rejected, slides = [], []
    for rel, uri in files:
        if rel.lower().endswith(SLIDE_SUFFIXES):
            slides.append((rel, uri))
        else:
            suffixes = " ".join(SLIDE_SUFFIXES)
            rejected.append({"uri": uri, "reason": f"not a slide file (slides end in {suffixes})"})
    out_dir = storage.join(workdir.images(cfg.workdir), "slides")
    if cfg.slides.write_tiles:
        storage.remove(out_dir)  # a re-import replaces the previous tiles
    results = thread_map(
        lambda s: _slide_rows(*s, cfg, table, out_dir), slides, min(cfg.workers, 4), "tile slides"
    )
    candidates = [c for kept, _ in results for c in kept]
    rejected += [q for _, bad in results for q in bad]
    _split_by_group(candidates, cfg)
    s = cfg.slides
    at = f"level {s.level}" if s.level is not None else f"{s.mpp:g} mpp"
    note = f"slides:{root} ({s.tile_size} px tiles at {at}, at most {s.max_tiles_per_slide}/slide)"
    return finish_import(
        candidates,
        rejected,
        cfg,
        source=note,
        multi_label=bool(table and table.multi_label),
        label_names=table.label_names if table else None,
        read=len(files),
        verify=False,  # every tile was read in _slide_rows
    )


def _split_by_group(candidates: list[Candidate], cfg: DataConfig) -> None:
    """Set every tile's split from its group's (patient or slide): the `splits` fractions
    divide the groups, stratified by their labels, as `assign_splits` divides rows."""
    if cfg.splits.adjusts_source():
        raise ValueError(
            "splits.rename / splits.carve_val: slides have no splits of their own to adjust; "
            "splits.train/val/test divide them"
        )
    groups: dict[str, set[str]] = {}
    for c in candidates:
        groups.setdefault(str(c.patient_id), set()).update(c.labels)
    names = list(groups)
    split = assign_splits([sorted(groups[g]) for g in names], None, cfg.splits.fractions(),
                          cfg.seed)  # fmt: skip
    by_group = dict(zip(names, split))
    for c in candidates:
        c.split = str(by_group[str(c.patient_id)])


def slide_keys(rel: str) -> tuple[str, str, str]:
    """How a labels table may name a slide: relative path, file name, name without suffix."""
    name = posixpath.basename(rel)
    return rel, name, name.rsplit(".", 1)[0]


def _slide_rows(
    rel: str, uri: str, cfg: DataConfig, table: LabelTable | None, out_dir: str
) -> tuple[list[Candidate], list[dict[str, str]]]:
    """(tile candidates, quarantine rows) of one slide."""
    s = cfg.slides
    seed = int(hashlib.sha1(f"{cfg.seed}:{rel}".encode()).hexdigest()[:8], 16)
    try:
        slide = open_slide(uri)
        tiles = plan_tiles(slide, s.tile_size, s.mpp, s.level, s.min_tissue,
                           s.max_tiles_per_slide, seed)  # fmt: skip
    except DecodeError as exc:
        return [], [{"uri": uri, "reason": exc.reason}]
    except ValueError as exc:
        return [], [{"uri": uri, "reason": str(exc)}]
    if not tiles:
        reason = f"no tissue: no {s.tile_size} px tile is {s.min_tissue:.0%} tissue"
        return [], [{"uri": uri, "reason": reason}]
    row = table.lookup(*slide_keys(rel)) if table else LabelRow()
    if row.error:
        return [], [{"uri": uri, "reason": row.error}]
    kept, bad = [], []
    for tile in tiles:
        tile_uri = tile.uri(uri)
        try:
            pixels = read_region(uri, _params(tile), tile_uri)
        except DecodeError as exc:
            bad.append({"uri": tile_uri, "reason": exc.reason})
            continue
        if s.write_tiles:
            tile_uri = _write_png(out_dir, rel, tile, pixels)
        kept.append(
            Candidate(
                key=tile.uri(rel),
                uri=tile_uri,
                labels=list(row.labels),
                patient_id=row.patient_id or rel,
                uncertain=list(row.uncertain),
                extra={
                    "slide": rel,
                    "level": tile.level,
                    "x": tile.x,
                    "y": tile.y,
                    "mpp": tile.mpp,
                    "tissue": tile.tissue,
                },  # fmt: skip
            )
        )
    return kept, bad


def _params(tile: Tile) -> dict[str, int]:
    return {"level": tile.level, "x": tile.x, "y": tile.y, "w": tile.w, "size": tile.size}


def _write_png(out_dir: str, rel: str, tile: Tile, pixels) -> str:
    uri = storage.join(out_dir, *rel.split("/"), f"L{tile.level}_x{tile.x}_y{tile.y}.png")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    storage.write_bytes(uri, buffer.getvalue())
    return uri
