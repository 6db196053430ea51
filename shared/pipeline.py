"""Pipelines: ordered stages whose configs refer to earlier stages by ``${name}``.

Used by ``scopeforge pipeline`` (local, one stage after another) and by the Kubernetes operator (one RayJob per
stage), so both hand URIs along the same way and validate the same configs before anything runs.
"""

from __future__ import annotations

import re
from typing import Any

from shared.config import JobConfig, validate_config
from shared.configs import JOB_CONFIGS
from shared.configs.pipeline import PipelineConfig, StageSpec
from shared.errors import ConfigError
from shared.storage import Storage

PLACEHOLDER = re.compile(r"\$\{([a-z0-9-]+)\}")


def stage_uri(pipeline: PipelineConfig, name: str) -> str:
    return Storage(pipeline.output_root, pipeline.storage).uri(name)


def substitute(value: Any, uris: dict[str, str], where: str) -> Any:
    """Replace ``${name}`` in every string of a config tree by the URI of that (earlier) stage."""
    if isinstance(value, str):
        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in uris:
                raise ConfigError(f"{where}: ${{{name}}} does not name an earlier stage "
                                  f"(earlier: {', '.join(uris) or 'none'})")
            return uris[name]

        return PLACEHOLDER.sub(repl, value)
    if isinstance(value, dict):
        return {k: substitute(v, uris, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, uris, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def stage_config(pipeline: PipelineConfig, spec: StageSpec, uris: dict[str, str], source: str = "pipeline"
                 ) -> JobConfig:
    """Validate one stage's config with the pipeline's root and storage and the URIs of the earlier stages."""
    if spec.job not in JOB_CONFIGS:
        raise ConfigError(f"{source}: stage '{spec.name}': unknown job '{spec.job}' "
                          f"(known: {', '.join(sorted(JOB_CONFIGS))})")
    for key in ("output_root", "stage", "storage"):
        if key in spec.config:
            raise ConfigError(f"{source}: stage '{spec.name}': '{key}' is set by the pipeline, not per stage")
    data = substitute(spec.config, uris, f"stage '{spec.name}'")
    data.update(output_root=pipeline.output_root, stage=spec.name,
                storage=pipeline.storage.model_dump(mode="python", exclude_none=True))
    return validate_config(JOB_CONFIGS[spec.job], data, f"{source}: stage '{spec.name}' config")


def stage_configs(pipeline: PipelineConfig, source: str = "pipeline") -> list[tuple[StageSpec, JobConfig]]:
    """Every stage's validated config, in order; fails on the first bad stage before anything runs."""
    uris: dict[str, str] = {}
    resolved = []
    for spec in pipeline.stages:
        resolved.append((spec, stage_config(pipeline, spec, uris, source)))
        uris[spec.name] = stage_uri(pipeline, spec.name)
    return resolved
