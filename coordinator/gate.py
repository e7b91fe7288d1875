"""The permission gate: what a specialist changed in its working copy, and may it keep it.

Run only after the specialist's whole process tree is dead, so nothing changes
under the walk. `snapshot` records every path of the working copy by `lstat`,
never following a link: untracked and ignored files too, and the working copy's
own `.git` pointer file. `diff` turns two snapshots into changes; `judge` keeps
a change only when its path matches both the order's `files` and the agent's
`writes`, and refuses outright what no permission can grant: git internals (and
a folder git would take for a repository of its own), special files, setuid
bits, hard links, links that lead out of the copy, what it cannot read (a folder
or file whose mode the agent changed), and what would stall the supervisor: a
file over MAX_FILE_BYTES (never read, judged by its size) or folders nested over
MAX_DEPTH levels (never walked further).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .inboxfiles import printable
from .paths import matches_any

POINTER = ".git"
UNREADABLE = "!unreadable"
UNREACHABLE = "!unreachable"  # the copy itself, behind a folder above it that cannot be entered
TOO_DEEP = "!too-deep"  # a folder holding what lies more than MAX_DEPTH levels down
# Over this a changed file is refused unread: 100 MB is about GitHub's own limit per file, and
# hashing plus committing one that size takes about a second. A sparse file costs its writer no
# disk at all, and ext4 allows 16 TiB: a 16 GiB one stalled the loop 154 s before this limit.
MAX_FILE_BYTES = 100_000_000
# And over this of files written in all (each under MAX_FILE_BYTES), the rest is refused unread.
MAX_CHANGED_BYTES = 1_000_000_000
OVER_BUDGET = "!over-budget"
# Deeper than any real source tree; the walk stops there, so a tree thousands of levels deep
# costs no more than this. (Python 3.11's own walks recurse and die at about 1,000 levels.)
MAX_DEPTH = 256
# New files and folders one change may bring. Each costs the supervisor's memory while it is
# judged and a line in its report and record: 300,000 empty files took 440 MB, 46 s and an
# 8 MB record, and a few million would take the supervisor (and every other order) down.
# Past it, what else is new in a folder is neither read nor listed: the folder is refused.
MAX_NEW_PATHS = 20_000
TOO_MANY = "!too-many"
_PATH_MAX = 4096  # Linux: a path this long, NUL included, cannot be opened by name
SPECIAL = frozenset({"fifo", "socket", "device"})
CONTENT = frozenset({"added", "modified", "deleted", "mode", "type"})
# What no `files` or `writes` entry can allow, and why.
ALWAYS_DENIED = {
    "pointer": "the working copy's .git pointer is never writable",
    "git-internal": "git internals (.git, .gitmodules) are never writable",
    "git-repository": "git would take this folder for a repository and run its config and hooks for whoever "
                      "runs git in it; keep such a fixture as an archive the tests unpack",
    "special": "special files (fifo, socket, device) are never allowed",
    "setuid": "setuid and setgid bits are never allowed",
    "hardlink": "a hard link can reach a file outside the working copy",
    "symlink": "a symbolic link may not point outside the working copy or into .git",
    "too-large": f"a file over {MAX_FILE_BYTES // 1_000_000} MB (or over {MAX_CHANGED_BYTES // 1_000_000_000} GB of "
                 "files in all) is never committed; keep it out of the repository",
    "too-deep": f"folders nested over {MAX_DEPTH} levels deep (or paths over {_PATH_MAX} bytes) are never allowed",
    "too-many": f"a change that adds more than {MAX_NEW_PATHS:,} files and folders is never committed; keep "
                "generated or downloaded files out of the repository",
    "unreadable": "a file or folder the supervisor cannot read (its mode was changed) cannot be judged, nor what "
                  "it holds",
}
# Not a kind of change but where it is: a submodule's files belong to another repository, and
# git cannot commit them here ("Pathspec ... is in submodule").
SUBMODULE = "inside the submodule {}: change it in its own repository"
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
    # (inode, size, mtime, ctime): the same in a later snapshot, the file was not written, and
    # its digest is taken over (no write, truncate or chmod leaves ctime as it was, and no
    # specialist may set the clock). Not compared: it is how, not what.
    key: tuple[int, int, int, int] = field(default=(0, 0, 0, 0), compare=False)


@dataclass(frozen=True)
class Change:
    """One changed path (relative to the working copy) and what kind of change it is."""

    path: str
    what: str  # added modified deleted mode type symlink hardlink special setuid git-internal pointer
    #            git-repository too-large too-deep too-many unreadable
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


class Snapshot(dict[str, Entry]):
    """path -> Entry, and when the snapshot began (the wall clock, in ns)."""

    started: int = 0


# A change time this close to a snapshot's start may share the file system's clock tick with
# a write that came after it (timestamps come from a coarse clock, a few ms a tick): such a
# file is read again, as git does with "racily clean" index entries.
RACY_NS = 50_000_000


def snapshot(root: Path, *, since: Snapshot | None = None) -> Snapshot:
    """Every path under `root` (relative, '/'-separated) and what it is; empty when root is gone.

    With `since` (the snapshot before the run), a file not written since keeps its digest
    unread, and the files that were are read up to MAX_CHANGED_BYTES in all: past that, each
    is judged too large unread, so many files each under MAX_FILE_BYTES cannot stall it either.
    """
    out = Snapshot()
    out.started = time.time_ns()
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return out
    except OSError:  # its order's folder made mode 000 (chmod is no Landlock right): nothing in it is known
        out["."] = Entry("dir", 0, 0, UNREACHABLE, None, 1)
        return out
    if not stat.S_ISDIR(st.st_mode):
        return out  # the copy itself was replaced: every path in it reads as deleted
    top = Entry("dir", stat.S_IMODE(st.st_mode), 0, None, None, st.st_nlink)  # ".", should it be marked
    settled = since.started - RACY_NS if since is not None else 0  # changed before this: told by its key
    read = 0  # bytes of written files read, with `since`
    new = 0  # paths not in `since`: past MAX_NEW_PATHS, their folder is marked, not listed
    # An explicit stack, not recursion: the specialist chose how deep the tree goes. A folder
    # is read entry by entry, never listed whole: it may hold millions.
    todo = [(str(root), "", 0)]
    while todo:
        folder, prefix, depth = todo.pop()
        try:
            with os.scandir(folder) as it:
                if prefix and (depth >= MAX_DEPTH or _too_long(folder)):
                    if next(it, None) is not None:
                        _mark(out, prefix[:-1], TOO_DEEP)  # judged as a whole, never walked further
                    continue
                for item in it:
                    rel = prefix + item.name
                    if since is not None and rel not in since:
                        new += 1
                        if new > MAX_NEW_PATHS:
                            where = prefix[:-1] if prefix else "."
                            if out.get(where, _NO_ENTRY).digest != TOO_MANY:
                                _mark(out, where, TOO_MANY)
                            continue
                    st = item.stat(follow_symlinks=False)
                    kind = _kind(st.st_mode)
                    digest = link = None
                    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    if kind == "file":
                        kept = _kept(since.get(rel), key) if since is not None else None
                        written = since is not None and kept is None
                        if kept is not None and st.st_ctime_ns < settled:
                            digest = kept
                        elif st.st_size > MAX_FILE_BYTES:
                            # Judged by lstat's size, never read: `diff` refuses it as too large anyway.
                            # Its inode change time stands in for the content (no write leaves it as it was).
                            digest = f"!large:{st.st_ino}:{st.st_ctime_ns}"
                        elif written and read + st.st_size > MAX_CHANGED_BYTES:
                            digest = f"{OVER_BUDGET}:{st.st_ino}:{st.st_ctime_ns}"
                        else:
                            read += st.st_size if written else 0  # a racy re-read of an unwritten file is free
                            digest = _digest(item.path, st.st_size)
                    elif kind == "symlink":
                        link = os.readlink(item.path)
                    size = 0 if kind == "dir" else st.st_size
                    out[rel] = Entry(kind, stat.S_IMODE(st.st_mode), size, digest, link, st.st_nlink, key)
                    if kind == "dir":
                        todo.append((item.path, rel + "/", depth + 1))
        except OSError:  # a folder the agent made unreadable: what is inside cannot be vouched for
            if not prefix:
                out["."] = top  # the copy's top, with the mode that made it so
            _mark(out, prefix[:-1] if prefix else ".", UNREADABLE)
    return out


def _kept(prev: Entry | None, key: tuple[int, int, int, int]) -> str | None:
    """The digest of a file that, by its key, was not written since `prev` was taken."""
    if prev is None or prev.kind != "file" or prev.key != key or not prev.digest or prev.digest.startswith("!"):
        return None
    return prev.digest


def _too_long(folder: str) -> bool:
    """Is any path in `folder` too long to open by name? (Only looked at near the limit: a
    name takes at most 255 bytes.)"""
    if len(os.fsencode(folder)) + 256 < _PATH_MAX:
        return False
    with os.scandir(folder) as it:
        return any(len(os.fsencode(i.path)) >= _PATH_MAX for i in it)


def _mark(out: Snapshot, rel: str, digest: str) -> None:
    """Judge folder `rel` as a whole by `digest` ("." the copy's top, which has no entry)."""
    e = out.get(rel, _NO_ENTRY)
    out[rel] = Entry(e.kind, e.mode, e.size, digest, None, e.nlink)


_NO_ENTRY = Entry("dir", 0o755, 0, None, None, 1)  # the copy's top, as `_mark` records it


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


def unchanged_since(root: Path, path: str, judged: Entry | None) -> bool:
    """Is `path` in the copy still what the gate judged? Any write, truncate, chmod, rename
    or link since moves its inode, size, mtime or change time (`Entry.key`); a path judged
    gone must still be gone. Asked after git read it to stage it: what git read was judged."""
    full = os.path.join(root, path)
    try:
        st = os.lstat(full)
    except (FileNotFoundError, NotADirectoryError):
        return judged is None
    except OSError:
        return False
    if judged is None:  # still gone when found only through a link on its way (a folder made a link)
        return _through_link(root, path)
    if judged.kind != _kind(st.st_mode):
        return False
    if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != judged.key:
        return False
    if judged.kind != "symlink":
        return True
    try:
        return os.readlink(full) == judged.link
    except OSError:  # swapped for something else since the lstat
        return False


def _through_link(root: Path, path: str) -> bool:
    """Is one of the folders on the way to `path` in `root` a link?"""
    parts = path.split("/")[:-1]
    for i in range(len(parts)):
        try:
            if stat.S_ISLNK(os.lstat(os.path.join(root, *parts[:i + 1])).st_mode):
                return True
        except OSError:
            return False
    return False


def _digest(path: str, size: int) -> str:
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
        left = size + 1  # no further than lstat said: a file grown meanwhile is not read to its end
        while left > 0 and (chunk := os.read(fd, min(_CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
        return UNREADABLE if left <= 0 else h.hexdigest()
    except OSError:
        return UNREADABLE
    finally:
        os.close(fd)


# -- diff -----------------------------------------------------------------------------------------


def diff(before: dict[str, Entry], after: dict[str, Entry]) -> list[Change]:
    """The changes from snapshot `before` to `after`: one per path (its gravest kind), by path."""
    changes = []
    # What lies in a folder that could not be read is unknown, not deleted: the folder is
    # judged (and refused) as a whole.
    # The copy's top (".") unread: every path in it is unknown.
    unread = tuple("" if p == "." else p + "/" for p, e in after.items()
                   if e.kind == "dir" and e.digest in (UNREADABLE, UNREACHABLE))
    for path in sorted(before.keys() | after.keys()):
        if unread and path != "." and path.startswith(unread):
            continue
        change = _classify(path, before.get(path), after.get(path), after)
        if change is not None:
            changes.append(change)
    changes = _repointed(changes, before, after)
    return _repositories(changes, before, after) if changes else changes


def _repointed(changes: list[Change], before: dict[str, Entry], after: dict[str, Entry]) -> list[Change]:
    """`changes`, plus each link the change left as it was that now leads out of the copy.

    A link is resolved through the folders and links on its way: one made harmless in an
    earlier change (`src/l -> a/b/c/../../../..`, with `a/b/c` a folder) leads out once a
    later change makes `a/b/c` a link (`-> ../../..`), which itself stays inside, or makes a
    link on the way a folder again. Asked only when the change makes, re-points or removes a
    link: nothing else moves where a link leads.
    """
    if not any(e.kind == "symlink" for c in changes for e in (before.get(c.path), after.get(c.path)) if e):
        return changes
    changed = {c.path for c in changes}
    found = [Change(path, "symlink", f"unchanged, -> {e.link} now leads out through a changed link", "symlink")
             for path, e in after.items()
             if e.kind == "symlink" and path not in changed and e.link is not None
             and _escapes(path, e.link, after) and not _escapes(path, e.link, before)]
    return sorted(changes + found, key=lambda c: c.path) if found else changes


# What git looks for in a folder to take it for a repository (see repository_folders).
_REPO_NAMES = frozenset({"head", "objects", "refs", "commondir"})


def _repositories(changes: list[Change], before: dict[str, Entry], after: dict[str, Entry]) -> list[Change]:
    """`changes`, where a change lies in a folder git would take for a repository of its own:
    that folder refused as a whole (`git-repository`), whatever the rest of the change.

    Git run anywhere in such a folder reads its config and runs its hooks (a merged one would
    run the agent's commands as the user): git's own guard, `safe.bareRepository=explicit`,
    is off by default.
    """
    shaped = repository_folders((path, e.kind) for path, e in after.items())
    if not shaped:
        return changes
    inside = tuple(f + "/" for f in shaped)
    hit = {f for c in changes if c.path in shaped or c.path.startswith(inside)
           for f in shaped if c.path == f or c.path.startswith(f + "/")}
    if not hit:
        return changes
    kept = [c for c in changes if c.path not in hit]
    kept += [Change(f, "git-repository", f"{'changed' if f in before else 'created'}, holds {shaped[f]}", "dir")
             for f in hit]
    return sorted(kept, key=lambda c: c.path)


def _classify(path: str, b: Entry | None, a: Entry | None, after: dict[str, Entry]) -> Change | None:
    if b is not None and a is not None and not _differs(b, a):
        return None
    action = "created" if b is None and path != "." else "deleted" if a is None else "changed"  # ".": the top
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
    if a.kind == "file" and a.size > MAX_FILE_BYTES:
        return Change(path, "too-large", f"{action}, {_size(a.size)}", kind)
    if a.digest and a.digest.startswith(OVER_BUDGET):
        return Change(path, "too-large", f"{action}, past {_size(MAX_CHANGED_BYTES)} of written files in all", kind)
    if a.digest == UNREADABLE:
        return Change(path, "unreadable", f"{action}, mode {a.mode:04o}", kind)
    if a.digest == UNREACHABLE:
        return Change(path, "unreadable", "the folder holding the working copy was made unreadable", kind)
    if a.digest == TOO_DEEP:
        return Change(path, "too-deep", f"{action}, holds more than {MAX_DEPTH} levels down", kind)
    if a.digest == TOO_MANY:
        return Change(path, "too-many", f"{action}, where the change passed {MAX_NEW_PATHS:,} new paths", kind)
    if b is None:
        return Change(path, "added", f"{kind} -> {a.link}" if a.link is not None else kind, kind)
    if b.kind != a.kind:
        return Change(path, "type", f"{b.kind} -> {a.kind}", kind)
    if (b.digest, b.size, b.link) != (a.digest, a.size, a.link):
        return Change(path, "modified", f"-> {a.link}" if a.link is not None else "content", kind)
    if b.mode != a.mode:
        return Change(path, "mode", f"{b.mode:04o} -> {a.mode:04o}", kind)
    return Change(path, "modified", "links", kind)


def repository_folders(entries: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The folders among `entries` ((path, kind), as in a snapshot) that git would take for
    a repository of their own, each with the names that make it one (`HEAD, objects, refs`).

    Git's test (setup.c, is_git_directory): a HEAD file, and `objects` and `refs` beside it,
    or a `commondir` file naming where they are. Names are compared as a case-insensitive
    file system (a clone on macOS or Windows) would. The top folder is never one: git finds
    its `.git` there first.
    """
    held: dict[str, dict[str, str]] = {}  # folder -> normalized name -> name, of _REPO_NAMES only
    for path, kind in entries:
        folder, _, name = path.rpartition("/")
        key = name.lower().rstrip(" .")
        if key in _REPO_NAMES and folder and not (key == "head" and kind == "dir"):  # git reads HEAD
            held.setdefault(folder, {})[key] = name
    return {
        folder: ", ".join(names[k] for k in ("head", "objects", "refs", "commondir") if k in names)
        for folder, names in held.items()
        if "head" in names and ("commondir" in names or "objects" in names and "refs" in names)
        and not is_git_path(folder)  # already refused as git internals
    }


def planted(root: str, *, working_copy: bool = False, unreadable: list[str] | None = None,
            held: dict[str, bool | None] | None = None) -> list[str]:
    """What in folder `root` git would run for whoever runs git there (a person's shell
    prompt runs `git status` in every folder they enter): every entry named `.git` in any
    case, every folder below `root` git would take for a repository of its own, and, when
    `root` itself is shaped like one, the entries that make it one. Links are listed, never
    entered; nothing deeper than MAX_DEPTH is walked (a tree that deep is never entered by hand).
    `working_copy`: `root` is a repository's working copy; its own `.git` is not listed (and
    with it there, git never takes `root` itself for a repository). `unreadable` gets each
    folder that could not be listed (what is in it is not known). `held`: folders (by path)
    listed but neither judged nor walked, each set to whether it holds anything (the caller
    removes what it holds); one not reached as a folder (a link, say) stays as it was."""
    found: list[str] = []
    todo = [(root, 0)]
    while todo:  # a stack, not recursion: the agent chose how deep the tree goes
        folder, depth = todo.pop()
        try:
            with os.scandir(folder) as it:
                items = [(i.name, i.path, i.is_dir(follow_symlinks=False)) for i in it]
        except OSError:
            if unreadable is not None:
                unreadable.append(folder)
            continue
        if held is not None and folder in held:
            held[folder] = bool(items)
            continue
        own = working_copy and not depth
        keys = [name.lower().rstrip(" .") for name, _, _ in items]
        # No HEAD in it, no folder is one git takes for a repository: most are not asked.
        shaped = not own and "head" in keys and repository_folders(
            (f"f/{name}", "dir" if is_dir else "file") for name, _, is_dir in items)
        if shaped and depth:
            found.append(folder)
            continue
        for (name, path, is_dir), key in zip(items, keys, strict=True):
            if own and name == ".git":
                continue
            if key in (".git", "git~1") or (shaped and key in _REPO_NAMES):
                found.append(path)
            elif is_dir and depth < MAX_DEPTH:
                todo.append((path, depth + 1))
    return found


def _differs(b: Entry, a: Entry) -> bool:
    if b.kind == a.kind == "dir":
        # A folder's link count and size follow its contents, which are judged on their own.
        return (b.mode, b.digest) != (a.mode, a.digest)
    if a.nlink < b.nlink:
        return (b.kind, b.mode, b.size, b.digest, b.link) != (a.kind, a.mode, a.size, a.digest, a.link)
    return b != a


def _size(n: int) -> str:
    """`2147483648 bytes = 2.0 GiB`: exact, and readable."""
    shown, unit = float(n), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if shown < 1024:
            break
        shown, unit = shown / 1024, name
    return f"{n} bytes" if unit == "bytes" else f"{n} bytes = {shown:.1f} {unit}"


def is_git_path(path: str) -> bool:
    """Does `path` pass through git internals (a `.git` component in any case, `.gitmodules`)?
    Named as git names them to protect a checkout on NTFS (`.git. `, `git~1`, `.git::$DATA`):
    git never stages such a path, so a change holding one was "done" without it."""
    for part in path.split("/"):
        name = part.lower().partition(":")[0].rstrip(" .")
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


def links_leading_out(after: dict[str, str], before: dict[str, str]) -> list[str]:
    """The links of a tree (path -> target, `after`) that lead out of it or into .git, and did
    not as the same link in the tree it came from (`before`): each resolved through the other
    links on its way."""
    now = {p: Entry("symlink", 0, 0, None, t, 1) for p, t in after.items()}
    was = {p: Entry("symlink", 0, 0, None, t, 1) for p, t in before.items()}
    return sorted(p for p, t in after.items()
                  if _escapes(p, t, now) and not (before.get(p) == t and _escapes(p, t, was)))


# -- judge ----------------------------------------------------------------------------------------


def judge(changes: list[Change], *, repo: str, files: tuple[str, ...], writes: tuple[str, ...],
          submodules: Iterable[str] = ()) -> Verdict:
    """Keep a change only if `<repo>/<path>` matches both `files` and `writes`, and lies in
    none of `submodules` (folders of the repository that are submodules, `submodule_folders`)."""
    offending: list[tuple[Change, str]] = []
    kept: list[str] = []
    folders: list[Change] = []
    subs = tuple(submodules)

    def why(c: Change) -> str | None:
        sub = next((f for f in subs if c.path == f or c.path.startswith(f + "/")), None)
        return SUBMODULE.format(printable(sub)) if sub is not None else outside(f"{repo}/{c.path}", files, writes)

    for c in changes:
        if c.what in ALWAYS_DENIED:
            offending.append((c, ALWAYS_DENIED[c.what]))
            continue
        reason = why(c)
        if reason is None:
            if c.kind != "dir":
                kept.append(c.path)
        elif c.kind == "dir" and c.what in ("added", "deleted"):
            folders.append(c)  # fine if it only holds (or held) files that are allowed
        else:
            offending.append((c, reason))
    # The folders that hold a kept path, and those that hold a refused one: a new folder of
    # 256 levels around one refused deep tree is that one refusal, not 256 lines before it.
    holds_kept, holds_refused = _folders_of(kept), _folders_of(c.path for c, _ in offending)
    for c in folders:
        if c.path not in holds_kept and c.path not in holds_refused:
            offending.append((c, why(c) or ""))
    offending.sort(key=lambda item: item[0].path)
    return Verdict(changes=tuple(changes), offending=tuple(_git_folders_whole(offending)))


def _git_folders_whole(offending: list[tuple[Change, str]]) -> list[tuple[Change, str]]:
    """`offending` (by path), where a refused `.git` folder (a `git init` made one) is one
    line that says how many paths it holds, not one line for each of them."""
    tops = {c.path for c, _ in offending if c.what in ("git-internal", "pointer") and c.kind == "dir"}
    if not tops:
        return offending
    held: dict[str, int] = {}
    out: list[tuple[Change, str]] = []
    for c, reason in offending:
        top = min((p for p in _folders_of((c.path,)) if p in tops), key=len, default=None)  # the outermost
        if top is not None and c.what == "git-internal":
            held[top] = held.get(top, 0) + 1
        else:
            out.append((c, reason))
    return [(_holding(c, held[c.path]), reason) if c.path in held else (c, reason) for c, reason in out]


def _holding(c: Change, n: int) -> Change:
    """Git folder `c`, saying the `n` paths in it that are not listed."""
    paths = f"{n:,} path{'s' if n > 1 else ''}"
    return Change(c.path, c.what, f"{c.detail}, and the {paths} in it" if c.detail else f"with the {paths} in it",
                  c.kind)


def submodule_candidates(changes: Iterable[Change], before: dict[str, Entry]) -> list[str]:
    """The folders that could be submodules a change lies in: each changed path and the
    folders above it that were folders before the run (a submodule not checked out is an empty
    folder in the working copy). Few, whatever the change: a folder the agent made is none."""
    found: set[str] = set()
    seen: set[str] = set()  # each folder looked at once: above it, all were
    for c in changes:
        cut = len(c.path)
        while cut > 0 and c.path[:cut] not in seen:
            folder = c.path[:cut]
            seen.add(folder)
            entry = before.get(folder)
            if entry is not None and entry.kind == "dir":
                found.add(folder)
            cut = c.path.rfind("/", 0, cut)
    return sorted(found)


def _folders_of(paths: Iterable[str]) -> set[str]:
    """Every folder above each of `paths`: `a/b/c` gives `a` and `a/b`."""
    found: set[str] = set()
    for p in paths:
        cut = p.rfind("/")
        while cut > 0 and p[:cut] not in found:
            found.add(p[:cut])
            cut = p.rfind("/", 0, cut)
    return found


def outside(full: str, files: tuple[str, ...], writes: tuple[str, ...]) -> str | None:
    """Why a change at `full` (repo/path) is not the order's to make, or None when it is."""
    in_files, in_writes = matches_any(files, full), matches_any(writes, full)
    if in_files and in_writes:
        return None
    if not in_files and not in_writes:
        return "outside the order's files and the agent's writes"
    return "outside the order's files" if not in_files else "outside the agent's writes"


def describe(change: Change) -> str:
    """One report line: `.git/hooks/pre-commit: git-internal (created)`. The specialist chose
    the path and a link's target: bytes that are not UTF-8 and control characters (a newline
    would start a line of its own in the report) are shown as escapes."""
    path, detail = printable(change.path), printable(change.detail)
    return f"{path}: {change.what} ({detail})" if detail else f"{path}: {change.what}"
