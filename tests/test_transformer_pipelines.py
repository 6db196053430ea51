"""Transformer-denoised diffusers pipelines (a tiny random SD3), the safety-checker switch, and the per-image
generation metadata (negative prompt, dtype, library versions, native size), without Ray."""

from __future__ import annotations

import json
from importlib.metadata import version

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.config import validate_config
from shared.configs.generate import GenerateConfig
from shared.diffusion.generate import GeneratorStage, count_requests, encode_reals, generator_seed, source_requests
from shared.diffusion.realsets import read_real_table
from shared.errors import ConfigError, ModelError
from shared.imageset import IMAGE_SCHEMA, check_image_table, decode_image
from tests.image_fixtures import tiny_ddpm_dir, tiny_sd_dir  # noqa: F401

SIZE = 32
NEW_COLUMNS = ("negative_prompt", "dtype", "library_versions")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> str:
    from shared.diffusion.tiny import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_pixart_dir(tmp_path_factory) -> str:
    from shared.diffusion.tiny import tiny_pixart_sigma_pipeline

    path = tmp_path_factory.mktemp("tiny-pixart")
    tiny_pixart_sigma_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def checked_sd_dir(tmp_path_factory) -> str:
    """The tiny Stable Diffusion saved with a (tiny, random) safety checker that flags nothing."""
    from diffusers import StableDiffusionPipeline

    from shared.diffusion.tiny import tiny_safety_checker, tiny_sd_pipeline

    checker, extractor = tiny_safety_checker()
    pipe = StableDiffusionPipeline(**{**tiny_sd_pipeline().components, "safety_checker": checker,
                                      "feature_extractor": extractor}, requires_safety_checker=True)
    path = tmp_path_factory.mktemp("tiny-sd-checked")
    pipe.save_pretrained(path)
    return str(path)


def stage_for(generator: dict, n: int = 2, **extra) -> tuple[GeneratorStage, pa.Table]:
    cfg = validate_config(GenerateConfig, {"reals": [{"name": "lfw", "uri": "lfw-faces", "limit": 4}],
                                           "output": {"size": SIZE}, "generators": [generator],
                                           "prompts": {"inline": ["a smiling old man", "a woman in a park"]},
                                           **extra}, "test")
    spec = cfg.generators[0]
    base = generator_seed(spec, cfg.seed)
    prompts = cfg.prompts.inline if cfg.prompts else None
    if spec.mode == "img2img":
        requests = source_requests(spec, base, "lfw", read_real_table("lfw-faces", limit=n), prompts)
    else:
        requests = count_requests(spec, base, prompts, np.arange(n))
    stage = GeneratorStage(spec, cfg.output)
    stage.setup()
    return stage, requests


# ---------------------------------------------------------------------------------------------------------------------
# A transformer denoiser (SD3): text2img and img2img through the generate job's stage


def test_sd3_text2img_at_a_requested_resolution_with_its_metadata(tiny_sd3_dir):
    from shared.diffusion.pipelines import TextDiffusion, denoiser

    stage, requests = stage_for({"name": "sd3", "mode": "text2img", "model": tiny_sd3_dir, "count": 3, "steps": 3,
                                 "guidance": 4.0, "resolution": 24, "negative_prompt": "blurry, low quality"},
                                n=3)
    assert isinstance(stage.model, TextDiffusion)
    assert type(denoiser(stage.model.pipe)).__name__ == "SD3Transformer2DModel"
    assert getattr(stage.model.pipe, "unet", None) is None  # the path that used to crash on pipe.unet
    result = stage(requests)
    assert not result.drops
    table = result.table
    assert table.schema == IMAGE_SCHEMA
    check_image_table(table, "sd3")
    rows = table.to_pylist()
    assert len(rows) == 3
    for row in rows:
        assert (row["native_width"], row["native_height"]) == (24, 24)  # generated at the requested resolution
        assert (row["width"], row["height"]) == (SIZE, SIZE)  # then fitted to output.size
        pixels = decode_image(row["image"])
        assert pixels.shape == (SIZE, SIZE, 3)
        assert pixels.std() > 5  # not a constant (blacked-out or collapsed) image
        assert row["mode"] == "text2img"
        assert row["guidance"] == 4.0
        assert row["negative_prompt"] == "blurry, low quality"
        assert row["dtype"] == "float32"
        assert json.loads(row["library_versions"]) == {name: version(name)
                                                       for name in ("diffusers", "torch", "transformers")}
        assert row["scheduler"] == "FlowMatchEulerDiscreteScheduler"  # no short name: its class name
    assert [r["prompt"] for r in rows] == ["a smiling old man", "a woman in a park", "a smiling old man"]
    assert len({r["content_hash"] for r in rows}) == 3


def test_sd3_native_resolution_is_the_transformer_sample_size_times_the_vae_scale(tiny_sd3_dir, tiny_sd_dir):
    from shared.diffusion.pipelines import load_pipeline, native_resolution

    sd3 = load_pipeline(tiny_sd3_dir)
    assert sd3.transformer.config.sample_size * sd3.vae_scale_factor == 16 * 2
    assert native_resolution(sd3) == 32
    assert native_resolution(load_pipeline(tiny_sd_dir)) == 16 * 2  # a UNet one: unet.config.sample_size x 2
    stage, requests = stage_for({"name": "sd3", "mode": "text2img", "model": tiny_sd3_dir, "count": 2, "steps": 2})
    assert stage.generation_size == 32
    rows = stage(requests).table.to_pylist()
    assert [(r["native_width"], r["native_height"], r["fit"]) for r in rows] == [(32, 32, "none")] * 2
    assert rows[0]["negative_prompt"] is None


def test_sd3_is_batch_invariant(tiny_sd3_dir):
    stage, requests = stage_for({"name": "sd3", "mode": "text2img", "model": tiny_sd3_dir, "count": 2, "steps": 2,
                                 "batch_size": 2})
    batched = stage(requests).table.column("image").to_pylist()
    alone = [stage(requests.slice(i, 1)).table.column("image")[0].as_py() for i in range(2)]
    assert batched == alone


def test_sd3_img2img_starts_from_the_real_images(tiny_sd3_dir):
    stage, requests = stage_for({"name": "sd3-i2i", "mode": "img2img", "model": tiny_sd3_dir, "sources": "lfw",
                                 "strength": 0.6, "steps": 5})
    assert type(stage.model.pipe).__name__ == "StableDiffusion3Img2ImgPipeline"
    rows = stage(requests).table.to_pylist()
    assert [r["source_image_id"] for r in rows] == ["lfw-000", "lfw-001"]
    assert all(r["mode"] == "img2img" and r["prompt"] and r["dtype"] == "float32" for r in rows)
    assert all(decode_image(r["image"]).std() > 5 for r in rows)


def test_pixart_sigma_generates_at_the_asked_size_without_a_negative_prompt(tiny_pixart_dir):
    stage, requests = stage_for({"name": "pixart", "mode": "text2img", "model": tiny_pixart_dir, "count": 2,
                                 "steps": 3, "guidance": 4.5, "resolution": 24})
    assert type(stage.model.pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert stage.model.bins_resolution  # would snap 24 to a trained bin (and fail: a tiny model has none)
    rows = stage(requests).table.to_pylist()
    assert [(r["native_width"], r["native_height"]) for r in rows] == [(24, 24)] * 2
    assert all(decode_image(r["image"]).std() > 5 and r["negative_prompt"] is None for r in rows)
    with pytest.raises(ModelError, match="PixArtSigmaPipeline: has no image-to-image variant"):
        stage_for({"name": "pixart", "mode": "img2img", "model": tiny_pixart_dir, "sources": "lfw"})


def test_a_noise_prediction_sampler_on_a_flow_matching_pipeline_is_refused(tiny_sd3_dir):
    with pytest.raises(ConfigError, match=r"scheduler 'ddim': not compatible with StableDiffusion3Pipeline's "
                                          r"FlowMatchEulerDiscreteScheduler \(use: default\)"):
        stage_for({"name": "sd3", "mode": "text2img", "model": tiny_sd3_dir, "count": 1, "scheduler": "ddim"})


# ---------------------------------------------------------------------------------------------------------------------
# The safety checker is a switch


def test_safety_checker_off_loads_the_pipeline_without_it(checked_sd_dir):
    stage, requests = stage_for({"name": "sd", "mode": "text2img", "model": checked_sd_dir, "count": 2, "steps": 2})
    assert stage.model.pipe.safety_checker is None
    assert not stage.model.checks_safety
    assert stage(requests).table.num_rows == 2


def test_safety_checker_on_drops_flagged_images_as_nsfw(checked_sd_dir):
    import torch

    spec = {"name": "sd", "mode": "text2img", "model": checked_sd_dir, "count": 2, "steps": 2,
            "safety_checker": True}
    stage, requests = stage_for(spec)
    checker = stage.model.pipe.safety_checker
    assert stage.model.checks_safety
    assert type(checker).__name__ == "StableDiffusionSafetyChecker"
    kept = stage(requests)  # its thresholds are out of reach: it runs and flags nothing
    assert kept.table.num_rows == 2
    assert not kept.drops
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # every cosine similarity now exceeds a threshold
    flagged = stage(requests)
    assert flagged.table.num_rows == 0
    assert [(d["id"], d["reason"]) for d in flagged.drops] == [(f"sd-{i:07d}", "nsfw") for i in range(2)]


@pytest.mark.parametrize("fixture", ["tiny_sd_dir", "tiny_sd3_dir", "tiny_ddpm_dir"])
def test_safety_checker_on_a_pipeline_without_one_is_a_one_line_error(fixture, request):
    model = request.getfixturevalue(fixture)
    mode = {"mode": "unconditional", "count": 1} if fixture == "tiny_ddpm_dir" else {"mode": "text2img", "count": 1}
    with pytest.raises(ModelError) as info:
        stage_for({"name": "g", "model": model, "safety_checker": True, **mode})
    text = str(info.value)
    assert f"pipeline {model!r}: safety_checker is on but this " in text, text
    assert text.endswith("has no safety checker; set safety_checker: false"), text
    assert "\n" not in text


# ---------------------------------------------------------------------------------------------------------------------
# Metadata of the other kinds, and datasets written before these columns


def test_gan_and_real_rows_fill_or_null_the_new_columns():
    stage, requests = stage_for({"name": "gan", "mode": "gan", "count": 2})
    gan = stage(requests).table.to_pylist()
    assert all(r["dtype"] == "float32" and r["negative_prompt"] is None for r in gan)
    assert json.loads(gan[0]["library_versions"]) == {"torch": version("torch")}
    real = encode_reals(read_real_table("lfw-faces", limit=2), "lfw", stage.output).table
    check_image_table(real, "reals")
    assert all(real.column(c).null_count == real.num_rows for c in NEW_COLUMNS)
    assert real.column("native_width").to_pylist() == [25, 25]  # lfw's own size


def test_a_dataset_written_before_the_new_columns_still_reads(tmp_path):
    from shared.detection.mixture import read_metadata
    from shared.diffusion.report import read_written
    from shared.storage import Storage

    stage, requests = stage_for({"name": "gan", "mode": "gan", "count": 2})
    table = stage(requests).table.drop_columns(list(NEW_COLUMNS))
    old = tmp_path / "old" / "part-0.parquet"
    old.parent.mkdir()
    pq.write_table(table, old)
    assert read_metadata(str(old.parent)).num_rows == 2
    back = read_written(Storage(str(tmp_path)), [str(old)], ["id", *NEW_COLUMNS])
    assert back.num_rows == 2
    assert all(back.column(c).null_count == 2 for c in NEW_COLUMNS)
