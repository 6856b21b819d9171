"""The kNN monitor's measurement: labelled val images decoded once, and the leave-one-out kNN
accuracy of a backbone's L2-normalised features on them (rank 0, after every epoch)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from medray.pretrain import Config
from medray.pretrain.dataset import knn_subset, load_pixels

log = logging.getLogger(__name__)


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


def monitored_features(backbone: nn.Module, x: torch.Tensor, spec) -> torch.Tensor:
    """The features embed will take from this backbone (the spec's pooling and flip
    averaging), so the epoch the monitor picks is the best for search, not for a pooling
    nothing downstream uses; the model's own pooled output when the spec cannot say."""
    from medray.models import pooled_features

    if getattr(spec, "pooling", "avg") == "avg" and getattr(spec, "tta", "none") == "none":
        return backbone(x).float()
    try:
        return pooled_features(backbone, x, spec).float()
    except (ValueError, AttributeError):  # a model without timm's intermediates API
        return backbone(x).float()


@torch.no_grad()
def knn_accuracy(backbone: nn.Module, data, spec, device, k: int) -> float | None:
    """Leave-one-out kNN accuracy of the L2-normalised backbone features (eval mode), pooled
    as the spec says (`monitored_features`)."""
    from medray.metrics import loo_knn_accuracy

    if data is None:
        return None
    images, labels = data
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    modes = {m: m.training for m in backbone.modules()}  # BatchNorm may be frozen: restore all
    backbone.eval()
    feats = []
    for chunk in images.split(128):
        x = (chunk.to(device).float() / 255.0 - mean) / std
        feats.append(nn.functional.normalize(monitored_features(backbone, x, spec), dim=1).cpu())
    for m, mode in modes.items():
        m.train(mode)
    emb = torch.cat(feats).numpy()
    return round(loo_knn_accuracy(emb, labels, min(k, len(emb) - 1)), 4)
