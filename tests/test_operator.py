"""The real operator (Kopf, operators/handlers.py) against an emulated Kubernetes API (kmock on 127.0.0.1), driven
like a cluster would: Pipelines created over HTTP, RayJob statuses patched the way KubeRay patches them.

Covers a two-stage Pipeline through success, a retry and a failure, operator restarts mid-pipeline (including one
between a RayJob's creation and the status that records it), invalid specs, the operator's policy, RayJob names
unique across Pipelines and a name held by another owner, the start deadline (reasons read from the cluster's pods,
a missing Secret among them), the per-stage status mirrored from the RayJob, and the GPU check."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest
import yaml

from operators.config import PipelinePolicy
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
    """A fresh namespace (no Secret in it: the operator never reads one); KUBECONFIG points at the emulator (the
    operator logs in with it)."""
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    return f"t-{uuid.uuid4().hex[:8]}"


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

    def job(self, name, stage, attempt=0):
        """The RayJob name of an attempt: <pipeline>-<stage>-<hash of the Pipeline's UID>-<attempt>."""
        return render.rayjob_name(name, stage, attempt, self.get(name)["metadata"]["uid"])

    def rayjobs(self):
        return {j["metadata"]["name"]: j for j in self.api.list(self.api.path("ray.io", "v1", "rayjobs", self.ns))}

    def set_rayjob(self, name, status):
        self.api.patch_status(self.api.path("ray.io", "v1", "rayjobs", self.ns, name), status)

    def wait_rayjobs(self, *names, timeout=60.0):
        return self.api.wait_for(f"RayJobs {names}", lambda: (jobs := self.rayjobs()) and set(names) <= set(jobs)
                                 and jobs, timeout)

    def wait_status(self, name, what, check, timeout=60.0):
        return self.api.wait_for(f"{name}: {what}", lambda: check(s := self.status(name)) and s, timeout)

    def pod(self, name, cluster, status):
        """A pod of a RayCluster (label ray.io/cluster) with the status a kubelet / scheduler would write."""
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"ray.io/cluster": cluster}},
                "status": status}
        self.api.create(self.api.path("", "v1", "pods", self.ns), body)

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
        jobs = p.wait_rayjobs(p.job("demo", "first", 0))
        first = jobs[p.job("demo", "first", 0)]
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
        p.set_rayjob(p.job("demo", "first", 0), RUNNING)
        p.wait_status("demo", "RUNNING mirrored", lambda s: stage(s, "first").get("jobStatus") == "RUNNING")

    # The first stage succeeds while no operator runs: the next operator must start the second stage, once.
    p.set_rayjob(p.job("demo", "first", 0), SUCCEEDED)
    with OperatorThread():
        jobs = p.wait_rayjobs(p.job("demo", "first", 0), p.job("demo", "second", 0))
        second = jobs[p.job("demo", "second", 0)]
        assert stage_config(second)["model"] == "s3://bucket/runs/demo/first"  # ${first} -> the first stage's URI
        assert stage_config(second)["prompt"] == "Costs $5?"
        assert second["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"]["limits"] == {"cpu": "2", "memory": "4Gi"}
        status = p.wait_status("demo", "second running", lambda s: s.get("currentStage") == "second")
        assert subset(stage(status, "first"), {"state": "Succeeded", "outputURI": "s3://bucket/runs/demo/first"})
        assert status["outputs"] == {"first": "s3://bucket/runs/demo/first"}
        assert status["progress"] == "1/2"

        p.set_rayjob(p.job("demo", "second", 0), {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                       "reason": "AppFailed", "message": "boom in the driver"})
        p.wait_rayjobs(p.job("demo", "second", 1))  # retried as a new RayJob, attempt 2 of 2
        status = p.wait_status("demo", "retrying", lambda s: stage(s, "second")["state"] == "Retrying")
        assert stage(status, "second")["attempts"] == 2
        assert "boom in the driver" in stage(status, "second")["message"]

    with OperatorThread():  # a restart while the retry runs: nothing new, nothing lost
        api.wait_for("a few reconciliations", lambda: p.status("demo").get("observedGeneration") and True)
        time.sleep(1.0)
        assert set(p.rayjobs()) == {p.job("demo", "first", 0), p.job("demo", "second", 0),
                                    p.job("demo", "second", 1)}
        assert p.status("demo")["currentStage"] == "second"
        p.set_rayjob(p.job("demo", "second", 1), SUCCEEDED)
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
    orphan = render.rayjob(p.job("crash", "only", 0), "inspect-model", "model: tiny-llama\n",
                           namespace=ns, labels={render.LABEL_PIPELINE_UID: meta["uid"], render.LABEL_STAGE: "only",
                                                 render.LABEL_ATTEMPT: "0"},
                           owner={"apiVersion": "scopeforge.io/v1alpha1", "kind": "Pipeline", "name": "crash",
                                  "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True})
    api.create(api.path("ray.io", "v1", "rayjobs", ns), orphan)
    with OperatorThread():
        status = p.wait_status("crash", "adopted", lambda s: s.get("stages"))
        assert subset(stage(status, "only"), {"state": "Running", "rayJob": p.job("crash", "only", 0),
                                              "attempts": 1})
        p.set_rayjob(p.job("crash", "only", 0), SUCCEEDED)
        p.wait_status("crash", "succeeded", lambda s: s.get("phase") == "Succeeded")
        # A finished Pipeline needs the operator no more: Kopf drops its finalizer (kept while the timer runs).
        api.wait_for("finalizer removed", lambda: not p.get("crash")["metadata"].get("finalizers"))
    assert set(p.rayjobs()) == {p.job("crash", "only", 0)}


def test_deleting_a_running_pipeline_is_not_blocked(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("gone", [{"name": "a", "inspect-model": {}}])
        name = p.job("gone", "a", 0)
        p.wait_rayjobs(name)
        assert p.get("gone")["metadata"]["finalizers"] == ["scopeforge.io/operator"]
        api.delete(api.path("scopeforge.io", "v1alpha1", "pipelines", ns, "gone"))
        api.wait_for("the Pipeline deleted", lambda: p.get("gone") is None)
    # Its RayJob is left to Kubernetes' garbage collector (kmock has none), through this ownerReference:
    (owner,) = p.rayjobs()[name]["metadata"]["ownerReferences"]
    assert (owner["name"], owner["blockOwnerDeletion"]) == ("gone", True)


def test_a_stage_failing_past_its_retries_fails_the_pipeline_with_the_reason(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("fails", [{"name": "only", "inspect-model": {}}, {"name": "never", "inspect-model": {}}])
        p.wait_rayjobs(p.job("fails", "only", 0))
        p.set_rayjob(p.job("fails", "only", 0), {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded",
                                      "message": "activeDeadlineSeconds reached"})
        status = p.wait_status("fails", "failed", lambda s: s.get("phase") == "Failed")
        done = next(c for c in status["conditions"] if c["type"] == "Succeeded")
        assert (done["status"], done["reason"]) == ("False", "StageFailed")
        assert done["message"] == ("stage 'only' (inspect-model) failed after 1 attempt: DeadlineExceeded: "
                                   "activeDeadlineSeconds reached")
        assert status["currentStage"] == "only"
        assert stage(status, "never")["state"] == "Pending"
        time.sleep(0.6)
        assert set(p.rayjobs()) == {p.job("fails", "only", 0)}  # no retry left, and the next stage never starts


def test_a_failed_attempt_whose_job_may_still_run_is_stopped_before_its_retry(api, ns):
    """KubeRay marks a RayJob Failed at its deadline while the Ray job goes on: the retry must wait until that RayJob
    is deleted (KubeRay's finalizer stops the Ray job), or two attempts would write the stage at once."""
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("stop", [{"name": "only", "retries": 1, "inspect-model": {}}])
        path = api.path("ray.io", "v1", "rayjobs", ns, p.job("stop", "only", 0))
        p.wait_rayjobs(p.job("stop", "only", 0))
        api.patch(path, {"metadata": {"finalizers": ["ray.io/rayjob-stopjob-finalizer"]}})  # as KubeRay adds it
        p.set_rayjob(p.job("stop", "only", 0), {"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING",
                                     "reason": "DeadlineExceeded", "message": "activeDeadlineSeconds reached"})
        status = p.wait_status("stop", "stopping", lambda s: stage(s, "only")["state"] == "Stopping")
        assert subset(stage(status, "only"), {"stopping": p.job("stop", "only", 0), "attempts": 1})
        first = p.job("stop", "only", 0)
        api.wait_for("the RayJob deleted", lambda: p.rayjobs()[first]["metadata"].get("deletionTimestamp"))
        time.sleep(1.0)
        assert set(p.rayjobs()) == {p.job("stop", "only", 0)}  # no retry while the old Ray job may still run
    with OperatorThread():  # a restart while it stops: the status says which RayJob it waits for
        time.sleep(0.6)
        assert set(p.rayjobs()) == {p.job("stop", "only", 0)}
        assert stage(p.status("stop"), "only")["state"] == "Stopping"
        api.patch(path, {"metadata": {"finalizers": []}})  # KubeRay stopped the Ray job and let the RayJob go
        p.wait_rayjobs(p.job("stop", "only", 1))
        status = p.wait_status("stop", "retrying", lambda s: stage(s, "only")["state"] == "Retrying")
        assert stage(status, "only")["attempts"] == 2
        assert "stopping" not in stage(status, "only")
        p.set_rayjob(p.job("stop", "only", 1), SUCCEEDED)
        p.wait_status("stop", "succeeded", lambda s: s.get("phase") == "Succeeded")
    assert set(p.rayjobs()) == {p.job("stop", "only", 1)}
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
        p.wait_rayjobs(p.job("good", "a", 0))
    assert "InvalidSpec" in {e.get("reason") for e in p.events()}


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
        p.wait_rayjobs(p.job("cli", "a", 0))
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    assert runner.exit_code == 0, runner.output[-2000:]


def ago(seconds):
    return (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def valid_condition(status):
    return next(c for c in status["conditions"] if c["type"] == "Valid")


@pytest.mark.parametrize(("spec", "settings", "rule", "named"), [
    ({"image": "docker.io/evil/miner:1"}, {}, "policy image_prefixes", "docker.io/evil/miner:1"),
    ({"image": "ghcr.io/acme/scopeforge:2"}, {"image_prefixes": ["ghcr.io/acme/"]}, None, None),
    ({"cluster": {"rayClusterSpec": render.cluster_spec(image="img:test")}}, {}, "policy raw_cluster_specs",
     "rayClusterSpec"),
    ({"storageSecret": "prod-db-password"}, {}, "policy secrets", "prod-db-password"),
    ({"storageSecret": "team-storage"}, {"secrets": ["team-storage"]}, None, None),
    ({"cluster": {"rayClusterSpec": {**render.cluster_spec(image="img:test"), "headGroupSpec": {
        "rayStartParams": {}, "template": {"spec": {"serviceAccountName": "cluster-admin-sa", "containers": [
            {"name": "ray-head", "image": "img:test"}]}}}}}},
     {"raw_cluster_specs": True}, "policy service_accounts", "cluster-admin-sa"),
])
def test_the_policy_refuses_what_its_administrator_did_not_allow(api, ns, spec, settings, rule, named):
    p = Pipelines(api, ns)
    with OperatorThread(policy=PipelinePolicy(**settings)):
        p.create("pol", [{"name": "a", "inspect-model": {}}], **spec)
        if rule is None:  # allowed: it starts
            p.wait_rayjobs(p.job("pol", "a", 0))
            assert valid_condition(p.wait_status("pol", "valid", lambda s: s.get("conditions")))["status"] == "True"
            return
        status = p.wait_status("pol", "refused", lambda s: s.get("phase") == "Failed")
        valid = valid_condition(status)
        assert (valid["status"], valid["reason"]) == ("False", "PolicyViolation")
        assert valid["message"].startswith(rule)
        assert named in valid["message"]
        time.sleep(0.6)
        assert p.rayjobs() == {}  # nothing of it ever runs
    assert "PolicyViolation" in {e.get("reason") for e in p.events()}


def test_the_colliding_pipelines_of_the_issue_get_their_own_rayjobs(api, ns):
    """Pipeline a + stage b-c and Pipeline a-b + stage c both used to be a-b-c-0, and the second waited for ever."""
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("a", [{"name": "b-c", "inspect-model": {}}])
        p.create("a-b", [{"name": "c", "inspect-model": {}}])
        jobs = p.wait_rayjobs(p.job("a", "b-c", 0), p.job("a-b", "c", 0))
        assert p.job("a", "b-c", 0) != p.job("a-b", "c", 0)
        for pipeline, stage_name in (("a", "b-c"), ("a-b", "c")):
            (owner,) = jobs[p.job(pipeline, stage_name, 0)]["metadata"]["ownerReferences"]
            assert owner["uid"] == p.get(pipeline)["metadata"]["uid"]
            p.set_rayjob(p.job(pipeline, stage_name, 0), SUCCEEDED)
        p.wait_status("a", "succeeded", lambda s: s.get("phase") == "Succeeded")
        p.wait_status("a-b", "succeeded", lambda s: s.get("phase") == "Succeeded")


def test_a_rayjob_name_held_by_another_owner_is_a_condition_not_success(api, ns):
    p = Pipelines(api, ns)
    p.create("held", [{"name": "a", "inspect-model": {}}])
    name = p.job("held", "a", 0)
    squatter = render.rayjob(name, "inspect-model", "model: tiny-llama\n", namespace=ns)
    api.create(api.path("ray.io", "v1", "rayjobs", ns), squatter)
    with OperatorThread():
        status = p.wait_status("held", "blocked", lambda s: s.get("conditions"))
        valid = valid_condition(status)
        assert (valid["status"], valid["reason"]) == ("False", "NameConflict")
        assert f"RayJob {ns}/{name} already exists and is not this Pipeline's" in valid["message"]
        assert status["phase"] != "Running"
        api.delete(api.path("ray.io", "v1", "rayjobs", ns, name))  # the squatter goes: the stage starts
        api.wait_for("its own RayJob", lambda: (p.rayjobs().get(name) or {}).get("metadata", {}).get(
            "ownerReferences"))
        status = p.wait_status("held", "running", lambda s: s.get("phase") == "Running")
        assert valid_condition(status)["status"] == "True"


def test_a_cluster_that_never_starts_fails_at_the_start_deadline_with_its_pods_reason(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread(start_deadline_s=600):
        # its storage Secret does not exist: the operator cannot know (it reads no Secret), the pods say it
        p.create("late", [{"name": "a", "retries": 1, "inspect-model": {}}], storageSecret="scopeforge-storage")
        first = p.job("late", "a", 0)
        p.wait_rayjobs(first)
        p.set_rayjob(first, {"jobDeploymentStatus": "Initializing", "jobStatus": "NEW", "rayClusterName": "c1",
                             "startTime": ago(5)})
        p.pod("c1-head-x", "c1", {"phase": "Pending", "containerStatuses": [{"name": "ray-head", "state": {"waiting": {
            "reason": "CreateContainerConfigError", "message": 'secret "scopeforge-storage" not found'}}}]})
        status = p.wait_status("late", "waiting reason", lambda s: "CreateContainerConfigError" in (
            stage(s, "a").get("message") or ""))
        assert stage(status, "a")["state"] == "Running"
        assert 'secret "scopeforge-storage" not found' in stage(status, "a")["message"]
        # an image that cannot be pulled, past the deadline: the attempt fails, is deleted, and the retry starts
        p.pod("c1-worker-y", "c1", {"phase": "Pending", "containerStatuses": [{"name": "ray-worker", "state": {
            "waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "img:test"'}}}]})
        p.set_rayjob(first, {"startTime": ago(601)})
        second = p.job("late", "a", 1)
        p.wait_rayjobs(second)
        assert first not in p.rayjobs()
        status = p.wait_status("late", "retrying", lambda s: stage(s, "a")["state"] == "Retrying")
        assert "StartDeadlineExceeded" in stage(status, "a")["message"]
        assert "ImagePullBackOff" in stage(status, "a")["message"]
        # the retry's pods fit no node: the last attempt fails the Pipeline with that reason, and its RayJob goes
        p.set_rayjob(second, {"jobDeploymentStatus": "Initializing", "rayClusterName": "c2", "startTime": ago(700)})
        p.pod("c2-head-z", "c2", {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                  "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient "
                                                                       "nvidia.com/gpu."}]})
        status = p.wait_status("late", "failed", lambda s: s.get("phase") == "Failed")
        done = next(c for c in status["conditions"] if c["type"] == "Succeeded")
        assert done["message"].startswith("stage 'a' (inspect-model) failed after 2 attempts: StartDeadlineExceeded")
        assert "pod c2-head-z: Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in done[
            "message"]
        api.wait_for("the last attempt deleted", lambda: second not in p.rayjobs())
    with OperatorThread(start_deadline_s=600):  # a restart after that deletion starts nothing again
        time.sleep(1.0)
        assert p.rayjobs() == {}
        assert p.status("late")["phase"] == "Failed"


def test_a_queued_rayjob_does_not_count_against_the_start_deadline(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread(start_deadline_s=60):
        p.create("queued", [{"name": "a", "inspect-model": {}}])
        name = p.job("queued", "a", 0)
        p.wait_rayjobs(name)
        p.set_rayjob(name, {"jobDeploymentStatus": "Suspended", "startTime": ago(3600)})  # held by Kueue
        p.wait_status("queued", "suspended mirrored", lambda s: stage(s, "a").get("jobDeploymentStatus") == "Suspended")
        time.sleep(0.6)
        assert p.status("queued")["phase"] == "Running"
        assert name in p.rayjobs()


def test_each_stage_mirrors_its_rayjobs_status(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("rich", [{"name": "a", "inspect-model": {}}])
        name = p.job("rich", "a", 0)
        p.wait_rayjobs(name)
        p.set_rayjob(name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "rich-c",
                            "dashboardURL": "rich-c-head-svc.ns.svc.cluster.local:8265",
                            "startTime": "2026-01-02T03:04:05Z"})
        status = p.wait_status("rich", "mirrored", lambda s: stage(s, "a").get("dashboardURL"))
        assert subset(stage(status, "a"), {"state": "Running", "rayJob": name, "jobStatus": "RUNNING",
                                           "jobDeploymentStatus": "Running", "rayCluster": "rich-c",
                                           "dashboardURL": "rich-c-head-svc.ns.svc.cluster.local:8265",
                                           "startTime": "2026-01-02T03:04:05Z"})
        p.set_rayjob(name, {**SUCCEEDED, "endTime": "2026-01-02T04:00:00Z", "reason": ""})
        status = p.wait_status("rich", "succeeded", lambda s: s.get("phase") == "Succeeded")
        assert subset(stage(status, "a"), {"state": "Succeeded", "jobDeploymentStatus": "Complete",
                                           "endTime": "2026-01-02T04:00:00Z", "rayCluster": "rich-c"})
        assert "reason" not in stage(status, "a")  # empty fields are left out, not written as ""


def test_stage_gpus_must_match_the_jobs_gpu_requests(api, ns):
    p = Pipelines(api, ns)
    with OperatorThread():
        p.create("gpus", [{"name": "a", "resources": {"gpu": 1}, "inspect-model": {}}])
        status = p.wait_status("gpus", "refused", lambda s: s.get("phase") == "Failed")
        valid = valid_condition(status)
        assert (valid["status"], valid["reason"]) == ("False", "GpuMismatch")
        assert valid["message"] == ("stage 'a': resources.gpu 1 does not match its inspect-model config, which asks "
                                    "0 GPU per worker (set resources.gpu: 0)")
        assert p.rayjobs() == {}


def test_the_shipped_operator_config_is_the_code_default_and_a_bad_one_is_a_one_line_error(tmp_path, monkeypatch):
    from operators.config import OperatorSettings
    from shared.errors import ConfigError
    from tests.k8s_schemas import ROOT

    (configmap,) = list(yaml.safe_load_all((ROOT / "manifests/base/operator/config.yaml").read_text()))
    path = tmp_path / "operator.yaml"
    path.write_text(configmap["data"]["operator.yaml"])
    monkeypatch.setenv("SCOPEFORGE_OPERATOR_CONFIG", str(path))
    monkeypatch.setenv("SCOPEFORGE_IMAGE", "ghcr.io/acme/scopeforge:9")
    settings = OperatorSettings.from_env()
    assert settings.policy == PipelinePolicy()  # the file spells out the defaults: nothing looser
    assert (settings.image, settings.start_deadline_s) == ("ghcr.io/acme/scopeforge:9", 900)
    path.write_text("policy:\n  raw_cluster_spec: true\n")
    with pytest.raises(ConfigError) as error:
        OperatorSettings.from_env()
    assert "raw_cluster_spec" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_slim_operator_image_installs_everything_the_operator_imports_and_no_ray_or_torch():
    """manifests/image/operator.Dockerfile installs OPERATOR_DEPS (and their requirements) plus the project's wheel
    without its dependencies: every distribution `import operators.main` loads must be among them."""
    import re
    import subprocess
    import sys
    from importlib import metadata

    from packaging.requirements import Requirement

    from tests.k8s_schemas import ROOT

    dockerfile = (ROOT / "manifests/image/operator.Dockerfile").read_text()
    (deps,) = re.findall(r'^ARG OPERATOR_DEPS="([^"]+)"', dockerfile, flags=re.M)

    def norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    installed, todo = set(), [norm(d) for d in deps.split()]
    while todo:
        name = todo.pop()
        if name in installed:
            continue
        installed.add(name)
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    code = "import sys, operators.main\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    # (private modules such as _distutils_hack come from the virtual environment's .pth files, not the operator)
    modules = {m for m in out.stdout.split() if not m.startswith("_")} - set(sys.stdlib_module_names) - {
        "operators", "shared"}
    owners = metadata.packages_distributions()
    loaded = {norm(dist) for module in modules for dist in owners.get(module, [])}
    assert loaded, modules
    assert loaded <= installed, sorted(loaded - installed)
    assert not {"ray", "torch", "transformers"} & installed
