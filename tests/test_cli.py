"""The command line: groups, stage errors, and the config error contract from the shell."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from medray.cli import app

runner = CliRunner()


def test_help_lists_command_groups():
    out = runner.invoke(app, ["--help"]).output
    for group in ("run", "data", "demo"):
        assert group in out


def test_unknown_stage_is_a_clear_error():
    res = runner.invoke(app, ["run", "fly", "--workdir", "/tmp/x"])
    assert res.exit_code == 2 and "unknown stage 'fly'" in res.output


def test_misspelled_config_key_from_the_shell(tmp_path):
    cfg = tmp_path / "embed.yaml"
    cfg.write_text("embedd:\n  batch_size: 4\n")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "medray",
            "run",
            "embed",
            "-c",
            str(cfg),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert f"{cfg}: embedd: unknown key" in res.stdout + res.stderr


def test_serve_unknown_model_fails_in_one_line_before_deploying(tmp_path):
    missing = tmp_path / "nowhere"
    res = runner.invoke(app, ["serve", "--workdir", str(missing), "model_name=nosuch"])
    assert res.exit_code == 2 and "no MLflow store here" in res.output
    assert not missing.exists()  # looking created nothing
    from medray import tracking
    from medray.config import MlflowConfig

    tracking.setup(MlflowConfig(), str(tmp_path))  # an empty but real store
    res = runner.invoke(app, ["serve", "--workdir", str(tmp_path), "model_name=nosuch"])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "models:/nosuch@production: not found" in errors[0]
