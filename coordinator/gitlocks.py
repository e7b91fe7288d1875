"""Git's lock files that a killed git left behind: told apart from a live git's, and removed.

A git process killed mid-write leaves its `<name>.lock` file, and every git after it fails
on "File exists" until the file goes. A lock is only removed when no live git can still be
writing behind it.

In a repository under `repos/` (`clear_unheld`): any lock file outside the object store that
no live process has open, while no git process works in the repository or one of its working
copies; where /proc cannot tell, a lock older than STALE_LOCK_AGE.

In `state/` (`clear_stale_locks`): any lock file outside the object store (the index's, a
branch's `refs/heads/main.lock` that a killed `update-ref` or `git commit` left, `packed-refs.lock`
of a killed `git pack-refs`), once older than STALE_LOCK_SECONDS, while no git process works
in the repository.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

STALE_LOCK_AGE = 600.0  # without /proc, a lock this old is taken as abandoned
STALE_LOCK_SECONDS = 2.0


def lock_files(git_dir: Path) -> list[Path]:
    """The lock files under `git_dir`, those in its object store aside."""
    return [p for p in git_dir.rglob("*.lock")
            if p.is_file() and "objects" not in p.relative_to(git_dir).parts]  # fmt: skip


def clear_unheld(locks: list[Path], roots: list[str], *, now: float | None = None) -> bool:
    """Remove those of `locks` that no live process holds, unless a git process works under
    one of `roots`; True when any was removed."""
    held, busy = _live_holders({str(p) for p in locks}, roots)
    if busy:
        return False  # a git process works in this repository; its locks are not stale
    cleared = False
    for lock in locks:
        if held is None:
            try:
                age = (now if now is not None else time.time()) - lock.stat().st_mtime
            except OSError:
                continue
            if age < STALE_LOCK_AGE:
                continue
        elif str(lock) in held:
            continue
        try:
            lock.unlink()
            cleared = True
        except FileNotFoundError:
            pass
    return cleared


def _live_holders(locks: set[str], roots: list[str]) -> tuple[set[str] | None, bool]:
    """Which `locks` a live process has open, and whether a git process runs under `roots`.

    (None, False) where /proc is not available: the caller falls back on the lock's age.
    """
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None, False
    held: set[str] = set()
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if (entry / "comm").read_text("utf-8", errors="surrogateescape").startswith("git"):
                cwd = os.readlink(entry / "cwd")
                if any(cwd == r or cwd.startswith(r.rstrip("/") + "/") for r in roots):
                    return held, True
            if locks:
                for fd in (entry / "fd").iterdir():
                    target = os.readlink(fd)
                    if target in locks:
                        held.add(target)
        except OSError:
            continue  # gone, or not ours to look at
    return held, False


def clear_stale_locks(git_dir: Path, *, now: float | None = None) -> list[str]:
    """Remove lock files no live git process holds (a git that was killed mid-write); their
    names under `git_dir`. Every lock, not only the index's: a branch's lock that a kill -9 of
    the supervisor's own `update-ref` left stopped every later start on "File exists"."""
    now = time.time() if now is None else now
    cleared: list[str] = []
    if not git_dir.is_dir():
        return cleared
    busy = _git_processes_using(git_dir)
    for lock in lock_files(git_dir):
        name = lock.relative_to(git_dir).as_posix()
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if busy or age < STALE_LOCK_SECONDS:
            continue
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
            cleared.append(name)
    return cleared


def _git_processes_using(git_dir: Path) -> bool:
    """Is any live git process working in the repository of `git_dir`?"""
    return _live_holders(set(), [str(git_dir.parent.resolve())])[1]
