"""Shared fixtures: offline settings, a real S3 endpoint (moto's server, credentials enforced), one local Ray.

Everything listens on 127.0.0.1. Order matters: the S3 variables are in the environment before Ray starts, so Ray
workers inherit them the way pods inherit them from a Secret.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MATERIAL = ROOT.parent / "shared"

# Offline, loopback-only, small object store; a cache of converted models private to this test session.
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    SCOPEFORGE_OBJECT_STORE_MB="1024",
    RAY_DEDUP_LOGS="0",
    TOKENIZERS_PARALLELISM="false",
    PYTHONUNBUFFERED="1",
)
os.environ.pop("RAY_ADDRESS", None)
_CACHE = Path(tempfile.mkdtemp(prefix="scopeforge-test-cache-"))
os.environ["SCOPEFORGE_CACHE"] = str(_CACHE)
for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
    os.environ.pop(var, None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    bucket: str

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server in its own process on 127.0.0.1, with IAM authentication enforced.

    The first three requests are unauthenticated (create a user, its key, its policy); every later request must be
    signed with that key, so wrong credentials really fail. The variables are exported for this process and Ray.
    """
    import boto3

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="scopeforge")
        key = iam.create_access_key(UserName="scopeforge")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="scopeforge", PolicyName="all", PolicyDocument=json.dumps(policy))
        server = S3Server(url, key["AccessKeyId"], key["SecretAccessKey"], "scopeforge-test")
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=server.access_key_id,
                     aws_secret_access_key=server.secret_access_key).create_bucket(Bucket=server.bucket)
        os.environ.update(server.env())
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole session (S3 variables already exported for its workers)."""
    import ray

    from ray_jobs.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama_dir() -> str:
    from shared.models import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture()
def s3_root(s3_server, request) -> str:
    """A fresh prefix in the test bucket."""
    name = request.node.name.replace("[", "-").replace("]", "")[:60]
    return f"s3://{s3_server.bucket}/{name}-{time.time_ns()}"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: the installed ``scopeforge`` entry point, in a subprocess."""
    exe = Path(sys.executable).with_name("scopeforge")
    assert exe.exists(), f"{exe} is missing: install the project (make install) before running the tests"
    return subprocess.run([str(exe), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, **(env or {})})


def committed(uri):
    """The committed attempt folder of the stage at ``uri`` (where its outputs, metrics.json and report are)."""
    from shared.stage import committed_folder
    from shared.storage import Storage

    return Storage(committed_folder(str(uri)))


def committed_path(path) -> Path:
    """``committed`` for a local stage folder, as a Path."""
    return Path(committed(path).path())


def marker(uri) -> dict:
    """The ``_SUCCESS`` marker of the stage at ``uri``."""
    from shared.storage import Storage

    return Storage(str(uri)).read_json("_SUCCESS")
