"""Recovery fine-tuning in plain torch: the student (full or LoRA), the step schedule, answer-only loss, checkpoints.

The loop itself lives in the Ray Train glue (``ray_jobs/distill.py``); everything here works without Ray, so the
same steps run in a bare loop, a test or a benchmark.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from shared.lm_data import LMExample, collate
from shared.perplexity import batch_nll, token_kl, token_nll


def prepare_student(model: Any, method: str, lora: Any | None) -> Any:
    """Full fine-tuning trains every weight; LoRA wraps the model with peft adapters (the rest frozen)."""
    model.train()
    if method == "full":
        return model
    if lora is None:
        raise ValueError(f"method {method!r} needs the lora settings (r, alpha, dropout, target_modules)")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@dataclass(frozen=True)
class Schedule:
    """Steps and the learning rate: linear warm-up over 10% of the steps, then a cosine (or linear) decay to zero."""

    examples: int
    batch_size: int
    epochs: float
    decay: str = "cosine"
    """cosine or linear."""

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.examples / self.batch_size))

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.steps_per_epoch * self.epochs))

    def lr_factor(self, step: int) -> float:
        warmup = max(1, int(0.1 * self.total_steps))
        if step < warmup:
            return (step + 1) / warmup
        left = max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))  # 1 -> 0 after warm-up
        return left if self.decay == "linear" else 0.5 * (1.0 - math.cos(math.pi * left))


def step_examples(examples: Sequence[LMExample], step: int, schedule: Schedule, rank: int, world_size: int,
                  seed: int) -> list[LMExample]:
    """This worker's share of the examples of one optimiser step.

    Each epoch is a seeded permutation of all examples; step s takes the next ``batch_size`` of it and worker r the
    r-th, (r+world)-th, ... of those. The choice depends only on (seed, step), so a resumed run continues exactly.
    """
    per_epoch = schedule.steps_per_epoch
    epoch, index = divmod(step, per_epoch)
    order = list(range(len(examples)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    chosen = order[index * schedule.batch_size: (index + 1) * schedule.batch_size]
    return [examples[i] for i in chosen[rank::world_size]]


@dataclass(frozen=True)
class Distiller:
    """Logit distillation: a frozen teacher and how its distribution enters the loss."""

    teacher: Any
    temperature: float = 1.0
    weight: float = 1.0
    """Share of the KL term; the rest is the cross-entropy on the answers."""

    def loss(self, student: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed loss over the answer tokens of one collated batch: weight * KL + (1 - weight) * NLL."""
        device = next(student.parameters()).device
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                  "use_cache": False}
        labels = batch["labels"].to(device)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        logits = student(**inputs).logits
        kl, _ = token_kl(logits, teacher_logits, labels, self.temperature)
        if self.weight >= 1.0:
            return kl
        nll, _ = token_nll(logits, labels)
        return self.weight * kl + (1.0 - self.weight) * nll


def train_step(model: Any, optimizer: torch.optim.Optimizer, examples: Sequence[LMExample], micro_batch: int,
               pad_id: int, bf16: bool, no_sync: Any = None, distiller: Distiller | None = None) -> tuple[float, int]:
    """One optimiser step over ``examples`` in micro-batches; the loss is the mean over their answer tokens (the
    cross-entropy, or with a ``distiller`` its KL to the teacher).

    Returns (loss, target tokens). ``no_sync`` (DDP's context manager) skips gradient all-reduce on all but the
    last micro-batch.
    """
    optimizer.zero_grad(set_to_none=True)
    parts = [examples[i: i + micro_batch] for i in range(0, len(examples), micro_batch)]
    tokens = sum(e.target_tokens for e in examples)
    total = 0.0
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        sync = nullcontext() if last or no_sync is None else no_sync()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and next(model.parameters()).device.type \
            == "cpu" else torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
        with sync, autocast:
            batch = collate(part, pad_id)
            summed = distiller.loss(model, batch) if distiller is not None else batch_nll(model, batch)[0]
            loss = summed / max(1, tokens)
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 1.0)
    optimizer.step()
    return total, tokens


def merged_for_saving(model: Any) -> Any:
    """The plain model to save: DDP unwrapped, LoRA adapters merged into the weights."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "merge_and_unload"):
        inner = inner.merge_and_unload()
    return inner


def encode_for_training(tokenizer: Any, examples: Sequence[Any], answers: Sequence[str], max_length: int
                        ) -> tuple[list[LMExample], dict[str, int]]:
    """(prompt, answer) pairs as token ids with the loss on the answer only: instructions through the chat template,
    continuations as plain text with at most half the budget for the prompt. Also counts truncated and skipped."""
    from shared.lm_data import encode_pairs

    chat = [e.kind == "instruction" for e in examples]
    encoded: list[LMExample] = []
    counts = {"truncated": 0, "skipped": 0}
    for flag in (True, False):
        idx = [i for i, c in enumerate(chat) if c == flag]
        if idx:
            found, stats = encode_pairs(tokenizer, [examples[i].prompt for i in idx], [answers[i] for i in idx],
                                        max_length, chat=flag, prompt_budget=None if flag else max_length // 2)
            encoded.extend(found)
            counts["truncated"] += stats.truncated
            counts["skipped"] += sum(stats.skipped.values())
    return encoded, counts
