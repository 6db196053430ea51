"""The Pipeline custom resource: its generated CRD (structural, strict, one job key per stage), its mapping onto the
shared PipelineConfig, the RayJobs rendered for its stages, and the operator's import hygiene."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from shared.config import validate_config
from shared.configs import JOB_CONFIGS
from shared.configs.pipeline import PipelineConfig
from shared.errors import ConfigError
from shared.manifests import crd, render
from shared.manifests.schema import structural, structural_problems
from shared.manifests.spec import parse_pipeline, pipeline_resource
from tests.k8s_schemas import ROOT, core_errors, crd_validator, kuberay_errors, schema_errors

CRD = crd.pipeline_crd()
VALIDATOR = crd_validator(CRD, "v1alpha1")


def two_stages(**extra):
    spec = {"outputRoot": "s3://bucket/runs/demo",
            "stages": [{"name": "first", "inspect-model": {"model": "tiny-llama", "max_new_tokens": 4}},
                       {"name": "second", "retries": 1, "resources": {"cpu": "2", "memory": "4Gi"},
                        "inspect-model": {"model": "${first}"}}]}
    spec.update(extra)
    return {"apiVersion": "scopeforge.io/v1alpha1", "kind": "Pipeline", "metadata": {"name": "demo"}, "spec": spec}


def test_crd_is_structural_and_a_valid_crd():
    assert structural_problems(crd.crd_schema(CRD)) == []
    assert core_errors(CRD) == []
    assert (ROOT / "manifests/crds/pipeline.yaml").read_text() == crd.render_crd(), "run `make manifests`"
    version = CRD["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert CRD["spec"]["scope"] == "Namespaced"
    assert [c["name"] for c in version["additionalPrinterColumns"]][:3] == ["Phase", "Stage", "Progress"]


def test_every_job_is_a_stage_key_with_its_config_schema():
    stage = crd.crd_schema(CRD)["properties"]["spec"]["properties"]["stages"]["items"]
    for job, cls in JOB_CONFIGS.items():
        keys = set(stage["properties"][job]["properties"])
        assert keys == set(cls.model_fields) - {"output_root", "stage", "storage"}, job
    # The CEL rule counts exactly the job keys, spelled the way Kubernetes exposes them to CEL.
    (rule,) = stage["x-kubernetes-validations"]
    named = re.findall(r"has\(self\.([A-Za-z0-9_]+)\)", rule["rule"])
    unescaped = [n.replace("__dash__", "-").replace("__dot__", ".").replace("__slash__", "/") for n in named]
    assert sorted(unescaped) == sorted(JOB_CONFIGS)
    assert rule["rule"].endswith("== 1")


def test_rendered_pipeline_validates_and_bad_stage_configs_are_rejected():
    good = two_stages()
    assert schema_errors(VALIDATOR, good) == []

    def errors(edit):
        body = copy.deepcopy(good)
        edit(body["spec"])
        return schema_errors(VALIDATOR, body)

    assert errors(lambda s: s["stages"][0]["inspect-model"].update(max_new_tokens="many"))  # wrong type
    assert errors(lambda s: s["stages"][0]["inspect-model"].update(max_new_tokens=100000))  # out of bounds
    assert errors(lambda s: s["stages"][0]["inspect-model"].update(dtype="float8"))  # not in the enum
    assert errors(lambda s: s["stages"][0]["inspect-model"].update(modle="x"))  # unknown key
    assert errors(lambda s: s["stages"][0]["inspect-model"].update(output_root="x"))  # set by the pipeline
    assert errors(lambda s: s["stages"][0].update({"curat": {}}))  # unknown job
    assert errors(lambda s: s["stages"][0].update(name="Bad_Name"))
    assert errors(lambda s: s.update(storage={"secret_access_key": "x"}))  # credentials have no field
    assert errors(lambda s: s["stages"][1]["resources"].update(cpu=0.5))  # quote quantities


def test_structural_conversion_of_optional_and_union_fields():
    assert structural({"anyOf": [{"type": "integer"}, {"type": "null"}]}) == {"type": "integer", "nullable": True}
    assert structural({"anyOf": [{"type": "integer"}, {"type": "string"}]}) == {"x-kubernetes-int-or-string": True}
    assert structural({"type": "number", "exclusiveMinimum": 0}) == {"type": "number", "minimum": 0,
                                                                      "exclusiveMinimum": True}
    assert structural({"const": "a"}) == {"type": "string", "enum": ["a"]}
    mixed = structural({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})
    assert mixed == {"x-kubernetes-preserve-unknown-fields": True}
    assert structural_problems(mixed) == []
    assert structural_problems({"type": "object", "additionalProperties": False}) != []
    wrapped = structural({"allOf": [{"type": "object", "properties": {"k": {"type": "integer"}}}], "description": "d"})
    assert wrapped == {"description": "d", "type": "object", "properties": {"k": {"type": "integer"}}}


def test_parse_pipeline_maps_onto_the_shared_pipeline_config():
    pipeline = parse_pipeline(two_stages()["spec"])
    first, second = pipeline.stages
    assert (first.spec.job, first.config.model, first.uri) == ("inspect-model", "tiny-llama", "s3://bucket/runs/demo/first")
    assert second.config.model == "s3://bucket/runs/demo/first"  # ${first} became the first stage's URI
    assert (second.spec.retries, second.options.resources.cpu) == (1, "2")
    assert second.config.output_root == "s3://bucket/runs/demo"
    assert second.config.stage == "second"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s["stages"][0].update({"curat": {}}), "stage 'first': unknown job or key 'curat'"),
    (lambda s: s["stages"][0].pop("inspect-model"), "stage 'first': needs exactly one job key, got 0"),
    (lambda s: s["stages"][0]["inspect-model"].update(modle="x"), "unknown key 'modle' (did you mean 'model'?)"),
    (lambda s: s["stages"][1]["inspect-model"].update(model="${third}"), "${third} does not name an earlier stage"),
    (lambda s: s.update(outputRoot="runs/local"), "every stage's pods must reach it"),
    (lambda s: s.update(storage={"access_key_id": "AKIA"}), "credentials never go into a Pipeline"),
    (lambda s: s.update(cluster={"clusterSelector": {"a": "b"}}), "needs the key 'ray.io/cluster'"),
])
def test_invalid_pipelines_give_one_line_errors(edit, message):
    spec = two_stages()["spec"]
    edit(spec)
    with pytest.raises(ConfigError) as err:
        parse_pipeline(spec, "Pipeline ns/demo")
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text, text
    assert text.startswith("Pipeline ns/demo"), text


def test_local_pipeline_config_renders_as_a_valid_pipeline_resource():
    local = validate_config(PipelineConfig, {"output_root": "s3://b/run", "storage": {"endpoint_url": "http://s3:9000"},
                                             "stages": [{"name": "a", "job": "inspect-model", "retries": 2,
                                                         "config": {"model": "tiny-llama"}}]}, "p.yaml")
    body = pipeline_resource(local, "demo", "ml")
    assert schema_errors(VALIDATOR, body) == []
    assert body["spec"]["stages"] == [{"name": "a", "retries": 2, "inspect-model": {"model": "tiny-llama"}}]
    again = parse_pipeline(body["spec"])
    assert again.config.stages[0].config == {"model": "tiny-llama"}
    assert again.config.storage.endpoint_url


def test_rayjob_names_are_short_dns_labels_deterministic_and_unique_across_pipelines():
    long_pipeline = "a-very-long-pipeline-name-for-the-finescope-experiment-number-one"
    uid = "5f0c1d9e-0000-4000-8000-000000000001"
    names = {render.rayjob_name(long_pipeline, stage, attempt, uid)
             for stage in ("curate", "prune-then-distill", "x" * 40) for attempt in range(11)}
    assert len(names) == 33
    assert all(len(n) <= 47 and render.DNS1035.match(n) for n in names)
    tag = hashlib.sha256(uid.encode()).hexdigest()[:5]
    assert render.rayjob_name("demo", "first", 0, uid) == f"demo-first-{tag}-0"
    assert render.rayjob_name("9.lives", "a", 1, uid) == f"p-9-lives-a-{tag}-1"
    assert render.rayjob_name(long_pipeline, "curate", 3, uid) == render.rayjob_name(long_pipeline, "curate", 3, uid)
    # Pipeline a + stage b-c and Pipeline a-b + stage c (each with its own UID) no longer share a name, nor do
    # long names that differ only in their UID.
    other = "5f0c1d9e-0000-4000-8000-000000000002"
    assert render.rayjob_name("a", "b-c", 0, uid) != render.rayjob_name("a-b", "c", 0, other)
    assert render.rayjob_name(long_pipeline, "curate", 0, uid) != render.rayjob_name(long_pipeline, "curate", 0, other)


def test_rendered_stage_rayjobs_validate_for_every_cluster_choice():
    from operators import reconcile

    meta = {"name": "demo", "namespace": "ml", "uid": "1234-abcd", "generation": 1}
    selector = {"clusterSelector": {"ray.io/cluster": "scopeforge"}}
    given = {"rayClusterSpec": render.cluster_spec(image="img:1")}
    for cluster in ({}, selector, given):
        body = two_stages(cluster=cluster)
        pipeline = parse_pipeline(body["spec"])
        step = reconcile.plan(pipeline, meta, "scopeforge.io/v1alpha1", {}, [], "img:1")
        (manifest,) = step.create
        assert kuberay_errors(manifest) == []
        assert manifest["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"
        assert ("clusterSelector" in manifest["spec"]) == bool(cluster.get("clusterSelector"))
        assert manifest["spec"]["shutdownAfterJobFinishes"] is not bool(cluster.get("clusterSelector"))


def test_config_text_survives_kuberays_shell_quoting(tmp_path):
    """KubeRay turns runtimeEnvYAML into JSON, Go-quotes it into a bash command line of its submitter pod, and the
    Ray Jobs CLI parses the JSON: the config must come out of that chain unchanged."""
    config = {"prompt": 'Costs $HOME and `uname` and "quotes" \\ back\nslash, ünïcode', "max_new_tokens": 4,
              "model": "${not-a-placeholder}"}
    env_yaml = render.runtime_env_yaml(render.config_yaml(config))
    as_json = json.dumps(yaml.safe_load(env_yaml), ensure_ascii=False)  # sigs.k8s.io/yaml YAMLToJSON
    quoted = json.dumps(as_json, ensure_ascii=False)  # strconv.Quote: "..." with \" \\ \n escapes
    script = tmp_path / "submit.sh"
    script.write_text(f"printf '%s' {quoted}\n", encoding="utf-8")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"], "HOME": "/should/not/appear"}).stdout
    received = json.loads(out)["env_vars"][render.CONFIG_ENV]
    assert yaml.safe_load(received) == config


def test_operator_imports_neither_ray_nor_torch():
    code = ("import sys, operators.main, operators.handlers, operators.generate, shared.manifests.crd, "
            "operators.__main__\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cli_import_stays_light_with_the_kubernetes_commands():
    code = ("import sys\nfrom ray_jobs import cli\ncli.build_parser(); cli.commands()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'kopf', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_render_prints_valid_manifests(tmp_path):
    from tests.conftest import run_cli

    job = tmp_path / "job.yaml"
    job.write_text("model: tiny-llama\noutput_root: s3://scopeforge/runs/x\nprompt: 'pay $3'\n")
    rayjob = run_cli("render", "inspect-model", "--config", str(job), "--namespace", "ml", "--image", "reg/sf:1")
    assert rayjob.returncode == 0, rayjob.stderr
    manifest = yaml.safe_load(rayjob.stdout)
    assert kuberay_errors(manifest) == []
    assert manifest["metadata"] == manifest["metadata"] | {"name": "job",
                                                                                               "namespace": "ml"}
    assert yaml.safe_load(yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]["SCOPEFORGE_CONFIG"])[
        "prompt"] == "pay $3"
    shared_cluster = yaml.safe_load(run_cli("render", "inspect-model", "--config", str(job), "--cluster",
                                            "scopeforge").stdout)
    assert kuberay_errors(shared_cluster) == []
    assert shared_cluster["spec"]["clusterSelector"] == {
        "ray.io/cluster": "scopeforge"}

    local = tmp_path / "my-pipeline.yaml"
    local.write_text("output_root: s3://scopeforge/runs/p\nstages:\n  - {name: a, job: inspect-model, retries: 1}\n"
                     "  - {name: b, job: inspect-model, config: {model: '${a}'}}\n")
    pipeline = run_cli("render", "pipeline", "--config", str(local))
    assert pipeline.returncode == 0, pipeline.stderr
    body = yaml.safe_load(pipeline.stdout)
    assert schema_errors(VALIDATOR, body) == []
    assert body["metadata"]["name"] == "my-pipeline"
    assert [s.name for s in parse_pipeline(body["spec"]).stages] == ["a", "b"]

    for args, expected in [
        (["render", "inspect-model"], "output_root runs/default: pods on Kubernetes cannot reach a local path"),
        (["render", "nope", "--config", str(job)], "unknown job 'nope'"),
        (["render", "pipeline"], "render pipeline: --config FILE is required"),
        (["render", "inspect-model", "--config", str(job), "--set", "dtype=float8"], "--set dtype"),
    ]:
        result = run_cli(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (args, result.stderr)
        assert len(lines) == 1, (args, result.stderr)
        assert expected in lines[0], (args, result.stderr)


@pytest.mark.parametrize(("status", "outcome"), [
    ({}, "Running"),
    ({"jobDeploymentStatus": "Initializing"}, "Running"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, "Running"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"}, "Succeeded"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "Succeeded"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, "Failed"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, "Failed"),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "Failed"),
    ({"jobDeploymentStatus": "ValidationFailed", "message": "bad spec"}, "Failed"),
    ({"jobDeploymentStatus": "Complete"}, "Failed"),
    ({"jobDeploymentStatus": "Retrying"}, "Running"),
])
def test_what_a_rayjob_status_means_for_its_stage(status, outcome):
    from operators.reconcile import rayjob_outcome

    assert rayjob_outcome({"status": status}) == outcome


def test_config_from_an_environment_variable():
    from tests.conftest import run_cli

    result = run_cli("run", "inspect-model", "--config", "env:SCOPEFORGE_NO_SUCH_VAR")
    assert result.returncode == 2
    assert result.stderr.strip() == ("scopeforge: error: env:SCOPEFORGE_NO_SUCH_VAR: environment variable "
                                     "SCOPEFORGE_NO_SUCH_VAR is not set")
    bad = run_cli("run", "inspect-model", "--config", "env:SF_CONFIG", env={"SF_CONFIG": "model: [unclosed"})
    assert bad.returncode == 2
    assert "env:SF_CONFIG: YAML error" in bad.stderr
    typo = run_cli("run", "inspect-model", "--config", "env:SF_CONFIG", env={"SF_CONFIG": "modle: tiny-llama"})
    assert typo.returncode == 2
    assert "env:SF_CONFIG: unknown key 'modle'" in typo.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Stage resources: the scheduling and queueing knobs


def test_every_stage_knob_validates_in_the_crd_and_renders_a_valid_rayjob():
    from tests.test_pod_security import EVERY_KNOB, every_knob_pipeline, operator_rayjob

    spec = every_knob_pipeline()
    body = {"apiVersion": "scopeforge.io/v1alpha1", "kind": "Pipeline", "metadata": {"name": "knobs"}, "spec": spec}
    assert schema_errors(VALIDATOR, body) == []
    manifest = operator_rayjob(spec)
    assert kuberay_errors(manifest) == []
    meta, rayjob = manifest["metadata"], manifest["spec"]
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert meta["annotations"] == {"example.com/owner": "team a"}
    assert rayjob["suspend"] is True  # created suspended: Kueue admits it
    cluster = rayjob["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is False  # Kueue refuses autoscaling: a fixed-size cluster
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}  # a GPU stage also has a CPU group
    assert (groups["gpu"]["minReplicas"], groups["gpu"]["maxReplicas"], groups["cpu"]["replicas"]) == (3, 3, 2)
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "50Gi",
                                                           "nvidia.com/gpu": "1"}
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "2"
    head = cluster["headGroupSpec"]["template"]
    assert head["spec"]["containers"][0]["resources"]["limits"]["memory"] == "12Gi"
    submitter = rayjob["submitterPodTemplate"]
    for template in (head, groups["cpu"]["template"], groups["gpu"]["template"], submitter):
        pod = template["spec"]
        assert pod["priorityClassName"] == "batch-low"
        assert pod["nodeSelector"] == EVERY_KNOB["nodeSelector"]
        assert pod["affinity"] == EVERY_KNOB["affinity"]
        assert EVERY_KNOB["tolerations"][0] in pod["tolerations"]
        assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]
        assert template["metadata"]["labels"]["cost-center"] == "ml"
        assert "kueue.x-k8s.io/queue-name" not in template["metadata"]["labels"]  # the RayJob is the workload
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    # the head reads the dashboard's Metrics-tab settings where manifests/base/monitoring installed them
    assert {"configMapRef": {"name": "scopeforge-ray-dashboard", "optional": True}} in \
        head["spec"]["containers"][0]["envFrom"]
    for pod in (head["spec"], gpu):
        assert pod["serviceAccountName"] == "scopeforge-s3-irsa"
        secrets = [e for e in pod["containers"][0].get("envFrom", []) if "secretRef" in e]
        assert secrets == []  # storageSecret null: workload identity, no static keys
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/home/ray/.cache"] == "models"  # the model-cache PVC replaces the cache emptyDir
        assert mounts["/mnt/spill"] == "spill"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "model-cache"}
        assert volumes["spill"]["emptyDir"] == {"sizeLimit": "100Gi"}
        assert "cache" not in volumes
    assert "serviceAccountName" not in submitter["spec"]  # it only talks to the dashboard


def test_a_stage_without_knobs_autoscales_from_zero_and_is_not_suspended():
    manifest = render.rayjob("plain", "inspect-model", "{}\n")
    assert "suspend" not in manifest["spec"]
    (group,) = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"]) == ("cpu", 0, 4)
    assert manifest["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize(("resources", "message"), [
    ({"labels": {"bad key!": "x"}}, "labels key 'bad key!' is not a qualified name"),
    ({"labels": {"team": "not a value"}}, "is not a label value"),
    ({"tolerations": [{"operator": "Exists", "value": "x"}]}, "operator Exists takes no value"),
    ({"volumes": [{"name": "a", "mountPath": "/tmp/ray"}]}, "/tmp/ray is Ray's own emptyDir"),
    ({"volumes": [{"name": "tmp", "mountPath": "/data"}]}, "'tmp' is a built-in volume name"),
    ({"volumes": [{"name": "a", "mountPath": "/a"}, {"name": "a", "mountPath": "/b"}]}, "name 'a' appears twice"),
    ({"volumes": [{"name": "a", "mountPath": "/a", "claimName": "c", "sizeLimit": "1Gi"}]}, "sizeLimit is for an"),
    ({"imagePullSecrets": ["Bad_Name"]}, "'Bad_Name' is not a Secret name"),
    ({"head": {"cpu": 2.5}}, "head.cpu"),
])
def test_bad_stage_knobs_give_one_line_errors(resources, message):
    spec = two_stages()["spec"]
    spec["stages"][0]["resources"] = resources
    with pytest.raises(ConfigError) as err:
        parse_pipeline(spec, "Pipeline ns/demo")
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text, text
    assert "stage 'first'" in text, text


def test_a_kueue_queue_needs_the_stages_own_cluster():
    spec = two_stages(cluster={"clusterSelector": {"ray.io/cluster": "scopeforge"}})["spec"]
    spec["stages"][0]["resources"] = {"labels": {"kueue.x-k8s.io/queue-name": "q"}}
    with pytest.raises(ConfigError, match="stage 'first': resources.labels kueue.x-k8s.io/queue-name"):
        parse_pipeline(spec, "Pipeline ns/demo")
    with pytest.raises(ConfigError, match="cannot run on an existing cluster"):
        render.rayjob("q", "inspect-model", "{}\n", cluster_selector={"ray.io/cluster": "scopeforge"},
                      resources=parse_pipeline(two_stages()["spec"]).stages[0].options.resources.model_copy(
                          update={"labels": {"kueue.x-k8s.io/queue-name": "q"}}))


def test_the_crd_schema_refuses_bad_knob_shapes():
    def errors(resources):
        body = two_stages()
        body["spec"]["stages"][0]["resources"] = resources
        return schema_errors(VALIDATOR, body)

    assert errors({"priorityClassName": "Not_DNS"})
    assert errors({"tolerations": [{"key": "a", "effect": "Sometimes"}]})
    assert errors({"volumes": [{"name": "v", "mountPath": "relative"}]})
    assert errors({"labels": {"a": 1}})
    assert errors({"ephemeralStorage": "lots"})
    assert errors({"hostNetwork": True})  # no such knob
