"""prune: structured pruning of a LLaMA-family model, calibrated on domain data, as a Ray Train job.

    scopeforge run prune --set calibration=runs/finescope/curate --set fraction=0.35
    scopeforge run prune --set model=tiny-llama --set calibration=calib.parquet --set runtime.num_workers=2 \
        --set cpus_per_worker=1

1. Driver: read the model's config, check the architecture, solve how many KV groups and channels each pruned layer
   keeps, read and tokenise the calibration (and evaluation) data; every input problem stops here, before any work.
2. Workers (TorchTrainer): each loads the model and runs forward/backward over its shard of the calibration set,
   folding gradients into per-group importance as backward produces them; one all_reduce sums the shards. Every
   worker then prunes identically and evaluates its shard before/after; rank 0 saves the model, reloads it with
   ``from_pretrained`` to check the logits, and uploads it to <stage>/model/.
3. Driver: metrics.json (via the stage commit) and report.html with the per-layer widths.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train

from ray_jobs.train_launch import fit_workers
from shared.configs.prune import PruneConfig
from shared.errors import DataError
from shared.lm_data import EncodeStats, LMExample, load_examples
from shared.models import load_tokenizer, resolve_model
from shared.pruning.planning import Target, plan_from_config
from shared.report import Report
from shared.stage import Stage
from shared.storage import Storage

RELOAD_TOLERANCE = 1e-4
"""Largest logit difference accepted between the in-memory pruned model and its reloaded copy."""


@dataclass
class Inputs:
    target: Target
    calibration: list[LMExample]
    calibration_stats: EncodeStats
    evaluation: list[LMExample]
    evaluation_stats: EncodeStats | None
    seconds: float


def prepare(cfg: PruneConfig) -> Inputs:
    """Everything the workers need, checked on the driver: a bad input fails here with one line."""
    started = time.perf_counter()
    path = resolve_model(cfg.model, cfg.storage)
    target = plan_from_config(path, cfg.model, layers=cfg.layers, fraction=cfg.fraction,
                              channel_multiple=cfg.channel_multiple, prune_attention=cfg.prune_attention)
    tokenizer = load_tokenizer(cfg.model, cfg.storage)
    calibration, stats = load_examples(cfg.calibration, tokenizer, max_length=cfg.max_length,
                                       max_examples=cfg.max_examples, seed=cfg.seed, text_column=cfg.text_column,
                                       options=cfg.storage, what="calibration")
    if stats.examples < max(cfg.min_examples, cfg.runtime.num_workers):
        skipped = ", ".join(f"{n} {reason}" for reason, n in stats.skipped.items()) or "none skipped"
        raise DataError(f"calibration {cfg.calibration}: {stats.examples} usable examples of {stats.rows} rows "
                        f"({skipped}); need at least {max(cfg.min_examples, cfg.runtime.num_workers)} (min_examples)")
    evaluation: list[LMExample] = []
    eval_stats = None
    if cfg.eval_data:
        evaluation, eval_stats = load_examples(cfg.eval_data, tokenizer, max_length=cfg.max_length,
                                               max_examples=cfg.eval_max_examples, seed=cfg.seed,
                                               text_column=cfg.text_column, options=cfg.storage, what="eval_data")
        if not evaluation:
            raise DataError(f"eval_data {cfg.eval_data}: no usable example of {eval_stats.rows} rows "
                            f"(skipped: {eval_stats.skipped})")
    return Inputs(target, calibration, stats, evaluation, eval_stats, time.perf_counter() - started)


_checked: dict[str, Inputs] = {}
"""Inputs prepared by ``check`` (before Ray starts), handed to ``run`` of the same config."""


def check(cfg: PruneConfig) -> None:
    """Called by the runtime before the stage opens and Ray starts: refuse bad inputs with one line."""
    _checked[cfg.model_dump_json()] = prepare(cfg)


def run(cfg: PruneConfig, stage: Stage) -> dict[str, Any]:
    started = time.perf_counter()
    inputs = _checked.pop(cfg.model_dump_json(), None) or prepare(cfg)
    plan = inputs.target.plan
    first = plan.keep[0]
    print(f"prune {cfg.model}: {inputs.target.family}, layers {inputs.target.layers[0]}-{inputs.target.layers[-1]} of "
          f"{inputs.target.num_layers} -> keep {first.kv_groups} KV groups and {first.channels} channels each; "
          f"{plan.params_before:,} -> {plan.params_after:,} parameters ({plan.achieved_fraction:.3f} removed, "
          f"target {cfg.fraction}); importance {cfg.importance} on {inputs.calibration_stats.examples} examples / "
          f"{inputs.calibration_stats.target_tokens:,} tokens, {cfg.runtime.num_workers} worker(s)", flush=True)

    config = {"cfg": cfg, "stage_name": stage.name, "attempt_uri": stage.store.uri(), "plan": plan,
              "layers": inputs.target.layers, "calibration": [e.to_dict() for e in inputs.calibration],
              "evaluation": [e.to_dict() for e in inputs.evaluation],
              "calibration_tokens": inputs.calibration_stats.target_tokens}
    result = fit_workers(_worker, config, stage, cfg.runtime, role="importance worker", run_name="prune",
                         resumable=False)
    worker: dict[str, Any] = result.return_value
    stage.store.rm("ray_train")  # Ray Train left only its storage probe there

    metrics: dict[str, Any] = {
        "model": cfg.model, "family": inputs.target.family,
        "calibration_source": cfg.calibration, "calibration": inputs.calibration_stats.to_dict(),
        "importance_method": cfg.importance,
        "target_fraction": cfg.fraction, "achieved_fraction": round(plan.achieved_fraction, 6),
        "parameters_before": plan.params_before, "parameters_after": worker["parameters_after"],
        "layers_pruned": inputs.target.layers, **worker["results"],
        "eval_data": cfg.eval_data,
        "evaluation": inputs.evaluation_stats.to_dict() if inputs.evaluation_stats else None,
        "per_layer": worker["per_layer"], "layer_widths": worker["widths"], "output": worker["output"],
        "timings_s": worker["timings_s"], "worker_cpu_s": worker["worker_cpu_s"],
        "torch_threads": worker["torch_threads"],
        "num_workers": cfg.runtime.num_workers, "seconds": round(time.perf_counter() - started, 1),
    }
    metrics["timings_s"].update(driver_prepare=round(inputs.seconds, 2), total=metrics["seconds"])
    stage.outputs["model"] = "model"
    write_report(cfg, metrics, stage.store)
    r = metrics
    domain = (f"; domain perplexity {r['domain_perplexity_before']:.2f} -> {r['domain_perplexity_after']:.2f}"
              if r["domain_perplexity_before"] is not None else "")
    print(f"pruned {r['parameters_before']:,} -> {r['parameters_after']:,} parameters "
          f"({r['achieved_fraction']:.3f} removed); calibration loss {r['calibration_loss_before']:.3f} -> "
          f"{r['calibration_loss_after']:.3f}{domain}; model in {stage.store.uri('model')} "
          f"({r['output']['format']} config); {r['seconds']} s", flush=True)
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# The worker


def _worker(config: dict[str, Any]) -> dict[str, Any] | None:
    import torch
    import torch.distributed as dist

    import shared.pruning.modeling_scopeforge_pruned  # noqa: F401  (a per-layer pruned input model loads too)
    from ray_jobs.metrics import Throughput, TrainingProgress
    from ray_jobs.placement import claim
    from shared.lm_data import batches, shard
    from shared.models import load_causal_lm
    from shared.perplexity import LossSum, batch_nll, evaluate_loss
    from shared.pruning.groups import layer_module_widths, prunable_layers
    from shared.pruning.importance import GRADIENT_METHODS, TaylorAccumulator, gradient_pass, static_scores
    from shared.pruning.surgery import prune_model, select

    cfg: PruneConfig = config["cfg"]
    plan = config["plan"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    placement = claim(config["stage_name"], "importance worker", 1.0 if cfg.runtime.use_gpu else 0.0, train=True)
    device = torch.device(placement.device)
    distributed = dist.is_available() and dist.is_initialized() and world > 1

    def say(message: str) -> None:
        # straight to stdout: Ray Train's patched print() shows each line twice when stdout is redirected
        sys.stdout.write(f"[prune {rank + 1}/{world}] {message}\n")
        sys.stdout.flush()

    def every_quarter(what: str):
        def report(i: int, n: int, total: LossSum) -> None:
            if i == n or i % max(1, n // 4) == 0:
                say(f"{what} {i}/{n}: loss {total.mean:.3f} over {total.tokens:,} tokens")
        return report

    def summed(values: list[float]) -> list[float]:
        """Sum over workers (float64)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def total_loss(part: LossSum) -> LossSum:
        nll, tokens = summed([part.nll, float(part.tokens)])
        return LossSum(nll, int(round(tokens)))

    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    model, tokenizer = load_causal_lm(cfg.model, options=cfg.storage, device=str(device))
    pad = tokenizer.pad_token_id
    layers = prunable_layers(model, config["layers"])
    calibration = shard([LMExample.from_dict(e) for e in config["calibration"]], rank, world)
    evaluation = shard([LMExample.from_dict(e) for e in config["evaluation"]], rank, world)
    throughput = Throughput("prune", config["stage_name"], ("tokens",))
    progress = TrainingProgress("prune", config["stage_name"]) if rank == 0 else None
    timings["load"], cpu["load"] = time.perf_counter() - t0, time.process_time() - c0

    # 1. importance over this worker's shard, one micro-batch at a time; the loss before pruning comes with it
    t0, c0 = time.perf_counter(), time.process_time()
    steps = math.ceil(len(calibration) / cfg.micro_batch_size)
    loss_before = LossSum()
    if cfg.importance in GRADIENT_METHODS:
        scale = 1.0 / config["calibration_tokens"]  # gradients of the mean loss over the whole calibration set
        with gradient_pass(model, cfg.activation_checkpointing), \
                TaylorAccumulator(model, layers, cfg.importance) as accumulator:
            for step, batch in enumerate(batches(calibration, cfg.micro_batch_size, pad), 1):
                nll, tokens = batch_nll(model, batch)
                (nll * scale).backward()  # hooks fold each weight's gradient into group scores and free it
                loss_before = loss_before + LossSum(float(nll.detach()), tokens)
                throughput.add(tokens=tokens)
                if progress is not None:
                    progress.report(loss_before.mean, step / steps)
                say(f"importance {step}/{steps}: loss {float(nll.detach()) / max(tokens, 1):.3f} on {tokens} tokens, "
                    f"{time.perf_counter() - t0:.1f} s")
            flat = accumulator.flat()
            if distributed:
                dist.all_reduce(flat)
            accumulator.load_flat(flat)
            scores = accumulator.scores()
    else:
        scores = static_scores(layers, cfg.importance, cfg.seed)
        loss_before = evaluate_loss(model, calibration, batch_size=cfg.micro_batch_size, pad_id=pad,
                                    on_batch=every_quarter("calibration loss before"))
    loss_before = total_loss(loss_before)
    timings["importance"], cpu["importance"] = time.perf_counter() - t0, time.process_time() - c0

    # 2. every worker prunes the same way (same summed scores), so evaluation can stay sharded
    t0, c0 = time.perf_counter(), time.process_time()
    eval_before = total_loss(evaluate_loss(model, evaluation, batch_size=cfg.micro_batch_size, pad_id=pad,
                                           on_batch=every_quarter("domain loss before")))
    sample_before = _sample(model, tokenizer, cfg) if rank == 0 else None
    keep = select(scores, plan)
    per_layer = _per_layer(layers, keep, scores)
    widths_before = layer_module_widths(model)
    pruned = prune_model(model, keep).eval()
    del model, layers
    parameters_after = sum(p.numel() for p in pruned.parameters())
    widths = [{"layer": i, "heads_before": a.heads, "heads_after": b.heads, "kv_heads_before": a.kv_heads,
               "kv_heads_after": b.kv_heads, "channels_before": a.intermediate, "channels_after": b.intermediate}
              for i, (a, b) in enumerate(zip(widths_before, layer_module_widths(pruned)))]
    if parameters_after != plan.params_after:
        raise RuntimeError(f"pruned model has {parameters_after:,} parameters, the plan said {plan.params_after:,}")
    loss_after = total_loss(evaluate_loss(pruned, calibration, batch_size=cfg.micro_batch_size, pad_id=pad,
                                          on_batch=every_quarter("calibration loss after")))
    eval_after = total_loss(evaluate_loss(pruned, evaluation, batch_size=cfg.micro_batch_size, pad_id=pad,
                                          on_batch=every_quarter("domain loss after")))
    timings["prune_and_evaluate"], cpu["prune_and_evaluate"] = time.perf_counter() - t0, time.process_time() - c0

    # 3. rank 0 writes the model, after checking that what it wrote reloads to the same logits
    output = None
    if rank == 0:
        t0, c0 = time.perf_counter(), time.process_time()
        store = Storage(config["attempt_uri"], cfg.storage)
        output = _save_checked(pruned, tokenizer, calibration, pad, store, cfg, say)
        output["sample_before"] = sample_before
        timings["save"], cpu["save"] = time.perf_counter() - t0, time.process_time() - c0
    if distributed:
        dist.barrier()
    if rank != 0:
        return None
    results = {
        "calibration_loss_before": loss_before.mean, "calibration_loss_after": loss_after.mean,
        "calibration_perplexity_before": loss_before.perplexity, "calibration_perplexity_after": loss_after.perplexity,
        "calibration_tokens_scored": loss_before.tokens,
        "domain_loss_before": eval_before.mean if eval_before.tokens else None,
        "domain_loss_after": eval_after.mean if eval_after.tokens else None,
        "domain_perplexity_before": eval_before.perplexity if eval_before.tokens else None,
        "domain_perplexity_after": eval_after.perplexity if eval_after.tokens else None,
        "domain_tokens": eval_before.tokens,
    }
    return {"parameters_after": parameters_after, "results": results, "per_layer": per_layer, "widths": widths,
            "output": output,
            "timings_s": {k: round(v, 2) for k, v in timings.items()}, "torch_threads": placement.threads,
            "worker_cpu_s": {k: round(v, 2) for k, v in cpu.items()}}


def _sample(model: Any, tokenizer: Any, cfg: PruneConfig) -> str | None:
    from shared.generation import chat_prompt, generate_text

    if not cfg.sample_prompt:
        return None
    return generate_text(model, tokenizer, [chat_prompt(tokenizer, cfg.sample_prompt)],
                         max_new_tokens=cfg.sample_tokens)[0]


def _save_checked(pruned: Any, tokenizer: Any, calibration: list[LMExample], pad: int, store: Storage,
                  cfg: PruneConfig, say: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from shared.lm_data import collate

    per_layer_widths = bool(getattr(pruned.config, "layer_widths", None))
    with tempfile.TemporaryDirectory(prefix="scopeforge-prune-") as tmp:
        pruned.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
        batch = collate(calibration[: cfg.micro_batch_size], pad)
        with torch.no_grad():
            args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            device = next(pruned.parameters()).device
            a = pruned(**{k: v.to(device) for k, v in args.items()}).logits.cpu()
            b = reloaded(**args).logits
        difference = float((a - b).abs().max())
        if not difference <= RELOAD_TOLERANCE:
            raise RuntimeError(f"the saved model does not reproduce the pruned model (max logit difference "
                               f"{difference:.2e}); nothing was uploaded")
        sample = _sample(reloaded, tokenizer, cfg)
        say(f"saved and reloaded ({type(reloaded).__name__}, max logit difference {difference:.1e}); uploading")
        store.rm("model")
        uri = store.upload(tmp, "model")
    loading = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True), or without it once scopeforge's "
               "shared.pruning.modeling_scopeforge_pruned is imported" if per_layer_widths
               else "AutoModelForCausalLM.from_pretrained(path)")
    return {"uri": uri, "format": "per_layer" if per_layer_widths else "standard", "class": type(reloaded).__name__,
            "loading": loading, "reload_max_logit_difference": difference, "sample_prompt": cfg.sample_prompt or None,
            "sample_after": sample}


def _per_layer(layers: list[Any], keep: dict[int, Any], scores: dict[int, Any]) -> list[dict[str, Any]]:
    rows = []
    for layer in layers:
        kept = keep[layer.index]
        groups = len(kept["attention"])
        rows.append({
            "layer": layer.index,
            "kv_groups_before": layer.kv_groups, "kv_groups_after": groups,
            "heads_before": layer.kv_groups * layer.heads_per_group, "heads_after": groups * layer.heads_per_group,
            "channels_before": layer.channels, "channels_after": len(kept["mlp"]),
            "kept_kv_groups": kept["attention"].tolist(),
            "attention_scores": [float(s) for s in scores[layer.index]["attention"]],
            "mlp_score_kept_share": float(scores[layer.index]["mlp"][kept["mlp"]].sum()
                                          / max(float(scores[layer.index]["mlp"].sum()), 1e-300)),
        })
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Report


def write_report(cfg: PruneConfig, m: dict[str, Any], store: Storage) -> None:
    report = Report(f"prune: {cfg.model}, {m['achieved_fraction']:.1%} of the parameters removed")
    report.text(f"Importance {m['importance_method']} on {m['calibration']['examples']} calibration examples "
                f"({m['calibration']['target_tokens']:,} tokens) from {m['calibration_source']}; "
                f"{m['num_workers']} worker(s); {m['seconds']} s.")
    summary = [
        {"": "parameters", "before": m["parameters_before"], "after": m["parameters_after"]},
        {"": "calibration loss", "before": m["calibration_loss_before"], "after": m["calibration_loss_after"]},
        {"": "calibration perplexity", "before": m["calibration_perplexity_before"],
         "after": m["calibration_perplexity_after"]},
    ]
    if m["domain_perplexity_before"] is not None:
        summary.append({"": f"domain perplexity ({m['domain_tokens']:,} tokens of {m['eval_data']})",
                        "before": m["domain_perplexity_before"], "after": m["domain_perplexity_after"]})
    report.table("Before and after", summary)

    widths = m["layer_widths"]
    layers = [w["layer"] for w in widths]
    pruned = set(m["layers_pruned"])
    fig, axes = report.figure(ncols=2, width=5.5)
    for ax, (key, label) in zip(axes, (("heads", "attention heads"), ("channels", "MLP channels"))):
        ax.bar(layers, [w[f"{key}_before"] for w in widths], color="#dddddd", label="before")
        ax.bar(layers, [w[f"{key}_after"] for w in widths], label="after",
               color=["#3b6ea8" if w["layer"] in pruned else "#9bb7d4" for w in widths])
        ax.set_xlabel("decoder layer (light: outside the pruned range)")
        ax.set_ylabel(label)
        ax.set_xticks(layers if len(layers) <= 16 else layers[::2])
        ax.legend(loc="lower right")
    report.add_figure(fig, "Width of each decoder layer before and after pruning")
    report.table("Per layer", [{k: v for k, v in row.items() if k != "attention_scores"} for row in m["per_layer"]])
    output = m["output"]
    report.text(f"Model: {output['uri']} ({output['format']} config, {output['class']}); load with "
                f"{output['loading']}. Reloaded logits differ from the in-memory model by at most "
                f"{output['reload_max_logit_difference']:.1e}.")
    if output.get("sample_prompt"):
        report.table("Greedy sample", [{"prompt": output["sample_prompt"], "before": output["sample_before"] or "",
                                        "after (reloaded)": output["sample_after"] or ""}])
    skipped = m["calibration"]["skipped"]
    report.text(f"Calibration rows: {m['calibration']['source_rows']} in the data, {m['calibration']['rows']} "
                f"sampled, kept {m['calibration']['examples']}, truncated "
                f"{m['calibration']['truncated']}, skipped {sum(skipped.values())} {skipped or ''}.")
    report.save(store, "report.html")
