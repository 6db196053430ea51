from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from shared.config import JobConfig


class InspectModelConfig(JobConfig):
    """Load a model reference on a Ray worker and report its architecture and parameter count.

    The smallest real job: it exercises CLI -> config -> Ray -> storage end to end.
    """

    JOB: ClassVar[str] = "inspect-model"

    model: str = "smollm2-135m"
    """Model reference: an alias (smollm2-135m, tiny-llama), a local save_pretrained folder, an s3:// prefix or a
    hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype once loaded."""
    prompt: str = "What is a sparse autoencoder?"
    """A chat prompt answered greedily as a smoke test of the loaded weights ('' to skip)."""
    max_new_tokens: int = Field(24, ge=0, le=512)
    """Length of that answer, in tokens."""
