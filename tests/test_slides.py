"""Whole-slide images in: pyramidal tiled TIFFs written here with tifffile (tissue on glass),
read through OpenSlide, planned into tissue tiles with coordinates by `medray data import
slides`, and the tiles read from the slides again by embed (Ray), index and thumbnails."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medray.cli import app
from medray.data import (
    DataConfig,
    DecodeError,
    import_slides,
    read_image,
    read_manifest,
    read_quarantine,
)
from medray.data.decode import fragment_uri, parse_uri
from medray.data.slides import _cell_fractions, otsu_threshold, read_geometry

MPP = 0.25  # level-0 microns per pixel of the generated slides (a 40x scan)


def slide_pixels(seed: int, height: int = 1024, width: int = 1536, tissue: bool = True):
    """Level 0 of a slide: light glass with faint noise and, unless `tissue` is False, an
    H&E-coloured ellipse of textured tissue."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 238, np.uint8) - rng.integers(0, 6, (height, width, 1),
                                                                    dtype=np.uint8)  # fmt: skip
    if tissue:
        yy, xx = np.ogrid[:height, :width]
        cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
        inside = ((yy - cy) / (height * 0.32)) ** 2 + ((xx - cx) / (width * 0.3)) ** 2 < 1
        coarse = rng.integers(0, 70, (height // 16, width // 16, 3), dtype=np.uint8)
        texture = np.kron(coarse, np.ones((16, 16, 1), np.uint8))
        stain = np.array([150, 50, 140], np.uint8) + texture  # pink/purple, saturated
        img[inside] = stain[inside]
    return img


def write_slide(path: Path, level0: np.ndarray, mpp: float | None = MPP) -> list[np.ndarray]:
    """A tiled (256 px), pyramidal (2x per level) TIFF like a scanner's; returns the levels."""
    import tifffile

    levels = [level0]
    while min(levels[-1].shape[:2]) > 256:
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            extra = {}
            if mpp:
                px_per_cm = 1e4 / (mpp * 2**i)
                extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(256, 256), photometric="rgb", subfiletype=1 if i else 0,
                      metadata=None, **extra)  # fmt: skip
    return levels


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory):
    """3 slides (tissue on glass), a damaged slide and a stray file; labels in a CSV beside."""
    root = tmp_path_factory.mktemp("slides")
    src = root / "src"
    (src / "batch2").mkdir(parents=True)
    levels = {}
    for i, rel in enumerate(["s0.tiff", "s1.tiff", "batch2/s2.tiff"]):
        levels[rel] = write_slide(src / rel, slide_pixels(i))
    whole = (src / "s0.tiff").read_bytes()
    (src / "damaged.svs").write_bytes(whole[:2000])
    (src / "notes.txt").write_text("scanner log\n")
    labels = pd.DataFrame({"slide": ["s0", "s1.tiff", "batch2/s2.tiff"],
                           "diagnosis": ["tumor", "normal", "normal"]})  # fmt: skip
    labels.to_csv(root / "labels.csv", index=False)
    return SimpleNamespace(src=src, labels=root / "labels.csv", levels=levels)


def invoke(*args: str):
    out = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    return out, " ".join(out.output.split())


# ---------------------------------------------------------------- unit


def test_region_uris_round_trip_and_plain_paths_stay_paths():
    uri = fragment_uri("s3://b/x/slide.svs", level=1, x=448, y=0, w=224, size=224)
    assert uri == "s3://b/x/slide.svs#level=1&x=448&y=0&w=224&size=224"
    assert parse_uri(uri) == ("s3://b/x/slide.svs", {"level": 1, "x": 448, "y": 0, "w": 224,
                                                     "size": 224})  # fmt: skip
    assert parse_uri("/a/ct.dcm#frame=3") == ("/a/ct.dcm", {"frame": 3})
    for plain in ("/a/b.png", "/a/case#12.png", "/a/x.png#level=1", "/a/y.png#frame=a"):
        assert parse_uri(plain) == (plain, {})


def test_otsu_and_tile_tissue_fractions():
    values = np.concatenate([np.full(500, 10), np.full(300, 200)]).astype(np.uint8)
    assert 10 <= otsu_threshold(values) < 200
    mask = np.zeros((40, 60), bool)
    mask[:20, :30] = True  # top-left quarter is tissue
    fractions = _cell_fractions(mask, cols=2, rows=2, fx=0.5, fy=0.5)
    assert np.allclose(fractions, [[1, 0], [0, 0]])


def test_read_geometry_picks_the_level_just_finer_than_the_target():
    slide = SimpleNamespace(properties={"openslide.mpp-x": "0.25"},
                            level_downsamples=(1.0, 2.0, 4.0))  # fmt: skip
    assert read_geometry(slide, 224, 0.5, None) == (1, 224, 0.5)  # 20x from a 40x scan
    assert read_geometry(slide, 224, 0.35, None) == (0, 314, 0.35)  # between levels: resized
    assert read_geometry(slide, 224, 1.0, None) == (2, 224, 1.0)
    assert read_geometry(slide, 100, None, 2) == (2, 100, 1.0)
    with pytest.raises(ValueError, match="coarser than the target"):
        read_geometry(slide, 224, 0.1, None)
    slide.properties = {}
    with pytest.raises(ValueError, match="records no microns per pixel"):
        read_geometry(slide, 224, 0.5, None)


# ---------------------------------------------------------------- import


def test_slides_import_to_tissue_tiles_with_coordinates(slide_set, tmp_path):
    wd = str(tmp_path / "wd")
    out, text = invoke("data", "import", "slides", str(slide_set.src), "--workdir", wd,
                       "--labels", str(slide_set.labels), "-l", "diagnosis",
                       "--tile-size", "64", "--max-tiles-per-slide", "5")  # fmt: skip
    assert out.exit_code == 0, out.output
    frame, quarantine = read_manifest(wd), read_quarantine(wd)
    assert f"read 5, kept {len(frame)}, quarantined 2" in text
    assert {"slide", "level", "x", "y", "mpp", "tissue"} <= set(frame.columns)
    assert frame.groupby("slide").size().to_dict() == {"batch2/s2.tiff": 5, "s0.tiff": 5,
                                                        "s1.tiff": 5}  # fmt: skip
    assert set(frame["level"]) == {1} and set(frame["mpp"]) == {0.5}  # 20x from a 40x scan
    assert (frame["tissue"] >= 0.5).all()
    assert frame.groupby("slide")["split"].nunique().max() == 1  # the slide is the split unit
    # fractions divide slides, stratified: the one tumor slide trains, the two normal ones
    # go to train and test (val needs a third slide of the class)
    assert sorted(frame.groupby("slide")["split"].first()) == ["test", "train", "train"]
    assert (frame["patient_id"] == frame["slide"]).all()
    assert frame.groupby("slide")["labels"].first().map(tuple).to_dict() == {
        "batch2/s2.tiff": ("normal",), "s0.tiff": ("tumor",), "s1.tiff": ("normal",)}  # fmt: skip
    for row in frame.itertuples():  # the tile is the slide's level-1 pixels at (x, y)
        level1 = slide_set.levels[row.slide][1]
        x, y = row.x // 2, row.y // 2
        assert np.array_equal(read_image(row.uri), level1[y : y + 64, x : x + 64])
    reasons = dict(zip(quarantine["uri"].map(lambda u: Path(u).name), quarantine["reason"]))
    assert reasons["notes.txt"].startswith("not a slide file")
    assert "slide" in reasons["damaged.svs"]
    with pytest.raises(DecodeError, match="level 7 does not exist"):
        read_image(str(slide_set.src / "s0.tiff") + "#level=7&x=0&y=0&w=8&size=8")


def test_target_between_levels_written_tiles_and_slides_without_tissue(slide_set, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "s1.tiff").symlink_to(slide_set.src / "s1.tiff")
    write_slide(src / "blank.tiff", slide_pixels(5, 512, 512, tissue=False))
    write_slide(src / "no_mpp.tiff", slide_pixels(6, 512, 512), mpp=None)
    cfg = DataConfig(workdir=str(tmp_path / "wd"),
                     slides={"mpp": 0.35, "tile_size": 64, "max_tiles_per_slide": 0,
                             "write_tiles": True})  # fmt: skip
    result = import_slides(str(src), cfg)
    frame = read_manifest(cfg.workdir)
    assert result.quarantined == 2 and result.kept == len(frame) > 20
    assert set(frame["level"]) == {0} and set(frame["mpp"]) == {0.35}
    assert all(Path(u).is_file() and u.endswith(".png") for u in frame["uri"])
    assert read_image(frame["uri"].iloc[0]).shape == (64, 64, 3)
    reasons = read_quarantine(cfg.workdir).set_index("uri")["reason"]
    assert reasons[str(src / "blank.tiff")].startswith("no tissue")
    assert "records no microns per pixel" in reasons[str(src / "no_mpp.tiff")]


@pytest.mark.integration
def test_slide_tiles_embed_index_serve_and_thumbnail(slide_set, ray_local, tmp_path):
    """Acceptance: 3 slides -> tiles -> `medray run embed` reads every tile from its slide
    -> `medray run index` -> evaluate -> a service bundle -> /v1/search with a tile answers
    its neighbours, and the thumbnail of a tile hit is read from the slide."""
    from fastapi.testclient import TestClient

    from medray import embed, index, plots
    from medray.registry import build_bundle, load_bundle
    from medray.serving import security
    from medray.serving.api import create_api
    from medray.serving.backend import LocalBackend
    from medray.serving.config import Limits

    wd = str(tmp_path / "wd")
    cfg = DataConfig(workdir=wd, slides={"tile_size": 64, "max_tiles_per_slide": 4})
    tiles = import_slides(str(slide_set.src), cfg).kept
    tiny = ["backbone.name=resnet10t", "backbone.weights=random", "backbone.input_size=32"]
    out, text = invoke("run", "embed", "--workdir", wd, *tiny)
    assert out.exit_code == 0, out.output
    frame, vectors = embed.read_embeddings(wd)
    assert len(frame) == tiles == 12 and "#level=1&x=" in frame["uri"].iloc[0]
    assert np.isfinite(vectors).all()
    out, text = invoke("run", "index", "--workdir", wd)
    assert out.exit_code == 0, out.output
    bid = (Path(wd) / "embeddings" / "LATEST").read_text().strip()
    gallery = index.load_index(str(Path(wd) / "index" / bid))
    scores, rows = gallery.search(vectors[:1], 3)
    hit = gallery.row(int(rows[0][0]))["uri"]
    thumb = plots.thumbnail(hit, size=48)
    assert thumb.shape[:2] == (48, 48) and thumb.std() > 5  # a real tile, not the grey stand-in

    out, text = invoke("run", "evaluate", "--workdir", wd, "n_pairs=50")
    assert out.exit_code == 0, out.output
    build_bundle(wd, str(tmp_path / "bundle"))
    app = create_api(LocalBackend(load_bundle(str(tmp_path / "bundle"))),
                     (security.digest("k1"),), Limits())  # fmt: skip
    query = io.BytesIO()
    Image.fromarray(read_image(frame["uri"].iloc[0])).save(query, format="PNG")
    with TestClient(app) as client:
        auth = {"Authorization": "Bearer k1"}
        resp = client.post("/v1/search", files={"image": query.getvalue()}, data={"k": "3"},
                           headers=auth)  # fmt: skip
        assert resp.status_code == 200, resp.text
        hits = resp.json()["neighbors"]
        assert len(hits) == 3 and hits[0]["id"] == frame["id"].iloc[0]  # the tile finds itself
        png = client.get(hits[1]["thumbnail_url"], headers=auth)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert np.asarray(Image.open(io.BytesIO(png.content))).std() > 5  # read from the slide


@pytest.mark.integration
def test_slides_on_s3_are_read_through_a_local_cache(slide_set, s3_bucket, tmp_path, monkeypatch):
    import os

    import boto3

    monkeypatch.setenv("MEDRAY_SLIDE_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.upload_file(str(slide_set.src / "s1.tiff"), s3_bucket.removeprefix("s3://"), "wsi/s1.tiff")
    cfg = DataConfig(workdir=str(tmp_path / "wd"),
                     slides={"tile_size": 64, "max_tiles_per_slide": 3})  # fmt: skip
    assert import_slides(f"{s3_bucket}/wsi", cfg).kept == 3
    frame = read_manifest(cfg.workdir)
    assert frame["uri"].str.startswith(f"{s3_bucket}/wsi/s1.tiff#level=1&").all()
    assert len(list((tmp_path / "cache").rglob("s1.tiff"))) == 1  # downloaded once
    row = frame.iloc[0]
    x, y = row.x // 2, row.y // 2
    assert np.array_equal(
        read_image(row.uri), slide_set.levels["s1.tiff"][1][y : y + 64, x : x + 64]
    )
