"""The repositories under `repos/`: working copies per order, commits and merges.

`Repo` is what the supervisor works with. On trusted git (`gitrepo.GitRepo`) and the
checkout's guarded move (`checkout.Checkout`), it gives each order a working copy (a linked
worktree on branch `wo/<order-id>`), commits exactly the agent's paths there as the agent,
and merges the branch into the default branch; `gc_worktrees` removes the copies kept for
inspection once they are old.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from . import durable, gate, gitlocks
from .checkout import Checkout, CheckoutBusy
from .errors import GateError, GitError
from .gitrepo import (
    _SHA,
    BRANCH_PREFIX,
    _nul_join,
    _nul_split,
    _read,
    _same,
    _under,
    _Worktree,
    ident_env,
)
from .inboxfiles import printable

COORDINATOR_IDENT = ("coordinator", "coordinator@agents.coordinator")
AGENT_EMAIL_DOMAIN = "agents.coordinator"
KEPT_REASON = "coordinator: kept for inspection"
MERGE_RETRIES = 3  # times the branch may move under a merge before it gives up
MERGE_PATIENCE = 2.0  # seconds a merge waits for another git to let go of the checkout's index

_ORDER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class BranchInTheWay(GitError):
    """A person's branch named like `wo/<id>/x` (or `wo`) keeps git from making the order's
    branch `wo/<id>`: a person's doing, not the agent's, so the order waits for them
    (`blocker`) rather than failing attempts against the agent."""

    def __init__(self, repo: str, order_id: str, others: list[str]) -> None:
        self.repo = repo
        self.others = others
        many = len(others) > 1
        self.named = ("the branches " if many else "the branch ") + ", ".join(others[:3]) + (
            f" and {len(others) - 3} more" if len(others) > 3 else "")
        super().__init__(f"repos/{repo}: {self.named} keep{'' if many else 's'} git from making "
                         f"{BRANCH_PREFIX}{order_id}, the order's working-copy branch")

    def blocker(self, order_id: str) -> str:
        """The line order `order_id` waits with; it starts with what it waits for."""
        return (f"{self.named} in repos/{self.repo} renamed (`git -C repos/{self.repo} branch -m "
                f"{self.others[0]} <new name>`): git cannot make the order's branch {BRANCH_PREFIX}{order_id} "
                f"next to {'them' if len(self.others) > 1 else 'it'} ({BRANCH_PREFIX} names are the "
                f"coordinator's), then `coordinator retry {order_id}`")


class RefInTheWay(BranchInTheWay):
    """A file in the git dir that is no branch (a lock file a git process holds, or one a
    killed git left behind that could not be cleared) keeps git from making `wo/<id>`: the
    person's to remove, so the order waits for them."""

    def __init__(self, repo: str, order_id: str, files: list[str]) -> None:
        self.repo = repo
        self.others = files
        shown = ", ".join(f"repos/{repo}/.git/{f}" for f in files[:3]) + (
            f" and {len(files) - 3} more" if len(files) > 3 else "")
        self.named = shown
        self.what = ("a lock a git process holds, or one a killed git left" if all(f.endswith(".lock") for f in files)
                     else "no branch, where git makes the order's")
        GitError.__init__(self, f"repos/{repo}: {shown} keep{'' if len(files) > 1 else 's'} git from making "
                                f"{BRANCH_PREFIX}{order_id}, the order's working-copy branch ({self.what})")

    def blocker(self, order_id: str) -> str:
        """The line order `order_id` waits with; it starts with what it waits for."""
        many = len(self.others) > 1
        return (f"{self.named} removed once no git works in repos/{self.repo} ({self.what}): git cannot make "
                f"the order's branch "
                f"{BRANCH_PREFIX}{order_id} while {'they are' if many else 'it is'} there, then "
                f"`coordinator retry {order_id}`")


class MergeConflict(GitError):
    """wo/<id> and the default branch changed the same lines; nothing was merged."""

    def __init__(self, repo: str, order_id: str, branch: str, paths: Iterable[str]) -> None:
        self.paths = tuple(dict.fromkeys(paths))
        self.order_id = order_id
        super().__init__(
            f"{repo}: wo/{order_id} conflicts with {branch} in {', '.join(self.paths) or '(unknown paths)'}; "
            f"the next attempt must start again from the current {branch}"
        )


class Repo(Checkout):
    """One repository under `repos/` with a checked-out default branch."""

    def __repr__(self) -> str:
        return f"Repo({str(self.path)!r})"

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
            _reopen(dest)
            if self._lexists(dest):
                _remove_tree(dest)
            self._run(["worktree", "prune"])
            self._delete_branch(branch)
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):  # a file where its folder goes: "internal error"
                raise GitError(f"cannot make the folder of order {order_id}'s working copy: a file is in the way "
                               f"(.coordinator/work/{order_id})") from None
            for again in (True, False):
                try:
                    self.git("worktree", "add", "-q", "-b", branch, str(dest), self.head())
                    break
                except GitError as e:
                    # A person's wo/<id>/x (or wo) stopped git from making wo/<id>: "cannot lock ref",
                    # counted as failed attempts against the agent until the order was blocked. Looked
                    # for only then: two git processes more on the way to every start.
                    others = [r.removeprefix("refs/heads/") for r in self.git(
                        "for-each-ref", "--format=%(refname)", f"refs/heads/{branch}/").splitlines() if r]
                    if self._has_ref(f"refs/heads/{BRANCH_PREFIX.rstrip('/')}"):
                        others.insert(0, BRANCH_PREFIX.rstrip("/"))
                    with contextlib.suppress(OSError):
                        dest.rmdir()  # what git may have made of it: nothing in it
                    if others:
                        raise BranchInTheWay(self.name, order_id, others) from None
                    if "cannot lock ref" not in str(e):
                        raise
                    # A lock file a killed git left (`refs/heads/wo/<id>/x.lock`) goes, once; one
                    # a live git holds, or another file there, is the person's to remove. Said with
                    # git's machine path, it failed attempts against the agent.
                    if again and self.clear_stale_lock():
                        continue
                    files = self._files_in_the_way(branch)
                    if files:
                        raise RefInTheWay(self.name, order_id, files) from None
                    raise GitError(self._in_workspace_terms(str(e))) from None
        return dest

    def _files_in_the_way(self, branch: str) -> list[str]:
        """The files in the git dir (relative to it) that keep git from making `branch`: lock
        files, and whatever is in a folder of its name that is no branch."""
        heads = self.git_dir / "refs" / "heads"
        found = [heads / f"{branch}.lock", heads / f"{BRANCH_PREFIX.rstrip('/')}.lock", self.git_dir / "packed-refs.lock"]
        found = [f for f in found if f.is_file()]
        if (heads / branch).is_dir():
            found += sorted(p for p in (heads / branch).rglob("*") if not p.is_dir())
        return [f.relative_to(self.git_dir).as_posix() for f in found]

    def _in_workspace_terms(self, said: str) -> str:
        """git's message with this repository's machine paths named as the workspace names them."""
        for where, shown in ((self.git_dir, f"repos/{self.name}/.git"), (self.path, f"repos/{self.name}")):
            said = said.replace(str(where), shown)
        return said

    def remove_worktree(self, order_id: str, dest: Path, *, keep: bool = False) -> list[Path]:
        """Remove the working copy and its branch; with `keep`, lock it for `gc_worktrees`.

        The folders above the copy that were closed to their owner (`_reopen`) and got their
        owner's rights back on the way: the caller says so."""
        branch = _branch(order_id)
        dest = Path(os.path.abspath(dest))
        reopened: list[Path] = []
        with self._lock:
            if keep:
                reopened += _reopen(dest)
            if keep and self._lexists(dest):  # one a person removed meanwhile is not kept: its records go
                admin = self._admin_dir(dest)
                self._defuse(dest, admin)
                if not (admin / "locked").exists():
                    reason = f"{KEPT_REASON} (order {order_id})"
                    self.git("worktree", "lock", "--reason", reason, str(dest))
                return reopened
            for w in self._worktrees():
                if _same(w.tree, dest):
                    reopened += self._drop(w)
            reopened += _reopen(dest)
            if self._lexists(dest):
                _remove_tree(dest)
            with contextlib.suppress(OSError):  # the order's folder, once it holds no copy (one per finished order)
                dest.parent.rmdir()
            self._delete_branch(branch)
        return reopened

    def _delete_branch(self, branch: str) -> None:
        """Delete the order's branch `branch`; also when its loose ref names no commit (a power
        loss emptied it, say), which git neither deletes nor makes again ("reference broken"):
        every attempt of the order failed on it until a person removed the file."""
        if self._has_ref(f"refs/heads/{branch}"):
            for again in (True, False):
                try:
                    self.git("update-ref", "-d", f"refs/heads/{branch}")
                    return
                except GitError as e:
                    # A `packed-refs.lock` a killed `git gc` left: every branch deletion failed,
                    # said as "git update-ref failed in <machine path>: remove the file manually".
                    if again and self.clear_stale_lock():
                        continue
                    raise GitError(f"cannot delete the order's branch {branch} in repos/{self.name}: "
                                   f"{self._in_workspace_terms(str(e))}") from None
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            loose = self.git_dir / "refs" / "heads" / branch
            if stat.S_ISREG(os.lstat(loose).st_mode):
                loose.unlink()

    def _defuse(self, work: Path, admin: Path) -> None:
        """Make a copy kept for inspection safe to inspect with git: its `.git` pointer leads to
        its real git dir again, and every other `.git` the agent made in it goes, as does every
        folder git would take for a repository. A person's git in the copy would otherwise run
        what the agent put there (a config's core.fsmonitor, a hook) outside any sandbox; the
        report lists what they were."""
        try:
            durable.unlock_tree(work)
            durable.remove_tree(work / ".git")
            (work / ".git").write_text(f"gitdir: {admin}\n", encoding="utf-8")
            for found in gate.planted(str(work), working_copy=True):
                durable.remove_tree(Path(found))
        except OSError as e:
            raise GitError(f"cannot make the kept working copy {work} safe to inspect: {e}; remove it by hand "
                           "before running git there") from e

    def _drop(self, w: _Worktree) -> list[Path]:
        # Deleting both folders ourselves works even when the agent made the copy unreadable
        # or replaced its .git pointer, where `git worktree remove` would refuse. A folder above
        # the copy closed to its owner (mode 000) is opened first: else every start of a
        # supervisor without root's overrides failed here until a person restored its mode.
        reopened = _reopen(w.tree)
        if self._lexists(w.tree):
            _remove_tree(w.tree)
        shutil.rmtree(w.admin, ignore_errors=True)
        return reopened

    def _lexists(self, path: Path) -> bool:
        """Is anything at working copy `path` (a link too)? An error other than "none" raises a
        GitError that says what to do, never a bare PermissionError out of a start."""
        try:
            os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            try:
                shown = path.relative_to(self.path.parent.parent).as_posix()  # the workspace, of repos/<name>
            except ValueError:
                shown = str(path)
            raise GitError(f"cannot reach working copy {shown}: {e.strerror}; give its folders back their "
                           "owner's rights (chmod u+rwx) or remove it by hand") from None
        return True

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

    def submodules(self, worktree: Path, folders: list[str]) -> list[str]:
        """Those of `folders` (repo-relative) that the working copy's commit holds as submodules
        (gitlinks, mode 160000). One `ls-tree` of just those paths: no walk of the whole tree."""
        found: list[str] = []
        for i in range(0, len(folders), 1000):  # argv stays small, however many are asked
            out = self.git("--literal-pathspecs", "ls-tree", "-z", "HEAD", "--", *folders[i:i + 1000],
                           cwd=Path(os.path.abspath(worktree)))  # fmt: skip
            found += [line.split("\t", 1)[1] for line in _nul_split(out)
                      if line.startswith("160000 ") and "\t" in line]
        return found

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
        # Start from the branch head so nothing the agent may have staged itself slips in. `-m`
        # keeps git's stat data of the entries that match: without it, the `reset --hard` of
        # `discard` rewrote every file of the copy (seconds per order in a repository of
        # thousands of files). An index git cannot merge from is read afresh.
        if self._run(["read-tree", "-m", old], cwd=work, check=False).returncode != 0:
            self.git("read-tree", old, cwd=work)
        if not wanted:
            return None
        # `<mode> <sha> <stage>\t<path>`: which tracked paths are links, as well as which are tracked.
        staged = [line.split("\t", 1) for line in _nul_split(self.git("ls-files", "-z", "--stage", cwd=work))]
        tracked = {path for _, path in staged}
        asked = set(wanted)
        links = any(meta.startswith("120000 ") and path in asked for meta, path in staged)  # one replaced or removed
        files: list[str] = []
        gone: list[str] = []
        linked: dict[str, bool] = {}  # folder -> is it, or one above it, a link
        for p in wanted:
            try:
                # A path beyond a link is gone from the copy (a folder replaced by a link to
                # another): git would refuse it ("beyond a symbolic link"), and the order with it.
                is_file = not _beyond_link(work, p, linked) and not stat.S_ISDIR(mode := os.lstat(work / p).st_mode)
                links = links or (is_file and stat.S_ISLNK(mode))
            except (FileNotFoundError, NotADirectoryError):
                is_file = False
            except OSError as e:  # a folder on the way the agent made unreadable
                raise GitError(f"cannot read {p!r} in {work}: {e.strerror}; nothing was committed") from None
            (files if is_file else gone).append(p)
        ignored: set[str] = set()
        if files:
            # Each asked as `./<path>`: check-ignore takes a pathspec (and no literal one), where a
            # file named `:!notes.txt` is pathspec magic and failed the commit ("not supported").
            r = self._run(["check-ignore", "-z", "--stdin"], cwd=work, input=_nul_join(f"./{p}" for p in files),
                          check=False)  # fmt: skip
            if r.returncode not in (0, 1):
                raise GitError(f"git check-ignore failed in {work}: {r.stderr.strip()}")
            ignored = {p.removeprefix("./") for p in _nul_split(r.stdout)}
        add = [p for p in files if p in tracked or p not in ignored]
        remove = [p for p in files if p not in add and p in tracked] + [p for p in gone if p in tracked]
        if remove:
            self._run(["update-index", "--force-remove", "-z", "--stdin"], cwd=work, input=_nul_join(remove))
        if add:
            self._run(["update-index", "--add", "--replace", "-z", "--stdin"], cwd=work, input=_nul_join(add))
        if verify is not None:  # before "nothing changed": a judged change gone missing is a change too
            verify(wanted)
        tree = self.git("write-tree", cwd=work)
        if tree == self.git("rev-parse", f"{old}^{{tree}}"):
            return None
        # The gate resolved links in the copy, where a link or folder on the way may be one
        # git leaves out (an ignored `src/a -> x/y`): `src/l -> a/../../..` stayed inside there,
        # and led out of the repository once a later order made `src/a` a folder.
        out = self._leading_out(old, tree) if links else []  # only a link made, re-pointed or removed moves one
        if out:
            raise GateError(f"{', '.join(printable(p) for p in out[:5])} would lead out of the repository as committed "
                            "(a link or folder on its way is left out of the commit, ignored by git); nothing was "
                            "committed")
        body = subject.strip().replace("\n", " ") + "\n"
        if trailers:
            body += "\n" + "".join(f"{k}: {' '.join(str(v).split())}\n" for k, v in trailers.items())
        new = self._commit_tree(tree, [old], body, (agent, f"{agent}@{AGENT_EMAIL_DOMAIN}"))
        self.git("update-ref", "-m", f"coordinator: commit by {agent}", head_ref, new, old)
        return new

    def changed_in(self, sha: str) -> list[str]:
        """The repo-relative paths commit `sha` changes against its first parent."""
        out = self.git("diff-tree", "-r", "-z", "--no-commit-id", "--name-only", "--no-renames", sha)
        return _nul_split(out)

    def _commit_tree(self, tree: str, parents: list[str], message: str, who: tuple[str, str]) -> str:
        args = ["commit-tree", tree]
        for p in parents:
            args += ["-p", p]
        return self._run(args, env=ident_env(*who), input=message).stdout.strip()

    def landed(self, order_id: str, attempt: int | None = None, *, agent: str,
               vouched: Iterable[str | None] = ()) -> str | None:
        """The agent's commit for `order_id` (of `attempt`, if given) on the default branch, or None.

        Trailers are text anyone who can write here can forge (`git commit --trailer`), so a
        commit counts only when it is authored and committed as `agent` and is what the
        supervisor itself had in hand: the tip of wo/<order_id> (it commits there, then
        merges), or one the default branch held at a head it `vouched` for (noted after its
        own merges; the branch is gone once the attempt is cleaned up).
        """
        ref = f"refs/heads/{self.default_branch()}"
        out = self.git(
            "log", "-F", f"--grep=Work-Order: {order_id}",
            "--format=%H%x00%an <%ae>%x00%cn <%ce>%x00%(trailers:only,unfold)%x00", ref,
        )  # fmt: skip
        who = f"{agent} <{agent}@{AGENT_EMAIL_DOMAIN}>"
        branch = f"refs/heads/{_branch(order_id)}"
        tip = self._sha(branch) if self._has_ref(branch) else None
        heads = [h for h in vouched if h and _SHA.match(h)]
        fields = out.split("\0")
        for sha, author, committer, block in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4], strict=False):
            sha = sha.strip()
            # Lines end at a newline only: splitlines also splits at \x1c-\x1e, \x85 and \u2028.
            found = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
            if found.get("Work-Order") != order_id or found.get("Agent") != agent:
                continue  # a merge commit, or another order whose id starts the same
            if attempt is not None and found.get("Attempt") != str(attempt):
                continue
            if author != who or committer != who:
                continue  # made by hand, under the agent's trailers
            if sha == tip or any(self._is_ancestor(sha, h) for h in heads):
                return sha
        return None

    # -- merges --------------------------------------------------------------------------------

    def merge(self, order_id: str) -> str:
        """Bring wo/<order_id> into the default branch and its checkout; the new head's sha."""
        tip = self._sha(f"refs/heads/{_branch(order_id)}")
        with self._lock:
            moved, cleared = 0, False
            patience = time.monotonic() + MERGE_PATIENCE
            while moved < MERGE_RETRIES:
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
                    self._refuse_planted(order_id, branch, base, new)
                try:
                    if self._locked_move(branch, base, new, f"coordinator: merge wo/{order_id}"):
                        self.last_base = base
                        return new
                    moved += 1
                except CheckoutBusy:
                    # A person's git (a shell prompt's `git status`, a `git commit` in its editor)
                    # holds the index: not the branch moving. Waited for a while, then the order
                    # waits for the person; a lock a killed git left goes, as at a start.
                    if time.monotonic() > patience:
                        if cleared or not self.clear_stale_lock():
                            raise
                        cleared = True
                time.sleep(0.05)
        raise GitError(
            f"repos/{self.name}: the default branch kept moving while wo/{order_id} was merged; "
            "stop whatever else commits there and retry"
        )

    def _refuse_planted(self, order_id: str, branch: str, base: str, merged: str) -> None:
        """GitError when the merge makes a folder git takes for a repository. The gate refuses
        one in a single order's change, but two orders run side by side can each bring half
        (`HEAD` and a config; `objects/` and `refs/`), and only the merge puts them together."""
        raw = _nul_split(self.git("diff", "--raw", "--no-renames", "-z", base, merged))
        changed = raw[1::2]  # each path follows its `:mode mode sha sha X`
        self._refuse_leading_out(order_id, branch, base, merged, raw)
        folders = {p[:cut] for p in changed for cut in (i for i, c in enumerate(p) if c == "/")}
        if not folders:
            return
        listing = _nul_split(self.git("--literal-pathspecs", "ls-tree", "-t", "-z", merged, "--",
                                      *sorted(f + "/" for f in folders)))
        entries = [(line.split("\t", 1)[1], "dir" if line.split(" ", 2)[1] == "tree" else "file")
                   for line in listing if "\t" in line]
        planted = gate.repository_folders(entries)
        if planted:
            shown = ", ".join(printable(f) for f in sorted(planted))
            raise GitError(f"{self.name}: merging wo/{order_id} into {branch} would make {shown} a folder git "
                           "takes for a repository, with work that landed meanwhile; nothing was merged")

    def _refuse_leading_out(self, order_id: str, branch: str, base: str, merged: str, raw: list[str]) -> None:
        """GitError when the merge leaves a link that leads out of the repository. The gate
        resolves each order's links in its own copy, but two orders run side by side can each
        bring half: `src/l -> a/b/c/../../../..` where `a/b/c` is a folder, and `a/b/c` made a
        link (`-> ../../..`); only the merge puts them together, and `src/l` then leads out.
        `raw`: `git diff --raw -z` of the two."""
        out = self._leading_out(base, merged, raw)
        if out:
            shown = ", ".join(printable(p) for p in out[:5])
            raise GitError(f"{self.name}: merging wo/{order_id} into {branch} would make {shown} a link leading out "
                           "of the repository, with work that landed meanwhile; nothing was merged")

    def _leading_out(self, base: str, new: str, raw: list[str] | None = None) -> list[str]:
        """The links of tree-ish `new` that lead out of it and did not in `base` (`gate.links_leading_out`).
        Looked at only when a link is made, re-pointed or removed: nothing else moves where one
        leads. `raw`: `git diff --raw -z` of the two, when already at hand."""
        if raw is None:
            raw = _nul_split(self.git("diff", "--raw", "--no-renames", "-z", base, new))
        if not any("120000" in meta.lstrip(":").split(" ")[:2] for meta in raw[0::2]):
            return []
        return gate.links_leading_out(self._links(new), self._links(base))

    def _links(self, rev: str) -> dict[str, str]:
        """Every symbolic link of commit `rev`: path -> target."""
        found = [line.split("\t", 1) for line in _nul_split(self.git("ls-tree", "-r", "-z", "--full-tree", rev))
                 if line.startswith("120000 ") and "\t" in line]
        if not found:
            return {}
        data = self._run(["cat-file", "--batch"], input="".join(f"{meta.split()[2]}\n" for meta, _ in found))
        raw = data.stdout.encode("utf-8", "surrogateescape")  # as git wrote it: sizes count bytes
        links: dict[str, str] = {}
        at = 0
        for _, path in found:
            end = raw.index(b"\n", at)
            size = int(raw[at:end].split()[2])
            links[path] = raw[end + 1:end + 1 + size].decode("utf-8", "surrogateescape")
            at = end + 1 + size + 1
        return links

    def _merge_commit(self, order_id: str, branch: str, base: str, tip: str, message: str) -> str:
        if self.in_memory_merge:
            args = ["merge-tree", "--write-tree", "--name-only", "-z", base, tip]
            r = self._run(args, check=False)
            fields = r.stdout.split("\0")
            if r.returncode == 1:
                cut = fields.index("", 1) if "" in fields[1:] else len(fields)
                raise MergeConflict(self.name, order_id, branch,
                                    self._as_named(base, tip, fields[1:cut], _related(fields[cut + 1:])))
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
                    raise MergeConflict(self.name, order_id, branch, self._as_named(base, tip, conflicted))
                raise GitError(f"git merge failed in repos/{self.name}: {r.stderr.strip()}")
            return self.git("rev-parse", "HEAD", cwd=work)
        finally:
            for w in self._worktrees():
                if _same(w.tree, work):
                    self._drop(w)
            shutil.rmtree(scratch, ignore_errors=True)

    def _as_named(self, base: str, tip: str, conflicted: list[str],
                  related: Mapping[str, list[str]] | None = None) -> list[str]:
        """The conflicted paths as the two sides name them. Where a folder is in the way of a
        file of the same name, git moves the file aside as `<path>~<side>`, a name that is in
        neither side: the next brief names `<path>`, which the agent can find. Where a folder
        was renamed meanwhile, git suggests the agent's file's place in the new folder, also in
        neither side: named with the agent's path (`related`: the paths git's messages name
        with each conflicted one)."""
        related = related or {}
        names = [n for n in dict.fromkeys(conflicted) if n]
        others = [o for n in names for o in related.get(n, ()) if o != n]
        asked = dict.fromkeys(names + [n.rpartition("~")[0] for n in names if "~" in n] + others)
        known: set[str] = set()
        in_tip: set[str] = set()
        for rev in (base, tip):
            listing = self._run(["--literal-pathspecs", "ls-tree", "-z", "--name-only", "--full-tree", rev, "--",
                                 *asked], check=False).stdout  # fmt: skip
            known.update(_nul_split(listing))
            in_tip = set(_nul_split(listing))  # the last: tip's
        found = []
        for n in names:
            aside = n.rpartition("~")[0]
            theirs = [o for o in related.get(n, ()) if o in in_tip] if n not in known else []
            if n not in known and aside in known:
                found.append(aside)
            elif theirs:  # "lib/new.py (the order's lib/old.py)": the agent knows its own path
                found.append(f"{n} (the order's {', '.join(theirs)})")
            else:
                found.append(n)
        return list(dict.fromkeys(found))

    # -- housekeeping --------------------------------------------------------------------------

    def clear_stale_lock(self, *, now: float | None = None) -> bool:
        """Remove git lock files that no live process holds; True when any was removed."""
        locks = gitlocks.lock_files(self.git_dir)
        if not locks:
            return False
        roots = [str(self.path), str(self.git_dir), *(str(w.tree) for w in self._worktrees())]
        return gitlocks.clear_unheld(locks, roots, now=now)


# Seconds a kept copy's lock may be dated ahead of the clock before gc calls it dated ahead.
CLOCK_SLACK = 60.0


def gc_worktrees(work_root: Path, repos: Iterable[Repo], *, keep_days: float, now: float,
                 ahead: list[str] | None = None) -> list[str]:
    """Remove kept working copies under `work_root` older than `keep_days`; their paths, relative.

    A copy kept at a time still to come on this clock (the clock set back since) is of an age
    no one can tell: kept, and its path added to `ahead` to be said, unless `keep_days` is 0
    (every kept copy, whatever its age). Such copies were kept without a word, even by 0."""
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
                if not reason.startswith(KEPT_REASON):
                    continue  # locked by someone else
                # Through the link when `.coordinator/work` is one (moved to another disk): an
                # "internal error" of `gc`, after the first copy was gone.
                rel = Path(os.path.realpath(w.tree)).relative_to(root).as_posix()
                if keep_days > 0 and age < -CLOCK_SLACK:
                    if ahead is not None:
                        ahead.append(rel)
                    continue
                if keep_days > 0 and age < keep_days * 86400:
                    continue  # still young
                repo._drop(w)
                if w.head.startswith(f"refs/heads/{BRANCH_PREFIX}") and repo._has_ref(w.head):
                    repo.git("update-ref", "-d", w.head)
                removed.append(rel)
                # The per-order folder that held it goes too, once empty.
                with contextlib.suppress(OSError):
                    w.tree.parent.rmdir()
            repo._run(["worktree", "prune"])
    return removed


def _related(messages: list[str]) -> dict[str, list[str]]:
    """From `merge-tree -z`'s messages (records of a path count, the paths, a type and a
    text), the paths each path is named with."""
    related: dict[str, list[str]] = {}
    at = 0
    while at < len(messages) and messages[at].isdigit():
        count = int(messages[at])
        paths = messages[at + 1:at + 1 + count]
        for p in paths:
            related.setdefault(p, []).extend(o for o in paths if o != p)
        at += count + 3
    return related


def _branch(order_id: str) -> str:
    if not _ORDER_ID.match(order_id) or ".." in order_id or order_id.endswith((".", ".lock")):
        raise GitError(f"order id {order_id!r} cannot name a git branch; use letters, digits, '-', '_', single dots")
    return BRANCH_PREFIX + order_id


def _beyond_link(work: Path, path: str, linked: dict[str, bool]) -> bool:
    """Does a folder on the way to `path` (repo-relative) in `work` lie beyond a link? Each
    folder is looked at once (`linked`, shared by the calls of one commit)."""
    folder = path.rpartition("/")[0]
    if not folder:
        return False
    if folder not in linked:
        try:
            is_link = stat.S_ISLNK(os.lstat(work / folder).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            is_link = False
        linked[folder] = is_link or _beyond_link(work, folder, linked)
    return linked[folder]


def _check_rel(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise GitError(f"{path!r} is not a plain repository-relative path; refusing to commit it")
    if any(p.lower() == ".git" for p in parts):
        raise GitError(f"{path!r} names a .git component; git internals are never committed")


# Folders above a working copy `_reopen` may open: the order's folder and the one holding them all.
REOPEN_LEVELS = 2


def _reopen(path: Path) -> list[Path]:
    """Give their owner rwx back on the folders just above `path` (at most `REOPEN_LEVELS`)
    that keep it from being looked at (an agent's `chmod 000 ..`); those it opened, top down.
    Nothing is changed while `path` can be looked at."""
    try:
        os.lstat(path)
        return []
    except PermissionError:
        pass
    except OSError:
        return []
    opened: list[Path] = []
    for folder in reversed(path.parents[:REOPEN_LEVELS]):
        try:
            mode = os.lstat(folder).st_mode
            if stat.S_ISDIR(mode) and mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(folder, stat.S_IMODE(mode) | stat.S_IRWXU)
                opened.append(folder)
        except OSError:
            continue  # not ours to open: the removal below says where it stopped
    return opened


def _remove_tree(path: Path) -> None:
    # The agent chose the tree's depth, modes and path lengths: shutil.rmtree would die of
    # RecursionError on a few thousand nested folders, here and again at every restart.
    try:
        durable.remove_tree(path)
    except OSError as e:
        raise GitError(f"cannot remove working copy {path}: {e}; remove it by hand") from e
