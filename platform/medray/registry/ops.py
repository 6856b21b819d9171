"""Model registry operations: register a workdir as a version, promote through the gates,
roll back, list; every decision recorded as model version tags (who, when, metrics
compared, gate results, pass/fail, forced). Aliases only, never stages."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medray import storage, tracking
from medray.registry import gates as g
from medray.registry.bundle import BundleError, build_bundle, load_bundle
from medray.registry.config import RegistryConfig
from medray.registry.service import ServiceBundle

METRICS_TAG = "medray.metrics"
DECISION_TAG = "medray.decision."
HISTORY_TAG = "medray.production_history"
TAG_LIMIT = 4900
"""Model version tag values hold at most 5000 characters in MLflow's SQL stores."""


def _client(cfg: RegistryConfig, workdir: str | None = None, create: bool = False):
    """Point MLflow at the configured store (the registry follows it) and return a client
    bound to exactly those URIs. Only `register` (create=True) may start an embedded store:
    promote, rollback and list on a workdir without one fail in one line, creating nothing."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if not create:
        tracking.existing_tracking_uri(cfg.mlflow, workdir or cfg.workdir)
    tracking.setup(cfg.mlflow, workdir or cfg.workdir)
    return MlflowClient(
        tracking_uri=mlflow.get_tracking_uri(), registry_uri=mlflow.get_registry_uri()
    )


def key_metrics(manifest: dict) -> dict[str, float]:
    """Flattened eval metrics plus each head's headline metrics (`heads.<task>.<name>`)."""
    out = g.flatten_metrics({k: v for k, v in manifest.get("metrics", {}).items() if k != "counts"})
    for task, meta in manifest.get("tasks", {}).items():
        out.update(g.flatten_metrics(meta.get("metrics", {}), f"heads.{task}."))
    return out


def _fit_tag(metrics: dict[str, float]) -> str:
    """JSON of `metrics`, keeping the retrieval/pair/heads ones first if it must shrink."""
    keys = sorted(metrics, key=lambda k: (not k.startswith(("retrieval.", "pair.", "heads.")), k))
    text = json.dumps({k: metrics[k] for k in keys})
    while len(text) > TAG_LIMIT and keys:
        keys.pop()
        text = json.dumps({k: metrics[k] for k in keys})
    return text


def register(workdir: str, name: str, cfg: RegistryConfig) -> int:
    """Bundle the workdir's current parts, log it as a pyfunc model, register it as a new
    version of `name` and give it the candidate alias; returns the version number."""
    import mlflow

    from medray.registry.pyfunc import log_bundle_model

    workdir = storage.resolve(workdir)
    _check_parts(workdir)  # before the store is opened: a wrong workdir gets no mlflow.db
    client = _client(cfg, workdir, create=True)
    with tempfile.TemporaryDirectory(prefix="medray-bundle-") as tmp:
        bundle_dir = os.path.join(tmp, "bundle")
        manifest = build_bundle(workdir, bundle_dir, tracking_uri=mlflow.get_tracking_uri())
        load_bundle(bundle_dir)  # never register what could not be served
        metrics = key_metrics(manifest)
        params = {"name": name, "backbone_id": manifest["backbone_id"], "workdir": workdir}
        with tracking.stage_run(cfg.mlflow, workdir, "register", params) as run:
            mlflow.log_metrics({tracking.metric_name(k): v for k, v in metrics.items()})
            mlflow.log_dict({k: v for k, v in manifest.items() if k != "files"}, "bundle.json")
            info = log_bundle_model(bundle_dir, registered_model_name=name)
    version = int(info.registered_model_version)
    tags = {
        METRICS_TAG: _fit_tag(metrics),
        "medray.backbone_id": manifest["backbone_id"],
        "medray.manifest_sha256": str(manifest["lineage"].get("manifest_sha256")),
        "medray.workdir": workdir,
        "medray.lineage.runs": json.dumps(manifest["lineage"]["runs"]),
        "medray.register_run_id": run.info.run_id,
        "medray.registered_by": _who(),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, cfg.candidate_alias, str(version))
    return version


def _check_parts(workdir: str) -> None:
    """The parts a bundle needs are there (embeddings, evaluation), or a one-line error."""
    from medray import workdir as wd

    if not storage.is_s3(workdir) and not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir}: no such workdir; check --workdir")
    bid = wd.current_backbone_id(workdir)
    for uri, stage in (
        (storage.join(wd.embeddings(workdir, bid), "embed.json"), "embed"),
        (storage.join(wd.index(workdir, bid), "index.json"), "index"),
        (storage.join(wd.eval_dir(workdir), "metrics.json"), "evaluate"),
    ):
        if not storage.exists(uri):
            raise BundleError(f"{uri}: missing; run `medray run {stage} --workdir {workdir}` first")


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def _alias_version(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_metrics(client, name: str, version: int) -> dict[str, float]:
    tags = client.get_model_version(name, str(version)).tags
    return json.loads(tags.get(METRICS_TAG, "{}"))


def _history(client, name: str) -> list[int]:
    tags = client.get_registered_model(name).tags
    return [int(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]


def _record(client, name: str, versions: list[int], decision: dict) -> None:
    """Store the decision as a numbered tag on each version it concerns."""
    text = json.dumps(decision)
    if len(text) > TAG_LIMIT:  # keep the verdict, drop the detail
        text = json.dumps(
            {**decision, "gates": [r for r in decision["gates"] if not r["passed"]][:5]}
        )
    for version in dict.fromkeys(versions):
        mv = client.get_model_version(name, str(version))
        n = sum(1 for k in mv.tags if k.startswith(DECISION_TAG)) + 1
        client.set_model_version_tag(name, str(version), f"{DECISION_TAG}{n:04d}", text)
        client.set_model_version_tag(
            name, str(version), "medray.last_decision", decision["outcome"]
        )


def promote(name: str, version: int, cfg: RegistryConfig, force: bool = False) -> dict:
    """Check the gates of `version` against the production version; move the production
    alias only if all pass (or `force`). Returns the recorded decision."""
    client = _client(cfg)
    version = int(version)
    client.get_model_version(name, str(version))  # a clear error for an unknown version
    current = _alias_version(client, name, cfg.production_alias)
    candidate = version_metrics(client, name, version)
    baseline = version_metrics(client, name, current) if current is not None else None
    results = g.evaluate_gates(candidate, baseline, cfg.gates.min, cfg.gates.max_regression)
    passed = g.all_passed(results)
    moved = passed or force
    gated = sorted({r.metric for r in results})
    decision = {
        "action": "promote", "version": version, "from_version": current,
        "who": _who(), "when": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "passed": passed, "forced": bool(force and not passed), "alias_moved": moved,
        "outcome": "promoted" if passed else ("forced" if moved else "refused"),
        "metrics": {"candidate": {m: candidate.get(m) for m in gated},
                    "production": {m: baseline.get(m) for m in gated} if baseline else None},
        "gates": [r.model_dump() for r in results],
    }  # fmt: skip
    if moved:
        client.set_registered_model_alias(name, cfg.production_alias, str(version))
        if current != version:
            history = [v for v in _history(client, name) if v != version] + [version]
            client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    _record(client, name, [version] + ([current] if current is not None else []), decision)
    return decision


def rollback(name: str, cfg: RegistryConfig) -> dict:
    """Move production back to the version that held it before the current one."""
    client = _client(cfg)
    current = _alias_version(client, name, cfg.production_alias)
    history = _history(client, name)
    if current is not None and history and history[-1] == current:
        history.pop()
    if not history:
        raise ValueError(f"model {name!r}: no earlier production version to roll back to")
    target = history[-1]
    client.set_registered_model_alias(name, cfg.production_alias, str(target))
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    decision = {
        "action": "rollback", "version": target, "from_version": current, "who": _who(),
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "passed": True,
        "forced": False, "alias_moved": True, "outcome": "rolled back",
        "metrics": {"restored": version_metrics(client, name, target),
                    "replaced": version_metrics(client, name, current) if current else None},
        "gates": [],
    }  # fmt: skip
    _record(client, name, [target] + ([current] if current is not None else []), decision)
    return decision


def list_versions(name: str, cfg: RegistryConfig) -> list[dict]:
    """Every version of `name`: aliases, key metrics, backbone, and its decisions in order."""
    client = _client(cfg)
    aliases: dict[int, list[str]] = {}
    for alias, v in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(int(v), []).append(alias)
    out = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        tags = mv.tags or {}
        decisions = [json.loads(tags[k]) for k in sorted(tags) if k.startswith(DECISION_TAG)]
        out.append({
            "version": int(mv.version), "aliases": sorted(aliases.get(int(mv.version), [])),
            "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.UTC).isoformat(timespec="seconds"),
            "backbone_id": tags.get("medray.backbone_id"),
            "metrics": json.loads(tags.get(METRICS_TAG, "{}")), "decisions": decisions,
        })  # fmt: skip
    return sorted(out, key=lambda r: r["version"])


def list_models(cfg: RegistryConfig) -> list[dict]:
    """Every registered model: name, version count, latest version, aliases (alias -> version)."""
    client = _client(cfg)
    out = []
    for model in client.search_registered_models():
        found = client.search_model_versions(f"name = '{model.name}'")
        versions = [int(mv.version) for mv in found]
        out.append({
            "name": model.name, "versions": len(versions), "latest": max(versions, default=None),
            "aliases": {a: int(v) for a, v in sorted((model.aliases or {}).items())},
        })  # fmt: skip
    return sorted(out, key=lambda r: r["name"])


_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def parse_model_uri(model_uri: str) -> tuple[str, str | None, int | None]:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> (name, alias, version)."""
    m = _URI.match(model_uri)
    if not m:
        raise ValueError(
            f"model uri {model_uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
        )
    version = m["version"]
    return m["name"], m["alias"], int(version) if version else None


def load_registered(model_uri: str, tracking_uri: str | None = None, parts=None) -> ServiceBundle:
    """Load a registered version's bundle, only `parts` of it (medray.registry.bundle.PARTS;
    None: all), checksums and agreement verified.

    From `tracking_uri` when given (its registry: $MLFLOW_REGISTRY_URI or that store), else
    from the store this process's MLflow points at; the process is left pointing at it.
    The version is downloaded once per machine into the local cache (`cached_version`), so
    every replica on a node opens the same files and shares their memory-mapped pages.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        registry_uri = tracking.registry_uri(tracking_uri)
    else:
        tracking_uri, registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    # download_artifacts("models:/...") resolves the version with a client of the process's
    # default store whatever URIs it is given (MLflow 3.17): point the process at this one.
    tracking.use(tracking_uri, registry_uri)
    name, alias, version = parse_model_uri(model_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    mv = (
        client.get_model_version_by_alias(name, alias)
        if alias
        else client.get_model_version(name, str(version))
    )
    info = {"name": name, "version": int(mv.version), "alias": alias, "model_uri": model_uri}
    key = f"models|{registry_uri}|{name}|{mv.version}|{mv.run_id}|{mv.source}"
    for attempt in (1, 2):
        local = cached_version(key, model_uri, mv.version, name, tracking_uri, registry_uri)
        found = sorted(Path(local).rglob("bundle.json"))
        if not found:
            raise BundleError(f"{model_uri}: version {mv.version} holds no bundle.json")
        try:
            return load_bundle(str(found[0].parent), info=info, parts=parts)
        except BundleError:
            if attempt == 2:
                raise
            shutil.rmtree(local, ignore_errors=True)  # a damaged cached copy: download again
    raise AssertionError("unreachable")


def cached_version(
    key: str, model_uri: str, version, name: str, tracking_uri: str, registry_uri: str
) -> str:
    """Local directory of a registered version's artifacts (medray.index.load.cache_dir):
    downloaded once into a temp directory beside it, then renamed into place, so replicas
    starting together never see half a download (the loser of a race drops its copy)."""
    import mlflow

    from medray.index.load import cache_dir

    final = cache_dir(key)
    if os.path.isdir(final):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".dl-", dir=os.path.dirname(final))
    try:
        # Transient storage errors (S3 away, reset, throttled) are retried with backoff;
        # MLflow flattens them into an MlflowException, hence the message check.
        storage.retrying(
            f"download {model_uri} (version {version})",
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}",
                dst_path=tmp,
                tracking_uri=tracking_uri,
                registry_uri=registry_uri,
            ),
            transient=lambda e: storage.is_transient(e) or storage.transient_text(str(e)),
        )
        try:
            os.rename(tmp, final)
        except OSError:  # another process put its copy there first
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def register_and_promote(workdir: str, name: str, cfg: Any) -> dict:
    """Register the workdir as a new version and promote it through the gates (the demo's
    last step). `cfg` is a RegistryConfig or any StageConfig (its mlflow section is used)."""
    reg = (
        cfg
        if isinstance(cfg, RegistryConfig)
        else RegistryConfig(workdir=workdir, mlflow=cfg.mlflow)
    )
    version = register(workdir, name, reg)
    decision = promote(name, version, reg)
    return {
        "name": name, "version": version, "outcome": decision["outcome"],
        "model_uri": f"models:/{name}@{reg.production_alias}",
        "failing_gates": [r["reason"] and f"{r['metric']}: {r['reason']}" for r in decision["gates"] if not r["passed"]],
    }  # fmt: skip
