"""HTML reports of train-detector (curves, difficulty history per source) and evaluate-detector (matrix, ROC curves)."""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.report import Report


def training_report(cfg: Any, plan: Any, metrics: dict[str, Any]) -> Report:
    report = Report(f"train-detector: {cfg.stage_name}")
    report.text(f"Backbone {cfg.model.kind}, boosting '{cfg.boosting.method}', {metrics['epochs']} epochs on "
                f"{cfg.runtime.num_workers} worker(s); best validation AUC {metrics['best_val_auc']:.4f} at epoch "
                f"{metrics['best_epoch'] + 1} (exported as the stage's model).")
    report.table("Mixture (rows per source, label and split)", plan.counts())
    if metrics["dropped"]["count"]:
        report.table(f"Dropped: {metrics['dropped']['count']} image(s) that cannot be decoded",
                     metrics["dropped"]["rows"])
    history = metrics["history"]
    report.table("Epochs", [{"epoch": h["epoch"] + 1, "train loss": h["train_loss"], "val AUC": h["val_auc"],
                             "val AP": h["val_ap"], "val ACC": h["val_acc"],
                             "samples/s": round(h["samples_per_second"], 1)} for h in history])
    fig, axes = report.figure(2)
    axes = axes.ravel()
    epochs = [h["epoch"] + 1 for h in history]
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    axes[0].set(xlabel="epoch", ylabel="training loss (weighted)", title="loss")
    axes[1].plot(epochs, [h["val_auc"] for h in history], marker="o", color="C1")
    axes[1].set(xlabel="epoch", ylabel="validation AUC", title="validation AUC")
    report.add_figure(fig, "Training loss and validation AUC per epoch")
    report.add_figure(difficulty_figure(report, metrics["difficulty_history"]),
                      "Mean tracked difficulty m (left) and mean loss weight (right) per (source, label) group")
    last = metrics["difficulty_history"][-1]["groups"] if metrics["difficulty_history"] else []
    report.table("Difficulty per group after the last epoch (higher = harder to learn)",
                 sorted(last, key=lambda g: -(g["mean_difficulty"] or 0.0)))
    return report


def difficulty_figure(report: Report, history: list[dict[str, Any]]):
    fig, axes = report.figure(2)
    axes = axes.ravel()
    names = [g["group"] for g in history[0]["groups"]] if history else []
    epochs = [h["epoch"] + 1 for h in history]
    for k, name in enumerate(names):
        m = [h["groups"][k]["mean_difficulty"] for h in history]
        w = [h["groups"][k]["mean_weight"] for h in history]
        axes[0].plot(epochs, [np.nan if v is None else v for v in m], marker="o", label=name)
        axes[1].plot(epochs, [np.nan if v is None else v for v in w], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="mean m (EMA of the per-sample loss)", title="difficulty per group")
    axes[1].set(xlabel="epoch", ylabel="mean weight", title="loss weight per group")
    axes[0].legend(fontsize=7)
    return fig


def roc_figure(report: Report, detector: str, curves: dict[str, tuple[np.ndarray, np.ndarray, float]]):
    """ROC curves of one detector, one line per test column: {column: (fpr, tpr, auc)}."""
    fig, ax = report.figure(1, width=5.0, height=4.5)
    for column, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{column} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate (reals called fake)", ylabel="true positive rate (fakes caught)",
           title=f"ROC: {detector}", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    return fig
