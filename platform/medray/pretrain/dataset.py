"""Images for BYOL: the manifest's train rows, split across Ray Train workers, decoded through
medray.storage + medray.data.decode, resized whole to a fixed square, as uint8 tensors.

Every worker takes the same number of rows per epoch (a `DistributedSampler`-style shuffle
with `drop_last`), so all workers run the same number of steps: DDP's all-reduce and Ray
Train's `report` are barriers. A file that cannot be read or decoded is skipped (the next
row stands in for it, keeping batch sizes equal) and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


def load_pixels(uri: str, size: int) -> np.ndarray:
    """Read and decode one image, resized whole to uint8 (size, size, 3); raises on failure."""
    from medray.data.decode import read_image

    rgb = read_image(uri)
    if rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
    return rgb if rgb.flags.writeable else rgb.copy()  # torch.from_numpy wants writable


class ImageRows(Dataset):
    """Item i: (uint8 (3, size, size) tensor of `uris[i]` or the views `transform` makes of
    it, number of rows skipped to find it). A row that cannot be read or decoded is logged
    once per loader process and replaced by the next readable row; summing the second field
    over a batch counts the replaced draws."""

    def __init__(self, uris: list[str], size: int, transform: Callable | None = None) -> None:
        if not uris:
            raise ValueError("no images to train on")
        self.uris, self.size, self.transform = list(uris), size, transform
        self.bad: set[str] = set()

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        for j in range(len(self.uris)):
            uri = self.uris[(i + j) % len(self.uris)]
            if uri in self.bad:
                continue
            try:
                x = torch.from_numpy(load_pixels(uri, self.size)).permute(2, 0, 1).contiguous()
            except Exception as exc:  # unreadable/undecodable: skip, never crash a run
                self.bad.add(uri)
                log.warning("pretrain: skipping %s: %s", uri, exc)
                continue
            return (self.transform(x) if self.transform else x), j
        raise RuntimeError(f"none of the {len(self.uris)} images could be decoded")


class EpochSampler(torch.utils.data.Sampler):
    """This worker's rows of the current epoch (`epoch_rows`); call `set_epoch` each epoch."""

    def __init__(self, n: int, seed: int, rank: int, world: int) -> None:
        self.n, self.seed, self.rank, self.world, self.epoch = n, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_rows(self.n, self.epoch, self.seed, self.rank, self.world).tolist())

    def __len__(self) -> int:
        return self.n // self.world


def epoch_rows(n: int, epoch: int, seed: int, rank: int, world: int) -> np.ndarray:
    """This worker's row numbers for `epoch`: one shared permutation, cut into `world`
    equal slices (the remainder dropped), so every worker gets `n // world` rows."""
    per = n // world
    if per == 0:
        raise ValueError(f"{n} training images cannot be split over {world} workers")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[rank * per : (rank + 1) * per]


def train_uris(manifest: pd.DataFrame) -> list[str]:
    """URIs of the train split (BYOL needs no labels); all rows when there is no train split."""
    train = manifest[manifest["split"] == "train"]
    return (train if len(train) else manifest)["uri"].tolist()


def subset_uris(uris: list[str], max_images: int, seed: int) -> list[str]:
    """A seeded random `max_images` of `uris` in their original order (0: all of them)."""
    if max_images <= 0 or max_images >= len(uris):
        return list(uris)
    keep = np.sort(np.random.default_rng(seed).choice(len(uris), max_images, replace=False))
    return [uris[i] for i in keep]


def looks_grayscale(rgb: np.ndarray, tolerance: float = 1.0) -> bool:
    """True when the three channels agree (mean absolute difference under `tolerance` grey
    levels, so JPEG chroma noise does not count as colour)."""
    x = rgb.astype(np.int16)
    spread = np.abs(x[..., 0] - x[..., 1]).mean() + np.abs(x[..., 1] - x[..., 2]).mean()
    return bool(spread < tolerance)


def probe_sources(uris: list[str], n: int = 16, seed: int = 0) -> tuple[int | None, bool | None]:
    """Median shorter side and whether every one is grayscale, over a seeded sample of `n`
    readable images (None, None when none can be read): cheap enough to run in the driver."""
    from medray.data.decode import read_image

    order = np.random.default_rng(seed).permutation(len(uris))[: 4 * n]
    sides, gray = [], []
    for i in order:
        try:
            rgb = read_image(uris[i])
        except Exception:  # unreadable: the training loop quarantines it, not the probe
            continue
        sides.append(min(rgb.shape[:2]))
        gray.append(looks_grayscale(rgb))
        if len(sides) == n:
            break
    if not sides:
        return None, None
    return int(np.median(sides)), all(gray)


def auto_image_size(source_side: int | None, default: int = 224) -> int:
    """Training side for sources of this size: the embed stage's own rule
    (`medray.models.input_size_for`), so the export is used at the scale it was trained at;
    the model's `default` when the sources' size is unknown."""
    from medray.models import input_size_for

    return default if source_side is None else input_size_for(source_side, default)


def knn_subset(manifest: pd.DataFrame, max_images: int, seed: int) -> pd.DataFrame:
    """Up to `max_images` labelled val rows (test rows if there is no val split), or empty
    when the data has no labels (kNN accuracy needs them)."""
    for split in ("val", "test"):
        rows = manifest[(manifest["split"] == split) & (manifest["labels"].map(len) > 0)]
        if len(rows) >= 2:
            break
    if len(rows) < 2 or len({lab for labs in rows["labels"] for lab in labs}) < 2:
        return manifest.iloc[0:0]
    if len(rows) > max_images:
        rows = rows.sample(n=max_images, random_state=seed)
    return rows.reset_index(drop=True)
