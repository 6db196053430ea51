"""The operator's policy, checked on what a Pipeline would create: every stage's rendered RayJob.

Checking the rendered objects rather than the Pipeline's fields means every route into a pod spec is covered (the
Pipeline's image, a raw rayClusterSpec, storageSecret, whatever stage options render into pods), now and when new
stage options appear. Each problem is one line that names the rule of ``PipelinePolicy`` it breaks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from operators.config import PipelinePolicy
from shared.manifests.spec import Pipeline


@dataclass
class References:
    """What pod specs inside an object refer to."""

    images: set[str] = field(default_factory=set)
    secrets: set[str] = field(default_factory=set)
    service_accounts: set[str] = field(default_factory=set)


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk(value)


def references(obj: Any) -> References:
    """Images, Secrets and service accounts named anywhere in ``obj`` (containers, the autoscaler, envFrom /
    valueFrom, secret and projected volumes, CSI secret refs, imagePullSecrets, serviceAccountName)."""
    found = References()
    for key, value in _walk(obj):
        if key == "image" and isinstance(value, str):
            found.images.add(value)
        elif key == "serviceAccountName" and isinstance(value, str) and value:
            found.service_accounts.add(value)
        elif key == "imagePullSecrets" and isinstance(value, list):
            found.secrets.update(v["name"] for v in value if isinstance(v, dict) and v.get("name"))
        elif key == "secret" and isinstance(value, dict):  # a secret volume, or a projected volume's source
            name = value.get("secretName") or value.get("name")
            if name:
                found.secrets.add(name)
        elif key.lower().endswith("secretref") and isinstance(value, dict) and value.get("name"):
            found.secrets.add(value["name"])  # envFrom secretRef, valueFrom secretKeyRef, CSI nodePublishSecretRef
        elif key == "secretKeyRef" and isinstance(value, dict) and value.get("name"):
            found.secrets.add(value["name"])
    return found


def violations(policy: PipelinePolicy, pipeline: Pipeline, rayjobs: list[dict[str, Any]],
               operator_image: str) -> list[str]:
    """Every rule of ``policy`` that ``pipeline`` (whose stages would create ``rayjobs``) breaks, one line each."""
    problems: list[str] = []
    if pipeline.spec.cluster.rayClusterSpec is not None and not policy.raw_cluster_specs:
        problems.append("policy raw_cluster_specs: spec.cluster.rayClusterSpec is not accepted by this operator; "
                        "let it render the stage clusters from stage resources, or use clusterSelector")
    found = References()
    for rayjob in rayjobs:
        refs = references(rayjob)
        found.images |= refs.images
        found.secrets |= refs.secrets
        found.service_accounts |= refs.service_accounts
    allowed = tuple(policy.image_prefixes)
    for image in sorted(found.images):
        if image != operator_image and not image.startswith(allowed):
            problems.append(f"policy image_prefixes: image '{image}' is neither the operator's stage image nor under "
                            f"an allowed prefix ({', '.join(allowed) or 'none allowed'})")
    for secret in sorted(found.secrets - set(policy.secrets)):
        problems.append(f"policy secrets: Secret '{secret}' is not one a Pipeline may reference "
                        f"({', '.join(policy.secrets) or 'none allowed'})")
    for account in sorted(found.service_accounts - set(policy.service_accounts)):
        problems.append(f"policy service_accounts: service account '{account}' is not one a stage may run as "
                        f"({', '.join(policy.service_accounts) or 'none allowed'})")
    return problems
