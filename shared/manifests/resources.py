"""What a stage asks of Kubernetes: worker shape, head size, and the scheduling and queueing knobs a shared cluster
needs (labels and annotations for Kueue, priority, node placement, a service account for workload identity, image
pull secrets, volumes, ephemeral storage).

These are plain models (no rendering): ``shared.manifests.render`` turns them into the pod templates of a stage's
RayCluster and submitter, and the Pipeline CRD takes its schema from them, so the API server checks them too.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.config import StrictModel
from shared.manifests.podsecurity import BUILTIN_VOLUMES

QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ABSOLUTE_PATH = r"^/[^:]*$"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""The Kueue LocalQueue label: a RayJob carrying it is created suspended and Kueue admits it."""
KUEUE_PREFIX = "kueue.x-k8s.io/"
_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_PREFIX = re.compile(DNS_SUBDOMAIN)
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def check_key(key: str, what: str) -> str:
    """A Kubernetes qualified name (``[prefix/]name``), as label and annotation keys must be."""
    prefix, _, name = key.rpartition("/")
    if not (_NAME.match(name) and len(name) <= 63) or (prefix and not (_PREFIX.match(prefix) and len(prefix) <= 253)):
        raise ValueError(f"{what} key {key!r} is not a qualified name ([dns-prefix/]name, name of at most 63 "
                         "alphanumerics, '-', '_', '.')")
    return key


class Toleration(StrictModel):
    """A pod toleration (Kubernetes' Toleration), applied to every pod of the stage's cluster."""

    key: str | None = None
    """Taint key to tolerate; unset with operator Exists: every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists (any value) or Equal (the given value)."""
    value: str | None = None
    """Taint value (with operator Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; unset: every effect."""
    tolerationSeconds: int | None = Field(None, ge=0)
    """With NoExecute: how long the pod stays bound after the taint appears."""

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without key needs operator Exists")
        return self


class StageVolume(StrictModel):
    """A volume mounted into every Ray container (head and workers) of the stage: a PersistentVolumeClaim (e.g. a
    shared model cache) or scratch space (emptyDir, e.g. for object spilling). Only these two kinds: both are allowed
    by Pod Security "restricted"."""

    name: str = Field(pattern=DNS_LABEL, max_length=63)
    """Volume name (a DNS label; not one of the built-in ray-logs, tmp, cache)."""
    mountPath: str = Field(pattern=ABSOLUTE_PATH)
    """Where it is mounted. A volume at /home/ray/.cache replaces the built-in cache emptyDir (HF_HOME,
    SCOPEFORGE_CACHE live under it), so downloads survive the stage."""
    claimName: str | None = Field(None, pattern=DNS_SUBDOMAIN)
    """A PersistentVolumeClaim of the namespace (ReadWriteMany when workers on several nodes mount it). Unset: an
    emptyDir."""
    readOnly: bool = False
    """Mount it read-only (e.g. a cache filled beforehand)."""
    sizeLimit: str | None = Field(None, pattern=QUANTITY)
    """For an emptyDir: its size limit (counted against the pod's ephemeral storage)."""

    @model_validator(mode="after")
    def _one_kind(self) -> StageVolume:
        if self.claimName and self.sizeLimit:
            raise ValueError(f"volume {self.name}: sizeLimit is for an emptyDir, not a PersistentVolumeClaim")
        return self


class HeadResources(StrictModel):
    """The head pod: it runs the drivers (no tasks), the GCS and the dashboard."""

    cpu: str = Field("2", pattern=QUANTITY)
    """CPU of the head (a Kubernetes quantity)."""
    memory: str = Field("8Gi", pattern=QUANTITY)
    """Memory of the head (a Kubernetes quantity)."""


class WorkerShape(StrictModel):
    """An extra CPU worker group beside a GPU stage's GPU workers, so CPU-only phases do not buy GPU nodes."""

    cpu: str = Field("4", pattern=QUANTITY)
    """CPU of each CPU worker."""
    memory: str = Field("16Gi", pattern=QUANTITY)
    """Memory of each CPU worker."""
    maxWorkers: int = Field(4, ge=1, le=1000)
    """Most CPU workers (the count with a Kueue queue, where the cluster does not autoscale)."""


class StageResources(StrictModel):
    """The cluster a stage runs on (its own RayCluster, unless the Pipeline names one) and how it is scheduled."""

    cpu: str = Field("4", pattern=QUANTITY)
    """CPU of each worker (a Kubernetes quantity, e.g. "4" or "500m")."""
    memory: str = Field("16Gi", pattern=QUANTITY)
    """Memory of each worker (a Kubernetes quantity, e.g. "16Gi")."""
    gpu: int = Field(0, ge=0, le=16)
    """nvidia.com/gpu per worker; 0 for CPU workers. GPU workers tolerate the nvidia.com/gpu taint, and a GPU stage's
    cluster also gets a CPU worker group (cpuWorkers)."""
    maxWorkers: int = Field(4, ge=1, le=1000)
    """Most workers the autoscaler may start; it starts from zero and removes idle workers. With a Kueue queue (no
    autoscaling) the group runs exactly this many."""
    cpuWorkers: WorkerShape = Field(default_factory=WorkerShape)
    """The CPU worker group of a GPU stage (ignored when gpu is 0: the workers are CPU workers then)."""
    head: HeadResources = Field(default_factory=HeadResources)
    """Size of the head pod."""
    ephemeralStorage: str | None = Field(None, pattern=QUANTITY)
    """ephemeral-storage requested (and limited) for each Ray pod: /tmp/ray, /tmp and the cache live there. Unset:
    none requested."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels of the RayJob and of every pod of the stage. kueue.x-k8s.io/queue-name: the RayJob goes to that Kueue
    LocalQueue (created suspended, its cluster of fixed size; kueue.x-k8s.io/* keys stay off the pods)."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations of the RayJob and of every pod of the stage (kueue.x-k8s.io/* keys only on the RayJob)."""
    priorityClassName: str | None = Field(None, pattern=DNS_SUBDOMAIN)
    """PriorityClass of every pod of the stage (also what Kueue orders a queue by, unless a WorkloadPriorityClass
    label is set)."""
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    """Node labels every pod of the stage needs (merged under each group's own, e.g. GPU node labels)."""
    affinity: dict[str, Any] | None = None
    """A Kubernetes Affinity (nodeAffinity, podAffinity, podAntiAffinity) for every pod of the stage."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints every pod of the stage tolerates (GPU workers tolerate nvidia.com/gpu besides)."""
    serviceAccountName: str | None = Field(None, pattern=DNS_SUBDOMAIN)
    """ServiceAccount of the Ray pods, e.g. one annotated for IRSA / GKE workload identity, so object storage needs no
    static keys (set the Pipeline's storageSecret to null then). It must exist; KubeRay binds its autoscaler Role to
    it. Unset: KubeRay's per-cluster one."""
    imagePullSecrets: list[str] = Field(default_factory=list)
    """Secrets of the namespace to pull the image with (every pod of the stage, the submitter too)."""
    volumes: list[StageVolume] = Field(default_factory=list)
    """Volumes mounted into the head and every worker (a model-cache PVC, spill space)."""

    @field_validator("labels", "annotations", "nodeSelector")
    @classmethod
    def _keys(cls, value: dict[str, str], info: Any) -> dict[str, str]:
        for key, item in value.items():
            check_key(key, info.field_name)
            if info.field_name != "annotations" and not (_VALUE.match(item) and len(item) <= 63):
                raise ValueError(f"{info.field_name} value {item!r} of {key!r} is not a label value (at most 63 "
                                 "alphanumerics, '-', '_', '.')")
        return value

    @field_validator("imagePullSecrets")
    @classmethod
    def _secret_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.match(DNS_SUBDOMAIN, name):
                raise ValueError(f"imagePullSecrets: {name!r} is not a Secret name")
        return names

    @field_validator("volumes")
    @classmethod
    def _distinct(cls, volumes: list[StageVolume]) -> list[StageVolume]:
        names = [v.name for v in volumes]
        paths = [v.mountPath.rstrip("/") for v in volumes]
        for what, items in (("name", names), ("mountPath", paths)):
            twice = sorted({i for i in items if items.count(i) > 1})
            if twice:
                raise ValueError(f"volumes: {what} {twice[0]!r} appears twice")
        fixed = sorted({p for p in paths if p in ("/tmp", "/tmp/ray")})
        if fixed:
            raise ValueError(f"volumes: {fixed[0]} is Ray's own emptyDir (KubeRay shares /tmp/ray with the "
                             "autoscaler); mount elsewhere")
        taken = sorted(set(names) & set(BUILTIN_VOLUMES))
        if taken:
            raise ValueError(f"volumes: {taken[0]!r} is a built-in volume name (built-in: "
                             f"{', '.join(BUILTIN_VOLUMES)})")
        return volumes

    @property
    def queue(self) -> str | None:
        """The Kueue LocalQueue the stage is queued in, if any."""
        return self.labels.get(QUEUE_LABEL)

    def pod_labels(self) -> dict[str, str]:
        return {k: v for k, v in self.labels.items() if not k.startswith(KUEUE_PREFIX)}

    def pod_annotations(self) -> dict[str, str]:
        return {k: v for k, v in self.annotations.items() if not k.startswith(KUEUE_PREFIX)}
