"""`medray run pretrain` on Ray Train: 2 workers, checkpoints, a failure restart, a resume
after an interrupted run, the best-epoch export (the start when training only hurts) and
the export used by `run embed` and `run select`.

Tiny on purpose (2 shared CPUs): timm's `test_resnet` (0.4 M parameters) from random
weights, 32 px tiles, a few steps per epoch."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medray import storage
from medray.config import ConfigError, load_config
from medray.pretrain import Config, check_data

pytestmark = pytest.mark.integration

TINY = [
    "backbone.name=test_resnet",
    "backbone.weights=random",
    "image_size=32",
    "batch_size=16",
    "hidden_dim=128",
    "proj_dim=32",
    "loader_workers=0",
    "knn_k=5",
    "knn_max_images=100",
    "optim.name=sgd",
    "optim.lr=0.05",
    "ray.num_workers=2",
    "ray.cpus_per_worker=0.5",
]


def make_tiles(workdir: str, n: int, size: int = 40, seed: int = 0) -> None:
    """A labelled 4-class texture set (stripes at 3 angles, checks) with random stains:
    the fallback when `medray.data.synth` is not in this build."""
    from medray.data.manifest import write_manifest

    rng = np.random.default_rng(seed)
    out = storage.join(workdir, "data", "images")
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(n):
        c, f, ph = i % 4, rng.uniform(3, 6), rng.uniform(0, 6.3)
        wave = [xx, yy, xx + yy, None][c]
        t = np.sin(2 * np.pi * f * xx + ph) * np.sin(2 * np.pi * f * yy + ph) if wave is None \
            else np.sin(2 * np.pi * f * wave + ph)  # fmt: skip
        img = (0.5 + 0.4 * t)[..., None] * rng.uniform(0.3, 1.0, 3)
        img = np.clip(img + rng.normal(0, 0.06, img.shape), 0, 1)
        uri = storage.join(out, f"{i:04d}.png")
        png = io.BytesIO()
        Image.fromarray((img * 255).astype(np.uint8)).save(png, format="PNG")
        storage.write_bytes(uri, png.getvalue())
        rows.append({"id": f"{i:04d}", "uri": uri, "labels": [f"c{c}"], "patient_id": None,
                     "split": "val" if i % 9 == 0 else "train"})  # fmt: skip
    write_manifest(workdir, pd.DataFrame(rows), source="tiles", multi_label=False)


def config(workdir, *extra: str) -> Config:
    return load_config(Config, None, [*TINY, *extra], workdir=str(workdir))


def metric_steps(run_id: str, key: str, workdir) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    from medray import tracking
    from medray.config import MlflowConfig

    client = MlflowClient(tracking_uri=tracking.tracking_uri(MlflowConfig(), str(workdir)))
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_bad_config_and_too_little_data_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="optim.name"):
        config(tmp_path, "optim.name=rmsprop")
    with pytest.raises(ConfigError, match="name"):
        config(tmp_path, "name=a/b")
    with pytest.raises(FileNotFoundError, match="manifest"):
        check_data(config(tmp_path))
    make_tiles(str(tmp_path), 20)
    with pytest.raises(ValueError, match="batch_size"):
        check_data(config(tmp_path))


def test_export_of_the_newest_checkpoint_loads_as_a_backbone(tmp_path):
    import torch

    from medray.config import BackboneConfig
    from medray.models import load_backbone
    from medray.pretrain import export, export_dir, load_state, run_dir
    from medray.pretrain.byol import OnlineNetwork

    cfg = config(tmp_path)
    backbone = load_backbone(BackboneConfig(name="test_resnet", weights="random"))
    online = OnlineNetwork(backbone.model, backbone.model.num_features, 16, 8)
    for i, name in enumerate(
        ["checkpoint_2026-01-01_00-00-00.0", "checkpoint_2026-01-02_00-00-00.0"]
    ):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(0.5)
        path = tmp_path / "pretrain" / "byol" / name
        path.mkdir(parents=True)
        torch.save({"online": online.state_dict(), "epoch": i + 1, "step": 3 * (i + 1)},
                   path / "state.pt")  # fmt: skip
    assert run_dir(cfg).endswith("byol")
    meta = export(cfg, load_state(None, cfg), "run123")
    assert meta["source"] == "byol" and meta["mlflow_run_id"] == "run123" and meta["epochs"] == 2
    assert meta["input_size"] == 32
    loaded = load_backbone(BackboneConfig(name="test_resnet", weights=export_dir(cfg)))
    assert loaded.spec.backbone_id == meta["backbone_id"] and loaded.spec.input_size == 32
    for key, value in online.backbone.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_two_workers_train_log_and_export_for_embed_and_select(ray_local, tmp_path):
    from medray import embed, select
    from medray.models import read_export_spec
    from medray.pretrain import run

    make_tiles(str(tmp_path), 192)  # 170 train, 22 val (every class)
    res = run(config(tmp_path, "epochs=2", "optim.frozen_backbone_epochs=1"))
    assert res.workers == 2 and res.epochs_trained == [1, 2] and res.start_epoch == 0
    assert res.cpus_per_worker == 0.5 and res.torch_threads == 1  # several workers: as configured
    steps_per_epoch = (170 // 2) // 16
    assert res.steps == 2 * steps_per_epoch
    assert res.knn_initial is not None and res.knn_final is not None
    assert np.isfinite(res.final_loss) and 0 <= res.final_loss <= 8
    # Per-step metrics come from rank 0 only: one point per step, not one per worker.
    for key in ("loss", "lr", "tau", "images_per_s"):
        assert [s for s, _ in metric_steps(res.mlflow_run_id, key, tmp_path)] == list(
            range(1, res.steps + 1)
        ), key
    # The backbone is held still for the first epoch while the heads learn, then trains.
    lr_backbone = [v for _, v in metric_steps(res.mlflow_run_id, "lr_backbone", tmp_path)]
    assert lr_backbone[:steps_per_epoch] == [0.0] * steps_per_epoch and lr_backbone[-1] > 0
    taus = [v for _, v in metric_steps(res.mlflow_run_id, "tau", tmp_path)]
    assert taus[0] == pytest.approx(0.99) and all(b >= a for a, b in zip(taus, taus[1:]))
    # The curve: epoch 0 is the start; online and target scored after every epoch.
    assert [r["epoch"] for r in res.curve] == [0, 1, 2]
    assert [s for s, _ in metric_steps(res.mlflow_run_id, "knn_online", tmp_path)] == [0, 1, 2]
    assert [s for s, _ in metric_steps(res.mlflow_run_id, "knn_target", tmp_path)] == [1, 2]
    best = max(
        [res.curve[0]["knn_online"]]
        + [r[k] for r in res.curve[1:] for k in ("knn_online", "knn_target")]
    )
    assert res.knn_exported == best and res.bn == "train"  # random weights: BN statistics learn

    meta = read_export_spec(res.export_dir)
    assert meta["source"] == "byol" and meta["mlflow_run_id"] == res.mlflow_run_id
    assert meta["name"] == "test_resnet" and meta["input_size"] == 32
    assert meta["backbone_id"] == res.backbone_id
    assert meta["exported_epoch"] == res.exported_epoch
    curve = storage.read_json(storage.join(res.export_dir, "curve.json"))
    assert [r["epoch"] for r in curve["curve"]] == [0, 1, 2] and curve["note"] == res.export_note

    emb = embed.run(load_config(embed.Config, None, [
        "backbone.name=test_resnet", f"backbone.weights={res.export_dir}", "pin_backbone=true",
        "ray.cpus_per_worker=0.5", "ray.num_workers=1", "decode_cpus=0.5",
    ], workdir=str(tmp_path)))  # fmt: skip
    assert emb.backbone_id == res.backbone_id and emb.count == 192

    sel = select.run(load_config(select.Config, None, [
        "candidates=[{name: test_resnet, weights: random}]", "proxy_size=40", "folds=2",
    ], workdir=str(tmp_path)))  # fmt: skip
    assert any(r.get("backbone_id") == res.backbone_id and not r.get("error")
               for r in sel.ranking)  # fmt: skip


def test_interrupted_run_resumes_when_run_again(ray_local, tmp_path):
    from medray.pretrain import run

    make_tiles(str(tmp_path), 80)
    args = ["epochs=2", "max_failures=0", "debug.fail_at_epoch=1", "knn_max_images=0"]
    with pytest.raises(Exception, match="injected failure"):
        run(config(tmp_path, *args))
    assert not storage.exists(str(tmp_path / "pretrain" / "byol" / "export"))
    res = run(config(tmp_path, *args))  # same name: picks up the checkpoint of epoch 0
    assert res.start_epoch == 1 and res.epochs_trained == [2] and res.steps == 2 * 2
    assert storage.exists(str(tmp_path / "pretrain" / "byol" / "export" / "backbone.json"))


def test_export_is_the_start_when_training_only_hurts(ray_local, tmp_path):
    """From the bundled ImageNet weights (kNN ~0.9 on these tiles), a destructive learning
    rate leaves every epoch near chance: the export holds the starting weights and says so.
    One local worker takes every free CPU."""
    import torch

    from medray.config import BackboneConfig
    from medray.models import load_backbone
    from medray.pretrain import run

    make_tiles(str(tmp_path), 144)  # 128 train, 16 val
    bundled = ["backbone.name=efficientnet_lite0", "backbone.weights=bundled",
               "optim.backbone_lr_scale=1", "optim.frozen_backbone_epochs=0"]  # fmt: skip
    res = run(config(tmp_path, *bundled, "epochs=1", "ray.num_workers=1", "optim.lr=1000",
                     "optim.warmup_epochs=0", "batch_size=32"))  # fmt: skip
    assert res.bn == "frozen_stats"  # from trained weights: BatchNorm statistics kept
    assert res.exported_epoch == 0 and res.exported_network == "start", res.curve
    assert res.knn_exported == res.knn_initial > res.curve[1]["knn_online"], res.curve
    assert res.export_note.startswith("no epoch beat the starting encoder (kNN ")
    assert res.cpus_per_worker >= 1 and res.torch_threads == int(res.cpus_per_worker)
    start = load_backbone(BackboneConfig(name="efficientnet_lite0", weights="bundled"))
    exported = load_backbone(BackboneConfig(name="efficientnet_lite0", weights=res.export_dir))
    for key, value in start.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[key], value), key
