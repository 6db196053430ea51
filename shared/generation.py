"""Prompting and batched generation for causal LMs (chat templates when the tokenizer has one)."""

from __future__ import annotations

from typing import Any

import torch


def chat_prompt(tokenizer: Any, user: str, system: str | None = None) -> str:
    """The text the model sees for one user turn: its chat template with a generation prompt, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (system + "\n\n" if system else "") + user + "\n"


@torch.inference_mode()
def generate_text(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Generate a continuation for each prompt (left-padded batch); returns only the new text."""
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = saved_side
    if seed is not None:
        torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": max_new_tokens,
                              "pad_token_id": tokenizer.pad_token_id}
    if do_sample:
        kwargs["temperature"] = temperature
    out = model.generate(**batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
