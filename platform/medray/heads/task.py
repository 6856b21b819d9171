"""One task end to end: targets, concurrent Ray Train trials, the best head, its metrics."""

from __future__ import annotations

import itertools
import re
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


def held_out(frame: pd.DataFrame, split: str, names: list[str], kind: str):
    rows = (frame["split"] == split).to_numpy()
    y, keep = hd.encode_targets(frame["labels"][rows].tolist(), names, kind)
    return frame.attrs["x"][rows][keep], y[keep]


def train_task(cfg, task: hd.TaskConfig, ctx: dict[str, Any]) -> dict[str, Any]:
    """Train every setting of the grid for `task` concurrently on Ray Train, keep the best
    on validation, write heads/<task>/, return a summary (the MLflow logging is the caller's)."""
    labels = hd.attach_column(ctx["labels"], cfg.workdir, task)
    names, kind = hd.resolve_task(task, labels, ctx["info"])
    evals = ctx["evals"].copy()
    evals["labels"] = hd.attach_column(evals, cfg.workdir, task)["labels"]
    evals.attrs["x"] = ctx["evals"].attrs["x"]
    train_rows = labels[labels["split"] == "train"]
    y_train, keep = hd.encode_targets(train_rows["labels"].tolist(), names, kind)
    y_train = y_train[keep]
    xv, yv = held_out(evals, "val", names, kind)
    xt, yt = held_out(evals, "test", names, kind)
    if len(y_train) == 0 or len(yv) == 0:
        raise hd.TaskError(
            f"task {task.name!r}: needs train and val rows with its labels "
            f"(train {len(y_train)}, val {len(yv)})"
        )
    column_values = None
    if task.column != "labels":
        column_values = dict(zip(labels["id"], labels["labels"], strict=True))
    import ray

    train = hd.split_dataset(ctx["paths"], "train", names, kind, column_values).materialize()
    val_ref = ray.put((xv, yv))
    base = {
        "kind": kind,
        "in_dim": int(xv.shape[1]),
        "out_dim": len(names),
        "hidden": cfg.hidden,
        "dropout": cfg.dropout,
        "epochs": cfg.epochs,
        "patience": cfg.patience,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "feataug": cfg.feataug.model_dump(),
        "class_weights": hd.class_weights(y_train, kind).tolist() if cfg.class_weights else None,
    }
    grid = [{**base, **g} for g in trial_grid(cfg)]

    def one(i_params):
        i, params = i_params
        return fit_trial(
            f"{task.name}-{i}", train, val_ref, params, ctx["num_workers"], cfg.cpus_per_trial,
            ctx["use_gpu"],
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=max(1, cfg.max_concurrent)) as pool:
        outs = list(pool.map(one, enumerate(grid)))
    trials = []
    for params, out in zip(grid, outs, strict=True):
        module, thr, val_metrics = score_state(out["state"], params, xv, yv, names)
        best_val = min(h["val_loss"] for h in out["history"])
        trials.append((val_metrics["macro_f1"], -best_val, params, module, thr, out["history"]))
    trials.sort(key=lambda t: (t[0], t[1]), reverse=True)
    _, _, params, module, thresholds, history = trials[0]
    x_eval, y_eval, eval_split = (xt, yt, "test") if len(yt) else (xv, yv, "val")
    probs = predict(module, x_eval, kind)
    pred = decide(probs, kind, np.array([thresholds[n] for n in names]))
    metrics = classification_metrics(probs, pred, y_eval, names, kind)
    head_dir = wd.heads(cfg.workdir, task.name)
    meta = {
        "task": task.name,
        "kind": kind,
        "column": task.column,
        "label_names": names,
        "thresholds": thresholds,
        "arch": arch_dict(params["arch"], params["in_dim"], len(names), cfg.hidden, cfg.dropout),
        "backbone_id": ctx["backbone_id"],
        "metrics": {eval_split: metrics, "val_macro_f1": trials[0][0]},
        "training": {
            "lr": params["lr"],
            "weight_decay": params["weight_decay"],
            "epochs_run": len(history),
            "feataug": params["feataug"],
            "class_weights": params["class_weights"],
            "n_train": int(len(y_train)),
            "n_val": int(len(yv)),
            "n_test": int(len(yt)),
        },
    }
    save_head(head_dir, module, meta)
    png = confusion_png(pred, y_eval, names, kind)
    storage.write_bytes(storage.join(head_dir, "confusion.png"), png)
    table = [
        {"arch": p["arch"], "lr": p["lr"], "weight_decay": p["weight_decay"], "val_macro_f1": f,
         "best_val_loss": -vl, "epochs_run": len(h)}
        for f, vl, p, _, _, h in trials
    ]  # fmt: skip
    storage.write_json(storage.join(head_dir, "trials.json"), table)
    return {"meta": meta, "trials": table, "png": png, "head_dir": head_dir, "split": eval_split}


def metric_name(text: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)
