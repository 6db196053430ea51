"""Strict validation of Kubernetes objects: the real KubeRay CRD schemas (../shared/kuberay-crds/), the project's own
Pipeline CRD, and kubernetes-validate for core objects.

A CRD schema accepts unknown fields (the API server prunes them silently), so the validator here makes it strict:
an object schema with properties and no ``additionalProperties`` refuses other keys unless it says
``x-kubernetes-preserve-unknown-fields: true``. ``nullable`` becomes a null type, int-or-string an anyOf.
"""

from __future__ import annotations

import copy
import functools
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY_CRDS = ROOT.parent / "shared" / "kuberay-crds"
KUBERAY_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON-schema validator's view of a Kubernetes structural schema, with unknown fields refused."""
    node = copy.copy(schema)
    for key in ("x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
                "x-kubernetes-map-type", "format"):
        node.pop(key, None)
    preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
    if node.pop("x-kubernetes-int-or-string", False):
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.pop("x-kubernetes-embedded-resource", False):
        node.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            node["properties"].setdefault(key, {"type": "string"})
        node["properties"].setdefault("metadata", {"type": "object"})
    if "properties" in node:
        node["properties"] = {k: strict(v) for k, v in node["properties"].items()}
        if not preserve and "additionalProperties" not in node:
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = strict(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = strict(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [strict(v) for v in node[key]]
    if node.pop("nullable", False):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        elif "anyOf" in node:
            node["anyOf"] = [*node["anyOf"], {"type": "null"}]
    return node


def crd_validator(crd: dict[str, Any], version: str) -> jsonschema.protocols.Validator:
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(strict(schema))


@functools.cache
def kuberay_validator(kind: str) -> jsonschema.protocols.Validator:
    path = KUBERAY_CRDS / KUBERAY_FILES[kind]
    assert path.is_file(), (f"{path} is missing: the KubeRay CRDs must be at ../shared/kuberay-crds/ beside the "
                            "checkout (see ../shared/kuberay-crds/README.md)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return crd_validator(yaml.load(path.read_text(encoding="utf-8"), Loader=loader), "v1")


def schema_errors(validator: jsonschema.protocols.Validator, obj: dict[str, Any]) -> list[str]:
    out = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "/"
        out.append(f"{where}: {error.message[:200]}")
    return out


def kuberay_errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors (strict) plus KubeRay's operator-side rules, for a RayCluster or RayJob."""
    from shared.manifests.render import kuberay_rule_problems

    name = f"{obj.get('kind')} {(obj.get('metadata') or {}).get('name')}"
    return [f"{name}: {e}" for e in schema_errors(kuberay_validator(obj["kind"]), obj)] + kuberay_rule_problems(obj)


def core_errors(obj: dict[str, Any], k8s_version: str = "1.32.0") -> list[str]:
    """kubernetes-validate (strict) for built-in kinds."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{obj['kind']} {obj['metadata'].get('name')}: {'/'.join(map(str, exc.path))}: {exc.message[:200]}"]
    return []


def kustomize(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path} failed: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
