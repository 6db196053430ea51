"""KubeRay objects rendered from code: the RayCluster spec, a RayJob per job or stage, deterministic names.

Used by the operator (one RayJob per pipeline stage), by ``scopeforge render`` and by the generator of the shipped
manifests (``python -m operators.generate``), so every RayCluster/RayJob the project produces has one shape, and the
tests validate that shape against the real KubeRay CRDs.

How a job gets its config: the RayJob's ``runtimeEnvYAML`` sets ``SCOPEFORGE_CONFIG`` (the config as YAML text) and the
entrypoint is ``scopeforge run JOB --config env:SCOPEFORGE_CONFIG``. This works with a RayCluster created per job
and with an existing one (``clusterSelector``), needs no ConfigMap or volume, and the entrypoint holds no shell
metacharacter (KubeRay pastes it into a shell command line of its submitter pod). KubeRay also passes the runtime
environment through that shell inside double quotes, so ``$`` and backquotes in the config text are written as YAML
escapes (``\\x24``, ``\\x60``) that YAML turns back into the same characters.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import yaml

from shared.errors import ConfigError
from shared.manifests.podsecurity import (
    BUILTIN_VOLUMES,
    CACHE_ENV,
    container_security_context,
    emptydir_volumes,
    pod_security_context,
)
from shared.manifests.resources import QUEUE_LABEL, StageResources

CONFIG_ENV = "SCOPEFORGE_CONFIG"
RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "scopeforge"  # the kustomize image name; `images:` in manifests/image/ sets the real reference
MAX_RAYJOB_NAME = 47  # KubeRay: the RayCluster of a RayJob is <name>-<5 chars> and must fit 53
MAX_RAYCLUSTER_NAME = 53
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")

LABEL_PIPELINE = "scopeforge.io/pipeline"
LABEL_PIPELINE_UID = "scopeforge.io/pipeline-uid"
LABEL_STAGE = "scopeforge.io/stage"
LABEL_ATTEMPT = "scopeforge.io/attempt"
LABEL_JOB = "scopeforge.io/job"


def entrypoint(job: str) -> str:
    return f"scopeforge run {job} --config env:{CONFIG_ENV}"


def config_yaml(data: dict[str, Any]) -> str:
    """A config as YAML text that survives KubeRay's shell quoting (``$`` and backquotes escaped in YAML)."""

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = '"' if ("$" in value or "`" in value or "\n" in value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    text = yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=10_000)
    # Every $ and ` now sits inside a double-quoted scalar, where YAML understands \x escapes.
    return text.replace("$", "\\x24").replace("`", "\\x60")


def runtime_env(config_text: str) -> dict[str, Any]:
    return {"env_vars": {CONFIG_ENV: config_text}}


def runtime_env_yaml(config_text: str) -> str:
    return to_yaml(runtime_env(config_text))


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks (``|``), so nested YAML stays readable in ``kubectl get -o yaml``."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def to_yaml(obj: Any) -> str:
    """YAML of a manifest, multi-line strings as literal blocks."""
    return yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, width=120, allow_unicode=True)


def dns1035(text: str) -> str:
    """Lowercase letters, digits and '-', starting with a letter (KubeRay's rule for RayJob/RayCluster names)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = f"p-{cleaned}".rstrip("-")
    return cleaned


def rayjob_name(pipeline: str, stage: str, attempt: int, uid: str) -> str:
    """``<pipeline>-<stage>-<uid hash>-<attempt>``: deterministic, so an operator restarted at any moment finds the
    RayJobs it already created instead of creating them again; unique across Pipelines through a short hash of the
    Pipeline's UID (Pipeline ``a`` with stage ``b-c`` and Pipeline ``a-b`` with stage ``c`` would otherwise share
    ``a-b-c-0``, and so would a Pipeline deleted and created again while its old RayJobs are being collected).
    Shortened with a hash of all three when it would exceed 47 characters."""
    suffix = f"-{hashlib.sha256(uid.encode()).hexdigest()[:5]}-{attempt}"
    base = f"{dns1035(pipeline)}-{dns1035(stage)}"
    if len(base) + len(suffix) <= MAX_RAYJOB_NAME:
        return base + suffix
    digest = hashlib.sha256(f"{pipeline}\0{stage}\0{uid}".encode()).hexdigest()[:8]
    suffix = f"-{digest}-{attempt}"
    room = MAX_RAYJOB_NAME - len(suffix) - 1
    head = dns1035(pipeline)[: room // 2].rstrip("-")
    tail = dns1035(stage)[: room - len(head)].rstrip("-")
    return f"{head}-{tail}{suffix}"


# ---------------------------------------------------------------------------------------------------------------------
# RayCluster


@dataclass(frozen=True)
class Group:
    """One worker group of a rendered RayCluster."""

    name: str
    cpu: str
    memory: str
    gpu: int
    max_workers: int


DEFAULT_GROUPS = [Group("cpu", "4", "16Gi", 0, 4), Group("gpu", "8", "48Gi", 1, 4)]
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
SUBMITTER_CONTAINER = "ray-job-submitter"  # KubeRay fills in its command (`ray job submit ...`) and env
COMPONENT = "app.kubernetes.io/component"


def stage_groups(resources: StageResources) -> list[Group]:
    """A stage's worker groups: its workers, and for a GPU stage also a CPU group (CPU-only phases run there)."""
    if not resources.gpu:
        return [Group("cpu", resources.cpu, resources.memory, 0, resources.maxWorkers)]
    extra = resources.cpuWorkers
    return [Group("cpu", extra.cpu, extra.memory, 0, extra.maxWorkers),
            Group("gpu", resources.cpu, resources.memory, resources.gpu, resources.maxWorkers)]


def _quantities(cpu: str, memory: str, gpu: int = 0, ephemeral: str | None = None) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if ephemeral:
        limits["ephemeral-storage"] = ephemeral
    if gpu:
        limits["nvidia.com/gpu"] = str(gpu)
    return {"requests": dict(limits), "limits": dict(limits)}


def _mounts(resources: StageResources) -> list[dict[str, Any]]:
    """Ray's writable places (emptyDirs; a stage volume at the same path replaces one) and the stage's volumes."""
    own = {v.mountPath.rstrip("/") for v in resources.volumes}
    mounts = [{"name": name, "mountPath": path} for name, path in BUILTIN_VOLUMES.items() if path not in own]
    return mounts + [{"name": v.name, "mountPath": v.mountPath, **({"readOnly": True} if v.readOnly else {})}
                     for v in resources.volumes]


def _volumes(resources: StageResources) -> list[dict[str, Any]]:
    own = {v.mountPath.rstrip("/") for v in resources.volumes}
    volumes = emptydir_volumes([name for name, path in BUILTIN_VOLUMES.items() if path not in own])
    for v in resources.volumes:
        if v.claimName:
            volumes.append({"name": v.name, "persistentVolumeClaim": {"claimName": v.claimName,
                                                                      **({"readOnly": True} if v.readOnly else {})}})
        else:
            volumes.append({"name": v.name, "emptyDir": {"sizeLimit": v.sizeLimit} if v.sizeLimit else {}})
    return volumes


DASHBOARD_SETTINGS = "scopeforge-ray-dashboard"
"""The ConfigMap of the head's Metrics-tab settings (manifests/base/monitoring)."""


def _ray_container(name: str, image: str, quantities: dict[str, Any], storage_secret: str | None,
                   resources: StageResources, ports: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": quantities,
        "env": [{"name": key, "value": value} for key, value in CACHE_ENV.items()],
    }
    if storage_secret:
        container["envFrom"] = [{"secretRef": {"name": storage_secret}}]
    container["ports"] = ports
    # Ray stops gracefully before the pod goes (KubeRay's recommended preStop).
    container["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}
    container["securityContext"] = container_security_context()
    container["volumeMounts"] = _mounts(resources)
    return container


def _scheduling(resources: StageResources, node_selector: dict[str, str] | None = None,
                tolerations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The pod-spec fields a stage's scheduling knobs set (shared by the Ray pods and the submitter)."""
    spec: dict[str, Any] = {}
    if resources.priorityClassName:
        spec["priorityClassName"] = resources.priorityClassName
    selector = {**resources.nodeSelector, **(node_selector or {})}
    if selector:
        spec["nodeSelector"] = selector
    if resources.affinity:
        spec["affinity"] = resources.affinity
    merged = [t.model_dump(exclude_none=True) for t in resources.tolerations] + list(tolerations or [])
    if merged:
        spec["tolerations"] = merged
    if resources.imagePullSecrets:
        spec["imagePullSecrets"] = [{"name": name} for name in resources.imagePullSecrets]
    return spec


def _template(spec: dict[str, Any], resources: StageResources, component: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": {"app.kubernetes.io/part-of": "scopeforge", COMPONENT: component,
                                           **resources.pod_labels()}}
    if resources.pod_annotations():
        metadata["annotations"] = resources.pod_annotations()
    return {"metadata": metadata, "spec": spec}


def _ray_pod(container: dict[str, Any], resources: StageResources, component: str,
             tolerations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"securityContext": pod_security_context(), "containers": [container],
                            "volumes": _volumes(resources), **_scheduling(resources, tolerations=tolerations)}
    if resources.serviceAccountName:
        spec["serviceAccountName"] = resources.serviceAccountName
    return _template(spec, resources, component)


def worker_group(group: Group, image: str, resources: StageResources, storage_secret: str | None,
                 autoscale: bool = True) -> dict[str, Any]:
    """An autoscaled group from zero; without autoscaling (a Kueue-managed stage) exactly ``max_workers`` workers."""
    quantities = _quantities(group.cpu, group.memory, group.gpu, resources.ephemeralStorage)
    container = _ray_container("ray-worker", image, quantities, storage_secret, resources,
                               [{"name": "metrics", "containerPort": 8080}])
    low = 0 if autoscale else group.max_workers
    return {
        "groupName": group.name,
        "replicas": low,
        "minReplicas": low,
        "maxReplicas": group.max_workers,
        "rayStartParams": {},
        "template": _ray_pod(container, resources, "ray-worker", GPU_TOLERATIONS if group.gpu else None),
    }


def cluster_spec(image: str = DEFAULT_IMAGE, storage_secret: str | None = "scopeforge-storage",
                 groups: list[Group] | None = None, idle_timeout_s: int = 300,
                 resources: StageResources | None = None, autoscale: bool = True) -> dict[str, Any]:
    """A RayClusterSpec: a CPU head that runs no tasks (drivers only) and worker groups autoscaled from zero.

    The default groups are a CPU group and a GPU group (nvidia.com/gpu, tolerating the GPU taint); the in-tree
    autoscaler starts workers when tasks ask for them and removes them after ``idle_timeout_s`` idle seconds.
    ``resources`` sets the head's size and every pod's scheduling, volumes and labels. Every pod meets Pod Security
    "restricted" (see ``shared.manifests.podsecurity``), the autoscaler sidecar too.
    """
    res = resources or StageResources()
    head_ports = [{"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                  {"name": "metrics", "containerPort": 8080}]
    head = _ray_container("ray-head", image, _quantities(res.head.cpu, res.head.memory,
                                                         ephemeral=res.ephemeralStorage),
                          storage_secret, res, head_ports)
    # the dashboard's Metrics-tab settings (RAY_GRAFANA_HOST, ...), where manifests/base/monitoring installed them:
    # every stage cluster a Pipeline creates reads them too; optional, so a cluster without them still starts
    head.setdefault("envFrom", []).append({"configMapRef": {"name": DASHBOARD_SETTINGS, "optional": True}})
    spec: dict[str, Any] = {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": autoscale}
    if autoscale:
        spec["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": idle_timeout_s,
            "resources": _quantities("500m", "512Mi"),
            # KubeRay mounts the head's ray-logs volume at /tmp/ray into this sidecar; /tmp is the head's too.
            "securityContext": container_security_context(),
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }
    spec["authOptions"] = {"mode": "token"}
    spec["headGroupSpec"] = {
        # num-cpus 0: the head schedules no tasks, only drivers; work goes to the worker groups.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _ray_pod(head, res, "ray-head"),
    }
    spec["workerGroupSpecs"] = [worker_group(g, image, res, storage_secret, autoscale)
                                for g in (DEFAULT_GROUPS if groups is None else groups)]
    return spec


def raycluster(name: str, namespace: str | None = None, **kwargs: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "scopeforge"}}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": metadata, "spec": cluster_spec(**kwargs)}


def submitter_template(image: str, resources: StageResources | None = None) -> dict[str, Any]:
    """The submitter pod of a RayJob (K8sJobMode): KubeRay's default one but restricted, scheduled like the stage."""
    res = resources or StageResources()
    container = {
        "name": SUBMITTER_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    spec = {"restartPolicy": "Never", "securityContext": pod_security_context(), "containers": [container],
            "volumes": emptydir_volumes(["tmp"]), **_scheduling(res)}
    return _template(spec, res, "ray-submitter")


# ---------------------------------------------------------------------------------------------------------------------
# RayJob


def rayjob(name: str, job: str, config_text: str, *, namespace: str | None = None,
           image: str = DEFAULT_IMAGE, storage_secret: str | None = "scopeforge-storage",
           cluster_selector: dict[str, str] | None = None, ray_cluster_spec: dict[str, Any] | None = None,
           resources: StageResources | None = None, active_deadline_s: int = 86400, ttl_s: int = 600,
           labels: dict[str, str] | None = None, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """A RayJob running ``scopeforge run JOB`` with ``config_text``.

    The cluster: an existing one (``cluster_selector``), a given spec, or (default) one built for the job from
    ``resources`` (its workers, plus a CPU group when ``resources.gpu``); a cluster made for the job is deleted
    ``ttl_s`` seconds after the job ends. KubeRay itself does not retry (``backoffLimit: 0``): retries are the
    operator's, one RayJob per attempt, so each attempt keeps its own logs and status. ``resources.labels`` and
    ``annotations`` go on the RayJob; a ``kueue.x-k8s.io/queue-name`` label creates it suspended for Kueue to admit,
    with a cluster of fixed size (Kueue refuses autoscaling and existing clusters).
    """
    res = resources or StageResources()
    if res.queue and cluster_selector:
        raise ConfigError(f"RayJob {name}: resources.labels {QUEUE_LABEL} (Kueue) cannot run on an existing cluster "
                          "(clusterSelector): Kueue admits only RayJobs that create their own cluster")
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "scopeforge",
                                                         "app.kubernetes.io/managed-by": "scopeforge",
                                                         LABEL_JOB: job, **res.labels, **(labels or {})}}
    if res.annotations:
        metadata["annotations"] = dict(res.annotations)
    if namespace:
        metadata["namespace"] = namespace
    if owner:
        metadata["ownerReferences"] = [owner]
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(job),
        "runtimeEnvYAML": runtime_env_yaml(config_text),
        "submissionMode": "K8sJobMode",
        "backoffLimit": 0,
        "activeDeadlineSeconds": active_deadline_s,
        "metadata": {"scopeforge-job": job},
        "submitterPodTemplate": submitter_template(image, res),
    }
    if cluster_selector:
        spec["clusterSelector"] = dict(cluster_selector)
        spec["shutdownAfterJobFinishes"] = False  # never delete a shared cluster
    else:
        if ray_cluster_spec is None:
            ray_cluster_spec = cluster_spec(image=image, storage_secret=storage_secret, groups=stage_groups(res),
                                            resources=res, autoscale=not res.queue)
        spec["rayClusterSpec"] = ray_cluster_spec
        spec["shutdownAfterJobFinishes"] = True
        spec["ttlSecondsAfterFinished"] = ttl_s
        if res.queue:
            spec["suspend"] = True  # Kueue unsuspends it once the queue admits it
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata, "spec": spec}


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    """The ownerReference that makes Kubernetes delete an object with its owner (the Pipeline)."""
    meta = body["metadata"]
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


# ---------------------------------------------------------------------------------------------------------------------
# The rules KubeRay checks in its operator but not in its CRD schema


def kuberay_rule_problems(obj: dict[str, Any]) -> list[str]:
    """Problems KubeRay's controller would reject (names, replicas, submission mode, ttl without shutdown)."""
    problems: list[str] = []
    kind = obj.get("kind")
    name = (obj.get("metadata") or {}).get("name", "")
    spec = obj.get("spec") or {}
    if kind == "RayJob":
        if len(name) > MAX_RAYJOB_NAME:
            problems.append(f"RayJob {name}: name longer than {MAX_RAYJOB_NAME} characters")
        if not DNS1035.match(name):
            problems.append(f"RayJob {name}: name is not a DNS-1035 label")
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            problems.append(f"RayJob {name}: submissionMode {mode!r} not one of {', '.join(SUBMISSION_MODES)}")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append(f"RayJob {name}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        selector = spec.get("clusterSelector")
        if not selector and not spec.get("rayClusterSpec"):
            problems.append(f"RayJob {name}: needs rayClusterSpec or clusterSelector")
        if selector and not selector.get("ray.io/cluster"):
            problems.append(f"RayJob {name}: clusterSelector needs 'ray.io/cluster'")
        if selector and mode == "SidecarMode":
            problems.append(f"RayJob {name}: clusterSelector is not supported in SidecarMode")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            problems.append(f"RayJob {name}: suspend needs shutdownAfterJobFinishes: true")
        if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
            problems.append(f"RayJob {name}: activeDeadlineSeconds must be positive")
        if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
            problems.append(f"RayJob {name}: backoffLimit must not be negative")
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
            if not isinstance(env, dict):
                problems.append(f"RayJob {name}: runtimeEnvYAML is not a mapping")
        except yaml.YAMLError as exc:
            problems.append(f"RayJob {name}: runtimeEnvYAML is not YAML ({exc})")
        if spec.get("rayClusterSpec"):
            problems += _cluster_problems(f"RayJob {name}", spec["rayClusterSpec"])
    elif kind == "RayCluster":
        if len(name) > MAX_RAYCLUSTER_NAME:
            problems.append(f"RayCluster {name}: name longer than {MAX_RAYCLUSTER_NAME} characters")
        if not DNS1035.match(name):
            problems.append(f"RayCluster {name}: name is not a DNS-1035 label")
        problems += _cluster_problems(f"RayCluster {name}", spec)
    return problems


def _cluster_problems(where: str, spec: dict[str, Any]) -> list[str]:
    problems = []
    head = spec.get("headGroupSpec") or {}
    if not ((head.get("template") or {}).get("spec") or {}).get("containers"):
        problems.append(f"{where}: the head group has no container")
    names = set()
    for group in spec.get("workerGroupSpecs") or []:
        gname = group.get("groupName")
        if gname in names:
            problems.append(f"{where}: worker group {gname} appears twice")
        names.add(gname)
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if low > high:
            problems.append(f"{where}: worker group {gname}: minReplicas {low} > maxReplicas {high}")
        replicas = group.get("replicas")
        if replicas is not None and not low <= replicas <= high:
            problems.append(f"{where}: worker group {gname}: replicas {replicas} outside [{low}, {high}]")
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            problems.append(f"{where}: worker group {gname} has no container")
        if group.get("suspend") and spec.get("enableInTreeAutoscaling"):
            problems.append(f"{where}: worker group {gname} cannot be suspended with autoscaling on")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = tuple(int(p) for p in re.findall(r"\d+", spec.get("rayVersion", ""))[:3])
        if not version or version < (2, 52, 0):
            problems.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0")
    return problems
