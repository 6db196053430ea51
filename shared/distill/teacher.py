"""What the teacher is asked, and the filter that decides whether its rewrite replaces the original answer.

Self-data distillation (Thangarasa et al., 2024): the unpruned model rewrites each curated answer, conditioned on the
instruction and the original answer, so the student is fine-tuned on text from its own (unpruned) distribution; a
continuation task is continued by the teacher as plain text, the format the student trains in.
A rewrite is kept only if it passes every check; otherwise the original answer is used, and every decision is
counted.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from shared.distill.examples import Example

LEAK_PHRASES = (
    "reference answer", "original answer", "the given response", "given answer", "in your own words",
    "rewrite", "rewritten", "original continuation", "the continuation", "here is the", "here's the",
    "as an ai", "i cannot", "i'm sorry",
)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
REASONS = ("kept", "kept_trimmed", "empty", "truncated", "leak", "degenerate", "unfaithful", "answer_mismatch")
WORD = re.compile(r"[a-z0-9']+")
MAX_REPEATED_SHARE = 0.3
"""A text whose word 4-grams are repeats for more than this share is degenerate (a loop)."""
MAX_COMPRESSION = 3.0
"""A text that zlib compresses more than this many times is degenerate (long repeated spans)."""
MIN_OVERLAP = 0.3
"""An instruction rewrite that keeps less than this share of the original answer's content words is unfaithful."""


def repeated_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier one."""
    words = WORD.findall(text.lower())
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / max(1, len(zlib.compress(data, 9))) if data else 0.0


MIN_CONTENT_WORDS = 5
"""Faithfulness is judged only on originals with at least this many content words (short answers have the final
number check)."""


def content_overlap(original: str, rewrite: str) -> float:
    """Share of the original's content words (longer than three letters, or with a digit) that the rewrite uses;
    1.0 when the original has fewer than :data:`MIN_CONTENT_WORDS`."""
    theirs = {w for w in WORD.findall(original.lower()) if len(w) > 3 or any(c.isdigit() for c in w)}
    mine = set(WORD.findall(rewrite.lower()))
    return len(theirs & mine) / len(theirs) if len(theirs) >= MIN_CONTENT_WORDS else 1.0


def teacher_request(example: Example) -> str:
    """The user turn given to the teacher (wrapped in its chat template by the generation code)."""
    if example.kind == "instruction":
        return (f"{example.prompt}\n\nReference answer:\n{example.answer}\n\n"
                "Rewrite the reference answer in your own words. Keep every fact and the final result. "
                "Reply with the answer only.")
    return (f"Here is the beginning of a text:\n{example.prompt}\n\nThis is how it continues:\n{example.answer}\n\n"
            "Rewrite the continuation in your own words, keeping its facts and style. "
            "Reply with the continuation only.")


def final_number(text: str) -> float | None:
    """The last number in a text (a GSM8K-style '#### 42' included), or None."""
    found = NUMBER.findall(text.split("####")[-1] if "####" in text else text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


@dataclass(frozen=True)
class Decision:
    answer: str
    """The answer the student trains on."""
    source: str
    """'teacher' or 'original'."""
    reason: str
    """One of :data:`REASONS`."""


def complete_sentences(text: str) -> str:
    """``text`` up to its last sentence end ('' when it has none)."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]].strip() if ends else ""


def judge(example: Example, output: str, finished: bool, min_words: int = 3) -> Decision:
    """Keep the teacher's rewrite only when it is non-empty, finished, leaks nothing of the prompt template, is not
    degenerate (loops, long repeats), keeps the content of an instruction's original answer, and (when the original
    has a final number) ends on the same number.

    An instruction answer cut at max_new_tokens is rejected (its end, often the result, is missing). A continuation
    has no natural end (its original is itself a cut piece of a document), so one that ran out of tokens is kept up
    to its last complete sentence (``kept_trimmed``) when at least ``min_words`` words remain.
    """
    text = output.strip()
    if len(text.split()) < min_words:
        return Decision(example.answer, "original", "empty")
    kept = "kept"
    if not finished:
        text = complete_sentences(text) if example.kind == "continuation" else ""
        if len(text.split()) < min_words:
            return Decision(example.answer, "original", "truncated")
        kept = "kept_trimmed"
    lowered = text.lower()
    if any(phrase in lowered for phrase in LEAK_PHRASES):
        return Decision(example.answer, "original", "leak")
    if repeated_share(text) > MAX_REPEATED_SHARE or compression_ratio(text) > MAX_COMPRESSION:
        return Decision(example.answer, "original", "degenerate")
    if example.kind == "instruction" and content_overlap(example.answer, text) < MIN_OVERLAP:
        return Decision(example.answer, "original", "unfaithful")
    expected = final_number(example.answer) if example.kind == "instruction" else None
    if expected is not None and final_number(text) != expected:
        return Decision(example.answer, "original", "answer_mismatch")
    return Decision(text, "teacher", kept)


def tally(decisions: list[Decision]) -> dict[str, int]:
    counts = Counter(d.reason for d in decisions)
    return {reason: counts.get(reason, 0) for reason in REASONS}


def distilled_table(examples: list[Example], decisions: list[Decision], answers: list[str],
                    teacher_text: list[str]) -> pa.Table:
    """The distilled dataset: every example with the answer trained on, where it came from and why (no decisions:
    supervised fine-tuning on the original answers)."""
    return pa.table({
        "id": [e.id for e in examples], "kind": [e.kind for e in examples], "prompt": [e.prompt for e in examples],
        "answer": answers, "original_answer": [e.answer for e in examples],
        "source": [d.source for d in decisions] if decisions else ["original"] * len(examples),
        "reason": [d.reason for d in decisions] if decisions else ["sft"] * len(examples),
        "teacher_output": teacher_text,
    })
