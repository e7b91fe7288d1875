"""The permission gate: what a specialist changed in its working copy, and may it keep it.

Run only after the specialist's whole process tree is dead, so nothing changes
under the walk. `snapshot` records every path of the working copy by `lstat`,
never following a link: untracked and ignored files too, and the working copy's
own `.git` pointer file. `diff` turns two snapshots into changes; `judge` keeps
a change only when its path matches both the order's `files` and the agent's
`writes`, and refuses outright what no permission can grant: git internals,
special files, setuid bits, hard links and links that lead out of the copy.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .paths import matches_any

POINTER = ".git"
UNREADABLE = "!unreadable"
SPECIAL = frozenset({"fifo", "socket", "device"})
CONTENT = frozenset({"added", "modified", "deleted", "mode", "type"})
# What no `files` or `writes` entry can allow, and why.
ALWAYS_DENIED = {
    "pointer": "the working copy's .git pointer is never writable",
    "git-internal": "git internals (.git, .gitmodules) are never writable",
    "special": "special files (fifo, socket, device) are never allowed",
    "setuid": "setuid and setgid bits are never allowed",
    "hardlink": "a hard link can reach a file outside the working copy",
    "symlink": "a symbolic link may not point outside the working copy or into .git",
}
_CHUNK = 1 << 20
_MAX_HOPS = 40  # symbolic links followed while resolving one target, as the kernel does


@dataclass(frozen=True)
class Entry:
    """One path as `lstat` saw it: kind, permission bits, size, content hash, link target."""

    kind: str  # file | dir | symlink | fifo | socket | device
    mode: int  # permission bits, setuid/setgid/sticky included
    size: int
    digest: str | None
    link: str | None
    nlink: int


@dataclass(frozen=True)
class Change:
    """One changed path (relative to the working copy) and what kind of change it is."""

    path: str
    what: str  # added modified deleted mode type symlink hardlink special setuid git-internal pointer
    detail: str = ""  # for the report: created/changed/deleted and what exactly
    kind: str = "file"  # the path's kind after the change (before it, when deleted)


@dataclass(frozen=True)
class Verdict:
    changes: tuple[Change, ...]
    offending: tuple[tuple[Change, str], ...]  # (change, reason) for every path not allowed

    @property
    def allowed(self) -> bool:
        return not self.offending

    def commit_paths(self) -> tuple[str, ...]:
        """The repo-relative paths to stage; none when the change is not allowed.

        Folders are left out: git records the files in them, not the folders.
        """
        if not self.allowed:
            return ()
        return tuple(c.path for c in self.changes if not (c.kind == "dir" and c.what != "type"))


# -- snapshot -------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, Entry]:
    """Every path under `root` (relative, '/'-separated) and what it is; {} when root is gone."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return {}
    if not stat.S_ISDIR(st.st_mode):
        return {}  # the copy itself was replaced: every path in it reads as deleted
    out: dict[str, Entry] = {}
    _walk(str(root), "", out)
    return out


def _walk(folder: str, prefix: str, out: dict[str, Entry]) -> None:
    try:
        with os.scandir(folder) as it:
            items = list(it)
    except OSError:
        if prefix:  # a folder the agent made unreadable: what is inside cannot be vouched for
            e = out[prefix[:-1]]
            out[prefix[:-1]] = Entry(e.kind, e.mode, e.size, UNREADABLE, None, e.nlink)
        return
    for item in items:
        rel = prefix + item.name
        st = item.stat(follow_symlinks=False)
        kind = _kind(st.st_mode)
        digest = link = None
        if kind == "file":
            digest = _digest(item.path)
        elif kind == "symlink":
            link = os.readlink(item.path)
        size = 0 if kind == "dir" else st.st_size
        out[rel] = Entry(kind, stat.S_IMODE(st.st_mode), size, digest, link, st.st_nlink)
        if kind == "dir":
            _walk(item.path, rel + "/", out)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def _digest(path: str) -> str:
    # O_NOFOLLOW and O_NONBLOCK: a path swapped for a link or a fifo after lstat is not followed
    # and cannot hang the walk.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return UNREADABLE
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return UNREADABLE
        h = hashlib.blake2b(digest_size=20)
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
        return h.hexdigest()
    except OSError:
        return UNREADABLE
    finally:
        os.close(fd)


# -- diff -----------------------------------------------------------------------------------------


def diff(before: dict[str, Entry], after: dict[str, Entry]) -> list[Change]:
    """The changes from snapshot `before` to `after`: one per path (its gravest kind), by path."""
    changes = []
    for path in sorted(before.keys() | after.keys()):
        change = _classify(path, before.get(path), after.get(path), after)
        if change is not None:
            changes.append(change)
    return changes


def _classify(path: str, b: Entry | None, a: Entry | None, after: dict[str, Entry]) -> Change | None:
    if b is not None and a is not None and not _differs(b, a):
        return None
    action = "created" if b is None else "deleted" if a is None else "changed"
    cur = a if a is not None else b
    assert cur is not None
    kind = cur.kind
    if path == POINTER:
        shown = f"replaced by a {a.kind}" if a is not None and b is not None and a.kind != b.kind else action
        return Change(path, "pointer", shown, kind)
    if is_git_path(path):
        return Change(path, "git-internal", action, kind)
    if a is None:
        return Change(path, "deleted", kind, kind)
    if a.kind in SPECIAL:
        return Change(path, "special", f"{action}, {a.kind}", kind)
    was = b.mode if b is not None and b.kind == a.kind else 0
    risky = stat.S_ISUID | (0 if a.kind == "dir" else stat.S_ISGID)
    if a.mode & risky & ~was:
        return Change(path, "setuid", f"{action}, mode {a.mode:04o}", kind)
    if a.kind != "dir" and a.nlink > 1 and (b is None or b.kind != a.kind or a.nlink > b.nlink):
        return Change(path, "hardlink", f"{action}, {a.nlink} links", kind)
    new_link = a.link is not None and (b is None or b.link != a.link)
    if a.kind == "symlink" and new_link and _escapes(path, a.link or "", after):
        return Change(path, "symlink", f"{action}, -> {a.link}", kind)
    if b is None:
        return Change(path, "added", f"{kind} -> {a.link}" if a.link is not None else kind, kind)
    if b.kind != a.kind:
        return Change(path, "type", f"{b.kind} -> {a.kind}", kind)
    if (b.digest, b.size, b.link) != (a.digest, a.size, a.link):
        return Change(path, "modified", f"-> {a.link}" if a.link is not None else "content", kind)
    if b.mode != a.mode:
        return Change(path, "mode", f"{b.mode:04o} -> {a.mode:04o}", kind)
    return Change(path, "modified", "links", kind)


def _differs(b: Entry, a: Entry) -> bool:
    if b.kind == a.kind == "dir":
        # A folder's link count and size follow its contents, which are judged on their own.
        return (b.mode, b.digest) != (a.mode, a.digest)
    if a.nlink < b.nlink:
        return (b.kind, b.mode, b.size, b.digest, b.link) != (a.kind, a.mode, a.size, a.digest, a.link)
    return b != a


def is_git_path(path: str) -> bool:
    """Does `path` pass through git internals (a `.git` component in any case, `.gitmodules`)?"""
    for part in path.split("/"):
        name = part.lower().rstrip(" .")
        if name in (".git", "git~1", ".gitmodules"):
            return True
    return False


def _escapes(path: str, target: str, entries: dict[str, Entry]) -> bool:
    """Does the link at `path` lead outside the working copy (or into .git)?

    Resolved against the snapshot, link by link as the kernel would, so a chain of
    links that each look harmless is still caught.
    """
    if target.startswith("/") or not target:
        return True
    todo = target.split("/")
    stack = path.split("/")[:-1]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return True
            stack.pop()
            continue
        stack.append(part)
        if is_git_path(part):
            return True
        entry = entries.get("/".join(stack))
        if entry is not None and entry.kind == "symlink":
            hops += 1
            if hops > _MAX_HOPS or not entry.link or entry.link.startswith("/"):
                return True
            stack.pop()
            todo = entry.link.split("/") + todo
    return False


# -- judge ----------------------------------------------------------------------------------------


def judge(changes: list[Change], *, repo: str, files: tuple[str, ...], writes: tuple[str, ...]) -> Verdict:
    """Keep a change only if `<repo>/<path>` matches both `files` and `writes`."""
    offending: list[tuple[Change, str]] = []
    kept: list[str] = []
    folders: list[Change] = []
    for c in changes:
        if c.what in ALWAYS_DENIED:
            offending.append((c, ALWAYS_DENIED[c.what]))
            continue
        reason = _outside(f"{repo}/{c.path}", files, writes)
        if reason is None:
            if c.kind != "dir":
                kept.append(c.path)
        elif c.kind == "dir" and c.what in ("added", "deleted"):
            folders.append(c)  # fine if it only holds (or held) files that are allowed
        else:
            offending.append((c, reason))
    for c in folders:
        if not any(k.startswith(c.path + "/") for k in kept):
            offending.append((c, _outside(f"{repo}/{c.path}", files, writes) or ""))
    offending.sort(key=lambda item: item[0].path)
    return Verdict(changes=tuple(changes), offending=tuple(offending))


def _outside(full: str, files: tuple[str, ...], writes: tuple[str, ...]) -> str | None:
    in_files, in_writes = matches_any(files, full), matches_any(writes, full)
    if in_files and in_writes:
        return None
    if not in_files and not in_writes:
        return "outside the order's files and the agent's writes"
    return "outside the order's files" if not in_files else "outside the agent's writes"


def describe(change: Change) -> str:
    """One report line: `.git/hooks/pre-commit: git-internal (created)`."""
    return f"{change.path}: {change.what} ({change.detail})" if change.detail else f"{change.path}: {change.what}"
