"""Work orders: parse a dropped file, check it against the team, render it back.

An order arrives as Markdown (the seed's four labels, optional YAML front
matter), YAML or JSON, and is normalized into one shape (SPEC §2), validated by
`schemas/work-order.schema.json`. `parse` judges the file alone, `check` the team
rules, `load` both at once; every broken rule is one `Problem` and all of them
travel together in one `OrderError`.

Example:
    >>> order = load(data, path="inbox/chip/fix.md", to="chip", config=cfg, history=EmptyHistory())
    >>> order.to_dict()["acceptance"][2]
    {'text': '`make test` passes', 'check': 'make test'}
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import yaml

from . import paths, schemas
from .config import Config, parse_duration
from .errors import OrderError, Problem, UsageError

PRIORITIES = ("low", "normal", "high", "urgent")
PRIORITY_RANK = {p: rank for rank, p in enumerate(PRIORITIES)}  # urgent highest
ACTIONS = ("halt-with-note", "route-to", "requeue-with-blocker")
MAX_ORDER_BYTES = 256 * 1024
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
AGENT_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_OBJECTIVE = 280
ACCEPTANCE_ITEMS = (3, 5)
MAX_FILES = 200
BRANCH_RULES = (1, 10)
MAX_IDS = 100  # blocked_by / references entries; keeps a hostile file from costing seconds
MAX_YAML_DEPTH = 32  # nesting; libyaml slows quadratically on deep flow nesting
MAX_PROBLEMS = 50
KEYS = ("id", "from", "to", "objective", "acceptance", "files", "branching", "priority",
        "blocked_by", "references", "timeout", "parent")
SECTIONS = ("objective", "acceptance", "files", "branching")
KINDS = {".md": "markdown", ".markdown": "markdown", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}
FEEDBACK_STATUSES = ("rejected", "denied", "halted", "blocked")

_CHECK = re.compile(r"`([^`]+)`(?:\s.*)?\spasses\.?", re.DOTALL | re.IGNORECASE)
_RULE = re.compile(r"(halt-with-note|requeue-with-blocker|route-to-([A-Za-z0-9_-]{1,64}?)|route-to)"
                   r"(?:\s+if\s+|\s+when\s+|:\s*)(.*)", re.DOTALL | re.IGNORECASE)
_PLACEHOLDER = re.compile(r"<(?:describe|replace)\b[^<>\n]{0,200}>")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*))?")
_BOLD = re.compile(r" {0,3}\*\*([^*\n]{1,60}?)(?::\*\*|\*\*[ \t]*:)(.*)")
_ITEM = re.compile(r"\s*(?:[-*+]|\d{1,9}[.)])(?:\s+(.*))?")
_CHECKBOX = re.compile(r"\[[ xX]\]\s+")
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Acceptance:
    text: str
    check: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {"text": self.text} if self.check is None else {"text": self.text, "check": self.check}


@dataclass(frozen=True)
class Branch:
    action: str
    when: str
    agent: str | None = None

    def to_dict(self) -> dict[str, str]:
        out = {"action": self.action}
        if self.agent is not None:
            out["agent"] = self.agent
        out["when"] = self.when
        return out


@dataclass(frozen=True)
class WorkOrder:
    id: str | None
    sender: str
    to: str
    objective: str
    acceptance: tuple[Acceptance, ...]
    files: tuple[str, ...]
    branching: tuple[Branch, ...]
    priority: str = "normal"
    blocked_by: tuple[str, ...] = ()
    references: tuple[str, ...] = ()
    timeout: str | None = None
    parent: str | None = None

    @property
    def repo(self) -> str | None:
        """The repository the order works in; None for read-only work."""
        return paths.repo_of(self.files[0]) if self.files else None

    @property
    def checks(self) -> tuple[str, ...]:
        """The commands the supervisor runs to verify the acceptance items."""
        return tuple(a.check for a in self.acceptance if a.check is not None)

    def to_dict(self) -> dict[str, Any]:
        """The normalized JSON form of SPEC §2, keys in a stable order."""
        return {
            "id": self.id, "from": self.sender, "to": self.to, "objective": self.objective,
            "acceptance": [a.to_dict() for a in self.acceptance], "files": list(self.files),
            "branching": [b.to_dict() for b in self.branching], "priority": self.priority,
            "blocked_by": list(self.blocked_by), "references": list(self.references),
            "timeout": self.timeout, "parent": self.parent,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkOrder:
        """From a trusted normalized dict (one this module produced, e.g. from state/)."""
        return cls(
            id=d.get("id"), sender=d.get("from", "user"), to=d["to"], objective=d["objective"],
            acceptance=tuple(Acceptance(a["text"], a.get("check")) for a in d["acceptance"]),
            files=tuple(d.get("files", ())),
            branching=tuple(Branch(b["action"], b["when"], b.get("agent")) for b in d["branching"]),
            priority=d.get("priority", "normal"), blocked_by=tuple(d.get("blocked_by", ())),
            references=tuple(d.get("references", ())), timeout=d.get("timeout"),
            parent=d.get("parent"),
        )


class History(Protocol):
    """What validation needs to know about the earlier orders of the workspace."""

    def exists(self, order_id: str) -> bool: ...

    def blocked_by_of(self, order_id: str) -> tuple[str, ...]: ...

    def ended(self, sender: str, to: str, objective: str) -> list[tuple[str, str]]:
        """(id, status) of earlier orders sender -> to with this objective (compare with
        `objective_key`) that ended in one of FEEDBACK_STATUSES."""
        ...


class EmptyHistory:
    """A workspace with no earlier orders (for `validate` outside a workspace)."""

    def exists(self, order_id: str) -> bool:
        return False

    def blocked_by_of(self, order_id: str) -> tuple[str, ...]:
        return ()

    def ended(self, sender: str, to: str, objective: str) -> list[tuple[str, str]]:
        return []


def objective_key(objective: str) -> str:
    """How objectives compare for the feedback-loop rule: whitespace- and case-insensitive."""
    return " ".join(objective.split()).casefold()


def is_feedback(problem: Problem) -> bool:
    """Is this the feedback-loop problem (the `feedback` signal of SPEC §8)?"""
    return problem.field == "references" and problem.message.startswith("this repeats ")


# --- reading untrusted text (shared with results.py) --------------------------------------


def fail(path: str | None, message: str, line: int | None = None) -> NoReturn:
    """Refuse a whole file: one problem, no field."""
    raise OrderError([Problem("", message, path, line)])


def read_text(data: bytes, *, path: str, limit: int, what: str, empty_hint: str) -> str:
    """`data` as text, or OrderError if it is too big, binary, not UTF-8 or empty."""
    if len(data) > limit:
        fail(path, f"is {_size(len(data))}; {what} is at most {_size(limit)}: move the details "
                   "into files it names")
    if b"\x00" in data:
        fail(path, f"is binary (it holds NUL bytes); {what} is UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        fail(path, f"is not UTF-8 text (byte {e.start}); save it as UTF-8")
    if not text.strip():
        fail(path, f"is empty; {empty_hint}")
    return text.replace("\r\n", "\n")


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"


def load_yaml(text: str, *, path: str, offset: int = 0) -> tuple[Any, dict[str, int]]:
    """Safe YAML with no aliases and bounded nesting, plus the line of each top-level key and
    of each item of a top-level list (`files.2`). `offset`: lines before `text` in the file."""
    try:
        depth = 0
        # A first pass over events refuses aliases (billion laughs) and deep nesting before
        # anything is built, so a hostile file costs milliseconds and no memory.
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1 + offset
                fail(path, "uses a YAML alias (*name); work orders write every value out", line)
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    fail(path, f"nests deeper than {MAX_YAML_DEPTH} levels; this is not a work order",
                         event.start_mark.line + 1 + offset)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        loader = _YAML_LOADER(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except OrderError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 + offset if mark is not None else None
        fail(path, f"is not valid YAML: {e.problem or e.context}", line)
    except Exception as e:  # the YAML library on hostile input: any failure means "not YAML"
        fail(path, f"is not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            line = key.start_mark.line + 1 + offset
            if key.value in lines:
                fail(path, f"{key.value!r} is given twice (lines {lines[key.value]} and {line}); "
                           "keep one", line)
            lines[key.value] = line
            if isinstance(value, yaml.SequenceNode):
                for i, item in enumerate(value.value):
                    lines[f"{key.value}.{i}"] = item.start_mark.line + 1 + offset
    return data, lines


def unknown_key(key: str, known: tuple[str, ...], *, path: str | None, what: str = "key") -> Problem:
    """An unknown key, with the closest known one suggested (a typo must not pass silently)."""
    close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return Problem(key, f"unknown {what}; {hint}the {what}s are: {', '.join(known)}", path)


def text_problem(value: str, *, multiline: bool = False) -> str | None:
    """Why `value` is not acceptable text for a field, or None."""
    if not value:
        return "is empty"
    if not multiline and len(value.splitlines()) > 1:
        return "must be one line; join the lines or split it into several items"
    if _CONTROL.search(value):
        return "contains a control character; remove it"
    m = _PLACEHOLDER.search(value)
    if m:
        return f"still holds the template placeholder {m.group(0)}; replace it"
    return None
