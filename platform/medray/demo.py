"""`medray demo`: every stage in a row on the embedded default, then a summary.

Local Ray, SQLite MLflow in the workdir, local disk, bundled weights and synthetic
histology-like tiles: nothing is downloaded. Each stage runs with its default config
plus the small overrides in `DemoConfig.overrides`, exactly as `medray run` would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from medray import stages
from medray.config import Section, StageConfig, load_config

PIPELINE = ("pretrain", "select", "embed", "adapt", "index", "heads", "evaluate")
FAST: dict[str, list[str]] = {
    # Minutes on a laptop CPU, not hours: two short BYOL epochs at the tiles' own size,
    # a smaller proxy sample, two head trials (linear and MLP) trained side by side.
    "pretrain": ["epochs=2", "image_size=96", "knn_max_images=300"],
    "select": ["proxy_size=180"],
    "heads": ["search.arch=[linear,mlp]", "search.lr=[0.01]", "search.weight_decay=[0.0]",
              "max_concurrent=2", "epochs=100"],
    "evaluate": ["n_pairs=1000"],
}  # fmt: skip
"""The demo's overrides of each stage's defaults; `overrides` in the config replaces a stage's."""


class DemoConfig(StageConfig):
    """The demo: how much data, which stages, and per-stage overrides."""

    n_images: int = 1200
    """Synthetic tiles to generate (>= 1000 so retrieval metrics are meaningful)."""
    multi_label: bool = False
    """Generate the multi-label variant (several tissue components per tile)."""
    stages: list[str] = list(PIPELINE)
    """Stages to run, in data-flow order."""
    overrides: dict[str, list[str]] = Field(default_factory=dict)
    """Per-stage key=value lists; a stage listed here uses them instead of its FAST ones."""
    model_name: str = "medray-demo"
    """Registered model name for the demo bundle."""
    register_bundle: bool = True
    """Register the bundle in MLflow and promote it to production."""


class StageReport(BaseModel):
    stage: str
    seconds: float
    result: dict[str, Any]


class DemoResult(BaseModel):
    workdir: str
    reports: list[StageReport]
    metrics: dict[str, Any] = {}
    model: dict[str, Any] = {}


class _Unused(Section):
    pass


def timed(name: str, fn: Callable[[], Any], on_done: Callable[[StageReport], None]) -> StageReport:
    start = time.perf_counter()
    result = fn()
    data = result.model_dump(mode="json") if isinstance(result, BaseModel) else dict(result or {})
    report = StageReport(stage=name, seconds=round(time.perf_counter() - start, 1), result=data)
    on_done(report)
    return report


def run_stage(name: str, cfg: DemoConfig) -> Any:
    module = stages.load_stage(name)
    overrides = cfg.overrides.get(name, FAST.get(name, []))
    stage_cfg = load_config(
        module.Config,
        None,
        overrides,
        workdir=cfg.workdir,
        mlflow=cfg.mlflow.model_dump(),
        ray=cfg.ray.model_dump(),
    )
    return module.run(stage_cfg)


def run(cfg: DemoConfig, on_done: Callable[[StageReport], None] = lambda r: None) -> DemoResult:
    """Synthesise data, run every stage, register and promote; returns per-stage reports."""
    from medray import data

    reports = [
        timed(
            "data",
            lambda: data.synth(
                cfg.workdir, n=cfg.n_images, multi_label=cfg.multi_label, seed=cfg.seed
            ),
            on_done,
        )
    ]
    for name in cfg.stages:
        reports.append(timed(name, lambda n=name: run_stage(n, cfg), on_done))
    out = DemoResult(workdir=cfg.workdir, reports=reports)
    evaluate = next((r for r in reports if r.stage == "evaluate"), None)
    if evaluate:
        out.metrics = evaluate.result
    if cfg.register_bundle:
        from medray.registry import register_and_promote

        report = timed(
            "register", lambda: register_and_promote(cfg.workdir, cfg.model_name, cfg), on_done
        )
        out.reports.append(report)
        out.model = report.result
    return out
