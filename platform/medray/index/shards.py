"""Serving shards: an archive split into N complete indexes over contiguous row ranges.

For archives larger than one machine's memory (`index.shards: N`). Each shard is a whole
single-file index directory (`build_single` on rows [start, stop), so its gallery is that
range), and serving runs one Retriever deployment per shard, which Ray can place on
different nodes. A query goes to every shard; each answers its own top k with global rows
(its start + local row), and `merge_topk` keeps the best k by score, ties broken by the
lower global row. With an exact (Flat) index this equals the unsharded search.

    index/<backbone_id>/shard-00000/ ... shard-{N-1}/   each: index.faiss, gallery, index.json
    index/<backbone_id>/index.json    {"backbone_id", "dim", "metric", "factory", "count",
        "layout": {"kind": "sharded", "shards": [{"dir", "start", "stop", "count"}, ...]},
        "files": {"shard-00000/index.json": sha256, ...}}

The top index.json is the commit marker, as for one index: removed before the shards are
rewritten and written last, so an interrupted build leaves no loadable directory. Each
shard's index.json carries the checksums of its own files, so the chain is verified end
to end. `load_sharded` reads the chain eagerly and each shard's index lazily (first use):
a replica that serves shard i never loads the others' index files.

Query expansion (a retrieval adapter's alpha-QE) needs the global top neighbours before the
second search, so the fan-out runs it in two rounds (`search_hits`, `merge_hits`,
`expanded_query`), exactly as `medray.adapt.search.index_search` does on one index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medray import storage
from medray import workdir as wd
from medray.index import META_FILE, IndexMismatch
from medray.index.gallery import GalleryRows
from medray.index.load import check_expected

KIND = "sharded"


def shard_dir_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """N contiguous [start, stop) row ranges of near-equal size (sizes differ by at most 1)."""
    if shards < 1 or n < shards:
        raise ValueError(f"index.shards: {shards} shards need at least {shards} vectors, got {n}")
    bounds = [i * n // shards for i in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def merge_topk(
    results_per_shard: list[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of several shards' answers: each (scores (Q, k_s), global rows (Q, k_s)),
    rows -1 for padding. Highest score first, ties broken by the lower global row; padding
    last. Returns (scores (Q, k), rows (Q, k)), padded with -inf / -1 where fewer exist."""
    if not results_per_shard:
        raise ValueError("merge_topk: no shard results")
    scores = np.concatenate([np.atleast_2d(s).astype(np.float32) for s, _ in results_per_shard], 1)
    rows = np.concatenate([np.atleast_2d(r).astype(np.int64) for _, r in results_per_shard], 1)
    pad = rows < 0
    key_score = np.where(pad, np.inf, -scores)  # ascending sort: best first, padding last
    key_row = np.where(pad, np.iinfo(np.int64).max, rows)
    order = np.lexsort((key_row, key_score), axis=1)[:, :k]
    top_s, top_r = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    top_s = np.where(top_r < 0, -np.inf, top_s).astype(np.float32)
    if top_r.shape[1] < k:  # fewer candidates than k in all shards together
        extra = k - top_r.shape[1]
        top_s = np.pad(top_s, ((0, 0), (0, extra)), constant_values=-np.inf)
        top_r = np.pad(top_r, ((0, 0), (0, extra)), constant_values=-1)
    return top_s, top_r


# ---------------------------------------------------------------- building


def build_sharded(
    vectors: np.ndarray, rows: pd.DataFrame, cfg, factory: str, bid: str,
    mlflow_run_id: str | None, started: float,
):  # fmt: skip
    """`medray run index` with `shards: N`: N shard directories, then the top index.json."""
    import faiss

    from medray.index import Result, build_single, choose_factory

    out_dir = wd.index(cfg.workdir, bid)
    storage.remove(storage.join(out_dir, META_FILE))  # commit marker first, as write_index
    n, dim = vectors.shape
    entries, metas, files = [], [], {}
    for i, (start, stop) in enumerate(shard_ranges(n, cfg.shards)):
        name = shard_dir_name(i)
        # `auto` picks for the shard's own size (each shard is searched on its own).
        chosen = choose_factory(stop - start, dim) if cfg.factory == "auto" else factory
        extra = {"backbone_id": bid, "mlflow_run_id": mlflow_run_id,
                 "shard": {"number": i, "of": cfg.shards, "start": start, "stop": stop}}  # fmt: skip
        part_rows = rows.iloc[start:stop].reset_index(drop=True)
        shard_dir = storage.join(out_dir, name)
        meta = build_single(vectors[start:stop], part_rows, cfg, chosen, shard_dir, extra)
        metas.append(meta)
        entries.append({"dir": name, "start": start, "stop": stop, "count": stop - start,
                        "factory": meta["factory"], "search_params": meta.get("search_params")})  # fmt: skip
        files[f"{name}/{META_FILE}"] = storage.sha256(storage.join(shard_dir, META_FILE))
    tune = summary_of(metas)
    factories = sorted({m["factory"] for m in metas})
    top = {"backbone_id": bid, "dim": dim, "metric": "ip", "factory": ";".join(factories),
           "count": n, "layout": {"kind": KIND, "shards": entries}, "files": files,
           "mlflow_run_id": mlflow_run_id, **tune}  # fmt: skip
    storage.write_json(storage.join(out_dir, META_FILE), top)
    k = metas[0]["tune"]["k"] if "tune" in metas[0] else 10
    return Result(backbone_id=bid, factory=top["factory"], dim=dim, count=n,
                  add_tasks=max(int(m["layout"].get("add_tasks", 1)) for m in metas),
                  shards=cfg.shards, gpu=faiss.get_num_gpus() > 0,
                  seconds=round(time.perf_counter() - started, 2), out_dir=out_dir,
                  mlflow_run_id=mlflow_run_id, search_params=metas[0].get("search_params") or {},
                  recall_at_k=tune.get(f"recall_at_{k}"), k=k, target_recall=cfg.target_recall,
                  target_met=tune["target_met"], bytes_per_vector=tune["bytes_per_vector"],
                  warning=tune["warning"])  # fmt: skip


def summary_of(metas: list[dict]) -> dict:
    """The shards' tuning, summed up for the top index.json: the worst shard's recall, the
    mean bytes per vector, every warning."""
    k = metas[0].get("tune", {}).get("k", 10)
    recalls = [m.get(f"recall_at_{k}") for m in metas]
    met = [m.get("target_met") for m in metas]
    sizes = [m.get("bytes_per_vector") for m in metas]
    warnings = [
        f"{shard_dir_name(i)}: {m['warning']}" for i, m in enumerate(metas) if m.get("warning")
    ]
    return {
        f"recall_at_{k}": None if None in recalls else min(recalls),
        "target_recall": metas[0].get("target_recall"),
        "target_met": None if None in met else all(met),
        "bytes_per_vector": None if None in sizes else float(np.mean(sizes)),
        "warning": "; ".join(warnings) or None,
    }


# ---------------------------------------------------------------- loading


def is_sharded(meta: dict) -> bool:
    return (meta.get("layout") or {}).get("kind") == KIND


def files_of(index_dir: str) -> dict[str, str | None]:
    """{relative path: sha256 recorded for it} of every file of an index directory (what a
    bundle copies): one index's files, or each shard's; index.json files last in each
    directory, recorded by their parent (the top one by nothing: None)."""
    meta = storage.read_json(storage.join(index_dir, META_FILE))
    if not is_sharded(meta):
        return {**meta["files"], META_FILE: None}
    out: dict[str, str | None] = {}
    for entry in meta["layout"]["shards"]:
        shard_meta = storage.read_json(storage.join(index_dir, entry["dir"], META_FILE))
        out.update({f"{entry['dir']}/{name}": sha for name, sha in shard_meta["files"].items()})
        out[f"{entry['dir']}/{META_FILE}"] = meta["files"].get(f"{entry['dir']}/{META_FILE}")
    return {**out, META_FILE: None}


@dataclass
class ShardedGalleryIndex(GalleryRows):
    """N shard indexes behind GalleryIndex's search API (global rows, merged top k).

    Shards load on first use (`shard(i)`), so a Retriever replica serving one shard holds
    only that shard's index; `gallery` concatenates the shards' galleries when asked."""

    index_dir: str
    meta: dict
    expect_dim: int | None = None
    expect_backbone_id: str | None = None
    mmap: bool = False
    loaded: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def entries(self) -> list[dict]:
        return self.meta["layout"]["shards"]

    def __len__(self) -> int:
        return int(self.meta["count"])

    def start(self, i: int) -> int:
        return int(self.entries[i]["start"])

    def shard(self, i: int):
        """Shard i's GalleryIndex (verified and loaded the first time; rows local)."""
        if i not in self.loaded:
            self.loaded[i] = load_shard(
                self.index_dir, i, self.expect_dim, self.expect_backbone_id, self.meta, self.mmap
            )
        return self.loaded[i]

    def load_all(self) -> ShardedGalleryIndex:
        for i in range(len(self.entries)):
            self.shard(i)
        return self

    @property
    def gallery(self):
        """Every shard's gallery as one (medray.index.gallery.Gallery over their tables,
        concatenated without copying)."""
        if "_gallery" not in self.loaded:
            import pyarrow as pa

            from medray.index.gallery import Gallery

            tables = [self.shard(i).gallery.table for i in range(len(self.entries))]
            self.loaded["_gallery"] = Gallery(pa.concat_tables(tables), self.index_dir)
        return self.loaded["_gallery"]

    def find(self, image_id: str) -> int | None:
        """Global row of `image_id`, None when no shard holds it."""
        for i in range(len(self.entries)):
            row = self.shard(i).find(image_id)
            if row is not None:
                return row + self.start(i)
        return None

    def locate(self, rows: np.ndarray) -> np.ndarray:
        """Shard number of each global row."""
        starts = np.array([e["start"] for e in self.entries], dtype=np.int64)
        return np.searchsorted(starts, rows, side="right") - 1

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of global `rows`, from the shards that hold them."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.zeros((len(rows), self.dim), np.float32)
        owner = self.locate(rows)
        for i in np.unique(owner):
            mask = owner == i
            out[mask] = self.shard(int(i)).vectors(rows[mask] - self.start(int(i)))
        return out

    def search(
        self, q: np.ndarray, k: int, allowed_rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every shard's top k (restricted to `allowed_rows`, global), merged (merge_topk)."""
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise IndexMismatch(f"query dim {q.shape[1]} != index dim {self.dim}")
        answers = []
        for i, e in enumerate(self.entries):
            local = None
            if allowed_rows is not None:
                allowed = np.asarray(allowed_rows, dtype=np.int64)
                local = allowed[(allowed >= e["start"]) & (allowed < e["stop"])] - e["start"]
                if len(local) == 0:
                    continue
            scores, rows = self.shard(i).search(q, k, allowed_rows=local)
            answers.append((scores, np.where(rows < 0, -1, rows + e["start"])))
        if not answers:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        return merge_topk(answers, k)


def load_sharded(
    index_dir: str, meta: dict, expect_dim: int | None = None,
    expect_backbone_id: str | None = None, mmap: bool = False,
) -> ShardedGalleryIndex:  # fmt: skip
    """A sharded index directory: the manifest chain is verified now (each shard's index.json
    against the top one's sha256, row ranges, counts, dims), each shard's files on first use."""
    check_expected(index_dir, meta, expect_dim, expect_backbone_id)  # also via load_index
    top, nxt = storage.join(index_dir, META_FILE), 0
    for i, entry in enumerate(meta["layout"]["shards"]):
        uri = storage.join(index_dir, entry["dir"], META_FILE)
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: missing (shard {i}); run `medray run index` again")
        got, want = storage.sha256(uri), str(meta["files"].get(f"{entry['dir']}/{META_FILE}"))
        if got != want:
            raise IndexMismatch(
                f"{uri}: altered file: sha256 {got[:12]}... != {want[:12]}... in {top}"
            )
        if entry["start"] != nxt or entry["stop"] - entry["start"] != entry["count"]:
            raise IndexMismatch(f"{top}: shard {i} rows do not follow row {nxt}: {entry}")
        nxt = entry["stop"]
    if nxt != int(meta["count"]):
        raise IndexMismatch(
            f"{index_dir}: count mismatch: shards hold {nxt} rows, {top} {meta['count']}"
        )
    return ShardedGalleryIndex(index_dir, meta, expect_dim, expect_backbone_id, mmap)


def load_shard(
    index_dir: str, i: int, expect_dim: int | None = None,
    expect_backbone_id: str | None = None, meta: dict | None = None, mmap: bool = False,
):  # fmt: skip
    """Shard i of a sharded index directory as a GalleryIndex (local rows; its global rows
    start at `meta["shard"]["start"]`), verified like any index directory."""
    from medray.index.load import load_index

    meta = meta or storage.read_json(storage.join(index_dir, META_FILE))
    entries = meta["layout"]["shards"]
    if not 0 <= i < len(entries):
        raise IndexMismatch(f"{index_dir}: no shard {i} (the index has {len(entries)})")
    entry = entries[i]
    gi = load_index(storage.join(index_dir, entry["dir"]), expect_dim, expect_backbone_id, mmap)
    if (
        int(gi.meta["count"]) != entry["count"]
        or gi.meta.get("shard", {}).get("start") != entry["start"]
    ):
        raise IndexMismatch(
            f"{storage.join(index_dir, entry['dir'])}: shard {i} holds rows from {gi.meta.get('shard')}, {META_FILE} says {entry}"
        )
    return gi


# ---------------------------------------------------------------- serving fan-out


def search_hits(gi, start: int, q: np.ndarray, k: int, n_vectors: int = 0) -> dict:
    """One shard's answer to one query: its top k hits (id, score, labels, uri and global
    `row`), plus the stored vectors of its first `n_vectors` hits (for query expansion)."""
    scores, rows = gi.search(np.asarray(q, np.float32)[None, :], k)
    keep = rows[0] >= 0
    hits = [
        {"id": str(g["id"]), "score": float(score), "labels": [str(x) for x in g["labels"]],
         "uri": str(g["uri"]), "row": int(row) + start}
        for g, score, row in zip(gi.rows(rows[0][keep]), scores[0][keep], rows[0][keep], strict=True)
    ]  # fmt: skip
    local = [h["row"] - start for h in hits[:n_vectors]]
    vectors = gi.vectors(np.array(local, np.int64)) if local else np.zeros((0, gi.dim), np.float32)
    return {"hits": hits, "vectors": np.asarray(vectors, np.float32)}


def merge_hits(answers: list[dict], k: int) -> tuple[list[dict], np.ndarray]:
    """The best k hits of several shards' `search_hits` answers (merge_topk order), and the
    stored vectors that came with them (rows without one are zero)."""
    found = [(a["hits"][j], a["vectors"][j] if j < len(a["vectors"]) else None)
             for a in answers for j in range(len(a["hits"]))]  # fmt: skip
    if not found:
        return [], np.zeros((0, 0), np.float32)
    scores = np.array([[h["score"] for h, _ in found]], np.float32)
    rows = np.array([[h["row"] for h, _ in found]], np.int64)
    _, top = merge_topk([(scores, rows)], min(k, len(found)))
    by_row = {h["row"]: (h, v) for h, v in found}
    picked = [by_row[int(r)] for r in top[0] if r >= 0]
    dim = next((len(v) for _, v in picked if v is not None), 0)
    vectors = np.array([v if v is not None else np.zeros(dim) for _, v in picked], np.float32)
    return [h for h, _ in picked], vectors


def expanded_query(
    q: np.ndarray, hits: list[dict], vectors: np.ndarray, n: int, alpha: float
) -> np.ndarray:
    """alpha-QE of one query over its global top-n hits (medray.adapt.search.index_search)."""
    from medray.adapt.fit import expand_queries

    top = min(n, len(hits))
    weights = np.array([[h["score"] for h in hits[:top]]], np.float32)
    return expand_queries(np.asarray(q, np.float32)[None, :], vectors[None, :top], weights, alpha)[
        0
    ]


def open_shard(index, i: int):
    """Shard i of a bundle's index (loaded now if it was not), or a clear error when the
    bundle's index is not sharded or has no shard i."""
    if not isinstance(index, ShardedGalleryIndex):
        raise IndexMismatch(
            f"shard {i} asked of an index that is not sharded (layout "
            f"{(getattr(index, 'meta', {}).get('layout') or {}).get('kind')!r}); "
            "serve it with one Retriever (serving shards: auto or 1)"
        )
    if not 0 <= i < len(index.entries):
        raise IndexMismatch(f"{index.index_dir}: no shard {i} (the index has {len(index.entries)})")
    return index.shard(i)


def shard_answer(index, i: int, q: np.ndarray, k: int, n_vectors: int = 0) -> dict:
    """What shard i's Retriever answers: `search_hits` over max(k, n_vectors) neighbours."""
    return search_hits(open_shard(index, i), index.start(i), q, max(k, n_vectors), n_vectors)


def shard_thumbnail(index, i: int, image_id: str, size: int) -> bytes | None:
    """PNG thumbnail of `image_id` when shard i holds it (read by URI), else None."""
    import io

    from PIL import Image

    from medray.data.decode import read_image

    gi = open_shard(index, i)
    row = gi.find(str(image_id))
    if row is None:
        return None
    image = Image.fromarray(read_image(str(gi.row(row)["uri"])))
    image.thumbnail((int(size), int(size)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
