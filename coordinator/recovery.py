"""What a crash or a kill -9 left behind, put right when the supervisor starts.

After `recover()` every order is in exactly one place again: transitions written
but not committed are committed (and missing history lines repaired), order
folders a crash left without a record are filed again from their original,
claimed files are filed (a claimed copy's original, which a crash left in place,
is removed first), so are the follow-ups a route or an escalation named but a
crash kept from being filed, leftover specialist process trees of the dead
supervisor are killed, and interrupted attempts count as failed and are
re-queued (or landed, when their merge had already happened).

Example:
    >>> recovery.clear_repo_locks(sup)
    >>> recovery.commit_leftovers(sup, written)  # before the records are read
    >>> recovery.recover(sup, crashed=True)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from . import audit, claims, durable, verify
from .errors import CoordinatorError
from .inboxfiles import printable
from .paths import real

if TYPE_CHECKING:
    from .supervisor import Supervisor
    from .workspace import Workspace


def clear_repo_locks(sup: Supervisor) -> None:
    """Stale git locks of dead processes in repos/, and a merge interrupted half way."""
    from .repos import Repo

    for path in verify.repo_dirs(sup.ws):
        with contextlib.suppress(CoordinatorError):
            repo = Repo(path)
            if repo.clear_stale_lock():
                sup.say(f"cleared a stale lock in repos/{path.name}/.git left by a dead git process")
            for line in repo.heal_checkout().lines(path.name):
                sup.say(f"recovery: {line}")


def commit_leftovers(sup: Supervisor, written: dict[str, int] | None) -> None:
    """After a crash, before the records are read: commit what the crashed supervisor wrote
    and put back from git what someone else changed meanwhile. `written`: its journal of its
    writes (None: it kept none)."""
    for folder in {os.path.dirname(p) for p in written or ()}:
        # A write the crash cut off left its temp file beside its target: nobody's change.
        durable.clean_temps(sup.ws.state / folder)
    mine, foreign = sup.audit.recover(written)
    for name in mine:
        sup.say(f"recovery: committed state/{name}, written before a crash")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        sup.signal("silent", agent=None, order=None,
                   evidence=f"state/ changed by hand while no supervisor ran (restored from git): {shown}")


# The orders whose attempts a stop of the supervisor cut off (`Supervisor.close`), in
# .coordinator/: queued again at the next start without counting a failure of their agent.
CUT = "cut-by-stop.json"


def stopped_cleanly(ws: Workspace, written: dict[str, int] | None) -> bool:
    """Whether the supervisor's `running` marker was left by a stop that cut attempts off
    (Ctrl-C twice), not by a crash: such a stop keeps the marker, so that they are queued
    again at the next start, but it committed all it wrote, kept its last head, and dropped
    its journal (`written` None). Taken for a crash, a hand edit made since was committed as
    the supervisor's, a hand commit in its name passed as its own, and an order either set
    back ran again."""
    return written is None and (ws.runtime / CUT).exists()


def recover(sup: Supervisor, crashed: bool) -> None:
    """Finish what a crash interrupted (`commit_leftovers` came first); every order ends up
    in exactly one place."""
    if crashed:
        for line in sup.audit.repair_history(sup.records.values()):
            sup.say(f"recovery: history repaired: {line}")
    sup.attempts.keep_planned_ids()
    for folder in sup.store.unrecorded():
        original = next(iter(folder.glob("original.*")), None)
        if original is None:
            durable.note(folder)
            shutil.rmtree(folder, ignore_errors=True)
            sup.audit.stage(audit.SUPERVISOR, f"recovery: removed orders/{folder.name}/, which a crash left "
                                              "before its order moved in")
            continue
        if folder.name in sup.history.planned:
            # A follow-up cut off between its folder and its record: `refile_follow_ups` files it
            # again from the plan, under this id. Taken in from here it would be a second order
            # asking for that id, rejected as a duplicate on the sender's board.
            durable.note(folder)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        agent = _agent_from_original(sup, folder)
        try:
            meta = durable.read_json(folder / "intake.json")
        except (OSError, ValueError):
            meta = {}
        shown = str(meta.get("source") or f"inbox/{agent}/{original.name}")
        sent_by = meta.get("sender") if isinstance(meta.get("sender"), str) else None
        # Who sent it goes with it, noted before it moves: a crash before this folder (and its
        # intake.json) is gone must not file it as the user's, which anyone may send.
        claimed = sup.intake.claim(original, agent, note=None if sent_by is None else
                                   {"sender": sent_by, "source": shown})
        durable.note(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if claimed:
            sup.file_claimed(claimed, agent, shown=shown, sender=sent_by)
    for claimed, agent in sup.intake.claimed():
        # An outbox copy names its sender and source in a note (claims.claim_copy): filed as
        # that agent's, so its `sends_to` is checked as for any order it sends.
        note = claims.claim_note(claimed)
        sender, source, size = note.get("sender"), note.get("source"), note.get("size")
        if not isinstance(source, str):
            source = f"inbox/{agent}/{claimed.name.split('-', 1)[-1]}"
        # A copy whose original a crash left in place (an outbox file, an inbox file on
        # another file system): the original goes first, or the copy does.
        if not claims.release_origin(sup.ws.root, claimed, note):
            sup.say(f"recovery: {printable(source)} was copied but could not be removed; it stays "
                    "and is taken in from there, its copy is dropped")
            continue
        sup.file_claimed(claimed, agent, shown=source, sender=sender if isinstance(sender, str) else None,
                         size=size if isinstance(size, int) else None)
    # After the claimed files: a follow-up that made it that far has a record by now.
    for line in sup.attempts.refile_follow_ups():
        sup.say(f"recovery: filed a follow-up a crash cut off: {line}")
    running = [r for r in sup.records.values() if r.status == "running"]
    tokens = [str(r.running["token"]) for r in running if r.running]
    from .spawner import kill_leftovers
    # Also every process left in an attempt's own mount namespace, whatever it was marked:
    # none of this workspace's attempts runs before the loop starts.
    killed = kill_leftovers(tokens, workspace=str(sup.ws.root), attempts=real(sup.ws.runtime / "attempts"))
    if killed:
        sup.say(f"recovery: killed {killed} leftover process(es) of a dead supervisor")
    cut = sup.ws.runtime / CUT
    try:
        listed = durable.read_json(cut)
        sup.attempts.cut = frozenset(x for x in listed if isinstance(x, str)) if isinstance(listed, list) else frozenset()
    except (OSError, ValueError):  # none: a crash, or a stop that cut nothing off
        sup.attempts.cut = frozenset()
    for rec in running:
        sup.attempts.recover(rec)
    if crashed:
        for rec in [r for r in sup.records.values() if r.status == "queued"]:
            sup.attempts.count_unrecorded(rec)
    sup.step_commit()
    sup.attempts.cut = frozenset()
    cut.unlink(missing_ok=True)  # after the records it spared are written


def _agent_from_original(sup: Supervisor, folder: Path) -> str:
    for name in ("intake.json", "order.json"):
        try:
            return str(durable.read_json(folder / name)["to"])
        except (OSError, ValueError, KeyError):
            continue
    return next(iter(sup.config.agents))
