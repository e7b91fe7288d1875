"""Running attempts: spawn, watch, judge, check, commit, merge; or fail and say why.

An attempt goes through phases: `specialist` (the agent's process, or an LLM
call in a worker thread), then `check` (each acceptance check, one process at a
time, in the same sandbox), then it lands. Every exit path ends in exactly one
status change through `Supervisor.move`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import audit, durable, gate, orders, results, runner
from ._orderfields import AGENT_PATTERN, quoted
from .config import Agent, parse_duration
from .errors import CoordinatorError, GateError, GitError, SandboxError, StateError
from .landlock import Ruleset
from .orders import Branch, WorkOrder
from .repos import MergeConflict, Repo
from .runner import Attempt
from .spawner import Refused, SpawnRequest
from .store import Record, route_end, via_route

if TYPE_CHECKING:
    from .supervisor import Supervisor

OUTPUT_TAIL = 1500
KILL_RETRY = 5.0  # seconds before the watch tries again to kill processes that survived a kill
# What a refused write looks like in a program's output (EACCES/EPERM/EROFS from the kernel).
REFUSED = re.compile(r"Permission denied|Operation not permitted|Read-only file system|EACCES|EPERM", re.I)
# What makes a refusal line one about a write that was tried, not words that merely mention
# a refusal ("the report says Permission denied was fixed"): an errno, a verb of failing,
# or the path itself, quoted or absolute.
TRIED = re.compile(r"\[Errno \d+\]|\b(?:cannot|can't|could not|couldn't|unable to|failed to)\b"
                   r"|'[^'\s]+'|\"[^\"\s]+\"|(?:^|[\s:=(])/[^\s:]+", re.I)


@dataclass
class Active:
    rec: Record
    agent: Agent
    order: WorkOrder
    attempt: Attempt
    rules: Ruleset | None
    started: float
    deadline: float
    repo: Repo | None = None
    before: gate.Snapshot | None = None
    after: gate.Snapshot | None = None  # what the gate judged
    phase: str = "specialist"
    checks: list[str] = field(default_factory=list)
    check_index: int = 0
    check_lines: list[str] = field(default_factory=list)
    verdict: gate.Verdict | None = None
    result: results.Result | None = None
    committed: str | None = None
    cancelled: bool = False
    timed_out: bool = False
    kill_due: float | None = None  # when `watch` tries again to kill processes a kill left alive
    token: str = ""
    thread: threading.Thread | None = None
    thread_outcome: Any = None
    delivered: bool = False  # its outbox was taken (once the attempt was decided)
    undelivered: list[str] = field(default_factory=list)  # outbox files that named no known agent


class AttemptRunner:
    """Owns the running attempts of one supervisor."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.ws = sup.ws
        self.active: dict[str, Active] = {}  # token -> attempt
        self.waiting_requests: dict[str, Active] = {}  # LLM orchestrator requests waiting on children
        self._repos: dict[str, Repo] = {}
        self.inherited = runner.inherited_environment()  # the supervisor's, as it started

    # -- starting -----------------------------------------------------------------------------------
    def repo(self, name: str) -> Repo:
        if name not in self._repos:
            self._repos[name] = Repo(self.ws.repos / name)
        return self._repos[name]

    def start(self, rec: Record) -> bool:
        sup = self.sup
        agent = sup.config.agents[rec.to]
        try:
            order = sup.intake.order_of(rec.id)
        except CoordinatorError as e:
            self._fail_hard(rec, f"cannot read the order: {e}")
            return False
        number = rec.attempts + 1
        attempt = runner.prepare(self.ws, order, number, rec.failures)
        act = Active(rec=rec, agent=agent, order=order, attempt=attempt, rules=None,
                     started=sup.clock(), deadline=sup.clock() + _timeout(order, agent))
        act.token = attempt.token
        try:
            if attempt.repo is not None:
                act.repo = self.repo(attempt.repo)
                act.repo.add_worktree(rec.id, attempt.workdir)
                act.before = gate.snapshot(attempt.workdir)
            act.rules = runner.ruleset(agent, order, attempt, self.ws)
        except CoordinatorError as e:
            rec.attempts = number
            self._cleanup(act)
            self.fail(act, f"could not prepare the working copy: {e}")
            return False
        rec.attempts = number
        rec.running = {**attempt.as_json(), "started": act.started, "deadline": act.deadline}
        self.active[act.token] = act
        if agent.llm is not None:
            sup.move(rec, "running", audit.SUPERVISOR, note=f"attempt {number}")
            from .llmrun import start_llm_attempt
            start_llm_attempt(self, act)
            return True
        # Start first, record after: the record write is off the drop-to-spawn path, and the
        # loop goes on while the fork server sandboxes and starts the child (a refusal comes
        # back with the exits, see `reap`). A crash in between is safe: the fork server kills
        # its children when the supervisor dies, and the order, still `queued` on disk,
        # simply runs again.
        try:
            sup.spawner.start(SpawnRequest(
                argv=runner.argv(agent, attempt, self.ws),
                env=runner.environment(agent, attempt, self.ws, self.inherited),
                cwd=str(attempt.workdir), log_path=str(attempt.log), token=act.token,
                sandbox=act.rules))
        except CoordinatorError as e:
            del self.active[act.token]
            sup.move(rec, "running", audit.SUPERVISOR, note=f"attempt {number}")
            self.fail(act, f"could not start {agent.name}: {e}")
            return True
        sup.move(rec, "running", audit.SUPERVISOR, note=f"attempt {number}")
        if agent.name == sup.config.orchestrator:
            self._count_brief(act)
        return True

    def _count_brief(self, act: Active) -> None:
        """The orchestrator's command reads its brief: that is in its context (SPEC §8), as its
        current brief, replacing the brief of an earlier attempt of the same order."""
        ledger = self.sup.ledger
        ledger.items = [i for i in ledger.items if not (i.ref == act.rec.id and i.kind == "brief")]
        try:
            text = act.attempt.brief.read_text("utf-8", errors="replace")
        except OSError:
            return
        self.sup.ledger_add(act.rec.id, "brief", text, note=f"brief of {act.rec.id}, attempt {act.attempt.number}")

    # -- watching -------------------------------------------------------------------------------------
    def reap(self) -> bool:
        """Handle every process exit and finished LLM call; True when any."""
        progress = False
        for ex in self.sup.spawner.poll():
            act = self.active.get(ex.token) or self.active.get(ex.token.rsplit(".c", 1)[0])
            if act is None:
                continue
            progress = True
            if isinstance(ex, Refused):
                self._refused(act, ex.message)
            elif act.phase == "specialist":
                self._after_specialist(act, ex.returncode, alone=ex.alone)
            elif act.phase == "check":
                self._after_check(act, ex.returncode, alone=ex.alone)
        for act in list(self.active.values()):
            if act.thread is not None and not act.thread.is_alive() and act.phase == "specialist":
                act.thread = None
                progress = True
                from .llmrun import finish_llm_attempt
                finish_llm_attempt(self, act)
        if self.waiting_requests:
            from .orchestration import check_requests
            progress |= check_requests(self)
        return progress

    def watch(self, now: float) -> None:
        """Kill what overran its timeout; flag what has gone silent."""
        for act in list(self.active.values()):
            if now > act.deadline and not act.timed_out:
                act.timed_out = True
                self.sup.say(f"{act.rec.id}: timed out after {_fmt(act.deadline - act.started)}; killing it")
                self._stop_model(act, "the order's timeout ran out while the model was answering")
                self._kill(act, now, grace=2.0)
            elif act.kill_due is not None and now >= act.kill_due:
                self._kill(act, now, grace=2.0)
            limit = act.agent.stale_after
            # Younger than the limit, it cannot be silent that long: no look at its files.
            if (not act.rec.stale and now - act.started > limit
                    and now - runner.last_activity(act.attempt, act.started) > limit):
                act.rec.stale = True
                self.sup.event(act.rec, f"stale (no output or heartbeat for {_fmt(limit)})")

    def _current_token(self, act: Active) -> str:
        return f"{act.token}.c{act.check_index}" if act.phase == "check" else act.token

    def _kill(self, act: Active, now: float, *, grace: float, then: str = "") -> str | None:
        """Kill the attempt's processes; None, or the line said when some survived (a process
        stuck in the kernel): the watch tries again later, and the attempt is decided when its
        exit comes, as after any kill. A failed kill never stops the supervisor."""
        try:
            self.sup.spawner.kill_tree(self._current_token(act), grace=grace)
        except CoordinatorError as e:
            act.kill_due = now + KILL_RETRY
            line = (f"{act.rec.id}: could not kill the attempt: {e}; "
                    + (then or f"trying again in {_fmt(KILL_RETRY)}"))
            self.sup.say(line)
            return line
        act.kill_due = None
        return None

    def kill_all(self) -> None:
        for act in list(self.active.values()):
            self._stop_model(act, "the supervisor is stopping now")
            self._kill(act, self.sup.clock(), grace=0.5, then="the next start kills what is left")

    def cancel(self, rec: Record) -> str | None:
        """Kill `rec`'s attempt (its caller moves it to cancelled); the line said when processes
        of it survived the kill, for the user who cancelled: it is cancelled all the same."""
        for act in list(self.active.values()):
            if act.rec.id == rec.id:
                act.cancelled = True
                self._stop_model(act, "cancelled")
                failed = self._kill(act, self.sup.clock(), grace=1.0)
                if failed:
                    return failed
        return None

    @staticmethod
    def _stop_model(act: Active, why: str) -> None:
        """An LLM attempt's call under way ends at its next chunk, and no retry follows."""
        if act.thread is not None and act.thread_outcome is not None:
            act.thread_outcome.client.stop(why)

    def on_terminal(self, rec: Record) -> None:
        pass

    # -- after the specialist ---------------------------------------------------------------------------
    def _after_specialist(self, act: Active, code: int, *, alone: bool = False) -> None:
        # Nothing is judged while any process of the attempt may still write
        # (`alone`: the fork server saw that none is left).
        try:
            if not alone:
                self.sup.spawner.kill_tree(act.token, grace=0.5)
        except CoordinatorError as e:
            if act.cancelled:  # cancelled stays cancelled: a failure would queue it again
                self.sup.say(f"{act.rec.id}: cancelled, but processes of the attempt survived SIGKILL: {e}")
                return self._end_cancelled(act)
            return self.fail(act, f"processes of the attempt survived SIGKILL; not judged: {e}")
        if act.cancelled:
            return self._end_cancelled(act)
        tail = runner.tail(act.attempt.log, OUTPUT_TAIL)
        if self._judge(act) is False:
            return None  # denied, whatever else went wrong: a probe of the boundary is never just a failure
        self._refused_writes(act, tail)  # writes the kernel refused outside what it may write
        if act.timed_out:
            return self.fail(act, f"timed out after {_fmt(act.deadline - act.started)}; last output: "
                                  f"{tail[-400:] or '(none)'}")
        result = None
        raw = runner.read_untrusted(act.attempt.result, results.MAX_RESULT_BYTES)
        if raw is None and os.path.lexists(act.attempt.result):
            return self.fail(act, "invalid result file: result.yaml is not a regular file")
        if raw is not None:
            try:
                result = results.parse_result(raw, path="result.yaml")
            except CoordinatorError as e:
                return self.fail(act, f"invalid result file: {e}")
        if result is None:
            if code != 0:
                return self.fail(act, f"exited with code {code} and wrote no result; last output: "
                                      f"{tail[-600:] or '(none)'}")
            result = results.Result(outcome="done", summary=tail[-800:] or "done (no output)")
        self.conclude(act, result)

    def conclude(self, act: Active, result: results.Result) -> None:
        """Judge the outcome, the change and the checks of a finished specialist."""
        problem = outcome_problem(act.order, result)
        if problem:
            return self.fail(act, problem)
        act.result = result
        if self._judge(act) is False:
            return None
        # The outbox is delivered only once nothing can fail the attempt any more (`_end`): an
        # attempt whose check or merge fails sends nothing, and its retry sends its orders once.
        if result.outcome != "done":
            return self._end_outcome(act, result)
        if act.agent.is_orchestrator:
            # An orchestrator delegates through its outbox: with orders sent, its request is
            # decided to wait for them (its checks run when they have ended).
            self._deliver(act, "running", act.agent.name)
            if act.rec.children:
                return self._await_children(act)
        if act.repo is not None and act.verdict is not None and act.verdict.commit_paths():
            try:
                act.committed = act.repo.commit(
                    act.attempt.workdir, act.verdict.commit_paths(), agent=act.agent.name,
                    subject=act.order.objective,
                    trailers={"Work-Order": act.rec.id, "Agent": act.agent.name,
                              "Attempt": str(act.attempt.number)},
                    verify=lambda paths: _as_judged(act.attempt.workdir, paths, act.after or gate.Snapshot()))
            except GateError as e:
                return self.fail(act, str(e))
            except GitError as e:
                return self.fail(act, f"could not commit the change: {e}")
        act.checks = list(act.order.checks)
        if act.checks:
            act.phase = "check"
            act.check_index = 0
            return self._start_check(act)
        self._land(act)

    def _await_children(self, act: Active) -> None:
        """An orchestrator delegated: its request is done when its children are, and checks pass."""
        self._cleanup(act)
        act.phase = "children"
        self.active.pop(act.token, None)
        self.waiting_requests[act.rec.id] = act
        self.sup.event(act.rec, f"waiting for {len(act.rec.children)} order(s): {', '.join(act.rec.children)}")

    def children_ended(self, act: Active) -> None:
        """All children of a command orchestrator's request ended: verify on the default branch."""
        recs = self.sup.records
        # A routed child's work is its follow-up's: judged at the end of its route.
        ends = {c: last for c in act.rec.children if (last := route_end(recs, c)) is not None}
        failed = [c for c, last in ends.items() if last.status != "done"]
        if failed:
            act.rec.running = None
            reason = "delegated orders did not finish: " + ", ".join(
                f"{via_route(c, ends[c])} {ends[c].status}" for c in failed)
            act.rec.failures.append(reason)
            _note_undelivered(act)
            return self.block(act.rec, reason)
        act.checks = list(act.order.checks)
        if not act.checks:
            return self._land(act)
        try:
            if act.repo is not None:
                act.repo.add_worktree(act.rec.id, act.attempt.workdir)
        except CoordinatorError as e:
            return self.fail(act, f"could not prepare a working copy for the checks: {e}")
        # The checks verify the delegated work on a throw-away copy of the default branch.
        act.rules = Ruleset(writable=tuple(sorted({str(act.attempt.folder), str(act.attempt.workdir)})))
        act.phase = "check"
        act.check_index = 0
        act.deadline = self.sup.clock() + _timeout(act.order, act.agent)
        self.active[act.token] = act
        self._start_check(act)

    def _refused(self, act: Active, message: str) -> None:
        """The fork server ran nothing for this attempt's specialist or check."""
        if act.cancelled:  # cancelled while the start was on its way: it stays cancelled
            return self._end_cancelled(act)
        if act.phase == "check":
            return self.fail(act, f"could not run check `{act.checks[act.check_index]}`: {message}")
        return self.fail(act, f"could not start {act.agent.name}: {message}")

    def _start_check(self, act: Active) -> None:
        command = act.checks[act.check_index]
        log = act.attempt.check_log(act.check_index)
        try:
            self.sup.spawner.start(SpawnRequest(
                argv=("/bin/sh", "-c", command), env=runner.environment(act.agent, act.attempt, self.ws, self.inherited),
                cwd=str(act.attempt.workdir), log_path=str(log),
                token=f"{act.token}.c{act.check_index}", sandbox=act.rules))
        except (SandboxError, CoordinatorError) as e:
            self.fail(act, f"could not run check `{command}`: {e}")

    def _after_check(self, act: Active, code: int, *, alone: bool = False) -> None:
        token = f"{act.token}.c{act.check_index}"
        try:
            if not alone:
                self.sup.spawner.kill_tree(token, grace=0.5)
        except CoordinatorError as e:
            if act.cancelled:
                self.sup.say(f"{act.rec.id}: cancelled, but processes of a check survived SIGKILL: {e}")
                return self._end_cancelled(act)
            return self.fail(act, f"processes of a check survived SIGKILL: {e}")
        if act.cancelled:
            return self._end_cancelled(act)
        command = act.checks[act.check_index]
        log = act.attempt.check_log(act.check_index)
        if act.timed_out:
            return self.fail(act, f"check `{command}` timed out; output: {runner.tail(log, 400) or '(none)'}")
        if code != 0:
            out = runner.tail(log, OUTPUT_TAIL)
            return self.fail(act, f"check `{command}` failed with exit code {code}; "
                                  + (f"output:\n{out}" if out else "no output"))
        act.check_lines.append(f"`{command}` passed")
        act.check_index += 1
        if act.check_index < len(act.checks):
            return self._start_check(act)
        self._land(act)

    def _land(self, act: Active) -> None:
        rec = act.rec
        sha = None
        if act.repo is not None:
            with contextlib.suppress(CoordinatorError):
                act.repo.discard(act.attempt.workdir)  # whatever the checks wrote is thrown away
            if act.committed:
                try:
                    sha = act.repo.merge(rec.id)
                except MergeConflict as e:
                    return self.fail(act, "merge conflict with work that landed meanwhile in: "
                                          + ", ".join(e.paths))
                except GitError as e:
                    return self.fail(act, f"could not merge: {e}")
                rec.commit = act.committed
                self.sup.note_head(act.repo.name, sha, base=getattr(act.repo, "last_base", None))
        summary = act.result.summary if act.result else "done"
        rec.report = {"summary": summary,
                      "changed": [f"{act.repo.name}/{p}" for p in act.verdict.commit_paths()]
                      if act.repo and act.verdict else [],
                      "checks": act.check_lines, "merge": sha}
        self._end(act, "done", act.agent.name, note=f"commit {act.committed[:10]}" if act.committed else None)

    # -- endings ---------------------------------------------------------------------------------------
    def _end_outcome(self, act: Active, result: results.Result) -> None:
        rec, who = act.rec, act.agent.name
        rec.report = {"summary": result.summary, "outcome": result.outcome}
        if result.outcome == "halt-with-note":
            self._end(act, "halted", who, note=_short(result.summary))
        elif result.outcome == "route-to":
            assert result.agent is not None
            rec.report["routed_to"] = rec.routed_to = self._plan_follow_up(rec, result.agent)
            self._end(act, "routed", who, note=f"to {result.agent}")
        elif result.outcome == "requeue-with-blocker":
            rec.blocker = result.blocker
            self._end(act, "waiting", who, note=f"blocker: {result.blocker}")
        else:
            reason = f"{who} reported blocked: {result.summary}"
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

    def _deliver(self, act: Active, status: str, actor: str, *, note: str | None = None) -> None:
        """Deliver the outbox of a decided attempt, once."""
        if act.delivered:
            return
        act.delivered = True
        files = _outbox_files(act.attempt.outbox, act.undelivered)
        if not files:
            return
        # On disk first, with how the attempt ends: a crash while its orders are taken ends it
        # so at the next start, which delivers the rest (`recover`); run again, the attempt
        # would send every one of them a second time.
        rec = act.rec
        rec.running = {**(rec.running or {}), "ending": {"status": status, "actor": actor, "note": note}}
        self.sup.store.save(rec)
        self._deliver_outbox(rec, act.agent.name, act.attempt.outbox, files, act.undelivered)

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
        act.verdict = gate.judge(changes, repo=act.repo.name, files=act.order.files, writes=writes)
        if not act.verdict.allowed:
            self._deny(act, act.verdict)
            return False
        return True

    def _refused_writes(self, act: Active, tail: str) -> None:
        """Writes the kernel refused, as the output tail tells of them: the orchestrator's are
        seed 001's first fire-able signal (`artifact`: it may write nothing), a specialist's
        are `scope` when they name a path in the workspace (a specialist's own tests may well
        print refusals of paths elsewhere). A refusal the program kept to itself is not seen."""
        refused = [line.strip() for line in tail.splitlines() if REFUSED.search(line) and TRIED.search(line)]
        if not act.agent.is_orchestrator:
            root = str(self.ws.root) + os.sep
            refused = [line for line in refused if root in line]
        if not refused:
            return
        kind, who = ("artifact", "orchestrator") if act.agent.is_orchestrator else ("scope", "specialist")
        self.sup.signal(kind, agent=act.agent.name, order=act.rec.id,
                        evidence=f"{who} tried to write; refused: " + " | ".join(refused[:3])[:280])

    def _deny(self, act: Active, verdict: gate.Verdict) -> None:
        rec = act.rec
        lines = [f"{act.repo.name if act.repo else ''}/{gate.describe(c)} — {why}" for c, why in verdict.offending]
        rec.report = {"summary": f"{act.agent.name} wrote outside its permission; every change was discarded",
                      "offending": lines}
        kind = "artifact" if act.agent.is_orchestrator else "scope"
        self.sup.signal(kind, agent=act.agent.name, order=rec.id, evidence="; ".join(lines)[:300])
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
        rec.report = {"summary": f"attempt {act.attempt.number} failed: {reason}"}
        if not act.delivered:  # the sender learns that the orders it wrote were not sent
            for path in _outbox_files(act.attempt.outbox, act.undelivered):
                act.undelivered.append(f"{path.name}: not delivered: attempt {act.attempt.number} failed; "
                                       f"kept in {path.parent}")
        self._finish(act)  # after the report: it adds what the outbox could not deliver
        rec.failures.append(reason)
        if len(rec.failures) >= act.agent.max_failures:
            self.block(rec, f"failed {len(rec.failures)} time(s); last: {reason}")
        else:
            self.sup.move(rec, "queued", audit.SUPERVISOR, note=f"attempt {act.attempt.number} failed: {reason}")

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

    # -- follow-ups: a route's next order, a block's investigation ------------------------------------
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
        # The same follow-up again (a retried order blocked again, a second route of the same
        # work) names the last one that failed: the repeat rule is for agents, and the next
        # agent sees what came before.
        ended = self.sup.intake.history.ended(made.sender, made.to, made.objective)
        if ended and not any(p in made.references for p, _ in ended) and len(made.references) < 100:
            made = dataclasses.replace(made, references=(*made.references, ended[-1][0]))
        return dataclasses.replace(made, id=planned["id"])

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
        if not keep and _has_entries(act.attempt.scratch):  # an empty one stays: nothing to free
            try:
                durable.remove_tree(act.attempt.scratch)  # no recursion: the specialist chose its depth
            except OSError as e:
                self.sup.say(f"{act.rec.id}: could not remove the scratch folder: {e}; remove it by hand")

    # -- outbox -------------------------------------------------------------------------------------
    def _deliver_outbox(self, rec: Record, sender: str, box: Path, files: list[Path],
                        undelivered: list[str]) -> None:
        """Work orders the specialist wrote into $COORD_OUTBOX (`files`, see `_outbox_files`),
        stamped with its name; each leaves the outbox as it is taken, so what is left there
        was not delivered."""
        for path in files:
            to = path.parent.name if path.parent != box else _to_of(box, path)
            if to not in self.sup.config.agents:
                self.sup.say(f"{rec.id}: outbox file {path.name} names no known recipient; not delivered")
                undelivered.append(f"{path.name}: names no known recipient (give it `to: <agent>` or "
                                   f"write it into $COORD_OUTBOX/<agent>/); kept in {path.parent}")
                continue
            # A copy, not the file: a process of the attempt may still hold it open for writing.
            shown_as = f"outbox of {rec.id}/{path.name}"
            taken = self.sup.intake.claim_copy(path, to, sender=sender, shown=shown_as, within=box)
            if taken:
                claimed, size = taken
                child = self.sup.file_claimed(claimed, to, shown=shown_as, sender=sender, size=size)
                rec.children.append(child.id)

    # -- crash recovery ------------------------------------------------------------------------------
    def recover(self, rec: Record) -> None:
        """`rec` was running when the supervisor died: landed already, or a failed attempt."""
        info = rec.running or {}
        number = int(info.get("number", rec.attempts))
        agent = self.sup.config.agents.get(rec.to)
        ending = _ending(info)
        if ending is not None and agent is not None:  # it was decided, and its outbox being delivered
            self._deliver_rest(rec, agent, number)
        repo_name = info.get("repo")
        # Ended (halted, routed, ...) before its request's children: it ends as it was decided,
        # never resumed as a request that waits for them (that would end it done).
        if ending is not None and agent is not None and ending["status"] != "running":
            if repo_name:
                with contextlib.suppress(CoordinatorError):
                    self.repo(str(repo_name)).remove_worktree(rec.id, Path(str(info.get("workdir", ""))), keep=False)
            rec.running = None
            self.sup.say(f"recovery: {rec.id}'s attempt {number} had ended {ending['status']} and was "
                         "delivering its outbox: the rest is delivered, and it is not run again")
            return self._close(rec, ending["status"], ending["actor"], note=ending["note"])
        if agent is not None and agent.is_orchestrator and rec.children:
            return self._resume_request(rec, agent, number)
        if repo_name:
            with contextlib.suppress(CoordinatorError):
                repo = self.repo(str(repo_name))
                sha = repo.landed(rec.id, number)
                if sha:
                    if ending is None and agent is not None:  # merged, then stopped before its outbox
                        self._deliver_rest(rec, agent, number)
                    rec.commit = sha
                    rec.running = None
                    rec.report = {"summary": "landed before the supervisor stopped", "merge": sha}
                    self.sup.move(rec, "done", rec.to, note="recovered after a crash")
                    self._note_landed(repo, sha)
                    return
                repo.remove_worktree(rec.id, Path(str(info.get("workdir", ""))), keep=False)
        rec.running = None
        rec.failures.append(f"interrupted: the supervisor stopped during attempt {number}")
        if agent is not None and len(rec.failures) >= agent.max_failures:
            self.block(rec, rec.failures[-1])
        else:
            self.sup.move(rec, "queued", audit.SUPERVISOR, note=rec.failures[-1])

    def _deliver_rest(self, rec: Record, agent: Agent, number: int) -> None:
        """A crash cut short the delivery of a decided attempt's outbox: the orders it had
        delivered (filed again by recovery, if need be, from where the crash left them) are its
        children, and what is still in its outbox is delivered now, once."""
        made_here = f"outbox of {rec.id}/"
        rec.children += [r.id for r in sorted(self.sup.records.values(), key=lambda r: r.seq)
                         if r.source.startswith(made_here) and r.id not in rec.children]
        undelivered: list[str] = []
        box = runner.attempt_folder(self.ws, rec.id, number) / "outbox"
        self._deliver_outbox(rec, agent.name, box, _outbox_files(box, undelivered), undelivered)
        if undelivered:
            rec.report = {**(rec.report or {}), "undelivered": undelivered}

    def _note_landed(self, repo: Repo, sha: str) -> None:
        """Note the head the merge of `sha` made, when the supervisor stopped before it could:
        else the tamper watch takes the supervisor's own merge for a `silent` change. Only a
        head that merge made from the head last noted; any other move is still reported."""
        known = self.sup.heads.get(repo.name, {}).get("head")
        with contextlib.suppress(CoordinatorError):
            head = repo.head()
            if known and head != known and repo.made_by_merge(head, base=known, tip=sha):
                self.sup.note_head(repo.name, head, base=known)

    def _resume_request(self, rec: Record, agent: Agent, number: int) -> None:
        """A request that had delegated keeps waiting for its children; it is not run again."""
        order = self.sup.store.load_order(rec.id)
        attempt = runner.prepare(self.ws, order, number, rec.failures)
        act = Active(rec=rec, agent=agent, order=order, attempt=attempt, rules=None,
                     started=self.sup.clock(), deadline=self.sup.clock() + _timeout(order, agent),
                     phase="children", token=attempt.token)
        if attempt.repo is not None:
            act.repo = self.repo(attempt.repo)
        self.waiting_requests[rec.id] = act


def outcome_problem(order: WorkOrder, result: results.Result) -> str | None:
    """Why the order's branching does not allow `result`, or None."""
    if result.outcome in ("done", "blocked"):
        return None
    for b in order.branching:
        if b.action == result.outcome and (b.action != "route-to" or b.agent == result.agent):
            return None
    allowed = ", ".join(f"{b.action}{'-' + b.agent if b.agent else ''}" for b in order.branching)
    return (f"outcome {result.outcome}{' to ' + result.agent if result.agent else ''} is not allowed by the "
            f"order's branching ({allowed})")


def _as_judged(workdir: Path, paths: list[str], judged: gate.Snapshot) -> None:
    """GateError unless every path of the change is, now that git has read it, what the gate
    judged: nothing may change between the two (a process that outlived its attempt, say).
    Compared on the file, not the blob, so git's own conversions (line endings, filters) are
    no difference."""
    changed = sorted(p for p in paths if not gate.unchanged_since(workdir, p, judged.get(p)))
    if changed:
        raise GateError(f"{', '.join(changed[:5])} changed after the permission gate judged it; nothing was "
                        "committed")


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
    return WorkOrder(id=None, sender=sender, to=to, objective=order.objective,
                     acceptance=order.acceptance, files=order.files, branching=branching,
                     priority=order.priority, references=(*order.references, order.id or ""),
                     parent=order.parent)


def investigation(rec: Record, target: str, reason: str) -> WorkOrder:
    objective = f"Find out why {rec.id} ({rec.to}) is blocked and say what would unblock it"
    return WorkOrder(
        id=None, sender="coordinator", to=target, objective=objective[:280],
        acceptance=(orders.Acceptance(text=f"The summary names the cause of {rec.id}'s failures"),
                    orders.Acceptance(text="The summary proposes the next step: a new work order or dropping it"),
                    orders.Acceptance(text=f"Last failure considered: {_short(quoted(reason))}")),
        files=(), branching=(Branch(action="halt-with-note", when=f"{rec.id} should be dropped"),),
        priority="high", references=(rec.id,))


def _note_undelivered(act: Active) -> None:
    """The sender learns from the report which outbox files were not delivered, not only
    from the supervisor's log."""
    if act.undelivered:
        act.rec.report = {**(act.rec.report or {}), "undelivered": act.undelivered}


ENDINGS = ("done", "halted", "routed", "waiting", "blocked", "running")


def _ending(running: dict[str, Any]) -> dict[str, Any] | None:
    """How a decided attempt ends, as `_deliver` wrote it before taking its outbox (None: it
    was not decided, or what the record says is not one)."""
    ending = running.get("ending")
    if not isinstance(ending, dict) or ending.get("status") not in ENDINGS \
            or not isinstance(ending.get("actor"), str) or not isinstance(ending.get("note"), str | None):
        return None
    return ending


def _outbox_files(box: Path, undelivered: list[str]) -> list[Path]:
    """The files in an outbox (sorted; no links, no dot-files); what cannot be read is said in
    `undelivered`. Nothing is taken from where an outbox replaced by a link points."""
    try:
        if not stat.S_ISDIR(os.lstat(box).st_mode):
            return []
    except OSError:
        return []
    found: list[Path] = []

    def shown(folder: str) -> str:
        rel = os.path.relpath(folder, box)
        return f"{rel[:60]}...{rel[-60:]}" if len(rel) > 130 else rel

    # An explicit stack and a depth limit, not os.walk: that recurses, and the specialist
    # chose how deep its outbox goes. Links are listed (and skipped below), never entered.
    todo = [(str(box), 0)]
    while todo:
        folder, depth = todo.pop()
        try:
            with os.scandir(folder) as it:
                items = list(it)
        except OSError as e:
            undelivered.append(f"{shown(folder)}: not read ({e.strerror}); nothing in it was delivered")
            continue
        for item in items:
            if not item.is_dir(follow_symlinks=False):
                found.append(Path(item.path))
            elif depth + 1 < gate.MAX_DEPTH:
                todo.append((item.path, depth + 1))
            else:
                undelivered.append(f"{shown(item.path)}: over {gate.MAX_DEPTH} folders deep in the "
                                   "outbox; not read, nothing in it was delivered")
    return [p for p in sorted(found) if not p.is_symlink() and p.is_file() and not p.name.startswith(".")]


def _to_of(box: Path, path: Path) -> str | None:
    """The recipient an outbox file names, even when the rest of it is invalid: then it is
    delivered all the same and rejected there, with its errors on the board."""
    data = runner.read_untrusted(path, orders.MAX_ORDER_BYTES, within=box)
    return None if data is None else orders.recipient(data, path=path.name)


def _timeout(order: WorkOrder, agent: Agent) -> float:
    if order.timeout:
        with contextlib.suppress(ValueError):
            return parse_duration(order.timeout)
    return agent.timeout


def _fmt(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"


def _short(text: str, n: int = 160) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"


def _has_entries(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:
        return False
