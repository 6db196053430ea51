"""The activation cache: the selected coordinates' activations of the SAE's training sample, as shards.

    extract = ActivationExtractor(model, layer, coords, max_tokens=256, skip_first=True, micro_batch=8)
    extract.setup()                                      # the truncated model, once per worker
    shard = extract(ids, texts, heldout)                 # -> CacheShard (one per corpus piece)
    shard.save(store, "cache", "000012-ab12cd.npz")
    cache = ActivationCache([...uris], storage)          # a BatchSource: the SAE trains by streaming from it

A shard holds, for the counted tokens (padding and, with ``skip_first``, each document's first token left out) of
its documents: the activations [T, k], each row's document and position, every document's token ids (for the
snippets of the report), and which documents are held out (they never reach training; FVU is measured on them).
Training streams shards in a seeded order through a shuffle buffer, so memory is bounded by the buffer, not the
sample: the token budget can grow to millions of tokens.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.config import StorageConfig
from shared.curation.activations import hidden_states, token_mask, truncate_to_layer
from shared.curation.features import length_batches, pad_batch, tokenize
from shared.errors import DataError
from shared.storage import Storage

SHUFFLE_ROWS = 65_536
"""Rows the training stream shuffles together (a buffer refilled from shards in a seeded order)."""


@dataclass
class CacheShard:
    acts: np.ndarray
    """[T, k] float32 activations of the selected coordinates, one row per counted token."""
    doc: np.ndarray
    """[T] the document (index into ``doc_ids``) of each row."""
    pos: np.ndarray
    """[T] the token position of each row within its document."""
    doc_ids: np.ndarray
    """[D] document ids."""
    heldout: np.ndarray
    """[D] documents held out of training."""
    tokens: np.ndarray
    """All documents' token ids, concatenated (``offsets`` [D + 1] marks where each starts)."""
    offsets: np.ndarray

    def rows(self, heldout: bool) -> np.ndarray:
        """Positions of the training (or held-out) rows."""
        return np.flatnonzero(self.heldout[self.doc] == heldout)

    def doc_tokens(self, d: int) -> list[int]:
        return self.tokens[self.offsets[d]: self.offsets[d + 1]].tolist()

    def save(self, store: Storage, *parts: str) -> str:
        buffer = io.BytesIO()
        np.savez(buffer, acts=self.acts, doc=self.doc, pos=self.pos, doc_ids=self.doc_ids.astype(str),
                 heldout=self.heldout, tokens=self.tokens, offsets=self.offsets)
        return store.write_bytes(buffer.getvalue(), *parts)

    @classmethod
    def load(cls, uri: str, storage: StorageConfig | None = None) -> CacheShard:
        try:
            with np.load(io.BytesIO(Storage(uri, storage).read_bytes()), allow_pickle=False) as data:
                return cls(**{name: data[name] for name in data.files})
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"activation cache shard {uri}: cannot read ({exc})") from None


@dataclass
class ActivationExtractor:
    """Token ids -> the selected coordinates' activations at one layer (a per-worker step)."""

    model: str
    layer: int
    coords: np.ndarray
    max_tokens: int
    skip_first: bool
    micro_batch: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    storage: StorageConfig | None = None

    def setup(self, model: Any = None, tokenizer: Any = None) -> None:
        """Load the base model (or take a loaded one) and cut it after :attr:`layer`."""
        if model is None:
            from shared.models import load_causal_lm

            model, tokenizer = load_causal_lm(self.model, dtype=self.dtype, device=self.device,
                                              storage=self.storage)
        self.base, self.tokenizer = truncate_to_layer(model, self.layer), tokenizer
        self._coords = torch.as_tensor(np.asarray(self.coords), dtype=torch.long)

    @torch.inference_mode()
    def __call__(self, ids: list[str], texts: list[str], heldout: list[bool]) -> CacheShard:
        tokenized = tokenize(self.tokenizer, texts, self.max_tokens)
        device = next(self.base.parameters()).device
        coords = self._coords.to(device)
        acts, docs, positions = [], [], []
        for group in length_batches([len(x) for x in tokenized.ids], self.micro_batch):
            input_ids, attention = (t.to(device) for t in pad_batch([tokenized.ids[i] for i in group],
                                                                    self.tokenizer.pad_token_id))
            hidden = hidden_states(self.base, input_ids, attention)[..., coords].float()
            mask = token_mask(attention, self.skip_first)
            rows, cols = mask.nonzero(as_tuple=True)
            acts.append(hidden[rows, cols].cpu().numpy())
            docs.append(np.asarray(group, dtype=np.int32)[rows.cpu().numpy()])
            positions.append(cols.cpu().numpy().astype(np.int32))
        k = len(self.coords)
        lengths = np.array([len(x) for x in tokenized.ids], dtype=np.int64)
        return CacheShard(
            acts=np.concatenate(acts) if acts else np.zeros((0, k), np.float32),
            doc=np.concatenate(docs) if docs else np.zeros(0, np.int32),
            pos=np.concatenate(positions) if positions else np.zeros(0, np.int32),
            doc_ids=np.array(ids, dtype=str), heldout=np.asarray(heldout, dtype=bool),
            tokens=np.concatenate([np.asarray(x, np.int32) for x in tokenized.ids]) if ids else np.zeros(0, np.int32),
            offsets=np.concatenate([[0], np.cumsum(lengths)]))


class ActivationCache:
    """The cache's shards as a :class:`~shared.curation.sae.BatchSource` (training rows) and as shard iterators.
    ``shards`` are URIs (read one at a time) or loaded :class:`CacheShard` objects (small samples, tests)."""

    def __init__(self, shards: list[str] | list[CacheShard], storage: StorageConfig | None = None):
        self.shards: list[str | CacheShard] = list(shards)
        self.storage = storage
        self._moments: tuple[int, torch.Tensor, float] | None = None

    def shard(self, i: int) -> CacheShard:
        item = self.shards[i]
        return item if isinstance(item, CacheShard) else CacheShard.load(str(item), self.storage)

    def __iter__(self) -> Iterator[CacheShard]:
        for i in range(len(self.shards)):
            yield self.shard(i)

    def rows(self, heldout: bool, chunk: int = 8192) -> Iterator[torch.Tensor]:
        """Every training (or held-out) row, in shard order, in chunks."""
        for shard in self:
            picked = shard.acts[shard.rows(heldout)]
            for start in range(0, len(picked), chunk):
                yield torch.from_numpy(picked[start: start + chunk])

    def moments(self) -> tuple[int, torch.Tensor, float]:
        if self._moments is None:
            rows, total, sq = 0, None, 0.0
            for x in self.rows(heldout=False):
                rows += x.shape[0]
                part = x.double().sum(dim=0)
                total = part if total is None else total + part
                sq += float(x.double().pow(2).sum())
            if total is None:
                raise DataError("the activation cache holds no training rows")
            self._moments = (rows, (total / rows).float(), sq / rows)
        return self._moments

    def probe(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return next(self.batches(n, generator))

    def batches(self, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Shards in a seeded random order, epoch after epoch, through a shuffle buffer of :data:`SHUFFLE_ROWS`
        (what is left at the end of an epoch is carried into the next). A cache smaller than one batch gives the
        whole cache as every batch."""
        rows_total = self.moments()[0]
        carry: list[np.ndarray] = []

        def flush(parts: list[np.ndarray]) -> tuple[list[torch.Tensor], list[np.ndarray]]:
            pool = np.concatenate(parts)
            pool = pool[torch.randperm(len(pool), generator=generator).numpy()]
            cut = len(pool) - len(pool) % size
            out = [torch.from_numpy(pool[a: a + size]) for a in range(0, cut, size)]
            return out, ([pool[cut:]] if cut < len(pool) else [])

        while True:
            if rows_total < size:
                yield torch.cat(list(self.rows(heldout=False)))
                continue
            buffer, held = carry, sum(len(x) for x in carry)
            for i in torch.randperm(len(self.shards), generator=generator).tolist():
                shard = self.shard(i)
                rows = shard.acts[shard.rows(heldout=False)]
                buffer.append(rows)
                held += len(rows)
                if held >= max(SHUFFLE_ROWS, size):
                    ready, buffer = flush(buffer)
                    held = sum(len(x) for x in buffer)
                    yield from ready
            ready, carry = flush(buffer) if held >= size else ([], buffer)
            yield from ready
