"""Jobs on the session's local Ray, with the run root on the S3 endpoint."""

from __future__ import annotations

import pytest

from ray_jobs.runtime import run_job
from shared.config import load_config
from shared.configs.inspect_model import InspectModelConfig
from shared.errors import UserError
from shared.storage import Storage
from tests.conftest import committed

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def test_inspect_model_writes_stage_to_s3_and_skips_rerun(ray_session, s3_root, tiny_llama_dir):
    cfg = load_config(InspectModelConfig, None, [f"output_root={s3_root}", "model=tiny-llama", "max_new_tokens=3"])
    metrics = run_job(cfg)
    store = Storage(s3_root)
    attempt = committed(store.uri("inspect-model"))
    assert attempt.read_json("metrics.json")["parameters"] == metrics["parameters"]
    assert store.exists("inspect-model", "_SUCCESS")
    assert attempt.exists("architecture.txt")
    marker = store.read_json("inspect-model", "_SUCCESS")
    assert run_job(cfg) == metrics  # skipped: same config, same marker
    assert store.read_json("inspect-model", "_SUCCESS") == marker
    changed = cfg.model_copy(update={"max_new_tokens": 2})
    run_job(changed)
    assert store.read_json("inspect-model", "_SUCCESS")["config_hash"] != marker["config_hash"]
    assert store.list("inspect-model", "attempts") == [store.read_json("inspect-model", "_SUCCESS")["attempt"]]


def test_memory_root_is_refused_for_ray_jobs():
    with pytest.raises(UserError, match="memory:// is visible to one process only"):
        run_job(InspectModelConfig(output_root="memory://x"))
