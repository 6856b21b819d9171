"""`medray serve` (and `medray demo`, which ends in the same wait) stop on SIGTERM and on a
SIGINT sent to the PID alone within 10 s, leaving no Ray process behind.

The processes counted are only those of the command under test: its descendants (taken
while it serves) and whatever holds files of the Ray session it created
(/tmp/ray/session_*_<its pid>); other Ray clusters on the machine are never looked at or
touched. One real `medray serve` start costs 20-40 s here, so SIGTERM is tested on the real
command and SIGINT on a cheaper driver that goes through the same code (Ray started by the
process, Serve started, `wait_until_interrupted`, `lifecycle.shutdown`).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medray.serving import lifecycle

STOP_WITHIN_S = 10.0


def _psutil():
    import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path

    return pytest.importorskip("psutil")


def _alive(procs: list) -> list:
    psutil = _psutil()
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _session_holders(session_dir: str) -> list:
    """Processes naming the session dir on their command line or holding a file in it."""
    psutil = _psutil()
    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if any(session_dir in part for part in p.cmdline()) or any(
                f.path.startswith(session_dir) for f in p.open_files()
            ):
                found.append(p)
        except psutil.Error:
            pass
    return _alive(found)


def _start(cmd: list[str], log: Path, ready: str, timeout: float, **kw) -> subprocess.Popen:
    """Start `cmd` in its own session (a signal to it reaches its PID only), output to
    `log`; return once `ready` appears in the output."""
    env = {**os.environ, "MEDRAY_API_KEYS": "k1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, **kw
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            pytest.fail(f"{cmd[:4]} exited {proc.returncode} before serving:\n{log.read_text()}")
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"{cmd[:4]} not serving after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop_and_count(proc: subprocess.Popen, sig: int, log: Path) -> tuple[float, int, list]:
    """Send `sig` to `proc`'s PID; returns (seconds to exit, exit code, Ray processes left)."""
    psutil = _psutil()
    sessions = glob.glob(f"/tmp/ray/session_*_{proc.pid}")
    assert sessions, "the command did not start its own Ray session"
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert any("raylet" in p.name() for p in descendants), [p.name() for p in descendants]
    start = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - start
    time.sleep(0.5)  # SIGKILLed processes need a moment to be reaped
    left = _alive(descendants)
    for session in sessions:
        left += [p for p in _session_holders(session) if p.pid not in {q.pid for q in left}]
    names = [f"{p.pid}:{p.name()}" for p in left]
    for p in left + ([psutil.Process(proc.pid)] if code is None else []):
        try:
            p.kill()  # clean up what the test started, whatever the outcome
        except psutil.Error:
            pass
    print(f"\n{signal.Signals(sig).name}: exit {code} after {took:.1f} s, Ray processes left: "
          f"{len(left)} {names}\n{log.read_text()[-600:]}")  # fmt: skip
    return took, code, names


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A real bundle (30 tiles, bundled backbone, Flat index, one head), built without MLflow."""
    pytest.importorskip("medray.registry", reason="needs the registry (bundle) module")
    from registry_parts import make_workdir

    from medray.registry import build_bundle

    root = tmp_path_factory.mktemp("shutdown")
    make_workdir(root / "work", n=30)
    build_bundle(str(root / "work"), str(root / "bundle"))
    return root / "bundle"


@pytest.mark.integration
def test_serve_stops_on_sigterm_within_10s_and_leaves_no_ray_process(bundle, tmp_path):
    cmd = [sys.executable, "-m", "medray", "serve", "--workdir", str(tmp_path),
           f"bundle_path={bundle}", "port=0"]  # fmt: skip
    proc = _start(cmd, tmp_path / "serve.log", "serving until", timeout=240, cwd=tmp_path)
    took, code, left = _stop_and_count(proc, signal.SIGTERM, tmp_path / "serve.log")
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert took < STOP_WITHIN_S
    assert left == []
    assert not (tmp_path / "mlflow.db").exists()  # serving a bundle opened no store


DRIVER = textwrap.dedent(
    """
    from medray.config import RayConfig
    from medray.raycluster import init
    from medray.serving.local import wait_until_interrupted

    init(RayConfig(num_cpus=1))
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    wait_until_interrupted(on_tick=lambda: None, every_s=1.0)
    """
)


@pytest.mark.integration
def test_sigint_to_the_pid_alone_stops_the_same_path_within_10s(tmp_path):
    """What `medray serve` and `medray demo` run once serving: Ray started by the process,
    Serve's controller and proxy, then wait_until_interrupted(); SIGINT to the PID only (a
    terminal's Ctrl-C reaches the whole process group, which hid the problem)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = _start([sys.executable, str(script)], tmp_path / "driver.log", "serving until", 180)
    took, code, left = _stop_and_count(proc, signal.SIGINT, tmp_path / "driver.log")
    assert code == 0, (tmp_path / "driver.log").read_text()[-2000:]
    assert took < STOP_WITHIN_S
    assert left == []


def test_wait_ticks_survives_a_failing_tick_and_returns_on_sigterm(caplog):
    """No Ray: on_tick runs every every_s, an exception in it is one log line and waiting
    goes on, SIGTERM (sent here from the fourth tick, so surely while waiting) ends the
    wait, and the previous signal handlers come back."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    ticks = []

    def tick():
        ticks.append(time.monotonic())
        if len(ticks) == 2:
            raise RuntimeError("registry\nunreachable")
        if len(ticks) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this

    start = time.monotonic()
    with caplog.at_level("WARNING", logger="medray.serving.lifecycle"):
        assert lifecycle.wait_for_stop(tick, every_s=0.05) == "SIGTERM"
    assert len(ticks) == 4 and time.monotonic() - start < 3
    failed = [r.getMessage() for r in caplog.records if "periodic check failed" in r.getMessage()]
    assert failed == ["periodic check failed (will retry): RuntimeError: registry unreachable"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
