"""Embeddings and targets for heads: what a task predicts and where its rows come from.

The training split is streamed to Ray Train as a Ray Dataset read straight from the
embedding shards (`embeddings/<backbone_id>/part-*.parquet`), so the driver never holds it;
the driver reads only label columns (class counts) and the held-out splits (thresholds,
metrics).

Unknown labels: a manifest imported with `--uncertain ignore` lists a row's uncertain
findings in `uncertain_labels`. For a task on the `labels` column those cells of the target
matrix are `UNKNOWN` (-1) instead of 0/1; the loss (`train.MaskedBCEWithLogitsLoss`), the
class weights, the thresholds and every metric skip them, so they count neither as positive
nor as negative. `zeros` / `ones` imports have no uncertain labels: targets are 0/1 as before.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from medray import storage
from medray import workdir as wd
from medray.config import Section

DEFAULT_TASK = "label"
"""The head's task name when neither the config nor dataset.json names one."""


class TaskConfig(Section):
    """One head: which labels it predicts and how."""

    name: str | None = None
    """Task name; the head is written to heads/<name>/. None: the dataset's own (`task` in
    dataset.json: `tissue` for synthetic tiles, `label` for imports)."""
    column: str = "labels"
    """Label column: `labels` of the embeddings, or another manifest column (str or list)."""
    labels: list[str] | None = None
    """Subset of label names to predict; None: every label in the column."""
    kind: Literal["auto", "multiclass", "multilabel"] = "auto"
    """auto: multilabel when dataset.json says multi_label (or a row has several labels)."""


UNKNOWN = -1.0
"""Target value of a label that is not known for a row (masked out of loss and metrics)."""


class TaskError(ValueError):
    """A task that cannot be trained on this data; the message names the task."""


def shard_paths(workdir: str, backbone_id: str) -> list[str]:
    """The embedding shards of one backbone (contract: part-NNNNN.parquet)."""
    base = wd.embeddings(workdir, backbone_id)
    paths = [p for p in storage.listdir(base) if p.rsplit("/", 1)[-1].endswith(".parquet")]
    if not paths:
        raise FileNotFoundError(f"{base}: no embedding shards; run `medray run embed` first")
    return paths


def _dataset(paths: list[str]) -> pads.Dataset:
    fs, _ = storage.arrow_fs(paths[0])
    return pads.dataset([storage.arrow_fs(p)[1] for p in paths], filesystem=fs, format="parquet")


def read_rows(paths: list[str], splits: list[str] | None, with_embedding: bool) -> pd.DataFrame:
    """id, labels, split (+ `embedding` as (N, D) float32 in `.attrs['x']`) for some splits."""
    cols = ["id", "labels", "split"] + (["embedding"] if with_embedding else [])
    flt = pc.field("split").isin(splits) if splits else None
    table = _dataset(paths).to_table(columns=cols, filter=flt)
    x = embedding_matrix(table.column("embedding")) if with_embedding else None
    frame = table.drop(["embedding"] if with_embedding else []).to_pandas()
    frame["labels"] = frame["labels"].map(lambda v: [] if v is None else list(v))
    frame.attrs["x"] = x
    return frame


def embedding_matrix(col: pa.ChunkedArray) -> np.ndarray:
    """A list<float> column -> (N, D) float32 without a Python loop."""
    arr = col.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, -1)


def attach_column(frame: pd.DataFrame, workdir: str, task: TaskConfig) -> pd.DataFrame:
    """Replace `labels` by the task's column (joined from the manifest by id when it is not
    `labels`); values become lists of str. A missing column fails naming task and column."""
    if task.column == "labels":
        return frame
    manifest = storage.read_table(wd.manifest(workdir)).to_pandas()
    if task.column not in manifest.columns:
        raise TaskError(
            f"task {task.name!r}: label column {task.column!r} does not exist; "
            f"the manifest has: {', '.join(manifest.columns)}"
        )
    values = manifest.set_index("id")[task.column].map(_as_list)
    out = frame.copy()
    out["labels"] = out["id"].map(values).map(lambda v: v if isinstance(v, list) else [])
    return out


def _as_list(value) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def unknown_labels(workdir: str, task: TaskConfig) -> dict[str, list[str]]:
    """{id: [label, ...]} of the rows whose labels are unknown for `task` (the manifest's
    `uncertain_labels`, written by `medray data import csv --uncertain ignore`); only rows
    that have some. Empty for a task on another column, or a manifest without uncertainty."""
    from medray.data.manifest import read_uncertain

    return read_uncertain(workdir) if task.column == "labels" else {}


def resolve_task(task: TaskConfig, frame: pd.DataFrame, info: dict) -> tuple[list[str], str]:
    """The task's label names and kind; a label that is not in the data fails by name."""
    if task.column == "labels" and info.get("label_names"):
        present = list(info["label_names"])
    else:
        present = sorted({lab for labs in frame["labels"] for lab in labs})
    names = list(task.labels) if task.labels is not None else present
    missing = [n for n in names if n not in present]
    if missing:
        raise TaskError(
            f"task {task.name!r}: label(s) {missing} do not exist in column {task.column!r}; "
            f"known labels: {', '.join(present) or '(none)'}"
        )
    if len(names) < 2 and (task.kind == "multiclass" or task.labels is None):
        raise TaskError(f"task {task.name!r}: needs at least 2 labels, got {names}")
    kind = task.kind
    if kind == "auto":
        several = bool(frame["labels"].map(len).gt(1).any())
        multi = info.get("multi_label", several) if task.column == "labels" else several
        kind = "multilabel" if multi or len(names) == 1 else "multiclass"
    return names, kind


def encode_targets(
    labels: pd.Series | list,
    label_names: list[str],
    kind: str,
    unknown: pd.Series | list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float targets (N, L) and a keep mask (N,). Multi-label: multi-hot, an image with no
    label is a valid all-zero row; a label listed in the row's `unknown` (and not among its
    labels) is `UNKNOWN` (-1); a row whose every label is unknown is dropped. Multi-class:
    one-hot; rows without exactly one of the task's labels, or with an unknown one, are
    dropped (keep=False)."""
    index = {name: j for j, name in enumerate(label_names)}
    y = np.zeros((len(labels), len(label_names)), dtype=np.float32)
    for i, labs in enumerate(unknown if unknown is not None else []):
        for lab in labs or []:
            j = index.get(lab)
            if j is not None:
                y[i, j] = UNKNOWN
    for i, labs in enumerate(labels):
        for lab in labs:
            j = index.get(lab)
            if j is not None:
                y[i, j] = 1.0
    known = y >= 0
    if kind == "multilabel":
        keep = known.any(1) if y.shape[1] else np.ones(len(y), dtype=bool)
    else:
        keep = ((y == 1).sum(1) == 1) & known.all(1)
    return y, keep


def class_weights(y: np.ndarray, kind: str, cap: float = 50.0) -> np.ndarray:
    """Multi-class: n / (L * count) per class (sklearn's `balanced`); multi-label: the
    BCE `pos_weight` negatives / positives per label, counted on the rows where the label is
    known. Capped so a rare label cannot explode."""
    n = max(len(y), 1)
    pos = (y == 1).sum(0).astype(np.float64)
    if kind == "multiclass":
        w = n / (y.shape[1] * np.maximum(pos, 1.0))
    else:
        w = (y == 0).sum(0) / np.maximum(pos, 1.0)
    return np.clip(w, 1.0 / cap, cap).astype(np.float32)


def split_dataset(
    paths: list[str],
    split: str,
    label_names: list[str],
    kind: str,
    column_values=None,
    unknown_values=None,
):
    """One split as a Ray Dataset of {"x": (B, D) float32, "y": (B, L) float32},
    read from the shards by Ray Data. `column_values` ({id: [labels]}) replaces `labels`
    for a task whose column comes from the manifest; `unknown_values` ({id: [labels]}, see
    `unknown_labels`) marks cells `UNKNOWN`."""
    import ray.data

    fs, _ = storage.arrow_fs(paths[0])
    ds = ray.data.read_parquet(
        [storage.arrow_fs(p)[1] for p in paths],
        filesystem=fs,
        columns=["id", "labels", "split", "embedding"],
    )
    ds = ds.filter(expr=f"split == '{split}'")
    return ds.map_batches(
        _encode_batch,
        batch_format="pyarrow",
        fn_kwargs={"label_names": label_names, "kind": kind, "column_values": column_values,
                   "unknown_values": unknown_values},
    )  # fmt: skip


def _encode_batch(batch: pa.Table, label_names, kind, column_values, unknown_values=None) -> dict:
    labels = batch.column("labels").to_pylist()
    ids = batch.column("id").to_pylist()
    if column_values is not None:
        labels = [column_values.get(i, []) for i in ids]
    labels = [labs or [] for labs in labels]
    unknown = [unknown_values.get(i, []) for i in ids] if unknown_values else None
    y, keep = encode_targets(labels, label_names, kind, unknown)
    x = embedding_matrix(batch.column("embedding"))
    if x.size == 0:
        x = np.zeros((len(y), 0), dtype=np.float32)
    return {"x": x[keep], "y": y[keep]}
