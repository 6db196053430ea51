"""Self-data distillation without a model: continuation tasks, the teacher request and the rewrite filter."""

from __future__ import annotations

import pytest

from shared.distill.examples import Example, build_examples, split_document
from shared.distill.teacher import final_number, judge, tally, teacher_request
from shared.errors import DataError


def test_documents_become_continuation_tasks_cut_at_a_line():
    text = "\n".join(f"line {i} has five words" for i in range(10))  # 50 words
    prompt, answer = split_document(text, prompt_fraction=0.4, min_answer_words=10)
    assert prompt.endswith("\n")
    assert prompt.count("\n") == 4
    assert answer.startswith("line 4")
    assert (prompt + answer).split() == text.split()
    one_line = " ".join(f"w{i}" for i in range(100))
    prompt, answer = split_document(one_line, 0.3, 10)
    assert prompt.split() == [f"w{i}" for i in range(30)]
    assert answer.split()[0] == "w30"
    assert split_document("too short", 0.5, 10) is None


def test_build_examples_keeps_instruction_pairs_and_counts_unusable_rows():
    rows = [{"id": "a", "prompt": "What is 2+2?", "answer": "It is 4."},
            {"id": "b", "text": " ".join(["word"] * 80)}, {"id": "c", "text": "short"}, {"id": "d", "text": None}]
    examples, too_short = build_examples(rows, prompt_fraction=0.4, min_answer_words=10)
    assert [(e.id, e.kind) for e in examples] == [("a", "instruction"), ("b", "continuation")]
    assert too_short == 2
    with pytest.raises(DataError, match="no usable examples: 2 rows, 2 too short"):
        build_examples(rows[2:], 0.4, 10)


def test_teacher_request_carries_the_original_answer():
    ex = Example("a", "Explain orbits.", "Objects fall around a body.", "instruction")
    request = teacher_request(ex)
    assert "Explain orbits." in request
    assert "Objects fall around a body." in request


@pytest.mark.parametrize(
    ("original", "output", "finished", "reason"),
    [
        ("The answer is 42.", "So the result is 42.", True, "kept"),
        ("The answer is 42.", "", True, "empty"),
        ("The answer is 42.", "It keeps going and going", False, "truncated"),
        ("The answer is 42.", "Here is the rewritten answer: 42", True, "leak"),
        ("The answer is 42.", "The reference answer says 42", True, "leak"),
        ("Total: 1,250 apples.", "In all there are 1250 apples.", True, "kept"),
        ("The answer is 42.", "The result is 41 in the end.", True, "answer_mismatch"),
        ("Orbits are falling around a planet forever.", "the the orbit the the orbit the the orbit the the orbit "
         "the the orbit the the orbit the the orbit", True, "degenerate"),
        ("Orbits are falling around a planet forever.", "Bananas grow in warm climates near rivers.", True,
         "unfaithful"),
        ("Orbits are falling around a planet forever.", "An orbit is falling around a planet, forever.", True, "kept"),
    ],
)
def test_filter_decisions(original, output, finished, reason):
    ex = Example("x", "Q?", original, "instruction")
    decision = judge(ex, output, finished)
    assert decision.reason == reason
    if reason == "kept":
        assert decision.source == "teacher"
        assert decision.answer == output.strip()
    else:  # a failed rewrite is never kept: the original answer is used instead
        assert decision.source == "original"
        assert decision.answer == original


def test_continuations_have_no_number_check_and_tally_counts_everything():
    ex = Example("x", "The launch", "slipped 3 days.", "continuation")
    assert judge(ex, "was delayed by 5 days after all.", True).reason == "kept"
    decisions = [judge(ex, "", True), judge(ex, "fine words here now", True), judge(ex, "a b c d", False)]
    assert tally(decisions) == {"kept": 1, "kept_trimmed": 0, "empty": 1, "truncated": 1, "leak": 0,
                                "degenerate": 0, "unfaithful": 0, "answer_mismatch": 0}


def test_a_continuation_cut_at_max_new_tokens_keeps_its_complete_sentences():
    ex = Example("x", "The launch", "slipped 3 days. Crews waited.", "continuation")
    trimmed = judge(ex, "was delayed by five days. The crew (all four) said \"fine.\" Then the next wee", False)
    assert (trimmed.reason, trimmed.source) == ("kept_trimmed", "teacher")
    assert trimmed.answer == 'was delayed by five days. The crew (all four) said "fine."'
    assert judge(ex, "was delayed by five days and then", False).reason == "truncated"  # no sentence end
    assert judge(ex, "Yes. and then it went on and on", False).reason == "truncated"  # too little before the cut
    instruction = Example("y", "Q?", "The answer is 42.", "instruction")
    assert judge(instruction, "First, 40. Then add 2 so", False).reason == "truncated"  # never trimmed
    assert final_number("#### 1,024") == 1024.0
    assert final_number("no digits") is None


def test_degeneracy_measures():
    from shared.distill.teacher import compression_ratio, content_overlap, repeated_share

    assert repeated_share("one two three four five six") == 0.0
    assert repeated_share("a b c d a b c d a b c d") > 0.5
    assert compression_ratio("ab" * 200) > 10
    assert compression_ratio("The launch slipped three days after a valve failed a test.") < 2
    original = "rockets need liquid fuel and oxygen"
    assert content_overlap(original, "liquid fuel and oxygen feed rockets") == pytest.approx(0.8)  # all but "need"
    assert content_overlap(original, "apples") == 0.0
    assert content_overlap("rockets need fuel", "apples") == 1.0  # too short to judge


def test_plain_continuations_are_continued_by_the_teacher_and_stop_on_any_stop_token(tiny_llama_dir):
    import numpy as np

    from shared.configs.distill import GenerationConfig
    from shared.distill.rewriter import TeacherRewriter
    from shared.generation import stop_token_ids
    from shared.models import load_tokenizer

    batch = {"id": np.array(["c", "q"], dtype=object), "prompt": np.array(["The rocket rose", "Name a planet."],
                                                                          dtype=object),
             "answer": np.array(["into the clouds.", "Mars"], dtype=object),
             "kind": np.array(["continuation", "instruction"], dtype=object)}
    outputs = {}
    for style in ("plain", "paraphrase"):
        step = TeacherRewriter("tiny-llama", GenerationConfig(max_new_tokens=6, continuation_style=style), seed=3)
        step.setup()
        out, _ = step.rewrite(batch)
        outputs[style] = list(out["teacher_output"])
        assert list(step.rewrite(batch)[0]["teacher_output"]) == outputs[style]  # seeded: reproducible
    assert outputs["plain"][1] == outputs["paraphrase"][1]  # instructions are rewritten the same way
    assert outputs["plain"][0] != outputs["paraphrase"][0]
    tokenizer = load_tokenizer("tiny-llama")
    assert tokenizer.eos_token_id in stop_token_ids(tokenizer)


def test_the_teacher_step_rewrites_a_batch_reproducibly(tiny_llama_dir):
    """The step the teacher actors map (no Ray): one rewrite per row, the same for the same batch, sampled or not."""
    import numpy as np

    from shared.configs.distill import GenerationConfig
    from shared.distill.rewriter import TeacherRewriter

    batch = {"id": np.array(["a", "b"], dtype=object), "prompt": np.array(["What is 2+2?", "Name a planet."],
                                                                          dtype=object),
             "answer": np.array(["4", "Mars"], dtype=object), "kind": np.array(["instruction"] * 2, dtype=object)}
    for sampled in (False, True):
        step = TeacherRewriter("tiny-llama", GenerationConfig(max_new_tokens=6, do_sample=sampled), seed=3)
        step.setup()
        out, tokens = step.rewrite(batch)
        assert list(out["id"]) == ["a", "b"]
        assert out["teacher_output"].shape == (2,)
        assert all(isinstance(t, str) for t in out["teacher_output"])
        assert out["finished"].dtype == bool
        assert 0 < tokens <= 12
        assert list(step(batch)["teacher_output"]) == list(out["teacher_output"])


def test_replay_examples_fill_their_share_from_rows_outside_the_curated_set_reproducibly():
    from shared.distill.examples import replay_examples

    text = "\n".join(f"line {i} " + " ".join(f"w{i}x{j}" for j in range(10)) for i in range(6))
    rows = [{"id": f"d{i}", "text": text} for i in range(30)] + [{"id": "short", "text": "too short"}]
    found = replay_examples(rows, {"d0", "d1"}, share=0.2, curated=40, prompt_fraction=0.4, min_answer_words=8,
                            seed=0)
    assert len(found) == 10  # 10 of 50 training examples
    assert all(e.kind == "continuation" for e in found)
    assert not {e.id for e in found} & {"replay:d0", "replay:d1"}
    assert found == replay_examples(rows, {"d0", "d1"}, 0.2, 40, 0.4, 8, 0)
    assert found != replay_examples(rows, {"d0", "d1"}, 0.2, 40, 0.4, 8, 1)
    assert replay_examples(rows, set(), 0.0, 40, 0.4, 8, 0) == []
    assert len(replay_examples(rows, set(), 0.5, 100, 0.4, 8, 0)) == 30  # fewer when there is not enough text
