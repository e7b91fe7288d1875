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

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from . import paths
from ._orderfields import (
    ACCEPTANCE_ITEMS,
    ACTIONS,
    BRANCH_RULES,
    FEEDBACK_STATUSES,
    ID_PATTERN,
    KEYS,
    MAX_FILES,
    MAX_IDS,
    MAX_OBJECTIVE,
    PRIORITIES,
    PRIORITY_RANK,
    SECTIONS,
    acceptance_text,
    branch_item,
    finish,
    id_help,
    reported,
)
from ._orderfile import (
    KINDS,
    MAX_ORDER_BYTES,
    NOT_TEXT_WORDS,
    PLAIN_WORD,
    md_acceptance_text,
    md_file,
    read_order,
)
from .config import SYSTEM_SENDERS, Agent, Config
from .errors import OrderError, Problem, UsageError
from .gitrepo import foreign_checkout, unborn_branch

__all__ = [
    "ACCEPTANCE_ITEMS", "ACTIONS", "BRANCH_RULES", "FEEDBACK_STATUSES", "ID_PATTERN", "KEYS", "KINDS",
    "MAX_FILES", "MAX_IDS", "MAX_OBJECTIVE", "MAX_ORDER_BYTES", "PRIORITIES", "PRIORITY_RANK",
    "SECTIONS", "Acceptance", "Branch", "EmptyHistory", "History", "WorkOrder", "check",
    "is_feedback", "load", "objective_key", "parse", "Peek", "peek", "render", "template",
]


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

    def same_id(self, order_id: str) -> str | None:
        """An id in use (or waiting) that is `order_id` in another case, if any: on a
        case-insensitive file system the two would share one order folder and one branch."""
        ...

    def waiting(self, order_id: str) -> str | None:
        """Where an order with that id waits to be taken in (an inbox file), if it does."""
        ...

    def blocked_by_of(self, order_id: str) -> tuple[str, ...]: ...

    def ended(self, sender: str, to: str, objective: str) -> list[tuple[str, str]]:
        """(id, status) of earlier orders sender -> to with this objective (compare with
        `objective_key`) that ended in one of FEEDBACK_STATUSES."""
        ...


class EmptyHistory:
    """A workspace with no earlier orders (for `validate` outside a workspace)."""

    def exists(self, order_id: str) -> bool:
        return False

    def same_id(self, order_id: str) -> str | None:
        return None

    def waiting(self, order_id: str) -> str | None:
        return None

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


def parse(data: bytes, *, path: str, to: str | None = None, kind: str | None = None) -> WorkOrder:
    """The order in `data` judged on its own: format and shape (SPEC §2), no team rules.

    `path` names the file in messages and its suffix picks the format, unless `kind`
    ("markdown", "yaml" or "json") is given (e.g. for stdin); `to` is the inbox's agent.
    Raises OrderError carrying every problem found.
    """
    draft = read_order(data, path=path, to=to, sender=None, kind=kind)
    if draft.problems:
        raise OrderError(finish(draft.problems, draft.lines))
    return WorkOrder.from_dict(draft.fields)


@dataclass(frozen=True)
class Peek:
    """What an order file says of itself, read as far as it goes (the rest may be invalid):
    its recipient (`to`), the `id` it declares and the ids its `blocked_by` names; `unread`:
    why it could not be read that far (too big, not UTF-8, not valid YAML...), so that a file
    that does name its recipient is never told to add one."""

    to: str | None = None
    id: str | None = None
    blocked_by: tuple[str, ...] = ()
    unread: str | None = None


def peek(data: bytes, *, path: str) -> Peek:
    try:
        fields = read_order(data, path=path, to=None, sender=None, kind=None).fields
    except OrderError as e:
        first = e.problems[0] if e.problems else None
        return Peek(unread=f"{first.field}: {first.message}" if first and first.field else
                    first.message if first else str(e))
    to, own, waits = fields.get("to"), fields.get("id"), fields.get("blocked_by")
    return Peek(to=to if isinstance(to, str) and to else None, id=own if isinstance(own, str) else None,
                blocked_by=tuple(w for w in waits if isinstance(w, str)) if isinstance(waits, list) else ())


# --- check: the team rules -----------------------------------------------------------------


def check(order: WorkOrder, config: Config, history: History, *, path: str | None = None,
          repos: Path | None = None) -> list[Problem]:
    """The team rules of SPEC §2 for a parsed order: who may send what to whom, where its
    files lie, ids, dependencies, the feedback loop. Problems carry no line (`load` adds them).
    With `repos` (the workspace's repos/), a `files` entry must name a repository there."""
    problems: list[Problem] = []

    def bad(field: str, message: str) -> None:
        problems.append(Problem(field, message, path))

    agents = config.agents
    if order.id and (".." in order.id or order.id.endswith((".", ".lock"))):
        # The id names the order's branch (repos.BRANCH_PREFIX): what git refuses there is refused here.
        bad("id", f"{order.id!r} would name the order's git branch wo/{order.id}, which git refuses (no '..', "
                  "no trailing '.' or '.lock'); choose another id")
    recipient = agents.get(order.to)
    if recipient is None:
        bad("to", f"unknown agent {order.to!r}; the agents are {', '.join(sorted(agents))}")
    elif not (recipient.runnable or recipient.is_orchestrator):
        bad("to", f"{order.to} has no `command` or `llm` in coordinator.yaml, so nothing can run "
                  "this order; send it to another agent")
    if order.sender not in SYSTEM_SENDERS and order.sender not in agents:
        bad("from", f"unknown agent {order.sender!r}; use `user` or one of {', '.join(sorted(agents))}")
    elif recipient is not None and not config.may_send(order.sender, order.to):
        allowed = ", ".join(agents[order.sender].sends_to) or "nobody"
        bad("from", f"{order.sender} may not send to {order.to} (it sends to: {allowed})")
    if recipient is not None:
        if recipient.is_orchestrator:  # it delegates: its orders stay inside its agents' writes
            writes = tuple(w for a in recipient.sends_to if a in agents for w in agents[a].writes)
            whose = f"{order.to}'s agents ({', '.join(recipient.sends_to) or 'none'})"
        else:
            writes, whose = recipient.writes, order.to
        for i, entry in enumerate(order.files):
            if paths.path_problem(entry) is None and not paths.covered(entry, writes):
                bad(f"files.{i}", f"{entry!r} is outside what {whose} may write "
                                  f"({', '.join(writes) or 'nothing'}); narrow it, or send the order "
                                  "to an agent that may write there")
        for i, rule in enumerate(order.branching):
            if rule.action == "route-to" and rule.agent and rule.agent not in recipient.sends_to:
                allowed = ", ".join(recipient.sends_to) or "nobody"
                bad(f"branching.{i}.agent", f"{order.to} may not route work to {rule.agent} (it "
                                            f"sends to: {allowed})")
            elif rule.action == "route-to" and rule.agent in agents and not (
                    agents[rule.agent].runnable or agents[rule.agent].is_orchestrator):
                # Taken, the route's follow-up was rejected at once: the work went nowhere.
                bad(f"branching.{i}.agent", f"{rule.agent} has no `command` or `llm` in coordinator.yaml, so "
                                            "nothing could run the order this route files; route to another agent")
        if recipient.command:
            _brief_fits_one_argument(order, recipient, bad)
    named: dict[str, int] = {}  # repository -> its first entry (a missing one is said at that line)
    for i, entry in enumerate(order.files):
        if paths.path_problem(entry) is None:
            named.setdefault(paths.repo_of(entry), i)
    if len(named) > 1:
        bad("files", f"names {len(named)} repositories ({', '.join(sorted(named))}); an order works in one "
                     "repository: send one order per repository")
    if repos is not None:
        for repo, i in named.items():
            odd = foreign_checkout(repos / repo)
            if odd is not None:  # taken, every attempt failed to make its working copy
                bad(f"files.{i}", f"repos/{repo} {odd}")
                continue
            if (repos / repo / ".git").exists():
                unborn = unborn_branch(repos / repo / ".git")
                if unborn is not None:  # taken, every attempt failed: "refs/heads/main does not exist"
                    bad(f"files.{i}", f"repos/{repo} has no commit on {unborn} yet, so no working copy can be "
                                      f"made from it: make a first commit there (git -C repos/{repo} commit "
                                      "--allow-empty -m start) and send the order again")
                continue
            if (repos / repo).is_dir():  # "no repository" sent the user looking for a folder that is there
                bad(f"files.{i}", f"repos/{repo} is not a git repository; clone the repository there, or "
                                  "`git init` it and make a first commit")
            else:
                bad(f"files.{i}", f"no repository {repo!r} under repos/; the first component of every path "
                                  "names one")
    _check_ids(order, history, bad)
    # Referencing one earlier failure acknowledges the loop; name the latest when none is.
    ended = [(p, st) for p, st in history.ended(order.sender, order.to, order.objective) if p != order.id]
    if ended and not any(p in order.references for p, _ in ended):
        prior, status = ended[-1]
        bad("references", f"this repeats {prior}, which was {status}: reference it and say what changed")
    return problems


# Linux passes at most MAX_ARG_STRLEN (32 pages, 128 KiB, its NUL included) in one argument:
# a longer one fails every attempt with "Argument list too long".
MAX_ARGUMENT_BYTES = 128 * 1024 - 1
# Kept free for what a later attempt's brief adds (why the last attempt failed).
RETRY_ROOM_BYTES = 16 * 1024
_BRIEF_TEXT = "{brief_text}"


def _brief_fits_one_argument(order: WorkOrder, recipient: Agent, bad: Any) -> None:
    """An order whose brief, passed whole in one argument ({brief_text}), would be too long
    for the kernel can never start: refused before it is sent, not after both attempts."""
    args = [a for a in recipient.command or () if _BRIEF_TEXT in a]
    if not args:
        return
    rough = (len(order.objective) + sum(len(a.text) + len(a.check or "") for a in order.acceptance)
             + sum(map(len, order.files)) + sum(len(b.when) for b in order.branching))
    if rough * 4 + 32 * 1024 < MAX_ARGUMENT_BYTES - RETRY_ROOM_BYTES:  # far from it (UTF-8: 4 bytes a char)
        return
    from .runner import brief_text  # the runner renders the brief; it imports this module

    text = brief_text(replace(order, id=order.id or "WO-0000"), 1, []).encode("utf-8", "surrogateescape")
    size = max(len(a.encode("utf-8", "surrogateescape")) + (len(text) - len(_BRIEF_TEXT)) * a.count(_BRIEF_TEXT)
               for a in args)
    if size + RETRY_ROOM_BYTES > MAX_ARGUMENT_BYTES:
        bad("", f"its brief is {size // 1024} KiB, passed whole in one argument of {order.to}'s command "
                f"({_BRIEF_TEXT}); Linux takes at most 128 KiB in one argument, less {RETRY_ROOM_BYTES // 1024} "
                "KiB kept for a retry's notes: shorten the order, or have the command read the brief from "
                "its file ({brief} or $COORD_BRIEF)")


def _check_ids(order: WorkOrder, history: History, bad: Any) -> None:
    if order.id is not None:
        if not ID_PATTERN.fullmatch(order.id):
            bad("id", id_help(order.id))
        elif history.exists(order.id):
            waiting = history.waiting(order.id)
            bad("id", f"{order.id!r} is already {f'waiting in {waiting}' if waiting else 'used in this workspace'}; "
                      "pick another id or leave it out to get one assigned")
        elif (first := history.same_id(order.id)) is not None:
            bad("id", f"{order.id!r} is {first!r}, already used in this workspace, in another case (on a "
                      "case-insensitive file system the two would share one folder); pick another id or "
                      "leave it out to get one assigned")
    for key, ids in (("blocked_by", order.blocked_by), ("references", order.references)):
        for i, other in enumerate(ids):
            if not ID_PATTERN.fullmatch(other):
                continue  # a shape problem, reported by parse
            if other == order.id:
                bad(f"{key}.{i}", "an order cannot " + ("wait on" if key == "blocked_by" else "reference")
                    + " itself")
            elif not history.exists(other):
                same = history.same_id(other)  # ids are compared exactly: `login-fix` is not `Login-Fix`
                bad(f"{key}.{i}", f"no order {other!r} in this workspace; " + (
                    f"there is {same!r}: write the id in its case" if same is not None
                    else "check the id with `coordinator board`"))
    cycle = _cycle(order, history)
    if cycle:
        bad("blocked_by", f"{' -> '.join(cycle)} is a dependency cycle that would never run; drop "
                          "one of these")


def _cycle(order: WorkOrder, history: History) -> list[str] | None:
    """The chain of `blocked_by` that leads from the order back to itself, if any."""
    if order.id is None:
        return None  # an id not yet assigned cannot be waited on
    came_from = {x: order.id for x in order.blocked_by if x != order.id}
    todo = list(came_from)
    while todo and len(came_from) < 10_000:
        node = todo.pop()
        for nxt in history.blocked_by_of(node):
            if nxt == order.id:
                chain = [node]
                while chain[-1] != order.id:
                    chain.append(came_from[chain[-1]])
                return [*reversed(chain), order.id]
            if nxt not in came_from:
                came_from[nxt] = node
                todo.append(nxt)
    return None


def load(data: bytes, *, path: str, to: str | None, config: Config, history: History,
         sender: str | None = None, kind: str | None = None, repos: Path | None = None,
         priority: str = "normal") -> WorkOrder:
    """`parse` and `check` in one: OrderError lists every problem of either, with lines.
    `sender` overrides the file's `from` (the supervisor stamps outbox files with it);
    `repos` as for `check`; `priority`: the order's when the file gives none."""
    draft = read_order(data, path=path, to=to, sender=sender, kind=kind, priority=priority)
    if sender is None and draft.fields.get("from") == SUPERVISOR_NAME:
        # Only the supervisor stamps it (on the orders it files itself): from a file it would
        # make an order pass for the supervisor's own in the audit trail.
        draft.problems.append(Problem("from", f"{SUPERVISOR_NAME!r} is the supervisor's own name; an order "
                                              "is from `user` or an agent of the team", path))
    order = _lenient(draft.fields) if draft.problems else WorkOrder.from_dict(draft.fields)
    seen = [p.field for p in draft.problems]
    team = [p for p in check(order, config, history, path=path, repos=repos) if not reported(p.field, seen)]
    problems = draft.problems + team
    if problems:
        raise OrderError(finish(problems, draft.lines))
    return order


def _lenient(d: dict[str, Any]) -> WorkOrder:
    """The order as far as it is well formed, so the team rules can be checked as well;
    positions are kept so that `files.3` still names the fourth entry."""

    def text(value: Any, default: str = "") -> str:
        return value if isinstance(value, str) else default

    def listed(key: str, cap: int) -> list[Any]:
        value = d.get(key)
        return value[:cap] if isinstance(value, list) else []

    branching = tuple(
        Branch(text(b.get("action")), text(b.get("when")), b["agent"] if isinstance(b.get("agent"), str)
               else None) if isinstance(b, dict) else Branch("", "")
        for b in listed("branching", BRANCH_RULES[1] + 1))
    ident = text(d.get("id")) or None
    return WorkOrder(
        id=ident if ident and ID_PATTERN.fullmatch(ident) else None,
        sender=text(d.get("from"), "user"), to=text(d.get("to")), objective=text(d.get("objective")),
        acceptance=(), files=tuple(text(f) for f in listed("files", MAX_FILES + 1)),
        branching=branching, blocked_by=tuple(text(x) for x in listed("blocked_by", MAX_IDS + 1)),
        references=tuple(text(x) for x in listed("references", MAX_IDS + 1)),
    )


# --- render: back to Markdown ---------------------------------------------------------------


def render(order: WorkOrder) -> str:
    """The order as a Markdown brief in the seed's format; `parse(render(o))` gives `o` back.

    A value Markdown cannot carry unchanged (say a check on an item whose text does not
    read `` `cmd` passes``) goes into the front matter instead.
    """
    front: dict[str, Any] = {} if order.id is None else {"id": order.id}
    front.update({"from": order.sender, "to": order.to})
    if order.priority != "normal":
        front["priority"] = order.priority
    for key, value in (("blocked_by", list(order.blocked_by)), ("references", list(order.references)),
                       ("timeout", order.timeout), ("parent", order.parent)):
        if value:
            front[key] = value
    body: list[str] = []
    if _one_line(order.objective):
        body += [f"**Objective:** {order.objective}", ""]
    else:
        front["objective"] = order.objective
    if all(_one_line(a.text) and acceptance_text(md_acceptance_text(a.text)) == a.to_dict()
           for a in order.acceptance):
        body += ["**Acceptance:**", *(f"- {a.text}" for a in order.acceptance), ""]
    else:
        front["acceptance"] = [a.to_dict() for a in order.acceptance]
    if not order.files:
        body += ["**Files:** none", ""]
    elif all(_one_line(f) and md_file(f) == f for f in order.files):
        body += ["**Files:**", *(f"- {f}" for f in order.files), ""]
    else:
        front["files"] = list(order.files)
    rules = [_rule_text(b) for b in order.branching]
    if all(_one_line(b.when) and branch_item(t) == b.to_dict() for b, t in zip(order.branching, rules,
                                                                                  strict=True)):
        body += ["**Branching:**", *(f"- {t}" for t in rules)]
    else:
        front["branching"] = [b.to_dict() for b in order.branching]
    # libyaml's emitter is 4x faster (a brief is written for every attempt), but it escapes
    # characters beyond U+FFFF (an emoji would reach the agent as \U0001F680): then the Python one.
    options: dict[str, Any] = {"sort_keys": False, "allow_unicode": True, "default_flow_style": None,
                               "width": 1 << 20}
    head: str | None = _plain_front(front)
    if head is None:
        try:
            head = yaml.dump(front, Dumper=_FAST_DUMPER, **options)
        except UnicodeEncodeError:  # a lone surrogate: the Python emitter writes it as \uD800
            head = None
    if head is None or "\\U" in head:
        head = yaml.dump(front, Dumper=yaml.SafeDumper, **options)
    return "---\n" + head + "---\n" + "\n".join(body).rstrip("\n") + "\n"


_FAST_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _plain_front(front: dict[str, Any]) -> str | None:
    """The front matter as `render`'s yaml.dump writes it, when every value is such a word
    (the usual id, from and to; the keys are render's own): the dumper's representer is
    Python even with libyaml, some 40 us a brief."""
    items = []
    for key, value in front.items():
        if not (type(value) is str and PLAIN_WORD.match(value) and value not in NOT_TEXT_WORDS):
            return None
        items.append(f"{key}: {value}")
    return "{" + ", ".join(items) + "}\n"  # default_flow_style=None: a mapping of scalars on one line


def _one_line(text: str) -> bool:
    return bool(text) and text == text.strip() and len(text.splitlines()) == 1


def _rule_text(rule: Branch) -> str:
    action = f"route-to-{rule.agent}" if rule.action == "route-to" and rule.agent else rule.action
    return f"{action} if {rule.when}"


def known_agent(name: str, config: Config) -> Agent:
    """The agent `name` given on the command line (`--to`); a usage error when there is none."""
    agent = config.agents.get(name)
    if agent is None:
        raise UsageError(f"unknown agent {name!r}; the agents are {', '.join(sorted(config.agents))}")
    return agent


SUPERVISOR_NAME = "coordinator"


def known_sender(name: str, config: Config) -> None:
    """A sender given on the command line (`--from`): `user` or an agent; a usage error else."""
    if name == SUPERVISOR_NAME:
        raise UsageError(f"--from {name}: that is the supervisor's own name; send as `user` or as an agent")
    if name != "user" and name not in config.agents:
        raise UsageError(f"--from {name}: unknown agent; use `user` or one of {', '.join(sorted(config.agents))}")


def template(to: str, config: Config) -> str:
    """A Markdown work order for `to` to fill in (`coordinator new --to X`). It validates once
    every <describe …> and <replace …> is replaced; its files are what `to` may write."""
    agent = known_agent(to, config)
    writes = agent.writes
    if agent.is_orchestrator:
        writes = tuple(w for a in agent.sends_to if a in config.agents for w in config.agents[a].writes)
    repo = paths.repo_of(writes[0]) if writes else None
    files = [f"- {w}" for w in writes if paths.repo_of(w) == repo]
    route = [f"- route-to-{a} if <describe when the work belongs to {a}>" for a in agent.sends_to[:1]]
    head = yaml.safe_dump({"to": to, "priority": "normal"}, sort_keys=False)
    return "\n".join([
        "---",
        f"# A work order for {to}: replace every <describe …> and <replace …>, narrow the files",
        f"# to what the work needs, then: coordinator send FILE --to {to}",
        head.rstrip("\n"),
        "---",
        "**Objective:** <describe the outcome in one present-tense sentence>",
        "",
        "**Acceptance:**",
        "- <describe a result anyone can check without asking you>",
        "- <describe another checkable result>",
        "- `<replace with the command that tests it>` passes",
        "",
        "**Files:**" if files else "**Files:** none",
        *files,
        "",
        "**Branching:**",
        "- halt-with-note if the work does not apply",
        *route,
        "- requeue-with-blocker if a dependency is missing",
        "",
    ])

