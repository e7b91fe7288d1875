"""The supervisor: every dropped order runs once, ends in a status, and nothing is lost.

The loop is a single thread that owns all state; `step()` does one round
(reap exits, timeouts, dispatch, intake, budget, group commit) so tests can
drive it without sleeps. The watcher and the spawner only wake it.

`Supervisor` holds the life cycle (lock, open with recovery, close), the loop, the
requests of CLI commands and the tamper watch, on layers of its own:
`arrivals.Arrivals` (intake and the loop's wait) on `transitions.Transitions` (statuses,
dependencies, dispatch, ledger and signals) on `commits.Commits` (state/ written and
committed).

Example:
    >>> with Supervisor(Workspace.find(None)) as sup:
    ...     sup.run_once()
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import audit, budget, control, durable, recovery, runner, schemas, signals, verify
from .arrivals import Arrivals
from .attempts import AttemptRunner
from .commits import COMMIT_QUIET
from .config import budget_warning
from .errors import CoordinatorError, SupervisorError
from .inboxfiles import Quiet, printable
from .intake import Intake, waiting_orders
from .spawner import MIN_OPEN_FILES, NO_FILE_TABLE, NO_PROCESS, Spawner, thread_refused
from .store import History, Record, Store
from .watcher import InboxWatcher, Watcher
from .workspace import Workspace

STOP_GRACE = 30.0           # seconds running attempts get after the first SIGTERM
FLUSH_EVERY = 1.0           # seconds: in the loops, the transitions of several steps share commits
TAMPER_EVERY = 5.0          # seconds between looks for changes the supervisor did not make
LOCK_PATIENCE = 0.5         # seconds a start waits for someone who only looks whether a supervisor runs
COMMAND_PATIENCE = 30.0     # ... and for a command that serves itself, with no supervisor running


class Supervisor(Arrivals):
    def __init__(self, ws: Workspace, *, clock: Callable[[], float] = time.time,
                 spawner: Spawner | None = None, watcher: Watcher | None = None,
                 poll: bool = False, log: Callable[[str], None] | None = None,
                 log_step: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
                 stop_grace: float = STOP_GRACE, http_transport: Any = None,
                 offline: bool = False) -> None:
        self.ws = ws
        self.config = ws.config
        self.clock = clock
        self.say = log or (lambda line: None)
        # What `log` is told in one step, it may keep until the step is over (`teamcommands`
        # writes those lines together): entered around each step.
        self._log_step = log_step or contextlib.nullcontext
        self.stop_grace = stop_grace
        self.poll_mode = poll
        self._spawner = spawner
        self._watcher = watcher
        self.http_transport = http_transport
        self.store = Store(ws.state)
        self.audit = audit.StateRepo(ws.state, record=ws.state_head)
        self.records = {}
        self.stopping = False
        self.killing = False
        self._stop_deadline: float | None = None
        self._unsettled = OrderedDict()
        self._quiet = Quiet(say=lambda line: self.say(line))
        self._lock_fd: int | None = None
        self._root_fd: int | None = None  # the workspace folder, locked (`_lock`)
        self._root_id: tuple[int, int] | None = None  # the workspace folder it was started in
        self._wake_fds = None
        self._old_wakeup_fd = None
        self._look = None
        self._wake_lock = threading.Lock()
        self._polled = threading.Event()
        self._pumps = []
        self._opened = False
        self._last_watch = time.monotonic()
        self._config_stamp = _stamp(ws.config_path)
        self._config_changed_said = False
        self._strays_said = set()
        self._backlog_filed = False
        self.exit_waits = False
        self._stuck = set()
        self._held_since = {}
        self._once = False
        self._last_flush = 0.0
        self._last_progress = 0.0
        self._committer = None
        self._commit_failures = 0
        self._failed_at = None
        self._compacted_at = 0
        self._ready = {}
        self._waiting_on = {}
        self.offline = offline
        self._at_ceiling = None
        self.signals_told = []

    # -- life cycle -----------------------------------------------------------------------------
    def __enter__(self) -> Supervisor:
        self.open()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # A stop it chose (signals, the grace gone, a machine limit said as SupervisorError) cuts
        # its attempts off as no fault of theirs; any other exception is taken for a crash.
        chosen = exc_type is None or (isinstance(exc_type, type) and issubclass(exc_type, SupervisorError))
        self.close(clean=exc_type is None, chosen=chosen)

    def open(self) -> None:
        """Lock the workspace, heal the layout, recover from a crash, start watcher and spawner."""
        if not self.offline:
            _check_open_files()
        try:
            self._open()
        except BaseException as e:
            # What it took before it failed is let go: in a program that embeds the supervisor
            # (a test), the lock it kept made every later start "another supervisor is running".
            # Only once it holds the lock: the journal and guard it would close are the workspace's.
            if self._lock_fd is not None:
                with contextlib.suppress(Exception):
                    self.close(clean=False)
            short = _ran_short(e) if isinstance(e, (OSError, RuntimeError)) else None
            if short is not None:
                raise SupervisorError(short) from e
            raise

    def _open(self) -> None:
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
        crashed = (marker.exists() and not recovery.stopped_cleanly(ws, written)) or bool(written)
        durable.open_journal(ws.state, self._journal_file)
        durable.guard(ws.state)
        if durable.holds_freed_inodes(ws.state):  # an ext4 without a journal: see durable.SPARE_FILES
            durable.spare_files(ws.state, ws.runtime / "spare-files")
        for line in self.audit.moved_while_away(crashed=crashed):  # a reset or a commit while none ran
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
        self.intake = Intake(self.store, self.config, self.records, self.history, root=ws.root,
                             ids_dir=ws.runtime / "ids", repos_dir=ws.repos, clock=self.clock)
        # Before recovery files what a crash left claimed: no id goes to one an inbox file names.
        self.intake.waiting = waiting_orders(ws.inbox_root, self.store.intake_dir, self.config.agents)
        self.ledger = budget.Ledger.load(ws.state)
        if not self.offline:  # a command served here records a signal rarely, and says it if it cannot
            signals.check(ws.state)
            schemas.warm("work-order", "result")  # made at the first order, its drop waited for them
        if self._spawner is None and not self.offline:
            self._spawner = Spawner(gate_only_ok=not _landlock_available())
            if not _landlock_available():
                self.say("WARNING: this kernel has no Landlock: writes outside the working copy are only "
                         "detected after the run, not refused (`coordinator doctor`)")
        if not self.offline:
            low = budget_warning(self.config)
            if low is not None:
                self.say(f"WARNING: {low}")
            for name, agent in self.config.agents.items():
                for warning in runner.agent_warnings(agent):
                    self.say(f"WARNING: agents.{name}.{warning}")
                missing = runner.command_missing(agent)
                if missing is not None:
                    self.say(f"WARNING: agents.{name}.command.0: {missing} is not found on PATH: each of its "
                             f"orders fails to start until it is (`coordinator doctor`)")
        self.attempts = AttemptRunner(self)
        self.heads = verify.load_heads(ws)
        recovery.recover(self, crashed)
        self.audit.own(self.audit.head())  # from here, a commit not made here is someone else's
        self._release_ended_dependencies()
        self.store.shed_ended(self.records)
        if not self.offline:
            self._say_agentless()
            runner.clear_spares(ws)
            marker.touch()
            verify.watch_repos(self)
            self._flush()
        if self._watcher is None:
            folders = [ws.inbox(a) for a in self.config.agents]
            self._watcher = InboxWatcher(folders, polling=self.poll_mode)
        self._watcher.start()
        self._opened = True

    def close(self, *, clean: bool = True, chosen: bool | None = None) -> None:
        """Commit and let go of the workspace. `chosen`: the supervisor stops by its own choice
        (default: when `clean`), so the attempts it cuts off are queued again at the next start
        without counting a failure (`_note_cut`)."""
        if clean if chosen is None else chosen:
            self._note_cut()
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
                with _said_short():
                    self._flush()
                    # Commits someone made beside it that its last batches found: the tamper watch
                    # looks every few seconds, and a stop before its next look never said them.
                    for line in self.audit.moved_by_others():
                        self.signal("silent", agent=None, order=None,
                                    evidence=f"a commit in state/ the supervisor did not make: {line}")
                    self._flush()
                committed = True
                if not self.offline and not self.attempts.active:
                    (self.ws.runtime / "running").unlink(missing_ok=True)
        finally:
            # Everything noted is committed after a clean close; else the file stays for the next start.
            durable.close_journal(self.ws.state, committed=committed)
            durable.guard(self.ws.state, on=False)
            durable.spare_files(self.ws.state, None)
            if self._spawner is not None:
                attempts = getattr(self, "attempts", None)
                if attempts is not None:
                    attempts.disarm()
                self._spawner.close()
            with self._wake_lock:
                kept = None
                if self._old_wakeup_fd is not None and self._wake_fds is not None:
                    try:
                        signal.set_wakeup_fd(self._old_wakeup_fd)
                    except ValueError:  # closed from another thread: a signal must never write
                        kept = self._wake_fds[1]  # into a file that gets its number, so it stays open
                    self._old_wakeup_fd = None
                for fd in self._wake_fds or ():
                    if fd != kept:
                        os.close(fd)
                self._wake_fds = None
            self._pumps = []  # they see the loop closed and end within a second
            # The folder's lock first: a start that got the lock file in between found the folder
            # still locked, and refused as if a supervisor ran whose lock file was removed.
            if self._root_fd is not None:
                os.close(self._root_fd)
                self._root_fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self._opened = False

    def _note_cut(self) -> None:
        """Note the attempts this stop cuts off (a second Ctrl-C, the grace gone, a machine
        limit), before its spawn server kills them: the next start queues them again without
        counting a failure (`recovery.CUT`). A crash (kill -9, a power cut, an internal error)
        leaves none, and then each counts as a failed attempt of its agent."""
        attempts = getattr(self, "attempts", None)
        if not self._opened or self.offline or attempts is None or not attempts.active:
            return
        with contextlib.suppress(OSError):  # unwritten (a full disk): each counts as interrupted
            durable.write_json(self.ws.runtime / recovery.CUT,
                               sorted({act.rec.id for act in attempts.active.values()}))

    @property
    def _journal_file(self) -> Path:
        return self.ws.state_journal

    def _lock(self) -> None:
        """One supervisor per workspace: an exclusive lock the kernel drops if we die."""
        path = self.ws.runtime / "supervisor.pid"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        # `board` and `cancel` take a shared lock for an instant to see whether one runs: a
        # start that meets one of those waits it out instead of taking it for a supervisor.
        # A command serving itself (`cancel` with no supervisor running) holds it for as long
        # as its request takes: a start waits that out too, rather than call it a supervisor.
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other, command = control.lock_holder(fd)
                if time.monotonic() - started < (COMMAND_PATIENCE if command else LOCK_PATIENCE):
                    time.sleep(0.02)
                    continue
                os.close(fd)
                if command:
                    raise SupervisorError(f"a coordinator command (pid {other}) has held {self.ws.root} for "
                                          f"{COMMAND_PATIENCE:.0f}s; try again when it is done") from None
                raise SupervisorError(f"another supervisor (pid {other}) is running on {self.ws.root}; "
                                      "stop it first") from None
        # The workspace folder itself is locked too: a `rm -rf .coordinator` while a supervisor
        # ran took its lock file along, and a second supervisor started beside it, took its
        # running attempts for a crash's and killed them.
        try:
            self._root_fd = _lock_folder(self.ws.root)
        except BlockingIOError:
            os.close(fd)
            raise SupervisorError(f"another supervisor is running on {self.ws.root} (its "
                                  f"{self.ws.rel(path)} was removed while it ran, so its pid is not known); "
                                  "stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._pid_line(), 0)
        self._lock_fd = fd
        st = os.stat(self.ws.root)
        self._root_id = (st.st_dev, st.st_ino)
        # The team this supervisor keeps until it stops: a command run after coordinator.yaml
        # was edited says that the supervisor still acts on the old one (`control.config_drift`).
        durable.write_text(control.config_seen_path(self.ws),
                           f"{self.config.digest}\n{' '.join(sorted(self.config.agents))}\n", sync=False)

    def _say_agentless(self) -> None:
        """Say which orders wait for an agent coordinator.yaml no longer has: they stay queued
        (they run once it is back), and the start said nothing of them ("nothing runnable left")."""
        left: dict[str, list[Record]] = {}
        for rec in self.records.values():
            if rec.status in ("queued", "waiting") and rec.to not in self.config.agents:
                left.setdefault(rec.to, []).append(rec)
        for agent, recs in sorted(left.items()):
            ids = [r.id for r in sorted(recs, key=lambda r: r.seq)]
            shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
            self.say(f"WARNING: {len(ids)} order(s) for {printable(agent)} wait, and {printable(agent)} is no "
                     f"longer in coordinator.yaml: they run once it is back (`coordinator cancel ID` drops "
                     f"one): {shown}")

    def _pid_line(self) -> bytes:
        mark = f" {control.COMMAND_MARK}" if self.offline else ""
        return f"{os.getpid()}{mark}\n".encode()

    def _keep_lock_file(self) -> None:
        """Put supervisor.pid back when it was removed or replaced while the supervisor ran (a
        hand clean-up of .coordinator/): `board` said no supervisor ran, and `cancel` did not
        reach it. The workspace folder's lock (`_lock`) kept a second supervisor out meanwhile."""
        if self._lock_fd is None:
            return
        path = self.ws.runtime / "supervisor.pid"
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self._lock_fd), os.stat(path)):
                return
        try:
            self.ws.runtime.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._pid_line(), 0)
        except OSError:  # held a moment by a command looking (`board`): tried again at the next look
            os.close(fd)
            return
        os.close(self._lock_fd)
        self._lock_fd = fd
        self.say(f"{self.ws.rel(path)} was removed while the supervisor ran; written again")

    # -- the loop -----------------------------------------------------------------------------------
    def step(self, *, paced: bool = False) -> bool:
        """One round; True when anything happened. Commits at its end, unless `paced` (the
        loops): then only once FLUSH_EVERY has passed or nothing is moving any more."""
        with self._log_step():
            try:
                return self._step(paced)
            except (OSError, CoordinatorError, RuntimeError) as e:
                # A workspace moved away says so, not "internal error: FileNotFoundError" or the git
                # command that failed first.
                self._check_workspace()
                short = _ran_short(e)  # was "internal error: OSError: [Errno 24] Too many open files"
                if short is not None:
                    raise SupervisorError(short) from e
                raise

    def _check_workspace(self) -> None:
        """Raise SupervisorError when the workspace folder is no longer where the supervisor
        started (moved, renamed or removed while it ran): nothing it writes can land there."""
        if self._root_id is None:  # never locked (opened offline): nothing to compare with
            return
        try:
            st = os.stat(self.ws.root)
            here = (st.st_dev, st.st_ino) == self._root_id
        except OSError:
            here = False
        if not here:
            raise SupervisorError(f"the workspace {self.ws.root} was moved or removed while the supervisor ran: "
                                  "start it again where the workspace is now (what was under way is picked up "
                                  "there)")

    def _step(self, paced: bool) -> bool:
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
                if self.exit_waits:
                    # Judged, and its slot given to the next order, before this step's writes
                    # (those of the orders just filed among them): one at a time, an exit that
                    # stopped filing waited for them, some 0.3 ms an order.
                    self.attempts.reap()
                    self._dispatch()
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
            self._check_workspace()
            self._keep_lock_file()
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
        self._once = True
        with _said_short(), self._flushed():
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
        with _said_short(), self._flushed():
            self._run(should_stop)

    def _run(self, should_stop: Callable[[], int]) -> None:
        try:
            self._start_pumps()
        except RuntimeError as e:  # its thread refused: "internal error: RuntimeError"
            short = _ran_short(e)
            if short is None:
                raise
            raise SupervisorError(short) from e
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

    def _stop_requested(self, signals_seen: int) -> bool:
        """Act on the stop signals seen so far; True when the loop must return now."""
        if signals_seen >= 1 and not self.stopping:
            self.stopping = True
            self.attempts.disarm()  # an order armed to start next stays queued, for the next start
            self._stop_deadline = time.monotonic() + self.stop_grace
            self.say(f"stopping: no new work; {len(self.attempts.active)} running attempt(s) "
                     f"get {self.stop_grace:.0f}s to finish (signal again to stop now)")
        if self.stopping and (signals_seen >= 2 or (self._stop_deadline is not None
                                                     and time.monotonic() > self._stop_deadline)):
            self.attempts.kill_all()
            self.say("stopped: running attempts killed; they are re-queued at the next start")
            return True
        return False

    # -- requests from the CLI -------------------------------------------------------------------------
    def _serve_requests(self) -> bool:
        served = False
        for path, req in control.pending(self.ws):
            try:
                result = control.serve(self, str(req.get("action")), dict(req.get("args") or {}), path)
                self._write_state()  # the asking command may read the records next
                if result is not None:  # None: answered later (`control.serve`)
                    control.answer(path, result=result)
            except CoordinatorError as e:
                self._write_state()
                control.answer(path, error=e)
            served = True
        return served

    def handle(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """Do what a CLI command asked (cancel, retry, rotate, budget-add): see `control.handle`."""
        return control.handle(self, action, args)

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


def _check_open_files() -> None:
    """Refuse to start under a descriptor limit too low for any order: each one was started,
    refused for want of descriptors, and blocked (and escalated) after max_failures."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        raise SupervisorError(f"this process may open only {soft} files (`ulimit -n`); the supervisor needs "
                              f"{MIN_OPEN_FILES} or more to run an order: raise the limit and start it again")


def _lock_folder(folder: Path) -> int | None:
    """An exclusive lock on `folder` itself (its fd), or None where its file system has no
    locks on folders (some network ones): the lock file alone guards it there.
    BlockingIOError when another process holds it."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


def _ran_short(e: BaseException) -> str | None:
    """What to say when `e` is the machine running out of descriptors, processes or threads for
    the supervisor itself (a git command it could not fork, a file it could not open); else None."""
    if isinstance(e, OSError) and e.errno == errno.EMFILE:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        what = f"too many open files: the supervisor may open {soft} (`ulimit -n`)"
    elif isinstance(e, OSError) and e.errno == errno.ENFILE:
        what = NO_FILE_TABLE
    elif (isinstance(e, OSError) and e.errno == errno.EAGAIN and not e.filename) or (
            thread_refused(e)):
        what = NO_PROCESS
    else:
        return None
    return (f"{what}; raise the limit (or lower max_parallel) and start it again: what was under way is "
            "picked up then")


@contextlib.contextmanager
def _said_short() -> Iterator[None]:
    """What ran short outside a step (the last commit of a run or a close could not fork git:
    "internal error: BlockingIOError") is said as a step says it (`_ran_short`)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        short = _ran_short(e)
        if short is None:
            raise
        raise SupervisorError(short) from e


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
