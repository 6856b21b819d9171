"""`medray run select`: choose the backbone by a proxy classification task.

Each candidate backbone (the bundled EfficientNet-Lite0; the same net and a ResNet-18 with
random weights, as floors a useful backbone must beat, ranked but never chosen by default;
every BYOL export under pretrain/*/export; any timm model with weights the config lists)
embeds one labelled proxy subset of the manifest's train and val rows (never test: the
choice must not see the rows it is reported on), and fast probes score the embeddings:
kNN accuracy (cosine, k neighbours) and logistic-regression macro-F1, both by stratified
k-fold cross-validation. The ranking goes to select/ranking.json + ranking.csv and MLflow;
the winner to select/chosen.json (`{"backbone": <BackboneConfig>, "backbone_id", "score",
"metric", "mlflow_run_id"}`, also `winner` in ranking.json, which adds the proxy's splits
and the manifest hash), which `medray run embed` uses unless its config pins a backbone.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from medray import storage, tracking
from medray import workdir as wd
from medray.config import BackboneConfig, StageConfig
from medray.models import fit_input_size

METRICS = ("logreg_macro_f1", "knn_accuracy")
PROXY_SPLITS = ("train", "val")
"""Manifest splits the proxy sample is drawn from; test rows never take part in the choice."""


def _default_candidates() -> list[BackboneConfig]:
    return [
        BackboneConfig(name="efficientnet_lite0", weights="bundled"),
        BackboneConfig(name="efficientnet_lite0", weights="random"),
        BackboneConfig(name="resnet18", weights="random"),
    ]


class Config(StageConfig):
    """Proxy task: candidates, subset size and the probe that ranks them."""

    candidates: list[BackboneConfig] = Field(default_factory=_default_candidates)
    """Backbones to compare (timm name + weights: bundled, random, pretrained, or a path)."""
    byol_exports: bool = True
    """Also try every BYOL export found under <workdir>/pretrain/*/export."""
    proxy_size: int = Field(240, ge=10)
    """Labelled manifest images embedded per candidate (stratified sample of train + val)."""
    random_can_win: bool = False
    """False: `weights: random` candidates are ranked as floors but never chosen (on a tiny
    proxy set random convolutions can out-score real weights by chance)."""
    metric: Literal["logreg_macro_f1", "knn_accuracy"] = "logreg_macro_f1"
    """Probe score that ranks the candidates (both are computed and shown)."""
    knn_k: int = Field(5, ge=1)
    """Neighbours of the kNN probe."""
    folds: int = Field(3, ge=2)
    """Cross-validation folds of both probes."""
    batch_size: int = Field(32, ge=1)
    """Images per forward pass."""


class Result(BaseModel):
    metric: str
    table: str
    """The ranking as text, one candidate a line, best first."""
    ranking: list[dict[str, Any]]
    """Best first: rank, candidate, backbone_id, logreg_macro_f1, knn_accuracy, seconds, error."""
    winner: dict[str, Any]
    chosen: str
    proxy_images: int
    mlflow_run_id: str


# ---------------------------------------------------------------- probes (plain functions)


def probe_scores(
    emb: np.ndarray, y: np.ndarray, multi_label: bool, k: int, folds: int, seed: int
) -> dict[str, float]:
    """Cross-validated kNN accuracy (cosine) and logistic-regression macro-F1 of `emb`.

    `y` is (N,) class indices, or (N, L) 0/1 for multi-label (kNN accuracy is then exact
    match, logistic regression one-vs-rest)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import KFold, StratifiedKFold
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    if multi_label:
        splitter = KFold(folds, shuffle=True, random_state=seed).split(emb)
    else:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed).split(emb, y)
    knn, f1 = [], []
    for tr, te in splitter:
        nn_k = min(k, len(tr))
        knn_model = KNeighborsClassifier(nn_k, metric="cosine").fit(emb[tr], y[tr])
        knn.append(accuracy_score(y[te], knn_model.predict(emb[te])))
        scaler = StandardScaler().fit(emb[tr])
        lr = LogisticRegression(max_iter=2000, C=1.0)
        clf = OneVsRestClassifier(lr) if multi_label else lr
        with warnings.catch_warnings():  # one-vs-rest warns on a label constant in a fold
            warnings.simplefilter("ignore", UserWarning)
            clf.fit(scaler.transform(emb[tr]), y[tr])
        f1.append(f1_score(y[te], clf.predict(scaler.transform(emb[te])), average="macro",
                           zero_division=0))  # fmt: skip
    return {"knn_accuracy": float(np.mean(knn)), "logreg_macro_f1": float(np.mean(f1))}


def proxy_subset(
    manifest: pd.DataFrame, size: int, multi_label: bool, seed: int
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """A stratified sample of labelled train/val rows (`PROXY_SPLITS`, never test) and its
    targets (indices, or multi-hot)."""
    rows = manifest[manifest["split"].isin(PROXY_SPLITS)]
    rows = rows if multi_label else rows[rows["labels"].map(len) == 1]
    names = sorted({lab for labs in rows["labels"] for lab in labs})
    if len(rows) < 10 or len(names) < 2:
        raise ValueError(
            f"select: the manifest's train and val splits need >= 10 labelled images of >= 2 "
            f"labels for the proxy task, found {len(rows)} of {len(names)}"
        )
    key = rows["labels"].map(lambda labs: labs[0] if len(labs) else "")
    frac = min(1.0, size / len(rows))
    sample = (
        rows.groupby(key, group_keys=False)
        .apply(lambda g: g.sample(max(1, round(len(g) * frac)), random_state=seed))
        .head(size)
        .reset_index(drop=True)
    )
    if multi_label:
        y = np.array([[lab in labs for lab in names] for labs in sample["labels"]], dtype=int)
    else:
        y = sample["labels"].map(lambda labs: names.index(labs[0])).to_numpy()
    return sample, y, names


# ---------------------------------------------------------------- candidates and images


def find_byol_exports(workdir: str) -> list[BackboneConfig]:
    """A candidate per pretrain/<name>/export that holds backbone.json."""
    out = []
    for run_dir in storage.listdir(wd.pretrain(workdir)):
        export = storage.join(run_dir, "export")
        spec_uri = storage.join(export, "backbone.json")
        if storage.exists(spec_uri):
            name = storage.read_json(spec_uri).get("name", "efficientnet_lite0")
            out.append(BackboneConfig(name=name, weights=export))
    return out


def candidate_label(cfg: BackboneConfig) -> str:
    weights = cfg.weights
    if weights not in ("bundled", "random", "pretrained"):
        weights = "/".join(weights.rstrip("/").split("/")[-3:])
    floor = ", floor" if cfg.weights == "random" else ""  # ranked, never chosen by default
    return f"{cfg.name} ({weights}{floor})"


def decode_all(uris: list[str]) -> list[np.ndarray]:
    from medray.data.decode import read_image

    return [read_image(u) for u in uris]


def score_candidate(cand: BackboneConfig, images, y, multi_label: bool, cfg: Config) -> dict:
    """Embed the proxy images with one candidate and probe them; errors become a row."""
    from medray.models import embed_images, load_backbone

    row: dict[str, Any] = {"candidate": candidate_label(cand), "backbone": cand.model_dump()}
    start = time.perf_counter()
    try:
        backbone = load_backbone(cand, seed=cfg.seed, device=_device())
        emb = embed_images(backbone, images, batch_size=cfg.batch_size)
        row["backbone_id"] = backbone.spec.backbone_id
        row.update(probe_scores(emb, y, multi_label, cfg.knn_k, cfg.folds, cfg.seed))
    except Exception as exc:  # one broken candidate must not sink the comparison
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def rank(rows: list[dict], metric: str) -> list[dict]:
    """Best first by `metric`, failed candidates last; adds `rank`."""
    ordered = sorted(rows, key=lambda r: (r.get(metric) is None, -(r.get(metric) or 0.0)))
    return [{"rank": i + 1, **r} for i, r in enumerate(ordered)]


def pick_winner(rows: list[dict], metric: str, random_can_win: bool) -> dict:
    """The best-ranked scored candidate, skipping random-init floors unless allowed."""
    scored = [r for r in rows if r.get(metric) is not None]
    eligible = [r for r in scored if random_can_win or r["backbone"]["weights"] != "random"]
    if not eligible:
        errors = [r.get("error") for r in rows]
        raise RuntimeError(
            f"select: no candidate can win (failed or random-init floors only): {errors}"
        )
    return eligible[0]


# ---------------------------------------------------------------- the stage


def run(config: Config) -> Result:
    """Rank the candidates on the proxy task; write select/ and one MLflow run."""
    cfg = config
    manifest = storage.read_table(wd.manifest(cfg.workdir)).to_pandas()
    manifest["labels"] = manifest["labels"].map(lambda v: [] if v is None else list(v))
    info_uri = wd.dataset_info(cfg.workdir)
    info = storage.read_json(info_uri) if storage.exists(info_uri) else {}
    seen = manifest[manifest["split"].isin(PROXY_SPLITS)]
    multi = bool(info.get("multi_label", seen["labels"].map(len).gt(1).any()))
    sample, y, _ = proxy_subset(manifest, cfg.proxy_size, multi, cfg.seed)
    images = decode_all(sample["uri"].tolist())
    candidates = list(cfg.candidates)
    if cfg.byol_exports:
        candidates += [c for c in find_byol_exports(cfg.workdir) if c not in candidates]
    # every candidate is scored at the resolution embed would use for these images
    candidates = [fit_input_size(c, sample["uri"].tolist()) for c in candidates]
    params = cfg.model_dump(exclude={"workdir", "mlflow", "ray"})
    with tracking.stage_run(cfg.mlflow, cfg.workdir, "select", params) as mlrun:
        rows = rank([score_candidate(c, images, y, multi, cfg) for c in candidates], cfg.metric)
        best = pick_winner(rows, cfg.metric, cfg.random_can_win)
        winner = {k: best[k] for k in ("backbone", "backbone_id")}
        winner.update(score=best[cfg.metric], metric=cfg.metric, mlflow_run_id=mlrun.info.run_id)
        lineage = {
            "proxy_splits": {s: int((sample["split"] == s).sum()) for s in PROXY_SPLITS},
            "manifest_sha256": info.get("manifest_sha256"),
            "mlflow_run_id": mlrun.info.run_id,
        }
        chosen = write_outputs(cfg.workdir, rows, winner, len(sample), lineage)
        _log(rows, winner, len(sample))
    return Result(metric=cfg.metric, table=format_table(rows), ranking=[_brief(r) for r in rows],
                  winner=winner,
                  chosen=chosen, proxy_images=len(sample), mlflow_run_id=mlrun.info.run_id)  # fmt: skip


def format_table(rows: list[dict]) -> str:
    """`rank candidate logreg_macro_f1 knn_accuracy seconds` lines (errors shown in place)."""
    lines = [f"{'#':>2} {'candidate':<44} {'logreg_F1':>9} {'kNN_acc':>8} {'s':>6}"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['rank']:>2} {r['candidate']:<44} failed: {r['error'][:60]}")
            continue
        lines.append(
            f"{r['rank']:>2} {r['candidate']:<44} {r['logreg_macro_f1']:>9.3f} "
            f"{r['knn_accuracy']:>8.3f} {r['seconds']:>6.1f}"
        )
    return "\n".join(lines)


def _brief(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "backbone"}


def write_outputs(
    workdir: str, rows: list[dict], winner: dict, n: int, lineage: dict | None = None
) -> str:
    """ranking.csv, ranking.json (with `lineage`: proxy images per split, manifest_sha256,
    mlflow_run_id) and chosen.json (the winner, which carries its mlflow_run_id)."""
    out = wd.select(workdir)
    table = pd.DataFrame([_brief(r) for r in rows])
    storage.write_text(storage.join(out, "ranking.csv"), table.to_csv(index=False))
    head = {"metric": winner["metric"], "proxy_images": n, **(lineage or {})}
    storage.write_json(
        storage.join(out, "ranking.json"), {**head, "candidates": rows, "winner": winner}
    )
    chosen = storage.join(out, "chosen.json")
    storage.write_json(chosen, winner)
    return chosen


def _log(rows: list[dict], winner: dict, n: int) -> None:
    import mlflow

    from medray.tracking import metric_name

    for r in rows:
        for m in METRICS:
            if r.get(m) is not None:
                mlflow.log_metric(metric_name(f"{r['candidate']}.{m}"), r[m])
    mlflow.log_metric("proxy_images", n)
    mlflow.set_tags({"medray.winner": winner["backbone_id"], "medray.metric": winner["metric"]})
    mlflow.log_dict({"candidates": rows, "winner": winner}, "select/ranking.json")
    mlflow.log_text(pd.DataFrame([_brief(r) for r in rows]).to_csv(index=False),
                    "select/ranking.csv")  # fmt: skip


def _device() -> str | None:
    import torch

    return "cuda" if torch.cuda.is_available() else None
