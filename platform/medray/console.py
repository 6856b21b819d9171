"""Clean console output for `medray run`: medray's own lines on the terminal, the noise of
Ray, MLflow and their C++ cores in a per-run log file (its path is printed once).

Ray forwards every worker's output to the driver (`(RayTrainWorker pid=...) ...`), logs its
own INFO/WARNING lines, and its C++ core writes straight to file descriptor 2, so the
filter works on the process's descriptors 1 and 2: both go into a pipe, a thread reads it
line by line and sends each line to the terminal or the log file (`keep_line`). Worker
lines that are medray's own (`pretrain epoch ...`, `embed: ...`) are kept, without Ray's
prefix. `medray run --verbose` leaves the output alone. Everything reaches the log file,
so nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

ANSI = re.compile(r"\x1b\[[0-9;]*m")
WORKER = re.compile(r"^\((?P<who>[\w:.<>\-]+) pid=\d+(?:, ip=[\d.]+)?\) ?(?P<text>.*)$")
"""Ray's prefix on a line a worker printed."""
NOISE = [
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING|ERROR)\b"),  # Ray
    re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING)\b"),  # MLflow
    re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] "),  # Ray's C++ core
    re.compile(r"^(INFO|WARNING|DEBUG):(ray|mlflow|alembic|urllib3)"),
    re.compile(r"^\s*(warnings\.warn|self\.\w+ = )"),  # a Python warning's source line
    re.compile(r"^.*\b(Deprecation|Future|User|RayDeprecation)Warning: "),
    re.compile(r"^(Successfully registered model|Created version) '"),  # MLflow's registry
    re.compile(r"^\((raylet|gcs_server|autoscaler|monitor|dashboard)[^)]*\) "),  # Ray daemons
]
OWN = re.compile(r"^(pretrain|embed|select|adapt|index|heads|evaluate)( epoch|:)")
"""Worker lines that are medray's own progress (kept on the terminal)."""


def keep_line(line: str, after_noise: bool) -> tuple[bool, str]:
    """(on the terminal?, the text to show) for one output line; `after_noise`: the line
    before went to the log (an indented line after it is its continuation)."""
    plain = ANSI.sub("", line)
    worker = WORKER.match(plain.strip())
    if worker:
        text = worker["text"]
        return (True, text + "\n") if OWN.match(text) else (False, line)
    if any(p.search(plain) for p in NOISE):
        return False, line
    if after_noise and plain[:1] in (" ", "\t") and plain.strip():
        return False, line
    return True, line


@contextlib.contextmanager
def filtered_output(log_path: str, verbose: bool = False) -> Iterator[str | None]:
    """Send Ray's and MLflow's noise to `log_path` for the duration (module doc). A no-op
    with `verbose`, or when stdout is not this process's descriptor 1 (tests capture it)."""
    try:
        real = sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, ValueError, OSError):
        real = False
    if verbose or not real:
        yield None
        return
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    print(f"Ray and MLflow messages of this run: {log_path} (--verbose shows them here)",
          file=terminal, flush=True)  # fmt: skip

    def pump() -> None:
        after_noise = False
        with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                keep, text = keep_line(line, after_noise)
                after_noise = not keep
                with contextlib.suppress(ValueError, OSError):  # files closed at exit
                    log.write(line)
                    if keep:
                        terminal.write(text)

    thread = threading.Thread(target=pump, name="medray-console", daemon=True)
    thread.start()
    try:
        yield log_path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        # The pump drains what is in the pipe. Ray's daemons started inside the block keep
        # a copy of its write end: their later lines still reach the log, until exit.
        thread.join(timeout=1)
        for fd in saved:
            os.close(fd)
        if not thread.is_alive():
            terminal.close()
            log.close()


def stop_ray(log_path: str | None) -> None:
    """Disconnect from Ray while the output is still filtered (`log_path`: what
    `filtered_output` yielded; None, not filtering: nothing to do): Ray forwards worker
    lines (a trial's "Checkpoint successfully created", Train's cleaner) a moment after they
    are printed, and once the filter is gone they would land on the terminal."""
    ray = sys.modules.get("ray")
    if log_path and ray is not None and ray.is_initialized():
        ray.shutdown()


def run_log_path(workdir: str, name: str) -> str:
    """`<workdir>/logs/<name>-<UTC time>.log`; for an s3:// workdir a local temp dir."""
    import tempfile
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    remote = "://" in workdir
    base = (
        os.path.join(tempfile.gettempdir(), "medray-logs")
        if remote
        else os.path.join(workdir, "logs")
    )
    return os.path.join(base, f"{name}-{stamp}.log")
