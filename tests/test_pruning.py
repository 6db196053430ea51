"""Structured pruning as functions (no Ray): groups, solver, importance, surgery, saving and reloading.

Models: tiny-llama (6 layers, 4 heads sharing 2 KV heads), tiny Mistral and Qwen2 (q/k/v biases) built from
configs, and a tiny GPT-2 for the refusal.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from shared.errors import ConfigError, ModelError
from shared.lm_data import batches, encode_texts
from shared.perplexity import batch_nll
from shared.pruning.groups import check_architecture, layer_module_widths, prunable_layers, resolve_layers
from shared.pruning.importance import TaylorAccumulator, gradient_pass, static_scores
from shared.pruning.planning import layer_shapes, meta_model, plan_from_config
from shared.pruning.solver import LayerShape, solve
from shared.pruning.surgery import keep_all, prune_model, select


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from shared.models import load_causal_lm

    return load_causal_lm(tiny_llama_dir)


@pytest.fixture(scope="module")
def calibration(tiny):
    from real_text import chunks

    _, tokenizer = tiny
    examples, _ = encode_texts(tokenizer, chunks(("json", "pathlib", "logging"), words=40, limit=8), max_length=40)
    return examples


def small_config(family: str):
    """Grouped-query attention (6 heads, 3 KV heads); 'llama-mha' has plain multi-head attention (6 and 6)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "llama-mha": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=6 if family == "llama-mha" else 3, head_dim=8, max_position_embeddings=64,
               tie_word_embeddings=family != "mistral")


def small_model(family: str):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return AutoModelForCausalLM.from_config(small_config(family)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_keep(model, indices, kv_groups, channels, seed=0):
    """Keep a random subset of groups and channels in the given layers."""
    generator = torch.Generator().manual_seed(seed)
    layers = prunable_layers(model, indices)
    return {layer.index: {"attention": torch.randperm(layer.kv_groups, generator=generator)[:kv_groups].sort().values,
                          "mlp": torch.randperm(layer.channels, generator=generator)[:channels].sort().values}
            for layer in layers}


def zeroed_copy(model, keep):
    """The original model with the pruned groups' contributions zeroed (their o_proj / down_proj input columns)."""
    import copy

    clone = copy.deepcopy(model)
    for layer in prunable_layers(clone, sorted(keep)):
        q_rows = layer.heads_per_group * layer.head_dim
        with torch.no_grad():
            for group in range(layer.kv_groups):
                if group not in keep[layer.index]["attention"]:
                    layer.o_proj.weight[:, group * q_rows:(group + 1) * q_rows] = 0
            dropped = [c for c in range(layer.channels) if c not in set(keep[layer.index]["mlp"].tolist())]
            layer.down_proj.weight[:, dropped] = 0
    return clone


# ---------------------------------------------------------------------------------------------------------------------
# Architecture and layers


def test_architecture_check_names_what_is_wrong():
    from transformers import GPT2Config

    assert check_architecture(small_config("qwen2"), "q") == "qwen2"
    with pytest.raises(ModelError, match=r"model 'g': architecture 'gpt2' .* cannot be pruned; supported layouts"):
        check_architecture(GPT2Config(n_layer=2, n_embd=32, n_head=2), "g")
    odd = small_config("llama")
    odd.num_key_value_heads = 4  # 6 query heads cannot share 4 key/value heads
    with pytest.raises(ModelError, match="6 attention heads, which cannot be split into 4 key/value groups"):
        check_architecture(odd, "odd")


def test_layer_ranges():
    assert resolve_layers(None, 30) == list(range(4, 28))  # LLM-Pruner: skip the first eighth and the last two
    assert resolve_layers(None, 6) == [1, 2, 3]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers([2, -1], 6) == [2, 3, 4]
    with pytest.raises(ModelError, match="selects no layer"):
        resolve_layers(None, 2)
    with pytest.raises(ModelError, match="selects no layer"):
        resolve_layers([5, 9], 4)


def test_groups_of_a_gqa_layer(tiny):
    model, _ = tiny
    layer = prunable_layers(model, [2])[0]
    assert (layer.kv_groups, layer.heads_per_group, layer.head_dim, layer.channels) == (2, 2, 16, 192)
    hidden = 64
    assert layer.group_params == 2 * (2 * 16 * hidden) + 2 * (16 * hidden)  # q rows + o columns, k and v rows
    assert layer.channel_params == 3 * hidden
    shapes = {tuple(p.shape): (axis, per) for _, p, axis, per in layer.members()}
    assert shapes[(64, 64)] in ((0, 32), (1, 32))
    assert shapes[(32, 64)] == (0, 16)
    assert shapes[(64, 192)] == (1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Solver


def test_solver_lands_on_the_fraction_for_smollm2_shapes():
    from transformers import LlamaConfig

    # SmolLM2-135M's shapes (30 layers, 9 heads / 3 KV heads, hidden 576, MLP 1536, vocab 49152, tied)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    assert total == 134_515_008
    shapes = layer_shapes(model, resolve_layers(None, 30))
    for fraction in (0.1, 0.2, 0.35, 0.5):
        plan = solve(shapes, total, fraction)
        half_step = 0.5 * 8 * sum(s.channel_params for s in shapes) / total
        assert abs(plan.achieved_fraction - fraction) <= half_step + 1e-12
        assert all(k.channels % 8 == 0 and 1 <= k.kv_groups <= 3 for k in plan.keep)
        removed = sum((s.kv_groups - k.kv_groups) * s.group_params + (s.channels - k.channels) * s.channel_params
                      for s, k in zip(shapes, plan.keep))
        assert plan.params_after == total - removed
    mlp_only = solve(shapes, total, 0.2, prune_attention=False)
    assert all(k.kv_groups == 3 for k in mlp_only.keep)
    with pytest.raises(ConfigError, match=r"fraction 0.85: pruning layers 4-27 can remove at most 0\.\d+"):
        solve(shapes, total, 0.85)
    with pytest.raises(ConfigError, match="too small"):
        solve(shapes, total, 0.0001, prune_attention=False)


def test_solver_rounds_channels_to_the_multiple():
    shapes = [LayerShape(i, 4, 1000, 100, 10) for i in range(3)]  # 100 channels: not a multiple of 16
    plan = solve(shapes, 100_000, 0.0015, channel_multiple=16, prune_attention=False)
    assert [k.channels for k in plan.keep] == [96, 96, 96]
    assert all(k.kv_groups == 4 for k in plan.keep)
    assert plan.params_after == 100_000 - 3 * 4 * 10
    plan = solve(shapes, 100_000, 0.02, channel_multiple=16, prune_attention=False)
    assert [k.channels for k in plan.keep] == [32, 32, 32]  # 2,000 parameters = 66.7 channels a layer: keep 33.3 -> 32


def test_plan_from_config_counts_match_the_real_pruned_model(tiny, tiny_llama_dir):
    model, _ = tiny
    target = plan_from_config(tiny_llama_dir, "tiny-llama", layers=None, fraction=0.3)
    assert target.layers == [1, 2, 3]
    assert target.family == "llama"
    assert target.plan.params_before == sum(p.numel() for p in model.parameters())
    pruned = prune_model(model, select(static_scores(prunable_layers(model, target.layers), "magnitude"),
                                       target.plan))
    assert sum(p.numel() for p in pruned.parameters()) == target.plan.params_after


# ---------------------------------------------------------------------------------------------------------------------
# Surgery


def test_pruning_zero_groups_keeps_the_logits(tiny):
    model, _ = tiny
    ids = torch.randint(0, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    pruned = prune_model(model, keep_all(model, [1, 2, 3]))
    assert type(pruned).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(pruned, ids), logits(model, ids))
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "llama-mha"])
def test_pruned_model_equals_the_original_with_those_groups_zeroed(family):
    model = small_model(family)
    mha = family == "llama-mha"  # a group is one head
    keep = random_keep(model, [1, 2], kv_groups=4 if mha else 2, channels=40)
    pruned = prune_model(model, keep)
    for index in (1, 2):
        attn, mlp = pruned.model.layers[index].self_attn, pruned.model.layers[index].mlp
        expected = (32, 32, 32) if mha else (32, 16, 32)
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == expected
        assert (mlp.gate_proj.out_features, mlp.down_proj.in_features) == (40, 40)
        if family == "qwen2":
            assert attn.q_proj.bias.shape == (32,)
            assert attn.k_proj.bias.shape == (16,)
    assert pruned.model.layers[0].mlp.up_proj.out_features == 64  # outside the range: untouched
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(pruned, ids), logits(zeroed_copy(model, keep), ids), rtol=1e-5, atol=1e-5)


def test_per_layer_model_round_trip_with_and_without_scopeforge(tmp_path):
    from transformers import AutoModelForCausalLM

    model = small_model("qwen2")
    pruned = prune_model(model, random_keep(model, [1, 2], kv_groups=1, channels=24))
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "scopeforge_pruned_qwen2"
    assert (tmp_path / "modeling_scopeforge_pruned.py").exists()
    assert [w["num_key_value_heads"] for w in config["layer_widths"]] == [3, 1, 1, 3]
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    expected = logits(pruned, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # scopeforge registered the model type
    assert torch.equal(logits(reloaded, ids), expected)
    assert layer_module_widths(reloaded) == layer_module_widths(pruned)
    # plain transformers in a fresh interpreter that never imports scopeforge: trust_remote_code runs the shipped file
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "d = sys.argv[1]; e = torch.load(d + '/expected.pt')\n"
        "m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()\n"
        "assert 'shared' not in sys.modules\n"
        "with torch.no_grad(): out = m(input_ids=e['ids']).logits\n"
        "print(type(m).__name__, float((out - e['logits']).abs().max()))\n"
        "print(m.generate(e['ids'][:1], max_new_tokens=3, do_sample=False).shape[1])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                             "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 0, done.stderr[-2000:]
    name, difference, length = done.stdout.split()
    assert name == "ScopeforgePrunedQwen2ForCausalLM"
    assert float(difference) == 0.0
    assert int(length) == 11


def test_a_pruned_model_can_be_pruned_again(tmp_path):
    model = small_model("llama")
    first = prune_model(model, random_keep(model, [1, 2], kv_groups=2, channels=40))
    first.save_pretrained(tmp_path)
    target = plan_from_config(str(tmp_path), "first", layers="all", fraction=0.2)
    shapes = {s.index: (s.kv_groups, s.channels) for s in target.plan.shapes}
    assert shapes == {0: (3, 64), 1: (2, 40), 2: (2, 40), 3: (3, 64)}
    second = prune_model(first, select(static_scores(prunable_layers(first, target.layers), "magnitude"), target.plan))
    assert sum(p.numel() for p in second.parameters()) == target.plan.params_after
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(4))
    assert logits(second, ids).shape == (2, 8, 96)


def test_pruning_every_layer_alike_writes_a_standard_config(tmp_path):
    from transformers import MistralForCausalLM

    model = small_model("mistral")
    pruned = prune_model(model, random_keep(model, [0, 1, 2, 3], kv_groups=2, channels=32))
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mistral"
    assert "auto_map" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (4, 2, 32)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    reloaded = MistralForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), logits(pruned, ids))


# ---------------------------------------------------------------------------------------------------------------------
# Importance


def _full_gradient(model, examples, pad):
    """Weight gradients of the mean calibration loss from one ordinary backward over all examples."""
    model.zero_grad(set_to_none=True)
    total = sum(e.target_tokens for e in examples)
    for batch in batches(examples, len(examples), pad):
        nll, _ = batch_nll(model, batch)
        (nll / total).backward()


def _accumulate(model, layers, method, examples, pad, micro_batch):
    total = sum(e.target_tokens for e in examples)
    with gradient_pass(model), TaylorAccumulator(model, layers, method) as accumulator:
        for batch in batches(examples, micro_batch, pad):
            nll, _ = batch_nll(model, batch)
            (nll / total).backward()
            assert all(p.grad is None for p in model.parameters())  # folded and freed during backward
        return accumulator.scores()


def test_taylor_scores_match_a_plain_backward(tiny, calibration):
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    layers = prunable_layers(model, [2, 3])
    first = _accumulate(model, layers, "param_first", calibration, pad, micro_batch=len(calibration))
    second = _accumulate(model, layers, "param_second", calibration, pad, micro_batch=len(calibration))
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True] * len(list(model.parameters()))
    _full_gradient(model, calibration, pad)
    layer = prunable_layers(model, [3])[0]
    q, k, v, o = (p.weight for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj))
    product = {name: (w * w.grad).detach().double() for name, w in zip("qkvo", (q, k, v, o))}
    group1 = (product["q"][32:64].abs().sum() + product["k"][16:32].abs().sum() + product["v"][16:32].abs().sum()
              + product["o"][:, 32:64].abs().sum())
    assert float(first[3]["attention"][1]) == pytest.approx(float(group1), rel=1e-4)
    down, up, gate = (p.weight for p in (layer.down_proj, layer.up_proj, layer.gate_proj))
    channel7 = sum(float((w * w.grad).detach().double()[7].square().sum()) for w in (up, gate)) \
        + float((down * down.grad).detach().double()[:, 7].square().sum())
    assert float(second[3]["mlp"][7]) == pytest.approx(0.5 * channel7, rel=1e-4)
    model.zero_grad(set_to_none=True)


def test_vectorized_taylor_is_exact_across_micro_batches(tiny, calibration):
    model, tokenizer = tiny
    layers = prunable_layers(model, [1, 4])
    whole = _accumulate(model, layers, "vectorize", calibration, tokenizer.pad_token_id, micro_batch=len(calibration))
    split = _accumulate(model, layers, "vectorize", calibration, tokenizer.pad_token_id, micro_batch=3)
    for index in (1, 4):
        for kind in ("attention", "mlp"):
            torch.testing.assert_close(split[index][kind], whole[index][kind], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("method", ["param_first", "vectorize", "param_second", "magnitude"])
def test_a_channel_that_carries_the_output_ranks_first(method, calibration, tiny):
    """Make one MLP channel carry a large share of its layer's output (its up_proj row and down_proj column scaled
    by 8): every informed method must rank it first."""
    import copy

    model = copy.deepcopy(tiny[0])
    pad = tiny[1].pad_token_id
    layer = prunable_layers(model, [2])[0]
    with torch.no_grad():
        layer.up_proj.weight[5] *= 8.0
        layer.down_proj.weight[:, 5] *= 8.0
    layers = prunable_layers(model, [2])
    if method == "magnitude":
        scores = static_scores(layers, method)
    else:
        scores = _accumulate(model, layers, method, calibration, pad, micro_batch=4)
    assert int(scores[2]["mlp"].argmax()) == 5


def test_random_scores_follow_the_seed(tiny):
    layers = prunable_layers(tiny[0], [1, 2])
    a, b, c = static_scores(layers, "random", 0), static_scores(layers, "random", 0), static_scores(layers, "random", 1)
    assert torch.equal(a[1]["mlp"], b[1]["mlp"])
    assert not torch.equal(a[1]["mlp"], c[1]["mlp"])


def test_an_importance_pass_resumed_from_its_progress_ends_with_the_same_sums(tiny, calibration, tiny_llama_dir):
    """The pass on one worker, stopped after two micro-batches and resumed from its checkpointed progress in a fresh
    model (as a retried worker does), ends with the scores and loss of one uninterrupted pass."""
    from shared.models import load_causal_lm
    from shared.pruning.step import ImportancePass, ImportanceProgress

    def run(model, stop=None, resume=None):
        layers = prunable_layers(model, [1, 4])
        with ImportancePass(model, layers, "param_first", micro_batch=3, pad_id=pad, scale=1e-3) as importance:
            if resume is not None:
                importance.resume(ImportanceProgress.from_state(resume))
            for step, _ in importance.run(calibration):
                if step == stop:
                    return importance.progress().state()
            return importance.scores(), importance.loss

    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    whole, loss = run(model)
    state = run(load_causal_lm("tiny-llama")[0], stop=2)
    assert state["step"] == 2
    assert 0 < state["tokens"] < loss.tokens
    resumed, resumed_loss = run(load_causal_lm("tiny-llama")[0], resume=state)
    assert resumed_loss.tokens == loss.tokens
    assert resumed_loss.nll == pytest.approx(loss.nll, rel=1e-6)
    for index in (1, 4):
        for kind in ("attention", "mlp"):
            torch.testing.assert_close(resumed[index][kind], whole[index][kind], rtol=1e-5, atol=1e-12)


def test_the_default_importance_prunes_the_same_model_for_any_micro_batch_and_worker_count(tiny, calibration,
                                                                                          tiny_llama_dir):
    """The default (vectorize) sums signed W*g per vector over the whole calibration set before |.|: micro-batch 2 or
    8, one worker or two (each summing its shard, then added as the all_reduce does) keep the same groups."""
    from shared.configs.prune import PruneConfig
    from shared.lm_data import shard
    from shared.pruning.step import ImportancePass

    method = PruneConfig.model_fields["importance"].default
    assert method == "vectorize"
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    target = plan_from_config(tiny_llama_dir, "tiny-llama", layers=[1, 5], fraction=0.2)
    scale = 1.0 / sum(e.target_tokens for e in calibration)

    def keep(micro_batch, workers):
        flat = None
        for rank in range(workers):
            layers = prunable_layers(model, target.layers)
            with ImportancePass(model, layers, method, micro_batch=micro_batch, pad_id=pad, scale=scale) as part:
                for _ in part.run(shard(calibration, rank, workers)):
                    pass
                flat = part.flat().clone() if flat is None else flat + part.flat()
                part.load_flat(flat)
                scores = part.scores()
        return select(scores, target.plan)

    reference = keep(micro_batch=8, workers=1)
    for micro_batch, workers in ((2, 1), (3, 2)):
        other = keep(micro_batch, workers)
        for index in target.layers:
            for kind in ("attention", "mlp"):
                assert torch.equal(other[index][kind], reference[index][kind]), (micro_batch, workers, index, kind)


def test_the_fraction_is_of_the_count_the_config_names_and_every_share_is_reported(tiny_llama_dir):
    targets = {of: plan_from_config(tiny_llama_dir, "tiny-llama", layers=None, fraction=0.2, fraction_of=of)
               for of in ("all", "non_embedding", "prunable")}
    counts = targets["all"].counts
    assert counts["all"] > counts["non_embedding"] > counts["prunable"] > 0
    for of, target in targets.items():
        assert target.counts == counts
        shares = target.removed_shares()
        assert shares[of] == pytest.approx(0.2, abs=0.05), (of, shares)
        assert shares["all"] < shares["non_embedding"] < shares["prunable"]
    assert targets["all"].plan.removed > targets["non_embedding"].plan.removed > targets["prunable"].plan.removed
