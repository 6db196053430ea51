"""Where workers compute: the device decision, thread counts, and a GPU request that cannot be honoured.

The rules are unit-tested as functions (shared/placement.py). End to end, every stage records where each kind of
worker computed (metrics.json "placement"), and a worker that reserved a GPU but sees no CUDA device fails with one
line rather than computing on the CPU: on a Ray head that declares a GPU this CPU machine does not have, for a Ray
Data actor (evaluate) and a Ray Train worker (prune); on the local instance, which has no GPU, before any work.
The GPU paths themselves run in tests/test_gpu_paths.py when CUDA exists."""

from __future__ import annotations

import json

import pytest

from shared.placement import PlacementError, choose_device, cpu_quota, thread_count
from tests.conftest import run_cli
from tests.ray_head import RayHead


def test_the_device_follows_the_request():
    assert choose_device("evaluate", "actor", 0, visible_gpus=0, assigned_gpu_ids=[]) == "cpu"
    assert choose_device("evaluate", "actor", 0, visible_gpus=2, assigned_gpu_ids=[]) == "cpu"  # none requested
    assert choose_device("evaluate", "actor", 1, visible_gpus=1, assigned_gpu_ids=["3"]) == "cuda:0"
    assert choose_device("prune", "worker", 1, visible_gpus=2, assigned_gpu_ids=["0", "1"], local_index=1) == "cuda:1"
    with pytest.raises(PlacementError) as error:
        choose_device("evaluate", "evaluation actor", 0.5, visible_gpus=0, assigned_gpu_ids=["0"])
    message = str(error.value)
    assert message.startswith("stage evaluate: its evaluation actor requested 0.5 GPU(s) but sees no CUDA device")
    assert "Ray assigned GPU ids 0" in message
    assert "will not compute on the CPU" in message
    assert "\n" not in message


def test_threads_follow_the_reserved_cpus_not_the_node():
    assert thread_count(assigned_cpus=0.5, explicit=None, cores=16) == 1
    assert thread_count(assigned_cpus=4.0, explicit=None, cores=16) == 4
    assert thread_count(assigned_cpus=32.0, explicit=None, cores=8) == 8  # capped by the usable cores
    assert thread_count(assigned_cpus=2.0, explicit=6, cores=8) == 6
    assert thread_count(assigned_cpus=None, explicit=None, cores=3) == 3  # outside Ray: every usable core


def test_container_cpu_quota_from_cgroup_files(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cpu_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == 1.5


def _one_line(result, expected):
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("scopeforge: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert expected in lines[0], result.stderr[-3000:]


@pytest.mark.ray
def test_a_gpu_request_the_local_instance_cannot_meet_fails_before_any_work(tmp_path, tiny_llama_dir):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "an orbit around the moon"}) + "\n")
    result = run_cli("run", "evaluate", "--set", f"output_root={tmp_path / 'run'}", "--set", "models={t: tiny-llama}",
                     "--set", f"datasets={{d: {tmp_path / 't.jsonl'}}}", "--set", "runtime.gpus_per_actor=1")
    _one_line(result, "stage evaluate requests 1 GPU(s) per worker, but the local Ray instance has 0")
    assert not (tmp_path / "run" / "evaluate").exists()  # refused before the stage was opened


@pytest.fixture(scope="module")
def gpu_head():
    head = RayHead.start(num_gpus=1)
    try:
        yield head
    finally:
        head.stop()


@pytest.mark.ray
@pytest.mark.slow
def test_workers_that_reserved_a_gpu_they_cannot_see_fail_with_one_line(gpu_head, tmp_path, tiny_llama_dir):
    env = {"RAY_ADDRESS": gpu_head.gcs_address, "RAY_AUTH_TOKEN": gpu_head.token, "RAY_AUTH_MODE": "token"}
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"the orbit of moon {i} and its launch window"})
                                              + "\n" for i in range(8)))
    actor = run_cli("run", "evaluate", "--set", f"output_root={tmp_path / 'run'}", "--set", "models={t: tiny-llama}",
                    "--set", f"datasets={{d: {tmp_path / 't.jsonl'}}}", "--set", "runtime.gpus_per_actor=1",
                    env=env, timeout=300)
    _one_line(actor, "stage evaluate: its evaluation actor requested 1 GPU(s) but sees no CUDA device")
    worker = run_cli("run", "prune", "--set", f"output_root={tmp_path / 'run'}", "--set", "model=tiny-llama",
                     "--set", f"calibration={tmp_path / 't.jsonl'}", "--set", "min_examples=4", "--set",
                     "runtime.use_gpu=true", "--set", "runtime.cpus_per_worker=1", "--set", "sample_prompt=", env=env,
                     timeout=300)
    _one_line(worker, "stage prune: its importance worker requested 1 GPU(s) but sees no CUDA device")
