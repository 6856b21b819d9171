"""Service bundles in the MLflow model registry: register, gated promotion, rollback.

- `build_bundle` / `load_bundle` (medray.registry.bundle): one checksummed directory with
  backbone, index, gallery, heads, thresholds, metrics and lineage; `ServiceBundle` serves it.
- `register(workdir, name, cfg)`: the workdir's current parts as a new version (a pyfunc
  model logged from code, nothing pickled), alias `candidate`.
- `promote(name, version, cfg)`: absolute minimums and no regression against `production`
  (medray.registry.gates); the alias moves only when every gate passes (or `force`).
- `rollback(name, cfg)`, `list_versions(name, cfg)`, `list_models(cfg)`, `load_registered(model_uri)`.
Every decision is recorded as model version tags (who, when, metrics, gates, outcome).
"""

import importlib

_EXPORTS = {
    "BundleError": "bundle",
    "build_bundle": "bundle",
    "load_bundle": "bundle",
    "GatesConfig": "config",
    "RegistryConfig": "config",
    "list_versions": "ops",
    "list_models": "ops",
    "load_registered": "ops",
    "promote": "ops",
    "register": "ops",
    "register_and_promote": "ops",
    "rollback": "ops",
    "ServiceBundle": "service",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import on first use: `medray models promote` names a missing store in one line before
    anything imports torch (bundle, service) or MLflow."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medray.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"medray.registry.{_EXPORTS[name]}"), name)
