"""From a model folder to a pruning plan, reading only its config (the weights stay on disk).

    target = plan_from_config(resolve_model("smollm2-135m"), "smollm2-135m", layers=None, fraction=0.35)
    target.plan.achieved_fraction, target.layers

The architecture check, the layer range and the solver all run here, so a model that cannot be pruned as asked is
refused before any worker starts or any weight is read. Parameter counts come from the model built on the meta
device, so they are exact (biases, tied embeddings) without allocating memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from shared.errors import ModelError
from shared.pruning.groups import check_architecture, config_widths, prunable_layers, resolve_layers
from shared.pruning.solver import LayerShape, Plan, solve


@dataclass(frozen=True)
class Target:
    family: str
    layers: list[int]
    """Decoder layers to prune."""
    num_layers: int
    plan: Plan
    counts: dict[str, int] = field(default_factory=dict)
    """Parameters counted by each denominator of the fraction (:func:`parameter_counts`)."""

    def removed_shares(self) -> dict[str, float]:
        """The share of each denominator's parameters the plan removes."""
        return {k: round(self.plan.removed / v, 6) for k, v in self.counts.items() if v}


def read_config(path: str, ref: str) -> Any:
    """The model's config (per-layer pruned configs included); a one-line ModelError when it cannot be read."""
    from transformers import AutoConfig

    import shared.pruning.modeling_scopeforge_pruned  # noqa: F401  (registers the per-layer pruned model types)

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {ref!r}: cannot read its config ({text})") from None


def meta_model(config: Any) -> Any:
    """The model of this config on the meta device (shapes without memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def layer_shapes(model: Any, indices: list[int]) -> list[LayerShape]:
    return [LayerShape(layer.index, layer.kv_groups, layer.group_params, layer.channels, layer.channel_params)
            for layer in prunable_layers(model, indices)]


def parameter_counts(model: Any, shapes: list[LayerShape]) -> dict[str, int]:
    """The denominators a pruning fraction can be of: ``all`` parameters, the ``non_embedding`` ones (without the
    token embedding and an untied output head, which are never pruned), and the ``prunable`` ones (the KV groups and
    MLP channels of the layers that are pruned)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" in name or "lm_head" in name)
    prunable = sum(s.kv_groups * s.group_params + s.channels * s.channel_params for s in shapes)
    return {"all": total, "non_embedding": total - embedding, "prunable": prunable}


def plan_from_config(path: str, ref: str, *, layers: list[int] | Literal["all"] | None, fraction: float,
                     channel_multiple: int = 8, prune_attention: bool = True,
                     fraction_of: Literal["all", "non_embedding", "prunable"] = "all") -> Target:
    config = read_config(path, ref)
    family = check_architecture(config, ref)
    num_layers = len(config_widths(config))
    indices = resolve_layers(layers, num_layers)
    model = meta_model(config)
    shapes = layer_shapes(model, indices)
    counts = parameter_counts(model, shapes)
    plan = solve(shapes, counts["all"], fraction, channel_multiple=channel_multiple,
                 prune_attention=prune_attention, of_params=counts[fraction_of])
    return Target(family, indices, num_layers, plan, counts)
