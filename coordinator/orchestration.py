"""The orchestrator side of agents with `llm:`: a request decomposed into child orders (SPEC §11).

The model's plan is filed as child orders (`parent` = the request), each one
checked first by the rules of a dropped file; the request stays `running` until
its children end, then the model is asked once more with their reports: more
orders, or no more, and the request's own acceptance checks decide whether it
is `done` with the synthesis as its report. What the orchestrator model is sent
as context is exactly its budget ledger's items.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import budget, llmagent, orders, outbox, results
from .config import Agent, parse_duration
from .conversation import Outcome, launch, model_brief, new_client, one_line
from .errors import CoordinatorError, OrderError
from .landlock import Ruleset
from .store import History, route_end

if TYPE_CHECKING:
    from .attempts import Active, AttemptRunner

MAX_ROUNDS = 4               # plan + reviews that may still file orders; then the request is blocked
MAX_QUOTED_BYTES = 1 << 20   # of one file of state/ (the brief, a report) quoted in the model's context


# -- plans and reviews --------------------------------------------------------------------------------


def blocked_at_chain_end(runner: AttemptRunner, act: Active) -> bool:
    """A request at the end of a chain (`outbox.chain_problem`) can file no order: it is blocked,
    saying why, before its model is asked. Asked first, the model was paid (money, tokens, hot
    tokens) for a plan that was then thrown away. False (nothing done) when it is not so."""
    rec = act.rec
    chained = outbox.chain_problem(runner.sup.records, rec)
    if chained is None:
        return False
    runner._finish(act)
    reason = (f"{act.agent.name}'s model was not asked for a plan: no order it planned could be filed: "
              f"{chained}; a retry would end the same: send the request again yourself if it is still wanted")
    runner.sup.say(f"{rec.id}: {reason}")
    rec.failures.append(reason)
    runner.block(rec, reason)
    return True


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
    chained = outbox.chain_problem(sup.records, rec) if plan.orders else None
    if chained is not None:
        runner._finish(act)
        reason = (f"the {len(plan.orders)} order(s) {act.agent.name} planned are not filed: {chained}; a retry "
                  "would end the same: send the request again yourself if it is still wanted")
        sup.say(f"{rec.id}: {reason}")
        rec.failures.append(reason)
        return runner.block(rec, reason)
    filed: list[str] = []
    named: dict[str, str] = {}  # id the model gave -> id the order was filed under
    for raw in _dependency_order(plan.orders):
        waits = [named.get(d, d) for d in raw.get("blocked_by") or ()]
        body = {k: v for k, v in raw.items() if k != "id"}  # a name in the plan; filed under its own id
        if "priority" not in raw:
            # The children are the request's work: an urgent request's must not wait behind
            # normal work (SPEC §5: highest priority first). A priority the plan gives stands.
            body["priority"] = act.order.priority
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
    act.deadline = runner.timer() + _timeout(act)
    act.timed_out = False
    runner.active[act.token] = act
    sup.event(rec, f"no more orders to send; running its {len(act.checks)} check(s)")
    runner._start_check(act)
    return None


def review_failed(runner: AttemptRunner, act: Active, reason: str) -> None:
    """A failed review is asked again, never re-planned: the children's work is already done."""
    rec = act.rec
    rec.failures.append(reason)
    if len(rec.failures) >= act.agent.max_failures:
        runner._finish(act)
        return runner.block(rec, f"failed {len(rec.failures)} time(s); last: {reason}")
    runner.sup.event(rec, f"review failed, asking again: {one_line(reason, 160)}")
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
    parts = children_reports(runner, act.rec.children)
    reports, shown = "\n\n".join(p for _, p in parts), {i for i, _ in parts}
    context = orchestrator_context(runner, current=act.rec.id, skip_reports=shown)
    roster = llmagent.roster_text(sup.config, agent.name)
    validate = order_validator(runner, agent, request=act.rec.id)
    brief = model_brief(act.attempt.brief.read_text("utf-8"))
    # Only the reports the ledger still holds are counted there: one a rotation dropped, or the
    # report of the order a child was routed on to (delivered to the child's agent), is counted
    # with the conversation, or the hot tokens would be under what the model was just sent.
    held = {i.ref for i in sup.ledger.items if i.kind == "report"}
    out = Outcome("synthesis", client,
                  ledger_text=context + "\n\n".join(p for i, p in parts if i in held))
    # The review is a new piece of work: the request's timeout counts from now, not from its plan.
    act.phase = "specialist"
    act.started = sup.clock()
    act.began = act.quiet_since = act.looked = runner.timer()
    act.deadline = act.began + _timeout(act)
    act.timed_out = False

    def ask() -> Any:
        return llmagent.synthesize(client, context, roster, brief, reports, validate=validate)

    runner.active[act.token] = act
    launch(act, out, ask, f"llm-{act.token}-review", runner.sup.wake, left=act.deadline - runner.timer())


def children_reports(runner: AttemptRunner, children: Iterable[str]) -> list[tuple[str, str]]:
    """The reports the review is given, each as (the id whose report it is, its text): each
    child's and, when it was routed, the report of the order its route ended in (the work was
    done there, and the request waited for it)."""
    sup = runner.sup
    parts: list[tuple[str, str]] = []

    def report(order_id: str) -> str | None:
        return _quoted(sup.store.folder(order_id) / "report.md")

    for c in children:
        end = route_end(sup.records, c)
        own = report(c)
        if own is not None:
            parts.append((c, own))
        if end is not None and end.id != c:
            last = report(end.id)
            head = f"{c} was routed; its route ended in {end.id} ({end.to}, {end.status})"
            parts.append((end.id, f"{head}. Report of {end.id}:\n\n{last}" if last is not None
                          else f"{head}; it has no report."))
    return parts


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
                        for p in orders.check(order, config, _WithPlan(history, siblings, own=order.id),
                                               repos=sup.ws.repos)]

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

    def same_id(self, order_id: str) -> str | None:
        return None  # a name within the plan: never a folder's name

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
            text = _quoted(budget.brief_path(sup.ws.state))
            parts.append(text if text is not None else item.note)
        elif item.kind == "brief":  # the conversation of a request
            if rec is not None and rec.id != current:
                summary = (sup.store.with_detail(rec).report or {}).get("summary", "")
                parts.append(f"- request {rec.id} [{rec.status}]: {rec.objective}"
                             + (f" -> {one_line(str(summary))}" if summary else ""))
        elif rec is None:
            if item.note:
                parts.append(f"- {item.note}")
        elif item.kind == "report":
            report = _quoted(sup.store.folder(rec.id) / "report.md") if rec.id not in skip else None
            if report is not None:
                parts.append(report)
        elif item.kind == "rejection":
            parts.append(f"- {rec.id} to {rec.to} was rejected: {'; '.join(sup.store.with_detail(rec).errors)}")
        elif item.ref not in reported:
            parts.append(f"- {rec.id} to {rec.to} [{rec.status}]: {rec.objective}")
    return "\n".join(parts)


def _quoted(path: Path) -> str | None:
    """A file of state/ the context quotes, None when there is none (or it cannot be read): a
    hand edit that left bytes that are no UTF-8 is shown with U+FFFD (it once stopped the
    supervisor), and a file past MAX_QUOTED_BYTES is cut, never read whole into a prompt."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_QUOTED_BYTES + 1)
    except OSError:
        return None
    text = data[:MAX_QUOTED_BYTES].decode("utf-8", errors="replace")
    return text if len(data) <= MAX_QUOTED_BYTES else f"{text}\n… (cut at {MAX_QUOTED_BYTES:,} bytes)"
