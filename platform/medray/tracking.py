"""MLflow at the edge: resolve the tracking URI and open runs for a stage."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from medray import storage
from medray import workdir as wd
from medray.config import MlflowConfig


def tracking_uri(cfg: MlflowConfig, workdir: str) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the workdir.

    An S3 workdir keeps its SQLite file in a local cache dir: SQLite needs a real file.
    """
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_s3(workdir):
        bucket, key = storage.split_s3(workdir)
        local = Path.home() / ".cache" / "medray" / bucket / key
        local.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{local / 'mlflow.db'}"
    db = Path(wd.mlflow_db(storage.resolve(workdir)))
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_location(workdir: str) -> str:
    """Artifacts beside the workdir (a local dir or the S3 prefix)."""
    loc = wd.mlflow_artifacts(storage.resolve(workdir))
    return loc if storage.is_s3(loc) else Path(loc).as_uri()


def setup(cfg: MlflowConfig, workdir: str) -> str:
    """Point MLflow at the right store and experiment; returns the experiment id."""
    import mlflow

    uri = tracking_uri(cfg, workdir)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:"):
        mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    # Only the embedded store gets workdir artifacts; a server decides its own.
    location = artifact_location(workdir) if uri.startswith("sqlite:") else None
    try:
        return mlflow.create_experiment(cfg.experiment, artifact_location=location)
    except Exception:  # another worker created it first
        return mlflow.get_experiment_by_name(cfg.experiment).experiment_id


@contextlib.contextmanager
def stage_run(cfg: MlflowConfig, workdir: str, stage: str, params: dict | None = None) -> Iterator:
    """An MLflow run named after the stage, tagged with the workdir, params flattened."""
    import mlflow

    exp_id = setup(cfg, workdir)
    with mlflow.start_run(experiment_id=exp_id, run_name=stage) as run:
        mlflow.set_tags({"medray.stage": stage, "medray.workdir": str(workdir)})
        if params:
            mlflow.log_params(flatten(params))
        yield run


def flatten(obj: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; MLflow params are flat strings (max 6000 chars)."""
    out: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out
