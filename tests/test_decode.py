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


# ---- decode budget: sizes come from the header, before any pixel is decoded -------------

BUDGET = 200_000_000  # serving's default Limits.max_decode_bytes
MAX_PIXELS = 25_000_000  # serving's default Limits.max_pixels


def tiff_bomb(height: int, width: int, channels: int, photometric: str) -> bytes:
    """A valid float64 TIFF of zeros, zlib tiles: kilobytes on the wire, height x width x
    channels x 8 bytes once decoded. One tile is compressed once and written for all."""
    import zlib

    import tifffile

    side = 256
    tile = zlib.compress(np.zeros((side, side, channels), np.float64).tobytes(), 9)
    count = -(-height // side) * -(-width // side)
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, (tile for _ in range(count)), shape=(height, width, channels), dtype="float64",
        tile=(side, side), photometric=photometric, compression="zlib", planarconfig="contig",
    )  # fmt: skip
    return buf.getvalue()


def peak_rss_growth_mb(fn, pid: int | str = "self") -> tuple[float, object]:
    """(peak RSS of process `pid` above its start, in MB, while `fn()` ran; what `fn`
    returned or raised). Linux: VmHWM is reset through /proc/PID/clear_refs, read after."""

    def status(field: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    start = status("VmRSS:")
    try:
        out = fn()
    except Exception as exc:  # the refusal is the result under test
        out = exc
    return (status("VmHWM:") - start) / 1024, out


@pytest.mark.parametrize(
    ("shape", "photometric", "decoded"),
    [((4990, 4990, 3), "rgb", 597_602_400), ((1300, 1300, 16), "minisblack", 216_320_000)],
)
def test_float64_tiff_bombs_are_refused_from_the_header(shape, photometric, decoded):
    data = tiff_bomb(*shape, photometric)
    assert len(data) < 1_000_000  # small upload, huge image
    grew, out = peak_rss_growth_mb(lambda: decode_image(data, "bomb.tif", MAX_PIXELS, BUDGET))
    assert isinstance(out, DecodeError), out
    assert out.reason.startswith("too large") and f"{decoded:,} bytes" in out.reason
    assert "max_decode_bytes 200,000,000" in out.reason
    assert grew < 64, f"decoding grew RSS by {grew:.0f} MB before refusing"  # was 1,788 MB


def test_more_than_four_samples_refused_before_decoding():
    data = tiff_bomb(64, 64, 16, "minisblack")
    with pytest.raises(DecodeError, match="16 samples per pixel"):
        decode_image(data, "multi.tif", MAX_PIXELS, BUDGET)


def test_png_bomb_header_gets_medrays_limit_not_pils():
    from serving_helpers import png_header

    with pytest.raises(DecodeError) as info:  # PIL alone refuses it above 178,956,970 pixels
        decode_image(png_header(20000, 20000), "bomb.png", MAX_PIXELS, BUDGET)
    assert info.value.reason == "too large: 400,000,000 pixels > max_pixels 25,000,000"
    with pytest.raises(DecodeError, match=r"6000x6000 = 36,000,000 pixels > max_pixels 25,000,"):
        decode_image(png_header(6000, 6000), "big.png", MAX_PIXELS, BUDGET)


def test_budget_counts_channels_and_sample_width_exactly():
    import tifffile

    rgb8 = encode(np.zeros((100, 120, 3), np.uint8), "PNG")  # PIL: 3 channels x 1 byte
    assert decode_image(rgb8, max_bytes=100 * 120 * 3).shape == (100, 120, 3)
    with pytest.raises(DecodeError, match="3 channels x 1 bytes per sample = 36,000 bytes"):
        decode_image(rgb8, max_bytes=100 * 120 * 3 - 1)
    buf = io.BytesIO()  # tifffile: 16-bit RGB, 3 channels x 2 bytes
    tifffile.imwrite(buf, np.ones((50, 60, 3), np.uint16), photometric="rgb")
    assert decode_image(buf.getvalue(), max_bytes=50 * 60 * 6).shape == (50, 60, 3)
    with pytest.raises(DecodeError, match="too large: 60x50 x 3 channels x 2 bytes"):
        decode_image(buf.getvalue(), max_bytes=50 * 60 * 6 - 1)


def test_dicom_budget_read_from_its_header():
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "OT", 4000, 4000, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = b"\0" * 64  # far short of 96 MB: only the header is ever read
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(DecodeError, match="96,000,000 bytes decoded > max_decode_bytes 50,000,000"):
        decode_image(buf.getvalue(), "big.dcm", MAX_PIXELS, 50_000_000)


def test_chunked_scaling_matches_whole_array_scaling(monkeypatch):
    from medray.data import decode

    monkeypatch.setattr(decode, "CHUNK_ELEMENTS", 500)  # many chunks on a small image
    values = np.random.default_rng(3).normal(size=(61, 47, 3)) * 1e3
    values.flat[::37], values.flat[::53] = np.nan, np.inf
    finite = np.isfinite(values)
    lo, hi = values[finite].min(), values[finite].max()
    want = np.rint((np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    assert np.array_equal(decode.scale_to_uint8(values), want)
    assert decode.scale_to_uint8(values.astype(np.float32)[:, :, 0]).shape == (61, 47)
