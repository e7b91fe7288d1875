"""A 10,000-order backlog: start-up recovery time, `coordinator board` time, peak memory.

The backlog is built once, through intake: a live supervisor files BACKLOG orders dropped
into the inbox of an orchestrator with no command, so every one stays `queued`. Then:
- open: a fresh process constructs a `Supervisor` and calls `open()` (lock, heal, load every
  record, recovery, watcher, spawner), then runs one loop step; it reports both times and
  its own peak RSS (`ru_maxrss`). Measured after a clean stop, and after a `kill -9` of a
  live supervisor (the crash path: recovery commits and leftover checks run).
  The same probe then has the loop run its tamper watch a few times and reports the longest
  step while each look was under way (git looks in the committer thread, not the loop).
- board: `coordinator board` as a user runs it, wall time of the whole command.

Run as `python -m bench.backlog open WORKSPACE` for the probe (used by the benchmark).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator import audit, durable
from coordinator.store import Store, iso

from .harness import (
    BenchError,
    Figure,
    LiveSupervisor,
    child_env,
    coordinator_argv,
    drop,
    epoch,
    make_workspace,
    median,
    order_md,
    temp_folder,
    wait_status,
)

if TYPE_CHECKING:
    from coordinator.supervisor import Supervisor

RECOVERY_TARGET_S = 5.0
RSS_TARGET_MB = 300.0
PROBE_TIMEOUT = 300.0
SMALL = 50  # orders in the workspace whose state commits are the baseline
COMMITS = 20  # state commits timed in each workspace
TAMPER_TICKS = 5  # tamper watches timed in each probe


@dataclass(frozen=True)
class Sizes:
    orders: int = 10_000
    open_runs: int = 3
    crash_runs: int = 3
    board_runs: int = 3


QUICK = Sizes(orders=500, open_runs=2, crash_runs=1, board_runs=2)


def probe_open(root: Path) -> dict[str, float]:
    """In this process: construct and open a Supervisor on `root`, run one step, close."""
    from coordinator.supervisor import Supervisor
    from coordinator.workspace import Workspace

    t0 = time.perf_counter()
    sup = Supervisor(Workspace(root))
    sup.open()
    opened = time.perf_counter() - t0
    t1 = time.perf_counter()
    sup.step()
    stepped = time.perf_counter() - t1
    queued = sum(1 for r in sup.records.values() if r.status == "queued")
    pauses, looks = _tamper_ticks(sup)
    sup.close()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest reaped child
    return {"open_s": opened, "first_step_s": stepped, "tamper_pause_ms": median(pauses) * 1000,
            "tamper_look_ms": median(looks) * 1000,
            "peak_rss_mb": rss_kb / 1024, "child_max_rss_mb": children_kb / 1024, "queued": queued}


def _tamper_ticks(sup: Supervisor) -> tuple[list[float], list[float]]:
    """The running loop's tamper watch, TAMPER_TICKS times: (the longest step while each
    look was under way, seconds from asking to acting on what git found)."""
    pauses: list[float] = []
    looks: list[float] = []
    for _ in range(TAMPER_TICKS):
        sup.watch_soon()
        asked = time.perf_counter()
        longest = 0.0
        while True:
            t0 = time.perf_counter()
            sup.step(paced=True)
            longest = max(longest, time.perf_counter() - t0)
            if not sup.looking:
                break
            time.sleep(0.001)  # a loop step would wait for an event here
        looks.append(time.perf_counter() - asked)
        pauses.append(longest)
    return pauses, looks


def _run_probe(root: Path) -> dict[str, float]:
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_parent, env.get("PYTHONPATH"))))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.backlog", "open", str(root)], env=env,
                          capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"the open probe failed:\n{proc.stderr[-2000:]}")
    out: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out | {"process_wall_s": wall}


def _build(base: Path, n: int) -> tuple[Path, float]:
    """A workspace with `n` queued orders, filed by a live supervisor; (root, orders/s)."""
    ws = make_workspace(base, {"walt": {"role": "orchestrator"}})
    ids = [f"bl-{i:05d}" for i in range(n)]
    with LiveSupervisor(ws) as sup:
        t0 = time.time()
        for i, oid in enumerate(ids):
            drop(ws, "walt", f"{oid}.md", order_md(f"Backlog order {i} waits its turn", id=oid))
        recs = wait_status(ws, ids, frozenset({"queued", "rejected"}), timeout=PROBE_TIMEOUT * 3, sup=sup)
        rejected = [r.id for r in recs.values() if r.status != "queued"]
        if rejected:
            raise BenchError(f"{len(rejected)} backlog orders were rejected (first {rejected[0]})")
        rate = n / (max(epoch(r.created) for r in recs.values()) - t0)
    return ws.root, rate


def _crash(root: Path) -> None:
    """Start a live supervisor on the backlog and kill -9 it once it is up."""
    from coordinator.workspace import Workspace

    sup = LiveSupervisor(Workspace(root))
    with sup:
        assert sup.proc is not None
        sup.proc.send_signal(signal.SIGKILL)
        sup.proc.wait()
    if not (root / ".coordinator" / "running").exists():
        raise BenchError("kill -9 left no crash marker; the crash path would not be measured")


def _commit_cost(root: Path, count: int) -> float:
    """Median seconds to record and commit one change of an existing order's record, the
    supervisor's way (unsynced save, staged line, syncfs, `StateRepo.flush` of its journal)."""
    state = root / "state"
    store, repo = Store(state), audit.StateRepo(state)
    ids = sorted(store.load_all())[:count]
    spans = []
    durable.open_journal(state)
    try:
        for oid in ids:
            rec = store.load(oid)
            rec.updated = iso(time.time())
            t0 = time.perf_counter()
            store.save(rec, sync=False)
            repo.stage(audit.SUPERVISOR, f"{oid} {rec.to}: touched by the benchmark")
            durable.sync_fs(state)
            repo.flush(durable.take_journal(state))
            spans.append(time.perf_counter() - t0)
    finally:
        durable.close_journal(state)
    return median(spans)


def _board(root: Path) -> float:
    from coordinator.workspace import Workspace

    t0 = time.perf_counter()
    proc = subprocess.run(coordinator_argv(Workspace(root), "board"), env=child_env(),
                          capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"coordinator board failed: {proc.stderr[-500:]}")
    return wall


def _redraws(root: Path, runs: int) -> list[float]:
    """Seconds per `board --watch` redraw once its first board has read every record."""
    from coordinator import board
    from coordinator.store import RecordCache
    from coordinator.workspace import Workspace

    ws, cache = Workspace(root), RecordCache()
    board.render(ws, cache=cache)
    spans = []
    for _ in range(runs):
        t0 = time.perf_counter()
        board.render(ws, cache=cache)
        spans.append(time.perf_counter() - t0)
    return spans


def backlog(sizes: Sizes) -> list[Figure]:
    n = sizes.orders
    with temp_folder() as base:
        small_root, _ = _build(base / "small", SMALL)
        small_commit = _commit_cost(small_root, COMMITS)
    with temp_folder() as base:
        root, build_rate = _build(base, n)
        clean = [_run_probe(root) for _ in range(sizes.open_runs)]
        crashed = []
        for _ in range(sizes.crash_runs):
            _crash(root)
            crashed.append(_run_probe(root))
        boards = [_board(root) for _ in range(sizes.board_runs)]
        redraws = _redraws(root, sizes.board_runs)
        big_commit = _commit_cost(root, COMMITS)  # last: it changes the backlog's records
    for probe in clean + crashed:
        if probe["queued"] != n:
            raise BenchError(f"a restarted supervisor found {probe['queued']:.0f} queued orders, not {n}")

    def med(runs: list[dict[str, float]], key: str) -> float:
        return median([r[key] for r in runs])

    open_s, crash_s = med(clean, "open_s"), med(crashed, "open_s")
    rss = max(r["peak_rss_mb"] for r in clean + crashed)
    board_s, redraw_s = median(boards), median(redraws)
    detail = {"orders": n, "build_intake_per_s": round(build_rate, 1),
              "clean": [{k: round(v, 3) for k, v in r.items()} for r in clean],
              "after_kill_9": [{k: round(v, 3) for k, v in r.items()} for r in crashed],
              "board_s": [round(b, 3) for b in boards]}
    worst_open = max(open_s, crash_s)
    pause, look = med(clean, "tamper_pause_ms"), med(clean, "tamper_look_ms")
    step = med(clean, "first_step_s")
    return [
        Figure("backlog_recovery", f"4. {n:,} queued: start-up, open()",
               f"{open_s:.2f} s after stop, {crash_s:.2f} s after kill -9",
               f"{len(clean)}+{len(crashed)} restarts", f"< {RECOVERY_TARGET_S:.0f} s",
               worst_open < RECOVERY_TARGET_S,
               detail | {"open_s": round(open_s, 3), "open_after_kill_9_s": round(crash_s, 3),
                         "first_step_s": round(step, 3)},
               note=f"then the first loop step {step:.2f} s; the whole process (imports, open, step, close) "
                    f"{med(clean, 'process_wall_s'):.2f} s; backlog filed at {build_rate:.0f} orders/s"),
        Figure("backlog_tamper_watch", f"4. {n:,} queued: loop pause for the tamper watch",
               f"{pause:.1f} ms longest step (look {look:.0f} ms, in the committer)",
               f"{TAMPER_TICKS} x {len(clean)} looks", data={"pause_ms": round(pause, 2), "look_ms": round(look, 1)},
               note="every 5 s git looks at state/ for changes the supervisor did not make; the loop "
                    "only hands the look over and acts on what it found"),
        Figure("backlog_board", f"4. {n:,} queued: `coordinator board`",
               f"{board_s:.2f} s; a `--watch` redraw {redraw_s:.2f} s", f"{len(boards)}+{len(redraws)} runs",
               data={"board_s": round(board_s, 3), "watch_redraw_s": round(redraw_s, 3)},
               note="the whole process; a redraw reads again only the records that changed"),
        Figure("backlog_state_commit", f"4. {n:,} queued: one state commit",
               f"{big_commit * 1000:.0f} ms ({small_commit * 1000:.0f} ms with {SMALL} orders)",
               f"{COMMITS}+{COMMITS} commits",
               data={"commit_ms": round(big_commit * 1000, 2), "baseline_commit_ms": round(small_commit * 1000, 2),
                     "baseline_orders": SMALL},
               note="one record rewritten and committed as the supervisor does (syncfs, update-index, write-tree, "
                    "commit-tree, update-ref); what still grows is the index and the orders/ tree git rewrites"),
        Figure("backlog_rss", f"4. {n:,} queued: supervisor peak RSS",
               f"{rss:.0f} MB", f"max of {len(clean) + len(crashed)}", f"< {RSS_TARGET_MB:.0f} MB",
               rss < RSS_TARGET_MB, {"peak_rss_mb": round(rss, 1),
                                     "child_max_rss_mb": round(med(clean, "child_max_rss_mb"), 1)},
               note=f"the supervisor process alone; its largest child (the fork server or a git command) "
                    f"peaked at {med(clean, 'child_max_rss_mb'):.0f} MB"),
    ]


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "open":
        print(json.dumps(probe_open(Path(argv[1]))))
        return 0
    print("usage: python -m bench.backlog open WORKSPACE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
