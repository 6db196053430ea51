"""results.md and metrics.json of a FineScope pipeline run: corpus hygiene, the retrieval study, curation purity,
pruning at each severity, the distillation filter, evaluation, and how much of the pruning gap each recovery closes
in log-perplexity units with intervals over held-out documents."""

from __future__ import annotations

import io
from typing import Any

from shared.errors import DataError
from shared.recovery import recovery
from shared.stage import committed_folder, stage_metrics
from shared.storage import Storage

ROLES = {"base": "base", "pruned": "pruned", "distilled": "pruned+distilled", "sft": "pruned+sft"}
"""Evaluation rows the summary needs (row names of the evaluate stage)."""
RECOVERIES = {"pruned": ("pruned+distilled", "pruned+kd", "pruned+sft"), "pruned-35": ("pruned-35+sft",)}
"""Per pruned row, the rows that recover it (those present are reported)."""
COMPARISONS = (("pruned+distilled", "pruned+sft"), ("pruned+kd", "pruned+sft"), ("pruned+kd", "pruned+distilled"),
               ("base+curated", "base"))
"""Paired loss differences reported where both rows exist (a - b: negative means a is better)."""


def recovered_share(base: float | None, pruned: float | None, recovered: float | None) -> float | None:
    """(pruned - recovered) / (pruned - base): 1 closes the gap, 0 recovers nothing, <0 makes it worse."""
    if base is None or pruned is None or recovered is None or pruned <= base:
        return None
    return (pruned - recovered) / (pruned - base)


def _stages(summary: dict[str, Any], job: str, root: Storage, **where: Any) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for entry in summary["stages"]:
        if entry["job"] != job:
            continue
        metrics = stage_metrics(root.uri(entry["name"]), root.config)
        if all(metrics.get(k) == v for k, v in where.items()):
            found.append((entry["name"], metrics))
    return found


def _stage_of(summary: dict[str, Any], job: str, root: Storage, **where: Any) -> tuple[str, dict[str, Any]]:
    found = _stages(summary, job, root, **where)
    if not found:
        raise DataError(f"{root.uri()}: the pipeline has no finished {job} stage {where or ''}")
    return found[0]


def _committed(root: Storage, name: str) -> Storage:
    return Storage(committed_folder(root.uri(name), root.config), root.config)


def stage_documents(root: Storage, name: str) -> list[dict[str, Any]]:
    """The per-document NLL rows an evaluate stage kept (documents.parquet)."""
    import pyarrow.parquet as pq

    store = _committed(root, name)
    if not store.exists("documents.parquet"):
        raise DataError(f"{store.uri()}: no documents.parquet (evaluated by an older scopeforge; rerun evaluate)")
    return pq.read_table(io.BytesIO(store.read_bytes("documents.parquet"))).to_pylist()


def summarise(root: Storage) -> tuple[str, dict[str, Any]]:
    """(markdown, metrics) from the stages under ``root`` (as recorded in its pipeline.json)."""
    summary = root.read_json("pipeline.json")
    corpus = _stages(summary, "build-corpus", root)
    _, curate = _stage_of(summary, "curate", root)
    prunes = _stages(summary, "prune", root)
    if not prunes:
        raise DataError(f"{root.uri()}: the pipeline has no finished prune stage")
    distills = _stages(summary, "distill", root, mode="distilled")
    evaluate_name, evaluation = _stage_of(summary, "evaluate", root)
    studies = _stages(summary, "retrieval-study", root)
    models = evaluation["models"]
    missing = [row for row in ROLES.values() if row not in models]
    if missing:
        raise DataError(f"{root.uri()}: the evaluate stage lacks the rows {', '.join(missing)}")
    datasets = list(evaluation["datasets"])
    domain = "domain" if "domain" in datasets else datasets[0]
    ppl = {role: models[row][domain]["perplexity"] for role, row in ROLES.items()}
    linear = {"distilled": recovered_share(ppl["base"], ppl["pruned"], ppl["distilled"]),
              "sft": recovered_share(ppl["base"], ppl["pruned"], ppl["sft"])}
    log_recovery = log_recoveries(stage_documents(root, evaluate_name), models, datasets)
    metrics: dict[str, Any] = {
        "hygiene": corpus[0][1].get("hygiene") if corpus else None,
        "curation": dict(curate["retrieval"]),
        "sae": {"heldout_fvu": curate.get("sae", {}).get("fvu"),
                **{k: curate.get("fit", {}).get(k) for k in ("sample_docs", "sample_tokens", "train_tokens",
                                                              "heldout_tokens")}},
        "pruning": {name: {k: m.get(k) for k in ("parameters_before", "parameters_after", "target_fraction",
                                                 "fraction_of", "removed_share", "domain_perplexity_before",
                                                 "domain_perplexity_after")} for name, m in prunes},
        "distillation_filter": distills[0][1].get("filter") if distills else None,
        "evaluation": {name: {d: row[d]["perplexity"] for d in datasets} | {"parameters": row["parameters"]}
                       for name, row in models.items()},
        "recovered_share": linear,
        "recovery": log_recovery,
        "stage_seconds": {s["name"]: s.get("stage_seconds") for s in summary["stages"]},
    }
    lines = [f"# FineScope demo: results under {root.uri()}", ""]
    lines += hygiene_lines(metrics["hygiene"])
    if studies:
        name, study = studies[0]
        metrics["study"] = {k: study.get(k) for k in ("chosen_sae", "development_target", "headline_targets",
                                                       "comparisons")}
        lines += [f"#{line}" if line.startswith("#") else line  # one heading level down
                  for line in _committed(root, name).read_text("study.md").splitlines()] + [""]
    lines += curation_lines(curate)
    lines += pruning_lines(prunes)
    if distills and distills[0][1].get("filter"):
        d = distills[0][1]
        lines += ["## Teacher answers (self-data distillation filter)", "",
                  ", ".join(f"{k}: {v}" for k, v in d["filter"].items()) +
                  f" (of {d.get('examples')} examples; rejected answers fall back to the original). Generations "
                  f"ending on a stop token / at max_new_tokens: {d.get('generation_stops')}.", ""]
    lines += evaluation_lines(models, datasets)
    lines += recovery_lines(log_recovery)
    lines += [f"In linear perplexity (as earlier runs reported it): distillation {_f(linear['distilled'])}, "
              f"plain SFT {_f(linear['sft'])} of the {domain} gap.", ""]
    lines += ["## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds} |" for name, seconds in metrics["stage_seconds"].items()]
    known = [v for v in metrics["stage_seconds"].values() if v is not None]
    metrics["total_stage_seconds"] = round(sum(known), 1)
    lines += [f"| total | {metrics['total_stage_seconds']} |", "",
              "A stage skipped because it was done earlier counts with the time it took then."]
    return "\n".join(lines) + "\n", metrics


def log_recoveries(documents: list[dict[str, Any]], models: dict[str, Any],
                   datasets: list[str]) -> dict[str, dict[str, Any]]:
    """Per dataset and pruned row: losses, recovered shares and paired differences with intervals."""
    out: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        for pruned, recoveries in RECOVERIES.items():
            present = [r for r in recoveries if r in models]
            if pruned not in models or not present:
                continue
            compare = [(a, b) for a, b in COMPARISONS if a in models and b in models
                       and ((a in present and b in present) or (pruned == "pruned" and a == "base+curated"))]
            out[f"{dataset}/{pruned}"] = recovery(documents, dataset, "base", pruned, present, compare)
    return out


def hygiene_lines(hygiene: dict[str, Any] | None) -> list[str]:
    if not hygiene:
        return []
    dropped = hygiene.get("near_duplicate_chunks", {})
    removed = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in hygiene.items() if k != "near_duplicate_chunks")
    return ["## Corpus hygiene", "", f"Lines removed: {removed}. Near-duplicate chunks dropped (a shared span of "
            "words with a chunk kept earlier): " + ", ".join(f"{k} {v}" for k, v in dropped.items()) + ".", ""]


def curation_lines(curate: dict[str, Any]) -> list[str]:
    lines = ["## Curation for the pipeline (the demo's seeds, one draw, same pool and M)", "",
             f"The subset handed on is the '{curate.get('subset_method', 'sae')}' selection.", "",
             "| method | selected | purity | recall |", "|---|---|---|---|"]
    for method, entry in curate["retrieval"].items():
        lines.append(f"| {method} | {entry['selected']} | {_f(entry.get('purity'))} | {_f(entry.get('recall'))} |")
    sae, fit = curate.get("sae", {}), curate.get("fit", {})
    return lines + ["", f"SAE: held-out FVU {_f(sae.get('fvu'))} on a sample of {fit.get('sample_docs')} documents "
                    f"({fit.get('sample_tokens')} tokens, {fit.get('heldout_tokens')} of them held out).", ""]


def pruning_lines(prunes: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["## Pruning", "", "| stage | target | parameters | removed of all / non-embedding / pruned blocks | "
             "domain ppl before -> after |", "|---|---|---|---|---|"]
    for name, m in prunes:
        shares = m.get("removed_share") or {}
        lines.append(f"| {name} | {m.get('target_fraction')} of {m.get('fraction_of', 'all')} | "
                     f"{m.get('parameters_before'):,} -> {m.get('parameters_after'):,} | "
                     f"{_f(shares.get('all'))} / {_f(shares.get('non_embedding'))} / {_f(shares.get('prunable'))} | "
                     f"{_f(m.get('domain_perplexity_before'), 2)} -> {_f(m.get('domain_perplexity_after'), 2)} |")
    return lines + [""]


def evaluation_lines(models: dict[str, Any], datasets: list[str]) -> list[str]:
    lines = ["## Evaluation (held-out data)", "", "| model | parameters | " +
             " | ".join(f"{d} ppl" for d in datasets) + " |", "|---|---|" + "---|" * len(datasets)]
    for name, row in models.items():
        lines.append(f"| {name} | {row['parameters'] / 1e6:.1f} M | " +
                     " | ".join(_f(row[d]["perplexity"], 2) for d in datasets) + " |")
    return lines + [""]


def recovery_lines(log_recovery: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Recovery in log-perplexity (mean token loss), 95% bootstrap intervals over documents", "",
             "Recovered share of the gap = (L_pruned - L_model) / (L_pruned - L_base); every bootstrap round "
             "resamples the same documents for every model.", "",
             "| dataset / pruned model | model | loss | perplexity | recovered share |", "|---|---|---|---|---|"]
    for key, rec in log_recovery.items():
        for name, entry in rec["models"].items():
            share = rec["recovered_share_log"].get(name)
            lines.append(f"| {key} | {name} | {_ci(entry['loss'], entry['loss_ci'])} | "
                         f"{_ci(entry['perplexity'], entry['perplexity_ci'], 2)} | "
                         f"{_ci(share['mean'], share['ci']) if share else ''} |")
    lines += ["", "| dataset | loss difference (a - b) | mean | 95% CI | excludes 0 |", "|---|---|---|---|---|"]
    lines += [f"| {key.split('/')[0]} | {k} | {v['mean']:+.4f} | [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}] | "
              f"{v['excludes_zero']} |"
              for key, rec in log_recovery.items() for k, v in rec["loss_differences"].items()]
    return lines + [""]


def _ci(value: float, ci: list[float], digits: int = 3) -> str:
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
