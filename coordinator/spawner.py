"""Spawning specialists: a fork server that sandboxes, logs, reaps and kills process trees.

The supervisor has threads, so it never forks a child itself (no `preexec_fn`)
and never restricts itself. `Spawner` starts a small single-threaded server
(`python -m coordinator.spawner`) once; per request the server forks a child
that calls setsid(), wires stdout and stderr to a pipe, enters its folder,
applies the Landlock ruleset the server prepared and execs. The server:

- is a child subreaper, so descendants that escape by setsid or double fork
  are reparented to it; it reaps every process and reports each leader's exit;
- marks every child's environment with ``COORD_ATTEMPT=<token>`` so a process
  tree can be found again, even by `kill_leftovers` after a crash;
- drains output into the log, keeping the head up to the cap and the last
  64 KiB, and touches the log's mtime whenever the child prints;
- kills every tree it started when its control channel closes (the
  supervisor exited or was killed with -9), then exits.

Exec failures (command not found, missing folder, sandbox refused) are raised
by `spawn` with a one-line reason and also written to the log; nothing runs.

Example:
    >>> with Spawner() as sp:
    ...     sp.spawn(SpawnRequest(("make", "test"), os.environ, "/w/repo", "/w/log", "WO-1.1"))
    ...     select.select([sp], [], [])
    ...     sp.poll()                    # [Exit(token='WO-1.1', pid=..., returncode=0, ...)]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import re
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from . import landlock
from .errors import CoordinatorError, SandboxError, SupervisorError
from .landlock import Ruleset

MARK = "COORD_ATTEMPT"
DEFAULT_LOG_CAP = 1 << 20
TAIL_BYTES = 64 * 1024
DEFAULT_GRACE = 2.0
KILL_POLL = 0.05  # how often a kill in progress looks for survivors
SCAN_INTERVAL = 1.0  # how often running trees are re-read, so escapees stay attributed
FLUSH_INTERVAL = 1.0  # how often a capped log's tail is rewritten while output flows
SIGKILL_WAIT = 5.0  # after SIGKILL, how long before a kill reports survivors
EXEC_WAIT = 10.0
READ_CHUNK = 256 * 1024
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
_PR_SET_CHILD_SUBREAPER = 36
_HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class SpawnRequest:
    """One process to start. `token` (the attempt id) names its whole process tree."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    log_path: str
    token: str
    sandbox: Ruleset | None = None  # None: no kernel sandbox (trusted commands only)


@dataclass(frozen=True)
class Exit:
    """A leader process ended. `returncode` is -N when signal N killed it."""

    token: str
    pid: int
    returncode: int
    ended_at: float


# --- the process table --------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks since boot: tells a reused pid from the original
    zombie: bool


def _read_proc(pid: int) -> _Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return _Proc(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), fields[0] in (b"Z", b"X"))


def _processes() -> dict[int, _Proc]:
    table: dict[int, _Proc] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (proc := _read_proc(int(name))) is not None:
            table[proc.pid] = proc
    return table


def _mark_of(pid: int) -> str | None:
    """The attempt token in a process's environment (as it was at exec), if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    prefix = MARK.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode("utf-8", "replace")
    return None


def _children(table: dict[int, _Proc]) -> dict[int, list[_Proc]]:
    kids: dict[int, list[_Proc]] = {}
    for proc in table.values():
        kids.setdefault(proc.ppid, []).append(proc)
    return kids


def _subtree(top: _Proc, kids: dict[int, list[_Proc]]) -> list[_Proc]:
    out, stack = [], [top]
    while stack:
        proc = stack.pop()
        out.append(proc)
        stack.extend(kids.get(proc.pid, ()))
    return out


def _signal(proc: _Proc, sig: int) -> bool:
    """Send `sig` through a pidfd after checking the pid still names the same process."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:
        return False
    try:
        now = _read_proc(proc.pid)
        if now is None or now.start != proc.start:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def _wait_gone(procs: list[_Proc], timeout: float) -> None:
    """Block until every process in `procs` has exited (its pidfd turns readable) or timeout."""
    poller, fds = select.poll(), []
    for proc in procs:
        with contextlib.suppress(OSError):
            fds.append(os.pidfd_open(proc.pid))
            poller.register(fds[-1], select.POLLIN)
    try:
        deadline, waiting = time.monotonic() + timeout, len(fds)
        while waiting and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                waiting -= 1
    finally:
        for fd in fds:
            os.close(fd)


def kill_leftovers(tokens: Iterable[str], timeout: float = SIGKILL_WAIT) -> int:
    """Crash recovery without a server: SIGKILL every process marked with one of `tokens`,
    its descendants and its session; returns how many processes were killed."""
    wanted = set(tokens)
    if not wanted:
        return 0
    me, my_sid = os.getpid(), os.getsid(0)
    killed: set[tuple[int, int]] = set()
    deadline = time.monotonic() + timeout
    while True:
        table = _processes()
        protected, pid = set(), me
        while pid in table and pid not in protected:  # never ourselves or an ancestor
            protected.add(pid)
            pid = table[pid].ppid
        seeds = [p for p in table.values() if p.pid not in protected and not p.zombie and _mark_of(p.pid) in wanted]
        sids = {p.sid for p in seeds} - {my_sid}
        kids = _children(table)
        targets = {q.pid: q for p in seeds for q in _subtree(p, kids)}
        targets.update({p.pid: p for p in table.values() if p.sid in sids})
        live = [p for p in targets.values() if not p.zombie and p.pid not in protected]
        if not live or time.monotonic() >= deadline:
            return len(killed)
        for proc in live:
            if _signal(proc, signal.SIGKILL):
                killed.add((proc.pid, proc.start))
        _wait_gone(live, min(1.0, max(0.0, deadline - time.monotonic())))


# --- framing of the control channel --------------------------------------------


def _send_frame(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> Any:
    head = _recv_exact(sock, _HEADER.size)
    body = None if head is None else _recv_exact(sock, _HEADER.unpack(head)[0])
    return None if body is None else json.loads(body)


# --- the client, used by the supervisor ----------------------------------------


class Spawner:
    """Starts specialists through the fork server. Safe to share between threads."""

    def __init__(self, *, log_cap: int = DEFAULT_LOG_CAP, gate_only_ok: bool = False) -> None:
        self.abi = landlock.abi_version()
        self.gate_only_ok = gate_only_ok
        ctl, ctl_peer = socket.socketpair()
        events, events_peer = socket.socketpair()
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env.pop(MARK, None)  # the server is nobody's attempt
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_parent, env.get("PYTHONPATH"))))
        cmd = [sys.executable, "-m", "coordinator.spawner", "--ctl", str(ctl_peer.fileno()),
               "--events", str(events_peer.fileno()), "--log-cap", str(log_cap)]
        # Its own session: a Ctrl-C meant for the supervisor must not kill the server.
        self._proc = subprocess.Popen(
            cmd + (["--gate-only-ok"] if gate_only_ok else []), env=env, stdin=subprocess.DEVNULL,
            pass_fds=(ctl_peer.fileno(), events_peer.fileno()), start_new_session=True,
        )
        ctl_peer.close()
        events_peer.close()
        self._ctl, self._events = ctl, events
        events.setblocking(False)
        self._lock, self._events_lock = threading.Lock(), threading.Lock()
        self._next_id = 0
        self._closed = False
        self._events_eof = False
        self._events_buf = bytearray()
        self._pending: list[Exit] = []
        try:
            self.server_pid = int(self._call("hello")["pid"])
        except BaseException:
            self.close(grace=0.0)
            raise

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dead(self) -> SupervisorError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(1.0)
        code = self._proc.poll()
        return SupervisorError(f"the spawn server stopped (exit {code}); restart the supervisor")

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise SupervisorError("the spawner is closed")
            self._next_id += 1
            try:
                _send_frame(self._ctl, {"id": self._next_id, "op": op, **fields})
                reply = _recv_frame(self._ctl)
            except OSError:
                reply = None
        if reply is None:
            raise self._dead()
        if not reply["ok"]:
            raise (SandboxError if reply["error"] == "sandbox" else CoordinatorError)(reply["message"])
        return dict(reply)

    def spawn(self, req: SpawnRequest) -> int:
        """Start `req`; returns its pid (also its process group and session id).

        Raises SandboxError when the sandbox cannot be enforced, CoordinatorError
        when the command cannot be started ("command not found: claude").
        """
        if not _TOKEN.match(req.token):
            raise ValueError(f"bad attempt token {req.token!r}")
        if not req.argv:
            raise CoordinatorError("empty command: give the program to run")
        if req.sandbox is not None and self.abi < 1 and not self.gate_only_ok:
            raise SandboxError("this kernel has no Landlock: refusing to run without the kernel sandbox")
        sandbox = None if req.sandbox is None else list(req.sandbox.writable)
        reply = self._call("spawn", argv=list(req.argv), env=dict(req.env), cwd=req.cwd,
                           log_path=req.log_path, token=req.token, sandbox=sandbox)
        return int(reply["pid"])

    def fileno(self) -> int:
        """Readable when an exit is pending (for select())."""
        return self._events.fileno()

    def poll(self) -> list[Exit]:
        """Exits reported since the last poll; never blocks."""
        with self._events_lock:
            if not self._closed:
                self._read_events()
            out, self._pending = self._pending, []
        if not out and self._events_eof and not self._closed:
            raise self._dead()
        return out

    def _read_events(self) -> None:
        while not self._events_eof:
            try:
                data = self._events.recv(1 << 16)
            except (BlockingIOError, TimeoutError):
                break
            except OSError:
                data = b""
            if not data:
                self._events_eof = True
            self._events_buf += data
        *lines, rest = self._events_buf.split(b"\n")
        self._events_buf = bytearray(rest)
        self._pending.extend(Exit(**json.loads(line)) for line in lines if line)

    def kill_tree(self, token: str, grace: float = DEFAULT_GRACE) -> None:
        """SIGTERM every process of attempt `token` (its group and every escapee), SIGKILL
        what is left after `grace`; returns once all are gone and reaped."""
        self._call("kill", token=token, grace=grace)

    def alive(self, token: str) -> bool:
        """Whether any process of attempt `token` still runs."""
        return bool(self._call("alive", token=token)["alive"])

    def close(self, grace: float = DEFAULT_GRACE) -> None:
        """Kill every tree started (SIGTERM, SIGKILL after `grace`) and stop the server.
        Exits reported on the way stay available to `poll`."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError):
                _send_frame(self._ctl, {"id": 0, "op": "close", "grace": grace})
                _recv_frame(self._ctl)
            self._ctl.close()
        with self._events_lock:
            self._events.settimeout(EXEC_WAIT)
            self._read_events()
            self._closed = True
            self._events.close()
        try:
            self._proc.wait(timeout=EXEC_WAIT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --- the server -----------------------------------------------------------------


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
    log: _Log
    out_fd: int | None
    exited: bool = False
    known: set[tuple[int, int]] = field(default_factory=set)  # (pid, start) seen in its tree


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
        self.pid = os.getpid()
        self.attempts: dict[str, _Attempt] = {}
        self.leaders: dict[int, _Attempt] = {}
        self.kills: list[_Kill] = []
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.stopping: _Kill | None = None
        self.terminated = self.child_died = False
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        one, zero = ctypes.c_ulong(1), ctypes.c_ulong(0)
        if libc.prctl(ctypes.c_int(_PR_SET_CHILD_SUBREAPER), one, zero, zero, zero) != 0:
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
        except CoordinatorError as e:
            self._reply_error(rid, e)
        except OSError as e:  # out of processes or fds: this request fails, the server goes on
            self._reply_error(rid, CoordinatorError(f"cannot start the command: {e.strerror}"))

    def _reply(self, rid: int | None, **fields: Any) -> None:
        if rid is not None:
            with contextlib.suppress(OSError):
                _send_frame(self.ctl, {"id": rid, "ok": True, **fields})

    def _reply_error(self, rid: int | None, e: CoordinatorError) -> None:
        kind = "sandbox" if isinstance(e, SandboxError) else "error"
        if rid is not None:
            with contextlib.suppress(OSError):
                _send_frame(self.ctl, {"id": rid, "ok": False, "error": kind, "message": e.message})

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
            log_fd = os.open(msg["log_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CoordinatorError(f"cannot open log {msg['log_path']}: {e.strerror}") from None
        try:
            pid, out_r = self._fork(msg)
        except BaseException as e:
            # The log is where a user looks first: say there why nothing ran.
            with contextlib.suppress(OSError):
                os.write(log_fd, f"coordinator: {e}\n".encode())
            os.close(log_fd)
            raise
        att = _Attempt(token, pid, _Log(log_fd, self.log_cap), out_r)
        self.attempts[token] = self.leaders[pid] = att
        self.sel.register(out_r, selectors.EVENT_READ, lambda mask, att=att: self._on_output(att, mask))
        return pid

    def _fork(self, msg: dict[str, Any]) -> tuple[int, int]:
        """Fork and exec one child; returns (pid, read end of its output) once exec succeeded."""
        argv, cwd, env = msg["argv"], msg["cwd"], dict(msg["env"])
        exe = _resolve(argv[0], env.get("PATH"), cwd)
        env[MARK] = msg["token"]
        out_r = out_w = status_r = status_w = ruleset_fd = -1
        try:
            if msg["sandbox"] is not None:
                if self.abi > 0:
                    ruleset_fd = landlock.prepare(Ruleset(tuple(msg["sandbox"])), self.abi)
                elif not self.gate_only_ok:
                    raise SandboxError("this kernel has no Landlock: refusing to run without the kernel sandbox")
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):
                fcntl.fcntl(out_r, fcntl.F_SETPIPE_SZ, READ_CHUNK)  # fewer wakeups for chatty children
            pid = os.fork()
            if pid == 0:
                _exec_child(exe, argv, env, cwd, out_w, status_w, self.devnull, ruleset_fd)
            os.close(status_w)
            status_w = -1
            failure = _read_status(status_r)
            if failure:
                os.kill(pid, signal.SIGKILL)  # it may be stuck before exec; never let it run later
                os.waitpid(pid, 0)
                kind, _, reason = failure.partition("\n")
                raise (SandboxError if kind == "sandbox" else CoordinatorError)(reason)
        except BaseException:
            if out_r >= 0:
                os.close(out_r)
            raise
        finally:
            for fd in (out_w, status_w, status_r, ruleset_fd):
                if fd >= 0:
                    os.close(fd)
        os.set_blocking(out_r, False)
        return pid, out_r

    # reaping and reporting
    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            att = self.leaders.pop(pid, None)
            if att is not None:
                self._leader_exited(att, os.waitstatus_to_exitcode(status))

    def _leader_exited(self, att: _Attempt, code: int) -> None:
        att.exited = True
        # What the leader printed is all in the pipe now; a straggler may keep
        # printing, so drain a bounded amount.
        for _ in range(8):
            if att.out_fd is None:
                break
            before = att.log.head + att.log.dropped + len(att.log.tail)
            self._on_output(att, selectors.EVENT_READ)
            if att.log.head + att.log.dropped + len(att.log.tail) == before:
                break
        att.log.flush(time.monotonic())
        exit_ = {"token": att.token, "pid": att.pid, "returncode": code, "ended_at": time.time()}
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
        registered = self.events in self.sel.get_map()
        if self.outbuf and not registered:
            self.sel.register(self.events, selectors.EVENT_WRITE, self._on_events_writable)
        elif not self.outbuf and registered:
            self.sel.unregister(self.events)

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
        return _mark_of(top.pid)

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
            procs = [p for ps in owners.values() for p in ps] if job.token is None else owners.get(job.token, [])
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


def _read_status(fd: int) -> str:
    """What the child reported before exec; empty when exec succeeded (the pipe closed on exec)."""
    data, poller = b"", select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + EXEC_WAIT
    while (left := deadline - time.monotonic()) > 0:
        chunk = os.read(fd, 4096) if poller.poll(left * 1000) else b""
        if not chunk:
            return data.decode("utf-8", "replace")
        data += chunk
    return "exec\nthe command did not start within 10 seconds"


def _exec_child(exe: str, argv: list[str], env: dict[str, str], cwd: str,
                out_w: int, status_w: int, devnull: int, ruleset_fd: int) -> NoReturn:
    """In the forked child: become a session leader, wire fds, sandbox, exec. Never returns."""
    stage = "exec"
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE; exec would keep that
        os.setsid()
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        stage = "cwd"
        os.chdir(cwd)
        if ruleset_fd >= 0:
            stage = "sandbox"
            landlock.enforce(ruleset_fd)
        stage = "exec"
        os.execve(exe, argv, env)
    except BaseException as e:
        if isinstance(e, CoordinatorError):
            reason = e.message
        elif stage == "cwd":
            reason = f"cannot enter working folder {cwd}: {getattr(e, 'strerror', e)}"
        else:
            reason = f"cannot run {argv[0]}: {getattr(e, 'strerror', e)}"
        with contextlib.suppress(BaseException):
            os.write(status_w, f"{stage}\n{reason}".encode("utf-8", "replace"))
    finally:
        os._exit(127)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the fork server (started by `Spawner`, not by users)."""
    parser = argparse.ArgumentParser(prog="python -m coordinator.spawner")
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
