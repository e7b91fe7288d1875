"""Working copies, trusted git, commits and merges, on real repositories in tmp_path."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import drop, merge_killed_after, order_md
from coordinator.demo.repo import init_demo_repo

from coordinator import checkout, gate
from coordinator.checkout import DirtyCheckout
from coordinator.errors import GateError, GitError
from coordinator.repos import MergeConflict, Repo, gc_worktrees
from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.workspace import Workspace

TRAILERS = {"Work-Order": "WO-0001", "Agent": "chip", "Attempt": "1"}


def sh_git(cwd: Path, *args: str, check: bool = True) -> str:
    """Plain git as a user would run it (the test's own look at the result)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_AUTHOR_NAME="user", GIT_AUTHOR_EMAIL="user@example.org",
               GIT_COMMITTER_NAME="user", GIT_COMMITTER_EMAIL="user@example.org")  # fmt: skip
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"git {args}: {proc.stderr}")
    return proc.stdout.strip()


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return tmp_path / "ws"


@pytest.fixture
def repo(ws: Path) -> Repo:
    return init_demo_repo(ws / "repos" / "webapp")


def work(ws: Path, order_id: str) -> Path:
    return ws / ".coordinator" / "work" / order_id / "webapp"


def edit(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def land(repo: Repo, ws: Path, order_id: str, changes: dict[str, str]) -> Path:
    """One order's whole life up to its commit on wo/<id>."""
    wt = repo.add_worktree(order_id, work(ws, order_id))
    for rel, text in changes.items():
        edit(wt / rel, text)
    trailers = {**TRAILERS, "Work-Order": order_id}
    assert repo.commit(wt, list(changes), agent="chip", subject=f"do {order_id}", trailers=trailers)
    return wt


# -- the demo repository and Repo itself ---------------------------------------------------------


def test_demo_repo_has_one_commit_by_coordinator_and_passing_tests(repo: Repo) -> None:
    log = sh_git(repo.path, "log", "--format=%an <%ae>|%s", "main").splitlines()
    assert log == ["coordinator <coordinator@agents.coordinator>|Demo webapp: login rules and their tests"]
    assert repo.default_branch() == "main"
    assert repo.head() == sh_git(repo.path, "rev-parse", "main")
    if shutil.which("make"):
        cmd = ["make", "-s", "test", f"PYTHON={sys.executable}"]
    else:
        cmd = [sys.executable, "-m", "unittest", "discover", "-s", "tests", "-t", "."]
    run = subprocess.run(cmd, cwd=repo.path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK" in run.stderr
    assert sh_git(repo.path, "status", "--porcelain", "--ignored") == ""  # the test run left nothing


def test_a_folder_that_is_not_a_repository_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(GitError, match="not a git repository"):
        Repo(tmp_path / "plain")
    with pytest.raises(GitError, match="no such folder"):
        Repo(tmp_path / "missing")


def test_default_branch_is_found_from_head(tmp_path: Path) -> None:
    path = tmp_path / "old"
    path.mkdir()
    sh_git(path, "init", "-q", "-b", "master")
    sh_git(path, "commit", "-q", "--allow-empty", "-m", "first")
    r = Repo(path)
    assert r.default_branch() == "master"
    assert r.head() == sh_git(path, "rev-parse", "HEAD")


def test_git_variables_of_the_caller_do_not_leak_in(repo: Repo, ws: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    sh_git(decoy, "init", "-q")
    monkeypatch.setenv("GIT_DIR", str(decoy / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(decoy))
    monkeypatch.setenv("GIT_INDEX_FILE", str(decoy / "elsewhere-index"))
    wt = land(repo, ws, "WO-0001", {"src/new.py": "x = 1\n"})
    repo.merge("WO-0001")
    monkeypatch.delenv("GIT_DIR")
    monkeypatch.delenv("GIT_WORK_TREE")
    monkeypatch.delenv("GIT_INDEX_FILE")
    assert (repo.path / "src" / "new.py").read_text() == "x = 1\n"
    assert sh_git(decoy, "rev-parse", "-q", "--verify", "HEAD", check=False) == ""
    assert not (decoy / "elsewhere-index").exists()
    assert sh_git(wt, "status", "--porcelain") == ""


# -- working copies --------------------------------------------------------------------------------


def test_working_copy_is_on_its_own_branch_from_the_current_head(repo: Repo, ws: Path) -> None:
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    assert wt == work(ws, "WO-0001")
    assert sh_git(wt, "rev-parse", "--abbrev-ref", "HEAD") == "wo/WO-0001"
    assert sh_git(wt, "rev-parse", "HEAD") == repo.head()
    assert (wt / "src" / "login.py").is_file()
    assert (wt / ".git").is_file()  # a linked worktree: a pointer, never a second git dir


def test_each_attempt_starts_from_scratch(repo: Repo, ws: Path) -> None:
    wt = land(repo, ws, "WO-0001", {"src/half.py": "half done\n"})
    edit(wt / "junk.txt", "left over\n")
    (wt / ".git").unlink()  # even a broken copy is replaced
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    assert not (wt / "junk.txt").exists() and not (wt / "src" / "half.py").exists()
    assert sh_git(wt, "rev-parse", "HEAD") == repo.head()
    assert sh_git(wt, "status", "--porcelain") == ""


def test_working_copy_must_lie_outside_the_repository(repo: Repo) -> None:
    with pytest.raises(GitError, match="outside"):
        repo.add_worktree("WO-0001", repo.path / "inside")


def test_order_id_that_cannot_be_a_branch_is_refused(repo: Repo, ws: Path) -> None:
    with pytest.raises(GitError, match="cannot name a git branch"):
        repo.add_worktree("a..b", work(ws, "a..b"))


def test_discard_returns_to_the_branch_head(repo: Repo, ws: Path) -> None:
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    edit(wt / "src" / "login.py", "broken\n")
    edit(wt / "notes.txt", "untracked\n")
    edit(wt / "src" / "cache.pyc", "ignored\n")
    edit(wt / "src" / "nested" / ".git" / "HEAD", "ref: refs/heads/x\n")
    (wt / ".git").unlink()
    edit(wt / ".git" / "hooks" / "pre-commit", "#!/bin/sh\n")
    repo.discard(wt)
    assert (wt / ".git").is_file()
    assert sh_git(wt, "status", "--porcelain", "--ignored") == ""
    assert not (wt / "src" / "nested").exists()
    assert "Password required" in (wt / "src" / "login.py").read_text()


def test_remove_drops_copy_branch_and_record(repo: Repo, ws: Path) -> None:
    wt = land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    repo.remove_worktree("WO-0001", wt)
    assert not wt.exists() and not wt.parent.exists()  # no empty folder left per finished order
    assert sh_git(repo.path, "branch", "--list", "wo/*") == ""
    assert sh_git(repo.path, "worktree", "list").count("\n") == 0  # only the main checkout


def nest(folder: Path, depth: int, name: str = "a") -> Path:
    """`depth` folders one inside the next, each made relative to the last as an agent's
    `mkdir a; cd a` loop makes them (past PATH_MAX too); the first of them."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
                f.write("x")
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    return folder / name


def test_a_copy_nested_thousands_deep_and_past_path_max_is_removed_whole(repo: Repo, ws: Path,
                                                                           deep_ok: Path) -> None:
    outside = deep_ok / "outside"
    edit(outside / "keep.txt", "not the agent's\n")
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    deep = nest(wt / "src", 1500)  # Python 3.11's shutil.rmtree dies of RecursionError here
    nest(wt / "tests", 20, name="n" * 250)  # 5,000 bytes of path: no call can take it whole
    os.symlink(outside, wt / "src" / "out")  # removed, never followed
    (wt / "src" / "a" / "a" / "a" / "in-a-locked-folder").write_text("x")
    os.chmod(deep / "a" / "a", 0)
    os.chmod(deep / "a", 0o500)
    repo.remove_worktree("WO-0001", wt)
    assert not wt.exists()
    assert (outside / "keep.txt").read_text() == "not the agent's\n"
    assert sh_git(repo.path, "branch", "--list", "wo/*") == ""


def test_discard_resets_a_copy_nested_thousands_deep_with_a_deep_fake_git_folder(repo: Repo, ws: Path,
                                                                                deep_ok: Path) -> None:
    """What a check leaves is thrown away: trees too deep for Python's recursion, or too slow
    for `git clean` (46 s on these), in place of a tracked file and of the .git pointer too."""
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    edit(wt / "src" / "login.py", "broken\n")
    nest(wt / "src", 1500)
    (wt / "README.md").unlink()
    (wt / "README.md").mkdir()
    nest(wt / "README.md", 1500)
    (wt / ".git").unlink()
    (wt / ".git").mkdir()
    nest(wt / ".git", 1500)
    os.chmod(wt / "src" / "a", 0o500)
    start = time.monotonic()
    repo.discard(wt)
    assert time.monotonic() - start < 10.0
    assert (wt / ".git").is_file() and (wt / "README.md").is_file()
    assert sh_git(wt, "status", "--porcelain", "--ignored") == ""
    assert not (wt / "src" / "a").exists()
    assert "Password required" in (wt / "src" / "login.py").read_text()


def test_kept_copies_are_collected_after_keep_days(repo: Repo, ws: Path) -> None:
    denied = land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    running = repo.add_worktree("WO-0002", work(ws, "WO-0002"))
    repo.remove_worktree("WO-0001", denied, keep=True)
    assert (denied / "src" / "a.py").read_text() == "a\n"  # kept for inspection
    root = ws / ".coordinator" / "work"
    assert gc_worktrees(root, [repo], keep_days=7, now=time.time()) == []
    assert denied.exists()
    removed = gc_worktrees(root, [repo], keep_days=7, now=time.time() + 8 * 86400)
    assert removed == ["WO-0001/webapp"]
    assert not (root / "WO-0001").exists()
    assert running.exists()  # a copy in use is never collected
    assert sh_git(repo.path, "branch", "--format=%(refname:short)", "--list", "wo/*") == "wo/WO-0002"



def test_kept_copies_are_collected_where_the_work_folder_is_a_link(repo: Repo, ws: Path, tmp_path: Path) -> None:
    # `.coordinator/work` moved to another disk and linked back, with copies kept in it: `gc`
    # removed the first, then stopped with an internal error (a path "not in the subpath" of
    # the link's target).
    for oid in ("WO-0001", "WO-0002"):
        repo.remove_worktree(oid, land(repo, ws, oid, {f"src/{oid}.py": "a\n"}), keep=True)
    elsewhere = tmp_path / "other-disk"
    shutil.move(ws / ".coordinator" / "work", elsewhere)
    (ws / ".coordinator" / "work").symlink_to(elsewhere)
    removed = gc_worktrees(ws / ".coordinator" / "work", [repo], keep_days=0, now=time.time())
    assert sorted(removed) == ["WO-0001/webapp", "WO-0002/webapp"]
    assert os.listdir(elsewhere) == []
    assert sh_git(repo.path, "branch", "--list", "wo/*") == ""


def test_a_kept_copy_dated_ahead_of_the_clock_is_said_and_removed_by_keep_days_0(repo: Repo, ws: Path) -> None:
    # The clock set back since the copy was kept: it was never old enough, not even for
    # `gc --days 0`, and gc said nothing of it. As for ended orders: kept and said, and 0 removes it.
    denied = land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    repo.remove_worktree("WO-0001", denied, keep=True)
    root = ws / ".coordinator" / "work"
    earlier = time.time() - 30 * 86400
    ahead: list[str] = []
    assert gc_worktrees(root, [repo], keep_days=7, now=earlier, ahead=ahead) == []
    assert ahead == ["WO-0001/webapp"] and denied.exists()
    ahead.clear()
    assert gc_worktrees(root, [repo], keep_days=0, now=earlier, ahead=ahead) == ["WO-0001/webapp"]
    assert ahead == [] and not (root / "WO-0001").exists()
    assert sh_git(repo.path, "branch", "--format=%(refname:short)", "--list", "wo/*") == ""


# -- commits ---------------------------------------------------------------------------------------


def test_commit_stages_exactly_the_paths_as_the_agent(repo: Repo, ws: Path) -> None:
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    edit(wt / "src" / "login.py", "changed\n")
    edit(wt / "src" / "new.py", "new\n")
    (wt / "README.md").unlink()
    edit(wt / "tests" / "test_login.py", "not asked for\n")
    edit(wt / "src" / "x.pyc", "ignored\n")
    paths = ["src/login.py", "src/new.py", "README.md", "src/x.pyc"]
    sha = repo.commit(wt, paths, agent="chip", subject="Limit passwords", trailers=TRAILERS)
    assert sha == sh_git(repo.path, "rev-parse", "wo/WO-0001")
    shown = sh_git(repo.path, "log", "-1", "--format=%an%n%ae%n%cn%n%B", sha)
    assert shown.splitlines() == [
        "chip", "chip@agents.coordinator", "chip", "Limit passwords", "",
        "Work-Order: WO-0001", "Agent: chip", "Attempt: 1",
    ]  # fmt: skip
    names = sh_git(repo.path, "show", "--format=", "--name-status", sha).splitlines()
    assert set(names) == {"D\tREADME.md", "M\tsrc/login.py", "A\tsrc/new.py"}
    assert sh_git(wt, "status", "--porcelain") == "M tests/test_login.py"  # left as it was


@pytest.mark.parametrize("name", [":!notes.txt", ":(exclude)a", ":(glob)**", ":^q", ":(top)y"])
def test_a_file_named_like_git_pathspec_magic_is_committed_as_named(repo: Repo, ws: Path, name: str) -> None:
    # git check-ignore took each path for a pathspec: the commit failed on "pathspec magic not
    # supported", and the order was blocked after its retry.
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    edit(wt / name, "notes\n")
    sha = repo.commit(wt, [name], agent="chip", subject="notes", trailers=TRAILERS)
    assert sha is not None and repo.changed_in(sha) == [name]
    assert sh_git(wt, "show", f"{sha}:./{name}") == "notes"


def test_commit_with_nothing_changed_is_none(repo: Repo, ws: Path) -> None:
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    assert repo.commit(wt, [], agent="chip", subject="s", trailers=TRAILERS) is None
    assert repo.commit(wt, ["src/login.py"], agent="chip", subject="s", trailers=TRAILERS) is None
    assert sh_git(wt, "rev-parse", "HEAD") == repo.head()


def test_commit_ignores_what_the_agent_staged_itself(repo: Repo, ws: Path) -> None:
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    edit(wt / "src" / "login.py", "changed\n")
    edit(wt / "sneaky.txt", "staged by the agent\n")
    sh_git(wt, "add", "sneaky.txt")
    sha = repo.commit(wt, ["src/login.py"], agent="chip", subject="s", trailers=TRAILERS)
    assert sh_git(repo.path, "show", "--format=", "--name-only", str(sha)) == "src/login.py"


def test_discard_after_a_commit_leaves_the_files_the_change_did_not_touch(repo: Repo, ws: Path) -> None:
    # A working copy of a repository with thousands of files: rewriting each of them before
    # the checks cost seconds per order.
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    edit(wt / "src" / "login.py", "changed\n")
    edit(wt / "src" / "staged.txt", "staged by the agent\n")
    sh_git(wt, "add", "src/staged.txt")
    untouched = wt / "tests" / "test_login.py"
    before = untouched.stat().st_ino
    assert repo.commit(wt, ["src/login.py"], agent="chip", subject="s", trailers=TRAILERS)
    repo.discard(wt)
    assert untouched.stat().st_ino == before
    assert sh_git(wt, "status", "--porcelain", "--ignored") == ""
    assert (wt / "src" / "login.py").read_text() == "changed\n"


def test_commit_refuses_git_internals(repo: Repo, ws: Path) -> None:
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    for bad in (".git/config", "src/.GIT/HEAD", "../outside", "/etc/passwd"):
        with pytest.raises(GitError):
            repo.commit(wt, [bad], agent="chip", subject="s", trailers=TRAILERS)


def test_commit_of_a_path_it_cannot_look_at_is_a_git_error(repo: Repo, ws: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Not root, the supervisor cannot look into a folder made mode 000: that stopped it with
    # a PermissionError. (Root can look, so the refusal is simulated.)
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    real_lstat = os.lstat

    def lstat(path: object, *args: object, **kw: object) -> os.stat_result:
        if str(path).endswith("src/login.py"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_lstat(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("coordinator.repos.os.lstat", lstat)
    with pytest.raises(GitError, match="cannot read 'src/login.py'.*Permission denied; nothing was committed"):
        repo.commit(wt, ["src/login.py"], agent="chip", subject="s", trailers=TRAILERS)
    monkeypatch.undo()
    assert sh_git(wt, "rev-parse", "HEAD") == repo.head()


def test_commit_keeps_symlinks_and_exec_bits(repo: Repo, ws: Path) -> None:
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    os.symlink("login.py", wt / "src" / "alias.py")
    edit(wt / "run.sh", "#!/bin/sh\n")
    os.chmod(wt / "run.sh", 0o755)
    sha = repo.commit(wt, ["src/alias.py", "run.sh"], agent="chip", subject="s", trailers=TRAILERS)
    tree = sh_git(repo.path, "ls-tree", "-r", str(sha))
    assert "120000 blob" in next(line for line in tree.splitlines() if line.endswith("src/alias.py"))
    assert "100755 blob" in next(line for line in tree.splitlines() if line.endswith("run.sh"))


@pytest.mark.parametrize("target", [".", "../tests"], ids=["to-its-parent", "to-a-folder-beside"])
def test_a_folder_replaced_by_a_link_is_committed(repo: Repo, ws: Path, target: str) -> None:
    # What the folder held is gone from the copy, though the link leads where a file of that
    # name is: git refused those paths ("beyond a symbolic link"), and the order was blocked.
    land(repo, ws, "WO-0001", {"src/vendor/login.py": "old\n", "src/vendor/test_login.py": "old\n"})
    repo.merge("WO-0001")
    wt = repo.add_worktree("WO-0002", work(ws, "WO-0002"))
    before = gate.snapshot(wt)
    shutil.rmtree(wt / "src" / "vendor")
    os.symlink(target, wt / "src" / "vendor")
    after = gate.snapshot(wt, since=before)
    verdict = gate.judge(gate.diff(before, after), repo="webapp", files=("webapp/src/**",), writes=("webapp/src/**",))

    def as_judged(paths: list[str]) -> None:  # as the supervisor asks, once git has read them
        assert [p for p in paths if not gate.unchanged_since(wt, p, after.get(p))] == []

    sha = repo.commit(wt, verdict.commit_paths(), agent="chip", subject="s", trailers=TRAILERS, verify=as_judged)
    tree = sh_git(repo.path, "ls-tree", "-r", str(sha))
    assert "120000 blob" in next(line for line in tree.splitlines() if line.endswith("src/vendor"))
    assert "src/vendor/" not in tree and "src/login.py" in tree and "tests/test_login.py" in tree


def test_a_link_that_leads_out_once_what_git_ignores_is_left_out_is_never_committed(repo: Repo, ws: Path) -> None:
    # In the copy, src/l -> a/../../.. goes through the link src/a -> x/y and stays inside; git
    # ignores src/a, and in the commit src/l led out of the repository as soon as an order
    # made src/a a folder.
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    edit(wt / "src" / "x" / "y" / "k.py", "k\n")
    edit(wt / "src" / ".gitignore", "a\n")
    os.symlink("x/y", wt / "src" / "a")
    os.symlink("a/../../..", wt / "src" / "l")
    with pytest.raises(GateError, match="src/l would lead out of the repository as committed"):
        repo.commit(wt, ["src/.gitignore", "src/a", "src/l", "src/x/y/k.py"], agent="chip", subject="s",
                    trailers=TRAILERS)
    assert sh_git(wt, "rev-parse", "HEAD") == repo.head()


def test_landed_finds_the_agents_commit_on_the_default_branch(repo: Repo, ws: Path) -> None:
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    assert repo.landed("WO-0001", agent="chip") is None
    repo.merge("WO-0001")
    sha = sh_git(repo.path, "rev-parse", "wo/WO-0001")
    assert repo.landed("WO-0001", 1, agent="chip") == sha
    assert repo.landed("WO-0001", 1, agent="rex") is None
    assert repo.landed("WO-0001", 2, agent="chip") is None
    assert repo.landed("WO-000", agent="chip") is None
    # Once its working copy and branch are gone, the head the supervisor noted vouches for it.
    head = repo.head()
    repo.remove_worktree("WO-0001", work(ws, "WO-0001"))
    assert repo.landed("WO-0001", 1, agent="chip") is None
    assert repo.landed("WO-0001", 1, agent="chip", vouched=[head]) == sha


@pytest.mark.parametrize("who", ["user", "chip"])
def test_landed_does_not_believe_a_commit_forged_with_the_trailers(repo: Repo, ws: Path, who: str) -> None:
    """A commit made by hand on the default branch with an order's trailers, as a person or
    in the agent's name, is not that order's landing: it is neither the tip of wo/<id> nor
    under a head the supervisor noted."""
    noted = repo.head()
    repo.add_worktree("WO-0001", work(ws, "WO-0001"))  # the attempt runs; nothing committed yet
    name, email = ("user", "user@example.org") if who == "user" else ("chip", "chip@agents.coordinator")
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "do WO-0001",
                    "-m", "Work-Order: WO-0001\nAgent: chip\nAttempt: 1"], cwd=repo.path, check=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
                        "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email})
    assert f"Author: {name} <{email}>" in sh_git(repo.path, "log", "-1")
    assert repo.landed("WO-0001", 1, agent="chip", vouched=[noted]) is None
    assert repo.landed("WO-0001", agent="chip", vouched=[noted]) is None


# -- merges ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_memory", [True, False], ids=["merge-tree", "scratch-worktree"])
def test_two_parallel_orders_both_land(ws: Path, in_memory: bool) -> None:
    repo = Repo(init_demo_repo(ws / "repos" / "webapp").path, in_memory_merge=in_memory)
    base = repo.head()
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    land(repo, ws, "WO-0002", {"src/b.py": "b\n"})
    first = repo.merge("WO-0001")
    assert first == sh_git(repo.path, "rev-parse", "wo/WO-0001")  # fast-forward
    second = repo.merge("WO-0002")
    parents = sh_git(repo.path, "log", "-1", "--format=%P", second).split()
    assert parents == [first, sh_git(repo.path, "rev-parse", "wo/WO-0002")]
    assert sh_git(repo.path, "log", "-1", "--format=%an <%ae>", second) == (
        "coordinator <coordinator@agents.coordinator>"
    )
    assert repo.head() == second and base != second
    # The main checkout shows the new head, clean.
    assert (repo.path / "src" / "a.py").read_text() == "a\n"
    assert (repo.path / "src" / "b.py").read_text() == "b\n"
    assert sh_git(repo.path, "status", "--porcelain") == ""
    assert repo.merge("WO-0002") == second  # merging again changes nothing


@pytest.mark.parametrize("in_memory", [True, False], ids=["merge-tree", "scratch-worktree"])
def test_conflict_leaves_main_exactly_as_it_was(ws: Path, in_memory: bool) -> None:
    repo = Repo(init_demo_repo(ws / "repos" / "webapp").path, in_memory_merge=in_memory)
    land(repo, ws, "WO-0001", {"src/login.py": "one\n", "src/a.py": "a\n"})
    land(repo, ws, "WO-0002", {"src/login.py": "two\n", "README.md": "two\n"})
    head = repo.merge("WO-0001")
    with pytest.raises(MergeConflict) as caught:
        repo.merge("WO-0002")
    assert caught.value.paths == ("src/login.py",)
    assert "src/login.py" in str(caught.value)
    assert repo.head() == head
    assert sh_git(repo.path, "rev-parse", "HEAD") == head
    assert sh_git(repo.path, "status", "--porcelain") == ""
    assert (repo.path / "src" / "login.py").read_text() == "one\n"
    assert sh_git(repo.path, "worktree", "list").count("\n") == 2  # no scratch copy left behind


@pytest.mark.parametrize("in_memory", [True, False], ids=["merge-tree", "scratch-worktree"])
@pytest.mark.parametrize("name", ["src/thing", "src/[x] ~*"])
def test_a_file_against_a_folder_of_the_same_name_names_the_path_both_sides_have(ws: Path, in_memory: bool,
                                                                                  name: str) -> None:
    # git moves the file aside as `<path>~<side>` in its merge: a name neither order made,
    # which the next brief sent the agent looking for.
    repo = Repo(init_demo_repo(ws / "repos" / "webapp").path, in_memory_merge=in_memory)
    land(repo, ws, "WO-0001", {name: "a file\n", "src/a~1.py": "a\n"})
    land(repo, ws, "WO-0002", {f"{name}/inside.py": "a folder\n", "src/a~1.py": "b\n"})
    head = repo.merge("WO-0001")
    with pytest.raises(MergeConflict) as caught:
        repo.merge("WO-0002")
    assert sorted(caught.value.paths) == sorted([name, "src/a~1.py"])
    assert repo.head() == head and sh_git(repo.path, "status", "--porcelain") == ""


def test_a_conflict_from_a_folder_renamed_meanwhile_names_the_orders_path_too(ws: Path) -> None:
    # src/ renamed to lib/ on main while the order added src/extra.py: the conflict named only
    # git's suggestion lib/extra.py, which neither side has; the agent knows its own path.
    repo = Repo(init_demo_repo(ws / "repos" / "webapp").path, in_memory_merge=True)
    land(repo, ws, "WO-0001", {"src/extra.py": "x\n"})
    sh_git(repo.path, "mv", "src", "lib")
    sh_git(repo.path, "commit", "-qm", "src is lib now")
    head = repo.head()
    with pytest.raises(MergeConflict) as caught:
        repo.merge("WO-0001")
    assert caught.value.paths == ("lib/extra.py (the order's src/extra.py)",)
    assert "in lib/extra.py (the order's src/extra.py);" in str(caught.value)
    assert repo.head() == head and sh_git(repo.path, "status", "--porcelain") == ""


@pytest.mark.parametrize("in_memory", [True, False], ids=["merge-tree", "scratch-worktree"])
@pytest.mark.parametrize("folder", ["src/fixture", "src/[x] *"])
def test_two_orders_that_each_bring_half_of_a_repository_are_not_merged_together(ws: Path, in_memory: bool,
                                                                                  folder: str) -> None:
    # Each order's gate sees half a repository (HEAD and its config; objects/ and refs/), which
    # is no repository: only their merge would make one, whose config git runs for the user.
    repo = Repo(init_demo_repo(ws / "repos" / "webapp").path, in_memory_merge=in_memory)
    land(repo, ws, "WO-0001", {f"{folder}/HEAD": "ref: refs/heads/main\n",
                               f"{folder}/config": "[core]\n\tpager = touch pwned\n"})
    land(repo, ws, "WO-0002", {f"{folder}/objects/.keep": "", f"{folder}/refs/heads/.keep": "",
                               "src/b.py": "b\n"})
    head = repo.merge("WO-0001")
    with pytest.raises(GitError, match="would make .* a folder git takes for a repository"):
        repo.merge("WO-0002")
    assert repo.head() == head and not (repo.path / folder / "objects").exists()
    assert sh_git(repo.path, "status", "--porcelain") == ""


def land_links(repo: Repo, ws: Path, order_id: str, files: dict[str, str], links: dict[str, str]) -> None:
    """`land`, with symbolic links (path -> target) beside the files."""
    wt = repo.add_worktree(order_id, work(ws, order_id))
    for rel, text in files.items():
        edit(wt / rel, text)
    for rel, target in links.items():
        (wt / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, wt / rel)
    trailers = {**TRAILERS, "Work-Order": order_id}
    assert repo.commit(wt, [*files, *links], agent="chip", subject=f"do {order_id}", trailers=trailers)


@pytest.mark.parametrize("in_memory", [True, False], ids=["merge-tree", "scratch-worktree"])
@pytest.mark.parametrize("link_first", [True, False], ids=["link-first", "folder-first"])
def test_two_orders_that_each_bring_half_of_a_link_leading_out_are_not_merged_together(
        ws: Path, in_memory: bool, link_first: bool) -> None:
    # Each order's gate sees a link that stays inside: src/l through the folder a/b/c in one,
    # a/b/c made a link to the top in the other. Merged, src/l leads three folders above it.
    repo = Repo(init_demo_repo(ws / "repos" / "webapp").path, in_memory_merge=in_memory)
    land_links(repo, ws, "WO-0001", {"src/a/b/keep.py": "x\n"}, {"src/l": "a/b/c/../../../.."})
    land_links(repo, ws, "WO-0002", {"src/a/b/k2.py": "y\n"}, {"src/a/b/c": "../../.."})
    first, second = ("WO-0001", "WO-0002") if link_first else ("WO-0002", "WO-0001")
    head = repo.merge(first)
    with pytest.raises(GitError, match="would make src/l a link leading out of the repository"):
        repo.merge(second)
    assert repo.head() == head and sh_git(repo.path, "status", "--porcelain") == ""
    assert os.path.realpath(repo.path / "src" / "l").startswith(str(repo.path.resolve()))


def test_two_orders_that_make_a_link_lead_out_by_removing_one_on_its_way_are_not_merged_together(ws: Path) -> None:
    # Through the link src/a -> x/y, src/l -> a/../../.. stays inside: one order adds src/l,
    # the other (which had not src/l in its copy) makes src/a a folder again.
    repo = Repo(init_demo_repo(ws / "repos" / "webapp").path, in_memory_merge=True)
    land_links(repo, ws, "WO-0001", {"src/x/y/keep.py": "x\n"}, {"src/a": "x/y"})
    repo.merge("WO-0001")
    land_links(repo, ws, "WO-0002", {}, {"src/l": "a/../../.."})
    wt = repo.add_worktree("WO-0003", work(ws, "WO-0003"))
    (wt / "src" / "a").unlink()
    edit(wt / "src" / "a" / "mine.py", "mine\n")
    assert repo.commit(wt, ["src/a", "src/a/mine.py"], agent="chip", subject="s",
                       trailers={**TRAILERS, "Work-Order": "WO-0003"})
    head = repo.merge("WO-0002")
    with pytest.raises(GitError, match="would make src/l a link leading out of the repository"):
        repo.merge("WO-0003")
    assert repo.head() == head and os.path.realpath(repo.path / "src" / "l") == str(repo.path.resolve())


def test_a_merge_that_leaves_a_link_leading_out_as_it_was_lands(ws: Path) -> None:
    # A link a person committed long ago is not this merge's, even when the merge adds another.
    repo = Repo(init_demo_repo(ws / "repos" / "webapp").path, in_memory_merge=True)
    os.symlink("../../shared", repo.path / "src" / "shared")
    sh_git(repo.path, "add", "-A")
    sh_git(repo.path, "-c", "user.name=p", "-c", "user.email=p@x", "commit", "-qm", "a shared folder")
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    land_links(repo, ws, "WO-0002", {"src/b.py": "b\n"}, {"src/alias.py": "b.py"})
    repo.merge("WO-0001")
    second = repo.merge("WO-0002")
    assert repo.head() == second and (repo.path / "src" / "alias.py").is_symlink()


def test_a_merge_that_leaves_a_repository_shaped_folder_alone_lands(ws: Path) -> None:
    # What was there before (a fixture from before the gate refused such) is not this merge's.
    repo = Repo(init_demo_repo(ws / "repos" / "webapp").path, in_memory_merge=True)
    for name in ("HEAD", "objects/.keep", "refs/.keep"):
        edit(repo.path / "tests" / "fixture" / name, "x\n")
    sh_git(repo.path, "add", "-A")
    sh_git(repo.path, "-c", "user.name=p", "-c", "user.email=p@x", "commit", "-qm", "a fixture")
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    land(repo, ws, "WO-0002", {"src/b.py": "b\n"})
    repo.merge("WO-0001")
    second = repo.merge("WO-0002")
    assert repo.head() == second and (repo.path / "src" / "b.py").exists()


def test_merge_keeps_unrelated_local_edits_and_refuses_to_clobber(repo: Repo, ws: Path) -> None:
    land(repo, ws, "WO-0001", {"src/login.py": "agent\n"})
    edit(repo.path / "README.md", "user's edit\n")
    edit(repo.path / "src" / "login.py", "user's edit\n")
    before = repo.head()
    with pytest.raises(DirtyCheckout, match="uncommitted changes to src/login.py in repos/webapp, which the merge") as refused:
        repo.merge("WO-0001")
    assert refused.value.paths == ("src/login.py",)  # README.md is theirs, and not in the way
    assert repo.head() == before
    assert (repo.path / "src" / "login.py").read_text() == "user's edit\n"
    sh_git(repo.path, "checkout", "--", "src/login.py")
    repo.merge("WO-0001")
    assert (repo.path / "src" / "login.py").read_text() == "agent\n"
    assert (repo.path / "README.md").read_text() == "user's edit\n"
    assert sh_git(repo.path, "status", "--porcelain") == "M README.md"


def persons_commit_in_its_editor(repo: Repo) -> subprocess.Popen[str]:
    """A person's `git commit -a` in the checkout, waiting in its editor (holding index.lock)
    until its stdin is closed."""
    edit(repo.path / "README.md", "a person's edit\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_AUTHOR_NAME="user", GIT_AUTHOR_EMAIL="user@example.org", GIT_COMMITTER_NAME="user",
               GIT_COMMITTER_EMAIL="user@example.org", GIT_EDITOR="read line <&0; echo mine >")
    person = subprocess.Popen(["git", "commit", "-q", "-a"], cwd=repo.path, env=env, stdin=subprocess.PIPE, text=True)
    end = time.monotonic() + 30
    while not (repo.git_dir / "index.lock").exists():
        assert person.poll() is None and time.monotonic() < end, "git commit never took the index"
        time.sleep(0.01)
    return person


def test_a_merge_while_a_persons_git_holds_the_checkout_waits_then_names_it(repo: Repo, ws: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Said "the default branch kept moving" within 0.15 s, as a failed attempt of the agent's:
    # a person's `git commit -a` sitting in its editor blocked the order in two attempts.
    monkeypatch.setattr("coordinator.repos.MERGE_PATIENCE", 0.3, raising=False)
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    before = repo.head()
    person = persons_commit_in_its_editor(repo)
    try:
        with pytest.raises(checkout.CheckoutBusy, match=r"holds repos/webapp/\.git/index\.lock") as busy:
            repo.merge("WO-0001")
        assert isinstance(busy.value, DirtyCheckout)  # the order waits for the person, no failure of the agent's
        assert "once it ends, `coordinator retry WO-0001`" in busy.value.blocker("WO-0001")
        assert repo.head() == before and not (repo.path / "src" / "a.py").exists()
    finally:
        assert person.stdin is not None
        person.stdin.close()
        assert person.wait(timeout=30) == 0
    merged = repo.merge("WO-0001")  # once it is done, the merge goes through, the person's commit kept
    assert sh_git(repo.path, "log", "-1", "--format=%s", f"{merged}^1") == "mine"
    assert (repo.path / "src" / "a.py").read_text() == "a\n"
    assert sh_git(repo.path, "status", "--porcelain") == ""


def test_an_order_whose_merge_meets_a_persons_git_waits_for_them_uncharged(make_ws, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("coordinator.repos.MERGE_PATIENCE", 0.3, raising=False)
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/sh", "-c", "echo a > src/a.py"],
                           "writes": ["webapp/**"]}})
    drop(ws, "chip", "a.md", order_md("Add a", files=("webapp/src/a.py",), id="WO-0001"))
    person = persons_commit_in_its_editor(Repo(ws.repos / "webapp"))
    try:
        with Supervisor(ws) as sup:
            sup.run_once(limit=60)
        rec = Store(ws.state).load("WO-0001")
        assert (rec.status, rec.failures) == ("waiting", [])  # was: blocked, two failures of chip's
        assert rec.blocker == ("a git command working in the checkout (it holds .git/index.lock) in repos/webapp: "
                               "once it ends, `coordinator retry WO-0001` (no git running there? remove that file first)")
    finally:
        assert person.stdin is not None
        person.stdin.close()
        assert person.wait(timeout=30) == 0


def test_a_merge_clears_an_index_lock_a_killed_git_left(repo: Repo, ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("coordinator.repos.MERGE_PATIENCE", 0.1, raising=False)
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    (repo.git_dir / "index.lock").write_text("")  # no process holds it
    merged = repo.merge("WO-0001")
    assert repo.head() == merged and (repo.path / "src" / "a.py").read_text() == "a\n"
    assert not (repo.git_dir / "index.lock").exists()


def test_a_working_copy_a_person_removed_while_in_use_is_said_so_and_not_kept(repo: Repo, ws: Path) -> None:
    # A person's `rm -rf .coordinator/work/<id>` while the attempt ran: the supervisor said
    # "git is not installed or not on PATH", then that the kept copy could not be made safe
    # to inspect ("remove it by hand", naming the machine's path of what was gone already).
    wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
    shutil.rmtree(wt.parent)
    with pytest.raises(GitError) as gone:
        repo.submodules(wt, ["src"])
    assert str(gone.value) == "git ls-tree could not run: the folder it works in is gone (removed while in use?)"
    repo.remove_worktree("WO-0001", wt, keep=True)  # nothing to keep: its records go, said by no error
    assert not (repo.git_dir / "worktrees").exists() or not any((repo.git_dir / "worktrees").iterdir())
    assert sh_git(repo.path, "branch", "--list", "wo/*") == ""


@pytest.mark.parametrize("held", [False, True], ids=["left-by-a-killed-git", "held-by-a-live-git"])
def test_a_packed_refs_lock_in_the_way_of_deleting_the_orders_branch(repo: Repo, ws: Path, held: bool) -> None:
    # A `packed-refs.lock` (a person's `git gc` killed half way) made every order's clean-up
    # say "git update-ref failed in <the machine's path>: remove the file manually to
    # continue" (which file, unsaid), and its branch stayed. One no process holds goes; one
    # a live git holds is named in the workspace's terms.
    wt = land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    lock = repo.git_dir / "packed-refs.lock"
    lock.write_text("")
    if not held:
        repo.remove_worktree("WO-0001", wt)
        assert not lock.exists() and sh_git(repo.path, "branch", "--list", "wo/*") == ""
        return
    with open(lock) as f, subprocess.Popen(["sleep", "60"], stdin=f) as holder:
        try:
            with pytest.raises(GitError) as said:
                repo.remove_worktree("WO-0001", wt)
        finally:
            holder.kill()
    assert str(said.value) == ("cannot delete the order's branch wo/WO-0001 in repos/webapp: git update-ref failed in "
                               "repos/webapp/.git: error: Unable to create 'repos/webapp/.git/packed-refs.lock': "
                               "File exists.")
    lock.unlink()
    repo.remove_worktree("WO-0001", wt)
    assert sh_git(repo.path, "branch", "--list", "wo/*") == ""


def test_a_persons_sparse_checkout_leaves_the_orders_copy_whole(repo: Repo, ws: Path) -> None:
    # A person's sparse checkout of the repository (`core.sparseCheckout` in its shared config)
    # gave the agent a working copy holding only their patterns: here README.md, no src/.
    sh_git(repo.path, "config", "core.sparseCheckout", "true")
    (repo.git_dir / "info").mkdir(exist_ok=True)
    (repo.git_dir / "info" / "sparse-checkout").write_text("/README.md\n")
    sh_git(repo.path, "read-tree", "-mu", "HEAD")
    assert not (repo.path / "src").exists()  # the person's own checkout: sparse
    wt = land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    assert (wt / "src" / "login.py").is_file() and (wt / "tests").is_dir()
    repo.discard(wt)
    assert (wt / "src" / "login.py").is_file() and (wt / "src" / "a.py").read_text() == "a\n"
    repo.merge("WO-0001")
    assert sh_git(repo.path, "show", "HEAD:src/a.py") == "a"
    assert not (repo.path / "src" / "login.py").exists()  # theirs stays as sparse as they made it


def test_an_orders_branch_a_power_loss_emptied_is_made_again(repo: Repo, ws: Path) -> None:
    # An empty loose ref `refs/heads/wo/WO-0001` (a power loss while git wrote it) is a broken
    # reference git will neither delete nor make again: every attempt of the order failed
    # ("cannot lock ref ... reference broken") until a person removed the file by hand.
    broken = repo.git_dir / "refs" / "heads" / "wo" / "WO-0001"
    broken.parent.mkdir(parents=True)
    broken.write_text("")
    wt = land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    repo.merge("WO-0001")
    assert (repo.path / "src" / "a.py").read_text() == "a\n"
    broken.write_text("")  # and again before the copy goes: no broken branch is left behind
    repo.remove_worktree("WO-0001", wt)
    assert not wt.exists() and not broken.exists()
    assert sh_git(repo.path, "branch", "--list", "wo/*") == ""


@pytest.mark.parametrize("held", [False, True], ids=["left-by-a-killed-git", "held-by-a-live-git"])
def test_a_lock_on_the_default_branchs_ref_is_no_branch_moving(repo: Repo, ws: Path, held: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A `refs/heads/main.lock` (a person's `git commit` killed half way, or at work) made every
    # merge say "the default branch kept moving ... stop whatever else commits there": two
    # failed attempts against the agent, the order blocked. One no process holds goes and the
    # merge lands; one a live git holds makes the order wait for the person, naming it.
    monkeypatch.setattr("coordinator.repos.MERGE_PATIENCE", 0.1, raising=False)
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    before = repo.head()
    lock = repo.git_dir / "refs" / "heads" / "main.lock"
    lock.write_text("")
    if not held:
        merged = repo.merge("WO-0001")
        assert repo.head() == merged != before and (repo.path / "src" / "a.py").read_text() == "a\n"
        assert not lock.exists() and sh_git(repo.path, "status", "--porcelain") == ""
        return
    with open(lock) as f, subprocess.Popen(["sleep", "60"], stdin=f) as holder:
        try:
            with pytest.raises(checkout.CheckoutBusy) as busy:
                repo.merge("WO-0001")
        finally:
            holder.kill()
    assert isinstance(busy.value, DirtyCheckout)  # the order waits for the person, no failure of the agent's
    assert str(busy.value) == ("a git command holds repos/webapp/.git/refs/heads/main.lock (a commit waiting in its "
                               "editor, say, or one killed half way); nothing was merged: retry once it ends")
    assert busy.value.blocker("WO-0001") == (
        "a git command working on the default branch (it holds .git/refs/heads/main.lock) in repos/webapp: once it "
        "ends, `coordinator retry WO-0001` (no git running there? remove that file first)")
    assert repo.head() == before and not (repo.path / "src" / "a.py").exists()
    assert sh_git(repo.path, "status", "--porcelain") == ""


def test_a_merge_that_runs_out_of_room_in_the_checkout_leaves_it_as_it_was(ws: Path) -> None:
    # git wrote some of the merge's files before the disk filled: they were left in the person's
    # checkout, taken for their own uncommitted work, and the order waited for them to clear it.
    ws.mkdir(parents=True)
    saved = init_demo_repo(ws / "saved").path
    small = ws / "repos"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True,
                             text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        shutil.copytree(saved, small / "webapp", symlinks=True)
        repo = Repo(small / "webapp")
        wt = repo.add_worktree("WO-0001", work(ws, "WO-0001"))
        edit(wt / "src" / "a.py", "a\n")
        edit(wt / "src" / "login.py", "changed\n")
        (wt / "src" / "big.txt").write_bytes(b"abcdefgh" * 400_000)  # 3.2 MB, a few KB once packed
        os.unlink(wt / "README.md")
        assert repo.commit(wt, ["src/a.py", "src/login.py", "src/big.txt", "README.md"], agent="chip",
                           subject="big", trailers=TRAILERS)  # fmt: skip
        edit(repo.path / "mine.txt", "a person's\n")
        edit(repo.path / "Makefile", "a person's edit\n")
        before = repo.head()
        with pytest.raises(OSError, match=r"No space left on device \(git read-tree: ") as full:
            repo.merge("WO-0001")
        assert full.value.errno == errno.ENOSPC  # stops the supervisor saying so, as git's own does
        assert repo.head() == before
        assert sh_git(repo.path, "status", "--porcelain") == "M Makefile\n?? mine.txt"
        assert sorted(os.listdir(repo.path / "src")) == ["login.py"]
        assert (repo.path / "README.md").is_file()
        subprocess.run(["mount", "-o", "remount,size=20m", str(small)], check=True)
        merged = repo.merge("WO-0001")  # with room, it lands; the person's work kept
        assert repo.head() == merged and (repo.path / "src" / "big.txt").stat().st_size == 3_200_000
        assert sh_git(repo.path, "status", "--porcelain") == "M Makefile\n?? mine.txt"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


class RacedRepo(Repo):
    """A repository where the user commits in the main checkout just as a merge moves it."""

    raced = False

    def _locked_move(self, branch: str, base: str, new: str, note: str) -> bool:
        if not self.raced:
            self.raced = True
            edit(self.path / "USER.txt", "user\n")
            sh_git(self.path, "add", "USER.txt")
            sh_git(self.path, "commit", "-q", "-m", "user's own commit")
        return super()._locked_move(branch, base, new, note)


@pytest.mark.parametrize("away", ["switched", "detached"])
def test_a_checkout_a_person_moved_off_the_default_branch_stays_theirs(repo: Repo, ws: Path, away: str) -> None:
    # The work goes to main, as the checkout's own branch would have taken it: a person who
    # looked at a branch (or an old commit) found the orders' work there, not on main.
    repo.pinned = "main"
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    if away == "switched":
        sh_git(repo.path, "switch", "-q", "-c", "feature")
        edit(repo.path / "mine.txt", "a person's work\n")
        sh_git(repo.path, "add", "mine.txt")
        sh_git(repo.path, "commit", "-q", "-m", "a person's commit")
    else:
        sh_git(repo.path, "checkout", "-q", "--detach")
    edit(repo.path / "README.md", "uncommitted\n")
    theirs = sh_git(repo.path, "rev-parse", "HEAD")
    wt = land(repo, ws, "WO-0002", {"src/b.py": "b\n"})
    assert sh_git(wt, "rev-parse", "HEAD~1") == sh_git(repo.path, "rev-parse", "main")  # from main
    repo.merge("WO-0001")
    merged = repo.merge("WO-0002")
    assert sh_git(repo.path, "rev-parse", "main") == merged == repo.head()
    assert sh_git(repo.path, "ls-tree", "--name-only", "main", "src/").split() == ["src/a.py", "src/b.py", "src/login.py"]
    assert sh_git(repo.path, "rev-parse", "HEAD") == theirs  # their branch, their checkout
    assert sh_git(repo.path, "status", "--porcelain") == "M README.md"
    assert not (repo.path / "src" / "a.py").exists()
    sh_git(repo.path, "checkout", "-q", "--", "README.md")
    sh_git(repo.path, "switch", "-q", "main")  # back on main, the work is there
    assert (repo.path / "src" / "b.py").read_text() == "b\n"


def test_a_renamed_default_branch_is_followed(repo: Repo, ws: Path) -> None:
    repo.pinned = "main"
    sh_git(repo.path, "branch", "-m", "main", "trunk")
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    assert repo.merge("WO-0001") == sh_git(repo.path, "rev-parse", "trunk")
    assert (repo.path / "src" / "a.py").read_text() == "a\n"


def test_a_detached_checkout_is_told_to_switch_to_a_branch_the_repository_has(repo: Repo, ws: Path) -> None:
    # "git switch main" was said of every repository: one whose branch is trunk failed it.
    sh_git(repo.path, "branch", "-m", "main", "trunk")
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})  # an order's wo/ branch is no branch to switch to
    sh_git(repo.path, "checkout", "-q", "--detach")
    with pytest.raises(GitError, match=r"^repos/webapp: HEAD is detached; check out the default branch there "
                                       r"\(git switch trunk\)$"):
        repo.head()
    sh_git(repo.path, "branch", "feature", "trunk")
    with pytest.raises(GitError, match=r"\(git switch <branch>; branches: feature, trunk\)$"):
        repo.head()
    repo.pinned = "main"  # recorded at a first start, renamed since, while detached
    with pytest.raises(GitError, match=r"HEAD is detached; its default branch main is gone \(renamed or deleted\); "):
        repo.head()
    sh_git(repo.path, "switch", "-q", "trunk")
    assert repo.default_branch() == "trunk"



def retried_and_landed(ws: Workspace) -> str:
    """`coordinator retry WO-0001` as a user runs it, then a supervisor's run: the order (chip's
    `echo a > src/a.py`) lands in repos/webapp. Returns what `retry` said."""
    said = subprocess.run([sys.executable, "-m", "coordinator", "-w", str(ws.root), "retry", "WO-0001"],
                          capture_output=True, text=True, check=True).stdout
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    assert Store(ws.state).load("WO-0001").status == "done"
    assert (ws.repos / "webapp" / "src" / "a.py").read_text() == "a\n"
    return said


def test_an_order_for_a_checkout_detached_before_any_start_waits_for_the_person_uncharged(make_ws) -> None:
    # Detached before the supervisor ever recorded its default branch: the order failed twice
    # against chip, was blocked and escalated, and `audit verify` said "unreadable". Where the
    # order lands is the person's to say: it waits for them, saying what to do, and runs after
    # `coordinator retry`.
    from coordinator import verify

    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/sh", "-c", "echo a > src/a.py"],
                           "writes": ["webapp/**"]}})
    checkout_path = ws.repos / "webapp"
    sh_git(checkout_path, "checkout", "-q", "--detach")
    drop(ws, "chip", "a.md", order_md("Add a", files=("webapp/src/a.py",), id="WO-0001"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    store = Store(ws.state)
    rec = store.load("WO-0001")
    assert (rec.status, rec.failures) == ("waiting", [])
    assert rec.blocker == ("a branch checked out in repos/webapp (its HEAD is detached): check out the default "
                           "branch there (git switch main), then `coordinator retry WO-0001`")
    assert [r.id for r in store.load_all().values()] == ["WO-0001"]  # nothing escalated
    assert [str(f) for f in verify.verify(ws)] == [
        "repo-commit: repos/webapp: not checked: its checkout is on a detached HEAD, so the branch orders land on "
        "is not known; check out the default branch there (git switch main)"]
    sh_git(checkout_path, "switch", "-q", "main")
    assert retried_and_landed(ws) == "WO-0001: queued\n"


def test_a_persons_branch_in_the_way_of_the_orders_branch_waits_for_them_uncharged(make_ws) -> None:
    # A person's wo/WO-0001/x kept git from making wo/WO-0001 ("cannot lock ref"): two failed
    # attempts against chip, blocked and escalated. It is the person's to move: the order waits
    # for them, saying what to do, keeps their branch, and runs after `coordinator retry`.
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/sh", "-c", "echo a > src/a.py"],
                           "writes": ["webapp/**"]}})
    checkout_path = ws.repos / "webapp"
    sh_git(checkout_path, "branch", "wo/WO-0001/x")
    drop(ws, "chip", "a.md", order_md("Add a", files=("webapp/src/a.py",), id="WO-0001"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    store = Store(ws.state)
    rec = store.load("WO-0001")
    assert (rec.status, rec.failures) == ("waiting", [])
    assert rec.blocker == ("the branch wo/WO-0001/x in repos/webapp renamed (`git -C repos/webapp branch -m "
                           "wo/WO-0001/x <new name>`): git cannot make the order's branch wo/WO-0001 next to it "
                           "(wo/ names are the coordinator's), then `coordinator retry WO-0001`")
    assert [r.id for r in store.load_all().values()] == ["WO-0001"]  # nothing escalated
    assert sh_git(checkout_path, "branch", "--list", "wo/*").split() == ["wo/WO-0001/x"]  # theirs, kept
    sh_git(checkout_path, "branch", "-m", "wo/WO-0001/x", "mine/x")
    assert retried_and_landed(ws) == "WO-0001: queued\n"


@pytest.mark.parametrize("left", ["a lock a killed git left", "a lock a live git holds", "a file"])
def test_a_file_in_the_way_of_the_orders_branch_is_named_in_the_workspaces_terms(make_ws, left) -> None:
    # A `refs/heads/wo/WO-0001/x.lock` (a person's `git branch wo/WO-0001/x` killed half way)
    # kept git from making wo/WO-0001: "cannot lock ref", two failed attempts against chip
    # whose reason named the machine's path of the repository. A lock no live process holds
    # goes and the order runs; else the order waits for the person, naming what to remove.
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/sh", "-c", "echo a > src/a.py"],
                           "writes": ["webapp/**"]}})
    checkout_path = ws.repos / "webapp"
    in_the_way = checkout_path / ".git" / "refs" / "heads" / "wo" / "WO-0001" / ("notes" if left == "a file" else "x.lock")
    store = Store(ws.state)
    holder = None
    with Supervisor(ws) as sup:  # made after the start, which clears the locks of dead gits
        in_the_way.parent.mkdir(parents=True)
        in_the_way.write_text("")
        if left == "a lock a live git holds":
            holder = subprocess.Popen(["sleep", "60"], stdin=open(in_the_way))  # noqa: SIM115 - the child's
        drop(ws, "chip", "a.md", order_md("Add a", files=("webapp/src/a.py",), id="WO-0001"))
        try:
            sup.run_once(limit=60)
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
    rec = store.load("WO-0001")
    if left == "a lock a killed git left":
        assert (rec.status, rec.failures) == ("done", [])
        assert not in_the_way.exists()
        return
    assert (rec.status, rec.failures) == ("waiting", [])
    what = "a lock a git process holds, or one a killed git left" if left != "a file" else \
        "no branch, where git makes the order's"
    name = in_the_way.name
    assert rec.blocker == (f"repos/webapp/.git/refs/heads/wo/WO-0001/{name} removed once no git works in "
                           f"repos/webapp ({what}): git cannot make the order's branch wo/WO-0001 while it is "
                           "there, then `coordinator retry WO-0001`")
    assert str(ws.root) not in (store.folder("WO-0001") / "record.json").read_text()
    assert [r.id for r in store.load_all().values()] == ["WO-0001"]  # nothing escalated
    in_the_way.unlink()
    assert retried_and_landed(ws) == "WO-0001: queued\n"


def test_a_racing_change_to_the_branch_is_detected_and_kept(ws: Path) -> None:
    repo = RacedRepo(init_demo_repo(ws / "repos" / "webapp").path)
    land(repo, ws, "WO-0001", {"src/a.py": "a\n"})
    new = repo.merge("WO-0001")
    assert repo.raced
    assert len(sh_git(repo.path, "log", "-1", "--format=%P", new).split()) == 2
    assert (repo.path / "USER.txt").is_file() and (repo.path / "src" / "a.py").is_file()
    assert sh_git(repo.path, "status", "--porcelain") == ""


# -- a crash inside a merge, and what the next start puts right -----------------------------------


def start_again(repo: Repo, *, in_memory: bool | None = None) -> checkout.Healed:
    """What a supervisor's start does in repos/<name>: stale locks go, then the checkout heals."""
    again = Repo(repo.path, in_memory_merge=in_memory)
    again.clear_stale_lock()
    return again.heal_checkout()


PERSON = "M  Makefile\n M README.md\n?? notes.txt"  # `git status` of a person's own edits


def persons_edits(repo: Repo) -> None:
    """A person's work in the checkout, none of it on a path an order changes."""
    edit(repo.path / "Makefile", "staged by the person\n")
    sh_git(repo.path, "add", "Makefile")
    edit(repo.path / "README.md", "edited by the person\n")
    edit(repo.path / "notes.txt", "the person's notes\n")


@pytest.mark.parametrize("kind", ["fast-forward", "merge-commit", "merge-commit-old-git"])
@pytest.mark.parametrize("step", ["read-tree", "update-ref"], ids=["checkout-moved", "branch-moved"])
def test_a_merge_killed_inside_the_move_leaves_the_checkout_clean_at_the_next_start(
        repo: Repo, ws: Path, kind: str, step: str) -> None:
    """kill -9 after the checkout moved (the branch not), or after the branch moved (the index
    not): the next start leaves the checkout at HEAD, the person's own edits as they were, and
    the order's merge goes through."""
    if kind != "fast-forward":
        land(repo, ws, "WO-0000", {"src/other.py": "other\n"})
    wt = land(repo, ws, "WO-0001", {"src/login.py": "agent\n", "src/new.py": "new\n"})
    (wt / "tests" / "__init__.py").unlink()
    assert repo.commit(wt, ["tests/__init__.py"], agent="chip", subject="and drops a file",
                       trailers={**TRAILERS, "Work-Order": "WO-0001"})
    if kind != "fast-forward":
        repo.merge("WO-0000")  # WO-0001 now needs a merge commit
    persons_edits(repo)
    merge_killed_after(repo.path, "WO-0001", step)

    healed = start_again(repo, in_memory=False if kind.endswith("old-git") else None)
    assert sh_git(repo.path, "status", "--porcelain") == PERSON
    assert healed.put_back == ["src/login.py", "src/new.py", "tests/__init__.py"]
    new = repo.merge("WO-0001")  # the retry lands
    assert repo.landed("WO-0001", agent="chip") and sh_git(repo.path, "rev-parse", "HEAD") == new
    assert (repo.path / "src" / "login.py").read_text() == "agent\n"
    assert (repo.path / "src" / "new.py").read_text() == "new\n"
    assert not (repo.path / "tests" / "__init__.py").exists()
    assert sh_git(repo.path, "status", "--porcelain") == PERSON
    assert (repo.path / "Makefile").read_text() == "staged by the person\n"
    assert (repo.path / "README.md").read_text() == "edited by the person\n"


def test_a_file_changed_by_a_person_after_the_crash_is_kept_and_named(repo: Repo, ws: Path) -> None:
    """The checkout moved, the branch not, and then a person wrote their own version of the
    order's new file: it is theirs, so it stays, and the start names it."""
    land(repo, ws, "WO-0001", {"src/login.py": "agent\n", "src/new.py": "new\n"})
    merge_killed_after(repo.path, "WO-0001", "read-tree")
    edit(repo.path / "src" / "new.py", "the person's own\n")
    healed = start_again(repo)
    assert healed.put_back == ["src/login.py"]
    assert healed.blocking == ["src/new.py"]
    assert (repo.path / "src" / "new.py").read_text() == "the person's own\n"
    assert sh_git(repo.path, "status", "--porcelain") == "?? src/new.py"


def test_a_persons_changes_survive_a_start_while_an_order_changed_the_same_paths(
        repo: Repo, ws: Path) -> None:
    """wo/WO-0001 holds a commit that never merged (its checks were cut short); a person has
    `git add`ed their own change to one of its files and taken the order's version of another
    (`git restore --source`). No merge was cut off, so a start touches neither."""
    land(repo, ws, "WO-0001", {"src/login.py": "agent\n", "src/new.py": "new\n"})
    edit(repo.path / "src" / "login.py", "the person's change\n")
    sh_git(repo.path, "add", "src/login.py")
    sh_git(repo.path, "restore", "--source=wo/WO-0001", "--worktree", "src/new.py")
    assert start_again(repo) == checkout.Healed([], [])
    assert sh_git(repo.path, "status", "--porcelain") == "M  src/login.py\n?? src/new.py"
    assert sh_git(repo.path, "show", ":src/login.py") == "the person's change"
    assert (repo.path / "src" / "login.py").read_text() == "the person's change\n"
    assert (repo.path / "src" / "new.py").read_text() == "new\n"


def test_a_checkout_staged_at_an_orders_commit_goes_back_to_head(repo: Repo, ws: Path) -> None:
    """Index and files at exactly what wo/WO-0001 holds while the branch stayed behind, and
    the mark a move cut off leaves: put back, other paths left alone."""
    land(repo, ws, "WO-0001", {"src/login.py": "agent\n", "src/new.py": "new\n"})
    base = repo.head()
    persons_edits(repo)
    sh_git(repo.path, "read-tree", "-m", "-u", base, "wo/WO-0001")
    (repo.git_dir / checkout.MOVE_MARK).write_text(f"{base} {sh_git(repo.path, 'rev-parse', 'wo/WO-0001')}\n")
    healed = start_again(repo)
    assert healed.put_back == ["src/login.py", "src/new.py"]
    assert sh_git(repo.path, "status", "--porcelain") == PERSON


# -- hooks, fsmonitor, locks ---------------------------------------------------------------------


def test_hooks_and_fsmonitor_of_the_repository_never_run(ws: Path, tmp_path: Path) -> None:
    repo = init_demo_repo(ws / "repos" / "webapp")
    marker = tmp_path / "hook-ran"
    hooks = repo.git_dir / "hooks"
    hooks.mkdir(exist_ok=True)
    names = ["pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "post-checkout",
             "post-merge", "pre-merge-commit", "reference-transaction", "post-index-change"]  # fmt: skip
    for name in names:
        (hooks / name).write_text(f"#!/bin/sh\necho {name} >> '{marker}'\nexit 0\n")
        (hooks / name).chmod(0o755)
    monitor = tmp_path / "fsmonitor.sh"
    monitor.write_text(f"#!/bin/sh\necho fsmonitor >> '{marker}'\nexit 1\n")
    monitor.chmod(0o755)
    sh_git(repo.path, "config", "core.fsmonitor", str(monitor))
    for strategy in (True, False):
        repo = Repo(repo.path, in_memory_merge=strategy)
        a, b = f"WO-A{strategy:d}", f"WO-B{strategy:d}"
        land(repo, ws, a, {f"src/{a}.py": "a\n"})
        wt = land(repo, ws, b, {f"src/{b}.py": "b\n"})
        repo.merge(a)
        repo.merge(b)  # a merge commit
        repo.discard(wt)
        repo.remove_worktree(a, work(ws, a))
        repo.remove_worktree(b, wt)
    assert not marker.exists(), marker.read_text()
    sh_git(repo.path, "commit", "-q", "--allow-empty", "-m", "plain git runs the hook")
    assert "pre-commit" in marker.read_text()  # the hooks were live all along


def test_stale_index_lock_is_cleared(repo: Repo, ws: Path) -> None:
    (repo.git_dir / "index.lock").write_text("")
    (repo.git_dir / "refs" / "heads" / "main.lock").write_text("")
    edit(repo.path / "x.txt", "x\n")
    assert "index.lock" in subprocess.run(["git", "add", "x.txt"], cwd=repo.path,
                                          capture_output=True, text=True).stderr  # fmt: skip
    assert repo.clear_stale_lock() is True
    assert not (repo.git_dir / "index.lock").exists()
    assert not (repo.git_dir / "refs" / "heads" / "main.lock").exists()
    sh_git(repo.path, "add", "x.txt")
    assert repo.clear_stale_lock() is False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see open files")
def test_a_lock_held_by_a_live_process_stays(repo: Repo) -> None:
    lock = repo.git_dir / "index.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'w'); print('ok', flush=True); sys.stdin.read()",
         str(lock)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        assert repo.clear_stale_lock() is False
        assert lock.exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        assert holder.stdout is not None
        holder.stdout.close()
    assert repo.clear_stale_lock() is True
