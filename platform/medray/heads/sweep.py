"""The heads sweep on Ray Tune: one Tune trial per grid setting, each a `TorchTrainer.fit()`.

Ray Train V2 has no `Tuner(TorchTrainer)`; Tune runs a function trial that builds and fits
the trainer, and Train's `TuneReportCallback` forwards each `ray.train.report` to Tune
(one per epoch), so ASHA can stop a poor setting early. A trial that finishes scores its
head on the validation split itself (thresholds tuned, macro-F1) and reports the best-epoch
weights as a Tune checkpoint, so the driver only ranks small results: it never holds the
embeddings. Trials reserve next to nothing (0.01 CPU; Tune refuses 0): their Ray Train
workers hold the CPUs (and the fractional GPU) and `max_concurrent_trials` bounds how many
run at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medray.progress import Progress

STATE_FILE = "state.npz"
SCORE_FILE = "score.json"


def head_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune function trial: fit one setting on Ray Train, score it on val, report it."""
    import ray
    from ray import tune

    from medray.heads.task import score_state

    params = {**setup["base"], **{k: config[k] for k in ("arch", "lr", "weight_decay")}}
    out = fit_setting(params, setup)
    thresholds, metrics = score_state(out["state"], params, *ray.get(setup["val_ref"]),
                                         setup["names"])  # fmt: skip
    score = {"val_macro_f1": float(metrics["macro_f1"]), "thresholds": thresholds,
             "best_val_loss": min(h["val_loss"] for h in out["history"]),
             "epochs_run": len(out["history"])}  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / STATE_FILE, **out["state"])
        (Path(d) / SCORE_FILE).write_text(json.dumps(score))
        # val_loss too: the scheduler's metric must be in every result
        final = {k: score[k] for k in ("val_macro_f1", "best_val_loss", "epochs_run")}
        tune.report({**final, "val_loss": score["best_val_loss"], "finished": 1},
                    checkpoint=tune.Checkpoint.from_directory(d))  # fmt: skip


def fit_setting(params: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
    """One `TorchTrainer.fit()` whose per-epoch reports reach Tune (when ASHA needs them)."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from medray.heads.train import fit_trial

    if setup["num_workers"] == 0:  # Ray Train's local mode refuses to run inside Tune
        val = tuple(np.array(a) for a in ray.get(setup["val_ref"]))  # writable copies
        return fit_in_trial(setup["train"], val, params, setup["asha"])
    # Train's controller takes a worker's report when it polls (every 2 s by default) and a
    # worker waits for that before its next report: per-epoch reports of a head that trains
    # an epoch in milliseconds would wait 2 s each. Train passes this on to its controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    name = f"{setup['name']}-{tune.get_context().get_trial_id()}"
    return fit_trial(
        name, setup["train"], setup["val_ref"], {**params, "report_every_epoch": setup["asha"]},
        setup["num_workers"], setup["cpus"], setup["storage_path"], setup["gpus"],
        callbacks=[TuneReportCallback()],
    )  # fmt: skip


def fit_in_trial(train, val, params: dict[str, Any], per_epoch: bool) -> dict[str, Any]:
    """`ray.num_workers: 0`: the training loop in the trial's own process, on the collected
    train split (what Ray Train's local mode does outside Tune)."""
    from ray import tune

    from medray.heads.train import array_batches, collect_arrays, new_module, train_head

    x, y = collect_arrays(train)
    batches = array_batches(x, y, params["batch_size"], params["seed"])
    report = tune.report if per_epoch else (lambda m: None)
    module, history = train_head(new_module(params), batches, val, params, report=report)
    return {"state": {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()},
            "history": history}  # fmt: skip


def asha_scheduler(cfg):
    """ASHA on the validation loss (None when off): a setting whose loss after
    `grace_period` epochs is in the worst (1 - 1/reduction_factor) of its rung stops there."""
    if not cfg.asha.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration", metric="val_loss", mode="min",
        max_t=cfg.epochs + 1,  # the epochs, then the trial's final scored report
        grace_period=min(cfg.asha.grace_period, cfg.epochs),
        reduction_factor=cfg.asha.reduction_factor,
    )  # fmt: skip


def trial_progress(name: str, total: int):
    """A Tune callback that prints the sweep's progress (settings done / total, ETA)."""
    from ray import tune

    class TrialProgress(tune.Callback):
        def setup(self, **info):
            self.bar = Progress(f"heads {name}", total, "settings").__enter__()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.bar.advance(1)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.bar.advance(1)

        def on_experiment_end(self, trials, **info):
            self.bar.__exit__(None, None, None)

    return TrialProgress()


def run_sweep(cfg, task_name: str, search: dict[str, list], setup: dict[str, Any]) -> list[dict]:
    """Every combination of `search` as one Tune trial; returns, per trial, its setting,
    status (`finished`, `stopped early` by ASHA, `failed`), metrics and, when finished, the
    head's state dict and val-tuned thresholds (read from its checkpoint)."""
    from ray import tune

    from medray.heads.train import run_storage

    storage_path = run_storage(cfg.workdir)
    # Tune's new console reporter prints its tables even at verbose=0; the legacy one obeys
    # it. The sweep's progress is medray's own line (trial_progress).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    total = int(np.prod([len(v) for v in search.values()]))
    setup = {**setup, "storage_path": storage_path}  # Train's runs beside Tune's, removed with it
    trainable = tune.with_resources(tune.with_parameters(head_trial, setup=setup), {"cpu": 0.01})
    tuner = tune.Tuner(
        trainable,
        param_space={k: tune.grid_search(v) for k, v in search.items()},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.max_concurrent,
                                    scheduler=asha_scheduler(cfg)),  # fmt: skip
        run_config=tune.RunConfig(
            name=f"heads-{task_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path, verbose=0,
            callbacks=[trial_progress(task_name, total)],
            failure_config=tune.FailureConfig(max_failures=cfg.trial_retries),
        ),
    )  # fmt: skip
    before = live_placement_groups()
    try:
        return [trial_outcome(r) for r in tuner.fit()]
    finally:
        worker = {"CPU": setup["cpus"], **({"GPU": setup["gpus"]} if setup["gpus"] else {})}
        remove_leaked_groups(before, worker)
        if not storage_path.startswith("s3://"):
            shutil.rmtree(storage_path, ignore_errors=True)


def live_placement_groups() -> dict[str, dict]:
    """{id: entry} of the cluster's placement groups not yet removed."""
    import ray

    return {k: v for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}


def remove_leaked_groups(before: dict, worker_bundle: dict[str, float]) -> int:
    """Remove the placement groups of Ray Train runs that ASHA stopped: Train's own cleaner
    finds them through Ray's state API, which needs the dashboard (off in medray's local
    Ray), so each stopped trial would keep its workers' CPUs reserved until the driver
    exits, and a later stage on a laptop could wait for them forever. Only groups created
    during the sweep whose every bundle is a head worker's are removed."""
    import ray
    from ray.util.placement_group import PlacementGroup

    def workers_only(entry: dict) -> bool:
        return all(
            {k: float(v) for k, v in b.items()} == worker_bundle for b in entry["bundles"].values()
        )

    leaked = [k for k, v in live_placement_groups().items() if k not in before and workers_only(v)]
    for pg_id in leaked:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
    return len(leaked)


def trial_outcome(result) -> dict[str, Any]:
    """One Tune result as {setting, status, metrics, history, state, thresholds}."""
    setting = {k: result.config[k] for k in ("arch", "lr", "weight_decay")}
    frame = result.metrics_dataframe
    rows = frame.to_dict("records") if frame is not None else []
    epochs = [r for r in rows if _number(r.get("epoch")) and _number(r.get("train_loss"))]
    history = [{"epoch": int(r["epoch"]), "val_loss": float(r["val_loss"]),
                "train_loss": float(r["train_loss"])} for r in epochs]  # fmt: skip
    out = {"setting": setting, "history": history, "error": None, "state": None}
    metrics = result.metrics or {}
    if result.error is not None:
        lines = [line for line in str(result.error).splitlines() if line.strip()]
        return {**out, "status": "failed", "error": lines[-1] if lines else "unknown error"}
    if not metrics.get("finished") or result.checkpoint is None:
        best = min((h["val_loss"] for h in history), default=None)
        return {**out, "status": "stopped early", "best_val_loss": best,
                "epochs_run": len(history)}  # fmt: skip
    with result.checkpoint.as_directory() as d:
        with np.load(Path(d) / STATE_FILE) as z:
            state = {k: z[k] for k in z.files}
        score = json.loads((Path(d) / SCORE_FILE).read_text())
    return {**out, "status": "finished", "state": state, **score}


def _number(v) -> bool:
    return v is not None and v == v  # not None, not NaN
