"""The per-worker BYOL loop that Ray Train runs (one copy per worker, DDP between them).

Each worker: builds online + target networks from `cfg.backbone`, restores the latest
checkpoint when Ray Train hands one over (a restart after a failure, or a re-run with the
same name), trains its slice of the train split for the remaining epochs, and after every
epoch reports a checkpoint (rank 0 writes it; every rank calls `report`, a barrier).
Rank 0 also scores the encoders by kNN accuracy (the start as epoch 0, then the online and
target networks after every epoch), keeps a copy of the best one for the export, prints a
progress line per epoch, and logs loss, lr, tau and images/s per step and the curve per
epoch (step = epoch) to the driver's MLflow run.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medray import storage
from medray.pretrain import STATE_FILE, Config, resolve_optim
from medray.pretrain.augment import BatchTwoViews, TwoViews
from medray.pretrain.byol import (
    OnlineNetwork,
    TargetNetwork,
    byol_loss,
    delayed_lr_factor,
    ema_update,
    lr_factor,
    make_optimizer,
    param_groups,
    resolve_bn,
    set_train_mode,
    tau_schedule,
)
from medray.pretrain.dataset import EpochSampler, ImageRows, subset_uris, train_uris
from medray.pretrain.knn import knn_accuracy, knn_set
from medray.pretrain.monitor import (
    Best,
    best_epoch,
    eta_seconds,
    export_note,
    progress_line,
    start_knn,
)

log = logging.getLogger(__name__)
FAIL_MARKER = "injected_failure"
HOLD_MARKER = "hold_pid"


class InjectedFailure(RuntimeError):
    """The test-only failure of `debug.fail_at_epoch`."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the module itself)."""
    return model.module if hasattr(model, "module") else model


@dataclass
class Progress:
    """What a checkpoint carries besides the weights."""

    epoch: int = 0
    """Epochs done (the next one to train, 0-based)."""
    step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    """One row per scored epoch (monitor.py); row 0 is the start."""
    best: dict[str, Any] | None = None
    """The monitor's best encoder: epoch, network, knn and its backbone weights (CPU)."""


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
    # BYOL trains the model's own pooled output (num_features), whatever pooling the spec
    # names for embedding later (a multi-scale spec.dim is wider than what the model returns).
    dim = int(getattr(backbone.model, "num_features", backbone.spec.dim))
    online = OnlineNetwork(backbone.model, dim, cfg.hidden_dim, cfg.proj_dim)
    target = TargetNetwork(online)
    set_train_mode(online, target, resolve_bn(cfg.bn, cfg.backbone.weights))
    o = resolve_optim(cfg.optim, cfg.backbone.weights)
    groups = param_groups(online, o.lr, o.backbone_lr_scale)
    opt = make_optimizer(o.name, groups, o.lr, o.momentum, o.weight_decay)
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    still = min(int(round(o.frozen_backbone_epochs * steps_per_epoch)), steps_total)
    factor = {
        "heads": lambda s: lr_factor(s, steps_total, warmup, o.min_lr_ratio),
        "backbone": lambda s: delayed_lr_factor(s, still, steps_total, warmup, o.min_lr_ratio),
    }
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor[g["role"]] for g in opt.param_groups])
    return backbone.spec, online.to(device), target.to(device), opt, sched


def group_lr(opt: torch.optim.Optimizer, role: str) -> float:
    """The learning rate of the first optimiser group with this role (heads / backbone)."""
    return next(g["lr"] for g in opt.param_groups if g["role"] == role)


def newest_saved_state(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest `checkpoint_*` under the run directory whose state loads whole, and where.

    Ray Train V2 uploads a reported checkpoint at once, but registers it only when its
    controller next polls the workers (every ~2 s): a worker killed in between leaves the
    checkpoint on storage yet `get_checkpoint()` hands back the one before, and a whole epoch
    would be trained again. A state cut short by the kill does not load and is skipped."""
    found = [u for u in storage.listdir(run_dir)  # checkpoint_<date and time>, not the snapshot
             if re.match(r"checkpoint_\d", u.rstrip("/").replace("\\", "/").split("/")[-1])]  # fmt: skip
    for uri in sorted(found, reverse=True):  # newest first
        state_uri = storage.join(uri, STATE_FILE)
        try:
            data = storage.read_bytes(state_uri)
            return uri, torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except storage.StorageUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - absent or cut short: try the one before
            log.warning(
                "pretrain: %s does not load (%s): trying an older checkpoint", state_uri, exc
            )
    return None


def restore(online, target, opt, sched, run_dir: str) -> Progress:
    """Load the latest checkpoint, if any, into the modules; its progress. The latest is
    Ray Train's, or a newer one it had not registered yet (`newest_saved_state`)."""
    import ray.train

    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    saved = newest_saved_state(run_dir)
    if saved is not None and (state is None or saved[1]["step"] > state["step"]):
        handed = f"epoch {state['epoch']}" if state is not None else "none"
        log.warning("pretrain: resuming from %s (epoch %d), newer than the checkpoint Ray "
                    "Train handed back (%s)", saved[0], saved[1]["epoch"], handed)  # fmt: skip
        state = saved[1]
    if state is None:
        return Progress()
    online.load_state_dict(state["online"])
    target.load_state_dict(state["target"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return Progress(state["epoch"], state["step"], state.get("curve", []), state.get("best"))


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


# ---------------------------------------------------------------- data


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


def maybe_hold(cfg: Config, run_dir: str, epoch: int, i: int, steps: int, rank: int, world: int):
    """Test-only: once per run name, the last worker stops halfway through an epoch, writes
    its pid to <run dir>/hold_pid and waits `debug.hold_s` seconds for a test to kill it."""
    if cfg.debug.hold_at_epoch != epoch or i != steps // 2 or rank != world - 1:
        return
    marker = storage.join(run_dir, HOLD_MARKER)
    if storage.exists(marker):
        return
    storage.write_text(marker, f"{os.getpid()}\n")
    deadline = time.monotonic() + cfg.debug.hold_s
    while time.monotonic() < deadline:
        time.sleep(0.1)


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
        maybe_hold(r.cfg, r.run_dir, epoch, i, steps, r.rank, r.world)
        skipped += int(skips.sum())
        if r.augment is not None:
            batch = r.augment(batch.to(r.device, non_blocking=True))
        loss = byol_step(r.online, r.target, batch, r.device)
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        r.opt.step()
        lr, lr_backbone = group_lr(r.opt, "heads"), group_lr(r.opt, "backbone")  # this step's
        r.sched.step()
        tau = tau_schedule(progress.step, r.steps_total, r.cfg.tau_base)
        ema_update(r.target, unwrap(r.online), tau)
        progress.step += 1
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        if progress.step % r.cfg.log_every == 0:
            rate = r.cfg.batch_size * r.world / max(now - t_last, 1e-9)
            r.logger.log({"loss": losses[-1], "lr": lr, "lr_backbone": lr_backbone, "tau": tau,
                          "images_per_s": rate}, progress.step)  # fmt: skip
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
        "curve": progress.curve,
        "best": progress.best,
    }


def setup(loop_config: dict[str, Any]) -> tuple[Run, Progress, Any, Any]:
    """Build the worker's run from the driver's config; restore the latest checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    from medray.data.manifest import read_manifest

    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    torch.set_num_threads(torch_threads(cpus, torch.get_num_threads()))
    manifest = read_manifest(cfg.workdir)
    uris = subset_uris(train_uris(manifest), cfg.max_train_images, cfg.seed)
    steps_per_epoch = (len(uris) // world) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(uris)} train images over {world} workers: < batch_size {cfg.batch_size}"
        )
    steps_total = steps_per_epoch * cfg.epochs
    spec, online, target, opt, sched = build(cfg, device, steps_total, steps_per_epoch)
    progress = restore(online, target, opt, sched, loop_config["run_dir"])
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
    set_train_mode(online, target, resolve_bn(cfg.bn, cfg.backbone.weights))
    r = Run(cfg, online, target, opt, sched, loader, sampler, augment, device, logger,
            steps_total, rank, world, loop_config["run_dir"])  # fmt: skip
    knn = knn_set(cfg, manifest) if rank == 0 and cfg.knn_max_images else None
    return r, progress, spec, knn


def torch_threads(reserved_cpus: float | None, current: int) -> int:
    """Torch threads for a worker: the whole CPUs Ray reserved for it (at least one), or
    the current setting when Ray reserved none (the loop running in the driver)."""
    if reserved_cpus is None:
        return current
    return max(1, math.floor(reserved_cpus))


def score(r: Run, knn, spec, network: str) -> float | None:
    """kNN accuracy of the online or target backbone (None without a kNN set)."""
    backbone = unwrap(r.online).backbone if network == "online" else r.target.backbone
    return knn_accuracy(backbone, knn, spec, r.device, r.cfg.knn_k)


def keep_if_best(r: Run, progress: Progress) -> Best | None:
    """The monitor's choice over the curve so far; when it is the newest row, a CPU copy of
    that backbone becomes `progress.best` (what the export will hold)."""
    best = best_epoch(progress.curve)
    if best is None or best.epoch != progress.curve[-1]["epoch"]:
        return best
    source = r.target.backbone if best.network == "target" else unwrap(r.online).backbone
    weights = {k: v.detach().cpu().clone() for k, v in source.state_dict().items()}
    progress.best = {"epoch": best.epoch, "network": best.network, "knn": best.knn,
                     "backbone": weights}  # fmt: skip
    return best


def log_row(r: Run, row: dict[str, Any]) -> None:
    """One curve row into MLflow with step = epoch (0: the start)."""
    keys = {"knn_online": "knn_online", "knn_target": "knn_target", "loss": "epoch_loss",
            "images_per_s": "epoch_images_per_s", "seconds": "epoch_seconds",
            "skipped": "skipped"}  # fmt: skip
    r.logger.log({name: row.get(key) for key, name in keys.items()}, row["epoch"])


def say(line: str) -> None:
    """A console line from rank 0; Ray forwards worker stdout to the driver's terminal.
    Written to the process's own stdout: Ray Train patches `print` into its logger and
    also tees it to stdout, which shows every line twice."""
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def score_start(r: Run, progress: Progress, knn, spec) -> None:
    """Epoch 0: the starting encoder, scored before any training step."""
    row = {"epoch": 0, "loss": None, "knn_online": score(r, knn, spec, "online"),
           "knn_target": None, "images_per_s": None, "seconds": 0.0, "step": 0}  # fmt: skip
    progress.curve.append(row)
    keep_if_best(r, progress)
    log_row(r, row)
    say(progress_line(row, r.cfg.epochs, None, 0.0))


def score_epoch(r: Run, progress: Progress, stats: dict, knn, spec, run_id: str) -> dict:
    """Rank 0 after an epoch: score the online (and target) encoder and add the curve row;
    returns the row (its `seconds` filled in by the caller, once the scoring is done)."""
    target = score(r, knn, spec, "target") if r.cfg.knn_target else None
    row = {"epoch": progress.epoch, "loss": stats["loss"],
           "knn_online": score(r, knn, spec, "online"), "knn_target": target,
           "images_per_s": stats["images_per_s"], "skipped": stats["skipped"],
           "step": progress.step, "mlflow_run_id": run_id}  # fmt: skip
    progress.curve.append(row)
    return row


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function: train the remaining epochs; rank 0 returns the curve."""
    r, progress, spec, knn = setup(loop_config)
    run_id, epochs = loop_config["mlflow_run_id"], r.cfg.epochs
    start_epoch = progress.epoch
    r.logger.log({"start_epoch": start_epoch}, progress.step)
    if r.rank == 0 and knn is not None and progress.epoch == 0 and not progress.curve:
        score_start(r, progress, knn, spec)
    skipped, took = 0, []
    for epoch in range(progress.epoch, epochs):
        t0 = time.perf_counter()
        stats = train_epoch(r, epoch, progress)
        skipped += stats["skipped"]
        progress.epoch = epoch + 1
        state = None
        if r.rank == 0:
            row = score_epoch(r, progress, stats, knn, spec, run_id)
            best = keep_if_best(r, progress)
            took.append(time.perf_counter() - t0)
            row["seconds"] = round(took[-1], 2)
            log_row(r, row)
            say(progress_line(row, epochs, best, eta_seconds(took, epochs - progress.epoch)))
            state = checkpoint_state(r, progress)
        report({"epoch": progress.epoch, "loss": stats["loss"]}, state)
    if r.rank == 0:
        say(f"pretrain: {export_note(best_epoch(progress.curve), start_knn(progress.curve))}")
    trained = [row["epoch"] for row in progress.curve if row.get("mlflow_run_id") == run_id]
    return {"curve": progress.curve, "start_epoch": start_epoch, "epochs_trained": trained,
            "step": progress.step, "skipped": skipped,
            "torch_threads": torch.get_num_threads()}  # fmt: skip
