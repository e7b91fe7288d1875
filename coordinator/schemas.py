"""The JSON Schemas shipped in `schemas/` (installed as `coordinator.schemafiles`).

One copy: the repository's top-level `schemas/` folder is the package data the
installed program loads.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

NAMES = ("work-order", "config", "result", "llm-reply")


@cache
def load(name: str) -> dict[str, Any]:
    """The schema `name` (e.g. ``"work-order"``) as a dict."""
    text = resources.files("coordinator.schemafiles").joinpath(f"{name}.schema.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@cache
def validator(name: str) -> Draft202012Validator:
    schema = load(name)
    Draft202012Validator.check_schema(schema)
    # The same rules with each `#/$defs/...` reference written out in place: jsonschema resolves
    # a reference on every use, which was 40% of validating an order (every order is validated).
    return Draft202012Validator(_inline(schema, schema.get("$defs", {})))


def _inline(node: Any, defs: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """`node` with its local `$defs` references replaced by what they name (a cycle stays a reference)."""
    if isinstance(node, list):
        return [_inline(item, defs, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    name = ref[len("#/$defs/"):] if isinstance(ref, str) and ref.startswith("#/$defs/") else None
    if name is None or name not in defs or name in seen:
        return {k: v if k == "$defs" else _inline(v, defs, seen) for k, v in node.items()}
    target = _inline(defs[name], defs, (*seen, name))
    rest = {k: _inline(v, defs, seen) for k, v in node.items() if k != "$ref"}
    if isinstance(target, dict) and not set(target) & set(rest):
        return {**target, **rest}
    return {"allOf": [target], **rest}


def field_of(error: ValidationError) -> str:
    """A dotted field name for an error: ``acceptance.2.check``."""
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        if extra:
            parts.append(str(extra[0]))
    if error.validator == "required" and isinstance(error.validator_value, list):
        missing = [k for k in error.validator_value if k not in (error.instance or {})]
        if missing:
            parts.append(str(missing[0]))
    return ".".join(parts) or "(top level)"


def describe(error: ValidationError) -> str:
    """A short message saying what is wrong, in words a user can act on."""
    v = error.validator
    if v == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        return f"unknown key {extra[0]!r}; allowed keys: {', '.join(allowed)}"
    if v == "required":
        missing = [k for k in error.validator_value if k not in (error.instance or {})]
        return f"missing required key {missing[0]!r}" if missing else error.message
    if v == "type":
        return f"must be {_article(error.validator_value)}, not {type(error.instance).__name__}"
    if v == "enum":
        return f"must be one of {', '.join(map(str, error.validator_value))}, not {error.instance!r}"
    if v == "pattern":
        return f"{error.instance!r} does not match the pattern {error.validator_value}"
    return str(error.message)


def _article(kind: object) -> str:
    if isinstance(kind, list):
        return " or ".join(_article(k) for k in kind)
    return {"object": "a mapping", "array": "a list", "string": "a string", "integer": "a whole number",
            "number": "a number", "boolean": "true or false", "null": "null"}.get(str(kind), str(kind))


def errors(name: str, instance: object) -> list[ValidationError]:
    """All schema errors of `instance`, shallowest first, deterministic order."""
    found = list(validator(name).iter_errors(instance))
    return sorted(found, key=lambda e: (len(e.absolute_path), [str(p) for p in e.absolute_path], e.message))
