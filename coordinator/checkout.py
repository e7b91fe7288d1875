"""The default branch's checkout in `repos/<name>`: moved by a merge, put right after a kill.

A merge moves the checkout (index and files) and the default branch together, holding git's
own index.lock throughout, and leaves MOVE_MARK in the git dir while it does. A kill -9 in
between leaves the checkout half way; at the next start `heal_checkout` puts back, path by
path, what the move wrote, and keeps a person's own uncommitted changes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from . import durable
from .errors import GitError
from .gitrepo import _SHA, BRANCH_PREFIX, GitRepo, _no_room, _nul_join, _nul_split
from .inboxfiles import printable

_Entry = tuple[str, str]  # (mode, blob sha) of a path in a tree, the index or the checkout
MOVE_MARK = "coordinator-moving"  # in the git dir while a merge moves the checkout and the branch


class Healed(NamedTuple):
    """What `Repo.heal_checkout` did at a start."""

    put_back: list[str]  # paths a merge interrupted half way left, now back in line with HEAD
    blocking: list[str]  # uncommitted changes kept on paths a wo/ branch changes too

    def lines(self, repo: str) -> list[str]:
        said = []
        if self.put_back:
            said.append(f"put back {len(self.put_back)} path(s) of a merge interrupted in repos/{repo}")
        if self.blocking:
            more = len(self.blocking) - 5
            shown = ", ".join(self.blocking[:5]) + (f" and {more} more" if more > 0 else "")
            said.append(f"kept the uncommitted changes to {shown} in repos/{repo}, which an order's branch "
                        "changes too: its merge stops there until they are committed or discarded")
        return said


class DirtyCheckout(GitError):
    """A merge would overwrite a person's uncommitted work in the checkout; nothing was merged.
    Not the agent's doing: the order waits for the person (see `Endings.wait_for_person`)."""

    def __init__(self, repo: str, paths: list[str], said: str) -> None:
        self.repo = repo
        self.paths = tuple(paths)
        self.said = said  # git's own line
        super().__init__(f"{self.what()} in repos/{repo}, which the merge would overwrite; commit or stash them "
                         "there, then retry")

    def what(self) -> str:
        """`uncommitted changes to src/a.py, src/b.py`: the paths, shown safely, five at most."""
        more = len(self.paths) - 5
        shown = ", ".join(printable(p) for p in self.paths[:5]) + (f" and {more} more" if more > 0 else "")
        return f"uncommitted changes to {shown}"

    def blocker(self, order_id: str) -> str:
        """The line order `order_id` waits with: what is in the way, and what to do. It starts
        with what it waits for: the board reads it after "waits for"."""
        return (f"{self.what()} in repos/{self.repo}, which the merge would overwrite; commit or stash them, "
                f"then `coordinator retry {order_id}`")


class CheckoutBusy(DirtyCheckout):
    """A live git holds the checkout's index.lock (a person's `git commit -a` waiting in its
    editor, say) for longer than a merge waits: nothing was merged. Not the agent's doing, nor
    the branch moving: the order waits for the person, as for their uncommitted work."""

    def __init__(self, repo: str) -> None:
        self.repo = repo
        self.paths = ()
        self.said = ""
        GitError.__init__(self, f"a git command holds repos/{repo}/.git/index.lock (a commit waiting in its editor, "
                                "say); nothing was merged: retry once it ends")

    def what(self) -> str:
        return "a git command working in the checkout (it holds .git/index.lock)"

    def blocker(self, order_id: str) -> str:
        return (f"{self.what()} in repos/{self.repo}: once it ends, `coordinator retry {order_id}` (no git running "
                "there? remove that file first)")


class BranchLocked(CheckoutBusy):
    """A git process holds the lock of the default branch's ref (`.git/refs/heads/main.lock`,
    a person's `git commit` killed half way left one behind): nothing was merged. Taken for the
    branch moving, it failed the order's attempts against the agent ("stop whatever else
    commits there"); the order waits for the person, as for the index's lock."""

    def __init__(self, repo: str, lock: str) -> None:
        self.repo = repo
        self.lock = lock  # relative to the git dir
        self.paths = ()
        self.said = ""
        GitError.__init__(self, f"a git command holds repos/{repo}/.git/{lock} (a commit waiting in its editor, "
                                "say, or one killed half way); nothing was merged: retry once it ends")

    def what(self) -> str:
        return f"a git command working on the default branch (it holds .git/{self.lock})"


class Checkout(GitRepo):
    """A repository whose checked-out default branch a merge moves, and a start heals."""

    def _locked_move(self, branch: str, base: str, new: str, note: str) -> bool:
        """Move the checkout and the branch from `base` to `new` holding git's own index.lock
        throughout, as `git commit` holds it across its ref update: a person's git in the same
        checkout fails fast instead of interleaving. False when the branch moved; CheckoutBusy
        when another git holds the lock. What a kill -9 in between leaves, `heal_checkout` puts
        right at the next start."""
        index, lock = self.git_dir / "index", self.git_dir / "index.lock"
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise CheckoutBusy(self.name) from None
        moving = self.git_dir / MOVE_MARK
        try:
            if index.exists():
                shutil.copyfile(index, lock)
            env = {"GIT_INDEX_FILE": str(lock)}
            if self.head() != base:
                return False
            if self.checked_out() != branch:
                # A person switched the checkout to another branch, or detached it: it is
                # theirs; only the branch moves (under the lock: never while git switches).
                return self._swap(branch, base, new, note, lambda: None)
            # Left by a kill -9 from here on: the one sign `heal_checkout` acts on.
            durable.write_bytes(moving, f"{base} {new}\n".encode(), sync=False)
            self._run(["update-index", "-q", "--refresh"], cwd=self.path, env=env, check=False)
            paths = _nul_split(self.git("diff", "--name-only", "--no-renames", "-z", base, new))
            was = self._stats(paths)
            r = self._run(["read-tree", "-m", "-u", base, new], cwd=self.path, env=env, check=False)
            if r.returncode != 0:
                said = r.stderr.strip().splitlines()[0] if r.stderr.strip() else "read-tree failed"
                # git checks every path before it writes one; what it wrote before it failed
                # (a full disk, a folder it may not write) goes back first: left, it was taken
                # for a person's uncommitted work, and the order waited for them to clear it.
                full = _no_room(r.stderr, [self.git_dir, self.path])  # asked first: the undo makes room
                self._undo_writes(was, env)
                if full is not None:  # nobody's failed attempt: it stops the supervisor, as git's own does
                    code, where = full
                    raise OSError(code, f"{os.strerror(code)} (git read-tree: {said})", str(where))
                in_the_way = self._in_the_way(base, new, env)
                if not in_the_way:  # not a person's work: a failed attempt as any
                    raise GitError(f"repos/{self.name}: the checkout could not be moved to the merge: {said}")
                raise DirtyCheckout(self.name, in_the_way, said)
            if not self._swap(branch, base, new, note, lambda: self._run(
                    ["read-tree", "-m", "-u", new, base], cwd=self.path, env=env, check=False)):
                return False
            os.replace(lock, index)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            with contextlib.suppress(FileNotFoundError):
                moving.unlink()

    def _swap(self, branch: str, base: str, new: str, note: str, undo: Callable[[], object]) -> bool:
        """Move `branch` from `base` to `new`; False (after `undo`) when it moved meanwhile.
        BranchLocked (after `undo`) when a lock file kept git from moving it."""
        swap = self._run(["update-ref", "-m", note, f"refs/heads/{branch}", new, base], check=False)
        if swap.returncode == 0:
            return True
        undo()
        held = re.search(r"Unable to create '([^']+\.lock)': File exists", swap.stderr)
        if held and self._sha(f"refs/heads/{branch}") == base:
            where = Path(held.group(1))
            shown = where.relative_to(self.git_dir).as_posix() if where.is_relative_to(self.git_dir) else where.name
            raise BranchLocked(self.name, shown)
        return False

    def _stats(self, paths: list[str]) -> dict[str, tuple[int, ...] | None]:
        """path -> what `lstat` says of it in the checkout (None: absent, or beyond a link)."""
        found: dict[str, tuple[int, ...] | None] = {}
        for p in paths:
            try:
                if any(os.path.islink(self.path / p[:i]) for i, c in enumerate(p) if c == "/"):
                    found[p] = None  # never undone: git writes nothing beyond a link
                    continue
                st = os.lstat(self.path / p)
                found[p] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            except OSError:
                found[p] = None
        return found

    def _undo_writes(self, was: dict[str, tuple[int, ...] | None], env: dict[str, str]) -> None:
        """Put back, from the index (still the one before the move), each path of `was` a
        failed move wrote or removed; what it made that the index lacks goes, and the folders
        it made for it once empty. Paths it never reached are left as they are."""
        now = self._stats(list(was))
        touched = [p for p, st in was.items() if now[p] != st]
        if not touched:
            return
        # The whole index, once, on this rare path: no argv to outgrow, however many it wrote.
        listed = set(_nul_split(self._run(["ls-files", "-z"], cwd=self.path, env=env, check=False).stdout))
        listed &= set(touched)
        for p in touched:  # first what it added: room for what goes back
            made = now[p]
            if p not in listed and was[p] is None and made is not None and not stat.S_ISDIR(made[0]):
                with contextlib.suppress(OSError):
                    os.unlink(self.path / p)
                folder = (self.path / p).parent
                with contextlib.suppress(OSError):
                    while folder != self.path and not any(folder.iterdir()):
                        folder.rmdir()
                        folder = folder.parent
        back = [p for p in touched if p in listed]
        if back:
            self._run(["checkout-index", "-f", "-u", "-z", "--stdin"], cwd=self.path, env=env,
                      input=_nul_join(back), check=False)  # fmt: skip

    def _in_the_way(self, base: str, new: str, env: dict[str, str]) -> list[str]:
        """The paths a move from `base` to `new` changes where the checkout holds a person's own
        work: a change not committed (staged or not), or a file or folder git does not track."""
        changed = _nul_split(self.git("diff", "--name-only", "--no-renames", "-z", base, new))
        if not changed:
            return []
        mine = set(_nul_split(self._run(["diff-files", "--name-only", "-z"], cwd=self.path, env=env).stdout))
        mine |= set(_nul_split(self._run(["diff-index", "--cached", "--name-only", "-z", base],
                                         cwd=self.path, env=env).stdout))  # fmt: skip
        # An untracked folder is listed once (`dir/`): whatever the merge writes in it is in the way.
        untracked = {p.rstrip("/") for p in _nul_split(self._run(
            ["ls-files", "-z", "--others", "--directory"], cwd=self.path, env=env).stdout)}
        return [p for p in changed
                if p in mine or any(p[:i] in untracked for i, c in enumerate(p + "/") if c == "/")]

    def heal_checkout(self) -> Healed:
        """Put right what a kill -9 inside `_locked_move` left in the checkout, path by path;
        only when it left its mark (a person's own changes outside such a move are never touched).

        Before the branch moved, the files are at the merge and the index at HEAD: they go
        back to HEAD, and the order's retry merges again. After it moved, the index is still
        at the commit before: it is set to HEAD. A path is only put back where its content is
        what the move itself wrote (or what was committed before it); a person's own
        uncommitted change is kept, and named in `blocking` when a wo/ branch changes it too.
        """
        moving = self.git_dir / MOVE_MARK
        if not moving.exists():  # no move was cut off: whatever differs from HEAD is a person's
            return Healed([], [])
        with self._lock:
            healed = self._heal()
            with contextlib.suppress(FileNotFoundError):
                moving.unlink()
            return healed

    def _heal(self) -> Healed:
        head = self.head()
        staged = self._raw_diff("diff-index", "--cached", head)  # path -> (HEAD's, the index's)
        moves = self._pending_moves(head)  # path -> (HEAD's, what a merge of a wo/ branch writes)
        if not staged and not moves:
            return Healed([], [])
        disk = self._disk_entries(sorted(set(staged) | set(moves)))
        stage: dict[str, _Entry | None] = {}  # path -> HEAD's entry, into the index
        write: dict[str, _Entry | None] = {}  # path -> HEAD's entry, onto the disk
        for before in self._before_merge(head) if staged else []:
            # The branch moved, the index not: it holds what was committed before.
            unchanged = set(staged) - set(self._raw_diff("diff-index", "--cached", before))
            for p in unchanged:
                if _key(disk[p]) == _key(staged[p][0]):
                    stage[p] = staged[p][0]
        blocking = []
        for p, (ours, merged) in moves.items():
            if p in stage:
                continue
            index = staged[p][1] if p in staged else ours
            if _key(disk[p]) in {_key(m) for m in merged} and (index == ours or index in merged):
                write[p] = ours  # the files moved, the branch not
                if index != ours:
                    stage[p] = ours
            elif p in staged or _key(disk[p]) != _key(ours):
                blocking.append(p)
        if stage or write:
            self._put_back(stage, write)
        return Healed(sorted(set(stage) | set(write)), sorted(blocking))

    def _pending_moves(self, head: str) -> dict[str, tuple[_Entry | None, list[_Entry | None]]]:
        """Each path a merge of a wo/ branch not yet in `head` would change: HEAD's entry and
        the entries such merges write (as `merge` would build them)."""
        moves: dict[str, tuple[_Entry | None, list[_Entry | None]]] = {}
        tips = self.git("for-each-ref", "--format=%(objectname)", f"refs/heads/{BRANCH_PREFIX}").split()
        for tip in dict.fromkeys(tips):
            if self._is_ancestor(tip, head):
                continue
            only: set[str] | None = None
            if self._is_ancestor(head, tip):
                tree = self.git("rev-parse", f"{tip}^{{tree}}")
            elif self.in_memory_merge:
                r = self._run(["merge-tree", "--write-tree", "--no-messages", head, tip], check=False)
                tree = r.stdout.split("\n", 1)[0]
                if r.returncode != 0 or not _SHA.match(tree):
                    continue  # a conflict: that merge never touches the checkout
            else:
                # Older git merges in a scratch copy: the branch's own paths, as the branch has them.
                fork = self._run(["merge-base", head, tip], check=False).stdout.strip()
                if not _SHA.match(fork):
                    continue  # no common history: `merge` refuses it
                tree = self.git("rev-parse", f"{tip}^{{tree}}")
                only = set(_nul_split(self.git("diff-tree", "-r", "--name-only", "-z", fork, tip)))
            for p, (ours, theirs) in self._raw_diff("diff-tree", head, tree).items():
                if only is None or p in only:
                    moves.setdefault(p, (ours, []))[1].append(theirs)
        return moves

    def _before_merge(self, head: str) -> list[str]:
        """The commits the branch stood at before the merge that made `head`, when the supervisor
        made it (an order's commit or its merge commit, both with a Work-Order trailer)."""
        if not self.git("log", "-1", "--format=%(trailers:key=Work-Order,valueonly)", head).strip():
            return []
        found = []
        for rev in (f"{head}^1", f"refs/heads/{self.default_branch()}@{{1}}"):
            r = self._run(["rev-parse", "-q", "--verify", f"{rev}^{{commit}}"], check=False)
            if r.returncode == 0:
                found.append(r.stdout.strip())
        return list(dict.fromkeys(found))

    def _raw_diff(self, *args: str) -> dict[str, tuple[_Entry | None, _Entry | None]]:
        """`git <args> -r -z` in raw format: each path's (mode, sha) on either side, None where
        it is absent; an unmerged index entry is ("", ""), equal to nothing."""
        fields = self._run([args[0], "-r", "-z", *args[1:]]).stdout.split("\0")
        found: dict[str, tuple[_Entry | None, _Entry | None]] = {}
        for meta, path in zip(fields[0::2], fields[1::2], strict=False):
            if not meta.startswith(":"):
                continue
            old_mode, new_mode, old_sha, new_sha, status = meta[1:].split(" ")
            new: _Entry | None = ("", "") if status == "U" else _entry(new_mode, new_sha)
            found[path] = (_entry(old_mode, old_sha), new)
        return found

    def _disk_entries(self, paths: list[str]) -> dict[str, _Entry | None]:
        """What each path holds in the checkout, as (mode, blob sha) the way git would store it;
        None when absent, ("", "") for anything that is not a plain file or link."""
        found: dict[str, _Entry | None] = {}
        files = []
        for p in paths:
            parent, name = self.path, p.split("/")
            found[p] = None
            for part in name[:-1]:
                parent = parent / part
                if parent.is_symlink():
                    found[p] = ("", "")
                if parent.is_symlink() or not parent.is_dir():
                    break
            else:
                try:
                    st = os.lstat(self.path / p)
                except OSError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(self.path / p)
                    found[p] = ("120000", self._run(["hash-object", "--stdin"], input=target).stdout.strip())
                elif stat.S_ISREG(st.st_mode) and "\n" not in p:
                    files.append(p)
                else:
                    found[p] = ("", "")
        if files:  # one git for all: the hash of what `git add` would stage, filters applied
            listed = "".join(f"{p}\n" for p in files)
            shas = self._run(["hash-object", "--stdin-paths"], cwd=self.path, input=listed)
            for p, sha in zip(files, shas.stdout.split(), strict=True):
                found[p] = ("100644", sha)
        return found

    def _put_back(self, stage: dict[str, _Entry | None], write: dict[str, _Entry | None]) -> None:
        """Set the index entries in `stage` and the files in `write` to HEAD's, holding git's
        index.lock throughout as `_locked_move` does."""
        index, lock = self.git_dir / "index", self.git_dir / "index.lock"
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise GitError(f"repos/{self.name}: a git process works in the checkout; "
                           "the interrupted merge there is put right at the next start") from None
        try:
            if index.exists():
                shutil.copyfile(index, lock)
            env = {"GIT_INDEX_FILE": str(lock)}
            if stage:
                none = "0" * len(self.head())
                info = "".join(f"{e[0]} {e[1]}\t{p}\0" if e else f"0 {none}\t{p}\0" for p, e in stage.items())
                self._run(["update-index", "-z", "--index-info"], cwd=self.path, env=env, input=info)
            back = [p for p, e in write.items() if e is not None]
            if back:
                self._run(["checkout-index", "-f", "-u", "-z", "--stdin"], cwd=self.path, env=env,
                          input=_nul_join(back))  # fmt: skip
            for p in (p for p, e in write.items() if e is None):  # files the move added
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / p)
                folder = (self.path / p).parent
                with contextlib.suppress(OSError):  # as git does: folders left empty go too
                    while folder != self.path and not any(folder.iterdir()):
                        folder.rmdir()
                        folder = folder.parent
            self._run(["update-index", "-q", "--refresh"], cwd=self.path, env=env, check=False)
            os.replace(lock, index)
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _entry(mode: str, sha: str) -> _Entry | None:
    return None if mode.strip("0") == "" else (mode, sha)


def _key(entry: _Entry | None) -> tuple[str, str] | None:
    """What a tree, index or disk entry holds, for comparing: a file's exec bit aside (git may
    not track it on this file system), a link is not a file with the same text."""
    if entry is None:
        return None
    kind = "link" if entry[0] == "120000" else "file" if entry[0].startswith("100") else entry[0]
    return (kind, entry[1])

