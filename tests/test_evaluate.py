"""Evaluation: per-example NLL against the perplexity helper, multiple choice, exact match, and the job end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs.runtime import run_job
from shared.config import validate_config
from shared.configs.evaluate import EvaluateConfig
from shared.data import write_parquet
from shared.errors import UserError
from shared.evaluation import choice_examples, exact_match, example_nll, pick_choice
from shared.lm_data import encode_texts
from shared.models import load_causal_lm
from shared.perplexity import evaluate_loss
from shared.storage import Storage
from tests.conftest import committed_path
from tests.real_text import HELD_OUT_MODULES, chunks


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_causal_lm("tiny-llama")


def test_example_nll_sums_to_the_token_weighted_loss(tiny):
    model, tok = tiny
    examples, _ = encode_texts(tok, chunks(HELD_OUT_MODULES, words=30, limit=5), max_length=48)
    per_example = example_nll(model, examples, tok.pad_token_id)
    total = evaluate_loss(model, examples, batch_size=2, pad_id=tok.pad_token_id)
    assert sum(t for _, t in per_example) == total.tokens
    assert math.isclose(sum(n for n, _ in per_example), total.nll, rel_tol=1e-4)


def test_pick_choice_follows_the_models_likelihood(tiny):
    model, tok = tiny
    context = "orbit orbit orbit orbit orbit orbit orbit orbit"
    choices = ["orbit orbit orbit", "zebra quantum lattice"]
    nll = [n for n, _ in example_nll(model, choice_examples(tok, context, choices, 64), tok.pad_token_id)]
    assert pick_choice(model, tok, context, choices, 64) == int(nll[1] < nll[0])


def test_exact_match():
    assert exact_match("The total is 1,200 apples.", "#### 1200")
    assert not exact_match("It is 12.", "#### 13")
    assert exact_match("Paris\nmore text", "paris")
    assert not exact_match("", "paris")


@pytest.mark.ray
def test_evaluate_job_table(ray_session, tmp_path, tiny_llama_dir):
    store = Storage(str(tmp_path))
    write_parquet(pa.table({"text": chunks(HELD_OUT_MODULES, words=30, limit=6) + [""]}), store, "text",
                  "part-0.parquet")
    write_parquet(pa.table({"question": ["Which is a planet?", "Which is a colour?"],
                            "choices": [["Mars", "Tuesday"], ["green", "seven"]], "answer_index": [0, 0]}),
                  store, "mc", "part-0.parquet")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "What is 2+2?", "answer": "4"}) + "\n")
    cfg = validate_config(EvaluateConfig, {
        "models": {"tiny": "tiny-llama", "tiny-again": "tiny-llama"},
        "datasets": {"text": str(tmp_path / "text"), "mc": str(tmp_path / "mc"), "qa": str(tmp_path / "qa.jsonl")},
        "max_length": 48, "max_new_tokens": 4, "output_root": str(tmp_path / "run")}, "test")
    metrics = run_job(cfg)
    # where the work ran: CPU actors with the default 0.5 reserved CPUs run one torch thread each
    actors = metrics["placement"]["evaluation actor"]
    assert set(actors["devices"]) == {"cpu"}
    assert actors["threads"] == [1]
    assert actors["assigned_cpus"] == 0.5
    rows = metrics["models"]
    assert rows["tiny"]["text"]["perplexity"] == pytest.approx(rows["tiny-again"]["text"]["perplexity"])
    assert rows["tiny"]["text"]["skipped"] == 1
    assert rows["tiny"]["text"]["tokens"] > 0
    assert rows["tiny"]["mc"]["accuracy"] in (0.0, 0.5, 1.0)
    assert rows["tiny"]["qa"]["exact_match"] in (0.0, 1.0)
    assert 100 < rows["tiny"]["text"]["perplexity"] < 2000  # a random 512-token model: near-uniform
    table = (committed_path(tmp_path / "run" / "evaluate") / "results.md").read_text()
    assert table.splitlines()[0] == "| model | parameters | text ppl | mc ppl | mc acc | qa ppl | qa EM |"
    assert len(table.splitlines()) == 4
    documents = pq.read_table(committed_path(tmp_path / "run" / "evaluate") / "documents.parquet").to_pylist()
    text_rows = [d for d in documents if d["model"] == "tiny" and d["dataset"] == "text"]
    assert len(text_rows) == 6  # the empty text is skipped, not kept as a document
    assert sum(d["tokens"] for d in text_rows) == rows["tiny"]["text"]["tokens"]
    assert math.exp(sum(d["nll"] for d in text_rows) / rows["tiny"]["text"]["tokens"]) == pytest.approx(
        rows["tiny"]["text"]["perplexity"])

    bad = cfg.model_copy(update={"datasets": {"x": str(tmp_path / "qa.jsonl"), "y": str(tmp_path / "nothing")}})
    with pytest.raises(UserError, match="nothing: not found"):
        run_job(bad)


def test_recovery_is_measured_in_mean_token_loss_with_paired_document_intervals():
    from shared.recovery import recovery

    rng = np.random.default_rng(0)
    documents = []
    for row in range(60):
        tokens = int(rng.integers(20, 80))
        hard = rng.normal(0, 0.2)
        for model, loss in (("base", 3.0), ("pruned", 5.0), ("sft", 4.0), ("kd", 3.5)):
            documents.append({"model": model, "dataset": "domain", "row": row, "nll": (loss + hard) * tokens,
                              "tokens": tokens})
    documents.append({"model": "base", "dataset": "domain", "row": 99, "nll": 1.0, "tokens": 1})  # not scored by all
    result = recovery(documents, "domain", "base", "pruned", ["sft", "kd"], compare=[("kd", "sft")], rounds=300)
    assert result["documents"] == 60
    sft, kd = result["recovered_share_log"]["sft"], result["recovered_share_log"]["kd"]
    assert sft["mean"] == pytest.approx(0.5, abs=0.02)
    assert kd["mean"] == pytest.approx(0.75, abs=0.02)
    assert sft["ci"][0] <= sft["mean"] <= sft["ci"][1]
    assert sft["ci"][1] - sft["ci"][0] < 0.05  # paired: the per-document difficulty cancels
    diff = result["loss_differences"]["kd - sft"]
    assert diff["mean"] == pytest.approx(-0.5, abs=0.02)
    assert diff["excludes_zero"]
    assert result["models"]["pruned"]["perplexity"] > result["models"]["base"]["perplexity"]


def test_the_demo_summary_reports_each_severity_with_its_recoveries_and_paired_comparisons():
    from shared.finescope_results import log_recoveries, pruning_lines

    rng = np.random.default_rng(1)
    losses = {"base": 3.0, "pruned": 5.0, "pruned+sft": 4.0, "pruned+kd": 3.6, "pruned+distilled": 4.2,
              "pruned-35": 6.0, "pruned-35+sft": 5.0, "base+curated": 2.9}
    documents = [{"model": m, "dataset": d, "row": r, "nll": (loss + 0.1 * rng.normal()) * 50, "tokens": 50}
                 for d in ("domain", "general") for r in range(30) for m, loss in losses.items()]
    found = log_recoveries(documents, dict.fromkeys(losses), ["domain", "general"])
    assert set(found) == {"domain/pruned", "domain/pruned-35", "general/pruned", "general/pruned-35"}
    mild, harsh = found["domain/pruned"], found["domain/pruned-35"]
    assert set(mild["recovered_share_log"]) == {"pruned+distilled", "pruned+kd", "pruned+sft"}
    assert mild["recovered_share_log"]["pruned+kd"]["mean"] == pytest.approx(0.7, abs=0.03)
    assert harsh["recovered_share_log"]["pruned-35+sft"]["mean"] == pytest.approx(1 / 3, abs=0.03)
    assert set(mild["loss_differences"]) == {"pruned+distilled - pruned+sft", "pruned+kd - pruned+sft",
                                             "pruned+kd - pruned+distilled", "base+curated - base"}
    assert harsh["loss_differences"] == {}
    lines = pruning_lines([("prune", {"target_fraction": 0.2, "fraction_of": "non_embedding",
                                      "parameters_before": 100, "parameters_after": 82,
                                      "removed_share": {"all": 0.18, "non_embedding": 0.2, "prunable": 0.4},
                                      "domain_perplexity_before": 40.0, "domain_perplexity_after": 90.0})])
    assert "| prune | 0.2 of non_embedding | 100 -> 82 | 0.180 / 0.200 / 0.400 | 40.00 -> 90.00 |" in lines
