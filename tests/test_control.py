"""Requests from a command to a running supervisor: each is done at most once, and the command
knows whether it was done, also when the supervisor is slow, stops, or died while serving it."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from coordinator import control
from coordinator.errors import SupervisorError
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
