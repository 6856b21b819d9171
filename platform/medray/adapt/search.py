"""Search with optional query expansion, the same way in the adapt stage (exact, numpy),
in evaluate and in serving (FAISS, through medray.index.GalleryIndex)."""

from __future__ import annotations

import numpy as np

from medray.adapt.fit import expand_queries


def exact_top_k(q: np.ndarray, g: np.ndarray, k: int, chunk: int = 4096):
    """Exact inner-product top-k of each query row among gallery rows: (scores, rows)."""
    k = min(k, len(g))
    scores = np.empty((len(q), k), np.float32)
    rows = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), chunk):
        sim = q[s : s + chunk] @ g.T
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        psim = np.take_along_axis(sim, part, 1)
        order = np.argsort(-psim, axis=1, kind="stable")
        rows[s : s + chunk] = np.take_along_axis(part, order, 1)
        scores[s : s + chunk] = np.take_along_axis(psim, order, 1)
    return scores, rows


def search_space(q: np.ndarray, g: np.ndarray, k: int, qe: int = 0, alpha: float = 3.0):
    """Exact top-k of `q` among `g`; with qe > 0, alpha-QE over the first search's top-qe
    neighbours, then the expanded queries are searched again."""
    q = np.asarray(q, np.float32)
    g = np.asarray(g, np.float32)
    scores, rows = exact_top_k(q, g, max(k, qe))
    if qe <= 0:
        return scores[:, :k], rows[:, :k]
    expanded = expand_queries(q, g[rows[:, :qe]], scores[:, :qe], alpha)
    return exact_top_k(expanded, g, k)


def index_search(gi, q: np.ndarray, k: int, qe: int = 0, alpha: float = 3.0, allowed_rows=None):
    """`GalleryIndex.search` with alpha-QE: neighbour vectors come back from the index
    itself (`reconstruct`; approximate for compressed indexes, exact for Flat)."""
    scores, rows = gi.search(q, max(k, qe), allowed_rows=allowed_rows)
    if qe <= 0:
        return scores[:, :k], rows[:, :k]
    top = rows[:, :qe]
    vectors = gi.vectors(np.where(top < 0, 0, top)).reshape(len(q), qe, -1)
    weights = np.where(top < 0, -np.inf, scores[:, :qe])  # padding rows add nothing
    expanded = expand_queries(np.asarray(q, np.float32), vectors, weights, alpha)
    return gi.search(expanded, k, allowed_rows=allowed_rows)
