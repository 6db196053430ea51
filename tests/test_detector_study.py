"""The detector study's parts on synthetic features: intervals, design, subsample, heads, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from shared.configs.detector_study import DetectorStudyConfig
from shared.configs.train_detector import BoostingConfig
from shared.detection.heads import fit_head
from shared.detection.intervals import Cell, auc_rounds, bootstrap, difference, stratified_draws, tpr_at_fpr
from shared.detection.metrics import roc_auc
from shared.detection.mixture import assign_split
from shared.detection.study import (
    HEADLINE,
    HEADLINE_VARIANTS,
    StudyInputs,
    cross_split_near_duplicates,
    even_subsample,
    resolve_families,
    split_runs,
    study_design,
)
from shared.errors import ConfigError

FAMILIES = {"a": ["a1", "a2"], "b": ["b"], "c": ["c"]}


@pytest.fixture(autouse=True)
def one_thread():
    """Heads this small run fastest on one torch thread (as the study's tasks do)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_vectorised_auc_matches_the_reference_with_ties_and_resamples_by_class():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30, int), np.ones(50, int)]
    scores = np.round(rng.random(80), 1)  # many ties
    draws = stratified_draws(labels, 20, rng)
    assert draws.shape == (20, 80)
    assert ((labels[draws] == 0).sum(axis=1) == 30).all()  # every round keeps the class counts
    expected = [roc_auc(labels[d], scores[d]) for d in draws]
    assert np.allclose(auc_rounds(labels, scores, draws), expected)
    assert tpr_at_fpr(np.r_[0, 0, 1, 1], np.r_[0.1, 0.5, 0.6, 0.2]) == 0.5


def _cells(rng, shift_b: float, splits: int = 3) -> list[Cell]:
    cells = []
    for _ in range(splits):
        labels = np.r_[np.zeros(40, int), np.ones(60, int)]
        base = rng.normal(size=100) + labels * 1.0
        cells.append(Cell(labels, {"a": [base + rng.normal(scale=0.3, size=100) for _ in range(2)],
                                   "b": [base + labels * shift_b + rng.normal(scale=0.3, size=100)
                                         for _ in range(2)]}))
    return cells


def test_paired_bootstrap_separates_a_real_difference_and_not_noise():
    rng = np.random.default_rng(1)
    same = bootstrap(_cells(rng, 0.0), 400, seed=0)
    better = bootstrap(_cells(rng, 1.5), 400, seed=0)
    d_same, d_better = difference(same, "b", "a"), difference(better, "b", "a")
    assert not d_same["excludes_zero"], d_same
    assert d_better["excludes_zero"], d_better
    assert d_better["mean"] > 0.05, d_better
    lo, hi = d_better["ci"]
    assert lo < d_better["mean"] < hi
    identical = bootstrap(_cells(rng, 0.0)[:1], 200, seed=0)
    identical_diff = difference(identical, "a", "a")
    assert identical_diff["mean"] == 0
    assert identical_diff["ci"] == [0.0, 0.0]
    again = bootstrap(_cells(np.random.default_rng(1), 0.0), 400, seed=0)
    assert np.array_equal(again["a"]["auc"], same["a"]["auc"])  # seeded


def test_design_blocks_and_the_single_source_rule():
    design = {b.name: b for b in study_design(FAMILIES, "c", "b")}
    assert list(design) == ["headline", "lofo/a", "lofo/b", "lofo/c", "matrix"]
    head = {v.name: v for v in design["headline"].variants}
    assert list(head) == list(HEADLINE_VARIANTS)
    assert head["single-boost"].generators == ("b",)
    assert head["single-boost"].weighting == "momentum"
    assert head["diverse-ohem"].generators == ("a1", "a2", "b")
    assert head["diverse-ohem"].weighting == "ohem"
    assert design["headline"].tests == (("c", ("c",), True),)
    # when the configured single generator's family is held out, the first generator of the first other family
    lofo_b = {v.name: v.generators for v in design["lofo/b"].variants}
    assert lofo_b == {"diverse": ("a1", "a2", "c"), "single": ("a1",)}
    assert [t[0] for t in design["matrix"].tests] == ["a", "b", "c"]
    assert all(t[2] is False for t in design["matrix"].tests)  # the diagonal needs unseen images: test split only
    with pytest.raises(ConfigError, match="belongs to heldout_family"):
        study_design(FAMILIES, "a", "a2")
    with pytest.raises(ConfigError, match="at least two generator families"):
        study_design({"a": ["a1"]}, "a", "a1")


def test_families_from_config_column_or_one_per_generator():
    sources, labels = ["r", "a1", "a2", "b"], [0, 1, 1, 1]
    assert resolve_families(sources, labels, None, {}) == {"a1": ["a1"], "a2": ["a2"], "b": ["b"]}
    assert resolve_families(sources, labels, ["real", "a", "a", "b"], {}) == {"a": ["a1", "a2"], "b": ["b"]}
    assert resolve_families(sources, labels, None, {"x": ["a1", "a2", "b"]}) == {"x": ["a1", "a2", "b"]}
    with pytest.raises(ConfigError, match="generator 'b' of the data is in no family"):
        resolve_families(sources, labels, None, {"x": ["a1", "a2"]})
    with pytest.raises(ConfigError, match="'zz' is not in the data"):
        resolve_families(sources, labels, None, {"x": ["a1", "a2", "b", "zz"]})
    with pytest.raises(ConfigError, match="more than one family"):
        resolve_families(["a1", "a1"], [1, 1], ["x", "y"], {})


def test_even_subsample_spreads_over_sources_and_is_seeded():
    sources = np.array(["x"] * 10 + ["y"] * 3 + ["z"] * 30, dtype=object)
    rows = np.arange(43)
    pick = even_subsample(rows, sources, 12, np.random.default_rng(0))
    counts = {s: int((sources[pick] == s).sum()) for s in "xyz"}
    assert sum(counts.values()) == 12
    assert counts["y"] == 3
    assert abs(counts["x"] - counts["z"]) <= 1
    assert np.array_equal(pick, even_subsample(rows, sources, 12, np.random.default_rng(0)))


def _inputs(seed: int = 0) -> StudyInputs:
    rng = np.random.default_rng(seed)
    sources = np.array(["real"] * 80 + ["a1"] * 30 + ["a2"] * 30 + ["b"] * 60 + ["c"] * 60, dtype=object)
    labels = (sources != "real").astype(np.int64)
    direction = {s: rng.normal(size=16) for s in set(sources)}
    x = np.stack([direction[s] * 1.2 + rng.normal(size=16) for s in sources]).astype(np.float32)
    names = sorted({f"{s}/{'fake' if y else 'real'}" for s, y in zip(sources, labels)})
    groups = np.array([names.index(f"{s}/{'fake' if y else 'real'}") for s, y in zip(sources, labels)])
    ids = [f"{s}-{i}" for i, s in enumerate(sources)]
    splits = [assign_split(ids, k, 0.15, 0.3) for k in range(2)]
    return StudyInputs(labels, sources, groups, names, splits,
                       {"clean": x, "noisy": x + rng.normal(scale=0.5, size=x.shape).astype(np.float32)})


def test_split_runs_train_every_variant_on_equal_budgets_and_reproduce_exactly():
    cfg = DetectorStudyConfig(data="x", heldout_family="c", single_generator="b", families=FAMILIES, seeds=2,
                              head={"epochs": 6})
    design = study_design(FAMILIES, "c", "b")
    inputs = _inputs()
    first = split_runs(inputs, design, 1, cfg)
    headline = [r for r in first["runs"] if r["block"] == HEADLINE]
    assert len(headline) == len(HEADLINE_VARIANTS) * 2
    assert len({r["train_fakes"] for r in headline}) == 1  # one budget for the block
    assert len({r["train_reals"] for r in headline}) == 1
    cell = first["cells"][(HEADLINE, "c", "clean")]
    assert (cell.labels == 1).sum() == 60  # every image of the held-out family is scored
    assert set(first["cells"]) >= {(HEADLINE, "c", "noisy"), ("matrix", "a", "clean"), ("lofo/a", "a", "clean")}
    matrix = first["cells"][("matrix", "b", "clean")]
    assert (matrix.labels == 1).sum() == int(((inputs.sources == "b") & (inputs.splits[1] == "test")).sum())
    again = split_runs(_inputs(), design, 1, cfg)
    for key, c in first["cells"].items():
        for v, per_seed in c.scores.items():
            for s1, s2 in zip(per_seed, again["cells"][key].scores[v]):
                assert np.array_equal(s1, s2), (key, v)
    # the family a detector trained on is detected (features carry a per-source direction)
    trained_on_b = [r for r in first["runs"] if r["block"] == "matrix" and r["variant"] == "b"]
    assert min(r["test"]["b"]["auc"] for r in trained_on_b) > 0.8


def test_head_learns_separable_features_with_every_weighting():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    x = (rng.normal(size=(120, 8)) + y[:, None] * 2.0).astype(np.float32)
    groups = y.copy()
    train, val = np.r_[0:40, 60:100], np.r_[40:60, 100:120]
    cfg = DetectorStudyConfig(data="x", heldout_family="c", single_generator="b").head.model_copy(
        update={"epochs": 8})
    for method in ("uniform", "momentum", "focal", "ohem"):
        head = fit_head(x, y, groups, ["real", "fake"], train, val, cfg, BoostingConfig(method=method), seed=0)
        assert head.val_auc > 0.95, method
        assert roc_auc(y[val], head.score(x[val])) == pytest.approx(head.val_auc)


def test_near_duplicates_across_splits_are_counted():
    hashes = np.array([0b1111, 0b1110, 2**40, 0], dtype=np.uint64)
    labels = np.array([0, 0, 1, 1])
    split = np.array(["train", "test", "train", "train"], dtype=object)
    counts = cross_split_near_duplicates(hashes, labels, split, 1)
    assert counts == {"real_train~real_test": 1, "fake_train~real_test": 0}
    assert cross_split_near_duplicates(hashes, labels, split, 3)["fake_train~real_test"] == 1  # 0 is 3 bits away
    assert cross_split_near_duplicates(hashes, labels, split, 4)["fake_train~real_test"] == 2  # 2**40 is 4
