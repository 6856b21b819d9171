"""Labels joined onto images by a key column: DICOM objects by SOP Instance UID, accession or
path, whole slides by slide name. Values follow the csv importer (`import_csv`): several
columns, or one with only 1 / 0 / -1 / blank, are CheXpert findings (Irvin et al., AAAI
2019) with -1 resolved by the `uncertain` policy; one column of names gives classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medray.data.importers import (
    UncertainPolicy,
    _class_name,
    _findings,
    _is_finding_column,
    _require_columns,
    _text,
    read_table_file,
)


@dataclass
class LabelRow:
    labels: list[str] = field(default_factory=list)
    uncertain: list[str] = field(default_factory=list)
    patient_id: str | None = None
    error: str | None = None
    """Why this key's labels cannot be used (bad value, key listed twice)."""


@dataclass
class LabelTable:
    """Key -> labels, read from one CSV/Parquet table."""

    path: str
    key_column: str
    rows: dict[str, LabelRow]
    multi_label: bool
    label_names: list[str] | None
    """Sorted finding names (multi-label); None for class names (taken from the data)."""

    def lookup(self, *keys: str) -> LabelRow:
        """The row of the first of `keys` that the table lists, else a row with an error."""
        for key in keys:
            if key and key in self.rows:
                return self.rows[key]
        shown = next((k for k in keys if k), "")
        return LabelRow(error=f"no row in {self.path} with {self.key_column} = {shown!r}")


def read_label_table(
    path: str,
    key_column: str,
    label_columns: list[str],
    uncertain: UncertainPolicy = "ignore",
    patient_column: str | None = None,
) -> LabelTable:
    """Read `path` and index its label columns by `key_column` (values stripped)."""
    if uncertain not in ("ones", "zeros", "ignore"):
        raise ValueError(f"uncertain policy must be ones, zeros or ignore; got {uncertain!r}")
    if not label_columns:
        raise ValueError(f"{path}: give at least one label column")
    table = read_table_file(path)
    needed = [key_column, *label_columns, patient_column]
    _require_columns(table, [c for c in needed if c], path)
    findings = len(label_columns) > 1 or _is_finding_column(table[label_columns[0]])
    rows: dict[str, LabelRow] = {}
    first_seen: dict[str, int] = {}
    for number, record in enumerate(table.to_dict("records"), start=2):
        key = _text(record[key_column])
        if not key:
            continue
        if key in first_seen:
            rows[key] = LabelRow(
                error=f"{path}: {key_column} {key!r} is listed twice (rows "
                f"{first_seen[key]} and {number})"
            )
            continue
        first_seen[key] = number
        patient = (_text(record[patient_column]) or None) if patient_column else None
        try:
            labels, unsure = (
                _findings(record, label_columns, uncertain)
                if findings
                else (_class_name(record[label_columns[0]]), [])
            )
        except ValueError as exc:
            rows[key] = LabelRow(error=f"{path} row {number}: {exc}")
            continue
        rows[key] = LabelRow(labels, unsure, patient)
    names = sorted(label_columns) if findings else None
    return LabelTable(path, key_column, rows, findings, names)
