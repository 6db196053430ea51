"""Evaluation of causal LMs: per-example token NLL (perplexity), multiple choice by answer log-likelihood, exact
match of final answers."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from shared.distill.teacher import final_number
from shared.lm_data import IGNORE, LMExample, collate


@torch.inference_mode()
def example_nll(model: Any, examples: Sequence[LMExample], pad_id: int) -> list[tuple[float, int]]:
    """(summed next-token NLL, target tokens) for each example, in one forward pass."""
    batch = collate(examples, pad_id)
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False).logits.float()
    labels = batch["labels"][:, 1:].to(device)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    counted = labels != IGNORE
    return [(float(nll[i][counted[i]].sum()), int(counted[i].sum())) for i in range(len(examples))]


def choice_examples(tokenizer: Any, context: str, choices: Sequence[str], max_length: int) -> list[LMExample]:
    """One example per choice: the context (no loss) followed by the choice (loss on its tokens)."""
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    out = []
    for choice in choices:
        ans = tokenizer(" " + str(choice).strip(), add_special_tokens=False)["input_ids"]
        ids = (ctx + ans)[-max_length:]
        labels = ([IGNORE] * len(ctx) + ans)[-max_length:]
        out.append(LMExample(tuple(ids), tuple(labels)))
    return out


def pick_choice(model: Any, tokenizer: Any, context: str, choices: Sequence[str], max_length: int) -> int:
    """The choice with the highest total log-likelihood after the context."""
    scores = [-nll for nll, _ in example_nll(model, choice_examples(tokenizer, context, choices, max_length),
                                            tokenizer.pad_token_id)]
    return int(max(range(len(scores)), key=scores.__getitem__))


def normalise_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def exact_match(prediction: str, reference: str) -> bool:
    """Final numbers when the reference has one, else the normalised first line."""
    expected = final_number(reference)
    if expected is not None:
        return final_number(prediction) == expected
    first = prediction.strip().splitlines()[0] if prediction.strip() else ""
    return normalise_answer(first) == normalise_answer(reference)
