"""Generation without Ray: every mode on tiny pipelines built from configs, the metadata schema, per-image seeds
(byte-identical at batch sizes 1 and 4), re-encoding of reals, and bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from shared.config import load_config, validate_config
from shared.configs.generate import GenerateConfig
from shared.diffusion.generate import (
    REQUEST_SCHEMA,
    GeneratorStage,
    count_requests,
    encode_reals,
    generator_seed,
    load_prompts,
    source_requests,
)
from shared.diffusion.realsets import read_real_table
from shared.errors import ConfigError, DataError, ModelError
from shared.imageset import IMAGE_SCHEMA, check_image_table, decode_image, encode_image, finish_image
from tests.image_fixtures import blank_gan_file, nan_ddpm_dir, png_bytes, tiny_ddpm_dir, tiny_sd_dir  # noqa: F401

SIZE = 32


def config(generators: list[dict], **extra) -> GenerateConfig:
    data = {"reals": [{"name": "lfw", "uri": "lfw-faces", "limit": 4}], "output": {"size": SIZE},
            "generators": generators, **extra}
    return validate_config(GenerateConfig, data, "test")


def requests_for(cfg: GenerateConfig, spec, n: int = 4, reals: pa.Table | None = None) -> pa.Table:
    base = generator_seed(spec, cfg.seed)
    prompts = load_prompts(cfg.prompts)
    if spec.mode == "img2img":
        return source_requests(spec, base, "lfw", reals if reals is not None else read_real_table("lfw-faces",
                                                                                               limit=n), prompts)
    return count_requests(spec, base, prompts, np.arange(n))


def run_stage(cfg: GenerateConfig, index: int = 0, requests: pa.Table | None = None):
    spec = cfg.generators[index]
    stage = GeneratorStage(spec, cfg.output)
    stage.setup()
    return stage, stage(requests if requests is not None else requests_for(cfg, spec))


def one_by_one(stage: GeneratorStage, requests: pa.Table) -> list[bytes]:
    return [stage(requests.slice(i, 1)).table.column("image")[0].as_py() for i in range(requests.num_rows)]


# ---------------------------------------------------------------------------------------------------------------------
# Each mode, with its metadata


def test_unconditional_rows_follow_the_schema(tiny_ddpm_dir):
    cfg = config([{"name": "uncond", "mode": "unconditional", "model": tiny_ddpm_dir, "count": 4, "steps": 6,
                   "scheduler": "ddim"}])
    _, result = run_stage(cfg)
    table = result.table
    assert table.schema == IMAGE_SCHEMA
    assert table.num_rows == 4
    assert not result.drops
    check_image_table(table, "test")
    row = table.slice(0, 1).to_pylist()[0]
    assert row["id"] == "uncond-0000000"
    assert row["label"] == 1
    assert row["source"] == "uncond"
    assert (row["mode"], row["scheduler"], row["steps"], row["model_ref"]) == ("unconditional", "ddim", 6,
                                                                               tiny_ddpm_dir)
    assert row["guidance"] is None
    assert row["prompt"] is None
    assert row["source_image_id"] is None
    assert (row["width"], row["height"], row["encoding"]) == (SIZE, SIZE, "png")
    pixels = decode_image(row["image"])
    assert pixels.shape == (SIZE, SIZE, 3)
    assert pixels.std() > 5
    seeds = table.column("seed").to_pylist()
    assert len(set(seeds)) == 4
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(table.column("content_hash").to_pylist())) == 4


def test_img2img_keeps_the_source_the_more_the_lower_the_strength(tiny_ddpm_dir):
    reals = read_real_table("lfw-faces", limit=3)
    cfg = config([{"name": f"i2i-{int(s * 10)}", "mode": "img2img", "model": tiny_ddpm_dir, "sources": "lfw",
                   "strength": s, "steps": 10} for s in (0.2, 0.9)])
    sources = np.stack([finish_image(decode_image(b), SIZE).astype(float) for b in reals.column("image").to_pylist()])
    distances = []
    for index, strength in enumerate((0.2, 0.9)):
        _, result = run_stage(cfg, index, requests_for(cfg, cfg.generators[index], reals=reals))
        rows = result.table.to_pylist()
        assert [r["source_image_id"] for r in rows] == ["lfw-000", "lfw-001", "lfw-002"]
        assert all(r["mode"] == "img2img" and abs(r["strength"] - strength) < 1e-6 for r in rows)
        made = np.stack([decode_image(r["image"]).astype(float) for r in rows])
        distances.append(np.abs(made - sources).mean())
    assert distances[0] < distances[1] / 2, distances  # a random-weight model destroys what it re-noises


def test_text2img_on_a_tiny_stable_diffusion(tiny_sd_dir, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a smiling old man\na woman in a park\n")
    cfg = config([{"name": "sd", "mode": "text2img", "model": tiny_sd_dir, "count": 3, "steps": 3,
                   "guidance": 5.0, "scheduler": "euler-ancestral"}], prompts={"file": str(prompt_file)})
    _, result = run_stage(cfg, requests=requests_for(cfg, cfg.generators[0], n=3))
    rows = result.table.to_pylist()
    assert [r["prompt"] for r in rows] == ["a smiling old man", "a woman in a park", "a smiling old man"]
    assert all(r["mode"] == "text2img" and r["guidance"] == 5.0 and r["scheduler"] == "euler-ancestral"
               for r in rows)
    assert decode_image(rows[0]["image"]).shape == (SIZE, SIZE, 3)


def test_img2img_on_a_text_pipeline_uses_prompts(tiny_sd_dir):
    cfg = config([{"name": "sd-i2i", "mode": "img2img", "model": tiny_sd_dir, "sources": "lfw", "strength": 0.5,
                   "steps": 4, "per_source": 2}], prompts={"faces": {"count": 3, "seed": 1}})
    _, result = run_stage(cfg, requests=requests_for(cfg, cfg.generators[0], n=2))
    rows = result.table.to_pylist()
    assert [r["id"] for r in rows] == ["sd-i2i-000-0", "sd-i2i-000-1", "sd-i2i-001-0", "sd-i2i-001-1"]
    assert all(r["prompt"] and r["source_image_id"].startswith("lfw-") and r["guidance"] == 7.5 for r in rows)
    assert rows[0]["seed"] != rows[1]["seed"]


def test_gan_rows():
    cfg = config([{"name": "gan", "mode": "gan", "count": 3}])
    _, result = run_stage(cfg)
    rows = result.table.to_pylist()
    assert all(r["mode"] == "gan" and r["model_ref"] == "gan-face-generate" and r["scheduler"] is None for r in rows)
    assert decode_image(rows[0]["image"]).std() > 10


@pytest.mark.parametrize("scheduler", ["ddpm", "pndm", "dpm-solver", "euler", "heun", "lms", "unipc"])
def test_every_scheduler_samples(tiny_ddpm_dir, scheduler):
    cfg = config([{"name": "u", "mode": "unconditional", "model": tiny_ddpm_dir, "count": 2, "steps": 4,
                   "scheduler": scheduler, "batch_invariant": False}])
    stage, result = run_stage(cfg, requests=requests_for(cfg, cfg.generators[0], n=2))
    assert result.table.num_rows == 2
    assert stage.scheduler == scheduler
    if scheduler == "pndm":  # its Runge-Kutta warm-up needs 4 steps: fewer is a clear error, not a numpy trace
        with pytest.raises(ConfigError, match="scheduler pndm: cannot run 3 steps"):
            stage.model.generate([1], 3)


# ---------------------------------------------------------------------------------------------------------------------
# Seeds: an image does not depend on its batch


@pytest.mark.parametrize("mode", ["ddpm-ancestral", "img2img", "text2img", "gan"])
def test_same_seed_same_bytes_at_batch_sizes_1_and_4(mode, tiny_ddpm_dir, tiny_sd_dir):
    spec = {
        "ddpm-ancestral": {"mode": "unconditional", "model": tiny_ddpm_dir, "count": 4, "steps": 5,
                           "scheduler": "ddpm"},  # fresh noise at every step, from the image's own generator
        "img2img": {"mode": "img2img", "model": tiny_ddpm_dir, "sources": "lfw", "strength": 0.6, "steps": 8,
                    "scheduler": "euler-ancestral"},
        "text2img": {"mode": "text2img", "model": tiny_sd_dir, "count": 4, "steps": 2},
        "gan": {"mode": "gan", "count": 4},
    }[mode]
    cfg = config([{"name": "g", **spec}], prompts={"inline": ["a face", "an elderly man, soft light"]})
    stage, batched = run_stage(cfg)
    requests = requests_for(cfg, cfg.generators[0])
    assert batched.table.num_rows == 4
    assert batched.table.column("image").to_pylist() == one_by_one(stage, requests)
    # a fresh actor (the model loaded again) makes the same bytes too
    _, again = run_stage(cfg)
    assert again.table.column("image").to_pylist() == batched.table.column("image").to_pylist()


def test_seeds_follow_ids_not_positions(tiny_ddpm_dir):
    cfg = config([{"name": "u", "mode": "unconditional", "model": tiny_ddpm_dir, "count": 8, "seed": 7}])
    spec = cfg.generators[0]
    whole = count_requests(spec, generator_seed(spec, 0), None, np.arange(8))
    tail = count_requests(spec, generator_seed(spec, 0), None, np.arange(4, 8))
    assert whole.slice(4).to_pylist() == tail.to_pylist()
    assert whole.schema == REQUEST_SCHEMA
    other = config([{"name": "u", "mode": "unconditional", "model": tiny_ddpm_dir, "count": 8, "seed": 8}])
    assert count_requests(other.generators[0], 8, None, np.arange(1)).column("seed")[0] != whole.column("seed")[0]


# ---------------------------------------------------------------------------------------------------------------------
# Reals go through the same path as fakes


def test_real_and_fake_pixels_encode_identically():
    cfg = config([], reals=[{"name": "lfw", "uri": "lfw-faces", "limit": 2}], output={"size": 48, "color": "gray"})
    reals = read_real_table("lfw-faces", limit=2)
    real = encode_reals(reals, "lfw", cfg.output).table.to_pylist()
    assert [r["id"] for r in real] == ["lfw-000", "lfw-001"]
    assert all(r["label"] == 0 and r["mode"] == "real" and r["seed"] is None for r in real)
    # the same face, handed over as a generator's float output, comes out as the very same bytes
    face = decode_image(reals.column("image")[0].as_py()).astype(np.float32) / 255.0
    assert encode_image(finish_image(face, 48, "gray")) == real[0]["image"]
    # and as a JPEG-encoded dataset the real rows are JPEG at the configured quality, like the fakes
    jpeg = config([], output={"size": 48, "encoding": "jpeg", "quality": 80}).output
    row = encode_reals(reals, "lfw", jpeg).table.to_pylist()[0]
    assert row["encoding"] == "jpeg"
    assert row["image"][:2] == b"\xff\xd8"
    assert row["image"] == encode_image(finish_image(face, 48, "rgb"), "jpeg", 80)


def test_gray_output_turns_colour_fakes_gray():
    cfg = config([{"name": "gan", "mode": "gan", "count": 2}], output={"size": SIZE, "color": "gray"})
    _, result = run_stage(cfg)
    pixels = decode_image(result.table.column("image")[0].as_py())
    assert (pixels[..., 0] == pixels[..., 1]).all()
    assert (pixels[..., 1] == pixels[..., 2]).all()


def test_corrupt_real_image_is_dropped_and_counted():
    table = pa.table({"id": ["ok", "bad"], "image": [png_bytes(np.full((8, 8, 3), 100, np.uint8)), b"not an image"]})
    result = encode_reals(table, "mine", config([]).output)
    assert result.table.column("id").to_pylist() == ["mine-ok"]
    assert result.drops == [{"id": "mine-bad", "source": "mine", "reason": "corrupt_source", "seed": None}]


# ---------------------------------------------------------------------------------------------------------------------
# Bad generators and bad input


def test_nan_outputs_are_dropped_never_written(nan_ddpm_dir):
    cfg = config([{"name": "broken", "mode": "unconditional", "model": nan_ddpm_dir, "count": 3, "steps": 3}])
    _, result = run_stage(cfg, requests=requests_for(cfg, cfg.generators[0], n=3))
    assert result.table.num_rows == 0
    assert result.table.schema == IMAGE_SCHEMA
    assert [d["reason"] for d in result.drops] == ["nan"] * 3
    assert {d["id"] for d in result.drops} == {"broken-0000000", "broken-0000001", "broken-0000002"}


def test_blank_outputs_are_dropped(blank_gan_file):
    cfg = config([{"name": "flat", "mode": "gan", "model": blank_gan_file, "count": 2}])
    _, result = run_stage(cfg, requests=requests_for(cfg, cfg.generators[0], n=2))
    assert result.table.num_rows == 0
    assert [d["reason"] for d in result.drops] == ["blank", "blank"]


def test_corrupt_source_image_drops_that_request_only(tiny_ddpm_dir):
    reals = read_real_table("lfw-faces", limit=2)
    reals = pa.table({"id": ["000", "broken", "001"],
                      "image": [reals.column("image")[0].as_py(), b"\x89PNG\r\n\x1a\n truncated",
                                reals.column("image")[1].as_py()]})
    cfg = config([{"name": "i2i", "mode": "img2img", "model": tiny_ddpm_dir, "sources": "lfw", "steps": 4}])
    _, result = run_stage(cfg, requests=requests_for(cfg, cfg.generators[0], reals=reals))
    assert result.table.column("id").to_pylist() == ["i2i-000-0", "i2i-001-0"]
    assert [(d["id"], d["reason"], d["source_image_id"]) for d in result.drops] == [
        ("i2i-broken-0", "corrupt_source", "lfw-broken")]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("generators: [{name: x, mode: sketch, model: m, count: 1}]",
         "generators.0': Input tag 'sketch' found using 'mode' does not match any of the expected tags"),
        ("generators: [{name: x, mode: img2img, model: m}]", "generator 'x' (img2img) needs `sources`"),
        ("generators: [{name: x, mode: img2img, model: m, sources: photos}]",
         "sources 'photos' is not a real collection (have: lfw)"),
        ("generators: [{name: x, mode: text2img, model: m, count: 2}]", "generator 'x' (text2img) needs prompts"),
        ("generators: [{name: lfw, mode: gan, count: 2}]", "source name 'lfw' is used twice"),
        ("generators: [{name: x, mode: gan, count: 2, dtype: float16}]", "float16 needs a GPU"),
        ("prompts: {inline: [a, '  ']}", "inline prompts must not be empty"),
        ("prompts: {inline: [a], faces: {count: 2}}", "set exactly one of file, inline, faces (got inline, faces)"),
        ("generators: [{name: x, mode: unconditional, model: m, count: 2, scheduler: karras}]",
         "generators.0.unconditional.scheduler"),
        ("generators: [{name: Bad Name, mode: gan, count: 2}]", "generators.0.gan.name"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, yaml_text, message):
    path = tmp_path / "gen.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(GenerateConfig, path)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text, text
    assert text.startswith(str(path)), text


def test_prompt_file_with_an_empty_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a face\n\nan old man\n")
    cfg = config([], prompts={"file": str(path)})
    with pytest.raises(DataError, match=r"prompts.txt: line 2 is empty"):
        load_prompts(cfg.prompts)
    path.write_text("")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(cfg.prompts)
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_prompts(cfg.prompts)


def test_face_prompts_are_seeded_distinct_and_prefix_stable():
    from shared.diffusion.prompts import face_prompts

    ten = face_prompts(10, seed=3)
    assert ten == face_prompts(10, seed=3)
    assert len(set(ten)) == 10
    assert face_prompts(4, seed=3) == ten[:4]
    assert face_prompts(4, seed=4) != ten[:4]
    assert all(" of a" in p or " of an" in p for p in ten)


def test_bad_model_references(tmp_path, tiny_sd_dir):
    from shared.diffusion.gan import load_dcgan
    from shared.diffusion.pipelines import PixelDiffusion, load_pipeline

    with pytest.raises(ModelError, match="no such directory"):
        load_pipeline(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="need a pipeline with a UNet2DModel"):
        PixelDiffusion(load_pipeline(tiny_sd_dir))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelError, match="not a torch.save file"):
        load_dcgan(str(tmp_path / "junk.pt"))
    with pytest.raises(ModelError, match="cannot read"):
        load_dcgan(str(tmp_path / "absent.pt"))


def test_img2img_strength_too_low_for_the_steps(tiny_ddpm_dir):
    cfg = config([{"name": "i", "mode": "img2img", "model": tiny_ddpm_dir, "sources": "lfw", "strength": 0.05,
                   "steps": 10}])
    with pytest.raises(ConfigError, match="leaves no denoising step"):
        run_stage(cfg, requests=requests_for(cfg, cfg.generators[0], n=1))


def test_bad_references_fail_before_any_actor_starts(tmp_path, tiny_sd_dir):
    from ray_jobs.generate import check_inputs

    def check(generators, **extra):
        check_inputs(config(generators, **extra))

    with pytest.raises(ModelError, match=r"pipeline '\./nope': no such directory"):
        check([{"name": "u", "mode": "unconditional", "model": "./nope", "count": 1}])
    with pytest.raises(ModelError, match="GAN model .*: no such file"):
        check([{"name": "g", "mode": "gan", "model": str(tmp_path / "g.pt"), "count": 1}])
    with pytest.raises(DataError, match="real images 'lfw-facez': no such alias"):
        check([], reals=[{"name": "lfw", "uri": "lfw-facez"}])
    check([{"name": "t", "mode": "text2img", "model": tiny_sd_dir, "count": 1}], prompts={"inline": ["a face"]})


def test_a_source_dropping_more_than_its_share_fails_naming_the_reasons():
    from shared.diffusion.generate import check_drops

    summary = {"made": {"a": 8, "b": 9}, "drops": [{"source": "a", "reason": "nan"}, {"source": "a", "reason": "nan"},
                                                   {"source": "b", "reason": "blank"}]}
    check_drops(summary, "b", 0.1)  # 1 of 10
    check_drops(summary, "a", 0.2)  # 2 of 10
    with pytest.raises(DataError, match=r"a: 2 of 10 images dropped \(2 nan\), more than max_drop_fraction 0.1"):
        check_drops(summary, "a", 0.1)
