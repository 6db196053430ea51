"""`scopeforge demo deepfake`: the composed pipeline, and the whole demo on a tiny config as a user runs it."""

from __future__ import annotations

import json

import pytest
import yaml

from ray_jobs.demo_deepfake import DEFAULT_CONFIG, compose
from shared.config import load_config, validate_config
from shared.configs.deepfake_demo import DeepfakeDemoConfig
from shared.detection.study import HEADLINE_VARIANTS
from shared.errors import ConfigError
from shared.pipeline import stage_configs
from tests.conftest import committed_path, run_cli


def test_default_demo_composes_data_study_and_the_cnn_baseline():
    cfg = load_config(DeepfakeDemoConfig, DEFAULT_CONFIG)
    pipeline, data = compose(cfg)
    names = [s.name for s in pipeline.stages]
    assert names[-3:] == ["study", "cnn-baseline", "evaluate"]
    assert cfg.data_stage in names[:-3]
    assert data == "${data}"
    resolved = dict((spec.name, job) for spec, job in stage_configs(pipeline))
    study, baseline = resolved["study"], resolved["cnn-baseline"]
    assert study.data.endswith("/demo-deepfake/data")
    assert study.heldout_family == "gan"
    assert study.splits >= 5
    assert study.seeds >= 3
    assert study.families["gan"] == ["gan"]
    assert len(study.families) >= 3  # at least three generator families
    # the baseline trains on the study's first split, without the held-out family, with uniform weights
    assert baseline.split == study.split
    assert [(s.labels, s.exclude) for s in baseline.sources] == [(["real"], []), (["fake"], ["gan"])]
    assert baseline.boosting.method == "uniform"
    assert baseline.model.kind == "small-cnn"
    assert [d.name for d in resolved["evaluate"].detectors] == ["cnn-baseline"]


def test_an_existing_dataset_replaces_the_data_pipeline_and_bad_demo_configs_fail_early(tmp_path):
    base = {"single_generator": "a", "heldout_family": "b", "families": {"a": ["a"], "b": ["b"]}}
    pipeline, data = compose(validate_config(DeepfakeDemoConfig, {**base, "data_uri": "s3://bucket/faces"}, "t"))
    assert data == "s3://bucket/faces"
    assert [s.name for s in pipeline.stages] == ["study", "cnn-baseline", "evaluate"]
    pipeline, _ = compose(validate_config(DeepfakeDemoConfig, {**base, "data_uri": "s3://b/f", "baseline": None},
                                          "t"))
    assert [s.name for s in pipeline.stages] == ["study"]
    other = tmp_path / "data.yaml"
    other.write_text(yaml.safe_dump({"stages": [{"name": "generate", "job": "standin-faces"}]}))
    with pytest.raises(ConfigError, match="no stage named 'data'"):
        compose(validate_config(DeepfakeDemoConfig, {**base, "data_pipeline": str(other)}, "t"))
    pipeline, data = compose(validate_config(DeepfakeDemoConfig, {**base, "data_pipeline": str(other),
                                                                  "data_stage": "generate"}, "t"))
    assert data == "${generate}"
    assert pipeline.stages[0].name == "generate"
    with pytest.raises(ConfigError, match="heldout_family 'c' is not one of families"):
        validate_config(DeepfakeDemoConfig, {**base, "heldout_family": "c"}, "t")
    with pytest.raises(ConfigError, match="baseline.boosting is set by the demo"):
        validate_config(DeepfakeDemoConfig, {**base, "baseline": {"boosting": {}}}, "t")
    with pytest.raises(ConfigError, match="study.families is set by the demo"):
        validate_config(DeepfakeDemoConfig, {**base, "study": {"families": {}}}, "t")
    with pytest.raises(ConfigError, match="needs the held-out generators"):
        validate_config(DeepfakeDemoConfig, {"single_generator": "a", "heldout_family": "b"}, "t")
    with pytest.raises(ConfigError, match="no such file"):
        compose(validate_config(DeepfakeDemoConfig, {**base, "data_pipeline": "nope.yaml"}, "t"))


TINY_STUDY = {"input_size": 32, "splits": 2, "seeds": 2, "bootstrap_rounds": 200, "head": {"epochs": 8},
              "robustness": {"jpeg_quality": [50], "blur_sigma": [1.0], "downscale": [0.5]},
              "runtime": {"features": {"num_actors": 1, "cpus_per_actor": 1}}}


@pytest.mark.slow
@pytest.mark.ray
def test_demo_on_a_tiny_config_reports_every_variant_with_intervals_and_reproduces(ray_session, tmp_path):
    """Stand-in fakes, one family per process: every figure of the demo with its interval, the detector finds the
    families it trained on, and the study gives the same figures with another number of feature actors."""
    data_pipeline = tmp_path / "data.yaml"
    data_pipeline.write_text(yaml.safe_dump({"stages": [{"name": "data", "job": "standin-faces", "config": {
        "size": 24, "fakes_per_generator": 60, "generators": ["blur", "pca", "noise"]}}]}))
    families = {"blur": ["standin-blur"], "pca": ["standin-pca"], "noise": ["standin-noise"]}
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({
        "output_root": str(tmp_path / "demo"), "data_pipeline": str(data_pipeline), "families": families,
        "heldout_family": "noise", "single_generator": "standin-blur", "study": TINY_STUDY,
        "baseline": {"model": {"kind": "small-cnn", "width": 8}, "epochs": 3, "batch_size": 16,
                     "augment": {"blur_prob": 0.0, "jpeg_prob": 0.0},
                     "runtime": {"max_failures": 0, "num_workers": 1}},
        "evaluate": {"runtime": {"num_actors": 1}, "robustness": {"jpeg_quality": [60], "blur_sigma": [1.0]}}}))
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    result = run_cli("demo", "deepfake", "--config", str(config), timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "demo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["heldout_auc"]) == set(HEADLINE_VARIANTS)
    for v in HEADLINE_VARIANTS:
        low, high = metrics["heldout_auc_ci"][v]
        assert low <= metrics["heldout_auc"][v] <= high, v
        assert metrics["heldout_auc_runs"][v] == 2 * 2
    assert set(metrics["comparisons"]) >= {"diverse-uniform - single-uniform", "diverse-boost - diverse-uniform",
                                           "diverse-focal - diverse-uniform", "diverse-ohem - diverse-uniform"}
    assert set(metrics["lofo"]) == set(families)
    # a family the head trained on is detected on its test split (these processes are easy)
    for fam in families:
        assert metrics["family_matrix"][fam][fam]["mean"] > 0.8, metrics["family_matrix"][fam]
    assert set(metrics["robustness"]["auc"]) == {"clean", "jpeg50", "blur1", "down0.5"}
    assert metrics["baseline"]["heldout"]["standin-noise"]["n_fake"] > 0
    assert metrics["standin_data"] is True
    md = (out / "results.md").read_text()
    for text in ("Stand-in data", "## Held-out family", "## What the intervals allow", "Leave one family out",
                 "Train x test", "Robustness of", "From-scratch baseline"):
        assert text in md, text
    study = committed_path(out / "study")
    assert (study / "report.html").stat().st_size > 20_000  # the plots are embedded
    assert (study / "features.npz").exists()
    # the same study with two feature actors: the same figures, to the last bit
    rerun = run_cli("run", "detector-study", "--config", str(committed_path(out / "study") / "config.yaml"),
                    "--set", f"output_root={tmp_path / 'again'}", "--set", "stage=rerun",
                    "--set", "runtime.features.num_actors=2",
                    timeout=900, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    again = json.loads((committed_path(tmp_path / "again" / "rerun") / "metrics.json").read_text())
    assert again["heldout_auc"] == metrics["heldout_auc"]
    assert again["heldout_auc_ci"] == metrics["heldout_auc_ci"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "train-detector", "--set", "sources=[{name: d, uri: x}]", "--set", "boosting.w_min=2"],
         "need w_min <= 1 <= w_max"),
        (["run", "train-detector", "--set", "sources=[{name: d, uri: x}, {name: d, uri: y}]"],
         "source name 'd' is used twice"),
        (["run", "evaluate-detector", "--set", "detectors=[{name: a, uri: x}]", "--set", "test_sets=[]"],
         "test_sets"),
        (["demo", "deepfake", "--set", "heldout_family=x"], "heldout_family 'x' is not one of families"),
    ],
)
def test_detector_config_errors_are_one_line_and_exit_2(args, expected):
    result = run_cli(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], result.stderr
