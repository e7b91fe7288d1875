"""The read-only layer of the sandbox: every mount read-only but the paths an attempt may write.

Landlock refuses writes, but changing the metadata of an existing file - chmod, chown,
utime, extended attributes - is not a right it knows: a specialist could make a file of
`state/` unreadable or set the setuid bit on one outside the workspace. The launching
thread of the fork server therefore enters a mount namespace of its own (the specialist
inherits it) in which every mount is read-only, and puts writable copies of the
ruleset's writable paths back where they were. Outside them such a change then fails
with EROFS, for root too; inside them the gate judges it after the run. A sandboxed
specialist cannot undo it: Landlock refuses it mount(2), and CAP_SYS_ADMIN, which
mount_setattr and open_tree need, is gone with every other capability before the exec
(`landlock.drop_capabilities`: the fork server's thread gave them up, and every launcher
thread it makes starts without them).

Needs CAP_SYS_ADMIN (the supervisor running as root) and mount_setattr (Linux 5.12).
`status()` says whether this machine has it; without it the Landlock layer still holds
and `coordinator doctor` says that metadata is not protected.

Example (in a thread that is about to spawn, never in the supervisor's own thread):
    >>> enter_readonly(("/w/.coordinator/attempts/WO-1/1", "/w/.coordinator/work/WO-1/web/src"))
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import SandboxError
from .landlock import libc, syscall
from .paths import real, within

# The same numbers on every architecture (syscalls added after 5.0 share one table).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
CLONE_FS = 0x00000200  # a thread's own current folder (and root): a mount namespace needs it
_CLONE_NEWNS = 0x00020000
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MS_PRIVATE = 1 << 18


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _call(what: str, number: int, *args: Any) -> int:
    try:
        return syscall(number, *args)
    except OSError as e:
        raise SandboxError(f"read-only sandbox: {what}: {e.strerror}") from None


def _setattr_all(attr: _MountAttr) -> None:
    """Change every mount of this thread's namespace at once (all or none)."""
    _call("mount_setattr /", _SYS_MOUNT_SETATTR, ctypes.c_int(_AT_FDCWD), b"/",
          ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


def outermost(paths: Sequence[str], resolved: Mapping[str, str] | None = None) -> list[str]:
    """The entries of `paths` not beneath another entry (a copy of one carries what is below).
    `resolved`: the real paths of some of them, found already."""
    known = resolved or {}
    kept: list[str] = []
    for path in sorted({known.get(p) or real(p) for p in paths}):
        if not any(within(path, k) for k in kept):
            kept.append(path)
    return kept


def enter_readonly(writable: Sequence[str], resolved: Mapping[str, str] | None = None) -> None:
    """Give the calling thread a mount namespace where only `writable` can be written
    (`resolved`: the real paths of some of them, found already).

    The thread's current folder is left on the old mount: enter the working folder afterwards.
    """
    if libc().unshare(_CLONE_NEWNS) != 0:
        raise SandboxError(f"read-only sandbox: unshare: {os.strerror(ctypes.get_errno())}")
    # Nothing done here may reach the machine's mounts through propagation.
    _setattr_all(_MountAttr(0, 0, _MS_PRIVATE, 0))
    copies: list[tuple[str, int]] = []
    try:
        for path in outermost(writable, resolved):
            fd = _call(f"copy {path}", _SYS_OPEN_TREE, ctypes.c_int(_AT_FDCWD), os.fsencode(path),
                       ctypes.c_uint(_OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC))
            copies.append((path, fd))
        _setattr_all(_MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0))
        for path, fd in copies:
            _call(f"put back {path}", _SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(_AT_FDCWD),
                  os.fsencode(path), ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH))
    finally:
        for _, fd in copies:
            os.close(fd)


@functools.cache
def status() -> str | None:
    """None when the read-only layer works here, else why not (tried once, in a throwaway thread)."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            if libc().unshare(CLONE_FS) != 0:
                raise SandboxError(f"unshare: {os.strerror(ctypes.get_errno())}")
            enter_readonly(())
            outcome.append(None)
        except SandboxError as e:
            outcome.append(str(e).removeprefix("read-only sandbox: "))

    thread = threading.Thread(target=probe, name="mounts-probe")
    thread.start()
    thread.join()
    return outcome[0] if outcome else "the probe thread ended without a result"
