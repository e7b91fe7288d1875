"""The fork server behind `coordinator.spawner.Spawner` (run as `python -m coordinator.forkserver`).

A single-threaded process (but for a throwaway thread per start, see `_launch`):
per request it starts a child in a new session, output on a pipe, in its folder
and under the prepared Landlock ruleset. It is a child subreaper, reaps everything, drains output
into capped logs, and kills every tree it started when its control channel
closes. See `coordinator.spawner` for the client side.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import landlock, mounts, seccomp
from .errors import CoordinatorError, SandboxError, SupervisorError
from .landlock import Ruleset
from .spawner import (
    _HEADER,
    _PR_SET_CHILD_SUBREAPER,
    DEFAULT_LOG_CAP,
    FLUSH_INTERVAL,
    KILL_POLL,
    MARK,
    READ_CHUNK,
    SCAN_INTERVAL,
    SIGKILL_WAIT,
    TAIL_BYTES,
    _children,
    _mark_of,
    _Proc,
    _processes,
    _read_proc,
    _send_frame,
    _signal,
    _subtree,
)


class _Log:
    """A capped log: the head goes straight to disk, the last bytes wait in a ring."""

    def __init__(self, fd: int, cap: int) -> None:
        self.fd = fd
        self.tail_cap = min(TAIL_BYTES, cap // 2)
        self.head_cap = cap - self.tail_cap
        self.head = 0
        self.tail = bytearray()
        self.dropped = 0
        self.dirty = False
        self.flushed_at = 0.0

    def feed(self, data: bytes, now: float) -> None:
        try:
            self._feed(data, now)
        except OSError:  # a full disk loses output, never the server
            self.dropped += len(data)

    def _feed(self, data: bytes, now: float) -> None:
        if self.head < self.head_cap:
            n = min(len(data), self.head_cap - self.head)
            os.write(self.fd, data[:n])  # a regular file takes it whole
            self.head += n
            data = data[n:]
            if not data:
                return
        self.tail += data
        if (excess := len(self.tail) - self.tail_cap) > 0:
            del self.tail[:excess]
            self.dropped += excess
        self.dirty = True
        if now - self.flushed_at >= FLUSH_INTERVAL:
            self.flush(now)
        else:
            os.utime(self.fd)  # stale detection reads the mtime: it must move with every print

    def flush(self, now: float) -> None:
        if not self.dirty:
            return
        marker = f"\n[coordinator: {self.dropped} bytes of output dropped here]\n".encode() if self.dropped else b""
        data = marker + bytes(self.tail)
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, data, self.head)
            os.ftruncate(self.fd, self.head + len(data))
        self.dirty, self.flushed_at = False, now


@dataclass
class _Attempt:
    token: str
    pid: int
    start: int  # the leader's start time (clock ticks since boot): its tree is no older
    log: _Log
    out_fd: int | None
    exited: bool = False
    known: set[tuple[int, int]] = field(default_factory=set)  # (pid, start) seen in its tree
    # The mount namespace it was started in (the read-only layer makes one per start): what a
    # process naming it by its mark must be in. None: the server's own, which proves nothing.
    ns: int | None = None


@dataclass
class _Kill:
    token: str | None  # None: every process the server started
    term_until: float
    reply_id: int | None
    give_up_at: float
    termed: set[int] = field(default_factory=set)
    fresh: bool = True  # not looked at yet: start it without waiting for the next poll


class _Server:
    def __init__(self, ctl: socket.socket, events: socket.socket, log_cap: int, gate_only_ok: bool) -> None:
        self.ctl, self.events = ctl, events
        self.log_cap, self.gate_only_ok = log_cap, gate_only_ok
        self.abi = landlock.abi_version()
        self.readonly = mounts.status() is None  # also chmod/chown/utime refused outside writable paths
        # Given up once, here: every launcher thread is made by this one and inherits its sets,
        # so no child can get a capability through exec. This thread keeps its effective and
        # permitted sets (it needs them to kill, reap and build the read-only mounts) and never
        # execs. Refused (root without CAP_SETPCAP): every start is refused with the reason.
        self.caps_refused: SandboxError | None = None
        try:
            landlock.drop_capabilities()
        except SandboxError as e:
            self.caps_refused = e
        self.pid = os.getpid()
        self.attempts: dict[str, _Attempt] = {}
        self.leaders: dict[int, _Attempt] = {}
        self.kills: list[_Kill] = []
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.events_waiting = False  # registered for writing: the supervisor reads slower than exits come
        self.stopping: _Kill | None = None
        self.terminated = self.child_died = False
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        one, zero = ctypes.c_ulong(1), ctypes.c_ulong(0)
        if landlock.libc().prctl(ctypes.c_int(_PR_SET_CHILD_SUBREAPER), one, zero, zero, zero) != 0:
            raise SupervisorError("cannot become a child subreaper; escaped processes could not be reaped")
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.ctl, selectors.EVENT_READ, self._on_control)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self._on_wake)
        events.setblocking(False)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self.terminated = True

    def run(self) -> None:
        next_scan = next_kill_check = time.monotonic() + SCAN_INTERVAL
        while True:
            self._reap()
            now = time.monotonic()
            if self.terminated and self.stopping is None:
                self._stop(None, 0.0)
            # A kill looks for survivors when a child died or every KILL_POLL, not on every read.
            if self.kills and (self.child_died or now >= next_kill_check or any(k.fresh for k in self.kills)):
                self.child_died = False
                next_kill_check = now + KILL_POLL
                self._progress_kills(now)
            if self.stopping is not None and self.stopping not in self.kills:
                break
            if now >= next_scan:
                if self.attempts:
                    self._tree()
                next_scan = now + SCAN_INTERVAL
            timeout = max(0.0, (next_kill_check if self.kills else next_scan) - now)
            for key, mask in self.sel.select(timeout):
                key.data(mask)
        self._finish()

    # events in
    def _on_wake(self, mask: int) -> None:
        self.child_died = True  # SIGCHLD is the only signal that needs waking for
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass

    def _on_control(self, mask: int) -> None:
        try:
            data = self.ctl.recv(1 << 16)
        except OSError:
            data = b""
        if not data:  # the supervisor is gone: nobody may keep running on its behalf
            self.sel.unregister(self.ctl)
            if self.stopping is None:
                self._stop(None, 0.0)
            return
        self.inbuf += data
        while len(self.inbuf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.inbuf)
            if len(self.inbuf) < _HEADER.size + size:
                break
            msg = json.loads(self.inbuf[_HEADER.size : _HEADER.size + size])
            del self.inbuf[: _HEADER.size + size]
            self._handle(msg)

    def _handle(self, msg: dict[str, Any]) -> None:
        rid, op = msg["id"], msg["op"]
        detached = bool(msg.get("detached"))  # a `start`: nobody waits for the reply
        if detached:
            rid = None
        try:
            if self.stopping is not None:
                raise SupervisorError("the spawn server is stopping")
            if op == "hello":
                self._reply(rid, pid=self.pid)
            elif op == "spawn":
                self._reply(rid, pid=self._spawn(msg))
            elif op == "alive":
                self._reply(rid, alive=any(not p.zombie for p in self._tree().get(msg["token"], ())))
            elif op == "kill":
                now, grace = time.monotonic(), float(msg["grace"])
                self.kills.append(_Kill(msg["token"], now + grace, rid, now + grace + SIGKILL_WAIT))
            elif op == "close":
                self._stop(rid, float(msg["grace"]))
            else:
                raise SupervisorError(f"unknown spawn server request {op!r}")
        except Exception as e:
            # Out of processes, fds or threads, or a request nobody foresaw: this request fails
            # and the server goes on, for the trees it started must not lose their reaper.
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
            error = e if isinstance(e, CoordinatorError) else CoordinatorError(f"cannot start the command: {reason}")
            if detached:
                self._refuse(msg["token"], error)
            else:
                self._reply_error(rid, error)

    def _reply(self, rid: int | None, **fields: Any) -> None:
        if rid is not None:
            with contextlib.suppress(OSError):
                _send_frame(self.ctl, {"id": rid, "ok": True, **fields})

    def _reply_error(self, rid: int | None, e: CoordinatorError) -> None:
        kind = "sandbox" if isinstance(e, SandboxError) else "error"
        if rid is not None:
            with contextlib.suppress(OSError):
                _send_frame(self.ctl, {"id": rid, "ok": False, "error": kind, "message": e.message})

    def _refuse(self, token: str, e: CoordinatorError) -> None:
        """A detached start ran nothing: say so on the events channel, in order with the exits."""
        self.outbuf += json.dumps({"token": token, "message": e.message,
                                   "sandbox": isinstance(e, SandboxError)}).encode() + b"\n"
        self._send_events()

    def _on_output(self, att: _Attempt, mask: int) -> None:
        assert att.out_fd is not None
        try:
            data = os.read(att.out_fd, READ_CHUNK)
        except BlockingIOError:
            return
        if data:
            att.log.feed(data, time.monotonic())
            return
        self.sel.unregister(att.out_fd)
        os.close(att.out_fd)
        att.out_fd = None
        att.log.flush(time.monotonic())

    def _on_events_writable(self, mask: int) -> None:
        self._send_events()

    # spawning
    def _spawn(self, msg: dict[str, Any]) -> int:
        token = msg["token"]
        old = self.attempts.get(token)
        if old is not None:
            if not old.exited or old.out_fd is not None:
                raise CoordinatorError(f"attempt {token} is still running; kill_tree it first")
            self._forget(old)
        try:
            # Never through a link: a log path is not to be aimed at another file.
            log_fd = os.open(msg["log_path"],
                             os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                             0o644)
        except OSError as e:
            raise CoordinatorError(f"cannot open log {msg['log_path']}: {e.strerror}") from None
        try:
            pid, out_r, ns = self._fork(msg)
        except BaseException as e:
            # The log is where a user looks first: say there why nothing ran.
            with contextlib.suppress(OSError):
                os.write(log_fd, f"coordinator: {e}\n".encode())
            os.close(log_fd)
            raise
        leader = _read_proc(pid)  # not reaped yet: readable even if it already exited
        # Unreadable: no mark can be proven younger than it, so none is believed.
        att = _Attempt(token, pid, leader.start if leader else sys.maxsize, _Log(log_fd, self.log_cap), out_r)
        if ns is not None:
            att.ns = ns
        self.attempts[token] = self.leaders[pid] = att
        self.sel.register(out_r, selectors.EVENT_READ, lambda mask, att=att: self._on_output(att, mask))
        return pid

    def _fork(self, msg: dict[str, Any]) -> tuple[int, int, int | None]:
        """Start one child; returns (pid, read end of its output, the mount namespace it got
        from the read-only layer, or None) once exec succeeded."""
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
        if msg["sandbox"] is not None:
            if self.abi > 0:
                ruleset_fd = landlock.prepare(Ruleset(tuple(msg["sandbox"])), self.abi)
            elif not self.gate_only_ok:
                raise SandboxError("this kernel has no Landlock: refusing to run without the kernel sandbox")
            if self.readonly:
                readonly = tuple(msg["mounts"])
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(out_r, fcntl.F_SETPIPE_SZ, READ_CHUNK)  # fewer wakeups for chatty children
            spaces: list[int] = []
            pid = _launch(exe, argv, env, cwd, out_w, self.devnull, ruleset_fd, readonly, spaces)
        except BaseException:
            os.close(out_r)
            raise
        finally:
            os.close(out_w)
            if ruleset_fd >= 0:
                os.close(ruleset_fd)
        os.set_blocking(out_r, False)
        return pid, out_r, (spaces[0] if spaces else None)

    # reaping and reporting
    def _reap(self) -> None:
        ended: list[tuple[_Attempt, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            att = self.leaders.pop(pid, None)
            if att is not None:
                ended.append((att, os.waitstatus_to_exitcode(status)))
        if ended:
            # Every orphan is reparented to this subreaper: when no child is left but live
            # leaders, no process of an ended attempt survives and it needs no kill.
            alone = self._only_leaders()
            for att, code in ended:
                self._leader_exited(att, code, alone)

    def _only_leaders(self) -> bool:
        """Whether every child of this server is the leader of a running attempt."""
        try:
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/children", "rb") as f:
                    if any(int(pid) not in self.leaders for pid in f.read().split()):
                        return False
        except (OSError, ValueError):
            return False  # cannot tell: the supervisor falls back to a full kill
        return True

    def _leader_exited(self, att: _Attempt, code: int, alone: bool) -> None:
        att.exited = True
        # What the leader printed is all in the pipe now; a straggler may keep
        # printing, so drain a bounded amount (everything, when nothing of it is left).
        for _ in range(8):
            if att.out_fd is None:
                break
            before = att.log.head + att.log.dropped + len(att.log.tail)
            self._on_output(att, selectors.EVENT_READ)
            if att.log.head + att.log.dropped + len(att.log.tail) == before:
                break
        att.log.flush(time.monotonic())
        if alone and att.out_fd is None:
            self._forget(att)
        exit_ = {"token": att.token, "pid": att.pid, "returncode": code, "ended_at": time.time(), "alone": alone}
        self.outbuf += json.dumps(exit_).encode() + b"\n"
        self._send_events()

    def _send_events(self) -> None:
        try:
            while self.outbuf:
                del self.outbuf[: self.events.send(self.outbuf)]
        except BlockingIOError:
            pass
        except OSError:
            self.outbuf.clear()  # nobody listens any more
        # A flag, not `self.events in self.sel.get_map()`: a miss there formats a KeyError
        # message with the socket's repr, on every exit.
        if self.outbuf and not self.events_waiting:
            self.sel.register(self.events, selectors.EVENT_WRITE, self._on_events_writable)
            self.events_waiting = True
        elif not self.outbuf and self.events_waiting:
            self.sel.unregister(self.events)
            self.events_waiting = False

    # finding and killing trees
    def _tree(self) -> dict[str | None, list[_Proc]]:
        """Every process below the server, grouped by attempt token (None: unknown)."""
        table = _processes()
        kids = _children(table)
        owners: dict[str | None, list[_Proc]] = {}
        for top in kids.get(self.pid, ()):
            owners.setdefault(self._owner(top), []).extend(_subtree(top, kids))
        for att in list(self.attempts.values()):
            mine = owners.get(att.token, [])
            att.known = {(p.pid, p.start) for p in mine}
            if att.exited and att.out_fd is None and not mine:
                self._forget(att)
        return owners

    def _owner(self, top: _Proc) -> str | None:
        leader = self.leaders.get(top.pid)
        if leader is not None:
            return leader.token
        for att in self.attempts.values():
            # A session or group id stays taken while any member lives, so it still names the attempt.
            if att.pid in (top.sid, top.pgid) or (top.pid, top.start) in att.known:
                return att.token
        if top.zombie:
            return None  # no environment left
        # Anyone can exec with any mark: believe it only when it names an attempt the server
        # still knows and whose leader is no younger than the process (a descendant never is).
        # Else it is nobody's, and killed with every kill, so no mark hides it from its own.
        # The mark is no secret (a record in state/ names it): a process of another attempt
        # that took it on lives in that attempt's own mount namespace, not in the named one's.
        mark = _mark_of(top.pid)
        named = self.attempts.get(mark) if mark is not None else None
        if named is None or named.start > top.start:
            return None
        return mark if named.ns is None or _mount_ns(top.pid) == named.ns else None

    def _forget(self, att: _Attempt) -> None:
        if self.attempts.get(att.token) is att:
            del self.attempts[att.token]
        if att.out_fd is not None:
            self.sel.unregister(att.out_fd)
            os.close(att.out_fd)
            att.out_fd = None
        att.log.flush(time.monotonic())
        os.close(att.log.fd)

    def _progress_kills(self, now: float) -> None:
        owners = self._tree()
        for job in list(self.kills):
            job.fresh = False
            if job.token is None:
                procs = [p for ps in owners.values() for p in ps]
            else:
                # A process nothing can attribute (it escaped and hid its mark) is killed with
                # every attempt that is killed: no attempt is judged while it may still write.
                procs = owners.get(job.token, []) + owners.get(None, [])
            live = [p for p in procs if not p.zombie]
            if not procs:
                self.kills.remove(job)
                self._reply(job.reply_id)
                continue
            if now >= job.give_up_at:
                self.kills.remove(job)
                msg = f"{len(live)} processes of attempt {job.token} survived SIGKILL"
                self._reply_error(job.reply_id, CoordinatorError(msg))
                continue
            for proc in live:
                if now >= job.term_until:
                    _signal(proc, signal.SIGKILL)
                elif proc.pid not in job.termed and _signal(proc, signal.SIGTERM):
                    _signal(proc, signal.SIGCONT)  # a stopped process must wake to see SIGTERM
                    job.termed.add(proc.pid)

    def _stop(self, rid: int | None, grace: float) -> None:
        now = time.monotonic()
        self.stopping = _Kill(None, now + grace, rid, now + grace + SIGKILL_WAIT)
        self.kills.append(self.stopping)

    def _finish(self) -> None:
        for att in list(self.attempts.values()):
            self._forget(att)
        self.events.setblocking(True)
        self.events.settimeout(1.0)
        with contextlib.suppress(OSError):
            self.events.sendall(self.outbuf)
        self.events.close()
        self.ctl.close()


def _mount_ns(pid: int) -> int | None:
    """The identity (inode) of the mount namespace `pid` lives in; None when it cannot be read.
    A leader whose main thread exited alone has none of its own left: one of its threads has."""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        pass
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                return os.stat(f"/proc/{pid}/task/{tid}/ns/mnt").st_ino
    return None


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


# Signals the server catches or ignores; the child starts with all of them at their defaults.
_DEFAULT_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ)


def _launch(exe: str, argv: list[str], env: dict[str, str], cwd: str, out_w: int, devnull: int,
            ruleset_fd: int, readonly: tuple[str, ...] | None = None, spaces: list[int] | None = None) -> int:
    """posix_spawn the child from a throwaway thread that first enters `cwd` and the sandbox.

    Landlock restricts only the calling thread, and a thread that unshared its
    file-system context has its own current folder (and, with `readonly`, its own
    mounts, all read-only but those paths); the child inherits them all, the seccomp
    filter installed after the ruleset, and the capability sets the server's thread
    emptied. So no Python runs in the child (vfork + exec in the C library) and the
    server itself stays unrestricted in its own folder. Returns once exec succeeded;
    `spaces` gets the identity of the child's mount namespace, when it has one of its own.
    """
    outcome: list[int | BaseException] = []

    def work() -> None:
        try:
            if landlock.libc().unshare(mounts.CLONE_FS) != 0:
                raise CoordinatorError(f"cannot start the command: unshare: {os.strerror(ctypes.get_errno())}")
            if readonly is not None:
                mounts.enter_readonly(readonly)  # before entering cwd: it may be one of the copies
                if spaces is not None:  # read here: a child that exits at once takes it along
                    with contextlib.suppress(OSError):
                        spaces.append(os.stat("/proc/thread-self/ns/mnt").st_ino)
            try:
                os.chdir(cwd)
            except OSError as e:
                raise CoordinatorError(f"cannot enter working folder {cwd}: {e.strerror}") from None
            if ruleset_fd >= 0:
                landlock.enforce(ruleset_fd)  # sets no_new_privs, which the filter needs
                seccomp.install()  # no setuid file, no lease: what Landlock has no right for
            # No capability to give up here: the server's thread emptied the bounding,
            # inheritable and ambient sets this thread inherited (see `_Server`).
            # The server's /dev/null sits on the machine's mount: fchmod(0) would change it.
            null = devnull if readonly is None else os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                outcome.append(os.posix_spawn(
                    exe, argv, env, setsid=True, setsigmask=(), setsigdef=_DEFAULT_SIGNALS,
                    file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                                  (os.POSIX_SPAWN_DUP2, out_w, 2)]))
            except OSError as e:
                raise CoordinatorError(f"cannot run {argv[0]}: {e.strerror}") from None
            finally:
                if null != devnull:
                    os.close(null)
        except BaseException as e:
            outcome.append(e)

    # A bare thread and one lock: threading.Thread's start and join each wait for the other
    # thread once more, two scheduler round trips per spawn on a busy machine.
    ended = _thread.allocate_lock()
    ended.acquire()

    def launcher() -> None:
        try:
            work()
        finally:
            ended.release()

    _thread.start_new_thread(launcher, ())
    ended.acquire()
    if not outcome:
        raise CoordinatorError(f"cannot run {argv[0]}: the launcher thread ended without a result")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the fork server (started by `Spawner`, not by users)."""
    parser = argparse.ArgumentParser(prog="python -m coordinator.forkserver")
    parser.add_argument("--ctl", type=int, required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--log-cap", type=int, default=DEFAULT_LOG_CAP)
    parser.add_argument("--gate-only-ok", action="store_true")
    args = parser.parse_args(argv)
    ctl, events = socket.socket(fileno=args.ctl), socket.socket(fileno=args.events)
    for sock in (ctl, events):
        sock.set_inheritable(False)
    _Server(ctl, events, args.log_cap, args.gate_only_ok).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
