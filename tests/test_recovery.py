"""Crash recovery: kill -9 of the supervisor at every step of an order's life, then a restart.

After each crash and restart: every order is in exactly one place, none is lost, none is done
twice, nothing is left `running`, no specialist of the dead supervisor survives, and
`coordinator audit verify` is clean. Live kills use `coordinator supervise` as a real
subprocess; windows a live kill cannot hit deterministically (a few instructions wide) are
built on disk exactly as the crash would leave them, or by abandoning an in-process
supervisor the way a kill -9 would (no flush, no clean-up, its lock dropped by the kernel).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PRINT_REVIEW,
    drop,
    intake_all,
    merge_killed_after,
    order_md,
    sh,
    step_until,
    wait_until,
)

from bench.harness import probe_of
from coordinator import durable, mounts, orders, recovery, signals
from coordinator.audit import StateRepo
from coordinator.repos import Repo
from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.verify import verify
from coordinator.workspace import Workspace

COORDINATOR = Path(sys.executable).with_name("coordinator")
WAIT = 60.0  # seconds any one awaited condition may take on a loaded 2-core machine

# A specialist that proves each run: it records its pid, waits at a gate the test opens per
# attempt (so a kill lands mid-run, deterministically), writes its own file in the repository,
# and appends its order id to $PROBE/completions only as its very last act. The order `sleeper`
# sleeps 60 s on its first attempt instead (a leftover to be killed), and finishes on the next.
GATED = sh(
    'echo $$ >> "$PROBE/pids"; '
    'if [ "$COORD_ORDER_ID" = sleeper ] && [ ! -e "$PROBE/slept" ]; then '
    'touch "$PROBE/slept"; exec sleep 60; fi; '
    'attempt="${COORD_ATTEMPT%.n*}"; '  # <order>.<number>, without the token's secret part
    'while [ ! -e "$PROBE/go.$attempt" ]; do sleep 0.05; done; '
    'printf "name = \\"%s\\"  # attempt %s\\n" "$COORD_ORDER_ID" "$attempt" > "src/$COORD_ORDER_ID.py"; '
    'echo "$COORD_ORDER_ID" >> "$PROBE/completions"')


# -- helpers -------------------------------------------------------------------------------------


def supervise(ws: Workspace, *args: str) -> subprocess.Popen[bytes]:
    log = open(ws.root.parent / "supervise.log", "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen([str(COORDINATOR), "-w", str(ws.root), "supervise", *args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()


class Killed(BaseException):
    """What a test raises where a kill -9 would hit the supervisor."""


def killed(*args: object, **kwargs: object) -> None:
    raise Killed


def review_then_ship(make_ws: Callable[..., Workspace], outcome: str, **top: Any) -> Workspace:
    """chip ends `review` with `outcome` (a route to rex, say); `ship`, for rex, waits for it;
    rex notes each order it runs in $PROBE/ran."""
    ws = make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "command": sh(
                      f'printf "outcome: {outcome}\\nsummary: over to rex\\n" > "$COORD_RESULT"')},
                  "rex": {"role": "specialist", "command": sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran"')}}, **top)
    drop(ws, "chip", "a.md", order_md("Review happens", id="review", branching=("route-to-rex if it is a review",)))
    drop(ws, "rex", "b.md", order_md("Ship after the review", id="ship", blocked_by=["review"]))
    return ws


def kill9(sup: subprocess.Popen[bytes], *, server_too: bool) -> None:
    """kill -9 of a live `supervise` (frozen first, so that it dies in one state), and with
    `server_too` of its fork server as well (and any git it is waiting for), as
    `pkill -9 -f coordinator` would."""
    if sup.poll() is None:
        os.kill(sup.pid, signal.SIGSTOP)
        if server_too:
            servers = children(sup.pid)
            assert servers
            for pid in servers:
                os.kill(pid, signal.SIGKILL)
        os.kill(sup.pid, signal.SIGKILL)
    sup.wait(10)


def board(ws: Workspace) -> str:
    proc = subprocess.run([str(COORDINATOR), "-w", str(ws.root), "board"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def supervise_once(ws: Workspace) -> str:
    """`coordinator supervise --once` to completion; its output."""
    proc = subprocess.run([str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def specialists_of(ws: Workspace) -> list[int]:
    """Live processes started for an attempt in `ws` (their environment names the workspace)."""
    mark = b"COORD_WORKSPACE=" + os.fsencode(ws.root) + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if mark in f.read() and alive(int(name)):
                        found.append(int(name))
            except OSError:
                continue
    return found


def committed_status(ws: Workspace, order_id: str) -> str | None:
    """`order_id`'s status as state/'s git history has it (the record on disk may be ahead)."""
    moves = [e.new for e in StateRepo(ws.state).entries(order_id) if e.new]
    return moves[-1] if moves else None


def completions(ws: Workspace) -> list[str]:
    path = probe_of(ws) / "completions"
    return path.read_text().split() if path.exists() else []


def open_gate(ws: Workspace, order_id: str, attempt: int) -> None:
    (probe_of(ws) / f"go.{order_id}.{attempt}").touch()


def repo_commits(ws: Workspace, order_id: str) -> list[str]:
    """Non-merge commits on webapp's main that carry `order_id`'s trailer."""
    out = subprocess.run(["git", "-C", str(ws.repos / "webapp"), "log", "--no-merges", "-F",
                          f"--grep=Work-Order: {order_id}", "--format=%H", "main"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                          check=True).stdout


def assert_one_place(ws: Workspace, ids: set[str]) -> None:
    """Every order has one record and one original; nothing waits in an inbox or in intake."""
    recs = Store(ws.state).load_all()
    assert ids <= set(recs)
    for oid in ids:
        assert len(list(Store(ws.state).folder(oid).glob("original.*"))) == 1, oid
    for agent in ws.config.agents:
        assert list(ws.inbox(agent).iterdir()) == [], agent
    intake = ws.state / "intake"
    assert not intake.exists() or not [p for p in intake.rglob("*") if p.is_file()]


def assert_clean(ws: Workspace) -> None:
    findings = verify(ws)
    assert findings == [], "\n".join(map(str, findings))
    assert StateRepo(ws.state).dirty() == []
    assert subprocess.run(["git", "-C", str(ws.state), "fsck", "--no-progress"],
                          capture_output=True).returncode == 0


def die_between_record_writes(store: Store, first: str, status: str, *, before: str) -> None:
    """kill -9 between two record writes of one step: the state write that holds `first`'s
    record with `status` and `before`'s record writes only the first, then dies."""
    written = store.write_dirty

    def first_then_killed() -> int:
        rec = store._dirty.get(first)
        if rec is None or rec.status != status:
            return written()
        assert before in store._dirty, f"{before}'s record was to be written in the same step"
        store._dirty = {first: rec}
        written()
        raise Killed

    store.write_dirty = first_then_killed  # type: ignore[method-assign]


def abandon(sup: Supervisor) -> None:
    """Leave `sup` the way kill -9 would: nothing flushed, no clean-up, its lock released.

    Its spawn server is closed, which kills the attempts' process trees: what the server does
    by itself when the supervisor's end of its control channel closes.
    """
    sup.watcher.stop()
    sup.spawner.close(grace=0.0)
    for held in ("_lock_fd", "_root_fd"):  # the kernel drops a dead process's locks
        fd = getattr(sup, held)
        if fd is not None:
            os.close(fd)
            setattr(sup, held, None)
    durable.close_journal(sup.ws.state)
    sup._opened = False


# -- 1. kill -9 of a live supervisor while orders run ------------------------------------------
@pytest.mark.parametrize("victims", ["supervisor", "supervisor-and-spawner"])
def test_kill9_mid_run_then_restart_finishes_every_order_once(make_ws, victims):
    """A live `supervise` is killed with -9 while three orders run and one waits; a restart
    with `--once` ends each order once: one completion, one commit, nothing left running.

    With `supervisor-and-spawner` the spawn server dies too, so the specialists are orphans
    that only the restart's recovery can find and kill.
    """
    ws = make_ws({"chip": {"role": "specialist", "command": GATED, "writes": ["webapp/src/**"],
                           "max_parallel": 3}}, max_parallel=3)
    ids = ["sleeper", "o1", "o2", "o3", "o4"]  # dropped in this order: o4 waits for a slot
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} writes its file", id=oid,
                                               files=(f"webapp/src/{oid}.py",)))
    open_gate(ws, "o1", 1)
    sup = supervise(ws)
    try:
        # Killed once every move so far is committed: the window between a state write and its
        # commit has its own deterministic test below.
        wait_until(lambda: committed_status(ws, "o1") == "done", "o1 to end done")
        wait_until(lambda: (probe_of(ws) / "slept").exists()
                   and [committed_status(ws, o) for o in ids] == [
                       "running", "done", "running", "running", "queued"],
                   "the sleeper, o2 and o3 running, o4 queued")
        running = ["sleeper", "o2", "o3"]
        assert f"supervisor: running (pid {sup.pid})" in board(ws).splitlines()
    finally:
        kill9(sup, server_too=victims == "supervisor-and-spawner")
    shown = board(ws).splitlines()  # the board says the RUNNING column is not true any more
    assert shown[1] == ("supervisor: NOT RUNNING — the RUNNING orders below were cut off; "
                        "`coordinator supervise` re-queues them"), shown
    if victims == "supervisor-and-spawner":
        leftovers = specialists_of(ws)
        assert leftovers, "the orphaned specialists should still run before the restart"
    assert completions(ws) == ["o1"]
    for oid in ids:  # the restart's attempts may pass; the dead supervisor's never
        open_gate(ws, oid, 2)
        if oid not in running:
            open_gate(ws, oid, 1)

    out = supervise_once(ws)

    assert specialists_of(ws) == []
    pids = [int(p) for p in (probe_of(ws) / "pids").read_text().split()]
    assert not any(alive(p) for p in pids)
    if victims == "supervisor-and-spawner":
        assert "killed" in out and "leftover process" in out
    recs = Store(ws.state).load_all()
    assert {oid: recs[oid].status for oid in ids} == dict.fromkeys(ids, "done")
    assert not any(r.status == "running" for r in recs.values())
    assert sorted(completions(ws)) == sorted(ids)
    for oid in running:
        assert recs[oid].attempts == 2, recs[oid].history
        assert "interrupted" in recs[oid].failures[0]
    for oid in ids:
        assert len(repo_commits(ws, oid)) == 1, oid
        assert (ws.repos / "webapp" / "src" / f"{oid}.py").exists()
    assert_one_place(ws, set(ids))
    assert not (ws.runtime / "running").exists()
    assert_clean(ws)


# -- 2. kill -9 at each step of an order's life -------------------------------------------------
CHIP = {"role": "specialist", "command": GATED, "writes": ["webapp/src/**"]}


def team(make_ws):
    # walt comes first: an order whose recipient is forgotten must not land in its inbox.
    return make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"]}, "chip": dict(CHIP)},
                   orchestrator="walt")


class FailingClock:
    """The clock, injected: armed, its next reading fails. Intake reads it when it makes the
    record of a claimed file, so an unexpected error strikes in the middle of a step, as any
    bug in a step might."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self) -> float:
        if self.armed:
            self.armed = False
            raise RuntimeError("the clock failed")
        return time.time()


def crash_marker(ws: Workspace) -> None:
    """What a running supervisor leaves behind: its `running` marker."""
    ws.runtime.mkdir(parents=True, exist_ok=True)
    (ws.runtime / "running").touch()


def restart(ws: Workspace) -> list[str]:
    """Open a supervisor on the crashed workspace, run everything runnable; what it logged."""
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        sup.run_once(limit=WAIT)
    return said


def assert_done_once(ws: Workspace, oid: str, to: str = "chip") -> None:
    rec = Store(ws.state).load(oid)
    assert (rec.to, rec.status) == (to, "done"), (rec.to, rec.status, rec.failures)
    assert [h["to"] for h in rec.history].count("done") == 1
    dones = [e for e in StateRepo(ws.state).entries(oid) if e.new == "done"]
    assert len(dones) == 1
    assert len(repo_commits(ws, oid)) == 1


def test_crash_after_claim_files_the_claimed_order(make_ws):
    ws = team(make_ws)
    path = drop(ws, "chip", "fix.md", order_md("Claimed then crashed", id="c1",
                                                files=("webapp/src/c1.py",)))
    claimed = ws.state / "intake" / "chip" / f"{time.time_ns():020d}-fix.md"
    claimed.parent.mkdir(parents=True)
    os.rename(path, claimed)  # the claim is one rename; the crash came right after it
    crash_marker(ws)
    open_gate(ws, "c1", 1)
    restart(ws)
    assert_done_once(ws, "c1")
    assert completions(ws) == ["c1"]
    assert_one_place(ws, {"c1"})
    assert Store(ws.state).load("c1").source == "inbox/chip/fix.md"
    assert_clean(ws)


@pytest.mark.parametrize("written", ["original", "original+order.json"])
def test_crash_after_validation_files_the_order_to_its_recipient(make_ws, written):
    """The original was moved into its order folder; the crash came before record.json.

    `original`: killed at the end of the step that filed (and started) it, after its folder
    was placed and before the records were written (an error injected there; then the
    supervisor is abandoned as kill -9 leaves it). `original+order.json`: built on disk, the
    crash came between order.json and record.json.
    """
    ws = team(make_ws)
    text = order_md("Validated then crashed", files=("webapp/src/v1.py",), id="v1")
    folder = Store(ws.state).folder("v1")
    if written == "original":
        drop(ws, "chip", "v.md", text)
        sup = Supervisor(ws)
        sup.open()

        def killed() -> int:
            raise RuntimeError("killed before the records were written")

        sup.store.write_dirty = killed  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="killed before"):
            step_until(sup, lambda: False, "the injected crash")
        abandon(sup)
        assert (folder / "original.md").exists() and not (folder / "record.json").exists()
    else:
        folder.mkdir(parents=True)
        (folder / "original.md").write_text(text)
        order = orders.load(text.encode(), path="inbox/chip/v.md", to="chip", config=ws.config,
                            history=orders.EmptyHistory())
        durable.write_json(folder / "order.json", order.to_dict())
        crash_marker(ws)
    open_gate(ws, "v1", 1)
    open_gate(ws, "v1", 2)  # `original`: its attempt 1 was started, cut off, and counts as failed
    restart(ws)
    assert list(Store(ws.state).load_all()) == ["v1"]
    assert_done_once(ws, "v1")
    assert completions(ws) == ["v1"]
    assert_one_place(ws, {"v1"})
    assert_clean(ws)


def start_one(ws: Workspace, oid: str, *, sender: str | None = None) -> Supervisor:
    """An open supervisor whose attempt 1 of `oid` is running (committed as such)."""
    front = {"sender": sender} if sender else {}
    drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} writes its file", id=oid,
                                           files=(f"webapp/src/{oid}.py",), **front))
    sup = Supervisor(ws)
    sup.open()
    pids = probe_of(ws) / "pids"
    # Its pid written, not only the file made: the shell creates it before it writes.
    step_until(sup, lambda: committed_status(ws, oid) == "running"
               and pids.exists() and pids.read_text().strip() != "", f"{oid} to run")
    return sup


def test_crash_after_spawn_requeues_the_interrupted_attempt(make_ws):
    ws = team(make_ws)
    sup = start_one(ws, "s1")
    abandon(sup)
    open_gate(ws, "s1", 2)
    restart(ws)
    assert_done_once(ws, "s1")
    rec = Store(ws.state).load("s1")
    assert rec.attempts == 2 and "interrupted" in rec.failures[0]
    assert completions(ws) == ["s1"]
    assert_one_place(ws, {"s1"})
    assert_clean(ws)


def test_crash_after_the_specialist_exited_runs_it_again_and_lands_once(make_ws):
    """The specialist finished but its exit was never reaped: by contract the interrupted
    attempt counts as failed and runs again; the order still lands exactly once."""
    ws = team(make_ws)
    open_gate(ws, "e1", 1)
    sup = start_one(ws, "e1")
    pid = int((probe_of(ws) / "pids").read_text().split()[0])
    wait_until(lambda: completions(ws) == ["e1"] and not alive(pid), "the specialist to exit")
    abandon(sup)
    open_gate(ws, "e1", 2)
    restart(ws)
    assert_done_once(ws, "e1")
    assert completions(ws) == ["e1", "e1"]
    assert Store(ws.state).load("e1").attempts == 2
    assert_one_place(ws, {"e1"})
    assert_clean(ws)


@pytest.mark.parametrize("reached", ["merged", "checkout-moved", "branch-moved"])
def test_crash_during_the_merge(make_ws, reached):
    """The agent's commit exists on wo/m1; the supervisor dies after the merge (`merged`: it is
    recovered as done), or is killed -9 inside the move between updating the checkout and
    moving the branch (`checkout-moved`: it runs again) or between moving the branch and
    installing the new index (`branch-moved`: recovered as done). The checkout is never left
    half-merged."""
    ws = team(make_ws)
    open_gate(ws, "m1", 1)
    sup = start_one(ws, "m1")
    pid = int((probe_of(ws) / "pids").read_text().split()[0])
    wait_until(lambda: completions(ws) == ["m1"] and not alive(pid), "the specialist to exit")
    workdir = Path(Store(ws.state).load("m1").running["workdir"])
    abandon(sup)
    repo = Repo(ws.repos / "webapp")
    tip = repo.commit(workdir, ["src/m1.py"], agent="chip", subject="Order m1 writes its file",
                      trailers={"Work-Order": "m1", "Agent": "chip", "Attempt": "1"})
    assert tip is not None
    if reached == "merged":
        assert repo.merge("m1") == tip
    else:
        merge_killed_after(repo.path, "m1", "read-tree" if reached == "checkout-moved" else "update-ref")
    open_gate(ws, "m1", 2)
    said = restart(ws)
    assert_done_once(ws, "m1")
    assert git(ws.repos / "webapp", "status", "--porcelain") == ""
    assert completions(ws) == (["m1", "m1"] if reached == "checkout-moved" else ["m1"])
    if reached != "merged":
        assert any("put back 1 path(s) of a merge interrupted in repos/webapp" in line for line in said), said
    assert_one_place(ws, {"m1"})
    assert_clean(ws)


@pytest.mark.parametrize("merge", ["fast-forward", "merge-commit"])
def test_a_merge_that_landed_before_a_crash_is_no_silent_change_at_restart(make_ws, merge):
    """The crash came right after the supervisor's merge, before it noted the new head: at
    restart the order is done, and the move of the default branch is its own, not `silent`.
    `merge-commit`: m0 landed while m1 ran, so m1's merge is a merge commit."""
    ws = make_ws({"chip": {**CHIP, "max_parallel": 2}})
    ids = ["m0", "m1"] if merge == "merge-commit" else ["m1"]
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} writes its file", id=oid, files=(f"webapp/src/{oid}.py",)))
    sup = Supervisor(ws)
    sup.open()
    step_until(sup, lambda: all(committed_status(ws, oid) == "running" for oid in ids), "the orders to run")
    if merge == "merge-commit":
        open_gate(ws, "m0", 1)
        step_until(sup, lambda: committed_status(ws, "m0") == "done", "m0 to land")
    open_gate(ws, "m1", 1)
    wait_until(lambda: "m1" in completions(ws) and not specialists_of(ws), "m1's specialist to exit")
    workdir = Path(Store(ws.state).load("m1").running["workdir"])
    abandon(sup)
    repo = Repo(ws.repos / "webapp")
    base = repo.head()
    tip = repo.commit(workdir, ["src/m1.py"], agent="chip", subject="Order m1 writes its file",
                      trailers={"Work-Order": "m1", "Agent": "chip", "Attempt": "1"})
    assert tip is not None
    merged = repo.merge("m1")  # as the supervisor merges; killed right after
    assert (merged == tip) == (merge == "fast-forward") and merged != base
    said = restart(ws)
    assert_done_once(ws, "m1")
    assert signals.load(ws.state) == [], said
    assert not [line for line in said if "silent" in line]
    assert_clean(ws)


def test_a_merge_whose_branch_was_cleaned_up_before_a_crash_is_recovered_as_done(make_ws):
    """The crash came after the supervisor merged m1, noted the new head and removed m1's
    working copy and branch, before the order moved to done: its commit is believed by the
    head the supervisor noted, and the order is done, not run again."""
    ws = team(make_ws)
    open_gate(ws, "m1", 1)
    sup = start_one(ws, "m1")
    wait_until(lambda: completions(ws) == ["m1"] and not specialists_of(ws), "the specialist to exit")
    workdir = Path(Store(ws.state).load("m1").running["workdir"])
    repo = Repo(ws.repos / "webapp")
    base = repo.head()
    tip = repo.commit(workdir, ["src/m1.py"], agent="chip", subject="Order m1 writes its file",
                      trailers={"Work-Order": "m1", "Agent": "chip", "Attempt": "1"})
    assert tip is not None
    sup.note_head("webapp", repo.merge("m1"), base=base)  # as `_land` does, then `_finish`:
    repo.remove_worktree("m1", workdir)
    abandon(sup)
    said = restart(ws)
    assert_done_once(ws, "m1")
    assert Store(ws.state).load("m1").commit == tip
    assert completions(ws) == ["m1"]
    assert signals.load(ws.state) == [], said
    assert_clean(ws)


@pytest.mark.parametrize("forger", ["by-hand", "in-the-agents-name"])
def test_a_commit_forged_with_the_orders_trailers_while_the_supervisor_was_dead_is_no_landing(make_ws, forger):
    """While the supervisor lay dead in f1's attempt, someone committed on webapp's main with
    f1's trailers (as themselves, or in chip's name): recovery does not take it for chip's
    work. The attempt counts as interrupted and runs again, the forged commit is `silent`,
    and `audit verify` lists it."""
    ws = team(make_ws)
    abandon(start_one(ws, "f1"))
    name, email = ("mallory", "mallory@example.org") if forger == "by-hand" else ("chip", "chip@agents.coordinator")
    env = {**os.environ, "GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
           "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
    webapp = ws.repos / "webapp"
    subprocess.run(["git", "-C", str(webapp), "commit", "-q", "--allow-empty", "-m", "Order f1 writes its file",
                    "-m", "Work-Order: f1\nAgent: chip\nAttempt: 1"], env=env, check=True)
    forged = git(webapp, "rev-parse", "HEAD").strip()
    open_gate(ws, "f1", 2)
    said = restart(ws)
    rec = Store(ws.state).load("f1")
    assert (rec.status, rec.attempts) == ("done", 2), (rec.status, rec.failures, said)
    assert "interrupted" in rec.failures[0] and rec.commit != forged
    assert completions(ws) == ["f1"]
    assert any(s.kind == "silent" and f"..{forged[:10]}" in s.evidence for s in signals.load(ws.state)), said
    assert [f.where for f in verify(ws)] == [f"repos/webapp@{forged[:10]}"]


def outbox_team(make_ws: Callable[..., Workspace], *names: str) -> Workspace:
    """chip notes each run in $PROBE/runs, writes an order to rex into its outbox under each of
    `names`, then exits 0."""
    writes = "".join(
        f'printf "objective: Review {n}\\nacceptance: [a is true, b is true, c is true]\\nfiles: []\\n'
        f'branching: [{{action: halt-with-note, when: nothing to do}}]\\n" > "$COORD_OUTBOX/rex/{n}.yaml"; '
        for n in names)
    return make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "max_failures": 3,
                             "command": sh(f'echo run >> "$PROBE/runs"; mkdir -p "$COORD_OUTBOX/rex"; {writes}echo sent')},
                    "rex": {"role": "specialist", "command": sh("echo ok")}})


def test_a_crash_while_a_check_runs_sends_the_outbox_once_after_the_restart(make_ws):
    """Killed while the check of attempt 1 ran: that attempt sent nothing; attempt 2 sends its order once."""
    ws = outbox_team(make_ws, "r")
    probe = probe_of(ws)
    acc = (f"`test -e {probe}/go || (touch {probe}/checking; sleep 60)` passes", "The second thing is true",
           "The third thing is true")
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o", acceptance=acc))
    sup = Supervisor(ws)
    sup.open()
    step_until(sup, lambda: (probe / "checking").exists(), "the check to run")
    assert [r.id for r in Store(ws.state).load_all().values() if r.to == "rex"] == []
    abandon(sup)
    (probe / "go").touch()
    restart(ws)
    recs = Store(ws.state).load_all()
    assert (recs["o"].status, recs["o"].attempts) == ("done", 2)
    (to_rex,) = [r for r in recs.values() if r.to == "rex"]
    assert (to_rex.sender, to_rex.status) == ("chip", "done")
    assert recs["o"].children == [to_rex.id]
    assert (probe / "runs").read_text() == "run\nrun\n"
    assert_clean(ws)


def killed_after_the_first_outbox_order(ws: Workspace) -> None:
    """Run a supervisor on `ws` until it has filed one outbox order, then end it as kill -9 would."""
    sup = Supervisor(ws)
    sup.open()
    file_claimed = sup.file_claimed

    def killed_after_the_first(claimed: Path, agent: str, **kw: Any) -> Any:
        rec = file_claimed(claimed, agent, **kw)
        if kw["shown"].startswith("outbox of"):
            raise Killed
        return rec

    sup.file_claimed = killed_after_the_first  # type: ignore[method-assign]
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the crash")
    abandon(sup)


def test_a_crash_while_the_outbox_is_delivered_delivers_the_rest_once_at_restart(make_ws):
    """Killed after the first of two outbox orders was filed: the attempt was decided, so it
    is not run again; the restart files the second, and each reaches rex once."""
    ws = outbox_team(make_ws, "a", "b")
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    killed_after_the_first_outbox_order(ws)
    restart(ws)
    recs = Store(ws.state).load_all()
    assert (recs["o"].status, recs["o"].attempts) == ("done", 1)
    to_rex = sorted((r for r in recs.values() if r.to == "rex"), key=lambda r: r.seq)
    assert [(r.objective, r.sender, r.status) for r in to_rex] == [("Review a", "chip", "done"),
                                                                    ("Review b", "chip", "done")]
    assert recs["o"].children == [r.id for r in to_rex]
    assert (probe_of(ws) / "runs").read_text() == "run\n"  # decided: never run again
    assert_clean(ws)


@pytest.mark.parametrize("committed", ["nothing", "the first of two commits"])
def test_crash_between_a_state_write_and_its_commit_repairs_the_history(make_ws, committed):
    """Records were written, their transitions staged, and the group commit never (fully)
    happened. The restart commits what was written with an explicit recovery commit, and
    every transition the records list is in state/'s history (`audit verify` clean)."""
    ws = team(make_ws)
    drop(ws, "chip", "w1.md", order_md("Order w1 writes its file", id="w1", sender="walt",
                                       files=("webapp/src/w1.py",)))
    sup = Supervisor(ws)
    sup.open()
    sup._intake_step()  # w1: new -> queued, by walt; written, staged, not committed
    sup._write_state()  # as at the end of a step
    if committed == "the first of two commits":
        sup._dispatch()  # w1: queued -> running, by coordinator; a second group
        sup._write_state()
        assert Store(ws.state).load("w1").status == "running"
        # The group commit made walt's commit (sweeping every written file into it) and was
        # killed before the supervisor's own.
        state = StateRepo(ws.state)
        state.git("add", "-A", ".")
        state.git("commit", "-q", "-m", "w1 chip: new -> queued", actor="walt")
    abandon(sup)
    open_gate(ws, "w1", 1)
    open_gate(ws, "w1", 2)
    restart(ws)
    assert_done_once(ws, "w1")
    assert "recover" in git(ws.state, "log", "--format=%B")  # an explicit recovery commit
    lines = [e.line for e in StateRepo(ws.state).entries("w1")]
    assert lines[0] .startswith("w1 chip: new -> queued"), lines
    if committed == "the first of two commits":
        assert any(line.startswith("w1 chip: queued -> running") for line in lines), lines
    assert_one_place(ws, {"w1"})
    assert_clean(ws)



def test_a_record_edited_by_hand_after_a_crash_is_put_back_in_memory_too(make_ws, monkeypatch):
    """kill -9 while h1 runs; then a person marks h1 `done` in its record file. The restart puts
    the file back from git, and the loop must hold what it put back: h1 was left `running`
    for good and h2, waiting for it, ran on the strength of the edit."""
    monkeypatch.setattr(durable, "JOURNAL_SLACK_NS", 0)  # the edit is not as late as a person's would be
    ws = team(make_ws)
    sup = start_one(ws, "h1")
    drop(ws, "chip", "h2.md", order_md("Order h2 waits for h1", id="h2", files=("webapp/src/h2.py",),
                                       blocked_by=["h1"]))
    abandon(sup)
    record = Store(ws.state).record_path("h1")
    record.write_text(record.read_text().replace('"status": "running"', '"status": "done"'))
    assert Store(ws.state).load("h1").status == "done"
    open_gate(ws, "h1", 2)
    open_gate(ws, "h2", 1)
    said = restart(ws)
    assert_done_once(ws, "h1")
    assert_done_once(ws, "h2")
    rec = Store(ws.state).load("h1")
    assert rec.attempts == 2 and "interrupted" in rec.failures[0], rec.failures
    assert completions(ws) == ["h1", "h2"]  # h2 only once h1 was really done
    assert any("signal silent" in line and "orders/h1/record.json" in line for line in said), said
    assert_one_place(ws, {"h1", "h2"})
    assert_clean(ws)


@pytest.mark.parametrize("removed", ["its record", "its folder"])
def test_an_order_deleted_by_hand_after_a_crash_is_put_back_never_run_again(make_ws, monkeypatch, removed):
    """kill -9 after d1 ended done (its commit landed) and before state/ was committed; then a
    person deletes d1's record (or its whole folder). The journal lists the record as the
    supervisor's write, but the supervisor never deletes a record: the deletion was committed
    as its own ("written before a crash"), d1 was filed again from its original and ran a
    second time, its work landing twice. It is put back and said, and d1 stays done once."""
    ws = team(make_ws)
    sup = start_one(ws, "d1")
    open_gate(ws, "d1", 1)
    monkeypatch.setattr(sup.audit, "write", killed)
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill before the commit")
    abandon(sup)
    monkeypatch.undo()
    assert Store(ws.state).load("d1").status == "done" and committed_status(ws, "d1") == "running"
    if removed == "its record":
        Store(ws.state).record_path("d1").unlink()
    else:
        shutil.rmtree(Store(ws.state).folder("d1"))
    said = [str(f) for f in verify(ws)]
    assert "state-uncommitted: state/orders/d1/record.json: deleted, and not by the supervisor" in said, said
    open_gate(ws, "d1", 2)
    said = restart(ws)
    assert completions(ws) == ["d1"]  # never run again
    assert_done_once(ws, "d1")
    assert not any("committed state/orders/d1/record.json" in line for line in said), said
    assert any("signal silent" in line and "orders/d1/record.json" in line for line in said), said
    assert_one_place(ws, {"d1"})
    assert_clean(ws)


def test_a_record_write_cut_off_by_a_crash_leaves_no_temp_file_and_no_blame(make_ws, monkeypatch):
    """kill -9 between writing a record's new version (into a spare file, or a temp file
    beside it where files are not swapped) and putting it in the record's place. The restart
    takes the order up where the record says, leaves no temp file, and blames nobody for it."""
    ws = team(make_ws)
    sup = start_one(ws, "k1")
    open_gate(ws, "k1", 1)
    rename = durable._rename
    record = Store(ws.state).folder("k1") / "record.json"
    before = record.read_bytes()

    def killed_at_the_rename(src: Path | str, dst: Path | str, *, replace: bool, **how: Any) -> None:
        if str(dst).endswith("k1/record.json"):
            raise Killed
        rename(src, dst, replace=replace, **how)

    monkeypatch.setattr(durable, "_rename", killed_at_the_rename)
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")
    abandon(sup)
    monkeypatch.setattr(durable, "_rename", rename)
    folder = record.parent
    assert record.read_bytes() == before  # the record as it was before the cut-off write
    written = list(folder.glob(".tmp-*")) + list((ws.runtime / "spare-files").glob("*"))
    assert written, "the cut-off write's temp or spare file"
    cut_off = max(written, key=lambda p: p.stat().st_mtime_ns).read_bytes()  # the last one written
    assert cut_off != before and b'"id": "k1"' in cut_off
    open_gate(ws, "k1", 2)
    said = supervise_once(ws)  # another process: its temp files have other names
    assert_done_once(ws, "k1")
    assert list(folder.glob(".tmp-*")) == []
    assert "signal silent" not in said, said
    assert_one_place(ws, {"k1"})
    assert_clean(ws)

@pytest.mark.slow  # some 2.5 s each: `make test-slow`, and CI, run it
@pytest.mark.parametrize("how", ["a hand edit", "a hand commit in its name"])
def test_a_stop_that_cut_an_attempt_off_is_no_crash_for_what_a_person_did_after_it(make_ws, how):
    """Ctrl-C twice while z1 ran: the stop committed all it wrote, kept its head and its
    marker (z1 is queued again at the next start), and dropped its journal. The next start
    took it for a crash: a person who then set done order a1 back to queued and planted a file
    saw both committed as the supervisor's ("written before a crash"), nothing said, and a1 run
    a second time; a commit made in the supervisor's name passed as its own, in `audit verify`
    too. Both are put back or listed as after a clean stop."""
    ws = team(make_ws)
    drop(ws, "chip", "a1.md", order_md("Order a1 writes its file", id="a1", files=("webapp/src/a1.py",)))
    open_gate(ws, "a1", 1)
    restart(ws)
    assert_done_once(ws, "a1")
    drop(ws, "chip", "z1.md", order_md("Order z1 writes its file", id="z1", files=("webapp/src/z1.py",)))
    proc = supervise(ws, "--once")
    try:
        wait_until(lambda: committed_status(ws, "z1") == "running", "z1 to run")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # not a sync: two signals sent back to back may merge into one
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (ws.runtime / "running").exists() and (ws.runtime / recovery.CUT).exists()
    planted = ws.state / "orders" / "a1" / "planted.txt"
    planted.write_text("by hand")
    if how == "a hand edit":
        record = Store(ws.state).record_path("a1")
        record.write_text(record.read_text().replace('"status": "done"', '"status": "queued"'))
    else:
        git(ws.state, "add", "orders/a1/planted.txt")
        subprocess.run(["git", "-C", str(ws.state), "-c", "user.name=coordinator", "-c",
                        "user.email=coordinator@agents.coordinator", "commit", "-qm", "a1 chip: a note"], check=True)
        [found] = [f.detail for f in verify(ws) if f.kind == "state-foreign"]
        assert "in the supervisor's name" in found and "by coordinator: a1 chip: a note" in found
    open_gate(ws, "z1", 2)
    said = restart(ws)
    assert completions(ws) == ["a1", "z1"]  # a1 never ran again
    assert_done_once(ws, "a1")
    assert_done_once(ws, "z1")
    silent = [line for line in said if "signal silent" in line]
    if how == "a hand edit":
        assert not planted.exists()
        assert "recover" not in git(ws.state, "log", "--format=%B")
        assert len(silent) == 1 and "orders/a1/record.json" in silent[0] and "planted.txt" in silent[0], said
        assert_clean(ws)
    else:
        assert len(silent) == 1 and "while none ran" in silent[0] and "a1 chip: a note" in silent[0], said
        assert [f.kind for f in verify(ws)] == ["state-foreign"]  # for good


# -- 3. stale locks ------------------------------------------------------------------------------
def test_stale_index_locks_are_cleared_and_logged_at_start(make_ws):
    ws = team(make_ws)
    old = time.time() - 60  # left by a git process that died a minute ago
    for git_dir in (ws.state / ".git", ws.repos / "webapp" / ".git"):
        lock = git_dir / "index.lock"
        lock.write_text("")
        os.utime(lock, (old, old))
    drop(ws, "chip", "l1.md", order_md("Order l1 writes its file", id="l1",
                                       files=("webapp/src/l1.py",)))
    open_gate(ws, "l1", 1)
    said = restart(ws)
    assert not (ws.state / ".git" / "index.lock").exists()
    assert not (ws.repos / "webapp" / ".git" / "index.lock").exists()
    assert any("stale" in line and "state/.git/index.lock" in line for line in said), said
    assert any("stale" in line and "repos/webapp/.git" in line for line in said), said
    assert_done_once(ws, "l1")  # both repositories take commits again
    assert_clean(ws)


def test_a_live_git_processs_lock_is_left_alone(make_ws):
    """A lock held by a running git is not stale: removing it would corrupt that git's work."""
    ws = team(make_ws)
    lock = ws.repos / "webapp" / ".git" / "index.lock"
    lock.write_text("")
    with open(lock) as held:
        holder = subprocess.Popen(["sleep", "30"], stdin=held)
    try:
        with Supervisor(ws) as sup:
            del sup
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()
        lock.unlink()


# -- an error inside a step, then a restart ---------------------------------------------------
def test_an_error_inside_a_step_then_a_restart_loses_no_order(make_ws):
    """The supervisor stops on an unexpected error (leaving through `close()`, as the CLI's
    `with` block does). The restart must finish filing the order in flight: not delete it as
    a hand edit of state/ and blame a person for it."""
    ws = team(make_ws)
    clock = FailingClock()
    drop(ws, "chip", "x1.md", order_md("Order x1 survives an error", id="x1",
                                       files=("webapp/src/x1.py",)))
    with pytest.raises(RuntimeError, match="the clock failed"), Supervisor(ws, clock=clock) as sup:
        clock.armed = True
        sup.run_once(limit=WAIT)
    open_gate(ws, "x1", 1)
    said = restart(ws)
    assert not any("signal silent" in line for line in said), said
    assert_done_once(ws, "x1")
    assert completions(ws) == ["x1"]
    assert_one_place(ws, {"x1"})
    assert_clean(ws)


# -- leftovers of *this* workspace only ---------------------------------------------------------
def second_workspace(root: Path, agents: dict[str, object]) -> Workspace:
    """Another workspace next to make_ws's, with its own $PROBE (same layout as conftest's)."""
    import yaml
    from coordinator.demo.repo import init_demo_repo

    (root / "ws").mkdir(parents=True)
    (root / "probe").mkdir()
    for spec in agents.values():
        assert isinstance(spec, dict)
        spec.setdefault("sandbox", {"writable": [str(root / "probe")]})
        spec.setdefault("env", {"PROBE": str(root / "probe")})
    (root / "ws" / "coordinator.yaml").write_text(yaml.safe_dump({"version": 1, "agents": agents}))
    ws = Workspace(root / "ws")
    ws.ensure_layout()
    StateRepo.ensure(ws.state)
    init_demo_repo(ws.repos / "webapp")
    return ws


def test_recovery_kills_the_dead_supervisors_leftovers_not_another_workspaces(make_ws, tmp_path):
    """Order ids repeat across workspaces (every team has a WO-0001). Recovering workspace A
    must not kill the specialist workspace B is running right now for its own `t1`."""
    b = make_ws({"chip": dict(CHIP)})
    a = second_workspace(tmp_path / "a", {"chip": dict(CHIP)})
    sup_b = start_one(b, "t1")
    try:
        pid_b = int((probe_of(b) / "pids").read_text().split()[0])
        sup_a = start_one(a, "t1")
        abandon(sup_a)
        open_gate(a, "t1", 2)
        restart(a)
        assert_done_once(a, "t1")
        assert alive(pid_b), "recovering workspace A killed workspace B's running specialist"
        open_gate(b, "t1", 1)
        sup_b.run_once(limit=WAIT)
        assert sup_b.records["t1"].status == "done"
    finally:
        sup_b.close()


@pytest.mark.skipif(mounts.status() is not None, reason=f"no read-only mount layer here: {mounts.status()}")
def test_a_daemon_that_cleared_its_environment_dies_at_restart_after_both_processes_died(make_ws):
    """A specialist starts a daemon with `env -i setsid` through a double fork: no mark in its
    environment, not in the attempt's session or tree. Only the spawn server saw it go; kill -9
    of the supervisor and the server (`pkill -9 -f coordinator`) leaves it running, with write
    access to the attempt's folders. The restart finds it by its attempt's mount namespace."""
    daemon = "echo $$ > \"$1\"; exec sleep 300"
    ws = make_ws({"dee": {"role": "specialist", "command": sh(
        f"(env -i setsid sh -c '{daemon}' daemon \"$PROBE/daemon\" </dev/null >/dev/null 2>&1 &); "
        'while [ ! -s "$PROBE/daemon" ]; do sleep 0.01; done; '  # else its tree's kill may come first
        'if [ "${COORD_ATTEMPT%.n*}" = d1.1 ]; then exec sleep 300; fi')}})
    drop(ws, "dee", "d1.md", order_md("The daemon is started", id="d1"))
    sup = supervise(ws)
    try:
        wait_until(lambda: (probe_of(ws) / "daemon").exists() and committed_status(ws, "d1") == "running",
                   "the first attempt to start its daemon")
        pid = int((probe_of(ws) / "daemon").read_text())
    finally:
        kill9(sup, server_too=True)
    time.sleep(0.2)
    assert alive(pid) and specialists_of(ws) != [pid], "the daemon should outlive both, unmarked"
    (probe_of(ws) / "daemon").unlink()

    out = supervise_once(ws)

    assert not alive(pid), f"the first attempt's daemon survived the restart:\n{out}"
    assert "leftover process" in out
    assert Store(ws.state).load_all()["d1"].status == "done"  # the second attempt ran
    second = int((probe_of(ws) / "daemon").read_text())
    wait_until(lambda: not alive(second), "the second attempt's daemon to be killed with its tree")


def test_an_attempt_run_again_after_a_crash_keeps_what_the_cut_short_run_left(make_ws):
    """A request resumed after a crash starts its attempt number again: what the first run wrote
    (its log, leftovers in its outbox) is set aside for reading, not deleted."""
    from coordinator import runner

    ws = make_ws({"chip": {"role": "specialist", "command": sh("true")}})
    order = orders.parse(order_md("Runs twice", id="twice").encode(), path="o.md", to="chip")
    first = runner.prepare(ws, order, 1, [])
    (first.outbox / "unsent.md").write_text("an order that named nobody\n")
    first.logs.mkdir(parents=True, exist_ok=True)
    first.log.write_text("first run, cut short\n")
    second = runner.prepare(ws, order, 1, [])
    assert second.folder == first.folder and not (second.outbox / "unsent.md").exists()
    assert not second.log.exists()
    kept = first.folder.with_name("1.before-restart-1")
    assert (kept / "outbox" / "unsent.md").read_text() == "an order that named nobody\n"
    assert (first.logs.with_name("1.before-restart-1") / "output.log").read_text() == "first run, cut short\n"
    second.log.write_text("second run, cut short\n")
    runner.prepare(ws, order, 1, [])  # a second crash: kept beside the first, never merged into it
    assert (first.folder.with_name("1.before-restart-2") / "brief.md").exists()
    assert (kept / "outbox" / "unsent.md").exists()
    (first.folder / "brief.md").write_text("prepared, never started\n")
    runner.prepare(ws, order, 1, [])  # no log: nothing ran in it, so nothing is kept of it
    assert sorted(p.name for p in first.folder.parent.iterdir()) == ["1", "1.before-restart-1", "1.before-restart-2"]
    assert (first.folder / "brief.md").read_text() != "prepared, never started\n"


def test_a_crash_between_a_dependencys_record_and_its_waiters_releases_the_waiter_at_restart(make_ws):
    """The step that ended `base` done released `later`; kill -9 landed after base's record was
    written and before later's. The restart sees later waiting on a done order and runs it (no
    event would ever release it again)."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran"')}})
    drop(ws, "chip", "a.md", order_md("Base is done", id="base"))
    drop(ws, "chip", "b.md", order_md("Later needs the base", id="later", blocked_by=["base"]))
    sup = Supervisor(ws)
    sup.open()
    step_until(sup, lambda: "later" in sup.records, "the intake")
    assert sup.records["later"].status == "waiting"
    die_between_record_writes(sup.store, "base", "done", before="later")
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")
    assert Store(ws.state).load("base").status == "done"
    assert Store(ws.state).load("later").status == "waiting"
    abandon(sup)
    said = restart(ws)
    assert Store(ws.state).load("later").status == "done", said
    # later's first run (spawned before its record was written) died with the supervisor's server
    assert (probe_of(ws) / "ran").read_text().split().count("base") == 1
    assert [h["to"] for h in Store(ws.state).load("later").history].count("done") == 1
    assert any("later chip: waiting -> queued (its dependencies are done)" in line for line in said), said
    assert_one_place(ws, {"base", "later"})
    assert_clean(ws)


def test_a_crash_while_a_route_is_filed_keeps_what_waited_for_it_on_the_follow_up(make_ws):
    """kill -9 after the routed record and the follow-up's file were written, before the
    follow-up's record: the restart files the follow-up under the id the routed record names,
    and the order that waited for the routed one runs after it."""
    ws = review_then_ship(make_ws, "route-to\\nagent: rex")
    sup = Supervisor(ws)
    sup.open()
    sup.rerouted = killed  # type: ignore[method-assign]  # the follow-up's original is in state/intake/
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")
    follow = Store(ws.state).load("review").routed_to
    assert follow and not Store(ws.state).record_path(follow).exists()  # placed, with no record
    abandon(sup)
    said = restart(ws)
    recs = Store(ws.state).load_all()
    assert recs[follow].status == "done" and recs["ship"].status == "done", said
    assert (probe_of(ws) / "ran").read_text().split() == [follow, "ship"]
    assert_one_place(ws, {"review", "ship", follow})
    assert_clean(ws)


def test_a_claimed_order_naming_a_planned_follow_ups_id_does_not_take_it(make_ws):
    """kill -9 after `review` was routed (its record names the follow-up's id), before the
    follow-up was filed; a file claimed before the crash asks for that very id. The restart
    files the follow-up under it and refuses the other file as a duplicate: the routed work
    is not lost behind an order that only borrowed its id."""
    ws = review_then_ship(make_ws, "route-to\\nagent: rex")
    sup = Supervisor(ws)
    sup.open()
    sup.intake.file_order = killed  # type: ignore[method-assign]  # the record is on disk; the follow-up not yet
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")
    follow = Store(ws.state).load("review").report["follow_up"]["id"]
    abandon(sup)
    claimed = ws.state / "intake" / "rex"
    claimed.mkdir(parents=True, exist_ok=True)
    (claimed / f"{time.time_ns():020d}-mine.md").write_text(order_md("Mine, under that id", id=follow))
    said = restart(ws)
    recs = Store(ws.state).load_all()
    assert recs[follow].objective == "Review happens" and "review" in recs[follow].references, said
    assert recs[follow].status == "done" and recs["ship"].status == "done"
    mine = [r for r in recs.values() if r.objective == "Mine, under that id"]
    assert len(mine) == 1 and mine[0].status == "rejected" and mine[0].id != follow
    assert any(f"'{follow}' is already used in this workspace" in e for e in mine[0].errors), mine[0].errors
    assert (probe_of(ws) / "ran").read_text().split() == [follow, "ship"]
    assert_one_place(ws, {"review", "ship", follow, mine[0].id})
    assert_clean(ws)


def killed_while_filing(sup: Supervisor, prefix: str) -> None:
    """Step `sup` until it files a claimed file whose source starts with `prefix`, and kill -9
    it there: the file is in state/intake/, not filed. The caller abandons `sup`."""
    filing = sup.intake.file

    def killed(claimed: Path, agent: str, *, shown: str, **kw: Any) -> Any:
        if shown.startswith(prefix):
            raise Killed
        return filing(claimed, agent, shown=shown, **kw)

    sup.intake.file = killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")


def test_a_disk_full_error_after_the_original_moved_in_keeps_whom_the_order_is_for(make_ws, monkeypatch):
    """The original moved into its order folder, then the disk was full (say, saying so in the
    journal). The folder is now the order's one place: intake.json stays with it, and the next
    start files it for walt, never for the first agent of the team."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")},
                  "walt": {"role": "orchestrator", "sends_to": ["chip"]}}, orchestrator="walt")
    moved = durable.move

    def full_after(src: Path, dst: Path, *, sync: bool = True, data: bytes | None = None) -> None:
        moved(src, dst, sync=sync, data=data)
        if dst.name.startswith("original"):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "move", full_after)
    drop(ws, "walt", "plan.md", order_md("The plan is kept", id="plan"))
    sup = Supervisor(ws)
    sup.open()
    with pytest.raises(OSError, match="No space"):
        step_until(sup, lambda: False, "the full disk")
    folder = Store(ws.state).folder("plan")
    assert sorted(p.name for p in folder.iterdir()) == ["intake.json", "original.md"]
    abandon(sup)
    monkeypatch.setattr(durable, "move", moved)

    restart(ws)
    rec = Store(ws.state).load("plan")
    assert (rec.to, rec.status) == ("walt", "queued"), (rec.to, rec.status, rec.errors)
    assert_one_place(ws, {"plan"})
    assert_clean(ws)


def test_an_escalation_a_crash_left_claimed_is_filed_as_the_supervisors_at_restart(make_ws):
    """kill -9 after the investigation's file was written into state/intake/, before it was
    filed. It says `from: coordinator`, which no dropped order may: the restart knows it for
    the supervisor's own (it continues the blocked order under the planned id) and runs it."""
    ws = review_then_ship(make_ws, "blocked", escalate_to="rex")
    sup = Supervisor(ws)
    sup.open()
    killed_while_filing(sup, "escalation of")
    follow = Store(ws.state).load("review").report["follow_up"]["id"]
    assert [p.name.endswith(f"-{follow}.md") for p in (ws.state / "intake" / "rex").iterdir()] == [True]
    abandon(sup)
    said = restart(ws)
    recs = Store(ws.state).load_all()
    assert recs[follow].status == "done" and recs[follow].sender == "coordinator", (recs[follow].errors, said)
    assert (probe_of(ws) / "ran").read_text().split() == [follow]
    assert_one_place(ws, {"review", "ship", follow})
    assert_clean(ws)


def chip_hands_one_to_rex(make_ws: Callable[..., Workspace], sends_to: tuple[str, ...] = ("rex",)) -> Workspace:
    """chip's order `o` writes one order for rex into its outbox (on its first run only);
    rex notes each order it runs in $PROBE/ran."""
    ws = make_ws({"chip": {"role": "specialist", "sends_to": list(sends_to), "command": sh(
                     '[ -e "$PROBE/sent" ] && exit 0; touch "$PROBE/sent"; mkdir -p "$COORD_OUTBOX/rex"; '
                     f'{PRINT_REVIEW} > "$COORD_OUTBOX/rex/r.yaml"')},
                  "rex": {"role": "specialist", "command": sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran"')}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    return ws


@pytest.mark.parametrize("sends_to", [[], ["rex"]])
def test_an_outbox_order_a_crash_left_claimed_is_filed_as_its_senders_at_restart(make_ws, sends_to):
    """kill -9 after chip's outbox file was copied into state/intake/ (the outbox file gone),
    before it was filed. The restart files it as chip's, from chip's outbox, and checks chip's
    `sends_to` as ever: never as an order of the user, which anyone may send."""
    ws = chip_hands_one_to_rex(make_ws, tuple(sends_to))
    sup = Supervisor(ws)
    sup.open()
    killed_while_filing(sup, "outbox of")
    assert len(list((ws.state / "intake" / "rex").glob("*-r.yaml"))) == 1
    abandon(sup)
    restart(ws)
    recs = Store(ws.state).load_all()
    (child,) = (r for r in recs.values() if r.to == "rex")
    assert (child.sender, child.source) == ("chip", "outbox of o/r.yaml")
    if sends_to:
        assert child.status == "done"
    else:
        assert child.status == "rejected"
        assert child.errors == ["outbox of o/r.yaml: from: chip may not send to rex (it sends to: nobody)"]
    assert [e.author for e in StateRepo(ws.state).entries(child.id)][:1] == ["chip"]
    assert_one_place(ws, {"o", child.id})
    assert not [p for p in (ws.state / "intake").rglob("*") if p.is_file()]  # the note went too
    assert_clean(ws)


@contextlib.contextmanager
def killed_at_write(folder: Path, suffix: str, *, after: bool) -> Iterator[None]:
    """kill -9 at the write of a file into `folder` whose name ends with `suffix`: before any
    of it is written, or right after it is in place."""
    write = durable.write_bytes

    def dying(target: Path, data: bytes, **kw: Any) -> None:
        if target.parent == folder and target.name.endswith(suffix):
            if after:
                write(target, data, **kw)
            raise Killed
        write(target, data, **kw)

    durable.write_bytes = dying  # type: ignore[assignment]
    try:
        yield
    finally:
        durable.write_bytes = write


# Where a kill -9 may hit a claim by copy (an outbox file, an inbox file on another file
# system): the note of what the copy is of, the copy, the removal of the original, the filing.
CRASH_POINTS = ["before the note", "before the copy", "after the copy", "after the original went", "after filing"]


def killed_taking(sup: Supervisor, folder: Path, name: str, prefix: str, point: str) -> None:
    """Step `sup` until it takes the file `name` by copy into `folder` (state/intake/<agent>/)
    and files it with a source starting with `prefix`, and kill -9 it at `point`."""
    if point == "after the original went":
        return killed_while_filing(sup, prefix)
    if point == "after filing":
        file_claimed = sup.file_claimed

        def filed_then_killed(claimed: Path, agent: str, *, shown: str, **kw: Any) -> Any:
            rec = file_claimed(claimed, agent, shown=shown, **kw)
            if shown.startswith(prefix):
                raise Killed
            return rec

        sup.file_claimed = filed_then_killed  # type: ignore[method-assign]
        with pytest.raises(Killed):
            step_until(sup, lambda: False, "the kill")
        return None
    suffix = f"-{name}.from" if point == "before the note" else f"-{name}"
    with killed_at_write(folder, suffix, after=point == "after the copy"), pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")
    return None


def outbox_orders(ws: Workspace) -> list[Any]:
    """The orders chip's outbox sent to rex, each checked to be chip's, from its outbox, done."""
    recs = Store(ws.state).load_all()
    sent = [r for r in recs.values() if r.to == "rex"]
    assert {(r.sender, r.source, r.status) for r in sent} <= {("chip", "outbox of o/r.yaml", "done")}
    assert sorted(recs["o"].children) == sorted(r.id for r in sent)
    return sent


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_an_outbox_file_a_crash_cut_off_while_it_was_taken_is_delivered_once(make_ws, point):
    """kill -9 at each step of taking chip's outbox file. After the copy and before the outbox
    file is removed both are there: the copy's note says which file it is a copy of, and the
    restart removes that file before it files the copy. At every point: one order, run once."""
    ws = chip_hands_one_to_rex(make_ws)
    sup = Supervisor(ws)
    sup.open()
    killed_taking(sup, ws.state / "intake" / "rex", "r.yaml", "outbox of o/", point)
    abandon(sup)
    said = restart(ws)
    sent = outbox_orders(ws)
    assert len(sent) == 1, said
    assert (probe_of(ws) / "ran").read_text().split() == [sent[0].id]
    assert list(ws.runtime.rglob("r.yaml")) == []
    assert_one_place(ws, {"o", sent[0].id})  # and nothing left in state/intake/, no note either
    assert_clean(ws)


def test_a_copy_noted_as_an_older_version_did_is_filed_as_before(make_ws):
    """A note with no origin (written before it was noted) next to a copy a crash left
    claimed: the restart files the copy as its note says, as chip's, once."""
    ws = chip_hands_one_to_rex(make_ws)
    sup = Supervisor(ws)
    sup.open()
    killed_taking(sup, ws.state / "intake" / "rex", "r.yaml", "outbox of o/", "after the original went")
    abandon(sup)
    (note,) = (ws.state / "intake" / "rex").glob(".*.from")
    older = durable.read_json(note)
    del older["origin"]
    durable.write_json(note, older)
    restart(ws)
    sent = outbox_orders(ws)
    assert len(sent) == 1
    assert_one_place(ws, {"o", sent[0].id})
    assert_clean(ws)


def killed_after_copying_r_yaml(make_ws: Callable[..., Workspace]) -> tuple[Workspace, Path]:
    """chip hands r.yaml to rex; kill -9 after the copy, before the outbox file was removed.
    The workspace, and the outbox file left behind."""
    ws = chip_hands_one_to_rex(make_ws)
    sup = Supervisor(ws)
    sup.open()
    killed_taking(sup, ws.state / "intake" / "rex", "r.yaml", "outbox of o/", "after the copy")
    abandon(sup)
    (left,) = ws.runtime.rglob("outbox/rex/r.yaml")
    return ws, left


def test_another_file_put_where_a_crash_left_a_copied_outbox_file_is_delivered_as_well(make_ws):
    """kill -9 after chip's outbox file was copied, before it was removed; then another file
    takes its name, with the same bytes and mtime (only not the same file). The restart files
    the copy and leaves the other file alone, to be delivered as the order of its own it is."""
    ws, left = killed_after_copying_r_yaml(make_ws)
    other = left.with_name(".other")
    other.write_bytes(left.read_bytes())
    os.utime(other, ns=(left.stat().st_atime_ns, left.stat().st_mtime_ns))
    os.rename(other, left)
    restart(ws)
    sent = outbox_orders(ws)
    assert len(sent) == 2
    assert sorted((probe_of(ws) / "ran").read_text().split()) == sorted(r.id for r in sent)
    assert list(ws.runtime.rglob("r.yaml")) == []
    assert_one_place(ws, {"o", *(r.id for r in sent)})
    assert_clean(ws)


def test_a_copied_outbox_file_is_never_removed_through_a_link_at_restart(make_ws):
    """kill -9 after chip's outbox file was copied, before it was removed; then what is left of
    the attempt swaps the outbox's rex/ for a link to a folder elsewhere, which holds that very
    file. The restart files the copy once and removes nothing through the link."""
    ws, left = killed_after_copying_r_yaml(make_ws)
    away = ws.root.parent / "away"
    os.rename(left.parent, away)
    os.symlink(away, left.parent)
    restart(ws)
    (sent,) = outbox_orders(ws)
    assert (away / "r.yaml").is_file()
    assert (probe_of(ws) / "ran").read_text().split() == [sent.id]
    assert_one_place(ws, {"o", sent.id})
    assert_clean(ws)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_an_inbox_file_on_another_file_system_a_crash_cut_off_while_it_was_claimed_is_filed_once(
        inbox_mount, point):
    """inbox/chip is a mount: its file is claimed by copy, then removed. kill -9 at each step;
    after the copy and before the removal both are there, and the restart removes the inbox
    file (the copy's note says it is that file) before it files the copy: one order, run once."""
    ws, mnt = inbox_mount
    drop(ws, "chip", "a.md", order_md("Something is done", id="a"))
    sup = Supervisor(ws)
    sup.open()
    killed_taking(sup, ws.state / "intake" / "chip", "a.md", "inbox/chip/", point)
    abandon(sup)
    said = restart(ws)
    recs = Store(ws.state).load_all()
    assert [(r.id, r.source, r.status) for r in recs.values()] == [("a", "inbox/chip/a.md", "done")], said
    assert os.listdir(mnt) == []
    assert_one_place(ws, {"a"})  # and nothing left in state/intake/, no note either
    assert_clean(ws)


def test_another_file_dropped_where_a_crash_left_a_copied_inbox_file_is_filed_as_well(inbox_mount):
    """kill -9 after inbox/chip/a.md (on another file system) was copied, before it was
    removed; then another order is dropped under its name. The restart files the copy, and
    takes the other file in as the order it is."""
    ws, mnt = inbox_mount
    drop(ws, "chip", "a.md", order_md("Something is done", id="a"))
    sup = Supervisor(ws)
    sup.open()
    killed_taking(sup, ws.state / "intake" / "chip", "a.md", "inbox/chip/", "after the copy")
    abandon(sup)
    drop(ws, "chip", "a.md", order_md("Something else is done", id="b"))
    restart(ws)
    recs = Store(ws.state).load_all()
    assert {(r.id, r.source, r.status) for r in recs.values()} == {("a", "inbox/chip/a.md", "done"),
                                                                   ("b", "inbox/chip/a.md", "done")}
    assert os.listdir(mnt) == []
    assert_one_place(ws, {"a", "b"})
    assert_clean(ws)


@pytest.mark.parametrize("ending", ["routed", "blocked"])
def test_a_crash_before_a_follow_up_is_filed_files_it_at_restart_once(make_ws, ending):
    """kill -9 after the record of a routed (or blocked, escalated) order was written, before
    its follow-up's file existed: the restart files the follow-up under the id the record
    names, it runs once, what waited for the routed order runs after it, and the sender's
    report says where the work went."""
    ws = review_then_ship(make_ws, "route-to\\nagent: rex" if ending == "routed" else "blocked", escalate_to="rex")
    sup = Supervisor(ws)
    sup.open()
    sup.intake.file_order = killed  # type: ignore[method-assign]  # the record is on disk; the follow-up not yet
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")
    rec = Store(ws.state).load("review")
    follow = rec.report["follow_up"]["id"]
    assert rec.status == ending and not Store(ws.state).exists(follow)
    assert not list((ws.state / "intake").rglob("*.md"))  # nothing of it anywhere
    abandon(sup)
    said = restart(ws)
    assert f"recovery: filed a follow-up a crash cut off: review -> {follow} (rex)" in said, said
    recs = Store(ws.state).load_all()
    assert recs[follow].status == "done" and recs[follow].to == "rex" and "review" in recs[follow].references
    ran = (probe_of(ws) / "ran").read_text().split()
    if ending == "routed":
        assert ran == [follow, "ship"] and recs["ship"].status == "done"
        assert (ws.state / "orders" / "review" / "report.md").read_text().count(f"**Routed to:** rex, as order {follow}") == 1
    else:  # the investigation; `ship` waits on a blocked order, which is not done
        assert ran == [follow] and recs["ship"].status == "waiting"  # on a blocked order, which a retry may bring back
        assert (ws.state / "orders" / "review" / "report.md").read_text().count(f"**Escalated to:** rex, as order {follow}") == 1
    assert not any("follow-up" in line for line in restart(ws))  # filed once
    assert len([r for r in Store(ws.state).load_all().values() if "review" in r.references]) == 1
    assert_one_place(ws, {"review", "ship", follow})
    assert_clean(ws)


def test_a_record_naming_a_follow_up_that_is_not_one_is_said_at_start_not_a_crash(make_ws):
    """A routed or blocked record whose follow-up entry a hand edit garbled: the start says so
    for each and goes on (the others still run)."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    garbled = ({}, {"id": ["x"], "to": "chip"}, {"id": "WO-0099"}, {"id": "../x", "to": "chip"},
               {"id": "WO-0098", "to": "../../../escaped"})  # a `to` that is a path, not a name
    for i, planned in enumerate(garbled):
        folder = ws.state / "orders" / f"odd{i}"
        folder.mkdir(parents=True)
        durable.write_json(folder / "record.json", {
            "id": f"odd{i}", "to": "chip", "sender": "user", "status": "blocked" if i % 2 else "routed",
            "objective": "Odd", "created": "2026-01-01T00:00:00.000Z", "updated": "2026-01-01T00:00:00.000Z",
            "seq": i + 1, "report": {"summary": "s", "follow_up": planned}})
    StateRepo(ws.state).commit_now("coordinator", "records as an older or garbled version left them")
    drop(ws, "chip", "a.md", order_md("Still runs", id="fine"))
    said = restart(ws)
    assert sum("names a follow-up that is not one" in line for line in said) == 5, said
    assert Store(ws.state).load("fine").status == "done"
    assert not (ws.state.parent / "escaped").exists() and not (ws.root.parent / "escaped").exists()


def test_at_start_a_waiting_order_whose_dependency_was_cancelled_is_blocked_once(make_ws):
    """kill -9 after `root`'s cancel was written and before the records of what waited for it:
    the restart blocks `one` (waiting on root) and `two` (waiting on one and root), each once."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "a.md", order_md("Root thing", id="root", priority="low"))
    drop(ws, "chip", "b.md", order_md("Needs root", id="one", blocked_by=["root"]))
    drop(ws, "chip", "c.md", order_md("Needs both", id="two", blocked_by=["one", "root"]))
    sup = Supervisor(ws)
    sup.open()
    intake_all(sup)
    assert {i: sup.records[i].status for i in ("one", "two")} == {"one": "waiting", "two": "waiting"}
    sup._write_state()
    die_between_record_writes(sup.store, "root", "cancelled", before="one")
    with pytest.raises(Killed):
        sup.handle("cancel", {"id": "root"})
        sup._write_state()
    assert Store(ws.state).load("root").status == "cancelled"
    assert Store(ws.state).load("two").status == "waiting"
    abandon(sup)
    said = restart(ws)
    recs = Store(ws.state).load_all()
    assert recs["one"].status == "blocked" and recs["two"].status == "blocked", said
    assert [h["to"] for h in recs["two"].history].count("blocked") == 1
    assert_one_place(ws, {"root", "one", "two"})
    assert_clean(ws)


HAND_OFF = ('mkdir -p "$COORD_OUTBOX/chip"; for n in a b; do printf "objective: Review $n\\nacceptance: '
            '[a is true, b is true, c is true]\\nfiles: []\\nbranching: [{action: halt-with-note, when: nothing '
            'to do}]\\n" > "$COORD_OUTBOX/chip/$n.yaml"; done; ')


@pytest.mark.parametrize("outcome", ["halt-with-note", "route-to\\nagent: rex"], ids=["halted", "routed"])
def test_a_request_that_ended_short_while_its_outbox_was_delivered_ends_so_after_a_crash(make_ws, outcome):
    """walt hands two orders to chip and ends halted (or routes on to rex); kill -9 after the
    first is filed. The restart delivers the second and ends walt's request as it ended:
    never done as a request that waited for its orders, and a route is still filed."""
    result = f'printf "outcome: {outcome}\\nsummary: handed off\\n" > "$COORD_RESULT"'
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip", "rex"], "command": sh(HAND_OFF + result)},
                  "chip": {"role": "specialist", "command": sh("echo ok")},
                  "rex": {"role": "specialist", "command": sh("echo ok")}}, orchestrator="walt")
    drop(ws, "walt", "r.md", order_md("Plan the work", id="req",
                                      branching=("halt-with-note if nothing else to do", "route-to-rex if it is for rex")))
    killed_after_the_first_outbox_order(ws)
    restart(ws)
    recs = Store(ws.state).load_all()
    ended = "halted" if outcome.startswith("halt") else "routed"
    assert recs["req"].status == ended
    assert sorted(r.objective for r in recs.values() if r.to == "chip") == ["Review a", "Review b"]
    assert [r.status for r in recs.values() if r.to == "rex"] == ([] if ended == "halted" else ["done"])


def test_a_crash_between_the_merge_and_the_outbox_delivers_the_outbox_once_at_restart(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "writes": ["webapp/src/**"], "command": sh(
                     'echo run >> "$PROBE/runs"; echo "x = 1" > src/o.py; mkdir -p "$COORD_OUTBOX/rex"; '
                     'printf "objective: Review r\\nacceptance: [a is true, b is true, c is true]\\nfiles: []\\n'
                     'branching: [{action: halt-with-note, when: nothing to do}]\\n" > "$COORD_OUTBOX/rex/r.yaml"')},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "o.md", order_md("Order o writes its file", id="o", files=("webapp/src/o.py",)))
    sup = Supervisor(ws)
    sup.open()
    note_head = sup.note_head

    def killed_after_the_merge(*args: Any, **kwargs: Any) -> Any:
        note_head(*args, **kwargs)
        raise Killed  # the merge landed; the outbox was not taken yet

    sup.note_head = killed_after_the_merge  # type: ignore[method-assign]
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the crash")
    abandon(sup)
    restart(ws)
    recs = Store(ws.state).load_all()
    (to_rex,) = [r for r in recs.values() if r.to == "rex"]
    assert (recs["o"].status, recs["o"].children, to_rex.sender) == ("done", [to_rex.id], "chip")
    assert (probe_of(ws) / "runs").read_text() == "run\n"  # it was not run again


def test_a_second_crash_while_recovery_takes_back_an_outbox_order_keeps_its_sender(make_ws, monkeypatch):
    """kill -9 after chip's outbox order was placed in its order folder, before its record;
    then kill -9 again while the restart took its original back into state/intake/, before it
    removed the folder (and intake.json, which says who sent it). The next start files it as
    chip's, checked against chip's `sends_to` (nobody): never as the user's, which anyone may send."""
    from coordinator import recovery

    ws = chip_hands_one_to_rex(make_ws, sends_to=())
    sup = Supervisor(ws)
    sup.open()
    killed_taking(sup, ws.state / "intake" / "rex", "r.yaml", "outbox of o/", "after filing")
    abandon(sup)
    removed = shutil.rmtree

    def killed_removing(path: Any, *args: Any, **kw: Any) -> None:
        if (Path(path) / "intake.json").exists():
            raise Killed
        removed(path, *args, **kw)

    monkeypatch.setattr(recovery.shutil, "rmtree", killed_removing)
    again = Supervisor(ws)
    with pytest.raises(Killed):
        again.open()
    for fd in (again._lock_fd, again._root_fd):  # as `abandon`, for a supervisor killed while it opened
        if fd is not None:
            os.close(fd)
    durable.close_journal(ws.state)
    monkeypatch.setattr(recovery.shutil, "rmtree", removed)
    restart(ws)
    recs = Store(ws.state).load_all()
    (child,) = (r for r in recs.values() if r.to == "rex")
    assert (child.sender, child.source, child.status) == ("chip", "outbox of o/r.yaml", "rejected")
    assert_one_place(ws, {"o", child.id})


def test_a_crash_while_the_outbox_is_delivered_loses_no_order_beside_a_planted_repository(make_ws):
    """chip's outbox folder for rex also holds HEAD, objects/ and refs/ (shaped like a git
    repository, which is taken out of a kept attempt folder). Killed after the first order was
    filed: the restart delivers the second before that folder goes, not with it."""
    writes = "".join(
        f'printf "objective: Review {n}\\nacceptance: [a is true, b is true, c is true]\\nfiles: []\\n'
        f'branching: [{{action: halt-with-note, when: nothing to do}}]\\n" > "$COORD_OUTBOX/rex/{n}.yaml"; '
        for n in ("0", "1"))  # both sorted before HEAD: the kill comes with HEAD still there
    ws = make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "command": sh(
                      f'mkdir -p "$COORD_OUTBOX/rex/objects" "$COORD_OUTBOX/rex/refs"; '
                      f'echo "ref: refs/heads/main" > "$COORD_OUTBOX/rex/HEAD"; {writes}echo sent')},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    killed_after_the_first_outbox_order(ws)
    restart(ws)
    recs = Store(ws.state).load_all()
    to_rex = sorted((r for r in recs.values() if r.to == "rex" and r.status != "rejected"), key=lambda r: r.seq)
    assert [(r.objective, r.status) for r in to_rex] == [("Review 0", "done"), ("Review 1", "done")]
    assert [r.source for r in recs.values() if r.status == "rejected"] == ["outbox of o/HEAD"]  # said, not lost
    assert_clean(ws)


def test_a_request_resumed_after_a_crash_keeps_no_git_the_orchestrator_planted(make_ws):
    """walt (a command orchestrator) delegates to chip and leaves a `.git` with a core.fsmonitor
    in its attempt folder; the supervisor dies as walt's outbox is delivered. The restart sets
    walt's folder aside to resume the request: the folder kept aside runs nothing at a person's
    `git status`."""
    ws = make_ws({
        "walt": {"role": "orchestrator", "sends_to": ["chip"], "command": sh(
            'A=$(dirname "$COORD_RESULT"); mkdir -p "$A/.git/objects" "$A/.git/refs" "$COORD_OUTBOX/chip"; '
            'echo "ref: refs/heads/main" > "$A/.git/HEAD"; '
            'printf "[core]\\n\\tfsmonitor = touch $PROBE/ran\\n" > "$A/.git/config"; '
            'printf "objective: Kid work\\nacceptance: [a is true, b is true, c is true]\\nfiles: []\\n'
            'branching: [{action: halt-with-note, when: nothing to do}]\\n" > "$COORD_OUTBOX/chip/kid.yaml"; '
            'printf "outcome: done\\nsummary: delegated\\n" > "$COORD_RESULT"')},
        "chip": {"role": "specialist", "command": sh("echo ok")},
    }, orchestrator="walt")
    drop(ws, "walt", "req.md", order_md("The team does it", id="req"))
    killed_after_the_first_outbox_order(ws)
    said = restart(ws)
    assert Store(ws.state).load("req").status == "done", said
    kept = sorted((ws.runtime / "attempts" / "req").iterdir())
    assert [k.name for k in kept] == ["1", "1.before-restart-1"]
    for folder in kept:
        subprocess.run(["git", "status"], cwd=folder, capture_output=True, check=False)
    assert not (probe_of(ws) / "ran").exists(), "a person's git ran the orchestrator's program"


@pytest.mark.parametrize("hand", ["edit", "replace"])
def test_a_hand_change_right_after_a_crash_is_not_committed_as_the_supervisors(make_ws, hand):
    """A start after a crash commits what the dead supervisor wrote, as its journal tells: a
    file changed within two seconds of its noted write passed as that write (the journal gave
    only the time), and the hand change was committed in the recovery commit. The journal now
    says what each write left: the change is put back and signalled."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true")}})
    first = Supervisor(ws)
    first.open()
    drop(ws, "chip", "a.md", order_md("Counted once", id="a"))
    first._intake_step()
    first._write_state()  # on disk and journaled, never committed: then it dies
    abandon(first)
    record = Store(ws.state).record_path("a")
    written = record.read_text()
    if hand == "edit":  # in place, the same size
        with open(record, "r+") as f:
            f.write(written.replace('"queued"', '"done!!"'))
    else:  # an editor's save: a new file renamed over it
        other = record.with_name("edited")
        other.write_text(written.replace('"queued"', '"done"'))
        os.rename(other, record)
    said = {str(f) for f in verify(ws) if f.where == "state/orders/a/record.json"}
    assert said == {"state-uncommitted: state/orders/a/record.json: changed but not committed by the supervisor"}
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
    assert "done!!" not in git(ws.state, "log", "-p", "--", "orders/a/record.json")
    recovered = git(ws.state, "log", "--format=%B", "--grep=recovery: commit state")
    assert "orders/a/record.json" not in recovered
    silent = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert silent == ["state/ changed by hand while no supervisor ran (restored from git): orders/a/record.json"]
    assert Store(ws.state).load("a").status == "done"  # filed again from its original: never lost
    assert git(ws.state, "status", "--porcelain") == ""


def _without_root_powers() -> list[str]:
    """A command prefix under which root, too, is refused what a folder's mode refuses."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run the supervisor as root without the power to read any folder")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


@pytest.mark.parametrize("closed", ["the order's folder", "both folders"])
def test_a_crash_after_the_agent_closed_the_folders_above_its_copy_does_not_stop_every_start(make_ws, closed):
    """The agent made the folder holding its working copy mode 000, then the supervisor was
    killed: every next start of a supervisor without root's overrides ended in "permission
    denied" until a person restored the mode. The folders are opened again, said in one line,
    and the attempt counts as interrupted as usual."""
    ws = team(make_ws)
    sup = start_one(ws, "z1")
    abandon(sup)
    work = ws.root / ".coordinator" / "work"
    assert (work / "z1" / "webapp").is_dir()
    (work / "z1").chmod(0)
    if closed == "both folders":
        work.chmod(0)
    open_gate(ws, "z1", 2)
    once = [*_without_root_powers(), str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"]
    proc = subprocess.run(once, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    opened = ".coordinator/work, .coordinator/work/z1" if closed == "both folders" else ".coordinator/work/z1"
    said = [line.split(" ", 1)[1] for line in proc.stderr.splitlines() if "working copy" in line]
    assert said == [f"recovery: z1's working copy lay in {opened}, closed to the supervisor (by its agent, or "
                    "a person): opened again (owner rwx) and the copy removed"], proc.stderr
    assert_done_once(ws, "z1")
    rec = Store(ws.state).load("z1")
    assert rec.attempts == 2 and rec.failures == ["interrupted: the supervisor stopped during attempt 1"]
    assert not (work / "z1").exists()


def test_a_copy_recovery_cannot_remove_is_said_and_the_start_goes_on(make_ws):
    """The folder above the copy is another user's, closed: the supervisor may not open it.
    The start goes on, saying in the workspace's terms that the copy stays; the attempt counts
    as interrupted as usual."""
    if os.geteuid() != 0:
        pytest.skip("gives a folder to another user: needs root")
    ws = team(make_ws)
    sup = start_one(ws, "z2")
    abandon(sup)
    folder = ws.root / ".coordinator" / "work" / "z2"
    os.chown(folder, 65534, 65534)
    folder.chmod(0)
    try:
        once = [*_without_root_powers(), str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"]
        proc = subprocess.run(once, capture_output=True, text=True, timeout=180)
    finally:
        os.chown(folder, 0, 0)
        folder.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    said = [line.split(" ", 1)[1] for line in proc.stderr.splitlines() if "recovery: z2" in line]
    assert said == ["recovery: z2's working copy could not be removed, it stays: cannot reach working copy "
                    ".coordinator/work/z2/webapp: Permission denied; give its folders back their owner's rights "
                    "(chmod u+rwx) or remove it by hand"], proc.stderr
    assert str(ws.root) not in proc.stderr
    rec = Store(ws.state).load("z2")
    assert rec.failures[0] == "interrupted: the supervisor stopped during attempt 1"
