"""`medray run pipeline`: stage selection, per-stage overrides, and a real run from the CLI."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from medray import pipeline
from medray.cli import app
from medray.config import ConfigError

runner = CliRunner()


def test_stage_range_is_inclusive_and_ordered():
    assert pipeline.stage_range() == list(pipeline.PIPELINE)
    assert pipeline.stage_range("index", "evaluate") == ["index", "heads", "evaluate"]
    assert pipeline.stage_range(None, "select") == ["pretrain", "select"]
    with pytest.raises(ValueError, match="comes after"):
        pipeline.stage_range("heads", "embed")
    with pytest.raises(ValueError, match="from_stage: unknown stage 'indx'"):
        pipeline.stage_range("indx")


def test_config_from_args_routes_overrides(tmp_path):
    cfg = pipeline.config_from_args(
        str(tmp_path),
        ["seed=3", "heads:epochs=2", "ray.num_cpus=1"],
        config_dir=None,
        from_stage="embed",
        to_stage="heads",
    )
    assert cfg.selected() == ["embed", "adapt", "index", "heads"]
    heads = pipeline.stage_config("heads", cfg)
    index = pipeline.stage_config("index", cfg)
    assert (heads.epochs, heads.seed, heads.ray.num_cpus) == (2, 3, 1)
    assert (index.seed, index.ray.num_cpus, index.workdir) == (3, 1, str(tmp_path))
    with pytest.raises(ConfigError, match="unknown stage"):
        pipeline.config_from_args(str(tmp_path), [], stages="embed,nope")
    with pytest.raises(ConfigError, match="epoch: unknown key"):
        cfg = pipeline.config_from_args(str(tmp_path), ["heads:epoch=2"], config_dir=None)
        pipeline.run(cfg)  # every stage config is checked before the first stage runs


def test_run_pipeline_from_the_cli(tmp_path):
    from heads_fixtures import write_embeddings

    write_embeddings(tmp_path, n=60)
    res = runner.invoke(app, ["run", "pipeline", "--workdir", str(tmp_path), "--from", "index",
                              "--to", "index", "ray.num_cpus=1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "stages=index" in res.output and "pipeline summary" in res.output
    assert (tmp_path / "index" / "fake-0123456789" / "index.json").is_file()
    res = runner.invoke(app, ["run", "pipeline", "--workdir", str(tmp_path), "--from", "nope"])
    assert res.exit_code == 2 and "from_stage: unknown stage 'nope'" in res.output
    res = runner.invoke(app, ["run", "index", "--workdir", str(tmp_path), "--register", "m"])
    assert res.exit_code == 2 and "go with `medray run pipeline`" in res.output
