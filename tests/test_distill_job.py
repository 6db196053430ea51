"""The distill job on tiny-llama: teacher rewrites + filter + fine-tuning on the S3 endpoint, checkpoint resume after
a kill, and its bad-input errors."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_jobs.runtime import run_job
from shared.config import validate_config
from shared.configs.distill import DistillConfig
from shared.data import write_parquet
from shared.distill.finetune import Schedule, step_examples
from shared.errors import ConfigError, UserError
from shared.lm_data import IGNORE, LMExample, encode_pairs
from shared.models import load_causal_lm, load_tokenizer
from shared.storage import Storage
from tests.conftest import committed, committed_path, marker
from tests.real_text import CALIBRATION_MODULES, HELD_OUT_MODULES, chunks

pytestmark = [pytest.mark.ray]

TINY = {"teacher": "tiny-llama", "student": "tiny-llama",
        "generation": {"max_new_tokens": 12, "batch_size": 4, "min_answer_words": 8},
        "training": {"batch_size": 4, "micro_batch": 2, "max_length": 96, "checkpoint_every": 2, "lr": 1e-3}}


def _curated_rows(n_docs: int = 10) -> list[dict]:
    """Real text (Python docstrings) as plain documents, plus instruction pairs with numeric final answers."""
    docs = chunks(CALIBRATION_MODULES, words=40, limit=n_docs)
    rows = [{"id": f"doc-{i}", "text": d, "prompt": None, "answer": None} for i, d in enumerate(docs)]
    rows += [{"id": f"qa-{i}", "prompt": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.",
              "text": ""} for i in range(4)]
    return rows


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in ("id", "text", "prompt", "answer")]))


def test_answer_only_labels_for_plain_continuations(tiny_llama_dir):
    tok = load_tokenizer("tiny-llama")
    (example,), _ = encode_pairs(tok, ["The shuttle"], [" reached orbit."], max_length=64, chat=False)
    prompt_len = len(tok("The shuttle")["input_ids"])
    assert list(example.labels[:prompt_len]) == [IGNORE] * prompt_len
    assert all(label != IGNORE for label in example.labels[prompt_len:])
    assert example.labels[-1] == tok.eos_token_id
    assert not tok.decode(example.input_ids[:prompt_len]).startswith("<|im_start|>")  # no chat template


def test_schedule_and_step_sharding_are_deterministic():
    examples = [LMExample((i, i), (i, i)) for i in range(10)]
    schedule = Schedule(examples=10, batch_size=4, epochs=2)
    assert (schedule.steps_per_epoch, schedule.total_steps) == (3, 6)
    both = [step_examples(examples, 1, schedule, r, 2, seed=0) for r in (0, 1)]
    assert not set(both[0]) & set(both[1])
    assert len(both[0]) + len(both[1]) == 4
    assert step_examples(examples, 4, schedule, 0, 1, 0) == step_examples(examples, 4, schedule, 0, 1, 0)
    assert 0 < schedule.lr_factor(0) <= 1
    assert schedule.lr_factor(schedule.total_steps) == 0
    long = Schedule(examples=100, batch_size=1, epochs=1)
    cosine = [long.lr_factor(s) for s in range(100)]
    linear = [Schedule(100, 1, 1, "linear").lr_factor(s) for s in range(100)]
    assert cosine[10] == pytest.approx(1.0)  # the peak right after the warm-up
    assert cosine[55] == pytest.approx(0.5, abs=0.02)  # half way through the decay
    assert cosine[30] > linear[30]  # cosine stays high longer ...
    assert cosine[90] < linear[90]  # ... and ends lower
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))


@pytest.mark.s3
def test_distill_end_to_end_on_s3(ray_session, s3_root, tiny_llama_dir):
    store = Storage(s3_root)
    write_parquet(_table(_curated_rows()), store, "curated", "part-0.parquet")
    cfg = validate_config(DistillConfig, {**TINY, "data": f"{s3_root}/curated", "output_root": f"{s3_root}/run"},
                          "test")
    metrics = run_job(cfg)

    assert metrics["examples"] == 14
    assert sum(metrics["filter"].values()) == 14
    stage = committed(f"{s3_root}/run/distill")
    table = pq.read_table(io.BytesIO(stage.read_bytes("distilled", "part-000.parquet")))
    rows = table.to_pylist()
    assert {r["kind"] for r in rows} == {"instruction", "continuation"}
    for row in rows:  # a rejected rewrite is never kept: it falls back to the original answer
        if row["reason"] == "kept":
            assert row["source"] == "teacher"
            assert row["answer"] == row["teacher_output"].strip()
        elif row["reason"] == "kept_trimmed":  # a continuation cut at max_new_tokens, up to its last sentence
            assert row["source"] == "teacher"
            assert row["teacher_output"].strip().startswith(row["answer"])
        else:
            assert row["source"] == "original"
            assert row["answer"] == row["original_answer"]
    history = metrics["training"]["history"]
    assert [h["step"] for h in history] == list(range(1, len(history) + 1))
    assert len(history) == 4
    assert Storage(f"{s3_root}/run/distill").find("checkpoints", suffix="state.pt")
    assert marker(f"{s3_root}/run/distill")["outputs"] == {"model": "model", "dataset": "distilled"}

    trained, _ = load_causal_lm(f"{s3_root}/run/distill")  # the stage hands over its model
    base, _ = load_causal_lm("tiny-llama")
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values())]
    assert any(changed)


def test_bad_inputs(ray_session, tmp_path, tiny_llama_dir):
    store = Storage(str(tmp_path))
    write_parquet(pa.table({"text": pa.array([], pa.string())}), store, "empty", "part-0.parquet")
    write_parquet(pa.table({"text": ["too short"]}), store, "short", "part-0.parquet")
    other = tmp_path / "other-tokenizer"
    model, tok = load_causal_lm("tiny-llama")
    tok.add_tokens(["<extra-token>"])
    model.save_pretrained(other)
    tok.save_pretrained(other)

    def fails(message, **changes):
        cfg = validate_config(DistillConfig, {**TINY, "output_root": str(tmp_path / "run"), **changes}, "test")
        with pytest.raises(UserError, match=message):
            run_job(cfg)

    fails("the curated set is empty", data=str(tmp_path / "empty"))
    fails(r"no usable examples: 1 rows, 1 too short", data=str(tmp_path / "short"))
    fails("have different tokenizers", data=str(tmp_path / "short"), teacher=str(other))
    with pytest.raises(ConfigError, match="needs a teacher"):
        validate_config(DistillConfig, {**TINY, "data": "x", "teacher": None}, "test")


def _run_cli_background(config: Path, log: Path, ray_address: str) -> subprocess.Popen:
    """The CLI as a user runs it, on the session's Ray (its Train workers are owned by the CLI's job: they die with
    it)."""
    exe = Path(sys.executable).with_name("scopeforge")
    return subprocess.Popen([str(exe), "run", "distill", "--config", str(config)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ray_address})


def _registered_checkpoint(run_folder: Path) -> bool:
    """A checkpoint counts once Ray Train has recorded it in its checkpoint-manager snapshot (files alone can be a
    checkpoint still being committed when the process dies)."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snapshot.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(state.get("latest_checkpoint_result"))


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(ray_session, tmp_path, tiny_llama_dir):
    store = Storage(str(tmp_path))
    write_parquet(_table(_curated_rows(24)), store, "curated", "part-0.parquet")
    config = tmp_path / "distill.yaml"
    settings = {**TINY, "mode": "sft", "data": str(tmp_path / "curated"), "output_root": str(tmp_path / "run"),
                "training": {**TINY["training"], "epochs": 2, "checkpoint_every": 3}}
    config.write_text(json.dumps(settings))
    checkpoints = tmp_path / "run" / "distill" / "checkpoints"  # <config hash>/train below it

    address = ray_session.get_runtime_context().gcs_address
    first = _run_cli_background(config, tmp_path / "first.log", address)
    deadline = time.time() + 600
    while time.time() < deadline and not any(_registered_checkpoint(run) for run in checkpoints.glob("*/train")):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # a crash: no cleanup, no marker
    first.wait(timeout=60)
    assert not (tmp_path / "run" / "distill" / "_SUCCESS").exists()

    second = _run_cli_background(config, tmp_path / "second.log", address)
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert "resuming from the checkpoint at step" in log
    resumed_at = int(log.split("resuming from the checkpoint at step ")[1].split()[0])
    assert resumed_at >= 3
    assert "step 1/" not in log
    history = json.loads((committed_path(tmp_path / "run" / "distill") / "training_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, len(history) + 1))
    assert (tmp_path / "run" / "distill" / "_SUCCESS").exists()


def test_token_kl_is_zero_for_the_teacher_itself_and_counts_only_answer_tokens():
    from shared.perplexity import token_kl

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    kl, tokens = token_kl(logits, logits, labels)
    assert tokens == 5  # the positions whose next token is labelled
    assert float(kl) == pytest.approx(0.0, abs=1e-5)
    other = logits + torch.randn(2, 5, 11)
    kl, _ = token_kl(other, logits, labels)
    assert float(kl) > 0.1
    changed = logits.clone()
    changed[1, 3:] += 5.0  # positions whose next token is not an answer token do not count
    changed[0, 0] += 5.0
    assert float(token_kl(changed, logits, labels)[0]) == pytest.approx(0.0, abs=1e-5)


def test_logit_distillation_moves_the_student_towards_its_teacher(ray_session, tmp_path, tiny_llama_dir):
    from shared.distill.finetune import Distiller
    from shared.lm_data import collate

    teacher, tokenizer = load_causal_lm("tiny-llama")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    write_parquet(_table(_curated_rows()), Storage(str(tmp_path)), "curated", "part-0.parquet")
    general = [{"id": f"g-{i}", "text": d} for i, d in enumerate(chunks(HELD_OUT_MODULES, words=40, limit=10))]
    write_parquet(pa.Table.from_pylist(general), Storage(str(tmp_path)), "general", "part-0.parquet")
    cfg = validate_config(DistillConfig, {**TINY, "mode": "kd", "teacher": str(tmp_path / "teacher"),
                                          "data": str(tmp_path / "curated"), "output_root": str(tmp_path / "run"),
                                          "replay": str(tmp_path / "general"), "replay_share": 0.3,
                                          "training": {**TINY["training"], "epochs": 3}}, "test")
    metrics = run_job(cfg)
    assert metrics["mode"] == "kd"
    assert metrics["filter"] == {}  # no rewrites: the curated answers as they are
    assert metrics["replay"]["examples"] == 6  # 0.3 of 20 training examples beside the 14 curated ones
    history = metrics["training"]["history"]
    assert history[0]["loss"] > 0.0

    from shared.distill.examples import build_examples
    from shared.distill.finetune import encode_for_training

    examples, _ = build_examples(_curated_rows(), cfg.generation.prompt_fraction, cfg.generation.min_answer_words)
    encoded, _ = encode_for_training(tokenizer, examples, [e.answer for e in examples], 96)
    batch = collate(encoded, tokenizer.pad_token_id)  # the answer tokens of the curated examples, as trained
    distance = Distiller(teacher.eval())
    student, _ = load_causal_lm(str(tmp_path / "run" / "distill"))
    base, _ = load_causal_lm("tiny-llama")
    with torch.no_grad():
        before, after = float(distance.loss(base.eval(), batch)), float(distance.loss(student.eval(), batch))
    assert after < 0.97 * before, (before, after)
