"""train-detector and evaluate-detector end to end on a local Ray (2 Train workers) with every artifact on moto's S3
server; bad input; and a crash (SIGKILL after a checkpoint) followed by a resume with the difficulty state."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ray_jobs.runtime import run_job
from shared.config import validate_config
from shared.configs.evaluate_detector import EvaluateDetectorConfig
from shared.configs.standin_faces import StandinFacesConfig
from shared.configs.train_detector import DetectorConfig
from shared.data import write_parquet
from shared.detection.backbones import fake_probability, load_detector
from shared.detection.mixture import assign_split, split_keys
from shared.detection.standin import standin_table
from shared.errors import DataError, ModelError
from shared.storage import Storage
from tests.conftest import ROOT, committed, committed_path, marker

pytestmark = [pytest.mark.ray]

FACES = StandinFacesConfig(size=16, reals=40, fakes_per_generator=16, generators=["pca", "blur", "noise"])
SPLIT = {"seed": 0, "val_fraction": 0.25, "test_fraction": 0.25}
TINY_TRAINING = {"model": {"kind": "small-cnn", "width": 4}, "batch_size": 16, "split": SPLIT,
                 "boosting": {"method": "momentum", "warmup_epochs": 1},
                 "runtime": {"num_workers": 2, "max_failures": 0}}


def faces_with_corrupt_images() -> tuple[pa.Table, dict[str, str]]:
    """The stand-in faces, with the image bytes of one training fake and one test fake replaced by garbage."""
    table = standin_table(FACES)
    splits = assign_split(split_keys(table), SPLIT["seed"], SPLIT["val_fraction"], SPLIT["test_fraction"])
    labels = table.column("label").to_numpy()
    ids = table.column("id").to_pylist()
    corrupt = {s: ids[int(np.flatnonzero((splits == s) & (labels == 1))[0])] for s in ("train", "test")}
    images = table.column("image").to_pylist()
    for image_id in corrupt.values():
        images[ids.index(image_id)] = b"\x89PNG\r\n\x1a\n truncated"
    return table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), corrupt


@pytest.mark.s3
def test_train_and_evaluate_on_s3_with_two_workers(ray_session, s3_root):
    table, corrupt = faces_with_corrupt_images()
    data = Storage(s3_root).child("faces")
    write_parquet(table.slice(0, 60), data, "part-0.parquet")
    write_parquet(table.slice(60), data, "part-1.parquet")

    cfg = validate_config(DetectorConfig, {**TINY_TRAINING, "output_root": s3_root, "stage": "detector", "epochs": 2,
                                           "sources": [{"name": "faces", "uri": data.uri()}]}, "test")
    metrics = run_job(cfg)
    stage_root = Storage(s3_root).child("detector")
    stage = committed(stage_root.uri())
    assert metrics["epochs"] == 2
    assert len(metrics["history"]) == 2
    assert metrics["best_val_auc"] == max(h["val_auc"] for h in metrics["history"])
    # the undecodable training image is counted and reported, never replaced
    assert metrics["dropped"]["count"] == 1
    assert metrics["dropped"]["rows"][0]["id"] == corrupt["train"]
    assert "cannot decode" in metrics["dropped"]["rows"][0]["reason"]
    per_sample = pq.read_table(io.BytesIO(stage.read_bytes("difficulty", "per_sample.parquet"))).to_pylist()
    row = next(r for r in per_sample if r["id"] == corrupt["train"])
    assert not row["tracked"]
    assert row["difficulty"] == 0.0
    train_rows = [r for r in per_sample if r["split"] == "train"]
    assert sum(r["tracked"] for r in train_rows) >= len(train_rows) - 2  # all others (equal shards may drop 1)
    assert not any(r["tracked"] for r in per_sample if r["split"] == "val")
    # difficulty history per group, the same state on both workers (the loop checks the checksums every epoch)
    history = stage.read_json("difficulty", "history.json")
    assert [h["epoch"] for h in history] == [0, 1]
    assert [h["boosting"] for h in history] == [False, True]
    assert {g["group"] for g in history[-1]["groups"]} == {"lfw/real", "standin-pca/fake", "standin-blur/fake",
                                                           "standin-noise/fake"}
    assert metrics["state_checksum"] == metrics["history"][-1]["state_checksum"]
    report = stage.read_text("report.html")
    assert "Mean tracked difficulty m" in report
    assert "data:image/png;base64" in report
    assert corrupt["train"] in report
    runs = stage_root.child("checkpoints", stage_root.list("checkpoints")[0], "run")
    assert any(name.startswith("checkpoint_") for name in runs.list()), (stage_root.list("checkpoints"), runs.list(),
                                                                        stage_root.find("checkpoints"))
    assert marker(stage_root.uri())["outputs"] == {"model": "model"}
    # resuming that run's checkpoint under another config: a clear error before any worker starts
    checkpoint = runs.uri(next(n for n in runs.list() if n.startswith("checkpoint_")))
    other = cfg.model_copy(update={"stage": "other", "lr": 0.01, "resume_from": checkpoint})
    with pytest.raises(ModelError, match=f"checkpoint {checkpoint} was written by a different config "
                                         r"\(config.lr: 0.001 there, 0.01 here\)"):
        run_job(other)
    with pytest.raises(DataError, match="no fingerprint.json there"):
        run_job(other.model_copy(update={"resume_from": stage_root.uri("checkpoints")}))
    model, spec = load_detector(stage_root.uri())
    assert spec.training is not None
    assert spec.training.split == SPLIT
    assert spec.input_size == 16
    import torch

    assert fake_probability(model, torch.zeros(2, 3, 16, 16)).shape == (2,)

    ev = validate_config(EvaluateDetectorConfig, {
        "output_root": s3_root, "stage": "evaluate", "detectors": [{"name": "boost", "uri": stage_root.uri()}],
        "test_sets": [{"name": "faces", "uri": data.uri()}], "runtime": {"num_actors": 2},
        "robustness": {"jpeg_quality": [50], "blur_sigma": [1.5]}}, "test")
    result = run_job(ev)
    columns = ["standin-blur", "standin-noise", "standin-pca", "lfw"]
    assert sorted(result["columns"]) == sorted(columns)
    assert result["conditions"] == ["clean", "jpeg50", "blur1.5"]
    for col in columns:
        cell = result["matrix"]["boost"][col]
        for cond in result["conditions"]:
            assert 0.0 <= cell[cond]["auc"] <= 1.0
            assert cell[cond]["n_real"] > 0
            assert cell[cond]["n_fake"] > 0
    assert result["dropped"]["count"] == 1
    assert result["dropped"]["rows"][0]["id"] == corrupt["test"]
    assert set(result["seen_in_training"]["boost"]) == set(columns)  # every column came from the training data
    assert result["split"] == SPLIT  # taken from the detector
    out = committed(Storage(s3_root).uri("evaluate"))
    md = out.read_text("results.md")
    assert "## AUC (clean)" in md
    assert "| boost |" in md
    assert "## AUC under jpeg50" in md
    assert out.read_bytes("roc", "boost.png").startswith(b"\x89PNG")
    assert "boost: mean difficulty (EMA of the loss)" in out.read_text("report.html")
    scores = pq.read_table(io.BytesIO(out.read_bytes("scores.parquet")))
    assert scores.num_rows == result["test_images"]
    assert "boost|clean" in scores.column_names
    assert corrupt["test"] not in scores.column("id").to_pylist()


def _run_dir(checkpoints: Path) -> Path:
    """The Ray Train run folder of the (only) config under <stage>/checkpoints/."""
    found = sorted(checkpoints.glob("*/run"))
    return found[0] if found else checkpoints / "none" / "run"


def _registered(run_dir: Path) -> list[dict]:
    """Checkpoints Ray Train has registered in its run snapshot (a restarted run resumes from the latest)."""
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its session, like a lost client machine."""
    import psutil

    members = [p for p in psutil.process_iter(["pid"]) if _sid(p.pid) == proc.pid]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for p in members:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


@pytest.mark.slow
def test_killed_after_a_checkpoint_then_rerun_resumes_with_the_difficulty_state(ray_session, tmp_path):
    """The driver is SIGKILLed once Ray Train has registered a checkpoint; its Train workers die with it (they are
    owned by its job). A rerun of the same command resumes from the latest registered checkpoint."""
    data = Storage(str(tmp_path)).child("faces")
    write_parquet(standin_table(FACES), data, "part-0.parquet")
    epochs = 4
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**TINY_TRAINING, "output_root": str(tmp_path / "runs"), "epochs": epochs,
                                      "runtime": {**TINY_TRAINING["runtime"], "max_failures": 1},
                                      "sources": [{"name": "faces", "uri": data.uri()}]}))
    exe = str(Path(sys.executable).with_name("scopeforge"))
    stage = tmp_path / "runs" / "train-detector"
    checkpoints = stage / "checkpoints"  # <config hash>/run below it
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([exe, "run", "train-detector", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and not _registered(_run_dir(checkpoints)):
            time.sleep(0.1)
        run_dir = _run_dir(checkpoints)
        assert _registered(run_dir), f"no checkpoint registered: {(tmp_path / 'first.log').read_text()[-3000:]}"
    finally:
        _kill_session(proc)
        log.close()
    assert not (stage / "_SUCCESS").exists(), "the run finished before it could be killed"
    import torch

    latest = max(_registered(run_dir), key=lambda c: c["metrics"]["epoch"])  # what a restart can see
    at_kill = torch.load(run_dir / latest["checkpoint_dir_name"] / "state.pt", weights_only=True)
    assert at_kill["epoch"] == latest["metrics"]["epoch"] < epochs - 1

    rerun = subprocess.run([exe, "run", "train-detector", "--config", str(config)], capture_output=True, text=True,
                           cwd=ROOT, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    (tmp_path / "rerun.log").write_text(rerun.stdout + rerun.stderr)
    metrics = committed(stage).read_json("metrics.json")
    assert metrics["resumed_at_epoch"] == at_kill["epoch"] + 1, rerun.stdout[-3000:]
    assert f"resuming after epoch {at_kill['epoch'] + 1} of {epochs}" in rerun.stdout + rerun.stderr
    assert [h["epoch"] for h in metrics["history"]] == list(range(epochs))
    k = at_kill["epoch"] + 1
    assert metrics["history"][:k] == at_kill["history"]  # the epochs before the crash, as checkpointed
    assert metrics["difficulty_history"][:k] == at_kill["booster"]["history"]
    # the difficulty state went on from the checkpoint: samples tracked before the kill stay tracked
    final = pq.read_table(committed_path(stage) / "difficulty" / "per_sample.parquet").column("tracked").to_numpy()
    assert final[at_kill["booster"]["difficulty"]["seen"].numpy()].all()
