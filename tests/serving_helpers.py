"""Shared by the serving test modules: one tiny real bundle per test process, built by
running the real pipeline (synthetic tiles -> embed -> index -> heads -> evaluate ->
register + promote), and small HTTP helpers."""

from __future__ import annotations

import functools
import struct
import zlib
from pathlib import Path

import requests

MODEL = "medray-tiny"


@functools.lru_cache(maxsize=1)
def tiny_demo(root: str):
    """(DemoConfig, DemoResult) of a 30-image workdir under `root`, built once per process:
    real images, real backbone embeddings, a real FAISS index, head and metrics (the
    registry tests' parts), registered and promoted to production in the workdir's MLflow."""
    from registry_parts import make_workdir

    from medray import demo, registry

    workdir = Path(root) / "tiny-serving"
    make_workdir(workdir, n=30)
    cfg = demo.DemoConfig(
        workdir=str(workdir),
        model_name=MODEL,
        ray={"num_cpus": 2, "num_workers": 1, "cpus_per_worker": 0.5},
    )
    model = registry.register_and_promote(cfg.workdir, MODEL, cfg)
    if model["outcome"] != "promoted":  # a tiny set may miss a gate; serving needs the alias
        reg = registry.RegistryConfig(workdir=cfg.workdir, mlflow=cfg.mlflow)
        registry.promote(MODEL, int(model["version"]), reg, force=True)
    return cfg, demo.DemoResult(workdir=cfg.workdir, reports=[], model=model)


def search(url: str, data: bytes, key: str | None = "k1", k: int = 5, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(
        f"{url}/v1/search", files={"image": ("q", data)}, data={"k": k}, headers=headers,
        timeout=60, **kw,
    )  # fmt: skip


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data (a bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
