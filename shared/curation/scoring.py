"""Per-batch steps of curation, in the shape of a data-pipeline stage: a cheap constructor, ``setup()`` that loads
what the step needs once per worker, and ``__call__(batch)`` from columns (a dict of arrays) to columns.

- :class:`DocumentTokenizer`: text -> token ids, status (``ok`` / ``empty`` / ``not_text``), truncation, and the keys
  of the two baselines without seeds (the DSIR importance key and a uniform random key), all from the document id
  and the config seed, so they do not depend on how the corpus is split into blocks;
- :class:`DocumentScorer`: token ids -> every kind of seed similarity (``<kind>_score``, ``<kind>_seed``,
  ``<kind>_seed_scores``) through a :class:`~shared.curation.model.CurationModel` on one device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from shared.config import StorageConfig
from shared.curation.features import KINDS, Embedder, tokenize
from shared.curation.model import CurationModel
from shared.curation.ngram import gumbel_keys, hashed_ngrams, stable_uniform

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


def score_table(cols: Batch) -> pa.Table:
    """Scored columns as an Arrow table ([N, S] seed-score arrays become fixed-size lists)."""
    arrays = {}
    for name, values in cols.items():
        values = np.asarray(values) if not isinstance(values, np.ndarray) else values
        if values.ndim == 2:
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        else:
            arrays[name] = pa.array(values.tolist() if values.dtype == object else values)
    return pa.table(arrays)


_TOKENIZERS: dict[tuple[str, str], Any] = {}


@dataclass
class DocumentTokenizer:
    model: str
    """Whose tokenizer (a name, path or ``s3://`` URI)."""
    text_column: str
    max_tokens: int
    seed: int
    """Seeds the random and DSIR keys."""
    ngram_weights: np.ndarray
    """DSIR log importance weight per hashed n-gram bucket."""
    storage: StorageConfig | None = None

    def setup(self) -> None:
        """Load the tokenizer (once per worker process: tasks that reuse a worker share it)."""
        from shared.models import load_tokenizer

        key = (self.model, repr(self.storage))
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = load_tokenizer(self.model, self.storage)
        self.tokenizer = _TOKENIZERS[key]

    def __call__(self, batch: Batch) -> Batch:
        if not hasattr(self, "tokenizer"):
            self.setup()
        texts = [as_text(t) for t in batch[self.text_column]]
        status = np.array(["not_text" if t is None else "empty" if not t.strip() else "ok" for t in texts],
                          dtype=object)
        ok = [i for i, s in enumerate(status) if s == "ok"]
        tokenized = tokenize(self.tokenizer, [t for t in (texts[i] for i in ok) if t is not None], self.max_tokens)
        ids: list[list[int]] = [[] for _ in texts]
        truncated = np.zeros(len(texts), dtype=bool)
        for j, i in enumerate(ok):
            ids[i] = tokenized.ids[j]
            truncated[i] = tokenized.truncated[j]
        keys = [str(k) for k in batch["id"]]
        log_w = np.array([float(hashed_ngrams(t or "", len(self.ngram_weights)) @ self.ngram_weights) for t in texts])
        out = {
            "id": np.array(keys, dtype=object),
            "text": np.array([t if t is not None else "" for t in texts], dtype=object),
            "status": status,
            "input_ids": np.array([np.asarray(x, dtype=np.int32).tobytes() for x in ids], dtype=object),  # binary
            "n_tokens": np.array([len(x) for x in ids], dtype=np.int32),
            "truncated": truncated,
            "ngram_key": gumbel_keys(log_w, keys, self.seed),
            "random_key": stable_uniform(keys, self.seed),
        }
        if "label" in batch:
            out["label"] = np.array([str(x) if x is not None else "" for x in batch["label"]], dtype=object)
        return out


@dataclass
class DocumentScorer:
    curation: CurationModel
    micro_batch: int
    """Documents per forward pass (grouped by length)."""
    dtype: str = "float32"
    device: str = "cpu"
    storage: StorageConfig | None = None

    def setup(self) -> None:
        """Load the base model on :attr:`device` and build the embedder (once per actor)."""
        from shared.models import load_causal_lm

        model, tokenizer = load_causal_lm(self.curation.model, dtype=self.dtype, device=self.device,
                                          storage=self.storage)
        self.embedder: Embedder = self.curation.embedder(model, tokenizer)

    def __call__(self, batch: Batch) -> Batch:
        """The tokenized batch with ``input_ids`` replaced by the scores (NaN and seed -1 for unusable rows)."""
        ok = np.flatnonzero(batch["status"] == "ok")
        n, s = len(batch["status"]), len(self.curation.seed_ids)
        scores: dict[str, np.ndarray] = {}
        for kind in KINDS:
            scores[f"{kind}_score"] = np.full(n, np.nan, np.float32)
            scores[f"{kind}_seed"] = np.full(n, -1, np.int32)
            scores[f"{kind}_seed_scores"] = np.full((n, s), np.nan, np.float32)
        if len(ok):
            ids = [np.frombuffer(batch["input_ids"][i], dtype=np.int32).tolist() for i in ok]
            for key, values in self.embedder.score(ids, self.micro_batch).items():
                scores[key][ok] = values
        out = {k: v for k, v in batch.items() if k != "input_ids"}
        out.update(scores)
        return out
