"""`scopeforge demo deepfake`: the composed pipeline, and the whole demo on a tiny config as a user runs it."""

from __future__ import annotations

import json

import pytest
import yaml

from ray_jobs.demo_deepfake import DEFAULT_CONFIG, VARIANTS, compose
from shared.config import load_config, validate_config
from shared.configs.deepfake_demo import DeepfakeDemoConfig
from shared.errors import ConfigError
from shared.pipeline import stage_configs
from tests.conftest import committed_path, run_cli


def test_default_demo_composes_data_four_variants_and_evaluation():
    cfg = load_config(DeepfakeDemoConfig, DEFAULT_CONFIG)
    pipeline, data = compose(cfg)
    names = [s.name for s in pipeline.stages]
    assert names == ["train-ddpm", "data", *VARIANTS, "evaluate"]
    assert data == "${data}"
    resolved = dict((spec.name, job) for spec, job in stage_configs(pipeline))
    single, loo = resolved["single-boost"], resolved["loo-uniform"]
    data_uri = resolved["evaluate"].test_sets[0].uri
    assert data_uri.endswith("/demo-deepfake/data")
    assert [(s.labels, s.include, s.exclude) for s in single.sources] == [
        (["real"], [], []), (["fake"], [cfg.single_generator], [])]
    assert [(s.labels, s.include, s.exclude) for s in loo.sources] == [
        (["real"], [], []), (["fake"], [], [cfg.heldout_generator])]
    assert single.boosting.method == "momentum"
    assert loo.boosting.method == "uniform"
    assert all(s.uri == data_uri for s in single.sources + loo.sources)
    assert [d.name for d in resolved["evaluate"].detectors] == list(VARIANTS)


def test_an_existing_dataset_replaces_the_data_pipeline_and_bad_demo_configs_fail_early(tmp_path):
    base = {"single_generator": "a", "heldout_generator": "b"}
    pipeline, data = compose(validate_config(DeepfakeDemoConfig, {**base, "data_uri": "s3://bucket/faces"}, "t"))
    assert data == "s3://bucket/faces"
    assert [s.name for s in pipeline.stages][0] == "single-uniform"
    other = tmp_path / "data.yaml"
    other.write_text(yaml.safe_dump({"stages": [{"name": "generate", "job": "standin-faces"}]}))
    with pytest.raises(ConfigError, match="no stage named 'data'"):
        compose(validate_config(DeepfakeDemoConfig, {**base, "data_pipeline": str(other)}, "t"))
    pipeline, data = compose(validate_config(DeepfakeDemoConfig, {**base, "data_pipeline": str(other),
                                                                  "data_stage": "generate"}, "t"))
    assert data == "${generate}"
    assert pipeline.stages[0].name == "generate"
    with pytest.raises(ConfigError, match="single_generator and heldout_generator must differ"):
        validate_config(DeepfakeDemoConfig, {"single_generator": "a", "heldout_generator": "a"}, "t")
    with pytest.raises(ConfigError, match="train.boosting is set by the demo"):
        validate_config(DeepfakeDemoConfig, {**base, "train": {"boosting": {}}}, "t")
    with pytest.raises(ConfigError, match="no such file"):
        compose(validate_config(DeepfakeDemoConfig, {**base, "data_pipeline": "nope.yaml"}, "t"))


@pytest.mark.slow
@pytest.mark.ray
def test_demo_on_a_tiny_config_learns_what_it_saw_and_reports_heldout_aucs(ray_session, tmp_path):
    """Blurred fakes are separable from sharp reals (no blur augmentation): every variant trains on them and must
    detect them on the test split. The held-out generator's AUC is the experiment's result, not asserted."""
    data_pipeline = tmp_path / "data.yaml"
    data_pipeline.write_text(yaml.safe_dump({"stages": [{"name": "data", "job": "standin-faces", "config": {
        "size": 16, "reals": 60, "fakes_per_generator": 40, "generators": ["blur", "pca", "noise"]}}]}))
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({
        "output_root": str(tmp_path / "demo"), "data_pipeline": str(data_pipeline),
        "single_generator": "standin-blur", "heldout_generator": "standin-noise",
        "train": {"model": {"kind": "small-cnn", "width": 8}, "epochs": 4, "batch_size": 16,
                  "augment": {"blur_prob": 0.0, "jpeg_prob": 0.0},
                  "runtime": {"max_failures": 0, "num_workers": 1},
                  "split": {"seed": 0, "val_fraction": 0.25, "test_fraction": 0.3}},
        "boost": {"method": "momentum", "warmup_epochs": 1},
        "evaluate": {"runtime": {"num_actors": 1}, "robustness": {"jpeg_quality": [60], "blur_sigma": [1.0]}}}))
    # the CLI as a user runs it, on the session's Ray (RAY_ADDRESS) to spare a Ray start
    result = run_cli("demo", "deepfake", "--config", str(config), timeout=900,
                     env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "demo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["heldout_auc"]) == set(VARIANTS)
    assert all(0.0 <= v <= 1.0 for v in metrics["heldout_auc"].values())
    evaluation = json.loads((committed_path(out / "evaluate") / "metrics.json").read_text())
    for variant in VARIANTS:
        assert "standin-blur" in evaluation["seen_in_training"][variant]
        assert "standin-noise" not in evaluation["seen_in_training"][variant]
        assert evaluation["auc"][variant]["standin-blur"] > 0.6, (variant, evaluation["auc"][variant])
        assert evaluation["auc"][variant]["standin-noise"] == pytest.approx(metrics["heldout_auc"][variant])
    assert metrics["standin_data"] is True
    assert metrics["heldout_generator"] == "standin-noise"
    assert metrics["test_counts"]["n_real"] > 0
    assert metrics["test_counts"]["n_fake"] > 0
    md = (out / "results.md").read_text()
    assert "Stand-in data" in md
    assert "standin-noise" in md
    for variant in VARIANTS:
        assert f"| {variant} |" in md
        assert (out / variant / "_SUCCESS").exists()
    assert (committed_path(out / "evaluate") / "results.md").exists()
    assert (out / "demo-pipeline.yaml").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "train-detector", "--set", "sources=[{name: d, uri: x}]", "--set", "boosting.w_min=2"],
         "need w_min <= 1 <= w_max"),
        (["run", "train-detector", "--set", "sources=[{name: d, uri: x}, {name: d, uri: y}]"],
         "source name 'd' is used twice"),
        (["run", "evaluate-detector", "--set", "detectors=[{name: a, uri: x}]", "--set", "test_sets=[]"],
         "test_sets"),
        (["demo", "deepfake", "--set", "single_generator=x", "--set", "heldout_generator=x"], "must differ"),
    ],
)
def test_detector_config_errors_are_one_line_and_exit_2(args, expected):
    result = run_cli(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], result.stderr
