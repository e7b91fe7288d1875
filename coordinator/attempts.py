"""Running attempts: spawn, watch, judge, check, commit, merge; or fail and say why.

An attempt goes through phases: `specialist` (the agent's process, or an LLM
call in a worker thread), then `check` (each acceptance check, one process at a
time, in the same sandbox), then it lands. Every exit path ends in exactly one
status change through `Supervisor.move`.

`AttemptRunner` is built in layers, each in its module: `followups` and `outbox`
(what an ended attempt sends on), `endings` (how an attempt ends), `interruptions`
(an attempt a crash cut short); this one starts attempts, watches them, and judges
what the specialist left: its result, its change, its checks, its merge.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import audit, gate, results, runner
from .checkout import DirtyCheckout
from .config import Agent, parse_duration
from .errors import CoordinatorError, GateError, GitError, SandboxError, StateError
from .gitrepo import DetachedHead
from .inboxfiles import printable
from .interruptions import Interruptions
from .landlock import Ruleset
from .orders import WorkOrder
from .outbox import _note_undelivered
from .repos import BranchInTheWay, MergeConflict, Repo
from .runner import Attempt
from .spawner import SIGKILL_WAIT, Event, Exit, Refused, SpawnRequest
from .store import Record, ended_undone, iso, route_end, via_route, waits_for

if TYPE_CHECKING:
    from .control import CancelAnswer
    from .supervisor import Supervisor

OUTPUT_TAIL = 1500
# Paths of a merge conflict named in the failure: all 6,000 of a generated folder made a reason
# of 170 KB, and the next attempt's brief too long to pass as `{brief_text}` (E2BIG).
MAX_PATHS_SHOWN = 20
KILL_RETRY = 5.0  # seconds before the watch tries again to kill processes that survived a kill
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL when an attempt times out
CANCEL_GRACE = 1.0  # ... and when it is cancelled
# An agent whose last run ended within ARM_WITHIN seconds gets its next order armed while its
# slots are full (`AttemptRunner.arm`); an armed start not begun within ARM_AGE is dropped.
ARM_WITHIN = 0.1
ARM_AGE = 0.5
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
    started: float  # the supervisor's clock (the wall clock): what records and briefs say
    deadline: float  # on the runner's `timer`, as every duration of an attempt is
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
    gone: bool = False  # armed, and told to go before its start is recorded (`AttemptRunner._go_early`)
    thread: threading.Thread | None = None
    thread_outcome: Any = None
    delivered: bool = False  # its outbox was taken (once the attempt was decided)
    undelivered: list[str] = field(default_factory=list)  # outbox files that named no known agent
    # On the runner's `timer`: when the timeout began counting, when the attempt was last seen
    # to print or beat, when `watch` last looked; and the newest file time it saw then.
    began: float = 0.0
    quiet_since: float = 0.0
    looked: float = 0.0
    seen_activity: float | None = None
    ends_seen: int = -1  # `AttemptRunner.ends` when it started; -1: started before this supervisor
    # On `timer`: since when its start (or its check's) waits in the spawn server for room; None
    # when it does not. The wait is no time of its timeout, nor silence.
    room_since: float | None = None
    # Cancelled while its processes are being stopped: who cancelled it, and the requests of the
    # commands waiting to hear that it is (`AttemptRunner.cancel_soon`).
    cancelled_by: str = ""
    cancel_why: str = ""  # cancelled as the work of an order that was: why (`control.cancel`)
    cancel_waiting: list[CancelAnswer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.quiet_since = self.looked = self.began


class AttemptRunner(Interruptions):
    """Owns the running attempts of one supervisor."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.ws = sup.ws
        self.active: dict[str, Active] = {}  # token -> attempt
        self.waiting_requests: dict[str, Active] = {}  # LLM orchestrator requests waiting on children
        self._repos: dict[str, Repo] = {}
        self.inherited = runner.inherited_environment()  # the supervisor's, as it started
        # The clock of durations (timeouts, stale flags, kill retries); the supervisor's own clock
        # says when things happened. On the wall clock, an NTP correction or a date set by hand
        # fired every timeout at once (a step forward) or held it off for as long (a step back).
        # Monotonic: such a step moves nothing, and the time a machine sleeps is not counted (its
        # processes did not run either). A test may set another.
        self.timer: Callable[[], float] = time.monotonic
        # Orders ended since the supervisor started, each with the count of endings at its last
        # end: what ended before an attempt started, told apart without a clock (see `_done_before`).
        self.ends = 0
        self.ended: dict[str, int] = {}
        # The attempt prepared ahead for the order that starts next (`arm`), since when (on
        # `timer`); and the agents whose last run was quick enough to arm for.
        self.armed: Active | None = None
        self.armed_at = 0.0
        self.quick: set[str] = set()
        self.unarmable: str | None = None  # the order last found to have files: not looked at again

    # -- starting -----------------------------------------------------------------------------------
    def repo(self, name: str) -> Repo:
        if name not in self._repos:
            self._repos[name] = Repo(self.ws.repos / name)
        self._repos[name].pinned = self.sup.heads.get(name, {}).get("branch")  # noted by the tamper watch
        return self._repos[name]

    def start(self, rec: Record) -> bool:
        sup = self.sup
        if self.armed is not None and self.armed.rec is rec:
            if not self.armed.gone and self.timer() - self.armed_at > ARM_AGE:  # its namespace saw the
                self.disarm()                                                    # mounts of then: a new start
            else:
                act, self.armed = self.armed, None
                sup.intake.accepted.pop(rec.id, None)  # left in memory by `arm` for this start
                if act.gone:
                    return self._launch(act, lambda: None)
                self._stamp_start(act)
                return self._launch(act, lambda: sup.spawner.go(act.token))
        agent = sup.config.agents[rec.to]
        try:
            order = sup.intake.order_of(rec.id)
        except CoordinatorError as e:
            self._fail_hard(rec, f"cannot read the order: {e}")
            return False
        number = rec.attempts + 1
        attempt = runner.prepare(self.ws, order, number, rec.failures, sup.intake.order_json(order))
        tick, timeout = self.timer(), _timeout(order, agent)
        act = Active(rec=rec, agent=agent, order=order, attempt=attempt, rules=None,
                     started=sup.clock(), deadline=tick + timeout, began=tick, ends_seen=self.ends)
        act.token = attempt.token
        try:
            if attempt.repo is not None:
                act.repo = self.repo(attempt.repo)
                act.repo.add_worktree(rec.id, attempt.workdir)
                act.before = gate.snapshot(attempt.workdir)
            act.rules = runner.ruleset(agent, order, attempt, self.ws)
        except (DetachedHead, BranchInTheWay) as e:  # where the order starts and lands is the person's to say
            rec.attempts = number
            self._cleanup(act)
            self.wait_for_person(act, e.blocker(rec.id), why="did not start")
            return False
        except CoordinatorError as e:
            rec.attempts = number
            self._cleanup(act)
            self.fail(act, f"could not prepare the working copy: {e}")
            return False
        if agent.llm is not None:
            self._launch(act, None)
            from .llmrun import start_llm_attempt
            start_llm_attempt(self, act)
            return True
        return self._launch(act, lambda: sup.spawner.start(self._request(act)))

    def _stamp_start(self, act: Active) -> None:
        """Set the clocks of the armed `act` as it is told to go."""
        tick = self.timer()
        act.started, act.ends_seen = self.sup.clock(), self.ends
        act.began = act.quiet_since = act.looked = tick
        act.deadline = tick + _timeout(act.order, act.agent)

    def _go_early(self, events: list[Event]) -> None:
        """Tell the armed order to go as soon as the attempt whose slot it waits for has ended,
        before that attempt is judged: one at a time, the judging (some 0.3 ms) no longer lies
        between one quick run and the next. Its move to running is made after the judging, in
        the same step (`reap`): no commit sees both running, and its history has it start
        after the one before it ended. An order re-queued by that judging (a failed attempt, a
        follow-up) runs after the one armed, as an order that came in while it started.

        Only when the judging can change nothing of what starts next: the exit is the one event
        of the step (another could release a more urgent order), of an attempt of the armed
        order's agent with nothing of it running on: all its processes gone (`alone`), no check
        of the order to run after it (checks are part of the attempt, in its slot), no files (a
        change to judge, commit and merge: a crash in that while charged the armed order an
        interrupted attempt too, and the judging is no longer short beside the start), not an
        orchestrator's request (its end may wait for its orders), not cancelled; no order waits
        for it (`blocked_by`, a blocker) and no request waits for its orders (done, it may
        release one that runs first); no model's call under way (one ending in this step may
        release one too); and the armed order still queued (a `cancel` served this step) and
        first in line across the team (`first_in_line`); the supervisor not stopping."""
        armed = self.armed
        if (armed is None or armed.gone or self.sup.stopping or self.timer() - self.armed_at > ARM_AGE
                or len(events) != 1 or self.waiting_requests or armed.rec.status != "queued"):
            return
        ex = events[0]
        act = self.active.get(ex.token)
        if (act is None or not isinstance(ex, Exit) or not ex.alone or act.phase != "specialist"
                or act.agent is not armed.agent or act.order.checks or act.repo is not None
                or act.agent.is_orchestrator
                or act.cancelled or len(self.active) > self.sup.config.max_parallel
                or self.sup.awaited(act.rec.id) or any(a.thread is not None for a in self.active.values())
                or not self.sup.first_in_line(armed.rec)):
            return
        self._stamp_start(armed)
        try:
            self.sup.spawner.go(armed.token)
        except CoordinatorError:
            return  # sent again at its start, which says why it cannot
        armed.gone = True

    def _record_gone(self, act: Active) -> None:
        """Record the start of `act`, told to go by `_go_early`, now that the attempts that
        ended are judged. An order the judging ended (cancelled as the work of a request
        cancelled with it) is never recorded running: its process is killed as a cancelled
        attempt's, and counted as an attempt, its folders and log kept, as a cancelled one's are."""
        if act.rec.status == "queued":
            self.start(act.rec)
            return
        self.armed = None
        act.cancelled = True
        self.sup.whole(act.rec)
        act.rec.attempts = act.attempt.number
        self.sup.store.save(act.rec, sync=False)
        self.active[act.token] = act  # its slot stays taken until its exit is reaped
        with contextlib.suppress(CoordinatorError):  # a server gone kills it anyway
            self.sup.spawner.kill_soon(act.token, grace=CANCEL_GRACE)
        act.kill_due = self.timer() + CANCEL_GRACE + SIGKILL_WAIT + KILL_RETRY

    def _launch(self, act: Active, send: Callable[[], None] | None) -> bool:
        """Record `act` as running and `send` its start. Start first, record after: the record
        write is off the drop-to-spawn path, and the loop goes on while the fork server
        sandboxes and starts the child (a refusal comes back with the exits, see `reap`). A
        crash in between is safe: the fork server kills its children when the supervisor dies,
        and the order, still `queued` on disk, simply runs again."""
        sup, rec, number = self.sup, act.rec, act.attempt.number
        rec.attempts = number
        rec.running = {**act.attempt.as_json(), "started": act.started,
                       "deadline": act.started + (act.deadline - act.began)}
        self.active[act.token] = act
        try:
            if send is not None:
                send()
        except CoordinatorError as e:
            del self.active[act.token]
            sup.move(rec, "running", audit.SUPERVISOR, note=f"attempt {number}")
            self.fail(act, f"could not start {act.agent.name}: {e}")
            return True
        sup.move(rec, "running", audit.SUPERVISOR, note=f"attempt {number}")
        if send is not None and act.agent.name == sup.config.orchestrator:
            self._count_brief(act)
        return True

    def _request(self, act: Active) -> SpawnRequest:
        return SpawnRequest(argv=runner.argv(act.agent, act.attempt, self.ws),
                            env=runner.environment(act.agent, act.attempt, self.ws, self.inherited),
                            cwd=act.attempt.named["workdir"], log_path=act.attempt.named["log"], token=act.token,
                            sandbox=act.rules)

    # -- starting ahead --------------------------------------------------------------------------------
    def arm(self, rec: Record) -> None:
        """Prepare the next attempt of `rec`, the order that starts when a slot frees, and have
        the spawn server make it ready up to the exec: its `start` then only says go. One at a
        time, a quick specialist's start no longer waits for the folders, the sandbox and
        the spawn server's launcher thread after the last one ended.

        Only for a command specialist's order with no files (its working copy, made at its
        start, must hold what lands before), only when its agent runs one order at a time (with
        more at once, the others run while one starts: armed, 4 at once was some 10% slower),
        and only after a quick run of its agent (ARM_WITHIN): for an agent that works for
        minutes it would be made for nothing. An armed order stays queued; nothing of it is
        kept when it does not start (`disarm`). What cannot be prepared is left to its start,
        which says why."""
        sup = self.sup
        agent = sup.config.agents.get(rec.to)
        if self.armed is not None or sup.offline or agent is None or not self.armable(agent) \
                or rec.id == self.unarmable:
            return
        try:
            order = sup.intake.peek_order(rec.id)
        except (CoordinatorError, OSError):  # said by its start
            return
        if order.repo is not None:
            self.unarmable = rec.id
            return
        number = rec.attempts + 1
        try:
            attempt = runner.prepare(self.ws, order, number, rec.failures, sup.intake.order_json(order))
        except OSError:
            runner.unprepare(self.ws, rec.id, number)
            return
        act = Active(rec=rec, agent=agent, order=order, attempt=attempt, rules=None, started=0.0, deadline=0.0)
        act.token = attempt.token
        try:
            act.rules = runner.ruleset(agent, order, attempt, self.ws)
            sup.spawner.arm(self._request(act))
        except CoordinatorError:
            runner.unprepare(self.ws, rec.id, number)
            return
        self.armed, self.armed_at = act, self.timer()

    def armable(self, agent: Agent) -> bool:
        """Whether `agent`'s next order may be armed (see `arm`)."""
        return agent.llm is None and agent.max_parallel == 1 and agent.name in self.quick

    def disarm(self) -> None:
        """Drop the armed attempt (`arm`): it never runs, and its folders go. One told to go
        already (`_go_early`) runs: it is recorded at the end of the `reap` that sent it, or,
        cut off by a crash, counted at the next start by its log."""
        act = self.armed
        if act is None or act.gone:
            return
        self.armed = None
        with contextlib.suppress(CoordinatorError):  # a server gone runs nothing either
            self.sup.spawner.disarm(act.token)
        runner.unprepare(self.ws, act.rec.id, act.attempt.number)

    def _count_brief(self, act: Active) -> None:
        """The orchestrator's command reads its brief: that is in its context (SPEC §8), as its
        current brief, replacing the brief of an earlier attempt of the same order."""
        ledger = self.sup.ledger
        ledger.items = [i for i in ledger.items if not (i.ref == act.rec.id and i.kind == "brief")]
        self.sup.ledger_add(act.rec.id, "brief", act.attempt.brief_text, note=f"brief of {act.rec.id}, attempt {act.attempt.number}")

    # -- watching -------------------------------------------------------------------------------------
    def reap(self) -> bool:
        """Handle every process exit and finished LLM call; True when any."""
        progress = False
        events = self.sup.spawner.poll()
        self._go_early(events)
        for token, started in self.sup.spawner.room_news():  # read with the events, told before them
            act = self.active.get(token) or self.active.get(token.rsplit(".c", 1)[0])
            if act is not None:
                self._room(act, started)
        for ex in events:
            act = self.active.get(ex.token) or self.active.get(ex.token.rsplit(".c", 1)[0])
            if act is None:
                continue
            progress = True
            if isinstance(ex, Refused):
                self._refused(act, ex.message, room=ex.room)
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
        if self.armed is not None and self.armed.gone:
            self._record_gone(self.armed)
        if self.waiting_requests:
            from .orchestration import check_requests
            progress |= check_requests(self)
        return progress

    def watch(self, now: float) -> None:
        """Kill what overran its timeout; flag what has gone silent. `now`: the supervisor's
        clock, the clock of file times; durations are measured on `timer`."""
        tick = self.timer()
        if self.armed is not None and tick - self.armed_at > ARM_AGE:  # the slots stay full: its agent
            self.quick.discard(self.armed.agent.name)                   # is armed for after a quick run
            self.disarm()
        for act in list(self.active.values()):
            if act.room_since is not None:  # nothing of it runs yet: no timeout, no silence
                continue
            if tick > act.deadline and not act.timed_out:
                act.timed_out = True
                self.sup.say(f"{act.rec.id}: timed out after {_fmt(act.deadline - act.began)}; killing it")
                self._stop_model(act, "the order's timeout ran out while the model was answering")
                self._kill_soon(act, tick, grace=KILL_GRACE)
            elif act.kill_due is not None and tick >= act.kill_due:
                failed = self._kill(act, tick, grace=KILL_GRACE)
                if failed and act.cancel_waiting:  # said, and cancelled all the same (as `cancel`)
                    self._answer_cancel(act, warning=failed)
            limit = act.agent.stale_after
            # Seen active within the limit, it cannot be silent that long: no look at its files.
            if not act.rec.stale and tick - act.quiet_since > limit and self._silent_for(act, now, tick) > limit:
                act.rec.stale = True
                self.sup.event(act.rec, f"stale (no output or heartbeat for {_fmt(limit)})")

    @staticmethod
    def _silent_for(act: Active, now: float, tick: float) -> float:
        """Seconds on the timer since the attempt last printed or touched its heartbeat. File
        times are wall-clock times, which a step of the clock moves against the timer: output
        new since the last look is taken to have come as long ago as its file time says, but
        never before that look."""
        latest = runner.last_activity(act.attempt, 0.0)
        if latest != act.seen_activity:
            act.seen_activity = latest
            act.quiet_since = tick - min(max(now - latest, 0.0), tick - act.looked)
        act.looked = tick
        return tick - act.quiet_since

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

    def _kill_soon(self, act: Active, now: float, *, grace: float) -> None:
        """Start killing the attempt's processes and go on: the attempt is decided when its exit
        comes. Waited for, one kill after another, four attempts that timed out together and
        ignored SIGTERM stalled the loop for 8 s, the last killed 8 s after its timeout. Should
        no exit come (a process stuck in the kernel), the watch kills again, and says so."""
        try:
            self.sup.spawner.kill_soon(self._current_token(act), grace=grace)
        except CoordinatorError:
            self._kill(act, now, grace=grace)
            return
        act.kill_due = now + grace + SIGKILL_WAIT + KILL_RETRY

    def kill_all(self) -> None:
        """Kill every attempt (a stop now). The kills all start at once, then each is waited
        for: one after another, eight attempts that ignored SIGTERM took 4.2 s to stop "now"."""
        self.disarm()
        acts = list(self.active.values())
        for act in acts:
            self._stop_model(act, "the supervisor is stopping now")
            with contextlib.suppress(CoordinatorError):  # the wait below tries again and says why
                self.sup.spawner.kill_soon(self._current_token(act), grace=0.5)
        for act in acts:
            failed = self._kill(act, self.timer(), grace=0.5, then="the next start kills what is left")
            if act.cancel_waiting:  # its exit is not waited for any more: it ends cancelled now
                self._finish(act)
                self._answer_cancel(act, warning=failed)

    def cancel(self, rec: Record) -> str | None:
        """Kill `rec`'s attempt (its caller moves it to cancelled); the line said when processes
        of it survived the kill, for the user who cancelled: it is cancelled all the same."""
        for act in list(self.active.values()):
            if act.rec.id == rec.id:
                act.cancelled = True
                self._stop_model(act, "cancelled")
                failed = self._kill(act, self.timer(), grace=1.0)
                if failed:
                    return failed
        return None

    def cancel_soon(self, rec: Record, by: str, waiting: CancelAnswer, *, why: str = "",
                    join: bool = False) -> bool:
        """Start killing `rec`'s running attempt and go on; the command waiting on `waiting` is
        answered once no process of it is left and the order is cancelled (SPEC §7), or the
        kill failed (said, and cancelled all the same). Waited for here, each cancel of
        an attempt that ignored SIGTERM held every other order for a second and more, and
        several cancels waited one after another. False when nothing of it runs as a process
        (a model's call, a request waiting for its children) or the kill could not be sent:
        the caller cancels it at once (`cancel`). StateError when a cancel of it is under way,
        unless `join` (it is cancelled as the work of a request being cancelled): then `waiting`
        waits for that cancel too. `why`: why it is cancelled, said in its report."""
        act = next((a for a in self.active.values() if a.rec.id == rec.id), None)
        if act is None or (act.agent.llm is not None and act.phase == "specialist"):
            return False
        if act.cancelled:
            if join:  # waited for with the cancel under way; with none to wait on, cancelled at once
                if act.cancel_waiting:
                    act.cancel_waiting.append(waiting)
                return bool(act.cancel_waiting)
            raise StateError(f"{rec.id} is being cancelled already: its processes are being stopped")
        # On disk before the kill starts: a crash before the processes are gone ends it cancelled
        # at the next start (`Interruptions`), as the command that asked may have been told, and
        # saying who cancelled it and why (left to the step's end, a kill -9 meanwhile lost it).
        rec.running = {**(rec.running or {}), "cancelled_by": by, **({"cancel_why": why} if why else {})}
        self.sup.store.save(rec)
        try:
            self.sup.spawner.kill_soon(self._current_token(act), grace=CANCEL_GRACE)
        except CoordinatorError:
            return False  # cancelled at once by the caller, as the record now says
        act.cancelled, act.cancelled_by, act.cancel_why = True, by, why
        act.cancel_waiting.append(waiting)
        act.kill_due = self.timer() + CANCEL_GRACE + SIGKILL_WAIT + KILL_RETRY
        return True

    def _end_cancelled(self, act: Active) -> None:
        if not act.cancel_waiting:
            return super()._end_cancelled(act)
        self._finish(act)
        self._answer_cancel(act)

    def _answer_cancel(self, act: Active, *, warning: str | None = None) -> None:
        """The order of a cancelled attempt is cancelled; the commands waiting are told."""
        from . import control

        waiting, act.cancel_waiting = act.cancel_waiting, []
        control.cancelled(self.sup, act.rec, act.cancelled_by, waiting, warning=warning, why=act.cancel_why)

    @staticmethod
    def _stop_model(act: Active, why: str) -> None:
        """An LLM attempt's call under way ends at its next chunk, and no retry follows."""
        if act.thread is not None and act.thread_outcome is not None:
            act.thread_outcome.client.stop(why)

    def on_terminal(self, rec: Record) -> None:
        self.ends += 1
        self.ended[rec.id] = self.ends

    def _done_before(self, act: Active, rec: Record) -> bool:
        """Whether `rec` (done) was done when `act` started. Not by their times: after the clock
        was stepped back, an order done since looked done before the attempt, and the other way
        round (then an order requeued on it ran again at once, for as long as the step)."""
        ended = self.ended.get(rec.id)
        if act.ends_seen < 0:  # started by an earlier supervisor: its times are all there is
            return rec.updated <= iso(act.started) if ended is None else False
        return ended is None or ended <= act.ends_seen

    # -- after the specialist ---------------------------------------------------------------------------
    def _after_specialist(self, act: Active, code: int, *, alone: bool = False) -> None:
        if self.timer() - act.began < ARM_WITHIN:
            self.quick.add(act.agent.name)
        else:
            self.quick.discard(act.agent.name)
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
        tail = runner.tail(act.attempt.named["log"], OUTPUT_TAIL)
        if self._judge(act) is False:
            return None  # denied, whatever else went wrong: a probe of the boundary is never just a failure
        self._refused_writes(act, tail)  # writes the kernel refused outside what it may write
        if act.timed_out:
            return self.fail(act, f"timed out after {_fmt(act.deadline - act.began)}; last output: "
                                  f"{tail[-400:] or '(none)'}")
        result = None
        try:
            raw = runner.read_untrusted(act.attempt.named["result"], results.MAX_RESULT_BYTES, strict=True)
        except runner.NotRegularFile:
            return self.fail(act, "invalid result file: result.yaml is not a regular file")
        if raw is not None:
            try:
                result = results.parse_result(raw, path="result.yaml")
            except CoordinatorError as e:
                return self.fail(act, f"invalid result file: {e}")
        if result is not None and result.outcome == "done" and code != 0:
            # Written first, the result does not vouch for what came after: a crash half-way
            # through the edit would land the half-written change (SPEC §5: a crash fails it).
            return self.fail(act, f"{ended_by(code)} after writing `outcome: done`; a run that did not end "
                                  f"cleanly is not taken as done; last output: {tail[-400:] or '(none)'}")
        if result is None:
            if code != 0:
                return self.fail(act, f"{ended_by(code)} and wrote no result; last output: "
                                      f"{tail[-600:] or '(none)'}")
            result = results.Result(outcome="done", summary=tail[-800:] or "done (no output)")
        self.conclude(act, result)

    def conclude(self, act: Active, result: results.Result) -> None:
        """Judge the outcome, the change and the checks of a finished specialist."""
        problem = outcome_problem(act.order, result) or self._blocker_problem(act, result)
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
            if self._blocked_at_chain_end(act):
                return None
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
            if act.repo is not None and act.verdict is not None and act.verdict.commit_paths():
                # The checks verify what lands: a file git ignores was judged but not committed
                # (a compiled module, a build left in place), and must not make one pass.
                try:
                    act.repo.discard(act.attempt.workdir)
                except CoordinatorError as e:
                    return self.fail(act, f"could not prepare the working copy for the checks: {e}")
            act.phase = "check"
            act.check_index = 0
            return self._start_check(act)
        self._land(act)

    def _blocker_problem(self, act: Active, result: results.Result) -> str | None:
        """Why a requeue's blocker could never release the order anew, or None: the order
        itself, one waiting for it or one that ended undone (never to be done) would wait for
        ever, and one already done when the attempt started would queue it again at once, to
        requeue again, for ever. Blocked at once on one that ended undone, the order's agent was
        never told why, and after a retry requeued on it again."""
        blocker, rec = result.blocker, act.rec
        if result.outcome != "requeue-with-blocker" or blocker is None:
            return None
        what = "do the work, or name what is still missing"
        if blocker == rec.id:
            return f"requeue-with-blocker names this order itself ({blocker}): it would wait for ever; {what}"
        last = route_end(self.sup.records, blocker)
        if last is None:
            return None  # a line of text (or no order yet): `coordinator retry` clears it
        if last.status == "done" and self._done_before(act, last):
            return (f"requeue-with-blocker: {via_route(blocker, last)} was already done when this attempt "
                    f"started (its work is in place); {what}")
        if ended_undone(self.sup.records, (blocker,)) is not None:
            return (f"requeue-with-blocker: {via_route(blocker, last)} ended {last.status} and will never be "
                    f"done: this order would wait for it for ever; {what}")
        if waits_for(self.sup.records, blocker, rec.id):
            return (f"requeue-with-blocker: {blocker} waits for this order ({rec.id}): each would wait for the "
                    f"other for ever; {what}")
        if self._awaits(last.id, rec.id):
            return (f"requeue-with-blocker: {blocker} is a request that ends only after the orders it sent, and "
                    "it sent this one (or one that waits for it, or one routed on to a request that did): each "
                    f"would wait for the other for ever; {what}")
        return None

    def _awaits(self, request: str, order_id: str) -> bool:
        """Does `request`, an orchestrator's request waiting for the orders it sent, wait for
        `order_id` (one of them, at the end of its route, or what one of them waits for), or
        for a request at the end of one's route that waits for it: a child routed to the
        orchestrator is a request of its own, and what it sent ends before `request` does."""
        records = self.sup.records
        todo, seen = [request], {request}
        while todo:
            act = self.waiting_requests.get(todo.pop())
            if act is None:
                continue
            for c in act.rec.children:
                end = getattr(route_end(records, c), "id", c)
                if end == order_id or waits_for(records, c, order_id):
                    return True
                if end not in seen:
                    seen.add(end)
                    todo.append(end)
        return False

    def _await_children(self, act: Active) -> None:
        """An orchestrator delegated: its request is done when its children are, and checks pass."""
        self._cleanup(act)
        act.phase = "children"
        self.active.pop(act.token, None)
        self.waiting_requests[act.rec.id] = act
        self.sup.event(act.rec, f"waiting for {len(act.rec.children)} order(s): {', '.join(act.rec.children)}")
        # One that waits for this request (itself, or through others) would wait for ever, and
        # the request with it: blocked at once, as a model's plan may not name its request.
        # So would one that waits for a request above this one (a child of which was routed on
        # to the orchestrator, as this request), which ends only after this one.
        records = self.sup.records
        above = self._requests_awaiting(act.rec.id)
        for child in act.rec.children:
            rec = records.get(child)
            if rec is None or rec.status != "waiting":
                continue
            request = next((r for r in above if waits_for(records, child, r)), None)
            if request is not None:
                what = "the request it was sent for" if request == act.rec.id else \
                    f"a request that ends only after {act.rec.id}, the request it was sent for,"
                why = (f"it waits for {request}, {what} which ends only after it: "
                       "it would wait for ever; send it again without that in blocked_by")
                rec.report = {"summary": why}
                note = f"it waits for its own request {act.rec.id}" if request == act.rec.id else \
                    f"it waits for {request}, which waits for its own request {act.rec.id}"
                self.sup.move(rec, "blocked", audit.SUPERVISOR, note=note)

    def _requests_awaiting(self, request: str) -> list[str]:
        """`request`, and each request waiting for the orders it sent that waits for it: one of
        those orders was routed on to it (or to a request that waits for it)."""
        records, found = self.sup.records, [request]
        seen, grown = {request}, True
        while grown:
            grown = False
            for rid, act in self.waiting_requests.items():
                if rid not in seen and any(getattr(route_end(records, c), "id", c) in seen for c in act.rec.children):
                    seen.add(rid)
                    found.append(rid)
                    grown = True
        return found

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
        act.deadline = self.timer() + _timeout(act.order, act.agent)
        self.active[act.token] = act
        self._start_check(act)

    def _room(self, act: Active, started: bool) -> None:
        """Its start waits in the spawn server for room, or started after waiting: the timeout
        (and the silence that flags it stale) counts from when it started. Counted from the
        request, a start that waited longer than the timeout was killed before it ran, a failure
        of the agent that could block the order."""
        tick = self.timer()
        if not started:
            act.room_since = tick if act.room_since is None else act.room_since
            return
        if act.room_since is None:
            return
        waited, act.room_since = max(0.0, tick - act.room_since), None
        act.deadline += waited
        act.began += waited
        act.quiet_since += waited
        act.looked = tick

    def _refused(self, act: Active, message: str, *, room: bool = False) -> None:
        """The fork server ran nothing for this attempt's specialist or check. `room`: its
        start was killed while it waited for room."""
        if act.cancelled:  # cancelled while the start was on its way: it stays cancelled
            return self._end_cancelled(act)
        if act.phase == "check":
            return self.fail(act, f"could not run check `{act.checks[act.check_index]}`: {message}")
        if room:
            return self._never_started(act, message)
        return self.fail(act, f"could not start {act.agent.name}: {message}")

    def _never_started(self, act: Active, message: str) -> None:
        """Its start was killed while it waited for room (a timeout the loop had not yet held
        off, a stop): no failure of the agent, which never ran. The order is queued again, its
        failures as they were."""
        rec, number = act.rec, act.attempt.number
        reason = f"attempt {number} never started: {message}; queued again (not counted as a failure)"
        rec.report = {"summary": reason}
        self._finish(act)
        self.sup.move(rec, "queued", audit.SUPERVISOR, note=reason)

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
            how = ended_by(code) if code < 0 else f"failed with exit {_code(code)}"
            return self.fail(act, f"check `{command}` {how}; "
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
                    shown = [printable(p) for p in e.paths[:MAX_PATHS_SHOWN]]
                    more = len(e.paths) - len(shown)
                    return self.fail(act, "merge conflict with work that landed meanwhile in: " + ", ".join(shown)
                                          + (f" and {more} more path(s)" if more else ""))
                except DirtyCheckout as e:  # a person's work, not the agent's doing
                    # Read after "waits for" on the board: it starts with what it waits for.
                    return self.wait_for_person(act, e.blocker(rec.id))
                except GitError as e:
                    return self.fail(act, f"could not merge: {e}")
                rec.commit = act.committed
                self.sup.note_head(act.repo.name, sha, base=getattr(act.repo, "last_base", None))
        summary = act.result.summary if act.result else "done"
        changed: list[str] = []
        if act.repo is not None and act.committed:
            try:  # what was committed: a file git ignores was judged, and is not in it
                changed = [f"{act.repo.name}/{printable(p)}" for p in act.repo.changed_in(act.committed)]
            except GitError:
                changed = [f"{act.repo.name}/{printable(p)}" for p in act.verdict.commit_paths()] if act.verdict else []
        rec.report = {"summary": summary, "changed": changed,
                      "checks": act.check_lines, "merge": sha}
        self._end(act, "done", act.agent.name, note=f"commit {act.committed[:10]}" if act.committed else None)

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
        raise GateError(f"{', '.join(printable(p) for p in changed[:5])} changed after the permission gate judged it; nothing was "
                        "committed")


def ended_by(code: int) -> str:
    """How a process ended, in words: a signal by its name, not as the fork server's -N."""
    return f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with {_code(code)}"


def _code(code: int) -> str:
    """An exit code; a shell's 128+N (its way of saying a command in it was killed by signal N)
    with that signal's name."""
    if 128 < code <= 128 + 64:
        return f"code {code} (128+{code - 128}: how a shell reports a command killed by {_signal_name(code - 128)})"
    return f"code {code}"


def _signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


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
