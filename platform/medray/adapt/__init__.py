"""`medray run adapt`: fit retrieval adapters on frozen embeddings and keep the one that
measures best on validation queries (never test), between `embed` and `index`.

Candidates (each optional, `candidates` in the config):
- `none`: the backbone's embeddings as they are;
- `whiten`: PCA whitening learned on the archive's train rows (unsupervised);
- `projection` / `supcon`: a small projection head trained on the train rows' labels with
  a proxy-based normalised-softmax loss / a supervised contrastive loss (medray.adapt.fit),
  when labels exist: which loss suits a dataset is decided on its val rows;
each with query expansion at search time (`query_expansion` lists the neighbour counts to
try; 0 = off). Every candidate is scored by searching the `score_split` (val) rows among the
`fit_split` (train) rows: P@1/5/10, mAP@10, mMV@5 micro and class-balanced, and pair
accuracy; `metric` picks the winner.

A winning adapter writes its adapted embeddings to `embeddings/<space_id>/` (the same shard
format as `medray run embed`, plus `adapter.json` + `adapter.safetensors`) and points
`embeddings/LATEST` at it, so index, heads, evaluate and the registry bundle all work in
the adapted space and serving applies the same adapter after the backbone. `none` leaves
LATEST on the backbone's embeddings. The ranking goes to adapt/ranking.json and MLflow.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from medray import storage, tracking
from medray import workdir as wd
from medray.adapt import fit as F
from medray.adapt.adapter import (
    Adapter,
    has_adapter,
    load_adapter,
    projection_adapter,
    save_adapter,
    whitening_adapter,
)
from medray.adapt.search import search_space
from medray.config import Section, StageConfig

__all__ = ["Config", "Result", "run", "Adapter", "load_adapter", "has_adapter", "search_space"]

METRICS = ("p@5", "mmv_balanced@5", "map@10", "mmv@5", "pair_accuracy")


class WhitenConfig(Section):
    """PCA whitening (unsupervised)."""

    dim: int | None = 256
    """Principal axes kept (None: all the data spans)."""
    shrinkage: float = Field(0.1, ge=0)
    """Added to every eigenvalue, as a fraction of their mean (tames noise axes)."""


class ProjectionConfig(Section):
    """The supervised projection head (medray.adapt.fit.fit_projection)."""

    out_dim: int = Field(128, ge=2)
    hidden: int = Field(512, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    scale: float = Field(20.0, gt=0)
    """Logit scale of the proxy loss (an inverse temperature)."""
    loss: Literal["proxy", "supcon"] = "proxy"
    """Loss of the `projection` candidate (the `supcon` candidate always uses supcon)."""


class Config(StageConfig):
    """Adapters to try, how they are fitted and how the winner is chosen."""

    backbone_id: str | None = None
    """Backbone embeddings to adapt; None: the last embed run's (the source of LATEST when
    LATEST is already an adapted space, so re-running replaces the adapter)."""
    candidates: list[Literal["none", "whiten", "projection", "supcon"]] = Field(
        default_factory=lambda: ["none", "whiten", "projection", "supcon"]
    )
    """Adapters to fit and score; `projection` uses the proxy loss, `supcon` the supervised
    contrastive loss, both with the `projection` settings."""
    query_expansion: list[int] = Field(default_factory=lambda: [0, 2])
    """alpha-QE neighbour counts to try with each fitted adapter (0 = off)."""
    qe_alpha: float = Field(3.0, ge=0)
    """Similarity exponent of alpha-QE."""
    metric: Literal["p@5", "mmv_balanced@5", "map@10", "mmv@5", "pair_accuracy"] = "map@10"
    """Validation score that picks the winner (all are computed and shown)."""
    tolerance: float = Field(0.005, ge=0)
    """The simplest candidate (in `candidates` order, query expansion last) within this much
    of the best score wins: a more complex space must pay for itself."""
    fit_split: str = "train"
    """Rows the adapters are fitted on (and the gallery of the validation search)."""
    score_split: str = "val"
    """Rows whose search results score the candidates. Never `test`."""
    max_gallery: int = Field(200_000, ge=10)
    """Gallery rows of the validation search (a random sample beyond this)."""
    max_queries: int = Field(5_000, ge=10)
    """Validation queries (a random sample beyond this)."""
    n_pairs: int = Field(2000, ge=10)
    """Validation pairs for pair accuracy (threshold on one half, accuracy on the other)."""
    whiten: WhitenConfig = Field(default_factory=WhitenConfig)
    projection: ProjectionConfig = Field(default_factory=ProjectionConfig)


class Result(BaseModel):
    backbone_id: str
    """The backbone embeddings that were adapted."""
    space_id: str
    """What embeddings/LATEST now names: the adapted space, or backbone_id for `none`."""
    winner: str
    metric: str
    table: str
    ranking: list[dict[str, Any]]
    seconds: float
    mlflow_run_id: str


# ---------------------------------------------------------------- scoring (plain functions)


def score_space(
    zq: np.ndarray, lq: np.ndarray, zg: np.ndarray, lg: np.ndarray, qe: int, alpha: float,
    n_pairs: int, seed: int,
) -> dict[str, float]:  # fmt: skip
    """Validation metrics of one space: queries `zq` (labels `lq`, bool (Q, L)) searched among
    `zg` (labels `lg`), exact, with alpha-QE over `qe` neighbours when qe > 0."""
    from medray import metrics as M

    k = min(10, len(zg))
    scores, rows = search_space(zq, zg, k, qe, alpha)
    gain = M.gains(lq, lg, rows)
    neigh = M.retrieved_labels(lg, rows)
    out = {f"p@{kk}": M.precision_at_k(gain, kk) for kk in (1, 5, 10) if kk <= k}
    _, n_rel = M.ideal_gains(lq, lg, k)
    out["map@10"] = M.map_at_k(gain, k, n_rel)
    out["mmv@5"] = M.mmv_at_k(lq, neigh, min(5, k))
    out["mmv_balanced@5"] = M.mmv_balanced_at_k(lq, neigh, min(5, k))
    out["pair_accuracy"] = split_pair_accuracy(zq, lq, n_pairs, seed)
    return out


def split_pair_accuracy(z: np.ndarray, labels: np.ndarray, n: int, seed: int) -> float:
    """Pair verification within one split: threshold chosen on pairs of one random half of the
    rows, accuracy on pairs of the other half (disjoint images)."""
    from medray import metrics as M

    rng = np.random.default_rng(seed)
    half = rng.permutation(len(z)) < len(z) // 2
    i, j, same = M.sample_pairs(labels[half], n, rng)
    za = z[half]
    t, _ = M.choose_pair_threshold(np.einsum("nd,nd->n", za[i], za[j]), same)
    i, j, same = M.sample_pairs(labels[~half], n, rng)
    zb = z[~half]
    return M.pair_accuracy(np.einsum("nd,nd->n", zb[i], zb[j]), same, t)


def targets_of(labels: np.ndarray, multi_label: bool) -> np.ndarray:
    """Training targets from a bool label matrix: class indices, or 0/1 rows (multi-label)."""
    return labels.astype(np.float32) if multi_label else labels.argmax(1).astype(np.int64)


def fit_candidate(
    kind: str, x: np.ndarray, labels: np.ndarray, multi_label: bool, cfg: Config, meta: dict
) -> Adapter | None:
    """Fit one adapter kind on train rows (`none` -> None)."""
    if kind == "none":
        return None
    if kind == "whiten":
        mean, proj = F.fit_whitening(x, cfg.whiten.dim, cfg.whiten.shrinkage)
        return whitening_adapter(mean, proj, meta)
    labelled = labels.any(1) | multi_label
    if labelled.sum() < 2 or len(np.unique(labels[labelled], axis=0)) < 2:
        raise ValueError(f"projection: needs labelled {cfg.fit_split} rows of >= 2 classes")
    p = cfg.projection
    loss = "supcon" if kind == "supcon" else p.loss
    head, mean = F.fit_projection(
        x[labelled], targets_of(labels[labelled], multi_label), out_dim=p.out_dim,
        hidden=p.hidden, dropout=p.dropout, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
        weight_decay=p.weight_decay, scale=p.scale, loss=loss, seed=meta.get("seed", 0),
    )  # fmt: skip
    return projection_adapter(head, mean, {**meta, "loss": loss})


def rank(rows: list[dict], metric: str) -> list[dict]:
    """Best first by `metric`, failed or unscored last; adds `rank` and `order` (the row's
    place in the input: its complexity)."""
    rows = [{**r, "order": i} for i, r in enumerate(rows)]
    ordered = sorted(rows, key=lambda r: (r.get(metric) is None, -(r.get(metric) or 0.0)))
    return [{"rank": i + 1, **r} for i, r in enumerate(ordered)]


def pick(rows: list[dict], metric: str, tolerance: float) -> dict | None:
    """The simplest scored row within `tolerance` of the best `metric` (None if none scored)."""
    scored = [r for r in rows if not r.get("error") and r.get(metric) is not None]
    if not scored:
        return None
    best = max(r[metric] for r in scored)
    return min((r for r in scored if r[metric] >= best - tolerance), key=lambda r: r["order"])


def format_table(rows: list[dict]) -> str:
    head = f"{'#':>2} {'candidate':<18}" + "".join(f"{m:>15}" for m in METRICS)
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['rank']:>2} {r['candidate']:<18} failed: {r['error'][:70]}")
            continue
        lines.append(
            f"{r['rank']:>2} {r['candidate']:<18}" + "".join(f"{r[m]:>15.3f}" for m in METRICS)
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the stage


def source_backbone_id(workdir: str, pinned: str | None) -> str:
    """The backbone embeddings to adapt: pinned, else LATEST (or LATEST's source)."""
    bid = wd.current_backbone_id(workdir, pinned)
    summary = storage.join(wd.embeddings(workdir, bid), "embed.json")
    if storage.exists(summary):
        return storage.read_json(summary).get("source_backbone_id") or bid
    return bid


def sample_rows(mask: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    rows = np.flatnonzero(mask)
    return np.sort(rng.choice(rows, limit, replace=False)) if len(rows) > limit else rows


def evaluate_candidates(cfg: Config, x, labels, split, multi, meta) -> tuple[list[dict], dict]:
    """Fit every candidate on train, score it (with each QE setting) on val; rows + adapters."""
    if cfg.score_split == "test":
        raise ValueError("adapt: score_split must not be test (choices are made on val)")
    rng = np.random.default_rng(cfg.seed)
    fit_rows = np.flatnonzero(split == cfg.fit_split)
    q = sample_rows((split == cfg.score_split) & (labels.any(1) | multi), cfg.max_queries, rng)
    g = sample_rows(split == cfg.fit_split, cfg.max_gallery, rng)
    if len(fit_rows) < 2:
        raise ValueError(f"adapt: the {cfg.fit_split} split has {len(fit_rows)} rows")
    rows, adapters = [], {}
    for kind in dict.fromkeys(cfg.candidates):
        try:
            adapter = fit_candidate(kind, x[fit_rows], labels[fit_rows], multi, cfg, meta)
        except ValueError as exc:
            rows.append({"candidate": kind, "kind": kind, "qe": 0, "error": str(exc)})
            continue
        z = x if adapter is None else adapter.apply(x)
        for qe in [0] if adapter is None else sorted(set(cfg.query_expansion)):
            name = kind if qe == 0 else f"{kind}+qe{qe}"
            row: dict[str, Any] = {"candidate": name, "kind": kind, "qe": qe}
            if len(q) >= 2:
                row.update(score_space(z[q], labels[q], z[g], labels[g], qe, cfg.qe_alpha,
                                       cfg.n_pairs, cfg.seed))  # fmt: skip
            rows.append(row)
            adapters[name] = adapter
    return rank(rows, cfg.metric), adapters


def write_space(cfg: Config, bid: str, frame: pd.DataFrame, z: np.ndarray, adapter: Adapter) -> str:
    """Adapted embeddings as shards + embed.json + the adapter, then LATEST -> space id."""
    from medray.embed import SUMMARY, part_name, shard_bounds, shard_table

    space = adapter.meta["space_id"]
    out_dir = wd.embeddings(cfg.workdir, space)
    storage.remove(out_dir)
    source = storage.read_json(storage.join(wd.embeddings(cfg.workdir, bid), SUMMARY))
    size = int(source.get("shard_size", 4096))
    shards = []
    for s, (a, b) in enumerate(shard_bounds(len(frame), size)):
        storage.write_table(
            shard_table(frame.iloc[a:b], z[a:b]), storage.join(out_dir, part_name(s))
        )
        shards.append(part_name(s))
    save_adapter(adapter, out_dir)
    summary = {**source, "dim": adapter.out_dim, "count": len(frame), "shards": shards,
               "source_backbone_id": bid, "adapter": adapter.meta}  # fmt: skip
    storage.write_json(storage.join(out_dir, SUMMARY), summary)
    storage.write_text(wd.latest_embeddings(cfg.workdir), space + "\n")
    return space


def run(config: Config) -> Result:
    """Fit, score and choose (module doc); write the winner's space and adapt/ranking.json."""
    from medray import metrics as M
    from medray.embed import read_embeddings

    cfg, start = config, time.perf_counter()
    bid = source_backbone_id(cfg.workdir, cfg.backbone_id)
    frame, x = read_embeddings(cfg.workdir, bid)
    labels, names = M.label_matrix(frame["labels"].tolist())
    split = frame["split"].astype(str).to_numpy()
    info_uri = wd.dataset_info(cfg.workdir)
    info = storage.read_json(info_uri) if storage.exists(info_uri) else {}
    multi = bool(info.get("multi_label", labels.sum(1).max(initial=0) > 1))
    meta = {"source_backbone_id": bid, "label_names": names, "seed": cfg.seed,
            "fitted_on": {"split": cfg.fit_split, "rows": int((split == cfg.fit_split).sum())}}  # fmt: skip
    params = cfg.model_dump(exclude={"workdir", "mlflow", "ray"})
    with tracking.stage_run(cfg.mlflow, cfg.workdir, "adapt", params) as mlrun:
        rows, adapters = evaluate_candidates(cfg, x, labels, split, multi, meta)
        best = pick(rows, cfg.metric, cfg.tolerance)
        if best is None and len(cfg.candidates) == 1 and not rows[0].get("error"):
            best = rows[0]  # nothing to score against (no labelled val rows): as configured
        winner = best["candidate"] if best else "none"
        adapter = adapters.get(winner)
        space = bid
        if adapter is not None:
            adapter.meta["query_expansion"] = {"n": int(best["qe"]), "alpha": cfg.qe_alpha}
            adapter.meta["validation"] = {m: best.get(m) for m in METRICS}
            adapter.meta["mlflow_run_id"] = mlrun.info.run_id
            space = write_space(cfg, bid, frame, adapter.apply(x), adapter)
        else:
            storage.write_text(wd.latest_embeddings(cfg.workdir), bid + "\n")
        report = {"metric": cfg.metric, "backbone_id": bid, "space_id": space, "winner": winner,
                  "candidates": rows, "mlflow_run_id": mlrun.info.run_id}  # fmt: skip
        storage.write_json(storage.join(wd.adapt(cfg.workdir), "ranking.json"), report)
        _log(rows, winner, space)
    return Result(backbone_id=bid, space_id=space, winner=winner, metric=cfg.metric,
                  table=format_table(rows), ranking=rows,
                  seconds=round(time.perf_counter() - start, 2), mlflow_run_id=mlrun.info.run_id)  # fmt: skip


def _log(rows: list[dict], winner: str, space: str) -> None:
    import mlflow

    from medray.tracking import metric_name

    for r in rows:
        for m in METRICS:
            if r.get(m) is not None:
                mlflow.log_metric(metric_name(f"{r['candidate']}.{m}"), float(r[m]))
    mlflow.set_tags({"medray.winner": winner, "medray.space_id": space})
    mlflow.log_dict({"candidates": rows, "winner": winner}, "adapt/ranking.json")
