"""The supervisor: every dropped order runs once, ends in a status, and nothing is lost.

The loop is a single thread that owns all state; `step()` does one round
(reap exits, timeouts, dispatch, intake, budget, group commit) so tests can
drive it without sleeps. The watcher and the spawner only wake it.

Example:
    >>> with Supervisor(Workspace.find(None)) as sup:
    ...     sup.run_once()
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import select
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import audit, budget, control, durable, recovery, reports, runner, signals, verify
from .attempts import AttemptRunner
from .errors import CoordinatorError, StateError, SupervisorError
from .intake import Intake, waiting_orders
from .orders import PRIORITY_RANK, WorkOrder
from .spawner import Spawner
from .store import (
    TERMINAL,
    History,
    Record,
    Store,
    dead_blocked,
    dependency_done,
    ended_undone,
    iso,
    route_end,
    via_route,
)
from .watcher import InboxWatcher, Watcher, is_candidate, printable, scan, settled
from .workspace import Workspace

INTAKE_BATCH = 500          # files filed per step before running what is ready
INTAKE_SLICE = 0.002        # seconds of filing per step while attempts run: their exits want reaping
INTAKE_SLICE_IDLE = 0.05    # ... and while none runs: what is filed first starts soon
STOP_GRACE = 30.0           # seconds running attempts get after the first SIGTERM
KILL_GRACE = 2.0            # SIGTERM -> SIGKILL for a process tree
UNSETTLED_RETRY = 0.2       # seconds between looks at a file still being written
FLUSH_EVERY = 1.0           # seconds: in the loops, the transitions of several steps share commits
COMMIT_QUIET = 0.05         # seconds without progress before the loops commit what is staged
WAIT_SLICE = 0.005          # seconds: without pump threads, how often a wait looks at the watcher
TAMPER_EVERY = 5.0          # seconds between looks for changes the supervisor did not make
LOCK_PATIENCE = 0.5         # seconds a start waits for someone who only looks whether a supervisor runs
COMMIT_TRIES = 3            # failed state/ commits in a row before the loop stops (each waits out a lock)


class Supervisor:
    def __init__(self, ws: Workspace, *, clock: Callable[[], float] = time.time,
                 spawner: Spawner | None = None, watcher: Watcher | None = None,
                 poll: bool = False, log: Callable[[str], None] | None = None,
                 stop_grace: float = STOP_GRACE, http_transport: Any = None,
                 offline: bool = False) -> None:
        self.ws = ws
        self.config = ws.config
        self.clock = clock
        self.say = log or (lambda line: None)
        self.stop_grace = stop_grace
        self.poll_mode = poll
        self._spawner = spawner
        self._watcher = watcher
        self.http_transport = http_transport
        self.store = Store(ws.state)
        self.audit = audit.StateRepo(ws.state, record=ws.state_head)
        self.records: dict[str, Record] = {}
        self.stopping = False
        self.killing = False
        self._stop_deadline: float | None = None
        # Inbox files seen and not yet taken in, oldest first (a burst waits here in slices).
        self._unsettled: OrderedDict[Path, str] = OrderedDict()
        self._lock_fd: int | None = None
        # Written to wake the loop from another thread (a hint, an LLM call that ended); the
        # loop waits on it and on the spawner's exits in one select (see `_wait`).
        self._wake_fds: tuple[int, int] | None = None
        self._look: audit.Look | None = None  # the tamper watch's look the committer has yet to take
        self._wake_lock = threading.Lock()  # no write to a closed pipe's fd, now another file's
        self._polled = threading.Event()
        self._pumps: list[threading.Thread] = []
        self._opened = False
        self._last_watch = time.monotonic()
        self._config_stamp = _stamp(ws.config_path)
        self._config_changed_said = False
        self._strays_said: set[str] = set()
        self._stuck: set[Path] = set()  # inbox files a claim failed on: tried again at each rescan
        self._last_flush = 0.0
        self._last_progress = 0.0
        self._committer: audit.Committer | None = None
        self._commit_failures = 0  # state/ commits that failed in a row (their batches staged again)
        self._failed_at: int | None = None  # the committer's count of batches committed at the last failure
        self._compacted_at = 0  # the committer's count of batches committed when the journal was compacted
        # Kept current by `_index` wherever a status is set, so dispatch and the release of
        # dependents never scan every record the workspace ever had. `_ready`: per agent, a
        # heap of (priority rank, age, id) of its queued orders; an entry whose order is no
        # longer queued is dropped when it reaches the top.
        self._ready: dict[str, list[tuple[int, int, str]]] = {}
        self._waiting_on: dict[str, set[str]] = {}
        self.offline = offline  # a CLI serving one request while no supervisor runs: never spawns
        self._at_ceiling: tuple[int, int, int, int] | None = None  # the ledger when the ceiling was last answered
        self.signals_told: list[str] = []  # offline: the signals recorded since it opened, as said

    # -- life cycle -----------------------------------------------------------------------------
    def __enter__(self) -> Supervisor:
        self.open()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(clean=exc_type is None)

    def open(self) -> None:
        """Lock the workspace, heal the layout, recover from a crash, start watcher and spawner."""
        ws = self.ws
        for made in ws.ensure_layout():
            self.say(f"created {made}/")
        self._lock()
        if audit.StateRepo.ensure(ws.state):
            self.say("initialised state/ (git repository)")
        for name in self.audit.clear_stale_lock():
            self.say(f"cleared a stale state/.git/{name} left by a dead git process")
        self.store.ensure()
        self.store.defer()
        durable.clean_temps(ws.state)
        recovery.clear_repo_locks(self)
        marker = ws.runtime / "running"
        # What the crashed supervisor wrote and did not commit, as it noted before each write.
        # Lines in it say a crash too: a command served with no supervisor running (no marker)
        # that could not commit leaves them, and its writes are no hand edits.
        written = durable.read_journal(self._journal_file)
        crashed = marker.exists() or bool(written)
        durable.open_journal(ws.state, self._journal_file)
        durable.guard(ws.state)
        for line in self.audit.moved_while_away():  # a reset or a commit while none ran
            self.signal("silent", agent=None, order=None,
                        evidence=f"a commit in state/ the supervisor did not make, while none ran: {line}")
        # Before the records are read: a record put back from git must be what the loop holds
        # (read first, a hand edit after a crash stayed in memory while the file was restored).
        if crashed:
            recovery.commit_leftovers(self, written)
        else:  # a command served with no supervisor running too: never commits a hand edit
            verify.watch_state(self)
        self.records = self.store.load_all()
        self.history = History(self.records, self.store)
        for rec in self.records.values():
            self._index(rec)
        self.intake = Intake(self.store, self.config, self.records, self.history, rel=ws.rel, root=ws.root,
                             ids_dir=ws.runtime / "ids", repos_dir=ws.repos, clock=self.clock)
        # Before recovery files what a crash left claimed: no id goes to one an inbox file names.
        self.intake.waiting = waiting_orders(ws.inbox_root, self.store.intake_dir, self.config.agents)
        self.ledger = budget.Ledger.load(ws.state)
        if self._spawner is None and not self.offline:
            self._spawner = Spawner(gate_only_ok=not _landlock_available())
            if not _landlock_available():
                self.say("WARNING: this kernel has no Landlock: writes outside the working copy are only "
                         "detected after the run, not refused (`coordinator doctor`)")
        if not self.offline:
            for name, agent in self.config.agents.items():
                for warning in runner.agent_warnings(agent):
                    self.say(f"WARNING: agents.{name}.{warning}")
        self.attempts = AttemptRunner(self)
        self.heads = verify.load_heads(ws)
        recovery.recover(self, crashed)
        self.audit.own(self.audit.head())  # from here, a commit not made here is someone else's
        self._release_ended_dependencies()
        self.store.shed_ended(self.records)
        if not self.offline:
            runner.clear_spares(ws)
            marker.touch()
            verify.watch_repos(self)
            self._flush()
        if self._watcher is None:
            folders = [ws.inbox(a) for a in self.config.agents]
            self._watcher = InboxWatcher(folders, polling=self.poll_mode)
        self._watcher.start()
        self._opened = True

    def close(self, *, clean: bool = True) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._polled.set()
        if self._committer is not None:
            self._committer.stop()
            failed = self._committer.failed()
            if failed is not None:  # committed just below, or (closed on an error) by the next start
                self._give_back(failed[1])
            self._committer = None
        committed = False
        try:
            if self._opened and clean:
                self._flush()
                committed = True
                if not self.offline and not self.attempts.active:
                    (self.ws.runtime / "running").unlink(missing_ok=True)
        finally:
            # Everything noted is committed after a clean close; else the file stays for the next start.
            durable.close_journal(self.ws.state, committed=committed)
            durable.guard(self.ws.state, on=False)
            if self._spawner is not None:
                self._spawner.close()
            with self._wake_lock:
                for fd in self._wake_fds or ():
                    os.close(fd)
                self._wake_fds = None
            self._pumps = []  # they see the loop closed and end within a second
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self._opened = False

    @property
    def _journal_file(self) -> Path:
        return self.ws.runtime / "state-journal"

    @property
    def spawner(self) -> Spawner:
        assert self._spawner is not None
        return self._spawner

    @property
    def watcher(self) -> Watcher:
        assert self._watcher is not None
        return self._watcher

    def _lock(self) -> None:
        """One supervisor per workspace: an exclusive lock the kernel drops if we die."""
        path = self.ws.runtime / "supervisor.pid"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        # `board` and `cancel` take a shared lock for an instant to see whether one runs: a
        # start that meets one of those waits it out instead of taking it for a supervisor.
        give_up = time.monotonic() + LOCK_PATIENCE
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < give_up:
                    time.sleep(0.02)
                    continue
                other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise SupervisorError(f"another supervisor (pid {other}) is running on {self.ws.root}; "
                                      "stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    # -- the loop -----------------------------------------------------------------------------------
    def step(self, *, paced: bool = False) -> bool:
        """One round; True when anything happened. Commits at its end, unless `paced` (the
        loops): then only once FLUSH_EVERY has passed or nothing is moving any more."""
        progress = self._serve_requests()
        progress |= self.attempts.reap()
        self.attempts.watch(self.clock())
        if not self.stopping:
            # Exits and starts first, filing after: with a burst waiting, an order that ended
            # waited out a slice of filing before the next one started (a tenth of the time
            # per order when they run one at a time); filed while the new ones run, it is free.
            progress |= self._dispatch()
            if self._intake_step():
                progress = True
                self._dispatch()  # what was just filed starts in this step
        self._budget_check()
        self._write_state()  # on disk within the step that changed them
        now = time.monotonic()
        if progress:
            self._last_progress = now
        # A commit costs 15-25 ms, more as state/ grows: while orders keep moving, the steps
        # of a second share one (a batch every 0.25 s was half of the git time per order at
        # 400 orders/s); the files are the truth in between and recovery commits leftovers.
        # When the work stops, the commit waits for a short quiet spell, so that its git
        # processes do not compete with an order dropped right after the last one ended.
        quiet = not self.attempts.active and now - self._last_progress >= COMMIT_QUIET
        if not paced or self.stopping or now - self._last_flush >= FLUSH_EVERY or quiet:
            self._flush(background=paced)
        if now - self._last_watch > TAMPER_EVERY and not self.offline:
            self._last_watch = now
            self._watch_config()
            self._watch_state(paced)
            verify.watch_repos(self)
            self._block_orphaned_waits()
            self._flush(background=paced)
        self._take_look()
        return progress

    def watch_soon(self) -> None:
        """Have the next step run the tamper watch (every TAMPER_EVERY seconds otherwise)."""
        self._last_watch = float("-inf")

    @property
    def looking(self) -> bool:
        """Whether the committer has a look at state/ under way that the loop has not acted on."""
        return self._look is not None

    def _watch_state(self, paced: bool) -> None:
        """The tamper watch over state/: in the loops, the committer thread looks in its turn
        (git status was 60 ms and more with 10,000 orders, and the loop first waited for every
        batch before it); the next steps act on what it found."""
        if not paced:
            verify.watch_state(self)
        elif self._look is None:
            self._flush(background=True)  # what is written until now comes before the look
            self._look = self._committer_thread().look()

    def _take_look(self) -> None:
        look = self._look
        if look is not None and look.done.is_set():
            self._look = None
            verify.act_on_look(self, look)

    def run_once(self, *, limit: float | None = None, should_stop: Callable[[], int] | None = None) -> None:
        """Process everything that can be processed now, then return (`supervise --once`).

        `should_stop()` counts stop signals, as for `run`: the first stops new work and lets
        running attempts finish within the grace; the second kills them (re-queued at next start).
        """
        with self._flushed():
            self._run_once(limit, should_stop)

    def _run_once(self, limit: float | None, should_stop: Callable[[], int] | None) -> None:
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            if should_stop is not None and self._stop_requested(should_stop()):
                return
            progress = self.step(paced=True)
            if progress:
                continue
            if self.stopping and not self.attempts.active:
                self.say("stopped: nothing running")
                return
            if not self.attempts.active and not self._unsettled and not self._inbox_has_files():
                if self._block_orphaned_waits():
                    continue
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            self._wait(0.05)

    def run(self, *, should_stop: Callable[[], int]) -> None:
        """Run until stopped. `should_stop()` returns how many stop signals arrived."""
        with self._flushed():
            self._run(should_stop)

    @contextlib.contextmanager
    def _flushed(self) -> Iterator[None]:
        """Whatever the loop staged is committed when the block is left. Left on an error, that
        error is the one said: a commit failing after it is not (what it would have committed
        stays staged and journaled, and the next start commits it)."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(CoordinatorError):
                self._flush()
            raise
        self._flush()

    def _run(self, should_stop: Callable[[], int]) -> None:
        self._start_pumps()
        while True:
            if self._stop_requested(should_stop()):
                return
            progress = self.step(paced=True)
            if self.stopping and not self.attempts.active:
                self.say("stopped: nothing running")
                return
            if not progress:
                # Only when the loop would wait anyway: a spare saves the next drop four mkdirs
                # on its way to a spawn, but made after every start it cost three renames more
                # per order than making the folders in place while there was other work (and a
                # rename is the dearest call on ext4).
                self._refill_spares()
                self._wait(self._idle_timeout())

    def _watch_config(self) -> None:
        """Say once that coordinator.yaml changed: the team is read at start (a new agent's inbox
        would not be taken in, a mistake would go unnoticed until then)."""
        seen = _stamp(self.ws.config_path)
        if seen != self._config_stamp and not self._config_changed_said:
            self._config_changed_said = True
            self.say(f"WARNING: {self.ws.rel(self.ws.config_path)} changed since the supervisor started; it "
                     "keeps the team it started with: restart it to use the new one")

    def _refill_spares(self) -> None:
        with contextlib.suppress(OSError):  # a full disk shows up where it matters: in the state writes
            runner.make_spares(self.ws)

    def wake(self) -> None:
        """Wake the loop from another thread (an LLM call ended) instead of waiting out the idle timeout."""
        with self._wake_lock:
            if self._wake_fds is not None:
                with contextlib.suppress(BlockingIOError):  # full: a wake is pending anyway
                    os.write(self._wake_fds[1], b"\0")

    def _stop_requested(self, signals_seen: int) -> bool:
        """Act on the stop signals seen so far; True when the loop must return now."""
        if signals_seen >= 1 and not self.stopping:
            self.stopping = True
            self._stop_deadline = time.monotonic() + self.stop_grace
            self.say(f"stopping: no new work; {len(self.attempts.active)} running attempt(s) "
                     f"get {self.stop_grace:.0f}s to finish (signal again to stop now)")
        if self.stopping and (signals_seen >= 2 or (self._stop_deadline is not None
                                                     and time.monotonic() > self._stop_deadline)):
            self.attempts.kill_all()
            self.say("stopped: running attempts killed; they are re-queued at the next start")
            return True
        return False

    def _idle_timeout(self) -> float:
        if self._unsettled:
            return UNSETTLED_RETRY
        if self.audit.pending:
            return COMMIT_QUIET
        return 1.0

    def _wait(self, timeout: float) -> None:
        if self._pumps:
            assert self._wake_fds is not None
            # An exit, a hint or a wake: one select, no thread in between (a pump thread that
            # woke the loop for each exit cost three thread switches per order).
            self._polled.set()
            wake_r = self._wake_fds[0]
            try:
                select.select([self.spawner.fileno(), wake_r], [], [], timeout)
            except (OSError, ValueError):  # no spawner to wait on: the wakes alone
                select.select([wake_r], [], [], timeout)
            with contextlib.suppress(OSError):
                while os.read(wake_r, 4096):
                    pass
            return
        # No pump threads (tests, --once): wait on the spawner's fd in short slices and look
        # at the watcher between them, so an exit is seen at once and a drop within a slice.
        # (Waiting on the watcher for the rest of the timeout let an exit wait up to 40 ms:
        # `--once` ran a queue of quick orders five times slower than the loop.)
        end = time.monotonic() + timeout
        while True:
            try:
                ready, _, _ = select.select([self.spawner.fileno()], [], [],
                                            max(0.0, min(WAIT_SLICE, end - time.monotonic())))
            except (OSError, ValueError):  # no spawner to wait on: the watcher alone, without spinning
                self.watcher.wait(max(0.0, end - time.monotonic()))
                return
            if ready or self.watcher.wait(0.0) or time.monotonic() >= end:
                return

    def _start_pumps(self) -> None:
        def watch_pump() -> None:  # rescans falling due, overflows, a dead watcher thread
            while self._opened:
                if self.watcher.wait(0.5):
                    self.wake()
                    self._polled.wait(1.0)
                    self._polled.clear()

        self._wake_fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if isinstance(self._watcher, InboxWatcher):
            self._watcher.on_hint = self.wake  # a drop wakes the loop directly
        t = threading.Thread(target=watch_pump, daemon=True, name="watch_pump")
        t.start()
        self._pumps.append(t)

    # -- intake ----------------------------------------------------------------------------------
    def _inbox_has_files(self) -> bool:
        return any(p not in self._stuck for a in self.config.agents for p in scan(self.ws.inbox(a)))

    def _intake_step(self) -> bool:
        hints, rescan = self.watcher.drain()
        waiting = self._unsettled  # consumed from the front: the rest of a burst is never copied
        if rescan:
            others: list[Path] = []
            for agent in self.config.agents:
                for path in scan(self.ws.inbox(agent), others=others):
                    if path not in waiting:
                        self.intake.note_waiting(path)  # its id is never assigned to another
                    waiting[path] = agent
            self._say_strays(others)
        for path in hints:
            # Hints are paths inside the inbox folders the watcher was given: no resolving needed.
            agent = path.parent.name
            if agent in self.config.agents and path.parent == self.ws.inbox(agent) and is_candidate(path.name):
                if path not in waiting:
                    self.intake.note_waiting(path)
                waiting[path] = agent
        # Filing yields to reaping and starting every few milliseconds while attempts run, and
        # as soon as one of them has ended: a burst filed 500 at a time left the spawn pipeline
        # empty for 200 ms at a time.
        filed = 0
        until = time.monotonic() + (INTAKE_SLICE if self.attempts.active else INTAKE_SLICE_IDLE)
        unsettled: list[tuple[Path, str]] = []  # still being written: looked at again next step
        exits = self.spawner.fileno() if self.attempts.active and not self.offline else -1

        def yield_now() -> bool:
            return filed >= INTAKE_BATCH or (filed > 0 and (time.monotonic() > until
                                                            or (exits >= 0 and _readable(exits))))

        while waiting and not yield_now():
            path, agent = waiting.popitem(last=False)
            try:
                mode = os.lstat(path).st_mode
            except OSError:  # gone, or not ours to see
                continue
            if stat.S_ISLNK(mode):
                self._refuse_link(path, agent)
                continue
            if not stat.S_ISREG(mode):
                continue
            if not settled(path, now=time.time(), require_quiet=self.poll_mode):
                unsettled.append((path, agent))
                continue
            claimed = self._claim(path, agent)
            if claimed is None:
                continue
            # It was in the agent's inbox folder, which is no link (or the claim refuses it).
            self.file_claimed(claimed, agent, shown=f"inbox/{agent}/{path.name}")
            filed += 1
        waiting.update(unsettled)
        return filed > 0

    def _say_strays(self, others: list[Path]) -> None:
        """Say once of each thing in inbox/ that is never taken in: a folder no agent owns, an
        agent's inbox folder that is a link, and `others`, what the rescan found in the inboxes
        that is no file (dot-files are files being written: never said)."""
        found = [f"inbox/{p.parent.name}/{printable(p.name)} is "
                 f"{'a folder' if p.is_dir() else 'not a regular file'}: "
                 "only files are taken in" for p in others]
        found += [f"inbox/{a} is a symbolic link: nothing in it is taken in (never through a link); replace it "
                  "with a folder" for a in self.config.agents if self.ws.inbox_is_link(a)]
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.ws.inbox_root):
                if (not entry.name.startswith(".") and entry.name not in self.config.agents
                        and entry.is_dir(follow_symlinks=False)):
                    found.append(f"inbox/{printable(entry.name)}/ is the inbox of no agent in coordinator.yaml: "
                                 "nothing in it is taken in")
        for line in found:
            if line not in self._strays_said:
                self._strays_said.add(line)
                self.say(f"WARNING: {line}")

    def _refuse_link(self, path: Path, agent: str) -> None:
        """A symlink in an inbox is never followed: claim the link itself; filing rejects it."""
        claimed = self._claim(path, agent)
        if claimed is not None:
            self.file_claimed(claimed, agent, shown=self.ws.rel(path))

    def _claim(self, path: Path, agent: str) -> Path | None:
        """`Intake.claim`, or None when the file cannot be taken (not ours to move, a disk
        error): said once, and the file stays where it is for the next rescan to try again."""
        try:
            claimed = self.intake.claim(path, agent)
        except OSError as e:
            self._stuck.add(path)  # `--once` must not wait for it
            line = (f"WARNING: inbox/{agent}/{printable(path.name)} cannot be taken in "
                    f"({e.strerror or e}); it stays in the inbox and is tried again at the next rescan")
            if line not in self._strays_said:
                self._strays_said.add(line)
                self.say(line)
            return None
        self._stuck.discard(path)
        return claimed

    def file_claimed(self, claimed: Path, agent: str, *, shown: str, sender: str | None = None,
                     size: int | None = None) -> Record:
        """File a file `Intake.claim` took (from an inbox, an outbox, or a crash's leftovers)."""
        filed = self.intake.file(claimed, agent, shown=shown, sender=sender, size=size)
        return self._after_filing(filed.record, filed.order)

    def file_order(self, order: WorkOrder, *, shown: str) -> Record:
        # What made this order (a route, a block, a plan) is on disk before the order is:
        # a crash in between must not file it a second time after recovery.
        self._write_state()
        filed = self.intake.file_order(order, shown=shown)
        return self._after_filing(filed.record, filed.order)

    def _after_filing(self, rec: Record, order: WorkOrder | None) -> Record:
        self._index(rec)
        # An order the work of another made ("route of WO-7/...", "outbox of WO-7/...") names it
        # in its line: that keeps the line in a commit after WO-7's own (see audit._group).
        origin = rec.source.split("/", 1)[0]
        made_by = origin if " of " in origin else None
        self._stage(rec, "new", rec.status, rec.history[-1]["actor"],
                    note=rec.errors[0] if rec.errors else made_by)
        orchestrator = self.config.orchestrator
        if orchestrator and rec.sender == orchestrator and order is not None:
            from .orders import render
            self.ledger_add(rec.id, "order", render(order))
        self.settle_waiting(rec, "its dependencies are done")
        if rec.status == "rejected" and rec.id in self._waiting_on:
            self._release_dependents(rec)  # filed after an order that waited on it from an inbox
        if rec.status == "rejected":
            if rec.errors and "this repeats" in rec.errors[0]:
                self.signal("feedback", agent=rec.sender, order=rec.id, evidence=rec.errors[0])
            if orchestrator and rec.sender == orchestrator:
                # Rejected is an end: the order and its rejection are completed, for rotation to drop.
                self.ledger_add(rec.id, "rejection", "\n".join(rec.errors), completed=True)
            self._deliver_report(rec)
        return rec

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
        recorded as a `silent` signal (the tamper watch would have, a few seconds later)."""
        try:
            return self.store.restore(rec)
        except StateError as e:
            self.drain_commits()
            rel = f"orders/{rec.id}/record.json"
            self.audit.restore([rel])
            self.signal("silent", agent=None, order=rec.id, evidence=f"{e}; put back from git")
            return self.store.restore(rec, trust_file=True)

    def _stage(self, rec: Record, old: str, new: str, actor: str, *, note: str | None = None) -> None:
        line = f"{rec.id} {rec.to}: {old} -> {new}"
        if note:
            line += f" ({' '.join(note.split())[:160]})"
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

    def _write_state(self) -> None:
        """Put what this step filed and changed on disk: order folders first, records last."""
        self.intake.place_pending()
        self.store.write_dirty()

    def _index(self, rec: Record) -> None:
        if rec.status == "queued":
            heapq.heappush(self._ready.setdefault(rec.to, []), _rank(rec))
        elif rec.status == "waiting":
            for dep in rec.dependencies:
                # A routed dependency is waited for at the end of its route.
                last = route_end(self.records, dep)
                self._waiting_on.setdefault(last.id if last is not None else dep, set()).add(rec.id)

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
        """Block `rec`: its dependency `named` ended (at the end of its route, `last`) undone."""
        why = f"{via_route(named, last)} ended {last.status}"
        rec.report = {"summary": f"dependency {why}"}
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
            if self.attempts.start(self.records[entry[2]]):
                per_agent[best] = per_agent.get(best, 0) + 1
                started = True
        for name, entry in held:
            heapq.heappush(self._ready[name], entry)
        return started

    def _is_queued(self, order_id: str, agent: str) -> bool:
        rec = self.records.get(order_id)
        return rec is not None and rec.status == "queued" and rec.to == agent

    # -- budget & signals ------------------------------------------------------------------------------
    def ledger_add(self, ref: str, kind: str, text: str, *, tokens: int | None = None,
                   completed: bool = False, note: str = "") -> None:
        """Put an item in the orchestrator's ledger and save it; a change of mode is said."""
        self.ledger.add(ref, kind, text, tokens=tokens, note=note, now=datetime.now(UTC))
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
        lines = budget.on_ceiling(self.ledger, b, brief=self.fresh_brief, now=datetime.now(UTC),
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
                                   detail=self.store.with_detail)

    def signal(self, kind: str, *, agent: str | None, order: str | None, evidence: str) -> None:
        signals.record(self.ws.state, kind, agent=agent, order=order, evidence=evidence,
                       now=datetime.now(UTC))
        told = f"{kind}: {' '.join(x for x in (agent or '-', order) if x)} {evidence}"
        if self.offline:  # for the command it serves; a running supervisor only logs them
            self.signals_told.append(told)
        self.say(f"signal {told}")
        self.audit.stage(audit.SUPERVISOR, f"signal {kind}: {order or '-'} {agent or '-'}: {evidence[:160]}")

    # -- requests from the CLI -------------------------------------------------------------------------
    def _serve_requests(self) -> bool:
        served = False
        for path, req in control.pending(self.ws):
            try:
                result = self.handle(str(req.get("action")), dict(req.get("args") or {}))
                self._write_state()  # the asking command may read the records next
                control.answer(path, result=result)
            except CoordinatorError as e:
                self._write_state()
                control.answer(path, error=e)
            served = True
        return served

    def handle(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """Do what a CLI command asked (cancel, retry, rotate, budget-add): see `control.handle`."""
        return control.handle(self, action, args)

    def step_commit(self) -> None:
        self._flush()

    # -- tamper watch ----------------------------------------------------------------------------------
    def note_head(self, repo: str, head: str, *, base: str | None = None) -> None:
        """The supervisor itself moved `repo`'s default branch from `base` to `head`."""
        known = self.heads.get(repo, {}).get("head")
        if base and known and base != known:  # somebody else moved it first
            self.signal("silent", agent=None, order=None,
                        evidence=f"repos/{repo} default branch moved {known[:10]}..{base[:10]} with no work order")
        entry = self.heads.setdefault(repo, {"baseline": head, "head": head})
        entry["head"] = head
        verify.save_heads(self.ws, self.heads)

    # -- commits --------------------------------------------------------------------------------
    def _flush(self, *, background: bool = False) -> None:
        """Commit what is staged: now, or (in the loops) handed to the committer thread.

        What a failed commit held is staged and journaled again, to be committed with the
        next batch: the journal never loses a path that is not committed, so a start after a
        crash never takes the supervisor's own writes for a hand edit."""
        self._last_flush = time.monotonic()
        while self.audit.notes:  # the committer thread's, e.g. a roll-up of packs that failed
            self.say(self.audit.notes.pop(0))
        if background:
            self._settle_commits()
        else:
            self.drain_commits(stop=False)  # what failed in the thread is tried again just below
            self._take_look()  # done by now: what it finds is committed with the rest
        self._write_state()
        batch = self.audit.take(durable.take_journal(self.ws.state)) if self.audit.pending else None
        if batch is not None and batch.paths and self._look is not None:
            self._look.taken |= batch.paths  # perhaps written, not yet committed, when git looked
        if background:  # the journal is compacted once the thread has committed it (`_settle_commits`)
            if batch is not None:
                self._committer_thread().submit(batch)
            return
        if batch is not None:
            durable.sync_fs(self.ws.state)
            try:
                self.audit.write(batch)
            except BaseException as e:
                self._give_back([batch])
                if isinstance(e, CoordinatorError):
                    raise _no_commits(e) from e
                raise
            self._commit_failures, self._failed_at = 0, None
        durable.compact_journal(self.ws.state)  # all that was taken is committed

    def _settle_commits(self) -> None:
        """Take back what the committer thread could not commit (see `_take_back_failed`);
        else, once it committed more, drop what it committed from the journal file (kept
        only for a start after a crash: it grew by some eight lines an order for good)."""
        committer = self._committer
        if committer is None:
            return
        if self._take_back_failed(committer):
            return
        committed = committer.committed  # before `uncommitted`: a batch committed in between stays a turn
        if committed != self._compacted_at:
            durable.compact_journal(self.ws.state, committer.uncommitted())
            self._compacted_at = committed

    def _take_back_failed(self, committer: audit.Committer, *, stop: bool = True) -> bool:
        """Stage again what a failed commit of the thread held (a lock a person's `git commit`
        holds longer than git waits, a full disk): it goes with the next batch. After
        COMMIT_TRIES failures in a row (`stop`) the loop stops with the reason; nothing is
        lost, the next start commits it. True when a commit had failed."""
        failed = committer.failed()
        if failed is None:
            return False
        error, batches = failed
        self._give_back(batches)
        if not isinstance(error, CoordinatorError):
            raise error
        # In a row: the thread committed nothing since the last failure.
        self._commit_failures = self._commit_failures + 1 if committer.committed == self._failed_at else 1
        self._failed_at = committer.committed
        if stop and self._commit_failures >= COMMIT_TRIES:
            raise _no_commits(error, f"; stopped after {self._commit_failures} tries") from error
        self.say(f"WARNING: could not commit state/ ({error}); kept, to be committed with the next batch")
        return True

    def _give_back(self, batches: list[audit.Batch]) -> None:
        self.audit.restage(batches)
        durable.give_back(self.ws.state, (p for b in batches for p in b.paths or ()))

    def _committer_thread(self) -> audit.Committer:
        """The thread that commits state/ for the running loop, started when first needed."""
        if self._committer is None:
            self._committer = audit.Committer(self.audit, before=lambda: durable.sync_fs(self.ws.state))
            self._compacted_at = 0
        return self._committer

    def drain_commits(self, *, stop: bool = True) -> None:
        """Wait for the committer thread: when this returns, state/ is committed but for what
        a failed commit held, staged again (see `_take_back_failed`)."""
        if self._committer is not None:
            self._committer.drain()
            self._take_back_failed(self._committer, stop=stop)


def _no_commits(error: BaseException, how: str = "") -> SupervisorError:
    """The one line for a supervisor that cannot commit state/: why, and that nothing is lost
    (its writes are on disk and in its journal, and a start commits them)."""
    return SupervisorError(f"state/ takes no commits ({error}){how}: nothing is lost, the next start "
                           "commits what was written")


def _rank(rec: Record) -> tuple[int, int, str]:
    return (-PRIORITY_RANK.get(rec.priority, 1), rec.seq, rec.id)


def _landlock_available() -> bool:
    from .landlock import abi_version
    return abi_version() > 0


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file apart: inode, size, modification time (None when it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _readable(fd: int) -> bool:
    """Whether `fd` has something to read now (an exit the spawner reported), without waiting."""
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return False
