"""Train/val/test splits: grouped by patient (no patient in two splits), stratified by label.

One greedy algorithm serves single-label, multi-label and patient-grouped data. It follows
iterative stratification (Sechidis, Tsoumakas & Vlahavas, "On the stratification of
multi-label data", ECML PKDD 2011): per label, a target count for each split; groups
(patients, or single images when there are none) are placed rarest label first into the
split that still needs their labels most. Small classes get minimums so every split stays
usable: a class with 1 image goes to train, 2 to train + test, 3 or more to all three.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medray.data.manifest import SPLITS

NO_LABEL = "\x00(none)"
"""Stratification key for images with an empty label list ("no finding")."""


def split_targets(n: int, fractions: Sequence[float]) -> np.ndarray:
    """How many of `n` items each split should get: largest-remainder rounding of
    n * fractions, then the minimums train >= 1 (n >= 1), test >= 1 (n >= 2), val >= 1
    (n >= 3), each only for splits with a non-zero fraction."""
    frac = np.asarray(fractions, dtype=float)
    raw = frac * n
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    minimum = np.zeros(3, int)
    for split, needs in ((0, 1), (2, 2), (1, 3)):
        if n >= needs and frac[split] > 0:
            minimum[split] = 1
    for split in (0, 2, 1):
        if counts[split] < minimum[split]:
            donor = int(np.argmax(counts - minimum))
            counts[donor] -= 1
            counts[split] += 1
    return counts


def assign_splits(
    labels: Sequence[Sequence[str]],
    patient_ids: Sequence[str | None] | None = None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> np.ndarray:
    """A split name (train/val/test) per row; deterministic for a given seed.

    Rows sharing a non-null patient id always land in the same split. Rows without a
    patient id are placed one by one.
    """
    n = len(labels)
    if n == 0:
        return np.array([], dtype=object)
    frac = _check_fractions(fractions)
    keys = [list(row) if len(row) else [NO_LABEL] for row in labels]
    names = sorted({k for row in keys for k in row})
    index = {name: i for i, name in enumerate(names)}
    groups = _group_rows(patient_ids, n)
    label_totals = np.zeros(len(names), int)
    for row in keys:
        label_totals[[index[k] for k in row]] += 1
    targets = np.stack([split_targets(int(t), frac) for t in label_totals])  # (L, 3)
    overall = frac * n
    group_labels = [_label_counts(members, keys, index) for members in groups]
    order = _placement_order(groups, group_labels, label_totals, seed)
    rng = np.random.default_rng(seed)
    placed = np.zeros((len(names), 3))
    placed_rows = np.zeros(3)
    out = np.empty(n, dtype=object)
    open_splits = frac > 0
    for g in order:
        label_ids, counts = group_labels[g]
        need = (targets[label_ids] - placed[label_ids]) / label_totals[label_ids, None]
        score = (counts[:, None] * need).sum(axis=0)
        size_need = (overall - placed_rows) / n
        key = np.lexsort((rng.random(3), size_need, score))  # last key sorts first
        best = next(s for s in key[::-1] if open_splits[s])
        placed[label_ids, best] += counts
        placed_rows[best] += len(groups[g])
        out[groups[g]] = SPLITS[best]
    return out


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    frac = np.asarray(fractions, dtype=float)
    if frac.shape != (3,) or (frac < 0).any() or frac[0] <= 0 or abs(frac.sum() - 1) > 1e-6:
        raise ValueError(
            f"split fractions (train, val, test) must be >= 0, train > 0, and sum to 1; "
            f"got {tuple(fractions)}"
        )
    return frac


def _group_rows(patient_ids: Sequence[str | None] | None, n: int) -> list[np.ndarray]:
    if patient_ids is None:
        return [np.array([i]) for i in range(n)]
    by_patient: dict[str, list[int]] = {}
    singles: list[np.ndarray] = []
    for i, pid in enumerate(patient_ids):
        if pid is None or (isinstance(pid, float) and np.isnan(pid)) or pid == "":
            singles.append(np.array([i]))
        else:
            by_patient.setdefault(str(pid), []).append(i)
    return [np.array(rows) for rows in by_patient.values()] + singles


def _label_counts(
    members: np.ndarray, keys: list[list[str]], index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    counts: dict[int, int] = {}
    for row in members:
        for k in keys[row]:
            counts[index[k]] = counts.get(index[k], 0) + 1
    ids = np.array(sorted(counts), dtype=int)
    return ids, np.array([counts[i] for i in ids], dtype=float)


def _placement_order(
    groups: list[np.ndarray],
    group_labels: list[tuple[np.ndarray, np.ndarray]],
    label_totals: np.ndarray,
    seed: int,
) -> np.ndarray:
    """Rarest label first, then larger groups first, ties in seeded random order."""
    shuffled = np.random.default_rng(seed).permutation(len(groups))
    rarity = np.array([label_totals[ids].min() for ids, _ in group_labels])
    sizes = np.array([len(g) for g in groups])
    return shuffled[np.lexsort((-sizes[shuffled], rarity[shuffled]))]
