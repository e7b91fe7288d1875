"""Intake under load: thousands of files dropped at once into a live supervisor, none lost.

The recipient is an orchestrator with no command, so every accepted order stays `queued` and
the test sees intake alone. "Live" means `Supervisor.run()` on its own thread with its pump
threads and the real inotify watcher, as `coordinator supervise` runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import order_md, wait_until

from coordinator.audit import StateRepo
from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.verify import verify
from coordinator.workspace import Workspace

WAIT = 120.0  # seconds; 3,000 files take a few on this machine




class Live:
    """A supervisor running on its own thread until stopped."""

    def __init__(self, ws: Workspace) -> None:
        self.said: list[str] = []
        self.sup = Supervisor(ws, log=self.said.append)
        self.stops = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def _run(self) -> None:
        try:
            self.sup.run(should_stop=lambda: self.stops)
        except BaseException as e:  # reported by stop(): a crash must fail the test
            self.error = e

    def start(self) -> Live:
        self.sup.open()
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stops = 1
        self.thread.join(WAIT)
        self.sup.close()
        assert not self.thread.is_alive(), "the supervisor did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def live() -> Iterator[Callable[[Workspace], Live]]:
    started: list[Live] = []

    def start(ws: Workspace) -> Live:
        lv = Live(ws).start()
        started.append(lv)
        return lv

    yield start
    for lv in started:
        if lv.thread.is_alive():
            lv.stops = 2
            lv.thread.join(WAIT)
            lv.sup.close()


def walt_only(make_ws: Callable[..., Workspace]) -> Workspace:
    return make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"]},
                    "chip": {"role": "specialist", "command": ["true"], "writes": ["webapp/src/**"]}},
                   orchestrator="walt", budget={"ceiling": 10**9, "bands": [10**9, 10**9 + 1, 10**9 + 2]})


def drop_at_once(ws: Workspace, n: int) -> dict[str, str]:
    """Write `n` orders aside, then rename them all into walt's inbox in one burst.

    Returns {file name: its text}.
    """
    aside = ws.root / "aside"
    aside.mkdir()
    texts = {}
    for i in range(n):
        name = f"load-{i:05d}.md"
        texts[name] = order_md(f"Load order {i} is filed exactly once")
        (aside / name).write_text(texts[name], encoding="utf-8")
    inbox = ws.inbox("walt")
    for name in texts:
        os.rename(aside / name, inbox / name)
    return texts


def intake_files(ws: Workspace) -> list[Path]:
    return [p for p in (ws.state / "intake").rglob("*") if p.is_file()]


def assert_each_exactly_once(ws: Workspace, texts: dict[str, str]) -> None:
    recs = Store(ws.state).load_all()
    by_source = Counter(r.source for r in recs.values())
    wanted = {f"inbox/walt/{name}" for name in texts}
    assert set(by_source) == wanted
    assert max(by_source.values()) == 1
    assert {r.status for r in recs.values()} == {"queued"}
    assert all(not r.errors for r in recs.values())
    assert os.listdir(ws.inbox("walt")) == []
    assert intake_files(ws) == []
    originals = Counter()
    for rec in recs.values():
        (original,) = Store(ws.state).folder(rec.id).glob("original.*")
        name = rec.source.rsplit("/", 1)[1]
        assert original.read_text("utf-8") == texts[name]
        originals[name] += 1
    assert set(originals) == set(texts) and max(originals.values()) == 1
    # Every record's transition is committed, and nothing else is pending.
    assert StateRepo(ws.state).dirty() == []
    findings = verify(ws)
    assert findings == [], findings[:5]


def run_burst(ws: Workspace, live: Callable[[Workspace], Live], n: int) -> float:
    lv = live(ws)
    started = time.monotonic()
    texts = drop_at_once(ws, n)
    orders_dir = ws.state / "orders"
    wait_until(lambda: orders_dir.is_dir() and len(os.listdir(orders_dir)) >= n
               and not os.listdir(ws.inbox("walt")) and not intake_files(ws),
               f"{n} files to be filed", timeout=WAIT)
    took = time.monotonic() - started
    watcher = lv.sup.watcher
    print(f"inotify overflows seen: {getattr(watcher, 'overflows', '?')}, "
          f"watcher restarts: {getattr(watcher, 'restarts', '?')}")
    lv.stop()
    assert len(os.listdir(orders_dir)) == n
    assert_each_exactly_once(ws, texts)
    return took


@pytest.mark.slow  # 2-3 s: `make test-slow`, and CI, run it
def test_3000_files_dropped_at_once_each_end_with_one_record(make_ws, live):
    ws = walt_only(make_ws)
    took = run_burst(ws, live, 3000)
    print(f"3,000 files filed in {took:.1f}s ({3000 / took:.0f}/s)")


@pytest.mark.slow
def test_20000_files_dropped_at_once_each_end_with_one_record(make_ws, live):
    """More events than the kernel's inotify queue holds (16,384 by default): the overflow
    costs a rescan, never a file."""
    ws = walt_only(make_ws)
    took = run_burst(ws, live, 20_000)
    print(f"20,000 files filed in {took:.1f}s ({20_000 / took:.0f}/s)")


SLOW_WRITER = r"""
import sys, time
path, text = sys.argv[1], sys.argv[2]
with open(path, "w", encoding="utf-8") as f:
    for line in text.splitlines(keepends=True):
        f.write(line)
        f.flush()
        time.sleep(0.1)
"""


def test_a_file_written_slowly_in_place_is_read_only_when_complete(make_ws, live):
    """A writer that keeps the file open in the inbox and adds a line every 100 ms: the
    supervisor waits until it is closed, then files the whole order (no half-read rejection)."""
    ws = walt_only(make_ws)
    lv = live(ws)
    text = order_md("Written slowly in place", id="slow")
    path = ws.inbox("walt") / "slow.md"
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(path), text])
    try:
        assert writer.wait(60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    wait_until(lambda: Store(ws.state).exists("slow") and (Store(ws.state).folder("slow")
                                                          / "record.json").exists(),
               "slow.md to be filed", timeout=WAIT)
    lv.stop()
    recs = Store(ws.state).load_all()
    assert list(recs) == ["slow"], [(r.id, r.status, r.errors) for r in recs.values()]
    assert recs["slow"].status == "queued" and recs["slow"].errors == []
    assert (Store(ws.state).folder("slow") / "original.md").read_text("utf-8") == text
    assert os.listdir(ws.inbox("walt")) == []
