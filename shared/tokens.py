"""A bound on the text handed to a tokenizer, so one huge document cannot stall or exhaust a worker.

A fast tokenizer normalizes and pre-tokenizes the whole string before it truncates, so ``truncation=True`` alone
still costs time and memory in proportion to the document: a 100 MB row takes seconds and gigabytes to give its
first 128 tokens. Every text is therefore cut to ``max_tokens * CHARS_PER_TOKEN`` characters first; the cut is
reported like any other truncation.
"""

from __future__ import annotations

from typing import Literal

CHARS_PER_TOKEN = 32
"""Characters kept per wanted token: far above what BPE tokenizers average on prose or code (about 3-5), so a cut
text still yields ``max_tokens`` tokens; only the tail beyond that is never tokenized."""


def cap_text(text: str, max_tokens: int, keep: Literal["head", "tail"] = "head") -> tuple[str, bool]:
    """(the text, or its first / last ``max_tokens * CHARS_PER_TOKEN`` characters; whether it was cut)."""
    limit = max(1, max_tokens) * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text, False
    return (text[:limit] if keep == "head" else text[-limit:]), True
