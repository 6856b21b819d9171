"""The config loader: YAML + overrides -> validated pydantic, errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from medray.config import (
    BackboneConfig,
    ConfigError,
    Section,
    StageConfig,
    apply_overrides,
    load_config,
    parse_override,
)


class Inner(Section):
    batch_size: int = 32
    names: list[str] = []


class DemoStage(StageConfig):
    inner: Inner = Inner()
    backbone: BackboneConfig = BackboneConfig()


def write(tmp_path, text: str):
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config(DemoStage)
    assert cfg.inner.batch_size == 32 and cfg.workdir == str(Path("workdir").resolve())


def test_local_workdir_becomes_absolute_s3_stays(tmp_path, monkeypatch):
    """Ray Train workers run elsewhere: a relative workdir (and every URI made from it)
    must not depend on the directory the command was started in."""
    monkeypatch.chdir(tmp_path)
    assert load_config(DemoStage, None, [], workdir="w").workdir == str(tmp_path / "w")
    assert load_config(DemoStage, None, [], workdir="s3://b/p").workdir == "s3://b/p"


def test_yaml_then_overrides_then_workdir(tmp_path):
    path = write(tmp_path, "workdir: /a\ninner:\n  batch_size: 8\n")
    cfg = load_config(DemoStage, path, ["inner.batch_size=16", "ray.num_workers=3"], workdir="/b")
    assert (cfg.inner.batch_size, cfg.ray.num_workers, cfg.workdir) == (16, 3, "/b")


def test_override_values_are_yaml_typed():
    assert parse_override("a.b=[x, y]") == (["a", "b"], ["x", "y"])
    assert parse_override("ray.use_gpu=true") == (["ray", "use_gpu"], True)
    assert parse_override("backbone.weights=/p/x.safetensors")[1] == "/p/x.safetensors"


def test_override_creates_sections_and_keeps_input():
    data = {"inner": {"batch_size": 1}}
    out = apply_overrides(data, ["inner.names=[a]", "mlflow.experiment=e"])
    assert out == {"inner": {"batch_size": 1, "names": ["a"]}, "mlflow": {"experiment": "e"}}
    assert data == {"inner": {"batch_size": 1}}


def test_misspelled_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "inner:\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoStage, path)
    assert str(path) in str(err.value) and "inner.batchsize: unknown key" in str(err.value)


def test_misspelled_override_names_key():
    with pytest.raises(ConfigError, match=r"inner\.batchsize: unknown key"):
        load_config(DemoStage, None, ["inner.batchsize=3"])


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "inner:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"inner\.batch_size: .*'lots'"):
        load_config(DemoStage, path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(DemoStage, tmp_path / "nope.yaml")


def test_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DemoStage, write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(DemoStage, write(tmp_path, "- 1\n- 2\n"))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("inner.batch_size")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("a..b=1")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"workdir": "x"}, ["workdir.sub=1"])
