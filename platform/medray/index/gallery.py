"""The gallery table (id, uri, labels, split; row i = vector i) as a memory-mapped Arrow file.

A million-row gallery as a pandas frame of Python lists plus a dict of ids costs several
hundred MB in every Retriever replica. Written as an uncompressed Arrow IPC file and opened
with `pyarrow.memory_map`, its columns are views of the file: replicas on one node share
the page cache, and a row is materialised only when a search returns it. The id -> row
lookup is a sorted array of 64-bit id hashes (`id_hash`, a column of the file) searched with
`np.searchsorted`, each hit checked against the id string itself (a hash collision cannot
return another image). Index directories written before this format hold `gallery.parquet`:
it is read into memory and served by the same class.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

COLUMNS = ("id", "uri", "labels", "split")
HASH_COLUMN = "id_hash"


def id_hash(image_id: str) -> int:
    """A stable 64-bit hash of an id (blake2b; Python's hash() differs between processes)."""
    return int.from_bytes(hashlib.blake2b(str(image_id).encode(), digest_size=8).digest(), "little")


def id_hashes(ids) -> np.ndarray:
    return np.fromiter((id_hash(i) for i in ids), dtype=np.uint64, count=len(ids))


def arrow_file_bytes(table: pa.Table) -> bytes:
    """`table` as the bytes of one uncompressed Arrow IPC file (memory-mappable)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class Gallery:
    """Rows of the gallery by position, columns as arrays, and id -> row."""

    def __init__(self, table: pa.Table, source: str = "memory") -> None:
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{source}: gallery table lacks columns {missing}")
        self.table = table
        self.source = source
        if HASH_COLUMN in table.column_names:
            hashes = table.column(HASH_COLUMN).to_numpy()
        else:  # an older gallery.parquet: hash the ids once here
            hashes = id_hashes(table.column("id").to_pylist())
        self._order = np.argsort(hashes, kind="stable")
        self._sorted = np.ascontiguousarray(hashes[self._order])

    @classmethod
    def open(cls, path: str) -> Gallery:
        """A local gallery file: Arrow IPC memory-mapped, or Parquet read into memory."""
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return cls(pq.read_table(path), path)
        with pa.memory_map(path, "r") as source:
            table = pa.ipc.open_file(source).read_all()  # zero-copy views of the mapping
        return cls(table, path)

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, i: int) -> dict[str, Any]:
        """{id, uri, labels, split} of row `i`."""
        return self.rows([i])[0]

    def rows(self, indices) -> list[dict[str, Any]]:
        """{id, uri, labels, split} of each row in `indices` (in that order)."""
        picked = self.table.select(list(COLUMNS)).take(pa.array(np.asarray(indices, np.int64)))
        out = picked.to_pylist()
        for r in out:
            r["labels"] = list(r["labels"] or [])
        return out

    def ids(self) -> np.ndarray:
        """Every id, row order (an object array of str)."""
        return self.column("id")

    def column(self, name: str) -> np.ndarray:
        if name not in self.table.column_names:
            raise KeyError(
                f"{self.source}: no gallery column {name!r} (has {self.table.column_names})"
            )
        return self.table.column(name).to_numpy()

    __getitem__ = column  # gallery["split"]: the column as an array

    def find(self, image_id: str) -> int | None:
        """The row of `image_id`, or None when it is not in the gallery."""
        image_id = str(image_id)
        h = np.uint64(id_hash(image_id))
        lo = int(np.searchsorted(self._sorted, h, "left"))
        hi = int(np.searchsorted(self._sorted, h, "right"))
        ids = self.table.column("id")
        for row in self._order[lo:hi]:
            if ids[int(row)].as_py() == image_id:
                return int(row)
        return None

    def to_pandas(self):
        """The contract's columns as a DataFrame (labels as lists): small galleries, tools."""
        frame = self.table.select(list(COLUMNS)).to_pandas()
        frame["labels"] = [list(v) if v is not None else [] for v in frame["labels"]]
        return frame


class GalleryRows:
    """Row lookups of an index object that holds a `gallery` (a `Gallery`)."""

    def row(self, i: int) -> dict[str, Any]:
        """{id, uri, labels, split} of gallery row `i`."""
        return self.gallery.row(i)

    def rows(self, indices) -> list[dict[str, Any]]:
        return self.gallery.rows(indices)

    def ids(self) -> np.ndarray:
        return self.gallery.ids()

    def column(self, name: str) -> np.ndarray:
        return self.gallery.column(name)
