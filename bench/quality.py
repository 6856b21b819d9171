"""Retrieval and classification quality of every representation medray can build, on one
imported, labelled workdir, side by side (issue 11 item 1).

    python bench/quality.py --workdir W [--query-split test] [--seeds 3] [--out DIR]
                            [--fractions 0.01,0.05,0.1,0.25,1.0] [--quick]

Representations, each embedded in-process with medray.models (cached under OUT/embeddings;
the workdir's own embeddings are reused when backbone id and preprocessing match):
`bundled-avg` (the bundled ImageNet EfficientNet-Lite0 as before: avg pooling, no TTA,
64 px; the baseline), `bundled-avg@S` (the same at the data-chosen size S), `bundled-ms`
(the default: multiscale pooling, hflip TTA, data-chosen size), `byol:<run>` per BYOL
export, `random` (random weights, avg, 64 px: the floor), and the adapters of medray.adapt
fitted on train over `bundled-ms`: `+whiten`, `+projection` (proxy loss),
`+projection(supcon)`, `+projection+qe2` (alpha query expansion at search time).

Queries come from `--query-split` (default `test`, else `val`) and search the train
gallery. Every choice is made on train/val only: the pair threshold on val pairs, the
heads' early stopping on val, the adapters fitted on train (when the query split is `val`,
a stratified 20% of train stands in for val). Then a label-fraction study: linear heads'
macro-F1 with and without feature-space augmentation on `bundled-ms` and on `+projection`
(the projection refitted on the same labelled fraction).

Writes OUT/quality.csv, OUT/feataug.csv, OUT/feataug.png, OUT/report.txt (OUT defaults
to W/bench/quality) and logs them to MLflow (the workdir's store, run "bench-quality").
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

BASELINE = "bundled-avg"
RETRIEVAL = ("p@1", "p@5", "p@10", "map@10", "mmv@5", "mmv_balanced@5")
SPACE = ("pair_accuracy", "head_accuracy", "head_macro_auroc", "head_macro_f1")
METRICS = RETRIEVAL + SPACE
HEAD = {"lr": 0.01, "weight_decay": 1e-3, "epochs": 200, "patience": 10, "batch_size": 64}
"""Linear-head training, as bench/heads.py (early stopping on the tune split)."""
FEATAUG = {"interpolate": True, "extrapolate": True, "noise": True}
"""bench/heads.py: interp+extrap and noise were the settings that never lost at <= 20% of
the labels; mixup (alone or in `all`) lost 1-2% at 100%. So: those two, without mixup."""
N_PAIRS = 2000
QUICK = {"size": 64, "head_epochs": 30, "patience": 5, "proj_epochs": 5, "pairs": 300}


@dataclass
class Data:
    """Rows of the workdir, their labels, and which rows play which role."""

    frame: pd.DataFrame
    labels: np.ndarray
    names: list[str]
    kind: str
    query_split: str
    tune_from: str
    roles: dict[str, np.ndarray] = field(default_factory=dict)
    images: list | None = None


# ---------------------------------------------------------------- data and roles


def load_data(workdir: str, query_split: str | None, seed: int) -> Data:
    from medray import metrics as M
    from medray.data.manifest import read_dataset_info, read_manifest

    frame = read_manifest(workdir).reset_index(drop=True)
    info = read_dataset_info(workdir)
    labels, names = M.label_matrix(frame["labels"].tolist(), info.get("label_names"))
    split = frame["split"].astype(str).to_numpy()
    query_split = query_split or ("test" if (split == "test").any() else "val")
    if query_split == "train" or not (split == query_split).any():
        raise SystemExit(f"--query-split {query_split}: needs a non-train split with rows")
    kind = "multilabel" if info.get("multi_label") else "multiclass"
    usable = (labels.sum(1) == 1) | (kind == "multilabel")  # multi-label: "no finding" too
    train = np.flatnonzero((split == "train") & usable)
    val = np.flatnonzero((split == "val") & usable)
    roles = {"gallery": np.flatnonzero(split == "train"), "fit": train, "tune": val,
             "query": np.flatnonzero((split == query_split) & usable)}  # fmt: skip
    tune_from = "val"
    if query_split == "val" or not len(val):
        carve = stratified(labels[train], 0.2, seed)
        roles["tune"], roles["fit"] = train[carve], np.delete(train, carve)
        tune_from = "20% of train"
    return Data(frame, labels, names, kind, query_split, tune_from, roles)


def stratified(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices: `fraction` of each label set (at least one of each)."""
    rng = np.random.default_rng(seed)
    _, group = np.unique(labels, axis=0, return_inverse=True)
    group = group.reshape(-1)
    keep = [rng.choice(idx, max(1, round(len(idx) * fraction)), replace=False)
            for idx in (np.flatnonzero(group == g) for g in np.unique(group))]  # fmt: skip
    return np.sort(np.concatenate(keep))


def decoded_images(data: Data) -> list:
    """Every manifest image decoded once (kept for the next representation)."""
    if data.images is None:
        from medray import storage
        from medray.data.decode import decode_image

        data.images = [decode_image(storage.read_bytes(u), u) for u in data.frame["uri"]]
    return data.images


# ---------------------------------------------------------------- representations


def backbone_configs(workdir: str, uris: list[str], quick: bool) -> dict:
    """name -> BackboneConfig of every representation embedded from pixels."""
    from medray.config import BackboneConfig
    from medray.models import fit_input_size
    from medray.select import find_byol_exports

    fit = (lambda c: c.model_copy(update={"input_size": QUICK["size"]})) if quick else (
        lambda c: fit_input_size(c, uris))  # fmt: skip
    avg = {"pooling": "avg", "tta": "none"}
    out = {BASELINE: BackboneConfig(**avg, input_size=64)}
    size = fit(BackboneConfig()).input_size
    if size != 64:
        out[f"bundled-avg@{size}"] = BackboneConfig(**avg, input_size=size)
    out["bundled-ms"] = fit(BackboneConfig())
    for cfg in find_byol_exports(workdir):
        out[f"byol:{Path(cfg.weights).parent.name}"] = fit(cfg)
    out["random"] = BackboneConfig(weights="random", **avg, input_size=64)
    return out


def workdir_embeddings(workdir: str, spec, ids: pd.Series) -> np.ndarray | None:
    """The workdir's own embeddings of this exact spec, in `ids` order, else None."""
    from medray import storage
    from medray import workdir as wd
    from medray.embed import read_embeddings

    summary = storage.join(wd.embeddings(workdir, spec.backbone_id), "embed.json")
    if not storage.exists(summary):
        return None
    saved = storage.read_json(summary).get("backbone", {})
    keys = ("input_size", "mean", "std", "interpolation", "pooling", "levels", "tta")
    if any(np.atleast_1d(saved.get(k)).tolist() != np.atleast_1d(getattr(spec, k)).tolist()
           for k in keys):  # fmt: skip
        return None
    frame, x = read_embeddings(workdir, spec.backbone_id)
    pos = pd.Series(np.arange(len(frame)), index=frame["id"].astype(str))
    if not ids.isin(pos.index).all():
        return None
    return x[pos[ids].to_numpy()]


def embed(workdir: str, cfg, data: Data, out: Path, threads: int) -> tuple[np.ndarray, dict]:
    """(N, D) embeddings of every manifest row for `cfg`, and where they came from."""
    import torch

    from medray.models import embed_images, load_backbone

    start = time.perf_counter()
    bb = load_backbone(cfg)
    spec, ids = bb.spec, data.frame["id"].astype(str)
    cache = out / "embeddings" / f"{spec.backbone_id}-{spec.input_size}px.npz"
    info = {"dim": spec.dim, "px": spec.input_size, "backbone_id": spec.backbone_id}
    if cache.exists():
        saved = np.load(cache)
        if list(saved["ids"]) == ids.tolist():
            return saved["x"], {**info, "source": "cache", "embed_s": time.perf_counter() - start}
    x = workdir_embeddings(workdir, spec, ids)
    source = "workdir"
    if x is None:
        torch.set_num_threads(threads)
        x, source = embed_images(bb, decoded_images(data)), "embedded"
        torch.set_num_threads(1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, ids=ids.to_numpy(dtype=str), x=x)
    return x, {**info, "source": source, "embed_s": time.perf_counter() - start}


def adapt_config(workdir: str, quick: bool, loss: str = "proxy"):
    from medray import adapt

    proj = {"loss": loss, **({"epochs": QUICK["proj_epochs"]} if quick else {})}
    return adapt.Config(workdir=workdir, projection=proj)


def fit_adapter(kind: str, x: np.ndarray, data: Data, rows: np.ndarray, cfg, seed: int):
    """medray.adapt.fit_candidate on `rows`, exactly as `medray run adapt` fits it."""
    from medray.adapt import fit_candidate

    meta = {"source_backbone_id": "bench", "label_names": data.names, "seed": seed}
    return fit_candidate(kind, x[rows], data.labels[rows], data.kind == "multilabel", cfg, meta)


def adapted_spaces(workdir: str, x: np.ndarray, data: Data, quick: bool, seed: int) -> dict:
    """'+whiten', '+projection', '+projection(supcon)': (z, qe, info); '+projection+qe2'
    shares the projection's space and searches with query expansion."""
    out = {}
    for name, kind, loss in (("+whiten", "whiten", "proxy"), ("+projection", "projection", "proxy"),
                             ("+projection(supcon)", "projection", "supcon")):  # fmt: skip
        start, cfg = time.perf_counter(), adapt_config(workdir, quick, loss)
        z = fit_adapter(kind, x, data, data.roles["fit"], cfg, seed).apply(x)
        info = {"dim": z.shape[1], "source": "fitted", "fit_s": time.perf_counter() - start}
        out[name] = (z, 0, info)
    z, _, info = out["+projection"]
    out["+projection+qe2"] = (z, 2, {**info, "fit_s": 0.0, "source": "= +projection"})
    return out


# ---------------------------------------------------------------- metrics


def retrieval_metrics(z: np.ndarray, data: Data, qe: int, alpha: float = 3.0) -> dict:
    """Query split searched among the train gallery: P@K, mAP@10, mMV@5 (micro, balanced)."""
    from medray import metrics as M
    from medray.adapt.search import search_space

    q, g = data.roles["query"], data.roles["gallery"]
    lq, lg = data.labels[q], data.labels[g]
    k = min(10, len(g))
    _, rows = search_space(z[q], z[g], k, qe, alpha)
    gain, neigh = M.gains(lq, lg, rows), M.retrieved_labels(lg, rows)
    _, n_rel = M.ideal_gains(lq, lg, k)
    out = {f"p@{kk}": M.precision_at_k(gain, kk) for kk in (1, 5, 10) if kk <= k}
    out["map@10"] = M.map_at_k(gain, k, n_rel)
    out["mmv@5"] = M.mmv_at_k(lq, neigh, min(5, k))
    out["mmv_balanced@5"] = M.mmv_balanced_at_k(lq, neigh, min(5, k))
    out["prior"] = float((n_rel / len(g)).mean())
    return out


def pair_metrics(z: np.ndarray, data: Data, n_pairs: int, seed: int) -> dict:
    """Threshold chosen on tune-split pairs, accuracy on query-split pairs (disjoint images)."""
    from medray import metrics as M

    rng = np.random.default_rng(seed)

    def pairs(rows):
        i, j, same = M.sample_pairs(data.labels[rows], n_pairs, rng)
        return np.einsum("nd,nd->n", z[rows[i]], z[rows[j]]), same

    tune, query = pairs(data.roles["tune"]), pairs(data.roles["query"])
    if not (tune[1].any() and query[1].any()):  # no two images share a label: undefined
        return {"pair_accuracy": np.nan, "pair_threshold": np.nan}
    t, _ = M.choose_pair_threshold(*tune)
    return {"pair_accuracy": M.pair_accuracy(*query, t), "pair_threshold": t}


def targets(data: Data, rows: np.ndarray) -> np.ndarray:
    from medray.heads.data import encode_targets

    return encode_targets(data.frame["labels"].iloc[rows].tolist(), data.names, data.kind)[0]


def head_metrics(z: np.ndarray, data: Data, fit: np.ndarray, seed: int, aug: dict | None,
                 quick: bool) -> dict:  # fmt: skip
    """A linear head trained on `fit` rows (medray.heads.train.train_head), early stopping and
    thresholds on the tune split, scored on the query split."""
    import torch

    from medray.heads.data import class_weights
    from medray.heads.metrics import classification_metrics
    from medray.heads.model import build_head, decide
    from medray.heads.task import predict
    from medray.heads.thresholds import tune_thresholds
    from medray.heads.train import array_batches, train_head

    tune, query = data.roles["tune"], data.roles["query"]
    yf, yt, yq = targets(data, fit), targets(data, tune), targets(data, query)
    short = {"epochs": QUICK["head_epochs"], "patience": QUICK["patience"]} if quick else {}
    params = {**HEAD, **short, "kind": data.kind, "seed": seed, "feataug": aug or {},
              "class_weights": class_weights(yf, data.kind).tolist()}  # fmt: skip
    torch.manual_seed(seed)
    module, hist = train_head(build_head("linear", z.shape[1], len(data.names)),
                              array_batches(z[fit], yf, HEAD["batch_size"], seed), (z[tune], yt), params)  # fmt: skip
    module.eval()
    thr = tune_thresholds(predict(module, z[tune], data.kind), yt, data.names)
    probs = predict(module, z[query], data.kind)
    pred = decide(probs, data.kind, np.array([thr[n] for n in data.names]))
    m = classification_metrics(probs, pred, yq, data.names, data.kind)
    return {"head_accuracy": m["accuracy"], "head_macro_auroc": m["macro_auroc"],
            "head_macro_f1": m["macro_f1"], "head_epochs": len(hist)}  # fmt: skip


def score(name: str, z: np.ndarray, qe: int, info: dict, data: Data, args, cache: dict) -> dict:
    """One row of the quality table (space metrics shared by spaces with the same `z`)."""
    start = time.perf_counter()
    row = {"representation": name, **info, **retrieval_metrics(z, data, qe)}
    if id(z) not in cache:
        pairs = QUICK["pairs"] if args.quick else N_PAIRS
        cache[id(z)] = {**pair_metrics(z, data, pairs, args.seed),
                        **head_metrics(z, data, data.roles["fit"], args.seed, None, args.quick)}  # fmt: skip
    row.update(cache[id(z)], score_s=time.perf_counter() - start)
    return row


# ---------------------------------------------------------------- label-fraction study


def feataug_study(workdir: str, x: np.ndarray, data: Data, args) -> pd.DataFrame:
    """Head macro-F1 with and without FEATAUG per label fraction and seed, on bundled-ms and
    on +projection fitted on the same fraction."""
    rows = []
    cfg = adapt_config(workdir, args.quick)
    fit = data.roles["fit"]
    for fraction in args.fractions:
        for seed in range(args.seeds):
            sub = fit[stratified(data.labels[fit], fraction, seed)]
            spaces = {"bundled-ms": x}
            spaces["+projection"] = fit_adapter("projection", x, data, sub, cfg, seed).apply(x)
            for space, z in spaces.items():
                for cond, aug in (("none", None), ("feataug", FEATAUG)):
                    f1 = head_metrics(z, data, sub, seed, aug, args.quick)["head_macro_f1"]
                    rows.append({"space": space, "fraction": fraction, "n_labels": len(sub),
                                 "augmentation": cond, "seed": seed, "macro_f1": f1})  # fmt: skip
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    keys = ["space", "fraction", "augmentation"]
    agg = runs.groupby(keys, sort=False).agg(
        n_labels=("n_labels", "mean"), mean_macro_f1=("macro_f1", "mean"),
        std_macro_f1=("macro_f1", lambda v: float(np.std(v))), seeds=("seed", "count"),
    )  # fmt: skip
    return agg.reset_index()


# ---------------------------------------------------------------- output


def header(first: str, cols) -> str:
    return f"{first:<22}" + "".join(f"{c:>{max(9, len(c) + 1)}}" for c in cols)


def cells(values, cols) -> str:
    return "".join(f"{values[c]:>{max(9, len(c) + 1)}.3f}" for c in cols)


def ratio_table(table: pd.DataFrame) -> str:
    base = table.set_index("representation").loc[BASELINE]
    lines = [header(f"ratio to {BASELINE}", METRICS)]
    for _, r in table.iterrows():
        ratio = {m: r[m] / base[m] if pd.notna(r[m]) and base[m] else np.nan for m in METRICS}
        lines.append(f"{r['representation']:<22}" + cells(ratio, METRICS))
    return "\n".join(lines)


def absolute_table(table: pd.DataFrame) -> str:
    lines = [header("representation", [*METRICS, "dim", "px"])
             + "  source, embed or fit + score seconds"]  # fmt: skip
    for _, r in table.iterrows():
        px = "" if pd.isna(r.get("px")) else int(r["px"])
        secs = np.nansum([r.get("embed_s", np.nan), r.get("fit_s", np.nan)])
        lines.append(f"{r['representation']:<22}{cells(r, METRICS)}{int(r['dim']):>9}{px!s:>9}  "
                     f"{r['source']}, {secs:.0f} + {r['score_s']:.0f}")  # fmt: skip
    return "\n".join(lines)


def feataug_table(summary: pd.DataFrame) -> str:
    lines = [f"{'space':<14}{'labels':>9}{'n':>7}{'none':>17}{'feataug':>17}{'delta':>9}"]
    for (space, fraction), g in summary.groupby(["space", "fraction"], sort=False):
        r = g.set_index("augmentation")
        a, b = r.loc["none"], r.loc["feataug"]
        lines.append(
            f"{space:<14}{fraction:>9.0%}{a['n_labels']:>7.0f}"
            f"{a['mean_macro_f1']:>10.3f} ± {a['std_macro_f1']:.3f}"
            f"{b['mean_macro_f1']:>10.3f} ± {b['std_macro_f1']:.3f}"
            f"{b['mean_macro_f1'] - a['mean_macro_f1']:>+9.3f}"
        )
    return "\n".join(lines)


def plot(summary: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (space, cond), g in summary.groupby(["space", "augmentation"], sort=False):
        ax.errorbar(g["fraction"], g["mean_macro_f1"], yerr=g["std_macro_f1"], marker="o",
                    capsize=3, linestyle="-" if cond == "none" else "--", label=f"{space}, {cond}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("fraction of train labels")
    ax.set_ylabel("macro-F1 (query split)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(threads: int) -> str:
    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{platform.platform()}, {os.cpu_count()} CPUs (load average {load}), torch "
            f"{torch.__version__}, torch threads {threads} (embedding) / "
            f"{torch.get_num_threads()} (heads, adapters), BLAS threads 1")  # fmt: skip


def log_mlflow(workdir: str, args, table: pd.DataFrame, summary: pd.DataFrame, out: Path) -> str:
    import mlflow

    from medray import tracking
    from medray.config import MlflowConfig
    from medray.tracking import metric_name

    params = {k: str(v) for k, v in vars(args).items()}
    metrics = {}
    for _, r in table.iterrows():
        for m in (*METRICS, "prior"):
            if pd.notna(r.get(m)):
                metrics[metric_name(f"{r['representation']}.{m}")] = float(r[m])
    for _, r in summary.iterrows():
        name = f"feataug.{r['space']}.{r['augmentation']}.{r['fraction']:g}"
        metrics[metric_name(name)] = float(r["mean_macro_f1"])
    with tracking.stage_run(MlflowConfig(), workdir, "bench-quality", params) as run:
        mlflow.log_metrics(metrics)
        for f in ("quality.csv", "feataug.csv", "feataug.png", "report.txt"):
            mlflow.log_artifact(str(out / f), "bench-quality")
        return run.info.run_id


# ---------------------------------------------------------------- the run


def representation_rows(data: Data, args, out: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Embed (or reuse) every backbone representation, fit the adapters, score them all."""
    import torch

    torch.set_num_threads(1)  # heads and adapters are small: more threads only contend
    uris = data.frame["uri"].astype(str).tolist()
    rows, cache, default = [], {}, None
    for name, cfg in backbone_configs(args.workdir, uris, args.quick).items():
        x, info = embed(args.workdir, cfg, data, out, args.threads)
        print(f"  {name}: {info['source']} ({info['embed_s']:.0f} s)", flush=True)
        rows.append(score(name, x, 0, info, data, args, cache))
        default = x if name == "bundled-ms" else default
    adapted = adapted_spaces(args.workdir, default, data, args.quick, args.seed)
    for name, (z, qe, info) in adapted.items():
        rows.append(score(name, z, qe, info, data, args, cache))
        print(f"  {name}: fitted ({info['fit_s']:.0f} s)", flush=True)
    table = pd.DataFrame(rows)
    missing = [m for m in (*METRICS, "fit_s") if m not in table]  # p@10: a gallery under 10
    return table.assign(**dict.fromkeys(missing, np.nan)), default


def report_text(head: str, table: pd.DataFrame, summary: pd.DataFrame, args, times) -> str:
    """The printed report: ratios first, then absolute numbers, the feataug table, the machine."""
    t_rep, t_all = times
    prior = f"class prior (expected P@K of a random ranking): {table['prior'].iloc[0]:.3f}"
    study = (f"label-fraction study: linear-head macro-F1 on the query split, mean ± std over "
             f"{args.seeds} seed(s); feataug = {FEATAUG}")  # fmt: skip
    timing = (f"wall time: {t_all:.0f} s ({t_rep:.0f} s representations, "
              f"{t_all - t_rep:.0f} s label-fraction study)")  # fmt: skip
    parts = [head, ratio_table(table), absolute_table(table) + "\n" + prior,
             study + "\n" + feataug_table(summary), f"machine: {machine(args.threads)}\n{timing}"]  # fmt: skip
    return "\n\n".join(parts)


def write_outputs(out: Path, table: pd.DataFrame, summary: pd.DataFrame, title: str) -> None:
    table["px"] = table["px"].astype("Int64")
    table.to_csv(out / "quality.csv", index=False)
    summary.to_csv(out / "feataug.csv", index=False)
    plot(summary, out / "feataug.png", title)


def run(args: argparse.Namespace) -> dict:
    """Everything: the representation table, the label-fraction study, files, MLflow."""
    start = time.perf_counter()
    out = Path(args.out or Path(args.workdir) / "bench" / "quality")
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.workdir, args.query_split, args.seed)
    n = {k: len(v) for k, v in data.roles.items()}
    head = (f"queries: split '{data.query_split}' ({n['query']} rows) against the train gallery "
            f"({n['gallery']}); choices on {data.tune_from} ({n['tune']} rows); heads/adapters fit "
            f"on {n['fit']} train rows; {data.kind}, {len(data.names)} labels"
            + (" [--quick]" if args.quick else ""))  # fmt: skip
    print(head + "\n", flush=True)
    table, default = representation_rows(data, args, out)
    t_rep = time.perf_counter() - start
    summary = summarise(feataug_study(args.workdir, default, data, args))
    t_all = time.perf_counter() - start
    report = report_text(head, table, summary, args, (t_rep, t_all))
    table.insert(1, "query_split", data.query_split)
    write_outputs(out, table, summary, f"{Path(args.workdir).name}: macro-F1 vs labels "
                                       f"(queries: {data.query_split})")  # fmt: skip
    (out / "report.txt").write_text(report + "\n")
    print(report.split("\n\n", 1)[1], flush=True)
    run_id = None if args.no_mlflow else log_mlflow(args.workdir, args, table, summary, out)
    return {"table": table, "feataug": summary, "out": out, "mlflow_run_id": run_id,
            "seconds": t_all}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="an imported, labelled workdir")
    ap.add_argument("--query-split", default=None, help="default: test if present, else val")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the label-fraction study")
    ap.add_argument("--out", default=None, help="default: W/bench/quality")
    ap.add_argument("--fractions", default="0.01,0.05,0.1,0.25,1.0",
                    type=lambda s: [float(v) for v in s.split(",")])  # fmt: skip
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="embedding threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny settings (64 px, short training)")
    ap.add_argument("--no-mlflow", action="store_true", help="skip the MLflow run")
    return ap.parse_args(argv)


def main() -> None:
    from threadpoolctl import threadpool_limits

    # numpy's OpenBLAS on 2 threads ran a 1752-d eigh 6-15x slower than on 1 on a shared
    # 2-core box (spinning threads); torch's own threads (embedding) are set separately.
    with threadpool_limits(1, user_api="blas"):
        run(parse_args())


if __name__ == "__main__":
    main()
