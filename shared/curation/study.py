"""The retrieval study: every selection method on several target domains and several independent draws of the seed
set, with bootstrap intervals, and the SAE variant chosen on a development target that the headline figures leave out.

Inputs are what the job embedded once: per method, the pool's document vectors and the seed reserve's (documents
whose chunks are all outside the pool). A draw picks ``seeds_per_draw`` reserve documents of one target, seeded by
(study seed, target, draw), so draws do not depend on the order anything ran in. Each method scores the pool by the
largest cosine to a seed of the draw and takes its top M; the ones without vectors (random, DSIR n-grams) select as
they do in curate. Figures per (target, draw): purity@M, recall@M and R-precision (precision at R, the number of
target documents in the pool). Intervals are percentile bootstraps over draws (stratified by target overall), and
a comparison of two methods is a paired bootstrap of their per-draw difference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
from scipy import sparse

from shared.curation.ngram import gumbel_keys, log_distribution, stable_uniform
from shared.errors import DataError

FIGURES = ("purity", "recall", "r_precision")
RRF_K = 60
"""Reciprocal-rank fusion constant (Cormack et al., 2009)."""

Vectors: TypeAlias = Any
"""A [N, d] matrix of L2-normalised rows: a numpy array or a scipy sparse matrix."""


@dataclass
class StudyInputs:
    """What the study compares, for pool documents (rows of every matrix, in one order) and reserve documents."""

    pool_labels: np.ndarray
    reserve_labels: np.ndarray
    vectors: dict[str, tuple[Vectors, Vectors]]
    """Per vector method: (pool rows, reserve rows), L2-normalised (dense or sparse)."""
    pool_fired: np.ndarray | None = None
    """[N, n_latents] SAE firing shares of the pool (for ``sae_lift``)."""
    reserve_fired: np.ndarray | None = None
    pool_ids: list[str] = field(default_factory=list)
    """Pool document ids (keys of the random and DSIR baselines)."""
    pool_ngrams: np.ndarray | None = None
    """[N, buckets] hashed n-gram counts of the pool (DSIR)."""
    reserve_ngrams: np.ndarray | None = None


@dataclass(frozen=True)
class Draw:
    target: str
    index: int
    seeds: tuple[int, ...]
    """Rows of the reserve."""


def draw_seeds(reserve_labels: np.ndarray, targets: Sequence[str], draws: int, per_draw: int,
               seed: int) -> list[Draw]:
    """``draws`` seed sets of ``per_draw`` reserve documents per target, each from its own seeded generator."""
    out = []
    for target in targets:
        rows = np.flatnonzero(reserve_labels == target)
        if len(rows) < per_draw:
            raise DataError(f"target {target!r}: {len(rows)} reserve documents, fewer than seeds_per_draw="
                            f"{per_draw}")
        for d in range(draws):
            digest = hashlib.blake2b(f"{seed}:{target}:{d}".encode(), digest_size=8).digest()
            rng = np.random.default_rng(int.from_bytes(digest, "little"))
            out.append(Draw(target, d, tuple(int(i) for i in np.sort(rng.choice(rows, per_draw, replace=False)))))
    return out


def _dense(x: Vectors) -> np.ndarray:
    return np.asarray(x.todense()) if sparse.issparse(x) else np.asarray(x)


def max_cosine(pool: Vectors, seeds: Vectors) -> np.ndarray:
    """[N] largest cosine of every pool row to a seed row (rows already normalised)."""
    return _dense(pool @ seeds.T).max(axis=1).astype(np.float64)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def lift_scores(pool_fired: np.ndarray, seed_fired: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """``sae_lift``: firing shares weighted by log(seed firing / pool firing) clipped at zero, then max cosine."""
    weights = np.log((seed_fired.mean(axis=0) + floor) / (pool_fired.mean(axis=0) + floor)).clip(min=0.0)
    return max_cosine(normalise(pool_fired * weights), normalise(seed_fired * weights))


def ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of every document, best first (ties by position)."""
    out = np.empty(len(scores), dtype=np.int64)
    out[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return out


def fused(*scores: np.ndarray) -> np.ndarray:
    """Reciprocal-rank fusion of several rankings."""
    return sum((1.0 / (RRF_K + 1 + ranks(s)) for s in scores), start=np.zeros(len(scores[0])))


def top(scores: np.ndarray, m: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[: min(m, len(scores))]


def figures(scores: np.ndarray, labels: np.ndarray, target: str, m: int) -> dict[str, float]:
    """purity@M, recall@M and R-precision of one ranking."""
    relevant = labels == target
    r = int(relevant.sum())
    hits = int(relevant[top(scores, m)].sum())
    return {"purity": hits / min(m, len(scores)), "recall": hits / max(r, 1),
            "r_precision": float(relevant[top(scores, r)].sum()) / max(r, 1)}


Scorer = Callable[[Draw], np.ndarray]


def scorers(inputs: StudyInputs, study_seed: int, alpha: float = 1.0) -> dict[str, Scorer]:
    """Every method the inputs allow: the vector methods, sae_lift (with firing shares), random and ngram (DSIR)."""
    out: dict[str, Scorer] = {}
    def vector_method(pool: Vectors, reserve: Vectors) -> Scorer:
        return lambda d: max_cosine(pool, reserve[list(d.seeds)])

    for name, (pool, reserve) in inputs.vectors.items():
        out[name] = vector_method(pool, reserve)
    if inputs.pool_fired is not None and inputs.reserve_fired is not None:
        pf, rf = inputs.pool_fired, inputs.reserve_fired
        out["sae_lift"] = lambda d: lift_scores(pf, rf[list(d.seeds)])
    ids = inputs.pool_ids

    def draw_key(d: Draw) -> int:
        return int.from_bytes(hashlib.blake2b(f"{study_seed}:{d.target}:{d.index}".encode(),
                                              digest_size=4).digest(), "little")

    if ids:
        out["random"] = lambda d: stable_uniform(ids, draw_key(d))
    if inputs.pool_ngrams is not None and inputs.reserve_ngrams is not None and ids:
        pn, rn = inputs.pool_ngrams, inputs.reserve_ngrams
        raw = log_distribution(pn.sum(axis=0), alpha)
        out["ngram"] = lambda d: gumbel_keys(
            pn.astype(np.float64) @ (log_distribution(rn[list(d.seeds)].sum(axis=0), alpha) - raw), ids, draw_key(d))
    return out


def bootstrap_mean(values: np.ndarray, strata: np.ndarray, rounds: int, seed: int) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of the mean over strata of per-stratum means, resampling within strata."""
    rng = np.random.default_rng(seed)
    groups = [values[strata == s] for s in np.unique(strata)]
    point = float(np.mean([g.mean() for g in groups]))
    samples = np.empty(rounds)
    for b in range(rounds):
        samples[b] = np.mean([g[rng.integers(0, len(g), len(g))].mean() for g in groups])
    low, high = np.percentile(samples, [2.5, 97.5])
    return point, float(low), float(high)


@dataclass
class StudyResult:
    runs: list[dict[str, Any]]
    """One row per (method, target, draw): the figures."""
    summary: dict[str, dict[str, dict[str, Any]]]
    """method -> target (and ``headline``) -> figure -> {mean, ci, runs}."""
    chosen_sae: str
    """The SAE variant with the best mean purity on the development target."""
    comparisons: dict[str, dict[str, Any]]
    """'<a> - <b>' -> paired bootstrap of the purity difference on the headline targets."""
    development_target: str
    headline_targets: list[str]


def run_study(inputs: StudyInputs, draws: list[Draw], m: int, development_target: str, sae_methods: Sequence[str],
              compare_with: Sequence[str], rounds: int = 2000, seed: int = 0) -> StudyResult:
    """Score every draw with every method, summarise with intervals, choose the SAE variant on the development
    target, add the hybrid (that variant fused with tfidf) and compare the chosen variant with ``compare_with``."""
    methods = scorers(inputs, seed)
    runs: list[dict[str, Any]] = []
    cache: dict[tuple[str, str, int], np.ndarray] = {}
    for name, score in methods.items():
        for d in draws:
            cache[(name, d.target, d.index)] = score(d)
    dev = [d for d in draws if d.target == development_target]
    if not dev:
        raise DataError(f"development target {development_target!r} has no draws")
    candidates = [s for s in sae_methods if s in methods]
    if not candidates:
        raise DataError("the study has no SAE method to choose from")
    dev_purity = {s: np.mean([figures(cache[(s, d.target, d.index)], inputs.pool_labels, d.target, m)["purity"]
                              for d in dev]) for s in candidates}
    chosen = max(candidates, key=lambda s: (dev_purity[s], -candidates.index(s)))
    if "tfidf" in methods:
        for d in draws:
            cache[("hybrid", d.target, d.index)] = fused(cache[(chosen, d.target, d.index)],
                                                        cache[("tfidf", d.target, d.index)])
    names = list(dict.fromkeys(k[0] for k in cache))
    for name in names:
        for d in draws:
            runs.append({"method": name, "target": d.target, "draw": d.index,
                         **figures(cache[(name, d.target, d.index)], inputs.pool_labels, d.target, m)})
    headline = sorted({d.target for d in draws} - {development_target})
    summary = summarise(runs, names, headline, rounds, seed)
    comparisons = {}
    for other in [c for c in [*compare_with, "hybrid"] if c in names and c != chosen]:
        diff = paired(runs, chosen, other, headline, "purity")
        point, low, high = bootstrap_mean(diff[:, 0], diff[:, 1], rounds, seed)
        comparisons[f"{chosen} - {other}"] = {"mean": point, "ci": [low, high], "runs": len(diff),
                                              "excludes_zero": bool(low > 0 or high < 0)}
    return StudyResult(runs, summary, chosen, comparisons, development_target, headline)


def summarise(runs: list[dict[str, Any]], names: Sequence[str], headline: Sequence[str], rounds: int,
              seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    targets = sorted({r["target"] for r in runs})
    for name in names:
        out[name] = {}
        for group, members in [*((t, [t]) for t in targets), ("headline", list(headline))]:
            rows = [r for r in runs if r["method"] == name and r["target"] in members]
            if not rows:
                continue
            strata = np.array([r["target"] for r in rows])
            out[name][group] = {}
            for fig in FIGURES:
                point, low, high = bootstrap_mean(np.array([r[fig] for r in rows]), strata, rounds, seed)
                out[name][group][fig] = {"mean": point, "ci": [low, high], "runs": len(rows)}
    return out


def paired(runs: list[dict[str, Any]], a: str, b: str, targets: Sequence[str], fig: str) -> np.ndarray:
    """[n, 2] (a - b, stratum index) over the (target, draw) units both methods ran."""
    by = {(r["method"], r["target"], r["draw"]): r[fig] for r in runs}
    units = sorted({(t, d) for (m, t, d) in by if m == a and t in targets and (b, t, d) in by})
    index = {t: i for i, t in enumerate(sorted(targets))}
    return np.array([[by[(a, t, d)] - by[(b, t, d)], index[t]] for t, d in units], dtype=np.float64)


def table(result: StudyResult, fig: str = "purity", order: Mapping[str, int] | None = None) -> list[str]:
    """Markdown rows: one line per method, the development target first, then the headline targets and overall."""
    targets = [result.development_target, *result.headline_targets]
    head = ["method", f"{result.development_target} (dev)", *result.headline_targets, "headline mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = sorted(result.summary, key=lambda n: (order or {}).get(n, 100))
    for name in names:
        cells = [name + (" (chosen)" if name == result.chosen_sae else "")]
        for group in [*targets, "headline"]:
            s = result.summary[name].get(group, {}).get(fig)
            cells.append("" if s is None else f"{s['mean']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
