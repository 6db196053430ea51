"""Every method's selection over scored shards, with driver memory that does not grow with the corpus or with M.

A method ranks documents by one score column (global), or by each seed's column with the per-seed rankings united
(per_seed). Each ranking's top k is found without gathering candidates:

1. scores are mapped to unsigned 64-bit keys that sort like the floats (:func:`sortable`), so a key range is an
   exact set of scores;
2. a pass over the shards histograms each unresolved ranking's keys in its current range into 4096 bins (the top
   12 bits of the range); the merged histogram says which bin holds the k-th document: everything above it is
   selected, everything below it is not, and the range narrows to that bin;
3. once the boundary bin holds at most :data:`GATHER_LIMIT` documents, one pass gathers its keys and ids, and the
   ``need`` best of them (key, then id, so ties are broken by id) complete the selection.

A :class:`Cut` is then a rule a task applies to any shard (``key >= hi`` or the id is one of the boundary's chosen
ids). The result is exact and independent of how the corpus is split into shards: the histograms are sums and the
boundary choice is a total order. Each pass costs one read of the score columns it needs (not the text), and two or
three passes suffice for ten million documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.curation.kinds import KINDS, Mode

Columns = dict[str, np.ndarray]

SEEDED = KINDS
"""Methods scored by similarity to the seeds (the SAE kinds, dense); the others (random, ngram) have no seeds."""
SCORE_COLUMN = {"ngram": "ngram_key", "random": "random_key", **{k: f"{k}_score" for k in KINDS}}
"""The column each method ranks documents by."""
SCORE_BINS = np.linspace(-1.0, 1.0, 201)
"""Histogram bins of the subset method's score (cosines), for the report."""
BIN_BITS = 12
"""Each histogram pass splits the current key range into 2**BIN_BITS bins."""
GATHER_LIMIT = 65_536
"""A boundary bin with at most this many documents is gathered (keys and ids only) instead of split again."""
TOP = 1 << 64


def sortable(values: np.ndarray) -> np.ndarray:
    """uint64 keys that sort exactly like the float64 values (NaN must be masked out by the caller)."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    sign = np.uint64(1 << 63)
    return np.where(bits & sign, ~bits, bits | sign)


# ---------------------------------------------------------------------------------------------------------------------
# Rankings and cuts


@dataclass(frozen=True)
class Ranking:
    """One ordering to cut: usable documents by ``column`` (one seed's column when ``seed`` is set), best first."""

    method: str
    column: str
    seed: int | None = None
    """Index into ``<method>_seed_scores`` (per_seed mode)."""
    floor: float | None = None
    """Only documents whose ``floor_column`` is at least this are ranked (the threshold)."""
    floor_column: str | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for c in ("id", "status", self.column, self.floor_column) if c))

    def keys(self, cols: Columns) -> tuple[np.ndarray, np.ndarray]:
        """(positions of the ranked rows, their sortable keys)."""
        values = np.asarray(cols[self.column])
        if self.seed is not None:
            values = np.stack(list(values))[:, self.seed] if len(values) else np.zeros(0)
        values = np.asarray(values, dtype=np.float64)
        ok = (np.asarray(cols["status"]) == "ok") & ~np.isnan(values)
        if self.floor is not None and self.floor_column is not None:
            ok &= np.asarray(cols[self.floor_column], dtype=np.float64) >= self.floor
        rows = np.flatnonzero(ok)
        return rows, sortable(values[rows])


@dataclass
class Cut:
    """The top ``k`` of a ranking, found by narrowing a key range ``[lo, lo + 2**bits)`` (see the module doc)."""

    ranking: Ranking
    k: int | None
    """None: every ranked document (a threshold without M)."""
    lo: int = 0
    bits: int = 64
    above: int = 0
    """Ranked documents with keys at or above the range: all selected."""
    ranked: int | None = None
    """Documents in the ranking (known after the first pass)."""
    cut_at: int | None = None
    """Once resolved: every key at or above this is selected ..."""
    chosen: frozenset[str] = frozenset()
    """... and so are these ids (the boundary's share)."""

    @property
    def hi(self) -> int:
        return self.lo + (1 << self.bits)

    @property
    def resolved(self) -> bool:
        return self.cut_at is not None

    @property
    def need(self) -> int:
        """Documents still to take from the current range."""
        ranked = self.ranked or 0
        return (ranked if self.k is None else min(self.k, ranked)) - self.above

    @property
    def selected(self) -> int:
        """Documents this cut selects (once resolved)."""
        return self.above + len(self.chosen)

    def request(self, boundary: int | None) -> Request:
        """What the next pass computes for this cut: a histogram of the range, or its best documents once the
        range is small (``boundary``: the range's count from the last pass; None before the first)."""
        gather = boundary is not None and (boundary <= GATHER_LIMIT or self.bits <= BIN_BITS)
        return Request(self.ranking, self.lo, self.bits, self.need if gather else None)

    def update(self, result: np.ndarray | Gathered) -> int | None:
        """Take one merged pass result; returns the count left in the narrowed range, None once resolved."""
        if isinstance(result, Gathered):
            self.chosen, self.cut_at = frozenset(result.ids[: self.need]), self.hi
            return None
        hist = np.asarray(result, dtype=np.int64)
        total = int(hist.sum())
        if self.ranked is None:
            self.ranked = total  # the first range is every key
        need = self.need
        if need <= 0:
            self.cut_at = self.hi
            return None
        if need >= total:  # the whole range is in
            self.above += total
            self.cut_at = self.lo
            return None
        from_top = np.cumsum(hist[::-1])
        j = len(hist) - 1 - int(np.searchsorted(from_top, need))  # the bin holding the need-th best document
        shift = max(self.bits - BIN_BITS, 0)
        self.above += int(hist[j + 1:].sum())
        self.lo, self.bits = self.lo + (j << shift), shift
        return int(hist[j])

    def mask(self, cols: Columns) -> np.ndarray:
        """Which rows of a shard this (resolved) cut selects."""
        if self.cut_at is None:
            raise RuntimeError(f"{self.ranking.method}: the cut is not resolved yet")
        selected = np.zeros(len(cols["id"]), dtype=bool)
        rows, keys = self.ranking.keys(cols)
        top = keys >= np.uint64(self.cut_at) if self.cut_at < TOP else np.zeros(len(keys), dtype=bool)
        if self.chosen:
            ids = np.asarray(cols["id"], dtype=object)[rows]
            top |= np.fromiter((str(i) in self.chosen for i in ids), dtype=bool, count=len(ids))
        selected[rows[top]] = True
        return selected


@dataclass(frozen=True)
class Request:
    """One cut's share of a pass: a histogram of ``[lo, lo + 2**bits)`` or (``gather`` set) its best documents."""

    ranking: Ranking
    lo: int
    bits: int
    gather: int | None = None
    """Keep this many of the range's documents (best first); None: histogram."""


@dataclass
class Gathered:
    """A range's best documents: keys descending, ids ascending among equal keys."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    ids: list[str] = field(default_factory=list)

    def best(self, n: int) -> Gathered:
        order = sorted(range(len(self.ids)), key=lambda i: (-int(self.keys[i]), self.ids[i]))[:n]
        return Gathered(self.keys[order], [self.ids[i] for i in order])

    def __add__(self, other: Gathered) -> Gathered:
        return Gathered(np.concatenate([self.keys, other.keys]), self.ids + other.ids)


def scan(cols: Columns, requests: Sequence[Request]) -> list[Any]:
    """One shard's share of a pass: per request, a histogram ([2**BIN_BITS] counts) or a :class:`Gathered`."""
    out: list[Any] = []
    cache: dict[Ranking, tuple[np.ndarray, np.ndarray]] = {}
    for req in requests:
        if req.ranking not in cache:
            cache[req.ranking] = req.ranking.keys(cols)
        rows, keys = cache[req.ranking]
        inside = keys >= np.uint64(req.lo)
        if req.lo + (1 << req.bits) < TOP:
            inside &= keys < np.uint64(req.lo + (1 << req.bits))
        if req.gather is not None:
            ids = [str(i) for i in np.asarray(cols["id"], dtype=object)[rows[inside]]]
            out.append(Gathered(keys[inside], ids).best(req.gather))
            continue
        shift = max(req.bits - BIN_BITS, 0)
        bins = ((keys[inside] - np.uint64(req.lo)) >> np.uint64(shift)).astype(np.int64)
        out.append(np.bincount(bins, minlength=1 << min(BIN_BITS, req.bits)))
    return out


def merge_results(parts: Iterable[list[Any]], requests: Sequence[Request]) -> list[Any]:
    """Sum histograms and keep the best gathered documents, shard by shard (memory bounded by the requests)."""
    merged: list[Any] = [None] * len(requests)
    for part in parts:
        for i, (req, value) in enumerate(zip(requests, part)):
            if req.gather is not None:
                merged[i] = value if merged[i] is None else (merged[i] + value).best(req.gather)
            else:
                merged[i] = value if merged[i] is None else merged[i] + value
    for i, req in enumerate(requests):
        if merged[i] is None:
            merged[i] = Gathered() if req.gather is not None else np.zeros(1 << min(BIN_BITS, req.bits), np.int64)
    return merged


class Selection:
    """Drives the passes for a set of cuts: ``while not done: results = run(requests()); update(results)``."""

    def __init__(self, cuts: Sequence[Cut]):
        self.cuts = list(cuts)
        self._boundary: dict[int, int | None] = {i: None for i in range(len(self.cuts))}
        self.passes = 0

    @property
    def done(self) -> bool:
        return all(c.resolved for c in self.cuts)

    def requests(self) -> list[Request]:
        return [c.request(self._boundary[i]) for i, c in enumerate(self.cuts) if not c.resolved]

    def update(self, results: Sequence[Any]) -> None:
        self.passes += 1
        open_cuts = [i for i, c in enumerate(self.cuts) if not c.resolved]
        for i, result in zip(open_cuts, results):
            self._boundary[i] = self.cuts[i].update(result)


# ---------------------------------------------------------------------------------------------------------------------
# Methods


@dataclass
class MethodRule:
    """A method's selection: the union of its cuts (one for global, one per seed for per_seed)."""

    method: str
    cuts: list[Cut]

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for cut in self.cuts for c in cut.ranking.needs))

    def mask(self, cols: Columns) -> np.ndarray:
        selected = np.zeros(len(cols["id"]), dtype=bool)
        for cut in self.cuts:
            selected |= cut.mask(cols)
        return selected


def rule_for(method: str, k: int | None, subset_method: str, mode: Mode, threshold: float | None, seeds: int
             ) -> MethodRule:
    """Seeded methods follow the configured mode; the threshold applies only to the method that makes the subset."""
    column = SCORE_COLUMN[method]
    floor = threshold if method == subset_method else None
    if method in SEEDED and mode == "per_seed":
        return MethodRule(method, [Cut(Ranking(method, f"{method}_seed_scores", s, floor, column), k)
                                   for s in range(seeds)])
    return MethodRule(method, [Cut(Ranking(method, column, None, floor, column), k)])


# ---------------------------------------------------------------------------------------------------------------------
# Counts


@dataclass
class CorpusCounts:
    """Counts over the scored corpus (summed over shards)."""

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
    has_labels: bool = False
    """Whether the corpus has a label column (purity and recall are measured only then)."""

    def __add__(self, other: CorpusCounts) -> CorpusCounts:
        return CorpusCounts(rows=self.rows + other.rows, ok=self.ok + other.ok, empty=self.empty + other.empty,
                            not_text=self.not_text + other.not_text, truncated=self.truncated + other.truncated,
                            tokens=self.tokens + other.tokens, target=self.target + other.target,
                            top=max(self.top, other.top), hist=self.hist + other.hist,
                            has_labels=self.has_labels or other.has_labels)


COUNT_COLUMNS = ("status", "truncated", "n_tokens", "label")


def count_block(batch: Columns, subset_method: str, target: str | None) -> CorpusCounts:
    ok = batch["status"] == "ok"
    scores = np.asarray(batch[SCORE_COLUMN[subset_method]], dtype=np.float64)[ok]
    labels = batch["label"][ok] if "label" in batch else np.array([])
    return CorpusCounts(rows=len(batch["status"]), ok=int(ok.sum()), empty=int((batch["status"] == "empty").sum()),
                        not_text=int((batch["status"] == "not_text").sum()),
                        truncated=int(batch["truncated"][ok].sum()), tokens=int(batch["n_tokens"][ok].sum()),
                        target=int((labels == target).sum()) if target is not None else 0,
                        top=float(np.nanmax(scores, initial=-np.inf)),
                        hist=np.histogram(scores, bins=SCORE_BINS)[0], has_labels="label" in batch)


@dataclass
class Tally:
    """Per method, over the corpus: documents selected, of them with the target label, the lowest selected score;
    and the subset method's best few documents (for the report)."""

    selected: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    lowest: dict[str, float] = field(default_factory=dict)
    best: list[tuple[float, str]] = field(default_factory=list)
    """(score, id) of the subset method's best documents, best first."""

    def __add__(self, other: Tally) -> Tally:
        keys = set(self.selected) | set(other.selected)
        return Tally({k: self.selected.get(k, 0) + other.selected.get(k, 0) for k in keys},
                     {k: self.hits.get(k, 0) + other.hits.get(k, 0) for k in keys},
                     {k: min(self.lowest.get(k, np.inf), other.lowest.get(k, np.inf)) for k in keys},
                     sorted(self.best + other.best, key=lambda p: (-p[0], p[1]))[:PREVIEW])


PREVIEW = 10


def tally(cols: Columns, rules: Sequence[MethodRule], subset_method: str, target: str | None
          ) -> tuple[Tally, dict[str, np.ndarray]]:
    """One shard's :class:`Tally`, and the masks of every rule."""
    masks = {rule.method: rule.mask(cols) for rule in rules}
    out = Tally()
    labels = np.asarray(cols["label"], dtype=object) if "label" in cols else None
    for method, mask in masks.items():
        scores = np.asarray(cols[SCORE_COLUMN[method]], dtype=np.float64)[mask]
        out.selected[method] = int(mask.sum())
        out.hits[method] = int((labels[mask] == target).sum()) if labels is not None and target is not None else 0
        out.lowest[method] = float(scores.min()) if len(scores) else np.inf
    mask = masks[subset_method]
    scores = np.asarray(cols[SCORE_COLUMN[subset_method]], dtype=np.float64)[mask]
    ids = [str(i) for i in np.asarray(cols["id"], dtype=object)[mask]]
    out.best = sorted(zip(scores.tolist(), ids), key=lambda p: (-p[0], p[1]))[:PREVIEW]
    return out, masks


def repeated_id(ids: np.ndarray) -> tuple[str, int, int] | None:
    """(an id on more than one row, its rows, how many ids repeat), or None when every id is unique."""
    unique, counts = np.unique(np.asarray(ids, dtype=object).astype(str), return_counts=True)
    if not (counts > 1).any():
        return None
    return str(unique[counts > 1][0]), int(counts[counts > 1][0]), int((counts > 1).sum())
