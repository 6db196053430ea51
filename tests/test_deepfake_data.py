"""The embedded deepfake dataset without shortcuts: one fit for every source, the format guard, generator-training
reals kept in the train split with everything grouped with them, equal family budgets, near-duplicate pairs."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pyarrow as pa
import pytest
import yaml
from pydantic import ValidationError

from shared.config import validate_config
from shared.configs.generate import GenerateConfig, ImageFormat
from shared.configs.standin_faces import StandinFacesConfig
from shared.configs.subsets import IdSubset
from shared.configs.train_ddpm import TrainDdpmConfig
from shared.configs.train_detector import AugmentConfig, SourceConfig, SplitConfig
from shared.data import write_parquet
from shared.detection.mixture import assign_split, plan_mixture, read_metadata, split_groups, table_splits
from shared.detection.standin import partners, standin_table
from shared.diffusion.duplicates import near_duplicate_pairs, pair_counts, source_duplicates
from shared.diffusion.generate import encode_reals, source_requests
from shared.diffusion.phash import hamming
from shared.diffusion.realsets import read_real_table, training_subset
from shared.errors import DataError
from shared.imageset import IMAGE_SCHEMA, Encoding, decode_image, encode_image, fit_image, image_row, rows_to_table
from shared.storage import Storage

FACES = StandinFacesConfig(size=24, reals=100, fakes_per_generator=60, generators=["pca", "blur", "morph", "swap"])
SEEDS = range(5)


@pytest.fixture(scope="module")
def faces_dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("standin")
    write_parquet(standin_table(FACES), Storage(str(root)), "part-0.parquet")
    return str(root)


def test_one_fit_for_every_source():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (25, 25), dtype=np.uint8)
    cropped = fit_image(real, 24, "gray")
    assert cropped.fit == "crop"
    assert (cropped.native_height, cropped.native_width) == (25, 25)
    assert not cropped.resampled
    assert (cropped.pixels[..., 0] == real[0:24, 0:24]).all()  # a crop: every pixel kept as it was
    kept = fit_image(rng.random((24, 24)), 24, "gray")
    assert kept.fit == "none"
    gan = rng.random((64, 64, 3))
    down = fit_image(gan, 24, "gray")
    assert down.fit == "area"
    assert down.resampled
    assert down.pixels.shape == (24, 24, 3)
    assert (down.pixels[..., 0] == down.pixels[..., 2]).all()
    # luma first, then area averaging: the mean brightness survives the downsampling (to rounding)
    luma = fit_image(gan, 64, "gray").pixels[..., 0].astype(float)
    assert abs(down.pixels[..., 0].mean() - luma.mean()) < 1.0
    assert fit_image(rng.random((16, 16)), 24).fit == "bicubic"
    assert fit_image(rng.random((28, 28)), 24).fit == "area"  # 4 px over a 24 px side is beyond the crop margin


def test_rows_record_quality_family_parents_and_fit():
    fitted = fit_image(np.random.default_rng(1).random((64, 64, 3)), 24, "gray")
    png = image_row("g-1", fitted, encoding="png", quality=95, label=1, source="gan", mode="gan")
    jpeg = image_row("r-1", fitted, encoding="jpeg", quality=80, label=0, source="lfw", mode="real",
                     generator_training=True)
    table = rows_to_table([png, jpeg])
    assert table.schema.equals(IMAGE_SCHEMA)
    assert table.column("quality").to_pylist() == [None, 80]
    assert table.column("family").to_pylist() == ["gan", "real"]
    assert table.column("fit").to_pylist() == ["area", "area"]
    assert table.column("native_width").to_pylist() == [64, 64]
    assert table.column("generator_training").to_pylist() == [None, True]
    morph = image_row("m", fitted, encoding="png", quality=95, label=1, source="m", mode="img2img",
                      source_image_ids=["lfw-001", "lfw-002"])
    assert morph["source_image_id"] == "lfw-001"
    with pytest.raises(DataError, match="image x: generator_training is recorded for real images only"):
        image_row("x", fitted, encoding="png", quality=95, label=1, source="gan", mode="gan", generator_training=False)


def test_id_subsets_are_seeded_stateless_and_complementary():
    ids = [f"{i:03d}" for i in range(100)]
    low, high = IdSubset(stop=0.5, seed=1), IdSubset(start=0.5, seed=1)
    a, b = low.selects(ids), high.selects(ids)
    assert all(x != y for x, y in zip(a, b))  # disjoint halves covering every id
    assert a == low.selects(ids)
    assert a[::-1] == low.selects(ids[::-1])
    assert a != IdSubset(stop=0.5, seed=2).selects(ids)
    assert 30 < sum(IdSubset(stop=0.4).selects(ids)) < 55
    with pytest.raises(ValidationError, match="is empty: stop must be above start"):
        IdSubset(start=0.6, stop=0.5)


def test_standin_fakes_record_every_real_they_use_and_pairs_stay_small():
    table = standin_table(FACES).to_pylist()
    morphs = [r for r in table if r["source"] == "standin-morph"]
    assert all(len(r["source_image_ids"]) == 2 for r in morphs)
    assert all(r["source_image_ids"][0] == r["source_image_id"] for r in morphs)
    assert all(len(r["source_image_ids"]) == 1 for r in table if r["source"] == "standin-blur")
    assert all(r["source_image_ids"] is None for r in table if r["source"] == "standin-pca")
    reals = [r for r in table if r["label"] == 0]
    trained = {r["id"] for r in reals if r["generator_training"]}
    assert 0 < len(trained) < len(reals)
    assert all(r["generator_training"] is None for r in table if r["label"] == 1)
    strata = np.array([True] * 7 + [False] * 4)
    partner = partners(strata, 0)
    assert (strata[partner] == strata).all()  # pairs within the generator-training reals, and within the others
    assert sum(partner[partner[i]] == i for i in range(11)) >= 10  # pairs; the odd one out joins a pair
    assert all(partner[i] != i for i in range(11))
    keys, _, _ = split_groups(pa.Table.from_pylist(table, schema=IMAGE_SCHEMA))
    sizes = {k: 0 for k in keys}
    for k, r in zip(keys, table):
        sizes[k] += r["label"] == 0
    assert max(sizes.values()) <= 3  # morphs and swaps join two reals (three with an odd count), never chains


def test_generator_training_groups_stay_in_train_for_every_split_seed(faces_dataset):
    meta = read_metadata(faces_dataset)
    ids = meta.column("id").to_pylist()
    rows = {r["id"]: r for r in standin_table(FACES).to_pylist()}
    trained = {i for i, r in rows.items() if r["generator_training"]}
    in_test: set[str] = set()
    for seed in SEEDS:
        split = SplitConfig(seed=seed, val_fraction=0.15, test_fraction=0.2)
        plan = plan_mixture([SourceConfig(name="faces", uri=faces_dataset)], split,
                            keep_splits=("train", "val", "test"))
        got = dict(zip(plan.column("id"), plan.column("split")))
        assert got == dict(zip(ids, table_splits(meta, split)))  # the plan is the table's split
        for image_id, row in rows.items():
            for parent in row["source_image_ids"] or []:
                assert got[image_id] == got[parent], (seed, image_id, parent)  # fakes share their reals' split
        keys, pinned, with_reals = split_groups(meta)
        for image_id, key in zip(ids, keys):
            if key in pinned:
                assert got[image_id] == "train", (seed, image_id)
        assert not {i for i in trained if got[i] != "train"}
        test_reals = [i for i in ids if got[i] == "test" and rows[i]["label"] == 0]
        test_groups = {k for i, k in zip(ids, keys) if got[i] == "test" and k in with_reals}
        assert abs(len(test_groups) - 0.2 * len(with_reals)) <= 6  # a fraction of all groups with reals
        in_test |= set(test_reals)
    assert len(in_test) > 15  # different seeds draw different test faces


def test_too_few_free_reals_for_the_fractions_is_one_line_error(faces_dataset):
    with pytest.raises(DataError, match=r"^training mixture, source 'faces' \(.*\): val_fraction \+ test_fraction "
                                        r"= 0.8 of the \d+ groups with reals, but only \d+% of them trained no "
                                        r"generator; lower the fractions") as caught:
        plan_mixture([SourceConfig(name="faces", uri=faces_dataset)], SplitConfig(val_fraction=0.4,
                                                                                  test_fraction=0.4))
    assert "\n" not in str(caught.value)
    keys = [f"k{i}" for i in range(100)]
    free = assign_split(keys, 0, 0.2, 0.2, train_only=keys[:50])
    assert (free[:50] == "train").all()
    assert 25 <= ((free[50:] == "val") | (free[50:] == "test")).sum() <= 55  # 40 % of all 100, from the free 50


def _dataset(root, name: str, table: pa.Table) -> str:
    write_parquet(table, Storage(str(root)), name, "part-0.parquet")
    return str(root / name)


def test_format_guard_refuses_sources_encoded_unlike_the_reals(tmp_path):
    faces = read_real_table("lfw-faces", limit=12)
    reals = encode_reals(faces, "lfw", ImageFormat(size=24, color="gray")).table
    real_uri = _dataset(tmp_path, "reals", reals)

    def fakes(name: str, encoding: Encoding, quality: int, size: int = 24) -> str:
        rng = np.random.default_rng(3)
        rows = [image_row(f"{name}-{k}", fit_image(rng.random((24, 24)), size, "gray"), encoding=encoding,
                          quality=quality, label=1, source=name, mode="unconditional") for k in range(12)]
        return _dataset(tmp_path, name, rows_to_table(rows))

    split = SplitConfig(val_fraction=0.25, test_fraction=0.25)
    ok = plan_mixture([SourceConfig(name="r", uri=real_uri), SourceConfig(name="f", uri=fakes("same", "png", 50))],
                      split, keep_splits=("train", "val", "test"), require_both_classes=())
    assert ok.num_samples == 24
    with pytest.raises(DataError, match=r"source 'jpeg' is jpeg quality 90 but the reals \(lfw\) are png; a "
                                        "detector could learn the format"):
        plan_mixture([SourceConfig(name="r", uri=real_uri), SourceConfig(name="f", uri=fakes("jpeg", "jpeg", 90))],
                     split)
    jpeg_reals = _dataset(tmp_path, "jreals", encode_reals(faces, "lfw", ImageFormat(size=24, color="gray",
                                                                                        encoding="jpeg",
                                                                                        quality=95)).table)
    with pytest.raises(DataError, match=r"source 'q80' is jpeg quality 80 but the reals \(lfw\) are jpeg quality 95"):
        plan_mixture([SourceConfig(name="r", uri=jpeg_reals), SourceConfig(name="f", uri=fakes("q80", "jpeg", 80))],
                     split)
    with pytest.raises(DataError, match=r"mismatched image sizes \(24x24: lfw .*; 32x32: big"):
        plan_mixture([SourceConfig(name="r", uri=real_uri), SourceConfig(name="f", uri=fakes("big", "png", 95, 32))],
                     split)


def test_generate_pieces_record_training_reals_subsets_and_families():
    faces = read_real_table("lfw-faces", limit=20)
    subset = IdSubset(stop=0.4)
    reals = encode_reals(faces, "lfw", ImageFormat(size=24, color="gray"), subset).table
    assert reals.column("generator_training").to_pylist() == subset.selects(faces.column("id").to_pylist())
    assert set(reals.column("fit").to_pylist()) == {"crop"}
    assert set(reals.column("family").to_pylist()) == {"real"}
    cfg = validate_config(GenerateConfig, {"generators": [
        {"name": "a", "mode": "img2img", "model": "m", "sources": "lfw", "source_subset": {"stop": 0.5}},
        {"name": "b", "mode": "img2img", "model": "m", "sources": "lfw", "family": "ddpm",
         "source_subset": {"start": 0.5}},
        {"name": "g", "mode": "gan", "count": 3}]}, "test")
    a, b, gan = cfg.generators
    assert (a.family, b.family, gan.family) == ("img2img", "ddpm", "gan")
    made = [source_requests(spec, 0, "lfw", faces, None) for spec in (a, b)]
    parents = [set(r.column("source_image_id").to_pylist()) for r in made]
    assert not parents[0] & parents[1]
    assert parents[0] | parents[1] == {f"lfw-{i}" for i in faces.column("id").to_pylist()}


def test_deepfake_data_config_has_equal_family_budgets_and_one_training_subset():
    with open("ray_jobs/configs/deepfake-data.yaml") as f:
        stages = {s["name"]: s for s in yaml.safe_load(f)["stages"]}
    ddpm = validate_config(TrainDdpmConfig, stages["train-ddpm"]["config"], "deepfake-data.yaml")
    data = validate_config(GenerateConfig, stages["data"]["config"], "deepfake-data.yaml")
    assert ddpm.image_size == data.output.size == 24
    (lfw,) = data.reals
    assert lfw.generator_training == ddpm.training_reals
    ids = read_real_table("lfw-faces").column("id").to_pylist()
    budget: dict[str, int] = {}
    for spec in data.generators:
        n = sum(spec.source_subset.selects(ids)) if getattr(spec, "source_subset", None) else spec.count
        budget[spec.family] = budget.get(spec.family, 0) + n
    assert {k: v for k, v in budget.items() if k in ("ddpm", "gan")} == {"ddpm": 200, "gan": 200}
    assert len(set(budget.values())) == 1  # every family (the vae's too, when appended) has the same budget


def test_ddpm_trains_at_24_px_on_the_training_reals_only():
    import torch

    from shared.diffusion.ddpm import build_unet, training_images

    cfg = TrainDdpmConfig(widths=[32, 64, 64])
    ids = read_real_table("lfw-faces").column("id").to_pylist()
    table = training_subset(read_real_table("lfw-faces"), cfg.training_reals, "lfw-faces")
    assert table.column("id").to_pylist() == [i for i, s in zip(ids, cfg.training_reals.selects(ids)) if s]
    assert 30 < table.num_rows < 60
    images, color = training_images(table, cfg.image_size)
    assert tuple(images.shape[1:]) == (1, 24, 24)
    assert color == "gray"
    unet = build_unet(cfg, 1)
    with torch.no_grad():
        out = unet(images[:2], torch.tensor([10, 500])).sample
    assert out.shape == images[:2].shape
    with pytest.raises(DataError, match="real images lfw-faces: none of the 3 ids is in training_reals"):
        training_subset(read_real_table("lfw-faces", limit=3), IdSubset(start=0.999, seed=5), "lfw-faces")
    assert AugmentConfig().crop_scale_min == 1.0  # no resizing crops: test images are never resampled


def test_near_duplicate_pairs_are_exact_across_groups():
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(40)]
    hashes = base + [h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for h in base[:10]]
    groups = ["a"] * 40 + ["b"] * 5 + ["a"] * 5
    pairs = near_duplicate_pairs(hashes, groups, 4)
    brute = [(i, j, hamming(hashes[i], hashes[j])) for i, j in itertools.combinations(range(len(hashes)), 2)
             if groups[i] != groups[j] and hamming(hashes[i], hashes[j]) <= 4]
    assert pairs == brute
    assert len(pairs) >= 5  # the five flipped copies in group b
    assert pair_counts(pairs, groups) == {"a|b": len(pairs)}
    faces = read_real_table("lfw-faces", limit=4)
    images = [encode_image(fit_image(decode_image(b), 24).pixels) for b in faces.column("image").to_pylist()]
    report = source_duplicates(["r0", "r1", "r2", "r3", "copy"], ["lfw"] * 4 + ["fake"], images + images[:1])
    assert report["pairs"] >= 1
    assert report["examples"][0] == {"a": "r0", "b": "copy", "distance": 0}
