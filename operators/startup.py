"""Why a stage's cluster is not running yet, and the start deadline.

KubeRay before v1.6 has no deadline for a RayJob that never gets its cluster running (v1.6 added
``preRunningDeadlineSeconds``, which fails it without saying why), so an image that cannot be pulled or pods that
no node can take would keep a stage Running for ever. The operator reads the pods of the stage's RayCluster (label
``ray.io/cluster``) and reports what they say while it waits; past the deadline the attempt fails with that reason.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

STARTING = (None, "", "New", "Initializing", "Waiting")
"""jobDeploymentStatus values of a RayJob whose cluster or job has not started (Suspended, i.e. queued, is not one)."""
QUIET_WAITING = ("ContainerCreating", "PodInitializing")


def starting(rayjob: dict[str, Any]) -> bool:
    """Whether the RayJob waits for its cluster (and is not held suspended, e.g. queued by Kueue)."""
    if (rayjob.get("spec") or {}).get("suspend"):
        return False
    return (rayjob.get("status") or {}).get("jobDeploymentStatus") in STARTING


def cluster_name(rayjob: dict[str, Any]) -> str | None:
    return (rayjob.get("status") or {}).get("rayClusterName") or None


def _time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def waited_s(rayjob: dict[str, Any], now: dt.datetime) -> float:
    """Seconds since KubeRay started the RayJob (status.startTime), else since it was created."""
    since = _time((rayjob.get("status") or {}).get("startTime")) or _time(
        (rayjob.get("metadata") or {}).get("creationTimestamp"))
    return 0.0 if since is None else (now - since).total_seconds()


def pod_problems(pods: list[dict[str, Any]]) -> list[str]:
    """What pods say stops them: a container waiting for a reason (ImagePullBackOff, ErrImagePull,
    CreateContainerConfigError for a missing Secret, CrashLoopBackOff), or not scheduled (Unschedulable)."""
    problems = []
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        name = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                problems.append(_line(f"pod {name}", cond.get("reason") or "Unschedulable", cond.get("message")))
        for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason and reason not in QUIET_WAITING:
                problems.append(_line(f"pod {name} container {container.get('name', '?')}", reason,
                                      waiting.get("message")))
    return problems


def _line(where: str, reason: str, message: str | None) -> str:
    text = f"{where}: {reason}" + (f": {message}" if message else "")
    return " ".join(text.split())[:400]


def waiting_reason(rayjob: dict[str, Any], pods: list[dict[str, Any]]) -> str:
    """One line: why the RayJob's cluster is not running, from its pods, else from the RayJob's own status."""
    problems = pod_problems(pods)
    if problems:
        return "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
    status = rayjob.get("status") or {}
    if not status:
        return "the RayJob has no status yet: is the KubeRay operator running and watching this namespace?"
    cluster = cluster_name(rayjob)
    state = (status.get("rayClusterStatus") or {}).get("state")
    return (f"RayCluster {cluster or '-'} not ready (jobDeploymentStatus {status.get('jobDeploymentStatus') or '-'}"
            f", cluster state {state or '-'}, {len(pods)} pod{'s' if len(pods) != 1 else ''}"
            f"{', none reporting a problem' if pods else ''})")


def deadline_failure(rayjob: dict[str, Any], pods: list[dict[str, Any]], deadline_s: int,
                     now: dt.datetime) -> str | None:
    """The failure reason when the RayJob has waited past ``deadline_s`` for its cluster, else None."""
    if not starting(rayjob) or waited_s(rayjob, now) < deadline_s:
        return None
    return f"StartDeadlineExceeded: cluster not running {deadline_s} s after the start: {waiting_reason(rayjob, pods)}"
