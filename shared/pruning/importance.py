"""Per-group importance: how much the calibration loss would suffer if a KV group or an MLP channel went.

Methods (LLM-Pruner's names; W a weight, g = dL/dW on one micro-batch, summed over micro-batches):

- ``param_first``: first-order Taylor, per weight: sum over the group's weights of |W * g|;
- ``vectorize``: first-order Taylor, per vector: for each row (or column) of the group, |sum of W * g| over it,
  with the signed sums accumulated over every micro-batch before the absolute value is taken (exact for the whole
  calibration set);
- ``param_second``: the diagonal-Fisher second-order term, sum over the group's weights of 0.5 * W^2 * sum(g^2)
  (the Fisher estimated from micro-batch gradients; per example with micro-batches of one);
- ``magnitude``: the L2 norm of the group's weights (no data needed);
- ``random``: uniform noise from a seed (a floor to compare against).

The gradient methods never keep a model-sized gradient: each weight's gradient is folded into small per-row or
per-column buffers the moment backward produces it (a post-accumulate-grad hook) and freed at once; only the
projections of the layers being pruned take gradients at all. The buffers are flat tensors, so workers sum them with
one all_reduce before scores are read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

from shared.pruning.groups import PrunableLayer

Method = Literal["param_first", "vectorize", "param_second", "magnitude", "random"]
METHODS: tuple[str, ...] = ("param_first", "vectorize", "param_second", "magnitude", "random")
GRADIENT_METHODS = frozenset({"param_first", "vectorize", "param_second"})

Scores = dict[int, dict[str, torch.Tensor]]
"""layer index -> {"attention": score per KV group, "mlp": score per channel} (float64, on the CPU)."""


def _vectors(param: torch.Tensor, axis: int) -> int:
    return param.shape[0] if axis == 0 or param.dim() == 1 else param.shape[1]


def _per_vector(values: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum a weight-shaped tensor over the dimension that is not grouped (a bias is already per vector)."""
    if values.dim() == 1:
        return values
    return values.sum(dim=1) if axis == 0 else values.sum(dim=0)


class TaylorAccumulator:
    """Accumulates one gradient method's per-vector terms over backward passes; see the module docstring."""

    def __init__(self, model: Any, layers: list[PrunableLayer], method: Method):
        if method not in GRADIENT_METHODS:
            raise ValueError(f"{method} needs no gradients; use static_scores")
        self.method = method
        self.layers = layers
        self.members = [(layer.index, kind, param, axis, per_group)
                        for layer in layers for kind, param, axis, per_group in layer.members()]
        self.buffers = [torch.zeros(_vectors(p, axis), dtype=torch.float64, device=p.device)
                        for _, _, p, axis, _ in self.members]
        self._handles: list[Any] = []
        self._model = model
        self._saved_requires_grad: list[tuple[torch.nn.Parameter, bool]] = []

    # --- hooks ------------------------------------------------------------------------------------------------------
    def attach(self) -> TaylorAccumulator:
        """Freeze every parameter but the grouped projections, and fold their gradients in as they arrive."""
        self._saved_requires_grad = [(p, p.requires_grad) for p in self._model.parameters()]
        for p in self._model.parameters():
            p.requires_grad_(False)
        for slot, (_, _, param, axis, _) in enumerate(self.members):
            param.requires_grad_(True)
            self._handles.append(param.register_post_accumulate_grad_hook(self._hook(slot, axis)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
            p.grad = None

    def __enter__(self) -> TaylorAccumulator:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _hook(self, slot: int, axis: int):
        method = self.method
        buffer = self.buffers[slot]

        def fold(param: torch.Tensor) -> None:
            with torch.no_grad():
                product = param.detach().float() * param.grad.float()
                if method == "param_first":
                    term = _per_vector(product.abs(), axis)
                elif method == "vectorize":
                    term = _per_vector(product, axis)  # signed; |.| once all micro-batches are in
                else:  # param_second: 0.5 * W^2 * g^2
                    term = _per_vector(0.5 * product.square(), axis)
                buffer.add_(term.double())
            param.grad = None

        return fold

    # --- results ----------------------------------------------------------------------------------------------------
    def flat(self) -> torch.Tensor:
        """Every buffer in one vector, on the model's device (for ``all_reduce``)."""
        return torch.cat(self.buffers)

    def load_flat(self, flat: torch.Tensor) -> None:
        offset = 0
        for buffer in self.buffers:
            buffer.copy_(flat[offset:offset + buffer.numel()])
            offset += buffer.numel()

    def scores(self) -> Scores:
        out: Scores = {layer.index: {"attention": torch.zeros(layer.kv_groups, dtype=torch.float64),
                                     "mlp": torch.zeros(layer.channels, dtype=torch.float64)} for layer in self.layers}
        for (index, kind, _, _, per_group), buffer in zip(self.members, self.buffers):
            per_vector = buffer.abs() if self.method == "vectorize" else buffer
            out[index][kind] += per_vector.view(-1, per_group).sum(dim=1).cpu()
        return out


@torch.no_grad()
def static_scores(layers: list[PrunableLayer], method: Method, seed: int = 0) -> Scores:
    """Scores that need no data: ``magnitude`` (L2 norm of each group's weights) or ``random``."""
    out: Scores = {}
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        for layer in layers:
            out[layer.index] = {"attention": torch.rand(layer.kv_groups, generator=generator, dtype=torch.float64),
                                "mlp": torch.rand(layer.channels, generator=generator, dtype=torch.float64)}
        return out
    if method != "magnitude":
        raise ValueError(f"{method} needs gradients; use TaylorAccumulator")
    for layer in layers:
        sums = {"attention": torch.zeros(layer.kv_groups, dtype=torch.float64),
                "mlp": torch.zeros(layer.channels, dtype=torch.float64)}
        for kind, param, axis, per_group in layer.members():
            sums[kind] += _per_vector(param.detach().double().square(), axis).view(-1, per_group).sum(dim=1).cpu()
        out[layer.index] = {kind: total.sqrt() for kind, total in sums.items()}
    return out


@contextlib.contextmanager
def gradient_pass(model: Any, checkpointing: bool = True) -> Iterator[None]:
    """The model set up for importance backward passes: activation checkpointing on the decoder layers (which only
    checkpoint in training mode) while every other module stays in eval mode, so no dropout changes the loss."""
    was_training = model.training
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    for layer in model.model.layers:
        layer.training = True  # the layer's own flag only: its attention and MLP stay in eval mode
    try:
        yield
    finally:
        if checkpointing:
            model.activation_checkpointing_disable()
        model.train(was_training)
