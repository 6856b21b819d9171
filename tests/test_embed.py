"""The embed stage: shard layout and writing as plain functions (fast), then the whole stage on
Ray from the CLI (integration): Kather tiles, a corrupted image, a resumed run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medray import embed, storage
from medray import workdir as wd
from medray.config import BackboneConfig, load_config
from medray.models import load_backbone


def write_tiles(root: Path, per_class: int = 4, size: int = 40) -> Path:
    """Small PNG tiles in class folders: red-ish and blue-ish noise."""
    rng = np.random.default_rng(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            px[..., channel] = 200 + rng.integers(0, 55, (size, size), dtype=np.uint8)
            Image.fromarray(px).save(root / label / f"{label}_{i}.png")
    return root


# ---------------------------------------------------------------- unit


def test_shard_bounds_are_fixed_slices():
    assert embed.shard_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert embed.shard_bounds(8, 4) == [(0, 4), (4, 8)]
    assert embed.part_name(3) == "part-00003.parquet"


def test_shard_table_matches_contract():
    rows = pd.DataFrame(
        {
            "id": ["a", "b"],
            "uri": ["/x/a", "/x/b"],
            "labels": [["t"], []],
            "split": ["train", "val"],
        }
    )
    emb = np.arange(6, dtype=np.float32).reshape(2, 3)
    table = embed.shard_table(rows, emb)
    assert table.column_names == ["id", "uri", "labels", "split", "embedding"]
    assert str(table.schema.field("embedding").type) == "list<item: float>"
    assert table.column("embedding").to_pylist() == [[0, 1, 2], [3, 4, 5]]
    assert embed.shard_table(rows.iloc[:0], np.zeros((0, 3), np.float32)).num_rows == 0


def test_decode_batch_flags_failures(tmp_path):
    good = tmp_path / "g.png"
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(good.read_bytes()[:40])
    spec = load_backbone(BackboneConfig(name="resnet10t", weights="random", input_size=16)).spec
    out = embed.decode_batch(
        {"row": np.array([5, 6, 7]), "uri": np.array([str(good), str(bad), str(tmp_path / "no")])},
        spec.model_dump(),
        threads=2,
    )
    assert out["pixels"].shape == (3, 16, 16, 3) and out["pixels"].dtype == np.uint8
    assert (out["pixels"][0] == 7).all()
    assert out["error"][0] == "" and out["error"][1] and "FileNotFoundError" in out["error"][2]
    assert out["row"].tolist() == [5, 6, 7]


def test_shard_writer_writes_complete_shards_and_quarantines(tmp_path):
    manifest = pd.DataFrame(
        {
            "id": [f"i{i}" for i in range(5)],
            "uri": [f"/img/{i}.png" for i in range(5)],
            "labels": [["a"]] * 5,
            "split": ["train"] * 5,
        }
    )
    cfg = embed.Config(workdir=str(tmp_path), shard_size=2)
    out_dir = str(tmp_path / "emb")
    writer = embed.ShardWriter(cfg, manifest, out_dir, todo=[0, 2])
    emb = np.eye(4, dtype=np.float32)[:3]
    writer.add({"row": np.array([4, 1]), "error": np.array(["", ""], object), "embedding": emb[:2]})
    assert (tmp_path / "emb" / "part-00002.parquet").exists()  # its only row arrived
    assert not (tmp_path / "emb" / "part-00000.parquet").exists()
    writer.add({"row": np.array([0]), "error": np.array(["corrupt"], object), "embedding": emb[2:]})
    writer.check_complete()
    part0 = storage.read_table(out_dir + "/part-00000.parquet").to_pandas()
    assert part0["id"].tolist() == ["i1"]
    q = pd.read_parquet(wd.quarantine(str(tmp_path)))
    assert q.to_dict("records") == [{"uri": "/img/0.png", "reason": "corrupt", "stage": "embed"}]
    assert writer.embedded == 2 and len(writer.quarantine) == 1


def test_record_quarantine_keeps_import_rows_and_never_duplicates(tmp_path):
    import pyarrow as pa

    from medray.data.manifest import QUARANTINE_SCHEMA

    earlier = pd.DataFrame([{"uri": "/a", "reason": "empty", "stage": "import"}])
    storage.write_table(
        pa.Table.from_pandas(earlier, QUARANTINE_SCHEMA, preserve_index=False),
        wd.quarantine(str(tmp_path)),
    )
    embed.record_quarantine(str(tmp_path), [{"uri": "/b", "reason": "truncated"}])
    embed.record_quarantine(str(tmp_path), [{"uri": "/b", "reason": "truncated again"}])
    q = pd.read_parquet(wd.quarantine(str(tmp_path)))
    assert q.to_dict("records") == [
        {"uri": "/a", "reason": "empty", "stage": "import"},
        {"uri": "/b", "reason": "truncated again", "stage": "embed"},
    ]


def test_shard_writer_detects_missing_rows(tmp_path):
    manifest = pd.DataFrame({"id": ["a"], "uri": ["u"], "labels": [[]], "split": ["train"]})
    writer = embed.ShardWriter(embed.Config(workdir=str(tmp_path)), manifest, str(tmp_path), [0])
    with pytest.raises(RuntimeError, match="in != out"):
        writer.check_complete()


def test_resolve_backbone_prefers_select_winner_unless_pinned(tmp_path):
    cfg = embed.Config(workdir=str(tmp_path))
    assert embed.resolve_backbone(cfg) == (cfg.backbone, "config")
    ranking = {"winner": {"name": "resnet18", "weights": "random"}}
    storage.write_json(str(tmp_path / "select" / "ranking.json"), ranking)
    chosen, source = embed.resolve_backbone(cfg)
    assert (chosen.name, source) == ("resnet18", "select")
    pinned = embed.Config(workdir=str(tmp_path), pin_backbone=True)
    assert embed.resolve_backbone(pinned)[1] == "config"


def test_config_defaults_and_errors():
    cfg = load_config(embed.Config)
    assert cfg.backbone.weights == "bundled" and cfg.shard_size > 0
    from medray.config import ConfigError

    with pytest.raises(ConfigError, match="shard_size"):
        load_config(embed.Config, overrides=["shard_size=0"])


# ---------------------------------------------------------------- integration (Ray)


def cli(*args: str) -> str:
    from medray.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def import_folder(source: Path, workdir: Path) -> None:
    """`medray data import folder` (the data CLI), or its function while that is not built."""
    from medray.cli import app

    if any(g.name == "data" for g in app.registered_groups):
        cli("data", "import", "folder", str(source), "--workdir", str(workdir))
    else:
        from medray.data.config import DataConfig
        from medray.data.importers import import_folder as run_import

        run_import(str(source), DataConfig(workdir=str(workdir)))


@pytest.mark.integration
def test_kather_tiles_embed_from_cli(ray_local, kather_dir, tmp_path):
    work = tmp_path / "w"
    import_folder(kather_dir, work)
    out = cli("run", "embed", "--workdir", str(work))
    assert "efficientnet_lite0-" in out
    frame, vectors = embed.read_embeddings(str(work))
    assert vectors.shape == (24, 1752) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    bid = (work / "embeddings" / "LATEST").read_text().strip()
    summary = storage.read_json(str(work / "embeddings" / bid / "embed.json"))
    assert summary["count"] == 24 and summary["quarantined"] == 0 and summary["dim"] == 1752
    assert summary["backbone"]["backbone_id"] == bid
    # Real features: leave-one-out 1-NN accuracy far above chance (1/8; we saw 0.50).
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -1)
    labels = np.array([lab[0] for lab in frame["labels"]])
    assert (labels[sims.argmax(1)] == labels).mean() >= 0.375


@pytest.mark.integration
def test_corrupted_image_quarantined_and_run_completes(ray_local, tmp_path):
    tiles = write_tiles(tmp_path / "tiles")
    work = tmp_path / "w"
    import_folder(tiles, work)
    victim = tiles / "red" / "red_1.png"
    victim.write_bytes(victim.read_bytes()[:60])  # truncated after import
    result = embed.run(
        load_config(
            embed.Config,
            overrides=[
                "backbone.name=resnet10t",
                "backbone.weights=random",
                "backbone.input_size=32",
            ],
            workdir=str(work),
        )
    )
    assert (result.images_in, result.count, result.quarantined) == (8, 7, 1)
    assert result.quarantined_now == 1
    q = pd.read_parquet(wd.quarantine(str(work)))
    row = q[q["stage"] == "embed"]
    assert row["uri"].tolist() == [str(victim)] and row["reason"].iloc[0]
    frame, vectors = embed.read_embeddings(str(work))
    assert str(victim) not in set(frame["uri"]) and vectors.shape == (7, result.dim)


@pytest.mark.integration
def test_rerun_skips_finished_shards(ray_local, tmp_path):
    tiles = write_tiles(tmp_path / "tiles", per_class=5)
    work = tmp_path / "w"
    import_folder(tiles, work)
    overrides = [
        "backbone.name=resnet10t", "backbone.weights=random", "backbone.input_size=32",
        "shard_size=3", "batch_size=4",
    ]  # fmt: skip
    cfg = load_config(embed.Config, overrides=overrides, workdir=str(work))
    first = embed.run(cfg)
    assert (first.shards, first.shards_skipped, first.embedded_now) == (4, 0, 10)
    _, before = embed.read_embeddings(str(work))
    Path(first.out_dir, "part-00001.parquet").unlink()
    second = embed.run(cfg)
    assert (second.shards_skipped, second.embedded_now, second.count) == (3, 3, 10)
    _, after = embed.read_embeddings(str(work))
    np.testing.assert_allclose(after, before, atol=1e-5)


@pytest.mark.integration
def test_decode_and_shards_on_s3(s3_bucket, tmp_path):
    """Images and the workdir on an S3 API (moto on loopback): bytes read, shards written."""
    local = tmp_path / "g.png"
    Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(local)
    uri = f"{s3_bucket}/images/g.png"
    storage.write_bytes(uri, local.read_bytes())
    spec = load_backbone(BackboneConfig(name="resnet10t", weights="random", input_size=16)).spec
    out = embed.decode_batch(
        {"row": np.array([0, 1]), "uri": np.array([uri, f"{s3_bucket}/images/missing.png"])},
        spec.model_dump(),
        threads=2,
    )
    assert out["error"][0] == "" and (out["pixels"][0] == 9).all() and out["error"][1]
    work = f"{s3_bucket}/w"
    manifest = pd.DataFrame(
        {"id": ["a", "b"], "uri": [uri, "gone"], "labels": [["x"], ["y"]], "split": ["train"] * 2}
    )
    writer = embed.ShardWriter(
        embed.Config(workdir=work), manifest, wd.embeddings(work, "b-1"), [0]
    )
    writer.add({**out, "embedding": np.eye(2, 4, dtype=np.float32)})
    writer.check_complete()
    table = storage.read_table(f"{work}/embeddings/b-1/part-00000.parquet")
    assert table.column("id").to_pylist() == ["a"]
    assert storage.read_table(wd.quarantine(work)).column("stage").to_pylist() == ["embed"]
