"""`medray run heads`: small classification heads on frozen embeddings.

One frozen extractor, many cheap heads: each task in the config gets a linear or small
MLP head trained on the stored embeddings (`embeddings/<backbone_id>/`), never on images.
The search grid runs as a Ray Tune sweep (medray.heads.sweep): each setting a Ray Train
`TorchTrainer` over the embeddings as a Ray Dataset, several at once, ASHA stopping poor
ones early; the best on validation is kept. Multi-label heads get
per-label thresholds tuned on validation for F1. Outputs: `heads/<task>/head.safetensors`,
`head.json`, `confusion.png`, `trials.json`, and one MLflow run.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, NonNegativeFloat, PositiveFloat

from medray import raycluster, storage, tracking
from medray import workdir as wd
from medray.config import Section, StageConfig
from medray.feataug import FeatAugConfig
from medray.heads.data import DEFAULT_TASK, TaskConfig, TaskError
from medray.heads.model import Head, load_head

__all__ = ["Config", "Result", "run", "Head", "load_head", "TaskConfig", "TaskError"]


class SearchConfig(Section):
    """The hyper-parameter grid: every combination is one Ray Tune trial (a Ray Train run)."""

    arch: list[Literal["linear", "mlp"]] = Field(["linear", "mlp"], min_length=1)
    """Head architectures to try: linear and/or mlp."""
    lr: list[PositiveFloat] = Field([1e-3, 1e-2], min_length=1)
    """AdamW learning rates to try."""
    weight_decay: list[NonNegativeFloat] = Field([0.0, 1e-3], min_length=1)
    """AdamW weight decays to try."""


class AshaConfig(Section):
    """ASHA early stopping of poor settings (Ray Tune's `ASHAScheduler` on the val loss)."""

    enabled: bool = True
    """Stop a setting whose val loss at a rung is in the worst part of that rung."""
    grace_period: int = Field(10, ge=1)
    """Epochs every setting trains before it can be stopped."""
    reduction_factor: int = Field(3, ge=2)
    """1 / reduction_factor of the settings reaching a rung go on to the next."""


class Config(StageConfig):
    """Heads stage: tasks, the search grid, training and feature-space augmentation."""

    backbone_id: str | None = None
    """Embeddings to train on; None: the last embed run's (embeddings/LATEST)."""
    tasks: list[TaskConfig] = Field(default_factory=lambda: [TaskConfig()])
    """One head per task."""
    search: SearchConfig = Field(default_factory=SearchConfig)
    hidden: int = 256
    """Hidden width of the mlp head."""
    dropout: float = 0.1
    """Dropout of the mlp head."""
    epochs: int = 200
    """Maximum epochs per trial."""
    patience: int = 10
    """Early stopping: epochs without a better validation loss before stopping."""
    batch_size: int = 128
    """Training batch size per worker."""
    class_weights: bool = True
    """Weight the loss against class imbalance (balanced CE weights / BCE pos_weight)."""
    feataug: FeatAugConfig = Field(default_factory=FeatAugConfig)
    asha: AshaConfig = Field(default_factory=AshaConfig)
    max_concurrent: int = Field(4, ge=1)
    """Trials that train at the same time (Tune's max_concurrent_trials)."""
    cpus_per_trial: float = 0.25
    """CPUs per Ray Train worker of a trial (small, so several fit side by side)."""
    gpus_per_trial: float = Field(0.25, gt=0, le=1)
    """GPU per Ray Train worker of a trial when the cluster has GPUs: a fraction, so small
    heads share one GPU."""
    trial_retries: int = Field(1, ge=0)
    """Times a failed trial (a lost worker or node) is re-run before it counts as failed."""


class TaskResult(BaseModel):
    kind: str
    labels: list[str]
    head_dir: str
    best: dict[str, Any]
    """The kept setting: arch, lr, weight_decay, epochs_run, val_macro_f1."""
    metrics: dict[str, Any]
    """accuracy, macro_f1, micro_f1, macro_auroc on the test split (val when no test)."""
    auroc: dict[str, float | None]
    thresholds: dict[str, float]
    trials: int


class Result(BaseModel):
    backbone_id: str
    task: str
    """The first task; its headline metrics follow (one line in `medray demo`)."""
    kind: str
    accuracy: float
    macro_f1: float
    micro_f1: float
    macro_auroc: float | None
    tasks: dict[str, TaskResult]
    mlflow_run_id: str


def run(config: Config) -> Result:
    """Train every task's head on the current embeddings; write heads/<task>/ and MLflow."""
    from medray.heads import data as hd
    from medray.heads.task import train_task

    cfg = config
    bid = wd.current_backbone_id(cfg.workdir, cfg.backbone_id)
    paths = hd.shard_paths(cfg.workdir, bid)
    info_uri = wd.dataset_info(cfg.workdir)
    info = storage.read_json(info_uri) if storage.exists(info_uri) else {}
    cfg = cfg.model_copy(update={"tasks": named_tasks(cfg.tasks, info)})
    _check_task_names(cfg.tasks)
    labels = hd.read_rows(paths, None, with_embedding=False)
    for task in cfg.tasks:  # fail on a bad task before any training starts
        hd.resolve_task(task, hd.attach_column(labels, cfg.workdir, task), info)
    raycluster.init(cfg.ray)
    ctx = {
        "backbone_id": bid,
        "paths": paths,
        "info": info,
        "labels": labels,
        "num_workers": cfg.ray.num_workers,
        "use_gpu": raycluster.use_gpu(cfg.ray),
    }
    params = cfg.model_dump(exclude={"workdir", "mlflow", "ray"})
    out: dict[str, TaskResult] = {}
    with tracking.stage_run(cfg.mlflow, cfg.workdir, "heads", params) as mlrun:
        import mlflow

        mlflow.set_tag("medray.backbone_id", bid)
        for task in cfg.tasks:
            done = train_task(cfg, task, ctx)
            _log_task(task.name, done)
            out[task.name] = _summary(done)
    first = next(iter(out))
    head = {k: out[first].metrics[k] for k in ("accuracy", "macro_f1", "micro_f1", "macro_auroc")}
    return Result(backbone_id=bid, task=first, kind=out[first].kind, **head, tasks=out,
                  mlflow_run_id=mlrun.info.run_id)  # fmt: skip


def named_tasks(tasks: list[TaskConfig], info: dict) -> list[TaskConfig]:
    """Tasks without a name take the dataset's (dataset.json `task`, else `label`)."""
    default = info.get("task") or DEFAULT_TASK
    return [t if t.name else t.model_copy(update={"name": default}) for t in tasks]


def _check_task_names(tasks: list[TaskConfig]) -> None:
    names = [t.name for t in tasks]
    if len(set(names)) != len(names) or not all(n and "/" not in n for n in names):
        raise TaskError(f"tasks: names must be unique and contain no '/', got {names}")


def _summary(done: dict) -> TaskResult:
    meta = done["meta"]
    m = meta["metrics"][done["split"]]
    return TaskResult(
        kind=meta["kind"],
        labels=meta["label_names"],
        head_dir=done["head_dir"],
        best={**done["trials"][0], "split": done["split"]},
        metrics={k: m[k] for k in ("n", "accuracy", "macro_f1", "micro_f1", "macro_auroc")},
        auroc=m["auroc"],
        thresholds=meta["thresholds"],
        trials=len(done["trials"]),
    )


def _log_task(name: str, done: dict) -> None:
    import mlflow

    from medray.tracking import metric_name

    meta, split = done["meta"], done["split"]
    m = meta["metrics"][split]
    flat = {f"{name}.{split}.{k}": m[k] for k in ("accuracy", "macro_f1", "micro_f1")}
    if m["macro_auroc"] is not None:
        flat[f"{name}.{split}.macro_auroc"] = m["macro_auroc"]
    flat.update({f"{name}.{split}.auroc.{k}": v for k, v in m["auroc"].items() if v is not None})
    flat.update({f"{name}.{split}.f1.{k}": v for k, v in m["f1"].items()})
    flat.update({f"{name}.threshold.{k}": v for k, v in meta["thresholds"].items()})
    flat[f"{name}.val.macro_f1"] = meta["metrics"]["val_macro_f1"]
    mlflow.log_metrics({metric_name(k): float(v) for k, v in flat.items()})
    mlflow.log_dict(meta, f"heads/{name}/head.json")
    mlflow.log_dict({"trials": done["trials"]}, f"heads/{name}/trials.json")
    mlflow.log_image(_png_image(done["png"]), f"heads/{name}/confusion.png")
    mlflow.log_params({f"{name}.best.{k}": v for k, v in done["sweep"][0]["setting"].items()})
    _log_trials(name, done["sweep"])


def _log_trials(name: str, sweep: list[dict]) -> None:
    """One nested MLflow run per Tune trial: its setting, status, scores, val loss curve."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    for i, trial in enumerate(sweep):
        with mlflow.start_run(run_name=f"{name}-trial-{i}", nested=True) as child:
            mlflow.log_params({"task": name, **trial["setting"]})
            mlflow.set_tags({"medray.trial_status": trial["status"], "medray.rank": i})
            scores = {k: trial.get(k) for k in ("val_macro_f1", "best_val_loss", "epochs_run")}
            mlflow.log_metrics({k: float(v) for k, v in scores.items() if v is not None})
            now = int(time.time() * 1000)
            curve = [Metric(key, h[key], now, h["epoch"])
                     for h in trial["history"] for key in ("val_loss", "train_loss")]  # fmt: skip
            for start in range(0, len(curve), 1000):  # log_batch takes 1000 metrics at most
                client.log_batch(child.info.run_id, metrics=curve[start : start + 1000])


def _png_image(png: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png))
