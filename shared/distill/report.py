"""report.html and metrics of a distill stage: filter decisions, the fine-tuning loss, the first examples."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from shared.report import Report
from shared.storage import Storage


def write_report(store: Storage, cfg: Any, metrics: dict[str, Any], table: pa.Table) -> None:
    """``cfg`` is the stage's DistillConfig, ``table`` its distilled examples."""
    report = Report(f"distill ({cfg.mode}): {cfg.student}")
    report.text(f"{metrics['examples']} examples from {cfg.data}; teacher {metrics['teacher']}; "
                f"{cfg.training.method} fine-tuning for {metrics['training']['steps']} steps.")
    if metrics["filter"]:
        report.table("Teacher rewrites: filter decisions", [metrics["filter"]])
    history = metrics["training"]["history"]
    if history:
        fig, ax = report.figure()
        ax.plot([h["step"] for h in history], [h["loss"] for h in history])
        ax.set_xlabel("step")
        ax.set_ylabel("answer-token loss")
        report.add_figure(fig, "fine-tuning loss")
    sample = table.slice(0, 5).to_pylist()
    report.table("First examples", [{"id": r["id"], "source": r["source"], "reason": r["reason"],
                                     "prompt": r["prompt"][-120:], "answer": r["answer"][:200]} for r in sample])
    report.save(store, "report.html")
