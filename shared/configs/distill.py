from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from shared.config import ActorPoolConfig, JobConfig, StrictModel, WorkersConfig


class GenerationConfig(StrictModel):
    """How the teacher writes its answers."""

    max_new_tokens: int = Field(192, ge=1, le=4096)
    """Longest teacher answer (a plain continuation runs to at most 1.25 times the longest original continuation of
    its batch). An instruction answer cut at this length is not kept (counted as truncated); a continuation is kept
    up to its last complete sentence (counted as kept_trimmed)."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature (with do_sample)."""
    batch_size: int = Field(8, ge=1)
    """Prompts per generate() call."""
    prompt_fraction: float = Field(0.4, gt=0, lt=1)
    """For plain documents (continuation tasks): the share of words that forms the prompt."""
    min_answer_words: int = Field(20, ge=1)
    """Documents whose answer part would be shorter than this are skipped (and counted)."""
    continuation_style: Literal["plain", "paraphrase"] = "plain"
    """How the teacher writes the answer of a continuation task. plain: it continues the prompt as a plain language
    model (no chat template, the reference not shown), which is the format the student is trained in, sampled at
    ``temperature`` with ``repetition_penalty``; paraphrase: it rewrites the reference continuation in chat mode."""
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    """Repetition guard of plain continuations (1: none)."""


class LoraConfig(StrictModel):
    """Low-rank adapters (peft) when method is lora."""

    r: int = Field(16, ge=1)
    """Adapter rank."""
    alpha: int = Field(32, ge=1)
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Projection names that get adapters."""


class TrainingConfig(StrictModel):
    """Recovery fine-tuning of the student (loss on answer tokens only)."""

    method: Literal["full", "lora"] = "full"
    """full: every weight trains; lora: low-rank adapters, merged into the saved model."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training set (fractions allowed)."""
    lr: float = Field(1e-4, gt=0)
    """Peak AdamW learning rate (linear warm-up over 10% of the steps, then ``decay`` to zero). 1e-4 to 2e-4 is the
    usual range for full fine-tuning of a pruned model."""
    decay: Literal["cosine", "linear"] = "cosine"
    """Learning-rate decay after the warm-up."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    batch_size: int = Field(8, ge=1)
    """Examples per optimiser step, over all workers (micro-batches accumulate up to it)."""
    micro_batch: int = Field(4, ge=1)
    """Examples per forward pass on one worker."""
    max_length: int = Field(256, ge=16)
    """Prompt + answer tokens per example (longer ones are cut, and counted)."""
    checkpoint_every: int = Field(10, ge=1)
    """Optimiser steps between checkpoints (a rerun after a crash resumes from the last one)."""
    bf16: bool = True
    """bfloat16 autocast for forward/backward (weights and optimizer stay fp32)."""
    lora: LoraConfig = LoraConfig()
    """Adapter settings (method lora)."""


class KDConfig(StrictModel):
    """Logit distillation (mode kd): the student matches the teacher's next-token distribution on the answers."""

    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of both distributions (the KL is scaled by its square)."""
    weight: float = Field(1.0, ge=0, le=1)
    """Share of the KL in the loss; the rest is the cross-entropy on the curated answers (1: pure KD, as
    Minitron recovers pruned models)."""


class DistillRuntime(ActorPoolConfig, WorkersConfig):
    """Resources: the teacher's actor pool (num_actors, cpus_per_actor, gpus_per_actor, threads), then the training
    workers (num_workers, cpus_per_worker, use_gpu, max_failures). None of these change the results."""


class DistillConfig(JobConfig):
    """Self-data distillation: the teacher rewrites the curated answers, the (pruned) student is fine-tuned on them.

    mode=distilled: the teacher (the unpruned model) rewrites every curated answer, a filter keeps or rejects each
    rewrite (rejected ones fall back to the original answer, every decision counted), and the student is fine-tuned
    on the result. mode=sft: the student is fine-tuned on the curated answers as they are (the plain-SFT ablation;
    with the unpruned model as student it is the base+curated ablation). mode=kd: logit distillation, the student
    learns the teacher's next-token distributions on the curated answers. Plain documents become continuation
    tasks.
    Outputs: distilled/ (Parquet), model/ (the fine-tuned student), checkpoints/, metrics.json, report.html.
    """

    JOB: ClassVar[str] = "distill"

    mode: Literal["distilled", "sft", "kd"] = "distilled"
    """distilled: train on the teacher's filtered rewrites; sft: train on the curated answers as they are; kd: train
    on the curated answers to match the teacher's next-token distributions (logit distillation, see ``kd``)."""
    student: str
    """Model to fine-tune: usually a prune stage (its pruned model)."""
    teacher: str | None = "smollm2-135m"
    """Teacher for mode=distilled and mode=kd: the unpruned base model (or a stronger one with the same
    tokenizer). In mode kd it is loaded beside the student on every training worker."""
    data: str
    """Curated examples: a curate stage (its subset) or a dataset with text, or prompt and answer, columns."""
    replay: str | None = None
    """General text mixed into training (a dataset with a text column, e.g. the corpus pool), so the student does not
    drift from the rest of the distribution: its rows become continuation tasks trained as they are (in mode kd
    against the teacher too), never rewritten. Rows whose id is in the curated set are left out."""
    replay_share: float = Field(0.2, ge=0.0, lt=0.9)
    """Share of the training examples drawn from ``replay`` (when it is set)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Teacher dtype for generation."""
    seed: int = 0
    """Seed for sampling, shuffling and initialisation."""
    generation: GenerationConfig = GenerationConfig()
    """Teacher generation."""
    training: TrainingConfig = TrainingConfig()
    """Fine-tuning."""
    kd: KDConfig = KDConfig()
    """Logit distillation (mode kd)."""
    runtime: DistillRuntime = DistillRuntime()
    """Resources (not part of the config hash)."""

    def input_uris(self) -> list[str]:
        return ([self.student, self.data] + ([self.teacher] if self.uses_teacher and self.teacher else [])
                + ([self.replay] if self.replay else []))

    @property
    def uses_teacher(self) -> bool:
        return self.mode in ("distilled", "kd")

    def gpus_per_worker(self) -> float:
        teacher = self.runtime.gpus_per_actor if self.mode == "distilled" else 0.0
        return max(teacher, 1.0 if self.runtime.use_gpu else 0.0)

    @property
    def teacher_model(self) -> str:
        """The teacher of mode=distilled or kd (the validator below makes sure there is one)."""
        if not self.teacher:
            raise ValueError(f"mode={self.mode} needs a teacher")
        return self.teacher

    @model_validator(mode="after")
    def _teacher_needed(self) -> DistillConfig:
        if self.uses_teacher and not self.teacher:
            raise ValueError(f"mode={self.mode} needs a teacher")
        if self.training.micro_batch > self.training.batch_size:
            raise ValueError("training.micro_batch cannot exceed training.batch_size")
        return self
