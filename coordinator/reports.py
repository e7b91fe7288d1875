"""Reports: what an order's sender gets when it ends, and the brief a fresh orchestrator starts from."""

from __future__ import annotations

from datetime import UTC, datetime

from . import budget
from .store import Record


def render(rec: Record) -> str:
    report = rec.report or {}
    lines = [f"# Report on {rec.id}: {rec.status}", "", f"**Objective:** {rec.objective}", "",
             f"**Status:** {rec.status} after {rec.attempts} attempt(s)", ""]
    if report.get("summary"):
        lines += ["**Summary:**", "", str(report["summary"]), ""]
    planned = report.get("follow_up")
    if isinstance(planned, dict) and planned.get("id") and rec.status in ("routed", "blocked"):
        label = "Routed to" if rec.status == "routed" else "Escalated to"
        lines += [f"**{label}:** {planned.get('to')}, as order {planned['id']}", ""]
    if rec.errors:
        lines += ["**Errors:**", ""] + [f"- {e}" for e in rec.errors] + [""]
    for key, title in (("changed", "Changed files"), ("offending", "Denied paths"), ("checks", "Checks"),
                       ("undelivered", "Not delivered from the outbox")):
        if report.get(key):
            lines += [f"**{title}:**", ""] + [f"- {x}" for x in report[key]] + [""]
    if rec.commit:
        lines += [f"**Commit:** {rec.commit}", ""]
    return "\n".join(lines)


def fresh_brief(records: dict[str, Record], generation: int) -> str:
    in_flight = [{"id": r.id, "to": r.to, "status": r.status, "objective": r.objective,
                  "waiting_on": list(r.blocked_by) + ([r.blocker] if r.blocker else [])}
                 for r in sorted(records.values(), key=lambda r: r.seq) if not r.terminal]
    rejections = [{"id": r.id, "to": r.to, "objective": r.objective, "reason": (r.errors or ["?"])[0]}
                  for r in sorted(records.values(), key=lambda r: r.seq)[-200:]
                  if r.status in ("rejected", "denied")][-10:]
    return budget.render_brief(in_flight, rejections, generation=generation, now=datetime.now(UTC))
