"""DICOM in: pydicom's own test objects (transfer syntaxes from native to JPEG, JPEG-LS,
JPEG 2000 and RLE; CR MONOCHROME1; multi-frame CT and MR), DICOM files written here from the
shared real chest X-rays, and the objects an archive also holds (SR, RT plans, presentation
states, truncated files), through the decoder and `medray data import dicom`."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, skip_or_fail
from typer.testing import CliRunner

from medray.cli import app
from medray.data import DecodeError, decode_image, read_image, read_manifest, read_quarantine
from medray.data.dicom import frame_indices, is_dicom, salted_patient

XRAYS = REPO.parent / "shared" / "data" / "pneumoniamnist-trainval" / "pneumoniamnist_trainval.npz"
MR_SYNTAXES = ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
               "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]  # fmt: skip


def bundled(name: str) -> Path:
    """A pydicom test file; the larger ones come from the pydicom-data package (dev extra),
    never from the network."""
    from pydicom.data import get_testdata_file

    if importlib.util.find_spec("data_store") is None:
        skip_or_fail("pydicom-data is not installed (pip install -e '.[dev]')")
    return Path(get_testdata_file(name))


@pytest.fixture(scope="module")
def xrays() -> tuple[np.ndarray, np.ndarray]:
    """Eight real 28 x 28 chest X-rays (4 normal, 4 pneumonia) and their labels."""
    if not XRAYS.is_file():
        skip_or_fail(f"PneumoniaMNIST train/val not found at {XRAYS} (it lives in ../shared/data)")
    with np.load(XRAYS) as npz:
        images, labels = npz["val_images"], npz["val_labels"].ravel()
    pick = np.concatenate([np.flatnonzero(labels == 0)[:4], np.flatnonzero(labels == 1)[:4]])
    return images[pick], labels[pick]


def write_xray(path: Path, gray: np.ndarray, patient: str, *, variant: str = "native") -> str:
    """A CR object holding `gray` (uint8); `variant` native, rle, or mono1-12bit (stored
    inverted as 12 bits with a rescale and a window that map it back to `gray` exactly).
    Returns its SOP Instance UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        ExplicitVRLittleEndian,
        RLELossless,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        ComputedRadiographyImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.PatientID = "CR", "PA", patient
    ds.PatientName, ds.PatientBirthDate, ds.AccessionNumber = "Doe^Jane", "19700101", f"A{patient}"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    stored = gray
    if variant == "mono1-12bit":  # value = 0.5 * stored - 100; window -> 255 - gray; inverted
        stored = ((255 - gray.astype(np.uint16)) * 16).astype(np.uint16)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -100
        ds.WindowCenter, ds.WindowWidth = 920.5, 2041  # LINEAR: values -100..1940 -> 0..255
    ds.PixelData = stored.tobytes()
    if variant == "rle":
        ds.compress(RLELossless)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def copy_with_new_uid(name: str, dest: Path) -> None:
    """A bundled object under a fresh SOP Instance UID (pydicom's files share UIDs between the
    transfer-syntax variants of one image; an archive holds distinct instances)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(bundled(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest)


def write_presentation_state(path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    gsps = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = gsps, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = gsps, meta.MediaStorageSOPInstanceUID, "PR"
    ds.save_as(path, enforce_file_format=True)


def invoke(*args: str):
    out = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    return out, " ".join(out.output.split())


# ---------------------------------------------------------------- the decoder


def test_transfer_syntaxes_decode_to_the_same_image():
    reference = decode_image(bundled("MR_small.dcm").read_bytes())
    assert reference.shape == (64, 64, 3) and reference.dtype == np.uint8
    for name in MR_SYNTAXES[1:]:
        assert np.array_equal(decode_image(bundled(name).read_bytes(), name), reference), name
    lossless, uncompressed = (decode_image(bundled(n).read_bytes()) for n in
                              ("US1_J2KR.dcm", "US1_UNCR.dcm"))  # fmt: skip
    assert np.array_equal(lossless, uncompressed)  # YBR_RCT JPEG 2000 -> the RGB original
    rgb = decode_image(bundled("SC_rgb.dcm").read_bytes()).astype(int)
    for name in ("SC_rgb_rle.dcm", "SC_rgb_gdcm_KY.dcm", "SC_rgb_jpeg_gdcm.dcm",
                 "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"):  # fmt: skip
        out = decode_image(bundled(name).read_bytes(), name)  # RLE, J2K, JPEG lossless, lossy
        assert np.abs(out - rgb).mean() < 3, name  # lossy YBR 4:2:2 JPEG: 2.8 grey levels
    for name in ("JPGExtended.dcm", "693_J2KI.dcm", "JPEG-LL.dcm"):  # 12-bit JPEG, lossy J2K
        out = decode_image(bundled(name).read_bytes(), name)
        assert out.shape[2] == 3 and out.std() > 5, name


def test_rescale_window_and_monochrome1_give_back_the_xray(xrays, tmp_path):
    gray = xrays[0][0]
    for variant in ("native", "rle", "mono1-12bit"):
        path = tmp_path / f"{variant}.dcm"
        write_xray(path, gray, "P1", variant=variant)
        out = read_image(str(path))
        assert out.shape == (28, 28, 3) and np.array_equal(out[..., 0], gray), variant


def test_cr_monochrome1_is_inverted_and_windowed():
    import pydicom

    from medray.data.dicom import dataset_to_rgb8

    ds = pydicom.dcmread(bundled("RG1_UNCR.dcm"))  # chest CR, MONOCHROME1, window 15000/30000
    shown = dataset_to_rgb8(ds, "RG1", 10**8)[..., 0].astype(int)
    ds.PhotometricInterpretation = "MONOCHROME2"
    assert np.array_equal(shown, 255 - dataset_to_rgb8(ds, "RG1", 10**8)[..., 0])
    rows, cols = shown.shape
    lung = shown[rows // 3 : rows // 2, cols // 5 : cols // 3].mean()
    spine = shown[rows // 3 : rows // 2, cols // 2 - 40 : cols // 2 + 40].mean()
    assert spine > lung + 20  # bone bright, aerated lung dark: the way a reader sees it


def test_voi_lut_sequence_and_modality_lut_are_applied():
    for name in ("vlut_04.dcm", "mlut_18.dcm"):
        out = decode_image(bundled(name).read_bytes(), name)
        assert out.shape == (512, 512, 3) and out.min() == 0 and out.max() == 255, name


def test_multi_frame_objects_read_one_frame_each():
    import pydicom
    from pydicom.pixels import pixel_array

    assert frame_indices(10, "first") == [0] and frame_indices(10, "middle") == [5]
    assert frame_indices(3, "every") == [0, 1, 2] and frame_indices(1, "middle") == [0]
    mr = bundled("emri_small.dcm")  # MR, 10 frames
    frames = pixel_array(pydicom.dcmread(mr))
    outs = [read_image(f"{mr}#frame={i}")[..., 0] for i in (0, 5, 9)]
    for i, out in zip((0, 5, 9), outs):
        assert np.corrcoef(out.ravel(), frames[i].ravel())[0, 1] > 0.99
    assert not np.array_equal(outs[0], outs[2])
    assert np.array_equal(decode_image(mr.read_bytes()), read_image(f"{mr}#frame=5"))
    ct = bundled("eCT_Supplemental.dcm")  # enhanced CT, 2 frames
    assert read_image(f"{ct}#frame=1").shape == (512, 512, 3)
    with pytest.raises(DecodeError, match="frame 10 does not exist"):
        read_image(f"{mr}#frame=10")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("test-SR.dcm", "not an image: Comprehensive SR Storage"),
        ("rtplan.dcm", "not an image: RT Plan Storage"),
        ("rtdose.dcm", "not an image: a radiotherapy dose grid"),
        ("liver_1frame.dcm", "not an image: a segmentation"),
        ("MR_truncated.dcm", "truncated: pixel data has 8130 of 8192 bytes"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "truncated: Enhanced MR Image Storage"),
    ],
)
def test_refused_objects_say_why(name, reason):
    with pytest.raises(DecodeError) as err:
        decode_image(bundled(name).read_bytes(), name)
    assert err.value.reason.startswith(reason), err.value.reason


def test_dicom_is_recognised_by_content():
    data = bundled("MR_truncated.dcm").read_bytes()
    assert data[:4] == b"II*\x00" and is_dicom(data)  # a TIFF header in the preamble
    assert is_dicom(bundled("rtstruct.dcm").read_bytes())  # no preamble, no meta
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + bytes(200))
    cut = bundled("RG3_J2KI.dcm").read_bytes()
    with pytest.raises(DecodeError, match="truncated: Computed Radiography Image Storage"):
        decode_image(cut[: len(cut) // 2])


def test_salted_patient_hash():
    assert salted_patient("123", "s") == salted_patient("123", "s") != salted_patient("123", "t")
    assert len(salted_patient("123", "s")) == 16 and "123" not in salted_patient("123", "s")


# ---------------------------------------------------------------- import


@pytest.fixture
def archive(tmp_path, xrays) -> Path:
    """A folder as a PACS export looks: CT, MR, CR (native, RLE, JPEG, JPEG-LS, JPEG 2000),
    a multi-frame MR, real X-rays written here, and 6 objects that are not usable images."""
    src = tmp_path / "archive"
    for sub, name in [("ct", "CT_small.dcm"), ("ct", "693_J2KI.dcm"), ("cr", "RG3_J2KI.dcm"),
                      ("sc", "SC_rgb_jpeg_dcmtk.dcm"), ("mr", "emri_small.dcm"),
                      *[("mr", n) for n in MR_SYNTAXES]]:  # fmt: skip
        copy_with_new_uid(name, src / sub / name)
    images, _ = xrays
    for i, variant in enumerate(["native", "rle", "mono1-12bit"] * 2):
        write_xray(src / "xr" / f"p{i // 2}" / f"{variant}{i}.dcm", images[i], f"P{i // 2}",
                   variant=variant)  # fmt: skip
    bad = src / "other"
    bad.mkdir()
    for name in ("test-SR.dcm", "rtplan.dcm", "MR_truncated.dcm"):
        shutil.copy(bundled(name), bad / name)
    write_presentation_state(bad / "gsps.dcm")
    whole = (src / "mr" / "MR_small_jp2klossless.dcm").read_bytes()
    (bad / "cut.dcm").write_bytes(whole[: len(whole) // 2])
    (bad / "DICOMDIR.txt").write_text("not a DICOM file\n")
    return src


def test_archive_imports_every_image_and_quarantines_each_bad_file(archive, tmp_path):
    """Acceptance: CT/MR/CR, compressed and not, an SR, a truncated file: the import completes,
    every image is kept, each bad file is quarantined with its reason."""
    wd = str(tmp_path / "wd")
    out, text = invoke("data", "import", "dicom", str(archive), "--workdir", wd)
    assert out.exit_code == 0, out.output
    assert "read 23, kept 17, quarantined 6" in text
    frame, quarantine = read_manifest(wd), read_quarantine(wd)
    assert sorted(frame["modality"].value_counts().items()) == [
        ("CR", 7), ("CT", 2), ("MR", 7), ("OT", 1)]  # fmt: skip
    reasons = dict(zip(quarantine["uri"].map(lambda u: Path(u).name), quarantine["reason"]))
    assert reasons["test-SR.dcm"].startswith("not an image: Comprehensive SR Storage")
    assert reasons["rtplan.dcm"].startswith("not an image: RT Plan Storage")
    assert reasons["gsps.dcm"].startswith("not an image: Grayscale Softcopy Presentation State")
    assert reasons["MR_truncated.dcm"].startswith("truncated: pixel data has")
    assert reasons["cut.dcm"].startswith("truncated: MR Image Storage")
    assert reasons["DICOMDIR.txt"].startswith("not a DICOM file")
    columns = {"study_uid", "series_uid", "sop_uid", "modality", "view_position", "frame"}
    assert columns <= set(frame.columns) and frame["sop_uid"].is_unique
    assert "PatientName" not in frame.columns and "accession" not in frame.columns
    multi = frame[frame["uri"].str.contains("emri_small")]
    assert multi["uri"].tolist()[0].endswith("emri_small.dcm#frame=5")
    xr = frame[frame["uri"].str.contains("/xr/")]
    assert xr.groupby("patient_id")["split"].nunique().max() == 1  # a patient in one split
    assert set(xr["view_position"]) == {"PA"} and set(xr["patient_id"]) == {"P0", "P1", "P2"}
    for uri in frame["uri"]:
        assert read_image(uri).dtype == np.uint8  # what embed and pretrain will read

    salted = str(tmp_path / "salted")
    out, text = invoke("data", "import", "dicom", str(archive), "--workdir", salted,
                       "--frames", "every", "--patient-salt", "s3cret")  # fmt: skip
    assert out.exit_code == 0 and "kept 26" in text, out.output  # 10 frames of emri_small
    manifest_bytes = (Path(salted) / "data" / "manifest.parquet").read_bytes()
    assert b"P1" not in manifest_bytes and b"Doe" not in manifest_bytes
    assert read_manifest(salted)["patient_id"].str.fullmatch(r"[0-9a-f]{16}").sum() >= 6


def test_labels_join_on_sop_uid_and_path_with_chexpert_policy(xrays, tmp_path):
    images, labels = xrays
    src = tmp_path / "xr"
    uids = [write_xray(src / f"x{i}.dcm", images[i], f"P{i}") for i in range(8)]
    codes = ["1" if y else "0" for y in labels]
    codes[1], codes[2] = "-1", ""
    table = pd.DataFrame({"SOPInstanceUID": uids[:7], "Pneumonia": codes[:7]})
    table.to_csv(tmp_path / "labels.csv", index=False)
    wd = str(tmp_path / "wd")
    args = ("data", "import", "dicom", str(src), "--workdir", wd, "--labels",
            str(tmp_path / "labels.csv"), "-l", "Pneumonia")  # fmt: skip
    out, text = invoke(*args)
    assert out.exit_code == 0 and "read 8, kept 7, quarantined 1" in text, out.output
    frame = read_manifest(wd).set_index("sop_uid")
    assert frame.loc[uids[1], "uncertain_labels"] == ["Pneumonia"]  # -1, policy ignore
    assert frame.loc[uids[2], "labels"] == [] and frame.loc[uids[5], "labels"] == ["Pneumonia"]
    assert "no row in" in read_quarantine(wd)["reason"].iloc[0]
    out, _ = invoke(*args, "--uncertain", "ones")
    assert read_manifest(wd).set_index("sop_uid").loc[uids[1], "labels"] == ["Pneumonia"]

    names = pd.DataFrame({"file": [f"x{i}.dcm" for i in range(8)],
                          "finding": ["pneumonia" if y else "normal" for y in labels]})  # fmt: skip
    names.to_csv(tmp_path / "classes.csv", index=False)
    out, text = invoke("data", "import", "dicom", str(src), "--workdir", wd, "--labels",
                       str(tmp_path / "classes.csv"), "--on", "path", "--key-column", "file",
                       "-l", "finding")  # fmt: skip
    assert out.exit_code == 0 and "kept 8" in text and "label_counts.normal │ 4 " in text, (
        out.output
    )
    shutil.copy(src / "x0.dcm", src / "x0_again.dcm")  # the same instance twice
    out, text = invoke("data", "import", "dicom", str(src), "--workdir", wd)
    assert out.exit_code == 0 and "kept 8, quarantined 1" in text, out.output
    assert read_quarantine(wd)["reason"].iloc[0].startswith("duplicate SOP Instance UID")


@pytest.mark.integration
def test_s3_prefix_imports_and_reads_back(xrays, s3_bucket, tmp_path):
    import os

    import boto3

    images, _ = xrays
    write_xray(tmp_path / "a.dcm", images[0], "P1", variant="rle")
    shutil.copy(bundled("test-SR.dcm"), tmp_path / "sr.dcm")
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = s3_bucket.removeprefix("s3://")
    for name in ("a.dcm", "sr.dcm"):
        s3.upload_file(str(tmp_path / name), bucket, f"pacs/study/{name}")
    wd = str(tmp_path / "wd")
    out, text = invoke("data", "import", "dicom", f"{s3_bucket}/pacs", "--workdir", wd)
    assert out.exit_code == 0 and "read 2, kept 1, quarantined 1" in text, out.output
    uri = read_manifest(wd)["uri"].iloc[0]
    assert uri == f"{s3_bucket}/pacs/study/a.dcm"
    assert np.array_equal(read_image(uri)[..., 0], images[0])
