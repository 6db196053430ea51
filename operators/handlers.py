"""Kopf handlers of the Pipeline custom resource.

One level-triggered handler, a timer per unfinished Pipeline: it reads the Pipeline and the RayJobs it owns, asks the
pure state machine (``operators.reconcile.plan``) what to do, creates at most the next RayJob and writes the status.
Because the decision depends only on what the API server holds (and RayJob names are deterministic), an operator
restarted at any moment resumes where the previous one stopped: nothing is created twice, nothing is skipped. The
operator keeps no state of its own (no volume, no leader lease: one replica, ``--standalone``), so its restart story
is the Deployment's: a new pod re-reads every Pipeline and its RayJobs and carries on.

Errors: a spec that cannot run (unknown job, a stage config that fails validation, a rule of the operator's policy
broken, stage GPUs that do not match the job's, a RayJob the API server refuses) marks the Pipeline Failed with a
Valid=False condition that says why and raises ``kopf.PermanentError`` (logged once per tick until the timer stops
on the Failed phase); a RayJob name held by an object the Pipeline does not own, or an API hiccup, is a
``kopf.TemporaryError``: the condition says what blocks it and Kopf retries, the operator never crash-loops.

The operator reads no Secret (its RBAC grants none): a missing storage Secret shows in the stage's status as its
pods' CreateContainerConfigError, and fails the attempt at the start deadline.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from operators import policy, reconcile, startup
from operators.config import OperatorSettings
from operators.kube import ApiError, Kube, namespaced
from shared.errors import UserError
from shared.manifests import render
from shared.manifests.spec import GROUP, PLURAL, VERSION, Pipeline, parse_pipeline

__all__ = ["OperatorSettings", "register"]


def _refused(pipeline: Pipeline, meta: dict[str, Any], api_version: str, settings: OperatorSettings
             ) -> tuple[str, str] | None:
    """(reason, message) when the Pipeline breaks the operator's policy or its stages' GPUs do not match their jobs;
    checked on the RayJobs of every stage before the first starts."""
    gpus = reconcile.gpu_problems(pipeline)
    if gpus:
        return "GpuMismatch", "; ".join(gpus)
    rayjobs = [reconcile.rayjob_for(pipeline, stage, meta, api_version, 0, settings.image)
               for stage in pipeline.stages]
    problems = policy.violations(settings.policy, pipeline, rayjobs, settings.image)
    if problems:
        return "PolicyViolation", "; ".join(problems)
    return None


def _unfinished(status: dict[str, Any], **_: Any) -> bool:
    """Running, or Failed with a RayJob still to delete (a stage past its start deadline)."""
    status = status or {}
    return status.get("phase") not in reconcile.TERMINAL_PHASES or any(
        isinstance(s, dict) and s.get("stopping") for s in status.get("stages") or [])


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> Kube:
    """Register the handlers on ``registry``; returns the API client they share."""
    kube = Kube()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.INFO
        settings.persistence.finalizer = f"{GROUP}/operator"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo:
        return kube.login(**kwargs)

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        await kube.close()

    @kopf.timer(GROUP, VERSION, PLURAL, id="reconcile", interval=settings.interval_s, when=_unfinished,
                registry=registry)
    async def reconcile_pipeline(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
                                 patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
        name, namespace = meta["name"], meta.get("namespace") or "default"
        current = dict(status or {})
        generation = meta.get("generation")
        try:
            pipeline = parse_pipeline(dict(spec), source=f"Pipeline {namespace}/{name}")
        except UserError as exc:
            message = str(exc)
            patch.status.update(reconcile.invalid(current, message, generation))
            kopf.warn(body, reason="InvalidSpec", message=message)
            raise kopf.PermanentError(message) from None

        refused = _refused(pipeline, dict(meta), body["apiVersion"], settings)
        if refused is not None:
            reason, message = refused
            patch.status.update(reconcile.invalid(current, message, generation, reason))
            kopf.warn(body, reason=reason, message=message)
            raise kopf.PermanentError(message)

        rayjobs_path = namespaced("ray.io", "v1", "rayjobs", namespace)
        try:
            owned = await kube.list(rayjobs_path, {render.LABEL_PIPELINE_UID: meta["uid"]})
            pods = await _starting_pods(kube, namespace, owned)
        except ApiError as exc:
            raise kopf.TemporaryError(f"cannot list RayJobs or their pods: {exc}", delay=settings.interval_s) from None
        step = reconcile.plan(pipeline, dict(meta), body["apiVersion"], current, owned, settings.image, pods=pods,
                              start_deadline_s=settings.start_deadline_s)

        for rayjob in step.delete:
            try:
                # Foreground: the RayJob stays (being deleted) until what it owns is gone; KubeRay's finalizer
                # stops its Ray job first. The next tick sees it still there, and waits.
                await kube.delete(namespaced("ray.io", "v1", "rayjobs", namespace, rayjob), "Foreground")
            except ApiError as exc:
                raise kopf.TemporaryError(f"cannot delete RayJob {rayjob}: {exc}", delay=settings.interval_s) from None
            logger.info("RayJob %s deleted: its Ray job must stop before the stage is retried", rayjob)
        for manifest in step.create:
            try:
                created = await kube.create(rayjobs_path, manifest)
            except ApiError as exc:
                if 400 <= exc.status < 500 and exc.status not in (401, 403, 429):
                    message = f"RayJob {manifest['metadata']['name']} rejected by the API server: {exc.message}"
                    patch.status.update(reconcile.invalid(current, message, generation, "RayJobRejected"))
                    kopf.warn(body, reason="RayJobRejected", message=message)
                    raise kopf.PermanentError(message) from None
                raise kopf.TemporaryError(f"cannot create RayJob: {exc}", delay=settings.interval_s) from None
            if not created:
                await _adopt_or_block(kube, manifest, meta["uid"], current, generation, patch, body, logger,
                                      settings.interval_s)
        for reason, message in step.events:
            kopf.info(body, reason=reason, message=message)
        for reason, message in step.warnings:
            kopf.warn(body, reason=reason, message=message)
        patch.status.update(step.status)
        if step.status["phase"] == "Failed":
            raise kopf.PermanentError(step.status["message"])

    return kube


async def _starting_pods(kube: Kube, namespace: str, rayjobs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The pods of the cluster of every RayJob that waits for its cluster, by RayJob name (label ray.io/cluster)."""
    out = {}
    for rayjob in rayjobs:
        cluster = startup.cluster_name(rayjob)
        if startup.starting(rayjob) and cluster:
            out[rayjob["metadata"]["name"]] = await kube.list(namespaced("", "v1", "pods", namespace),
                                                              {"ray.io/cluster": cluster})
    return out


async def _adopt_or_block(kube: Kube, manifest: dict[str, Any], uid: str, current: dict[str, Any],
                          generation: int | None, patch: kopf.Patch, body: kopf.Body, logger: logging.Logger,
                          delay: float) -> None:
    """A 409 on create: fine when the RayJob is the Pipeline's own (created just before a restart, not listed yet);
    a NameConflict condition, retried, when another owner holds the name."""
    name, namespace = manifest["metadata"]["name"], manifest["metadata"].get("namespace") or "default"
    try:
        existing = await kube.get(namespaced("ray.io", "v1", "rayjobs", namespace, name))
    except ApiError as exc:
        raise kopf.TemporaryError(f"cannot read RayJob {name}: {exc}", delay=delay) from None
    owners = ((existing or {}).get("metadata") or {}).get("ownerReferences") or []
    if existing is None or any(ref.get("uid") == uid for ref in owners):
        logger.info("RayJob %s already exists (created before a restart?)", name)
        return
    holder = ", ".join(f"{ref.get('kind')} {ref.get('name')}" for ref in owners) or "no owner"
    message = (f"RayJob {namespace}/{name} already exists and is not this Pipeline's ({holder}); the stage waits "
               "until it is deleted")
    patch.status.update(reconcile.blocked(current, "NameConflict", message, generation))
    if current.get("message") != message:
        kopf.warn(body, reason="NameConflict", message=message)
    raise kopf.TemporaryError(message, delay=delay)
