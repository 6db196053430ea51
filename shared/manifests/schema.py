"""Pydantic JSON schemas -> Kubernetes *structural* OpenAPI v3 schemas (what a CRD's openAPIV3Schema must be).

A structural schema has a ``type`` at every node (except where unknown fields are preserved or a field is
int-or-string), no ``$ref``, no ``additionalProperties: false``, no ``anyOf`` carrying types, no ``const``, and
OpenAPI v3.0 (boolean) ``exclusiveMinimum``. The conversion keeps every constraint that can be expressed (types,
enums, bounds, patterns, lengths, required keys) and turns defaults into text in the description (defaults live in
the config models, so an API server never bakes today's defaults into stored objects).

Unknown keys: the API server prunes them (and ``kubectl`` refuses them with its default strict field validation), and
the operator validates every stage config with the job's pydantic model anyway.
"""

from __future__ import annotations

import json
from typing import Any

# Formats Kubernetes knows; others are dropped (an unknown format is at best ignored, at worst a warning).
K8S_FORMATS = {"int32", "int64", "float", "double", "byte", "date", "date-time", "password", "duration", "uuid"}
# Value constraints copied as they are.
KEEP = ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
        "multipleOf", "pattern", "enum")
SCALARS = {"string", "integer", "number", "boolean"}


def structural(node: dict[str, Any]) -> dict[str, Any]:
    """Convert one (``$ref``-free, see ``shared.config.json_schema``) JSON schema node."""
    out = _convert(node)
    return out


def _describe(node: dict[str, Any]) -> str | None:
    text = " ".join(str(node.get("description", "")).split())
    if "default" in node and node["default"] is not None:
        text = f"{text} Default: {json.dumps(node['default'])}.".strip()
    return text or None


def _convert(node: dict[str, Any]) -> dict[str, Any]:
    if node.get("allOf"):  # e.g. {"allOf": [{...model...}], "description": ...}: one schema, merged
        merged: dict[str, Any] = {}
        for part in node["allOf"]:
            merged.update(part)
        node = {**merged, **{k: v for k, v in node.items() if k != "allOf"}}
    description = _describe(node)
    variants = node.get("anyOf") or node.get("oneOf")
    if variants is not None:
        out = _union(variants)
    elif "const" in node:
        value = node["const"]
        out = {"type": _json_type(value), "enum": [value]}
    elif "type" not in node:
        out = {"x-kubernetes-preserve-unknown-fields": True}  # Any
    elif isinstance(node["type"], list):
        out = _union([{"type": t} for t in node["type"]])
    else:
        out = _typed(node)
    if description:
        out = {"description": description, **out}
    return out


def _typed(node: dict[str, Any]) -> dict[str, Any]:
    kind = node["type"]
    if kind == "null":
        return {"x-kubernetes-preserve-unknown-fields": True, "nullable": True}
    out: dict[str, Any] = {"type": kind}
    for key in KEEP:
        if key in node:
            out[key] = node[key]
    if node.get("format") in K8S_FORMATS:
        out["format"] = node["format"]
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            out[flag] = node[bound]
            out[bound] = True
    if kind == "object":
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        if properties:
            out["properties"] = {name: _convert(sub) for name, sub in properties.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = _convert(extra)
        else:  # dict[str, Any], a bare dict, or an object with no declared keys
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        items = node.get("items")
        prefix = node.get("prefixItems")
        if prefix:
            shapes = [_convert(p) for p in prefix]
            same = all(json.dumps(s, sort_keys=True) == json.dumps(shapes[0], sort_keys=True) for s in shapes)
            out["items"] = shapes[0] if same else {"x-kubernetes-preserve-unknown-fields": True}
        elif isinstance(items, dict) and items:
            out["items"] = _convert(items)
        else:
            out["items"] = {"x-kubernetes-preserve-unknown-fields": True}
    return out


def _union(variants: list[dict[str, Any]]) -> dict[str, Any]:
    present = [v for v in variants if v.get("type") != "null"]
    nullable = len(present) < len(variants)
    if len(present) == 1:
        out = dict(_convert(present[0]))
        out.pop("description", None)
    else:
        kinds = {v.get("type") for v in present}
        if kinds == {"integer", "string"} and all(set(v) <= {"type", "description"} for v in present):
            out = {"x-kubernetes-int-or-string": True}
        elif kinds == {"object"}:
            out = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        elif kinds == {"array"}:
            out = {"type": "array", "items": {"x-kubernetes-preserve-unknown-fields": True}}
        else:
            # e.g. str | list[str]: no single structural type; the operator's pydantic validation decides.
            out = {"x-kubernetes-preserve-unknown-fields": True}
    if nullable:
        out["nullable"] = True
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# ---------------------------------------------------------------------------------------------------------------------
# The rules of structural schemas, checked (the tests run this on the generated CRD)


def structural_problems(node: Any, path: str = "") -> list[str]:
    """Where ``node`` breaks the rules of a Kubernetes structural schema ([] when it is structural)."""
    problems: list[str] = []
    if not isinstance(node, dict):
        return [f"{path or '/'}: not a schema object"]
    allowed = {"type", "description", "properties", "required", "items", "additionalProperties", "enum", "format",
               "nullable", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
               "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-map-type",
               "x-kubernetes-list-map-keys", "x-kubernetes-embedded-resource", "exclusiveMinimum",
               "exclusiveMaximum", *KEEP}
    for key in node:
        if key not in allowed:
            problems.append(f"{path or '/'}: '{key}' is not allowed in a structural schema")
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    if "type" not in node and not (preserve or int_or_string):
        problems.append(f"{path or '/'}: no type")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path or '/'}: array without items")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path or '/'}: properties and additionalProperties together")
    if node.get("additionalProperties") is False:
        problems.append(f"{path or '/'}: additionalProperties: false")
    for flag in ("exclusiveMinimum", "exclusiveMaximum"):
        if flag in node and not isinstance(node[flag], bool):
            problems.append(f"{path or '/'}: {flag} must be a boolean (OpenAPI v3.0)")
    for name, sub in (node.get("properties") or {}).items():
        problems += structural_problems(sub, f"{path}/properties/{name}")
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}/items")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}/additionalProperties")
    return problems
