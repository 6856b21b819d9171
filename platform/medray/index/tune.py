"""Measured recall at build time: tune an index's search parameters on the archive's own vectors.

An approximate index with unknown recall is not served (DESIGN.md), so every build holds out
`tune_queries` of the archive's own vectors as queries, computes their exact top k by brute
force (`faiss.knn`, blocked inside FAISS), and searches the parameter space of the built index
for the cheapest setting whose recall@k reaches `target_recall`.

Self-matches: each query is a vector of the index, so exact and approximate searches both ask
for k + 1 neighbours and drop the query's own row (or, where it is missing from a list, the
last one); recall@k = |approx top k & exact top k| / k, averaged over the queries. While
measuring, the Refine factor is scaled by k / (k + 1) so that as many candidates are
re-ranked as in a search for k (without it, recall on new queries came out ~0.01 lower).

Parameter search: `faiss.ParameterSpace` names the parameters the index has (`nprobe`,
`k_factor_rf` for Refine, `efSearch` for HNSW, `quantizer_efSearch` for an IVF with an HNSW
coarse quantiser) and sets them through every wrapper (OPQ, Refine, IVF). Recall grows and
speed falls with each of them, so for every re-rank factor we binary-search the smallest
`nprobe` (or `efSearch`) that reaches the target; the coarse quantiser's efSearch follows
nprobe (2 x nprobe, at least 32). Each such minimal point is timed on the batched queries and
the fastest wins. When nothing reaches the target the most accurate point found is kept.
"""

from __future__ import annotations

import math
import time

import numpy as np

K_FACTORS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
OLD_META_KEYS = {"nprobe": "nprobe", "k_factor": "k_factor_rf"}
"""Index dirs written before tuning stored these; they map to ParameterSpace names."""


def parameter_names(index) -> list[str]:
    """The search parameters FAISS's ParameterSpace exposes for this index (`ht` left out:
    polysemous filtering is never trained, see medray.index.skip_polysemous)."""
    import faiss

    space = faiss.ParameterSpace()
    space.initialize(index)
    names = [space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())]
    return [n for n in names if n != "ht"]


def apply_search_params(index, params: dict) -> None:
    """Set search parameters in the index itself (in place), through every wrapper.
    Accepts the old index.json keys (`nprobe`, `k_factor`) too; names the index does not
    have (e.g. nprobe on Flat) are skipped, so an old directory still loads."""
    import faiss

    names = set(parameter_names(index))
    space = faiss.ParameterSpace()
    for key, value in (params or {}).items():
        name = OLD_META_KEYS.get(key, key)
        if name in names and value is not None:
            space.set_index_parameter(index, name, float(value))


def current_params(index) -> dict:
    """The search parameters the index holds now, by ParameterSpace name."""
    import faiss

    out = {}
    for name in parameter_names(index):
        if name == "nprobe":
            out[name] = int(faiss.extract_index_ivf(index).nprobe)
        elif name == "k_factor_rf":
            out[name] = float(faiss.downcast_index(_unwrap(index)).k_factor)
        elif name == "efSearch":
            out[name] = int(_hnsw(index).hnsw.efSearch)
        elif name == "quantizer_efSearch":
            quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
            out[name] = int(quantizer.hnsw.efSearch)
    return out


def _unwrap(index):
    """The index under an IndexPreTransform (OPQ, PCA), else the index."""
    import faiss

    index = faiss.downcast_index(index)
    return (
        faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    )


def _hnsw(index):
    import faiss

    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    return inner


def search_parameters(index, params: dict, sel=None):
    """A faiss.SearchParameters for one search (e.g. restricted by `sel`) that keeps the
    index's search settings: `params` (ParameterSpace names, old keys accepted) over the
    values the index holds. IVF (with an HNSW quantiser), HNSW and Refine are wrapped."""
    import faiss

    values = current_params(index)
    values.update({OLD_META_KEYS.get(k, k): v for k, v in (params or {}).items()})
    # FAISS's Python wrappers keep nested parameters and selectors alive with their parent.
    if "nprobe" in values:
        ivf = {"sel": sel, "nprobe": int(values["nprobe"])}
        if "quantizer_efSearch" in values:
            ef = int(values["quantizer_efSearch"])
            ivf["quantizer_params"] = faiss.SearchParametersHNSW(efSearch=ef)
        inner = faiss.SearchParametersIVF(**ivf)
    elif "efSearch" in values:
        inner = faiss.SearchParametersHNSW(sel=sel, efSearch=int(values["efSearch"]))
    else:
        inner = faiss.SearchParameters(sel=sel)
    if "k_factor_rf" in values:
        inner = faiss.IndexRefineSearchParameters(
            k_factor=float(values["k_factor_rf"]), base_index_params=inner
        )
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        inner = faiss.SearchParametersPreTransform(index_params=inner)
    return inner


# ---------------------------------------------------------------- plain functions


def drop_self(rows: np.ndarray, query_rows: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) rows from (Q, k+1) results: each query's own row removed where present, else
    the last one (the same rule for exact and approximate results)."""
    out = np.empty((len(rows), k), dtype=np.int64)
    for i, (found, own) in enumerate(zip(rows, query_rows, strict=True)):
        kept = found[found != own]
        out[i] = kept[:k]
    return out


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top k found in the approximate top k (-1 rows ignored)."""
    k = exact.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / k)


def query_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row numbers of the held-out queries (all rows when n <= size)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def primary_values(names: list[str], nlist: int | None) -> list[dict]:
    """The cost-ordered values of the main knob (nprobe: powers of two up to nlist; efSearch),
    each a dict of the parameters that move with it."""
    if "nprobe" in names and nlist:
        steps = sorted({2**i for i in range(int(math.log2(nlist)) + 1)} | {nlist})
        if "quantizer_efSearch" in names:
            return [{"nprobe": p, "quantizer_efSearch": max(32, 2 * p)} for p in steps]
        return [{"nprobe": p} for p in steps]
    if "efSearch" in names:
        return [{"efSearch": e} for e in EF_SEARCH]
    return [{}]


def secondary_values(names: list[str]) -> list[dict]:
    """Re-rank factors, smallest first (one binary search over the main knob for each)."""
    if "k_factor_rf" in names:
        return [{"k_factor_rf": float(f)} for f in K_FACTORS]
    return [{}]


# ---------------------------------------------------------------- FAISS edge


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) rows of the exact top k by inner product (brute force, blocked in FAISS)."""
    import faiss

    _, rows = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    return rows


def tune_index(index, vectors: np.ndarray, cfg) -> dict:
    """Measure recall@k on held-out archive vectors and apply the cheapest search parameters
    reaching `cfg.target_recall` (in place). `cfg.target_recall` None: apply the fixed
    `cfg.nprobe`/`cfg.k_factor` and only measure. Exact Flat: recall 1.0 without searching.
    Returns the record index.json keeps (module doc)."""
    import faiss

    start = time.perf_counter()
    n = int(index.ntotal)
    k = max(1, min(cfg.target_k, n - 1))
    target = cfg.target_recall
    record = {"search_params": {}, "recall_at_k": 1.0, "k": k, "target_recall": target,
              "target_met": True, "bytes_per_vector": bytes_per_vector(index),
              "tune_queries": 0, "seconds": 0.0}  # fmt: skip
    names = parameter_names(index)
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat) or n < 2:
        record["seconds"] = round(time.perf_counter() - start, 2)
        return record
    q_rows = query_sample(n, cfg.tune_queries, cfg.seed + 1)
    queries = np.ascontiguousarray(vectors[q_rows], dtype=np.float32)
    exact = drop_self(exact_neighbours(vectors, queries, k + 1), q_rows, k)

    def measure(params: dict) -> tuple[float, float]:
        # k + 1 results are asked for (self dropped): scale the re-rank factor so that as many
        # candidates are re-ranked as a search for k will re-rank (k_factor x k)
        scaled = {
            name: max(1.0, v * k / (k + 1)) if name == "k_factor_rf" else v
            for name, v in params.items()
        }
        apply_search_params(index, scaled)
        t = time.perf_counter()
        _, rows = index.search(queries, k + 1)
        seconds = time.perf_counter() - t
        return recall_at_k(drop_self(rows, q_rows, k), exact), seconds

    if target is None:
        fixed = {"nprobe": cfg.nprobe, "k_factor_rf": cfg.k_factor}
        chosen = {name: v for name, v in fixed.items() if name in names}
        recall, _ = measure(chosen)
        met = None
    else:
        chosen, recall, met = sweep(measure, names, _nlist(index), target)
    apply_search_params(index, chosen)
    record.update(search_params=current_params(index), recall_at_k=round(recall, 4),
                  target_met=met, tune_queries=len(q_rows),
                  seconds=round(time.perf_counter() - start, 2))  # fmt: skip
    return record


def sweep(measure, names: list[str], nlist: int | None, target: float) -> tuple[dict, float, bool]:
    """(params, recall, target met): for each re-rank factor, binary-search the smallest main
    knob reaching `target`, then keep the fastest of those minimal points (re-timed); the most
    accurate point seen when none reaches it. `measure(params) -> (recall, seconds)`."""
    steps = primary_values(names, nlist)
    seen: dict[tuple, tuple[float, float]] = {}

    def at(extra: dict, i: int) -> tuple[dict, float, float]:
        params = {**steps[i], **extra}
        key = tuple(sorted(params.items()))
        if key not in seen:
            seen[key] = measure(params)
        return params, *seen[key]

    reached = []
    hi = len(steps) - 1
    for extra in secondary_values(names):
        if at(extra, hi)[1] < target:
            continue
        lo = 0
        while lo < hi:  # smallest i with recall >= target (recall grows with i)
            mid = (lo + hi) // 2
            if at(extra, mid)[1] >= target:
                hi = mid
            else:
                lo = mid + 1
        reached.append(at(extra, hi)[0])  # more re-ranking never needs a larger knob
    if not reached:
        best = max(seen.items(), key=lambda kv: kv[1][0])
        return dict(best[0]), best[1][0], False
    timed = []
    for params in reached:
        recall, seconds = measure(params)
        timed.append((min(seconds, seen[tuple(sorted(params.items()))][1]), recall, params))
    seconds, recall, params = min(timed, key=lambda t: t[0])
    return params, recall, True


def _nlist(index) -> int | None:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return None


def bytes_per_vector(index) -> float:
    """Serialised size over vector count: what an index costs in memory and on disk."""
    return round(serialized_size(index) / max(1, index.ntotal), 1)


def serialized_size(index) -> int:
    """Bytes `faiss.serialize_index(index)` would take, counted as FAISS writes them: no copy
    of the index is held (a Flat index is as large as all the embeddings)."""
    import faiss

    size = 0

    def count(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return size
