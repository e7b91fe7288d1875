"""The JSON Schemas shipped in `schemas/` (installed as `coordinator.schemafiles`).

One copy: the repository's top-level `schemas/` folder is the package data the
installed program loads.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

NAMES = ("work-order", "config", "result", "llm-reply")


@cache
def load(name: str) -> dict[str, Any]:
    """The schema `name` (e.g. ``"work-order"``) as a dict."""
    text = resources.files("coordinator.schemafiles").joinpath(f"{name}.schema.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


@cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(_expanded(name))


@cache
def _expanded(name: str) -> dict[str, Any]:
    """The schema, checked, with each `#/$defs/...` reference written out in place: jsonschema
    resolves a reference on every use, which was 40% of validating an order."""
    schema = load(name)
    Draft202012Validator.check_schema(schema)
    expanded: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    return expanded


def _inline(node: Any, defs: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """`node` with its local `$defs` references replaced by what they name (a cycle stays a reference)."""
    if isinstance(node, list):
        return [_inline(item, defs, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    name = ref[len("#/$defs/"):] if isinstance(ref, str) and ref.startswith("#/$defs/") else None
    rest: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA or (key == "$ref" and name is not None):
            rest[key] = value
        elif key in _NAMED and isinstance(value, dict):
            rest[key] = {k: _inline(v, defs, seen) for k, v in value.items()}
        else:
            rest[key] = _inline(value, defs, seen)
    if name is None or name not in defs or name in seen:
        return rest
    del rest["$ref"]
    target = _inline(defs[name], defs, (*seen, name))
    if isinstance(target, dict) and not set(target) & set(rest):
        return {**target, **rest}
    return {**rest, "allOf": [target, *rest.get("allOf", [])]}


# Keywords whose values are data, not schemas (a {"$ref": ...} in one is a literal), and
# keywords whose values map names to schemas (a property may be called "enum").
_DATA = frozenset({"$defs", "const", "enum", "default", "examples"})
_NAMED = frozenset({"properties", "patternProperties", "dependentSchemas"})


def field_of(error: ValidationError) -> str:
    """A dotted field name for an error: ``acceptance.2.check``."""
    error = _telling(error)
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(_key(k) for k in error.instance if k not in allowed)
        if extra:
            parts.append(extra[0])
    if error.validator == "required" and isinstance(error.validator_value, list):
        missing = [k for k in error.validator_value if k not in (error.instance or {})]
        if missing:
            parts.append(str(missing[0]))
    return ".".join(parts) or "(top level)"


def describe(error: ValidationError) -> str:
    """A short message saying what is wrong, in words a user can act on."""
    error = _telling(error)
    v = error.validator
    if "propertyNames" in error.absolute_schema_path:  # a key of a mapping, not a value
        return f"{_key(error.instance)!r} is not {_title(error.schema) or 'a name this mapping takes'}"
    if v in _ALTERNATIVES:
        return _alternatives(error)
    if v == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted((_key(k) for k in error.instance if k not in allowed), key=str)
        close = difflib.get_close_matches(str(extra[0]).lower(), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""  # `timout:` would pass unseen
        return f"unknown key {extra[0]!r}; {hint}allowed keys: {', '.join(allowed)}"
    if v == "required":
        missing = [k for k in error.validator_value if k not in (error.instance or {})]
        # One error per missing key: each names its own (the first named for all said one twice).
        named = [k for k in missing if error.message.startswith(repr(k))]
        return f"missing required key {(named or missing)[0]!r}" if missing else error.message
    if v == "type":
        return f"must be {_title(error.schema) or _article(error.validator_value)}, not {_what(error.instance)}"
    if v == "enum":
        return f"must be one of {', '.join(map(str, error.validator_value))}, not {_shown(error.instance)}"
    if v == "pattern":
        title = _title(error.schema)
        if title:
            return f"{_shown(error.instance)} is not {title}"
        return f"{_shown(error.instance)} is not in the form this key takes ({error.validator_value})"
    if v == "not" and isinstance(error.validator_value, dict):
        return _forbidden(error.validator_value)
    return _bounds(error) or str(error.message)


# Sizes and limits in words (jsonschema says `[] should be non-empty`): (what is counted, rule).
_SIZES = {"minItems": ("has {} entries", "it needs at least"), "maxItems": ("has {} entries", "it takes at most"),
          "minLength": ("is {} characters", "it needs at least"), "maxLength": ("is {} characters", "it takes at most")}
_LIMITS = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "above", "exclusiveMaximum": "below"}


def _bounds(error: ValidationError) -> str | None:
    """Sizes, limits, fixed values and repeats in words, or None for another keyword."""
    v, n, value = error.validator, error.validator_value, error.instance
    if v in ("minItems", "minProperties", "minLength") and n == 1:
        return "must not be empty"
    if v in _SIZES:
        size, rule = _SIZES[v]
        return f"{size.format(len(value))}; {rule} {n}"
    if v in _LIMITS:
        return f"must be {_LIMITS[v]} {n}, not {_shown(value)}"
    if v == "const":
        return f"must be {_shown(n)}, not {_shown(value)}"
    if v == "uniqueItems" and isinstance(value, list):
        seen: list[object] = []
        for item in value:
            if item in seen:
                return f"lists {_shown(item)} twice; give each once"
            seen.append(item)
    return None


def _key(key: object) -> str:
    """A mapping key as it was written in YAML (a date key loads as a date, `null:` as None)."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool):
        return {None: "null", True: "true", False: "false"}[key]
    iso = getattr(key, "isoformat", None)
    return str(iso() if callable(iso) else key)


def _forbidden(schema: dict[str, Any]) -> str:
    """A value that matched a `not`: keys that must not be given together, and why (its description)."""
    keys = schema.get("required")
    why = str(schema.get("description") or "")
    if isinstance(keys, list) and keys:
        if len(keys) == 1:
            return f"has {keys[0]!r}; {why or 'remove it'}"
        return f"has both {' and '.join(repr(k) for k in keys)}; {why or 'remove one'}"
    return why or "is a combination that is not allowed here"


# A value that fits none of several schemas (`oneOf`, `anyOf`). An alternative may carry a
# `title` naming what it expects in words ("a duration like 90s, 20m, 1.5h"); one without
# a title is explained by its own errors.
_ALTERNATIVES = ("oneOf", "anyOf")


def _telling(error: ValidationError) -> ValidationError:
    """The error to show for `error`: for a value that fits none of several alternatives, the
    error inside the one alternative of the value's type (an unknown key of a mapping, say),
    unless that alternative has a title to say what it expects."""
    while error.validator in _ALTERNATIVES and error.context:
        fitting = _fitting(error)
        untitled = [i for i in fitting if not _title(error.validator_value[i])]
        if not untitled:
            return error
        if len(fitting) == 1:
            inside = [e for e in error.context if e.relative_schema_path[0] == fitting[0]]
        else:  # several alternatives of its type: the likeliest one
            likeliest = best_match(e for e in error.context if e.relative_schema_path[0] in fitting)
            inside = [likeliest] if likeliest is not None else []
        if not inside:
            return error
        error = min(inside, key=lambda e: (len(e.path), [str(p) for p in e.path], e.message))
    return error


def _fitting(error: ValidationError) -> list[int]:
    """The alternatives whose type the value has (those with no type error about the value itself)."""
    wrong_type = {e.relative_schema_path[0] for e in error.context if e.validator == "type" and not e.path}
    return [i for i in range(len(error.validator_value)) if i not in wrong_type]


def _alternatives(error: ValidationError) -> str:
    """What a value that fits none of the alternatives should be: their titles, else their types."""
    if not error.context:  # a `oneOf` the value fits more than one alternative of
        return str(error.message)
    fitting = _fitting(error)
    if len(fitting) == 1 and _title(error.validator_value[fitting[0]]):
        return f"{_shown(error.instance)} is not {_title(error.validator_value[fitting[0]])}"
    kinds: dict[str, None] = {}  # in order, once each
    for i in fitting or range(len(error.validator_value)):
        types = [e.validator_value for e in error.context if e.relative_schema_path[0] == i
                 and e.validator == "type" and not e.path]
        kinds[_title(error.validator_value[i]) or _article(types[0] if types else "a value")] = None
    expected = " or ".join(kinds)
    return f"must be {expected}" if fitting else f"must be {expected}, not {_what(error.instance)}"


def _title(schema: object) -> str:
    return str(schema.get("title", "")) if isinstance(schema, dict) else ""


def _shown(value: object) -> str:
    """A value as a user wrote it: text quoted, numbers as they are."""
    if isinstance(value, str):
        return repr(value[:40])
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return _what(value)


def _what(value: object) -> str:
    """What a value given in YAML or JSON is, in the words of `_article` (not Python's type names)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if hasattr(value, "isoformat"):  # YAML reads 2026-01-01 as a date
        return f"the date {_key(value)} (put it in quotes to mean text)"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, set | frozenset):  # YAML's !!set: was said as "a value"
        return "a set (YAML's !!set)"
    return _article("object" if isinstance(value, dict) else "array" if isinstance(value, list) else "a value")


def _article(kind: object) -> str:
    if isinstance(kind, list):
        return " or ".join(_article(k) for k in kind)
    return {"object": "a mapping", "array": "a list", "string": "a string", "integer": "a whole number",
            "number": "a number", "boolean": "true or false", "null": "null"}.get(str(kind), str(kind))


def warm(*names: str) -> None:
    """Check and compile the schemas `names` now: the first order filed waited some 20 ms for it."""
    for name in names:
        _predicate(name)


def errors(name: str, instance: object) -> list[ValidationError]:
    """All schema errors of `instance`, shallowest first, deterministic order."""
    quick = _predicate(name)
    if quick is not None and quick(instance):
        return []  # the common case; jsonschema is asked only to say what is wrong
    found = list(validator(name).iter_errors(instance))
    return sorted(found, key=lambda e: (len(e.absolute_path), [str(p) for p in e.absolute_path], e.message))


# -- a quick yes for valid instances ---------------------------------------------------------------
# jsonschema walks a schema keyword by keyword through several layers of objects: 140 us for
# one small work order, on every order filed. The predicates below answer only "valid?" for
# the keywords the shipped schemas use, with jsonschema's meaning; anything else makes no
# predicate and jsonschema decides alone. tests/test_schemas.py holds them to jsonschema.

Predicate = Callable[[Any], bool]
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "$comment", "title", "description", "then", "else"})
_TYPES: dict[str, Predicate] = {
    "string": lambda x: isinstance(x, str),
    "array": lambda x: isinstance(x, list),
    "object": lambda x: isinstance(x, dict),
    "null": lambda x: x is None,
    "boolean": lambda x: isinstance(x, bool),
}


@cache
def _predicate(name: str) -> Predicate | None:
    return compile_predicate(_expanded(name))


def compile_predicate(schema: Any) -> Predicate | None:
    """A function telling whether an instance is valid against `schema` (references written
    out), or None when `schema` uses a keyword this does not know."""
    if isinstance(schema, bool):
        return (lambda x: True) if schema else (lambda x: False)
    if not isinstance(schema, dict):
        return None
    fused = _text(schema) or _listed(schema) or _mapping(schema)
    if fused is not None:
        return fused
    checks: list[Predicate] = []
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        check = _keyword(key, value, schema)
        if check is None:
            return None
        checks.append(check)
    return _every(checks)


# The combinators below loop by hand: a generator per test (`all(c(x) for c in checks)`) was
# most of the predicates' time, some 90 generators per order filed.
def _every(checks: list[Predicate]) -> Predicate:
    if len(checks) == 1:
        return checks[0]

    def every(x: Any) -> bool:
        for check in checks:  # noqa: SIM110 (a generator here was the cost)
            if not check(x):
                return False
        return True

    return every


# Text, lists and mappings are most of an order's values: one function each, not one per
# keyword under `every` (some 80 calls an order filed).
_TEXT_KEYWORDS = frozenset({"type", "pattern", "minLength", "maxLength"})
_LIST_KEYWORDS = frozenset({"type", "items", "minItems", "maxItems"})
_MAPPING_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties"})


def _text(schema: dict[str, Any]) -> Predicate | None:
    """The predicate of a schema of text (or null) with only a pattern and length bounds, or None."""
    kinds = schema.get("type")
    if kinds not in ("string", ["string"], ["string", "null"], ["null", "string"]) or not (
            set(schema) - _ANNOTATIONS <= _TEXT_KEYWORDS):
        return None
    low, high, pattern = schema.get("minLength", 0), schema.get("maxLength", math.inf), schema.get("pattern")
    if not (_bound(low) and _bound(high) and (pattern is None or isinstance(pattern, str))):
        return None
    nullable = "null" in kinds
    search = re.compile(pattern).search if pattern is not None else None

    def text(x: Any) -> bool:
        if isinstance(x, str):
            return low <= len(x) <= high and (search is None or search(x) is not None)
        return nullable and x is None

    return text


def _listed(schema: dict[str, Any]) -> Predicate | None:
    """The predicate of a schema of a list with only bounds on its length and a schema for its items, or None."""
    if schema.get("type") not in ("array", ["array"]) or not set(schema) - _ANNOTATIONS <= _LIST_KEYWORDS:
        return None
    low, high = schema.get("minItems", 0), schema.get("maxItems", math.inf)
    if not (_bound(low) and _bound(high)):
        return None
    one = _compiled([schema.get("items", True)])
    if one is None:
        return None
    item = one[0]

    def listed(x: Any) -> bool:
        if not isinstance(x, list) or not low <= len(x) <= high:
            return False
        for i in x:  # noqa: SIM110 (a generator here was the cost)
            if not item(i):
                return False
        return True

    return listed


def _mapping(schema: dict[str, Any]) -> Predicate | None:
    """The predicate of a schema of a mapping with only properties, required keys and a schema
    for the other keys, or None."""
    if schema.get("type") not in ("object", ["object"]) or not set(schema) - _ANNOTATIONS <= _MAPPING_KEYWORDS:
        return None
    properties, required = schema.get("properties", {}), schema.get("required", [])
    if not isinstance(properties, dict) or not isinstance(required, list):
        return None
    parts = _compiled([*properties.values(), schema.get("additionalProperties", True)])
    if parts is None:
        return None
    pairs, other = list(zip(properties, parts[:-1], strict=True)), parts[-1]
    known = set(properties)
    # No schema for the other keys (none given) is no test of them.
    others = "additionalProperties" in schema

    def mapping(x: Any) -> bool:
        if not isinstance(x, dict):
            return False
        for key in required:
            if key not in x:
                return False
        for key, test in pairs:
            if key in x and not test(x[key]):
                return False
        if others:
            for key, value in x.items():
                if key not in known and not other(value):
                    return False
        return True

    return mapping


def _bound(value: Any) -> bool:
    """A length bound as `_keyword` takes one (an int), or none given (infinite)."""
    return type(value) is int or value == math.inf


def _keyword(key: str, value: Any, schema: dict[str, Any]) -> Predicate | None:
    if key == "type":
        kinds = value if isinstance(value, list) else [value]
        if not all(k in _TYPES for k in kinds):
            return None
        tests = [_TYPES[k] for k in kinds]
        return tests[0] if len(tests) == 1 else (lambda x: any(t(x) for t in tests))
    if key == "enum" and isinstance(value, list):
        return lambda x: any(_equal(x, e) for e in value)
    if key == "const":
        return lambda x: _equal(x, value)
    if key == "pattern":
        rx = re.compile(value)
        return lambda x: not isinstance(x, str) or rx.search(x) is not None
    if key in ("minLength", "maxLength", "minItems", "maxItems") and type(value) is int:
        kind = str if key.endswith("Length") else list
        if key.startswith("min"):
            return lambda x: not isinstance(x, kind) or len(x) >= value
        return lambda x: not isinstance(x, kind) or len(x) <= value
    if key == "required" and isinstance(value, list):
        return lambda x: not isinstance(x, dict) or all(k in x for k in value)
    if key == "properties" and isinstance(value, dict):
        props = _compiled(list(value.values()))
        if props is None:
            return None
        pairs = list(zip(value, props, strict=True))

        def properties(x: Any) -> bool:
            if isinstance(x, dict):
                for k, p in pairs:
                    if k in x and not p(x[k]):
                        return False
            return True

        return properties
    if key == "additionalProperties":
        one = _compiled([value])
        if one is None or "patternProperties" in schema:
            return None
        known, extra = set(schema.get("properties", {})), one[0]
        return lambda x: not isinstance(x, dict) or all(extra(v) for k, v in x.items() if k not in known)
    if key in ("items", "not"):
        one = _compiled([value])
        if one is None:
            return None
        sub = one[0]
        if key == "not":
            return lambda x: not sub(x)
        def items(x: Any) -> bool:
            if isinstance(x, list):
                for i in x:
                    if not sub(i):
                        return False
            return True

        return items
    if key == "allOf" and isinstance(value, list):
        subs = _compiled(value)
        return None if subs is None else (lambda x: all(p(x) for p in subs))
    if key == "if":
        parts = _compiled([value, schema.get("then", True), schema.get("else", True)])
        if parts is None:
            return None
        cond, then, other = parts
        return lambda x: then(x) if cond(x) else other(x)
    return None


def _compiled(nodes: list[Any]) -> list[Predicate] | None:
    """A predicate for each of `nodes`, or None when any cannot have one."""
    out = [compile_predicate(n) for n in nodes]
    return None if any(p is None for p in out) else [p for p in out if p is not None]


def _equal(one: Any, two: Any) -> bool:
    """JSON equality as JSON Schema means it: true is not 1, lists and objects compared item by item."""
    if isinstance(one, str) or isinstance(two, str):
        return bool(one == two)
    if isinstance(one, list) and isinstance(two, list):
        return len(one) == len(two) and all(_equal(a, b) for a, b in zip(one, two, strict=True))
    if isinstance(one, dict) and isinstance(two, dict):
        return one.keys() == two.keys() and all(_equal(one[k], two[k]) for k in one)
    if isinstance(one, bool) or isinstance(two, bool):
        return type(one) is type(two) and one == two
    if isinstance(one, (list, dict)) or isinstance(two, (list, dict)):
        return False
    return bool(one == two)
