"""Hidden states at one layer of a decoder-only LM, and the coordinates of that layer worth keeping.

The model is cut after layer ``l`` (later layers and the final norm are dropped), so a forward pass costs only the
layers it needs. Coordinate selectors score each of the ``H`` hidden coordinates on a reference sample:

- ``jvp``: sensitivity to the input embeddings, s_j = ||d a_j / d e(x)||, estimated with Rademacher probes v:
  E[(J v)_j^2] = sum over inputs of J_j^2, so s_j ~ sqrt(mean over probes of (J v)_j^2), averaged over tokens;
- ``magnitude``: mean |a_j|; ``variance``: variance of a_j over tokens; ``all``: every coordinate.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.func import jvp

from shared.errors import ModelError

Selector = Literal["jvp", "magnitude", "variance", "all"]


def default_layer(num_layers: int) -> int:
    """About three quarters of the depth (0-based index of the layer whose output is read): 22 of 30, 4 of 6."""
    return max(0, min(num_layers - 1, int(0.75 * num_layers)))


def truncate_to_layer(model: Any, layer: int) -> nn.Module:
    """The decoder of a causal LM, keeping layers 0..layer and dropping the final norm; its ``last_hidden_state`` is
    the residual stream after ``layer``. Works on LLaMA-family models (``model.model.layers`` /
    ``model.model.norm``)."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ModelError(f"{type(model).__name__}: expected a LLaMA-family causal LM (model.layers, model.norm)")
    n = len(base.layers)
    if not 0 <= layer < n:
        raise ModelError(f"layer {layer} is out of range: the model has layers 0..{n - 1}")
    base.layers = nn.ModuleList(list(base.layers)[: layer + 1])
    base.norm = nn.Identity()
    base.config.num_hidden_layers = layer + 1
    return base.eval()


def hidden_states(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] residual stream after the last kept layer."""
    return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def token_mask(attention_mask: torch.Tensor, skip_first: bool) -> torch.Tensor:
    """Tokens that count: not padding and (optionally) not the first position, whose activations are outsized
    (the attention sink) and say nothing about the document."""
    mask = attention_mask.bool().clone()
    if skip_first:
        first = mask.float().argmax(dim=1)  # left or right padding: the first real token
        mask[torch.arange(mask.shape[0]), first] = False
    return mask


def jvp_sensitivity(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, probes: int,
                    generator: torch.Generator, skip_first: bool = True) -> torch.Tensor:
    """[H] mean over counted tokens of sqrt(mean over probes of (J v)^2), J = d(hidden after layer)/d(embeddings).

    Forward-mode AD needs eager attention (SDPA has no forward derivative on CPU); it is switched for the call.
    """
    embed = base.get_input_embeddings()
    config = base.config
    saved = getattr(config, "_attn_implementation", None)
    config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            embeds = embed(input_ids).float()
        embeds = embeds.to(next(base.parameters()).dtype)
        # all probes in one call: the batch is repeated once per probe, so forward-mode AD runs batched
        batch = embeds.shape[0]
        repeated = embeds.repeat(probes, 1, 1)
        mask = attention_mask.repeat(probes, 1)

        def forward(e: torch.Tensor) -> torch.Tensor:
            return base(inputs_embeds=e, attention_mask=mask, use_cache=False).last_hidden_state

        v = (torch.randint(0, 2, repeated.shape, generator=generator) * 2 - 1).to(embeds.device, embeds.dtype)
        _, jv = jvp(forward, (repeated,), (v,))
        squares = (jv.detach().float() ** 2).reshape(probes, batch, *jv.shape[1:]).mean(dim=0).cpu()
    finally:
        config._attn_implementation = saved
    per_token = squares.sqrt()  # [B, T, H]
    mask = token_mask(attention_mask.cpu(), skip_first)
    return per_token[mask].mean(dim=0)


def select_coordinates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest-scoring coordinates, ascending (so the SAE input order is stable)."""
    if not 0 < k <= scores.numel():
        raise ModelError(f"coordinates.k={k}: must be between 1 and the hidden size {scores.numel()}")
    return torch.topk(scores, k).indices.sort().values


def statistic_scores(activations: torch.Tensor, selector: Selector) -> torch.Tensor:
    """[H] scores from [N, H] token activations for the magnitude / variance / all selectors."""
    if selector == "magnitude":
        return activations.abs().mean(dim=0)
    if selector == "variance":
        return activations.var(dim=0)
    if selector == "all":
        return torch.ones(activations.shape[1])
    raise ValueError(f"selector {selector!r} is not computed from activations")
