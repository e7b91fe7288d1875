"""Claims across file systems (an inbox folder that is a mount of its own): the file is hidden
under a name of the claim's own, copied, then removed; whatever happens, the order stays in
exactly one place. Real files on a real second file system (a tmpfs mounted on the inbox)."""

from __future__ import annotations

import os
from pathlib import Path

from coordinator import claims


def test_a_file_put_back_never_replaces_one_dropped_under_its_name_meanwhile(inbox_mount, monkeypatch):
    """A claim that cannot finish puts the hidden file back under its name. A person who drops
    a new file under that name just after the claim looked must keep it: a rename would have
    replaced it, and that order would be gone."""
    _, inbox = inbox_mount
    hidden = inbox / ".00000000000000000001-a.md.claim"
    hidden.write_text("the claimed order\n")
    path = inbox / "a.md"

    def dropped_just_before(move):  # the drop lands between whatever look and the move
        def moved(src, dst, *args, **kwargs):
            if Path(dst) == path and not os.path.lexists(path):
                path.write_text("a new order under the same name\n")
            return move(src, dst, *args, **kwargs)
        return moved

    monkeypatch.setattr(os, "rename", dropped_just_before(os.rename))
    monkeypatch.setattr(os, "link", dropped_just_before(os.link))
    claims._put_back(hidden, path)
    monkeypatch.undo()
    texts = sorted(p.read_text() for p in inbox.iterdir())
    assert texts == ["a new order under the same name\n", "the claimed order\n"]
    assert not hidden.exists()


def test_a_put_back_cut_short_by_a_crash_is_finished_once_not_doubled(inbox_mount):
    """kill -9 after the hidden file got its name back but before the hidden name went: both
    names are the same file. The next start must leave one name, not file the order twice."""
    _, inbox = inbox_mount
    hidden = inbox / ".00000000000000000001-a.md.claim"
    hidden.write_text("the claimed order\n")
    os.link(hidden, inbox / "a.md")
    claims._put_back(hidden, inbox / "a.md")
    assert [p.name for p in inbox.iterdir()] == ["a.md"]


def test_a_crash_after_the_file_was_swapped_and_hidden_puts_it_back_at_start(inbox_mount):
    """The file under the inbox name was replaced between the claim's look and its rename,
    and the supervisor died before it noted the new file: the note names the first file. The
    hidden file is still the inbox's only copy of that order; the next start gives it back
    its name instead of leaving it hidden for good."""
    ws, inbox = inbox_mount
    path = inbox / "a.md"
    path.write_text("the first file\n")
    looked = os.lstat(path)
    dest = ws.root / ".coordinator" / "intake" / "chip" / "00000000000000000001-a.md"
    dest.parent.mkdir(parents=True, exist_ok=True)
    hidden = inbox / f".{dest.name}.claim"
    claims.durable.write_json(claims.note_of(dest), claims._hiding(ws.root, path, hidden, looked))
    path.unlink()
    path.write_text("the file dropped in its place, a little longer\n")
    os.rename(path, hidden)  # the claim's rename took the new file; then kill -9
    assert claims.unfiled(dest.parent.parent, set(), ws.root) == []
    assert [p.name for p in inbox.iterdir()] == ["a.md"]
    assert path.read_text() == "the file dropped in its place, a little longer\n"
    assert not claims.note_of(dest).exists()
