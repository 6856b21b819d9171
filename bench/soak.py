"""The soak run of `bench/serve.py --soak MINUTES`: constant load on the served production
alias, with a promotion in the middle that `medray serve`'s registry follower picks up.

Prints, per minute, requests, failed requests, p50/p99 and the model versions that
answered; then the RSS of every replica process (and the proxy and controller) at the
start and the end (a leak shows as growth); then the machine.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections import Counter, defaultdict
from contextlib import suppress


def serve_processes() -> dict[str, list]:
    """This process's Serve actors by role (descendants: Ray was started here)."""
    import psutil

    roles: dict[str, list] = defaultdict(list)
    for proc in psutil.Process().children(recursive=True):
        with suppress(psutil.Error):
            line = " ".join(proc.cmdline())
            replica = re.search(r"ServeReplica:[^:\s]+:(\w+)", line)
            if replica:
                roles[replica[1]].append(proc)
            elif "ProxyActor" in line:
                roles["proxy"].append(proc)
            elif "ServeController" in line:
                roles["controller"].append(proc)
    return roles


def rss_mb() -> dict[str, list[float]]:
    """Resident memory of each Serve process by role (MB), one entry per process."""
    import psutil

    out: dict[str, list[float]] = {}
    for role, procs in serve_processes().items():
        sizes = []
        for proc in procs:
            with suppress(psutil.Error):
                sizes.append(proc.memory_info().rss / 1e6)
        out[role] = sorted(sizes)
    return out


class Load:
    """`concurrency` threads posting /v1/search in a loop; every answer is recorded."""

    def __init__(self, url: str, key: str, files: list[tuple[str, bytes]], concurrency: int):
        self.url, self.key, self.files = url, key, files
        self.records: list[tuple[float, int, float, str]] = []  # (t, status, seconds, model)
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self.loop, args=(i,), daemon=True) for i in range(concurrency)
        ]

    def loop(self, offset: int) -> None:
        import requests

        session, i = requests.Session(), offset
        while not self.stop.is_set():
            name, data = self.files[i % len(self.files)]
            i += len(self.threads)
            t0 = time.time()
            try:
                resp = session.post(
                    f"{self.url}/v1/search?k=10",
                    files={"image": (name, data)},
                    headers={"Authorization": f"Bearer {self.key}"},
                    timeout=120,
                )
                ok = resp.status_code == 200
                model = resp.json().get("model", "") if ok else resp.text[:80]
                self.records.append((t0, resp.status_code, time.time() - t0, model))
            except Exception as exc:  # a refused connection counts as a failed request
                self.records.append((t0, 0, time.time() - t0, type(exc).__name__))

    def __enter__(self) -> Load:
        [t.start() for t in self.threads]
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        [t.join(timeout=180) for t in self.threads]


def per_minute(records: list, start: float) -> list[dict]:
    rows: dict[int, list] = defaultdict(list)
    for t, status, seconds, model in records:
        rows[int((t - start) // 60)].append((status, seconds, model))
    out = []
    for minute in sorted(rows):
        ms = sorted(s * 1e3 for _, s, _ in rows[minute])
        out.append({
            "minute": minute + 1,
            "requests": len(ms),
            "failed": sum(1 for st, _, _ in rows[minute] if st != 200),
            "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
            "models": dict(Counter(m for st, _, m in rows[minute] if st == 200)),
        })  # fmt: skip
    return out


def soak(args, files, minutes: float, concurrency: int = 8) -> dict:
    """Serve the workdir's production alias with the follower on, load it for `minutes`,
    register and promote a new version half-way; returns the figures."""
    from medray import registry
    from medray.serving import local
    from medray.serving.config import ServeConfig

    cfg = ServeConfig(workdir=args.workdir, model_name=args.model_name, port=0,
                      follow_interval_s=args.follow_interval)  # fmt: skip
    served = local.start(cfg)
    follower = local.follower(cfg, served, say=lambda s: print(f"  [follow] {s}", flush=True))
    reg = registry.RegistryConfig(workdir=cfg.workdir, mlflow=cfg.mlflow)
    ticking = threading.Event()

    def tick_loop() -> None:
        while not ticking.wait(cfg.follow_interval_s):
            follower.tick()

    ticker = threading.Thread(target=tick_loop, daemon=True)
    ticker.start()
    promoted_at = None
    try:
        with Load(served.url, served.keys.local_key, files, concurrency) as load:
            time.sleep(20)  # warm-up: connections and first batches, not counted below
            start, rss_start = time.time(), rss_mb()
            half = start + minutes * 30
            while time.time() < start + minutes * 60:
                time.sleep(5)
                if promoted_at is None and time.time() >= half:
                    version = registry.register(cfg.workdir, cfg.model_name, reg)
                    registry.promote(cfg.model_name, version, reg, force=True)
                    promoted_at = time.time() - start
                    print(f"  promoted version {version} at {promoted_at:.0f} s", flush=True)
                done = len([r for r in load.records if r[0] >= start])
                print(f"  {time.time() - start:5.0f} s  {done} requests", end="\r", flush=True)
            rss_end = rss_mb()
        records = [r for r in load.records if r[0] >= start]
    finally:
        ticking.set()
        local.stop()
    return {"rows": per_minute(records, start), "rss_start": rss_start, "rss_end": rss_end,
            "promoted_at_s": promoted_at, "swaps": follower.history,
            "failed": sum(1 for r in records if r[1] != 200), "requests": len(records)}  # fmt: skip


def report(result: dict, machine: str) -> None:
    """Ratios first (failures; RSS per process end/start), then per minute, then RSS."""
    total, failed = result["requests"], result["failed"]
    start, end = result["rss_start"], result["rss_end"]
    print("\nratios")
    print(f"  failed / requests            {failed}/{total} = {failed / max(total, 1):.4%}")
    for role in sorted(start):
        if start[role] and end.get(role):
            ratio = max(end[role]) / max(start[role])
            print(f"  RSS end / start  {role:<11} {ratio:.3f}  (largest process of the role)")
    print("\nper minute")
    print(f"{'min':>4} {'requests':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8}  models")
    for row in result["rows"]:
        models = ", ".join(f"{m} x{n}" for m, n in row["models"].items())
        print(f"{row['minute']:>4} {row['requests']:>9} {row['failed']:>7} "
              f"{row['p50_ms']:>8.0f} {row['p99_ms']:>8.0f}  {models}")  # fmt: skip
    print(f"\npromotion at {result['promoted_at_s']:.0f} s; swaps {result['swaps']}")
    print("\nRSS per process (MB)   start            end")
    for role in sorted(start):
        fmt = lambda xs: " ".join(f"{x:.0f}" for x in xs) or "-"  # noqa: E731
        print(f"  {role:<11} {fmt(start[role]):>16} {fmt(end.get(role, [])):>16}")
    print(f"\nmachine: {machine}")
