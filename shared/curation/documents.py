"""The corpus as curation reads it, before any model runs: a piece's documents as columns (``id``, text, ``label``),
and the survey pass over them (rows, the raw n-gram counts for DSIR, and the SAE's uniform sample). Plain numpy and
pyarrow, no torch, so the tasks that read and join the corpus start fast.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from shared.curation.ngram import hashed_ngrams, stable_uniform

Batch = dict[str, np.ndarray]


def as_text(value: Any) -> str | None:
    """A cell as text: str as is, UTF-8 bytes decoded, anything else None (counted as ``not_text``)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def content_ids(batch: Batch, column: str) -> Batch:
    """Stable ids for corpora without an id column: a digest of the text (the same for every partitioning)."""
    batch["id"] = np.array([f"doc-{hashlib.blake2b(str(t).encode(), digest_size=8).hexdigest()}"
                            for t in batch[column]], dtype=object)
    return batch


def document_columns(table: pa.Table, text_column: str, id_column: str, label_column: str) -> Batch:
    """A piece of the corpus as the columns the steps read: ``id`` (the id column, or a digest of the text),
    the text column, and ``label`` when there is a label column."""
    if table.num_rows == 0:
        return {text_column: np.array([], dtype=object), "id": np.array([], dtype=object)}
    cols: Batch = {text_column: table.column(text_column).to_numpy(zero_copy_only=False)}
    if id_column in table.column_names:
        cols["id"] = np.array([str(i) for i in table.column(id_column).to_pylist()], dtype=object)
    else:
        cols = content_ids(cols, text_column)
    if label_column in table.column_names:
        cols["label"] = table.column(label_column).to_numpy(zero_copy_only=False)
    return cols


SAMPLE_SALT = "sae-sample"
"""Salts the sample's keys, so the SAE's training sample is independent of the random baseline's selection."""
HELDOUT_SALT = "sae-heldout"
"""Salts the keys that hold documents of the sample out of SAE training."""


@dataclass
class Survey:
    """What one pass over the corpus learns before any model runs: rows, the raw n-gram distribution (DSIR), and
    the SAE's training sample: the ``size`` documents with the smallest hash of (id, seed), so the sample is
    uniform and the same for every split of the corpus and every worker count. Texts are kept only for the first
    ``text_size`` of them (the reference documents of coordinate selection): the driver's memory stays small."""

    size: int
    text_size: int
    rows: int = 0
    counts: np.ndarray | None = None
    keys: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    pieces: list[int] = field(default_factory=list)
    """The piece each sample document is in."""
    texts: list[str] = field(default_factory=list)

    def add(self, other: Survey) -> Survey:
        """Merge another piece's survey (keeps only the ``size`` best sample documents)."""
        keys, ids, pieces = self.keys + other.keys, self.ids + other.ids, self.pieces + other.pieces
        texts = dict(zip(self.ids, self.texts)) | dict(zip(other.ids, other.texts))
        order = sorted(range(len(keys)), key=lambda i: (keys[i], ids[i]))[: self.size]
        counts = other.counts if self.counts is None else self.counts + (
            other.counts if other.counts is not None else 0)
        return Survey(self.size, self.text_size, self.rows + other.rows, counts, [keys[i] for i in order],
                      [ids[i] for i in order], [pieces[i] for i in order],
                      [texts[ids[i]] for i in order[: self.text_size] if ids[i] in texts])

    ROW_FIELDS = ("rows", "counts", "keys", "ids", "pieces", "texts")
    """The fields a survey travels as between processes: Arrow-native columns (numbers, lists), not a pickle."""

    def row(self) -> dict[str, Any]:
        """This survey as one row of :attr:`ROW_FIELDS` (counts as int64; empty when there are none)."""
        counts = self.counts if self.counts is not None else np.zeros(0, dtype=np.int64)
        return {"rows": self.rows, "counts": counts.astype(np.int64), "keys": list(self.keys),
                "ids": list(self.ids), "pieces": list(self.pieces), "texts": list(self.texts)}

    @classmethod
    def from_row(cls, row: dict[str, Any], size: int, text_size: int) -> Survey:
        """The survey a :meth:`row` holds."""
        counts = np.asarray(row["counts"], dtype=np.int64)
        return cls(size, text_size, int(row["rows"]), counts if counts.size else None,
                   [float(k) for k in row["keys"]], [str(i) for i in row["ids"]], [int(p) for p in row["pieces"]],
                   [str(t) for t in row["texts"]])

    def heldout(self, fraction: float, seed: int) -> dict[str, bool]:
        """Which sample documents are held out of SAE training: a hash of (id, seed) below ``fraction``, and at
        least one document when the sample has two or more."""
        keys = stable_uniform([f"{HELDOUT_SALT}:{i}" for i in self.ids], seed)
        out = {i: bool(k < fraction) for i, k in zip(self.ids, keys)}
        if fraction > 0 and len(self.ids) >= 2 and not any(out.values()):
            out[self.ids[int(np.argmin(keys))]] = True
        return out


def survey(cols: Batch, text_column: str, buckets: int, seed: int, size: int, fraction: float, piece: int = 0,
           text_size: int = 0) -> Survey:
    """One piece's :class:`Survey`: its n-gram counts, and its usable documents whose sample key is below
    ``fraction`` (at most ``size`` of them, texts for the first ``text_size``)."""
    texts = [as_text(t) for t in cols[text_column]]
    ids = [str(i) for i in cols["id"]]
    counts = np.zeros(buckets, dtype=np.int64)  # integers: the sum is exact in any order
    for text in texts:
        if text:
            counts += hashed_ngrams(text, buckets).astype(np.int64)
    keys = stable_uniform([f"{SAMPLE_SALT}:{i}" for i in ids], seed)
    usable = [j for j, t in enumerate(texts) if t and t.strip() and keys[j] < fraction]
    usable = sorted(usable, key=lambda j: (keys[j], ids[j]))[:size]
    return Survey(size, text_size, len(ids), counts, [float(keys[j]) for j in usable], [ids[j] for j in usable],
                  [piece] * len(usable), [texts[j] or "" for j in usable[:text_size]])
