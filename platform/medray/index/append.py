"""`medray run index mode=append`: grow a built index with the embeddings it does not hold yet.

A new day's images need no rebuild: after `medray data import` and `medray run embed` (which
embeds only the new manifest rows), append reads the verified index directory
(`load_index`: checksums, dimension, backbone id), takes the embedding rows after the ones
the gallery already holds, adds their vectors to the trained index (Flat, IVF, PQ, Refine
and HNSW all accept `add`) and appends their gallery rows. The trained parts (coarse
centroids, PQ codebooks) stay as they were, so the search parameters are tuned again
(`medray.index.tune.tune_index`, on a sample of all vectors) and the recall is also measured
on queries drawn from the new rows alone. If either falls below `target_recall`, the new
data has drifted from what the index was trained on: the index is retrained by a full build,
and the Result and `index.json` say so (`appended`, `retrained`, `append_note`).

Gallery row i must stay embedding row i (what evaluate and serving check), so append needs
the gallery to be a prefix of the embeddings: new rows at the end of the manifest. Anything
else (rows removed, reordered, or new ones in the middle, e.g. a folder re-import whose new
files sort between old ones) falls back to a full build, said in the same way. The directory
is rewritten by `write_index` (index.json removed first, written last).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from medray import storage
from medray import workdir as wd
from medray.index import (
    META_FILE,
    Config,
    Result,
    add_vectors,
    gallery_table,
    load_index,
    read_vectors,
    write_index,
)
from medray.index.tune import drop_self, exact_neighbours, recall_at_k, tune_index

RECALL_QUERIES = 256
"""New rows searched to measure the recall on the new data (a random sample when more)."""


class AppendResult(Result):
    """What an append run did; `retrained` when it fell back to a full build."""

    appended: int = 0
    """Vectors added to the existing index (0: nothing new, or retrained)."""
    retrained: bool = False
    note: str = ""
    recall_new_at_k: float | None = None
    """Recall@k of queries drawn from the new rows only (None: exact index, or nothing added)."""


# ---------------------------------------------------------------- plain functions


def new_rows(gallery_ids: list[str], embedding_ids: list[str]) -> tuple[int | None, str]:
    """(first new embedding row, note) when the gallery is a prefix of the embeddings; (None,
    why not) when rows were removed, reordered or inserted, so only a full build fits."""
    n = len(gallery_ids)
    if embedding_ids[:n] == gallery_ids:
        return n, f"{len(embedding_ids) - n} new rows after the {n} indexed"
    gone = len(set(gallery_ids) - set(embedding_ids))
    if gone:
        return None, f"{gone} indexed rows are no longer in the embeddings (removed)"
    return None, "new rows are not all after the indexed ones (the manifest order changed)"


def sample_rows(start: int, stop: int, size: int, seed: int) -> np.ndarray:
    """Sorted rows in [start, stop): all of them, or a random `size` of them."""
    if stop - start <= size:
        return np.arange(start, stop)
    return np.sort(np.random.default_rng(seed).choice(np.arange(start, stop), size, replace=False))


def tuned_meta(tuned: dict) -> dict:
    """The index.json keys a build derives from tune_index's record (see build_single)."""
    params = tuned["search_params"]
    return {"search_params": params, f"recall_at_{tuned['k']}": tuned["recall_at_k"],
            "target_recall": tuned["target_recall"], "target_met": tuned["target_met"],
            "bytes_per_vector": tuned["bytes_per_vector"], "tune": tuned,
            "nprobe": params.get("nprobe"), "k_factor": params.get("k_factor_rf")}  # fmt: skip


# ---------------------------------------------------------------- FAISS at the edge


def recall_on_rows(index, vectors: np.ndarray, query_rows: np.ndarray, k: int) -> float:
    """Recall@k of `index` (its current search parameters) for queries that are its own
    vectors `query_rows`, self-matches dropped on both sides (tune's rule)."""
    queries = np.ascontiguousarray(vectors[query_rows], dtype=np.float32)
    exact = drop_self(exact_neighbours(vectors, queries, k + 1), query_rows, k)
    _, found = index.search(queries, k + 1)
    return recall_at_k(drop_self(found, query_rows, k), exact)


def measure(index, vectors: np.ndarray, first_new: int, cfg: Config) -> tuple[dict, float | None]:
    """(tune_index's record over all vectors, recall on a sample of the new rows with the
    tuned parameters); the second None for an exact (Flat) index."""
    import faiss

    tuned = tune_index(index, vectors, cfg)
    if isinstance(faiss.downcast_index(index), faiss.IndexFlat) or len(vectors) < 2:
        return tuned, None
    queries = sample_rows(first_new, len(vectors), RECALL_QUERIES, cfg.seed)
    return tuned, round(recall_on_rows(index, vectors, queries, tuned["k"]), 4)


def below_target(tuned: dict, recall_new: float | None, target: float | None) -> float | None:
    """The recall that missed `target` (tuned or on the new rows), None when both reach it."""
    if target is None:
        return None
    low = min(r for r in (tuned["recall_at_k"], recall_new, 1.0) if r is not None)
    return low if (tuned["target_met"] is False or low < target) else None


def append(cfg: Config, mlflow_run_id: str | None = None) -> AppendResult:
    """Add the embeddings the index lacks (module doc); a full build when that cannot work."""
    start = time.perf_counter()
    bid, rows, vectors = read_vectors(cfg.workdir, cfg.backbone_id)
    out_dir = wd.index(cfg.workdir, bid)
    if cfg.shards > 1 or sharded(out_dir):
        return rebuild(cfg, mlflow_run_id, "retrained: sharded indexes (shards > 1) are rebuilt")
    gi = load_index(out_dir, expect_dim=vectors.shape[1], expect_backbone_id=bid)
    first_new, why = new_rows(gi.gallery.ids().tolist(), rows["id"].tolist())
    if first_new is None:
        return rebuild(cfg, mlflow_run_id, f"retrained: {why}")
    added = len(rows) - first_new
    if added == 0 and same_labels(gi.gallery, rows):
        note = "nothing to append: every embedding is already indexed"
        return result(gi.meta, out_dir, 0, note, start, mlflow_run_id)
    index, tuned, recall_new = gi.index, None, None
    if added:
        index = add_vectors(gi.index, vectors[first_new:])
        tuned, recall_new = measure(index, vectors, first_new, cfg)
        low = below_target(tuned, recall_new, cfg.target_recall)
        if low is not None:
            return rebuild(cfg, mlflow_run_id, f"retrained: recall@{tuned['k']} {low:.3f} after "
                           f"adding {added} rows is below target_recall {cfg.target_recall}")  # fmt: skip
    note = f"appended {added} rows after {first_new}" if added else "labels/splits refreshed"
    meta = {**gi.meta, **(tuned_meta(tuned) if tuned else {}), "count": len(rows),
            "appended": added, "retrained": False, "append_note": note,
            "recall_new_at_k": recall_new, "mlflow_run_id": mlflow_run_id}  # fmt: skip
    meta = write_index(out_dir, index, rows, meta)
    return result(meta, out_dir, added, note, start, mlflow_run_id, recall_new)


def sharded(out_dir: str) -> bool:
    """Whether the index directory holds serving shards (medray.index.shards)."""
    meta_uri = storage.join(out_dir, META_FILE)
    meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else {}
    return (meta.get("layout") or {}).get("kind") == "sharded"


def same_labels(gallery, rows: pd.DataFrame) -> bool:
    """Whether the gallery's uri/labels/split still match the embeddings' (ids in one order)."""
    columns = ["uri", "labels", "split"]
    return gallery.table.select(columns).equals(gallery_table(rows).select(columns))


def rebuild(cfg: Config, mlflow_run_id: str | None, note: str) -> AppendResult:
    """A full build (mode=build), recorded in index.json and the Result as retrained."""
    from medray.index import build

    built = build(cfg.model_copy(update={"mode": "build"}), mlflow_run_id)
    meta_uri = storage.join(built.out_dir, META_FILE)
    meta = {**storage.read_json(meta_uri), "appended": 0, "retrained": True, "append_note": note}
    storage.write_json(meta_uri, meta)  # the files' checksums inside are unchanged
    fields = {**built.model_dump(), "appended": 0, "retrained": True, "note": note}
    return AppendResult(**{k: v for k, v in fields.items() if k in AppendResult.model_fields})


def result(meta: dict, out_dir: str, added: int, note: str, start: float,
           mlflow_run_id: str | None, recall_new: float | None = None) -> AppendResult:  # fmt: skip
    """The Result of an append that kept the index (fields read back from its index.json)."""
    import faiss

    tuned = meta.get("tune") or {}
    return AppendResult(
        backbone_id=meta["backbone_id"], factory=meta["factory"], dim=int(meta["dim"]),
        count=int(meta["count"]), add_tasks=int((meta.get("layout") or {}).get("add_tasks", 1)),
        gpu=faiss.get_num_gpus() > 0, seconds=round(time.perf_counter() - start, 2),
        out_dir=out_dir, mlflow_run_id=mlflow_run_id,
        search_params=meta.get("search_params") or {}, recall_at_k=tuned.get("recall_at_k"),
        k=int(tuned.get("k", 10)), target_recall=meta.get("target_recall"),
        target_met=meta.get("target_met"), bytes_per_vector=meta.get("bytes_per_vector"),
        warning=meta.get("warning"), appended=added, retrained=False, note=note,
        recall_new_at_k=recall_new,
    )  # fmt: skip
