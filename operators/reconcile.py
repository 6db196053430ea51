"""The Pipeline state machine, as a pure function of what the API server holds.

``plan(pipeline, meta, status, rayjobs)`` looks at the Pipeline's status and at the RayJobs it owns (found by label,
checked by ownerReference) and returns the status to write and the RayJob to create, if any. Nothing here talks to
Kubernetes, so the same decision comes out whenever it is called: right after the operator (re)starts, on every timer
tick, twice in a row. RayJob names are deterministic (``<pipeline>-<stage>-<uid hash>-<attempt>``, unique across
Pipelines), so a stage is never started twice and never forgotten:

- a stage whose status says Succeeded stays done even if its RayJobs were deleted since;
- otherwise the stage's newest attempt decides: running -> wait; succeeded -> next stage; failed -> the next
  attempt while retries remain, else the Pipeline fails with a condition that says which stage and why;
- a failed attempt whose Ray job may still be running (KubeRay marks a RayJob Failed at its deadline or when its
  submitter fails, while the job can go on for up to ttlSecondsAfterFinished, or for ever on a shared cluster) is
  stopped before its retry starts: the stage goes to Stopping, its RayJob is deleted (KubeRay's finalizer stops the
  Ray job; a cluster the RayJob made is garbage-collected with it), and the next attempt starts once the RayJob is
  gone. The stage's status remembers which RayJob it stops, so a restarted operator carries on;
- an attempt whose cluster is not running ``start_deadline_s`` after KubeRay started it (image pull errors,
  unschedulable pods, a missing Secret) fails with the reason its pods give, and its RayJob is deleted (it is
  stopped before a retry as above; after the last attempt it is deleted too, so its pending pods hold no quota);
- a stage with no RayJob yet is started (attempt 0) once every stage before it succeeded.

Each stage's status mirrors its newest RayJob: jobStatus, jobDeploymentStatus, reason, the RayCluster's name, the
dashboard URL, start and end times.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from operators import startup
from shared.config import dump_config
from shared.manifests import render
from shared.manifests.spec import Pipeline, Stage

Outcome = Literal["Running", "Succeeded", "Failed"]
TERMINAL_PHASES = ("Succeeded", "Failed")
TERMINAL_JOB_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
"""Ray job statuses after which its driver has exited (KubeRay's jobStatus mirrors the Ray Jobs API)."""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rayjob_outcome(body: dict[str, Any]) -> Outcome:
    """What a RayJob's status means for its stage (KubeRay v1: jobStatus of the Ray job, jobDeploymentStatus of the
    RayJob's own lifecycle)."""
    status = body.get("status") or {}
    job = status.get("jobStatus")
    deployment = status.get("jobDeploymentStatus")
    if job == "SUCCEEDED":
        return "Succeeded"
    if job in ("FAILED", "STOPPED") or deployment in ("Failed", "ValidationFailed"):
        return "Failed"
    if deployment == "Complete":  # complete without SUCCEEDED: the job did not succeed
        return "Failed"
    return "Running"


def failure_reason(body: dict[str, Any]) -> str:
    status = body.get("status") or {}
    parts = [p for p in (status.get("reason"), status.get("message")) if p]
    if not parts:
        parts = [f"jobStatus {status.get('jobStatus') or '-'}, jobDeploymentStatus "
                 f"{status.get('jobDeploymentStatus') or '-'}"]
    return " ".join(": ".join(parts).split())


def may_still_run(body: dict[str, Any]) -> bool:
    """Whether the Ray job of a failed RayJob may still be running (its jobStatus is not terminal)."""
    return (body.get("status") or {}).get("jobStatus") not in TERMINAL_JOB_STATUSES


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    """RayJobs to delete (failed attempts whose Ray job must stop before the retry)."""
    events: list[tuple[str, str]] = field(default_factory=list)  # (reason, message), Normal events
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (reason, message), Warning events


def attempts_of(stage: str, rayjobs: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    found = []
    for body in rayjobs:
        labels = (body.get("metadata") or {}).get("labels") or {}
        if labels.get(render.LABEL_STAGE) != stage:
            continue
        try:
            found.append((int(labels.get(render.LABEL_ATTEMPT, "")), body))
        except ValueError:
            continue
    return sorted(found, key=lambda item: item[0])


def condition(kind: str, value: str, reason: str, message: str, previous: list[dict[str, Any]]) -> dict[str, Any]:
    """A status condition; lastTransitionTime moves only when its status value changes."""
    before = next((c for c in previous if c.get("type") == kind), None)
    changed = before is None or before.get("status") != value
    when = now() if before is None or changed else before.get("lastTransitionTime", now())
    return {"type": kind, "status": value, "reason": reason, "message": message, "lastTransitionTime": when}


def invalid(status: dict[str, Any], message: str, generation: int | None, reason: str = "InvalidSpec"
            ) -> dict[str, Any]:
    """The status of a Pipeline whose spec cannot run (or may not, by the operator's policy): Failed, with the
    reason in both conditions."""
    previous = status.get("conditions") or []
    return {
        "phase": "Failed",
        "currentStage": None,
        "message": message,
        "observedGeneration": generation,
        "conditions": [condition("Valid", "False", reason, message, previous),
                       condition("Succeeded", "False", reason, message, previous)],
    }


def blocked(status: dict[str, Any], reason: str, message: str, generation: int | None) -> dict[str, Any]:
    """The status of a Pipeline that cannot go on until something outside it changes (e.g. a RayJob of its name
    that another owner holds): its phase stays, both conditions say why."""
    previous = status.get("conditions") or []
    return {
        "phase": status.get("phase") or "Pending",
        "message": message,
        "observedGeneration": generation,
        "conditions": [condition("Valid", "False", reason, message, previous),
                       condition("Succeeded", "Unknown", reason, message, previous)],
    }


RAYJOB_STATUS_FIELDS = {"jobStatus": "jobStatus", "jobDeploymentStatus": "jobDeploymentStatus", "reason": "reason",
                        "rayCluster": "rayClusterName", "dashboardURL": "dashboardURL", "startTime": "startTime",
                        "endTime": "endTime"}
"""Stage status field -> the RayJob status field it mirrors (KubeRay v1)."""
FRESH = dict.fromkeys(RAYJOB_STATUS_FIELDS)
"""The mirrored fields of an attempt that has just been created (no status yet)."""


def mirrored(body: dict[str, Any]) -> dict[str, Any]:
    status = body.get("status") or {}
    return {key: status.get(source) or None for key, source in RAYJOB_STATUS_FIELDS.items()}


def gpu_problems(pipeline: Pipeline) -> list[str]:
    """Stages whose own cluster's GPUs (resources.gpu per worker) do not match what the job asks per worker
    (``gpus_per_worker``): a GPU job on CPU workers never schedules, a CPU job on GPU workers buys GPU nodes for
    nothing. Not checked for clusterSelector or rayClusterSpec, where stage resources are not used."""
    cluster = pipeline.spec.cluster
    if cluster.clusterSelector is not None or cluster.rayClusterSpec is not None:
        return []
    problems = []
    for stage in pipeline.stages:
        wanted, given = stage.config.gpus_per_worker(), stage.options.resources.gpu
        if (wanted > 0) != (given > 0) or given < math.ceil(wanted):
            problems.append(f"stage '{stage.name}': resources.gpu {given} does not match its {stage.spec.job} "
                            f"config, which asks {wanted:g} GPU per worker (set resources.gpu: "
                            f"{math.ceil(wanted)})")
    return problems


def plan(pipeline: Pipeline, meta: dict[str, Any], api_version: str, status: dict[str, Any],
         rayjobs: list[dict[str, Any]], image: str, *, pods: dict[str, list[dict[str, Any]]] | None = None,
         start_deadline_s: int | None = None, now: dt.datetime | None = None) -> Plan:
    """The next step. ``pods``: the pods of each starting RayJob's cluster, by RayJob name (their problems go into
    the stage's message, and past ``start_deadline_s`` fail the attempt)."""
    name, namespace, uid = meta["name"], meta.get("namespace"), meta["uid"]
    pods = pods or {}
    moment = now or dt.datetime.now(dt.UTC)
    previous_stages = {s.get("name"): s for s in status.get("stages") or [] if isinstance(s, dict)}
    owned = [b for b in rayjobs
             if any(ref.get("uid") == uid for ref in (b.get("metadata") or {}).get("ownerReferences") or [])]
    result = Plan(status={})
    stages_status: list[dict[str, Any]] = []
    phase, current, message = "Running", None, ""
    blocked = False  # an earlier stage is not done: later stages wait
    failure: str | None = None
    total = len(pipeline.stages)
    for index, stage in enumerate(pipeline.stages):
        entry: dict[str, Any] = {"name": stage.name, "job": stage.spec.job, "state": "Pending", "attempts": 0,
                                 "outputURI": None, "rayJob": None, "message": None,
                                 **FRESH}
        before = previous_stages.get(stage.name) or {}
        attempts = attempts_of(stage.name, owned)
        if attempts:
            number, latest = attempts[-1]
            entry.update(attempts=number + 1, rayJob=latest["metadata"]["name"], **mirrored(latest))
        if blocked:
            stages_status.append(entry)
            continue
        if before.get("state") in ("Succeeded", "Failed") and not attempts:
            # done, and its RayJobs deleted since (by hand, or by the operator after a start deadline)
            stages_status.append({**entry, **{k: before.get(k) for k in entry if k in before and k != "stopping"}})
            if before["state"] == "Failed":
                failure, current, blocked = before.get("message") or f"stage '{stage.name}' failed", stage.name, True
            continue
        if before.get("state") == "Succeeded" and rayjob_outcome(attempts[-1][1]) != "Running":
            stages_status.append({**entry, **{k: before.get(k) for k in ("state", "outputURI", "attempts",
                                                                       "rayJob", *RAYJOB_STATUS_FIELDS)},
                                  "state": "Succeeded", "outputURI": stage.uri})
            continue
        if before.get("state") == "Stopping" and before.get("stopping"):
            stopping = next((b for _, b in attempts if b["metadata"]["name"] == before["stopping"]), None)
            number = int(before.get("attempts", 1))  # the stopped attempt was number - 1
            entry.update(attempts=number, rayJob=before["stopping"], message=before.get("message"))
            if stopping is not None:  # still there: delete it, or wait while KubeRay stops its Ray job
                if not (stopping.get("metadata") or {}).get("deletionTimestamp"):
                    result.delete.append(before["stopping"])
                entry.update(state="Stopping", stopping=before["stopping"])
                current, blocked = stage.name, True
                message = (f"stage {index + 1}/{total} {stage.name}: stopping the Ray job of attempt {number} before "
                           f"attempt {number + 1}")
                stages_status.append(entry)
                continue
            result.create.append(_rayjob_for(pipeline, stage, name, namespace, uid, api_version, number, image))
            result.warnings.append(("StageRetried", f"stage {stage.name}: attempt {number} stopped; starting attempt "
                                                    f"{number + 1} of {stage.spec.retries + 1}"))
            entry.update(state="Retrying", attempts=number + 1,
                         rayJob=render.rayjob_name(name, stage.name, number, uid), **FRESH)
            current, blocked = stage.name, True
            message = f"stage {index + 1}/{total} {stage.name}: retrying (attempt {number + 1})"
            stages_status.append(entry)
            continue
        if not attempts:
            result.create.append(_rayjob_for(pipeline, stage, name, namespace, uid, api_version, 0, image))
            result.events.append(("StageStarted", f"stage {stage.name} ({stage.spec.job}) started as RayJob "
                                                  f"{render.rayjob_name(name, stage.name, 0, uid)}"))
            entry.update(state="Running", attempts=1, rayJob=render.rayjob_name(name, stage.name, 0, uid))
            current, blocked = stage.name, True
            message = f"stage {index + 1}/{total} {stage.name}: starting"
            stages_status.append(entry)
            continue
        number, latest = attempts[-1]
        outcome = rayjob_outcome(latest)
        reason = failure_reason(latest)
        late = None
        if outcome == "Running" and startup.starting(latest):
            cluster_pods = pods.get(latest["metadata"]["name"], [])
            late = (startup.deadline_failure(latest, cluster_pods, start_deadline_s, moment)
                    if start_deadline_s is not None else None)
            if late is not None:
                outcome, reason = "Failed", late
            elif startup.pod_problems(cluster_pods):
                entry["message"] = "waiting for the cluster: " + startup.waiting_reason(latest, cluster_pods)
        if outcome == "Succeeded":
            entry.update(state="Succeeded", outputURI=stage.uri)
            if before.get("state") != "Succeeded":
                result.events.append(("StageSucceeded", f"stage {stage.name} succeeded: {stage.uri}"))
        elif outcome == "Running":
            entry.update(state="Retrying" if number else "Running")
            current, blocked = stage.name, True
            message = (f"stage {index + 1}/{total} {stage.name}: attempt {number + 1} of {stage.spec.retries + 1} "
                       "running")
        else:
            entry["message"] = reason
            if number < stage.spec.retries and (late is not None or may_still_run(latest)):
                # recorded first, deleted on the next tick: a restart in between still knows which attempt it was
                result.warnings.append(("StageStopping", f"stage {stage.name} attempt {number + 1} failed ({reason}) "
                                                         "while its Ray job may still run; deleting RayJob "
                                                         f"{latest['metadata']['name']} before the retry"))
                entry.update(state="Stopping", stopping=latest["metadata"]["name"], attempts=number + 1)
                current, blocked = stage.name, True
                message = (f"stage {index + 1}/{total} {stage.name}: stopping the Ray job of attempt {number + 1} "
                           f"before attempt {number + 2}")
            elif number < stage.spec.retries:
                result.create.append(_rayjob_for(pipeline, stage, name, namespace, uid, api_version, number + 1,
                                                 image))
                result.warnings.append(("StageRetried", f"stage {stage.name} attempt {number + 1} failed ({reason}); "
                                                        f"starting attempt {number + 2} of {stage.spec.retries + 1}"))
                entry.update(state="Retrying", attempts=number + 2,
                             rayJob=render.rayjob_name(name, stage.name, number + 1, uid), **FRESH)
                current, blocked = stage.name, True
                message = f"stage {index + 1}/{total} {stage.name}: retrying (attempt {number + 2})"
            else:
                entry["state"] = "Failed"
                failure = (f"stage '{stage.name}' ({stage.spec.job}) failed after {number + 1} "
                           f"attempt{'s' if number else ''}: {reason}")
                entry["message"] = failure
                if late is not None:
                    # Its pending pods would wait for ever: delete the RayJob, but only once the Failed status is
                    # written (a tick that still saw the old status must not find the stage without RayJobs).
                    entry["stopping"] = latest["metadata"]["name"]
                    if before.get("state") == "Failed" and not (latest.get("metadata") or {}).get(
                            "deletionTimestamp"):
                        result.delete.append(latest["metadata"]["name"])
                if before.get("state") != "Failed":
                    result.warnings.append(("StageFailed", failure))
                current, blocked = stage.name, True
        stages_status.append(entry)

    previous = status.get("conditions") or []
    valid = condition("Valid", "True", "SpecValid", "every stage config validates", previous)
    if failure is not None:
        phase, message = "Failed", failure
        done = condition("Succeeded", "False", "StageFailed", failure, previous)
    elif all(s["state"] == "Succeeded" for s in stages_status):
        phase, current = "Succeeded", None
        message = f"all {total} stages succeeded"
        done = condition("Succeeded", "True", "AllStagesSucceeded", message, previous)
    else:
        done = condition("Succeeded", "Unknown", "Running", message, previous)
    succeeded = sum(1 for s in stages_status if s["state"] == "Succeeded")
    stages_status = [{k: v for k, v in s.items() if v is not None} for s in stages_status]
    result.status = {
        "phase": phase,
        "currentStage": current,
        "progress": f"{succeeded}/{total}",
        "message": message,
        "observedGeneration": meta.get("generation"),
        "stages": stages_status,
        "outputs": {s["name"]: s["outputURI"] for s in stages_status if s.get("outputURI")},
        "conditions": [valid, done],
    }
    if phase == "Succeeded" and status.get("phase") != "Succeeded":
        result.events.append(("PipelineSucceeded", message))
    return result


def rayjob_for(pipeline: Pipeline, stage: Stage, meta: dict[str, Any], api_version: str, attempt: int,
               image: str) -> dict[str, Any]:
    """The RayJob of one attempt of a stage, owned by the Pipeline ``meta`` describes."""
    return _rayjob_for(pipeline, stage, meta["name"], meta.get("namespace"), meta["uid"], api_version, attempt, image)


def _rayjob_for(pipeline: Pipeline, stage: Stage, name: str, namespace: str | None, uid: str, api_version: str,
                attempt: int, image: str) -> dict[str, Any]:
    cluster = pipeline.spec.cluster
    owner = {"apiVersion": api_version, "kind": "Pipeline", "name": name, "uid": uid, "controller": True,
             "blockOwnerDeletion": True}
    labels = {render.LABEL_PIPELINE: render.dns1035(name)[:63].rstrip("-"), render.LABEL_PIPELINE_UID: uid,
              render.LABEL_STAGE: stage.name, render.LABEL_ATTEMPT: str(attempt)}
    return render.rayjob(
        render.rayjob_name(name, stage.name, attempt, uid), stage.spec.job, render.config_yaml(_config_data(stage)),
        namespace=namespace, image=pipeline.spec.image or image, storage_secret=pipeline.spec.storageSecret,
        cluster_selector=cluster.clusterSelector, ray_cluster_spec=cluster.rayClusterSpec,
        resources=stage.options.resources, active_deadline_s=stage.options.activeDeadlineSeconds,
        ttl_s=pipeline.spec.ttlSecondsAfterFinished, labels=labels, owner=owner,
    )


def _config_data(stage: Stage) -> dict[str, Any]:
    """The stage's validated config (URIs of earlier stages substituted), without credentials."""
    return yaml.safe_load(dump_config(stage.config))
