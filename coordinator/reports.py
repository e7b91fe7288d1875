"""Reports: what an order's sender gets when it ends, and the brief a fresh orchestrator starts from."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from . import budget
from .store import Record, dependency_done, route_end

# A report delivered to the orchestrator is counted in its hot tokens (SPEC §8): what one
# specialist did must not fill that context. Each list keeps its first entries and says how
# many more there are; `coordinator show ID` has them all (the record keeps every one).
MAX_LISTED = 20
MAX_SUMMARY = 4000  # characters, some 1,000 tokens: a paragraph, not a whole review


def render(rec: Record, records: dict[str, Record] | None = None) -> str:
    """The report's Markdown. With `records`, the orders it sent say how each ended."""
    report = rec.report or {}
    lines = [f"# Report on {rec.id}: {rec.status}", "", f"**Objective:** {rec.objective}", "",
             f"**Status:** {rec.status} after {rec.attempts} attempt(s)", ""]
    if report.get("summary"):
        summary = str(report["summary"])
        if len(summary) > MAX_SUMMARY:
            summary = (summary[:MAX_SUMMARY] + f" … ({len(summary) - MAX_SUMMARY:,} characters more: "
                       f"`coordinator show {rec.id}`)")
        lines += ["**Summary:**", "", summary, ""]
    planned = report.get("follow_up")
    if isinstance(planned, dict) and planned.get("id") and rec.status in ("routed", "blocked"):
        label = "Routed to" if rec.status == "routed" else "Escalated to"
        lines += [f"**{label}:** {planned.get('to')}, as order {planned['id']}", ""]
    if rec.children:
        sent = [_sent(c, records or {}) for c in rec.children[:MAX_LISTED]]
        lines += ["**Orders it sent:**", ""] + sent + _more(len(rec.children), rec.id) + [""]
    if rec.errors:
        lines += ["**Errors:**", ""] + [f"- {e}" for e in rec.errors[:MAX_LISTED]] + _more(len(rec.errors), rec.id) + [""]
    for key, title in (("changed", "Changed files"), ("offending", "Denied paths"), ("checks", "Checks"),
                       ("undelivered", "Not delivered from the outbox")):
        if report.get(key):
            listed = list(report[key])
            lines += ([f"**{title}:**", ""] + [f"- {x}" for x in listed[:MAX_LISTED]]
                      + _more(len(listed), rec.id) + [""])
    if rec.commit:
        lines += [f"**Commit:** {rec.commit}", ""]
    return "\n".join(lines)


def _more(count: int, order_id: str) -> list[str]:
    if count <= MAX_LISTED:
        return []
    return [f"- … and {count - MAX_LISTED:,} more: `coordinator show {order_id}` lists them all"]


def _sent(order_id: str, records: dict[str, Record]) -> str:
    """One order a request (or a specialist's outbox) sent: to whom, and how it ended, at the
    end of its route when it was routed on."""
    child = records.get(order_id)
    if child is None:
        return f"- {order_id}"
    line = f"- {order_id} to {child.to}: {child.status}"
    end = route_end(records, order_id) or child
    if end is not child:
        line += f", routed on to {end.id} ({end.to}): {end.status}"
    if end.commit:
        line += f", commit {end.commit[:10]}"
    return line


def fresh_brief(records: dict[str, Record], generation: int, *, orchestrator: str | None, now: datetime,
                detail: Callable[[Record], Record] = lambda r: r) -> str:
    """The brief a fresh orchestrator starts from: what it sent that is still in flight, the
    requests it is working on, its recent orders that are blocked or halted (they wait for its
    decision: retry, cancel, or a new order), and its recent orders that were rejected or
    denied (nobody else's: that is not its context). `detail` gives an ended record back whole (a denial's paths are not kept in
    memory)."""
    own = [r for r in sorted(records.values(), key=lambda r: r.seq) if r.sender == orchestrator]
    in_flight = [{"id": r.id, "to": r.to, "status": r.status, "objective": r.objective,
                  # Only what it still waits on: a dependency done (at the end of its route) no more.
                  "waiting_on": [d for d in r.blocked_by if not dependency_done(records, d)]
                  + ([r.blocker] if r.blocker else [])}
                 for r in own if not r.terminal]
    rejections = [{"id": r.id, "to": r.to, "objective": r.objective, "reason": _why(detail(r))}
                  for r in own[-200:] if r.status in ("rejected", "denied")][-10:]
    # Every one, however many orders it sent since: each waits for its decision (looked for
    # among the last 200 only, an older one left the brief, and its count, without a word).
    # Only the ones the brief lists are read whole for their reason.
    waiting = [r for r in own if r.status in ("blocked", "halted")]
    listed = len(waiting) - budget.MAX_BRIEF_STOPPED
    stopped = [{"id": r.id, "to": r.to, "status": r.status, "objective": r.objective,
                "reason": _stopped_why(detail(r)) if i >= listed else ""}
               for i, r in enumerate(waiting)]
    # The requests it was given and is still working on (their briefs were in the context this
    # one replaces): left out, a fresh orchestrator did not know which requests it was serving.
    requests = [{"id": r.id, "from": r.sender, "status": r.status, "objective": r.objective,
                 "waiting_on": [c for c in r.children if c in records and not records[c].terminal]}
                for r in sorted(records.values(), key=lambda r: r.seq)
                if r.to == orchestrator and not r.terminal and r.attempts > 0]
    return budget.render_brief(in_flight, rejections, generation=generation, now=now,
                               stopped=stopped, requests=requests)


def _stopped_why(rec: Record) -> str:
    """Why a blocked or halted order stopped: the note it ended with (its report's summary),
    else its blocker or its last failure."""
    summary = (rec.report or {}).get("summary")
    if summary:
        return str(summary)
    if rec.blocker:
        return f"waits on {rec.blocker}"
    if rec.failures:
        return rec.failures[-1]
    return rec.errors[0] if rec.errors else rec.status


def _why(rec: Record) -> str:
    """Why an order was rejected or denied, in its first line: the first error, or the first
    path it was denied for."""
    if rec.errors:
        return rec.errors[0]
    report = rec.report or {}
    offending = report.get("offending") or []
    if offending:
        more = f" (and {len(offending) - 1} more)" if len(offending) > 1 else ""
        # What the summary says it did ("wrote a file too large to commit", ...): a denial for a
        # limit is no write outside the permission.
        summary = str(report.get("summary") or "")
        what = (summary.removeprefix(f"{rec.to} ").split(";", 1)[0] if summary.startswith(f"{rec.to} ")
                else "wrote outside its permission")
        return f"{what}: {offending[0]}{more}"
    return str(report.get("summary") or rec.status)
