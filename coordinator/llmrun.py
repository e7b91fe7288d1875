"""Attempts of agents with `llm:`: the supervisor itself talks to the model (SPEC §11).

The HTTP conversation runs in a worker thread (the loop never blocks on a
model); everything after it (edits, gate, checks, commit, filing orders,
statuses, usage) happens back in the loop thread. The worker reads only what
was captured for it at the start, so it never races the loop over records.

A specialist's reply edits the working copy, then the usual gate and checks
decide. An orchestrator's request is decomposed into child orders (`parent` =
the request); the request stays `running` until its children end, then the
model is asked once more with their reports: more orders, or the request is
`done` with the synthesis as its report.

Money: every attempt gets its own `Client`; a `SpendMeter` per supervisor adds
what was recorded in `state/` to what calls in flight have spent, and is the
spend guard each client consults before every HTTP call: once an agent or the
workspace reaches its `spend_limit`, no call goes out and the order is blocked
with the limit named (no retry can bypass it: the meter is asked again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import audit, budget, gate, llmagent, orders, paths, results
from .config import Agent, Config, parse_duration
from .errors import CoordinatorError, LLMAuthError, LLMError, OrderError
from .landlock import Ruleset
from .llm import Call, Client, LLMTimeout, SpendLimitReached
from .store import History, Record, route_end

if TYPE_CHECKING:
    from .attempts import Active, AttemptRunner

MAX_FILE_CHARS = 60_000      # per file sent to a specialist model
MAX_TOTAL_CHARS = 240_000    # all files of one order
MAX_GLOB_FILES = 40
MAX_ROUNDS = 4               # plan + reviews that may still file orders; then the request is blocked
LOG_REPLY_CHARS = 4000       # of each model reply kept in the attempt's output.log
USAGE_NOTE = "model conversation"  # ledger items of a request's own calls carry this note
# The brief's last section tells a command how to write $COORD_RESULT; a model answers in JSON.
HOW_TO_ANSWER = "\n## How to answer"


@dataclass
class Outcome:
    """What the worker thread hands back to the loop."""

    kind: str  # "specialist" | "plan" | "synthesis"
    client: Client
    ledger_text: str = ""  # the part of the prompt the budget ledger already counts
    value: Any = None
    error: CoordinatorError | None = None
    replies: list[str] = field(default_factory=list)


# -- money ------------------------------------------------------------------------------------------


class SpendMeter:
    """USD spent by each agent and the workspace: recorded calls plus calls still in flight."""

    def __init__(self, records: Iterable[Record]) -> None:
        self._lock = threading.Lock()
        self._by_agent: dict[str, float] = {}
        self._total = 0.0
        self._live: dict[int, tuple[str, Client]] = {}
        for rec in records:
            for call in rec.usage:
                self._add(str(call.get("agent") or rec.to), float(call.get("cost", 0.0) or 0.0))

    def _add(self, agent: str, usd: float) -> None:
        self._by_agent[agent] = self._by_agent.get(agent, 0.0) + usd
        self._total += usd

    def track(self, agent: str, client: Client) -> None:
        with self._lock:
            self._live[id(client)] = (agent, client)

    def settle(self, client: Client) -> None:
        """The client's calls are now in `state/`: count them as recorded."""
        with self._lock:
            entry = self._live.pop(id(client), None)
            if entry is not None:
                self._add(entry[0], entry[1].spent)

    def spent(self, agent: str | None = None) -> float:
        with self._lock:
            live = sum(c.spent for a, c in self._live.values() if agent is None or a == agent)
            return live + (self._total if agent is None else self._by_agent.get(agent, 0.0))

    def guard(self, agent: Agent, config: Config) -> Callable[[], str | None]:
        """The circuit breaker a client asks before every HTTP call."""

        def check() -> str | None:
            if agent.spend_limit is not None:
                used = self.spent(agent.name)
                if used >= agent.spend_limit:
                    return (f"spend limit reached: {agent.name} has spent ${used:.4f} of its "
                            f"${agent.spend_limit:.2f} (agents.{agent.name}.spend_limit); no more "
                            "model calls: raise the limit in coordinator.yaml, then `coordinator retry`")
            if config.spend_limit is not None:
                used = self.spent()
                if used >= config.spend_limit:
                    return (f"spend limit reached: the workspace has spent ${used:.4f} of its "
                            f"${config.spend_limit:.2f} (spend_limit); no more model calls: raise the "
                            "limit in coordinator.yaml, then `coordinator retry`")
            return None

        return check


_meters: weakref.WeakKeyDictionary[AttemptRunner, SpendMeter] = weakref.WeakKeyDictionary()


def meter_for(runner: AttemptRunner) -> SpendMeter:
    """One meter per supervisor, seeded from what `state/` recorded when it first was needed."""
    meter = _meters.get(runner)
    if meter is None:
        meter = _meters[runner] = SpendMeter(runner.sup.records.values())
    return meter


def new_client(runner: AttemptRunner, act: Active) -> Client:
    """A client for one attempt (or one review): its calls are exactly this attempt's calls."""
    agent = act.agent
    assert agent.llm is not None
    meter = meter_for(runner)
    limit = meter.guard(agent, runner.sup.config)
    heartbeat = act.attempt.heartbeat

    def guard() -> str | None:
        # Asked before every HTTP call: a sign of life for the stale check, as a command's output is.
        with contextlib.suppress(OSError):
            heartbeat.touch()
        return limit()

    client = Client(agent.llm, transport=runner.sup.http_transport, spend_guard=guard)
    meter.track(agent.name, client)
    return client


# -- starting -----------------------------------------------------------------------------------------


def start_llm_attempt(runner: AttemptRunner, act: Active) -> None:
    agent = act.agent
    client = new_client(runner, act)
    brief = model_brief(act.attempt.brief.read_text("utf-8"))
    if agent.is_orchestrator:
        context = orchestrator_context(runner, current=act.rec.id)
        roster = llmagent.roster_text(runner.sup.config, agent.name)
        validate = order_validator(runner, agent, request=act.rec.id)
        out = Outcome("plan", client, ledger_text=context)

        def ask() -> Any:
            return llmagent.plan(client, context, roster, brief, validate=validate)
    else:
        files, unseen = current_files(act)
        order = act.order

        def allowed(path: str) -> bool:
            return paths.matches_any(order.files, path) and paths.matches_any(agent.writes, path)

        outcomes = {"done", "blocked"} | {
            f"{b.action}-{b.agent}" if b.agent else b.action for b in order.branching}
        out = Outcome("specialist", client)

        def ask() -> Any:
            return llmagent.run_specialist(client, brief, files, allowed=allowed,
                                           outcomes_allowed=outcomes, unseen=unseen,
                                           repo=act.repo.name if act.repo is not None else None)

    _launch(act, out, ask, f"llm-{act.token}", runner.sup.wake, left=act.deadline - runner.sup.clock())


HEARTBEAT_EVERY = 5.0  # seconds between signs of life while a model call is under way


def _launch(act: Active, out: Outcome, ask: Callable[[], Any], name: str,
            wake: Callable[[], None] | None = None, *, left: float | None = None) -> None:
    """Run `ask` in a thread of its own; `left`: seconds until the order's timeout, after which
    the call under way ends (see `Client.stop`, used by a cancel too)."""
    if left is not None:
        out.client.deadline = time.monotonic() + max(0.0, left)
    heartbeat = act.attempt.heartbeat
    alive = threading.Event()

    def beat() -> None:
        # A healthy model can think for minutes before its first byte: not silent, not stale.
        while not alive.wait(HEARTBEAT_EVERY):
            with contextlib.suppress(OSError):
                heartbeat.touch()

    def work() -> None:
        beating = threading.Thread(target=beat, daemon=True, name=f"{name}-heartbeat")
        beating.start()
        try:
            out.value = ask()
            out.replies = [r.text for r in out.value[1]]
        except llmagent.LLMReplyError as e:
            out.error = e
            out.replies = [r.text for r in e.replies]
        except CoordinatorError as e:
            out.error = e
        except Exception as e:  # noqa: BLE001 - whatever a reply does, the supervisor goes on
            # A bug or a reply nobody foresaw fails this attempt with one line; it never
            # kills the loop (a thread's exception would be lost, and its value is None).
            out.value = None
            out.error = LLMError(out.client.redact(
                f"the model call ended unexpectedly ({type(e).__name__}: {_one_line(str(e), 160)})"))
        finally:
            alive.set()
            if wake is not None:
                wake()  # the loop picks the reply up now, not at its next idle timeout

    act.thread_outcome = out
    act.thread = threading.Thread(target=work, daemon=True, name=name)
    act.thread.start()


def model_brief(brief: str) -> str:
    """The brief without the section on $COORD_RESULT: the model answers in JSON instead."""
    return brief.split(HOW_TO_ANSWER, 1)[0].rstrip() + "\n"


# -- finishing --------------------------------------------------------------------------------------


def finish_llm_attempt(runner: AttemptRunner, act: Active) -> None:
    """The worker ended: record usage, then judge like any specialist, or file the plan."""
    out: Outcome = act.thread_outcome
    record_usage(runner, act, out)
    _judge(runner, act, out)  # an end completes the request's ledger items (Supervisor._on_terminal)


def _judge(runner: AttemptRunner, act: Active, out: Outcome) -> None:
    if act.cancelled:
        return runner._end_cancelled(act)
    reason = None
    if act.timed_out or isinstance(out.error, LLMTimeout):
        reason = f"{act.agent.name}'s model did not answer within the order's timeout"
    elif out.error is not None:
        if isinstance(out.error, SpendLimitReached | LLMAuthError):
            # Retrying cannot help: the same limit or the same key stops the next attempt too.
            runner._finish(act)
            act.rec.failures.append(str(out.error))
            return runner.block(act.rec, str(out.error))
        reason = f"{act.agent.name}'s model failed: {out.error}"
    elif out.value is None:
        reason = f"{act.agent.name}'s model call ended without an answer"
    if reason is not None:
        if out.kind == "synthesis":
            return _review_failed(runner, act, reason)
        return runner.fail(act, reason)
    if out.kind == "specialist":
        reply, _ = out.value
        if act.repo is not None and reply.outside:
            return _deny_outside(runner, act, reply.outside)
        if act.repo is not None and reply.edits:
            try:
                llmagent.apply_edits(act.attempt.workdir, act.repo.name, reply.edits)
            except CoordinatorError as e:
                return runner.fail(act, f"edits refused: {e}")
            except (OSError, ValueError) as e:  # a name too long, a full disk: the copy is dropped
                return runner.fail(act, f"edits could not be written: {_one_line(str(e), 200)}")
        result = results.Result(outcome=reply.outcome, summary=reply.summary, agent=reply.agent,
                                blocker=reply.blocker)
        return runner.conclude(act, result)
    plan, _ = out.value
    file_plan(runner, act, plan)


def _deny_outside(runner: AttemptRunner, act: Active, outside: Iterable[llmagent.Edit]) -> None:
    """Edits outside the order's files or the agent's writes: nothing is applied and the order
    is denied with each path and a `scope` signal, as the gate denies a command's change."""
    assert act.repo is not None
    prefix = act.repo.name + "/"
    offending: list[tuple[gate.Change, str]] = []
    for edit in outside:
        rel = edit.path[len(prefix):]
        exists = os.path.lexists(act.attempt.workdir / rel)
        what = "deleted" if edit.content is None else "modified" if exists else "added"
        change = gate.Change(rel, what, detail="asked for by the model; not applied")
        # The gate's own words, so a model's denial reads like a command's.
        why = gate.outside(edit.path, act.order.files, act.agent.writes) or "outside its permission"
        offending.append((change, why))
    act.verdict = gate.Verdict(changes=tuple(c for c, _ in offending), offending=tuple(offending))
    runner._deny(act, act.verdict)


def file_plan(runner: AttemptRunner, act: Active, plan: llmagent.Plan) -> None:
    """File the plan's orders as children of the request; done when there are none left."""
    sup, rec = runner.sup, act.rec
    running = rec.running if rec.running is not None else {}
    rounds = int(running.get("rounds", 0)) + 1
    if plan.orders and rounds > MAX_ROUNDS:
        runner._finish(act)
        reason = (f"{act.agent.name} still files orders after {MAX_ROUNDS} rounds of planning and review; "
                  f"stopped here: split the request, or `coordinator retry {rec.id}`")
        rec.failures.append(reason)
        return runner.block(rec, reason)
    filed: list[str] = []
    named: dict[str, str] = {}  # id the model gave -> id the order was filed under
    for raw in _dependency_order(plan.orders):
        waits = [named.get(d, d) for d in raw.get("blocked_by") or ()]
        body = {k: v for k, v in raw.items() if k != "id"}  # a name in the plan; filed under its own id
        try:
            order = to_order({**body, "blocked_by": waits} if waits else body, act.agent.name, parent=rec.id)
        except OrderError as e:
            sup.say(f"{rec.id}: a planned order failed validation after all: {e}")
            continue
        child = sup.file_order(order, shown=f"plan of {rec.id}")
        if isinstance(raw.get("id"), str):
            named[raw["id"]] = child.id
        filed.append(child.id)
        rec.children.append(child.id)
    rec.report = {"summary": plan.summary, "children": list(rec.children)}
    if not plan.orders:
        return _verify(runner, act, plan.summary)
    running["rounds"] = rounds
    rec.running = running
    # The request holds no working copy while its children run: they have their own.
    runner._cleanup(act)
    sup.event(rec, f"planned {len(plan.orders)} order(s): {', '.join(filed) or 'none filed'}")
    act.phase = "children"
    runner.active.pop(act.token, None)
    runner.waiting_requests[rec.id] = act


def _verify(runner: AttemptRunner, act: Active, summary: str) -> None:
    """No more orders: the request's own acceptance checks decide, run as for a command
    orchestrator's request (on a throw-away copy of the default branch, children's work merged);
    a failing check fails the attempt. With no checks the request is done at once."""
    sup, rec = runner.sup, act.rec
    act.result = results.Result(outcome="done", summary=summary)
    act.checks = list(act.order.checks)
    if not act.checks:
        runner._finish(act)
        sup.move(rec, "done", act.agent.name, note="no more orders to send")
        return None
    try:
        if act.repo is not None:
            # After a round of planning the copy was dropped; the first plan may still hold one.
            act.repo.remove_worktree(rec.id, act.attempt.workdir, keep=False)
            act.repo.add_worktree(rec.id, act.attempt.workdir)
        else:
            act.attempt.workdir.mkdir(parents=True, exist_ok=True)
    except (CoordinatorError, OSError) as e:
        return runner.fail(act, f"could not prepare a working copy for the checks: {e}")
    act.rules = Ruleset(writable=tuple(sorted({str(act.attempt.folder), str(act.attempt.workdir)})))
    act.phase = "check"
    act.check_index = 0
    act.deadline = sup.clock() + _timeout(act)
    act.timed_out = False
    runner.active[act.token] = act
    sup.event(rec, f"no more orders to send; running its {len(act.checks)} check(s)")
    runner._start_check(act)
    return None


def _review_failed(runner: AttemptRunner, act: Active, reason: str) -> None:
    """A failed review is asked again, never re-planned: the children's work is already done."""
    rec = act.rec
    rec.failures.append(reason)
    if len(rec.failures) >= act.agent.max_failures:
        runner._finish(act)
        return runner.block(rec, f"failed {len(rec.failures)} time(s); last: {reason}")
    runner.sup.event(rec, f"review failed, asking again: {_one_line(reason, 160)}")
    act.phase = "children"
    runner.active.pop(act.token, None)
    runner.waiting_requests[rec.id] = act


def check_requests(runner: AttemptRunner) -> bool:
    """Start the review of every request whose children have all ended."""
    progress = False
    for rid, act in list(runner.waiting_requests.items()):
        recs = runner.sup.records
        if act.rec.status != "running":  # cancelled while its children ran
            del runner.waiting_requests[rid]
            continue
        if not all(last.terminal for c in act.rec.children if (last := route_end(recs, c)) is not None):
            continue
        del runner.waiting_requests[rid]
        progress = True
        if act.agent.llm is None:
            runner.children_ended(act)
        else:
            start_synthesis(runner, act)
    return progress


def start_synthesis(runner: AttemptRunner, act: Active) -> None:
    """Ask the orchestrator model again, with the children's reports."""
    sup, agent = runner.sup, act.agent
    client = new_client(runner, act)
    reports, shown = children_reports(runner, act.rec.children)
    context = orchestrator_context(runner, current=act.rec.id, skip_reports=shown)
    roster = llmagent.roster_text(sup.config, agent.name)
    validate = order_validator(runner, agent, request=act.rec.id)
    brief = model_brief(act.attempt.brief.read_text("utf-8"))
    out = Outcome("synthesis", client, ledger_text=context + reports)
    # The review is a new piece of work: the request's timeout counts from now, not from its plan.
    act.phase = "specialist"
    act.started = sup.clock()
    act.deadline = act.started + _timeout(act)
    act.timed_out = False

    def ask() -> Any:
        return llmagent.synthesize(client, context, roster, brief, reports, validate=validate)

    runner.active[act.token] = act
    _launch(act, out, ask, f"llm-{act.token}-review", runner.sup.wake, left=act.deadline - sup.clock())


def children_reports(runner: AttemptRunner, children: Iterable[str]) -> tuple[str, set[str]]:
    """The reports the review is given: each child's and, when it was routed, the report of the
    order its route ended in (the work was done there, and the request waited for it); and the
    ids whose reports these are."""
    sup = runner.sup
    parts: list[str] = []
    shown: set[str] = set()

    def report(order_id: str) -> str | None:
        path = sup.store.folder(order_id) / "report.md"
        try:
            return path.read_text("utf-8", errors="replace") if path.exists() else None
        except OSError:
            return None

    for c in children:
        end = route_end(sup.records, c)
        own = report(c)
        if own is not None:
            parts.append(own)
            shown.add(c)
        if end is not None and end.id != c:
            last = report(end.id)
            head = f"{c} was routed; its route ended in {end.id} ({end.to}, {end.status})"
            parts.append(f"{head}. Report of {end.id}:\n\n{last}" if last is not None
                         else f"{head}; it has no report.")
            shown.add(end.id)
    return "\n\n".join(parts), shown


def _timeout(act: Active) -> float:
    if act.order.timeout:
        try:
            return parse_duration(act.order.timeout)
        except ValueError:
            pass  # intake refuses a bad timeout; the agent's applies to anything that slipped by
    return act.agent.timeout


# -- orders from a model ------------------------------------------------------------------------------


def to_order(raw: dict[str, Any], sender: str, *, parent: str | None) -> orders.WorkOrder:
    """A planned order as if dropped in the recipient's inbox by the orchestrator."""
    body = {k: v for k, v in raw.items() if k not in ("to", "parent")}
    body["from"] = sender
    to = str(raw.get("to"))
    order = orders.parse(json.dumps(body).encode(), path=f"order for {to}.json", to=to)
    return dataclasses.replace(order, sender=sender, parent=parent)


def order_validator(runner: AttemptRunner, agent: Agent, *,
                    request: str | None = None) -> llmagent.PlanValidator:
    """The rules of a dropped file, for the worker thread: against a snapshot of the history,
    where the plan's other orders count as filed (so one may wait on another). An order of the
    plan for `request` may not wait on that request or on any request above it still running:
    each of them ends only after its children, so both would wait forever."""
    sup = runner.sup
    # The loop keeps changing sup.records; the worker must not iterate them meanwhile.
    history = History(dict(sup.records), sup.store)
    config = sup.config
    above: dict[str, str] = {}  # id -> how it stands to the request
    here, depth = request, 0
    while here is not None and here not in above and depth < 1000:
        ancestor = history.records.get(here)
        if ancestor is None or ancestor.terminal:
            break
        above[here] = "the request this plan is for" if here == request else "a request above this one"
        here, depth = ancestor.parent, depth + 1

    def validate(raw: dict[str, Any], siblings: dict[str, tuple[str, ...]]) -> list[str]:
        to = raw.get("to")
        if not isinstance(to, str) or to not in agent.sends_to:
            return [f"to: {to!r} is not an agent you may send to; send to one of "
                    f"{', '.join(agent.sends_to) or 'nobody'}"]
        try:
            order = to_order(raw, agent.name, parent=None)
        except OrderError as e:
            return [f"{p.field}: {p.message}" if p.field else p.message for p in e.problems]
        waits = [f"blocked_by.{i}: {dep!r} is {above[dep]}, which ends only after this order; "
                 "it would wait forever: leave it out of blocked_by"
                 for i, dep in enumerate(order.blocked_by) if dep in above and dep not in siblings]
        return waits + [f"{p.field}: {p.message}" if p.field else p.message
                        for p in orders.check(order, config, _WithPlan(history, siblings, own=order.id))]

    return validate


class _WithPlan:
    """The workspace's orders plus the other orders of the plan being checked (orders.History).

    An id in a plan is a name within the plan: the order is filed under an id of its own,
    so the name may repeat one used in the workspace, and names the sibling when waited on."""

    def __init__(self, history: orders.History, siblings: dict[str, tuple[str, ...]], *,
                 own: str | None) -> None:
        self.history, self.siblings, self.own = history, siblings, own

    def exists(self, order_id: str) -> bool:
        if order_id in self.siblings:
            return True
        return order_id != self.own and self.history.exists(order_id)

    def waiting(self, order_id: str) -> str | None:
        return None if order_id in self.siblings else self.history.waiting(order_id)

    def blocked_by_of(self, order_id: str) -> tuple[str, ...]:
        return self.siblings[order_id] if order_id in self.siblings else self.history.blocked_by_of(order_id)

    def ended(self, sender: str, to: str, objective: str) -> list[tuple[str, str]]:
        return self.history.ended(sender, to, objective)


def _dependency_order(planned: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """The plan's orders with each one after the orders of the plan it waits on (the plan was
    checked: no cycles), otherwise in the order the model gave."""
    by_id = {o["id"]: o for o in planned if isinstance(o.get("id"), str)}
    out: list[dict[str, Any]] = []
    placed: set[int] = set()

    def place(order: dict[str, Any], depth: int = 0) -> None:
        if id(order) in placed or depth > len(planned):
            return
        for dep in order.get("blocked_by") or ():
            if dep in by_id and by_id[dep] is not order:
                place(by_id[dep], depth + 1)
        if id(order) not in placed:
            placed.add(id(order))
            out.append(order)

    for order in planned:
        place(order)
    return out


# -- what the model is sent ---------------------------------------------------------------------------


def current_files(act: Active) -> tuple[dict[str, str | None], dict[str, llmagent.Unseen]]:
    """The current text of the order's files for the model (None: not there yet), bounded; and
    each file not sent whole (too large, over the total, past the glob's count, not UTF-8
    text) with why: the model is told, and an edit of one is refused."""
    out: dict[str, str | None] = {}
    unseen: dict[str, llmagent.Unseen] = {}
    if act.repo is None:
        return out, unseen
    root = act.attempt.workdir
    total = 0
    for entry in act.order.files:
        rel = entry.split("/", 1)[1] if "/" in entry else ""
        if paths.has_glob(rel):
            found = [p for p in sorted(root.glob(rel)) if p.is_file() and not p.is_symlink()
                     and ".git" not in p.relative_to(root).parts]
            targets = found[:MAX_GLOB_FILES]
            for path in found[MAX_GLOB_FILES:]:
                unseen.setdefault(f"{act.repo.name}/{path.relative_to(root).as_posix()}", llmagent.Unseen(
                    f"not sent: {entry} matches more than {MAX_GLOB_FILES} files"))
        else:
            targets = [root / rel]
        for path in targets:
            key = f"{act.repo.name}/{path.relative_to(root).as_posix()}"
            if key in out or key in unseen:
                continue
            if not path.is_file() or path.is_symlink():
                out[key] = None
                continue
            text, why = _file_text(path)
            if why is not None:
                unseen[key] = why
            elif total + len(text) > MAX_TOTAL_CHARS:
                unseen[key] = llmagent.Unseen(f"not sent: the order's files pass {MAX_TOTAL_CHARS} "
                                              "characters in all")
            else:
                total += len(text)
                out[key] = text
    return out, unseen


def _file_text(path: Path) -> tuple[str, llmagent.Unseen | None]:
    """A file's whole text, or why it cannot be sent whole (with its start, when that helps)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            # A character is at most 4 bytes: more than this many bytes is too many characters.
            data = f.read(MAX_FILE_CHARS * 4 + 1)
    except OSError as e:
        return "", llmagent.Unseen(f"not sent: it cannot be read ({e.strerror})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if size <= MAX_FILE_CHARS * 4:
            return "", llmagent.Unseen("not sent: it is not UTF-8 text")
        text = data.decode("utf-8", "ignore")  # a character cut at the end of what was read
    if size > MAX_FILE_CHARS * 4 or len(text) > MAX_FILE_CHARS:
        return "", llmagent.Unseen(f"too large: only its first {MAX_FILE_CHARS} characters (of "
                                   f"{size} bytes) are shown", start=text[:MAX_FILE_CHARS])
    return text, None


def orchestrator_context(runner: AttemptRunner, *, current: str | None = None,
                         skip_reports: Iterable[str] = ()) -> str:
    """What the orchestrator model is sent as context: exactly its ledger's items, so rotation
    shrinks it. `current` is the request being worked on (sent separately); `skip_reports`
    are reports sent separately for review."""
    sup = runner.sup
    skip = set(skip_reports)
    # An order whose report or rejection is in context needs no line of its own.
    reported = {i.ref for i in sup.ledger.items if i.kind in ("report", "rejection")}
    parts: list[str] = []
    for item in sup.ledger.items:
        rec = sup.records.get(item.ref)
        if item.kind == "brief" and item.ref == budget.BRIEF_REF:
            path = budget.brief_path(sup.ws.state)
            parts.append(path.read_text("utf-8") if path.exists() else item.note)
        elif item.kind == "brief":  # the conversation of a request
            if rec is not None and rec.id != current:
                summary = (sup.store.with_detail(rec).report or {}).get("summary", "")
                parts.append(f"- request {rec.id} [{rec.status}]: {rec.objective}"
                             + (f" -> {_one_line(str(summary))}" if summary else ""))
        elif rec is None:
            if item.note:
                parts.append(f"- {item.note}")
        elif item.kind == "report":
            report = sup.store.folder(rec.id) / "report.md"
            if rec.id not in skip and report.exists():
                parts.append(report.read_text("utf-8"))
        elif item.kind == "rejection":
            parts.append(f"- {rec.id} to {rec.to} was rejected: {'; '.join(sup.store.with_detail(rec).errors)}")
        elif item.ref not in reported:
            parts.append(f"- {rec.id} to {rec.to} [{rec.status}]: {rec.objective}")
    return "\n".join(parts)


# -- usage ----------------------------------------------------------------------------------------------


def record_usage(runner: AttemptRunner, act: Active, out: Outcome) -> None:
    """Each call with the order (for `coordinator cost`); the orchestrator's in its budget."""
    sup, rec = runner.sup, act.rec
    sup.whole(rec)  # it may have been cancelled (ended, written) while the model thought
    calls = out.client.calls
    runner_meter = meter_for(runner)
    for call in calls:
        rec.usage.append({**call.as_dict(), "agent": act.agent.name, "attempt": act.attempt.number})
    _log_conversation(act, out, calls)
    if calls:
        sup.store.save(rec, sync=False)
        sup.audit.stage(audit.SUPERVISOR, f"{rec.id} {rec.to}: {len(calls)} model call(s), "
                        f"${sum(c.cost for c in calls):.4f}")
    runner_meter.settle(out.client)
    if act.agent.is_orchestrator and act.agent.name == sup.config.orchestrator:
        _budget_usage(runner, rec, out, calls)


def _budget_usage(runner: AttemptRunner, rec: Record, out: Outcome, calls: tuple[Call, ...]) -> None:
    """The request's conversation as the model counted it, minus what the ledger already holds.

    The model keeps nothing between calls: what sits in its context is the last prompt (the
    ledger's items, the team, the request, any re-asks) and its answer. The ledger counts its
    own items already, so the request's item is the rest, and replaces the one of its last call.
    """
    answered = [c for c in calls if c.usage is not None]
    if not answered:
        return
    usage = answered[-1].usage
    assert usage is not None
    held = budget.estimate_tokens(out.ledger_text)
    tokens = max(0, usage.prompt_tokens - held) + usage.completion_tokens
    sup = runner.sup
    sup.ledger.items = [i for i in sup.ledger.items
                        if not (i.ref == rec.id and i.kind == "brief" and i.note.startswith(USAGE_NOTE))]
    sup.ledger.add(rec.id, "brief", tokens=tokens, now=datetime.now(UTC),
                   note=f"{USAGE_NOTE} of {rec.id}: {len(calls)} call(s), {usage.prompt_tokens} prompt + "
                        f"{usage.completion_tokens} completion tokens reported")
    change = sup.ledger.update_mode(sup.config.budget.bands)
    sup.ledger.save()
    if change:
        sup.say("budget: " + budget.mode_change_message(rec.to, change[0], change[1],
                                                          sup.ledger.hot_tokens()))


def _log_conversation(act: Active, out: Outcome, calls: tuple[Call, ...]) -> None:
    """Calls and replies into the attempt's output.log, as a command's output would be."""
    lines = [f"model call {c.model} at {c.base_url}: {c.error or f'HTTP {c.status}'}"
             + (f", {c.usage.prompt_tokens}+{c.usage.completion_tokens} tokens" if c.usage else "")
             + f", {c.latency:.2f}s, ${c.cost:.4f}"
             for c in calls]
    for n, text in enumerate(out.replies, 1):
        lines.append(f"--- reply {n} ({out.kind})\n{out.client.redact(text, LOG_REPLY_CHARS)}")
    if out.error is not None:
        lines.append(f"--- failed: {out.error}")
    if lines:
        # backslashreplace: a lone surrogate a model sent is logged as its escape, not a crash.
        with open(act.attempt.log, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write("\n".join(lines) + "\n")


def _one_line(text: str, n: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"
