"""The audit trail read back: state/'s git repository, the one way git runs there, its history.

`Trail` runs git in `state/` with a trusted environment (hooks and signatures off, the
actor as author, `coordinator` as committer) and waits out a lock another git holds. It
reads the trail back as `Entry`s, tells the supervisor's own commits from anyone else's,
and lists what changed in `state/` since the last commit. `audit.StateRepo` writes the
trail on top of it.

Example line:
    WO-0042 chip: running -> done
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from . import durable, gitlocks
from .errors import GitError

try:
    import git
except ImportError as e:
    # With no git on PATH, GitPython's import fails with 20 lines of advice about its own
    # variables, and every command that reads state/ (board, log, init) ended in an
    # "internal error": one line instead, as where the supervisor runs git itself.
    if "git executable" not in str(e):
        raise
    raise GitError("git is not installed or not on PATH; install git 2.25 or newer") from None

SUPERVISOR = "coordinator"
FOREIGN = "state-foreign"  # beside the kept head: the commits in state/ the supervisor found not its own
LOST = "state-lost"  # beside the kept head: its last commits that state/ no longer holds at all
DOMAIN = "agents.coordinator"
TRANSITION = re.compile(r"^(?P<id>\S+) (?P<agent>\S+): (?P<old>[a-z-]+) -> (?P<new>[a-z-]+)(?: \((?P<note>.*)\))?$")


def trusted_env(actor: str = SUPERVISOR, committer: str = SUPERVISOR) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({
        "GIT_AUTHOR_NAME": actor, "GIT_AUTHOR_EMAIL": f"{actor}@{DOMAIN}",
        "GIT_COMMITTER_NAME": committer, "GIT_COMMITTER_EMAIL": f"{committer}@{DOMAIN}",
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
        # The history as committed: a `git replace` by hand would show other commits in its place.
        "GIT_NO_REPLACE_OBJECTS": "1",
        # glibc gave the heap back after every object git zipped (brk down, brk up, 4 calls
        # an object): half of a batch's `update-index` time with a few hundred files.
        "GLIBC_TUNABLES": ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), _KEEP_HEAP))),
    })
    return env


_KEEP_HEAP = "glibc.malloc.trim_threshold=268435456:glibc.malloc.top_pad=16777216"

# log.showSignature: a person's config that shows signatures puts their text in front of the
# fields `git log -z` is read by, for a signed commit made by hand in state/.
# core.excludesFile: a person's ignore file (in their config, state/'s, or git's default
# ~/.config/git/ignore) must neither hide a hand-made file from the tamper watch nor keep the
# supervisor's own files out of a commit.
# core.ignoreStat: set in a person's config, git marks every file it stages assume-unchanged,
# the mark the tamper watch takes for a file hidden by hand (`Trail._marked`).
GIT_OPTS = ("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "gc.auto=0",
            "-c", "commit.gpgsign=false", "-c", "core.quotepath=false", "-c", "log.showSignature=false",
            "-c", "core.excludesFile=/dev/null", "-c", "core.ignoreStat=false")

# state/.gitignore: temp files are never committed (and never a change: a write in flight, or
# one a crash cut off, cleaned up at the next start). Nothing else in state/ is ignored.
# Temp files: the supervisor's own, and an editor's beside a record a person opened to read
# (vim's swap files and its 4913 probe, backups, emacs locks and auto-saves). Nobody's change:
# never committed, never put back, never a signal.
IGNORED = ("*.tmp", f"{durable.TMP_PREFIX}*", ".*.sw[a-p]", "*~", ".#*", "#*#", "4913")


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


class Trail:
    """The git repository under `state/`, read: its history, its head, its changes since."""

    def __init__(self, path: Path, *, record: Path | None = None) -> None:
        self.path = path
        # Where the supervisor keeps the head of its own last commit, outside state/ (a reset
        # of state/ cannot take it along): what a start checks state/'s branch against.
        self.record = record
        # The branch as the supervisor's own last commit left it (None: not known yet), and the
        # moves of others a batch found on the way: `moved_by_others` says them.
        self.mine: str | None = None
        self._others: list[tuple[str, str]] = []
        self._home: str | None = None  # see `home`
        self._cmd = git.Git(str(path))

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
                    raise GitError(f"git {_command(args)} failed in state/: {why}{_damaged(why)}") from None
                if time.monotonic() >= end:
                    cleared = True
                    gitlocks.clear_stale_locks(self.path / ".git")
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                if stdin is not None:
                    stdin.seek(0)

    def blob(self, spec: str) -> bytes | None:
        """The bytes of the blob `spec` names (`HEAD:signals.jsonl`); None when it names none."""
        try:
            self.git("cat-file", "-e", spec)
        except GitError:
            return None
        try:  # as bytes, never decoded: it is committed again as it is
            out: bytes = self._cmd.execute(["git", *GIT_OPTS, "cat-file", "blob", spec], env=trusted_env(SUPERVISOR),
                                           stdout_as_string=False, strip_newline_in_stdout=False)
        except git.GitCommandError as e:
            raise GitError(f"git cat-file blob {spec} failed in state/: {_stderr(e)}{_damaged(_stderr(e))}") from None
        return out

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

    # -- the supervisor's commits and others' ----------------------------------------------------
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
            commits = log_records(log, 3)
            self.note_foreign([sha for sha, _, _ in commits])
            found += [one_line(f"{sha[:10]} by {author}: {subject}") for sha, author, subject in commits]
        return found

    def note_foreign(self, shas: list[str]) -> None:
        """Keep, beside `record`, the commits the supervisor found in state/'s history and did
        not make: one made in its name (`git -c user.name=coordinator commit`) is told from its
        own by nothing in it, and `audit verify` lists these (`foreign_commits`) for good."""
        if self.record is None or not shas:
            return
        with contextlib.suppress(OSError):  # a full disk: the signal still says it
            durable.append_line(self._foreign_file(), "\n".join(shas))

    def note_lost(self, kept: str, head: str) -> None:
        """Keep, beside `record`, that the supervisor's last commit `kept` is gone from state/
        (its history rewritten and pruned, state/ removed and made anew), found at `head`: the
        branch cannot be put back on it, and from here the supervisor goes on from `head`, so
        `audit verify` would find nothing wrong any more; it lists these (`lost`) for good."""
        if self.record is None or not kept or kept in dict(self.lost()):
            return
        with contextlib.suppress(OSError):  # a full disk: the signal still says it
            durable.append_line(self.record.with_name(LOST), f"{kept} {head or '-'}")

    def lost(self) -> list[tuple[str, str]]:
        """(the supervisor's commit, the head state/ had instead) per commit noted lost."""
        if self.record is None:
            return []
        try:
            text = self.record.with_name(LOST).read_text("ascii", errors="replace")
        except OSError:
            return []
        return [(w[0], w[1]) for w in (line.split() for line in text.splitlines()) if len(w) == 2]

    def _foreign_file(self) -> Path:
        assert self.record is not None
        return self.record.with_name(FOREIGN)

    def _noted_foreign(self) -> set[str]:
        if self.record is None:
            return set()
        try:
            return set(self._foreign_file().read_text("ascii", errors="replace").split())
        except OSError:
            return set()

    def own(self, head: str) -> None:
        """Take `head` as the branch the supervisor's own commits left, and keep it in `record`
        with the branch's name (`home`)."""
        self.mine = head
        if self.record is not None and head:
            with contextlib.suppress(OSError):  # a full disk: the next batch keeps it
                durable.write_bytes(self.record, f"{head} {self.home()}\n".encode(), sync=False)

    def home(self) -> str:
        """The branch the supervisor commits on (`refs/heads/main`): as it kept it with its last
        head, else `main` (what `StateRepo.ensure` makes), else the one HEAD names. Never the
        branch HEAD names now just because it names it: a `git checkout -b` in state/ by hand
        would take the supervisor's commits along to a branch of theirs."""
        if self._home is None:
            words = self._record_words()
            if len(words) > 1 and words[1].startswith("refs/heads/"):
                self._home = words[1]
            elif self._has_ref("refs/heads/main") or not self.branch():
                self._home = "refs/heads/main"
            else:
                self._home = self.branch()
        return self._home

    def branch(self) -> str:
        """The branch HEAD names ("" when HEAD is detached): read from the ref files when HEAD
        plainly names a branch whose loose ref holds a commit id (a git process per batch
        saved), else asked of git."""
        git_dir = os.path.join(self.path, ".git")
        with contextlib.suppress(OSError, UnicodeDecodeError):
            named = _BRANCH_NAMED.fullmatch(_small_file(os.path.join(git_dir, "HEAD")))
            if (named is not None and all(_REF_PART.fullmatch(part) for part in named[1].split("/")[2:])
                    and _LOOSE_REF.fullmatch(_small_file(os.path.join(git_dir, named[1])))):
                return named[1]
        try:
            return self.git("symbolic-ref", "-q", "HEAD").strip()
        except GitError:
            return ""

    def switched(self) -> str | None:
        """Why HEAD does not name the supervisor's branch (a `git checkout` of another branch
        or of a commit), or None when it does."""
        now = self.branch()
        if now == self.home():
            return None
        return (f"state/'s HEAD was switched from {_short(self.home())} to "
                f"{_short(now) if now else 'a detached commit'}")

    def _has_ref(self, ref: str) -> bool:
        try:
            self.git("rev-parse", "-q", "--verify", f"{ref}^{{commit}}")
            return True
        except GitError:
            return False

    def rewound(self) -> str | None:
        """Why state/'s branch no longer holds the supervisor's last commit as kept in `record`
        (a reset, a rewritten history, a new repository); None when it does."""
        return self._moved(commits=False)[0]

    def moved_while_away(self, *, crashed: bool = True) -> list[str]:
        """How state/'s branch moved since the supervisor last kept its head: `rewound`, else
        each commit in between that is not the supervisor's; one line each.

        A committer's name is anyone's to give (`git -c user.name=coordinator commit`): after
        a clean stop, when the supervisor kept the head of its last commit, every commit past
        it is someone else's. Only a crash between a commit and keeping its head leaves the
        supervisor's own commits there, known by their committer."""
        why, commits = self._moved(commits=True, by_name=crashed)
        if why is not None:
            return [why]
        self.note_foreign([sha for sha, _ in commits])
        return [line for _, line in commits]

    def named_as_supervisor(self) -> list[str]:
        """The commits past the supervisor's kept head that name it as their committer: made
        by someone else in its name, once it stopped cleanly (see `moved_while_away`)."""
        everyone = self._moved(commits=True, by_name=False)[1]
        by_others = set(self._moved(commits=True, by_name=True)[1])
        return [line for sha, line in everyone if (sha, line) not in by_others]

    def kept(self) -> str:
        """The head of the supervisor's last commit as kept in `record` ("" when not known)."""
        words = self._record_words()
        return words[0] if words else ""

    def _record_words(self) -> list[str]:
        try:
            return self.record.read_text("ascii").split() if self.record is not None else []
        except (OSError, UnicodeDecodeError):
            return []

    def _moved(self, *, commits: bool, by_name: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
        """Why the branch does not hold the kept head (None when it does), and the commits past
        it, each as (sha, line): those that do not name the supervisor, or with `by_name` off all."""
        kept = self.kept()
        head = self.head()
        switched = self.switched() if kept else None
        if switched is not None:
            return f"{switched}; the supervisor commits on {_short(self.home())}", []
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
        return None, [(sha, one_line(f"{sha[:10]} by {committer}: {subject}"))
                      for sha, committer, subject in log_records(out, 3)
                      if committer != SUPERVISOR or not by_name]

    # -- reading ----------------------------------------------------------------------------------
    def dirty(self, *, optional_locks: bool = True) -> list[str]:
        """Paths changed, added or removed since the last commit, temp files (IGNORED) aside.
        `optional_locks=False` from another process than the supervisor: git then leaves the
        index as it is.

        Ignored files are listed too: a pattern in state/.git/info/exclude, or a `.gitignore`
        made by hand in a folder of state/ (which ignores itself with `*`), would otherwise
        hide a hand-made file from the tamper watch and from `audit verify`. (That costs git's
        untracked cache, which `--ignored` cannot use: every folder of state/ is read.) New
        folders are named once and then listed file by file."""
        marked = self._marked(clear=optional_locks)
        out = self.git("status", "--porcelain", "-z", "--untracked-files=normal", "--ignored=matching",
                       optional_locks=optional_locks)
        # One path may be listed twice: taken out of the index by hand (`git rm --cached`) and untracked.
        paths = list(dict.fromkeys(p for p in _status_paths(out) if not temp_name(p)))
        if not optional_locks:
            paths = list(dict.fromkeys(paths + marked))
        folders = [p for p in paths if p.endswith("/")]
        if not folders:
            return paths
        files = [p for p in paths if not p.endswith("/")]
        for start in range(0, len(folders), 500):  # the command line stays short
            # Only untracked files are in them, ignored or not: listed without refreshing the index again.
            out = self.git("ls-files", "--others", "-z", "--", *folders[start:start + 500],
                           optional_locks=optional_locks, literal=True)
            files += [p for p in out.split("\0") if p and not temp_name(p)]
        return list(dict.fromkeys(files))

    def _marked(self, *, clear: bool) -> list[str]:
        """Files of state/'s index marked `assume-unchanged` or `skip-worktree` (`git update-index`
        by hand; the supervisor never marks one): git does not look at them, so a hand edit of
        one would be hidden. With `clear`, the marks are taken off first, and `status` sees
        the files again; without (another process than the supervisor must not write the
        index), the marked files themselves are what is found."""
        valid: list[str] = []
        skip: list[str] = []
        for entry in self.git("ls-files", "-v", "-z").split("\0"):
            if len(entry) > 2:
                if entry[0].islower():  # assume-unchanged ("s": skip-worktree as well)
                    valid.append(entry[2:])
                if entry[0] in "Ss":
                    skip.append(entry[2:])
        if clear:
            # One kind of mark per call: update-index applies only the first it is given.
            for flag, paths in (("--no-assume-unchanged", valid), ("--no-skip-worktree", skip)):
                if paths:
                    spec = self.path / ".git" / "coordinator-pathspec"
                    spec.write_bytes("\0".join(paths).encode("utf-8", "surrogateescape"))
                    with spec.open("rb") as stdin:
                        self.git("update-index", flag, "-z", "--stdin", stdin=stdin)
        return list(dict.fromkeys(valid + skip))

    def entries(self, order_id: str | None = None) -> list[Entry]:
        """The trail, oldest first; only the lines about `order_id` when given."""
        found: list[Entry] = []
        agents: set[str] = set()  # whom `order_id` went to, as its transitions say
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
                    if m is not None:
                        agents.add(m.group("agent"))
                if not line.strip():
                    continue
                found.append(Entry(sha, author, at, line, m.group("id") if m else None,
                                   m.group("old") if m else None, m.group("new") if m else None))
        if order_id is not None:
            # An event names the order's agent after its id: an order named `signal` or `budget`
            # took in the supervisor's own lines ("signal silent: - -: …"), even from before it.
            found = [e for e in found if e.order is not None
                     or any(e.line.startswith(f"{order_id} {agent}: ") for agent in agents)]
        return found

    def foreign_commits(self) -> list[str]:
        """Commits in state/ whose committer is not the supervisor, or that the supervisor found
        made beside it in its name (`note_foreign`): hand-made."""
        bad = []
        noted = self._noted_foreign()
        out = self.git("log", "-z", "--format=%H%x00%cn%x00%s")
        for sha, committer, subject in log_records(out, 3):
            if committer != SUPERVISOR or sha in noted:
                bad.append(one_line(f"{sha[:10]} by {committer}: {subject}"))
        return bad


def temp_name(rel: str) -> bool:
    """A name state/.gitignore keeps out (IGNORED): a temp file."""
    return any(fnmatch.fnmatchcase(os.path.basename(rel.rstrip("/")), pattern) for pattern in IGNORED)


def _short(ref: str) -> str:
    return ref.removeprefix("refs/heads/")


def one_line(text: str) -> str:
    """`text` as one line of a commit message: line breaks, tabs and every other character
    that is not printable (escape sequences, NUL) become spaces, runs of spaces one."""
    if text.isprintable():
        return text
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


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
# HEAD as git writes it when it names a branch; a name of these parts is one git takes as it is.
_BRANCH_NAMED = re.compile(r"ref: (refs/heads/[^\s]+)\n?")
_LOOSE_REF = re.compile(r"[0-9a-f]{40}\n?")
_REF_PART = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9_-]|\.(?!\.))*(?<![.])(?<!\.lock)")


def _small_file(path: str) -> str:
    """The text of a regular file of git's own (HEAD, a loose ref), never through a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return durable.read_fd(fd, 4096).decode("ascii")
    finally:
        os.close(fd)


def run(path: Path, *args: str, actor: str = SUPERVISOR) -> str:
    try:
        out: str = git.Git(str(path)).execute(["git", *GIT_OPTS, *args], env=trusted_env(actor))
        return out
    except git.GitCommandError as e:
        raise GitError(f"git {args[0]} failed in {path.name}/: {_stderr(e)}") from None


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


# What git says of an object or an index it cannot read: a disk that lost a write, a file
# changed by hand in state/.git. Its words alone left a person with no idea what to do.
_DAMAGED = re.compile(r"is corrupt|inflate: data stream error|unable to unpack|bad object|object file .* is empty|"
                      r"unable to read|could not parse|invalid object|missing (?:blob|tree|commit)|index file corrupt")


def _damaged(why: str) -> str:
    """What to do, when `why` says state/'s git repository is damaged; "" otherwise."""
    if not _DAMAGED.search(why):
        return ""
    return ("; state/'s git repository is damaged: `git -C state fsck` names what is broken, and a backup of "
            "state/.git puts it back")


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

