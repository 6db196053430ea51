"""The prune job end to end on the session's local Ray (tiny-llama), on moto's S3 endpoint, and its input checks."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from real_text import CALIBRATION_MODULES, HELD_OUT_MODULES, chunks

from ray_jobs.runtime import run_job
from shared.config import load_config
from shared.configs.prune import PruneConfig
from shared.data import write_parquet
from shared.errors import UserError
from shared.lm_data import load_examples
from shared.storage import Storage
from tests.conftest import committed, committed_path, marker, run_cli

SMALL = ["model=tiny-llama", "max_length=64", "micro_batch_size=4", "runtime.cpus_per_worker=1", "sample_tokens=4"]


@pytest.fixture(scope="module")
def calibration_texts() -> list[str]:
    return chunks(CALIBRATION_MODULES, words=50, limit=24)


@pytest.fixture(scope="module")
def held_out_texts() -> list[str]:
    return chunks(HELD_OUT_MODULES, words=50, limit=12)


def texts_table(texts: list[str]) -> pa.Table:
    return pa.table({"id": list(range(len(texts))), "text": texts})


def curate_like_stage(root: Storage, texts: list[str]) -> str:
    """A finished stage that hands over a dataset the way the curate job does (id, text, score, matched_seed, and
    prompt/answer pairs), written through the same Stage API."""
    from shared.stage import Stage

    stage = Stage.open(root, "curate", "curate", "0123456789abcdef")
    stage.begin("job: curate\n")
    prompts = [f"Explain {t.split()[0]}" for t in texts]
    table = pa.table({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts,
                      "score": [1.0 - i / len(texts) for i in range(len(texts))], "matched_seed": [0] * len(texts),
                      "prompt": prompts, "answer": texts})
    write_parquet(table, stage.store, "subset", "part-0.parquet")
    stage.outputs["dataset"] = "subset"
    stage.commit({"selected": len(texts)})
    return stage.uri


def examples_of(cfg: PruneConfig, uri: str, max_examples: int):
    from shared.models import load_tokenizer

    examples, _ = load_examples(uri, load_tokenizer(cfg.model), max_length=cfg.max_length, max_examples=max_examples,
                                seed=cfg.seed, storage=cfg.storage)
    return examples


@pytest.mark.ray
@pytest.mark.s3
def test_prune_job_on_s3_writes_a_model_that_reloads(ray_session, s3_root, tiny_llama_dir, calibration_texts,
                                                     held_out_texts):
    from shared.models import load_causal_lm
    from shared.perplexity import evaluate_loss

    data = Storage(s3_root)
    curate = curate_like_stage(data, calibration_texts)
    write_parquet(texts_table(held_out_texts), data, "held-out", "part-0.parquet")
    cfg = load_config(PruneConfig, None, [*SMALL, f"output_root={s3_root}/run", f"calibration={curate}",
                                          f"eval_data={s3_root}/held-out", "fraction=0.25"])
    metrics = run_job(cfg)
    assert metrics["calibration"]["kind"] == "prompt_answer"  # loss on the answers only
    assert metrics["placement"]["importance worker"]["devices"] == {"cpu": 1}
    assert metrics["torch_threads"] == metrics["placement"]["importance worker"]["threads"][0]

    stage = committed(f"{s3_root}/run/prune")
    assert marker(f"{s3_root}/run/prune")["outputs"] == {"model": "model"}
    assert stage.read_json("metrics.json") == json.loads(json.dumps(metrics))
    assert "ray_train" not in stage.list()
    assert metrics["target_fraction"] == 0.25
    assert abs(metrics["achieved_fraction"] - 0.25) < 0.02
    assert metrics["importance_method"] == "vectorize"
    assert metrics["calibration_source"] == cfg.calibration
    assert metrics["calibration"]["examples"] == len(calibration_texts)
    assert [row["layer"] for row in metrics["per_layer"]] == [1, 2, 3]
    for row in metrics["per_layer"]:
        assert row["heads_after"] == 2 * row["kv_groups_after"]
        assert row["channels_after"] % 8 == 0
        assert row["channels_after"] < row["channels_before"]
    assert metrics["output"]["format"] == "per_layer"
    assert metrics["output"]["reload_max_logit_difference"] == 0.0
    report = stage.read_text("report.html")
    assert "Width of each decoder layer" in report
    assert "data:image/png;base64," in report

    # the stage hands over its model: it loads from the stage URI, with the reported size and losses
    model, tokenizer = load_causal_lm(f"{s3_root}/run/prune")
    assert sum(p.numel() for p in model.parameters()) == metrics["parameters_after"]
    widths = [(layer.self_attn.k_proj.out_features // 16, layer.mlp.up_proj.out_features)
              for layer in model.model.layers]
    assert widths[1:4] == [(r["kv_groups_after"], r["channels_after"]) for r in metrics["per_layer"]]
    assert widths[0] == widths[4] == widths[5] == (2, 192)
    assert [(w["kv_heads_after"], w["channels_after"]) for w in metrics["layer_widths"]] == widths
    for key, uri, n in (("calibration", cfg.calibration, cfg.max_examples),
                        ("domain", cfg.eval_data, cfg.eval_max_examples)):
        loss = evaluate_loss(model, examples_of(cfg, uri, n), batch_size=4, pad_id=tokenizer.pad_token_id)
        assert loss.mean == pytest.approx(metrics[f"{key}_loss_after"], rel=1e-5)
    assert metrics["domain_tokens"] == loss.tokens
    assert metrics["domain_perplexity_before"] > 1
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_sum_their_shards_and_a_rerun_resumes_their_pass(ray_session, tmp_path, tiny_llama_dir,
                                                                     calibration_texts, monkeypatch):
    """Two workers score halves of the calibration set; the summed vector-wise Taylor scores (exact under any split)
    must equal one process scoring everything. Every layer is pruned alike, so the model has a standard config.
    Paths are relative to the working directory, as a user types them: the model lands in the stage folder.
    A rerun of a stage that never committed resumes the importance pass from each worker's checkpoint."""
    from transformers import LlamaForCausalLM

    from shared.lm_data import batches
    from shared.models import load_causal_lm
    from shared.perplexity import batch_nll
    from shared.pruning.groups import prunable_layers
    from shared.pruning.importance import TaylorAccumulator, gradient_pass

    write_parquet(texts_table(calibration_texts), Storage(str(tmp_path)), "calibration.parquet")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(PruneConfig, None, [*SMALL, "output_root=run", "calibration=calibration.parquet",
                                          "runtime.num_workers=2", "runtime.checkpoint_every=1",
                                          "importance=vectorize", "layers=all", "fraction=0.3", "sample_prompt="])
    metrics = run_job(cfg)
    assert metrics["importance_resumed_after"] == 0

    model, tokenizer = load_causal_lm("tiny-llama")
    examples = examples_of(cfg, cfg.calibration, cfg.max_examples)
    total = sum(e.target_tokens for e in examples)
    layers = prunable_layers(model, list(range(6)))
    with gradient_pass(model), TaylorAccumulator(model, layers, "vectorize") as accumulator:
        nll_sum = 0.0
        for batch in batches(examples, 4, tokenizer.pad_token_id):
            nll, _ = batch_nll(model, batch)
            (nll / total).backward()
            nll_sum += float(nll.detach())
        scores = accumulator.scores()
    assert metrics["calibration_tokens_scored"] == total
    assert metrics["calibration_loss_before"] == pytest.approx(nll_sum / total, rel=1e-5)
    for row in metrics["per_layer"]:
        torch.testing.assert_close(torch.tensor(row["attention_scores"], dtype=torch.float64),
                                   scores[row["layer"]]["attention"], rtol=1e-4, atol=1e-12)
    assert metrics["output"]["format"] == "standard"
    folder = committed_path(tmp_path / "run" / "prune") / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "layer_widths" not in config
    assert isinstance(LlamaForCausalLM.from_pretrained(folder), LlamaForCausalLM)

    # the commit is lost (a crash after the pass, say during the upload): the rerun resumes where both workers
    # checkpointed last, with the same sums
    (tmp_path / "run" / "prune" / "_SUCCESS").unlink()
    checkpoints = sorted(p for p in (tmp_path / "run" / "prune" / "checkpoints").glob("*/prune/checkpoint_*")
                         if p.is_dir())
    assert checkpoints
    assert {p.name for p in checkpoints[-1].iterdir()} >= {"rank-0", "rank-1"}
    again = run_job(cfg)
    steps = -(-len(examples) // 2 // 4)  # micro-batches of 4 on each worker's half
    assert again["importance_resumed_after"] == steps
    assert [r["attention_scores"] for r in again["per_layer"]] == [r["attention_scores"] for r in metrics["per_layer"]]
    assert again["calibration_loss_before"] == metrics["calibration_loss_before"]


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before the stage is opened or Ray starts


def gpt2_folder(path) -> str:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64).save_pretrained(path)
    return str(path)


def odd_heads_folder(path) -> str:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
                num_key_value_heads=4, head_dim=8).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("case", ["empty", "too-short", "unsupported", "odd-heads", "unreachable", "no-column"])
def test_bad_input_is_refused_before_any_work(case, tmp_path, tiny_llama_dir, calibration_texts):
    store = Storage(str(tmp_path))
    write_parquet(texts_table(calibration_texts), store, "good.parquet")
    write_parquet(texts_table([]).cast(pa.schema([("id", pa.int64()), ("text", pa.string())])), store, "empty.parquet")
    write_parquet(texts_table(calibration_texts[:3] + ["", " "]), store, "short.parquet")
    write_parquet(pa.table({"body": calibration_texts}), store, "body.parquet")
    overrides = {
        "empty": ([f"calibration={tmp_path}/empty.parquet"], r"calibration .*empty.parquet: the dataset is empty"),
        "too-short": ([f"calibration={tmp_path}/short.parquet"],
                      r"3 usable examples of 5 rows \(2 empty text\); need at least 8"),
        "unsupported": ([f"model={gpt2_folder(tmp_path / 'gpt2')}", f"calibration={tmp_path}/good.parquet"],
                        r"architecture 'gpt2' \(.*\) cannot be pruned; supported layouts: LLaMA, Mistral, Qwen2"),
        "odd-heads": ([f"model={odd_heads_folder(tmp_path / 'odd')}", f"calibration={tmp_path}/good.parquet"],
                      "6 attention heads, which cannot be split into 4 key/value groups"),
        "unreachable": ([f"calibration={tmp_path}/good.parquet", "fraction=0.9"],
                        r"fraction 0.9: pruning layers 1-3 can remove at most 0\.\d+"),
        "no-column": ([f"calibration={tmp_path}/body.parquet"], "no 'text' column and no 'prompt'/'answer' columns"),
    }[case]
    cfg = load_config(PruneConfig, None, [*SMALL, f"output_root={tmp_path}/run", *overrides[0]])
    with pytest.raises(UserError, match=overrides[1]) as error:
        run_job(cfg)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "prune").exists()  # no stage opened, nothing written


def test_a_user_error_raised_in_a_worker_reaches_the_cli_as_such():
    from ray.train import WorkerGroupError

    from ray_jobs.errors import user_error_in
    from shared.errors import DataError

    failure = WorkerGroupError("rank 1 failed", {0: RuntimeError("other"), 1: DataError("calibration x: empty")})
    assert str(user_error_in(failure)) == "calibration x: empty"
    assert user_error_in(WorkerGroupError("boom", {0: RuntimeError("bug")})) is None


@pytest.mark.parametrize("fraction", ["0", "0.95", "-0.1"])
def test_fraction_outside_the_range_is_a_config_error(fraction):
    with pytest.raises(UserError, match=r"--set fraction: key 'fraction'"):
        load_config(PruneConfig, None, ["calibration=x.parquet", f"fraction={fraction}"])


def test_cli_prints_one_line_and_exits_2(tmp_path, calibration_texts):
    write_parquet(texts_table(calibration_texts), Storage(str(tmp_path)), "good.parquet")
    done = run_cli("run", "prune", "--set", f"model={gpt2_folder(tmp_path / 'gpt2')}", "--set",
                   f"calibration={tmp_path}/good.parquet", "--set", f"output_root={tmp_path}/run", timeout=300)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("scopeforge: error: model ")
    assert "cannot be pruned" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    done = run_cli("run", "prune", "--set", "calibration=x.parquet", "--set", "fraction=0.95", timeout=300)
    assert done.returncode == 2
    assert "fraction" in done.stderr.strip().splitlines()[-1]
