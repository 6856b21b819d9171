"""Retrieval, verification and kNN metrics as plain numpy functions.

Conventions shared by every function here:
- Labels are a boolean matrix (N, L): row i says which of L label names image i carries
  (`label_matrix` builds it). Single-label data has one True per row; an empty row is
  "no finding" (multi-label data such as chest X-rays).
- A search result is `rows` (Q, K) of gallery row numbers, best first; -1 marks a missing
  neighbour (FAISS pads with -1 when the gallery has fewer than K rows), which counts as an
  irrelevant neighbour with no labels.
- The gain of a neighbour is the number of labels it shares with the query (`gains`).
- Unknown labels (CheXpert's uncertain findings imported with `--uncertain ignore`) are a
  second boolean matrix (N, L) (`unknown_matrix`), never True where the label is. They
  are not labels: an unknown label is never shared (gains, P@K, mAP@K, NDCG@K count known
  labels only) and never votes. Where the truth of a decision hangs on an unknown label it
  is left out: a pair whose "same category" depends on one (`sample_pairs`), a query whose
  vote is right or wrong only by an unknown label (`mmv_at_k`).

AvG@K follows the chest X-ray retrieval poster in DESIGN.md ("mean over the top K of the
number of labels shared with the query"); mMV@K is the majority vote at K used by
histology search engines (Yottixel, SMILY). Every function is checked against a
brute-force reference in tests/test_metrics.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def label_matrix(
    labels: Sequence[Sequence[str]], names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Label lists -> (N, L) bool matrix and the L names (sorted union when not given)."""
    names = sorted({str(x) for row in labels for x in row}) if names is None else list(names)
    col = {n: j for j, n in enumerate(names)}
    out = np.zeros((len(labels), len(names)), dtype=bool)
    for i, row in enumerate(labels):
        for x in row:
            if str(x) not in col:
                raise ValueError(f"label {x!r} of row {i} is not one of {names}")
            out[i, col[str(x)]] = True
    return out, names


def unknown_matrix(
    unknown: Sequence[Sequence[str]], names: Sequence[str], labels: np.ndarray | None = None
) -> np.ndarray:
    """Per-row lists of unknown label names -> (N, L) bool over `names` (other names are
    ignored); a cell already True in `labels` (N, L) is known, not unknown."""
    col = {n: j for j, n in enumerate(names)}
    out = np.zeros((len(unknown), len(col)), dtype=bool)
    for i, row in enumerate(unknown):
        for x in row or []:
            j = col.get(str(x))
            if j is not None:
                out[i, j] = True
    if labels is not None:
        out &= ~np.asarray(labels, dtype=bool)
    return out


def retrieved_labels(gallery_labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(Q, K, L) labels of each neighbour; a missing neighbour (-1) has none."""
    rows = np.asarray(rows)
    out = np.asarray(gallery_labels, dtype=bool)[np.where(rows < 0, 0, rows)]
    out[rows < 0] = False
    return out


def gains(query_labels: np.ndarray, gallery_labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(Q, K) number of labels each neighbour shares with its query."""
    got = retrieved_labels(gallery_labels, rows)
    return (got & np.asarray(query_labels, dtype=bool)[:, None, :]).sum(-1)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] < k:
        raise ValueError(f"need a (Q, >={k}) array of neighbours, got shape {values.shape}")
    return values[:, :k]


def avg_at_k(gain: np.ndarray, k: int) -> float:
    """AvG@K: mean over queries of the mean, over the top K, of the labels shared with the query."""
    return float(_top(gain, k).mean()) if len(gain) else float("nan")


def precision_at_k(gain: np.ndarray, k: int) -> float:
    """P@K: fraction of the top K that is relevant. A neighbour is relevant when it shares at
    least one label with the query (for single-label data: the same class)."""
    return float((_top(gain, k) > 0).mean()) if len(gain) else float("nan")


def map_at_k(gain: np.ndarray, k: int, n_relevant: np.ndarray | None = None) -> float:
    """mAP@K: mean over queries of AP@K = sum_i P@i * rel_i / D over the top K.

    D = min(K, relevant items in the gallery) when `n_relevant` (Q,) is given (the TREC
    definition), else the number of relevant items among the top K. Relevant as in P@K; a
    query with D = 0 scores 0.
    """
    rel = (_top(gain, k) > 0).astype(np.float64)
    if not len(rel):
        return float("nan")
    prec = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    denom = rel.sum(1) if n_relevant is None else np.minimum(k, np.asarray(n_relevant))
    ap = np.divide((prec * rel).sum(1), denom, out=np.zeros(len(rel)), where=denom > 0)
    return float(ap.mean())


def ndcg_at_k(gain: np.ndarray, k: int, ideal: np.ndarray | None = None) -> float:
    """NDCG@K with graded gain = labels shared: DCG = sum_i gain_i / log2(i + 1), over the DCG
    of `ideal` (Q, >=K) gains, the best the gallery offers (`ideal_gains`), sorted descending.
    Without `ideal` the retrieved gains re-sorted are the ideal. A query whose ideal DCG is 0
    scores 0."""
    g = _top(gain, k).astype(np.float64)
    if not len(g):
        return float("nan")
    best = -np.sort(-g, axis=1) if ideal is None else _top(ideal, k).astype(np.float64)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg, idcg = g @ disc, best @ disc
    return float(np.divide(dcg, idcg, out=np.zeros(len(g)), where=idcg > 0).mean())


def ideal_gains(
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The K best gains the gallery offers each query (sorted descending) and the number of
    relevant gallery items per query; `exclude` (Q,) gallery rows never counted (the query
    itself in leave-one-out), -1 for none. Queries go in chunks of ~64M (query, gallery)
    cells so a million-image gallery stays within a few hundred MB."""
    q = np.asarray(query_labels, dtype=np.int32)
    g = np.asarray(gallery_labels, dtype=np.int32)
    chunk = chunk or max(1, (1 << 26) // max(len(g), 1))
    kk = min(k, len(g))
    ideal = np.zeros((len(q), k), dtype=np.int64)
    n_rel = np.zeros(len(q), dtype=np.int64)
    for s in range(0, len(q), chunk):
        shared = q[s : s + chunk] @ g.T
        if exclude is not None:
            ex = np.asarray(exclude)[s : s + chunk]
            idx = np.nonzero(ex >= 0)[0]
            shared[idx, ex[idx]] = 0
        n_rel[s : s + chunk] = (shared > 0).sum(1)
        if kk:
            part = -np.partition(-shared, kk - 1, axis=1)[:, :kk]
            ideal[s : s + chunk, :kk] = -np.sort(-part, axis=1)
    return ideal, n_rel


def _with_none(labels: np.ndarray) -> np.ndarray:
    """Append a "no finding" column (true where a row has no label) so it can win a vote."""
    return np.concatenate([labels, ~labels.any(-1, keepdims=True)], axis=-1)


def knn_vote(neighbour_labels: np.ndarray, k: int) -> np.ndarray:
    """(Q,) index of the label most frequent among the top K neighbours' labels (Q, K, L);
    ties go to the label seen at the best rank. Index L means "no finding" won."""
    got = _with_none(np.asarray(neighbour_labels, dtype=bool)[:, :k])
    if got.shape[1] < k:
        raise ValueError(f"need >= {k} neighbours, got {got.shape[1]}")
    votes = got.sum(1).astype(np.float64)
    first = np.where(got.any(1), got.argmax(1), k)  # rank where each label first appears
    return (votes + (k - first) / (k + 1)).argmax(1)


def mmv_at_k(
    query_labels: np.ndarray,
    neighbour_labels: np.ndarray,
    k: int,
    query_unknown: np.ndarray | None = None,
) -> float:
    """mMV@K = kNN accuracy at K: the majority-vote label of the top K (`knn_vote`) is correct
    when the query carries it (a query with no label: when "no finding" wins).

    With `query_unknown` (Q, L): a query is left out when its vote's truth is unknown (the
    vote is one of its unknown labels, or "no finding" while it has no known label but some
    unknown one); NaN when every query is left out."""
    q = _with_none(np.asarray(query_labels, dtype=bool))
    if not len(q):
        return float("nan")
    vote = knn_vote(neighbour_labels, k)
    right = q[np.arange(len(q)), vote]
    if query_unknown is None:
        return float(right.mean())
    u = np.asarray(query_unknown, dtype=bool)
    u = np.concatenate([u, (u.any(1) & ~q[:, :-1].any(1))[:, None]], axis=1)
    decided = ~u[np.arange(len(q)), vote]
    return float(right[decided].mean()) if decided.any() else float("nan")


knn_accuracy = mmv_at_k


def mmv_balanced_at_k(
    query_labels: np.ndarray,
    neighbour_labels: np.ndarray,
    k: int,
    query_unknown: np.ndarray | None = None,
) -> float:
    """Class-balanced mMV@K: the mean over query label sets (each class; "no finding" is one)
    of mMV@K within that set. A 9:1 archive cannot score well by always voting the majority.
    `query_unknown` as in `mmv_at_k`; a set whose queries are all left out is skipped."""
    q = np.asarray(query_labels, dtype=bool)
    if not len(q):
        return float("nan")
    _, group = np.unique(q, axis=0, return_inverse=True)
    group = group.reshape(-1)
    neigh = np.asarray(neighbour_labels)
    u = None if query_unknown is None else np.asarray(query_unknown, dtype=bool)
    per = [
        mmv_at_k(q[group == g], neigh[group == g], k, None if u is None else u[group == g])
        for g in np.unique(group)
    ]
    per = [v for v in per if not np.isnan(v)]
    return float(np.mean(per)) if per else float("nan")


"""kNN classification accuracy by majority vote over the top K: the same number as mMV@K."""


def loo_neighbours(
    embeddings: np.ndarray, k: int, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Exact leave-one-out search: (scores, rows) (N, k) by inner product, self excluded.
    Rows beyond N - 1 neighbours are -1."""
    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    kk = min(k, n - 1)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    rows = np.full((n, k), -1, dtype=np.int64)
    for s in range(0, n, chunk):
        sim = x[s : s + chunk] @ x.T
        sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf
        if kk <= 0:
            continue
        part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        psim = np.take_along_axis(sim, part, 1)
        order = np.argsort(-psim, axis=1, kind="stable")
        rows[s : s + chunk, :kk] = np.take_along_axis(part, order, 1)
        scores[s : s + chunk, :kk] = np.take_along_axis(psim, order, 1)
    return scores, rows


def loo_knn_accuracy(embeddings: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Leave-one-out kNN accuracy: each image classified by the vote of its K nearest others."""
    _, rows = loo_neighbours(embeddings, k)
    return mmv_at_k(labels, retrieved_labels(labels, rows), k)


def pair_accuracy(similarities: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """Fraction of pairs decided right by "same category when similarity > threshold"."""
    s = np.asarray(similarities, dtype=np.float64)
    return (
        float(((s > threshold) == np.asarray(same, dtype=bool)).mean()) if len(s) else float("nan")
    )


def choose_pair_threshold(similarities: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """The threshold t maximising `pair_accuracy` on these (validation) pairs, and that accuracy.

    Candidates are the midpoints between consecutive distinct similarities plus one below all
    and one above all; the smallest best t wins ties.
    """
    s = np.asarray(similarities, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    if not len(s):
        raise ValueError("choose_pair_threshold: no pairs")
    vals = np.unique(s)
    cands = np.concatenate([[vals[0] - 1e-6], (vals[:-1] + vals[1:]) / 2, [vals[-1] + 1e-6]])
    order = np.argsort(s)
    ss, yy = s[order], y[order]
    # For t between ss[j-1] and ss[j]: pairs below (predicted different) are the first j.
    below = np.searchsorted(ss, cands, side="right")
    neg_below = np.concatenate([[0], np.cumsum(~yy)])[below]
    pos_above = y.sum() - np.concatenate([[0], np.cumsum(yy)])[below]
    acc = (neg_below + pos_above) / len(s)
    best = int(np.argmax(acc))
    return float(cands[best]), float(acc[best])


def sample_pairs(
    labels: np.ndarray, n: int, rng: np.random.Generator, unknown: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """About `n` pairs (i, j), i != j, half sharing a label ("same") and half not where the data
    allows; returns (i, j, same). All pairs when there are fewer than `n`. With `unknown`
    (N, L): pairs that share no known label but could share an unknown one (undecided) are
    never drawn."""
    y = np.asarray(labels, dtype=bool)
    m = len(y)
    if m < 2:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, bool),)
    if m * (m - 1) // 2 <= n:
        i, j = np.triu_indices(m, 1)
        i, j = _decided(y, unknown, i, j)
    else:
        i = rng.integers(0, m, 20 * n)
        j = rng.integers(0, m, 20 * n)
        keep = i != j
        i, j = _decided(y, unknown, i[keep], j[keep])
        same = (y[i] & y[j]).any(1)
        pos, neg = np.nonzero(same)[0], np.nonzero(~same)[0]
        half = n // 2
        take_pos = pos[: max(half, n - len(neg))][:n]
        take_neg = neg[: n - len(take_pos)]
        sel = np.sort(np.concatenate([take_pos, take_neg]))
        i, j = i[sel], j[sel]
    return i, j, (y[i] & y[j]).any(1)


def _decided(y: np.ndarray, unknown: np.ndarray | None, i: np.ndarray, j: np.ndarray):
    """The pairs whose "same" flag does not hang on an unknown label."""
    if unknown is None or not np.asarray(unknown).any():
        return i, j
    u = np.asarray(unknown, dtype=bool)
    same = (y[i] & y[j]).any(1)
    could = ((y[i] | u[i]) & (y[j] | u[j])).any(1)
    keep = same | ~could
    return i[keep], j[keep]
