"""Running one job: connect to (or start) Ray, open its stage, skip it when already done, commit it at the end."""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

from ray_jobs.errors import hide_user_error_logs
from shared.config import JobConfig, config_hash, dump_config
from shared.configs import JOB_CONFIGS
from shared.errors import UserError, first_line
from shared.stage import Stage, locate
from shared.storage import Storage, split_uri

log = logging.getLogger("scopeforge")


def job_module(name: str):
    """``ray_jobs.<name with - as _>``: the module holding the job's ``run(cfg, stage)``."""
    if name not in JOB_CONFIGS:
        raise UserError(f"unknown job {name!r} (known: {', '.join(sorted(JOB_CONFIGS))})")
    return importlib.import_module(f"ray_jobs.{name.replace('-', '_')}")


def init_ray(address: str | None = None, *, dashboard: bool = False) -> None:
    """Connect to ``address`` (or RAY_ADDRESS); without one, start a local instance that cannot deadlock on 2 cores.

    The local instance has at least 4 logical CPUs (actor pools use fractional CPUs, so read tasks always find a
    slot), keeps token authentication on, and listens on loopback only (``local_only``).
    """
    import ray

    global _LOCAL
    if ray.is_initialized():
        return
    # Ray Train workers keep the driver's working directory, so relative input paths mean the same in every process.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as exc:  # ConnectionError, TimeoutError, RuntimeError from the GCS client
            raise UserError(f"Ray address {address}: cannot connect ({first_line(exc)})") from None
        return
    local_only()
    _LOCAL = True
    store_mb = int(os.environ.get("SCOPEFORGE_OBJECT_STORE_MB", "2048"))
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        object_store_memory=store_mb * 1024 * 1024,
        include_dashboard=dashboard,
        dashboard_host=LOOPBACK,
        log_to_driver=True,
    )
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance advertises {node_ip}, not {LOOPBACK}: it would listen on the "
                           "network; refusing to run (see local_only in ray_jobs/runtime.py)")


LOOPBACK = "127.0.0.1"
_LOCAL = False


def started_locally() -> bool:
    """Whether this process started the (single-node, loopback-only) Ray instance it runs on."""
    return _LOCAL


def local_only() -> None:
    """Make the Ray instance this process starts advertise 127.0.0.1 and bind every socket there.

    Ray picks its node address when the instance starts: with clusters enabled (the default on Linux) it is the
    address that routes to the internet, and every gRPC server (GCS, raylet, object manager, workers, the driver,
    the dashboard agent) then listens on all interfaces; with clusters disabled it is 127.0.0.1 and they listen on
    loopback. The switch is the environment variable RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads once at
    import. The child processes read it from the environment; this process imported Ray before it knew whether it
    would start an instance (job modules import ray.data), so its constant is set too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def upstream_hash(uri: str, cfg: JobConfig) -> str | None:
    """``stage:config hash:attempt`` of the finished stage an input belongs to (the URI itself, or a path inside it
    such as ``<stage>/heldout``); None for plain data, aliases and hub ids. The attempt id makes a stage rerun when
    its input stage was redone (e.g. forced) with the same config."""
    if not uri:
        return None
    found = locate(uri, cfg.storage)
    if found.stage is None or found.marker is None:
        return None
    return f"{found.stage}:{found.marker.get('config_hash', '')}:{found.marker.get('attempt', '')}"


def open_stage(cfg: JobConfig) -> Stage:
    """The stage this config writes, with a hash that covers the config and the hashes of its inputs."""
    if split_uri(cfg.output_root)[0] == "memory":
        raise UserError(f"output_root {cfg.output_root}: memory:// is visible to one process only; Ray jobs need a "
                        "local path or s3://")
    root = Storage(cfg.output_root, cfg.storage)
    root.check_writable()
    hashes = [upstream_hash(uri, cfg) for uri in cfg.input_uris()]
    upstream = [h for h in hashes if h]
    return Stage.open(root, cfg.stage_name, cfg.JOB, config_hash(cfg, upstream))


def run_job(cfg: JobConfig, *, ray_address: str | None = None, force: bool = False, dashboard: bool = False
            ) -> dict[str, Any]:
    """Run one job to a committed stage; returns its metrics. A stage already done with this config is skipped.

    Each run is a new attempt of the stage (``shared/stage.py``): it writes under its own folder, takes the lease,
    and commits only if it still holds it, so a crashed or concurrent attempt never leaves a stage half written.
    """
    module = job_module(cfg.JOB)
    # Ray workers (Ray Train's ones chdir to their run folder) must not resolve a relative root against their own
    # working directory: the stage is addressed by an absolute path (output_root is not part of the config hash).
    cfg = cfg.model_copy(update={"output_root": Storage(cfg.output_root, cfg.storage).uri()})
    stage = open_stage(cfg)
    status = stage.status()
    if status == "done" and not force:
        log.info("stage %s is already done for this config (hash %s): skipping; use --force to rerun",
                 stage.uri, stage.config_hash)
        return stage.metrics()
    check = getattr(module, "check", None)
    if check is not None:
        check(cfg)  # a job may refuse bad inputs here: before its stage is opened and before Ray starts
    init_ray(ray_address, dashboard=dashboard)
    hide_user_error_logs()
    from ray_jobs.placement import check_gpu_request, open_ledger, placements
    from ray_jobs.stage_logs import save_stage_logs

    check_gpu_request(cfg.stage_name, cfg.gpus_per_worker(), started_locally())
    open_ledger(stage.name)
    attempt = stage.begin(dump_config(cfg), fresh=force)
    log.info("stage %s: job %s, config hash %s, attempt %s%s", stage.uri, cfg.JOB, stage.config_hash, attempt,
             " (after an unfinished attempt)" if status == "incomplete" else "")
    try:
        metrics = module.run(cfg, stage)
        where = placements(stage.name)
        if where:
            metrics["placement"] = where  # where each kind of worker computed, and with how many threads
        stage.commit(metrics)
    except Exception as exc:
        save_stage_logs(stage, cfg, exc)  # <stage>/logs/<attempt>/: outlives the cluster (ray_jobs/stage_logs.py)
        raise
    save_stage_logs(stage, cfg)
    log.info("stage %s done in %.1f s (attempt %s)", stage.uri, time.time() - stage.started_at, attempt)
    return metrics
