"""Structural groups of a LLaMA-family decoder: what must be removed together so the model stays consistent.

- **Attention, one KV group**: key/value head ``g`` and the ``heads_per_group`` query heads that read it
  (grouped-query attention); with plain multi-head attention a group is one head. Rows of q_proj, k_proj and
  v_proj (and their biases, as Qwen2 has) and the matching input columns of o_proj go together.
- **MLP, one channel**: row ``i`` of gate_proj and up_proj (and their biases) with column ``i`` of down_proj.

Supported layouts: LLaMA, Mistral and Qwen2 (the same projection names), including models an earlier prune left with
per-layer widths. Anything else is refused by :func:`check_architecture` from the config alone, before any weight
is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.errors import ModelError

FAMILIES = ("llama", "mistral", "qwen2")
PRUNED_PREFIX = "scopeforge_pruned_"


@dataclass(frozen=True)
class LayerWidth:
    """Widths of one decoder layer."""

    heads: int
    kv_heads: int
    intermediate: int

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads


def family_of(config: Any) -> str:
    """'llama', 'mistral' or 'qwen2' for a config of that family (or one an earlier prune wrote), else ''."""
    model_type = str(getattr(config, "model_type", "") or "")
    base = model_type.removeprefix(PRUNED_PREFIX)
    return base if base in FAMILIES else ""


def config_widths(config: Any) -> list[LayerWidth]:
    """Each layer's widths from a config (``layer_widths`` when an earlier prune left per-layer widths)."""
    per_layer = getattr(config, "layer_widths", None)
    if per_layer:
        return [LayerWidth(int(e["num_attention_heads"]), int(e["num_key_value_heads"]), int(e["intermediate_size"]))
                for e in per_layer]
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return [LayerWidth(heads, kv_heads, int(config.intermediate_size))] * int(config.num_hidden_layers)


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_architecture(config: Any, ref: str) -> str:
    """The model's family, or a one-line ModelError naming ``ref``: an unsupported architecture, or heads that
    cannot be split into key/value groups."""
    family = family_of(config)
    if not family:
        names = ", ".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise ModelError(f"model {ref!r}: architecture '{getattr(config, 'model_type', '?')}' ({names}) cannot be "
                         "pruned; supported layouts: LLaMA, Mistral, Qwen2")
    widths = config_widths(config)
    if len(widths) != int(config.num_hidden_layers):
        raise ModelError(f"model {ref!r}: layer_widths lists {len(widths)} layers but the model has "
                         f"{config.num_hidden_layers}")
    for index, width in enumerate(widths):
        if width.kv_heads < 1 or width.heads < 1 or width.heads % width.kv_heads:
            raise ModelError(f"model {ref!r}: layer {index} has {width.heads} attention heads, which cannot be split "
                             f"into {width.kv_heads} key/value groups of equal size")
    return family


def resolve_layers(spec: list[int] | Literal["all"] | None, num_layers: int) -> list[int]:
    """Decoder layers to prune. ``None``: skip the first eighth (rounded) and the last two, as LLM-Pruner does (layers
    4-29 of 32); ``"all"``: every layer; ``[start, stop]``: ``range(num_layers)[start:stop]`` (negative counts from
    the end)."""
    if spec == "all":
        start, stop = 0, num_layers
        described = "all"
    elif spec is None:
        start, stop = round(num_layers / 8), num_layers - 2
        described = f"the default range [{start}, {stop})"
    else:
        start, stop = spec
        described = f"layers [{start}, {stop}]"
    chosen = list(range(num_layers))[start:stop]
    if not chosen:
        raise ModelError(f"{described} selects no layer of a model with {num_layers} layers; "
                         "set layers to [start, stop] or 'all'")
    return chosen


# ---------------------------------------------------------------------------------------------------------------------
# The modules of a loaded (or meta-device) model


@dataclass
class PrunableLayer:
    """The projections of one decoder layer and how their rows/columns fall into groups."""

    index: int
    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    gate_proj: Any
    up_proj: Any
    down_proj: Any
    head_dim: int
    kv_groups: int
    heads_per_group: int
    channels: int

    @property
    def group_params(self) -> int:
        """Parameters one KV group holds (q/k/v rows with their biases, o_proj columns)."""
        per_group = 0
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            per_group += proj.weight.numel() // self.kv_groups
            if proj.bias is not None:
                per_group += proj.bias.numel() // self.kv_groups
        return per_group + self.o_proj.weight.numel() // self.kv_groups

    @property
    def channel_params(self) -> int:
        """Parameters one MLP channel holds (gate/up rows with their biases, a down_proj column)."""
        per_channel = 0
        for proj in (self.gate_proj, self.up_proj):
            per_channel += proj.weight.numel() // self.channels
            if proj.bias is not None:
                per_channel += proj.bias.numel() // self.channels
        return per_channel + self.down_proj.weight.numel() // self.channels

    def members(self) -> list[tuple[str, Any, int, int]]:
        """(group kind, parameter, axis, vectors per group) for every parameter a group removes a slice of.

        axis 0: output rows (a bias is its own axis 0); axis 1: input columns. A group owns ``vectors per group``
        consecutive rows/columns of the parameter.
        """
        q_rows = self.heads_per_group * self.head_dim
        out: list[tuple[str, Any, int, int]] = []
        for proj, per_group in ((self.q_proj, q_rows), (self.k_proj, self.head_dim), (self.v_proj, self.head_dim)):
            out.append(("attention", proj.weight, 0, per_group))
            if proj.bias is not None:
                out.append(("attention", proj.bias, 0, per_group))
        out.append(("attention", self.o_proj.weight, 1, q_rows))
        for proj in (self.gate_proj, self.up_proj):
            out.append(("mlp", proj.weight, 0, 1))
            if proj.bias is not None:
                out.append(("mlp", proj.bias, 0, 1))
        out.append(("mlp", self.down_proj.weight, 1, 1))
        return out


def prunable_layers(model: Any, indices: list[int]) -> list[PrunableLayer]:
    """The given decoder layers of a LLaMA-family model, with their shapes checked against the grouping."""
    layers = model.model.layers
    head_dim = head_dim_of(model.config)
    out = []
    for index in indices:
        layer = layers[index]
        attn, mlp = layer.self_attn, layer.mlp
        try:
            q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
            gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        except AttributeError as exc:
            raise ModelError(f"layer {index} lacks the LLaMA projection layout ({exc})") from None
        kv_groups = k.out_features // head_dim
        heads = q.out_features // head_dim
        consistent = (
            k.out_features == v.out_features == kv_groups * head_dim
            and q.out_features == heads * head_dim and kv_groups >= 1 and heads % kv_groups == 0
            and o.in_features == q.out_features
            and gate.out_features == up.out_features == down.in_features
        )
        if not consistent:
            raise ModelError(f"layer {index}: projection shapes (q {q.out_features}, k {k.out_features}, "
                             f"v {v.out_features}, o {o.in_features}, head_dim {head_dim}) do not split into "
                             "whole key/value groups")
        out.append(PrunableLayer(index, q, k, v, o, gate, up, down, head_dim, kv_groups, heads // kv_groups,
                                 gate.out_features))
    return out


def layer_module_widths(model: Any) -> list[LayerWidth]:
    """Each decoder layer's actual widths, read from its modules."""
    head_dim = head_dim_of(model.config)
    return [LayerWidth(layer.self_attn.q_proj.out_features // head_dim,
                       layer.self_attn.k_proj.out_features // head_dim,
                       layer.mlp.gate_proj.out_features) for layer in model.model.layers]
