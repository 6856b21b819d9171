"""`bench/serve.py --gallery N`: memory of every Serve replica when the gallery holds N images.

Builds (once, reused from --gallery-dir) a bundle whose index holds N synthetic unit vectors
of the bundled backbone's dimension (EfficientNet-Lite0, avg pooling: 1280; no images are
needed for the gallery, only for the queries) with `--factory`, written by medray.index's
own `trained_empty` / `add_vectors` / `write_index`. Then:

1. side by side in two fresh processes: the index part loaded the way medray loaded it before
   (whole file read, deserialised, gallery as pandas lists plus a dict of ids) and the way it
   is loaded now (`load_bundle(parts=["index"])`: FAISS file memory-mapped, Arrow gallery
   memory-mapped, hashed id lookup), each followed by the same searches;
2. the Serve application on the bundle (Retriever at `--retriever-replicas` replicas),
   driven with /v1/search for `--seconds`, then RSS / PSS / file-backed RSS of each replica
   of each deployment, read from /proc.

The goal (issue 13): a Retriever replica's RSS within 1.3x of index file + gallery file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MB = 1 << 20


def unit_vectors(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """n vectors near random centres (clustered like embeddings, not uniform), L2-normalised."""
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.6 * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(x.shape[1])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def build_bundle(out: Path, n: int, factory: str, train_size: int, chunk: int = 100_000) -> Path:
    """A servable bundle (real bundled backbone, no heads) whose index holds n synthetic vectors."""
    import pandas as pd

    from medray import storage
    from medray.config import BackboneConfig
    from medray.index import add_vectors, trained_empty, write_index
    from medray.models import export_backbone, load_backbone
    from medray.registry.bundle import FORMAT, MANIFEST

    if (out / MANIFEST).exists():
        print(f"reusing the bundle in {out}", flush=True)
        return out
    t0 = time.perf_counter()
    backbone = load_backbone(BackboneConfig(pooling="avg", tta="none", input_size=224))
    spec = backbone.spec
    export_backbone(backbone.model, spec, str(out / "backbone"), {"source": "bundled"})
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4096, spec.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    index = trained_empty(unit_vectors(rng, centres, train_size), factory, train_size, 0)
    for start in range(0, n, chunk):
        index = add_vectors(index, unit_vectors(rng, centres, min(chunk, n - start)))
        print(f"  added {index.ntotal:,} / {n:,} ({time.perf_counter() - t0:.0f} s)", flush=True)
    ids = [f"img{i:08d}" for i in range(n)]
    rows = pd.DataFrame({"id": ids, "uri": [f"/archive/{i}.png" for i in ids],
                         "labels": [[f"class{i % 9}"] for i in range(n)],
                         "split": np.where(np.arange(n) % 5 == 0, "test", "train")})  # fmt: skip
    meta = {"backbone_id": spec.backbone_id, "dim": spec.dim, "count": n, "metric": "ip",
            "factory": factory, "search_params": {"nprobe": 16}}  # fmt: skip
    write_index(str(out / "index"), index, rows, meta)
    del index, rows
    metrics = {"backbone_id": spec.backbone_id, "pair": {"threshold": 0.8}}
    storage.write_json(str(out / "eval" / "metrics.json"), metrics)
    files = {p.relative_to(out).as_posix(): storage.sha256(str(p))
             for p in sorted(out.rglob("*")) if p.is_file()}  # fmt: skip
    manifest = {"format": FORMAT, "backbone_id": spec.backbone_id, "dim": spec.dim,
                "backbone": json.loads((out / "backbone" / "backbone.json").read_text()),
                "adapter": None, "index": {"factory": factory, "metric": "ip", "count": n},
                "tasks": {}, "pair_threshold": 0.8, "metrics": metrics, "lineage": {},
                "files": files}  # fmt: skip
    storage.write_json(str(out / MANIFEST), manifest)
    print(f"built {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def memory(pid: int | str = "self") -> dict[str, float]:
    """MB: rss, anon (private heap), file (mapped file pages), pss (shared pages split)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    pss = 0.0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1]) / 1024
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"],
            "pss": pss, "peak": fields["VmHWM"]}  # fmt: skip


LOADERS = {
    "before": """
import faiss, numpy as np, pyarrow.ipc as ipc, pyarrow as pa
d = INDEX_DIR
index = faiss.deserialize_index(np.frombuffer(open(d + "/index.faiss", "rb").read(), np.uint8))
gallery = ipc.open_file(pa.memory_map(d + "/gallery.arrow")).read_all().to_pandas()
gallery["labels"] = [list(v) for v in gallery["labels"]]
rows = {str(i): n for n, i in enumerate(gallery["id"])}
faiss.extract_index_ivf(index).nprobe = 16
def search(q):
    _, r = index.search(q, 10)
    return [gallery.iloc[int(j)]["uri"] for j in r[0]]
""",
    "now": """
from medray.registry import load_bundle
bundle = load_bundle(BUNDLE, parts=["index"])
def search(q):
    return [h["uri"] for h in bundle.search(q, 10)[0]]
""",
}


def loader_memory(bundle: Path, how: str, queries: int = 200) -> dict[str, float]:
    """Memory of a fresh process after loading the index part `how` and `queries` searches."""
    script = (
        LOADERS[how]
        + f"""
import json, sys, numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
from gallery_rss import memory
q = np.random.default_rng(1).standard_normal((1, DIM), dtype=np.float32)
for i in range({queries}):
    search(q / np.linalg.norm(q)); q = np.roll(q, 1)
print(json.dumps(memory()))
"""
    )
    dim = json.loads((bundle / "bundle.json").read_text())["dim"]
    script = (script.replace("INDEX_DIR", repr(str(bundle / "index")))
              .replace("BUNDLE", repr(str(bundle))).replace("DIM", str(dim)))  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def replica_pids(app: str) -> dict[str, list[int]]:
    """{deployment: [pid, ...]} of this machine's Serve replicas of `app` (by process title)."""
    out: dict[str, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        marker = f"ServeReplica:{app}:"
        if marker in title:
            name = title.split(marker, 1)[1].split()[0].split(".")[0]
            out.setdefault(name, []).append(int(proc.name))
    return {k: sorted(v) for k, v in sorted(out.items())}


def serve_memory(args, bundle: Path, files, drive, http_call) -> dict[str, list[dict]]:
    from medray.serving.config import Autoscaling, ServeConfig
    from medray.serving.local import start, stop

    cfg = ServeConfig(workdir=str(bundle.parent), bundle_path=str(bundle), port=0)
    for dep in (cfg.embedder, cfg.classifier):
        dep.autoscaling = Autoscaling(min_replicas=1, max_replicas=1)
    r = args.retriever_replicas
    cfg.retriever.autoscaling = Autoscaling(min_replicas=r, max_replicas=r)
    served = start(cfg)
    try:
        drive(http_call(served.url, served.keys.local_key, args.k), files, 4, args.seconds)
        pids = replica_pids(served.app_name)
        return {name: [{"pid": p, **memory(p)} for p in ps] for name, ps in pids.items()}
    finally:
        stop()


def run(args, files, drive, http_call, machine: str) -> None:
    import ray

    bundle = build_bundle(Path(args.gallery_dir), args.gallery, args.factory, args.train_size)
    index_mb = (bundle / "index" / "index.faiss").stat().st_size / MB
    gallery_mb = (bundle / "index" / "gallery.arrow").stat().st_size / MB
    files_mb = index_mb + gallery_mb
    side = {how: loader_memory(bundle, how) for how in ("before", "now")}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        replicas = serve_memory(args, bundle, files, drive, http_call)
    finally:
        ray.shutdown()
    print(f"\nratios: RSS / (index file + gallery file = {files_mb:,.0f} MB); goal <= 1.3")
    print(
        f"  one process, index part loaded before (read whole, pandas gallery): "
        f"{side['before']['rss'] / files_mb:.2f} (peak {side['before']['peak'] / files_mb:.2f})"
    )
    print(f"  one process, index part loaded now (mmap index, mmap Arrow gallery): "
          f"{side['now']['rss'] / files_mb:.2f} (peak {side['now']['peak'] / files_mb:.2f})"
          f"; now/before RSS {side['now']['rss'] / side['before']['rss']:.2f}")  # fmt: skip
    for i, rep in enumerate(replicas.get("Retriever", [])):
        print(f"  Serve Retriever replica {i}: {rep['rss'] / files_mb:.2f}")
    print("\nabsolute (MB)")
    print(f"{'process':<34} {'RSS':>8} {'anon':>8} {'file':>8} {'PSS':>8} {'peak':>8}")
    for how, m in side.items():
        print(f"{'loader ' + how:<34} {m['rss']:>8.0f} {m['anon']:>8.0f} {m['file']:>8.0f} "
              f"{m['pss']:>8.0f} {m['peak']:>8.0f}")  # fmt: skip
    for name, reps in replicas.items():
        for i, m in enumerate(reps):
            label = f"{name} replica {i} (pid {m['pid']})"
            print(f"{label:<34} {m['rss']:>8.0f} {m['anon']:>8.0f} {m['file']:>8.0f} "
                  f"{m['pss']:>8.0f} {m['peak']:>8.0f}")  # fmt: skip
    print(f"\ngallery {args.gallery:,} x {json.loads((bundle / 'bundle.json').read_text())['dim']} "
          f"{args.factory}: index.faiss {index_mb:,.0f} MB, gallery.arrow {gallery_mb:,.0f} MB; "
          f"Serve driven {args.seconds:.0f} s at concurrency 4")  # fmt: skip
    print(f"machine: {machine}")
