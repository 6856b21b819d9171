"""`medray run index`: a FAISS index over one backbone's embeddings, plus its gallery table.

Inner product on L2-normalised embeddings (= cosine similarity). The factory string comes
from the config or, with `factory: auto`, from `choose_factory(n, dim)`: exact `Flat` below
~100k vectors, `IVF{nlist},PQ{m},Refine(SQ8)` above (PQ candidates re-ranked with 8-bit
codes), trained on a random sample of `train_size`.

The whole build (read the embeddings, train, add, tune, write) runs in one Ray task with
the stage's resources (`raycluster.run_remote`): the driver, on a laptop or the head node,
gets back only the Result and logs it to MLflow, so its memory does not grow with the
archive. Parallel build, for large N: the index is trained once in that task, the empty
trained index is serialised, and nested Ray tasks each add one slice of `add_rows` vectors
to a copy of it (the expensive part: coarse assignment and PQ encoding); the build task
then concatenates the slices' inverted lists with `merge_from`, in order, so row i is still
vector i: one file that serving loads and searches in one call. Factories that cannot
merge (HNSW) are built in the build task alone (FAISS still uses every core there). An
archive too large for one machine's memory is split with `shards: N` instead
(medray.index.shards): N complete indexes over row ranges, served by one Retriever
deployment each, searched by fan-out.
When FAISS sees GPUs (`faiss.get_num_gpus()`), training and adding run on them and the
index is moved back to the CPU to be written.

Written to `index/<backbone_id>/`: `index.faiss`, `gallery.arrow` (id, uri, labels, split;
row i = vector i) and, last, `index.json` (backbone_id, dim, metric, factory, count,
files {name: sha256}, layout). `index.json` is the commit marker: it is removed before the
other files are rewritten and written only once they are complete (each one atomically:
temp file + rename locally, one PUT on S3), so a build that crashes half-way leaves a
directory without it, which `load_index` refuses; `load_index` verifies every checksum too.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import AliasChoices, BaseModel, Field

from medray import storage
from medray import workdir as wd
from medray.config import StageConfig

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
GALLERY_FILE = "gallery.arrow"
"""Uncompressed Arrow IPC, memory-mapped by load_index (medray.index.gallery)."""
META_FILE = "index.json"
FLAT_BELOW = 100_000
"""Below this many vectors exact search is fast enough and needs no training."""


class IndexMismatch(ValueError):
    """An index that does not match what it claims or what the caller expects."""


class Config(StageConfig):
    """Build the similarity-search index over the embeddings of one backbone."""

    backbone_id: str | None = None
    """Embeddings to index; None: the last finished embed run (embeddings/LATEST)."""
    mode: Literal["build", "append"] = "build"
    """build: a new index over all embeddings. append: add the embeddings the existing index
    lacks, retraining only if the tuned recall drops below target (medray.index.append)."""
    factory: str = "auto"
    """A FAISS index_factory string (Flat, IVF1024,PQ64, HNSW32, ...) or `auto` (choose_factory)."""
    nprobe: int = Field(16, ge=1)
    """IVF lists visited per query when tuning is off (target_recall: null)."""
    k_factor: float = Field(4.0, ge=1)
    """Refine factories, tuning off: k_factor x k candidates re-ranked with the finer codes."""
    target_recall: float | None = Field(0.95, gt=0, le=1)
    """Search parameters are tuned to the cheapest setting whose recall@target_k on held-out
    archive vectors reaches this (medray.index.tune); null: use nprobe/k_factor as given."""
    target_k: int = Field(10, ge=1)
    """The k of the tuned recall@k."""
    tune_queries: int = Field(1000, ge=10)
    """Archive vectors held out as tuning queries (all of them in a smaller archive)."""
    on_miss: Literal["keep", "exact"] = "keep"
    """Target not reached: keep the most accurate setting found (warned, in index.json) or
    rebuild as exact Flat."""
    train_size: int = Field(100_000, ge=1000)
    """Vectors sampled to train IVF/PQ (raised to 40 per IVF list when that is more)."""
    add_rows: int = Field(250_000, ge=1, validation_alias=AliasChoices("add_rows", "shard_rows"))
    """Vectors per parallel Ray add task; fewer vectors than this: all added in the build task.
    (`shard_rows`, its old name, is still accepted.)"""
    shards: int = Field(1, ge=1)
    """Serving shards: N > 1 writes N complete indexes over contiguous row ranges
    (shard-00000/ ...) under one manifest; serving runs one Retriever deployment per shard
    and merges their top k (medray.index.shards). 1: one index."""


class Result(BaseModel):
    """What an index run built; the CLI prints it."""

    backbone_id: str
    factory: str
    dim: int
    count: int
    add_tasks: int
    """Slices added in parallel by Ray tasks and merged (1: all added in the build task)."""
    shards: int = 1
    """Serving shards written (index.shards)."""
    gpu: bool
    seconds: float
    out_dir: str
    mlflow_run_id: str | None = None
    search_params: dict = {}
    """Tuned search parameters (FAISS ParameterSpace names), stored in the index."""
    recall_at_k: float | None = None
    """recall@k measured at build time on held-out archive vectors (1.0: exact Flat)."""
    k: int = 10
    target_recall: float | None = None
    target_met: bool | None = None
    """False: the target was missed (see warning); None: tuning off."""
    bytes_per_vector: float | None = None
    warning: str | None = None


# ---------------------------------------------------------------- plain functions


def choose_factory(n: int, dim: int, flat_below: int = FLAT_BELOW) -> str:
    """`Flat` (exact) below `flat_below` vectors, else `IVF{nlist},PQ{m}x4fs,Refine(SQ8)`: nlist
    the power of two nearest sqrt(n) (FAISS's rule of thumb is 1..16 x sqrt(n)); m the largest
    divisor of dim up to min(128, dim / 4) (PQ needs m | dim), 4-bit codes scanned with SIMD
    (fast-scan: m/2 bytes a vector); the `k_factor_rf` x k PQ candidates re-ranked with 8-bit
    scalar-quantised vectors (dim bytes, ~1/3.7 of Flat). PQ alone cannot order close
    neighbours; the re-ranking can, and medray.index.tune picks nprobe and k_factor_rf.

    Measured by `bench/index.py --families` on vectors with the structure of real
    EfficientNet-Lite0 X-ray embeddings (dim 1280), each family tuned to recall@10 >= 0.95:
    at 20k (IVF256), speed-up over exact batched / single query, recall on new queries:
    PQ64x4fs+Refine(SQ8) x3.0 / x24 0.966; 8-bit PQ64+Refine(SQ8) x3.4 / x51 0.972 (but 3-5x
    slower to build, and its scan grows with the lists at 1M); IVF_HNSW32 quantiser
    x5.8 / x50 0.966 (pays only for large nlist); IVF,SQ8 x1.2 / x26 0.978. At 50k: PQ64x4fs
    x22 / x421 (0.959), PQ128x4fs x31 / x455 (0.944 on new queries). At 1M (IVF1024):
    PQ128x4fs tuned to 0.95: x67 / x560, 0.957 on archive vectors, 0.947 on new queries
    (tuned to 0.96: 0.952, x64 / x478); PQ64x4fs needed k_factor_rf 128 (x27 / x250) and
    missed with k_factor_rf <= 64, hence m up to 128. Details: docs/search.md.
    On random vectors (no structure) no PQ family reaches 0.95 (0.23 at k_factor 32): tuning
    reports the miss, and `on_miss: exact` falls back to Flat."""
    if n < flat_below:
        return "Flat"
    nlist = int(min(65536, max(16, 2 ** round(math.log2(math.sqrt(n))))))
    cap = min(128, max(1, dim // 4))
    m = max(d for d in range(1, cap + 1) if dim % d == 0)
    return f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)"


def can_merge(factory: str) -> bool:
    """Whether shards built from one trained empty index can be merged (`merge_from`)."""
    head = factory.split(",")[0].strip()
    return (
        head.startswith("IVF") or factory.strip() in ("Flat", "PQ", "SQ8") or head.startswith("PQ")
    )


def add_slices(n: int, add_rows: int) -> list[tuple[int, int]]:
    """[start, stop) slices of at most `add_rows` vectors (one parallel add task each)."""
    return [(s, min(s + add_rows, n)) for s in range(0, n, add_rows)]


def train_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a random training sample (all rows when n <= size)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def ivf_nlist(index) -> int | None:
    import faiss

    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return None


def set_nprobe(index, nprobe: int, k_factor: float | None = None) -> None:
    """Store the search settings in the index itself (IVF lists visited, re-rank factor)."""
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:  # not an IVF index: nothing to set
        pass
    if k_factor is not None and is_refine(index):
        index.k_factor = float(k_factor)


def is_refine(index) -> bool:
    import faiss

    return isinstance(index, faiss.IndexRefine)


# ---------------------------------------------------------------- building


def skip_polysemous(index) -> None:
    """PQ factories train polysemous codes by default (simulated annealing, ~30 s even for a
    tiny index); they only serve Hamming-filtered search, which we never use."""
    import faiss

    targets = [faiss.downcast_index(index)]
    for obj in list(targets):  # Refine / PreTransform wrappers: their inner index too
        for attr in ("base_index", "index"):
            if isinstance(getattr(obj, attr, None), faiss.Index):
                targets.append(faiss.downcast_index(getattr(obj, attr)))
    try:  # extract_index_ivf returns the IndexIVF base class: downcast to reach the PQ flag
        targets.append(faiss.downcast_index(faiss.extract_index_ivf(index)))
    except RuntimeError:
        pass
    for obj in targets:
        if hasattr(obj, "do_polysemous_training"):
            obj.do_polysemous_training = False


def _to_gpu(index):
    """The index on every GPU FAISS sees; unchanged without GPUs or for CPU-only kinds (HNSW)."""
    import faiss

    if faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except Exception:  # no GPU implementation for this index type (HNSW, Refine)
        return index


def _to_cpu(index):
    import faiss

    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "index_gpu_to_cpu"):
        return index
    try:
        return faiss.index_gpu_to_cpu(index)
    except RuntimeError:  # already a CPU index
        return index


def trained_empty(vectors: np.ndarray, factory: str, train_size: int, seed: int):
    """A trained, empty CPU index for `factory` (GPU training when FAISS has GPUs)."""
    import faiss

    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    skip_polysemous(index)
    if not index.is_trained:
        nlist = ivf_nlist(index) or 0
        rows = train_sample(len(vectors), max(train_size, 40 * nlist), seed)
        sample = vectors if len(rows) == len(vectors) else vectors[rows]  # all rows: no copy
        dev = _to_gpu(index)
        dev.train(np.ascontiguousarray(sample))
        index = _to_cpu(dev)
    return index


def add_vectors(index, vectors: np.ndarray):
    """Add vectors (on GPU when there is one) and return the CPU index."""
    dev = _to_gpu(index)
    dev.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return _to_cpu(dev)


def merge_shards(parts: list) -> object:
    """Concatenate shard indexes (built from one trained empty index) in order."""
    import faiss

    base = parts[0]
    for part in parts[1:]:
        if is_refine(base):  # FAISS cannot merge IndexRefine: merge its two halves
            _merge(faiss.downcast_index(base.base_index), faiss.downcast_index(part.base_index))
            _merge(faiss.downcast_index(base.refine_index), faiss.downcast_index(part.refine_index))
            base.ntotal = base.base_index.ntotal
        else:
            _merge(base, part)
    return base


def _merge(base, part) -> None:
    # IVF stores ids, so later shards are shifted; flat codes are positional (id 0 = append).
    base.merge_from(part, base.ntotal if ivf_nlist(base) is not None else 0)


def _add_shard(empty: bytes, vectors: np.ndarray, threads: int) -> bytes:
    """Ray task body: one slice added to a copy of the trained empty index."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))  # do not oversubscribe the node's cores
    index = add_vectors(faiss.deserialize_index(np.frombuffer(empty, dtype=np.uint8)), vectors)
    return faiss.serialize_index(index).tobytes()


def build_index(vectors: np.ndarray, cfg: Config, factory: str) -> tuple[object, int]:
    """Train, then add in parallel Ray tasks (when large and mergeable) or here;
    (index, number of add tasks)."""
    import faiss

    index = trained_empty(vectors, factory, cfg.train_size, cfg.seed)
    slices = add_slices(len(vectors), cfg.add_rows)
    if len(slices) <= 1 or not can_merge(factory):
        return add_vectors(index, vectors), 1
    import ray

    from medray import raycluster

    raycluster.init(cfg.ray)
    cpus = cfg.ray.cpus_per_worker
    task = ray.remote(num_cpus=cpus)(_add_shard)
    empty = ray.put(faiss.serialize_index(index).tobytes())
    refs = [task.remote(empty, vectors[a:b], max(1, int(cpus))) for a, b in slices]
    parts = [faiss.deserialize_index(np.frombuffer(b, dtype=np.uint8)) for b in ray.get(refs)]
    return merge_shards(parts), len(slices)


def gallery_table(rows: pd.DataFrame) -> pa.Table:
    """The contract's gallery columns, row i = vector i, plus `id_hash` (the 64-bit hash of
    each id that the loaded gallery's id -> row lookup searches; medray.index.gallery)."""
    from medray.index.gallery import id_hashes

    ids = rows["id"].astype(str).tolist()
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "uri": pa.array(rows["uri"].astype(str).tolist(), pa.string()),
            "labels": pa.array([list(v) for v in rows["labels"]], pa.list_(pa.string())),
            "split": pa.array(rows["split"].astype(str).tolist(), pa.string()),
            "id_hash": pa.array(id_hashes(ids), pa.uint64()),
        }
    )


def index_bytes(index) -> bytearray:
    """`faiss.serialize_index(index)`'s bytes, built in one buffer: serialize_index holds
    them twice (FAISS's vector, then numpy's copy) and `.tobytes()` a third time; for Flat
    each copy is as large as all the embeddings."""
    import faiss

    out = bytearray()
    faiss.write_index(index, faiss.PyCallbackIOWriter(out.extend))
    return out


def write_index(out_dir: str, index, rows: pd.DataFrame, meta: dict) -> dict:
    """Write index file and gallery, then index.json with their checksums (last): the commit
    marker, removed first, so a half-written index never looks whole."""
    from medray.index.gallery import arrow_file_bytes

    storage.remove(storage.join(out_dir, META_FILE))
    blobs = {INDEX_FILE: index_bytes(index),
             GALLERY_FILE: arrow_file_bytes(gallery_table(rows))}  # fmt: skip
    for name, blob in blobs.items():
        storage.write_bytes(storage.join(out_dir, name), blob)
    # Checksums of the bytes meant to be written, not of a re-read: a file changed or cut
    # short after its write fails verification instead of being blessed (and a large index
    # on S3 is not downloaded again just to be hashed).
    meta = {**meta, "files": {name: storage.sha256_bytes(b) for name, b in blobs.items()}}
    storage.write_json(storage.join(out_dir, META_FILE), meta)
    return meta


# ---------------------------------------------------------------- stage


def read_vectors(workdir: str, backbone_id: str | None) -> tuple[str, pd.DataFrame, np.ndarray]:
    """The embeddings to index (via medray.embed's reader) and their backbone id."""
    from medray.embed import read_embeddings

    bid = wd.current_backbone_id(workdir, backbone_id)
    rows, vectors = read_embeddings(workdir, bid)
    if len(vectors) == 0:
        raise ValueError(f"{wd.embeddings(workdir, bid)}: no embeddings to index")
    return bid, rows, np.ascontiguousarray(vectors, dtype=np.float32)


def build_single(
    vectors: np.ndarray, rows: pd.DataFrame, cfg: Config, factory: str, out_dir: str,
    extra_meta: dict,
) -> dict:  # fmt: skip
    """One index directory: `tuned_index`, then written. Returns the meta written to
    index.json (`extra_meta` added last, e.g. backbone_id, mlflow_run_id)."""
    index, meta = tuned_index(vectors, cfg, factory)
    return write_index(out_dir, index, rows, {**meta, **extra_meta})


def tuned_index(vectors: np.ndarray, cfg: Config, factory: str) -> tuple[object, dict]:
    """Train, add (parallel Ray adds when large and mergeable), tune the search parameters
    to `cfg.target_recall` (medray.index.tune); (index, its index.json meta without files).
    The index holds what it needs: the caller may free `vectors` before writing it."""
    import faiss

    from medray.index.tune import tune_index

    try:
        index, add_tasks = build_index(vectors, cfg, factory)
    except RuntimeError as exc:
        raise ValueError(f"index: FAISS could not build factory {factory!r}: {exc}") from exc
    tuned = tune_index(index, vectors, cfg)
    missed = None
    if tuned["target_met"] is False:
        missed = (f"index: {factory} reaches recall@{tuned['k']} {tuned['recall_at_k']:.3f} at "
                  f"best ({tuned['search_params']}), below target_recall {cfg.target_recall}")  # fmt: skip
        if cfg.on_miss == "exact":
            missed += "; rebuilt as exact Flat (on_miss: exact)"
            failed, factory, add_tasks = tuned, "Flat", 1
            flat = faiss.index_factory(vectors.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
            index = add_vectors(flat, vectors)
            tuned = {**tune_index(index, vectors, cfg), "missed": failed}  # fmt: skip
        else:
            missed += "; kept (on_miss: keep)"
        log.warning(missed)
    params = tuned["search_params"]
    layout = {"kind": "single-file", "index_file": INDEX_FILE, "gallery": GALLERY_FILE,
              "add_tasks": add_tasks, "merge": "ivf merge_from" if add_tasks > 1 else None}  # fmt: skip
    meta = {"dim": int(vectors.shape[1]), "metric": "ip", "factory": factory, "count": len(vectors),
            "search_params": params, f"recall_at_{tuned['k']}": tuned["recall_at_k"],
            "target_recall": cfg.target_recall, "target_met": tuned["target_met"],
            "bytes_per_vector": tuned["bytes_per_vector"], "tune": tuned, "warning": missed,
            # the pre-tuning keys, still read by bundles and evaluate reports
            "nprobe": params.get("nprobe"), "k_factor": params.get("k_factor_rf"),
            "layout": layout}  # fmt: skip
    return index, meta


def build(cfg: Config, mlflow_run_id: str | None = None) -> Result:
    """Read the embeddings, build, tune and write the index (module doc), in this process;
    no MLflow here. `run` calls it in a Ray task."""
    import faiss

    if cfg.mode == "append":  # grow the existing index instead (medray.index.append)
        from medray.index.append import append

        return append(cfg, mlflow_run_id)
    start = time.perf_counter()
    bid, rows, vectors = read_vectors(cfg.workdir, cfg.backbone_id)
    n, dim = vectors.shape
    factory = choose_factory(n, dim) if cfg.factory == "auto" else cfg.factory
    if cfg.shards > 1:
        from medray.index.shards import build_sharded

        return build_sharded(vectors, rows, cfg, factory, bid, mlflow_run_id, start)
    out_dir = wd.index(cfg.workdir, bid)
    index, meta = tuned_index(vectors, cfg, factory)
    del vectors  # the largest array here: gone before the index is serialised
    extra = {"backbone_id": bid, "mlflow_run_id": mlflow_run_id}
    meta = write_index(out_dir, index, rows, {**meta, **extra})
    k = meta["tune"]["k"]
    return Result(backbone_id=bid, factory=meta["factory"], dim=dim, count=n,
                  add_tasks=meta["layout"]["add_tasks"], gpu=faiss.get_num_gpus() > 0,
                  seconds=round(time.perf_counter() - start, 2), out_dir=out_dir,
                  mlflow_run_id=mlflow_run_id, search_params=meta["search_params"],
                  recall_at_k=meta[f"recall_at_{k}"], k=k, target_recall=cfg.target_recall,
                  target_met=meta["target_met"], bytes_per_vector=meta["bytes_per_vector"],
                  warning=meta["warning"])  # fmt: skip


def run(config: Config) -> Result:
    """`medray run index`: `build` in one Ray task (module doc) inside one MLflow run
    (params, counts, index.json), logged from here."""
    import mlflow

    from medray import raycluster, tracking

    raycluster.init(config.ray)
    params = config.model_dump(exclude={"mlflow", "ray"})
    with tracking.stage_run(config.mlflow, config.workdir, "index", params) as mlrun:
        result = raycluster.run_remote(build, config, mlrun.info.run_id, ray_cfg=config.ray)
        mlflow.log_params(
            {"chosen_factory": result.factory, "indexed_backbone_id": result.backbone_id}
        )
        counts = ("count", "dim", "add_tasks", "shards", "seconds")
        mlflow.log_metrics({k: float(getattr(result, k)) for k in counts})
        measured = {f"recall_at_{result.k}": result.recall_at_k,
                    "bytes_per_vector": result.bytes_per_vector}  # fmt: skip
        mlflow.log_metrics({k: float(v) for k, v in measured.items() if v is not None})
        mlflow.log_dict(storage.read_json(storage.join(result.out_dir, META_FILE)), META_FILE)
    return result


# Loading lives in medray.index.load (what serving and evaluate read); it uses the names above.
from medray.index.load import GalleryIndex, load_index  # noqa: E402, F401
