"""report.html of a curate stage: SAE training curves, the score histogram with its cut, purity per method, the SAE
features the seeds use most with their top-activating snippets, and a preview of the selection."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.report import Report
from shared.storage import Storage


def write_report(store: Storage, cfg: Any, fit: dict[str, Any], metrics: dict[str, Any], hist: np.ndarray,
                 bins: np.ndarray, subset: dict[str, np.ndarray], seed_texts: list[str]) -> str:
    report = Report(f"curate: {cfg.target_label or 'domain'} from {cfg.corpus}")
    c = metrics["corpus"]
    report.text(f"Model {cfg.model}, layer {metrics['layer']}, {metrics['coordinates']['k']} coordinates "
                f"({cfg.coordinates.selector}); SAE {fit['state']['sae_shape']['n_latents']} latents, "
                f"k={fit['state']['sae_shape']['k']}; {len(seed_texts)} seeds; {c['usable']} of {c['rows']} "
                f"documents scored ({c['skipped_empty']} empty and {c['skipped_not_text']} non-text skipped, "
                f"{c['truncated']} truncated to {c['max_tokens']} tokens); selection: {cfg.retrieval.mode}, "
                f"M={cfg.retrieval.m}, threshold={cfg.retrieval.threshold}.")

    rows = []
    for method, entry in metrics["retrieval"].items():
        rows.append({"method": method, **{k: entry[k] for k in ("selected", "purity", "recall") if k in entry}})
    report.table("Retrieval (same pool, same size)", rows)

    history = fit["history"]
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
    report.add_figure(fig, f"SAE training: final FVU {fit['fvu']:.3f}, dead latents {fit['dead_fraction']:.1%}")

    fig, ax = report.figure()
    centres = (bins[:-1] + bins[1:]) / 2
    ax.bar(centres, hist, width=bins[1] - bins[0], color="#4c72b0")
    score_column = f"{cfg.retrieval.scoring}_score"
    if len(subset.get(score_column, [])):
        cut = float(np.min(subset[score_column]))
        ax.axvline(cut, color="#c44e52", linestyle="--", label=f"cut {cut:.3f}")
        ax.legend()
    nonzero = np.flatnonzero(hist)
    if len(nonzero):
        ax.set_xlim(bins[nonzero[0]] - 0.02, bins[nonzero[-1] + 1] + 0.02)
    ax.set_xlabel(f"max cosine to a seed ({cfg.retrieval.scoring})")
    ax.set_ylabel("documents")
    report.add_figure(fig, "SAE score histogram with the selection cut")

    report.heading("SAE features the seeds use most")
    for feature in fit["features"]:
        snippets = " | ".join(f"…{s['left']}[{s['token']}]{s['right']}…" for s in feature["snippets"])
        report.text(f"latent {feature['latent']}: seed mean {feature['seed_mean']:.4f}, corpus mean "
                    f"{feature['corpus_mean']:.4f}. Top activations: {snippets}")

    report.heading("First selected documents")
    preview = []
    for i in range(min(10, len(subset.get("id", [])))):
        preview.append({"id": subset["id"][i], "score": float(subset[score_column][i]),
                        "label": subset["label"][i] if "label" in subset else "",
                        "text": str(subset["text"][i])[:160].replace("\n", " ")})
    report.table(None, preview)
    report.table("Timings (s)", [metrics["timings"]])
    return report.save(store, "report.html")
