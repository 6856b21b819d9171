"""Importers: folder per class (the real Kather tiles), CSV findings, npz arrays; bad files are
quarantined with a reason and never silently dropped; a source's own splits are kept, renamed
and val carved from train on request."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medray.data import (
    DataConfig,
    SplitConfig,
    import_csv,
    import_folder,
    import_npz,
    read_dataset_info,
    read_manifest,
    read_quarantine,
)


def kather_copy_with_bad_files(kather_dir, tmp_path):
    src = tmp_path / "kather"
    shutil.copytree(kather_dir, src)
    (src / "01_TUMOR" / "empty.tif").write_bytes(b"")
    (src / "02_STROMA" / "random.png").write_bytes(np.random.default_rng(0).bytes(2048))
    good = next((src / "03_COMPLEX").glob("*.tif")).read_bytes()
    (src / "03_COMPLEX" / "truncated.tif").write_bytes(good[: len(good) // 3])
    return src


def test_kather_folder_with_three_bad_files(kather_dir, tmp_path):
    src = kather_copy_with_bad_files(kather_dir, tmp_path)
    cfg = DataConfig(workdir=str(tmp_path / "wd"))
    result = import_folder(str(src), cfg)
    frame = read_manifest(cfg.workdir)
    quarantine = read_quarantine(cfg.workdir)
    assert (result.read, result.kept, result.quarantined) == (27, 24, 3)
    assert len(frame) == 24 and frame["labels"].map(tuple).nunique() == 8
    assert sorted(p.rsplit("/", 1)[1] for p in quarantine["uri"]) == [
        "empty.tif", "random.png", "truncated.tif"]  # fmt: skip
    assert quarantine["reason"].str.len().min() > 5 and (quarantine["stage"] == "import").all()
    assert set(frame["split"]) == {"train", "val", "test"}


def write_png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def test_csv_findings_with_uncertainty_policies(tmp_path):
    for i in range(12):
        write_png(tmp_path / "img" / f"{i}.png", i)
    rows = [{"path": f"img/{i}.png", "Edema": ["1", "0", "-1", ""][i % 4],
             "Effusion": ["", "1", "1", "-1"][i % 4], "pid": f"p{i // 3}"} for i in range(12)]  # fmt: skip
    rows.append({"path": "img/missing.png", "Edema": "1", "Effusion": "", "pid": "p9"})
    pd.DataFrame(rows).to_csv(tmp_path / "table.csv", index=False)
    outs = {}
    for policy in ("ones", "zeros", "ignore"):
        cfg = DataConfig(workdir=str(tmp_path / policy))
        result = import_csv(str(tmp_path / "table.csv"), cfg, "path", ["Edema", "Effusion"],
                            patient_column="pid", uncertain=policy)  # fmt: skip
        assert result.kept == 12 and result.quarantined == 1 and result.multi_label
        outs[policy] = read_manifest(cfg.workdir).set_index("uri")
    third = str((tmp_path / "img" / "2.png").resolve())
    assert outs["ones"].loc[third, "labels"] == ["Edema", "Effusion"]
    assert outs["zeros"].loc[third, "labels"] == ["Effusion"]
    assert outs["ignore"].loc[third, "uncertain_labels"] == ["Edema"]
    frame = outs["ignore"]
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    assert "file not found" in read_quarantine(str(tmp_path / "ones"))["reason"].iloc[0]


def test_csv_missing_column_names_it(tmp_path):
    pd.DataFrame({"path": ["a.png"], "x": ["1"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match="column 'Edema' not found"):
        import_csv(str(tmp_path / "t.csv"), DataConfig(workdir=str(tmp_path)), "path", ["Edema"])


def test_npz_medmnist_style(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 5), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 3, (n, 1))
    np.savez(tmp_path / "mnist.npz", **arrays)
    cfg = DataConfig(workdir=str(tmp_path / "wd"))
    result = import_npz(str(tmp_path / "mnist.npz"), cfg, label_names=["a", "b", "c"])
    frame = read_manifest(cfg.workdir)
    assert result.kept == 30 and result.split_counts == {"train": 20, "val": 5, "test": 5}
    assert set(frame["labels"].map(tuple)) <= {("a",), ("b",), ("c",)}
    assert Image.open(frame["uri"].iloc[0]).size == (28, 28)


def test_npz_refuses_other_files_and_wrong_label_names(tmp_path):
    cfg = DataConfig(workdir=str(tmp_path / "wd"))
    (tmp_path / "README.md").write_text("# not arrays\n")
    with pytest.raises(
        ValueError, match=r"README.md: not an .npz file \(it looks like a text"
    ) as e:
        import_npz(str(tmp_path / "README.md"), cfg)
    assert "pickle" not in str(e.value)  # never NumPy's advice to load pickles
    np.save(tmp_path / "one.npy", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="a single .npy array"):
        import_npz(str(tmp_path / "one.npy"), cfg)
    source = write_trainval_npz(tmp_path / "tv.npz", n_train=8, n_val=4)
    with pytest.raises(ValueError, match=r"3 names given .* has 2 classes \(labels 0..1\)"):
        import_npz(source, cfg, label_names=["normal", "pneumonia", "other"])
    with pytest.raises(ValueError, match="give exactly 2"):
        import_npz(source, cfg, label_names=["normal"])


def write_trainval_npz(path, n_train=60, n_val=20, seed=0):
    """A MedMNIST-style file with train and val only, 3 in 4 labelled 1 (like the shared
    PneumoniaMNIST: 0 normal, 1 pneumonia)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 4 != 0).astype(np.uint8).reshape(n, 1)
    np.savez(path, **arrays)
    return str(path)


def test_npz_val_reported_as_test_and_val_carved_from_train(tmp_path):
    source = write_trainval_npz(tmp_path / "tv.npz")
    splits = SplitConfig(rename={"val": "test"}, carve_val=0.25)
    cfg = DataConfig(workdir=str(tmp_path / "wd"), splits=splits)
    result = import_npz(source, cfg, label_names=["normal", "pneumonia"])
    assert result.split_counts == {"train": 45, "val": 15, "test": 20}
    frame = read_manifest(cfg.workdir)
    from_val = frame["uri"].str.contains("/npz/val/")
    assert (frame["split"][from_val] == "test").all() and from_val.sum() == 20
    carved = Counter(labs[0] for labs in frame["labels"][frame["split"] == "val"])
    assert carved == {"normal": 4, "pneumonia": 11}  # 0.25 of train's 15 normal and 45 pneumonia
    assert "test = source val; val = 0.25 of train" in read_dataset_info(cfg.workdir)["source"]
    with pytest.raises(ValueError, match=r"splits.carve_val=0.25: there is already a val split"):
        import_npz(source, DataConfig(workdir=cfg.workdir, splits=SplitConfig(carve_val=0.25)))


def test_csv_split_column_with_carve_and_folder_refuses(tmp_path):
    for i in range(24):
        write_png(tmp_path / "img" / f"{i}.png", i)
    rows = [{"path": f"img/{i}.png", "cls": "ab"[i % 2], "pid": f"p{i // 2}",
             "split": "train" if i < 18 else "valid"} for i in range(24)]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    splits = SplitConfig(rename={"val": "test"}, carve_val=0.34)
    cfg = DataConfig(workdir=str(tmp_path / "wd"), splits=splits)
    result = import_csv(str(tmp_path / "t.csv"), cfg, "path", ["cls"], patient_column="pid",
                        split_column="split")  # fmt: skip
    assert result.split_counts["test"] == 6 and result.split_counts["val"] > 0
    frame = read_manifest(cfg.workdir)
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    for i in range(4):
        write_png(tmp_path / "folder" / "ab"[i % 2] / f"{i}.png", i)
    with pytest.raises(ValueError, match=r"splits.rename.val=test.*only for a source with its own"):
        import_folder(str(tmp_path / "folder"), cfg)
