"""What the HTTP layer calls to embed, search, classify and compare.

`HandleBackend` calls the Serve deployments through their DeploymentHandles;
`LocalBackend` calls one ServiceBundle in this process (the benchmark's baseline and
the HTTP layer's unit tests). Both speak in (bundle key, embedding) pairs so that an
embedding is always searched with the index of the model that made it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import numpy as np


def to_plain(obj: Any) -> Any:
    """numpy scalars and arrays inside dicts/lists -> Python floats, ints, bools, lists."""
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class Backend(Protocol):
    async def embed(self, image: np.ndarray) -> tuple[str, np.ndarray]: ...
    async def search(self, key: str, emb: np.ndarray, k: int) -> list[dict[str, Any]]: ...
    async def classify(self, key: str, emb: np.ndarray) -> dict[str, Any]: ...
    async def compare(self, key: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]: ...
    async def thumbnail(self, image_id: str, size: int) -> bytes | None: ...
    async def info(self) -> dict[str, Any]: ...


RETRY_AFTER_S = 2
"""What a 503 tells the client to wait: about the time Serve takes to route around a lost
replica once it has noticed (measured 1 to 10 s here; clients back off from this)."""


def replica_lost(exc: BaseException) -> bool:
    """A failure of the replica, not of the request: the call may succeed on another one."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    lost = (RayActorError, ActorDiedError, ActorUnavailableError)
    return isinstance(exc, (*lost, BackPressureError, DeploymentUnavailableError))


class HandleBackend:
    """The deployments behind their handles (Ray Serve routes, batches and autoscales).

    A call whose replica dies under it is tried once more (Serve routes the retry to a live
    replica); a second loss, or an embedding from a version the model replicas no longer
    hold, is a 503 with Retry-After: the client may retry, nothing was answered wrongly.
    """

    def __init__(self, embedder: Any, retriever: Any, classifier: Any) -> None:
        self.embedder, self.retriever, self.classifier = embedder, retriever, classifier

    async def call(self, method: Any, *args: Any) -> Any:
        from medray.serving.deployments import VersionUnavailable
        from medray.serving.inputs import ApiError

        for attempt in (1, 2):
            try:
                return await method.remote(*args)
            except VersionUnavailable as exc:
                reason = str(exc).splitlines()[-1]
                raise ApiError(503, "unavailable", reason, retry_after=RETRY_AFTER_S) from None
            except Exception as exc:
                if not replica_lost(exc):
                    raise
                if attempt == 2:
                    reason = f"a serving replica was lost ({type(exc).__name__}); retry"
                    raise ApiError(503, "unavailable", reason, retry_after=RETRY_AFTER_S) from None
                await asyncio.sleep(0.2)

    async def embed(self, image: np.ndarray) -> tuple[str, np.ndarray]:
        return await self.call(self.embedder.embed, image)

    async def search(self, key: str, emb: np.ndarray, k: int) -> list[dict[str, Any]]:
        return await self.call(self.retriever.search, key, emb, k)

    async def classify(self, key: str, emb: np.ndarray) -> dict[str, Any]:
        return await self.call(self.classifier.classify, key, emb)

    async def compare(self, key: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        return await self.call(self.classifier.compare, key, a, b)

    async def thumbnail(self, image_id: str, size: int) -> bytes | None:
        return await self.call(self.retriever.thumbnail, image_id, size)

    async def info(self) -> dict[str, Any]:
        embedder, retriever, classifier = await asyncio.gather(
            self.call(self.embedder.info),
            self.call(self.retriever.info),
            self.call(self.classifier.info),
        )
        return {"embedder": embedder, "retriever": retriever, "classifier": classifier}


class LocalBackend:
    """One ServiceBundle called in this process (no Ray): same pipeline, no network hops."""

    def __init__(self, bundle: Any, model_uri: str = "local") -> None:
        self.bundle = bundle
        info = dict(getattr(bundle, "info", {}) or {})
        self.key = f"{info.get('name', 'model')}/{info.get('version', model_uri)}"
        self.model_uri = model_uri

    async def embed(self, image: np.ndarray) -> tuple[str, np.ndarray]:
        vectors = await asyncio.to_thread(self.bundle.embed, [image])
        return self.key, np.asarray(vectors[0], np.float32)

    async def search(self, key: str, emb: np.ndarray, k: int) -> list[dict[str, Any]]:
        hits = self.bundle.search(np.asarray(emb, np.float32)[None, :], k)[0]
        return [
            {"id": str(h["id"]), "score": float(h["score"]), "labels": list(h["labels"])}
            for h in hits
        ]

    async def classify(self, key: str, emb: np.ndarray) -> dict[str, Any]:
        return to_plain(self.bundle.classify(np.asarray(emb, np.float32)[None, :])[0])

    async def compare(self, key: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        out = self.bundle.compare(a, b)
        return {k: out[k] for k in ("similarity", "same_category", "threshold")}

    async def thumbnail(self, image_id: str, size: int) -> bytes | None:
        if not self.bundle.has_image(image_id):
            return None
        return await asyncio.to_thread(self.bundle.thumbnail, image_id, size)

    async def info(self) -> dict[str, Any]:
        info = {
            **dict(getattr(self.bundle, "info", {}) or {}),
            "key": self.key,
            "model_uri": self.model_uri,
        }
        return {"embedder": info, "retriever": info, "classifier": info}
