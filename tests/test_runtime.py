"""Jobs on the session's local Ray, with the run root on the S3 endpoint."""

from __future__ import annotations

import ipaddress

import psutil
import pytest

from ray_jobs.runtime import run_job
from shared.config import load_config
from shared.configs.inspect_model import InspectModelConfig
from shared.errors import UserError
from shared.storage import Storage

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def test_inspect_model_writes_stage_to_s3_and_skips_rerun(ray_session, s3_root, tiny_llama_dir):
    cfg = load_config(InspectModelConfig, None, [f"output_root={s3_root}", "model=tiny-llama", "max_new_tokens=3"])
    metrics = run_job(cfg)
    store = Storage(s3_root)
    assert store.read_json("inspect-model", "metrics.json")["parameters"] == metrics["parameters"]
    assert store.exists("inspect-model", "_SUCCESS") and store.exists("inspect-model", "architecture.txt")
    marker = store.read_json("inspect-model", "_SUCCESS")
    assert run_job(cfg) == metrics  # skipped: same config, same marker
    assert store.read_json("inspect-model", "_SUCCESS") == marker
    changed = cfg.model_copy(update={"max_new_tokens": 2})
    run_job(changed)
    assert store.read_json("inspect-model", "_SUCCESS")["config_hash"] != marker["config_hash"]


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_ray_listens_on_loopback_only(ray_session):
    mine = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
    exposed = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in mine
               and not _loopback(c.laddr.ip)]
    assert len(mine) > 3  # the raylet, the GCS and workers are ours
    assert not exposed, f"sockets not on loopback: {[(c.laddr, c.pid) for c in exposed]}"


def test_memory_root_is_refused_for_ray_jobs():
    with pytest.raises(UserError, match="memory:// is visible to one process only"):
        run_job(InspectModelConfig(output_root="memory://x"))
