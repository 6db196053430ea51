"""Every method's selection over scored documents, as a streaming reduce.

A :class:`SelectionPlan` says how one method selects (its score column, M, mode, threshold). Each block of scored
documents is summarised on its own (:func:`summarise_block`: the block's candidates for every plan, which is a
superset of its share of the final selection, and its counts); the summaries are merged (:func:`merge`) and the
final choice runs on the union of candidates (:func:`finish`). That is exact, because a document in the global top-M
is in the top-M of its own block (and a per-seed top-M document in that seed's top-M of its block), so the result
does not depend on how the corpus was split into blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from shared.curation.features import KINDS
from shared.curation.retrieval import Mode, select

Columns = dict[str, np.ndarray]

SEEDED = KINDS
"""Methods scored by similarity to the seeds (sae, sae_idf, dense); the others (random, ngram) have no seeds."""
SCORE_COLUMN = {"ngram": "ngram_key", "random": "random_key", **{k: f"{k}_score" for k in KINDS}}
"""The column each method ranks documents by."""
SCORE_BINS = np.linspace(-1.0, 1.0, 201)
"""Histogram bins of the subset method's score (cosines), for the report."""


@dataclass(frozen=True)
class SelectionPlan:
    method: str
    """A key of :data:`SCORE_COLUMN`."""
    m: int | None
    """Documents to select (None: everything at or above the threshold)."""
    mode: Mode = "global"
    """global, or per_seed (seeded methods only: each seed's M nearest, united)."""
    threshold: float | None = None
    """Minimum score, applied before the top M."""

    @property
    def column(self) -> str:
        return SCORE_COLUMN[self.method]

    def needs(self) -> tuple[str, ...]:
        """The columns :meth:`choose` reads."""
        return (self.column, f"{self.method}_seed_scores") if self.mode == "per_seed" else (self.column,)

    def choose(self, cols: Columns) -> np.ndarray:
        """Positions of the selected rows among ``cols`` (best first)."""
        scores = np.asarray(cols[self.column], dtype=np.float64)
        # a [N, S] array from Ray Data, or an object array of [S] rows read back from Parquet
        seed_scores = np.stack(list(cols[f"{self.method}_seed_scores"])) if self.mode == "per_seed" else None
        return select(scores, self.mode, self.m, self.threshold, seed_scores)


def plan_for(method: str, m: int | None, subset_method: str, mode: Mode, threshold: float | None) -> SelectionPlan:
    """Seeded methods follow the configured mode; the threshold applies only to the method that makes the subset."""
    return SelectionPlan(method, m, mode if method in SEEDED else "global",
                         threshold if method == subset_method else None)


@dataclass
class CorpusCounts:
    """Counts over the scored corpus (summed over blocks)."""

    rows: int = 0
    ok: int = 0
    empty: int = 0
    not_text: int = 0
    truncated: int = 0
    tokens: int = 0
    target: int = 0
    """Usable documents carrying the target label."""
    top: float = -np.inf
    """The highest score of the subset method."""
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BINS) - 1, dtype=np.int64))
    """Histogram of the subset method's score over :data:`SCORE_BINS`."""

    def __add__(self, other: CorpusCounts) -> CorpusCounts:
        return CorpusCounts(rows=self.rows + other.rows, ok=self.ok + other.ok, empty=self.empty + other.empty,
                            not_text=self.not_text + other.not_text, truncated=self.truncated + other.truncated,
                            tokens=self.tokens + other.tokens, target=self.target + other.target,
                            top=max(self.top, other.top), hist=self.hist + other.hist)


@dataclass
class BlockSummary:
    candidates: dict[str, Columns]
    """Per method, the block's rows that can still be selected (every column)."""
    counts: CorpusCounts


def count_block(batch: Columns, subset_method: str, target: str | None) -> CorpusCounts:
    ok = batch["status"] == "ok"
    scores = np.asarray(batch[SCORE_COLUMN[subset_method]], dtype=np.float64)[ok]
    labels = batch["label"][ok] if "label" in batch else np.array([])
    return CorpusCounts(rows=len(batch["status"]), ok=int(ok.sum()), empty=int((batch["status"] == "empty").sum()),
                        not_text=int((batch["status"] == "not_text").sum()),
                        truncated=int(batch["truncated"][ok].sum()), tokens=int(batch["n_tokens"][ok].sum()),
                        target=int((labels == target).sum()) if target is not None else 0,
                        top=float(np.nanmax(scores, initial=-np.inf)),
                        hist=np.histogram(scores, bins=SCORE_BINS)[0])


def summarise_block(batch: Columns, plans: Iterable[SelectionPlan], subset_method: str,
                    target: str | None) -> BlockSummary:
    usable = np.flatnonzero(batch["status"] == "ok")
    candidates = {}
    for plan in plans:
        rows = usable[plan.choose({key: batch[key][usable] for key in plan.needs()})] if len(usable) else usable
        candidates[plan.method] = {key: values[rows] for key, values in batch.items()}
    return BlockSummary(candidates, count_block(batch, subset_method, target))


def merge(summaries: Iterable[BlockSummary]) -> tuple[dict[str, Columns], CorpusCounts]:
    """Every method's candidates, concatenated over blocks, and the summed counts."""
    parts: dict[str, list[Columns]] = {}
    counts = CorpusCounts()
    for summary in summaries:
        counts = counts + summary.counts
        for method, cols in summary.candidates.items():
            parts.setdefault(method, [])
            if len(cols["id"]):
                parts[method].append(cols)
    merged = {method: ({key: np.concatenate([np.asarray(b[key]) for b in blocks]) for key in blocks[0]}
                       if blocks else {}) for method, blocks in parts.items()}
    return merged, counts


def finish(cols: Columns, plan: SelectionPlan) -> Columns:
    """The final selection among merged candidates (rows in order of selection)."""
    if not cols:
        return {"id": np.array([], dtype=object)}
    order = plan.choose({key: np.asarray(v) for key, v in cols.items()})
    return {key: values[order] for key, values in cols.items()}


def repeated_id(ids: np.ndarray) -> tuple[str, int, int] | None:
    """(an id on more than one row, its rows, how many ids repeat), or None when every id is unique."""
    unique, counts = np.unique(np.asarray(ids, dtype=object).astype(str), return_counts=True)
    if not (counts > 1).any():
        return None
    return str(unique[counts > 1][0]), int(counts[counts > 1][0]), int((counts > 1).sum())
