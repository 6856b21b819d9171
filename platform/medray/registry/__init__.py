"""Service bundles in the MLflow model registry: register, gated promotion, rollback.

- `build_bundle` / `load_bundle` (medray.registry.bundle): one checksummed directory with
  backbone, index, gallery, heads, thresholds, metrics and lineage; `ServiceBundle` serves it.
- `register(workdir, name, cfg)`: the workdir's current parts as a new version (a pyfunc
  model logged from code, nothing pickled), alias `candidate`.
- `promote(name, version, cfg)`: absolute minimums and no regression against `production`
  (medray.registry.gates); the alias moves only when every gate passes (or `force`).
- `rollback(name, cfg)`, `list_versions(name, cfg)`, `load_registered(model_uri)`.
Every decision is recorded as model version tags (who, when, metrics, gates, outcome).
"""

from medray.registry.bundle import BundleError, build_bundle, load_bundle
from medray.registry.config import GatesConfig, RegistryConfig
from medray.registry.ops import (
    list_versions,
    load_registered,
    promote,
    register,
    register_and_promote,
    rollback,
)
from medray.registry.service import ServiceBundle

__all__ = [
    "BundleError",
    "GatesConfig",
    "RegistryConfig",
    "ServiceBundle",
    "build_bundle",
    "list_versions",
    "load_bundle",
    "load_registered",
    "promote",
    "register",
    "register_and_promote",
    "rollback",
]
