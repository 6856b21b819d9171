"""No choice is made on test rows: `medray run select` and `medray run heads` run twice on the
same workdir, the second time with the test rows poisoned (labels rotated to other classes;
for select the test images replaced by noise, for heads the test embeddings). Everything
they choose (select's proxy scores and winner; the heads' kept trial, early-stopping epoch,
thresholds and weights) must come out identical. Heads still *report* on test, so their
test metrics must change: that shows the poison reached the stage."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medray import storage
from medray import workdir as wd
from medray.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from heads_fixtures import LABELS, write_embeddings  # noqa: E402
from test_select import write_tiles  # noqa: E402


def rotate(labels: list[str], names: list[str]) -> list[str]:
    """Every label replaced by the next name: a wrong but valid label set."""
    return [names[(names.index(lab) + 1) % len(names)] for lab in labels]


def poison_manifest(workdir: Path, names: list[str]) -> pd.DataFrame:
    """Rotate the labels of the manifest's test rows; returns those rows."""
    path = wd.manifest(str(workdir))
    frame = pd.read_parquet(path)
    test = frame["split"] == "test"
    assert test.sum() > 0, "the fixture must have test rows to poison"
    frame.loc[test, "labels"] = frame.loc[test, "labels"].map(lambda v: rotate(list(v), names))
    frame.to_parquet(path)
    return frame[test]


# ---- select -------------------------------------------------------------------------


def select_choices(workdir: Path) -> dict:
    ranking = storage.read_json(str(workdir / "select" / "ranking.json"))
    scores = {
        r["candidate"]: (r.get("logreg_macro_f1"), r.get("knn_accuracy"), r.get("backbone_id"))
        for r in ranking["candidates"]
    }
    winner = {k: v for k, v in ranking["winner"].items() if k != "mlflow_run_id"}
    return {"scores": scores, "winner": winner, "proxy": ranking["proxy_splits"]}


@pytest.mark.integration
def test_select_ignores_test_rows(tmp_path):
    import torch

    from medray.select import Config, run

    write_tiles(tmp_path, n=48, splits=("train", "train", "val", "test"))
    overrides = [
        "candidates=[{name: efficientnet_lite0, weights: bundled, input_size: 32},"
        " {name: efficientnet_lite0, weights: random, input_size: 32}]",
        "random_can_win=true",  # the choice is the plain ranking: nothing hides a change
        "byol_exports=false",
        "proxy_size=1000",  # every train/val row: test rows would be drawn if allowed
    ]
    cfg = load_config(Config, None, overrides, workdir=str(tmp_path))
    torch.set_num_threads(2)
    run(cfg)
    before = select_choices(tmp_path)
    assert before["proxy"] == {"train": 24, "val": 12}
    test_rows = poison_manifest(tmp_path, ["blue", "green", "red"])
    rng = np.random.default_rng(1)
    for uri in test_rows["uri"]:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(uri)
    run(cfg)
    assert select_choices(tmp_path) == before


# ---- heads --------------------------------------------------------------------------


def poison_embeddings(workdir: Path, bid: str) -> None:
    """Rotate the labels of the test rows in the shard and replace their embeddings."""
    path = Path(wd.embeddings(str(workdir), bid)) / "part-00000.parquet"
    frame = pd.read_parquet(path)
    test = (frame["split"] == "test").to_numpy()
    frame.loc[test, "labels"] = frame.loc[test, "labels"].map(lambda v: rotate(list(v), LABELS))
    emb = np.stack(frame["embedding"].to_list())
    noise = np.random.default_rng(1).standard_normal((int(test.sum()), emb.shape[1]))
    emb[test] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    frame["embedding"] = list(emb.astype(np.float32))
    frame.to_parquet(path)


def heads_choices(workdir: Path) -> dict:
    head_dir = workdir / "heads" / "tissue"
    meta = storage.read_json(str(head_dir / "head.json"))
    return {
        "trials": storage.read_json(str(head_dir / "trials.json")),
        "thresholds": meta["thresholds"],
        "arch": meta["arch"],
        "training": meta["training"],
        "val_macro_f1": meta["metrics"]["val_macro_f1"],
        "weights": (head_dir / "head.safetensors").read_bytes(),
    }


@pytest.mark.integration
def test_heads_ignore_test_rows(tmp_path, ray_local):
    from medray.heads import Config, run

    bid = write_embeddings(tmp_path, n=150, multi_label=True)
    # One trial: what it learns, its thresholds and its reported val score must not move when
    # the test rows change (select's choice among candidates: test_select_ignores_test_rows).
    overrides = ["epochs=15", "search.arch=[linear]", "search.lr=[0.03]",
                 "search.weight_decay=[0.0]", "ray.num_cpus=2"]  # fmt: skip
    cfg = load_config(Config, None, overrides, workdir=str(tmp_path))
    first = run(cfg)
    before = heads_choices(tmp_path)
    poison_embeddings(tmp_path, bid)
    poison_manifest(tmp_path, LABELS)
    second = run(cfg)
    after = heads_choices(tmp_path)
    assert after == before
    reported = first.tasks["tissue"].metrics, second.tasks["tissue"].metrics
    assert reported[0]["n"] == reported[1]["n"] and reported[0] != reported[1]
    assert first.tasks["tissue"].best["split"] == "test"
