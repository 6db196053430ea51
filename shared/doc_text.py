"""Real English text read at runtime from installed Python docstrings (nothing is committed or downloaded).

A passage joins consecutive docstring paragraphs of one module until it reaches a word count, so it reads like a
page of technical documentation (about 1.3 tokens per word with SmolLM2's tokenizer). Tests and benchmarks use it as
small domain text (the standard library's docs) beside other domains.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable


def module_paragraphs(name: str, min_words: int = 8) -> list[str]:
    """Docstring paragraphs of a module and of its public functions and classes, whitespace-normalised."""
    module = importlib.import_module(name)
    paragraphs: list[str] = []
    for obj in [module] + [getattr(module, attr) for attr in sorted(dir(module)) if not attr.startswith("_")]:
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or obj is module):
            continue
        doc = inspect.getdoc(obj)
        if doc:
            paragraphs += [" ".join(p.split()) for p in doc.split("\n\n") if len(p.split()) >= min_words]
    return paragraphs


def docstring_passages(modules: Iterable[str], words: int = 120, limit: int | None = None) -> list[str]:
    """Passages of at least ``words`` words, each from one module, without repeated paragraphs."""
    seen: set[str] = set()
    out: list[str] = []
    for name in modules:
        buffer: list[str] = []
        for paragraph in module_paragraphs(name):
            if paragraph in seen:
                continue
            seen.add(paragraph)
            buffer.append(paragraph)
            if sum(len(p.split()) for p in buffer) >= words:
                out.append(" ".join(buffer))
                buffer = []
                if limit is not None and len(out) >= limit:
                    return out
    return out
