"""Splits: patients never straddle splits, labels are stratified, the seed fixes the result;
a source's own splits are renamed and val is carved from train, errors naming the option."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from medray.data import DataConfig, SplitConfig, assign_splits
from medray.data.splits import (
    carve_split,
    manifest_splits,
    rename_splits,
    split_targets,
    with_split_note,
)


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


# ---- a source's own splits: rename, carve val out of train --------------------------


def test_rename_splits_moves_val_to_test_and_swaps():
    splits = ["train"] * 4 + ["val"] * 2
    assert rename_splits(splits, {"val": "test"}).tolist() == ["train"] * 4 + ["test"] * 2
    swapped = rename_splits(["val", "test"], {"val": "test", "test": "val"})
    assert swapped.tolist() == ["test", "val"]
    assert rename_splits(splits, {}).tolist() == splits


@pytest.mark.parametrize(
    ("splits", "rename", "message"),
    [
        (["train", "val", "test"], {"val": "test"},
         "splits.rename.val=test: the source already has a 'test' split (1 images)"),
        (["train", "val"], {"test": "val"},
         "splits.rename.test=val: the source has no 'test' split (it has train 1, val 1)"),
        (["train", "val", "test"], {"val": "train", "test": "train"},
         "splits.rename: val and test would both become 'train'"),
        (["train", "val"], {"val": "holdout"}, "splits.rename.val=holdout: 'holdout' is not"),
    ],
)  # fmt: skip
def test_rename_splits_errors_name_option_and_value(splits, rename, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        rename_splits(splits, rename)


def test_carve_split_is_stratified_seeded_and_leaves_other_splits():
    labels = [["a"]] * 400 + [["b"]] * 100 + [["a"]] * 50
    splits = ["train"] * 500 + ["test"] * 50
    out = carve_split(splits, labels, None, 0.2, seed=0)
    assert out[500:].tolist() == ["test"] * 50
    got = Counter((s, lab[0]) for s, lab in zip(out[:500], labels[:500]))
    assert got == {("train", "a"): 320, ("val", "a"): 80, ("train", "b"): 80, ("val", "b"): 20}
    assert np.array_equal(out, carve_split(splits, labels, None, 0.2, seed=0))
    assert not np.array_equal(out, carve_split(splits, labels, None, 0.2, seed=1))


def test_carve_split_keeps_patients_whole():
    rng = np.random.default_rng(0)
    patients = [f"p{rng.integers(0, 30)}" for _ in range(300)]
    labels = [[f"c{rng.integers(0, 3)}"] for _ in range(300)]
    out = carve_split(["train"] * 300, labels, patients, 0.15, seed=2)
    assert (pd.Series(out).groupby(patients).nunique() == 1).all()
    assert 0.05 < (out == "val").mean() < 0.3


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        (["train"] * 5 + ["val"], "splits.carve_val=0.2: there is already a val split (1 images)"),
        (["test"] * 6, "splits.carve_val=0.2: there is no train split to carve val from"),
        (["train"] + ["test"] * 5, "splits.carve_val=0.2: 1 train images (in 1 groups) are too few"),
    ],
)  # fmt: skip
def test_carve_split_errors_name_option_and_value(splits, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        carve_split(splits, [["a"]] * len(splits), None, 0.2)


def test_manifest_splits_renames_then_carves_and_refuses_on_unsplit_sources():
    labels = [["a"], ["b"]] * 60
    source = ["train"] * 100 + ["val"] * 20
    options = SplitConfig(rename={"val": "test"}, carve_val=0.2)
    out = manifest_splits(source, labels, None, options, seed=0)
    assert Counter(out) == {"train": 80, "val": 20, "test": 20}
    assert (out[100:] == "test").all()
    assert manifest_splits(source, labels, None, SplitConfig()).tolist() == source
    unsplit = [None] * 120
    plain = manifest_splits(unsplit, labels, None, SplitConfig(), seed=0)
    assert np.array_equal(plain, assign_splits(labels, None, (0.7, 0.15, 0.15), 0))
    with pytest.raises(ValueError, match=r"splits.rename.val=test, splits.carve_val=0.2: only"):
        manifest_splits(unsplit, labels, None, options)


def test_split_config_options_validate():
    from medray.config import ConfigError, load_config
    from medray.data import DataConfig

    cfg = load_config(DataConfig, None, ["splits.rename.val=test", "splits.carve_val=0.15"])
    assert cfg.splits.rename == {"val": "test"} and cfg.splits.carve_val == 0.15
    assert cfg.splits.adjusts_source() and not SplitConfig().adjusts_source()
    for bad, key in (("splits.carve_val=1", "splits.carve_val"),
                     ("splits.rename.val=holdout", "splits.rename.val"),
                     ("splits.rename.vall=test", "splits.rename.vall")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(DataConfig, None, [bad])
    with pytest.raises(ConfigError, match="two source splits become the same split"):
        load_config(DataConfig, None, ["splits.rename.val=test", "splits.rename.train=test"])


def test_with_split_note():
    cfg = DataConfig(seed=3, splits=SplitConfig(rename={"val": "test"}, carve_val=0.15))
    note = with_split_note("npz:/d/x.npz", cfg)
    assert note == "npz:/d/x.npz (test = source val; val = 0.15 of train, stratified, seed 3)"
    assert with_split_note("npz:/d/x.npz", DataConfig()) == "npz:/d/x.npz"
