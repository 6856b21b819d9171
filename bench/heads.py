"""Ablation: head macro-F1 with and without feature-space augmentation, at 5%, 20% and
100% of the training labels, on the synthetic set (several seeds, mean ± std).

    python bench/heads.py --workdir W [--multi-label] [--seeds 5] [--n 600]

Uses the embeddings already in W (`medray data synth` + `medray run embed`); when W has
none it makes them first (synth, then the embed stage with the bundled backbone). The
heads train in-process with the same plain functions the Ray Train loop calls
(`medray.heads.train.train_head`, `medray.feataug.augment_batch`), without Ray Train, so
the ~60 trainings take seconds rather than minutes of worker start-up. Each trains a
linear head with early stopping on the full validation split; macro-F1 is measured on
the test split (multi-label: per-label thresholds tuned on validation first).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

FRACTIONS = (0.05, 0.2, 1.0)
CONDITIONS: dict[str, dict] = {
    "none": {},
    "noise": {"noise": True},
    "interp+extrap": {"interpolate": True, "extrapolate": True},
    "mixup": {"mixup": True},
    "all": {"noise": True, "interpolate": True, "extrapolate": True, "mixup": True},
}
PARAMS = {"lr": 0.01, "weight_decay": 1e-3, "epochs": 200, "patience": 10, "batch_size": 64}


def ensure_embeddings(workdir: str, n: int, multi_label: bool) -> None:
    from medray import storage
    from medray import workdir as wd

    if storage.exists(wd.latest_embeddings(workdir)):
        return
    from medray import data, embed
    from medray.config import load_config

    if not storage.exists(wd.manifest(workdir)):
        data.synth(workdir, n=n, multi_label=multi_label, seed=0)
    embed.run(load_config(embed.Config, None, [], workdir=workdir))


def load_splits(workdir: str) -> tuple[dict, list[str], str]:
    """{split: (x, y)} targets over every label, the label names and the task kind."""
    from medray import storage
    from medray import workdir as wd
    from medray.embed import read_embeddings
    from medray.heads.data import encode_targets

    frame, x = read_embeddings(workdir)
    info = storage.read_json(wd.dataset_info(workdir))
    names, kind = info["label_names"], "multilabel" if info["multi_label"] else "multiclass"
    y, keep = encode_targets(frame["labels"].tolist(), names, kind)
    splits = {}
    for split in ("train", "val", "test"):
        rows = (frame["split"] == split).to_numpy() & keep
        splits[split] = (x[rows], y[rows])
    return splits, names, kind


def subsample(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of `fraction` of the rows, stratified by label set, at least one per set."""
    rng = np.random.default_rng(seed)
    _, group = np.unique(y, axis=0, return_inverse=True)
    keep = []
    for g in np.unique(group):
        idx = np.flatnonzero(group.reshape(-1) == g)
        keep.append(rng.choice(idx, max(1, round(len(idx) * fraction)), replace=False))
    return np.sort(np.concatenate(keep))


def one_run(splits, names, kind, fraction, aug, seed) -> float:
    import torch

    from medray.heads.data import class_weights
    from medray.heads.metrics import classification_metrics
    from medray.heads.model import build_head, decide
    from medray.heads.task import predict
    from medray.heads.thresholds import tune_thresholds
    from medray.heads.train import array_batches, train_head

    x, y = splits["train"]
    idx = subsample(y, fraction, seed)
    xt, yt = x[idx], y[idx]
    params = {**PARAMS, "kind": kind, "seed": seed, "feataug": aug,
              "class_weights": class_weights(yt, kind).tolist()}  # fmt: skip
    torch.manual_seed(seed)  # the initial weights follow the seed, not the run order
    module, _ = train_head(
        build_head("linear", x.shape[1], len(names)),
        array_batches(xt, yt, PARAMS["batch_size"], seed),
        splits["val"],
        params,
    )
    module.eval()
    thr = tune_thresholds(predict(module, splits["val"][0], kind), splits["val"][1], names)
    probs = predict(module, splits["test"][0], kind)
    pred = decide(probs, kind, np.array([thr[n] for n in names]))
    return classification_metrics(probs, pred, splits["test"][1], names, kind)["macro_f1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--n", type=int, default=600, help="synthetic images if W has no data")
    ap.add_argument("--multi-label", action="store_true")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # a head is tiny: more threads only contend (20x slower here)
    ensure_embeddings(args.workdir, args.n, args.multi_label)
    splits, names, kind = load_splits(args.workdir)
    start = time.perf_counter()
    table = {
        cond: {f: [one_run(splits, names, kind, f, aug, s) for s in range(args.seeds)]
               for f in FRACTIONS}
        for cond, aug in CONDITIONS.items()
    }  # fmt: skip
    print_table(table, kind, splits, args.seeds, time.perf_counter() - start)


def print_table(table: dict, kind: str, splits: dict, seeds: int, seconds: float) -> None:
    n_train, n_test = len(splits["train"][0]), len(splits["test"][0])
    print(f"test macro-F1, {kind}, linear head, mean ± std over {seeds} seeds "
          f"(train {n_train}, val {len(splits['val'][0])}, test {n_test}, "
          f"dim {splits['train'][0].shape[1]})")  # fmt: skip
    header = "| feature-space aug | " + " | ".join(
        f"{f:.0%} labels (n≈{max(1, round(n_train * f))})" for f in FRACTIONS
    )
    print(header + " |")
    print("|---|" + "---|" * len(FRACTIONS))
    base = {f: np.mean(table["none"][f]) for f in FRACTIONS}
    for cond, by_f in table.items():
        cells = []
        for f in FRACTIONS:
            m, s = np.mean(by_f[f]), np.std(by_f[f])
            delta = "" if cond == "none" else f" ({(m - base[f]) / max(base[f], 1e-9):+.1%})"
            cells.append(f"{m:.3f} ± {s:.3f}{delta}")
        print(f"| {cond} | " + " | ".join(cells) + " |")
    print(f"({seconds:.0f} s on {platform.machine()} CPU, in-process training, no Ray Train)")


if __name__ == "__main__":
    main()
