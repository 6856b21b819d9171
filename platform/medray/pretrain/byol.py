"""BYOL as plain modules and functions (Grill et al. 2020, "Bootstrap your own latent").

"BYOL's goal is to learn a representation y_theta which can then be used for downstream
tasks. [...] it uses two neural networks [...] the online and target networks. The
online network is defined by a set of weights theta and is comprised of three stages: an
encoder f_theta, a projector g_theta and a predictor q_theta. The target network has the
same architecture as the online network, but uses a different set of weights xi [...] an
exponential moving average of the online parameters theta."

Defaults follow the histology image query paper in DESIGN.md: projection 512, hidden 2048,
EMA base 0.99 (increased to 1 by a cosine schedule, as in BYOL), SGD lr 3e-4 momentum 0.9.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear: BYOL's projector g and predictor q.

    "The projection MLP g_theta [...] consisting in a linear layer with output size 4096
    followed by batch normalization, rectified linear units (ReLU), and a final linear layer
    with output dimension 256" (BYOL, 3.3); the paper in DESIGN.md uses 2048 / 512."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class OnlineNetwork(nn.Module):
    """Encoder f (a `num_classes=0` timm backbone: (B,3,S,S) -> (B,D)), projector g and
    predictor q. `forward` returns (projection z, prediction p) for a batch."""

    def __init__(self, backbone: nn.Module, dim: int, hidden: int = 2048, out: int = 512) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = MLPHead(dim, hidden, out)
        self.predictor = MLPHead(out, hidden, out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)


class TargetNetwork(nn.Module):
    """Encoder + projector of the target branch: an EMA copy of the online ones, no gradients."""

    def __init__(self, online: OnlineNetwork) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(online.backbone)
        self.projector = copy.deepcopy(online.projector)
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 - 2 cos(p, z) = || p/|p| - z/|z| ||^2 (BYOL eq. 2); z gets no gradient."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return 2.0 - 2.0 * (p * z).sum(dim=-1)


def byol_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """Symmetric BYOL loss, batch mean: view 1's prediction regresses view 2's target
    projection and vice versa ("we symmetrize the loss [...] by separately feeding v' to
    the online network and v to the target network"). Range [0, 8]; 0 when each prediction
    points the same way as the other view's target."""
    return (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau * xi + (1 - tau) * theta for every parameter the two modules share by name;
    buffers (BatchNorm running statistics) are copied from the online network."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    src = dict(online.named_parameters())
    for name, t in target.named_parameters():
        t.mul_(tau).add_(src[name].detach().to(t.dtype), alpha=1.0 - tau)
    bufs = dict(online.named_buffers())
    for name, b in target.named_buffers():
        b.copy_(bufs[name])


def tau_schedule(step: int, total_steps: int, base: float = 0.99) -> float:
    """BYOL's target decay: tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2, from `base` at
    step 0 to 1 at the last step."""
    if total_steps <= 0:
        return 1.0
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate: linear warmup over `warmup_steps` (from
    1/warmup), then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def delayed_lr_factor(
    step: int, start: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0
) -> float:
    """`lr_factor` of a schedule that begins at step `start` and is 0 before it: the
    backbone's, held still while the fresh projector and predictor learn first."""
    if step < start:
        return 0.0
    return lr_factor(step - start, total_steps - start, warmup_steps, min_ratio)


def param_groups(online: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict]:
    """Optimiser groups: the projector and predictor at `lr` (role `heads`), the backbone at
    `lr * backbone_lr_scale` (role `backbone`; LARS splits each group in two)."""
    heads = [p for n, p in online.named_parameters() if not n.startswith("backbone.")]
    return [
        {"params": heads, "lr": lr, "role": "heads"},
        {
            "params": list(online.backbone.parameters()),
            "lr": lr * backbone_lr_scale,
            "role": "backbone",
        },
    ]


def lars_groups(groups: list[dict], weight_decay: float) -> list[dict]:
    """Each group split for LARS as BYOL trains: matrices adapted (trust ratio) and decayed,
    one-dimensional tensors (biases, BatchNorm) neither; every part keeps its group's keys."""
    out = []
    for group in groups:
        params = list(group["params"])
        rest = {k: v for k, v in group.items() if k != "params"}
        matrices = [p for p in params if p.ndim > 1]
        vectors = [p for p in params if p.ndim <= 1]
        out.append({**rest, "params": matrices, "weight_decay": weight_decay, "always_adapt": True})
        out.append({**rest, "params": vectors, "weight_decay": 0.0, "always_adapt": False})
    return [g for g in out if g["params"]]


def make_optimizer(
    name: str, params, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """`sgd` (the paper's: lr 3e-4, momentum 0.9), `lars` or `adamw`."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":  # timm's: trust ratio 0.001 * ||w|| / ||g||, as in You et al. 2017
        from timm.optim import Lars

        groups = params if isinstance(params[0], dict) else [{"params": params}]
        return Lars(lars_groups(groups, weight_decay), lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optim.name: {name!r} is not sgd, lars or adamw")


def resolve_bn(mode: str, weights: str) -> str:
    """`auto` -> `train` from random weights (running statistics must be learned) and
    `frozen_stats` from any trained weights; `frozen_stats` and `train` stay as they are."""
    if mode == "auto":
        return "train" if weights == "random" else "frozen_stats"
    if mode not in ("frozen_stats", "train"):
        raise ValueError(f"bn: {mode!r} is not auto, frozen_stats or train")
    return mode


def freeze_bn_stats(module: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of `module` in eval mode: it normalises with its running
    statistics and no longer updates them, while its affine weight and bias still train.
    Call after every `.train()` on an enclosing module (which sets them back)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


def set_train_mode(online: nn.Module, target: nn.Module, backbone_bn: str) -> None:
    """Both networks in train mode (the projector and predictor BatchNorms use batch
    statistics, as BYOL needs); with `frozen_stats` the backbones' BatchNorms stay in eval
    mode, keeping the starting weights' running statistics (re-estimating them on small
    X-rays costs ImageNet features more than BYOL gains: docs in the pretrain config)."""
    if backbone_bn not in ("frozen_stats", "train"):
        raise ValueError(f"backbone BatchNorm mode {backbone_bn!r}: resolve_bn it first")
    online.train()  # the DDP wrapper too, when there is one
    target.train()
    if backbone_bn == "frozen_stats":
        freeze_bn_stats(getattr(online, "module", online).backbone)
        freeze_bn_stats(target.backbone)
