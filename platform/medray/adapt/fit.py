"""The math of retrieval adapters: plain functions over arrays and tensors (no Ray, no I/O).

An adapter maps a backbone's L2-normalised embeddings (N, D) to the space the index is built
in, (N, d) and L2-normalised again, so cosine similarity stays the score everywhere.

- PCA whitening (unsupervised, learned on the archive): centre, rotate onto the principal
  axes, scale each by 1/sqrt(eigenvalue + shrinkage). Jegou & Chum, "Negative evidences and
  co-occurrences in image retrieval" (ECCV 2012): whitening down-weights the directions
  every image shares (here: "this is a chest X-ray") that dominate raw cosine similarity.
- A projection head (supervised, when labels exist): Linear-BN-ReLU-Linear trained on the
  train split with a proxy-based normalised-softmax loss (one learnable proxy per label;
  Movshovitz-Attias et al., "No Fuss Distance Metric Learning using Proxies", ICCV 2017;
  Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning", BMVC 2019).
  Supervised contrastive (Khosla et al., 2020) is the alternative; the adapt stage fits
  both and keeps the one that scores better on the dataset's val rows (on the shared chest
  X-rays they are within 0.01 of each other, bench/quality.py). Batches are class-balanced
  so a 9:1 archive does not teach "everything is the majority class". Multi-label data: one sigmoid per proxy (BCE), rows without
  labels pull away from every proxy.
- Query expansion (alpha-QE, Radenovic et al., "Fine-tuning CNN image retrieval with no
  human annotation", TPAMI 2018): the query is replaced by the normalised, similarity-
  weighted mean of itself and its top-n neighbours, then searched again.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------- whitening


def fit_whitening(
    x: np.ndarray, dim: int | None = None, shrinkage: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening of `x` (N, D): (mean (D,), projection (D, d)).

    `dim` keeps the d strongest axes (None: all that the data spans). `shrinkage` is added to
    every eigenvalue as a fraction of their mean, so near-empty axes (noise) are not blown up
    to the same weight as real ones."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / max(len(x) - 1, 1)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    rank = int(min(len(x) - 1, x.shape[1]))
    d = min(dim or rank, rank)
    if d < 1:
        raise ValueError(f"whitening needs at least 2 vectors, got {len(x)}")
    eps = shrinkage * float(eigval[:d].mean()) + 1e-12
    proj = eigvec[:, :d] / np.sqrt(eigval[:d] + eps)
    return mean.astype(np.float32), proj.astype(np.float32)


def apply_linear(x: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """(x - mean) @ proj, L2-normalised."""
    return l2_normalize((np.asarray(x, dtype=np.float32) - mean) @ proj)


# ---------------------------------------------------------------- projection head


class ProjectionHead(nn.Module):
    """Linear-BN-ReLU-Dropout-Linear to `out_dim`, L2-normalised output; one proxy per label."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, n_labels: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )
        self.proxies = nn.Parameter(torch.randn(n_labels, out_dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=1)


def proxy_loss(
    z: torch.Tensor, targets: torch.Tensor, proxies: torch.Tensor, scale: float, multi_label: bool
) -> torch.Tensor:
    """Normalised-softmax proxy loss: cosine(z, proxy) x scale as logits. `targets` is
    (B,) class indices, or (B, L) 0/1 for multi-label (independent sigmoids)."""
    logits = scale * z @ nn.functional.normalize(proxies, dim=1).T
    if multi_label:
        return nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
    return nn.functional.cross_entropy(logits, targets)


def supcon_loss(z: torch.Tensor, groups: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over one batch of normalised `z`;
    rows with the same `groups` value are positives. Kept for the benchmark's comparison."""
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -1e9)
    pos = (groups[:, None] == groups[None, :]) & ~eye
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -((log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)).mean()


def balanced_batch(groups: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one batch with (about) the same number of rows from every group."""
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    per = max(1, batch_size // len(members))
    return np.concatenate([rng.choice(m, per, replace=len(m) < per) for m in members])


def label_groups(targets: np.ndarray) -> np.ndarray:
    """One integer per distinct target row (class index, or label set for multi-label)."""
    t = np.asarray(targets)
    if t.ndim == 1:
        return t.astype(np.int64)
    return np.unique(t, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def fit_projection(
    x: np.ndarray,
    targets: np.ndarray,
    *,
    out_dim: int = 128,
    hidden: int = 512,
    dropout: float = 0.2,
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    scale: float = 20.0,
    loss: str = "proxy",
    seed: int = 0,
) -> tuple[ProjectionHead, np.ndarray]:
    """Train a projection head on centred embeddings `x` (N, D) with `targets` ((N,) class
    indices or (N, L) multi-hot); returns the eval-mode head and the centring mean.

    An epoch is N // batch_size class-balanced batches (at least one)."""
    multi_label = np.asarray(targets).ndim == 2
    n_labels = targets.shape[1] if multi_label else int(np.max(targets)) + 1
    groups = label_groups(targets)
    if len(np.unique(groups)) < 2:
        raise ValueError("a projection head needs labelled rows of at least 2 classes")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ProjectionHead(x.shape[1], hidden, out_dim, n_labels, dropout)
    mean = np.asarray(x, dtype=np.float32).mean(axis=0)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32) - mean)
    tt = torch.as_tensor(np.asarray(targets), dtype=torch.float32 if multi_label else torch.long)
    gt = torch.as_tensor(groups)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, len(x) // batch_size)
    head.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: thread hand-offs cost more than they save
    try:
        _train_steps(head, opt, xt, tt, gt, groups, epochs, steps, batch_size, rng, gen,
                     loss, scale, multi_label)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return head.eval(), mean


def _train_steps(head, opt, xt, tt, gt, groups, epochs, steps, batch_size, rng, gen, loss,
                 scale, multi_label) -> None:  # fmt: skip
    for _ in range(epochs):
        for _ in range(steps):
            b = torch.as_tensor(balanced_batch(groups, batch_size, rng))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                z = head(xt[b])  # dropout draws from the forked, seeded generator
            if loss == "supcon":
                value = supcon_loss(z, gt[b])
            else:
                value = proxy_loss(z, tt[b], head.proxies, scale, multi_label)
            opt.zero_grad()
            value.backward()
            opt.step()


def apply_projection(x: np.ndarray, head: nn.Module, mean: np.ndarray) -> np.ndarray:
    """Embeddings through an eval-mode projection head: (N, d) float32, L2-normalised."""
    if len(x) == 0:
        return np.zeros((0, head.net[-1].out_features), dtype=np.float32)
    with torch.inference_mode():
        z = head(torch.as_tensor(np.asarray(x, dtype=np.float32) - mean))
    return z.numpy().astype(np.float32, copy=False)


# ---------------------------------------------------------------- query expansion


def expand_queries(
    q: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float = 3.0
) -> np.ndarray:
    """alpha-QE: normalise(q + sum_i max(s_i, 0)^alpha * x_i) over each query's top-n
    neighbour vectors `neighbours` (Q, n, d) with similarities `scores` (Q, n)."""
    w = np.clip(np.asarray(scores, dtype=np.float32), 0.0, None) ** alpha
    w = np.where(np.isfinite(w), w, 0.0)
    expanded = np.asarray(q, dtype=np.float32) + np.einsum("qn,qnd->qd", w, neighbours)
    return l2_normalize(expanded)
