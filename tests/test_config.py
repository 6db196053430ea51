from __future__ import annotations

from typing import ClassVar, Literal

import pytest
from pydantic import Field

from shared.config import (
    JobConfig,
    StrictModel,
    apply_overrides,
    config_hash,
    dump_config,
    json_schema,
    load_config,
    parse_override,
)
from shared.errors import ConfigError


class Inner(StrictModel):
    k: int = 32
    """Active latents."""
    mode: Literal["topk", "relu"] = "topk"
    """Activation."""


class DemoConfig(JobConfig):
    """A config for these tests."""

    JOB: ClassVar[str] = "demo"
    model: str = "tiny-llama"
    """Model reference."""
    sae: Inner = Field(default_factory=Inner)
    """SAE settings."""
    seeds: list[str] = []
    """Seed texts."""


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_keep_types(tmp_path):
    cfg = load_config(DemoConfig, write(tmp_path, "model: a\nsae:\n  k: 8\n"),
                      ["sae.mode=relu", "seeds=[x, y]", "output_root=s3://b/p"])
    assert cfg.model == "a"
    assert cfg.sae.k == 8
    assert cfg.sae.mode == "relu"
    assert cfg.seeds == ["x", "y"]
    assert cfg.output_root == "s3://b/p"


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=") == (["a"], "")
    assert parse_override("a=x=y") == (["a"], "x=y")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"model": "x"}, ["model.sub=1"])


def test_unknown_key_names_key_and_file_with_a_hint(tmp_path):
    path = write(tmp_path, "sae:\n  kk: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, path)
    message = str(err.value)
    assert message == f"{path}: unknown key 'sae.kk' (did you mean 'sae.k'?)"


def test_wrong_type_from_override_names_the_override(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, write(tmp_path, "model: a\n"), ["sae.k=lots"])
    message = str(err.value)
    assert message.startswith("--set sae.k: key 'sae.k':")
    assert "'lots'" in message
    assert "\n" not in message


def test_bad_choice_and_counts_more_problems(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'sae\.(k|mode)'.*\(and 1 more problem\)"):
        load_config(DemoConfig, write(tmp_path, "sae: {mode: gelu, k: x}\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(DemoConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"cfg.yaml: YAML error at line 2"):
        load_config(DemoConfig, write(tmp_path, "model: a\n  bad: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(DemoConfig, write(tmp_path, "- a\n- b\n"))


def test_secrets_never_dumped_and_hash_ignores_storage():
    cfg = DemoConfig.model_validate({"storage": {"access_key_id": "AKIAFAKE", "secret_access_key": "hunter2"}})
    dumped = dump_config(cfg)
    assert "hunter2" not in dumped
    assert "AKIAFAKE" not in dumped
    assert "secret_access_key" not in dumped
    assert "hunter2" not in repr(cfg)
    plain = DemoConfig()
    assert config_hash(cfg) == config_hash(plain)
    assert config_hash(plain) == config_hash(DemoConfig(output_root="elsewhere", stage="other"))
    assert config_hash(plain) != config_hash(DemoConfig(model="other"))
    assert config_hash(plain) != config_hash(plain, upstream=["abc"])


def test_json_schema_is_inline_and_documented():
    schema = json_schema(DemoConfig)
    assert "$ref" not in str(schema)
    assert "$defs" not in schema
    assert schema["properties"]["sae"]["properties"]["k"]["description"] == "Active latents."
    assert schema["properties"]["model"]["description"] == "Model reference."
    assert schema["additionalProperties"] is False


def test_runtime_sections_at_any_depth_are_outside_the_hash():
    """Resources say where and how fast, never what: changing them reuses a finished stage (and its checkpoints)."""
    from shared.configs.generate import GenerateConfig
    from shared.configs.train_detector import DetectorConfig

    detector = DetectorConfig(sources=[{"name": "d", "uri": "x"}])
    assert config_hash(detector) == config_hash(detector.model_copy(
        update={"runtime": detector.runtime.model_copy(update={"num_workers": 8, "use_gpu": True})}))
    assert config_hash(detector) != config_hash(detector.model_copy(update={"lr": 0.5}))
    gen = GenerateConfig(generators=[{"name": "g", "mode": "gan", "count": 2}])
    faster = gen.generators[0].model_copy(update={"runtime": gen.generators[0].runtime.model_copy(
        update={"num_actors": 4, "cpus_per_actor": 2.0})})
    assert config_hash(gen) == config_hash(gen.model_copy(update={"generators": [faster]}))
    assert config_hash(gen) != config_hash(gen.model_copy(
        update={"generators": [gen.generators[0].model_copy(update={"count": 3})]}))
