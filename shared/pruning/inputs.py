"""What the prune workers need, read and checked on the driver before any work: the pruning plan from the model's
config, the tokenized calibration and evaluation examples. A bad input fails here with one line."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.configs.prune import PruneConfig
from shared.errors import DataError
from shared.lm_data import EncodeStats, LMExample, load_examples
from shared.models import load_tokenizer, resolve_model
from shared.pruning.planning import Target, plan_from_config


@dataclass
class Inputs:
    target: Target
    calibration: list[LMExample]
    calibration_stats: EncodeStats
    evaluation: list[LMExample]
    evaluation_stats: EncodeStats | None
    seconds: float

    def summary(self, cfg: PruneConfig) -> str:
        """The line the job prints before the workers start: what is pruned, to what size, on which data."""
        plan, target, stats = self.target.plan, self.target, self.calibration_stats
        first = plan.keep[0]
        return (f"prune {cfg.model}: {target.family}, layers {target.layers[0]}-{target.layers[-1]} of "
                f"{target.num_layers} -> keep {first.kv_groups} KV groups and {first.channels} channels each; "
                f"{plan.params_before:,} -> {plan.params_after:,} parameters ({plan.achieved_fraction:.3f} removed, "
                f"target {cfg.fraction}); importance {cfg.importance} on {stats.examples} examples / "
                f"{stats.target_tokens:,} tokens, {cfg.runtime.num_workers} worker(s)")


def prepare(cfg: PruneConfig) -> Inputs:
    """Everything the workers need, checked on the driver: a bad input fails here with one line."""
    started = time.perf_counter()
    path = resolve_model(cfg.model, cfg.storage)
    target = plan_from_config(path, cfg.model, layers=cfg.layers, fraction=cfg.fraction,
                              channel_multiple=cfg.channel_multiple, prune_attention=cfg.prune_attention,
                              fraction_of=cfg.fraction_of)
    tokenizer = load_tokenizer(cfg.model, cfg.storage)
    calibration, stats = load_examples(cfg.calibration, tokenizer, max_length=cfg.max_length,
                                       max_examples=cfg.max_examples, seed=cfg.seed, text_column=cfg.text_column,
                                       storage=cfg.storage, what="calibration")
    if stats.examples < max(cfg.min_examples, cfg.runtime.num_workers):
        skipped = ", ".join(f"{n} {reason}" for reason, n in stats.skipped.items()) or "none skipped"
        raise DataError(f"calibration {cfg.calibration}: {stats.examples} usable examples of {stats.rows} rows "
                        f"({skipped}); need at least {max(cfg.min_examples, cfg.runtime.num_workers)} (min_examples)")
    evaluation: list[LMExample] = []
    eval_stats = None
    if cfg.eval_data:
        evaluation, eval_stats = load_examples(cfg.eval_data, tokenizer, max_length=cfg.max_length,
                                               max_examples=cfg.eval_max_examples, seed=cfg.seed,
                                               text_column=cfg.text_column, storage=cfg.storage, what="eval_data")
        if not evaluation:
            raise DataError(f"eval_data {cfg.eval_data}: no usable example of {eval_stats.rows} rows "
                            f"(skipped: {eval_stats.skipped})")
    return Inputs(target, calibration, stats, evaluation, eval_stats, time.perf_counter() - started)
