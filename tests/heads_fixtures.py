"""Fabricated embeddings in the docs/contracts.md layout, for heads/select tests that must
not wait on images: Gaussian clusters per label set, L2-normalised, split 60/20/20."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medray import storage
from medray import workdir as wd

LABELS = ["adipose", "stroma", "tumor"]


def make_labels(n: int, multi_label: bool, rng: np.random.Generator) -> list[list[str]]:
    if not multi_label:
        return [[LABELS[i % len(LABELS)]] for i in range(n)]
    out = []
    for i in range(n):
        if i % 5 == 0:
            out.append([])  # "normal": no finding
        else:
            out.append([lab for lab in LABELS if rng.random() < 0.45] or [LABELS[i % 3]])
    return out


def write_embeddings(
    workdir: str | Path, n: int = 120, dim: int = 16, multi_label: bool = False, seed: int = 0
) -> str:
    """Write data/dataset.json, data/manifest.parquet and embeddings/<id>/ (+ LATEST)."""
    workdir = str(workdir)
    rng = np.random.default_rng(seed)
    labels = make_labels(n, multi_label, rng)
    centres = rng.standard_normal((len(LABELS), dim)) * 2.0
    x = rng.standard_normal((n, dim)) * 0.8
    for i, labs in enumerate(labels):
        for lab in labs:
            x[i] += centres[LABELS.index(lab)]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    split = np.array(["train", "train", "train", "val", "test"])[np.arange(n) % 5]
    split = np.where(np.arange(n) % 10 == 9, "val", split)  # val gets every label set too
    ids = [f"img{i:04d}" for i in range(n)]
    frame = pd.DataFrame(
        {
            "id": ids,
            "uri": [f"/nowhere/{i}.png" for i in ids],
            "labels": labels,
            "split": split,
            "embedding": list(x),
        }
    )
    bid = "fake-0123456789"
    out = wd.embeddings(workdir, bid)
    Path(out).mkdir(parents=True, exist_ok=True)
    frame.to_parquet(storage.join(out, "part-00000.parquet"))
    summary = {"dim": dim, "count": n, "shards": ["part-00000.parquet"]}  # as embed writes it
    storage.write_json(storage.join(out, "embed.json"), summary)
    storage.write_text(wd.latest_embeddings(workdir), bid + "\n")
    manifest = frame.drop(columns=["embedding"]).assign(
        patient_id=None, grade=[["low", "high"][i % 2] for i in range(n)]
    )
    Path(wd.manifest(workdir)).parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(wd.manifest(workdir))
    storage.write_json(
        wd.dataset_info(workdir),
        {
            "label_names": LABELS,
            "task": "tissue",
            "multi_label": multi_label,
            "source": "fake",
            "counts": {},
        },
    )
    return bid
