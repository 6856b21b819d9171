"""Head networks (linear or a small MLP on frozen embeddings) and the saved-head format.

`heads/<task>/head.safetensors` holds the state dict; `head.json` holds `task`, `kind`
(multiclass/multilabel), `label_names`, `thresholds` {label: t}, `arch` {type, in_dim,
hidden, out_dim, dropout}, `backbone_id` and `metrics` (docs/contracts.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from medray import storage

KINDS = ("multiclass", "multilabel")
ARCHS = ("linear", "mlp")


def build_head(
    arch: str, in_dim: int, out_dim: int, hidden: int = 256, dropout: float = 0.1
) -> nn.Module:
    """`linear`: one affine map to logits; `mlp`: Linear-ReLU-Dropout-Linear."""
    if arch == "linear":
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    if arch == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )
    raise ValueError(f"head arch {arch!r}: choose one of {', '.join(ARCHS)}")


def arch_dict(arch: str, in_dim: int, out_dim: int, hidden: int, dropout: float) -> dict:
    """The `arch` entry of head.json (enough to rebuild the module)."""
    return {
        "type": arch,
        "in_dim": in_dim,
        "out_dim": out_dim,
        "hidden": hidden if arch == "mlp" else 0,
        "dropout": dropout if arch == "mlp" else 0.0,
    }


def module_from_arch(arch: dict) -> nn.Module:
    return build_head(
        arch["type"], arch["in_dim"], arch["out_dim"], arch.get("hidden") or 1, arch["dropout"]
    )


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Softmax over labels (multi-class) or independent sigmoids (multi-label)."""
    return torch.softmax(logits, dim=1) if kind == "multiclass" else torch.sigmoid(logits)


def decide(probs: np.ndarray, kind: str, thresholds: np.ndarray) -> np.ndarray:
    """(N, L) bool: one-hot argmax (multi-class) or probs >= per-label thresholds (multi-label)."""
    probs = np.asarray(probs)
    if kind == "multiclass":
        out = np.zeros(probs.shape, dtype=bool)
        if len(probs):
            out[np.arange(len(probs)), probs.argmax(1)] = True
        return out
    return probs >= np.asarray(thresholds, dtype=probs.dtype)[None, :]


@dataclass
class Head:
    """A trained head: the module in eval mode plus its head.json metadata."""

    module: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def label_names(self) -> list[str]:
        return list(self.meta["label_names"])

    @property
    def threshold_array(self) -> np.ndarray:
        t = self.meta.get("thresholds") or {}
        return np.array([float(t.get(name, 0.5)) for name in self.label_names], dtype=np.float32)

    def predict_proba(self, emb: np.ndarray) -> np.ndarray:
        """(N, D) embeddings -> (N, L) probabilities."""
        # A copy: embeddings from Ray's object store are read-only, which torch warns about.
        x = torch.tensor(np.asarray(emb, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.meta["arch"]["in_dim"]:
            raise ValueError(
                f"head {self.meta.get('task')!r} expects (N, {self.meta['arch']['in_dim']}) "
                f"embeddings, got {tuple(x.shape)}"
            )
        with torch.no_grad():
            return probabilities(self.module(x), self.kind).numpy()

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """(N, L) probabilities -> (N, L) bool decisions."""
        return decide(probs, self.kind, self.threshold_array)


def save_head(head_dir: str, module: nn.Module, meta: dict[str, Any]) -> None:
    """Write head.safetensors, then head.json (last, so a reader never sees half a head)."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    storage.write_bytes(storage.join(head_dir, "head.safetensors"), st_save(state))
    storage.write_json(storage.join(head_dir, "head.json"), meta)


def load_head(head_dir: str) -> Head:
    """Read a head written by `medray run heads` (head.json + head.safetensors)."""
    meta_uri = storage.join(head_dir, "head.json")
    if not storage.exists(meta_uri):
        raise FileNotFoundError(f"{meta_uri}: no head here; run `medray run heads` first")
    meta = storage.read_json(meta_uri)
    if meta.get("kind") not in KINDS:
        raise ValueError(f"{meta_uri}: kind must be one of {KINDS}, got {meta.get('kind')!r}")
    module = module_from_arch(meta["arch"])
    module.load_state_dict(st_load(storage.read_bytes(storage.join(head_dir, "head.safetensors"))))
    module.eval()
    return Head(module=module, meta=meta)
