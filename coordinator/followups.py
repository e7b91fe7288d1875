"""Follow-ups: the order a route sends on, and the investigation a block escalates to.

An attempt routed to another agent, or blocked with `escalate_to` set, names its
follow-up in its report (an id and an agent) before the record that ends it is
written; then the follow-up is filed under that id. A crash in between leaves the
plan in the record: recovery reserves its id (`keep_planned_ids`) and files it
(`refile_follow_ups`), once. The same follow-up is made from the record every time
(`follow_up_of`). A layer of `AttemptRunner`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from . import orders
from ._orderfields import AGENT_PATTERN, quoted
from .errors import CoordinatorError, OrderError, StateError
from .orders import Branch, WorkOrder
from .outbox import chain_problem
from .store import Record

if TYPE_CHECKING:
    from .supervisor import Supervisor

# Problems a refused route's reason quotes: it is stored, said, and read in the next brief.
MAX_SAID = 3


class FollowUps:
    """Plans and files the follow-ups of ended attempts (a layer of `AttemptRunner`)."""

    sup: Supervisor

    def _plan_follow_up(self, rec: Record, to: str) -> str:
        """Name the follow-up in `rec`'s report before the record that ends it is written: if a
        crash comes before the follow-up is filed, `refile_follow_ups` files it under that id."""
        follow_id = self.sup.intake.new_id()
        rec.report = {**(rec.report or {}), "follow_up": {"id": follow_id, "to": to}}
        self.sup.history.planned[follow_id] = rec.id
        return follow_id

    def follow_up_of(self, rec: Record, order: WorkOrder | None = None) -> WorkOrder | None:
        """The order `rec`'s route or escalation files (None: none is planned, or the plan in its
        record is not one); the same every time it is asked. `order`: `rec`'s, when at hand."""
        report = rec.report if isinstance(rec.report, dict) else {}
        planned = _planned(report)
        if planned is None:
            return None
        if rec.status == "routed":
            made = follow_up(order or self.sup.store.load_order(rec.id), rec.to, planned["to"])
        elif rec.status == "blocked":
            made = investigation(rec, planned["to"], str(report.get("summary") or "blocked"))
        else:
            return None
        return dataclasses.replace(self._after_last_failure(made), id=planned["id"])

    def _after_last_failure(self, made: WorkOrder) -> WorkOrder:
        """The same follow-up again (a retried order blocked again, a second route of the same
        work) names the last one that failed: the repeat rule is for agents, and the next
        agent sees what came before."""
        ended = self.sup.intake.history.ended(made.sender, made.to, made.objective)
        if ended and not any(p in made.references for p, _ in ended) and len(made.references) < 100:
            made = dataclasses.replace(made, references=(*made.references, ended[-1][0]))
        return made

    def route_problem(self, rec: Record, order: WorkOrder, to: str) -> str | None:
        """Why a route of `rec` to `to` cannot be taken, or None: the follow-up it would file
        is one intake rejects (`to` may not write the order's files, nothing can run it...).
        Taken, the route ended the order `routed` and its work went nowhere: instead the attempt
        fails with this reason, and its agent may do the work, halt, or route elsewhere."""
        chained = chain_problem(self.sup.records, rec)
        if chained is not None:
            return f"route-to {to} cannot be taken: {chained}; do the work yourself, or halt with a note"
        made = self._after_last_failure(follow_up(order, rec.to, to))
        try:
            orders.load(orders.render(made).encode(), path=f"route to {to}", kind="markdown", to=to, config=self.sup.config,
                        history=self.sup.intake.history, sender=made.sender, repos=self.sup.intake.repos_dir)
        except OrderError as e:
            shown = e.problems[:MAX_SAID]
            why = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in shown)
            more = f" (and {len(e.problems) - len(shown)} more)" if len(e.problems) > len(shown) else ""
            return (f"route-to {to} cannot be taken: the order it would send {to} is refused ({why}{more}); "
                    f"do the work yourself, halt with a note, or route it to an agent that can take it")
        return None

    def file_follow_up(self, rec: Record, order: WorkOrder | None = None) -> None:
        made = self.follow_up_of(rec, order)
        if made is None:
            raise StateError(f"{rec.id}'s record names no follow-up it could file")
        what = "route" if rec.status == "routed" else "escalation"
        self.sup.file_order(made, shown=f"{what} of {rec.id}")
        if rec.status == "routed":
            self.sup.rerouted(rec)

    def keep_planned_ids(self) -> None:
        """Reserve the id of each follow-up a record names but no record has yet (recovery,
        before any claimed file is filed: none of them may take such an id first)."""
        for rec in self.sup.records.values():
            planned = _planned(rec.report) if rec.status in ("routed", "blocked") and \
                isinstance(rec.report, dict) else None
            if planned is not None and planned["id"] not in self.sup.records:
                self.sup.history.planned[planned["id"]] = rec.id

    def refile_follow_ups(self) -> list[str]:
        """File each follow-up a crash cut off between its order's record and its own (recovery)."""
        filed: list[str] = []
        for rec in sorted(self.sup.records.values(), key=lambda r: r.seq):
            if rec.status not in ("routed", "blocked") or not isinstance(rec.report, dict) \
                    or "follow_up" not in rec.report:
                continue
            planned = _planned(rec.report)
            if planned is None:
                self.sup.say(f"recovery: {rec.id}'s record names a follow-up that is not one "
                             f"({str(rec.report['follow_up'])[:80]}); nothing filed for it")
                continue
            if planned["id"] in self.sup.records:
                continue
            try:
                self.file_follow_up(rec)
            except (CoordinatorError, OSError, ValueError, KeyError, TypeError) as e:  # its order.json gone or
                self.sup.say(f"recovery: could not file {rec.id}'s follow-up {planned['id']}: {e}")  # garbled
                continue
            filed.append(f"{rec.id} -> {planned['id']} ({planned['to']})")
        return filed


def _planned(report: dict[str, Any]) -> dict[str, str] | None:
    """The follow-up a report names ({id, to}), when it is one: an id and an agent name."""
    planned = report.get("follow_up")
    if not isinstance(planned, dict):
        return None
    follow_id, to = planned.get("id"), planned.get("to")
    if not isinstance(follow_id, str) or not orders.ID_PATTERN.fullmatch(follow_id) or not isinstance(to, str) \
            or not AGENT_PATTERN.fullmatch(to):  # a name, never a path: it names a folder in state/intake/
        return None
    return {"id": follow_id, "to": to}


def follow_up(order: WorkOrder, sender: str, to: str) -> WorkOrder:
    branching = tuple(b for b in order.branching if b.action != "route-to") or (
        Branch(action="halt-with-note", when="the work does not apply"),)
    # It references the order it continues, within the most an order may name: past that the
    # follow-up, the routed work, was rejected at intake. The earliest references give way.
    references = (*order.references, order.id or "")[-orders.MAX_IDS:]
    return WorkOrder(id=None, sender=sender, to=to, objective=order.objective,
                     acceptance=order.acceptance, files=order.files, branching=branching,
                     priority=order.priority, references=references, timeout=order.timeout, parent=order.parent)


def investigation(rec: Record, target: str, reason: str) -> WorkOrder:
    objective = f"Find out why {rec.id} ({rec.to}) is blocked and say what would unblock it"
    return WorkOrder(
        id=None, sender="coordinator", to=target, objective=objective[:280],
        acceptance=(orders.Acceptance(text=f"The summary names the cause of {rec.id}'s failures"),
                    orders.Acceptance(text="The summary proposes the next step: a new work order or dropping it"),
                    orders.Acceptance(text=f"Last failure considered: {_short(quoted(reason))}")),
        files=(), branching=(Branch(action="halt-with-note", when=f"{rec.id} should be dropped"),),
        priority="high", references=(rec.id,))


def _short(text: str, n: int = 160) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"
