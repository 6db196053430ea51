"""The detector study's report: tables with intervals, what they allow one to conclude, and the plots (ROC curves,
score histograms, the family matrix, the robustness sweep)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.detection.intervals import Cell, fmt
from shared.detection.metrics import roc_curve
from shared.detection.study import CLEAN, HEADLINE, HEADLINE_VARIANTS
from shared.report import Report

FIGURES = (("auc", "AUC"), ("ap", "AP"), ("eer", "EER"), ("tpr_at_1pct_fpr", "TPR@1%FPR"))


def verdict(diff: Mapping[str, Any], better: str, worse: str) -> str:
    """One sentence on what a paired interval allows."""
    low, high = diff["ci"]
    if low > 0:
        return f"{better} beats {worse} (the interval excludes zero)"
    if high < 0:
        return f"{worse} beats {better} (the interval excludes zero)"
    return f"the interval includes zero: the study does not tell {better} and {worse} apart"


def conclusions(m: Mapping[str, Any]) -> list[str]:
    c, held = m["comparisons"], m["heldout_family"]
    d, b = c["diverse-uniform - single-uniform"], c["diverse-boost - diverse-uniform"]
    lofo = m["lofo"]
    lofo_wins = sum(v["diverse - single"]["ci"][0] > 0 for v in lofo.values())
    lofo_losses = sum(v["diverse - single"]["ci"][1] < 0 for v in lofo.values())
    return [
        f"**Does diversity help on an unseen generator?** On the held-out family {held}, diverse - single (uniform "
        f"weights, same number of fakes) is {fmt(d, True)} AUC: {verdict(d, 'diverse training', 'single-source')}. "
        f"Over the leave-one-family-out blocks diversity wins with an interval above zero for {lofo_wins} of "
        f"{len(lofo)} held-out families and loses for {lofo_losses}.",
        f"**Does momentum difficulty boosting help?** On the diverse mixture, MDB - uniform is {fmt(b, True)} AUC: "
        f"{verdict(b, 'MDB', 'uniform weights')}; on the single source "
        f"{fmt(c['single-boost - single-uniform'], True)}. Against the other hard-example baselines: MDB - focal "
        f"{fmt(c['diverse-boost - diverse-focal'], True)}, OHEM - uniform "
        f"{fmt(c['diverse-ohem - diverse-uniform'], True)}.",
    ]


def markdown(m: Mapping[str, Any]) -> str:
    held = m["heldout_family"]
    v = m["variants"]
    lines = [
        f"# Detector study: {m['backbone']} features ({m['feature_dim']} dims), held-out family **{held}**", "",
        f"{m['images']} images; families: " + "; ".join(f"{f} ({', '.join(g)})" for f, g in m["families"].items())
        + f". {m['splits']} grouped splits x {m['seeds']} training seeds per variant; every variant of a table trains "
        f"on the same reals and the same number of fakes (median {m['train_counts']['fakes']} fakes, "
        f"{m['train_counts']['reals']} reals). Cells: mean [95% paired bootstrap interval over the test images of "
        "every split]. Every image of the held-out family is scored.", "",
        "## Held-out family", "",
        "| variant | " + " | ".join(name for _, name in FIGURES) + " | val AUC | runs |",
        "|---|" + "---|" * (len(FIGURES) + 2),
        *(f"| {name} | " + " | ".join(fmt(v[name][key]) for key, _ in FIGURES)
          + f" | {v[name]['val_auc']:.3f} | {v[name]['runs']} |" for name in HEADLINE_VARIANTS), "",
        "## Paired differences (AUC, held-out family)", "", "| comparison | difference | excludes 0 |", "|---|---|---|",
        *(f"| {k} | {fmt(d, True)} | {'yes' if d['excludes_zero'] else 'no'} |"
          for k, d in m["comparisons"].items()), "",
        "## What the intervals allow", "", *(f"- {line}" for line in conclusions(m)), "",
        "## Leave one family out (uniform weights, AUC)", "",
        "| held-out family | diverse | single (generator) | diverse - single |", "|---|---|---|---|",
        *(f"| {f} | {fmt(x['diverse'])} | {fmt(x['single'])} ({x['single_generator']}) | "
          f"{fmt(x['diverse - single'], True)} |" for f, x in m["lofo"].items()), "",
        "## Train x test over families (uniform weights, AUC on each family's test split)", "",
        "| trained on \\ tested on | " + " | ".join(m["family_matrix"]) + " |",
        "|---|" + "---|" * len(m["family_matrix"]),
        *(f"| {a} | " + " | ".join(fmt(row[b]) for b in m["family_matrix"]) + " |"
          for a, row in m["family_matrix"].items()), "",
        f"## Robustness of {m['robustness']['variant']} (chosen by {m['robustness']['chosen_by']}), held-out family",
        "", "| view | AUC |", "|---|---|",
        *(f"| {name} | {fmt(x)} |" for name, x in m["robustness"]["auc"].items()), "",
        "Near-duplicate pairs across splits (perceptual hash): " + "; ".join(
            f"split {k}: " + ", ".join(f"{name} {n}" for name, n in d.items()) for k, d in
            enumerate(m["near_duplicates"])) + ".", ""]
    return "\n".join(lines)


def mean_roc(cells: Sequence[Cell], variant: str, grid: np.ndarray) -> np.ndarray:
    """TPR on an FPR grid, averaged over every split and seed (vertical averaging)."""
    curves = []
    for cell in cells:
        for scores in cell.scores[variant]:
            fpr, tpr, _ = roc_curve(cell.labels, scores)
            curves.append(np.interp(grid, fpr, tpr))
    return np.mean(curves, axis=0)


def html(m: Mapping[str, Any], cells: Mapping[tuple[str, str, str], Sequence[Cell]]) -> Report:
    held = m["heldout_family"]
    report = Report(f"detector study: held-out {held}")
    report.pre(markdown(m))
    headline = cells[(HEADLINE, held, CLEAN)]
    grid = np.linspace(0, 1, 201)
    fig, axes = report.figure(2, width=11, height=4.5)
    for name in HEADLINE_VARIANTS:
        curve = mean_roc(headline, name, grid)
        axes[0].plot(grid, curve, label=f"{name} ({m['variants'][name]['auc']['mean']:.3f})")
        axes[1].plot(grid, curve, label=name)
    axes[0].plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC on {held} (mean of runs)")
    axes[1].set(xscale="log", xlim=(0.005, 1), xlabel="false positive rate (log)", ylabel="true positive rate",
                title="low-FPR region")
    axes[0].legend(fontsize=7, loc="lower right")
    report.add_figure(fig, "ROC curves of the headline variants (vertical average over splits and seeds)")
    best = m["robustness"]["variant"]
    fig, ax = report.figure(1, width=6, height=3.5)
    reals = np.concatenate([s[c.labels == 0] for c in headline for s in c.scores[best]])
    fakes = np.concatenate([s[c.labels == 1] for c in headline for s in c.scores[best]])
    ax.hist(reals, bins=30, range=(0, 1), alpha=0.6, density=True, label="real (test split)")
    ax.hist(fakes, bins=30, range=(0, 1), alpha=0.6, density=True, label=f"fake ({held})")
    ax.set(xlabel="score (probability of fake)", ylabel="density", title=f"scores of {best}")
    ax.legend(fontsize=8)
    report.add_figure(fig, f"score histograms of {best}, every split and seed")
    families = list(m["family_matrix"])
    grid_auc = np.array([[m["family_matrix"][a][b]["mean"] for b in families] for a in families])
    fig, ax = report.figure(1, width=5, height=4.5)
    image = ax.imshow(grid_auc, vmin=0.5, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(families)), families, rotation=30)
    ax.set_yticks(range(len(families)), families)
    ax.set(xlabel="tested on", ylabel="trained on", title="AUC, train x test family")
    for i in range(len(families)):
        for j in range(len(families)):
            ax.text(j, i, f"{grid_auc[i, j]:.2f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax)
    report.add_figure(fig, "train x test matrix over families")
    fig, ax = report.figure(1, width=7, height=3.5)
    names = list(m["robustness"]["auc"])
    means = np.array([m["robustness"]["auc"][n]["mean"] for n in names])
    cis = np.array([m["robustness"]["auc"][n]["ci"] for n in names])
    ax.errorbar(range(len(names)), means, yerr=np.abs(cis.T - means), fmt="o", capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set(ylabel=f"AUC on {held}", title=f"robustness of {best}")
    report.add_figure(fig, "robustness sweep (perturbation applied to reals and fakes alike)")
    return report
