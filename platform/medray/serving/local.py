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
from collections.abc import Callable
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
    cfg: ServeConfig
    """The config deployed: the alias resolved to the version now served."""


def deployments(cfg: ServeConfig) -> list:
    return [cfg.ingress, cfg.embedder, cfg.retriever, cfg.classifier]


def fit_resources(cfg: ServeConfig, cpus: float, shards: int = 1) -> ServeConfig:
    """A copy of `cfg` whose replicas, all at max_replicas, reserve at most `cpus - headroom`
    (with `shards` Retriever deployments for a sharded index).

    On a 2-core laptop the default reservations (several CPUs at full scale-out) would
    leave replicas unscheduled; fractions keep every replica placeable while the OS still
    shares the real cores among them.
    """
    out = cfg.model_copy(deep=True)
    budget = max(cpus - HEADROOM_CPUS, 0.1)
    need = sum(d.num_cpus * d.autoscaling.max_replicas for d in deployments(out))
    need += (shards - 1) * out.retriever.num_cpus * out.retriever.autoscaling.max_replicas
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
    from medray.serving.follow import pinned

    check_model(cfg)  # before Ray starts: a wrong name fails in a second, in one line
    cfg = pinned(cfg, model_store(cfg) if not cfg.bundle_path else None)
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
    return Served(url=url, keys=keys, app_name=cfg.app_name, cfg=cfg)


def model_store(cfg: ServeConfig) -> str:
    """The MLflow store the app will load from; a local workdir without one is an error
    (looking must not create an empty mlflow.db there)."""
    from medray import tracking

    return tracking.existing_tracking_uri(
        cfg.mlflow,
        cfg.workdir,
        "pass the workdir that registered the model (--workdir W), set mlflow.tracking_uri "
        "(or $MLFLOW_TRACKING_URI), or serve a bundle directory with bundle_path=DIR",
    )


def check_model(cfg: ServeConfig) -> None:
    """The bundle or registered version `cfg` names exists, or a one-line error says what
    is missing and how to find what is there.

    Cheap on purpose (it runs before anything is deployed, and a typo should fail in a
    second): the embedded SQLite store is read with the standard library; only another
    store (an MLflow server) costs importing MLflow. Neither imports Ray or torch.
    """
    from medray import storage, tracking

    if cfg.bundle_path:
        if not storage.exists(storage.join(cfg.bundle_path, "bundle.json")):
            raise FileNotFoundError(
                f"{cfg.bundle_path}: not a medray bundle (no bundle.json); build one with "
                "`medray models register` or pass a registered model (model_name=...)"
            )
        return
    uri = model_store(cfg)
    registry = tracking.registry_uri(uri)
    name, version = cfg.model_name, cfg.model_version
    alias = None if version is not None else (cfg.model_alias or "production")
    found = _sqlite_lookup(registry, name, alias, version)
    if found is None:
        found = _client_lookup(uri, registry, name, alias, version)
    ok, there = found
    if not ok:
        pick = "" if there.startswith("no model") else "serve one of those (model_name=, "
        pick += "" if not pick else "model_alias= or model_version=) or "
        raise ValueError(
            f"{cfg.model_uri()}: not found in {registry} ({there}); {pick}register one "
            "with `medray models register --workdir W`"
        )


def _describe(models: dict[str, dict]) -> str:
    """{name: {"versions": [..], "aliases": {alias: version}}} as a short phrase."""
    if not models:
        return "no model is registered there"
    parts = []
    for name, info in sorted(models.items())[:10]:
        versions = ",".join(str(v) for v in sorted(info["versions"])[-5:]) or "-"
        aliases = " ".join(f"@{a}=v{v}" for a, v in sorted(info["aliases"].items()))
        parts.append(f"{name} v{versions}" + (f" {aliases}" if aliases else ""))
    more = f" and {len(models) - 10} more" if len(models) > 10 else ""
    return "registered: " + "; ".join(parts) + more


def _sqlite_lookup(
    registry: str, name: str, alias: str | None, version: int | None
) -> tuple[bool, str] | None:
    """(found, what is registered) read from an embedded SQLite store with sqlite3 (read
    only), or None when `registry` is not one or its tables are not the expected ones."""
    import sqlite3

    if not registry.startswith("sqlite:///"):
        return None
    path = registry[len("sqlite:///") :]
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        live = "current_stage IS NULL OR current_stage != 'Deleted_Internal'"
        if version is not None:
            sql = f"SELECT 1 FROM model_versions WHERE name = ? AND version = ? AND ({live})"
            row = con.execute(sql, (name, int(version))).fetchone()
        else:
            sql = "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?"
            row = con.execute(sql, (name, alias)).fetchone()
        if row is not None:
            return True, ""
        models: dict[str, dict] = {}
        for n, v in con.execute(f"SELECT name, version FROM model_versions WHERE {live}"):
            models.setdefault(n, {"versions": [], "aliases": {}})["versions"].append(int(v))
        for n, a, v in con.execute("SELECT name, alias, version FROM registered_model_aliases"):
            models.setdefault(n, {"versions": [], "aliases": {}})["aliases"][a] = int(v)
        return False, _describe(models)
    except sqlite3.Error:  # not MLflow's schema (another version): ask MLflow itself
        return None
    finally:
        con.close()


def _client_lookup(
    uri: str, registry: str, name: str, alias: str | None, version: int | None
) -> tuple[bool, str]:
    """(found, what is registered) asked through MLflow's client (a server, another store)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=registry)
    try:
        if version is None:
            client.get_model_version_by_alias(name, alias)
        else:
            client.get_model_version(name, str(version))
        return True, ""
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    try:
        models = {
            m.name: {"versions": [int(v.version) for v in m.latest_versions or []],
                     "aliases": {a: int(v) for a, v in (m.aliases or {}).items()}}
            for m in client.search_registered_models(max_results=50)
        }  # fmt: skip
        return False, _describe(models)
    except MlflowException as exc:
        return False, f"could not list its models: {exc.error_code}"


def deploy(cfg: ServeConfig, keys: KeySet) -> None:
    """Run or update the application. Called again with only the model changed (alias or
    version), Serve keeps every replica and calls its reconfigure(): an in-place swap."""
    import ray
    from ray import serve

    from medray.serving.app import bundle_shards, compose

    shards = bundle_shards(cfg)
    cfg = fit_resources(cfg, ray.cluster_resources().get("CPU", 1.0), shards)
    serve.run(
        compose(cfg, keys, shards),
        name=cfg.app_name,
        route_prefix="/",
        blocking=False,
        logging_config={"log_level": cfg.log_level},
    )


def follower(user_cfg: ServeConfig, served: Served, say: Any = print) -> Any:
    """A RegistryFollower that keeps `served` on the version `user_cfg`'s alias names, or
    None when it serves a fixed version or bundle (or follow_interval_s is 0)."""
    from medray.serving.follow import RegistryFollower, follows_alias

    if not follows_alias(user_cfg) or user_cfg.follow_interval_s <= 0:
        return None
    return RegistryFollower(
        user_cfg, int(served.cfg.model_version), lambda c: deploy(c, served.keys), say
    )


def serve_until_stopped(user_cfg: ServeConfig, served: Served, say: Any = print) -> None:
    """Block until SIGINT/SIGTERM, following the registry alias meanwhile (when it has one)."""
    follow = follower(user_cfg, served, say)
    if follow is not None:
        say(
            f"following models:/{user_cfg.model_name}@{user_cfg.model_alias}: a promotion or "
            f"rollback is served within {user_cfg.follow_interval_s:g} s plus the swap"
        )
    wait_until_interrupted(
        on_tick=follow.tick if follow else None, every_s=user_cfg.follow_interval_s or 5.0
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
        serve_until_stopped(scfg, served)
    return served


def wait_until_interrupted(on_tick: Callable[[], None] | None = None, every_s: float = 5.0) -> None:
    """Block until SIGINT or SIGTERM, calling `on_tick()` every `every_s` seconds meanwhile
    (an exception from it is logged as one line, not fatal); then stop within seconds:
    Serve, the Ray this process started and every process of it (medray.serving.lifecycle)."""
    from medray.serving import lifecycle

    print("serving until Ctrl-C or SIGTERM", flush=True)
    lifecycle.serve_until_signal(on_tick, every_s, say=lambda text: print(text, flush=True))
