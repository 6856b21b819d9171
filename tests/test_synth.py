"""Synthetic tiles: deterministic, balanced, patient-grouped, and classes that differ in texture."""

from __future__ import annotations

import numpy as np

from medray.data import read_dataset_info, read_manifest, synth
from medray.data.synth import CLASSES, MULTI_LABELS, patient_stains, render_tiles


def test_single_label_set(tmp_path):
    result = synth(str(tmp_path), n=60, size=48, seed=0)
    frame = read_manifest(str(tmp_path))
    assert result.kept == 60 and result.quarantined == 0 and len(frame) == 60
    assert set(result.label_counts) == set(CLASSES)
    assert max(result.label_counts.values()) - min(result.label_counts.values()) <= 1
    by_patient = frame.groupby("patient_id")["split"].nunique()
    assert (by_patient == 1).all() and result.patients == 6
    info = read_dataset_info(str(tmp_path))
    assert info["multi_label"] is False and info["counts"]["images"] == 60
    first = (tmp_path / "data/images/synth/synth-00000.png").read_bytes()
    synth(str(tmp_path), n=60, size=48, seed=0)
    assert (tmp_path / "data/images/synth/synth-00000.png").read_bytes() == first
    assert read_dataset_info(str(tmp_path))["manifest_sha256"] == info["manifest_sha256"]


def test_multi_label_set_has_normal_tiles(tmp_path):
    result = synth(str(tmp_path), n=80, size=48, multi_label=True, seed=1)
    frame = read_manifest(str(tmp_path))
    assert result.multi_label and result.label_counts.get("(none)", 0) > 5
    assert set(read_dataset_info(str(tmp_path))["label_names"]) == set(MULTI_LABELS)
    assert frame["labels"].map(len).max() >= 2


def test_classes_differ_more_between_than_within():
    """Mean colour + a texture statistic separate classes better than chance."""
    rng = np.random.default_rng(0)
    names = list(CLASSES)
    labels = [[names[i % len(names)]] for i in range(120)]
    stains = patient_stains(12, 0)[np.arange(120) % 12]
    tiles = render_tiles(rng, labels, stains, 64).astype(float) / 255
    gray = tiles.mean(axis=3)
    feats = np.stack(
        [tiles.mean(axis=(1, 2))[:, 0], gray.std(axis=(1, 2)), (gray < 0.45).mean(axis=(1, 2)),
         (gray > 0.85).mean(axis=(1, 2))], axis=1)  # fmt: skip
    feats = (feats - feats.mean(0)) / feats.std(0)
    dist = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argmin(1)
    y = np.arange(120) % len(names)
    accuracy = (y[nearest] == y).mean()
    assert accuracy > 2 / len(names), accuracy  # chance is 1/6


def test_relative_workdir_gives_absolute_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synth("rel", n=6, size=32)
    uris = read_manifest(str(tmp_path / "rel"))["uri"]
    assert all(u.startswith(str(tmp_path)) for u in uris), uris[:2]
