"""The prune stage's steps on one worker, in plain torch: the importance pass over a calibration shard (resumable at
any micro-batch), prune-and-verify, and save-and-check.

- :class:`ImportancePass` holds the model with its gradient hooks attached; :meth:`ImportancePass.run` yields after
  every micro-batch, so the caller can report progress and checkpoint :meth:`ImportancePass.progress` (the
  accumulated buffers and loss: sums over micro-batches, so a pass resumed from any step ends with the same sums);
- :func:`prune_and_verify` keeps the best groups, rebuilds the model at its new widths and checks the parameter count
  against the plan;
- :func:`save_checked` writes the pruned model with ``save_pretrained``, reloads it with ``from_pretrained`` and
  refuses to hand it on unless the logits match; :func:`save_and_upload` then puts it under the stage's ``model/``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.lm_data import LMExample, batches, collate
from shared.perplexity import LossSum, batch_nll
from shared.pruning.groups import PrunableLayer, layer_module_widths
from shared.pruning.importance import GRADIENT_METHODS, Method, Scores, TaylorAccumulator, gradient_pass
from shared.pruning.solver import Plan
from shared.pruning.surgery import Keep, prune_model, select
from shared.storage import Storage

RELOAD_TOLERANCE = 1e-4
"""Largest logit difference accepted between the in-memory pruned model and its reloaded copy."""


@dataclass
class ImportanceProgress:
    """Where one worker's importance pass stands: micro-batches done, accumulated buffers, loss so far."""

    step: int = 0
    buffers: torch.Tensor | None = None
    loss: LossSum = field(default_factory=LossSum)

    def state(self) -> dict[str, Any]:
        """For a checkpoint (tensors and plain values only)."""
        return {"step": self.step, "buffers": None if self.buffers is None else self.buffers.cpu(),
                "nll": self.loss.nll, "tokens": self.loss.tokens}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ImportanceProgress:
        return cls(int(state["step"]), state["buffers"], LossSum(float(state["nll"]), int(state["tokens"])))


class ImportancePass:
    """One worker's gradient importance over its calibration shard (``method`` in GRADIENT_METHODS).

    Use as a context manager (hooks on, activation checkpointing on), iterate :meth:`run`, then read
    :meth:`flat` (to sum over workers) and :meth:`scores`.
    """

    def __init__(self, model: Any, layers: list[PrunableLayer], method: Method, *, micro_batch: int, pad_id: int,
                 scale: float, activation_checkpointing: bool = True):
        if method not in GRADIENT_METHODS:
            raise ValueError(f"{method} needs no gradients; use static_scores")
        self.model, self.micro_batch, self.pad_id, self.scale = model, micro_batch, pad_id, scale
        self.accumulator = TaylorAccumulator(model, layers, method)
        self._gradients = gradient_pass(model, activation_checkpointing)
        self.loss = LossSum()
        self.step = 0

    def __enter__(self) -> ImportancePass:
        self._gradients.__enter__()
        self.accumulator.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.accumulator.detach()
        self._gradients.__exit__(*exc)

    def steps(self, examples: Sequence[LMExample]) -> int:
        return -(-len(examples) // self.micro_batch)

    def resume(self, progress: ImportanceProgress) -> None:
        """Continue from a checkpointed :class:`ImportanceProgress` of the same shard."""
        if progress.buffers is not None:
            self.accumulator.load_flat(progress.buffers.to(self.accumulator.flat().device))
        self.loss, self.step = progress.loss, progress.step

    def progress(self) -> ImportanceProgress:
        return ImportanceProgress(self.step, self.accumulator.flat().detach().clone(), self.loss)

    def run(self, examples: Sequence[LMExample]) -> Iterator[tuple[int, int]]:
        """Forward and backward over the micro-batches not yet done; yields (step, tokens) after each."""
        for i, batch in enumerate(batches(examples, self.micro_batch, self.pad_id)):
            if i < self.step:
                continue
            nll, tokens = batch_nll(self.model, batch)
            (nll * self.scale).backward()  # hooks fold each weight's gradient into group scores and free it
            self.loss = self.loss + LossSum(float(nll.detach()), tokens)
            self.step = i + 1
            yield self.step, tokens

    def flat(self) -> torch.Tensor:
        return self.accumulator.flat()

    def load_flat(self, flat: torch.Tensor) -> None:
        self.accumulator.load_flat(flat)

    def scores(self) -> Scores:
        return self.accumulator.scores()


@dataclass
class Pruned:
    model: Any
    keep: Keep
    per_layer: list[dict[str, Any]]
    """Per pruned layer: groups and channels before/after, which KV groups stayed, their scores."""
    widths: list[dict[str, int]]
    """Per decoder layer: heads, KV heads and MLP channels before and after."""
    parameters: int


def prune_and_verify(model: Any, layers: list[PrunableLayer], scores: Scores, plan: Plan) -> Pruned:
    """Keep the best-scored groups of every layer (the same on every worker, given the same summed scores) and
    rebuild the model at the new widths; a parameter count other than the plan's is an error."""
    keep = select(scores, plan)
    per_layer = layer_table(layers, keep, scores)
    before = layer_module_widths(model)
    pruned = prune_model(model, keep).eval()
    parameters = sum(p.numel() for p in pruned.parameters())
    if parameters != plan.params_after:
        raise RuntimeError(f"pruned model has {parameters:,} parameters, the plan said {plan.params_after:,}")
    widths = [{"layer": i, "heads_before": a.heads, "heads_after": b.heads, "kv_heads_before": a.kv_heads,
               "kv_heads_after": b.kv_heads, "channels_before": a.intermediate, "channels_after": b.intermediate}
              for i, (a, b) in enumerate(zip(before, layer_module_widths(pruned)))]
    return Pruned(pruned, keep, per_layer, widths, parameters)


def layer_table(layers: list[PrunableLayer], keep: Keep, scores: Scores) -> list[dict[str, Any]]:
    rows = []
    for layer in layers:
        kept = keep[layer.index]
        groups = len(kept["attention"])
        mlp = scores[layer.index]["mlp"]
        rows.append({
            "layer": layer.index,
            "kv_groups_before": layer.kv_groups, "kv_groups_after": groups,
            "heads_before": layer.kv_groups * layer.heads_per_group, "heads_after": groups * layer.heads_per_group,
            "channels_before": layer.channels, "channels_after": len(kept["mlp"]),
            "kept_kv_groups": kept["attention"].tolist(),
            "attention_scores": [float(s) for s in scores[layer.index]["attention"]],
            "mlp_score_kept_share": float(mlp[kept["mlp"]].sum() / max(float(mlp.sum()), 1e-300)),
        })
    return rows


@dataclass
class SavedModel:
    folder: str
    """Local folder holding the saved model and tokenizer (valid inside :func:`save_checked`'s ``use``)."""
    format: str
    """standard (one width for every layer) or per_layer (scopeforge's pruned config)."""
    cls: str
    reload_max_logit_difference: float
    reloaded: Any

    def describe(self, uri: str) -> dict[str, Any]:
        """The ``output`` entry of the stage's metrics, for the model uploaded to ``uri``."""
        loading = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True), or without it once "
                   "scopeforge's shared.pruning.modeling_scopeforge_pruned is imported" if self.format == "per_layer"
                   else "AutoModelForCausalLM.from_pretrained(path)")
        return {"uri": uri, "format": self.format, "class": self.cls, "loading": loading,
                "reload_max_logit_difference": self.reload_max_logit_difference}


def save_checked(pruned: Any, tokenizer: Any, examples: Sequence[LMExample], pad_id: int,
                 use: Callable[[SavedModel], Any]) -> Any:
    """Save ``pruned`` with its tokenizer to a temporary folder, reload it and compare logits on ``examples``;
    ``use(saved)`` (an upload, a sample) runs only when they match, and its result is returned."""
    from transformers import AutoModelForCausalLM

    import shared.pruning.modeling_scopeforge_pruned  # noqa: F401  (registers the per-layer pruned config)

    per_layer_widths = bool(getattr(pruned.config, "layer_widths", None))
    with tempfile.TemporaryDirectory(prefix="scopeforge-prune-") as tmp:
        pruned.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
        batch = collate(list(examples), pad_id)
        with torch.no_grad():
            args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            device = next(pruned.parameters()).device
            a = pruned(**{k: v.to(device) for k, v in args.items()}).logits.cpu()
            b = reloaded(**args).logits
        difference = float((a - b).abs().max())
        if not difference <= RELOAD_TOLERANCE:
            raise RuntimeError(f"the saved model does not reproduce the pruned model (max logit difference "
                               f"{difference:.2e}); nothing was uploaded")
        return use(SavedModel(tmp, "per_layer" if per_layer_widths else "standard", type(reloaded).__name__,
                              difference, reloaded))



def save_and_upload(pruned: Any, tokenizer: Any, examples: Sequence[LMExample], pad_id: int, store: Storage,
                    sample_prompt: str | None, sample_tokens: int, say: Callable[[str], None]) -> dict[str, Any]:
    """:func:`save_checked`, then the checked folder uploaded to ``<store>/model`` (replacing any earlier one);
    returns the metrics' ``output`` entry, with the reloaded model's answer to ``sample_prompt``."""

    def upload(saved: SavedModel) -> dict[str, Any]:
        sample = greedy_sample(saved.reloaded, tokenizer, sample_prompt, sample_tokens)
        say(f"saved and reloaded ({saved.cls}, max logit difference {saved.reload_max_logit_difference:.1e}); "
            "uploading")
        store.rm("model")
        return {**saved.describe(store.upload(saved.folder, "model")), "sample_prompt": sample_prompt or None,
                "sample_after": sample}

    return save_checked(pruned, tokenizer, examples, pad_id, upload)


def greedy_sample(model: Any, tokenizer: Any, prompt: str | None, tokens: int) -> str | None:
    """A greedy answer to ``prompt`` (None without a prompt), shown before and after pruning."""
    from shared.generation import chat_prompt, generate_text

    if not prompt:
        return None
    return generate_text(model, tokenizer, [chat_prompt(tokenizer, prompt)], max_new_tokens=tokens)[0]
