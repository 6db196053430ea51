"""prune: structured pruning of a LLaMA-family model, calibrated on domain data, as a Ray Train job.

    scopeforge run prune --set calibration=runs/finescope/curate --set fraction=0.35
    scopeforge run prune --set model=tiny-llama --set calibration=calib.parquet --set runtime.num_workers=2 \
        --set runtime.cpus_per_worker=1

1. Driver: read the model's config, check the architecture, solve how many KV groups and channels each pruned layer
   keeps, read and tokenize the calibration (and evaluation) data; every input problem stops here, before any work.
2. Workers (TorchTrainer, shared.pruning.step): each loads the model and runs the importance pass over its shard
   of the calibration set, checkpointing its sums every ``runtime.checkpoint_every`` micro-batches (a retried or
   rerun pass resumes there); one all_reduce sums the shards. Every worker then prunes identically and evaluates its
   shard before/after; rank 0 saves the model, reloads it to check the logits, and uploads it to <stage>/model/.
3. Driver: metrics.json (via the stage commit) and report.html with the per-layer widths (shared.pruning.report).

Longer than the other adapters: the worker sequences the steps across a process group (collective checkpoint
reports, all_reduce of the sums and losses, a barrier before rank 0 returns), which is Ray glue.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train

from ray_jobs.train_launch import StageRef, fit_workers
from shared.configs.prune import PruneConfig
from shared.lm_data import LMExample
from shared.pruning.inputs import Inputs, prepare
from shared.pruning.report import loss_results, prune_metrics, summary_line, write_report
from shared.pruning.solver import Plan
from shared.stage import Stage


@dataclass(frozen=True)
class PruneWork:
    """What every importance worker gets."""

    cfg: PruneConfig
    stage: StageRef
    plan: Plan
    """How many KV groups and channels each pruned layer keeps (solved on the driver)."""
    layers: list[int]
    calibration: list[LMExample]
    evaluation: list[LMExample]
    calibration_tokens: int
    """Target tokens of the whole calibration set: the importance sums are gradients of its mean loss."""


_checked: dict[str, Inputs] = {}
"""Inputs prepared by ``check`` (before Ray starts), handed to ``run`` of the same config."""


def check(cfg: PruneConfig) -> None:
    """Called by the runtime before the stage opens and Ray starts: refuse bad inputs with one line."""
    _checked[cfg.model_dump_json()] = prepare(cfg)


def run(cfg: PruneConfig, stage: Stage) -> dict[str, Any]:
    started = time.perf_counter()
    inputs = _checked.pop(cfg.model_dump_json(), None) or prepare(cfg)
    print(inputs.summary(cfg), flush=True)

    work = PruneWork(cfg, StageRef.of(stage), inputs.target.plan, inputs.target.layers, inputs.calibration,
                     inputs.evaluation, inputs.calibration_stats.target_tokens)
    result = fit_workers(_worker, work, stage, cfg.runtime, role="importance worker", run_name="prune")
    metrics = prune_metrics(cfg, inputs, result.return_value, round(time.perf_counter() - started, 1))
    stage.outputs["model"] = "model"
    write_report(cfg.model, metrics, stage.store)
    print(summary_line(metrics, stage.store.uri("model")), flush=True)
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# The worker


def _worker(work: PruneWork) -> dict[str, Any] | None:
    import torch
    import torch.distributed as dist

    import shared.pruning.modeling_scopeforge_pruned  # noqa: F401  (a per-layer pruned input model loads too)
    from ray_jobs.metrics import Throughput, TrainingProgress
    from ray_jobs.placement import claim
    from shared.lm_data import shard
    from shared.models import load_causal_lm
    from shared.perplexity import LossSum, evaluate_loss
    from shared.pruning.groups import prunable_layers
    from shared.pruning.importance import GRADIENT_METHODS, static_scores
    from shared.pruning.step import greedy_sample, prune_and_verify, save_and_upload
    from shared.storage import Storage

    cfg = work.cfg
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    placement = claim(work.stage.name, "importance worker", 1.0 if cfg.runtime.use_gpu else 0.0, train=True)
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    say = _say(rank, world)

    def total(part: LossSum) -> LossSum:
        """Summed over workers (float64)."""
        tensor = torch.tensor([part.nll, float(part.tokens)], dtype=torch.float64, device=placement.device)
        if distributed:
            dist.all_reduce(tensor)
        return LossSum(float(tensor[0]), int(round(float(tensor[1]))))

    def loss(model: Any, examples: list[LMExample], what: str) -> LossSum:
        def line(i: int, n: int, so_far: LossSum) -> None:
            if i == n or i % max(1, n // 4) == 0:
                say(f"{what} {i}/{n}: loss {so_far.mean:.3f} over {so_far.tokens:,} tokens")
        return total(evaluate_loss(model, examples, batch_size=cfg.micro_batch_size, pad_id=pad, on_batch=line))

    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    model, tokenizer = load_causal_lm(cfg.model, storage=cfg.storage, device=placement.device)
    pad = tokenizer.pad_token_id
    layers = prunable_layers(model, work.layers)
    calibration = shard(work.calibration, rank, world)
    evaluation = shard(work.evaluation, rank, world)
    timings["load"], cpu["load"] = time.perf_counter() - t0, time.process_time() - c0

    # 1. importance over this worker's shard; the loss before pruning comes with it
    t0, c0 = time.perf_counter(), time.process_time()
    if cfg.importance in GRADIENT_METHODS:
        scores, part, resumed = _importance(work, model, layers, calibration, pad, rank, world, distributed, say,
                                   Throughput("prune", work.stage.name, ("tokens",)),
                                   TrainingProgress("prune", work.stage.name) if rank == 0 else None)
        loss_before = total(part)
    else:
        scores, resumed = static_scores(layers, cfg.importance, cfg.seed), 0
        loss_before = loss(model, calibration, "calibration loss before")
    timings["importance"], cpu["importance"] = time.perf_counter() - t0, time.process_time() - c0

    # 2. every worker prunes the same way (same summed scores), so evaluation can stay sharded
    t0, c0 = time.perf_counter(), time.process_time()
    eval_before = loss(model, evaluation, "domain loss before")
    sample_before = greedy_sample(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens) if rank == 0 else None
    pruned = prune_and_verify(model, layers, scores, work.plan)
    del model, layers
    loss_after = loss(pruned.model, calibration, "calibration loss after")
    eval_after = loss(pruned.model, evaluation, "domain loss after")
    timings["prune_and_evaluate"], cpu["prune_and_evaluate"] = time.perf_counter() - t0, time.process_time() - c0

    # 3. rank 0 writes the model, after checking that what it wrote reloads to the same logits
    output = None
    if rank == 0:
        t0, c0 = time.perf_counter(), time.process_time()
        output = save_and_upload(pruned.model, tokenizer, calibration[: cfg.micro_batch_size], pad,
                                 Storage(work.stage.attempt_uri, cfg.storage), cfg.sample_prompt, cfg.sample_tokens,
                                 say)
        output["sample_before"] = sample_before
        timings["save"], cpu["save"] = time.perf_counter() - t0, time.process_time() - c0
    if distributed:
        dist.barrier()
    if rank != 0:
        return None
    results = {**loss_results(loss_before, loss_after, eval_before, eval_after), "importance_resumed_after": resumed}
    return {"parameters_after": pruned.parameters, "results": results, "per_layer": pruned.per_layer,
            "widths": pruned.widths, "output": output,
            "timings_s": {k: round(v, 2) for k, v in timings.items()}, "torch_threads": placement.threads,
            "worker_cpu_s": {k: round(v, 2) for k, v in cpu.items()}}


def _importance(work: PruneWork, model: Any, layers: list[Any], calibration: list[LMExample], pad: int,
                rank: int, world: int, distributed: bool, say: Any, throughput: Any, progress: Any
                ) -> tuple[Any, Any, int]:
    """The gradient importance pass, checkpointed every ``runtime.checkpoint_every`` micro-batches that every worker
    takes (ray.train.report is collective; each rank writes its own rank-<r>/ folder of the checkpoint).
    Returns the summed scores, this worker's loss and the micro-batch it resumed after (0: from the start)."""
    import torch.distributed as dist

    from ray_jobs.train_launch import report_state, restore_state
    from shared.lm_data import shard
    from shared.pruning.step import ImportancePass, ImportanceProgress

    cfg = work.cfg
    fingerprint = {"config": work.stage.config_hash, "workers": world}
    common = min(-(-len(shard(work.calibration, r, world)) // cfg.micro_batch_size) for r in range(world))
    started = time.perf_counter()
    with ImportancePass(model, layers, cfg.importance, micro_batch=cfg.micro_batch_size, pad_id=pad,
                        scale=1.0 / work.calibration_tokens,  # gradients of the mean loss over the whole set
                        activation_checkpointing=cfg.activation_checkpointing) as importance:
        steps = importance.steps(calibration)
        state = restore_state(fingerprint, "prune importance", rank=rank)
        if state is not None:
            importance.resume(ImportanceProgress.from_state(state))
            say(f"importance resumes after micro-batch {importance.step}/{steps}")
        elif ray.train.get_checkpoint() is not None:
            say(f"the importance checkpoint was written by another number of workers than {world}: starting over")
        resumed = importance.step
        for step, tokens in importance.run(calibration):
            throughput.add(tokens=tokens)
            if progress is not None:
                progress.report(importance.loss.mean, step / steps)
            say(f"importance {step}/{steps}: loss {importance.loss.mean:.3f} over {importance.loss.tokens:,} tokens, "
                f"{time.perf_counter() - started:.1f} s")
            if step % cfg.runtime.checkpoint_every == 0 and step <= common:
                report_state({"importance_step": step}, importance.progress().state(), fingerprint, rank=rank,
                             per_rank=True)
        flat = importance.flat()
        if distributed:
            dist.all_reduce(flat)
        importance.load_flat(flat)
        return importance.scores(), importance.loss, resumed


def _say(rank: int, world: int) -> Any:
    def say(message: str) -> None:
        # straight to stdout: Ray Train's patched print() shows each line twice when stdout is redirected
        sys.stdout.write(f"[prune {rank + 1}/{world}] {message}\n")
        sys.stdout.flush()
    return say
