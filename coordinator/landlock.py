"""The kernel layer of the sandbox: Landlock rulesets for specialist processes.

A ruleset lets a process read and execute everywhere and write only beneath
its `writable` entries. Every filesystem right the running kernel knows is
*handled* (so nothing is silently allowed), and from ABI 6 on signals and
abstract unix sockets are scoped, so a sandboxed process cannot signal the
supervisor or connect to its abstract sockets. Everything runs as root here, so
the thread that spawns a specialist also gives up every capability
(`drop_capabilities`): uid 0 without them is no more than any other user to the
kernel (no module loading, raw disk, network admin or mounts).

Never apply a ruleset to the supervisor itself: the spawner's fork server
prepares the ruleset (`prepare`) and the forked child enforces it (`enforce`)
just before exec. Fail closed: any error is a `SandboxError`, and a ruleset is
applied whole or not at all.

Example:
    >>> fd = prepare(Ruleset(writable=("/tmp/wo-1",)))   # in the parent
    >>> enforce(fd)                                       # in the child, then execve
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SandboxError
from .paths import real, real_of

# Landlock has the same syscall numbers on every architecture we run on.
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_SETPCAP = 8
_CAPABILITY_VERSION_3 = 0x20080522

# (name, bit, first ABI that has it), from include/uapi/linux/landlock.h.
FS_RIGHTS: tuple[tuple[str, int, int], ...] = (
    ("execute", 1 << 0, 1),
    ("write_file", 1 << 1, 1),
    ("read_file", 1 << 2, 1),
    ("read_dir", 1 << 3, 1),
    ("remove_dir", 1 << 4, 1),
    ("remove_file", 1 << 5, 1),
    ("make_char", 1 << 6, 1),
    ("make_dir", 1 << 7, 1),
    ("make_reg", 1 << 8, 1),
    ("make_sock", 1 << 9, 1),
    ("make_fifo", 1 << 10, 1),
    ("make_block", 1 << 11, 1),
    ("make_sym", 1 << 12, 1),
    ("refer", 1 << 13, 2),
    ("truncate", 1 << 14, 3),
    ("ioctl_dev", 1 << 15, 5),
)
SCOPES: tuple[tuple[str, int, int], ...] = (
    ("abstract_unix_socket", 1 << 0, 6),
    ("signal", 1 << 1, 6),
)
_BIT = {name: bit for name, bit, _ in FS_RIGHTS}

READ = _BIT["execute"] | _BIT["read_file"] | _BIT["read_dir"]
# Rights that make sense on a file (the kernel refuses the others on a non-directory).
FILE_RIGHTS = _BIT["execute"] | _BIT["write_file"] | _BIT["read_file"] | _BIT["truncate"] | _BIT["ioctl_dev"]
# Never granted, even under a writable directory: a root process could mknod a
# block device there and write the raw disk, or ioctl a device it opened.
NEVER = _BIT["make_char"] | _BIT["make_block"] | _BIT["ioctl_dev"]
FILE_WRITE = _BIT["write_file"] | _BIT["truncate"]

# Device files every program may write (`cmd >/dev/null` must keep working).
DEVICE_FILES = ("/dev/null", "/dev/zero", "/dev/full")
# Granting write on these would undo the sandbox.
FORBIDDEN_WRITABLE = ("/", "/dev", "/proc", "/sys")

# The newest ABI this module knows; a newer kernel may have rights we cannot handle yet.
KNOWN_ABI = 7
# Size of struct landlock_ruleset_attr as each ABI knows it: fs; + net (v4); + scoped (v6).
_ATTR_SIZE = {1: 8, 2: 8, 3: 8, 4: 16, 5: 16}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@functools.cache
def libc() -> Any:
    """The C library (errno kept), loaded once: the sandbox and the fork server call into it."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    lib.prctl.restype = ctypes.c_int
    return lib


def syscall(number: int, *args: Any) -> int:
    """A raw system call; OSError with the errno on failure (the sandbox layers share it)."""
    ctypes.set_errno(0)
    result: int = libc().syscall(ctypes.c_long(number), *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


@functools.cache
def abi_version() -> int:
    """The Landlock ABI of the running kernel; 0 when it has none (or it is disabled)."""
    try:
        return syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def handled_fs_rights(abi: int) -> int:
    """Every filesystem right ABI `abi` knows, so none is silently allowed."""
    return _bits(FS_RIGHTS, abi)


def handled_scopes(abi: int) -> int:
    return _bits(SCOPES, abi)


def _bits(table: tuple[tuple[str, int, int], ...], abi: int) -> int:
    bits = 0
    for _name, bit, since in table:
        if abi >= since:
            bits |= bit
    return bits


def _names(table: tuple[tuple[str, int, int], ...], bits: int) -> list[str]:
    return [name for name, bit, _ in table if bits & bit]


@dataclass(frozen=True)
class Ruleset:
    """Read and execute everywhere; write only beneath `writable` (absolute dirs or files).

    A file entry gets only the rights that apply to files. Each entry must exist
    when the ruleset is prepared: a rule binds to the inode, not the name.
    """

    writable: tuple[str, ...] = ()
    # Left writable by the read-only mount layer (`coordinator.mounts`); empty: `writable`.
    # Coarser than `writable` on purpose: a whole working copy is one mount, so a rename
    # between two of its writable folders is not a move across devices (the gate judges it).
    mounts_writable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for entry in dict.fromkeys((*self.writable, *self.mounts_writable)):  # each path once
            _check_absolute(entry)
            _check_allowed(entry, real(entry))


def _check_absolute(entry: str) -> None:
    if not os.path.isabs(entry):
        raise SandboxError(f"sandbox path {entry!r} is relative; give an absolute path")


def _check_allowed(entry: str, resolved: str) -> None:
    if resolved in FORBIDDEN_WRITABLE:
        raise SandboxError(f"sandbox path {entry!r} may not be writable: it would undo the sandbox")


def prepare(rules: Ruleset, abi: int | None = None) -> int:
    """Build the kernel ruleset for `rules`; returns its fd (close-on-exec; the caller closes it).

    Does not restrict anyone: the process that calls `enforce(fd)` is restricted.
    """
    return _build(rules.writable, abi, {})


def prepare_paths(writable: Sequence[str], abi: int, resolved: dict[str, str]) -> int:
    """`prepare(Ruleset(writable), abi)` opening each path once, not twice: each is checked as
    `Ruleset` checks it by where the descriptor its rule is then made from leads. For the fork
    server, whose requests carry a ruleset's paths as strings. `resolved` gets each path's real
    path (`coordinator.mounts` needs them too)."""
    opened: dict[str, int | OSError] = {}
    try:
        for entry in writable:
            if entry in opened:
                continue
            _check_absolute(entry)
            try:
                opened[entry] = fd = os.open(entry, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                opened[entry] = e
                resolved[entry] = os.path.realpath(entry)
            else:
                resolved[entry] = real_of(fd, entry)
            _check_allowed(entry, resolved[entry])
        return _build(tuple(writable), abi, opened)
    finally:
        for held in opened.values():
            if isinstance(held, int):
                os.close(held)


def _build(writable: tuple[str, ...], abi: int | None, opened: dict[str, int | OSError]) -> int:
    """The kernel ruleset granting `writable`; `opened`: those of them already open (O_PATH),
    or why they could not be."""
    abi = abi_version() if abi is None else abi
    if abi < 1:
        raise SandboxError("this kernel has no Landlock; the kernel sandbox cannot be enforced")
    handled = handled_fs_rights(abi)
    attr = _RulesetAttr(handled, 0, handled_scopes(abi))
    try:
        ruleset_fd = syscall(
            _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(_ATTR_SIZE.get(abi, 24)), ctypes.c_uint32(0)
        )
    except OSError as e:
        raise SandboxError(f"cannot create a Landlock ruleset: {e.strerror}") from None
    try:
        _allow(ruleset_fd, "/", READ & handled, must_exist=True)
        for device in DEVICE_FILES:
            _allow(ruleset_fd, device, (FILE_WRITE | _BIT["ioctl_dev"]) & handled, must_exist=False)
        for entry in writable:
            fd = opened.get(entry)
            if fd is None:
                _allow(ruleset_fd, entry, handled & ~NEVER, must_exist=True)
            elif isinstance(fd, OSError):
                raise _missing(entry, fd)
            else:
                _add_rule(ruleset_fd, entry, fd, handled & ~NEVER)
    except BaseException:
        os.close(ruleset_fd)
        raise
    return ruleset_fd


def _allow(ruleset_fd: int, path: str, rights: int, *, must_exist: bool) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        if not must_exist and e.errno == errno.ENOENT:
            return
        raise _missing(path, e) from None
    try:
        _add_rule(ruleset_fd, path, fd, rights)
    finally:
        os.close(fd)


def _missing(path: str, e: OSError) -> SandboxError:
    return SandboxError(f"sandbox path {path}: {e.strerror}; create it or remove it from sandbox.writable")


def _add_rule(ruleset_fd: int, path: str, fd: int, rights: int) -> None:
    """Grant `rights` beneath `path`, open (O_PATH) as `fd`."""
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        rule = _PathBeneathAttr(rights, fd)
        syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
    except OSError as e:
        raise SandboxError(f"cannot add sandbox rule for {path}: {e.strerror}") from None


def enforce(ruleset_fd: int) -> None:
    """Restrict the calling process (and everything it execs or forks) by a prepared ruleset.

    Sets no_new_privs first, as Landlock requires without CAP_SYS_ADMIN and as
    a setuid binary must not lift the sandbox. The kernel applies the ruleset
    atomically: on error nothing is applied, and we raise.
    """
    if libc().prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        code = ctypes.get_errno()
        raise SandboxError(f"cannot set no_new_privs: {os.strerror(code)}")
    try:
        syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))
    except OSError as e:
        raise SandboxError(f"cannot enforce the Landlock ruleset: {e.strerror}") from None


def drop_capabilities() -> None:
    """Leave the calling thread no capability to pass on through exec: its bounding set, from
    which root's exec takes its permitted and effective sets, emptied; no inheritable and no
    ambient ones. The sets are per thread, and a new thread starts with those of the thread
    that made it: the fork server calls it once in its own thread, which never execs and keeps
    its effective set, so every launcher thread it makes has nothing to pass on. Never call it
    in the supervisor's thread (git and the checks run from there).

    Emptying the bounding set needs CAP_SETPCAP. A process that is not root and lacks it is
    left its bounding set (its child gets capabilities only from a setuid or capable file,
    which the no_new_privs of `enforce` ignores); root without it is refused, never let
    through with its capabilities.
    """
    zero = ctypes.c_ulong(0)
    # Fails only on kernels before 4.3, which have no ambient set to clear.
    libc().prctl(ctypes.c_int(_PR_CAP_AMBIENT), ctypes.c_ulong(_PR_CAP_AMBIENT_CLEAR_ALL), zero, zero, zero)
    header, data = _CapHeader(_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc().capget(ctypes.byref(header), data) != 0:
        raise SandboxError(f"cannot read the capabilities to drop: {os.strerror(ctypes.get_errno())}")
    if data[0].inheritable or data[1].inheritable:
        data[0].inheritable = data[1].inheritable = 0
        if libc().capset(ctypes.byref(header), data) != 0:
            raise SandboxError(f"cannot clear the inheritable capabilities: {os.strerror(ctypes.get_errno())}")
    if not data[0].effective & (1 << _CAP_SETPCAP) and os.getuid() != 0 and os.geteuid() != 0:
        return
    prctl = _prctl()
    for cap in _bounding():
        if prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise SandboxError(f"cannot drop capability {cap} from the bounding set: "
                               f"{os.strerror(ctypes.get_errno())}; a root specialist would keep it")


@functools.cache
def _prctl() -> Any:
    """prctl(2) with its argument types declared once: this is on every spawn's path."""
    fn = ctypes.CDLL(None, use_errno=True)["prctl"]  # a function object of its own
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def _bounding() -> tuple[int, ...]:
    """The capabilities in the bounding set the spawning threads start with (the fork server's,
    which never changes): only those are dropped. A root started without capabilities (a
    container with all of them dropped) has nothing to give away, nor CAP_SETPCAP to do it."""
    prctl = _prctl()
    return tuple(cap for cap in range(_last_cap() + 1) if prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) == 1)


@functools.cache
def _last_cap() -> int:
    """The highest capability number the running kernel knows (newer kernels add some)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError) as e:
        raise SandboxError(f"cannot tell which capabilities this kernel has: {e}") from None


def restrict_self(rules: Ruleset) -> None:
    """Apply `rules` to the calling process for good; SandboxError if not fully enforced.

    Only for a process about to exec a specialist (never the supervisor).
    """
    ruleset_fd = prepare(rules)
    try:
        enforce(ruleset_fd)
    finally:
        os.close(ruleset_fd)


def status(*, gate_only_ok: bool = False) -> dict[str, Any]:
    """What the kernel layer does on this machine, for `coordinator doctor`."""
    abi = abi_version()
    if abi < 1:
        fallback = (
            "gate-only: no Landlock, writes outside the working copy are detected after the run, not stopped"
            if gate_only_ok
            else "none: sandboxed spawns are refused until gate-only is chosen"
        )
        return {"landlock": False, "abi": 0, "known_abi": KNOWN_ABI, "enforced": [], "scopes": [],
                "network": "not restricted", "fallback": fallback}
    return {
        "landlock": True,
        "abi": abi,
        "known_abi": KNOWN_ABI,
        "enforced": _names(FS_RIGHTS, handled_fs_rights(abi)),
        "scopes": _names(SCOPES, handled_scopes(abi)),
        "network": "not restricted",
        "fallback": None,
    }
