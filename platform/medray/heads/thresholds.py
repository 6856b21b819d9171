"""Per-label decision thresholds tuned on validation data for F1."""

from __future__ import annotations

import numpy as np


def best_f1_threshold(scores: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """The threshold on `scores` that maximises F1 for binary `target`, and that F1.

    Every cut between consecutive distinct scores is tried (exact, O(N log N)); the
    threshold is the midpoint of the cut. With no positives F1 is undefined: (0.5, nan).
    """
    scores = np.asarray(scores, dtype=np.float64)
    target = np.asarray(target).astype(bool)
    n_pos = int(target.sum())
    if n_pos == 0 or len(scores) == 0:
        return 0.5, float("nan")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], target[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # Only cut where the next score differs: ties go to the same side.
    last = np.r_[s[1:] != s[:-1], True]
    f1 = np.where(last, 2 * tp / (tp + fp + n_pos), -1.0)
    i = int(np.argmax(f1))
    below = s[i + 1] if i + 1 < len(s) else s[i] - 1e-3
    return float((s[i] + below) / 2), float(f1[i])


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, label_names: list[str]) -> dict:
    """{label: threshold} maximising each label's F1 on (probs, targets), both (N, L), each
    label on the rows where it is known (target >= 0; -1 marks an unknown label)."""
    probs, targets = np.asarray(probs), np.asarray(targets)
    out = {}
    for j, name in enumerate(label_names):
        known = targets[:, j] >= 0
        out[name] = round(best_f1_threshold(probs[known, j], targets[known, j] > 0.5)[0], 6)
    return out
