"""Time: a wall clock that steps (NTP, a date set by hand, a resume), long runs, time stamps."""

from __future__ import annotations

import time

from conftest import drop, order_md, sh, step_until

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
