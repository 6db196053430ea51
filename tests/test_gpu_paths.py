"""Every job's GPU path, end to end on tiny models: a worker that reserves a GPU computes on it.

Each stage records where each kind of worker computed (metrics.json "placement"); here every worker that requested a
GPU must report a CUDA device. These tests need CUDA and skip without it (the only tests that skip); the CPU side of
the same decision is in tests/test_placement.py.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from ray_jobs.runtime import run_job
from shared.config import validate_config
from shared.configs.curate import CurateConfig
from shared.configs.distill import DistillConfig
from shared.configs.evaluate import EvaluateConfig
from shared.configs.evaluate_detector import EvaluateDetectorConfig
from shared.configs.generate import GenerateConfig
from shared.configs.prune import PruneConfig
from shared.configs.train_ddpm import TrainDdpmConfig
from shared.configs.train_detector import DetectorConfig
from shared.data import write_parquet
from shared.detection.standin import standin_table
from shared.storage import Storage
from tests.real_text import CALIBRATION_MODULES, HELD_OUT_MODULES, chunks
from tests.test_distill_job import TINY as TINY_DISTILL
from tests.test_train_detector import FACES, TINY_TRAINING

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


def on_gpu(metrics: dict, *roles: str) -> None:
    for role in roles:
        devices = metrics["placement"][role]["devices"]
        assert devices, (role, metrics["placement"])
        assert all(d.startswith("cuda") for d in devices), (role, metrics["placement"])


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("texts")
    rows = [{"id": f"d{i}", "text": t, "label": "code"} for i, t in enumerate(chunks(CALIBRATION_MODULES, words=40,
                                                                                      limit=24))]
    write_parquet(pa.Table.from_pylist(rows), Storage(str(folder)), "part-0.parquet")
    return str(folder)


def test_curate_fits_and_embeds_on_the_gpu(ray_session, tmp_path, tiny_llama_dir, texts):
    cfg = validate_config(CurateConfig, {
        "model": "tiny-llama", "corpus": texts, "seeds": chunks(HELD_OUT_MODULES, words=30, limit=2),
        "max_tokens": 48, "output_root": str(tmp_path), "retrieval": {"m": 4},
        "coordinates": {"k": 16, "reference_docs": 4, "reference_tokens": 24},
        "sae": {"train_docs": 12, "steps": 10, "expansion": 4, "k": 4},
        "runtime": {"gpus_per_actor": 1, "piece_docs": 8}}, "gpu test")
    on_gpu(run_job(cfg), "fit task", "embed actor")


def test_prune_scores_on_the_gpu(ray_session, tmp_path, tiny_llama_dir, texts):
    cfg = validate_config(PruneConfig, {"model": "tiny-llama", "calibration": texts, "output_root": str(tmp_path),
                                        "max_length": 64, "micro_batch_size": 4, "sample_tokens": 4,
                                        "min_examples": 4, "runtime": {"cpus_per_worker": 1, "use_gpu": True}},
                          "gpu test")
    on_gpu(run_job(cfg), "importance worker")


def test_distill_rewrites_and_trains_on_the_gpu(ray_session, tmp_path, tiny_llama_dir, texts):
    cfg = validate_config(DistillConfig, {**TINY_DISTILL, "data": texts, "output_root": str(tmp_path),
                                          "runtime": {"gpus_per_actor": 1, "use_gpu": True}}, "gpu test")
    on_gpu(run_job(cfg), "teacher actor", "training worker")


def test_evaluate_scores_on_the_gpu(ray_session, tmp_path, tiny_llama_dir, texts):
    cfg = validate_config(EvaluateConfig, {"models": {"tiny": "tiny-llama"}, "datasets": {"d": texts},
                                           "max_examples": 8, "max_length": 48, "output_root": str(tmp_path),
                                           "runtime": {"gpus_per_actor": 1}}, "gpu test")
    on_gpu(run_job(cfg), "evaluation actor")


def test_train_ddpm_then_generate_on_the_gpu(ray_session, tmp_path):
    ddpm = validate_config(TrainDdpmConfig, {"limit": 8, "image_size": 16, "widths": [8, 16], "epochs": 1,
                                             "batch_size": 4, "preview": 2, "runtime": {"num_gpus": 1},
                                             "output_root": str(tmp_path)}, "gpu test")
    on_gpu(run_job(ddpm), "training task")
    gen = validate_config(GenerateConfig, {
        "output_root": str(tmp_path), "output": {"size": 16, "color": "gray"}, "reals": [],
        "generators": [{"name": "u", "mode": "unconditional", "model": str(tmp_path / "train-ddpm"), "steps": 3,
                        "count": 2, "runtime": {"gpus_per_actor": 1}}]}, "gpu test")
    on_gpu(run_job(gen), "u actor")


def test_detectors_train_and_score_on_the_gpu(ray_session, tmp_path):
    data = Storage(str(tmp_path)).child("faces")
    write_parquet(standin_table(FACES), data, "part-0.parquet")
    train = validate_config(DetectorConfig, {**TINY_TRAINING, "epochs": 1,
                                             "runtime": {"num_workers": 1, "use_gpu": True},
                                             "output_root": str(tmp_path), "stage": "detector",
                                             "sources": [{"name": "faces", "uri": data.uri()}]}, "gpu test")
    on_gpu(run_job(train), "training worker")
    ev = validate_config(EvaluateDetectorConfig, {
        "output_root": str(tmp_path), "stage": "evaluate", "runtime": {"num_actors": 1, "gpus_per_actor": 1},
        "detectors": [{"name": "d", "uri": str(tmp_path / "detector")}],
        "test_sets": [{"name": "faces", "uri": data.uri()}]}, "gpu test")
    metrics = run_job(ev)
    on_gpu(metrics, "scoring actor")
    assert json.loads(json.dumps(metrics["auc"]))  # scored every column
