"""The system-call layer of the sandbox: a seccomp filter against setuid files and file leases.

Two things a specialist must not do pass both Landlock and the read-only mounts:

- make a setuid or setgid file in a folder it may write. Landlock has no right for
  chmod, and a specialist of a root supervisor is uid 0: `chmod 4755` on its own copy
  of a program leaves a file any local user runs as root, in a folder (its attempt
  folder, `sandbox.writable`) that is kept after the run and that the gate never reads;
- take a file lease (fcntl F_SETLEASE) on a file it may read, such as `state/`'s git
  logs: every write of the supervisor to it then waits the kernel's lease-break-time
  (45 s), and the lease is taken again at once.

So the thread that starts a sandboxed specialist installs, after the Landlock ruleset (which
set no_new_privs, as a filter needs), a classic BPF filter the child inherits. It refuses
with EPERM: chmod, fchmod, fchmodat and fchmodat2 with S_ISUID or S_ISGID in the mode;
open, creat and openat that create a file (O_CREAT or O_TMPFILE) with those bits; mknod and
mknodat with them; fcntl setting a lease or a delegation. openat2 (its mode sits behind a
pointer a filter cannot read) and io_uring_setup (io_uring's operations pass no filter) fail
with ENOSYS, as on a kernel without them: programs that try openat2 fall back to openat.
Everything else is allowed.

The numbers are known for x86_64 (with the i386 calls a 64-bit process can make too; x32
calls are refused) and aarch64 (with its 32-bit ARM calls). On another machine nothing is
installed, and `status()` (so `coordinator doctor`) says that the guard is not active.

Example (in a thread about to spawn, after `landlock.enforce`; never in the supervisor's):
    >>> install()
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
import threading
from typing import Any

from .errors import SandboxError
from .landlock import libc

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

# Classic BPF opcodes: load a word of seccomp_data, compare the accumulator with k, return k.
_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
# struct seccomp_data: nr, arch, instruction pointer, then six 64-bit arguments. Every
# architecture below is little-endian: an argument's low 32 bits (a mode, flags or an fcntl
# command; the kernel ignores the high ones) are the word at 16 + 8 * i.
_NR, _ARCH = 0, 4


def _arg(i: int) -> int:
    return 16 + 8 * i


_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_I386 = 0x40000003
_AUDIT_ARCH_AARCH64 = 0xC00000B7
_AUDIT_ARCH_ARM = 0x40000028
_X32_SYSCALL_BIT = 0x40000000

_SETID = stat.S_ISUID | stat.S_ISGID
_CREATES = 0o100 | 0o20000000  # O_CREAT | __O_TMPFILE, the same on all four ABIs
_LEASES = (1024, 1040)  # F_SETLEASE, and F_SETDELEG of newer kernels: both take a lease

# What a call is checked for: ("mode", i) the mode in argument i; ("create", f, m) the mode in
# argument m when the flags in argument f create a file; ("lease", i) the fcntl command in
# argument i; ("nosys",) refused outright.
_Check = tuple[Any, ...]
_OPEN, _OPENAT = ("create", 1, 2), ("create", 2, 3)
_FCNTL, _NOSYS = ("lease", 1), ("nosys",)
_MODE1, _MODE2 = ("mode", 1), ("mode", 2)
# The same numbers on every architecture (calls added after 5.0 share one table).
_COMMON: dict[str, tuple[int, _Check]] = {
    "io_uring_setup": (425, _NOSYS), "openat2": (437, _NOSYS), "fchmodat2": (452, _MODE2)}
# Per ABI, from the kernel's syscall tables: name -> (number, check).
_TABLES: dict[int, dict[str, tuple[int, _Check]]] = {
    _AUDIT_ARCH_X86_64: {
        "open": (2, _OPEN), "fcntl": (72, _FCNTL), "creat": (85, _MODE1), "chmod": (90, _MODE1),
        "fchmod": (91, _MODE1), "mknod": (133, _MODE1), "openat": (257, _OPENAT), "mknodat": (259, _MODE2),
        "fchmodat": (268, _MODE2), **_COMMON},
    _AUDIT_ARCH_I386: {
        "open": (5, _OPEN), "creat": (8, _MODE1), "mknod": (14, _MODE1), "chmod": (15, _MODE1),
        "fcntl": (55, _FCNTL), "fchmod": (94, _MODE1), "fcntl64": (221, _FCNTL), "openat": (295, _OPENAT),
        "mknodat": (297, _MODE2), "fchmodat": (306, _MODE2), **_COMMON},
    _AUDIT_ARCH_AARCH64: {
        "fcntl": (25, _FCNTL), "mknodat": (33, _MODE2), "fchmod": (52, _MODE1), "fchmodat": (53, _MODE2),
        "openat": (56, _OPENAT), **_COMMON},
    _AUDIT_ARCH_ARM: {
        "open": (5, _OPEN), "creat": (8, _MODE1), "mknod": (14, _MODE1), "chmod": (15, _MODE1),
        "fcntl": (55, _FCNTL), "fchmod": (94, _MODE1), "fcntl64": (221, _FCNTL), "openat": (322, _OPENAT),
        "mknodat": (324, _MODE2), "fchmodat": (333, _MODE2), **_COMMON},
}
# The machines (uname) whose own calls the tables cover; elsewhere nothing is installed.
MACHINES = ("x86_64", "aarch64")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# One instruction before assembly: (code, k, jump if true, jump if false); a jump is a label
# or None (the next instruction). A label is a str standing alone in the list.
_Insn = tuple[int, int, str | None, str | None]


def _program() -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions: per ABI, each guarded call jumps to its check."""
    code: list[_Insn | str] = [(_LD_ABS, _ARCH, None, None)]
    code += [(_JEQ, arch, f"abi-{arch}", None) for arch in _TABLES]
    code.append((_RET, _RET_ALLOW, None, None))  # an ABI we do not know: nothing is checked
    checks: dict[_Check, None] = {}
    for arch, table in _TABLES.items():
        code += [f"abi-{arch}", (_LD_ABS, _NR, None, None)]
        if arch == _AUDIT_ARCH_X86_64:
            code.append((_JGE, _X32_SYSCALL_BIT, "enosys", None))
        for nr, check in sorted(table.values()):
            code.append((_JEQ, nr, _label(check), None))
            checks[check] = None
        code.append((_RET, _RET_ALLOW, None, None))
    for check in checks:
        code.append(_label(check))
        if check[0] == "mode":
            code += [(_LD_ABS, _arg(check[1]), None, None), (_JSET, _SETID, "eperm", "allow")]
        elif check[0] == "create":
            code += [(_LD_ABS, _arg(check[1]), None, None), (_JSET, _CREATES, None, "allow"),
                     (_LD_ABS, _arg(check[2]), None, None), (_JSET, _SETID, "eperm", "allow")]
        elif check[0] == "lease":
            code += [(_LD_ABS, _arg(check[1]), None, None)]
            code += [(_JEQ, cmd, "eperm", None) for cmd in _LEASES]
            code.append((_RET, _RET_ALLOW, None, None))
        else:
            code.append((_RET, _RET_ERRNO | errno.ENOSYS, None, None))
    code += ["eperm", (_RET, _RET_ERRNO | errno.EPERM, None, None),
             "enosys", (_RET, _RET_ERRNO | errno.ENOSYS, None, None),
             "allow", (_RET, _RET_ALLOW, None, None)]
    return _assemble(code)


def _label(check: _Check) -> str:
    return "check-" + "-".join(map(str, check))


def _assemble(code: list[_Insn | str]) -> list[tuple[int, int, int, int]]:
    """Resolve labels into the forward offsets classic BPF jumps by (at most 255)."""
    where: dict[str, int] = {}
    insns: list[_Insn] = []
    for item in code:
        if isinstance(item, str):
            where[item] = len(insns)
        else:
            insns.append(item)
    out = []
    for pc, (op, k, jt, jf) in enumerate(insns):
        offsets = [0 if to is None else where[to] - pc - 1 for to in (jt, jf)]
        if not all(0 <= off <= 255 for off in offsets):
            raise SandboxError(f"seccomp filter: a jump at {pc} is out of reach ({offsets})")
        out.append((op, offsets[0], offsets[1], k))
    return out


@functools.cache
def _fprog() -> tuple[_SockFprog, Any]:
    """The filter ready for the kernel, built once (it is on every spawn's path)."""
    insns = _program()
    array = (_SockFilter * len(insns))(*(_SockFilter(op, jt, jf, k) for op, jt, jf, k in insns))
    return _SockFprog(len(insns), array), array  # the array must outlive every use of the prog


def supported() -> bool:
    """Whether the filter knows the calls of this machine."""
    return os.uname().machine in MACHINES


def install() -> None:
    """Restrict the calling thread (and what it spawns) by the filter; SandboxError if the kernel
    refuses it. The thread must have no_new_privs (`landlock.enforce` sets it). Does nothing on a
    machine the filter does not know (see `status`)."""
    if not supported():
        return
    prog, _array = _fprog()
    zero = ctypes.c_ulong(0)
    if libc().prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(prog),
                    zero, zero) != 0:
        raise SandboxError(f"cannot install the seccomp filter (setuid files, file leases): "
                           f"{os.strerror(ctypes.get_errno())}; refusing to start without it")


def status() -> str | None:
    """None when the guard works here, else why not (tried once, in a throwaway thread)."""
    if not supported():
        return f"the filter does not know this machine's system calls ({os.uname().machine})"
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            zero = ctypes.c_ulong(0)
            if libc().prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), zero, zero, zero) != 0:
                raise SandboxError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")
            install()
            # No file is needed: a refused lease on fd -1 is EPERM, a call that got through EBADF.
            ctypes.set_errno(0)
            if libc().fcntl(-1, _LEASES[0], 0) == 0 or ctypes.get_errno() != errno.EPERM:
                raise SandboxError(f"the filter is installed but a lease is not refused "
                                   f"({os.strerror(ctypes.get_errno())})")
            outcome.append(None)
        except SandboxError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=probe, name="seccomp-probe")
    thread.start()
    thread.join()
    return outcome[0] if outcome else "the probe thread ended without a result"
