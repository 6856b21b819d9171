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


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as BYOL
    trains at large batch: each tensor's update is scaled by
    `eta * ||w|| / (||g|| + weight_decay * ||w||)`. One-dimensional tensors (biases,
    BatchNorm) are neither scaled nor decayed, as in BYOL."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta}
        )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0
                    )
                    g = g.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def make_optimizer(
    name: str, params, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """`sgd` (the paper's: lr 3e-4, momentum 0.9), `lars` or `adamw`."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optim.name: {name!r} is not sgd, lars or adamw")
