"""The image jobs end to end on the session's local Ray: generate writing to moto's S3 server, drops of a broken
generator, curate-images, and train-ddpm -> generate as a pipeline through the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_jobs.runtime import run_job
from shared.config import ActorPoolConfig, load_config, validate_config
from shared.configs.curate_images import CurateImagesConfig
from shared.configs.generate import GenerateConfig
from shared.configs.pipeline import PipelineConfig
from shared.data import read_table
from shared.diffusion.realsets import read_real_table
from shared.errors import DataError
from shared.imageset import IMAGE_SCHEMA, decode_image, encode_image, finish_image
from shared.pipeline import stage_configs
from shared.storage import Storage
from tests.conftest import ROOT, committed, committed_path, run_cli
from tests.image_fixtures import nan_ddpm_dir, png_bytes, tiny_ddpm_dir, tiny_sd_dir  # noqa: F401


def images_by_id(table) -> dict[str, bytes]:
    return dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))


@pytest.mark.ray
@pytest.mark.s3
def test_generate_end_to_end_on_s3(ray_session, s3_root, tiny_ddpm_dir, tiny_sd_dir, tmp_path):
    store = Storage(s3_root)
    store.upload(tiny_ddpm_dir, "models", "ddpm")
    store.write_text("a smiling old man\na woman in a park\n", "prompts.txt")
    faces = read_real_table("lfw-faces", limit=2)
    store.write_bytes(faces.column("image")[0].as_py(), "photos", "a.png")
    store.write_bytes(faces.column("image")[1].as_py(), "photos", "sub", "b.png")
    store.write_bytes(b"\x89PNG\r\n\x1a\n cut short", "photos", "c.png")
    cfg = validate_config(GenerateConfig, {
        "output_root": s3_root,
        "output": {"size": 32},
        "prompts": {"file": store.uri("prompts.txt")},
        "max_drop_fraction": 0.4,
        "reals": [{"name": "lfw", "uri": "lfw-faces", "limit": 4}, {"name": "photos", "uri": store.uri("photos")}],
        "generators": [
            {"name": "uncond", "mode": "unconditional", "model": store.uri("models", "ddpm"), "scheduler": "ddpm",
             "steps": 4, "count": 4, "runtime": {"num_actors": 2}, "batch_size": 1},
            {"name": "i2i", "mode": "img2img", "model": store.uri("models", "ddpm"), "sources": "photos",
             "strength": 0.5, "steps": 4},
            {"name": "sd", "mode": "text2img", "model": tiny_sd_dir, "count": 2, "steps": 2},
            {"name": "gan", "mode": "gan", "count": 3, "batch_size": 2},
        ],
    }, "test")
    metrics = run_job(cfg)

    counts = {name: (m["written"], m["dropped"]) for name, m in metrics["sources"].items()}
    assert counts == {"lfw": (4, 0), "photos": (2, 1), "uncond": (4, 0), "i2i": (2, 1), "sd": (2, 0), "gan": (3, 0)}
    table = read_table(store.uri("generate"))  # the stage hands over its dataset
    assert table.schema.equals(IMAGE_SCHEMA)
    assert table.num_rows == 17
    rows = {r["id"]: r for r in table.to_pylist()}
    assert len(rows) == 17
    assert {r["label"] for r in rows.values() if r["source"] in ("lfw", "photos")} == {0}
    assert {r["label"] for r in rows.values() if r["source"] not in ("lfw", "photos")} == {1}
    assert {rid for rid in rows if rid.startswith("photos-")} == {"photos-a", "photos-sub/b"}
    assert sorted(r["source_image_id"] for r in rows.values() if r["source"] == "i2i") == ["photos-a", "photos-sub/b"]
    assert {r["prompt"] for r in rows.values() if r["source"] == "sd"} == {"a smiling old man", "a woman in a park"}
    assert all(r["width"] == r["height"] == 32 for r in rows.values())
    # reals were re-encoded exactly as a fake with the same pixels would be
    face = decode_image(faces.column("image")[0].as_py())
    assert rows["lfw-000"]["image"] == rows["photos-a"]["image"] == encode_image(finish_image(face, 32))
    stage = committed(store.uri("generate"))
    drops = [json.loads(line) for line in stage.read_text("drops.jsonl").splitlines()]
    assert sorted((d["source"], d["reason"]) for d in drops) == [("i2i", "corrupt_source"),
                                                                 ("photos", "corrupt_source")]
    assert stage.exists("report.html")
    assert stage.exists("contact_sheet.png")
    assert "uncond" in stage.read_text("report.html")
    assert run_job(cfg) == metrics  # done: skipped

    # the same requests at batch size 4 on one actor (instead of 1 on two) give byte-identical images
    local = cfg.model_copy(update={
        "output_root": str(tmp_path), "reals": [], "max_drop_fraction": 0.05,
        "generators": [cfg.generators[0].model_copy(update={"batch_size": 4, "runtime": ActorPoolConfig(num_actors=1)}),
                       cfg.generators[3].model_copy(update={"batch_size": 4})]})
    assert run_job(local)["sources"]["uncond"]["batch_size"] == 4
    again = images_by_id(read_table(str(tmp_path / "generate")))
    assert set(again) == {rid for rid in rows if rid.startswith(("uncond-", "gan-"))}
    assert [rid for rid in sorted(again) if again[rid] != rows[rid]["image"]] == []


@pytest.mark.ray
def test_broken_generator_fails_the_job_or_is_counted(ray_session, tmp_path, nan_ddpm_dir):
    data = {"output_root": str(tmp_path), "reals": [],
            "generators": [{"name": "broken", "mode": "unconditional", "model": nan_ddpm_dir, "count": 3,
                            "steps": 2},
                           {"name": "gan", "mode": "gan", "count": 2}]}
    with pytest.raises(DataError, match=r"broken: 3 of 3 images dropped \(3 nan\), more than max_drop_fraction"):
        run_job(validate_config(GenerateConfig, data, "test"))
    assert not (tmp_path / "generate" / "_SUCCESS").exists()
    metrics = run_job(validate_config(GenerateConfig, {**data, "max_drop_fraction": 1.0}, "test"))
    broken = metrics["sources"]["broken"]
    assert (broken["written"], broken["dropped"], broken["drop_reasons"]) == (0, 3, {"nan": 3})
    assert metrics["images"] == 2
    assert metrics["dropped"] == 3
    assert not list((committed_path(tmp_path / "generate") / "images").glob("broken/*.parquet"))
    drops = (committed_path(tmp_path / "generate") / "drops.jsonl").read_text().splitlines()
    assert len(drops) == 3
    assert all(json.loads(d)["reason"] == "nan" for d in drops)


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.mark.ray
def test_curate_images_end_to_end(ray_session, tmp_path):
    faces = [decode_image(b) for b in read_real_table("lfw-faces", limit=4).column("image").to_pylist()]
    big = [np.asarray(Image.fromarray(f).resize((96, 96), Image.Resampling.BICUBIC)) for f in faces]
    folder = tmp_path / "collection"
    (folder / "img").mkdir(parents=True)
    files = {
        "a": png_bytes(big[0]),
        "b": png_bytes(big[1]),
        "a-copy": _jpeg(np.clip(big[0].astype(int) + 6, 0, 255).astype(np.uint8), 70),  # near duplicate of a
        "c": png_bytes(big[2]),
        "tiny": png_bytes(faces[3]),                                                    # 25 px: too small
        "car": png_bytes(big[3]),
        "broken": b"GIF89a broken",
    }
    for name, data in files.items():
        (folder / "img" / f"{name}.png").write_bytes(data)
    prompts = {"a": "Portrait of an old man, 35mm", "b": "a FACE in the crowd", "a-copy": "portrait of an old man",
               "c": "headshots of a CEO", "tiny": "portrait, tiny", "car": "a red car on a street",
               "broken": "portrait of a woman", "missing": "face of a child"}
    lines = [json.dumps({"key": k, "file": f"img/{k}.png", "prompt": p, "steps": 20}) for k, p in prompts.items()]
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(CurateImagesConfig, None, [
        f"output_root={tmp_path / 'run'}", f"manifest={folder / 'manifest.jsonl'}", "name=diffdb",
        "columns.id=key", "columns.path=file", "columns.steps=steps", "subject.keywords=[portrait, face, headshot]",
        "min_side=64", "output.size=32", "output.color=gray"])
    metrics = run_job(cfg)
    assert metrics["drop_reasons"] == {"off_subject": 1, "too_small": 1, "undecodable": 1, "missing_file": 1,
                                       "near_duplicate": 1}
    stage = tmp_path / "run" / "curate-images"
    table = read_table(str(stage))
    assert table.schema.equals(IMAGE_SCHEMA)
    assert sorted(table.column("id").to_pylist()) == ["diffdb-a", "diffdb-b", "diffdb-c"]
    row = next(r for r in table.to_pylist() if r["id"] == "diffdb-a")
    assert (row["label"], row["mode"], row["source"], row["steps"], row["prompt"]) == (
        1, "collected", "diffdb", 20, "Portrait of an old man, 35mm")
    assert row["image"] == encode_image(finish_image(big[0], 32, "gray"))
    drops = [json.loads(line) for line in (committed_path(stage) / "drops.jsonl").read_text().splitlines()]
    assert {"id": "diffdb-a-copy", "reason": "near_duplicate", "duplicate_of": "diffdb-a"} in drops
    assert (committed_path(stage) / "contact_sheet.png").is_file()
    assert (committed_path(stage) / "report.html").is_file()


def test_deepfake_data_pipeline_is_valid_and_wires_the_ddpm_and_vae_stages():
    pipeline = load_config(PipelineConfig, ROOT / "ray_jobs" / "configs" / "deepfake-data.yaml")
    (train_spec, train), (vae_spec, vae), (gen_spec, gen) = stage_configs(pipeline)
    assert (train_spec.job, vae_spec.job, gen_spec.job) == ("train-ddpm", "train-vae", "generate")
    assert vae.training_reals == train.training_reals
    diffusion = [g for g in gen.generators if g.mode not in ("gan", "vae")]
    assert {g.model for g in diffusion} == {str(Path(pipeline.output_root).resolve() / "train-ddpm")}
    assert [g.model for g in gen.generators if g.mode == "vae"] == [str(Path(pipeline.output_root).resolve()
                                                                        / "train-vae")]
    assert {g.scheduler for g in diffusion if g.mode == "unconditional"} == {"ddim", "ddpm"}
    assert sorted(g.strength for g in diffusion if g.mode == "img2img") == [0.3, 0.6]
    assert [g.mode for g in gen.generators].count("gan") == 1
    assert gen.reals[0].write


@pytest.mark.ray
@pytest.mark.slow
def test_train_ddpm_then_generate_as_a_pipeline_from_the_cli(ray_session, tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""
output_root: {tmp_path / 'run'}
stages:
  - name: ddpm
    job: train-ddpm
    config: {{limit: 16, image_size: 16, widths: [8, 16], epochs: 3, batch_size: 8, preview: 4}}
  - name: data
    job: generate
    config:
      output: {{size: 16, color: gray}}
      reals: [{{name: lfw, uri: lfw-faces, limit: 3}}]
      generators:
        - {{name: u, mode: unconditional, model: "${{ddpm}}", scheduler: ddim, steps: 3, count: 3}}
        - {{name: i, mode: img2img, model: "${{ddpm}}", sources: lfw, strength: 0.5, steps: 4}}
""")
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}  # the session's Ray spares a Ray start
    result = run_cli("pipeline", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "train-ddpm: epoch 1/3" in output
    assert "train-ddpm: epoch 3/3" in output
    run = tmp_path / "run"
    assert json.loads((run / "ddpm" / "_SUCCESS").read_text())["outputs"] == {"model": "pipeline"}
    ddpm = committed_path(run / "ddpm")
    assert (ddpm / "pipeline" / "model_index.json").is_file()
    assert (ddpm / "preview.png").is_file()
    assert len(json.loads((ddpm / "history.json").read_text())) == 3
    table = read_table(str(run / "data"))
    assert sorted(set(table.column("source").to_pylist())) == ["i", "lfw", "u"]
    assert table.num_rows == 9
    assert {decode_image(b).shape for b in table.column("image").to_pylist()} == {(16, 16, 3)}
    again = run_cli("pipeline", "--config", str(config), env=env)
    assert again.returncode == 0
    assert again.stdout.count("skipped") == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "generators=[{name: x, mode: sketch, count: 1}]"], "Input tag 'sketch' found using 'mode'"),
        (["--set", "generators=[{name: x, mode: img2img, model: m}]"], "needs `sources`"),
    ],
)
def test_generate_cli_bad_input_is_one_line(args, expected, tmp_path):
    result = run_cli("run", "generate", "--set", f"output_root={tmp_path}", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], result.stderr


def test_parquet_shards_are_plain_parquet(tmp_path):
    """A consumer without scopeforge reads the shards with pyarrow alone (the detector work relies on it)."""
    from shared.diffusion.generate import encode_reals

    table = encode_reals(read_real_table("lfw-faces", limit=2), "lfw", GenerateConfig().output).table
    pq.write_table(table, tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema.equals(IMAGE_SCHEMA)
    assert back.column("id").to_pylist() == ["lfw-000", "lfw-001"]
