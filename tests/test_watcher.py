"""Inbox watching: real folders, real watchdog threads, real writer processes."""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator import watcher as watcher_mod
from coordinator.inboxfiles import Quiet, is_candidate, scan, settled
from coordinator.watcher import InboxWatcher, NullWatcher, Watcher

DEADLINE = 20.0  # seconds a test waits for something that normally takes a fraction of one
MANY = 20_000
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox" / "coder"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def start_watcher() -> Iterator[Callable[..., InboxWatcher]]:
    started: list[InboxWatcher] = []

    def start(folders: list[Path], **kwargs: object) -> InboxWatcher:
        w = InboxWatcher(folders, **kwargs)  # type: ignore[arg-type]
        w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


class Seen:
    """What a supervisor loop would have found: hinted names, and hints plus rescans."""

    def __init__(self) -> None:
        self.hinted: set[str] = set()
        self.found: set[str] = set()
        self.rescans = 0


def collect(
    w: InboxWatcher,
    folders: list[Path],
    done: Callable[[Seen], bool],
    seen: Seen | None = None,
) -> Seen:
    """Run the supervisor's intake loop (wait, drain, rescan when told) until `done`."""
    seen = seen or Seen()
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        w.wait(0.5)
        hints, rescan = w.drain()
        seen.hinted |= {p.name for p in hints}
        seen.found |= {p.name for p in hints}
        if rescan:
            seen.rescans += 1
            for folder in folders:
                seen.found |= {p.name for p in scan(folder)}
        if done(seen):
            return seen
    raise AssertionError(f"gave up after {DEADLINE}s: {len(seen.found)} found")


def drop(folder: Path, name: str, text: str = "{}\n") -> Path:
    """The way `coordinator send` writes: a dot-file, then a rename."""
    tmp = folder / f".{name}.tmp"
    tmp.write_text(text)
    target = folder / name
    os.rename(tmp, target)
    return target


# -- names and folders ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", [".hidden.json", "order.json~", "order.swp", ".#order.json", "order.tmp", "4913", "#a#"]
)
def test_dot_and_editor_temp_files_are_not_candidates(name: str) -> None:
    assert not is_candidate(name)


@pytest.mark.parametrize("name", ["order.json", "WO-0042.yaml", "fix login", "4914"])
def test_ordinary_names_are_candidates(name: str) -> None:
    assert is_candidate(name)


def test_scan_lists_plain_files_and_links_oldest_first_and_skips_the_rest(inbox: Path) -> None:
    for name, age in [("new.json", 10), ("old.json", 300), ("mid.json", 60)]:
        (inbox / name).write_text("{}")
        t = time.time() - age
        os.utime(inbox / name, (t, t))
    (inbox / ".hidden.json").write_text("{}")
    (inbox / "sub").mkdir()
    (inbox / "link.json").symlink_to(inbox / "old.json")  # listed by its own age: the intake rejects it
    assert [p.name for p in scan(inbox)] == ["old.json", "mid.json", "new.json", "link.json"]
    assert scan(inbox / "missing") == []


# -- hints ------------------------------------------------------------------------------------------
def test_file_renamed_in_is_hinted_and_settled_at_once(
    inbox: Path, tmp_path: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    w = start_watcher([inbox])
    assert w.kind == "inotify"
    assert w.drain()[1], "the first drain asks for a rescan"
    order = drop(inbox, "order.json")
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    os.rename(outside, inbox / "moved-in.json")

    seen = collect(w, [inbox], lambda s: {"order.json", "moved-in.json"} <= s.hinted)
    assert seen.hinted == {"order.json", "moved-in.json"}
    assert settled(order)


def test_dot_files_temp_files_and_subfolders_are_ignored(
    inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    w = start_watcher([inbox])
    w.drain()
    for name in [".hidden.json", "notes.json~", "a.swp", ".#b.json", "c.tmp", "4913"]:
        (inbox / name).write_text("{}")
    (inbox / "sub").mkdir()
    (inbox / "sub" / "inner.json").write_text("{}")
    drop(inbox, "real.json")  # last: once it is hinted, the others had their chance

    seen = collect(w, [inbox], lambda s: "real.json" in s.hinted)
    assert seen.hinted == {"real.json"}
    assert scan(inbox) == [inbox / "real.json"]


WRITER = """
import sys, time
with open(sys.argv[1], "w") as f:
    for i in range(10):
        f.write(f"line {i}\\n")
        f.flush()
        time.sleep(0.1)
    print("written", flush=True)
    sys.stdin.readline()
print("closed", flush=True)
"""


def test_file_written_in_place_is_settled_only_after_its_writer_closes_it(
    inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    w = start_watcher([inbox])
    w.drain()
    path = inbox / "slow.json"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        collect(w, [inbox], lambda s: "slow.json" in s.hinted)  # hinted on create
        looks = 0
        while not select.select([writer.stdout], [], [], 0.05)[0]:
            assert not settled(path)
            looks += 1
        assert writer.stdout.readline() == "written\n"
        assert looks > 0
        # Unchanged for an hour or not: an open writer keeps it unsettled.
        now = [0.0]
        quiet = Quiet(clock=lambda: now[0])
        assert not settled(path, quiet=quiet)
        now[0] += 3600
        assert not settled(path, quiet=quiet)
        w.drain()

        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "closed\n"
        assert settled(path)
        collect(w, [inbox], lambda s: "slow.json" in s.hinted)  # hinted again on close
        assert path.read_text().count("\n") == 10
    finally:
        writer.kill()
        writer.wait()


def test_require_quiet_waits_for_a_quiet_period_but_never_past_a_writer(inbox: Path) -> None:
    now = [0.0]
    quiet = Quiet(1.0, clock=lambda: now[0])
    done = inbox / "done.json"
    done.write_text("{}")
    assert not settled(done, quiet=quiet, require_quiet=True)
    now[0] += 1.0
    assert settled(done, quiet=quiet, require_quiet=True)
    with (inbox / "open.json").open("w") as f:
        f.write("{")
        f.flush()
        assert not settled(inbox / "open.json", quiet=quiet, require_quiet=True)
        now[0] += 3600
        assert not settled(inbox / "open.json", quiet=quiet, require_quiet=True)
    assert not settled(inbox / "gone.json", quiet=quiet)
    (inbox / "link.json").symlink_to(done)
    now[0] += 3600
    assert not settled(inbox / "link.json", quiet=quiet)


def test_require_quiet_counts_the_quiet_period_from_the_last_change_this_process_saw(inbox: Path) -> None:
    """A file written in bursts from another machine (no lease sees that writer) is taken only
    once it stayed the same for the quiet period on the supervisor's own clock; its stamps,
    on a file server's clock that may run behind or ahead of this one, never decide."""
    now = [0.0]
    said: list[str] = []
    quiet = Quiet(1.0, clock=lambda: now[0], wall=lambda: time.time() - 3600, say=said.append)
    path = inbox / "slow.json"
    path.write_text("{")
    assert not settled(path, quiet=quiet, require_quiet=True)
    now[0] += 0.9
    with path.open("a") as f:
        f.write('"a": 1')
    assert not settled(path, quiet=quiet, require_quiet=True), "changed: the quiet period starts again"
    now[0] += 0.9
    assert not settled(path, quiet=quiet, require_quiet=True)
    now[0] += 0.1
    assert settled(path, quiet=quiet, require_quiet=True)
    assert len(said) == 1 and said[0].startswith("WARNING: inbox/coder/slow.json was changed 60 min ahead of "
                                                 "this machine's clock"), said
    assert len(quiet) == 0, "a file taken is forgotten"
    for i in range(50):
        settled(inbox / f"gone-{i}.json", quiet=quiet, require_quiet=True)
        (inbox / f"brief-{i}.json").write_text("{}")
        settled(inbox / f"brief-{i}.json", quiet=quiet, require_quiet=True)
        (inbox / f"brief-{i}.json").unlink()
        settled(inbox / f"brief-{i}.json", quiet=quiet, require_quiet=True)
    assert len(quiet) == 0, "files gone are forgotten"


# -- rescans ----------------------------------------------------------------------------------------
def test_rescan_is_asked_for_at_start_then_every_interval(
    inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    now = [1000.0]
    w = start_watcher([inbox], rescan_every=5.0, clock=lambda: now[0])
    assert w.drain() == (set(), True)
    assert w.drain() == (set(), False)
    now[0] += 4.9
    assert w.drain() == (set(), False)
    now[0] += 0.2
    assert w.drain() == (set(), True)
    assert w.wait(0) is False


def test_a_burst_of_files_is_followed_by_a_rescan(
    inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    w = start_watcher([inbox], rescan_every=3600.0)
    w.drain()
    for i in range(watcher_mod.BURST_EVENTS + 10):
        (inbox / f"b{i:05d}.json").write_text("{}")
    seen = collect(w, [inbox], lambda s: s.rescans > 0)
    assert w.overflows == 0, "the rescan came from the burst rule, not an overflow"
    assert len(seen.found) == watcher_mod.BURST_EVENTS + 10


def test_a_burst_of_temp_files_counts_toward_the_rescan_without_a_hint(
    inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    """Events of names that are never hinted stop in the inotify reader (watchdog's emitter and
    dispatch threads never see them), but are still activity: a burst of them is followed by a
    rescan, as any burst is."""
    w = start_watcher([inbox], rescan_every=3600.0)
    w.drain()
    dispatched: list[str] = []
    sink = w._handler._sink
    w._handler._sink = lambda event: (dispatched.append(os.fsdecode(event.src_path)), sink(event))[1]
    for i in range(watcher_mod.BURST_EVENTS // 2 + 10):  # two events each: created, closed
        (inbox / f".b{i:05d}.json.tmp").write_text("{}")
    seen = collect(w, [inbox], lambda s: s.rescans > 0)
    assert seen.hinted == set() and seen.found == set()
    assert w.overflows == 0, "the rescan came from the burst rule, not an overflow"
    if watcher_mod.HAS_INOTIFY_READER:
        assert [p for p in dispatched if os.path.basename(p).startswith(".b")] == []


def test_twenty_thousand_files_dropped_at_once_are_all_found_exactly(
    inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    w = start_watcher([inbox])
    w.drain()
    expected = {f"order-{i:05d}.json" for i in range(MANY)}
    make = "import os,sys\nfor i in range(int(sys.argv[2])):\n open(f'{sys.argv[1]}/order-{i:05d}.json','w').close()\n"
    subprocess.run([sys.executable, "-c", make, str(inbox), str(MANY)], check=True)

    # Hints still in flight when a rescan already found everything are waited for: unless the
    # watcher reported an overflow, every file must also have been hinted.
    seen = collect(
        w, [inbox], lambda s: s.found >= expected and (s.hinted >= expected or w.overflows > 0)
    )
    assert seen.found == expected
    assert seen.hinted <= expected


OBSERVED = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from coordinator.inboxfiles import scan
from coordinator.watcher import InboxWatcher
inbox, count = Path(sys.argv[1]), int(sys.argv[2])
w = InboxWatcher([inbox], rescan_every=3600.0)
w.start()
w.drain()
print("ready", flush=True)
sys.stdin.readline()
hinted, found, rescans = set(), set(), 0
while len(found) < count:
    w.wait(0.5)
    hints, rescan = w.drain()
    hinted |= {p.name for p in hints}
    found |= {p.name for p in hints}
    if rescan:
        rescans += 1
        found |= {p.name for p in scan(inbox)}
w.stop()
print(json.dumps({"hinted": len(hinted), "found": sorted(found), "overflows": w.overflows,
                  "rescans": rescans}), flush=True)
"""


def test_an_inotify_overflow_loses_no_file(inbox: Path) -> None:
    # A supervisor that is frozen while 20,000 files arrive: the kernel queue (16384 events)
    # overflows for certain, and watchdog drops what it had pending.
    child = subprocess.Popen(
        [sys.executable, "-c", OBSERVED, str(inbox), str(MANY), str(REPO)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        os.kill(child.pid, signal.SIGSTOP)
        try:
            for i in range(MANY):
                (inbox / f"order-{i:05d}.json").write_bytes(b"{}")
        finally:
            os.kill(child.pid, signal.SIGCONT)
        child.stdin.write("go\n")
        child.stdin.flush()
        out, _ = child.communicate(timeout=3 * DEADLINE)
    finally:
        child.kill()
        child.wait()
    report = json.loads(out)
    assert report["overflows"] >= 1
    assert report["hinted"] < MANY, "events were lost: the rescan did the work"
    assert report["found"] == sorted(f"order-{i:05d}.json" for i in range(MANY))


# -- a watcher that dies comes back -------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["observer", "reader"])
def test_a_killed_watcher_thread_is_restarted_with_a_rescan(
    victim: str, inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    w = start_watcher([inbox], rescan_every=3600.0)
    w.drain()
    old = w.observer
    assert old is not None
    thread = old if victim == "observer" else old.reader  # type: ignore[attr-defined]
    thread.stop()  # behind the watcher's back
    thread.join()
    drop(inbox, "while-dead.json")  # nobody is listening now

    assert w.wait(DEADLINE)
    hints, rescan = w.drain()
    assert rescan and w.restarts == 1
    assert w.observer is not old and w.observer is not None and w.observer.is_alive()
    assert scan(inbox) == [inbox / "while-dead.json"]
    drop(inbox, "after.json")
    collect(w, [inbox], lambda s: "after.json" in s.hinted)


def test_a_watcher_that_cannot_be_restarted_rescans_meanwhile_and_retries(
    inbox: Path, start_watcher: Callable[..., InboxWatcher], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The observer dies while the system's inotify instances are used up: no caller gets the
    error (the pump thread would end, the loop would stop), the inboxes are rescanned meanwhile,
    it is said once, and the restart is tried again until it works."""
    monkeypatch.setattr(watcher_mod, "RETRY_EVERY", 0.2)
    w = start_watcher([inbox], rescan_every=0.3)
    w.drain()
    real_new = w._new_observer
    refusals = [0]

    def refused() -> object:  # what _new_observer raises when inotify_init1 fails with EMFILE
        refusals[0] += 1
        raise watcher_mod._limit_error(OSError(errno.EMFILE, os.strerror(errno.EMFILE)), None)

    monkeypatch.setattr(w, "_new_observer", refused)
    old = w.observer
    assert old is not None
    old.stop()  # behind the watcher's back
    old.join()
    drop(inbox, "while-dead.json")
    seen = collect(w, [inbox], lambda s: "while-dead.json" in s.found and refusals[0] >= 3)
    assert "while-dead.json" not in seen.hinted  # found by the rescans alone
    assert w.broken is not None and "inotify instance limit" in w.broken
    said = [r.getMessage() for r in caplog.records if "instance limit" in r.getMessage()]
    assert len(said) == 1 and "rescanned every 0.3 s" in said[0]

    monkeypatch.setattr(w, "_new_observer", real_new)  # the limit was raised
    collect(w, [inbox], lambda s: w.broken is None)
    assert w.observer is not None and w.observer.is_alive()
    drop(inbox, "after.json")
    collect(w, [inbox], lambda s: "after.json" in s.hinted)
    assert any("watches every inbox again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("looked", ["after", "before"])
def test_a_health_check_while_the_observer_is_being_stopped_restarts_it(
    looked: str, inbox: Path, start_watcher: Callable[..., InboxWatcher],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Someone stops the observer (a fault-injection test does) while the loop drains.
    `stop()` stops the emitters and closes the reader's inotify fd before the observer's
    thread ends: the loop found the folder unwatched on an observer that looked alive, watched
    it again on the closed fd, and died of "cannot watch the inbox: Bad file descriptor".
    `looked`: whether the health check saw the observer after the stop began, or just before."""
    w = start_watcher([inbox], rescan_every=3600.0)
    w.drain()
    old = w.observer
    assert old is not None
    reader = old.reader  # type: ignore[attr-defined]
    fd_closed, release = threading.Event(), threading.Event()
    close_resources = reader._close_resources

    def held_close() -> None:  # the reader thread closes its fds, then is held before it ends
        close_resources()
        fd_closed.set()
        release.wait(DEADLINE)

    reader._close_resources = held_close
    # Stopped while the reader waits in its read, the reader closes the fds itself (and is held
    # alive there); stopped between two reads, the stopping thread would close them instead.
    deadline = time.monotonic() + DEADLINE
    while not reader._is_reading and time.monotonic() < deadline:
        time.sleep(0.005)
    stopper = threading.Thread(target=old.stop, daemon=True)  # behind the watcher's back
    stopper.start()
    try:
        # The moment the loop must not be fooled by: the fd is closed and the observer (nearly
        # always) still looks alive. Not asserted: under load its thread can end first, and the
        # restart below must happen all the same.
        assert fd_closed.wait(DEADLINE)
        if looked == "before":
            alive, seen = watcher_mod._alive, [True]
            monkeypatch.setattr(watcher_mod, "_alive", lambda o: seen.pop() if seen else alive(o))
        threading.Timer(0.2, release.set).start()  # the restart waits for the old reader (bounded)
        hints, rescan = w.drain()
    finally:
        release.set()
        stopper.join(DEADLINE)
    assert rescan and w.restarts == 1
    assert w.observer is not old and w.observer is not None and w.observer.is_alive()
    drop(inbox, "after.json")
    collect(w, [inbox], lambda s: "after.json" in s.hinted)


class _ChangingSet(set):  # type: ignore[type-arg]
    """watchdog's set of emitters as another thread stops the observer while it is read."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("Set changed size during iteration")


def test_a_health_check_racing_an_observer_that_is_being_stopped_does_not_raise(
    inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    """The loop's drain and the wake thread's wait both check the observer's health; one of
    them reading its emitters while it stops must not take the supervisor loop down."""
    w = start_watcher([inbox], rescan_every=3600.0)
    w.drain()
    observer = w.observer
    assert observer is not None
    real = observer._emitters  # type: ignore[attr-defined]
    observer._emitters = _ChangingSet(real)  # type: ignore[attr-defined]
    w.drain()
    w.wait(0.0)
    observer._emitters = real  # type: ignore[attr-defined]
    drop(inbox, "after.json")
    collect(w, [inbox], lambda s: "after.json" in s.hinted)


def test_an_inbox_removed_and_recreated_is_watched_again(
    inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    w = start_watcher([inbox], rescan_every=3600.0)
    w.drain()
    shutil.rmtree(inbox)
    inbox.mkdir()
    drop(inbox, "first.json")
    collect(w, [inbox], lambda s: "first.json" in s.found)
    drop(inbox, "second.json")
    collect(w, [inbox], lambda s: "second.json" in s.hinted)
    assert w.restarts == 0


def test_an_added_inbox_is_rescanned_and_watched(
    tmp_path: Path, inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    w = start_watcher([inbox], rescan_every=3600.0)
    w.drain()
    reviewer = tmp_path / "inbox" / "reviewer"
    reviewer.mkdir()
    (reviewer / "waiting.json").write_text("{}")
    w.add_folder(reviewer)
    hints, rescan = w.drain()
    assert rescan and scan(reviewer) == [reviewer / "waiting.json"]
    drop(reviewer, "new.json")
    seen = collect(w, [inbox, reviewer], lambda s: "new.json" in s.hinted)
    assert seen.hinted == {"new.json"}


# -- polling (network file systems) -------------------------------------------------------------------
def test_polling_mode_hints_renamed_and_written_files(
    inbox: Path, start_watcher: Callable[..., InboxWatcher]
) -> None:
    w = start_watcher([inbox], polling=True, poll_every=0.05)
    assert w.kind == "polling"
    assert w.drain()[1]
    drop(inbox, "renamed.json")
    (inbox / "written.json").write_text("{}")
    (inbox / ".hidden.json").write_text("{}")
    seen = collect(w, [inbox], lambda s: {"renamed.json", "written.json"} <= s.hinted)
    assert seen.hinted == {"renamed.json", "written.json"}


def test_the_null_watcher_sees_nothing_even_when_files_arrive(inbox: Path) -> None:
    w: Watcher = NullWatcher()
    w.start()
    w.add_folder(inbox)
    drop(inbox, "order.json")
    assert w.wait(0) is False
    assert w.drain() == (set(), False)
    w.stop()
