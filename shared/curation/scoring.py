"""Per-batch steps of curation, in the shape of a data-pipeline stage: a cheap constructor, ``setup()`` that loads
what the step needs once per worker, and ``__call__(batch)`` from columns (a dict of arrays) to columns.

- :class:`DocumentTokenizer`: text -> token ids, status (``ok`` / ``empty`` / ``not_text``), truncation, and the keys
  of the two baselines without seeds (the DSIR importance key and a uniform random key), all from the document id
  and the config seed, so they do not depend on how the corpus is split into blocks;
- :class:`DocumentScorer`: token ids -> every kind of seed similarity (``<kind>_score``, ``<kind>_seed``,
  ``<kind>_seed_scores``) through a :class:`~shared.curation.model.CurationModel` on one device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from shared.config import StorageConfig
from shared.curation.documents import Batch, as_text
from shared.curation.features import KINDS, Embedder, tokenize
from shared.curation.model import CurationModel
from shared.curation.ngram import gumbel_keys, hashed_ngrams, stable_uniform


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
