"""The real operator (Kopf, operators/handlers.py) against an emulated Kubernetes API (kmock on 127.0.0.1), driven
like a cluster would: Pipelines created over HTTP, RayJob statuses patched the way KubeRay patches them.

Covers a two-stage Pipeline through success, a retry and a failure, operator restarts mid-pipeline (including one
between a RayJob's creation and the status that records it), invalid specs and a missing Secret."""

from __future__ import annotations

import time
import uuid

import pytest
import yaml

from shared.manifests import render
from shared.manifests.crd import pipeline_crd
from tests.k8s_schemas import kuberay_errors
from tests.kube_emulator import EmulatedCluster, OperatorThread

RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with EmulatedCluster.with_kuberay(pipeline_crd()) as cluster:
        yield cluster


@pytest.fixture()
def ns(api, monkeypatch, tmp_path):
    """A fresh namespace with the storage Secret; KUBECONFIG points at the emulator (the operator logs in with it)."""
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    name = f"t-{uuid.uuid4().hex[:8]}"
    api.create(api.path("", "v1", "secrets", name), secret(name))
    return name


def secret(namespace):
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "scopeforge-storage", "namespace": namespace},
            "type": "Opaque"}


class Pipelines:
    def __init__(self, api, namespace):
        self.api, self.ns = api, namespace

    def create(self, name, stages, **spec):
        body = {"apiVersion": "scopeforge.io/v1alpha1", "kind": "Pipeline", "metadata": {"name": name},
                "spec": {"outputRoot": "s3://bucket/runs/" + name, "stages": stages, **spec}}
        return self.api.create(self.api.path("scopeforge.io", "v1alpha1", "pipelines", self.ns), body)

    def get(self, name):
        return self.api.get(self.api.path("scopeforge.io", "v1alpha1", "pipelines", self.ns, name))

    def status(self, name):
        return (self.get(name) or {}).get("status") or {}

    def rayjobs(self):
        return {j["metadata"]["name"]: j for j in self.api.list(self.api.path("ray.io", "v1", "rayjobs", self.ns))}

    def set_rayjob(self, name, status):
        self.api.patch_status(self.api.path("ray.io", "v1", "rayjobs", self.ns, name), status)

    def wait_rayjobs(self, *names, timeout=60.0):
        return self.api.wait_for(f"RayJobs {names}", lambda: (jobs := self.rayjobs()) and set(names) <= set(jobs)
                                 and jobs, timeout)

    def wait_status(self, name, what, check, timeout=60.0):
        return self.api.wait_for(f"{name}: {what}", lambda: check(s := self.status(name)) and s, timeout)

    def events(self):
        return self.api.list(self.api.path("", "v1", "events", self.ns))


def subset(actual, expected):
    return {k: actual.get(k) for k in expected} == expected


def stage(status, name):
    return next(s for s in status["stages"] if s["name"] == name)


def stage_config(rayjob):
    return yaml.safe_load(yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]["SCOPEFORGE_CONFIG"])


TWO_STAGES = [{"name": "first", "inspect-model": {"model": "tiny-llama", "max_new_tokens": 4}},
              {"name": "second", "retries": 1, "resources": {"cpu": "2", "memory": "4Gi"},
               "inspect-model": {"model": "${first}", "prompt": "Costs $5?"}}]


def test_two_stages_through_a_retry_and_operator_restarts(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread():
        pipeline = p.create("demo", TWO_STAGES)
        jobs = p.wait_rayjobs("demo-first-0")
        first = jobs["demo-first-0"]
        assert kuberay_errors(first) == []  # what the operator creates is a valid KubeRay RayJob
        (owner,) = first["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("Pipeline", pipeline["metadata"]["uid"], True)
        assert first["spec"]["entrypoint"] == "scopeforge run inspect-model --config env:SCOPEFORGE_CONFIG"
        config = stage_config(first)
        assert (config["model"], config["output_root"], config["stage"]) == ("tiny-llama", "s3://bucket/runs/demo",
                                                                            "first")
        status = p.wait_status("demo", "first running", lambda s: s.get("currentStage") == "first")
        assert status["phase"] == "Running"
        assert stage(status, "first")["state"] == "Running"
        assert stage(status, "second")["state"] == "Pending"
        assert status["progress"] == "0/2"
        p.set_rayjob("demo-first-0", RUNNING)
        p.wait_status("demo", "RUNNING mirrored", lambda s: stage(s, "first").get("jobStatus") == "RUNNING")

    # The first stage succeeds while no operator runs: the next operator must start the second stage, once.
    p.set_rayjob("demo-first-0", SUCCEEDED)
    with OperatorThread():
        jobs = p.wait_rayjobs("demo-first-0", "demo-second-0")
        second = jobs["demo-second-0"]
        assert stage_config(second)["model"] == "s3://bucket/runs/demo/first"  # ${first} -> the first stage's URI
        assert stage_config(second)["prompt"] == "Costs $5?"
        assert second["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
        status = p.wait_status("demo", "second running", lambda s: s.get("currentStage") == "second")
        assert subset(stage(status, "first"), {"state": "Succeeded", "outputURI": "s3://bucket/runs/demo/first"})
        assert status["outputs"] == {"first": "s3://bucket/runs/demo/first"}
        assert status["progress"] == "1/2"

        p.set_rayjob("demo-second-0", {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                       "reason": "AppFailed", "message": "boom in the driver"})
        p.wait_rayjobs("demo-second-1")  # retried as a new RayJob, attempt 2 of 2
        status = p.wait_status("demo", "retrying", lambda s: stage(s, "second")["state"] == "Retrying")
        assert stage(status, "second")["attempts"] == 2
        assert "boom in the driver" in stage(status, "second")["message"]

    with OperatorThread():  # a restart while the retry runs: nothing new, nothing lost
        api.wait_for("a few reconciliations", lambda: p.status("demo").get("observedGeneration") and True)
        time.sleep(1.0)
        assert set(p.rayjobs()) == {"demo-first-0", "demo-second-0", "demo-second-1"}
        assert p.status("demo")["currentStage"] == "second"
        p.set_rayjob("demo-second-1", SUCCEEDED)
        status = p.wait_status("demo", "succeeded", lambda s: s.get("phase") == "Succeeded")
        assert status["outputs"] == {"first": "s3://bucket/runs/demo/first", "second": "s3://bucket/runs/demo/second"}
        assert status["progress"] == "2/2"
        assert "currentStage" not in status
        done = next(c for c in status["conditions"] if c["type"] == "Succeeded")
        assert (done["status"], done["reason"]) == ("True", "AllStagesSucceeded")
        time.sleep(0.6)
        assert len(p.rayjobs()) == 3
    reasons = {e.get("reason") for e in p.events()}
    assert {"StageStarted", "StageSucceeded", "StageRetried", "PipelineSucceeded"} <= reasons


def test_a_rayjob_created_just_before_a_crash_is_adopted_not_duplicated(api, ns):
    p = Pipelines(api, ns)
    pipeline = p.create("crash", [{"name": "only", "inspect-model": {"model": "tiny-llama"}}])
    # What an operator that died right after its POST (before writing any status) leaves behind.
    meta = pipeline["metadata"]
    orphan = render.rayjob(render.rayjob_name("crash", "only", 0), "inspect-model", "model: tiny-llama\n",
                           namespace=ns, labels={render.LABEL_PIPELINE_UID: meta["uid"], render.LABEL_STAGE: "only",
                                                 render.LABEL_ATTEMPT: "0"},
                           owner={"apiVersion": "scopeforge.io/v1alpha1", "kind": "Pipeline", "name": "crash",
                                  "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True})
    api.create(api.path("ray.io", "v1", "rayjobs", ns), orphan)
    with OperatorThread():
        status = p.wait_status("crash", "adopted", lambda s: s.get("stages"))
        assert subset(stage(status, "only"), {"state": "Running", "rayJob": "crash-only-0", "attempts": 1})
        p.set_rayjob("crash-only-0", SUCCEEDED)
        p.wait_status("crash", "succeeded", lambda s: s.get("phase") == "Succeeded")
        # A finished Pipeline needs the operator no more: Kopf drops its finalizer (kept while the timer runs).
        api.wait_for("finalizer removed", lambda: not p.get("crash")["metadata"].get("finalizers"))
    assert set(p.rayjobs()) == {"crash-only-0"}


def test_deleting_a_running_pipeline_is_not_blocked(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("gone", [{"name": "a", "inspect-model": {}}])
        p.wait_rayjobs("gone-a-0")
        assert p.get("gone")["metadata"]["finalizers"] == ["scopeforge.io/operator"]
        api.delete(api.path("scopeforge.io", "v1alpha1", "pipelines", ns, "gone"))
        api.wait_for("the Pipeline deleted", lambda: p.get("gone") is None)
    # Its RayJob is left to Kubernetes' garbage collector (kmock has none), through this ownerReference:
    (owner,) = p.rayjobs()["gone-a-0"]["metadata"]["ownerReferences"]
    assert (owner["name"], owner["blockOwnerDeletion"]) == ("gone", True)


def test_a_stage_failing_past_its_retries_fails_the_pipeline_with_the_reason(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("fails", [{"name": "only", "inspect-model": {}}, {"name": "never", "inspect-model": {}}])
        p.wait_rayjobs("fails-only-0")
        p.set_rayjob("fails-only-0", {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded",
                                      "message": "activeDeadlineSeconds reached"})
        status = p.wait_status("fails", "failed", lambda s: s.get("phase") == "Failed")
        done = next(c for c in status["conditions"] if c["type"] == "Succeeded")
        assert (done["status"], done["reason"]) == ("False", "StageFailed")
        assert done["message"] == ("stage 'only' (inspect-model) failed after 1 attempt: DeadlineExceeded: "
                                   "activeDeadlineSeconds reached")
        assert status["currentStage"] == "only"
        assert stage(status, "never")["state"] == "Pending"
        time.sleep(0.6)
        assert set(p.rayjobs()) == {"fails-only-0"}  # no retry left, and the next stage never starts


def test_a_failed_attempt_whose_job_may_still_run_is_stopped_before_its_retry(api, ns):
    """KubeRay marks a RayJob Failed at its deadline while the Ray job goes on: the retry must wait until that RayJob
    is deleted (KubeRay's finalizer stops the Ray job), or two attempts would write the stage at once."""
    p = Pipelines(api, ns)
    path = api.path("ray.io", "v1", "rayjobs", ns, "stop-only-0")
    with OperatorThread():
        p.create("stop", [{"name": "only", "retries": 1, "inspect-model": {}}])
        p.wait_rayjobs("stop-only-0")
        api.patch(path, {"metadata": {"finalizers": ["ray.io/rayjob-stopjob-finalizer"]}})  # as KubeRay adds it
        p.set_rayjob("stop-only-0", {"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING",
                                     "reason": "DeadlineExceeded", "message": "activeDeadlineSeconds reached"})
        status = p.wait_status("stop", "stopping", lambda s: stage(s, "only")["state"] == "Stopping")
        assert subset(stage(status, "only"), {"stopping": "stop-only-0", "attempts": 1})
        api.wait_for("the RayJob deleted", lambda: p.rayjobs()["stop-only-0"]["metadata"].get("deletionTimestamp"))
        time.sleep(1.0)
        assert set(p.rayjobs()) == {"stop-only-0"}  # no retry while the old Ray job may still run
    with OperatorThread():  # a restart while it stops: the status says which RayJob it waits for
        time.sleep(0.6)
        assert set(p.rayjobs()) == {"stop-only-0"}
        assert stage(p.status("stop"), "only")["state"] == "Stopping"
        api.patch(path, {"metadata": {"finalizers": []}})  # KubeRay stopped the Ray job and let the RayJob go
        p.wait_rayjobs("stop-only-1")
        status = p.wait_status("stop", "retrying", lambda s: stage(s, "only")["state"] == "Retrying")
        assert stage(status, "only")["attempts"] == 2
        assert "stopping" not in stage(status, "only")
        p.set_rayjob("stop-only-1", SUCCEEDED)
        p.wait_status("stop", "succeeded", lambda s: s.get("phase") == "Succeeded")
    assert set(p.rayjobs()) == {"stop-only-1"}
    assert {"StageStopping", "StageRetried"} <= {e.get("reason") for e in p.events()}


@pytest.mark.parametrize(("stages", "message"), [
    ([{"name": "a", "curat": {}}], "stage 'a': unknown job or key 'curat'"),
    ([{"name": "a", "inspect-model": {"modle": "tiny-llama"}}],
     "stage 'a' config: unknown key 'modle' (did you mean 'model'?)"),
    ([{"name": "a", "inspect-model": {}, "retries": 1, "prune-everything": {}}],
     "unknown job or key 'prune-everything'"),
])
def test_invalid_specs_get_a_condition_not_a_crash(api, ns, stages, message):
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("bad", stages)
        status = p.wait_status("bad", "invalid", lambda s: s.get("phase") == "Failed")
        valid = next(c for c in status["conditions"] if c["type"] == "Valid")
        assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec")
        assert message in valid["message"]
        assert "\n" not in valid["message"]
        assert p.rayjobs() == {}
        # The same operator still serves a good Pipeline afterwards.
        p.create("good", [{"name": "a", "inspect-model": {}}])
        p.wait_rayjobs("good-a-0")
    assert "InvalidSpec" in {e.get("reason") for e in p.events()}


def test_a_missing_secret_waits_with_a_condition_then_starts(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("nosecret", [{"name": "a", "inspect-model": {}}], storageSecret="other-storage")
        status = p.wait_status("nosecret", "waiting", lambda s: s.get("conditions"))
        valid = next(c for c in status["conditions"] if c["type"] == "Valid")
        assert (valid["status"], valid["reason"]) == ("False", "SecretMissing")
        assert f"Secret {ns}/other-storage" in valid["message"]
        assert status["phase"] == "Pending"
        assert p.rayjobs() == {}
        other = secret(ns)
        other["metadata"]["name"] = "other-storage"
        api.create(api.path("", "v1", "secrets", ns), other)
        jobs = p.wait_rayjobs("nosecret-a-0")
        container = jobs["nosecret-a-0"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "other-storage"}}]
        p.wait_status("nosecret", "valid", lambda s: s.get("phase") == "Running")


def test_the_deployment_command_runs_the_operator_with_its_liveness_endpoint(api, ns):
    """`kopf run --standalone --all-namespaces --liveness=... -m operators.main`, as the Deployment starts it."""
    import requests
    from kopf.testing import KopfRunner

    from tests.conftest import free_port

    port = free_port()
    p = Pipelines(api, ns)
    args = ["run", "--standalone", "--all-namespaces", f"--liveness=http://127.0.0.1:{port}/healthz",
            "-m", "operators.main"]
    with KopfRunner(args, timeout=30) as runner:
        p.create("cli", [{"name": "a", "inspect-model": {}}])
        p.wait_rayjobs("cli-a-0")
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    assert runner.exit_code == 0, runner.output[-2000:]
