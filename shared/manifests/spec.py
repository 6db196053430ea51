"""The Pipeline custom resource: its spec models, and its mapping onto the shared ``PipelineConfig``.

A stage carries exactly one *job key*, named after the job, whose value is that job's config::

    stages:
      - name: curate                   # folder under outputRoot, and ${curate} for later stages
        retries: 1
        resources: {cpu: "8", memory: 32Gi, gpu: 1, maxWorkers: 4}
        curate: {seeds: s3://bucket/seeds.jsonl, ...}      # a CurateConfig
      - name: prune
        prune: {dataset: ${curate}, ...}                   # a PruneConfig

Why one key per job instead of ``{job: curate, config: {...}}``: a Kubernetes structural schema cannot make the shape
of ``config`` depend on the value of ``job``, but it can give each job key its own schema (generated from the job's
config model), so the API server checks every stage config, and a CEL rule requires exactly one job key per stage.
The operator maps ``{name, <job>: config, retries}`` onto ``StageSpec(name, job, config, retries)`` and validates the
whole pipeline with ``shared.pipeline.stage_configs``, the same code as the local ``scopeforge pipeline``, so both hand
``${name}`` URIs along identically.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from shared.config import JobConfig, StorageConfig, StrictModel, validate_config
from shared.configs import JOB_CONFIGS
from shared.configs.pipeline import PipelineConfig, StageSpec
from shared.errors import ConfigError
from shared.manifests.resources import DNS_SUBDOMAIN, QUEUE_LABEL, StageResources
from shared.pipeline import stage_configs, stage_uri
from shared.storage import split_uri

GROUP = "scopeforge.io"
VERSION = "v1alpha1"
PLURAL = "pipelines"
KIND = "Pipeline"
API_VERSION = f"{GROUP}/{VERSION}"

# Fields of a job config that the pipeline sets, never a stage.
PIPELINE_FIELDS = ("output_root", "stage", "storage")


class StageOptions(StrictModel):
    """Kubernetes-side settings of one stage (beside its name, retries and job key)."""

    resources: StageResources = Field(default_factory=StageResources)
    """The stage's own RayCluster (worker and head shape, volumes) and its scheduling (labels, Kueue queue, priority,
    placement, service account, pull secrets). With spec.cluster.clusterSelector or rayClusterSpec only the labels,
    annotations and the submitter pod's scheduling apply."""
    activeDeadlineSeconds: int = Field(86400, ge=1)
    """Deadline of one attempt, in seconds, after which KubeRay fails the RayJob."""


class ClusterSpec(StrictModel):
    """Where stages run. Neither field: each stage gets its own autoscaled RayCluster shaped by its resources."""

    clusterSelector: dict[str, str] | None = None
    """Run every stage on an existing RayCluster, e.g. {"ray.io/cluster": "scopeforge"} (the base manifests' one)."""
    rayClusterSpec: dict[str, Any] | None = None
    """A KubeRay RayClusterSpec created for each stage and deleted after it, used as given."""

    @model_validator(mode="after")
    def _one(self) -> ClusterSpec:
        if self.clusterSelector is not None and self.rayClusterSpec is not None:
            raise ValueError("set clusterSelector or rayClusterSpec, not both")
        if self.clusterSelector is not None and not self.clusterSelector.get("ray.io/cluster"):
            raise ValueError("clusterSelector needs the key 'ray.io/cluster' (the RayCluster's name)")
        return self


class PipelineSpec(StrictModel):
    """spec of a Pipeline: stages run in order, one RayJob each, handing each other URIs under outputRoot."""

    outputRoot: str = Field(min_length=1)
    """Root URI of the run (s3://bucket/prefix, or file:///path on a volume every pod mounts): stage NAME writes
    <outputRoot>/NAME/."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Non-secret object-storage settings (endpoint_url, region, anon); credentials come from storageSecret."""
    storageSecret: str | None = Field("scopeforge-storage", pattern=DNS_SUBDOMAIN)
    """Secret in the Pipeline's namespace whose keys become environment variables of every Ray pod
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally AWS_ENDPOINT_URL, AWS_REGION). Null: none."""
    image: str | None = None
    """Container image of the stage clusters. Unset: the operator's SCOPEFORGE_IMAGE (the image it runs from)."""
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    """Where the stages run."""
    ttlSecondsAfterFinished: int = Field(600, ge=0)
    """Seconds a stage's own RayCluster is kept after its job ends (for logs), then deleted."""
    stages: list[dict[str, Any]] = Field(min_length=1)
    """The stages, in order: name, retries, resources, activeDeadlineSeconds and exactly one job key."""

    @field_validator("storage")
    @classmethod
    def _no_credentials(cls, storage: StorageConfig) -> StorageConfig:
        for name in secret_fields(StorageConfig):
            if getattr(storage, name) is not None:
                raise ValueError(f"storage.{name}: credentials never go into a Pipeline; put them in the Secret "
                                 "named by spec.storageSecret")
        return storage

    @field_validator("outputRoot")
    @classmethod
    def _shared_root(cls, root: str) -> str:
        scheme = root.split("://", 1)[0] if "://" in root else ""
        if scheme not in ("s3", "s3a", "file") or (scheme == "file" and not root.startswith("file:///")):
            raise ValueError(f"outputRoot {root!r}: every stage's pods must reach it; use s3://bucket/prefix "
                             "(or file:///path on a volume every pod mounts)")
        split_uri(root)
        return root


STAGE_KEYS = ("name", "retries", *StageOptions.model_fields)


def secret_fields(model: type[StrictModel]) -> list[str]:
    return [name for name, field in model.model_fields.items() if SecretStr in _args(field.annotation)]


def _args(annotation: Any) -> tuple[Any, ...]:
    import typing

    return typing.get_args(annotation) or (annotation,)


@dataclass(frozen=True)
class Stage:
    """One stage, fully resolved: what the operator needs to render its RayJob."""

    spec: StageSpec
    options: StageOptions
    config: JobConfig
    uri: str

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Pipeline:
    spec: PipelineSpec
    config: PipelineConfig
    stages: list[Stage]


def parse_pipeline(spec: dict[str, Any], source: str = "Pipeline") -> Pipeline:
    """Validate a Pipeline's spec into resolved stages; a ConfigError (one line naming the key) when it is wrong."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: spec must be a mapping")
    resource = validate_config(PipelineSpec, spec, f"{source} spec")
    stage_specs: list[dict[str, Any]] = []
    options: list[StageOptions] = []
    for index, raw in enumerate(resource.stages):
        name = raw.get("name") if isinstance(raw.get("name"), str) else f"#{index}"
        where = f"{source}: stage '{name}'"
        jobs = [key for key in raw if key in JOB_CONFIGS]
        for key in raw:
            if key not in JOB_CONFIGS and key not in STAGE_KEYS:
                hint = difflib.get_close_matches(key, [*JOB_CONFIGS, *STAGE_KEYS], n=1)
                raise ConfigError(f"{where}: unknown job or key '{key}'"
                                  + (f" (did you mean '{hint[0]}'?)" if hint else "")
                                  + f" (jobs: {', '.join(sorted(JOB_CONFIGS))})")
        if len(jobs) != 1:
            raise ConfigError(f"{where}: needs exactly one job key, got {len(jobs)} "
                              f"({', '.join(jobs) or 'none'}; jobs: {', '.join(sorted(JOB_CONFIGS))})")
        config = raw[jobs[0]] if raw[jobs[0]] is not None else {}
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: '{jobs[0]}' must be a mapping of that job's config keys")
        stage_specs.append({"name": raw.get("name"), "job": jobs[0], "config": config,
                            **({"retries": raw["retries"]} if "retries" in raw else {})})
        options.append(validate_config(StageOptions, {k: raw[k] for k in StageOptions.model_fields if k in raw},
                                       where))
        if options[-1].resources.queue and resource.cluster.clusterSelector:
            raise ConfigError(f"{where}: resources.labels {QUEUE_LABEL} (Kueue) needs the stage's own cluster; Kueue "
                              "does not admit RayJobs on an existing one (spec.cluster.clusterSelector)")
    storage = resource.storage.model_dump(mode="python", exclude_none=True)
    pipeline = validate_config(PipelineConfig, {"output_root": resource.outputRoot, "storage": storage,
                                                "stages": stage_specs}, f"{source} spec")
    try:
        resolved = stage_configs(pipeline, source)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None
    stages = [Stage(spec=spec, options=opts, config=cfg, uri=stage_uri(pipeline, spec.name))
              for (spec, cfg), opts in zip(resolved, options)]
    return Pipeline(spec=resource, config=pipeline, stages=stages)


def pipeline_resource(pipeline: PipelineConfig, name: str, namespace: str | None = None,
                      storage_secret: str | None = "scopeforge-storage", image: str | None = None) -> dict[str, Any]:
    """A local pipeline config (``scopeforge pipeline`` YAML) as a Pipeline custom resource."""
    storage = pipeline.storage.model_dump(mode="json", exclude_none=True, exclude=set(secret_fields(StorageConfig)))
    storage = {k: v for k, v in storage.items() if v != StorageConfig.model_fields[k].default}
    stages = []
    for spec in pipeline.stages:
        entry: dict[str, Any] = {"name": spec.name}
        if spec.retries:
            entry["retries"] = spec.retries
        entry[spec.job] = dict(spec.config)
        stages.append(entry)
    body: dict[str, Any] = {"outputRoot": pipeline.output_root}
    if storage:
        body["storage"] = storage
    if storage_secret != "scopeforge-storage":
        body["storageSecret"] = storage_secret
    if image:
        body["image"] = image
    body["stages"] = stages
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": body}
