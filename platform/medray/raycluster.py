"""Ray at the edge: start or join a cluster with the config's resources, quietly in CI."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

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
        kwargs["_metrics_export_port"] = cfg.metrics_export_port
        kwargs["_node_ip_address"] = loopback_only()
        from medray.serving.proxy import enable

        enable()  # a local Serve proxy answers a lost replica with a 503 JSON, not a bare 500
    handler = _own_sigterm_handler()
    if handler is not None:
        _signals_stay_with_python()
    ray.init(
        address=address,
        runtime_env=runtime_env,
        **{k: v for k, v in kwargs.items() if v is not None or k == "address"},
    )
    if handler is not None:
        # ray.init sets SIGTERM to sys.exit(15); a command that stops itself cleanly
        # (medray.serving.lifecycle: `medray serve`, `medray demo`) keeps its own handler.
        signal.signal(signal.SIGTERM, handler)
    quiet_ray_data()


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch (despite its name, read on Linux too) between a node that other machines may
join (node IP = this machine's address, gRPC servers on every interface) and a
single-machine node (node IP 127.0.0.1, every server bound to it)."""


def loopback_only() -> str:
    """Make the local Ray about to start listen on 127.0.0.1 only, and return that address.

    Ray resolves `_node_ip_address="127.0.0.1"` to the machine's routable address unless
    its cluster mode is off; off, the GCS, raylet, object manager, workers, dashboard agent
    (metrics export included) and runtime-env agent all bind the loopback address. The env
    var reaches the processes Ray starts; the constant is what this process already read.
    An explicit `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1` keeps Ray's default (every interface).
    """
    os.environ.setdefault(LOOPBACK_ENV, "0")
    enabled = os.environ[LOOPBACK_ENV].lower() in ("1", "true")
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = enabled
    except (ImportError, AttributeError):  # a Ray without this switch: its own default
        pass
    return "127.0.0.1"


def _signals_stay_with_python() -> None:
    """For a driver that stops itself on SIGTERM: keep Ray's C++ failure-signal handler out
    of this process. Installed while ray.init connects, it answers a SIGTERM by aborting the
    driver (seen: the dashboard and runtime-env agents then outlive it). Python's
    faulthandler still prints a traceback on a crash. Workers and replicas keep Ray's own."""
    import faulthandler

    with contextlib.suppress(Exception):
        from ray._private import ray_constants

        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read when the driver connects
    if not faulthandler.is_enabled():
        faulthandler.enable()


def _own_sigterm_handler():
    """The Python-level SIGTERM handler this program installed, if any (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    handler = signal.getsignal(signal.SIGTERM)
    return handler if callable(handler) else None


def use_gpu(cfg: RayConfig) -> bool:
    """Resolve `use_gpu: auto` against the GPUs the cluster reports."""
    if cfg.use_gpu != "auto":
        return bool(cfg.use_gpu)
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def run_remote(fn, *args, ray_cfg: RayConfig, gpu: bool = True, **kwargs):
    """`fn(*args, **kwargs)` in one Ray task with the stage's resources (`cpus_per_worker`
    CPUs, one GPU when `use_gpu` and `gpu`), its (small) return value brought back here.
    Retried once if its worker dies (a lost node); a task killed for memory is not worth
    Ray's default three retries.

    For stages whose working set grows with the archive (all embeddings, the index): that
    memory belongs to a Ray worker, not to the driver a user submits from (a laptop, the
    head node). The task's own exception is raised here unwrapped, so its message reads as
    if `fn` had run in place (e.g. "embeddings for X are missing; run `medray run embed`")."""
    import ray

    from medray import storage

    init(ray_cfg)
    options: dict = {"num_cpus": ray_cfg.cpus_per_worker, "max_retries": 1,
                     "num_gpus": 1 if gpu and use_gpu(ray_cfg) else 0}  # fmt: skip
    env = storage.worker_env()  # the driver's S3 endpoint (a local Ray may predate it)
    if env:
        options["runtime_env"] = {"env_vars": env}
    task = ray.remote(**options)(fn)
    try:
        return ray.get(task.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, Exception):
            raise err.cause from err  # the remote traceback stays in the chain
        raise
