"""Language-modelling examples from text or prompt/answer pairs: token ids and labels, ready to batch.

    examples, stats = encode_table(table, tokenizer, max_length=256)       # 'prompt'+'answer' columns, else 'text'
    for batch in batches(examples, batch_size=4, pad_id=tokenizer.pad_token_id):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])   # labels: batch["labels"]

Labels are -100 wherever no loss is wanted: on prompt tokens (the loss is on the answer only) and on padding. A text
longer than ``max_length`` is cut at ``max_length`` tokens (counted in ``EncodeStats.truncated``); an example left
with no token to predict is skipped and counted by reason, never silently dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.tokens import cap_text

IGNORE = -100
"""Label of a position that carries no loss (prompt, padding); PyTorch's cross_entropy ignore_index."""

Kind = Literal["text", "prompt_answer"]


@dataclass(frozen=True)
class LMExample:
    """One sequence: ``input_ids`` and ``labels`` of equal length (labels are the ids, or IGNORE where no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def target_tokens(self) -> int:
        """Tokens that carry loss once labels are shifted for next-token prediction (the first position never does)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


@dataclass
class EncodeStats:
    """What encoding did to the input rows."""

    kind: Kind
    rows: int = 0
    """Rows encoded (after any sampling)."""
    source_rows: int | None = None
    """Rows in the dataset before sampling (when read by ``load_examples``)."""
    examples: int = 0
    """Examples kept."""
    target_tokens: int = 0
    """Tokens that carry loss, over the kept examples."""
    truncated: int = 0
    """Kept examples that were cut at max_length."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Rows dropped, by reason (empty text, missing answer, nothing left to predict, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source_rows": self.source_rows, "rows": self.rows, "examples": self.examples,
                "target_tokens": self.target_tokens, "truncated": self.truncated, "skipped": dict(self.skipped)}


def _skip(counter: Counter[str], reason: str) -> None:
    counter[reason] += 1


def encode_texts(tokenizer: Any, texts: Sequence[str | None], max_length: int) -> tuple[list[LMExample], EncodeStats]:
    """Plain text: every token after the first is predicted. Special tokens as the tokenizer adds them by default."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    examples: list[LMExample] = []
    skipped: Counter[str] = Counter()
    truncated = 0
    for text in texts:
        if text is None or not str(text).strip():
            _skip(skipped, "empty text")
            continue
        capped, cut = cap_text(str(text), max_length)
        ids = tokenizer(capped, add_special_tokens=True, truncation=True, max_length=max_length + 1)["input_ids"]
        if len(ids) > max_length or cut:
            ids = ids[:max_length]
            truncated += 1
        if len(ids) < 2:
            _skip(skipped, "fewer than 2 tokens")
            continue
        examples.append(LMExample(tuple(ids), tuple(ids)))
    return examples, _stats("text", len(texts), examples, truncated, skipped)


def encode_pairs(tokenizer: Any, prompts: Sequence[str | None], answers: Sequence[str | None], max_length: int,
                 chat: bool = True, prompt_budget: int | None = None) -> tuple[list[LMExample], EncodeStats]:
    """Prompt/answer pairs: the prompt goes through the tokenizer's chat template (as ``shared.generation`` prompts
    the model; with ``chat=False`` it stays plain text, as for continuation tasks), the answer follows with an
    end-of-sequence token, and only answer tokens carry loss. A long answer is cut at ``max_length``; a prompt that
    leaves no room for an answer token skips the pair, unless ``prompt_budget`` is set: then a longer prompt keeps
    only its last ``prompt_budget`` tokens (what a continuation depends on most), counted as truncated."""
    from shared.generation import chat_prompt

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    examples: list[LMExample] = []
    skipped: Counter[str] = Counter()
    truncated = 0
    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token_id
    for prompt, answer in zip(prompts, answers):
        if prompt is None or not str(prompt).strip():
            _skip(skipped, "empty prompt")
            continue
        if answer is None or not str(answer).strip():
            _skip(skipped, "empty answer")
            continue
        prompt_text, prompt_cut = cap_text(str(prompt), max_length, "tail" if prompt_budget is not None else "head")
        answer_text, answer_cut = cap_text(str(answer), max_length)
        text = chat_prompt(tokenizer, prompt_text) if templated else prompt_text
        prompt_ids = tokenizer(text, add_special_tokens=not templated,
                               truncation=True, max_length=max_length)["input_ids"]
        answer_ids = tokenizer(answer_text, add_special_tokens=False, truncation=True,
                               max_length=max_length + 1)["input_ids"]
        cut = prompt_cut or answer_cut
        if eos is not None:
            answer_ids = answer_ids + [eos]
        if prompt_budget is not None and len(prompt_ids) > prompt_budget:
            prompt_ids = prompt_ids[-prompt_budget:]
            cut = True
        room = max_length - len(prompt_ids)
        if room < 1:
            _skip(skipped, "prompt fills max_length")
            continue
        if len(answer_ids) > room:
            answer_ids = answer_ids[:room]
            cut = True
        truncated += int(cut)
        ids = list(prompt_ids) + list(answer_ids)
        labels = [IGNORE] * len(prompt_ids) + list(answer_ids)
        examples.append(LMExample(tuple(ids), tuple(labels)))
    return examples, _stats("prompt_answer", len(prompts), examples, truncated, skipped)


def encode_table(table: Any, tokenizer: Any, max_length: int, text_column: str = "text"
                 ) -> tuple[list[LMExample], EncodeStats]:
    """A pyarrow table: prompt/answer pairs when it has both 'prompt' and 'answer' columns, else ``text_column``.

    Raises KeyError naming the missing column when neither is there (callers turn it into a DataError with the URI).
    """
    names = table.column_names
    if "prompt" in names and "answer" in names:
        return encode_pairs(tokenizer, table.column("prompt").to_pylist(), table.column("answer").to_pylist(),
                            max_length)
    if text_column not in names:
        raise KeyError(text_column)
    return encode_texts(tokenizer, table.column(text_column).to_pylist(), max_length)


def _stats(kind: Kind, rows: int, examples: list[LMExample], truncated: int, skipped: Counter[str]) -> EncodeStats:
    return EncodeStats(kind=kind, rows=rows, examples=len(examples),
                       target_tokens=sum(e.target_tokens for e in examples), truncated=truncated,
                       skipped=dict(sorted(skipped.items())))


def collate(examples: Sequence[LMExample], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask (1 on real tokens) and labels (IGNORE on padding)."""
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: Sequence[LMExample], batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    """Consecutive micro-batches of ``batch_size`` examples (the last one may be smaller), collated."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id)


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Every ``world_size``-th item starting at ``rank``: disjoint shards that together cover the input."""
    return list(items[rank::world_size])


def load_examples(uri: str, tokenizer: Any, *, max_length: int, max_examples: int, seed: int = 0,
                  text_column: str = "text", storage: Any = None, what: str = "dataset"
                  ) -> tuple[list[LMExample], EncodeStats]:
    """Read a dataset URI (see ``shared.data``), take a seeded random sample of at most ``max_examples`` rows (kept
    in dataset order) and encode it. A DataError names ``what`` and the URI when it has no rows or no usable
    column."""
    import random

    from shared.data import read_table
    from shared.errors import DataError

    table = read_table(uri, storage)
    source_rows = table.num_rows
    if source_rows == 0:
        raise DataError(f"{what} {uri}: the dataset is empty")
    if source_rows > max_examples:
        rows = sorted(random.Random(seed).sample(range(source_rows), max_examples))
        table = table.take(rows)
    try:
        examples, stats = encode_table(table, tokenizer, max_length, text_column)
        stats.source_rows = source_rows
        return examples, stats
    except KeyError:
        raise DataError(f"{what} {uri}: no '{text_column}' column and no 'prompt'/'answer' columns "
                        f"(columns: {', '.join(table.column_names) or 'none'})") from None
