"""The quick validity predicates agree with jsonschema on every instance, valid or broken."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator import schemas

SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Strings near the schemas' edges: enum members, patterns' edge cases, empty, multi-line.
STRINGS = st.sampled_from(
    ["", "x", "done", "route-to", "halt-with-note", "requeue-with-blocker", "blocked", "chip", "WO-1",
     "a\nb", "Bad Name", "normal", "urgent", "1.5s", "../x", "src/**", "/abs", "x" * 281, "-x", "WO..1",
     "chip\n", "WO-1\n", "done\n"])  # `$` matches before a final newline: search, not fullmatch
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2) | STRINGS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
        st.sampled_from(["text", "check", "action", "when", "agent", "x"]), inner, max_size=3),
    max_leaves=8)

ORDER: dict[str, Any] = {
    "id": "WO-1", "from": "user", "to": "chip", "objective": "The greeting is shown",
    "acceptance": [{"text": "it shows"}, {"text": "it is short"}, {"text": "tests pass", "check": "make test"}],
    "files": ["webapp/src/**"], "branching": [{"action": "route-to", "agent": "rex", "when": "it needs review"}],
    "priority": "normal", "blocked_by": [], "references": ["WO-0"], "timeout": "30m", "parent": None,
}
RESULT: dict[str, Any] = {"outcome": "requeue-with-blocker", "summary": "waits", "blocker": "WO-2"}


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """`base` with a few changes deep inside: a value replaced, a key dropped or added."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 3))):
        node: Any = doc
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            if not isinstance(node[key], (dict, list)) or not node[key]:
                break
            node = node[key]
        if isinstance(node, dict):
            action = draw(st.sampled_from(["replace", "drop", "add"]))
            if action == "add" or not node:
                node[draw(st.sampled_from(["extra", "agent", "check", "blocker", "text"]))] = draw(JSON)
            elif action == "drop":
                del node[draw(st.sampled_from(sorted(node)))]
            else:
                node[draw(st.sampled_from(sorted(node)))] = draw(STRINGS | JSON)
        elif isinstance(node, list):
            if node and draw(st.booleans()):
                node[draw(st.integers(0, len(node) - 1))] = draw(STRINGS | JSON)
            else:
                node.append(draw(JSON))
    return doc


def agree(name: str, instance: Any) -> None:
    quick = schemas._predicate(name)
    assert quick is not None
    assert quick(instance) == schemas.validator(name).is_valid(instance), instance


@SETTINGS
@given(mutated(ORDER))
def test_the_work_order_predicate_says_valid_exactly_when_jsonschema_does(doc: Any) -> None:
    agree("work-order", doc)


@SETTINGS
@given(mutated(RESULT) | JSON)
def test_the_result_predicate_says_valid_exactly_when_jsonschema_does(doc: Any) -> None:
    agree("result", doc)


def test_the_shipped_examples_take_the_quick_path_and_broken_ones_still_get_every_error(monkeypatch) -> None:
    class Refuses:
        def iter_errors(self, instance: Any) -> Any:
            raise AssertionError("jsonschema was asked about a valid order")

    with monkeypatch.context() as m:
        m.setattr(schemas, "validator", lambda name: Refuses())
        assert schemas.errors("work-order", ORDER) == []
    broken = {**ORDER, "to": "Bad Name", "acceptance": [{"text": ""}], "extra": 1}
    fields = sorted(schemas.field_of(e) for e in schemas.errors("work-order", broken))
    assert fields == ["acceptance", "acceptance.0.text", "extra", "to"]


def test_a_keyword_it_does_not_know_leaves_the_decision_to_jsonschema() -> None:
    assert schemas.compile_predicate({"type": "object", "minProperties": 1}) is None
    assert schemas.compile_predicate({"type": "integer"}) is None  # 1.0 is an integer to JSON Schema
    assert schemas.compile_predicate({"properties": {"a": {"uniqueItems": True}}}) is None
    check = schemas.compile_predicate({"enum": [True, 1, [1]]})
    assert check is not None and check(True) and check(1) and check([1]) and not check([True])


def test_references_are_written_out_without_losing_or_inventing_a_rule() -> None:
    defs = {"line": {"type": "string", "minLength": 1}, "list": {"items": {"$ref": "#/$defs/list"}}}
    assert schemas._inline({"$ref": "#/$defs/line", "maxLength": 3}, defs) == {
        "type": "string", "minLength": 1, "maxLength": 3}
    both = schemas._inline({"$ref": "#/$defs/line", "type": "string", "allOf": [{"maxLength": 3}]}, defs)
    assert both == {"type": "string", "allOf": [{"type": "string", "minLength": 1}, {"maxLength": 3}]}
    data = schemas._inline({"properties": {"enum": {"$ref": "#/$defs/line"}}, "const": {"$ref": "#/$defs/line"}}, defs)
    assert data == {"properties": {"enum": {"type": "string", "minLength": 1}}, "const": {"$ref": "#/$defs/line"}}
    assert schemas._inline({"$ref": "#/$defs/list"}, defs) == {"items": {"$ref": "#/$defs/list"}}  # a cycle stays


def said(name: str, instance: Any) -> list[str]:
    return [f"{schemas.field_of(e)}: {schemas.describe(e)}" for e in schemas.errors(name, instance)]


def test_a_value_that_fits_none_of_several_schemas_is_told_what_is_expected() -> None:
    def team(**agent: Any) -> dict[str, Any]:
        return {"version": 1, "agents": {"chip": {"role": "specialist", **agent}}}

    def fallback(item: Any) -> dict[str, Any]:
        return team(llm={"base_url": "http://x", "model": "m", "fallback": [item]})

    # An alternative with a title says it; with none, the value's own mistake inside it is said.
    assert said("config", team(timeout="banana")) == ["agents.chip.timeout: 'banana' is not a duration like "
                                                      "90s, 20m, 1.5h"]
    assert said("config", team(timeout=-5)) == ["agents.chip.timeout: -5 is not a number of seconds above 0"]
    assert said("config", team(timeout=True)) == ["agents.chip.timeout: must be a duration like 90s, 20m, 1.5h "
                                                  "or a number of seconds above 0, not true"]
    assert said("config", fallback(5)) == ["agents.chip.llm.fallback.0: must be a string or a mapping, "
                                           "not the number 5"]
    assert said("config", fallback({"model": "a", "extra": 1})) == [
        "agents.chip.llm.fallback.0.extra: unknown key 'extra'; allowed keys: api_key_env, base_url, model, prices"]
    assert said("config", fallback({"base_url": "http://y"})) == [
        "agents.chip.llm.fallback.0.model: missing required key 'model'"]
    either = "a specialist's reply (outcome, summary, edits) or an orchestrator's plan (summary, orders)"
    assert said("llm-reply", {"outcome": "done"}) == [f"(top level): must be {either}"]
    assert said("llm-reply", ["done"]) == [f"(top level): must be {either}, not a list"]
    assert not any("valid under" in line for line in said("config", team(timeout="1d", stale_after=[])))


def test_a_value_outside_a_list_of_choices_is_shown_as_it_was_written() -> None:
    # `priority: null` in an order was told "not None", Python's word for it, not YAML's or JSON's.
    order = {"id": "o", "from": "user", "to": "chip", "objective": "o", "files": [],
             "acceptance": [{"text": "a"}, {"text": "b"}, {"text": "c"}],
             "branching": [{"action": "halt-with-note", "when": "w"}], "priority": "normal",
             "blocked_by": [], "references": [], "timeout": None, "parent": None}
    assert said("work-order", order) == []
    assert said("work-order", {**order, "priority": None}) == [
        "priority: must be one of low, normal, high, urgent, not null"]
    assert said("work-order", {**order, "priority": "HIGH"}) == [
        "priority: must be one of low, normal, high, urgent, not 'HIGH'"]
    team = {"version": 1, "agents": {"chip": {"role": "specialist"}}}
    assert said("config", {**team, "budget": {"on_ceiling": ["rotate"]}}) == [
        "budget.on_ceiling: must be one of rotate, fresh, warn, not a list"]

