"""One task end to end: targets, the Ray Tune sweep of Ray Train trials, the best head, its
metrics. The driver holds labels and small results; embeddings stay in Ray workers."""

from __future__ import annotations

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
from medray.heads.train import new_module


def module_from_state(state: dict, params: dict):
    """A trial's head rebuilt from its (numpy) state dict, in eval mode."""
    module = new_module(params)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return module.eval()


def score_state(state: dict, params: dict, x: np.ndarray, y: np.ndarray, names: list[str]):
    """Tune a trial's thresholds on (x, y); (thresholds, metrics at them)."""
    probs = predict(module_from_state(state, params), x, params["kind"])
    thresholds = tune_thresholds(probs, y, names)
    pred = decide(probs, params["kind"], np.array([thresholds[n] for n in names]))
    return thresholds, classification_metrics(probs, pred, y, names, params["kind"])


def predict(module, x: np.ndarray, kind: str) -> np.ndarray:
    if not x.flags.writeable:  # an object-store array: torch warns on read-only memory
        x = x.copy()
    with torch.no_grad():
        return probabilities(module(torch.as_tensor(x, dtype=torch.float32)), kind).numpy()


def held_out(frame: pd.DataFrame, split: str, names: list[str], kind: str, unknown=None):
    """(x, y) of one held-out split; `unknown` ({id: [labels]}) marks cells UNKNOWN (-1)."""
    rows = (frame["split"] == split).to_numpy()
    unsure = [unknown.get(i, []) for i in frame["id"][rows]] if unknown else None
    y, keep = hd.encode_targets(frame["labels"][rows].tolist(), names, kind, unsure)
    return frame.attrs["x"][rows][keep], y[keep]


def held_out_arrays(workdir: str, paths: list[str], task, names, kind, unknown):
    """Ray task: the val and test (x, y) of a task, and their sizes. Returned as three
    objects, so the driver reads only the sizes and hands the arrays on by reference."""
    frame = hd.read_rows(paths, ["val", "test"], with_embedding=True)
    x = frame.attrs["x"]
    frame = hd.attach_column(frame, workdir, task)
    frame.attrs["x"] = x
    val, test = (held_out(frame, s, names, kind, unknown) for s in ("val", "test"))
    return val, test, {"val": len(val[1]), "test": len(test[1]), "dim": int(x.shape[1])}


def task_data(cfg, task: hd.TaskConfig, ctx: dict[str, Any]) -> dict[str, Any]:
    """Label names, kind, train targets (for weights) and object refs of the val/test arrays
    (read by a Ray task: the driver holds labels, never embeddings). Labels the manifest
    lists as uncertain (`--uncertain ignore`) are UNKNOWN (-1) cells in every split: masked
    out of the loss, class weights, thresholds and metrics."""
    import ray

    labels = hd.attach_column(ctx["labels"], cfg.workdir, task)
    names, kind = hd.resolve_task(task, labels, ctx["info"])
    unknown = hd.unknown_labels(cfg.workdir, task)
    train_rows = labels[labels["split"] == "train"]
    unsure = [unknown.get(i, []) for i in train_rows["id"]] if unknown else None
    y_train, keep = hd.encode_targets(train_rows["labels"].tolist(), names, kind, unsure)
    read = ray.remote(num_cpus=cfg.ray.cpus_per_worker)(held_out_arrays).options(num_returns=3)
    val_ref, test_ref, sizes = read.remote(cfg.workdir, ctx["paths"], task, names, kind, unknown)
    sizes = ray.get(sizes)
    out = {"names": names, "kind": kind, "y_train": y_train[keep], "val_ref": val_ref,
           "test_ref": test_ref, "sizes": sizes, "column_values": None,
           "unknown_values": unknown or None}  # fmt: skip
    if len(out["y_train"]) == 0 or sizes["val"] == 0:
        raise hd.TaskError(
            f"task {task.name!r}: needs train and val rows with its labels "
            f"(train {len(out['y_train'])}, val {sizes['val']})"
        )
    if task.column != "labels":
        out["column_values"] = dict(zip(labels["id"], labels["labels"], strict=True))
    return out


def base_params(cfg, d: dict[str, Any]) -> dict[str, Any]:
    """What every trial's training loop receives besides its grid setting."""
    weights = hd.class_weights(d["y_train"], d["kind"]).tolist() if cfg.class_weights else None
    return {"kind": d["kind"], "in_dim": d["sizes"]["dim"], "out_dim": len(d["names"]),
            "hidden": cfg.hidden, "dropout": cfg.dropout, "epochs": cfg.epochs,
            "patience": cfg.patience, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "feataug": cfg.feataug.model_dump(), "class_weights": weights}  # fmt: skip


def sweep_trials(cfg, task, d: dict[str, Any], ctx: dict[str, Any]) -> list[dict]:
    """Every setting of the search grid as a Ray Tune trial (medray.heads.sweep)."""
    from medray.heads.sweep import run_sweep

    ds = hd.split_dataset(ctx["paths"], "train", d["names"], d["kind"], d["column_values"],
                          d.get("unknown_values"))  # fmt: skip
    gpus = cfg.gpus_per_trial if ctx["use_gpu"] else 0.0
    setup = {"name": task.name, "train": ds.materialize(),  # read once, shared by every trial
             "val_ref": d["val_ref"], "base": base_params(cfg, d), "names": d["names"],
             "num_workers": ctx["num_workers"], "cpus": cfg.cpus_per_trial, "gpus": gpus,
             "asha": cfg.asha.enabled}  # fmt: skip
    s = cfg.search
    search = {"arch": list(s.arch), "lr": list(s.lr), "weight_decay": list(s.weight_decay)}
    return run_sweep(cfg, task.name, search, setup)


def rank_trials(outs: list[dict]) -> list[dict]:
    """Finished trials first, best val macro-F1 (thresholds tuned on val) first, then the
    lower val loss; trials ASHA stopped or that failed follow, in their order."""
    done = [t for t in outs if t["status"] == "finished"]
    rest = [t for t in outs if t["status"] != "finished"]
    return sorted(done, key=lambda t: (-t["val_macro_f1"], t["best_val_loss"])) + rest


def split_outcome(state: dict, params: dict, thresholds: dict, data, names: list[str]):
    """Ray task: the best head's probabilities and decisions on a held-out split, and its
    targets (small: N x labels), so the driver never loads the split's embeddings."""
    x, y = data
    probs = predict(module_from_state(state, params), x, params["kind"])
    return probs, decide(probs, params["kind"], np.array([thresholds[n] for n in names])), y


def train_task(cfg, task: hd.TaskConfig, ctx: dict[str, Any]) -> dict[str, Any]:
    """Sweep the grid for `task` on Ray Tune, keep the best on validation, measure it on
    test (val when there is none), write heads/<task>/, return a summary (the MLflow logging
    is the caller's)."""
    import ray

    d = task_data(cfg, task, ctx)
    trials = rank_trials(sweep_trials(cfg, task, d, ctx))
    if trials[0]["status"] != "finished":
        errors = "; ".join(sorted({t["error"] for t in trials if t["error"]})) or "none finished"
        raise hd.TaskError(f"task {task.name!r}: every head trial failed: {errors}")
    best, names, kind = trials[0], d["names"], d["kind"]
    params = {**base_params(cfg, d), **best["setting"]}
    split = "test" if d["sizes"]["test"] else "val"
    outcome = ray.remote(num_cpus=cfg.ray.cpus_per_worker)(split_outcome).options(num_returns=3)
    probs, pred, y_eval = ray.get(list(outcome.remote(
        best["state"], params, best["thresholds"], d[f"{split}_ref"], names)))  # fmt: skip
    module = module_from_state(best["state"], params)
    meta = {
        "task": task.name, "kind": kind, "column": task.column, "label_names": names,
        "thresholds": best["thresholds"],
        "arch": arch_dict(params["arch"], params["in_dim"], len(names), cfg.hidden, cfg.dropout),
        "backbone_id": ctx["backbone_id"],
        "metrics": {split: classification_metrics(probs, pred, y_eval, names, kind),
                    "val_macro_f1": best["val_macro_f1"]},
        "training": {k: params[k] for k in ("lr", "weight_decay", "feataug", "class_weights")}
        | {"epochs_run": best["epochs_run"], "n_train": int(len(d["y_train"])),
           "n_val": d["sizes"]["val"], "n_test": d["sizes"]["test"],
           "n_unknown_train": int((d["y_train"] < 0).sum())},
    }  # fmt: skip
    head_dir = wd.heads(cfg.workdir, task.name)
    save_head(head_dir, module, meta)
    png = confusion_png(pred, y_eval, names, kind)
    storage.write_bytes(storage.join(head_dir, "confusion.png"), png)
    table = [trial_row(t) for t in trials]
    storage.write_json(storage.join(head_dir, "trials.json"), table)
    return {"meta": meta, "trials": table, "png": png, "head_dir": head_dir, "split": split,
            "sweep": trials}  # fmt: skip


def trial_row(trial: dict) -> dict[str, Any]:
    """One line of trials.json: the setting, its status and its scores."""
    keys = ("val_macro_f1", "best_val_loss", "epochs_run")
    return {**trial["setting"], "status": trial["status"],
            **{k: trial.get(k) for k in keys}}  # fmt: skip
