"""`medray demo`: every stage in a row on the embedded default, then a summary.

Local Ray, SQLite MLflow in the workdir, local disk, bundled weights and synthetic
histology-like tiles: nothing is downloaded. Each stage runs with its default config
plus the small overrides in `DemoConfig.overrides`, exactly as `medray run` would.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from medray import pipeline
from medray.config import StageConfig
from medray.pipeline import PIPELINE, StageReport, timed

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

    def pipeline_config(self) -> pipeline.Config:
        """The `medray run pipeline` config the demo runs after synthesising its data."""
        return pipeline.Config(
            workdir=self.workdir, mlflow=self.mlflow, ray=self.ray, seed=self.seed,
            stages=self.stages, config_dir=None,
            per_stage={s: self.overrides.get(s, FAST.get(s, [])) for s in PIPELINE},
            register_as=self.model_name if self.register_bundle else None,
        )  # fmt: skip


DemoResult = pipeline.Result


def run(cfg: DemoConfig, on_done: Callable[[StageReport], None] = lambda r: None) -> DemoResult:
    """Synthesise data, then the pipeline (every stage, register, promote)."""
    from medray import data

    synth = timed(
        "data",
        lambda: data.synth(cfg.workdir, n=cfg.n_images, multi_label=cfg.multi_label, seed=cfg.seed),
        on_done,
    )
    result = pipeline.run(cfg.pipeline_config(), on_done)
    result.reports.insert(0, synth)
    return result
