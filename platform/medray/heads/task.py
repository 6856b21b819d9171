"""One task end to end: targets, concurrent Ray Train trials, the best head, its metrics."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch

from medray import storage
from medray import workdir as wd
from medray.heads import data as hd
from medray.heads.metrics import classification_metrics, confusion_png
from medray.heads.model import arch_dict, decide, probabilities, save_head
from medray.heads.thresholds import tune_thresholds
from medray.heads.train import fit_trial, new_module


def trial_grid(cfg) -> list[dict[str, Any]]:
    """Every (arch, lr, weight_decay) combination of the search config."""
    s = cfg.search
    return [
        {"arch": a, "lr": lr, "weight_decay": w}
        for a, lr, w in itertools.product(s.arch, s.lr, s.weight_decay)
    ]


def score_state(state: dict, params: dict, x: np.ndarray, y: np.ndarray, names: list[str]):
    """Rebuild a trial's head, tune thresholds on (x, y), return (module, thresholds, metrics)."""
    module = new_module(params)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    module.eval()
    probs = predict(module, x, params["kind"])
    thresholds = tune_thresholds(probs, y, names)
    pred = decide(probs, params["kind"], np.array([thresholds[n] for n in names]))
    return module, thresholds, classification_metrics(probs, pred, y, names, params["kind"])


def predict(module, x: np.ndarray, kind: str) -> np.ndarray:
    with torch.no_grad():
        return probabilities(module(torch.as_tensor(x, dtype=torch.float32)), kind).numpy()


def held_out(frame: pd.DataFrame, split: str, names: list[str], kind: str, unknown=None):
    """(x, y) of one held-out split; `unknown` ({id: [labels]}) marks cells UNKNOWN (-1)."""
    rows = (frame["split"] == split).to_numpy()
    unsure = [unknown.get(i, []) for i in frame["id"][rows]] if unknown else None
    y, keep = hd.encode_targets(frame["labels"][rows].tolist(), names, kind, unsure)
    return frame.attrs["x"][rows][keep], y[keep]


def task_data(cfg, task: hd.TaskConfig, ctx: dict[str, Any]) -> dict[str, Any]:
    """Label names, kind, train targets (for weights) and the val/test arrays of a task.
    Labels the manifest lists as uncertain (`--uncertain ignore`) are UNKNOWN (-1) cells in
    every split: masked out of the loss, class weights, thresholds and metrics."""
    labels = hd.attach_column(ctx["labels"], cfg.workdir, task)
    names, kind = hd.resolve_task(task, labels, ctx["info"])
    unknown = hd.unknown_labels(cfg.workdir, task)
    evals = ctx["evals"].copy()
    evals["labels"] = hd.attach_column(evals, cfg.workdir, task)["labels"]
    evals.attrs["x"] = ctx["evals"].attrs["x"]
    train_rows = labels[labels["split"] == "train"]
    unsure = [unknown.get(i, []) for i in train_rows["id"]] if unknown else None
    y_train, keep = hd.encode_targets(train_rows["labels"].tolist(), names, kind, unsure)
    out = {"names": names, "kind": kind, "y_train": y_train[keep],
           "val": held_out(evals, "val", names, kind, unknown),
           "test": held_out(evals, "test", names, kind, unknown),
           "column_values": None, "unknown_values": unknown or None}  # fmt: skip
    if len(out["y_train"]) == 0 or len(out["val"][1]) == 0:
        raise hd.TaskError(
            f"task {task.name!r}: needs train and val rows with its labels "
            f"(train {len(out['y_train'])}, val {len(out['val'][1])})"
        )
    if task.column != "labels":
        out["column_values"] = dict(zip(labels["id"], labels["labels"], strict=True))
    return out


def trial_params(cfg, d: dict[str, Any]) -> list[dict[str, Any]]:
    """One params dict per grid setting (what the Ray Train loop receives)."""
    weights = hd.class_weights(d["y_train"], d["kind"]).tolist() if cfg.class_weights else None
    base = {"kind": d["kind"], "in_dim": int(d["val"][0].shape[1]), "out_dim": len(d["names"]),
            "hidden": cfg.hidden, "dropout": cfg.dropout, "epochs": cfg.epochs,
            "patience": cfg.patience, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "feataug": cfg.feataug.model_dump(), "class_weights": weights,
            "storage_root": cfg.workdir}  # fmt: skip
    return [{**base, **g} for g in trial_grid(cfg)]


def run_trials(cfg, task, d: dict[str, Any], grid: list[dict], ctx: dict[str, Any]) -> list:
    """Every setting as its own TorchTrainer.fit(), `max_concurrent` at a time."""
    import ray

    ds = hd.split_dataset(ctx["paths"], "train", d["names"], d["kind"], d["column_values"],
                          d.get("unknown_values"))  # fmt: skip
    train = ds.materialize()  # read once, shared by every trial
    val_ref = ray.put(d["val"])

    def one(item):
        i, params = item
        return fit_trial(f"{task.name}-{i}", train, val_ref, params, ctx["num_workers"],
                         cfg.cpus_per_trial, ctx["use_gpu"])  # fmt: skip

    with ThreadPoolExecutor(max_workers=max(1, cfg.max_concurrent)) as pool:
        return list(pool.map(one, enumerate(grid)))


def rank_trials(grid: list[dict], outs: list[dict], d: dict[str, Any]) -> list[dict]:
    """Score each trial on val (thresholds tuned first); best macro-F1 first, then val loss."""
    trials = []
    for params, out in zip(grid, outs, strict=True):
        module, thr, metrics = score_state(out["state"], params, *d["val"], d["names"])
        trials.append({"params": params, "module": module, "thresholds": thr,
                       "val_macro_f1": metrics["macro_f1"], "epochs_run": len(out["history"]),
                       "best_val_loss": min(h["val_loss"] for h in out["history"])})  # fmt: skip
    return sorted(trials, key=lambda t: (-t["val_macro_f1"], t["best_val_loss"]))


def train_task(cfg, task: hd.TaskConfig, ctx: dict[str, Any]) -> dict[str, Any]:
    """Train every setting of the grid for `task` concurrently on Ray Train, keep the best
    on validation, write heads/<task>/, return a summary (the MLflow logging is the caller's)."""
    d = task_data(cfg, task, ctx)
    grid = trial_params(cfg, d)
    trials = rank_trials(grid, run_trials(cfg, task, d, grid, ctx), d)
    best, names, kind = trials[0], d["names"], d["kind"]
    (x_eval, y_eval), split = (d["test"], "test") if len(d["test"][1]) else (d["val"], "val")
    probs = predict(best["module"], x_eval, kind)
    pred = decide(probs, kind, np.array([best["thresholds"][n] for n in names]))
    params = best["params"]
    meta = {
        "task": task.name, "kind": kind, "column": task.column, "label_names": names,
        "thresholds": best["thresholds"],
        "arch": arch_dict(params["arch"], params["in_dim"], len(names), cfg.hidden, cfg.dropout),
        "backbone_id": ctx["backbone_id"],
        "metrics": {split: classification_metrics(probs, pred, y_eval, names, kind),
                    "val_macro_f1": best["val_macro_f1"]},
        "training": {k: params[k] for k in ("lr", "weight_decay", "feataug", "class_weights")}
        | {"epochs_run": best["epochs_run"], "n_train": int(len(d["y_train"])),
           "n_val": int(len(d["val"][1])), "n_test": int(len(d["test"][1])),
           "n_unknown_train": int((d["y_train"] < 0).sum())},
    }  # fmt: skip
    head_dir = wd.heads(cfg.workdir, task.name)
    save_head(head_dir, best["module"], meta)
    png = confusion_png(pred, y_eval, names, kind)
    storage.write_bytes(storage.join(head_dir, "confusion.png"), png)
    keys = ("val_macro_f1", "best_val_loss", "epochs_run")
    table = [{"arch": t["params"]["arch"], "lr": t["params"]["lr"],
              "weight_decay": t["params"]["weight_decay"], **{k: t[k] for k in keys}}
             for t in trials]  # fmt: skip
    storage.write_json(storage.join(head_dir, "trials.json"), table)
    return {"meta": meta, "trials": table, "png": png, "head_dir": head_dir, "split": split}
