"""MLflow at the edge: resolve the tracking URI and open runs for a stage."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from medray import storage
from medray import workdir as wd
from medray.config import MlflowConfig

# MLflow draws a progress bar per artifact download (a line per file in logs and replicas);
# medray reports what it loaded itself. A user's explicit setting wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracking_uri(cfg: MlflowConfig, workdir: str) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the workdir.

    An S3 workdir keeps its SQLite file in a local cache dir: SQLite needs a real file.
    """
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = embedded_db(workdir)
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def embedded_db(workdir: str) -> Path:
    """The embedded SQLite store's file for `workdir` (created by nothing here)."""
    if storage.is_s3(workdir):
        bucket, key = storage.split_s3(workdir)
        return Path.home() / ".cache" / "medray" / bucket / key / "mlflow.db"
    return Path(wd.mlflow_db(storage.resolve(workdir)))


def existing_tracking_uri(cfg: MlflowConfig, workdir: str, hint: str = "") -> str:
    """`tracking_uri` for a command that reads a store someone else wrote (serve, models
    promote/rollback/list): an embedded store that is not there is a FileNotFoundError
    naming the file, and looking for it creates nothing (no mlflow.db, no directory)."""
    if cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking_uri(cfg, workdir)
    db = embedded_db(workdir)
    if not db.is_file():
        raise FileNotFoundError(
            f"{db}: no MLflow store here; "
            + (hint or "pass the workdir that registered the model (--workdir W) "
               "or set MLFLOW_TRACKING_URI (the default workdir is ./workdir)")
        )  # fmt: skip
    return f"sqlite:///{db}"


def registry_uri(tracking: str) -> str:
    """$MLFLOW_REGISTRY_URI when the caller set one, else the tracking store itself."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking


URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
WORKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
"""MLflow settings a Ray worker or a submitted job needs to log where the driver does."""


def use(tracking: str, registry: str | None = None) -> None:
    """Point this process's MLflow (tracking and registry) at the given stores.

    mlflow.set_tracking_uri / set_registry_uri also write $MLFLOW_TRACKING_URI /
    $MLFLOW_REGISTRY_URI into os.environ; left there, the next resolution in this process
    (another workdir, another server) would read them as the caller's choice and go back to
    this store. The environment is restored: MLflow's in-process URIs (which it reads before
    the environment) carry the choice, the environment keeps only what the caller set.
    """
    import mlflow

    saved = {k: os.environ.get(k) for k in URI_ENV}
    try:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry or registry_uri(tracking))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def artifact_location(workdir: str) -> str:
    """Artifacts beside the workdir (a local dir or the S3 prefix)."""
    loc = wd.mlflow_artifacts(storage.resolve(workdir))
    return loc if storage.is_s3(loc) else Path(loc).as_uri()


def setup(cfg: MlflowConfig, workdir: str) -> str:
    """Point MLflow at the right store (the registry follows it) and experiment; returns
    the experiment id."""
    import mlflow

    uri = tracking_uri(cfg, workdir)
    use(uri)
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


def metric_name(text: str) -> str:
    """`text` as an MLflow metric name: letters, digits, _ - . / and space (`@` -> `_at_`)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text.replace("@", "_at_"))
