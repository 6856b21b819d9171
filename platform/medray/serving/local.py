"""Serve on this machine: `medray serve`, `medray demo`'s last step, and the tests.

`start(cfg)` starts (or joins) local Ray, puts Serve's HTTP proxy on `cfg.host:cfg.port`
(loopback by default), shrinks each replica's CPU reservation so the largest autoscaled
layout still fits the machine, runs the application and waits until it answers.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from medray.serving.config import ServeConfig
from medray.serving.security import KeySet, resolve_keys

HEADROOM_CPUS = 0.5
"""CPUs left free for Serve's controller and proxy and the driver."""


@dataclass
class Served:
    url: str
    keys: KeySet
    app_name: str


def deployments(cfg: ServeConfig) -> list:
    return [cfg.ingress, cfg.embedder, cfg.retriever, cfg.classifier]


def fit_resources(cfg: ServeConfig, cpus: float) -> ServeConfig:
    """A copy of `cfg` whose replicas, all at max_replicas, reserve at most `cpus - headroom`.

    On a 2-core laptop the default reservations (several CPUs at full scale-out) would
    leave replicas unscheduled; fractions keep every replica placeable while the OS still
    shares the real cores among them.
    """
    out = cfg.model_copy(deep=True)
    budget = max(cpus - HEADROOM_CPUS, 0.1)
    need = sum(d.num_cpus * d.autoscaling.max_replicas for d in deployments(out))
    if need <= budget:
        return out
    scale = budget / need
    for dep in deployments(out):
        dep.num_cpus = round(dep.num_cpus * scale, 3)
    return out


def free_port(host: str, preferred: int = 0) -> int:
    """`preferred` when it is free on `host`, else any free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port on {host}")


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}/healthz did not answer within {timeout:.0f} s")


def start(cfg: ServeConfig, keys: KeySet | None = None) -> Served:
    """Run the application locally; returns its URL and where its API keys came from."""
    from ray import serve

    from medray.raycluster import init

    check_model(cfg)  # before Ray starts: a wrong name fails in a second, in one line
    keys = keys or resolve_keys(cfg.api_keys_env, cfg.api_keys_file, generate=True)
    init(cfg.ray)
    port = cfg.port or free_port(cfg.host)
    # The proxy's address is fixed when Serve starts: it must come before serve.run.
    serve.start(
        http_options={"host": cfg.host, "port": port}, logging_config={"log_level": cfg.log_level}
    )
    deploy(cfg, keys)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    url = f"http://{host}:{port}"
    wait_healthy(url)
    return Served(url=url, keys=keys, app_name=cfg.app_name)


def model_store(cfg: ServeConfig) -> str:
    """The MLflow store the app will load from; a local workdir without one is an error
    (looking must not create an empty mlflow.db there)."""
    import os
    from pathlib import Path

    from medray import storage, tracking
    from medray import workdir as wd

    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri or storage.is_s3(cfg.workdir):
        return uri or tracking.tracking_uri(cfg.mlflow, cfg.workdir)
    db = Path(wd.mlflow_db(storage.resolve(cfg.workdir)))
    if not db.is_file():
        raise FileNotFoundError(
            f"{db}: no MLflow store here; pass the workdir that registered the model "
            "(--workdir W) or set mlflow.tracking_uri"
        )
    return f"sqlite:///{db}"


def check_model(cfg: ServeConfig) -> None:
    """The bundle or registered version `cfg` names exists, or a one-line error says what
    is missing and how to find what is there."""
    from medray import storage

    if cfg.bundle_path:
        if not storage.exists(storage.join(cfg.bundle_path, "bundle.json")):
            raise FileNotFoundError(f"{cfg.bundle_path}: not a medray bundle (no bundle.json)")
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from medray import tracking
    from medray.registry.ops import parse_model_uri

    uri = model_store(cfg)
    name, alias, version = parse_model_uri(cfg.model_uri())
    client = MlflowClient(tracking_uri=uri, registry_uri=tracking.registry_uri(uri))
    try:
        if version is None:
            client.get_model_version_by_alias(name, alias)
        else:
            client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise ValueError(
            f"{cfg.model_uri()}: not found in {uri} ({exc.error_code}); "
            "`medray models list --workdir W` shows what is registered"
        ) from None


def deploy(cfg: ServeConfig, keys: KeySet) -> None:
    """Run or update the application. Called again with only the model changed (alias or
    version), Serve keeps every replica and calls its reconfigure(): an in-place swap."""
    import ray
    from ray import serve

    from medray.serving.app import compose

    cfg = fit_resources(cfg, ray.cluster_resources().get("CPU", 1.0))
    serve.run(
        compose(cfg, keys),
        name=cfg.app_name,
        route_prefix="/",
        blocking=False,
        logging_config={"log_level": cfg.log_level},
    )


def stop() -> None:
    """Shut Serve down (the Ray it ran on stays up for whoever started it)."""
    from ray import serve

    serve.shutdown()


def post_image(url: str, path: str, key: str | None, data: bytes, name: str, k: int = 5) -> Any:
    """POST one image as multipart to `url + path`; returns (status, JSON body)."""
    boundary = "medray" + str(time.time_ns())
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(f"{url}{path}?k={k}", data=body, method="POST")
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def demo_query_image(workdir: str) -> tuple[str, list[str], bytes]:
    """A test-split image of the demo workdir: (id, labels, file bytes)."""
    from medray import storage
    from medray import workdir as wd

    manifest = storage.read_table(wd.manifest(workdir)).to_pandas()
    test = manifest[manifest["split"] == "test"]
    row = (test if len(test) else manifest).iloc[0]
    return str(row["id"]), list(row["labels"]), storage.read_bytes(str(row["uri"]))


def describe_search(answer: dict) -> str:
    lines = [f"model {answer.get('model')}, {answer.get('took_ms', 0):.0f} ms"]
    for i, n in enumerate(answer.get("neighbors", []), 1):
        lines.append(f"  #{i} {n['id']}  score {n['score']:.3f}  labels {','.join(n['labels'])}")
    return "\n".join(lines)


def serve_demo(cfg: Any, demo_result: Any, block: bool = True) -> Served:
    """`medray demo`'s ending: serve the promoted bundle, query it once, stay up until Ctrl-C."""
    if getattr(cfg, "register_bundle", True) is False or not getattr(demo_result, "model", None):
        raise ValueError("the demo registered no model, so there is nothing to serve")
    scfg = ServeConfig(
        workdir=cfg.workdir,
        model_name=cfg.model_name,
        mlflow=cfg.mlflow,
        ray=cfg.ray,
        port=free_port("127.0.0.1", preferred=8000),
    )
    served = start(scfg)
    print(
        f"serving {scfg.model_uri()} at {served.url}  (page {served.url}/, API {served.url}/docs)"
    )
    print(f"API keys: {served.keys.source}", flush=True)
    image_id, labels, data = demo_query_image(cfg.workdir)
    status, answer = post_image(served.url, "/v1/search", served.keys.local_key, data, image_id)
    print(
        f"POST {served.url}/v1/search with test image {image_id} (labels {','.join(labels)}) -> {status}"
    )
    print(describe_search(answer) if status == 200 else json.dumps(answer), flush=True)
    if block:
        wait_until_interrupted()
    return served


def wait_until_interrupted() -> None:
    print("serving until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        stop()
