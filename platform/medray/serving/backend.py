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

    `retriever` may be a list: one handle per shard of a sharded index (medray.index.shards).
    A search then goes to every shard at once and their answers are merged by score; with
    query expansion, in two rounds (the expansion needs the global top neighbours).
    """

    def __init__(self, embedder: Any, retriever: Any, classifier: Any) -> None:
        self.shards = list(retriever) if isinstance(retriever, (list, tuple)) else []
        self.embedder, self.classifier = embedder, classifier
        self.retriever = self.shards[0] if self.shards else retriever

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
        if not self.shards:
            return await self.call(self.retriever.search, key, emb, k)
        from medray.index.shards import expanded_query, merge_hits

        answers = await self.ask_shards(key, emb, k, True)
        n, alpha = answers[0]["qe"]
        if n > 0:  # alpha-QE over the global top n, then every shard again
            top, vectors = merge_hits(answers, n)
            emb = expanded_query(emb, top, vectors, n, alpha)
            answers = await self.ask_shards(key, emb, k, False)
        hits, _ = merge_hits(answers, k)
        return [{"id": h["id"], "score": h["score"], "labels": h["labels"]} for h in hits]

    async def ask_shards(self, key: str, emb: np.ndarray, k: int, first: bool) -> list[dict]:
        calls = [self.call(shard.search_shard, key, emb, k, first) for shard in self.shards]
        return list(await asyncio.gather(*calls))

    async def classify(self, key: str, emb: np.ndarray) -> dict[str, Any]:
        return await self.call(self.classifier.classify, key, emb)

    async def compare(self, key: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        return await self.call(self.classifier.compare, key, a, b)

    async def thumbnail(self, image_id: str, size: int) -> bytes | None:
        if not self.shards:
            return await self.call(self.retriever.thumbnail, image_id, size)
        found = await asyncio.gather(*(self.call(s.thumbnail, image_id, size) for s in self.shards))
        return next((png for png in found if png is not None), None)  # one shard holds the id

    async def info(self) -> dict[str, Any]:
        retrievers = self.shards or [self.retriever]
        embedder, classifier, *retriever = await asyncio.gather(
            self.call(self.embedder.info),
            self.call(self.classifier.info),
            *(self.call(r.info) for r in retrievers),
        )
        out = {"embedder": embedder, "retriever": retriever[0], "classifier": classifier}
        # every shard's version is listed, so a swap shows until all shards hold the new one
        return out | {f"retriever-s{i}": r for i, r in enumerate(retriever) if i > 0}


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
