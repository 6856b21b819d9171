"""Service bundles and the model registry.

Bundles are built from workdirs whose parts follow docs/contracts.md (tests/registry_parts.py:
real images, a real backbone's embeddings, a FAISS index, a trained head, metrics computed
from the embeddings). A "worse" workdir uses a random-weights backbone: its retrieval
metrics are genuinely lower. The acceptance flow runs from the CLI against a real
`mlflow server` (SQLite backend), once more with the artifacts on S3 (moto server).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, wait_http
from PIL import Image
from registry_parts import make_workdir
from typer.testing import CliRunner

from medray import storage
from medray.config import MlflowConfig
from medray.registry import BundleError, RegistryConfig, build_bundle, load_bundle


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[str, Path]:
    """A good workdir (bundled ImageNet backbone) and a worse one (random weights)."""
    root = tmp_path_factory.mktemp("registry")
    out = {}
    for name, weights in (("good", "bundled"), ("bad", "random")):
        out[name] = root / name
        make_workdir(out[name], weights=weights)
    return out


@pytest.fixture(scope="module")
def bundle_dir(workdirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    build_bundle(str(workdirs["good"]), str(out))
    return out


def image(workdir: Path, i: int) -> np.ndarray:
    return np.asarray(Image.open(workdir / "data" / "images" / f"img{i:03d}.png").convert("RGB"))


# ---------------------------------------------------------------- bundle


def test_bundle_lists_every_file_with_its_checksum_and_lineage(bundle_dir, workdirs):
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    on_disk = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"bundle.json"}
    for rel, sha in manifest["files"].items():
        assert storage.sha256(str(bundle_dir / rel)) == sha
    assert {"backbone/backbone.safetensors", "index/index.json", "index/gallery.arrow",
            "heads/texture/head.json", "eval/metrics.json"} <= set(manifest["files"])  # fmt: skip
    lineage = manifest["lineage"]
    assert lineage["manifest_sha256"] == storage.sha256(
        str(workdirs["good"] / "data/manifest.parquet")
    )
    assert lineage["backbone_id"] == manifest["backbone_id"] and set(lineage["runs"]) >= {
        "embed",
        "index",
        "heads",
        "evaluate",
    }
    assert manifest["tasks"]["texture"]["label_names"] == ["checks", "dots", "stripes"]
    assert 0 < manifest["pair_threshold"] <= 1


def test_loaded_bundle_embeds_searches_classifies_and_compares(bundle_dir, workdirs):
    b = load_bundle(str(bundle_dir))
    emb = b.embed([image(workdirs["good"], 4), image(workdirs["good"], 5)])
    assert emb.shape == (2, b.info["dim"]) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    hits = b.search(emb, 3)
    assert hits[0][0]["id"] == "img004" and hits[0][0]["score"] > 0.99
    assert set(hits[0][0]) == {"id", "score", "labels", "uri"} and hits[0][0]["labels"] == [
        "checks"
    ]
    cls = b.classify(emb)[0]["texture"]
    assert cls["kind"] == "multiclass" and abs(sum(cls["probabilities"].values()) - 1) < 1e-5
    assert len(cls["decisions"]) == 1 and set(cls["thresholds"]) == {"checks", "dots", "stripes"}
    same = b.compare(emb[0], emb[0])
    assert same["same_category"] and same["threshold"] == b.pair_threshold
    assert b.has_image("img004") and not b.has_image("nope")
    assert b.thumbnail("img004", size=16)[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(b.info) >= {"name", "version", "alias", "backbone_id", "dim", "metrics", "tasks",
                           "pair_threshold", "lineage"}  # fmt: skip


@pytest.mark.parametrize(
    "rel",
    ["backbone/backbone.safetensors", "index/index.faiss", "index/gallery.arrow",
     "heads/texture/head.json", "eval/metrics.json"],
)  # fmt: skip
def test_a_bundle_with_one_file_altered_is_refused(bundle_dir, tmp_path, rel):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    target = copy / rel
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="altered file") as err:
        load_bundle(str(copy))
    assert rel.split("/")[-1] in str(err.value)


def test_a_missing_file_is_refused(bundle_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    (copy / "heads/texture/head.safetensors").unlink()
    with pytest.raises(BundleError, match="head.safetensors: missing"):
        load_bundle(str(copy))


def test_each_deployment_loads_only_its_part(bundle_dir, workdirs, tmp_path):
    """Retriever: index + gallery, no backbone (torch never imported); Embedder: backbone;
    Classifier: heads. Each verifies the files it reads, and only those."""
    from medray.registry.service import PartNotLoaded

    full = load_bundle(str(bundle_dir))
    emb = full.embed([image(workdirs["good"], 4)])
    script = (
        "import sys; from medray.registry import load_bundle; "
        f"b = load_bundle({str(bundle_dir)!r}, parts=['index']); "
        "print(b.backbone is None, b.heads is None, 'torch' in sys.modules, b.has_image('img004'))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "False", "True"]
    retriever = load_bundle(str(bundle_dir), parts=["index"])
    assert retriever.search(emb, 3) == full.search(emb, 3)
    with pytest.raises(PartNotLoaded, match="without 'backbone'"):
        retriever.embed([image(workdirs["good"], 4)])
    embedder = load_bundle(str(bundle_dir), parts=["backbone"])
    assert embedder.index is None and embedder.heads is None
    np.testing.assert_allclose(embedder.embed([image(workdirs["good"], 4)]), emb, atol=1e-6)
    with pytest.raises(PartNotLoaded, match="without 'index'"):
        embedder.search(emb, 3)
    classifier = load_bundle(str(bundle_dir), parts=["heads"])
    assert classifier.backbone is None and classifier.index is None
    assert classifier.classify(emb) == full.classify(emb)
    assert classifier.compare(emb[0], emb[0]) == full.compare(emb[0], emb[0])
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    (copy / "heads/texture/head.json").write_text("{}")
    assert load_bundle(str(copy), parts=["index"]).has_image("img004")  # not a file it reads
    with pytest.raises(BundleError, match="head.json: altered file"):
        load_bundle(str(copy), parts=["heads"])
    with pytest.raises(ValueError, match="choose from"):
        load_bundle(str(bundle_dir), parts=["gallery"])


def test_backbone_that_disagrees_with_the_index_is_refused(bundle_dir, workdirs, tmp_path):
    """Swap in other weights and re-record every checksum: the checksums now pass, but the
    weights hash to another backbone id than the index was built from."""
    other = tmp_path / "other"
    build_bundle(str(workdirs["bad"]), str(other))
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    shutil.copy(other / "backbone/backbone.safetensors", copy / "backbone/backbone.safetensors")
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["files"]["backbone/backbone.safetensors"] = storage.sha256(
        str(copy / "backbone/backbone.safetensors")
    )
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(
        BundleError, match=r"backbone.safetensors: weights hash to efficientnet_lite0-"
    ):
        load_bundle(str(copy))


def test_build_refuses_a_workdir_without_metrics_or_with_stale_ones(workdirs, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(workdirs["good"], wd)
    metrics = wd / "eval/metrics.json"
    saved = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**saved, "backbone_id": "efficientnet_lite0-0000000000"}))
    with pytest.raises(BundleError, match="metrics are for backbone"):
        build_bundle(str(wd), str(tmp_path / "b1"))
    metrics.unlink()
    with pytest.raises(BundleError, match=r"metrics.json: missing; run `medray run evaluate`"):
        build_bundle(str(wd), str(tmp_path / "b2"))


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a medray bundle"):
        load_bundle(str(tmp_path))


# ---------------------------------------------------------------- registry, in process


def test_the_given_tracking_uri_wins_and_the_registry_follows_it(tmp_path, monkeypatch):
    """A store chosen earlier in the process (another workdir's SQLite) must not leak into
    the next resolution: MLflow's setters write $MLFLOW_TRACKING_URI/$MLFLOW_REGISTRY_URI."""
    import mlflow

    from medray import tracking
    from medray.registry.ops import _client

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    tracking.setup(MlflowConfig(), str(tmp_path / "a"))  # an earlier stage, workdir a
    assert mlflow.get_registry_uri() == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    server = f"sqlite:///{tmp_path / 'server.db'}"  # stands in for the caller's server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)  # as CliRunner's env sets it
    client = _client(RegistryConfig(workdir=str(tmp_path / "b")))
    assert (client._tracking_client.tracking_uri, client._registry_uri) == (server, server)
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (server, server)
    assert os.environ["MLFLOW_TRACKING_URI"] == server
    own = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"  # the config's tracking_uri beats the env
    client = _client(
        RegistryConfig(workdir=str(tmp_path / "b"), mlflow=MlflowConfig(tracking_uri=own))
    )
    assert (client._tracking_client.tracking_uri, client._registry_uri) == (own, own)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # nothing given: workdir b's own SQLite ...
    with pytest.raises(FileNotFoundError, match="mlflow.db: no MLflow store here"):
        _client(RegistryConfig(workdir=str(tmp_path / "b")))  # ... once a stage wrote it
    tracking.setup(MlflowConfig(), str(tmp_path / "b"))
    client = _client(RegistryConfig(workdir=str(tmp_path / "b")))
    assert client._registry_uri == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    registry = f"sqlite:///{tmp_path / 'registry.db'}"  # a registry set on its own is kept
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry)
    assert _client(RegistryConfig(workdir=str(tmp_path / "b")))._registry_uri == registry


def test_register_promote_refuse_force_rollback_and_pyfunc(workdirs, tmp_path):
    import mlflow
    import pandas as pd

    from medray import registry

    cfg = RegistryConfig(
        workdir=str(tmp_path), mlflow=MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    )
    v1 = registry.register(str(workdirs["good"]), "tiny", cfg)
    assert registry.promote("tiny", v1, cfg)["outcome"] == "promoted"
    v2 = registry.register(str(workdirs["bad"]), "tiny", cfg)
    refused = registry.promote("tiny", v2, cfg)
    assert refused["outcome"] == "refused" and not refused["alias_moved"]
    assert {r["metric"] for r in refused["gates"] if not r["passed"]} >= {"retrieval.map@10"}
    assert registry.load_registered("models:/tiny@production").info["version"] == v1
    forced = registry.promote("tiny", v2, cfg, force=True)
    assert forced["outcome"] == "forced" and forced["forced"]
    assert registry.rollback("tiny", cfg)["version"] == v1
    rows = {r["version"]: r for r in registry.list_versions("tiny", cfg)}
    assert rows[v1]["aliases"] == ["production"] and rows[v2]["aliases"] == ["candidate"]
    outcomes = [d["outcome"] for d in rows[v2]["decisions"]]
    assert outcomes == ["refused", "forced", "rolled back"]
    assert all(d["who"] and d["when"] for d in rows[v2]["decisions"])
    assert rows[v1]["metrics"]["retrieval.p@5"] > rows[v2]["metrics"]["retrieval.p@5"]
    # MLflow's own loader: models from code, the bundle as an artifact, nothing pickled.
    model = mlflow.pyfunc.load_model("models:/tiny@production")
    png = (workdirs["good"] / "data/images/img004.png").read_bytes()
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(png).decode()]}), params={"k": 2})
    assert len(out.iloc[0]["embedding"]) == model.unwrap_python_model().bundle.dim
    assert out.iloc[0]["neighbours"][0]["id"] == "img004" and "texture" in out.iloc[0]["classes"]
    assert model.unwrap_python_model().bundle.info["backbone_id"] == rows[v1]["backbone_id"]
    local = mlflow.artifacts.download_artifacts(f"models:/tiny/{v1}", dst_path=str(tmp_path / "dl"))
    files = [p.name for p in Path(local).rglob("*") if p.is_file()]
    assert "MLmodel" in files and "bundle.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files


# ---------------------------------------------------------------- the CLI against a server


def cli(args: list[str], uri: str, expect: int = 0, columns: int = 200) -> str:
    from medray.cli import app

    env = {"MLFLOW_TRACKING_URI": uri, "COLUMNS": str(columns)}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == expect, (args, result.output, result.exception)
    return result.output


def production_version(uri: str, name: str) -> int:
    from mlflow.tracking import MlflowClient

    return int(
        MlflowClient(tracking_uri=uri, registry_uri=uri)
        .get_model_version_by_alias(name, "production")
        .version
    )


def acceptance_flow(uri: str, workdirs: dict[str, Path], name: str) -> None:
    """register -> promote (passes) -> register worse -> promote refused, production
    unchanged -> forced promotion -> rollback, all from the CLI."""
    out = cli(["models", "register", "--workdir", str(workdirs["good"]), "--name", name], uri)
    assert "candidate" in out
    out = cli(["models", "promote", name, "--version", "1"], uri)
    assert "promoted: production -> version 1" in out
    cli(["models", "register", "--workdir", str(workdirs["bad"]), "--name", name], uri)
    out = cli(["models", "promote", name, "--version", "2"], uri, expect=1)
    assert "refused" in out and "retrieval.map@10 (max_regression)" in out and "regressed by" in out
    assert production_version(uri, name) == 1
    out = cli(["models", "promote", name, "--version", "2", "--force"], uri)
    assert "forced: production -> version 2" in out and production_version(uri, name) == 2
    out = cli(["models", "rollback", name], uri)
    assert "production -> version 1 (was 2)" in out and production_version(uri, name) == 1
    out = cli(["models", "list", name], uri)
    for word in (
        "promotion history",
        "promoted",
        "refused",
        "forced",
        "rolled back",
        "production",
        "candidate",
    ):
        assert word in out, out
    narrow = cli(["models", "list", name], uri, columns=80)  # no identity cut to `candid…`
    assert "production" in narrow and "…" not in narrow, narrow
    everything = cli(["models", "list"], uri, columns=80)
    assert name in everything and "production=1" in everything, everything


@pytest.mark.integration
def test_cli_acceptance_against_mlflow_server(mlflow_server, workdirs):
    acceptance_flow(mlflow_server, workdirs, "medray-accept")
    from medray.registry import load_registered

    bundle = load_registered("models:/medray-accept@production", tracking_uri=mlflow_server)
    assert bundle.info["version"] == 1 and bundle.info["alias"] == "production"


@pytest.fixture
def mlflow_server_s3(s3_bucket, tmp_path):
    """A second `mlflow server` whose artifacts live in the loopback S3 bucket."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", f"{s3_bucket}/mlartifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=120)
        yield url, s3_bucket
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.integration
def test_register_and_load_with_artifacts_on_s3(mlflow_server_s3, workdirs):
    from medray.registry import load_registered

    uri, bucket = mlflow_server_s3
    cli(["models", "register", "--workdir", str(workdirs["good"]), "--name", "s3model"], uri)
    keys = [k for k in _s3_keys(bucket) if k.endswith("bundle/bundle.json")]
    assert keys and all(k.startswith("mlartifacts/") for k in keys), keys
    bundle = load_registered("models:/s3model@candidate", tracking_uri=uri)
    assert (
        bundle.info["version"] == 1
        and bundle.search(bundle.embed([image(workdirs["good"], 7)]), 1)[0][0]["id"] == "img007"
    )


def _s3_keys(bucket: str) -> list[str]:
    name, _ = storage.split_s3(bucket)
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=name)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]
