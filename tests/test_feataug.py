"""Feature-space augmentation: shapes, labels kept, the DeVries & Taylor formulas, mixup."""

from __future__ import annotations

import numpy as np
import pytest

from medray import feataug
from medray.feataug import FeatAugConfig


def onehot(labels, n):
    return np.eye(n, dtype=np.float32)[labels]


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 5)).astype(np.float32)
    y = onehot(np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]), 4)  # class 3 is alone
    return x, y


def test_neighbours_stay_in_class_and_skip_singletons(batch):
    x, y = batch
    a, n = feataug.same_class_neighbours(x, y, k=2)
    assert len(a) == len(n) == 11 * 2
    assert (y[a] == y[n]).all()
    assert (a != n).all()
    assert 11 not in a  # the lone class-3 row has no same-class neighbour


def test_neighbour_is_the_nearest():
    x = np.array([[0.0, 0], [1, 0], [5, 0], [0.2, 0]], dtype=np.float32)
    y = onehot(np.array([0, 0, 0, 1]), 2)
    a, n = feataug.same_class_neighbours(x, y, k=1)
    assert dict(zip(a.tolist(), n.tolist(), strict=True)) == {0: 1, 1: 0, 2: 1}


def test_interpolate_and_extrapolate_formulas():
    x = np.array([[0.0, 0.0], [2.0, 4.0]], dtype=np.float32)
    y = onehot(np.array([1, 1]), 2)
    xi, yi = feataug.interpolate(x, y, lam=0.5)
    xe, ye = feataug.extrapolate(x, y, lam=0.5)
    np.testing.assert_allclose(xi, [[1, 2], [1, 2]])  # midpoints
    np.testing.assert_allclose(xe, [[-1, -2], [3, 6]])  # c_j + (c_j - c_k)/2
    assert (yi == y).all() and (ye == y).all()


def test_multilabel_same_class_means_same_label_set():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    y = np.array([[1, 0], [1, 0], [1, 1], [0, 0], [0, 0]], dtype=np.float32)
    a, n = feataug.same_class_neighbours(x, y)
    assert sorted(zip(a.tolist(), n.tolist(), strict=True)) == [(0, 1), (1, 0), (3, 4), (4, 3)]


def test_gaussian_noise_scale(batch):
    x, _ = batch
    rng = np.random.default_rng(1)
    big = np.repeat(x, 200, axis=0)
    noisy = feataug.gaussian_noise(big, 0.5, rng)
    ratio = (noisy - big).std(0) / big.std(0)
    assert noisy.shape == big.shape and noisy.dtype == np.float32
    np.testing.assert_allclose(ratio, 0.5, rtol=0.1)
    assert feataug.gaussian_noise(x[:1], 0.1, rng).shape == (1, 5)


def test_mixup_is_convex_and_targets_sum_to_one(batch):
    x, y = batch
    xm, ym = feataug.mixup(x, y, alpha=0.4, rng=np.random.default_rng(2))
    assert xm.shape == x.shape and ym.shape == y.shape
    np.testing.assert_allclose(ym.sum(1), 1.0, rtol=1e-6)
    assert xm.min() >= x.min() - 1e-6 and xm.max() <= x.max() + 1e-6


@pytest.mark.parametrize("n", [0, 1, 2, 7, 19])
def test_augment_batch_sizes(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = onehot(rng.integers(0, 2, n), 2)
    cfg = FeatAugConfig(noise=True, interpolate=True, extrapolate=True, mixup=True)
    xa, ya = feataug.augment_batch(x, y, cfg, rng)
    assert xa.shape[1] == 3 and ya.shape[1] == 2 and len(xa) == len(ya) >= n
    assert xa.dtype == np.float32


def test_augment_batch_off_is_identity(batch):
    x, y = batch
    xa, ya = feataug.augment_batch(x, y, FeatAugConfig(), np.random.default_rng(0))
    assert xa is x and ya is y


def test_augment_batch_counts(batch):
    x, y = batch
    cfg = FeatAugConfig(noise=True, interpolate=True, extrapolate=True)
    xa, ya = feataug.augment_batch(x, y, cfg, np.random.default_rng(0))
    assert len(xa) == 12 + 11 + 11 + 12
    assert set(map(tuple, ya.tolist())) <= set(map(tuple, y.tolist()))
