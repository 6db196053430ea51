"""The CLI as a user runs it (subprocesses of the installed entry point)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import committed_path, run_cli


def test_help_and_job_list():
    top = run_cli("--help")
    assert top.returncode == 0
    assert "run" in top.stdout
    assert "jobs" in top.stdout
    jobs = run_cli("jobs")
    assert jobs.returncode == 0
    assert any(line.startswith("inspect-model ") for line in jobs.stdout.splitlines())
    helped = run_cli("run", "inspect-model", "--help")
    assert helped.returncode == 0
    for key in ("model (str", "dtype (float32|bfloat16|float16", "output_root", "storage.endpoint_url"):
        assert key in helped.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "no-such-job"], "unknown job 'no-such-job'"),
        (["run", "inspect-model", "--config", "missing.yaml"], "missing.yaml: no such config file"),
        (["run", "inspect-model", "--set", "modle=tiny-llama"], "unknown key 'modle' (did you mean 'model'?)"),
        (["run", "inspect-model", "--set", "max_new_tokens=many"], "--set max_new_tokens"),
        (["run", "inspect-model", "--set", "output_root=gs://bucket/x"], "unsupported storage scheme 'gs://'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("scopeforge: error: "), result.stderr
    assert expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_schema_command():
    result = run_cli("schema", "inspect-model")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["properties"]["model"]["default"] == "smollm2-135m"
    assert "$ref" not in result.stdout


@pytest.mark.ray
def test_run_inspect_model_end_to_end_then_skip(tmp_path, tiny_llama_dir):
    config = tmp_path / "inspect.yaml"
    config.write_text(f"model: tiny-llama\noutput_root: {tmp_path / 'run'}\nmax_new_tokens: 4\n")
    first = run_cli("run", "inspect-model", "--config", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "LlamaForCausalLM with" in first.stdout
    stage = tmp_path / "run" / "inspect-model"
    metrics = json.loads((committed_path(stage) / "metrics.json").read_text())
    assert metrics["kv_heads"] == 2
    assert metrics["parameters"] > 0
    assert json.loads((stage / "_SUCCESS").read_text())["job"] == "inspect-model"
    again = run_cli("run", "inspect-model", "--config", str(config))
    assert again.returncode == 0
    assert "already done" in again.stderr


@pytest.mark.ray
def test_missing_model_inside_ray_worker_is_a_user_error(ray_session, tmp_path):
    result = run_cli("run", "inspect-model", "--set", f"output_root={tmp_path}", "--set", "model=./no/such/model",
                     env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert result.returncode == 2
    assert "scopeforge: error: model './no/such/model': no such directory" in result.stderr
    assert not (tmp_path / "inspect-model" / "_SUCCESS").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["logs"], "logs: give a submission ID (Jobs API), or --stage URI"),
        (["logs", "raysubmit_x", "--workers"], "--attempt and --workers read saved logs: add --stage URI"),
        (["logs", "--stage", "/tmp", "--follow"], "saved logs are complete; --follow is for a running job"),
        (["stop", "raysubmit_x", "--address", "http://127.0.0.1:8265", "--ca-bundle", "ca.pem"],
         "--ca-bundle ca.pem: only used for https:// addresses"),
    ],
)
def test_jobs_api_command_errors_are_one_line(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]], result.stderr
    assert expected in lines[0], result.stderr


def test_saved_logs_of_a_local_stage(tmp_path):
    """`logs --stage` on a folder laid out as ray_jobs/stage_logs.py writes it (tests/test_submit.py has the real
    thing, from jobs on a Ray head): the latest attempt, one by submission ID, a failed one with its error."""
    from shared.storage import Storage

    stage = Storage(str(tmp_path / "stage"))
    for attempt, outcome in (("20260101T000000-aaaaaa", "failed"), ("20260102T000000-bbbbbb", "succeeded")):
        folder = stage.child("logs", attempt)
        folder.write_json({"job": "inspect-model", "outcome": outcome, "submission_id": f"raysubmit_{outcome}"},
                          "job.json")
        folder.write_text(f"driver of {attempt}\n", "driver.log")
    stage.child("logs", "20260101T000000-aaaaaa").write_text("Traceback: boom\n", "error.txt")
    latest = run_cli("logs", "--stage", stage.uri())
    assert latest.returncode == 0, latest.stderr
    assert latest.stdout == "driver of 20260102T000000-bbbbbb\n"
    failed = run_cli("logs", "raysubmit_failed", "--stage", stage.uri())
    assert failed.stdout == ("==> driver.log <==\ndriver of 20260101T000000-aaaaaa\n"
                             "==> error.txt <==\nTraceback: boom\n")
    missing = run_cli("logs", "--stage", stage.uri(), "--attempt", "nope")
    assert "no logs of attempt 'nope'" in missing.stderr
