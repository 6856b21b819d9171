"""`medray submit` and `medray jobs`: unit tests of what a job ships and runs, then the
real thing against a local Ray head with the dashboard (Jobs API) in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cluster_process
from typer.testing import CliRunner

from medray import cluster, jobs_entry
from medray.cli import app

REPO = Path(__file__).resolve().parents[1]

# --- unit: the job files, the runtime env, the entrypoint --------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_job_files_are_thin(path: Path):
    text = path.read_text()
    assert len(text.splitlines()) <= 40
    assert "from medray.jobs_entry import" in text and "def " not in text


def test_every_stage_has_a_job_file():
    from medray.stages import STAGES

    assert {p.stem for p in (REPO / "jobs").glob("*.py")} == {*STAGES, "pipeline"}


def test_select_job_does_not_shadow_stdlib_select():
    # jobs/select.py sits beside every job: the script directory must leave sys.path.
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "select.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "medray select job" in out.stdout


def test_entrypoint_quotes_overrides():
    cmd = cluster.entrypoint("embed", "configs/embed.yaml", ["workdir=/a b", "x.y=1"], "py")
    assert cmd == "py jobs/embed.py -c configs/embed.yaml 'workdir=/a b' x.y=1"


def test_runtime_env_ships_checkout_and_package():
    cfg = cluster.SubmitConfig(pip=["timm>=1.0"])
    env = cluster.runtime_env(REPO, cfg, {"MLFLOW_TRACKING_URI": "http://m:5000", "HOME": "/x"})
    assert env["working_dir"] == str(REPO)
    assert env["py_modules"] == [str(REPO / "platform" / "medray")]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://m:5000"
    assert "HOME" not in env["env_vars"] and "AWS_ENDPOINT_URL" not in env["env_vars"]
    assert env["pip"] == ["timm>=1.0"]
    assert "pip" not in cluster.runtime_env(REPO, cluster.SubmitConfig(), {})


def test_excludes_leave_out_venv_workdirs_and_caches():
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, cluster.EXCLUDES)
    for rel in (".venv/bin/python", "workdir/demo/mlflow.db", "platform/medray/cli/__init__.py",
                "tests/__pycache__/x.pyc", ".pytest_cache/v", "medray.egg-info/PKG-INFO"):  # fmt: skip
        assert excluded(REPO / rel), rel
    for rel in ("jobs/embed.py", "configs/demo.yaml", "cluster.yaml", "tests/test_submit.py"):
        assert not excluded(REPO / rel), rel


def test_resolve_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not a dashboard
    with pytest.raises(cluster.SubmitError, match="--address"):
        cluster.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert cluster.resolve_address(None) == "http://env:8265"
    assert cluster.resolve_address(None, cluster.SubmitConfig(address="cfg:8265")) == (
        "http://cfg:8265"
    )
    assert cluster.resolve_address("http://arg:1", cluster.SubmitConfig(address="c")) == (
        "http://arg:1"
    )


def test_config_outside_the_checkout_is_refused(tmp_path):
    assert cluster.relative_config(str(REPO / "configs" / "demo.yaml"), REPO) == "configs/demo.yaml"
    with pytest.raises(cluster.SubmitError, match="outside the shipped checkout"):
        cluster.relative_config(str(tmp_path / "x.yaml"), REPO)


def test_pipeline_validates_every_stage_config_before_submitting():
    pytest.importorskip("medray.evaluate", reason="not every stage is in this build yet")
    assert cluster.validate_job("pipeline", None, ["seed=3"], "s3://b/p", REPO) == "s3://b/p"
    with pytest.raises(Exception, match="batch_sise"):
        cluster.validate_job("pipeline", None, ["embed:batch_sise=3"], "s3://b/p", REPO)
    with pytest.raises(cluster.SubmitError, match="drop -c"):
        cluster.validate_job("pipeline", "configs/embed.yaml", [], None, REPO)


def test_local_workdir_is_made_absolute():
    assert cluster.workdir_override("s3://b/p", "http://10.0.0.1:8265") == ["workdir=s3://b/p"]
    assert cluster.workdir_override("wd", "http://127.0.0.1:8265") == [
        f"workdir={Path.cwd() / 'wd'}"
    ]


def test_jobs_join_the_cluster_they_run_in(monkeypatch):
    from medray.config import StageConfig

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert jobs_entry.join_cluster(StageConfig()).ray.address == "auto"
    pinned = StageConfig.model_validate({"ray": {"address": "ray://x:10001"}})
    assert jobs_entry.join_cluster(pinned).ray.address == "ray://x:10001"


def test_job_exit_code_2_with_one_line_for_bad_config_or_input(tmp_path, capsys):
    pytest.importorskip("medray.embed", reason="embed stage not in this build yet")
    assert jobs_entry.main("embed", ["-w", str(tmp_path), "batch_sise=3"]) == 2
    assert "batch_sise: unknown key" in capsys.readouterr().err
    assert jobs_entry.main("embed", ["-w", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert jobs_entry.pipeline_main(["--stages", "embed,nope"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_pipeline_overrides_per_stage():
    from medray.pipeline import overrides_for

    overrides = ["seed=1", "embed:ray.num_workers=4", "heads:epochs=2", "a:b=c"]
    assert overrides_for(overrides, "embed") == [
        "seed=1",
        "ray.num_workers=4",
        "a:b=c",
    ]
    assert overrides_for(overrides, "index") == ["seed=1", "a:b=c"]


def test_submit_without_an_address_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(app, ["submit", "embed"])
    assert result.exit_code == 2
    assert "address" in result.output


# --- integration: a real head with the dashboard -----------------------------------------


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster with the Jobs API, in its own process; yields its info."""
    with cluster_process("--head-cpus", "2", timeout_s=60) as info:
        yield info


def medray(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "TERM": "dumb", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "medray", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _needs_embed():
    pytest.importorskip("medray.embed", reason="embed stage not in this build yet")


@pytest.mark.integration
def test_submit_embed_runs_the_stage_and_returns_its_exit_code(ray_head, tmp_path, kather_dir):
    _needs_embed()
    from medray.data.config import DataConfig
    from medray.data.importers import import_folder

    workdir = tmp_path / "wd"
    import_folder(str(kather_dir), DataConfig(workdir=str(workdir)))
    out = medray(
        "submit", "embed", "-c", "configs/embed.yaml", "--address", ray_head["dashboard"],
        "--workdir", str(workdir), "--follow",
        "backbone.input_size=32", "batch_size=4", "decode_cpus=0.5",
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert '"stage": "embed"' in log and "SUCCEEDED" in log
    assert (workdir / "embeddings" / "LATEST").is_file()


@pytest.mark.integration
def test_a_failing_job_returns_nonzero_with_its_log(ray_head, tmp_path):
    _needs_embed()
    empty = tmp_path / "empty"
    out = medray("submit", "embed", "--address", ray_head["dashboard"], "-w", str(empty), "-f")
    log = out.stdout + out.stderr
    assert out.returncode == 2, log  # the stage's own exit code: bad input
    assert "no such workdir" in log and "FAILED" in log
    assert "Running entrypoint for job" in log  # the job's log was streamed


@pytest.mark.integration
def test_the_job_imports_the_shipped_package(ray_head):
    jobs = cluster.client(ray_head["dashboard"])
    job_id = jobs.submit_job(
        entrypoint=f"{sys.executable} -c 'import medray, os; print(medray.__file__, os.getcwd())'",
        runtime_env=cluster.runtime_env(REPO, cluster.SubmitConfig()),
    )
    assert cluster.wait(jobs, job_id, timeout_s=120) == 0
    printed = jobs.get_job_logs(job_id).strip().splitlines()[-1]
    package, cwd = printed.split()
    # Not the checkout's platform/medray: the copy Ray unpacked from py_modules.
    assert not package.startswith(str(REPO)) and package.endswith("medray/__init__.py")
    assert (Path(cwd) / "jobs" / "embed.py").is_file()  # the shipped checkout is the cwd
    assert not (Path(cwd) / ".venv").exists() and not (Path(cwd) / "platform").exists()


@pytest.mark.integration
def test_jobs_list_logs_and_stop(ray_head):
    jobs = cluster.client(ray_head["dashboard"])
    job_id = jobs.submit_job(
        entrypoint=f"{sys.executable} -c 'import time; print(\"tick\", flush=True); time.sleep(120)'"
    )
    address = ["--address", ray_head["dashboard"]]
    runner = CliRunner()
    deadline = time.monotonic() + 60
    while "tick" not in jobs.get_job_logs(job_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    listed = runner.invoke(app, ["jobs", "list", *address], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and job_id in listed.output and "RUNNING" in listed.output
    logs = runner.invoke(app, ["jobs", "logs", job_id, *address])
    assert logs.exit_code == 0 and "tick" in logs.output
    stopped = runner.invoke(app, ["jobs", "stop", job_id, *address])
    assert stopped.exit_code == 0 and "stop requested" in stopped.output
    assert cluster.wait(jobs, job_id, timeout_s=60) != 0
    assert str(jobs.get_job_status(job_id).value) == "STOPPED"
