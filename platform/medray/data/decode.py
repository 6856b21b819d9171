"""The one image decoder every stage uses: bytes in, uint8 (H, W, 3) RGB out, or a reason.

PIL reads PNG, JPEG, TIFF, BMP, GIF, WebP; `tifffile` reads the TIFFs PIL cannot (16-bit
RGB, planar, float, compressed variants). Pixel values are mapped to 8 bits the way a
viewer would show them: 16-bit and float images by their real min..max range (never by
truncating the high byte), transparency composited on white, palettes expanded.
Anything that cannot become such an array raises `DecodeError` with a one-line reason,
which importers store in `data/quarantine.parquet`.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
"""Decompression-bomb guard: images with more pixels than this are refused before decoding."""

# Corrupt files are reported through DecodeError; the libraries' own chatter about them
# (PIL's "Corrupt EXIF data", tifffile's "invalid offset") would only repeat it, per thread.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


class DecodeError(ValueError):
    """An image that cannot be decoded; `.reason` is the short cause, `.name` the file."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}" if name else reason)
        self.name = name
        self.reason = reason


def decode_image(data: bytes, name: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to a uint8 (H, W, 3) RGB array, fully (every pixel is read).

    `name` only labels errors. Raises `DecodeError` for empty, truncated, corrupt or
    non-image data and for images larger than `max_pixels`.
    """
    if not data:
        raise DecodeError(name, "empty file (0 bytes)")
    try:
        return _decode_with_pil(data, name, max_pixels)
    except DecodeError as pil_error:
        if not data.startswith(_TIFF_MAGIC) or pil_error.reason.startswith("too large"):
            raise
        try:
            return _decode_with_tifffile(data, name, max_pixels)
        except DecodeError as tiff_error:
            reason = f"unreadable TIFF (PIL: {pil_error.reason}; tifffile: {tiff_error.reason})"
            raise DecodeError(name, reason) from None


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
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise DecodeError(name, "no finite pixel values")
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    scaled = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def scale_alpha(alpha: np.ndarray) -> np.ndarray:
    """Alpha as float in [0, 1] from its dtype's full range (not its observed range)."""
    if np.issubdtype(alpha.dtype, np.integer):
        return alpha.astype(np.float32) / float(np.iinfo(alpha.dtype).max)
    return np.clip(alpha.astype(np.float32), 0.0, 1.0)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = rgb.astype(np.float32) * alpha[..., None] + 255.0 * (1.0 - alpha[..., None])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(name, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise DecodeError(
            name, f"too large: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
        )


def _decode_with_pil(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image = Image.open(io.BytesIO(data))
        _check_size(image.width, image.height, name, max_pixels)
        if _pil_would_truncate_tiff(image):
            raise DecodeError(name, "TIFF with more than 8 bits per colour sample")
        image.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(name, f"too large: {exc}") from None
    except UnidentifiedImageError:
        raise DecodeError(name, f"not a recognised image format ({_sniff(data)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise DecodeError(name, _describe_pil_error(exc)) from None
    return _pil_to_rgb(image, name)


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


def _decode_with_tifffile(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    import tifffile

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if not tif.pages:
                raise DecodeError(name, "no readable page (truncated or corrupt header)")
            page = tif.pages.first
            shape = page.shape
            height, width = int(page.imagelength), int(page.imagewidth)
            _check_size(width, height, name, max_pixels)
            array = page.asarray()
    except DecodeError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DecodeError(name, f"{type(exc).__name__}: {exc}") from None
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W)
    if array.shape[:2] != (height, width) and array.ndim == 3:
        raise DecodeError(name, f"unsupported TIFF layout {shape}")
    return to_rgb8(array, name)


def _sniff(data: bytes) -> str:
    head = data[:16]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "looks like text"
    return f"first bytes {head[:8].hex()}"
