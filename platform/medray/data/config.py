"""Settings of `medray data ...` (configs/data.yaml); command-line options override them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medray.config import Section, Workdir
from medray.data.decode import DEFAULT_MAX_PIXELS

SplitName = Literal["train", "val", "test"]


class SplitConfig(Section):
    """How images are divided into train/val/test.

    A source without splits of its own (a class folder, a CSV without --split-column, an
    npz with plain `images`/`labels`) is divided by the fractions `train`/`val`/`test`:
    per patient when the data has patient ids, stratified by label. A source with its own
    splits (a MedMNIST-style npz, a CSV with --split-column) keeps them, the fractions are
    unused, and `rename` then `carve_val` adjust them: e.g. `splits.rename.val=test
    splits.carve_val=0.15` on a file with only train and val makes every choice (model
    selection, thresholds, early stopping) on data cut from its train split and reports the
    file's val as test.
    """

    train: float = Field(0.7, gt=0, le=1)
    """Fraction for training (BYOL pretraining, heads, the search gallery)."""
    val: float = Field(0.15, ge=0, le=1)
    """Fraction for validation (thresholds, model selection)."""
    test: float = Field(0.15, ge=0, le=1)
    """Fraction held out for evaluation."""
    rename: dict[SplitName, SplitName] = Field(default_factory=dict)
    """Source split -> manifest split, applied first, e.g. `{val: test}` (on the command line
    `splits.rename.val=test`). Only for sources with their own splits; a target the source
    already has (and does not rename away) is an error."""
    carve_val: float = Field(0.0, ge=0, lt=1)
    """Fraction of the train split (after `rename`) moved into a new val split: stratified by
    label, whole patients when there are patient ids, seeded by `seed`. 0 = off. Only for
    sources with their own splits and no val left after `rename`."""

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {total:g}")
        targets = [t for s, t in self.rename.items() if s != t]
        if len(set(targets)) != len(targets):
            raise ValueError(f"rename {self.rename}: two source splits become the same split")
        return self

    def fractions(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)

    def adjusts_source(self) -> bool:
        """Whether `rename` or `carve_val` is set (they need a source with its own splits)."""
        return bool(self.rename) or self.carve_val > 0


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


class DicomConfig(Section):
    """`medray data import dicom`: how objects become manifest rows."""

    frames: Literal["first", "middle", "every"] = "middle"
    """Multi-frame objects (CT/MR volumes, cine loops): keep the first, the middle or every
    frame (one row each, `path#frame=N`)."""


class SlidesConfig(Section):
    """`medray data import slides`: how whole-slide images become tiles."""

    tile_size: int = Field(224, ge=16, le=4096)
    """Side of a tile as the model sees it, in pixels."""
    mpp: float | None = Field(0.5, gt=0)
    """Target microns per pixel of a tile (0.5 is about 20x); used when `level` is unset."""
    level: int | None = Field(None, ge=0)
    """Read tiles at this pyramid level instead (0 = full resolution), whatever the mpp."""
    max_tiles_per_slide: int = Field(200, ge=0)
    """Most tiles kept per slide (a seeded random choice among the tissue tiles); 0 = all."""
    min_tissue: float = Field(0.5, ge=0, le=1)
    """Fraction of a tile the tissue mask must cover for the tile to be kept."""
    write_tiles: bool = False
    """Also write each tile as a PNG under <workdir>/data/images/slides/ and point the manifest
    there; by default tiles are read from the slide whenever a stage needs them."""

    @model_validator(mode="after")
    def _check(self) -> SlidesConfig:
        if self.mpp is None and self.level is None:
            raise ValueError("set slides.mpp (microns per pixel) or slides.level")
        return self


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
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    slides: SlidesConfig = Field(default_factory=SlidesConfig)
