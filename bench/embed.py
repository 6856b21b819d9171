"""Benchmark the embed stage against the bare model: how much of the model's speed survives
reading, decoding, resizing, Ray Data scheduling and writing Parquet shards.

    python bench/embed.py                                   # bundled EfficientNet-Lite0, 224 px
    python bench/embed.py --model resnet50 --size 224 --weights random   # the GPU check
    python bench/embed.py --dicom --slides                  # decode path: DICOM, slides vs PNG

One run measures, on the same machine with the same model and batch size:
  bare:  forward passes over one batch of the set's images, decoded and normalised
         beforehand, already in memory (on the GPU when there is one),
         inference_mode, bf16 autocast + channels_last on CUDA (medray.models.forward_features);
  stage: `medray.embed.run` over a manifest of PNG files on disk (a fresh workdir).
Prints the ratio stage/bare first, then the absolute img/s, then the machine.

--dicom / --slides measure instead the embed stage's decode step (`read_image` + resize to
the model's input, what each decode task does per row) on the same pixels stored as PNG, as
DICOM (native 8-bit; RLE; JPEG 2000 lossless; 12-bit MONOCHROME1 with rescale and window)
and as tiles of a pyramidal tiled TIFF read through OpenSlide; the ratio format/PNG first.
The rest of the stage (Ray Data, the model, shard writes) does not depend on the format.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def write_images(root: Path, n: int, px: int, seed: int) -> list[str]:
    """n PNG tiles (smooth colour blobs + noise, 4 classes) so decode costs what a real PNG costs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px] / px
    paths = []
    for i in range(n):
        label = i % 4
        freq = 2 + 3 * label
        base = np.sin(2 * np.pi * (freq * xx + rng.random())) * np.cos(2 * np.pi * freq * yy)
        img = np.stack([base * (0.5 + 0.5 * rng.random()) for _ in range(3)], axis=-1)
        img = (img - img.min()) / (np.ptp(img) + 1e-8) * 200 + rng.normal(0, 20, img.shape)
        path = root / f"class{label}" / f"img{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def make_workdir(work: Path, n: int, px: int, seed: int) -> list[str]:
    import pandas as pd

    from medray.data.manifest import write_manifest

    paths = write_images(work / "images", n, px, seed)
    frame = pd.DataFrame(
        {
            "id": [f"{i:06d}" for i in range(n)],
            "uri": paths,
            "labels": [[Path(p).parent.name] for p in paths],
            "split": ["train"] * n,
        }
    )
    write_manifest(str(work), frame, source="bench", multi_label=False)
    return paths


def bare_model(
    args: argparse.Namespace, n: int, images: list[str], threads: int | None = None
) -> tuple[float, str]:
    """img/s of the model alone on one batch of the set's images, decoded and normalised
    beforehand and already on its device (CPU: `threads` intra-op threads, None = torch's
    default, all cores). Real pixels, not random ones: CPU convolutions ran ~1.7x faster on
    real images than on torch.randn input here, so random tensors would flatter the stage."""
    import torch

    from medray.data.decode import decode_image
    from medray.models import normalize_batch, resize_image

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    from medray.config import BackboneConfig
    from medray.models import forward_features, load_backbone, prepare_for_device

    bb = load_backbone(BackboneConfig(name=args.model, weights=args.weights, input_size=args.size))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = prepare_for_device(bb.model, device)
    s = bb.spec.input_size
    paths = (images * args.batch_size)[: args.batch_size]
    pixels = np.stack([resize_image(decode_image(Path(p).read_bytes(), p), bb.spec) for p in paths])
    batch = normalize_batch(torch.from_numpy(pixels).to(device), bb.spec)
    assert batch.shape == (args.batch_size, 3, s, s)
    forward_features(model, batch)  # warm-up (cuDNN autotune, allocator, lazy init)
    seconds = []
    for _ in range(max(1, n // args.batch_size)):
        t0 = time.perf_counter()
        forward_features(model, batch)  # includes the copy of (B, D) features to the host
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    # Median batch: other processes on a shared machine slow some batches down.
    rate = args.batch_size / float(np.median(seconds))
    where = f"{device}, torch threads {torch.get_num_threads()}, {len(seconds)} batches"
    torch.set_num_threads(default_threads)
    return rate, where


def stage(args: argparse.Namespace, work: Path) -> tuple[float, float, dict]:
    """(whole-stage img/s, Ray Data job img/s, result) of medray.embed.run."""
    from medray import embed
    from medray.config import load_config

    overrides = [
        f"backbone.name={args.model}",
        f"backbone.weights={args.weights}",
        f"batch_size={args.batch_size}",
        f"ray.num_workers={args.num_workers}",
        "overwrite=true",
    ]
    if args.size:
        overrides.append(f"backbone.input_size={args.size}")
    if args.num_cpus:
        overrides.append(f"ray.num_cpus={args.num_cpus}")
    cfg = load_config(embed.Config, overrides=overrides, workdir=str(work))
    t0 = time.perf_counter()
    result = embed.run(cfg)
    whole = result.embedded_now / (time.perf_counter() - t0)
    return whole, result.images_per_s, result.model_dump()


def write_dicom(path: Path, gray: np.ndarray, variant: str) -> None:
    """`gray` as a CR object: native, rle, j2k (lossless) or mono1 (12-bit, windowed)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CR", *gray.shape
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    stored = gray
    if variant == "mono1":
        stored = ((255 - gray.astype(np.uint16)) * 16).astype(np.uint16)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -100
        ds.WindowCenter, ds.WindowWidth = 920.5, 2041
    ds.PixelData = stored.tobytes()
    if variant in ("rle", "j2k"):
        ds.compress(RLELossless if variant == "rle" else JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)


def decode_path(uris: list[str], spec, passes: int = 3) -> float:
    """Median over `passes` of the seconds per image of read_image + resize_image."""
    from medray.data.decode import read_image
    from medray.models import resize_image

    seconds = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for uri in uris:
            resize_image(read_image(uri), spec)
        seconds.append((time.perf_counter() - t0) / len(uris))
    return float(np.median(seconds))


def format_sets(args: argparse.Namespace, root: Path) -> dict[str, list[str]]:
    """Format name -> URIs of the same `args.n` images in that format."""
    from PIL import Image

    pngs = write_images(root / "png", args.n, args.image_px, seed=0)
    sets: dict[str, list[str]] = {}
    if args.dicom:
        grays = [np.asarray(Image.open(p).convert("L")) for p in pngs]
        for i, gray in enumerate(grays):
            Image.fromarray(gray).save(root / f"g{i}.png")
        sets["PNG (grey)"] = [str(root / f"g{i}.png") for i in range(len(grays))]
        for variant in ("native", "rle", "j2k", "mono1"):
            (root / variant).mkdir()
            for i, gray in enumerate(grays):
                write_dicom(root / variant / f"{i}.dcm", gray, variant)
            sets[f"DICOM {variant}"] = [str(root / variant / f"{i}.dcm") for i in range(len(grays))]
    if args.slides:
        import tifffile

        from medray.data.decode import fragment_uri

        px, side = args.image_px, int(np.ceil(np.sqrt(args.n)))
        mosaic = np.zeros((side * px, side * px, 3), np.uint8)
        for i, p in enumerate(pngs):
            y, x = divmod(i, side)
            mosaic[y * px : (y + 1) * px, x * px : (x + 1) * px] = np.asarray(Image.open(p))
        with tifffile.TiffWriter(root / "slide.tiff") as tif:
            for level in range(3):
                tif.write(np.ascontiguousarray(mosaic[:: 2**level, :: 2**level]), tile=(256, 256),
                          photometric="rgb", compression="zlib", subfiletype=1 if level else 0)  # fmt: skip
        sets["PNG (RGB)"] = pngs
        sets["slide tile"] = [
            fragment_uri(
                str(root / "slide.tiff"),
                level=0,
                x=(i % side) * px,
                y=(i // side) * px,
                w=px,
                size=px,
            )  # fmt: skip
            for i in range(len(pngs))
        ]
    return sets


def decode_bench(args: argparse.Namespace) -> None:
    from medray.config import BackboneConfig
    from medray.models import load_backbone

    spec = load_backbone(BackboneConfig(name=args.model, weights=args.weights,
                                        input_size=args.size)).spec  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="medray-bench-decode-") as tmp:
        sets = format_sets(args, Path(tmp))
        cost = {name: decode_path(uris, spec) for name, uris in sets.items()}
    base = {"DICOM": cost.get("PNG (grey)"), "slide": cost.get("PNG (RGB)")}
    for name, seconds in cost.items():
        ref = base.get(name.split()[0])
        if ref:
            print(f"{name:14s} / PNG: {seconds / ref:6.2f}")
    for name, seconds in cost.items():
        print(
            f"{name:14s} {seconds * 1e3:7.2f} ms/image (read_image + resize to {spec.input_size})"
        )
    print(f"set: {args.n} images {args.image_px}px; machine: {machine()}")


def machine() -> str:
    import ray
    import timm
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores (load average {load}), {gpu}; python {platform.python_version()}, "
        f"torch {torch.__version__}, ray {ray.__version__}, timm {timm.__version__}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0", help="timm model name")
    p.add_argument("--weights", default="bundled", help="bundled | random | pretrained | path")
    p.add_argument("--size", type=int, default=None, help="input side (default: model's, 224)")
    p.add_argument("--n", type=int, default=512, help="images in the synthetic set")
    p.add_argument("--image-px", type=int, default=256, help="side of the PNGs on disk")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bare-batches", type=int, default=4, help="batches per bare measurement")
    p.add_argument("--num-workers", type=int, default=1, help="model actors (GPUs) in the pool")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for local Ray (default all)")
    p.add_argument("--workdir", default=None, help="where to write the set (default: a temp dir)")
    p.add_argument("--dicom", action="store_true", help="decode path: DICOM against PNG")
    p.add_argument("--slides", action="store_true", help="decode path: slide tiles against PNG")
    args = p.parse_args()
    if args.dicom or args.slides:
        decode_bench(args)
        return

    from medray.raycluster import quiet_ray_data

    quiet_ray_data()
    n_bare = args.bare_batches * args.batch_size
    with tempfile.TemporaryDirectory(prefix="medray-bench-embed-") as tmp:
        work = Path(args.workdir or tmp)
        images = make_workdir(work, args.n, args.image_px, seed=0)
        # Bare model before and after the stage (a shared machine's load drifts), with
        # torch's default threads and with 1 thread: a model actor gets ray.cpus_per_worker
        # (1) CPU and Ray sets its OMP threads to that.
        before = [bare_model(args, n_bare, images), bare_model(args, n_bare, images, threads=1)]
        whole, job, result = stage(args, work)
        after = [bare_model(args, n_bare, images), bare_model(args, n_bare, images, threads=1)]
    bare = (before[0][0] + after[0][0]) / 2
    bare1 = (before[1][0] + after[1][0]) / 2
    print(f"stage / bare model: {whole / bare:.3f} (whole stage), {job / bare:.3f} (Ray Data job)")
    print(f"  against the bare model on 1 thread: {whole / bare1:.3f}, {job / bare1:.3f}")
    for (rate_b, where), (rate_a, _) in zip(before, after, strict=True):
        print(f"bare model:   {(rate_b + rate_a) / 2:8.1f} img/s  (before {rate_b:.1f}, after "
              f"{rate_a:.1f}; {where})")  # fmt: skip
    print(f"embed stage:  {whole:8.1f} img/s whole run() incl. Ray/MLflow setup and shard writes")
    print(f"  Ray Data job {job:8.1f} img/s (decode tasks + model actors + driver-side writes)")
    print(
        f"set: {args.n} PNG {args.image_px}px -> {args.model} ({args.weights}) at "
        f"{args.size or 'default'} px, batch {args.batch_size}, {args.num_workers} actor(s), "
        f"count {result['count']}, quarantined {result['quarantined']}"
    )
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
