"""Scale run: the real stages at several archive sizes, seconds and peak memory per stage.

    python bench/scale.py --sizes 10000 100000          # 22-32 min on 2 busy cores
    python bench/scale.py --sizes 2000 10000 --keep     # quick look; keep the workdirs
    python bench/scale.py --sizes 10000 100000 --report # print again from the saved results

For each size N a fresh child process (so every size starts from the same driver memory)
runs, in one workdir under --root, through each stage's own `run(config)`:
  synth     medray.data.synth: N histology-like PNG tiles of --image-size px + the manifest
  embed     the bundled EfficientNet-Lite0 on CPU at --input-size px (avg pooling, no TTA)
  index     factory --factory (default `auto`: the stage's own choice for N)
  heads     one linear head, one setting, a fixed number of epochs (no early stop)
  evaluate  the default retrieval, pair and kNN metrics
(pretrain, select and adapt are skipped). While a stage runs, a thread samples every
0.2 s the resident memory (VmRSS, /proc) of the driver (the child) and of every process
started under it: Ray's workers (`ray::...`, peak per process; a worker counts for a stage
only if it used CPU during it, so an actor left idle by an earlier stage does not) and Ray's
own daemons.

Prints first, side by side, the ratio last size / first size for each stage's seconds,
driver peak RSS and largest worker peak RSS; then the absolute numbers; then the machine.
A flat driver means a driver ratio near 1: no stage holds all images or all embeddings
in the driver. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

STAGES = ("synth", "embed", "index", "heads", "evaluate")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- memory sampling (/proc)


def rss_mb(pid: int) -> float | None:
    """Resident set size of `pid` in MB, None when it has gone."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE_KB / 1024
    except (OSError, IndexError, ValueError):
        return None


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of `pid` in clock ticks, None when it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> list[int]:
    """Every live process under `root` (children, grandchildren, ...), from /proc/*/stat."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out.extend(kids)
        frontier = kids
    return out


def process_title(pid: int) -> str:
    """Ray renames its workers `ray::<task or actor>`; daemons keep their program name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace").strip()
    if first.startswith("ray::"):
        return first.split()[0]
    words = [a.decode(errors="replace") for a in argv if a]
    names = [os.path.basename(w) for w in words[:3]]
    return " ".join(n for n in names if not n.startswith("-"))[:60]


class RssSampler:
    """Peak RSS of this process and of each process under it while a `with` block runs."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.driver_start = rss_mb(os.getpid()) or 0.0
        self.driver_peak = self.driver_start
        self.peaks: dict[int, float] = {}
        self.titles: dict[int, str] = {}
        self.cpu_first: dict[int, int] = {}
        self.cpu_last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        self.driver_peak = max(self.driver_peak, rss_mb(os.getpid()) or 0.0)
        for pid in descendants(os.getpid()):
            mb = rss_mb(pid)
            if mb is None:
                continue
            title = process_title(pid)
            if pid not in self.titles or not title.startswith("ray::IDLE"):
                self.titles[pid] = title  # keep the busy name of a worker gone idle
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), mb)
            ticks = cpu_ticks(pid)
            if ticks is not None:
                self.cpu_first.setdefault(pid, ticks)
                self.cpu_last[pid] = ticks

    def busy(self, pid: int) -> bool:
        """Whether `pid` used CPU while the block ran (over 0.2 s and 2 % of its wall time):
        a worker of this stage, not one left idle by an earlier stage (Ray's own threads
        keep an idle worker at a few ticks)."""
        wall = time.monotonic() - self.started
        used = (self.cpu_last.get(pid, 0) - self.cpu_first.get(pid, 0)) / CLOCK_TICKS
        return used > max(0.2, 0.02 * wall)

    def summary(self) -> dict:
        ray = {p: mb for p, mb in self.peaks.items() if self.titles[p].startswith("ray::")}
        workers = {p: mb for p, mb in ray.items() if self.busy(p)}
        daemons = {p: mb for p, mb in self.peaks.items() if p not in ray}
        top = max(workers, key=workers.get) if workers else None
        return {
            "driver_start_mb": round(self.driver_start, 1),
            "driver_peak_mb": round(self.driver_peak, 1),
            "worker_peak_mb": round(workers[top], 1) if top else 0.0,
            "worker_peak_title": self.titles[top] if top else "",
            "workers": len(workers),
            "workers_idle": len(ray) - len(workers),
            "workers_sum_peak_mb": round(sum(workers.values()), 1),
            "daemons_sum_peak_mb": round(sum(daemons.values()), 1),
            "per_worker": sorted(
                ([self.titles[p], round(mb, 1)] for p, mb in workers.items()),
                key=lambda t: -t[1],
            ),
        }


# ---------------------------------------------------------------- one size (child process)


def stage_configs(args: argparse.Namespace, workdir: str) -> dict[str, list[str]]:
    """`key=value` overrides per stage: CPU, a small input, a short fixed head training."""
    ray = [f"ray.num_cpus={args.num_cpus}", "ray.num_workers=1", "ray.cpus_per_worker=1"]
    return {
        "embed": ray + [f"backbone.input_size={args.input_size}", "backbone.pooling=avg",
                        "backbone.tta=none", "pin_backbone=true", "ray.use_gpu=false"],
        "index": ray + [f"factory={args.factory}"],
        "heads": ray + ["search.arch=[linear]", "search.lr=[0.01]", "search.weight_decay=[0.0]",
                        f"epochs={args.head_epochs}", f"patience={args.head_epochs}",
                        "max_concurrent=1", "cpus_per_trial=1"],
        "evaluate": ray,
    }  # fmt: skip


def run_stage(name: str, workdir: str, args: argparse.Namespace) -> str:
    """Run one stage in this process; a one-line summary of its result."""
    from medray import stages
    from medray.config import load_config

    if name == "synth":
        from medray.data.synth import synth

        res = synth(workdir, n=args.n, size=args.image_size, seed=0)
        return f"kept={res.kept}"
    module = stages.load_stage(name)
    cfg = load_config(module.Config, overrides=stage_configs(args, workdir)[name], workdir=workdir)
    res = module.run(cfg)
    keep = ("count", "factory", "images_per_s", "accuracy", "macro_f1", "mode")
    note = ", ".join(f"{k}={getattr(res, k)}" for k in keep if hasattr(res, k))
    if hasattr(res, "retrieval"):  # evaluate: one retrieval figure is enough to compare
        note += ", " + ", ".join(f"{k}={v:.3f}" for k, v in res.retrieval.items() if "@10" in k)
    return note


def one_size(args: argparse.Namespace) -> None:
    """Child: every stage at size args.n; writes a JSON line per stage to args.out."""
    import ray

    workdir = str(Path(args.root) / f"n{args.n}")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    with open(args.out, "w") as out:
        try:
            for name in STAGES:
                t0 = time.perf_counter()
                with RssSampler() as sampler:
                    note = run_stage(name, workdir, args)
                row = {"n": args.n, "stage": name, "seconds": round(time.perf_counter() - t0, 2),
                       "note": note, **sampler.summary()}  # fmt: skip
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(f"[n={args.n}] {name:9s} {row['seconds']:8.1f} s  driver peak "
                      f"{row['driver_peak_mb']:.0f} MB  worker peak {row['worker_peak_mb']:.0f} MB "
                      f"({row['worker_peak_title']})  {note}", flush=True)  # fmt: skip
        finally:
            ray.shutdown()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- parent: sizes and report


def run_sizes(args: argparse.Namespace) -> dict[int, dict[str, dict]]:
    for n in args.sizes:
        out = Path(args.root) / f"scale-n{n}.jsonl"
        cmd = [sys.executable, __file__, "--one", str(n), "--out", str(out),
               *child_flags(args)]  # fmt: skip
        subprocess.run(cmd, check=True)
    return read_results(args.root, args.sizes)


def child_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--root", args.root, "--image-size", str(args.image_size), "--input-size",
             str(args.input_size), "--factory", args.factory, "--head-epochs",
             str(args.head_epochs), "--num-cpus", str(args.num_cpus)]  # fmt: skip
    return flags + (["--keep"] if args.keep else [])


def ratio(a: float, b: float) -> str:
    return f"{b / a:6.2f}" if a else "   n/a"


def read_results(root: str, sizes: list[int]) -> dict[int, dict[str, dict]]:
    """The per-stage rows each size's child wrote (a size cut short has fewer stages)."""
    results: dict[int, dict[str, dict]] = {}
    for n in sizes:
        out = Path(root) / f"scale-n{n}.jsonl"
        rows = map(json.loads, out.read_text().splitlines()) if out.exists() else []
        results[n] = {r["stage"]: r for r in rows}
    return results


def report(results: dict[int, dict[str, dict]]) -> None:
    sizes = sorted(results)
    lo, hi = sizes[0], sizes[-1]
    both = [s for s in STAGES if s in results[lo] and s in results[hi]]
    print(f"\nratios {hi}/{lo} (size ratio {hi / lo:g}), measured in this run")
    print(f"{'stage':9s} {'seconds':>8s} {'driver peak':>12s} {'worker peak':>12s}")
    for s in both:
        a, b = results[lo][s], results[hi][s]
        print(f"{s:9s} {ratio(a['seconds'], b['seconds']):>8s} "
              f"{ratio(a['driver_peak_mb'], b['driver_peak_mb']):>12s} "
              f"{ratio(a['worker_peak_mb'], b['worker_peak_mb']):>12s}")  # fmt: skip
    tot = [sum(results[n][s]["seconds"] for s in both) for n in (lo, hi)]
    peak = [max(results[n][s]["driver_peak_mb"] for s in both) for n in (lo, hi)]
    print(f"{'all':9s} {ratio(*tot):>8s} {ratio(*peak):>12s}")
    missing = [s for s in STAGES if s not in both]
    if missing:
        print(f"(not finished at both sizes: {', '.join(missing)})")
    print("\nabsolute (seconds; peak RSS in MB: driver at stage start -> peak; largest Ray "
          "worker; busy workers; sum of their peaks; Ray daemons)")  # fmt: skip
    for n in sizes:
        for s in (s for s in STAGES if s in results[n]):
            r = results[n][s]
            print(f"n={n:<7d} {s:9s} {r['seconds']:8.1f} s  driver {r['driver_start_mb']:6.0f} -> "
                  f"{r['driver_peak_mb']:6.0f}  worker {r['worker_peak_mb']:6.0f} "
                  f"({r['worker_peak_title']})  n_workers {r['workers']:2d}  "
                  f"sum {r['workers_sum_peak_mb']:6.0f}  daemons {r['daemons_sum_peak_mb']:5.0f}")  # fmt: skip
            print(f"{'':18s}{r['note']}")
    print("\n" + machine())


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GB memory, load average {load}; "
            f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--root", default="/tmp/scale", help="workdirs go under here")
    p.add_argument("--image-size", type=int, default=32, help="synthetic tile side (px)")
    p.add_argument("--input-size", type=int, default=64, help="backbone input side (px)")
    p.add_argument("--factory", default="auto", help="index factory (auto: the stage's choice)")
    p.add_argument("--head-epochs", type=int, default=3)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--keep", action="store_true", help="keep the workdirs")
    p.add_argument("--report", action="store_true",
                   help="only print the report of the results already under --root")  # fmt: skip
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one size
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if args.one is not None:
        args.n = args.one
        one_size(args)
        return
    if args.report:
        report(read_results(args.root, args.sizes))
        return
    os.makedirs(args.root, exist_ok=True)
    report(run_sizes(args))


if __name__ == "__main__":
    main()
