"""The command line: groups, stage errors, and the config error contract from the shell."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


# ---------------------------------------------------------------- one-line failures
# Every expected failure: exit 2 (1 is only a refused promotion), one line naming what is
# missing and how to fix it, no traceback, and nothing created where the command looked.


def medray(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "medray", *args], capture_output=True,
                         text=True, cwd=cwd, timeout=300)  # fmt: skip
    return res, time.monotonic() - start


def only_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A workdir holding a real but empty MLflow store (no registered model)."""
    from medray import tracking
    from medray.config import MlflowConfig

    work = tmp_path_factory.mktemp("empty-store")
    tracking.setup(MlflowConfig(), str(work))
    return work


HEAVY = ("ray", "torch", "mlflow")
WATCH_IMPORTS = (
    "import sys\n"
    "from medray.cli import main\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    f"    print('heavy imports:', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
)


def test_serve_unknown_model_is_one_line_exit_2_in_seconds(empty_store, tmp_path):
    """The acceptance case: `medray serve model_name=nosuch` fails in one line, exit 2,
    before Ray, torch or even MLflow is imported (the embedded store is read with sqlite3).
    The time is printed, not asserted: 1.3-2 s on a quiet 2-core machine, 1.7-3.8 s at load
    average 20-30, 11 s at 55-66; what keeps it short is the import check below."""
    before = tree(empty_store)
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", WATCH_IMPORTS, "serve", "--workdir", str(empty_store),
         "model_name=nosuch"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    took = time.monotonic() - start
    load = os.getloadavg()[0]
    print(f"\n`medray serve model_name=nosuch` failed in {took:.2f} s (load average {load:.1f})")
    assert res.returncode == 2, res.stdout + res.stderr
    line = only_line(res.stdout)
    assert line.startswith("error: models:/nosuch@production: not found in sqlite:")
    assert "no model is registered there" in line and "medray models register" in line
    assert res.stderr.strip() == "heavy imports: []", res.stderr
    assert tree(empty_store) == before and tree(tmp_path) == []


def test_promote_without_workdir_creates_nothing_and_is_not_exit_1(tmp_path):
    """The README's `medray models promote NAME --version 1` run where there is no
    ./workdir: exit 2 (not 1, a refusal's code), no ./workdir/mlflow.db made, and nothing
    heavy imported to find that out."""
    res = subprocess.run(
        [sys.executable, "-c", WATCH_IMPORTS, "models", "promote", "medray-demo", "--version", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip() == "heavy imports: []", res.stderr
    line = only_line(res.stdout)
    assert f"{tmp_path}/workdir/mlflow.db: no MLflow store here" in line and "--workdir" in line
    assert tree(tmp_path) == []


def test_run_stage_on_a_mistyped_workdir_creates_nothing(tmp_path):
    res, _ = medray("run", "index", "--workdir", str(tmp_path / "mistyped"), cwd=tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    line = only_line(res.stdout + res.stderr)
    assert f"{tmp_path / 'mistyped'}: no such workdir" in line
    assert tree(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["run", "index"], "embeddings/LATEST: no embeddings yet; run `medray run embed"),
        (["run", "adapt"], "no embeddings yet"),
        (["run", "evaluate", "backbone_id=abc"], "embeddings/abc/embed.json: no embeddings for"),
        (["run", "embed"], "data/manifest.parquet: no manifest; import images first"),
        (["run", "pretrain"], "no manifest"),
        (["models", "register"], "embeddings/LATEST: no embeddings yet"),
    ],
)
def test_missing_inputs_are_one_line_and_open_no_store(tmp_path, args, says):
    work = tmp_path / "w"
    work.mkdir()
    res = runner.invoke(app, [*args, "--workdir", str(work)])
    assert res.exit_code == 2, res.output
    assert says in only_line(res.output)
    assert tree(work) == []  # no mlflow.db, no directory


def test_index_without_its_index_for_evaluate(tmp_path):
    from heads_fixtures import write_embeddings

    write_embeddings(tmp_path, n=20)
    before = tree(tmp_path)
    res = runner.invoke(app, ["run", "evaluate", "--workdir", str(tmp_path)])
    assert res.exit_code == 2 and "no index for backbone" in only_line(res.output)
    assert "`medray run index --workdir" in res.output and tree(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["models", "promote", "nosuch", "--version", "1"], "Model Version (name=nosuch, version=1) not found"),
        (["models", "rollback", "nosuch"], "Registered Model with name=nosuch not found"),
        (["models", "list", "nosuch"], "Registered Model with name=nosuch not found"),
        (["serve", "model_name=nosuch", "model_version=3"], "models:/nosuch/3: not found"),
    ],
)  # fmt: skip
def test_unknown_model_or_version_is_one_line_exit_2(empty_store, args, says):
    res = runner.invoke(app, [*args, "--workdir", str(empty_store)])
    assert res.exit_code == 2, res.output
    line = only_line(res.output)
    assert says in line and str(empty_store) in line


def test_models_without_a_store_create_none(tmp_path):
    for args in (["models", "list", "m"], ["models", "rollback", "m"],
                 ["serve", "model_name=m"]):  # fmt: skip
        res = runner.invoke(app, [*args, "--workdir", str(tmp_path)])
        assert res.exit_code == 2 and "no MLflow store here" in only_line(res.output), args
    assert tree(tmp_path) == []


def test_serve_a_missing_bundle_path_is_one_line(tmp_path):
    res = runner.invoke(app, ["serve", f"bundle_path={tmp_path / 'nope'}"])
    assert res.exit_code == 2
    assert "not a medray bundle (no bundle.json)" in only_line(res.output)


def test_help_documents_the_exit_codes():
    out = " ".join(runner.invoke(app, ["--help"]).output.split())
    assert "1 promotion refused by its gates" in out and "2 bad input or something missing" in out


def test_storage_unreachable_is_one_line_exit_4(tmp_path):
    """An S3 endpoint nobody answers on (a closed loopback port): after the retry budget the
    command says storage is unavailable in one line and exits 4 (run again), not a traceback."""
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
           "MEDRAY_STORAGE_RETRY_S": "1"}  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "medray", "run", "index", "--workdir", "s3://nobucket/w"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    text = res.stdout + res.stderr
    assert res.returncode == 4, text
    assert "storage unreachable" in text and "Traceback" not in text, text
