"""Typed job configs: pydantic v2 models, loaded from YAML with ``--set a.b=value`` overrides.

Every job has one config class derived from :class:`JobConfig`. Fields carry their documentation as a docstring
under the field (``use_attribute_docstrings``), which feeds ``scopeforge run JOB --help``, the JSON schema and the
Pipeline CRD. Unknown keys are refused (``extra="forbid"``); problems surface as one-line :class:`ConfigError`
messages naming the file (or the ``--set`` override) and the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from shared.errors import ConfigError


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, docstrings under fields become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class StorageConfig(StrictModel):
    """Where artifacts live. Credentials are best left to the environment (AWS_* variables, a Kubernetes Secret)."""

    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. http://minio.scopeforge:9000. Unset: AWS_ENDPOINT_URL, else AWS itself."""
    region: str | None = None
    """S3 region. Unset: AWS_REGION / AWS_DEFAULT_REGION (us-east-1 when neither is set)."""
    access_key_id: SecretStr | None = None
    """Access key id. Unset: AWS_ACCESS_KEY_ID. Never written to disk or logs."""
    secret_access_key: SecretStr | None = None
    """Secret access key. Unset: AWS_SECRET_ACCESS_KEY. Never written to disk or logs."""
    anon: bool = False
    """Anonymous access (public buckets only)."""


class ActorPoolConfig(StrictModel):
    """Resources of a Ray Data actor pool. None of them changes a job's results: like every ``runtime`` section,
    they are not in the stage's config hash."""

    num_actors: int = Field(1, ge=1)
    """Actors in the pool; each loads its model once. With ``max_actors``, the fewest the pool keeps."""
    max_actors: int | None = Field(None, ge=1)
    """Let the pool grow to this many actors while work is queued (the Ray autoscaler adds nodes for them on an
    autoscaling cluster, and removes the nodes after their idle timeout). Unset: a fixed pool of num_actors."""
    cpus_per_actor: float = Field(0.5, gt=0)
    """Logical CPUs reserved per actor (fractional, so read and preprocessing tasks always find a slot)."""
    gpus_per_actor: float = Field(0, ge=0)
    """GPUs per actor (0 on CPU machines; fractions share a GPU). An actor that reserved a GPU computes on it, and
    fails if it sees none."""
    threads: int | None = Field(None, ge=1)
    """torch threads per actor. Unset: the CPUs reserved per actor (at least 1, at most the usable cores)."""

    @model_validator(mode="after")
    def _pool_bounds(self) -> ActorPoolConfig:
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(f"max_actors ({self.max_actors}) is below num_actors ({self.num_actors})")
        return self

    @property
    def most_actors(self) -> int:
        """The largest the pool can grow."""
        return self.max_actors or self.num_actors


class WorkersConfig(StrictModel):
    """Resources of a Ray Train worker group. Not in the stage's config hash."""

    num_workers: int = Field(1, ge=1, le=1024)
    """Ray Train workers (DDP ranks)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Logical CPUs reserved per worker; it runs that many torch threads (at least 1)."""
    use_gpu: bool = False
    """One GPU per worker (a worker that sees none fails with one line, before the process group forms)."""
    max_failures: int = Field(0, ge=0, le=100)
    """Worker-group failures Ray Train recovers from, restarting from the latest checkpoint."""


class TasksConfig(StrictModel):
    """Resources of the Ray Data tasks of a job (no actors). Not in the stage's config hash."""

    cpus_per_task: float = Field(0.5, gt=0)
    """Logical CPUs per task (fractional on small machines, so several run at once)."""


class TaskConfig(StrictModel):
    """Resources of one Ray task. Not in the stage's config hash."""

    num_cpus: float = Field(1.0, gt=0)
    """Logical CPUs reserved for the task; it runs that many torch threads (at least 1) unless threads says
    otherwise."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs reserved for the task (> 0 computes on CUDA; the task fails if it sees none)."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads. Unset: the CPUs reserved (at least 1)."""


class JobConfig(StrictModel):
    """Fields shared by every job: where the stage writes and how storage is reached."""

    JOB: ClassVar[str] = ""
    """Registered job name; set by each subclass."""
    HASH_EXCLUDE: ClassVar[frozenset[str]] = frozenset({"output_root", "stage", "storage"})
    """Fields that do not change a stage's results, hence not part of its config hash (as every ``runtime``
    section, at any depth, is not)."""

    output_root: str = "runs/default"
    """Root URI of the run: a local path, file://, s3://bucket/prefix (or memory:// in tests). The stage writes
    <output_root>/<stage>/."""
    stage: str | None = None
    """Name of the stage folder under output_root. Unset: the job name."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Object-storage settings for every URI of this config."""

    @property
    def stage_name(self) -> str:
        return self.stage or self.JOB

    def input_uris(self) -> list[str]:
        """Every data or model URI this job reads. Those that are stage folders are checked to be complete, and
        their config hashes feed this stage's hash, so a rerun upstream reruns this stage too."""
        return []

    def gpus_per_worker(self) -> float:
        """The most GPUs any one of this job's workers requests (checked against the cluster before work starts)."""
        return 0.0


C = TypeVar("C", bound=StrictModel)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). Values are parsed as YAML, so numbers, booleans and lists keep their type."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set sae.k=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML on its own (e.g. "a: b"): keep the literal string
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{'.'.join(path[: i + 1])}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or from an environment variable with ``env:NAME`` (how a RayJob hands a job its
    config: see shared/manifests/render.py)."""
    if isinstance(path, str) and path.startswith("env:"):
        if path[4:] not in os.environ:
            raise ConfigError(f"{path}: environment variable {path[4:]} is not set")
        return _parse_yaml(os.environ[path[4:]], path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return _parse_yaml(p.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def _parse_yaml(text: str, path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read a YAML file (optional), apply ``--set`` overrides, validate into ``cls``."""
    overrides = list(overrides or [])
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    source = str(path) if path is not None else "config"
    return validate_config(cls, data, source, overrides)


def validate_config(cls: type[C], data: dict[str, Any], source: str, overrides: list[str] | None = None) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(cls, exc, source, overrides or [])) from None


def _describe_validation_error(cls: type[BaseModel], exc: ValidationError, source: str, overrides: list[str]) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc)
    override_keys = {o.partition("=")[0].strip() for o in overrides}
    origin = source
    for ok in override_keys:
        if key == ok or key.startswith(ok + "."):
            origin = f"--set {ok}"
    kind = first["type"]
    if kind == "extra_forbidden":
        message = f"unknown key '{key}'"
        hint = _close_key(cls, loc)
        if hint:
            message += f" (did you mean '{hint}'?)"
    elif kind == "missing":
        message = f"missing required key '{key}'"
    else:
        shown = repr(first.get("input"))
        if len(shown) > 60:
            shown = shown[:57] + "..."
        message = f"key '{key}': {first['msg']} (got {shown})" if key else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return f"{origin}: {message}"


def _close_key(cls: type[BaseModel], loc: list[str]) -> str | None:
    model: Any = cls
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _model_in(field.annotation)
        if model is None:
            return None
    names = list(getattr(model, "model_fields", {}))
    match = difflib.get_close_matches(loc[-1], names, n=1)
    return ".".join(loc[:-1] + match[:1]) if match else None


# ---------------------------------------------------------------------------------------------------------------------
# Hashing, dumping, schema


def config_hash(cfg: JobConfig, upstream: list[str] | None = None) -> str:
    """Stable hash of what determines a stage's results (plus the hashes of the stages it read)."""
    payload = {
        "job": cfg.JOB,
        "config": _without_runtime(cfg.model_dump(mode="json", exclude=set(cfg.HASH_EXCLUDE))),
        "upstream": sorted(upstream or []),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _without_runtime(value: Any) -> Any:
    """The config tree without its ``runtime`` sections (resources: where and how fast, never what)."""
    if isinstance(value, dict):
        return {k: _without_runtime(v) for k, v in value.items() if k != "runtime"}
    if isinstance(value, list):
        return [_without_runtime(v) for v in value]
    return value


def dump_config(cfg: StrictModel) -> str:
    """YAML of a config without secrets (credentials are never written anywhere)."""
    data = cfg.model_dump(mode="json")
    _drop_secrets(cfg, data)
    return yaml.safe_dump(data, sort_keys=False)


def _drop_secrets(model: BaseModel, data: dict[str, Any]) -> None:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, SecretStr) or field.annotation in (SecretStr, SecretStr | None):
            data.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(data.get(name), dict):
            _drop_secrets(value, data[name])


def json_schema(cls: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every ``$ref`` inlined (Kubernetes structural schemas allow no refs)."""
    schema = cls.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target = inline(defs[node["$ref"].rsplit("/", 1)[-1]])
                extra = {k: inline(v) for k, v in node.items() if k != "$ref"}
                return {**target, **extra}
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


# ---------------------------------------------------------------------------------------------------------------------
# Human-readable field docs for --help


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model inside an annotation (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple, set):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation))


def describe_fields(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """One entry per leaf field: ``key (type, default X)`` followed by its description; a job's own fields first."""
    lines: list[str] = []
    common = set(JobConfig.model_fields) if issubclass(cls, JobConfig) else set()
    ordered = sorted(cls.model_fields.items(), key=lambda item: item[0] in common)
    for name, field in ordered:
        key = prefix + name
        sub = _model_in(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) is None:
            lines.append(f"{key}: {(field.description or '').strip()}")
            lines.extend(describe_fields(sub, key + "."))
            continue
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            value = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            default = "optional" if value is None else f"default {json.dumps(value)}"
        description = " ".join((field.description or "").split())
        lines.append(f"{key} ({type_name(field.annotation)}, {default})")
        if description:
            lines.append(f"    {description}")
    return lines
