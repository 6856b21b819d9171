"""Benchmark /v1/search: Ray Serve (dynamic batching on and off) against the same
decode -> embed -> search pipeline called in-process, at concurrency 1, 8 and 32.

    python bench/serve.py --workdir W                  # serves models:/medray-demo@production
    python bench/serve.py --bundle DIR --seconds 15    # a bundle directory, no registry
    python bench/serve.py --workdir W --soak 10        # 10 min at concurrency 8, a promotion
                                                       # half-way (bench/soak.py)
    python bench/serve.py --gallery 1000000            # RSS of every replica with a 1M-image
                                                       # gallery (bench/gallery_rss.py)

Prints ratios first (what batching and Serve buy or cost), then p50/p99 latency and
requests/s per setting, then the machine. The embedder runs one replica in every Serve
setting (autoscaling off) so batching is the only difference between them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

KATHER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kather2016-samples"


def query_files(workdir: str | None, folder: str | None, n: int) -> list[tuple[str, bytes]]:
    """Up to n query images (name, bytes): a folder, else the workdir's test split."""
    if folder:
        paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())[:n]
        return [(p.name, p.read_bytes()) for p in paths]
    from medray import storage
    from medray.data import read_manifest

    manifest = read_manifest(workdir)
    rows = manifest[manifest["split"] == "test"].head(n)
    return [(str(r.id), storage.read_bytes(str(r.uri))) for r in rows.itertuples()]


def summarise(latencies: list[float], seconds: float) -> dict[str, float]:
    ms = sorted(x * 1e3 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return {"p50_ms": statistics.median(ms), "p99_ms": p99, "rps": len(ms) / seconds, "n": len(ms)}


def drive(call, files: list[tuple[str, bytes]], concurrency: int, seconds: float) -> dict:
    """`concurrency` threads call `call(name, data)` in a loop for `seconds`; any error fails."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            name, data = files[i % len(files)]
            t0 = time.perf_counter()
            call(name, data)
            with lock:
                latencies.append(time.perf_counter() - t0)
            i += concurrency

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return summarise(latencies, time.perf_counter() - start)


def in_process_call(bundle, k: int):
    """The pipeline without Serve: decode, embed one image, search, in this process."""
    from medray.data.decode import decode_image

    def call(name: str, data: bytes) -> None:
        image = decode_image(data, name)
        emb = bundle.embed([image])
        bundle.search(np.asarray(emb, np.float32), k)

    return call


def http_call(url: str, key: str, k: int):
    import requests

    local = threading.local()

    def call(name: str, data: bytes) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        resp = session.post(
            f"{url}/v1/search?k={k}",
            files={"image": (name, data)},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        if resp.status_code != 200:
            raise RuntimeError(f"/v1/search answered {resp.status_code}: {resp.text[:200]}")

    return call


def serve_config(args, batch_size: int):
    from medray.serving.config import Autoscaling, ServeConfig

    cfg = ServeConfig(
        workdir=args.workdir or "workdir",
        bundle_path=args.bundle,
        model_name=args.model_name,
        port=0,
    )
    cfg.embedder.max_batch_size = batch_size
    cfg.embedder.max_ongoing_requests = max(32, batch_size)
    cfg.embedder.autoscaling = Autoscaling(min_replicas=1, max_replicas=1)
    return cfg


def run_serve(args, files, batch_size: int) -> dict[int, dict]:
    from medray.serving.local import start, stop

    served = start(serve_config(args, batch_size))
    try:
        call = http_call(served.url, served.keys.local_key, args.k)
        drive(call, files, 4, 3.0)  # warm-up: connections, first batches
        return {c: drive(call, files, c, args.seconds) for c in args.concurrency}
    finally:
        stop()


def run_in_process(args, files) -> dict[int, dict]:
    from medray.serving.config import ServeConfig
    from medray.serving.deployments import load_service_bundle

    cfg = serve_config(args, 1)
    uri = cfg.model_uri()
    tracking = None
    if uri.startswith("models:/"):
        from medray.tracking import tracking_uri

        tracking = tracking_uri(ServeConfig(workdir=cfg.workdir).mlflow, cfg.workdir)
    bundle = load_service_bundle(uri, tracking)
    call = in_process_call(bundle, args.k)
    drive(call, files, 1, 2.0)
    return {c: drive(call, files, c, args.seconds) for c in args.concurrency}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def report(results: dict[str, dict[int, dict]], concurrency: list[int]) -> None:
    base, on, off = results["in-process"], results["serve batched"], results["serve unbatched"]
    print("\nratios (higher is better for req/s; lower for latency)")
    print(f"{'concurrency':>11}  {'batched/unbatched req/s':>24}  {'batched/in-process req/s':>25}"
          f"  {'batched/in-process p50':>23}")  # fmt: skip
    for c in concurrency:
        print(f"{c:>11}  {on[c]['rps'] / off[c]['rps']:>24.2f}  {on[c]['rps'] / base[c]['rps']:>25.2f}"
              f"  {on[c]['p50_ms'] / base[c]['p50_ms']:>23.2f}")  # fmt: skip
    print("\nabsolute")
    print(f"{'setting':<16} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'n':>6}")
    for name, per in results.items():
        for c in concurrency:
            r = per[c]
            print(
                f"{name:<16} {c:>4} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['rps']:>7.1f} {r['n']:>6}"
            )
    print(f"\nmachine: {machine()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="workdir whose MLflow holds the model")
    parser.add_argument("--bundle", help="bundle directory (instead of the registry)")
    parser.add_argument("--model-name", default="medray-demo")
    parser.add_argument("--images", default=str(KATHER) if KATHER.is_dir() else None)
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="per setting and level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch-size", type=int, default=8, help="max_batch_size when batched")
    parser.add_argument(
        "--soak",
        type=float,
        metavar="MINUTES",
        help="soak run instead: constant load, a promotion half-way",
    )
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument(
        "--gallery", type=int, metavar="N", help="memory run instead: a synthetic N-image gallery"
    )
    parser.add_argument("--gallery-dir", help="where the --gallery bundle is built (reused)")
    parser.add_argument("--factory", default="IVF1024,PQ64x4fs,Refine(SQ8)")
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--retriever-replicas", type=int, default=2)
    parser.add_argument(
        "--follow-interval",
        type=float,
        default=10.0,
        help="follow_interval_s of the served app in the soak run",
    )
    args = parser.parse_args()
    if args.gallery:
        import gallery_rss

        args.gallery_dir = args.gallery_dir or f"/tmp/medray-gallery-{args.gallery}"
        os.environ.setdefault("MEDRAY_API_KEYS", "bench-key")
        files = query_files(None, args.images, args.n_images)
        gallery_rss.run(args, files, drive, http_call, machine())
        return
    if not (args.bundle or args.workdir):
        parser.error("give --workdir (registered model) or --bundle")
    os.environ.setdefault("MEDRAY_API_KEYS", "bench-key")
    files = query_files(args.workdir, args.images, args.n_images)
    import ray

    from medray.raycluster import quiet_ray_data
    from medray.serving.proxy import enable

    enable()  # as `medray serve` does: a lost Ingress replica is a 503 JSON
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    if args.soak:
        import soak

        if not args.workdir:
            parser.error("--soak serves a registered model: give --workdir")
        soak.report(soak.soak(args, files, args.soak, args.soak_concurrency), machine())
        ray.shutdown()
        return
    results = {"in-process": run_in_process(args, files)}
    results["serve batched"] = run_serve(args, files, args.batch_size)
    results["serve unbatched"] = run_serve(args, files, 1)
    report(results, args.concurrency)
    ray.shutdown()


if __name__ == "__main__":
    main()
