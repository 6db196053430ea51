"""Token-weighted language-modelling loss and perplexity of a causal LM on encoded examples.

    total = evaluate_loss(model, examples, batch_size=8, pad_id=tokenizer.pad_token_id)
    print(total.mean, total.perplexity, total.tokens)

Every target token counts once, whatever batch or example it sits in: sums of negative log-likelihood and of
tokens are kept separately, so shards evaluated on different workers combine exactly (``LossSum.__add__``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from shared.lm_data import IGNORE, LMExample, batches


@dataclass(frozen=True)
class LossSum:
    """Summed negative log-likelihood (nats) over ``tokens`` target tokens."""

    nll: float = 0.0
    tokens: int = 0

    def __add__(self, other: LossSum) -> LossSum:
        return LossSum(self.nll + other.nll, self.tokens + other.tokens)

    @property
    def mean(self) -> float:
        """Mean loss per token (nan when there is no token)."""
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean) if self.tokens else float("nan")


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """(summed KL(teacher || student) of the next-token distributions at ``temperature``, times temperature**2 so
    gradients keep their scale, over the target tokens; their number). Logits [batch, seq, vocab]."""
    keep = labels[:, 1:].reshape(-1) != IGNORE
    vocab = student_logits.shape[-1]
    student = student_logits[:, :-1, :].reshape(-1, vocab)[keep].float() / temperature
    teacher = teacher_logits[:, :-1, :].reshape(-1, vocab)[keep].float() / temperature
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                  reduction="sum")
    return kl * temperature**2, int(keep.sum())


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL, number of target tokens) for logits [batch, seq, vocab] and labels [batch, seq]."""
    shifted = labels[:, 1:].reshape(-1)
    scores = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    nll = F.cross_entropy(scores, shifted, ignore_index=IGNORE, reduction="sum")
    return nll, int((shifted != IGNORE).sum())


def batch_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Forward one collated batch through a causal LM; (summed NLL, target tokens). Gradients flow if enabled."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False)
    return token_nll(out.logits, batch["labels"].to(device))


@torch.no_grad()
def evaluate_loss(model: Any, examples: Sequence[LMExample], *, batch_size: int, pad_id: int,
                  on_batch: Callable[[int, int, LossSum], None] | None = None) -> LossSum:
    """Token-weighted loss of ``model`` over ``examples`` (eval mode, no gradients). ``on_batch(i, n, total)``
    is called after each batch, for progress lines."""
    was_training = model.training
    model.eval()
    total = LossSum()
    n = math.ceil(len(examples) / batch_size) if examples else 0
    try:
        for i, batch in enumerate(batches(examples, batch_size, pad_id), 1):
            nll, tokens = batch_nll(model, batch)
            total = total + LossSum(float(nll), tokens)
            if on_batch is not None:
                on_batch(i, n, total)
    finally:
        model.train(was_training)
    return total


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 512, batch_size: int = 8
               ) -> float:
    """Perplexity of ``model`` on plain texts (each cut at ``max_length`` tokens), token-weighted."""
    from shared.lm_data import encode_texts

    examples, _ = encode_texts(tokenizer, texts, max_length)
    if not examples:
        raise ValueError("no text with at least two tokens to evaluate")
    return evaluate_loss(model, examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id).perplexity
