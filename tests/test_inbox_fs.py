"""The workspace's file system surprising a running supervisor: sync and download tools,
inboxes that move, files that change under it. Real folders, real processes, real mounts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import drop, order_md, sh

from coordinator import signals
from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.watcher import InboxWatcher

COORDINATOR = Path(sys.executable).with_name("coordinator")


@pytest.mark.parametrize("temp", ["a.md.3f2a9c1b.partial", "a.md.part", "a.md.crdownload", "a.md.filepart",
                                  "a.md.!sync", "a.md.PART"])
def test_a_file_a_sync_tool_is_still_writing_under_a_temp_name_is_left_for_it_to_rename(make_ws, temp):
    """rclone, a browser or a sync client writes the whole file under a temp name, closes it
    (the watcher hears that at once), then renames it: the temp name is never taken in (it
    was rejected for its suffix and the tool's rename failed: the order was lost)."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    inbox = ws.inbox("chip")
    (inbox / temp).write_text(order_md("A synced order runs", id="a"))
    every_look = InboxWatcher([inbox], rescan_every=0)  # each step rescans: it is seen at once
    with Supervisor(ws, watcher=every_look) as sup:
        for _ in range(3):
            sup.step()
        assert os.listdir(inbox) == [temp] and Store(ws.state).load_all() == {}
        os.rename(inbox / temp, inbox / "a.md")  # the tool finishes
        sup.run_once(limit=60)
    recs = Store(ws.state).load_all()
    assert {oid: (r.status, r.source) for oid, r in recs.items()} == {"a": ("done", "inbox/chip/a.md")}


@pytest.mark.parametrize("stamp", ["2038-01-01", "1970-01-02"])
def test_a_file_whose_mtime_is_in_the_future_or_the_past_is_taken_in_when_polling(make_ws, tmp_path, stamp):
    """`cp -p` or `rsync -t` of a file from a machine whose clock runs ahead: with --poll (a
    quiet period decides) it stayed in the inbox, unsaid, until that date, and `--once`
    never ended."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    made = tmp_path / "a.md"
    made.write_text(order_md("A copied order runs", id="a"))
    subprocess.run(["touch", "-d", stamp, str(made)], check=True)
    subprocess.run(["cp", "-p", str(made), str(ws.inbox("chip") / "a.md")], check=True)
    start = time.monotonic()
    with Supervisor(ws, poll=True) as sup:
        sup.run_once(limit=20)
    assert time.monotonic() - start < 15
    assert Store(ws.state).load("a").status == "done"
    assert os.listdir(ws.inbox("chip")) == []


def test_an_order_dropped_as_a_hard_link_is_not_changed_by_edits_of_the_other_name(make_ws, tmp_path):
    """`ln` (or a backup or sync tool's link) into an inbox: the person's own file, edited
    afterwards, changed the order's original in state/ through the link, and the next start
    called it a hand edit of state/ (a `silent` signal) and put it back."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    mine = tmp_path / "mine.md"
    text = order_md("A linked order runs", id="a")
    mine.write_text(text)
    os.link(mine, ws.inbox("chip") / "a.md")
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    assert Store(ws.state).load("a").status == "done"
    with mine.open("a") as f:
        f.write("- my own notes, later\n")
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        sup.run_once(limit=30)
    assert [s for s in signals.load(ws.state) if s.kind == "silent"] == [], said
    (original,) = Store(ws.state).folder("a").glob("original.*")
    assert original.read_text() == text and original.stat().st_nlink == 1


def _without_root_powers() -> list[str]:
    """A command prefix under which root, too, is refused another's unreadable file."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to run the supervisor as root without the power to read any file")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_a_file_the_supervisor_may_not_read_is_said_once_and_supervise_once_ends(make_ws):
    """A file dropped by another user with mode 0600 stayed in the inbox without a word, was
    looked at five times a second, and `supervise --once` never ended."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    secret = ws.inbox("chip") / "a.md"
    secret.write_text(order_md("An unreadable order waits", id="a"))
    secret.chmod(0)
    once = [*_without_root_powers(), str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"]
    kept = subprocess.run(once, capture_output=True, text=True, timeout=30)
    assert kept.returncode == 0, kept.stderr
    said = [line.split(" ", 1)[1] for line in kept.stderr.splitlines() if "inbox/chip/a.md" in line]
    assert said == ["WARNING: inbox/chip/a.md cannot be taken in (Permission denied); it stays in the "
                    "inbox and is tried again at the next rescan"], kept.stderr
    assert os.listdir(ws.inbox("chip")) == ["a.md"] and Store(ws.state).load_all() == {}
    secret.chmod(0o644)
    assert subprocess.run(once, capture_output=True, text=True, timeout=60).returncode == 0
    assert Store(ws.state).load("a").status == "done" and os.listdir(ws.inbox("chip")) == []


def test_an_inbox_folder_the_supervisor_may_not_read_is_said_and_the_others_go_on(make_ws):
    """chip's inbox made unreadable (by hand, by a sync tool resetting modes) stopped the
    supervisor: every other agent's work stopped with it."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")},
                  "rex": {"role": "specialist", "command": sh("echo ran")}})
    drop(ws, "chip", "a.md", order_md("An order in a closed inbox waits", id="a"))
    drop(ws, "rex", "b.md", order_md("An order in an open inbox runs", id="b"))
    ws.inbox("chip").chmod(0)
    try:
        once = [*_without_root_powers(), str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"]
        done = subprocess.run(once, capture_output=True, text=True, timeout=30)
    finally:
        ws.inbox("chip").chmod(0o755)
    assert done.returncode == 0, done.stderr
    said = [line.split(" ", 1)[1] for line in done.stderr.splitlines() if "inbox/chip" in line]
    assert said == ["WARNING: inbox/chip cannot be read (Permission denied): nothing in it is taken in until "
                    "the supervisor's user may read it"], done.stderr
    assert {oid: r.status for oid, r in Store(ws.state).load_all().items()} == {"b": "done"}
    assert os.listdir(ws.inbox("chip")) == ["a.md"]


@pytest.fixture
def shared_inbox(tmp_path):
    """One tmpfs folder mounted as inbox/chip of two workspaces: no rename reaches state/."""
    shared = tmp_path / "shared"
    shared.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(shared)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    mounted: list[Path] = [shared]
    try:
        yield shared, mounted
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)


def test_two_workspaces_sharing_an_inbox_on_another_file_system_take_each_order_once(tmp_path, shared_inbox):
    """Claimed by copy (no rename reaches state/), a file both supervisors saw was copied by
    both: the order was filed, and ran, in both workspaces."""
    from bench.harness import make_workspace

    shared, mounted = shared_inbox
    spaces = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        ws = make_workspace(tmp_path / name, {"chip": {"role": "specialist", "command": sh("echo ran")}})
        subprocess.run(["mount", "--bind", str(shared), str(ws.inbox("chip"))], check=True)
        mounted.append(ws.inbox("chip"))
        spaces.append(ws)
    ids = [f"o{i}" for i in range(150)]
    for oid in ids:
        drop(spaces[0], "chip", f"{oid}.md", order_md(f"Order {oid} runs once", id=oid))
    runs = [subprocess.Popen([str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for ws in spaces]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0 and "Traceback" not in err, err
    filed = [oid for ws in spaces for oid in Store(ws.state).load_all()]
    assert sorted(filed) == sorted(ids)
    assert os.listdir(shared) == []


def test_an_inbox_folder_replaced_by_a_file_while_the_supervisor_runs_is_said_once(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    said: list[str] = []
    every_look = InboxWatcher([ws.inbox("chip")], rescan_every=0)  # each step rescans all inboxes
    with Supervisor(ws, log=said.append, watcher=every_look) as sup:
        sup.step()
        ws.inbox("chip").rmdir()
        ws.inbox("chip").write_text(order_md("Copied over the inbox itself", id="a"))
        for _ in range(3):
            sup.step()
    assert [s for s in said if "inbox/chip" in s] == [
        "WARNING: inbox/chip is not a folder: nothing is taken in for chip; replace it with a folder"]


def _hold_open_for_writing(path: Path, text: str) -> subprocess.Popen[bytes]:
    """A process that wrote `path` whole and keeps it open for writing (an editor, a tool that
    never closes): until it ends the supervisor may not read it as finished."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "f = open(sys.argv[1], 'w'); f.write(sys.argv[2]); f.flush()\n"
                               "print('held', flush=True); time.sleep(120)", str(path), text],
                              stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    return holder


def test_supervise_once_leaves_a_file_held_open_for_writing_and_says_so(make_ws, monkeypatch):
    """`supervise --once` waited without end, and without a word, for a file another process
    kept open for writing; the live loop never said why the order did not arrive."""
    from coordinator import arrivals

    monkeypatch.setattr(arrivals, "HELD_WARN", 0.5)
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    held = ws.inbox("chip") / "a.md"
    holder = _hold_open_for_writing(held, order_md("An order still held open waits", id="a"))
    try:
        said: list[str] = []
        with Supervisor(ws, log=said.append) as sup:
            sup.run_once(limit=30)
        assert [line for line in said if "inbox/chip/a.md" in line] == [
            "WARNING: inbox/chip/a.md is still being written after 0.5s (a process keeps it open for writing); "
            "it stays in the inbox for the next run"]
        assert os.listdir(ws.inbox("chip")) == ["a.md"] and Store(ws.state).load_all() == {}
        # The live loop says it once, waits, and takes the file in when its writer closes it.
        said.clear()
        with Supervisor(ws, log=said.append) as sup:
            deadline = time.monotonic() + 10
            while not any("is still being written" in line for line in said) and time.monotonic() < deadline:
                sup.step()
                sup._wait(0.05)
            holder.kill()
            holder.wait()
            while "a" not in sup.records and time.monotonic() < deadline + 10:
                sup.step()
                sup._wait(0.05)
        assert [line for line in said if "still being written" in line] == [
            "WARNING: inbox/chip/a.md is still being written after 0.5s (a process keeps it open for writing); "
            "it is taken in once that process closes it"]
        assert "a" in Store(ws.state).load_all() and os.listdir(ws.inbox("chip")) == []
    finally:
        holder.kill()
        holder.wait()
