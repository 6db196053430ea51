"""Real English text for tests: passages of the standard library's docstrings (see shared/doc_text.py)."""

from __future__ import annotations

from shared.doc_text import docstring_passages as chunks  # noqa: F401
from shared.doc_text import module_paragraphs  # noqa: F401

CALIBRATION_MODULES = ("json", "os", "re", "collections", "functools", "itertools", "pathlib", "subprocess",
                       "argparse", "logging", "typing", "dataclasses", "socket", "csv", "datetime", "decimal")
HELD_OUT_MODULES = ("fractions", "random", "statistics", "string", "textwrap", "threading", "queue", "shutil",
                    "tempfile", "zipfile", "tarfile", "heapq", "contextlib", "enum", "pickle")
