"""`medray data ...` from the command line: counts printed, errors as one line naming the cause."""

from __future__ import annotations

import re

from test_importers import kather_copy_with_bad_files, write_trainval_npz
from typer.testing import CliRunner

from medray.cli import app
from medray.data import read_manifest


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_import_folder_acceptance(kather_dir, tmp_path):
    wd = str(tmp_path / "wd")
    out = invoke("data", "import", "folder", str(kather_dir), "--workdir", wd)
    assert out.exit_code == 0, out.output
    assert "read 24, kept 24, quarantined 0" in out.output
    src = kather_copy_with_bad_files(kather_dir, tmp_path)
    out = invoke("data", "import", "folder", str(src), "--workdir", wd)
    assert out.exit_code == 0 and "read 27, kept 24, quarantined 3" in out.output, out.output
    assert "empty file" in out.output and len(read_manifest(wd)) == 24


def test_synth_and_show(tmp_path):
    wd = str(tmp_path / "wd")
    out = invoke("data", "synth", "--workdir", wd, "--n", "30", "--size", "48", "--multi-label")
    assert out.exit_code == 0 and "kept 30" in out.output, out.output
    out = invoke("data", "show", "--workdir", wd)
    assert out.exit_code == 0 and "synth:multi-label" in out.output


def test_bad_override_and_missing_source_name_the_cause(tmp_path):
    out = invoke("data", "synth", "--workdir", str(tmp_path), "splits.trian=0.5")
    assert out.exit_code == 2 and "splits.trian" in out.output, out.output
    out = invoke("data", "import", "folder", str(tmp_path / "nope"), "--workdir", str(tmp_path))
    assert out.exit_code == 2 and "nope: folder not found" in out.output, out.output


def splits_of(output: str) -> dict[str, str]:
    """The split_counts.<split> rows of a printed result table."""
    found = re.findall(r"split_counts\.(\w+)\s*│\s*(\d+)", output) or re.findall(
        r"splits\.(\w+)\s*│\s*(\d+)", output
    )
    return dict(found)


def test_import_npz_without_test_split_reports_val_as_test(tmp_path):
    source = write_trainval_npz(tmp_path / "tv.npz", n_train=80, n_val=20)
    wd = str(tmp_path / "wd")
    args = ("data", "import", "npz", source, "--workdir", wd, "--label-names", "normal,pneumonia")
    out = invoke(*args, "splits.rename.val=test", "splits.carve_val=0.15")
    assert out.exit_code == 0, out.output
    assert splits_of(out.output) == {"train": "68", "val": "12", "test": "20"}
    assert "test = source val; val = 0.15 of train, stratified, seed 0" in out.output
    out = invoke("data", "show", "--workdir", wd)
    assert out.exit_code == 0 and splits_of(out.output) == {
        "train": "68",
        "val": "12",
        "test": "20",
    }
    assert set(read_manifest(wd)["split"]) == {"train", "val", "test"}
    out = invoke(*args, "splits.carve_val=0.15")
    assert out.exit_code == 2 and "splits.carve_val=0.15: there is already a val split" in (
        " ".join(out.output.split())
    ), out.output
    out = invoke(*args, "splits.rename.val=train")
    assert out.exit_code == 2 and "splits.rename.val=train: the source already has a 'train'" in (
        " ".join(out.output.split())
    ), out.output
    out = invoke("data", "synth", "--workdir", wd, "--n", "10", "splits.carve_val=0.2")
    assert out.exit_code == 2 and "splits.carve_val" in out.output, out.output
