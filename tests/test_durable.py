"""durable.write_bytes by way of spare files: a replaced file frees no inode, a reader still
sees the old file or the new one, never half of one, and nothing but a spare is ever written
over. Real files in temp folders (the swap is the kernel's renameat2 RENAME_EXCHANGE), and real
ext4 file systems in loop-mounted images where a test needs one."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import drop, order_md

from bench.harness import make_workspace
from coordinator import durable
from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.verify import verify


@pytest.fixture
def spared(tmp_path):
    """A root whose replaced files go by way of spare files in `tmp_path/spares`."""
    root, spares = tmp_path / "state", tmp_path / "spares"
    root.mkdir()
    durable.spare_files(root, spares)
    if not durable._pools:
        pytest.fail("this system cannot swap files (no renameat2): the spare files are never used")
    yield root, spares
    durable.spare_files(root, None)


@pytest.fixture
def no_wait(monkeypatch):
    """Spares written over as soon as SPARE_FILES newer ones are there (not a second later)."""
    monkeypatch.setattr(durable, "SPARE_AGE", 0.0)


@contextlib.contextmanager
def ext4(base: Path, *, journal: bool) -> Iterator[Path]:
    """A small ext4 file system (with or without a journal) mounted at `base/mnt`."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("making and mounting an ext4 image needs root and mkfs.ext4")
    image, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", *(() if journal else ("-O", "^has_journal")), str(image)],
                   check=True, capture_output=True)
    proc = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot loop-mount an image here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_replaced_file_holds_the_new_bytes_and_its_old_inode_becomes_a_spare(spared):
    root, spares = spared
    target = root / "record.json"
    durable.write_bytes(target, b"first\n", sync=False)
    first = os.stat(target).st_ino
    durable.write_bytes(target, b"second\n", sync=False)
    assert target.read_bytes() == b"second\n"
    assert os.stat(target).st_ino != first
    kept = {os.stat(p).st_ino: p.read_bytes() for p in spares.iterdir()}
    assert kept == {first: b"first\n"}  # not freed: the old version is the spare now
    assert sorted(p.name for p in root.iterdir()) == ["record.json"]  # no temp file left beside it


def test_a_file_written_for_the_first_time_takes_no_spare(spared):
    root, spares = spared
    durable.write_bytes(root / "new.json", b"{}\n", sync=False)
    assert (root / "new.json").read_bytes() == b"{}\n"
    assert list(spares.iterdir()) == []


def test_a_reader_of_the_old_file_reads_it_whole_however_many_replacements_follow_at_once(spared):
    root, spares = spared
    target, other = root / "record.json", root / "other.json"
    old = b"old " * 300
    durable.write_bytes(target, old, sync=False)
    durable.write_bytes(other, b"x", sync=False)
    with open(target, "rb") as reader:
        durable.write_bytes(target, b"new\n", sync=False)
        for i in range(3 * durable.SPARE_FILES):  # within a second: none is written over yet
            durable.write_bytes(other, f"{i}\n".encode(), sync=False)
        assert reader.read() == old
    assert target.read_bytes() == b"new\n"
    assert len(list(spares.iterdir())) == 3 * durable.SPARE_FILES + 1  # grown instead


def test_a_spare_is_written_over_once_it_has_been_one_for_a_while(spared, monkeypatch):
    root, spares = spared
    monkeypatch.setattr(durable, "SPARE_AGE", 0.2)
    for i in range(durable.SPARE_FILES + 1):
        durable.write_bytes(root / "r", f"{i}".encode(), sync=False)
    made = len(list(spares.iterdir()))
    durable.write_bytes(root / "r", b"soon", sync=False)
    assert len(list(spares.iterdir())) == made + 1  # the oldest spare is too young
    time.sleep(0.3)
    durable.write_bytes(root / "r", b"later", sync=False)
    assert len(list(spares.iterdir())) == made + 1  # now one is written over
    assert (root / "r").read_bytes() == b"later"


def test_the_spares_stay_as_many_however_often_files_are_replaced(spared, no_wait):
    root, spares = spared
    for name in ("a", "b", "c"):
        durable.write_bytes(root / name, b"0", sync=False)
    for i in range(3 * durable.SPARE_FILES):
        durable.write_bytes(root / "abc"[i % 3], f"{i}".encode() * (i % 50 + 1), sync=False)
    assert len(list(spares.iterdir())) == durable.SPARE_FILES
    last = 3 * durable.SPARE_FILES - 1
    assert (root / "c").read_bytes() == f"{last}".encode() * (last % 50 + 1)


def test_a_shorter_version_leaves_nothing_of_the_longer_one(spared, no_wait):
    root, _ = spared
    target = root / "record.json"
    for size in (5000, 100, 9000, 3):
        durable.write_bytes(target, b"y" * size, sync=False)
    for i in range(durable.SPARE_FILES + 2):  # every spare written over at least once
        durable.write_bytes(target, b"z" * (10 - i % 10), sync=True)
    assert target.read_bytes() == b"z" * (10 - (durable.SPARE_FILES + 1) % 10)


def test_a_link_or_folder_in_a_files_place_is_handled_as_a_rename_would(spared, tmp_path):
    root, spares = spared
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"untouched")
    link = root / "linked.json"
    link.symlink_to(outside)
    durable.write_bytes(link, b"file now", sync=False)
    assert not link.is_symlink() and link.read_bytes() == b"file now"
    assert outside.read_bytes() == b"untouched"
    (root / "folder.json").mkdir()
    with pytest.raises(IsADirectoryError):
        durable.write_bytes(root / "folder.json", b"x", sync=False)
    assert (root / "folder.json").is_dir()
    assert list(spares.iterdir()) == []  # neither went by a spare


def test_a_folder_put_in_a_files_place_just_before_the_swap_goes_back_there(spared, monkeypatch):
    """Between the look at the target and the swap, a person makes a folder of that name (with
    a file in it): the swap would move it into the spares. It goes back, and the write fails as a
    rename over a folder does."""
    root, spares = spared
    target = root / "record.json"
    durable.write_bytes(target, b"one", sync=False)
    swap = durable._swap

    edited: list[bool] = []

    def after_a_hand_edit(src: str | Path, dst: str | Path) -> None:
        if not edited:  # once: the swap back is a plain one
            edited.append(True)
            os.unlink(dst)
            os.mkdir(dst)
            Path(dst, "theirs.txt").write_bytes(b"kept")
        swap(src, dst)

    monkeypatch.setattr(durable, "_swap", after_a_hand_edit)
    with pytest.raises(IsADirectoryError):
        durable.write_bytes(target, b"two", sync=False)
    assert (target / "theirs.txt").read_bytes() == b"kept"
    assert all(p.is_file() for p in spares.iterdir())


def test_a_file_with_other_names_is_never_made_a_spare(spared, tmp_path, no_wait):
    """A hard link a person keeps of an order they dropped shares the claimed file's inode:
    written over in place as a spare, their file would have changed under them."""
    root, _ = spared
    target, kept = root / "claimed.md", tmp_path / "mine.md"
    durable.write_bytes(target, b"the order as dropped\n", sync=False)
    os.link(target, kept)
    durable.write_bytes(target, b"a copy of its own\n", sync=False)
    for i in range(3 * durable.SPARE_FILES):
        durable.write_bytes(root / "other", f"{i}\n".encode(), sync=False)
    assert kept.read_bytes() == b"the order as dropped\n"
    assert target.read_bytes() == b"a copy of its own\n"


def test_a_name_made_for_a_file_just_before_its_swap_keeps_it_from_the_spares(spared, tmp_path, monkeypatch,
                                                                              no_wait):
    root, spares = spared
    target, kept = root / "record.json", tmp_path / "mine.json"
    durable.write_bytes(target, b"v1", sync=False)
    swap = durable._swap

    def linked_meanwhile(src: str | Path, dst: str | Path) -> None:
        if not kept.exists():
            os.link(dst, kept)
        swap(src, dst)

    monkeypatch.setattr(durable, "_swap", linked_meanwhile)
    durable.write_bytes(target, b"v2", sync=False)
    for i in range(3 * durable.SPARE_FILES):
        durable.write_bytes(target, f"v{i + 3}".encode(), sync=False)
    assert kept.read_bytes() == b"v1"
    assert os.stat(kept).st_nlink == 1  # the spares hold no name of it


def test_a_spare_with_a_second_name_is_never_written_over(tmp_path, no_wait):
    """On a file system without a journal a power loss can leave a swap half done: a spare's
    name and a live file naming one inode. Such a spare is left out, and its name goes."""
    root, spares, live = tmp_path / "state", tmp_path / "spares", tmp_path / "live.json"
    root.mkdir()
    spares.mkdir()
    for n in range(1, durable.SPARE_FILES + 1):
        (spares / str(n)).write_bytes(b"old")
    os.unlink(spares / "1")
    live.write_bytes(b"live record")
    os.link(live, spares / "1")
    durable.spare_files(root, spares)
    try:
        durable.write_bytes(root / "r", b"0", sync=False)
        for i in range(2 * durable.SPARE_FILES):
            durable.write_bytes(root / "r", f"{i}".encode(), sync=False)
    finally:
        durable.spare_files(root, None)
    assert live.read_bytes() == b"live record" and os.stat(live).st_nlink == 1


def test_after_a_restart_the_spare_swapped_out_last_is_written_over_last(spared, no_wait):
    root, spares = spared
    durable.write_bytes(root / "r", b"0", sync=False)
    for i in range(1, durable.SPARE_FILES + 1):  # spares 1 to SPARE_FILES made, one per replacement
        durable.write_bytes(root / "r", f"{i}".encode(), sync=False)
    time.sleep(0.05)  # change times a clock tick apart
    durable.write_bytes(root / "r", b"newest", sync=False)  # spare 1, the oldest, written over and swapped out
    assert (spares / "1").read_bytes() == f"{durable.SPARE_FILES}".encode()
    durable.spare_files(root, spares)  # a new start, with the spares of the last
    durable.write_bytes(root / "r", b"after the restart", sync=False)
    assert (spares / "1").read_bytes() == f"{durable.SPARE_FILES}".encode()  # not the first taken
    assert (root / "r").read_bytes() == b"after the restart"


def test_a_spare_given_a_second_name_while_it_waits_is_never_written_over(spared, tmp_path, no_wait):
    root, spares = spared
    for i in range(durable.SPARE_FILES + 1):
        durable.write_bytes(root / "r", f"{i}".encode(), sync=False)
    kept = tmp_path / "kept"
    os.link(spares / "1", kept)  # by hand, into the supervisor's own folder
    before = kept.read_bytes()
    for i in range(3 * durable.SPARE_FILES):
        durable.write_bytes(root / "r", f"again {i}".encode(), sync=False)
    assert kept.read_bytes() == before and os.stat(kept).st_nlink == 1


def test_a_journaled_swap_is_noted_as_what_it_left_there(spared):
    root, _ = spared
    target = root / "record.json"
    durable.open_journal(root)
    try:
        durable.write_bytes(target, b"one", sync=False)
        durable.take_journal(root)
        durable.write_bytes(target, b"two, longer", sync=False)
        wrote = durable.take_journal(root)[str(target)]
    finally:
        durable.close_journal(root)
    assert wrote is not None and wrote.data == b"two, longer"
    assert wrote.still(os.lstat(target))  # what a batch checks before it commits the bytes


def test_a_swapped_file_gets_the_mode_a_new_file_would(tmp_path):
    root, spares = tmp_path / "state", tmp_path / "spares"
    root.mkdir()
    old = os.umask(0o077)
    try:
        durable.spare_files(root, spares)
        durable.write_bytes(root / "r", b"1", sync=False)
        durable.write_bytes(root / "r", b"2", sync=False)
        durable.write_bytes(root / "new", b"3", sync=False)
    finally:
        os.umask(old)
        durable.spare_files(root, None)
    assert list(spares.iterdir())  # it went by a spare
    assert oct(os.stat(root / "r").st_mode & 0o777) == oct(os.stat(root / "new").st_mode & 0o777) == "0o600"


def test_no_spares_where_a_new_file_would_take_the_folders_group(tmp_path):
    root = tmp_path / "state"
    root.mkdir()
    os.chmod(root, os.stat(root).st_mode | stat.S_ISGID)
    durable.spare_files(root, tmp_path / "spares")
    assert not durable._pools


def test_a_file_system_that_cannot_swap_gets_its_files_written_as_before(spared, monkeypatch):
    # A stand-in for a file system without RENAME_EXCHANGE (some network ones): the kernel's
    # EINVAL, as renameat2 gives there.
    root, _ = spared

    def refuse(*args: object) -> int:
        import ctypes
        import errno

        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(durable, "_exchange_fn", refuse)
    target = root / "record.json"
    durable.write_bytes(target, b"one", sync=False)
    durable.write_bytes(target, b"two", sync=False)
    assert target.read_bytes() == b"two"
    assert not durable._pools  # asked no more
    durable.write_bytes(target, b"three", sync=False)
    assert target.read_bytes() == b"three"


def test_only_an_ext4_without_a_journal_is_taken_for_one_that_holds_freed_inodes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ext4(tmp_path / "a", journal=False) as bare, ext4(tmp_path / "b", journal=True) as journaled:
        assert durable.holds_freed_inodes(bare)
        assert not durable.holds_freed_inodes(journaled)
    assert not durable.holds_freed_inodes("/proc")


def test_a_supervisor_on_an_ext4_without_a_journal_replaces_records_by_way_of_spares(tmp_path):
    """Where freed inodes are costly: orders run as anywhere, their records are swapped in, no
    temp file is left, and `audit verify` finds state/ as the supervisor committed it."""
    with ext4(tmp_path, journal=False) as mnt:
        ws = make_workspace(mnt, {"chip": {"role": "specialist", "command": ["/bin/true"]}})
        ids = [f"sp-{i}" for i in range(6)]
        for oid in ids:
            drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} is done", id=oid))
        with Supervisor(ws) as sup:
            sup.run_once(limit=200)
        records = Store(ws.state).load_all()
        assert {oid: records[oid].status for oid in ids} == dict.fromkeys(ids, "done")
        assert list((ws.runtime / "spare-files").iterdir()), "the records were not swapped in"
        assert not list(ws.state.glob("orders/*/.tmp-*"))
        assert verify(ws) == []
