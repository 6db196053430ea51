"""``scopeforge demo finescope`` (what ``make demo`` runs): the FineScope pipeline on the embedded defaults, then
results.md and metrics.json at the run root.

    scopeforge demo finescope                      # ray_jobs/configs/finescope-demo.yaml -> runs/demo-finescope/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ray_jobs.pipeline import run_pipeline
from shared.config import load_config
from shared.configs.pipeline import PipelineConfig
from shared.finescope_results import summarise
from shared.storage import Storage

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "finescope-demo.yaml"


def main(args: argparse.Namespace) -> int:
    cfg = load_config(PipelineConfig, args.config or DEFAULT_CONFIG, args.overrides)
    summary = run_pipeline(cfg, source=str(args.config or DEFAULT_CONFIG), ray_address=args.ray_address,
                           force=args.force)
    root = Storage(cfg.output_root, cfg.storage)
    markdown, metrics = summarise(root)
    root.write_text(markdown, "results.md")
    root.write_json(metrics, "metrics.json")
    print(markdown)
    print(f"FineScope demo done in {summary['seconds']} s: {root.uri('results.md')}")
    return 0
