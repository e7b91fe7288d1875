"""What every benchmark shares: temp workspaces, dropping orders, a live supervisor, statistics.

Workspaces are built the way the tests build them (tests/conftest.py `make_ws`): a
coordinator.yaml, the layout, a `state/` repository and the demo repository, in a fresh
folder that is removed afterwards. The folders are made under `bench/.work-<pid>/` by default:
a real workspace lives in a project checkout, so that is the file system to measure
(`python -m bench --dir` picks another, e.g. the system's temp folder). Orders are dropped the way `coordinator send`
drops them: a dot-file in the inbox, renamed into place.

Example:
    >>> with temp_workspace({"chip": {"role": "specialist", "command": ["/bin/true"]}}) as ws:
    ...     with LiveSupervisor(ws):
    ...         drop(ws, "chip", "a.md", order_md("It is done", id="a"))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from coordinator.demo.repo import init_demo_repo

from coordinator.audit import StateRepo
from coordinator.errors import CoordinatorError
from coordinator.store import TERMINAL, Store
from coordinator.workspace import Workspace

START_WAIT = 60.0  # seconds a supervisor may take to open its workspace
STOP_WAIT = 60.0  # seconds it may take to stop after SIGTERM
POLL = 0.02  # seconds between looks at order records while waiting for a status


class BenchError(RuntimeError):
    """A benchmark could not run (the supervisor died, an order never finished)."""


# -- workspaces -----------------------------------------------------------------------------------


DEFAULT_WORK_DIR = Path(__file__).resolve().parent / ".work"
WORK_DIR = DEFAULT_WORK_DIR
_DEFERRED = False  # inside run_dir: workspaces are removed with it, at the end of the run


def set_work_dir(folder: Path) -> None:
    """Where the benchmarks' workspaces are made (created if missing)."""
    global WORK_DIR
    WORK_DIR = folder.resolve()


@contextlib.contextmanager
def work_dir(folder: Path) -> Iterator[Path]:
    """Make the workspaces under `folder` for a while; `folder` is removed afterwards."""
    before = WORK_DIR
    set_work_dir(folder)
    try:
        yield folder
    finally:
        set_work_dir(before)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def run_dir(parent: Path | None = None) -> Iterator[Path]:
    """The work folder of one `python -m bench` run: a new folder, removed afterwards
    (bench/.work-<pid>, or coord-bench-run-<pid> inside `parent`); runs at once keep apart.

    Never reused from run to run, and the workspaces made inside are removed only at the end.
    On an ext4 without a journal the kernel will not reuse an inode freed in the last 1-6
    minutes (`recently_deleted()`) and scans past every such inode of the block group for each
    new file: removing one measurement's 10,000 files made the next one's every mkdir cost
    0.3-1.7 ms instead of 30-60 us. The supervisor's own removals still count, as they should.
    """
    global _DEFERRED
    folder = (DEFAULT_WORK_DIR.with_name(f".work-{os.getpid()}") if parent is None
              else parent.resolve() / f"coord-bench-run-{os.getpid()}")
    shutil.rmtree(folder, ignore_errors=True)  # what a killed run with the same pid left behind
    folder.mkdir(parents=True)
    _DEFERRED = True
    try:
        with work_dir(folder):
            yield folder
    finally:
        _DEFERRED = False


@contextlib.contextmanager
def temp_folder(prefix: str = "coord-bench-") -> Iterator[Path]:
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK_DIR))
    try:
        yield path
    finally:
        if not _DEFERRED:
            shutil.rmtree(path, ignore_errors=True)


def make_workspace(base: Path, agents: dict[str, Any], **top: Any) -> Workspace:
    """A workspace under `base/ws`, with `base/probe` as the agents' sandbox-writable $PROBE."""
    root = base / "ws"
    root.mkdir(parents=True, exist_ok=True)
    probe = base / "probe"
    probe.mkdir(exist_ok=True)
    for spec in agents.values():
        if spec.get("role") == "specialist" or "command" in spec:
            spec.setdefault("sandbox", {"writable": [str(probe)]})
            spec.setdefault("env", {"PROBE": str(probe)})
    cfg = {"version": 1, "agents": agents, **top}
    (root / "coordinator.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    ws = Workspace(root)
    ws.ensure_layout()
    StateRepo.ensure(ws.state)
    if not (ws.repos / "webapp").exists():
        init_demo_repo(ws.repos / "webapp")
    return ws


@contextlib.contextmanager
def temp_workspace(agents: dict[str, Any], **top: Any) -> Iterator[Workspace]:
    with temp_folder() as base:
        yield make_workspace(base, agents, **top)


def probe_of(ws: Workspace) -> Path:
    return ws.root.parent / "probe"


def order_md(objective: str, **front: Any) -> str:
    """A read-only Markdown work order (no files) in the seed's four-line format."""
    head = "---\n" + yaml.safe_dump(front) + "---\n" if front else ""
    return (head + f"**Objective:** {objective}\n\n**Acceptance:**\n"
            "- The first thing is true\n- The second thing is true\n- The third thing is true\n\n"
            "**Files:**\n\n**Branching:**\n- halt-with-note if the work does not apply\n")


def drop(ws: Workspace, agent: str, name: str, text: str) -> int:
    """Drop a file the way `coordinator send` does; returns time.time_ns() just before the rename."""
    inbox = ws.inbox(agent)
    tmp = inbox / f".{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    at = time.time_ns()
    os.rename(tmp, inbox / name)
    return at


def coordinator_argv(ws: Workspace, *args: str) -> list[str]:
    """The `coordinator` CLI of this interpreter's environment, on workspace `ws`."""
    script = Path(sys.executable).parent / "coordinator"
    head = [str(script)] if script.exists() else [sys.executable, "-c",
                                                   "import sys; from coordinator.cli import main; sys.exit(main())"]
    return [*head, "-w", str(ws.root), *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COORDINATOR_WORKSPACE", None)
    return env


# -- a live supervisor ------------------------------------------------------------------------------


class LiveSupervisor:
    """`coordinator supervise` as a child process, as a user runs it; stopped with SIGTERM."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.lines: deque[str] = deque(maxlen=200)
        self._up = threading.Event()
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> LiveSupervisor:
        self.proc = subprocess.Popen(coordinator_argv(self.ws, "supervise", "--grace", "5"),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=child_env())
        threading.Thread(target=self._read, daemon=True, name="supervisor-log").start()
        if not self._up.wait(START_WAIT) or self.proc.poll() is not None:
            self.stop()
            raise BenchError("the supervisor did not start:\n" + "\n".join(list(self.lines)[-20:]))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if " supervising " in line:
                self._up.set()
        self._up.set()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_status(ws: Workspace, ids: Sequence[str], statuses: frozenset[str], *, timeout: float,
                sup: LiveSupervisor | None = None) -> dict[str, Any]:
    """Wait until every order in `ids` has a record in one of `statuses`; returns the raw records.

    Orders finish roughly in the order they were dropped, so records are read in that
    order and a look stops at the first one not there yet: few reads per look.
    """
    store = Store(ws.state)
    done: dict[str, Any] = {}
    pending = list(ids)
    deadline = time.monotonic() + timeout
    if statuses <= TERMINAL:
        _wait_reports(ws, pending, deadline, sup)
    while pending:
        while pending:
            try:
                rec = store.load(pending[0])
            except (CoordinatorError, OSError, ValueError):  # not filed yet
                break
            if rec.status not in statuses:
                break
            done[pending.pop(0)] = rec
        if not pending:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{len(pending)} of {len(ids)} orders not {'/'.join(sorted(statuses))} "
                             f"after {timeout:.0f}s (first: {pending[0]})")
        if sup is not None and not sup.alive():
            raise BenchError("the supervisor died:\n" + "\n".join(list(sup.lines)[-20:]))
        time.sleep(POLL)
    return done


def _wait_reports(ws: Workspace, ids: Sequence[str], deadline: float, sup: LiveSupervisor | None) -> None:
    """Wait until each order of `ids` has its report (written as it ends): one stat an order.
    Reading each record as it ended (a JSON parse, some 0.1 ms) took CPU from the supervisor
    being measured; the records are read once it is done. Returns at the deadline as well: the
    caller's wait says which order is missing."""
    folder = ws.state / "orders"
    at = 0  # ids[:at] have their reports
    while time.monotonic() <= deadline:
        while at < len(ids) and os.path.exists(folder / ids[at] / "report.md"):
            at += 1
        if at == len(ids) or (sup is not None and not sup.alive()):
            return
        time.sleep(POLL)


def epoch(iso_text: str) -> float:
    """Seconds since the epoch of a record's ISO time (millisecond precision)."""
    from datetime import datetime

    return datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()


# -- statistics -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    if not values:
        raise ValueError("no values")
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass
class Figure:
    """One row of the table: the headline median, how it was measured, its target, the numbers."""

    key: str
    title: str
    value: str
    runs: str
    target: str = ""
    met: bool | None = None
    data: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # a breakdown, printed under the table

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "value": self.value, "runs": self.runs,
                "target": self.target, "met": self.met, "note": self.note, **self.data}


def table(figures: Sequence[Figure]) -> str:
    """The figures as one plain-text table, then the notes."""
    head = ("figure", "median", "measured", "target")
    rows = [(f.title, f.value, f.runs,
             f"{f.target} {'' if f.met is None else 'ok' if f.met else 'MISSED'}".strip())
            for f in figures]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    notes = [f"  {f.title.split(' ', 1)[0]} {f.note}" for f in figures if f.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)
