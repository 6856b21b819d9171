"""The per-epoch kNN monitor as plain functions: which encoder to export, and the console line.

The curve is one row per epoch: epoch 0 is the starting encoder, scored before any training
step; epoch i >= 1 is the state after the i-th pass, with the kNN accuracy of the online
encoder and, when measured, of the EMA target encoder ("the target network [...] is often
the better encoder": BYOL's target is a temporal ensemble of the online one). The export is
the best row by that score, never something worse than the start: an epoch must beat the
start strictly to replace it, so when training only hurts the export is the start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Network = Literal["start", "online", "target"]


@dataclass(frozen=True)
class Best:
    """The encoder the monitor picked: the epoch, which network, and its kNN accuracy."""

    epoch: int
    network: Network
    knn: float


def candidates(row: dict[str, Any]) -> list[tuple[Network, float]]:
    """The scored encoders of one curve row, online first (it wins a tie with the target)."""
    if row["epoch"] == 0:  # online and target are the same weights before any step
        return [("start", row["knn_online"])] if row.get("knn_online") is not None else []
    scored: list[tuple[Network, float]] = []
    for network in ("online", "target"):
        value = row.get(f"knn_{network}")
        if value is not None:
            scored.append((network, float(value)))
    return scored


def best_epoch(curve: Sequence[dict[str, Any]]) -> Best | None:
    """The highest kNN accuracy over the curve (rows in epoch order, epoch 0 = the start);
    a later encoder must beat the best so far strictly, so ties keep the earlier one and
    the start stays unless an epoch beats it. None when no row has a score (no monitor)."""
    best: Best | None = None
    for row in curve:
        for network, knn in candidates(row):
            if best is None or knn > best.knn:
                best = Best(int(row["epoch"]), network, knn)
    return best


def start_knn(curve: Sequence[dict[str, Any]]) -> float | None:
    """The starting encoder's kNN accuracy (epoch 0), if it was measured."""
    return next((r.get("knn_online") for r in curve if r["epoch"] == 0), None)


def export_note(best: Best | None, start: float | None) -> str:
    """One plain sentence on what was exported and why."""
    if best is None:
        return (
            "no kNN monitor (no labelled val images, or knn_max_images=0): "
            "exported the last epoch's online encoder"
        )
    if best.epoch == 0:
        return f"no epoch beat the starting encoder (kNN {best.knn:.3f}): exported the start"
    versus = f" vs {start:.3f} at the start" if start is not None else ""
    return f"exported epoch {best.epoch}, {best.network} encoder (kNN {best.knn:.3f}{versus})"


def eta_seconds(seconds_per_epoch: Sequence[float], epochs_left: int) -> float:
    """Time left: the mean wall time of the epochs run so far times the epochs left."""
    if not seconds_per_epoch or epochs_left <= 0:
        return 0.0
    return sum(seconds_per_epoch) / len(seconds_per_epoch) * epochs_left


def duration(seconds: float) -> str:
    """Seconds as `42s`, `3m05s` or `1h02m`."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def progress_line(row: dict[str, Any], epochs: int, best: Best | None, eta_s: float) -> str:
    """The console line of one curve row, e.g.
    `pretrain epoch 3/30  loss 1.234  kNN 0.897 (target 0.903)  best 0.903 @ 3 target
    41.2 images/s  ETA 12m30s`; epoch 0 is the start, scored before training."""
    epoch = int(row["epoch"])
    if epoch == 0:
        return f"pretrain epoch 0/{epochs}  start  kNN {_score(row.get('knn_online'))}"
    parts = [f"pretrain epoch {epoch}/{epochs}", f"loss {row['loss']:.3f}"]
    knn = f"kNN {_score(row.get('knn_online'))}"
    if row.get("knn_target") is not None:
        knn += f" (target {row['knn_target']:.3f})"
    parts.append(knn)
    if best is not None:
        parts.append(f"best {best.knn:.3f} @ {best.epoch} {best.network}")
    parts += [f"{row['images_per_s']:.1f} images/s", f"ETA {duration(eta_s)}"]
    return "  ".join(parts)
