"""medray.metrics against brute-force references written with Python sets and loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medray import metrics as M

SETTINGS = settings(max_examples=40, deadline=None)


def random_case(seed: int, multi: bool):
    """Query/gallery label sets and a random ranking (with some -1 padding)."""
    rng = np.random.default_rng(seed)
    n_labels, nq, ng, k = int(rng.integers(1, 5)), int(rng.integers(1, 7)), 12, 6

    def draw(n):
        if multi:
            return [
                sorted({f"l{j}" for j in range(n_labels) if rng.random() < 0.4}) for _ in range(n)
            ]
        return [[f"l{int(rng.integers(n_labels))}"] for _ in range(n)]

    q, g = draw(nq), draw(ng)
    rows = np.stack([rng.permutation(ng)[:k] for _ in range(nq)])
    if rng.random() < 0.3:
        rows[:, -1] = -1
    return q, g, rows, k


def ref_gain(q, g, r):
    return 0 if r < 0 else len(set(q) & set(g[r]))


def ref_ap(q, g, ranked, k, n_rel=None):
    hits, total = 0, 0.0
    for i, r in enumerate(ranked[:k], 1):
        if ref_gain(q, g, r) > 0:
            hits += 1
            total += hits / i
    d = hits if n_rel is None else min(k, n_rel)
    return total / d if d else 0.0


def ref_vote(neigh_labels, k):
    """Most frequent label (None = no finding) among the top k; ties to the earliest seen."""
    count, first = {}, {}
    for rank, labs in enumerate(neigh_labels[:k]):
        for lab in labs or [None]:
            count[lab] = count.get(lab, 0) + 1
            first.setdefault(lab, rank)
    return max(count, key=lambda lab: (count[lab], -first[lab]))


def setup(seed, multi):
    q, g, rows, k = random_case(seed, multi)
    names = sorted({x for r in q + g for x in r})
    qm, _ = M.label_matrix(q, names)
    gm, _ = M.label_matrix(g, names)
    return q, g, rows, k, qm, gm, names


@SETTINGS
@given(seed=st.integers(0, 10_000), multi=st.booleans(), kk=st.integers(1, 6))
def test_ranking_metrics_match_reference(seed, multi, kk):
    q, g, rows, _, qm, gm, _ = setup(seed, multi)
    gain = M.gains(qm, gm, rows)
    ref = [[ref_gain(q[i], g, r) for r in rows[i]] for i in range(len(q))]
    assert gain.tolist() == ref
    assert M.avg_at_k(gain, kk) == pytest.approx(np.mean([np.mean(x[:kk]) for x in ref]))
    prec = np.mean([np.mean([v > 0 for v in x[:kk]]) for x in ref])
    assert M.precision_at_k(gain, kk) == pytest.approx(prec)
    assert M.map_at_k(gain, kk) == pytest.approx(
        np.mean([ref_ap(q[i], g, rows[i], kk) for i in range(len(q))])
    )
    n_rel = [sum(ref_gain(q[i], g, r) > 0 for r in range(len(g))) for i in range(len(q))]
    assert M.map_at_k(gain, kk, np.array(n_rel)) == pytest.approx(
        np.mean([ref_ap(q[i], g, rows[i], kk, n_rel[i]) for i in range(len(q))])
    )


@SETTINGS
@given(seed=st.integers(0, 10_000), multi=st.booleans(), kk=st.integers(1, 6))
def test_ndcg_and_ideal_gains_match_reference(seed, multi, kk):
    q, g, rows, _, qm, gm, _ = setup(seed, multi)
    exclude = np.array([i if i < len(g) else -1 for i in range(len(q))])
    ideal, n_rel = M.ideal_gains(qm, gm, kk, exclude=exclude)
    scores = []
    for i in range(len(q)):
        all_g = sorted(
            (ref_gain(q[i], g, r) for r in range(len(g)) if r != exclude[i]), reverse=True
        )
        assert ideal[i].tolist() == all_g[:kk]
        assert n_rel[i] == sum(v > 0 for v in all_g)
        dcg = sum(ref_gain(q[i], g, r) / math.log2(j + 2) for j, r in enumerate(rows[i][:kk]))
        idcg = sum(v / math.log2(j + 2) for j, v in enumerate(all_g[:kk]))
        scores.append(dcg / idcg if idcg else 0.0)
    assert M.ndcg_at_k(M.gains(qm, gm, rows), kk, ideal) == pytest.approx(np.mean(scores))


@SETTINGS
@given(seed=st.integers(0, 10_000), multi=st.booleans(), kk=st.integers(1, 6))
def test_mmv_matches_reference_vote(seed, multi, kk):
    q, g, rows, _, qm, gm, _ = setup(seed, multi)
    neigh = M.retrieved_labels(gm, rows)
    ok = []
    for i in range(len(q)):
        labs = [g[r] if r >= 0 else [] for r in rows[i]]
        vote = ref_vote(labs, kk)
        ok.append(vote in q[i] if vote is not None else not q[i])
    assert M.mmv_at_k(qm, neigh, kk) == pytest.approx(np.mean(ok))
    assert M.knn_accuracy(qm, neigh, kk) == M.mmv_at_k(qm, neigh, kk)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30))
def test_threshold_maximises_accuracy(seed, n):
    rng = np.random.default_rng(seed)
    sims = np.round(rng.uniform(-1, 1, n), 1)  # rounding makes ties
    same = rng.random(n) < 0.5
    t, acc = M.choose_pair_threshold(sims, same)
    assert M.pair_accuracy(sims, same, t) == pytest.approx(acc)
    brute = max(M.pair_accuracy(sims, same, c) for c in [*sims, sims.min() - 1, sims.max() + 1])
    assert acc == pytest.approx(brute)


def test_threshold_separable():
    t, acc = M.choose_pair_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    assert acc == 1.0 and 0.2 < t < 0.8


@SETTINGS
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5))
def test_loo_neighbours_match_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(int(rng.integers(2, 9)), 4)).astype(np.float32)
    scores, rows = M.loo_neighbours(x, k, chunk=3)
    for i in range(len(x)):
        others = sorted((j for j in range(len(x)) if j != i), key=lambda j: -float(x[i] @ x[j]))
        want = others[:k] + [-1] * (k - len(others[:k]))
        got = rows[i].tolist()
        assert [float(x[i] @ x[j]) for j in got if j >= 0] == pytest.approx(
            [float(x[i] @ x[j]) for j in want if j >= 0], abs=1e-5
        )
        assert got.count(-1) == want.count(-1) and i not in got


def test_loo_knn_accuracy_on_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    y = np.repeat(np.arange(3), 10)
    x = (centres[y] + rng.normal(size=(30, 8))).astype(np.float32)
    labels, _ = M.label_matrix([[str(v)] for v in y])
    assert M.loo_knn_accuracy(x, labels, 5) == 1.0
    shuffled = labels[rng.permutation(30)]
    assert M.loo_knn_accuracy(x, shuffled, 5) < 0.8


def test_sample_pairs_balanced_and_distinct():
    labels, _ = M.label_matrix([[str(v)] for v in np.repeat(np.arange(4), 50)])
    i, j, same = M.sample_pairs(labels, 400, np.random.default_rng(0))
    assert len(i) == 400 and (i != j).all()
    assert same.sum() == 200
    assert (same == (labels[i] & labels[j]).any(1)).all()
    i, j, same = M.sample_pairs(labels[:5], 100, np.random.default_rng(0))
    assert len(i) == 10  # all pairs of 5


def test_label_matrix_and_errors():
    m, names = M.label_matrix([["b"], ["a", "b"], []])
    assert names == ["a", "b"] and m.tolist() == [[False, True], [True, True], [False, False]]
    with pytest.raises(ValueError, match="not one of"):
        M.label_matrix([["c"]], ["a"])
    with pytest.raises(ValueError, match="k must be"):
        M.precision_at_k(np.zeros((2, 3)), 0)
    with pytest.raises(ValueError, match="need a"):
        M.precision_at_k(np.zeros((2, 3)), 4)
