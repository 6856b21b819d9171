"""`medray run evaluate`: retrieval quality of the index, pair verification and kNN accuracy.

- Retrieval (`held-out` mode): every image of `query_split` (test) is searched in the index,
  restricted to the gallery rows (the train split, or every row outside the query split), so
  a query never finds itself; AvG@K, P@K, mAP@K, mMV@K and NDCG@K for each K (medray.metrics).
  When the query split has fewer than `min_queries` images or the gallery fewer than max K
  (the 24 Kather tiles), retrieval falls back to `leave-one-out` over all images: each image
  queries all others, its own row removed. metrics.json says which mode ran and why.
- Pair verification: cosine similarity of sampled image pairs, "same category" (sharing a
  label) above a threshold chosen to maximise accuracy on `threshold_split` (val) pairs;
  accuracy on `query_split` pairs. With either split under `min_queries` images: the threshold is chosen on one
  random half of all pairs and scored on the other half (said in metrics.json).
- kNN: leave-one-out kNN accuracy (majority vote of the K nearest others) over all images.
- Plots (eval/*.png): PCA scatter coloured by label; rank-10 grid for a few queries.
- Unknown labels (the manifest's `uncertain_labels`, from `--uncertain ignore`): never
  shared and never voted (gains, P@K, mAP@K, NDCG@K count known labels only, as `zeros`
  would); pairs whose "same category" hangs on one are not drawn, and queries whose vote
  is right or wrong only by one are left out of mMV@K and the kNN accuracy (medray.metrics).
  metrics.json's `unknown_labels` counts them. Heads' metrics (`heads` section) are each
  computed on the rows where that label is known.
Everything goes to eval/metrics.json and one MLflow run (params, metrics, plots, the index).
The computation (embeddings, index, metrics, plots) runs in one Ray task with the stage's
resources (`raycluster.run_remote`); the driver gets the metrics and the plots' PNG bytes,
writes and logs them, so its memory does not grow with the archive.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from medray import metrics as M
from medray import plots, storage
from medray import workdir as wd
from medray.config import StageConfig

METRICS_FILE = "metrics.json"


class Config(StageConfig):
    """Evaluate retrieval over the index of one backbone's embeddings."""

    backbone_id: str | None = None
    """Embeddings and index to evaluate; None: the last finished embed run."""
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    """K values for every @K metric."""
    query_split: str = "test"
    """Split whose images are the queries (and whose pairs are scored)."""
    threshold_split: str = "val"
    """Split whose pairs choose the same/different similarity threshold."""
    gallery: Literal["train", "non_query"] = "train"
    """Rows a query may retrieve: the train split, or every row outside the query split."""
    min_queries: int = Field(20, ge=1)
    """Fewer queries than this (or a gallery smaller than max K): leave-one-out over all images."""
    n_pairs: int = Field(2000, ge=2)
    """Image pairs sampled per split for verification (half same-label where possible)."""
    loo_max_queries: int = Field(5000, ge=1)
    """Leave-one-out kNN runs on at most this many (randomly chosen) images."""
    plot_queries: int = Field(4, ge=0)
    """Queries shown in the rank-10 grid."""
    pca_max_points: int = Field(5000, ge=10)
    """Points drawn in the PCA scatter (a random sample beyond this)."""


class Result(BaseModel):
    """The headline numbers; the full set is in eval/metrics.json."""

    backbone_id: str
    mode: str
    """`held-out` or `leave-one-out` (see the module doc)."""
    retrieval: dict[str, float]
    pair: dict[str, float | int | str]
    knn: dict[str, float | int]
    chance: dict[str, float]
    counts: dict[str, int]
    metrics_uri: str
    plots: list[str]
    seconds: float
    mlflow_run_id: str | None = None


# ---------------------------------------------------------------- plain functions


def drop_self(scores: np.ndarray, rows: np.ndarray, self_rows: np.ndarray, k: int):
    """From (Q, k+1) results, remove each query's own row (or the last when absent) -> (Q, k)."""
    keep = rows != np.asarray(self_rows)[:, None]
    none = keep.all(1)
    keep[none, -1] = False  # self not retrieved (ties): drop the worst instead
    q = len(rows)
    return scores[keep].reshape(q, -1)[:, :k], rows[keep].reshape(q, -1)[:, :k]


def retrieval_metrics(
    qlab: np.ndarray, glab_all: np.ndarray, rows: np.ndarray, ideal: np.ndarray,
    n_rel: np.ndarray, ks: list[int], qunk: np.ndarray | None = None,
) -> dict[str, float]:  # fmt: skip
    """Every @K retrieval metric for neighbour `rows` (global row numbers into `glab_all`);
    `qunk` the queries' unknown labels (left out of mMV where they decide it)."""
    gain = M.gains(qlab, glab_all, rows)
    neigh = M.retrieved_labels(glab_all, rows)
    out: dict[str, float] = {}
    for k in ks:
        out[f"avg@{k}"] = M.avg_at_k(gain, k)
        out[f"p@{k}"] = M.precision_at_k(gain, k)
        out[f"map@{k}"] = M.map_at_k(gain, k, n_rel)
        out[f"mmv@{k}"] = M.mmv_at_k(qlab, neigh, k, qunk)
        out[f"mmv_balanced@{k}"] = M.mmv_balanced_at_k(qlab, neigh, k, qunk)
        out[f"ndcg@{k}"] = M.ndcg_at_k(gain, k, ideal)
    return out


def pair_scores(
    x: np.ndarray, labels: np.ndarray, n: int, rng, unknown: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and same-label flags of about `n` sampled pairs (none undecided
    by an `unknown` label)."""
    i, j, same = M.sample_pairs(labels, n, rng, unknown)
    return np.einsum("nd,nd->n", x[i], x[j]), same


def pair_verification(x, labels, split, cfg: Config, rng, unknown=None) -> dict:
    """Threshold on `threshold_split` pairs, accuracy on `query_split` pairs (or halves)."""
    val = split == cfg.threshold_split
    test = split == cfg.query_split
    uv, ut = (None, None) if unknown is None else (unknown[val], unknown[test])
    sv, yv = pair_scores(x[val], labels[val], cfg.n_pairs, rng, uv)
    st, yt = pair_scores(x[test], labels[test], cfg.n_pairs, rng, ut)
    source = f"{cfg.threshold_split} pairs"
    tiny = min(val.sum(), test.sum()) < cfg.min_queries
    if tiny or len(sv) < 2 or yv.all() or not yv.any() or len(st) < 2:
        s, y = pair_scores(x, labels, 2 * cfg.n_pairs, rng, unknown)
        half = rng.permutation(len(s)) < len(s) // 2
        sv, yv, st, yt = s[half], y[half], s[~half], y[~half]
        source = (
            f"a random half of all pairs ({cfg.threshold_split}/{cfg.query_split} under "
            f"{cfg.min_queries} images or one-sided); scored on the other half"
        )
    t, val_acc = M.choose_pair_threshold(sv, yv)
    return {"accuracy": M.pair_accuracy(st, yt, t), "threshold": t, "val_accuracy": val_acc,
            "n_val_pairs": len(sv), "n_test_pairs": len(st), "threshold_from": source,
            # share of same-label test pairs: "always different" scores 1 - this
            "test_same_fraction": float(yt.mean()) if len(yt) else float("nan")}  # fmt: skip


def plan_queries(split: np.ndarray, cfg: Config) -> tuple[str, np.ndarray, np.ndarray, str]:
    """(mode, query rows, gallery rows, note) for the held-out split or the LOO fallback."""
    q = np.nonzero(split == cfg.query_split)[0]
    if cfg.gallery == "train":
        g = np.nonzero(split == "train")[0]
    else:
        g = np.nonzero(split != cfg.query_split)[0]
    if len(q) >= cfg.min_queries and len(g) >= max(cfg.ks):
        return "held-out", q, g, f"{cfg.query_split} split vs {cfg.gallery} gallery"
    note = (f"leave-one-out over all {len(split)} images: the {cfg.query_split} split has "
            f"{len(q)} images (< {cfg.min_queries}) or the gallery {len(g)} (< {max(cfg.ks)})")  # fmt: skip
    return "leave-one-out", np.arange(len(split)), np.arange(len(split)), note


def label_text(labels: list[str]) -> str:
    return ", ".join(labels) if labels else "(none)"


# ---------------------------------------------------------------- stage


def load_inputs(cfg: Config):
    """Embeddings, the verified index over them, and their labels."""
    from medray.embed import read_embeddings
    from medray.index import IndexMismatch, load_index

    bid = wd.current_backbone_id(cfg.workdir, cfg.backbone_id)
    rows, x = read_embeddings(cfg.workdir, bid)
    gi = load_index(wd.index(cfg.workdir, bid), expect_dim=x.shape[1], expect_backbone_id=bid)
    if gi.ids().tolist() != rows["id"].tolist():
        raise IndexMismatch(
            f"{wd.index(cfg.workdir, bid)}: index rows differ from the embeddings (stale index); "
            f"run `medray run index --workdir {cfg.workdir}`"
        )
    labels, names = M.label_matrix(rows["labels"].tolist())
    gi.meta["_qe"] = query_expansion(cfg.workdir, bid)  # in memory only, never written
    return bid, rows, np.asarray(x, dtype=np.float32), gi, labels, names  # float32: no copy


def unknown_labels(workdir: str, ids: list[str], labels: np.ndarray, names: list[str]):
    """(N, L) bool: the labels the manifest lists as uncertain for each embedded row
    (`--uncertain ignore`); None when there are none."""
    from medray.data.manifest import read_uncertain

    unsure = read_uncertain(workdir)
    if not unsure:
        return None
    out = M.unknown_matrix([unsure.get(i, []) for i in ids], names, labels)
    return out if out.any() else None


def query_expansion(workdir: str, space_id: str) -> tuple[int, float]:
    """(n, alpha) of the space's adapter (adapt stage), (0, 0) when it has none: evaluate
    searches exactly as serving will."""
    summary = storage.join(wd.embeddings(workdir, space_id), "embed.json")
    adapter = storage.read_json(summary).get("adapter") if storage.exists(summary) else None
    qe = (adapter or {}).get("query_expansion") or {}
    return int(qe.get("n", 0)), float(qe.get("alpha", 0.0))


def search(gi, x, mode, q, g, k, qe: tuple[int, float] = (0, 0.0)):
    """Top-k gallery neighbours of rows `q`, never the query itself (with the space's QE)."""
    from medray.adapt.search import index_search

    if mode == "held-out":
        return index_search(gi, x[q], k, *qe, allowed_rows=g)
    scores, rows = index_search(gi, x[q], min(k + 1, len(x)), *qe)
    if rows.shape[1] < k + 1:
        pad = k + 1 - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return drop_self(scores, rows, q, k)


def knn_loo(gi, x, labels, cfg: Config, rng, unknown=None) -> dict:
    """Leave-one-out kNN accuracy at each K, over at most `loo_max_queries` images (queries
    decided only by an `unknown` label left out)."""
    n = len(x)
    q = np.sort(rng.choice(n, min(n, cfg.loo_max_queries), replace=False))
    k = min(max(cfg.ks), n - 1)
    _, rows = search(gi, x, "leave-one-out", q, np.arange(n), k, gi.meta.get("_qe", (0, 0.0)))
    neigh = M.retrieved_labels(labels, rows)
    qunk = None if unknown is None else unknown[q]
    out: dict = {
        f"loo_accuracy@{kk}": M.knn_accuracy(labels[q], neigh, kk, qunk) for kk in cfg.ks if kk <= k
    }
    out["loo_queries"] = len(q)
    return out


def make_plots(cfg, x, rows, gi, mode, q, g, labels_all) -> dict[str, bytes]:
    """PCA scatter and rank-10 grid as PNG bytes."""
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(x), min(len(x), cfg.pca_max_points), replace=False))
    first = [labs[0] if labs else "(none)" for labs in rows["labels"].iloc[pick]]
    out = {"pca.png": plots.pca_png(x[pick], first, f"PCA of {len(pick)} embeddings")}
    if cfg.plot_queries:
        shown = q[np.sort(rng.choice(len(q), min(len(q), cfg.plot_queries), replace=False))]
        scores, nrows = search(gi, x, mode, shown, g, min(10, len(g) - (mode != "held-out")),
                               gi.meta.get("_qe", (0, 0.0)))  # fmt: skip
        uris, labs = rows["uri"].tolist(), rows["labels"].tolist()
        queries = [(plots.thumbnail(uris[i]), label_text(labs[i])) for i in shown]
        neigh = [[(plots.thumbnail(uris[r]), label_text(labs[r]), float(s))
                  for r, s in zip(rr, ss, strict=True) if r >= 0]
                 for rr, ss in zip(nrows, scores, strict=True)]  # fmt: skip
        out["rank10.png"] = plots.rank_grid_png(queries, neigh, f"top 10 ({mode})")
    return out


def head_metrics(workdir: str) -> dict:
    """Stored metrics of any trained heads (heads/<task>/head.json), keyed by task."""
    out = {}
    for task_dir in storage.listdir(wd.heads(workdir)):
        meta = storage.join(task_dir, "head.json")
        if storage.exists(meta):
            info = storage.read_json(meta)
            out[info.get("task", task_dir.rsplit("/", 1)[-1])] = info.get("metrics", {})
    return out


def evaluate(cfg: Config, with_plots: bool = True) -> tuple[dict, dict[str, bytes], object]:
    """Compute metrics.json's content and the plots (no MLflow, nothing written)."""
    if any(k < 1 for k in cfg.ks) or not cfg.ks:
        raise ValueError(f"evaluate: ks must be positive integers, got {cfg.ks}")
    rng = np.random.default_rng(cfg.seed)
    bid, rows, x, gi, labels, names = load_inputs(cfg)
    split = rows["split"].astype(str).to_numpy()
    mode, q, g, note = plan_queries(split, cfg)
    ks = [k for k in sorted(set(cfg.ks)) if k <= len(g) - (mode != "held-out")]
    if not ks:
        raise ValueError(f"evaluate: a gallery of {len(g)} images is too small for K = {cfg.ks}")
    kmax = max(ks)
    scores, nrows = search(gi, x, mode, q, g, kmax, gi.meta["_qe"])
    exclude = q if mode != "held-out" else None
    ideal, n_rel = M.ideal_gains(labels[q], labels[g], kmax, exclude=exclude)
    unknown = unknown_labels(cfg.workdir, rows["id"].tolist(), labels, names)
    qunk = None if unknown is None else unknown[q]
    retrieval = retrieval_metrics(labels[q], labels, nrows, ideal, n_rel, ks, qunk)
    # A random ranking's expected P@K (any K): the share of the gallery relevant to the query.
    chance = float(np.mean(n_rel / (len(g) - (mode != "held-out"))))
    metrics = {
        "backbone_id": bid, "mode": mode, "note": note, "ks": ks, "label_names": names,
        "retrieval": retrieval, "chance": {"p@k": chance},
        "pair": pair_verification(x, labels, split, cfg, rng, unknown),
        "knn": knn_loo(gi, x, labels, cfg, rng, unknown),
        "counts": {"embeddings": len(x), "queries": len(q), "gallery": len(g),
                   "labels": len(names)},
        "index": {k: gi.meta.get(k) for k in ("factory", "count", "dim", "search_params", "recall_at_10")},
        "query_expansion": {"n": gi.meta["_qe"][0], "alpha": gi.meta["_qe"][1]},
        "unknown_labels": {"rows": int(unknown.any(1).sum()), "cells": int(unknown.sum())}
        if unknown is not None else {"rows": 0, "cells": 0},
    }  # fmt: skip
    heads = head_metrics(cfg.workdir)
    if heads:
        metrics["heads"] = heads
    pngs = make_plots(cfg, x, rows, gi, mode, q, g, labels) if with_plots else {}
    metrics["plots"] = sorted(pngs)
    return metrics, pngs, gi


def metrics_and_plots(cfg: Config) -> tuple[dict, dict[str, bytes]]:
    """`evaluate` without the loaded index: what a Ray task sends back to the driver."""
    metrics, pngs, _ = evaluate(cfg)
    return metrics, pngs


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """Numeric metrics with MLflow-legal names (`@` is not allowed: p@5 -> p_at_5)."""
    out = {}
    for section in ("retrieval", "pair", "knn", "chance"):
        for key, value in metrics.get(section, {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{section}.{key.replace('@', '_at_')}"] = float(value)
    return out


def run(config: Config) -> Result:
    """Evaluate (module doc), write eval/, log everything to one MLflow run."""
    import mlflow

    from medray import raycluster, tracking
    from medray.index import META_FILE

    cfg = config
    start = time.perf_counter()
    out_dir = wd.eval_dir(cfg.workdir)
    raycluster.init(cfg.ray)
    params = cfg.model_dump(exclude={"mlflow", "ray"})
    with tracking.stage_run(cfg.mlflow, cfg.workdir, "evaluate", params) as mlrun:
        metrics, pngs = raycluster.run_remote(metrics_and_plots, cfg, ray_cfg=cfg.ray, gpu=False)
        metrics["mlflow_run_id"] = mlrun.info.run_id
        for name, data in pngs.items():
            storage.write_bytes(storage.join(out_dir, name), data)
            mlflow.log_image(_png_array(data), f"plots/{name}")
        metrics_uri = storage.join(out_dir, METRICS_FILE)
        storage.write_json(metrics_uri, metrics)
        mlflow.log_params({"eval_backbone_id": metrics["backbone_id"], "mode": metrics["mode"]})
        mlflow.log_metrics(mlflow_metrics(metrics))
        mlflow.log_dict(metrics, METRICS_FILE)
        index_dir = wd.index(cfg.workdir, metrics["backbone_id"])
        for name in [*storage.read_json(storage.join(index_dir, META_FILE))["files"], META_FILE]:
            with storage.local_file(storage.join(index_dir, name)) as path:
                mlflow.log_artifact(path, "index")
    return Result(
        backbone_id=metrics["backbone_id"], mode=metrics["mode"], retrieval=metrics["retrieval"],
        pair=metrics["pair"], knn=metrics["knn"], chance=metrics["chance"],
        counts=metrics["counts"], metrics_uri=metrics_uri,
        plots=[storage.join(out_dir, n) for n in sorted(pngs)],
        seconds=round(time.perf_counter() - start, 2), mlflow_run_id=mlrun.info.run_id,
    )  # fmt: skip


def _png_array(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
