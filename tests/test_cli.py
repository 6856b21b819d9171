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
