"""report.html of a prune stage: parameters and losses before and after, the width of every decoder layer, the
per-layer table, how to load the model and a greedy sample before and after."""

from __future__ import annotations

from typing import Any

from shared.perplexity import LossSum
from shared.report import Report
from shared.storage import Storage


def write_report(model: str, m: dict[str, Any], store: Storage) -> None:
    """``m`` is the stage's metrics."""
    report = Report(f"prune: {model}, {m['achieved_fraction']:.1%} of the parameters removed")
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


def summary_line(r: dict[str, Any], model_uri: str) -> str:
    """The line the job prints at the end (``r``: the stage's metrics)."""
    domain = (f"; domain perplexity {r['domain_perplexity_before']:.2f} -> {r['domain_perplexity_after']:.2f}"
              if r["domain_perplexity_before"] is not None else "")
    return (f"pruned {r['parameters_before']:,} -> {r['parameters_after']:,} parameters "
            f"(removed {r['achieved_fraction']:.3f} of all, "
            f"{r['removed_share']['non_embedding']:.3f} of the non-embedding, {r['removed_share']['prunable']:.3f} "
            f"of the pruned blocks' parameters); calibration loss {r['calibration_loss_before']:.3f} -> "
            f"{r['calibration_loss_after']:.3f}{domain}; model in {model_uri} ({r['output']['format']} config); "
            f"{r['seconds']} s")


def loss_results(calibration_before: LossSum, calibration_after: LossSum, domain_before: LossSum,
                 domain_after: LossSum) -> dict[str, Any]:
    """Losses and perplexities before and after pruning (the domain ones None without evaluation data)."""
    domain = domain_before.tokens > 0
    return {
        "calibration_loss_before": calibration_before.mean, "calibration_loss_after": calibration_after.mean,
        "calibration_perplexity_before": calibration_before.perplexity,
        "calibration_perplexity_after": calibration_after.perplexity,
        "calibration_tokens_scored": calibration_before.tokens,
        "domain_loss_before": domain_before.mean if domain else None,
        "domain_loss_after": domain_after.mean if domain else None,
        "domain_perplexity_before": domain_before.perplexity if domain else None,
        "domain_perplexity_after": domain_after.perplexity if domain else None,
        "domain_tokens": domain_before.tokens,
    }


def prune_metrics(cfg: Any, inputs: Any, worker: dict[str, Any], seconds: float) -> dict[str, Any]:
    """metrics.json of a prune stage from its config, the driver's inputs and rank 0's result."""
    plan = inputs.target.plan
    metrics: dict[str, Any] = {
        "model": cfg.model, "family": inputs.target.family,
        "calibration_source": cfg.calibration, "calibration": inputs.calibration_stats.to_dict(),
        "importance_method": cfg.importance,
        "target_fraction": cfg.fraction, "fraction_of": cfg.fraction_of,
        "achieved_fraction": round(plan.achieved_fraction, 6), "removed_share": inputs.target.removed_shares(),
        "parameter_counts": inputs.target.counts,
        "parameters_before": plan.params_before, "parameters_after": worker["parameters_after"],
        "layers_pruned": inputs.target.layers, **worker["results"],
        "eval_data": cfg.eval_data,
        "evaluation": inputs.evaluation_stats.to_dict() if inputs.evaluation_stats else None,
        "per_layer": worker["per_layer"], "layer_widths": worker["widths"], "output": worker["output"],
        "timings_s": worker["timings_s"], "worker_cpu_s": worker["worker_cpu_s"],
        "torch_threads": worker["torch_threads"], "num_workers": cfg.runtime.num_workers, "seconds": seconds,
    }
    metrics["timings_s"].update(driver_prepare=round(inputs.seconds, 2), total=seconds)
    return metrics
