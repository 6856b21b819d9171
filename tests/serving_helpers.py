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


class Clients:
    """`n` threads looping POST /v1/search with one image; every answer is recorded as
    (time, status, JSON body or text, headers) and an exception in a thread fails the test."""

    def __init__(self, url: str, data: bytes, n: int = 3, k: int = 5) -> None:
        import threading

        self.url, self.data, self.k = url, data, k
        self.answers: list[tuple[float, int, object, dict]] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(n)]

    def loop(self) -> None:
        import time

        while not self.stop.is_set():
            try:
                r = search(self.url, self.data, k=self.k)
                is_json = r.headers.get("content-type", "").startswith("application/json")
                body = r.json() if is_json else r.text[:300]
                self.answers.append((time.time(), r.status_code, body, dict(r.headers)))
            except BaseException as exc:  # noqa: BLE001 - reported by __exit__
                self.errors.append(exc)
                return

    def __enter__(self) -> Clients:
        [t.start() for t in self.threads]
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        [t.join(timeout=120) for t in self.threads]
        assert not self.errors, f"client thread raised: {self.errors[:3]!r}"

    def failed(self) -> list[tuple[float, int, object, dict]]:
        return [a for a in self.answers if a[1] != 200]

    def first_from(self, model: str, after: float) -> float | None:
        """Time of the first 200 answer from `model` sent after `after`."""
        times = [
            t for t, s, b, _ in self.answers if s == 200 and t >= after and b["model"] == model
        ]
        return min(times) if times else None
