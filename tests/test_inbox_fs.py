"""The workspace's file system surprising a running supervisor: sync and download tools,
inboxes that move, files that change under it. Real folders, real processes, real mounts."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import order_md, sh

from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.watcher import InboxWatcher


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
