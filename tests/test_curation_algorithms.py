"""The curation algorithms as plain functions: coordinate sensitivity, the TopK SAE, pooling, selection, baselines."""

from __future__ import annotations

import collections
import random
from collections import Counter

import numpy as np
import pytest
import torch

from shared.curation.activations import (
    default_layer,
    jvp_sensitivity,
    select_coordinates,
    statistic_scores,
    token_mask,
    truncate_to_layer,
)
from shared.curation.corpus import Document, chunk_text, split_corpus
from shared.curation.features import length_batches, pad_batch
from shared.curation.hygiene import NearDuplicates, shingles, strip_news_headers, strip_replies
from shared.curation.ngram import gumbel_keys, hashed_ngrams, log_distribution, log_importance, stable_uniform
from shared.curation.retrieval import mean_pool, purity_and_recall, select
from shared.curation.sae import SAEShape, TopKSAE, TrainSettings, idf_codes, idf_weights, pooled_codes, train_sae
from shared.curation.selection import CorpusCounts, Tally, count_block, rule_for, sortable, tally
from shared.errors import DataError, ModelError
from shared.models import load_causal_lm


@pytest.fixture(scope="module")
def tiny_base(tiny_llama_dir):
    model, tok = load_causal_lm("tiny-llama")
    return truncate_to_layer(model, 3), tok


# --- coordinates ------------------------------------------------------------------------------------------------------


def test_default_layer_is_three_quarters_deep():
    assert default_layer(30) == 22
    assert default_layer(6) == 4
    assert default_layer(1) == 0


def test_layer_out_of_range(tiny_llama_dir):
    model, _ = load_causal_lm("tiny-llama")
    with pytest.raises(ModelError, match="layer 6 is out of range: the model has layers 0..5"):
        truncate_to_layer(model, 6)


def _exact_sensitivity(base, input_ids, attention, skip_first):
    """Brute force: the full Jacobian of the layer output w.r.t. every input embedding, row norms per token."""
    embeds = base.get_input_embeddings()(input_ids).detach()
    base.config._attn_implementation = "eager"
    jac = torch.autograd.functional.jacobian(
        lambda e: base(inputs_embeds=e, attention_mask=attention).last_hidden_state, embeds, vectorize=True)
    base.config._attn_implementation = "sdpa"
    b, t, h = jac.shape[:3]
    norms = jac.reshape(b, t, h, -1).pow(2).sum(-1).sqrt()  # ||d a_{t,j} / d e(x)||
    return norms[token_mask(attention, skip_first)].mean(0)


def test_jvp_sensitivity_matches_brute_force_jacobian(tiny_base):
    base, tok = tiny_base
    input_ids, attention = pad_batch([tok("the shuttle reached orbit today")["input_ids"], tok("x y")["input_ids"]],
                                     tok.pad_token_id)
    exact = _exact_sensitivity(base, input_ids, attention, skip_first=True)
    estimate = jvp_sensitivity(base, input_ids, attention, probes=96, generator=torch.Generator().manual_seed(0))
    # Rademacher probes give an unbiased estimate of the squared norm; with 96 probes it is within several percent
    relative = (estimate - exact).abs() / exact
    assert float(relative.median()) < 0.08
    assert float(relative.max()) < 0.35
    top_exact = set(select_coordinates(exact, 16).tolist())
    top_estimate = set(select_coordinates(estimate, 16).tolist())
    assert len(top_exact & top_estimate) >= 12
    one_probe = jvp_sensitivity(base, input_ids, attention, probes=1, generator=torch.Generator().manual_seed(1))
    assert one_probe.shape == exact.shape
    assert torch.isfinite(one_probe).all()


def test_statistic_selectors_and_k_bounds():
    acts = torch.tensor([[1.0, -4.0, 0.0], [3.0, 4.0, 0.1]])
    assert torch.allclose(statistic_scores(acts, "magnitude"), torch.tensor([2.0, 4.0, 0.05]))
    assert int(select_coordinates(statistic_scores(acts, "variance"), 1)) == 1
    assert statistic_scores(acts, "all").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ModelError, match="coordinates.k=4"):
        select_coordinates(torch.ones(3), 4)


def test_token_mask_skips_first_real_token_with_either_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1]])
    assert token_mask(right, True).tolist() == [[False, True, True, False], [False, True, True, True]]
    assert token_mask(left, True).tolist() == [[False, False, True, True]]
    assert token_mask(right, False).tolist() == right.bool().tolist()


# --- SAE --------------------------------------------------------------------------------------------------------------


def _sparse_data(n=2048, d=16, atoms=64, active=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    codes = torch.zeros(n, atoms)
    for i in range(n):
        idx = torch.randperm(atoms, generator=g)[:active]
        codes[i, idx] = torch.rand(active, generator=g) * 2 + 0.5
    return codes @ dictionary + 0.01 * torch.randn(n, d, generator=g)


def test_topk_codes_and_unit_norm_decoder():
    sae = TopKSAE(SAEShape(d_in=8, n_latents=32, k=4, aux_k=8, dead_tokens=100), torch.Generator().manual_seed(0))
    x = torch.randn(50, 8)
    codes = sae.dense_codes(x)
    assert codes.shape == (50, 32)
    assert int((codes != 0).sum(1).max()) <= 4
    assert float(codes.min().detach()) >= 0
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)


def test_nmse_is_squared_error_over_batch_variance():
    sae = TopKSAE(SAEShape(d_in=6, n_latents=12, k=3, aux_k=4, dead_tokens=10), torch.Generator().manual_seed(1))
    x = torch.randn(40, 6)
    terms = sae.loss(x, aux_alpha=0.0, l1=0.0)
    values, indices = sae.encode(x)
    recon = sae.decode(values, indices)
    expected = ((recon - x) ** 2).sum(1).mean() / ((x - x.mean(0)) ** 2).sum(1).mean()
    assert torch.allclose(terms["nmse"], expected, rtol=1e-5)
    assert float(terms["auxk"]) == 0.0
    assert float(terms["l1"]) == 0.0
    with_l1 = sae.loss(x, aux_alpha=0.0, l1=0.5)
    assert torch.allclose(with_l1["l1"], values.abs().sum(-1).mean(), rtol=1e-5)
    assert torch.allclose(with_l1["loss"], with_l1["nmse"] + 0.5 * with_l1["l1"], rtol=1e-5)


def test_dead_latents_and_auxk_gradient_reaches_only_dead_latents():
    shape = SAEShape(d_in=6, n_latents=24, k=2, aux_k=6, dead_tokens=30)
    sae = TopKSAE(shape, torch.Generator().manual_seed(2))
    x = torch.randn(20, 6)
    sae.loss(x, 1.0, 0.0)
    assert not sae.dead_mask().any()  # 20 tokens < 30
    fired_once = sae.tokens_since_fired == 0
    sae.loss(x, 1.0, 0.0)  # the same batch: the same latents fire again; the rest reach 40 tokens unfired
    dead = sae.dead_mask()
    assert dead.any()
    assert not (dead & fired_once).any()
    sae.zero_grad()
    terms = sae.loss(x, aux_alpha=1.0, l1=0.0)
    assert float(terms["auxk"].detach()) > 0
    terms["auxk"].backward()
    grad_rows = sae.encoder.weight.grad.abs().sum(1) > 0
    assert grad_rows.any()
    assert not (grad_rows & ~sae.dead_mask()).any()


def test_parallel_gradient_removed_and_decoder_renormalised():
    sae = TopKSAE(SAEShape(d_in=5, n_latents=10, k=3, aux_k=2, dead_tokens=10), torch.Generator().manual_seed(3))
    sae.loss(torch.randn(30, 5), 0.0, 0.0)["loss"].backward()
    sae.remove_parallel_gradient()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(10), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalise_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10), atol=1e-6)


def test_training_learns_a_sparse_dictionary():
    data = _sparse_data()
    shape = SAEShape(d_in=16, n_latents=128, k=4, aux_k=32, dead_tokens=2048)
    untrained = TopKSAE(shape, torch.Generator().manual_seed(0))
    untrained.input_scale.fill_(float((16 / data.pow(2).sum(1).mean()).sqrt()))
    before = untrained.fraction_of_variance_unexplained(data)
    result = train_sae(data, shape, TrainSettings(steps=200, batch_size=256, lr=3e-3, log_every=100))
    assert result.fvu < 0.15 < before
    assert len(result.history) == 2
    assert 0.0 <= result.dead_fraction < 0.5
    assert torch.allclose(result.sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_pooled_codes_ignore_padding_and_are_unit_length():
    sae = TopKSAE(SAEShape(d_in=4, n_latents=16, k=2, aux_k=2, dead_tokens=10), torch.Generator().manual_seed(4))
    acts = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = pooled_codes(sae, acts, mask)
    manual = sae.dense_codes(acts[0, :3]).mean(0)
    assert torch.allclose(pooled[0], manual / manual.norm(), atol=1e-6)
    changed = acts.clone()
    changed[0, 3:] = 100.0  # padding positions: no effect
    assert torch.allclose(pooled_codes(sae, changed, mask), pooled)
    assert torch.allclose(pooled.norm(dim=1), torch.ones(2))
    assert torch.allclose(mean_pool(acts, mask)[0], acts[0, :3].mean(0))


# --- selection --------------------------------------------------------------------------------------------------


def test_selection_modes():
    scores = np.array([0.9, 0.1, 0.8, 0.5, 0.7])
    assert select(scores, "global", 2).tolist() == [0, 2]
    assert select(scores, "global", 10).tolist() == [0, 2, 4, 3, 1]
    assert select(scores, "global", None, threshold=0.6).tolist() == [0, 2, 4]
    assert select(scores, "global", 1, threshold=0.6).tolist() == [0]
    seed_scores = np.array([[0.9, 0.0], [0.0, 0.1], [0.8, 0.0], [0.0, 0.5], [0.1, 0.7]])
    # seed 0's best two: 0, 2; seed 1's best two: 4, 3 -> union ordered by the max score
    assert select(scores, "per_seed", 2, seed_scores=seed_scores).tolist() == [0, 2, 4, 3]
    with pytest.raises(ValueError):
        select(scores, "global", None, None)


def _run_selection(rules, blocks, limit=None):
    """The passes a job runs over its shards, here over in-memory blocks (in the order given)."""
    import shared.curation.selection as selection

    old = selection.GATHER_LIMIT
    selection.GATHER_LIMIT = selection.GATHER_LIMIT if limit is None else limit
    try:
        driver = selection.Selection([cut for rule in rules for cut in rule.cuts])
        while not driver.done:
            requests = driver.requests()
            driver.update(selection.merge_results((selection.scan(b, requests) for b in blocks), requests))
    finally:
        selection.GATHER_LIMIT = old
    return driver.passes


def _scored(n, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    seed_scores = (rng.random((n, 4)) * 2 - 1).astype(np.float32)
    if ties:  # many exact ties at the boundary: the order among them is by id
        seed_scores = np.round(seed_scores, 1)
    status = np.where(rng.random(n) < 0.05, "empty", "ok").astype(object)
    seed_scores[status != "ok"] = np.nan
    return {"id": np.array([f"d{i:05d}" for i in range(n)], dtype=object), "status": status,
            "sae_score": seed_scores.max(1), "sae_seed_scores": list(seed_scores),
            "ngram_key": rng.gumbel(size=n) * 300.0, "truncated": np.zeros(n, bool), "n_tokens": np.full(n, 3),
            "label": np.where(rng.random(n) < 0.3, "target", "other").astype(object)}


def _split(batch, bounds):
    return [{k: (v[a:b] if not isinstance(v, list) else v[a:b]) for k, v in batch.items()}
            for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("mode", ["global", "per_seed"])
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_the_histogram_selection_is_exact_and_does_not_depend_on_the_split(mode, threshold):
    """Any split into shards (uneven ones, in any order) selects exactly what select() picks over the whole corpus;
    unusable rows are never selected; per_seed unites each seed's top M."""
    n = 3000
    batch = _scored(n)
    ok = batch["status"] == "ok"
    seed_scores = np.stack(batch["sae_seed_scores"])
    expected_pos = np.flatnonzero(ok)[select(batch["sae_score"][ok].astype(np.float64), mode, 40, threshold,
                                             seed_scores[ok])]
    expected = {f"d{i:05d}" for i in expected_pos}
    for bounds, limit in (([0, n], None), ([0, 37, 38, 1200, 2311, n], None), ([0, 1000, 2000, n], 5)):
        rules = [rule_for("sae", 40, "sae", mode, threshold, 4), rule_for("ngram", 77, "sae", mode, None, 4)]
        blocks = _split(batch, bounds)[::-1]
        passes = _run_selection(rules, blocks, limit)
        chosen = {i for b in blocks for i in b["id"][rules[0].mask(b)]}
        assert chosen == expected
        ngram = [i for b in blocks for i in b["id"][rules[1].mask(b)]]
        best = np.argsort(-batch["ngram_key"][ok], kind="stable")[:77]
        assert sorted(ngram) == sorted(batch["id"][ok][best])
        assert passes >= (3 if limit == 5 else 2)  # a small gather limit makes it narrow the range again


def test_ties_at_the_boundary_are_broken_by_id_and_m_above_the_usable_count_takes_all():
    batch = _scored(2000, seed=1, ties=True)
    ok = batch["status"] == "ok"
    blocks = _split(batch, [0, 500, 1999, 2000])
    rule = rule_for("sae", 100, "sae", "global", None, 4)
    _run_selection([rule], blocks)
    chosen = sorted(i for b in blocks for i in b["id"][rule.mask(b)])
    order = sorted(np.flatnonzero(ok), key=lambda i: (-float(batch["sae_score"][i]), batch["id"][i]))[:100]
    assert chosen == sorted(batch["id"][order])
    everything = rule_for("sae", 10**6, "sae", "global", None, 4)
    _run_selection([everything], blocks)
    assert sum(int(everything.mask(b).sum()) for b in blocks) == int(ok.sum())
    above = rule_for("sae", None, "sae", "global", 0.5, 4)
    _run_selection([above], blocks)
    assert sum(int(above.mask(b).sum()) for b in blocks) == int((batch["sae_score"][ok] >= 0.5).sum())


def test_counts_and_tallies_add_up_over_shards():
    batch = _scored(600, seed=2)
    ok = batch["status"] == "ok"
    blocks = _split(batch, [0, 100, 350, 600])
    counts = sum((count_block(b, "sae", "target") for b in blocks), start=CorpusCounts())
    assert (counts.ok, counts.empty, counts.rows) == (int(ok.sum()), int((~ok).sum()), 600)
    assert counts.target == int(((batch["label"] == "target") & ok).sum())
    assert counts.hist.sum() == ok.sum()
    assert counts.top == pytest.approx(float(np.nanmax(batch["sae_score"])))
    rule = rule_for("sae", 30, "sae", "global", None, 4)
    _run_selection([rule], blocks)
    total = sum((tally(b, [rule], "sae", "target")[0] for b in blocks), start=Tally())
    assert total.selected["sae"] == 30
    assert 0 <= total.hits["sae"] <= 30
    assert [s for s, _ in total.best] == sorted(np.sort(batch["sae_score"][ok])[-10:].tolist(), reverse=True)
    assert total.lowest["sae"] == pytest.approx(float(np.sort(batch["sae_score"][ok])[-30]))


def test_sortable_keys_order_like_the_floats():
    values = np.array([-np.inf, -3e300, -1.0, -1e-300, -0.0, 0.0, 1e-300, 0.5, 1.0, 2e300, np.inf])
    keys = sortable(values)
    assert (np.diff(keys.astype(object)) >= 0).all()
    assert keys[4] < keys[5]  # -0.0 before 0.0: a total order


def test_purity_and_recall():
    found = purity_and_recall(["a", "a", "b", "c"], all_labels_count=4, target="a")
    assert found == {"purity": 0.5, "recall": 0.5, "selected": 4, "hits": 2}


def test_dsir_importance_prefers_target_like_text_and_keys_are_stable():
    buckets = 4096
    seeds = ["the shuttle launch to orbit", "orbit insertion of the satellite after launch"]
    # DSIR weights are not length-normalised: compare documents of the same length (eight words)
    raw_docs = ["the shuttle crew prepared the launch to orbit", "def f x return x plus one now",
                "the film was dull and the acting poor"]
    target = log_distribution(sum(hashed_ngrams(t, buckets) for t in seeds), 1.0)
    raw = log_distribution(sum(hashed_ngrams(t, buckets) for t in seeds + raw_docs), 1.0)
    weights = log_importance(np.stack([hashed_ngrams(t, buckets) for t in raw_docs]), target, raw)
    assert int(np.argmax(weights)) == 0
    assert np.array_equal(hashed_ngrams(raw_docs[0], buckets), hashed_ngrams(raw_docs[0], buckets))
    u = stable_uniform(["a", "b", "c"], seed=3)
    assert np.array_equal(u, stable_uniform(["a", "b", "c"], seed=3))
    assert ((u > 0) & (u < 1)).all()
    assert not np.array_equal(u, stable_uniform(["a", "b", "c"], seed=4))
    assert np.array_equal(gumbel_keys(weights, ["x", "y", "z"], 0), gumbel_keys(weights, ["x", "y", "z"], 0))


# --- corpus -----------------------------------------------------------------------------------------------------------


def test_newsgroup_headers_are_stripped_for_any_rfc_5322_field_name():
    post = "From: a@b.c\nNewsgroups: sci.space\nSubject: Re: orbit\n\nThe launch slipped a week.\n"
    assert strip_news_headers(post) == "The launch slipped a week."
    dotted = ("Article-I.D.: zoo.1993Apr1.12345\nXref: cantaloupe.srv.cs.cmu.edu sci.space:61234\n"
              "Path: cantaloupe!sci.space\n  folded continuation\nX-Newsreader: TIN [1.1 PL8]\n\nBody text.")
    assert strip_news_headers(dotted) == "Body text."
    assert strip_news_headers("No header here\n\nbody") == "No header here\n\nbody"


def test_quoted_replies_attributions_and_signatures_are_stripped_and_counted():
    body = ("In article <1993Apr5.1234@nasa.gov> jdoe@nasa.gov (John Doe) writes:\n"
            "> The shuttle will fly in May.\n>> Earlier quote.\n"
            "  | indented quote\n"
            "I doubt it: the booster is late.\nSmith wrote:\n"
            "The writes: of a log are not an attribution when text follows\n"
            "--\nJane Roe, JPL\nphone 555-0100\n")
    counts = Counter()
    assert strip_replies(body, counts) == ("I doubt it: the booster is late.\n"
                                           "The writes: of a log are not an attribution when text follows")
    assert counts == {"quoted_lines": 3, "attribution_lines": 2, "signature_lines": 3}
    assert strip_replies("no quotes at all\nsecond line") == "no quotes at all\nsecond line"


def test_a_chunk_sharing_a_ten_word_span_with_an_earlier_one_is_dropped():
    base = "the quick brown fox jumps over the lazy dog near the old river bank today"
    dedup = NearDuplicates(span=10)
    assert dedup.keep(base)
    assert not dedup.keep("Someone said: " + " ".join(base.split()[2:12]).upper() + "!")  # case, punctuation
    assert dedup.keep("a different text that shares only nine words: " + " ".join(base.split()[:9]))
    assert dedup.dropped == 1
    assert len(shingles("too short", 10)) == 1


def test_split_corpus_drops_pool_chunks_that_repeat_a_seed_and_counts_them():
    seed_text = " ".join(f"seedword{i}" for i in range(40))
    docs = {"space": [Document("space/0", "space", seed_text)]
            + [Document(f"space/{i}", "space", " ".join(f"w{i}x{j}" for j in range(40))) for i in range(1, 6)]
            + [Document("space/quote", "space", "quoting: " + seed_text)],
            "other": [Document(f"other/{i}", "other", " ".join(f"o{i}y{j}" for j in range(40))) for i in range(6)]}
    for span, dropped in ((10, 1), (None, 0)):
        found = []
        for seed in range(60):  # the seed document is drawn at random: take the draws where space/0 is the seed
            split = split_corpus(docs, "space", chunk_words=60, min_words=10, caps={}, per_doc={}, n_seeds=1,
                                 heldout_target_docs=1, heldout_general_share=0.0, rng=random.Random(seed),
                                 dedup_span=span)
            if split.seeds[0].doc_id == "space/0" and all(c.doc_id != "space/quote" for c in split.heldout):
                found.append(split)
        assert found
        for split in found:
            in_pool = any(c.doc_id == "space/quote" for c in split.pool)
            assert in_pool is (dropped == 0)
            assert sum(split.near_duplicates.values()) == dropped


def test_the_study_reserve_keeps_whole_documents_of_each_study_target_out_of_the_pool():
    text = lambda label, i: "\n".join(" ".join(f"{label}{i}w{j}x{k}" for k in range(30)) for j in range(4))  # noqa: E731
    docs = {label: [Document(f"{label}/{i}", label, text(label, i)) for i in range(12)] for label in ("a", "b", "c")}
    split = split_corpus(docs, "a", chunk_words=30, min_words=10, caps={}, per_doc={}, n_seeds=3,
                         heldout_target_docs=2, heldout_general_share=0.0, rng=random.Random(0),
                         reserve={"a": 5, "b": 4})
    reserve_docs = {c.doc_id for c in split.reserve}
    assert sorted(collections.Counter(c.label for c in split.reserve).items()) == [("a", 5), ("b", 4)]
    assert len(reserve_docs) == 9  # the first chunk of each whole document
    assert not reserve_docs & {c.doc_id for c in split.pool}
    assert {c.doc_id for c in split.seeds} <= reserve_docs  # the target's reserve starts with its seeds
    assert not reserve_docs & {c.doc_id for c in split.heldout}
    assert {c.label for c in split.pool} == {"a", "b", "c"}
    with pytest.raises(DataError, match="study target 'b' has 12 usable documents; need more than 12"):
        split_corpus(docs, "a", chunk_words=30, min_words=10, caps={}, per_doc={}, n_seeds=3,
                     heldout_target_docs=2, heldout_general_share=0.0, rng=random.Random(0), reserve={"b": 12})
    with pytest.raises(DataError, match="study target 'z' has no documents"):
        split_corpus(docs, "a", chunk_words=30, min_words=10, caps={}, per_doc={}, n_seeds=3,
                     heldout_target_docs=2, heldout_general_share=0.0, rng=random.Random(0), reserve={"z": 1})


def test_chunking_follows_lines_and_drops_short_tails():
    text = "\n".join(f"line {i} " + "w " * 8 for i in range(10))  # 10 words per line
    chunks = chunk_text(text, chunk_words=30, min_words=15)
    assert [len(c.split()) for c in chunks] == [30, 30, 30]  # the 10-word tail is dropped
    assert chunk_text("one " * 100, chunk_words=40, min_words=10)[0].count("one") == 40


def test_split_keeps_seed_and_heldout_documents_out_of_the_pool():
    long = lambda i: "\n".join(f"sentence {i}.{j} " + " ".join(f"w{i}x{j}x{k}" for k in range(20))  # noqa: E731
                                for j in range(6))
    docs = {"target": [Document(f"t/{i}", "target", long(i)) for i in range(12)],
            "other": [Document(f"o/{i}", "other", long(i)) for i in range(10)]}
    split = split_corpus(docs, "target", chunk_words=40, min_words=10, caps={}, per_doc={}, n_seeds=3,
                         heldout_target_docs=2, heldout_general_share=0.2, rng=random.Random(0))
    seed_docs = {c.doc_id for c in split.seeds}
    held_docs = {c.doc_id for c in split.heldout} | {c.doc_id for c in split.heldout_general}
    pool_docs = {c.doc_id for c in split.pool}
    assert len(split.seeds) == 3
    assert not seed_docs & pool_docs
    assert not held_docs & pool_docs
    assert {c.label for c in split.heldout} == {"target"}
    assert {c.label for c in split.heldout_general} == {"other"}
    with pytest.raises(DataError, match="target label 'missing' has no documents"):
        split_corpus(docs, "missing", chunk_words=40, min_words=10, caps={}, per_doc={}, n_seeds=1,
                     heldout_target_docs=0, heldout_general_share=0.0, rng=random.Random(0))


def test_length_batches_group_similar_lengths():
    batches = length_batches([3, 10, 1, 9, 2], size=2)
    assert batches == [[1, 3], [0, 4], [2]]


def test_idf_weights_discount_latents_that_fire_everywhere():
    pooled = torch.tensor([[0.5, 0.2, 0.0], [0.4, 0.0, 0.0], [0.6, 0.0, 0.3], [0.5, 0.0, 0.0]])
    idf = idf_weights(pooled)
    assert float(idf[0]) == 0.0
    assert float(idf[1]) > float(idf[0])
    assert torch.isclose(idf[1], torch.log(torch.tensor(4 / 2)))
    weighted = idf_codes(pooled, idf)
    assert torch.allclose(weighted[0], torch.tensor([0.0, 1.0, 0.0]))  # only the rare latent remains
    assert torch.allclose(weighted.norm(dim=1)[[0, 2]], torch.ones(2))
