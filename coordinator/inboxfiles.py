"""The files in an inbox: which could be work orders, which may be read now, how a name is shown.

`scan` lists an inbox's candidates oldest first, `settled` says whether one may be read
without seeing half of what a writer is writing (`Quiet` remembers, for it, since when each
file has looked the same), and `printable` turns a name (which need not be UTF-8 and may hold a
newline) into one line of text. `coordinator.watcher` tells the supervisor's loop when to look;
these say what it finds.

Example:
    >>> quiet = Quiet()
    >>> [p.name for p in scan(Path("inbox/chip")) if settled(p, quiet=quiet)]
    ['fix.md']
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import time
from collections.abc import Callable, Container
from pathlib import Path

from . import paths

# Editors write these next to the file being edited, and download and sync tools write a
# file under such a name until it is complete, then rename it: none of them is a work order
# (taken in, it was rejected for its suffix, and the tool's rename then failed: the order lost).
TEMP_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".tmp",
                 ".part", ".partial", ".crdownload", ".filepart", ".!sync", ".download")
TEMP_NAMES = frozenset({"4913"})  # vim probes whether a folder is writable with this name
QUIET = 1.0        # seconds a file must stay unchanged to be read where no lease can tell of its writer
FUTURE_SLACK = 2.0  # seconds a file's ctime may be ahead of this machine's clock before that is said


def is_candidate(name: str) -> bool:
    """Could a file of this name be a work order? Not a dot-file, not an editor's or a
    download or sync tool's temp file (`a.md.part`, rclone's `a.md.3f2a9c1b.partial`)."""
    if not name or name.startswith(".") or name in TEMP_NAMES:
        return False
    if name.startswith("#") and name.endswith("#"):  # emacs auto-save
        return False
    return not name.lower().endswith(TEMP_SUFFIXES)


def printable(name: str) -> str:
    """A file name as text that can be printed and stored on one line (a name need not be
    UTF-8, and may hold a newline): other bytes and control characters as escapes (a C1
    character or a bidirectional override as `\\u009b`, `\\u202e`: neither reaches a terminal)."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return paths.CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if m.group() < "\x80" else f"\\u{ord(m.group()):04x}", text)


def scan(folder: Path, *, others: list[Path] | None = None) -> list[Path]:
    """Candidate files now in `folder`, oldest (mtime) first; [] if it is missing.

    Plain files, and symbolic links (the supervisor rejects them, never following one);
    subfolders and other kinds with a candidate's name are left out, or put in `others`.
    """
    found, never = survey(folder)
    if others is not None:
        others += [folder / entry.name for entry in never if is_candidate(entry.name)]
    return found


def survey(folder: Path) -> tuple[list[Path], list[os.DirEntry[str]]]:
    """What one listing of the inbox `folder` holds: the candidate files `scan` returns, and
    each entry that is never taken in (`never_taken`), dot-files left out; ([], []) if it is
    missing or a link. The board counts the one and names the other, the supervisor says the
    folders: one rule for all of them, one listing."""
    found: list[tuple[int, str, Path]] = []
    never: list[os.DirEntry[str]] = []
    if os.path.islink(folder):  # an inbox replaced by a link: whatever it points to is not ours to take
        return [], []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    for entry in entries:
        if entry.name.startswith("."):  # files being written, or a system's own: never said
            continue
        try:
            if never_taken(entry):
                never.append(entry)
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
        except FileNotFoundError:  # claimed or removed since the listing
            continue
        found.append((mtime, entry.name, folder / entry.name))
    found.sort(key=lambda item: (item[0], item[1]))
    return [path for _, _, path in found], never


def never_taken(entry: os.DirEntry[str]) -> bool:
    """Is this entry of an inbox one the supervisor never takes in: a name no order has (an
    unfinished download, an editor's file), or a folder or other kind under an order's name?
    (Plain files and symbolic links with an order's name are taken in, a link to be refused.)"""
    return not is_candidate(entry.name) or not (entry.is_file(follow_symlinks=False) or entry.is_symlink())


def stray_folders(root: Path, agents: Container[str]) -> list[os.DirEntry[str]]:
    """The folders of inbox/ (`root`) that are no agent's inbox, by name: a typo (`inbox/Chip/`)
    or an agent since removed from coordinator.yaml. Nothing in them is taken in."""
    try:
        return sorted((e for e in os.scandir(root)
                       if not e.name.startswith(".") and e.name not in agents and e.is_dir(follow_symlinks=False)),
                      key=lambda e: e.name)
    except OSError:
        return []


class Quiet:
    """Since when each file has looked the same (size, mtime, ctime), on this process's
    monotonic clock: a file is quiet once it has stayed unchanged for `seconds` of it.

    Never the file's own stamps against the wall clock: on a network file system they are the
    server's clock, and a server whose clock ran an hour ahead of this machine's (or this
    clock set back) kept every finished order in the inbox for that hour, without a word (one
    whose clock ran behind let a file being written look quiet at once). A file whose ctime is
    ahead of this clock is said once (`say`), so a user sees the clocks disagree. Files
    forgotten: taken (`settled` said yes), gone, or not among those still waited for (`retain`).
    """

    def __init__(self, seconds: float = QUIET, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, say: Callable[[str], None] | None = None) -> None:
        self.seconds = seconds
        self._clock = clock
        self._wall = wall
        self._say = say
        # path -> (size, mtime_ns, ctime_ns) as last seen, monotonic time first seen so
        self._seen: dict[Path, tuple[tuple[int, int, int], float]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, path: Path, st: os.stat_result) -> bool:
        """Has `path`, which now stats as `st`, stayed unchanged for `seconds`?"""
        look = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        now = self._clock()
        seen = self._seen.get(path)
        if seen is None or seen[0] != look:
            if seen is None:
                self._say_if_ahead(path, st)
            self._seen[path] = (look, now)
            return False
        return now - seen[1] >= self.seconds

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def retain(self, paths: Container[Path]) -> None:
        """Forget every file not in `paths` (those no longer waited for)."""
        for path in [p for p in self._seen if p not in paths]:
            del self._seen[path]

    def _say_if_ahead(self, path: Path, st: os.stat_result) -> None:
        ahead = st.st_ctime - self._wall()
        if self._say is None or ahead <= FUTURE_SLACK:
            return
        self._say(f"WARNING: inbox/{printable(path.parent.name)}/{printable(path.name)} was changed "
                  f"{_span(ahead)} ahead of this machine's clock (a file server whose clock runs ahead, or "
                  f"this clock set back): it is taken in once it has stayed unchanged for {self.seconds:g}s, "
                  "whatever its times say")


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def settled(path: Path, *, quiet: Quiet | None = None, require_quiet: bool = False) -> bool:
    """May this file be read now, without seeing half of what a writer is writing?

    False while any process has it open for writing: on Linux a read lease is refused then
    (probed and released at once). Where leases are unsupported or not ours to take (another
    user's file), and always when `require_quiet` is set, the file must also have stayed
    unchanged (size, mtime, ctime) for `quiet.seconds` since `quiet` first saw it so: pass the
    same `quiet` at each look (without one, such a file is never settled). Pass
    `require_quiet=True` on network file systems (`--poll`), where a lease only sees writers on
    this machine. False for anything but a regular file (symlinks included) and for a file
    that is gone. PermissionError for a file this process may not read (another user's, mode
    0600): no wait makes it readable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except PermissionError:
        raise
    except OSError:
        if quiet is not None:
            quiet.forget(path)
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        writer = _writer_holds(fd)
        if writer is True:
            return False
        if writer is False and not require_quiet:
            ready = True
        else:
            # Size, mtime and ctime as this process saw them, timed on its own monotonic clock:
            # a writer can set mtime back or ahead (cp -p, touch -d), never ctime, and a file
            # server's ctime is on the server's clock, which need not be ours.
            ready = quiet is not None and quiet.check(path, st)
        if ready and quiet is not None:
            quiet.forget(path)  # taken now: nothing to remember of it
        return ready
    finally:
        os.close(fd)


def _writer_holds(fd: int) -> bool | None:
    """True if some process has the file open for writing, False if none, None if unknown."""
    setlease = getattr(fcntl, "F_SETLEASE", None)
    setsig = getattr(fcntl, "F_SETSIG", None)
    if setlease is None or setsig is None:
        return None
    try:
        # A writer opening the file while we hold the lease makes the kernel signal us, SIGIO by
        # default, which would kill the process. SIGURG is ignored unless someone handles it.
        fcntl.fcntl(fd, setsig, signal.SIGURG)
        fcntl.fcntl(fd, setlease, fcntl.F_RDLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        return None  # EINVAL: file system without leases; EACCES: not our file
    fcntl.fcntl(fd, setlease, fcntl.F_UNLCK)
    return False
