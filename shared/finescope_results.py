"""results.md and metrics.json of a FineScope pipeline run: curation purity, pruning, distillation, evaluation, and
the share of the pruning perplexity gap that distillation and plain SFT recover."""

from __future__ import annotations

from typing import Any

from shared.errors import DataError
from shared.stage import stage_metrics
from shared.storage import Storage

ROLES = {"base": "base", "pruned": "pruned", "distilled": "pruned+distilled", "sft": "pruned+sft"}
"""Evaluation rows the summary needs (row names of the evaluate stage)."""


def recovered_share(base: float | None, pruned: float | None, recovered: float | None) -> float | None:
    """(pruned - recovered) / (pruned - base): 1 closes the gap, 0 recovers nothing, <0 makes it worse."""
    if base is None or pruned is None or recovered is None or pruned <= base:
        return None
    return (pruned - recovered) / (pruned - base)


def _stage_of(summary: dict[str, Any], job: str, root: Storage, **where: Any) -> tuple[str, dict[str, Any]]:
    for entry in summary["stages"]:
        if entry["job"] != job:
            continue
        metrics = stage_metrics(root.uri(entry["name"]), root.config)
        if all(metrics.get(k) == v for k, v in where.items()):
            return entry["name"], metrics
    raise DataError(f"{root.uri()}: the pipeline has no finished {job} stage {where or ''}")


def summarise(root: Storage) -> tuple[str, dict[str, Any]]:
    """(markdown, metrics) from the stages under ``root`` (as recorded in its pipeline.json)."""
    summary = root.read_json("pipeline.json")
    _, curate = _stage_of(summary, "curate", root)
    _, prune = _stage_of(summary, "prune", root)
    _, distill = _stage_of(summary, "distill", root, mode="distilled")
    _, evaluation = _stage_of(summary, "evaluate", root)
    models = evaluation["models"]
    missing = [row for row in ROLES.values() if row not in models]
    if missing:
        raise DataError(f"{root.uri()}: the evaluate stage lacks the rows {', '.join(missing)}")
    datasets = list(evaluation["datasets"])
    domain = "domain" if "domain" in datasets else datasets[0]
    ppl = {role: models[row][domain]["perplexity"] for role, row in ROLES.items()}
    recovery = {"distilled": recovered_share(ppl["base"], ppl["pruned"], ppl["distilled"]),
                "sft": recovered_share(ppl["base"], ppl["pruned"], ppl["sft"])}
    metrics: dict[str, Any] = {
        "curation": {m: e for m, e in curate["retrieval"].items()},
        "sae": {"heldout_fvu": curate.get("sae", {}).get("fvu"),
                **{k: curate.get("fit", {}).get(k) for k in ("sample_docs", "sample_tokens", "train_tokens",
                                                              "heldout_tokens")}},
        "pruning": {k: prune.get(k) for k in ("parameters_before", "parameters_after", "achieved_fraction",
                                              "target_fraction")},
        "distillation_filter": distill.get("filter"),
        "evaluation": {name: {d: row[d]["perplexity"] for d in datasets} | {"parameters": row["parameters"]}
                       for name, row in models.items()},
        "recovered_share": recovery,
        "stage_seconds": {s["name"]: s.get("stage_seconds") for s in summary["stages"]},
    }
    lines = [f"# FineScope demo: results under {root.uri()}", ""]
    lines += ["## Curation (same pool, same M)", "",
              f"The subset handed on is the '{curate.get('subset_method', 'sae')}' selection.", "",
              "| method | selected | purity | recall |", "|---|---|---|---|"]
    for method, entry in curate["retrieval"].items():
        lines.append(f"| {method} | {entry['selected']} | {_f(entry.get('purity'))} | {_f(entry.get('recall'))} |")
    sae = metrics["sae"]
    lines += ["", f"SAE: held-out FVU {_f(sae['heldout_fvu'])} on a sample of {sae['sample_docs']} documents "
              f"({sae['sample_tokens']} tokens, {sae['heldout_tokens']} of them held out of training).", ""]
    lines += ["", "## Pruning", "",
              f"{prune.get('parameters_before'):,} -> {prune.get('parameters_after'):,} parameters "
              f"(removed {_f(prune.get('achieved_fraction'))} of them; target {prune.get('target_fraction')}).", ""]
    if distill.get("filter"):
        lines += ["## Teacher rewrites (self-data distillation filter)", "",
                  ", ".join(f"{k}: {v}" for k, v in distill["filter"].items()) +
                  f" (of {distill.get('examples')} examples; rejected rewrites fall back to the original answer)", ""]
    lines += ["## Evaluation (held-out data)", "", "| model | parameters | " +
              " | ".join(f"{d} ppl" for d in datasets) + " |", "|---|---|" + "---|" * len(datasets)]
    for name, row in models.items():
        lines.append(f"| {name} | {row['parameters'] / 1e6:.1f} M | " +
                     " | ".join(_f(row[d]["perplexity"], 2) for d in datasets) + " |")
    lines += ["", f"Share of the {domain} perplexity gap (pruned vs base) recovered: distillation "
              f"{_f(recovery['distilled'])}, plain SFT {_f(recovery['sft'])}.", "",
              "## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds} |" for name, seconds in metrics["stage_seconds"].items()]
    known = [v for v in metrics["stage_seconds"].values() if v is not None]
    metrics["total_stage_seconds"] = round(sum(known), 1)
    lines += [f"| total | {metrics['total_stage_seconds']} |", "",
              "A stage skipped because it was done earlier counts with the time it took then."]
    return "\n".join(lines) + "\n", metrics


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
