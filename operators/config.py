"""The operator's own configuration: how often it reconciles, the image of stage clusters, the start deadline, and
the policy a Pipeline must meet.

Read from the YAML file named by ``SCOPEFORGE_OPERATOR_CONFIG`` (the Deployment mounts the ConfigMap
``scopeforge-operator-config`` there); the environment variables ``SCOPEFORGE_IMAGE``,
``SCOPEFORGE_RECONCILE_SECONDS`` and ``SCOPEFORGE_START_DEADLINE_SECONDS`` override single fields. A bad file stops
the operator at start with a one-line ``ConfigError`` naming the key; it never runs on a half-read policy.

Why a policy: whoever may create a Pipeline in a namespace picks what its pods run (image, cluster spec, Secrets,
service account), so Pipeline-create is as strong as pod-create there (as RayJob-create is). The operator only lets
through what its administrator allows; see ``operators.policy``.
"""

from __future__ import annotations

import os

from pydantic import Field

from shared.config import StrictModel, load_config, validate_config
from shared.manifests import render

CONFIG_ENV = "SCOPEFORGE_OPERATOR_CONFIG"


class PipelinePolicy(StrictModel):
    """What a Pipeline may ask for. A Pipeline outside it fails with a Valid=False condition naming the rule."""

    image_prefixes: list[str] = Field(default_factory=list)
    """Prefixes every image of a Pipeline's pods must start with besides the operator's own stage image (e.g.
    "ghcr.io/acme/"): spec.image, and the images of a raw rayClusterSpec. Empty: only the operator's image."""
    raw_cluster_specs: bool = False
    """Whether a Pipeline may give spec.cluster.rayClusterSpec, a KubeRay cluster spec used as given (any pod
    field: host paths, privileged containers). Off: only the clusters the operator renders, or clusterSelector."""
    secrets: list[str] = Field(default_factory=lambda: ["scopeforge-storage"])
    """Secrets of its own namespace a Pipeline's pods may reference (spec.storageSecret, env, volumes,
    imagePullSecrets). The operator never reads a Secret; this only limits which ones a Pipeline may name."""
    service_accounts: list[str] = Field(default_factory=list)
    """Service accounts a stage's pods may run as (serviceAccountName, e.g. one bound to a cloud role through IRSA
    or workload identity). Empty: a Pipeline may name none, and its pods run as the namespace's default."""


class OperatorSettings(StrictModel):
    """The operator's configuration file (YAML), one ConfigMap for the whole operator."""

    interval_s: float = Field(10.0, gt=0)
    """Seconds between two reconciliations of an unfinished Pipeline."""
    image: str = Field(render.DEFAULT_IMAGE, min_length=1)
    """Image of the stage clusters when a Pipeline names none (the kustomize image setting fills it in)."""
    start_deadline_s: int = Field(900, ge=1)
    """Seconds a stage's RayJob may take to get its cluster running (counted from KubeRay's start time, so not
    while Kueue holds it suspended). Past it the attempt fails with the reason its pods give (ImagePullBackOff,
    Unschedulable, a missing Secret) and its RayJob is deleted, so pending pods hold no quota."""
    policy: PipelinePolicy = Field(default_factory=PipelinePolicy)
    """What a Pipeline may ask for."""

    @classmethod
    def from_env(cls) -> OperatorSettings:
        """The file named by SCOPEFORGE_OPERATOR_CONFIG (optional), then the single-field environment overrides."""
        path = os.environ.get(CONFIG_ENV)
        settings = load_config(cls, path) if path else cls()
        overrides = {key: os.environ[env] for key, env in (("image", "SCOPEFORGE_IMAGE"),
                                                          ("interval_s", "SCOPEFORGE_RECONCILE_SECONDS"),
                                                          ("start_deadline_s", "SCOPEFORGE_START_DEADLINE_SECONDS"))
                     if os.environ.get(env)}
        if not overrides:
            return settings
        data = {**settings.model_dump(), **overrides}
        return validate_config(cls, data, f"{path or 'operator settings'} (with environment overrides)")
