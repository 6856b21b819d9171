"""The one image decoder every stage uses: bytes in, uint8 (H, W, 3) RGB out, or a reason.

`read_image(uri)` is the front door for a manifest row: a whole file, one frame of a DICOM
object (`path#frame=N`) or a region of a whole-slide image (`path#level=L&x=X&y=Y&w=W&size=S`,
see `medray.data.slides`). `decode_image(bytes)` recognises DICOM by content ('DICM' at byte
128, `medray.data.dicom`: windowed, middle frame of a multi-frame object); PIL reads PNG,
JPEG, TIFF, BMP, GIF, WebP; `tifffile` reads the TIFFs PIL cannot (16-bit
RGB, planar, float, compressed variants). Pixel values are mapped to 8 bits the way a
viewer would show them: 16-bit and float images by their real min..max range (never by
truncating the high byte), transparency composited on white, palettes expanded.
Anything that cannot become such an array raises `DecodeError` with a one-line reason,
which importers store in `data/quarantine.parquet`.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageMode, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
"""Decompression-bomb guard: images with more pixels than this are refused before decoding."""
DEFAULT_MAX_DECODE_BYTES = 1_000_000_000
"""Decode budget of import and embed (archive files): width x height x channels x bytes per
sample, read from the header and refused above this before any pixel is decoded. 1 GB lets
a 100-Mpx 16-bit RGB slide region (600 MB) through; serving passes its own, smaller one."""
CHUNK_ELEMENTS = 1 << 20
"""Samples converted at a time when scaling to 8 bits: the float64 temporaries of a
conversion stay near 8 MB whatever the image size."""

# Corrupt files are reported through DecodeError; the libraries' own chatter about them
# (PIL's "Corrupt EXIF data", tifffile's "invalid offset") would only repeat it, per thread.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
logging.getLogger("PIL.TiffImagePlugin").setLevel(logging.CRITICAL)  # "More samples per pixel"

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class DecodeError(ValueError):
    """An image that cannot be decoded; `.reason` is the short cause, `.name` the file."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}" if name else reason)
        self.name = name
        self.reason = reason


def decode_image(
    data: bytes,
    name: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_DECODE_BYTES,
) -> np.ndarray:
    """Decode image bytes to a uint8 (H, W, 3) RGB array, fully (every pixel is read).

    `name` only labels errors. Raises `DecodeError` for empty, truncated, corrupt or
    non-image data, and (reason "too large: ...", before any pixel is decoded) for images
    with more than `max_pixels` pixels or whose decoded samples (width x height x channels
    x bytes per sample, from the header) exceed `max_bytes` (None: no byte budget).
    """
    if not data:
        raise DecodeError(name, "empty file (0 bytes)")
    from medray.data.dicom import decode_dicom, is_dicom

    if is_dicom(data):  # before PIL: a DICOM preamble may hold a TIFF header
        check_dicom_budget(data, name, max_pixels, max_bytes)
        return decode_dicom(data, name, max_pixels)
    try:
        return _decode_with_pil(data, name, max_pixels, max_bytes)
    except DecodeError as pil_error:
        if not data.startswith(_TIFF_MAGIC) or pil_error.reason.startswith("too large"):
            raise
        try:
            return _decode_with_tifffile(data, name, max_pixels, max_bytes)
        except DecodeError as tiff_error:
            if tiff_error.reason.startswith("too large"):
                raise  # medray's 413, read from the TIFF's own header
            reason = f"unreadable TIFF (PIL: {pil_error.reason}; tifffile: {tiff_error.reason})"
            raise DecodeError(name, reason) from None


def read_image(
    uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = DEFAULT_MAX_DECODE_BYTES
) -> np.ndarray:
    """A manifest `uri` -> uint8 (H, W, 3) RGB: import, pretrain, embed and thumbnails all
    read through here. Raises `DecodeError` for bad content; storage errors (missing file,
    S3 failures) propagate as they are, so callers can retry what is transient."""
    path, params = parse_uri(uri)
    if "x" in params:
        from medray.data.slides import read_region

        return read_region(path, params, uri)
    from medray import storage

    data = storage.read_bytes(path)
    if "frame" in params:
        from medray.data.dicom import decode_dicom

        check_dicom_budget(data, uri, max_pixels, max_bytes)
        return decode_dicom(data, uri, max_pixels, frame=params["frame"])
    return decode_image(data, uri, max_pixels, max_bytes)


def parse_uri(uri: str) -> tuple[str, dict[str, int]]:
    """`path#k=v&...` -> (path, {k: int}) when the fragment is one of medray's (a DICOM
    frame or a slide region); anything else is a plain path (a file name may hold '#')."""
    path, sep, fragment = uri.rpartition("#")
    if not sep or not fragment:
        return uri, {}
    try:
        params = {k: int(v) for k, v in (item.split("=", 1) for item in fragment.split("&"))}
    except ValueError:
        return uri, {}
    keys = set(params)
    if keys == {"frame"} or keys == set(REGION_KEYS):
        return path, params
    return uri, {}


REGION_KEYS = ("level", "x", "y", "w", "size")
"""A slide region: `level` to read, top-left `x`, `y` in level-0 pixels, side `w` in that
level's pixels, resized to `size` (the tile side the manifest promises)."""


def fragment_uri(path: str, **params: int) -> str:
    """`path#k=v&...` in the order given (the inverse of `parse_uri`)."""
    return f"{path}#" + "&".join(f"{k}={int(v)}" for k, v in params.items())


def to_rgb8(array: np.ndarray, name: str = "") -> np.ndarray:
    """Any (H, W), (H, W, 1|2|3|4) numeric array -> uint8 (H, W, 3) RGB (see module doc)."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or 0 in arr.shape:
        raise DecodeError(name, f"unsupported pixel array shape {tuple(np.shape(array))}")
    channels = arr.shape[2]
    has_alpha = channels in (2, 4)
    color = arr[..., : channels - 1] if has_alpha else arr
    rgb = scale_to_uint8(color, name)
    if has_alpha:
        alpha = scale_alpha(arr[..., -1])
        rgb = _composite_on_white(rgb, alpha)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    return np.ascontiguousarray(rgb)


def scale_to_uint8(array: np.ndarray, name: str = "") -> np.ndarray:
    """uint8 passes through; bool -> 0/255; wider ints and floats map min..max -> 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DecodeError(name, f"unsupported pixel type {array.dtype}")
    lo, hi = _finite_range(array, name)
    out = np.zeros(array.shape, np.uint8)
    if hi <= lo:
        return out
    factor = 255.0 / (hi - lo)
    for rows in _row_chunks(array):  # float64 temporaries of one chunk at a time
        values = array[rows].astype(np.float64)
        values[~np.isfinite(values)] = lo
        values -= lo
        values *= factor
        out[rows] = np.clip(np.rint(values, out=values), 0, 255, out=values)
    return out


def _row_chunks(array: np.ndarray) -> list[slice]:
    """Slices along the first axis covering about CHUNK_ELEMENTS samples each."""
    per_row = max(1, array.size // max(1, array.shape[0]))
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [slice(i, i + step) for i in range(0, array.shape[0], step)]


def _finite_range(array: np.ndarray, name: str) -> tuple[float, float]:
    """Min and max of the finite values (as float64), one chunk at a time."""
    if np.issubdtype(array.dtype, np.integer):
        if not array.size:
            raise DecodeError(name, "no finite pixel values")
        return float(array.min()), float(array.max())
    lo, hi = np.inf, -np.inf
    for rows in _row_chunks(array):
        values = array[rows].astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    if lo > hi:
        raise DecodeError(name, "no finite pixel values")
    return lo, hi


def scale_alpha(alpha: np.ndarray) -> np.ndarray:
    """Alpha as float in [0, 1] from its dtype's full range (not its observed range)."""
    if np.issubdtype(alpha.dtype, np.integer):
        return alpha.astype(np.float32) / float(np.iinfo(alpha.dtype).max)
    return np.clip(alpha.astype(np.float32), 0.0, 1.0)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = np.empty(rgb.shape, np.uint8)
    for rows in _row_chunks(rgb):
        a = alpha[rows][..., None]
        mixed = rgb[rows].astype(np.float32) * a + 255.0 * (1.0 - a)
        out[rows] = np.clip(np.rint(mixed), 0, 255)
    return out


def check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(name, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise DecodeError(
            name,
            f"too large: {width}x{height} = {width * height:,} pixels > max_pixels {max_pixels:,}",
        )


def check_budget(
    width: int,
    height: int,
    channels: int,
    sample_bytes: int,
    name: str,
    max_pixels: int,
    max_bytes: int | None,
) -> None:
    """`check_size`, then the decode budget: width x height x channels x bytes per sample
    (what the decoded samples will occupy, from the header) must not exceed `max_bytes`."""
    check_size(width, height, name, max_pixels)
    need = width * height * max(1, channels) * max(1, sample_bytes)
    if max_bytes is not None and need > max_bytes:
        raise DecodeError(
            name,
            f"too large: {width}x{height} x {channels} channels x {sample_bytes} bytes per "
            f"sample = {need:,} bytes decoded > max_decode_bytes {max_bytes:,}",
        )


def check_dicom_budget(data: bytes, name: str, max_pixels: int, max_bytes: int | None) -> None:
    """The budget of one DICOM frame from its header alone (pixel data is not read here)."""
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        channels = int(ds.get("SamplesPerPixel") or 1)
        sample_bytes = -(-int(ds.get("BitsAllocated") or 8) // 8)
    except Exception:  # a damaged header: decode_dicom reports it with its own reason
        return
    if rows and cols:
        check_budget(cols, rows, channels, sample_bytes, name, max_pixels, max_bytes)


def _decode_with_pil(data: bytes, name: str, max_pixels: int, max_bytes: int | None) -> np.ndarray:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image = Image.open(io.BytesIO(data))  # lazy: reads the header only
        channels, sample_bytes = _pil_layout(image.mode)
        check_budget(image.width, image.height, channels, sample_bytes, name, max_pixels, max_bytes)
        if _pil_would_truncate_tiff(image):
            raise DecodeError(name, "TIFF with more than 8 bits per colour sample")
        image.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard fires in open(), above ours
        raise DecodeError(name, _bomb_reason(str(exc), max_pixels)) from None
    except UnidentifiedImageError:
        raise DecodeError(name, f"not a recognised image format ({_sniff(data)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise DecodeError(name, _describe_pil_error(exc)) from None
    return _pil_to_rgb(image, name)


def _pil_layout(mode: str) -> tuple[int, int]:
    """(channels, bytes per sample) of a PIL mode, from the header: RGB (3, 1), I;16 (1, 2)."""
    try:
        info = ImageMode.getmode(mode)
        return len(info.bands), np.dtype(info.typestr).itemsize
    except (KeyError, TypeError, ValueError):
        return 4, 4  # a mode PIL itself does not describe: count it as wide as its widest


def _bomb_reason(text: str, max_pixels: int) -> str:
    """medray's 413 reason for an image PIL refused to open as a decompression bomb (more
    than 2 x Image.MAX_IMAGE_PIXELS pixels, far above any max_pixels medray uses)."""
    found = re.search(r"\((\d+) pixels\)", text)
    size = f"{int(found.group(1)):,} pixels" if found else "more pixels than PIL opens"
    return f"too large: {size} > max_pixels {max_pixels:,}"


def _pil_would_truncate_tiff(image: Image.Image) -> bool:
    """PIL reads 16-bit RGB TIFFs as 8-bit by dropping the low byte; tifffile reads them whole."""
    if image.format != "TIFF" or image.mode in _WIDE_MODES or image.mode.startswith("I;16"):
        return False
    bits = image.tag_v2.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8


def _describe_pil_error(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated or incomplete image data ({text})"
    return f"corrupt image data ({type(exc).__name__}: {text})"


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _WIDE_MODES or mode.startswith("I;16"):
        return to_rgb8(np.asarray(image), name)
    if mode in _ALPHA_MODES:
        return to_rgb8(np.asarray(image.convert("RGBA")), name)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _decode_with_tifffile(
    data: bytes, name: str, max_pixels: int, max_bytes: int | None
) -> np.ndarray:
    import tifffile

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if not tif.pages:
                raise DecodeError(name, "no readable page (truncated or corrupt header)")
            page = tif.pages.first
            shape = tuple(int(n) for n in page.shape)
            height, width = int(page.imagelength), int(page.imagewidth)
            _check_tiff_header(page, shape, width, height, name, max_pixels, max_bytes)
            array = page.asarray(maxworkers=1)  # one thread: a request decodes on one core
    except DecodeError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DecodeError(name, f"{type(exc).__name__}: {exc}") from None
    if (
        array.ndim == 3
        and array.shape[:2] != (height, width)
        and array.shape[1:] == (height, width)
    ):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W)
    if array.shape[:2] != (height, width) and array.ndim == 3:
        raise DecodeError(name, f"unsupported TIFF layout {shape}")
    return to_rgb8(array, name)


def _check_tiff_header(
    page, shape: tuple[int, ...], width: int, height: int, name: str, max_pixels: int,
    max_bytes: int | None,
) -> None:  # fmt: skip
    """Size, decode budget and layout of a TIFF page from its tags (no pixel data read)."""
    if page.dtype is None:
        raise DecodeError(name, f"unsupported TIFF sample format ({page.sampleformat!r})")
    planes = int(np.prod(shape, dtype=np.int64)) // max(1, width * height)
    check_budget(width, height, planes, page.dtype.itemsize, name, max_pixels, max_bytes)
    if len(shape) == 2:
        return
    contig = len(shape) == 3 and shape[:2] == (height, width)
    planar = len(shape) == 3 and shape[1:] == (height, width)
    samples = shape[2] if contig else shape[0] if planar else None
    if samples not in (1, 2, 3, 4):
        raise DecodeError(
            name, f"unsupported TIFF layout {shape}: {planes} samples per pixel (1 to 4 read)"
        )


def _sniff(data: bytes) -> str:
    head = data[:16]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "looks like text"
    return f"first bytes {head[:8].hex()}"
