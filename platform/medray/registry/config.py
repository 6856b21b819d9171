"""`RegistryConfig`: model name, alias names, promotion gates and the MLflow store."""

from __future__ import annotations

from pydantic import Field

from medray.config import MlflowConfig, Section, Workdir


class GatesConfig(Section):
    """What a version must measure to take `production` (every metric: higher is better)."""

    min: dict[str, float] = Field(
        default_factory=lambda: {"retrieval.p@5": 0.3, "pair.accuracy": 0.6}
    )
    """Absolute minimums: {flattened metric name: lowest acceptable value}."""
    max_regression: dict[str, float] = Field(
        default_factory=lambda: {"retrieval.map@10": 0.02, "pair.accuracy": 0.02}
    )
    """Tolerated drop against the production version: {metric: tolerance}."""


class RegistryConfig(Section):
    """Where versions are registered and how one gets promoted."""

    workdir: Workdir = Field("workdir", validate_default=True)
    """Workdir whose parts `register` bundles (and whose mlflow.db is the default store)."""
    name: str = "medray"
    """Registered model name (the CLI's NAME / --name wins)."""
    candidate_alias: str = "candidate"
    """Alias a freshly registered version gets."""
    production_alias: str = "production"
    """Alias serving loads; moved only by a promotion that passes every gate (or --force)."""
    gates: GatesConfig = Field(default_factory=GatesConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
