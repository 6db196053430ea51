"""Kopf handlers of the Pipeline custom resource.

One level-triggered handler, a timer per unfinished Pipeline: it reads the Pipeline and the RayJobs it owns, asks the
pure state machine (``operators.reconcile.plan``) what to do, creates at most the next RayJob and writes the status.
Because the decision depends only on what the API server holds (and RayJob names are deterministic), an operator
restarted at any moment resumes where the previous one stopped: nothing is created twice, nothing is skipped.

Errors: a spec that cannot run (unknown job, a stage config that fails validation, a RayJob the API server refuses)
marks the Pipeline Failed with a condition that says why and raises ``kopf.PermanentError`` (logged once per tick
until the timer stops on the Failed phase); a missing storage Secret or an API hiccup is a ``kopf.TemporaryError``:
the condition says what is missing and Kopf retries, the operator never crash-loops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import kopf

from operators import reconcile
from operators.kube import ApiError, Kube, namespaced
from shared.errors import UserError
from shared.manifests import render
from shared.manifests.spec import GROUP, PLURAL, VERSION, parse_pipeline


@dataclass(frozen=True)
class OperatorSettings:
    interval_s: float = 10.0
    """Seconds between two reconciliations of an unfinished Pipeline."""
    image: str = render.DEFAULT_IMAGE
    """Image of the stage clusters when a Pipeline names none."""

    @classmethod
    def from_env(cls) -> OperatorSettings:
        return cls(interval_s=float(os.environ.get("SCOPEFORGE_RECONCILE_SECONDS", "10")),
                   image=os.environ.get("SCOPEFORGE_IMAGE") or render.DEFAULT_IMAGE)


def _unfinished(status: dict[str, Any], **_: Any) -> bool:
    return (status or {}).get("phase") not in reconcile.TERMINAL_PHASES


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

        rayjobs_path = namespaced("ray.io", "v1", "rayjobs", namespace)
        try:
            owned = await kube.list(rayjobs_path, {render.LABEL_PIPELINE_UID: meta["uid"]})
        except ApiError as exc:
            raise kopf.TemporaryError(f"cannot list RayJobs: {exc}", delay=settings.interval_s) from None
        step = reconcile.plan(pipeline, dict(meta), body["apiVersion"], current, owned, settings.image)

        if step.create and pipeline.spec.storageSecret:
            secret = pipeline.spec.storageSecret
            if await kube.get(namespaced("", "v1", "secrets", namespace, secret)) is None:
                message = (f"Secret {namespace}/{secret} (spec.storageSecret: object-storage credentials) not found; "
                           "create it, the pipeline starts once it exists")
                patch.status.update(reconcile.waiting_for_secret(current, message, generation))
                if current.get("message") != message:
                    kopf.warn(body, reason="SecretMissing", message=message)
                raise kopf.TemporaryError(message, delay=settings.interval_s)

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
                    patch.status.update(reconcile.invalid(current, message, generation))
                    patch.status["conditions"][0]["reason"] = "RayJobRejected"
                    kopf.warn(body, reason="RayJobRejected", message=message)
                    raise kopf.PermanentError(message) from None
                raise kopf.TemporaryError(f"cannot create RayJob: {exc}", delay=settings.interval_s) from None
            if not created:
                logger.info("RayJob %s already exists (created before a restart?)", manifest["metadata"]["name"])
        for reason, message in step.events:
            kopf.info(body, reason=reason, message=message)
        for reason, message in step.warnings:
            kopf.warn(body, reason=reason, message=message)
        patch.status.update(step.status)
        if step.status["phase"] == "Failed":
            raise kopf.PermanentError(step.status["message"])

    return kube
