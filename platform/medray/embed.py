"""`medray run embed`: the manifest -> L2-normalised embeddings, as Parquet shards, on Ray Data.

Pipeline (one Ray Data job over the rows still to do):
  rows (manifest index, uri)
    -> CPU tasks (`map_batches`): read bytes (local or s3://), decode, resize to uint8 S x S
    -> actor pool (`ActorPoolStrategy`, one GPU each when there are GPUs): normalise on the
       device, forward in inference mode (bf16 autocast + channels_last on CUDA), L2-normalise
    -> the driver: rows gathered per shard; a finished shard is written at once.
Shards are fixed slices of the manifest (`shard_size` rows in manifest order), so a re-run
skips every shard whose part file exists. Images that fail to decode (or are missing) are
quarantined (`data/quarantine.parquet`, stage `embed`) and dropped; in = out + quarantined is
checked. `embed.json` is written last, then `embeddings/LATEST`.

Growth: `plan.json` records, per shard, a hash of its rows' (id, uri) and one of their
(labels, split). When the manifest changes (a re-import that found new images), a shard
whose (id, uri) hash is unchanged keeps its part file (its labels/split columns are
rewritten if only those changed); every other shard -- the old last shard that was partial,
new shards, shards whose rows moved -- is removed and embedded again. So rows appended at the
end of the manifest cost only the partial last shard and the new ones; a uri's image is
assumed not to change in place (`overwrite=true` re-embeds everything).

Faults: a transient storage error (S3 unreachable, reset, throttled) is retried with backoff
by medray.storage and never quarantined; if storage stays away past the retry budget the
stage fails with `StorageUnavailable`, keeping the shards already written, and the same
command resumes. An actor that dies (killed, OOM, node lost) is restarted by Ray and its
batches retried on it (Ray Data's actor-pool defaults), so nothing is lost.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, Field

from medray import storage
from medray import workdir as wd
from medray.config import BackboneConfig, Section, StageConfig, validate
from medray.models import BackboneSpec
from medray.progress import Progress

log = logging.getLogger(__name__)
PART = "part-{:05d}.parquet"
PLAN = "plan.json"
SUMMARY = "embed.json"


class DebugConfig(Section):
    """Test-only switches."""

    batch_delay_s: float = Field(0.0, ge=0)
    """Each model actor sleeps this long per batch, so a fault test can act mid-run."""


class Config(StageConfig):
    """Embed every manifest image with one backbone."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    """The encoder (timm name + weights); see medray.models."""
    pin_backbone: bool = False
    """False: use the winner of `medray run select` (select/ranking.json) when there is one,
    else `backbone`. True: always use `backbone`."""
    batch_size: int = Field(64, ge=1)
    """Images per model forward (and per decode task batch)."""
    shard_size: int = Field(4096, ge=1)
    """Manifest rows per output Parquet shard: the unit of resumption."""
    decode_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per decode/resize task."""
    decode_memory_mb: int = Field(512, ge=1)
    """Memory Ray reserves per decode task (full-size decoded images in flight)."""
    read_threads: int = Field(8, ge=1)
    """Threads per decode task fetching image bytes (hides S3 latency)."""
    overwrite: bool = False
    """Re-embed every shard, even those already written."""
    debug: DebugConfig = Field(default_factory=DebugConfig)


class Result(BaseModel):
    """What an embed run did; the CLI prints it."""

    backbone_id: str
    backbone_source: str
    """`config` or `select` (the winner of the proxy task)."""
    dim: int
    images_in: int
    """Manifest rows."""
    count: int
    """Embeddings written (all shards)."""
    quarantined: int
    """Rows that could not be decoded (all shards); images_in = count + quarantined."""
    embedded_now: int
    quarantined_now: int
    storage_retries: int = 0
    """Transient storage errors retried while reading this run's images (none quarantined)."""
    shards: int
    shards_skipped: int
    """Shards found finished from an earlier run and not recomputed."""
    shards_relabelled: int = 0
    """Kept shards whose labels/split changed in the manifest: columns rewritten, not embedded."""
    images_per_s: float
    """This run's embedded images over the Ray Data job's wall time."""
    seconds: float
    out_dir: str
    mlflow_run_id: str | None = None


# ---------------------------------------------------------------- plain functions


def shard_bounds(n_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) manifest slices of at most `shard_size` rows, in order."""
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]


def part_name(shard: int) -> str:
    return PART.format(shard)


def shard_keys(manifest: pd.DataFrame, shard_size: int) -> list[dict[str, str]]:
    """Per shard, {"rows": hash of its (id, uri) pairs, "labels": hash of its (labels, split)}:
    the first says whether a part file's embeddings still belong to that slice, the second
    whether its label columns are current."""

    def digest(lines: list[str]) -> str:
        return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:32]

    ids = manifest["id"].astype(str).tolist()
    uris = manifest["uri"].astype(str).tolist()
    labels = ["|".join(map(str, v)) for v in manifest["labels"]]
    splits = manifest["split"].astype(str).tolist()
    keys = []
    for a, b in shard_bounds(len(manifest), shard_size):
        keys.append({
            "rows": digest([f"{i}\t{u}" for i, u in zip(ids[a:b], uris[a:b], strict=True)]),
            "labels": digest([f"{x}\t{y}" for x, y in zip(labels[a:b], splits[a:b], strict=True)]),
        })  # fmt: skip
    return keys


def reusable_shards(old: list[dict], new: list[dict]) -> tuple[list[int], list[int]]:
    """(shards whose part file still holds the right images, those of them to relabel)."""
    keep = [s for s in range(min(len(old), len(new))) if old[s]["rows"] == new[s]["rows"]]
    return keep, [s for s in keep if old[s]["labels"] != new[s]["labels"]]


def shard_table(rows: pd.DataFrame, embeddings: np.ndarray) -> pa.Table:
    """The contract's columns: id, uri, labels, split, embedding list<float32> (D)."""
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) * embeddings.shape[1])
    return pa.table(
        {
            "id": pa.array(rows["id"].astype(str).tolist(), pa.string()),
            "uri": pa.array(rows["uri"].astype(str).tolist(), pa.string()),
            "labels": pa.array([list(v) for v in rows["labels"]], pa.list_(pa.string())),
            "split": pa.array(rows["split"].astype(str).tolist(), pa.string()),
            "embedding": pa.ListArray.from_arrays(offsets, flat),
        }
    )


def resolve_backbone(cfg: Config) -> tuple[BackboneConfig, str]:
    """The backbone to embed with and where it came from (see `Config.pin_backbone`)."""
    ranking = storage.join(wd.select(cfg.workdir), "ranking.json")
    if cfg.pin_backbone or not storage.exists(ranking):
        return cfg.backbone, "config"
    winner = storage.read_json(ranking).get("winner")
    if not winner:
        return cfg.backbone, "config"
    if isinstance(winner, dict) and "backbone" in winner:
        winner = winner["backbone"]
    return validate(BackboneConfig, dict(winner), f"{ranking} winner"), "select"


# ---------------------------------------------------------------- Ray Data steps


def decode_batch(batch: dict[str, np.ndarray], spec: dict, threads: int) -> dict[str, np.ndarray]:
    """CPU task: uri -> resized uint8 pixels; failures keep their row with `error` set.

    Bad input (a file that is missing or does not decode) is flagged for quarantine. Storage
    that stays unreachable through medray.storage's retries raises `StorageUnavailable`:
    it fails the task (and the stage) instead of quarantining images that are fine."""
    from medray.data.decode import DecodeError, read_image
    from medray.models import resize_image

    bspec = BackboneSpec(**spec)
    size = bspec.input_size
    retries_before = storage.retry_count()

    def one(uri: str) -> tuple[np.ndarray | None, str]:
        try:
            image = read_image(uri)  # a file, a DICOM frame or a slide tile
        except storage.StorageUnavailable:
            raise
        except DecodeError as exc:  # bad content: quarantined with its reason
            return None, exc.reason
        except Exception as exc:  # missing or forbidden: bad input, quarantined
            return None, f"unreadable: {type(exc).__name__}: {exc}"
        try:
            return resize_image(image, bspec), ""
        except Exception as exc:  # any undecodable input is quarantined, never fatal
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            return None, str(reason)

    uris = [str(u) for u in batch["uri"]]
    with ThreadPoolExecutor(max_workers=min(threads, max(len(uris), 1))) as pool:
        results = list(pool.map(one, uris))
    pixels = np.zeros((len(uris), size, size, 3), dtype=np.uint8)
    for i, (px, _) in enumerate(results):
        if px is not None:
            pixels[i] = px
    retries = np.zeros(len(uris), dtype=np.int64)  # the batch's count, on its first row
    if len(uris):
        retries[0] = storage.retry_count() - retries_before
    return {
        "row": np.asarray(batch["row"], dtype=np.int64),
        "pixels": pixels,
        "error": np.asarray([err for _, err in results], dtype=object),
        "retries": retries,
    }


class Embedder:
    """Actor: loads the backbone once, then embeds batches of uint8 pixels."""

    def __init__(
        self, backbone: dict, seed: int, expect_id: str, use_gpu: bool, delay_s: float = 0.0
    ) -> None:
        import torch

        from medray.models import load_backbone, prepare_for_device

        bb = load_backbone(BackboneConfig(**backbone), seed=seed)
        if bb.spec.backbone_id != expect_id:  # a worker whose weights differ from the driver's
            raise RuntimeError(f"worker loaded {bb.spec.backbone_id}, driver {expect_id}")
        self.spec = bb.spec
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = prepare_for_device(bb.model, device)
        self.delay_s = delay_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from medray.models import embed_pixels

        if self.delay_s:
            time.sleep(self.delay_s)
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        out = np.zeros((len(ok), self.spec.dim), dtype=np.float32)
        if ok.any():
            out[ok] = embed_pixels(self.model, self.spec, batch["pixels"][ok])
        retries = batch.get("retries", np.zeros(len(ok), dtype=np.int64))
        return {"row": batch["row"], "error": batch["error"], "embedding": out,
                "retries": retries}  # fmt: skip


def build_dataset(rows: pd.DataFrame, cfg: Config, spec: BackboneSpec, use_gpu: bool):
    """The Ray Data pipeline over `rows` (columns row, uri)."""
    import ray

    # Input blocks: small enough for dozens of parallel decode tasks, few enough (<= ~1k per
    # million rows) that creating them stays cheap.
    step = max(cfg.batch_size, min(1024, math.ceil(len(rows) / 64)))
    chunks = [rows.iloc[i : i + step] for i in range(0, len(rows), step)]
    ds = ray.data.from_pandas(chunks)
    # The driver's S3 endpoint and retry budget reach the tasks and actors (a local Ray's
    # workers may have started before they were set; a cluster's never had them).
    env = storage.worker_env()
    runtime_env = {"env_vars": env} if env else None
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"spec": spec.model_dump(), "threads": cfg.read_threads},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.decode_cpus,
        # Reserving memory also makes the remote args differ from the actors', so Ray Data
        # keeps decode in its own tasks (fused, each actor would decode and infer in turn).
        memory=cfg.decode_memory_mb * 2**20,
        runtime_env=runtime_env,
    )
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "backbone": spec_config(spec).model_dump(),
            "seed": cfg.seed,
            "expect_id": spec.backbone_id,
            "use_gpu": use_gpu,
            "delay_s": cfg.debug.batch_delay_s,
        },
        batch_size=cfg.batch_size,
        batch_format="numpy",
        # All actors start up front: loading a model takes long enough that a pool growing
        # from one actor on demand often never reaches the others' nodes/GPUs on short jobs.
        compute=ray.data.ActorPoolStrategy(
            min_size=cfg.ray.num_workers, max_size=cfg.ray.num_workers
        ),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cfg.ray.cpus_per_worker,
        runtime_env=runtime_env,
        # A dead actor is restarted and its unfinished batches retried on the new one: Ray
        # Data's defaults for actor pools (max_restarts=-1, max_task_retries=-1; passing
        # them is deprecated). tests/test_faults.py kills an actor to hold them to it.
    )


def spec_config(spec: BackboneSpec) -> BackboneConfig:
    """The BackboneConfig that reproduces `spec` on a worker."""
    return BackboneConfig(
        name=spec.name, weights=spec.weights, input_size=spec.input_size,
        mean=spec.mean, std=spec.std, pooling=spec.pooling, levels=max(spec.levels, 1),
        tta=spec.tta,
    )  # fmt: skip


# ---------------------------------------------------------------- driver


class ShardWriter:
    """Gathers embedded rows per shard and writes each shard as soon as it is complete."""

    def __init__(self, cfg: Config, manifest: pd.DataFrame, out_dir: str, todo: list[int]):
        self.cfg, self.manifest, self.out_dir = cfg, manifest, out_dir
        bounds = shard_bounds(len(manifest), cfg.shard_size)
        self.expected = {s: bounds[s][1] - bounds[s][0] for s in todo}
        self.pending: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self.seen = dict.fromkeys(todo, 0)
        self.embedded = 0
        self.retries = 0
        self.quarantine: list[dict[str, str]] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        if "retries" in batch:
            self.retries += int(np.asarray(batch["retries"]).sum())
        shards = batch["row"] // self.cfg.shard_size
        for shard in np.unique(shards):
            mask = shards == shard
            part = (batch["row"][mask], batch["error"][mask], batch["embedding"][mask])
            self.pending.setdefault(int(shard), []).append(part)
            self.seen[int(shard)] += int(mask.sum())
            if self.seen[int(shard)] == self.expected[int(shard)]:
                self._write(int(shard))

    def _write(self, shard: int) -> None:
        parts = self.pending.pop(shard)
        rows = np.concatenate([p[0] for p in parts])
        errors = np.concatenate([p[1] for p in parts])
        embs = np.concatenate([p[2] for p in parts])
        order = np.argsort(rows, kind="stable")
        rows, errors, embs = rows[order], errors[order], embs[order]
        ok = np.asarray([not e for e in errors], dtype=bool)
        bad = self.manifest.iloc[rows[~ok]]
        failed = [
            {"uri": str(u), "reason": str(r)} for u, r in zip(bad["uri"], errors[~ok], strict=True)
        ]
        if failed:  # recorded before the part file, so a crash in between loses nothing
            record_quarantine(self.cfg.workdir, failed)
        table = shard_table(self.manifest.iloc[rows[ok]], embs[ok])
        storage.write_table(table, storage.join(self.out_dir, part_name(shard)))
        self.embedded += int(ok.sum())
        self.quarantine.extend(failed)

    def check_complete(self) -> None:
        missing = {s: self.expected[s] - n for s, n in self.seen.items() if n != self.expected[s]}
        if missing or self.pending:
            raise RuntimeError(
                f"embed: rows missing from shards {missing}: in != out + quarantined"
            )


def record_quarantine(workdir: str, rows: list[dict[str, str]]) -> None:
    """Append rows to data/quarantine.parquet (contract columns uri, reason, stage=`embed`);
    a uri already recorded for this stage is replaced, so a re-run never duplicates it."""
    from medray.data.manifest import QUARANTINE_SCHEMA, read_quarantine

    new = pd.DataFrame(rows, columns=["uri", "reason"]).assign(stage="embed")
    both = pd.concat([read_quarantine(workdir), new], ignore_index=True)
    both = both.drop_duplicates(subset=["uri", "stage"], keep="last")
    table = pa.Table.from_pandas(
        both[["uri", "reason", "stage"]], QUARANTINE_SCHEMA, preserve_index=False
    )
    storage.write_table(table, wd.quarantine(workdir))


def prepare_out_dir(cfg: Config, out_dir: str, plan: dict[str, Any], manifest: pd.DataFrame) -> int:
    """Make the part files agree with `plan` (see the module doc, Growth): another backbone or
    shard size clears them all; otherwise each shard whose rows changed is removed and kept
    shards get current labels. `plan.json` is written after, so a crash in between redoes this
    step. Returns the number of shards relabelled."""
    plan_uri = storage.join(out_dir, PLAN)
    old = storage.read_json(plan_uri) if storage.exists(plan_uri) else None
    same_layout = (
        old is not None
        and "shards" in old
        and all(old.get(k) == plan[k] for k in ("backbone_id", "shard_size"))
    )
    storage.remove(storage.join(out_dir, SUMMARY))  # written again when this run finishes
    relabel: list[int] = []
    if cfg.overwrite or (old is not None and not same_layout):
        if not cfg.overwrite:
            log.warning("embed: %s was made with another shard size/layout: recomputing", out_dir)
        storage.remove(out_dir)
    elif old is not None:
        keep, relabel = reusable_shards(old["shards"], plan["shards"])
        for shard in set(range(max(len(old["shards"]), len(plan["shards"])))) - set(keep):
            storage.remove(storage.join(out_dir, part_name(shard)))
        bounds = shard_bounds(len(manifest), cfg.shard_size)
        for shard in relabel:
            relabel_part(
                storage.join(out_dir, part_name(shard)), manifest.iloc[slice(*bounds[shard])]
            )
    storage.write_json(plan_uri, plan)
    return len(relabel)


def relabel_part(uri: str, rows: pd.DataFrame) -> None:
    """Rewrite a part file's labels and split columns from the manifest `rows` of its shard."""
    if not storage.exists(uri):
        return
    table = storage.read_table(uri)
    current = rows.set_index(rows["id"].astype(str)).loc[table.column("id").to_pylist()]
    columns = {
        "labels": pa.array([list(v) for v in current["labels"]], pa.list_(pa.string())),
        "split": pa.array(current["split"].astype(str).tolist(), pa.string()),
    }
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    storage.write_table(table, uri)


def part_rows(uri: str) -> int:
    """Rows in a finished part file (Parquet footer only)."""
    import pyarrow.parquet as pq

    fs, path = storage.arrow_fs(uri)

    def rows() -> int:
        with fs.open_input_file(path) as fh:
            return pq.ParquetFile(fh).metadata.num_rows

    return storage.retrying(f"read {uri}", rows) if storage.is_s3(uri) else rows()


def storage_failure(exc: BaseException) -> str | None:
    """The message of a `StorageUnavailable` that failed a Ray Data task, if that is what
    `exc` is or wraps (Ray re-raises task errors in its own exception types)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, storage.StorageUnavailable):
            return str(cur).strip().splitlines()[-1]
        cur = cur.__cause__ or cur.__context__
    text = str(exc)
    if "StorageUnavailable" in text:
        lines = [ln for ln in text.splitlines() if "StorageUnavailable" in ln]
        return lines[-1].split("StorageUnavailable:", 1)[-1].strip()
    return None


def embed_shards(
    cfg: Config, manifest: pd.DataFrame, spec: BackboneSpec, out_dir: str, todo: list[int],
    use_gpu: bool,
) -> tuple[ShardWriter, float]:  # fmt: skip
    """Run the Ray Data job over the rows of the `todo` shards; the writer and its seconds."""
    writer = ShardWriter(cfg, manifest, out_dir, todo)
    t0 = time.perf_counter()
    if todo:
        bounds = shard_bounds(len(manifest), cfg.shard_size)
        rows = np.concatenate([np.arange(*bounds[s]) for s in todo])
        frame = pd.DataFrame({"row": rows, "uri": manifest["uri"].to_numpy()[rows]})
        try:
            with Progress("embed", len(rows), "images") as progress:
                for batch in build_dataset(frame, cfg, spec, use_gpu).iter_batches(
                    batch_size=None, batch_format="numpy"
                ):
                    writer.add(batch)
                    progress.advance(len(next(iter(batch.values()))))
        except Exception as exc:
            reason = storage_failure(exc)
            if reason is None:
                raise
            done = sum(1 for s, n in writer.seen.items() if n == writer.expected[s])
            raise storage.StorageUnavailable(
                f"embed: stopped, storage unavailable: {reason}. Nothing was quarantined for "
                f"it; {done} of {len(todo)} shards are written and kept: run the same "
                "command again to resume"
            ) from exc
    writer.check_complete()
    return writer, time.perf_counter() - t0


def finish(cfg: Config, spec: BackboneSpec, out_dir: str, plan: dict, run_id: str) -> dict:
    """Count every shard (footers only), write embed.json, then LATEST; returns the summary."""
    shards = [part_name(s) for s in range(len(shard_bounds(plan["rows"], cfg.shard_size)))]
    count = sum(part_rows(storage.join(out_dir, name)) for name in shards)
    summary = {
        "backbone": spec.model_dump(),
        "dim": spec.dim,
        "count": count,
        "quarantined": plan["rows"] - count,
        "shards": shards,
        "shard_size": cfg.shard_size,
        "manifest_sha256": plan["manifest_sha256"],
        "mlflow_run_id": run_id,
    }
    storage.write_json(storage.join(out_dir, SUMMARY), summary)
    storage.write_text(wd.latest_embeddings(cfg.workdir), spec.backbone_id + "\n")
    return summary


def run(config: Config) -> Result:
    """Embed the manifest (module doc); returns counts, throughput and the backbone id."""
    import mlflow

    from medray import raycluster, tracking
    from medray.data.manifest import read_manifest
    from medray.models import fit_input_size, load_backbone

    cfg, start = config, time.perf_counter()
    manifest = read_manifest(cfg.workdir).reset_index(drop=True)
    if manifest.empty:
        raise ValueError(f"{wd.manifest(cfg.workdir)}: manifest has no rows to embed")
    bcfg, source = resolve_backbone(cfg)
    bcfg = fit_input_size(bcfg, manifest["uri"].tolist())
    spec = load_backbone(bcfg, seed=cfg.seed).spec
    out_dir = wd.embeddings(cfg.workdir, spec.backbone_id)
    plan = {"manifest_sha256": storage.sha256(wd.manifest(cfg.workdir)),
            "shard_size": cfg.shard_size, "rows": len(manifest), "backbone_id": spec.backbone_id,
            "shards": shard_keys(manifest, cfg.shard_size)}  # fmt: skip
    relabelled = prepare_out_dir(cfg, out_dir, plan, manifest)
    n_shards = len(shard_bounds(len(manifest), cfg.shard_size))
    todo = [s for s in range(n_shards) if not storage.exists(storage.join(out_dir, part_name(s)))]
    if todo:  # a finished run needs no cluster
        raycluster.init(cfg.ray)
    use_gpu = bool(todo) and raycluster.use_gpu(cfg.ray)
    params = {**cfg.model_dump(exclude={"mlflow", "ray"}), "backbone_id": spec.backbone_id,
              "backbone_source": source, "use_gpu": use_gpu, "ray": cfg.ray.model_dump()}  # fmt: skip
    with tracking.stage_run(cfg.mlflow, cfg.workdir, "embed", params) as mlrun:
        writer, job_s = embed_shards(cfg, manifest, spec, out_dir, todo, use_gpu)
        summary = finish(cfg, spec, out_dir, plan, mlrun.info.run_id)
        result = Result(
            backbone_id=spec.backbone_id, backbone_source=source, dim=spec.dim,
            images_in=len(manifest), count=summary["count"], quarantined=summary["quarantined"],
            embedded_now=writer.embedded, quarantined_now=len(writer.quarantine),
            storage_retries=writer.retries,
            shards=n_shards, shards_skipped=n_shards - len(todo), shards_relabelled=relabelled,
            images_per_s=round(writer.embedded / job_s, 2) if writer.embedded else 0.0,
            seconds=round(time.perf_counter() - start, 2), out_dir=out_dir,
            mlflow_run_id=mlrun.info.run_id,
        )  # fmt: skip
        numbers = {k: float(v) for k, v in result.model_dump().items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        mlflow.log_metrics(numbers)
        mlflow.log_dict(summary, "embed.json")
    return result


def read_embeddings(
    workdir: str, backbone_id: str | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """A finished embed run's rows (id, uri, labels, split) and (N, D) float32 embeddings."""
    bid = wd.current_backbone_id(workdir, backbone_id)
    out_dir = wd.embeddings(workdir, bid)
    summary_uri = storage.join(out_dir, SUMMARY)
    if not storage.exists(summary_uri):
        raise FileNotFoundError(
            f"{summary_uri}: embeddings for {bid} are missing or unfinished; "
            f"run `medray run embed --workdir {workdir}`"
        )
    summary = storage.read_json(summary_uri)
    tables = [storage.read_table(storage.join(out_dir, name)) for name in summary["shards"]]
    table = pa.concat_tables(tables)
    dim = int(summary["dim"])
    column = table.column("embedding").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if len(values) != table.num_rows * dim:
        raise ValueError(f"{out_dir}: embeddings are not all of dimension {dim}")
    frame = table.drop(["embedding"]).to_pandas()
    frame["labels"] = [list(v) if v is not None else [] for v in frame["labels"]]
    out = values.reshape(table.num_rows, dim)
    del tables, table, column
    # Arrow's allocator keeps what reading the shards freed (about twice the matrix at 40k x
    # 1280) unless asked to give it back; the caller holds the matrix for a long while.
    pa.default_memory_pool().release_unused()
    return frame, out
