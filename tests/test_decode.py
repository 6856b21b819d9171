"""The one decoder: every format the importers meet, and a reason for everything it refuses."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medray.data import DecodeError, decode_image


def encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_rgb_formats_decode_to_uint8_rgb(fmt):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    out = decode_image(encode(rgb, fmt))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if fmt != "JPEG":
        assert np.array_equal(out, rgb)


def test_8bit_grayscale_is_replicated_to_three_channels():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = decode_image(encode(gray, "PNG"))
    assert out.shape == (8, 8, 3) and np.array_equal(out[..., 0], gray)
    assert np.array_equal(out[..., 0], out[..., 2])


def test_16bit_grayscale_uses_its_full_range():
    gray = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # min..max, not the high byte


def test_16bit_rgb_tiff_via_tifffile():
    import tifffile

    rgb = np.linspace(0, 65535, 4 * 5 * 3).astype(np.uint16).reshape(4, 5, 3)
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb, photometric="rgb")
    out = decode_image(buf.getvalue())
    assert out.shape == (4, 5, 3) and out.max() == 255 and out.min() == 0


def test_rgba_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, 2:, 3] = 255
    out = decode_image(encode(rgba, "PNG", "RGBA"))
    assert (out[:, :2] == 255).all() and (out[:, 2:] == [255, 0, 0]).all()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (np.random.default_rng(1).bytes(500), "not a recognised image"),
        (b"hello, this is text", "looks like text"),
    ],
)
def test_garbage_is_refused_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason) as info:
        decode_image(data, "x.png")
    assert info.value.name == "x.png"


def test_truncated_tiff_and_png_are_refused():
    rgb = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for fmt in ("TIFF", "PNG"):
        data = encode(rgb, fmt)
        with pytest.raises(DecodeError):
            decode_image(data[: len(data) // 2], f"cut.{fmt.lower()}")


def test_decompression_bomb_guard():
    rgb = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(DecodeError, match="too large"):
        decode_image(encode(rgb, "PNG"), max_pixels=2000)
