"""Detection metrics against scikit-learn's on fixed inputs (ties included), and their one-class behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from shared.detection.metrics import accuracy, average_precision, binary_metrics, eer, roc_auc, roc_curve
from shared.errors import DataError

# Fixed inputs: a hand-written case with ties across classes, and seeded random ones (continuous and coarse scores).
HAND = (np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0]), np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.9, 0.05, 0.6, 0.7]))
RNG = np.random.default_rng(1234)
CONTINUOUS = (RNG.integers(0, 2, 200), RNG.random(200))
COARSE = (RNG.integers(0, 2, 300), RNG.integers(0, 5, 300) / 4.0)  # many ties
SHIFTED = (np.r_[np.zeros(150, int), np.ones(50, int)], np.r_[RNG.normal(0, 1, 150), RNG.normal(1, 1, 50)])
CASES = {"hand": HAND, "continuous": CONTINUOUS, "coarse": COARSE, "imbalanced": SHIFTED}


@pytest.mark.parametrize("name", sorted(CASES))
def test_auc_ap_acc_match_scikit_learn(name):
    y, s = CASES[name]
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert accuracy(y, s, 0.5) == pytest.approx(accuracy_score(y, s >= 0.5))
    assert accuracy(y, s, 0.3) == pytest.approx(accuracy_score(y, s >= 0.3))


@pytest.mark.parametrize("name", sorted(CASES))
def test_roc_curve_matches_scikit_learn_without_dropping_points(name):
    y, s = CASES[name]
    fpr, tpr, thr = roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("name", sorted(CASES))
def test_eer_lies_where_fpr_meets_fnr_on_scikit_learns_curve(name):
    y, s = CASES[name]
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    fnr = 1 - tpr
    k = int(np.flatnonzero(fnr - fpr <= 0)[0])  # first ROC point past the crossing
    value = eer(y, s)
    # the EER lies between the FPRs (and between the FNRs) of the two points that bracket the crossing
    assert min(fpr[k - 1], fpr[k]) - 1e-12 <= value <= max(fpr[k - 1], fpr[k]) + 1e-12
    assert min(fnr[k - 1], fnr[k]) - 1e-12 <= value <= max(fnr[k - 1], fnr[k]) + 1e-12


def test_eer_known_values():
    assert eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0  # separable
    assert eer([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 1.0  # reversed
    assert eer([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie: chance
    # 4 reals, 4 fakes, one of each on the wrong side: FPR = FNR = 1/4 at the threshold between them
    assert eer([0, 0, 0, 0, 1, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.35, 0.8, 0.9, 0.95]) == pytest.approx(0.25)


def test_one_class_is_an_error_for_ranking_metrics_and_none_in_the_matrix():
    with pytest.raises(DataError, match="one class only .*all 3 samples are fake"):
        roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(DataError, match="without fakes"):
        average_precision([0, 0], [0.2, 0.5])
    with pytest.raises(DataError, match="2 labels but 3 scores"):
        accuracy([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])
    m = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert m["acc"] == pytest.approx(2 / 3)
    assert m["auc"] is None
    assert m["note"] == "one class only (real)"
    both = binary_metrics(*HAND)
    assert both["auc"] == pytest.approx(roc_auc_score(*HAND))
    assert (both["n_real"], both["n_fake"]) == (5, 5)
