"""Validating and sending work orders from the command line, and workspace chores.

`send` validates against the team and the workspace's history, reserves an id
when the order has none, and drops the file atomically: a dot-file in the inbox,
fsync, rename, fsync the folder. An invalid order writes nothing.

Who an order is for: `--to`, else the file's own `to:` (so `coordinator new --to
chip > fix.md` then `coordinator send fix.md` works); `validate` also takes the
inbox folder a file sits in. A file in an inbox is not sent again (it would be
filed twice).

Example:
    >>> order_id = send(ws, Path("fix.md").read_bytes(), name="fix.md", to="chip", sender=None)
    >>> order_id
    'WO-0007'
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import select
import stat
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from . import durable, orders
from ._orderfields import MAX_PROBLEMS, finish
from ._orderfile import flow_kind, front_matter, read_order, too_big
from .errors import NotFoundError, OrderError, Problem, UsageError, WorkspaceError
from .inboxfiles import is_candidate, printable
from .intake import NOT_REGULAR, waiting_orders, waits_on
from .store import ENDED_UNDONE, History, Store, ended_undone, via_route
from .workspace import Workspace

RESERVED = "ids"  # .coordinator/ids/: id reservations shared with the supervisor's intake
STDIN = "<stdin>"
SUFFIXES = {"markdown": ".md", "yaml": ".yaml", "json": ".json"}
# A Markdown order shows itself by a bold label (`**Objective:**`) or a section heading;
# YAML and JSON never have either, so this tells the three apart on stdin.
_MD_LABEL = re.compile(r"^ {0,3}(?:\*\*[^*\n]{1,60}?(?::\*\*|\*\*[ \t]*:)|#{1,6}[ \t]+"
                       r"(?:objective|acceptance|files|branching)\b)", re.IGNORECASE | re.MULTILINE)


class _Sent(History):
    """The workspace's orders, and those sent but not yet taken in: an order sent right after
    another may name it in `blocked_by` before a supervisor has run, and one that would close a
    `blocked_by` cycle with orders still waiting is refused as intake would refuse it."""

    def __init__(self, ws: Workspace) -> None:
        store = Store(ws.state)
        super().__init__(store.load_all(), store)
        self.ws = ws
        self.itself: Path | None = None  # the file being validated, when it waits in an inbox
        self._declared: dict[str, Path] | None = None  # read once, when first needed
        self._waits: dict[str, tuple[str, ...]] = {}  # blocked_by of waiting orders, as read

    def exists(self, order_id: str) -> bool:
        return super().exists(order_id) or self.waiting(order_id) is not None

    def same_id(self, order_id: str) -> str | None:
        found = super().same_id(order_id)
        if found is not None:
            return found
        key = order_id.lower()
        for agent in self.ws.config.agents:  # files named after their ids, as `send` names them
            if self.ws.inbox_is_link(agent):
                continue
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for entry in os.scandir(self.ws.inbox(agent)):
                    stem = os.path.splitext(entry.name)[0]
                    if is_candidate(entry.name) and stem.lower() == key and stem != order_id \
                            and not (self.itself is not None and _same(Path(entry.path), self.itself)):
                        return stem
        if self._declared is None:
            self._declared = waiting_orders(self.ws.inbox_root, Store(self.ws.state).intake_dir, self.ws.config.agents).declared
        for declared, path in self._declared.items():
            if declared.lower() == key and declared != order_id \
                    and not (self.itself is not None and _same(path, self.itself)):
                return declared
        return None

    def waiting(self, order_id: str) -> str | None:
        found = self._waiting_file(order_id)
        if found is None or (self.itself is not None and _same(found, self.itself)):
            return None
        return self.ws.rel(found)

    def blocked_by_of(self, order_id: str) -> tuple[str, ...]:
        if order_id in self.records:
            return super().blocked_by_of(order_id)
        if order_id not in self._waits:
            found = self._waiting_file(order_id)
            self._waits[order_id] = () if found is None else waits_on(found, found.parent.name)
        return self._waits[order_id]

    def _waiting_file(self, order_id: str) -> Path | None:
        found = pending_file(self.ws, order_id)
        if found is None:
            # Not named after it, but declaring it (`id: zz` in a file copied in by hand).
            if self._declared is None:
                self._declared = waiting_orders(self.ws.inbox_root, Store(self.ws.state).intake_dir, self.ws.config.agents).declared
            found = self._declared.get(order_id)
        return found


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them gone meanwhile
        return False


def _inbox_takes_in(ws: Workspace, agent: str) -> None:
    """WorkspaceError when an order sent to `agent` would wait in its inbox forever."""
    if ws.inbox_is_link(agent):
        raise WorkspaceError(f"inbox/{agent} is a symbolic link; the supervisor never takes orders in "
                             "through one, so an order sent there would never run: replace it with a folder")


def history(ws: Workspace) -> _Sent:
    return _Sent(ws)


def load_order(ws: Workspace, data: bytes, *, path: str, to: str | None, sender: str | None, kind: str | None,
               hist: _Sent) -> orders.WorkOrder:
    """`orders.load` against the team and `hist`, and one rule more for what is sent or validated
    by hand: an order may not wait on one that will never be done (it ended rejected, denied or
    cancelled). Intake blocks such an order at once (`send` said its id, and it never ran); an
    order dropped into an inbox by hand still gets that treatment. OrderError lists every problem."""
    order, invalid = None, None
    try:
        # A repository repos/ does not have is said now, not by intake after the order was sent.
        order = orders.load(data, path=path, to=to, config=ws.config, history=hist, sender=sender, kind=kind,
                            repos=ws.repos)
    except OrderError as e:
        invalid = e
    problems = invalid.problems if invalid else []
    if len(problems) < MAX_PROBLEMS and any(r.status in ENDED_UNDONE for r in hist.records.values()):
        dead = _never_done(hist, data, path=path, to=to, sender=sender, kind=kind)
        if dead:
            raise OrderError(finish(problems + dead[0], dead[1])) from None
    if order is None:
        assert invalid is not None
        raise invalid
    return order


def _never_done(hist: _Sent, data: bytes, *, path: str, to: str | None, sender: str | None,
                kind: str | None) -> tuple[list[Problem], dict[str, int]] | None:
    """A problem for each `blocked_by` entry naming an order that will never be done, with the
    lines of the file's fields; None when there is none."""
    try:
        draft = read_order(data, path=path, to=to, sender=sender, kind=kind)
    except OrderError:  # refused as a whole file: said already
        return None
    named = draft.fields.get("blocked_by")
    found: list[Problem] = []
    for i, dep in enumerate(named if isinstance(named, list) else []):
        end = ended_undone(hist.records, [dep]) if isinstance(dep, str) else None
        if end is None:
            continue
        last = end[1]
        why = (f"ended {last.status}" if last.status in ENDED_UNDONE
               else f"is {last.status} on an order that ended undone")
        found.append(Problem(f"blocked_by.{i}", f"{via_route(dep, last)} {why}: it will never be done, so this "
                                                "order would wait forever; drop it from blocked_by", path))
    return (found, draft.lines) if found else None


def validate_files(ws: Workspace, files: list[str], *, to: str | None, sender: str | None) -> list[dict[str, Any]]:
    """Each file's verdict: {file, to, valid, readable, checks, problems[, id]}; never raises for
    a bad file. `readable` is false for a file that could not be read (missing, a folder, a
    FIFO): a usage error, not an invalid order. `-` is read from stdin (any format, recognized).
    An unknown `to` is a usage error, raised before any file is read."""
    if to is not None:
        orders.known_agent(to, ws.config)
    if sender is not None:
        orders.known_sender(sender, ws.config)
    hist = history(ws)
    report: list[dict[str, Any]] = []
    for name in files:
        stdin = name == "-"  # only `-` itself: `./-` is the file of that name
        path = Path(name)
        shown = STDIN if stdin else printable(ws.rel(path))
        recipient = to or (None if stdin else ws.agent_of_inbox(path))
        entry: dict[str, Any] = {"file": shown, "to": recipient, "valid": False, "readable": True, "checks": 0,
                                 "problems": []}
        hist.itself = None if stdin else path
        try:
            if stdin and files.index("-") < len(report):  # read to its end by the first: "is empty"
                raise UsageError(f"{STDIN}: - is named more than once; standard input holds one order")
            data = read_stdin() if stdin else read_file(path, shown=shown)
            order = load_order(ws, data, path=shown, to=recipient, sender=sender,
                               kind=sniff(data) if stdin else None, hist=hist)
            _inbox_takes_in(ws, order.to)
            entry.update(to=order.to, valid=True, checks=len(order.checks), id=order.id)
        except OrderError as e:
            entry["problems"] = [p.as_dict() | {"text": str(p)} for p in e.problems]
        except UsageError as e:
            entry["readable"] = False
            entry["problems"] = [{"path": shown, "line": None, "field": "", "message": str(e), "text": str(e)}]
        report.append(entry)
    return report


def verdict(report: list[dict[str, Any]]) -> int:
    """The exit code of `validate`: 2 when a file could not be read (as `send` says), else 1 when
    an order is invalid, else 0."""
    if not all(r["readable"] for r in report):
        return 2
    return 0 if all(r["valid"] for r in report) else 1


def refuse_inbox_file(ws: Workspace, path: Path, *, shown: str) -> None:
    """A file in an inbox is sent already: sending it again would file it twice."""
    agent = ws.agent_of_inbox(path)
    if agent is not None and agent in ws.config.agents and is_candidate(path.name) and os.path.lexists(path):
        raise UsageError(f"{shown} is in {agent}'s inbox already: the supervisor takes it in from there "
                         "(`coordinator validate` checks it; move it out of the inbox to send it elsewhere)")
    waiting = _linked_in_an_inbox(ws, path)
    if waiting is not None:  # a hard link: sent, the order was filed twice, once from each name
        raise UsageError(f"{shown} is the same file as {ws.rel(waiting)} (a hard link), which is in "
                         f"{waiting.parent.name}'s inbox already: the supervisor takes it in from there "
                         "(copy the file to send it as another order)")


def _linked_in_an_inbox(ws: Workspace, path: Path) -> Path | None:
    """The name in an agent's inbox that `path` is a hard link of, or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # reading it says why
    if st.st_nlink < 2 or not stat.S_ISREG(st.st_mode):
        return None
    for agent in ws.config.agents:
        if ws.inbox_is_link(agent):
            continue
        with contextlib.suppress(OSError):
            for entry in os.scandir(ws.inbox(agent)):
                if entry.inode() == st.st_ino and is_candidate(entry.name) and \
                        entry.stat(follow_symlinks=False).st_dev == st.st_dev:
                    return Path(entry.path)
    return None


def send(ws: Workspace, data: bytes, *, name: str, to: str | None, sender: str | None,
         kind: str | None = None) -> orders.WorkOrder:
    """Validate, then drop atomically into `inbox/<to>/` as `<id><suffix>`; returns the order as sent.

    `name` is what messages call the file (its suffix picks the format unless `kind` is given);
    `to` None means the file's own `to:`. Raises OrderError (nothing written) when invalid.
    """
    cfg = ws.config
    if to is not None:
        orders.known_agent(to, cfg)
    if sender is not None:
        orders.known_sender(sender, cfg)

    order = load_order(ws, data, path=name, to=to, sender=sender, kind=kind, hist=history(ws))
    _inbox_takes_in(ws, order.to)
    suffix = SUFFIXES[kind] if kind else (Path(name).suffix.lower() or ".md")
    reserved, dropped = None, data
    if order.id is None or sender is not None:
        # The file as dropped must say what was validated: the assigned id, the stamped sender.
        reserved = None if order.id else reserve_id(ws)
        order = dataclasses.replace(order, id=order.id or reserved)
        dropped, suffix = orders.render(order).encode("utf-8"), ".md"
    assert order.id is not None
    inbox = ws.inbox(order.to)
    try:
        inbox.mkdir(parents=True, exist_ok=True)
        target = _free_name(inbox, f"{order.id}{suffix}")
        # A dot-file is invisible to the supervisor until the link makes it whole at once.
        tmp = inbox / f".{target.name}.{os.getpid()}.tmp"
        try:
            durable.write_bytes(tmp, dropped)
            while not _place(tmp, target):
                if reserved is None:  # the order's own id, placed by another send since it was validated
                    # Refused now, as a send after that one would be.
                    load_order(ws, data, path=name, to=to, sender=sender, kind=kind, hist=history(ws))
                target = _free_name(inbox, f"{order.id}{suffix}")
        finally:
            with contextlib.suppress(OSError):  # a read-only inbox: nothing there to remove
                tmp.unlink(missing_ok=True)
    except OSError:
        if reserved is not None:  # never sent: its id is free for the next order again
            with contextlib.suppress(OSError):
                (ws.runtime / RESERVED / reserved).unlink()
        raise
    durable.fsync_dir(inbox)
    return order


def sniff(data: bytes) -> str:
    """The format of an order that has no file name (stdin): markdown, yaml or json."""
    text = data[:64 * 1024].decode("utf-8-sig", errors="replace").lstrip()
    if text.startswith(("{", "[")):  # JSON, or YAML in flow style
        return flow_kind(text)
    return "markdown" if _MD_LABEL.search(text) or front_matter(text) else "yaml"


def pending_file(ws: Workspace, order_id: str, *, anywhere: bool = False) -> Path | None:
    """A file named after `order_id` still waiting in an agent's inbox (not yet taken in). With
    `anywhere`, also in a folder of inbox/ that is no agent's inbox (where it is never taken in)."""
    folders: list[str] = []
    if anywhere:
        with contextlib.suppress(OSError):
            folders = [e.name for e in os.scandir(ws.inbox_root) if e.is_dir(follow_symlinks=False)]
    else:  # an inbox of no agent, or one that is a link, is never taken in from
        folders = [a for a in ws.config.agents if not ws.inbox_is_link(a)]
    for folder in folders:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(ws.inbox(folder)):
                if is_candidate(entry.name) and os.path.splitext(entry.name)[0] == order_id:
                    return Path(entry.path)
    return None


@contextlib.contextmanager
def explain_missing(ws: Workspace, order_id: str) -> Iterator[None]:
    """An unknown id that still sits in an inbox gets a better message than "no order"."""
    try:
        yield
    except NotFoundError:
        waiting = pending_file(ws, order_id, anywhere=True)
        if waiting is None:
            raise
        agent = waiting.parent.name
        if agent not in ws.config.agents:
            raise NotFoundError(f"{order_id} is in {ws.rel(waiting)}, but no agent in coordinator.yaml has that "
                                f"inbox, so it is never taken in: move it into the inbox of one of "
                                f"{', '.join(sorted(ws.config.agents))}") from None
        from .control import started_without, supervisor_running

        if started_without(ws, agent):  # it said it would take it in: only a restart does
            raise NotFoundError(f"{order_id} is still in {ws.rel(waiting)}, not yet taken in; the running "
                                f"supervisor started before {agent} was in coordinator.yaml, so it takes it in "
                                "only once it is restarted (or delete the file to withdraw it)") from None
        if supervisor_running(ws):
            raise NotFoundError(f"{order_id} is still in {ws.rel(waiting)}, not yet taken in; the running "
                                "supervisor takes it in once nothing writes it any more (or delete the file to "
                                "withdraw it)") from None
        raise NotFoundError(f"{order_id} is still in {ws.rel(waiting)}, not yet taken in; start "
                            "`coordinator supervise` (or delete the file to withdraw it)") from None


def reserve_id(ws: Workspace) -> str:
    """The next WO-NNNN, reserved so that neither `send` nor intake hands it out twice."""
    folder = ws.runtime / RESERVED
    folder.mkdir(parents=True, exist_ok=True)
    store = Store(ws.state)
    top = store.max_assigned()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            top = max(top, orders_id_number(entry.name))
    # An id an order waiting in an inbox names for itself is its, though not yet taken in.
    named = waiting_orders(ws.inbox_root, store.intake_dir, ws.config.agents).numbers
    n = top + 1
    while True:
        candidate = f"WO-{n:04d}"
        if n in named:
            n += 1
            continue
        try:
            os.close(os.open(folder / candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return candidate
        except FileExistsError:
            n += 1


def orders_id_number(name: str) -> int:
    if name.startswith("WO-") and name[3:].isdigit():
        return int(name[3:])
    return 0


def _place(tmp: Path, target: Path) -> bool:
    """Give `tmp` the name `target` unless a file has it (False): a rename would replace an
    order another `send` placed there a moment ago, and lose it."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.rename(tmp, target)  # a file system without hard links: only a rename is atomic there
    return True


def _free_name(folder: Path, name: str) -> Path:
    base = Path(name).name.lstrip(".") or "order.md"
    target = folder / base
    n = 1
    while target.exists():
        stem, suffix = os.path.splitext(base)
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target


def read_file(path: Path, *, shown: str | None = None) -> bytes:
    """A work order's bytes, read no further than the size limit says matters. Only a regular
    file (a link to one is fine): a FIFO is refused, never waited on, as intake refuses it."""
    said = shown or str(path)
    try:
        # Non-blocking: opening a FIFO with no writer must not hang; a regular file ignores it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{said}: no such file") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket
            raise UsageError(f"{said}: {NOT_REGULAR}") from None
        raise UsageError(f"{said}: cannot read: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise UsageError(f"{said}: is a folder, not a work order")
        raise UsageError(f"{said}: {NOT_REGULAR}; to send what a program writes, pipe it to `-`")
    os.set_blocking(fd, True)
    with open(fd, "rb") as f:
        try:
            return read_stream(f, shown=said)
        except OSError as e:
            raise UsageError(f"{said}: cannot read: {e.strerror}") from None


def read_stdin() -> bytes:
    """The order piped to `-`; UsageError when there is no stdin to read from."""
    reason = "standard input is closed"  # `<&-`: Python has no sys.stdin then
    if sys.stdin is not None:
        try:
            return read_stream(_Terminal(sys.stdin.fileno()) if sys.stdin.isatty() else sys.stdin.buffer)
        except OSError as e:  # opened for writing only, say
            reason = f"cannot read: {e.strerror}"
    raise UsageError(f"{STDIN}: {reason}; pipe the order in, or name its file instead of -")


class _Terminal:
    """Standard input at a terminal, read so that Ctrl-C always ends the wait: a SIGINT that
    lands between Python's last look at its signals and the blocking read(2) is otherwise
    only acted on after the next line typed (Ctrl-C pressed as the hint appeared did nothing)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def read(self, limit: int) -> bytes:
        data = bytearray()
        while len(data) < limit:
            # A short wait, then Python looks at its signals again: a pending Ctrl-C raises here.
            if not select.select([self.fd], [], [], 0.2)[0]:
                continue
            chunk = os.read(self.fd, limit - len(data))
            if not chunk:  # Ctrl-D on a line of its own
                break
            data += chunk
        return bytes(data)


def read_stream(stream: BinaryIO | _Terminal, *, shown: str = STDIN) -> bytes:
    """Up to the size limit from `stream`; an OrderError naming the real size beyond it."""
    limit = orders.MAX_ORDER_BYTES
    data = stream.read(limit + 1)
    if len(data) <= limit:
        return data
    try:
        total = os.fstat(stream.fileno()).st_size
    except (OSError, ValueError, AttributeError):
        total = 0
    # A pipe has no size: then the limit and a byte, said as "over" the limit.
    raise OrderError([Problem("", too_big(max(total, limit + 1), limit, "a work order"), shown)])


def gc(ws: Workspace, days: float, *, now: float | None = None) -> tuple[list[str], list[str], list[str]]:
    """Remove working copies kept for inspection that are older than `days`, and the attempt
    folders and logs (`.coordinator/attempts/<id>`, `.coordinator/logs/<id>`) of orders that
    ended more than `days` ago; returns (the copies, the orders, the ended orders kept because
    they, or their working copies, are dated ahead of `now`). Nothing reads them once an order ended (its record and
    report hold what it did), and a supervisor running overnight leaves some seven folders and
    files per order there. A retried order starts its next attempt anew.

    An order that ended at a time still to come on this clock (the clock set back since) is of
    an age no one can tell: kept, and returned to be said, unless `days` is 0 (every ended
    order, whatever its age). Such orders were kept without a word, even by `--days 0`."""
    from . import runner
    from .repos import Repo, gc_worktrees

    now = time.time() if now is None else now
    repos = [Repo(p) for p in sorted(ws.repos.iterdir()) if (p / ".git").exists()] if ws.repos.is_dir() else []
    copies_ahead: list[str] = []  # `<id>/<repo>` of kept copies dated ahead
    copies = gc_worktrees(ws.runtime / "work", repos, keep_days=days, now=now, ahead=copies_ahead)
    cleared: list[str] = []
    ahead: list[str] = []
    store = Store(ws.state)
    for rec in sorted(store.load_all().values(), key=lambda r: r.seq):
        if not rec.terminal:
            continue
        age = now - _epoch(rec.updated)
        dated_ahead = age < -GC_CLOCK_SLACK and days > 0
        if not dated_ahead and days > 0 and age < days * 86400:
            continue
        if not dated_ahead:
            with contextlib.suppress(OSError):  # its working copy's folder, left empty before copies took it along
                runner.work_folder(ws, rec.id).rmdir()
        folders = [f for f in runner.order_folders(ws, rec.id) if os.path.lexists(f)]
        if not folders:  # cleared by an earlier gc: its record is not read again
            continue
        if dated_ahead:
            ahead.append(rec.id)
            continue
        with contextlib.suppress(OSError, ValueError, NotFoundError):  # retried meanwhile: its attempt runs
            if store.load(rec.id).updated != rec.updated:
                continue
        for folder in folders:
            try:
                durable.remove_tree(folder)
            except OSError as e:
                if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):  # no hand could: said as such
                    raise
                said = e.strerror or str(e)  # remove_tree's names the file it stopped at
                said = said if said.startswith("cannot ") else f"cannot remove {folder}: {said}"
                raise WorkspaceError(f"{said}; remove it by hand") from None
        cleared.append(rec.id)
    for copy in copies_ahead:  # said as the order it was kept for
        if (order_id := copy.partition("/")[0]) not in ahead:
            ahead.append(order_id)
    return copies, cleared, ahead


GC_CLOCK_SLACK = 60.0  # seconds an order's end may lie ahead of this clock before gc calls it dated ahead


def _epoch(stamp: str) -> float:
    """Seconds since the epoch of a record's time (`2026-11-22T08:04:45.099Z`); 0 when unreadable."""
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def demo_intro(ws: Workspace) -> list[str]:
    """Set up the embedded demo (its repository) and say how to drive it."""
    from .demo.repo import init_demo_repo

    lines = []
    demo = ws.repos / "webapp"
    if not demo.exists():
        init_demo_repo(demo)
        lines.append("created repos/webapp (the demo repository)")
    agents = ", ".join(f"{n} ({a.role})" for n, a in ws.config.agents.items())
    lines += [
        f"demo team: {agents}",
        "In another terminal, drop a demo order and watch it run:",
        "  .venv/bin/coordinator send demo/example-orders/greeting.md --to chip",
        "  .venv/bin/coordinator send demo/example-orders/request.md --to walt",
        "  .venv/bin/coordinator board",
        "  git -C repos/webapp log --format='%h %an: %s%n%b' -3",
        "Stop with Ctrl-C (once: drain; twice: stop now).",
    ]
    return lines
