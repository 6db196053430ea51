"""Detector building blocks without Ray: the mixture plan (splits, indices, bad input), decoding, augmentations,
backbones, detector save/load and checkpoint fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from shared.checkpoint import load_training_state, save_training_state
from shared.config import validate_config
from shared.configs.standin_faces import StandinFacesConfig
from shared.configs.train_detector import BackboneConfig, DetectorConfig, SourceConfig, SplitConfig
from shared.data import write_parquet
from shared.detection.augment import augment_batch, perturb_batch, to_tensor
from shared.detection.backbones import (
    DetectorSpec,
    build_detector,
    fake_probability,
    load_detector,
    make_spec,
    save_detector,
)
from shared.detection.mixture import assign_split, decode_batch, plan_mixture, read_metadata
from shared.detection.standin import standin_table
from shared.errors import ConfigError, DataError, ModelError
from shared.imageset import IMAGE_SCHEMA, decode_image, encode_image
from shared.storage import Storage

SMALL = StandinFacesConfig(size=16, reals=30, fakes_per_generator=12, generators=["pca", "blur", "morph"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A stand-in dataset (lfw_subset reals + degraded-face fakes) as two Parquet shards."""
    root = tmp_path_factory.mktemp("faces")
    table = standin_table(SMALL)
    store = Storage(str(root))
    write_parquet(table.slice(0, 40), store, "part-0.parquet")
    write_parquet(table.slice(40), store, "part-1.parquet")
    return str(root)


def test_standin_rows_follow_the_image_schema(dataset):
    meta = read_metadata(dataset)
    assert meta.num_rows == 30 + 3 * 12
    sources = meta.column("source").to_pylist()
    assert sources.count("lfw") == 30
    assert sources.count("standin-morph") == 12
    table = standin_table(SMALL)
    assert table.schema.equals(IMAGE_SCHEMA)
    first_fake = table.filter(pa.compute.equal(table.column("source"), "standin-blur")).to_pylist()[0]
    assert first_fake["mode"] == "img2img"
    assert first_fake["source_image_id"].startswith("lfw-")
    assert decode_image(first_fake["image"]).shape == (16, 16, 3)


def test_split_is_stable_seeded_and_keeps_img2img_fakes_with_their_real(dataset):
    keys = [f"k{i}" for i in range(2000)]
    a = assign_split(keys, 0, 0.2, 0.1)
    assert (a == assign_split(list(reversed(keys)), 0, 0.2, 0.1)[::-1]).all()  # order-free
    assert abs((a == "val").mean() - 0.2) < 0.03
    assert abs((a == "test").mean() - 0.1) < 0.03
    assert (a != assign_split(keys, 1, 0.2, 0.1)).any()
    plan = plan_mixture([SourceConfig(name="d", uri=dataset)], SplitConfig(val_fraction=0.3, test_fraction=0.3),
                        keep_splits=("train", "val", "test"), require_both_classes=())
    rows = {r["id"]: r for r in plan.rows.to_pylist()}
    table = standin_table(SMALL).to_pylist()
    for r in table:
        if r["source_image_id"]:
            assert rows[r["id"]]["split"] == rows[r["source_image_id"]]["split"]


def test_plan_indexes_rows_stably_with_groups(dataset):
    sources = [SourceConfig(name="reals", uri=dataset, labels=["real"]),
               SourceConfig(name="fakes", uri=dataset, labels=["fake"], exclude=["standin-morph"])]
    plan = plan_mixture(sources, SplitConfig())
    again = plan_mixture(sources, SplitConfig())
    assert plan.fingerprint == again.fingerprint
    assert plan.rows.equals(again.rows)
    assert plan.column("index").tolist() == list(range(plan.num_samples))
    assert set(plan.column("split")) == {"train", "val"}
    assert plan.group_names == ["lfw/real", "standin-blur/fake", "standin-pca/fake"]
    assert "standin-morph" not in set(plan.column("source"))
    groups = dict(zip(plan.column("source"), plan.column("group")))
    assert plan.group_names[groups["standin-pca"]] == "standin-pca/fake"
    other = plan_mixture(sources, SplitConfig(seed=1))
    assert other.fingerprint != plan.fingerprint  # another split is another mixture


def test_bad_mixtures_are_clear_errors(dataset, tmp_path):
    with pytest.raises(DataError, match="the train split has only fake images .* add a source with real images"):
        plan_mixture([SourceConfig(name="gan-only", uri=dataset, labels=["fake"])], SplitConfig())
    with pytest.raises(DataError, match="no 'standin-gan' in its 'source' column \\(it has: lfw, standin-blur"):
        plan_mixture([SourceConfig(name="d", uri=dataset, include=["standin-gan"])], SplitConfig())
    # mismatched image sizes: the same faces at 24 px beside the 16 px ones
    other = standin_table(StandinFacesConfig(size=24, reals=4, fakes_per_generator=4, generators=["pca"]))
    other = other.set_column(0, "id", pa.array([f"b-{i}" for i in other.column("id").to_pylist()]))
    write_parquet(other, Storage(str(tmp_path)), "big", "part-0.parquet")
    with pytest.raises(DataError, match="mismatched image sizes \\(16x16: .*lfw \\(\\d+\\).*; 24x24: .*\\)"):
        plan_mixture([SourceConfig(name="a", uri=dataset), SourceConfig(name="b", uri=str(tmp_path / "big"))],
                     SplitConfig())
    write_parquet(pa.table({"id": ["x"], "image": [b"x"]}), Storage(str(tmp_path)), "nolabels", "p.parquet")
    with pytest.raises(DataError, match="no 'label' column"):
        read_metadata(str(tmp_path / "nolabels"))
    with pytest.raises(ConfigError, match="cfg.yaml: .*'standin-pca' is both included and excluded"):
        validate_config(DetectorConfig, {"sources": [{"name": "d", "uri": "x", "include": ["standin-pca"],
                                                      "exclude": ["standin-pca"]}]}, "cfg.yaml")


def test_decode_batch_reports_bad_rows_and_never_substitutes():
    good = encode_image(np.full((8, 8, 3), 200, np.uint8))
    other_size = encode_image(np.zeros((6, 8, 3), np.uint8))
    images, ok, reasons = decode_batch([good, b"\x89PNG broken", None, other_size], ["a", "b", "c", "d"], 8, 8, "t")
    assert ok.tolist() == [True, False, False, False]
    assert reasons[0] is None
    assert "cannot decode" in reasons[1]
    assert reasons[2] == "no image bytes"
    assert reasons[3] == "decoded size 6x8 differs from 8x8"
    assert images[0].min() == 200
    assert images[1:].max() == 0


def test_augmentations_shapes_determinism_and_perturbations():
    from shared.configs.train_detector import AugmentConfig

    rng_images = np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    settings = AugmentConfig(hflip=0.5, crop_scale_min=0.5, blur_prob=0.5, jpeg_prob=0.5)
    a = augment_batch(rng_images, 16, settings, np.random.default_rng(7))
    b = augment_batch(rng_images, 16, settings, np.random.default_rng(7))
    c = augment_batch(rng_images, 16, settings, np.random.default_rng(8))
    assert a.shape == (4, 16, 16, 3)
    assert a.dtype == np.uint8
    assert (a == b).all()
    assert (a != c).any()
    flat = np.tile(np.arange(20, dtype=np.uint8)[None, :, None, None] * 10, (1, 1, 20, 3)).transpose(0, 2, 1, 3)
    off = AugmentConfig(hflip=0.0, crop_scale_min=1.0, blur_prob=0.0, jpeg_prob=0.0)
    assert (augment_batch(flat, 20, off, np.random.default_rng(0)) == flat).all()  # all off: identity
    assert np.abs(perturb_batch(rng_images, "blur", 2.0).astype(int) - rng_images).mean() > 10
    assert (perturb_batch(rng_images, "clean", 0) == rng_images).all()
    x = to_tensor(a, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (4, 3, 16, 16)
    assert -1.0 <= x.min()
    assert x.max() <= 1.0


@pytest.mark.parametrize(
    ("kind", "config"),
    [("small-cnn", {}), ("small-cnn", {"norm": "group"}), ("resnet", {}), ("convnext", {}),
     ("vit", {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}),
     ("clip-probe", {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
                     "projection_dim": 8})],
)
def test_backbones_build_score_and_round_trip(kind, config, tmp_path):
    fields = config if kind == "small-cnn" else {"config": config}
    if kind == "clip-probe":  # a probe needs pretrained weights: a tiny saved tower stands in for CLIP's
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=16, patch_size=4, **config)).save_pretrained(
            tmp_path / "clip")
        fields = {"reference": str(tmp_path / "clip")}
    spec = make_spec(BackboneConfig(kind=kind, width=4, **fields), 16)
    torch.manual_seed(0)
    model = build_detector(spec).eval()
    x = torch.randn(3, 3, 16, 16)
    p = fake_probability(model, x)
    assert p.shape == (3,)
    assert ((0 <= p) & (p <= 1)).all()
    if kind == "clip-probe":  # the CLIP tower is frozen, only the probe trains
        trainable = {n for n, q in model.named_parameters() if q.requires_grad}
        assert trainable == {"head.1.weight", "head.1.bias"}
        model.train()
        assert not model.tower.training
    save_detector(model, spec, Storage(str(tmp_path)), "det")
    loaded, loaded_spec = load_detector(str(tmp_path / "det"))
    assert json.loads(json.dumps(loaded_spec.to_json())) == json.loads(json.dumps(spec.to_json()))
    assert (loaded_spec.kind, loaded_spec.mean, loaded_spec.training) == (kind, spec.mean, None)
    torch.testing.assert_close(fake_probability(loaded, x), p)


def test_pretrained_reference_is_loaded_and_a_bad_one_is_a_clear_error(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              layer_type="basic", num_labels=5)).save_pretrained(tmp_path / "r")
    spec = make_spec(BackboneConfig(kind="resnet", reference=str(tmp_path / "r")), 16)
    assert spec.hf_config is not None
    assert len(spec.hf_config["id2label"]) == 2
    assert spec.hf_config["hidden_sizes"] == [8, 16]
    net = build_detector(spec, pretrained=True)
    source = ResNetForImageClassification.from_pretrained(tmp_path / "r")
    torch.testing.assert_close(net.net.resnet.embedder.embedder.convolution.weight,
                               source.resnet.embedder.embedder.convolution.weight)  # weights came from the reference
    with pytest.raises(ModelError, match="no config.json there"):
        make_spec(BackboneConfig(kind="resnet", reference=str(tmp_path)), 16)
    with pytest.raises(ModelError, match="no detector.json there"):
        load_detector(str(tmp_path))


def test_checkpoint_of_a_different_config_is_refused(tmp_path):
    a = DetectorConfig(sources=[{"name": "d", "uri": "x"}])
    b = DetectorConfig(sources=[{"name": "d", "uri": "x"}], lr=0.01, model={"width": 8})
    fingerprint = {"config": a.fingerprint(), "mixture": "abc"}
    save_training_state(tmp_path, {"epoch": 3, "model": {"w": torch.ones(2)}}, fingerprint)
    assert load_training_state(tmp_path, fingerprint, "ck")["epoch"] == 3
    with pytest.raises(ModelError, match="checkpoint ck was written by a different config \\(config.lr: 0.001 there, "
                                         "0.01 here; config.model.width: 32 there, 8 here\\)"):
        load_training_state(tmp_path, {"config": b.fingerprint(), "mixture": "abc"}, "ck")
    with pytest.raises(ModelError, match="mixture: \"abc\" there, \"other\" here"):
        load_training_state(tmp_path, {"config": a.fingerprint(), "mixture": "other"}, "ck")
    # epochs and workers may change between a checkpoint and its resume
    longer = DetectorConfig(sources=[{"name": "d", "uri": "x"}], epochs=50, runtime={"num_workers": 1})
    assert load_training_state(tmp_path, {"config": longer.fingerprint(), "mixture": "abc"}, "ck")["epoch"] == 3


class _Payload:
    """Any object other than tensors and plain values: unpickling it could run code."""


def test_a_checkpoint_holding_an_object_is_refused_not_unpickled(tmp_path):
    fingerprint = {"config": "abc"}
    save_training_state(tmp_path, {"step": 1, "extra": _Payload()}, fingerprint)
    with pytest.raises(ModelError, match="checkpoint ck: state.pt holds objects other than tensors"):
        load_training_state(tmp_path, fingerprint, "ck")
    save_training_state(tmp_path, {"step": 2, "optimizer": torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
                                   .state_dict(), "history": [{"loss": 0.5, "step": 2}]}, fingerprint)
    assert load_training_state(tmp_path, fingerprint, "ck")["history"] == [{"loss": 0.5, "step": 2}]


def test_a_detector_json_of_another_format_or_with_unknown_fields_is_refused():
    spec = make_spec(BackboneConfig(kind="small-cnn", width=4), 16).to_json()
    assert DetectorSpec.from_json(json.loads(json.dumps(spec)), "d").mean == spec["mean"]
    with pytest.raises(ModelError, match=r"detector d: unknown detector.json format 2"):
        DetectorSpec.from_json({**spec, "format": 2}, "d")
    with pytest.raises(ModelError, match=r"detector d: unknown detector.json field\(s\) colour"):
        DetectorSpec.from_json({**spec, "colour": "red"}, "d")
    with pytest.raises(ModelError, match=r"detector d: detector.json is incomplete"):
        DetectorSpec.from_json({k: v for k, v in spec.items() if k != "kind"}, "d")
    with pytest.raises(ModelError, match=r"detector d: detector.json is incomplete"):
        DetectorSpec.from_json({k: v for k, v in spec.items() if k != "mean"}, "d")
