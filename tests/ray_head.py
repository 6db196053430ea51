"""A real local Ray head with its dashboard (the Jobs API) and metrics endpoint, every socket on 127.0.0.1.

Started as ``ray start --head --block`` in its own process group with free ports and a private temp dir, with
Ray 2.60 token authentication on (RAY_AUTH_MODE=token and a random RAY_AUTH_TOKEN), and stopped by signalling that
process group only: never ``ray stop``, which would stop every Ray instance on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "metrics-export-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")


@dataclass
class RayHead:
    process: subprocess.Popen
    ports: dict[str, int]
    token: str
    temp_dir: Path
    log: Path

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics-export-port']}/metrics"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    @classmethod
    def start(cls, timeout: float = 90.0, num_gpus: int = 0) -> RayHead:
        """``num_gpus``: GPUs the head declares (a logical resource: on a machine without CUDA, a worker that takes
        one sees no device, as on a node whose CUDA driver or torch build is broken)."""
        venv_bin = str(Path(sys.executable).parent)
        ports = {flag: free_port() for flag in PORT_FLAGS}
        token = secrets.token_hex(16)
        temp_dir = Path(tempfile.mkdtemp(prefix="sfh-", dir="/tmp"))  # short: Ray's unix sockets live here
        log = temp_dir / "head.log"
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                   PATH=f"{venv_bin}:{os.environ.get('PATH', '')}",  # jobs run `scopeforge` from this venv
                   RAY_metrics_report_interval_ms="500", RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        cmd = [f"{venv_bin}/ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "4",
               "--object-store-memory", str(400 * 1024 * 1024), "--temp-dir", str(temp_dir),
               "--min-worker-port", "0", "--max-worker-port", "0", "--num-gpus", str(num_gpus)]
        for flag, port in ports.items():
            cmd += [f"--{flag}", str(port)]
        process = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        head = cls(process, ports, token, temp_dir, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                head.stop()
                raise RuntimeError(f"ray start exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                request = urllib.request.Request(head.address + "/api/version",
                                                 headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(request, timeout=2).read()
                return head
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        head.stop()
        raise RuntimeError(f"the Ray dashboard did not answer in {timeout} s: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM to the head's process group, then SIGKILL whatever is left of that group."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
