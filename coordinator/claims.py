"""Claims: taking a dropped file out of an inbox, or an outbox, exactly once.

A file is claimed by one atomic rename out of `inbox/<agent>/` into
`state/intake/<agent>/`, or by a durable copy when the inbox folder is another file
system; `intake` then files what was claimed.

A claim by copy (an outbox file, an inbox on another file system) cannot be one
step: the copy is written, then the original removed. Which file the copy is of
(where, and its device, inode, size and mtime) is noted next to the copy before
the copy is written, so a crash between the two leaves nothing ambiguous: the
next start removes the original if it is still that very file, and only then
files the copy (`release_origin`). Either way the order is filed once. An inbox file
on another file system is first renamed to a hidden name within its own folder, so that of
two supervisors sharing that folder only one takes it (`_claim_across`).

Every read of intake stops at MAX_READ bytes (`read_capped`): a bigger file is
refused by its size, never read whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from . import durable, orders
from .inboxfiles import is_candidate

MAX_READ = orders.MAX_ORDER_BYTES + 1


def claim(path: Path, folder: Path, root: Path, *, note: dict[str, Any] | None = None) -> Path | None:
    """Rename `path` out of the inbox into `folder` (its agent's in state/intake/); None when
    it vanished or another claimed it. `root`: the workspace (a claim across file systems
    notes where the file was relative to it). `note` (who sent it, as `claim_note` reads it)
    is written next to where it goes before it moves."""
    dest = folder / f"{time.time_ns():020d}-{_short_name(path.name)}"
    if os.path.islink(path.parent):  # never through a linked inbox folder
        return None
    if note is not None:
        folder.mkdir(parents=True, exist_ok=True)
        durable.write_json(note_of(dest), note, sync=False)
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
        return _claim_across(path, dest, root)
    _unshare(dest)
    return dest


def _unshare(claimed: Path) -> None:
    """Give a claimed file that has other names (a hard link a person keeps of what they
    dropped, a backup's or a sync tool's link) an inode of its own: through the link, their
    later edits changed the order's original in state/, which the tamper watch then reported
    as a hand edit of state/ (a false `silent` signal) and put back. A file too big to be an
    order is rejected as it is; a copy that does not fit on the disk leaves the file shared."""
    try:
        st = os.lstat(claimed)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink <= 1 or st.st_size >= MAX_READ:
            return
        data, size = read_capped(claimed)
        if size is not None:
            durable.write_bytes(claimed, data, sync=False, mode=stat.S_IMODE(st.st_mode))
    except OSError:
        pass


def unfiled(intake_dir: Path, filed: set[Path], root: Path) -> list[tuple[Path, str]]:
    """Files claimed into `intake_dir` but not yet filed (after a crash), oldest first, but
    those in `filed` (filed in memory already: not a leftover). A note (of a claim by
    copy) whose copy is gone, filed or never written, is removed; the inbox file a claim
    across file systems hid is first put back (`unhide`) if the copy was never written.
    `root`: the workspace."""
    found: list[tuple[Path, str]] = []
    with contextlib.suppress(FileNotFoundError):
        for agent_dir in sorted(os.scandir(intake_dir), key=lambda e: e.name):
            if agent_dir.is_dir():
                for entry in sorted(os.scandir(agent_dir.path), key=lambda e: e.name):
                    note = _NOTE.fullmatch(entry.name)
                    if note:
                        if not os.path.lexists(os.path.join(agent_dir.path, note.group(1))):
                            unhide(root, claim_note(Path(agent_dir.path, note.group(1))))
                            with contextlib.suppress(OSError):
                                os.unlink(entry.path)
                    elif (is_candidate(entry.name) or entry.name[:1].isdigit()) and Path(entry.path) not in filed:
                        found.append((Path(entry.path), agent_dir.name))
    return found


def claim_note(claimed: Path) -> dict[str, Any]:
    """What was noted of a claimed copy: by `claim_copy` its sender, source, size and
    origin, by a claim across file systems its origin only; {} for none."""
    try:
        note = durable.read_json(note_of(claimed))
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


class Unremovable(Exception):
    """A file could be read but not taken out of its folder: it is not taken at all (a copy
    delivered while the file stayed would be delivered again after a crash)."""


def claim_copy(path: Path, folder: Path, root: Path, *, sender: str, shown: str,
               within: Path | None = None) -> tuple[Path, int] | None:
    """Take a file a specialist wrote (its outbox) as a copy, never the file itself: a
    process of the attempt that kept it open could otherwise write on into state/.
    Returns the copy (at most MAX_READ bytes: all intake reads) and the file's size;
    None when it vanished or is no regular file (never through a link, never a FIFO);
    `Unremovable` when it cannot be removed from where it is.

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
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{time.time_ns():020d}-{_short_name(path.name)}"
        note = {"sender": sender, "source": shown, "size": size, "origin": _origin(root, box, path, st)}
        durable.write_json(note_of(dest), note, sync=False)
        try:
            durable.write_bytes(dest, data, sync=False)
        except OSError:  # the disk is full: the file stays in the outbox, and no note of it
            _unlink_quietly(note_of(dest))
            raise
        try:
            now = os.stat(path.name, dir_fd=folder_fd, follow_symlinks=False)
            # Another file renamed over it since it was read (by a process of the attempt that
            # outlived it) is an order of its own, never read: it stays.
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path.name, dir_fd=folder_fd)
        except FileNotFoundError:
            pass
        except OSError as e:  # made unremovable (an immutable file, a read-only outbox of a non-root run)
            _unlink_quietly(dest)
            _unlink_quietly(note_of(dest))
            raise Unremovable(e.strerror or str(e)) from e
        return dest, size
    finally:
        os.close(folder_fd)


def release_origin(root: Path, claimed: Path, note: dict[str, Any]) -> bool:
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
        _remove_if_same(root, origin)
    except OSError:
        _unlink_quietly(claimed)
        _unlink_quietly(note_of(claimed))
        return False
    if "sender" not in note:
        _unlink_quietly(note_of(claimed))
    return True


# The note `claim_copy` writes next to a copy: a dot-file, never taken for a claimed file.
_NOTE = re.compile(r"\.(\d{20}-.*)\.from", re.DOTALL)


def note_of(claimed: Path) -> Path:
    return claimed.with_name(f".{claimed.name}.from")


def _short_name(name: str) -> str:
    """`name` cut to fit behind the 21-byte claim prefix in NAME_MAX (255), its suffix kept."""
    raw = os.fsencode(name)
    if len(raw) > 200:
        raw = raw[:100] + b"~" + raw[-99:]
    return os.fsdecode(raw)


def _claim_across(path: Path, dest: Path, root: Path) -> Path | None:
    """Claim `path` from an inbox folder on another file system (a mount), where no rename
    reaches state/: first a rename within its own folder to a hidden name of this claim's own
    (atomic: of two supervisors sharing the inbox, one gets it; a copy alone let both take
    it, and the order ran in both), then a durable copy, then the hidden file goes. None when
    it vanished, or is no file nor link (put back under its name).

    What the claim hides, and under which name it was, is noted next to the copy before the
    rename: a crash before the copy is written puts it back (`unfiled`), one after it removes
    the hidden file (if it is still that file) before it files the copy (`release_origin`).
    Once the hidden file is gone the note has served."""
    note = note_of(dest)
    hidden = path.with_name(f".{dest.name}.claim")  # a dot-file: no scan, hint or claim takes it
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    durable.write_json(note, _hiding(root, path, hidden, st))  # synced: the file is hidden next
    try:
        os.rename(path, hidden)
        now = os.lstat(hidden)
    except OSError as e:  # taken by another meanwhile, or not ours to move (a read-only mount)
        _unlink_quietly(note)
        if e.errno == errno.ENOENT:
            return None
        raise
    if _identity(now) != _identity(st):  # replaced between the look and the rename
        durable.write_json(note, _hiding(root, path, hidden, now))
    try:
        copied = _copy_across(hidden, dest, now)
    except OSError:
        _put_back(hidden, path)
        _unlink_quietly(note)
        raise
    if not copied:
        _put_back(hidden, path)
        _unlink_quietly(note)
        return None
    try:
        os.unlink(hidden)
    except FileNotFoundError:
        pass
    except OSError:
        # It cannot go: so must the copy, or the order would be filed twice; it is put back.
        _unlink_quietly(dest)
        _put_back(hidden, path)
        _unlink_quietly(note)
        raise
    _unlink_quietly(note)
    return dest


def _hiding(root: Path, path: Path, hidden: Path, st: os.stat_result) -> dict[str, Any]:
    return {"origin": _origin(root, path.parent, hidden, st), "name": path.name}


def _copy_across(hidden: Path, dest: Path, st: os.stat_result) -> bool:
    """Copy the claimed file (or link) `hidden` to `dest`, durably; False when it is neither."""
    if stat.S_ISLNK(st.st_mode):  # the link itself is claimed, and filing refuses it
        os.symlink(os.readlink(hidden), dest)
        durable.fsync_dir(dest.parent)
        return True
    try:
        fd = os.open(hidden, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a link or a socket: not taken
            return False
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        data = durable.read_fd(fd, MAX_READ)  # all intake reads: a bigger one is refused by size
    finally:
        os.close(fd)
    durable.write_bytes(dest, data)  # synced: the original is gone next, on another disk
    return True


def _put_back(hidden: Path, path: Path) -> None:
    """Give a file a claim hid its name back; another file dropped under that name meanwhile
    keeps it, and this one gets a name of its own beside it. Never raises: what cannot be put
    back stays hidden (said by nobody) only if its folder refuses every rename and link.

    A link, never a rename, makes the name (a rename replaces a file dropped under it between
    a look and the move: that order was gone); the hidden name goes after. A crash between the
    two leaves both names on one file: the next put-back only removes the hidden one."""
    target = path
    for _ in range(3):
        try:
            if os.path.samestat(os.lstat(hidden), os.lstat(target)):
                _unlink_quietly(hidden)  # a put-back a crash cut short: it has its name already
                return
        except OSError:
            pass
        try:
            os.link(hidden, target, follow_symlinks=False)
        except FileExistsError:
            target = path.with_name(f"{time.time_ns():020d}-{_short_name(path.name)}")
            continue
        except OSError:  # a file system without hard links: the look, then the move
            with contextlib.suppress(OSError):
                if not os.path.lexists(target):
                    os.rename(hidden, target)
            return
        _unlink_quietly(hidden)
        return


def unhide(root: Path, note: dict[str, Any]) -> None:
    """Put back the file a claim across file systems hid (`_claim_across`) when a crash cut
    the claim off before its copy was written: it is still the order's one place. Whatever
    file has the hidden name is put back, whether or not it is the one the note describes
    (it was swapped between the claim's look and its rename): the name is this claim's own."""
    origin, name = note.get("origin"), note.get("name")
    if not isinstance(origin, dict) or not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
        return
    folder, rel = origin.get("folder"), origin.get("path")
    if not isinstance(folder, str) or not isinstance(rel, str) or ".." in Path(rel).parts:
        return
    hidden = root / folder / rel
    if not (hidden.name.startswith(".") and hidden.name.endswith(".claim")) or not os.path.lexists(hidden):
        return
    _put_back(hidden, hidden.parent / name)


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


def read_capped(claimed: Path) -> tuple[bytes, int | None]:
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
