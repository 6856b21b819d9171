"""Every YAML under configs/ (recursively) loads and validates against its schema, opens
with the command that uses it, and stage configs equal the built-in defaults so that
`--workdir` alone and `-c configs/STAGE.yaml` run the same thing."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from medray.config import load_config, read_yaml
from medray.stages import STAGES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Non-stage configs: file stem -> "module:Class".
SCHEMAS = {
    "demo": "medray.demo:DemoConfig",
    "data": "medray.data:DataConfig",
    "serve": "medray.serving.config:ServeConfig",
    "registry": "medray.registry:RegistryConfig",
}


def schema_for(path: Path):
    stem = path.stem
    if stem in STAGES:
        return importlib.import_module(STAGES[stem]).Config
    if stem not in SCHEMAS:
        pytest.fail(f"{path}: no schema registered for this config in tests/test_configs.py")
    module, name = SCHEMAS[stem].split(":")
    return getattr(importlib.import_module(module), name)


ALL = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))


def test_configs_exist():
    assert {p.stem for p in ALL} >= {"demo"}


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_validates(path: Path):
    model = schema_for(path)
    load_config(model, path)
    assert read_yaml(path) is not None


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_opens_with_its_command(path: Path):
    first = path.read_text().splitlines()[:4]
    assert first[0].startswith("#"), f"{path} must open with a comment"
    assert any("medray" in line or "python jobs/" in line for line in first), (
        f"{path}: the opening comment must give the command that uses it"
    )


@pytest.mark.parametrize(
    "path", [p for p in ALL if p.parent == CONFIGS and p.stem in {*STAGES, "demo"}], ids=str
)
def test_top_level_stage_configs_equal_defaults(path: Path):
    model = schema_for(path)
    from_file = load_config(model, path).model_dump()
    defaults = load_config(model).model_dump()
    assert from_file == defaults, f"{path} drifted from the defaults of {model.__name__}"
