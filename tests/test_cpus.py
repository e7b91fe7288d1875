"""Children start on the fork server's CPU and are freed at once: a specialist, and whatever it
started in its first moments, may use every CPU the supervisor may. Real processes throughout."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.cpus import Cpus
from coordinator.landlock import Ruleset
from coordinator.spawner import SCAN_INTERVAL, Exit, Spawner, SpawnRequest

ALLOWED = frozenset(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="one CPU: no child is ever held to one")
HOME = frozenset({max(ALLOWED)}) if ALLOWED else frozenset()
ENV = {"PATH": os.environ.get("PATH", os.defpath)}

# A thread and two processes made at once (while held to HOME, as a child that forked before
# the server freed it), and a process that chose another CPU for itself.
TREE = """
import os, subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
kids = [subprocess.Popen(["sh", "-c", "sleep 60 & exec sleep 60"])]
own = subprocess.Popen(["sleep", "60"])
os.sched_setaffinity(own.pid, {int(sys.argv[1])})
print(own.pid, flush=True)
time.sleep(60)
"""


def wait_until(what: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def tree(pid: int) -> list[int]:
    """`pid`, its threads and every process below it (thread ids and process ids alike)."""
    out, stack = [], [pid]
    while stack:
        proc = stack.pop()
        with contextlib.suppress(OSError):  # gone meanwhile
            for tid in os.listdir(f"/proc/{proc}/task"):
                out.append(int(tid))
                stack += [int(p) for p in Path(f"/proc/{proc}/task/{tid}/children").read_text().split()]
    return out


def test_free_lets_a_held_tree_use_every_cpu_and_leaves_a_process_that_chose_alone() -> None:
    cpus = Cpus(ALLOWED, HOME)
    mine = min(ALLOWED)
    proc = subprocess.Popen([sys.executable, "-c", TREE, str(mine)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, HOME))
    try:
        assert proc.stdout is not None
        own = int(proc.stdout.readline())
        wait_until(lambda: len(tree(proc.pid)) >= 5)  # python and its thread, two sleeps, own
        assert {frozenset(os.sched_getaffinity(t)) for t in tree(proc.pid) if t != own} == {HOME}
        cpus.free(proc.pid)
        found = {t: frozenset(os.sched_getaffinity(t)) for t in tree(proc.pid)}
        assert found.pop(own) == {mine}  # its own choice, not the server's CPU: kept
        assert set(found.values()) == {ALLOWED}, found
    finally:
        for pid in reversed(tree(proc.pid)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_free_of_a_process_gone_or_without_a_home_does_nothing() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    Cpus(ALLOWED, HOME).free(proc.pid)  # reaped: nothing to free, nothing raised
    Cpus(ALLOWED, None).free(os.getpid())
    assert frozenset(os.sched_getaffinity(0)) == ALLOWED


def test_a_specialist_and_what_it_starts_at_once_may_use_every_cpu(tmp_path: Path) -> None:
    """Through the fork server, sandboxed: the child and a grandchild forked at its very start
    each say, a moment later, which CPUs they may use."""
    script = ("(sleep 0.2; grep Cpus_allowed_list /proc/self/status > grandchild) & "
              "sleep 0.2; grep Cpus_allowed_list /proc/self/status > child; wait")
    expected = next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("Cpus_allowed_list"))
    with Spawner() as sp:
        for i in range(5):
            run = tmp_path / f"run{i}"
            run.mkdir()
            token = f"cpus-{i}-{os.getpid()}"
            sp.spawn(SpawnRequest(("sh", "-c", script), ENV, str(run), str(tmp_path / f"{token}.log"), token,
                                  Ruleset(writable=(str(run),))))
            end = time.monotonic() + 30
            while not any(isinstance(e, Exit) and e.token == token for e in sp.poll()):
                assert time.monotonic() < end, "the child never ended"
                time.sleep(0.01)
            assert (run / "child").read_text().strip() == expected
            assert (run / "grandchild").read_text().strip() == expected


def _spawned(sp: Spawner, tmp_path: Path, script: str, token: str) -> Path:
    run = tmp_path / token
    run.mkdir()
    sp.spawn(SpawnRequest(("sh", "-c", script), ENV, str(run), str(tmp_path / f"{token}.log"), token,
                          Ruleset(writable=(str(run),))))
    wait_until(lambda: (run / "gc").exists() and (run / "gc").read_text().strip() != "")
    return run


@pytest.mark.skipif(shutil.which("taskset") is None, reason="no taskset here")
def test_a_process_made_in_the_moment_before_its_parent_was_freed_is_freed_at_the_next_look(
        tmp_path: Path) -> None:
    """The leader holds itself to the server's CPU in its first moments, after the fork server
    freed it (as though that had not happened yet), and forks: the grandchild is freed at the
    server's next look or the one after."""
    home = max(ALLOWED)
    script = f'sleep 0.05; exec taskset -c {home} sh -c "sleep 30 & echo \\$! > gc; exec sleep 30"'
    with Spawner() as sp:
        run = _spawned(sp, tmp_path, script, f"moment-{os.getpid()}")
        gc = int((run / "gc").read_text())
        wait_until(lambda: frozenset(os.sched_getaffinity(gc)) == ALLOWED, timeout=2 * SCAN_INTERVAL + 5)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="no taskset here")
def test_a_process_that_takes_the_servers_cpu_later_keeps_its_choice(tmp_path: Path) -> None:
    home = max(ALLOWED)
    script = f"sleep 0.3; taskset -c {home} sleep 30 & echo $! > gc; sleep 0.3; exec taskset -c {home} sleep 30"
    with Spawner() as sp:
        token = f"later-{os.getpid()}"
        run = _spawned(sp, tmp_path, script, token)
        gc = int((run / "gc").read_text())
        time.sleep(2 * SCAN_INTERVAL + 0.5)  # two looks at the attempt's processes
        assert frozenset(os.sched_getaffinity(gc)) == {home}
        assert sp.alive(token)
        sp.kill_tree(token, grace=0.5)
