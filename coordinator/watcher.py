"""Inbox watching that never misses a file.

A watchdog observer holds one non-recursive watch per inbox folder. Its threads only enqueue
*hints* (paths that may be worth a look); all handling happens in the supervisor's loop, which
calls `drain()` and, when told to, rescans every inbox with `inboxfiles.scan()`. A hint is never
trusted: the loop checks `inboxfiles.settled()` before it reads a file and claims it by rename.

What is hinted: files renamed into an inbox, files created in it, and files closed after
writing (inotify `IN_CLOSE_WRITE`); with `--poll`, also files whose size or mtime changed.
Dot-files, editor and sync-tool temp files and subfolders are never hinted (`inboxfiles.is_candidate`).

Missed events cost at most one rescan. `drain()` asks for a full rescan:
- at start, and every `rescan_every` seconds;
- when the kernel's inotify queue overflowed. watchdog >= 7 reads the queue in one reader
  thread (`InotifyFD`) and, on `IN_Q_OVERFLOW`, only logs a warning and drops its own pending
  events; no event reaches a handler. We build the observer around our own subclass of that
  reader which records the overflow before watchdog handles it;
- after a burst: once `BURST_EVENTS` events arrived since the last rescan, a rescan follows as
  soon as events pause for `BURST_QUIET` seconds. This needs no help from watchdog, so it also
  guards older watchdog versions and other platforms, where an overflow is silent;
- when the observer thread, the inotify reader or a folder's emitter died (it is restarted, and
  events during the gap may be lost); a folder that vanished is watched again once it is back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers import Observer as PlatformObserver
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from .errors import UsageError
from .inboxfiles import is_candidate
from .spawner import thread_refused

try:  # Linux with watchdog >= 7: one inotify reader thread that sees IN_Q_OVERFLOW.
    from watchdog.observers.inotify import InotifyEmitter
    from watchdog.observers.inotify_c import InotifyEvent, InotifyFD

    HAS_INOTIFY_READER = True
except Exception:  # no inotify in libc (not Linux) or an older watchdog: fall back to its Observer
    HAS_INOTIFY_READER = False

log = logging.getLogger(__name__)

RESCAN_EVERY = 5.0  # seconds between full rescans when nothing else asks for one
POLL_EVERY = 1.0  # seconds between directory snapshots in polling mode
BURST_EVENTS = 1024  # events since the last rescan that make a burst (kernel queue: 16384)
BURST_QUIET = 0.25  # seconds without events that end a burst
HEALTH_EVERY = 0.5  # longest stretch wait() blocks without looking at the threads
RETRY_EVERY = 5.0  # seconds between tries to restart a watcher that could not be restarted
STOP_JOIN = 5.0  # seconds stop() waits for watchdog's threads

_HINT_EVENTS: tuple[type[FileSystemEvent], ...] = (
    FileCreatedEvent,
    FileMovedEvent,
    FileClosedEvent,
)
# Deletions are never hinted but count as activity: the supervisor's own claims fill the queue too.
_INOTIFY_FILTER: list[type[FileSystemEvent]] = [*_HINT_EVENTS, FileDeletedEvent]
_POLLING_FILTER: list[type[FileSystemEvent]] = [*_INOTIFY_FILTER, FileModifiedEvent]


class Watcher(Protocol):
    """What the supervisor loop needs from a watcher (tests may supply their own)."""

    kind: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def drain(self) -> tuple[set[Path], bool]: ...

    def wait(self, timeout: float) -> bool: ...

    def add_folder(self, folder: Path) -> None: ...


class NullWatcher:
    """Sees nothing and never asks for a rescan: for a CLI serving one request offline."""

    kind = "none"

    def __init__(self) -> None:
        self._never = threading.Event()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def drain(self) -> tuple[set[Path], bool]:
        return set(), False

    def wait(self, timeout: float) -> bool:
        self._never.wait(max(0.0, timeout))
        return False

    def add_folder(self, folder: Path) -> None:
        pass


if HAS_INOTIFY_READER:

    class _OverflowReportingReader(InotifyFD):
        """watchdog's inotify reader, telling us when the kernel dropped events."""

        def __init__(self, on_overflow: Callable[[], None], on_skipped: Callable[[], None]) -> None:
            super().__init__()
            self._on_overflow = on_overflow
            self._on_skipped = on_skipped

        def handle_event(self, event: InotifyEvent) -> None:
            if event.is_queue_overflow:
                self._on_overflow()
            elif event.name and not is_candidate(os.fsdecode(event.name)):
                # Never a hint (a sender's temp file: two of the three events of each drop),
                # so kept from watchdog's emitter and dispatch threads: under the GIL they
                # held the supervisor's loop back by ~45 us per event in a burst. Still
                # activity. Events of a watched folder itself have no name and go on.
                self._on_skipped()
                return
            super().handle_event(event)

    class _InboxEmitter(InotifyEmitter):
        """Never asks for IN_MOVED_FROM: watchdog holds every event for 0.5 s behind an
        unpaired one, to pair it with a move in, and each claim is a move out of the inbox.
        A move in still arrives (IN_MOVED_TO) and is hinted; drop-to-claim stays immediate."""

        def get_event_mask_from_filter(self) -> Any:
            from watchdog.observers.inotify_c import InotifyConstants

            return super().get_event_mask_from_filter() & ~InotifyConstants.IN_MOVED_FROM

    class _InotifyObserver(BaseObserver):
        """watchdog's InotifyObserver, built around the reader above (same lifecycle)."""

        def __init__(self, on_overflow: Callable[[], None], on_skipped: Callable[[], None]) -> None:
            self.reader = _OverflowReportingReader(on_overflow, on_skipped)
            self.reader.start()
            super().__init__(_InboxEmitter, inotify_fd=self.reader)

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self.reader.stop()
            self.reader.join(STOP_JOIN)


class _HintHandler(FileSystemEventHandler):
    def __init__(self, sink: Callable[[FileSystemEvent], None]) -> None:
        self._sink = sink

    def dispatch(self, event: FileSystemEvent) -> None:
        self._sink(event)


class InboxWatcher:
    """A watchdog observer with one non-recursive watch per inbox folder; see the module doc.

    Example:
        watcher = InboxWatcher([inbox / "coder", inbox / "reviewer"])
        watcher.start()
        while running:
            watcher.wait(1.0)
            hints, rescan = watcher.drain()
            paths = set(hints) | ({p for f in folders for p in scan(f)} if rescan else set())
    """

    def __init__(
        self,
        folders: Iterable[Path],
        *,
        polling: bool = False,
        rescan_every: float = RESCAN_EVERY,
        poll_every: float = POLL_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._folders: list[Path] = []
        self._folder_names: frozenset[str] = frozenset()
        for folder in folders:
            self._remember(Path(folder))
        self._polling = polling
        self._rescan_every = rescan_every
        self._poll_every = poll_every
        self._clock = clock
        self.kind = _kind(polling)

        self._hints: deque[Path] = deque()
        self._ready = threading.Event()
        self._lock = threading.Lock()  # state shared with watchdog's threads
        self._control = threading.RLock()  # start/stop/restart; wait() may run on another thread
        self._observer: BaseObserver | None = None
        self._watches: dict[Path, ObservedWatch] = {}
        self._handler = _HintHandler(self._on_event)

        self._rescan_requested = True
        self._last_rescan = clock()
        self._activity = 0
        self._last_activity = self._last_rescan
        self._burst = False
        # Called (in watchdog's thread) with each hint: lets a loop wake without a thread of its own.
        self.on_hint: Callable[[], None] | None = None
        self.overflows = 0  # kernel queue overflows seen (for `doctor` and the board)
        self.restarts = 0  # observers restarted after a thread died
        # Why the watcher cannot watch now (a restart or a watch refused: a system limit), or
        # None. Meanwhile the inboxes are rescanned every `rescan_every` and a restart is tried
        # every RETRY_EVERY seconds: a supervisor left running overnight must not die of it.
        self.broken: str | None = None
        self._retry_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Watch every folder. When the system's watch limits are reached (or a folder cannot be
        watched), say so once and go on by rescans alone, trying again every RETRY_EVERY seconds
        (see `broken`): a supervisor started on a machine whose inotify instances other programs
        hold stopped before taking in a single order."""
        with self._control:
            if self._observer is None:
                try:
                    self._replace_observer()
                except UsageError as e:
                    self._failed(e)
            with self._lock:
                self._rescan_requested = True

    def stop(self) -> None:
        """Stop watching and wait for watchdog's threads (bounded)."""
        with self._control:
            observer, self._observer = self._observer, None
            self._watches.clear()
            self.broken = None  # stopped: nothing to restart
            if observer is not None:
                _shut_down(observer)

    def add_folder(self, folder: Path) -> None:
        """Watch one more inbox; the next drain asks for a rescan to catch what is already there."""
        folder = Path(folder)
        with self._control:
            if folder in self._folders:
                return
            self._remember(folder)
            if self._observer is not None:
                self._schedule(folder)
            with self._lock:
                self._rescan_requested = True
        self._ready.set()

    @property
    def observer(self) -> BaseObserver | None:
        """The running watchdog observer (for `doctor` and fault-injection tests)."""
        return self._observer

    # -- the loop's side -------------------------------------------------------------------------
    def drain(self) -> tuple[set[Path], bool]:
        """Hinted paths since the last drain, and whether every inbox must be rescanned now."""
        self._check_health()
        self._ready.clear()  # before taking hints: a hint racing with us sets it again
        hints: set[Path] = set()
        while True:
            try:
                hints.add(self._hints.popleft())
            except IndexError:
                break
        now = self._clock()
        with self._lock:
            rescan = self._rescan_due(now)
            if rescan:
                self._rescan_requested = False
                self._burst = False
                self._activity = 0
                self._last_rescan = now
        return hints, rescan

    def wait(self, timeout: float) -> bool:
        """Block until hints are pending or a rescan is due, at most `timeout` seconds."""
        # Event.wait counts real seconds, so the deadline does too; rescans use the injected clock.
        end = time.monotonic() + max(0.0, timeout)
        while True:
            self._check_health()
            now = self._clock()
            with self._lock:
                if self._ready.is_set() or self._hints or self._rescan_due(now):
                    return True
                until_due = self._next_due() - now
            left = end - time.monotonic()
            if left <= 0:
                return False
            self._ready.wait(max(0.01, min(left, HEALTH_EVERY, until_due)))

    # -- internals -------------------------------------------------------------------------------
    def _remember(self, folder: Path) -> None:
        self._folders.append(folder)
        # Swapped whole: watchdog's dispatch thread reads it without a lock.
        self._folder_names = self._folder_names | {str(folder)}

    def _rescan_due(self, now: float) -> bool:
        return self._rescan_requested or now >= self._next_due()

    def _next_due(self) -> float:
        due = self._last_rescan + self._rescan_every
        if self._burst:
            due = min(due, self._last_activity + BURST_QUIET)
        return due

    def _on_event(self, event: FileSystemEvent) -> None:
        # Runs in watchdog's dispatch thread: string work and an append, no file I/O.
        raw = event.dest_path if isinstance(event, FileSystemMovedEvent) else event.src_path
        path = os.fsdecode(raw)
        hinted = (
            not event.is_directory
            and isinstance(event, self._hint_events)
            and is_candidate(os.path.basename(path))
            and os.path.dirname(path) in self._folder_names
        )
        self._on_activity()
        if hinted:
            self._hints.append(Path(path))
            self._ready.set()
            if self.on_hint is not None:
                self.on_hint()

    def _on_activity(self) -> None:
        with self._lock:
            self._activity += 1
            self._last_activity = self._clock()
            if self._activity >= BURST_EVENTS:
                self._burst = True

    @property
    def _hint_events(self) -> tuple[type[FileSystemEvent], ...]:
        return (*_HINT_EVENTS, FileModifiedEvent) if self._polling else _HINT_EVENTS

    def _on_overflow(self) -> None:
        # Runs in the inotify reader thread.
        log.warning("inotify queue overflowed: events were lost; rescanning the inboxes")
        with self._lock:
            self.overflows += 1
            self._rescan_requested = True
        self._ready.set()

    def _check_health(self) -> None:
        """Restart a dead observer, re-watch folders whose watch died; either asks for a rescan.
        Never raises: what cannot be watched now is rescanned meanwhile (see `broken`)."""
        with self._control:
            observer = self._observer
            if observer is None:
                if self.broken is not None and time.monotonic() >= self._retry_at:
                    self._restart()
                return
            if _alive(observer):
                try:
                    self._rewatch(observer)
                    self._healed()
                    return
                except UsageError as e:
                    # Stopped while we looked, its reader's inotify fd closed (EBADF): replaced
                    # below like a dead one. A running observer that refuses a watch: rescans.
                    if _alive(observer):
                        self._failed(e)
                        return
            log.warning("the file watcher thread died; restarting it and rescanning the inboxes")
            self.restarts += 1
            self._restart()

    def _restart(self) -> None:
        try:
            self._replace_observer()
        except UsageError as e:
            self._failed(e)
        else:
            self._healed()
        with self._lock:
            self._rescan_requested = True
        self._ready.set()

    def _failed(self, e: UsageError) -> None:
        self._retry_at = time.monotonic() + RETRY_EVERY
        if self.broken != str(e):
            log.warning(f"{e}; meanwhile the inboxes are rescanned every {self._rescan_every:g} s")
        self.broken = str(e)

    def _healed(self) -> None:
        if self.broken is not None:
            self.broken = None
            log.warning("the file watcher watches every inbox again")

    def _rewatch(self, observer: BaseObserver) -> None:
        """Watch again each folder whose emitter is gone from the running `observer`."""
        try:
            emitters = list(observer.emitters)
        except RuntimeError:  # watchdog's set changed while read (the observer is stopping): look again next time
            return
        live = {emitter.watch for emitter in emitters if emitter.is_alive()}
        for folder in self._folders:
            watch = self._watches.get(folder)
            if watch is not None and watch in live:
                continue
            if watch is not None:  # its folder was removed or its thread died
                del self._watches[folder]
                with contextlib.suppress(KeyError, RuntimeError):
                    observer.unschedule(watch)
            if self._schedule(folder):
                with self._lock:
                    self._rescan_requested = True
                self._ready.set()

    def _replace_observer(self) -> None:
        old, self._observer = self._observer, None
        self._watches.clear()
        if old is not None:
            _shut_down(old)
        observer = self._new_observer()
        try:
            observer.start()
            self._observer = observer
            for folder in self._folders:
                self._schedule(folder)
        except BaseException as e:
            self._observer = None
            self._watches.clear()
            _shut_down(observer)
            if thread_refused(e):
                raise _thread_error() from e
            raise

    def _new_observer(self) -> BaseObserver:
        if self._polling:
            return PollingObserver(timeout=self._poll_every)
        try:
            if HAS_INOTIFY_READER:
                return _InotifyObserver(self._on_overflow, self._on_activity)
            return PlatformObserver()
        except OSError as e:
            raise _limit_error(e, None) from e

    def _schedule(self, folder: Path) -> bool:
        """Watch `folder` on the running observer; False if it does not exist (yet)."""
        assert self._observer is not None
        if not folder.is_dir():
            return False
        filter_ = _POLLING_FILTER if self._polling else _INOTIFY_FILTER
        try:
            watch = self._observer.schedule(
                self._handler, str(folder), recursive=False, event_filter=filter_
            )
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            raise _limit_error(e, folder) from e
        except RuntimeError as e:  # watchdog runs a thread per watched folder
            if thread_refused(e):
                raise _thread_error() from e
            raise
        self._watches[folder] = watch
        return True


def _alive(observer: BaseObserver) -> bool:
    """Running and not told to stop. An observer being stopped is dead already: its thread
    outlives `stop()`, which first stops its emitters and closes its reader's inotify fd, and
    a folder watched again on it then fails (EBADF), or watches nothing."""
    if not observer.is_alive() or observer.stopped_event.is_set():
        return False
    reader: Any = getattr(observer, "reader", None)
    return reader is None or bool(reader.is_alive() and not reader.stopped_event.is_set())


def _shut_down(observer: BaseObserver) -> None:
    with contextlib.suppress(Exception):  # it may be dead already, or never started
        observer.stop()
    with contextlib.suppress(RuntimeError):
        observer.join(STOP_JOIN)


def _kind(polling: bool) -> str:
    if polling:
        return "polling"
    if HAS_INOTIFY_READER:
        return "inotify"
    name = str(getattr(PlatformObserver, "__name__", "")).removesuffix("Observer").lower()
    return {"windowsapi": "windows", "": "unknown"}.get(name, name)


def _thread_error() -> UsageError:
    return UsageError("the file watcher cannot start its threads, one per inbox (a process limit, which counts "
                      "threads: `ulimit -u`, or the pids limit of the cgroup or container it runs in): raise it "
                      "or run `coordinator supervise --poll`")


def _limit_error(e: OSError, folder: Path | None) -> UsageError:
    if e.errno == errno.ENOSPC:
        return UsageError(
            "inotify watch limit reached: raise fs.inotify.max_user_watches "
            "(sysctl) or run `coordinator supervise --poll`"
        )
    if e.errno == errno.EMFILE:
        return UsageError(
            "inotify instance limit reached: raise fs.inotify.max_user_instances "
            "(sysctl) or run `coordinator supervise --poll`"
        )
    where = f" {folder}" if folder is not None else ""
    return UsageError(
        f"cannot watch the inbox{where}: {e.strerror or e}; check that the folder is readable"
    )
