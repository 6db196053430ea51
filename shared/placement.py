"""Where a worker computes: the torch device and the number of threads for the resources it was given.

    device = choose_device("evaluate", "actor", requested_gpus=1, visible_gpus=torch.cuda.device_count())
    threads = thread_count(assigned_cpus=2.0, explicit=None, cores=usable_cores())

Pure decisions, no Ray: ``ray_jobs/placement.py`` reads what Ray assigned to a task, actor or Ray Train worker and
applies them. The rules:

- a worker that requested no GPU computes on the CPU;
- a worker that requested GPUs computes on the first visible CUDA device (Ray sets CUDA_VISIBLE_DEVICES to the
  GPUs it assigned, so that one is its own), and one that finds none visible fails with one line naming the stage
  and the request: it never falls back to the CPU while a GPU sits reserved;
- torch threads follow the CPUs the worker reserved (at least one), capped by the cores this process may use (its
  CPU affinity and the container's CPU quota), never the node's whole ``os.cpu_count()``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.errors import UserError


class PlacementError(UserError):
    """A worker cannot compute where its stage asked it to (a GPU reserved but none visible)."""


@dataclass(frozen=True)
class Placement:
    """What one worker decided, as recorded in its stage's metrics."""

    stage: str
    role: str
    """The kind of worker: 'embed actor', 'training worker', 'fit task', ..."""
    device: str
    threads: int
    requested_gpus: float
    assigned_cpus: float | None
    node: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def choose_device(stage: str, role: str, requested_gpus: float, visible_gpus: int, assigned_gpu_ids: list[str],
                  local_index: int = 0) -> str:
    """'cpu' without a GPU request, else 'cuda:<local_index>'; a request with no visible GPU is an error."""
    if requested_gpus <= 0:
        return "cpu"
    if visible_gpus <= local_index:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise PlacementError(
            f"stage {stage}: its {role} requested {requested_gpus:g} GPU(s) but sees "
            f"{'no' if visible_gpus == 0 else visible_gpus} CUDA device(s) (Ray assigned GPU ids "
            f"{', '.join(assigned_gpu_ids) or 'none'}; CUDA_VISIBLE_DEVICES={visible!r}); it will not compute on the "
            "CPU instead: install a CUDA build of torch on the GPU nodes, or set the GPU request to 0")
    return f"cuda:{local_index}"


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the container's cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None if unlimited."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by the container's CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def thread_count(assigned_cpus: float | None, explicit: int | None, cores: int) -> int:
    """torch intra-op threads: ``explicit`` if given, else the reserved CPUs (at least one, at most ``cores``);
    without a reservation (outside Ray) every usable core."""
    if explicit:
        return int(explicit)
    if assigned_cpus is None:
        return cores
    return max(1, min(cores, int(assigned_cpus)))
