"""Import MedMNIST-style arrays (Yang et al., "MedMNIST v2", Scientific Data 2023): an .npz
with `train_images`, `train_labels`, `val_*`, `test_*` (or unsplit `images`, `labels`).

Images are (N, H, W) grayscale or (N, H, W, C) with C in 1/3/4; labels are (N,) / (N, 1)
class indices or (N, L) multi-hot. Each image is written as a PNG under
<workdir>/data/images/npz/<split>/ (the file's split names, whatever `splits.rename` makes
of them). The file's own splits are kept, then adjusted by `splits.rename` and
`splits.carve_val` (see `medray.data.config.SplitConfig`); an unsplit file is divided by the
`splits` fractions.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image

from medray import storage, workdir
from medray.data.config import DataConfig
from medray.data.decode import DecodeError, to_rgb8
from medray.data.manifest import ImportResult, quarantine_frame, stable_id, write_manifest
from medray.data.parallel import thread_map
from medray.data.splits import manifest_splits, with_split_note

SPLIT_PREFIXES = {"train": "train", "val": "val", "test": "test"}


def import_npz(source: str, cfg: DataConfig, label_names: list[str] | None = None) -> ImportResult:
    """Unpack the arrays in `source` (local or s3://) into PNGs and a manifest."""
    arrays = load_npz(source)
    parts = _split_arrays(arrays, source)
    multi_label = any(_is_multi_hot(labels) for _, _, labels in parts)
    names = _label_names(parts, multi_label, label_names, source)
    out_dir = storage.join(workdir.images(cfg.workdir), "npz")
    storage.remove(out_dir)  # a re-import replaces the previous images
    jobs = [
        (split, i, images, labels) for split, images, labels in parts for i in range(len(images))
    ]
    results = thread_map(
        lambda job: _write_one(job, out_dir, names, multi_label), jobs, cfg.workers, "write PNGs"
    )
    rows = [r for r in results if "reason" not in r]
    rejected = [r for r in results if "reason" in r]
    if not rows:
        raise ValueError(f"{source}: no usable images ({len(rejected)} rejected)")
    frame = pd.DataFrame(rows)
    frame["split"] = manifest_splits(
        frame["split"].tolist(), frame["labels"].tolist(), None, cfg.splits, cfg.seed
    )
    return write_manifest(
        cfg.workdir,
        frame,
        quarantine_frame(rejected),
        source=with_split_note(f"npz:{storage.resolve(source)}", cfg),
        multi_label=multi_label,
        label_names=names,
        read=len(jobs),
    )


def load_npz(source: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz (no pickles), with errors naming the file."""
    try:
        data = storage.read_bytes(storage.resolve(source))
    except FileNotFoundError:
        raise FileNotFoundError(f"{source}: file not found") from None
    if not data.startswith(ZIP_MAGIC):  # NumPy would blame pickles for any other file
        raise ValueError(f"{source}: not an .npz file ({npz_kind(data)}); expected a NumPy "
                         ".npz archive with train_images/train_labels (or images/labels)")  # fmt: skip
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as exc:
        raise ValueError(f"{source}: not a readable .npz ({type(exc).__name__}: {exc})") from None


ZIP_MAGIC = b"PK\x03\x04"
"""An .npz is a zip archive of .npy arrays."""


def npz_kind(data: bytes) -> str:
    """What a file that is not an .npz looks like, for the error message."""
    if not data:
        return "the file is empty"
    if data.startswith(b"\x93NUMPY"):
        return "a single .npy array, not an archive of named arrays"
    head = data[:512]
    try:
        head.decode("utf-8")
        return "it looks like a text file"
    except UnicodeDecodeError:
        return "unrecognised binary content"


def _split_arrays(
    arrays: dict[str, np.ndarray], source: str
) -> list[tuple[str | None, np.ndarray, np.ndarray]]:
    parts: list[tuple[str | None, np.ndarray, np.ndarray]] = []
    prefixes = [(s, f"{p}_") for s, p in SPLIT_PREFIXES.items()]
    if not any(f"{p}images" in arrays for _, p in prefixes):
        prefixes = [(None, "")]
    for split, prefix in prefixes:
        images_key, labels_key = f"{prefix}images", f"{prefix}labels"
        if images_key not in arrays:
            continue
        if labels_key not in arrays:
            raise ValueError(f"{source}: has {images_key!r} but no {labels_key!r}")
        images, labels = arrays[images_key], arrays[labels_key]
        _check_shapes(images, labels, images_key, labels_key, source)
        parts.append((split, images, labels.reshape(len(labels), -1)))
    if not parts:
        raise ValueError(
            f"{source}: expected train_images/train_labels (and val_, test_) or images/labels; "
            f"found {', '.join(sorted(arrays)) or 'no arrays'}"
        )
    return parts


def _check_shapes(images, labels, images_key, labels_key, source) -> None:
    ok_image = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3, 4))
    if not ok_image:
        raise ValueError(
            f"{source}: {images_key} has shape {images.shape}; expected (N, H, W) or "
            "(N, H, W, C) with C in 1/3/4 (3-D volumes are not supported)"
        )
    if labels.ndim not in (1, 2) or len(labels) != len(images):
        raise ValueError(
            f"{source}: {labels_key} has shape {labels.shape}; expected ({len(images)},), "
            f"({len(images)}, 1) or ({len(images)}, L)"
        )
    if not np.issubdtype(labels.dtype, np.number) and labels.dtype != bool:
        raise ValueError(f"{source}: {labels_key} must be numeric, got {labels.dtype}")


def _is_multi_hot(labels: np.ndarray) -> bool:
    return labels.shape[1] > 1


def _label_names(parts, multi_label: bool, given: list[str] | None, source: str) -> list[str]:
    if multi_label:
        widths = {labels.shape[1] for _, _, labels in parts}
        if len(widths) != 1:
            raise ValueError(f"{source}: label arrays disagree on the number of labels {widths}")
        count = widths.pop()
    else:
        count = int(max(labels.max() for _, _, labels in parts)) + 1
    if given is None:
        return [str(i) for i in range(count)]
    if len(given) != count:  # one name per class: an extra name would add an empty class
        raise ValueError(
            f"--label-names: {len(given)} names given ({', '.join(given)}), but {source} has "
            f"{count} classes (labels 0..{count - 1}): give exactly {count}"
        )
    if len(set(given)) != len(given):
        raise ValueError(f"--label-names: duplicate names in {given}")
    return list(given)


def _labels_of(row: np.ndarray, names: list[str], multi_label: bool) -> list[str]:
    if multi_label:
        if not np.isin(row, (0, 1)).all():
            raise ValueError(f"multi-hot labels must be 0/1, got {row.tolist()}")
        return [names[j] for j in np.flatnonzero(row)]
    value = float(row[0])
    if not value.is_integer() or not 0 <= value < len(names):
        raise ValueError(f"class index {row[0]!r} is not in 0..{len(names) - 1}")
    return [names[int(value)]]


def _write_one(job, out_dir: str, names: list[str], multi_label: bool) -> dict:
    split, i, images, labels = job
    key = f"{split or 'all'}/{i:06d}.png"
    uri = storage.join(out_dir, *key.split("/"))
    try:
        labels_i = _labels_of(labels[i], names, multi_label)
        pixels = images[i]
        rgb = to_rgb8(pixels, key)
    except (ValueError, DecodeError) as exc:
        return {"uri": f"{key} (in the .npz)", "reason": getattr(exc, "reason", str(exc))}
    gray = pixels.ndim == 2 or pixels.shape[-1] == 1
    image = Image.fromarray(rgb[..., 0] if gray else rgb)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.write_bytes(uri, buffer.getvalue())
    return {"id": stable_id(f"npz/{key}"), "uri": uri, "labels": labels_i, "split": split}
