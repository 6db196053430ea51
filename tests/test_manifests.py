"""Everything manifests/ builds validates: KubeRay objects strictly against the real KubeRay CRDs plus KubeRay's
operator-side rules, core objects with kubernetes-validate; one image setting; no credentials; generated files
current."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from operators import generate
from shared.configs import JOB_CONFIGS
from shared.manifests import render
from tests.k8s_schemas import ROOT, core_errors, kuberay_errors, kustomize

BUILDS = ["manifests/overlays/dev", "manifests/overlays/gpu", "manifests/jobs"]
IMAGES = {i["name"]: f"{i['newName']}:{i['newTag']}"
          for i in yaml.safe_load((ROOT / "manifests/image/kustomization.yaml").read_text())["images"]}
IMAGE_REF = IMAGES["scopeforge"]
OPERATOR_REF = IMAGES["scopeforge-operator"]  # the operator's slim image (manifests/image/operator.Dockerfile)


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {path: kustomize(ROOT / path) for path in BUILDS}


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def containers(obj):
    """Every container spec anywhere in an object."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from containers(value)


@pytest.mark.parametrize("path", BUILDS)
def test_every_built_object_validates(built, path):
    docs = built[path]
    assert docs, path
    problems = []
    for doc in docs:
        if doc["kind"] in ("RayCluster", "RayJob"):
            problems += kuberay_errors(doc)
        elif doc["kind"] == "PodMonitor":
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            ports = {e["port"] for e in doc["spec"]["podMetricsEndpoints"]}
            assert ports <= {"metrics", "as-metrics", "dash-metrics"}  # named: test_monitoring_manifests
        else:
            problems += core_errors(doc)
    assert problems == []


def test_overlays_have_the_expected_objects(built):
    dev, gpu = built["manifests/overlays/dev"], built["manifests/overlays/gpu"]
    for docs, namespace in ((dev, "scopeforge-dev"), (gpu, "scopeforge")):
        kinds = {d["kind"] for d in docs}
        assert {"CustomResourceDefinition", "RayCluster", "Deployment", "ServiceAccount", "ClusterRole",
                "ClusterRoleBinding", "PodMonitor", "ConfigMap", "Namespace"} <= kinds
        binding = by_kind(docs, "ClusterRoleBinding")[0]
        assert binding["subjects"][0]["namespace"] == namespace  # kustomize moved the service account's namespace
    (dev_cluster,), (gpu_cluster,) = by_kind(dev, "RayCluster"), by_kind(gpu, "RayCluster")
    assert [g["groupName"] for g in dev_cluster["spec"]["workerGroupSpecs"]] == ["cpu"]  # small CPU cluster
    assert {d["metadata"]["name"] for d in by_kind(dev, "Deployment")} == {"scopeforge-operator", "scopeforge-s3"}
    assert [g["groupName"] for g in gpu_cluster["spec"]["workerGroupSpecs"]] == ["cpu", "gpu"]
    assert gpu_cluster["spec"]["workerGroupSpecs"][1]["template"]["spec"]["nodeSelector"]


def test_base_raycluster_autoscales_cpu_and_gpu_groups_from_zero(built):
    (cluster,) = by_kind(built["manifests/overlays/gpu"], "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs drivers, not tasks
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups.values())
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_one_image_setting_reaches_every_scopeforge_container(built):
    for path, docs in built.items():
        images = [c["image"] for doc in docs for c in containers(doc)
                  if not (doc["kind"] == "Deployment" and doc["metadata"]["name"] == "scopeforge-operator")]
        assert images, path
        assert all(image == IMAGE_REF or image.startswith("quay.io/minio/") for image in images), (path, images)
        assert IMAGE_REF in images
    (operator,) = [d for d in built["manifests/overlays/gpu"] if d["metadata"]["name"] == "scopeforge-operator"
                   and d["kind"] == "Deployment"]
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    assert container["image"] == OPERATOR_REF
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SCOPEFORGE_IMAGE"] == IMAGE_REF  # the operator starts stage clusters on the Ray image


def test_no_credentials_in_manifests(built):
    for path, docs in built.items():
        assert by_kind(docs, "Secret") == [], path
        text = json.dumps(docs)
        refs = set(re.findall(r'"secret(?:Ref|KeyRef)": \{[^}]*"name": "([^"]+)"', text))
        assert refs <= {"scopeforge-storage"}, refs
        for container in (c for doc in docs for c in containers(doc)):
            for var in container.get("env", []):
                if re.match(r"(AWS_|MINIO_ROOT)", var["name"]):
                    assert "value" not in var, (path, var)  # from the Secret, never literal


def test_rbac_is_least_privilege(built):
    (role,) = by_kind(built["manifests/overlays/dev"], "ClusterRole")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert all("*" not in verbs for verbs in rules.values())
    assert all(r != "*" for _, r in rules)
    # No Secret access at all, in any role of any build: the operator never reads one.
    for docs in built.values():
        for rbac in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
            assert not [r for r in rbac["rules"] if "secrets" in r["resources"] or "*" in r["resources"]], rbac
    # It deletes only RayJobs (a failed attempt stopped before its retry, a cluster past the start deadline); the
    # rest is the garbage collector's job. Pods: listed (to say why a cluster does not start), nothing more.
    assert rules[("ray.io", "rayjobs")] == {"get", "list", "watch", "create", "delete"}
    assert [k for k, verbs in rules.items() if "delete" in verbs] == [("ray.io", "rayjobs")]
    assert rules[("", "pods")] == {"list"}


def test_rayjob_templates_one_per_job(built):
    jobs = {d["metadata"]["labels"][render.LABEL_JOB]: d for d in built["manifests/jobs"]}
    assert set(jobs) == set(JOB_CONFIGS)
    for job, manifest in jobs.items():
        spec = manifest["spec"]
        assert spec["entrypoint"] == f"scopeforge run {job} --config env:SCOPEFORGE_CONFIG"
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        assert spec["activeDeadlineSeconds"] > 0
        config = yaml.safe_load(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["SCOPEFORGE_CONFIG"])
        assert set(config) <= set(JOB_CONFIGS[job].model_fields)
        assert config["output_root"].startswith("s3://")


def test_strict_validation_catches_what_kuberay_would_refuse(built):
    (cluster,) = by_kind(built["manifests/overlays/dev"], "RayCluster")
    (job,) = built["manifests/jobs"][:1]
    assert kuberay_errors(cluster) == []
    assert kuberay_errors(job) == []

    def broken(obj, edit):
        obj = copy.deepcopy(obj)
        edit(obj)
        return kuberay_errors(obj)

    misspelled = broken(cluster, lambda o: o["spec"]["headGroupSpec"].update(rayStartParamz={}))
    assert any("rayStartParamz" in e for e in misspelled)
    bare_float = broken(cluster, lambda o: o["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                        ["resources"]["limits"].update(cpu=0.5))
    assert bare_float, "a bare float quantity must fail the schema"
    replicas = broken(cluster, lambda o: o["spec"]["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2))
    assert any("minReplicas 5 > maxReplicas 2" in e for e in replicas)
    assert any("53" in e for e in broken(cluster, lambda o: o["metadata"].update(name="c" * 54)))
    assert any("47" in e for e in broken(job, lambda o: o["metadata"].update(name="j" * 48)))
    assert any("submissionMode" in e for e in broken(job, lambda o: o["spec"].update(submissionMode="PodMode")))
    ttl = broken(job, lambda o: o["spec"].update(shutdownAfterJobFinishes=False))
    assert any("ttlSecondsAfterFinished needs shutdownAfterJobFinishes" in e for e in ttl)


def test_generated_manifests_are_current():
    stale = generate.stale()
    assert stale == [], f"stale generated manifests {[str(p) for p in stale]}: run `make manifests`"


def test_grafana_dashboard_plots_the_scopeforge_metrics():
    dashboard = json.loads((ROOT / "manifests/base/monitoring/scopeforge-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for unit in ("documents", "tokens", "images"):
        assert f"rate(ray_scopeforge_{unit}_total" in exprs
    assert "ray_scopeforge_train_loss" in exprs
    assert "ray_scopeforge_progress" in exprs
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_dockerfile_builds_on_the_pinned_ray_and_python():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    ray = pins["ray"]
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray}-py311-gpu" in dockerfile  # official image, GPU variant
    assert f"ray.__version__ == '{ray}'" in dockerfile
    assert f"grep -qx 'ray=={ray}'" in dockerfile
    final = dockerfile.rsplit("\nFROM ", 1)[1]  # the image itself, after the wheel-building stage
    assert "pip wheel" in dockerfile
    assert "COPY --from=wheel" in final
    assert '-c constraints.txt "$(ls /tmp/dist/scopeforge-*.whl)[demo,operator]"' in final  # the wheel, non-editable
    assert not re.search(r"^COPY\b.*\b(shared|ray_jobs|operators)\b", final, re.M)  # no source tree in the image
    assert not re.search(r"(AWS_SECRET|AWS_ACCESS|RAY_AUTH_TOKEN)\S*=", dockerfile)
