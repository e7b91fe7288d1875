"""The files in an inbox: which could be work orders, which may be read now, how a name is shown.

`scan` lists an inbox's candidates oldest first, `settled` says whether one may be read
without seeing half of what a writer is writing, and `printable` turns a name (which need not
be UTF-8 and may hold a newline) into one line of text. `coordinator.watcher` tells the
supervisor's loop when to look; these say what it finds.

Example:
    >>> [p.name for p in scan(Path("inbox/chip")) if settled(p, now=time.time())]
    ['fix.md']
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from pathlib import Path

from . import paths

# Editors write these next to the file being edited, and download and sync tools write a
# file under such a name until it is complete, then rename it: none of them is a work order
# (taken in, it was rejected for its suffix, and the tool's rename then failed: the order lost).
TEMP_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".tmp",
                 ".part", ".partial", ".crdownload", ".filepart", ".!sync", ".download")
TEMP_NAMES = frozenset({"4913"})  # vim probes whether a folder is writable with this name


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
    found: list[tuple[int, str, Path]] = []
    if os.path.islink(folder):  # an inbox replaced by a link: whatever it points to is not ours to take
        return []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if not is_candidate(entry.name):
            continue
        try:
            if not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                if others is not None:
                    others.append(folder / entry.name)
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
        except FileNotFoundError:  # claimed or removed since the listing
            continue
        found.append((mtime, entry.name, folder / entry.name))
    found.sort(key=lambda item: (item[0], item[1]))
    return [path for _, _, path in found]


def settled(path: Path, *, now: float, quiet: float = 1.0, require_quiet: bool = False) -> bool:
    """May this file be read now, without seeing half of what a writer is writing?

    False while any process has it open for writing: on Linux a read lease is refused then
    (probed and released at once). Where leases are unsupported or not ours to take (another
    user's file), and always when `require_quiet` is set, the file must also have been left
    unchanged (mtime and ctime; a future mtime counts as its ctime) for `quiet` seconds. `now`
    is wall-clock time (`time.time()`), the clock of file timestamps. Pass `require_quiet=True`
    on network file systems (`--poll`), where a lease only sees writers on this machine. False
    for anything but a regular file (symlinks included) and for a file that is gone.
    PermissionError for a file this process may not read (another user's, mode 0600): no wait
    makes it readable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except PermissionError:
        raise
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        writer = _writer_holds(fd)
        if writer is True:
            return False
        if writer is False and not require_quiet:
            return True
        # ctime as well: a writer can set mtime back (cp -p, touch -d), never ctime. And a
        # writer can set mtime ahead (cp -p or rsync -t of a file from a machine whose clock
        # runs ahead, an archive unpacked): waiting for quiet after that stamp kept the file
        # in the inbox until that date, without a word. Its ctime still says when it changed.
        changed = st.st_ctime if st.st_mtime > now else max(st.st_mtime, st.st_ctime)
        return now - changed >= quiet
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
