"""The evaluation matrix: detectors (rows) x test columns, per perturbation condition.

Columns of a test set: one per generator G (G's fakes against every real image of the test set) and one per real
collection R (R's reals against every fake of the test set). With several test sets, columns are named
``<test set>/<source>``. A column with one class only gets ACC and None for the ranking metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.detection.metrics import binary_metrics, roc_curve

METRIC_NAMES = {"acc": "ACC", "auc": "AUC", "ap": "AP", "eer": "EER"}


def conditions(jpeg_quality: Sequence[int], blur_sigma: Sequence[float]) -> list[tuple[str, str, float]]:
    """(name, kind, strength) of every scoring condition, 'clean' first."""
    return ([("clean", "clean", 0.0)] + [(f"jpeg{q}", "jpeg", float(q)) for q in jpeg_quality]
            + [(f"blur{s:g}", "blur", float(s)) for s in blur_sigma])


def test_columns(testset: np.ndarray, source: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """Column name -> boolean mask over the scored rows."""
    names = list(dict.fromkeys(testset.tolist()))
    columns: dict[str, np.ndarray] = {}
    for t in names:
        here = testset == t
        prefix = f"{t}/" if len(names) > 1 else ""
        fakes = sorted(set(source[here & (label == 1)].tolist()))
        reals = sorted(set(source[here & (label == 0)].tolist()))
        for g in fakes:
            columns[prefix + g] = here & ((source == g) | (label == 0))
        for r in reals:
            columns[prefix + r] = here & ((source == r) | (label == 1))
    return columns


def evaluation_matrix(testset: np.ndarray, source: np.ndarray, label: np.ndarray,
                      scores: dict[tuple[str, str], np.ndarray], threshold: float
                      ) -> tuple[dict[str, dict[str, dict[str, dict[str, Any]]]], dict[str, np.ndarray]]:
    """({detector: {column: {condition: metrics}}}, columns); ``scores`` maps (detector, condition) to scores."""
    columns = test_columns(testset, source, label)
    matrix: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for (det, cond), s in scores.items():
        for col, mask in columns.items():
            matrix.setdefault(det, {}).setdefault(col, {})[cond] = binary_metrics(label[mask], s[mask], threshold)
    return matrix, columns


def roc_curves(label: np.ndarray, score: np.ndarray, columns: dict[str, np.ndarray]
               ) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    from shared.detection.metrics import roc_auc

    out = {}
    for col, mask in columns.items():
        y = label[mask]
        if y.min() != y.max():
            fpr, tpr, _ = roc_curve(y, score[mask])
            out[col] = (fpr, tpr, roc_auc(y, score[mask]))
    return out


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_table(matrix: dict[str, Any], detectors: Sequence[str], columns: Sequence[str], condition: str,
                   metric: str, seen: dict[str, set[str]] | None = None) -> str:
    """One metric under one condition: rows detectors, columns test columns; cells seen in training marked '†'."""
    seen = seen or {}
    lines = ["| detector | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for det in detectors:
        cells = []
        for col in columns:
            cell = _fmt(matrix[det][col][condition][metric])
            cells.append(cell + (" †" if col in seen.get(det, set()) else ""))
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(matrix: dict[str, Any], detectors: Sequence[str], columns: Sequence[str],
                    condition_names: Sequence[str], counts: dict[str, dict[str, int]], threshold: float,
                    seen: dict[str, set[str]] | None = None) -> str:
    parts = ["# Detector evaluation", "",
             "Rows: detectors. Columns: a generator (its fakes against all reals of the test set) or a real collection "
             "(its reals against all fakes). † marks a column whose source was in the detector's training data. "
             f"ACC at threshold {threshold:g} on the probability of 'fake'.", "",
             "Test images per column: " + ", ".join(f"{c} ({v['n_real']} real / {v['n_fake']} fake)"
                                                     for c, v in counts.items()), ""]
    for metric in ("auc", "acc", "ap", "eer"):
        parts += [f"## {METRIC_NAMES[metric]} (clean)", "",
                  markdown_table(matrix, detectors, columns, "clean", metric, seen), ""]
    for cond in condition_names:
        if cond != "clean":
            parts += [f"## AUC under {cond}", "", markdown_table(matrix, detectors, columns, cond, "auc", seen), ""]
    return "\n".join(parts)
