"""The service bundle: everything one served model needs, in one checksummed directory.

A bundle is built from a workdir's current parts (`build_bundle`) and is what the MLflow
registry stores as one model version. Layout (every file listed with its sha256 in
`bundle.json`, which is written last):

    bundle.json                     manifest: backbone id, dim, tasks, pair threshold,
                                    metrics, lineage, files {relative path: sha256}
    backbone/backbone.safetensors   backbone weights (num_classes=0 state dict)
    backbone/backbone.json          spec: name, input size, mean/std, interpolation, pooling, dim, id
    adapter/adapter.json + .safetensors   retrieval adapter (medray.adapt), when the
                                    embeddings were adapted; serving applies it after the backbone
    index/index.json + its files    FAISS index and gallery table (medray.index format)
    heads/<task>/head.safetensors   one head per task, with head.json (labels, thresholds)
    eval/metrics.json               the evaluate stage's metrics (pair threshold inside)
    data/dataset.json               label names and counts of the data it was made from

`bundle.json` is the commit marker: `build_bundle` removes an old one before writing anything
and writes the new one only once every file is in place (each written atomically: temp file
+ rename locally, one PUT on S3), so a build or upload cut short leaves a directory that
`load_bundle` refuses. `load_bundle` verifies every checksum, then that the weights hash to
the backbone id the index and the heads were built from; any mismatch raises `BundleError`
naming the file. `load_bundle(parts=...)` loads and verifies only some parts (a serving
deployment's), checking them against the ids and dims the manifest records.
Nothing in a bundle is pickled: safetensors, FAISS's own format, Arrow and JSON.
"""

from __future__ import annotations

import datetime as dt
import logging

from medray import storage
from medray import workdir as wd
from medray.config import BackboneConfig
from medray.registry import lineage
from medray.registry.service import ServiceBundle

log = logging.getLogger(__name__)

FORMAT = "medray-bundle/1"
MANIFEST = "bundle.json"
BACKBONE_DIR = "backbone"
INDEX_DIR = "index"
HEADS_DIR = "heads"
ADAPTER_DIR = "adapter"
METRICS = "eval/metrics.json"
DATASET = "data/dataset.json"

__all__ = ["PARTS", "BundleError", "ServiceBundle", "build_bundle", "load_bundle", "verify_files"]


class BundleError(ValueError):
    """A bundle that cannot be built or served as it is; the message names the file."""


# ---------------------------------------------------------------- building


def build_bundle(
    workdir: str, out_dir: str, backbone_id: str | None = None, tracking_uri: str | None = None
) -> dict:
    """Collect the workdir's current backbone, index, heads and metrics into `out_dir`
    (local or s3://) and write `bundle.json` last; returns that manifest."""
    workdir = storage.resolve(workdir)
    bid = wd.current_backbone_id(workdir, backbone_id)
    storage.remove(storage.join(out_dir, MANIFEST))  # rebuilt in place: never half old, half new
    embed = _read_required(storage.join(wd.embeddings(workdir, bid), "embed.json"), "embed")
    metrics = _read_required(storage.join(wd.eval_dir(workdir), "metrics.json"), "evaluate")
    if metrics.get("backbone_id") not in (None, bid):
        raise BundleError(
            f"{storage.join(wd.eval_dir(workdir), 'metrics.json')}: metrics are for backbone "
            f"{metrics['backbone_id']}, the current embeddings for {bid}; run `medray run evaluate`"
        )
    pair_threshold = _pair_threshold(metrics, workdir)
    source_bid = embed.get("source_backbone_id") or bid
    spec = _copy_backbone(embed, source_bid, out_dir, _seed_of(embed, workdir, tracking_uri))
    adapter = _copy_adapter(workdir, bid, out_dir) if embed.get("adapter") else None
    index_meta = _copy_index(workdir, bid, out_dir)
    tasks = _copy_heads(workdir, bid, out_dir)
    storage.write_json(storage.join(out_dir, METRICS), metrics)
    if storage.exists(wd.dataset_info(workdir)):
        storage.write_bytes(
            storage.join(out_dir, DATASET), storage.read_bytes(wd.dataset_info(workdir))
        )
    manifest = {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "backbone_id": bid,
        "dim": int(adapter["out_dim"] if adapter else spec["dim"]),
        "backbone": spec,
        "adapter": adapter,
        "index": {
            k: index_meta.get(k)
            for k in ("factory", "metric", "count", "search_params", "recall_at_10")
        }
        | {"shards": len((index_meta.get("layout") or {}).get("shards") or [None])},
        "tasks": tasks,
        "pair_threshold": pair_threshold,
        "metrics": metrics,
        "lineage": lineage.collect(workdir, embed, index_meta, metrics, tracking_uri),
        "files": _checksums(out_dir),
    }
    storage.write_json(storage.join(out_dir, MANIFEST), manifest)
    return manifest


def _read_required(uri: str, stage: str) -> dict:
    if not storage.exists(uri):
        raise BundleError(f"{uri}: missing; run `medray run {stage}` before registering")
    return storage.read_json(uri)


def _pair_threshold(metrics: dict, workdir: str) -> float:
    try:
        return float(metrics["pair"]["threshold"])
    except (KeyError, TypeError, ValueError):
        raise BundleError(
            f"{storage.join(wd.eval_dir(workdir), 'metrics.json')}: no pair.threshold; "
            "run `medray run evaluate`"
        ) from None


def _seed_of(embed: dict, workdir: str, tracking_uri: str | None) -> int:
    """The seed the embed run built its backbone with (only `random` weights depend on it)."""
    params = lineage.run_params(embed.get("mlflow_run_id"), workdir, tracking_uri)
    try:
        return int(params.get("seed", 0))
    except ValueError:
        return 0


def _copy_backbone(embed: dict, bid: str, out_dir: str, seed: int) -> dict:
    """Rebuild the embed run's backbone, check it hashes to `bid`, export it as safetensors."""
    from medray.models import export_backbone, load_backbone

    spec = dict(embed["backbone"])
    cfg = BackboneConfig(
        name=spec["name"], weights=spec["weights"], input_size=spec["input_size"],
        mean=tuple(spec["mean"]), std=tuple(spec["std"]), pooling=spec.get("pooling", "avg"),
        levels=max(int(spec.get("levels", 0)), 1), tta=spec.get("tta", "none"),
    )  # fmt: skip
    backbone = load_backbone(cfg, seed=seed)
    if backbone.spec.backbone_id != bid:
        raise BundleError(
            f"backbone {spec['weights']!r}: its weights now hash to {backbone.spec.backbone_id}, "
            f"but the embeddings and index were made with {bid}; re-run `medray run embed`"
        )
    full = backbone.spec.model_copy(update={"interpolation": spec.get("interpolation", "bicubic")})
    extra = {"source": str(spec["weights"]), "mlflow_run_id": embed.get("mlflow_run_id")}
    export_backbone(backbone.model, full, storage.join(out_dir, BACKBONE_DIR), extra)
    return storage.read_json(storage.join(out_dir, BACKBONE_DIR, "backbone.json"))


def _copy_adapter(workdir: str, space_id: str, out_dir: str) -> dict:
    """Copy the space's retrieval adapter (checked by loading it); returns adapter.json."""
    from medray.adapt.adapter import SPEC, WEIGHTS, load_adapter

    src = wd.embeddings(workdir, space_id)
    adapter = load_adapter(src)
    if adapter.meta.get("space_id") != space_id:
        raise BundleError(
            f"{storage.join(src, SPEC)}: adapter for {adapter.meta.get('space_id')}, "
            f"embeddings are {space_id}; re-run `medray run adapt`"
        )
    for name in (WEIGHTS, SPEC):
        data = storage.read_bytes(storage.join(src, name))
        storage.write_bytes(storage.join(out_dir, ADAPTER_DIR, name), data)
    return adapter.meta


def _copy_index(workdir: str, bid: str, out_dir: str) -> dict:
    """Copy index.json and every file it lists (checked against its own checksums); for a
    sharded index, every shard directory too."""
    from medray.index import IndexMismatch, load_index
    from medray.index.shards import files_of

    src = wd.index(workdir, bid)
    try:
        load_index(src, expect_backbone_id=bid)
    except FileNotFoundError as exc:
        raise BundleError(str(exc)) from None
    except IndexMismatch as exc:
        raise BundleError(f"{src}: {exc}; re-run `medray run index`") from None
    meta = storage.read_json(storage.join(src, "index.json"))
    for name, want in files_of(src).items():  # one index's files, or every shard's
        parts = name.split("/")
        data = storage.read_bytes(storage.join(src, *parts))
        if want is not None and storage.sha256_bytes(data) != want:
            raise BundleError(f"{src}/{name}: altered file; re-run `medray run index`")
        storage.write_bytes(storage.join(out_dir, INDEX_DIR, *parts), data)
    return meta


def _copy_heads(workdir: str, bid: str, out_dir: str) -> dict:
    """Copy every head trained on `bid`; heads trained on another backbone are left out."""
    tasks: dict[str, dict] = {}
    for head_dir in storage.listdir(wd.heads(workdir)):
        meta_uri = storage.join(head_dir, "head.json")
        if not storage.exists(meta_uri):
            continue
        meta = storage.read_json(meta_uri)
        if meta.get("backbone_id") != bid:
            log.warning(
                "%s: head trained on %s, not %s: left out", head_dir, meta.get("backbone_id"), bid
            )
            continue
        task = str(meta["task"])
        for name in ("head.safetensors", "head.json"):
            data = storage.read_bytes(storage.join(head_dir, name))
            storage.write_bytes(storage.join(out_dir, HEADS_DIR, task, name), data)
        tasks[task] = {
            "kind": meta["kind"],
            "label_names": list(meta["label_names"]),
            "thresholds": dict(meta.get("thresholds") or {}),
            "metrics": head_metrics(meta),
        }
    return tasks


def head_metrics(meta: dict) -> dict[str, float]:
    """The head's headline metrics on its held-out split (test, else val)."""
    metrics = meta.get("metrics") or {}
    split = next((s for s in ("test", "val") if isinstance(metrics.get(s), dict)), None)
    if split is None:
        return {}
    keep = ("accuracy", "macro_f1", "micro_f1", "macro_auroc")
    return {
        k: float(metrics[split][k]) for k in keep if isinstance(metrics[split].get(k), (int, float))
    }


def _checksums(out_dir: str) -> dict[str, str]:
    """{relative path (with /): sha256} of every file under `out_dir` except the manifest."""
    files: dict[str, str] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        for child in storage.listdir(storage.join(out_dir, *rel.split("/")) if rel else out_dir):
            name = child.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
            child_rel = f"{rel}/{name}" if rel else name
            if storage.listdir(child):  # a directory (or an S3 prefix with children)
                stack.append(child_rel)
            elif child_rel != MANIFEST:
                files[child_rel] = storage.sha256(child)
    return dict(sorted(files.items()))


# ---------------------------------------------------------------- loading


def read_manifest(path: str) -> dict:
    uri = storage.join(path, MANIFEST)
    if not storage.exists(uri):
        if storage.listdir(path):
            raise BundleError(
                f"{uri}: missing: not a medray bundle, or an incomplete one (a build or upload "
                f"interrupted before {MANIFEST}, written last); build or download it again"
            )
        raise BundleError(f"{uri}: not a medray bundle (no {MANIFEST})")
    manifest = storage.read_json(uri)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise BundleError(
            f"{uri}: unknown bundle format {manifest.get('format')!r} (want {FORMAT})"
        )
    return manifest


PARTS = ("backbone", "index", "heads")
"""What a deployment may load alone: the Embedder the backbone (with the retrieval adapter),
the Retriever the index and gallery, the Classifier the heads."""
PART_DIRS = {"backbone": (BACKBONE_DIR, ADAPTER_DIR), "index": (INDEX_DIR,), "heads": (HEADS_DIR,)}
REQUIRED = {"backbone": f"{BACKBONE_DIR}/backbone.safetensors", "index": f"{INDEX_DIR}/index.json"}


def check_parts(parts) -> tuple[str, ...]:
    """`parts` as a tuple in PARTS order (None: all of them); an unknown name is an error."""
    if parts is None:
        return PARTS
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"bundle parts {list(parts)!r}: choose from {list(PARTS)}")
    return tuple(p for p in PARTS if p in parts)


def files_for(manifest: dict, parts: tuple[str, ...]) -> dict[str, str]:
    """{relative path: sha256} of the files `parts` read (every file when all are loaded)."""
    if set(parts) == set(PARTS):
        return dict(manifest["files"])
    dirs = tuple(f"{d}/" for p in parts for d in PART_DIRS[p])
    return {rel: sha for rel, sha in manifest["files"].items() if rel.startswith(dirs)}


def verify_files(path: str, manifest: dict, parts=None) -> str:
    """The files `parts` read (every file listed in bundle.json by default) are present with
    their recorded sha256, streamed from the file. Returns a local directory holding them:
    `path` itself, or for an s3:// bundle a cache directory they were downloaded to once."""
    from medray.index.load import cache_dir, local_verified

    parts = check_parts(parts)
    required = [REQUIRED[p] for p in parts if p in REQUIRED]
    if set(parts) == set(PARTS):
        required.append(METRICS)
    for rel in required:
        if rel not in manifest["files"]:
            raise BundleError(f"{storage.join(path, rel)}: required file not listed in {MANIFEST}")
    for rel, want in files_for(manifest, parts).items():
        uri = storage.join(path, *rel.split("/"))
        try:
            _, got = local_verified(path, rel, want)
        except FileNotFoundError:
            raise BundleError(f"{uri}: missing from the bundle (listed in {MANIFEST})") from None
        if got != want:
            raise BundleError(
                f"{uri}: altered file: sha256 {got[:12]}... != {want[:12]}... recorded in {MANIFEST}"
            )
    return cache_dir(path) if storage.is_s3(path) else path


def load_bundle(path: str, info: dict | None = None, parts=None) -> ServiceBundle:
    """Load a bundle directory (local or s3://), only the `parts` asked for (PARTS; None: all):
    checksums of the files they read, and their agreement with the manifest (backbone id,
    dim, index and heads built from that backbone), so a part loaded alone is checked as
    strictly as the whole bundle. Raises BundleError naming the file that does not fit."""
    parts = check_parts(parts)
    manifest = read_manifest(path)
    local = verify_files(path, manifest, parts)
    backbone = adapter = index = heads = None
    if "backbone" in parts:
        backbone, adapter = _load_backbone(path, local, manifest)
    if "index" in parts:
        index = _load_index(path, local, manifest)
    if "heads" in parts:
        heads = _load_heads(path, local, manifest)
    return ServiceBundle(backbone, index, heads, manifest, info or {}, adapter=adapter, parts=parts)


def _load_backbone(path: str, local: str, manifest: dict):
    """(backbone, adapter or None); the weights must hash to the id the manifest records."""
    from medray.models import WeightsMismatch, load_backbone

    weights = storage.join(path, BACKBONE_DIR, "backbone.safetensors")
    adapter_meta = manifest.get("adapter")
    want = manifest["backbone"]["backbone_id"] if adapter_meta else manifest["backbone_id"]
    try:
        backbone = load_backbone(
            BackboneConfig(
                name=manifest["backbone"]["name"], weights=storage.join(local, BACKBONE_DIR)
            )
        )
    except WeightsMismatch as exc:
        raise BundleError(f"{weights}: {exc}") from None
    if backbone.spec.backbone_id != want:
        raise BundleError(
            f"{weights}: weights hash to {backbone.spec.backbone_id}, bundle is for {want}"
        )
    adapter = _load_adapter(path, local, manifest, backbone.spec.dim) if adapter_meta else None
    return backbone, adapter


def _load_index(path: str, local: str, manifest: dict):
    """The index and gallery, memory-mapped; their checksums are the bundle's, just verified
    (a second pass over a GB-sized file would only slow a swap down)."""
    from medray.index import IndexMismatch, load_index

    try:
        return load_index(
            storage.join(local, INDEX_DIR), expect_dim=int(manifest["dim"]),
            expect_backbone_id=manifest["backbone_id"], mmap=True, verify=False,
        )  # fmt: skip
    except IndexMismatch as exc:
        raise BundleError(f"{storage.join(path, INDEX_DIR, 'index.json')}: {exc}") from None


def _load_heads(path: str, local: str, manifest: dict) -> dict:
    from medray.heads import load_head

    bid, dim = manifest["backbone_id"], int(manifest["dim"])
    heads = {}
    for task in manifest.get("tasks", {}):
        head = load_head(storage.join(local, HEADS_DIR, task))
        if head.meta.get("backbone_id") != bid or head.meta["arch"]["in_dim"] != dim:
            raise BundleError(
                f"{storage.join(path, HEADS_DIR, task, 'head.json')}: head for backbone "
                f"{head.meta.get('backbone_id')} (in_dim {head.meta['arch']['in_dim']}), bundle "
                f"backbone {bid} (dim {dim})"
            )
        heads[task] = head
    return heads


def _load_adapter(path: str, local: str, manifest: dict, backbone_dim: int):
    """The bundle's retrieval adapter, checked against the backbone and the space."""
    from medray.adapt.adapter import AdapterError, load_adapter

    uri = storage.join(path, ADAPTER_DIR)
    try:
        adapter = load_adapter(storage.join(local, ADAPTER_DIR))
    except (AdapterError, FileNotFoundError) as exc:
        raise BundleError(str(exc)) from None
    if adapter.in_dim != backbone_dim or adapter.out_dim != int(manifest["dim"]):
        raise BundleError(
            f"{uri}: adapter maps {adapter.in_dim} -> {adapter.out_dim}, bundle backbone gives "
            f"{backbone_dim} and its index holds {manifest['dim']}"
        )
    if adapter.meta.get("space_id") != manifest["backbone_id"]:
        raise BundleError(f"{uri}: adapter for {adapter.meta.get('space_id')}, bundle is "
                          f"{manifest['backbone_id']}")  # fmt: skip
    return adapter
