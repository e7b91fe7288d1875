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

A namespace is kept for the starts after its first (`Layer`, `Layers`): tearing one down
makes the kernel wait out an expedited RCU grace period, an interrupt on every core, so a
namespace per start cost a tenth of the machine at a few hundred starts a second. The fork
server gives a layer back only when nothing of the attempt that used it is left (no process
below the server but leaders of running attempts: nothing can live on in it), and the next
start in it first makes the copies of the one before read-only, then puts its own back.
A layer serves LAYER_USES starts at most and is dropped LAYER_AGE seconds after it was made:
its mounts are the machine's as they were then.

Example (in a thread that is about to spawn, never in the supervisor's own thread):
    >>> enter_readonly(("/w/.coordinator/attempts/WO-1/1", "/w/.coordinator/work/WO-1/web/src"))
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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
_AT_EMPTY_PATH = 0x1000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MS_PRIVATE = 1 << 18

LAYER_USES = 32  # starts one namespace serves: each leaves its copies behind (read-only)
LAYER_AGE = 2.0  # seconds a namespace is used for after it was made (it saw the mounts of then)
LAYERS_FREE = 32  # namespaces kept between starts (some 4 descriptors each), for as many at once


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


def enter_readonly(writable: Sequence[str], resolved: Mapping[str, str] | None = None) -> list[int]:
    """Give the calling thread a mount namespace where only `writable` can be written
    (`resolved`: the real paths of some of them, found already); returns a descriptor of each
    copy put back writable (`outermost`), the caller's to close: what `Layer` seals them by.

    The thread's current folder is left on the old mount: enter the working folder afterwards.
    """
    if libc().unshare(_CLONE_NEWNS) != 0:
        raise SandboxError(f"read-only sandbox: unshare: {os.strerror(ctypes.get_errno())}")
    # Nothing done here may reach the machine's mounts through propagation.
    _setattr_all(_MountAttr(0, 0, _MS_PRIVATE, 0))
    copies = _copies(writable, resolved)
    try:
        _setattr_all(_MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0))
        _put_back(copies)
    except BaseException:
        _close(fd for _, fd in copies)
        raise
    return [fd for _, fd in copies]


def _close(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _copies(writable: Sequence[str], resolved: Mapping[str, str] | None) -> list[tuple[str, int]]:
    """A detached copy of each outermost writable path, taken in the calling thread's namespace."""
    copies: list[tuple[str, int]] = []
    try:
        for path in outermost(writable, resolved):
            fd = _call(f"copy {path}", _SYS_OPEN_TREE, ctypes.c_int(_AT_FDCWD), os.fsencode(path),
                       ctypes.c_uint(_OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC))
            copies.append((path, fd))
    except BaseException:
        for _, fd in copies:
            os.close(fd)
        raise
    return copies


def _put_back(copies: list[tuple[str, int]]) -> None:
    for path, fd in copies:
        _call(f"put back {path}", _SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(_AT_FDCWD),
              os.fsencode(path), ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH))


class StaleLayer(SandboxError):
    """A kept namespace could not be made ready for another start: start in a new one."""


@dataclass
class Layer:
    """A read-only mount namespace kept for more starts (see the module docstring)."""

    fd: int  # the namespace, held open
    ino: int  # its identity (what /proc/PID/ns/mnt of a process in it shows)
    made: float  # when, on the monotonic clock
    # The copies the last start in it put back writable, held open: sealed by these, not by
    # their paths, since a folder renamed on the machine takes its copy along to the new name.
    writable: list[int]
    uses: int = 1

    @classmethod
    def here(cls, writable: list[int], now: float) -> Layer:
        """The calling thread's namespace (made by `enter_readonly`, whose copies are
        `writable`), kept."""
        fd = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        return cls(fd, os.fstat(fd).st_ino, now, writable)

    def enter(self, writable: Sequence[str], resolved: Mapping[str, str] | None = None) -> None:
        """Move the calling thread (its own file-system context already) into this namespace,
        where the paths of the start before are read-only now and only `writable` can be written.
        Raises StaleLayer when it cannot: nothing may start in it then."""
        copies = _copies(writable, resolved)  # from the machine's mounts, before leaving them
        try:
            if libc().setns(self.fd, _CLONE_NEWNS) != 0:
                raise StaleLayer(f"read-only sandbox: setns: {os.strerror(ctypes.get_errno())}")
            for fd in self.writable:
                _seal(fd)
            _put_back(copies)
        except BaseException as e:
            _close(fd for _, fd in copies)
            if isinstance(e, SandboxError):
                raise StaleLayer(str(e)) from None
            raise
        _close(self.writable)
        self.writable = [fd for _, fd in copies]
        self.uses += 1


def _seal(copy: int) -> None:
    """Make the copy `copy` (put back by an earlier start) read-only, with all below it. No
    longer in this namespace (its folder was removed, which took the copy along): nothing
    there to seal."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    try:
        syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(copy), b"", ctypes.c_uint(_AT_EMPTY_PATH | _AT_RECURSIVE),
                ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: in no namespace of ours any more
            raise SandboxError(f"read-only sandbox: seal a copy: {e.strerror}") from None


class Layers:
    """The fork server's kept namespaces that no attempt uses now. Only its own thread calls it."""

    def __init__(self) -> None:
        self.free: list[Layer] = []

    def take(self, now: float) -> Layer | None:
        """A kept namespace to start in, or None: make a new one."""
        self.expire(now)
        return self.free.pop() if self.free else None

    def give_back(self, layer: Layer, now: float) -> None:
        """`layer` served an attempt of which nothing is left: it may serve another."""
        if layer.uses >= LAYER_USES or now - layer.made >= LAYER_AGE or len(self.free) >= LAYERS_FREE:
            drop(layer)
        else:
            self.free.append(layer)

    def expire(self, now: float) -> None:
        """Drop the namespaces too old to start in (they would hold the machine's old mounts)."""
        if self.free and now - min(layer.made for layer in self.free) >= LAYER_AGE:
            old = [layer for layer in self.free if now - layer.made >= LAYER_AGE]
            self.free = [layer for layer in self.free if now - layer.made < LAYER_AGE]
            for layer in old:
                drop(layer)

    def clear(self) -> None:
        for layer in self.free:
            drop(layer)
        self.free = []


def drop(layer: Layer) -> None:
    """Let `layer` go: it ends with the last process in it (at once when there is none)."""
    _close([layer.fd, *layer.writable])
    layer.writable = []


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
