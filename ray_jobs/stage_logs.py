"""Saving a stage attempt's logs to ``<stage>/logs/<attempt>/`` when it ends, succeeded or failed.

The driver asks every alive node, with a zero-CPU task pinned to it, to upload this Ray job's files from that
node's Ray log folder: the Jobs API driver log (``job-driver-<submission id>.log``, on the node that ran the driver)
and the ``worker-*.out|.err`` files of the job's worker processes (see shared/stage_logs.py). Nodes the autoscaler
already removed took their files with them. What the driver prints after this point (the final traceback lines of
a failure) is not in ``driver.log``; ``error.txt`` has the traceback itself.

Saving is best effort: a stage is never failed, nor a failure hidden, because its logs could not be copied; the
reason is logged as a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from typing import Any

from shared.config import JobConfig, StorageConfig
from shared.errors import first_line
from shared.stage import Stage
from shared.stage_logs import ERROR, LOGS, RECORD, job_files, node_folder, save_files
from shared.storage import Storage

log = logging.getLogger("scopeforge")
SAVE_TIMEOUT_S = 120.0
CLOCK_SKEW_S = 10.0
"""Files last written this long before the attempt began still count (node clocks differ a little)."""


def submission_id() -> str | None:
    """The Jobs API submission ID this driver runs under (the job supervisor passes it in the job config), if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        value = json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None
    return str(value) if value else None


def save_stage_logs(stage: Stage, cfg: JobConfig, error: BaseException | None = None) -> str | None:
    """Copy the attempt's logs to ``<stage>/logs/<attempt>/``; returns that URI, or None when nothing was saved."""
    if stage.attempt is None:
        return None
    dest = stage.root.child(LOGS, stage.attempt)
    try:
        written = _save(dest, cfg.storage, error, stage.started_at - CLOCK_SKEW_S)
        record = _record(stage, cfg, error, written)
        dest.write_json(record, RECORD)
    except Exception as exc:  # best effort: see the module's docstring
        log.warning("stage %s: could not save the logs of attempt %s to %s (%s)", stage.uri, stage.attempt,
                    dest.uri(), first_line(exc))
        return None
    log.info("stage %s: logs of attempt %s saved to %s (%d files)", stage.uri, stage.attempt, dest.uri(),
             len(written))
    return dest.uri()


def _save(dest: Storage, storage: StorageConfig, error: BaseException | None, since: float) -> list[str]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if error is not None:
        dest.write_text("".join(traceback.format_exception(error)), ERROR)
    job_id = ray.get_runtime_context().get_job_id()
    sid = submission_id()
    copy = ray.remote(num_cpus=0, max_retries=0)(_copy_node_logs)
    refs = [copy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(dest.uri(), storage, job_id, sid, since,
                    node_folder(node["NodeManagerAddress"], node["NodeID"]))
            for node in ray.nodes() if node.get("Alive")]
    written: list[str] = [ERROR] if error is not None else []
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=SAVE_TIMEOUT_S)
    for ref in ready:
        try:
            written += ray.get(ref)
        except Exception as exc:  # one node's failure does not lose the others' logs
            log.warning("saving one node's logs failed: %s", first_line(exc))
    if pending:
        log.warning("%d node(s) did not save their logs within %.0f s", len(pending), SAVE_TIMEOUT_S)
        for ref in pending:
            ray.cancel(ref, force=True)
    return written


def _copy_node_logs(dest_uri: str, storage: StorageConfig, job_id: str, sid: str | None, since: float, node: str
                    ) -> list[str]:
    """On one node: upload this job's files from the node's Ray log folder."""
    import ray

    logs_dir = ray._private.worker.global_worker.node.get_logs_dir_path()  # no public API names this folder
    return save_files(job_files(logs_dir, job_id, sid, since), Storage(dest_uri, storage), node)


def _error_line(error: BaseException) -> str:
    """The user error's one line (also when raised in a Ray worker), else the innermost cause's first line."""
    from ray_jobs.errors import cause_of, user_message

    return user_message(error) or f"{type(cause_of(error)).__name__}: {first_line(cause_of(error))}"


def _record(stage: Stage, cfg: JobConfig, error: BaseException | None, written: list[str]) -> dict[str, Any]:
    import ray

    return {"stage": stage.name, "job": cfg.JOB, "attempt": stage.attempt, "config_hash": stage.config_hash,
            "ray_job_id": ray.get_runtime_context().get_job_id(), "submission_id": submission_id(),
            "outcome": "failed" if error is not None else "succeeded",
            "error": _error_line(error) if error is not None else None,
            "started_at": stage.started_at, "ended_at": time.time(), "files": sorted(written)}
