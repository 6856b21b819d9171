"""The data manifest every stage reads: `data/manifest.parquet`, `data/quarantine.parquet` and
`data/dataset.json` under the workdir (local path or s3://), as docs/contracts.md defines them.

An importer builds one DataFrame (id, uri, labels, patient_id, split, uncertain_labels, plus
any importer-specific columns such as DICOM header fields or slide tile coordinates) and one
of quarantined files (uri, reason, stage), then calls `write_manifest`, which checks the
contract, writes both tables and finally dataset.json (so dataset.json marks a finished import).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel

from medray import storage, workdir

SPLITS = ("train", "val", "test")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.string()), nullable=False),
        pa.field("patient_id", pa.string(), nullable=True),
        pa.field("split", pa.string(), nullable=False),
        pa.field("uncertain_labels", pa.list_(pa.string()), nullable=False),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
    ]
)


class ManifestError(ValueError):
    """A manifest that breaks the contract in docs/contracts.md; the message names the rows."""


class ImportResult(BaseModel):
    """What an import (or synth) did; the CLI prints it."""

    source: str
    read: int
    """Files (or array entries) looked at."""
    kept: int
    """Rows in the manifest."""
    quarantined: int
    """Rows in quarantine.parquet: unreadable or invalid inputs, each with a reason."""
    multi_label: bool
    label_counts: dict[str, int]
    """Images per label (multi-label: per present label); `(none)` counts empty label lists."""
    split_counts: dict[str, int]
    patients: int | None
    """Distinct patient ids, None when the source has none."""
    manifest: str
    quarantine: str
    dataset_info: str


def stable_id(key: str) -> str:
    """A short id that depends only on `key` (a path relative to the source), so re-importing
    the same data gives the same ids on any machine."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def quarantine_frame(rows: list[dict[str, str]], stage: str = "import") -> pd.DataFrame:
    """Rows of {uri, reason} -> the quarantine table (stage added)."""
    frame = pd.DataFrame(rows, columns=["uri", "reason"])
    frame["stage"] = stage
    return frame


def write_manifest(
    workdir_uri: str,
    manifest: pd.DataFrame,
    quarantine: pd.DataFrame | None = None,
    *,
    source: str,
    multi_label: bool,
    label_names: list[str] | None = None,
    read: int | None = None,
    task: str = "label",
) -> ImportResult:
    """Validate and write manifest.parquet, quarantine.parquet, then dataset.json.

    Overwrites what a previous import wrote (re-running an import is idempotent).
    `label_names` defaults to the labels that occur; `read` to kept + quarantined.
    """
    frame = normalize_manifest(manifest)
    table = pa.Table.from_pandas(
        frame[MANIFEST_SCHEMA.names], schema=MANIFEST_SCHEMA, preserve_index=False
    )
    for column in frame.columns.difference(MANIFEST_SCHEMA.names, sort=False):
        table = table.append_column(str(column), pa.array(frame[column], from_pandas=True))
    quarantine = quarantine if quarantine is not None else quarantine_frame([])
    qtable = pa.Table.from_pandas(
        quarantine[["uri", "reason", "stage"]], schema=QUARANTINE_SCHEMA, preserve_index=False
    )
    paths = {
        "manifest": workdir.manifest(workdir_uri),
        "quarantine": workdir.quarantine(workdir_uri),
        "dataset_info": workdir.dataset_info(workdir_uri),
    }
    storage.remove(paths["dataset_info"])  # an interrupted re-import must not look finished
    storage.write_table(table, paths["manifest"])
    storage.write_table(qtable, paths["quarantine"])
    info = dataset_info(frame, source, multi_label, label_names, len(quarantine), task)
    info["manifest_sha256"] = storage.sha256(paths["manifest"])
    storage.write_json(paths["dataset_info"], info)
    return ImportResult(
        source=source,
        read=read if read is not None else len(frame) + len(quarantine),
        kept=len(frame),
        quarantined=len(quarantine),
        multi_label=multi_label,
        label_counts=info["counts"]["labels"],
        split_counts=info["counts"]["splits"],
        patients=info["counts"]["patients"],
        **paths,
    )


def dataset_info(
    manifest: pd.DataFrame,
    source: str,
    multi_label: bool,
    label_names: list[str] | None = None,
    quarantined: int = 0,
    task: str = "label",
) -> dict[str, Any]:
    """The dataset.json document for a manifest (see docs/contracts.md); `task` names what
    the labels are (the default head task: `tissue` for synthetic tiles)."""
    per_label = Counter(label for labels in manifest["labels"] for label in labels)
    names = sorted(set(label_names or []) | set(per_label))
    label_counts = {name: per_label.get(name, 0) for name in names}
    empty = int(sum(len(labels) == 0 for labels in manifest["labels"]))
    if empty:
        label_counts["(none)"] = empty
    patients = manifest["patient_id"].dropna()
    split_counts = manifest["split"].value_counts()
    return {
        "label_names": names,
        "task": task,
        "multi_label": bool(multi_label),
        "source": source,
        "counts": {
            "images": len(manifest),
            "quarantined": int(quarantined),
            "labels": label_counts,
            "splits": {s: int(split_counts.get(s, 0)) for s in SPLITS},
            "patients": int(patients.nunique()) if len(patients) else None,
        },
    }


def read_manifest(workdir_uri: str) -> pd.DataFrame:
    """The manifest as a DataFrame; `labels` and `uncertain_labels` are Python lists."""
    path = workdir.manifest(workdir_uri)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{path}: no manifest; run `medray data import ...` or `medray data synth` first"
        )
    frame = storage.read_table(path).to_pandas()
    for column in ("labels", "uncertain_labels"):
        if column not in frame:
            frame[column] = [[] for _ in range(len(frame))]
        frame[column] = [list(v) if v is not None else [] for v in frame[column]]
    return frame


def read_uncertain(workdir_uri: str) -> dict[str, list[str]]:
    """{id: uncertain label names} for the manifest rows that have any (a CSV imported with
    `--uncertain ignore`); {} without a manifest or without uncertain labels. Heads and
    evaluate mask these labels out: unknown, neither positive nor negative."""
    path = workdir.manifest(workdir_uri)
    if not storage.exists(path):
        return {}
    table = storage.read_table(path)
    if "uncertain_labels" not in table.column_names:
        return {}
    ids = table.column("id").to_pylist()
    values = table.column("uncertain_labels").to_pylist()
    return {i: [str(v) for v in u] for i, u in zip(ids, values, strict=True) if u}


def read_dataset_info(workdir_uri: str) -> dict[str, Any]:
    """dataset.json: label_names, multi_label, source, counts, manifest_sha256."""
    path = workdir.dataset_info(workdir_uri)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{path}: no dataset info; run `medray data import ...` or `medray data synth` first"
        )
    return storage.read_json(path)


def read_quarantine(workdir_uri: str) -> pd.DataFrame:
    """quarantine.parquet (uri, reason, stage); empty when nothing was quarantined."""
    path = workdir.quarantine(workdir_uri)
    if not storage.exists(path):
        return quarantine_frame([])
    return storage.read_table(path).to_pandas()


def normalize_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """The contract's columns and types, checked: unique ids, known splits, lists of str.
    Other columns (importer-specific: DICOM UIDs, slide coordinates) follow unchanged."""
    missing = [c for c in ("id", "uri", "labels", "split") if c not in manifest]
    if missing:
        raise ManifestError(f"manifest is missing column(s): {', '.join(missing)}")
    frame = pd.DataFrame(
        {
            "id": manifest["id"].astype(str),
            "uri": manifest["uri"].astype(str),
            "labels": [_str_list(v) for v in manifest["labels"]],
            "patient_id": _nullable_str(manifest.get("patient_id"), len(manifest)),
            "split": manifest["split"].astype(str),
            "uncertain_labels": [
                _str_list(v) for v in manifest.get("uncertain_labels", [None] * len(manifest))
            ],
        }
    )
    for column in manifest.columns.difference(MANIFEST_SCHEMA.names, sort=False):
        frame[column] = manifest[column].to_numpy()
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise ManifestError(f"duplicate ids in manifest, e.g. {duplicated.iloc[0]!r}")
    bad = frame[~frame["split"].isin(SPLITS)]
    if len(bad):
        raise ManifestError(
            f"split must be one of {'/'.join(SPLITS)}; row id {bad['id'].iloc[0]!r} has "
            f"{bad['split'].iloc[0]!r}"
        )
    return frame


def _str_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    return [str(v) for v in value]


def _nullable_str(column: pd.Series | None, n: int) -> list[str | None]:
    if column is None:
        return [None] * n
    return [None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v) for v in column]
