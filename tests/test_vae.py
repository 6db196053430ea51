"""The VAE generator family: training on a few real faces, the saved model folder, per-image seeds, the generate
job's `vae` mode (without Ray and as a Ray job after train-vae), and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.config import validate_config
from shared.configs.generate import GenerateConfig
from shared.configs.train_vae import TrainVaeConfig
from shared.diffusion.ddpm import training_images
from shared.diffusion.generate import GeneratorStage, count_requests, generator_seed
from shared.diffusion.realsets import read_real_table
from shared.diffusion.vae import (
    VAE_CONFIG,
    VAE_WEIGHTS,
    VaeResult,
    check_vae_ref,
    load_vae,
    reconstruct,
    sample_vae,
    save_vae,
    train_vae,
)
from shared.errors import ConfigError, ModelError
from shared.imageset import IMAGE_SCHEMA, check_image_table, decode_image

TINY = {"image_size": 24, "widths": [8, 16], "latent_dim": 8, "batch_size": 8, "lr": 5e-3, "kl_warmup": 0,
        "preview": 0}


def faces(n: int = 8, size: int = 24) -> torch.Tensor:
    images, color = training_images(read_real_table("lfw-faces", limit=n), size)
    assert color == "gray"
    return images  # (n, 1, size, size) in [-1, 1]


def tiny_cfg(**extra) -> TrainVaeConfig:
    return validate_config(TrainVaeConfig, {**TINY, **extra}, "test")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine two threads run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained() -> tuple[VaeResult, list[str]]:
    """A tiny VAE trained for 60 steps on 8 faces (a few seconds), and its log lines."""
    lines: list[str] = []
    return train_vae(faces(), tiny_cfg(epochs=60, log_every=20), "gray", log=lines.append), lines


@pytest.fixture(scope="module")
def tiny_vae_dir(trained, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-vae")
    save_vae(trained[0].model, path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def test_training_lowers_the_loss_and_the_reconstruction_error(trained):
    images = faces()
    result, lines = trained
    first, last = result.history[0], result.history[-1]
    assert len(result.history) == 60
    assert last["loss"] < first["loss"] - 0.3  # nats per pixel value
    assert last["recon_mse"] < 0.6 * first["recon_mse"]
    assert last["kl"] > 1.0  # the decoder uses z (no posterior collapse)
    assert [line.split()[2] for line in lines[1:]] == ["1/60", "20/60", "40/60", "60/60"]
    error = float(np.mean((reconstruct(result.model, images) - (images.permute(0, 2, 3, 1).numpy() + 1) / 2) ** 2))
    assert error < first["recon_mse"]


def test_kl_warmup_ramps_the_weight_and_the_same_config_trains_the_same_weights():
    images = faces()
    cfg = tiny_cfg(epochs=4, kl_warmup=2, kl_weight=2.0, batch_size=4)  # 2 steps per epoch
    a = train_vae(images, cfg, "gray", log=lambda _: None)
    assert [h["kl_weight"] for h in a.history] == [0.5, 1.5, 2.0, 2.0]  # the weight of each epoch's last step
    b = train_vae(images, cfg, "gray", log=lambda _: None)
    for (name, pa_), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa_, pb), name


def test_fixed_sigma_is_the_plain_gaussian_vae():
    result = train_vae(faces(), tiny_cfg(epochs=2, sigma=0.25), "gray", log=lambda _: None)
    assert {h["sigma"] for h in result.history} == {0.25}


# ---------------------------------------------------------------------------------------------------------------------
# The model folder and sampling


def test_save_load_round_trip_gives_identical_samples(tiny_vae_dir, tmp_path):
    model = load_vae(tiny_vae_dir)
    assert json.loads((Path(tiny_vae_dir) / VAE_CONFIG).read_text()) == {
        "image_size": 24, "channels": 1, "widths": [8, 16], "latent_dim": 8}
    save_vae(model, tmp_path / "again")
    again = load_vae(str(tmp_path / "again"))
    seeds = [0, 1, 2**62]
    first = sample_vae(model, seeds)
    assert first.shape == (3, 24, 24, 1)
    assert first.dtype == np.float32
    assert 0.0 <= first.min()
    assert first.max() <= 1.0
    assert np.array_equal(first, sample_vae(again, seeds))
    assert not np.array_equal(first[0], first[1])
    cooler = sample_vae(model, seeds, temperature=0.5)
    assert not np.array_equal(first, cooler)
    assert sample_vae(model, []).shape == (0, 24, 24, 1)


def test_an_image_depends_on_its_seed_only(tiny_vae_dir):
    model = load_vae(tiny_vae_dir)
    seeds = list(range(100, 108))
    alone = np.concatenate([sample_vae(model, [s]) for s in seeds])
    assert np.array_equal(sample_vae(model, seeds), alone)
    assert np.array_equal(sample_vae(model, seeds[::-1])[::-1], alone)
    batched = sample_vae(model, seeds, batch_invariant=False)  # one decoder call: same z, rounding may differ
    assert np.abs(batched - alone).max() < 1e-4


def test_bad_model_folders_are_one_line_model_errors(tiny_vae_dir, tmp_path):
    def folder(name: str, config: str | None = None, weights: bytes | None = None) -> str:
        path = tmp_path / name
        path.mkdir()
        if config is not None:
            (path / VAE_CONFIG).write_text(config)
        if weights is not None:
            (path / VAE_WEIGHTS).write_bytes(weights)
        return str(path)

    good_config = (Path(tiny_vae_dir) / VAE_CONFIG).read_text()
    good_weights = (Path(tiny_vae_dir) / VAE_WEIGHTS).read_bytes()
    cases = {
        str(tmp_path / "missing"): "no such directory",
        folder("empty"): f"no {VAE_CONFIG} there",
        folder("not-json", "{image_size: 24", good_weights): f"bad {VAE_CONFIG}",
        folder("bad-field", good_config.replace('"channels": 1', '"channels": 2'), good_weights):
            f"bad {VAE_CONFIG} (channels:",
        folder("no-weights", good_config): f"no {VAE_WEIGHTS} there",
        folder("corrupt", good_config, b"not safetensors"): f"{VAE_WEIGHTS} is not a safetensors file",
        folder("other-shape", good_config.replace('"latent_dim": 8', '"latent_dim": 9'), good_weights):
            "the weights do not fit",
        "runs/nowhere": "no such folder",
    }
    for ref, expected in cases.items():
        with pytest.raises(ModelError) as info:
            load_vae(ref)
        message = str(info.value)
        assert expected in message, (ref, message)
        assert ref in message
        assert "\n" not in message
    with pytest.raises(ModelError, match="no such directory"):
        check_vae_ref(str(tmp_path / "missing"))
    check_vae_ref(tiny_vae_dir)


# ---------------------------------------------------------------------------------------------------------------------
# The generate job's vae mode


def generate_config(model: str, size: int = 24, **spec) -> GenerateConfig:
    return validate_config(GenerateConfig, {
        "reals": [], "output": {"size": size, "color": "gray"},
        "generators": [{"name": "vae", "mode": "vae", "model": model, "count": 8, **spec}]}, "test")


@pytest.mark.parametrize("size", [24, 32])
def test_vae_mode_rows_have_the_requested_size_and_metadata(tiny_vae_dir, size):
    cfg = generate_config(tiny_vae_dir, size, batch_size=4)
    spec = cfg.generators[0]
    stage = GeneratorStage(spec, cfg.output)
    stage.setup()
    requests = count_requests(spec, generator_seed(spec, cfg.seed), None, np.arange(5))
    result = stage(requests)
    table = result.table
    assert table.schema == IMAGE_SCHEMA
    assert table.num_rows == 5
    assert not result.drops
    check_image_table(table, "test")
    row = table.slice(0, 1).to_pylist()[0]
    assert (row["id"], row["label"], row["source"], row["mode"], row["family"]) == ("vae-0000000", 1, "vae", "vae",
                                                                                    "vae")
    assert (row["model_ref"], row["seed"]) == (tiny_vae_dir, requests.column("seed")[0].as_py())
    assert (row["scheduler"], row["steps"], row["width"], row["height"]) == (None, None, size, size)
    assert "torch" in json.loads(row["library_versions"])
    pixels = decode_image(row["image"])
    assert pixels.shape == (size, size, 3)
    assert pixels.std() > 2
    one_by_one = [stage(requests.slice(i, 1)).table.column("image")[0].as_py() for i in range(5)]
    assert one_by_one == table.column("image").to_pylist()  # batch size 1 and 5: the same bytes


def test_vae_generator_config_needs_a_model_and_a_positive_temperature():
    with pytest.raises(ConfigError, match="model"):
        validate_config(GenerateConfig, {"generators": [{"name": "v", "mode": "vae", "count": 2}]}, "test")
    with pytest.raises(ConfigError, match="temperature"):
        generate_config("somewhere", temperature=0)
    with pytest.raises(ConfigError, match="divisible by 4"):
        tiny_cfg(image_size=26)


@pytest.mark.ray
def test_train_vae_then_generate_as_ray_jobs(ray_session, tmp_path):
    from ray_jobs.runtime import run_job
    from shared.data import read_table
    from tests.conftest import committed_path

    train = validate_config(TrainVaeConfig, {**TINY, "output_root": str(tmp_path), "epochs": 3, "preview": 4,
                                             "training_reals": {"stop": 0.2}}, "test")
    metrics = run_job(train)
    assert metrics["epochs"] == 3
    assert metrics["latent_dim"] == 8
    assert set(metrics) >= {"final_loss", "kl", "recon_mse", "train_seconds", "images"}
    stage = tmp_path / "train-vae"
    assert json.loads((stage / "_SUCCESS").read_text())["outputs"] == {"model": "model"}
    done = committed_path(stage)
    assert (done / "model" / VAE_CONFIG).is_file()
    assert (done / "preview.png").is_file()
    assert len(json.loads((done / "history.json").read_text())) == 3
    assert len(json.loads((done / "training_ids.json").read_text())) == metrics["images"] < 40

    gen = validate_config(GenerateConfig, {
        "output_root": str(tmp_path), "reals": [], "output": {"size": 24, "color": "gray"},
        "generators": [{"name": "vae", "mode": "vae", "model": str(stage), "count": 6, "batch_size": 2}]}, "test")
    out = run_job(gen)
    assert out["sources"]["vae"]["written"] == 6
    table = read_table(str(tmp_path / "generate"))
    assert table.num_rows == 6
    assert set(table.column("mode").to_pylist()) == {"vae"}
    assert {decode_image(b).shape for b in table.column("image").to_pylist()} == {(24, 24, 3)}
