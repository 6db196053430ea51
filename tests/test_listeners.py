"""The local Ray instance a scopeforge run starts listens on 127.0.0.1 only, and keeps token authentication on.

A child process does what `scopeforge run` does (a job module imports ray and ray.data before the runtime starts
Ray), without the RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 that this test session sets for itself. It starts the local
instance with its dashboard, runs a task, an actor pool and a two-worker Ray Train group with a gloo process group,
and holds them while this test lists the listening sockets of the child and of every process below it (GCS,
raylet, dashboard and its agents, workers, Train workers, the torch rendezvous store) with psutil.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import ROOT

pytestmark = [pytest.mark.ray]

CHILD = r'''
import json, os, sys, time
from pathlib import Path

import ray_jobs.curate  # noqa: F401  (imports ray and ray.data before Ray starts, as the CLI does)
import ray, ray.data, ray.train
from ray.train.torch import TorchTrainer
from ray_jobs.runtime import init_ray
from ray_jobs.process_group import LoopbackTorchConfig

signal = Path(sys.argv[1])
init_ray(dashboard=True)


class Echo:
    def __call__(self, batch):
        return batch


ray.data.range(64).map_batches(Echo, compute=ray.data.ActorPoolStrategy(size=1), batch_size=8,
                               num_cpus=0.5).take_all()


def loop(config):
    import torch
    import torch.distributed as dist

    value = torch.ones(1)
    dist.all_reduce(value)  # the process group works over loopback
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["signal"] + ".train").write_text(str(float(value)))
    while not Path(config["signal"] + ".go").exists():
        time.sleep(0.2)


trainer = TorchTrainer(loop, train_loop_config={"signal": str(signal)}, torch_config=LoopbackTorchConfig(),
                       scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                       run_config=ray.train.RunConfig(storage_path=str(signal.parent / "ray_train")))
node = ray._private.worker.global_worker.node
signal.write_text(json.dumps({"node_ip": ray.util.get_node_ip_address(),
                              "advertised": [n["NodeManagerAddress"] for n in ray.nodes()],
                              "dashboard": node.address_info["webui_url"]}))
trainer.fit()
'''


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _listening(root: psutil.Process) -> list[tuple[str, int, str, int]]:
    """(address, port, process name, pid) of every listening TCP socket of ``root`` and its descendants."""
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            sockets = proc.net_connections(kind="inet")
            name = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(s.laddr.ip, s.laddr.port, name, proc.pid) for s in sockets if s.status == psutil.CONN_LISTEN]
    return found


def test_a_local_run_listens_on_loopback_only_and_needs_the_token(tmp_path):
    signal = tmp_path / "ready.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(signal)], cwd=ROOT, env=env,
                             stdout=open(tmp_path / "child.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not Path(str(signal) + ".train").exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            time.sleep(0.2)
        assert Path(str(signal) + ".train").read_text() == "2.0"  # both Train workers joined the group
        info = json.loads(signal.read_text())
        time.sleep(1.0)  # let every agent finish binding
        sockets = _listening(psutil.Process(child.pid))
        names = {name for _, _, name, _ in sockets}
        assert {"gcs_server", "raylet"} <= names, names
        assert any("RayTrainWo" in n for n in names), names
        exposed = [s for s in sockets if not _loopback(s[0])]
        assert exposed == [], f"listening beyond loopback: {exposed}"
        assert info["node_ip"] == "127.0.0.1"
        assert set(info["advertised"]) == {"127.0.0.1"}
        # token authentication stays on: the dashboard's API refuses a request without the token
        response = requests.get(f"http://{info['dashboard']}/api/jobs/", timeout=10)
        assert response.status_code == 401, response.text[:200]
    finally:
        Path(str(signal) + ".go").write_text("go")
        try:
            child.wait(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
    assert child.returncode == 0, (tmp_path / "child.log").read_text()[-3000:]
