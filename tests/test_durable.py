"""durable.write_bytes by way of spare files: a replaced file frees no inode, and a reader
still sees the old file or the new one, never half of one. Real files in a temp folder: the
swap is the kernel's (renameat2 RENAME_EXCHANGE)."""

from __future__ import annotations

import errno
import os

import pytest

from coordinator import durable


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


def test_a_reader_of_the_old_file_reads_it_whole_while_it_is_replaced_many_times(spared):
    root, _ = spared
    target, other = root / "record.json", root / "other.json"
    old = b"old " * 300
    durable.write_bytes(target, old, sync=False)
    durable.write_bytes(other, b"x", sync=False)
    with open(target, "rb") as reader:
        durable.write_bytes(target, b"new\n", sync=False)
        # Its inode is written over only after SPARE_FILES other replacements.
        for i in range(durable.SPARE_FILES - 1):
            durable.write_bytes(other, f"{i}\n".encode(), sync=False)
        assert reader.read() == old
    assert target.read_bytes() == b"new\n"


def test_the_spares_stay_as_many_however_often_files_are_replaced(spared):
    root, spares = spared
    for name in ("a", "b", "c"):
        durable.write_bytes(root / name, b"0", sync=False)
    for i in range(3 * durable.SPARE_FILES):
        durable.write_bytes(root / "abc"[i % 3], f"{i}".encode() * (i % 50 + 1), sync=False)
    assert len(list(spares.iterdir())) == durable.SPARE_FILES
    assert (root / "c").read_bytes() == f"{3 * durable.SPARE_FILES - 1}".encode() * ((3 * durable.SPARE_FILES - 1) % 50 + 1)


def test_a_shorter_version_leaves_nothing_of_the_longer_one(spared):
    root, _ = spared
    target = root / "record.json"
    for size in (5000, 100, 9000, 3):
        durable.write_bytes(target, b"y" * size, sync=False)
    for i in range(durable.SPARE_FILES + 2):  # every spare used at least once, longest first
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


def test_spares_of_an_earlier_run_are_used_again(spared, tmp_path):
    root, spares = spared
    for i in range(durable.SPARE_FILES + 5):
        durable.write_bytes(root / "r", str(i).encode(), sync=False)
    before = sorted(p.name for p in spares.iterdir())
    durable.spare_files(root, spares)  # a new start
    durable.write_bytes(root / "r", b"again", sync=False)
    assert sorted(p.name for p in spares.iterdir()) == before
    assert (root / "r").read_bytes() == b"again"


def test_a_file_system_that_cannot_swap_gets_its_files_written_as_before(spared, monkeypatch):
    # A stand-in for a file system without RENAME_EXCHANGE (some network ones): the kernel's
    # EINVAL, as renameat2 gives there.
    root, _ = spared

    def refuse(*args: object) -> int:
        import ctypes

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


def test_a_file_with_other_names_is_never_made_a_spare(spared, tmp_path):
    """A hard link a person keeps of an order they dropped shares the claimed file's inode:
    written over in place as a spare, their file would have changed under them."""
    root, spares = spared
    target, kept = root / "claimed.md", tmp_path / "mine.md"
    durable.write_bytes(target, b"the order as dropped\n", sync=False)
    os.link(target, kept)
    durable.write_bytes(target, b"a copy of its own\n", sync=False)
    for i in range(2 * durable.SPARE_FILES):
        durable.write_bytes(root / "other", f"{i}\n".encode(), sync=False)
    assert kept.read_bytes() == b"the order as dropped\n"
    assert target.read_bytes() == b"a copy of its own\n"
    assert os.stat(target).st_ino != os.stat(kept).st_ino


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
