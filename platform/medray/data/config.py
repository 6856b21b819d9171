"""Settings of `medray data ...` (configs/data.yaml); command-line options override them."""

from __future__ import annotations

from pydantic import Field, model_validator

from medray.config import Section, Workdir
from medray.data.decode import DEFAULT_MAX_PIXELS


class SplitConfig(Section):
    """Fractions of images (patients, when the data has patient ids) per split."""

    train: float = Field(0.7, gt=0, le=1)
    """Fraction for training (BYOL pretraining, heads, the search gallery)."""
    val: float = Field(0.15, ge=0, le=1)
    """Fraction for validation (thresholds, model selection)."""
    test: float = Field(0.15, ge=0, le=1)
    """Fraction held out for evaluation."""

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        return self

    def fractions(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)


class SynthConfig(Section):
    """The synthetic histology-like tile set of `medray data synth`."""

    n: int = Field(1000, ge=1)
    """Number of tiles."""
    size: int = Field(96, ge=32, le=1024)
    """Tile side in pixels."""
    multi_label: bool = False
    """False: one tissue class per tile. True: several components per tile (none = normal)."""
    tiles_per_patient: int = Field(10, ge=1)
    """Average tiles per synthetic patient (each patient has its own stain)."""


class DataConfig(Section):
    """`medray data import|synth` settings."""

    workdir: Workdir = Field("workdir", validate_default=True)
    """Local path or s3://bucket/prefix; the manifest goes to <workdir>/data/."""
    seed: int = 0
    """Seed for the split assignment and the synthetic tiles."""
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    """Images with more pixels than this are quarantined (decompression-bomb guard)."""
    workers: int = Field(8, ge=1)
    """Threads that read and decode files during import."""
    splits: SplitConfig = Field(default_factory=SplitConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
