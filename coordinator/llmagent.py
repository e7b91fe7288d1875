"""What the supervisor does with a model: ask, check the reply, ask again, apply.

Pure given a `Client`: no clock, no state. A specialist model answers with the
edits it wants (whole files); an orchestrator model answers with work orders.
A reply that breaks the contract goes back to the same model with the exact
errors, at most `MAX_REASKS` times, then `LLMReplyError` fails the attempt.

    run_specialist(client, brief, files, allowed=..., outcomes_allowed=...)
        -> SpecialistReply, replies        then apply_edits(worktree, repo, edits)
    plan(client, context, roster, request, validate=...)      -> Plan, replies
    synthesize(client, context, roster, request, reports, validate=...) -> Plan, replies

When a call itself fails (LLMError), the replies of earlier rounds are in
`client.calls` for cost accounting.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from jsonschema import Draft202012Validator

from . import paths, schemas
from ._orderfields import text_problem
from .config import Config
from .errors import LLMError
from .llm import LONE_SURROGATE, Client, Reply
from .results import MAX_RESULT_BYTES

MAX_REASKS = 2
MAX_CANDIDATES = 20  # places a JSON object might start in a reply wrapped in prose
# What reasoning models think aloud before they answer: never the answer.
THINKING = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.S | re.I)
OUTCOMES = ("done", "halt-with-note", "route-to", "requeue-with-blocker", "blocked")

# The first line of each system prompt names the role; the fake server and logs rely on it.
SPECIALIST_ROLE = "You are a specialist agent in a coordinator team."
ORCHESTRATOR_ROLE = "You are the orchestrator of a coordinator team: you plan and route, you never write code."
SYNTHESIS_ROLE = "You are the orchestrator of a coordinator team, reviewing the reports of the orders you sent."

SPECIALIST_PROMPT = f"""{SPECIALIST_ROLE}
You receive one work order (objective, acceptance, files, branching) and the current text of its files.
Do the work by editing files, then reply with exactly one JSON object and nothing else:
{{"outcome": "done", "summary": "one paragraph of what you did",
  "edits": [{{"path": "<repo>/<path>", "content": "<the whole new text of the file>"}},
            {{"path": "<repo>/<path>", "delete": true}}]}}
Rules:
- outcome is one of: {", ".join(OUTCOMES)}; use only an outcome the order's branching allows
  ("done" when the acceptance is met).
- With "route-to" add "agent": the agent to hand over to. With "requeue-with-blocker" add "blocker":
  the id of the order that must finish first, or one line saying what is missing.
- Edit only the files the order lists (paths start with the repository name). "content" is the whole
  file, not a diff. Files marked missing do not exist yet. Leave files you do not change out of edits.
- Files marked truncated or omitted were not sent whole: never edit or delete them.
- No other keys."""

ORDER_RULES = """Each order is an object:
{"to": "<agent>", "objective": "<one line, at most 280 characters>",
 "acceptance": ["<3 to 5 one-line testable items>", "`make test` passes"],
 "files": ["<repo>/<path or glob>"],
 "branching": [{"action": "halt-with-note", "when": "<condition>"},
               {"action": "route-to", "agent": "<agent>", "when": "<condition>"},
               {"action": "requeue-with-blocker", "when": "<condition>"}],
 "id": "<optional: a short name in this plan, so another order of the plan can wait on it>",
 "blocked_by": ["<id of an order that must be done first: one of this plan or an earlier one>"]}
Rules:
- Send only to agents of the team below. files: paths or globs inside that agent's writes, all in one
  repository; [] for read-only work (and for an agent whose writes is none).
- An acceptance item written as `command` passes is run by the supervisor to verify the work.
- branching: 1 to 10 rules; route-to only to an agent the recipient routes to. id and blocked_by are
  optional: an order whose blocked_by names another order of this plan by its id runs after it is done
  (each order gets its own workspace id when filed).
- You delegate; you never write files yourself."""

ORCHESTRATOR_PROMPT = f"""{ORCHESTRATOR_ROLE}
Turn the request into work orders for your team. Reply with exactly one JSON object and nothing else:
{{"summary": "<one paragraph: your plan>", "orders": [<order>, ...]}}
{ORDER_RULES}"""

SYNTHESIS_PROMPT = f"""{SYNTHESIS_ROLE}
The orders you sent for the request have ended; their reports follow. Reply with exactly one JSON
object and nothing else: {{"summary": "<the answer to the request>", "orders": [<order>, ...]}}
Send more orders only for work still missing; with "orders": [] the request is done and your summary
is its report.
{ORDER_RULES}"""

T = TypeVar("T")

# Checks one order of a plan: (the order, {id: blocked_by} of the plan's other orders with an id)
# -> problems, each one line.
PlanValidator = Callable[[dict[str, Any], dict[str, tuple[str, ...]]], list[str]]


class LLMReplyError(LLMError):
    """The model's reply broke the contract after every re-ask, or asks for an edit we refuse."""

    def __init__(self, message: str, *, errors: Iterable[str] = (),
                 replies: Iterable[Reply] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)
        self.replies = list(replies)


@dataclass(frozen=True)
class Edit:
    path: str  # "<repo>/<path inside it>"
    content: str | None  # the whole new text; None deletes the file


@dataclass(frozen=True)
class Unseen:
    """A file of the order the model was not sent whole: why, and the start shown (if any)."""

    reason: str  # e.g. "too large: only the first 60000 of its 93890 characters are shown"
    start: str = ""


@dataclass(frozen=True)
class SpecialistReply:
    outcome: str
    summary: str
    agent: str | None  # only with route-to
    blocker: str | None  # only with requeue-with-blocker
    edits: tuple[Edit, ...]
    # Well-formed edits in the order's repository but outside what it may write: never
    # applied; the order is denied for them (SPEC §7), as a command's gate would deny them.
    outside: tuple[Edit, ...] = ()


@dataclass(frozen=True)
class Plan:
    summary: str
    orders: tuple[dict[str, Any], ...]  # to, objective, acceptance, files, branching, blocked_by?


# -- specialist -----------------------------------------------------------


def specialist_messages(brief: str, files: Mapping[str, str | None],
                        unseen: Mapping[str, Unseen] | None = None) -> list[dict[str, str]]:
    """The brief plus the current text of the order's files (None: not there yet); each file
    in `unseen` was not sent whole, and says so (with the start of it, when it was cut)."""
    unseen = unseen or {}
    blocks: list[str] = []
    for path in sorted(set(files) | set(unseen)):
        text = files.get(path)
        if path in unseen:
            why = unseen[path]
            note = f"{why.reason}; you have not seen this file whole, so you may not edit or delete it"
            if why.start:
                blocks.append(f'<file path="{path}" truncated="true" note="{note}">\n{why.start}\n'
                              "</file>")
            else:
                blocks.append(f'<file path="{path}" omitted="true" note="{note}"/>')
        elif text is None:
            blocks.append(f'<file path="{path}" missing="true"/>')
        else:
            blocks.append(f'<file path="{path}">\n{text}\n</file>')
    shown = "\n".join(blocks) if blocks else "(this order names no files: read-only work, reply with no edits)"
    user = f"# Work order\n\n{brief.strip()}\n\n# Files\n\n{shown}\n\nReply with the JSON object now."
    return [{"role": "system", "content": SPECIALIST_PROMPT}, {"role": "user", "content": user}]


def run_specialist(client: Client, brief: str, files: Mapping[str, str | None], *,
                   allowed: Callable[[str], bool],
                   outcomes_allowed: Collection[str],
                   unseen: Mapping[str, Unseen] | None = None,
                   repo: str | None = None,
                   workdir: Path | None = None) -> tuple[SpecialistReply, list[Reply]]:
    """Ask the model for the order's edits; re-ask on a broken reply; LLMReplyError at last.

    `allowed(path)` says whether the order may write a "<repo>/<path>" (its files and the
    agent's writes). `outcomes_allowed` names the outcomes its branching allows, e.g.
    {"done", "blocked", "halt-with-note", "route-to-rex"}; a plain "route-to" allows any agent.
    `unseen` names the files the model was not sent whole: an edit of one is refused, since
    "the whole new text" of a file it saw only part of would cut the rest off. With `repo`
    (the order's repository), a well-formed edit in it that `allowed` refuses is not sent
    back but returned in `outside`: the caller denies the order for it. With `workdir` (the
    working copy of `repo`), an edit that could not be applied there (a file in the way of a
    folder, a folder in the way of a file, a link) is sent back too, as are two edits that
    would need one path to be a file and a folder at once: the model can still fix those, a
    failed attempt could not.
    """
    unseen = unseen or {}

    def check(data: dict[str, Any]) -> tuple[SpecialistReply | None, list[str]]:
        errors = _schema_errors("specialist", data)
        if errors:
            return None, errors
        outcome = data["outcome"]
        errors.extend(_text_errors(data["summary"], data.get("blocker") if outcome == "requeue-with-blocker"
                                   else None))
        if not _outcome_allowed(outcome, data.get("agent"), outcomes_allowed):
            what = f"{outcome!r} to {data.get('agent')!r}" if outcome == "route-to" else repr(outcome)
            errors.append(f"outcome: {what} is not allowed by this order's branching; "
                          f"use one of {', '.join(sorted(outcomes_allowed))}")
        edits: list[Edit] = []
        outside: list[Edit] = []
        seen: set[str] = set()
        for i, item in enumerate(data["edits"]):
            path = item["path"]
            where = f"edits.{i}.path {path!r}"
            if ("content" in item) == ("delete" in item):
                errors.append(f"edits.{i}: give either \"content\" (the whole new text) or "
                              "\"delete\": true")
                continue
            problem = paths.path_problem(path)
            if problem:
                errors.append(f"{where}: {problem}")
            elif "*" in path or "?" in path:
                errors.append(f"{where}: an edit names one file, not a glob")
            elif path in seen:
                errors.append(f"{where}: edited twice; give each file once")
            elif path in unseen:
                errors.append(f"{where}: was not sent to you whole ({unseen[path].reason}); you cannot "
                              "have seen all of it, so it may not be edited or deleted: leave it out of edits")
            elif not allowed(path) and repo is not None and path.startswith(repo + "/"):
                seen.add(path)
                outside.append(Edit(path, None if "delete" in item else item["content"]))
                continue
            elif not allowed(path):
                errors.append(f"{where}: outside what this order may write; edit only the files "
                              "the order lists")
            elif workdir is not None and repo is not None and (
                    why := _target(Path(os.path.realpath(workdir)), repo,
                                   Edit(path, None if "delete" in item else item["content"]))[1]):
                errors.append(f"{where}: {why}")
            seen.add(path)
            edits.append(Edit(path, None if "delete" in item else item["content"]))
        errors.extend(_clashes(edits))
        if errors:
            return None, errors
        return SpecialistReply(
            outcome=outcome,
            summary=data["summary"].strip(),
            agent=data.get("agent") if outcome == "route-to" else None,
            blocker=data.get("blocker") if outcome == "requeue-with-blocker" else None,
            edits=tuple(edits),
            outside=tuple(outside),
        ), []

    return _converse(client, specialist_messages(brief, files, unseen), check, "specialist reply")


def _clashes(edits: Iterable[Edit]) -> list[str]:
    """Edits that need a path to be a file (written whole) and a folder (of another edit) at once."""
    files = {e.path for e in edits if e.content is not None}
    out: list[str] = []
    for e in edits:
        parts = e.path.split("/")
        for n in range(2, len(parts)):
            folder = "/".join(parts[:n])
            if folder in files:
                out.append(f"edits: {e.path!r} is inside {folder!r}, which another edit writes as a file; "
                           "a path cannot be a file and a folder at once")
                break
    return out


def _text_errors(summary: str, blocker: object = None) -> list[str]:
    """What a command's result file could not say (SPEC §6) a reply may not say either: a summary
    past its size, or with control characters (a terminal escape `coordinator show` would print);
    a blocker of more than one line."""
    errors: list[str] = []
    if len(summary.encode("utf-8")) > MAX_RESULT_BYTES:
        errors.append(f"summary: is longer than {MAX_RESULT_BYTES} bytes; say in one paragraph what was done")
    elif why := text_problem(summary.strip(), multiline=True):
        errors.append(f"summary: {why}")
    if isinstance(blocker, str) and (why := text_problem(blocker.strip())):
        errors.append(f"blocker: {why}")
    return errors


def _outcome_allowed(outcome: str, agent: object, allowed: Collection[str]) -> bool:
    """`allowed` names outcomes; `route-to-<agent>` entries limit route-to to those agents."""
    if outcome == "route-to" and any(a.startswith("route-to-") for a in allowed):
        return f"route-to-{agent}" in allowed
    return outcome in allowed


def apply_edits(worktree_root: Path, repo: str, edits: Iterable[Edit]) -> list[str]:
    """Write whole files into the working copy of `repo`; repo-relative paths touched.

    Every edit is checked before any is applied: paths outside `repo`, with
    '..', absolute, into `.git`, or through a symbolic link are refused
    (LLMReplyError), so a refused reply leaves the working copy untouched.
    """
    root = Path(os.path.realpath(worktree_root))
    todo: list[tuple[str, Path, str | None]] = []
    problems: list[str] = []
    for edit in edits:
        rel, problem = _target(root, repo, edit)
        if not problem and edit.content is not None and LONE_SURROGATE.search(edit.content):
            problem = "its content holds half of a character (a lone surrogate); nothing was written"
        if problem:
            problems.append(f"{edit.path}: {problem}")
        else:
            todo.append((rel, root / rel, edit.content))
    if problems:
        raise LLMReplyError("refused edits: " + "; ".join(problems), errors=problems)
    touched: list[str] = []
    for rel, target, content in todo:
        if content is None:
            if not os.path.lexists(target):
                continue  # already gone: nothing changes
            os.unlink(target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a link planted after the check is refused, not written through.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode("utf-8"))
        if rel not in touched:
            touched.append(rel)
    return touched


def _target(root: Path, repo: str, edit: Edit) -> tuple[str, str | None]:
    problem = paths.path_problem(edit.path)
    if problem:
        return "", problem
    prefix = repo + "/"
    if not edit.path.startswith(prefix):
        return "", f"is not in repository {repo!r}"
    rel = edit.path[len(prefix):]
    parts = rel.split("/")
    here = root
    for part in parts[:-1]:
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            break  # the rest is created fresh as folders
        if stat.S_ISLNK(st.st_mode):
            return "", f"passes through the symbolic link {here.relative_to(root)}"
        if not stat.S_ISDIR(st.st_mode):
            return "", f"{here.relative_to(root)} is a file, not a folder"
    try:
        st = os.lstat(root / rel)
    except FileNotFoundError:
        return rel, None
    if stat.S_ISLNK(st.st_mode) and edit.content is not None:
        return "", "is a symbolic link; writing through it could leave the working copy"
    if stat.S_ISDIR(st.st_mode):
        return "", "is a folder; an edit replaces one file"
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        return "", "is not a regular file"
    return rel, None


# -- orchestrator ---------------------------------------------------------


def roster_text(config: Config, orchestrator: str) -> str:
    """The team as the orchestrator model sees it: one line per agent it may send to.

    Example line: ``- chip | writes: webapp/src/**, webapp/tests/** | routes to: rex | Coder``
    """
    lines: list[str] = []
    for name in config.agents[orchestrator].sends_to:
        a = config.agents[name]
        writes = ", ".join(a.writes) if a.writes else "none"
        routes = ", ".join(a.sends_to) if a.sends_to else "none"
        line = f"- {name} | writes: {writes} | routes to: {routes}"
        if a.description:
            line += f" | {' '.join(a.description.split())}"
        lines.append(line)
    return "\n".join(lines) if lines else "(no agents: this orchestrator may send to nobody)"


def orchestrator_messages(context: str, roster: str, request: str) -> list[dict[str, str]]:
    user = (f"# Context\n\n{context.strip() or '(nothing in flight)'}\n\n# Team\n\n{roster.strip()}\n\n"
            f"# Request\n\n{request.strip()}\n\nReply with the JSON object now.")
    return [{"role": "system", "content": ORCHESTRATOR_PROMPT}, {"role": "user", "content": user}]


def synthesis_messages(context: str, roster: str, request: str, reports: str) -> list[dict[str, str]]:
    user = (f"# Context\n\n{context.strip() or '(nothing in flight)'}\n\n# Team\n\n{roster.strip()}\n\n"
            f"# Request\n\n{request.strip()}\n\n# Reports\n\n{reports.strip()}\n\n"
            "Reply with the JSON object now.")
    return [{"role": "system", "content": SYNTHESIS_PROMPT}, {"role": "user", "content": user}]


def plan(client: Client, context: str, roster: str, request: str, *,
         validate: PlanValidator) -> tuple[Plan, list[Reply]]:
    """Ask the orchestrator model for orders; each is checked by `validate` (the order rules)."""
    return _converse(client, orchestrator_messages(context, roster, request),
                     _plan_check(validate), "plan")


def synthesize(client: Client, context: str, roster: str, request: str, reports: str, *,
               validate: PlanValidator) -> tuple[Plan, list[Reply]]:
    """Ask again with the children's reports: more orders, or none (the request is done)."""
    return _converse(client, synthesis_messages(context, roster, request, reports),
                     _plan_check(validate), "synthesis")


def _plan_check(validate: PlanValidator) -> Callable[[dict[str, Any]], tuple[Plan | None, list[str]]]:
    def check(data: dict[str, Any]) -> tuple[Plan | None, list[str]]:
        errors = _schema_errors("plan", data)
        if errors:
            return None, errors
        errors.extend(_text_errors(data["summary"]))
        named: dict[str, int] = {}
        for i, order in enumerate(data["orders"]):
            oid = order.get("id")
            if isinstance(oid, str) and oid in named:
                errors.append(f"orders.{i}: id {oid!r} is also the id of orders.{named[oid]}; give each its own")
            elif isinstance(oid, str):
                named[oid] = i
        for i, order in enumerate(data["orders"]):
            to = order.get("to")
            where = f"orders.{i}" + (f" (to {to})" if isinstance(to, str) else "")
            siblings = {str(o["id"]): _ids(o.get("blocked_by")) for j, o in enumerate(data["orders"])
                        if j != i and isinstance(o.get("id"), str)}
            errors.extend(f"{where}: {e}" for e in validate(order, siblings))
        if errors:
            return None, errors
        return Plan(summary=data["summary"].strip(), orders=tuple(data["orders"])), []

    return check


def _ids(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


# -- the conversation -----------------------------------------------------


def _converse(client: Client, messages: list[dict[str, str]],
              check: Callable[[dict[str, Any]], tuple[T | None, list[str]]],
              what: str) -> tuple[T, list[Reply]]:
    replies: list[Reply] = []
    errors: list[str] = []
    for _ in range(1 + MAX_REASKS):
        reply = client.chat(messages, json_object=True, prefer=replies[-1].endpoint if replies else None)
        replies.append(reply)
        data, errors = parse_object(reply.text)
        said = reply.text
        if _holds_key(client, reply.text, data):
            # Only the endpoint could have written it: kept, it would reach state/ (a report), a
            # commit or, sent back, a fallback on another host. Refused, and never repeated.
            data, errors = None, [KEY_ECHOED]
            said = "(a reply that held the API key; not repeated here)"
        if data is not None:
            result, errors = check(data)
            if result is not None and not errors:
                return result, replies
            if reply.cut:
                # What was found is a piece of the reply (an edit of the list the limit cut off
                # whole): "missing key 'outcome'" sent the model, and the user, after the wrong thing.
                errors = [_cut_error(client)]
        elif reply.cut:
            # Not a broken rule but a limit: "not JSON" alone would send the user hunting the model.
            errors = [_cut_error(client), *errors]
        correction = ("Your reply was not accepted:\n" + "\n".join(f"- {e}" for e in errors)
                      + "\nReply again with the whole corrected JSON object and nothing else.")
        messages = [*messages, {"role": "assistant", "content": said},
                    {"role": "user", "content": correction}]
    model = replies[-1].model
    raise LLMReplyError(
        f"{model}'s {what} broke the contract {len(replies)} times; last errors: " + "; ".join(errors),
        errors=errors, replies=replies,
    )


def _cut_error(client: Client) -> str:
    limit = client.settings.max_tokens
    where = (f"the agent's llm.max_tokens ({limit})" if limit is not None
             else "the endpoint's own output limit (no llm.max_tokens is set)")
    return (f"the reply was cut off at {where} before its JSON ended; reply shorter (fewer or "
            "smaller edits), or raise llm.max_tokens in coordinator.yaml")


KEY_ECHOED = ("the reply holds the API key of this agent's endpoint; it is never written anywhere: "
              "reply without it")


def _holds_key(client: Client, text: str, data: dict[str, Any] | None) -> bool:
    """Whether the reply holds a key of the client's chain: as sent, or in a string of its JSON
    (where \\u escapes would hide it from a plain search)."""
    return client.holds_key(text) or (data is not None and client.holds_key(json.dumps(data, ensure_ascii=False)))


def parse_object(text: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The JSON object in a reply; tolerates code fences, prose around it and the <think>
    blocks of reasoning models (which may hold braces of their own)."""
    body = THINKING.sub("", text).strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        data = _first_object(body)
        if data is None:
            return None, [f"the reply is not JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                          "reply with one JSON object"]
    except RecursionError:
        return None, ["the reply is not JSON we accept: it is nested too deeply; reply with one "
                      "plain JSON object"]
    except ValueError as e:  # a number past int's digit limit
        return None, [f"the reply is not JSON we accept ({str(e)[:100]}); reply with one JSON object"]
    if not isinstance(data, dict):
        return None, [f"the reply is a JSON {type(data).__name__}, not an object; reply with one "
                      "JSON object"]
    halves = _lone_surrogates(data)
    if halves:
        return None, halves
    return data, []


def _lone_surrogates(data: Any) -> list[str]:
    """Where a string of the reply holds half of a character (a lone surrogate such as \\ud800):
    such text cannot be written to a file or stored, so the reply is refused, never kept."""
    found: list[str] = []
    todo: list[tuple[str, Any]] = [("reply", data)]
    while todo and len(found) < 5:
        where, value = todo.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                here = f"{where}.{k}" if where != "reply" else str(k)
                if LONE_SURROGATE.search(k):
                    found.append(f"{_shown(here)}: the key {_escaped(k)} holds half of a character "
                                 "(a lone surrogate); write whole characters only")
                todo.append((here, v))
        elif isinstance(value, list):
            todo.extend((f"{where}.{i}", v) for i, v in enumerate(value))
        elif isinstance(value, str):
            m = LONE_SURROGATE.search(value)
            if m:
                found.append(f"{_shown(where)}: holds {_escaped(m.group())}, half of a character "
                             "(a lone surrogate); write whole characters only")
    return sorted(found)


def _escaped(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")[:60]


def _shown(where: str) -> str:
    return _escaped(where) if LONE_SURROGATE.search(where) else where


def _first_object(text: str) -> Any:
    """The JSON object of a reply wrapped in prose: prose may hold braces that start no JSON
    ("{outcome, summary}") or a small object of its own ("it had {"strict": false}"), so each
    '{' outside an object already found is tried, a bounded few, and the largest object wins."""
    decoder = json.JSONDecoder()
    best: Any = None
    size = 0
    start = text.find("{")
    for _ in range(MAX_CANDIDATES):
        if start < 0:
            break
        try:
            data, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            data, end = None, start + 1
        if isinstance(data, dict) and end - start > size:
            best, size = data, end - start
        start = text.find("{", end)  # past an object found: a '{' inside it starts no other
    return best


@cache
def _validator(kind: str) -> Draft202012Validator:
    root = schemas.load("llm-reply")
    return Draft202012Validator({"$schema": root["$schema"], "$defs": root["$defs"],
                                 "$ref": f"#/$defs/{kind}"})


def _schema_errors(kind: str, data: dict[str, Any]) -> list[str]:
    found = sorted(_validator(kind).iter_errors(data),
                   key=lambda e: (len(e.absolute_path), [str(p) for p in e.absolute_path], e.message))
    out: list[str] = []
    for err in found:
        where = ".".join(str(p) for p in err.absolute_path) or "reply"
        out.append(f"{where}: {schemas.describe(err)}")
    return out
