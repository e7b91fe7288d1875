"""End to end: real workspaces, real git, real specialist processes, the real supervisor loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import PRINT_REVIEW, drop, intake_all, order_md, sh, step_until, wait_until

from bench.harness import probe_of
from coordinator import attempts, board, signals
from coordinator.audit import StateRepo
from coordinator.errors import CoordinatorError, StateError
from coordinator.spawner import Spawner
from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.watcher import NullWatcher
from coordinator.workspace import Workspace

WRITE_GREETING = sh('printf "def greet():\\n    return 1\\n" > src/greeting.py && echo wrote it')


def run(ws, **kw):
    with Supervisor(ws, **kw) as sup:
        sup.run_once(limit=60)
        return sup


def status(ws, order_id):
    return Store(ws.state).load(order_id).status


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout


def test_done_order_is_committed_by_the_agent_with_trailers_and_audited(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": WRITE_GREETING, "writes": ["webapp/src/**"]}})
    drop(ws, "chip", "greet.md", order_md("The app greets people", files=("webapp/src/greeting.py",), id="greet"))
    run(ws)
    rec = Store(ws.state).load("greet")
    assert rec.status == "done", rec.report
    assert (ws.repos / "webapp" / "src" / "greeting.py").read_text().startswith("def greet")
    log = git(ws.repos / "webapp", "log", "-1", "--format=%an <%ae>%n%s%n%b")
    assert log.startswith("chip <chip@agents.coordinator>\nThe app greets people")
    assert "Work-Order: greet" in log and "Agent: chip" in log
    lines = [e.line for e in StateRepo(ws.state).entries("greet")]
    assert lines == ["greet chip: new -> queued", "greet chip: queued -> running (attempt 1)",
                     "greet chip: running -> done (commit " + rec.commit[:10] + ")"]
    assert not StateRepo(ws.state).dirty()


def test_every_outcome_of_the_result_file(make_ws):
    script = sh('case "$COORD_ORDER_ID" in '
                'h) printf "outcome: halt-with-note\\nsummary: already there\\n" > "$COORD_RESULT";; '
                'r) printf "outcome: route-to\\nagent: rex\\nsummary: for rex\\n" > "$COORD_RESULT";; '
                'b) printf "outcome: blocked\\nsummary: cannot\\n" > "$COORD_RESULT";; '
                'esac')
    ws = make_ws({
        "chip": {"role": "specialist", "command": script, "writes": ["webapp/**"], "sends_to": ["rex"]},
        "rex": {"role": "specialist", "command": sh("echo reviewed"), "writes": ["webapp/**"]},
    })
    branching = ("halt-with-note if it is there", "route-to-rex if it is a review")
    for oid in ("h", "r", "b"):
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} is handled", branching=branching, id=oid))
    run(ws)
    recs = Store(ws.state).load_all()
    assert recs["h"].status == "halted" and recs["h"].report["summary"] == "already there"
    assert recs["r"].status == "routed"
    follow = recs[recs["r"].report["routed_to"]]
    assert follow.to == "rex" and follow.sender == "chip" and "r" in follow.references
    assert follow.status == "done"
    assert recs["b"].status == "blocked"


def test_a_result_file_in_yaml_flow_style_is_read_as_yaml(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1,
                           "command": sh('echo "{outcome: done, summary: all good}" > "$COORD_RESULT"')}})
    drop(ws, "chip", "o.md", order_md("Something is done", id="o"))
    run(ws)
    rec = Store(ws.state).load("o")
    assert (rec.status, rec.failures, rec.report["summary"]) == ("done", [], "all good")


def test_outcome_not_allowed_by_branching_is_a_failed_attempt(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1,
                           "command": sh('printf "outcome: requeue-with-blocker\\nblocker: x\\nsummary: s\\n"'
                                         ' > "$COORD_RESULT"')}})
    drop(ws, "chip", "o.md", order_md("Something is done", id="o"))
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "blocked"
    assert "not allowed by the order's branching" in rec.failures[0]


def test_failures_are_retried_with_the_reason_then_blocked_and_escalated(make_ws):
    ws = make_ws({
        "chip": {"role": "specialist", "max_failures": 2,
                 "command": sh('cat "$COORD_BRIEF" >> "$PROBE/briefs.txt"; echo boom >&2; exit 3')},
        "rex": {"role": "specialist", "command": sh("echo investigated")},
    }, escalate_to="rex")
    drop(ws, "chip", "o.md", order_md("It works", id="o"))
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "blocked" and rec.attempts == 2
    briefs = (probe_of(ws) / "briefs.txt").read_text()
    assert "why the last attempt failed" in briefs and "exited with code 3" in briefs and "boom" in briefs
    escalations = [r for r in Store(ws.state).load_all().values() if r.to == "rex"]
    assert len(escalations) == 1 and "o" in escalations[0].references and escalations[0].status == "done"
    # A blocked order never restarts by itself.
    run(ws)
    assert Store(ws.state).load("o").attempts == 2


def failing_chip_halting_rex(make_ws, *, max_failures: int, halt: str):
    """chip fails `o` (exit 3, "boom" on stderr) until it is blocked and escalated to rex, who
    halts every investigation with `halt`."""
    ws = make_ws({
        "chip": {"role": "specialist", "max_failures": max_failures, "command": sh("echo boom >&2; exit 3")},
        "rex": {"role": "specialist", "command": sh(f'printf "outcome: halt-with-note\\nsummary: {halt}\\n"'
                                                    ' > "$COORD_RESULT"')},
    }, escalate_to="rex")
    drop(ws, "chip", "o.md", order_md("It works", id="o"))
    return ws


def test_the_board_says_why_an_order_waits_failed_was_blocked_and_where_it_was_escalated(make_ws):
    ws = failing_chip_halting_rex(make_ws, max_failures=2, halt="ask walt")
    drop(ws, "rex", "n.md", order_md("Next thing happens", id="next", blocked_by=["o"]))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: "o" in sup.records and sup.records["o"].failures, "the first failure")
        text = board.render(ws, width=200)
        assert f"supervisor: running (pid {os.getpid()})" in text.splitlines()
        lines = text.splitlines()
        row = next(i for i, line in enumerate(lines) if line.startswith("  o     chip"))
        assert lines[row + 1].startswith("        ↳ failed 1 time(s); last: exited with code 3")  # on again, and why
        assert lines[lines.index("WAITING (1)") + 2] == "        ↳ waits for o"  # under the ids' column
        step_until(sup, lambda: sup.records["o"].status == "blocked" and len(sup.records) == 3
                   and all(r.terminal for r in sup.records.values() if r.id not in ("o", "next")), "the escalation")
    doc = board.as_json(ws)
    reasons = {o["id"]: o["reason"] for o in doc["orders"]}
    investigation = next(i for i in reasons if i not in ("o", "next"))
    assert reasons["o"].startswith("failed 2 time(s); last: exited with code 3")
    assert reasons["o"].endswith(f" (escalated to rex as {investigation})")
    assert reasons["next"] == "waits for o (blocked: `coordinator retry o`, or cancel it)"
    assert reasons[investigation] == "ask walt"
    assert doc["supervisor"] == {"running": False, "pid": None}


@pytest.mark.parametrize("sent", ["before it halted", "after it halted"])
def test_what_waits_for_a_halted_order_waits_on_and_runs_once_a_retry_gets_it_done(make_ws, sent):
    """Whether the waiting order came before or after its dependency halted, it waits (a retry
    can still bring the dependency to done) and runs once the retried dependency is done."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        'echo "$COORD_ORDER_ID" >> "$PROBE/ran"; '
        'if [ "$COORD_ORDER_ID" = h ] && [ ! -e "$PROBE/go" ]; then '
        'printf "outcome: halt-with-note\\nsummary: not now\\n" > "$COORD_RESULT"; fi')}})
    drop(ws, "chip", "h.md", order_md("Something first", id="h"))
    if sent == "before it halted":
        drop(ws, "chip", "w.md", order_md("Something after", id="w", blocked_by=["h"]))
    run(ws)
    if sent == "after it halted":
        drop(ws, "chip", "w.md", order_md("Something after", id="w", blocked_by=["h"]))
        run(ws)
    assert (status(ws, "h"), status(ws, "w")) == ("halted", "waiting")
    reasons = {o["id"]: o["reason"] for o in board.as_json(ws)["orders"]}
    assert reasons == {"h": "not now", "w": "waits for h (halted: `coordinator retry h`, or cancel it)"}
    (probe_of(ws) / "go").touch()
    with Supervisor(ws) as sup:  # a new start too leaves it waiting, and the retry moves both
        assert sup.records["w"].status == "waiting"
        assert sup.handle("retry", {"id": "h"})["status"] == "queued"
        sup.run_once(limit=60)
    assert (status(ws, "h"), status(ws, "w")) == ("done", "done")
    assert (probe_of(ws) / "ran").read_text().split() == ["h", "h", "w"]


def test_what_waits_for_a_halted_order_is_blocked_when_that_order_is_cancelled(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        'printf "outcome: halt-with-note\\nsummary: not now\\n" > "$COORD_RESULT"')}})
    drop(ws, "chip", "h.md", order_md("Something first", id="h"))
    drop(ws, "chip", "w.md", order_md("Something after", id="w", blocked_by=["h"]))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
        assert sup.records["w"].status == "waiting"
        sup.handle("cancel", {"id": "h"})
    rec = Store(ws.state).load("w")
    assert rec.status == "blocked" and rec.report["summary"] == "dependency h ended cancelled"


def test_an_escalation_quoting_colour_codes_and_a_placeholder_is_filed_once_and_runs(make_ws):
    """The failure an investigation quotes is an agent's output: an ANSI colour code (a control
    character) or text like a template placeholder made the investigation invalid. It was
    refused under a new id while its planned id stayed reserved, and every later start filed
    yet another copy. It is now quoted safely, filed under its planned id, and only once."""
    ws = make_ws({
        "chip": {"role": "specialist", "max_failures": 1,
                 "command": sh("printf '\\033[31mFAILED\\033[0m <describe the fix>\\n' >&2; exit 3")},
        "rex": {"role": "specialist", "command": sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran"')},
    }, escalate_to="rex")
    drop(ws, "chip", "o.md", order_md("It works", id="o"))
    run(ws)
    recs = Store(ws.state).load_all()
    follow = recs["o"].report["follow_up"]["id"]
    assert recs["o"].status == "blocked" and recs[follow].status == "done", recs[follow].errors
    assert set(recs) == {"o", follow}
    brief = (ws.state / "orders" / follow / "original.md").read_text()
    assert "\x1b" not in brief and "[31mFAILED" in brief and "«describe the fix»" in brief
    for _ in range(2):  # later starts find nothing left to file
        with Supervisor(ws) as sup:
            sup.run_once(limit=30)
        assert set(Store(ws.state).load_all()) == {"o", follow}
    assert (probe_of(ws) / "ran").read_text().split() == [follow]


def test_a_chain_behind_a_cancelled_order_is_blocked_all_the_way_down(make_ws):
    """a is cancelled; b waits on a, c on b. b is blocked for good (no retry can bring it
    back), so c is blocked too, not left waiting on an order that can never be done; an
    order sent later that depends on b is blocked at once."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true")}})
    drop(ws, "chip", "a.md", order_md("A happens", id="a"))
    drop(ws, "chip", "b.md", order_md("B happens", id="b", blocked_by=["a"]))
    drop(ws, "chip", "c.md", order_md("C happens", id="c", blocked_by=["b"]))
    with Supervisor(ws) as sup:
        intake_all(sup)
        sup.handle("cancel", {"id": "a"})
        sup._write_state()
    recs = Store(ws.state).load_all()
    assert (recs["a"].status, recs["b"].status, recs["c"].status) == ("cancelled", "blocked", "blocked")
    assert recs["c"].report["summary"] == "dependency b ended blocked"
    drop(ws, "chip", "d.md", order_md("D happens", id="d", blocked_by=["c"]))
    run(ws)
    assert Store(ws.state).load("d").status == "blocked"


def test_a_nul_byte_in_a_specialists_output_fails_the_attempt_not_the_supervisor(make_ws):
    """The output's tail is quoted in the failure note (a git commit message) and in the next
    brief, which `{brief_text}` passes as an argument: a NUL in either stopped the supervisor."""
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 2,
                           "command": ["/bin/sh", "-c", "printf 'bad\\000byte\\n'; exit 1", "sh", "{brief_text}"]}})
    drop(ws, "chip", "o.md", order_md("It works", id="o"))
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "blocked" and len(rec.failures) == 2, rec.failures
    assert all("badbyte" in f and "\0" not in f for f in rec.failures), rec.failures


def test_a_chain_of_thousands_of_blocked_orders_is_followed_without_recursion():
    from coordinator.store import Record, dead_blocked, ended_undone

    def rec(i: int, status: str, after: list[str]) -> Record:
        return Record(id=f"c{i}", to="chip", sender="user", status=status, objective="x", created="t",
                      updated="t", seq=i, blocked_by=after)

    records = {"c0": rec(0, "rejected", [])}
    for i in range(1, 5000):
        records[f"c{i}"] = rec(i, "blocked", [f"c{i - 1}"])
    assert dead_blocked(records, records["c4999"])
    assert ended_undone(records, ["c4999"]) == ("c4999", records["c4999"])
    records["c0"].status = "done"  # retried and done: nothing down the chain is dead any more
    assert not dead_blocked(records, records["c4999"]) and ended_undone(records, ["c4999"]) is None


def test_an_order_blocked_again_after_a_retry_is_escalated_again_not_rejected_as_a_repeat(make_ws):
    """The second investigation has the same sender, recipient and objective as the first,
    which halted: it names that one in its references instead of being rejected (with a
    feedback signal against the supervisor) as a repeat."""
    ws = failing_chip_halting_rex(make_ws, max_failures=1, halt="drop it")
    with Supervisor(ws) as sup:
        def investigations():
            return sorted((r for r in sup.records.values() if r.to == "rex"), key=lambda r: r.seq)

        step_until(sup, lambda: len(investigations()) == 1 and investigations()[0].terminal, "the first investigation")
        assert sup.handle("retry", {"id": "o"})["status"] == "queued"
        step_until(sup, lambda: len(investigations()) == 2 and investigations()[1].terminal, "the second")
        first, second = investigations()
    assert (first.status, second.status) == ("halted", "halted"), second.errors
    assert second.references == ["o", first.id]
    assert signals.load(ws.state) == []  # no feedback-loop signal


def test_a_command_that_cannot_start_fails_the_attempt_with_the_reason_then_blocks(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 2, "command": ["no-such-agent-cli", "-p"]},
                  "rex": {"role": "specialist", "command": sh("echo fine")}})
    drop(ws, "chip", "o.md", order_md("It works", id="o"))
    drop(ws, "rex", "r.md", order_md("It works too", id="r"))
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "blocked" and rec.attempts == 2
    assert rec.failures == ["could not start chip: command not found: no-such-agent-cli"] * 2
    assert "command not found" in (ws.runtime / "logs" / "o" / "1" / "output.log").read_text()
    assert status(ws, "r") == "done"  # the loop went on past the refusals


def test_once_goes_on_until_an_order_whose_working_copy_cannot_be_made_has_ended(make_ws):
    # `supervise --once` said "nothing runnable left" with the order still queued, one
    # failure short of blocked: the next run burned the last attempt.
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 3, "command": WRITE_GREETING,
                           "writes": ["webapp/src/**"]}})
    (ws.runtime / "work").mkdir(parents=True, exist_ok=True)
    (ws.runtime / "work" / "o").write_text("in the way")  # its working copy's folder cannot be made
    drop(ws, "chip", "o.md", order_md("It greets", files=("webapp/src/greeting.py",), id="o"))
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "blocked" and rec.attempts == 3
    assert rec.failures[-1].startswith("could not prepare the working copy: "), rec.failures[-1]


def test_an_order_cancelled_while_its_start_is_on_the_way_stays_cancelled(make_ws):
    """The start goes to the fork server without a wait; its refusal comes back after the cancel."""
    ws = make_ws({"chip": {"role": "specialist", "command": ["no-such-agent-cli"]}})
    drop(ws, "chip", "c.md", order_md("Cancelled before it could start", id="c"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("c") is not None and sup.records["c"].status == "running",
                   "the start sent")
        sup.handle("cancel", {"id": "c"})
        sup.run_once(limit=30)  # the refusal is read here
    rec = Store(ws.state).load("c")
    assert rec.status == "cancelled" and rec.failures == []
    assert [e.line for e in StateRepo(ws.state).entries("c")][-1] == "c chip: running -> cancelled"


def test_requeue_with_blocker_clears_when_the_named_order_is_done(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        'if [ "$COORD_ORDER_ID" = first ] && [ ! -e "$PROBE/dep-started" ]; then '
        'printf "outcome: requeue-with-blocker\\nblocker: dep\\nsummary: needs dep\\n" > "$COORD_RESULT"; fi; '
        'if [ "$COORD_ORDER_ID" = dep ]; then touch "$PROBE/dep-started"; fi; '
        'echo "$COORD_ORDER_ID" >> "$PROBE/ran.txt"')}})
    drop(ws, "chip", "a.md", order_md("First thing is done", id="first", priority="urgent",
                                       branching=("requeue-with-blocker if a dependency is missing",)))
    drop(ws, "chip", "b.md", order_md("Dependency is done", id="dep", priority="low"))
    run(ws)
    assert (probe_of(ws) / "ran.txt").read_text().split() == ["first", "dep", "first"]
    recs = Store(ws.state).load_all()
    assert recs["first"].status == "done" and recs["dep"].status == "done"
    assert [h["to"] for h in recs["first"].history] == ["queued", "running", "waiting", "queued", "running", "done"]


@pytest.mark.parametrize("theirs", ["a changed file", "an untracked file"])
def test_a_persons_uncommitted_work_in_the_way_of_the_merge_makes_the_order_wait_not_fail(make_ws, theirs):
    """Their work is never clobbered, and it is not the agent's doing: the order waits, with
    what to do, instead of running the agent again until it is blocked and escalated."""
    path = "src/login.py" if theirs == "a changed file" else "src/new.py"
    ws = make_ws({
        "chip": {"role": "specialist", "max_failures": 2, "writes": ["webapp/src/**"],
                 "command": sh(f'echo "# agent" >> {path}; echo x >> "$PROBE/attempts"')},
        "rex": {"role": "specialist", "command": sh("echo investigated")},
    }, escalate_to="rex")
    checkout = ws.repos / "webapp"
    (checkout / path).write_text("a person's work\n", encoding="utf-8")
    drop(ws, "chip", "o.md", order_md("Login has a comment", id="o", files=("webapp/src/**",)))
    run(ws)
    run(ws)  # it waits for the person: no second attempt by itself
    rec = Store(ws.state).load("o")
    line = (f"uncommitted changes to {path} in repos/webapp, which the merge would overwrite; "
            "commit or stash them, then `coordinator retry o`")
    assert (rec.status, rec.attempts, rec.failures, rec.blocker) == ("waiting", 1, [], line)
    assert rec.report == {"summary": f"attempt 1 was not merged: {line}"}
    assert list(Store(ws.state).load_all()) == ["o"]  # nothing escalated
    assert (checkout / path).read_text() == "a person's work\n"
    assert "wo/o" not in git(checkout, "branch", "--list", "wo/*")  # the attempt's work is gone
    assert not (ws.root / ".coordinator" / "work" / "o").exists()
    assert {o["id"]: o["reason"] for o in board.as_json(ws)["orders"]}["o"] == f"waits for {line}"
    git(checkout, "add", path)
    git(checkout, "-c", "user.name=p", "-c", "user.email=p@x", "commit", "-qm", "a person's work")
    with Supervisor(ws) as sup:
        assert sup.handle("retry", {"id": "o"})["status"] == "queued"
        sup.run_once(limit=30)
    assert status(ws, "o") == "done"
    assert (checkout / path).read_text() == "a person's work\n# agent\n"
    assert (probe_of(ws) / "attempts").read_text() == "x\nx\n"


def test_an_agent_writing_inside_a_submodule_is_denied_at_once_not_retried(make_ws):
    """Git cannot commit a file inside a submodule ("Pathspec ... is in submodule"): every
    attempt failed the same way until the order was blocked. The gate refuses it up front."""
    from test_gate import add_submodule

    ws = make_ws({"chip": {"role": "specialist", "max_failures": 2, "writes": ["webapp/**"], "command": sh(
        'mkdir -p vendor/sub && echo s > vendor/sub/s.txt; echo x >> "$PROBE/attempts"')}})
    add_submodule(ws.repos / "webapp", "vendor/sub", ws.root.parent / "sub")
    head = git(ws.repos / "webapp", "rev-parse", "main")
    drop(ws, "chip", "o.md", order_md("Vendored code has s.txt", id="o", files=("webapp/vendor/**",)))
    run(ws)
    rec = Store(ws.state).load("o")
    assert (rec.status, rec.attempts, rec.failures) == ("denied", 1, [])
    assert rec.report["offending"] == [
        "webapp/vendor/sub/s.txt: added (file) — inside the submodule vendor/sub: change it in its own repository"]
    assert git(ws.repos / "webapp", "rev-parse", "main") == head
    assert (probe_of(ws) / "attempts").read_text() == "x\n"


def test_blocked_by_and_priority_order(make_ws):
    ws = make_ws({"chip": {"role": "specialist",
                           "command": sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran.txt"')}})
    drop(ws, "chip", "1.md", order_md("Low one is done", id="low", priority="low"))
    drop(ws, "chip", "2.md", order_md("Base is done", id="base"))
    drop(ws, "chip", "3.md", order_md("Top is done", id="top", priority="urgent", blocked_by=["base"]))
    drop(ws, "chip", "4.md", order_md("High is done", id="high", priority="high"))
    run(ws)
    assert (probe_of(ws) / "ran.txt").read_text().split() == ["high", "base", "top", "low"]


def test_priority_decides_across_agents_when_one_slot_is_free(make_ws):
    """One slot for the whole team: the next order is the best of every agent's queue."""
    record = sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran.txt"')
    ws = make_ws({"chip": {"role": "specialist", "command": record},
                  "rex": {"role": "specialist", "command": record}}, max_parallel=1)
    drop(ws, "chip", "1.md", order_md("Chip low is done", id="c-low", priority="low"))
    drop(ws, "chip", "2.md", order_md("Chip urgent is done", id="c-urgent", priority="urgent"))
    drop(ws, "chip", "3.md", order_md("Chip normal is done", id="c-normal"))
    drop(ws, "rex", "4.md", order_md("Rex high is done", id="r-high", priority="high"))
    run(ws)
    assert (probe_of(ws) / "ran.txt").read_text().split() == ["c-urgent", "r-high", "c-normal", "c-low"]


def test_a_queue_waiting_for_the_supervisor_runs_by_priority_however_slow_filing_is(make_ws, monkeypatch):
    """Filing yields to starting after a slice of time; on a slow disk filing one order takes
    longer than the slice. What was queued before the supervisor started is still all filed
    before the first start, so the urgent order runs first, not the oldest."""
    from coordinator import arrivals

    monkeypatch.setattr(arrivals, "INTAKE_SLICE_IDLE", 0.0)
    record = sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran.txt"')
    ws = make_ws({"chip": {"role": "specialist", "command": record}})
    for i, (oid, priority) in enumerate([("old-low", "low"), ("normal", "normal"), ("urgent", "urgent")]):
        path = drop(ws, "chip", f"{i}.md", order_md(f"Order {oid} is done", id=oid, priority=priority))
        os.utime(path, (time.time() - 60 + i, time.time() - 60 + i))
    run(ws)
    assert (probe_of(ws) / "ran.txt").read_text().split() == ["urgent", "normal", "old-low"]


def test_parallel_limits_per_agent_and_overall(make_ws):
    record = sh('echo "start $(date +%s%N)" >> "$PROBE/$COORD_AGENT.log"; sleep 0.3; '
                'echo "end $(date +%s%N)" >> "$PROBE/$COORD_AGENT.log"')
    ws = make_ws({"chip": {"role": "specialist", "command": record, "max_parallel": 2},
                  "rex": {"role": "specialist", "command": record, "max_parallel": 2}}, max_parallel=3)
    for i in range(4):
        drop(ws, "chip", f"c{i}.md", order_md(f"Chip order {i} is done"))
        drop(ws, "rex", f"r{i}.md", order_md(f"Rex order {i} is done"))
    run(ws)

    def peak(events: list[tuple[int, int]]) -> int:
        level = top = 0
        for _, delta in sorted(events):
            level += delta
            top = max(top, level)
        return top

    per = {}
    for agent in ("chip", "rex"):
        per[agent] = [(int(t), 1 if kind == "start" else -1) for kind, t in
                      (line.split() for line in (probe_of(ws) / f"{agent}.log").read_text().splitlines())]
        assert peak(per[agent]) <= 2
    assert peak(per["chip"] + per["rex"]) <= 3
    assert peak(per["chip"] + per["rex"]) >= 2  # they did run in parallel


def test_acceptance_checks_run_by_the_supervisor_decide(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": WRITE_GREETING, "writes": ["webapp/src/**"],
                           "max_failures": 1}})
    good = ("`grep -q greet src/greeting.py` passes", "The file exists", "Nothing else changed")
    bad = ("`grep -q nonexistent src/greeting.py` passes", "The file exists", "Nothing else changed")
    drop(ws, "chip", "g.md", order_md("Good check passes", files=("webapp/src/greeting.py",), acceptance=good, id="g"))
    run(ws)
    drop(ws, "chip", "b.md", order_md("Bad check fails", files=("webapp/src/greeting.py",), acceptance=bad, id="b"))
    run(ws)
    recs = Store(ws.state).load_all()
    assert recs["g"].status == "done" and recs["g"].report["checks"] == ["`grep -q greet src/greeting.py` passed"]
    assert recs["b"].status == "blocked"
    # grep -q prints nothing: the reason says so instead of ending in a bare "output:"
    assert recs["b"].failures[0] == "check `grep -q nonexistent src/greeting.py` failed with exit code 1; no output"


def test_checks_cannot_smuggle_writes_into_the_commit(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": WRITE_GREETING, "writes": ["webapp/src/**"]}})
    acc = ("`echo sneaky > src/sneaky.py` passes", "The file exists", "Nothing else changed")
    drop(ws, "chip", "g.md", order_md("Greeting lands", files=("webapp/src/**",), acceptance=acc, id="g"))
    run(ws)
    assert status(ws, "g") == "done"
    assert not (ws.repos / "webapp" / "src" / "sneaky.py").exists()
    assert "sneaky" not in git(ws.repos / "webapp", "log", "--stat", "-1")


def test_checks_run_on_what_was_committed_not_on_files_git_ignores(make_ws):
    """The demo repository ignores *.pyc: a specialist that left only a compiled greeting.pyc
    (the source removed) had its check import it and pass, and the order was `done`, its
    report listing the .pyc as changed, with nothing committed: the default branch failed
    the very check. The checks see what lands; the report lists what was committed."""
    cheat = sh('printf "def greet():\\n    return 1\\n" > src/greeting.py; '
               '"$PYTHON" -c "import py_compile; py_compile.compile(\'src/greeting.py\', cfile=\'src/greeting.pyc\')"; '
               'rm src/greeting.py; printf "x = 1\\n" > src/other.py; echo compiled it')
    ws = make_ws({"chip": {"role": "specialist", "command": cheat, "writes": ["webapp/src/**"],
                           "max_failures": 1, "env": {"PYTHON": sys.executable}}})
    check = f"`{sys.executable} -c 'import sys; sys.path.insert(0, \"src\"); import greeting'` passes"
    drop(ws, "chip", "g.md", order_md("Greeting lands", files=("webapp/src/**",), id="g",
                                      acceptance=(check, "The file exists", "Nothing else changed")))
    run(ws)
    rec = Store(ws.state).load("g")
    assert rec.status == "blocked", rec.report
    assert "No module named 'greeting'" in rec.failures[0]
    assert not (ws.repos / "webapp" / "src" / "greeting.pyc").exists()


def test_the_report_lists_what_was_committed_not_the_files_git_ignores(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"], "command": sh(
        'printf "x = 1\\n" > src/other.py; echo junk > src/cache.pyc; echo wrote')}})
    drop(ws, "chip", "g.md", order_md("Other lands", files=("webapp/src/**",), id="g"))
    run(ws)
    rec = Store(ws.state).load("g")
    assert rec.status == "done" and rec.report["changed"] == ["webapp/src/other.py"]


def test_outbox_orders_are_stamped_and_checked_against_sends_to(make_ws):
    outbox = sh('mkdir -p "$COORD_OUTBOX/rex" "$COORD_OUTBOX/walt"; '
                f'{PRINT_REVIEW} > "$COORD_OUTBOX/rex/r.yaml"; '
                'cp "$COORD_OUTBOX/rex/r.yaml" "$COORD_OUTBOX/walt/w.yaml"')
    ws = make_ws({"chip": {"role": "specialist", "command": outbox, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")},
                  "walt": {"role": "orchestrator", "sends_to": ["chip", "rex"]}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    run(ws)
    recs = Store(ws.state).load_all()
    to_rex = [r for r in recs.values() if r.to == "rex"]
    to_walt = [r for r in recs.values() if r.to == "walt"]
    assert len(to_rex) == 1 and to_rex[0].sender == "chip" and to_rex[0].status == "done"
    assert len(to_walt) == 1 and to_walt[0].status == "rejected"  # chip may not send to walt
    assert set(recs["o"].children) == {to_rex[0].id, to_walt[0].id}


def test_the_outbox_of_an_attempt_that_fails_its_check_is_not_sent_and_its_retry_sends_it_once(make_ws):
    chip = sh('mkdir -p "$COORD_OUTBOX/rex"; '
              f'{PRINT_REVIEW} > "$COORD_OUTBOX/rex/r.yaml"; '
              'echo x >> "$PROBE/attempts"')
    ws = make_ws({"chip": {"role": "specialist", "command": chip, "sends_to": ["rex"], "max_failures": 3},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    probe = probe_of(ws)
    acc = (f"`test $(wc -l < {probe}/attempts) -ge 2` passes", "The second thing is true", "The third thing is true")
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o", acceptance=acc))
    run(ws)
    recs = Store(ws.state).load_all()
    assert (recs["o"].status, recs["o"].attempts) == ("done", 2)
    (to_rex,) = [r for r in recs.values() if r.to == "rex"]
    assert (to_rex.sender, to_rex.status, to_rex.source) == ("chip", "done", "outbox of o/r.yaml")
    assert recs["o"].children == [to_rex.id]
    assert f"- {to_rex.id} to rex: queued" in (ws.state / "orders" / "o" / "report.md").read_text()


def test_an_outbox_folder_swapped_for_a_link_during_delivery_takes_nothing_from_its_target(
        make_ws, tmp_path, monkeypatch):
    """A process of the attempt that outlived it swaps `outbox/rex/` for a link to another
    folder between the listing and the taking: the supervisor (root, here) must neither read
    nor remove the file of the same name there."""
    from coordinator import outbox

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "r.yaml").write_text("precious\n")
    chip = sh('mkdir -p "$COORD_OUTBOX/rex"; '
              f'{PRINT_REVIEW} > "$COORD_OUTBOX/rex/r.yaml"')
    ws = make_ws({"chip": {"role": "specialist", "command": chip, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    listed = outbox._outbox_files

    def listed_then_swapped(box, undelivered):
        found = listed(box, undelivered)
        if (box / "rex").is_dir():  # what the outliving process does at that moment
            os.rename(box / "rex", box / "rex.old")
            os.symlink(victim, box / "rex")
        return found

    monkeypatch.setattr(outbox, "_outbox_files", listed_then_swapped)
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    run(ws)
    assert (victim / "r.yaml").read_text() == "precious\n"
    recs = Store(ws.state).load_all()
    assert recs["o"].status == "done" and recs["o"].children == []
    assert [r for r in recs.values() if r.to == "rex"] == []


def test_an_outbox_file_is_taken_as_a_copy_that_a_handle_kept_open_cannot_write(make_ws):
    """A process of the attempt that kept its outbox file open (one that escaped the kill, say)
    must not write on into state/: the order is filed from a copy, and the file is removed."""
    ws = make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "command": sh(
                     'mkdir -p "$COORD_OUTBOX/rex"; '
                     f'{PRINT_REVIEW} > "$COORD_OUTBOX/rex/r.yaml"; '
                     'stat -c %i "$COORD_OUTBOX/rex/r.yaml" > "$PROBE/inode"')},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: "o" in sup.records and sup.records["o"].terminal and len(sup.records) == 2,
                   "the delivery")
    (child,) = Store(ws.state).load("o").children
    original = ws.state / "orders" / child / "original.yaml"
    assert os.stat(original).st_ino != int((probe_of(ws) / "inode").read_text())  # a new file, not the outbox's
    assert original.read_text().startswith("objective: Review it")
    assert Store(ws.state).load(child).sender == "chip"


def test_a_copied_outbox_file_is_cut_off_from_its_writer_and_keeps_its_size_for_the_reason(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"]}})
    with Supervisor(ws) as sup:
        box = ws.root.parent / "box"
        box.mkdir()
        kept_open = box / "r.md"
        kept_open.write_text(order_md("Small enough"))
        with open(kept_open, "r+b") as writer:
            claimed, size = sup.intake.claim_copy(kept_open, "chip", sender="chip", shown="outbox of o/r.md")
            writer.seek(0)
            writer.write(b"TAMPERED")
            writer.flush()
        assert not kept_open.exists() and claimed.read_text().startswith(order_md("Small enough")[:20])
        assert b"TAMPERED" not in claimed.read_bytes() and size == len(order_md("Small enough").encode())
        big = box / "big.md"
        big.write_bytes(b"x" * (3 * 1024 * 1024))
        claimed, size = sup.intake.claim_copy(big, "chip", sender="chip", shown="outbox of o/big.md")
        assert size == 3 * 1024 * 1024 and claimed.stat().st_size < size  # only what intake reads is copied
        rec = sup.file_claimed(claimed, "chip", shown="outbox of o/big.md", sender="chip", size=size)
    assert rec.status == "rejected" and "is 3.0 MiB; a work order is at most 256 KiB" in rec.errors[0]


def outbox_order_with_a_check(make_ws, outbox: list[str], check: str) -> Workspace:
    """chip runs `outbox` (one try) for order `o`, whose check is `check`; rex may be sent to."""
    ws = make_ws({"chip": {"role": "specialist", "command": outbox, "sends_to": ["rex"], "max_failures": 1},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    acceptance = (f"`{check}` passes", "The second thing is true", "The third thing is true")
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o", acceptance=acceptance))
    return ws


@pytest.mark.parametrize("check, ending, why", [("true", "done", "names no known recipient"),
                                               ("false", "blocked", "not delivered: attempt 1 failed")])
def test_an_outbox_order_with_no_recipient_is_named_in_the_report_and_kept(make_ws, check, ending, why):
    outbox = sh('printf "objective: Review it\\nacceptance: [a is true]\\nfiles: []\\n'
                'branching: [{action: halt-with-note, when: nothing to do}]\\n" > "$COORD_OUTBOX/lost.yaml"; '
                'echo sent')
    ws = outbox_order_with_a_check(make_ws, outbox, check)
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == ending and rec.children == []  # a failing check does not hide it either
    (line,) = rec.report["undelivered"]
    assert line.startswith(f"lost.yaml: {why}")
    assert "Not delivered from the outbox" in (ws.state / "orders" / "o" / "report.md").read_text()
    kept = list((ws.root / ".coordinator" / "attempts" / "o").rglob("lost.yaml"))
    assert len(kept) == 1  # still where the specialist wrote it


def test_an_attempt_sends_at_most_max_sent_orders_and_the_rest_stay_in_its_outbox(make_ws, monkeypatch):
    # An outbox of 2,000 orders was 2,000 orders filed, a report of 56 KB and twice an
    # orchestrator's budget of hot tokens in one go.
    from coordinator import outbox
    monkeypatch.setattr(outbox, "MAX_SENT", 3)
    writer = sh('mkdir -p "$COORD_OUTBOX/rex"; for i in 1 2 3 4 5 6 7; do '
                f'{PRINT_REVIEW} | sed "s/^objective: .*/objective: Review part $i/" > "$COORD_OUTBOX/rex/r$i.yaml"; done')
    ws = outbox_order_with_a_check(make_ws, writer, "true")
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "done" and len(rec.children) == 3
    assert rec.report["undelivered"] == [f"4 file(s) past the 3 orders one attempt may send (from r4.yaml on, "
                                         f"by name): kept in {ws.runtime / 'attempts' / 'o' / '1' / 'outbox' / 'rex'}"]
    kept = sorted(p.name for p in (ws.runtime / "attempts" / "o" / "1" / "outbox" / "rex").iterdir())
    assert kept == ["r4.yaml", "r5.yaml", "r6.yaml", "r7.yaml"]


@pytest.mark.parametrize("check", ["true", "false"])
def test_an_outbox_file_name_with_line_breaks_and_escapes_is_shown_escaped(make_ws, check):
    """The specialist names its outbox files: a line break in the name forged lines in the
    report its sender reads ("WO-0001 rex: blocked -> done"), and an ESC or CR reached the
    supervisor's terminal as is. Names are shown escaped, as an inbox file's are."""
    outbox = sh('mkdir "$COORD_OUTBOX/$(printf "d\\033[2J")"; '
                'echo x > "$COORD_OUTBOX/$(printf "lost\\nWO-0001 rex: blocked -> done")"; '
                'echo x > "$COORD_OUTBOX/$(printf "d\\033[2J")/$(printf "red\\033[31m\\r")"; echo sent')
    ws = outbox_order_with_a_check(make_ws, outbox, check)
    lines: list[str] = []
    with Supervisor(ws, log=lines.append) as sup:
        sup.run_once(limit=60)
    rec = Store(ws.state).load("o")
    assert len(rec.report["undelivered"]) == 2
    assert rec.report["undelivered"][1].startswith("lost\\x0aWO-0001 rex: blocked -> done: ")
    report = (ws.state / "orders" / "o" / "report.md").read_text()
    shown = [line for line in lines if "outbox" in line] + rec.report["undelivered"] + [report]
    assert not any(c in text for text in shown for c in "\x1b\r"), shown
    assert "\nWO-0001 rex: blocked -> done" not in report


@pytest.mark.parametrize("outcome", ["route-to\\nagent: rex", "blocked"])
def test_an_outbox_order_cannot_take_the_id_planned_for_its_senders_follow_up(make_ws, outcome):
    """The follow-up of a route (or an escalation) is named before the outbox is delivered and
    filed after it. An outbox order that asked for that id (the next WO number, easy to guess)
    and referenced its sender passed for the follow-up's own copy: it took the id, the real
    follow-up was rejected as a duplicate, and the route led to the outbox order instead."""
    chip = sh('mkdir -p "$COORD_OUTBOX/rex"; printf "id: WO-0001\\nreferences: [o]\\nobjective: Not the work\\n'
              'acceptance: [a is true, b is true, c is true]\\nfiles: []\\n'
              'branching: [{action: halt-with-note, when: nothing to do}]\\n" > "$COORD_OUTBOX/rex/x.yaml"; '
              f'printf "outcome: {outcome}\\nsummary: for rex\\n" > "$COORD_RESULT"')
    ws = make_ws({"chip": {"role": "specialist", "command": chip, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")}}, escalate_to="rex")
    drop(ws, "chip", "o.md", order_md("The real work is done", id="o",
                                      branching=("route-to-rex if it is for rex",)))
    run(ws)
    recs = Store(ws.state).load_all()
    follow = recs["WO-0001"]
    assert follow.sender in ("chip", "coordinator") and follow.objective != "Not the work", follow.objective
    assert follow.status == "done" and "o" in follow.references
    (other,) = [r for r in recs.values() if r.objective == "Not the work"]
    assert other.status == "rejected" and "'WO-0001' is already used" in other.errors[0]


def test_an_outbox_file_that_cannot_be_removed_is_reported_not_delivered_and_the_supervisor_goes_on(make_ws):
    """The outbox file was made immutable while the specialist ran (by someone else: a sandboxed
    specialist cannot). Taken as a copy while it stayed, it would be sent again after a crash;
    raised, it stopped the supervisor at every start. It is reported and kept, and the rest runs."""
    chip = sh('mkdir -p "$COORD_OUTBOX/rex"; '
              f'{PRINT_REVIEW} > "$COORD_OUTBOX/rex/r.yaml"; '
              'cp "$COORD_OUTBOX/rex/r.yaml" "$COORD_OUTBOX/rex/s.yaml"; touch "$PROBE/written"; '
              'while [ ! -e "$PROBE/go" ]; do sleep 0.02; done')
    ws = make_ws({"chip": {"role": "specialist", "command": chip, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    probe = probe_of(ws)
    stuck: list[Path] = []

    def make_immutable() -> None:
        wait_until(lambda: (probe / "written").exists(), "the outbox files")
        (path,) = (ws.root / ".coordinator" / "attempts" / "o").rglob("r.yaml")
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
            stuck.append(path)
        (probe / "go").touch()

    helper = threading.Thread(target=make_immutable)
    helper.start()
    try:
        drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
        run(ws)
        helper.join()
        if not stuck:
            pytest.skip("this file system has no immutable flag")
        rec = Store(ws.state).load("o")
        assert rec.status == "done"
        (line,) = rec.report["undelivered"]
        assert line.startswith("r.yaml: cannot be taken out of the outbox (Operation not permitted)")
        (sent,) = [r for r in Store(ws.state).load_all().values() if r.to == "rex"]
        assert sent.source == "outbox of o/s.yaml" and sent.status == "done" and rec.children == [sent.id]
        assert [p.name for p in (ws.state / "intake").rglob("*") if p.is_file()] == []  # no copy left behind
    finally:
        helper.join()
        for path in stuck:
            subprocess.run(["chattr", "-i", str(path)], check=False)


def test_an_invalid_outbox_order_that_names_its_recipient_is_delivered_and_rejected_there(make_ws):
    outbox = sh('printf -- "---\\nto: rex\\n---\\n**Objective:** Review it\\n" > "$COORD_OUTBOX/bad.md"; echo sent')
    ws = make_ws({"chip": {"role": "specialist", "command": outbox, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    run(ws)
    recs = Store(ws.state).load_all()
    (child,) = [recs[c] for c in recs["o"].children]
    assert (child.to, child.sender, child.status) == ("rex", "chip", "rejected")
    assert any("acceptance" in e for e in child.errors), child.errors
    assert "undelivered" not in recs["o"].report


def test_ended_orders_are_kept_small_in_memory_and_whole_on_disk_through_a_retry(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1, "command": sh(
        'test -e "$PROBE/fixed" || exit 1')}})
    drop(ws, "chip", "a.md", order_md("Fails until fixed", id="a"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        held = sup.records["a"]
        assert held.status == "blocked" and held.shed  # a long-running supervisor sheds ended detail
        assert held.history == [] and held.report is None and held.failures == []
        (probe_of(ws) / "fixed").touch()
        assert sup.handle("retry", {"id": "a"})["status"] == "queued"
        sup.run_once(limit=30)
    rec = Store(ws.state).load("a")
    assert rec.status == "done"
    assert [h["to"] for h in rec.history] == ["queued", "running", "blocked", "queued", "running", "done"]
    assert "shed" not in (ws.state / "orders" / "a" / "record.json").read_text()


def test_a_hand_edit_of_an_ended_record_is_not_taken_in_when_it_changes_again(make_ws):
    from coordinator import signals

    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1, "command": sh("exit 1")}})
    drop(ws, "chip", "a.md", order_md("Fails", id="a"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        assert sup.records["a"].shed
        path = ws.state / "orders" / "a" / "record.json"
        forged = json.loads(path.read_text())
        forged["history"].insert(0, {"at": "2020-01-01T00:00:00.000Z", "from": "new", "to": "done",
                                     "actor": "mallory"})
        path.write_text(json.dumps(forged))
        assert sup.handle("retry", {"id": "a"})["status"] == "queued"
        sup.run_once(limit=30)
    rec = Store(ws.state).load("a")
    assert all(h["actor"] != "mallory" for h in rec.history)
    assert [h["to"] for h in rec.history] == ["queued", "running", "blocked", "queued", "running", "blocked"]
    assert any(s.kind == "silent" and s.order == "a" for s in signals.load(ws.state))


def test_a_cancelled_order_stays_cancelled_when_its_processes_cannot_be_killed(make_ws):
    """Fault injection: a process that survives SIGKILL (stuck in the kernel) cannot be made on
    demand, so the spawner reports one after the cancel; the order must not be queued again."""
    import dataclasses

    from coordinator.errors import CoordinatorError
    from coordinator.spawner import Spawner

    class Unkillable(Spawner):
        def poll(self):  # type: ignore[no-untyped-def]
            return [dataclasses.replace(ex, alone=False) for ex in super().poll()]

        def kill_tree(self, token: str, grace: float = 2.0) -> None:
            super().kill_tree(token, grace)
            if grace == 0.5:  # the look after the exit, before judging
                raise CoordinatorError(f"pid 4242 of {token} is still alive after SIGKILL")

    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 30")}})
    drop(ws, "chip", "a.md", order_md("Runs until cancelled", id="a"))
    lines: list[str] = []
    with Supervisor(ws, spawner=Unkillable(), log=lines.append) as sup:
        step_until(sup, lambda: sup.records["a"].status == "running" if "a" in sup.records else False,
                   "the order to run")
        sup.handle("cancel", {"id": "a"})
        step_until(sup, lambda: not sup.attempts.active, "the attempt to end")
        sup.run_once(limit=5)
    rec = Store(ws.state).load("a")
    assert (rec.status, rec.failures) == ("cancelled", [])
    assert any("cancelled, but processes of the attempt survived SIGKILL" in line for line in lines)


class KillFailsOnce(Spawner):
    """Fault injection: the first kill of a tree reports a survivor and leaves the tree alive (a
    process stuck in the kernel cannot be made on demand); later kills work."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = 0

    def kill_soon(self, token: str, grace: float = 2.0) -> None:
        pass  # the tree survives it: no exit comes, and the watch kills again, waiting for the answer

    def kill_tree(self, token: str, grace: float = 2.0) -> None:
        if not self.failed:
            self.failed += 1
            raise CoordinatorError(f"1 processes of attempt {token} survived SIGKILL")
        super().kill_tree(token, grace)


@pytest.mark.slow  # 2-3 s: `make test-slow`, and CI, run it
def test_a_timeout_whose_kill_fails_is_said_and_tried_again_and_the_supervisor_runs_on(make_ws, monkeypatch):
    monkeypatch.setattr(attempts, "KILL_RETRY", 0.5)
    monkeypatch.setattr(attempts, "SIGKILL_WAIT", 0.5)
    monkeypatch.setattr(attempts, "KILL_GRACE", 0.3)
    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 30"), "timeout": "1s", "max_failures": 1}})
    drop(ws, "chip", "a.md", order_md("Hangs past its timeout", id="a"))
    lines: list[str] = []
    with Supervisor(ws, spawner=KillFailsOnce(), log=lines.append) as sup:
        sup.run_once(limit=30)
    rec = Store(ws.state).load("a")
    assert rec.status == "blocked" and rec.failures[0].startswith("timed out after 1.0s"), rec.failures
    (said,) = [line for line in lines if "could not kill" in line]
    assert said.startswith("a: could not kill the attempt: 1 processes of attempt a.1.") and said.endswith(
        "survived SIGKILL; trying again in 0.5s")


def test_a_cancel_whose_kill_fails_says_so_and_the_order_stays_cancelled_after_a_restart(make_ws, monkeypatch):
    monkeypatch.setattr(attempts, "KILL_RETRY", 0.5)
    ws = make_ws({"chip": {"role": "specialist", "command": sh('echo run >> "$PROBE/runs"; sleep 30')}})
    drop(ws, "chip", "a.md", order_md("Runs until cancelled", id="a"))
    lines: list[str] = []
    with Supervisor(ws, spawner=KillFailsOnce(), log=lines.append) as sup:
        step_until(sup, lambda: "a" in sup.records and sup.records["a"].status == "running", "the order to run")
        answer = sup.handle("cancel", {"id": "a"})
        assert answer["status"] == "cancelled"
        assert answer["warning"].startswith("a: could not kill the attempt: 1 processes of attempt a.1.")
        assert "\n" not in answer["warning"]
        step_until(sup, lambda: not sup.attempts.active, "the kill tried again to end the attempt")
    with Supervisor(ws) as sup:
        sup.run_once(limit=10)
    rec = Store(ws.state).load("a")
    assert (rec.status, rec.failures) == ("cancelled", [])
    assert [h["to"] for h in rec.history] == ["queued", "running", "cancelled"]
    assert (probe_of(ws) / "runs").read_text() == "run\n"  # never run again


def test_cancel_and_retry_through_the_library(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1, "command": sh(
        'test -e "$PROBE/fixed" || exit 1')}})
    drop(ws, "chip", "a.md", order_md("Fails until fixed", id="a"))
    run(ws)
    assert status(ws, "a") == "blocked"
    (probe_of(ws) / "fixed").touch()
    with Supervisor(ws) as sup:
        assert sup.handle("retry", {"id": "a"})["status"] == "queued"
        sup.run_once(limit=30)
    assert status(ws, "a") == "done"
    drop(ws, "chip", "w.md", order_md("Waits forever", id="w", blocked_by=["a", "never"]))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        assert status(ws, "w") == "rejected"  # unknown dependency
    drop(ws, "chip", "q.md", order_md("Queued then cancelled", id="q"))
    with Supervisor(ws) as sup:
        sup.step_commit()
        sup._intake_step()
        sup.handle("cancel", {"id": "q"})
        sup.run_once(limit=30)
    rec = Store(ws.state).load("q")
    assert rec.status == "cancelled" and rec.attempts == 0
    assert [e.line for e in StateRepo(ws.state).entries("q")][-1] == "q chip: queued -> cancelled"


def test_invalid_order_is_rejected_with_the_original_bytes_and_errors_kept(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo never")}})
    text = order_md("Too few checks", acceptance=("only one",), id="bad")
    drop(ws, "chip", "bad.md", text)
    run(ws)
    recs = Store(ws.state).load_all()
    (rec,) = recs.values()
    assert rec.status == "rejected"
    assert any("acceptance" in e and "3 to 5" in e for e in rec.errors)
    assert (Store(ws.state).folder(rec.id) / "original.md").read_text() == text
    assert list(ws.inbox("chip").iterdir()) == []


def test_a_burst_dropped_while_an_attempt_runs_is_filed_a_slice_per_step_and_all_of_it(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 30")},
                  "walt": {"role": "orchestrator", "sends_to": []}})
    drop(ws, "chip", "slow.md", order_md("The slow order is done", id="slow"))

    class Rescanning(NullWatcher):  # every step sees every file in the inboxes, as a rescan does
        def drain(self) -> tuple[set[Path], bool]:
            return set(), True

    with Supervisor(ws, watcher=Rescanning()) as sup:
        step_until(sup, lambda: sup.records.get("slow") and sup.records["slow"].status == "running",
                   "the slow order to start")
        for i in range(300):
            drop(ws, "walt", f"b{i:03d}.md", order_md(f"Burst order {i} waits", id=f"b{i:03d}"))
        sup.step()

        def burst() -> list[str]:
            return [oid for oid in sup.records if oid.startswith("b")]

        # Filing yields to the running attempt (its exit wants reaping) after a few milliseconds.
        assert 0 < len(burst()) < 300
        step_until(sup, lambda: len(burst()) == 300, "the whole burst to be filed")
        assert all(sup.records[oid].status == "queued" for oid in burst())
        assert not any(ws.inbox("walt").iterdir())
        sup.attempts.kill_all()


def test_duplicate_id_never_runs_twice(make_ws):
    ws = make_ws({"chip": {"role": "specialist",
                           "command": sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran.txt"')}})
    drop(ws, "chip", "a.md", order_md("First is done", id="same"))
    run(ws)
    drop(ws, "chip", "b.md", order_md("Second is done", id="same"))
    run(ws)
    assert (probe_of(ws) / "ran.txt").read_text().split() == ["same"]
    rejected = [r for r in Store(ws.state).load_all().values() if r.status == "rejected"]
    assert len(rejected) == 1 and "same" in rejected[0].errors[0]


def test_report_is_delivered_to_the_sender(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo all good")},
                  "walt": {"role": "orchestrator", "sends_to": ["chip"]}}, orchestrator="walt")
    drop(ws, "chip", "a.md", order_md("Reported back", id="a", sender="walt"))
    run(ws)
    report = (ws.state / "reports" / "walt" / "a.md").read_text()
    assert "done" in report and "all good" in report
    ledger = json.loads((ws.state / "orchestrator" / "ledger.json").read_text())
    kinds = {(i["ref"], i["kind"], i["status"]) for i in ledger["items"]}
    assert ("a", "order", "completed") in kinds and ("a", "report", "completed") in kinds


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hanging_specialist_and_its_escaped_descendants_are_killed_at_the_timeout(make_ws):
    import time

    hang = sh('sleep 60 & echo $! >> "$PROBE/pids"; '
              'setsid sh -c \'echo $$ >> "$PROBE/pids"; sleep 60\' & '
              'echo $$ >> "$PROBE/pids"; sleep 60')
    ws = make_ws({"chip": {"role": "specialist", "command": hang, "timeout": "1s", "max_failures": 1}})
    drop(ws, "chip", "h.md", order_md("Hangs forever", id="h"))
    started = time.monotonic()
    run(ws)
    elapsed = time.monotonic() - started
    rec = Store(ws.state).load("h")
    assert rec.status == "blocked" and "timed out after 1.0s" in rec.failures[0]
    pids = [int(p) for p in (probe_of(ws) / "pids").read_text().split()]
    assert len(pids) == 3 and not any(_alive(p) for p in pids)  # none left, not even as a zombie
    assert elapsed < 1 + 2 + 8  # timeout + grace + the supervisor's own start and stop


def test_a_silent_attempt_is_flagged_stale_and_the_flag_is_audited(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 1.5"), "stale_after": "0.3s"}})
    drop(ws, "chip", "s.md", order_md("Works quietly", id="s"))
    seen = []
    with Supervisor(ws) as sup:
        sup._intake_step()
        while True:
            sup.step()
            rec = sup.records["s"]
            seen.append(rec.stale)
            if rec.terminal:
                break
            sup._wait(0.05)
    assert True in seen and rec.status == "done" and not rec.stale
    lines = [e.line for e in StateRepo(ws.state).entries("s")]
    assert any("stale (no output or heartbeat for 0.3s)" in line for line in lines)


def test_a_second_supervisor_refuses_and_a_first_sigterm_lets_running_work_finish(make_ws):
    import signal
    import sys
    import time

    exe = str(Path(sys.executable).with_name("coordinator"))
    ws = make_ws({"chip": {"role": "specialist", "command": sh('touch "$PROBE/started"; sleep 1.5; echo finished')}})
    first = subprocess.Popen([exe, "-w", str(ws.root), "supervise"], stderr=subprocess.PIPE, text=True)
    try:
        drop(ws, "chip", "a.md", order_md("Finishes after a while", id="a"))
        started = probe_of(ws) / "started"
        deadline = time.monotonic() + 20
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists()
        second = subprocess.run([exe, "-w", str(ws.root), "supervise", "--once"], capture_output=True, text=True)
        assert second.returncode == 2
        assert second.stderr.strip() == (f"coordinator: another supervisor (pid {first.pid}) is running on "
                                         f"{ws.root}; stop it first")
        first.send_signal(signal.SIGTERM)  # once: no new work, the running attempt may finish
        _, err = first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert "stopping: no new work" in err and "Traceback" not in err
    assert status(ws, "a") == "done"


def test_an_order_that_depends_on_a_cancelled_one_is_blocked_not_left_waiting(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "a.md", order_md("Never wanted after all", id="first"))
    with Supervisor(ws) as sup:
        sup._intake_step()
        sup.handle("cancel", {"id": "first"})
        sup.step_commit()
    drop(ws, "chip", "b.md", order_md("Needs the first", id="second", blocked_by=["first"]))
    run(ws)
    rec = Store(ws.state).load("second")
    assert rec.status == "blocked" and rec.report["summary"] == "dependency first ended cancelled"
    with Supervisor(ws) as sup, pytest.raises(StateError) as refused:
        sup.handle("retry", {"id": "second"})
    assert str(refused.value) == ("second depends on first, which ended cancelled: retried, it would wait "
                                  "forever; send it again without first in blocked_by")
    assert Store(ws.state).load("second").status == "blocked"


def test_a_start_waits_out_a_board_that_is_only_looking_whether_a_supervisor_runs(make_ws):
    """`board` takes the pid file's lock shared for an instant; a supervisor starting just then
    is not told that another supervisor runs."""
    import fcntl
    import threading

    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    with Supervisor(ws):  # the runtime folder and the pid file exist
        pass
    fd = os.open(ws.runtime / "supervisor.pid", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    looked = threading.Timer(0.15, lambda: os.close(fd))  # the board is done looking
    looked.start()
    try:
        with Supervisor(ws):
            assert (ws.runtime / "supervisor.pid").read_text().split() == [str(os.getpid())]  # it runs
    finally:
        looked.join()


def test_retry_of_an_order_waiting_for_its_dependencies_says_what_it_waits_for(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    first = drop(ws, "chip", "a.md", order_md("Comes first", id="sooner"))
    os.utime(first, (time.time() - 60, time.time() - 60))  # taken in first: the start-up scan goes by age
    drop(ws, "chip", "b.md", order_md("Needs another", id="later", blocked_by=["sooner"]))
    with Supervisor(ws) as sup:
        intake_all(sup)
        assert sup.records["later"].status == "waiting"
        with pytest.raises(StateError) as refused:
            sup.handle("retry", {"id": "later"})
    assert str(refused.value) == "later is waiting for sooner; it runs once they are done"


def test_a_changed_config_is_said_once_and_the_running_team_is_kept(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        sup._last_watch = float("-inf")  # the next step looks at once
        sup.step()
        config = ws.root / "coordinator.yaml"
        config.write_text(config.read_text() + "\n# a new agent would go here\n")
        for _ in range(2):
            sup._last_watch = float("-inf")
            sup.step()
        assert list(sup.config.agents) == ["chip"]
    assert [s for s in said if "changed" in s] == [
        "WARNING: coordinator.yaml changed since the supervisor started; it keeps the team it started with: "
        "restart it to use the new one"]


ROUTE_TO_REX = sh('if [ "$COORD_AGENT" = chip ]; then '
                  'printf "outcome: route-to\\nagent: rex\\nsummary: for rex\\n" > "$COORD_RESULT"; fi; '
                  'echo "$COORD_AGENT $COORD_ORDER_ID" >> "$PROBE/ran.txt"')


def test_an_order_that_depends_on_a_routed_one_runs_when_the_follow_up_is_done(make_ws):
    """A route hands the same work on: what waited for the routed order waits for its follow-up."""
    ws = make_ws({"chip": {"role": "specialist", "command": ROUTE_TO_REX, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": ROUTE_TO_REX}})
    drop(ws, "chip", "a.md", order_md("Review happens", id="review", branching=("route-to-rex if it is a review",)))
    drop(ws, "rex", "b.md", order_md("Ship after the review", id="ship", blocked_by=["review"]))
    run(ws)
    recs = Store(ws.state).load_all()
    follow = recs["review"].routed_to
    assert recs["review"].status == "routed" and recs[follow].status == "done"
    assert recs["ship"].status == "done", recs["ship"].history
    ran = (probe_of(ws) / "ran.txt").read_text().splitlines()
    assert ran == ["chip review", f"rex {follow}", "rex ship"]
    released = [h for h in recs["ship"].history if h["to"] == "queued"][-1]
    assert released["note"] == f"{follow} is done"


def test_an_order_sent_after_its_dependency_was_routed_waits_for_the_follow_up(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": ROUTE_TO_REX, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh('[ "$COORD_ORDER_ID" = ship ] || sleep 1')}})
    drop(ws, "chip", "a.md", order_md("Review happens", id="review", branching=("route-to-rex if it is a review",)))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: "review" in sup.records and sup.records["review"].status == "routed", "the route")
        follow = sup.records["review"].routed_to
        assert sup.records[follow].status in ("queued", "running")
        drop(ws, "rex", "b.md", order_md("Ship after the review", id="ship", blocked_by=["review"]))
        step_until(sup, lambda: "ship" in sup.records, "the intake of ship")
        assert sup.records["ship"].status == "waiting"
        with pytest.raises(StateError) as refused:
            sup.handle("retry", {"id": "ship"})
        assert str(refused.value) == f"ship is waiting for review (routed to {follow}); it runs once they are done"
        step_until(sup, lambda: sup.records["ship"].status == "done", "ship to run after the follow-up")


def test_a_route_that_ends_cancelled_blocks_what_waited_for_it(make_ws):
    # chip routes the review to rex, whose every attempt fails: the follow-up ends blocked, and
    # is cancelled. What waited for the review waits for what its route ended in: never done.
    # (A route to an agent that may not take the work is refused before it is taken: see
    # test_a_route_to_an_agent_that_may_not_write_the_orders_files_is_a_failed_attempt.)
    ws = make_ws({"chip": {"role": "specialist", "command": ROUTE_TO_REX, "sends_to": ["rex"],
                           "writes": ["webapp/src/**"]},
                  "rex": {"role": "specialist", "command": sh("exit 1"), "writes": ["webapp/src/**"]}})
    drop(ws, "chip", "a.md", order_md("Review happens", id="review", files=("webapp/src/greeting.py",),
                                      branching=("route-to-rex if it is a review",)))
    drop(ws, "chip", "b.md", order_md("Ship after the review", id="ship", blocked_by=["review"]))
    run(ws)
    recs = Store(ws.state).load_all()
    follow = recs["review"].routed_to
    assert recs["review"].status == "routed" and recs[follow].status == "blocked"
    assert recs["ship"].status == "waiting"  # a blocked order may still be retried and done
    with Supervisor(ws) as sup:
        sup.handle("cancel", {"id": follow})
    run(ws)
    recs = Store(ws.state).load_all()
    assert recs["ship"].status == "blocked"
    assert recs["ship"].report["summary"] == f"dependency review (routed to {follow}) ended cancelled"
    with Supervisor(ws) as sup, pytest.raises(StateError) as refused:
        sup.handle("retry", {"id": "ship"})
    assert str(refused.value) == (f"ship depends on review (routed to {follow}), which ended cancelled: retried, "
                                  "it would wait forever; send it again without review in blocked_by")


def test_a_blocked_order_can_be_cancelled_and_then_no_longer_retried(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh('printf "outcome: blocked\\nsummary: no\\n" > "$COORD_RESULT"')}})
    drop(ws, "chip", "a.md", order_md("Cannot be done", id="stuck"))
    run(ws)
    assert status(ws, "stuck") == "blocked"
    before = Store(ws.state).load("stuck").report["summary"]
    with Supervisor(ws) as sup:
        assert sup.handle("cancel", {"id": "stuck"}) == {"id": "stuck", "status": "cancelled"}
        with pytest.raises(StateError) as refused:
            sup.handle("retry", {"id": "stuck"})
        assert "stuck is cancelled" in str(refused.value)
        with pytest.raises(StateError) as again:
            sup.handle("cancel", {"id": "stuck"})
        assert str(again.value) == ("stuck is cancelled; only queued, waiting, running, blocked or halted orders "
                                    "can be cancelled")
    lines = [e.line for e in StateRepo(ws.state).entries("stuck")]
    assert lines[-1] == "stuck chip: blocked -> cancelled"
    # The report keeps why it had ended before it was cancelled.
    said = f"cancelled by user; it was blocked: {before}"
    assert Store(ws.state).load("stuck").report["summary"] == said
    assert said in (ws.state / "orders" / "stuck" / "report.md").read_text()


def test_a_routed_record_written_before_routed_to_existed_still_leads_to_its_follow_up():
    from coordinator.store import Record, route_end

    old = {"id": "review", "to": "chip", "sender": "user", "status": "routed", "objective": "Review",
           "created": "2026-01-01T00:00:00.000Z", "updated": "2026-01-01T00:00:00.000Z", "seq": 1,
           "report": {"summary": "for rex", "routed_to": "WO-0002", "status": "routed"}}
    follow = Record.from_json({**old, "id": "WO-0002", "to": "rex", "status": "done", "seq": 2, "report": None})
    records = {"review": Record.from_json(old), "WO-0002": follow}
    assert records["review"].routed_to == "WO-0002"
    assert route_end(records, "review") is follow


def test_a_blocker_that_already_ended_cancelled_fails_the_attempt_then_blocks(make_ws):
    # Blocked at once, the agent was never told why (a retry's brief says nothing) and requeued
    # on it again: now a failed attempt whose reason the next brief gives, blocked after max_failures.
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        'printf "outcome: requeue-with-blocker\\nblocker: gone\\nsummary: needs gone\\n" > "$COORD_RESULT"')}})
    drop(ws, "chip", "a.md", order_md("Never wanted", id="gone"))
    with Supervisor(ws) as sup:
        sup._intake_step()
        sup.handle("cancel", {"id": "gone"})
        drop(ws, "chip", "b.md", order_md("Needs gone", id="needs",
                                          branching=("requeue-with-blocker if a dependency is missing",)))
        step_until(sup, lambda: "needs" in sup.records and sup.records["needs"].status not in ("queued", "running"),
                   "the requeue")
        rec = sup.store.with_detail(sup.records["needs"])
        assert rec.status == "blocked" and "waiting" not in [h["to"] for h in rec.history]
        assert rec.report["summary"].startswith("failed 2 time(s); last: requeue-with-blocker: gone ended cancelled "
                                                "and will never be done")


@pytest.mark.parametrize("blocker", ["dep", "loop", "waiter"])
def test_a_requeue_on_a_blocker_that_can_never_release_it_anew_is_a_failed_attempt(make_ws, blocker):
    """A blocker already done when the attempt started (its work was there to see), the order
    itself, or an order that waits for this one: requeued on it, the order ran again at once,
    for ever (`supervise --once` never ended), or waited for ever. Each is a failed attempt
    that says why, and the order ends blocked after max_failures."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        'if [ "$COORD_ORDER_ID" = loop ]; then echo "$COORD_ORDER_ID" >> "$PROBE/ran.txt"; '
        f'printf "outcome: requeue-with-blocker\\nblocker: {blocker}\\nsummary: waits\\n" > "$COORD_RESULT"; fi')}})
    drop(ws, "chip", "a.md", order_md("Dependency is done", id="dep", priority="urgent"))
    drop(ws, "chip", "b.md", order_md("Loop is done", id="loop",
                                      branching=("requeue-with-blocker if a dependency is missing",)))
    drop(ws, "chip", "c.md", order_md("Waiter is done", id="waiter", blocked_by=["loop"]))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: "loop" in sup.records and sup.records["loop"].terminal,
                   "the order to end", wait=30)
        rec = sup.store.with_detail(sup.records["loop"])
    assert rec.status == "blocked", rec.history[-3:]
    assert len((probe_of(ws) / "ran.txt").read_text().split()) == 2  # max_failures: 2
    why = {"dep": "dep was already done when this attempt started",
           "loop": "names this order itself",
           "waiter": "waiter waits for this order"}[blocker]
    assert why in rec.failures[-1], rec.failures


def test_half_a_character_in_json_is_refused_where_it_comes_in_and_never_stops_the_supervisor(make_ws):
    """JSON can carry "\\ud800", half of a character no file can hold (YAML refuses it). In an
    order it is a rejection, in a result file a failed attempt, each with one clear line; the
    supervisor goes on and its state files stay readable."""
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1, "command": sh(
        'printf \'{"outcome": "done", "summary": "ok \\\\ud800"}\' > "$COORD_RESULT"')}})
    drop(ws, "chip", "half.json", '{"objective": "It works \\ud800", "acceptance": ["a", "b", "c"], '
                                  '"files": [], "branching": ["halt-with-note if it is unclear"], "id": "half"}')
    drop(ws, "chip", "r.md", order_md("The result is read", id="r"))
    run(ws)
    recs = Store(ws.state).load_all()
    (half,) = [rec for rec in recs.values() if rec.source == "inbox/chip/half.json"]
    assert half.status == "rejected"
    assert half.errors == ["inbox/chip/half.json: is not valid JSON text: \\ud800 is half of a character "
                                   "(a lone surrogate); write the character itself"]
    assert recs["r"].status == "blocked"
    assert recs["r"].failures[0] == ("invalid result file: result.yaml: is not valid JSON text: \\ud800 is half of "
                                     "a character (a lone surrogate); write the character itself")


def test_a_state_write_holds_half_a_character_as_its_escape(tmp_path):
    """What no check caught (a model's reply, say) is written, never a failed write."""
    from coordinator import durable

    durable.write_json(tmp_path / "r.json", {"summary": "ok \ud800"})
    assert durable.read_json(tmp_path / "r.json") == {"summary": "ok \ud800"}
    durable.write_text(tmp_path / "r.md", "ok \ud800\n")
    assert (tmp_path / "r.md").read_text("utf-8") == "ok \\ud800\n"


def test_an_id_assigned_to_a_dropped_file_is_never_one_another_waiting_file_names(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true"), "writes": ["webapp/src/**"]}})
    past = time.time() - 60
    plain = drop(ws, "chip", "plain.md", order_md("The footer exists"))
    os.utime(plain, (past, past))  # the older one: taken in first
    drop(ws, "chip", "named.md", order_md("The header exists", id="WO-0001"))
    run(ws)
    records = Store(ws.state).load_all()
    assert {r.objective: (r.id, r.status) for r in records.values()} == {
        "The footer exists": ("WO-0002", "done"), "The header exists": ("WO-0001", "done")}


def _dropped_in_this_order(ws, *files):
    """Drop (name, text) files so that intake takes them in the order given (oldest first)."""
    past = time.time() - 60
    for i, (name, text) in enumerate(files):
        path = drop(ws, "chip", name, text)
        os.utime(path, (past + i, past + i))


def test_an_order_waiting_on_one_still_in_the_inbox_waits_for_it_instead_of_being_rejected(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true"), "writes": ["webapp/src/**"]}})
    _dropped_in_this_order(ws, ("first.md", order_md("The footer exists", blocked_by=["zz"])),
                           ("second.json", json.dumps({"id": "zz", "objective": "The header exists",
                                                       "acceptance": ["a holds", "b holds", "c holds"],
                                                       "files": [], "branching": ["halt-with-note if done"]})))
    run(ws)
    records = Store(ws.state).load_all()
    assert {r.objective: r.status for r in records.values()} == {"The footer exists": "done",
                                                                 "The header exists": "done"}


def test_an_order_waiting_on_one_that_is_then_rejected_is_blocked_not_left_waiting(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true"), "writes": ["webapp/src/**"]}})
    _dropped_in_this_order(ws, ("first.md", order_md("The footer exists", blocked_by=["zz"])),
                           ("second.md", order_md("The header exists", acceptance=("only one",), id="zz")))
    run(ws)
    records = Store(ws.state).load_all()
    assert {r.objective: r.status for r in records.values()} == {"The footer exists": "blocked",
                                                                 "The header exists": "rejected"}


@pytest.mark.parametrize("declarer", ["broken", "in a comment", "taken back"])
def test_an_order_waiting_on_an_id_no_order_ends_up_having_is_blocked_not_left_waiting(make_ws, declarer):
    """An order may wait on an id a file still in an inbox declares; when that file turns out
    not to be that order (unreadable, the id only in a comment, taken back before intake),
    the waiting order is blocked with the reason, never left waiting forever."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true"), "writes": ["webapp/src/**"]}})
    a = drop(ws, "chip", "a.md", order_md("The footer exists", id="a", blocked_by=["zz"]))
    past = time.time() - 60
    os.utime(a, (past, past))  # taken in first
    with Supervisor(ws) as sup:
        if declarer == "broken":
            drop(ws, "chip", "b.md", "---\nid: zz\nobjective: [unclosed\n---\n**Objective:** x\n")
        elif declarer == "in a comment":
            drop(ws, "chip", "b.md", "<!-- kept for later:\nid: zz\n-->\n" + order_md("The header exists"))
        else:
            b = drop(ws, "chip", "b.md", order_md("The header exists", id="zz"))
            sup.intake.note_waiting(b)  # seen in the inbox and read (as for an id assigned
            sup.intake.waiting.settle()  # meanwhile), then taken back before it was claimed
            b.unlink()
        sup.run_once(limit=20)
    rec = Store(ws.state).load("a")
    assert rec.status == "blocked", rec.status
    assert rec.report["summary"].startswith("dependency zz is no order: the file that named it")


def test_what_waiting_files_said_of_their_ids_is_let_go_once_they_are_filed(make_ws):
    """Every id a waiting file declared (and every WO- number it named) was kept for the life
    of the supervisor: a week-long run held one path per order ever dropped (~400 bytes each;
    the soak saw its memory grow by that). Once filed, the history knows the id."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true"), "writes": ["webapp/src/**"]}})
    with Supervisor(ws) as sup:
        for i in range(40):
            drop(ws, "chip", f"WO-{9000 + i}.md", order_md(f"Order {i} is done", id=f"WO-{9000 + i}"))
            drop(ws, "chip", f"n{i}.md", order_md(f"Named order {i} is done", id=f"named-{i}"))
            sup.intake.note_waiting(ws.inbox_root / "chip" / f"n{i}.md")  # as the watcher's hint does
        sup.run_once(limit=200)
        assert sup.intake.waiting.declared == {} and sup.intake.waiting.unread == {}
    assert sum(r.status == "done" for r in Store(ws.state).load_all().values()) == 80


def test_an_order_a_crash_left_claimed_never_takes_an_id_an_inbox_file_names(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true"), "writes": ["webapp/src/**"]}})
    claimed = ws.state / "intake" / "chip"
    claimed.mkdir(parents=True, exist_ok=True)
    (claimed / f"{time.time_ns():020d}-a.md").write_text(order_md("The footer exists"))  # no id of its own
    drop(ws, "chip", "b.md", order_md("The header exists", id="WO-0001"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=20)
    by_objective = {r.objective: (r.id, r.status) for r in Store(ws.state).load_all().values()}
    assert by_objective["The header exists"] == ("WO-0001", "done")
    assert by_objective["The footer exists"][1] == "done" and by_objective["The footer exists"][0] != "WO-0001"


def test_an_outbox_file_whose_path_is_over_path_max_is_delivered_and_stops_nothing(make_ws):
    """A specialist nests its outbox until a file's whole path is over PATH_MAX (its folder's
    is not): looking the path up fails with ENAMETOOLONG. That stopped the supervisor with an
    internal error, and again at every start (the outbox is delivered again at restart). It is
    taken from its folder as any other, and delivered once."""
    chip = sh('cd "$COORD_OUTBOX" && d=$(printf "d%.0s" $(seq 100)) && n=${#COORD_OUTBOX} && '
              'while [ $((n + 101)) -lt 3990 ]; do mkdir $d && cd $d && n=$((n + 101)); done && '
              'mkdir rex && cd rex && f=$(printf "f%.0s" $(seq 245)).yaml && '
              f'{PRINT_REVIEW} > $f && '
              'test ${#PWD} -lt 4000 && test $((${#PWD} + ${#f})) -gt 4096')
    ws = make_ws({"chip": {"role": "specialist", "command": chip, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    run(ws)
    recs = Store(ws.state).load_all()
    (child,) = [r for r in recs.values() if r.to == "rex"]
    assert (recs["o"].status, recs["o"].children) == ("done", [child.id])
    assert (child.sender, child.status) == ("chip", "done")


def test_an_outbox_file_replaced_while_it_is_copied_keeps_the_new_file(make_ws, monkeypatch):
    """A process of the attempt that outlived it renames a new order over its outbox file
    after the supervisor read the file, before it removed it: the copy is of the file that
    was read, and the new file, never read, must not be removed with it (it was lost)."""
    from coordinator import claims

    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"]}})
    box = ws.root.parent / "box"
    box.mkdir()
    path = box / "r.md"
    path.write_text(order_md("The first one"))
    read = claims._read_fd_capped

    def read_then_replaced(fd: int) -> tuple[bytes, int | None]:
        got = read(fd)
        (box / ".new").write_text(order_md("The second one"))
        os.rename(box / ".new", path)
        return got

    monkeypatch.setattr(claims, "_read_fd_capped", read_then_replaced)
    with Supervisor(ws) as sup:
        claimed, _ = sup.intake.claim_copy(path, "chip", sender="chip", shown="outbox of o/r.md", within=box)
    assert "The first one" in claimed.read_text()
    assert "The second one" in path.read_text()


def test_an_outbox_file_replaced_while_it_is_delivered_is_listed_as_not_delivered(make_ws, monkeypatch):
    """The new file a leftover process renamed over an outbox file while it was copied stays in
    the outbox (claims.claim_copy): the sender's report says so, as for any file left there."""
    from coordinator import claims

    chip = sh(f'mkdir -p "$COORD_OUTBOX/rex"; {PRINT_REVIEW} > "$COORD_OUTBOX/rex/r.yaml"')
    ws = make_ws({"chip": {"role": "specialist", "command": chip, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    read, replaced = claims._read_fd_capped, []

    def read_then_replaced(fd: int) -> tuple[bytes, int | None]:
        got = read(fd)
        outbox = list((ws.root / ".coordinator" / "attempts" / "o").rglob("r.yaml"))  # else the inbox's file
        if outbox and not replaced:
            (path,) = outbox
            (path.parent / ".new").write_text(order_md("The second one"))
            os.rename(path.parent / ".new", path)
            replaced.append(path)
        return got

    monkeypatch.setattr(claims, "_read_fd_capped", read_then_replaced)
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    run(ws)
    recs = Store(ws.state).load_all()
    (child,) = [r for r in recs.values() if r.to == "rex"]
    assert (recs["o"].status, recs["o"].children) == ("done", [child.id])
    assert (child.objective, child.status) == ("Review it", "done")
    (line,) = recs["o"].report["undelivered"]
    assert line.startswith("r.yaml: replaced while it was taken (what it held before was delivered); the new "
                           "file is kept in ")
    assert "The second one" in replaced[0].read_text()


def test_a_supervisor_whose_start_fails_leaves_the_workspace_unlocked(make_ws):
    """A start that failed half-way (here: a folder where signals are appended) kept the
    workspace's lock, its journal and its spawn server in a program that embeds the supervisor
    (or a test): every later start in that program said "another supervisor is running"."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true")}})
    (ws.state / "signals.jsonl").mkdir()
    with pytest.raises(StateError, match="signals.jsonl: is a directory"), Supervisor(ws):
        pass
    (ws.state / "signals.jsonl").rmdir()
    drop(ws, "chip", "o.md", order_md("It runs after all", id="o"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    assert Store(ws.state).load("o").status == "done"
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            continue
    assert not [f for f in held if f.startswith(str(ws.root))]


@pytest.mark.slow
def test_a_second_ctrl_c_stops_every_attempt_at_once_even_those_that_ignore_sigterm(make_ws):
    """Stop now means now: the kills of the attempts start together, and the loop wakes at the
    signal. One kill after another, each waiting out SIGTERM, ten attempts took 5 s, and each
    Ctrl-C was answered up to a second late."""
    import signal
    import sys
    import time

    exe = str(Path(sys.executable).with_name("coordinator"))
    hang = sh('trap "" TERM; touch "$PROBE/started-$COORD_ORDER_ID"; sleep 60 & wait; sleep 60')
    ws = make_ws({"hang": {"role": "specialist", "command": hang, "max_parallel": 10}}, max_parallel=10)
    ids = [f"h{i}" for i in range(10)]
    for oid in ids:
        drop(ws, "hang", f"{oid}.md", order_md(f"Hangs and ignores SIGTERM ({oid})", id=oid))
    sup = subprocess.Popen([exe, "-w", str(ws.root), "supervise"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(list(probe_of(ws).glob("started-*"))) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(probe_of(ws).glob("started-*"))) == len(ids)
        sup.send_signal(signal.SIGINT)
        time.sleep(0.2)  # two signals sent together are one: the kernel does not queue them
        sup.send_signal(signal.SIGINT)
        asked = time.monotonic()
        _, err = sup.communicate(timeout=60)
        took = time.monotonic() - asked
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == 0, err
    assert "stopped: running attempts killed" in err and "Traceback" not in err
    assert took < 3.0, f"stopping ten attempts now took {took:.1f}s"
    assert not subprocess.run(["pgrep", "-f", str(probe_of(ws))], capture_output=True).stdout
    # Cut off by a chosen stop: the next start queues each again without counting a failure.
    assert json.loads((ws.runtime / "cut-by-stop.json").read_text()) == sorted(ids)


@pytest.mark.slow
def test_a_second_supervisor_is_refused_even_after_coordinator_runtime_was_removed(make_ws):
    """`rm -rf .coordinator` while a supervisor ran took its lock file along: a second one
    started beside it and took its running attempts for a crash's. Now the workspace folder is
    locked too, and the running supervisor writes its lock file again."""
    import shutil
    import signal
    import sys
    import time

    exe = str(Path(sys.executable).with_name("coordinator"))
    ws = make_ws({"chip": {"role": "specialist", "command": sh('touch "$PROBE/started"; sleep 30')}})
    first = subprocess.Popen([exe, "-w", str(ws.root), "supervise"], stderr=subprocess.PIPE, text=True)
    try:
        drop(ws, "chip", "a.md", order_md("Runs while the runtime folder goes", id="a"))
        wait_until(lambda: (probe_of(ws) / "started").exists(), "the attempt to start", timeout=20)
        shutil.rmtree(ws.runtime)
        second = subprocess.run([exe, "-w", str(ws.root), "supervise", "--once"], capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().endswith(
            f"coordinator: another supervisor is running on {ws.root} (its .coordinator/supervisor.pid was "
            "removed while it ran, so its pid is not known); stop it first")
        assert status(ws, "a") == "running"  # its attempt was left alone
        running = [exe, "-w", str(ws.root), "board"]
        wait_until(lambda: f"supervisor: running (pid {first.pid})" in subprocess.run(
            running, capture_output=True, text=True).stdout, "the board to see it running again", timeout=20)
        first.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        first.send_signal(signal.SIGTERM)  # and now: its attempt sleeps on
        _, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert ".coordinator/supervisor.pid was removed while the supervisor ran; written again" in err


def test_a_hangup_stops_the_supervisor_as_a_first_ctrl_c_does(make_ws):
    """The terminal of a `supervise &` closed (or an ssh session dropped): SIGHUP killed the
    supervisor without a word, and the attempt it cut off counted as a failure of its agent
    (with `max_failures: 1`, the order was blocked)."""
    import signal
    import sys

    exe = str(Path(sys.executable).with_name("coordinator"))
    ws = make_ws({"chip": {"role": "specialist", "command": sh('touch "$PROBE/started"; sleep 1.5; echo finished'),
                           "max_failures": 1}})
    sup = subprocess.Popen([exe, "-w", str(ws.root), "supervise"], stderr=subprocess.PIPE, text=True)
    try:
        drop(ws, "chip", "a.md", order_md("Finishes after a hangup", id="a"))
        wait_until(lambda: (probe_of(ws) / "started").exists(), "the attempt to start", timeout=20)
        sup.send_signal(signal.SIGHUP)
        _, err = sup.communicate(timeout=60)
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == 0, err
    assert "stopping: no new work" in err and "Traceback" not in err
    assert status(ws, "a") == "done"


def test_an_agent_whose_program_is_not_on_path_is_said_at_start(make_ws):
    """A typo in an agent's command (`claud` for `claude`) was found only when each order had
    failed to start `max_failures` times; `doctor` knew it."""
    ws = make_ws({"chip": {"role": "specialist", "command": ["claud-not-installed", "-p", "{brief_text}"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")},
                  "local": {"role": "specialist", "command": ["./run-here.sh"]}})
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        sup.run_once(limit=30)
    assert [line for line in said if "not found on PATH" in line] == [
        "WARNING: agents.chip.command.0: claud-not-installed is not found on PATH: each of its orders fails to "
        "start until it is (`coordinator doctor`)"]


def test_an_order_waiting_on_its_agents_blocker_keeps_why_when_that_blocker_is_cancelled(make_ws):
    """The report read "dependency dep ended cancelled": the word for a `blocked_by`, and the
    agent's own reason for waiting was gone."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        'if [ "$COORD_ORDER_ID" = first ]; then '
        'printf "outcome: requeue-with-blocker\\nblocker: dep\\nsummary: the schema migration comes first\\n" '
        '> "$COORD_RESULT"; else sleep 30; fi')}})
    drop(ws, "chip", "a.md", order_md("First thing is done", id="first", priority="urgent",
                                       branching=("requeue-with-blocker if a dependency is missing",)))
    drop(ws, "chip", "b.md", order_md("Dependency is done", id="dep", priority="low"))
    with Supervisor(ws) as sup:
        def now(oid: str) -> str | None:
            return getattr(sup.records.get(oid), "status", None)

        step_until(sup, lambda: now("first") == "waiting" and now("dep") == "running",
                   "first to wait for dep, and dep to run")
        sup.handle("cancel", {"id": "dep"})
        sup.step()
    rec = Store(ws.state).load("first")
    assert rec.status == "blocked"
    assert rec.report["summary"] == ("its blocker dep ended cancelled; it waited because: the schema migration "
                                     "comes first")


def test_orders_queued_for_an_agent_taken_out_of_the_team_are_said_at_start(make_ws):
    """An agent removed from coordinator.yaml while orders for it were queued: the start said
    "nothing runnable left", and the board showed them queued, for ever, without a word."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    for oid in ("r1", "r2"):
        drop(ws, "rex", f"{oid}.md", order_md(f"Rex does {oid}", id=oid))
    with Supervisor(ws) as sup:
        sup._intake_step()
        sup._write_state()
        sup._flush()
    cfg = yaml.safe_load(ws.config_path.read_text())
    del cfg["agents"]["rex"]
    ws.config_path.write_text(yaml.safe_dump(cfg))
    said: list[str] = []
    with Supervisor(Workspace(ws.root), log=said.append) as sup:
        sup.run_once(limit=30)
    assert ("WARNING: 2 order(s) for rex wait, and rex is no longer in coordinator.yaml: they run once it is "
            "back (`coordinator cancel ID` drops one): r1, r2") in said
    assert status(ws, "r1") == status(ws, "r2") == "queued"


def test_a_log_reader_that_stops_reading_does_not_stop_the_supervisor(make_ws):
    """`supervise 2>&1 | less`, paused (or Ctrl-S on its terminal): once the pipe was full, the
    log write waited for the reader, and the whole loop with it. Orders were not taken in,
    attempts ran past their timeouts, and SIGTERM was not seen. The lines wait instead, and
    go out in order once the reader reads again."""
    import fcntl
    import signal
    import sys

    exe = str(Path(sys.executable).with_name("coordinator"))
    ws = make_ws({"chip": {"role": "specialist", "command": ["true"], "max_parallel": 4}})
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # a dozen lines fill it
    sup = subprocess.Popen([exe, "-w", str(ws.root), "supervise"], stdin=subprocess.DEVNULL, stdout=w, stderr=w)
    os.close(w)
    got = bytearray()
    try:
        ids = [f"o{i:02d}" for i in range(40)]
        for oid in ids:
            drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} is done", id=oid))
        wait_until(lambda: all(_status_or_none(ws, oid) == "done" for oid in ids),
                   "every order to end with nobody reading the log", timeout=60)
        reader = threading.Thread(target=lambda: got.extend(_read_all(r)), daemon=True)
        reader.start()  # the reader is back
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
        reader.join(timeout=30)
    finally:
        if sup.poll() is None:
            sup.kill()
        os.close(r)
    done = [line.split()[1] for line in got.decode().splitlines() if line.endswith("-> done [chip]")]
    assert done == [oid for oid in done if oid in ids] and sorted(done) == ids  # each said once, none lost


def _status_or_none(ws, order_id):
    try:
        return Store(ws.state).load(order_id).status
    except (CoordinatorError, OSError, ValueError):
        return None


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while chunk := os.read(fd, 1 << 16):
        out += chunk
    return bytes(out)


def test_an_order_for_a_repository_with_no_commit_yet_is_refused_with_what_to_do(make_ws):
    """A `git init` with nothing committed: the order was taken, each attempt failed with
    "refs/heads/trunk does not exist", and it was blocked and escalated."""
    from coordinator import sending
    from coordinator.errors import OrderError

    ws = make_ws({"apidev": {"role": "specialist", "command": sh("echo x > src/a.py"), "writes": ["api/src/**"]}})
    subprocess.run(["git", "init", "-q", "-b", "trunk", str(ws.repos / "api")], check=True)
    text = order_md("The api source tree starts", id="a", files=("api/src/**",))
    why = ("repos/api has no commit on trunk yet, so no working copy can be made from it: make a first commit "
           "there (git -C repos/api commit --allow-empty -m start) and send the order again")
    with pytest.raises(OrderError) as refused:
        sending.send(ws, text.encode(), name="a.md", to="apidev", sender=None)
    assert why in str(refused.value)
    drop(ws, "apidev", "a.md", text)
    run(ws)
    rec = Store(ws.state).load("a")
    assert rec.status == "rejected" and any(why in e for e in rec.errors)


def test_an_original_changed_by_hand_before_its_first_commit_is_kept_as_dropped(make_ws):
    """A hand change to an order's original.md in the second between its placing and the
    commit left it out of the commit, and the tamper watch then deleted the never-committed
    original: the order lost the file it was sent as. Now the commit holds the bytes intake
    read, and the hand change is put back and said."""
    from coordinator import verify

    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    text = order_md("Kept as sent", id="a")
    with Supervisor(ws) as sup:
        drop(ws, "chip", "a.md", text)
        intake_all(sup)
        sup._write_state()  # placed in its folder, its commit still to come
        original = Store(ws.state).folder("a") / "original.md"
        with open(original, "a") as f:
            f.write("- and one more thing\n")
        sup._flush()
        assert git(ws.state, "show", "HEAD:orders/a/original.md") == text
        verify.watch_state(sup)
        assert original.read_text() == text  # put back, not deleted
    silent = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert silent == ["state/ changed by hand (restored from git): orders/a/original.md"]


def test_a_claimed_file_removed_by_hand_before_it_is_placed_stops_nothing(make_ws):
    """A claimed file removed by hand from state/intake/<agent>/ before the supervisor placed
    it in its order folder stopped the supervisor ("internal error: FileNotFoundError"). The
    order was filed from the bytes intake read: it runs, its original is those bytes, and its
    trail says what happened; the order next to it is not disturbed."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    text = order_md("Filed though its claim went", id="a")
    with Supervisor(ws) as sup:
        drop(ws, "chip", "a.md", text)
        drop(ws, "chip", "b.md", order_md("Next to it", id="b"))
        intake_all(sup)
        claimed = [p for p in (ws.state / "intake" / "chip").iterdir() if p.name.endswith("-a.md")]
        assert claimed, "the order is claimed, not yet placed"
        claimed[0].unlink()
        sup.run_once(limit=60)
        original = Store(ws.state).folder("a") / "original.md"
        assert original.read_text() == text
        assert git(ws.state, "show", "HEAD:orders/a/original.md") == text
        before = sup.intake.claim(drop(ws, "chip", "c.md", order_md("Gone before it is read", id="c")), "chip")
        assert before is not None
        before.unlink()
        sup.file_claimed(before, "chip", shown="inbox/chip/c.md")
        sup.run_once(limit=30)
    recs = Store(ws.state).load_all()
    assert recs["a"].status == "done" and recs["b"].status == "done"
    gone = next(r for r in recs.values() if r.source == "inbox/chip/c.md")  # its id was never read
    assert gone.status == "rejected"
    assert gone.errors == ["inbox/chip/c.md: was removed from state/intake/chip/ by hand before it was read; "
                                "send it again"]
    lines = [e.line for e in StateRepo(ws.state).entries("a")]
    said = f"a chip: state/intake/chip/{claimed[0].name} was removed by hand before it was placed; " \
           "original.md is written from the copy intake read when it filed a"
    assert said in lines
    assert not StateRepo(ws.state).dirty()


def test_an_urgent_requests_outbox_orders_are_urgent_unless_they_say_otherwise(make_ws):
    """A command orchestrator's outbox orders that gave no priority were filed `normal`: an
    urgent request's delegated work waited behind normal work (an LLM orchestrator's plan took
    the request's). They now take their request's priority; one that gives its own keeps it,
    and a specialist's outbox (new work of its own, its order waits for none of it) stays
    `normal`."""
    order = ('objective: {}\\nacceptance: [a is true, b is true, c is true]\\nfiles: []\\n'
             'branching: [{{action: halt-with-note, when: nothing to do}}]\\n')
    walt = sh(f'printf "to: chip\\n{order.format("Delegated")}" > "$COORD_OUTBOX/one.yaml"; '
              f'printf "to: chip\\npriority: low\\n{order.format("Delegated low")}" > "$COORD_OUTBOX/two.yaml"; '
              'echo sent')
    chip = sh(f'printf "to: rex\\n{order.format("Reviewed")}" > "$COORD_OUTBOX/r.yaml"; echo done')
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "command": walt},
                  "chip": {"role": "specialist", "sends_to": ["rex"], "command": chip},
                  "rex": {"role": "specialist", "command": sh("echo reviewed")}}, orchestrator="walt")
    drop(ws, "walt", "req.md", order_md("Urgent request is handled", id="req", priority="urgent"))
    run(ws)
    recs = Store(ws.state).load_all()
    sent = sorted((r.source.split("/", 1)[1], r.to, r.priority, r.status) for r in recs.values()
                  if r.source.startswith("outbox of "))
    assert sent == [("one.yaml", "chip", "urgent", "done"), ("r.yaml", "rex", "normal", "done"),
                    ("r.yaml", "rex", "normal", "done"), ("two.yaml", "chip", "low", "done")]
