"""The one place a Ray worker decides where it computes (``shared/placement.py`` holds the rules).

    placement = claim(cfg.stage_name, "embed actor", cfg.runtime.gpus_per_actor, cfg.runtime.threads)
    model.to(placement.device)

Call it first thing in a task, an actor's constructor or a Ray Train worker: it reads the CPUs and GPUs Ray assigned
to this worker, picks the torch device, sets torch's thread count, and records the decision in a small ledger actor,
so the stage's metrics say where each kind of worker computed (``placements``). The driver checks up front that the
local Ray instance can satisfy a GPU request at all (``check_gpu_request``): otherwise Ray would wait for ever.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shared.errors import UserError
from shared.placement import Placement, choose_device, thread_count, usable_cores

LEDGER = "scopeforge-placements"


@ray.remote(num_cpus=0)
class PlacementLedger:
    """Placements reported by the workers of this driver's job, by stage."""

    def __init__(self) -> None:
        self.entries: dict[str, list[dict[str, Any]]] = {}

    def record(self, entry: dict[str, Any]) -> None:
        self.entries.setdefault(entry["stage"], []).append(entry)

    def of(self, stage: str) -> list[dict[str, Any]]:
        return list(self.entries.get(stage, []))

    def reset(self, stage: str) -> None:
        self.entries.pop(stage, None)


_LEDGER: tuple[str, Any] | None = None
"""(Ray job id, the driver's handle): an actor lives as long as its owner holds its handle."""


def open_ledger(stage: str) -> None:
    """Start recording the placements of ``stage`` (the ledger is created on first use; workers find it by name in
    the job's namespace)."""
    global _LEDGER
    context = ray.get_runtime_context()
    job = context.get_job_id()
    if _LEDGER is not None and _LEDGER[0] == job:
        try:
            ray.get(_LEDGER[1].reset.remote(stage))
            return
        except ray.exceptions.ActorDiedError:  # its node went away (an autoscaler removed it): start another
            pass
    # once per Ray connection (replacing the owner's handle ends the actor), on the driver's node (the head on a
    # cluster, which autoscaling never removes)
    for _ in range(40):
        ledger = PlacementLedger.options(  # type: ignore[attr-defined]  # @ray.remote
            name=LEDGER, get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(context.get_node_id(), soft=True))
        _LEDGER = (job, ledger.remote())
        try:
            ray.get(_LEDGER[1].reset.remote(stage))
            return
        except ray.exceptions.ActorDiedError:  # the dead ledger still holds its name for a moment
            time.sleep(0.25)
    raise RuntimeError("the placement ledger actor cannot be started")


def claim(stage: str, role: str, gpus: float, threads: int | None = None, *, train: bool = False) -> Placement:
    """Device and torch threads for this worker, from what Ray assigned to it; ``train``: a Ray Train worker, whose
    GPU is its local rank's among the node's visible ones."""
    import torch

    context = ray.get_runtime_context()
    assigned = context.get_assigned_resources()
    gpu_ids = [str(i) for i in context.get_accelerator_ids().get("GPU", [])]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local = ray.train.get_context().get_local_rank() if train and gpus > 0 else 0
    device = choose_device(stage, role, gpus, visible, gpu_ids, local)
    if device != "cpu":
        torch.cuda.set_device(device)
    placement = Placement(stage=stage, role=role, device=device,
                          threads=thread_count(assigned.get("CPU"), threads, usable_cores()),
                          requested_gpus=float(gpus), assigned_cpus=assigned.get("CPU"),
                          node=context.get_node_id())
    torch.set_num_threads(placement.threads)
    try:
        ray.get_actor(LEDGER).record.remote(placement.to_dict())
    except ValueError:  # no ledger (a worker run outside scopeforge's runtime): nothing to record into
        pass
    return placement


def placements(stage: str) -> dict[str, Any]:
    """Per role: how many workers computed on which device and node, with how many threads (for the stage's
    metrics)."""
    try:
        entries = ray.get(ray.get_actor(LEDGER).of.remote(stage))
    except ValueError:
        return {}
    summary: dict[str, Any] = {}
    for e in entries:
        role = summary.setdefault(e["role"], {"workers": 0, "devices": {}, "threads": [], "requested_gpus": 0.0,
                                              "assigned_cpus": e["assigned_cpus"], "nodes": {}})
        role["workers"] += 1
        role["nodes"][e["node"]] = role["nodes"].get(e["node"], 0) + 1
        role["devices"][e["device"]] = role["devices"].get(e["device"], 0) + 1
        role["threads"] = sorted(set(role["threads"]) | {e["threads"]})
        role["requested_gpus"] = e["requested_gpus"]
    return summary


def check_gpu_request(stage: str, gpus: float, local: bool) -> None:
    """Before any work: a GPU request that the local Ray instance can never satisfy is a one-line error (Ray would
    otherwise queue the workers for ever). On a cluster the autoscaler may still add GPU nodes, so it only warns."""
    if gpus <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0.0)
    if have >= gpus:
        return
    if local:
        raise UserError(f"stage {stage} requests {gpus:g} GPU(s) per worker, but the local Ray instance has "
                        f"{have:g} (this machine has no CUDA device Ray can see); set the GPU request to 0, or run "
                        "on a cluster with GPUs (RAY_ADDRESS)")
    print(f"stage {stage}: requests {gpus:g} GPU(s) per worker; the cluster has {have:g} now, so its workers wait "
          "for the autoscaler to add GPU nodes", flush=True)

