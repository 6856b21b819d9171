"""The Serve application: a FastAPI ingress composing Embedder, Retriever and Classifier.

A bundle whose index is sharded (`index.shards: N`, medray.index.shards) gets one Retriever
deployment per shard (`Retriever-s0` ...), each autoscaled on its own by the `retriever`
section, the shard number in its user_config; the ingress fans a search out to all and
merges the top k. Placement: Serve schedules replicas with Ray's SPREAD strategy (its
default), so shards land on different nodes when they can; `shard_memory_mb` makes that a
hard limit (each shard replica reserves that much of Ray's `memory` resource). Per-replica
placement groups (`placement_group_bundles`) and `max_replicas_per_node` act within one
deployment, so they cannot keep two shards apart.

`build_app(args)` is the import path `serve deploy serve/config.yaml` uses
(`medray.serving.app:build_app`); `compose(cfg, keys)` is what `medray serve` runs.
Nothing here touches Ray or a model at import time.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from medray.config import validate
from medray.serving.api import create_api
from medray.serving.backend import HandleBackend
from medray.serving.config import DeploymentConfig, Limits, ServeConfig
from medray.serving.deployments import Classifier, Embedder, Retriever, ShardRetriever
from medray.serving.security import KeySet, resolve_keys


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front door: parses and checks requests, then calls the model deployments."""

    def __init__(self, embedder, retriever, classifier, key_digests: list[str], limits: dict):
        self.backend = HandleBackend(embedder, retriever, classifier)
        self.key_digests = tuple(key_digests)
        self.limits = Limits.model_validate(limits)

    def __serve_build_asgi_app__(self):
        return create_api(self.backend, self.key_digests, self.limits)


def model_user_config(cfg: ServeConfig) -> dict[str, Any]:
    """The user_config every model deployment gets: change it to swap models in place."""
    uri = cfg.model_uri()
    tracking = None
    if uri.startswith("models:/"):
        from medray.tracking import tracking_uri

        tracking = tracking_uri(cfg.mlflow, cfg.workdir)
    return {"model_uri": uri, "tracking_uri": tracking}


def resolve_gpus(value: float | str) -> float:
    if value != "auto":
        return float(value)
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def deployment_options(dep: DeploymentConfig, user_config: dict | None = None) -> dict[str, Any]:
    """Ray Serve .options() of one deployment from its config section."""
    opts: dict[str, Any] = {
        "autoscaling_config": dep.autoscaling.model_dump(),
        "max_ongoing_requests": dep.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": dep.num_cpus, "num_gpus": resolve_gpus(dep.num_gpus)},
    }
    if user_config is not None:
        opts["user_config"] = user_config
    return opts


def bundle_shards(cfg: ServeConfig) -> int:
    """How many shards the served bundle's index has (1: not sharded), read from its
    manifest: the bundle directory's, or the registered version's run (bundle.json)."""
    from medray import storage

    uri = cfg.model_uri()
    if not uri.startswith("models:/"):
        return index_shards(storage.read_json(storage.join(uri, "bundle.json")))
    import tempfile

    from mlflow.tracking import MlflowClient

    from medray.registry.ops import parse_model_uri
    from medray.tracking import registry_uri, tracking_uri

    store = tracking_uri(cfg.mlflow, cfg.workdir)
    client = MlflowClient(tracking_uri=store, registry_uri=registry_uri(store))
    name, alias, version = parse_model_uri(uri)
    if alias:
        mv = client.get_model_version_by_alias(name, alias)
    else:
        mv = client.get_model_version(name, str(version))
    with tempfile.TemporaryDirectory(prefix="medray-manifest-") as tmp:
        path = client.download_artifacts(mv.run_id, "bundle.json", tmp)
        return index_shards(storage.read_json(path))


def index_shards(manifest: dict) -> int:
    return int((manifest.get("index") or {}).get("shards") or 1)  # older bundles: 1


def retrievers(cfg: ServeConfig, user_config: dict, shards: int) -> Application | list:
    """The Retriever deployment, or one per shard (`Retriever-s<i>`, same scaling each)."""
    if shards <= 1:
        return versioned(Retriever, deployment_options(cfg.retriever, user_config))
    out = []
    for i in range(shards):
        opts = deployment_options(cfg.retriever, {**user_config, "shard": i})
        if cfg.shard_memory_mb:
            opts["ray_actor_options"]["memory"] = int(cfg.shard_memory_mb * 2**20)
        out.append(versioned(ShardRetriever, {**opts, "name": f"Retriever-s{i}"}))
    return out


def compose(cfg: ServeConfig, keys: KeySet, shards: int | None = None) -> Application:
    """Bind the deployments into one application (ingress -> embedder, retriever(s),
    classifier); `shards`: the bundle's index shards (None: read from the bundle)."""
    user_config = model_user_config(cfg)
    emb = cfg.embedder
    embedder = versioned(
        Embedder, deployment_options(emb, user_config), emb.max_batch_size, emb.batch_wait_timeout_s
    )
    retriever = retrievers(cfg, user_config, bundle_shards(cfg) if shards is None else shards)
    classifier = versioned(Classifier, deployment_options(cfg.classifier, user_config))
    return versioned(
        Ingress,
        deployment_options(cfg.ingress),
        embedder,
        retriever,
        classifier,
        list(keys.digests),
        cfg.limits.model_dump(),
    )


def versioned(deployment: Any, options: dict[str, Any], *init_args: Any) -> Application:
    """`deployment.options(**options).bind(*init_args)` with a code version derived from what
    a replica is built from (its init args and resources, not user_config or autoscaling).

    serve.run gives an unversioned deployment a random code version, so every redeploy
    restarted every replica, and requests in flight during a model swap failed. With a
    stable version, a redeploy that changes only user_config (the model) is a lightweight
    update: Serve calls reconfigure() on the running replicas.
    """
    built_from = [
        options.get("name", deployment.name),
        [a for a in init_args if not binds(a)],
        options.get("ray_actor_options"),
    ]
    version = hashlib.sha256(json.dumps(built_from, sort_keys=True, default=str).encode())
    # `version` is Serve's internal option (removed from the public options() in Ray 2.x).
    opts = {**options, "version": version.hexdigest()[:16], "_internal": True}
    return deployment.options(**opts).bind(*init_args)


def binds(arg: Any) -> bool:
    """A bound deployment, or a list of them (the shard retrievers)."""
    if isinstance(arg, (list, tuple)):
        return bool(arg) and all(isinstance(a, Application) for a in arg)
    return isinstance(arg, Application)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for `serve deploy` / `serve run medray.serving.app:build_app`.

    `args` is a ServeConfig mapping; API keys come from its env var or secrets file on
    the cluster (a deploy without keys is refused rather than left open).
    """
    from medray.serving.follow import pinned

    cfg = validate(ServeConfig, dict(args or {}), "serve args")
    keys = resolve_keys(cfg.api_keys_env, cfg.api_keys_file, generate=False)
    # Pinned at build time, so restarted replicas load this version; after a promotion,
    # `serve deploy` again (or run `medray serve`, which follows the alias by itself).
    return compose(pinned(cfg), keys)
