"""report.html of a curate stage: SAE training curves, the score histogram with its cut, purity per method, the SAE
features the seeds use most with their top-activating snippets, and a preview of the selection."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from shared.curation.fit import FitResult
from shared.curation.model import CurationModel
from shared.curation.selection import SCORE_BINS, CorpusCounts, Tally
from shared.report import Report
from shared.storage import Storage


def curate_metrics(cfg: Any, fit: FitResult, curation: CurationModel, counts: CorpusCounts, totals: Tally,
                   rows: int, timings: dict[str, float], started: float) -> dict[str, Any]:
    """metrics.json of a curate stage (``cfg`` is its CurateConfig)."""
    retrieval: dict[str, Any] = {}
    for method in totals.selected:
        n, hits = totals.selected[method], totals.hits[method]
        lowest = totals.lowest.get(method, np.inf)
        entry: dict[str, Any] = {"selected": n, "lowest_score": float(lowest) if np.isfinite(lowest) else None}
        if cfg.target_label is not None and counts.has_labels:
            entry.update({"purity": hits / n if n else 0.0, "recall": hits / counts.target if counts.target else 0.0,
                          "selected": n, "hits": hits})
        retrieval[method] = entry
    embed_s = max(timings.get("embed_s", 0.0), 1e-9)
    timings["total_s"] = round(time.time() - started, 1)
    return {
        "corpus": {"rows": rows, "scored": counts.rows, "usable": counts.ok, "skipped_empty": counts.empty,
                   "skipped_not_text": counts.not_text, "truncated": counts.truncated, "tokens": counts.tokens,
                   "target_documents": counts.target, "max_tokens": cfg.max_tokens},
        "layer": curation.layer,
        "coordinates": {"selector": curation.selector, "k": int(len(curation.coords))},
        "sae": {"fvu": fit.fvu, "dead_fraction": fit.dead_fraction, **asdict(curation.shape), "history": fit.history},
        "fit": fit.stats,
        "retrieval": retrieval, "subset_method": cfg.retrieval.scoring,
        "retrieval_mode": cfg.retrieval.mode, "m": cfg.retrieval.m, "threshold": cfg.retrieval.threshold,
        "target_label": cfg.target_label,
        "throughput": {"documents_per_s": round(counts.ok / embed_s, 2),
                       "tokens_per_s": round(counts.tokens / embed_s, 1)},
        "timings": timings,
    }


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """What the job prints at the end: documents scored and skipped, then each method's selection."""
    c = metrics["corpus"]
    lines = [f"scored {c['usable']} documents ({c['skipped_empty']} empty and {c['skipped_not_text']} non-text "
             f"skipped, {c['truncated']} truncated to {c['max_tokens']} tokens) at "
             f"{metrics['throughput']['tokens_per_s']} tokens/s"]
    for method, entry in metrics["retrieval"].items():
        extra = (f": purity {entry['purity']:.3f}, recall {entry['recall']:.3f}" if "purity" in entry else "")
        lines.append(f"  {method:<7} selected {entry['selected']}{extra}")
    return lines


def write_report(store: Storage, cfg: Any, fit: FitResult, curation: CurationModel, metrics: dict[str, Any],
                 hist: np.ndarray, cut: float | None, preview: list[dict[str, Any]]) -> str:
    """``cut``: the lowest selected score of the subset method; ``preview``: its best documents (id, score, label,
    text), best first."""
    report = Report(f"curate: {cfg.target_label or 'domain'} from {cfg.corpus}")
    c = metrics["corpus"]
    report.text(f"Model {cfg.model}, layer {metrics['layer']}, {metrics['coordinates']['k']} coordinates "
                f"({curation.selector}); SAE {curation.shape.n_latents} latents, "
                f"k={curation.shape.k}; {len(curation.seed_ids)} seeds; {c['usable']} of {c['rows']} "
                f"documents scored ({c['skipped_empty']} empty and {c['skipped_not_text']} non-text skipped, "
                f"{c['truncated']} truncated to {c['max_tokens']} tokens); selection: {cfg.retrieval.mode}, "
                f"M={cfg.retrieval.m}, threshold={cfg.retrieval.threshold}.")

    rows = []
    for method, entry in metrics["retrieval"].items():
        rows.append({"method": method, **{k: entry[k] for k in ("selected", "purity", "recall") if k in entry}})
    report.table("Retrieval (same pool, same size)", rows)

    history = fit.history
    fig, axes = report.figure(ncols=2)
    if history:
        steps = [h["step"] for h in history]
        axes[0].plot(steps, [h["nmse"] for h in history], label="normalised MSE")
        axes[0].plot(steps, [h["auxk"] for h in history], label="AuxK")
        axes[0].set_xlabel("step")
        axes[0].set_yscale("log")
        axes[0].legend()
        axes[0].set_title("SAE loss")
        axes[1].plot(steps, [h["dead_fraction"] for h in history])
        axes[1].set_xlabel("step")
        axes[1].set_title("dead-latent fraction")
    report.add_figure(fig, f"SAE training: final FVU {fit.fvu:.3f}, dead latents {fit.dead_fraction:.1%}")

    fig, ax = report.figure()
    bins = SCORE_BINS
    centres = (bins[:-1] + bins[1:]) / 2
    ax.bar(centres, hist, width=bins[1] - bins[0], color="#4c72b0")
    if cut is not None and np.isfinite(cut):
        ax.axvline(cut, color="#c44e52", linestyle="--", label=f"cut {cut:.3f}")
        ax.legend()
    nonzero = np.flatnonzero(hist)
    if len(nonzero):
        ax.set_xlim(bins[nonzero[0]] - 0.02, bins[nonzero[-1] + 1] + 0.02)
    ax.set_xlabel(f"max cosine to a seed ({cfg.retrieval.scoring})")
    ax.set_ylabel("documents")
    report.add_figure(fig, "SAE score histogram with the selection cut")

    report.heading("SAE features the seeds use most")
    for feature in fit.features:
        snippets = " | ".join(f"…{s['left']}[{s['token']}]{s['right']}…" for s in feature["snippets"])
        report.text(f"latent {feature['latent']}: seed mean {feature['seed_mean']:.4f}, corpus mean "
                    f"{feature['corpus_mean']:.4f}. Top activations: {snippets}")

    report.heading("Best selected documents")
    report.table(None, preview)
    report.table("Timings (s)", [metrics["timings"]])
    return report.save(store, "report.html")
