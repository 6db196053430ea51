from __future__ import annotations

import pytest

from shared.config import validate_config
from shared.configs.pipeline import PipelineConfig
from shared.errors import ConfigError
from shared.pipeline import stage_configs


def pipeline(stages, root="/tmp/run"):
    return validate_config(PipelineConfig, {"output_root": root, "stages": stages}, "p.yaml")


def test_placeholders_become_earlier_stage_uris():
    p = pipeline([{"name": "first", "job": "inspect-model", "config": {"model": "tiny-llama"}},
                  {"name": "second", "job": "inspect-model", "config": {"model": "${first}"}}])
    (_, a), (_, b) = stage_configs(p)
    assert (a.stage, a.output_root, b.model) == ("first", "/tmp/run", "/tmp/run/first")


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"name": "a", "job": "nope"}], "stage 'a': unknown job 'nope'"),
        ([{"name": "a", "job": "inspect-model", "config": {"model": "${b}"}}], "${b} does not name an earlier stage"),
        ([{"name": "a", "job": "inspect-model", "config": {"modle": "x"}}], "unknown key 'modle'"),
        ([{"name": "a", "job": "inspect-model", "config": {"output_root": "x"}}], "set by the pipeline"),
    ],
)
def test_bad_stages_fail_before_anything_runs(stages, message):
    with pytest.raises(ConfigError, match=message.replace("$", r"\$").replace("{", r"\{").replace("}", r"\}")):
        stage_configs(pipeline(stages))


def test_stage_names_are_checked():
    with pytest.raises(ConfigError, match="used twice"):
        pipeline([{"name": "a", "job": "inspect-model"}, {"name": "a", "job": "inspect-model"}])
    with pytest.raises(ConfigError, match="stages.0.name"):
        pipeline([{"name": "Bad_Name", "job": "inspect-model"}])


@pytest.mark.parametrize("name", ["finescope-demo", "finescope-sae-variants", "finescope-calibration"])
def test_the_shipped_finescope_pipelines_validate_and_share_the_demo_stages(name):
    from pathlib import Path

    from shared.config import load_config

    configs = Path(__file__).resolve().parents[1] / "ray_jobs" / "configs"
    demo = {spec.name: cfg for spec, cfg in stage_configs(load_config(PipelineConfig, configs / "finescope-demo.yaml"))}
    found = {spec.name: cfg for spec, cfg in stage_configs(load_config(PipelineConfig, configs / f"{name}.yaml"))}
    for shared_stage in ("corpus", "curate"):  # the same config: a run of one reuses the other's stages
        assert found[shared_stage].model_dump() == demo[shared_stage].model_dump()
    assert found["corpus"].output_root == "runs/demo-finescope"


def test_default_study_targets_are_those_the_sources_give_and_explicit_ones_are_kept():
    from ray_jobs.build_corpus import study_targets
    from shared.configs.build_corpus import BuildCorpusConfig

    docs = {"sci.space": [1], "alt.atheism": [1], "news": [1], "code": [1]}
    assert study_targets(BuildCorpusConfig(), docs) == ["sci.space", "alt.atheism", "news"]
    assert study_targets(BuildCorpusConfig(study_targets=["math"]), docs) == ["math"]  # split_corpus refuses it
    assert study_targets(BuildCorpusConfig(study_targets=[]), docs) == []
