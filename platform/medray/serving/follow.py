"""Serving follows the registry: the alias is resolved to one version, which is what runs.

`medray serve` never hands an alias to the deployments. It resolves `models:/<name>@<alias>`
to `models:/<name>/<version>` before it deploys, so a replica that Serve starts or restarts
later loads that exact version (not whatever the alias names by then). Following is
`RegistryFollower.tick()`, which `medray serve` calls every `follow_interval_s`: when the
alias has moved (promote, rollback) it redeploys with only the pinned version changed, and
Serve swaps every replica in place (reconfigure) while requests keep being answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from medray.serving.config import ServeConfig


def follows_alias(cfg: ServeConfig) -> bool:
    """Whether `cfg` names a registry alias (rather than a version or a bundle path)."""
    return not cfg.bundle_path and cfg.model_version is None


def alias_version(cfg: ServeConfig, tracking_uri: str | None = None) -> int:
    """The version the alias `cfg` serves points at now (a registry read, no download)."""
    from mlflow.tracking import MlflowClient

    from medray import tracking

    uri = tracking_uri or tracking.tracking_uri(cfg.mlflow, cfg.workdir)
    client = MlflowClient(tracking_uri=uri, registry_uri=tracking.registry_uri(uri))
    return int(
        client.get_model_version_by_alias(cfg.model_name, cfg.model_alias or "production").version
    )


def pin(cfg: ServeConfig, version: int) -> ServeConfig:
    """`cfg` serving exactly `version` (what every replica, started now or later, loads)."""
    return cfg.model_copy(update={"model_version": int(version)})


def pinned(cfg: ServeConfig, tracking_uri: str | None = None) -> ServeConfig:
    """`cfg` with its alias resolved to the version it names now (unchanged otherwise)."""
    return pin(cfg, alias_version(cfg, tracking_uri)) if follows_alias(cfg) else cfg


@dataclass
class RegistryFollower:
    """Redeploys the app when the alias it was started from moves to another version."""

    cfg: ServeConfig
    """The config as the user gave it (with the alias, not pinned)."""
    version: int
    """The version deployed now."""
    redeploy: Callable[[ServeConfig], None]
    """Deploys a pinned config (an in-place model swap when only the version changed)."""
    say: Callable[[str], None] = print
    history: list[dict] = field(default_factory=list)

    def tick(self) -> bool:
        """Check the alias once; swap when it moved. Returns whether a swap happened."""
        now = alias_version(self.cfg)
        if now == self.version:
            return False
        alias = f"models:/{self.cfg.model_name}@{self.cfg.model_alias or 'production'}"
        self.say(f"{alias} moved: version {self.version} -> {now}; swapping")
        started = time.monotonic()
        self.redeploy(pin(self.cfg, now))
        took = time.monotonic() - started
        self.history.append({"from": self.version, "to": now, "seconds": round(took, 2)})
        self.say(f"serving version {now} (swap took {took:.1f} s)")
        self.version = now
        return True
