"""The process trees the fork server started, and which of them each process below it is in.

The server keeps a `Tree` for each attempt it started: the leader (and its
start time), the capped log its output drains into, the processes seen in its
tree, and the mount namespace it was started in. Every process below the server
is attributed to one of them by `owners`: by its leader, its session or group,
a process seen before, or (for one that escaped) the mark in its environment,
believed only when the named tree's leader is no younger than the process and
the process lives in that tree's mount namespace. A process nothing can
attribute is nobody's (None), and killed with every kill.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from .spawner import (
    FLUSH_INTERVAL,
    MARK,
    TAIL_BYTES,
    _children,
    _environs,
    _Proc,
    _processes,
    _read_proc,
    _subtree,
    _variable,
    mount_ns,
)


class CappedLog:
    """A capped log: the head goes straight to disk, the last bytes wait in a ring."""

    def __init__(self, fd: int, cap: int) -> None:
        self.fd = fd
        self.tail_cap = min(TAIL_BYTES, cap // 2)
        self.head_cap = cap - self.tail_cap
        self.head = 0
        self.tail = bytearray()
        self.dropped = 0
        self.dirty = False
        self.flushed_at = 0.0

    def feed(self, data: bytes, now: float) -> None:
        try:
            self._feed(data, now)
        except OSError:  # a full disk loses output, never the server
            self.dropped += len(data)

    def _feed(self, data: bytes, now: float) -> None:
        if self.head < self.head_cap:
            n = min(len(data), self.head_cap - self.head)
            os.write(self.fd, data[:n])  # a regular file takes it whole
            self.head += n
            data = data[n:]
            if not data:
                return
        self.tail += data
        if (excess := len(self.tail) - self.tail_cap) > 0:
            del self.tail[:excess]
            self.dropped += excess
        self.dirty = True
        if now - self.flushed_at >= FLUSH_INTERVAL:
            self.flush(now)
        else:
            os.utime(self.fd)  # stale detection reads the mtime: it must move with every print

    def flush(self, now: float) -> None:
        if not self.dirty:
            return
        marker = f"\n[coordinator: {self.dropped} bytes of output dropped here]\n".encode() if self.dropped else b""
        data = marker + bytes(self.tail)
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, data, self.head)
            os.ftruncate(self.fd, self.head + len(data))
        self.dirty, self.flushed_at = False, now


@dataclass
class Tree:
    """What the server keeps of one attempt it started."""

    token: str
    pid: int
    start: int  # the leader's start time (clock ticks since boot): its tree is no older
    log: CappedLog
    out_fd: int | None
    exited: bool = False
    known: set[tuple[int, int]] = field(default_factory=set)  # (pid, start) seen in its tree
    # The mount namespace it was started in (the read-only layer makes one per start): what a
    # process naming it by its mark must be in. None: the server's own, which proves nothing.
    ns: int | None = None



def owners(server: int, leaders: dict[int, Tree], trees: dict[str, Tree],
           envless: set[tuple[int, int]] | None = None) -> dict[str | None, list[_Proc]]:
    """Every process below the server `server`, grouped by attempt token (None: unknown); each
    tree's `known` becomes the processes found in it. `envless`: the processes (pid, start)
    found with no environment through a whole wait, kept up to date: not waited for again."""
    table = _processes()
    kids = _children(table)
    found: dict[str | None, list[_Proc]] = {}
    marked: list[_Proc] = []  # told apart by the mark in their environment alone
    for top in kids.get(server, ()):
        token = _known_owner(top, leaders, trees)
        if token is _BY_MARK:
            marked.append(top)
        else:
            found.setdefault(token, []).extend(_subtree(top, kids))
    # All read together: one in the middle of an exec shows no environment for a moment, and
    # was taken for nobody's (and killed with another attempt's kill). One that has none for
    # good (`env -i`) is waited for once, not at every look: the server's loop waits with it.
    envless = set() if envless is None else envless
    envless.intersection_update((p.pid, p.start) for p in table.values())
    environs = _environs([p for p in marked if (p.pid, p.start) not in envless]) if marked else {}
    envless.update((p.pid, p.start) for p in marked if environs.get(p.pid, b"-") == b"")
    for top in marked:
        token = _owner_by_mark(top, _variable(environs.get(top.pid, b""), MARK), trees)
        # Read after the table: the process may have ended and its pid gone to another (one of
        # an older attempt, whose mark and namespace would pass) while the reads waited.
        if token is not None and ((now := _read_proc(top.pid)) is None or now.start != top.start or now.zombie):
            token = None
        found.setdefault(token, []).extend(_subtree(top, kids))
    for tree in list(trees.values()):
        tree.known = {(p.pid, p.start) for p in found.get(tree.token, [])}
    return found


_BY_MARK = "\0by its mark"  # no token: a token is a file name


def _known_owner(top: _Proc, leaders: dict[int, Tree], trees: dict[str, Tree]) -> str | None:
    """The token of the tree a child of the server belongs to, with all below it, when known
    without its mark; None: nobody's; `_BY_MARK`: only its mark can tell."""
    leader = leaders.get(top.pid)
    if leader is not None:
        return leader.token
    for att in trees.values():
        # A session or group id stays taken while any member lives, so it still names the attempt.
        if att.pid in (top.sid, top.pgid) or (top.pid, top.start) in att.known:
            return att.token
    return None if top.zombie else _BY_MARK  # a zombie has no environment left


def _owner_by_mark(top: _Proc, mark: str | None, trees: dict[str, Tree]) -> str | None:
    """The tree an escaped process's mark names, if it is believed; None: nobody's."""
    # Anyone can exec with any mark: believe it only when it names an attempt the server
    # still knows and whose leader is no younger than the process (a descendant never is).
    # Else it is nobody's, and killed with every kill, so no mark hides it from its own.
    # The mark is no secret (a record in state/ names it): a process of another attempt
    # that took it on lives in that attempt's own mount namespace, not in the named one's.
    named = trees.get(mark) if mark is not None else None
    if named is None or named.start > top.start:
        return None
    return mark if named.ns is None or mount_ns(top.pid) == named.ns else None


def only_leaders(leaders: dict[int, Tree]) -> bool:
    """Whether every child of this server is the leader of a running attempt."""
    try:
        for tid in os.listdir("/proc/self/task"):
            if any(int(pid) not in leaders for pid in _read_all(f"/proc/self/task/{tid}/children").split()):
                return False
    except (OSError, ValueError):
        return False  # cannot tell: the supervisor falls back to a full kill
    return True


def _read_all(path: str) -> bytes:
    """A small /proc file whole, in plain reads (on every exit: a buffered file object adds
    a stat and a terminal check per open)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
