"""Typed, YAML-backed configs shared by every stage.

Each stage module defines its own config (a subclass of `StageConfig`) beside its
code; this module holds the shared sections and the loader. Unknown keys, wrong
types and missing files fail with one line naming the file, the key and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from medray import storage


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file and key."""


class Section(BaseModel):
    """Base for every config section: unknown keys are refused, not ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(Section):
    """Which encoder turns an image into an embedding (timm name + where its weights come from)."""

    name: str = "efficientnet_lite0"
    """timm model name, e.g. efficientnet_lite0, resnet50, convnext_tiny."""
    weights: str = "bundled"
    """`bundled` (offline EfficientNet-Lite0 ImageNet weights from a pip package), `pretrained`
    (timm hub download, needs network), `random`, or a path/URI to .safetensors, .pth or a
    medray BYOL export."""
    input_size: int | None = None
    """Square input side in pixels; None: chosen from the data by `medray run select/embed`
    (about 4x the images' own side, between 64 and the model's pretrained default, so
    28 px X-rays are embedded at 128 px and histology tiles at the model's 224)."""
    mean: tuple[float, float, float] | None = None
    """Normalisation mean; None takes the model's pretrained default."""
    std: tuple[float, float, float] | None = None
    """Normalisation std; None takes the model's pretrained default."""
    pooling: Literal["avg", "multiscale"] = "multiscale"
    """`avg`: the model's own pooled features. `multiscale`: the global average of the last
    `levels` intermediate feature maps and of the final one, each L2-normalised, concatenated
    (mid-level texture and shape features; on 28 px chest X-rays they lift a linear probe
    from 0.94 to 0.95 ACC, see the README's quality section)."""
    levels: int = Field(3, ge=1)
    """Intermediate feature levels (timm `feature_info`, counted from the deepest) that
    `multiscale` pools."""
    tta: Literal["none", "hflip"] = "hflip"
    """`hflip`: average the features of the image and its mirror image (a stabler embedding
    for one extra forward pass)."""


class MlflowConfig(Section):
    """Where runs and model versions are recorded."""

    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI, else the embedded sqlite:///<workdir>/mlflow.db."""
    experiment: str = "medray"
    """Experiment name every stage logs into."""


class RayConfig(Section):
    """How a stage connects to Ray and how much of it it uses."""

    address: str | None = None
    """None/`local`: start (or reuse) Ray in this process; `auto` or ray://... to join a cluster."""
    num_cpus: int | None = None
    """CPUs for a locally started Ray; None lets Ray count them."""
    num_workers: int = 1
    """Data-parallel workers (Ray Train) or max actors (Ray Data) for the stage."""
    use_gpu: bool | Literal["auto"] = "auto"
    """`auto` uses GPUs when Ray sees any."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker/actor."""
    metrics_export_port: int | None = None
    """A locally started Ray serves Prometheus metrics (Ray's and medray's) on this port;
    None: a port Ray picks. Clusters set it with `ray start --metrics-export-port`."""


Workdir = Annotated[str, AfterValidator(storage.resolve)]
"""A workdir; a local one is made absolute: Ray Train workers and Ray tasks run in other
directories, so a relative path (and every URI made from it) would point elsewhere."""


class StageConfig(Section):
    """Fields every stage config carries."""

    workdir: Workdir = Field("workdir", validate_default=True)
    """Local path or s3://bucket/prefix all stages read from and write to."""
    seed: int = 0
    """Seed for every random choice the stage makes."""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


C = TypeVar("C", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` set (creating sections as needed)."""
    out = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(model: type[C], data: dict[str, Any], source: str) -> C:
    """Validate `data` against `model`; the first error becomes one clear line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err, source) for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def _describe(err: dict[str, Any], source: str) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        reason = "unknown key"
    elif err["type"] == "missing":
        reason = "required key is missing"
    else:
        reason = f"{err['msg']} (got {err.get('input')!r})"
    return f"{source}: {key}: {reason}"


def load_config(
    model: type[C],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    **top_level: Any,
) -> C:
    """Load `model` from an optional YAML file, then `key=value` overrides, then keyword
    arguments for top-level keys that are not None (e.g. workdir from the CLI)."""
    data = read_yaml(path) if path else {}
    source = str(path) if path else "<defaults>"
    data = apply_overrides(data, overrides or [])
    if overrides:
        source += " + overrides"
    data.update({k: v for k, v in top_level.items() if v is not None})
    return validate(model, data, source)
