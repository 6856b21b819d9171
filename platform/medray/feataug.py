"""Feature-space augmentation for heads trained on frozen embeddings.

Plain numpy functions over a batch of embeddings `x` (N, D) and float targets `y` (N, L)
(one-hot for multi-class, multi-hot for multi-label, all-zero = "no finding"):

- Gaussian noise around each embedding.
- Interpolation toward and extrapolation away from same-class nearest neighbours,
  after DeVries & Taylor, "Dataset Augmentation in Feature Space" (ICLR workshop 2017):
  "for each sample in the dataset we find its K intra-class nearest neighbours ... for
  each pair of neighbouring context vectors, a new context vector can then be generated
  using interpolation c' = (c_k - c_j) lambda + c_j ... or extrapolation
  c' = (c_j - c_k) lambda + c_j" (lambda = 0.5 in the paper).
- Mixup in embedding space (Zhang et al., "mixup: Beyond Empirical Risk Minimization",
  ICLR 2018): x~ = l x_i + (1 - l) x_j, y~ = l y_i + (1 - l) y_j, l ~ Beta(alpha, alpha).

Neighbours are searched within the batch handed in, so the same code runs on one shard
of an archive that no single machine holds; with a batch as large as the data set it is
exactly the paper's recipe. "Same class" means the same target row (the same label set
for multi-label data). A target of -1 (an unknown label, `heads.data.UNKNOWN`) stays -1:
copies keep it, and a mixup cell is unknown when either of its two sources is.
"""

from __future__ import annotations

import numpy as np

from medray.config import Section


class FeatAugConfig(Section):
    """Which feature-space augmentations a head's training batches get (each on/off)."""

    noise: bool = False
    """Append a copy of the batch with Gaussian noise added."""
    noise_std: float = 0.5
    """Noise std as a fraction of each dimension's std in the batch."""
    interpolate: bool = False
    """Append points between each embedding and its same-class nearest neighbours."""
    extrapolate: bool = False
    """Append points beyond each embedding, away from its same-class nearest neighbours."""
    neighbours: int = 1
    """Same-class nearest neighbours per embedding (K in DeVries & Taylor)."""
    lam: float = 0.5
    """Step toward/away from the neighbour (lambda in DeVries & Taylor; 0.5 there)."""
    mixup: bool = False
    """Replace the (expanded) batch by mixup of random pairs, with soft targets."""
    mixup_alpha: float = 0.2
    """Beta(alpha, alpha) of the mixup weight."""

    def any(self) -> bool:
        return self.noise or self.interpolate or self.extrapolate or self.mixup


def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """`x` plus N(0, (std * per-dimension std of x)^2); a single row uses unit scale."""
    scale = x.std(axis=0, keepdims=True) if len(x) > 1 else np.ones((1, x.shape[1]), x.dtype)
    return (x + rng.standard_normal(x.shape).astype(x.dtype) * std * scale).astype(x.dtype)


def same_class_neighbours(
    x: np.ndarray, y: np.ndarray, k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (anchor, neighbour): each row's `k` nearest rows (Euclidean) with the same
    target row. Rows alone in their class get no pair."""
    _, group = np.unique(np.asarray(y), axis=0, return_inverse=True)
    group = group.reshape(-1)
    anchors: list[np.ndarray] = []
    neighbours: list[np.ndarray] = []
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        if len(idx) < 2:
            continue
        pts = x[idx].astype(np.float64)
        sq = (pts**2).sum(1)
        dist = sq[:, None] + sq[None, :] - 2 * pts @ pts.T
        np.fill_diagonal(dist, np.inf)
        kk = min(k, len(idx) - 1)
        nearest = np.argsort(dist, axis=1)[:, :kk]
        anchors.append(np.repeat(idx, kk))
        neighbours.append(idx[nearest].reshape(-1))
    if not anchors:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(anchors), np.concatenate(neighbours)


def interpolate(
    x: np.ndarray, y: np.ndarray, lam: float = 0.5, k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """New points c' = (c_k - c_j) * lam + c_j between each row and its same-class neighbours."""
    j, n = same_class_neighbours(x, y, k)
    return ((x[n] - x[j]) * lam + x[j]).astype(x.dtype), y[j]


def extrapolate(
    x: np.ndarray, y: np.ndarray, lam: float = 0.5, k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """New points c' = (c_j - c_k) * lam + c_j beyond each row, away from its neighbours."""
    j, n = same_class_neighbours(x, y, k)
    return ((x[j] - x[n]) * lam + x[j]).astype(x.dtype), y[j]


def mixup(
    x: np.ndarray, y: np.ndarray, alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Convex mixes of random pairs with one Beta(alpha, alpha) weight per row; soft targets.
    A cell unknown (< 0) in either source is unknown (-1) in the mix."""
    lam = rng.beta(alpha, alpha, size=(len(x), 1)).astype(np.float32)
    perm = rng.permutation(len(x))
    xm = lam * x + (1 - lam) * x[perm]
    ym = lam * y + (1 - lam) * y[perm]
    unknown = (y < 0) | (y[perm] < 0)
    if unknown.any():
        ym = np.where(unknown, -1.0, ym)
    return xm.astype(x.dtype), ym.astype(y.dtype)


def augment_batch(
    x: np.ndarray, y: np.ndarray, cfg: FeatAugConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The batch plus every enabled synthetic copy (interpolated, extrapolated, noisy);
    then mixup over the result when enabled. Targets stay float (N, L)."""
    if not cfg.any() or len(x) == 0:
        return x, y
    xs, ys = [x], [y]
    if cfg.interpolate:
        xi, yi = interpolate(x, y, cfg.lam, cfg.neighbours)
        xs.append(xi)
        ys.append(yi)
    if cfg.extrapolate:
        xe, ye = extrapolate(x, y, cfg.lam, cfg.neighbours)
        xs.append(xe)
        ys.append(ye)
    if cfg.noise:
        xs.append(gaussian_noise(x, cfg.noise_std, rng))
        ys.append(y)
    xa, ya = np.concatenate(xs), np.concatenate(ys)
    if cfg.mixup:
        xa, ya = mixup(xa, ya, cfg.mixup_alpha, rng)
    return xa, ya
