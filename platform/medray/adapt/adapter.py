"""A fitted retrieval adapter on disk and in memory: `adapter.json` + `adapter.safetensors`.

The same object is applied by the adapt stage (to write the adapted embeddings that index,
heads and evaluate read), by the registry bundle and by the serving Embedder, so search in
production runs in exactly the space evaluation measured. Query expansion is a search-time
setting carried in the same file (`query_expansion: {n, alpha}`; n = 0 is off).

adapter.json: format, kind (whiten | projection), in_dim, out_dim, source_backbone_id,
space_id, query_expansion, arch (projection: hidden, dropout, n_labels), fitted_on, sha256
of the tensors. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medray import storage
from medray.adapt import fit as F

FORMAT = "medray-adapter/1"
WEIGHTS = "adapter.safetensors"
SPEC = "adapter.json"
KINDS = ("whiten", "projection")


class AdapterError(ValueError):
    """An adapter file that does not fit (format, tensors, dimensions); names the file."""


@dataclass
class Adapter:
    """kind + tensors (+ the rebuilt projection module) + metadata; `apply` is the map."""

    kind: str
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    module: Any = None

    @property
    def in_dim(self) -> int:
        return int(self.meta["in_dim"])

    @property
    def out_dim(self) -> int:
        return int(self.meta["out_dim"])

    @property
    def query_expansion(self) -> dict[str, float]:
        qe = self.meta.get("query_expansion") or {}
        return {"n": int(qe.get("n", 0)), "alpha": float(qe.get("alpha", 3.0))}

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, in_dim) backbone embeddings -> (N, out_dim) L2-normalised adapted embeddings."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"adapter {self.meta.get('space_id')} expects (N, {self.in_dim}) embeddings, "
                f"got {tuple(x.shape)}"
            )
        if self.kind == "whiten":
            return F.apply_linear(x, self.tensors["mean"], self.tensors["proj"])
        return F.apply_projection(x, self.module, self.tensors["mean"])


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        h.update(f"{key}|{arr.dtype}|{arr.shape}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def whitening_adapter(mean: np.ndarray, proj: np.ndarray, meta: dict) -> Adapter:
    tensors = {"mean": mean.astype(np.float32), "proj": proj.astype(np.float32)}
    meta = {**meta, "kind": "whiten", "in_dim": int(proj.shape[0]), "out_dim": int(proj.shape[1])}
    return finish(Adapter("whiten", tensors, meta))


def projection_adapter(head, mean: np.ndarray, meta: dict) -> Adapter:
    """Wrap a trained `fit.ProjectionHead` (its state dict + centring mean)."""
    state = {f"head.{k}": v.detach().cpu().numpy() for k, v in head.state_dict().items()}
    tensors = {"mean": mean.astype(np.float32), **state}
    lin0, lin1 = head.net[0], head.net[-1]
    arch = {"hidden": lin0.out_features, "dropout": float(head.net[3].p),
            "n_labels": int(head.proxies.shape[0])}  # fmt: skip
    meta = {**meta, "kind": "projection", "in_dim": lin0.in_features,
            "out_dim": lin1.out_features, "arch": arch}  # fmt: skip
    return finish(Adapter("projection", tensors, meta, module=head.eval()))


def finish(adapter: Adapter) -> Adapter:
    """Stamp the tensors' hash, the format and the space id (source backbone + kind + hash)."""
    sha = tensors_sha256(adapter.tensors)
    adapter.meta.update(format=FORMAT, sha256=sha)
    adapter.meta.setdefault("query_expansion", {"n": 0, "alpha": 3.0})
    source = adapter.meta.get("source_backbone_id", "backbone")
    adapter.meta["space_id"] = f"{source}.{adapter.kind}-{sha[:10]}"
    return adapter


def save_adapter(adapter: Adapter, out_dir: str) -> None:
    """adapter.safetensors, then adapter.json (last: a reader never sees half an adapter)."""
    from safetensors.numpy import save

    data = {k: np.ascontiguousarray(v) for k, v in adapter.tensors.items()}
    storage.write_bytes(storage.join(out_dir, WEIGHTS), save(data))
    storage.write_json(storage.join(out_dir, SPEC), adapter.meta)


def has_adapter(path: str) -> bool:
    return storage.exists(storage.join(path, SPEC))


def load_adapter(path: str) -> Adapter:
    """Read and verify an adapter directory (format, tensor hash, shapes)."""
    from safetensors.numpy import load

    spec_uri = storage.join(path, SPEC)
    if not storage.exists(spec_uri):
        raise FileNotFoundError(f"{spec_uri}: no adapter here; run `medray run adapt`")
    meta = storage.read_json(spec_uri)
    if meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise AdapterError(
            f"{spec_uri}: unknown adapter format/kind {meta.get('format')!r}/{meta.get('kind')!r}"
        )
    tensors = load(storage.read_bytes(storage.join(path, WEIGHTS)))
    if tensors_sha256(tensors) != meta.get("sha256"):
        raise AdapterError(f"{storage.join(path, WEIGHTS)}: tensors do not match {SPEC}'s sha256")
    module = None
    if meta["kind"] == "projection":
        import torch

        arch = meta["arch"]
        module = F.ProjectionHead(
            meta["in_dim"], arch["hidden"], meta["out_dim"], arch["n_labels"], arch["dropout"]
        )
        state = {k[5:]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("head.")}
        module.load_state_dict(state)
        module.eval()
    return Adapter(meta["kind"], tensors, meta, module=module)
