"""Prompting and batched generation for causal LMs (chat templates when the tokenizer has one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def chat_prompt(tokenizer: Any, user: str, system: str | None = None) -> str:
    """The text the model sees for one user turn: its chat template with a generation prompt, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (system + "\n\n" if system else "") + user + "\n"


@dataclass(frozen=True)
class Generated:
    texts: list[str]
    """The new text of each prompt."""
    finished: list[bool]
    """Whether each ended with the end-of-sequence token (rather than at max_new_tokens)."""
    new_tokens: int
    """Generated tokens, padding excluded."""


@torch.inference_mode()
def stop_token_ids(tokenizer: Any) -> list[int]:
    """Every token that ends a generation: the tokenizer's end of sequence, and the end-of-turn and end-of-text
    tokens of chat models (``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``) where the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] + [vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate_batch(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, do_sample: bool = False,
                   temperature: float = 1.0, seed: int | None = None, repetition_penalty: float = 1.0,
                   add_special_tokens: bool = False) -> Generated:
    """One left-padded batch through ``model.generate`` on the model's device: greedy unless ``do_sample``; with a
    ``seed`` the sampling is reproducible; it stops at any of :func:`stop_token_ids`. The one generation routine of
    scopeforge (teacher rewrites, evaluation, samples)."""
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True,
                          add_special_tokens=add_special_tokens).to(model.device)
    finally:
        tokenizer.padding_side = saved_side
    if seed is not None:
        torch.manual_seed(seed)
    stops = stop_token_ids(tokenizer)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature if do_sample else None, top_p=None, top_k=None,
                         repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
    new = out[:, batch["input_ids"].shape[1]:]
    finished = [bool(torch.isin(row, torch.tensor(stops, device=row.device)).any()) for row in new]
    return Generated(tokenizer.batch_decode(new, skip_special_tokens=True), finished,
                     int((new != tokenizer.pad_token_id).sum()))


def generate_text(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, do_sample: bool = False,
                  temperature: float = 1.0, seed: int | None = None) -> list[str]:
    """Generate a continuation for each prompt (left-padded batch); returns only the new text."""
    return generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, seed=seed).texts
