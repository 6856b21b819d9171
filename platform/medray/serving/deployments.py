"""The model deployments: Embedder (batched backbone), Retriever (FAISS), Classifier (heads).

Each replica loads only its part of the service bundle (the Embedder the backbone and
adapter, the Retriever the index and gallery, memory-mapped, the Classifier the heads) in
`reconfigure(user_config)`, which Ray Serve calls at start and again whenever the
user_config changes: changing `model_uri` (an alias or a version) swaps the model in place
while the replica keeps answering. Because embedder,
retriever and classifier replicas swap at slightly different moments, every embedding
travels with the key of the bundle that made it, and each replica keeps the previous
bundle until the swap is over, so an embedding is always searched with its own index.
A replica that does not hold the embedding's version (restarted mid-swap) refuses it with
VersionUnavailable (a retryable 503) rather than search it with another version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from ray import serve

from medray.serving import metrics
from medray.serving.backend import to_plain

log = logging.getLogger("ray.serve")

KEEP_BUNDLES = 2
"""Bundles a replica holds during a swap: the new one and the one in-flight requests used."""


def load_service_bundle(model_uri: str, tracking_uri: str | None, parts=None) -> Any:
    """`models:/...` through the MLflow registry, anything else as a bundle directory; only
    `parts` of it (medray.registry.bundle.PARTS; None: all)."""
    from medray import registry

    if model_uri.startswith("models:/"):
        return registry.load_registered(model_uri, tracking_uri=tracking_uri, parts=parts)
    return registry.load_bundle(model_uri, parts=parts)


def bundle_key(bundle: Any, model_uri: str) -> str:
    """`name/version` of a bundle (the model URI when the bundle has no version)."""
    info = getattr(bundle, "info", {}) or {}
    if info.get("version") is not None:
        return f"{info.get('name', 'model')}/{info['version']}"
    return model_uri


def parse_user_config(user_config: dict | None) -> tuple[str, str | None]:
    """(model_uri, tracking_uri) from a deployment's user_config, with a clear error."""
    if not isinstance(user_config, dict) or not isinstance(user_config.get("model_uri"), str):
        raise ValueError("user_config must be a mapping with model_uri: models:/<name>@<alias>")
    unknown = set(user_config) - {"model_uri", "tracking_uri"}
    if unknown:
        raise ValueError(f"user_config: unknown keys {sorted(unknown)}")
    return user_config["model_uri"], user_config.get("tracking_uri")


class VersionUnavailable(RuntimeError):
    """An embedding made by a model version this replica does not hold (it was restarted on
    another version mid-swap): retryable, answered 503 with Retry-After, never searched or
    classified with another version's index or heads."""


def expected_key(model_uri: str) -> str | None:
    """The bundle key a pinned `models:/<name>/<version>` will load as (None otherwise)."""
    if model_uri.startswith("models:/") and "@" not in model_uri:
        name, _, version = model_uri[len("models:/") :].rpartition("/")
        return f"{name}/{version}" if version.isdigit() else None
    return None


class BundleHolder:
    """The bundles one replica serves: the current one, the one before it (for requests
    embedded before the swap), and the one being loaded (requests embedded by it wait).
    `parts`: what of each bundle this replica loads (its deployment's part)."""

    def __init__(
        self, device: str | None = None, parts: tuple[str, ...] | None = None, prepare=None
    ) -> None:
        self.prepare = prepare
        """Called with each bundle in the loading thread (a shard replica opens its shard)."""
        self.bundles: OrderedDict[str, Any] = OrderedDict()
        self.loading: dict[str, asyncio.Future] = {}
        self.current_key: str | None = None
        self.reporter: asyncio.Task | None = None
        self.model_uri: str | None = None
        self.loaded_at: float | None = None
        self.device = device
        self.parts = parts

    def _load(self, model_uri: str, tracking_uri: str | None) -> Any:
        bundle = load_service_bundle(model_uri, tracking_uri, parts=self.parts)
        if self.prepare is not None:
            self.prepare(bundle)
        if self.device:
            move_to(bundle, self.device)
        return bundle

    async def reconfigure(self, user_config: dict | None) -> None:
        model_uri, tracking_uri = parse_user_config(user_config)
        if model_uri == self.model_uri and self.current_key is not None:
            return
        # Loading blocks (download, checksums, weights): keep the event loop answering.
        load = asyncio.ensure_future(asyncio.to_thread(self._load, model_uri, tracking_uri))
        pending = expected_key(model_uri)
        if pending:
            self.loading[pending] = load
        try:
            bundle = await load
        finally:
            self.loading.pop(pending, None)
        key = bundle_key(bundle, model_uri)
        self.bundles[key] = bundle
        self.bundles.move_to_end(key)
        while len(self.bundles) > KEEP_BUNDLES:
            self.bundles.popitem(last=False)
        self.current_key, self.model_uri, self.loaded_at = key, model_uri, time.time()
        log.info("serving %s from %s", key, model_uri)
        if self.reporter is None:
            self.reporter = asyncio.ensure_future(self.report_forever())

    def current(self) -> tuple[str, Any]:
        if self.current_key is None:
            raise VersionUnavailable("no model loaded yet")
        return self.current_key, self.bundles[self.current_key]

    async def report_forever(self) -> None:
        """The version served (and gallery size) on the metrics endpoint, refreshed: Ray
        drops a gauge that has not been set for two report intervals."""
        while True:
            if self.current_key is not None:
                bundle = self.bundles[self.current_key]
                info = getattr(bundle, "info", {}) or {}
                index = "index" in (self.parts or ("index",))
                metrics.serving(self.current_key, info.get("gallery_size") if index else None)
            await asyncio.sleep(metrics.REFRESH_S)

    async def get(self, key: str) -> Any:
        """The bundle that made an embedding: held, or being loaded (then wait for it)."""
        if key in self.bundles:
            return self.bundles[key]
        if key in self.loading:
            return await asyncio.shield(self.loading[key])
        raise VersionUnavailable(
            f"the embedding was made by {key}, which this replica does not hold "
            f"(it serves {self.current_key}); retry"
        )

    def info(self) -> dict[str, Any]:
        key, bundle = self.current()
        return {
            **dict(getattr(bundle, "info", {}) or {}),
            "key": key,
            "model_uri": self.model_uri,
            "loaded_at": self.loaded_at,
            "swapping": bool(self.loading),
        }


def move_to(bundle: Any, device: str) -> None:
    """Put the bundle's backbone on `device` (the bundle itself or its `.backbone`)."""
    target = bundle if hasattr(bundle, "to") else getattr(bundle, "backbone", None)
    if target is not None and hasattr(target, "to"):
        target.to(device)
    else:
        log.warning("bundle has no .to(device): embedding stays on CPU")


def gpu_device() -> str | None:
    """`cuda` when this replica was given a GPU, else None (CPU)."""
    try:
        import ray

        return "cuda" if ray.get_gpu_ids() else None
    except Exception:
        return None


@serve.deployment(name="Embedder")
class Embedder:
    """Images -> L2-normalised embeddings, batched across concurrent requests (@serve.batch)."""

    def __init__(self, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01) -> None:
        self.models = BundleHolder(device=gpu_device(), parts=("backbone",))
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    async def reconfigure(self, user_config: dict) -> None:
        await self.models.reconfigure(user_config)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def embed(self, images: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
        key, bundle = self.models.current()
        self.batch_sizes = [*self.batch_sizes[-999:], len(images)]
        metrics.embed_batch(len(images))
        vectors = await asyncio.to_thread(bundle.embed, images)
        return [(key, np.asarray(v, dtype=np.float32)) for v in vectors]

    def info(self) -> dict[str, Any]:
        sizes = self.batch_sizes or [0]
        return {**self.models.info(), "mean_batch_size": float(np.mean(sizes))}


@serve.deployment(name="Retriever")
class Retriever:
    """Nearest gallery images of an embedding (the bundle's FAISS index) and their thumbnails."""

    def __init__(self) -> None:
        self.models = BundleHolder(parts=("index",))

    async def reconfigure(self, user_config: dict) -> None:
        await self.models.reconfigure(user_config)

    async def search(self, key: str, embedding: np.ndarray, k: int) -> list[dict[str, Any]]:
        bundle = await self.models.get(key)
        hits = bundle.search(np.asarray(embedding, np.float32)[None, :], k)[0]
        return [
            {"id": str(h["id"]), "score": float(h["score"]), "labels": list(h["labels"])}
            for h in hits
        ]

    def thumbnail(self, image_id: str, size: int) -> bytes | None:
        _, bundle = self.models.current()
        if not bundle.has_image(image_id):
            return None
        return bundle.thumbnail(image_id, size)

    def info(self) -> dict[str, Any]:
        return self.models.info()


@serve.deployment(name="ShardRetriever")
class ShardRetriever:
    """One shard of a sharded index (medray.index.shards), deployed as `Retriever-s<i>`: its
    top k with global rows, which the ingress merges; the shard number comes in user_config."""

    def __init__(self) -> None:
        self.shard = -1
        self.models = BundleHolder(parts=("index",), prepare=self.open_shard)

    def open_shard(self, bundle: Any) -> None:
        from medray.index.shards import open_shard

        open_shard(bundle.index, self.shard)  # verified and mapped before the swap completes

    async def reconfigure(self, user_config: dict) -> None:
        config = dict(user_config or {})
        shard = config.pop("shard", None)
        if not isinstance(shard, int) or shard < 0:
            raise ValueError(f"user_config: shard must be an int >= 0, got {shard!r}")
        self.shard = shard
        await self.models.reconfigure(config)

    async def search_shard(
        self, key: str, embedding: np.ndarray, k: int, first_round: bool = True
    ) -> dict[str, Any]:
        """This shard's hits; in the first round also the vectors query expansion needs."""
        from medray.index.shards import shard_answer

        bundle = await self.models.get(key)
        n, alpha = bundle.query_expansion
        answer = shard_answer(bundle.index, self.shard, embedding, k, n if first_round else 0)
        return {**answer, "qe": [n, alpha]}

    def thumbnail(self, image_id: str, size: int) -> bytes | None:
        from medray.index.shards import shard_thumbnail

        _, bundle = self.models.current()
        return shard_thumbnail(bundle.index, self.shard, image_id, size)

    def info(self) -> dict[str, Any]:
        return {**self.models.info(), "shard": self.shard}


@serve.deployment(name="Classifier")
class Classifier:
    """Head probabilities and decisions (tuned thresholds), and pair comparison."""

    def __init__(self) -> None:
        self.models = BundleHolder(parts=("heads",))

    async def reconfigure(self, user_config: dict) -> None:
        await self.models.reconfigure(user_config)

    async def classify(self, key: str, embedding: np.ndarray) -> dict[str, Any]:
        bundle = await self.models.get(key)
        return to_plain(bundle.classify(np.asarray(embedding, np.float32)[None, :])[0])

    async def compare(self, key: str, emb_a: np.ndarray, emb_b: np.ndarray) -> dict[str, Any]:
        bundle = await self.models.get(key)
        out = bundle.compare(np.asarray(emb_a), np.asarray(emb_b))
        return {
            "similarity": float(out["similarity"]),
            "same_category": bool(out["same_category"]),
            "threshold": float(out["threshold"]),
        }

    def info(self) -> dict[str, Any]:
        return self.models.info()
