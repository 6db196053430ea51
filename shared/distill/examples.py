"""Training examples from curated rows: instruction/answer pairs as they are, plain documents as continuation tasks
(the first part of the document is the prompt, the rest the answer)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from shared.errors import DataError


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    """What the student sees before its answer (for continuation tasks: the document's first part, as plain text)."""
    answer: str
    """The original answer (for continuation tasks: the rest of the document)."""
    kind: str
    """'instruction' (the data had prompt/answer columns) or 'continuation'."""


def split_document(text: str, prompt_fraction: float, min_answer_words: int) -> tuple[str, str] | None:
    """Cut a document at a line (else word) boundary near ``prompt_fraction`` of its words; None when the answer
    would be shorter than ``min_answer_words``."""
    words = text.split()
    if len(words) < 2 * min_answer_words:
        return None
    target = max(1, int(len(words) * prompt_fraction))
    lines = text.splitlines(keepends=True)
    count, cut = 0, None
    for i, line in enumerate(lines):
        count += len(line.split())
        if count >= target:
            cut = i + 1
            break
    prompt = "".join(lines[:cut]) if cut is not None else ""
    answer = "".join(lines[cut:]) if cut is not None else ""
    if len(answer.split()) < min_answer_words or not prompt.strip():  # one long line: cut by words instead
        prompt, answer = " ".join(words[:target]) + " ", " ".join(words[target:])
    return (prompt, answer.strip()) if len(answer.split()) >= min_answer_words else None


def build_examples(rows: list[dict], prompt_fraction: float, min_answer_words: int) -> tuple[list[Example], int]:
    """(examples, documents too short to split). Rows with ``prompt`` and ``answer`` keep them; rows with only
    ``text`` become continuation tasks. Ids must be unique: each example gets its own teacher rewrite by id."""
    examples, too_short = [], 0
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        rid = str(row["id"]) if row.get("id") is not None else str(i)
        if rid in seen:
            raise DataError(f"id '{rid}' is on rows {seen[rid]} and {i}; ids must be unique (each example gets its "
                            "own teacher rewrite)")
        seen[rid] = i
        if row.get("prompt") and row.get("answer"):
            examples.append(Example(rid, str(row["prompt"]), str(row["answer"]), "instruction"))
            continue
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            too_short += 1
            continue
        split = split_document(text, prompt_fraction, min_answer_words)
        if split is None:
            too_short += 1
            continue
        examples.append(Example(rid, split[0], split[1], "continuation"))
    if not examples:
        raise DataError(f"no usable examples: {len(rows)} rows, {too_short} too short or empty to split")
    return examples, too_short


def replay_examples(rows: list[dict], exclude: set[str], share: float, curated: int, prompt_fraction: float,
                    min_answer_words: int, seed: int) -> list[Example]:
    """Continuation tasks from general text so that they make ``share`` of the training set beside ``curated``
    examples: a seeded sample of the rows whose ids are not in ``exclude`` (the curated ones). Fewer when the text
    has fewer usable rows."""
    want = round(share / (1.0 - share) * curated) if share > 0 else 0
    candidates = [r for i, r in enumerate(rows) if str(r.get("id", i)) not in exclude]
    random.Random(f"{seed}:replay").shuffle(candidates)
    out: list[Example] = []
    for row in candidates:
        if len(out) >= want:
            break
        text = row.get("text")
        split = split_document(text, prompt_fraction, min_answer_words) if isinstance(text, str) else None
        if split is not None:
            out.append(Example(f"replay:{row.get('id', len(out))}", split[0], split[1], "continuation"))
    return out
