"""BYOL's two views per image: augmentation presets for histology and chest X-rays.

A preset is a pair of `ViewSpec`s (BYOL's augmentations are asymmetric: view 1 is always
blurred and never solarised, view 2 rarely blurred and sometimes solarised). Each spec
builds two equivalent pipelines:

- `loader_pipeline`: torchvision.transforms.v2, one image at a time (CPU data loader),
  uint8 (3, S, S) in -> normalised float32 (3, S, S) out;
- `BatchAugment`: the same operations vectorised over a batch on whatever device the
  batch lives on, every image drawing its own parameters (crop, flips, rotations as one
  affine `grid_sample`; jitter, grayscale, blur, solarisation as per-image factors). On a
  GPU this takes augmentation off the data loader, which is the bottleneck there.

Histology (the paper in DESIGN.md: ColorJitter, grayscale, flips, Gaussian blur,
solarization, random resized crop) adds vertical flips and 90-degree rotations (a tile has
no "up"). X-ray: crops, small rotations, brightness/contrast, no hue and no flips (the
heart is on the left).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

_GRAY = (0.299, 0.587, 0.114)


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


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi)


def _coin(n: int, p: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


def crop_affine(spec: ViewSpec, n: int, device: torch.device) -> torch.Tensor:
    """(n, 2, 3) affine maps from output to input coordinates in [-1, 1]: a random resized
    crop (area in `scale`, aspect in `ratio`, clipped to the image), then flips and rotations."""
    area = _uniform(n, *spec.scale, device)
    log_r = _uniform(n, math.log(spec.ratio[0]), math.log(spec.ratio[1]), device)
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (torch.rand(n, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, device=device) * 2 - 1) * (1 - h)
    sx = torch.where(_coin(n, 0.5 if spec.hflip else 0.0, device), -w, w)
    sy = torch.where(_coin(n, 0.5 if spec.vflip else 0.0, device), -h, h)
    angle = _uniform(n, -spec.degrees, spec.degrees, device) * math.pi / 180
    if spec.rot90:
        angle = angle + torch.randint(4, (n,), device=device) * (math.pi / 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = sx * cos, -sx * sin, cx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sy * sin, sy * cos, cy
    return theta


def gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Shift hue by `turns` (per image, fraction of a full turn) as a rotation of the chroma
    plane in YIQ space: linear, so it vectorises (torchvision goes through HSV instead)."""
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        device=x.device, dtype=x.dtype,
    )  # fmt: skip
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    a = turns * 2 * math.pi
    cos, sin = torch.cos(a).view(-1, 1, 1), torch.sin(a).view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)


def color_jitter(x: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and hue factors, applied with `jitter_p`."""
    n, dev = x.shape[0], x.device
    on = _coin(n, spec.jitter_p, dev).view(-1, 1, 1, 1)
    b, c, s, h = spec.jitter
    one = torch.ones(n, device=dev)
    fb = _uniform(n, max(0, 1 - b), 1 + b, dev) if b else one
    fc = _uniform(n, max(0, 1 - c), 1 + c, dev) if c else one
    fs = _uniform(n, max(0, 1 - s), 1 + s, dev) if s else one
    y = (x * fb.view(-1, 1, 1, 1)).clamp(0, 1)
    m = gray(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - m) * fc.view(-1, 1, 1, 1) + m).clamp(0, 1)
    g = gray(y)
    y = ((y - g) * fs.view(-1, 1, 1, 1) + g).clamp(0, 1)
    if h:
        y = rotate_hue(y, _uniform(n, -h, h, dev)).clamp(0, 1)
    return torch.where(on, y, x)


def gaussian_blur(x: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma, applied with `blur_p` (grouped conv)."""
    n, ch, hgt, wid = x.shape
    k = blur_kernel(hgt)
    sigma = _uniform(n, *spec.blur_sigma, x.device)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(t.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    kern = kern.repeat_interleave(ch, dim=0)  # (n*ch, k)
    y = F.pad(x.reshape(1, n * ch, hgt, wid), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kern.view(n * ch, 1, k, 1), groups=n * ch)
    y = F.conv2d(y, kern.view(n * ch, 1, 1, k), groups=n * ch).view(n, ch, hgt, wid)
    return torch.where(_coin(n, spec.blur_p, x.device).view(-1, 1, 1, 1), y, x)


class BatchAugment:
    """One view of a batch on its own device: uint8 or [0,1] float (B, 3, H, W) ->
    normalised float32 (B, 3, size, size); every image draws its own parameters."""

    def __init__(
        self, spec: ViewSpec, size: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self.spec, self.size = spec, size
        self.mean, self.std = (
            torch.tensor(mean).view(1, 3, 1, 1),
            torch.tensor(std).view(1, 3, 1, 1),
        )

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        n, dev, spec = x.shape[0], x.device, self.spec
        theta = crop_affine(spec, n, dev)
        grid = F.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        x = color_jitter(x, spec)
        if spec.gray_p:
            x = torch.where(_coin(n, spec.gray_p, dev).view(-1, 1, 1, 1), gray(x).expand_as(x), x)
        if spec.blur_p:
            x = gaussian_blur(x, spec)
        if spec.solarize_p:
            sol = _coin(n, spec.solarize_p, dev).view(-1, 1, 1, 1) & (x >= 0.5)
            x = torch.where(sol, 1.0 - x, x)
        return (x - self.mean.to(dev)) / self.std.to(dev)


class BatchTwoViews:
    """Both views of a batch on device: (B, 3, H, W) -> (view 1, view 2)."""

    def __init__(self, name: str, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        s1, s2 = preset(name)
        self.first = BatchAugment(s1, size, mean, std)
        self.second = BatchAugment(s2, size, mean, std)

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(batch), self.second(batch)
