"""The whole demo pipeline with its workdir on S3 and MLflow's artifacts in the same bucket,
against moto's S3 server on loopback: `medray demo --workdir s3://bucket/prefix --no-serve`.

Runs in a subprocess (its own local Ray) from an empty directory with its own HOME, so
anything written to local disk instead of S3 would show up there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

# Small and fast, every stage still real: tiny BYOL, one select candidate at 64 px,
# one head setting, few epochs.
FAST = {
    "pretrain": [
        "epochs=1", "backbone.name=test_resnet", "backbone.weights=random", "image_size=32",
        "batch_size=16", "hidden_dim=64", "proj_dim=32", "loader_workers=0",
        "knn_max_images=0", "ray.cpus_per_worker=0.5",
    ],
    "select": [
        "candidates=[{name: efficientnet_lite0, weights: bundled, input_size: 64}]",
        "proxy_size=64", "folds=2",
    ],
    "embed": ["batch_size=32", "decode_cpus=0.5", "ray.cpus_per_worker=0.5"],
    "heads": [
        "epochs=20", "search.arch=[linear]", "search.lr=[0.01]", "search.weight_decay=[0.0]",
        "max_concurrent=1",
    ],
}  # fmt: skip


def _needs_the_whole_pipeline() -> None:
    from medray import data, stages

    missing = [name for name, ok in stages.available().items() if not ok]
    if missing or not hasattr(data, "synth"):
        pytest.skip(f"not in this build yet: {missing or 'medray.data.synth'}")
    pytest.importorskip("medray.registry")


def s3_keys(uri: str) -> list[str]:
    """Every object key under an s3://bucket/prefix (relative to the prefix)."""
    from medray import storage

    bucket, prefix = storage.split_s3(uri)
    pages = (
        storage.s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    )
    return sorted(
        obj["Key"][len(prefix) + 1 :] for page in pages for obj in page.get("Contents", [])
    )


def test_demo_pipeline_on_s3(s3_bucket, tmp_path):
    _needs_the_whole_pipeline()
    workdir = f"{s3_bucket}/medray/demo"
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    overrides = [f"overrides={json.dumps(FAST)}", "n_images=160", "ray.num_cpus=2"]
    out = subprocess.run(
        [sys.executable, "-m", "medray", "demo", "--workdir", workdir, "--no-serve", *overrides],
        cwd=cwd,
        env={**os.environ, "HOME": str(home), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]

    keys = s3_keys(workdir)
    for expected in (
        "data/manifest.parquet",
        "embeddings/LATEST",
        "eval/metrics.json",
        "select/ranking.json",
    ):
        assert expected in keys, f"{expected} not in the bucket: {keys[:50]}"
    for prefix in ("pretrain/", "index/", "heads/", "mlartifacts/"):
        assert any(k.startswith(prefix) for k in keys), f"nothing under {prefix} in the bucket"
    assert any(k.startswith("embeddings/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("index/") and k.endswith("index.json") for k in keys)

    # Nothing on local disk but the SQLite tracking store of an S3 workdir (~/.cache/medray).
    assert list(cwd.iterdir()) == []
    dbs = list(home.rglob("mlflow.db"))
    assert len(dbs) == 1 and ".cache/medray" in dbs[0].as_posix()
    _check_registered_model_on_s3(f"sqlite:///{dbs[0]}", workdir)


def _check_registered_model_on_s3(tracking_uri: str, workdir: str) -> None:
    """The demo bundle is a registered model version whose files live in the bucket (whether
    the gates then promote it depends on the metrics of this tiny run, not on S3)."""
    from mlflow import MlflowClient

    from medray.demo import DemoConfig

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = client.search_model_versions(f"name='{DemoConfig().model_name}'")
    assert versions, "the demo registered no model version"
    version = versions[0]
    run = client.get_run(version.run_id)
    assert run.info.artifact_uri.startswith(f"{workdir}/mlartifacts/")
    if version.source.startswith("models:/m-"):  # MLflow 3: a logged model with its own files
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert model.artifact_location.startswith(f"{workdir}/mlartifacts/")
    else:
        assert version.source.startswith(f"{workdir}/mlartifacts/")
    bucket_keys = s3_keys(f"{workdir}/mlartifacts")
    assert any(k.startswith("models/") for k in bucket_keys), bucket_keys[:20]
