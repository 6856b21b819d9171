"""Evaluation plots as PNG bytes (matplotlib Agg, no display): a PCA scatter of embeddings
coloured by label, and a rank-10 grid (each query beside its top neighbours with labels and
scores), as in the histology image-query paper cited in DESIGN.md."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

THUMB = 96


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows of `x` on their first two principal components; returns (points (N, 2),
    explained variance ratio (2,))."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s**2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    pts = centred @ vt[:2].T
    if pts.shape[1] < 2:  # one-dimensional input: pad
        pts = np.pad(pts, ((0, 0), (0, 2 - pts.shape[1])))
        ratio = np.pad(ratio, (0, 2 - len(ratio)))
    return pts, ratio


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)  # no bbox "tight": it draws everything twice
    plt.close(fig)
    return buf.getvalue()


def pca_png(x: np.ndarray, labels: Sequence[str], title: str) -> bytes:
    """PCA scatter of embeddings, one colour per label (first label of each image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, ratio = pca_2d(x)
    fig, ax = plt.subplots(figsize=(7, 6))
    names = sorted(set(labels))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    lab = np.asarray(labels)
    for i, name in enumerate(names):
        m = lab == name
        ax.scatter(pts[m, 0], pts[m, 1], s=8, alpha=0.7, color=cmap(i % cmap.N), label=name)
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    ax.set_title(title)
    ax.legend(fontsize=7, markerscale=2, loc="best")
    return _figure_png(fig)


def rank_grid_png(
    queries: Sequence[tuple[np.ndarray, str]],
    neighbours: Sequence[Sequence[tuple[np.ndarray, str, float]]],
    title: str,
) -> bytes:
    """One row per query: the query (image, label text), then its neighbours
    (image, label text, score) best first; a wrong-label neighbour is titled in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + max((len(n) for n in neighbours), default=0)
    rows = max(len(queries), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, ((qimg, qlab), neigh) in enumerate(zip(queries, neighbours, strict=True)):
        axes[r, 0].imshow(qimg)
        axes[r, 0].set_title(f"query\n{qlab}", fontsize=7, fontweight="bold")
        qset = set(qlab.split(", "))
        for c, (img, lab, score) in enumerate(neigh, 1):
            axes[r, c].imshow(img)
            ok = bool(qset & set(lab.split(", ")))
            axes[r, c].set_title(
                f"#{c} {score:.3f}\n{lab}", fontsize=6, color="black" if ok else "red"
            )
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.45)
    return _figure_png(fig)


def thumbnail(uri: str, size: int = THUMB) -> np.ndarray:
    """A small RGB thumbnail of a stored image; a grey square when it cannot be read."""
    from PIL import Image

    from medray.data.decode import read_image

    try:
        img = Image.fromarray(read_image(uri))
        img.thumbnail((size, size))
        return np.asarray(img)
    except Exception:  # a plot never fails a run because one image moved
        return np.full((size, size, 3), 128, dtype=np.uint8)
