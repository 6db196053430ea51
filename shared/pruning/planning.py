"""From a model folder to a pruning plan, reading only its config (the weights stay on disk).

    target = plan_from_config(resolve_model("smollm2-135m"), "smollm2-135m", layers=None, fraction=0.35)
    target.plan.achieved_fraction, target.layers

The architecture check, the layer range and the solver all run here, so a model that cannot be pruned as asked is
refused before any worker starts or any weight is read. Parameter counts come from the model built on the meta
device, so they are exact (biases, tied embeddings) without allocating memory.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def plan_from_config(path: str, ref: str, *, layers: list[int] | Literal["all"] | None, fraction: float,
                     channel_multiple: int = 8, prune_attention: bool = True) -> Target:
    config = read_config(path, ref)
    family = check_architecture(config, ref)
    num_layers = len(config_widths(config))
    indices = resolve_layers(layers, num_layers)
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    plan = solve(layer_shapes(model, indices), total, fraction, channel_multiple=channel_multiple,
                 prune_attention=prune_attention)
    return Target(family, indices, num_layers, plan)
