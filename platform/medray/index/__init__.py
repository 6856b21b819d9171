"""`medray run index`: a FAISS index over one backbone's embeddings, plus its gallery table.

Inner product on L2-normalised embeddings (= cosine similarity). The factory string comes
from the config or, with `factory: auto`, from `choose_factory(n, dim)`: exact `Flat` below
~100k vectors, `IVF{nlist},PQ{m},Refine(SQ8)` above (PQ candidates re-ranked with 8-bit
codes), trained on a random sample of `train_size`.

Parallel build, for large N: the index is trained once in the driver, the empty trained
index is serialised, and Ray tasks each add one slice of `shard_rows` vectors to a copy of
it (the expensive part: coarse assignment and PQ encoding); the driver then concatenates
the shards' inverted lists with `merge_from`, in order, so row i is still vector i. We chose
this over keeping shards searched by fan-out and top-k merge because the result is one file
that serving loads and searches in one call with no extra round trips, and an IVF-PQ index
of a million vectors is ~70 MB, far from needing to be split across machines. Factories
that cannot merge (HNSW) are built in the driver alone (FAISS still uses every core there).
When FAISS sees GPUs (`faiss.get_num_gpus()`), training and adding run on them and the
index is moved back to the CPU to be written.

Written to `index/<backbone_id>/`: `index.faiss`, `gallery.parquet` (id, uri, labels, split;
row i = vector i) and, last, `index.json` (backbone_id, dim, metric, factory, count,
files {name: sha256}, layout). `index.json` is the commit marker: it is removed before the
other files are rewritten and written only once they are complete (each one atomically:
temp file + rename locally, one PUT on S3), so a build that crashes half-way leaves a
directory without it, which `load_index` refuses; `load_index` verifies every checksum too.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, Field

from medray import storage
from medray import workdir as wd
from medray.config import StageConfig

INDEX_FILE = "index.faiss"
GALLERY_FILE = "gallery.parquet"
META_FILE = "index.json"
FLAT_BELOW = 100_000
"""Below this many vectors exact search is fast enough and needs no training."""


class IndexMismatch(ValueError):
    """An index that does not match what it claims or what the caller expects."""


class Config(StageConfig):
    """Build the similarity-search index over the embeddings of one backbone."""

    backbone_id: str | None = None
    """Embeddings to index; None: the last finished embed run (embeddings/LATEST)."""
    factory: str = "auto"
    """A FAISS index_factory string (Flat, IVF1024,PQ64, HNSW32, ...) or `auto` (choose_factory)."""
    nprobe: int = Field(16, ge=1)
    """IVF lists visited per query (stored with the index, used by every search)."""
    k_factor: float = Field(4.0, ge=1)
    """Refine factories: k_factor x k candidates re-ranked with the finer codes."""
    train_size: int = Field(100_000, ge=1000)
    """Vectors sampled to train IVF/PQ (raised to 40 per IVF list when that is more)."""
    shard_rows: int = Field(250_000, ge=1)
    """Vectors per parallel Ray add task; fewer vectors than this: one build in the driver."""


class Result(BaseModel):
    """What an index run built; the CLI prints it."""

    backbone_id: str
    factory: str
    dim: int
    count: int
    shards: int
    """Slices added in parallel by Ray tasks and merged (1: built in the driver)."""
    gpu: bool
    seconds: float
    out_dir: str
    mlflow_run_id: str | None = None


# ---------------------------------------------------------------- plain functions


def choose_factory(n: int, dim: int, flat_below: int = FLAT_BELOW) -> str:
    """`Flat` (exact) below `flat_below` vectors, else `IVF{nlist},PQ{m},Refine(SQ8)`: nlist the
    power of two nearest sqrt(n) (FAISS's rule of thumb is 1..16 x sqrt(n)), m the largest
    divisor of dim up to min(64, dim / 4) (PQ needs m | dim; 64 bytes a vector), and the
    `k_factor` x k PQ candidates re-ranked with 8-bit scalar-quantised vectors (dim bytes):
    PQ alone cannot order close neighbours (recall@10 0.28 on clustered data in
    bench/index.py), the re-ranking can, at ~1/3.5 of the memory of Flat."""
    if n < flat_below:
        return "Flat"
    nlist = int(min(65536, max(16, 2 ** round(math.log2(math.sqrt(n))))))
    cap = min(64, max(1, dim // 4))
    m = max(d for d in range(1, cap + 1) if dim % d == 0)
    return f"IVF{nlist},PQ{m},Refine(SQ8)"


def can_merge(factory: str) -> bool:
    """Whether shards built from one trained empty index can be merged (`merge_from`)."""
    head = factory.split(",")[0].strip()
    return (
        head.startswith("IVF") or factory.strip() in ("Flat", "PQ", "SQ8") or head.startswith("PQ")
    )


def shard_slices(n: int, shard_rows: int) -> list[tuple[int, int]]:
    """[start, stop) slices of at most `shard_rows` vectors."""
    return [(s, min(s + shard_rows, n)) for s in range(0, n, shard_rows)]


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

    targets = [index]
    try:
        targets.append(faiss.extract_index_ivf(index))
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
        dev = _to_gpu(index)
        dev.train(np.ascontiguousarray(vectors[rows]))
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
    """Train, then add in parallel Ray tasks (when large and mergeable) or here; (index, shards)."""
    import faiss

    index = trained_empty(vectors, factory, cfg.train_size, cfg.seed)
    slices = shard_slices(len(vectors), cfg.shard_rows)
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
    """The contract's gallery columns, row i = vector i."""
    return pa.table(
        {
            "id": pa.array(rows["id"].astype(str).tolist(), pa.string()),
            "uri": pa.array(rows["uri"].astype(str).tolist(), pa.string()),
            "labels": pa.array([list(v) for v in rows["labels"]], pa.list_(pa.string())),
            "split": pa.array(rows["split"].astype(str).tolist(), pa.string()),
        }
    )


def write_index(out_dir: str, index, rows: pd.DataFrame, meta: dict) -> dict:
    """Write index file and gallery, then index.json with their checksums (last): the commit
    marker, removed first, so a half-written index never looks whole."""
    import faiss

    storage.remove(storage.join(out_dir, META_FILE))
    blobs = {INDEX_FILE: faiss.serialize_index(index).tobytes(),
             GALLERY_FILE: storage.table_bytes(gallery_table(rows))}  # fmt: skip
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


def build(cfg: Config, mlflow_run_id: str | None = None) -> Result:
    """Read the embeddings, build the index and write it (module doc); no MLflow here."""
    import faiss

    start = time.perf_counter()
    bid, rows, vectors = read_vectors(cfg.workdir, cfg.backbone_id)
    n, dim = vectors.shape
    factory = choose_factory(n, dim) if cfg.factory == "auto" else cfg.factory
    try:
        index, shards = build_index(vectors, cfg, factory)
    except RuntimeError as exc:
        raise ValueError(f"index: FAISS could not build factory {factory!r}: {exc}") from exc
    set_nprobe(index, cfg.nprobe, cfg.k_factor)
    layout = {"kind": "single-file", "index_file": INDEX_FILE, "gallery": GALLERY_FILE,
              "built_shards": shards, "merge": "ivf merge_from" if shards > 1 else None}  # fmt: skip
    meta = {"backbone_id": bid, "dim": dim, "metric": "ip", "factory": factory, "count": n,
            "nprobe": cfg.nprobe, "k_factor": cfg.k_factor, "layout": layout, "mlflow_run_id": mlflow_run_id}  # fmt: skip
    out_dir = wd.index(cfg.workdir, bid)
    write_index(out_dir, index, rows, meta)
    return Result(backbone_id=bid, factory=factory, dim=dim, count=n, shards=shards,
                  gpu=faiss.get_num_gpus() > 0, seconds=round(time.perf_counter() - start, 2),
                  out_dir=out_dir, mlflow_run_id=mlflow_run_id)  # fmt: skip


def run(config: Config) -> Result:
    """`medray run index`: `build` inside one MLflow run (params, counts, index.json)."""
    import mlflow

    from medray import tracking

    params = config.model_dump(exclude={"mlflow", "ray"})
    with tracking.stage_run(config.mlflow, config.workdir, "index", params) as mlrun:
        result = build(config, mlrun.info.run_id)
        mlflow.log_params(
            {"chosen_factory": result.factory, "indexed_backbone_id": result.backbone_id}
        )
        mlflow.log_metrics(
            {k: float(getattr(result, k)) for k in ("count", "dim", "shards", "seconds")}
        )
        mlflow.log_dict(storage.read_json(storage.join(result.out_dir, META_FILE)), META_FILE)
    return result


# Loading lives in medray.index.load (what serving and evaluate read); it uses the names above.
from medray.index.load import GalleryIndex, load_index  # noqa: E402, F401
