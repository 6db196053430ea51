"""Multi-node Ray clusters on this machine, loopback only, for the curate scale tests (run as a child process).

    python -m tests.multinode two-node  <work dir> <config.json>   # ray.cluster_utils.Cluster with 2 nodes
    python -m tests.multinode autoscale <work dir> <config.json>   # AutoscalingCluster: 0 -> n -> 0 worker nodes

Each prints one ``RESULT {json}`` line. Importing this module sets, before Ray is imported, what makes every node
advertise and bind 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and a private auth token (``ray start
--head`` turns token authentication on; the driver must present the same token).

Ray's ``AutoscalingCluster`` as shipped is unusable on a shared machine: its ``start()`` and ``shutdown()`` run
``ray stop --force`` (every Ray process of every user), it uses the default temp dir and GCS port 6379, and the
fake provider's ``example.yaml`` that it opens is missing from the 2.60 wheel. :class:`LocalAutoscalingCluster`
starts the head on its own port and temp dir with a full config, and stops only its own processes, by pid.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.pop("RAY_ADDRESS", None)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import AutoscalingCluster, Cluster  # noqa: E402

LOOPBACK = "127.0.0.1"
RAY_CLI = str(Path(sys.executable).with_name("ray"))
MB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def own_processes(marks: list[str]) -> list[psutil.Process]:
    """Processes whose command line names one of ``marks`` (a temp dir, a GCS address), and their children."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(m in arg for arg in p.info["cmdline"] or [] for m in marks):
                found[p.pid] = p
                found.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def stop(processes: list[psutil.Process], grace: float = 2.0) -> None:
    for p in processes:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def non_loopback_listeners(processes: list[psutil.Process]) -> list[str]:
    """``name:ip:port`` of every TCP LISTEN socket of ``processes`` not on loopback (::ffff:127.0.0.1 is)."""
    bad = []
    for p in processes:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status != psutil.CONN_LISTEN:
                    continue
                addr = ipaddress.ip_address(c.laddr.ip)
                if not (getattr(addr, "ipv4_mapped", None) or addr).is_loopback:
                    bad.append(f"{p.name()}:{c.laddr.ip}:{c.laddr.port}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return bad


def worker_nodes() -> int:
    """Alive nodes that offer CPUs (the heads here offer none)."""
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)


class NodeCount(threading.Thread):
    """Records the number of alive worker nodes every half second: (seconds, count) at each change."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.started, self.trajectory, self.done = time.monotonic(), [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                n = worker_nodes()
            except Exception:  # the driver is disconnecting
                n = None
            if n is not None and (not self.trajectory or self.trajectory[-1][1] != n):
                self.trajectory.append((round(time.monotonic() - self.started, 1), n))
            self.done.wait(0.5)


FAKE_PROVIDER = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True}


class LocalAutoscalingCluster(AutoscalingCluster):
    """AutoscalingCluster (autoscaler v1, the fake multi-node provider) on its own port and temp dir."""

    def __init__(self, head: dict[str, Any], workers: dict[str, Any], idle_timeout_minutes: float):
        self.port, self.temp_dir = free_port(), tempfile.mkdtemp(prefix="sfas_", dir="/tmp")  # short: Unix sockets
        super().__init__(head, workers, idle_timeout_minutes=idle_timeout_minutes)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _generate_config(self, head_resources: dict[str, Any], worker_node_types: dict[str, Any],
                         autoscaler_v2: bool = False, **extra: Any) -> dict[str, Any]:
        nodes = {**worker_node_types, "ray.head.default": {"resources": head_resources, "node_config": {},
                                                           "max_workers": 0}}
        return {"cluster_name": "scopeforge-test", "max_workers": sum(t["max_workers"] for t in worker_node_types
                                                                      .values()),
                "provider": {**FAKE_PROVIDER, "gcs_address": self.address}, "available_node_types": nodes,
                "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "docker": {},
                "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
                "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
                "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
                "rsync_exclude": [], "rsync_filter": [], **extra}

    def start(self, _system_config: Any = None, override_env: Any = None, extra_args: Any = ()) -> None:
        config = Path(self.temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(self._config))
        head = dict(self._head_resources)
        cmd = [RAY_CLI, "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
               f"--autoscaling-config={config}", "--include-dashboard=false", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--num-cpus={head.pop('CPU', 0)}", f"--object-store-memory={head.pop('object_store_memory')}"]
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
               "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())}
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        ray._private.services.find_gcs_addresses.cache_clear()

    def processes(self) -> list[psutil.Process]:
        return own_processes([self.temp_dir, f"--address={self.address}", f"--gcs-address={self.address}"])

    def shutdown(self) -> None:
        stop(self.processes())


def run_curate(config: dict[str, Any], address: str) -> dict[str, Any]:
    from ray_jobs.runtime import run_job
    from shared.config import validate_config
    from shared.configs.curate import CurateConfig

    return run_job(validate_config(CurateConfig, config, "multinode test"), ray_address=address)


def two_node(work: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A 0-CPU head and two 2-CPU nodes: curate with two actors of 1.5 CPUs (so one per node)."""
    temp = tempfile.mkdtemp(prefix="sf2n_", dir="/tmp")
    cluster = Cluster()
    try:
        from unittest import mock

        with mock.patch.object(ray._private.utils, "write_ray_address", lambda *a, **k: None):
            # (add_node would write /tmp/ray/ray_current_cluster, where other users' ray.init() would find it)
            cluster.add_node(num_cpus=0, object_store_memory=200 * MB, temp_dir=temp, include_dashboard=False,
                             dashboard_agent_listen_port=free_port())
        for _ in range(2):
            cluster.add_node(num_cpus=2, object_store_memory=200 * MB)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        metrics = run_curate({**config, "output_root": str(work / "two")}, cluster.address)
        listeners = non_loopback_listeners(own_processes([temp]) + [psutil.Process()])
        return {"metrics": metrics, "non_loopback": listeners, "worker_nodes": worker_nodes()}
    finally:
        ray.shutdown()
        cluster.shutdown()
        stop(own_processes([temp]))


def autoscale(work: Path, config: dict[str, Any]) -> dict[str, Any]:
    """A head with no CPUs for work, one worker type (2 CPUs, 0..2 nodes, 6 s idle timeout): curate from zero
    worker nodes; the trajectory of worker nodes until they are gone again."""
    cluster = LocalAutoscalingCluster(
        {"CPU": 0, "object_store_memory": 200 * MB},
        {"cpu_node": {"resources": {"CPU": 2, "object_store_memory": 200 * MB}, "node_config": {},
                      "min_workers": 0, "max_workers": 2}}, idle_timeout_minutes=0.1)
    cluster.start()
    counter = NodeCount()
    try:
        ray.init(address=cluster.address)
        at_start = worker_nodes()
        counter.start()
        metrics = run_curate({**config, "output_root": str(work / "run")}, cluster.address)
        listeners = non_loopback_listeners(cluster.processes() + [psutil.Process()])
        finished = time.monotonic() - counter.started
        deadline = time.monotonic() + 90
        while worker_nodes() and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(1)
        counter.done.set()
        counter.join(5)
        return {"metrics": metrics, "at_start": at_start, "trajectory": counter.trajectory,
                "finished_at": round(finished, 1), "non_loopback": listeners}
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    scenario, work, config = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    result = {"two-node": two_node, "autoscale": autoscale}[scenario](work, config)
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
