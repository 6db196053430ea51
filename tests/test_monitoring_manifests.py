"""Monitoring manifests: the head's Metrics-tab settings, PodMonitors whose ports exist, the dev overlay's Prometheus
and Grafana (valid, restricted, namespaced RBAC, wired to each other and to the head), and the GCS FT overlay."""

from __future__ import annotations

import pytest
import yaml

from tests.k8s_schemas import ROOT, core_errors, kuberay_errors, kustomize

DASHBOARD_ENV = {"RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST", "RAY_PROMETHEUS_HOST", "RAY_PROMETHEUS_NAME"}


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict]]:
    paths = ["manifests/overlays/dev", "manifests/overlays/gpu", "manifests/overlays/dev/monitoring",
             "manifests/overlays/gcs-ft"]
    return {p.rsplit("/", 1)[-1]: kustomize(ROOT / p) for p in paths}


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def head_container(docs):
    return one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("build", ["dev", "gpu", "gcs-ft"], ids=["dev", "gpu-overlay", "gcs-ft"])  # not "gpu": a mark
def test_the_head_reads_the_metrics_tab_settings(builds, build):
    docs = builds[build]
    settings = one(docs, "ConfigMap", "scopeforge-ray-dashboard")["data"]
    assert set(settings) == DASHBOARD_ENV
    assert all(v.startswith("http") for k, v in settings.items() if k != "RAY_PROMETHEUS_NAME")
    assert {"configMapRef": {"name": "scopeforge-ray-dashboard"}} in head_container(docs)["envFrom"]
    assert kuberay_errors(one(docs, "RayCluster")) == []


def test_every_podmonitor_port_is_a_named_port_of_the_pods_it_selects(builds):
    docs = builds["gpu"]
    cluster = one(docs, "RayCluster")["spec"]
    head_ports = {p["name"] for p in head_container(docs)["ports"]}
    worker_ports = [{p["name"] for p in g["template"]["spec"]["containers"][0]["ports"]}
                    for g in cluster["workerGroupSpecs"]]
    monitors = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodMonitor"}
    assert set(monitors) == {"scopeforge-ray", "scopeforge-ray-head"}
    head = monitors["scopeforge-ray-head"]
    assert head["selector"]["matchLabels"]["ray.io/node-type"] == "head"  # KubeRay's label of the head pod
    assert [e["port"] for e in head["podMetricsEndpoints"]] == ["as-metrics", "dash-metrics"]
    assert {"as-metrics", "dash-metrics", "metrics"} <= head_ports
    assert all("metrics" in ports for ports in worker_ports)
    ports = {p["name"]: p["containerPort"] for p in head_container(docs)["ports"]}
    assert (ports["as-metrics"], ports["dash-metrics"]) == (44217, 44227)  # Ray's autoscaler / dashboard defaults


def test_dev_prometheus_and_grafana_validate_and_are_restricted(builds):
    docs = builds["monitoring"]
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
                                         "Service"}  # a Role: no cluster-wide access
    assert [e for d in docs for e in core_errors(d)] == []
    assert all(d["metadata"]["namespace"] == "scopeforge-dev" for d in docs)
    (rule,) = one(docs, "Role")["rules"]
    assert (rule["resources"], set(rule["verbs"])) == (["pods"], {"get", "list", "watch"})
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert (sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"]) == (False, True)
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["limits"]


def test_dev_grafana_embeds_and_reads_the_dev_prometheus_and_the_dashboards(builds):
    docs, dev = builds["monitoring"], builds["dev"]
    settings = one(dev, "ConfigMap", "scopeforge-ray-dashboard")["data"]
    services = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"] for s in docs if s["kind"] == "Service"}
    assert settings["RAY_GRAFANA_HOST"] == f"http://scopeforge-grafana:{services['scopeforge-grafana']}"
    assert settings["RAY_PROMETHEUS_HOST"] == f"http://scopeforge-prometheus:{services['scopeforge-prometheus']}"
    grafana = one(docs, "Deployment", "scopeforge-grafana")["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in grafana["containers"][0]["env"]}
    assert env["GF_SECURITY_ALLOW_EMBEDDING"] == "true"  # the Metrics tab shows Grafana panels in iframes
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    provisioning = next(d for d in docs if d["metadata"]["name"].startswith("scopeforge-grafana-provisioning"))
    (source,) = yaml.safe_load(provisioning["data"]["datasources.yaml"])["datasources"]
    assert source["name"] == settings["RAY_PROMETHEUS_NAME"]
    assert source["url"] == settings["RAY_PROMETHEUS_HOST"]
    volumes = {v["name"]: v["configMap"]["name"] for v in grafana["volumes"] if "configMap" in v}
    assert volumes["scopeforge-dashboard"] == one(dev, "ConfigMap", "scopeforge-grafana-dashboard")["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in grafana["containers"][0]["volumeMounts"]}
    paths = {p["options"]["path"] for p in yaml.safe_load(provisioning["data"]["dashboards.yaml"])["providers"]}
    assert paths == {mounts["scopeforge-dashboard"], mounts["ray-dashboards"]}


def test_dev_prometheus_scrapes_the_ports_the_podmonitors_name(builds):
    config_map = next(d for d in builds["monitoring"] if d["metadata"]["name"].startswith("scopeforge-prometheus-"
                                                                                          "config"))
    (job,) = yaml.safe_load(config_map["data"]["prometheus.yml"])["scrape_configs"]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    monitors = [d for d in builds["dev"] if d["kind"] == "PodMonitor"]
    monitored = {e["port"] for d in monitors for e in d["spec"]["podMetricsEndpoints"]}
    assert set(keep["__meta_kubernetes_pod_container_port_name"].split("|")) == monitored
    assert keep["__meta_kubernetes_pod_label_ray_io_is_ray_node"] == "yes"
    assert job["kubernetes_sd_configs"][0]["namespaces"] == {"own_namespace": True}


def test_gcs_ft_overlay_points_the_cluster_at_an_external_redis(builds):
    docs = builds["gcs-ft"]
    cluster = one(docs, "RayCluster")
    assert kuberay_errors(cluster) == []
    ft = cluster["spec"]["gcsFaultToleranceOptions"]
    assert ft["backend"] == "redis"
    assert ft["redisAddress"]
    assert ft["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": "scopeforge-redis", "key": "password"}}}
    assert not [d for d in docs if d["kind"] == "Secret"]  # the password lives only in the cluster
    assert cluster["metadata"]["namespace"] == "scopeforge"
