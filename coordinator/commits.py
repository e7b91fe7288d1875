"""state/ written and committed: what the loop changed goes to disk each step, to git in batches.

`Commits` is the supervisor's lowest layer. `_write_state` puts what a step filed and changed
on disk; `_flush` commits what is staged, at once or (in the loops) through the committer
thread, so that the steps of a second share a commit. What a failed commit held is staged
and journaled again and goes with the next batch; after COMMIT_TRIES failures in a row the
loop stops, and the next start commits what was written (`recovery`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from . import durable
from .audit import SUPERVISOR, Batch, StateRepo
from .committer import Committer, Look
from .errors import CoordinatorError, SupervisorError
from .intake import Intake
from .store import Store
from .workspace import Workspace

COMMIT_QUIET = 0.05         # seconds without progress before the loops commit what is staged
COMMIT_TRIES = 3            # failed state/ commits in a row before the loop stops (each waits out a lock)


class Commits:
    """The writes and commits of state/ for one supervisor (`supervisor.Supervisor` sets the state)."""

    ws: Workspace
    say: Callable[[str], None]
    store: Store
    intake: Intake
    audit: StateRepo
    _look: Look | None  # the tamper watch's look the committer has yet to take
    _last_flush: float
    _committer: Committer | None
    _commit_failures: int  # state/ commits that failed in a row (their batches staged again)
    _failed_at: int | None  # the committer's count of batches committed at the last failure
    _compacted_at: int  # the committer's count of batches committed when the journal was compacted

    def _take_look(self) -> None:
        """Act on the tamper watch's look once the committer took it: `Supervisor._take_look`."""
        raise NotImplementedError

    def _write_state(self) -> None:
        """Put what this step filed and changed on disk: order folders first, records last."""
        self.intake.place_pending()
        for order_id, agent, text in self.intake.take_events():  # in the order's trail, and said
            self.audit.stage(SUPERVISOR, f"{order_id} {agent}: {text}")
            self.say(f"{order_id} {agent}: {text}")
        self.store.write_dirty()

    def step_commit(self) -> None:
        self._flush()

    @contextlib.contextmanager
    def _flushed(self) -> Iterator[None]:
        """Whatever the loop staged is committed when the block is left. Left on an error, that
        error is the one said: a commit failing after it is not (what it would have committed
        stays staged and journaled, and the next start commits it)."""
        try:
            yield
        except BaseException:
            # OSError too: a workspace moved away, or a full disk, fails this commit as well.
            with contextlib.suppress(CoordinatorError, OSError):
                self._flush()
            raise
        self._flush()

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
                try:
                    self._committer_thread().submit(batch)
                except BaseException:
                    # Its thread refused (a process limit): the batch is staged and journaled
                    # again, or the next compaction dropped it from the journal and the next
                    # start took these writes for hand edits, and deleted them.
                    self._give_back([batch])
                    raise
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

    def _take_back_failed(self, committer: Committer, *, stop: bool = True) -> bool:
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

    def _give_back(self, batches: list[Batch]) -> None:
        self.audit.restage(batches)
        # Newest first: a path a later batch wrote again keeps what that write left, and the
        # lines an earlier one appended go in front of the later one's.
        for b in reversed(batches):
            durable.give_back(self.ws.state, {p: b.written.get(p) for p in b.paths or ()})

    def _committer_thread(self) -> Committer:
        """The thread that commits state/ for the running loop, started when first needed."""
        if self._committer is None:
            self._committer = Committer(self.audit, before=lambda: durable.sync_fs(self.ws.state))
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
