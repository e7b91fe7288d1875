"""The fields of a work order (SPEC §2): their keys and limits, their normal form, the
rules and the schema they are checked against, and where in the file each problem is.

Private to `orders` and `results`, behind `_orderfile`, which reads a file into a raw
mapping; `shape` turns that mapping into normalized fields, every broken rule a
`Problem` with the field it is about, and `finish` gives each problem its line.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import replace
from typing import Any

import yaml

from . import paths, schemas
from .config import git_glob_problem, parse_duration
from .errors import Problem
from .inboxfiles import printable

PRIORITIES = ("low", "normal", "high", "urgent")
PRIORITY_RANK = {p: rank for rank, p in enumerate(PRIORITIES)}  # urgent highest
ACTIONS = ("halt-with-note", "route-to", "requeue-with-blocker")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
AGENT_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_OBJECTIVE = 280
ACCEPTANCE_ITEMS = (3, 5)
MAX_FILES = 200
BRANCH_RULES = (1, 10)
MAX_IDS = 100  # blocked_by / references entries; keeps a hostile file from costing seconds
MAX_PROBLEMS = 50
KEYS = ("id", "from", "to", "objective", "acceptance", "files", "branching", "priority",
        "blocked_by", "references", "timeout", "parent")
SECTIONS = ("objective", "acceptance", "files", "branching")
FEEDBACK_STATUSES = ("rejected", "denied", "halted", "blocked")

_CHECK = re.compile(r"`([^`]+)`(?:\s.*)?\spasses\.?", re.DOTALL | re.IGNORECASE)
_RULE = re.compile(r"(halt-with-note|requeue-with-blocker|route-to-([A-Za-z0-9_-]{1,64}?)|route-to)"
                   r"(?:\s+if\s+|\s+when\s+|:\s*)(.*)", re.DOTALL | re.IGNORECASE)
_PLACEHOLDER = re.compile(r"<(?:describe|replace)\b[^<>\n]{0,200}>")
# C0 but tab and newline, DEL, C1, and the bidirectional overrides and isolates: U+202E makes a
# board line or a report read backwards ("done" shown where the text says "enod").


def unknown_key(key: str, known: tuple[str, ...], *, path: str | None, suggest: bool = True) -> Problem:
    """An unknown key, with the closest known one suggested (a typo must not pass silently).
    `suggest=False` skips the search, for the thousandth key of a hostile file."""
    close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.6) if suggest else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    return Problem(key, f"unknown key; {hint}the keys are: {', '.join(known)}", path)


def quoted(text: str) -> str:
    """`text` (a failure's output, say) made fit to quote in an order the supervisor writes:
    control characters dropped (an ANSI colour code loses its ESC), and a template
    placeholder's brackets turned into quotes, so that it is not taken for one."""
    text = paths.CONTROL_IN_TEXT.sub("", text)
    return _PLACEHOLDER.sub(lambda m: "«" + m.group(0)[1:-1] + "»", text)


def text_problem(value: str, *, multiline: bool = False) -> str | None:
    """Why `value` is not acceptable text for a field, or None."""
    if not value or all(c.isspace() or unicodedata.category(c) == "Cf" for c in value):
        return "is empty"  # also when only invisible: a zero-width space showed as a blank objective
    if not multiline and len(value.splitlines()) > 1:
        return "must be one line; join the lines or split it into several items"
    if paths.CONTROL_IN_TEXT.search(value):
        return "contains a control character; remove it"
    m = _PLACEHOLDER.search(value)
    if m:
        return f"still holds the template placeholder {m.group(0)}; replace it"
    return None


def kind_of(value: object) -> str:
    names = {list: "a list", str: "text", int: "a number", float: "a number", bool: "true/false"}
    return "nothing" if value is None else names.get(type(value), type(value).__name__)


def _missing(key: str, kind: str) -> str:
    how = f"the **{key.title()}:** section" if kind == "markdown" else f"the `{key}` key"
    what = {
        "objective": "one sentence saying what will be true when the work is done",
        "acceptance": "3 to 5 testable items",
        "files": "the files it may change (none for read-only work)",
        "branching": "1 to 10 rules such as `halt-with-note if the work does not apply`",
    }[key]
    return f"is missing; add {how} with {what}"


def shape(raw: dict[Any, Any], *, path: str, to: str | None, sender: str | None, kind: str,
          problems: list[Problem], priority: str = "normal") -> dict[str, Any]:
    """The normalized form of SPEC §2, as far as `raw` allows; problems appended. `priority`:
    the order's when it gives none."""
    d: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            problems.append(Problem("", f"the key {key!r} is not text; the keys are: {', '.join(KEYS)}",
                                    path))
        elif key not in KEYS:
            problems.append(unknown_key(key, KEYS, path=path, suggest=len(problems) < MAX_PROBLEMS))
        else:
            d[key] = value
    for key in SECTIONS:
        if key not in d:
            problems.append(Problem(key, _missing(key, kind), path))
    if to is not None:
        given = d.get("to")
        if isinstance(given, str) and given.strip() != to:
            problems.append(Problem("to", f"says {given.strip()!r} but the order is for {to!r} (its "
                                          f"inbox); remove `to:` or send it to {given.strip()}", path))
        d["to"] = to
    elif "to" not in d:
        problems.append(Problem("to", "no recipient; drop the file in inbox/<agent>/, pass --to "
                                      "AGENT or add `to:`", path))
    if sender is not None:
        d["from"] = sender
    defaults: dict[str, Any] = {"id": None, "from": "user", "priority": priority, "blocked_by": [],
                                "references": [], "timeout": None, "parent": None}
    d = {key: _clean(key, d[key] if key in d else defaults[key]) for key in KEYS
         if key in d or key in defaults}
    _rules(d, path, problems)
    _schema(d, path, problems)
    return d


def _clean(key: str, value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        if key in ("blocked_by", "references"):
            return [value]  # one id without brackets
    if not isinstance(value, list):
        return value
    if key == "acceptance":
        return [_acceptance_item(v) for v in value]
    if key == "branching":
        return [branch_item(v) for v in value]
    return [v.strip() if isinstance(v, str) else v for v in value]


def _acceptance_item(value: Any) -> Any:
    if isinstance(value, str):
        return acceptance_text(value.strip())
    if isinstance(value, dict):
        out = {str(k): v.strip() if isinstance(v, str) else v for k, v in value.items()}
        if "check" in out and out["check"] is None:
            del out["check"]  # an explicit `check: null` means no check
        return out
    return value


def acceptance_text(text: str) -> dict[str, str]:
    """`` `make test` passes `` carries the check `make test`."""
    m = _CHECK.fullmatch(text)
    command = m.group(1).strip() if m else ""
    return {"text": text, "check": command} if command else {"text": text}


def branch_item(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): v.strip() if isinstance(v, str) else v for k, v in value.items()}
    if not isinstance(value, str):
        return value
    m = _RULE.fullmatch(value.strip())
    if m is None:
        return value.strip()
    action, agent = m.group(1).lower(), m.group(2)
    out = {"action": "route-to" if action.startswith("route-to") else action}
    if agent:
        out["agent"] = agent.lower()
    out["when"] = m.group(3).strip()
    return out


def _rules(d: dict[str, Any], path: str, problems: list[Problem]) -> None:
    """SPEC §2's rules on the well-typed fields, in words a user can act on; the schema
    (run after) catches whatever is left, such as a wrong type."""

    def bad(field: str, message: str) -> None:
        problems.append(Problem(field, message, path))

    for key in ("id", "from", "to", "objective", "priority", "timeout", "parent"):
        value = d.get(key)
        if value is not None and not isinstance(value, str):
            bad(key, f"must be text, not {kind_of(value)}; put the value in quotes")
    for key in ("from", "to"):
        if isinstance(d.get(key), str) and not AGENT_PATTERN.fullmatch(d[key]):
            bad(key, f"{d[key][:40]!r} is not an agent name (lowercase letters, digits, '-', '_')")
    objective = d.get("objective")
    if isinstance(objective, str):
        why = text_problem(objective)
        if why == "is empty":
            why = "is empty; say in one sentence what will be true when the work is done"
        elif why is None and len(objective) > MAX_OBJECTIVE:
            why = f"is {len(objective)} characters; keep it to one sentence of at most {MAX_OBJECTIVE}"
        if why:
            bad("objective", why)
    items = d.get("acceptance")
    if isinstance(items, list):
        lo, hi = ACCEPTANCE_ITEMS
        if not lo <= len(items) <= hi:
            bad("acceptance", f"has {_count(len(items), 'item')}; a work order needs {lo} to {hi} "
                              "testable items")
        for i, item in enumerate(items[: hi + 1]):
            if isinstance(item, dict):
                text, check = (text_problem(item[k]) if isinstance(item.get(k), str) else None
                               for k in ("text", "check"))
                if text and text != check:  # a check's placeholder is in its item's text too: said once
                    bad(f"acceptance.{i}", text + ("; write a result anyone can check" if text == "is empty" else ""))
                if check:
                    bad(f"acceptance.{i}.check", check + ("; give the command that checks it, or leave out check"
                                                          if check == "is empty" else ""))
        # The same criterion twice is one criterion: three copies of "it works" passed the count.
        seen: dict[tuple[str, str], int] = {}
        for i, item in enumerate(items[: hi + 1]):
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                command = item.get("check")
                criterion = (" ".join(item["text"].split()).casefold(),
                             command.strip() if isinstance(command, str) else "")
                if criterion[0] and criterion in seen:
                    bad(f"acceptance.{i}", f"repeats item {seen[criterion] + 1}; a work order needs {lo} to {hi} "
                                           "different testable items")
                seen.setdefault(criterion, i)
    files = d.get("files")
    if isinstance(files, list):
        if len(files) > MAX_FILES:
            bad("files", f"has {len(files)} entries; at most {MAX_FILES}: use globs such as webapp/src/**")
        for i, entry in enumerate(files[: MAX_FILES + 1]):
            why = (paths.several_problem(entry) or paths.path_problem(entry) or paths.brace_problem(entry)
                   or git_glob_problem(entry, advice="name the files the work changes")) if isinstance(entry, str) else None
            if why:
                bad(f"files.{i}", why)
    _branching_rules(d.get("branching"), bad)
    for key in ("id", "parent"):
        if isinstance(d.get(key), str) and not ID_PATTERN.fullmatch(d[key]):
            bad(key, id_help(d[key]))
    for key in ("blocked_by", "references"):
        ids = d.get(key)
        if isinstance(ids, list):
            if len(ids) > MAX_IDS:
                bad(key, f"has {len(ids)} entries; at most {MAX_IDS}")
            for i, x in enumerate(ids[: MAX_IDS + 1]):
                if not isinstance(x, str) or not ID_PATTERN.fullmatch(x):
                    bad(f"{key}.{i}", id_help(x) if isinstance(x, str) else "must be an order id "
                                                                           "such as WO-0007, in quotes")
    timeout = d.get("timeout")
    if isinstance(timeout, str):
        try:
            parse_duration(timeout)
        except ValueError as e:
            bad("timeout", str(e))


def _branching_rules(rules: Any, bad: Any) -> None:
    if not isinstance(rules, list):
        return
    lo, hi = BRANCH_RULES
    if not lo <= len(rules) <= hi:
        bad("branching", f"has {_count(len(rules), 'rule')}; give {lo} to {hi}, such as "
                         "`halt-with-note if the work does not apply`")
    for i, rule in enumerate(rules[: hi + 1]):
        field = f"branching.{i}"
        if isinstance(rule, str):
            bad(field, f"{rule[:60]!r} is not a rule; write `halt-with-note if …`, "
                       "`route-to-<agent> if …` or `requeue-with-blocker if …`")
        if not isinstance(rule, dict):
            continue
        action = rule.get("action")
        if isinstance(action, str) and action not in ACTIONS:
            bad(f"{field}.action", f"unknown action {action[:40]!r}; use {', '.join(ACTIONS)}")
        elif action == "route-to" and "agent" not in rule:
            bad(f"{field}.agent", "route-to needs an agent: write route-to-<agent> if …")
        elif action in ACTIONS and action != "route-to" and "agent" in rule:
            bad(field, f"only route-to names an agent; remove it from {action}")
        agent = rule.get("agent")
        if isinstance(agent, str) and not AGENT_PATTERN.fullmatch(agent):  # as `from` and `to` say it
            bad(f"{field}.agent", f"{agent[:40]!r} is not an agent name (lowercase letters, digits, '-', '_')")
        when = rule.get("when")
        why = text_problem(when) if isinstance(when, str) else None
        if why:
            bad(f"{field}.when", why + ("; say when to take this branch" if why == "is empty" else ""))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def id_help(value: str) -> str:
    return (f"{value[:70]!r} is not an order id; use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it names the git branch wo/<id>: no '..', no trailing "
            "'.' or '.lock')")


def _schema(d: dict[str, Any], path: str, problems: list[Problem]) -> None:
    # Lists are cut just past their limit: the count is already reported, and validating
    # thousands of items of a hostile file would cost seconds.
    limits = {"acceptance": ACCEPTANCE_ITEMS[1], "files": MAX_FILES, "branching": BRANCH_RULES[1],
              "blocked_by": MAX_IDS, "references": MAX_IDS}
    cut = {k: v[: limits[k] + 1] if k in limits and isinstance(v, list) else v for k, v in d.items()}
    seen = [p.field for p in problems]
    for err in schemas.errors("work-order", cut):
        field = schemas.field_of(err)
        if not reported(field, seen):
            problems.append(Problem(field, schemas.describe(err), path))
            seen.append(field)


def reported(field: str, seen: list[str]) -> bool:
    """Is `field` already covered by a problem: the same field, or inside a reported item?"""
    return any(s == field or ("." in s and field.startswith(s + ".")) for s in seen)


class Lines(dict[str, int]):
    """The line of each field (see `load_yaml`), and `raw`: for each value YAML read as no
    text (`when: no` read as false, `12:30` as 750), the words as written and what YAML made
    of them, for the hint in `finish`. Found only when asked (an order with a problem): the
    walk over every value is no work for the valid orders intake files."""

    def __init__(self, node: Any = None) -> None:
        super().__init__()
        self._node = node
        self._raw: dict[str, tuple[str, str]] | None = None

    @property
    def raw(self) -> dict[str, tuple[str, str]]:
        if self._raw is None:
            self._raw = plain_scalars(self._node) if self._node is not None else {}
        return self._raw


_YAML_KINDS = {"tag:yaml.org,2002:bool": "", "tag:yaml.org,2002:int": "a number",
               "tag:yaml.org,2002:float": "a number", "tag:yaml.org,2002:timestamp": "a date"}
# A problem about the kind of a value: then the user needs to know what YAML did.
_KIND_PROBLEM = re.compile(r"\bnot (?:true|false|true/false|the number|a number|the date|date)\b|in quotes")
_SAID_QUOTES = re.compile(r"; put (?:the value|it) in quotes| \(put it in quotes to mean text\)|, in quotes")


def plain_scalars(node: Any) -> dict[str, tuple[str, str]]:
    """Each unquoted value under `node` (a composed YAML node) that YAML reads as a boolean, a
    number or a date, by its dotted field (`branching.0.when`): as written, and what it became."""
    found: dict[str, tuple[str, str]] = {}
    todo: list[tuple[str, Any]] = [("", node)]
    while todo:
        field, item = todo.pop()
        if isinstance(item, yaml.MappingNode):
            todo += [(f"{field}.{k.value}" if field else str(k.value), v) for k, v in item.value
                     if isinstance(k, yaml.ScalarNode)]
        elif isinstance(item, yaml.SequenceNode):
            todo += [(f"{field}.{i}" if field else str(i), v) for i, v in enumerate(item.value)]
        elif isinstance(item, yaml.ScalarNode) and not item.style and item.tag in _YAML_KINDS and field:
            kind = _YAML_KINDS[item.tag] or ("true" if item.value.lower() in ("yes", "true", "on") else "false")
            found[field] = (item.value, kind)
    return found


def _yaml_hint(field: str, written: str, kind: str) -> str:
    """`when: no` was read by YAML as false: put it in quotes ("no")."""
    key, shown = field.rsplit(".", 1)[-1], printable(written[:40])
    said = shown if key.isdigit() else f"{printable(key[:40])}: {shown}"
    return f"`{said}` was read by YAML as {kind}: put it in quotes (\"{shown}\")"


def finish(problems: list[Problem], lines: dict[str, int]) -> list[Problem]:
    """Problems with their lines filled in, in file order, capped. A problem about the kind of
    a value YAML read as no text says so (`lines.raw`, see `Lines`)."""
    raw = lines.raw if problems and isinstance(lines, Lines) else {}
    if raw:
        problems = [replace(p, message=f"{_SAID_QUOTES.sub('', p.message)}; {_yaml_hint(p.field, *raw[p.field])}")
                    if p.field in raw and _KIND_PROBLEM.search(p.message) else p for p in problems]

    def line_of(field: str) -> int | None:
        parts = field.split(".")
        while parts:
            if ".".join(parts) in lines:
                return lines[".".join(parts)]
            parts.pop()
        return None

    located = [p if p.line is not None else replace(p, line=line_of(p.field)) for p in problems]
    # An unknown key is the file's own text: a line break in it must not run the problem (a
    # failure reason quoted in the next brief, a report, a rejection) over lines of its own.
    located = [replace(p, field=printable(p.field)) if paths.CONTROL.search(p.field) else p for p in located]
    rank = {key: i for i, key in enumerate(KEYS)}
    located.sort(key=lambda p: (p.line or 1 << 30, rank.get(p.field.split(".")[0], -1)))
    if len(located) > MAX_PROBLEMS:
        more = len(located) - MAX_PROBLEMS
        located = [*located[:MAX_PROBLEMS],
                   Problem("", f"{more} more problems not shown; fix these first", located[0].path)]
    return located
