"""Stage writes that survive a crash and a concurrent attempt, as users hit them: the CLI killed with SIGKILL after
part of a job's output is written, then run again; two runs of one stage at the same time.

A kill leaves an uncommitted attempt folder (here also with a temporary file, as a write cut short leaves); the rerun
is a new attempt and must count and write every input row exactly once (curate: re-scoring only the pieces whose
score shards were not committed, with the same result as an uninterrupted run). Of two concurrent runs exactly one
commits; the other fails with the lease error. curate runs on local disk, curate-images and the concurrent runs on
moto's S3 server.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shared.data import read_table
from shared.stage import stage_metrics
from shared.storage import Storage
from tests.conftest import ROOT, marker

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXE = str(Path(sys.executable).with_name("scopeforge"))


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([EXE, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True, env={**os.environ, **env})


def _kill_when(proc: subprocess.Popen, log: Path, ready, timeout: float = 400) -> None:
    """SIGKILL the run (its whole process group: a crash, no cleanup) as soon as ``ready()`` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    assert ready(), f"nothing written in {timeout} s:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _shards(store: Storage, stage: str, folder: str) -> list[str]:
    return [f for f in store.find(stage, "attempts") if f"/{folder}/" in f and f.endswith(".parquet")]


def _score_shards(store: Storage) -> list[str]:
    return [f for f in store.find("curate", "checkpoints") if "/scores/" in f and f.endswith(".parquet")]


def test_a_killed_curate_rerun_scores_only_the_missing_pieces_and_matches_an_uninterrupted_run(
        ray_session, tmp_path, tiny_llama_dir):
    words = "the orbit of the moon and the launch of a rocket into space with a crew of three and a dog".split()
    rng = random.Random(0)
    rows = [{"id": f"d{i:04d}", "text": " ".join(rng.choice(words) for _ in range(30)), "label": "ab"[i % 2]}
            for i in range(200)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {
        "model": "tiny-llama", "corpus": str(tmp_path / "corpus.jsonl"), "seeds": ["the orbit of the moon"],
        "max_tokens": 32, "target_label": "a", "retrieval": {"m": 20},
        "coordinates": {"k": 16, "reference_docs": 4, "reference_tokens": 24}, "baselines": ["random"],
        "sae": {"train_docs": 24, "steps": 20, "expansion": 4, "k": 4}, "runtime": {"piece_docs": 4}}
    config = tmp_path / "curate.yaml"
    config.write_text(json.dumps({**settings, "output_root": str(tmp_path / "run")}))
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    store = Storage(str(tmp_path / "run"))

    first = _start(["run", "curate", "--config", str(config)], tmp_path / "first.log", env)
    _kill_when(first, tmp_path / "first.log", lambda: len(_score_shards(store)) >= 3)
    # the driver is gone; actors of the shared cluster may still finish the pieces they hold: wait until they stop
    seen, quiet = -1, 0
    while quiet < 6:
        now = len(_score_shards(store))
        quiet = quiet + 1 if now == seen else 0
        seen = now
        time.sleep(0.5)
    assert not store.exists("curate", "_SUCCESS")
    (crashed,) = store.list("curate", "attempts")
    committed_rows = sum(pq.read_metadata(f).num_rows for f in _score_shards(store))
    assert 0 < committed_rows < len(rows)  # part of the corpus was scored
    shard = Path(_score_shards(store)[0])
    shard.with_name(shard.name + ".tmp-0000dead").write_bytes(shard.read_bytes()[:100])  # a write cut short

    rerun = subprocess.run([EXE, "run", "curate", "--config", str(config)], capture_output=True, text=True,
                           cwd=ROOT, timeout=600, env={**os.environ, **env})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    metrics = stage_metrics(store.uri("curate"))
    assert metrics["corpus"]["rows"] == metrics["corpus"]["scored"] == len(rows)
    assert metrics["corpus"]["target_documents"] == len(rows) // 2
    assert metrics["scale"]["resumed_pieces"] >= 3
    assert metrics["scale"]["rescored_documents"] == len(rows) - committed_rows  # only the missing pieces
    assert store.list("curate", "attempts") == [marker(store.uri("curate"))["attempt"]] != [crashed]

    config.write_text(json.dumps({**settings, "output_root": str(tmp_path / "uninterrupted")}))
    whole = subprocess.run([EXE, "run", "curate", "--config", str(config)], capture_output=True, text=True,
                           cwd=ROOT, timeout=600, env={**os.environ, **env})
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    resumed = read_table(store.uri("curate"))
    uninterrupted = read_table(str(tmp_path / "uninterrupted" / "curate"))
    assert resumed.num_rows == 20
    assert resumed.equals(uninterrupted)  # the same rows, scores and order
    again = stage_metrics(str(tmp_path / "uninterrupted" / "curate"))
    assert again["retrieval"] == metrics["retrieval"]
    assert again["sae"]["fvu"] == metrics["sae"]["fvu"]


def _noise_png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.s3
def test_a_killed_curate_images_rerun_on_s3_writes_every_image_once(ray_session, s3_root, tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    manifest = pa.table({"id": [f"img{i:04d}" for i in range(n)],
                         "prompt": [f"a portrait number {i}" for i in range(n)],
                         "image": [_noise_png(rng) for _ in range(n)]})
    store = Storage(s3_root)
    buffer = io.BytesIO()
    pq.write_table(manifest, buffer)
    store.write_bytes(buffer.getvalue(), "collection", "manifest.parquet")
    args = ["run", "curate-images", "--set", f"output_root={s3_root}/run", "--set",
            f"manifest={s3_root}/collection/manifest.parquet", "--set", "name=noise", "--set", "columns.image=image",
            "--set", "min_side=32", "--set", "output.size=32", "--set", "runtime.batch_size=4", "--set",
            "runtime.cpus_per_task=3",
            "--set", "dedup_distance=0"]
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    run = Storage(f"{s3_root}/run")

    first = _start(args, tmp_path / "first.log", env)
    _kill_when(first, tmp_path / "first.log", lambda: len(_shards(run, "curate-images", "images")) >= 2)
    assert not run.exists("curate-images", "_SUCCESS")
    first_shard = _shards(run, "curate-images", "images")[0][len(f"{s3_root}/run/"):]
    run.write_bytes(run.read_bytes(first_shard)[:64], first_shard.rsplit("/", 1)[0], "part-99999-cut.parquet")

    rerun = subprocess.run([EXE, *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                           env={**os.environ, **env})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    metrics = stage_metrics(run.uri("curate-images"))
    images = read_table(run.uri("curate-images"))
    ids = images.column("id").to_pylist()
    assert metrics["rows"] == n
    assert metrics["kept"] + metrics["dropped"] == n
    assert len(ids) == len(set(ids)) == metrics["kept"] > n // 2


@pytest.mark.s3
def test_of_two_concurrent_runs_of_one_stage_exactly_one_commits(ray_session, s3_root, tmp_path, tiny_llama_dir):
    """The second run starts once the first holds the lease and is working: the first then can no longer commit
    (or, when the first committed before the second got going on a loaded machine, the second skips the done stage).
    Never do both commit."""
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    args = ["run", "inspect-model", "--set", f"output_root={s3_root}", "--set", "model=tiny-llama",
            "--set", "max_new_tokens=512"]
    store = Storage(s3_root)
    runs = [_start(args, tmp_path / "run0.log", env)]
    deadline = time.time() + 120
    while time.time() < deadline and not store.exists("inspect-model", "_LEASE"):
        assert runs[0].poll() is None, (tmp_path / "run0.log").read_text()[-3000:]
        time.sleep(0.05)
    runs.append(_start(args, tmp_path / "run1.log", env))
    codes = [p.wait(timeout=600) for p in runs]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    winner = marker(f"{s3_root}/inspect-model")
    assert Storage(s3_root).list("inspect-model", "attempts") == [winner["attempt"]]
    if sorted(codes) == [0, 0]:
        assert "already done for this config" in logs[1], logs
        assert winner["attempt"] in logs[0]
        return
    assert sorted(codes) == [0, 2], logs
    loser = logs[codes.index(2)]
    errors = [line for line in loser.splitlines() if line.startswith("scopeforge: error: ")]
    assert len(errors) == 1, loser[-3000:]
    assert "lost its lease" in errors[0] or "committed it first" in errors[0], loser[-3000:]
    assert winner["attempt"] in logs[codes.index(0)]
