"""CheXpert-style uncertain labels (`medray data import csv --uncertain ignore`): the math that
masks them (targets -1, masked BCE, class weights, thresholds, classification and retrieval
metrics) against computations by hand, and one import -> heads -> evaluate run where every
number is recomputed here on the known rows only; `zeros` / `ones` keep 0/1 targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from medray import metrics as M
from medray import storage
from medray import workdir as wd
from medray.feataug import mixup
from medray.heads import data as hd
from medray.heads.metrics import classification_metrics, confusion_png
from medray.heads.model import build_head
from medray.heads.thresholds import best_f1_threshold, tune_thresholds
from medray.heads.train import MaskedBCEWithLogitsLoss, array_batches, make_loss, train_head

U = hd.UNKNOWN


# ---- targets and weights ----------------------------------------------------------------


def test_encode_targets_marks_unknown_cells():
    labels = [["a"], [], ["a", "b"], [], ["b"]]
    unknown = [["b"], ["a"], ["b"], ["a", "b"], []]  # row 2: known positive wins
    y, keep = hd.encode_targets(labels, ["a", "b"], "multilabel", unknown)
    assert y.tolist() == [[1, U], [U, 0], [1, 1], [U, U], [0, 1]]
    assert keep.tolist() == [True, True, True, False, True]  # nothing known in row 3
    _, keep = hd.encode_targets(labels, ["a", "b"], "multiclass", unknown)
    assert keep.tolist() == [False, False, False, False, True]  # one-hot rows with no unknown
    y0, keep0 = hd.encode_targets(labels, ["a", "b"], "multilabel")  # no unknown: as before
    assert y0.tolist() == [[1, 0], [0, 0], [1, 1], [0, 0], [0, 1]] and keep0.all()


def test_class_weights_count_known_cells_only():
    y = np.array([[1, U], [0, 0], [U, 1], [0, 1], [0, U]], np.float32)
    # a: 1 positive, 3 known negatives; b: 2 positives, 1 known negative
    assert hd.class_weights(y, "multilabel").tolist() == [3.0, 0.5]


# ---- the loss and a fit -----------------------------------------------------------------


def test_masked_bce_is_the_mean_over_known_cells():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    y = torch.tensor([[1, 0, U], [0, U, U], [1, 1, 0], [U, 0, 1], [0, 0, 0], [1, U, 1]])
    pw = torch.tensor([2.0, 0.5, 3.0])
    got = MaskedBCEWithLogitsLoss(pw)(logits, y)
    terms = []
    for i in range(6):
        for j in range(3):
            if y[i, j] >= 0:
                p = torch.sigmoid(logits[i, j])
                t = float(y[i, j])
                terms.append(-(pw[j] * t * torch.log(p) + (1 - t) * torch.log(1 - p)))
    assert float(got) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    # every cell known: exactly torch's BCEWithLogitsLoss (today's loss)
    full = (y > 0.5).float()
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=pw)(logits, full)
    assert float(MaskedBCEWithLogitsLoss(pw)(logits, full)) == pytest.approx(float(ref), rel=1e-6)
    # an unknown cell gets no gradient
    lg = logits.clone().requires_grad_(True)
    MaskedBCEWithLogitsLoss(pw)(lg, y).backward()
    assert (lg.grad[y < 0] == 0).all() and (lg.grad[y >= 0] != 0).all()
    assert isinstance(make_loss("multilabel", [1.0, 1.0, 1.0]), MaskedBCEWithLogitsLoss)


@pytest.fixture
def one_thread():
    """A head is tiny: extra torch threads only contend on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_masked_fit_equals_a_fit_on_the_known_rows(one_thread):
    """One label, full batches: masking a row's label is dropping the row, so the trained
    logistic head is the one trained without those rows, and the unknown rows (here labelled
    the opposite way) change nothing."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 5)).astype(np.float32)
    truth = (x[:, 0] > 0).astype(np.float32)[:, None]
    unknown = rng.random(80) < 0.3
    y_masked = np.where(unknown[:, None], U, truth).astype(np.float32)
    params = {"kind": "multilabel", "lr": 0.05, "weight_decay": 0.0, "epochs": 25,
              "patience": 100, "class_weights": [1.5], "seed": 0}  # fmt: skip

    def fit(xt, yt, xv, yv):
        torch.manual_seed(0)
        model = build_head("linear", 5, 1)
        out, hist = train_head(model, array_batches(xt, yt, 1000, 0), (xv, yv), params)
        return out[0].weight.detach().numpy().copy(), hist

    tr, va = np.arange(60), np.arange(60, 80)
    w_mask, h_mask = fit(x[tr], y_masked[tr], x[va], y_masked[va])
    kt, kv = tr[~unknown[tr]], va[~unknown[va]]
    w_known, h_known = fit(x[kt], truth[kt], x[kv], truth[kv])
    np.testing.assert_allclose(w_mask, w_known, rtol=1e-4, atol=1e-6)
    assert [h["val_loss"] for h in h_mask] == pytest.approx([h["val_loss"] for h in h_known])
    w_zeros, _ = fit(x[tr], np.where(unknown[:, None], 0, truth)[tr], x[va], truth[va])
    assert not np.allclose(w_zeros, w_known, atol=1e-3)  # zeros would train differently


def test_mixup_keeps_unknown_cells_unknown():
    y = np.array([[1, U], [0, 1], [1, 0], [U, 0]], np.float32)
    x = np.eye(4, dtype=np.float32)
    _, ym = mixup(x, y, 0.4, np.random.default_rng(1))
    assert ((ym == U) | ((ym >= 0) & (ym <= 1))).all()
    assert (ym[y == U] == U).all()


# ---- thresholds and classification metrics -----------------------------------------------


def random_case(seed=0, n=60, unknown_share=0.25):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < 0.4).astype(np.float32)
    probs = np.clip(y * 0.5 + rng.random((n, 3)) * 0.6, 0, 1)
    masked = np.where(rng.random((n, 3)) < unknown_share, U, y).astype(np.float32)
    return probs, y, masked


def test_thresholds_are_tuned_on_known_rows():
    probs, _, t = random_case()
    got = tune_thresholds(probs, t, ["a", "b", "c"])
    for j, name in enumerate("abc"):
        k = t[:, j] >= 0
        assert got[name] == round(best_f1_threshold(probs[k, j], t[k, j])[0], 6)


def test_multilabel_metrics_on_known_rows_by_hand():
    probs, _, t = random_case(1)
    pred = probs >= 0.5
    names = ["a", "b", "c"]
    m = classification_metrics(probs, pred, t, names, "multilabel")
    per, tp_all, fp_all, fn_all = [], 0, 0, 0
    for j, name in enumerate(names):
        k = t[:, j] >= 0
        yt, yp = t[k, j].astype(int), pred[k, j].astype(int)
        per.append(f1_score(yt, yp, zero_division=0))
        assert m["f1"][name] == pytest.approx(per[-1])
        assert m["auroc"][name] == pytest.approx(roc_auc_score(yt, probs[k, j]))
        assert m["support"][name] == yt.sum() and m["unknown"][name] == (~k).sum()
        tp_all += ((yt == 1) & (yp == 1)).sum()
        fp_all += ((yt == 0) & (yp == 1)).sum()
        fn_all += ((yt == 1) & (yp == 0)).sum()
    assert m["macro_f1"] == pytest.approx(np.mean(per))
    assert m["micro_f1"] == pytest.approx(2 * tp_all / (2 * tp_all + fp_all + fn_all))
    rows = [i for i in range(len(t)) if (t[i] >= 0).any()]
    exact = [all(pred[i, j] == t[i, j] for j in range(3) if t[i, j] >= 0) for i in rows]
    assert m["accuracy"] == pytest.approx(np.mean(exact))
    assert confusion_png(pred, t, names, "multilabel")[:4] == b"\x89PNG"


def test_multilabel_metrics_without_unknowns_match_sklearn():
    """The `zeros` / `ones` path: the same numbers sklearn gave before masking existed."""
    probs, y, _ = random_case(2)
    pred = probs >= 0.45
    m = classification_metrics(probs, pred, y, ["a", "b", "c"], "multilabel")
    yi, pi = y.astype(int), pred.astype(int)
    assert m["accuracy"] == accuracy_score(yi, pi)
    assert m["macro_f1"] == pytest.approx(f1_score(yi, pi, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(yi, pi, average="micro", zero_division=0))
    per = f1_score(yi, pi, average=None, zero_division=0)
    assert list(m["f1"].values()) == pytest.approx(list(per))
    assert m["unknown"] == {"a": 0, "b": 0, "c": 0}


# ---- retrieval metrics --------------------------------------------------------------------


def test_unknown_matrix():
    labels, names = M.label_matrix([["a"], ["b"], []])
    u = M.unknown_matrix([["a", "zz"], ["a"], ["b"]], names, labels)
    assert u.tolist() == [[False, False], [True, False], [False, True]]


def test_sample_pairs_leave_out_pairs_decided_by_an_unknown_label():
    labels, _ = M.label_matrix([["a"], ["a"], ["b"], [], ["b"]], ["a", "b"])
    unknown = np.zeros_like(labels)
    unknown[3, 0] = True  # row 3: "a" unknown -> (0, 3) and (1, 3) are undecided
    i, j, same = M.sample_pairs(labels, 100, np.random.default_rng(0), unknown)
    pairs = set(zip(i.tolist(), j.tolist(), strict=True))
    assert pairs == {p for p in zip(*np.triu_indices(5, 1), strict=True)} - {(0, 3), (1, 3)}
    assert same.tolist() == [(labels[a] & labels[b]).any() for a, b in zip(i, j, strict=True)]
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    big, _ = M.label_matrix([[["a", "b", "c"][k % 3]] for k in range(200)])
    ref = M.sample_pairs(big, 50, rng_a)
    none = M.sample_pairs(big, 50, rng_b, np.zeros_like(big))  # nothing unknown: unchanged
    assert all((r == s).all() for r, s in zip(ref, none, strict=True))


def test_mmv_leaves_out_queries_decided_by_an_unknown_label():
    q, _ = M.label_matrix([["a"], [], [], ["b"]], ["a", "b"])
    qu = np.zeros_like(q)
    qu[1, 0] = True  # query 1: no known label, "a" unknown -> "no finding" undecided
    qu[3, 0] = True  # query 3: "a" unknown; a vote for "a" is undecided
    a, b, none = [True, False], [False, True], [False, False]
    neigh = np.array([[a, a, b], [none, none, a], [none, none, b], [a, a, none]])
    # votes: a (right), none (undecided), none (right), a (undecided)
    assert M.mmv_at_k(q, neigh, 3) == 0.75  # unmasked: query 1 counts as right, 3 as wrong
    assert M.mmv_at_k(q, neigh, 3, qu) == 1.0
    assert M.mmv_balanced_at_k(q, neigh, 3, qu) == 1.0
    assert np.isnan(M.mmv_at_k(q[[1]], neigh[[1]], 3, qu[[1]]))


# ---- import -> heads -> evaluate ----------------------------------------------------------

CODES = {"1": 1.0, "0": 0.0, "": 0.0, "-1": U}
FINDINGS = ["Edema", "Effusion"]


def write_table(root, n=90):
    """A CheXpert-like table: two findings, -1 on about a fifth of the cells, a split column."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n):
        path = root / "img" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
        codes = [str(rng.choice(["1", "0", "", "-1"], p=[0.35, 0.3, 0.15, 0.2])) for _ in FINDINGS]
        split = ["train", "train", "train", "val", "test"][i % 5]
        rows.append({"path": f"img/{i}.png", "split": split, **dict(zip(FINDINGS, codes))})
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "table.csv", index=False)
    return frame


def fake_embeddings(workdir, table, seed=0):
    """Embeddings that follow each image's true findings (an uncertain cell is positive half
    of the time), written for the manifest's rows in the embed stage's layout."""
    from medray.data import read_manifest

    rng = np.random.default_rng(seed)
    manifest = read_manifest(workdir)
    by_path = table.set_index("path")
    centres = rng.normal(size=(len(FINDINGS), 8)) * 2.0
    xs = []
    for uri in manifest["uri"]:
        row = by_path.loc["img/" + uri.rsplit("/", 1)[1]]
        x = rng.normal(size=8) * 0.8
        for j, f in enumerate(FINDINGS):
            if row[f] == "1" or (row[f] == "-1" and rng.random() < 0.5):
                x += centres[j]
        xs.append(x / np.linalg.norm(x))
    bid = "fake-0123456789"
    out = wd.embeddings(workdir, bid)
    frame = manifest[["id", "uri", "labels", "split"]].assign(embedding=list(np.float32(xs)))
    storage.write_table(pa.Table.from_pandas(frame, preserve_index=False),
                        storage.join(out, "part-00000.parquet"))  # fmt: skip
    summary = {"dim": 8, "count": len(frame), "quarantined": 0, "shards": ["part-00000.parquet"]}
    storage.write_json(storage.join(out, "embed.json"), summary)
    storage.write_text(wd.latest_embeddings(workdir), bid + "\n")
    return manifest, np.stack(xs).astype(np.float32)


def hand_targets(table, manifest, policy):
    """(N, 2) targets from the CSV codes themselves, in manifest order: -1 kept for
    `ignore`, 1 for `ones`, 0 for `zeros`."""
    by_path = table.set_index("path")
    codes = {"ignore": U, "ones": 1.0, "zeros": 0.0}
    out = []
    for uri in manifest["uri"]:
        row = by_path.loc["img/" + uri.rsplit("/", 1)[1]]
        out.append([CODES[row[f]] if row[f] != "-1" else codes[policy] for f in FINDINGS])
    return np.array(out, np.float32)


def import_with(tmp_path, policy):
    from medray.data import DataConfig, import_csv

    cfg = DataConfig(workdir=str(tmp_path / policy))
    import_csv(str(tmp_path / "table.csv"), cfg, "path", FINDINGS, uncertain=policy,
               split_column="split")  # fmt: skip
    return cfg.workdir


def test_zeros_and_ones_keep_today_targets(tmp_path):
    table = write_table(tmp_path, n=30)
    for policy in ("zeros", "ones"):
        workdir = import_with(tmp_path, policy)
        manifest, _ = fake_embeddings(workdir, table)
        assert hd.unknown_labels(workdir, hd.TaskConfig()) == {}
        y, keep = hd.encode_targets(manifest["labels"].tolist(), FINDINGS, "multilabel", None)
        assert keep.all() and (y == hand_targets(table, manifest, policy)).all()


@pytest.mark.integration
def test_ignore_masks_uncertain_labels_in_heads_and_evaluate(tmp_path, ray_local):
    """`--uncertain ignore` end to end: the head's class weights, validation loss,
    thresholds and test metrics, and evaluate's kNN accuracy, all equal a computation here on
    the known cells only (and differ from what `zeros` would give)."""
    from medray import evaluate as E
    from medray import index as I
    from medray.config import MlflowConfig, RayConfig, load_config
    from medray.heads import Config, load_head, run

    table = write_table(tmp_path)
    workdir = import_with(tmp_path, "ignore")
    manifest, x = fake_embeddings(workdir, table)
    t = hand_targets(table, manifest, "ignore")
    split = manifest["split"].to_numpy()
    assert (t == U).sum() > 10

    cfg = load_config(Config, None, ["epochs=15", "search.arch=[linear]", "search.lr=[0.05]",
                                     "search.weight_decay=[0.0]", "ray.num_cpus=2",
                                     "ray.num_workers=0",  # the Train loop in this process
                                     "tasks=[{name: findings}]"], workdir=workdir)  # fmt: skip
    run(cfg)
    head = load_head(storage.join(workdir, "heads", "findings"))
    meta = head.meta
    assert meta["kind"] == "multilabel" and meta["label_names"] == FINDINGS

    tr, va, te = (t[split == s] for s in ("train", "val", "test"))
    tr = tr[(tr >= 0).any(1)]
    va_x = x[split == "val"][(va >= 0).any(1)]
    va = va[(va >= 0).any(1)]
    te_x, te = x[split == "test"][(te >= 0).any(1)], te[(te >= 0).any(1)]
    # training: pos_weight = known negatives / positives; the unknown train cells counted
    weights = [(tr[:, j] == 0).sum() / (tr[:, j] == 1).sum() for j in range(2)]
    assert meta["training"]["class_weights"] == pytest.approx(weights)
    assert meta["training"]["n_unknown_train"] == (tr == U).sum() > 0
    zeros_w = [(tr[:, j] != 1).sum() / (tr[:, j] == 1).sum() for j in range(2)]
    assert not np.allclose(weights, zeros_w)
    # the validation loss the trial kept: masked BCE over the known val cells
    probs_va = head.predict_proba(va_x)
    with torch.no_grad():
        logits = head.module(torch.as_tensor(va_x)).double()
    per = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.as_tensor(va.clip(0), dtype=torch.float64),
        pos_weight=torch.as_tensor(weights, dtype=torch.float64), reduction="none",
    )  # fmt: skip
    hand_loss = float(per[torch.as_tensor(va >= 0)].mean())
    trials = storage.read_json(storage.join(workdir, "heads", "findings", "trials.json"))
    assert trials[0]["best_val_loss"] == pytest.approx(hand_loss, rel=1e-4)
    # thresholds tuned on the known val rows of each label
    for j, name in enumerate(FINDINGS):
        k = va[:, j] >= 0
        assert meta["thresholds"][name] == round(best_f1_threshold(probs_va[k, j], va[k, j])[0], 6)
    # test metrics on the known test rows of each label
    probs_te = head.predict_proba(te_x)
    pred = head.decide(probs_te)
    m = meta["metrics"]["test"]
    for j, name in enumerate(FINDINGS):
        k = te[:, j] >= 0
        assert m["support"][name] == te[k, j].sum() and m["unknown"][name] == (~k).sum()
        assert m["f1"][name] == pytest.approx(f1_score(te[k, j], pred[k, j], zero_division=0))
        assert m["auroc"][name] == pytest.approx(roc_auc_score(te[k, j], probs_te[k, j]))
    assert m["unknown"] != {"Edema": 0, "Effusion": 0}

    # evaluate: kNN accuracy left out of the queries decided by an unknown label
    I.build(I.Config(workdir=workdir))
    ecfg = E.Config(workdir=workdir, ray=RayConfig(num_cpus=2), mlflow=MlflowConfig())
    metrics, _, _ = E.evaluate(ecfg, with_plots=False)
    labels, names = M.label_matrix(manifest["labels"].tolist())
    unknown = (t == U)[:, [FINDINGS.index(n) for n in names]]
    assert metrics["unknown_labels"] == {"rows": int(unknown.any(1).sum()),
                                         "cells": int(unknown.sum())}  # fmt: skip
    assert metrics["heads"]["findings"]["test"] == m
    _, rows = M.loo_neighbours(x, 5)
    vote = M.knn_vote(M.retrieved_labels(labels, rows), 5)
    ok, decided = [], []
    for i, v in enumerate(vote):
        if v < len(names):
            ok.append(labels[i, v])
            decided.append(not unknown[i, v])
        else:  # "no finding"
            ok.append(not labels[i].any())
            decided.append(labels[i].any() or not unknown[i].any())
    ok, decided = np.array(ok), np.array(decided)
    assert not decided.all()
    assert metrics["knn"]["loo_accuracy@5"] == pytest.approx(ok[decided].mean())
