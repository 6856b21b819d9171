"""Classification metrics for a head (sklearn) and its confusion-matrix plot."""

from __future__ import annotations

import io
import math

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)


def _auroc(scores: np.ndarray, target: np.ndarray) -> float | None:
    """AUROC, or None where the label has only one class in `target` (undefined)."""
    if len(target) == 0 or target.min() == target.max():
        return None
    return float(roc_auc_score(target, scores))


def classification_metrics(
    probs: np.ndarray, pred: np.ndarray, targets: np.ndarray, label_names: list[str], kind: str
) -> dict:
    """accuracy (multi-label: exact match), macro/micro F1, per-label F1 and AUROC, support.

    `probs` (N, L) float, `pred` (N, L) bool, `targets` (N, L) 0/1, or -1 where a label is
    unknown for a row (multi-label only: `heads.data.UNKNOWN`). Every number is computed on
    the known cells only: a label's F1, AUROC and support on the rows where it is known,
    micro F1 over all known cells, exact-match accuracy over each row's known labels (rows
    with none left out). `unknown` counts the masked rows per label.
    """
    t = np.asarray(targets)
    y = (t > 0.5).astype(int)
    p = np.asarray(pred).astype(int)
    known = t >= 0
    if kind == "multiclass":
        yt, yp = y.argmax(1), p.argmax(1)
        labels = list(range(len(label_names)))
        acc = accuracy_score(yt, yp)
        macro = f1_score(yt, yp, labels=labels, average="macro", zero_division=0)
        micro = f1_score(yt, yp, labels=labels, average="micro", zero_division=0)
        per = f1_score(yt, yp, labels=labels, average=None, zero_division=0)
    else:
        tp = ((y == 1) & (p == 1) & known).sum(0)
        fp = ((y == 0) & (p == 1) & known).sum(0)
        fn = ((y == 1) & (p == 0) & known).sum(0)
        per = _f1(tp, fp, fn)
        macro = float(np.mean(per)) if len(per) else 0.0
        micro = float(_f1(tp.sum(), fp.sum(), fn.sum()))
        rows = known.any(1)
        match = ((y == p) | ~known).all(1)
        acc = float(match[rows].mean()) if rows.any() else float("nan")
    auroc = {
        name: _auroc(probs[known[:, j], j], y[known[:, j], j]) for j, name in enumerate(label_names)
    }
    defined = [v for v in auroc.values() if v is not None]
    return {
        "n": int(len(y)),
        "accuracy": float(acc),
        "macro_f1": float(macro),
        "micro_f1": float(micro),
        "macro_auroc": float(np.mean(defined)) if defined else None,
        "f1": {name: float(v) for name, v in zip(label_names, per, strict=True)},
        "auroc": auroc,
        "support": {name: int(v) for name, v in zip(label_names, (y * known).sum(0), strict=True)},
        "unknown": {name: int(v) for name, v in zip(label_names, (~known).sum(0), strict=True)},
    }


def _f1(tp, fp, fn):
    """2 TP / (2 TP + FP + FN), 0 where the denominator is 0 (sklearn's zero_division=0)."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den), where=den > 0)


def confusion_png(
    pred: np.ndarray, targets: np.ndarray, label_names: list[str], kind: str
) -> bytes:
    """PNG bytes: an L x L matrix (multi-class) or one 2 x 2 matrix per label (multi-label,
    each on the rows where that label is known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(targets)
    y = (t > 0.5).astype(int)
    p = np.asarray(pred).astype(int)
    if kind == "multiclass":
        cm = confusion_matrix(y.argmax(1), p.argmax(1), labels=range(len(label_names)))
        side = max(4.0, 0.6 * len(label_names) + 2)
        fig, ax = plt.subplots(figsize=(side, side))
        _draw(ax, cm, label_names, label_names, "confusion matrix (rows: true)")
    else:
        # per label, on the rows where it is known (targets -1 left out)
        cms = [
            confusion_matrix(y[t[:, j] >= 0, j], p[t[:, j] >= 0, j], labels=[0, 1])
            for j in range(len(label_names))
        ]
        cols = min(4, len(label_names))
        rows = math.ceil(len(label_names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for ax, name, cm in zip(axes.flat, label_names, cms, strict=False):
            _draw(ax, cm, ["no", "yes"], ["no", "yes"], name)
        for ax in list(axes.flat)[len(label_names) :]:
            ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _draw(ax, cm: np.ndarray, rows: list[str], cols: list[str], title: str) -> None:
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    ax.set_xlabel("predicted")
    top = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
