"""DICOM objects to the image the model sees, and the header fields the manifest keeps.

Pixels follow the DICOM grayscale pipeline (PS3.4 N.2, PS3.3 C.11): the Modality LUT
(Rescale Slope/Intercept or a Modality LUT Sequence) gives physical values (e.g. HU), the
VOI stage picks what a reader looks at (the first VOI LUT Sequence item, else the first
Window Center/Width with its VOI LUT Function), MONOCHROME1 is inverted so that bright
always means dense, and the result is 8 bits. Without a VOI the full range of the values
is shown. Colour objects (RGB, YBR, palette) become RGB. Decompression goes through
pydicom's plugins: pylibjpeg (JPEG), pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-libjpeg
(JPEG lossless and JPEG-LS), pylibjpeg-rle and pydicom's own RLE.

A multi-frame object (CT/MR volumes, cine loops) gives one frame: `frame` picks it, and
`frame_indices` turns the import policy (first / middle / every) into frame numbers.
Objects without pixels (SR, RT plans, presentation states, ...), segmentations and dose
grids, and truncated files raise `DecodeError` with the reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from medray.data.decode import DecodeError, check_size, scale_to_uint8, to_rgb8

FramePolicy = Literal["first", "middle", "every"]
FRAME_POLICIES: tuple[str, ...] = ("first", "middle", "every")

NOT_IMAGES = {"SEG": "a segmentation", "RTDOSE": "a radiotherapy dose grid"}
"""Modalities whose pixel data is not a picture of the patient: refused even with pixels."""

_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little / big endian

# Reading oddities (implicit VR where explicit was announced, bad DS strings) are routine in
# real archives; what matters is whether the pixels decode, which DecodeError reports.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
logging.getLogger("pydicom").setLevel(logging.ERROR)


def is_dicom(data: bytes) -> bool:
    """'DICM' after the 128-byte preamble (PS3.10), or a preamble-less dataset that starts
    with a group 0002 or 0008 element (old exports)."""
    if data[128:132] == b"DICM":
        return True
    if len(data) < 8:
        return False
    little = data[:2] in (b"\x02\x00", b"\x08\x00") and data[3] == 0
    return little or (data[:2] in (b"\x00\x02", b"\x00\x08") and data[2] == 0)


@dataclass
class DicomHeader:
    """What the manifest keeps from a header (no names, dates or other PHI)."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    view_position: str
    accession: str
    """Only to join a labels table; never written to the manifest."""
    frames: int


def read_dataset(data: bytes, name: str = "") -> Any:
    """A pydicom Dataset from file bytes; DecodeError when it is not DICOM at all."""
    import pydicom

    if not is_dicom(data):
        raise DecodeError(name, "not a DICOM file (no 'DICM' marker at byte 128)")
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for damaged files
        raise DecodeError(name, f"unreadable DICOM ({type(exc).__name__}: {exc})") from None


def header(ds: Any) -> DicomHeader:
    def text(keyword: str) -> str:
        value = ds.get(keyword)
        return "" if value is None else str(value).strip()

    return DicomHeader(
        patient_id=text("PatientID"),
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        sop_uid=text("SOPInstanceUID"),
        modality=text("Modality"),
        view_position=text("ViewPosition"),
        accession=text("AccessionNumber"),
        frames=frame_count(ds),
    )


def frame_count(ds: Any) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def frame_indices(frames: int, policy: FramePolicy) -> list[int]:
    """Frame numbers (0-based) the import policy keeps from an object with `frames` frames."""
    if policy == "first":
        return [0]
    if policy == "middle":
        return [frames // 2]
    if policy == "every":
        return list(range(frames))
    raise ValueError(f"frame policy must be one of {', '.join(FRAME_POLICIES)}; got {policy!r}")


def salted_patient(patient_id: str, salt: str) -> str:
    """sha256(salt + id), 16 hex digits: the same patient groups together, and without the
    salt nobody can test a guessed identifier against the manifest."""
    return hashlib.sha256(f"{salt}\x00{patient_id}".encode()).hexdigest()[:16]


def check_image_object(ds: Any, data: bytes, name: str) -> None:
    """DecodeError unless `ds` is an image: pixel data present and not a mask or dose grid."""
    modality = str(ds.get("Modality") or "").upper()
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    kind = getattr(sop, "name", None) or str(sop or "unknown SOP class")
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not has_pixels:
        if any(tag in data for tag in _PIXEL_TAGS) or "Image" in kind:
            raise DecodeError(name, f"truncated: {kind} whose pixel data ends early")
        what = f"{kind}, modality {modality}" if modality else kind
        raise DecodeError(name, f"not an image: {what} has no pixel data")
    if modality in NOT_IMAGES:
        raise DecodeError(name, f"not an image: {NOT_IMAGES[modality]} ({kind})")


def decode_dicom(
    data: bytes, name: str = "", max_pixels: int = 100_000_000, frame: int | None = None
) -> np.ndarray:
    """DICOM bytes -> uint8 (H, W, 3) RGB of one frame (default: the middle one)."""
    ds = read_dataset(data, name)
    check_image_object(ds, data, name)
    return dataset_to_rgb8(ds, name, max_pixels, frame)


def dataset_to_rgb8(ds: Any, name: str, max_pixels: int, frame: int | None = None) -> np.ndarray:
    """One frame of a parsed image object through the pipeline in the module doc."""
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    check_size(cols, rows, name, max_pixels)
    frames = frame_count(ds)
    index = frames // 2 if frame is None else frame
    if not 0 <= index < frames:
        raise DecodeError(name, f"frame {index} does not exist ({frames} frames)")
    pixels = _frame_pixels(ds, name, index)
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    if photometric.startswith("MONOCHROME") and pixels.ndim == 2:
        return _grayscale_to_rgb8(pixels, ds, name, invert=photometric == "MONOCHROME1")
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
    return to_rgb8(pixels, name)


def _frame_pixels(ds: Any, name: str, index: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = getattr(syntax, "name", None) or "unknown transfer syntax"
    try:
        return pixel_array(ds, index=index)
    except Exception as exc:  # missing plugin, corrupt or short codestream
        text = " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__
        short = re.search(r"less than expected \((\d+) vs (\d+) bytes\)", text)
        if short:
            have, need = short.groups()
            raise DecodeError(name, f"truncated: pixel data has {have} of {need} bytes") from None
        raise DecodeError(name, f"cannot decode pixel data ({syntax_name}: {text[:400]})") from None


def _grayscale_to_rgb8(pixels: np.ndarray, ds: Any, name: str, invert: bool) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi

    try:
        values = apply_modality_lut(pixels, ds)
        if ds.get("VOILUTSequence"):
            gray = scale_to_uint8(apply_voi(values, ds, index=0), name)
        else:
            window = _window(ds)
            gray = _apply_window(values, *window) if window else scale_to_uint8(values, name)
    except DecodeError:
        raise
    except Exception as exc:  # malformed LUT descriptors and the like
        raise DecodeError(name, f"bad grayscale LUT ({type(exc).__name__}: {exc})") from None
    if invert:
        gray = 255 - gray
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _window(ds: Any) -> tuple[float, float, str] | None:
    """(center, width, function) of the first window, None when absent or unusable."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if width <= 0 or (function == "LINEAR" and width < 1):
        return None
    return center, width, function


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.1 (SIGMOID), C.11.2.1.3.2 (LINEAR_EXACT) with
    the output range 0..255."""
    x = values.astype(np.float64)
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255.0
    else:
        y = (
            ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
            if width > 1
            else (x > center) * 255.0
        )
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)
