"""One repository under `repos/` as the supervisor's trusted git reaches it.

Every git command the supervisor runs goes through `run_git`: the real git dir is
named explicitly (never the `.git` pointer file inside a working copy, which the
agent could have rewritten), hooks and fsmonitor are off, and no `GIT_*`
variable of the caller leaks in. Each call is one short git process; nothing
long-lived is left behind.

A working copy is a linked worktree on branch `wo/<order-id>`. Its admin folder
(`<git dir>/worktrees/<name>`) is found from git's own records, which live in
the repository and are out of the agent's reach.

`GitRepo` owns the repository's git dir, the one way git runs there, git's records of
its working copies and the heads of its branches. `checkout.Checkout` builds the
checkout's guarded move on it, and `repos.Repo` the working copies, commits and merges.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from .errors import GitError
from .paths import real, within

GIT_TIMEOUT = 300.0  # seconds; one git call on a small repository takes milliseconds
BRANCH_PREFIX = "wo/"

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
    # A person's config that shows signatures puts their text in front of the fields `git log
    # -z` is read by, for a commit they signed: `audit verify` found the history unreadable.
    "log.showSignature=false",
)
# In the order's working copies, and when one is made: a person's sparse checkout (an old-style
# `core.sparseCheckout` in the shared config) gave the agent a copy holding only their patterns.
_COPY_CONFIG = ("core.sparseCheckout=false",)
_NO_FORK = re.compile(r"cannot fork|Resource temporarily unavailable")  # git's own fork refused
_NO_ROOM = re.compile(r"No space left on device|Disk quota exceeded")  # git's strerror, under LC_ALL=C
_ROOM_LEFT = 64 * 1024  # bytes free below which a failed git command is taken to have run out of room
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?\Z")
_REPO_LOCKS: dict[str, threading.RLock] = {}
_REPO_LOCKS_GUARD = threading.Lock()


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
    config: Iterable[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run one trusted git command and wait for it; raise GitError on failure when `check`.
    `config`: more `-c` settings, after the trusted ones."""
    program = git_program()
    if program is None:
        raise GitError("git is not installed or not on PATH; install git 2.25 or newer")
    argv = [program, "--no-replace-objects"]  # a `git replace` by hand must not change what it reads
    if git_dir is not None:
        argv.append(f"--git-dir={git_dir}")
    if work_tree is not None:
        argv.append(f"--work-tree={work_tree}")
    for item in (*_TRUSTED_CONFIG, *config):
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
        if not os.path.isdir(cwd):  # said "git is not installed" of a working copy removed meanwhile
            raise GitError(f"git {verb} could not run: the folder it works in is gone (removed while in use?)") from e
        raise GitError("git is not installed or not on PATH; install git 2.25 or newer") from e
    except subprocess.TimeoutExpired as e:
        raise GitError(f"git {verb} took over {timeout:.0f}s in {cwd}; is a disk or lock stuck?") from e
    if check and proc.returncode != 0:
        said = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        if _NO_FORK.search(proc.stderr):
            # git could not fork its own helpers: the process limit, not the order (a GitError
            # failed the attempt and its retry at once, and blocked the order). As the OSError
            # it is, it stops the supervisor saying so, as a refused fork of git itself does.
            raise BlockingIOError(errno.EAGAIN, f"{os.strerror(errno.EAGAIN)} (git {verb}: {said.splitlines()[-1]})")
        full = _no_room(proc.stderr, [git_dir, work_tree, cwd, *(Path(a) for a in args if os.path.isabs(a))])
        if full is not None:
            code, where = full
            # A full disk is nobody's failed attempt: a GitError failed the order's attempt, and
            # its retry at once, until the order was blocked. As the OSError it is, it stops the
            # supervisor saying so ("make room and run it again"), as a full state/ does.
            raise OSError(code, f"{os.strerror(code)} (git {verb}: {said.splitlines()[-1]})", str(where))
        # git's last line of a lock in the way is "remove the file manually to continue": which
        # file is said above it.
        held = re.search(r"^.*Unable to create '[^']+\.lock': File exists\.?$", said, re.MULTILINE)
        raise GitError(f"git {verb} failed in {cwd}: {held.group(0) if held else said.splitlines()[-1]}")
    return proc


def git_program() -> str | None:
    """The git the supervisor runs, by its full path; None when there is none on PATH.

    Named `git`, it was looked up in the folder it runs in for an empty or relative entry of
    PATH (`PATH=:/usr/bin`, `.:$PATH`): in a working copy, the agent's `./git` ran as the
    supervisor, outside any sandbox. Such an entry is taken from the supervisor's own folder.
    """
    try:
        here = os.getcwd()
    except OSError:  # removed since the supervisor started in it: nothing is looked up there
        here = ""
    return _find_git(os.environ.get("PATH", os.defpath), here)


@functools.lru_cache(maxsize=8)
def _find_git(search: str, here: str) -> str | None:
    folders = [f if os.path.isabs(f) else os.path.join(here, f) for f in search.split(os.pathsep)
               if os.path.isabs(f) or here]
    return shutil.which("git", path=os.pathsep.join(folders)) if folders else None


def _no_room(stderr: str, places: list[Path | None]) -> tuple[int, Path] | None:
    """(ENOSPC or EDQUOT, where) when a git command that failed ran out of room; else None. git
    says so only at times ("Could not reset index file", "couldn't write '….lock'"): a file
    system of `places` (its git dir, its working tree, a working copy it makes) with no block or
    no inode left for us tells the rest."""
    said = _NO_ROOM.search(stderr)
    code = errno.ENOSPC if said is None or "quota" not in said.group(0) else errno.EDQUOT
    for place in places:
        while place is not None:
            try:
                fs = os.statvfs(place)
                break
            except OSError:  # not made yet (a working copy): its parent's file system
                place = place.parent if place.parent != place else None
        if place is None:
            continue
        blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail  # root may write the reserved blocks
        if blocks * fs.f_frsize < _ROOM_LEFT or (fs.f_files > 0 and fs.f_favail == 0):
            return code, place
    if said is not None:  # a quota, or room again by now: said where git ran
        return code, next((p for p in places if p is not None), Path("."))
    return None


NOT_OWN_GIT = ("is not a git repository with its own .git folder; put a normal clone there (not a worktree, "
               "submodule or bare repository)")


def foreign_checkout(folder: Path) -> str | None:
    """Why the repository at `folder` is none orders can work in, by its shape alone (no git
    run): a `.git` that is a file or a link (a worktree, a submodule, a clone with a separate
    git dir), or a bare repository. None for a normal clone, and for a folder holding no
    repository at all. Said after `repos/<name> `."""
    try:  # one lstat for a normal clone: intake asks this of every order
        return None if stat.S_ISDIR(os.lstat(folder / ".git").st_mode) else NOT_OWN_GIT
    except OSError:
        pass
    if (folder / "HEAD").is_file() and (folder / "objects").is_dir() \
            and (folder / "refs").is_dir():
        return (f"is a bare repository, with no checkout for orders to land in; move it away and put a "
                f"clone of it there (git clone <it> repos/{folder.name})")
    return None


def unborn_branch(git_dir: Path) -> str | None:
    """The branch a repository's HEAD names when it has no commit yet (a `git init` with nothing
    committed), else None. Read from git's files, no git run: intake asks it of every order
    with files."""
    try:
        head = (git_dir / "HEAD").read_text("utf-8", errors="replace").strip()
    except OSError:
        return None
    if not head.startswith("ref: refs/heads/"):
        return None  # detached: it names a commit
    ref = head.removeprefix("ref: ")
    if (git_dir / ref).is_file():
        return None
    try:
        packed = (git_dir / "packed-refs").read_text("utf-8", errors="replace")
    except OSError:
        packed = ""
    if any(line.split(" ", 1)[-1] == ref for line in packed.splitlines()):
        return None
    return ref.removeprefix("refs/heads/")


class DetachedHead(GitError):
    """The checkout is on a detached HEAD and no default branch was pinned while it was on one:
    where orders start and land is not known. A person's state, not an agent's doing: an
    order waits for them (`blocker`)."""

    def __init__(self, repo: str, hint: str) -> None:
        self.repo = repo
        self.hint = hint  # what to check out there, named as the repository names it
        super().__init__(f"repos/{repo}: HEAD is detached; {hint}")

    def blocker(self, order_id: str) -> str:
        """The line order `order_id` waits with; it starts with what it waits for."""
        return (f"a branch checked out in repos/{self.repo} (its HEAD is detached): {self.hint}, "
                f"then `coordinator retry {order_id}`")


class _Worktree(NamedTuple):
    """git's record of one linked worktree (in the repository, out of the agent's reach)."""

    admin: Path  # <git dir>/worktrees/<name>: the working copy's own git dir
    tree: Path
    head: str  # "refs/heads/wo/<id>", or a sha when detached
    locked: bool


class GitRepo:
    """One repository under `repos/`: its git dir, trusted git on it, its working copies' records
    and its branches."""

    def __init__(self, path: Path, *, in_memory_merge: bool | None = None, branch: str | None = None) -> None:
        self.path = Path(os.path.abspath(path))
        # The default branch as the supervisor first saw it checked out (state/repos.json): a
        # person's `git switch` or a detached HEAD in the checkout does not move it.
        self.pinned = branch
        self.name = self.path.name
        dot = self.path / ".git"
        if not self.path.is_dir():
            raise GitError(f"repos/{self.name}: no such folder; clone or create the repository there")
        if not dot.is_dir() or dot.is_symlink():
            raise GitError(f"repos/{self.name} {foreign_checkout(self.path) or NOT_OWN_GIT}")
        self.git_dir = Path(os.path.realpath(dot))
        self.git("rev-parse", "--git-dir")  # a broken .git fails here, with git's reason
        if in_memory_merge is None:
            # `merge-tree --write-tree` (git 2.38) merges without touching any checkout.
            in_memory_merge = self.git_version() >= (2, 38)
        self.in_memory_merge = in_memory_merge
        with _REPO_LOCKS_GUARD:
            self._lock = _REPO_LOCKS.setdefault(str(self.git_dir), threading.RLock())


    # -- trusted git -------------------------------------------------------------------------

    def git(self, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
        """Run git on this repository (in working copy `cwd` if given); its stdout."""
        return self._run(list(args), cwd=cwd, env=env).stdout.rstrip("\n")

    def _run(self, args: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
             input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        if cwd is None:
            making = _COPY_CONFIG if args[:2] == ["worktree", "add"] else ()
            return run_git(args, git_dir=self.git_dir, cwd=self.git_dir, env=env, input=input, check=check,
                           config=making)  # fmt: skip
        work = Path(os.path.abspath(cwd))
        admin = self._admin_dir(work)
        return run_git(args, git_dir=admin, work_tree=work, cwd=work, env=env, input=input, check=check,
                       config=() if admin == self.git_dir else _COPY_CONFIG)  # fmt: skip

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
        """The branch orders start from and merge into: the pinned one while it exists (else
        it was renamed or deleted), else the one checked out."""
        if self.pinned and self._has_ref(f"refs/heads/{self.pinned}"):
            return self.pinned
        branch = self.checked_out()
        if branch is None:
            raise DetachedHead(self.name, self._switch_hint())
        return branch

    def _switch_hint(self) -> str:
        """What to check out in a detached checkout, named as this repository names it: `git
        switch main` was said of a repository whose branch is `trunk`, where it fails."""
        names = [n for n in self.git("for-each-ref", "--format=%(refname:short)", "refs/heads/").splitlines()
                 if n and not n.startswith(BRANCH_PREFIX)]
        if not names:
            return "make a branch there for orders to land on (git switch -c main)"
        if len(names) == 1 and not self.pinned:
            return f"check out the default branch there (git switch {names[0]})"
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        gone = f"its default branch {self.pinned} is gone (renamed or deleted); " if self.pinned else ""
        return f"{gone}check out the default branch there (git switch <branch>; branches: {shown})"

    def checked_out(self) -> str | None:
        """The branch the checkout is on; None when HEAD is detached."""
        ref = self._run(["symbolic-ref", "-q", "HEAD"], check=False).stdout.strip()
        return ref[len("refs/heads/") :] if ref.startswith("refs/heads/") else None

    def head(self) -> str:
        return self._sha(f"refs/heads/{self.default_branch()}")

    def tip(self) -> str:
        """`head()` read from the ref files when they are plain (the pinned branch, or the one
        HEAD names, whose ref is a loose file): the tamper watch asks every few seconds, and
        `head()` is two git processes per repository. Anything else is asked of git."""
        with contextlib.suppress(OSError, UnicodeDecodeError):
            ref = (f"refs/heads/{self.pinned}" if self.pinned
                   else (self.git_dir / "HEAD").read_text("ascii").strip().removeprefix("ref: "))
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

