"""Lineage of a bundle: which data and which MLflow runs made each of its parts.

Run ids come first from the parts' own JSON files (embed.json, index.json, metrics.json,
a BYOL export's backbone.json), else from MLflow: the latest finished run tagged
`medray.stage=<stage>` whose `medray.workdir` tag resolves to this workdir. Both the
registry's tracking store and the workdir's embedded SQLite store are searched, since the
stages may have logged locally and the registry may be a server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medray import storage
from medray import workdir as wd

log = logging.getLogger(__name__)

STAGES = ("pretrain", "select", "embed", "index", "heads", "evaluate")


def tracking_uris(workdir: str, tracking_uri: str | None) -> list[str]:
    """Stores to search: the given/configured one, then the workdir's SQLite file if present."""
    uris = [u for u in (tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")) if u]
    if not storage.is_s3(workdir):
        db = Path(wd.mlflow_db(storage.resolve(workdir)))
        if db.is_file():
            uris.append(f"sqlite:///{db}")
    return list(dict.fromkeys(uris))


def find_stage_run(
    stage: str, workdir: str, uris: list[str], backbone_id: str | None = None
) -> str | None:
    """Id of the latest finished run of `stage` on `workdir` in any of `uris`, or None."""
    from mlflow.tracking import MlflowClient

    for uri in uris:
        try:
            client = MlflowClient(tracking_uri=uri)
            exps = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(
                exps, f"tags.`medray.stage` = '{stage}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"], max_results=50,
            )  # fmt: skip
        except Exception as exc:  # an unreachable store must not block registering
            log.warning("lineage: cannot search %s for %s runs: %s", uri, stage, exc)
            continue
        for run in runs:
            tags = run.data.tags
            if storage.resolve(tags.get("medray.workdir", "")) != workdir:
                continue
            if backbone_id and tags.get("medray.backbone_id") not in (None, backbone_id):
                continue
            return run.info.run_id
    return None


def run_params(run_id: str | None, workdir: str, tracking_uri: str | None) -> dict[str, str]:
    """Params of `run_id` from the first store that has it ({} when none does)."""
    if not run_id:
        return {}
    from mlflow.tracking import MlflowClient

    for uri in tracking_uris(workdir, tracking_uri):
        try:
            return dict(MlflowClient(tracking_uri=uri).get_run(run_id).data.params)
        except Exception:
            continue
    return {}


def _pretrain_run(weights: str) -> str | None:
    """The BYOL run that exported `weights`, when it is a medray export directory."""
    spec = storage.join(weights, "backbone.json")
    if weights in ("bundled", "pretrained", "random") or not storage.exists(spec):
        return None
    return storage.read_json(spec).get("mlflow_run_id")


def _select_run(workdir: str) -> str | None:
    ranking = storage.join(wd.select(workdir), "ranking.json")
    return storage.read_json(ranking).get("mlflow_run_id") if storage.exists(ranking) else None


def collect(
    workdir: str, embed: dict, index_meta: dict, metrics: dict, tracking_uri: str | None
) -> dict:
    """Manifest hash, backbone id and source, and the run id of every stage that made a part."""
    spec = embed["backbone"]
    manifest_uri = wd.manifest(workdir)
    runs = {
        "pretrain": _pretrain_run(str(spec.get("weights", ""))),
        "select": _select_run(workdir),
        "embed": embed.get("mlflow_run_id"),
        "index": index_meta.get("mlflow_run_id"),
        "heads": None,
        "evaluate": metrics.get("mlflow_run_id"),
    }
    uris = tracking_uris(workdir, tracking_uri)
    for stage in ("embed", "index", "heads", "evaluate"):
        if not runs[stage]:
            runs[stage] = find_stage_run(stage, workdir, uris, spec.get("backbone_id"))
    return {
        "workdir": workdir,
        "manifest_sha256": storage.sha256(manifest_uri) if storage.exists(manifest_uri) else None,
        "embeddings_manifest_sha256": embed.get("manifest_sha256"),
        "backbone_id": spec.get("backbone_id"),
        "backbone_weights": str(spec.get("weights")),
        "runs": runs,
    }
