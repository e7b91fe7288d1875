"""What arrives for the loop: files dropped in the inboxes, exits of attempts, wakes.

`Arrivals` (on `transitions.Transitions`) takes in what the watcher saw in the inboxes a
slice at a time, claims each settled file and files it (as it files what an outbox, a route
or a crash's leftovers hand it); a file still being written waits for the next step. Between
steps the loop waits here for whatever comes first: an exit the spawner reports, a drop the
watcher hints at, or a wake from another thread (an LLM call that ended).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .commits import COMMIT_QUIET
from .inboxfiles import Quiet, is_candidate, printable, scan, settled, stray_folders
from .orders import WorkOrder
from .outbox import OUTBOX_SOURCE
from .spawner import Spawner
from .store import Record
from .trail import one_line
from .transitions import Transitions
from .watcher import InboxWatcher, Watcher

INTAKE_BATCH = 500          # files filed per step before running what is ready
INTAKE_SLICE = 0.002        # seconds of filing per step while attempts run: their exits want reaping
INTAKE_SLICE_IDLE = 0.05    # ... and while none runs: what is filed first starts soon
UNSETTLED_RETRY = 0.2       # seconds between looks at a file still being written
HELD_WARN = 10.0            # seconds a file may stay open for writing before that is said (and `--once` goes on)
WAIT_SLICE = 0.005          # seconds: without pump threads, how often a wait looks at the watcher


class Arrivals(Transitions):
    """The intake and the wait of one supervisor's loop."""

    poll_mode: bool
    _spawner: Spawner | None
    _watcher: Watcher | None
    _opened: bool
    # Inbox files seen and not yet taken in, oldest first (a burst waits here in slices).
    _unsettled: OrderedDict[Path, str]
    _quiet: Quiet  # since when each file waited for has looked the same (where no lease can tell)
    _stuck: set[Path]  # inbox files a claim failed on: tried again at each rescan
    _held_since: dict[Path, float]  # inbox files still being written: since when (monotonic)
    _once: bool  # `supervise --once`: what cannot be taken in now is left for the next run
    _strays_said: set[str]
    _backlog_filed: bool  # what waited in the inboxes at start is filed (no slice for it)
    exit_waits: bool  # the last filing stopped for an attempt's exit, reported and not yet reaped
    # Written to wake the loop from another thread (a hint, an LLM call that ended); the
    # loop waits on it and on the spawner's exits in one select (see `_wait`).
    _wake_fds: tuple[int, int] | None
    _old_wakeup_fd: int | None  # the signal wakeup fd before the loop's (restored by `close`)
    _wake_lock: threading.Lock  # no write to a closed pipe's fd, now another file's
    _polled: threading.Event
    _pumps: list[threading.Thread]

    @property
    def spawner(self) -> Spawner:
        assert self._spawner is not None
        return self._spawner

    @property
    def watcher(self) -> Watcher:
        assert self._watcher is not None
        return self._watcher

    # -- the wait ------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Wake the loop from another thread (an LLM call ended) instead of waiting out the idle timeout."""
        with self._wake_lock:
            if self._wake_fds is not None:
                with contextlib.suppress(BlockingIOError):  # full: a wake is pending anyway
                    os.write(self._wake_fds[1], b"\0")

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
            said = None
            while self._opened:
                try:
                    woken = self.watcher.wait(0.5)
                except Exception as e:  # noqa: BLE001 - a pump that ended would leave drops to the idle timeout
                    if one_line(str(e)) != said:  # once, not every second it goes on
                        said = one_line(str(e))
                        self.say(f"WARNING: the inbox watcher failed ({said}); the inboxes are still rescanned")
                    time.sleep(1.0)
                    woken = True
                if woken:
                    self.wake()
                    self._polled.wait(1.0)
                    self._polled.clear()

        self._wake_fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A stop signal wakes the loop too: its handler only counts it, and the wait it broke
        # went on until its timeout, so Ctrl-C was answered up to a second late.
        with contextlib.suppress(ValueError):  # not in the main thread: seen at the timeout
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_fds[1], warn_on_full_buffer=False)
        if isinstance(self._watcher, InboxWatcher):
            self._watcher.on_hint = self.wake  # a drop wakes the loop directly
        t = threading.Thread(target=watch_pump, daemon=True, name="watch_pump")
        t.start()
        self._pumps.append(t)

    # -- intake ----------------------------------------------------------------------------------
    def _inbox_has_files(self) -> bool:
        return any(p not in self._stuck for a in self.config.agents for p in self._scan(a))

    def _scan(self, agent: str, others: list[Path] | None = None) -> list[Path]:
        """`scan` of `agent`'s inbox. One the supervisor may not read (made so by hand, or by a
        sync tool, while it ran) is said once and looked at again at each rescan: it stopped
        the supervisor, and every other agent's work with it."""
        try:
            return scan(self.ws.inbox(agent), others=others)
        except PermissionError as e:
            self._say_once(f"WARNING: inbox/{agent} cannot be read ({e.strerror or e}): nothing in it is taken "
                           "in until the supervisor's user may read it")
            return []

    def _intake_step(self) -> bool:
        hints, rescan = self.watcher.drain()
        waiting = self._unsettled  # consumed from the front: the rest of a burst is never copied
        if rescan:
            others: list[Path] = []
            for agent in self.config.agents:
                for path in self._scan(agent, others):
                    if path not in waiting:
                        self.intake.note_waiting(path)  # its id is never assigned to another
                    waiting[path] = agent
            self._say_strays(others)
        for path in hints:
            # Hints are paths inside the inbox folders the watcher was given: no resolving needed.
            folder = path.parent
            agent = folder.name
            if agent in self.config.agents and folder == self.ws.inbox(agent) and is_candidate(path.name):
                if path not in waiting:
                    self.intake.note_waiting(path)
                waiting[path] = agent
        # Filing yields to reaping and starting every few milliseconds while attempts run, and
        # as soon as one of them has ended: a burst filed 500 at a time left the spawn pipeline
        # empty for 200 ms at a time.
        filed = 0
        # What waited for the supervisor is filed before anything starts (up to INTAKE_BATCH),
        # however slow the disk: priority decides among it, not which files came first.
        slice_ = INTAKE_SLICE if self.attempts.active else INTAKE_SLICE_IDLE if self._backlog_filed else math.inf
        self._backlog_filed = True
        until = time.monotonic() + slice_
        unsettled: list[tuple[Path, str]] = []  # still being written: looked at again next step
        exits = self.spawner.fileno() if self.attempts.active and not self.offline else -1
        self.exit_waits = False

        def yield_now() -> bool:
            if filed >= INTAKE_BATCH or (filed > 0 and time.monotonic() > until):
                return True
            if filed > 0 and exits >= 0 and _readable(exits):
                self.exit_waits = True
                return True
            return False

        while waiting and not yield_now():
            path, agent = waiting.popitem(last=False)
            try:
                mode = os.lstat(path).st_mode
            except OSError:  # gone, or not ours to see
                self._held_since.pop(path, None)
                self.intake.taken(path)  # (a hint that came after its claim)
                continue
            if stat.S_ISLNK(mode):
                self._refuse_link(path, agent)
                continue
            if not stat.S_ISREG(mode):
                continue
            try:
                ready = settled(path, quiet=self._quiet, require_quiet=self.poll_mode)
            except PermissionError as e:
                # Another user's file the supervisor may not read: looked at again at each
                # rescan, not every UNSETTLED_RETRY (and `--once` does not wait for it).
                self._stuck_file(path, agent, e)
                continue
            if not ready:
                if not self._held_too_long(path, agent):
                    unsettled.append((path, agent))
                continue
            self._held_since.pop(path, None)
            claimed = self._claim(path, agent)
            if claimed is None:
                continue
            self.intake.taken(path)
            # It was in the agent's inbox folder, which is no link (or the claim refuses it).
            self.file_claimed(claimed, agent, shown=f"inbox/{agent}/{path.name}")
            filed += 1
        waiting.update(unsettled)
        if len(self._quiet) > len(waiting):  # gone, a link, another's: no longer waited for
            self._quiet.retain(waiting)
        if len(self._held_since) > len(waiting) + len(self._stuck):
            self._held_since = {p: t for p, t in self._held_since.items() if p in waiting or p in self._stuck}
        return filed > 0

    def _held_too_long(self, path: Path, agent: str) -> bool:
        """Say once of a file still being written HELD_WARN seconds after it was first seen so
        (a writer that keeps it open): its own lines, not a silent wait. `--once` then leaves
        it in the inbox for the next run (True) instead of waiting for ever, without a word."""
        now = time.monotonic()
        since = self._held_since.setdefault(path, now)
        if now - since < HELD_WARN:
            return False
        shown = f"inbox/{agent}/{printable(path.name)}"
        if self._once:
            self._stuck.add(path)
            self._say_once(f"WARNING: {shown} is still being written after {HELD_WARN:g}s (a process keeps it "
                           "open for writing); it stays in the inbox for the next run")
            return True
        self._say_once(f"WARNING: {shown} is still being written after {HELD_WARN:g}s (a process keeps it open "
                       "for writing); it is taken in once that process closes it")
        return False

    def _say_strays(self, others: list[Path]) -> None:
        """Say once of each thing in inbox/ that is never taken in: a folder no agent owns, an
        agent's inbox folder that is a link, and `others`, what the rescan found in the inboxes
        that is no file (dot-files are files being written: never said)."""
        found = [f"inbox/{p.parent.name}/{printable(p.name)} is "
                 f"{'a folder' if p.is_dir() else 'not a regular file'}: "
                 "only files are taken in" for p in others]
        found += [f"inbox/{a} is a symbolic link: nothing in it is taken in (never through a link); replace it "
                  "with a folder" for a in self.config.agents if self.ws.inbox_is_link(a)]
        # Made a file while the supervisor ran (a start refuses it): `cp x.md inbox/chip` then
        # overwrote it, and nothing was ever taken in, without a word.
        found += [f"inbox/{a} is not a folder: nothing is taken in for {a}; replace it with a folder"
                  for a in self.config.agents if _neither_folder_nor_link(self.ws.inbox(a))]
        found += [f"inbox/{printable(entry.name)}/ is the inbox of no agent in coordinator.yaml: nothing in it is "
                  "taken in" for entry in stray_folders(self.ws.inbox_root, self.config.agents)]
        for line in found:
            self._say_once(f"WARNING: {line}")

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
            self._stuck_file(path, agent, e)
            return None
        self._stuck.discard(path)
        return claimed

    def _stuck_file(self, path: Path, agent: str, e: OSError) -> None:
        """An inbox file that cannot be taken in now stays where it is: said once, and tried
        again at each rescan."""
        self._stuck.add(path)  # `--once` must not wait for it
        line = (f"WARNING: inbox/{agent}/{printable(path.name)} cannot be taken in "
                f"({e.strerror or e}); it stays in the inbox and is tried again at the next rescan")
        self._say_once(line)

    def _say_once(self, line: str) -> None:
        if line not in self._strays_said:
            self._strays_said.add(line)
            self.say(line)

    def file_claimed(self, claimed: Path, agent: str, *, shown: str, sender: str | None = None,
                     size: int | None = None) -> Record:
        """File a file `Intake.claim` took (from an inbox, an outbox, or a crash's leftovers)."""
        filed = self.intake.file(claimed, agent, shown=shown, sender=sender, size=size,
                                 priority=self._request_priority(shown, sender))
        return self._after_filing(filed.record, filed.order)

    def _request_priority(self, shown: str, sender: str | None) -> str:
        """The priority of an order from the outbox of an orchestrator's request that gives
        none: the request's. Its request waits for it (an urgent request's delegated work
        waited behind normal work), as for an LLM orchestrator's plan. A specialist's outbox
        sends new work of its own; its order does not wait for it: `normal`."""
        if sender is None or sender != self.config.orchestrator or not shown.startswith(OUTBOX_SOURCE):
            return "normal"
        request = self.records.get(shown[len(OUTBOX_SOURCE):].split("/", 1)[0])
        return request.priority if request is not None else "normal"

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
            # Wherever the repeat is among the problems: an order sent again unchanged is refused
            # for its old reason first, and that hid the loop.
            loop = next((e for e in rec.errors if "references: this repeats " in e), None)
            if loop is not None:
                self.signal("feedback", agent=rec.sender, order=rec.id, evidence=loop)
            if orchestrator and rec.sender == orchestrator:
                # Rejected is an end: the order and its rejection are completed, for rotation to drop.
                self.ledger_add(rec.id, "rejection", "\n".join(rec.errors), completed=True)
            self._deliver_report(rec)
        return rec


def _neither_folder_nor_link(path: Path) -> bool:
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # missing: the next start makes it
        return False
    return not (stat.S_ISDIR(mode) or stat.S_ISLNK(mode))


def _readable(fd: int) -> bool:
    """Whether `fd` has something to read now (an exit the spawner reported), without waiting."""
    try:
        return bool(select.select([fd], [], [], 0)[0])
    except (OSError, ValueError):
        return False
