"""Shared fixtures: one small local Ray for the whole session, an S3 API on loopback,
and paths to the real Kather tiles. Every fixture stops what it starts."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KATHER = REPO.parent / "shared" / "data" / "kather2016-samples"

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")  # metrics scraped in seconds
# Downloaded bundles go to a cache of this session (inherited by Ray's workers), not the
# machine-wide one, and leave with it.
os.environ["MEDRAY_CACHE_DIR"] = tempfile.mkdtemp(prefix="medray-test-cache-")
atexit.register(shutil.rmtree, os.environ["MEDRAY_CACHE_DIR"], ignore_errors=True)
# Tests never use the user's MLflow server: each stage falls back to the workdir's SQLite.
os.environ.pop("MLFLOW_TRACKING_URI", None)


def in_ci() -> bool:
    """CI must have every shared input: there a missing one fails instead of skipping."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or bool(
        os.environ.get("MEDRAY_CI")
    )


def skip_or_fail(reason: str) -> None:
    """Skip with `reason` on a developer's machine; fail in CI (.ci/run sets MEDRAY_CI=1)."""
    if in_ci():
        pytest.fail(f"{reason} (CI requires it)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kather_dir() -> Path:
    if not KATHER.is_dir():
        skip_or_fail(
            f"Kather 2016 sample tiles not found at {KATHER} (they live in ../shared/data)"
        )
    return KATHER


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray shared by every integration test (2 CPUs, no dashboard)."""
    import ray

    from medray.raycluster import quiet_ray_data

    if not ray.is_initialized():
        from medray.serving.proxy import enable

        enable()  # as raycluster.init does for a local Ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API on a loopback port; sets AWS_* env so boto3 and pyarrow reach it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("moto server did not start")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 API; yields s3://<bucket>."""
    import uuid

    import boto3

    name = f"medray-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Poll `url` until it answers 200 (a server started by a fixture is up)."""
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback (SQLite backend, local artifacts); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=120)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def cluster_process(*args: str, timeout_s: float = 90):
    """tests/ray_cluster_proc.py with `args` (a head, maybe more nodes) in its own process;
    yields the JSON line it prints once up; closing its stdin shuts the cluster down."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "ray_cluster_proc.py"), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the Ray cluster did not start (exit {proc.wait(timeout=30)})")
        yield json.loads(line)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def two_nodes():
    """Head (2 CPUs, dashboard) + one worker node (2 CPUs): a real two-raylet cluster, in its
    own process, started once for test_multinode and test_shards."""
    with cluster_process("--head-cpus", "2", "--nodes", "1", "--node-cpus", "2") as info:
        assert len(set(info["node_ids"])) == 2
        yield info
