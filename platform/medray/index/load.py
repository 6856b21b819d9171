"""Loading an index directory written by `medray run index`: verify, then search.

What serving's Retriever and `medray run evaluate` read; the stage itself is medray.index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from medray import storage
from medray.index import (
    GALLERY_FILE,
    INDEX_FILE,
    META_FILE,
    IndexMismatch,
    is_refine,
    ivf_nlist,
    set_nprobe,
)


@dataclass
class GalleryIndex:
    """A verified index and its gallery table (row i = vector i)."""

    index: object
    gallery: pd.DataFrame
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of gallery `rows` (exact for Flat, decoded for compressed indexes)."""
        import faiss

        rows = np.ascontiguousarray(np.asarray(rows, dtype=np.int64).reshape(-1))
        try:
            return self.index.reconstruct_batch(rows)
        except RuntimeError:  # IVF lists keep no id -> position map until asked to
            faiss.extract_index_ivf(self.index).make_direct_map()
            return self.index.reconstruct_batch(rows)

    def search(
        self, q: np.ndarray, k: int, allowed_rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (Q,k), rows (Q,k)) by inner product; rows -1 where fewer exist.
        `allowed_rows` restricts the search to those gallery rows (e.g. the train split)."""
        import faiss

        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise IndexMismatch(f"query dim {q.shape[1]} != index dim {self.dim}")
        if allowed_rows is None:
            return self.index.search(q, k)
        sel = faiss.IDSelectorBatch(np.asarray(allowed_rows, dtype=np.int64))
        nprobe = int(self.meta.get("nprobe", 1))
        if ivf_nlist(self.index) is not None:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        else:
            params = faiss.SearchParameters(sel=sel)
        if is_refine(self.index):
            params = faiss.IndexRefineSearchParameters(
                k_factor=float(self.index.k_factor), base_index_params=params
            )
        return self.index.search(q, k, params=params)


def load_index(
    index_dir: str, expect_dim: int | None = None, expect_backbone_id: str | None = None
) -> GalleryIndex:
    """Load and verify an index directory: every file's sha256, the dimension, the backbone id
    and the row count. Raises IndexMismatch naming what does not match."""
    import faiss

    meta_uri = storage.join(index_dir, META_FILE)
    if not storage.exists(meta_uri):
        if storage.listdir(index_dir):
            raise FileNotFoundError(
                f"{meta_uri}: missing: an incomplete index (a build was interrupted before "
                f"{META_FILE}, written last); run `medray run index` again"
            )
        raise FileNotFoundError(f"{meta_uri}: no index here; run `medray run index` first")
    meta = storage.read_json(meta_uri)
    if expect_backbone_id is not None and meta.get("backbone_id") != expect_backbone_id:
        raise IndexMismatch(
            f"{index_dir}: backbone mismatch: index built from {meta.get('backbone_id')}, "
            f"expected {expect_backbone_id}"
        )
    if expect_dim is not None and int(meta["dim"]) != int(expect_dim):
        raise IndexMismatch(
            f"{index_dir}: dim mismatch: index has dim {meta['dim']}, the backbone gives {expect_dim}"
        )
    blobs = {}
    for name, want in meta["files"].items():
        blobs[name] = storage.read_bytes(storage.join(index_dir, name))
        got = storage.sha256_bytes(blobs[name])
        if got != want:
            raise IndexMismatch(
                f"{storage.join(index_dir, name)}: altered file: sha256 {got[:12]}... "
                f"!= {want[:12]}... recorded in {META_FILE}"
            )
    index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_FILE], dtype=np.uint8))
    if index.d != int(meta["dim"]):
        raise IndexMismatch(
            f"{index_dir}: dim mismatch: file has {index.d}, {META_FILE} {meta['dim']}"
        )
    gallery = storage.read_table(storage.join(index_dir, GALLERY_FILE)).to_pandas()
    gallery["labels"] = [list(v) if v is not None else [] for v in gallery["labels"]]
    if not (index.ntotal == len(gallery) == int(meta["count"])):
        raise IndexMismatch(
            f"{index_dir}: count mismatch: index {index.ntotal}, gallery {len(gallery)}, "
            f"{META_FILE} {meta['count']}"
        )
    set_nprobe(index, int(meta.get("nprobe", 1)))
    return GalleryIndex(index=index, gallery=gallery, meta=meta)
