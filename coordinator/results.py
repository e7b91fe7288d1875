"""The result file a specialist leaves at `$COORD_RESULT` (SPEC §6): how its attempt ended.

YAML or JSON, told apart by content (YAML in flow style, `{outcome: done, …}`, is
YAML). A result that breaks the contract is an `OrderError` listing every problem;
the supervisor counts the attempt as failed and puts the problems in the next brief.

Example:
    >>> parse_result(b"outcome: route-to\\nsummary: It touches hashing.\\nagent: rex\\n", path="result.yaml")
    Result(outcome='route-to', summary='It touches hashing.', agent='rex', blocker=None)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import schemas
from ._orderfields import AGENT_PATTERN, finish, text_problem, unknown_key
from ._orderfile import fail, flow_kind, load_json, load_yaml, read_text
from .errors import OrderError, Problem

OUTCOMES = ("done", "halt-with-note", "route-to", "requeue-with-blocker", "blocked")
RESULT_KEYS = ("outcome", "summary", "agent", "blocker")
MAX_RESULT_BYTES = 64 * 1024
_ROUTE = re.compile(r"route-to-([a-z][a-z0-9_-]{0,31})")


@dataclass(frozen=True)
class Result:
    outcome: str
    summary: str
    agent: str | None = None  # with route-to
    blocker: str | None = None  # with requeue-with-blocker (or blocked): an order id or a line

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"outcome": self.outcome, "summary": self.summary}
        if self.agent is not None:
            out["agent"] = self.agent
        if self.blocker is not None:
            out["blocker"] = self.blocker
        return out


def parse_result(data: bytes, *, path: str) -> Result:
    """The result in `data`; OrderError (each problem with its field and line) if it breaks
    the contract of SPEC §6: too big, not YAML/JSON, unknown keys, a missing `agent` for
    route-to or `blocker` for requeue-with-blocker."""
    text = read_text(data, path=path, limit=MAX_RESULT_BYTES, what="a result file",
                     empty_hint="write `outcome:` and `summary:` (YAML or JSON)")
    lines: dict[str, int] = {}
    if flow_kind(text) == "json":
        raw = load_json(text, path)
    else:
        raw, lines = load_yaml(text, path=path)
    if not isinstance(raw, dict):
        fail(path, "must be a mapping with `outcome:` and `summary:`")
    problems: list[Problem] = []
    d: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(Problem("", f"the key {key!r} is not text", path))
        elif key not in RESULT_KEYS:
            problems.append(unknown_key(key, RESULT_KEYS, path=path))
        else:
            d[key] = value.strip() if isinstance(value, str) else value
    route = _ROUTE.fullmatch(d["outcome"]) if isinstance(d.get("outcome"), str) else None
    if route and "agent" not in d:  # `outcome: route-to-rex`, as branching writes it
        d["outcome"], d["agent"] = "route-to", route.group(1)
    problems += _rules(d, path)
    if not problems:  # the schema is the published contract; the rules above explain it
        problems += [Problem(schemas.field_of(e), schemas.describe(e), path)
                     for e in schemas.errors("result", d)]
    if problems:
        raise OrderError(finish(problems, lines))
    return Result(outcome=d["outcome"], summary=d["summary"], agent=d.get("agent"),
                  blocker=d.get("blocker"))


def _rules(d: dict[str, Any], path: str) -> list[Problem]:
    problems: list[Problem] = []

    def bad(field: str, message: str) -> None:
        problems.append(Problem(field, message, path))

    outcome = d.get("outcome")
    if outcome is None:
        bad("outcome", f"is missing; say how the work ended: {', '.join(OUTCOMES)}")
    elif outcome not in OUTCOMES:
        bad("outcome", f"{str(outcome)[:40]!r} is not an outcome; use one of {', '.join(OUTCOMES)}")
    summary = d.get("summary")
    if summary is None:
        bad("summary", "is missing; say in one paragraph what was done")
    elif not isinstance(summary, str):
        bad("summary", "must be text; put it in quotes")
    elif why := text_problem(summary, multiline=True):
        bad("summary", why)
    agent, blocker = d.get("agent"), d.get("blocker")
    if outcome == "route-to" and agent is None:
        bad("agent", "route-to needs `agent:` naming the agent the work belongs to")
    elif agent is not None and outcome in OUTCOMES and outcome != "route-to":
        bad("agent", "only route-to names an agent; remove it")
    elif agent is not None and not (isinstance(agent, str) and AGENT_PATTERN.fullmatch(agent)):
        bad("agent", f"{str(agent)[:40]!r} is not an agent name")
    if outcome == "requeue-with-blocker" and blocker is None:
        bad("blocker", "requeue-with-blocker needs `blocker:`: the order id it waits for, or a line "
                       "saying what is missing")
    elif blocker is not None and outcome in OUTCOMES and outcome not in ("requeue-with-blocker", "blocked"):
        bad("blocker", f"only requeue-with-blocker or blocked take a blocker; remove it from {outcome}")
    elif blocker is not None and not isinstance(blocker, str):
        bad("blocker", "must be text: an order id or one line")
    elif isinstance(blocker, str) and (why := text_problem(blocker)):
        bad("blocker", why)
    return problems
