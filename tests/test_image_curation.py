"""Curation pieces without Ray: perceptual hashes, near-duplicate search, subject filter, manifest rows; and the
image-format helpers they share with generation."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFilter

from shared.config import validate_config
from shared.configs.curate_images import CurateImagesConfig
from shared.diffusion.curation import encode_batch, scan_batch, select, subject_matcher
from shared.diffusion.phash import hamming, near_duplicates, phash
from shared.diffusion.realsets import read_real_table
from shared.errors import ConfigError, DataError
from shared.imageset import check_image_table, decode_image, degenerate_reason, finish_image, to_gray
from tests.image_fixtures import png_bytes


def faces(n: int, size: int = 96) -> list[np.ndarray]:
    table = read_real_table("lfw-faces", limit=n)
    return [np.asarray(Image.fromarray(decode_image(b)).resize((size, size), Image.Resampling.BICUBIC))
            for b in table.column("image").to_pylist()]


def jpeg_round_trip(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return decode_image(buffer.getvalue())


def test_phash_is_stable_under_mild_edits_and_separates_faces():
    people = faces(12)
    hashes = [phash(p) for p in people]
    for p, h in zip(people[:4], hashes[:4]):
        edited = [jpeg_round_trip(p, 60), np.clip(p.astype(int) + 8, 0, 255).astype(np.uint8),
                  np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(1))),
                  np.asarray(Image.fromarray(p).resize((64, 64)))]
        assert max(hamming(h, phash(e)) for e in edited) <= 6
    different = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(different) > 6
    assert 20 < np.median(different) < 44


@pytest.mark.parametrize("distance", [0, 3, 8])
def test_near_duplicates_agree_with_all_pairs(distance):
    rng = random.Random(distance)
    hashes = []
    for _ in range(150):
        if hashes and rng.random() < 0.4:  # a perturbed copy of an earlier hash
            h = rng.choice(hashes)
            for bit in rng.sample(range(64), rng.randint(0, 10)):
                h ^= 1 << bit
        else:
            h = rng.getrandbits(64)
        hashes.append(h)
    twins = near_duplicates(hashes, distance)
    kept: list[int] = []
    for i, h in enumerate(hashes):  # brute force: greedy over all pairs, first kept item wins
        close = [j for j in kept if hamming(h, hashes[j]) <= distance]
        assert twins[i] == (min(close) if close else None)
        if not close:
            kept.append(i)
    assert any(t is not None for t in twins)
    assert any(t is None for t in twins)


def test_subject_filter():
    cfg = validate_config(CurateImagesConfig, {"manifest": "m.jsonl", "subject": {
        "keywords": ["face", "portrait"], "regex": r"\bhead ?shot", "exclude": ["cartoon"]}}, "test")
    matches = subject_matcher(cfg.subject)
    assert matches("A Portrait of a man")
    assert matches("two faces")
    assert matches("a HEADSHOT, studio")
    assert not matches("surface of the moon")
    assert not matches("cartoon portrait")
    assert not matches("a red car")
    everything = subject_matcher(validate_config(CurateImagesConfig, {"manifest": "m"}, "t").subject)
    assert everything("anything at all")


def test_subject_classifier_trained_on_example_prompts():
    from shared.diffusion.curation import NaiveBayesPrompts

    positive = ["a close-up photo of a smiling woman", "portrait of an old man with a beard",
                "a young boy looking at the camera, studio light", "headshot of a businesswoman"]
    negative = ["a landscape with mountains at dusk", "a red sports car on a city street",
                "a bowl of fruit on a wooden table", "an oil painting of a stormy sea", "a castle on a hill"]
    model = NaiveBayesPrompts(positive, negative)
    assert model.probability("a photo of a smiling old woman") > 0.9
    assert model.probability("mountains and a lake at dusk, oil painting") < 0.1
    cfg = validate_config(CurateImagesConfig, {"manifest": "m", "subject": {
        "classifier": {"positive": positive, "negative": negative}, "exclude": ["painting"]}}, "t")
    matches = subject_matcher(cfg.subject)
    assert matches("a smiling man, close-up photo")
    assert not matches("a car on a street")
    assert not matches("an oil painting of a smiling woman")  # excluded word wins
    with pytest.raises(ConfigError, match="subject.classifier.negative"):
        validate_config(CurateImagesConfig, {"manifest": "m", "subject": {"classifier": {"positive": ["a"]}}}, "t")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"columns": {"image": "img", "path": "file"}}, "set columns.image or columns.path, not both"),
        ({"columns": {"id": None}}, "columns.id is needed unless columns.path is set"),
        ({"subject": {"regex": "(unclosed"}}, "does not compile"),
        ({"min_side": 100, "max_side": 50}, "max_side 50 is below min_side 100"),
        ({"subject": {"keywords": ["face", " "]}}, "must not be empty"),
    ],
)
def test_curate_config_errors(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_config(CurateImagesConfig, {"manifest": "m.parquet", **data}, "test")


def test_scan_select_encode_on_inline_bytes():
    people = faces(3)
    manifest = pa.table({
        "id": ["x1", "x2", "x3", "x4", "x5"],
        "prompt": ["portrait of a man", "portrait, again", "a face", None, "portrait"],
        "image": [png_bytes(people[0]), png_bytes(jpeg_round_trip(people[0], 80)), png_bytes(people[1]),
                  png_bytes(people[2]), png_bytes(np.zeros((30, 200, 3), np.uint8))],
        "seed": ["12", "13", "oops", "1", "2"],
    })
    cfg = validate_config(CurateImagesConfig, {
        "manifest": "m.parquet", "columns": {"seed": "seed"}, "subject": {"keywords": ["portrait", "face"]},
        "min_side": 20, "max_aspect": 2.0, "output": {"size": 24}}, "test")
    scan = scan_batch(manifest, cfg, None)
    assert scan.column("status").to_pylist() == ["ok", "ok", "ok", "no_prompt", "bad_aspect"]
    keep, drops = select(scan, cfg.dedup_distance)
    assert keep == {"collected-x1", "collected-x3"}
    assert {d["id"]: d["reason"] for d in drops} == {"collected-x2": "near_duplicate", "collected-x4": "no_prompt",
                                                      "collected-x5": "bad_aspect"}
    with pytest.raises(DataError, match="column 'seed' has 'oops', not a number"):
        encode_batch(manifest, cfg, keep, None)
    table = encode_batch(manifest.slice(0, 2), cfg, keep, None)
    check_image_table(table, "curated")
    assert table.column("id").to_pylist() == ["collected-x1"]
    assert table.column("seed").to_pylist() == [12]
    with pytest.raises(DataError, match="id 'collected-x1' appears 2 times"):
        select(pa.concat_tables([scan, scan.slice(0, 1)]), 6)
    with pytest.raises(DataError, match="no 'caption' column"):
        scan_batch(manifest, cfg.model_copy(update={"columns": cfg.columns.model_copy(update={"prompt": "caption"})}),
                   None)


def test_image_helpers():
    gray = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=-1)
    assert (to_gray(gray) == gray).all()  # gray images map to themselves exactly
    assert finish_image(gray.astype(np.float32) / 255.0, 8).tolist() == gray.tolist()
    assert degenerate_reason(np.full((4, 4, 3), np.nan, np.float32)) == "nan"
    assert degenerate_reason(np.zeros((4, 4, 3), np.float32)) == "blank"
    assert degenerate_reason(np.full((4, 4, 3), 200, np.uint8)) == "blank"
    assert degenerate_reason(np.random.default_rng(0).random((4, 4, 3))) is None
    with pytest.raises(DataError, match="no 'label' column"):
        check_image_table(pa.table({"id": ["a"]}).append_column("image", pa.array([b""])).append_column(
            "encoding", pa.array(["png"])), "mine")
