"""BYOL math and augmentation presets, without Ray: loss, EMA, schedules, LARS, view shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medray.pretrain import augment
from medray.pretrain.byol import (
    LARS,
    MLPHead,
    OnlineNetwork,
    TargetNetwork,
    byol_loss,
    ema_update,
    lr_factor,
    make_optimizer,
    regression_loss,
    tau_schedule,
)
from medray.pretrain.dataset import epoch_rows

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_online(dim: int = 8) -> OnlineNetwork:
    backbone = nn.Sequential(nn.Conv2d(3, dim, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return OnlineNetwork(backbone, dim, hidden=16, out=4)


@pytest.mark.parametrize("batch", [1, 2, 7, 19])
def test_loss_of_identical_views_is_zero(batch):
    p = torch.randn(batch, 32)
    assert byol_loss(p, p, p, p).item() == pytest.approx(0.0, abs=1e-6)
    # Scale does not matter: the loss compares directions.
    assert byol_loss(p, p, 3 * p, 0.5 * p).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_range_symmetry_and_gradient():
    p1, p2, z1, z2 = (torch.randn(5, 16) for _ in range(4))
    assert byol_loss(p1, p2, z1, z2).item() == pytest.approx(byol_loss(p2, p1, z2, z1).item())
    assert byol_loss(p1, p1, -p1, -p1).item() == pytest.approx(8.0, abs=1e-5)  # opposite: 2 * 4
    assert regression_loss(p1, z1).shape == (5,)
    p = p1.clone().requires_grad_()
    z = z1.clone().requires_grad_()
    regression_loss(p, z).mean().backward()
    assert p.grad is not None and z.grad is None  # the target branch gets no gradient


def test_ema_update_moves_target_toward_online():
    online = tiny_online()
    target = TargetNetwork(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online.backbone[0].weight.fill_(2.0)
    before = target.backbone[0].weight.clone()
    ema_update(target, online, tau=0.9)
    expected = 0.9 * before + 0.1 * 2.0
    assert torch.allclose(target.backbone[0].weight, expected)
    ema_update(target, online, tau=0.0)  # tau 0 copies
    for name, t in target.named_parameters():
        assert torch.equal(t, dict(online.named_parameters())[name])
    ema_update(target, online, tau=1.0)  # tau 1 keeps
    with pytest.raises(ValueError, match="tau"):
        ema_update(target, online, tau=1.5)


def test_ema_copies_batchnorm_buffers():
    online = tiny_online()
    online.projector.net[1].running_mean.fill_(3.0)
    target = TargetNetwork(tiny_online())
    ema_update(target, online, tau=0.99)
    assert torch.equal(target.projector.net[1].running_mean, online.projector.net[1].running_mean)


def test_tau_schedule_cosine_from_base_to_one():
    assert tau_schedule(0, 100, 0.99) == pytest.approx(0.99)
    assert tau_schedule(50, 100, 0.99) == pytest.approx(0.995)
    assert tau_schedule(100, 100, 0.99) == pytest.approx(1.0)
    taus = [tau_schedule(s, 100, 0.99) for s in range(101)]
    assert all(b >= a for a, b in zip(taus, taus[1:], strict=False))
    assert tau_schedule(500, 100) == 1.0 and tau_schedule(3, 0) == 1.0


def test_lr_warmup_then_cosine():
    f = [lr_factor(s, 100, 10) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.0, abs=1e-9)
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(b <= a + 1e-12 for a, b in zip(f[10:], f[11:], strict=False))
    assert lr_factor(100, 100, 0, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(0, 100, 0) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_optimizers_reduce_a_simple_loss(name):
    w = nn.Parameter(torch.ones(4, 4) * 3)
    b = nn.Parameter(torch.ones(4))
    opt = make_optimizer(name, [w, b], lr=0.1, momentum=0.9,
                         weight_decay=0.0)  # fmt: skip
    start = (w.square().sum() + b.square().sum()).item()
    for _ in range(20):
        opt.zero_grad()
        (w.square().sum() + b.square().sum()).backward()
        opt.step()
    assert (w.square().sum() + b.square().sum()).item() < start
    with pytest.raises(ValueError, match="optim.name"):
        make_optimizer("rmsprop", [w], 0.1, 0.9, 0.0)


def test_lars_scales_matrices_not_vectors():
    w = nn.Parameter(torch.ones(2, 2))
    b = nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=1.0, momentum=0.0, eta=0.01)
    w.grad, b.grad = torch.full((2, 2), 10.0), torch.full((2,), 0.5)
    opt.step()
    # trust = 0.01 * |w| / |g| = 0.01 * 2 / 20: the matrix moves by 0.001 * 10 = 0.01
    assert torch.allclose(w, torch.full((2, 2), 0.99))
    assert torch.allclose(b, torch.full((2,), 0.5))  # the vector takes the plain step


def test_online_network_shapes_and_mlp_head():
    online = tiny_online()
    z, p = online(torch.randn(3, 3, 16, 16))
    assert z.shape == (3, 4) and p.shape == (3, 4)
    assert MLPHead(8, 16, 4)(torch.randn(2, 8)).shape == (2, 4)


@pytest.mark.parametrize("name", sorted(augment.PRESETS))
def test_every_preset_makes_two_views_per_image(name):
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    v1, v2 = augment.TwoViews(name, 32, MEAN, STD)(image)
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)


@pytest.mark.parametrize("name", sorted(augment.PRESETS))
def test_every_preset_on_batches_draws_per_image(name):
    batch = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    batch[:] = batch[0]  # six copies of one image
    v1, v2 = augment.BatchTwoViews(name, 32, MEAN, STD)(batch)
    assert v1.shape == v2.shape == (6, 3, 32, 32) and v1.dtype == torch.float32
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()
    assert not torch.allclose(v1[0], v1[1])  # each copy got its own crop/jitter


def test_batch_augment_identity_spec_keeps_the_image():
    spec = augment.ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, jitter_p=0.0,
                            gray_p=0.0, blur_p=0.0)  # fmt: skip
    x = torch.rand(2, 3, 24, 24)
    out = augment.BatchAugment(spec, 24, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(x)
    assert torch.allclose(out, x, atol=1e-5)


def test_batch_solarize_and_grayscale_always_on():
    spec = augment.ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, jitter_p=0.0,
                            gray_p=1.0, blur_p=0.0, solarize_p=1.0)  # fmt: skip
    x = torch.rand(3, 3, 16, 16)
    out = augment.BatchAugment(spec, 16, (0.0,) * 3, (1.0,) * 3)(x)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    assert out.max() <= 0.5 + 1e-6  # solarised: nothing above the threshold survives


def test_hue_rotation_by_a_full_turn_is_identity():
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(augment.rotate_hue(x, torch.ones(2)), x, atol=1e-5)
    assert torch.allclose(augment.rotate_hue(x, torch.zeros(2)), x, atol=1e-5)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="histology"):
        augment.preset("mri")


def test_epoch_rows_equal_disjoint_slices():
    a = epoch_rows(103, epoch=2, seed=0, rank=0, world=2)
    b = epoch_rows(103, epoch=2, seed=0, rank=1, world=2)
    assert len(a) == len(b) == 51 and not set(a) & set(b)
    assert not (epoch_rows(103, 3, 0, 0, 2) == a).all()  # reshuffled each epoch
    with pytest.raises(ValueError, match="workers"):
        epoch_rows(1, 0, 0, 0, 2)
