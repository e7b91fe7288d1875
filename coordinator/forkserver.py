"""The fork server behind `coordinator.spawner.Spawner` (run as `python -m coordinator.forkserver`).

A single-threaded process (but for a throwaway thread per start, see
`coordinator.launch`): its loop answers the supervisor's requests on the control
channel (hello, spawn, alive, kill, close), per spawn starts a child in a new
session, output on a pipe, in its folder and under the prepared Landlock ruleset,
and reports each leader's exit on the events channel. It is a child subreaper,
reaps everything, drains output into capped logs, and kills every tree it
started when its control channel closes (which process is whose: see
`coordinator.ownership`). See `coordinator.spawner` for the client side.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import landlock, mounts, ownership
from .errors import CoordinatorError, SandboxError, SupervisorError
from .launch import Armed, Launcher
from .ownership import CappedLog, Tree
from .spawner import (
    _HEADER,
    _PR_SET_CHILD_SUBREAPER,
    DEFAULT_LOG_CAP,
    KILL_POLL,
    NO_FILE_TABLE,
    NO_PROCESS,
    NO_PROCESS_EXIT,
    READ_CHUNK,
    SCAN_INTERVAL,
    SIGKILL_WAIT,
    _Proc,
    _read_proc,
    _send_frame,
    _signal,
    thread_refused,
)

# A start that failed for want of descriptors, processes, threads or memory is no fault of its
# command: it waits in the server, and is tried again when one of the server's attempts ends (what
# that one held is free again) or SHORT_RETRY passes. Refused as it was only when nothing of the
# server's will free what is short: no attempt of it left and SHORT_PATIENCE gone (or at once for
# descriptors, the server's own). The supervisor hears of each start that waits and of its start
# (`{"waits": token}`, `{"started": token}`): its timeout counts from the start, not while the
# start waits; a cancel still ends a waiting start. A waiting start killed says `room`: no
# fault of its command.
_SHORT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})
SHORT_RETRY = 1.0
SHORT_PATIENCE = 30.0
# Descriptors a start needs at once (its log, both ends of its output pipe, the ruleset, the
# namespace kept for it), and those it must leave free: a kill reads /proc and opens a pidfd
# per process it signals, and with none left it took every process for one that survived SIGKILL.
START_FDS = 5
FD_RESERVE = 8


@dataclass
class _Waiting:
    """A detached start put off for want of resources (see `_SHORT_ERRNOS`)."""

    msg: dict[str, Any]
    since: float
    short: str  # what ran short, said in the refusal should it come to one


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
        self.log_cap = log_cap
        self.launcher = Launcher(gate_only_ok)  # in this thread: it gives up the capability sets
        self.pid = os.getpid()
        self.attempts: dict[str, Tree] = {}
        self.leaders: dict[int, Tree] = {}
        # The read-only layer's namespace each attempt runs in, and the attempts whose leader
        # ended with nothing else left below the server: their namespace is empty for good, and
        # serves another start once the attempt is forgotten (see `coordinator.mounts`).
        self.layer_of: dict[str, mounts.Layer] = {}
        self.emptied: set[str] = set()
        self.envless: set[tuple[int, int]] = set()  # processes below it with no environment (`ownership.owners`)
        self.kills: list[_Kill] = []
        self.waiting: list[_Waiting] = []  # starts put off for want of resources, oldest first
        # Starts prepared ahead (`arm`), by token: the request, and its launcher thread waiting
        # for the exec (None: it could not be prepared, and starts from the request at its `go`).
        self.armed: dict[str, tuple[dict[str, Any], Armed | None]] = {}
        self.retry_at = 0.0
        self.freed = False  # an attempt ended since the last retry: what it held is free
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.events_waiting = False  # registered for writing: the supervisor reads slower than exits come
        self.stopping: _Kill | None = None
        self.terminated = self.child_died = False
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
            if self.waiting and (self.freed or now >= self.retry_at):
                self._retry_waiting(now)
            self.launcher.layers.expire(now)
            due = next_kill_check if self.kills else next_scan
            if self.waiting:
                due = min(due, self.retry_at)
            timeout = max(0.0, due - now)
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
        armed: Armed | None = None
        if op == "arm":
            return self._arm(msg)
        if op == "disarm":
            return self._disarm(msg["token"])
        if op == "go":  # the start prepared by `arm`, from here on as any `start` of its request
            prepared = self.armed.pop(msg["token"], None)
            if prepared is None:
                return self._refuse(msg["token"], CoordinatorError("cannot start the command: it was not prepared"))
            (msg, armed), op = prepared, "spawn"
        detached = bool(msg.get("detached"))  # a `start` or `kill_soon`: nobody waits for the reply
        if detached:
            rid = None
        try:
            if self.stopping is not None:
                raise SupervisorError("the spawn server is stopping")
            if op == "hello":
                self._reply(rid, pid=self.pid)
            elif op == "spawn" and detached and self.waiting:  # in turn after those waiting for room
                self._cancel(armed)
                armed = None
                self.waiting.append(_Waiting(msg, time.monotonic(), self.waiting[0].short))
                self._tell("waits", msg["token"])
                self._retry_waiting(time.monotonic())
            elif op == "spawn":
                given, armed = armed, None  # `_spawn` fires or cancels it
                self._reply(rid, pid=self._spawn(msg, given))
            elif op == "alive":
                self._reply(rid, alive=any(not p.zombie for p in self._tree().get(msg["token"], ())))
            elif op == "kill":
                now, grace = time.monotonic(), float(msg["grace"])
                self._drop_waiting(msg["token"], "killed before it could start")
                self.kills.append(_Kill(msg["token"], now + grace, rid, now + grace + SIGKILL_WAIT))
            elif op == "close":
                self._stop(rid, float(msg["grace"]))
            else:
                raise SupervisorError(f"unknown spawn server request {op!r}")
        except Exception as e:
            self._cancel(armed)  # failed before it was fired (no room, no log): it runs nothing
            if detached and op == "spawn" and self._put_off(msg, e, time.monotonic()):
                return
            # Out of processes, fds or threads, or a request nobody foresaw: this request fails
            # and the server goes on, for the trees it started must not lose their reaper.
            short = _shortage(e)
            error = _refusal(e, short[1] if short else "")
            if detached and op == "spawn":
                self._refuse(msg["token"], error)
            elif not detached:  # a detached kill that failed: the caller's later kill_tree says why
                self._reply_error(rid, error)

    # starts prepared ahead
    def _arm(self, msg: dict[str, Any]) -> None:
        """Prepare the start of `msg` up to its exec (see `Launcher.arm`), for its `go`. What
        cannot be prepared is not said here: its `go` starts it from the request, and fails
        there as any start of it would. Its log is opened at the go, not here: a log says the
        attempt was started (recovery counts it, `Interruptions.count_unrecorded`)."""
        token = msg["token"]
        self._disarm(token)
        msg = {**msg, "op": "spawn", "detached": True}
        self.armed[token] = (msg, None)
        if self.stopping is not None or self.waiting:
            return
        try:
            _check_room(START_FDS + FD_RESERVE + len(msg.get("mounts") or ()))
            self.armed[token] = (msg, self.launcher.arm(msg))
        except Exception:
            return

    def _disarm(self, token: str) -> None:
        self._cancel(self.armed.pop(token, (None, None))[1])

    @staticmethod
    def _cancel(armed: Armed | None) -> None:
        if armed is not None:
            armed.cancel()

    # starts put off for want of resources
    def _put_off(self, msg: dict[str, Any], e: BaseException, now: float, since: float | None = None) -> bool:
        """Keep a detached start that failed for want of resources to try again; False when it
        is to be refused now (another failure, or nothing of the server's will free what is short)."""
        short = _shortage(e)
        if short is None or self.stopping is not None:
            return False
        first = since is None
        since = now if since is None else since
        if not self.attempts and (short[0] == errno.EMFILE or now - since >= SHORT_PATIENCE):
            return False
        if not self.waiting and first:
            self._note(f"a start waits: {short[1]}; it is tried again when a running attempt ends")
        if first:
            self._tell("waits", msg["token"])
        self.waiting.append(_Waiting(msg, since, short[1]))
        self.retry_at = now + SHORT_RETRY
        return True

    def _retry_waiting(self, now: float) -> None:
        """Try the waiting starts again, oldest first, until one is short again."""
        self.freed = False
        self.retry_at = now + SHORT_RETRY
        waiting, self.waiting = self.waiting, []
        for i, job in enumerate(waiting):
            try:
                self._spawn(job.msg)
            except Exception as e:
                if self._put_off(job.msg, e, now, since=job.since):
                    self.waiting.extend(waiting[i + 1:])  # no room for the next ones either
                    return
                # Not `room`: nothing of the server's is left to free what is short, and the next
                # start would wait as long again (a pids limit too low for one start, for ever).
                self._refuse(job.msg["token"], _refusal(e, job.short))
            else:
                self._tell("started", job.msg["token"])

    def _drop_waiting(self, token: str | None, why: str) -> None:
        """A kill of an attempt whose start waits: it never starts, said as a refusal."""
        for job in [j for j in self.waiting if token is None or j.msg["token"] == token]:
            self.waiting.remove(job)
            self._refuse(job.msg["token"], CoordinatorError(f"{why} (it waited for room: {job.short})"), room=True)

    def _note(self, line: str) -> None:
        """A line for the supervisor's log, on the events channel."""
        self.outbuf += json.dumps({"note": line}).encode() + b"\n"
        self._send_events()

    def _tell(self, what: str, token: str) -> None:
        """`waits` or `started`, of a start put off for want of room, on the events channel."""
        self.outbuf += json.dumps({what: token}).encode() + b"\n"
        self._send_events()

    def _reply(self, rid: int | None, **fields: Any) -> None:
        if rid is not None:
            with contextlib.suppress(OSError):
                _send_frame(self.ctl, {"id": rid, "ok": True, **fields})

    def _reply_error(self, rid: int | None, e: CoordinatorError) -> None:
        kind = "sandbox" if isinstance(e, SandboxError) else "error"
        if rid is not None:
            with contextlib.suppress(OSError):
                _send_frame(self.ctl, {"id": rid, "ok": False, "error": kind, "message": e.message})

    def _refuse(self, token: str, e: CoordinatorError, *, room: bool = False) -> None:
        """A detached start ran nothing: say so on the events channel, in order with the exits.
        `room`: it waited for room and never got it (no fault of its command)."""
        refusal = {"token": token, "message": e.message, "sandbox": isinstance(e, SandboxError)}
        if room:
            refusal["room"] = True
        self.outbuf += json.dumps(refusal).encode() + b"\n"
        self._send_events()

    def _on_output(self, att: Tree, mask: int) -> None:
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
    def _spawn(self, msg: dict[str, Any], armed: Armed | None = None) -> int:
        """Start `msg`'s child (`armed`: from its start prepared ahead); its pid."""
        token = msg["token"]
        try:
            if armed is None:  # an armed start has the descriptors it needs
                _check_room(START_FDS + FD_RESERVE + len(msg.get("mounts") or ()))
            old = self.attempts.get(token)
            if old is not None:
                if not old.exited or old.out_fd is not None:
                    raise CoordinatorError(f"attempt {token} is still running; kill_tree it first")
                self._forget(old)
            try:
                # Never through a link: a log path is not to be aimed at another file.
                log_fd = os.open(msg["log_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                                 | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as e:
                raise CoordinatorError(f"cannot open log {msg['log_path']}: {e.strerror}") from None
        except BaseException:
            self._cancel(armed)
            raise
        try:
            pid, out_r, layer = self.launcher.start(msg, armed)
        except BaseException as e:
            # The log is where a user looks first: say there why nothing ran.
            with contextlib.suppress(OSError):
                os.write(log_fd, f"coordinator: {e}\n".encode())
            os.close(log_fd)
            raise
        leader = _read_proc(pid)  # not reaped yet: readable even if it already exited
        # Unreadable: no mark can be proven younger than it, so none is believed.
        att = Tree(token, pid, leader.start if leader else sys.maxsize, CappedLog(log_fd, self.log_cap), out_r)
        if leader is not None:  # seen: what it does to its own CPUs from now on is its choice (`_free_held`)
            att.known.add((pid, leader.start))
        if layer is not None:
            att.ns = layer.ino
            self.layer_of[token] = layer
        self.attempts[token] = self.leaders[pid] = att
        self.sel.register(out_r, selectors.EVENT_READ, lambda mask, att=att: self._on_output(att, mask))
        return pid

    # reaping and reporting
    def _reap(self) -> None:
        ended: list[tuple[Tree, int]] = []
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
            alone = ownership.only_leaders(self.leaders)
            for att, code in ended:
                self._leader_exited(att, code, alone)

    def _leader_exited(self, att: Tree, code: int, alone: bool) -> None:
        att.exited = True
        self.freed = True
        if alone:
            self.emptied.add(att.token)
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
        seen = {token: att.known for token, att in self.attempts.items()}  # `owners` makes new sets
        owners = ownership.owners(self.pid, self.leaders, self.attempts, self.envless)
        self._free_held(owners, seen)
        for att in list(self.attempts.values()):
            if att.exited and att.out_fd is None and not owners.get(att.token, []):
                self._forget(att)
        return owners

    def _free_held(self, owners: dict[str | None, list[_Proc]], seen: dict[str, set[tuple[int, int]]]) -> None:
        """Free what a child made in the moment before it was freed at its start and the look
        then missed (`cpus`): each process new since the last look, started within the window
        of its attempt's start and held to the server's CPU."""
        cpus = self.launcher.cpus
        if cpus.home is None:
            return
        window = cpus.window
        for token, procs in owners.items():
            att = self.attempts.get(token) if token is not None else None
            if att is None:
                continue
            before = seen.get(att.token, set())
            for proc in procs:
                if proc.start - att.start <= window and (proc.pid, proc.start) not in before \
                        and not proc.zombie and cpus.held(proc.pid):
                    cpus.free(proc.pid)

    def _forget(self, att: Tree) -> None:
        if self.attempts.get(att.token) is att:
            del self.attempts[att.token]
            layer = self.layer_of.pop(att.token, None)
            if layer is not None and att.token in self.emptied:
                self.launcher.layers.give_back(layer, time.monotonic())
            elif layer is not None:
                mounts.drop(layer)  # a process of it may live on in it: never another's
            self.emptied.discard(att.token)
        if att.out_fd is not None:
            self.sel.unregister(att.out_fd)
            os.close(att.out_fd)
            att.out_fd = None
        att.log.flush(time.monotonic())
        os.close(att.log.fd)
        self.freed = True

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
        self._drop_waiting(None, "the spawn server is stopping")
        now = time.monotonic()
        self.stopping = _Kill(None, now + grace, rid, now + grace + SIGKILL_WAIT)
        self.kills.append(self.stopping)

    def _finish(self) -> None:
        for token in list(self.armed):
            self._disarm(token)
        for att in list(self.attempts.values()):
            self._forget(att)
        self.launcher.layers.clear()
        self.events.setblocking(True)
        self.events.settimeout(1.0)
        with contextlib.suppress(OSError):
            self.events.sendall(self.outbuf)
        self.events.close()
        self.ctl.close()



def _check_room(needed: int) -> None:
    """Raise EMFILE unless `needed` descriptor numbers are free below the server's limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return
    names = os.listdir("/proc/self/fd")
    if len(names) + needed <= soft:  # room even if every one of them counted (the usual case)
        return
    held = sum(1 for name in names if int(name) < soft)
    if soft - held < needed:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def _shortage(e: BaseException) -> tuple[int, str] | None:
    """(errno, what ran short) when `e` says the machine had no room for a start; else None.
    The launch's errors keep the OSError they came from as their context."""
    cause: BaseException | None = e
    for _ in range(8):
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno in _SHORT_ERRNOS:
            return cause.errno, _short_text(cause.errno)
        if thread_refused(cause):
            return errno.EAGAIN, _short_text(errno.EAGAIN)
        cause = cause.__cause__ or cause.__context__
    return None


def _short_text(code: int) -> str:
    if code == errno.EMFILE:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return f"too many open files (the spawn server may open {soft}: raise `ulimit -n`, or lower max_parallel)"
    if code == errno.ENFILE:
        return NO_FILE_TABLE
    if code == errno.EAGAIN:
        return NO_PROCESS
    return "out of memory"


def _refusal(e: BaseException, short: str) -> CoordinatorError:
    """The error a waiting start is refused with, in the words the server's other refusals use."""
    if _shortage(e) is not None:
        return CoordinatorError(f"cannot start the command: {short}")
    if isinstance(e, CoordinatorError):
        return e
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return CoordinatorError(f"cannot start the command: {reason}")


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
    try:
        server = _Server(ctl, events, args.log_cap, args.gate_only_ok)
    except (OSError, RuntimeError) as e:  # its probe thread refused: a traceback, then "exit 1"
        short = _shortage(e)
        if short is None or short[0] != errno.EAGAIN:
            raise
        return NO_PROCESS_EXIT  # the supervisor says it (`Spawner._dead`)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
