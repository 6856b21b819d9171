"""Clean console output: which lines stay on the terminal, and the descriptor-level filter
(run in a child process whose stdout is a real descriptor, as under `medray run`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from medray.console import keep_line

NOISE = [
    "2026-12-06 01:28:22,255\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
    "2026-12-06 01:28:26,302\tINFO worker.py:2038 -- Started a local Ray instance.",
    "2026/12/06 01:28:27 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    "[2026-12-06 01:28:30,294 E 19352 19352] core_worker.cc:2465: Actor with class name: 'MapWorker'",
    "\x1b[36m(PlacementGroupCleaner pid=22668)\x1b[0m Failed to query Ray Train Controller actor state.",
    "(RayTrainWorker pid=22882) Reporting training result 1: TrainingReport(checkpoint=None)",
    "\x1b[36m(DatasetManager pid=23145)\x1b[0m /x/execution_options.py:436: RayDeprecationWarning: `x` is deprecated",
    "Successfully registered model 'pneumonia'.",
    "Created version '1' of model 'pneumonia'.",
    "\x1b[33m(raylet)\x1b[0m WARNING: 24 PYTHON worker processes have been started on node: b10b",
]  # fmt: skip
KEPT = [
    "embed: 552/4,406 images (13%), 25.6 images/s, ETA 2m30s",
    "✓ heads        93.7s  task=label, kind=multiclass, accuracy=0.952",
    "│  5 │ 0.950 │ 0.950 │",
    "error: /tmp/x: no such workdir",
]


@pytest.mark.parametrize("line", NOISE)
def test_ray_and_mlflow_lines_go_to_the_log(line):
    assert keep_line(line + "\n", after_noise=False)[0] is False


@pytest.mark.parametrize("line", KEPT)
def test_medray_lines_stay(line):
    assert keep_line(line + "\n", after_noise=False) == (True, line + "\n")


def test_medray_lines_from_workers_lose_the_prefix_and_continuations_follow_noise():
    line = "\x1b[36m(RayTrainWorker pid=7)\x1b[0m pretrain epoch 3/30  loss 1.234  kNN 0.897\n"
    assert keep_line(line, False) == (True, "pretrain epoch 3/30  loss 1.234  kNN 0.897\n")
    assert keep_line("  self.exclude_resources = x\n", after_noise=True)[0] is False
    assert keep_line("  indented table row\n", after_noise=False)[0] is True


def test_filtered_output_splits_descriptors_between_terminal_and_log(tmp_path):
    log = tmp_path / "logs" / "embed.log"
    child = textwrap.dedent(f"""
        import os, sys
        from medray.console import filtered_output
        with filtered_output({str(log)!r}):
            print("embed: 1/2 images (50%)", flush=True)
            print("2026-12-06 01:28:26,302\\tINFO worker.py:2038 -- Started a local Ray", flush=True)
            os.write(2, b"[2026-12-06 01:28:30,294 E 1 1] core_worker.cc:1: noise\\n")
            print("(RayTrainWorker pid=7) pretrain epoch 1/2  loss 1.0", file=sys.stderr, flush=True)
        print("after", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"Ray and MLflow messages of this run: {log} (--verbose shows them here)",
        "embed: 1/2 images (50%)",
        "pretrain epoch 1/2  loss 1.0",
        "after",
    ]
    text = log.read_text()
    assert "Started a local Ray" in text and "core_worker.cc" in text and "embed: 1/2" in text
