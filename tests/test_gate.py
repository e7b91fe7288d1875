"""The permission gate on a real working copy: every kind of change, and the verdict."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from coordinator.demo.repo import init_demo_repo

from coordinator import gate
from coordinator.gate import Change, describe, diff, judge, snapshot
from coordinator.repos import Repo

FILES = ("webapp/src/login.py", "webapp/tests/**")
WRITES = ("webapp/src/**", "webapp/tests/**")


@pytest.fixture
def wt(tmp_path: Path) -> Path:
    """A working copy on wo/WO-1 of the demo repository, with its .git pointer file."""
    repo: Repo = init_demo_repo(tmp_path / "ws" / "repos" / "webapp")
    return repo.add_worktree("WO-1", tmp_path / "ws" / ".coordinator" / "work" / "WO-1" / "webapp")


def changes_after(wt: Path, act: object) -> dict[str, str]:
    """Run `act` on the working copy; what the gate saw, path -> kind of change."""
    before = snapshot(wt)
    act()  # type: ignore[operator]
    return {c.path: c.what for c in diff(before, snapshot(wt, since=before))}


def test_snapshot_records_untracked_ignored_and_the_pointer(wt: Path) -> None:
    (wt / "notes.txt").write_text("untracked\n")
    (wt / "src" / "cache.pyc").write_bytes(b"\0ignored")
    snap = snapshot(wt)
    assert snap[".git"].kind == "file"
    assert snap["notes.txt"].kind == "file" and snap["src/cache.pyc"].digest
    assert snap["src"].kind == "dir"
    assert snap["src/login.py"].nlink == 1


def test_nothing_done_means_no_changes(wt: Path) -> None:
    assert diff(snapshot(wt), snapshot(wt)) == []


def test_added_deleted_and_ignored_files_are_seen(wt: Path) -> None:
    def act() -> None:
        (wt / "src" / "new.py").write_text("new\n")
        (wt / "src" / "cache.pyc").write_bytes(b"ignored by git, not by the gate")
        (wt / "README.md").unlink()

    assert changes_after(wt, act) == {"src/new.py": "added", "src/cache.pyc": "added", "README.md": "deleted"}


def test_modified_with_same_size_and_mtime_is_seen(wt: Path) -> None:
    target = wt / "src" / "login.py"
    st = target.stat()

    def act() -> None:
        text = target.read_text()
        target.write_text(text.replace("required", "REQUIRED"))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    assert target.stat().st_size == st.st_size
    assert changes_after(wt, act) == {"src/login.py": "modified"}


def test_chmod_is_a_mode_change(wt: Path) -> None:
    assert changes_after(wt, lambda: os.chmod(wt / "src" / "login.py", 0o755)) == {"src/login.py": "mode"}


def test_setuid_and_setgid_bits_are_seen(wt: Path) -> None:
    def act() -> None:
        os.chmod(wt / "src" / "login.py", 0o4755)
        (wt / "tests" / "tool").write_text("x")
        os.chmod(wt / "tests" / "tool", 0o2755)

    assert changes_after(wt, act) == {"src/login.py": "setuid", "tests/tool": "setuid"}


def test_symlinks_out_of_the_copy_are_seen(wt: Path) -> None:
    def act() -> None:
        os.symlink("/etc/passwd", wt / "src" / "abs")
        os.symlink("../../outside", wt / "src" / "up")
        os.symlink("login.py", wt / "src" / "alias.py")  # harmless: stays inside
        os.symlink(".", wt / "src" / "here")
        os.symlink("here/here/../..", wt / "src" / "chain")  # looks inside, leads out through `here`
        os.symlink("../.git", wt / "src" / "pointer")

    assert changes_after(wt, act) == {
        "src/abs": "symlink", "src/up": "symlink", "src/alias.py": "added",
        "src/here": "added", "src/chain": "symlink", "src/pointer": "symlink",
    }  # fmt: skip


def test_hard_link_is_seen_on_both_names(wt: Path) -> None:
    act = lambda: os.link(wt / "src" / "login.py", wt / "src" / "copy.py")  # noqa: E731
    assert changes_after(wt, act) == {"src/copy.py": "hardlink", "src/login.py": "hardlink"}


def test_fifo_and_socket_are_special(wt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(wt / "src")  # a socket's path is capped at 107 bytes; a temp folder's may be longer

    def act() -> None:
        os.mkfifo(wt / "src" / "pipe")
        sock.bind("sock")

    try:
        assert changes_after(wt, act) == {"src/pipe": "special", "src/sock": "special"}
    finally:
        sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_device_node_is_special(wt: Path) -> None:
    act = lambda: os.mknod(wt / "src" / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # noqa: E731
    assert changes_after(wt, act) == {"src/null": "special"}


def test_new_git_folder_inside_a_subfolder_is_git_internal(wt: Path) -> None:
    def act() -> None:
        (wt / "src" / "sub" / ".git").mkdir(parents=True)
        (wt / "src" / "sub" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (wt / "tests" / ".GiT").mkdir()
        (wt / ".gitmodules").write_text('[submodule "x"]\n')

    assert changes_after(wt, act) == {
        "src/sub": "added", "src/sub/.git": "git-internal", "src/sub/.git/HEAD": "git-internal",
        "tests/.GiT": "git-internal", ".gitmodules": "git-internal",
    }  # fmt: skip


def test_replaced_pointer_is_seen_and_described(wt: Path) -> None:
    def act() -> None:
        (wt / ".git").unlink()
        (wt / ".git" / "hooks").mkdir(parents=True)
        (wt / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\n")

    before = snapshot(wt)
    act()
    found = diff(before, snapshot(wt, since=before))
    assert {c.path: c.what for c in found} == {
        ".git": "pointer", ".git/hooks": "git-internal", ".git/hooks/pre-commit": "git-internal",
    }  # fmt: skip
    lines = [describe(c) for c in found]
    assert ".git: pointer (replaced by a dir)" in lines
    assert ".git/hooks/pre-commit: git-internal (created)" in lines


def test_edited_pointer_is_seen(wt: Path) -> None:
    act = lambda: (wt / ".git").write_text("gitdir: /elsewhere\n")  # noqa: E731
    assert changes_after(wt, act) == {".git": "pointer"}


def test_a_file_turned_into_a_folder_is_a_type_change(wt: Path) -> None:
    def act() -> None:
        (wt / "README.md").unlink()
        (wt / "README.md").mkdir()
        (wt / "README.md" / "x").write_text("x")

    assert changes_after(wt, act) == {"README.md": "type", "README.md/x": "added"}


def test_whole_copy_gone_reads_as_everything_deleted(wt: Path) -> None:
    before = snapshot(wt)
    shutil.rmtree(wt)
    found = diff(before, snapshot(wt, since=before))
    assert {c.what for c in found} >= {"pointer", "deleted"}
    assert not judge(found, repo="webapp", files=("webapp/**",), writes=("webapp/**",)).allowed


# -- judge -----------------------------------------------------------------------------------------


def verdict_of(wt: Path, act: object, files: tuple[str, ...] = FILES,
               writes: tuple[str, ...] = WRITES) -> gate.Verdict:  # fmt: skip
    before = snapshot(wt)
    act()  # type: ignore[operator]
    return judge(diff(before, snapshot(wt, since=before)), repo="webapp", files=files, writes=writes)


def test_changes_inside_files_and_writes_are_allowed(wt: Path) -> None:
    def act() -> None:
        (wt / "src" / "login.py").write_text("changed\n")
        (wt / "tests" / "unit").mkdir()
        (wt / "tests" / "unit" / "test_more.py").write_text("x = 1\n")
        (wt / "tests" / "__init__.py").unlink()

    v = verdict_of(wt, act)
    assert v.allowed, v.offending
    assert v.commit_paths() == ("src/login.py", "tests/__init__.py", "tests/unit/test_more.py")


def test_inside_files_but_outside_writes_is_denied(wt: Path) -> None:
    act = lambda: (wt / "README.md").write_text("changed\n")  # noqa: E731
    v = verdict_of(wt, act, files=("webapp/README.md",), writes=WRITES)
    assert not v.allowed and v.commit_paths() == ()
    assert [(c.path, why) for c, why in v.offending] == [("README.md", "outside the agent's writes")]


def test_inside_writes_but_outside_files_is_denied(wt: Path) -> None:
    def act() -> None:
        (wt / "src" / "login.py").write_text("allowed\n")
        (wt / "src" / "other.py").write_text("not in the order\n")

    v = verdict_of(wt, act)
    assert [(c.path, why) for c, why in v.offending] == [("src/other.py", "outside the order's files")]


def test_an_order_stored_with_a_malformed_glob_set_is_denied_not_a_crash(wt: Path) -> None:
    # Validation refuses `[z-a]` now; an order taken in before it did still reaches the gate.
    act = lambda: (wt / "src" / "login.py").write_text("changed\n")  # noqa: E731
    v = verdict_of(wt, act, files=("webapp/src/[z-a]", "webapp/src/[]"), writes=WRITES)
    assert [(c.path, why) for c, why in v.offending] == [("src/login.py", "outside the order's files")]


def test_an_empty_folder_outside_files_is_denied(wt: Path) -> None:
    v = verdict_of(wt, lambda: (wt / "docs").mkdir())
    assert [(c.path, c.what) for c, _ in v.offending] == [("docs", "added")]


def test_what_no_permission_grants_is_denied_even_under_a_wide_glob(wt: Path) -> None:
    def act() -> None:
        os.symlink("/etc", wt / "src" / "etc")
        os.mkfifo(wt / "src" / "pipe")
        (wt / "src" / ".git").mkdir()
        os.link(wt / "src" / "login.py", wt / "src" / "twin.py")

    v = verdict_of(wt, act, files=("webapp/**",), writes=("webapp/**",))
    got = {c.path: why for c, why in v.offending}
    assert set(got) == {"src/etc", "src/pipe", "src/.git", "src/twin.py", "src/login.py"}
    assert got["src/.git"] == gate.ALWAYS_DENIED["git-internal"]
    assert v.commit_paths() == ()


def test_describe_without_detail() -> None:
    assert describe(Change("a/b", "added")) == "a/b: added"
    assert describe(Change("x", "deleted", "file")) == "x: deleted (file)"


def test_a_new_folder_that_only_holds_allowed_files_is_allowed_and_committed(tmp_path: Path) -> None:
    repo = init_demo_repo(tmp_path / "ws" / "repos" / "webapp")
    wt = repo.add_worktree("WO-2", tmp_path / "ws" / ".coordinator" / "work" / "WO-2" / "webapp")

    def act() -> None:
        (wt / "src" / "pkg").mkdir()
        (wt / "src" / "pkg" / "rules.py").write_text("LIMIT = 64\n")
        (wt / "src" / "login.py").unlink()

    v = verdict_of(wt, act, files=("webapp/src/pkg/*.py", "webapp/src/login.py"))
    assert v.allowed, v.offending
    assert v.commit_paths() == ("src/login.py", "src/pkg/rules.py")
    sha = repo.commit(wt, v.commit_paths(), agent="chip", subject="Move rules",
                      trailers={"Work-Order": "WO-2", "Agent": "chip"})  # fmt: skip
    assert sha is not None
    assert snapshot(wt)["src/pkg/rules.py"].kind == "file"


# -- what would stall the supervisor: deep trees, huge files ---------------------------------------


def nest(folder: Path, depth: int, name: str = "a") -> None:
    """`depth` folders one inside the next under `folder`, made relative to each other's
    descriptor as a specialist's `mkdir a; cd a` loop makes them (so past PATH_MAX too)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def test_folders_nested_thousands_deep_are_one_denied_change(wt: Path, deep_ok: Path) -> None:
    before = snapshot(wt)
    nest(wt / "src", 1500)
    found = diff(before, snapshot(wt, since=before))  # no RecursionError: the walk keeps its own stack
    # src/ plus 255 levels is as deep as the walk goes; what that folder holds is judged whole.
    deep = "/".join(["src"] + ["a"] * (gate.MAX_DEPTH - 1))
    assert [(c.path, c.what) for c in found if c.what != "added"] == [(deep, "too-deep")]
    assert max(c.path.count("/") + 1 for c in found) == gate.MAX_DEPTH
    v = judge(found, repo="webapp", files=("webapp/**",), writes=("webapp/**",))
    # One line that says why, not 255 new folders before it.
    assert [(c.path, why) for c, why in v.offending] == [(deep, gate.ALWAYS_DENIED["too-deep"])]
    assert describe(v.offending[0][0]).endswith(f"(created, holds more than {gate.MAX_DEPTH} levels down)")
    assert v.commit_paths() == ()


def test_a_path_too_long_to_open_is_denied_as_too_deep(wt: Path, deep_ok: Path) -> None:
    before = snapshot(wt)
    nest(wt / "src", 20, name="n" * 250)  # 20 levels, 5,000 bytes: past PATH_MAX
    v = judge(diff(before, snapshot(wt, since=before)), repo="webapp", files=("webapp/**",), writes=("webapp/**",))
    assert [(c.what, why) for c, why in v.offending] == [("too-deep", gate.ALWAYS_DENIED["too-deep"])]


def test_a_huge_sparse_file_is_denied_by_its_size_without_reading_it(wt: Path) -> None:
    before = snapshot(wt)
    with open(wt / "src" / "big.bin", "wb") as f:
        f.truncate(16 << 30)  # 16 GiB of nothing: no disk used, ten seconds and more to hash
    start = time.monotonic()
    after = snapshot(wt)
    assert time.monotonic() - start < 5.0
    v = judge(diff(before, after), repo="webapp", files=("webapp/src/**",), writes=("webapp/src/**",))
    assert [(c.path, why) for c, why in v.offending] == [("src/big.bin", gate.ALWAYS_DENIED["too-large"])]
    assert describe(v.offending[0][0]) == "src/big.bin: too-large (created, 17179869184 bytes = 16.0 GiB)"


def test_a_huge_file_left_alone_is_no_change_and_any_write_to_it_is_seen(wt: Path) -> None:
    big = wt / "src" / "big.bin"
    with open(big, "wb") as f:
        f.truncate(gate.MAX_FILE_BYTES + 1)
    before = snapshot(wt)
    assert diff(before, snapshot(wt, since=before)) == []
    st = big.stat()

    def act() -> None:  # same size, same mtime: only the inode change time tells
        with open(big, "r+b") as f:
            f.write(b"x")
        os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))

    before = snapshot(wt)
    time.sleep(0.01)  # a change time one tick later, on coarse clocks too
    act()
    assert {c.path: c.what for c in diff(before, snapshot(wt, since=before))} == {"src/big.bin": "too-large"}


def reads_of(wt: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the paths (relative to `wt`) whose content the gate reads, in order."""
    read: list[str] = []
    real_digest = gate._digest

    def counted(path: str, size: int) -> str:
        read.append(os.path.relpath(path, wt))
        return real_digest(path, size)

    monkeypatch.setattr(gate, "_digest", counted)
    return read


def test_a_file_not_written_since_the_first_snapshot_is_not_read_again(wt: Path, monkeypatch) -> None:
    """The second snapshot takes over the digest of a file whose inode, size, mtime and change
    time are all as they were: only what the run wrote is read."""
    read = reads_of(wt, monkeypatch)
    time.sleep(gate.RACY_NS / 1e9 + 0.01)  # the checkout's files settle (see the next test)
    before = snapshot(wt)
    assert "src/login.py" in read
    read.clear()
    (wt / "src" / "new.py").write_text("x = 1\n")
    after = snapshot(wt, since=before)
    assert read == ["src/new.py"]
    assert after["src/login.py"] == before["src/login.py"]


def test_a_file_changed_in_the_clock_tick_of_the_first_snapshot_is_read_again(wt: Path, monkeypatch) -> None:
    """File times come from a coarse clock: a write right after the first snapshot can leave
    a file's change time as it was. A file changed that close to it is read again, whatever
    its key says (git's "racily clean")."""
    time.sleep(gate.RACY_NS / 1e9 + 0.01)
    (wt / "src" / "fresh.py").write_text("y = 2\n")  # changed just now
    before = snapshot(wt)
    read = reads_of(wt, monkeypatch)
    snapshot(wt, since=before)
    assert read == ["src/fresh.py"]


def test_a_rewrite_that_puts_size_and_mtime_back_is_still_read(wt: Path) -> None:
    login = wt / "src" / "login.py"
    st = login.stat()
    before = snapshot(wt)
    time.sleep(0.01)  # a change time one tick later, on coarse clocks too
    text = login.read_bytes()
    login.write_bytes(text[:-1] + (b"#" if text[-1:] != b"#" else b"!"))  # same size
    os.utime(login, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert {c.path: c.what for c in diff(before, snapshot(wt, since=before))} == {"src/login.py": "modified"}


def test_many_files_each_under_the_limit_are_refused_unread_past_the_total(wt: Path, monkeypatch) -> None:
    monkeypatch.setattr(gate, "MAX_CHANGED_BYTES", 1000)
    time.sleep(gate.RACY_NS / 1e9 + 0.01)  # the checkout's files settle: only the parts are read
    before = snapshot(wt)
    for i in range(5):
        (wt / "src" / f"part{i}.bin").write_bytes(b"x" * 400)
    read = reads_of(wt, monkeypatch)
    found = {c.path: c for c in diff(before, snapshot(wt, since=before))}
    refused = sorted(p for p, c in found.items() if c.what == "too-large")
    assert len(refused) == 3 and all(found[p].detail.startswith("created, past 1000 bytes") for p in refused)
    assert sorted(read) == sorted(set(found) - set(refused))  # the refused ones were never read
    v = judge(list(found.values()), repo="webapp", files=("webapp/**",), writes=("webapp/**",))
    assert not v.allowed


def test_a_file_that_grows_after_its_size_was_taken_is_not_read_to_its_end(tmp_path: Path) -> None:
    """The size limits judge by lstat's size; a file grown (a sparse 16 GiB, say) between the
    lstat and the read is read no further than that size, and reads as unknown content."""
    path = tmp_path / "grows.bin"
    path.write_bytes(b"x" * 10)
    with open(path, "r+b") as f:
        f.truncate(16 * 1024**3)
    started = time.perf_counter()
    assert gate._digest(str(path), 10) == gate.UNREADABLE
    assert time.perf_counter() - started < 1.0


def test_a_glob_set_never_matches_the_slash_between_two_names(wt: Path) -> None:
    # `src/v[!0-9]*` allows names in src/ like `vx.py`; it kept all of src/v/evil.py, a file
    # in a folder the writes never named, as `[^0-9]` matched the '/'. A range like [.-0] too.
    def act() -> None:
        (wt / "src" / "v").mkdir()
        (wt / "src" / "v" / "evil.py").write_text("kept?\n")
        (wt / "src" / "vx.py").write_text("allowed\n")

    for glob in ("webapp/src/v[!0-9]*", "webapp/src/v[.-0]*"):
        v = verdict_of(wt, act, files=(glob, "webapp/src/vx.py"), writes=(glob, "webapp/src/vx.py"))
        assert [(c.path, why) for c, why in v.offending] == [
            ("src/v/evil.py", "outside the order's files and the agent's writes")], glob
        shutil.rmtree(wt / "src" / "v")
        (wt / "src" / "vx.py").unlink()


def test_a_folder_the_supervisor_cannot_read_is_denied_whole(wt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A supervisor that is not root cannot list a folder its specialist made mode 000 (root
    # can, so the refusal is simulated): what it holds read as deleted, the deletions were
    # allowed, and staging them stopped the supervisor with a PermissionError.
    (wt / "src" / "sub").mkdir()
    (wt / "src" / "sub" / "x.py").write_text("x = 1\n")
    before = snapshot(wt)
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if str(path).endswith("/src/sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(gate.os, "scandir", scandir)
    changes = diff(before, snapshot(wt, since=before))
    assert [(c.path, c.what) for c in changes] == [("src/sub", "unreadable")]
    v = judge(changes, repo="webapp", files=("webapp/**",), writes=("webapp/**",))
    assert [why for _, why in v.offending] == [gate.ALWAYS_DENIED["unreadable"]]
    assert v.commit_paths() == ()


def git_dir_of(folder: Path) -> str:
    """What git, run in `folder`, takes for its repository (`.` when the folder itself), bare
    repositories allowed as they are by default."""
    return subprocess.run(["git", "-c", "safe.bareRepository=all", "rev-parse", "--git-dir"], cwd=folder,
                          capture_output=True, text=True).stdout.strip()


def plant(top: Path, layout: dict[str, str | None]) -> None:
    """Files (text) and folders (None) under `top`."""
    for rel, text in layout.items():
        path = top / rel
        if text is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


BARE = {"HEAD": "ref: refs/heads/main\n", "objects": None, "refs/heads": None,
        "config": "[core]\n\tbare = true\n\tpager = touch pwned\n[alias]\n\tst = !touch pwned\n"}


@pytest.mark.parametrize("case", ["bare", "linked", "completed"])
def test_a_folder_git_takes_for_a_repository_is_denied_under_any_permission(wt: Path, case: str) -> None:
    # Merged, it would be a repository of the agent's making inside the user's: the first
    # `git log` run in it would start its pager (or alias, or hook) as that person.
    if case == "completed":  # an untracked folder already there, that the agent makes one
        plant(wt / "src" / "fixture", {k: v for k, v in BARE.items() if k != "HEAD"})
    layout = {
        "bare": BARE,
        "linked": {"HEAD": BARE["HEAD"], "commondir": "../common\n"},  # its objects, refs, config: there
        "completed": {"HEAD": BARE["HEAD"]},
    }[case]
    act = lambda: plant(wt / "src" / "fixture", layout)  # noqa: E731
    if case == "linked":
        plant(wt / "src" / "common", {k: v for k, v in BARE.items() if k != "HEAD"})
    v = verdict_of(wt, act, files=("webapp/**",), writes=("webapp/**",))
    assert git_dir_of(wt / "src" / "fixture") == "."  # git agrees: this folder is a repository
    assert [(c.path, why) for c, why in v.offending] == [("src/fixture", gate.ALWAYS_DENIED["git-repository"])]
    shown = describe(v.offending[0][0])
    held = "HEAD, commondir" if case == "linked" else "HEAD, objects, refs"
    assert shown == f"src/fixture: git-repository ({'changed' if case == 'completed' else 'created'}, holds {held})"
    assert v.commit_paths() == ()


def test_a_folder_git_takes_for_a_repository_is_denied_whatever_the_case_of_its_names(wt: Path) -> None:
    # A clone on a case-insensitive file system (macOS, Windows) finds `head` as HEAD.
    act = lambda: plant(wt / "src" / "fixture", {"head": "ref: refs/heads/main\n", "Objects": None, "REFS.": None})  # noqa: E731
    v = verdict_of(wt, act, files=("webapp/**",), writes=("webapp/**",))
    assert [(c.path, c.what) for c, _ in v.offending] == [("src/fixture", "git-repository")]


def test_folders_named_like_parts_of_a_repository_are_still_allowed(wt: Path) -> None:
    def act() -> None:
        plant(wt / "src", {
            "model/objects/user.py": "x = 1\n", "model/refs/links.py": "y = 2\n",  # no HEAD
            "vcs/HEAD": "ref: refs/heads/main\n", "vcs/objects/blob.py": "z = 3\n",  # no refs
            "doc/HEAD/index.md": "# a folder named HEAD\n", "doc/objects": None, "doc/refs/r.md": "r\n",
        })  # fmt: skip

    v = verdict_of(wt, act, files=("webapp/**",), writes=("webapp/**",))
    assert v.offending == ()
    for folder in ("model", "vcs", "doc"):
        assert git_dir_of(wt / "src" / folder) != "."  # nor does git take any of them for one
    assert "src/vcs/HEAD" in v.commit_paths() and "src/model/objects/user.py" in v.commit_paths()


def add_submodule(repo: Path, folder: str, source: Path) -> None:
    """Make `folder` of `repo` a submodule, committed, as a person would (`git submodule add`)."""
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    ident = ["-c", "user.name=p", "-c", "user.email=p@x"]
    subprocess.run(["git", "-C", str(source), *ident, "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "protocol.file.allow=always", "submodule", "add", "-q",
                    str(source), folder], check=True, capture_output=True)
    subprocess.run(["git", "-C", str(repo), *ident, "commit", "-q", "-m", "a submodule"], check=True)


def test_a_file_written_inside_a_submodule_is_denied_with_where_to_change_it(tmp_path: Path) -> None:
    # Not checked out in the working copy, the submodule is an empty folder: a file written
    # there is in another repository, and git could never commit it here.
    repo: Repo = init_demo_repo(tmp_path / "ws" / "repos" / "webapp")
    add_submodule(repo.path, "vendor/sub", tmp_path / "sub")
    wt = repo.add_worktree("WO-1", tmp_path / "ws" / ".coordinator" / "work" / "WO-1" / "webapp")
    before = snapshot(wt)
    (wt / "vendor" / "sub" / "s.txt").write_text("s\n")
    (wt / "vendor" / "subway").mkdir()
    (wt / "vendor" / "subway" / "x.txt").write_text("x\n")  # beside it, a name that starts the same
    (wt / "src" / "login.py").write_text("changed\n")
    changes = diff(before, snapshot(wt, since=before))
    asked = gate.submodule_candidates(changes, before)
    assert asked == ["src", "vendor", "vendor/sub"]  # only folders that were there: few, whatever the change
    v = judge(changes, repo="webapp", files=("webapp/**",), writes=("webapp/**",),
              submodules=repo.submodules(wt, asked))
    assert [(c.path, why) for c, why in v.offending] == [
        ("vendor/sub/s.txt", "inside the submodule vendor/sub: change it in its own repository")]


def test_planted_names_what_git_would_take_for_a_repository_in_a_folder_and_never_enters_links(tmp_path: Path) -> None:
    """What an agent leaves in its attempt folder for a person to read: each `.git` (in any case),
    each folder shaped like a repository (whole), and the entries that make the folder itself one."""
    top = tmp_path / "attempt"
    plant(top, {**BARE, "brief.md": "# brief\n", "outbox/.GIT/HEAD": "x\n", "outbox/kept.md": "to: chip\n",
                "tmp/deep/x/HEAD": "ref: refs/heads/main\n", "tmp/deep/x/objects": None, "tmp/deep/x/refs": None,
                "tmp/model/objects/user.py": "x = 1\n", "elsewhere/.git/HEAD": "x\n"})
    (top / "outbox" / "link").symlink_to(top / "elsewhere", target_is_directory=True)
    found = sorted(os.path.relpath(p, top) for p in gate.planted(str(top)))
    assert found == ["HEAD", "elsewhere/.git", "objects", "outbox/.GIT", "refs", "tmp/deep/x"]


def test_a_link_that_led_out_before_the_change_is_not_the_changes_doing(wt: Path) -> None:
    # An escaping link the repository already had is left to whoever made it: a change that
    # adds a harmless link beside it is not refused for it.
    os.symlink("../../elsewhere", wt / "src" / "old")
    assert changes_after(wt, lambda: os.symlink("login.py", wt / "src" / "alias.py")) == {"src/alias.py": "added"}


def test_a_link_left_as_it_was_is_refused_when_a_changed_link_makes_it_lead_out(wt: Path) -> None:
    (wt / "src" / "a" / "b" / "c").mkdir(parents=True)
    os.symlink("a/b/c/../../../..", wt / "src" / "l")  # inside: a/b/c is a folder

    def act() -> None:
        (wt / "src" / "a" / "b" / "c").rmdir()
        os.symlink("../../..", wt / "src" / "a" / "b" / "c")  # inside itself

    assert changes_after(wt, act) == {"src/a/b/c": "type", "src/l": "symlink"}


def test_a_folder_git_takes_for_dot_git_on_ntfs_is_git_internal(wt: Path) -> None:
    # git never stages it (it protects a checkout on NTFS): allowed, the change was "done"
    # with the file silently left out.
    def act() -> None:
        (wt / "src" / ".git::$INDEX_ALLOCATION").mkdir()
        (wt / "src" / ".git::$INDEX_ALLOCATION" / "config").write_text("[core]\n")

    assert changes_after(wt, act) == {"src/.git::$INDEX_ALLOCATION": "git-internal",
                                      "src/.git::$INDEX_ALLOCATION/config": "git-internal"}


def test_a_link_left_as_it_was_is_refused_when_a_link_on_its_way_becomes_a_folder(wt: Path) -> None:
    # Through the link a -> x/y, l -> a/../../.. stays inside; with a a folder, it leads out.
    (wt / "src" / "x" / "y").mkdir(parents=True)
    os.symlink("x/y", wt / "src" / "a")
    os.symlink("a/../../..", wt / "src" / "l")

    def act() -> None:
        (wt / "src" / "a").unlink()
        (wt / "src" / "a").mkdir()

    assert changes_after(wt, act) == {"src/a": "type", "src/l": "symlink"}


def test_a_git_repository_the_agent_made_is_denied_in_one_line_not_one_per_file(wt: Path) -> None:
    # `git init src/sub` was denied with a line for each of the 26 paths under src/sub/.git:
    # a reader needs the one folder (and how much it held), and the allowed change beside it.
    def act() -> None:
        subprocess.run(["git", "init", "-q", str(wt / "src" / "sub")], check=True)
        (wt / "src" / "login.py").write_text("changed\n")
        (wt / "src" / "pipe").write_text("")
        os.link(wt / "src" / "pipe", wt / "src" / "sub" / ".git-pipe")  # sorts among the paths in src/sub/.git

    v = verdict_of(wt, act, files=("webapp/src/**",), writes=("webapp/src/**",))
    inside = sum(1 for c in v.changes if c.path.startswith("src/sub/.git/"))
    assert inside > 10
    lines = [describe(c) for c, _ in v.offending]
    assert lines == ["src/pipe: hardlink (created, 2 links)",
                     f"src/sub/.git: git-internal (created, and the {inside} paths in it)",
                     "src/sub/.git-pipe: hardlink (created, 2 links)"]
    assert not v.allowed and v.commit_paths() == ()
