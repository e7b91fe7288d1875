"""Attempts of agents with `llm:`: the supervisor itself talks to the model (SPEC §11).

The HTTP conversation runs in a worker thread (the loop never blocks on a
model); everything after it (edits, gate, checks, commit, filing orders,
statuses) happens back in the loop thread.

A specialist's reply edits the working copy, then the usual gate and checks
decide. An orchestrator's request is decomposed into child orders (`parent` =
the request); the request stays `running` until its children end, then the
model is asked once more with their reports: more orders, or the request is
`done` with the synthesis as its report.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import audit, budget, costs, llmagent, orders, paths, results
from .config import Agent
from .errors import CoordinatorError, LLMAuthError, LLMError, OrderError
from .llm import Client, SpendLimitReached

if TYPE_CHECKING:
    from .attempts import Active, AttemptRunner

MAX_FILE_CHARS = 60_000      # per file sent to a specialist model
MAX_TOTAL_CHARS = 240_000    # all files of one order
MAX_GLOB_FILES = 40


@dataclass
class Outcome:
    kind: str  # "specialist" | "plan" | "synthesis"
    value: Any = None
    error: CoordinatorError | None = None


_clients: dict[tuple[int, str], Client] = {}


def client_for(runner: AttemptRunner, agent: Agent) -> Client:
    """One client per agent (it remembers endpoints that refuse response_format)."""
    key = (id(runner), agent.name)
    if key not in _clients:
        assert agent.llm is not None
        _clients[key] = Client(agent.llm, transport=runner.sup.http_transport,
                               spend_guard=spend_guard(runner, agent))
    return _clients[key]


def spend_guard(runner: AttemptRunner, agent: Agent) -> Any:
    """The circuit breaker: no call once the agent or the workspace reached its spend limit."""
    sup = runner.sup
    base_agent = costs.spent(sup.records.values(), agent.name)
    base_all = costs.spent(sup.records.values())
    started_at: list[float] = []

    def guard() -> str | None:
        client = _clients.get((id(runner), agent.name))
        extra = client.spent if client else 0.0
        if not started_at:
            started_at.append(extra)
        new = extra - started_at[0]
        if agent.spend_limit is not None and base_agent + new >= agent.spend_limit:
            return f"spend limit reached: {agent.name} spent ${base_agent + new:.4f} of ${agent.spend_limit:.2f}"
        limit = sup.config.spend_limit
        if limit is not None and base_all + new >= limit:
            return f"spend limit reached: the workspace spent ${base_all + new:.4f} of ${limit:.2f}"
        return None

    return guard


def start_llm_attempt(runner: AttemptRunner, act: Active) -> None:
    agent = act.agent
    client = client_for(runner, agent)
    before = len(client.calls)
    act.thread_outcome = Outcome("plan" if agent.is_orchestrator else "specialist")
    brief = act.attempt.brief.read_text("utf-8")
    if agent.is_orchestrator:
        context = orchestrator_context(runner)
        roster = llmagent.roster_text(runner.sup.config, agent.name)
        validate = order_validator(runner, agent)

        def work() -> None:
            try:
                act.thread_outcome.value = llmagent.plan(client, context, roster, brief, validate=validate)
            except CoordinatorError as e:
                act.thread_outcome.error = e
    else:
        files = current_files(act)
        order = act.order

        def allowed(path: str) -> bool:
            return paths.matches_any(order.files, path) and paths.matches_any(agent.writes, path)

        outcomes = {"done", "blocked"} | {
            f"{b.action}-{b.agent}" if b.agent else b.action for b in order.branching}

        def work() -> None:
            try:
                act.thread_outcome.value = llmagent.run_specialist(client, brief, files, allowed=allowed,
                                                                   outcomes_allowed=outcomes)
            except CoordinatorError as e:
                act.thread_outcome.error = e

    act.thread_outcome.calls_before = before  # type: ignore[attr-defined]
    act.thread = threading.Thread(target=work, daemon=True, name=f"llm-{act.token}")
    act.thread.start()


def finish_llm_attempt(runner: AttemptRunner, act: Active) -> None:
    out: Outcome = act.thread_outcome
    client = client_for(runner, act.agent)
    record_usage(runner, act, client.calls[getattr(out, "calls_before", 0):])
    if act.cancelled:
        return runner._end_cancelled(act)
    if out.error is not None:
        if isinstance(out.error, SpendLimitReached | LLMAuthError):
            runner._finish(act)
            act.rec.failures.append(str(out.error))
            return runner.block(act.rec, str(out.error))
        return runner.fail(act, f"{act.agent.name}'s model failed: {out.error}")
    if out.kind == "specialist":
        reply, _ = out.value
        if act.repo is not None and reply.edits:
            try:
                llmagent.apply_edits(act.attempt.workdir, act.repo.name, reply.edits)
            except LLMError as e:
                return runner.fail(act, f"edits refused: {e}")
        result = results.Result(outcome=reply.outcome, summary=reply.summary, agent=reply.agent,
                                blocker=reply.blocker)
        return runner.conclude(act, result)
    plan, _ = out.value
    file_plan(runner, act, plan)


def file_plan(runner: AttemptRunner, act: Active, plan: llmagent.Plan) -> None:
    """File the plan's orders as children of the request; done when there are none left."""
    sup, rec = runner.sup, act.rec
    for raw in plan.orders:
        try:
            order = to_order(raw, act.agent.name, parent=rec.id)
        except OrderError as e:
            sup.say(f"{rec.id}: a planned order failed validation after all: {e}")
            continue
        child = sup.file_order(order, shown=f"plan of {rec.id}")
        rec.children.append(child.id)
    rec.report = {"summary": plan.summary, "children": list(rec.children)}
    if not plan.orders:
        runner._finish(act)
        sup.ledger.complete(rec.id)
        sup.ledger.save()
        sup.move(rec, "done", act.agent.name, note="synthesis: no more orders")
        return
    sup.event(rec, f"planned {len(plan.orders)} order(s): {', '.join(rec.children[-len(plan.orders):])}")
    act.phase = "children"
    runner.active.pop(act.token, None)
    runner.waiting_requests[rec.id] = act


def check_requests(runner: AttemptRunner) -> bool:
    """Start the synthesis of every request whose children have all ended."""
    progress = False
    for rid, act in list(runner.waiting_requests.items()):
        recs = runner.sup.records
        if act.rec.status != "running":
            del runner.waiting_requests[rid]
            continue
        if not all(recs[c].terminal for c in act.rec.children if c in recs):
            continue
        del runner.waiting_requests[rid]
        progress = True
        if act.agent.llm is None:
            runner.children_ended(act)
        else:
            start_synthesis(runner, act)
    return progress


def start_synthesis(runner: AttemptRunner, act: Active) -> None:
    agent = act.agent
    client = client_for(runner, agent)
    before = len(client.calls)
    context = orchestrator_context(runner)
    roster = llmagent.roster_text(runner.sup.config, agent.name)
    validate = order_validator(runner, agent)
    reports = "\n\n".join(
        (runner.sup.store.folder(c) / "report.md").read_text("utf-8")
        for c in act.rec.children if (runner.sup.store.folder(c) / "report.md").exists())
    brief = act.attempt.brief.read_text("utf-8")
    act.thread_outcome = Outcome("synthesis")
    act.thread_outcome.calls_before = before  # type: ignore[attr-defined]
    act.phase = "specialist"

    def work() -> None:
        try:
            act.thread_outcome.value = llmagent.synthesize(client, context, roster, brief, reports,
                                                           validate=validate)
        except CoordinatorError as e:
            act.thread_outcome.error = e

    runner.active[act.token] = act
    act.thread = threading.Thread(target=work, daemon=True, name=f"llm-{act.token}-synthesis")
    act.thread.start()


def to_order(raw: dict[str, Any], sender: str, *, parent: str | None) -> orders.WorkOrder:
    body = {k: v for k, v in raw.items() if k != "to"}
    body["from"] = sender
    import json

    order = orders.parse(json.dumps(body).encode(), path=f"order for {raw.get('to')}.json", to=str(raw.get("to")))
    return dataclasses.replace(order, sender=sender, parent=parent)


def order_validator(runner: AttemptRunner, agent: Agent) -> Any:
    sup = runner.sup

    def validate(raw: dict[str, Any]) -> list[str]:
        to = raw.get("to")
        if not isinstance(to, str) or to not in sup.config.agents:
            return [f"to: {to!r} is not an agent; agents: {', '.join(agent.sends_to)}"]
        try:
            order = to_order(raw, agent.name, parent=None)
        except OrderError as e:
            return [f"{p.field}: {p.message}" if p.field else p.message for p in e.problems]
        return [f"{p.field}: {p.message}" if p.field else p.message
                for p in orders.check(order, sup.config, sup.history)]

    return validate


def current_files(act: Active) -> dict[str, str | None]:
    """The current text of the order's files, bounded, for the model."""
    out: dict[str, str | None] = {}
    if act.repo is None:
        return out
    root = act.attempt.workdir
    total = 0
    for entry in act.order.files:
        rel = entry.split("/", 1)[1] if "/" in entry else ""
        targets = sorted(root.glob(rel))[:MAX_GLOB_FILES] if paths.has_glob(rel) else [root / rel]
        for path in targets:
            key = f"{act.repo.name}/{path.relative_to(root).as_posix()}"
            if not path.is_file() or path.is_symlink():
                out.setdefault(key, None)
                continue
            text = path.read_text("utf-8", "replace")[:MAX_FILE_CHARS]
            if total + len(text) > MAX_TOTAL_CHARS:
                break
            total += len(text)
            out[key] = text
    return out


def orchestrator_context(runner: AttemptRunner) -> str:
    """What the orchestrator model is sent: exactly its ledger's items, so rotation shrinks it."""
    sup = runner.sup
    parts: list[str] = []
    for item in sup.ledger.items:
        if item.kind == "brief":
            path = sup.ws.state / "orchestrator" / "brief.md"
            parts.append(path.read_text("utf-8") if path.exists() else item.note)
        elif item.ref in sup.records:
            rec = sup.records[item.ref]
            report = sup.store.folder(rec.id) / "report.md"
            if item.kind == "report" and report.exists():
                parts.append(report.read_text("utf-8"))
            else:
                parts.append(f"- {rec.id} to {rec.to} [{rec.status}]: {rec.objective}")
        elif item.note:
            parts.append(f"- {item.note}")
    return "\n".join(parts)


def record_usage(runner: AttemptRunner, act: Active, calls: tuple[Any, ...]) -> None:
    sup, rec = runner.sup, act.rec
    for call in calls:
        rec.usage.append({**call.as_dict(), "agent": act.agent.name, "attempt": act.attempt.number})
    if not calls:
        return
    sup.store.save(rec, sync=False)
    if act.agent.is_orchestrator and act.agent.name == sup.config.orchestrator:
        tokens = sum(c.usage.total for c in calls if c.usage is not None)
        if tokens:
            sup.ledger.add(rec.id, "brief", "", tokens=tokens, note=f"{len(calls)} model call(s) for {rec.id}",
                           now=datetime.now(UTC))
            sup.ledger.save()
            change = sup.ledger.update_mode(sup.config.budget.bands)
            if change:
                sup.say("budget: " + budget.mode_change_message(act.agent.name, change[0], change[1],
                                                                  sup.ledger.hot_tokens()))
                sup.ledger.save()
    sup.audit.stage(audit.SUPERVISOR, f"{rec.id} {rec.to}: {len(calls)} model call(s), "
                    f"${sum(c.cost for c in calls):.4f}")
