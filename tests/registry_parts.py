"""A small workdir with every part a bundle needs, written in the docs/contracts.md formats
without Ray: real images, a real backbone's embeddings, a real FAISS index, a head and
metrics computed from the embeddings with medray.metrics. Used by tests/test_registry.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medray import storage
from medray import workdir as wd
from medray.config import BackboneConfig

CLASSES = ("stripes", "checks", "dots")


def texture(kind: str, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A uint8 (size, size, 3) tile: one texture per class, random colours and phase."""
    yy, xx = np.mgrid[:size, :size]
    period = int(rng.integers(5, 9))
    phase = int(rng.integers(0, period))
    if kind == "stripes":
        mask = ((xx + phase) // (period // 2 + 1)) % 2 == 0
    elif kind == "checks":
        mask = (((xx + phase) // period) + ((yy + phase) // period)) % 2 == 0
    else:
        mask = ((xx + phase) % period - period / 2) ** 2 + (
            (yy + phase) % period - period / 2
        ) ** 2 < (period / 3) ** 2
    fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(root: Path, n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        path = root / "data" / "images" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(label, rng)).save(path)
        split = ("train", "train", "val", "test")[i % 4]
        rows.append({"id": f"img{i:03d}", "uri": str(path), "labels": [label],
                     "patient_id": f"p{i}", "split": split})  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.to_parquet(wd.manifest(str(root)))
    storage.write_json(wd.dataset_info(str(root)), {"label_names": sorted(CLASSES), "multi_label": False,
                                                  "source": "test", "counts": {"images": n}})  # fmt: skip
    return frame


def write_embeddings(root: Path, frame: pd.DataFrame, weights: str, seed: int):
    from medray.embed import shard_table
    from medray.models import embed_pixels, load_backbone, resize_image

    backbone = load_backbone(BackboneConfig(weights=weights, input_size=64), seed=seed)
    spec = backbone.spec
    pixels = np.stack(
        [resize_image(np.asarray(Image.open(u).convert("RGB")), spec) for u in frame["uri"]]
    )
    emb = embed_pixels(backbone.model, spec, pixels)
    out = wd.embeddings(str(root), spec.backbone_id)
    storage.write_table(shard_table(frame, emb), storage.join(out, "part-00000.parquet"))
    summary = {"backbone": spec.model_dump(), "dim": spec.dim, "count": len(frame), "quarantined": 0,
               "shards": ["part-00000.parquet"], "manifest_sha256": storage.sha256(wd.manifest(str(root))),
               "mlflow_run_id": None}  # fmt: skip
    storage.write_json(storage.join(out, "embed.json"), summary)
    storage.write_text(wd.latest_embeddings(str(root)), spec.backbone_id + "\n")
    return spec, emb


def write_index(root: Path, frame: pd.DataFrame, spec, emb: np.ndarray) -> None:
    import faiss

    from medray.index import write_index as write

    index = faiss.IndexFlatIP(spec.dim)
    index.add(emb)
    meta = {"backbone_id": spec.backbone_id, "dim": spec.dim, "metric": "ip", "factory": "Flat",
            "count": len(frame), "nprobe": 1, "layout": {"kind": "single-file"}, "mlflow_run_id": None}  # fmt: skip
    write(wd.index(str(root), spec.backbone_id), index, frame, meta)


def write_head(root: Path, spec, emb: np.ndarray, frame: pd.DataFrame) -> None:
    """A linear head fitted by a few steps of full-batch gradient descent."""
    import torch

    from medray.heads.model import arch_dict, build_head, save_head

    names = sorted(CLASSES)
    y = torch.tensor([names.index(lab[0]) for lab in frame["labels"]])
    head = build_head("linear", spec.dim, len(names))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    x = torch.tensor(emb)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    head.eval()
    acc = float((head(x).argmax(1) == y).float().mean())
    meta = {"task": "texture", "kind": "multiclass", "column": "labels", "label_names": names,
            "thresholds": {n: 0.5 for n in names}, "arch": arch_dict("linear", spec.dim, len(names), 0, 0.0),
            "backbone_id": spec.backbone_id,
            "metrics": {"test": {"accuracy": acc, "macro_f1": acc, "micro_f1": acc, "macro_auroc": None},
                        "val_macro_f1": acc}}  # fmt: skip
    save_head(wd.heads(str(root), "texture"), head, meta)


def write_metrics(root: Path, spec, emb: np.ndarray, frame: pd.DataFrame) -> dict:
    """Leave-one-out retrieval and pair verification, as the evaluate stage reports them."""
    from medray import metrics as m

    labels, _ = m.label_matrix(list(frame["labels"]))
    _, rows = m.loo_neighbours(emb, 10)
    gain = m.gains(labels, labels, rows)
    i, j = np.triu_indices(len(emb), 1)
    sims = (emb[i] * emb[j]).sum(1)
    same = (labels[i] & labels[j]).any(1)
    threshold, acc = m.choose_pair_threshold(sims, same)
    out = {
        "backbone_id": spec.backbone_id,
        "retrieval": {"p@5": m.precision_at_k(gain, 5), "map@10": m.map_at_k(gain, 10),
                      "avg@5": m.avg_at_k(gain, 5)},
        "pair": {"accuracy": acc, "threshold": threshold},
        "counts": {"queries": len(emb)},
    }  # fmt: skip
    storage.write_json(storage.join(wd.eval_dir(str(root)), "metrics.json"), out)
    return out


def make_workdir(root: Path, n: int = 30, weights: str = "bundled", seed: int = 0) -> dict:
    """Write every part under `root`; returns the metrics written."""
    frame = write_images(root, n)
    spec, emb = write_embeddings(root, frame, weights, seed)
    write_index(root, frame, spec, emb)
    write_head(root, spec, emb, frame)
    return write_metrics(root, spec, emb, frame)
