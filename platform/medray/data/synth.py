"""`medray data synth`: seeded histology-like H&E tiles, so every stage runs with no download.

Tiles are rendered in optical density (Beer-Lambert, as stain-separation methods model H&E:
Ruifrok & Johnston, Anal Quant Cytol Histol 2001): a haematoxylin map (nuclei) and an eosin
map (cytoplasm, fibres) mixed with per-patient stain vectors, so the same class looks
different from patient to patient, as between real slides and labs. Classes differ in
texture, not in a colour shortcut: nuclei density and size, fibres, empty areas (fat, gland
lumens). Parameters are jittered per tile, so classes overlap and retrieval is not trivially
perfect. Everything is vectorised over a batch of tiles with FFT convolutions.

The multi-label variant paints regions of several components (`MULTI_LABELS`) over normal
mucosa; a tile with none of them has an empty label list ("normal").
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image

from medray import storage, workdir
from medray.data.config import DataConfig
from medray.data.manifest import ImportResult, write_manifest
from medray.data.parallel import thread_map
from medray.data.splits import assign_splits

# name: (nuclei per 10k px, nucleus radius in px at 96 px, fibres, eosin, empty areas)
CLASSES: dict[str, tuple[float, float, float, float, float]] = {
    "adipose": (3.0, 1.6, 0.0, 0.5, 0.85),
    "debris": (40.0, 1.0, 0.1, 0.7, 0.25),
    "lymphocytes": (150.0, 1.9, 0.0, 0.35, 0.0),
    "mucosa": (30.0, 2.4, 0.15, 0.55, 0.8),
    "stroma": (8.0, 1.6, 0.9, 0.85, 0.05),
    "tumor": (45.0, 3.1, 0.15, 0.55, 0.0),
}
MULTI_LABELS = ("adipose", "lymphocytes", "stroma", "tumor")
"""Components of the multi-label variant; a tile with none is normal mucosa (no label)."""

H_STAIN = np.array([0.65, 0.70, 0.29])
E_STAIN = np.array([0.07, 0.99, 0.11])
BATCH = 64


def synth(
    workdir_uri: str,
    n: int = 1000,
    multi_label: bool = False,
    seed: int = 0,
    size: int = 96,
    cfg: DataConfig | None = None,
) -> ImportResult:
    """Render `n` tiles as PNGs under <workdir>/data/images/synth and write the manifest.

    Deterministic for a given (n, multi_label, seed, size); re-running replaces the set.
    """
    cfg = cfg or DataConfig(workdir=workdir_uri, seed=seed)
    workdir_uri = storage.resolve(workdir_uri)  # the manifest holds absolute URIs
    per_patient = cfg.synth.tiles_per_patient
    labels, patients = plan_tiles(n, multi_label, per_patient, seed)
    out_dir = storage.join(workdir.images(workdir_uri), "synth")
    storage.remove(out_dir)
    stains = patient_stains(int(patients.max()) + 1, seed)
    batches = [range(s, min(s + BATCH, n)) for s in range(0, n, BATCH)]

    def write_batch(rows: range) -> list[str]:
        rng = np.random.default_rng([seed, rows.start])
        rows_labels = [labels[i] for i in rows]
        tiles = render_tiles(rng, rows_labels, stains[patients[rows]], size, multi_label)
        uris = []
        for i, tile in zip(rows, tiles):
            uri = storage.join(out_dir, f"{tile_id(i)}.png")
            png = io.BytesIO()
            Image.fromarray(tile).save(png, format="PNG")
            storage.write_bytes(uri, png.getvalue())
            uris.append(uri)
        return uris

    uris = [u for batch in thread_map(write_batch, batches, 2, "render tiles") for u in batch]
    frame = pd.DataFrame(
        {
            "id": [tile_id(i) for i in range(n)],
            "uri": uris,
            "labels": labels,
            "patient_id": [f"patient-{p:04d}" for p in patients],
        }
    )
    frame["split"] = assign_splits(
        labels, frame["patient_id"].tolist(), cfg.splits.fractions(), seed
    )
    names = list(MULTI_LABELS) if multi_label else list(CLASSES)
    kind = "multi-label" if multi_label else "single-label"
    return write_manifest(
        workdir_uri,
        frame,
        source=f"synth:{kind} n={n} seed={seed} size={size}",
        multi_label=multi_label,
        label_names=names,
        read=n,
        task="tissue",
    )


def tile_id(i: int) -> str:
    return f"synth-{i:05d}"


def plan_tiles(
    n: int, multi_label: bool, per_patient: int, seed: int
) -> tuple[list[list[str]], np.ndarray]:
    """Labels per tile (balanced classes, or independent components with ~1/4 normal) and a
    patient index per tile (each patient contributes tiles of several classes)."""
    rng = np.random.default_rng([seed, 1])
    if multi_label:
        present = rng.random((n, len(MULTI_LABELS))) < 0.3
        labels = [[MULTI_LABELS[j] for j in np.flatnonzero(row)] for row in present]
    else:
        names = list(CLASSES)
        classes = rng.permutation(np.arange(n) % len(names))
        labels = [[names[c]] for c in classes]
    n_patients = max(1, int(np.ceil(n / per_patient)))
    patients = rng.permutation(np.arange(n) % n_patients)
    return labels, patients


def patient_stains(n_patients: int, seed: int) -> np.ndarray:
    """(P, 3, 3) per patient: haematoxylin and eosin OD vectors (jittered hue and strength)
    and a background OD, the variation a stain-normalisation step would otherwise remove."""
    rng = np.random.default_rng([seed, 2])
    h = H_STAIN + rng.normal(0, 0.08, (n_patients, 3))
    e = E_STAIN + rng.normal(0, 0.08, (n_patients, 3))
    h = (
        np.abs(h)
        / np.linalg.norm(h, axis=1, keepdims=True)
        * rng.uniform(0.8, 1.25, (n_patients, 1))
    )
    e = (
        np.abs(e)
        / np.linalg.norm(e, axis=1, keepdims=True)
        * rng.uniform(0.7, 1.3, (n_patients, 1))
    )
    background = rng.uniform(0.02, 0.08, (n_patients, 3))
    return np.stack([h, e, background], axis=1)


def render_tiles(
    rng: np.random.Generator,
    labels: list[list[str]],
    stains: np.ndarray,
    size: int,
    multi_label: bool = False,
) -> np.ndarray:
    """uint8 (B, size, size, 3) tiles for the given label lists and (B, 3, 3) stains.
    Single-label tiles are their class throughout; a multi-label component covers a region."""
    b = len(labels)
    scale = size / 96
    haem, eosin = _tissue(rng, ["mucosa"] * b, size, scale)
    for name in CLASSES:
        has = np.array([name in row for row in labels])
        if not has.any():
            continue
        h, e = _tissue(rng, [name] * b, size, scale)
        region = _region(rng, b, size, scale) if multi_label else 1.0
        mask = region * has[:, None, None]
        haem = haem * (1 - mask) + h * mask
        eosin = eosin * (1 - mask) + e * mask
    od = (
        haem[..., None] * stains[:, None, None, 0]
        + eosin[..., None] * stains[:, None, None, 1]
        + stains[:, None, None, 2]
    )
    rgb = np.exp(-od) * rng.uniform(0.9, 1.0, (b, 1, 1, 1))
    rgb = rgb + rng.normal(0, 0.025, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _tissue(
    rng: np.random.Generator, names: list[str], size: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration maps (B, size, size) for one class per tile."""
    b = len(names)
    params = np.array([CLASSES[name] for name in names])
    jitter = rng.uniform(0.75, 1.3, params.shape)
    nuclei, radius, fibres, eosin_level, empty = (params * jitter).T
    area = size * size / 10_000
    empty_map = _empty_areas(rng, b, size, scale, names) * np.clip(empty, 0, 0.95)[:, None, None]
    density = np.where(
        np.array([n == "mucosa" for n in names])[:, None, None],
        _gland_rims(empty_map),
        1.0 - empty_map,
    )
    nuclei_map = _nuclei(rng, density, nuclei * area, radius * scale)
    fibre_map = _fibres(rng, b, size, scale) * fibres[:, None, None]
    background = 0.25 + 0.2 * _smooth_noise(rng, b, size, 6 * scale)
    eosin_map = (eosin_level[:, None, None] * background + 0.6 * fibre_map) * (1 - empty_map)
    haem = 1.3 * nuclei_map + 0.05 * (1 - empty_map)
    return haem, np.clip(eosin_map, 0, None) + 0.3 * nuclei_map


def _nuclei(
    rng: np.random.Generator, density: np.ndarray, counts: np.ndarray, radius: np.ndarray
) -> np.ndarray:
    """Soft discs of per-tile `radius` at points drawn with probability ~ `density`."""
    b, size, _ = density.shape
    prob = density / np.maximum(density.sum(axis=(1, 2), keepdims=True), 1e-6)
    points = (rng.random(density.shape) < prob * counts[:, None, None]).astype(float)
    yy, xx = np.mgrid[:size, :size]
    dist = np.hypot(np.minimum(yy, size - yy), np.minimum(xx, size - xx))
    radii = radius[:, None, None] * rng.uniform(0.8, 1.2, (b, 1, 1))
    kernel = 1 / (1 + np.exp((dist[None] - radii) / 0.6))
    discs = np.fft.irfft2(np.fft.rfft2(points) * np.fft.rfft2(kernel), s=(size, size))
    # Irregular chromatin: darker and lighter nuclei.
    return np.clip(discs, 0, 1) * (0.8 + 0.4 * _smooth_noise(rng, b, size, 1.5))


def _fibres(rng: np.random.Generator, b: int, size: int, scale: float) -> np.ndarray:
    """Wavy parallel streaks: white noise filtered by an elongated Gaussian at a random angle."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    angle = rng.uniform(0, np.pi, (b, 1, 1))
    along = fx * np.cos(angle) + fy * np.sin(angle)
    across = -fx * np.sin(angle) + fy * np.cos(angle)
    filt = np.exp(-((along * 40 * scale) ** 2) - ((across * 3 * scale) ** 2))
    streaks = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(b, size, size))) * filt, s=(size, size))
    streaks /= streaks.std(axis=(1, 2), keepdims=True) + 1e-9
    return np.clip(streaks, 0, None) / 2


def _empty_areas(
    rng: np.random.Generator, b: int, size: int, scale: float, names: list[str]
) -> np.ndarray:
    """1 inside empty areas: fat cells (a membrane network) or round lumens/holes."""
    noise = _smooth_noise(rng, b, size, 5 * scale)
    fat = np.array([n == "adipose" for n in names])[:, None, None]
    cells = 1 - np.exp(-(((noise - 0.5) / 0.06) ** 2))  # thin walls where noise crosses 0.5
    holes = 1 / (1 + np.exp(-(noise - 0.62) / 0.03))
    return np.where(fat, cells, holes)


def _gland_rims(empty: np.ndarray) -> np.ndarray:
    """Where nuclei sit in mucosa: a rim just outside each lumen, plus sparse elsewhere."""
    rim = _blur(empty, 2.5) - empty
    return np.clip(rim, 0, None) * 4 + 0.1


def _region(rng: np.random.Generator, b: int, size: int, scale: float) -> np.ndarray:
    """A soft blob covering roughly 30-70 % of the tile, where a component is painted."""
    noise = _smooth_noise(rng, b, size, 14 * scale)
    cut = rng.uniform(0.35, 0.6, (b, 1, 1))
    return 1 / (1 + np.exp(-(noise - cut) / 0.05))


def _smooth_noise(rng: np.random.Generator, b: int, size: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to [0, 1] per tile."""
    noise = _blur(rng.normal(size=(b, size, size)), sigma)
    lo = noise.min(axis=(1, 2), keepdims=True)
    hi = noise.max(axis=(1, 2), keepdims=True)
    return (noise - lo) / (hi - lo + 1e-9)


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    size = images.shape[-1]
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    filt = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(images) * filt, s=images.shape[-2:])
