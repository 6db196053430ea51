"""LLaMA, Mistral and Qwen2 causal LMs whose decoder layers have different widths, as structured pruning leaves them.

Written by scopeforge (``scopeforge run prune``). The config is the family's own config plus ``layer_widths``: one
entry per decoder layer with its ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``;
``head_dim`` is explicit. The model is the family's own model with each layer's attention and MLP built at that
layer's widths, so every forward, cache and generation path is the library's.

This file is self-contained (it imports only transformers) and is saved beside the weights, so a pruned model loads
with plain transformers:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

Inside scopeforge the classes are registered with the Auto classes on import (``register()``), so
``AutoModelForCausalLM.from_pretrained(folder)`` works without ``trust_remote_code``.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WIDTH_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _check_widths(config) -> None:
    widths = getattr(config, "layer_widths", None)
    if widths is None:
        return
    if len(widths) != config.num_hidden_layers:
        raise ValueError(f"layer_widths has {len(widths)} entries for {config.num_hidden_layers} layers")
    if getattr(config, "head_dim", None) is None:
        raise ValueError("a model with per-layer widths needs an explicit head_dim in its config")
    for index, entry in enumerate(widths):
        missing = [key for key in WIDTH_KEYS if key not in entry]
        if missing:
            raise ValueError(f"layer_widths[{index}] lacks {', '.join(missing)}")
        heads, kv_heads = entry["num_attention_heads"], entry["num_key_value_heads"]
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"layer_widths[{index}]: {heads} heads cannot share {kv_heads} key/value heads")


def _build_layers_at_widths(model, config) -> None:
    """Replace each decoder layer's attention and MLP by the family's own modules at that layer's widths."""
    _check_widths(config)
    for index, layer in enumerate(model.model.layers):
        entry = config.layer_widths[index]
        sub = copy.copy(config)
        for key in WIDTH_KEYS:
            setattr(sub, key, int(entry[key]))
        attention = type(layer.self_attn)(sub, index)
        attention.config = config  # the shared config: attention implementation switches reach every layer
        layer.self_attn = attention
        layer.mlp = type(layer.mlp)(sub)


class ScopeforgePrunedLlamaConfig(LlamaConfig):
    model_type = "scopeforge_pruned_llama"
    layer_widths: list | None = None


class ScopeforgePrunedMistralConfig(MistralConfig):
    model_type = "scopeforge_pruned_mistral"
    layer_widths: list | None = None


class ScopeforgePrunedQwen2Config(Qwen2Config):
    model_type = "scopeforge_pruned_qwen2"
    layer_widths: list | None = None


class ScopeforgePrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = ScopeforgePrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _build_layers_at_widths(self, config)
        self.post_init()


class ScopeforgePrunedMistralForCausalLM(MistralForCausalLM):
    config_class = ScopeforgePrunedMistralConfig

    def __init__(self, config):
        super().__init__(config)
        _build_layers_at_widths(self, config)
        self.post_init()


class ScopeforgePrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = ScopeforgePrunedQwen2Config

    def __init__(self, config):
        super().__init__(config)
        _build_layers_at_widths(self, config)
        self.post_init()


PRUNED_CLASSES: dict[str, tuple[type[Any], type[Any]]] = {
    # base model_type -> (config class, model class)
    "llama": (ScopeforgePrunedLlamaConfig, ScopeforgePrunedLlamaForCausalLM),
    "mistral": (ScopeforgePrunedMistralConfig, ScopeforgePrunedMistralForCausalLM),
    "qwen2": (ScopeforgePrunedQwen2Config, ScopeforgePrunedQwen2ForCausalLM),
}


def register() -> None:
    """Map the pruned model types to these classes in the Auto classes (idempotent); saving such a model then also
    writes this file and an ``auto_map`` beside the weights, for ``trust_remote_code=True`` elsewhere."""
    for config_class, model_class in PRUNED_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModelForCausalLM")


register()
