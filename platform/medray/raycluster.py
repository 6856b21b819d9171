"""Ray at the edge: start or join a cluster with the config's resources, quietly in CI."""

from __future__ import annotations

import logging
import os
import sys

from medray.config import RayConfig


def is_interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def quiet_ray_data() -> None:
    """Ray Data logs a progress table every 10 s in a non-TTY; keep bars only for people."""
    if is_interactive():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:  # older/newer Ray without these knobs
        pass


def init(cfg: RayConfig, runtime_env: dict | None = None) -> None:
    """Connect to the configured cluster, or start a local one; reuse an existing connection."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    address = None if cfg.address in (None, "local") else cfg.address
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = "auto"  # inside `ray job submit` / a cluster node
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    if address is None:
        kwargs["num_cpus"] = cfg.num_cpus
    ray.init(
        address=address,
        runtime_env=runtime_env,
        **{k: v for k, v in kwargs.items() if v is not None or k == "address"},
    )
    quiet_ray_data()


def use_gpu(cfg: RayConfig) -> bool:
    """Resolve `use_gpu: auto` against the GPUs the cluster reports."""
    if cfg.use_gpu != "auto":
        return bool(cfg.use_gpu)
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
