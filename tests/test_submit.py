"""`scopeforge submit / status / logs` against a real local Ray head (dashboard and Jobs API on 127.0.0.1, token
authentication on), and the job's metrics read back from the head's Prometheus endpoint."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

from tests.conftest import free_port, run_cli
from tests.ray_head import RayHead

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def head():
    head = RayHead.start()
    try:
        yield head
    finally:
        head.stop()


def one_line_error(result, expected):
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("scopeforge: error: "), result.stderr
    assert expected in lines[0], result.stderr
    return lines[0]


@pytest.mark.slow
def test_submit_a_real_job_then_status_logs_and_metrics(head, tmp_path, tiny_llama_dir):
    config = tmp_path / "inspect.yaml"
    config.write_text(f"model: tiny-llama\noutput_root: {tmp_path / 'run'}\nmax_new_tokens: 6\n"
                      "prompt: 'What costs $5?'\n")
    env = {"RAY_AUTH_TOKEN": head.token}
    # Gauges live as long as the worker that set them, so the endpoint is read all along the job's run.
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch_metrics():
        while not stop.is_set():
            for name, value in scrape(head).items():
                seen[name] = max(value, seen.get(name, value))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_metrics, daemon=True)
    watcher.start()
    submitted = run_cli("submit", "inspect-model", "--config", str(config), "--set", "stage=remote",
                        "--address", head.address, env=env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", job_id), submitted.stdout

    deadline = time.monotonic() + 300
    status = ""
    while time.monotonic() < deadline:
        result = run_cli("status", job_id, "--address", head.address, env=env, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        status = result.stdout.split()[1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    logs = run_cli("logs", job_id, "--address", head.address, env=env, timeout=60)
    assert status == "SUCCEEDED", logs.stdout[-3000:]
    assert "LlamaForCausalLM with" in logs.stdout
    assert "What costs $5?" in logs.stdout
    followed = run_cli("logs", job_id, "--follow", "--address", head.address, env=env, timeout=60)
    assert followed.returncode == 0
    assert "LlamaForCausalLM with" in followed.stdout
    # The job ran `scopeforge run inspect-model --config env:SCOPEFORGE_CONFIG` on the cluster: its stage is there.
    assert (tmp_path / "run" / "remote" / "_SUCCESS").is_file()

    # Its metrics, through ray.util.metrics, on the head's Prometheus endpoint (Ray adds the ray_ prefix): the
    # counter stays after the job; the gauges were there while its worker lived.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "ray_scopeforge_tokens_total" not in seen:
        time.sleep(0.5)
    stop.set()
    watcher.join(10)
    assert seen.get("ray_scopeforge_tokens_total", 0) >= 1, seen
    assert scrape(head).get("ray_scopeforge_tokens_total", 0) >= 1  # counters outlive the worker
    assert seen.get("ray_scopeforge_tokens_per_second", 0) > 0, seen
    assert seen.get("ray_scopeforge_progress") == 1.0, seen


def scrape(head) -> dict[str, float]:
    """scopeforge series of the inspect-model job's 'remote' stage in the Prometheus text format."""
    try:
        text = urllib.request.urlopen(head.metrics_url, timeout=5).read().decode()
    except OSError:
        return {}
    return {name: float(value) for name, labels, value in
            re.findall(r'^(ray_scopeforge_\w+)\{([^}]*)\} ([0-9.e+-]+)$', text, re.M)
            if 'job="inspect-model"' in labels and 'stage="remote"' in labels}


@pytest.mark.slow
def test_errors_are_one_line(head, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    token = {"RAY_AUTH_TOKEN": head.token}
    one_line_error(run_cli("status", "raysubmit_nope", "--address", head.address, env=token),
                   f"job 'raysubmit_nope': no such job on {head.address}")
    one_line_error(run_cli("logs", "raysubmit_nope", "--follow", "--address", head.address, env=token),
                   "no such job")
    unreachable = f"http://127.0.0.1:{free_port()}"
    one_line_error(run_cli("submit", "inspect-model", "--address", unreachable, env=token),
                   f"Ray at {unreachable}: cannot reach the Jobs API")
    one_line_error(run_cli("status", "raysubmit_x", "--address", head.address, env={"RAY_AUTH_TOKEN": ""}),
                   "authentication failed")
    one_line_error(run_cli("status", "raysubmit_x", "--address", head.address, env={"RAY_AUTH_TOKEN": "wrong"}),
                   "authentication failed")
    one_line_error(run_cli("status", "x", "--address", head.address,
                           env={"RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}),
                   f"RAY_AUTH_TOKEN_PATH {tmp_path / 'none'}: cannot read the token")
    path = tmp_path / "token"
    path.write_text(head.token + "\n")
    by_path = run_cli("status", "raysubmit_nope", "--address", head.address,
                      env={"RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": str(path)})
    one_line_error(by_path, "no such job")  # authenticated by the token file, then a clean 404
    one_line_error(run_cli("submit", "inspect-model", "--set", "modle=x", "--address", head.address, env=token),
                   "unknown key 'modle'")
    one_line_error(run_cli("submit", "inspect-model", "--address", "127.0.0.1:8265", env=token), "http(s)://")
