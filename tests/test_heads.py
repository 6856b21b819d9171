"""Heads: thresholds, metrics, saved-head round trip, targets, the training loop in-process,
and `medray run heads` on fabricated embeddings (integration, Ray Train)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medray import storage
from medray.config import load_config
from medray.heads import data as hd
from medray.heads.metrics import classification_metrics, confusion_png
from medray.heads.model import build_head, load_head, save_head
from medray.heads.thresholds import best_f1_threshold, tune_thresholds
from medray.heads.train import array_batches, train_head

sys.path.insert(0, str(Path(__file__).parent))
from heads_fixtures import LABELS, write_embeddings  # noqa: E402


def test_best_f1_threshold_separable():
    t, f1 = best_f1_threshold(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 0, 1, 1]))
    assert 0.2 < t < 0.7 and f1 == 1.0


def test_best_f1_threshold_ties_and_no_positives():
    t, f1 = best_f1_threshold(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 1]))
    assert t < 0.5 and f1 == pytest.approx(0.8)
    t, f1 = best_f1_threshold(np.array([0.3, 0.4]), np.array([0, 0]))
    assert t == 0.5 and np.isnan(f1)


def test_best_f1_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    s, y = rng.random(200), rng.random(200) < 0.3
    t, f1 = best_f1_threshold(s, y)
    from sklearn.metrics import f1_score

    brute = max(f1_score(y, s >= c) for c in np.unique(s))
    assert f1 == pytest.approx(brute) and f1_score(y, s >= t) == pytest.approx(brute)


def test_tune_thresholds_per_label():
    probs = np.array([[0.9, 0.2], [0.8, 0.3], [0.1, 0.35], [0.2, 0.1]])
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    thr = tune_thresholds(probs, y, ["a", "b"])
    assert set(thr) == {"a", "b"} and 0.2 < thr["a"] < 0.8 and 0.2 < thr["b"] <= 0.3


def test_metrics_multiclass_and_multilabel_with_empty_rows():
    y = np.eye(3)[[0, 1, 2, 0]]
    m = classification_metrics(y * 0.9 + 0.03, y.astype(bool), y, LABELS, "multiclass")
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["auroc"]["tumor"] == 1.0
    yl = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]])  # "normal" rows, tumor absent
    ml = classification_metrics(yl * 0.8 + 0.1, yl.astype(bool), yl, LABELS, "multilabel")
    assert ml["accuracy"] == 1.0 and ml["auroc"]["tumor"] is None
    assert confusion_png(yl.astype(bool), yl, LABELS, "multilabel")[:4] == b"\x89PNG"
    assert confusion_png(y.astype(bool), y, LABELS, "multiclass")[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_head_round_trip(tmp_path, kind, arch):
    module = build_head(arch, 8, 3, hidden=4, dropout=0.0)
    arch_d = {"type": arch, "in_dim": 8, "out_dim": 3, "hidden": 4, "dropout": 0.0}
    meta = {"task": "t", "kind": kind, "label_names": LABELS, "arch": arch_d,
            "thresholds": {"adipose": 0.2, "stroma": 0.5, "tumor": 0.9}}  # fmt: skip
    save_head(str(tmp_path), module, meta)
    head = load_head(str(tmp_path))
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    probs = head.predict_proba(x)
    assert probs.shape == (5, 3)
    with torch.no_grad():
        assert np.allclose(probs.sum(1), 1, atol=1e-5) == (kind == "multiclass")
    dec = head.decide(probs)
    assert dec.dtype == bool and dec.shape == (5, 3)
    if kind == "multiclass":
        assert (dec.sum(1) == 1).all()
    else:
        assert (dec == (probs >= np.array([0.2, 0.5, 0.9]))).all()
    with pytest.raises(ValueError, match="expects"):
        head.predict_proba(x[:, :4])
    x.setflags(write=False)  # as an embedding arrives from Ray's object store in serving
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "array is not writable" warning
        assert np.array_equal(head.predict_proba(x), probs)


def test_load_head_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="head.json"):
        load_head(str(tmp_path))


def test_encode_targets_and_weights():
    labels = [["a"], ["b"], [], ["a", "b"], ["c"]]
    y, keep = hd.encode_targets(labels, ["a", "b"], "multilabel")
    assert keep.all() and y.tolist()[2] == [0, 0] and y.tolist()[3] == [1, 1]
    y, keep = hd.encode_targets(labels, ["a", "b"], "multiclass")
    assert keep.tolist() == [True, True, False, False, False]
    w = hd.class_weights(np.eye(2)[[0, 0, 0, 1]].astype(np.float32), "multiclass")
    assert w[1] > w[0]
    pw = hd.class_weights(np.array([[1, 0], [0, 0], [0, 0], [0, 1]], np.float32), "multilabel")
    assert pw.tolist() == [3.0, 3.0]


def test_resolve_task_errors_and_kinds():
    frame = pd.DataFrame({"labels": [["a"], ["b"], []]})
    info = {"label_names": ["a", "b"], "multi_label": True}
    assert hd.resolve_task(hd.TaskConfig(), frame, info) == (["a", "b"], "multilabel")
    info_mc = {"label_names": ["a", "b"], "multi_label": False}
    assert hd.resolve_task(hd.TaskConfig(), frame, info_mc)[1] == "multiclass"
    with pytest.raises(hd.TaskError, match="task 'x'.*'nope'"):
        hd.resolve_task(hd.TaskConfig(name="x", labels=["a", "nope"]), frame, info)


def test_missing_label_column(tmp_path):
    write_embeddings(tmp_path, n=20)
    frame = pd.DataFrame({"id": ["img0000"], "labels": [["adipose"]]})
    with pytest.raises(hd.TaskError, match="task 'g'.*column 'nope' does not exist"):
        hd.attach_column(frame, str(tmp_path), hd.TaskConfig(name="g", column="nope"))
    out = hd.attach_column(frame, str(tmp_path), hd.TaskConfig(name="g", column="grade"))
    assert out["labels"].tolist() == [["low"]]


@pytest.fixture
def one_thread():
    """A head is tiny: extra torch threads only contend on a loaded machine (20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_train_head_in_process_learns(kind, one_thread):
    rng = np.random.default_rng(0)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 150)]
    x = (y @ rng.standard_normal((3, 8)) * 2 + rng.standard_normal((150, 8)) * 0.3).astype(
        np.float32
    )
    params = {"kind": kind, "lr": 0.05, "weight_decay": 0.0, "epochs": 40, "patience": 5,
              "seed": 0, "feataug": {"interpolate": True, "noise": True}, "class_weights": None}  # fmt: skip
    module, hist = train_head(
        build_head("linear", 8, 3), array_batches(x[:100], y[:100], 32, 0), (x[100:], y[100:]),
        params,
    )  # fmt: skip
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    with torch.no_grad():
        pred = module(torch.as_tensor(x[100:])).argmax(1).numpy()
    assert (pred == y[100:].argmax(1)).mean() > 0.9


def test_new_module_init_follows_the_seed_not_the_rng_state():
    from medray.heads.train import new_module

    params = {"arch": "mlp", "in_dim": 8, "out_dim": 3, "hidden": 4, "dropout": 0.0}
    a = new_module({**params, "seed": 1}).state_dict()
    torch.rand(100)  # advance the process RNG: the init must not depend on it
    b = new_module({**params, "seed": 1}).state_dict()
    c = new_module({**params, "seed": 2}).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    state = torch.random.get_rng_state()
    new_module({**params, "seed": 3})
    assert torch.equal(state, torch.random.get_rng_state())  # no side effect on the caller


def test_rank_trials_finished_best_first_then_the_rest_in_order():
    from medray.heads.task import rank_trials

    def t(name, status, f1=None, loss=None):
        return {"name": name, "status": status, "val_macro_f1": f1, "best_val_loss": loss}

    outs = [t("stopped", "stopped early"), t("low", "finished", 0.8, 0.1),
            t("tie-worse-loss", "finished", 0.9, 0.5), t("failed", "failed"),
            t("best", "finished", 0.9, 0.4)]  # fmt: skip
    order = [x["name"] for x in rank_trials(outs)]
    assert order == ["best", "tie-worse-loss", "low", "stopped", "failed"]


def test_asha_leaves_room_for_the_final_scored_report():
    from medray.heads import Config
    from medray.heads.sweep import asha_scheduler

    assert asha_scheduler(Config(asha={"enabled": False})) is None
    asha = asha_scheduler(Config(epochs=5, asha={"grace_period": 10}))
    assert asha._max_t == 6  # the epochs, then the trial's scored report
    assert min(milestone for milestone, _ in asha._brackets[0]._rungs) == 5  # grace <= epochs


# ---- integration: the stage on Ray Train ----------------------------------------------


def heads_config(workdir, *extra):
    from medray.heads import Config

    small = ["epochs=15", "search.arch=[linear]", "search.lr=[0.03]",
             "search.weight_decay=[0.0, 0.001]", "ray.num_cpus=2"]  # fmt: skip
    return load_config(Config, None, [*small, *extra], workdir=str(workdir))


@pytest.mark.integration
def test_run_heads_multilabel(tmp_path, ray_local):
    from medray.heads import run

    write_embeddings(tmp_path, n=150, multi_label=True)
    result = run(heads_config(tmp_path, "feataug.interpolate=true", "search.weight_decay=[0.0]"))
    task = result.tasks["tissue"]
    assert task.kind == "multilabel" and task.trials == 1
    assert set(task.thresholds) == set(LABELS)
    head = load_head(str(tmp_path / "heads" / "tissue"))
    assert head.meta["backbone_id"] == "fake-0123456789"
    assert head.meta["metrics"]["test"]["macro_f1"] > 0.5
    assert (tmp_path / "heads" / "tissue" / "confusion.png").stat().st_size > 1000
    rows = pd.read_parquet(tmp_path / "embeddings" / "fake-0123456789" / "part-00000.parquet")
    normal = np.stack(rows[rows["labels"].map(len) == 0]["embedding"].to_list())
    assert head.decide(head.predict_proba(normal)).shape == (len(normal), 3)
    import mlflow

    run_data = mlflow.get_run(result.mlflow_run_id).data
    assert "tissue.threshold.tumor" in run_data.metrics
    assert "tissue.test.macro_f1" in run_data.metrics


@pytest.mark.integration
def test_run_heads_multiclass_and_bad_label(tmp_path, ray_local):
    from medray.heads import run

    write_embeddings(tmp_path, n=120)
    # One at a time, so ASHA has the good setting's rung to compare the hopeless one with
    sweep = ["search.weight_decay=[0.0]", "search.lr=[0.03, 0.000001]", "max_concurrent=1",
             "asha.grace_period=3", "asha.reduction_factor=2"]  # fmt: skip
    result = run(heads_config(tmp_path, *sweep))
    task = result.tasks["tissue"]
    assert task.kind == "multiclass" and task.trials == 2 and task.metrics["accuracy"] > 0.6
    trials = storage.read_json(str(tmp_path / "heads" / "tissue" / "trials.json"))
    assert [(t["lr"], t["status"]) for t in trials] == [(0.03, "finished"),
                                                        (1e-6, "stopped early")]  # fmt: skip
    assert trials[0]["epochs_run"] == 15 and trials[1]["epochs_run"] < 15
    import mlflow

    children = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'", output_format="list"
    )
    status = sorted(
        (float(c.data.params["lr"]), c.data.tags["medray.trial_status"]) for c in children
    )
    assert status == [(1e-6, "stopped early"), (0.03, "finished")]
    assert mlflow.get_run(result.mlflow_run_id).data.params["tissue.best.lr"] == "0.03"
    import ray  # the stopped trial's Train workers hold no CPU afterwards

    groups = ray.util.placement_group_table().values()
    assert not [g for g in groups if g["state"] != "REMOVED" and g["bundles"] == {0: {"CPU": 0.25}}]
    assert storage.read_json(str(tmp_path / "heads" / "tissue" / "head.json"))["kind"] == (
        "multiclass"
    )
    bad = heads_config(tmp_path, "tasks=[{name: t2, labels: [tumor, necrosis]}]")
    with pytest.raises(hd.TaskError, match="task 't2'.*necrosis"):
        run(bad)


def test_cli_bad_label_column_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from medray.cli import app

    write_embeddings(tmp_path, n=20)
    args = ["run", "heads", "--workdir", str(tmp_path), "tasks=[{name: grade, column: grde}]"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert "task 'grade': label column 'grde' does not exist" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["run", "heads", "--workdir", str(tmp_path),
                                   "tasks=[{name: t, labels: [tumour]}]"])  # fmt: skip
    assert res.exit_code == 2 and "'tumour'" in res.output


def test_run_storage_follows_s3_workdir():
    from medray.heads.train import run_storage

    assert run_storage("s3://b/w/") == "s3://b/w/heads/_ray_train"
    assert Path(run_storage("/local/w")).is_dir()
