"""`medray run pretrain`: BYOL on the manifest's train images with Ray Train (DDP), resumable.

The driver opens one MLflow run, then runs a `TorchTrainer` whose workers (loop.py) each
train on their slice of the train split and report a checkpoint (online, target,
optimizer, scheduler, epoch, step, history) every epoch to
`<workdir>/pretrain/<name>/` through Ray Train's storage (local path or s3://).
`FailureConfig(max_failures)` restarts a failed worker group from the latest checkpoint;
running the same command again (same `name`) resumes from it too, without repeating
finished epochs. At the end the online encoder is exported to
`<workdir>/pretrain/<name>/export/` (backbone.safetensors + backbone.json, docs/contracts.md)
so `medray run embed backbone.weights=<that dir>` and `medray run select` can use it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from medray import storage
from medray import workdir as wd
from medray.config import BackboneConfig, Section, StageConfig

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"


class OptimConfig(Section):
    """Optimiser and learning-rate schedule."""

    name: Literal["sgd", "lars", "adamw"] = "sgd"
    """sgd (the paper's), lars (large batches) or adamw."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate (the paper: 3e-4)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD/LARS momentum (the paper: 0.9)."""
    weight_decay: float = Field(0.0, ge=0)
    """L2 weight decay."""
    warmup_epochs: float = Field(1.0, ge=0)
    """Linear warmup length in epochs, then cosine decay."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of `lr`."""


class AugmentConfig(Section):
    """How the two views are made (medray.pretrain.augment)."""

    preset: Literal["histology", "xray"] = "histology"
    """histology or xray."""
    where: Literal["auto", "loader", "device"] = "auto"
    """Where augmentations run: loader (per image, torchvision v2, CPU), device (batched on
    the worker's device), auto (device on GPU, loader on CPU)."""


class DebugConfig(Section):
    """Test-only switches."""

    fail_at_epoch: int | None = None
    """Raise in one worker halfway through this epoch, once per run name (fault tests)."""


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
    image_size: int = Field(224, ge=16)
    """Square side images are resized to before augmentation and trained at."""
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
    """Val images used for the kNN accuracy (0: skip it)."""
    log_every: int = Field(1, ge=1)
    """Log loss, lr, tau and images/s to MLflow every this many steps."""
    debug: DebugConfig = Field(default_factory=DebugConfig)


class Result(BaseModel):
    """What a pretrain run did; the CLI prints it."""

    name: str
    epochs: int
    start_epoch: int
    """First epoch this invocation trained (> 0 when it resumed from a checkpoint)."""
    epochs_trained: list[int]
    """Epochs trained by this invocation, across worker restarts (each once when none repeat)."""
    steps: int
    """Optimiser steps over the whole run."""
    workers: int
    use_gpu: bool
    final_loss: float | None
    knn_initial: float | None
    """kNN accuracy (val) of the starting backbone; None without labels."""
    knn_final: float | None
    """kNN accuracy (val) after the last epoch."""
    images_per_s: float | None
    """Training images/s of the last epoch, all workers together."""
    skipped_images: int
    """Draws of unreadable images replaced by the next row, over this invocation."""
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
    from medray.data.manifest import read_manifest
    from medray.pretrain.dataset import train_uris

    n = len(train_uris(read_manifest(cfg.workdir)))
    need = cfg.batch_size * cfg.ray.num_workers
    if n < need:
        raise ValueError(
            f"{wd.manifest(cfg.workdir)}: {n} train images, fewer than batch_size "
            f"{cfg.batch_size} x {cfg.ray.num_workers} workers; lower batch_size or add data"
        )


FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI")  # fmt: skip
"""The driver's S3 endpoint/region and MLflow settings reach the workers (never credentials:
cluster nodes have their own role)."""


def make_trainer(cfg: Config, loop_config: dict[str, Any], use_gpu: bool):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from medray.pretrain.loop import train_loop

    path, fs = trainer_storage(cfg)
    resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
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


def export(cfg: Config, state: dict[str, Any], mlflow_run_id: str) -> dict[str, Any]:
    """The online encoder of a checkpoint's state -> export dir (docs/contracts.md); returns
    its backbone.json."""
    from medray.models import export_backbone, load_backbone, read_export_spec

    backbone = load_backbone(cfg.backbone, seed=cfg.seed)
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in state["online"].items() if k.startswith(prefix)}
    backbone.model.load_state_dict(weights, strict=True)
    spec = backbone.spec.model_copy(update={"input_size": cfg.image_size})
    extra = {"source": "byol", "mlflow_run_id": mlflow_run_id, "epochs": state["epoch"],
             "steps": state["step"], "start_weights": cfg.backbone.weights}  # fmt: skip
    out = export_backbone(backbone.model, spec, export_dir(cfg), extra=extra)
    return read_export_spec(out)


def run(config: Config) -> Result:
    """Pretrain (module doc); returns epochs, kNN accuracies, throughput and the export."""
    import mlflow

    from medray import raycluster, tracking

    start = time.perf_counter()
    cfg = config.model_copy(update={"workdir": storage.resolve(config.workdir)})
    check_data(cfg)
    raycluster.init(cfg.ray)
    use_gpu = raycluster.use_gpu(cfg.ray)
    params = {**cfg.model_dump(exclude={"ray"}), "use_gpu": use_gpu, "ray": cfg.ray.model_dump()}
    with tracking.stage_run(cfg.mlflow, cfg.workdir, "pretrain", params) as mlrun:
        mlflow.set_tag("medray.pretrain.name", cfg.name)
        loop_config = {
            "config": cfg.model_dump(),
            "use_gpu": use_gpu,
            "mlflow_uri": tracking.tracking_uri(cfg.mlflow, cfg.workdir),
            "mlflow_run_id": mlrun.info.run_id,
            "run_dir": run_dir(cfg),
        }
        result = make_trainer(cfg, loop_config, use_gpu).fit()
        out = result.return_value or {}
        meta = export(cfg, load_state(result.checkpoint, cfg), mlrun.info.run_id)
        history = out.get("history", [])
        last = history[-1] if history else {}
        res = Result(
            name=cfg.name,
            epochs=cfg.epochs,
            start_epoch=out.get("start_epoch", cfg.epochs),
            epochs_trained=out.get("epochs_trained", []),
            steps=out.get("step", 0),
            workers=cfg.ray.num_workers,
            use_gpu=use_gpu,
            final_loss=last.get("loss"),
            knn_initial=out.get("knn_initial"),
            knn_final=last.get("knn_acc"),
            images_per_s=last.get("images_per_s"),
            skipped_images=out.get("skipped", 0),
            backbone_id=meta["backbone_id"],
            export_dir=export_dir(cfg),
            checkpoint=str(result.checkpoint.path),
            mlflow_run_id=mlrun.info.run_id,
            seconds=round(time.perf_counter() - start, 2),
        )
        numbers = {k: float(v) for k, v in res.model_dump().items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        mlflow.log_metrics({f"final_{k}": v for k, v in numbers.items()})
        mlflow.log_dict({"result": res.model_dump(), "history": history}, "pretrain.json")
        mlflow.set_tag("medray.backbone_id", meta["backbone_id"])
    return res


__all__ = ["Config", "Result", "run", "OptimConfig", "AugmentConfig", "DebugConfig"]
