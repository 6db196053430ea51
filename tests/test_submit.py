"""`scopeforge submit / status / logs / list / stop / delete` against a real local Ray head (dashboard and Jobs API
on 127.0.0.1, token authentication on), also through https:// (a TLS proxy with a self-signed certificate); the
logs a stage saves to storage (local disk and moto's S3), read back once the Jobs API no longer has them; and the
job's metrics read back from the head's Prometheus endpoint."""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import ssl
import threading
import time
import urllib.request

import pytest

from tests.conftest import free_port, run_cli
from tests.ray_head import RayHead

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def head(s3_server):
    head = RayHead.start()  # after s3_server: the head's workers get its AWS_* variables, as pods get a Secret
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

    labels_seen: dict[str, set[str]] = {}

    def watch_metrics():
        while not stop.is_set():
            for name, value in scrape(head, labels_seen).items():
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
    # The labels the Grafana dashboard groups and filters by are on the real series (tests/test_dashboard.py checks
    # the dashboard against metrics.EXPORTED and these Ray-added labels).
    from tests.test_dashboard import RAY_LABELS, dashboard_labels

    used = dashboard_labels()
    for name in ("ray_scopeforge_tokens_total", "ray_scopeforge_tokens_per_second", "ray_scopeforge_progress"):
        assert {"scopeforge_job", "stage", "SessionName"} <= labels_seen[name], labels_seen
        assert "job" not in labels_seen[name]
    assert used & RAY_LABELS <= set().union(*labels_seen.values()), labels_seen
    assert "WorkerId" in labels_seen["ray_scopeforge_tokens_per_second"]  # the per-worker panel's legend


def scrape(head, labels_seen: dict[str, set[str]] | None = None) -> dict[str, float]:
    """scopeforge series of the inspect-model job's 'remote' stage in the Prometheus text format; the label names
    of each series are added to ``labels_seen``."""
    try:
        text = urllib.request.urlopen(head.metrics_url, timeout=5).read().decode()
    except OSError:
        return {}
    found = {}
    for name, labels, value in re.findall(r'^(ray_scopeforge_\w+)\{([^}]*)\} ([0-9.e+-]+)$', text, re.M):
        if 'scopeforge_job="inspect-model"' in labels and 'stage="remote"' in labels:
            found[name] = float(value)
            if labels_seen is not None:
                labels_seen.setdefault(name, set()).update(re.findall(r'(\w+)="', labels))
    return found


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


# ---------------------------------------------------------------------------------------------------------------------
# Transport security: no token in clear text over the network; https:// with a private CA


@pytest.mark.parametrize("address", ["http://10.0.0.7:8265", "http://ray-head.example:8265", "http://[fd00::1]:8265"])
def test_a_token_is_not_sent_over_plain_http_to_another_host(address, tmp_path):
    result = run_cli("list", "--address", address, env={"RAY_AUTH_TOKEN": "secret", "HOME": str(tmp_path)})
    one_line_error(result, f"--address {address}: refusing to send the Ray token over plain http://")
    assert "secret" not in result.stderr


def test_the_transport_rule():
    from ray_jobs.submit import SubmissionError, check_transport

    for url in ("http://127.0.0.1:8265", "http://127.3.4.5:1", "http://localhost:8265", "http://[::1]:8265",
                "https://ray.example:443"):
        check_transport(url, sends_token=True)
    check_transport("http://10.0.0.7:8265", sends_token=False)  # nothing secret to send
    check_transport("http://10.0.0.7:8265", sends_token=True, insecure=True)  # the user said so
    with pytest.raises(SubmissionError, match="non-loopback"):
        check_transport("http://localhost.example:8265", sends_token=True)


def self_signed_certificate(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that is its own CA (cert.pem is then the CA bundle), and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scopeforge test dashboard")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class TLSProxy:
    """https://127.0.0.1:<port>, terminating TLS with the given certificate, in front of the head's plain dashboard
    port (as an ingress or a TLS-terminating sidecar would be)."""

    def __init__(self, target_port: int, cert: str, key: str):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # a client that does not trust the certificate hangs up here
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        pair = {tls: upstream, upstream: tls}
        try:
            while True:
                readable = [tls] if tls.pending() else select.select(list(pair), [], [], 60)[0]
                if not readable:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pair[sock].sendall(data)
        except OSError:
            return
        finally:
            tls.close()
            upstream.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
def test_https_with_a_ca_bundle(head, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    proxy = TLSProxy(head.ports["dashboard-port"], cert, key)
    try:
        address = f"https://127.0.0.1:{proxy.port}"
        token = {"RAY_AUTH_TOKEN": head.token}
        trusted = run_cli("list", "--address", address, "--ca-bundle", cert, env=token, timeout=60)
        assert trusted.returncode == 0, trusted.stderr[-2000:]
        unknown = run_cli("status", "raysubmit_nope", "--address", address, "--ca-bundle", cert, env=token)
        one_line_error(unknown, f"job 'raysubmit_nope': no such job on {address}")  # the API answered, over TLS
        one_line_error(run_cli("list", "--address", address, env=token), "TLS certificate is not trusted")
        one_line_error(run_cli("list", "--address", address, "--ca-bundle", str(tmp_path / "none.pem"), env=token),
                       "none.pem: no such file")
    finally:
        proxy.close()


# ---------------------------------------------------------------------------------------------------------------------
# list / stop / delete, entrypoint resources


@pytest.mark.slow
def test_list_stop_and_delete_and_entrypoint_resources(head, tmp_path):
    env = {"RAY_AUTH_TOKEN": head.token}
    config = tmp_path / "inspect.yaml"
    config.write_text(f"model: tiny-llama\noutput_root: {tmp_path / 'run'}\nmax_new_tokens: 2\n")
    # The head has no 'scopeforge_slot' resource: the driver cannot start, so the job stays PENDING (Ray queues even
    # a stop request until its driver is scheduled; the head's teardown ends it).
    submitted = run_cli("submit", "inspect-model", "--config", str(config), "--address", head.address,
                        "--entrypoint-num-cpus", "0.5", "--entrypoint-resource", "scopeforge_slot=1", env=env)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job_id = submitted.stdout.strip()
    time.sleep(3)  # long enough for a driver that could start to have started (then it would be RUNNING)

    listed = run_cli("list", "--address", head.address, env=env)
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith(job_id)]
    assert line.split()[1] == "PENDING"
    assert line.endswith("inspect-model (stage inspect-model)")

    one_line_error(run_cli("delete", job_id, "--address", head.address, env=env),
                   f"job '{job_id}' is PENDING: stop it first")

    # A running job (any entrypoint; the test submits it itself): stop, then delete.
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    job_id = jobs.submit_job(entrypoint="python -c 'import time; time.sleep(300)'")
    deadline = time.monotonic() + 60
    while str(jobs.get_job_status(job_id)).rsplit(".", 1)[-1] != "RUNNING":
        assert time.monotonic() < deadline, jobs.get_job_info(job_id)
        time.sleep(0.5)
    assert f"{job_id}  RUNNING" in run_cli("list", "--address", head.address, env=env).stdout
    stopped = run_cli("stop", job_id, "--wait", "--address", head.address, env=env, timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert stopped.stdout.strip() == f"{job_id} STOPPED"
    again = run_cli("stop", job_id, "--address", head.address, env=env)
    assert again.stdout.strip() == f"{job_id} STOPPED - already ended, nothing to stop"
    deleted = run_cli("delete", job_id, "--address", head.address, env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == f"{job_id} deleted"
    assert job_id not in run_cli("list", "--address", head.address, env=env).stdout
    one_line_error(run_cli("status", job_id, "--address", head.address, env=env), "no such job")
    one_line_error(run_cli("stop", "raysubmit_nope", "--address", head.address, env=env), "no such job")
    for bad, expected in ((["--entrypoint-resource", "slot"], "--entrypoint-resource slot: expected NAME=N"),
                          (["--entrypoint-resource", "GPU=1"], "use --entrypoint-num-cpus"),
                          (["--entrypoint-num-gpus", "-1"], "--entrypoint-num-gpus -1.0: must be >= 0"),
                          (["--working-dir", str(tmp_path / "none")], "no such directory")):
        one_line_error(run_cli("submit", "inspect-model", "--config", str(config), "--address", head.address,
                               *bad, env=env), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Local seed files (working_dir) and the logs a stage saves, read back after the Jobs API forgot the job


def wait_ended(head, job_id: str, env: dict[str, str]) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = run_cli("status", job_id, "--address", head.address, env=env).stdout.split()[1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"{job_id} did not end")


@pytest.mark.slow
@pytest.mark.s3
def test_a_working_dir_job_saves_its_logs_to_s3_and_logs_reads_them_without_the_cluster(head, tmp_path, s3_root,
                                                                                         tiny_llama_dir):
    env = {"RAY_AUTH_TOKEN": head.token}
    seeds = tmp_path / "seeds"
    shutil.copytree(tiny_llama_dir, seeds / "model")  # a local model folder: only the upload brings it to Ray
    config = tmp_path / "inspect.yaml"
    config.write_text(f"model: ./model\noutput_root: {s3_root}\nmax_new_tokens: 3\nprompt: 'Seeds?'\n")
    submitted = run_cli("submit", "inspect-model", "--config", str(config), "--set", "stage=seeded", "--address",
                        head.address, "--working-dir", str(seeds), "--wait", env=env, timeout=300)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.splitlines()[0]
    assert "LlamaForCausalLM with" in submitted.stdout

    from shared import stage_logs
    from shared.storage import Storage

    stage = Storage(f"{s3_root}/seeded")
    (attempt,) = stage_logs.attempts(stage)
    record = stage_logs.record(stage, attempt)
    assert record["submission_id"] == job_id
    assert record["outcome"] == "succeeded"
    assert record["attempt"] == stage.read_json("_SUCCESS")["attempt"]
    assert "driver.log" in record["files"]
    workers = [f for f in record["files"] if f.startswith("nodes/")]
    assert workers, record
    texts = {f: stage.read_text("logs", attempt, f) for f in workers}
    assert any(":task_name:_inspect" in t for t in texts.values()), texts  # the worker that ran the task

    # The Jobs API forgets the job: its logs now come from the stage's storage only.
    assert run_cli("delete", job_id, "--address", head.address, env=env).returncode == 0
    one_line_error(run_cli("logs", job_id, "--address", head.address, env=env), "no such job")
    saved = run_cli("logs", job_id, "--stage", f"{s3_root}/seeded")
    assert saved.returncode == 0, saved.stderr
    assert "LlamaForCausalLM with" in saved.stdout
    assert "Q: Seeds?" in saved.stdout
    assert f"attempt {attempt}: inspect-model succeeded (job {job_id})" in saved.stderr
    with_workers = run_cli("logs", "--stage", f"{s3_root}/seeded", "--workers")
    assert with_workers.returncode == 0, with_workers.stderr
    assert "==> driver.log <==" in with_workers.stdout
    assert ":task_name:_inspect" in with_workers.stdout
    one_line_error(run_cli("logs", "raysubmit_other", "--stage", f"{s3_root}/seeded"),
                   "no saved logs of job 'raysubmit_other'")
    one_line_error(run_cli("logs", "--stage", f"{s3_root}/nothing-here"), "no logs")


@pytest.mark.slow
def test_a_failed_stage_saves_its_logs_and_the_error(head, tmp_path):
    env = {"RAY_AUTH_TOKEN": head.token}
    submitted = run_cli("submit", "inspect-model", "--set", f"output_root={tmp_path / 'run'}", "--set",
                        "model=./no/such/model", "--address", head.address, env=env)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job_id = submitted.stdout.strip()
    assert wait_ended(head, job_id, env) == "FAILED"
    stage = tmp_path / "run" / "inspect-model"
    assert not (stage / "_SUCCESS").exists()
    (attempt,) = [p.name for p in (stage / "logs").iterdir()]
    record = json.loads((stage / "logs" / attempt / "job.json").read_text())
    assert record["outcome"] == "failed"
    assert "no such directory" in record["error"]
    assert "no such directory" in (stage / "logs" / attempt / "error.txt").read_text()
    saved = run_cli("logs", "--stage", str(stage))
    assert saved.returncode == 0, saved.stderr
    assert "inspect-model failed" in saved.stderr
    assert "model './no/such/model'" in saved.stdout  # the driver's log of the failure
