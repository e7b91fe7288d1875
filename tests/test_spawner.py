"""The fork server on real processes: exits, logs, sandbox, killing trees, crash behaviour."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator import forkserver, landlock, mounts, ownership
from coordinator.errors import CoordinatorError, SandboxError, SupervisorError
from coordinator.landlock import Ruleset
from coordinator.spawner import (
    MARK,
    SCAN_INTERVAL,
    Exit,
    Refused,
    Spawner,
    SpawnRequest,
    kill_leftovers,
)

ROOT = Path(__file__).resolve().parents[1]
ABI = landlock.abi_version()
needs_landlock = pytest.mark.skipif(ABI < 1, reason="this kernel has no Landlock")
RUN = secrets.token_hex(3)  # attempt marks are global in /proc: keep concurrent runs apart
ENV = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(ROOT)}


def wait_until(what: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition a test cannot be told about by an event (a file another process writes)."""
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


_SEEN: dict[tuple[int, str], Exit] = {}


def wait_exit(sp: Spawner, token: str, timeout: float = 30.0) -> Exit:
    """The exit of `token`, keeping exits of other tokens for later calls."""
    deadline = time.monotonic() + timeout
    while (id(sp), token) not in _SEEN and (left := deadline - time.monotonic()) > 0:
        select.select([sp], [], [], left)
        _SEEN.update({(id(sp), ex.token): ex for ex in sp.poll()})
    if (id(sp), token) not in _SEEN:
        raise AssertionError(f"no exit for {token}")
    return _SEEN.pop((id(sp), token))


def gone(pid: int) -> bool:
    """No process and no zombie with this pid is left."""
    return not os.path.exists(f"/proc/{pid}")


def dead(pid: int) -> bool:
    """Not running any more (a zombie whose reaping is init's business counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


def marked(token: str) -> list[int]:
    """Pids whose environment carries the attempt mark of `token`."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if f"{MARK}={token}".encode() in f.read().split(b"\0"):
                    pids.append(int(name))
        except (OSError, ValueError):
            pass
    return pids


@pytest.fixture
def sp() -> Iterator[Spawner]:
    spawner = Spawner()
    yield spawner
    spawner.close(grace=0.5)


def py(tmp_path: Path, code: str) -> tuple[str, ...]:
    script = tmp_path / f"child-{abs(hash(code))}.py"
    script.write_text(code)
    return (sys.executable, str(script))


def req(tmp_path: Path, argv: tuple[str, ...], token: str, sandbox: Ruleset | None = None,
        env: dict[str, str] | None = None) -> SpawnRequest:
    return SpawnRequest(argv, env or ENV, str(tmp_path), str(tmp_path / f"{token}.log"), token, sandbox)


def test_exit_codes_and_output_reach_the_supervisor(sp: Spawner, tmp_path: Path) -> None:
    cases = {"zero": "echo out; echo err >&2", "three": "exit 3", "killed": "kill -9 $$"}
    pids = {t: sp.spawn(req(tmp_path, ("sh", "-c", cmd), t)) for t, cmd in cases.items()}
    codes = {t: wait_exit(sp, t) for t in cases}
    assert {t: e.returncode for t, e in codes.items()} == {"zero": 0, "three": 3, "killed": -9}
    assert all(codes[t].pid == pids[t] and gone(pids[t]) for t in cases)  # reaped before reported
    assert sorted((tmp_path / "zero.log").read_text().split()) == ["err", "out"]


def test_an_exit_says_whether_anything_of_the_tree_is_left(sp: Spawner, tmp_path: Path) -> None:
    """`alone` lets the supervisor skip the kill: true only when no process of the tree survives."""
    assert wait_exit(sp, _spawned(sp, tmp_path, "true", f"lone-{RUN}")).alone
    token = _spawned(sp, tmp_path, "setsid sleep 60 & exit 0", f"left-{RUN}")
    assert not wait_exit(sp, token).alone  # the escapee lives on, so a kill is needed
    # it may still be between fork and exec of sleep, its environment unreadable for that moment
    wait_until(lambda: len(marked(token)) == 1)
    sp.kill_tree(token, grace=0.5)
    assert marked(token) == []


def _spawned(sp: Spawner, tmp_path: Path, script: str, token: str) -> str:
    sp.spawn(req(tmp_path, ("sh", "-c", script), token))
    return token


def test_a_child_leads_its_own_session_and_is_marked(sp: Spawner, tmp_path: Path) -> None:
    pid = sp.spawn(req(tmp_path, ("sleep", "60"), f"lead-{RUN}"))
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid
    wait_until(lambda: marked(f"lead-{RUN}") == [pid])  # its environment reads empty while it execs
    assert sp.alive(f"lead-{RUN}")
    sp.kill_tree(f"lead-{RUN}", grace=1.0)
    assert not sp.alive(f"lead-{RUN}") and gone(pid)
    assert wait_exit(sp, f"lead-{RUN}").returncode == -signal.SIGTERM


def test_exec_failures_are_raised_with_one_line_and_logged(sp: Spawner, tmp_path: Path) -> None:
    with pytest.raises(CoordinatorError, match="^command not found: no-such-agent-cli$"):
        sp.spawn(req(tmp_path, ("no-such-agent-cli", "-p"), "nf"))
    assert "command not found" in (tmp_path / "nf.log").read_text()
    bad = SpawnRequest(("true",), ENV, str(tmp_path / "missing"), str(tmp_path / "cwd.log"), "cwd")
    with pytest.raises(CoordinatorError, match="cannot enter working folder"):
        sp.spawn(bad)
    with pytest.raises(SandboxError, match="create it or remove it"):
        sp.spawn(req(tmp_path, ("true",), "sb", Ruleset((str(tmp_path / "nope"),))))
    assert sp.poll() == []  # nothing ran
    sp.spawn(req(tmp_path, ("true",), "after"))  # the server carries on
    assert wait_exit(sp, "after").returncode == 0


def test_a_nul_byte_refuses_that_request_and_the_server_goes_on(sp: Spawner, tmp_path: Path) -> None:
    """exec cannot carry a NUL (a specialist's output may put one in the next brief): the request
    is refused in one line; nothing a request holds may stop the server and orphan its trees."""
    with pytest.raises(CoordinatorError, match="^cannot run sh: an argument holds a NUL byte$"):
        sp.spawn(req(tmp_path, ("sh", "-c", "echo a\0b"), "nul-arg"))
    with pytest.raises(CoordinatorError, match="^cannot run true: an environment variable holds a NUL byte$"):
        sp.spawn(req(tmp_path, ("true",), "nul-env", env={**ENV, "BRIEF": "a\0b"}))
    with pytest.raises(CoordinatorError, match="^cannot start the command: .*null byte"):  # what no check foresaw
        sp.spawn(SpawnRequest(("/bin/true",), ENV, f"{tmp_path}\0x", str(tmp_path / "nul-cwd.log"), "nul-cwd"))
    sp.start(req(tmp_path, ("sh", "-c", "echo a\0b"), "nul-start"))
    assert events_until(sp, 1) == [Refused("nul-start", "cannot run sh: an argument holds a NUL byte")]
    sp.spawn(req(tmp_path, ("true",), "nul-after"))
    assert wait_exit(sp, "nul-after").returncode == 0


def events_until(sp: Spawner, count: int, timeout: float = 30.0) -> list[Exit | Refused]:
    """The next `count` events of `sp`, in the order the server sent them."""
    deadline = time.monotonic() + timeout
    seen: list[Exit | Refused] = []
    while len(seen) < count and (left := deadline - time.monotonic()) > 0:
        select.select([sp], [], [], left)
        seen.extend(sp.poll())
    assert len(seen) == count, seen
    return seen


def test_start_returns_at_once_and_refusals_come_back_in_order_with_the_exits(sp: Spawner, tmp_path: Path) -> None:
    sp.start(req(tmp_path, ("sh", "-c", "echo first"), "s-ok"))
    sp.start(req(tmp_path, ("no-such-agent-cli", "-p"), "s-nf"))
    sp.start(req(tmp_path, ("true",), "s-sb", Ruleset((str(tmp_path / "nope"),))))
    sp.start(req(tmp_path, ("true",), "s-after"))
    events = events_until(sp, 4)
    assert not sp.alive("s-ok")  # a reply to a start on the control channel would be read here instead
    refused = [e for e in events if isinstance(e, Refused)]
    assert [(e.token, e.message, e.sandbox) for e in refused][0] == ("s-nf", "command not found: no-such-agent-cli", False)
    assert refused[1].token == "s-sb" and refused[1].sandbox and "create it or remove it" in refused[1].message
    # A refusal goes out while the request is handled: before the exit of anything started later.
    order = [e.token for e in events]
    assert order.index("s-nf") < order.index("s-after") and order.index("s-sb") < order.index("s-after")
    assert {e.token: e.returncode for e in events if isinstance(e, Exit)} == {"s-ok": 0, "s-after": 0}
    assert (tmp_path / "s-ok.log").read_text() == "first\n"
    assert "command not found" in (tmp_path / "s-nf.log").read_text()  # the log says why nothing ran
    with pytest.raises(CoordinatorError, match="empty command"):  # what is known without the server
        sp.start(req(tmp_path, (), "s-empty"))


def _no_room_left(sp: Spawner) -> None:
    """Lower the server's descriptor limit so that a start finds one descriptor too few: it
    waits until a child that runs ends (which holds its log and its output pipe's read end)."""
    held = {int(fd) for fd in os.listdir(f"/proc/{sp.server_pid}/fd")}
    free = forkserver.START_FDS + forkserver.FD_RESERVE - 1
    limit = next(n for n in range(1, 1 << 16) if n - len({fd for fd in held if fd < n}) == free)
    resource.prlimit(sp.server_pid, resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def _running(sp: Spawner, tmp_path: Path, token: str, seconds: float) -> None:
    sp.spawn(req(tmp_path, ("sh", "-c", f"sleep {seconds}; echo {token}"), token))


def test_a_start_with_no_descriptor_free_waits_for_a_running_one_and_runs(
        sp: Spawner, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # `ulimit -n` too low for max_parallel: each start beyond what fit was refused as the
    # command's failure ("Too many open files"), and the supervisor blocked the order after
    # max_failures refusals in a row. It now waits for room and runs, in turn.
    _running(sp, tmp_path, "room-1", 0.3)
    _no_room_left(sp)
    for token in ("room-2", "room-3"):
        sp.start(req(tmp_path, ("sh", "-c", f"sleep 0.1; echo {token}"), token))
    events = events_until(sp, 3)
    assert [(e.token, type(e).__name__, getattr(e, "returncode", None)) for e in events] == [
        ("room-1", "Exit", 0), ("room-2", "Exit", 0), ("room-3", "Exit", 0)]
    assert (tmp_path / "room-3.log").read_text() == "room-3\n"
    said = [r.getMessage() for r in caplog.records if r.name == "coordinator.spawner"]
    assert len(said) == 1 and "a start waits: too many open files" in said[0] and "ulimit -n" in said[0]


def test_a_start_waiting_for_room_ends_refused_when_killed(sp: Spawner, tmp_path: Path) -> None:
    _running(sp, tmp_path, "busy", 30)
    _no_room_left(sp)
    sp.start(req(tmp_path, ("true",), "queued-for-room"))
    sp.kill_tree("queued-for-room")  # its order's timeout ran out, or it was cancelled
    (refused,) = events_until(sp, 1)
    assert isinstance(refused, Refused) and refused.token == "queued-for-room"
    assert "killed before it could start" in refused.message and "too many open files" in refused.message
    sp.kill_tree("busy", grace=0.1)
    assert wait_exit(sp, "busy").returncode == -signal.SIGTERM


def test_a_start_that_waits_for_room_is_told_and_so_is_when_it_starts(sp: Spawner, tmp_path: Path) -> None:
    """The supervisor counted an order's timeout from the request: a start that waited for
    room longer than that was killed before it ran, a failure of the agent. It now hears
    which start waits and when it starts, and that a waiting start it killed never got room."""
    _running(sp, tmp_path, "hold", 0.3)
    _no_room_left(sp)
    sp.start(req(tmp_path, ("true",), "late"))
    assert [(e.token, getattr(e, "returncode", None)) for e in events_until(sp, 2)] == [("hold", 0), ("late", 0)]
    assert sp.room_news() == [("late", False), ("late", True)]
    assert sp.room_news() == []
    sp.spawn(req(tmp_path, ("true",), "at-once"))  # never waited: nothing to tell
    wait_exit(sp, "at-once")
    assert sp.room_news() == []

    _running(sp, tmp_path, "busy", 30)
    _no_room_left(sp)
    sp.start(req(tmp_path, ("true",), "never"))
    news: list[tuple[str, bool]] = []

    def told() -> bool:
        assert sp.poll() == []
        news.extend(sp.room_news())
        return bool(news)

    wait_until(told)
    assert news == [("never", False)]
    sp.kill_tree("never")  # its order was cancelled, or the supervisor stops
    (refused,) = events_until(sp, 1)
    assert isinstance(refused, Refused) and refused.room and refused.token == "never"
    assert sp.room_news() == []
    sp.kill_tree("busy", grace=0.1)
    wait_exit(sp, "busy")


def test_a_start_with_no_descriptor_free_and_nothing_running_says_what_to_raise(sp: Spawner, tmp_path: Path) -> None:
    _no_room_left(sp)
    sp.start(req(tmp_path, ("true",), "no-room"))

    (refused,) = events_until(sp, 1)
    assert isinstance(refused, Refused) and not refused.sandbox
    assert refused.message.startswith("cannot start the command: too many open files") and "ulimit -n" in refused.message


def test_the_server_holds_no_fds_for_finished_or_failed_spawns(sp: Spawner, tmp_path: Path) -> None:
    def fds() -> int:
        return len(os.listdir(f"/proc/{sp.server_pid}/fd"))

    baseline = fds()
    for i in range(10):
        sp.spawn(req(tmp_path, ("sh", "-c", "echo hi"), f"ok{i}", Ruleset((str(tmp_path),))))
        with pytest.raises(CoordinatorError):
            sp.spawn(req(tmp_path, ("no-such-agent-cli",), f"nf{i}"))
        with pytest.raises(CoordinatorError):
            sp.spawn(SpawnRequest(("true",), ENV, "/nonexistent", str(tmp_path / "x.log"), f"cwd{i}"))
    for i in range(10):
        assert wait_exit(sp, f"ok{i}").returncode == 0
        sp.kill_tree(f"ok{i}")
    # The read-only layer's namespaces are kept a little for the next starts, then let go.
    wait_until(lambda: fds() == baseline, timeout=mounts.LAYER_AGE + SCAN_INTERVAL + 5)


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _still(count: Callable[[], tuple[int, int]], timeout: float = 5.0) -> tuple[int, int]:
    """`count()` once it gives the same twice 0.1 s apart."""
    deadline = time.monotonic() + timeout
    last = count()
    while True:
        time.sleep(0.1)
        now = count()
        if now == last or time.monotonic() > deadline:
            return now
        last = now


@needs_landlock
def test_an_armed_start_runs_nothing_until_go_then_runs_sandboxed_as_any_start(sp: Spawner, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    script = f"echo ran > {work}/inside; echo bad > {tmp_path}/outside; echo done"
    sp.arm(req(work, ("sh", "-c", script), "armed", Ruleset((str(work),))))
    sp.start(req(tmp_path, ("sh", "-c", "echo other"), "between"))  # other starts go on meanwhile
    assert wait_exit(sp, "between").returncode == 0
    time.sleep(0.2)
    assert not (work / "inside").exists() and not (work / "armed.log").exists()  # nothing ran, no log
    assert marked("armed") == []
    sp.go("armed")
    assert wait_exit(sp, "armed").returncode == 0
    assert (work / "inside").read_text() == "ran\n"
    assert not (tmp_path / "outside").exists()  # the sandbox was prepared with it, and holds
    log = (work / "armed.log").read_text()
    assert ("Read-only file system" if mounts.status() is None else "Permission denied") in log
    assert log.endswith("done\n")


def test_a_disarmed_start_never_runs_and_keeps_nothing_in_the_server(sp: Spawner, tmp_path: Path) -> None:
    def fds() -> int:
        return len(os.listdir(f"/proc/{sp.server_pid}/fd"))

    # Counted once the server is still: a start-up probe's thread, joined already, may not have
    # left the task list yet (on a loaded machine), and the count then never came back to it.
    base_fds, base_threads = _still(lambda: (fds(), _threads(sp.server_pid)))
    for i in range(6):
        sp.arm(req(tmp_path, ("sh", "-c", f"touch {tmp_path}/ran-{i}"), f"dis{i}", Ruleset((str(tmp_path),))))
    sp.arm(req(tmp_path, ("sh", "-c", "touch never"), "dis0", Ruleset((str(tmp_path),))))  # armed again: once
    for i in range(6):
        sp.disarm(f"dis{i}")
    sp.go("dis3")  # dropped already: refused, never run
    refused = events_until(sp, 1)
    assert isinstance(refused[0], Refused) and refused[0].token == "dis3" and "not prepared" in refused[0].message
    assert sp.alive("dis1") is False
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("ran-", "never"))) == []
    wait_until(lambda: fds() == base_fds and _threads(sp.server_pid) == base_threads,
               timeout=mounts.LAYER_AGE + SCAN_INTERVAL + 5)


def test_an_armed_start_that_cannot_start_is_refused_at_its_go_as_a_start_is(sp: Spawner, tmp_path: Path) -> None:
    sp.arm(req(tmp_path, ("no-such-agent-cli", "-p"), "nf"))
    sp.arm(SpawnRequest(("true",), ENV, str(tmp_path / "gone"), str(tmp_path / "cwd.log"), "cwd"))
    sp.go("nf")
    sp.go("cwd")
    events = {e.token: e for e in events_until(sp, 2)}
    assert isinstance(events["nf"], Refused) and events["nf"].message == "command not found: no-such-agent-cli"
    assert isinstance(events["cwd"], Refused) and "cannot enter working folder" in events["cwd"].message
    assert "cannot enter working folder" in (tmp_path / "cwd.log").read_text()  # the log says why


def test_closing_the_server_with_a_start_armed_runs_it_never(tmp_path: Path) -> None:
    spawner = Spawner()
    spawner.arm(req(tmp_path, ("sh", "-c", f"touch {tmp_path}/ran"), "left", Ruleset((str(tmp_path),))))
    time.sleep(0.1)
    spawner.close(grace=0.5)
    assert spawner._proc.returncode == 0 and not (tmp_path / "ran").exists()


def test_fileno_wakes_select_when_a_child_exits(sp: Spawner, tmp_path: Path) -> None:
    sp.spawn(req(tmp_path, ("true",), "quick"))
    ready, _, _ = select.select([sp.fileno()], [], [], 30)
    assert ready
    assert [e.token for e in sp.poll()] == ["quick"]
    assert select.select([sp], [], [], 0)[0] == [] and sp.poll() == []


@needs_landlock
def test_a_sandboxed_child_writes_only_where_allowed(sp: Spawner, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        script = (f"echo ok > {work}/inside; echo bad > {tmp_path}/outside; "
                  f"kill -TERM {sleeper.pid}; kill -TERM {sp.server_pid}; true")
        sp.spawn(req(work, ("sh", "-c", script), "sbx", Ruleset((str(work),))))
        assert wait_exit(sp, "sbx").returncode == 0
        assert (work / "inside").read_text() == "ok\n"
        assert not (tmp_path / "outside").exists()
        log = (work / "sbx.log").read_text()
        # the read-only mounts (where they are on) refuse before Landlock is asked
        assert ("Read-only file system" if mounts.status() is None else "Permission denied") in log
        if ABI >= 6:
            assert sleeper.poll() is None  # nobody outside was signalled, nor the server
            assert log.count("Operation not permitted") == 2
    finally:
        sleeper.kill()
        sleeper.wait()


CAPS = ("sh", "-c", "grep ^Cap /proc/self/status")


def capabilities(status: str) -> dict[str, int]:
    """The Cap* lines of a /proc/<pid>/status, as numbers."""
    return {name: int(value, 16) for name, value in
            (line.split(":") for line in status.splitlines() if line.startswith("Cap"))}


def test_a_child_gets_no_capability_and_the_server_keeps_its_own(sp: Spawner, tmp_path: Path) -> None:
    """Everything runs as root: its exec would give a child every capability (load a module,
    write the raw disk) but those the launching thread gave up."""
    sandbox = Ruleset((str(tmp_path),)) if ABI >= 1 else None
    for token, rules in (("caps-sandboxed", sandbox), ("caps-plain", None)):
        sp.spawn(req(tmp_path, CAPS, token, rules))
        assert wait_exit(sp, token).returncode == 0
        caps = capabilities((tmp_path / f"{token}.log").read_text())
        assert sorted(caps) == ["CapAmb", "CapBnd", "CapEff", "CapInh", "CapPrm"], caps
        assert set(caps.values()) == {0}, (token, caps)
    # The server itself keeps what it works with (kill, reap, mount); it gave up only what an
    # exec would hand on, once, for every launcher thread it makes.
    server = capabilities(Path(f"/proc/{sp.server_pid}/status").read_text())
    ours = capabilities(Path("/proc/self/status").read_text())
    assert (server["CapEff"], server["CapPrm"]) == (ours["CapEff"], ours["CapPrm"]), (server, ours)
    assert server["CapBnd"] == server["CapInh"] == server["CapAmb"] == 0, server


NOT_ROOT = """
import select, sys
from coordinator.errors import SandboxError
from coordinator.spawner import Spawner, SpawnRequest
work = sys.argv[1]
with Spawner() as sp:
    try:
        sp.spawn(SpawnRequest(("sh", "-c", "grep ^Cap /proc/self/status"), {"PATH": "/usr/bin:/bin"},
                              work, work + "/log", "caps"))
    except SandboxError as e:
        sys.exit(str(e))
    while not (ends := sp.poll()):
        select.select([sp], [], [], 10)
sys.exit(ends[0].returncode)
"""
NOBODY = 65534


def _python_for(uid: int) -> str | None:
    """An interpreter user `uid` may run (ours may sit where only root can reach)."""
    for python in dict.fromkeys((sys.executable, "/usr/bin/python3")):
        with contextlib.suppress(OSError):
            if subprocess.run([python, "-c", "import select"], user=uid, group=uid, extra_groups=[],
                              capture_output=True, timeout=60).returncode == 0:
                return python
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="not root: every other test here is such a run")
def test_a_server_that_is_not_root_starts_children_with_the_capabilities_it_cannot_drop() -> None:
    """Without CAP_SETPCAP the bounding set stays; a child that is not root has nothing to lose."""
    python = _python_for(NOBODY)
    if python is None:
        pytest.skip("no Python here that user nobody may run")
    with tempfile.TemporaryDirectory() as work:
        os.chmod(work, 0o777)
        proc = subprocess.run([python, "-c", NOT_ROOT, work], capture_output=True, text=True, timeout=60,
                              env={**ENV, "PYTHONPATH": str(ROOT)}, user=NOBODY, group=NOBODY, extra_groups=[])
        assert proc.returncode == 0, proc.stderr
        caps = capabilities(Path(work, "log").read_text())
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapInh"] == caps["CapAmb"] == 0, caps
    assert caps["CapBnd"] != 0, caps  # what it could not drop, and need not: nobody has none to use


@pytest.mark.skipif(os.geteuid() != 0, reason="only root has capabilities to keep")
def test_a_root_server_that_cannot_drop_capabilities_starts_nothing(tmp_path: Path) -> None:
    # CAP_SETPCAP out of the bounding set: the server, root, is started without it.
    drop_setpcap = "import ctypes; assert ctypes.CDLL(None).prctl(24, 8, 0, 0, 0) == 0\n"
    proc = subprocess.run([sys.executable, "-c", drop_setpcap + NOT_ROOT, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**ENV, "PYTHONPATH": str(ROOT)})
    assert proc.stderr.strip().endswith("cannot drop capability 0 from the bounding set: "
                                        "Operation not permitted; a root specialist would keep it"), proc.stderr
    assert not (tmp_path / "log").read_text().startswith("Cap")  # nothing ran


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can start without its capabilities")
def test_a_root_server_started_without_capabilities_still_starts_children(tmp_path: Path) -> None:
    """A container that dropped every capability: nothing is left to drop, and no CAP_SETPCAP
    to drop it with; the children start, with nothing."""
    drop_all = ("import ctypes\nlibc = ctypes.CDLL(None)\n"
                "for cap in range(int(open('/proc/sys/kernel/cap_last_cap').read()) + 1):\n"
                "    assert libc.prctl(24, cap, 0, 0, 0) == 0\n")
    proc = subprocess.run([sys.executable, "-c", drop_all + NOT_ROOT, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**ENV, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    caps = capabilities((tmp_path / "log").read_text())
    assert caps["CapBnd"] == caps["CapEff"] == caps["CapPrm"] == 0, caps


def test_the_sandbox_is_never_silently_dropped(tmp_path: Path) -> None:
    spawner = Spawner()
    try:
        spawner.abi = 0  # as on a kernel without Landlock
        with pytest.raises(SandboxError, match="no Landlock"):
            spawner.spawn(req(tmp_path, ("true",), "x", Ruleset((str(tmp_path),))))
    finally:
        spawner.close()


TREE = r"""
import os, signal, sys, time
out, mode = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, signal.SIG_IGN)      # only SIGKILL ends this one
if os.fork() == 0:                                  # a plain grandchild
    with open(out + ".child", "w") as f: f.write(str(os.getpid()))
    signal.pause()
if os.fork() == 0:                                  # an escapee: setsid + double fork
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    if mode == "anonymous":                         # and it hides the attempt mark too
        os.execve("/bin/sh", ["sh", "-c", f"echo $$ > {out}.escapee; exec sleep 600"], {})
    with open(out + ".escapee", "w") as f: f.write(str(os.getpid()))
    while True: signal.pause()
with open(out + ".leader", "w") as f: f.write(str(os.getpid()))
while True: signal.pause()
"""


def _pids(base: Path) -> list[int]:
    parts = [Path(f"{base}.{k}") for k in ("leader", "child", "escapee")]
    wait_until(lambda: all(p.exists() and p.read_text().strip() for p in parts))
    return [int(p.read_text()) for p in parts]


def test_kill_tree_kills_grandchildren_and_escapees_and_leaves_no_zombie(
        sp: Spawner, tmp_path: Path) -> None:
    sp.spawn(req(tmp_path, py(tmp_path, TREE) + (str(tmp_path / "t"), "marked"), f"tree-{RUN}"))
    pids = _pids(tmp_path / "t")
    assert all(not gone(p) for p in pids) and sp.alive(f"tree-{RUN}")
    started = time.monotonic()
    sp.kill_tree(f"tree-{RUN}", grace=0.5)
    assert time.monotonic() - started < 0.5 + 5.0
    assert [p for p in pids if not gone(p)] == []  # dead and reaped: no zombie in /proc
    assert not sp.alive(f"tree-{RUN}") and marked(f"tree-{RUN}") == []
    assert wait_exit(sp, f"tree-{RUN}").returncode == -signal.SIGKILL


def test_a_detached_grandchild_cannot_write_after_kill_tree(sp: Spawner, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    # The grandchild detaches, outlives the specialist, and writes once it can open the fifo.
    code = (f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        open({str(work / 'ready')!r}, 'w').close()\n"
            f"        open({str(fifo)!r}).read()\n        open({str(work / 'late')!r}, 'w').write('x')\n"
            f"    os._exit(0)\n")
    sandbox = Ruleset((str(work),)) if ABI >= 1 else None
    sp.spawn(req(work, py(tmp_path, code), f"det-{RUN}", sandbox))
    assert wait_exit(sp, f"det-{RUN}").returncode == 0
    # the grandchild lives on, and alone (its parent, marked as well, may outlive the leader a moment)
    wait_until(lambda: (work / "ready").exists() and len(marked(f"det-{RUN}")) == 1)
    assert sp.alive(f"det-{RUN}")
    sp.kill_tree(f"det-{RUN}", grace=0.5)
    assert not sp.alive(f"det-{RUN}")
    with pytest.raises(OSError) as no_reader:  # nobody is left to read the fifo, so nobody writes
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert no_reader.value.errno == errno.ENXIO
    assert not (work / "late").exists()


def test_close_kills_even_escapees_that_hid_their_mark(tmp_path: Path) -> None:
    spawner = Spawner()
    try:
        spawner.spawn(req(tmp_path, py(tmp_path, TREE) + (str(tmp_path / "t"), "anonymous"), "anon"))
        pids = _pids(tmp_path / "t")
    finally:
        spawner.close(grace=0.5)
    assert [p for p in pids if not gone(p)] == []
    assert [e.returncode for e in spawner.poll()] == [-signal.SIGKILL]


# The leader leaves a daemon (setsid, double fork) per (pid file, mark) pair; "-" keeps the
# mark the server gave, anything else forges it. Then the leader exits, or stays with "stays".
DAEMONS = r"""
import os, signal, sys
from coordinator.spawner import MARK
*pairs, leader = sys.argv[1:]
for out, mark in zip(pairs[::2], pairs[1::2]):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            env = dict(os.environ, **({} if mark == "-" else {MARK: mark}))
            os.execve("/bin/sh", ["sh", "-c", f"echo $$ > {out}; exec sleep 600"], env)
        os._exit(0)
    os.wait()
if leader == "stays":
    signal.pause()
"""


def _daemons(*outs: Path) -> list[int]:
    wait_until(lambda: all(p.exists() and p.read_text().strip() for p in outs))
    return [int(p.read_text()) for p in outs]


def test_a_forged_mark_hides_no_process_from_its_attempts_kill(sp: Spawner, tmp_path: Path) -> None:
    """A mark naming no attempt, or one started after the process, is not believed."""
    token, later = f"forge-{RUN}", f"forge-later-{RUN}"
    made_up, named_later = tmp_path / "made-up", tmp_path / "later"
    sp.spawn(req(tmp_path, py(tmp_path, DAEMONS) + (str(made_up), f"made-up-{RUN}", str(named_later), later,
                                                    "exits"), token))
    wait_exit(sp, token)
    pids = _daemons(made_up, named_later)
    time.sleep(2 / os.sysconf("SC_CLK_TCK"))  # start times count clock ticks: start `later` on a later one
    sp.spawn(req(tmp_path, ("sleep", "600"), later))
    sp.kill_tree(token, grace=0.5)
    assert [p for p in pids if not gone(p)] == []
    assert sp.alive(later)  # the attempt the mark named is not the one that was killed


@pytest.mark.skipif(mounts.status() is not None, reason="no read-only mount layer here: starts share one namespace")
def test_a_mark_taken_from_another_running_attempt_hides_no_process(sp: Spawner, tmp_path: Path) -> None:
    """A token is no secret (state/ records it): an escapee that names an attempt started
    before it still lives in its own attempt's namespace, and dies with that attempt's kill."""
    rules = Ruleset(writable=(str(tmp_path),))
    victim, token = f"named-{RUN}", f"forger-{RUN}"
    sp.spawn(req(tmp_path, ("sleep", "600"), victim, rules))
    time.sleep(2 / os.sysconf("SC_CLK_TCK"))  # the forger's daemon starts on a later clock tick
    sp.spawn(req(tmp_path, py(tmp_path, DAEMONS) + (str(tmp_path / "daemon"), victim, "exits"), token, rules))
    assert not wait_exit(sp, token).alone
    [daemon] = _daemons(tmp_path / "daemon")
    assert daemon in marked(victim)
    sp.kill_tree(token, grace=0.5)
    assert gone(daemon)
    assert sp.alive(victim)  # the attempt it named is untouched


@pytest.mark.skipif(mounts.status() is not None, reason="no read-only mount layer here: starts share one namespace")
def test_the_daemon_of_a_leader_that_exits_at_once_stays_its_attempts(sp: Spawner, tmp_path: Path) -> None:
    """The leader is gone before the server could look at it: its daemon still counts as its
    attempt's (its namespace was read in the launching thread), not as nobody's."""
    rules = Ruleset(writable=(str(tmp_path),))
    quick, other = f"quick-{RUN}", f"other-{RUN}"
    sp.spawn(req(tmp_path, ("sh", "-c", f"setsid sleep 600 & echo $! > {tmp_path}/daemon"), quick, rules))
    wait_exit(sp, quick)
    [daemon] = _daemons(tmp_path / "daemon")
    sp.spawn(req(tmp_path, ("sleep", "600"), other, rules))
    sp.kill_tree(other, grace=0.5)
    assert not dead(daemon) and sp.alive(quick)
    sp.kill_tree(quick, grace=0.5)
    assert gone(daemon)


def test_a_daemon_caught_in_the_middle_of_an_exec_survives_another_attempts_kill(sp: Spawner,
                                                                              tmp_path: Path) -> None:
    """For a moment during exec a process's environment reads empty: a daemon known by its mark
    alone must not be taken for nobody's then (and killed with another attempt). This one does
    nothing but exec itself; without the fix about one kill in nine took it."""
    script = tmp_path / "reexec"
    script.write_text('#!/bin/sh\nexec /bin/sh "$0"\n')
    script.chmod(0o755)
    for i in range(30):
        keep, other, out = f"reexec-{i}-{RUN}", f"other-{i}-{RUN}", tmp_path / f"daemon-{i}"
        sp.spawn(req(tmp_path, ("sh", "-c", f"setsid {script} & echo $! > {out}"), keep))
        wait_exit(sp, keep)  # its leader gone: the daemon is the server's child, known by its mark
        [daemon] = _daemons(out)
        sp.spawn(req(tmp_path, ("sleep", "600"), other))
        sp.kill_tree(other, grace=0.5)
        assert not dead(daemon), f"run {i}: another attempt's kill took it"
        sp.kill_tree(keep, grace=0.5)
        assert gone(daemon)


def test_a_process_with_no_environment_is_waited_for_once_not_at_every_look() -> None:
    """The server waits for an empty environment to fill (an exec under way) before it calls a
    process nobody's; one that has none for good (`env -i`) is remembered, or every look at the
    processes (each second, and every 50 ms of a kill) stopped the server for 64 ms."""
    proc = subprocess.Popen(["sleep", "60"], env={}, start_new_session=True)
    try:
        wait_until(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"sleep"))
        envless: set[tuple[int, int]] = set()
        found = ownership.owners(os.getpid(), {}, {}, envless)
        start = next(p.start for p in found[None] if p.pid == proc.pid)
        assert (proc.pid, start) in envless  # the next look takes it for nobody's at once
        assert proc.pid in [p.pid for p in ownership.owners(os.getpid(), {}, {}, envless)[None]]
    finally:
        proc.kill()
        proc.wait()
    ownership.owners(os.getpid(), {}, {}, envless)
    assert (proc.pid, start) not in envless  # gone: forgotten


def test_a_running_attempts_daemon_survives_another_attempts_kill(sp: Spawner, tmp_path: Path) -> None:
    sp.spawn(req(tmp_path, py(tmp_path, DAEMONS) + (str(tmp_path / "daemon"), "-", "stays"), f"keep-{RUN}"))
    sp.spawn(req(tmp_path, ("sleep", "600"), f"other-{RUN}"))
    [daemon] = _daemons(tmp_path / "daemon")
    wait_until(lambda: daemon in marked(f"keep-{RUN}"))
    sp.kill_tree(f"other-{RUN}", grace=0.5)
    assert not dead(daemon) and sp.alive(f"keep-{RUN}")
    sp.kill_tree(f"keep-{RUN}", grace=0.5)
    assert gone(daemon)


# The main thread ends alone (the raw exit system call, not exit_group as os._exit) while
# another thread sleeps on: /proc then shows the process as a zombie, though it still runs.
SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(os.uname().machine)
needs_sys_exit = pytest.mark.skipif(SYS_EXIT is None, reason=f"no exit system call number for {os.uname().machine}")
LONE_EXIT = r"""
import ctypes, os, signal, sys, threading, time
out, mode, sys_exit = sys.argv[1], sys.argv[2], int(sys.argv[3])
signal.signal(signal.SIGTERM, signal.SIG_IGN)      # only SIGKILL ends this one
if mode == "detached":                              # it escapes: setsid, and its parent exits
    if os.fork() != 0:
        os._exit(0)
    os.setsid()
threading.Thread(target=time.sleep, args=(600,)).start()
with open(out, "w") as f: f.write(str(os.getpid()))
ctypes.CDLL(None).syscall(ctypes.c_long(sys_exit), ctypes.c_long(0))
"""


def lone_exit(tmp_path: Path, mode: str) -> tuple[str, ...]:
    return py(tmp_path, LONE_EXIT) + (str(tmp_path / "lone"), mode, str(SYS_EXIT))


def main_thread_exited(pid: int) -> bool:
    """`pid` shows as a zombie while another of its threads runs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state == b"Z" and len(os.listdir(f"/proc/{pid}/task")) == 2
    except (FileNotFoundError, ProcessLookupError):
        return False


@contextlib.contextmanager
def killed_at_end(pid: int) -> Iterator[None]:
    """SIGKILL `pid` when the test ends, however it ends (through a pidfd: no reused pid is hit)."""
    fd = os.pidfd_open(pid)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)


@needs_sys_exit
def test_a_leader_whose_main_thread_exited_alone_is_alive_and_killed(sp: Spawner, tmp_path: Path) -> None:
    token = f"lone-{RUN}"
    pid = sp.spawn(req(tmp_path, lone_exit(tmp_path, "leader"), token))
    with killed_at_end(pid):
        wait_until(lambda: main_thread_exited(pid))
        assert sp.alive(token)
        started = time.monotonic()
        sp.kill_tree(token, grace=0.5)
        assert time.monotonic() - started < 0.5 + 5.0
        assert gone(pid) and not sp.alive(token)
        assert wait_exit(sp, token).returncode == -signal.SIGKILL


@needs_sys_exit
def test_an_escapee_whose_main_thread_exited_alone_is_its_attempts_and_killed_with_it(
        sp: Spawner, tmp_path: Path) -> None:
    token, other = f"lone-esc-{RUN}", f"lone-other-{RUN}"
    sp.spawn(req(tmp_path, lone_exit(tmp_path, "detached"), token))
    assert wait_exit(sp, token).returncode == 0
    wait_until(lambda: (tmp_path / "lone").exists() and (tmp_path / "lone").read_text() != "")
    pid = int((tmp_path / "lone").read_text())
    with killed_at_end(pid):
        wait_until(lambda: main_thread_exited(pid))
        assert sp.alive(token)
        # Its mark is read through the thread that runs on: it is not taken for nobody's,
        # which every other attempt's kill would have to wait for.
        sp.spawn(req(tmp_path, ("sleep", "600"), other))
        sp.kill_tree(other, grace=0.5)
        assert main_thread_exited(pid)
        started = time.monotonic()
        sp.kill_tree(token, grace=0.5)
        assert time.monotonic() - started < 0.5 + 5.0
        assert gone(pid) and not sp.alive(token)


OWNER = r"""
import json, os, sys
from coordinator.landlock import Ruleset
from coordinator.spawner import Spawner, SpawnRequest
sp = Spawner()
tmp = sys.argv[1]
env = {"PATH": os.environ["PATH"]}
a = sp.spawn(SpawnRequest(("sleep", "600"), env, tmp, tmp + "/a.log", "own-a-" + sys.argv[2]))
b = sp.spawn(SpawnRequest(("sh", "-c", "setsid sleep 600 & exec sleep 600"), env, tmp, tmp + "/b.log",
                          "own-b-" + sys.argv[2], Ruleset((tmp,))))
print(json.dumps({"server": sp.server_pid, "pids": [a, b]}), flush=True)
sys.stdin.read()
"""


def test_kill_9_of_the_supervisor_kills_its_children(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), RUN], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert owner.stdout is not None
    info = json.loads(owner.stdout.readline())
    wait_until(lambda: len(marked(f"own-b-{RUN}")) == 2)  # the setsid'd sleeper has started
    victims = info["pids"] + marked(f"own-b-{RUN}")
    fds = [os.pidfd_open(p) for p in {info["server"], *victims}]
    owner.kill()
    owner.wait()
    try:
        waiting = list(fds)
        deadline = time.monotonic() + 30
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(waiting, [], [], 1.0)
            waiting = [fd for fd in waiting if fd not in ready]
        assert waiting == []
    finally:
        for fd in fds:
            os.close(fd)
    wait_until(lambda: all(gone(p) for p in victims))  # reaped, not left as zombies
    assert marked(f"own-a-{RUN}") == [] and marked(f"own-b-{RUN}") == []


def test_kill_leftovers_finds_marked_trees_without_a_server(tmp_path: Path) -> None:
    env = {**ENV, MARK: f"dead-1-{RUN}"}
    tree = subprocess.Popen(["sh", "-c", "setsid sleep 600 & sleep 600"], env=env, start_new_session=True)
    other = subprocess.Popen(["sleep", "600"], env={**ENV, MARK: f"alive-1-{RUN}"})
    try:
        wait_until(lambda: len(marked(f"dead-1-{RUN}")) == 3)
        assert kill_leftovers([f"dead-1-{RUN}"]) == 3
        assert tree.wait(timeout=10) == -signal.SIGKILL
        assert marked(f"dead-1-{RUN}") == []
        assert other.poll() is None  # another token is left alone
        assert kill_leftovers([]) == 0
    finally:
        other.kill()
        other.wait()


@needs_landlock
@pytest.mark.skipif(mounts.status() is not None, reason=f"no read-only mount layer here: {mounts.status()}")
def test_a_sandboxed_child_sees_every_mount_read_only_but_its_folders(sp: Spawner, tmp_path: Path) -> None:
    """Its own mount namespace: read-only mounts everywhere, writable copies of its folders, and
    nothing of it reaches the machine's mount table."""
    work, extra = tmp_path / "work", tmp_path / "extra"
    for folder in (work, extra, work / "inner"):
        folder.mkdir()
    before = Path("/proc/self/mountinfo").read_text()
    code = ("import os\n"
            "for line in open('/proc/self/mountinfo'):\n"
            "    f = line.split()\n"
            "    print(f[4], 'rw' if 'rw' in f[5].split(',') else 'ro')\n")
    rules = Ruleset((str(work / "inner"), str(extra)), mounts_writable=(str(work), str(extra), str(work / "inner")))
    sp.spawn(req(work, py(tmp_path, code), "mnt", rules))
    assert wait_exit(sp, "mnt").returncode == 0
    seen = dict(line.split() for line in (work / "mnt.log").read_text().splitlines())
    assert seen.pop(str(work)) == "rw" and seen.pop(str(extra)) == "rw"  # one copy each, inner inside work
    assert seen and set(seen.values()) == {"ro"}, seen  # "/" included
    assert "/" in seen
    assert Path("/proc/self/mountinfo").read_text() == before


def _namespace_and(tmp_path: Path, sp: Spawner, token: str, writable: Path, script: str) -> list[str]:
    """Run `script` sandboxed with `writable` its only folder; the lines it printed, the first
    being its mount namespace's identity."""
    sp.spawn(req(tmp_path, ("sh", "-c", f"stat -L -c %i /proc/self/ns/mnt; {script}"), token,
                 Ruleset((str(writable),))))
    assert wait_exit(sp, token).returncode == 0
    return (tmp_path / f"{token}.log").read_text().splitlines()


@needs_landlock
@pytest.mark.skipif(mounts.status() is not None, reason=f"no read-only mount layer here: {mounts.status()}")
def test_a_start_in_a_kept_namespace_can_change_nothing_of_the_start_before(sp: Spawner, tmp_path: Path) -> None:
    """The namespace of an attempt that left nothing behind serves the next start: the copies of
    the first attempt's folders are read-only there, for root too, and only the new ones writable."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    ns, *_ = _namespace_and(tmp_path, sp, "one", first, f"echo kept > {first}/file")
    tries = (f"chmod 700 {first}", f"chmod 600 {first}/file", f"touch -m {first}/file", f"echo x > {first}/new",
             f"ln -s x {first}/link")
    script = "; ".join(f"({t}) 2>/dev/null && echo changed || echo refused" for t in tries)
    again, *said = _namespace_and(tmp_path, sp, "two", second, f"{script}; echo mine > {second}/file")
    assert again == ns  # the same namespace: what is tested here is its reuse
    assert said == ["refused"] * len(tries)
    assert (second / "file").read_text() == "mine\n" and not (first / "new").exists()
    assert (first / "file").stat().st_mode & 0o777 == 0o644


@needs_landlock
@pytest.mark.skipif(mounts.status() is not None, reason=f"no read-only mount layer here: {mounts.status()}")
def test_a_folder_renamed_after_its_start_is_sealed_under_its_new_name(sp: Spawner, tmp_path: Path) -> None:
    """A folder renamed on the machine takes its copy in a kept namespace along: the copy is
    sealed as such, not looked for by its old name."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    ns, *_ = _namespace_and(tmp_path, sp, "one", first, f"echo kept > {first}/file")
    moved = first.rename(tmp_path / "moved")
    tries = (f"chmod 700 {moved}", f"chmod 600 {moved}/file", f"touch -m {moved}/file")
    script = "; ".join(f"({t}) 2>/dev/null && echo changed || echo refused" for t in tries)
    again, *said = _namespace_and(tmp_path, sp, "two", second, script)
    assert again == ns
    assert said == ["refused"] * len(tries)
    assert (moved / "file").stat().st_mode & 0o777 == 0o644


@needs_landlock
@pytest.mark.skipif(mounts.status() is not None, reason=f"no read-only mount layer here: {mounts.status()}")
def test_the_same_folder_in_two_starts_in_a_row_is_writable_for_each(sp: Spawner, tmp_path: Path) -> None:
    """A retry works in the same working copy: sealing the first start's copy leaves the second its own."""
    work = tmp_path / "work"
    work.mkdir()
    ns, *_ = _namespace_and(tmp_path, sp, "try1", work, f"echo 1 > {work}/one")
    again, *_ = _namespace_and(tmp_path, sp, "try2", work, f"echo 2 > {work}/two; chmod 600 {work}/one")
    assert again == ns
    assert (work / "two").read_text() == "2\n" and (work / "one").stat().st_mode & 0o777 == 0o600


@needs_landlock
@pytest.mark.skipif(mounts.status() is not None, reason=f"no read-only mount layer here: {mounts.status()}")
def test_a_namespace_a_process_lived_on_in_serves_no_other_start(sp: Spawner, tmp_path: Path) -> None:
    """A process left behind (a daemon) would see the next attempt's folders writable: the
    namespace it lives in is never given to another start."""
    left, later = tmp_path / "left", tmp_path / "later"
    left.mkdir(), later.mkdir()
    ns, *_ = _namespace_and(tmp_path, sp, "left", left, f"setsid sleep 600 > /dev/null 2>&1 & echo $! > {left}/daemon")
    [daemon] = _daemons(left / "daemon")
    other, *_ = _namespace_and(tmp_path, sp, "later", later, "true")
    assert other != ns
    sp.kill_tree("left", grace=0.5)
    assert gone(daemon)


def test_kept_namespaces_serve_a_bounded_number_of_starts_for_a_bounded_time() -> None:
    def layer(made: float, uses: int = 1) -> mounts.Layer:
        return mounts.Layer(os.open(os.devnull, os.O_RDONLY), 0, made, [], uses)

    def closed(kept: mounts.Layer) -> bool:
        try:
            os.fstat(kept.fd)
        except OSError:
            return True
        os.close(kept.fd)
        return False

    layers = mounts.Layers()
    worn, young = layer(0.0, mounts.LAYER_USES), layer(0.0)
    layers.give_back(worn, 0.0)
    layers.give_back(young, 0.0)
    assert closed(worn) and layers.take(0.0) is young
    layers.give_back(young, 0.0)
    assert layers.take(mounts.LAYER_AGE) is None and closed(young)  # it saw the mounts of then
    many = [layer(0.0) for _ in range(mounts.LAYERS_FREE + 1)]
    for kept in many:
        layers.give_back(kept, 0.0)
    assert [closed(kept) for kept in many] == [False] * mounts.LAYERS_FREE + [True]


NO_MOUNT_ADMIN = """
import ctypes, json, select, sys
from pathlib import Path
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(24, 21, 0, 0, 0) != 0:  # CAP_SYS_ADMIN out of the bounding set, as for a non-root user
    sys.exit("cannot drop CAP_SYS_ADMIN")
from coordinator.landlock import Ruleset
from coordinator.spawner import Spawner, SpawnRequest
work, out = Path(sys.argv[1]), Path(sys.argv[2])
with Spawner() as sp:
    script = (f"echo ok > {work}/inside; echo bad > {out}; grep ^Cap /proc/self/status; "
              f"awk '$5 == \\"/\\" {{print \\"root:\\", $6}}' /proc/self/mountinfo")
    sp.spawn(SpawnRequest(("sh", "-c", script), {"PATH": "/usr/bin:/bin"},
                          str(work), str(work / "log"), "nocap", Ruleset((str(work),))))
    while not (ends := sp.poll()):
        select.select([sp], [], [], 10)
print(json.dumps({"code": ends[0].returncode, "log": (work / "log").read_text()}))
"""


@needs_landlock
def test_without_the_read_only_layer_landlock_alone_still_runs_the_sandbox(tmp_path: Path) -> None:
    """A supervisor that may not make mount namespaces (not root) runs sandboxed children under
    Landlock alone: writes outside are refused with EACCES, nothing is refused for want of the layer."""
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", NO_MOUNT_ADMIN, str(work), str(tmp_path / "outside")],
                          capture_output=True, text=True, timeout=60, env={**ENV, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert "root: rw," in seen["log"], seen["log"]  # no read-only mounts here ...
    assert seen["code"] == 0 and (work / "inside").read_text() == "ok\n"  # ... and the child ran
    assert not (tmp_path / "outside").exists() and "Permission denied" in seen["log"]
    assert set(capabilities(seen["log"]).values()) == {0}  # dropped without the read-only layer too


def test_kill_leftovers_finds_a_process_caught_in_the_middle_of_an_exec(tmp_path: Path) -> None:
    """For a moment during exec a process's environment reads empty; recovery must not miss
    it then. This one does nothing but exec itself (one read in nine fell in that moment)."""
    script = tmp_path / "reexec"
    script.write_text('#!/bin/sh\nexec /bin/sh "$0"\n')
    script.chmod(0o755)
    for i in range(40):
        token = f"exec-{i}-{RUN}"
        proc = subprocess.Popen([str(script)], env={**ENV, MARK: token}, start_new_session=True)
        try:
            wait_until(lambda t=token: len(marked(t)) == 1)
            assert kill_leftovers([token]) == 1, f"run {i}: the process was missed"
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            proc.kill()
            proc.wait()


@needs_sys_exit
def test_kill_leftovers_kills_a_process_whose_main_thread_exited_alone(tmp_path: Path) -> None:
    token = f"lone-left-{RUN}"
    proc = subprocess.Popen(lone_exit(tmp_path, "leader"), env={**ENV, MARK: token}, start_new_session=True)
    try:
        wait_until(lambda: main_thread_exited(proc.pid))
        assert kill_leftovers([token]) == 1
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def test_the_log_keeps_head_and_tail_of_50_mib(tmp_path: Path) -> None:
    spawner = Spawner(log_cap=1 << 20)
    try:
        flood = "yes 0123456789abcdef | head -c 52428800; echo THE-END"
        spawner.spawn(req(tmp_path, ("sh", "-c", flood), "flood"))
        assert wait_exit(spawner, "flood").returncode == 0
    finally:
        spawner.close()
    data = (tmp_path / "flood.log").read_bytes()
    assert len(data) <= (1 << 20) + 100
    head, marker, tail = data.partition(b"\n[coordinator: ")
    assert head.startswith(b"0123456789abcdef\n0123")
    dropped = int(tail.split(b" ", 1)[0])
    kept = len(head) + len(tail.split(b"here]\n", 1)[1])
    assert dropped + kept == 52428800 + len("THE-END\n")
    assert data.endswith(b"0123456789abcdef\n" * 3 + b"0THE-END\n")  # 50 MiB = 17 * k + 1


def test_log_mtime_moves_whenever_the_child_prints_past_the_cap(tmp_path: Path) -> None:
    poke = tmp_path / "poke"
    os.mkfifo(poke)
    code = (f"import os\nos.write(1, b'a' * 10000)\nfor i in range(2):\n"
            f"    open({str(poke)!r}).read()\n    os.write(1, b'b' * 100)\n")
    spawner = Spawner(log_cap=4096)
    log = tmp_path / "chatty.log"
    try:
        spawner.spawn(req(tmp_path, py(tmp_path, code), "chatty"))
        wait_until(lambda: b"bytes of output dropped" in log.read_bytes())
        for _ in range(2):
            os.utime(log, (1, 1))
            with open(poke, "w") as f:
                f.write("go")
            wait_until(lambda: log.stat().st_mtime > 1)
        assert wait_exit(spawner, "chatty").returncode == 0
    finally:
        spawner.close()
    data = log.read_bytes()
    assert data.startswith(b"a" * 2048) and data.endswith(b"a" * 1848 + b"b" * 200)
    assert b"[coordinator: 6104 bytes of output dropped here]" in data


def test_a_dead_server_is_reported_and_its_orphans_found_by_kill_leftovers(tmp_path: Path) -> None:
    spawner = Spawner()
    try:
        assert os.getsid(spawner.server_pid) != os.getsid(0)  # a Ctrl-C for us never reaches it
        pid = spawner.spawn(req(tmp_path, ("sleep", "600"), f"orphan-{RUN}"))
        os.kill(spawner.server_pid, signal.SIGKILL)
        with pytest.raises(SupervisorError, match="spawn server stopped"):
            spawner.spawn(req(tmp_path, ("true",), "next"))
        with pytest.raises(SupervisorError, match="spawn server stopped"):
            spawner.poll()
    finally:
        spawner.close()
    assert not dead(pid)  # nobody killed it yet: recovery does
    assert kill_leftovers([f"orphan-{RUN}"]) == 1
    assert dead(pid)


def test_an_argument_too_long_for_exec_is_named_with_what_to_do(sp: Spawner, tmp_path: Path) -> None:
    """A brief over 128 KiB passed as {brief_text} failed with only "Argument list too long"."""
    with pytest.raises(CoordinatorError, match=r"^cannot run /bin/echo: argument 1 is 195 KiB, over the 128 KiB "
                                               r"one argument may hold \(a brief passed as \{brief_text\}\?\): "
                                               r"pass the brief's path, \{brief\}"):
        sp.spawn(req(tmp_path, ("/bin/echo", "x" * 200_000), "big"))
    sp.spawn(req(tmp_path, ("true",), "after"))  # the server carries on
    assert wait_exit(sp, "after").returncode == 0
