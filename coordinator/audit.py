"""The audit trail: `state/` is a git repository and every transition is in a commit.

The supervisor is the only writer (one thread owns this object). Transitions are
staged as lines and committed together at the end of each loop step (group
commit): consecutive lines of one actor share a commit whose author is that
actor; the committer is always `coordinator`. The files on disk are the truth
between commits; `recover()` commits whatever a crash left uncommitted.

This module writes the trail: `StateRepo` stages, groups and commits the lines and
rolls up its packs, and `Committer` does so in a thread of its own while the loop
runs. Running git in `state/` and reading the trail back are `trail.Trail`'s.

Example message:
    WO-0042 chip: running -> done
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import durable, gitlocks
from .errors import GitError
from .gitrepo import git_program
from .trail import IGNORED, Trail, one_line, run, temp_name
from .trail import SUPERVISOR as SUPERVISOR  # the trail's name for the supervisor: audit's too

# Staging writes every blob of a batch into one new pack instead of a loose file each (git's
# bulk check-in takes every blob over this size): an order's five files were five new inodes
# in .git/objects, and on a disk where a new inode costs 0.1-1 ms that was most of a batch.
# Only for staging: in the repository's config it would also make `git diff` call them binary.
# A git before 2.37 makes one pack per blob that way: it stages loose objects as before.
_PACKED = ("-c", "core.bigFileThreshold=1")
PACK_LIMIT = 32  # packs in state/.git before they are rolled up (one is made per batch)
STALE_PACK_AGE = 600.0  # seconds: a temp pack this old at start is a killed git's, not a live one's


_git_version: tuple[int, int] | None = None


def git_version() -> tuple[int, int]:
    """(major, minor) of the git on PATH; (0, 0) when it cannot be told. Only an answer is
    kept: a `git --version` refused once (a process limit) made every later batch of the run
    stage loose objects, one new inode per file, as for a git too old to pack them."""
    global _git_version
    if _git_version is not None:
        return _git_version
    program = git_program()  # the git every other command runs, by its full path
    if program is None:
        return (0, 0)
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    m = re.search(r"(\d+)\.(\d+)", out)
    if m is None:
        return (0, 0)
    _git_version = (int(m.group(1)), int(m.group(2)))
    return _git_version


def packed() -> tuple[str, ...]:
    """The options that make staging write one pack per batch, where this git does that."""
    return _PACKED if git_version() >= (2, 37) else ()


# Where a branch that someone moved off the supervisor's last commit is kept, when it is put back.
SET_ASIDE = "refs/coordinator/set-aside/"


class StateRepo(Trail):
    """The git repository under `state/`, written only through this object."""

    def __init__(self, path: Path, *, record: Path | None = None) -> None:
        super().__init__(path, record=record)
        self._pending: list[tuple[str, str]] = []  # (actor, line)
        self.notes: list[str] = []  # what went wrong but lost nothing (a failed roll-up), to be said
        self._put_back: list[str] = []  # branches put back by a batch, for `moved_by_others` to say
        self._object_format: str | None = None  # sha1, or sha256 (a git made to default to it)

    # -- a branch moved off the supervisor's last commit ----------------------------------------------
    def put_back(self, kept: str) -> str | None:
        """Put state/'s branch back on `kept`, the supervisor's last commit, when someone moved it
        to a commit that does not hold it (`git reset --hard HEAD~3`, an amend, a rebase), and
        HEAD back on the supervisor's branch (`home`) when someone switched it to another
        branch or a commit (`git checkout -b other`, `git checkout <commit>`): else every order
        committed since is gone from state/ and from the board, or the supervisor goes on
        committing on their branch and its own is left behind. What they moved HEAD to is kept
        under SET_ASIDE; the files the move changed now differ from the branch and are put
        back by the tamper watch. One line that says it, or None: HEAD names the supervisor's
        branch and that holds `kept`, or `kept` is gone (a `git gc` since)."""
        head = self.head()
        switched = self.switched()
        if not kept or (head == kept and switched is None):
            return None
        try:
            self.git("cat-file", "-e", f"{kept}^{{commit}}")
        except GitError:
            self.note_lost(kept, head)
            return None
        if switched is None and self._holds(head, kept):
            return None  # commits on top of it: others', said by `moved_by_others`
        home = self.home()
        tip = self.git("rev-parse", "-q", "--verify", f"{home}^{{commit}}").strip() if self._has_ref(home) else ""
        intact = self._holds(tip, kept)  # HEAD was switched away from a branch nobody moved back
        aside = [c for c in dict.fromkeys((head, tip)) if c and c != kept and not (c == tip and intact)]
        for commit in aside:
            self.git("update-ref", f"{SET_ASIDE}{commit}", commit)
        if switched is not None:
            self.git("symbolic-ref", "HEAD", home)
        if intact:  # the index as the branch has it; commits on it past `kept` are `moved_by_others`'
            self.git("reset", "-q", tip)
        else:  # the branch and the index; the files are the tamper watch's
            self.git("reset", "-q", kept)
            self.own(kept)
        kept_as = "".join(f"; {c[:10]} is kept as {SET_ASIDE}{c[:10]}" for c in aside)
        if switched is not None:
            back = "" if intact else f", at the supervisor's last commit {kept[:10]}"
            return f"{switched}: put back on {home.removeprefix('refs/heads/')}{back}{kept_as}"
        return (f"state/'s branch was moved from {kept[:10]} to {head[:10] or 'no commit'}, which does not "
                f"contain the supervisor's last commit: put back{kept_as}")

    def _note_others(self, old: str, new: str) -> None:
        """Keep the commits someone made on the branch from `old` to `new` as not the
        supervisor's now, before its own go on top of them: said later by `moved_by_others`,
        which a stop or a crash before the tamper watch's next look never reached."""
        with contextlib.suppress(GitError):
            self.note_foreign(self.git("rev-list", f"{old}..{new}").split())

    def _holds(self, commit: str, kept: str) -> bool:
        """Whether `commit` is `kept` or has it in its history."""
        if not commit:
            return False
        if commit == kept:
            return True
        try:
            self.git("merge-base", "--is-ancestor", kept, commit)
            return True
        except GitError:
            return False

    def moved_while_away(self, *, crashed: bool = True) -> list[str]:
        put = self.put_back(self.kept())
        return [put] if put is not None else super().moved_while_away(crashed=crashed)

    def moved_by_others(self) -> list[str]:
        if self.mine is not None:
            put = self.put_back(self.mine)
            if put is not None:
                self._put_back.append(put)
        said, self._put_back = self._put_back, []
        return said + super().moved_by_others()

    # -- set-up ---------------------------------------------------------------------------------
    @staticmethod
    def ensure(path: Path) -> bool:
        """Make `path` a git repository with a first commit; True when it was created."""
        path.mkdir(parents=True, exist_ok=True)
        if (path / ".git").exists():
            return False
        run(path, "init", "-q", "-b", "main")
        (path / "README.md").write_text(
            "# state/\n\nOwned by the coordinator supervisor: every order transition is a commit here.\n"
            "Do not edit by hand; `coordinator audit verify` reports changes it did not make.\n",
            encoding="utf-8")
        (path / ".gitignore").write_text("".join(f"{p}\n" for p in IGNORED), encoding="utf-8")
        run(path, "add", "-A")
        run(path, "commit", "-q", "-m", "state: initialise the audit trail")
        return True

    def clear_stale_lock(self) -> list[str]:
        """Remove lock files a dead git process left behind, and the half-written packs of a
        killed staging or roll-up (never counted, never read); returns the locks' names."""
        packs = self.path / ".git" / "objects" / "pack"
        with contextlib.suppress(OSError):
            for entry in os.scandir(packs):
                if entry.name.startswith(("tmp_pack_", ".tmp-")) and \
                        time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_PACK_AGE:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        return gitlocks.clear_stale_locks(self.path / ".git")

    # -- writing ----------------------------------------------------------------------------------
    def stage(self, actor: str, line: str) -> None:
        """One line of the next commit. It is made one line here whatever it quotes (a note, a
        reason, an agent's summary): a newline in it could forge a transition in the trail."""
        self._pending.append((actor, one_line(line)))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def restage(self, batches: list[Batch]) -> None:
        """Stage again, before what was staged since, the lines of batches whose commit failed."""
        self._pending[:0] = [(actor, line) for b in batches for actor, lines, _ in b.groups for line in lines]

    def flush(self, paths: set[str] | dict[str, durable.Wrote | None] | None = None) -> int:
        """Commit every staged line now; see `take` and `write`."""
        batch = self.take(paths)
        return self.write(batch) if batch is not None else 0

    def take(self, paths: set[str] | dict[str, durable.Wrote | None] | None = None) -> Batch | None:
        """The staged lines, grouped into commits, with the files to stage for them.

        With `paths`, only those files are staged (the supervisor's own writes), so a
        hand edit elsewhere in state/ stays visible to the tamper watch; given with what
        was written there (`durable.take_journal`), each only as written (see `add`).
        """
        if not self._pending:
            return None
        written = {p: w for p, w in paths.items() if w is not None} if isinstance(paths, dict) else {}
        batch = Batch(_group(self._pending), None if paths is None else set(paths), written)
        self._pending.clear()
        return batch

    def write(self, batch: Batch) -> int:
        """Commit one batch: stage its files, then one commit per group, authored by its actor.

        Plumbing, not `git commit`: a commit refreshes the whole index (an lstat of every file
        of every order state/ ever held) and `write-tree` needs only the staged paths, so a
        batch costs the same with 50 orders in state/ as with 50,000. The branch moves once,
        checked against the head the commits were made on.
        """
        if self.mine is not None:  # before staging: putting the branch back resets the index
            put = self.put_back(self.mine)
            if put is not None:
                self._put_back.append(put)
        if batch.paths is None:
            with durable.staging((self.path,)):
                self.git(*packed(), "add", "-A", ".")
        else:
            self.add(batch.paths, batch.written)
        for _ in range(3):
            base = self.head()
            if self.mine is not None and base != self.mine:
                self._others.append((self.mine, base))  # committed on it by someone else
                self._note_others(self.mine, base)
                self.mine = base
            # Inside the loop: a commit that moved the branch meanwhile staged its files in the
            # same index, and a tree written before it would take them out again.
            tree = self.git("write-tree").strip()
            if base and batch.paths is not None:
                tree = self._only_written(base, tree, batch.paths)
            head = base
            for actor, lines, _ in batch.groups:
                head = self._commit_tree(tree, head, _message(lines), actor)
            try:
                self.git("update-ref", "-m", f"coordinator: {len(batch.groups)} commit(s)", "HEAD", head,
                         base or "")
                self.own(head)
                break
            except GitError:
                if self.head() == base:  # not a race with another writer: a real failure
                    raise
        else:
            raise GitError("state/'s branch keeps moving under the supervisor: something else commits there")
        # After the loop: the batch is committed whatever a roll-up does (a failed one is said, not
        # raised, and never taken for a writer that moved the branch).
        problem = self.tidy(PACK_LIMIT)
        if problem:
            self.notes.append(problem)
        return len(batch.groups)

    def _commit_tree(self, tree: str, parent: str, message: str, actor: str) -> str:
        """A commit of `tree` on `parent` (none when ""), its message read from a file: given as
        an argument, a batch of a few thousand lines (a specialist's outbox of 2,000 orders)
        passed the system's limit on one argument (128 KiB) and stopped the supervisor."""
        spec = self.path / ".git" / "coordinator-message"
        spec.write_bytes(f"{message}\n".encode("utf-8", "surrogateescape"))  # as -m ends it
        with spec.open("rb") as stdin:
            return self.git("commit-tree", tree, *(("-p", parent) if parent else ()), "-F", "-", actor=actor,
                            stdin=stdin).strip()

    def _only_written(self, base: str, tree: str, paths: set[str]) -> str:
        """`tree` without what someone staged by hand (`git add` in state/): the index is
        shared, and a tree written from it took their change into the supervisor's commit.
        Their entries go back to `base`; the file stays changed, for the tamper watch."""
        wanted = set(self._relative(paths))
        changed = [p for p in self.git("diff-tree", "-r", "-z", "--name-only", "--no-renames", base, tree).split("\0")
                   if p]
        foreign = [p for p in changed if not any(a in wanted for a in _and_folders(p))]
        if not foreign:
            return tree
        spec = self.path / ".git" / "coordinator-pathspec"
        spec.write_bytes("\0".join(foreign).encode("utf-8", "surrogateescape"))
        self.git("reset", "-q", base, f"--pathspec-from-file={spec}", "--pathspec-file-nul", literal=True)
        return self.git("write-tree").strip()

    def tidy(self, limit: int) -> str | None:
        """Roll the batches' packs and the loose trees and commits up into fewer packs once
        `limit` packs have piled up; what went wrong, or None. Geometric: each pack is at least
        twice the size of the next smaller one, so a roll-up reads mostly the newest objects,
        and state/ keeps a handful of packs however long the supervisor runs (gc.auto is off)."""
        try:
            packs = sum(1 for n in os.listdir(self.path / ".git" / "objects" / "pack")
                        if n.startswith("pack-") and n.endswith(".pack"))  # not a killed repack's temp
        except OSError:
            return None
        if packs < limit:
            return None
        geometric = git_version() >= (2, 33)
        try:
            self.git("repack", *(("--geometric=2", "-d") if geometric else ("-a", "-d")), "-q")
        except GitError as e:  # a full disk, say: the packs wait for the next batch's try
            return f"could not roll up state/'s {packs} packs (they are kept): {e}"
        return None

    def _relative(self, paths: set[str], root: str | None = None) -> list[str]:
        """`paths` (absolute) inside state/ (`root`, resolved), relative to it, sorted."""
        root = str(self.path.resolve()) if root is None else root
        top = root + os.sep
        # A prefix cut, not os.path.relpath: both sides are absolute and normalized, and relpath
        # was some 5 us a path, twice for each of a batch's paths.
        return sorted({"." if p == root else p[len(top):] for p in (os.path.abspath(x) for x in paths)
                       if p == root or p.startswith(top)})

    def add(self, paths: set[str], written: dict[str, durable.Wrote] | None = None) -> None:
        """Stage `paths`; one `written` names (what the supervisor left there) is staged as
        written: its bytes, from memory, where they are known, else the file only while it is
        as written. A change made since (by hand, within the second before the commit) is never
        staged: the file stays changed for the tamper watch to put back and say."""
        root = str(self.path.resolve())
        rel = self._relative(paths, root)
        # Claimed files pass through intake/ within one step and were never committed:
        # a pathspec for them would not match.
        rel = [r for r in rel if not r.startswith(".git")
               and not (r.startswith("intake/") and not os.path.lexists(os.path.join(root, r)))]
        if written:
            rel = self._as_written(root, rel, written)
        if not rel:
            return
        # Only what git reads from the disk holds up a rename onto it (`durable.staging`): staged
        # from memory, the rest needs no guard, and a guard over the whole batch held the loop
        # (its next write of a record in the batch) for as long as the blobs took to pack.
        with durable.staging([os.path.join(root, r) for r in rel]):
            if written:
                rel = self._still_as_written(root, rel, written)
            self._add_from_disk(root, rel)

    def _add_from_disk(self, root: str, rel: list[str]) -> None:
        # Files and links go by exact path to update-index: `git add` matched every index entry
        # against every pathspec, 8x slower with a few thousand orders in state/. What is gone
        # leaves the index with `rm --cached` (a folder too); a folder that is there is added
        # whole; a temp name goes to `git add`, which refuses it loudly.
        kinds: dict[str, list[str]] = {"file": [], "gone": [], "folder": []}
        for r in rel:
            kinds[_kind(os.path.join(root, r))].append(r)
        spec = self.path / ".git" / "coordinator-pathspec"
        files = [r for r in kinds["file"] if not _ignored(r)]
        if files:
            spec.write_bytes("\0".join(files).encode())
            with spec.open("rb") as stdin:
                self.git(*packed(), "update-index", "--add", "--remove", "--replace", "-z", "--stdin", stdin=stdin)
        if kinds["gone"]:
            spec.write_bytes("\0".join(kinds["gone"]).encode())
            self.git("rm", "-r", "-q", "--cached", "--ignore-unmatch", f"--pathspec-from-file={spec}",
                     "--pathspec-file-nul", literal=True)
        folders = kinds["folder"] + [r for r in kinds["file"] if _ignored(r)]
        if folders:
            spec.write_bytes("\0".join(folders).encode())
            self.git(*packed(), "add", "-A", f"--pathspec-from-file={spec}", "--pathspec-file-nul", literal=True)

    def _as_written(self, root: str, rel: list[str], written: dict[str, durable.Wrote]) -> list[str]:
        """`rel` but the paths the supervisor wrote (`written`, by absolute path) whose bytes
        it knows: those are staged here from memory, git never reading the file (an edit in
        place, `echo x >> record.json`, made after a look at the file and before git read it
        went into the supervisor's commit). The rest is for git to read from the disk
        (`_still_as_written` first)."""
        by_rel = _by_relative(root, written)
        keep: list[str] = []
        blobs: list[tuple[str, durable.Wrote]] = []
        for r in rel:
            wrote = by_rel.get(r)
            if wrote is not None and wrote.appended is not None:
                # Appended to: what the last commit holds and the lines, whatever is there now.
                blobs.append((r, wrote._replace(data=(self.blob(f"HEAD:{r}") or b"") + wrote.appended)))
                continue
            if wrote is not None and wrote.data is not None:
                blobs.append((r, wrote))
                continue
            keep.append(r)
        if blobs:
            shas = self._write_blobs([w.data or b"" for _, w in blobs])
            entries = "".join(f"{'100755' if w.mode & stat.S_IXUSR else '100644'} {sha}\t{r}\0"
                              for (r, w), sha in zip(blobs, shas, strict=True))
            spec = self.path / ".git" / "coordinator-pathspec"
            spec.write_bytes(entries.encode("utf-8", "surrogateescape"))
            with spec.open("rb") as stdin:
                self.git("update-index", "-z", "--index-info", stdin=stdin)
        return keep

    @staticmethod
    def _still_as_written(root: str, rel: list[str], written: dict[str, durable.Wrote]) -> list[str]:
        """`rel` but the paths the supervisor wrote (its bytes not kept: past KEPT_LIMIT) that
        are no longer as it wrote them: nothing of those is staged, the file stays changed for
        the tamper watch. Asked while renames onto them wait (`durable.staging`)."""
        by_rel = _by_relative(root, written)
        keep: list[str] = []
        for r in rel:
            wrote = by_rel.get(r)
            if wrote is not None:
                try:
                    st: os.stat_result | None = os.lstat(os.path.join(root, r))
                except OSError:  # gone, or a folder above it made a file
                    st = None
                if st is None or not wrote.still(st):
                    continue
            keep.append(r)
        return keep

    def _write_blobs(self, blobs: list[bytes]) -> list[str]:
        """The ids of `blobs`, written into state/'s object store as one new pack, as git's
        bulk check-in would (a file per blob was a new inode each); no git process is run.
        In a repository of SHA-256 objects (`GIT_DEFAULT_HASH=sha256` when state/ was made),
        which the pack written here is not for, git writes them from files instead."""
        if self._format() != "sha1":
            return self._hash_objects(blobs)
        pack, index, shas = _pack(blobs)
        folder = self.path / ".git" / "objects" / "pack"
        name = f"pack-{pack[-20:].hex()}"
        if not (folder / f"{name}.idx").exists():  # the same blobs again: the same pack
            durable.put(folder / f"{name}.pack", pack)
            durable.put(folder / f"{name}.idx", index)  # last: git sees the pack once it has its index
        return shas

    def _format(self) -> str:
        if self._object_format is None:
            try:
                self._object_format = self.git("rev-parse", "--show-object-format").strip() or "sha1"
            except GitError:
                self._object_format = "sha1"  # a git before 2.25 knows no other
        return self._object_format

    def _hash_objects(self, blobs: list[bytes]) -> list[str]:
        """The ids of `blobs`, written by `git hash-object` from files in state/.git (each
        written here first: git never reads them from the order folders)."""
        folder = self.path / ".git" / "coordinator-blobs"
        folder.mkdir(exist_ok=True)
        files = []
        for n, data in enumerate(blobs):
            (folder / str(n)).write_bytes(data)
            files.append(f".git/coordinator-blobs/{n}")
        spec = self.path / ".git" / "coordinator-pathspec"
        spec.write_bytes("\n".join(files).encode("utf-8", "surrogateescape"))
        try:
            with spec.open("rb") as stdin:
                return self.git("hash-object", "-w", "--stdin-paths", stdin=stdin).split()
        finally:
            for f in files:
                with contextlib.suppress(OSError):
                    os.unlink(self.path / f)

    def commit_now(self, actor: str, line: str) -> None:
        self.stage(actor, line)
        self.flush()

    def recover(self, written: dict[str, int] | None = None) -> tuple[list[str], list[str]]:
        """Commit what a crash left uncommitted, with an explicit recovery message: (committed,
        put back). With `written`, the supervisor's journal of what it wrote (see
        `durable.read_journal`), a change it does not account for is a hand edit made while no
        supervisor ran: put back from git, never committed as the supervisor's."""
        # Temp names (a state/.gitignore without them lists them) are nobody's change: a write
        # the crash cut off, never to be committed or put back.
        changed = [p for p in self.dirty() if not p.startswith("intake/") and not _ignored(p)]
        foreign = [] if written is None else [p for p in changed if not own_change(p, self.path, written)]
        if foreign:
            self.restore(foreign)
        mine = [p for p in changed if p not in foreign]
        if mine:
            shown = ", ".join(mine[:5]) + (f" and {len(mine) - 5} more" if len(mine) > 5 else "")
            spec = self.path / ".git" / "coordinator-pathspec"
            spec.write_bytes("\0".join(mine).encode("utf-8", "surrogateescape"))
            self.git("add", "-A", f"--pathspec-from-file={spec}", "--pathspec-file-nul", literal=True)
            self.git("commit", "-q", "--no-verify", "--allow-empty", "-m",
                     f"recovery: commit state written before a crash\n\n{shown}")
        self.mine = self.head()
        return mine, foreign

    def repair_history(self, records: Any) -> list[str]:
        """Commit each transition the records list but the history lacks (a crash before or
        between the commits of one group commit), authored by its actor, marked recovered."""
        from collections import Counter

        seen: Counter[tuple[str, str, str]] = Counter()
        for e in self.entries():
            if e.order and e.old and e.new:
                seen[(e.order, e.old, e.new)] += 1
        missing: list[tuple[str, str]] = []
        for rec in sorted(records, key=lambda r: r.seq):
            wanted: Counter[tuple[str, str, str]] = Counter()
            for h in rec.history:
                key = (rec.id, h["from"], h["to"])
                wanted[key] += 1
                if wanted[key] > seen[key]:
                    missing.append((h.get("actor", SUPERVISOR),
                                    f"{rec.id} {rec.to}: {h['from']} -> {h['to']} (recovered after a crash)"))
        for actor, line in missing:
            self.git("commit", "-q", "--allow-empty", "--no-verify", "-m",
                     f"{line}\n\nrecovery: a crash came before this transition was committed", actor=actor)
        if missing:
            self.mine = self.head()
        return [line for _, line in missing]

    def restore(self, paths: list[str]) -> None:
        """Put hand-made changes back as the last commit has them (tamper watch). Each path is
        itself, never a pattern: a file named `orders/*` by hand must not put back every order.
        What the last commit holds is asked of it, not of the index a person may have staged
        in: a record taken out with `git rm --cached` is put back, never deleted (its order
        would be filed and run again), and a file made and `git add`ed by hand leaves both."""
        for p in paths:
            committed = {e.split("\t", 1)[1]: e.split("\t", 1)[0].split()
                         for e in self.git("ls-tree", "-z", "HEAD", "--", p).split("\0") if "\t" in e}
            if p in committed:
                try:
                    self.git("checkout", "HEAD", "--", p, literal=True)
                except GitError:
                    if not self._put_file_back(p, *committed[p]):
                        raise
            else:
                self.git("rm", "-q", "--cached", "--ignore-unmatch", "--", p, literal=True)
                with contextlib.suppress(OSError):
                    (self.path / p).unlink()
                # A folder made by hand goes with its last file (git tracks no empty folder);
                # never a top folder (orders/, intake/): the supervisor's own.
                parent = os.path.dirname(p)
                while "/" in parent:
                    try:
                        os.rmdir(self.path / parent)
                    except OSError:
                        break
                    parent = os.path.dirname(parent)


    def _put_file_back(self, rel: str, mode: str, kind: str, sha: str) -> bool:
        """Put the file `rel` back as the last commit has it (`mode`, `kind`, `sha` as ls-tree
        says) by a rename over whatever is there, where `git checkout` failed: it removes the
        file and then creates it anew, and a process appending to it by hand (`echo x >>`, in a
        loop) made it again in between, which stopped the supervisor. False: not a file, or
        something in the way (a folder), for the checkout's error to be raised."""
        if kind != "blob" or mode not in ("100644", "100755"):
            return False
        data = self.blob(sha)
        if data is None:
            return False
        try:
            durable.put(self.path / rel, data, 0o755 if mode == "100755" else 0o644)
        except OSError:
            return False
        spec = self.path / ".git" / "coordinator-pathspec"
        spec.write_bytes(f"{mode} {sha}\t{rel}\0".encode("utf-8", "surrogateescape"))
        with spec.open("rb") as stdin:  # as committed: the next look compares the file with it
            self.git("update-index", "-z", "--index-info", stdin=stdin)
        return True

def own_change(rel: str, root: Path, written: dict[str, int]) -> bool:
    """Whether the change at `rel` under state/ (`root`) is the supervisor's own, as its journal
    `written` tells (`durable.written_by_journal`). A file that is gone counts only when a
    folder above it was noted (a tree the supervisor removed whole): the supervisor writes
    files and never deletes one by itself, so a file it noted as written that is gone now was
    deleted by someone else (`rm state/orders/<id>/record.json` after a crash). Committed as
    its own, the order had no record, was filed again and ran a second time."""
    if not durable.written_by_journal(rel, root, written):
        return False
    if os.path.lexists(os.path.join(root, rel)):
        return True
    return durable.noted_at(os.path.dirname(rel), written) is not None


@dataclass
class Batch:
    """Commits to make: (actor, lines, order ids) per commit, and the files to stage."""

    groups: list[tuple[str, list[str], list[str]]]
    paths: set[str] | None
    written: dict[str, durable.Wrote] = field(default_factory=dict)  # what the supervisor left at a path


def _pack(blobs: list[bytes]) -> tuple[bytes, bytes, list[str]]:
    """A git pack (version 2) of `blobs`, whole (no deltas), its index (version 2) and the id of
    each blob: git's own formats, which `git index-pack` would write for this pack."""
    shas: list[str] = []
    at: dict[bytes, tuple[int, int]] = {}  # id -> (offset in the pack, crc32 of its entry)
    parts: list[bytes] = []
    offset = 12
    for data in blobs:
        digest = hashlib.sha1(b"blob %d\0" % len(data))
        digest.update(data)
        sha = digest.digest()
        shas.append(sha.hex())
        if sha in at:
            continue
        size = len(data)
        head = bytearray()
        byte = (3 << 4) | (size & 0x0F)  # 3: a blob
        size >>= 4
        while size:
            head.append(byte | 0x80)
            byte = size & 0x7F
            size >>= 7
        head.append(byte)
        entry = bytes(head) + zlib.compress(data, 1)
        at[sha] = (offset, zlib.crc32(entry))
        parts.append(entry)
        offset += len(entry)
    pack = b"PACK" + struct.pack(">II", 2, len(at)) + b"".join(parts)
    pack += hashlib.sha1(pack).digest()
    names = sorted(at)
    fanout = [0] * 256
    for sha in names:
        fanout[sha[0]] += 1
    for i in range(1, 256):
        fanout[i] += fanout[i - 1]
    small: list[int] = []
    large: list[int] = []
    for sha in names:
        if at[sha][0] < 0x80000000:
            small.append(at[sha][0])
        else:
            small.append(0x80000000 | len(large))
            large.append(at[sha][0])
    index = b"".join((b"\377tOc", struct.pack(">I", 2), struct.pack(">256I", *fanout), *names,
                      struct.pack(f">{len(names)}I", *(at[sha][1] for sha in names)),
                      struct.pack(f">{len(small)}I", *small), struct.pack(f">{len(large)}Q", *large), pack[-20:]))
    return pack, index + hashlib.sha1(index).digest(), shas


def _message(lines: list[str]) -> str:
    """The lines as `git commit -m` would store them: trailing spaces cut, runs of blank lines
    made one (commit-tree stores a message exactly as given)."""
    out: list[str] = []
    for line in "\n".join(lines).replace("\0", "").splitlines():  # git takes no NUL in an argument
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip("\n")


_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _words(line: str) -> set[str]:
    """The words of a line that could name an order, and each word cut at every `.`, `_` or
    `-` in it: `WO-0007.md` and `WO-0007-fix` in a failure reason name WO-0007 too."""
    found = set(_WORD.findall(line))
    for word in list(found):
        found.update(word[:i] for i, c in enumerate(word) if c in "._-")
    return found


def _group(pending: list[tuple[str, str]]) -> list[tuple[str, list[str], list[str]]]:
    """(actor, lines, order ids) per commit: one commit per actor where the history allows.

    A line joins the latest earlier group of its actor unless that would move it before a line
    about the same order, or one that names its order or that it names (a dependency released,
    a follow-up filed). Grouping only consecutive lines made a busy supervisor, alternating
    `queued -> running` (coordinator) and `running -> done` (the agent), commit every line alone.
    Each group keeps its orders and the words of its lines as sets: comparing every line with
    every line of the groups it passes made a batch of a few thousand lines take seconds.
    """
    groups: list[tuple[str, list[str], list[str]]] = []
    seen: list[tuple[set[str], set[str]]] = []  # per group: its orders, the words of its lines
    for actor, line in pending:
        order = line.split(" ", 1)[0]
        words = _words(line)
        target = None
        for i in range(len(groups) - 1, -1, -1):
            if groups[i][0] == actor:
                target = i
                break
            orders, named = seen[i]
            if order in orders or order in named or not orders.isdisjoint(words):
                break
        if target is None:
            groups.append((actor, [], []))
            seen.append((set(), set()))
            target = len(groups) - 1
        groups[target][1].append(line)
        groups[target][2].append(order)
        seen[target][0].add(order)
        seen[target][1].update(words)
    return groups


def _and_folders(rel: str) -> list[str]:
    """`rel` and each folder it is in: `orders/a/record.json`, `orders/a`, `orders`, `.`."""
    out = [rel]
    while "/" in rel:
        rel = rel.rsplit("/", 1)[0]
        out.append(rel)
    return [*out, "."]


def _by_relative(root: str, written: dict[str, durable.Wrote]) -> dict[str, durable.Wrote]:
    """`written` by path relative to `root`, as `_relative` gives them (a prefix cut: relpath
    was 5 us a path)."""
    top = root + os.sep
    return {p[len(top):]: w for p, w in written.items() if p.startswith(top)}


def _ignored(rel: str) -> bool:
    """A name state/.gitignore keeps out (temp files): `git add` refuses it loudly, update-index would not."""
    return temp_name(rel)


def _kind(path: str) -> str:
    """"file" (a regular file or a link), "folder", or "gone"."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "folder"  # cannot look: `git add` says why
    return "folder" if stat.S_ISDIR(mode) else "file"

