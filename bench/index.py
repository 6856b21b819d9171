"""Tuned approximate index vs exact search, side by side, on random and on real-structured vectors.

    .venv/bin/python bench/index.py [--n 1000000] [--dim 1280] [--data random structured]
        [--queries 1000] [--families] [--factory F]

For each data set: N indexed vectors and `--queries` new vectors from the same distribution
(queries are not in the index, like a new image at serving time). The index is built and
tuned by medray's own code (`trained_empty`, `add_vectors`, `medray.index.tune.tune_index`,
target recall@10 0.95 on held-out archive vectors); exact search is FAISS's brute force
(`faiss.knn`, what `IndexFlatIP.search` runs, without a second 5 GB copy of the vectors).
Printed, ratios first: recall@10 of the tuned index on the new queries against the exact top
10, speed-up in queries/s over exact search batched (all queries in one call) and single (one
query per call), bytes per vector; then absolute figures and the machine. `--families`
compares the candidate factory families for `factory: auto` (medray.index.choose_factory).

Data:
- random: uniform on the unit sphere, no structure to exploit: the floor for recall.
- structured: vectors with the neighbourhood structure of real embeddings. Real chest X-rays
  (PneumoniaMNIST train + val, 4,406 images, ../shared/data) are embedded with the bundled
  EfficientNet-Lite0 (avg pooling, 64 px, dim 1280; cached under --cache), and N vectors are
  drawn from an adaptive Gaussian kernel density estimate of them: a real embedding as centre,
  plus noise shaped by the real embeddings' principal components (top 256, the directions
  they actually vary in; isotropic noise in 1280 dims would make every point equidistant)
  and scaled to that embedding's distance to its own nearest real neighbour (x `bandwidth`,
  so dense regions stay dense and sparse ones sparse), then L2-normalised. Bandwidth 0.7
  makes the median cosine to the 1st nearest neighbour of a same-size generated sample
  equal the real one (0.87); its neighbourhoods are slightly looser at the 10th neighbour
  (0.78 vs 0.83), so recall here errs on the hard side. The script prints both
  statistics (cosine to the 1st and 10th neighbour, share of variance in the top 10/100
  principal components) for the real set and a generated set of the same size.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from medray.index import Config, add_vectors, choose_factory, trained_empty
from medray.index.tune import recall_at_k, tune_index

PNEUMONIA = Path(__file__).resolve().parents[1] / "../shared/data/pneumoniamnist-trainval"


def random_unit(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 rows uniform on the unit sphere, generated in chunks."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        out[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def real_embeddings(cache: Path) -> np.ndarray:
    """(4406, 1280) unit embeddings of the real PneumoniaMNIST train+val X-rays (cached)."""
    if cache.exists():
        return np.load(cache)
    import torch

    from medray.config import BackboneConfig
    from medray.models import embed_images, load_backbone

    npz = PNEUMONIA.resolve() / "pneumoniamnist_trainval.npz"
    if not npz.exists():
        raise FileNotFoundError(f"{npz}: the real images for --data structured are missing")
    data = np.load(npz)
    images = np.concatenate([data["train_images"], data["val_images"]])
    torch.set_num_threads(os.cpu_count() or 1)
    backbone = load_backbone(BackboneConfig(pooling="avg", tta="none", input_size=64))
    x = embed_images(backbone, list(images)).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, x)
    return x


def neighbour_cosines(x: np.ndarray, k: int = 10, queries: int = 5000) -> tuple[np.ndarray, ...]:
    """Cosine of (up to `queries`) rows of x to their 1st and k-th nearest other row."""
    q = x[: min(queries, len(x))]
    scores, _ = faiss.knn(q, x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return scores[:, 1], scores[:, k]


class KernelDensity:
    """Adaptive Gaussian KDE of real embeddings with PCA-shaped noise (module doc)."""

    def __init__(self, real: np.ndarray, bandwidth: float = 0.7, rank: int = 256):
        self.real = real
        centred = real - real.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        var = s[:rank] ** 2 / (len(real) - 1)
        self.basis = (vt[: len(var)] * np.sqrt(var)[:, None]).astype(np.float32)
        cos1, _ = neighbour_cosines(real, 1, len(real))
        nn_dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cos1))
        self.scale = (bandwidth * nn_dist / np.sqrt(var.sum())).astype(np.float32)

    def sample(self, n: int, seed: int, chunk: int = 50_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.real.shape[1]), dtype=np.float32)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            centre = rng.integers(0, len(self.real), m)
            noise = rng.standard_normal((m, len(self.basis)), dtype=np.float32) @ self.basis
            block = self.real[centre] + self.scale[centre, None] * noise
            out[s : s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out


def variance_share(x: np.ndarray, tops: tuple[int, ...] = (10, 100)) -> list[float]:
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False) ** 2
    return [float(s[:t].sum() / s.sum()) for t in tops]


def structure_report(real: np.ndarray, kde: KernelDensity) -> list[str]:
    """Generated vs real, same size: neighbour cosines (median [10%, 90%]) and PCA spectrum."""
    lines = []
    for name, x in (("real", real), ("generated", kde.sample(len(real), seed=99))):
        c1, c10 = neighbour_cosines(x)
        v10, v100 = variance_share(x)
        q = lambda c: f"{np.median(c):.3f} [{np.quantile(c, 0.1):.3f}, {np.quantile(c, 0.9):.3f}]"  # noqa: E731
        lines.append(f"  {name:9s} ({len(x):,}): cos to 1st NN {q(c1)}, 10th NN {q(c10)}; "
                     f"variance in top 10 / 100 PCs {v10:.2f} / {v100:.2f}")  # fmt: skip
    return lines


def exact_search(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Exact top k rows, batched q/s, single-query q/s (on up to 50 queries)."""
    t = time.perf_counter()
    _, rows = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    batched = len(q) / (time.perf_counter() - t)
    few = q[: min(50, len(q))]
    t = time.perf_counter()
    for v in few:
        faiss.knn(v[None], x, k, metric=faiss.METRIC_INNER_PRODUCT)
    return rows, batched, len(few) / (time.perf_counter() - t)


def index_search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Top k rows, batched q/s, single-query q/s (on up to 1000 queries), after a warm-up."""
    index.search(q[:10], k)
    t = time.perf_counter()
    _, rows = index.search(q, k)
    batched = len(q) / (time.perf_counter() - t)
    few = q[: min(1000, len(q))]
    t = time.perf_counter()
    for v in few:
        index.search(v[None], k)
    return rows, batched, len(few) / (time.perf_counter() - t)


def measure(x, q, factory: str, exact, cfg: Config, targets: list[float]) -> list[dict]:
    """Build `factory` once with medray's code; per target, tune it, then search new queries."""
    t = time.perf_counter()
    index = add_vectors(trained_empty(x, factory, cfg.train_size, cfg.seed), x)
    build_s = time.perf_counter() - t
    out = []
    for target in targets:
        tuned = tune_index(index, x, cfg.model_copy(update={"target_recall": target}))
        rows, batched, single = index_search(index, q, cfg.target_k)
        exact_rows, exact_batched, exact_single = exact
        out.append({"factory": factory, "params": tuned["search_params"], "tuned": tuned,
                    "recall": recall_at_k(rows, exact_rows), "batched": batched,
                    "single": single, "x_batched": batched / exact_batched,
                    "x_single": single / exact_single, "bytes": tuned["bytes_per_vector"],
                    "build_s": build_s, "target": target})  # fmt: skip
    return out


def families(n: int, dim: int) -> list[str]:
    """The candidate families for `factory: auto` at n x dim (nlist and m as choose_factory)."""
    chosen = choose_factory(max(n, 100_000), dim)
    nlist = chosen.split(",")[0].split("_")[0].removeprefix("IVF")
    m = 64 if dim % 64 == 0 else max(d for d in range(2, 65, 2) if dim % d == 0)
    return [chosen, f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)", f"IVF{nlist},PQ{m},Refine(SQ8)",
            f"IVF{nlist}_HNSW32,PQ{m}x4fs,Refine(SQ8)", f"IVF{nlist},SQ8"]  # fmt: skip


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
    ap.add_argument("--dim", type=int, default=1280, help="random data only (structured: 1280)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--data", nargs="+", choices=["random", "structured"],
                    default=["random", "structured"])  # fmt: skip
    ap.add_argument("--factory", nargs="+", default=None, help="default: choose_factory(n, dim)")
    ap.add_argument("--families", action="store_true", help="compare the auto candidates")
    ap.add_argument("--bandwidth", type=float, default=0.7)
    ap.add_argument("--target", type=float, nargs="+", default=[0.95], help="target recall(s)")
    ap.add_argument("--tune-queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cache", type=Path, default=Path("/tmp/medray-bench/pneumonia-lite0-avg64.npy")
    )
    args = ap.parse_args()
    cfg = Config(workdir="unused", tune_queries=args.tune_queries, seed=args.seed)

    report, absolutes, structure = [], [], []
    for data in args.data:
        t = time.perf_counter()
        if data == "random":
            x, q = random_unit(args.n, args.dim, args.seed), random_unit(args.queries, args.dim, 1)
        else:
            real = real_embeddings(args.cache)
            kde = KernelDensity(real, args.bandwidth)
            structure = structure_report(real, kde)
            x, q = kde.sample(args.n, args.seed), kde.sample(args.queries, args.seed + 1)
        gen_s = time.perf_counter() - t
        exact = exact_search(x, q, cfg.target_k)
        dim = x.shape[1]
        kinds = (
            families(args.n, dim)
            if args.families
            else (args.factory or [choose_factory(args.n, dim)])
        )
        for factory, r in (
            (f, r) for f in kinds for r in measure(x, q, f, exact, cfg, args.target)
        ):
            report.append(f"  {data:10s} {factory:38s} recall@{cfg.target_k}={r['recall']:.3f} "
                          f"(tuned to {r['target']} on archive: {r['tuned']['recall_at_k']:.3f})  speed-up "
                          f"batched x{r['x_batched']:.1f}, single x{r['x_single']:.1f}  "
                          f"{r['bytes']:.0f} B/vector (Flat {4 * dim}, x{4 * dim / r['bytes']:.1f} smaller)  "
                          f"{r['params']}")  # fmt: skip
            absolutes.append(f"  {data:10s} {factory:38s} {r['batched']:,.0f} q/s batched, "
                             f"{r['single']:,.0f} q/s single; build {r['build_s']:.0f} s, "
                             f"tune {r['tuned']['seconds']:.0f} s")  # fmt: skip
            print(report[-1], flush=True)
        absolutes.append(f"  {data:10s} exact (faiss.knn = IndexFlatIP.search) {exact[1]:,.1f} q/s "
                         f"batched, {exact[2]:,.1f} q/s single; data generation {gen_s:.0f} s")  # fmt: skip
        del x

    print(f"# tuned index vs exact, N={args.n:,}, {args.queries} new queries, k={cfg.target_k}, "
          f"tuned on {args.tune_queries} archive vectors")  # fmt: skip
    print("ratios (index / exact, same run, same queries):")
    print("\n".join(report))
    if structure:
        print(f"structured data vs the real embeddings (bandwidth {args.bandwidth}):")
        print("\n".join(structure))
    print("absolutes:")
    print("\n".join(absolutes))
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
