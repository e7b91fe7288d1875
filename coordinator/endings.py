"""How an attempt ends: done, halted, routed, waiting, blocked, denied, cancelled or failed.

Every ending is exactly one status change through `Supervisor.move`. A decided
attempt (`_end`) delivers its outbox first, then leaves the running attempts
(`_finish`: its working copy and scratch folder go), then its order moves and what
that ending sends on is filed (a route's or an escalation's follow-up); a waiting
order is settled at once, should what it waits for have ended already. A change the
permission gate denies ends the order `denied`; a failed attempt is queued again
with its reason, or blocked after the agent's `max_failures`; one whose merge a person's
uncommitted work stops waits for them, uncounted. A layer of `AttemptRunner`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import audit, durable, gate, results, runner
from .errors import CoordinatorError
from .followups import FollowUps, _planned, _short
from .orders import WorkOrder
from .outbox import Outbox, _note_undelivered, _outbox_files, chain_problem, not_delivered
from .store import Record

if TYPE_CHECKING:
    from pathlib import Path

    from .attempts import Active
    from .supervisor import Supervisor


# The longest reason a failed attempt keeps: a result file's 60 KB key name was quoted whole,
# and a brief over 128 KiB cannot be passed as `{brief_text}` (one argument, E2BIG).
MAX_REASON = 4000


class Endings(FollowUps, Outbox):
    """Ends attempts and the orders they ran (a layer of `AttemptRunner`)."""

    sup: Supervisor
    active: dict[str, Active]

    def _end_outcome(self, act: Active, result: results.Result) -> None:
        rec, who = act.rec, act.agent.name
        rec.report = {"summary": result.summary, "outcome": result.outcome}
        if result.outcome == "halt-with-note":
            self._end(act, "halted", who, note=_short(result.summary))
        elif result.outcome == "route-to":
            assert result.agent is not None
            why = self.route_problem(rec, act.order, result.agent)
            if why is not None:
                return self.fail(act, why)
            rec.report["routed_to"] = rec.routed_to = self._plan_follow_up(rec, result.agent)
            self._end(act, "routed", who, note=f"to {result.agent}")
        elif result.outcome == "requeue-with-blocker":
            rec.blocker = result.blocker
            self._end(act, "waiting", who, note=f"blocker: {result.blocker}")
        else:
            # What it says it is missing comes first: the note and the escalation quote the start.
            missing = f" (blocker: {result.blocker})" if result.blocker else ""
            reason = f"{who} reported blocked{missing}: {result.summary}"
            self._plan_block(rec, reason)
            self._end(act, "blocked", who, note=_short(reason))

    def _end(self, act: Active, status: str, actor: str, *, note: str | None = None) -> None:
        """The attempt is decided (its record says how: report, blocker, follow-up): deliver
        its outbox, then change the status. Never earlier: see `conclude`."""
        self._deliver(act, status, actor, note=note)
        self._finish(act)
        self._close(act.rec, status, actor, note=note, order=act.order)

    def _close(self, rec: Record, status: str, actor: str, *, note: str | None = None,
               order: WorkOrder | None = None) -> None:
        """Move an order whose attempt ended to `status`; then file what that ending sends on."""
        self.sup.move(rec, status, actor, note=note)
        if status in ("routed", "blocked") and _planned(rec.report or {}) is not None:
            self.file_follow_up(rec, order)
        elif status == "waiting":
            self.sup.settle_waiting(rec, f"{rec.blocker} is already done")

    def _judge(self, act: Active) -> bool | None:
        """Run the gate once per attempt; False when the change was denied (and the order ended)."""
        if act.verdict is not None:
            return act.verdict.allowed
        if act.repo is None or act.before is None:
            return None
        act.after = gate.snapshot(act.attempt.workdir, since=act.before)
        changes = gate.diff(act.before, act.after)
        # The orchestrator never changes files: everything it did in its copy is denied.
        writes = () if act.agent.is_orchestrator else act.agent.writes
        candidates = gate.submodule_candidates(changes, act.before)
        try:
            submodules = act.repo.submodules(act.attempt.workdir, candidates) if candidates else []
        except (CoordinatorError, OSError) as e:  # OSError: git cannot even start in a copy made unreadable
            # Unknown, not none: such a change would fail its commit anyway, and say why there.
            self.sup.say(f"{act.rec.id}: could not tell the submodules of repos/{act.repo.name}: {e}")
            submodules = []
        act.verdict = gate.judge(changes, repo=act.repo.name, files=act.order.files, writes=writes,
                                 submodules=submodules)
        if not act.verdict.allowed:
            self._deny(act, act.verdict)
            return False
        return True

    def _deny(self, act: Active, verdict: gate.Verdict) -> None:
        rec = act.rec
        lines = [f"{act.repo.name if act.repo else ''}/{gate.describe(c)} — {why}" for c, why in verdict.offending]
        name = act.repo.name if act.repo else ""
        said = _denied_for(verdict, name, act.order.files, act.agent.writes)
        rec.report = {"summary": f"{act.agent.name} {said}; every change was discarded",
                      "offending": lines}
        if act.agent.is_orchestrator:
            self.sup.signal("artifact", agent=act.agent.name, order=rec.id, evidence=_cut("; ".join(lines), 300))
        else:
            # `scope` is a write outside its files: a file too large, or one it left unreadable,
            # where it may write is denied all the same, but is no such write.
            name = act.repo.name if act.repo else ""
            beyond = [line for (c, why), line in zip(verdict.offending, lines, strict=True)
                      if _beyond(c, why, name, act.order.files, act.agent.writes)]
            if beyond:
                self.sup.signal("scope", agent=act.agent.name, order=rec.id, evidence=_cut("; ".join(beyond), 300))
        self._finish(act, keep=True)
        self.sup.move(rec, "denied", audit.SUPERVISOR, note=lines[0] if lines else None)

    def _end_cancelled(self, act: Active) -> None:
        self._finish(act)
        if act.rec.status == "running":  # the cancel never got to its move: it ends cancelled all the same
            act.rec.report = {"summary": "cancelled"}
            self.sup.move(act.rec, "cancelled", audit.SUPERVISOR)

    def fail(self, act: Active, reason: str) -> None:
        """A failed attempt: re-queue with the reason for the next brief, or block after max_failures."""
        rec = act.rec
        if len(reason) > MAX_REASON:  # it is stored, said and quoted in the next brief, an argument
            reason = f"{reason[:MAX_REASON]}… ({len(reason) - MAX_REASON:,} characters more left out)"
        rec.report = {"summary": f"attempt {act.attempt.number} failed: {reason}"}
        self._keep_outbox(act, "failed")
        self._finish(act)  # after the report: it adds what the outbox could not deliver
        rec.failures.append(reason)
        if len(rec.failures) >= act.agent.max_failures:
            self.block(rec, f"failed {len(rec.failures)} time(s); last: {reason}")
        else:
            self.sup.move(rec, "queued", audit.SUPERVISOR, note=f"attempt {act.attempt.number} failed: {reason}")

    def wait_for_person(self, act: Active, blocker: str, *, why: str = "was not merged") -> None:
        """The attempt's work is sound, but only a person can let it land (their uncommitted
        work in the checkout is in the way): the order waits with `blocker`, a line saying what
        to do, which `coordinator retry` clears. Not a failure: run again by itself, the agent
        would fail the same way until the order is blocked. Its work and outbox go as a failed
        attempt's do; the retry does the work again from the current default branch."""
        rec = act.rec
        rec.report = {"summary": f"attempt {act.attempt.number} {why}: {blocker}"}
        self._keep_outbox(act, "was not merged")
        self._finish(act)
        rec.blocker = blocker
        self._close(rec, "waiting", audit.SUPERVISOR, note=f"blocker: {_short(blocker)}")

    def _blocked_at_chain_end(self, act: Active) -> bool:
        """An orchestrator's request at the end of a chain (`chain_problem`) whose outbox holds
        orders: they are its whole work and cannot be sent, so it is blocked, saying why, its
        outbox kept, as an LLM orchestrator's request is. It ended `done` with nothing sent.
        False (and nothing done) when it is not so."""
        rec, box = act.rec, act.attempt.outbox
        chained = None if act.delivered else chain_problem(self.sup.records, rec)
        if chained is None:
            return False
        unread: list[str] = []
        files = _outbox_files(box, unread)
        if not files:
            return False
        act.delivered = True
        act.undelivered += unread + not_delivered(box, files, f"{chained}; send it yourself if it is wanted")
        reason = (f"the {len(files)} order(s) in {act.agent.name}'s outbox are not delivered: {chained}; "
                  "a retry would end the same: send the request again yourself if it is still wanted")
        self.sup.say(f"{rec.id}: {reason}")
        self._finish(act)
        rec.failures.append(reason)
        self.block(rec, reason)
        return True

    def _keep_outbox(self, act: Active, why: str) -> None:
        """The sender learns that the orders its undecided attempt wrote were not sent."""
        if act.delivered:
            return
        box = act.attempt.outbox
        act.undelivered += not_delivered(box, _outbox_files(box, act.undelivered),
                                         f"attempt {act.attempt.number} {why}")

    def _fail_hard(self, rec: Record, reason: str) -> None:
        rec.failures.append(reason)
        self.block(rec, reason)

    def block(self, rec: Record, reason: str, *, actor: str = audit.SUPERVISOR) -> None:
        self._plan_block(rec, reason)
        self._close(rec, "blocked", actor, note=_short(reason))

    def _plan_block(self, rec: Record, reason: str) -> None:
        """The report of a block, with the escalation it files when `escalate_to` is set."""
        rec.report = {k: v for k, v in (rec.report or {}).items() if k != "follow_up"} | {"summary": reason}
        target = self.sup.config.escalate_to
        if target and target != rec.to and rec.sender != "coordinator":
            self._plan_follow_up(rec, target)

    def _finish(self, act: Active, *, keep: bool = False) -> None:
        self.active.pop(act.token, None)
        act.rec.running = None
        _note_undelivered(act)
        self._cleanup(act, keep=keep)

    def _cleanup(self, act: Active, *, keep: bool = False) -> None:
        # What cannot be removed is said, not hidden: it is left for a person (or the next
        # attempt, which removes the copy first), never half gone without a word.
        if act.repo is not None:
            try:
                act.repo.remove_worktree(act.rec.id, act.attempt.workdir, keep=keep)
            except CoordinatorError as e:
                self.sup.say(f"{act.rec.id}: {e}")
        named = act.attempt.named
        scratch = named["scratch"]
        # One walk of the attempt folder both looks for what git would run there and tells
        # whether the scratch folder holds anything (listed, not walked: what it holds goes).
        # Only when it finds something to take out, or scratch could not go, is the folder
        # defused as before, after scratch is gone (a listing of scratch and a walk, each time).
        held: dict[str, bool | None] = {} if keep else {scratch: None}
        unreadable: list[str] = []
        try:
            clean = not gate.planted(named["folder"], unreadable=unreadable, held=held) and not unreadable
        except OSError:  # said by `_defuse`, which looks again
            clean = False
        full = held.get(scratch)
        if not keep and (full if full is not None else _has_entries(scratch)):  # an empty one stays
            try:
                durable.remove_tree(act.attempt.scratch)  # no recursion: the specialist chose its depth
            except OSError as e:
                clean = False  # what is left of it was never looked at
                self.sup.say(f"{act.rec.id}: could not remove the scratch folder: {e}; remove it by hand")
        if not clean:
            self._defuse(act.rec.id, act.attempt.folder)

    def _defuse(self, order_id: str, folder: Path) -> None:
        """An attempt folder stays for a person to read: nothing in it may run as them (`runner.defuse`)."""
        try:
            runner.defuse(folder)
        except OSError as e:
            self.sup.say(f"{order_id}: could not take what git would run out of {folder}: {e}; "
                         "remove it by hand before running git there")


def _has_entries(folder: Path | str) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


# What a denial for a limit says it was: not a write outside the permission (the path may be
# allowed), but a change too big to judge or commit, one the supervisor could not read, or one
# inside a submodule.
_LIMITS = {
    "too-large": "wrote a file too large to commit",
    "too-many": "added more files and folders than one change may",
    "too-deep": "nested folders too deep to judge",
    "unreadable": "left {} the supervisor could not read",
    "submodule": "changed a submodule's files, which only its own repository can commit",
}
_IN_SUBMODULE = gate.SUBMODULE.partition("{}")[0]  # how the gate's reason for such a path starts


def _denied_for(verdict: gate.Verdict, repo: str, files: tuple[str, ...], writes: tuple[str, ...]) -> str:
    """What the denied change was, for the report's summary: `wrote outside its permission`,
    `made a change no permission allows` (a fifo, a setuid bit, a link out, where it may
    write), or the limit it passed (each that applies, in that order)."""
    kinds = {_kind(c, why) for c, why in verdict.offending}
    said = [text for what, text in _LIMITS.items() if what in kinds]
    others = [c for c, why in verdict.offending if _kind(c, why) not in _LIMITS]
    if any(c.path == "." or gate.outside(f"{repo}/{c.path}", files, writes) is not None for c in others):
        said.insert(0, "wrote outside its permission")
    elif others:
        said.insert(0, "made a change no permission allows")
    if not said:
        said.append("wrote outside its permission")
    return " and ".join(said).format(_unread(verdict))


def _unread(verdict: gate.Verdict) -> str:
    """`a file`, `2 files and a folder`: what of a denied change the supervisor could not read."""
    dirs = [c.kind == "dir" for c, _ in verdict.offending if c.what == "unreadable"]
    counted = ((dirs.count(False), "file"), (dirs.count(True), "folder"))
    return " and ".join(f"a {noun}" if n == 1 else f"{n} {noun}s" for n, noun in counted if n)


def _kind(change: gate.Change, why: str) -> str:
    """What a denied change was, as `_LIMITS` names it (`submodule`: a path inside one)."""
    return "submodule" if why.startswith(_IN_SUBMODULE) else change.what


def _beyond(change: gate.Change, why: str, repo: str, files: tuple[str, ...], writes: tuple[str, ...]) -> bool:
    """Did the agent write outside its files with `change` (a `scope` signal)? A limit passed,
    an unreadable path or one inside a submodule is no such write where the path is its to
    write (the top of the copy, `.`, holds what was judged on its own)."""
    if _kind(change, why) not in _LIMITS:
        return True
    return change.path != "." and gate.outside(f"{repo}/{change.path}", files, writes) is not None


def _cut(text: str, n: int) -> str:
    """`text`, cut to `n` characters with an ellipsis (one cut mid-word read as whole)."""
    return text if len(text) <= n else text[:n - 1] + "…"
