"""A symbolic link in an inbox is rejected without its target ever being opened or written."""

from __future__ import annotations

import os
import threading
import time

from conftest import drop, order_md, sh, wait_until

from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.watcher import InboxWatcher


def _victims(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("my precious notes\n")
    victim.chmod(0o644)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    return victim, folder


def _rejected_links(ws):
    found = {}
    for rec in Store(ws.state).load_all().values():  # folders whose record is not written yet are skipped
        if rec.status == "rejected" and any("symbolic link" in e for e in rec.errors):
            found[rec.source] = rec
    return found


def test_links_already_in_the_inbox_at_start_are_rejected_and_their_targets_untouched(make_ws, tmp_path):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    victim, folder = _victims(tmp_path)
    inbox = ws.inbox("chip")
    os.symlink(victim, inbox / "notes.md")
    os.symlink(folder, inbox / "folder.md")
    os.symlink(tmp_path / "missing", inbox / "dangling.md")
    drop(ws, "chip", "real.md", order_md("A real order runs", id="real"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    assert victim.read_text() == "my precious notes\n"
    assert os.listdir(inbox) == []
    found = _rejected_links(ws)
    assert sorted(found) == ["inbox/chip/dangling.md", "inbox/chip/folder.md", "inbox/chip/notes.md"]
    assert str(victim) in found["inbox/chip/notes.md"].errors[0]
    assert Store(ws.state).load("real").status == "done"
    for rec in found.values():  # an empty file stands for the link in the order's folder
        originals = [p for p in Store(ws.state).folder(rec.id).iterdir() if p.name.startswith("original")]
        assert len(originals) == 1 and not originals[0].is_symlink() and originals[0].read_bytes() == b""


def test_a_link_dropped_into_a_live_supervisors_inbox_is_rejected_and_its_target_untouched(make_ws, tmp_path):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    victim, _ = _victims(tmp_path)
    stops = [0]
    with Supervisor(ws, watcher=InboxWatcher([ws.inbox("chip")], rescan_every=3600)) as sup:
        loop = threading.Thread(target=sup.run, kwargs={"should_stop": lambda: stops[0]}, daemon=True)
        loop.start()
        try:
            time.sleep(0.3)  # the watcher is on (and rescans only hourly): the link arrives as a hint
            os.symlink(victim, ws.inbox("chip") / "notes.md")
            wait_until(lambda: _rejected_links(ws), "the link rejected", timeout=30)
        finally:
            stops[0] = 2
            loop.join(30)
    assert victim.read_text() == "my precious notes\n"
    assert list(_rejected_links(ws)) == ["inbox/chip/notes.md"]


def test_a_link_claimed_before_a_crash_is_rejected_at_the_next_start_without_following_it(make_ws, tmp_path):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    victim, _ = _victims(tmp_path)
    claimed = ws.state / "intake" / "chip" / f"{time.time_ns():020d}-notes.md"
    claimed.parent.mkdir(parents=True)
    os.symlink(victim, claimed)  # the claim is one rename; the crash came right after it
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    assert victim.read_text() == "my precious notes\n"
    assert len(_rejected_links(ws)) == 1
    assert not claimed.exists() and not claimed.is_symlink()


def test_an_oversized_drop_is_rejected_with_its_real_size(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    drop(ws, "chip", "huge.md", order_md("Too big", id="huge") + "x" * (5 * 1024 * 1024))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    (rec,) = [Store(ws.state).load(p.name) for p in (ws.state / "orders").iterdir()]
    assert rec.status == "rejected"
    assert "is 5.0 MiB; a work order is at most 256 KiB" in rec.errors[0], rec.errors


def test_what_an_inbox_never_takes_in_is_said_once(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    (ws.inbox_root / "nobody").mkdir()
    (ws.inbox("chip") / "sub.md").mkdir()
    os.mkfifo(ws.inbox("chip") / "pipe.md")
    (ws.inbox("chip") / ".being-written.md").write_text("half")
    (ws.inbox("chip") / b"caf\xe9.d".decode("utf-8", "surrogateescape")).mkdir()
    said: list[str] = []
    every_look = InboxWatcher([ws.inbox("chip")], rescan_every=0)  # each step rescans all inboxes
    with Supervisor(ws, log=said.append, watcher=every_look) as sup:
        for _ in range(3):
            sup.step()  # each rescans: what one finds again is not said again
    assert sorted(s for s in said if s.startswith("WARNING: inbox/")) == [
        "WARNING: inbox/chip/caf\\xe9.d is a folder: only files are taken in",
        "WARNING: inbox/chip/pipe.md is not a regular file: only files are taken in",
        "WARNING: inbox/chip/sub.md is a folder: only files are taken in",
        "WARNING: inbox/nobody/ is the inbox of no agent in coordinator.yaml: nothing in it is taken in",
    ]
    assert (ws.inbox("chip") / ".being-written.md").read_text() == "half"


def test_an_inbox_folder_replaced_by_a_link_takes_nothing_from_where_it_points(make_ws, tmp_path):
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    elsewhere = tmp_path / "etc-like"
    elsewhere.mkdir()
    (elsewhere / "victim.conf").write_text("setting = 1\n")
    ws.inbox("chip").rmdir()
    os.symlink(elsewhere, ws.inbox("chip"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
    assert (elsewhere / "victim.conf").read_text() == "setting = 1\n"
    assert Store(ws.state).load_all() == {}


def test_a_fifo_socket_or_folder_claimed_before_a_crash_is_rejected_and_the_next_start_goes_on(make_ws,
                                                                                              monkeypatch):
    import socket

    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ran")}})
    intake = ws.state / "intake" / "chip"
    intake.mkdir(parents=True)
    os.mkfifo(intake / f"{time.time_ns():020d}-pipe.md")
    (intake / f"{time.time_ns():020d}-folder.md").mkdir()
    monkeypatch.chdir(intake)  # a socket's path must be short
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f"{time.time_ns():020d}-sock.md")
    sock.close()
    drop(ws, "chip", "real.md", order_md("A real order runs", id="real"))
    for _ in range(2):  # and a second start finds nothing left to trip on
        with Supervisor(ws) as sup:
            sup.run_once(limit=60)
    records = Store(ws.state).load_all()
    assert records["real"].status == "done"
    rejected = sorted(r.errors[0].split(": ", 1)[1] for r in records.values() if r.status == "rejected")
    assert rejected == ["is a folder; only files are work orders",
                        "is not a regular file (a FIFO, socket or device); only files are work orders",
                        "is not a regular file (a FIFO, socket or device); only files are work orders"]
    assert os.listdir(intake) == []
