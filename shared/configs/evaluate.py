from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from shared.config import ActorPoolConfig, JobConfig


class EvaluateConfig(JobConfig):
    """Evaluate models on held-out data: perplexity, multiple-choice accuracy, exact match; one table row per model.

    Every dataset gets perplexity (on its text, or on the answer tokens of prompt/answer rows). Rows with
    'question', 'choices' and 'answer_index' also give multiple-choice accuracy by answer log-likelihood; rows with
    'question' and 'answer' give exact match of the generated final answer. Writes results.md and metrics.json.
    """

    JOB: ClassVar[str] = "evaluate"

    models: dict[str, str] = Field(min_length=1)
    """Table row name -> model reference (alias, directory, s3:// prefix, or a stage that produced a model)."""
    datasets: dict[str, str] = Field(min_length=1)
    """Column name -> dataset URI (e.g. domain: the held-out target-domain split, general: held-out other text)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights dtype for evaluation."""
    max_length: int = Field(256, ge=8)
    """Tokens per example (longer texts are cut, and counted)."""
    max_examples: int = Field(200, ge=1)
    """Rows per dataset (a seeded sample when there are more)."""
    batch_size: int = Field(8, ge=1)
    """Examples per forward pass."""
    max_new_tokens: int = Field(64, ge=1)
    """Generation length for exact-match questions."""
    seed: int = 0
    """Sampling seed for max_examples."""
    runtime: ActorPoolConfig = ActorPoolConfig()
    """Resources (not part of the config hash)."""

    def input_uris(self) -> list[str]:
        return list(self.models.values()) + list(self.datasets.values())

    def gpus_per_worker(self) -> float:
        return self.runtime.gpus_per_actor

    @field_validator("models", "datasets")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, ref in value.items():
            if not name.strip() or not str(ref).strip():
                raise ValueError(f"'{name}': names and references must be non-empty")
        return value
