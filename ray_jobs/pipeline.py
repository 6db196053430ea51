"""``scopeforge pipeline``: run a pipeline's stages in order on one Ray connection.

    scopeforge pipeline --config ray_jobs/configs/finescope-demo.yaml

Every stage config is validated before the first stage starts. A stage whose ``_SUCCESS`` marker matches its config
(and its inputs) is skipped, so an interrupted pipeline resumes where it stopped. ``<output_root>/pipeline.json``
records each stage's status and wall time.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray_jobs.errors import user_message
from ray_jobs.runtime import open_stage, run_job
from shared.configs.pipeline import PipelineConfig
from shared.pipeline import stage_configs
from shared.storage import Storage

log = logging.getLogger("scopeforge")


def run_pipeline(pipeline: PipelineConfig, *, source: str = "pipeline", ray_address: str | None = None,
                 force: bool = False, dashboard: bool = False) -> dict[str, Any]:
    stages = stage_configs(pipeline, source)
    root = Storage(pipeline.output_root, pipeline.storage)
    summary: dict[str, Any] = {"output_root": root.uri(), "stages": []}
    started = time.time()
    for index, (spec, cfg) in enumerate(stages, 1):
        print(f"[{index}/{len(stages)}] stage {spec.name} ({spec.job})", flush=True)
        was_done = open_stage(cfg).status() == "done" and not force
        t0 = time.time()
        for attempt in range(spec.retries + 1):
            try:
                metrics = run_job(cfg, ray_address=ray_address, force=force, dashboard=dashboard)
                break
            except Exception as exc:
                if user_message(exc) is not None or attempt == spec.retries:
                    raise
                log.warning("stage %s failed (attempt %d of %d): %s; retrying", spec.name, attempt + 1,
                            spec.retries + 1, exc)
        seconds = round(time.time() - t0, 1)
        marker = open_stage(cfg).marker() or {}
        summary["stages"].append({"name": spec.name, "job": spec.job, "uri": root.uri(spec.name),
                                  "status": "skipped" if was_done else "ran",
                                  "stage_seconds": marker.get("duration_s"), "wall_seconds": seconds})
        print(f"[{index}/{len(stages)}] stage {spec.name}: "
              f"{'skipped (done earlier in ' + str(marker.get('duration_s')) + ' s)' if was_done else 'done'} "
              f"in {seconds} s -> {root.uri(spec.name)}", flush=True)
        summary.setdefault("metrics", {})[spec.name] = metrics
    summary["seconds"] = round(time.time() - started, 1)
    root.write_json({k: v for k, v in summary.items() if k != "metrics"}, "pipeline.json")
    return summary
