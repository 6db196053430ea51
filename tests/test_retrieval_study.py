"""The retrieval study: TF-IDF, the SAE pooling modes, seed draws, intervals, and the job end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from ray_jobs.runtime import run_job
from shared.config import validate_config
from shared.configs.curate import CurateConfig
from shared.configs.retrieval_study import RetrievalStudyConfig
from shared.curation.sae import SAEShape, TopKSAE, firing_tfidf, lift_weights, pooled_views, token_idf
from shared.curation.study import (
    Draw,
    StudyInputs,
    bootstrap_mean,
    draw_seeds,
    figures,
    fused,
    lift_scores,
    run_study,
)
from shared.curation.tfidf import TfidfModel, max_cosine, term_counts
from shared.errors import DataError

# ---------------------------------------------------------------------------------------------------------------------
# TF-IDF


def test_tfidf_ranks_by_shared_rare_terms_with_sublinear_tf_and_pool_idf():
    pool = ["the rocket reached orbit", "the cake needs butter", "the the the the the orbit", "the match ended"]
    model = TfidfModel.fit(term_counts(pool))
    docs = model.transform(term_counts(pool))
    seeds = model.transform(term_counts(["a rocket launch to orbit"]))
    scores = max_cosine(docs, seeds)
    assert int(np.argmax(scores)) == 0  # shares two terms, one of them rare
    assert scores[1] == 0.0  # shares nothing
    assert scores[2] > 0.0  # "orbit"
    norms = np.sqrt(np.asarray(docs.multiply(docs).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    # sublinear tf: 5 x "the" weighs 1 + log 5, not 5; a term in every pool document gets the smallest idf
    counts = term_counts(["the the the the the"])
    assert counts.sum() == 9  # 5 unigrams and 4 bigrams
    the_bucket = term_counts(["the"]).indices[0]
    assert model.idf[the_bucket] == pytest.approx(1.0)
    assert model.idf.max() > model.idf[the_bucket]


# ---------------------------------------------------------------------------------------------------------------------
# Pooling modes


def test_pooling_modes_count_only_masked_tokens_and_tfidf_discounts_always_on_latents():
    torch.manual_seed(0)
    sae = TopKSAE(SAEShape(d_in=6, n_latents=12, k=3, aux_k=2, dead_tokens=100))
    acts = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    sae.requires_grad_(False)
    views = pooled_views(sae, acts, mask)
    values, indices = sae.encode(acts)
    dense = torch.zeros(2, 5, 12).scatter_(2, indices, values)
    np.testing.assert_allclose(views.mean[0], dense[0, :3].mean(0), atol=1e-6)
    np.testing.assert_allclose(views.max[0], dense[0, :3].max(0).values, atol=1e-6)
    np.testing.assert_allclose(views.fired[1], (dense[1] > 0).float().mean(0), atol=1e-6)
    changed = acts.clone()
    changed[0, 3:] = 100.0  # padding does not count
    again = pooled_views(sae, changed, mask)
    assert torch.allclose(again.mean[0], views.mean[0])
    assert torch.allclose(again.max[0], views.max[0])
    # a latent that fires on every token gets idf 0; a rare one a positive idf
    idf = token_idf(torch.tensor([1000.0, 10.0]), tokens=1000)
    assert float(idf[0]) == pytest.approx(0.0, abs=1e-3)
    assert float(idf[1]) > 4.0
    weighted = firing_tfidf(torch.tensor([[1.0, 0.1]]), idf)
    assert float(weighted[0, 1]) > float(weighted[0, 0])
    lift = lift_weights(torch.tensor([[0.5, 0.1], [0.5, 0.1]]), torch.tensor([0.05, 0.1]))
    assert float(lift[0]) > 2.0
    assert float(lift[1]) == pytest.approx(0.0, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Draws, figures, intervals


def test_draws_are_seeded_per_target_and_draw_and_come_from_the_reserve_of_the_target():
    labels = np.array(["a"] * 12 + ["b"] * 12)
    draws = draw_seeds(labels, ["a", "b"], draws=5, per_draw=4, seed=3)
    assert len(draws) == 10
    for d in draws:
        assert len(set(d.seeds)) == 4
        assert set(labels[list(d.seeds)]) == {d.target}
    assert draws == draw_seeds(labels, ["a", "b"], draws=5, per_draw=4, seed=3)
    assert draw_seeds(labels, ["b"], draws=5, per_draw=4, seed=3) == draws[5:]  # independent of the target list
    assert len({d.seeds for d in draws if d.target == "a"}) > 1
    with pytest.raises(DataError, match="target 'a': 12 reserve documents"):
        draw_seeds(labels, ["a"], draws=1, per_draw=13, seed=0)


def test_figures_and_bootstrap_intervals():
    labels = np.array(["t", "t", "o", "t", "o", "o"])
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.0])
    f = figures(scores, labels, "t", m=2)
    assert f["purity"] == 0.5
    assert f["recall"] == pytest.approx(1 / 3)
    assert f["r_precision"] == pytest.approx(2 / 3)  # top 3: t, o, t
    values = np.array([0.5, 0.6, 0.7, 0.2, 0.2, 0.2])
    strata = np.array(["a", "a", "a", "b", "b", "b"])
    mean, low, high = bootstrap_mean(values, strata, rounds=500, seed=0)
    assert mean == pytest.approx((0.6 + 0.2) / 2)
    assert low < mean < high
    assert high - low < 0.2
    assert bootstrap_mean(values, strata, 500, 0) == (mean, low, high)
    fusion = fused(np.array([3.0, 2.0, 1.0]), np.array([1.0, 3.0, 2.0]))
    assert int(np.argmax(fusion)) == 1  # ranks (1, 0) beat (0, 2) and (2, 1)


def _clusters(rng: np.random.Generator, labels: list[str], dim: int, noise: float) -> np.ndarray:
    centres = {t: rng.normal(size=dim) for t in sorted(set(labels))}
    x = np.stack([centres[t] + noise * rng.normal(size=dim) for t in labels])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_study_chooses_the_sae_kind_on_the_development_target_and_compares_on_the_others():
    rng = np.random.default_rng(0)
    pool_labels = [t for t in "abc" for _ in range(40)]
    reserve_labels = [t for t in "abc" for _ in range(8)]
    good = _clusters(rng, pool_labels + reserve_labels, 16, 0.3)
    bad = _clusters(rng, pool_labels + reserve_labels, 16, 3.0)
    n = len(pool_labels)
    inputs = StudyInputs(np.array(pool_labels), np.array(reserve_labels),
                         vectors={"sae": (bad[:n], bad[n:]), "sae_max": (good[:n], good[n:]),
                                  "tfidf": (bad[:n], bad[n:])},
                         pool_ids=[f"d{i}" for i in range(n)])
    draws = draw_seeds(np.array(reserve_labels), ["a", "b", "c"], draws=5, per_draw=3, seed=0)
    result = run_study(inputs, draws, m=20, development_target="a", sae_methods=["sae", "sae_max"],
                       compare_with=["tfidf", "random"], rounds=300)
    assert result.chosen_sae == "sae_max"
    assert result.headline_targets == ["b", "c"]
    assert result.summary["sae_max"]["headline"]["purity"]["mean"] > 0.9
    assert result.summary["random"]["headline"]["purity"]["mean"] < 0.6
    assert "hybrid" in result.summary
    gap = result.comparisons["sae_max - tfidf"]
    assert gap["excludes_zero"]
    assert gap["ci"][0] > 0
    assert gap["runs"] == 10
    assert {r["method"] for r in result.runs} == {"sae", "sae_max", "tfidf", "random", "hybrid"}


def test_lift_weights_keep_only_latents_the_seeds_use_more_than_the_pool():
    pool = np.array([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    seeds = np.array([[0.5, 0.5, 0.0]])
    scores = lift_scores(pool, seeds)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(0.0)  # latent 0 fires everywhere: no weight; latent 2 not on the seed


def test_a_draw_names_its_target():
    assert Draw("x", 0, (1, 2)).target == "x"


# ---------------------------------------------------------------------------------------------------------------------
# The job


TOPICS = {
    "space": "orbit rocket launch satellite shuttle astronaut lunar mars telescope payload booster capsule".split(),
    "kitchen": "recipe butter flour oven simmer garlic onion pepper sauce baking dough skillet".split(),
    "football": "goal striker midfield referee penalty keeper league match corner tackle stadium coach".split(),
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_the_study_job_reports_every_method_with_intervals_on_a_separable_pool(ray_session, tmp_path):
    rng = random.Random(0)
    doc = lambda topic: " ".join(rng.choice(TOPICS[topic]) for _ in range(30))  # noqa: E731
    pool = [{"id": f"p{t}{i}", "text": doc(t), "label": t} for t in TOPICS for i in range(20)]
    reserve = [{"id": f"r{t}{i}", "text": doc(t), "label": t} for t in TOPICS for i in range(6)]
    _write(tmp_path / "pool.jsonl", pool)
    _write(tmp_path / "reserve.jsonl", reserve)
    curate = validate_config(CurateConfig, {
        "model": "tiny-llama", "max_tokens": 48, "corpus": str(tmp_path / "pool.jsonl"),
        "seeds": [r["text"] for r in reserve[:3]], "output_root": str(tmp_path / "run"),
        "coordinates": {"k": 16, "reference_docs": 4, "reference_tokens": 24},
        "sae": {"train_docs": 24, "steps": 40, "expansion": 4, "k": 4, "batch_size": 256},
        "retrieval": {"m": 10}, "runtime": {"piece_docs": 16}}, "test")
    run_job(curate)
    cfg = validate_config(RetrievalStudyConfig, {
        "corpus": str(tmp_path / "pool.jsonl"), "reserve": str(tmp_path / "reserve.jsonl"),
        "curation": str(tmp_path / "run" / "curate"), "variants": {"again": str(tmp_path / "run" / "curate")},
        "development_target": "kitchen", "draws": 3,
        "seeds_per_draw": 3, "m": 15, "max_tokens": 48, "sentence_model": "minilm-l6", "bootstrap_rounds": 200,
        "output_root": str(tmp_path / "run"), "runtime": {"cpus_per_task": 1, "block_docs": 40}}, "test")
    metrics = run_job(cfg)
    methods = set(metrics["summary"])
    assert {"sae", "sae_idf", "sae_max", "sae_tfidf", "sae_lift", "dense", "tfidf", "minilm", "ngram", "random",
            "hybrid"} <= methods
    assert metrics["chosen_sae"] in {"sae", "sae_idf", "sae_max", "sae_tfidf", "sae_lift"}
    assert metrics["headline_targets"] == ["football", "space"]
    for kind in ("sae", "sae_max", "dense"):  # a variant is embedded on its own: the same stage gives the same figures
        assert metrics["summary"][f"again:{kind}"] == metrics["summary"][kind]
    assert not metrics["chosen_sae"].startswith("again:")  # a tie goes to the main model
    headline = {m: metrics["summary"][m]["headline"]["purity"] for m in methods}
    for entry in headline.values():
        assert entry["ci"][0] <= entry["mean"] <= entry["ci"][1]
        assert entry["runs"] == 6
    # disjoint vocabularies: word-based methods are near perfect, random is at the base rate (1/3)
    assert headline["tfidf"]["mean"] > 0.9, headline
    assert headline["minilm"]["mean"] > 0.8, headline
    assert headline["random"]["mean"] < 0.6, headline
    assert set(metrics["comparisons"]) >= {f"{metrics['chosen_sae']} - tfidf", f"{metrics['chosen_sae']} - random"}
    stage = tmp_path / "run" / "retrieval-study"
    study = next(stage.glob("attempts/*/study.md")).read_text()
    assert "(chosen)" in study
    assert "kitchen (dev)" in study
    runs = [json.loads(line) for line in next(stage.glob("attempts/*/runs.jsonl")).read_text().splitlines()]
    assert len(runs) == len(methods) * 3 * 3
    with pytest.raises(ValueError, match="variant name 'a:b'"):
        RetrievalStudyConfig.model_validate({**cfg.model_dump(), "variants": {"a:b": "x"}})


def test_the_study_refuses_a_reserve_that_overlaps_the_pool(ray_session, tmp_path):
    rows = [{"id": f"d{i}", "text": f"text {i}", "label": "a"} for i in range(4)]
    _write(tmp_path / "pool.jsonl", rows)
    _write(tmp_path / "reserve.jsonl", rows[:2])
    cfg = validate_config(RetrievalStudyConfig, {
        "corpus": str(tmp_path / "pool.jsonl"), "reserve": str(tmp_path / "reserve.jsonl"),
        "curation": str(tmp_path / "nowhere"), "development_target": "a", "output_root": str(tmp_path / "run")},
        "test")
    with pytest.raises(DataError, match="2 documents are also in the pool"):
        run_job(cfg)
