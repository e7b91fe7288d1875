"""Intake: claim each dropped file exactly once and turn it into a record.

A file is claimed by one atomic rename out of `inbox/<agent>/` into
`state/intake/<agent>/` (a durable copy when the inbox folder is another file
system: `claims`), then validated, then moved into `state/orders/<id>/`
with its record written last. `recover()` finishes any of these steps a crash
interrupted. Intake also owns the order ids it hands out and what the orders
still waiting in an inbox say of their own ids.

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
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import claims, durable, orders
from ._orderfile import too_big
from .config import SYSTEM_SENDERS, Config
from .errors import OrderError, Problem
from .inboxfiles import is_candidate, printable
from .orders import WorkOrder
from .store import History, Record, Store, dependency_done, iso

ACCEPTED_CACHE = 1000
MAX_NUMBERS = 4096  # WO- numbers kept from waiting files before those behind the next one are let go
MAX_UNREAD = 4096  # waiting files noted and not read yet (see `Waiting`)
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
    # Its bytes as intake read them (None: not all were read): what the commit holds of the
    # original should it change by hand before then (`durable.move`), at no read more.
    data: bytes | None = None
    gone: bool = False  # removed by hand before intake read it: its rejection says so


@dataclass
class Filed:
    """What intake made of one file."""

    record: Record
    order: WorkOrder | None
    problems: list[Problem]


class Intake:
    def __init__(self, store: Store, config: Config, records: dict[str, Record], history: History,
                 *, root: Path, ids_dir: Path, repos_dir: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.root = root  # the workspace: where a copied file was is noted relative to it
        self.config = config
        self.records = records
        self.history = history
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
        # order.json's bytes, by order id, with the order they are of (`order_json`).
        self._order_json: dict[str, tuple[WorkOrder, bytes]] = {}
        # (order id, agent, what happened) for the trail: a claimed file removed by hand before
        # its order was placed (`_place`). Staged by the next state write (`take_events`).
        self.events: list[tuple[str, str, str]] = []

    # -- claiming -------------------------------------------------------------------------------
    def claim(self, path: Path, agent: str, *, note: dict[str, Any] | None = None) -> Path | None:
        """Claim `path` out of `agent`'s inbox (`claims.claim`); None when it vanished or
        another claimed it."""
        return claims.claim(path, self.store.intake_dir / agent, self.root, note=note)

    def claimed(self) -> list[tuple[Path, str]]:
        """Files claimed but not yet filed (after a crash), oldest first (`claims.unfiled`)."""
        return claims.unfiled(self.store.intake_dir, {p.claimed for p in self.pending.values()}, self.root)

    def claim_copy(self, path: Path, agent: str, *, sender: str, shown: str,
                   within: Path | None = None) -> tuple[Path, int] | None:
        """Take a file a specialist wrote (its outbox) as a copy for `agent`
        (`claims.claim_copy`): the copy and the file's size, or None."""
        return claims.claim_copy(path, self.store.intake_dir / agent, self.root, sender=sender, shown=shown,
                                 within=within)

    # -- filing ---------------------------------------------------------------------------------
    def file(self, claimed: Path, agent: str, *, shown: str, sender: str | None = None,
             parent: str | None = None, size: int | None = None, priority: str = "normal") -> Filed:
        """Validate the claimed file and move it into its order folder with a record.
        `size`: the size of the file it is a copy of (`claim_copy`), when larger; `priority`:
        the order's when the file gives none."""
        # A file name need not be UTF-8; records and messages must be.
        shown = printable(shown)
        order: WorkOrder | None = None
        problems: list[Problem] = []
        suffix = _suffix(shown)
        gone = False
        try:
            data, read_size = claims.read_capped(claimed)
        except FileNotFoundError:  # removed by hand between the claim and this read (an internal error)
            data, read_size, size, gone = b"", None, None, True
            problems = [Problem("", f"was removed from state/intake/{agent}/ by hand before it was read; "
                                    "send it again", shown)]
        size = read_size if read_size is None or size is None else max(read_size, size)
        # Only a file with no sender stamped may be the supervisor's own copy of a follow-up (see
        # `_take_planned`): an outbox order, delivered live or after a crash, is its sender's,
        # and one that asks for a planned id is a duplicate, never the follow-up it names.
        if self.history.planned and size is not None and sender is None:
            sender = self._take_planned(data, shown, agent)  # the supervisor wrote it: as stamped
        if size is None:  # no regular file: replaced by an empty one, rejected for what it was
            problems = problems or [Problem("", _replace_special(claimed), shown)]
        else:
            history: History | _AwaitedHistory = self.history
            if self.waiting.declared or self.waiting.unread:  # only then is the file searched for them
                declares = {(m.group(1) or m.group(2)).decode() for m in _DECLARED_ID.finditer(data)}
                history = _AwaitedHistory(self.history, self.waiting, declares)
                # Filed now, its ids are the history's to know: kept, a supervisor that runs for
                # weeks would hold every id ever declared (and waits on the first one for ever).
                for declared in declares:
                    self.waiting.declared.pop(declared, None)
            try:
                order = orders.load(data, path=shown, to=agent, config=self.config,
                                    history=history, sender=sender, repos=self.repos_dir, priority=priority)
            except OrderError as e:
                problems = e.problems
                if size > orders.MAX_ORDER_BYTES:  # read only this far: say the file's real size
                    problems = [Problem("", too_big(size, orders.MAX_ORDER_BYTES, "a work order"), shown)]
        partial = order or _best_effort(data, shown, agent)
        if order is not None and order.id is not None:
            order_id = order.id  # its check found it well formed and free a moment ago: not looked up again
        else:
            order_id = self._choose_id(partial)
        if order is not None and (order.id != order_id or (parent and parent != order.parent)):
            order = dataclasses.replace(order, id=order_id, parent=parent or order.parent)
        placement = _Placement(claimed, suffix, agent, sender, shown, order,
                               data if size is not None and len(data) == size else None, gone)
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

    def peek_order(self, order_id: str) -> WorkOrder:
        """`order_of`, leaving the order in memory for the start that takes it."""
        cached = self.accepted.get(order_id)
        return cached if cached is not None else self.order_of(order_id)

    def order_json(self, order: WorkOrder) -> bytes:
        """`order` as its order.json holds it: made once for the order's folder and its first
        attempt's (each made its own, some 7 us). Kept for as many orders as `accepted`."""
        assert order.id is not None
        made = self._order_json.get(order.id)
        if made is None or made[0] is not order:
            if len(self._order_json) >= ACCEPTED_CACHE:
                self._order_json.clear()
            made = self._order_json[order.id] = (
                order, durable.dumps(order.to_dict()).encode("utf-8", "backslashreplace"))
        return made[1]

    def _place(self, order_id: str, p: _Placement) -> None:
        folder = self.store.folder(order_id)
        folder.mkdir(parents=True, exist_ok=True)
        original = folder / f"original{p.suffix}"
        try:
            # Written before the original moves in: a crash before record.json must not forget
            # whom the order is for, or who stamped it.
            durable.write_json(folder / "intake.json", {"to": p.agent, "sender": p.sender, "source": p.shown},
                               sync=False)
            try:
                durable.move(p.claimed, original, sync=False, data=p.data)
            except FileNotFoundError:
                if not os.path.lexists(original):
                    if os.path.lexists(p.claimed):
                        raise
                    if not p.gone:
                        self._lost_claim(order_id, p, original)
                # else moved in by a try that failed after its rename: nothing left to move
            if p.sender is not None:  # the note of an outbox copy has served (else: none there)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(claims.note_of(p.claimed))
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
            durable.write_bytes(folder / "order.json", self.order_json(p.order), sync=False)

    def _lost_claim(self, order_id: str, p: _Placement, original: Path) -> None:
        """The claimed file was removed by hand before its order was placed (it was the
        order's one place then): that stopped the supervisor ("internal error"). The order was
        filed from what intake read: the original is written from those bytes and the order
        goes on; the trail says so. Not all read (too big: rejected), it has no original."""
        rel = p.claimed.relative_to(self.store.root).as_posix()
        if p.data is not None:
            durable.write_bytes(original, p.data, sync=False)
            what = f"written from the copy intake read when it filed {order_id}"
        else:
            what = "not there: intake had not read it whole"
        self.events.append((order_id, p.agent, f"state/{printable(rel)} was removed by hand before it was "
                                               f"placed; {original.name} is {what}"))

    def take_events(self) -> list[tuple[str, str, str]]:
        """What happened to orders as they were placed, since the last call (see `events`)."""
        events, self.events = self.events, []
        return events

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
        """Remember that a file waits in an inbox: what ids it names is read before any id is
        assigned or found missing (`Waiting`)."""
        self.waiting.note(path)

    def taken(self, path: Path) -> None:
        """The file noted waiting at `path` was claimed (its ids are its own order's now), or is
        gone."""
        self.waiting.unread.pop(path, None)

    def new_id(self) -> str:
        """A fresh WO-NNNN, reserved: for an order the supervisor names before filing it."""
        return self._choose_id(None)

    def _choose_id(self, order: WorkOrder | None) -> str:
        wanted = order.id if order is not None else None
        if wanted and orders.ID_PATTERN.match(wanted) and not self.history.exists(wanted) \
                and self.history.same_id(wanted) is None:
            return wanted
        self.waiting.settle()
        while True:
            candidate = f"WO-{self.next_number:04d}"
            self.next_number += 1
            if self.next_number - 1 in self.waiting.numbers or self.history.exists(candidate) \
                    or self.history.same_id(candidate) is not None:
                continue
            if len(self.waiting.numbers) > MAX_NUMBERS:  # the numbers behind us are never a candidate again
                self.waiting.numbers = {n for n in self.waiting.numbers if n >= self.next_number}
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
    the file: an order naming one in `blocked_by` waits for it instead of being rejected.

    Both hold the files noted so far only once `settle` read them (`unread`): intake settles
    before it assigns an id or finds one missing. Read as each file was hinted, a burst of
    drops had every file read twice, and the loop read 300 of them before starting anything."""

    numbers: set[int] = dataclasses.field(default_factory=set)
    declared: dict[str, Path] = dataclasses.field(default_factory=dict)
    unread: dict[Path, None] = dataclasses.field(default_factory=dict)

    def note(self, path: Path) -> None:
        """Note the file at `path`; what it says is read by the next `settle`."""
        stem = path.name.split(".", 1)[0]
        if stem[:3].upper() == "WO-" and stem[3:].isdigit():  # as `send` names what it drops
            self.numbers.add(int(stem[3:]))
        self.unread[path] = None
        if len(self.unread) > MAX_UNREAD:  # files removed by hand are never taken
            self.settle()

    def settle(self) -> None:
        """Read every file noted and not read yet."""
        while self.unread:
            path = next(iter(self.unread))
            del self.unread[path]
            self._read(path)

    def _read(self, path: Path) -> None:
        """Add what the file at `path` says (nothing for a link, FIFO, folder, or one gone)."""
        try:
            data = claims.read_capped(path)[0]
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
        self.settle()
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
        data, size = claims.read_capped(path)
        return () if size is None else orders.parse(data, path=path.name, to=agent).blocked_by
    except (OSError, OrderError):
        return ()


class _AwaitedHistory:
    """The history, plus the ids orders still waiting to be taken in declare: an order that
    waits on one of them is filed `waiting`, as `validate` said it may, not rejected because
    it happened to arrive first. Its own declarations are no one else's."""

    def __init__(self, history: History, waiting: Waiting, own: set[str]) -> None:
        self.history = history
        self.files = waiting
        self.own = own

    def exists(self, order_id: str) -> bool:
        if self.history.exists(order_id):
            return True
        if order_id in self.own:
            return False
        self.files.settle()  # read only now: an order that names an id it does not declare
        return order_id in self.files.declared

    def same_id(self, order_id: str) -> str | None:
        return self.history.same_id(order_id)  # of two still waiting, the first taken in keeps its id

    def waiting(self, order_id: str) -> str | None:
        return self.history.waiting(order_id)

    def blocked_by_of(self, order_id: str) -> tuple[str, ...]:
        return self.history.blocked_by_of(order_id)

    def ended(self, sender: str, to: str, objective: str) -> list[tuple[str, str]]:
        return self.history.ended(sender, to, objective)



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
    """The suffix `original` keeps: the name's last one, as Path.suffix says it (split as a
    string: no Path is made for it alone)."""
    base = name.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    suffix = base[dot:].lower() if 0 < dot < len(base) - 1 else ""
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
