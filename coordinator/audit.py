"""The audit trail: `state/` is a git repository and every transition is in a commit.

The supervisor is the only writer (one thread owns this object). Transitions are
staged as lines and committed together at the end of each loop step (group
commit): consecutive lines of one actor share a commit whose author is that
actor; the committer is always `coordinator`. The files on disk are the truth
between commits; `recover()` commits whatever a crash left uncommitted.

Example message:
    WO-0042 chip: running -> done
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import queue
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import git

from . import durable
from .errors import GitError

SUPERVISOR = "coordinator"
DOMAIN = "agents.coordinator"
TRANSITION = re.compile(r"^(?P<id>\S+) (?P<agent>\S+): (?P<old>[a-z-]+) -> (?P<new>[a-z-]+)(?: \((?P<note>.*)\))?$")
LOCK_NAMES = ("index.lock", "HEAD.lock", "config.lock")
STALE_LOCK_SECONDS = 2.0


def identity(actor: str) -> str:
    return f"{actor} <{actor}@{DOMAIN}>"


def trusted_env(actor: str = SUPERVISOR, committer: str = SUPERVISOR) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({
        "GIT_AUTHOR_NAME": actor, "GIT_AUTHOR_EMAIL": f"{actor}@{DOMAIN}",
        "GIT_COMMITTER_NAME": committer, "GIT_COMMITTER_EMAIL": f"{committer}@{DOMAIN}",
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
        # glibc gave the heap back after every object git zipped (brk down, brk up, 4 calls
        # an object): half of a batch's `update-index` time with a few hundred files.
        "GLIBC_TUNABLES": ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), _KEEP_HEAP))),
    })
    return env


_KEEP_HEAP = "glibc.malloc.trim_threshold=268435456:glibc.malloc.top_pad=16777216"


IGNORED = ("*.tmp", f"{durable.TMP_PREFIX}*")  # state/.gitignore: temp files are never committed

# log.showSignature: a person's config that shows signatures puts their text in front of the
# fields `git log -z` is read by, for a signed commit made by hand in state/.
GIT_OPTS = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "gc.auto=0",
            "-c", "commit.gpgsign=false", "-c", "core.quotepath=false", "-c", "log.showSignature=false")

# Staging writes every blob of a batch into one new pack instead of a loose file each (git's
# bulk check-in takes every blob over this size): an order's five files were five new inodes
# in .git/objects, and on a disk where a new inode costs 0.1-1 ms that was most of a batch.
# Only for staging: in the repository's config it would also make `git diff` call them binary.
# A git before 2.37 makes one pack per blob that way: it stages loose objects as before.
_PACKED = ("-c", "core.bigFileThreshold=1")
# For `status`: the index keeps the folders' times, and an unchanged folder is not read again.
_UNTRACKED_CACHE = ("-c", "core.untrackedCache=true")
PACK_LIMIT = 32  # packs in state/.git before they are rolled up (one is made per batch)
STALE_PACK_AGE = 600.0  # seconds: a temp pack this old at start is a killed git's, not a live one's


@functools.lru_cache(maxsize=1)
def git_version() -> tuple[int, int]:
    """(major, minor) of the git on PATH; (0, 0) when it cannot be told."""
    try:
        out = subprocess.run(["git", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    m = re.search(r"(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def packed() -> tuple[str, ...]:
    """The options that make staging write one pack per batch, where this git does that."""
    return _PACKED if git_version() >= (2, 37) else ()


@dataclass(frozen=True)
class Entry:
    """One line of the trail: a transition read back from git."""

    commit: str
    author: str
    at: str
    line: str
    order: str | None
    old: str | None
    new: str | None

    def as_json(self) -> dict[str, Any]:
        return {"commit": self.commit, "author": self.author, "at": self.at, "line": self.line,
                "order": self.order, "from": self.old, "to": self.new}


class StateRepo:
    """The git repository under `state/`, written only through this object."""

    def __init__(self, path: Path, *, record: Path | None = None) -> None:
        self.path = path
        # Where the supervisor keeps the head of its own last commit, outside state/ (a reset
        # of state/ cannot take it along): what a start checks state/'s branch against.
        self.record = record
        self._pending: list[tuple[str, str]] = []  # (actor, line)
        self.notes: list[str] = []  # what went wrong but lost nothing (a failed roll-up), to be said
        # The branch as the supervisor's own last commit left it (None: not known yet), and the
        # moves of others a batch found on the way: `moved_by_others` says them.
        self.mine: str | None = None
        self._others: list[tuple[str, str]] = []
        self._cmd = git.Git(str(path))

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
        return clear_stale_locks(self.path / ".git")

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

    def flush(self, paths: set[str] | None = None) -> int:
        """Commit every staged line now; see `take` and `write`."""
        batch = self.take(paths)
        return self.write(batch) if batch is not None else 0

    def take(self, paths: set[str] | None = None) -> Batch | None:
        """The staged lines, grouped into commits, with the files to stage for them.

        With `paths`, only those files are staged (the supervisor's own writes), so a
        hand edit elsewhere in state/ stays visible to the tamper watch.
        """
        if not self._pending:
            return None
        batch = Batch(_group(self._pending), None if paths is None else set(paths))
        self._pending.clear()
        return batch

    def write(self, batch: Batch) -> int:
        """Commit one batch: stage its files, then one commit per group, authored by its actor.

        Plumbing, not `git commit`: a commit refreshes the whole index (an lstat of every file
        of every order state/ ever held) and `write-tree` needs only the staged paths, so a
        batch costs the same with 50 orders in state/ as with 50,000. The branch moves once,
        checked against the head the commits were made on.
        """
        with durable.staging(batch.paths if batch.paths is not None else (self.path,)):
            if batch.paths is None:
                self.git(*packed(), "add", "-A", ".")
            else:
                self.add(batch.paths)
        for _ in range(3):
            base = self.head()
            if self.mine is not None and base != self.mine:
                self._others.append((self.mine, base))  # committed on it by someone else
                self.mine = base
            # Inside the loop: a commit that moved the branch meanwhile staged its files in the
            # same index, and a tree written before it would take them out again.
            tree = self.git("write-tree").strip()
            head = base
            for actor, lines, _ in batch.groups:
                parent = ("-p", head) if head else ()
                head = self.git("commit-tree", tree, *parent, "-m", _message(lines), actor=actor).strip()
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

    def moved_by_others(self) -> list[str]:
        """Commits on state/'s branch that the supervisor did not make (a `git commit` by hand
        beside it), since it last looked: one line each, each said once."""
        moves, self._others = self._others, []
        head = self.head()
        if self.mine is not None and head != self.mine:
            moves.append((self.mine, head))
        if self.mine is not None:
            self.own(head)  # said once: from here it is the branch the supervisor goes on from
        found: list[str] = []
        for old, new in moves:
            try:
                self.git("merge-base", "--is-ancestor", old, new)
                log = self.git("log", "-z", "--format=%H%x00%an%x00%s", f"{old}..{new}")
            except GitError:  # not an ancestor: the history was rewritten (or the commit is gone)
                found.append(f"state/'s branch was moved from {old[:10]} to {new[:10]}, which does not "
                             "contain the supervisor's last commit")
                continue
            found += [one_line(f"{sha[:10]} by {author}: {subject}") for sha, author, subject in log_records(log, 3)]
        return found

    def own(self, head: str) -> None:
        """Take `head` as the branch the supervisor's own commits left, and keep it in `record`."""
        self.mine = head
        if self.record is not None and head:
            with contextlib.suppress(OSError):  # a full disk: the next batch keeps it
                durable.write_bytes(self.record, f"{head}\n".encode(), sync=False)

    def rewound(self) -> str | None:
        """Why state/'s branch no longer holds the supervisor's last commit as kept in `record`
        (a reset, a rewritten history, a new repository); None when it does."""
        return self._moved(commits=False)[0]

    def moved_while_away(self) -> list[str]:
        """How state/'s branch moved since the supervisor last kept its head: `rewound`, else
        each commit in between that another committer made; one line each."""
        why, commits = self._moved(commits=True)
        return [why] if why is not None else commits

    def _moved(self, *, commits: bool) -> tuple[str | None, list[str]]:
        try:
            kept = self.record.read_text("ascii").strip() if self.record is not None else ""
        except (OSError, UnicodeDecodeError):
            kept = ""
        head = self.head()
        if not kept or kept == head:
            return None, []
        try:
            self.git("merge-base", "--is-ancestor", kept, head)
        except GitError:
            return (f"state/'s branch was moved from {kept[:10]} to {head[:10] or 'no commit'}, which does not "
                    "contain the supervisor's last commit"), []
        if not commits:
            return None, []
        out = self.git("log", "-z", "--format=%H%x00%cn%x00%s", f"{kept}..{head}")
        return None, [one_line(f"{sha[:10]} by {committer}: {subject}")
                      for sha, committer, subject in log_records(out, 3) if committer != SUPERVISOR]

    def head(self) -> str:
        """The commit HEAD names ("" before the first), read from the ref files when they are
        plain (a git process per batch saved), else asked of git."""
        git_dir = self.path / ".git"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            head = (git_dir / "HEAD").read_text("ascii").strip()
            if head.startswith("ref: refs/heads/"):
                sha = (git_dir / head[len("ref: "):]).read_text("ascii").strip()
                if re.fullmatch(r"[0-9a-f]{40}", sha):
                    return sha
        try:
            return self.git("rev-parse", "--verify", "-q", "HEAD").strip()
        except GitError:
            return ""  # no commit yet

    def add(self, paths: set[str]) -> None:
        root = str(self.path.resolve())
        rel = sorted({os.path.relpath(p, root) for p in (os.path.abspath(x) for x in paths)
                      if p == root or p.startswith(root + os.sep)})
        # Claimed files pass through intake/ within one step and were never committed:
        # a pathspec for them would not match.
        rel = [r for r in rel if not r.startswith(".git")
               and not (r.startswith("intake/") and not os.path.lexists(os.path.join(root, r)))]
        if not rel:
            return
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

    def commit_now(self, actor: str, line: str) -> None:
        self.stage(actor, line)
        self.flush()

    def dirty(self, *, optional_locks: bool = True) -> list[str]:
        """Paths changed, added or removed since the last commit. `optional_locks=False` from
        another process than the supervisor: git then leaves the index as it is.

        The tamper watch asks every few seconds. Listing every folder of state/ file by file
        was 70 of the 120 ms with 10,000 orders in it; git's untracked cache names new folders
        with one look at each folder whose time did not change, and only those new folders are
        then listed file by file."""
        out = self.git(*_UNTRACKED_CACHE, "status", "--porcelain", "-z", "--untracked-files=normal",
                       optional_locks=optional_locks)
        paths = _status_paths(out)
        folders = [p for p in paths if p.endswith("/")]
        if not folders:
            return paths
        files = [p for p in paths if not p.endswith("/")]
        for start in range(0, len(folders), 500):  # the command line stays short
            # Only untracked files are in them: listed without refreshing the whole index again.
            out = self.git("ls-files", "--others", "--exclude-standard", "-z", "--",
                           *folders[start:start + 500], optional_locks=optional_locks, literal=True)
            files += [p for p in out.split("\0") if p]
        return list(dict.fromkeys(files))

    def recover(self, written: dict[str, int] | None = None) -> tuple[list[str], list[str]]:
        """Commit what a crash left uncommitted, with an explicit recovery message: (committed,
        put back). With `written`, the supervisor's journal of what it wrote (see
        `durable.read_journal`), a change it does not account for is a hand edit made while no
        supervisor ran: put back from git, never committed as the supervisor's."""
        # Temp names (a state/.gitignore without them lists them) are nobody's change: a write
        # the crash cut off, never to be committed or put back.
        changed = [p for p in self.dirty() if not p.startswith("intake/") and not _ignored(p)]
        foreign = [] if written is None else \
            [p for p in changed if not durable.written_by_journal(p, self.path, written)]
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
        itself, never a pattern: a file named `orders/*` by hand must not put back every order."""
        for p in paths:
            tracked = self.git("ls-files", "--", p, literal=True).strip()
            if tracked:
                self.git("checkout", "HEAD", "--", p, literal=True)
            else:
                with contextlib.suppress(OSError):
                    (self.path / p).unlink()

    def git(self, *args: str, actor: str = SUPERVISOR, stdin: BinaryIO | None = None,
            optional_locks: bool = True, literal: bool = False) -> str:
        """Run git in state/. A lock another git holds (a `git status` refreshing the index,
        `audit verify` beside the supervisor) is waited for, up to LOCK_WAIT seconds; then a
        lock no live git holds is cleared, once."""
        env = trusted_env(actor)
        if not optional_locks:
            env["GIT_OPTIONAL_LOCKS"] = "0"  # a read that must not take the index lock from a writer
        if literal:
            env["GIT_LITERAL_PATHSPECS"] = "1"  # paths as they are: `*`, `?` and `[` are no patterns
        end = time.monotonic() + LOCK_WAIT
        delay, cleared = 0.005, False
        while True:
            try:
                out: str = self._cmd.execute(["git", *GIT_OPTS, *args], env=env, istream=stdin,
                                             strip_newline_in_stdout=False)
                return out
            except git.GitCommandError as e:
                why = _stderr(e)
                if not _LOCKED.search(why) or (time.monotonic() >= end and cleared):
                    raise GitError(f"git {_command(args)} failed in state/: {why}") from None
                if time.monotonic() >= end:
                    cleared = True
                    clear_stale_locks(self.path / ".git")
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                if stdin is not None:
                    stdin.seek(0)

    # -- reading ----------------------------------------------------------------------------------
    def entries(self, order_id: str | None = None) -> list[Entry]:
        """The trail, oldest first; only the lines about `order_id` when given."""
        found: list[Entry] = []
        out = self.git("log", "-z", "--reverse", "--format=%H%x00%an%x00%aI%x00%B")
        for sha, author, at, body in log_records(out, 4):
            for line in body.split("\n"):  # not splitlines(): a \x1e in a message breaks no line
                m = TRANSITION.match(line)
                if order_id is not None:
                    # An order's own lines: its transitions and its events ("WO-1 chip: stale …").
                    if m is not None and m.group("id") != order_id:
                        continue
                    if m is None and not line.startswith(f"{order_id} "):
                        continue
                if not line.strip():
                    continue
                found.append(Entry(sha, author, at, line, m.group("id") if m else None,
                                   m.group("old") if m else None, m.group("new") if m else None))
        return found

    def foreign_commits(self) -> list[str]:
        """Commits in state/ whose committer is not the supervisor: hand-made."""
        bad = []
        out = self.git("log", "-z", "--format=%H%x00%cn%x00%s")
        for sha, committer, subject in log_records(out, 3):
            if committer != SUPERVISOR:
                bad.append(one_line(f"{sha[:10]} by {committer}: {subject}"))
        return bad


@dataclass
class Batch:
    """Commits to make: (actor, lines, order ids) per commit, and the files to stage."""

    groups: list[tuple[str, list[str], list[str]]]
    paths: set[str] | None


@dataclass
class Look:
    """The tamper watch's look at state/, taken by the committer thread in its turn: after
    every batch handed over before it, so that all the supervisor wrote until then is
    committed and what git still finds changed is someone else's, or written since.

    `taken`: the paths of the batches handed over after it (the loop adds them), which
    may have been written, but not yet committed, when git looked.
    """

    taken: set[str] = field(default_factory=set)
    moved: list[str] = field(default_factory=list)  # commits the supervisor did not make
    dirty: list[str] = field(default_factory=list)  # paths changed since the last commit
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Committer:
    """The one writer of state/'s git repository while the supervisor loop runs.

    Commits cost 15-25 ms and more as state/ grows; the loop hands finished batches to
    this thread and goes on taking and starting orders. Batches are written in order.
    Whoever needs state/ committed (a restore, a stop, a test) calls `drain()`. A batch
    that fails is kept, and so is every batch after it, unwritten (a later one must not
    land before it): `failed()` hands them back to the loop's thread with the error, to
    be staged again, never lost. The tamper watch's look at state/ (`look`) runs here
    too, in turn with the batches, so the loop never waits on it.
    """

    def __init__(self, repo: StateRepo, *, before: Callable[[], None] | None = None) -> None:
        self.repo = repo
        self._before = before
        self._queue: queue.Queue[Batch | Look | None] = queue.Queue()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._unsettled: list[Batch] = []  # handed over and not committed, oldest first
        self.committed = 0  # batches committed so far
        self._thread = threading.Thread(target=self._run, daemon=True, name="state-committer")
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        with self._lock:
            self._unsettled.append(batch)
        self._queue.put(batch)

    def look(self) -> Look:
        """Ask for a look at state/ once the batches submitted so far are committed; it is
        done (`Look.done`) when the thread got there."""
        look = Look()
        self._queue.put(look)
        return look

    def drain(self) -> None:
        """Wait until every submitted batch is committed, or kept by a failure (`failed`)."""
        self._queue.join()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def uncommitted(self) -> set[str]:
        """The paths of the batches handed over and not committed yet."""
        with self._lock:
            return {p for b in self._unsettled for p in b.paths or ()}

    def failed(self) -> tuple[BaseException, list[Batch]] | None:
        """After a batch failed: the error and every batch not committed (that one and those
        handed over after it), oldest first, taken back; None when none failed. Then the
        thread commits what it is handed again."""
        if self._error is None:
            return None
        self._queue.join()  # the batches after it are passed over: none is left to write later
        with self._lock:
            error, self._error = self._error, None
            batches, self._unsettled = self._unsettled, []
        return error, batches

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                if isinstance(batch, Look):
                    self._look(batch)
                elif self._error is None:
                    if self._before is not None:
                        self._before()
                    self.repo.write(batch)
                    with self._lock:
                        del self._unsettled[0]  # this one: batches are written in order
                        self.committed += 1
            except BaseException as e:  # the batches go back to the loop's thread: see `failed`
                self._error = e
            finally:
                self._queue.task_done()

    def _look(self, look: Look) -> None:
        try:
            if self._error is not None:
                return  # a batch before it failed: its files would look changed by someone else
            look.moved = self.repo.moved_by_others()
            look.dirty = self.repo.dirty()
        except BaseException as e:  # raised in the loop's thread when it takes the look
            look.error = e
        finally:
            look.done.set()


def one_line(text: str) -> str:
    """`text` as one line of a commit message: line breaks, tabs and every other character
    that is not printable (escape sequences, NUL) become spaces, runs of spaces one."""
    if text.isprintable():
        return text
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


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


def log_records(out: str, fields: int, where: str = "state/") -> list[list[str]]:
    """The commits of `git log -z` whose format is `fields` fields joined by %x00, each as
    the list of its fields. NUL is the one byte git takes in no commit message: the \\x1e
    and \\x1f this was split on once came in a message and broke `audit verify`."""
    parts = out.split("\0")
    if parts[-1] == "":
        parts.pop()  # after the last commit's terminator
    records = [parts[i:i + fields] for i in range(0, len(parts), fields)]
    if any(len(r) != fields or not _SHA.fullmatch(r[0]) for r in records):
        raise GitError(f"{where}'s history cannot be read: a commit in it is not one git makes "
                       "(`git log` there shows it)")
    return records


_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def run(path: Path, *args: str, actor: str = SUPERVISOR) -> str:
    try:
        out: str = git.Git(str(path)).execute(["git", *GIT_OPTS, *args], env=trusted_env(actor))
        return out
    except git.GitCommandError as e:
        raise GitError(f"git {args[0]} failed in {path.name}/: {_stderr(e)}") from None


def _ignored(rel: str) -> bool:
    """A name state/.gitignore keeps out (temp files): `git add` refuses it loudly, update-index would not."""
    return any(fnmatch.fnmatchcase(os.path.basename(rel), pattern) for pattern in IGNORED)


def _status_paths(out: str) -> list[str]:
    """The paths of `git status --porcelain -z` (a folder nothing of is tracked ends in /)."""
    paths: list[str] = []
    fields = iter(out.split("\0"))
    for entry in fields:
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if entry[0] in "RC":  # a rename or copy staged: its old path comes next
            old = next(fields, "")
            if old:
                paths.append(old)
    return paths


def _kind(path: str) -> str:
    """"file" (a regular file or a link), "folder", or "gone"."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "folder"  # cannot look: `git add` says why
    return "folder" if stat.S_ISDIR(mode) else "file"


# "fatal: Unable to create '.../index.lock': File exists." - another git holds that lock.
_LOCKED = re.compile(r"\.lock'?: File exists")
LOCK_WAIT = 5.0


def _command(args: tuple[str, ...]) -> str:
    """The git command of `args`, past the `-c name=value` options in front."""
    rest = list(args)
    while rest and rest[0] == "-c":
        rest = rest[2:]
    return rest[0] if rest else "?"


def _stderr(e: git.GitCommandError) -> str:
    text = (e.stderr or str(e)).strip().replace("\n", " ")
    return text.removeprefix("stderr: ").strip("'")[:300]


def clear_stale_locks(git_dir: Path, *, now: float | None = None) -> list[str]:
    """Remove lock files no live git process holds (a git that was killed mid-write)."""
    import time

    now = time.time() if now is None else now
    cleared: list[str] = []
    if not git_dir.is_dir():
        return cleared
    busy = _git_processes_using(git_dir)
    for name in LOCK_NAMES:
        lock = git_dir / name
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
    repo = str(git_dir.parent.resolve())
    with contextlib.suppress(FileNotFoundError):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if not f.read().startswith("git"):
                        continue
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if cwd == repo or cwd.startswith(repo + "/"):
                return True
    return False
