"""Scoring and selection: cosine to the nearest seed, global top-M, per-seed top-M union, score thresholds.

:func:`select` is exact on any superset of the selected documents, which makes selection over a large corpus a
streaming reduce (:mod:`shared.curation.selection`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from shared.curation.kinds import Mode


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B, H], averaging the counted tokens only."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)


def seed_similarities(vectors: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """[B, S] cosine similarities of documents to seeds (both are L2-normalised here)."""
    return F.normalize(vectors.float(), dim=-1) @ F.normalize(seeds.float(), dim=-1).T


def _top(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m largest scores, best first; ties broken by position (stable)."""
    m = min(m, scores.shape[0])
    order = np.argsort(-scores, kind="stable")
    return order[:m]


def select(scores: np.ndarray, mode: Mode, m: int | None, threshold: float | None = None,
           seed_scores: np.ndarray | None = None) -> np.ndarray:
    """Positions of the selected documents.

    ``global``: the m best scores (score = max over seeds). ``per_seed``: for each seed its m most similar documents,
    united (the FineScope code's selection); needs ``seed_scores`` [N, S]. ``threshold`` keeps only scores >= it,
    applied before the top-m (with ``m=None`` everything above the threshold is kept).
    """
    if m is None and threshold is None:
        raise ValueError("select needs m, a threshold, or both")
    keep = np.ones(scores.shape[0], dtype=bool) if threshold is None else scores >= threshold
    if m is None:
        return np.flatnonzero(keep)
    candidates = np.flatnonzero(keep)
    if mode == "global":
        return candidates[_top(scores[candidates], m)]
    if seed_scores is None:
        raise ValueError("per_seed selection needs the per-seed scores")
    chosen: dict[int, None] = {}
    for s in range(seed_scores.shape[1]):
        for i in candidates[_top(seed_scores[candidates, s], m)]:
            chosen.setdefault(int(i), None)
    picked = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
    return picked[np.argsort(-scores[picked], kind="stable")]


def purity_and_recall(selected_labels: list, all_labels_count: int, target: str) -> dict[str, float]:
    """Share of selected documents with the target label, and share of the pool's target documents selected."""
    hits = sum(1 for label in selected_labels if label == target)
    return {
        "purity": hits / len(selected_labels) if selected_labels else 0.0,
        "recall": hits / all_labels_count if all_labels_count else 0.0,
        "selected": len(selected_labels),
        "hits": hits,
    }
