"""Attempts a crash interrupted: at the next start each ends as far as it had got.

An order still `running` on disk when the supervisor died is, by what its record
and its repository say: decided and delivering its outbox (the rest is delivered,
and it ends as it was decided), a request waiting for the orders it delegated (it
waits on), landed (its merge had happened: it is done), or a failed attempt
(queued again, or blocked after `max_failures`); one being cancelled is cancelled. A layer of `AttemptRunner`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import audit, runner
from .config import Agent
from .endings import Endings
from .errors import CoordinatorError
from .repos import Repo
from .store import Record

if TYPE_CHECKING:
    from .attempts import Active
    from .workspace import Workspace


class Interruptions(Endings):
    """Takes up the attempts a crash cut short (a layer of `AttemptRunner`)."""

    ws: Workspace
    waiting_requests: dict[str, Active]
    repo: Callable[[str], Repo]  # `AttemptRunner.repo`
    timer: Callable[[], float]  # `AttemptRunner.timer`
    # Orders whose attempts the supervisor's own stop cut off (`recovery.CUT`), while it recovers.
    cut: frozenset[str] = frozenset()

    def recover(self, rec: Record) -> None:
        """`rec` was running when the supervisor died: landed already, or a failed attempt."""
        number = int((rec.running or {}).get("number", rec.attempts))
        from .conversation import recover_usage  # here: conversation builds on attempts

        recover_usage(self.sup, rec, number)  # the model calls it made (if any) are billed all the same
        try:
            self._take_up(rec, number)
        finally:
            # After the rest of its outbox is delivered, never before: a folder there shaped like
            # a repository goes whole, with the orders in it that were still to be delivered.
            self._defuse(rec.id, runner.attempt_folder(self.ws, rec.id, number))

    def _take_up(self, rec: Record, number: int) -> None:
        info = rec.running or {}
        agent = self.sup.config.agents.get(rec.to)
        ending = _ending(info)
        if ending is not None and agent is not None:  # it was decided, and its outbox being delivered
            self._deliver_rest(rec, agent, number)
        repo_name = info.get("repo")
        # Ended (halted, routed, ...) before its request's children: it ends as it was decided,
        # never resumed as a request that waits for them (that would end it done).
        if ending is not None and agent is not None and ending["status"] != "running":
            if repo_name:
                self._remove_copy(rec, str(repo_name), info)
            rec.running = None
            self.sup.say(f"recovery: {rec.id}'s attempt {number} had ended {ending['status']} and was "
                         "delivering its outbox: the rest is delivered, and it is not run again")
            return self._close(rec, ending["status"], ending["actor"], note=ending["note"])
        by = info.get("cancelled_by")
        if isinstance(by, str) and by:  # cancelled while its processes were being stopped
            if repo_name:
                self._remove_copy(rec, str(repo_name), info)
            why = info.get("cancel_why")  # cancelled as the work of an order that was: why, as said before
            why = why if isinstance(why, str) and why else ""
            rec.running = None
            rec.report = {"summary": f"cancelled: {why}" if why else f"cancelled by {by}"}
            self.sup.say(f"recovery: {rec.id} was being cancelled when the supervisor stopped: it is cancelled, "
                         "not run again")
            return self.sup.move(rec, "cancelled", by, note=why or None)
        if agent is not None and agent.is_orchestrator and rec.children:
            # Now: resumed, its folder is set aside (`runner.prepare`) out of `recover`'s reach.
            self._defuse(rec.id, runner.attempt_folder(self.ws, rec.id, number))
            return self._resume_request(rec, agent, number)
        if repo_name:
            with contextlib.suppress(CoordinatorError):
                repo = self.repo(str(repo_name))
                # Only the commit the supervisor made and merged: a commit forged on the default
                # branch while it was dead, under this order's trailers, is no landing.
                sha = repo.landed(rec.id, number, agent=rec.to,
                                  vouched=[self.sup.heads.get(repo.name, {}).get("head")])
                if sha:
                    if ending is None and agent is not None:  # merged, then stopped before its outbox
                        self._deliver_rest(rec, agent, number)
                    rec.commit = sha
                    rec.running = None
                    rec.report = {"summary": "landed before the supervisor stopped", "merge": sha}
                    self.sup.move(rec, "done", rec.to, note="recovered after a crash")
                    self._note_landed(repo, sha)
                    return
                self._remove_copy(rec, repo.name, info, repo=repo)
        rec.running = None
        if rec.id in self.cut:  # the supervisor chose to stop: no fault of the agent's
            return self.sup.move(rec, "queued", audit.SUPERVISOR,
                                 note=f"attempt {number} was cut off when the supervisor stopped; not counted "
                                      "as a failure")
        rec.failures.append(f"interrupted: the supervisor stopped during attempt {number}")
        if agent is not None and len(rec.failures) >= agent.max_failures:
            self.block(rec, rec.failures[-1])
        else:
            self.sup.move(rec, "queued", audit.SUPERVISOR, note=rec.failures[-1])

    def _remove_copy(self, rec: Record, repo_name: str, info: dict[str, Any], *, repo: Repo | None = None) -> None:
        """Remove the interrupted attempt's working copy, saying in one line what stood in the
        way: a folder above it the agent closed (opened again), or a copy that stays."""
        workdir = Path(str(info.get("workdir", "")))
        try:
            reopened = (repo or self.repo(repo_name)).remove_worktree(rec.id, workdir, keep=False)
        except CoordinatorError as e:
            said = str(e).replace(f"{self.ws.root}/", "")  # in the workspace's terms
            self.sup.say(f"recovery: {rec.id}'s working copy could not be removed, it stays: {said}")
            return
        if reopened:
            shown = ", ".join(_shown(self.ws.root, f) for f in reopened)
            self.sup.say(f"recovery: {rec.id}'s working copy lay in {shown}, closed to the supervisor (by its "
                         "agent, or a person): opened again (owner rwx) and the copy removed")

    def count_unrecorded(self, rec: Record) -> None:
        """`rec` is queued, but its next attempt may have been started and cut off by the crash
        before its `running` record was written (`AttemptRunner.start` starts first and records
        after): its log, which the fork server opens before it starts the child, says so. That
        run counts as a failed attempt like any other a crash interrupted, so the number is not
        used twice (the agent ran, possibly to the end, and `show` said nothing of it)."""
        number = rec.attempts + 1
        if not (runner.log_folder(self.ws, rec.id, number) / runner.OUTPUT_LOG).exists():
            return
        self.sup.whole(rec)  # its failures are read back from its file first
        self._defuse(rec.id, runner.attempt_folder(self.ws, rec.id, number))
        rec.attempts = number
        rec.failures.append(f"interrupted: the supervisor stopped during attempt {number}")
        agent = self.sup.config.agents.get(rec.to)
        if agent is not None and len(rec.failures) >= agent.max_failures:
            self.block(rec, rec.failures[-1])
        else:
            self.sup.event(rec, f"attempt {number} was started and cut off by a crash before it was "
                                "recorded: counted as failed")

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
        from .attempts import Active, _timeout  # here, not above: attempts.py builds on this module

        order = self.sup.store.load_order(rec.id)
        attempt = runner.prepare(self.ws, order, number, rec.failures)
        tick = self.timer()
        act = Active(rec=rec, agent=agent, order=order, attempt=attempt, rules=None, started=self.sup.clock(),
                     deadline=tick + _timeout(order, agent), began=tick, phase="children", token=attempt.token)
        if attempt.repo is not None:
            act.repo = self.repo(attempt.repo)
        self.waiting_requests[rec.id] = act


ENDINGS = ("done", "halted", "routed", "waiting", "blocked", "running")


def _ending(running: dict[str, Any]) -> dict[str, Any] | None:
    """How a decided attempt ends, as `_deliver` wrote it before taking its outbox (None: it
    was not decided, or what the record says is not one)."""
    ending = running.get("ending")
    if not isinstance(ending, dict) or ending.get("status") not in ENDINGS \
            or not isinstance(ending.get("actor"), str) or not isinstance(ending.get("note"), str | None):
        return None
    return ending


def _shown(root: Path, path: Path) -> str:
    """`path` as the workspace names it (relative to its root), when it lies in it."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)
