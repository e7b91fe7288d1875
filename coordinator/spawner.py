"""Spawning specialists: a fork server that sandboxes, logs, reaps and kills process trees.

The supervisor has threads, so it never forks a child itself (no `preexec_fn`)
and never restricts itself. `Spawner` starts a small server
(`python -m coordinator.forkserver`) once; per request a throwaway thread of the
server enters the child's folder and the Landlock ruleset (both apply to that
thread only) and posix_spawns the child in a new session, stdout and stderr on
a pipe: no Python runs between fork and exec. The server:

- is a child subreaper, so descendants that escape by setsid or double fork
  are reparented to it; it reaps every process and reports each leader's exit;
- marks every child's environment with ``COORD_ATTEMPT=<token>`` so a process
  tree can be found again, even by `kill_leftovers` after a crash;
- drains output into the log, keeping the head up to the cap and the last
  64 KiB, and touches the log's mtime whenever the child prints;
- kills every tree it started when its control channel closes (the
  supervisor exited or was killed with -9), then exits;
- says with each exit whether the tree is gone (`Exit.alone`), so the
  common case needs no `kill_tree` round trip.

Exec failures (command not found, missing folder, sandbox refused) are raised
by `spawn` with a one-line reason and also written to the log; nothing runs.
`start` is the same request without the wait: the supervisor's loop goes on while
the server sandboxes and starts the child, and a refusal comes back from `poll`
as `Refused`, in order with the exits. `arm` sends a request ahead: the server
prepares it up to the exec, and `go` starts it (`disarm`: it never runs). A start the
machine has no room for waits in the server; `room_news` tells which do, and when each
starts after all.

Example:
    >>> with Spawner() as sp:
    ...     sp.spawn(SpawnRequest(("make", "test"), os.environ, "/w/repo", "/w/log", "WO-1.1"))
    ...     select.select([sp], [], [])
    ...     sp.poll()                    # [Exit(token='WO-1.1', pid=..., returncode=0, ...)]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import landlock
from .errors import CoordinatorError, SandboxError, SupervisorError
from .landlock import Ruleset

log = logging.getLogger(__name__)

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
MIN_OPEN_FILES = 32  # descriptors (`ulimit -n`) below which not one order could run
# What ran short when the machine had no room, said alike by the supervisor and its spawn server.
NO_FILE_TABLE = "the system's table of open files is full"
NO_PROCESS = ("no process or thread could be made (a process limit: `ulimit -u`, or the pids limit of the "
              "cgroup or container it runs in)")
NO_PROCESS_EXIT = 75  # the spawn server's exit when it could not start for want of a process or thread


def thread_refused(e: BaseException) -> bool:
    """Whether `e` is Python's refusal of a new thread: a process limit (`ulimit -u`, a pids
    cgroup) counts threads too."""
    return isinstance(e, RuntimeError) and "can't start new thread" in str(e)
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
    """A leader process ended. `returncode` is -N when signal N killed it. `alone`: no
    process of its tree (nor any other orphan) was left, so there is nothing to kill."""

    token: str
    pid: int
    returncode: int
    ended_at: float
    alone: bool = False


@dataclass(frozen=True)
class Refused:
    """A `start` that ran nothing; `message` says why in one line (as `spawn` would raise it).
    `sandbox`: the kernel sandbox could not be enforced. `room`: it was killed while it waited for
    room (descriptors, processes, memory): no fault of its command."""

    token: str
    message: str
    sandbox: bool = False
    room: bool = False


Event = Exit | Refused


# --- the process table --------------------------------------------------------


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks since boot: tells a reused pid from the original
    zombie: bool  # no thread of it runs: there is nothing left to signal, only to reap


def proc_fields(path: str) -> list[bytes] | None:
    """The fields of a /proc stat line after the name: state first, as field 3 of proc(5)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # one line, well under a page (the name is at most 16 bytes)
    except OSError:
        return None
    finally:
        os.close(fd)
    end = data.rfind(b")")  # the name, in parentheses, may hold any byte
    if end < 0:
        return None  # gone between the open and the read
    return data[end + 2 :].split()


def _read_proc(pid: int) -> _Proc | None:
    fields = proc_fields(f"/proc/{pid}/stat")
    if fields is None:
        return None
    # A leader whose main thread exited alone (SYS_exit, not exit_group) shows Z while its
    # other threads run on: the process is alive, and a signal to its pid reaches them all.
    zombie = fields[0] in (b"Z", b"X") and (int(fields[17]) <= 1 or not _live_thread(pid))
    return _Proc(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), zombie)


def _live_thread(pid: int) -> bool:
    """Whether a thread of `pid` other than its leader has not exited (for a Z leader only)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        fields = None if tid == str(pid) else proc_fields(f"/proc/{pid}/task/{tid}/stat")
        if fields is not None and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _processes() -> dict[int, _Proc]:
    table: dict[int, _Proc] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (proc := _read_proc(int(name))) is not None:
            table[proc.pid] = proc
    return table


def _variable(environ: bytes, name: str) -> str | None:
    """One variable of an environment as /proc shows it (as it was at exec), if set."""
    prefix = name.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode("utf-8", "replace")
    return None


def _environ(pid: int) -> bytes | None:
    environ: bytes | None = None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except ProcessLookupError:
        pass
    except OSError:
        return None
    if environ:
        return environ
    # A leader that exited alone has no memory of its own left (the read fails, or is empty
    # on older kernels), but the threads that run on share theirs.
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            if tid != str(pid):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/environ", "rb") as f:
                    if other := f.read():
                        return other
    return environ


def mount_ns(pid: int) -> int | None:
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


def mount_points(pid: int) -> list[str]:
    """The mount points of the mount namespace `pid` lives in, as seen from it (empty when
    they cannot be read)."""
    try:
        with open(f"/proc/{pid}/mountinfo", "rb") as f:
            rows = f.read().split(b"\n")
    except OSError:
        return []
    # Field 5; a space, tab, newline or backslash in a path is shown as an octal escape.
    return [os.fsdecode(_OCTAL.sub(lambda m: bytes((int(m.group(1), 8),)), fields[4]))
            for row in rows if len(fields := row.split(b" ")) > 5]


_OCTAL = re.compile(rb"\\([0-7]{3})")


# A process in the middle of an exec shows an empty environment for a moment (its new
# memory is in place before the environment is copied into it): empty reads are retried,
# all of a scan's together, so processes that really have none cost one short wait (64 ms
# at most, at a start's recovery, or once for each such process in a fork server's scans).
# On a loaded machine 7.5 ms of retries missed one of 40 processes that did nothing but exec
# themselves: it stayed, running, after the recovery.
_EXEC_SETTLE = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032)


def _environs(procs: Iterable[_Proc]) -> dict[int, bytes]:
    """The environment of each process (empty when unreadable); an empty one is read again
    after a pause."""
    found: dict[int, bytes] = {}
    empty = [proc.pid for proc in procs]
    for pause in (0.0, *_EXEC_SETTLE):
        if not empty:
            break
        if pause:
            time.sleep(pause)
        still = []
        for pid in empty:
            environ = _environ(pid)
            if environ == b"":
                still.append(pid)
            else:
                found[pid] = environ or b""
        empty = still
    found.update(dict.fromkeys(empty, b""))
    return found


def _kernel_thread(proc: _Proc) -> bool:
    """kthreadd and its children: no environment to read (and no wait for one)."""
    return proc.pid == 2 or proc.ppid == 2


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


def kill_leftovers(tokens: Iterable[str], timeout: float = SIGKILL_WAIT, *, workspace: str | None = None,
                   attempts: str | None = None) -> int:
    """Crash recovery without a server: SIGKILL every process marked with one of `tokens`,
    its descendants and its session; returns how many processes were killed.

    `attempts` (a real path): also every process in a mount namespace with a mount point
    beneath it. The read-only layer gives each attempt such a namespace (its attempt folder
    is put back writable there), and a sandboxed process can neither leave it nor mount:
    what cleared its environment (``env -i``) and left its tree (setsid, double fork) is
    found there once the fork server that saw it go is dead too.
    """
    wanted = set(tokens)
    if not wanted and attempts is None:
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
        others = [p for p in table.values() if p.pid not in protected and not p.zombie and not _kernel_thread(p)]
        environs = _environs(others) if wanted else {}
        seeds = [table[pid] for pid, env in environs.items() if _variable(env, MARK) in wanted
                 and (workspace is None or _variable(env, "COORD_WORKSPACE") == workspace)]
        if attempts is not None:
            seeds += _in_namespaces_under(others, attempts)
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


def _in_namespaces_under(procs: list[_Proc], folder: str) -> list[_Proc]:
    """The processes of `procs` whose mount namespace (not this process's) has a mount point
    at or beneath `folder`."""
    mine = mount_ns(os.getpid())
    spaces: dict[int, list[_Proc]] = {}
    for proc in procs:
        ns = mount_ns(proc.pid)
        if ns is not None and ns != mine:
            spaces.setdefault(ns, []).append(proc)
    prefix = os.path.join(folder, "")
    return [proc for members in spaces.values()
            if any(p == folder or p.startswith(prefix) for p in mount_points(members[0].pid))
            for proc in members]


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
        # `-m` would put the current folder first on its import path, before the package: a
        # `coordinator/` an agent wrote where the supervisor was started from (a `sandbox.writable`
        # such as /tmp) ran as the server, unsandboxed, at the next start.
        env["PYTHONSAFEPATH"] = "1"
        cmd = [sys.executable, "-m", "coordinator.forkserver", "--ctl", str(ctl_peer.fileno()),
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
        self._pending: list[Event] = []
        self._room_news: list[tuple[str, bool]] = []
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
        if code == NO_PROCESS_EXIT:  # "restart the supervisor" would meet the same limit
            return SupervisorError(f"{NO_PROCESS}; raise the limit (or lower max_parallel) and start it again: "
                                   "what was under way is picked up then")
        return SupervisorError(f"the spawn server stopped (exit {code}); restart the supervisor")

    def _send(self, op: str, fields: dict[str, Any]) -> None:
        """One request to the server; the caller holds `_lock`."""
        if self._closed:
            raise SupervisorError("the spawner is closed")
        self._next_id += 1
        try:
            _send_frame(self._ctl, {"id": self._next_id, "op": op, **fields})
        except OSError:
            raise self._dead() from None

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            self._send(op, fields)
            try:
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
        reply = self._call("spawn", **self._fields(req))
        return int(reply["pid"])

    def start(self, req: SpawnRequest) -> None:
        """Send `req` and return at once; a refusal arrives from `poll` as `Refused`.

        Raises only what is known without the server (a bad token, an empty command,
        no Landlock) and SupervisorError when the server is gone.
        """
        fields = self._fields(req)
        with self._lock:
            self._send("spawn", {"detached": True, **fields})

    def arm(self, req: SpawnRequest) -> None:
        """Have the server prepare `req`'s start up to its exec while other work runs; nothing
        runs, and no log is opened, until `go` (an attempt's log says it was started: recovery
        counts an attempt by it). A request that cannot be prepared is refused at its `go`, as
        by `start`. Raises what `start` raises."""
        fields = self._fields(req)
        with self._lock:
            self._send("arm", {"detached": True, **fields})

    def go(self, token: str) -> None:
        """Start the request armed as `token`: as `start` from here on (a refusal comes from `poll`)."""
        with self._lock:
            self._send("go", {"detached": True, "token": token})

    def disarm(self, token: str) -> None:
        """Drop the request armed as `token`: it never runs."""
        with self._lock:
            self._send("disarm", {"detached": True, "token": token})

    def _fields(self, req: SpawnRequest) -> dict[str, Any]:
        if not _TOKEN.match(req.token):
            raise ValueError(f"bad attempt token {req.token!r}")
        if not req.argv:
            raise CoordinatorError("empty command: give the program to run")
        if req.sandbox is not None and self.abi < 1 and not self.gate_only_ok:
            raise SandboxError("this kernel has no Landlock: refusing to run without the kernel sandbox")
        sandbox = None if req.sandbox is None else list(req.sandbox.writable)
        unsealed = None if req.sandbox is None else list(req.sandbox.mounts_writable or req.sandbox.writable)
        return {"argv": list(req.argv), "env": dict(req.env), "cwd": req.cwd, "log_path": req.log_path,
                "token": req.token, "sandbox": sandbox, "mounts": unsealed}

    def fileno(self) -> int:
        """Readable when an exit is pending (for select())."""
        return self._events.fileno()

    def poll(self) -> list[Event]:
        """Exits (and refused `start`s) reported since the last poll; never blocks."""
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
        for line in lines:
            if line:
                event = json.loads(line)
                if "note" in event:  # the server says something for the log (a start waits for room)
                    log.warning(event["note"])
                    continue
                if "waits" in event or "started" in event:
                    self._room_news.append((event.get("waits") or event["started"], "started" in event))
                    continue
                self._pending.append(Refused(**event) if "message" in event else Exit(**event))

    def room_news(self) -> list[tuple[str, bool]]:
        """Read by `poll` and not told yet, oldest first: (token, False) for a `start` that waits
        in the server for room (descriptors, processes, memory), (token, True) when it started
        after all. A start that never waited is in neither."""
        with self._events_lock:
            out, self._room_news = self._room_news, []
        return out

    def kill_tree(self, token: str, grace: float = DEFAULT_GRACE) -> None:
        """SIGTERM every process of attempt `token` (its group and every escapee), SIGKILL
        what is left after `grace`; returns once all are gone and reaped."""
        self._call("kill", token=token, grace=grace)

    def kill_soon(self, token: str, grace: float = DEFAULT_GRACE) -> None:
        """`kill_tree` without the wait: the kill runs in the server while the caller goes on,
        and the leader's exit comes from `poll` as any exit. What survives SIGKILL is not
        said here: a later `kill_tree` says it."""
        with self._lock:
            self._send("kill", {"detached": True, "token": token, "grace": grace})

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
