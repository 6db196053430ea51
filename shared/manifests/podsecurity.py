"""Pod Security "restricted" for the Ray pods scopeforge renders, and a checker of the profile's rules.

What the rendered pods carry: the pod runs as the Ray image's user (uid 1000, gid 100: ``runAsNonRoot`` needs a
numeric user, the image names it ``ray``) with the RuntimeDefault seccomp profile; every container drops all
capabilities, cannot escalate privileges and has a read-only root filesystem. Ray writes only to emptyDir volumes:
``/tmp/ray`` (sessions and logs; named ``ray-logs`` so that KubeRay mounts the same volume into its autoscaler
sidecar), ``/tmp`` and ``/home/ray/.cache`` (HF_HOME, SCOPEFORGE_CACHE, torch and triton caches); KubeRay adds
``/dev/shm`` (memory) for the object store itself.

``restricted_problems`` checks one pod spec against the rules of the Kubernetes Pod Security Standards
(https://kubernetes.io/docs/concepts/security/pod-security-standards/, baseline and restricted, policy version
latest), with the pod-level security context inherited by each container as the kubelet applies it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

RAY_UID = 1000
RAY_GID = 100
TMP_RAY = "/tmp/ray"
CACHE = "/home/ray/.cache"
BUILTIN_VOLUMES = {"ray-logs": TMP_RAY, "tmp": "/tmp", "cache": CACHE}
"""Built-in emptyDir volumes of every Ray container, by name: mount path."""
CACHE_ENV = {"SCOPEFORGE_CACHE": f"{CACHE}/scopeforge", "HF_HOME": f"{CACHE}/huggingface",
             "TORCH_HOME": f"{CACHE}/torch", "TRITON_CACHE_DIR": f"{CACHE}/triton", "XDG_CACHE_HOME": CACHE,
             "MPLCONFIGDIR": "/tmp/matplotlib", "PYTHONDONTWRITEBYTECODE": "1"}
"""Environment of every Ray container: every cache on a writable volume (the root filesystem is read-only)."""

# Pod Security Standards, the allowed values
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
BASELINE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                    "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
PROFILE_TYPES = {"RuntimeDefault", "Localhost"}
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context(read_only_root: bool = True) -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "readOnlyRootFilesystem": read_only_root, "seccompProfile": {"type": "RuntimeDefault"}}


def emptydir_volumes(names: list[str]) -> list[dict[str, Any]]:
    return [{"name": name, "emptyDir": {}} for name in names]


# ---------------------------------------------------------------------------------------------------------------------
# The checker


def restricted_problems(pod: dict[str, Any], where: str = "pod") -> list[str]:
    """Every rule of Pod Security "restricted" (which includes "baseline") that a pod spec breaks ([] when none)."""
    problems: list[str] = []
    context = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{where}: {flag} is true")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"{where}: volume {volume.get('name')} of type {', '.join(sorted(kinds))} (restricted "
                            f"allows {', '.join(sorted(RESTRICTED_VOLUME_TYPES))})")
    for sysctl in context.get("sysctls") or []:
        if sysctl.get("name") not in BASELINE_SYSCTLS:
            problems.append(f"{where}: sysctl {sysctl.get('name')} is not a safe sysctl")
    problems += _common_context_problems(context, f"{where} securityContext")
    if context.get("runAsUser") == 0:
        problems.append(f"{where}: securityContext.runAsUser is 0")
    annotations = pod.get("_annotations") or {}
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            problems.append(f"{where}: AppArmor annotation {key}={value}")
    containers = [(kind, c) for kind in CONTAINER_LISTS for c in pod.get(kind) or []]
    if not containers:
        problems.append(f"{where}: no container")
    for kind, container in containers:
        problems += container_problems(container, context, f"{where} {kind[:-1]} {container.get('name')}")
    return problems


def container_problems(container: dict[str, Any], pod_context: dict[str, Any], where: str) -> list[str]:
    problems: list[str] = []
    own = container.get("securityContext") or {}
    problems += _common_context_problems(own, f"{where} securityContext")
    if own.get("privileged"):
        problems.append(f"{where}: privileged")
    if own.get("procMount") not in (None, "Default"):
        problems.append(f"{where}: procMount {own['procMount']}")
    if own.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    capabilities = own.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append(f"{where}: capabilities do not drop ALL")
    added = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
    if added:
        problems.append(f"{where}: adds capabilities {', '.join(sorted(added))}")
    non_root = own["runAsNonRoot"] if "runAsNonRoot" in own else pod_context.get("runAsNonRoot")
    if non_root is not True:
        problems.append(f"{where}: runAsNonRoot is not true (container or pod)")
    if own.get("runAsUser") == 0:
        problems.append(f"{where}: runAsUser is 0")
    seccomp = (own.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
    if seccomp not in PROFILE_TYPES:
        problems.append(f"{where}: seccompProfile is {seccomp or 'unset'} (RuntimeDefault or Localhost)")
    for port in container.get("ports") or []:
        if port.get("hostPort"):
            problems.append(f"{where}: hostPort {port['hostPort']}")
    return problems


def _common_context_problems(context: dict[str, Any], where: str) -> list[str]:
    """Rules that apply alike to the pod's and to a container's security context."""
    problems = []
    if (context.get("windowsOptions") or {}).get("hostProcess"):
        problems.append(f"{where}: windowsOptions.hostProcess")
    selinux = context.get("seLinuxOptions") or {}
    if selinux.get("type") not in (None, "", *SELINUX_TYPES):
        problems.append(f"{where}: seLinuxOptions.type {selinux['type']}")
    if selinux.get("user") or selinux.get("role"):
        problems.append(f"{where}: seLinuxOptions sets user or role")
    if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
        problems.append(f"{where}: seccompProfile Unconfined")
    apparmor = (context.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, *PROFILE_TYPES):
        problems.append(f"{where}: appArmorProfile {apparmor}")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Every pod of an object, as KubeRay will create it


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod a Kubernetes object makes, with the containers KubeRay adds (the autoscaler
    sidecar from ``autoscalerOptions``, the workers' ``wait-gcs-ready`` init container, the default submitter of a
    RayJob that gives no ``submitterPodTemplate``), so a check sees what the API server's admission will see."""
    kind, name = obj.get("kind"), (obj.get("metadata") or {}).get("name")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        yield f"Pod {name}", _with_annotations(spec, obj.get("metadata") or {})
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield f"{kind} {name}", _template(spec.get("template") or {})
    elif kind == "CronJob":
        yield f"{kind} {name}", _template(((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {})
    elif kind == "RayCluster":
        yield from _ray_cluster_pods(f"RayCluster {name}", spec)
    elif kind == "RayJob":
        cluster = spec.get("rayClusterSpec")
        if cluster:
            yield from _ray_cluster_pods(f"RayJob {name}", cluster)
        if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            template = spec.get("submitterPodTemplate")
            if template:
                yield f"RayJob {name} submitter", _template(template)
            else:  # KubeRay's default submitter: one container, no security context at all
                yield f"RayJob {name} submitter", {"containers": [{"name": "ray-job-submitter"}]}


def _template(template: dict[str, Any]) -> dict[str, Any]:
    return _with_annotations(template.get("spec") or {}, template.get("metadata") or {})


def _with_annotations(spec: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "_annotations": metadata.get("annotations") or {}}


def _ray_cluster_pods(where: str, spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    head = _template((spec.get("headGroupSpec") or {}).get("template") or {})
    if spec.get("enableInTreeAutoscaling"):
        options = spec.get("autoscalerOptions") or {}
        sidecar = {"name": "autoscaler", **({"securityContext": options["securityContext"]}
                                            if "securityContext" in options else {})}
        head = {**head, "containers": [*head.get("containers", []), sidecar]}
    yield f"{where} head", head
    for group in spec.get("workerGroupSpecs") or []:
        worker = _template(group.get("template") or {})
        ray = (worker.get("containers") or [{}])[0]
        init = {"name": "wait-gcs-ready", **({"securityContext": ray["securityContext"]}
                                             if "securityContext" in ray else {})}
        yield f"{where} worker group {group.get('groupName')}", {
            **worker, "initContainers": [*worker.get("initContainers", []), init]}
