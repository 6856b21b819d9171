"""Approximate index vs exact search, side by side, on random normalised vectors.

    .venv/bin/python bench/index.py [--n 1000000] [--dim 512] [--queries 1000] [--nprobe 16 64]

Builds the index `medray run index` would choose for N vectors (`choose_factory`, trained on
the same sample size, same code path) and an exact `IndexFlatIP`, runs the same queries
through both, and prints ratios first (recall@10 of the approximate top 10 against the exact
top 10, queries/s speed-up, bytes per vector), then absolute figures and the machine.
Random vectors are the hardest case for quantisation (no structure to exploit), so recall
here is a floor for real embeddings.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import faiss
import numpy as np

from medray.index import Config, choose_factory, ivf_nlist, set_nprobe, trained_empty


def random_unit(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 rows uniform on the unit sphere, generated in chunks."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        out[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def clustered_unit(n: int, dim: int, seed: int, centres: int = 4096, spread: float = 1.0):
    """Rows near one of `centres` random directions (noise of norm ~`spread`), normalised:
    data with structure, like real embeddings, unlike `random_unit`."""
    rng = np.random.default_rng(seed)
    c = random_unit(centres, dim, 12345)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        block = c[rng.integers(0, centres, m)]
        block += spread / np.sqrt(dim) * rng.standard_normal((m, dim), dtype=np.float32)
        out[s : s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def timed_search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Rows of the top k and queries per second (one timed run after a 10-query warm-up)."""
    index.search(q[:10], k)
    t = time.perf_counter()
    _, rows = index.search(q, k)
    return rows, len(q) / (time.perf_counter() - t)


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top k found in the approximate top k."""
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, load average {load:.1f}, faiss {faiss.__version__} "
            f"({faiss.get_num_gpus()} GPUs), {platform.system()}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[Config().nprobe, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data",
        choices=["random", "clustered"],
        default="random",
        help="random: uniform on the sphere (the worst case); clustered: 4096 clusters",
    )
    args = ap.parse_args()

    t0 = time.perf_counter()
    make = random_unit if args.data == "random" else clustered_unit
    x = make(args.n, args.dim, args.seed)
    q = make(args.queries, args.dim, args.seed + 1)
    t_gen = time.perf_counter() - t0

    factory = choose_factory(args.n, args.dim)
    t0 = time.perf_counter()
    approx = trained_empty(x, factory, Config().train_size, args.seed)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx.add(x)
    t_add = time.perf_counter() - t0
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(x)

    exact_rows, exact_qps = timed_search(exact, q, args.k)
    results = []
    for nprobe in args.nprobe:
        set_nprobe(approx, nprobe, Config().k_factor)
        rows, qps = timed_search(approx, q, args.k)
        results.append((nprobe, recall_at(rows, exact_rows), qps))
    bytes_approx = faiss.serialize_index(approx).nbytes / args.n
    bytes_exact = 4 * args.dim

    print(
        f"# {factory} vs Flat (exact), {args.data} unit vectors, N={args.n:,}, d={args.dim}, {args.queries} queries, k={args.k}"
    )
    print("ratios (approximate / exact, same run, same queries):")
    for nprobe, rec, qps in results:
        print(f"  nprobe={nprobe:<4d} recall@{args.k}={rec:.3f}  speed-up x{qps / exact_qps:.1f}")
    print(
        f"  memory: {bytes_approx:.0f} B/vector vs {bytes_exact} B/vector (x{bytes_exact / bytes_approx:.1f} smaller)"
    )
    print("absolutes:")
    print(f"  exact Flat: {exact_qps:,.0f} queries/s")
    for nprobe, _, qps in results:
        print(f"  {factory} nprobe={nprobe}: {qps:,.0f} queries/s")
    print(f"  build: train {t_train:.1f} s on {min(args.n, max(Config().train_size, 40 * (ivf_nlist(approx) or 0))):,} "
          f"sampled vectors, add {t_add:.1f} s; data generation {t_gen:.1f} s")  # fmt: skip
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
