"""The transitions of orders: the one place a status changes, and what follows from a change.

`Transitions` (on `commits.Commits`) moves an order from status to status with its history
and audit line; an order that ends gets its report, delivered to the sender, and releases
what waited for it (queued once its dependencies are done, blocked when one ended undone).
Queued orders are kept per agent in a heap of (priority, age), from which `_dispatch` starts
what the free slots allow. The ledger of the orchestrator's work and the signals a
transition may raise are recorded here too.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from datetime import UTC, datetime

from . import audit, budget, durable, reports, signals
from .attempts import AttemptRunner
from .commits import Commits
from .config import Config
from .errors import StateError
from .intake import waiting_orders
from .orders import PRIORITY_RANK
from .store import (
    TERMINAL,
    History,
    Record,
    dead_blocked,
    dependency_done,
    ended_undone,
    iso,
    route_end,
    via_route,
)

NOTE_SHOWN = 160  # characters of a transition's note in its history line (the record keeps it whole)


class Transitions(Commits):
    """Statuses, dependencies, dispatch, ledger and signals of one supervisor's orders."""

    config: Config
    clock: Callable[[], float]
    records: dict[str, Record]
    history: History
    ledger: budget.Ledger
    attempts: AttemptRunner
    offline: bool  # a CLI serving one request while no supervisor runs: never spawns
    signals_told: list[str]  # offline: the signals recorded since it opened, as said
    # Kept current by `_index` wherever a status is set, so dispatch and the release of
    # dependents never scan every record the workspace ever had. `_ready`: per agent, a
    # heap of (priority rank, age, id) of its queued orders; an entry whose order is no
    # longer queued is dropped when it reaches the top.
    _ready: dict[str, list[tuple[int, int, str]]]
    _waiting_on: dict[str, set[str]]
    _at_ceiling: tuple[int, int, int, int] | None  # the ledger when the ceiling was last answered

    # -- transitions -------------------------------------------------------------------------------
    def move(self, rec: Record, new: str, actor: str, *, note: str | None = None) -> None:
        """Change `rec`'s status: record, history, audit line; the one place statuses change."""
        self.whole(rec)
        old = rec.status
        now = iso(self.clock())
        rec.status = new
        self._index(rec)
        rec.updated = now
        entry = {"at": now, "from": old, "to": new, "actor": actor}
        if note:
            entry["note"] = note
        rec.history.append(entry)
        if new != "running":
            rec.stale = False
        self.store.save(rec, sync=False)
        self.history.note(rec)
        self._stage(rec, old, new, actor, note=note)
        if new in TERMINAL:
            self._on_terminal(rec)

    def whole(self, rec: Record) -> Record:
        """`rec` with the detail memory shed when it ended, read back before it changes. A
        record file changed by hand since it was written is put back from git first and
        recorded as a `silent` signal (the tamper watch would have, a few seconds later). So is
        an order's whole folder removed by hand while it was live: the change would be written
        into a folder that is gone (a crash, "internal error")."""
        try:
            if rec.id not in self.intake.pending and not self.store.folder(rec.id).is_dir():
                raise StateError(f"state/orders/{rec.id}/ was removed")
            return self.store.restore(rec)
        except StateError as e:
            self.drain_commits()
            folder = self.store.folder(rec.id)
            rel = f"orders/{rec.id}" if not folder.is_dir() else f"orders/{rec.id}/record.json"
            self.audit.restore([rel])
            self.signal("silent", agent=None, order=rec.id, evidence=f"{e}; put back from git")
            return self.store.restore(rec, trust_file=True)

    def _stage(self, rec: Record, old: str, new: str, actor: str, *, note: str | None = None) -> None:
        line = f"{rec.id} {rec.to}: {old} -> {new}"
        if note:
            line += f" ({_shown(note)})"
        self.audit.stage(actor, line)
        self.say(line if actor == audit.SUPERVISOR else f"{line} [{actor}]")

    def event(self, rec: Record, text: str) -> None:
        """An audited line that is not a status change (stale flags, merges)."""
        self.whole(rec)
        self.store.save(rec, sync=False)
        self.audit.stage(audit.SUPERVISOR, f"{rec.id} {rec.to}: {text}")

    def _on_terminal(self, rec: Record) -> None:
        # Its own orders, and the requests it ran (their briefs): completed, for rotation to drop.
        if self.config.orchestrator in (rec.sender, rec.to) and self.ledger.complete(rec.id):
            self.ledger.save()
        self._deliver_report(rec)
        self._release_dependents(rec)
        self.attempts.on_terminal(rec)

    def _deliver_report(self, rec: Record) -> None:
        """Store the report with the order and deliver a copy to the sender."""
        report = rec.report or {"status": rec.status, "summary": "; ".join(rec.errors) or rec.status}
        rec.report = {**report, "status": rec.status}
        self.store.save(rec, sync=False)
        text = reports.render(rec, self.records)
        self.intake.ensure_placed(rec.id)
        durable.write_text(self.store.folder(rec.id) / "report.md", text, sync=False)
        if rec.sender not in ("user", "coordinator"):
            box = self.ws.state / "reports" / rec.sender
            box.mkdir(parents=True, exist_ok=True)
            durable.write_text(box / f"{rec.id}.md", text, sync=False)
        if self.config.orchestrator and rec.sender == self.config.orchestrator and rec.status != "rejected":
            self.ledger_add(rec.id, "report", text, completed=True)

    def _index(self, rec: Record) -> None:
        if rec.status == "queued":
            heapq.heappush(self._ready.setdefault(rec.to, []), _rank(rec))
        elif rec.status == "waiting":
            for dep in rec.dependencies:
                # A routed dependency is waited for at the end of its route.
                last = route_end(self.records, dep)
                self._waiting_on.setdefault(last.id if last is not None else dep, set()).add(rec.id)

    def awaited(self, order_id: str) -> bool:
        """Does a waiting order wait for `order_id` (its `blocked_by`, or a blocker)?"""
        return bool(self._waiting_on.get(order_id))

    def first_in_line(self, rec: Record) -> bool:
        """Is the queued `rec` ahead of every other queued order, whatever agent it is for
        (as `_dispatch` ranks them: priority, then age)? Slots are not asked: an order that
        waits for its agent's slot still ranks ahead."""
        mine = _rank(rec)
        for name in self._ready:
            head = self._head(name)
            if head is not None and head[2] != rec.id and head < mine:
                return False
        return True

    def _head(self, agent: str) -> tuple[int, int, str] | None:
        """The best queued order of `agent`'s ready heap, the entries of orders no longer queued
        for it dropped on the way; None when none is queued."""
        heap = self._ready.get(agent)
        while heap and not self._is_queued(heap[0][2], agent):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _release_dependents(self, done: Record) -> None:
        if done.status == "routed":
            return  # its waiters wait for the follow-up (`rerouted`), which is filed right after
        if done.status in ("halted", "blocked") and not dead_blocked(self.records, done):
            # `retry` may still bring it to done: what waits for it waits on (indexed under it),
            # as an order sent after it ended does; the board says what would move them.
            return
        waiters = (self.records[i] for i in self._waiting_on.pop(done.id, ()) if i in self.records)
        for rec in sorted(waiters, key=lambda r: r.seq):
            if rec.status != "waiting":
                continue
            named = next((d for d in rec.dependencies if route_end(self.records, d) is done), None)
            if named is None:
                continue
            if done.status != "done":  # rejected, denied, cancelled (or blocked by one): never done
                self._block_on(rec, named, done)
            else:
                self.settle_waiting(rec, f"{done.id} is done")

    def _release_ended_dependencies(self) -> None:
        """At start: a waiting order whose dependencies ended while no supervisor saw it (kill -9
        between two record writes) runs or is blocked now; one still waiting is indexed again,
        under the follow-ups recovery has just filed."""
        for rec in sorted((r for r in self.records.values() if r.status == "waiting"), key=lambda r: r.seq):
            self.settle_waiting(rec, "its dependencies are done")  # an earlier one may have blocked it
            if rec.status == "waiting":
                self._index(rec)

    def settle_waiting(self, rec: Record, note: str) -> None:
        """A waiting order is queued when its dependencies are done and blocked when one
        ended for good without the work (no later event would release it); else it waits."""
        if rec.status != "waiting":
            return
        if self.ready(rec):
            rec.blocker = None
            self.move(rec, "queued", audit.SUPERVISOR, note=note)
        elif (dead := ended_undone(self.records, rec.dependencies)) is not None:
            self._block_on(rec, *dead)

    def rerouted(self, routed: Record) -> None:
        """`routed` handed its work on to `routed.routed_to`: what waited for it waits for that."""
        waiters = [self.records[i] for i in self._waiting_on.pop(routed.id, ()) if i in self.records]
        for rec in waiters:
            if rec.status == "waiting":
                self._index(rec)
        follow = route_end(self.records, routed.id)
        if follow is not None and follow.terminal and follow is not routed:
            self._release_dependents(follow)  # the follow-up ended at once (rejected at intake)

    def _block_orphaned_waits(self) -> bool:
        """Block each waiting order whose dependency is an id no order has and no file waiting
        to be taken in declares any more (that file was filed under another id, or removed):
        nothing would ever release it. The files are read again only when such an order
        exists, and what was remembered of files gone is dropped with it. True if any."""
        orphans = [r for r in self.records.values() if r.status == "waiting"
                   and any(not self.history.exists(d) for d in r.blocked_by)]  # a blocker may be text
        if not orphans:
            return False
        self.intake.waiting = waiting_orders(self.ws.inbox_root, self.store.intake_dir, self.config.agents)
        blocked = False
        for rec in sorted(orphans, key=lambda r: r.seq):
            gone = [d for d in rec.blocked_by
                    if not self.history.exists(d) and d not in self.intake.waiting.declared]
            if gone and rec.status == "waiting":
                why = (f"{gone[0]} is no order: the file that named it was taken in under another id, "
                       "or is gone; send this again with blocked_by fixed")
                rec.report = {"summary": f"dependency {why}"}
                self.move(rec, "blocked", audit.SUPERVISOR, note=f"{gone[0]} is no order")
                blocked = True
        return blocked

    def _block_on(self, rec: Record, named: str, last: Record) -> None:
        """Block `rec`: its dependency `named` ended (at the end of its route, `last`) undone.
        For the blocker its agent named (`requeue-with-blocker`), the report keeps why the agent
        waited: it read "dependency X ended cancelled", and the agent's own words were gone."""
        why = f"{via_route(named, last)} ended {last.status}"
        waited = (rec.report or {}).get("summary") if named == rec.blocker else None
        rec.report = {"summary": f"its blocker {why}; it waited because: {waited}" if waited else f"dependency {why}"}
        self.move(rec, "blocked", audit.SUPERVISOR, note=why)

    def ready(self, rec: Record) -> bool:
        """Are all of `rec`'s dependencies done (at the end of their routes) and its blocker cleared?"""
        return all(dependency_done(self.records, d) for d in rec.dependencies)

    # -- dispatch ----------------------------------------------------------------------------------
    def _dispatch(self) -> bool:
        """Start every queued order a slot allows: priority first, then age, across agents.

        Each round takes the best head among the agents with a free slot: a step costs
        O(agents + started x log queued), not a sort of the whole backlog.
        """
        active = self.attempts.active
        if len(active) >= self.config.max_parallel:
            self._arm_next()
            return False
        per_agent: dict[str, int] = {}
        for a in active.values():
            per_agent[a.agent.name] = per_agent.get(a.agent.name, 0) + 1
        started = False
        tried: set[str] = set()  # a start that failed and queued the order again waits for the next step
        held: list[tuple[str, tuple[int, int, str]]] = []
        while len(self.attempts.active) < self.config.max_parallel:
            best: str | None = None
            for name, heap in self._ready.items():
                agent = self.config.agents.get(name)
                if agent is None or not agent.runnable or per_agent.get(name, 0) >= agent.max_parallel:
                    continue
                while heap and (not self._is_queued(heap[0][2], name) or heap[0][2] in tried):
                    entry = heapq.heappop(heap)
                    if entry[2] in tried:
                        held.append((name, entry))
                if heap and (best is None or heap[0] < self._ready[best][0]):
                    best = name
            if best is None:
                break
            entry = heapq.heappop(self._ready[best])
            tried.add(entry[2])
            # A start that failed moved its order too (queued again, or blocked): progress,
            # or `supervise --once` ended with it queued, "nothing runnable left".
            started = True
            if self.attempts.start(self.records[entry[2]]):
                per_agent[best] = per_agent.get(best, 0) + 1
        if self.attempts.active or self.attempts.armed is not None:
            self._arm_next()
        for name, entry in held:
            heapq.heappush(self._ready[name], entry)
        return started

    def _arm_next(self) -> None:
        """With every slot an order waits for taken, have the order that starts next armed
        (`AttemptRunner.arm`): the best queued head, as `_dispatch` would choose it, of the
        agents that may be armed (a quick script's next order, while a long agent's waits too).
        An armed order that is no longer queued, or no longer first, is dropped."""
        if self.attempts.armed is None and not self.attempts.quick:
            return  # no agent may be armed (the usual team: agents that work for minutes)
        best: tuple[int, int, str] | None = None
        for name in self._ready:
            agent = self.config.agents.get(name)
            if agent is None or not agent.runnable or not self.attempts.armable(agent):
                continue
            head = self._head(name)
            if head is not None and (best is None or head < best):
                best = head
        armed = self.attempts.armed
        if armed is not None and (best is None or armed.rec.id != best[2]):
            self.attempts.disarm()
        if best is not None and self.attempts.armed is None and self.attempts.active:
            self.attempts.arm(self.records[best[2]])

    def _is_queued(self, order_id: str, agent: str) -> bool:
        rec = self.records.get(order_id)
        return rec is not None and rec.status == "queued" and rec.to == agent

    # -- budget & signals ------------------------------------------------------------------------------
    def wall_now(self) -> datetime:
        """The supervisor's clock (injected) as a UTC time: the times of ledger items, briefs and signals."""
        return datetime.fromtimestamp(self.clock(), UTC)

    def ledger_add(self, ref: str, kind: str, text: str, *, tokens: int | None = None,
                   completed: bool = False, note: str = "") -> None:
        """Put an item in the orchestrator's ledger and save it; a change of mode is said."""
        self.ledger.add(ref, kind, text, tokens=tokens, note=note, now=self.wall_now())
        if completed:
            self.ledger.complete(ref)
        self.ledger.save()
        change = self.ledger.update_mode(self.config.budget.bands)
        if change and self.config.orchestrator:
            self.say("budget: " + budget.mode_change_message(self.config.orchestrator, change[0],
                                                               change[1], self.ledger.hot_tokens()))
            self.ledger.save()

    def _budget_check(self) -> None:
        b = self.config.budget
        if not self.config.orchestrator:
            return
        if self.ledger.hot_tokens() < b.ceiling:
            self._at_ceiling = None  # under it again: the next crossing is answered afresh
            return
        if self._ceiling_mark() == self._at_ceiling:
            return  # the ledger has not changed since the ceiling was last answered
        lines = budget.on_ceiling(self.ledger, b, brief=self.fresh_brief, now=self.wall_now(),
                                  again=self._at_ceiling is not None)
        self._at_ceiling = self._ceiling_mark()
        if lines:
            self.ledger.save()
            for line in lines:
                self.say("budget: " + line)
            self.audit.stage(audit.SUPERVISOR, f"budget {self.config.orchestrator}: " + "; ".join(lines))

    def _ceiling_mark(self) -> tuple[int, int, int, int]:
        items = self.ledger.items
        return (self.ledger.generation, len(items), self.ledger.hot_tokens(),
                sum(1 for i in items if i.status == "completed"))

    def fresh_brief(self) -> str:
        return reports.fresh_brief(self.records, self.ledger.generation + 1, orchestrator=self.config.orchestrator,
                                   detail=self.store.with_detail, now=self.wall_now())

    def signal(self, kind: str, *, agent: str | None, order: str | None, evidence: str) -> None:
        signals.record(self.ws.state, kind, agent=agent, order=order, evidence=evidence,
                       now=self.wall_now())
        told = f"{kind}: {' '.join(x for x in (agent or '-', order) if x)} {evidence}"
        if self.offline:  # for the command it serves; a running supervisor only logs them
            self.signals_told.append(told)
        self.say(f"signal {told}")
        self.audit.stage(audit.SUPERVISOR, f"signal {kind}: {order or '-'} {agent or '-'}: {_shown(evidence)}")


def _shown(text: str) -> str:
    """`text` on one line, cut to NOTE_SHOWN characters with an ellipsis: a multi-line failure
    cut mid-word ("exit cod", "keep it out of the") read as whole."""
    text = " ".join(text.split())
    return text if len(text) <= NOTE_SHOWN else text[:NOTE_SHOWN - 1] + "…"


def _rank(rec: Record) -> tuple[int, int, str]:
    return (-PRIORITY_RANK.get(rec.priority, 1), rec.seq, rec.id)
