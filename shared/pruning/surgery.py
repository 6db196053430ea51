"""Keep the most important groups and build the smaller model.

    keep = select(scores, plan)              # layer -> kept KV-group and channel indices (ascending)
    pruned = prune_model(model, keep)        # a new model; the original is left as it was

The pruned model is a plain LLaMA / Mistral / Qwen2 model with a standard config when every decoder layer ends up
with the same widths; otherwise the family's per-layer variant from ``modeling_scopeforge_pruned`` (see there for
what loading it needs). Either way it is built on the meta device and takes the sliced tensors as they are, so no
time goes into initialising weights that are overwritten.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from shared.pruning.groups import LayerWidth, family_of, head_dim_of, layer_module_widths, prunable_layers
from shared.pruning.importance import Scores
from shared.pruning.solver import Plan

Keep = dict[int, dict[str, torch.Tensor]]
"""layer index -> {"attention": kept KV-group indices, "mlp": kept channel indices}, ascending."""

_DROP_FROM_CONFIG = ("architectures", "model_type", "transformers_version", "auto_map", "layer_widths",
                     "_name_or_path", "name_or_path")


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, ascending (ties go to the lower index)."""
    order = torch.argsort(scores, descending=True, stable=True)[:count]
    return order.sort().values


def select(scores: Scores, plan: Plan) -> Keep:
    """Per pruned layer, the KV groups and channels the plan keeps, chosen by score."""
    keep: Keep = {}
    for layer in plan.keep:
        layer_scores = scores[layer.index]
        keep[layer.index] = {"attention": _top(layer_scores["attention"], layer.kv_groups),
                             "mlp": _top(layer_scores["mlp"], layer.channels)}
    return keep


def keep_all(model: Any, indices: list[int]) -> Keep:
    """A keep that removes nothing (every group of the given layers)."""
    return {layer.index: {"attention": torch.arange(layer.kv_groups), "mlp": torch.arange(layer.channels)}
            for layer in prunable_layers(model, indices)}


def _expand(groups: torch.Tensor, size: int) -> torch.Tensor:
    """Group indices -> the indices of their ``size`` consecutive rows/columns."""
    return (groups.view(-1, 1) * size + torch.arange(size, device=groups.device).view(1, -1)).reshape(-1)


def sliced_state_dict(model: Any, keep: Keep) -> dict[str, torch.Tensor]:
    """The model's state dict with the pruned rows and columns removed."""
    state = dict(model.state_dict())
    for layer in prunable_layers(model, sorted(keep)):
        kept = keep[layer.index]
        q_rows = _expand(kept["attention"], layer.heads_per_group * layer.head_dim)
        kv_rows = _expand(kept["attention"], layer.head_dim)
        channels = kept["mlp"]
        prefix = f"model.layers.{layer.index}."
        plan = {
            "self_attn.q_proj": (q_rows, 0), "self_attn.k_proj": (kv_rows, 0), "self_attn.v_proj": (kv_rows, 0),
            "self_attn.o_proj": (q_rows, 1), "mlp.gate_proj": (channels, 0), "mlp.up_proj": (channels, 0),
            "mlp.down_proj": (channels, 1),
        }
        for name, (index, axis) in plan.items():
            weight = prefix + name + ".weight"
            index = index.to(state[weight].device)
            state[weight] = state[weight].index_select(axis, index).contiguous()
            bias = prefix + name + ".bias"
            if axis == 0 and bias in state:
                state[bias] = state[bias].index_select(0, index).contiguous()
    return state


def pruned_config(model: Any, widths: list[LayerWidth]) -> Any:
    """The config of a model of the same family with these per-layer widths: the family's standard config when all
    layers are alike, else its per-layer variant (``layer_widths``)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from shared.pruning.modeling_scopeforge_pruned import PRUNED_CLASSES

    family = family_of(model.config)
    standard = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    fields = {k: v for k, v in model.config.to_dict().items() if k not in _DROP_FROM_CONFIG}
    fields["head_dim"] = head_dim_of(model.config)
    if len(set(widths)) == 1:
        width = widths[0]
        fields.update(num_attention_heads=width.heads, num_key_value_heads=width.kv_heads,
                      intermediate_size=width.intermediate)
        return standard(**fields)
    fields.update(num_attention_heads=max(w.heads for w in widths), num_key_value_heads=max(w.kv_heads for w in widths),
                  intermediate_size=max(w.intermediate for w in widths))
    fields["layer_widths"] = [{"num_attention_heads": w.heads, "num_key_value_heads": w.kv_heads,
                               "intermediate_size": w.intermediate} for w in widths]
    return PRUNED_CLASSES[family][0](**fields)


def model_class_for(config: Any) -> type:
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    from shared.pruning.modeling_scopeforge_pruned import PRUNED_CLASSES

    if getattr(config, "layer_widths", None):
        return PRUNED_CLASSES[family_of(config)][1]
    return {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}[family_of(config)]


def prune_model(model: Any, keep: Keep) -> Any:
    """A new model holding only the kept groups of ``model`` (same dtype, device and mode); ``model`` is untouched."""
    old_widths = layer_module_widths(model)
    widths = list(old_widths)
    for index, kept in keep.items():
        old = old_widths[index]
        groups = len(kept["attention"])
        widths[index] = LayerWidth(groups * old.heads_per_group, groups, len(kept["mlp"]))
    config = pruned_config(model, widths)
    state = sliced_state_dict(model, keep)
    with torch.device("meta"):
        pruned = model_class_for(config)(config)
    pruned.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        pruned.tie_weights()
    # non-persistent buffers (rotary frequencies) are not in a state dict: the original's are the right ones
    for name, buffer in list(pruned.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            pruned.get_submodule(owner)._buffers[attr] = model.get_buffer(name).detach().clone()
    leftover = [n for n, t in [*pruned.named_parameters(), *pruned.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"pruned model has tensors with no data: {', '.join(leftover[:5])}")
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.train(model.training)
