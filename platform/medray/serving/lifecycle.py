"""Stopping `medray serve` and `medray demo` cleanly on SIGINT and SIGTERM.

What systemd, Docker and Kubernetes send is SIGTERM, whose default action ends the driver
at once: no `atexit`, so the Ray node this process started (GCS, raylet, dashboard, the
dashboard and runtime-env agents, Serve's actors) is left to notice on its own, and some of
it lingered for over a minute. A SIGINT sent to the PID alone (not the terminal's process
group, which reaches every Ray process) waited on Serve's graceful drain, which has no
bound worth having here.

So a command that runs until stopped:
- turns SIGINT and SIGTERM into `Stop` (a KeyboardInterrupt) while it runs
  (`signals_raise_stop`, `stops_cleanly`); a second signal during the shutdown forces it;
- stops in a bounded time (`shutdown`): Serve's graceful shutdown with a timeout, then
  `ray.shutdown()` when this process started Ray (a cluster it only joined stays up), then
  every process of that Ray node still alive (snapshotted before: the node's processes,
  their descendants and whatever holds the session's directory) is terminated, then
  killed. Nothing else is touched: a joined cluster's processes, or children of this
  process that Ray did not start, are not ours to end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEADLINE_S = 8.0
"""Seconds `shutdown` may take in all (the promise is 10 s from the signal to exit)."""
SERVE_SHARE = 0.5
"""Share of the deadline Serve's graceful shutdown (in-flight requests drain) may use."""


class Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the command should stop cleanly."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _State:
    stopping = False
    """A shutdown is under way: another signal forces it."""
    doomed: list = []
    """Processes the shutdown in progress will end (what a forced stop kills at once)."""
    stopped_by: str | None = None
    """The signal a finished stop answered (then the process only has to exit)."""
    received: int | None = None
    """The last signal our handler turned into `Stop` (a library that catches the Stop
    and raises a plain KeyboardInterrupt of its own loses which signal it was)."""


def _on_signal(signum: int, frame: object) -> None:
    if _State.stopping:
        _force(signum)
    _State.received = signum
    raise Stop(signum)


def _force(signum: int) -> None:
    """Second signal while stopping: kill what the shutdown would end, exit at once."""
    print(f"{signal.Signals(signum).name} again: killing the rest now", flush=True)
    for proc in _State.doomed:
        with contextlib.suppress(Exception):
            proc.kill()
    os._exit(128 + signum)


@contextlib.contextmanager
def signals_raise_stop() -> Iterator[None]:
    """While inside: SIGINT and SIGTERM raise `Stop` in the main thread (a no-op elsewhere:
    only the main thread may set handlers). The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _State.received = None
    previous = {sig: signal.signal(sig, _on_signal) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_stop(on_tick: Callable[[], None] | None = None, every_s: float = 5.0) -> str:
    """Block until SIGINT or SIGTERM; returns its name. Calls `on_tick()` every `every_s`
    seconds meanwhile; an exception from it is logged as one line and waiting goes on."""
    every_s = max(float(every_s), 0.05)
    with signals_raise_stop():
        try:
            due = time.monotonic() + every_s
            while True:
                time.sleep(max(due - time.monotonic(), 0.0))
                # A tick slower than every_s is not followed by a burst of catch-up ticks.
                due = max(due + every_s, time.monotonic())
                if on_tick is None:
                    continue
                try:
                    on_tick()
                except Exception as exc:  # noqa: BLE001 - a failed tick must not stop serving
                    text = " ".join(str(exc).split())[:300]
                    log.warning(
                        "periodic check failed (will retry): %s: %s", type(exc).__name__, text
                    )
        except Stop as stop:
            return stop.name
        except KeyboardInterrupt:  # our Stop re-raised as a plain one, or Python's own
            return signal.Signals(_State.received or signal.SIGINT).name


def _ray_node() -> object | None:
    """The Ray node this process started with ray.init(), or None (not started, or only
    connected to a cluster someone else started)."""
    worker = sys.modules.get("ray._private.worker")
    node = getattr(worker, "_global_node", None) if worker else None
    if node is None or not getattr(node, "all_processes", None):
        return None  # a connect-only node owns no processes
    return node


def _session_dir(node: object) -> str | None:
    with contextlib.suppress(Exception):
        return str(node.get_session_dir_path())
    return None


def _holds(proc, session_dir: str) -> bool:
    """Whether `proc` is a process of that Ray session: named it on its command line or
    holds one of its files open (every Ray process writes its logs there; the agents'
    command lines are rewritten to `ray::...` and no longer show it)."""
    try:
        cmd = proc.cmdline()
        if any(session_dir in part for part in cmd):
            return True
        if not (cmd and cmd[0].startswith("ray::")):
            return False
        return any(f.path.startswith(session_dir) for f in proc.open_files())
    except Exception:  # gone, or not ours to inspect
        return False


def session_processes(session_dir: str, candidates: list | None = None) -> list:
    """Live processes (other than this one) that belong to the Ray session `session_dir`."""
    import psutil  # Ray ships it (ray/thirdparty_files), on sys.path once ray is imported

    me = os.getpid()
    procs = candidates if candidates is not None else psutil.process_iter()
    out = []
    for proc in procs:
        if proc.pid == me:
            continue
        with contextlib.suppress(Exception):
            if proc.status() != psutil.STATUS_ZOMBIE and _holds(proc, session_dir):
                out.append(proc)
    return out


def node_processes(node: object) -> list:
    """The processes `node` started (GCS, raylet, dashboard, monitors, reaper) and all of
    their descendants (workers, actors, agents), alive now."""
    import psutil

    found: dict[int, object] = {}
    for infos in list(getattr(node, "all_processes", {}).values()):
        for info in infos:
            pid = getattr(getattr(info, "process", None), "pid", None)
            if pid is None:
                continue
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_serve(timeout_s: float, ours: bool) -> None:
    """Serve's graceful shutdown (in-flight requests finish). On a Ray this process started,
    waiting at most `timeout_s` (all of it goes down right after anyway); on a joined
    cluster, Serve's own `serve.shutdown()` as before."""
    if "ray.serve" not in sys.modules:
        return  # this process never used Serve
    from ray import serve

    try:
        from ray.serve import context

        if not ours:
            serve.shutdown()
            return
        # Never the public serve.shutdown() here: with no cached client it looks for a
        # controller, and calls ray.init() itself when Ray is not connected (a start that
        # a signal interrupted), which starts a second cluster.
        client = getattr(context, "_global_client", None)
        current = getattr(context, "_cached_client_from_current_session", None)
        if client is not None and current is not None and current():
            # Serve's full drain (proxy 5 s, replicas 2-20 s) rarely fits; what is cut here
            # ends with the Ray shutdown right after, so its "failed to shut down" warning
            # says nothing useful.
            serve_log = logging.getLogger("ray.serve")
            level = serve_log.level
            serve_log.setLevel(logging.ERROR)
            try:
                client.shutdown(timeout_s=max(timeout_s, 0.5))
            finally:
                serve_log.setLevel(level)
        context._set_global_client(None)
    except Exception as exc:  # noqa: BLE001 - the Ray shutdown below ends it anyway
        log.warning("Serve shutdown: %s: %s", type(exc).__name__, " ".join(str(exc).split()))


def _forget_ray_exit_hook() -> None:
    import atexit

    worker = sys.modules.get("ray._private.worker")
    if worker is not None and hasattr(worker, "shutdown"):
        atexit.unregister(worker.shutdown)


def _end(procs: list, timeout_s: float) -> list:
    """Wait up to `timeout_s` for `procs` to exit, then SIGTERM, then SIGKILL; returns the
    ones still alive after all that (normally none)."""
    import psutil

    def alive(ps: list) -> list:
        out = []
        for p in ps:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        return out

    _, left = psutil.wait_procs(alive(procs), timeout=max(timeout_s, 0.1))
    for sig, wait in (("terminate", 1.0), ("kill", 1.0)):
        left = alive(left)
        if not left:
            return []
        for p in left:
            with contextlib.suppress(psutil.Error):
                getattr(p, sig)()
        _, left = psutil.wait_procs(left, timeout=wait)
    return alive(left)


def shutdown(deadline_s: float = DEADLINE_S, say: Callable[[str], None] | None = None) -> dict:
    """Stop Serve and the Ray this process started, all within about `deadline_s` seconds.

    A cluster this process only joined stays up (Serve on it is shut down, as before).
    Returns {"seconds", "ray_started_here", "ended", "left"}; "left" counts processes of
    our Ray session still alive afterwards (0 unless something refused SIGKILL).
    """
    report = {"seconds": 0.0, "ray_started_here": False, "ended": 0, "left": 0}
    if "ray" not in sys.modules:  # never imported: nothing was started (and stays cheap)
        return report
    import ray

    if not ray.is_initialized() and _ray_node() is None:
        return report  # (a node started by an interrupted ray.init is still ended below)
    start = time.monotonic()
    _State.stopping = True
    try:
        node = _ray_node()
        session = _session_dir(node) if node is not None else None
        doomed: dict[int, object] = {}

        def snapshot() -> None:
            if node is None:
                return
            procs = node_processes(node)
            if session:
                procs += session_processes(session)
            for p in procs:
                doomed.setdefault(p.pid, p)
            _State.doomed = list(doomed.values())

        snapshot()
        connected = ray.is_initialized()
        if connected:
            _stop_serve(deadline_s * SERVE_SHARE, ours=node is not None)
        snapshot()  # workers or actors started since
        report["ray_started_here"] = node is not None
        if connected:
            with contextlib.suppress(Exception):
                ray.shutdown()
        else:
            # A signal interrupted ray.init while the driver connected: its core worker is
            # half made, and ray.shutdown() (ours, or Ray's own at exit) crashes on it. The
            # node's processes are ended below instead.
            _forget_ray_exit_hook()
        if node is not None:
            # After ray.shutdown() the node's processes exit on their own: give them what
            # the deadline leaves (less 2 s for SIGTERM then SIGKILL). After an interrupted
            # ray.init nothing has asked them to: SIGTERM at once.
            remaining = deadline_s - (time.monotonic() - start) - 2.0 if connected else 0.1
            left = _end(list(doomed.values()), remaining)
            if session:  # anything of the session that escaped the snapshot
                left += _end(session_processes(session), 0.1)
            report["ended"] = len(doomed)
            report["left"] = len(left)
            if left:
                log.warning(
                    "%d Ray process(es) of %s survived SIGKILL: %s",
                    len(left),
                    session,
                    ", ".join(str(p.pid) for p in left),
                )
    finally:
        _State.stopping = False
        _State.doomed = []
    report["seconds"] = round(time.monotonic() - start, 2)
    if say is not None:
        if report["ray_started_here"]:
            say(f"stopped the local Ray this process started in {report['seconds']:.1f} s")
        else:
            say(f"stopped Serve in {report['seconds']:.1f} s (the Ray cluster it joined stays up)")
    return report


def serve_until_signal(
    on_tick: Callable[[], None] | None = None,
    every_s: float = 5.0,
    deadline_s: float = DEADLINE_S,
    say: Callable[[str], None] | None = print,
) -> dict:
    """Block until SIGINT/SIGTERM (calling `on_tick` every `every_s` s), then `shutdown`.
    A second signal while stopping kills what is left at once."""
    say = say or (lambda text: None)
    with signals_raise_stop():
        name = wait_for_stop(on_tick, every_s)
        say(f"{name}: stopping")
        report = shutdown(deadline_s, say)
        _State.stopped_by = name
        return report


@contextlib.contextmanager
def stops_cleanly(
    deadline_s: float = DEADLINE_S, say: Callable[[str], None] | None = print
) -> Iterator[None]:
    """For a command that may start Ray and run until stopped (`medray serve`, `demo`):
    SIGINT/SIGTERM anywhere inside stop it cleanly, and whatever way it ends (a return, an
    error, a signal), the Ray it started is shut down before the process exits. A signal
    before serving started exits with 128 + the signal's number (130, 143)."""
    say = say or (lambda text: None)
    with signals_raise_stop():
        try:
            yield
        except (KeyboardInterrupt, SystemExit) as exc:
            if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:
                raise  # an ordinary exit; ray.init's own SIGTERM handler exits with 15
            if isinstance(exc, Stop):
                signum = exc.signum
            elif isinstance(exc, SystemExit):
                signum = int(signal.SIGTERM)
            else:
                signum = int(_State.received or signal.SIGINT)
            say(f"{signal.Signals(signum).name}: stopping")
            shutdown(deadline_s, say)
            _State.stopped_by = signal.Signals(signum).name
            raise SystemExit(128 + signum) from None
        finally:
            shutdown(deadline_s)  # a no-op when already stopped (or Ray never started)


def exit_now_if_stopped(code: int | None) -> None:
    """At the very end of a command that a signal stopped: exit at once with `code`.

    Everything that matters is done by then (Serve and Ray stopped, output written);
    what is left is the interpreter's teardown of every module Ray, Serve, torch and
    MLflow loaded, which took 2-4 s on a busy 2-core machine, eating into the 10 s a
    supervisor allows between SIGTERM and SIGKILL. Output is flushed and atexit handlers
    run first. Only the console script calls this, never library code or tests.
    """
    if _State.stopped_by is None:
        return
    import atexit

    logging.shutdown()
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))
