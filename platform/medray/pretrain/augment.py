"""BYOL's two views per image: augmentation presets for histology and chest X-rays.

A preset is a pair of `ViewSpec`s (BYOL's augmentations are asymmetric: view 1 is always
blurred and never solarised, view 2 rarely blurred and sometimes solarised). Each spec
builds two equivalent pipelines:

- `loader_pipeline`: torchvision.transforms.v2, one image at a time (CPU data loader),
  uint8 (3, S, S) in -> normalised float32 (3, S, S) out;
- `BatchAugment`: the same operations over a batch on whatever device the batch lives on
  (Kornia), every image drawing its own parameters. On a GPU this takes augmentation off
  the data loader, which is the bottleneck there.

Histology (the paper in DESIGN.md: ColorJitter, grayscale, flips, Gaussian blur,
solarization, random resized crop) adds vertical flips and 90-degree rotations (a tile has
no "up"). X-ray: crops, small rotations, brightness/contrast, no hue and no flips (the
heart is on the left).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class ViewSpec:
    """The random operations of one view, in the order they are applied."""

    scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area fraction."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect ratio."""
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    """Rotate by a random multiple of 90 degrees."""
    degrees: float = 0.0
    """Small random rotation in [-degrees, degrees]."""
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    """ColorJitter brightness, contrast, saturation, hue."""
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


PRESETS: dict[str, tuple[ViewSpec, ViewSpec]] = {
    "histology": (
        ViewSpec(vflip=True, rot90=True, blur_p=1.0, solarize_p=0.0),
        ViewSpec(vflip=True, rot90=True, blur_p=0.1, solarize_p=0.2),
    ),
    "xray": (
        ViewSpec(scale=(0.5, 1.0), hflip=False, degrees=10.0, jitter=(0.3, 0.3, 0.0, 0.0),
                 gray_p=0.0, blur_p=0.5),
        ViewSpec(scale=(0.5, 1.0), hflip=False, degrees=10.0, jitter=(0.3, 0.3, 0.0, 0.0),
                 gray_p=0.0, blur_p=0.1),
    ),
}  # fmt: skip


def preset(name: str) -> tuple[ViewSpec, ViewSpec]:
    """The two view specs of a preset; an unknown name names the choices."""
    if name not in PRESETS:
        raise ValueError(f"augment.preset: {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]


def blur_kernel(size: int) -> int:
    """Odd Gaussian kernel side, about a tenth of the image (as SimCLR/BYOL)."""
    return max(3, (size // 10) | 1)


# ---------------------------------------------------------------- per image (torchvision v2)


class RandomRot90(torch.nn.Module):
    """Rotate a square image by k * 90 degrees, k uniform in {0, 1, 2, 3}."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))


def loader_pipeline(
    spec: ViewSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision v2 pipeline: uint8 (3, H, W) -> normalised float32 (3, size, size)."""
    ops: list[Callable] = [v2.RandomResizedCrop(size, scale=spec.scale, ratio=spec.ratio)]
    if spec.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if spec.vflip:
        ops.append(v2.RandomVerticalFlip())
    if spec.rot90:
        ops.append(RandomRot90())
    if spec.degrees:
        ops.append(v2.RandomRotation(spec.degrees, interpolation=v2.InterpolationMode.BILINEAR))
    ops.append(v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.gray_p:
        ops.append(v2.RandomGrayscale(p=spec.gray_p))
    if spec.blur_p:
        ops.append(
            v2.RandomApply([v2.GaussianBlur(blur_kernel(size), spec.blur_sigma)], p=spec.blur_p)
        )
    if spec.solarize_p:
        ops.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class TwoViews:
    """uint8 (3, H, W) -> (view 1, view 2), each from its own pipeline (picklable)."""

    def __init__(self, name: str, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        s1, s2 = preset(name)
        self.first = loader_pipeline(s1, size, mean, std)
        self.second = loader_pipeline(s2, size, mean, std)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(image), self.second(image)


# ---------------------------------------------------------------- batched, on device


def kornia_view(spec: ViewSpec, size: int, mean, std):
    """One view as a Kornia pipeline: the same operations as `loader_pipeline`, batched on the
    batch's device, every image drawing its own parameters. Kornia replaced our own
    vectorised code (affine grid crop, YIQ hue rotation, grouped-conv blur): bench/augment.py
    measured it faster on CPU (x1.06 to x2.2 the images/s, same batch, same specs)."""
    import kornia.augmentation as K

    ops = [K.RandomResizedCrop((size, size), scale=spec.scale, ratio=spec.ratio)]
    if spec.hflip:
        ops.append(K.RandomHorizontalFlip())
    if spec.vflip:
        ops.append(K.RandomVerticalFlip())
    if spec.rot90:
        ops.append(K.RandomRotation90(times=(0, 3), p=1.0))
    if spec.degrees:
        ops.append(K.RandomRotation(spec.degrees, p=1.0))
    if spec.jitter_p:
        ops.append(K.ColorJitter(*spec.jitter, p=spec.jitter_p))
    if spec.gray_p:
        ops.append(K.RandomGrayscale(p=spec.gray_p))
    if spec.blur_p:
        k = blur_kernel(size)
        ops.append(K.RandomGaussianBlur((k, k), spec.blur_sigma, p=spec.blur_p))
    if spec.solarize_p:  # BYOL's solarisation: pixels >= 0.5 become 1 - x
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize_p))
    ops.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    return K.AugmentationSequential(*ops)


class BatchAugment:
    """One view of a batch on its own device: uint8 or [0,1] float (B, 3, H, W) ->
    normalised float32 (B, 3, size, size); every image draws its own parameters."""

    def __init__(
        self, spec: ViewSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self.spec, self.size = spec, size
        self.pipeline = kornia_view(spec, size, mean, std)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        return self.pipeline.to(x.device)(x)


class BatchTwoViews:
    """Both views of a batch on device: (B, 3, H, W) -> (view 1, view 2)."""

    def __init__(self, name: str, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        s1, s2 = preset(name)
        self.first = BatchAugment(s1, size, mean, std)
        self.second = BatchAugment(s2, size, mean, std)

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(batch), self.second(batch)
