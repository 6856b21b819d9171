"""Splits: patients never straddle splits, labels are stratified, the seed fixes the result."""

from __future__ import annotations

from collections import Counter

import numpy as np

from medray.data import assign_splits
from medray.data.splits import split_targets


def test_split_targets_round_and_keep_minimums():
    assert split_targets(100, (0.7, 0.15, 0.15)).tolist() == [70, 15, 15]
    assert split_targets(3, (0.7, 0.15, 0.15)).tolist() == [1, 1, 1]
    assert split_targets(1, (0.7, 0.15, 0.15)).tolist() == [1, 0, 0]


def test_no_patient_in_two_splits_and_deterministic():
    rng = np.random.default_rng(0)
    patients = [f"p{rng.integers(0, 40)}" for _ in range(400)]
    labels = [[f"c{rng.integers(0, 4)}"] for _ in range(400)]
    splits = assign_splits(labels, patients, seed=3)
    by_patient: dict[str, set] = {}
    for p, s in zip(patients, splits):
        by_patient.setdefault(p, set()).add(s)
    assert all(len(s) == 1 for s in by_patient.values())
    assert np.array_equal(splits, assign_splits(labels, patients, seed=3))
    counts = Counter(splits)
    assert 0.55 < counts["train"] / 400 < 0.85 and counts["val"] and counts["test"]


def test_stratified_without_patients():
    labels = [["a"]] * 80 + [["b"]] * 20
    splits = assign_splits(labels, None, (0.6, 0.2, 0.2), seed=0)
    for name, total in (("a", 80), ("b", 20)):
        rows = [s for s, lab in zip(splits, labels) if lab == [name]]
        got = Counter(rows)
        assert got["train"] == 0.6 * total and got["val"] == got["test"] == 0.2 * total


def test_multi_label_and_empty_label_lists():
    labels = [[], ["x"], ["x", "y"], ["y"]] * 25
    splits = assign_splits(labels, None, seed=1)
    empty = Counter(s for s, lab in zip(splits, labels) if not lab)
    assert set(empty) == {"train", "val", "test"}
