from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from shared.errors import ModelError
from shared.generation import chat_prompt, generate_text
from shared.models import describe_architecture, load_causal_lm, resolve_model, save_model
from shared.storage import Storage


def test_tiny_llama_round_trip_identical_logits(tiny_llama_dir, tmp_path):
    model, tok = load_causal_lm("tiny-llama")
    info = describe_architecture(model)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["attention_heads"] == 4
    assert info["kv_heads"] == 2
    save_model(model, tok, Storage(str(tmp_path)), "copy")
    again, tok2 = load_causal_lm(str(tmp_path / "copy"))
    ids = tok(["the shuttle launch", "def f(x): return x"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
    assert tok2("orbit data")["input_ids"] == tok("orbit data")["input_ids"]
    assert tok.pad_token_id != tok.eos_token_id


def test_tiny_llama_is_deterministic(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPEFORGE_CACHE", str(tmp_path))
    rebuilt = resolve_model("tiny-llama")
    assert rebuilt != tiny_llama_dir
    a = (Path(tiny_llama_dir) / "model.safetensors").read_bytes()
    b = (Path(rebuilt) / "model.safetensors").read_bytes()
    assert a == b
    assert (Path(tiny_llama_dir) / "tokenizer.json").read_text() == (Path(rebuilt) / "tokenizer.json").read_text()


def test_tiny_llama_chat_and_generate(tiny_llama_dir):
    model, tok = load_causal_lm("tiny-llama")
    prompt = chat_prompt(tok, "hello")
    assert prompt.startswith("<|im_start|>user\nhello<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    out = generate_text(model, tok, [prompt, "a much longer prompt about space and orbits"], max_new_tokens=5)
    assert len(out) == 2
    assert all(isinstance(o, str) for o in out)


def test_bad_references_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match=r"model '\./nope/model': no such directory"):
        resolve_model("./nope/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="not an alias"):
        resolve_model("not-an-alias")
    with pytest.raises(ModelError, match=r"model 'someorg/somemodel': cannot load"):
        load_causal_lm("someorg/somemodel")  # HF_HUB_OFFLINE=1: the hub is unreachable here
    with pytest.raises(ModelError, match="dtype 'int3'"):
        load_causal_lm("tiny-llama", dtype="int3")


@pytest.mark.s3
def test_s3_model_is_copied_once_and_refetched_when_changed(tiny_llama_dir, s3_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPEFORGE_CACHE", str(tmp_path / "cache"))
    store = Storage(s3_root)
    store.upload(tiny_llama_dir, "models", "tiny")
    ref = f"{s3_root}/models/tiny"
    first = resolve_model(ref)
    stamp = os.stat(Path(first) / ".complete").st_mtime_ns
    assert resolve_model(ref) == first
    assert os.stat(Path(first) / ".complete").st_mtime_ns == stamp
    model, _ = load_causal_lm(ref)
    assert describe_architecture(model)["layers"] == 6
    store.write_text('{"note": "changed"}', "models", "tiny", "extra.json")
    assert resolve_model(ref) != first
    with pytest.raises(ModelError, match="no files under that prefix"):
        resolve_model(f"{s3_root}/models/absent")


@pytest.mark.slow
def test_smollm2_alias_converts_gguf_to_safetensors():
    where = Path(resolve_model("smollm2-135m"))
    assert (where / "model.safetensors").is_file()
    assert not list(where.glob("*.gguf"))
    model, tok = load_causal_lm("smollm2-135m")
    info = describe_architecture(model)
    assert (info["parameters"], info["layers"], info["hidden_size"]) == (134_515_008, 30, 576)
    assert (info["attention_heads"], info["kv_heads"], info["vocab_size"]) == (9, 3, 49152)
    assert "quantization_config" not in model.config.to_dict()
    answer = generate_text(model, tok, [chat_prompt(tok, "What is the capital of France?")], max_new_tokens=12)[0]
    assert "Paris" in answer
