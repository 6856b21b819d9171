"""Settings a pretrain run works out before it starts: `auto` values from the data and the
starting weights, and the CPUs a Ray Train worker reserves. Plain functions of the config
(and, for `auto` sizes, of a small sample of the images)."""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

from medray.config import RayConfig

if TYPE_CHECKING:
    from medray.pretrain import Config, OptimConfig

log = logging.getLogger(__name__)


def training_uris(cfg: Config) -> list[str]:
    """The train images this run uses (all of them, or the `max_train_images` subset)."""
    from medray.data.manifest import read_manifest
    from medray.pretrain.dataset import subset_uris, train_uris

    return subset_uris(train_uris(read_manifest(cfg.workdir)), cfg.max_train_images, cfg.seed)


def resolve_auto(cfg: Config) -> Config:
    """`image_size`, `augment.preset` and `bn` made concrete: the first two from a small
    sample of the train images (dataset.probe_sources), `bn` from the starting weights."""
    from medray.pretrain.byol import resolve_bn
    from medray.pretrain.dataset import auto_image_size, probe_sources

    size, preset = cfg.image_size, cfg.augment.preset
    if size == "auto" or preset == "auto":
        side, gray = probe_sources(training_uris(cfg), seed=cfg.seed)
        size = auto_image_size(side, model_input_size(cfg.backbone.name)) if size == "auto" \
            else size  # fmt: skip
        preset = ("xray" if gray else "histology") if preset == "auto" else preset
        log.info("pretrain: sources ~%s px, grayscale %s -> image_size %s, preset %s",
                 side, gray, size, preset)  # fmt: skip
    augment = cfg.augment.model_copy(update={"preset": preset})
    weights = cfg.backbone.weights
    optim = resolve_optim(cfg.optim, weights)
    bn = resolve_bn(cfg.bn, weights)
    return cfg.model_copy(update={"image_size": size, "augment": augment, "bn": bn, "optim": optim})


def resolve_optim(optim: OptimConfig, weights: str) -> OptimConfig:
    """`backbone_lr_scale` and `frozen_backbone_epochs` made concrete for the starting
    weights: gentle (0.1, 1 epoch) from trained ones, plain (1, 0) from random ones."""
    trained = weights != "random"
    update = {}
    if optim.backbone_lr_scale == "auto":
        update["backbone_lr_scale"] = 0.1 if trained else 1.0
    if optim.frozen_backbone_epochs == "auto":
        update["frozen_backbone_epochs"] = 1.0 if trained else 0.0
    return optim.model_copy(update=update)


def model_input_size(name: str) -> int:
    """The input side timm's pretrained config gives the model (224 when it has none)."""
    import timm

    pcfg = timm.get_pretrained_cfg(name)
    return int(pcfg.input_size[-1]) if pcfg is not None and pcfg.input_size else 224


def is_local(ray_cfg: RayConfig) -> bool:
    """Ray started in this process (not a cluster joined by address or from a job)."""
    return ray_cfg.address in (None, "local") and not os.environ.get("RAY_ADDRESS")


def worker_cpus(ray_cfg: RayConfig, free_cpus: float, local: bool) -> float:
    """CPUs to reserve per Ray Train worker: `cpus_per_worker`, except that one worker on a
    local Ray takes every free CPU (there is nothing to share them with; limit it with
    `ray.num_cpus`). Several workers, or a cluster, keep `cpus_per_worker`."""
    if ray_cfg.num_workers == 1 and local:
        return max(ray_cfg.cpus_per_worker, math.floor(free_cpus))
    return ray_cfg.cpus_per_worker
