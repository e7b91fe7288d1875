"""Benchmarks against a live supervisor (`coordinator supervise` as a child process).

- drop-to-spawn latency: an order is dropped (dot-file + rename, as `coordinator send`
  does) to an agent whose command is `bash -c 'printf ... "$EPOCHREALTIME" > $PROBE/stamps'`.
  Reading the clock is the first thing the process does (a shell builtin: no fork, no
  further exec), and it writes the stamp into a FIFO the benchmark holds open, so the
  benchmark waits on the FIFO, not on a timer. latency = stamp - time just before the
  rename. The agent runs under the default Landlock sandbox.
  Measured in two rhythms: "idle" (each drop at least IDLE_GAP after the last, so the
  supervisor is waiting) and "back-to-back" (the next drop as soon as the last order is
  `done`, as under steady load).
- bare fork+exec: the same command started with subprocess.Popen from Python.
- end-to-end throughput: N read-only orders to `/bin/true`, dropped at once; time from
  the first drop to the last `done` (the record's own timestamp), against running
  `/bin/true` N times with subprocess.run in the same run (just before and just after,
  averaged). Measured with the agent's default `max_parallel: 1` (each order waits for the
  last to end), with 4 at once (the workspace's default limit), and with 16 at once (both
  limits raised: the loop's own capacity).
- `supervise --once` throughput: the same N orders dropped first, then one `--once` run;
  time from its start (start-up included) to the last `done`.
- intake-only throughput: N orders to an orchestrator with no command (they stay queued);
  time from the first drop to the last record filed.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.store import Store
from coordinator.workspace import Workspace

from .harness import (
    BenchError,
    Figure,
    LiveSupervisor,
    child_env,
    coordinator_argv,
    drop,
    epoch,
    median,
    order_md,
    percentile,
    probe_of,
    temp_folder,
    temp_workspace,
    wait_status,
    work_dir,
)

STAMP_SCRIPT = 'printf "%s %s\\n" "$COORD_ORDER_ID" "$EPOCHREALTIME" > "$PROBE/stamps"'
STAMP_COMMAND = [shutil.which("bash") or "/bin/bash", "-c", STAMP_SCRIPT]
IDLE_GAP = 0.55  # s between idle drops: longer than watchdog's 0.5 s hold of a claim's rename
LATENCY_TARGET_MS = 10.0
THROUGHPUT_TARGET = 3.0  # supervisor time / bare spawn time
PARALLEL = 4  # the agent's max_parallel in the parallel throughput runs (the workspace's default limit)
# With the limits raised until slots are never what an order waits for: what the loop itself
# can do (at 4, an order waits for a slot while the loop has nothing else to do).
SATURATED = 16
ORDER_TIMEOUT = 60.0
ENDED = frozenset({"done", "halted", "routed", "blocked", "rejected", "denied", "cancelled"})


@dataclass(frozen=True)
class Sizes:
    latency_runs: int = 4
    latency_per_run: int = 50
    busy_runs: int = 2
    busy_per_run: int = 40
    bare_samples: int = 200
    throughput_runs: int = 5  # the machine drifts by a tenth and more within minutes: five runs, their median
    throughput_orders: int = 300
    intake_runs: int = 3
    intake_orders: int = 300


QUICK = Sizes(latency_runs=2, latency_per_run=10, busy_runs=1, busy_per_run=10, bare_samples=30,
              throughput_runs=2, throughput_orders=40, intake_runs=2, intake_orders=60)


class _Stamps:
    """The FIFO the stamp command writes into; held open read-write so it never reads EOF."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "stamps"
        if not self.path.exists():
            os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.buf = b""

    def read(self, timeout: float) -> tuple[str, int]:
        """The next (order id, stamp in ns)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise BenchError(f"no process started within {timeout:.0f}s")
            self.buf += os.read(self.fd, 4096)
        line, self.buf = self.buf.split(b"\n", 1)
        oid, stamp = line.decode().split()
        whole, _, frac = stamp.partition(".")  # EPOCHREALTIME: seconds.microseconds
        return oid, int(whole) * 1_000_000_000 + int(frac.ljust(6, "0")[:6]) * 1000

    def close(self) -> None:
        os.close(self.fd)


def _latency_run(samples: int, *, busy: bool, first: int) -> list[float]:
    """One live supervisor; `samples` drops; latencies in ms."""
    agents = {"chip": {"role": "specialist", "command": list(STAMP_COMMAND)}}
    out: list[float] = []
    with temp_workspace(agents) as ws:
        stamps = _Stamps(probe_of(ws))
        try:
            with LiveSupervisor(ws) as sup:
                last_drop = 0.0
                for i in range(first, first + samples):
                    oid = f"lat-{i:04d}"
                    text = order_md(f"Latency sample {i} is taken", id=oid)
                    if not busy:
                        time.sleep(max(0.0, last_drop + IDLE_GAP - time.monotonic()))
                    last_drop = time.monotonic()
                    dropped = drop(ws, "chip", f"{oid}.md", text)
                    try:
                        got, started = stamps.read(ORDER_TIMEOUT)
                    except BenchError as e:  # say what the supervisor said, not only that it stalled
                        alive = "running" if sup.alive() else "exited"
                        raise BenchError(f"{e} (supervisor {alive}; its last lines:\n"
                                         + "\n".join(list(sup.lines)[-15:]) + ")") from None
                    if got != oid:
                        raise BenchError(f"expected a stamp from {oid}, got one from {got}")
                    out.append((started - dropped) / 1e6)
                    wait_status(ws, [oid], ENDED, timeout=ORDER_TIMEOUT, sup=sup)
        finally:
            stamps.close()
    return out


def _bare_stamps(samples: int) -> list[float]:
    """The stamp command started by subprocess.Popen: fork+exec+shell start, in ms."""
    out: list[float] = []
    with temp_folder() as probe:
        stamps = _Stamps(probe)
        env = dict(os.environ, PROBE=str(probe))
        try:
            for i in range(samples):
                env["COORD_ORDER_ID"] = f"bare-{i}"
                t0 = time.time_ns()
                proc = subprocess.Popen(STAMP_COMMAND, env=env, stdin=subprocess.DEVNULL)
                _, started = stamps.read(ORDER_TIMEOUT)
                out.append((started - t0) / 1e6)
                proc.wait()
        finally:
            stamps.close()
    return out


def latency(sizes: Sizes) -> list[Figure]:
    idle: list[float] = []
    per_run: list[float] = []
    for r in range(sizes.latency_runs):
        run = _latency_run(sizes.latency_per_run, busy=False, first=r * 1000)
        per_run.append(percentile(run, 50))
        idle += run
    busy: list[float] = []
    busy_runs: list[float] = []
    for r in range(sizes.busy_runs):
        run = _latency_run(sizes.busy_per_run, busy=True, first=r * 1000)
        busy_runs.append(percentile(run, 50))
        busy += run
    bare = _bare_stamps(sizes.bare_samples)

    def pcts(values: list[float]) -> dict[str, float]:
        return {f"p{q}_ms": round(percentile(values, q), 2) for q in (50, 90, 99)} | {
            "max_ms": round(max(values), 2), "samples": len(values)}

    def text(values: list[float]) -> str:
        return "p50 {:.1f}, p90 {:.1f}, p99 {:.1f} ms".format(*(percentile(values, q) for q in (50, 90, 99)))

    target = f"p50 < {LATENCY_TARGET_MS:.0f} ms"
    return [
        Figure("drop_to_spawn_idle", "1. drop-to-spawn, live supervisor, Landlock, idle",
               text(idle), f"{len(idle)} drops, {sizes.latency_runs} supervisors", target,
               percentile(idle, 50) < LATENCY_TARGET_MS,
               pcts(idle) | {"p50_per_run_ms": [round(x, 2) for x in per_run], "gap_s": IDLE_GAP,
                             "all_ms": [round(x, 3) for x in idle]},
               note=f"idle: each drop >= {IDLE_GAP} s after the last; p50 per supervisor "
                    + ", ".join(f"{x:.1f}" for x in per_run) + " ms"),
        Figure("drop_to_spawn_back_to_back", "1. drop-to-spawn, live supervisor, back-to-back",
               text(busy), f"{len(busy)} drops, {sizes.busy_runs} supervisors", target,
               percentile(busy, 50) < LATENCY_TARGET_MS,
               pcts(busy) | {"p50_per_run_ms": [round(x, 2) for x in busy_runs],
                             "all_ms": [round(x, 3) for x in busy]},
               note="back-to-back: each drop as soon as the last order is done (within 0.5 s of its claim)"),
        Figure("bare_fork_exec", "1. bare fork+exec, same command, from Python",
               text(bare), f"{len(bare)} starts", data=pcts(bare)),
    ]


def _throughput_run(n: int, first: int, parallel: int = 1) -> tuple[float, float]:
    """(seconds from first drop to last done, seconds to run /bin/true n times bare), with
    the agent running up to `parallel` orders at once (the workspace's limit raised to match).
    The bare runs are timed just before the supervisor starts and just after it stops, and
    averaged: the machine's speed drifts by a tenth or more from one minute to the next here,
    and one bare run on one side made the ratio swing with it."""
    agents = {"chip": {"role": "specialist", "command": ["/bin/true"], "max_parallel": parallel}}
    top = {"max_parallel": parallel} if parallel > PARALLEL else {}
    with temp_workspace(agents, **top) as ws:
        before = _bare_seconds(n)
        elapsed = _timed_run(ws, n, first)
    return elapsed, (before + _bare_seconds(n)) / 2


def _timed_run(ws: Workspace, n: int, first: int) -> float:
    """Seconds from the first of n orders dropped into a live supervisor to the last done."""
    with LiveSupervisor(ws) as sup:
        ids = [f"tp-{first + i:05d}" for i in range(n)]
        texts = [order_md(f"Throughput order {first + i} is done", id=oid) for i, oid in enumerate(ids)]
        t0 = time.time()
        for oid, text in zip(ids, texts, strict=True):
            drop(ws, "chip", f"{oid}.md", text)
        recs = wait_status(ws, ids, ENDED, timeout=ORDER_TIMEOUT * 10, sup=sup)
        failed = [r.id for r in recs.values() if r.status != "done"]
        if failed:
            raise BenchError(f"{len(failed)} throughput orders did not end done (first {failed[0]})")
        return max(epoch(r.updated) for r in recs.values()) - t0


def _bare_seconds(n: int) -> float:
    """Seconds to run /bin/true n times with subprocess.run: the floor the throughputs are put against."""
    b0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(["/bin/true"], check=True)
    return time.perf_counter() - b0


def _once_run(n: int, first: int) -> tuple[float, float]:
    """`coordinator supervise --once` on n orders dropped before it starts: (seconds from its
    start to the last done, seconds to run /bin/true n times bare). Start-up is included."""
    agents = {"chip": {"role": "specialist", "command": ["/bin/true"]}}
    with temp_workspace(agents) as ws:
        subprocess.run(coordinator_argv(ws, "supervise", "--once"), env=child_env(), check=True,
                       capture_output=True, timeout=ORDER_TIMEOUT)  # state/ made, spawner warm on disk
        ids = [f"once-{first + i:05d}" for i in range(n)]
        for i, oid in enumerate(ids):
            drop(ws, "chip", f"{oid}.md", order_md(f"Once order {first + i} is done", id=oid))
        before = _bare_seconds(n)  # on both sides, as for `_throughput_run`
        t0 = time.time()
        proc = subprocess.run(coordinator_argv(ws, "supervise", "--once"), env=child_env(),
                              capture_output=True, text=True, timeout=ORDER_TIMEOUT * 10)
        if proc.returncode != 0:
            raise BenchError(f"supervise --once failed: {proc.stderr[-300:]}")
        recs = Store(ws.state).load_all()
        failed = [oid for oid in ids if oid not in recs or recs[oid].status != "done"]
        if failed:
            raise BenchError(f"{len(failed)} --once orders did not end done (first {failed[0]})")
        elapsed = max(epoch(recs[oid].updated) for oid in ids) - t0
    return elapsed, (before + _bare_seconds(n)) / 2


def throughput(sizes: Sizes) -> list[Figure]:
    n, runs = sizes.throughput_orders, range(sizes.throughput_runs)
    before = file_system(100)  # a file system still slowed by a removal says so here
    figures = [_throughput_figure("throughput_end_to_end", "2. end-to-end throughput, /bin/true, one at a time",
                                  n, [_throughput_run(n, r * 100_000) for r in runs]),
               _throughput_figure("throughput_parallel", f"2. the same, {PARALLEL} at once (max_parallel)",
                                  n, [_throughput_run(n, 200_000 + r * 10_000, PARALLEL) for r in runs],
                                  parallel=PARALLEL),
               _throughput_figure("throughput_saturated", f"2. the same, {SATURATED} at once (both limits raised)",
                                  n, [_throughput_run(n, 300_000 + r * 10_000, SATURATED) for r in runs],
                                  target=False, parallel=SATURATED),
               _throughput_figure("throughput_once", "2. `supervise --once` on a queue, /bin/true", n,
                                  [_once_run(n, 500_000 + r * 10_000) for r in runs], target=False),
               file_system(before=before)]
    # The same on a RAM file system: how much of the cost per order is the disk's (every
    # order creates some 20 files and folders in state/, .coordinator/ and git's objects).
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with work_dir(shm / f"coord-bench-{os.getpid()}"):
            tmpfs = [_throughput_run(n, 900_000 + r * 10_000, PARALLEL) for r in runs]
        figures.append(_throughput_figure("throughput_parallel_tmpfs",
                                          f"2. {PARALLEL} at once, workspace on tmpfs", n, tmpfs,
                                          target=False, parallel=PARALLEL))
    return figures


def file_system(samples: int = 300, before: Figure | None = None) -> Figure:
    """What one new folder and one new file cost where the workspaces live: the floor under
    the throughput above (an order makes some 20 of them in state/, .coordinator/ and git).
    `before`: the same measured before the runs (on an ext4 without a journal a removal made
    in the minutes before slows every new file: the runs were slowed too when it was slower)."""
    mkdir_us: list[float] = []
    create_us: list[float] = []
    with temp_folder("coord-fs-") as base:
        for i in range(samples):
            t0 = time.perf_counter()
            os.mkdir(base / f"d{i}")
            t1 = time.perf_counter()
            fd = os.open(base / f".f{i}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x" * 400)
            os.close(fd)
            os.rename(base / f".f{i}.tmp", base / f"f{i}")
            t2 = time.perf_counter()
            mkdir_us.append((t1 - t0) * 1e6)
            create_us.append((t2 - t1) * 1e6)
    data = {"mkdir_us": round(median(mkdir_us), 1), "create_rename_us": round(median(create_us), 1),
            "mkdir_p90_us": round(percentile(mkdir_us, 90), 1),
            "create_rename_p90_us": round(percentile(create_us, 90), 1)}
    note = "an order makes ~20 folders and files (state/, .coordinator/, git objects): on a tmpfs each is ~5-20 us"
    if before is not None:
        data["before_runs"] = before.data
        note += (f"; before the runs: mkdir {before.data['mkdir_us']:.0f} us, "
                 f"file create+rename {before.data['create_rename_us']:.0f} us")
    return Figure("file_system", "2. the workspaces' file system, per new inode",
                  f"mkdir {median(mkdir_us):.0f} us, file create+rename {median(create_us):.0f} us",
                  f"{samples}+{samples} ops", note=note, data=data)


def _throughput_figure(key: str, title: str, n: int, runs: list[tuple[float, float]], *,
                       target: bool = True, parallel: int = 1) -> Figure:
    ratios = [sup / bare for sup, bare in runs]
    rate = median([n / sup for sup, _ in runs])
    bare_rate = median([n / bare for _, bare in runs])
    ratio = median(ratios)
    return Figure(
        key, title, f"{rate:.1f} orders/s = {ratio:.1f}x bare spawn ({bare_rate:.0f}/s)",
        f"{len(runs)} x {n} orders", f"<= {THROUGHPUT_TARGET:.0f}x bare" if target else "",
        ratio <= THROUGHPUT_TARGET if target else None,
        {"orders": n, "orders_per_s": round(rate, 2), "bare_per_s": round(bare_rate, 1),
         "ratio": round(ratio, 2), "runs_s": [[round(s, 3), round(b, 3)] for s, b in runs],
         "agent_max_parallel": parallel, "workspace_max_parallel": max(parallel, PARALLEL)})


def _intake_run(n: int, first: int) -> float:
    """Seconds from the first drop to the last order filed (queued)."""
    with temp_workspace({"walt": {"role": "orchestrator"}}) as ws, LiveSupervisor(ws) as sup:
        ids = [f"in-{first + i:05d}" for i in range(n)]
        texts = [order_md(f"Queued order {first + i} waits", id=oid) for i, oid in enumerate(ids)]
        t0 = time.time()
        for oid, text in zip(ids, texts, strict=True):
            drop(ws, "walt", f"{oid}.md", text)
        recs = wait_status(ws, ids, frozenset({"queued", "rejected"}), timeout=ORDER_TIMEOUT * 10, sup=sup)
        rejected = [r.id for r in recs.values() if r.status != "queued"]
        if rejected:
            raise BenchError(f"{len(rejected)} intake orders were rejected (first {rejected[0]})")
        return max(epoch(r.created) for r in recs.values()) - t0


def intake(sizes: Sizes) -> list[Figure]:
    n = sizes.intake_orders
    runs = [_intake_run(n, r * 100_000) for r in range(sizes.intake_runs)]
    rate = median([n / s for s in runs])
    return [Figure("intake_only", "3. intake-only throughput (agent cannot run)",
                   f"{rate:.0f} orders/s", f"{len(runs)} x {n} orders",
                   data={"orders": n, "orders_per_s": round(rate, 1), "runs_s": [round(s, 3) for s in runs]})]
