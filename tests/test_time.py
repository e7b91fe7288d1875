"""Time: a wall clock that steps (NTP, a date set by hand, a resume), long runs, time stamps."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import drop, order_md, sh, step_until

from bench.harness import probe_of
from coordinator import forkserver
from coordinator.audit import StateRepo
from coordinator.store import Store
from coordinator.supervisor import Supervisor


class SteppingClock:
    """The wall clock of a machine whose time is stepped while the supervisor runs."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _run_stepped(ws, step: float, *, wait: float = 30.0) -> tuple[Store, list[bool], list[str]]:
    """Run order `a` to its end, stepping the supervisor's clock by `step` once it runs."""
    clock, seen, lines = SteppingClock(), [], []
    with Supervisor(ws, clock=clock, log=lines.append) as sup:
        step_until(sup, lambda: "a" in sup.records and sup.records["a"].status == "running", "the order to run")
        clock.offset += step
        step_until(sup, lambda: seen.append(sup.records["a"].stale) or sup.records["a"].terminal,
                   "the order to end", wait=wait)
    return Store(ws.state), seen, lines


def test_a_clock_stepped_a_day_ahead_neither_times_out_nor_flags_stale_a_running_attempt(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 1; echo finished"), "timeout": "30m",
                           "stale_after": "10m", "max_failures": 1}})
    drop(ws, "chip", "a.md", order_md("Works for a second", id="a"))
    store, seen, lines = _run_stepped(ws, 86400)
    rec = store.load("a")
    assert (rec.status, rec.attempts, rec.failures) == ("done", 1, []), rec.failures
    assert True not in seen
    assert not any("timed out" in line or "stale" in line for line in lines), lines


def test_a_clock_stepped_an_hour_back_does_not_hold_off_the_timeout(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 30"), "timeout": "1s", "max_failures": 1}})
    drop(ws, "chip", "a.md", order_md("Hangs past its timeout", id="a"))
    started = time.monotonic()
    store, _, _ = _run_stepped(ws, -3600, wait=20)
    rec = store.load("a")
    assert rec.status == "blocked" and rec.failures[0].startswith("timed out after 1.0s"), rec.failures
    assert time.monotonic() - started < 10


def test_a_clock_stepped_an_hour_back_still_flags_a_silent_attempt_stale(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 1.5"), "stale_after": "0.3s"}})
    drop(ws, "chip", "a.md", order_md("Works quietly", id="a"))
    store, seen, _ = _run_stepped(ws, -3600)
    assert store.load("a").status == "done"
    # Flagged while it ran, though its log's time is an hour "ahead" of the clock now.
    assert True in seen
    lines = [e.line for e in StateRepo(ws.state).entries("a")]
    assert "a chip: stale (no output or heartbeat for 0.3s)" in lines, lines


REQUEUE_ON_DEP = ('printf "outcome: requeue-with-blocker\\nblocker: dep\\nsummary: waits for dep\\n" '
                  '> "$COORD_RESULT"')


def test_a_requeue_on_an_order_done_before_the_clock_was_stepped_back_is_a_failed_attempt(make_ws):
    """Done at 10:00, then the clock set back to 9:05: the attempt that started after it
    looked older than it by their times, its requeue on it was taken, and the order ran
    again at once, for the hour (1,174 runs in 8 s of `supervise --once`)."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        'if [ "$COORD_ORDER_ID" = loop ]; then echo ran >> "$PROBE/ran.txt"; ' + REQUEUE_ON_DEP + '; fi')}})
    clock = SteppingClock()
    drop(ws, "chip", "a.md", order_md("Dependency is done", id="dep"))
    with Supervisor(ws, clock=clock) as sup:
        sup.run_once(limit=20)
        assert sup.records["dep"].status == "done"
        clock.offset -= 3600
        drop(ws, "chip", "b.md", order_md("Loop is done", id="loop",
                                          branching=("requeue-with-blocker if a dependency is missing",)))
        step_until(sup, lambda: "loop" in sup.records and sup.records["loop"].terminal, "the order to end", wait=30)
        rec = sup.store.with_detail(sup.records["loop"])
    assert rec.status == "blocked", rec.history[-3:]
    assert (probe_of(ws) / "ran.txt").read_text().split() == ["ran", "ran"]  # max_failures: 2
    assert "dep was already done when this attempt started" in rec.failures[-1], rec.failures


def test_a_requeue_on_an_order_done_while_it_ran_is_taken_though_the_clock_was_stepped_back(make_ws):
    """The other way round: started at 10:00, the clock set back, its blocker done at 9:05
    looked done before it started, and a fair requeue was a failed attempt."""
    ws = make_ws({"chip": {"role": "specialist", "max_parallel": 2, "max_failures": 1, "command": sh(
        'if [ "$COORD_ORDER_ID" = dep ]; then until [ -e "$PROBE/loop-runs" ]; do sleep 0.02; done; exit 0; fi; '
        'if [ ! -e "$PROBE/loop-ran" ]; then touch "$PROBE/loop-ran" "$PROBE/loop-runs"; sleep 0.5; '
        + REQUEUE_ON_DEP + '; fi')}})
    clock = SteppingClock()
    drop(ws, "chip", "b.md", order_md("Loop is done", id="loop", priority="high",
                                      branching=("requeue-with-blocker if a dependency is missing",)))
    drop(ws, "chip", "a.md", order_md("Dependency is done", id="dep"))
    with Supervisor(ws, clock=clock) as sup:
        step_until(sup, lambda: "loop" in sup.records and sup.records["loop"].status == "running", "loop to run")
        clock.offset -= 3600
        step_until(sup, lambda: sup.records["loop"].terminal, "the order to end", wait=30)
        rec = sup.store.with_detail(sup.records["loop"])
    assert sup.records["dep"].status == "done"
    assert rec.status == "done", rec.failures
    assert [h["to"] for h in rec.history] == ["queued", "running", "waiting", "queued", "running", "done"]


def _inbox_on_a_file_system_whose_clock_runs_ahead(ws, tmp_path: Path, name: str, text: str, ahead: int) -> Path:
    """Mount, as inbox/chip, a small ext4 file system holding one finished file whose mtime and
    ctime are `ahead` seconds ahead of this machine's clock: what a file server whose clock runs
    ahead hands out (this machine cannot change a ctime of its own)."""
    if os.geteuid() != 0 or not (shutil.which("mkfs.ext4") and shutil.which("debugfs")):
        pytest.skip("needs root, mkfs.ext4 and debugfs to make a file changed in the future")
    source, image = tmp_path / name, tmp_path / "inbox.img"
    source.write_text(text)
    with image.open("wb") as f:
        f.truncate(8 << 20)
    stamp = f"@{int(time.time()) + ahead}"
    for cmd in (["mkfs.ext4", "-q", "-F", str(image)],
                ["debugfs", "-w", "-R", f"write {source} {name}", str(image)],
                ["debugfs", "-w", "-R", f"set_inode_field {name} mtime {stamp}", str(image)],
                ["debugfs", "-w", "-R", f"set_inode_field {name} ctime {stamp}", str(image)]):
        subprocess.run(cmd, check=True, capture_output=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(ws.inbox("chip"))], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a file system image here: {mounted.stderr.strip()}")
    shutil.rmtree(ws.inbox("chip") / "lost+found")
    return ws.inbox("chip") / name


def test_a_file_changed_an_hour_ahead_of_this_clock_is_taken_in_when_polling(make_ws, tmp_path):
    """`supervise --poll` on a network inbox whose server's clock runs an hour ahead (or after
    this clock was set back): a finished order's ctime was in the future, and it waited that
    hour in the inbox, without a word (`--once` did not end). Now it is taken in once it has
    stayed unchanged for the quiet period, and the supervisor says why the times look odd."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    path = _inbox_on_a_file_system_whose_clock_runs_ahead(
        ws, tmp_path, "a.md", order_md("An order from a server ahead of us runs", id="a"), 3600)
    try:
        assert path.stat().st_ctime > time.time() + 3000
        said: list[str] = []
        start = time.monotonic()
        with Supervisor(ws, poll=True, log=said.append) as sup:
            sup.run_once(limit=20)
        took = time.monotonic() - start
    finally:
        subprocess.run(["umount", "-l", str(ws.inbox("chip"))], check=False)
    assert Store(ws.state).load("a").status == "done"
    assert took < 15
    ahead = [line for line in said if "ahead of this machine's clock" in line]
    assert len(ahead) == 1 and ahead[0].startswith("WARNING: inbox/chip/a.md was changed "), said


def _leave_room_for_one_start_less(sup: Supervisor, short: int) -> None:
    """Lower the spawn server's descriptor limit: the next start of the agent of the attempt
    that runs finds `short` descriptors too few (that attempt holds two, freed when it ends)."""
    rules = next(iter(sup.attempts.active.values())).rules
    needed = forkserver.START_FDS + forkserver.FD_RESERVE + len(rules.mounts_writable or rules.writable)
    held = {int(fd) for fd in os.listdir(f"/proc/{sup.spawner.server_pid}/fd")}
    limit = next(n for n in range(1, 1 << 16) if n - len({fd for fd in held if fd < n}) == needed - short)
    resource.prlimit(sup.spawner.server_pid, resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@pytest.mark.slow
@pytest.mark.parametrize(("command", "ends"), [("echo ran", "done"), ("sleep 30", "blocked")])
def test_the_timeout_of_a_start_that_waited_for_room_counts_from_its_start(make_ws, command, ends):
    """Short of descriptors, a start waits for room: its order's timeout ran while it waited,
    and an order that never ran was killed as timed out, a failure of the agent that blocked
    it. Now it runs when room comes, and its timeout counts from then."""
    ws = make_ws({"chip": {"role": "specialist", "max_parallel": 2, "timeout": "1s", "max_failures": 1,
                           "command": sh(f'if [ "$COORD_ORDER_ID" = long ]; then sleep 2.5; exit 0; fi; {command}')}})
    drop(ws, "chip", "a.md", order_md("Runs long", id="long", timeout="30s"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: "long" in sup.records and sup.records["long"].status == "running", "long to run")
        _leave_room_for_one_start_less(sup, 1)  # until `long` ends
        drop(ws, "chip", "b.md", order_md("Waits for room", id="short"))
        step_until(sup, lambda: "short" in sup.records and sup.records["short"].terminal, "short to end", wait=30)
        rec = sup.store.with_detail(sup.records["short"])
        assert (rec.status, rec.attempts) == (ends, 1), rec.failures
        assert sup.records["long"].status == "done", "it ran once `long` ended, not before"
    if ends == "done":
        assert rec.failures == []
    else:  # it ran, and its own timeout ended it
        assert rec.failures[0].startswith("timed out after 1.0s"), rec.failures

