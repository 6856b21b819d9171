"""Import an existing image collection into the manifest: a folder per class, or a CSV/Parquet
table of paths and labels (CheXpert-style 1 / 0 / -1 / blank findings, or one class column).

Every file is read and fully decoded once; what cannot be decoded goes to quarantine with a
reason, so nothing is dropped silently. Files are referenced where they are (no copies).
"""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from medray import storage
from medray.data.config import DataConfig
from medray.data.decode import DecodeError, read_image
from medray.data.manifest import ImportResult, quarantine_frame, stable_id, write_manifest
from medray.data.parallel import thread_map
from medray.data.splits import manifest_splits, with_split_note

UncertainPolicy = Literal["ones", "zeros", "ignore"]
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class Candidate:
    """One image found in the source, before verification."""

    key: str
    """Path relative to the source; the stable id is derived from it."""
    uri: str
    labels: list[str]
    patient_id: str | None = None
    uncertain: list[str] | None = None
    split: str | None = None
    extra: dict[str, object] | None = None
    """Importer-specific manifest columns (DICOM header fields, slide coordinates)."""


def check_image(uri: str, max_pixels: int) -> str | None:
    """None if `uri` reads and decodes to an RGB array (`read_image`: a file, a DICOM frame
    or a slide region), else the reason it does not."""
    try:
        read_image(uri, max_pixels=max_pixels)
    except DecodeError as exc:
        return exc.reason
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # permissions, S3 errors, directories
        return f"cannot read file ({type(exc).__name__}: {exc})"
    return None


def finish_import(
    candidates: list[Candidate],
    rejected: list[dict[str, str]],
    cfg: DataConfig,
    *,
    source: str,
    multi_label: bool,
    label_names: list[str] | None = None,
    verify: bool = True,
    read: int | None = None,
) -> ImportResult:
    """Verify every candidate, quarantine failures, assign splits (the source's own when every
    candidate has one, adjusted by `splits.rename` / `splits.carve_val`), write the manifest.
    `read` counts the files looked at (default: one per candidate or rejection)."""
    read = len(candidates) + len(rejected) if read is None else read
    reasons = (
        thread_map(lambda c: check_image(c.uri, cfg.max_pixels), candidates, cfg.workers, "decode")
        if verify
        else [None] * len(candidates)
    )
    rejected = rejected + [
        {"uri": c.uri, "reason": r} for c, r in zip(candidates, reasons) if r is not None
    ]
    kept = [c for c, r in zip(candidates, reasons) if r is None]
    if not kept:
        examples = "; ".join(f"{q['uri']}: {q['reason']}" for q in rejected[:3])
        raise ValueError(
            f"{source}: no readable images ({len(rejected)} rejected, e.g. {examples})"
        )
    frame = pd.DataFrame(
        {
            "id": [stable_id(c.key) for c in kept],
            "uri": [c.uri for c in kept],
            "labels": [c.labels for c in kept],
            "patient_id": [c.patient_id for c in kept],
            "uncertain_labels": [c.uncertain or [] for c in kept],
        }
    )
    for column in dict.fromkeys(k for c in kept for k in (c.extra or {})):
        frame[column] = [(c.extra or {}).get(column) for c in kept]
    frame["split"] = manifest_splits(
        [c.split for c in kept],
        frame["labels"].tolist(),
        frame["patient_id"].tolist(),
        cfg.splits,
        cfg.seed,
    )
    return write_manifest(
        cfg.workdir,
        frame,
        quarantine_frame(rejected),
        source=with_split_note(source, cfg),
        multi_label=multi_label,
        label_names=label_names,
        read=read,
    )


# ---------------------------------------------------------------- folder per class


def list_files(root: str) -> list[tuple[str, str]]:
    """(path relative to root with `/`, full URI) of every file below root, sorted."""
    if storage.is_s3(root):
        bucket, prefix = storage.split_s3(root)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        paginator = storage.s3_client().get_paginator("list_objects_v2")
        keys = [
            obj["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]
        return sorted((k[len(prefix) :], f"s3://{bucket}/{k}") for k in keys)
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    return sorted((p.relative_to(base).as_posix(), str(p)) for p in base.rglob("*") if p.is_file())


def import_folder(source: str, cfg: DataConfig, patient_regex: str | None = None) -> ImportResult:
    """SRC/<class>/**/<image>: labels = [class folder name]. `patient_regex` (optional) pulls a
    patient id from each relative path (group 1 if the pattern has a group, else the match)."""
    root = storage.resolve(source)
    pattern = re.compile(patient_regex) if patient_regex else None
    files = list_files(root)
    if not files:
        raise FileNotFoundError(f"{source}: no files found")
    candidates, rejected = [], []
    for rel, uri in files:
        parts = rel.split("/")
        if len(parts) < 2:
            reason = "not inside a class subfolder (expected SRC/<class>/<image>)"
            rejected.append({"uri": uri, "reason": reason})
            continue
        patient = _match_patient(pattern, rel) if pattern else None
        candidates.append(Candidate(key=rel, uri=uri, labels=[parts[0]], patient_id=patient))
    return finish_import(candidates, rejected, cfg, source=f"folder:{root}", multi_label=False)


def _match_patient(pattern: re.Pattern[str], rel: str) -> str | None:
    match = pattern.search(rel)
    if not match:
        return None
    return match.group(1) if pattern.groups else match.group(0)


# ---------------------------------------------------------------- CSV / Parquet table


def import_csv(
    table_path: str,
    cfg: DataConfig,
    path_column: str,
    label_columns: list[str],
    patient_column: str | None = None,
    uncertain: UncertainPolicy = "ignore",
    root: str | None = None,
    split_column: str | None = None,
) -> ImportResult:
    """A table with a path column and label columns.

    Several label columns (or one with only 1/0/-1/blank) are findings, as in CheXpert
    (Irvin et al., "CheXpert", AAAI 2019): 1 positive, 0 or blank negative, -1 uncertain,
    resolved by `uncertain`: `ones` -> positive, `zeros` -> negative, `ignore` -> listed in
    `uncertain_labels` (masked out of losses and metrics). One label column holding class
    names gives a multi-class dataset. Relative paths resolve against `root` (default: the
    table's folder).
    """
    if uncertain not in ("ones", "zeros", "ignore"):
        raise ValueError(f"uncertain policy must be ones, zeros or ignore; got {uncertain!r}")
    table = read_table_file(table_path)
    needed = [path_column, *label_columns, patient_column, split_column]
    _require_columns(table, [c for c in needed if c], table_path)
    if not label_columns:
        raise ValueError(f"{table_path}: give at least one label column")
    base = root or _parent(storage.resolve(table_path))
    findings = len(label_columns) > 1 or _is_finding_column(table[label_columns[0]])
    candidates, rejected, seen = [], [], {}
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        rel = _text(row[path_column])
        uri = _resolve_path(base, rel) if rel else f"{table_path}:{row_number}"
        problem = _row_problem(rel, seen, row_number)
        try:
            labels, unsure = (
                _findings(row, label_columns, uncertain)
                if findings
                else (_class_name(row[label_columns[0]]), [])
            )
            split = _split_value(row[split_column]) if split_column else None
        except ValueError as exc:
            problem = problem or f"row {row_number}: {exc}"
        if problem:
            rejected.append({"uri": uri, "reason": problem})
            continue
        seen[rel] = row_number
        patient = _text(row[patient_column]) if patient_column else ""
        candidates.append(Candidate(rel, uri, labels, patient or None, unsure, split))
    names = sorted(label_columns) if findings else None
    source = f"csv:{storage.resolve(table_path)}"
    return finish_import(
        candidates, rejected, cfg, source=source, multi_label=findings, label_names=names
    )


def read_table_file(path: str) -> pd.DataFrame:
    """A CSV (all values as text, blanks as "") or Parquet table, errors naming the file."""
    try:
        data = storage.read_bytes(storage.resolve(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    try:
        if path.lower().endswith((".parquet", ".pq")):
            return pd.read_parquet(io.BytesIO(data))
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except Exception as exc:
        raise ValueError(f"{path}: cannot parse table ({type(exc).__name__}: {exc})") from None


def _require_columns(table: pd.DataFrame, columns: list[str], path: str) -> None:
    for column in columns:
        if column not in table.columns:
            available = ", ".join(map(str, table.columns[:30]))
            raise ValueError(f"{path}: column {column!r} not found; columns are: {available}")


def _row_problem(rel: str, seen: dict[str, int], row_number: int) -> str | None:
    if not rel:
        return f"row {row_number}: empty path"
    if rel in seen:
        return f"row {row_number}: duplicate path (first listed on row {seen[rel]})"
    return None


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value).strip()


def _finding_value(value: object) -> int | None:
    """1 / 0 / -1, blank -> 0; None when the value is not a finding code."""
    text = _text(value)
    if not text:
        return 0
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number in (1.0, 0.0, -1.0) else None


def _is_finding_column(column: pd.Series) -> bool:
    return all(_finding_value(v) is not None for v in column)


def _findings(
    row: dict, columns: list[str], policy: UncertainPolicy
) -> tuple[list[str], list[str]]:
    labels, unsure = [], []
    for column in columns:
        code = _finding_value(row[column])
        if code is None:
            raise ValueError(f"column {column!r}: {row[column]!r} is not 1, 0, -1 or blank")
        if code == 1 or (code == -1 and policy == "ones"):
            labels.append(column)
        elif code == -1 and policy == "ignore":
            unsure.append(column)
    return labels, unsure


def _class_name(value: object) -> list[str]:
    text = _text(value)
    if not text:
        return []
    try:
        number = float(text)
        if number.is_integer():
            text = str(int(number))
    except ValueError:
        pass
    return [text]


def _split_value(value: object) -> str:
    text = _text(value).lower()
    if text not in _SPLIT_ALIASES:
        raise ValueError(f"split {value!r} is not one of train/val/test")
    return _SPLIT_ALIASES[text]


def _parent(uri: str) -> str:
    if storage.is_s3(uri):
        return posixpath.dirname(uri.rstrip("/"))
    return str(Path(uri).parent)


def _resolve_path(base: str, rel: str) -> str:
    if storage.is_s3(rel) or Path(rel).is_absolute():
        return rel
    if storage.is_s3(base):
        return storage.join(base, rel)
    return str((Path(base) / rel).resolve())
