from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared.config import JobConfig, WorkersConfig


class PruneRuntime(WorkersConfig):
    """Resources of the importance workers."""

    cpus_per_worker: float = Field(2.0, gt=0)
    """Logical CPUs reserved per worker; it runs that many torch threads (at least 1)."""
    checkpoint_every: int = Field(16, ge=1)
    """Importance micro-batches between checkpoints: a failed or killed pass resumes from the last one (the sums are
    the same either way). A run with another number of workers starts the pass over."""


class PruneConfig(JobConfig):
    """Prune a LLaMA-family model structurally (KV groups, MLP channels), calibrated on domain data (FineScope stage 2).

    Workers sum Taylor importance of every KV group and MLP channel over their shard of the calibration set; rank 0
    keeps the most important ones so that `fraction` of the parameters goes, and writes <stage>/model/ (loads with
    AutoModelForCausalLM.from_pretrained), metrics.json and report.html.
    """

    JOB: ClassVar[str] = "prune"

    model: str = "smollm2-135m"
    """Model to prune: an alias (smollm2-135m, tiny-llama), a save_pretrained folder, an s3:// prefix, a finished stage
    with a model output, or a hub id. LLaMA, Mistral and Qwen2 layouts are supported."""
    calibration: str
    """Calibration data: a curate stage (its selected subset), a Parquet/JSONL file or folder (local or s3://), or a
    Hugging Face dataset. Rows with 'prompt' and 'answer' columns give loss on the answer tokens only; otherwise the
    text_column is modelled whole."""
    text_column: str = "text"
    """Column holding the text when the data has no prompt/answer columns."""
    max_examples: int = Field(64, ge=1)
    """At most this many calibration examples (a seeded random sample when the data has more). LLM-Pruner ranks with
    10 examples of 128 tokens; 64 of 256 is ample and keeps SmolLM2-135M under 5 minutes on 2 CPU cores."""
    min_examples: int = Field(8, ge=1)
    """Fewer usable calibration examples than this is an error (too little data to rank groups)."""
    max_length: int = Field(256, ge=8, le=8192)
    """Tokens per example; longer texts are cut (and counted)."""
    micro_batch_size: int = Field(4, ge=1)
    """Examples per forward/backward pass on a worker."""

    fraction: float = Field(0.35, gt=0.0, le=0.9)
    """Fraction of the parameters counted by ``fraction_of`` to remove, in (0, 0.9]. The achieved shares of all
    three counts are reported (they differ from the target by the rounding of channel counts)."""
    fraction_of: Literal["all", "non_embedding", "prunable"] = "all"
    """What ``fraction`` is a share of: all parameters (embeddings included, though they are never pruned), the
    non-embedding ones (the usual unit of the pruning literature), or those of the pruned layers' KV groups and MLP
    channels. For SmolLM2-135M, 35% of all removes about 55% of every pruned block."""
    importance: Literal["param_first", "vectorize", "param_second", "magnitude", "random"] = "vectorize"
    """How groups are ranked: first-order Taylor per vector |sum W*dL/dW| with the signed sums taken over the whole
    calibration set (vectorize: the same pruned model for every micro_batch_size and num_workers), per weight
    |W*dL/dW| summed over micro-batches (param_first), diagonal-Fisher second order (param_second; both change with
    the micro-batch size), L2 magnitude, or random (a floor)."""
    layers: list[int] | Literal["all"] | None = None
    """Decoder layers to prune, as [start, stop] (Python slice; negative counts from the end), or 'all'. Unset: skip the
    first eighth and the last two layers (as LLM-Pruner). Unless every layer is pruned, layers end with different
    widths and the saved model needs scopeforge imported or trust_remote_code=True to load (see README)."""
    prune_attention: bool = True
    """Remove whole KV groups (a key/value head with the query heads reading it) as well as MLP channels."""
    channel_multiple: int = Field(8, ge=1, le=256)
    """Kept MLP channel counts are multiples of this (fast matrix shapes)."""
    seed: int = 0
    """Seed of the calibration sample and of the random importance."""

    eval_data: str | None = None
    """Held-out domain data (same forms as calibration) for perplexity before and after pruning; unset: skipped."""
    eval_max_examples: int = Field(64, ge=1)
    """At most this many evaluation examples (a seeded random sample when there are more)."""

    activation_checkpointing: bool = True
    """Recompute activations in backward instead of keeping them (less memory, about a third more compute)."""
    runtime: PruneRuntime = PruneRuntime()
    """Ray Train workers (each scores its shard of the calibration set; the summed scores do not depend on how many
    there are). Not part of the config hash."""
    sample_prompt: str = "Explain in one sentence what a rocket engine does."
    """Prompt answered greedily by the reloaded pruned model, as a smoke test ('' to skip)."""
    sample_tokens: int = Field(32, ge=1, le=512)
    """Length of that answer, in tokens."""

    @field_validator("layers")
    @classmethod
    def _two_bounds(cls, value: list[int] | str | None) -> list[int] | str | None:
        if isinstance(value, list) and len(value) != 2:
            raise ValueError("give [start, stop] (two integers) or 'all'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if self.min_examples > self.max_examples:
            raise ValueError(f"min_examples ({self.min_examples}) exceeds max_examples ({self.max_examples})")
        if self.runtime.num_workers > self.max_examples:
            raise ValueError(f"runtime.num_workers ({self.runtime.num_workers}) exceeds max_examples "
                             f"({self.max_examples}): some workers would have no calibration data")
        return self

    def input_uris(self) -> list[str]:
        return [uri for uri in (self.model, self.calibration, self.eval_data) if uri]

    def gpus_per_worker(self) -> float:
        return 1.0 if self.runtime.use_gpu else 0.0
