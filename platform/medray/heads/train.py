"""Training a head: one plain loop (used in-process by tests and the benchmark) and its
Ray Train wrapper (a `TorchTrainer` per hyper-parameter setting; medray.heads.sweep runs
the settings as Ray Tune trials).

Loss: weighted cross-entropy with soft targets (multi-class; soft targets come from mixup)
or BCE-with-logits with per-label `pos_weight` (multi-label), averaged over the known
cells only: a target of `UNKNOWN` (-1, an uncertain label imported with `--uncertain
ignore`) adds nothing to the loss or its gradient. Early stopping on the
validation loss: the weights of the best epoch are kept, training stops after `patience`
epochs without improvement.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from medray.feataug import FeatAugConfig, augment_batch
from medray.heads.model import build_head

Batches = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE-with-logits (optional per-label `pos_weight`) averaged over the known cells:
    sum over cells with target >= 0 of the weighted BCE, divided by their count. Targets < 0
    (`UNKNOWN`) are masked out. With every cell known this is `nn.BCEWithLogitsLoss`."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = targets >= 0
        per_cell = nn.functional.binary_cross_entropy_with_logits(
            logits, targets.clamp(min=0), pos_weight=self.pos_weight, reduction="none"
        )
        return (per_cell * known).sum() / known.sum().clamp(min=1)


def make_loss(kind: str, weights: np.ndarray | None) -> Callable:
    """loss(logits, targets) for the task kind, with class weights when given. Multi-label:
    `MaskedBCEWithLogitsLoss` (unknown targets masked out); multi-class rows never carry an
    unknown label (`encode_targets` drops them)."""
    w = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32))
    if kind == "multiclass":
        return nn.CrossEntropyLoss(weight=w)
    return MaskedBCEWithLogitsLoss(pos_weight=w)


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Batches:
    """Shuffled mini-batches of in-memory arrays, reshuffled every epoch."""

    def epoch(e: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.random.default_rng(seed + e).permutation(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]

    return epoch


def val_loss(
    model: nn.Module, x: np.ndarray, y: np.ndarray, loss_fn: Callable, device: torch.device
) -> float:
    model.eval()
    with torch.no_grad():
        out = float(loss_fn(model(torch.as_tensor(x).to(device)), torch.as_tensor(y).to(device)))
    model.train()
    return out


def train_head(
    model: nn.Module,
    batches: Batches,
    val: tuple[np.ndarray, np.ndarray],
    params: dict[str, Any],
    report: Callable[[dict], None] = lambda m: None,
) -> tuple[nn.Module, list[dict]]:
    """Train `model` (possibly DDP-wrapped) with AdamW and early stopping on `val`.

    params: kind, lr, weight_decay, epochs, patience, class_weights (list or None),
    feataug (FeatAugConfig dict), seed. `report(metrics)` is called once per epoch on every
    worker (Ray Train needs the same number of calls everywhere). Returns the best-epoch
    weights of the unwrapped module and the per-epoch history.
    """
    torch.manual_seed(params["seed"])
    rng = np.random.default_rng(params["seed"])
    aug = FeatAugConfig(**(params.get("feataug") or {}))
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    loss_fn = make_loss(params["kind"], params.get("class_weights")).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"]
    )
    best, best_state, bad, history = float("inf"), copy.deepcopy(inner.state_dict()), 0, []
    model.train()
    for epoch in range(params["epochs"]):
        total, count = 0.0, 0
        for xb, yb in batches(epoch):
            xb, yb = augment_batch(xb, yb, aug, rng)
            opt.zero_grad()
            loss = loss_fn(model(torch.as_tensor(xb).to(device)), torch.as_tensor(yb).to(device))
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(xb), count + len(xb)
        vl = val_loss(model, *val, loss_fn, device)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": vl})
        report(history[-1])
        if vl < best - 1e-6:
            best, best_state, bad = vl, copy.deepcopy(inner.state_dict()), 0
        else:
            bad += 1
            if bad >= params["patience"]:
                break
    inner.load_state_dict(best_state)
    return inner, history


def new_module(params: dict[str, Any]) -> nn.Module:
    """A fresh head, its initial weights drawn from `params["seed"]` (not from whatever
    state the process's torch RNG is in)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.get("seed", 0))
        return build_head(
            params["arch"], params["in_dim"], params["out_dim"], params["hidden"], params["dropout"]
        )


def ray_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker loop: the train shard streamed from Ray Data, the whole val set."""
    import ray.train
    import ray.train.torch

    model = ray.train.torch.prepare_model(new_module(config))
    shard = ray.train.get_dataset_shard("train")
    # The held-out split: small, the same on every worker (copied: object-store arrays are
    # read-only).
    val = tuple(np.array(a) for a in ray.get(config["val_ref"]))

    def streamed(epoch: int):
        for b in shard.iter_batches(
            batch_size=config["batch_size"],
            batch_format="numpy",
            local_shuffle_buffer_size=config["batch_size"] * 4,
            local_shuffle_seed=config["seed"] + epoch,
        ):
            yield b["x"].astype(np.float32), b["y"].astype(np.float32)

    batches = streamed
    if config.get("cache_shard", True):
        # Each pass over a streamed shard starts a Ray Data execution (seconds); a worker's
        # shard of embeddings is small (1/num_workers of the split), so keep it after pass 1.
        x, y = collect_arrays(shard)
        batches = array_batches(
            x, y, config["batch_size"], config["seed"] + ray.train.get_context().get_world_rank()
        )

    # Per epoch only when a scheduler (ASHA) needs it: each report is a barrier across the
    # workers, which can cost more than an epoch of a small head.
    per_epoch = config.get("report_every_epoch", False)
    report = ray.train.report if per_epoch else (lambda m: None)
    module, history = train_head(model, batches, val, config, report=report)
    if not per_epoch:
        ray.train.report(
            {"epochs_run": len(history), "best_val_loss": min(h["val_loss"] for h in history)}
        )
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    return {"state": state, "history": history}


def collect_arrays(shard) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for b in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        xs.append(b["x"].astype(np.float32))
        ys.append(b["y"].astype(np.float32))
    return np.concatenate(xs), np.concatenate(ys)


def run_storage(root: str | None) -> str:
    """Where Ray Train keeps a trial's run state: under an s3:// workdir on a cluster (every
    node must reach it), else a local temp dir (heads report no checkpoints)."""
    if root and root.startswith("s3://"):
        return root.rstrip("/") + "/heads/_ray_train"
    return tempfile.mkdtemp(prefix="medray-heads-")


def fit_trial(
    name: str,
    train: Any,
    val_ref: Any,
    params: dict[str, Any],
    num_workers: int,
    cpus_per_worker: float,
    storage_path: str,
    gpus_per_worker: float = 0.0,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """One `TorchTrainer.fit()` for one hyper-parameter setting: `train` a Ray Dataset of
    {"x", "y"} split across workers, `val_ref` an object ref of (x, y) arrays every worker
    reads whole; `gpus_per_worker` > 0 trains on (a fraction of) a GPU, so small heads share
    one. Returns the best-epoch state dict (numpy) and the history."""
    import ray.train
    from ray.train.torch import TorchTrainer

    gpu = {"GPU": gpus_per_worker} if gpus_per_worker > 0 else {}
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={**params, "val_ref": val_ref},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=bool(gpu),
            resources_per_worker={"CPU": cpus_per_worker, **gpu},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks or [],
        ),  # fmt: skip
        datasets={"train": train},
    )
    result = trainer.fit()
    out = result.return_value
    if not out:
        raise RuntimeError(f"head trial {name}: the training loop returned nothing")
    return out
