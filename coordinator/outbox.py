"""The outbox: the work orders an attempt wrote into $COORD_OUTBOX, delivered once it is decided.

Nothing is taken while a check or the merge can still fail the attempt (an
orchestrator's is taken when it reports done: its request then waits for the orders
it sent): a failed attempt sends nothing, and its retry sends its orders once. How a
decided attempt ends is written to its record before its outbox is taken, so a crash
part way ends it so at the next start, which delivers the rest (`_deliver_rest`).
What an outbox holds that is not delivered is said in the sender's report: past
`MAX_SENT` orders of one attempt, and all of it past `MAX_CHAIN` orders in a row sent on
(by outboxes, routes, escalations, plans: agents sending each other work for ever). A layer
of `AttemptRunner`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import claims, gate, orders, runner
from .config import Agent
from .inboxfiles import printable
from .store import Record

if TYPE_CHECKING:
    from .attempts import Active
    from .supervisor import Supervisor
    from .workspace import Workspace


# Orders one attempt may send. Each is an order filed, a line in the sender's report and in
# state/'s history: a specialist's outbox of 2,000 made a report of 56 KB, twice an
# orchestrator's whole budget of hot tokens. Past it, the rest stay in the outbox, said once.
MAX_SENT = 200
# Orders in a row each sent from the outbox of the one before: two agents that answer every
# order by sending the other one sent work to and fro for ever (a thousand orders a minute,
# all `done`; `supervise --once` never ended). The outbox of the last is kept, said in its report.
MAX_CHAIN = 10
# Lines of a report's `undelivered`: one per file kept was 20,000 lines (2 MB in state/, all
# of it the sender's hot tokens) for a failed attempt that left 20,000 files in its outbox.
MAX_LISTED = 20
OUTBOX_SOURCE = "outbox of "
# What hands an order's work on and so continues its chain: a route's follow-up or an escalation
# starting the count afresh let an outbox and a route take turns for ever (chip sends rex an
# order, rex routes it back to chip, chip sends again...), each turn a chain of one. So did an
# LLM orchestrator's plan: chip asked walt, walt's model planned an order for chip, chip asked
# again... (a command orchestrator's orders come from its outbox, and count as they do).
HANDED_ON = (OUTBOX_SOURCE, "route of ", "escalation of ", "plan of ")


class Outbox:
    """Delivers the outboxes of decided attempts (a layer of `AttemptRunner`)."""

    sup: Supervisor
    ws: Workspace

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

    def _deliver_outbox(self, rec: Record, sender: str, box: Path, files: list[Path],
                        undelivered: list[str], *, sent: int = 0) -> None:
        """Work orders the specialist wrote into $COORD_OUTBOX (`files`, see `_outbox_files`),
        stamped with its name; each leaves the outbox as it is taken, so what is left there
        was not delivered. `sent`: orders of this outbox delivered before a crash (MAX_SENT)."""
        why = chain_problem(self.sup.records, rec)
        if why is not None:
            self.sup.say(f"{rec.id}: its outbox is not delivered: {why}")
            undelivered += not_delivered(box, files, f"{why}; send it yourself if it is wanted")
            return
        if len(files) > MAX_SENT - sent:
            over, files = files[max(0, MAX_SENT - sent):], files[:max(0, MAX_SENT - sent)]
            self.sup.say(f"{rec.id}: the outbox holds {len(over)} order(s) past the {MAX_SENT} one attempt "
                         "may send; they are not delivered")
            undelivered.append(f"{len(over)} file(s) past the {MAX_SENT} orders one attempt may send "
                               f"(from {shown_name(over[0])[0]} on, by name): kept in {shown_name(over[0])[1]}")
        peeks = {path: _peek(box, path) for path in files}  # each file read once
        for path in _dependency_order(files, peeks):
            to, unread = (path.parent.name, None) if path.parent != box else (peeks[path].to, peeks[path].unread)
            name, kept = shown_name(path)
            if to not in self.sup.config.agents:
                why = _no_recipient(path, to, in_folder=path.parent != box, unread=unread)
                self.sup.say(f"{rec.id}: outbox file {name} {why.split(' (')[0]}; not delivered")
                undelivered.append(f"{name}: {why}; kept in {kept}")
                continue
            # A copy, not the file: a process of the attempt may still hold it open for writing.
            shown_as = f"{OUTBOX_SOURCE}{rec.id}/{path.name}"
            try:
                taken = self.sup.intake.claim_copy(path, to, sender=sender, shown=shown_as, within=box)
            except claims.Unremovable as e:
                self.sup.say(f"{rec.id}: outbox file {name} cannot be taken out of the outbox ({e}); "
                             "not delivered")
                undelivered.append(f"{name}: cannot be taken out of the outbox ({e}); kept in {kept}")
                continue
            if taken:
                claimed, size = taken
                child = self.sup.file_claimed(claimed, to, shown=shown_as, sender=sender, size=size)
                rec.children.append(child.id)
                if os.path.lexists(path):  # another file renamed over it while it was copied: never read
                    self.sup.say(f"{rec.id}: outbox file {name} was replaced while it was taken; "
                                 "the new one is not delivered")
                    undelivered.append(f"{name}: replaced while it was taken (what it held before was "
                                       f"delivered); the new file is kept in {kept}")

    def _deliver_rest(self, rec: Record, agent: Agent, number: int) -> None:
        """A crash cut short the delivery of a decided attempt's outbox: the orders it had
        delivered (filed again by recovery, if need be, from where the crash left them) are its
        children, and what is still in its outbox is delivered now, once."""
        made_here = f"{OUTBOX_SOURCE}{rec.id}/"
        rec.children += [r.id for r in sorted(self.sup.records.values(), key=lambda r: r.seq)
                         if r.source.startswith(made_here) and r.id not in rec.children]
        undelivered: list[str] = []
        box = runner.attempt_folder(self.ws, rec.id, number) / "outbox"
        sent = sum(1 for r in self.sup.records.values() if r.source.startswith(made_here))
        self._deliver_outbox(rec, agent.name, box, _outbox_files(box, undelivered), undelivered, sent=sent)
        if undelivered:
            rec.report = {**(rec.report or {}), "undelivered": capped(undelivered)}


def _dependency_order(files: list[Path], peeks: Mapping[Path, orders.Peek]) -> list[Path]:
    """`files` by name, but each after those of the same outbox that declare an id it waits on
    (`blocked_by`): taken first, it was rejected, its dependency not yet filed. A cycle is
    left in name order (and rejected as one)."""
    declared: dict[str, Path] = {}
    waits = {path: peeks[path].blocked_by for path in files}
    for path in files:
        own = peeks[path].id
        if own is not None:
            declared.setdefault(own, path)
    if not any(d in declared for ids in waits.values() for d in ids):
        return files
    ordered: list[Path] = []
    left = list(files)
    while left:
        pending = set(left)
        ready = [p for p in left if not any(declared.get(d) in pending and declared[d] != p for d in waits[p])]
        if not ready:  # a cycle: what is left goes by name
            return ordered + left
        ordered += ready
        taken = set(ready)
        left = [p for p in left if p not in taken]
    return ordered


def _chain(records: Mapping[str, Record], rec: Record) -> list[str]:
    """`rec` and the orders before it whose outbox, route, escalation or plan filed the next one, newest
    first (at most MAX_CHAIN + 1): `rec` alone when a person filed it."""
    chain = [rec.id]
    while rec.source.startswith(HANDED_ON) and len(chain) <= MAX_CHAIN:
        sender = records.get(rec.source.split(" of ", 1)[1].split("/", 1)[0])
        if sender is None or sender.id in chain:
            break
        chain.append(sender.id)
        rec = sender
    return chain


def chain_problem(records: Mapping[str, Record], rec: Record) -> str | None:
    """Why `rec` may send no work on (by its outbox, a route or a plan), or None: it came at the
    end of MAX_CHAIN orders in a row, each sent on by the one before. Looked at only where an
    outbox was delivered, a route and a plan taking turns sent each other work for ever."""
    chain = _chain(records, rec)
    if len(chain) <= MAX_CHAIN:
        return None
    ids = chain[::-1]
    route = " -> ".join(ids if len(ids) <= 4 else [ids[0], "...", *ids[-2:]])
    sources = [records[i].source for i in chain[:-1] if i in records]
    how = "an outbox" if all(s.startswith(OUTBOX_SOURCE) for s in sources) else \
        "an outbox, a route, an escalation or a plan"
    return (f"{rec.id} came at the end of {len(chain) - 1} orders in a row sent from {how} "
            f"({route}), the most one chain may be: agents that keep sending each other work "
            "would never stop")


def _note_undelivered(act: Active) -> None:
    """The sender learns from the report which outbox files were not delivered, not only
    from the supervisor's log."""
    if act.undelivered:
        act.rec.report = {**(act.rec.report or {}), "undelivered": capped(act.undelivered)}


def not_delivered(box: Path, files: list[Path], why: str) -> list[str]:
    """The report's lines for outbox `files` kept for one reason: a line for each of the first
    MAX_LISTED - 1, then one for the rest."""
    shown = files if len(files) <= MAX_LISTED else files[:MAX_LISTED - 1]
    lines = [f"{name}: not delivered: {why}; kept in {kept}" for name, kept in map(shown_name, shown)]
    if len(shown) < len(files):
        lines.append(f"{len(files) - len(shown)} more file(s) (from {shown_name(files[len(shown)])[0]} on, "
                     f"by name): not delivered: {why}; kept in {printable(str(box))}")
    return lines


def capped(lines: list[str]) -> list[str]:
    """At most MAX_LISTED lines of what was not delivered: the rest are counted."""
    if len(lines) <= MAX_LISTED:
        return lines
    return [*lines[:MAX_LISTED - 1], f"{len(lines) - MAX_LISTED + 1} more line(s) like these left out"]


def shown_name(path: Path) -> tuple[str, str]:
    """An outbox file's name and folder as they are printed and stored: the specialist chose
    them, and a line break or an escape sequence in them must not forge a line of a report
    or reach a terminal (escaped, as an inbox file's name is)."""
    return printable(path.name), printable(str(path.parent))


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
        rel = printable(os.path.relpath(folder, box))
        return f"{rel[:60]}...{rel[-60:]}" if len(rel) > 130 else rel

    # An explicit stack and a depth limit, not os.walk: that recurses, and the specialist
    # chose how deep its outbox goes. Links are listed (and skipped), never entered.
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
            # Told from the listing, not by looking the path up again: the specialist can make a
            # path too long to look up (ENAMETOOLONG), and it is taken from its folder all the same.
            try:
                if item.is_file(follow_symlinks=False):
                    if not item.name.startswith("."):
                        found.append(Path(item.path))
                    continue
                if not item.is_dir(follow_symlinks=False):  # a link, a FIFO: never taken, and said
                    if not item.name.startswith("."):
                        undelivered.append(_no_file(item))
                    continue
            except OSError:
                continue
            if depth + 1 < gate.MAX_DEPTH:
                todo.append((item.path, depth + 1))
            else:
                undelivered.append(f"{shown(item.path)}: over {gate.MAX_DEPTH} folders deep in the "
                                   "outbox; not read, nothing in it was delivered")
    return sorted(found)


def _no_file(item: os.DirEntry[str]) -> str:
    """The report's line for an outbox entry that is no file or folder: the order the specialist
    meant to send by it stays behind, said, not dropped in silence."""
    name, kept = shown_name(Path(item.path))
    if item.is_symlink():
        try:
            target = printable(os.readlink(item.path))
        except OSError as e:
            target = f"unreadable: {e.strerror}"
        target = f"{target[:60]}...{target[-60:]}" if len(target) > 130 else target
        what = f"is a symbolic link (to {target}), which an outbox never follows; write the order file itself"
    else:
        what = "is no regular file (a FIFO, a socket or a device); write the order as a file"
    return f"{name}: not delivered: {what}; kept in {kept}"


def _no_recipient(path: Path, to: str | None, *, in_folder: bool, unread: str | None = None) -> str:
    """Why an outbox file goes to nobody: its folder names no agent, it is no work order
    file, it could not be read as far as its recipient (`unread`: why), or it names no agent
    of the team."""
    hint = "(give it `to: <agent>` or write it into $COORD_OUTBOX/<agent>/)"
    if in_folder:
        return f"is in the folder {printable(path.parent.name)[:40]}/, which names no agent of the team {hint}"
    if orders.KINDS.get(path.suffix.lower()) is None:
        shown = f"a {printable(path.suffix)} file" if path.suffix else "a file without a suffix"
        return f"is {shown}, not a work order (a .md, .markdown, .yaml, .yml or .json file)"
    if unread is not None:
        return f"could not be read for its recipient: {printable(unread)[:300]}"
    if to is not None:
        return f"names `to: {printable(to)[:40]}`, who is not on the team {hint}"
    return f"names no known recipient {hint}"


def _peek(box: Path, path: Path) -> orders.Peek:
    """What an outbox file says of itself (`orders.peek`): its recipient, even when the rest of
    it is invalid (then it is delivered all the same and rejected there, with its errors on the
    board), and the ids it declares and waits on, for the order of delivery."""
    data = runner.read_untrusted(path, orders.MAX_ORDER_BYTES, within=box)
    return orders.Peek() if data is None else orders.peek(data, path=path.name)
