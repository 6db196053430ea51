"""Detection figures with intervals: per-run metrics, and a paired bootstrap over test images across splits.

A *cell* is one split's test set (labels) scored by several variants, each with one score vector per training seed.
Every variant of a cell is scored on the same images, so comparisons between them are paired:

    round r:  for every split, draw its test reals and its test fakes with replacement (the same draw for every
              variant and seed of that split); a variant's statistic is the mean over seeds, then over splits
    interval: the 2.5 and 97.5 percentiles of the round statistics; a difference's interval is that of the
              per-round differences (the same draws on both sides)

The point estimate is the statistic on the images as they are (no resampling). The resampling covers the test-image
noise of every split; the spread between splits and seeds enters through the means, not as a separate level (five
splits are too few to bootstrap on their own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.detection.metrics import average_precision, eer, roc_curve

LOW_FPR = 0.01


def tpr_at_fpr(labels: Any, scores: Any, fpr: float = LOW_FPR) -> float:
    """The highest true-positive rate at a threshold whose false-positive rate is at most ``fpr`` (with fewer than
    1/fpr reals that means no real above the threshold)."""
    f, t, _ = roc_curve(labels, scores)
    return float(t[f <= fpr + 1e-12].max())


def auc_rounds(labels: np.ndarray, scores: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """AUC for each row of ``draws`` (rounds, n indices into labels/scores): P(fake > real), ties one half; exact
    Mann-Whitney over the drawn pairs, vectorised over rounds."""
    y = labels[draws]  # (R, n)
    s = scores[draws]
    out = np.empty(draws.shape[0])
    for r in range(draws.shape[0]):  # (n_fake x n_real) comparisons per round
        fake, real = s[r][y[r] == 1], s[r][y[r] == 0]
        greater = (fake[:, None] > real[None, :]).sum() + 0.5 * (fake[:, None] == real[None, :]).sum()
        out[r] = greater / (fake.size * real.size)
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(auc_rounds(labels, scores, np.arange(labels.size)[None, :])[0])


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auc": auc, "ap": average_precision, "eer": eer, "tpr_at_1pct_fpr": tpr_at_fpr}
"""The figures reported per variant (AUC, AP and EER as scikit-learn defines them; TPR at 1% FPR)."""


def run_figures(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {name: float(fn(labels, scores)) for name, fn in METRICS.items()}


@dataclass
class Cell:
    """One split's test set and every variant's scores on it (one vector per seed)."""

    labels: np.ndarray
    """0 real, 1 fake, per test image."""
    scores: dict[str, list[np.ndarray]]
    """variant -> one score vector per training seed, aligned with labels."""


def stratified_draws(labels: np.ndarray, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """(rounds, n) indices: each round redraws the reals among the reals and the fakes among the fakes."""
    parts = []
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        parts.append(members[rng.integers(0, members.size, size=(rounds, members.size))])
    return np.concatenate(parts, axis=1)


def bootstrap(cells: Sequence[Cell], rounds: int, seed: int, metrics: Sequence[str] = ("auc",)
              ) -> dict[str, dict[str, np.ndarray]]:
    """variant -> metric -> (rounds + 1,) statistics: index 0 on the images as they are, then one per round; mean
    over seeds, then over cells. Every variant must be scored in every cell."""
    rng = np.random.default_rng(seed)
    variants = list(cells[0].scores)
    out = {v: {m: np.zeros(rounds + 1) for m in metrics} for v in variants}
    for cell in cells:
        if sorted(cell.scores) != sorted(variants):
            raise ValueError(f"every cell must score the same variants ({variants} vs {list(cell.scores)})")
        draws = np.concatenate([np.arange(cell.labels.size)[None, :],
                                stratified_draws(cell.labels, rounds, rng)], axis=0)
        for v, per_seed in cell.scores.items():
            for m in metrics:
                acc = np.zeros(rounds + 1)
                for s in per_seed:
                    if m == "auc":
                        acc += auc_rounds(cell.labels, s, draws)
                    else:
                        fn = METRICS[m]
                        acc += np.array([fn(cell.labels[d], s[d]) for d in draws])
                out[v][m] += acc / len(per_seed)
    for v in variants:
        for m in metrics:
            out[v][m] /= len(cells)
    return out


def interval(stats: np.ndarray) -> dict[str, Any]:
    """{'mean': the statistic as measured, 'ci': [2.5%, 97.5%] of the bootstrap rounds}."""
    low, high = np.percentile(stats[1:], [2.5, 97.5])
    return {"mean": float(stats[0]), "ci": [float(low), float(high)]}


def summarise(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {v: {m: interval(s) for m, s in per.items()} for v, per in stats.items()}


def difference(stats: Mapping[str, Mapping[str, np.ndarray]], a: str, b: str, metric: str = "auc") -> dict[str, Any]:
    """a - b with its paired interval; ``excludes_zero`` says whether the interval leaves zero out."""
    out = interval(stats[a][metric] - stats[b][metric])
    out["excludes_zero"] = bool(out["ci"][0] > 0 or out["ci"][1] < 0)
    return out


def fmt(cell: Mapping[str, Any], signed: bool = False) -> str:
    """'0.812 [0.771, 0.850]' (or with signs for differences)."""
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(cell['mean'])} [{f.format(cell['ci'][0])}, {f.format(cell['ci'][1])}]"
