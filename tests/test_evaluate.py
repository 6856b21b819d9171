"""medray.evaluate on embeddings shards made here (per docs/contracts.md): held-out metrics,
the leave-one-out fallback for tiny sets, pair verification, plots and the stage's outputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from medray import evaluate as E
from medray import index as I
from medray import storage
from medray import workdir as wd
from medray.config import MlflowConfig, RayConfig

BID = "fake_net-abcdef0123"


def clustered_embeddings(workdir: str, n: int, n_classes: int = 4, noise: float = 0.6, seed=0):
    """Normalised embeddings around one centre per class, splits train/val/test 60/20/20."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    centres = rng.normal(size=(n_classes, 32))
    x = (centres[y] + noise * rng.normal(size=(n, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    split = np.array(["train", "train", "train", "val", "test"])[rng.integers(0, 5, n)]
    table = pa.table(
        {
            "id": [f"img{i}" for i in range(n)],
            "uri": [f"/nowhere/img{i}.png" for i in range(n)],
            "labels": pa.array([[f"class{v}"] for v in y], pa.list_(pa.string())),
            "split": split.tolist(),
            "embedding": pa.array(list(x), pa.list_(pa.float32())),
        }
    )
    out = wd.embeddings(workdir, BID)
    storage.write_table(table, storage.join(out, "part-00000.parquet"))
    summary = {"dim": 32, "count": n, "quarantined": 0, "shards": ["part-00000.parquet"]}
    storage.write_json(storage.join(out, "embed.json"), summary)
    storage.write_text(wd.latest_embeddings(workdir), BID + "\n")
    I.build(I.Config(workdir=workdir))
    return x, y, split


def cfg(workdir, **kw) -> E.Config:
    return E.Config(workdir=workdir, ray=RayConfig(num_cpus=2), mlflow=MlflowConfig(), **kw)


def test_drop_self():
    rows = np.array([[0, 5, 6], [7, 8, 1], [2, 3, 4]])
    scores = rows.astype(float)
    s, r = E.drop_self(scores, rows, np.array([0, 1, 9]), 2)
    assert r.tolist() == [[5, 6], [7, 8], [2, 3]] and s.tolist() == [[5, 6], [7, 8], [2, 3]]


def test_plan_queries_falls_back_for_tiny_splits():
    split = np.array(["train"] * 18 + ["val"] * 3 + ["test"] * 3)
    mode, q, g, note = E.plan_queries(split, cfg("w"))
    assert mode == "leave-one-out" and len(q) == len(g) == 24 and "3 images" in note
    split = np.array(["train"] * 60 + ["test"] * 30)
    mode, q, g, _ = E.plan_queries(split, cfg("w"))
    assert mode == "held-out" and len(q) == 30 and len(g) == 60
    _, _, g, _ = E.plan_queries(
        np.array(["train"] * 60 + ["val"] * 5 + ["test"] * 30), cfg("w", gallery="non_query")
    )
    assert len(g) == 65


def test_held_out_metrics_and_plots(tmp_path):
    x, y, split = clustered_embeddings(str(tmp_path), 400)
    metrics, _, _ = E.evaluate(cfg(str(tmp_path)), with_plots=False)
    assert metrics["mode"] == "held-out"
    r = metrics["retrieval"]
    for k in (1, 5, 10):
        assert {f"avg@{k}", f"p@{k}", f"map@{k}", f"mmv@{k}", f"ndcg@{k}"} <= set(r)
    assert r["p@5"] > 0.9 > 0.3 > metrics["chance"]["p@k"]  # 4 classes: chance 0.25
    # the same P@5 by brute force: test queries against train rows only
    q, g = np.nonzero(split == "test")[0], np.nonzero(split == "train")[0]
    top = g[np.argsort(-(x[q] @ x[g].T), axis=1)[:, :5]]
    assert r["p@5"] == pytest.approx((y[top] == y[q][:, None]).mean())
    assert metrics["counts"]["queries"] == len(q) and metrics["counts"]["gallery"] == len(g)
    assert metrics["pair"]["accuracy"] > 0.85 and -1 <= metrics["pair"]["threshold"] <= 1
    assert metrics["pair"]["threshold_from"] == "val pairs"
    assert metrics["knn"]["loo_accuracy@5"] > 0.9


def test_tiny_set_uses_leave_one_out(tmp_path):
    clustered_embeddings(str(tmp_path), 24, n_classes=8, noise=0.3)
    metrics, pngs, _ = E.evaluate(cfg(str(tmp_path), plot_queries=1))
    assert set(pngs) == {"pca.png", "rank10.png"} and metrics["plots"] == sorted(pngs)
    assert all(b[:4] == b"\x89PNG" for b in pngs.values())
    assert metrics["mode"] == "leave-one-out" and "leave-one-out" in metrics["note"]
    assert metrics["counts"]["queries"] == 24
    assert metrics["knn"]["loo_queries"] == 24 and 0 <= metrics["knn"]["loo_accuracy@1"] <= 1
    assert "half" in metrics["pair"]["threshold_from"]


def test_stale_index_refused(tmp_path):
    clustered_embeddings(str(tmp_path), 50)
    clustered_embeddings(str(tmp_path), 60)  # embeddings changed, index rebuilt: fine
    E.evaluate(cfg(str(tmp_path)), with_plots=False)
    meta = tmp_path / "index" / BID / "index.json"
    data = json.loads(meta.read_text())
    data["dim"] = 64
    meta.write_text(json.dumps(data))
    with pytest.raises(I.IndexMismatch, match="dim mismatch"):
        E.evaluate(cfg(str(tmp_path)), with_plots=False)


@pytest.mark.integration
def test_run_writes_metrics_json_and_mlflow(tmp_path, ray_local, monkeypatch):
    """The index and evaluate stages read the embeddings in a Ray task, never in the driver
    (whose memory must not grow with the archive): with the driver's reader broken, both run."""
    from medray import embed

    clustered_embeddings(str(tmp_path), 200)

    def not_in_the_driver(*args, **kwargs):
        raise AssertionError("read_embeddings called in the driver")

    monkeypatch.setattr(embed, "read_embeddings", not_in_the_driver)
    built = I.run(I.Config(workdir=str(tmp_path), ray=RayConfig(num_cpus=2)))
    assert built.count == 200 and built.mlflow_run_id
    res = E.run(cfg(str(tmp_path)))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["retrieval"] == res.retrieval and res.mlflow_run_id
    assert (tmp_path / "eval" / "pca.png").exists() and (tmp_path / "eval" / "rank10.png").exists()
    import mlflow

    run = mlflow.get_run(res.mlflow_run_id)
    assert run.data.metrics["retrieval.p_at_5"] == pytest.approx(res.retrieval["p@5"])
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(res.mlflow_run_id, "index")}
    assert {"index/index.faiss", "index/gallery.arrow", "index/index.json"} <= arts
