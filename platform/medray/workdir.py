"""Where each stage reads and writes under one workdir (local path or s3://), per DESIGN.md."""

from __future__ import annotations

from medray import storage


def manifest(workdir: str) -> str:
    return storage.join(workdir, "data", "manifest.parquet")


def quarantine(workdir: str) -> str:
    return storage.join(workdir, "data", "quarantine.parquet")


def dataset_info(workdir: str) -> str:
    """JSON: label names, multi_label, source, counts."""
    return storage.join(workdir, "data", "dataset.json")


def images(workdir: str) -> str:
    """Where importers that unpack arrays (npz, synth) write their PNGs."""
    return storage.join(workdir, "data", "images")


def pretrain(workdir: str) -> str:
    return storage.join(workdir, "pretrain")


def select(workdir: str) -> str:
    return storage.join(workdir, "select")


def adapt(workdir: str) -> str:
    """adapt/ranking.json: the retrieval adapters compared and the one kept."""
    return storage.join(workdir, "adapt")


def embeddings(workdir: str, backbone_id: str | None = None) -> str:
    base = storage.join(workdir, "embeddings")
    return storage.join(base, backbone_id) if backbone_id else base


def latest_embeddings(workdir: str) -> str:
    """Pointer file naming the backbone id of the last finished embed run."""
    return storage.join(workdir, "embeddings", "LATEST")


def index(workdir: str, backbone_id: str) -> str:
    return storage.join(workdir, "index", backbone_id)


def heads(workdir: str, task: str | None = None) -> str:
    base = storage.join(workdir, "heads")
    return storage.join(base, task) if task else base


def eval_dir(workdir: str) -> str:
    return storage.join(workdir, "eval")


def mlflow_db(workdir: str) -> str:
    return storage.join(workdir, "mlflow.db")


def mlflow_artifacts(workdir: str) -> str:
    return storage.join(workdir, "mlartifacts")


def current_backbone_id(workdir: str, pinned: str | None = None) -> str:
    """The backbone id a downstream stage should use: pinned, else the last embed run's."""
    if pinned:
        return pinned
    pointer = latest_embeddings(workdir)
    if not storage.exists(pointer):
        raise FileNotFoundError(
            f"{pointer}: no embeddings yet; run `medray run embed --workdir {workdir}` first"
        )
    return storage.read_text(pointer).strip()
