"""Intake: claim each dropped file exactly once and turn it into a record.

A file is claimed by one atomic rename out of `inbox/<agent>/` into
`state/intake/<agent>/` (a durable copy when the inbox folder is another file
system), then validated, then moved into `state/orders/<id>/`
with its record written last. `recover()` finishes any of these steps a crash
interrupted.

A claim by copy (an outbox file, an inbox on another file system) cannot be one
step: the copy is written, then the original removed. Which file the copy is of
(where, and its device, inode, size and mtime) is noted next to the copy before
the copy is written, so a crash between the two leaves nothing ambiguous: the
next start removes the original if it is still that very file, and only then
files the copy (`release_origin`). Either way the order is filed once.

Durability is grouped: files are written without fsync and the caller syncs the
file system once per loop step, before the audit commit.

A valid order dropped into an inbox is filed in memory first and placed
(`place_pending`) at the end of the loop step, after its first attempt may have
started: until then the claimed file in `state/intake/` is its one place, and a
crash simply files it again at the next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import durable, orders
from ._orderfile import too_big
from .config import SYSTEM_SENDERS, Config
from .errors import OrderError, Problem
from .orders import WorkOrder
from .store import History, Record, Store, dependency_done, iso
from .watcher import is_candidate, printable

MAX_READ = orders.MAX_ORDER_BYTES + 1

ACCEPTED_CACHE = 1000
NOT_REGULAR = "is not a regular file (a FIFO, socket or device); only files are work orders"

# An id a waiting order gives itself, as the text says it: `id: WO-0001` (Markdown front matter,
# YAML) or `"id": "WO-0001"` (JSON). Read loosely, with no parsing: a false find only makes an
# assigned id skip a number, a miss would hand out an id that order names.
_NAMED_ID = re.compile(rb"""(?:^|[\s{,])["']?id["']?[ \t]*:[ \t]*["']?WO-0*(\d{1,9})(?![\w.-])""",
                       re.IGNORECASE | re.MULTILINE)
# An id an order declares, read strictly (a false find would let another wait on nothing):
# `id: zz` at the start of a line (front matter, YAML), or `"id": "zz"` (JSON).
_ID = rb"([A-Za-z0-9][A-Za-z0-9._-]{0,63})"
_DECLARED_ID = re.compile(rb"^id[ \t]*:[ \t]*[\"']?" + _ID + rb"[\"']?[ \t]*(?:#[^\n]*)?\r?$|\"id\"\s*:\s*\"" + _ID
                          + rb"\"", re.MULTILINE)


@dataclass(frozen=True)
class _Placement:
    """Where a filed order's files go: the claimed file, moved into its order folder."""

    claimed: Path
    suffix: str
    agent: str
    sender: str | None
    shown: str
    order: WorkOrder | None


@dataclass
class Filed:
    """What intake made of one file."""

    record: Record
    order: WorkOrder | None
    problems: list[Problem]


class Intake:
    def __init__(self, store: Store, config: Config, records: dict[str, Record], history: History,
                 *, rel: Callable[[Path], str], root: Path, ids_dir: Path, repos_dir: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.root = root  # the workspace: where a copied file was is noted relative to it
        self.config = config
        self.records = records
        self.history = history
        self.rel = rel
        self.clock = clock
        self.repos_dir = repos_dir
        self.ids_dir = ids_dir  # reservations shared with `coordinator send`
        self.ids_dir.mkdir(parents=True, exist_ok=True)
        self.next_number = store.max_assigned() + 1
        # WO-NNNN numbers that orders waiting in an inbox or claimed and not yet filed name for
        # themselves: never assigned to another order (it would make that one a duplicate).
        self.waiting = Waiting().note_all(_subfolders(store.intake_dir))
        self.seq = max((r.seq for r in records.values()), default=0) + 1
        # Orders filed in this run, by id, until their first attempt takes them: saves reading
        # order.json back on the drop-to-spawn path. Bounded by how many orders wait.
        self.accepted: dict[str, WorkOrder] = {}
        self.pending: dict[str, _Placement] = {}  # filed, not yet placed: see the module doc

    # -- claiming -------------------------------------------------------------------------------
    def claim(self, path: Path, agent: str) -> Path | None:
        """Rename `path` out of the inbox; None when it vanished or another claimed it."""
        folder = self.store.intake_dir / agent
        dest = folder / f"{time.time_ns():020d}-{_short_name(path.name)}"
        if os.path.islink(path.parent):  # never through a linked inbox folder
            return None
        try:
            try:
                os.rename(path, dest)
            except FileNotFoundError:
                if not os.path.lexists(path):
                    return None
                folder.mkdir(parents=True, exist_ok=True)  # the first claim for this agent
                os.rename(path, dest)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            return _claim_across(path, dest, self.root)
        return dest

    def claimed(self) -> list[tuple[Path, str]]:
        """Files claimed but not yet filed (after a crash), oldest first. A note (of a claim by
        copy) whose copy is gone, filed or never written, is removed."""
        found: list[tuple[Path, str]] = []
        filed = {p.claimed for p in self.pending.values()}  # in memory already: not a leftover
        with contextlib.suppress(FileNotFoundError):
            for agent_dir in sorted(os.scandir(self.store.intake_dir), key=lambda e: e.name):
                if agent_dir.is_dir():
                    for entry in sorted(os.scandir(agent_dir.path), key=lambda e: e.name):
                        note = _NOTE.fullmatch(entry.name)
                        if note:
                            if not os.path.lexists(os.path.join(agent_dir.path, note.group(1))):
                                with contextlib.suppress(OSError):
                                    os.unlink(entry.path)
                        elif (is_candidate(entry.name) or entry.name[:1].isdigit()) and Path(entry.path) not in filed:
                            found.append((Path(entry.path), agent_dir.name))
        return found

    def claim_note(self, claimed: Path) -> dict[str, Any]:
        """What was noted of a claimed copy: by `claim_copy` its sender, source, size and
        origin, by a claim across file systems its origin only; {} for none."""
        try:
            note = durable.read_json(_note_of(claimed))
        except (OSError, ValueError):
            return {}
        return note if isinstance(note, dict) else {}

    def claim_copy(self, path: Path, agent: str, *, sender: str, shown: str,
                   within: Path | None = None) -> tuple[Path, int] | None:
        """Take a file a specialist wrote (its outbox) as a copy, never the file itself: a
        process of the attempt that kept it open could otherwise write on into state/.
        Returns the copy (at most MAX_READ bytes: all intake reads) and the file's size;
        None when it vanished or is no regular file (never through a link, never a FIFO).

        Who sent it (`sender`, `shown` as its source) is noted next to the copy before the
        copy is written: a crash before filing must not file it as the user's, unchecked
        against the sender's `sends_to` (recovery reads the note, `claim_note`).

        With `within` (the outbox), `path` is reached from there one folder at a time, never
        through a link, and removed through the folder it was read in: a process of the
        attempt that outlived it cannot swap a folder for a link to make the supervisor read
        and remove a file elsewhere. Without it, `path` is reached so from its own folder.

        The note also says which file the copy is of (`origin`): a crash after the copy and
        before the file is removed must not deliver it a second time (`release_origin`)."""
        box = within if within is not None else path.parent
        folder_fd = None
        try:
            folder_fd, fd = durable.open_beneath(box, path)
            try:
                st = os.fstat(fd)
                data, size = _read_fd_capped(fd)
            finally:
                os.close(fd)
        except OSError:  # gone, not ours to read, or reached through a link
            if folder_fd is not None:
                os.close(folder_fd)
            return None
        try:
            if size is None:
                return None
            folder = self.store.intake_dir / agent
            folder.mkdir(parents=True, exist_ok=True)
            dest = folder / f"{time.time_ns():020d}-{_short_name(path.name)}"
            note = {"sender": sender, "source": shown, "size": size, "origin": _origin(self.root, box, path, st)}
            durable.write_json(_note_of(dest), note, sync=False)
            try:
                durable.write_bytes(dest, data, sync=False)
            except OSError:  # the disk is full: the file stays in the outbox, and no note of it
                _unlink_quietly(_note_of(dest))
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.name, dir_fd=folder_fd)
            return dest, size
        finally:
            os.close(folder_fd)

    def release_origin(self, claimed: Path, note: dict[str, Any]) -> bool:
        """Before a copy a crash left claimed is filed: the file it was copied from (its note's
        `origin`) is removed if it is still there, the very file that was copied. A crash
        between the copy and that file's removal left both; filed as they are, the order
        would be filed twice. It is reached from its folder one name at a time and never
        through a link (an outbox is the specialist's to write), and another file put under
        its name since is an order of its own: it stays.

        False when it is there and cannot be removed: then the copy goes (and its note), and
        the file stays the order's one place, taken in again as any file there. A note that
        says nothing but the origin (a claim across file systems) has served, and goes."""
        origin = note.get("origin")
        if not isinstance(origin, dict):
            return True
        try:
            _remove_if_same(self.root, origin)
        except OSError:
            _unlink_quietly(claimed)
            _unlink_quietly(_note_of(claimed))
            return False
        if "sender" not in note:
            _unlink_quietly(_note_of(claimed))
        return True

    # -- filing ---------------------------------------------------------------------------------
    def file(self, claimed: Path, agent: str, *, shown: str, sender: str | None = None,
             parent: str | None = None, size: int | None = None) -> Filed:
        """Validate the claimed file and move it into its order folder with a record.
        `size`: the size of the file it is a copy of (`claim_copy`), when larger."""
        # A file name need not be UTF-8; records and messages must be.
        shown = printable(shown)
        order: WorkOrder | None = None
        problems: list[Problem] = []
        suffix = _suffix(shown)
        data, read_size = _read_capped(claimed)
        size = read_size if read_size is None or size is None else max(read_size, size)
        if self.history.planned and size is not None:
            own = self._take_planned(data, shown, agent)
            sender = sender or own  # the supervisor wrote it: its sender is as stamped
        if size is None:  # no regular file: replaced by an empty one, rejected for what it was
            problems = [Problem("", _replace_special(claimed), shown)]
        else:
            history: History | _AwaitedHistory = self.history
            if self.waiting.declared:  # (nearly never: only then is the file searched for them)
                declares = {(m.group(1) or m.group(2)).decode() for m in _DECLARED_ID.finditer(data)}
                history = _AwaitedHistory(self.history, self.waiting.declared, declares)
            try:
                order = orders.load(data, path=shown, to=agent, config=self.config,
                                    history=history, sender=sender, repos=self.repos_dir)
            except OrderError as e:
                problems = e.problems
                if size > orders.MAX_ORDER_BYTES:  # read only this far: say the file's real size
                    problems = [Problem("", too_big(size, orders.MAX_ORDER_BYTES, "a work order"), shown)]
        partial = order or _best_effort(data, shown, agent)
        order_id = self._choose_id(order or partial)
        if order is not None:
            order = dataclasses.replace(order, id=order_id, parent=parent or order.parent)
        placement = _Placement(claimed, suffix, agent, sender, shown, order)
        if order is not None and sender is None and parent is None:
            self.pending[order_id] = placement  # a plain drop: placed after it may have started
        else:
            self._place(order_id, placement)
        return Filed(self._record(order_id, agent, order, partial, problems, shown, sender), order, problems)

    def _take_planned(self, data: bytes, shown: str, agent: str) -> str | None:
        """The copy of a planned follow-up a crash left claimed takes its id back from the plan,
        valid or not (it names the order it continues), and is the supervisor's: returns its
        sender. Any other order naming that id is refused as a duplicate."""
        draft = _best_effort(data, shown, agent)
        if draft is None or draft.id is None:
            return None
        of = self.history.planned.get(draft.id)
        if of is None or of not in draft.references:
            return None
        del self.history.planned[draft.id]
        return draft.sender

    def place_pending(self) -> int:
        """Move every order filed in memory into its folder; returns how many."""
        placed = 0
        while self.pending:
            order_id, placement = next(iter(self.pending.items()))
            self._place(order_id, placement)
            del self.pending[order_id]
            placed += 1
        return placed

    def ensure_placed(self, order_id: str) -> None:
        """Place one order now (its folder is about to be written)."""
        placement = self.pending.pop(order_id, None)
        if placement is not None:
            try:
                self._place(order_id, placement)
            except BaseException:
                self.pending[order_id] = placement
                raise

    def order_of(self, order_id: str) -> WorkOrder:
        """The accepted order of `order_id`, from memory when it is there."""
        cached = self.accepted.pop(order_id, None)
        if cached is not None:
            return cached
        self.ensure_placed(order_id)
        return self.store.load_order(order_id)

    def _place(self, order_id: str, p: _Placement) -> None:
        folder = self.store.folder(order_id)
        folder.mkdir(parents=True, exist_ok=True)
        original = folder / f"original{p.suffix}"
        try:
            # Written before the original moves in: a crash before record.json must not forget
            # whom the order is for, or who stamped it.
            durable.write_json(folder / "intake.json", {"to": p.agent, "sender": p.sender, "source": p.shown},
                               sync=False)
            if os.path.lexists(p.claimed) or not os.path.lexists(original):  # else moved by a try that failed after
                durable.move(p.claimed, original, sync=False)
            if p.sender is not None:  # the note of an outbox copy has served (else: none there)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_note_of(p.claimed))
        except OSError:
            # The disk is full. Before the move, the order stays claimed in state/intake/ (its
            # one place) and no empty order folder is left to look like a second copy. After it,
            # this folder is its place, and intake.json must stay to say whom it is for.
            if not os.path.lexists(original):
                with contextlib.suppress(OSError):
                    (folder / "intake.json").unlink(missing_ok=True)
                    folder.rmdir()
            raise
        if p.order is not None:
            durable.write_json(folder / "order.json", p.order.to_dict(), sync=False)

    def file_order(self, order: WorkOrder, *, shown: str) -> Filed:
        """File an order the supervisor itself made (follow-ups, escalations, LLM plans).

        A follow-up's planned id is its own: filed under it whether it passes or is rejected."""
        if order.id is not None:
            self.history.planned.pop(order.id, None)
        folder = self.store.intake_dir / order.to
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{time.time_ns():020d}-{order.id or 'order'}.md"
        durable.write_text(tmp, orders.render(order), sync=False)
        return self.file(tmp, order.to, shown=f"{shown}/{order.id or 'order'}.md", sender=order.sender,
                         parent=order.parent)

    def note_waiting(self, path: Path) -> None:
        """Remember the id a file now waiting in an inbox names, before any id is assigned."""
        self.waiting.note(path)

    def new_id(self) -> str:
        """A fresh WO-NNNN, reserved: for an order the supervisor names before filing it."""
        return self._choose_id(None)

    def _choose_id(self, order: WorkOrder | None) -> str:
        wanted = order.id if order is not None else None
        if wanted and orders.ID_PATTERN.match(wanted) and not self.history.exists(wanted):
            return wanted
        while True:
            candidate = f"WO-{self.next_number:04d}"
            self.next_number += 1
            if self.next_number - 1 in self.waiting.numbers or self.history.exists(candidate):
                continue
            try:
                os.close(os.open(self.ids_dir / candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue  # reserved by `coordinator send` for an order on its way
            return candidate

    def _record(self, order_id: str, agent: str, order: WorkOrder | None, partial: WorkOrder | None,
                problems: list[Problem], shown: str, sender: str | None) -> Record:
        now = iso(self.clock())
        source = order or partial
        if order is not None and not all(dependency_done(self.records, d) for d in order.blocked_by):
            status = "waiting"
        elif order is not None:
            status = "queued"
        else:
            status = "rejected"
        claimed_sender = sender or (source.sender if source else None) or "user"
        if claimed_sender not in self.config.agents and claimed_sender not in SYSTEM_SENDERS:
            claimed_sender = "user"  # an unknown name never becomes a commit author
        record = Record(
            id=order_id, to=agent,
            sender=claimed_sender,
            status=status,
            objective=(source.objective if source and source.objective else f"(unreadable: {shown})")[:280],
            created=now, updated=now, seq=self.seq,
            priority=source.priority if source else "normal",
            source=shown,
            errors=[str(p) for p in problems],
            blocked_by=list(order.blocked_by) if order else [],
            references=list(order.references) if order else [],
            parent=order.parent if order else None,
            history=[{"at": now, "from": "new", "to": status, "actor": claimed_sender}],
        )
        self.seq += 1
        if order is not None and status == "queued" and (
                len(self.accepted) < ACCEPTED_CACHE or order_id in self.pending):
            self.accepted[order_id] = order
        self.store.save(record, sync=False)
        self.records[order_id] = record
        self.history.note(record)
        return record


@dataclass
class Waiting:
    """What the orders waiting to be taken in say of their own ids, read without parsing them.

    `numbers`: every WO-NNNN they may name for themselves (loosely: never assigned to another
    order). `declared`: the ids they declare (`id:` at the start of a line, or `"id": "…"`), with
    the file: an order naming one in `blocked_by` waits for it instead of being rejected."""

    numbers: set[int] = dataclasses.field(default_factory=set)
    declared: dict[str, Path] = dataclasses.field(default_factory=dict)

    def note(self, path: Path) -> None:
        """Add what the file at `path` says (nothing for a link, FIFO, folder, or one gone)."""
        stem = path.name.split(".", 1)[0]
        if stem[:3].upper() == "WO-" and stem[3:].isdigit():  # as `send` names what it drops
            self.numbers.add(int(stem[3:]))
        try:
            data = _read_capped(path)[0]
        except OSError:
            return
        self.numbers |= {int(m.group(1)) for m in _NAMED_ID.finditer(data)}
        for m in _DECLARED_ID.finditer(data):
            self.declared.setdefault((m.group(1) or m.group(2)).decode(), path)

    def note_all(self, folders: Iterable[Path]) -> Waiting:
        for folder in folders:
            with contextlib.suppress(OSError):
                for entry in os.scandir(folder):
                    if (is_candidate(entry.name) or entry.name[:1].isdigit()) and entry.is_file(follow_symlinks=False):
                        self.note(Path(entry.path))
        return self


def _subfolders(root: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return [Path(e.path) for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    return []


def waiting_orders(inbox_root: Path, intake_dir: Path, agents: Iterable[str]) -> Waiting:
    """What every order waiting in an agent's inbox, or claimed and not yet filed, says of its
    id (an inbox folder of no agent is never taken in: what waits there counts for nothing)."""
    names = list(agents)
    return Waiting().note_all([inbox_root / a for a in names] + [intake_dir / a for a in names])


def waits_on(path: Path, agent: str) -> tuple[str, ...]:
    """The `blocked_by` of the order waiting at `path` in `agent`'s inbox, read as intake reads
    it (never through a link); () when it is no regular file or no well-formed order (intake
    would reject it: it waits on nothing)."""
    try:
        data, size = _read_capped(path)
        return () if size is None else orders.parse(data, path=path.name, to=agent).blocked_by
    except (OSError, OrderError):
        return ()


class _AwaitedHistory:
    """The history, plus the ids orders still waiting to be taken in declare: an order that
    waits on one of them is filed `waiting`, as `validate` said it may, not rejected because
    it happened to arrive first. Its own declarations are no one else's."""

    def __init__(self, history: History, declared: dict[str, Path], own: set[str]) -> None:
        self.history = history
        self.declared = declared
        self.own = own

    def exists(self, order_id: str) -> bool:
        return self.history.exists(order_id) or (order_id in self.declared and order_id not in self.own)

    def waiting(self, order_id: str) -> str | None:
        return self.history.waiting(order_id)

    def blocked_by_of(self, order_id: str) -> tuple[str, ...]:
        return self.history.blocked_by_of(order_id)

    def ended(self, sender: str, to: str, objective: str) -> list[tuple[str, str]]:
        return self.history.ended(sender, to, objective)


# The note `claim_copy` writes next to a copy: a dot-file, never taken for a claimed file.
_NOTE = re.compile(r"\.(\d{20}-.*)\.from", re.DOTALL)


def _note_of(claimed: Path) -> Path:
    return claimed.with_name(f".{claimed.name}.from")


def _short_name(name: str) -> str:
    """`name` cut to fit behind the 21-byte claim prefix in NAME_MAX (255), its suffix kept."""
    raw = os.fsencode(name)
    if len(raw) > 200:
        raw = raw[:100] + b"~" + raw[-99:]
    return os.fsdecode(raw)


def _claim_across(path: Path, dest: Path, root: Path) -> Path | None:
    """Claim `path` from an inbox folder on another file system (a mount), where no rename
    reaches state/: a durable copy first, then the original goes, and only if it is still the
    file that was copied (a sender may have dropped a new file under the same name meanwhile).
    None when it vanished, or is no file nor link.

    Which file is copied is noted next to the copy before the copy is written: a crash
    between the copy and the removal leaves both, and the next start removes the original
    (if it is still that file) before it files the copy (`release_origin`). Once the
    original is gone the note has served."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        fd = -1  # a link: the link itself is claimed, and filing refuses it
    note = _note_of(dest)
    try:
        st = os.lstat(path) if fd < 0 else os.fstat(fd)
        if fd < 0:
            if not stat.S_ISLNK(st.st_mode):
                return None  # swapped meanwhile: looked at again at the next scan
            target = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            data = durable.read_fd(fd, MAX_READ)  # all intake reads: a bigger one is refused by size
        else:
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Synced, as the copy: the original is gone next, on another disk.
        durable.write_json(note, {"origin": _origin(root, path.parent, path, st)})
        try:
            if fd < 0:
                os.symlink(target, dest)
                durable.fsync_dir(dest.parent)
            else:
                durable.write_bytes(dest, data)
        except OSError:
            _unlink_quietly(note)
            raise
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        # The original stays (a read-only mount): so must no copy, or each scan would add one.
        _unlink_quietly(dest)
        _unlink_quietly(note)
        raise
    _unlink_quietly(note)
    return dest


def _origin(root: Path, folder: Path, path: Path, st: os.stat_result) -> dict[str, Any]:
    """Which file a copy is of, for `release_origin`: `path` below `folder` (noted relative to
    `root`, the workspace), and what tells it from another file put under its name later (an
    inode number is reused once its file is gone; its mtime and size would have to be the
    same too)."""
    return {"folder": os.path.relpath(folder, root), "path": str(path.relative_to(folder)),
            **_identity(st)}


def _identity(st: os.stat_result) -> dict[str, int]:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remove_if_same(root: Path, origin: dict[str, Any]) -> None:
    """Remove the file `origin` (`_origin`) names if it is still that file: reached
    from its folder one name at a time, looked at and removed through that folder, never
    followed if it is a link. Nothing when it is gone, or cannot be reached, or is another
    file; OSError when it is there, the same, and cannot be removed."""
    folder, rel = origin.get("folder"), origin.get("path")
    if not isinstance(folder, str) or not isinstance(rel, str) or ".." in Path(rel).parts:
        return
    try:
        within = root / folder
        path = within / rel
        folder_fd = durable.folder_beneath(within, path)
    except (OSError, ValueError):  # gone, or behind a link: not there to be taken in again
        return
    try:
        try:
            st = os.stat(path.name, dir_fd=folder_fd, follow_symlinks=False)
        except OSError:  # gone, or not to be looked at: never removed unseen
            return
        if _identity(st) != {key: origin.get(key) for key in ("dev", "ino", "size", "mtime_ns")}:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=folder_fd)
    finally:
        os.close(folder_fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _read_capped(claimed: Path) -> tuple[bytes, int | None]:
    """The claimed file's first MAX_READ bytes and its size; (b"", None) when it is no regular
    file. Opened without following a link, and without blocking on a FIFO."""
    try:
        fd = os.open(claimed, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a link; a socket
            return b"", None
        raise
    try:
        return _read_fd_capped(fd)
    finally:
        os.close(fd)


def _read_fd_capped(fd: int) -> tuple[bytes, int | None]:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # a FIFO, a folder
        return b"", None
    return durable.read_fd(fd, MAX_READ), st.st_size


def _replace_special(claimed: Path) -> str:
    """Put an empty file in the place of `claimed`, no regular file (a link, a FIFO, a socket, a
    folder swapped in before the claim or left by a crash), and say what it was.

    A link is replaced by one rename (the claimed name always holds one or the other) and its
    target is never opened; a folder is first moved aside under a temp name and removed."""
    mode = os.lstat(claimed).st_mode
    if stat.S_ISLNK(mode):
        target = printable(os.fsdecode(os.readlink(claimed)))
        why = f"is a symbolic link (to {target}); a link in an inbox is never followed: drop the file itself"
    elif stat.S_ISDIR(mode):
        aside = claimed.with_name(f"{durable.TMP_PREFIX}{claimed.name}.{os.getpid()}.folder")
        os.rename(claimed, aside)
        with contextlib.suppress(OSError):  # however deep whoever made it made it
            durable.remove_tree(aside)
        why = "is a folder; only files are work orders"
    else:
        why = NOT_REGULAR
    tmp = claimed.with_name(f"{durable.TMP_PREFIX}{claimed.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # what a crash at this very step left
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    os.replace(tmp, claimed)  # replaces the entry itself, never what a link points to
    return why


def _suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix if suffix in (".md", ".markdown", ".yaml", ".yml", ".json") else ".txt"


def _best_effort(data: bytes, shown: str, agent: str) -> WorkOrder | None:
    """What a rejected file says of itself (its id, sender, objective), read as far as it goes."""
    from ._orderfile import read_order

    try:
        fields = read_order(data, path=shown, to=agent, sender=None, kind=None).fields
    except (OrderError, ValueError, TypeError):
        return None

    def text(key: str, default: str = "") -> str:
        value = fields.get(key)
        return value if isinstance(value, str) and value and "\n" not in value else default

    priority = text("priority", "normal")
    refs = fields.get("references")
    return WorkOrder(id=text("id") or None, sender=text("from", "user"), to=agent, objective=text("objective"),
                     acceptance=(), files=(), branching=(),
                     priority=priority if priority in orders.PRIORITIES else "normal",
                     references=tuple(r for r in refs if isinstance(r, str)) if isinstance(refs, list) else ())
