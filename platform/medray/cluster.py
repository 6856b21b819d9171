"""Submit stages to a Ray cluster through the Jobs API, follow them, list and stop them.

A job ships this repository (configs/, jobs/) as the runtime env's `working_dir` and
the `medray` package as a `py_module`, so a cluster that has only Ray, torch and the
other dependencies (the Docker image of cluster.yaml) runs the same code as the
laptop; `pip` in the submit config installs missing dependencies on a bare cluster.
The job's exit code is the stage's: `medray submit --follow` exits with it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medray import storage, tracking
from medray.config import Section

# Never shipped: virtualenvs, workdirs, caches, VCS data, build outputs, and platform/
# itself (the package travels as a py_module instead).
EXCLUDES = [
    ".venv/",
    "venv/",
    ".git/",
    "/workdir/",
    "/workdirs/",
    "/demo-workdir/",
    "/platform/",
    "**/__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    ".cache/",
    "*.egg-info/",
    "build/",
    "dist/",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "node_modules/",
]

FORWARDED_ENV = [*tracking.WORKER_ENV, *storage.WORKER_ENV]
"""What a job needs to reach the same MLflow and S3 as this shell (never credentials)."""


class SubmitConfig(Section):
    """How `medray submit` reaches the cluster and what it ships with each job."""

    address: str | None = None
    """Ray dashboard URL (http://HEAD:8265); None: --address, $RAY_API_SERVER_ADDRESS or
    an http(s) $RAY_ADDRESS."""
    pip: list[str] = []
    """pip requirements installed into the job's environment (for a cluster without
    medray's dependencies); empty: use what the cluster image has."""
    env: list[str] = list(FORWARDED_ENV)
    """Names of local environment variables copied into the job when they are set."""
    excludes: list[str] = []
    """Extra gitignore-style patterns left out of the shipped working_dir."""
    entrypoint_num_cpus: float = 0.0
    """CPUs reserved for the job's driver (the stage's workers reserve their own)."""
    entrypoint_num_gpus: float = 0.0
    """GPUs reserved for the job's driver."""
    python: str | None = None
    """Interpreter on the cluster; None: this one for a head on loopback, else `python`."""


class SubmitError(RuntimeError):
    """A job that cannot be submitted as asked (address, config outside the repo, ...)."""


def repo_root(start: Path | None = None) -> Path:
    """The checkout to ship: the nearest directory above `start` holding jobs/ and configs/."""
    candidates = [start] if start else [Path.cwd(), Path(__file__).resolve().parents[2]]
    for base in candidates:
        for path in [base.resolve(), *base.resolve().parents]:
            if (path / "jobs").is_dir() and (path / "configs").is_dir():
                return path
    raise SubmitError("no medray checkout found (a directory with jobs/ and configs/)")


def package_dir() -> Path:
    """The `medray` package directory, shipped as a py_module."""
    return Path(__file__).resolve().parent


def runtime_env(
    repo: Path, cfg: SubmitConfig, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Ray runtime_env: the repo as working_dir, medray as a py_module, chosen env vars."""
    environ = os.environ if environ is None else environ
    env_vars = {name: environ[name] for name in cfg.env if environ.get(name)}
    env_vars.setdefault("PYTHONUNBUFFERED", "1")  # logs arrive as they are printed
    out: dict[str, Any] = {
        "working_dir": str(repo),
        "py_modules": [str(package_dir())],
        "excludes": EXCLUDES + list(cfg.excludes),
        "env_vars": env_vars,
    }
    if cfg.pip:
        out["pip"] = list(cfg.pip)
    return out


def resolve_address(address: str | None, cfg: SubmitConfig | None = None) -> str:
    """The dashboard URL to talk to: argument, config, then the environment."""
    env_addr = os.environ.get("RAY_ADDRESS", "")
    for candidate in (
        address,
        cfg.address if cfg else None,
        os.environ.get("RAY_API_SERVER_ADDRESS"),
        env_addr if env_addr.startswith(("http://", "https://")) else None,
    ):
        if candidate:
            return candidate if "://" in candidate else f"http://{candidate}"
    raise SubmitError("no Ray dashboard address: pass --address http://HEAD:8265")


def is_loopback(address: str) -> bool:
    return (urlparse(address).hostname or "") in {"127.0.0.1", "localhost", "::1"}


def relative_config(config: str | None, repo: Path) -> str | None:
    """The config path as the job sees it (relative to the shipped working_dir)."""
    if config is None:
        return None
    path = Path(config).resolve()
    try:
        return path.relative_to(repo).as_posix()
    except ValueError:
        raise SubmitError(
            f"{config}: config is outside the shipped checkout {repo}; put it under configs/"
        ) from None


def entrypoint(
    stage: str, config: str | None, overrides: Sequence[str], python: str = "python"
) -> str:
    """The shell command the job runs: `python jobs/<stage>.py -c CONFIG key=value ...`."""
    args = [python, f"jobs/{stage}.py"]
    if config:
        args += ["-c", config]
    return shlex.join(args + list(overrides))


def workdir_override(workdir: str, address: str) -> list[str]:
    """The job's `workdir=` override; a local one is made absolute (a relative path would
    land in the job's temporary working_dir) and warned about on a remote cluster."""
    if storage.is_s3(workdir):
        return [f"workdir={workdir}"]
    if not is_loopback(address):
        print(
            f"warning: workdir {workdir!r} is a local path; on a remote cluster use "
            "s3://bucket/prefix or a filesystem every node mounts",
            file=sys.stderr,
        )
    return [f"workdir={storage.resolve(workdir)}"]


def validate_job(
    stage: str, config: str | None, overrides: Sequence[str], workdir: str | None, repo: Path
) -> str:
    """Load here every config the job will load (a typo fails before anything is uploaded);
    returns the workdir the job will use. STAGE `pipeline` checks all six stage configs."""
    from medray import pipeline
    from medray.jobs_entry import stage_config

    if stage != "pipeline":
        return stage_config(stage, config, overrides, workdir).workdir
    if config:
        raise SubmitError("the pipeline reads configs/<stage>.yaml for each stage: drop -c")
    cfg = pipeline.config_from_args(workdir, overrides, str(repo / "configs"))
    for name in cfg.selected():
        pipeline.stage_config(name, cfg)
    return cfg.workdir


def client(address: str):
    """A Jobs API client; Ray's per-file packaging chatter is kept below WARNING."""
    import logging

    from ray.job_submission import JobSubmissionClient

    for name in (
        "ray._private.runtime_env.packaging",
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {exc}") from None


def submit(
    stage: str,
    config: str | None,
    overrides: Sequence[str],
    cfg: SubmitConfig,
    address: str | None = None,
    workdir: str | None = None,
) -> tuple[Any, str]:
    """Validate the stage config here, then submit its job; returns (client, job id)."""
    addr = resolve_address(address, cfg)
    repo = repo_root()
    job_workdir = validate_job(stage, config, overrides, workdir, repo)
    extra = list(overrides) + workdir_override(job_workdir, addr)
    python = cfg.python or (sys.executable if is_loopback(addr) else "python")
    jobs = client(addr)
    job_id = jobs.submit_job(
        entrypoint=entrypoint(stage, relative_config(config, repo), extra, python),
        runtime_env=runtime_env(repo, cfg),
        metadata={"medray.stage": stage},
        entrypoint_num_cpus=cfg.entrypoint_num_cpus or None,
        entrypoint_num_gpus=cfg.entrypoint_num_gpus or None,
    )
    return jobs, job_id


def exit_code(jobs: Any, job_id: str) -> int:
    """The job's exit code: the driver's own when Ray knows it, else from the status."""
    info = jobs.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    if code is not None:
        return int(code)
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    return {"SUCCEEDED": 0, "STOPPED": 130}.get(status, 1)


def follow(jobs: Any, job_id: str, write: Callable[[str], Any] = sys.stdout.write) -> int:
    """Stream the job's log until it ends; returns its exit code."""

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    return wait(jobs, job_id)


def wait(jobs: Any, job_id: str, poll_s: float = 0.5, timeout_s: float | None = None) -> int:
    """Block until the job is terminal; returns its exit code."""
    import time

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not jobs.get_job_status(job_id).is_terminal():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return exit_code(jobs, job_id)


def list_jobs(jobs: Any) -> list[dict[str, Any]]:
    """Every job the cluster knows, newest first, as plain rows."""
    rows = []
    for info in jobs.list_jobs():
        rows.append(
            {
                "id": info.submission_id or info.job_id,
                "status": str(getattr(info.status, "value", info.status)),
                "stage": (info.metadata or {}).get("medray.stage", ""),
                "start_time": info.start_time or 0,
                "entrypoint": info.entrypoint,
                "message": info.message or "",
            }
        )
    return sorted(rows, key=lambda r: r["start_time"], reverse=True)


def load_submit_config(path: str | None, **fields: Any) -> SubmitConfig:
    """The submit config from an optional YAML file, with non-empty CLI values on top."""
    from medray.config import load_config

    return load_config(SubmitConfig, path, **{k: v for k, v in fields.items() if v})
