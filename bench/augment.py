"""BYOL's two views, batched on the device (`BatchTwoViews`, Kornia) against the per-image
loader pipeline (`TwoViews`, torchvision.transforms.v2, what the CPU data loader runs).

    python bench/augment.py [--device cpu|cuda] [--batch 64] [--size 128] [--preset histology]

Both sides make both views of the same uint8 images (source side --source-size, output
--size), every image drawing its own parameters. Prints the ratio first (batched img/s over
per-image img/s), then the absolute figures and the machine; median of --repeats timed runs
after 2 warm-ups. `augment.where: auto` uses the batched path on CUDA and the loader path on
CPU (where the loader's worker processes run it in parallel with the training step).

History: until 2026-12-06 the batched path was medray's own vectorised code (affine-grid
crops, YIQ hue rotation, grouped-conv blur). Measured against Kornia's same operations on
the same batches (CPU, 2 threads, batch 64, 160 -> 128 px): ours / Kornia img/s 0.95
(histology, 269 vs 283 img/s, quiet machine), 0.45 (histology) and 0.94 (xray) on a loaded
one. Kornia was faster every time, so it replaced ours (issue: library over hand-written).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def images_per_s(fn, batch: torch.Tensor, repeats: int, device: str) -> float:
    def once() -> float:
        t0 = time.perf_counter()
        v1, v2 = fn(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        assert v1.shape == v2.shape
        return time.perf_counter() - t0

    for _ in range(2):
        once()
    return batch.shape[0] / statistics.median(once() for _ in range(repeats))


def per_image(views):
    """The loader pipeline over a batch, one image at a time (as the data loader calls it)."""

    def run(batch: torch.Tensor):
        pairs = [views(img) for img in batch.cpu()]
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

    return run


def main() -> None:
    import kornia

    from medray.pretrain.augment import BatchTwoViews, TwoViews

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--source-size", type=int, default=160, help="decoded image side")
    ap.add_argument("--preset", default="histology")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    torch.manual_seed(0)
    shape = (args.batch, 3, args.source_size, args.source_size)
    batch = torch.randint(0, 256, shape, dtype=torch.uint8, device=args.device)
    sides = {
        "batched": BatchTwoViews(args.preset, args.size, mean, std),
        "per-image": per_image(TwoViews(args.preset, args.size, mean, std)),
    }
    rate = {name: images_per_s(fn, batch, args.repeats, args.device) for name, fn in sides.items()}
    print(f"ratio  batched (Kornia, {args.device}) / per-image loader img/s: "
          f"{rate['batched'] / rate['per-image']:.2f}")  # fmt: skip
    for name, r in rate.items():
        print(f"{name:10s} {r:9.1f} img/s (two views each)")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none"
    print(f"preset {args.preset}, batch {args.batch}, {args.source_size} -> {args.size} px, "
          f"device {args.device}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"kornia {kornia.__version__}; {platform.processor() or platform.machine()}, "
          f"GPU {gpu}")  # fmt: skip


if __name__ == "__main__":
    main()
