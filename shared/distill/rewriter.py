"""The teacher's step of self-data distillation: a cheap constructor, ``setup()`` that loads the teacher once per
worker, and ``__call__(batch)`` that rewrites every example of a batch of columns (id, prompt, answer, kind) with the
one shared batched-generation routine (``shared.generation.generate_batch``)."""

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
        prompts = [chat_prompt(self.tokenizer, teacher_request(e)) for e in examples]
        # a seed from the batch's first example id keeps sampling reproducible across runs and partitionings of equal
        # batches
        out = generate_batch(self.model, self.tokenizer, prompts, max_new_tokens=g.max_new_tokens,
                             do_sample=g.do_sample, temperature=g.temperature,
                             seed=self.seed + sum(ord(c) for c in examples[0].id))
        columns = {**batch, "teacher_output": np.array(out.texts, dtype=object), "finished": np.array(out.finished)}
        return columns, out.new_tokens


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

