"""`medray run pretrain`: BYOL on the manifest's train images with Ray Train (DDP), resumable.

The driver opens one MLflow run, then runs a `TorchTrainer` whose workers (loop.py) each
train on their slice of the train split and report a checkpoint (online, target,
optimizer, scheduler, epoch, step, curve, best encoder) every epoch to
`<workdir>/pretrain/<name>/` through Ray Train's storage (local path or s3://).
`FailureConfig(max_failures)` restarts a failed worker group from the latest checkpoint;
running the same command again (same `name`) resumes from it too, without repeating
finished epochs. Rank 0 scores the starting encoder (epoch 0, before any step) and, after
every epoch, the online and the EMA target encoders by kNN accuracy on labelled val images,
prints one progress line per epoch, and keeps the best of them (monitor.py). At the end that
encoder, never worse than the start, is exported to `<workdir>/pretrain/<name>/export/`
(backbone.safetensors + backbone.json, docs/contracts.md, plus curve.json: the per-epoch
curve) so `medray run embed backbone.weights=<that dir>` and `medray run select` can use it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from medray import storage, tracking
from medray import workdir as wd
from medray.config import BackboneConfig, Section, StageConfig
from medray.pretrain.settings import (
    is_local,
    model_input_size,
    resolve_auto,
    resolve_optim,
    training_uris,
    worker_cpus,
)

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


class OptimConfig(Section):
    """Optimiser and learning-rate schedule."""

    name: Literal["sgd", "lars", "adamw"] = "adamw"
    """adamw (default), sgd (the paper's: lr 3e-4) or lars (large batches). AdamW because
    its step is set by `lr` alone, whatever the size of the gradient that reaches the
    backbone through the fresh projector: SGD at the paper's 3e-4 barely moves ImageNet
    weights in the few hundred steps a laptop runs."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate of the projector and predictor (the backbone's: `backbone_lr_scale`).
    1e-4 with AdamW, the backbone at 1e-5 after one heads-only epoch: on the shared 28 px
    X-rays (BatchNorm statistics frozen) the backbone's kNN stays within 0.004 of the start
    over 3 short epochs, where AdamW 1e-4 on every weight from step 0 fell 0.901 -> 0.775
    in 40 steps. The best-epoch export guards the rest."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD/LARS momentum (the paper: 0.9)."""
    weight_decay: float = Field(0.0, ge=0)
    """L2 weight decay."""
    backbone_lr_scale: float | Literal["auto"] = "auto"
    """The backbone learns at `lr` times this; the fresh projector and predictor at `lr`.
    auto: 0.1 from trained weights (pretrained features need far smaller steps than fresh
    heads), 1 from `backbone.weights=random`."""
    frozen_backbone_epochs: float | Literal["auto"] = "auto"
    """The backbone's learning rate is 0 for this many epochs (then its own warmup and
    cosine): the fresh heads learn to predict first, so their early random gradients do not
    distort the pretrained features (linear probing then fine-tuning, Kumar et al. 2022).
    auto: 1 from trained weights, 0 from `backbone.weights=random`."""
    warmup_epochs: float = Field(1.0, ge=0)
    """Linear warmup length in epochs, then cosine decay."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of `lr`."""

    @field_validator("backbone_lr_scale", "frozen_backbone_epochs")
    @classmethod
    def _not_negative(cls, value: float | str) -> float | str:
        if value != "auto" and value < 0:
            raise ValueError("must be >= 0 or auto")
        return value


class AugmentConfig(Section):
    """How the two views are made (medray.pretrain.augment)."""

    preset: Literal["auto", "histology", "xray"] = "auto"
    """histology (colour tiles: flips, 90-degree turns, colour jitter, gray, blur, solarize),
    xray (grayscale radiographs: milder crops, +-10 degree turns, brightness/contrast only,
    no flips) or auto: xray when a sample of the train images is grayscale, else histology."""
    where: Literal["auto", "loader", "device"] = "auto"
    """Where augmentations run: loader (per image, torchvision v2, CPU), device (batched on
    the worker's device), auto (device on GPU, loader on CPU)."""


class DebugConfig(Section):
    """Test-only switches."""

    fail_at_epoch: int | None = None
    """Raise in one worker halfway through this epoch, once per run name (fault tests)."""
    hold_at_epoch: int | None = None
    """Halfway through this epoch (0-based, like `fail_at_epoch`) the last worker writes its
    process id to <run dir>/hold_pid and waits up to `hold_s` seconds, once per run name:
    a fault test kills that process (kill -9) at a known point mid-epoch."""
    hold_s: float = Field(60.0, ge=0)
    """How long a held worker waits before it trains on (nobody killed it)."""


class Config(StageConfig):
    """BYOL pretraining of `backbone` on the train split."""

    name: str = Field("byol", pattern=r"^[A-Za-z0-9._-]+$")
    """Run name: checkpoints and export go to <workdir>/pretrain/<name>/; same name resumes."""
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    """Encoder to start from (timm name + weights: bundled, random, a path, ...)."""
    epochs: int = Field(30, ge=1)
    """Passes over the train split (the paper: 30)."""
    batch_size: int = Field(32, ge=2)
    """Images per worker per step (the paper: 32)."""
    image_size: int | Literal["auto"] = "auto"
    """Square side images are resized to before augmentation, trained at and exported with.
    auto: 4x the median side of a sample of the train images, a multiple of 32, within
    [64, the model's pretrained size] (28 px X-rays train at 128, 150 px tiles at 224): the
    embed stage's rule, so the export is used at the scale it learned. Set 64 for speed."""
    bn: Literal["auto", "frozen_stats", "train"] = "auto"
    """The backbone's BatchNorm layers. frozen_stats: eval mode, the starting weights'
    running statistics are kept (the affine weight and bias still train); train: batch
    statistics, running statistics re-estimated (needed from random init). auto: train for
    `backbone.weights=random`, frozen_stats otherwise. Re-estimating ImageNet statistics on
    small X-rays alone drops kNN accuracy 0.901 -> 0.836, whatever BYOL does."""
    hidden_dim: int = Field(2048, ge=1)
    """Projector and predictor hidden width (the paper: 2048)."""
    proj_dim: int = Field(512, ge=1)
    """Projection (and prediction) dimension (the paper: 512)."""
    tau_base: float = Field(0.99, ge=0, le=1)
    """Target EMA decay at step 0, raised to 1 by a cosine schedule (the paper: 0.99)."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loader_workers: int = Field(2, ge=0)
    """Data-loader processes per Ray Train worker (0: load in the training process)."""
    max_failures: int = Field(1, ge=0)
    """Worker-group restarts from the latest checkpoint before the run fails."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept under <workdir>/pretrain/<name>/."""
    knn_k: int = Field(10, ge=1)
    """Neighbours in the per-epoch kNN accuracy on labelled val images."""
    knn_max_images: int = Field(1000, ge=0)
    """Val images used for the kNN accuracy (0: skip it, and export the last epoch)."""
    knn_target: bool = True
    """Also score the EMA target encoder each epoch, so the export can be either network."""
    max_train_images: int = Field(0, ge=0)
    """Train on a seeded random subset of this many train images (0: all): quick checks."""
    log_every: int = Field(1, ge=1)
    """Log loss, lr, tau and images/s to MLflow every this many steps."""
    debug: DebugConfig = Field(default_factory=DebugConfig)


class Result(BaseModel):
    """What a pretrain run did; the CLI prints it."""

    name: str
    epochs: int
    start_epoch: int
    """Epochs already done when this invocation started (> 0 when it resumed)."""
    epochs_trained: list[int]
    """Epochs (1-based, as in `curve`) trained by this invocation, across worker restarts."""
    steps: int
    """Optimiser steps over the whole run."""
    workers: int
    use_gpu: bool
    cpus_per_worker: float
    """CPUs reserved per worker (one worker on a local Ray takes every free CPU)."""
    torch_threads: int | None
    """Torch threads rank 0 trained with (from the CPUs reserved for it)."""
    image_size: int
    augment_preset: str
    bn: str
    """The settings the run used, `auto` resolved."""
    final_loss: float | None
    knn_initial: float | None
    """kNN accuracy (val) of the starting backbone (epoch 0); None without labels."""
    knn_final: float | None
    """kNN accuracy (val) of the online encoder after the last epoch."""
    knn_exported: float | None
    """kNN accuracy (val) of the exported encoder; None without a monitor."""
    exported_epoch: int
    """Epoch of the exported encoder: 0 is the start, unchanged."""
    exported_network: str
    """start, online or target."""
    export_note: str
    """What was exported and why, in one sentence."""
    images_per_s: float | None
    """Training images/s of the last epoch, all workers together."""
    skipped_images: int
    """Draws of unreadable images replaced by the next row, over this invocation."""
    curve: list[dict[str, Any]]
    """Per epoch (0: the start): epoch, loss, knn_online, knn_target, images_per_s, seconds."""
    backbone_id: str
    export_dir: str
    checkpoint: str
    mlflow_run_id: str
    seconds: float


def run_dir(cfg: Config) -> str:
    return storage.join(wd.pretrain(cfg.workdir), cfg.name)


def export_dir(cfg: Config) -> str:
    return storage.join(run_dir(cfg), "export")


def trainer_storage(cfg: Config) -> tuple[str, Any]:
    """Ray Train's storage_path and filesystem: the workdir's pretrain dir (local or S3)."""
    root = wd.pretrain(cfg.workdir)
    if storage.is_s3(root):
        fs, path = storage.arrow_fs(root)
        return path, fs
    Path(root).mkdir(parents=True, exist_ok=True)
    return root, None


def check_data(cfg: Config) -> None:
    """Fail early, in the driver, with the file and the reason."""
    n = len(training_uris(cfg))
    need = cfg.batch_size * cfg.ray.num_workers
    if n < need:
        raise ValueError(
            f"{wd.manifest(cfg.workdir)}: {n} train images, fewer than batch_size "
            f"{cfg.batch_size} x {cfg.ray.num_workers} workers; lower batch_size or add data"
        )


def make_trainer(cfg: Config, loop_config: dict[str, Any], use_gpu: bool, cpus: float):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from medray.pretrain.loop import train_loop

    path, fs = trainer_storage(cfg)
    resources = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    # The driver's S3 endpoint/region and MLflow settings reach the workers (never
    # credentials: cluster nodes have their own role).
    forwarded = (*storage.WORKER_ENV, *tracking.WORKER_ENV)
    env = {k: os.environ[k] for k in forwarded if os.environ.get(k)}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )


def load_state(checkpoint, cfg: Config) -> dict[str, Any]:
    """`state.pt` of Ray Train's result checkpoint, else of the newest `checkpoint_*` directory
    under the run directory (a re-run of a finished run reports no new checkpoint)."""
    import io

    import torch

    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    found = [u for u in storage.listdir(run_dir(cfg)) if u.rstrip("/").split("/")[-1]
             .startswith("checkpoint_") and storage.exists(storage.join(u, STATE_FILE))]  # fmt: skip
    if not found:
        raise RuntimeError(f"{run_dir(cfg)}: the run finished without a checkpoint")
    data = storage.read_bytes(storage.join(sorted(found)[-1], STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def exported_weights(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The backbone weights to export and what they are: the monitor's best encoder when
    the checkpoint has one (`best`), else the last online encoder."""
    best = state.get("best")
    if best is not None:
        info = {"epoch": best["epoch"], "network": best["network"], "knn": best["knn"]}
        return best["backbone"], info
    prefix = "backbone."
    online = state["online"]
    weights = {k[len(prefix) :]: v for k, v in online.items() if k.startswith(prefix)}
    return weights, {"epoch": state["epoch"], "network": "online", "knn": None}


def export(cfg: Config, state: dict[str, Any], mlflow_run_id: str) -> dict[str, Any]:
    """The chosen encoder of a checkpoint's state (`exported_weights`) -> export dir
    (docs/contracts.md) with curve.json beside it; returns its backbone.json."""
    from medray.models import export_backbone, load_backbone, read_export_spec
    from medray.pretrain import monitor

    backbone = load_backbone(cfg.backbone, seed=cfg.seed)
    weights, chosen = exported_weights(state)
    backbone.model.load_state_dict(weights, strict=True)
    spec = backbone.spec.model_copy(update={"input_size": cfg.image_size})
    curve = state.get("curve", [])
    extra = {"source": "byol", "mlflow_run_id": mlflow_run_id, "epochs": state["epoch"],
             "steps": state["step"], "start_weights": cfg.backbone.weights,
             "exported_epoch": chosen["epoch"], "exported_network": chosen["network"],
             "knn_exported": chosen["knn"]}  # fmt: skip
    out = export_backbone(backbone.model, spec, export_dir(cfg), extra=extra)
    best = monitor.Best(chosen["epoch"], chosen["network"], chosen["knn"]) \
        if chosen["knn"] is not None else None  # fmt: skip
    note = monitor.export_note(best, monitor.start_knn(curve))
    storage.write_json(storage.join(out, "curve.json"), {"curve": curve, **extra, "note": note})
    return {**read_export_spec(out), "note": note}


def result_of(cfg: Config, out: dict, meta: dict, state: dict, **rest: Any) -> Result:
    """The Result from the loop's return value, the export's metadata and the final state."""
    from medray.pretrain import monitor

    curve = state.get("curve") or out.get("curve", [])
    trained = [r for r in curve if r["epoch"] > 0]
    last = trained[-1] if trained else {}
    return Result(
        name=cfg.name, epochs=cfg.epochs, start_epoch=out.get("start_epoch", cfg.epochs),
        epochs_trained=out.get("epochs_trained", []), steps=state.get("step", 0),
        workers=cfg.ray.num_workers, image_size=cfg.image_size,
        augment_preset=cfg.augment.preset, bn=cfg.bn, final_loss=last.get("loss"),
        knn_initial=monitor.start_knn(curve),
        knn_final=last.get("knn_online"), knn_exported=meta["knn_exported"],
        exported_epoch=meta["exported_epoch"], exported_network=meta["exported_network"],
        export_note=meta["note"], images_per_s=last.get("images_per_s"),
        skipped_images=out.get("skipped", 0), curve=curve,
        torch_threads=out.get("torch_threads"), backbone_id=meta["backbone_id"],
        export_dir=export_dir(cfg), **rest,
    )  # fmt: skip


def run(config: Config) -> Result:
    """Pretrain (module doc); returns the curve, kNN accuracies, throughput and the export."""
    import mlflow
    import ray

    from medray import raycluster

    start = time.perf_counter()
    cfg = config.model_copy(update={"workdir": storage.resolve(config.workdir)})
    check_data(cfg)
    cfg = resolve_auto(cfg)
    raycluster.init(cfg.ray)
    use_gpu = raycluster.use_gpu(cfg.ray)
    cpus = worker_cpus(cfg.ray, ray.available_resources().get("CPU", 0.0), is_local(cfg.ray))
    params = {**cfg.model_dump(exclude={"ray"}), "use_gpu": use_gpu, "ray": cfg.ray.model_dump(),
              "cpus_reserved_per_worker": cpus}  # fmt: skip
    with tracking.stage_run(cfg.mlflow, cfg.workdir, "pretrain", params) as mlrun:
        mlflow.set_tag("medray.pretrain.name", cfg.name)
        loop_config = {
            "config": cfg.model_dump(),
            "use_gpu": use_gpu,
            "mlflow_uri": tracking.tracking_uri(cfg.mlflow, cfg.workdir),
            "mlflow_run_id": mlrun.info.run_id,
            "run_dir": run_dir(cfg),
        }
        result = make_trainer(cfg, loop_config, use_gpu, cpus).fit()
        state = load_state(result.checkpoint, cfg)
        meta = export(cfg, state, mlrun.info.run_id)
        res = result_of(
            cfg, result.return_value or {}, meta, state, use_gpu=use_gpu, cpus_per_worker=cpus,
            checkpoint=str(result.checkpoint.path) if result.checkpoint else run_dir(cfg),
            mlflow_run_id=mlrun.info.run_id,
            seconds=round(time.perf_counter() - start, 2),
        )  # fmt: skip
        numbers = {k: float(v) for k, v in res.model_dump().items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        mlflow.log_metrics({f"final_{k}": v for k, v in numbers.items()})
        mlflow.log_dict({"result": res.model_dump()}, "pretrain.json")
        mlflow.log_dict({"curve": res.curve, "note": res.export_note}, "curve.json")
        mlflow.set_tags({"medray.backbone_id": meta["backbone_id"],
                         "medray.pretrain.export": res.export_note})  # fmt: skip
    return res


__all__ = [
    "Config", "Result", "run", "OptimConfig", "AugmentConfig", "DebugConfig", "check_data",
    "export", "is_local", "model_input_size", "resolve_auto", "resolve_optim", "training_uris",
    "worker_cpus",
]  # fmt: skip
