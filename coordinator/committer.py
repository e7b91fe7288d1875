"""The thread that commits state/ while the supervisor loop runs, and its looks for the tamper watch.

The loop hands each finished `audit.Batch` to the `Committer` and goes on taking and
starting orders; the tamper watch's `Look` at state/ runs in the same thread, in turn
with the batches, so the loop never waits on git.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .audit import Batch, StateRepo


@dataclass
class Look:
    """The tamper watch's look at state/, taken by the committer thread in its turn: after
    every batch handed over before it, so that all the supervisor wrote until then is
    committed and what git still finds changed is someone else's, or written since.

    `taken`: the paths of the batches handed over after it (the loop adds them), which
    may have been written, but not yet committed, when git looked.
    """

    taken: set[str] = field(default_factory=set)
    moved: list[str] = field(default_factory=list)  # commits the supervisor did not make
    dirty: list[str] = field(default_factory=list)  # paths changed since the last commit
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Committer:
    """The one writer of state/'s git repository while the supervisor loop runs.

    Commits cost 15-25 ms and more as state/ grows; the loop hands finished batches to
    this thread and goes on taking and starting orders. Batches are written in order.
    Whoever needs state/ committed (a restore, a stop, a test) calls `drain()`. A batch
    that fails is kept, and so is every batch after it, unwritten (a later one must not
    land before it): `failed()` hands them back to the loop's thread with the error, to
    be staged again, never lost. The tamper watch's look at state/ (`look`) runs here
    too, in turn with the batches, so the loop never waits on it.
    """

    def __init__(self, repo: StateRepo, *, before: Callable[[], None] | None = None) -> None:
        self.repo = repo
        self._before = before
        self._queue: queue.Queue[Batch | Look | None] = queue.Queue()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._unsettled: list[Batch] = []  # handed over and not committed, oldest first
        self.committed = 0  # batches committed so far
        self._thread = threading.Thread(target=self._run, daemon=True, name="state-committer")
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        with self._lock:
            self._unsettled.append(batch)
        self._queue.put(batch)

    def look(self) -> Look:
        """Ask for a look at state/ once the batches submitted so far are committed; it is
        done (`Look.done`) when the thread got there."""
        look = Look()
        self._queue.put(look)
        return look

    def drain(self) -> None:
        """Wait until every submitted batch is committed, or kept by a failure (`failed`)."""
        self._queue.join()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def uncommitted(self) -> set[str]:
        """The paths of the batches handed over and not committed yet."""
        with self._lock:
            return {p for b in self._unsettled for p in b.paths or ()}

    def failed(self) -> tuple[BaseException, list[Batch]] | None:
        """After a batch failed: the error and every batch not committed (that one and those
        handed over after it), oldest first, taken back; None when none failed. Then the
        thread commits what it is handed again."""
        if self._error is None:
            return None
        self._queue.join()  # the batches after it are passed over: none is left to write later
        with self._lock:
            error, self._error = self._error, None
            batches, self._unsettled = self._unsettled, []
        return error, batches

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                if isinstance(batch, Look):
                    self._look(batch)
                elif self._error is None:
                    if self._before is not None:
                        self._before()
                    self.repo.write(batch)
                    with self._lock:
                        del self._unsettled[0]  # this one: batches are written in order
                        self.committed += 1
            except BaseException as e:  # the batches go back to the loop's thread: see `failed`
                self._error = e
            finally:
                self._queue.task_done()

    def _look(self, look: Look) -> None:
        try:
            if self._error is not None:
                return  # a batch before it failed: its files would look changed by someone else
            look.moved = self.repo.moved_by_others()
            look.dirty = self.repo.dirty()
        except BaseException as e:  # raised in the loop's thread when it takes the look
            look.error = e
        finally:
            look.done.set()
