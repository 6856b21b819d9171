"""medray.index: factory choice, build/load round trip, refusal of altered or mismatched
indexes, parallel (Ray) adds equal to the single build, and an s3:// workdir."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pytest

from medray import index as I
from medray import storage
from medray import workdir as wd
from medray.config import MlflowConfig, RayConfig
from medray.index import tune as T

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
    assert I.choose_factory(1_000_000, 512) == "IVF1024,PQ128x4fs,Refine(SQ8)"
    assert I.choose_factory(10_000_000, 1280) == "IVF4096,PQ128x4fs,Refine(SQ8)"
    assert I.choose_factory(200_000, 12) == "IVF512,PQ3x4fs,Refine(SQ8)"
    assert (
        I.can_merge("IVF1024,PQ64,Refine(SQ8)")
        and I.can_merge("Flat")
        and not I.can_merge("HNSW32")
    )
    assert I.add_slices(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_build_load_search_exact(tmp_path):
    x = fake_embeddings(str(tmp_path))
    res = I.build(config(str(tmp_path)))
    assert (res.factory, res.count, res.dim, res.add_tasks) == ("Flat", 300, 16, 1)
    gi = I.load_index(res.out_dir, expect_dim=16, expect_backbone_id=BID)
    scores, rows = gi.search(x[:5], 3)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]  # each vector finds itself first
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert gi.ids().tolist()[:2] == ["img0", "img1"]
    meta = json.loads((tmp_path / "index" / BID / "index.json").read_text())
    assert {"backbone_id", "dim", "metric", "factory", "count", "files", "layout"} <= set(meta)
    train = np.nonzero(gi.column("split") == "train")[0]
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
def test_parallel_add_equals_single_build(tmp_path, ray_local):
    x = fake_embeddings(str(tmp_path), n=1200, dim=16)
    kw = {"factory": "IVF16,PQ4,Refine(SQ8)", "nprobe": 4, "train_size": 1000}
    kw["target_recall"] = None  # fixed search settings: tuning picks by measured speed
    single = I.build(config(str(tmp_path), add_rows=10_000, **kw))
    a = I.load_index(single.out_dir)
    sa, ra = a.search(x[:50], 10)
    sharded = I.build(config(str(tmp_path), shard_rows=300, **kw))  # the old name still works
    assert sharded.add_tasks == 4 and single.add_tasks == 1
    b = I.load_index(sharded.out_dir)
    sb, rb = b.search(x[:50], 10)
    assert b.index.ntotal == 1200
    assert (ra == rb).all() and np.allclose(sa, sb)
    assert b.index.k_factor == 4.0  # the re-rank factor travels in the file
    train = np.nonzero(b.column("split") == "train")[0]
    _, rows = b.search(x[:20], 5, allowed_rows=train)
    assert np.isin(rows, train).all()


@pytest.mark.integration
def test_s3_workdir(s3_bucket, ray_local, monkeypatch):
    workdir = f"{s3_bucket}/wd"
    x = fake_embeddings(workdir, n=200)
    # The build runs in a Ray worker, which may predate moto's dummy credentials (medray
    # forwards only the endpoint: cluster nodes have their own role).
    monkeypatch.setattr(
        storage, "WORKER_ENV", (*storage.WORKER_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    )
    res = I.run(config(workdir))  # the whole stage, MLflow artifacts on S3 included
    assert res.out_dir.startswith("s3://") and res.mlflow_run_id
    gi = I.load_index(res.out_dir, expect_dim=16)
    _, rows = gi.search(x[:3], 1)
    assert rows[:, 0].tolist() == [0, 1, 2]


# ---------------------------------------------------------------- tuned recall (medray.index.tune)


def clustered(n: int = 5000, dim: int = 32, centres: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors around `centres` random directions: structure an IVF index can exploit."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = (c[rng.integers(0, centres, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def gallery_rows(n: int):
    import pandas as pd

    ids = [f"img{i}" for i in range(n)]
    return pd.DataFrame({"id": ids, "uri": ids, "labels": [["a"]] * n, "split": ["train"] * n})


def test_drop_self_and_recall():
    rows = np.array([[3, 1, 2], [5, 6, 7]])
    assert T.drop_self(rows, np.array([1, 9]), 2).tolist() == [[3, 2], [5, 6]]
    assert T.recall_at_k(np.array([[1, 2], [3, -1]]), np.array([[2, 1], [4, 3]])) == 0.75


def test_tune_reaches_target_on_clustered_data():
    both = clustered(n=5200)
    x, q = both[:5000], both[5000:]  # q: new images from the same distribution
    index = I.trained_empty(x, "IVF64,Flat", 1000, 0)
    index.add(x)
    cfg = I.Config(workdir="unused", target_recall=0.95, tune_queries=500)
    got = T.tune_index(index, x, cfg)
    assert got["target_met"] and got["recall_at_k"] >= 0.95 and got["k"] == 10
    assert got["search_params"]["nprobe"] > 1 and got["tune_queries"] == 500
    assert faiss.extract_index_ivf(index).nprobe == got["search_params"]["nprobe"]  # applied
    # recall on other queries, measured here by brute force, agrees with the tuned figure
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert T.recall_at_k(index.search(q, 10)[1], exact) >= 0.9
    flat = faiss.IndexFlatIP(32)
    flat.add(x)
    assert T.tune_index(flat, x, cfg)["recall_at_k"] == 1.0


def test_on_miss_keep_warns_and_exact_rebuilds_flat(tmp_path, caplog):
    x = clustered(n=2000)
    kw = {"workdir": str(tmp_path), "target_recall": 0.99, "tune_queries": 200}
    miss = "IVF16,PQ2x4fs"  # 2 bytes a vector: cannot reach 0.99
    with caplog.at_level("WARNING"):
        meta = I.build_single(x, gallery_rows(2000), I.Config(**kw), miss, str(tmp_path / "a"), {})
    assert meta["factory"] == miss and meta["target_met"] is False
    assert meta["recall_at_10"] < 0.99 and "kept (on_miss: keep)" in meta["warning"]
    assert meta["search_params"]["nprobe"] == 16 and "below target_recall" in caplog.text
    cfg = I.Config(**kw, on_miss="exact")
    meta = I.build_single(x, gallery_rows(2000), cfg, miss, str(tmp_path / "b"), {"x": 1})
    assert (meta["factory"], meta["recall_at_10"], meta["target_met"], meta["x"]) == (
        "Flat", 1.0, True, 1)  # fmt: skip
    assert meta["tune"]["missed"]["recall_at_k"] < 0.99 and "exact Flat" in meta["warning"]
    assert I.load_index(str(tmp_path / "b")).index.ntotal == 2000


def test_search_params_round_trip_and_restricted_search(tmp_path):
    x = clustered(n=3000)
    cfg = I.Config(workdir=str(tmp_path), train_size=1000, tune_queries=300)
    factory = "IVF32_HNSW32,PQ8x4fs,RFlat"
    meta = I.build_single(x, gallery_rows(3000), cfg, factory, str(tmp_path), {})
    assert set(meta["search_params"]) == {"nprobe", "quantizer_efSearch", "k_factor_rf"}
    assert meta["recall_at_10"] >= 0.95 and meta["bytes_per_vector"] > 128  # RFlat: raw vectors
    gi = I.load_index(str(tmp_path))
    assert T.current_params(gi.index) == meta["search_params"]  # applied on load
    _, all_rows = gi.search(x[:20], 5)
    _, some = gi.search(x[:20], 5, allowed_rows=np.arange(3000))  # same settings, via params
    assert (all_rows == some).all()
    _, even = gi.search(x[:20], 5, allowed_rows=np.arange(0, 3000, 2))
    assert (even % 2 == 0).all()
    # index dirs written before tuning stored nprobe / k_factor: still applied
    T.apply_search_params(gi.index, {"nprobe": 7, "k_factor": 3.0})
    assert T.current_params(gi.index)["nprobe"] == 7
    assert T.current_params(gi.index)["k_factor_rf"] == 3.0
    T.apply_search_params(faiss.IndexFlatIP(4), {"nprobe": 7})  # no such knob: ignored


@pytest.mark.integration
@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ8x4fs,Refine(SQ8)", "HNSW32"])
def test_index_and_evaluate_stages(tmp_path, factory, ray_local):
    """The real index stage (MLflow run included) and evaluate, per factory the docs name:
    every one reaches its tuned recall and the retrieval quality of exact search."""
    from test_evaluate import BID as EVAL_BID
    from test_evaluate import cfg as eval_cfg
    from test_evaluate import clustered_embeddings

    from medray import evaluate as E

    clustered_embeddings(str(tmp_path), 600, noise=1.0)  # also builds Flat: the reference
    exact, _, _ = E.evaluate(eval_cfg(str(tmp_path)), with_plots=False)
    res = I.run(config(str(tmp_path), factory=factory, train_size=1000, tune_queries=300))
    assert res.factory == factory and res.target_met and res.recall_at_k >= 0.95
    meta = json.loads((tmp_path / "index" / EVAL_BID / "index.json").read_text())
    assert meta["search_params"] == res.search_params and meta["recall_at_10"] == res.recall_at_k
    metrics, _, _ = E.evaluate(eval_cfg(str(tmp_path)), with_plots=False)
    assert metrics["index"]["factory"] == factory
    assert metrics["retrieval"]["p@5"] == pytest.approx(exact["retrieval"]["p@5"], abs=0.03)


def test_sweep_picks_the_fastest_point_reaching_the_target():
    def measure(p):  # recall grows with nprobe and k_factor; nprobe costs more than k_factor
        recall = 0.4 + 0.08 * np.log2(p["nprobe"]) + 0.05 * np.log2(p["k_factor_rf"])
        return min(1.0, recall), p["nprobe"] + 0.1 * p["k_factor_rf"]

    names = ["nprobe", "k_factor_rf"]
    params, recall, met = T.sweep(measure, names, nlist=64, target=0.95)
    # minimal points reaching 0.95 (nprobe, k_factor: cost): (4, 256): 29.6, (8, 128): 20.8,
    # (16, 32): 19.2, (32, 8): 32.8, (64, 4): 64.4
    assert met and params == {"nprobe": 16, "k_factor_rf": 32.0} and recall >= 0.95
    params, recall, met = T.sweep(lambda p: (0.5, 1.0), names, nlist=64, target=0.95)
    assert not met and recall == 0.5 and params["nprobe"] == 64
