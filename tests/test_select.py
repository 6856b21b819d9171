"""Backbone selection: the probes, the proxy subset, and `medray run select` on tiny images
with the bundled, random-init and a BYOL-export candidate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medray import storage
from medray import workdir as wd
from medray.config import load_config
from medray.select import Config, candidate_label, probe_scores, proxy_subset, rank


def clustered(n=60, dim=8, classes=3, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.standard_normal((classes, dim))[y] + rng.standard_normal((n, dim)) * noise
    return x.astype(np.float32), y


def test_probe_scores_separable_vs_random():
    x, y = clustered()
    good = probe_scores(x, y, False, k=3, folds=3, seed=0)
    bad = probe_scores(np.random.default_rng(1).standard_normal(x.shape), y, False, 3, 3, 0)
    assert good["knn_accuracy"] > 0.95 and good["logreg_macro_f1"] > 0.95
    assert bad["logreg_macro_f1"] < 0.7


def test_probe_scores_multilabel_with_empty_rows():
    x, y = clustered(n=60)
    ym = np.eye(3, dtype=int)[y]
    ym[::6] = 0  # "normal" images
    scores = probe_scores(x, ym, True, k=3, folds=3, seed=0)
    assert 0 <= scores["knn_accuracy"] <= 1 and 0 <= scores["logreg_macro_f1"] <= 1


def test_proxy_subset_is_stratified_and_sized():
    labels = [["a"]] * 80 + [["b"]] * 20 + [[]] * 10 + [["a", "b"]] * 5
    manifest = pd.DataFrame({"labels": labels, "uri": [f"u{i}" for i in range(len(labels))],
                             "split": ["train", "val"] * 57 + ["train"]})  # fmt: skip
    sample, y, names = proxy_subset(manifest, 50, False, 0)
    assert names == ["a", "b"] and len(sample) == 50 and (y == 1).sum() == 10
    sample, y, names = proxy_subset(manifest, 1000, True, 0)
    assert len(sample) == len(manifest) and y.shape == (len(manifest), 2)
    with pytest.raises(ValueError, match="proxy task"):
        proxy_subset(manifest.head(5), 50, False, 0)


def test_proxy_subset_never_draws_test_rows():
    labels = [["a"]] * 60 + [["b"]] * 60
    split = ["train", "val", "test"] * 40
    manifest = pd.DataFrame({"labels": labels, "uri": [f"u{i}" for i in range(120)],
                             "split": split})  # fmt: skip
    for multi in (False, True):
        sample, _, _ = proxy_subset(manifest, 1000, multi, 0)
        assert len(sample) == 80 and set(sample["split"]) == {"train", "val"}
    only_test = manifest.assign(split="test")
    with pytest.raises(ValueError, match="train and val splits need >= 10"):
        proxy_subset(only_test, 50, False, 0)


def test_rank_puts_failures_last():
    rows = [{"candidate": "x", "f": None, "error": "boom"}, {"candidate": "y", "f": 0.2},
            {"candidate": "z", "f": 0.9}]  # fmt: skip
    assert [r["candidate"] for r in rank(rows, "f")] == ["z", "y", "x"]
    assert [r["rank"] for r in rank(rows, "f")] == [1, 2, 3]


def test_pick_winner_skips_random_floors():
    from medray.select import pick_winner

    rows = rank([{"candidate": "r", "f": 0.9, "backbone": {"weights": "random"}},
                 {"candidate": "b", "f": 0.5, "backbone": {"weights": "bundled"}},
                 {"candidate": "x", "f": None, "backbone": {"weights": "pretrained"}}], "f")  # fmt: skip
    assert pick_winner(rows, "f", False)["candidate"] == "b"
    assert pick_winner(rows, "f", True)["candidate"] == "r"
    with pytest.raises(RuntimeError, match="no candidate can win"):
        pick_winner(rows[:1], "f", False)


def test_candidate_label():
    from medray.config import BackboneConfig

    assert candidate_label(BackboneConfig()) == "efficientnet_lite0 (bundled)"
    assert candidate_label(BackboneConfig(weights="random")) == "efficientnet_lite0 (random, floor)"
    cfg = BackboneConfig(weights="/w/pretrain/run1/export")
    assert candidate_label(cfg) == "efficientnet_lite0 (pretrain/run1/export)"


def write_tiles(workdir: Path, n: int = 36, splits: tuple[str, ...] = ("train",)) -> None:
    """Tiny class-coloured noise tiles and a manifest, without the data module; row i goes
    to splits[i % len(splits)]."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    rows = []
    (workdir / "data" / "images").mkdir(parents=True)
    for i in range(n):
        name = list(colours)[i % 3]
        pix = np.clip(np.array(colours[name]) + rng.normal(0, 40, (32, 32, 3)), 0, 255)
        uri = str(workdir / "data" / "images" / f"{i}.png")
        Image.fromarray(pix.astype(np.uint8)).save(uri)
        rows.append({"id": str(i), "uri": uri, "labels": [name], "split": splits[i % len(splits)]})
    pd.DataFrame(rows).to_parquet(wd.manifest(str(workdir)))
    storage.write_json(wd.dataset_info(str(workdir)),
                       {"label_names": sorted(colours), "multi_label": False})  # fmt: skip


@pytest.mark.integration
def test_run_select_ranks_three_candidates(tmp_path):
    import torch

    from medray.models import export_backbone, load_backbone
    from medray.select import run

    write_tiles(tmp_path)
    byol = load_backbone(load_config(Config).candidates[1], seed=3)  # stands in for BYOL
    export_backbone(byol.model, byol.spec, str(tmp_path / "pretrain" / "byol" / "export"))
    small = ["candidates=[{name: efficientnet_lite0, weights: bundled, input_size: 64},"
             " {name: efficientnet_lite0, weights: random, input_size: 64}]", "proxy_size=30"]  # fmt: skip
    torch.set_num_threads(2)
    result = run(load_config(Config, None, small, workdir=str(tmp_path)))
    assert len(result.ranking) == 3 and [r["rank"] for r in result.ranking] == [1, 2, 3]
    assert all(r.get("logreg_macro_f1") is not None for r in result.ranking)
    assert any("pretrain/byol/export" in r["candidate"] for r in result.ranking)
    chosen = storage.read_json(str(tmp_path / "select" / "chosen.json"))
    assert set(chosen) == {"backbone", "backbone_id", "score", "metric", "mlflow_run_id"}
    assert chosen["mlflow_run_id"] == result.mlflow_run_id
    assert chosen["backbone"]["weights"] != "random"  # floors are never chosen by default
    ranking = pd.read_csv(tmp_path / "select" / "ranking.csv")
    assert {"candidate", "logreg_macro_f1", "knn_accuracy"} <= set(ranking.columns)
    ranking_json = storage.read_json(str(tmp_path / "select" / "ranking.json"))
    assert ranking_json["winner"]["backbone"]["name"] == "efficientnet_lite0"
    assert ranking_json["mlflow_run_id"] == result.mlflow_run_id
    assert ranking_json["proxy_splits"] == {"train": 30, "val": 0}
