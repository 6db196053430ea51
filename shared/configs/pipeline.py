from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from shared.config import StorageConfig, StrictModel


class StageSpec(StrictModel):
    """One stage of a pipeline."""

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
    """Stage folder under output_root, and the placeholder ${name} later stages use for its URI (lowercase letters,
    digits and '-', so it also fits a Kubernetes name)."""
    job: str
    """Job to run (see 'scopeforge jobs')."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The job's config keys (see 'scopeforge run JOB --help'); output_root, stage and storage come from the
    pipeline. A string may refer to an earlier stage as ${name} (its URI)."""
    retries: int = Field(0, ge=0, le=10)
    """How many times a failed stage is retried before the pipeline fails."""


class PipelineConfig(StrictModel):
    """Stages run in order; each hands the next its outputs by URI. Finished stages are skipped on a rerun."""

    output_root: str = "runs/pipeline"
    """Root URI of the run: every stage writes <output_root>/<stage name>/."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Object-storage settings for every stage."""
    stages: list[StageSpec] = Field(min_length=1)
    """The stages, in order."""

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageSpec]) -> list[StageSpec]:
        seen: set[str] = set()
        for spec in stages:
            if spec.name in seen:
                raise ValueError(f"stage name '{spec.name}' is used twice")
            seen.add(spec.name)
        return stages
