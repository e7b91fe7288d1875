"""Randomised chaos: kill -9 at random moments under a mixed workload, and what it found.

The slow test runs a team of three shell specialists on orders with every kind of ending
(done, failed, blocked and escalated, halted, routed, requeued with a blocker, denied, with
acceptance checks, `blocked_by` chains, outbox sends) while `coordinator cancel` and `retry`
come in, and kills `coordinator supervise` (sometimes its fork server too) with -9 at random
moments, often just after a chosen line of its log. A final `supervise --once` finishes what
can run. Then every order is in exactly one place, none is `running`, none landed twice, the
audit trail verifies and nothing of the workspace still runs. A failure names its seed:
`CHAOS_SEED=<seed> pytest tests/test_chaos.py` replays the same plan (the kill moments
depend on timing, so a replay is likely, not certain, to hit the same window).

The deterministic tests below pin each defect the chaos run found.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import drop, order_md, sh, step_until, wait_until
from test_recovery import (
    Killed,
    abandon,
    assert_clean,
    assert_one_place,
    completions,
    crash_marker,
    open_gate,
    restart,
    review_then_ship,
    team,
)

from bench.harness import probe_of
from coordinator.audit import StateRepo
from coordinator.store import Record, Store
from coordinator.supervisor import Supervisor
from coordinator.workspace import Workspace

COORDINATOR = Path(sys.executable).with_name("coordinator")


# -- defects found ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["routed", "blocked"])
def test_a_follow_up_whose_record_a_crash_cut_off_is_filed_once_and_nothing_is_rejected(make_ws, ending):
    """kill -9 after a route's (or an escalation's) follow-up was placed in its order folder,
    before its record was written: the restart files the follow-up under its planned id, and
    its copy in the folder is not taken in as a second order asking for that id (which was
    rejected as a duplicate: a bogus rejection on the board and in the sender's reports)."""
    ws = review_then_ship(make_ws, "route-to\\nagent: rex" if ending == "routed" else "blocked",
                          escalate_to="rex")
    sup = Supervisor(ws)
    sup.open()
    filed = sup._after_filing

    def killed_once_placed(rec: Record, order: Any) -> Record:
        if rec.source.startswith(("route of ", "escalation of ")):
            raise Killed
        return filed(rec, order)

    sup._after_filing = killed_once_placed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")
    follow = Store(ws.state).load("review").report["follow_up"]["id"]
    assert (Store(ws.state).folder(follow) / "original.md").exists()
    assert not Store(ws.state).record_path(follow).exists()
    abandon(sup)
    said = restart(ws)
    recs = Store(ws.state).load_all()
    assert set(recs) == {"review", "ship", follow}, said
    assert not [r for r in recs.values() if r.status == "rejected"], said
    assert recs[follow].status == "done" and recs[follow].to == "rex" and "review" in recs[follow].references
    assert (probe_of(ws) / "ran").read_text().split().count(follow) == 1
    assert_one_place(ws, {"review", "ship", follow})
    assert_clean(ws)



def test_an_attempt_started_but_not_yet_recorded_when_a_crash_came_counts_as_failed(make_ws):
    """kill -9 right after the specialist was started, before its `running` record was
    written (the record comes after the start, off the drop-to-spawn path): the restart
    counts that run as an interrupted attempt. It used to run the order again under the same
    attempt number: the agent ran twice, `show` said one attempt, and the next brief did not
    say that the last run was cut off."""
    ws = team(make_ws)
    drop(ws, "chip", "s.md", order_md("Order s1 writes its file", id="s1", files=("webapp/src/s1.py",)))
    sup = Supervisor(ws)
    sup.open()
    starting, moved = sup.attempts.start, sup.move

    def written_first(rec: Record) -> bool:
        sup._write_state()  # its `queued` record, as the step that filed it would have written it
        return starting(rec)

    def killed_once_started(rec: Record, new: str, actor: str, *, note: str | None = None) -> None:
        if new == "running":
            raise Killed
        moved(rec, new, actor, note=note)

    sup.attempts.start = written_first  # type: ignore[method-assign]
    sup.move = killed_once_started  # type: ignore[method-assign]
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")
    wait_until(lambda: (probe_of(ws) / "pids").exists(), "the specialist to start")
    assert Store(ws.state).load("s1").status == "queued"
    crash_marker(ws)
    abandon(sup)
    open_gate(ws, "s1", 2)
    said = restart(ws)
    rec = Store(ws.state).load("s1")
    assert rec.status == "done" and rec.attempts == 2, said
    assert rec.failures == ["interrupted: the supervisor stopped during attempt 1"]
    assert completions(ws) == ["s1"]
    assert len((probe_of(ws) / "pids").read_text().split()) == 2
    assert any("s1 chip: attempt 1 was started and cut off by a crash" in e.line
               for e in StateRepo(ws.state).entries("s1"))
    assert_one_place(ws, {"s1"})
    assert_clean(ws)


# -- the chaos run ---------------------------------------------------------------------------------

CHAOS_SECONDS = 35.0  # of kills and restarts; then a final `supervise --once`
CHAOS_KILLS = 20  # at most

# One specialist script for the team, by the kind its order's id starts with. It notes every
# start in $PROBE/starts, and "<order> <attempt>" in $PROBE/completions as its very last act,
# only when its run ends as done would (exit 0, no other outcome).
CHAOS_SCRIPT = r'''
a="${COORD_ATTEMPT%.n*}"; n="${a##*.}"; id="$COORD_ORDER_ID"; kind="${id%%-*}"
echo "$id $n $$" >> "$PROBE/starts"
case "$(( ${#id} * 3 + n ))" in *[02468]) sleep 0.3;; *) sleep 0.1;; esac
if [ "$COORD_AGENT" = rex ]; then echo "$id $n" >> "$PROBE/completions"; exit 0; fi
case "$kind" in
  ok|check|dep) printf 'x = "%s %s"\n' "$id" "$n" > "src/$id.py" ;;
  test) printf 'def test_it(): pass  # %s %s\n' "$id" "$n" > "tests/test_$id.py" ;;
  fail) exit 1 ;;
  badcheck) printf 'x = 1\n' > "src/$id.py" ;;
  flaky) [ "$n" -ge 2 ] || exit 1; printf 'x = 2\n' > "src/$id.py" ;;
  halt) printf 'outcome: halt-with-note\nsummary: nothing to do\n' > "$COORD_RESULT"; exit 0 ;;
  route) printf 'outcome: route-to\nagent: rex\nsummary: over to rex\n' > "$COORD_RESULT"; exit 0 ;;
  requeue) if [ ! -e "$PROBE/rq.$id" ]; then touch "$PROBE/rq.$id"
           printf 'outcome: requeue-with-blocker\nblocker: %s\nsummary: wait\n' "$(cat "$PROBE/blocker.$id")" > "$COORD_RESULT"
           exit 0; fi
           printf 'x = 3\n' > "src/$id.py" ;;
  send) printf 'id: sent-%s\nto: rex\nobjective: Review %s\nacceptance: [a is true, b is true, c is true]\nfiles: []\nbranching: [{action: halt-with-note, when: nothing to do}]\n' "$id" "$id" > "$COORD_OUTBOX/r.yaml" ;;
  deny) printf 'x = 4\n' > "src/$id.py"; printf 'y\n' > "src/zz-$id.py" ;;
  slow) sleep 3; printf 'x = 5\n' > "src/$id.py" ;;
esac
echo "$id $n" >> "$PROBE/completions"
'''
KINDS = ("ok", "ok", "ok", "check", "dep", "test", "fail", "badcheck", "flaky", "halt", "route",
         "requeue", "send", "send", "deny", "slow")
WRITES = ("ok", "check", "dep", "test", "flaky", "requeue", "slow")  # what lands a commit when done
NEVER_DONE = ("fail", "badcheck", "deny")
# Kill right after one of these appears in the supervisor's output (or at a random moment).
TRIGGERS = ("-> running", "-> done", "-> routed", "-> blocked", "running -> queued", "-> halted",
            "-> cancelled", "new -> ", "-> waiting", "-> denied", "recovery:", "supervising")


def chaos_orders(rng: random.Random, n: int, probe: Path) -> list[tuple[str, str, str]]:
    """(id, agent, text) of `n` orders of random kinds, in the order they are dropped."""
    planned: list[tuple[str, str, str]] = []
    ids: list[str] = []
    for i in range(n):
        kind = rng.choice(KINDS)
        oid = f"{kind}-{i}"
        files: tuple[str, ...] = ()
        if kind in ("ok", "check", "dep", "badcheck", "flaky", "requeue", "deny", "slow"):
            files = (f"webapp/src/{oid}.py",)
        elif kind == "test":
            files = (f"webapp/tests/test_{oid}.py",)
        acc = None
        if kind in ("check", "badcheck"):
            check = f"test -f src/{oid}.py" if kind == "check" else f"grep -q nothing-here src/{oid}.py"
            acc = (f"`{check}` passes", "The second thing is true", "The third thing is true")
        branching = ["halt-with-note if the work does not apply"]
        if kind == "route":
            branching.append("route-to-rex if it is a review")
        if kind == "requeue":
            branching.append("requeue-with-blocker if something else must land first")
            earlier = [x for x in ids if x.split("-")[0] in ("ok", "check", "test")]
            (probe / f"blocker.{oid}").write_text(
                rng.choice(earlier) if earlier and rng.random() < 0.7 else "the API is undecided")
        front: dict[str, Any] = {"id": oid}
        if kind == "dep" and ids:
            front["blocked_by"] = rng.sample(ids, k=min(len(ids), rng.randint(1, 2)))
        if rng.random() < 0.3:
            front["priority"] = rng.choice(["low", "high", "urgent"])
        text = order_md(f"Order {oid} does its thing", files=files, acceptance=acc,
                        branching=tuple(branching), **front)
        planned.append((oid, "dana" if kind == "test" else "chip", text))
        ids.append(oid)
    return planned


def put(ws: Workspace, order: tuple[str, str, str]) -> None:
    oid, agent, text = order
    drop(ws, agent, f"{oid}.md", text)


def chaos_team(make_ws: Any) -> Workspace:
    spec = {"role": "specialist", "command": sh(CHAOS_SCRIPT)}
    return make_ws({"chip": {**spec, "writes": ["webapp/src/**"], "sends_to": ["rex"], "max_parallel": 2},
                    "dana": {**spec, "writes": ["webapp/tests/**"]},
                    "rex": {**spec, "max_parallel": 2}},
                   max_parallel=3, escalate_to="rex")


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def live_processes_of(ws: Workspace) -> list[str]:
    """The command lines of this workspace's attempts still running (never another's)."""
    from test_recovery import specialists_of

    found = []
    for pid in specialists_of(ws):
        with contextlib.suppress(OSError):
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


def kill9(sup: subprocess.Popen[bytes], rng: random.Random) -> bool:
    """kill -9 `sup`, and sometimes its fork server (and any git it waits for) too: its own
    children, found by their parent, never by name. Returns whether the server died too."""
    if rng.random() < 0.5:
        os.kill(sup.pid, signal.SIGSTOP)  # frozen: it dies in one state with its server
    both = rng.random() < 0.4
    if both:
        for name in os.listdir("/proc"):
            if name.isdigit() and parent_of(int(name)) == sup.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(name), signal.SIGKILL)
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait(30)
    return both


def wait_for_line(log: Path, start: int, text: str, sup: subprocess.Popen[bytes], timeout: float) -> None:
    end = time.monotonic() + timeout
    needle = text.encode()
    while time.monotonic() < end and sup.poll() is None:
        with open(log, "rb") as f:
            f.seek(start)
            if needle in f.read():
                return
        time.sleep(0.003)


def chaos_findings(ws: Workspace, ids: list[str]) -> list[str]:
    """Every invariant the chaos run checks at the end; what breaks one, one line each."""
    found: list[str] = []
    store = Store(ws.state)
    recs = store.load_all()
    found += [f"{oid}: no record" for oid in ids if oid not in recs]
    for oid in recs:
        originals = list(store.folder(oid).glob("original.*"))
        if len(originals) != 1:
            found.append(f"{oid}: {len(originals)} originals")
    for agent in ws.config.agents:
        found += [f"left in inbox/{agent}: {p.name}" for p in ws.inbox(agent).iterdir()]
    intake = ws.state / "intake"
    if intake.exists():
        found += [f"left in intake: {p}" for p in intake.rglob("*") if p.is_file()]
    probe = probe_of(ws)
    lines = (probe / "completions").read_text().split("\n") if (probe / "completions").exists() else []
    ran = Counter(line.split()[0] for line in lines if line.strip())
    out = subprocess.run(["git", "-C", str(ws.repos / "webapp"), "log", "--no-merges", "-z",
                          "--format=%H %(trailers:key=Work-Order,valueonly,separator=%x2C)", "main"],
                         capture_output=True, text=True, check=True).stdout
    landed = Counter(x.strip().split(" ", 1)[1] for x in out.split("\0") if " " in x.strip())
    trail = StateRepo(ws.state).entries()
    committed: dict[str, list[str]] = {}
    for e in trail:
        if e.order and e.new:
            committed.setdefault(e.order, []).append(e.new)
    for oid, rec in recs.items():
        kind = oid.split("-")[0]
        if rec.status in ("running", "queued"):
            found.append(f"{oid}: left {rec.status} after `supervise --once`")
        if rec.status == "rejected":
            found.append(f"{oid}: rejected: {rec.errors}")
        if ran[oid] > rec.attempts:
            found.append(f"{oid}: its specialist completed {ran[oid]} times in {rec.attempts} attempt(s)")
        if [h["to"] for h in rec.history].count("done") > 1 or committed.get(oid, []).count("done") > 1:
            found.append(f"{oid}: done more than once")
        if committed.get(oid) and committed[oid][-1] != rec.status:
            found.append(f"{oid}: state/ history ends {committed[oid][-1]}, the record says {rec.status}")
        if rec.status == "done" and kind in WRITES and landed[oid] != 1:
            found.append(f"{oid}: done with {landed[oid]} commits on main")
        if rec.status != "done" and landed[oid]:
            found.append(f"{oid}: {rec.status}, yet {landed[oid]} commits on main")
        if rec.status == "done" and kind in NEVER_DONE:
            found.append(f"{oid}: done, which it can never be")
        if rec.status == "done" and kind == "send" and f"sent-{oid}" not in recs:
            found.append(f"{oid}: done, its outbox order never delivered")
        if rec.status == "waiting":
            open_deps = [d for d in rec.blocked_by if d not in recs or recs[d].status != "done"]
            blocker_open = rec.blocker and (rec.blocker not in recs or recs[rec.blocker].status != "done")
            if not open_deps and not blocker_open:
                found.append(f"{oid}: waiting on nothing")
    verified = subprocess.run([str(COORDINATOR), "-w", str(ws.root), "audit", "verify"],
                              capture_output=True, text=True, timeout=120)
    if verified.returncode != 0:
        found.append(f"audit verify exit {verified.returncode}: {verified.stdout[-2000:]}{verified.stderr[-500:]}")
    if StateRepo(ws.state).dirty():
        found.append(f"state/ has uncommitted changes: {StateRepo(ws.state).dirty()}")
    found += [f"still running: {cmd}" for cmd in live_processes_of(ws)]
    return found


@pytest.mark.slow  # some 60 s: `make test-slow`, and CI, run it
def test_random_kills_under_a_mixed_workload_lose_nothing_and_land_nothing_twice(make_ws):
    seed = int(os.environ.get("CHAOS_SEED", "35"))
    rng = random.Random(seed)
    ws = chaos_team(make_ws)
    log = ws.root.parent / "supervise.log"
    planned = chaos_orders(rng, 30, probe_of(ws))
    ids = [oid for oid, _, _ in planned]
    waiting = list(planned)
    commands: list[subprocess.Popen[bytes]] = []
    kills = with_server = 0
    end = time.monotonic() + CHAOS_SECONDS
    with open(log, "ab") as out:
        while kills < CHAOS_KILLS and time.monotonic() < end:
            for _ in range(rng.randint(0, 8)):
                if waiting:
                    put(ws, waiting.pop(0))
            start = log.stat().st_size
            sup = subprocess.Popen([str(COORDINATOR), "-w", str(ws.root), "supervise"], stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            if rng.random() < 0.5:
                wait_for_line(log, start, rng.choice(TRIGGERS), sup, 8.0)
                time.sleep(rng.choice((0, 0, 0.002, 0.01, 0.03)))
            else:
                until = time.monotonic() + rng.uniform(0.02, 1.5)
                while time.monotonic() < until:
                    time.sleep(rng.uniform(0.05, 0.4))
                    if waiting and rng.random() < 0.25:
                        put(ws, waiting.pop(0))
                    elif rng.random() < 0.15:  # served by the supervisor, or by the command itself
                        commands.append(subprocess.Popen(
                            [str(COORDINATOR), "-w", str(ws.root), rng.choice(("cancel", "retry", "retry")),
                             rng.choice(ids)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL))
            if sup.poll() is None:
                with_server += kill9(sup, rng)
                kills += 1
            for cmd in commands:  # a command killed too, at times: one serving itself holds the lock
                if cmd.poll() is None and rng.random() < 0.15:
                    cmd.kill()
    for order in waiting:
        put(ws, order)
    for cmd in commands:
        cmd.wait(90)
    once = subprocess.run([str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"],
                          capture_output=True, text=True, timeout=300)
    found = chaos_findings(ws, ids)
    if once.returncode != 0:
        found.insert(0, f"`supervise --once` exit {once.returncode}: {once.stderr[-2000:]}")
    assert not found, (f"seed {seed} ({kills} kills, {with_server} with the fork server; replay with "
                       f"CHAOS_SEED={seed}):\n" + "\n".join(found))
    assert kills >= 5
