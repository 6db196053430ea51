"""Pipelines: stages hand URIs along, finished stages are skipped, a changed stage reruns with everything downstream
of it, and an interrupted pipeline resumes where it stopped."""

from __future__ import annotations

import json
import shutil

import pytest

from ray_jobs.pipeline import run_pipeline
from shared.config import validate_config
from shared.configs.pipeline import PipelineConfig
from shared.errors import UserError
from tests.conftest import run_cli

pytestmark = [pytest.mark.ray]


def _pipeline(root, n_seeds=2, max_length=32, dataset="${corpus}/heldout"):
    return validate_config(PipelineConfig, {"output_root": str(root), "stages": [
        {"name": "corpus", "job": "build-corpus",
         "config": {"sources": ["newsgroups", "news"], "n_seeds": n_seeds, "heldout_target_docs": 3,
                    "max_chunks": {"news": 40, "alt.atheism": 40}}},
        {"name": "eval", "job": "evaluate",
         "config": {"models": {"tiny": "tiny-llama"}, "datasets": {"domain": dataset}, "max_examples": 5,
                    "max_length": max_length}},
    ]}, "test")


def _status(summary):
    return [(s["name"], s["status"]) for s in summary["stages"]]


def test_skip_rerun_downstream_and_resume(ray_session, tmp_path, tiny_llama_dir):
    root = tmp_path / "run"
    first = run_pipeline(_pipeline(root))
    assert _status(first) == [("corpus", "ran"), ("eval", "ran")]
    assert first["metrics"]["eval"]["datasets"]["domain"]["uri"] == f"{root}/corpus/heldout"
    assert _status(run_pipeline(_pipeline(root))) == [("corpus", "skipped"), ("eval", "skipped")]
    # a change in the last stage reruns only that stage
    assert _status(run_pipeline(_pipeline(root, max_length=40))) == [("corpus", "skipped"), ("eval", "ran")]
    # a change upstream reruns it and everything that read it (the inputs' hashes are part of a stage's hash)
    assert _status(run_pipeline(_pipeline(root, n_seeds=3, max_length=40))) == [("corpus", "ran"), ("eval", "ran")]
    # an interrupted pipeline: the second stage fails, the first stays done; once fixed, only the second runs
    with pytest.raises(UserError, match="missing: not found"):
        run_pipeline(_pipeline(root, n_seeds=3, max_length=48, dataset="${corpus}/missing"))
    summary = json.loads((root / "pipeline.json").read_text())  # the last successful run's record
    assert [s["name"] for s in summary["stages"]] == ["corpus", "eval"]
    resumed = run_pipeline(_pipeline(root, n_seeds=3, max_length=48))
    assert _status(resumed) == [("corpus", "skipped"), ("eval", "ran")]
    assert all(s["stage_seconds"] is not None for s in resumed["stages"])
    # a stage redone with the same config (its folder deleted here) reruns every stage that read it
    shutil.rmtree(root / "corpus")
    assert _status(run_pipeline(_pipeline(root, n_seeds=3, max_length=48))) == [("corpus", "ran"), ("eval", "ran")]


def test_pipeline_cli_validates_every_stage_before_running(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(f"output_root: {tmp_path / 'run'}\nstages:\n"
                      "  - {name: a, job: inspect-model, config: {model: tiny-llama}}\n"
                      "  - {name: b, job: evaluate, config: {models: {x: '${a}'}, datasets: {d: '${c}'}}}\n")
    result = run_cli("pipeline", "--config", str(config))
    assert result.returncode == 2
    assert "${c} does not name an earlier stage" in result.stderr
    assert not (tmp_path / "run" / "a").exists()  # nothing ran
