"""medray.index: factory choice, build/load round trip, refusal of altered or mismatched
indexes, sharded (Ray) build equal to the single build, and an s3:// workdir."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from medray import index as I
from medray import storage
from medray import workdir as wd
from medray.config import MlflowConfig, RayConfig

BID = "fake_net-0123456789"


def fake_embeddings(workdir: str, n: int = 300, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Embedding shards as docs/contracts.md describes them (what `medray run embed` writes)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = wd.embeddings(workdir, BID)
    shards = []
    for s, start in enumerate(range(0, n, 128)):
        stop = min(start + 128, n)
        table = pa.table(
            {
                "id": [f"img{i}" for i in range(start, stop)],
                "uri": [f"/data/img{i}.png" for i in range(start, stop)],
                "labels": pa.array(
                    [[f"c{i % 3}"] for i in range(start, stop)], pa.list_(pa.string())
                ),
                "split": [("train", "val", "test")[i % 3] for i in range(start, stop)],
                "embedding": pa.array(list(x[start:stop]), pa.list_(pa.float32())),
            }
        )
        name = f"part-{s:05d}.parquet"
        storage.write_table(table, storage.join(out, name))
        shards.append(name)
    summary = {
        "backbone": {"name": "fake_net"},
        "dim": dim,
        "count": n,
        "quarantined": 0,
        "shards": shards,
    }
    storage.write_json(storage.join(out, "embed.json"), summary)
    storage.write_text(wd.latest_embeddings(workdir), BID + "\n")
    return x


def config(workdir: str, **kw) -> I.Config:
    return I.Config(workdir=workdir, ray=RayConfig(num_cpus=2), mlflow=MlflowConfig(), **kw)


def test_choose_factory():
    assert I.choose_factory(99_999, 512) == "Flat"
    assert I.choose_factory(1_000_000, 512) == "IVF1024,PQ64,Refine(SQ8)"
    assert I.choose_factory(10_000_000, 1280) == "IVF4096,PQ64,Refine(SQ8)"
    assert I.choose_factory(200_000, 12) == "IVF512,PQ3,Refine(SQ8)"
    assert (
        I.can_merge("IVF1024,PQ64,Refine(SQ8)")
        and I.can_merge("Flat")
        and not I.can_merge("HNSW32")
    )
    assert I.shard_slices(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_build_load_search_exact(tmp_path):
    x = fake_embeddings(str(tmp_path))
    res = I.build(config(str(tmp_path)))
    assert (res.factory, res.count, res.dim, res.shards) == ("Flat", 300, 16, 1)
    gi = I.load_index(res.out_dir, expect_dim=16, expect_backbone_id=BID)
    scores, rows = gi.search(x[:5], 3)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]  # each vector finds itself first
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert gi.gallery["id"].tolist()[:2] == ["img0", "img1"]
    meta = json.loads((tmp_path / "index" / BID / "index.json").read_text())
    assert {"backbone_id", "dim", "metric", "factory", "count", "files", "layout"} <= set(meta)
    train = np.nonzero(gi.gallery["split"].to_numpy() == "train")[0]
    _, rows = gi.search(x[:10], 5, allowed_rows=train)
    assert np.isin(rows, train).all()


def test_altered_file_and_wrong_dim_refused(tmp_path):
    fake_embeddings(str(tmp_path))
    out = I.build(config(str(tmp_path))).out_dir
    with pytest.raises(I.IndexMismatch, match="dim mismatch"):
        I.load_index(out, expect_dim=1280)
    with pytest.raises(I.IndexMismatch, match="backbone mismatch"):
        I.load_index(out, expect_backbone_id="other-0000000000")
    path = tmp_path / "index" / BID / I.INDEX_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(I.IndexMismatch, match="altered file"):
        I.load_index(out)


@pytest.mark.integration
def test_sharded_build_equals_single_build(tmp_path, ray_local):
    x = fake_embeddings(str(tmp_path), n=1200, dim=16)
    kw = {"factory": "IVF16,PQ4,Refine(SQ8)", "nprobe": 4, "train_size": 1000}
    single = I.build(config(str(tmp_path), shard_rows=10_000, **kw))
    a = I.load_index(single.out_dir)
    sa, ra = a.search(x[:50], 10)
    sharded = I.build(config(str(tmp_path), shard_rows=300, **kw))
    assert sharded.shards == 4 and single.shards == 1
    b = I.load_index(sharded.out_dir)
    sb, rb = b.search(x[:50], 10)
    assert b.index.ntotal == 1200
    assert (ra == rb).all() and np.allclose(sa, sb)
    assert b.index.k_factor == 4.0  # the re-rank factor travels in the file
    train = np.nonzero(b.gallery["split"].to_numpy() == "train")[0]
    _, rows = b.search(x[:20], 5, allowed_rows=train)
    assert np.isin(rows, train).all()


@pytest.mark.integration
def test_s3_workdir(s3_bucket):
    workdir = f"{s3_bucket}/wd"
    x = fake_embeddings(workdir, n=200)
    res = I.run(config(workdir))  # the whole stage, MLflow artifacts on S3 included
    assert res.out_dir.startswith("s3://") and res.mlflow_run_id
    gi = I.load_index(res.out_dir, expect_dim=16)
    _, rows = gi.search(x[:3], 1)
    assert rows[:, 0].tolist() == [0, 1, 2]
