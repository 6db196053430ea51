"""The teacher's step of self-data distillation: a cheap constructor, ``setup()`` that loads the teacher once per
worker, and ``__call__(batch)`` that writes the answer of every example of a batch of columns (id, prompt, answer,
kind) with the one shared batched-generation routine (``shared.generation.generate_batch``): instruction answers
rewritten in the chat template with the reference in context, continuations continued as plain text (the format
the student trains in) unless ``continuation_style`` is ``paraphrase``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.config import StorageConfig
from shared.distill.examples import Example
from shared.distill.teacher import teacher_request
from shared.errors import DataError

Batch = dict[str, np.ndarray]


@dataclass
class TeacherRewriter:
    teacher: str
    """The teacher causal LM (a name, path, ``s3://`` URI or a stage that produced a model)."""
    generation: Any
    """A GenerationConfig: max_new_tokens, do_sample, temperature."""
    seed: int
    dtype: str = "float32"
    device: str = "cpu"
    storage: StorageConfig | None = None

    def setup(self) -> None:
        from shared.models import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(self.teacher, dtype=self.dtype, device=self.device,
                                                    storage=self.storage)

    def __call__(self, batch: Batch) -> Batch:
        """The batch with ``teacher_output`` (the rewrite) and ``finished`` (it ended before max_new_tokens)."""
        return self.rewrite(batch)[0]

    def rewrite(self, batch: Batch) -> tuple[Batch, int]:
        """(``__call__``'s columns, tokens generated for the batch)."""
        from shared.generation import chat_prompt, generate_batch

        g = self.generation
        examples = [Example(str(i), str(p), str(a), str(k))
                    for i, p, a, k in zip(batch["id"], batch["prompt"], batch["answer"], batch["kind"])]
        texts, finished, tokens = [""] * len(examples), [False] * len(examples), 0
        plain = [g.continuation_style == "plain" and e.kind == "continuation" for e in examples]
        for group in (True, False):
            rows = [i for i, p in enumerate(plain) if p == group]
            if not rows:
                continue
            # a seed from the group's first example id keeps sampling reproducible across runs and partitionings
            seed = self.seed + sum(ord(c) for c in examples[rows[0]].id)
            if group:  # the student's format: the teacher continues the text itself, about as far as the original
                longest = max(len(self.tokenizer(examples[i].answer, add_special_tokens=False)["input_ids"])
                              for i in rows)
                out = generate_batch(self.model, self.tokenizer, [examples[i].prompt for i in rows],
                                     max_new_tokens=max(8, min(g.max_new_tokens, round(1.25 * longest))),
                                     do_sample=True, temperature=g.temperature, seed=seed,
                                     repetition_penalty=g.repetition_penalty, add_special_tokens=True)
            else:
                out = generate_batch(self.model, self.tokenizer,
                                     [chat_prompt(self.tokenizer, teacher_request(examples[i])) for i in rows],
                                     max_new_tokens=g.max_new_tokens, do_sample=g.do_sample,
                                     temperature=g.temperature, seed=seed)
            for j, i in enumerate(rows):
                texts[i], finished[i] = out.texts[j], out.finished[j]
            tokens += out.new_tokens
        columns = {**batch, "teacher_output": np.array(texts, dtype=object), "finished": np.array(finished)}
        return columns, tokens


def student_tokenizer(student: str, teacher: str | None, storage: StorageConfig | None = None) -> Any:
    """The student's tokenizer; with a teacher, both must share one vocabulary (the student learns the teacher's
    token ids), else a DataError naming both."""
    from shared.models import load_tokenizer

    tokenizer = load_tokenizer(student, storage)
    if teacher is not None:
        theirs = load_tokenizer(teacher, storage)
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise DataError(f"teacher {teacher} and student {student} have different tokenizers "
                            f"({len(theirs)} vs {len(tokenizer)} tokens); distillation needs the same vocabulary")
    return tokenizer

