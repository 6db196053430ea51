"""Language-modelling examples (shared.lm_data) and token-weighted perplexity (shared.perplexity) on tiny-llama."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from real_text import chunks

from shared.errors import DataError
from shared.lm_data import IGNORE, LMExample, batches, collate, encode_pairs, encode_table, encode_texts, load_examples
from shared.perplexity import LossSum, evaluate_loss, perplexity, token_nll


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from shared.models import load_causal_lm

    return load_causal_lm(tiny_llama_dir)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return chunks(("json", "csv", "textwrap"), words=40, limit=12)


def test_texts_are_labelled_whole_and_long_ones_cut(tiny, texts):
    _, tokenizer = tiny
    examples, stats = encode_texts(tokenizer, [*texts, "", None, "   "], max_length=32)
    assert stats.examples == len(texts)
    assert stats.rows == len(texts) + 3
    assert stats.skipped == {"empty text": 3}
    full = [tokenizer(t)["input_ids"] for t in texts]
    assert stats.truncated == sum(len(ids) > 32 for ids in full) > 0
    for example, ids in zip(examples, full):
        assert example.input_ids == tuple(ids[:32])
        assert example.labels == example.input_ids
    assert stats.target_tokens == sum(len(e.input_ids) - 1 for e in examples)


def test_pairs_carry_loss_on_answer_tokens_only(tiny):
    _, tokenizer = tiny
    prompts = ["What does json.dumps return?", "Name a sorting function.", "x" * 4000, "Empty answer?"]
    answers = ["A string holding the JSON text of the object.", "sorted " * 200, "anything", ""]
    examples, stats = encode_pairs(tokenizer, prompts, answers, max_length=64)
    assert stats.examples == 2
    assert stats.skipped == {"empty answer": 1, "prompt fills max_length": 1}
    assert stats.truncated == 1
    assert len(examples[1].input_ids) == 64
    first = examples[0]
    from shared.generation import chat_prompt

    prompt_len = len(tokenizer(chat_prompt(tokenizer, prompts[0]), add_special_tokens=False)["input_ids"])
    assert set(first.labels[:prompt_len]) == {IGNORE}
    answer = tokenizer(answers[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert list(first.labels[prompt_len:]) == answer == list(first.input_ids[prompt_len:])
    assert first.target_tokens == len(answer)


def test_table_with_prompt_and_answer_uses_pairs_and_text_otherwise(tiny, texts):
    _, tokenizer = tiny
    pairs = pa.table({"id": [1], "text": ["ignored"], "prompt": ["Q?"], "answer": ["A."]})
    _, stats = encode_table(pairs, tokenizer, 32)
    assert stats.kind == "prompt_answer"
    _, stats = encode_table(pa.table({"body": texts[:2]}), tokenizer, 32, text_column="body")
    assert stats.kind == "text"
    assert stats.examples == 2


def test_load_examples_samples_with_a_seed_and_names_bad_input(tiny, texts, tmp_path):
    _, tokenizer = tiny
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
    a, stats = load_examples(str(tmp_path / "d.parquet"), tokenizer, max_length=16, max_examples=5, seed=1)
    assert (stats.source_rows, stats.rows) == (len(texts), 5)
    b, _ = load_examples(str(tmp_path / "d.parquet"), tokenizer, max_length=16, max_examples=5, seed=1)
    c, _ = load_examples(str(tmp_path / "d.parquet"), tokenizer, max_length=16, max_examples=5, seed=2)
    assert a == b
    assert a != c
    assert len(a) == 5
    pq.write_table(pa.table({"body": texts}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match=r"calibration .*other.parquet: no 'text' column .*columns: body"):
        load_examples(str(tmp_path / "other.parquet"), tokenizer, max_length=16, max_examples=5, what="calibration")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty"):
        load_examples(str(tmp_path / "empty.parquet"), tokenizer, max_length=16, max_examples=5)


def test_collate_pads_right_and_ignores_padding():
    examples = [LMExample((5, 6, 7), (IGNORE, 6, 7)), LMExample((8,) * 5, (8,) * 5)]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8] * 5]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [8] * 5]
    assert [b["input_ids"].shape[0] for b in batches(examples * 3, 4, 0)] == [4, 2]


def test_loss_is_token_weighted_and_independent_of_batching(tiny, texts):
    model, tokenizer = tiny
    examples, _ = encode_texts(tokenizer, texts, max_length=48)
    one = evaluate_loss(model, examples, batch_size=1, pad_id=tokenizer.pad_token_id)
    five = evaluate_loss(model, examples, batch_size=5, pad_id=tokenizer.pad_token_id)
    assert one.tokens == five.tokens == sum(e.target_tokens for e in examples)
    assert five.nll == pytest.approx(one.nll, rel=1e-5)
    # the same figure from transformers' own mean loss, weighted by each example's token count
    reference = 0.0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            reference += float(model(input_ids=ids, labels=ids).loss) * e.target_tokens
    assert one.nll == pytest.approx(reference, rel=1e-5)
    assert one.perplexity == pytest.approx(math.exp(reference / one.tokens), rel=1e-5)
    assert perplexity(model, tokenizer, texts, max_length=48, batch_size=3) == pytest.approx(one.perplexity, rel=1e-5)


def test_loss_sums_combine_and_token_nll_skips_ignored():
    total = LossSum(3.0, 2) + LossSum(1.0, 2)
    assert total.mean == 1.0
    assert LossSum().tokens == 0
    assert math.isnan(LossSum().mean)
    logits = torch.zeros(1, 3, 4)
    nll, tokens = token_nll(logits, torch.tensor([[IGNORE, 1, IGNORE]]))
    assert tokens == 1
    assert float(nll) == pytest.approx(math.log(4))
