"""Loading an index for serving: the memory-mapped index searches exactly like a read one,
the Arrow gallery's id -> row lookup (present, missing, hash collision), and an index
directory of the older format (gallery.parquet) still loads. No Ray, small data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from medray import storage
from medray.index import GALLERY_FILE, META_FILE, skip_polysemous, write_index
from medray.index import gallery as G
from medray.index.load import load_index


def write_small(out, n: int = 600, dim: int = 16, factory: str = "Flat") -> np.ndarray:
    import faiss

    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    skip_polysemous(index)
    index.train(x)
    index.add(x)
    rows = pd.DataFrame({"id": [f"img{i}" for i in range(n)], "uri": [f"/d/{i}.png" for i in range(n)],
                         "labels": [[f"c{i % 3}"] for i in range(n)],
                         "split": [("train", "test")[i % 2] for i in range(n)]})  # fmt: skip
    meta = {"backbone_id": "b-0", "dim": dim, "count": n, "metric": "ip", "factory": factory,
            "search_params": {"nprobe": 4} if factory.startswith("IVF") else {}}  # fmt: skip
    write_index(str(out), index, rows, meta)
    return x


@pytest.mark.parametrize("factory", ["Flat", "IVF8,PQ4x4,Refine(SQ8)"])
def test_mmap_load_searches_like_a_normal_load(tmp_path, factory):
    x = write_small(tmp_path, factory=factory)
    read, mapped = load_index(str(tmp_path)), load_index(str(tmp_path), mmap=True)
    for allowed in (None, np.arange(0, 600, 2)):
        a, b = read.search(x[:20], 5, allowed), mapped.search(x[:20], 5, allowed)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(read.vectors([3, 7]), mapped.vectors([3, 7]))


def test_arrow_gallery_rows_columns_and_id_lookup(tmp_path, monkeypatch):
    write_small(tmp_path)
    gi = load_index(str(tmp_path), mmap=True)
    assert json.loads((tmp_path / META_FILE).read_text())["files"].keys() == {
        "index.faiss", GALLERY_FILE}  # fmt: skip
    assert len(gi) == 600 and gi.ids()[:2].tolist() == ["img0", "img1"]
    assert gi.row(5) == {"id": "img5", "uri": "/d/5.png", "labels": ["c2"], "split": "test"}
    assert [r["id"] for r in gi.rows([9, 2])] == ["img9", "img2"]
    assert (gi.column("split") == "train").sum() == 300
    assert gi.find("img599") == 599 and gi.find("img0") == 0 and gi.find("img600") is None
    with pytest.raises(KeyError, match="no gallery column 'nope'"):
        gi.column("nope")
    # Every id hashing alike: the lookup still returns the row whose id string matches.
    monkeypatch.setattr(G, "id_hash", lambda image_id: 7)
    same = G.Gallery(gi.gallery.table.drop_columns(["id_hash"]))
    assert same.find("img42") == 42 and same.find("img600") is None


def test_an_index_dir_with_only_gallery_parquet_still_loads(tmp_path):
    """The format before gallery.arrow: index.faiss + gallery.parquet listed in index.json."""
    x = write_small(tmp_path)
    new = load_index(str(tmp_path))
    old_rows = new.gallery.table.drop_columns(["id_hash"])
    pq.write_table(old_rows, tmp_path / "gallery.parquet")
    (tmp_path / GALLERY_FILE).unlink()
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["files"] = {"index.faiss": meta["files"]["index.faiss"],
                     "gallery.parquet": storage.sha256(str(tmp_path / "gallery.parquet"))}  # fmt: skip
    meta.pop("search_params")
    meta["nprobe"] = 1
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    old = load_index(str(tmp_path), mmap=True)
    np.testing.assert_array_equal(old.search(x[:5], 3)[1], new.search(x[:5], 3)[1])
    assert old.row(5) == new.row(5) and old.find("img33") == 33 and old.find("x") is None
