"""Order records under `state/`: where every order is, at every moment.

    state/intake/<agent>/<name>     claimed from an inbox, not yet recorded
    state/orders/<id>/original.<x>  the bytes as dropped
    state/orders/<id>/order.json    the normalized order (absent when rejected before parsing)
    state/orders/<id>/record.json   status, attempts, history, report

A file is claimed by one atomic rename out of the inbox into `state/intake/`,
then moved into its order folder; `record.json` is written last. Recovery at
start finishes whichever of these steps a crash interrupted, so an order is in
exactly one place at every moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import durable
from .errors import NotFoundError, StateError
from .orders import ID_PATTERN, WorkOrder, objective_key

STATUSES = ("queued", "waiting", "running", "done", "halted", "routed", "blocked",
            "rejected", "denied", "cancelled")
TERMINAL = frozenset({"done", "halted", "routed", "blocked", "rejected", "denied", "cancelled"})
ENDED_UNDONE = frozenset({"rejected", "denied", "cancelled"})  # ended for good, the work not done: no retry
# Orders that ended this way make a repeat without a reference a feedback-loop signal.
FAILED_ENDINGS = frozenset({"rejected", "denied", "halted", "blocked"})
LAST_ASSIGNABLE = 10 ** 61 - 1  # WO- and 61 digits: an id's 64 characters (ID_PATTERN)
ASSIGNED = re.compile(r"^WO-(\d+)$", re.IGNORECASE)  # wo-0009 is WO-0009 on some file systems
SUPERVISOR = "coordinator"
RECENT_PATHS = 4096  # order paths kept by a Store (see Store._paths)


def route_end(records: dict[str, Record], order_id: str) -> Record | None:
    """The order that decides a dependency on `order_id`: that order or, when it was
    routed, the last order of its route (a route hands the same work on). None: unknown."""
    rec, seen = records.get(order_id), set()
    while rec is not None and rec.status == "routed" and rec.routed_to and rec.id not in seen:
        seen.add(rec.id)
        rec = records.get(rec.routed_to)
    return rec


def ended_undone(records: dict[str, Record], order_ids: Iterable[str]) -> tuple[str, Record] | None:
    """The first of `order_ids` whose route ended for good without the work being done
    (rejected, denied, cancelled, or blocked on a dependency that did), with that end:
    what waits for it would wait forever."""
    for order_id in order_ids:
        last = route_end(records, order_id)
        if last is not None and (last.status in ENDED_UNDONE or dead_blocked(records, last)):
            return order_id, last
    return None


def dead_blocked(records: dict[str, Record], rec: Record) -> bool:
    """Is `rec` blocked because a dependency of it (or of a blocked one it waits on, however
    far down) ended undone? A retry cannot bring it back. An explicit stack: a chain of
    blocked orders can be thousands long."""
    if rec.status != "blocked":
        return False
    todo, seen = [rec], {rec.id}
    while todo:
        for dep in todo.pop().blocked_by:
            last = route_end(records, dep)
            if last is None:
                continue
            if last.status in ENDED_UNDONE:
                return True
            if last.status == "blocked" and last.id not in seen:
                seen.add(last.id)
                todo.append(last)
    return False


def waits_for(records: dict[str, Record], order_id: str, target: str) -> bool:
    """Does `order_id` (at the end of its route) wait, directly or through other waiting
    orders, for `target`? Then `target` waiting for it waits for ever. An explicit stack."""
    todo, seen = [order_id], {order_id}
    while todo:
        rec = route_end(records, todo.pop())
        if rec is None or rec.status != "waiting":
            continue
        for dep in rec.dependencies:
            last = route_end(records, dep)
            if dep == target or (last is not None and last.id == target):
                return True
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return False


def via_route(order_id: str, last: Record | None) -> str:
    """`order_id`, and where its route led when it was routed: the id the user wrote comes first."""
    return order_id if last is None or last.id == order_id else f"{order_id} (routed to {last.id})"


def dependency_done(records: dict[str, Record], order_id: str) -> bool:
    rec = route_end(records, order_id)
    return rec is not None and rec.status == "done"


def iso(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Record:
    id: str
    to: str
    sender: str
    status: str
    objective: str
    created: str
    updated: str
    seq: int
    priority: str = "normal"
    source: str = ""
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    history: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None
    blocker: str | None = None
    blocked_by: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    parent: str | None = None
    children: list[str] = field(default_factory=list)
    routed_to: str | None = None  # the follow-up order a route-to filed: the work goes on there
    running: dict[str, Any] | None = None
    commit: str | None = None
    stale: bool = False
    usage: list[dict[str, Any]] = field(default_factory=list)
    # Not in the file: true while `shed_detail` has dropped history, report and failures, and
    # the hash of the text last written (None: not known, e.g. loaded at start).
    shed: bool = field(default=False, compare=False, repr=False)
    written: int | None = field(default=None, compare=False, repr=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def dependencies(self) -> tuple[str, ...]:
        """What it waits for: its `blocked_by`, then the blocker a requeue named."""
        return (*self.blocked_by, *((self.blocker,) if self.blocker else ()))

    def as_json(self) -> dict[str, Any]:
        """The record as JSON data. Shares its lists and dicts with the record (no deep copy:
        this is on every status change); copy before changing what it returns."""
        return {name: getattr(self, name) for name in _RECORD_FIELDS}

    @classmethod
    def from_json(cls, data: Any) -> Record:
        """A record read back; ValueError when `data` is not one (a file changed by hand)."""
        if not isinstance(data, dict):
            raise ValueError(f"a record is a JSON object, not {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in _LOADABLE}
        wrong = [k for k in _REQUIRED_TEXT if not isinstance(known.get(k), str)]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} missing or not text")
        wrong = [k for k, kinds in _SHAPES.items() if k in known and not isinstance(known[k], kinds)]
        # Plain loops: a backlog's start checks 10,000 records, and most of their lists are empty.
        for k, kind in _LISTS.items():
            items: Any = known.get(k, _ABSENT)
            if items is _ABSENT:
                continue
            if type(items) is not list:
                wrong.append(k)
                continue
            for item in items:
                if not isinstance(item, kind) or (k == "history" and not _transition(item)):
                    wrong.append(k)
                    break
        if wrong:
            raise ValueError(f"{', '.join(wrong)} of the wrong kind")
        if not isinstance(known.get("report"), (dict, type(None))):
            known["report"] = None  # an odd report (a hand edit, an old version) is no report: shown without it
        if known.get("status") == "routed" and not known.get("routed_to") and isinstance(known.get("report"), dict):
            known["routed_to"] = known["report"].get("routed_to")  # written before the field existed
        try:
            return cls(**known)
        except TypeError as e:
            raise ValueError(str(e)) from None

    def shed_detail(self) -> None:
        """Drop from memory what only the file needs once an ended order is written: its
        history, report and failure reasons (the first error stays for briefs). A supervisor
        that runs for weeks keeps every order it has seen; this keeps each ended one small.
        `Store.restore` brings the detail back before the record changes again."""
        self.history, self.report, self.failures, self.errors = [], None, [], self.errors[:1]
        self.shed = True

    def board_row(self) -> dict[str, Any]:
        """The `board --json` shape of SPEC §10."""
        return {"id": self.id, "to": self.to, "from": self.sender, "status": self.status,
                "objective": self.objective, "attempts": self.attempts, "updated": self.updated}


_RECORD_FIELDS = tuple(f.name for f in fields(Record) if f.name not in ("shed", "written"))
_LOADABLE = frozenset(_RECORD_FIELDS)
_REQUIRED_TEXT = ("id", "to", "sender", "status", "objective", "created", "updated")
# What the rest of a record must be, when given (bool is an int in Python: excluded by hand).
_SHAPES: dict[str, type | tuple[type, ...]] = {
    "seq": int, "attempts": int, "priority": str, "source": str, "stale": bool,
    "running": (dict, type(None)), "blocker": (str, type(None)),
    "parent": (str, type(None)), "routed_to": (str, type(None)), "commit": (str, type(None))}
# The lists of a record and what each holds.
_LISTS: dict[str, type] = {"failures": str, "history": dict, "errors": str, "blocked_by": str,
                           "references": str, "children": str, "usage": dict}
_ABSENT = object()


def _transition(entry: Any) -> bool:
    """Whether a history entry says when, from and to (text each)."""
    return type(entry.get("at")) is str and type(entry.get("from")) is str and type(entry.get("to")) is str


def not_a_record(path: str, why: object) -> StateError:
    return StateError(f"{path} is not an order record ({why}); changed by hand? `coordinator supervise` "
                      "puts it back from git")


class RecordCache:
    """Records one `Store.load_all` read, each with what tells its file apart from a rewrite
    (inode, size, modification and change times: every write renames a new file into place).
    For readers that load again and again and change nothing, like `board --watch`."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[tuple[int, int, int, int], Record]] = {}


class Store:
    """Reads and writes order records; the supervisor is its only writer."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.orders_dir = state_dir / "orders"
        self.intake_dir = state_dir / "intake"
        # With `defer()` on (the supervisor), unsynced saves wait here until `write_dirty()`:
        # an order that changes status several times in one loop step is written once.
        self._deferring = False
        self._dirty: dict[str, Record] = {}
        self._recent: dict[str, tuple[Path, Path]] = {}

    def ensure(self) -> None:
        self.orders_dir.mkdir(parents=True, exist_ok=True)
        self.intake_dir.mkdir(parents=True, exist_ok=True)

    def folder(self, order_id: str) -> Path:
        return self._paths(order_id)[0]

    def record_path(self, order_id: str) -> Path:
        return self._paths(order_id)[1]

    def _paths(self, order_id: str) -> tuple[Path, Path]:
        """(folder, record file) of an order, kept for the orders moving now: an order's
        way through the loop asks some 15 times, and each Path join is some 2 us."""
        paths = self._recent.get(order_id)
        if paths is None:
            if len(self._recent) >= RECENT_PATHS:
                self._recent.clear()
            folder = self.orders_dir / order_id
            paths = self._recent[order_id] = (folder, folder / "record.json")
        return paths

    def exists(self, order_id: str) -> bool:
        return self.folder(order_id).exists()

    def load(self, order_id: str) -> Record:
        # Only what an order id can be: never a path that leads out of orders/ (`show ../x`).
        if not ID_PATTERN.fullmatch(order_id):
            raise NotFoundError(f"no order {order_id!r}; `coordinator board` lists them")
        try:
            return Record.from_json(durable.read_json(self.record_path(order_id)))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"no order {order_id!r}; `coordinator board` lists them") from None
        except (ValueError, IsADirectoryError) as e:  # a folder where the file was: load_all says the same
            raise not_a_record(f"state/orders/{order_id}/record.json", e) from None

    def load_all(self, *, unreadable: list[str] | None = None, cache: RecordCache | None = None) -> dict[str, Record]:
        """Every record; one that is not (changed by hand) is left out and, with `unreadable`,
        said there. With `cache`, a record file unchanged since the cache last read it is not
        read again (`board --watch`: one stat per order each second, not a read and a parse)."""
        out: dict[str, Record] = {}
        seen: dict[str, tuple[tuple[int, int, int, int], Record]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.orders_dir):
                path = os.path.join(entry.path, "record.json")
                try:
                    if cache is None:
                        rec = Record.from_json(durable.read_json(path))
                    else:
                        st = os.stat(path)
                        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                        kept = cache.records.get(entry.name)
                        rec = kept[1] if kept is not None and kept[0] == stamp else Record.from_json(
                            durable.read_json(path))
                        seen[entry.name] = (stamp, rec)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except (ValueError, OSError) as e:
                    if unreadable is not None:
                        unreadable.append(str(not_a_record(f"state/orders/{entry.name}/record.json", e)))
                    continue
                out[rec.id] = rec
        if cache is not None:
            cache.records = seen  # an order whose folder went is forgotten
        return out

    def unrecorded(self) -> list[Path]:
        """Order folders a crash left without a record.json (original moved, record not yet written)."""
        found: list[Path] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.orders_dir):
                if entry.is_dir() and not os.path.exists(os.path.join(entry.path, "record.json")):
                    found.append(Path(entry.path))
        return found

    def save(self, record: Record, *, sync: bool = True) -> Path:
        """Write `record`; with `sync=False` while deferring, at the next `write_dirty()`."""
        path = self.record_path(record.id)
        if record.shed:  # writing it now would lose its history: a change skipped `restore`
            raise StateError(f"{record.id} was changed while its history was not loaded (a bug): not written")
        if self._deferring and not sync:
            self._dirty[record.id] = record
            return path
        self._dirty.pop(record.id, None)
        durable.write_json(path, record.as_json(), sync=sync)
        return path

    def defer(self) -> None:
        """From now on, unsynced saves are collected and written by `write_dirty()`."""
        self._deferring = True

    def write_dirty(self) -> int:
        """Write every record saved since the last call; returns how many."""
        dirty, self._dirty = self._dirty, {}
        for record in dirty.values():
            text = durable.dumps(record.as_json())
            durable.write_text(self.record_path(record.id), text, sync=False)
            if record.terminal:
                record.shed_detail()
                record.written = hash(text)
        return len(dirty)

    def shed_ended(self, records: dict[str, Record]) -> None:
        """`shed_detail` every ended record already on disk (at start, after recovery)."""
        for record in records.values():
            if record.terminal and record.id not in self._dirty:
                record.shed_detail()

    def with_detail(self, record: Record) -> Record:
        """`record` itself, or, when its detail was shed, a copy read from its file (for reading
        only; `record` stays as it is). Falls back on `record` when the file cannot be read."""
        if not record.shed:
            return record
        try:
            return self.load(record.id)
        except (NotFoundError, StateError, OSError, ValueError, TypeError):  # StateError: not a record
            return record

    def restore(self, record: Record, *, trust_file: bool = False) -> Record:
        """Bring back from its file what `Record.shed_detail` dropped; call before changing it.
        Raises StateError when the file is gone, unreadable or not what was written (a hand
        edit), unless `trust_file`."""
        if record.shed:
            path = self.record_path(record.id)
            try:
                text = path.read_text("utf-8")
                if not trust_file and record.written is not None and hash(text) != record.written:
                    raise ValueError("changed since it was written")
                full = Record.from_json(json.loads(text))
            except (OSError, ValueError, TypeError) as e:
                raise StateError(f"state/orders/{record.id}/record.json: {e}") from None
            record.history, record.report, record.failures, record.errors = (
                full.history, full.report, full.failures, full.errors)
            record.shed = False
        return record

    def save_order(self, order: WorkOrder) -> Path:
        assert order.id is not None
        path = self.folder(order.id) / "order.json"
        durable.write_json(path, order.to_dict())
        return path

    def load_order(self, order_id: str) -> WorkOrder:
        try:
            return WorkOrder.from_dict(durable.read_json(self.folder(order_id) / "order.json"))
        except FileNotFoundError:
            raise NotFoundError(f"order {order_id!r} has no accepted work order (it was rejected)") from None

    def original(self, order_id: str) -> Path | None:
        for p in self.folder(order_id).glob("original.*"):
            return p
        return None

    def max_assigned(self) -> int:
        """The highest WO-NNNN in use, so assigned ids keep increasing across restarts."""
        top = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.orders_dir):
                m = ASSIGNED.match(entry.name)
                # An id a user chose at the very top (WO-999…9, 64 characters) leaves no valid id
                # after it: counted, every order sent after it was assigned one intake rejects.
                if m and int(m.group(1)) < LAST_ASSIGNABLE:
                    top = max(top, int(m.group(1)))
        return top


class History:
    """What order validation needs to know about earlier orders (orders.History).

    Failed endings are indexed by (sender, recipient, objective) so the
    feedback-loop rule costs one lookup per intake, not a scan.
    """

    def __init__(self, records: dict[str, Record], store: Store) -> None:
        self.records = records
        self.store = store
        self._ended: dict[tuple[str, str, str], dict[str, Record]] = {}
        # Ids named in a record's report for a follow-up not filed yet: follow-up id -> the
        # order whose route or escalation it is. Taken: only that follow-up may file under it.
        self.planned: dict[str, str] = {}
        self._folded: dict[str, str] = {}  # lower-case id -> the id as used (`same_id`)
        for rec in sorted(records.values(), key=lambda r: r.seq):
            self.note(rec)

    def note(self, record: Record) -> None:
        """Call after every status change of `record`."""
        self._folded.setdefault(record.id.lower(), record.id)
        if record.status in FAILED_ENDINGS:
            key = (record.sender, record.to, _norm(record.objective))
            self._ended.setdefault(key, {})[record.id] = record

    def exists(self, order_id: str) -> bool:
        return order_id in self.records or order_id in self.planned or self.store.exists(order_id)

    def same_id(self, order_id: str) -> str | None:
        key = order_id.lower()  # ids are ASCII (ID_PATTERN)
        found = self._folded.get(key)
        if found is None or found == order_id:
            found = next((p for p in self.planned if p.lower() == key and p != order_id), None)
        return found if found != order_id else None

    def waiting(self, order_id: str) -> str | None:
        return None  # the supervisor takes in what waits in the inboxes in the order it came

    def blocked_by_of(self, order_id: str) -> tuple[str, ...]:
        rec = self.records.get(order_id)
        return tuple(rec.blocked_by) if rec else ()

    def ended(self, sender: str, to: str, objective: str) -> list[tuple[str, str]]:
        found = self._ended.get((sender, to, _norm(objective)), {})
        return [(r.id, r.status) for r in found.values() if r.status in FAILED_ENDINGS]


def _norm(text: str) -> str:
    return objective_key(text)
