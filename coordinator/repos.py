"""The repositories under `repos/`: working copies per order, trusted git, commits and merges.

Every git command the supervisor runs goes through `run_git`: the real git dir is
named explicitly (never the `.git` pointer file inside a working copy, which the
agent could have rewritten), hooks and fsmonitor are off, and no `GIT_*`
variable of the caller leaks in. Each call is one short git process; nothing
long-lived is left behind.

A working copy is a linked worktree on branch `wo/<order-id>`. Its admin folder
(`<git dir>/worktrees/<name>`) is found from git's own records, which live in
the repository and are out of the agent's reach.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from . import durable
from .errors import GitError
from .paths import real, within

GIT_TIMEOUT = 300.0  # seconds; one git call on a small repository takes milliseconds
COORDINATOR_IDENT = ("coordinator", "coordinator@agents.coordinator")
AGENT_EMAIL_DOMAIN = "agents.coordinator"
BRANCH_PREFIX = "wo/"
KEPT_REASON = "coordinator: kept for inspection"
MERGE_RETRIES = 3
STALE_LOCK_AGE = 600.0  # without /proc, a lock this old is taken as abandoned

# Forced on every call, whatever the user's or the repository's config says.
_TRUSTED_CONFIG = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "gc.auto=0",
    "commit.gpgSign=false",
    "color.ui=never",
    "core.quotePath=false",
    "rerere.enabled=false",
    "advice.detachedHead=false",
)
_ORDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?\Z")
_REPO_LOCKS: dict[str, threading.RLock] = {}
_REPO_LOCKS_GUARD = threading.Lock()
_Entry = tuple[str, str]  # (mode, blob sha) of a path in a tree, the index or the checkout
MOVE_MARK = "coordinator-moving"  # in the git dir while a merge moves the checkout and the branch


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without any GIT_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"})
    if extra:
        env.update(extra)
    return env


def ident_env(name: str, email: str) -> dict[str, str]:
    return {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}  # fmt: skip


def run_git(
    args: list[str],
    *,
    git_dir: Path | None,
    work_tree: Path | None = None,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    check: bool = True,
    timeout: float = GIT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run one trusted git command and wait for it; raise GitError on failure when `check`."""
    argv = ["git"]
    if git_dir is not None:
        argv.append(f"--git-dir={git_dir}")
    if work_tree is not None:
        argv.append(f"--work-tree={work_tree}")
    for item in _TRUSTED_CONFIG:
        argv += ["-c", item]
    argv += args
    verb = next((a for a in argv[len(argv) - len(args) :] if not a.startswith("-")), "?")
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=clean_env(env), input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, text=True, encoding="utf-8", errors="surrogateescape",
            timeout=timeout,
        )  # fmt: skip
    except FileNotFoundError as e:
        raise GitError("git is not installed or not on PATH; install git 2.25 or newer") from e
    except subprocess.TimeoutExpired as e:
        raise GitError(f"git {verb} took over {timeout:.0f}s in {cwd}; is a disk or lock stuck?") from e
    if check and proc.returncode != 0:
        said = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise GitError(f"git {verb} failed in {cwd}: {said.splitlines()[-1]}")
    return proc


class MergeConflict(GitError):
    """wo/<id> and the default branch changed the same lines; nothing was merged."""

    def __init__(self, repo: str, order_id: str, branch: str, paths: Iterable[str]) -> None:
        self.paths = tuple(dict.fromkeys(paths))
        self.order_id = order_id
        super().__init__(
            f"{repo}: wo/{order_id} conflicts with {branch} in {', '.join(self.paths) or '(unknown paths)'}; "
            f"the next attempt must start again from the current {branch}"
        )


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


class _Worktree(NamedTuple):
    """git's record of one linked worktree (in the repository, out of the agent's reach)."""

    admin: Path  # <git dir>/worktrees/<name>: the working copy's own git dir
    tree: Path
    head: str  # "refs/heads/wo/<id>", or a sha when detached
    locked: bool


class Repo:
    """One repository under `repos/` with a checked-out default branch."""

    def __init__(self, path: Path, *, in_memory_merge: bool | None = None) -> None:
        self.path = Path(os.path.abspath(path))
        self.name = self.path.name
        dot = self.path / ".git"
        if not self.path.is_dir():
            raise GitError(f"repos/{self.name}: no such folder; clone or create the repository there")
        if not dot.is_dir() or dot.is_symlink():
            raise GitError(
                f"repos/{self.name} is not a git repository with its own .git folder; "
                "put a normal clone there (not a worktree, submodule or bare repository)"
            )
        self.git_dir = Path(os.path.realpath(dot))
        self.git("rev-parse", "--git-dir")  # a broken .git fails here, with git's reason
        if in_memory_merge is None:
            # `merge-tree --write-tree` (git 2.38) merges without touching any checkout.
            in_memory_merge = self.git_version() >= (2, 38)
        self.in_memory_merge = in_memory_merge
        with _REPO_LOCKS_GUARD:
            self._lock = _REPO_LOCKS.setdefault(str(self.git_dir), threading.RLock())

    def __repr__(self) -> str:
        return f"Repo({str(self.path)!r})"

    # -- trusted git -------------------------------------------------------------------------

    def git(self, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
        """Run git on this repository (in working copy `cwd` if given); its stdout."""
        return self._run(list(args), cwd=cwd, env=env).stdout.rstrip("\n")

    def _run(self, args: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
             input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        if cwd is None:
            return run_git(args, git_dir=self.git_dir, cwd=self.git_dir, env=env, input=input, check=check)
        work = Path(os.path.abspath(cwd))
        admin = self._admin_dir(work)
        return run_git(args, git_dir=admin, work_tree=work, cwd=work, env=env, input=input, check=check)

    def git_version(self) -> tuple[int, int]:
        out = run_git(["version"], git_dir=None, cwd=self.path).stdout
        m = re.search(r"(\d+)\.(\d+)", out)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

    def _admin_dir(self, work: Path) -> Path:
        """The git dir of working copy `work`, from git's records (never its `.git` file)."""
        if _same(work, self.path):
            return self.git_dir
        for w in self._worktrees():
            if _same(w.tree, work):
                return w.admin
        raise GitError(f"{work} is not a working copy of repos/{self.name}")

    def _worktrees(self) -> list[_Worktree]:
        found = []
        root = self.git_dir / "worktrees"
        for admin in sorted(root.iterdir()) if root.is_dir() else []:
            try:
                tree = Path(_read(admin / "gitdir")).parent
                head = _read(admin / "HEAD").removeprefix("ref: ")
            except OSError:
                continue
            found.append(_Worktree(admin, tree, head, (admin / "locked").exists()))
        return found

    # -- branches ------------------------------------------------------------------------------

    def default_branch(self) -> str:
        ref = self._run(["symbolic-ref", "-q", "HEAD"], check=False).stdout.strip()
        if not ref.startswith("refs/heads/"):
            raise GitError(
                f"repos/{self.name}: HEAD is detached; check out the default branch there (git switch main)"
            )
        return ref[len("refs/heads/") :]

    def head(self) -> str:
        return self._sha(f"refs/heads/{self.default_branch()}")

    def tip(self) -> str:
        """`head()` read from the ref files when they are plain (HEAD naming a branch whose
        ref is a loose file): the tamper watch asks every few seconds, and `head()` is two
        git processes per repository. Anything else is asked of git."""
        with contextlib.suppress(OSError, UnicodeDecodeError):
            ref = (self.git_dir / "HEAD").read_text("ascii").strip().removeprefix("ref: ")
            if ref.startswith("refs/heads/") and ".." not in ref.split("/"):
                sha = (self.git_dir / ref).read_text("ascii").strip()
                if re.fullmatch(r"[0-9a-f]{40}", sha):
                    return sha
        return self.head()

    def _sha(self, ref: str) -> str:
        r = self._run(["rev-parse", "-q", "--verify", f"{ref}^{{commit}}"], check=False)
        if r.returncode != 0:
            raise GitError(f"repos/{self.name}: {ref} does not exist")
        return r.stdout.strip()

    def _has_ref(self, ref: str) -> bool:
        return self._run(["rev-parse", "-q", "--verify", ref], check=False).returncode == 0

    def made_by_merge(self, head: str, *, base: str, tip: str) -> bool:
        """Whether `head` is what `merge` makes of `tip` on a default branch at `base`: `tip`
        itself (a fast-forward), or a merge commit of the two."""
        if head == tip:
            return self._is_ancestor(base, tip)
        return self.git("rev-list", "--parents", "-n", "1", head).split()[1:] == [base, tip]

    def _is_ancestor(self, a: str, b: str) -> bool:
        return self._run(["merge-base", "--is-ancestor", a, b], check=False).returncode == 0

    # -- working copies -----------------------------------------------------------------------

    def add_worktree(self, order_id: str, dest: Path) -> Path:
        """A fresh working copy at `dest` on wo/<order_id> from the default branch's head."""
        branch = _branch(order_id)
        dest = Path(os.path.abspath(dest))
        for inside in (self.path, self.git_dir):
            if _under(dest, inside) or _under(inside, dest):
                raise GitError(f"working copy {dest} must lie outside repos/{self.name}")
        with self._lock:
            # An earlier attempt's copy and branch go first: each attempt starts from the current head.
            for w in self._worktrees():
                if _same(w.tree, dest) or w.head == f"refs/heads/{branch}":
                    self._drop(w)
            if dest.exists() or dest.is_symlink():
                _remove_tree(dest)
            self._run(["worktree", "prune"])
            if self._has_ref(f"refs/heads/{branch}"):
                self.git("update-ref", "-d", f"refs/heads/{branch}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.git("worktree", "add", "-q", "-b", branch, str(dest), self.head())
        return dest

    def remove_worktree(self, order_id: str, dest: Path, *, keep: bool = False) -> None:
        """Remove the working copy and its branch; with `keep`, lock it for `gc_worktrees`."""
        branch = _branch(order_id)
        dest = Path(os.path.abspath(dest))
        with self._lock:
            if keep:
                if not (self._admin_dir(dest) / "locked").exists():
                    reason = f"{KEPT_REASON} (order {order_id})"
                    self.git("worktree", "lock", "--reason", reason, str(dest))
                return
            for w in self._worktrees():
                if _same(w.tree, dest):
                    self._drop(w)
            if dest.exists() or dest.is_symlink():
                _remove_tree(dest)
            if self._has_ref(f"refs/heads/{branch}"):
                self.git("update-ref", "-d", f"refs/heads/{branch}")

    def _drop(self, w: _Worktree) -> None:
        # Deleting both folders ourselves works even when the agent made the copy unreadable
        # or replaced its .git pointer, where `git worktree remove` would refuse.
        if w.tree.exists() or w.tree.is_symlink():
            _remove_tree(w.tree)
        shutil.rmtree(w.admin, ignore_errors=True)

    def discard(self, worktree: Path) -> None:
        """Put the working copy back to its branch head: no change, no untracked or ignored file."""
        work = Path(os.path.abspath(worktree))
        admin = self._admin_dir(work)
        pointer = work / ".git"
        try:
            durable.unlock_tree(work)
            durable.remove_tree(pointer)  # whatever the agent put there: a folder, a link, a file
            pointer.write_text(f"gitdir: {admin}\n", encoding="utf-8")
            # What git does not track goes first, each untracked folder whole: `git clean` takes
            # its time quadratic in depth (46 s on 1,500 nested folders, which a check may write).
            for rel in _nul_split(self.git("ls-files", "-z", "--others", "--directory", cwd=work)):
                durable.remove_tree(work / rel.rstrip("/"))
        except OSError as e:
            raise GitError(f"cannot reset working copy {work}: {e}") from e
        self.git("reset", "-q", "--hard", "HEAD", cwd=work)
        self.git("clean", "-q", "-ffdx", cwd=work)

    # -- commits -------------------------------------------------------------------------------

    def commit(self, worktree: Path, paths: Iterable[str], *, agent: str, subject: str,
               trailers: Mapping[str, str],
               verify: Callable[[list[str]], None] | None = None) -> str | None:  # fmt: skip
        """Commit exactly `paths` (repo-relative) of the working copy on its wo/ branch, as `agent`.

        Ignored files that git does not track are left out. None when nothing changed.
        `verify(paths)` is called once git has read what it stages, before the commit is made;
        what it raises leaves the branch where it was.
        """
        work = Path(os.path.abspath(worktree))
        wanted = list(dict.fromkeys(paths))
        for p in wanted:
            _check_rel(p)
        head_ref = self._run(["symbolic-ref", "-q", "HEAD"], cwd=work, check=False).stdout.strip()
        if not head_ref.startswith(f"refs/heads/{BRANCH_PREFIX}"):
            raise GitError(f"{work} is not on a {BRANCH_PREFIX}<order> branch; refusing to commit there")
        old = self._sha(head_ref)
        # Start from the branch head so nothing the agent may have staged itself slips in.
        self.git("read-tree", old, cwd=work)
        if not wanted:
            return None
        tracked = set(_nul_split(self.git("ls-files", "-z", "--cached", cwd=work)))
        r = self._run(["check-ignore", "-z", "--stdin"], cwd=work, input=_nul_join(wanted), check=False)
        if r.returncode not in (0, 1):
            raise GitError(f"git check-ignore failed in {work}: {r.stderr.strip()}")
        ignored = set(_nul_split(r.stdout))
        add, remove = [], []
        for p in wanted:
            full = work / p
            is_file = full.is_symlink() or (full.exists() and not full.is_dir())
            if is_file and (p in tracked or p not in ignored):
                add.append(p)
            elif p in tracked:
                remove.append(p)
        if remove:
            self._run(["update-index", "--force-remove", "-z", "--stdin"], cwd=work, input=_nul_join(remove))
        if add:
            self._run(["update-index", "--add", "--replace", "-z", "--stdin"], cwd=work, input=_nul_join(add))
        if verify is not None:  # before "nothing changed": a judged change gone missing is a change too
            verify(wanted)
        tree = self.git("write-tree", cwd=work)
        if tree == self.git("rev-parse", f"{old}^{{tree}}"):
            return None
        body = subject.strip().replace("\n", " ") + "\n"
        if trailers:
            body += "\n" + "".join(f"{k}: {' '.join(str(v).split())}\n" for k, v in trailers.items())
        new = self._commit_tree(tree, [old], body, (agent, f"{agent}@{AGENT_EMAIL_DOMAIN}"))
        self.git("update-ref", "-m", f"coordinator: commit by {agent}", head_ref, new, old)
        return new

    def _commit_tree(self, tree: str, parents: list[str], message: str, who: tuple[str, str]) -> str:
        args = ["commit-tree", tree]
        for p in parents:
            args += ["-p", p]
        return self._run(args, env=ident_env(*who), input=message).stdout.strip()

    def landed(self, order_id: str, attempt: int | None = None) -> str | None:
        """The agent's commit for `order_id` (of `attempt`, if given) on the default branch, or None."""
        ref = f"refs/heads/{self.default_branch()}"
        out = self.git(
            "log", "-F", f"--grep=Work-Order: {order_id}",
            "--format=%H%x00%(trailers:only,unfold)%x00", ref,
        )  # fmt: skip
        fields = out.split("\0")
        for sha, block in zip(fields[0::2], fields[1::2], strict=False):
            # Lines end at a newline only: splitlines also splits at \x1c-\x1e, \x85 and \u2028.
            found = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
            if found.get("Work-Order") != order_id or "Agent" not in found:
                continue  # a merge commit, or another order whose id starts the same
            if attempt is None or found.get("Attempt") == str(attempt):
                return sha.strip()
        return None

    # -- merges --------------------------------------------------------------------------------

    def merge(self, order_id: str) -> str:
        """Bring wo/<order_id> into the default branch and its checkout; the new head's sha."""
        tip = self._sha(f"refs/heads/{_branch(order_id)}")
        with self._lock:
            for _ in range(MERGE_RETRIES):
                branch = self.default_branch()
                base = self.head()
                if self._is_ancestor(tip, base):
                    self.last_base = base
                    return base  # already in
                if self._is_ancestor(base, tip):
                    new = tip  # fast-forward
                else:
                    message = f"Merge wo/{order_id} into {branch}\n\nWork-Order: {order_id}\n"
                    new = self._merge_commit(order_id, branch, base, tip, message)
                if self._locked_move(branch, base, new, f"coordinator: merge wo/{order_id}"):
                    self.last_base = base
                    return new
                time.sleep(0.05)  # the branch moved, or a person's git holds the index: go again
        raise GitError(
            f"repos/{self.name}: the default branch kept moving while wo/{order_id} was merged; "
            "stop whatever else commits there and retry"
        )

    def _merge_commit(self, order_id: str, branch: str, base: str, tip: str, message: str) -> str:
        if self.in_memory_merge:
            args = ["merge-tree", "--write-tree", "--name-only", "--no-messages", "-z", base, tip]
            r = self._run(args, check=False)
            fields = r.stdout.split("\0")
            if r.returncode == 1:
                raise MergeConflict(self.name, order_id, branch, [f for f in fields[1:] if f])
            if r.returncode != 0 or not _SHA.match(fields[0]):
                raise GitError(f"git merge-tree failed in repos/{self.name}: {r.stderr.strip()}")
            return self._commit_tree(fields[0], [base, tip], message, COORDINATOR_IDENT)
        # Older git: merge in a throw-away detached working copy, never in the user's checkout.
        scratch = Path(tempfile.mkdtemp(prefix="coordinator-merge-"))
        work = scratch / self.name
        try:
            self.git("worktree", "add", "-q", "--detach", str(work), base)
            args = ["merge", "-q", "--no-ff", "--no-edit", "-m", message, tip]
            r = self._run(args, cwd=work, env=ident_env(*COORDINATOR_IDENT), check=False)
            if r.returncode != 0:
                conflicted = _nul_split(self.git("diff", "--name-only", "-z", "--diff-filter=U", cwd=work))
                if conflicted:
                    raise MergeConflict(self.name, order_id, branch, conflicted)
                raise GitError(f"git merge failed in repos/{self.name}: {r.stderr.strip()}")
            return self.git("rev-parse", "HEAD", cwd=work)
        finally:
            for w in self._worktrees():
                if _same(w.tree, work):
                    self._drop(w)
            shutil.rmtree(scratch, ignore_errors=True)

    # -- housekeeping --------------------------------------------------------------------------

    def _locked_move(self, branch: str, base: str, new: str, note: str) -> bool:
        """Move the checkout and the branch from `base` to `new` holding git's own index.lock
        throughout, as `git commit` holds it across its ref update: a person's git in the same
        checkout fails fast instead of interleaving. False when busy or the branch moved.
        What a kill -9 in between leaves, `heal_checkout` puts right at the next start."""
        index, lock = self.git_dir / "index", self.git_dir / "index.lock"
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False
        moving = self.git_dir / MOVE_MARK
        try:
            if index.exists():
                shutil.copyfile(index, lock)
            env = {"GIT_INDEX_FILE": str(lock)}
            if self.head() != base:
                return False
            # Left by a kill -9 from here on: the one sign `heal_checkout` acts on.
            durable.write_bytes(moving, f"{base} {new}\n".encode(), sync=False)
            self._run(["update-index", "-q", "--refresh"], cwd=self.path, env=env, check=False)
            r = self._run(["read-tree", "-m", "-u", base, new], cwd=self.path, env=env, check=False)
            if r.returncode != 0:
                raise GitError(
                    f"repos/{self.name}: the checkout has uncommitted changes to files this merge "
                    f"updates ({r.stderr.strip().splitlines()[0] if r.stderr.strip() else 'read-tree failed'}); "
                    "commit or discard them there, then retry")
            swap = self._run(["update-ref", "-m", note, f"refs/heads/{branch}", new, base], check=False)
            if swap.returncode != 0:
                self._run(["read-tree", "-m", "-u", new, base], cwd=self.path, env=env, check=False)
                return False
            os.replace(lock, index)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            with contextlib.suppress(FileNotFoundError):
                moving.unlink()

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

    def clear_stale_lock(self, *, now: float | None = None) -> bool:
        """Remove git lock files that no live process holds; True when any was removed."""
        locks = [p for p in self.git_dir.rglob("*.lock")
                 if p.is_file() and "objects" not in p.relative_to(self.git_dir).parts]  # fmt: skip
        if not locks:
            return False
        roots = [str(self.path), str(self.git_dir), *(str(w.tree) for w in self._worktrees())]
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


def gc_worktrees(work_root: Path, repos: Iterable[Repo], *, keep_days: float, now: float) -> list[str]:
    """Remove kept working copies under `work_root` older than `keep_days`; their paths, relative."""
    root = Path(os.path.realpath(work_root))
    removed: list[str] = []
    for repo in repos:
        with repo._lock:
            for w in repo._worktrees():
                if not w.locked or not _under(w.tree, root):
                    continue
                try:
                    reason = _read(w.admin / "locked")
                    age = now - (w.admin / "locked").stat().st_mtime
                except OSError:
                    continue
                if not reason.startswith(KEPT_REASON) or age < keep_days * 86400:
                    continue  # locked by someone else, or still young
                repo._drop(w)
                if w.head.startswith(f"refs/heads/{BRANCH_PREFIX}") and repo._has_ref(w.head):
                    repo.git("update-ref", "-d", w.head)
                removed.append(w.tree.relative_to(root).as_posix())
                # The per-order folder that held it goes too, once empty.
                with contextlib.suppress(OSError):
                    w.tree.parent.rmdir()
            repo._run(["worktree", "prune"])
    return removed


def _branch(order_id: str) -> str:
    if not _ORDER_ID.match(order_id) or ".." in order_id or order_id.endswith((".", ".lock")):
        raise GitError(f"order id {order_id!r} cannot name a git branch; use letters, digits, '-', '_', single dots")
    return BRANCH_PREFIX + order_id


def _check_rel(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise GitError(f"{path!r} is not a plain repository-relative path; refusing to commit it")
    if any(p.lower() == ".git" for p in parts):
        raise GitError(f"{path!r} names a .git component; git internals are never committed")


def _entry(mode: str, sha: str) -> _Entry | None:
    return None if mode.strip("0") == "" else (mode, sha)


def _key(entry: _Entry | None) -> tuple[str, str] | None:
    """What a tree, index or disk entry holds, for comparing: a file's exec bit aside (git may
    not track it on this file system), a link is not a file with the same text."""
    if entry is None:
        return None
    kind = "link" if entry[0] == "120000" else "file" if entry[0].startswith("100") else entry[0]
    return (kind, entry[1])


def _read(path: Path) -> str:
    return path.read_text("utf-8", errors="surrogateescape").strip()


def _nul_split(text: str) -> list[str]:
    return [p for p in text.split("\0") if p]


def _nul_join(items: Iterable[str]) -> str:
    return "".join(f"{p}\0" for p in items)


def _same(a: Path, b: Path) -> bool:
    return real(a) == real(b)


def _under(path: Path, folder: Path) -> bool:
    return within(real(path), real(folder))


def _remove_tree(path: Path) -> None:
    # The agent chose the tree's depth, modes and path lengths: shutil.rmtree would die of
    # RecursionError on a few thousand nested folders, here and again at every restart.
    try:
        durable.remove_tree(path)
    except OSError as e:
        raise GitError(f"cannot remove working copy {path}: {e}; remove it by hand") from e


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
            if _read(entry / "comm").startswith("git"):
                cwd = os.readlink(entry / "cwd")
                if any(cwd == r or cwd.startswith(r.rstrip("/") + "/") for r in roots):
                    return held, True
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target in locks:
                    held.add(target)
        except OSError:
            continue  # gone, or not ours to look at
    return held, False
