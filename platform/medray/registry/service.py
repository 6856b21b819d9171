"""`ServiceBundle`: a loaded, verified bundle that embeds, searches, classifies and compares.

Built by `medray.registry.bundle.load_bundle` (never directly): the backbone, the FAISS
index with its gallery and the heads all come from one bundle, so they agree. A deployment
loads only its part (`parts`): the Embedder the backbone (and adapter), the Retriever the
index and gallery, the Classifier the heads; asking a bundle for a part it did not load
raises PartNotLoaded. Nothing here imports torch until the backbone part is used.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

EMBED_BATCH = 32
"""Images per forward pass in `embed` (bounds memory for large request batches)."""
NEEDS = {"embed": "backbone", "search": "index", "has_image": "index", "thumbnail": "index",
         "classify": "heads", "to": "backbone"}  # fmt: skip


class PartNotLoaded(RuntimeError):
    """A method of a part this bundle was loaded without (a deployment holds only its part)."""


class ServiceBundle:
    """The interface serving and the pyfunc model use (see the README, "Registry")."""

    def __init__(
        self, backbone: Any, index: Any, heads: dict | None, manifest: dict, info: dict,
        adapter=None, parts: tuple[str, ...] = ("backbone", "index", "heads"),
    ) -> None:  # fmt: skip
        self.parts = tuple(parts)
        self.backbone = backbone
        self.adapter = adapter
        # alpha-QE is a search-time setting of the adapter: a Retriever without the backbone
        # part reads it from the manifest (the adapter's meta, copied at build).
        qe = (manifest.get("adapter") or {}).get("query_expansion") or {}
        qe = adapter.query_expansion if adapter is not None else qe
        self.query_expansion = (int(qe.get("n", 0)), float(qe.get("alpha", 3.0)))
        self.index = index
        self.heads = heads
        self.manifest = manifest
        self.pair_threshold = float(manifest["pair_threshold"])
        self.info = {
            "name": info.get("name"),
            "version": info.get("version"),
            "alias": info.get("alias"),
            "backbone_id": manifest["backbone_id"],
            "adapter": (manifest.get("adapter") or {}).get("kind"),
            "dim": int(manifest["dim"]),
            "metrics": manifest.get("metrics", {}),
            "tasks": {
                t: {k: v for k, v in meta.items() if k in ("kind", "label_names", "thresholds")}
                for t, meta in manifest.get("tasks", {}).items()
            },
            "pair_threshold": self.pair_threshold,
            "lineage": manifest.get("lineage", {}),
            "gallery_size": len(index)
            if index is not None
            else (manifest.get("index") or {}).get("count"),
            "parts": list(self.parts),
        }

    def _need(self, method: str) -> None:
        part = NEEDS[method]
        if part not in self.parts:
            raise PartNotLoaded(
                f"{method}: this bundle was loaded with parts {list(self.parts)}, without "
                f"{part!r}; load_bundle(..., parts=[..., {part!r}])"
            )

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def to(self, device: str) -> ServiceBundle:
        """Move the backbone (the only part that runs on an accelerator) to `device`."""
        from medray.models import prepare_for_device

        self._need("to")
        prepare_for_device(self.backbone.model, device)
        return self

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 HxWx3 images -> (N, D) float32 L2-normalised embeddings (bundle preprocessing,
        the backbone, then the retrieval adapter when the bundle has one)."""
        from medray.models import embed_pixels, resize_image

        self._need("embed")
        spec = self.backbone.spec
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        out = []
        for start in range(0, len(images), EMBED_BATCH):
            pixels = np.stack(
                [resize_image(im, spec) for im in images[start : start + EMBED_BATCH]]
            )
            out.append(embed_pixels(self.backbone.model, spec, pixels))
        emb = np.concatenate(out).astype(np.float32, copy=False)
        return emb if self.adapter is None else self.adapter.apply(emb)

    def _check(self, emb: np.ndarray) -> np.ndarray:
        emb = np.ascontiguousarray(np.atleast_2d(np.asarray(emb, dtype=np.float32)))
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (N, {self.dim}), got {tuple(emb.shape)}")
        return emb

    def search(self, emb: np.ndarray, k: int) -> list[list[dict]]:
        """Top-k gallery neighbours per query: id, score (cosine), labels, uri; best first."""
        self._need("search")
        emb = self._check(emb)
        k = max(1, min(int(k), len(self.index)))
        if self.query_expansion[0] > 0:
            from medray.adapt.search import index_search  # imports torch: only when needed

            scores, rows = index_search(self.index, emb, k, *self.query_expansion)
        else:
            scores, rows = self.index.search(emb, k)
        out = []
        for q_scores, q_rows in zip(scores, rows, strict=True):
            keep = [(float(s), int(r)) for s, r in zip(q_scores, q_rows, strict=True) if r >= 0]
            found = self.index.rows([r for _, r in keep])  # only the rows returned are read
            out.append([{"id": str(g["id"]), "score": score, "labels": [str(x) for x in g["labels"]],
                         "uri": str(g["uri"])} for (score, _), g in zip(keep, found, strict=True)])  # fmt: skip
        return out

    def classify(self, emb: np.ndarray) -> list[dict]:
        """Per image, per task: kind, probabilities {label: p}, decisions [label], thresholds."""
        self._need("classify")
        emb = self._check(emb)
        results: list[dict] = [{} for _ in range(len(emb))]
        for task, head in self.heads.items():
            probs = head.predict_proba(emb)
            decided = head.decide(probs)
            names = head.label_names
            thresholds = {n: float(t) for n, t in zip(names, head.threshold_array, strict=True)}
            for i in range(len(emb)):
                results[i][task] = {
                    "kind": head.kind,
                    "probabilities": {n: float(p) for n, p in zip(names, probs[i], strict=True)},
                    "decisions": [n for n, d in zip(names, decided[i], strict=True) if d],
                    "thresholds": thresholds,
                }
        return results

    def compare(self, emb_a: np.ndarray, emb_b: np.ndarray) -> dict:
        """Cosine similarity of two embeddings and the "same category" call at the bundle's
        pair threshold (chosen on validation pairs by the evaluate stage)."""
        a, b = self._check(emb_a)[0], self._check(emb_b)[0]
        sim = float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
        return {"similarity": sim, "same_category": sim >= self.pair_threshold,
                "threshold": self.pair_threshold}  # fmt: skip

    def has_image(self, image_id: str) -> bool:
        self._need("has_image")
        return self.index.find(str(image_id)) is not None

    def thumbnail(self, image_id: str, size: int = 128) -> bytes:
        """PNG of a gallery image, at most `size` pixels on its long side (read by URI)."""
        from PIL import Image

        from medray.data.decode import read_image

        self._need("thumbnail")
        row = self.index.find(str(image_id))
        if row is None:
            raise KeyError(f"image {image_id!r} is not in the gallery")
        uri = str(self.index.row(row)["uri"])
        image = Image.fromarray(read_image(uri))  # a file, a DICOM frame or a slide tile
        image.thumbnail((int(size), int(size)))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
