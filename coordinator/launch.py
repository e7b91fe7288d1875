"""The launch of one sandboxed child by the fork server (see `coordinator.forkserver`).

A `Launcher` checks a spawn request (no NUL byte, the command found the way a
shell would), prepares the child's Landlock ruleset and read-only mounts, and
posix_spawns it from a throwaway thread that first enters the child's folder,
its mounts, the ruleset and the seccomp filter (which it inherits from the thread
that makes it, `_FilteredMaker`): all of these apply to that thread only, so the
server itself stays unrestricted. The child is marked with
its attempt's token (``COORD_ATTEMPT``), starts in a new session with its
output on a pipe, and gets no capability through exec: the server's own thread
gave up the sets every launcher thread inherits, once, when the `Launcher` was
made.

A start can be armed ahead (`Launcher.arm`): its thread does all of the above but the
exec, then waits for `Armed.fire`, so the exec follows at once when the supervisor
says go; `Armed.cancel` ends it with nothing run.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from . import cpus, landlock, mounts, seccomp
from .errors import CoordinatorError, SandboxError
from .spawner import MARK, READ_CHUNK

_PR_SET_NO_NEW_PRIVS = 38


class Launcher:
    """Starts the fork server's children; made once, in the server's own thread."""

    def __init__(self, gate_only_ok: bool) -> None:
        # First: every thread made from here on, and every child, starts on the server's CPU.
        self.cpus = cpus.Cpus.here()
        self.gate_only_ok = gate_only_ok
        self.abi = landlock.abi_version()
        self.readonly = mounts.status() is None  # also chmod/chown/utime refused outside writable paths
        self.layers = mounts.Layers()  # the read-only layer's namespaces kept for the next starts
        # Given up once, here: every launcher thread is made by this one and inherits its sets,
        # so no child can get a capability through exec. This thread keeps its effective and
        # permitted sets (it needs them to kill, reap and build the read-only mounts) and never
        # execs. Refused (root without CAP_SETPCAP): every start is refused with the reason.
        self.caps_refused: SandboxError | None = None
        try:
            landlock.drop_capabilities()
        except SandboxError as e:
            self.caps_refused = e
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        # The thread every sandboxed launcher thread is made by, so that each inherits the seccomp
        # filter instead of installing its own (the kernel checks and compiles it anew on every
        # install). None: it could not take the filter, and each launcher thread tries again,
        # refusing its start with the reason.
        self.filtered = _FilteredMaker.start() if self.abi > 0 else None

    def start(self, msg: dict[str, Any], armed: Armed | None = None) -> tuple[int, int, mounts.Layer | None]:
        """Start one child; returns (pid, read end of its output, the read-only layer's
        namespace it runs in, or None) once exec succeeded. The caller gives the namespace back
        to `layers` (or drops it) once nothing of the child's attempt is left. `armed`: this
        request's start, prepared by `arm` (what it prepares is the same)."""
        started = (armed or self.arm(msg, waits=False)).fire()
        self.cpus.free(started[0])  # it started on the server's CPU: from here on, on any
        return started

    def arm(self, msg: dict[str, Any], *, waits: bool = True) -> Armed:
        """Prepare the start of `msg` up to its exec: checked, its ruleset made, and its
        launcher thread in its folder, mounts and sandbox, waiting for `Armed.fire` (or
        `Armed.cancel`) before it runs anything. Raises what `start` would for a request that
        cannot start. `waits=False`: the thread goes on to the exec at once."""
        argv, cwd, env = msg["argv"], msg["cwd"], dict(msg["env"])
        # A specialist's output can reach the next attempt's arguments; exec cannot carry a NUL.
        name = argv[0].replace("\0", "")
        if any("\0" in arg for arg in argv):
            raise CoordinatorError(f"cannot run {name}: an argument holds a NUL byte")
        if any("\0" in key + value for key, value in env.items()):
            raise CoordinatorError(f"cannot run {name}: an environment variable holds a NUL byte")
        if self.caps_refused is not None:
            raise self.caps_refused
        exe = _resolve(argv[0], env.get("PATH"), cwd)
        env[MARK] = msg["token"]
        ruleset_fd, readonly = -1, None
        resolved: dict[str, str] = {}  # each sandbox path resolved once, for the ruleset and the mounts
        if msg["sandbox"] is not None:
            if self.abi > 0:
                ruleset_fd = landlock.prepare_paths(msg["sandbox"], self.abi, resolved)
            elif not self.gate_only_ok:
                raise SandboxError("this kernel has no Landlock: refusing to run without the kernel sandbox")
            if self.readonly:
                readonly = tuple(msg["mounts"])
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            if ruleset_fd >= 0:
                os.close(ruleset_fd)
            raise
        with contextlib.suppress(OSError):
            fcntl.fcntl(out_r, fcntl.F_SETPIPE_SZ, READ_CHUNK)  # fewer wakeups for chatty children
        launch = _Launch(exe, argv, env, cwd, out_w, self.devnull, ruleset_fd, readonly,
                         self.filtered if ruleset_fd >= 0 else None, resolved, waits=waits)
        armed = Armed(launch, out_r)
        try:
            launch.begin(self.layers.take(time.monotonic()) if readonly is not None else None)
        except BaseException:
            armed.cancel()
            raise
        return armed


class Armed:
    """A start under way in its launcher thread (see `Launcher.arm`): `fire` lets it exec,
    `cancel` ends it with nothing run. Either is called once, by the server's thread."""

    def __init__(self, launch: _Launch, out_r: int) -> None:
        self.launch = launch
        self.out_r = out_r

    def fire(self) -> tuple[int, int, mounts.Layer | None]:
        launch = self.launch
        try:
            try:
                pid, layer = launch.go()
            except mounts.StaleLayer:  # a kept namespace that could not serve: a new one then
                assert launch.kept is not None
                mounts.drop(launch.kept)
                launch.waits = False
                launch.begin(None)
                pid, layer = launch.go()
            except BaseException:
                if launch.kept is not None:
                    mounts.drop(launch.kept)  # it may hold this start's copies: serves no other
                raise
        except BaseException:
            os.close(self.out_r)
            raise
        finally:
            launch.release()
        os.set_blocking(self.out_r, False)
        return pid, self.out_r, layer

    def cancel(self) -> None:
        """Nothing runs; the namespace it was given (it may hold its copies) serves no other."""
        layer = self.launch.stop()
        if layer is not None:
            mounts.drop(layer)
        self.launch.release()
        os.close(self.out_r)


def _resolve(argv0: str, path: str | None, cwd: str) -> str:
    """The file to exec, found the way a shell would, relative to the child's folder."""
    if "/" in argv0:
        exe = os.path.join(cwd, argv0)
        if os.path.exists(exe):
            return exe
    else:
        for folder in (path if path is not None else os.defpath).split(os.pathsep):
            exe = os.path.join(cwd, folder, argv0)
            if os.path.isfile(exe) and os.access(exe, os.X_OK):
                return exe
    raise CoordinatorError(f"command not found: {argv0}")


# The most one argument may hold (MAX_ARG_STRLEN: 32 pages), and all of them with the environment.
MAX_ARG = 128 * 1024


def _why_not(e: OSError, argv: list[str]) -> str:
    """Why exec failed; for a command line too long, which argument and what to do."""
    if e.errno != errno.E2BIG:
        return e.strerror or str(e)
    sizes = [len(os.fsencode(arg)) + 1 for arg in argv]
    i = max(range(len(sizes)), key=sizes.__getitem__)
    if sizes[i] > MAX_ARG:
        return (f"argument {i} is {sizes[i] // 1024} KiB, over the {MAX_ARG // 1024} KiB one argument may hold "
                "(a brief passed as {brief_text}?): pass the brief's path, {brief}, and let the program read it")
    return f"the command line and environment are {sum(sizes) // 1024} KiB or more, over what exec takes"


# Signals the server catches or ignores; the child starts with all of them at their defaults.
_DEFAULT_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ)


class _Launch:
    """posix_spawn a child from a throwaway thread that first enters `cwd` and the sandbox.

    Landlock restricts only the calling thread, and a thread that unshared its
    file-system context has its own current folder (and, with `readonly`, its own
    mounts, all read-only but those paths); the child inherits them all, the seccomp
    filter installed after the ruleset, and the capability sets the server's thread
    emptied. So no Python runs in the child (vfork + exec in the C library) and the
    server itself stays unrestricted in its own folder. `waits`: the thread, once ready,
    waits for `go` before the exec (or for `stop`: then it runs nothing).
    `maker`: the thread is made by it and has the seccomp filter from the start. `resolved`: the
    real paths of the sandbox's paths, found already.
    """

    def __init__(self, exe: str, argv: list[str], env: dict[str, str], cwd: str, out_w: int, devnull: int,
                 ruleset_fd: int, readonly: tuple[str, ...] | None = None, maker: _FilteredMaker | None = None,
                 resolved: dict[str, str] | None = None, *, waits: bool = False) -> None:
        self.exe, self.argv, self.env, self.cwd = exe, argv, env, cwd
        self.out_w, self.devnull, self.ruleset_fd = out_w, devnull, ruleset_fd
        self.readonly, self.maker, self.resolved = readonly, maker, resolved
        self.waits = waits
        self.kept: mounts.Layer | None = None
        self.layer: mounts.Layer | None = None  # the namespace its thread entered or made
        self.outcome: list[int | BaseException] = []
        self.stopped = False
        # Bare locks: threading.Thread's start and join each wait for the other thread once
        # more, two scheduler round trips per spawn on a busy machine.
        self.ended = _thread.allocate_lock()
        self.wanted = _thread.allocate_lock()

    def begin(self, kept: mounts.Layer | None) -> None:
        """Make its thread, in `kept` (a namespace kept for more starts) or a new namespace."""
        self.kept, self.layer, self.outcome, self.stopped = kept, None, [], False
        self.ended.acquire()
        if self.waits:
            self.wanted.acquire()
        try:
            if self.maker is None:
                _thread.start_new_thread(self._run, ())
            else:
                self.maker.make(self._run, self.outcome, self.ended)
        except BaseException as e:  # no thread for it: as though it had failed
            self.outcome.append(e)
            self.ended.release()

    def go(self) -> tuple[int, mounts.Layer | None]:
        """Let the thread exec; returns once exec succeeded: the child's pid and, with
        `readonly`, the namespace it runs in: `kept`, made ready for it, or a new one. A start
        that fails takes a new namespace along (dropped); StaleLayer: `kept` could not be made
        ready, and nothing started."""
        if self.waits:
            self.wanted.release()
        self.ended.acquire()
        self.ended.release()
        pid = self.outcome[0] if self.outcome else None
        if not isinstance(pid, int):
            if self.layer is not None and self.layer is not self.kept:
                mounts.drop(self.layer)  # no attempt in it: it ends with the launcher thread
            if pid is None:
                raise CoordinatorError(f"cannot run {self.argv[0]}: the launcher thread ended without a result")
            raise pid
        return pid, self.layer

    def stop(self) -> mounts.Layer | None:
        """End the thread with nothing run; the namespace it held (`kept` or its own), if any."""
        self.stopped = True
        if self.waits and self.wanted.locked():  # unlocked: `begin` never ran
            self.wanted.release()
        self.ended.acquire()
        self.ended.release()
        return self.layer or self.kept

    def release(self) -> None:
        """Close what the child was to inherit; the caller keeps the read end of its output."""
        for fd in (self.out_w, self.ruleset_fd):
            if fd >= 0:
                os.close(fd)
        self.out_w = self.ruleset_fd = -1

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as e:
            self.outcome.append(e)
        finally:
            self.ended.release()

    def _work(self) -> None:
        if landlock.libc().unshare(mounts.CLONE_FS) != 0:
            raise CoordinatorError(f"cannot start the command: unshare: {os.strerror(ctypes.get_errno())}")
        kept, readonly = self.kept, self.readonly
        if kept is not None:
            assert readonly is not None
            kept.enter(readonly, self.resolved)  # before entering cwd: it may be one of the copies
            self.layer = kept
        elif readonly is not None:
            copies = mounts.enter_readonly(readonly, self.resolved)
            try:
                self.layer = mounts.Layer.here(copies, time.monotonic())
            except OSError:  # not kept (no descriptor left): it ends with the child
                for fd in copies:
                    os.close(fd)
        try:
            os.chdir(self.cwd)
        except OSError as e:
            raise CoordinatorError(f"cannot enter working folder {self.cwd}: {e.strerror}") from None
        if self.ruleset_fd >= 0:
            landlock.enforce(self.ruleset_fd)  # sets no_new_privs, which the filter needs
            if self.maker is None:
                seccomp.install()  # no setuid file, no lease: what Landlock has no right for
        # No capability to give up here: the server's thread emptied the bounding,
        # inheritable and ambient sets this thread inherited (see `Launcher`).
        # The server's /dev/null sits on the machine's mount: fchmod(0) would change it.
        null = self.devnull if readonly is None else os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            if self.waits:
                self.wanted.acquire()  # ready: the exec waits for `go`
                if self.stopped:
                    return
            try:
                self.outcome.append(os.posix_spawn(
                    self.exe, self.argv, self.env, setsid=True, setsigmask=(), setsigdef=_DEFAULT_SIGNALS,
                    file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, self.out_w, 1),
                                  (os.POSIX_SPAWN_DUP2, self.out_w, 2)]))
            except OSError as e:
                raise CoordinatorError(f"cannot run {self.argv[0]}: {_why_not(e, self.argv)}") from None
        finally:
            if null != self.devnull:
                os.close(null)


class _FilteredMaker:
    """A thread of the fork server that holds the seccomp filter (and no_new_privs, which it
    needs) and makes the sandboxed launcher threads, which inherit both; it never execs, and
    does nothing but make them. Made by the server's thread after it gave up the capability
    sets, so it has none to pass on either."""

    def __init__(self) -> None:
        # Threads to make, in turn: an armed start's thread waits for its exec while the next
        # starts are made (only the server's thread adds to it).
        self.jobs: collections.deque[tuple[Callable[[], None], list[int | BaseException], Any]] = collections.deque()
        self.wanted = _thread.allocate_lock()
        self.wanted.acquire()

    @classmethod
    def start(cls) -> _FilteredMaker | None:
        """The maker, once its thread has the filter; None when the kernel refused it."""
        maker, installed = cls(), _thread.allocate_lock()
        filtered: list[bool] = []
        installed.acquire()
        _thread.start_new_thread(maker._run, (filtered, installed))
        installed.acquire()
        return maker if filtered else None

    def _run(self, filtered: list[bool], installed: Any) -> None:
        try:
            zero = ctypes.c_ulong(0)
            if landlock.libc().prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), zero, zero, zero) != 0:
                return
            seccomp.install()
            filtered.append(True)
        except SandboxError:
            return
        finally:
            installed.release()
        while True:
            self.wanted.acquire()
            while self.jobs:
                work, outcome, ended = self.jobs.popleft()
                try:
                    _thread.start_new_thread(work, ())
                except BaseException as e:  # no thread for it: the start fails as one made directly would
                    outcome.append(e)
                    ended.release()

    def make(self, work: Callable[[], None], outcome: list[int | BaseException], ended: Any) -> None:
        """Have `work` run in a new thread made by this one; `ended` is released when it is done
        (or could not start, `outcome` saying why)."""
        self.jobs.append((work, outcome, ended))
        # Released already (the maker has not woken since the last job): it takes every job
        # there is when it wakes, this one too.
        with contextlib.suppress(RuntimeError):
            self.wanted.release()
