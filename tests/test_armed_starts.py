"""Starts armed ahead: while a quick agent's slot is taken, its next order is prepared up to the
exec, and runs the moment the slot frees. Real workspaces, processes and spawn server."""

from __future__ import annotations

import os
import time

import pytest
from conftest import drop, order_md, sh, step_until

from bench.harness import probe_of
from coordinator import attempts, verify
from coordinator.spawner import Spawner
from coordinator.store import Store
from coordinator.supervisor import Supervisor

# Each run says when it began and ended (ns), and its order: overlaps and order are read back.
RECORD = sh('echo "$COORD_ORDER_ID start $(date +%s%N)" >> "$PROBE/runs.txt"; '
            'case "$COORD_ORDER_ID" in slow*) sleep 1.5;; esac; '
            'echo "$COORD_ORDER_ID end $(date +%s%N)" >> "$PROBE/runs.txt"')


@pytest.fixture
def gos(monkeypatch) -> list[str]:
    """The tokens started by `go` (armed) rather than by a plain start."""
    said: list[str] = []
    real = Spawner.go

    def go(self: Spawner, token: str) -> None:
        said.append(token)
        real(self, token)

    monkeypatch.setattr(Spawner, "go", go)
    return said


def runs(ws) -> list[tuple[str, str, int]]:
    path = probe_of(ws) / "runs.txt"
    lines = path.read_text().split("\n") if path.exists() else []
    return [(oid, what, int(ns)) for oid, what, ns in (line.split() for line in lines if line)]


def ran(ws) -> list[str]:
    return [oid for oid, what, _ in runs(ws) if what == "start"]


def attempt_folders(ws, order_id: str) -> list[str]:
    folder = ws.runtime / "attempts" / order_id
    return sorted(os.listdir(folder)) if folder.exists() else []


def test_one_at_a_time_quick_orders_are_armed_and_never_overlap(make_ws, gos):
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    ids = [f"q{i:02d}" for i in range(20)]
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Quick order {oid} is done", id=oid))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
        # `arm` leaves its order cached for the start, which takes it out: left there, every
        # order run armed stayed in memory for as long as the supervisor ran.
        assert [oid for oid in ids if oid in sup.intake.accepted] == []
    recs = Store(ws.state).load_all()
    assert {oid: recs[oid].status for oid in ids} == dict.fromkeys(ids, "done")
    assert sorted(ran(ws)) == ids  # each ran once
    assert len(gos) >= len(ids) // 2  # after the first quick run, the next ones were armed
    spans = {}
    for oid, what, ns in runs(ws):
        spans.setdefault(oid, {})[what] = ns
    ordered = sorted(spans.values(), key=lambda s: s["start"])
    assert all(a["end"] <= b["start"] for a, b in zip(ordered, ordered[1:], strict=False))  # max_parallel: 1
    assert all(attempt_folders(ws, oid) == ["1"] for oid in ids)  # no attempt made twice or set aside
    assert all(recs[oid].attempts == 1 and recs[oid].failures == [] for oid in ids)


def _armed_behind_slow(ws, sup: Supervisor, armed: str) -> None:
    """`quick` made chip quick; `slow` runs now, and `armed` is armed behind it."""
    step_until(sup, lambda: sup.records.get("quick") is not None and sup.records["quick"].status == "done",
               "the quick order")
    drop(ws, "chip", "slow.md", order_md("Slow order is done", id="slow", priority="high"))
    drop(ws, "chip", f"{armed}.md", order_md(f"Order {armed} is done", id=armed))
    step_until(sup, lambda: sup.attempts.armed is not None and sup.attempts.armed.rec.id == armed,
               f"{armed} armed behind the slow order")
    assert sup.records["slow"].status == "running" and sup.records[armed].status == "queued"
    assert attempt_folders(ws, armed) == ["1"]  # prepared: its brief is written
    assert (ws.runtime / "attempts" / armed / "1" / "brief.md").exists()


@pytest.fixture
def long_arm(monkeypatch) -> None:
    monkeypatch.setattr(attempts, "ARM_AGE", 60.0)  # armed for as long as the slow order runs


def test_a_cancelled_armed_order_never_runs_and_leaves_no_folder(make_ws, gos, long_arm):
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    with Supervisor(ws) as sup:
        _armed_behind_slow(ws, sup, "y")
        sup.handle("cancel", {"id": "y"})
        step_until(sup, lambda: sup.attempts.armed is None, "the cancelled order dropped")
        step_until(sup, lambda: sup.records["slow"].status == "done", "the slow order")
        sup.run_once(limit=30)
    assert Store(ws.state).load("y").status == "cancelled"
    assert ran(ws) == ["quick", "slow"]
    assert attempt_folders(ws, "y") == [] and not (ws.runtime / "logs" / "y").exists()
    assert Store(ws.state).load("y").attempts == 0


def test_a_more_urgent_order_takes_the_place_of_the_armed_one(make_ws, gos, long_arm):
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    with Supervisor(ws) as sup:
        _armed_behind_slow(ws, sup, "y")
        drop(ws, "chip", "urgent.md", order_md("Urgent order is done", id="urgent", priority="urgent"))
        step_until(sup, lambda: sup.attempts.armed is not None and sup.attempts.armed.rec.id == "urgent",
                   "the urgent order armed instead")
        assert attempt_folders(ws, "y") == []  # what was prepared for y went with it
        sup.run_once(limit=30)
    assert ran(ws) == ["quick", "slow", "urgent", "y"]
    recs = Store(ws.state).load_all()
    assert all(recs[oid].status == "done" and recs[oid].attempts == 1 for oid in ("slow", "urgent", "y"))
    assert attempt_folders(ws, "y") == ["1"] and attempt_folders(ws, "urgent") == ["1"]


def test_a_stop_leaves_the_armed_order_queued_with_nothing_prepared(make_ws, gos, long_arm):
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    with Supervisor(ws) as sup:
        _armed_behind_slow(ws, sup, "y")
        sup._stop_requested(1)
        assert sup.attempts.armed is None
        step_until(sup, lambda: not sup.attempts.active, "the slow order to finish in the grace")
    rec = Store(ws.state).load("y")
    assert (rec.status, rec.attempts) == ("queued", 0)
    assert attempt_folders(ws, "y") == [] and "y" not in ran(ws)
    with Supervisor(ws) as sup:  # the next start runs it as any queued order
        sup.run_once(limit=30)
    assert Store(ws.state).load("y").status == "done" and attempt_folders(ws, "y") == ["1"]


def test_an_armed_order_is_dropped_when_the_slot_stays_taken(make_ws, gos):
    """Armed for ARM_AGE at most: its namespace saw the machine's mounts of then, and an agent
    whose run takes that long gains nothing from it. It runs later as any order does."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    with Supervisor(ws) as sup:
        _armed_behind_slow(ws, sup, "y")
        step_until(sup, lambda: sup.attempts.armed is None, "the armed order dropped after ARM_AGE")
        assert sup.records["slow"].status == "running" and attempt_folders(ws, "y") == []
        sup.run_once(limit=30)
    assert ran(ws) == ["quick", "slow", "y"]
    assert Store(ws.state).load("y").status == "done"
    assert [t.split(".")[0] for t in gos] == []  # chip's last run was slow: y was not armed again


def test_an_agent_that_works_a_while_is_never_armed(make_ws, gos):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 0.2")}})
    for i in range(3):
        drop(ws, "chip", f"s{i}.md", order_md(f"Order {i} is done", id=f"s{i}"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
    assert gos == []
    assert all(r.status == "done" for r in Store(ws.state).load_all().values())


def test_a_crash_while_an_order_is_armed_loses_nothing(make_ws, gos, long_arm):
    """kill -9 leaves what was prepared: the order is still queued on disk and runs once at the
    next start, in a clean folder: what was prepared for it ran nothing (no log) and goes."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    sup = Supervisor(ws)
    sup.open()
    try:
        _armed_behind_slow(ws, sup, "y")
        sup._write_state()
        sup.attempts.armed = None  # as a kill -9 leaves it: nothing dropped, nothing cleaned
    finally:
        sup.close(clean=False, chosen=False)
    with Supervisor(ws) as again:
        again.run_once(limit=30)
    recs = Store(ws.state).load_all()
    assert recs["y"].status == "done" and recs["y"].attempts == 1
    assert ran(ws).count("y") == 1
    assert attempt_folders(ws, "y") == ["1"]
    assert sorted(os.listdir(ws.runtime / "logs" / "y")) == ["1"]
    assert verify.verify(ws) == []


def test_an_agent_that_runs_several_at_once_is_never_armed(make_ws, gos):
    """With more slots, other orders run while one starts: arming only made that slower."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD, "max_parallel": 2}})
    ids = [f"p{i}" for i in range(8)]
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} is done", id=oid))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
    assert gos == [] and sorted(ran(ws)) == ids


def test_a_quick_agent_is_armed_while_a_long_agents_more_urgent_order_waits(make_ws, gos):
    """The best queued order is a long agent's (it waits for that agent's slot): the quick agent's
    next order is armed all the same, and each agent still runs one at a time in priority order."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD},
                  "rex": {"role": "specialist", "command": RECORD}})
    drop(ws, "rex", "slow1.md", order_md("Slow one is done", id="slow1", priority="urgent"))
    drop(ws, "rex", "slow2.md", order_md("Slow two is done", id="slow2", priority="urgent"))
    ids = [f"q{i:02d}" for i in range(10)]
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Quick order {oid} is done", id=oid))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    recs = Store(ws.state).load_all()
    assert all(r.status == "done" for r in recs.values()) and len(recs) == 12
    assert any(t.startswith("q") for t in gos)  # armed while slow2 waited behind slow1
    assert [oid for oid in ran(ws) if oid.startswith("slow")] == ["slow1", "slow2"]
    chip = [oid for oid in ran(ws) if oid.startswith("q")]
    assert sorted(chip) == ids and len(chip) == len(set(chip))


def _spans(ws) -> dict[str, dict[str, int]]:
    spans: dict[str, dict[str, int]] = {}
    for oid, what, ns in runs(ws):
        spans.setdefault(oid, {})[what] = ns
    return spans


def test_the_armed_order_goes_as_the_last_one_ends_before_that_one_is_judged(make_ws, gos, monkeypatch):
    """One at a time, the next order's process starts when the last one's has ended, not after
    the last one is judged; the records still have each start after the end before it."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    ids = [f"q{i:02d}" for i in range(12)]
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Quick order {oid} is done", id=oid))
    gone_before_judged: list[bool] = []
    real = attempts.AttemptRunner._after_specialist

    def judged(self, act, code, *, alone=False):
        following = ids[ids.index(act.rec.id) + 1:][:1]
        gone_before_judged.append(bool(following) and any(t.split(".")[0] in following for t in gos))
        real(self, act, code, alone=alone)

    monkeypatch.setattr(attempts.AttemptRunner, "_after_specialist", judged)
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    recs = Store(ws.state).load_all()
    assert all(recs[oid].status == "done" and recs[oid].attempts == 1 for oid in ids)
    assert sum(gone_before_judged) >= len(ids) // 2  # once chip was quick, each next one went first
    ordered = sorted(_spans(ws).values(), key=lambda s: s["start"])
    assert all(a["end"] <= b["start"] for a, b in zip(ordered, ordered[1:], strict=False))  # max_parallel: 1
    for before, after in zip(ids, ids[1:], strict=False):  # the history: started after the last one ended
        done_at = next(h["at"] for h in recs[before].history if h["to"] == "done")
        assert next(h["at"] for h in recs[after].history if h["to"] == "running") >= done_at


CHECKED = ('echo "$COORD_ORDER_ID check-start $(date +%s%N)" >> "$PROBE/runs.txt"; sleep 0.3; '
           'echo "$COORD_ORDER_ID check-end $(date +%s%N)" >> "$PROBE/runs.txt"')


def test_an_order_with_checks_keeps_its_slot_until_they_have_run(make_ws, gos, long_arm):
    """Checks are part of the attempt: the armed order waits for them, not only for the specialist."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    checked = (f"`{CHECKED}` passes", "The run is recorded", "Nothing else changed")
    with Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("quick") is not None and sup.records["quick"].status == "done",
                   "the quick order")
        # "slow…" runs 1.5 s: b is armed while it runs, and ready to go when it ends.
        drop(ws, "chip", "a.md", order_md("Checked order is done", id="slow-a", acceptance=checked, priority="high"))
        drop(ws, "chip", "b.md", order_md("Next order is done", id="b"))
        step_until(sup, lambda: sup.attempts.armed is not None and sup.attempts.armed.rec.id == "b", "b armed")
        assert [(a.rec.id, a.phase) for a in sup.attempts.active.values()] == [("slow-a", "specialist")]
        sup.run_once(limit=30)
    recs = Store(ws.state).load_all()
    assert (recs["slow-a"].status, recs["slow-a"].failures) == ("done", []) and recs["b"].status == "done"
    spans, a = _spans(ws), _spans(ws)["slow-a"]
    assert a["end"] <= a["check-start"] < a["check-end"] <= spans["b"]["start"]
    assert ran(ws) == ["quick", "slow-a", "b"]


def test_a_failed_attempt_is_retried_while_the_armed_order_goes(make_ws, gos):
    """The attempt that failed is queued again by its judging; the armed order may have gone
    already. Each order ends done once, the failed one on its second attempt, and no two runs
    of chip overlap."""
    flaky = sh('echo "$COORD_ORDER_ID start $(date +%s%N)" >> "$PROBE/runs.txt"; code=0; '
               'case "$COORD_ORDER_ID" in flaky*) [ -e "$PROBE/failed" ] || { touch "$PROBE/failed"; code=3; };; esac; '
               'echo "$COORD_ORDER_ID end $(date +%s%N)" >> "$PROBE/runs.txt"; exit $code')
    ws = make_ws({"chip": {"role": "specialist", "command": flaky}})
    ids = ["q0", "q1", "flaky", "q3", "q4", "q5"]
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} is done", id=oid))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    recs = Store(ws.state).load_all()
    assert {oid: recs[oid].status for oid in ids} == dict.fromkeys(ids, "done")
    assert recs["flaky"].attempts == 2 and len(recs["flaky"].failures) == 1
    assert sorted(ran(ws)) == sorted([*ids, "flaky"])
    starts = sorted(ns for _, what, ns in runs(ws) if what == "start")
    ends = sorted(ns for _, what, ns in runs(ws) if what == "end")
    assert all(e <= s for e, s in zip(ends, starts[1:], strict=False))  # one at a time throughout
    assert verify.verify(ws) == []


def test_an_order_ended_while_it_was_going_is_killed_never_recorded_running(make_ws, gos, long_arm):
    """Told to go, then ended by the judging of the step (cancelled with the request that sent
    it): it is never recorded running, and its process is killed as a cancelled attempt's; it
    counts as an attempt (it started), and its folders and log stay, as a cancelled one's do."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    with Supervisor(ws) as sup:
        _armed_behind_slow(ws, sup, "slow-y")  # "slow…" sleeps 1.5 s: killed while it runs
        armed = sup.attempts.armed
        sup.attempts._stamp_start(armed)
        sup.spawner.go(armed.token)
        armed.gone = True
        sup.move(sup.records["slow-y"], "cancelled", "user")
        sup.attempts._record_gone(armed)
        assert sup.attempts.armed is None and armed.token in sup.attempts.active
        step_until(sup, lambda: armed.token not in sup.attempts.active, "the killed run reaped")
        step_until(sup, lambda: sup.records["slow"].status == "done", "the slow order")
    rec = Store(ws.state).load("slow-y")
    assert (rec.status, rec.attempts) == ("cancelled", 1)
    assert "running" not in [h["to"] for h in rec.history]
    assert "end" not in [w for oid, w, _ in runs(ws) if oid == "slow-y"]  # killed before its end
    assert attempt_folders(ws, "slow-y") == ["1"] and (ws.runtime / "logs" / "slow-y" / "1").is_dir()
    assert verify.verify(ws) == []


def test_an_armed_order_waits_for_a_more_urgent_order_of_another_agent(make_ws, gos, long_arm):
    """One slot for the team: rex's urgent order, queued while chip's slow order runs, takes the
    slot when it frees, not chip's armed normal one (priority first, across agents)."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD},
                  "rex": {"role": "specialist", "command": RECORD}}, max_parallel=1)
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("quick") is not None and sup.records["quick"].status == "done",
                   "the quick order")
        drop(ws, "chip", "slow.md", order_md("Slow order is done", id="slow", priority="high"))
        step_until(sup, lambda: sup.records.get("slow") is not None and sup.records["slow"].status == "running",
                   "the slow order running")
        drop(ws, "rex", "r.md", order_md("Rex order is done", id="r", priority="urgent"))
        drop(ws, "chip", "y.md", order_md("Order y is done", id="y"))
        step_until(sup, lambda: sup.attempts.armed is not None and sup.attempts.armed.rec.id == "y", "y armed")
        assert sup.records["r"].status == "queued"
        sup.run_once(limit=30)
    assert ran(ws) == ["quick", "slow", "r", "y"]


def test_an_armed_order_waits_for_the_review_of_the_request_its_last_order_ends(make_ws, tmp_path, gos, long_arm):
    """One slot for the team: walt's request waits for the one order it sent; when that order
    ends, the request's check takes the slot, and chip's armed order waits for it."""
    ws = make_ws({
        "walt": {"role": "orchestrator", "sends_to": ["chip"], "command": sh(
            'mkdir -p "$COORD_OUTBOX/chip" && cp "$PROBE/kid.md" "$COORD_OUTBOX/chip/slowkid.md" && '
            'printf "outcome: done\\nsummary: delegated\\n" > "$COORD_RESULT"')},
        "chip": {"role": "specialist", "command": RECORD},
    }, orchestrator="walt", max_parallel=1)
    (tmp_path / "probe" / "kid.md").write_text(order_md("The kid is done", id="slowkid", priority="high"))
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("quick") is not None and sup.records["quick"].status == "done",
                   "the quick order")
        drop(ws, "walt", "req.md", order_md("The team does it", id="req",
                                             acceptance=("`sleep 0.5` passes", "b is true", "c is true")))
        step_until(sup, lambda: sup.records.get("req") is not None and sup.records["req"].children
                   and sup.records[sup.records["req"].children[0]].status == "running", "the request's order running")
        drop(ws, "chip", "y.md", order_md("Order y is done", id="y"))
        step_until(sup, lambda: sup.attempts.armed is not None and sup.attempts.armed.rec.id == "y", "y armed")
        most = 0

        def ended() -> bool:
            nonlocal most
            most = max(most, len(sup.attempts.active))
            return sup.records["req"].status != "running" and sup.records["y"].status == "done"

        step_until(sup, ended, "the request and y")
    recs = Store(ws.state).load_all()
    assert recs["req"].status == "done" and most <= 1
    req_done = next(h["at"] for h in recs["req"].history if h["to"] == "done")
    assert next(h["at"] for h in recs["y"].history if h["to"] == "running") >= req_done


def test_an_armed_order_cancelled_in_the_step_its_slot_frees_never_runs(make_ws, gos, long_arm):
    """`coordinator cancel y` (armed) is served at the start of the step whose poll holds the
    exit y waited for: y never runs, and nothing of it is left."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD}})
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    with Supervisor(ws) as sup:
        _armed_behind_slow(ws, sup, "y")
        deadline = time.monotonic() + 10
        while "slow" not in [oid for oid, what, _ in runs(ws) if what == "end"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # its exit waits for the next poll
        sup.handle("cancel", {"id": "y"})  # as `_serve_requests` does at the start of that step
        sup.step()
        sup.run_once(limit=30)
    rec = Store(ws.state).load("y")
    assert (rec.status, rec.attempts) == ("cancelled", 0)
    assert "y" not in ran(ws) and not any(t.startswith("y.") for t in gos)
    assert attempt_folders(ws, "y") == []


def test_an_armed_order_waits_for_the_judging_of_an_order_with_files(make_ws, gos, long_arm, monkeypatch):
    """The order before it has a change to judge, commit and merge: the armed order starts after
    that, not at its exit (a crash while the change lands would charge the armed one too)."""
    ws = make_ws({"chip": {"role": "specialist", "command": RECORD, "writes": ["webapp/src/**"]}})
    went_before_judged: list[bool] = []
    real = attempts.AttemptRunner._after_specialist

    def judged(self, act, code, *, alone=False):
        if act.rec.id == "slow-w":
            went_before_judged.append(any(t.startswith("y.") for t in gos))
        real(self, act, code, alone=alone)

    monkeypatch.setattr(attempts.AttemptRunner, "_after_specialist", judged)
    drop(ws, "chip", "quick.md", order_md("Quick order is done", id="quick"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("quick") is not None and sup.records["quick"].status == "done",
                   "the quick order")
        drop(ws, "chip", "w.md", order_md("Slow order with files is done", id="slow-w", priority="high",
                                          files=("webapp/src/greeting.py",)))
        drop(ws, "chip", "y.md", order_md("Next order is done", id="y"))
        step_until(sup, lambda: sup.attempts.armed is not None and sup.attempts.armed.rec.id == "y", "y armed")
        sup.run_once(limit=30)
    recs = Store(ws.state).load_all()
    assert recs["slow-w"].status == "done" and recs["y"].status == "done"
    assert went_before_judged == [False] and any(t.startswith("y.") for t in gos)
