"""BYOL math and augmentation presets, without Ray: loss, EMA, schedules, LARS, view shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medray.pretrain import augment
from medray.pretrain.byol import (
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


def test_backbone_schedule_starts_late_and_heads_get_their_own_group():
    from medray.pretrain.byol import delayed_lr_factor, param_groups

    assert [delayed_lr_factor(s, 10, 100, 5) for s in (0, 9)] == [0.0, 0.0]
    assert delayed_lr_factor(10, 10, 100, 5) == pytest.approx(0.2)  # its own warmup begins
    assert delayed_lr_factor(14, 10, 100, 5) == pytest.approx(1.0)
    assert delayed_lr_factor(100, 10, 100, 5) == pytest.approx(0.0, abs=1e-9)
    assert delayed_lr_factor(3, 0, 100, 0) == lr_factor(3, 100, 0)
    online = tiny_online()
    heads, backbone = param_groups(online, 1e-3, 0.1)
    assert heads["lr"] == 1e-3 and backbone["lr"] == pytest.approx(1e-4)
    assert len(heads["params"]) + len(backbone["params"]) == len(list(online.parameters()))
    assert {id(p) for p in backbone["params"]} == {id(p) for p in online.backbone.parameters()}
    for name in ("sgd", "lars", "adamw"):
        opt = make_optimizer(name, param_groups(online, 1e-3, 0.1), 1e-3, 0.9, 0.0)
        lrs = {g["role"]: g["lr"] for g in opt.param_groups}  # LARS: two groups a role
        assert lrs == pytest.approx({"heads": 1e-3, "backbone": 1e-4})


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
    groups = [{"params": [w, b], "lr": 1.0, "role": "heads"}]
    opt = make_optimizer("lars", groups, 1.0, 0.0, 0.0)
    assert [g["role"] for g in opt.param_groups] == ["heads", "heads"]
    w.grad, b.grad = torch.full((2, 2), 10.0), torch.full((2,), 0.5)
    opt.step()
    # trust = 0.001 * |w| / |g| = 0.001 * 2 / 20: the matrix moves by 1e-4 * 10 = 0.001
    assert torch.allclose(w, torch.full((2, 2), 0.999))
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
    assert torch.allclose(out, x, atol=1e-4)
    out = augment.BatchAugment(spec, 24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(x)
    assert torch.allclose(out, (x - 0.5) / 0.25, atol=1e-3)  # normalised with mean and std


def test_batch_solarize_and_grayscale_always_on():
    spec = augment.ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, jitter_p=0.0,
                            gray_p=1.0, blur_p=0.0, solarize_p=1.0)  # fmt: skip
    x = torch.rand(3, 3, 16, 16)
    out = augment.BatchAugment(spec, 16, (0.0,) * 3, (1.0,) * 3)(x)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    assert out.max() <= 0.5 + 1e-6  # solarised: nothing above the threshold survives


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


# ---------------------------------------------------------------- monitor and export choice


def row(epoch, online, target=None, loss=1.0):
    return {"epoch": epoch, "loss": None if epoch == 0 else loss, "knn_online": online,
            "knn_target": target, "images_per_s": 50.0, "seconds": 2.0}  # fmt: skip


def test_best_epoch_counts_the_start_and_needs_a_strict_gain():
    from medray.pretrain.monitor import Best, best_epoch

    # Training only hurts: the start (epoch 0) stays the best.
    assert best_epoch([row(0, 0.901), row(1, 0.895, 0.9), row(2, 0.886, 0.901)]) == Best(
        0, "start", 0.901
    )  # a tie with the start is not a gain
    # The target network of epoch 2 is the best encoder.
    assert best_epoch([row(0, 0.90), row(1, 0.89, 0.903), row(2, 0.899, 0.91)]) == Best(
        2, "target", 0.91
    )
    # Online wins a tie with its target; an earlier epoch wins a tie with a later one.
    assert best_epoch([row(0, 0.5), row(1, 0.7, 0.7), row(2, 0.7, 0.6)]) == Best(1, "online", 0.7)
    # Target not measured (knn_target: false), or no kNN at all (no labels).
    assert best_epoch([row(0, 0.5), row(1, 0.6)]) == Best(1, "online", 0.6)
    assert best_epoch([row(1, None), row(2, None)]) is None
    assert best_epoch([]) is None


def test_export_note_says_plainly_what_was_exported():
    from medray.pretrain.monitor import Best, export_note

    assert export_note(Best(0, "start", 0.9012), 0.9012) == (
        "no epoch beat the starting encoder (kNN 0.901): exported the start"
    )
    assert "epoch 3, target encoder (kNN 0.910 vs 0.901" in export_note(
        Best(3, "target", 0.91), 0.901
    )
    assert "last epoch's online encoder" in export_note(None, None)


def test_progress_line_format():
    from medray.pretrain.monitor import Best, duration, eta_seconds, progress_line

    assert progress_line(row(0, 0.9012), 30, None, 0.0) == "pretrain epoch 0/30  start  kNN 0.901"
    line = progress_line(row(3, 0.897, 0.9031, loss=1.23456), 30, Best(3, "target", 0.9031),
                         eta_seconds([40.0, 50.0, 60.0], 27))  # fmt: skip
    assert line == (
        "pretrain epoch 3/30  loss 1.235  kNN 0.897 (target 0.903)  best 0.903 @ 3 target  "
        "50.0 images/s  ETA 22m30s"
    )
    no_knn = progress_line(row(1, None), 2, None, 5.0)
    assert no_knn == "pretrain epoch 1/2  loss 1.000  kNN -  50.0 images/s  ETA 5s"
    assert duration(3725) == "1h02m" and duration(0) == "0s" and eta_seconds([], 3) == 0.0


# ---------------------------------------------------------------- BatchNorm modes


def bn_online() -> OnlineNetwork:
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
    return OnlineNetwork(backbone, 8, hidden=16, out=4)


def one_step(bn: str) -> tuple[OnlineNetwork, dict[str, torch.Tensor]]:
    from medray.pretrain.byol import set_train_mode

    torch.manual_seed(0)
    online = bn_online()
    target = TargetNetwork(online)
    set_train_mode(online, target, bn)
    before = {k: v.clone() for k, v in online.backbone[1].state_dict().items()}
    opt = make_optimizer("sgd", online.parameters(), lr=0.5, momentum=0.0, weight_decay=0.0)
    x1, x2 = torch.randn(6, 3, 12, 12) * 3 + 1, torch.randn(6, 3, 12, 12) * 3 + 1
    _, p = online(torch.cat([x1, x2]))
    z = target(torch.cat([x1, x2]))
    loss = byol_loss(*p.chunk(2), *reversed(z.chunk(2)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema_update(target, online, 0.99)
    return online, before


def test_frozen_stats_keeps_running_statistics_and_trains_the_affine():
    online, before = one_step("frozen_stats")
    bn = online.backbone[1]
    assert not bn.training and online.projector.net[1].training  # only the backbone's BN
    assert torch.equal(bn.running_mean, before["running_mean"])
    assert torch.equal(bn.running_var, before["running_var"])
    assert int(bn.num_batches_tracked) == int(before["num_batches_tracked"])
    assert not torch.equal(bn.weight, before["weight"])  # the affine parameters still learn


def test_train_mode_updates_running_statistics():
    online, before = one_step("train")
    assert online.backbone[1].training
    assert not torch.equal(online.backbone[1].running_mean, before["running_mean"])


def test_bn_auto_trains_statistics_only_from_random_weights():
    from medray.pretrain.byol import resolve_bn, set_train_mode

    assert resolve_bn("auto", "random") == "train"
    assert resolve_bn("auto", "bundled") == "frozen_stats"
    assert resolve_bn("auto", "/models/export") == "frozen_stats"
    assert resolve_bn("train", "bundled") == "train"
    with pytest.raises(ValueError, match="resolve_bn"):
        set_train_mode(bn_online(), bn_online(), "auto")


def test_knn_scoring_restores_frozen_batchnorm():
    from medray.pretrain.byol import set_train_mode
    from medray.pretrain.knn import knn_accuracy

    online = bn_online()
    set_train_mode(online, TargetNetwork(online), "frozen_stats")
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    labels = torch.tensor([[1, 0], [0, 1]] * 4).numpy().astype(bool)
    spec = type("Spec", (), {"mean": MEAN, "std": STD})()
    assert knn_accuracy(online.backbone, (images, labels), spec, torch.device("cpu"), 3) >= 0
    assert online.backbone[0].training and not online.backbone[1].training


# ---------------------------------------------------------------- auto settings and CPUs


def test_auto_image_size_rule():
    from medray.pretrain.dataset import auto_image_size

    assert auto_image_size(28) == 128  # small X-rays: ~4x, not 224 (8x)
    assert auto_image_size(10) == 64 and auto_image_size(40) == 160
    assert auto_image_size(150) == 224 and auto_image_size(1024) == 224  # capped at the model size
    assert auto_image_size(60, default=256) == 256 and auto_image_size(None) == 224


def test_probe_detects_grayscale_and_size(tmp_path):
    from PIL import Image

    from medray.pretrain.dataset import looks_grayscale, probe_sources, subset_uris

    rng = np.random.default_rng(0)
    gray, colour = [], []
    for i in range(3):
        g = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(g).save(tmp_path / f"g{i}.png")
        Image.fromarray(rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)).save(
            tmp_path / f"c{i}.png"
        )
        gray.append(str(tmp_path / f"g{i}.png"))
        colour.append(str(tmp_path / f"c{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert probe_sources([*gray, str(tmp_path / "bad.png")]) == (28, True)
    assert probe_sources(colour) == (150, False)
    assert probe_sources([str(tmp_path / "bad.png")]) == (None, None)
    assert looks_grayscale(np.full((4, 4, 3), 7, np.uint8))
    assert subset_uris(gray, 0, 0) == gray and len(subset_uris(colour, 2, 0)) == 2
    assert subset_uris(colour, 2, 0) == subset_uris(colour, 2, 0)  # seeded, kept in order


def test_one_local_worker_takes_every_free_cpu():
    from medray.config import RayConfig
    from medray.pretrain import worker_cpus
    from medray.pretrain.loop import torch_threads

    one, four = RayConfig(num_workers=1), RayConfig(num_workers=4, cpus_per_worker=1.5)
    assert worker_cpus(one, 8.0, local=True) == 8
    assert worker_cpus(one, 8.0, local=False) == 1.0  # a cluster: as configured
    assert worker_cpus(four, 8.0, local=True) == 1.5  # several workers share
    assert worker_cpus(RayConfig(num_workers=1, cpus_per_worker=4), 2.5, True) == 4
    assert torch_threads(8.0, 1) == 8 and torch_threads(1.5, 4) == 1
    assert torch_threads(0.5, 4) == 1 and torch_threads(None, 3) == 3


def test_auto_optimiser_settings_follow_the_starting_weights():
    from medray.config import ConfigError, load_config
    from medray.pretrain import Config, OptimConfig, resolve_optim

    gentle = resolve_optim(OptimConfig(), "bundled")
    assert (gentle.backbone_lr_scale, gentle.frozen_backbone_epochs) == (0.1, 1.0)
    plain = resolve_optim(OptimConfig(), "random")
    assert (plain.backbone_lr_scale, plain.frozen_backbone_epochs) == (1.0, 0.0)
    mine = resolve_optim(OptimConfig(backbone_lr_scale=0.5, frozen_backbone_epochs=0), "bundled")
    assert (mine.backbone_lr_scale, mine.frozen_backbone_epochs) == (0.5, 0)
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        load_config(Config, None, ["optim.backbone_lr_scale=-1"])
