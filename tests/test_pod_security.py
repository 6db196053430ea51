"""Every pod the project renders or ships meets Pod Security "restricted": the shipped overlays and RayJob templates,
every job's rendered RayJob, and the operator's RayJob for a Pipeline with every stage knob set. The checker itself
is tested on pods that break each rule, so a check that passes means something. Also: the NetworkPolicy lets only
the right pods reach Ray's ports."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

from shared.configs import JOB_CONFIGS
from shared.manifests import render
from shared.manifests.podsecurity import pod_specs, restricted_problems
from shared.manifests.spec import parse_pipeline
from tests.k8s_schemas import ROOT, core_errors, kustomize

BUILDS = ["manifests/overlays/dev", "manifests/overlays/gpu", "manifests/jobs"]
EVERY_KNOB = {
    "cpu": "8", "memory": "32Gi", "gpu": 1, "maxWorkers": 3,
    "cpuWorkers": {"cpu": "2", "memory": "4Gi", "maxWorkers": 2},
    "head": {"cpu": "3", "memory": "12Gi"},
    "ephemeralStorage": "50Gi",
    "labels": {"kueue.x-k8s.io/queue-name": "team-a", "cost-center": "ml"},
    "annotations": {"example.com/owner": "team a"},
    "priorityClassName": "batch-low",
    "nodeSelector": {"node.kubernetes.io/instance-type": "g5.2xlarge"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["eu-west-1a"]}]}]}}},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "serviceAccountName": "scopeforge-s3-irsa",
    "imagePullSecrets": ["registry-creds"],
    "volumes": [{"name": "models", "mountPath": "/home/ray/.cache", "claimName": "model-cache"},
                {"name": "spill", "mountPath": "/mnt/spill", "sizeLimit": "100Gi"}],
}


def every_knob_pipeline() -> dict[str, Any]:
    return {"outputRoot": "s3://bucket/runs/k", "storageSecret": None, "stages": [
        {"name": "gen", "resources": EVERY_KNOB, "inspect-model": {"model": "tiny-llama"}}]}


def operator_rayjob(spec: dict[str, Any]) -> dict[str, Any]:
    from operators import reconcile

    meta = {"name": "knobs", "namespace": "ml", "uid": "0000-knobs", "generation": 1}
    step = reconcile.plan(parse_pipeline(spec), meta, "scopeforge.io/v1alpha1", {}, [], "reg/scopeforge:1")
    (manifest,) = step.create
    return manifest


def all_problems(objects: list[dict[str, Any]]) -> tuple[list[str], int]:
    problems, pods = [], 0
    for obj in objects:
        for where, pod in pod_specs(obj):
            pods += 1
            problems += restricted_problems(pod, where)
    return problems, pods


@pytest.mark.parametrize("path", BUILDS)
def test_every_shipped_pod_is_restricted(path):
    problems, pods = all_problems(kustomize(ROOT / path))
    assert pods >= 3, path  # head, workers and the submitter or the operator are really looked at
    assert problems == []


def test_every_jobs_rendered_rayjob_is_restricted():
    rendered = [render.rayjob(render.dns1035(f"t-{job}"), job, "{}\n") for job in sorted(JOB_CONFIGS)]
    shared = render.rayjob("shared", "inspect-model", "{}\n", cluster_selector={"ray.io/cluster": "scopeforge"})
    problems, pods = all_problems([*rendered, shared])
    # each own-cluster RayJob: head (+ autoscaler sidecar), its worker group(s), the submitter; shared: the submitter
    assert pods == 3 * len(JOB_CONFIGS) + 1
    assert problems == []


def test_the_operators_rayjob_with_every_knob_is_restricted():
    manifest = operator_rayjob(every_knob_pipeline())
    problems, pods = all_problems([manifest])
    assert pods == 4  # head, cpu group, gpu group, submitter
    assert problems == []


def test_the_checker_catches_each_rule():
    (pod,) = [p for w, p in pod_specs(render.raycluster("c")) if w.endswith("head")]
    assert restricted_problems(pod) == []

    def broken(edit) -> list[str]:
        bad = copy.deepcopy(pod)
        edit(bad)
        return restricted_problems(bad)

    ray = lambda p: p["containers"][0]["securityContext"]  # noqa: E731
    cases = {
        "hostNetwork is true": lambda p: p.update(hostNetwork=True),
        "hostPID is true": lambda p: p.update(hostPID=True),
        "of type hostPath": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "privileged": lambda p: ray(p).update(privileged=True),
        "allowPrivilegeEscalation is not false": lambda p: ray(p).pop("allowPrivilegeEscalation"),
        "do not drop ALL": lambda p: ray(p)["capabilities"].update(drop=["NET_RAW"]),
        "adds capabilities SYS_ADMIN": lambda p: ray(p)["capabilities"].update(add=["SYS_ADMIN"]),
        "runAsNonRoot is not true": lambda p: ray(p).update(runAsNonRoot=False),
        "securityContext.runAsUser is 0": lambda p: p["securityContext"].update(runAsUser=0),
        "container ray-head: runAsUser is 0": lambda p: ray(p).update(runAsUser=0),
        "seccompProfile Unconfined": lambda p: ray(p).update(seccompProfile={"type": "Unconfined"}),
        "hostPort 8265": lambda p: p["containers"][0]["ports"][1].update(hostPort=8265),
        "sysctl kernel.msgmax": lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax",
                                                                               "value": "1"}]),
        "seLinuxOptions sets user": lambda p: ray(p).update(seLinuxOptions={"user": "root"}),
        "procMount Unmasked": lambda p: ray(p).update(procMount="Unmasked"),
    }
    for message, edit in cases.items():
        found = broken(edit)
        assert any(message in line for line in found), (message, found)
    # inherited: without a pod-level seccomp profile and without the container's own, the container fails
    no_seccomp = broken(lambda p: (p["securityContext"].pop("seccompProfile"),
                                   [c["securityContext"].pop("seccompProfile") for c in p["containers"]]))
    assert any("seccompProfile is unset" in line for line in no_seccomp)


def test_what_kuberay_adds_is_checked_too():
    """KubeRay's default submitter (no submitterPodTemplate) and an autoscaler sidecar without a security context
    would be refused by a restricted namespace: the checker sees them."""
    manifest = render.rayjob("j", "inspect-model", "{}\n")
    manifest["spec"].pop("submitterPodTemplate")
    assert any("submitter container ray-job-submitter" in p for p in all_problems([manifest])[0])
    manifest = render.rayjob("j", "inspect-model", "{}\n")
    manifest["spec"]["rayClusterSpec"]["autoscalerOptions"].pop("securityContext")
    assert any("container autoscaler: allowPrivilegeEscalation" in p for p in all_problems([manifest])[0])
    # the workers' wait-gcs-ready init container copies the Ray container's security context, and is checked
    (worker,) = [p for w, p in pod_specs(manifest) if "worker group" in w]
    assert [c["name"] for c in worker["initContainers"]] == ["wait-gcs-ready"]


def test_ray_writes_only_to_its_emptydirs():
    cluster = render.cluster_spec()
    head = cluster["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    # ray-logs is the name KubeRay mounts into its autoscaler at /tmp/ray: one volume, shared
    assert mounts == {"/tmp/ray": "ray-logs", "/tmp": "tmp", "/home/ray/.cache": "cache"}
    assert {v["name"]: v for v in head["volumes"]}["ray-logs"] == {"name": "ray-logs", "emptyDir": {}}
    env = {e["name"]: e["value"] for e in container["env"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    for var in ("SCOPEFORGE_CACHE", "HF_HOME"):  # the image's cache paths, under the cache volume
        assert f"{var}={env[var]}" in dockerfile
        assert env[var].startswith("/home/ray/.cache/")
    assert cluster["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] is True
    assert head["securityContext"]["runAsUser"] == 1000  # numeric: runAsNonRoot cannot check the user "ray"


# ---------------------------------------------------------------------------------------------------------------------
# NetworkPolicy


def _policies() -> list[dict[str, Any]]:
    docs = kustomize(ROOT / "manifests/overlays/dev")
    return [d for d in docs if d["kind"] == "NetworkPolicy"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for rule in selector.get("matchExpressions") or []:
        value = labels.get(rule["key"])
        if rule["operator"] == "In" and value not in rule["values"]:
            return False
        if rule["operator"] == "NotIn" and value in rule["values"]:
            return False
        if rule["operator"] == "Exists" and value is None:
            return False
    return True


def allowed(policies: list[dict[str, Any]], source: dict[str, str], target: dict[str, str], port: int,
            same_namespace: bool = True) -> bool:
    """Whether ``source`` pod reaches ``port`` of ``target`` pod under these policies (NetworkPolicy semantics:
    a selected pod admits only what some rule of some policy selecting it admits)."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], target)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(p["port"] <= port <= p.get("endPort", p["port"]) for p in ports):
                continue
            for peer in rule.get("from") or []:
                if "namespaceSelector" not in peer and not same_namespace:
                    continue
                if "podSelector" not in peer or _selects(peer["podSelector"], source):
                    return True
    return False


def test_networkpolicy_admits_only_the_right_peers():
    policies = _policies()
    assert all(core_errors(p) == [] for p in policies)
    base = {"app.kubernetes.io/part-of": "scopeforge", "ray.io/is-ray-node": "yes", "ray.io/cluster": "scopeforge"}
    stage = {**base, "ray.io/cluster": "demo-first-ab12c-0-x7k2p"}
    other_stage = {**base, "ray.io/cluster": "other-b-ab12c-0-q9z4m"}
    operator = {"app.kubernetes.io/name": "scopeforge-operator"}
    kuberay = {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"}
    submitter = {"app.kubernetes.io/part-of": "scopeforge", "app.kubernetes.io/component": "ray-submitter"}
    stranger = {"app": "something-else"}
    gcs, object_manager, dashboard, client, metrics = 6379, 38000, 8265, 10001, 8080

    assert allowed(policies, base, base, gcs)
    assert allowed(policies, base, base, object_manager)
    assert not allowed(policies, stage, base, gcs)  # another cluster does not reach the base cluster's GCS
    assert not allowed(policies, base, stage, gcs)
    assert allowed(policies, stage, stage, gcs)
    assert allowed(policies, other_stage, stage, object_manager)
    for who in (stranger, submitter, operator):
        assert not allowed(policies, who, base, gcs), who
        assert not allowed(policies, who, stage, object_manager), who
    for who in (operator, submitter, {"scopeforge.io/dashboard-client": "true"}):
        assert allowed(policies, who, base, dashboard), who
        assert allowed(policies, who, stage, dashboard), who
    assert allowed(policies, operator, base, dashboard, same_namespace=False)
    assert allowed(policies, kuberay, stage, dashboard, same_namespace=False)  # KubeRay polls job status
    assert not allowed(policies, stranger, base, dashboard)
    assert not allowed(policies, submitter, base, dashboard, same_namespace=False)
    assert not any(allowed(policies, who, base, client) for who in (base, stranger, operator, submitter))
    assert allowed(policies, stranger, base, metrics, same_namespace=False)  # Prometheus scrapes from its namespace


def test_ray_client_component_opens_10001_to_labelled_pods(tmp_path):
    def rel(path: str) -> str:  # kustomize takes no absolute paths
        return os.path.relpath(ROOT / path, tmp_path)

    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
        f"  - {rel('manifests/overlays/dev')}\ncomponents:\n  - {rel('manifests/ray-client')}\n")
    policies = [d for d in kustomize(tmp_path) if d["kind"] == "NetworkPolicy"]
    assert all(core_errors(p) == [] for p in policies)
    head = {"app.kubernetes.io/part-of": "scopeforge", "ray.io/is-ray-node": "yes", "ray.io/cluster": "scopeforge",
            "ray.io/node-type": "head"}
    assert allowed(policies, {"scopeforge.io/ray-client": "true"}, head, 10001)
    assert not allowed(policies, {"app": "x"}, head, 10001)
