"""Requests from a command to a running supervisor: each is done at most once, and the command
knows whether it was done, also when the supervisor is slow, stops, or died while serving it."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import drop, order_md, sh, step_until, wait_until

from coordinator import control
from coordinator.errors import CoordinatorError, SupervisorError
from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.workspace import Workspace

AGENTS = {"chip": {"role": "specialist", "command": ["/bin/true"]},
          "walt": {"role": "orchestrator", "sends_to": ["chip"]}}


@pytest.fixture
def ws(make_ws: Callable[..., Workspace]) -> Workspace:
    return make_ws(AGENTS, orchestrator="walt")


def hot_tokens(ws: Workspace) -> int:
    ledger = ws.state / "orchestrator" / "ledger.json"
    if not ledger.exists():
        return 0
    return sum(int(item["tokens"]) for item in json.loads(ledger.read_text())["items"])


def requests(ws: Workspace) -> list[str]:
    folder = control.requests_dir(ws)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_request_the_supervisor_did_not_take_in_time_is_withdrawn_and_never_done(ws: Workspace) -> None:
    sup = Supervisor(ws)
    sup.open()  # running, but not stepping: as if stuck in a long step
    try:
        with pytest.raises(SupervisorError, match=r"did not answer within 0s, so nothing was done"):
            control.submit(ws, "budget-add", {"tokens": 500}, timeout=0.3)
        assert requests(ws) == []
        sup.step()  # it gets going again: the request is not there to be done late
        sup.step()
        assert hot_tokens(ws) == 0
    finally:
        sup.close()


def test_a_request_taken_just_before_the_command_gives_up_is_still_answered(ws: Workspace) -> None:
    sup = Supervisor(ws)
    sup.open()
    try:
        got: dict[str, Any] = {}
        asking = threading.Thread(target=lambda: got.update(
            control.submit(ws, "budget-add", {"tokens": 500}, timeout=0.5)))
        asking.start()
        wait_until(lambda: any(n.endswith(".request.json") for n in requests(ws)), "the request")
        taken = control.pending(ws)  # the supervisor takes it, then takes its time
        assert [req["action"] for _, req in taken] == ["budget-add"]
        time.sleep(1.0)  # past the command's deadline
        result = sup.handle("budget-add", taken[0][1]["args"])
        control.answer(taken[0][0], result=result)
        asking.join(timeout=30)
        assert got.get("hot_tokens") == 500 and hot_tokens(ws) == 500
        assert requests(ws) == []  # the answer was read and removed
    finally:
        sup.close()


def test_a_supervisor_that_stops_before_taking_a_request_leaves_it_to_the_command(ws: Workspace) -> None:
    sup = Supervisor(ws)
    sup.open()
    got: dict[str, Any] = {}
    asking = threading.Thread(target=lambda: got.update(
        control.submit(ws, "budget-add", {"tokens": 700}, timeout=30)))
    asking.start()
    try:
        wait_until(lambda: any(n.endswith(".request.json") for n in requests(ws)), "the request")
    finally:
        sup.close()  # stops without serving it
    asking.join(timeout=30)
    assert got.get("hot_tokens") == 700  # served by the command itself, once
    assert hot_tokens(ws) == 700 and requests(ws) == []
    again = Supervisor(ws)  # the next supervisor does not find it to do a second time
    again.open()
    try:
        again.step()
        assert hot_tokens(ws) == 700
    finally:
        again.close()


def test_a_request_taken_by_a_supervisor_that_died_is_not_done_again(ws: Workspace) -> None:
    folder = control.requests_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{time.time_ns():020d}-1.taken.json").write_text(json.dumps(
        {"action": "budget-add", "args": {"tokens": 900}}))
    sup = Supervisor(ws)
    sup.open()
    try:
        sup.step()
        assert hot_tokens(ws) == 0 and requests(ws) == []
    finally:
        sup.close()


def test_an_answer_nobody_read_for_an_hour_is_removed(ws: Workspace) -> None:
    folder = control.requests_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    old, new = folder / "1-1.answer.json", folder / "2-1.answer.json"
    for path in (old, new):
        path.write_text('{"result": {}, "error": null, "exit_code": 0}')
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    sup = Supervisor(ws)
    sup.open()
    try:
        sup.step()
        assert requests(ws) == [new.name]  # a command may still be about to read this one
    finally:
        sup.close()


def test_a_request_is_served_by_a_stepping_supervisor(ws: Workspace, tmp_path: Path) -> None:
    sup = Supervisor(ws)
    sup.open()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            sup.step()
            time.sleep(0.01)

    serving = threading.Thread(target=serve)
    serving.start()
    try:
        assert control.submit(ws, "budget-add", {"tokens": 300})["hot_tokens"] == 300
    finally:
        stop.set()
        serving.join(timeout=30)
        sup.close()
    assert hot_tokens(ws) == 300 and requests(ws) == []


def test_ctrl_c_while_waiting_takes_the_request_back(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = Supervisor(ws)
    sup.open()
    try:
        def interrupted(answer: Path, *, until: float) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(control, "_read_answer", interrupted)
        with pytest.raises(KeyboardInterrupt):
            control.submit(ws, "budget-add", {"tokens": 55})
        assert requests(ws) == []
        sup.step()
        assert hot_tokens(ws) == 0  # never done
    finally:
        sup.close()


def test_a_command_serving_itself_is_no_supervisor_to_a_start_or_to_board(ws: Workspace) -> None:
    """With no supervisor running, `cancel` or `retry` serves itself and holds the workspace
    for a moment. A `supervise` started then said "another supervisor (pid N) is running;
    stop it first" about that command, and `board` said a supervisor ran. The start now
    waits the command out; board says none runs."""
    import subprocess
    import sys

    from coordinator import board
    from coordinator.watcher import NullWatcher

    coordinator = str(Path(sys.executable).with_name("coordinator"))
    command = Supervisor(ws, watcher=NullWatcher(), offline=True)
    command.open()  # as control._serve_offline does, for as long as its request takes
    try:
        assert not control.supervisor_running(ws)
        assert board.supervisor(ws)["running"] is False
        start = subprocess.Popen([coordinator, "-w", str(ws.root), "supervise", "--once"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)  # longer than a start waits for someone who only looks
    finally:
        command.close()
    out, err = start.communicate(timeout=60)
    assert start.returncode == 0, err
    assert "another supervisor" not in err


# -- cancel of a running attempt -------------------------------------------------------------------
# A specialist that ignores SIGTERM (only SIGKILL, after the cancel's grace, ends it) and says
# the pid of its shell and of its child.
STUBBORN = sh("trap '' TERM; sleep 100 & echo \"$$ $!\" > \"$PROBE/$COORD_ORDER_ID\"; wait")


def _pids(ws: Workspace, order_id: str) -> list[int]:
    from bench.harness import probe_of

    path = probe_of(ws) / order_id
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Stepping:
    """A supervisor stepping in a thread, as `supervise` does, while commands ask it."""

    def __init__(self, ws: Workspace) -> None:
        self.sup = Supervisor(ws)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve)

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sup.step():
                self.sup._wait(0.02)

    def __enter__(self) -> Supervisor:
        self.sup.open()
        self.thread.start()
        return self.sup

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.sup.close()


def test_cancels_of_attempts_that_ignore_sigterm_hold_up_no_other_order(make_ws: Callable[..., Workspace]) -> None:
    """Each cancel waited for its kill in the loop: two attempts that ignored SIGTERM held every
    other order for a second each, the second cancel answered a second after the first. Now the
    kills run together while the loop goes on, and each command hears `cancelled` only once no
    process of its attempt is left."""
    ws = make_ws({"slow": {"role": "specialist", "command": STUBBORN, "max_parallel": 2},
                  "quick": {"role": "specialist", "command": ["/bin/true"]}})
    for oid in ("a", "b"):
        drop(ws, "slow", f"{oid}.md", order_md(f"Order {oid} runs until cancelled", id=oid))
    answers: dict[str, tuple[dict[str, Any], float, list[bool]]] = {}

    def cancel(oid: str) -> None:
        got = control.submit(ws, "cancel", {"id": oid})
        answers[oid] = (got, time.monotonic(), [_alive(p) for p in _pids(ws, oid)])

    with Stepping(ws) as sup:
        wait_until(lambda: len(_pids(ws, "a")) == 2 and len(_pids(ws, "b")) == 2, "both attempts to run")
        asking = [threading.Thread(target=cancel, args=(oid,)) for oid in ("a", "b")]
        for t in asking:
            t.start()
        wait_until(lambda: sum(a.cancelled for a in list(sup.attempts.active.values())) == 2,
                   "both cancels to be taken")
        drop(ws, "quick", "q.md", order_md("A quick order runs meanwhile", id="q"))
        wait_until(lambda: "q" in sup.records and sup.records["q"].status == "done", "the quick order")
        quick_done = time.monotonic()
        for t in asking:
            t.join(timeout=30)
    assert {oid: a[0] for oid, a in answers.items()} == {"a": {"id": "a", "status": "cancelled"},
                                                         "b": {"id": "b", "status": "cancelled"}}
    assert all(quick_done < when for _, when, _ in answers.values())  # it ran while they were stopped
    assert {oid: alive for oid, (_, _, alive) in answers.items()} == {"a": [False, False], "b": [False, False]}
    for oid in ("a", "b"):
        rec = Store(ws.state).load(oid)
        assert (rec.status, rec.report["summary"], rec.history[-1]["actor"]) == ("cancelled", "cancelled by user", "user")
    assert requests(ws) == []


def test_a_second_cancel_while_the_first_stops_the_processes_says_so(make_ws: Callable[..., Workspace]) -> None:
    ws = make_ws({"slow": {"role": "specialist", "command": STUBBORN}})
    drop(ws, "slow", "a.md", order_md("Order a runs until cancelled", id="a"))
    first: dict[str, Any] = {}
    with Stepping(ws) as sup:
        wait_until(lambda: len(_pids(ws, "a")) == 2, "the attempt to run")
        asking = threading.Thread(target=lambda: first.update(control.submit(ws, "cancel", {"id": "a"})))
        asking.start()
        wait_until(lambda: any(a.cancelled for a in list(sup.attempts.active.values())), "the cancel to be taken")
        with pytest.raises(CoordinatorError) as again:
            control.submit(ws, "cancel", {"id": "a"})
        asking.join(timeout=30)
    assert (str(again.value), again.value.exit_code) == ("a is being cancelled already: its processes are being "
                                                          "stopped", 1)
    assert first == {"id": "a", "status": "cancelled"}
    assert [h["to"] for h in Store(ws.state).load("a").history] == ["queued", "running", "cancelled"]


def test_a_cancel_under_way_when_the_supervisor_stops_now_is_answered_cancelled(
        make_ws: Callable[..., Workspace]) -> None:
    """A second Ctrl-C while cancels stop the attempts' processes: the kills are waited for, and
    each command hears that its order is cancelled, as it stays after the next start."""
    ws = make_ws({"slow": {"role": "specialist", "command": STUBBORN, "max_parallel": 2}})
    for oid in ("a", "b"):
        drop(ws, "slow", f"{oid}.md", order_md(f"Order {oid} runs until cancelled", id=oid))
    got: dict[str, Any] = {}
    with Supervisor(ws) as sup:
        step_until(sup, lambda: len(_pids(ws, "a")) == 2 and len(_pids(ws, "b")) == 2, "both attempts to run")
        for oid in ("a", "b"):
            threading.Thread(target=lambda oid=oid: got.update({oid: control.submit(ws, "cancel", {"id": oid})}),
                             daemon=True).start()
        wait_until(lambda: sum(n.endswith(control.REQUEST) for n in requests(ws)) == 2, "both cancels to be asked")
        sup.step()  # both taken, their kills under way
        assert {r.id: r.status for r in sup.records.values()} == {"a": "running", "b": "running"}
        sup.attempts.kill_all()  # what a second Ctrl-C does
        pids = _pids(ws, "a") + _pids(ws, "b")
    wait_until(lambda: len(got) == 2, "both answers")
    assert got == {"a": {"id": "a", "status": "cancelled"}, "b": {"id": "b", "status": "cancelled"}}
    assert not any(_alive(p) for p in pids)
    with Supervisor(ws) as again:
        again.run_once(limit=10)
    assert {oid: Store(ws.state).load(oid).status for oid in ("a", "b")} == {"a": "cancelled", "b": "cancelled"}


def test_a_cancel_under_way_when_the_supervisor_dies_ends_the_order_cancelled_at_the_next_start(
        make_ws: Callable[..., Workspace]) -> None:
    """The command was told the supervisor stopped before it answered, and to look at the
    board: there the order is cancelled, never queued to run again."""
    ws = make_ws({"slow": {"role": "specialist", "command": STUBBORN}})
    drop(ws, "slow", "a.md", order_md("Order a runs until cancelled", id="a"))
    said: list[str] = []

    def cancel() -> None:
        with pytest.raises(SupervisorError) as e:
            control.submit(ws, "cancel", {"id": "a"})
        said.append(str(e.value))

    sup = Supervisor(ws)
    sup.open()
    try:
        step_until(sup, lambda: len(_pids(ws, "a")) == 2, "the attempt to run")
        asking = threading.Thread(target=cancel)
        asking.start()
        wait_until(lambda: any(n.endswith(control.REQUEST) for n in requests(ws)), "the cancel to be asked")
        sup.step()  # taken, its kill under way
        assert sup.records["a"].status == "running" and sup.attempts.active[sup.records["a"].running["token"]].cancelled
    finally:
        sup.close(clean=False, chosen=False)  # as a crash leaves it (its spawn server kills the rest)
    asking.join(timeout=60)
    assert said and "stopped before it answered" in said[0] and "coordinator board" in said[0]
    lines: list[str] = []
    with Supervisor(ws, log=lines.append) as again:
        again.run_once(limit=10)
    rec = Store(ws.state).load("a")
    assert (rec.status, rec.failures, rec.running) == ("cancelled", [], None)
    assert [h["to"] for h in rec.history] == ["queued", "running", "cancelled"]
    assert "recovery: a was being cancelled when the supervisor stopped: it is cancelled, not run again" in lines


def test_cancel_of_an_order_still_in_an_inbox_says_where_it_is_also_with_a_supervisor_running(
        ws: Workspace) -> None:
    """With no supervisor running, `cancel` said the order was still in inbox/..., never taken
    in; with one running, only "no order": the supervisor's answer came back as an error of no
    kind, which the command could not tell from any other."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    stray = ws.inbox_root / "chipp"
    stray.mkdir()
    drop_at = stray / "WO-0009.md"
    drop_at.write_text(order_md("An order put in a folder that is no agent's inbox"))
    said = "coordinator: WO-0009 is in inbox/chipp/WO-0009.md, but no agent in coordinator.yaml has that inbox"
    alone = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "WO-0009"])
    assert (alone.exit_code, alone.output.startswith(said)) == (1, True), alone.output
    with Stepping(ws):
        served = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "WO-0009"])
        missing = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "WO-0404"])
    assert (served.exit_code, served.output) == (1, alone.output)
    assert (missing.exit_code, missing.output) == (1, "coordinator: no order 'WO-0404'; `coordinator board` lists them\n")
    assert drop_at.exists()


# -- cancel of a request that sent work ------------------------------------------------------------
def _outbox_orders(folder: Path, orders: dict[str, dict[str, str]]) -> str:
    """Order files for an outbox, written under `folder/<agent>/`; the shell line that copies
    them into $COORD_OUTBOX."""
    for agent, texts in orders.items():
        (folder / agent).mkdir(parents=True, exist_ok=True)
        for oid, text in texts.items():
            (folder / agent / f"{oid}.md").write_text(text)
    return f'cp -R "{folder}/." "$COORD_OUTBOX/"'


def test_cancel_of_a_request_cancels_the_work_it_sent_that_has_not_ended(
        make_ws: Callable[..., Workspace], tmp_path: Path) -> None:
    """Cancelling walt's running request left its orders going: req-code kept running (its
    processes too), req-review kept waiting on it. Now the work it sent that has not ended is
    cancelled with it, however deep, each saying why; the command is answered once no process
    of any of them is left, and lists them. What had ended stays as it is."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    review = order_md("Review the code", id="req-review", blocked_by=["req-code"])
    walt = _outbox_orders(tmp_path / "walt-out", {
        "chip": {"req-code": order_md("Write the code", id="req-code")},
        "rex": {"req-quick": order_md("Look first", id="req-quick"), "req-review": review}})
    # rex's quick look ends done at once, sending chip an order that waits for the code.
    later = _outbox_orders(tmp_path / "rex-out", {
        "chip": {"req-later": order_md("Tidy up after the code", id="req-later", blocked_by=["req-code"])}})
    rex = f'if [ "$COORD_ORDER_ID" = req-quick ]; then {later}; fi; echo ok'
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip", "rex"], "command": sh(walt)},
                  "chip": {"role": "specialist", "command": STUBBORN},
                  "rex": {"role": "specialist", "command": sh(rex), "sends_to": ["chip"]}}, orchestrator="walt")
    drop(ws, "walt", "req.md", order_md("Get the code written and reviewed", id="req"))
    with Stepping(ws) as sup:
        wait_until(lambda: len(_pids(ws, "req-code")) == 2 and "req-later" in sup.records,
                   "the code to run and the quick look to end")
        pids = _pids(ws, "req-code")
        said = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "req"])
        gone = [_alive(p) for p in pids]
    assert said.exit_code == 0, said.output
    assert said.output.splitlines() == ["req: cancelled",
                                        "req-code: cancelled with req (it was running)",
                                        "req-review: cancelled with req (it was waiting)",
                                        "req-later: cancelled with req (it was waiting)"]
    assert gone == [False, False]  # answered once no process of them was left
    store = Store(ws.state)
    ended = {oid: (store.load(oid).status, store.load(oid).report["summary"])
             for oid in ("req", "req-code", "req-review", "req-quick", "req-later")}
    assert ended == {
        "req": ("cancelled", "cancelled by user"),
        "req-code": ("cancelled", "cancelled: its request req was cancelled by user"),
        "req-review": ("cancelled", "cancelled: its request req was cancelled by user"),
        "req-quick": ("done", "ok"),
        "req-later": ("cancelled", "cancelled: sent by req-quick for req, which was cancelled by user")}
    assert [h["to"] for h in store.load("req-code").history] == ["queued", "running", "cancelled"]
    assert requests(ws) == []


def test_cancel_of_a_routed_order_names_the_order_its_work_went_on_to(make_ws: Callable[..., Workspace]) -> None:
    """A routed order has ended: its work goes on in its follow-up, which is not cancelled with
    it. The user was told only that it was routed, not which order to cancel instead."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    route = sh('printf "outcome: route-to\\nagent: rex\\nsummary: needs a look\\n" > "$COORD_RESULT"')
    ws = make_ws({"chip": {"role": "specialist", "command": route, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": STUBBORN}})
    drop(ws, "chip", "a.md", order_md("Order a is handed on", id="a", branching=("route-to-rex if it needs a look",)))
    with Stepping(ws) as sup:
        wait_until(lambda: sup.records.get("a") is not None and sup.records["a"].routed_to is not None
                   and len(_pids(ws, sup.records["a"].routed_to)) == 2, "the follow-up to run")
        follow = sup.records["a"].routed_to
        refused = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "a"])
        assert sup.records[follow].status == "running"
        CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", str(follow)])
        again = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "a"])
    said = "coordinator: a is routed; only queued, waiting, running, blocked or halted orders can be cancelled"
    assert (refused.exit_code, refused.output) == (1, f"{said}; its work went on as {follow}, which is running: "
                                                      "cancel that one\n")
    assert (again.exit_code, again.output) == (1, f"{said}; its work went on as {follow}, which is cancelled\n")


def test_an_order_the_request_sent_that_waits_for_another_it_sent_is_cancelled_not_blocked(
        make_ws: Callable[..., Workspace], tmp_path: Path) -> None:
    """req-code, queued behind other work, was cancelled first: req-review, waiting for it, was
    blocked at once ("dependency ended cancelled"), left out of the cancel, and listed as still
    waiting. Now what waits is cancelled before what it waits for."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    walt = _outbox_orders(tmp_path / "walt-out", {
        "chip": {"req-code": order_md("Write the code", id="req-code")},
        "rex": {"req-review": order_md("Review the code", id="req-review", blocked_by=["req-code"])}})
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip", "rex"], "command": sh(walt)},
                  "chip": {"role": "specialist", "command": STUBBORN},
                  "rex": {"role": "specialist", "command": ["/bin/true"]}}, orchestrator="walt")
    drop(ws, "chip", "busy.md", order_md("Keeps chip busy", id="busy"))
    with Stepping(ws) as sup:
        wait_until(lambda: len(_pids(ws, "busy")) == 2, "chip to be busy")
        drop(ws, "walt", "req.md", order_md("Get the code written and reviewed", id="req"))
        wait_until(lambda: "req-review" in sup.records, "the request to send its orders")
        said = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "req"])
        CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "busy"])
    assert said.output.splitlines() == ["req: cancelled",
                                        "req-code: cancelled with req (it was queued)",
                                        "req-review: cancelled with req (it was waiting)"], said.output
    review = Store(ws.state).load("req-review")
    assert (review.status, review.report["summary"]) == ("cancelled", "cancelled: its request req was cancelled by user")
    assert [h["to"] for h in review.history] == ["waiting", "cancelled"]


def test_cancel_of_a_blocked_order_cancels_the_investigation_its_block_escalated(
        make_ws: Callable[..., Workspace]) -> None:
    """The blocked order was cancelled for good, but rex's investigation of why it was blocked
    (what would unblock it) kept running, and the command said nothing of it. Now the
    investigation is cancelled with it, its processes gone before the answer, and listed."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    ws = make_ws({"chip": {"role": "specialist", "command": sh("exit 1"), "max_failures": 1},
                  "rex": {"role": "specialist", "command": STUBBORN}}, escalate_to="rex")
    drop(ws, "chip", "a.md", order_md("Order a fails and is blocked", id="a"))
    with Stepping(ws) as sup:
        wait_until(lambda: sup.records.get("a") is not None and sup.records["a"].status == "blocked"
                   and len(sup.records) == 2, "a to be blocked and escalated")
        investigation = next(oid for oid in sup.records if oid != "a")
        wait_until(lambda: len(_pids(ws, investigation)) == 2, "the investigation to run")
        pids = _pids(ws, investigation)
        said = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "a"])
        gone = [_alive(p) for p in pids]
    assert said.exit_code == 0, said.output
    assert said.output.splitlines() == [
        "a: cancelled",
        f"{investigation}: cancelled with a (it was running; it investigated why a was blocked)"]
    assert gone == [False, False]
    rec = Store(ws.state).load(investigation)
    assert (rec.status, rec.report["summary"]) == (
        "cancelled", "cancelled: it investigated why a was blocked, and a was cancelled by user")


def test_cancel_of_a_request_cancels_its_blocked_work_and_the_investigation_of_that_block(
        make_ws: Callable[..., Workspace], tmp_path: Path) -> None:
    """req-code, sent by the request, was blocked and escalated: cancelling the request left it
    blocked (`retry` brought the cancelled request's work back) and rex's investigation of it
    running. Now both are cancelled with the request, each saying why, and listed."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    walt = _outbox_orders(tmp_path / "walt-out", {"chip": {"req-code": order_md("Write the code", id="req-code")}})
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "command": sh(walt)},
                  "chip": {"role": "specialist", "command": sh("exit 1"), "max_failures": 1},
                  "rex": {"role": "specialist", "command": STUBBORN}}, orchestrator="walt", escalate_to="rex")
    drop(ws, "walt", "req.md", order_md("Get the code written", id="req"))
    with Stepping(ws) as sup:
        def asked() -> str | None:
            return next((r.id for r in sup.records.values() if r.source.startswith("escalation of req-code")), None)

        wait_until(lambda: asked() is not None and len(_pids(ws, str(asked()))) == 2,
                   "req-code to be blocked and its investigation to run")
        investigation = str(asked())
        pids = _pids(ws, investigation)
        said = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "req"])
        gone = [_alive(p) for p in pids]
        retried = CliRunner().invoke(cli, ["-w", str(ws.root), "retry", "req-code"])
    assert said.exit_code == 0, said.output
    lines = said.output.splitlines()
    assert lines[:2] == ["req: cancelled", "req-code: cancelled with req (it was blocked)"], said.output
    assert (f"{investigation}: cancelled with req (it was running; it investigated why req-code was blocked)"
            in lines), said.output
    assert gone == [False, False]
    store = Store(ws.state)
    code, asking = store.load("req-code"), store.load(investigation)
    assert code.status == "cancelled"
    assert code.report["summary"].startswith("cancelled: its request req was cancelled by user; it was blocked: ")
    assert (asking.status, asking.report["summary"]) == (
        "cancelled", "cancelled: it investigated why req-code was blocked, and req-code was cancelled with req by user")
    assert retried.exit_code == 1 and "req-code is cancelled" in retried.output
    assert all(r.status == "cancelled" for r in store.load_all().values())


def test_retry_of_a_blocked_order_cancels_the_investigation_its_block_escalated(
        make_ws: Callable[..., Workspace]) -> None:
    """Retried, a went on, but rex's investigation of what would unblock it kept running beside
    it, and the command said only "a: queued". Now the investigation is cancelled (the retry is
    the answer), its processes gone before the command answers, and listed."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    once = sh('[ -e "$PROBE/failed" ] && echo ok && exit 0; touch "$PROBE/failed"; exit 1')
    ws = make_ws({"chip": {"role": "specialist", "command": once, "max_failures": 1},
                  "rex": {"role": "specialist", "command": STUBBORN}}, escalate_to="rex")
    drop(ws, "chip", "a.md", order_md("Order a fails once and is blocked", id="a"))
    with Stepping(ws) as sup:
        wait_until(lambda: len(sup.records) == 2, "a to be blocked and escalated")
        investigation = next(oid for oid in sup.records if oid != "a")
        wait_until(lambda: len(_pids(ws, investigation)) == 2, "the investigation to run")
        pids = _pids(ws, investigation)
        said = CliRunner().invoke(cli, ["-w", str(ws.root), "retry", "a"])
        gone = [_alive(p) for p in pids]
        wait_until(lambda: sup.records["a"].status == "done", "a to be done")
    assert said.exit_code == 0, said.output
    assert said.output.splitlines() == [
        "a: queued", f"{investigation}: cancelled with the retry of a (it was running; it investigated why a was "
                     "blocked, and the retry answers that)"]
    assert gone == [False, False]
    rec = Store(ws.state).load(investigation)
    assert (rec.status, rec.report["summary"]) == (
        "cancelled", "cancelled: it investigated why a was blocked, and a was retried by user")
    assert sorted(r.status for r in Store(ws.state).load_all().values()) == ["cancelled", "done"]


def test_retry_with_no_supervisor_running_cancels_the_investigation_still_queued(
        make_ws: Callable[..., Workspace]) -> None:
    """With no supervisor running, `retry` re-queued a and left the investigation of its block
    queued: the next start ran it beside a, about a block that was no more."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    ws = make_ws({"chip": {"role": "specialist", "command": sh("exit 1"), "max_failures": 1},
                  "rex": {"role": "specialist", "command": STUBBORN}}, escalate_to="rex")
    drop(ws, "chip", "a.md", order_md("Order a fails and is blocked", id="a"))
    with Supervisor(ws) as sup:  # stopped while the investigation ran: it is queued again
        step_until(sup, lambda: len(sup.records) == 2, "a to be blocked and escalated")
        investigation = next(oid for oid in sup.records if oid != "a")
    said = CliRunner().invoke(cli, ["-w", str(ws.root), "retry", "a"])
    assert said.exit_code == 0, said.output
    assert said.output.splitlines() == [
        "a: queued", f"{investigation}: cancelled with the retry of a (it was queued; it investigated why a was "
                     "blocked, and the retry answers that)"]
    assert Store(ws.state).load(investigation).status == "cancelled"


def test_retry_of_an_order_whose_agent_left_the_team_says_it_will_not_run(make_ws: Callable[..., Workspace]) -> None:
    """chip was taken out of coordinator.yaml: `retry` of its blocked order said "a: queued", and
    the order never ran, with nothing said why. Now the retry says so, and how to drop it."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    ws = make_ws({"chip": {"role": "specialist", "command": sh("exit 1"), "max_failures": 1}})
    drop(ws, "chip", "a.md", order_md("Order a fails and is blocked", id="a"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("a") is not None and sup.records["a"].status == "blocked",
                   "a to be blocked")
    make_ws({"rex": {"role": "specialist", "command": ["/bin/true"]}})  # chip left the team
    said = CliRunner().invoke(cli, ["-w", str(ws.root), "retry", "a"])
    assert said.exit_code == 0, said.output
    assert said.stdout == "a: queued\n"
    assert said.stderr == ("coordinator: chip is no longer in coordinator.yaml, so a waits until it is back "
                           "(`coordinator cancel a` drops it)\n")


def test_the_work_of_a_request_being_cancelled_when_the_supervisor_dies_says_why_after_the_next_start(
        make_ws: Callable[..., Workspace], tmp_path: Path) -> None:
    """req-code was being stopped, cancelled with its request, when the supervisor was killed:
    after the next start it was cancelled, but its report said only "cancelled by user" and its
    history no reason, as if someone had cancelled it by hand. Now it says why, as it would have."""
    walt = _outbox_orders(tmp_path / "walt-out", {"chip": {"req-code": order_md("Write the code", id="req-code")}})
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "command": sh(walt)},
                  "chip": {"role": "specialist", "command": STUBBORN}}, orchestrator="walt")
    drop(ws, "walt", "req.md", order_md("Get the code written", id="req"))
    sup = Supervisor(ws)
    sup.open()
    try:
        step_until(sup, lambda: len(_pids(ws, "req-code")) == 2, "the code to run")
        def cancel() -> None:
            with contextlib.suppress(SupervisorError):  # told it stopped before it answered
                control.submit(ws, "cancel", {"id": "req"})

        threading.Thread(target=cancel, daemon=True).start()
        wait_until(lambda: any(n.endswith(control.REQUEST) for n in requests(ws)), "the cancel to be asked")
        sup.step()  # taken, req-code's kill under way
        assert sup.records["req-code"].status == "running"
    finally:
        sup.close(clean=False, chosen=False)  # as a crash leaves it
    lines: list[str] = []
    with Supervisor(ws, log=lines.append) as again:
        again.run_once(limit=10)
    rec = Store(ws.state).load("req-code")
    why = "its request req was cancelled by user"
    assert (rec.status, rec.report["summary"]) == ("cancelled", f"cancelled: {why}")
    assert (rec.history[-1]["to"], rec.history[-1]["actor"], rec.history[-1].get("note")) == ("cancelled", "user", why)


def test_a_cancel_that_meets_a_supervisor_starting_is_asked_of_it(make_ws: Callable[..., Workspace]) -> None:
    """A cancel run as the supervisor started saw none running, then found the workspace
    taken: it failed with "another supervisor is running; stop it first", telling the user to
    stop the supervisor that would have done it. Now the request goes to that supervisor."""
    ws = make_ws({"slow": {"role": "specialist", "command": STUBBORN}})
    drop(ws, "slow", "a.md", order_md("Order a waits behind b", id="a"))
    drop(ws, "slow", "b.md", order_md("Order b runs until cancelled", id="b"))
    with Stepping(ws) as sup:
        wait_until(lambda: sorted(r.status for r in sup.records.values()) == ["queued", "running"],
                   "one to run, one to wait")
    queued = next(r.id for r in Store(ws.state).load_all().values() if r.status == "queued")
    got: dict[str, Any] = {}
    failed: list[CoordinatorError] = []

    def cancel() -> None:
        try:
            got.update(control.submit(ws, "cancel", {"id": queued}))
        except CoordinatorError as e:
            failed.append(e)

    holder = Supervisor(ws, offline=True)  # a command serving itself holds the workspace
    holder.open()
    starting = Stepping(ws)
    asking = threading.Thread(target=cancel)
    try:
        asking.start()
        time.sleep(1.0)  # it saw no supervisor, and waits for the command's lock
        holder.close()
        with starting:  # the supervisor takes the lock first
            asking.join(timeout=60)
    finally:
        asking.join(timeout=60)
    assert failed == [] and got == {"id": queued, "status": "cancelled"}
    assert Store(ws.state).load(queued).status == "cancelled"


def test_cancel_says_which_orders_waiting_for_it_are_blocked_now(make_ws: Callable[..., Workspace]) -> None:
    """b waited for a, c for b: cancelling a blocked both (what they wait for can never be done),
    and the command said only "a: cancelled"; the user learned of it from the board, if at all."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    ws = make_ws({"slow": {"role": "specialist", "command": STUBBORN}})
    drop(ws, "slow", "a.md", order_md("Order a runs until cancelled", id="a"))
    drop(ws, "slow", "b.md", order_md("Order b needs a", id="b", blocked_by=["a"]))
    drop(ws, "slow", "c.md", order_md("Order c needs b", id="c", blocked_by=["b"]))
    with Stepping(ws) as sup:
        wait_until(lambda: len(_pids(ws, "a")) == 2 and len(sup.records) == 3, "a to run, b and c to wait")
        said = CliRunner().invoke(cli, ["-w", str(ws.root), "cancel", "a"])
    assert said.exit_code == 0, said.output
    assert said.output.splitlines() == ["a: cancelled",
                                        "b: blocked, it waited for a, which can never be done now",
                                        "c: blocked, it waited for b, which can never be done now"]
    assert [Store(ws.state).load(oid).status for oid in ("b", "c")] == ["blocked", "blocked"]
