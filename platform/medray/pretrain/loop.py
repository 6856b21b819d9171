"""The per-worker BYOL loop that Ray Train runs (one copy per worker, DDP between them).

Each worker: builds online + target networks from `cfg.backbone`, restores the latest
checkpoint when Ray Train hands one over (a restart after a failure, or a re-run with the
same name), trains its slice of the train split for the remaining epochs, and after every
epoch reports a checkpoint (rank 0 writes it; every rank calls `report`, a barrier).
Rank 0 also logs loss, lr, tau and images/s per step and a kNN accuracy per epoch to the
driver's MLflow run.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medray import storage
from medray.pretrain import STATE_FILE, Config
from medray.pretrain.augment import BatchTwoViews, TwoViews
from medray.pretrain.byol import (
    OnlineNetwork,
    TargetNetwork,
    byol_loss,
    ema_update,
    lr_factor,
    make_optimizer,
    tau_schedule,
)
from medray.pretrain.dataset import EpochSampler, ImageRows, knn_subset, load_pixels, train_uris

log = logging.getLogger(__name__)
FAIL_MARKER = "injected_failure"


class InjectedFailure(RuntimeError):
    """The test-only failure of `debug.fail_at_epoch`."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the module itself)."""
    return model.module if hasattr(model, "module") else model


@dataclass
class Progress:
    """What a checkpoint carries besides the weights."""

    epoch: int = 0
    """Next epoch to train."""
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    knn_initial: float | None = None


class Logger:
    """MLflow metrics into the driver's run, from rank 0 only (other ranks: no-op)."""

    def __init__(self, uri: str, run_id: str, active: bool) -> None:
        self.client = None
        if active:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri=uri), run_id

    def log(self, metrics: dict[str, float | None], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=batch)


# ---------------------------------------------------------------- building and restoring


def build(cfg: Config, device: torch.device, steps_total: int, steps_per_epoch: int):
    """Online network (with the backbone's spec), target, optimiser and LR scheduler."""
    from medray.models import load_backbone

    backbone = load_backbone(cfg.backbone, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # identical heads on every rank (DDP also broadcasts rank 0's)
    online = OnlineNetwork(backbone.model, backbone.spec.dim, cfg.hidden_dim, cfg.proj_dim)
    online.train()
    target = TargetNetwork(online).train()
    o = cfg.optim
    opt = make_optimizer(o.name, online.parameters(), o.lr, o.momentum, o.weight_decay)
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps_total, warmup, o.min_lr_ratio)
    )
    return backbone.spec, online.to(device), target.to(device), opt, sched


def restore(online, target, opt, sched) -> Progress:
    """Load Ray Train's latest checkpoint, if any, into the modules; its progress."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return Progress()
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    online.load_state_dict(state["online"])
    target.load_state_dict(state["target"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return Progress(state["epoch"], state["step"], state["history"], state["knn_initial"])


def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Every rank reports (a barrier); rank 0 passes the checkpoint it wrote."""
    import ray.train
    from ray.train import Checkpoint

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------- data and kNN


def make_loader(cfg: Config, uris: list[str], rank: int, world: int, spec, on_device: bool):
    """DataLoader of this worker's rows: uint8 batches (device augmentation) or view pairs."""
    transform = None
    if not on_device:
        transform = TwoViews(cfg.augment.preset, cfg.image_size, spec.mean, spec.std)
    data = ImageRows(uris, cfg.image_size, transform)
    sampler = EpochSampler(len(uris), cfg.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
        num_workers=cfg.loader_workers, persistent_workers=cfg.loader_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )  # fmt: skip
    return loader, sampler


def knn_set(cfg: Config, manifest) -> tuple[torch.Tensor, np.ndarray] | None:
    """Decoded uint8 (N, 3, S, S) labelled val images and their (N, L) label matrix."""
    from medray.metrics import label_matrix

    rows = knn_subset(manifest, cfg.knn_max_images, cfg.seed)
    images, labels = [], []
    for uri, labs in zip(rows["uri"], rows["labels"], strict=True):
        try:
            images.append(torch.from_numpy(load_pixels(uri, cfg.image_size)).permute(2, 0, 1))
            labels.append(labs)
        except Exception as exc:  # unreadable: left out of the kNN set
            log.warning("pretrain: kNN set skips %s: %s", uri, exc)
    if len(images) < 2:
        return None
    return torch.stack(images), label_matrix(labels)[0]


@torch.no_grad()
def knn_accuracy(backbone: nn.Module, data, spec, device, k: int) -> float | None:
    """Leave-one-out kNN accuracy of the L2-normalised backbone features (eval mode)."""
    from medray.metrics import loo_knn_accuracy

    if data is None:
        return None
    images, labels = data
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    was_training = backbone.training
    backbone.eval()
    feats = []
    for chunk in images.split(128):
        x = (chunk.to(device).float() / 255.0 - mean) / std
        feats.append(nn.functional.normalize(backbone(x).float(), dim=1).cpu())
    backbone.train(was_training)
    emb = torch.cat(feats).numpy()
    return round(loo_knn_accuracy(emb, labels, min(k, len(emb) - 1)), 4)


# ---------------------------------------------------------------- training


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def byol_step(online, target, views, device) -> torch.Tensor:
    """Both views through the online network in one batch, and through the target."""
    v1, v2 = (v.to(device, non_blocking=True) for v in views)
    x = torch.cat([v1, v2])
    with autocast(device):
        _, p = online(x)
        with torch.no_grad():
            z = target(x)
    p1, p2 = p.chunk(2)
    z1, z2 = z.chunk(2)
    return byol_loss(p1, p2, z1, z2)


def maybe_fail(cfg: Config, run_dir: str, epoch: int, i: int, steps: int, rank: int, world: int):
    """Test-only: raise once per run name in the last worker halfway through an epoch."""
    if cfg.debug.fail_at_epoch != epoch or i != steps // 2 or rank != world - 1:
        return
    marker = storage.join(run_dir, FAIL_MARKER)
    if storage.exists(marker):
        return
    storage.write_text(marker, f"epoch {epoch} step {i}\n")
    raise InjectedFailure(f"injected failure at epoch {epoch}, step {i} of {steps}, rank {rank}")


@dataclass
class Run:
    """Everything one worker needs while training."""

    cfg: Config
    online: nn.Module
    target: TargetNetwork
    opt: torch.optim.Optimizer
    sched: Any
    loader: Any
    sampler: EpochSampler
    augment: BatchTwoViews | None
    device: torch.device
    logger: Logger
    steps_total: int
    rank: int
    world: int
    run_dir: str


def train_epoch(r: Run, epoch: int, progress: Progress) -> dict[str, float]:
    """One pass over this worker's rows; returns mean loss, images/s and skipped draws."""
    r.sampler.set_epoch(epoch)
    steps, losses, skipped = len(r.loader), [], 0
    t_epoch = t_last = time.perf_counter()
    for i, (batch, skips) in enumerate(r.loader):
        maybe_fail(r.cfg, r.run_dir, epoch, i, steps, r.rank, r.world)
        skipped += int(skips.sum())
        if r.augment is not None:
            batch = r.augment(batch.to(r.device, non_blocking=True))
        loss = byol_step(r.online, r.target, batch, r.device)
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        r.opt.step()
        r.sched.step()
        tau = tau_schedule(progress.step, r.steps_total, r.cfg.tau_base)
        ema_update(r.target, unwrap(r.online), tau)
        progress.step += 1
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        if progress.step % r.cfg.log_every == 0:
            rate = r.cfg.batch_size * r.world / max(now - t_last, 1e-9)
            lr = r.opt.param_groups[0]["lr"]
            r.logger.log({"loss": losses[-1], "lr": lr, "tau": tau, "images_per_s": rate},
                         progress.step)  # fmt: skip
        t_last = now
    seconds = time.perf_counter() - t_epoch
    return {
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "images_per_s": round(steps * r.cfg.batch_size * r.world / max(seconds, 1e-9), 2),
        "skipped": skipped,
        "epoch_s": round(seconds, 2),
    }


def checkpoint_state(r: Run, progress: Progress) -> dict[str, Any]:
    return {
        "online": unwrap(r.online).state_dict(),
        "target": r.target.state_dict(),
        "optimizer": r.opt.state_dict(),
        "scheduler": r.sched.state_dict(),
        "epoch": progress.epoch,
        "step": progress.step,
        "history": progress.history,
        "knn_initial": progress.knn_initial,
    }


def setup(loop_config: dict[str, Any]) -> tuple[Run, Progress, Any, Any]:
    """Build the worker's run from the driver's config; restore the latest checkpoint."""
    import ray.train
    import ray.train.torch

    from medray.data.manifest import read_manifest

    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    manifest = read_manifest(cfg.workdir)
    uris = train_uris(manifest)
    steps_per_epoch = (len(uris) // world) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(uris)} train images over {world} workers: < batch_size {cfg.batch_size}"
        )
    steps_total = steps_per_epoch * cfg.epochs
    spec, online, target, opt, sched = build(cfg, device, steps_total, steps_per_epoch)
    progress = restore(online, target, opt, sched)
    torch.manual_seed(cfg.seed * 1000 + rank * 100 + progress.epoch)  # augmentations differ
    on_device = cfg.augment.where == "device" or (
        cfg.augment.where == "auto" and device.type == "cuda"
    )
    loader, sampler = make_loader(cfg, uris, rank, world, spec, on_device)
    augment = None
    if on_device:
        augment = BatchTwoViews(cfg.augment.preset, cfg.image_size, spec.mean, spec.std)
    logger = Logger(loop_config["mlflow_uri"], loop_config["mlflow_run_id"], rank == 0)
    online = ray.train.torch.prepare_model(online)
    r = Run(cfg, online, target, opt, sched, loader, sampler, augment, device, logger,
            steps_total, rank, world, loop_config["run_dir"])  # fmt: skip
    knn = knn_set(cfg, manifest) if rank == 0 and cfg.knn_max_images else None
    return r, progress, spec, knn


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: train the remaining epochs; rank 0 returns the history."""
    r, progress, spec, knn = setup(loop_config)
    run_id = loop_config["mlflow_run_id"]
    start_epoch = progress.epoch
    r.logger.log({"start_epoch": start_epoch}, progress.step)
    if progress.epoch == 0 and progress.knn_initial is None and r.rank == 0:
        progress.knn_initial = knn_accuracy(
            unwrap(r.online).backbone, knn, spec, r.device, r.cfg.knn_k
        )
        r.logger.log({"knn_acc": progress.knn_initial}, 0)
    skipped = 0
    for epoch in range(progress.epoch, r.cfg.epochs):
        stats = train_epoch(r, epoch, progress)
        skipped += stats["skipped"]
        acc = None
        if r.rank == 0:
            acc = knn_accuracy(unwrap(r.online).backbone, knn, spec, r.device, r.cfg.knn_k)
        progress.epoch = epoch + 1
        progress.history.append({"epoch": epoch, **stats, "knn_acc": acc, "step": progress.step,
                                 "mlflow_run_id": run_id})  # fmt: skip
        r.logger.log({"epoch_loss": stats["loss"], "epoch_images_per_s": stats["images_per_s"],
                      "skipped": stats["skipped"]}, epoch)  # fmt: skip
        r.logger.log({"knn_acc": acc}, epoch + 1)  # step 0 is the starting backbone
        state = checkpoint_state(r, progress) if r.rank == 0 else None
        report({"epoch": epoch, "loss": stats["loss"], "knn_acc": acc}, state)
    trained = [h["epoch"] for h in progress.history if h.get("mlflow_run_id") == run_id]
    return {"history": progress.history, "start_epoch": start_epoch, "epochs_trained": trained,
            "step": progress.step, "knn_initial": progress.knn_initial, "skipped": skipped}  # fmt: skip
