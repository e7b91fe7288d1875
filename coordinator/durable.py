"""The one way state that must survive a crash is written, and the one way a tree is removed.

Write to a temp file in the same folder, fsync it, rename it over the target,
fsync the folder. A reader sees the old file or the new one, never half of one.

A tree a specialist wrote (a working copy, a scratch folder) is removed with
`remove_tree`: however deep, however long its paths, whatever modes it was left
with, and it says what stayed when anything did.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

TMP_PREFIX = ".tmp-"

# git update-index lstats a path, then opens it and reads as many bytes as the lstat said:
# a longer version renamed over the file in between would be committed cut short, a
# shorter one would fail the batch. While the state committer's git reads a batch's paths
# (`staging`), a rename onto or off one of them (or within a folder among them) waits;
# renames elsewhere under the guarded folder (state/) go on, and outside it nothing waits.
# Each staging holds its own paths: two supervisors in one process never free each other's.
_BUSY = threading.Condition()
_busy: list[tuple[frozenset[str], tuple[str, ...]]] = []  # (files, folders) per git reading now
_guarded: tuple[str, ...] = ()  # one per open supervisor (tests open several in one process)


def guard(folder: Path, *, on: bool = True) -> None:
    """Make renames under `folder` wait for `staging` (`on=False`: no longer)."""
    global _guarded
    prefix = os.path.join(os.path.abspath(folder), "")
    _guarded = (*_guarded, prefix) if on else tuple(p for p in _guarded if p != prefix)


@contextlib.contextmanager
def staging(paths: Iterable[Path | str]) -> Iterator[None]:
    """While git reads `paths` (a folder: all below it), nothing is renamed onto or off them."""
    files = frozenset(os.path.abspath(p) for p in paths)
    entry = (files, tuple(os.path.join(p, "") for p in files if os.path.isdir(p)))
    with _BUSY:  # taken by every guarded rename too: none is half done when git starts
        _busy.append(entry)
    try:
        yield
    finally:
        with _BUSY:
            _busy.remove(entry)
            _BUSY.notify_all()


def _is_busy(path: str) -> bool:
    return any(path in files or (folders and path.startswith(folders)) for files, folders in _busy)


def _rename(src: Path | str, dst: Path | str, *, replace: bool,
            rename: Callable[[str | Path, str | Path], None] | None = None) -> None:
    """`src` renamed to `dst` once git is not reading either (`staging`); `rename`: how (by
    default os.replace, or os.rename when not `replace`)."""
    rename = rename or (os.replace if replace else os.rename)
    if not _guarded:
        rename(src, dst)
        return
    ends = [p for p in (os.path.abspath(src), os.path.abspath(dst)) if p.startswith(_guarded)]
    if not ends:
        rename(src, dst)
        return
    with _BUSY:
        waited = False
        while _busy and any(_is_busy(p) for p in ends):
            _BUSY.wait()
            waited = True
        if waited:
            # The rename (and the file's change time) comes later than its note said: noted
            # again first, so that a note that fails (a full disk) means no rename. Noted after
            # it, a failure was either a rename said not made, or a write the journal's time
            # no longer covered (taken for a hand edit and put back at the next start).
            note(dst, _stamp(src))
        rename(src, dst)

# The supervisor commits exactly the paths it wrote, so that a hand edit in state/
# is never swept into its commits; every write under a journaled root (state/) is noted.
# With a journal file, each path is also appended there, with the time, before it is
# written, and, where it is known then, what the write leaves there (inode, size, mtime:
# `time:ino:size:mtime path`): after a crash, what is changed in state/ and not in the file
# (or is not as the file says, or, where it does not say, changed after its time) was not
# the supervisor's doing. One journal per root: two
# supervisors in one process (tests) never take each other's paths.
JOURNAL_SLACK_NS = 2_000_000_000  # a file changed this long after its noted write is another's change


# What the supervisor left at a path it wrote, taken from the fd it wrote with (no read-back):
# a batch stages the file only while it is still so. A file changed or removed by hand between
# the write and the commit (a second or so) was committed as the supervisor's: the tamper watch
# never saw it. Now the bytes it wrote are committed instead (`data`, kept until the commit, up
# to KEPT_LIMIT a batch), or, where they are not known, nothing, and the tamper watch puts the
# file back and says so, as it does with an edit made after the commit.
Stamp = tuple[int, int, int]  # (inode, size, mtime in ns) of a file as written


class Wrote(NamedTuple):
    ino: int
    size: int
    mtime_ns: int
    mode: int
    data: bytes | None
    # A file appended to (signals.jsonl): what was appended since the last batch, to go on
    # top of what the last commit holds, whatever the file holds now (a line cut out by hand).
    appended: bytes | None = None

    def still(self, st: os.stat_result) -> bool:
        """Whether `st` (an lstat) is the file as written."""
        return (st.st_ino == self.ino and st.st_size == self.size and st.st_mtime_ns == self.mtime_ns
                and stat.S_ISREG(st.st_mode))


KEPT_LIMIT = 64 << 20  # bytes of written files kept for one batch; past it, only their stamps


class _Journal:
    def __init__(self, file: Path | None) -> None:
        # Noted since the last `take_journal`, with what was left there (None: not known, such
        # as a folder or a write cut off: staged as found).
        self.paths: dict[str, Wrote | None] = {}
        self.kept = 0  # bytes of `data` in `paths`
        self.appends: dict[str, bytes] = {}  # lines appended to a path since the last `take_journal`
        # With a file: each path in it and its latest line's time (and stamp), kept there
        # until a compaction finds it committed (a time moved later would cover a hand edit).
        self.times: dict[str, str] = {}
        self.file = os.fspath(file) if file is not None else None
        self.fd = (os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
                   if file is not None else None)


_journals: dict[str, _Journal] = {}  # root with a trailing / -> its journal


def _prefix(root: Path) -> str:
    return os.path.join(os.path.abspath(root), "")


def open_journal(root: Path, file: Path | None = None) -> None:
    """Journal the paths written under `root` from now on; with `file`, there too (appended:
    what a crash left in it stays until `compact_journal`)."""
    _journals[_prefix(root)] = _Journal(file)


def take_journal(root: Path) -> dict[str, Wrote | None]:
    """The paths written under `root` since the last call, each with what was written there
    (see `Wrote`), and keep journaling."""
    journal = _journals.get(_prefix(root))
    if journal is None:
        return {}
    taken, journal.paths, journal.kept, journal.appends = journal.paths, {}, 0, {}
    return taken


def give_back(root: Path, written: dict[str, Wrote | None]) -> None:
    """Paths taken from `root`'s journal whose commit failed: noted as not yet taken again,
    so that they go with the next commit and no compaction drops them meanwhile (a path
    written again since keeps what that write left)."""
    journal = _journals.get(_prefix(root))
    if journal is not None:
        for path, wrote in written.items():
            if path not in journal.paths:
                journal.paths[path] = wrote
                journal.kept += len(wrote.data) if wrote is not None and wrote.data is not None else 0
                if wrote is not None and wrote.appended is not None:
                    journal.appends[path] = wrote.appended
                continue
            now = journal.paths[path]
            if wrote is not None and wrote.appended is not None and path in journal.appends:
                # Appended to again since: the lines of the failed commit come first.
                journal.appends[path] = wrote.appended + journal.appends[path]
                if now is not None and now.appended is not None:
                    journal.paths[path] = now._replace(appended=journal.appends[path])


def peek_journal(root: Path) -> set[str]:
    journal = _journals.get(_prefix(root))
    return set(journal.paths) if journal is not None else set()


def compact_journal(root: Path, uncommitted: Iterable[str] = ()) -> None:
    """Everything taken from `root`'s journal is committed but `uncommitted` (taken, its
    commit still on its way): its file keeps only what is not committed yet (replaced whole,
    so a crash part-way leaves the old, longer file)."""
    prefix = _prefix(root)
    journal = _journals.get(prefix)
    if journal is None or journal.file is None or journal.fd is None:
        return
    now = str(time.time_ns())
    times = journal.times
    journal.times = {p: times.get(p, now) for p in set(journal.paths).union(uncommitted)}
    lines = "".join(f"{when} {p[len(prefix):]}\n" for p, when in sorted(journal.times.items()))
    tmp = f"{journal.file}.new"
    with open(tmp, "wb") as f:
        f.write(lines.encode("utf-8", "surrogateescape"))
    os.replace(tmp, journal.file)
    os.close(journal.fd)
    journal.fd = os.open(journal.file, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)


def close_journal(root: Path, *, committed: bool = False) -> None:
    """Stop journaling under `root`; `committed`: everything noted is committed, so its file
    goes too."""
    journal = _journals.pop(_prefix(root), None)
    if journal is None or journal.fd is None:
        return
    os.close(journal.fd)
    if committed and journal.file is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal.file)


class Noted(dict[str, int]):
    """What a journal file says was written: path (relative to its root) -> latest time in ns,
    and what each write left where its line says (`stamps`); `loose`: the paths noted at
    least once without (a folder, an appended file), told by the time alone."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: dict[str, set[Stamp]] = {}
        self.loose: set[str] = set()


def read_journal(file: Path) -> Noted | None:
    """What a journal file says was written (see `Noted`); None when there is no file, or
    none that can be read (nothing is known of the writes)."""
    try:
        raw = file.read_bytes()
    except OSError:
        return None
    found = Noted()
    lines = raw.decode("utf-8", "surrogateescape").split("\n")
    for n, line in enumerate(lines):
        when, _, path = line.partition(" ")
        fields = when.split(":")
        if path and len(fields) in (1, 4) and all(f.isascii() and f.isdigit() for f in fields):
            found[path] = max(found.get(path, 0), int(fields[0]))
            if len(fields) == 4:
                found.stamps.setdefault(path, set()).add((int(fields[1]), int(fields[2]), int(fields[3])))
            else:
                found.loose.add(path)
        elif line and n < len(lines) - 1:
            return None  # not a journal this code wrote: nothing is known from it
    return found  # (a last line a crash cut short is skipped)


def noted_at(rel: str, noted: Container[str]) -> str | None:
    """`rel` itself or the nearest folder above it that is in `noted` (a tree removed or
    written whole is noted as its folder); None when neither is."""
    path = rel
    while path:
        if path in noted:
            return path
        path = os.path.dirname(path)
    return None


def written_by_journal(rel: str, root: Path, written: dict[str, int]) -> bool:
    """Whether the change at `rel` (under `root`) is one the journal accounts for: the path,
    or a folder above it, was noted, and the path has not changed since (a removal it noted
    is gone, so it counts)."""
    noted = noted_at(rel, written)
    if noted is None:
        return False
    when = written[noted]
    try:
        st = os.lstat(os.path.join(root, rel))
    except FileNotFoundError:
        return True
    if isinstance(written, Noted) and noted in written.stamps:  # as one of its writes left it, or not
        if stat.S_ISREG(st.st_mode) and (st.st_ino, st.st_size, st.st_mtime_ns) in written.stamps[noted]:
            return True
        if noted not in written.loose:
            return False
    return st.st_ctime_ns <= when + JOURNAL_SLACK_NS


def note(path: Path | str, stamp: Stamp | None = None) -> None:
    """Record a path about to be written or removed (call it before, so that the journal
    file never misses a write a crash cut off); `stamp`: what the write leaves there."""
    if not _journals:
        return
    p = os.fspath(path)
    for prefix, journal in _journals.items():
        if p.startswith(prefix):
            _forget(journal, p)
            journal.paths[p] = None  # what it holds is known once written (`_wrote`)
            if journal.fd is not None:
                when = (str(time.time_ns()) if stamp is None
                        else f"{time.time_ns()}:{stamp[0]}:{stamp[1]}:{stamp[2]}")
                journal.times[p] = when
                _append_whole(journal.fd, f"{when} {p[len(prefix):]}\n".encode("utf-8", "surrogateescape"))


def _stamp(path: Path | str) -> Stamp | None:
    """What the regular file at `path` is, for a journal line; None for anything else."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def _forget(journal: _Journal, path: str) -> None:
    old = journal.paths.get(path)
    if old is not None and old.data is not None:
        journal.kept -= len(old.data)


def _wrote(path: str, st: os.stat_result, data: bytes | None) -> None:
    """`path` (noted) now holds what `st` (an fstat of the fd it was written with) says, and
    `data` when known: a batch stages it only while it is so (see `Wrote`)."""
    if not _journals:
        return
    for prefix, journal in _journals.items():
        if path.startswith(prefix) and path in journal.paths:
            _forget(journal, path)
            keep = data is not None and journal.kept + len(data) <= KEPT_LIMIT
            if keep and data is not None:
                journal.kept += len(data)
            journal.paths[path] = Wrote(st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, data if keep else None)
            journal.appends.pop(path, None)  # written whole: what was appended before is in it


def _appended(path: str, st: os.stat_result, data: bytes) -> None:
    """`data` was appended to `path` (noted), which `st` now describes: see `Wrote.appended`."""
    for prefix, journal in _journals.items():
        if path.startswith(prefix) and path in journal.paths:
            _forget(journal, path)
            appended = journal.appends[path] = journal.appends.get(path, b"") + data
            journal.paths[path] = Wrote(st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, None, appended)


_APPENDING = threading.Lock()


def _append_whole(fd: int, line: bytes) -> None:
    """Append `line` to the O_APPEND file `fd` whole, or not at all: a full disk can take part
    of it, and a cut line followed by others would garble the lines around it (a journal line
    cut to `orders/x/original.m` left the real file to be taken for a hand edit)."""
    with _APPENDING:
        n = os.write(fd, line)
        if n != len(line):
            with contextlib.suppress(OSError):
                os.ftruncate(fd, os.fstat(fd).st_size - n)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fsync_dir(folder: Path | str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# This process's id, for temp names: a system call each time otherwise (five per order).
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _temp_written(target: Path | str, data: bytes, mode: int, *, sync: bool,
                  stat_it: bool = False) -> tuple[str, str, os.stat_result | None]:
    """(folder, temp file, its fstat when `stat_it`): `data` written beside `target` under a
    temp name, synced when `sync`; the temp file is gone again when this fails."""
    # Strings: a Path's `/` was a tenth of the cost, and os.path's split and join a tenth again.
    folder, slash, name = os.fspath(target).rpartition("/")
    tmp = f"{folder}{slash}{TMP_PREFIX}{name}.{_pid}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, data)
        if sync:
            os.fsync(fd)
        st = os.fstat(fd) if stat_it else None
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return folder or slash, tmp, st  # as os.path.split: "/" for "/x", "" for "x"


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)  # all of it, but for a file past a few GB or a full disk
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


def write_bytes(target: Path, data: bytes, *, sync: bool = True, mode: int = 0o644) -> None:
    """Atomically replace `target` with `data` (temp file, fsync, rename, fsync folder); a
    file that is there already, under a folder with spare files, by way of one (`spare_files`)."""
    if _pools and _swapped(target, data, sync=sync, mode=mode):
        return
    # The fstat: what the batch checks the file against (`Wrote`).
    folder, tmp, st = _temp_written(target, data, mode, sync=sync, stat_it=bool(_journals))
    stamp = None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        note(target, stamp)  # fails on a full disk (the journal): the write is then not made
        _rename(tmp, target, replace=True)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if st is not None:
        _wrote(os.fspath(target), st, bytes(data))
    if sync:
        fsync_dir(folder)


# -- replacing a file without freeing one -----------------------------------------------------

# A file replaced by a rename frees the inode it held, and its block. On an ext4 without a
# journal (`holds_freed_inodes`; the disk of the machine the benchmarks ran on, mounted with
# `discard`), each free is a discard sent to the device (~150 us, where a new file costs ~50 us),
# and every inode freed in the last 1-6 minutes is stepped over, one by one, by each new file of
# its block group (the kernel's `recently_deleted()`): an order's record.json, replaced two or
# three times per order, made every file made after it slower for minutes. On such a file
# system the supervisor gives state/ spare files (`spare_files`, kept in .coordinator/spare-files/):
# a file that is replaced is written into a spare and swapped with it (renameat2
# RENAME_EXCHANGE). A reader still sees the old file or the new one, never half of one, and
# nothing is freed: the old version becomes a spare, written over in place only once SPARE_FILES
# newer spares are there and it has been one for SPARE_AGE seconds (a reader or git that opened
# it before the swap has read it by then; in a burst the spares grow instead). Only what was
# swapped out as a regular file of one name is ever written over. Where the file system holds
# freed inodes back no ordering survives a power loss either way; on others (an ext4 with its
# journal orders a new file's data before the rename that puts it in place, not an overwrite),
# files are replaced by rename as before, as they are where the kernel cannot swap.
SPARE_FILES = 64
SPARE_AGE = 1.0  # seconds
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class _Spares:
    """The spare files of one folder, oldest first, each with when it became one (monotonic)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.lock = threading.Lock()
        self.umask = _umask()  # a file written by way of a spare gets the mode a new one would
        found: list[tuple[int, str, int]] = []  # (change time, name, number) of an earlier run's
        try:
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.name.isdigit():
                        st = e.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                            found.append((st.st_ctime_ns, e.path, int(e.name)))
                        elif stat.S_ISREG(st.st_mode):  # a power loss cut a swap in two: a live file's
                            self.drop(e.path)
        except OSError:
            found = []
        # Oldest swap first (the change time is the swap's): spare 1 may be the newest.
        now, wall = time.monotonic(), time.time_ns()
        self.free = deque((path, now - max(0.0, (wall - ctime) / 1e9)) for ctime, path, _ in sorted(found))
        self.next = max((n for _, _, n in found), default=0) + 1

    def take(self) -> str:
        with self.lock:
            if len(self.free) >= SPARE_FILES and self.free[0][1] <= time.monotonic() - SPARE_AGE:
                return self.free.popleft()[0]
            name, self.next = f"{self.folder}/{self.next}", self.next + 1
            return name

    def give(self, name: str) -> None:
        with self.lock:
            self.free.append((name, time.monotonic()))

    @staticmethod
    def drop(name: str) -> None:
        """Not a spare any more (what it names is not ours to write over): its name goes."""
        with contextlib.suppress(OSError):
            os.unlink(name)


_pools: dict[str, _Spares] = {}  # root with a trailing / -> its spare files
_exchange_fn: Any = None  # libc's renameat2, once looked up (False: not there)


def holds_freed_inodes(path: Path | str) -> bool:
    """Whether `path` is on an ext4 without a journal, where a freed inode is costly (see above)."""
    try:
        st = os.stat(path)
        device = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
        with open(f"/sys/fs/ext4/{device}/journal_task", encoding="utf-8") as f:
            return f.read().strip() == "<none>"
    except (OSError, ValueError):
        return False


def spare_files(root: Path, folder: Path | None) -> None:
    """Replace files under `root` by way of spare files kept in `folder`, or no longer (`folder`
    None). Nothing changes where the C library has no renameat2, `folder` cannot be made or is
    on another file system, or a file made in `root` would not get the group and permissions a
    spare has (`root` set-group-id, or with a default ACL)."""
    prefix = _prefix(root)
    _pools.pop(prefix, None)
    if folder is None or not _exchange():
        return
    try:
        os.makedirs(folder, exist_ok=True)
        here, there = os.stat(root), os.stat(folder)
    except OSError:
        return
    if here.st_dev != there.st_dev or here.st_mode & stat.S_ISGID or here.st_gid != there.st_gid:
        return
    try:
        os.getxattr(root, "system.posix_acl_default")
        return
    except OSError:
        pass
    _pools[prefix] = _Spares(os.path.abspath(folder))


def _umask() -> int:
    """This process's umask, read without changing it (os.umask sets it, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _exchange() -> Any:
    global _exchange_fn
    if _exchange_fn is None:
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _exchange_fn = fn
        except (AttributeError, OSError):
            _exchange_fn = False
    return _exchange_fn


def _swap(src: str | Path, dst: str | Path) -> None:
    """Exchange `src` and `dst` (both there) in one step."""
    if _exchange_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_EXCHANGE) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(dst))


class _NotSpare(Exception):
    """What a spare's name leads to is not a file only the spares hold."""


def _swapped(target: Path | str, data: bytes, *, sync: bool, mode: int) -> bool:
    """`write_bytes` by way of a spare file; False when nothing was written: no spare files
    under `target`'s root, `target` is not a regular file of one name there to replace (one
    with other names, such as a hard link a person keeps of an order they dropped, must never
    become a spare written over in place), or the spare could not be written (the usual write
    then does it, and says what fails)."""
    path = os.fspath(target)
    found = next(((prefix, pool) for prefix, pool in tuple(_pools.items()) if path.startswith(prefix)), None)
    if found is None:
        return False
    prefix, spares = found
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    mode &= ~spares.umask
    spare = spares.take()
    try:
        fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError:
        spares.drop(spare)  # not a file of ours (a folder, a link): left out of the spares
        return False
    try:
        st = os.fstat(fd)
        # A second name made for it meanwhile (a link, or a swap a power loss left half done on
        # a file system without a journal): written over, it would change that file too.
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            raise _NotSpare
        done = 0
        while done < len(data):
            done += os.pwrite(fd, memoryview(data)[done:], done)
        os.ftruncate(fd, len(data))
        if sync:
            os.fsync(fd)
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
            st = os.fstat(fd)
    except (OSError, _NotSpare):
        os.close(fd)
        spares.drop(spare)
        return False
    except BaseException:
        os.close(fd)
        spares.give(spare)
        raise
    os.close(fd)
    try:
        note(path, (st.st_ino, st.st_size, st.st_mtime_ns))
        _rename(spare, path, replace=True, rename=_swap)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
            # This file system (or folder) cannot swap: its files are written as usual from now on.
            _pools.pop(prefix, None)
            if e.errno == errno.EXDEV:
                spares.give(spare)
                return False
        elif e.errno != errno.ENOENT:  # gone meanwhile: the spare takes its place, as a rename would
            spares.give(spare)
            raise
        _rename(spare, path, replace=True)
    except BaseException:
        spares.give(spare)
        raise
    else:
        _took(spares, spare, path)
    _wrote(path, st, bytes(data))
    if sync:
        fsync_dir(os.path.dirname(path) or ".")
    return True


def _took(spares: _Spares, spare: str, path: str) -> None:
    """After a swap: what came out of `path` into `spare` becomes a spare if it is a regular file
    of one name (as the lstat before it said; something put in its place since is looked at
    again). A folder goes back where it was, as a rename over it would have failed."""
    try:
        out = os.lstat(spare)
    except OSError:
        return
    if stat.S_ISDIR(out.st_mode):
        _swap(spare, path)
        spares.give(spare)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if stat.S_ISREG(out.st_mode) and out.st_nlink == 1:
        spares.give(spare)
    else:
        spares.drop(spare)  # a link, or a file with other names: only our name of it goes


def put(target: Path | str, data: bytes, mode: int = 0o444) -> None:
    """Atomically place `data` at `target` (temp file, fsync, rename), never noted in a journal:
    for git's own files in state/.git (a batch's pack of blobs), which no batch stages, and a
    file the tamper watch puts back as git has it. The folder is not synced, as git does not
    sync it for a pack or a checkout."""
    _, tmp, _ = _temp_written(target, data, mode, sync=True)
    try:
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# Text that is not all Unicode (a lone surrogate an agent's or a model's JSON carried) is
# written as its escape, never refused: a state write must not fail on what was said. In
# JSON the escape is the same text again ("\ud800" reads back as it was).
def write_text(target: Path, text: str, *, sync: bool = True) -> None:
    write_bytes(target, text.encode("utf-8", "backslashreplace"), sync=sync)


def write_json(target: Path, data: Any, *, sync: bool = True) -> None:
    write_bytes(target, dumps(data).encode("utf-8", "backslashreplace"), sync=sync)


# Built once: json.dumps with options makes a new encoder per call, and a record's file is
# some 30 calls. Where the C encoder is there, it is called directly: `JSONEncoder.encode`
# made one per call all the same (its set-up was half of a small value's cost). No check for
# cycles: state is made of what JSON files and the supervisor's own records hold.
_encoder = json.JSONEncoder(sort_keys=True, ensure_ascii=False)
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode = None if _c_encoder is None else _c_encoder(
    None, _encoder.default, json.encoder.encode_basestring, None, _encoder.key_separator,
    _encoder.item_separator, True, False, True)


def _compact(value: Any) -> str:
    if _c_encode is None:  # a Python without the C accelerator
        return _encoder.encode(value)
    return "".join(_c_encode(value, 0))


_string = json.encoder.encode_basestring  # what that encoder writes for a str (ensure_ascii=False)
# The start of a top-level key's line, by key: state files have a few dozen keys between them,
# each written on every write (a record's 25, some three times an order). Bounded all the same.
_key_lines: dict[str, str] = {}
KEY_LINES = 512


def dumps(data: Any) -> str:
    """JSON for state files: one top-level key per line (sorted) and one line per entry of
    a list of objects (a record's history), so a change is a readable one-line diff.

    Each line is encoded by the C encoder; `indent=` would use the slow pure-Python one.
    """
    if not isinstance(data, dict) or not data:
        return _compact(data) + "\n"
    lines = []
    for key in sorted(data):
        value = data[key]
        kind = type(value)
        # Strings, whole numbers and null written as the encoder would, without making one: its
        # set-up was most of a record's cost (some 20 keys, written twice or more per order).
        if kind is str:
            text = _string(value)
        elif kind is int:
            text = int.__repr__(value)
        elif value is None:
            text = "null"
        elif kind is bool:
            text = "true" if value else "false"
        elif kind is list and not value:  # most of a record's lists
            text = "[]"
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            text = "[\n" + ",\n".join(["    " + _compact(v) for v in value]) + "\n  ]"
        else:
            text = _compact(value)
        start = _key_lines.get(key) if type(key) is str else None
        if start is None:
            start = f"  {_string(key) if type(key) is str else _compact(key)}: "
            if type(key) is str and len(_key_lines) < KEY_LINES:
                _key_lines[key] = start
        lines.append(start + text)
    return "{\n" + ",\n".join(lines) + "\n}\n"


def create(target: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `target` in place, created or truncated (not atomic, not synced: for
    files nobody reads before the writer is done, like an attempt's brief)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def read_fd(fd: int, limit: int, offset: int | None = None) -> bytes:
    """Up to `limit` bytes of the open file `fd` (from `offset`; else from where it stands),
    in as few reads as the file allows: no buffered file object around it (its fstat, isatty
    probe and seek are three more system calls per small file read on the hot path)."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16)) if offset is None else os.pread(fd, min(left, 1 << 16), offset)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
        if offset is not None:
            offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def open_beneath(root: Path, path: Path) -> tuple[int, int]:
    """(fd of `path`'s folder, fd of `path` opened for reading), reached from `root` one name
    at a time and never through a link; OSError when any step is a link, no folder or gone.
    The folder's fd stays valid for removing the file, whatever is renamed meanwhile."""
    folder = folder_beneath(root, path)
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except BaseException:
        os.close(folder)
        raise
    return folder, fd


def folder_beneath(root: Path, path: Path) -> int:
    """The fd of `path`'s folder, reached from `root` as `open_beneath` does; `path` itself
    is not opened (it may be a link, to be looked at or removed, never followed)."""
    rel = path.relative_to(root).parts
    if not rel:
        raise IsADirectoryError(errno.EISDIR, "no file", str(path))
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in rel[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            os.close(folder)
            folder = inner
    except BaseException:
        os.close(folder)
        raise
    return folder


def read_json(target: Path | str) -> Any:
    """A JSON file's data, read with plain system calls (a backlog's start reads 10,000 records)."""
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = read_fd(fd, 1 << 40)
    finally:
        os.close(fd)
    return json.loads(data)


def move(src: Path, dst: Path, *, sync: bool = True, data: bytes | None = None) -> None:
    """Rename `src` to `dst` (same file system) and make the rename durable. `data`: the
    file's bytes where the caller has read them (no read here): committed as the supervisor's
    should `dst` change by hand before the commit (see `Wrote`)."""
    st = None
    if _journals:
        with contextlib.suppress(OSError):  # the rename says it
            st = os.lstat(src)  # kept by the rename: what `dst` is checked against (`Wrote`)
    if st is not None and not stat.S_ISREG(st.st_mode):
        st = None
    stamp = None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)
    note(src)
    note(dst, stamp)
    _rename(src, dst, replace=False)
    if st is not None:
        _wrote(os.fspath(dst), st, data if data is not None and len(data) == st.st_size else None)
    if sync:
        fsync_dir(dst.parent)
        if src.parent != dst.parent:
            fsync_dir(src.parent)


def append_line(target: Path, line: str) -> None:
    """Append one line durably (O_APPEND writes of one line are not interleaved)."""
    note(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        data = (line.rstrip("\n") + "\n").encode("utf-8")
        _append_whole(fd, data)
        os.fsync(fd)
        st = os.fstat(fd) if _journals else None
    finally:
        os.close(fd)
    if st is not None:
        _appended(os.fspath(target), st, data)


def clean_temps(folder: Path) -> int:
    """Remove temp files a crash left behind in `folder`; returns how many."""
    n = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    n += 1
    return n


def sync_fs(folder: Path) -> None:
    """Flush every write on `folder`'s file system at once (group durability for a loop step)."""
    import ctypes

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    except (AttributeError, OSError):
        os.sync()
    finally:
        os.close(fd)


# -- trees a specialist wrote ---------------------------------------------------------------------
# A specialist controls the shape of what it leaves: folders nested thousands deep (Python 3.11's
# shutil.rmtree and os.walk recurse, and die with RecursionError), paths over PATH_MAX, folders it
# locked. These go through such a tree with an explicit stack, each folder opened relative to its
# parent's descriptor, so neither depth nor path length matters, and only one folder is open at a
# time: `..` leads back up, checked against the folder that was left.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: Path) -> None:
    """Remove `path` and everything below it; a link is removed, never followed.

    Folders the agent locked get owner rwx back first. Another file system mounted inside
    is never entered (as `rm -rf --one-file-system`). Raises OSError naming where it stopped
    when anything could not be removed: nothing is half removed silently.
    """
    _through(path, remove=True)


def unlock_tree(path: Path) -> None:
    """Give the owner rwx on every folder under `path` (an agent may have locked some)."""
    _through(path, remove=False)


def _through(path: Path, *, remove: bool) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        if remove:
            os.unlink(path)
        return
    if st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
        os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    fd = os.open(path, _DIR_FLAGS)
    # One frame per folder on the way down: its name in its parent, its identity, and its
    # subfolders still to go through.
    stack: list[tuple[str, tuple[int, int], list[str]]] = []
    try:
        _push(stack, "", fd, remove=remove)
        while True:
            name, _, todo = stack[-1]
            if todo:
                sub = todo.pop()
                child = _enter(fd, sub, st.st_dev)
                os.close(fd)
                fd = child
                _push(stack, sub, fd, remove=remove)
                continue
            stack.pop()
            if not stack:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            if _identity(fd) != stack[-1][1]:
                raise OSError(errno.ESTALE, "a folder moved while the tree was gone through")
            if remove:
                os.rmdir(name, dir_fd=fd)
    except OSError as e:
        names = [frame[0] for frame in stack[1:]] + ([e.filename] if isinstance(e.filename, str) else [])
        where = "/".join(names)
        if len(where) > 160:  # thousands of levels: the ends say enough
            where = f"{where[:60]}/.../{where[-60:]} ({len(stack) - 1} levels down)"
        what = "remove" if remove else "unlock"
        raise OSError(e.errno, f"cannot {what} {os.path.join(path, where)}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if remove:
        os.rmdir(path)


def _push(stack: list[tuple[str, tuple[int, int], list[str]]], name: str, fd: int, *, remove: bool) -> None:
    todo: list[str] = []
    stack.append((name, _identity(fd), todo))  # first: an error in what follows names this folder
    todo += _entries(fd, remove=remove)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _entries(fd: int, *, remove: bool) -> list[str]:
    """The subfolders of the open folder `fd`; with `remove`, all else in it is unlinked."""
    with os.scandir(fd) as it:
        items = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    if remove:
        for name, is_dir in items:
            if not is_dir:
                os.unlink(name, dir_fd=fd)
    return [name for name, is_dir in items if is_dir]


def _enter(fd: int, name: str, device: int) -> int:
    """Open subfolder `name` of `fd`, owner rwx given back first; never onto another file system."""
    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if st.st_dev != device:
        raise OSError(errno.EXDEV, f"{name} is another file system mounted there; not entered")
    if st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
        # Linux's fchmodat cannot refuse to follow a link, but the lstat above saw a folder and
        # nothing runs in the tree any more; O_NOFOLLOW below fails if that changed meanwhile.
        os.chmod(name, stat.S_IMODE(st.st_mode) | stat.S_IRWXU, dir_fd=fd)
    return os.open(name, _DIR_FLAGS, dir_fd=fd)
