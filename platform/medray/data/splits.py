"""Train/val/test splits: grouped by patient (no patient in two splits), stratified by label.

One greedy algorithm serves single-label, multi-label and patient-grouped data. It follows
iterative stratification (Sechidis, Tsoumakas & Vlahavas, "On the stratification of
multi-label data", ECML PKDD 2011): per label, a target count for each split; groups
(patients, or single images when there are none) are placed rarest label first into the
split that still needs their labels most. Small classes get minimums so every split stays
usable: a class with 1 image goes to train, 2 to train + test, 3 or more to all three.

A source with its own splits keeps them (`manifest_splits`): `rename_splits` renames them
(a file's val reported as test) and `carve_split` moves a fraction of train into val with
the same algorithm, so model selection, thresholds and early stopping can all be done on
rows cut from train when the file's held-out rows are to be reported as test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from medray.data.manifest import SPLITS

if TYPE_CHECKING:
    from medray.data.config import DataConfig, SplitConfig

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


# ---------------------------------------------------------------- a source's own splits


def rename_splits(splits: Sequence[str], rename: Mapping[str, str]) -> np.ndarray:
    """`splits` with each source split renamed by `rename` ({source: manifest}), e.g.
    {"val": "test"}. Errors name the option (`splits.rename.<source>=<target>`): a source
    split that does not exist, a target the source already has and keeps, two sources onto
    one target."""
    out = np.asarray(splits, dtype=object)
    counts = Counter(out.tolist())
    moves = {s: t for s, t in rename.items() if s != t}
    targets = Counter(moves.values())
    for target, n in targets.items():
        if n > 1:
            sources = [s for s, t in moves.items() if t == target]
            raise ValueError(f"splits.rename: {' and '.join(sources)} would both become {target!r}")
    for source, target in rename.items():
        option = f"splits.rename.{source}={target}"
        if target not in SPLITS:
            raise ValueError(f"{option}: {target!r} is not one of {'/'.join(SPLITS)}")
        if source not in counts:
            raise ValueError(f"{option}: the source has no {source!r} split ({_describe(counts)})")
        if target in counts and target not in moves and source != target:
            raise ValueError(
                f"{option}: the source already has a {target!r} split ({counts[target]} "
                f"images); rename that one too (splits.rename.{target}=...) or drop this option"
            )
    renamed = out.copy()
    for source, target in moves.items():
        renamed[out == source] = target
    return renamed


def carve_split(
    splits: Sequence[str],
    labels: Sequence[Sequence[str]],
    patient_ids: Sequence[str | None] | None,
    fraction: float,
    seed: int = 0,
) -> np.ndarray:
    """`splits` with `fraction` of the train rows moved to val: stratified by label and whole
    patients at a time (`assign_splits` on the train rows with fractions (1 - f, f, 0)).
    Refused (naming `splits.carve_val`) when val already exists or train cannot spare one."""
    out = np.asarray(splits, dtype=object).copy()
    option = f"splits.carve_val={fraction:g}"
    counts = Counter(out.tolist())
    if not 0 < fraction < 1:
        raise ValueError(f"{option}: must be > 0 and < 1")
    if counts.get("val"):
        raise ValueError(
            f"{option}: there is already a val split ({counts['val']} images); rename it first "
            "(e.g. splits.rename.val=test) or set splits.carve_val=0"
        )
    rows = np.flatnonzero(out == "train")
    if len(rows) == 0:
        raise ValueError(
            f"{option}: there is no train split to carve val from ({_describe(counts)})"
        )
    pids = None if patient_ids is None else [patient_ids[i] for i in rows]
    part = assign_splits([labels[i] for i in rows], pids, (1 - fraction, fraction, 0.0), seed)
    if not (part == "val").any() or not (part == "train").any():
        raise ValueError(
            f"{option}: {len(rows)} train images (in {len(_group_rows(pids, len(rows)))} "
            "groups) are too few to keep some in train and move some to val"
        )
    out[rows] = part
    return out


def manifest_splits(
    splits: Sequence[str | None],
    labels: Sequence[Sequence[str]],
    patient_ids: Sequence[str | None] | None,
    options: SplitConfig,
    seed: int = 0,
) -> np.ndarray:
    """The manifest split of every row. When every row has a split from the source, those
    are kept, renamed by `options.rename`, then val is carved from train by
    `options.carve_val`; otherwise rows are divided by the fractions (`assign_splits`), and
    `rename`/`carve_val` are refused since there is nothing of the source's to adjust."""
    own = len(splits) > 0 and all(s is not None for s in splits)
    if not own:
        if options.adjusts_source():
            raise ValueError(
                f"{_options_set(options)}: only for a source with its own splits "
                "(an npz with train_/val_/test_ arrays, a CSV with --split-column); this one "
                "has none, so splits.train/val/test divide it"
            )
        return assign_splits(labels, patient_ids, options.fractions(), seed)
    out = rename_splits(splits, options.rename)
    if options.carve_val > 0:
        out = carve_split(out, labels, patient_ids, options.carve_val, seed)
    return out


def with_split_note(source: str, cfg: DataConfig) -> str:
    """`source` plus how its own splits were adjusted, for dataset.json, e.g.
    "npz:/d/x.npz (test = source val; val = 0.15 of train, stratified, seed 0)"."""
    options = cfg.splits
    parts = [f"{t} = source {s}" for s, t in options.rename.items() if s != t]
    if options.carve_val > 0:
        parts.append(f"val = {options.carve_val:g} of train, stratified, seed {cfg.seed}")
    return f"{source} ({'; '.join(parts)})" if parts else source


def _describe(counts: Counter) -> str:
    present = [f"{s} {counts[s]}" for s in SPLITS if counts.get(s)]
    return "it has " + (", ".join(present) if present else "no rows")


def _options_set(options: SplitConfig) -> str:
    given = [f"splits.rename.{s}={t}" for s, t in options.rename.items()]
    if options.carve_val > 0:
        given.append(f"splits.carve_val={options.carve_val:g}")
    return ", ".join(given)
