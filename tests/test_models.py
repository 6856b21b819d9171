"""Backbones: bundled ImageNet weights load by position and really classify, mismatches fail
loudly, export -> load keeps id and outputs, preprocessing handles X-ray style inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medray.config import BackboneConfig
from medray.models import (
    Backbone,
    BackboneSpec,
    WeightsMismatch,
    bundled_state_dict,
    embed_images,
    export_backbone,
    fit_input_size,
    forward_features,
    input_size_for,
    load_backbone,
    map_by_position,
    preprocess_image,
    state_dict_sha256,
)

SAMPLES = Path(torch.__file__).parents[1] / "matplotlib" / "mpl-data" / "sample_data"


def tiny_spec(size: int = 32) -> BackboneSpec:
    return BackboneSpec(
        name="x",
        weights="random",
        input_size=size,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        dim=8,
        weights_sha256="0" * 64,
        backbone_id="x-0000000000",
    )


@pytest.fixture(scope="module")
def bundled() -> Backbone:
    return load_backbone(BackboneConfig())


def imagenet_top1(image: np.ndarray) -> int:
    import timm

    model = timm.create_model("efficientnet_lite0", num_classes=1000)
    model.load_state_dict(bundled_state_dict())
    spec = load_backbone(BackboneConfig(weights="random")).spec  # same preprocessing
    with torch.inference_mode():
        logits = model.eval()(preprocess_image(image, spec)[None])
    return int(logits.argmax())


def test_bundled_weights_classify_skimage_images():
    data = pytest.importorskip("skimage.data")
    assert imagenet_top1(data.chelsea()) == 285  # Egyptian cat
    assert imagenet_top1(data.coffee()) == 967  # espresso


def test_bundled_weights_classify_grace_hopper():
    path = SAMPLES / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip("matplotlib sample image not installed")
    from PIL import Image

    top1 = imagenet_top1(np.asarray(Image.open(path).convert("RGB")))
    assert top1 in (834, 652, 457)  # suit, military uniform, bow tie


def test_bundled_spec(bundled):
    spec = bundled.spec
    # default: multi-scale pooling (last 3 levels 40 + 112 + 320 channels, plus 1280) + hflip
    assert spec.name == "efficientnet_lite0" and spec.dim == 1752 and spec.input_size == 224
    assert spec.pooling == "multiscale" and spec.levels == 3 and spec.tta == "hflip"
    assert spec.backbone_id == f"efficientnet_lite0-{spec.weights_sha256[:10]}-ms3-hflip"
    assert not bundled.model.training


def test_avg_pooling_is_the_models_own_features(bundled):
    plain = load_backbone(BackboneConfig(pooling="avg", tta="none"))
    assert plain.spec.dim == 1280 and plain.spec.levels == 0
    assert plain.spec.backbone_id == f"efficientnet_lite0-{plain.spec.weights_sha256[:10]}"
    assert plain.spec.weights_sha256 == bundled.spec.weights_sha256
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(plain.model(x), dim=1).numpy()
    np.testing.assert_allclose(forward_features(plain.model, x, plain.spec), want, atol=1e-5)


def test_multiscale_hflip_features_are_flip_invariant(bundled):
    x = torch.randn(2, 3, 64, 64)
    a = forward_features(bundled.model, x, bundled.spec)
    b = forward_features(bundled.model, torch.flip(x, dims=[3]), bundled.spec)
    assert a.shape == (2, 1752)
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_input_size_for_small_and_large_images():
    assert input_size_for(28, 224) == 128  # MedMNIST X-rays
    assert input_size_for(10, 224) == 64
    assert input_size_for(150, 224) == 224  # Kather tiles: never above the model's default
    assert input_size_for(40, 224) % 32 == 0


def test_fit_input_size_reads_the_images(tmp_path):
    from PIL import Image

    uris = []
    for i in range(3):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / f"{i}.png")
        uris.append(str(tmp_path / f"{i}.png"))
    assert fit_input_size(BackboneConfig(), uris).input_size == 128
    assert fit_input_size(BackboneConfig(input_size=96), uris).input_size == 96


def test_weights_only_export_takes_the_configs_pooling(bundled, tmp_path):
    out = export_backbone(bundled.model, "efficientnet_lite0", str(tmp_path / "byol"))
    loaded = load_backbone(BackboneConfig(weights=out))
    assert loaded.spec.pooling == "multiscale" and loaded.spec.dim == 1752
    avg = load_backbone(BackboneConfig(weights=out, pooling="avg", tta="none"))
    assert avg.spec.dim == 1280


def test_bundled_refuses_other_architectures():
    with pytest.raises(WeightsMismatch, match="resnet18"):
        load_backbone(BackboneConfig(name="resnet18"))


def test_map_by_position_checks_every_shape():
    source = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert list(map_by_position(source, {"x": torch.ones(2, 3), "y": torch.ones(4)}, "t")) == [
        "x",
        "y",
    ]
    with pytest.raises(WeightsMismatch, match=r"tensor 1 b has shape \(4,\).*expects \(5,\)"):
        map_by_position(source, {"x": torch.ones(2, 3), "y": torch.ones(5)}, "t")
    with pytest.raises(WeightsMismatch, match="2 tensors in the weights, 1 in the model"):
        map_by_position(source, {"x": torch.ones(2, 3)}, "t")


def test_checkpoint_shape_mismatch_raises(tmp_path):
    import timm
    from safetensors.torch import save_file

    wrong = timm.create_model("resnet10t", num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in wrong.items()}, tmp_path / "w.safetensors")
    with pytest.raises(WeightsMismatch, match="do not fit"):
        load_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "w.safetensors")))


def test_random_weights_are_seeded():
    a = load_backbone(BackboneConfig(name="resnet10t", weights="random"), seed=1).spec
    b = load_backbone(BackboneConfig(name="resnet10t", weights="random"), seed=1).spec
    c = load_backbone(BackboneConfig(name="resnet10t", weights="random"), seed=2).spec
    assert a.backbone_id == b.backbone_id != c.backbone_id


def test_export_load_roundtrip_same_id_and_outputs(bundled, tmp_path):
    out = export_backbone(bundled.model, bundled.spec, str(tmp_path / "export"), {"source": "t"})
    loaded = load_backbone(BackboneConfig(weights=out))
    assert loaded.spec.backbone_id == bundled.spec.backbone_id
    assert loaded.spec.input_size == bundled.spec.input_size
    assert loaded.spec.weights == out and Path(out).is_absolute()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    np.testing.assert_allclose(
        embed_images(loaded, images), embed_images(bundled, images), atol=1e-6
    )
    import json

    meta = json.loads((tmp_path / "export" / "backbone.json").read_text())
    assert meta["source"] == "t" and meta["name"] == "efficientnet_lite0"


def test_pth_checkpoint_with_prefixes_loads(tmp_path):
    import timm

    model = timm.create_model("resnet10t", num_classes=0)
    state = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "c.pth")
    loaded = load_backbone(BackboneConfig(name="resnet10t", weights=str(tmp_path / "c.pth")))
    assert loaded.spec.weights_sha256 == state_dict_sha256(model.state_dict())


def test_export_preprocessing_travels(tmp_path, monkeypatch):
    bb = load_backbone(BackboneConfig(name="resnet10t", weights="random", input_size=64))
    export_backbone(bb.model, bb.spec, str(tmp_path / "e"))
    monkeypatch.chdir(tmp_path)
    again = load_backbone(BackboneConfig(name="resnet10t", weights="e"))
    assert again.spec.input_size == 64 and again.spec.backbone_id == bb.spec.backbone_id
    assert again.spec.weights == str(tmp_path / "e")  # resolved: valid from any cwd


def test_export_of_other_name_refused(tmp_path):
    bb = load_backbone(BackboneConfig(name="resnet10t", weights="random"))
    out = export_backbone(bb.model, "resnet10t", str(tmp_path / "e"))
    with pytest.raises(WeightsMismatch, match="resnet10t"):
        load_backbone(BackboneConfig(name="resnet18", weights=out))


def test_unknown_weights_and_model_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="backbone.weights"):
        load_backbone(BackboneConfig(name="resnet10t", weights="nonsense"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backbone(BackboneConfig(name="resnet10t", weights=str(tmp_path / "no.pth")))
    with pytest.raises(ValueError, match="unknown timm model"):
        load_backbone(BackboneConfig(name="no_such_net", weights="random"))


def test_preprocess_grayscale_is_replicated():
    gray = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    x = preprocess_image(gray, tiny_spec())
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    expected = (torch.from_numpy(gray).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x[0], expected)


def test_preprocess_16bit_uses_full_range():
    wide = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    x = preprocess_image(wide, tiny_spec())
    pixels = x[0] * 0.25 + 0.5
    assert float(pixels.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(pixels.max()) == pytest.approx(1.0, abs=1e-6)  # not the truncated high byte


def test_preprocess_rgba_composited_and_resized():
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> white background
    x = preprocess_image(rgba, tiny_spec(16))
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x * 0.25 + 0.5, torch.ones(3, 16, 16))


def test_embed_images_normalised_and_batched(bundled):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (33, 40, 3), dtype=np.uint8) for _ in range(5)]
    out = embed_images(bundled, images, batch_size=2)
    assert out.shape == (5, bundled.spec.dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embed_images(bundled, images[:1]), out[:1], atol=1e-5)
    assert embed_images(bundled, []).shape == (0, bundled.spec.dim)
