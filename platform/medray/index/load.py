"""Loading an index directory written by `medray run index`: verify, then search.

What serving's Retriever and `medray run evaluate` read; the stage itself is medray.index.
Files are checksummed by streaming them (never held whole in memory). An index on S3 is
downloaded once into a local cache (`$MEDRAY_CACHE_DIR`, default `<tmp>/medray-cache-<uid>`)
and reused while its checksums hold. With `mmap=True` (serving) the FAISS file is opened
memory-mapped with `faiss.IO_FLAG_MMAP_IFC`: the codes of Flat, SQ, PQ, Refine and HNSW
indexes and IVF lists become views of the file (checked with FAISS 1.15; `IO_FLAG_MMAP`
maps only IVF lists and copies the rest: 1.35 GB of anonymous memory for a 1.26 GB
`IVF,PQ..x4fs,Refine(SQ8)` file), so replicas on one node share its pages. The Arrow gallery
is always memory-mapped. A memory-mapped index is read-only: adding vectors to it aborts the
process (a FAISS assertion), so whatever modifies a loaded index (`mode=append`) keeps the
default `mmap=False`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from medray import storage
from medray.index import (
    GALLERY_FILE,
    INDEX_FILE,
    META_FILE,
    IndexMismatch,
)
from medray.index.gallery import Gallery, GalleryRows

LEGACY_GALLERY_FILE = "gallery.parquet"
"""What index directories held before the Arrow gallery; still loaded (into memory)."""
CACHE_ENV = "MEDRAY_CACHE_DIR"


@dataclass
class GalleryIndex(GalleryRows):
    """A verified index and its gallery (row i = vector i)."""

    index: object
    gallery: Gallery | None
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return len(self.gallery) if self.gallery is not None else int(self.index.ntotal)

    def find(self, image_id: str) -> int | None:
        """Gallery row of `image_id`, None when absent."""
        return self.gallery.find(image_id)

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
        from medray.index.tune import search_parameters

        params = search_parameters(self.index, {}, sel)  # the index's own tuned settings
        return self.index.search(q, k, params=params)


# ---------------------------------------------------------------- local, verified files


def cache_dir(source: str) -> str:
    """The local cache directory for files of the remote directory `source`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        tempfile.gettempdir(), f"medray-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"
    )
    return os.path.join(root, hashlib.sha256(source.encode()).hexdigest()[:20])


def _download(uri: str, dest: str) -> str:
    """Stream `uri` (S3) to `dest` (temp file + rename); its sha256, computed on the way."""
    bucket, key = storage.split_s3(uri)
    os.makedirs(os.path.dirname(dest), exist_ok=True)

    def once() -> str:
        digest = hashlib.sha256()
        body = storage.s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".dl-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in body.iter_chunks(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return digest.hexdigest()

    return storage.retrying(f"download {uri}", once)


def local_verified(base: str, rel: str, want: str) -> tuple[str, str]:
    """(local path, sha256) of file `rel` of directory `base`, the checksum streamed from the
    file. Local: the file itself. S3: a copy in `cache_dir(base)`, downloaded only when the
    cached one is missing or does not hash to `want`. The caller compares with `want`."""
    uri = storage.join(base, *rel.split("/"))
    if not storage.is_s3(base):
        if not os.path.isfile(uri):
            raise FileNotFoundError(f"{uri}: missing")
        return uri, storage.sha256(uri)
    dest = os.path.join(cache_dir(base), *rel.split("/"))
    if os.path.isfile(dest):
        got = storage.sha256(dest)
        if got == want:
            return dest, got
    return dest, _download(uri, dest)


def read_faiss(path: str, mmap: bool):
    """A FAISS index file, memory-mapped when asked and the type allows it (else read)."""
    import faiss

    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError:  # a type without mmap support: read it into memory
            pass
    return faiss.read_index(path)


# ---------------------------------------------------------------- loading


def check_expected(
    index_dir: str, meta: dict, expect_dim: int | None, expect_backbone_id: str | None
) -> None:
    """The index.json of `index_dir` is for the backbone and dimension the caller expects."""
    if expect_backbone_id is not None and meta.get("backbone_id") != expect_backbone_id:
        raise IndexMismatch(
            f"{index_dir}: backbone mismatch: index built from {meta.get('backbone_id')}, "
            f"expected {expect_backbone_id}"
        )
    if expect_dim is not None and int(meta["dim"]) != int(expect_dim):
        raise IndexMismatch(
            f"{index_dir}: dim mismatch: index has dim {meta['dim']}, the backbone gives {expect_dim}"
        )


def load_index(
    index_dir: str,
    expect_dim: int | None = None,
    expect_backbone_id: str | None = None,
    mmap: bool = False,
    verify: bool = True,
) -> GalleryIndex:
    """Load and verify an index directory: every file's sha256, the dimension, the backbone id
    and the row count. Raises IndexMismatch naming what does not match. `mmap`: open the
    index file memory-mapped, read-only (module doc). `verify=False` skips the checksums, for
    a caller that has just checked the same files (a bundle's own list covers them)."""
    meta_uri = storage.join(index_dir, META_FILE)
    if not storage.exists(meta_uri):
        if storage.listdir(index_dir):
            raise FileNotFoundError(
                f"{meta_uri}: missing: an incomplete index (a build was interrupted before "
                f"{META_FILE}, written last); run `medray run index` again"
            )
        raise FileNotFoundError(f"{meta_uri}: no index here; run `medray run index` first")
    meta = storage.read_json(meta_uri)
    check_expected(index_dir, meta, expect_dim, expect_backbone_id)
    if (meta.get("layout") or {}).get("kind") == "sharded":  # N shard dirs: medray.index.shards
        from medray.index.shards import load_sharded

        return load_sharded(index_dir, meta, expect_dim, expect_backbone_id, mmap)
    paths = {}
    for name, want in meta["files"].items():
        if not verify and not storage.is_s3(index_dir):
            paths[name] = storage.join(index_dir, name)
            continue
        paths[name], got = local_verified(index_dir, name, want)
        if got != want:
            raise IndexMismatch(
                f"{storage.join(index_dir, name)}: altered file: sha256 {got[:12]}... "
                f"!= {want[:12]}... recorded in {META_FILE}"
            )
    index = read_faiss(paths[INDEX_FILE], mmap)
    if index.d != int(meta["dim"]):
        raise IndexMismatch(
            f"{index_dir}: dim mismatch: file has {index.d}, {META_FILE} {meta['dim']}"
        )
    gallery = open_gallery(index_dir, paths)
    if not (index.ntotal == len(gallery) == int(meta["count"])):
        raise IndexMismatch(
            f"{index_dir}: count mismatch: index {index.ntotal}, gallery {len(gallery)}, "
            f"{META_FILE} {meta['count']}"
        )
    from medray.index.tune import apply_search_params

    apply_search_params(index, meta.get("search_params") or {"nprobe": meta.get("nprobe")})
    return GalleryIndex(index=index, gallery=gallery, meta=meta)


def open_gallery(index_dir: str, paths: dict[str, str]) -> Gallery:
    """The Arrow gallery (memory-mapped), or the Parquet one of an older index directory."""
    for name in (GALLERY_FILE, LEGACY_GALLERY_FILE):
        if name in paths:
            try:
                return Gallery.open(paths[name])
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise IndexMismatch(f"{storage.join(index_dir, name)}: unreadable: {exc}") from None
    raise IndexMismatch(
        f"{storage.join(index_dir, META_FILE)}: lists no gallery ({GALLERY_FILE} or "
        f"{LEGACY_GALLERY_FILE})"
    )
