"""The Pipeline CustomResourceDefinition, generated from the job config models.

    python -m shared.manifests.crd > manifests/crds/pipeline.yaml  # or: make manifests (writes every generated file)

Each job registered in ``shared.configs.JOB_CONFIGS`` becomes a stage key whose schema is that job's config schema
(minus output_root, stage and storage, which the pipeline sets), so the API server rejects a stage config of the wrong
type or shape, and a CEL rule requires exactly one job key per stage. See shared/manifests/spec.py for the shape.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from shared.config import StorageConfig, json_schema
from shared.configs import JOB_CONFIGS, summary
from shared.configs.pipeline import StageSpec
from shared.manifests.schema import structural
from shared.manifests.spec import (
    API_VERSION,
    GROUP,
    KIND,
    PIPELINE_FIELDS,
    PLURAL,
    VERSION,
    PipelineSpec,
    StageOptions,
    secret_fields,
)

CEL_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
                "import", "let", "loop", "package", "namespace", "return", "var", "void", "while"}
STAGE_STATES = ["Pending", "Running", "Stopping", "Retrying", "Succeeded", "Failed"]
PHASES = ["Pending", "Running", "Succeeded", "Failed"]


def cel_field(name: str) -> str:
    """A property name as CEL sees it in Kubernetes validation rules (escaping of '-', '.', '/', '__', keywords)."""
    if name in CEL_RESERVED:
        return f"__{name}__"
    return (name.replace("__", "__underscores__").replace(".", "__dot__").replace("-", "__dash__")
            .replace("/", "__slash__"))


def job_schema(job: str) -> dict[str, Any]:
    cls = JOB_CONFIGS[job]
    schema = structural(json_schema(cls))
    for key in PIPELINE_FIELDS:
        schema.get("properties", {}).pop(key, None)
    if "required" in schema:
        schema["required"] = [k for k in schema["required"] if k not in PIPELINE_FIELDS] or None
        if schema["required"] is None:
            del schema["required"]
    schema["description"] = (f"Run the job '{job}': {summary(cls)} Its config keys (see 'scopeforge run {job} "
                             f"--help'); a string may name an earlier stage as ${{name}} (its URI).")
    schema.setdefault("type", "object")
    return schema


def stage_schema() -> dict[str, Any]:
    spec = structural(json_schema(StageSpec))
    options = structural(json_schema(StageOptions))
    jobs = sorted(JOB_CONFIGS)
    properties = {"name": spec["properties"]["name"], "retries": spec["properties"]["retries"],
                  **options["properties"]}
    for job in jobs:
        properties[job] = job_schema(job)
    rule = " + ".join(f"(has(self.{cel_field(job)}) ? 1 : 0)" for job in jobs) + " == 1"
    return {
        "type": "object",
        "description": "One stage: its name, retries, resources and exactly one job key (the job's config).",
        "required": ["name"],
        "properties": properties,
        "x-kubernetes-validations": [{"rule": rule,
                                      "message": f"a stage has exactly one job key, one of: {', '.join(jobs)}"}],
    }


def spec_schema() -> dict[str, Any]:
    schema = structural(json_schema(PipelineSpec))
    storage = schema["properties"]["storage"]
    for name in secret_fields(StorageConfig):
        storage["properties"].pop(name, None)
    storage["description"] = ("Non-secret object-storage settings; credentials come from the Secret named by "
                              "storageSecret, never from the Pipeline.")
    schema["properties"]["stages"]["items"] = stage_schema()
    schema["x-kubernetes-validations"] = [{"rule": "self == oldSelf",
                                           "message": "spec is immutable: delete the Pipeline and create it again"}]
    return schema


def status_schema() -> dict[str, Any]:
    string = {"type": "string"}
    stage = {"type": "object", "properties": {
        "name": string, "job": string,
        "state": {"type": "string", "enum": STAGE_STATES},
        "attempts": {"type": "integer", "description": "RayJobs started for this stage so far."},
        "rayJob": {"type": "string", "description": "The RayJob of the newest attempt."},
        "jobStatus": {"type": "string", "description": "That RayJob's jobStatus."},
        "stopping": {"type": "string", "description": "A failed attempt's RayJob being deleted (its Ray job may still "
                                                      "run) before the stage is retried."},
        "outputURI": {"type": "string", "description": "Where the stage wrote its outputs (once it succeeded)."},
        "message": {"type": "string", "description": "Why the newest attempt failed, or what its cluster's pods say "
                                                     "while it waits for them."},
        "jobDeploymentStatus": {"type": "string", "description": "That RayJob's jobDeploymentStatus."},
        "reason": {"type": "string", "description": "That RayJob's reason (why KubeRay failed it)."},
        "rayCluster": {"type": "string", "description": "The RayCluster that RayJob runs on."},
        "dashboardURL": {"type": "string", "description": "That cluster's Ray dashboard (in-cluster address)."},
        "startTime": {"type": "string", "format": "date-time", "description": "When KubeRay started that RayJob."},
        "endTime": {"type": "string", "format": "date-time", "description": "When it ended."},
    }}
    condition = {"type": "object", "required": ["type", "status"], "properties": {
        "type": string, "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": string, "message": string, "lastTransitionTime": {"type": "string", "format": "date-time"}}}
    return {"type": "object", "description": "Written by the scopeforge operator.", "properties": {
        "phase": {"type": "string", "enum": PHASES},
        "currentStage": {"type": "string", "description": "The stage running now (or the one that failed)."},
        "progress": {"type": "string", "description": "Succeeded stages / all stages."},
        "message": string,
        "observedGeneration": {"type": "integer", "format": "int64"},
        "stages": {"type": "array", "items": stage},
        "outputs": {"type": "object", "additionalProperties": string,
                    "description": "Output URI of every succeeded stage, by stage name."},
        "conditions": {"type": "array", "items": condition,
                       "description": "Valid (the spec can run) and Succeeded (True, False with the reason, or "
                                      "Unknown while running)."},
    }}


def pipeline_crd() -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": ("A scopeforge pipeline: stages run in order on KubeRay, one RayJob each, handing each other "
                        "URIs under spec.outputRoot."),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "scopeforge"}},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": KIND.lower(),
                      "shortNames": ["sfp"], "categories": ["scopeforge"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
                    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def crd_schema(crd: dict[str, Any], version: str = VERSION) -> dict[str, Any]:
    return copy.deepcopy(next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"])


HEADER = ("# Generated by `python -m shared.manifests.crd` (make manifests) from the job config models: do not edit.\n"
          f"# {API_VERSION} {KIND}: one stage key per job in shared.configs.JOB_CONFIGS.\n")


def render_crd() -> str:
    return HEADER + yaml.safe_dump(pipeline_crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render_crd())
