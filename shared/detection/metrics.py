"""Binary detection metrics in numpy: labels 1 = fake (positive), scores = probability of fake.

Definitions follow scikit-learn's (the tests compare them on fixed inputs): ``roc_auc`` is the Mann-Whitney
statistic with ties counted one half (= ``roc_auc_score``); ``average_precision`` is the step-wise sum
sum_n (R_n - R_{n-1}) P_n over distinct thresholds (= ``average_precision_score``). ``eer`` is the equal error rate:
where the false-positive rate equals the false-negative rate on the ROC curve, linearly interpolated between the
two ROC points that bracket the crossing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.errors import DataError


def _check(labels: Any, scores: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise DataError(f"{what}: {y.size} labels but {s.size} scores")
    if y.size == 0:
        raise DataError(f"{what}: no samples")
    if not np.isin(y, (0, 1)).all():
        raise DataError(f"{what}: labels must be 0 (real) or 1 (fake)")
    if not np.isfinite(s).all():
        raise DataError(f"{what}: scores contain NaN or infinity")
    return y, s


def _both_classes(y: np.ndarray, what: str) -> None:
    if y.min() == y.max():
        only = "fake" if y[0] == 1 else "real"
        raise DataError(f"{what}: undefined with one class only (all {y.size} samples are {only})")


def accuracy(labels: Any, scores: Any, threshold: float = 0.5) -> float:
    """Fraction right when 'fake' is predicted for score >= threshold."""
    y, s = _check(labels, scores, "accuracy")
    return float(np.mean((s >= threshold).astype(np.int64) == y))


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest threshold first, starting from (0, 0) at +inf."""
    y, s = _check(labels, scores, "ROC")
    _both_classes(y, "ROC")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # index of the last sample at each distinct score
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    thresholds = np.r_[np.inf, s[last_of_tie]]
    return fpr, tpr, thresholds


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve: P(score of a fake > score of a real), ties counting one half."""
    y, s = _check(labels, scores, "AUC")
    _both_classes(y, "AUC")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks (1-based) over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision: sum over distinct thresholds of (recall gain) x precision."""
    y, s = _check(labels, scores, "AP")
    if y.sum() == 0:
        raise DataError(f"AP: undefined without fakes (all {y.size} samples are real)")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last_of_tie].astype(np.float64)
    predicted = (last_of_tie + 1).astype(np.float64)
    precision = tps / predicted
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def eer(labels: Any, scores: Any) -> float:
    """Equal error rate: FPR = FNR on the ROC, interpolated linearly between the bracketing points."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    diff = fnr - fpr  # starts at 1 (threshold +inf), ends at -1; non-increasing
    k = int(np.flatnonzero(diff <= 0)[0])
    if diff[k] == 0:
        return float(fpr[k])
    # crossing between k-1 (diff > 0) and k (diff < 0)
    t = diff[k - 1] / (diff[k - 1] - diff[k])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def binary_metrics(labels: Any, scores: Any, threshold: float = 0.5) -> dict[str, Any]:
    """ACC, AUC, AP, EER and the class counts; the ranking metrics are None (with a note) when a class is missing."""
    y, s = _check(labels, scores, "metrics")
    out: dict[str, Any] = {"n_real": int((y == 0).sum()), "n_fake": int((y == 1).sum()),
                           "acc": accuracy(y, s, threshold)}
    if out["n_real"] and out["n_fake"]:
        out.update(auc=roc_auc(y, s), ap=average_precision(y, s), eer=eer(y, s))
    else:
        out.update(auc=None, ap=None, eer=None, note=f"one class only ({'fake' if out['n_fake'] else 'real'})")
    return out
