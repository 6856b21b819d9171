"""`medray data import dicom`: a folder or s3:// prefix of DICOM files (searched recursively)
into the manifest. Files stay where they are; each row's `uri` is the file, with `#frame=N`
for a frame of a multi-frame object (`medray.data.decode.read_image` reads either).

Every file is parsed and its kept frames decoded once (`medray.data.dicom`). Files that are
not DICOM, objects without pixels (SR, RT plans, presentation states, ...), segmentations,
dose grids, truncated files and repeated SOP Instance UIDs go to quarantine with the reason.
Manifest columns beyond the contract: study_uid, series_uid, sop_uid, modality,
view_position, frame. `patient_id` is the header's Patient ID, or its salted hash
(`patient_salt`); no other identifying header field is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medray import storage
from medray.data.config import DataConfig
from medray.data.decode import DecodeError, fragment_uri
from medray.data.dicom import (
    DicomHeader,
    check_image_object,
    dataset_to_rgb8,
    frame_indices,
    header,
    read_dataset,
    salted_patient,
)
from medray.data.importers import Candidate, UncertainPolicy, finish_import, list_files
from medray.data.labels import LabelRow, LabelTable, read_label_table
from medray.data.manifest import ImportResult
from medray.data.parallel import thread_map

JoinOn = Literal["sop_uid", "accession", "study_uid", "series_uid", "path"]
DEFAULT_KEY_COLUMNS: dict[str, str] = {
    "sop_uid": "SOPInstanceUID",
    "accession": "AccessionNumber",
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "path": "path",
}
"""The labels table's key column for each `on`, unless `key_column` names another."""


@dataclass
class DicomLabels:
    """Join a labels table onto the objects: the header field `on` (or the path relative to
    the source) against the table's `key_column`."""

    table: str
    label_columns: list[str]
    on: JoinOn = "sop_uid"
    key_column: str | None = None
    uncertain: UncertainPolicy = "ignore"


@dataclass
class _Read:
    rel: str
    uri: str
    header: DicomHeader | None = None
    frames: list[int] | None = None
    reason: str | None = None


def import_dicom(
    source: str,
    cfg: DataConfig,
    labels: DicomLabels | None = None,
    patient_salt: str | None = None,
) -> ImportResult:
    """Import every DICOM image under `source` (local folder or s3:// prefix)."""
    root = storage.resolve(source)
    files = list_files(root)
    if not files:
        raise FileNotFoundError(f"{source}: no files found")
    table = _label_table(labels) if labels else None
    reads = thread_map(lambda f: _read_one(*f, cfg), files, cfg.workers, "read DICOM")
    candidates, rejected, seen = [], [], {}
    for r in reads:
        if r.reason is None and r.header and r.header.sop_uid in seen:
            r.reason = (
                f"duplicate SOP Instance UID {r.header.sop_uid} (also {seen[r.header.sop_uid]})"
            )
        if r.reason is not None or r.header is None or r.frames is None:
            rejected.append({"uri": r.uri, "reason": r.reason or "unreadable"})
            continue
        if r.header.sop_uid:
            seen[r.header.sop_uid] = r.uri
        row = table.lookup(*_join_keys(r, labels)) if table and labels else LabelRow()
        if row.error:
            rejected.append({"uri": r.uri, "reason": row.error})
            continue
        candidates += _frame_rows(r, row, patient_salt)
    note = f"dicom:{root} (frames {cfg.dicom.frames}"
    note += ", patient ids salted-hashed)" if patient_salt else ")"
    return finish_import(
        candidates,
        rejected,
        cfg,
        source=note,
        multi_label=bool(table and table.multi_label),
        label_names=table.label_names if table else None,
        read=len(files),
        verify=False,  # every kept frame was decoded above
    )


def _frame_rows(r: _Read, row: LabelRow, patient_salt: str | None) -> list[Candidate]:
    """One candidate per kept frame (`uri#frame=N` when the object has several)."""
    assert r.header is not None and r.frames is not None
    patient = r.header.patient_id or None
    if patient and patient_salt:
        patient = salted_patient(patient, patient_salt)
    multi = r.header.frames > 1
    return [
        Candidate(
            key=fragment_uri(r.rel, frame=frame) if multi else r.rel,
            uri=fragment_uri(r.uri, frame=frame) if multi else r.uri,
            labels=list(row.labels),
            patient_id=patient,
            uncertain=list(row.uncertain),
            extra=_columns(r.header, frame),
        )
        for frame in r.frames
    ]


def _label_table(labels: DicomLabels) -> LabelTable:
    if labels.on not in DEFAULT_KEY_COLUMNS:
        raise ValueError(f"join on one of {', '.join(DEFAULT_KEY_COLUMNS)}; got {labels.on!r}")
    key_column = labels.key_column or DEFAULT_KEY_COLUMNS[labels.on]
    return read_label_table(labels.table, key_column, labels.label_columns, labels.uncertain)


def _join_keys(r: _Read, labels: DicomLabels) -> tuple[str, ...]:
    h = r.header
    assert h is not None
    if labels.on == "path":
        return (r.rel, r.uri)
    return ({"sop_uid": h.sop_uid, "accession": h.accession, "study_uid": h.study_uid,
             "series_uid": h.series_uid}[labels.on],)  # fmt: skip


def _columns(h: DicomHeader, frame: int) -> dict[str, object]:
    return {
        "study_uid": h.study_uid or None,
        "series_uid": h.series_uid or None,
        "sop_uid": h.sop_uid or None,
        "modality": h.modality or None,
        "view_position": h.view_position or None,
        "frame": frame,
    }


def _read_one(rel: str, uri: str, cfg: DataConfig) -> _Read:
    """Parse one file and decode the frames the policy keeps; the reason when it fails."""
    out = _Read(rel, uri)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        out.reason = "file not found"
        return out
    except Exception as exc:  # permissions, directories; S3 outages fail the import
        if isinstance(exc, getattr(storage, "StorageUnavailable", ())):
            raise
        out.reason = f"cannot read file ({type(exc).__name__}: {exc})"
        return out
    try:
        if not data:
            raise DecodeError(uri, "empty file (0 bytes)")
        ds = read_dataset(data, uri)
        check_image_object(ds, data, uri)
        out.header = header(ds)
        out.frames = frame_indices(out.header.frames, cfg.dicom.frames)
        for frame in out.frames:
            dataset_to_rgb8(ds, uri, cfg.max_pixels, frame)
    except DecodeError as exc:
        out.reason = exc.reason
    return out
