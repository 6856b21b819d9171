"""Growth without rebuild: embed re-embeds only changed/new shards of a grown manifest, and
`index mode=append` adds the new embeddings to the trained index (Flat: the same results as a
fresh build), falling back to a full build when appending cannot be right."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from medray import embed, storage
from medray import index as I
from medray import workdir as wd
from medray.config import MlflowConfig, RayConfig, load_config
from medray.index import append as A

BID = "fake_net-0123456789"
DIM = 16


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(workdir: str, x: np.ndarray, ids: list[int] | None = None) -> None:
    """What `medray run embed` writes (docs/contracts.md), one shard, rows in `ids` order."""
    ids = list(range(len(x))) if ids is None else ids
    out = wd.embeddings(workdir, BID)
    table = pa.table(
        {
            "id": [f"img{i}" for i in ids],
            "uri": [f"/data/img{i}.png" for i in ids],
            "labels": pa.array([[f"c{i % 3}"] for i in ids], pa.list_(pa.string())),
            "split": [("train", "val", "test")[i % 3] for i in ids],
            "embedding": pa.array(list(x[ids]), pa.list_(pa.float32())),
        }
    )
    storage.write_table(table, storage.join(out, "part-00000.parquet"))
    summary = {"backbone": {"name": "fake_net"}, "dim": DIM, "count": len(ids),
               "quarantined": 0, "shards": ["part-00000.parquet"]}  # fmt: skip
    storage.write_json(storage.join(out, "embed.json"), summary)
    storage.write_text(wd.latest_embeddings(workdir), BID + "\n")


def config(workdir: str, **kw) -> I.Config:
    return I.Config(workdir=workdir, ray=RayConfig(num_cpus=2), mlflow=MlflowConfig(), **kw)


# ---------------------------------------------------------------- plain functions


def test_new_rows_needs_the_gallery_as_a_prefix():
    assert A.new_rows(["a", "b"], ["a", "b", "c"])[0] == 2
    assert A.new_rows(["a", "b"], ["a", "b"])[0] == 2
    first, why = A.new_rows(["a", "b"], ["a", "c", "b"])
    assert first is None and "order changed" in why
    first, why = A.new_rows(["a", "b"], ["a", "c"])
    assert first is None and "1 indexed rows are no longer" in why


def test_below_target():
    tuned = {"recall_at_k": 0.97, "target_met": True}
    assert A.below_target(tuned, 0.99, 0.95) is None
    assert A.below_target(tuned, 0.90, 0.95) == 0.90
    assert A.below_target({"recall_at_k": 0.9, "target_met": False}, None, 0.95) == 0.9
    assert A.below_target(tuned, 0.5, None) is None  # tuning off: never retrain


def test_embed_plan_keeps_full_shards_and_redoes_the_partial_one(tmp_path):
    def manifest(n: int) -> pd.DataFrame:
        return pd.DataFrame({"id": [f"i{i}" for i in range(n)],
                             "uri": [f"/img/{i}.png" for i in range(n)],
                             "labels": [["a"]] * n, "split": ["train"] * n})  # fmt: skip

    old, grown = manifest(40), manifest(60)
    keep, relabel = embed.reusable_shards(embed.shard_keys(old, 16), embed.shard_keys(grown, 16))
    assert (keep, relabel) == ([0, 1], [])  # shard 2 held 8 rows, now 16: embedded again
    moved = grown.copy()
    moved.loc[20, "split"] = "test"  # a re-import that changed one row's split
    moved.loc[40, "uri"] = "/img/other.png"
    keep, relabel = embed.reusable_shards(embed.shard_keys(grown, 16), embed.shard_keys(moved, 16))
    assert (keep, relabel) == ([0, 1, 3], [1])  # shard 2 holds the moved uri
    # relabel_part rewrites only the label columns of a kept part file
    part = str(tmp_path / "part-00001.parquet")
    emb = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    storage.write_table(embed.shard_table(grown.iloc[16:32], emb), part)
    embed.relabel_part(part, moved.iloc[16:32])
    table = storage.read_table(part)
    assert table.column("split").to_pylist()[4] == "test"
    assert np.asarray(table.column("embedding").to_pylist()).tolist() == emb.tolist()


# ---------------------------------------------------------------- index append (FAISS only)


def test_flat_append_equals_fresh_build(tmp_path):
    x = vectors(60)
    grown, fresh = str(tmp_path / "grown"), str(tmp_path / "fresh")
    write_embeddings(grown, x, list(range(40)))
    first = I.build(config(grown, factory="Flat"))
    assert first.count == 40
    write_embeddings(grown, x)
    res = I.build(config(grown, factory="Flat", mode="append"))
    assert (res.appended, res.retrained, res.count, res.factory) == (20, False, 60, "Flat")
    meta = json.loads((tmp_path / "grown" / "index" / BID / "index.json").read_text())
    assert (meta["appended"], meta["retrained"], meta["count"]) == (20, False, 60)
    write_embeddings(fresh, x)
    I.build(config(fresh, factory="Flat"))
    a = I.load_index(wd.index(grown, BID), expect_dim=DIM, expect_backbone_id=BID)
    b = I.load_index(wd.index(fresh, BID), expect_dim=DIM, expect_backbone_id=BID)
    assert a.gallery.to_pandas().equals(b.gallery.to_pandas())
    sa, ra = a.search(x, 10)
    sb, rb = b.search(x, 10)
    assert (ra == rb).all() and np.allclose(sa, sb)
    again = I.build(config(grown, factory="Flat", mode="append"))
    assert again.appended == 0 and "nothing to append" in again.note


def test_hnsw_append_keeps_the_index_and_measures_new_rows(tmp_path):
    x = vectors(400, seed=1)
    work = str(tmp_path)
    write_embeddings(work, x, list(range(300)))
    I.build(config(work, factory="HNSW32"))
    write_embeddings(work, x)
    res = I.build(config(work, factory="HNSW32", mode="append"))
    assert (res.count, res.retrained, res.appended) == (400, False, 100)
    assert res.recall_new_at_k is not None and res.recall_new_at_k >= 0.95
    gi = I.load_index(res.out_dir, expect_backbone_id=BID)
    _, rows = gi.search(x[300:310], 1)
    assert rows[:, 0].tolist() == list(range(300, 310))  # each new vector finds itself


def test_append_falls_back_to_a_full_build_when_rows_moved_or_recall_drops(tmp_path):
    x = vectors(80, seed=2)
    work = str(tmp_path)
    write_embeddings(work, x, list(range(0, 80, 2)))
    I.build(config(work, factory="Flat"))
    write_embeddings(work, x)  # the new odd rows sit between the indexed even ones
    res = I.build(config(work, factory="Flat", mode="append"))
    assert res.retrained and res.appended == 0 and "order changed" in res.note
    meta = I.load_index(res.out_dir).meta
    assert meta["retrained"] and meta["count"] == 80
    # PQ4x4 on 16 dims cannot reach recall 0.999: the appended index is rebuilt, and says so
    write_embeddings(work, x, list(range(60)))
    kw = {"factory": "PQ4x4", "target_recall": 0.999}
    I.build(config(work, **kw))
    write_embeddings(work, x)
    res = I.build(config(work, mode="append", **kw))
    assert res.retrained and "below target_recall" in res.note and res.count == 80


def test_append_refuses_another_backbone(tmp_path):
    work = str(tmp_path)
    write_embeddings(work, vectors(30))
    out = I.build(config(work, factory="Flat")).out_dir
    meta_uri = storage.join(out, I.META_FILE)
    storage.write_json(meta_uri, {**storage.read_json(meta_uri), "backbone_id": "other-00"})
    with pytest.raises(I.IndexMismatch, match="backbone mismatch"):
        I.build(config(work, factory="Flat", mode="append"))


# ---------------------------------------------------------------- the stages (Ray)


@pytest.mark.integration
def test_grown_manifest_embeds_new_shards_appends_and_evaluates(ray_local, tmp_path):
    from medray import evaluate
    from medray.data.manifest import read_manifest, write_manifest
    from medray.data.synth import synth

    source, work = str(tmp_path / "source"), str(tmp_path / "w")
    synth(source, n=60, size=32, seed=0)
    rows = read_manifest(source)

    def import_rows(n: int) -> None:  # what a re-import that found n images leaves
        write_manifest(work, rows.iloc[:n], source="test", multi_label=False)

    overrides = ["backbone.name=resnet10t", "backbone.weights=random", "backbone.input_size=32",
                 "shard_size=16", "batch_size=16", "pin_backbone=true"]  # fmt: skip
    cfg = load_config(embed.Config, overrides=overrides, workdir=work)
    import_rows(40)
    first = embed.run(cfg)
    assert (first.shards, first.embedded_now) == (3, 40)
    _, before = embed.read_embeddings(work)
    I.build(config(work, factory="Flat"))
    import_rows(60)
    second = embed.run(cfg)
    # shards 0-1 kept; shard 2 (8 rows, now 16) and shard 3 (12 rows) embedded
    assert (second.shards, second.shards_skipped, second.embedded_now, second.count) == (
        4, 2, 28, 60)  # fmt: skip
    frame, after = embed.read_embeddings(work)
    np.testing.assert_allclose(after[:40], before, atol=1e-5)
    grown = I.run(config(work, factory="Flat", mode="append"))
    assert (grown.appended, grown.retrained, grown.count) == (20, False, 60)
    # the appended index goes through the normal gate: evaluate reads and checks it
    ev = evaluate.run(load_config(evaluate.Config, overrides=["plot_queries=0"], workdir=work))
    assert ev.counts["embeddings"] == 60 and 0 <= ev.retrieval["p@10"] <= 1
