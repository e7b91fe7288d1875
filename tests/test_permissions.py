"""The permission attack battery (SPEC §7, issue 4): real sandboxed specialists try to break out.

Every attack runs as one real specialist process under the real supervisor loop
(`Supervisor(ws).run_once()`), in its own workspace. Each test checks both
halves of the promise: the attempt was refused (the errno the kernel gave the
specialist, or the order `denied` with the path in the report) *and* the
target is unchanged on disk (content, mode, mtime, inode), with the
repository's default branch where it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import select
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import drop, order_md, step_until

from coordinator import gate, landlock, mounts, seccomp, signals
from coordinator.reports import fresh_brief
from coordinator.store import Record, Store
from coordinator.supervisor import Supervisor
from coordinator.workspace import Workspace

needs_landlock = pytest.mark.skipif(landlock.abi_version() < 1, reason="this kernel has no Landlock")
needs_readonly = pytest.mark.skipif(mounts.status() is not None,
                                    reason=f"no read-only mount layer here: {mounts.status()}")
GUARD = landlock.abi_version() >= 1 and seccomp.status() is None  # setuid modes and leases refused
needs_guard = pytest.mark.skipif(not GUARD, reason=f"no setuid/lease guard here: {seccomp.status()}")

# Prepended to every attack: each operation prints one line, `<label>: refused <ERRNO>` or `<label>: DONE`.
PRELUDE = '''
import errno, os, sys
def attempt(label, fn):
    try:
        fn()
    except OSError as e:
        print(label + ": refused " + errno.errorcode.get(e.errno, str(e.errno)), flush=True)
    else:
        print(label + ": DONE", flush=True)
def write(path, text="pwned\\n", mode="a"):
    with open(path, mode) as f:
        f.write(text)
'''


def attacker(body: str) -> list[str]:
    """A specialist command: Python running `body` (after PRELUDE) in the working copy."""
    return ["{python}", "-c", PRELUDE + body]


def run(ws: Workspace) -> None:
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)


def record(ws: Workspace, order_id: str) -> Record:
    return Store(ws.state).load(order_id)


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def fingerprint(path: Path) -> Any:
    """What a user would notice changed about `path`: kind, mode, inode, mtime, content; None if absent.

    A folder's fingerprint covers everything beneath it, by lstat (links are not followed).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    own = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_ino, st.st_nlink, st.st_mtime_ns)
    if stat.S_ISLNK(st.st_mode):
        return (*own, os.readlink(path))
    if stat.S_ISREG(st.st_mode):
        return (*own, hashlib.sha256(path.read_bytes()).hexdigest())
    if stat.S_ISDIR(st.st_mode):
        return (*own, {p.name: fingerprint(p) for p in sorted(path.iterdir())})
    return own


def refusals(rec: Record, text: str | None = None) -> dict[str, str]:
    """label -> 'refused EACCES' | 'DONE', from what the specialist printed (the report's summary)."""
    out = {}
    for line in (text if text is not None else str((rec.report or {}).get("summary", ""))).splitlines():
        label, sep, what = line.partition(": ")
        if sep and (what.startswith("refused ") or what == "DONE"):
            out[label] = what
    return out


# -- the kernel layer: writes outside the working copy fail the moment they are attempted ----------

# Outside every writable folder the read-only mount layer, where it is on, refuses before
# Landlock is asked (EROFS); inside a working copy only Landlock can refuse (EACCES).
READONLY_MOUNTS = mounts.status() is None
OUTSIDE = "refused EROFS" if READONLY_MOUNTS else "refused EACCES"
OUTSIDE_TEXT = "Read-only file system" if READONLY_MOUNTS else "Permission denied"
DENIED = ("refused EACCES", "refused EROFS", "refused EPERM", "refused EXDEV")
WIDE = {"role": "specialist", "writes": ["webapp/**"]}


def targets(ws: Workspace, home: Path, outside: Path) -> dict[str, Path]:
    """Everything a specialist must never write, by name."""
    return {
        "state-record": ws.state / "orders" / "atk" / "record.json",
        "state-git": ws.state / ".git" / "HEAD",
        "inbox": ws.inbox("chip") / "forged.md",
        "other-repo": ws.repos / "other" / "src" / "login.py",
        "main-checkout": ws.repos / "webapp" / "src" / "login.py",
        "hooks": ws.repos / "webapp" / ".git" / "hooks" / "pre-commit",
        "git-config": ws.repos / "webapp" / ".git" / "config",
        "config": ws.config_path,
        "runtime-pid": ws.runtime / "supervisor.pid",
        "fake-home": home / ".bashrc",
        "absolute": outside / "target.txt",
    }


def attack_path(body: str) -> str:
    """Every way to write one path TARGET: append, create beside it, truncate, unlink, rename, mkdir, link."""
    return body + '''
exists = os.path.lexists(TARGET)
folder = os.path.dirname(TARGET)
attempt("append", lambda: write(TARGET))
attempt("create-beside", lambda: write(os.path.join(folder, "beside.txt"), mode="x"))
attempt("mkdir-beside", lambda: os.mkdir(os.path.join(folder, "beside.d")))
attempt("symlink-beside", lambda: os.symlink("/", os.path.join(folder, "beside.lnk")))
if exists:
    attempt("truncate", lambda: os.truncate(TARGET, 0))
    attempt("unlink", lambda: os.unlink(TARGET))
    attempt("rename-in", lambda: os.rename(TARGET, "stolen"))
    decoy = os.path.join(os.environ["TMPDIR"], "decoy")
    attempt("rename-over", lambda: (write(decoy, mode="w"), os.rename(decoy, TARGET)))
'''


@needs_landlock
@pytest.mark.parametrize("name", ["state-record", "state-git", "inbox", "other-repo", "main-checkout", "hooks",
                                  "git-config", "config", "runtime-pid", "fake-home", "absolute",
                                  "via-dotdot"])
def test_writes_outside_the_working_copy_are_refused_by_the_kernel(make_ws, tmp_path: Path, name: str) -> None:
    from coordinator.demo.repo import init_demo_repo

    home, outside = tmp_path / "home", tmp_path / "outside"
    home.mkdir()
    (home / ".bashrc").write_text("# the user's own\n")
    outside.mkdir()
    (outside / "target.txt").write_text("precious\n")
    ws = Workspace(tmp_path / "ws")
    where = targets(ws, home, outside)
    if name == "via-dotdot":
        # From the working copy .coordinator/work/atk/webapp up to the workspace's config.
        target = ws.config_path
        path = "../../../../" + ws.config_path.name
    elif name == "fake-home":
        target, path = where[name], "~/.bashrc"
    else:
        target = where[name]
        path = str(target)
    code = attack_path(f"TARGET = os.path.expanduser({path!r})\n")
    spec = {**WIDE, "command": attacker(code), "env": {"PROBE": str(tmp_path / "probe"), "HOME": str(home)}}
    ws = make_ws({"chip": spec})
    init_demo_repo(ws.repos / "other")
    drop(ws, "chip", "atk.md", order_md("Attack", files=("webapp/**",), id="atk"))
    main = git(ws.repos / "webapp", "rev-parse", "main")
    # The order's own record exists once intake ran; fingerprint it then.
    with Supervisor(ws) as sup:
        sup.step_commit()
        sup._intake_step()
        sup.step_commit()
        before = {k: fingerprint(p) for k, p in where.items()}
        sup.run_once(limit=60)
    rec = record(ws, "atk")
    seen = refusals(rec)
    assert len(seen) == (8 if before.get(name, before["config"]) else 4), rec.report  # every way was tried
    assert {k: v for k, v in seen.items() if v not in DENIED} == {}, rec.report
    after = {k: fingerprint(p) for k, p in where.items()}
    # The order's record legitimately changes as the order moves on; what the attack appends would
    # make it unreadable, and record() above read it.
    assert "pwned" not in where["state-record"].read_text()
    before.pop("state-record")
    after.pop("state-record")
    assert after == before
    assert rec.status == "done" and rec.commit is None  # nothing was written, so nothing was committed
    assert git(ws.repos / "webapp", "rev-parse", "main") == main


# -- the gate: what the kernel lets through inside a granted folder is judged after the run -------


class Attack:
    """One attack order run to its end in a fresh workspace, with what it must not have changed."""

    def __init__(self, make_ws: Any, tmp_path: Path, code: str, *, files: tuple[str, ...],
                 writes: tuple[str, ...] = ("webapp/**",), acceptance: tuple[str, ...] | None = None,
                 max_failures: int = 1, extra: dict[str, Any] | None = None,
                 before: Callable[[Attack], None] | None = None,
                 while_open: Callable[[Attack], None] | None = None) -> None:
        self.probe = tmp_path / "probe"
        self.outside = tmp_path / "outside"
        self.outside.mkdir(exist_ok=True)
        (self.outside / "target.txt").write_text("precious\n")
        root = tmp_path / "ws"
        header = f"OUTSIDE = {str(self.outside)!r}\nPROBE = {str(self.probe)!r}\nWS = {str(root)!r}\n"
        self.ws = make_ws({"chip": {"role": "specialist", "writes": list(writes), "max_failures": max_failures,
                                    "command": attacker(header + code), **(extra or {})}})
        self.repo = self.ws.repos / "webapp"
        self.main = git(self.repo, "rev-parse", "main")
        self.checkout = self.files_of(self.repo)
        self.outside_before = fingerprint(self.outside)
        self.config_before = fingerprint(self.ws.config_path)
        if before is not None:
            before(self)
        drop(self.ws, "chip", "atk.md", order_md("Attack", files=files, acceptance=acceptance, id="atk"))
        with Supervisor(self.ws) as sup:
            sup.run_once(limit=60)
            self.rec = record(self.ws, "atk")
            if while_open is not None:  # a long-running supervisor: nothing is killed at its exit yet
                while_open(self)

    @staticmethod
    def files_of(repo: Path) -> Any:
        return {p.name: fingerprint(p) for p in repo.iterdir() if p.name != ".git"}

    @property
    def log(self) -> str:
        """Everything the specialist printed in its (first) attempt."""
        return (self.ws.runtime / "logs" / "atk" / "1" / "output.log").read_text()

    @property
    def offending(self) -> list[str]:
        return list((self.rec.report or {}).get("offending", []))

    def assert_untouched(self) -> None:
        """No target changed: the branch, the main checkout, the world outside, the config."""
        assert git(self.repo, "rev-parse", "main") == self.main
        assert self.files_of(self.repo) == self.checkout
        assert fingerprint(self.outside) == self.outside_before
        assert fingerprint(self.ws.config_path) == self.config_before
        assert git(self.repo, "status", "--porcelain") == ""

    def assert_denied(self, *paths: str, scope: bool = True) -> None:
        """Denied by the gate, each path named in the report, nothing of it committed anywhere;
        a `scope` signal recorded (a write outside its files) when `scope`, none otherwise."""
        assert self.rec.status == "denied", self.rec.report
        for p in paths:
            assert any(line.startswith(f"webapp/{p}: ") for line in self.offending), (p, self.offending)
        assert self.rec.commit is None
        branch = subprocess.run(["git", "-C", str(self.repo), "rev-parse", "-q", "--verify", "wo/atk"],
                                capture_output=True, text=True).stdout.strip()
        assert branch in ("", self.main)  # the order's branch never got a commit
        from coordinator import signals
        assert any(s.kind == "scope" and s.order == "atk" for s in signals.load(self.ws.state)) == scope
        self.assert_untouched()


@needs_landlock
def test_a_symlink_out_of_the_working_copy_is_denied_and_cannot_be_written_through(make_ws, tmp_path):
    a = Attack(make_ws, tmp_path, '''
os.symlink(os.path.join(OUTSIDE, "target.txt"), "src/abs.py")
os.symlink("../../../../../coordinator.yaml", "src/rel.py")  # up from src/ to the workspace
os.symlink("../.git", "src/gitdir.py")
attempt("through-abs", lambda: write("src/abs.py"))
attempt("through-rel", lambda: write("src/rel.py"))
''', files=("webapp/src/**",))
    assert refusals(a.rec) == {}  # denied: the summary is the gate's, not the specialist's
    a.assert_denied("src/abs.py", "src/rel.py", "src/gitdir.py")
    log = a.log
    assert f"through-abs: {OUTSIDE}" in log and f"through-rel: {OUTSIDE}" in log


@needs_landlock
def test_a_hard_link_out_of_the_working_copy_is_refused_or_denied(make_ws, tmp_path):
    a = Attack(make_ws, tmp_path, '''
attempt("link-outside", lambda: os.link(os.path.join(OUTSIDE, "target.txt"), "src/out.py"))
attempt("link-main", lambda: os.link(os.path.join(WS, "repos/webapp/src/login.py"), "src/main.py"))
write(os.path.join(PROBE, "mine.txt"), mode="w")
attempt("link-probe", lambda: os.link(os.path.join(PROBE, "mine.txt"), "src/probe.py"))
attempt("link-away", lambda: os.link("src/login.py", os.path.join(PROBE, "away.py")))
''', files=("webapp/src/**",))
    log = a.log
    # Out of the sandbox's write area the kernel refuses the link; between two writable places it
    # cannot, so the gate sees the extra link count and denies.
    assert "link-outside: refused EXDEV" in log and "link-main: refused EXDEV" in log
    if READONLY_MOUNTS:  # the probe folder and the working copy are two mounts: no link between them
        assert "link-probe: refused EXDEV" in log and "link-away: refused EXDEV" in log
        a.assert_untouched()
    else:
        assert "link-probe: DONE" in log and "link-away: DONE" in log
        a.assert_denied("src/probe.py", "src/login.py")


@needs_landlock
def test_a_rename_between_two_allowed_folders_of_one_copy_lands(make_ws, tmp_path):
    """Two writable folders of one working copy are one mount: a move between them is not a move
    across devices (EXDEV), with the read-only mounts on as without them."""
    a = Attack(make_ws, tmp_path, '''
attempt("src-to-tests", lambda: os.rename("src/login.py", "tests/login.py"))
''', files=("webapp/src/**", "webapp/tests/**"))
    assert "src-to-tests: DONE" in a.log
    assert a.rec.status == "done", a.rec.report
    assert sorted(a.rec.report["changed"]) == ["webapp/src/login.py", "webapp/tests/login.py"]


@needs_landlock
def test_a_rename_out_of_the_allowed_folder_is_refused_or_denied(make_ws, tmp_path):
    a = Attack(make_ws, tmp_path, '''
attempt("to-root", lambda: os.rename("src/login.py", "login.py"))
attempt("to-tests", lambda: os.rename("src/login.py", "tests/login.py"))
attempt("up-and-out", lambda: os.rename("src/login.py", "../../login.py"))
attempt("folder-out", lambda: os.rename("src", "src2"))
attempt("same-folder", lambda: os.rename("src/login.py", "src/login.txt"))
''', files=("webapp/src/*.py",))
    log = a.log
    for label in ("to-root", "to-tests", "up-and-out", "folder-out"):
        assert any(f"{label}: {d}" in log for d in DENIED), log
    assert "same-folder: DONE" in log  # inside the granted folder the kernel cannot tell; the gate can
    a.assert_denied("src/login.txt")


@needs_landlock
def test_replacing_the_git_pointer_is_denied_and_its_config_never_runs(make_ws, tmp_path):
    # A fake git dir whose config would run a command for any git that trusted the pointer.
    a = Attack(make_ws, tmp_path, '''
os.unlink(".git")
os.makedirs(".git/hooks")
open(".git/HEAD", "w").write("ref: refs/heads/main\\n")
hook = "#!/bin/sh\\ntouch " + os.path.join(PROBE, "pwned") + "\\n"
open(".git/config", "w").write("[core]\\n\\tfsmonitor = " + hook.splitlines()[1] + "\\n\\thooksPath = hooks\\n")
for name in ("pre-commit", "post-commit", "post-checkout", "reference-transaction", "post-index-change"):
    open(".git/hooks/" + name, "w").write(hook)
    os.chmod(".git/hooks/" + name, 0o755)
write("src/login.py")  # an allowed change alongside: it must not land either
''', files=("webapp/**",))
    a.assert_denied(".git")
    assert not (a.probe / "pwned").exists()
    assert git(a.repo, "branch", "--list", "main", "--format=%(objectname)") == a.main


@needs_landlock
def test_a_denied_copy_kept_for_inspection_runs_nothing_of_the_agents_when_inspected(make_ws, tmp_path):
    # The denied copy stays for a person to look at; the agent's own git dirs in it (the
    # pointer replaced, a nested one) would have run their fsmonitor as that person, outside
    # any sandbox, at the first `git status` there.
    a = Attack(make_ws, tmp_path, '''
import subprocess
os.unlink(".git")
for top in (".git", "src/.git", "src/deep/.GIT"):
    subprocess.run(["git", "init", "-q", "--bare", top], check=True)
    subprocess.run(["git", "config", "-f", top + "/config", "core.bare", "false"], check=True)
    subprocess.run(["git", "config", "-f", top + "/config", "core.fsmonitor",
                    "touch " + os.path.join(PROBE, "pwned") + "; false #"], check=True)
''', files=("webapp/**",))
    a.assert_denied(".git")
    kept = a.ws.runtime / "work" / "atk" / "webapp"
    pointer = (kept / ".git").read_text()
    assert pointer.startswith("gitdir: ") and Path(pointer.split(" ", 1)[1].strip()).parent.parent == a.repo / ".git"
    assert not (kept / "src" / ".git").exists() and not (kept / "src" / "deep" / ".GIT").exists()
    for where in (kept, kept / "src", kept / "src" / "deep"):
        subprocess.run(["git", "status"], cwd=where, capture_output=True, check=False)
    assert not (a.probe / "pwned").exists()
    # Each git folder is one line (with how many paths it held), never one per file in it.
    assert any(line.startswith("webapp/src/.git: git-internal (created, and the ") for line in a.offending)
    assert not any(line.startswith("webapp/src/.git/") for line in a.offending)


@needs_landlock
def test_a_folder_git_takes_for_a_repository_is_denied_and_never_reaches_the_user(make_ws, tmp_path):
    # A bare repository planted where the agent may write: merged, the user's first `git log`
    # in src/fixture would start the agent's pager (or alias, or fsmonitor) outside any sandbox.
    a = Attack(make_ws, tmp_path, '''
run = "touch " + os.path.join(PROBE, "pwned")
os.makedirs("src/fixture/objects")
os.makedirs("src/fixture/refs/heads")
write("src/fixture/HEAD", "ref: refs/heads/main\\n", mode="w")
write("src/fixture/config", "[core]\\n\\tbare = true\\n\\tpager = " + run + "\\n\\tfsmonitor = " + run
      + "\\n[alias]\\n\\tlog = !" + run + "\\n", mode="w")
for keep in ("objects/.keep", "refs/heads/.keep"):  # so that git commits the folders
    write("src/fixture/" + keep, "", mode="w")
write("src/login.py")  # an allowed change alongside: it must not land either
''', files=("webapp/src/**",), writes=("webapp/src/**",))
    a.assert_denied("src/fixture")
    assert [line.split(" — ", 1)[1] for line in a.offending if line.startswith("webapp/src/fixture")] == [
        gate.ALWAYS_DENIED["git-repository"]]
    assert not (a.repo / "src" / "fixture").exists()
    kept = a.ws.runtime / "work" / "atk" / "webapp"  # the denied copy, kept for a person to look at
    assert (kept / "src" / "login.py").exists() and not (kept / "src" / "fixture").exists()
    subprocess.run(["git", "-c", "safe.bareRepository=all", "log"], cwd=kept / "src", capture_output=True,
                   check=False)
    assert not (a.probe / "pwned").exists()


@needs_landlock
@pytest.mark.parametrize("where", ["src/many", "."])
def test_a_change_of_more_new_files_than_the_limit_is_denied_unlisted(make_ws, tmp_path, monkeypatch, where):
    # 300,000 empty files in an allowed folder took the supervisor 440 MB and 46 s, and put an
    # 8 MB record in state/ (a few million would take it down with every order): past the limit
    # the folder is refused as a whole, and what else is new in it is never read or listed.
    monkeypatch.setattr(gate, "MAX_NEW_PATHS", 40)
    folder = "" if where == "." else where + "/"
    a = Attack(make_ws, tmp_path, f"""
os.makedirs("{folder or '.'}/sub", exist_ok=True)
for i in range(300):
    write("{folder}f%d.py" % i)
write("src/login.py")  # an allowed change alongside: it must not land either
""", files=("webapp/**",))
    a.assert_denied(where, scope=False)  # all of it where it may write: too many, not outside
    assert a.offending == [f"webapp/{where}: too-many ({'changed' if where == '.' else 'created'}, where the "
                           f"change passed 40 new paths) — {gate.ALWAYS_DENIED['too-many']}"]
    assert len(json.dumps(a.rec.as_json())) < 20_000  # not 300 paths listed anywhere in the record


def setid_files(top: Path) -> list[str]:
    """Every setuid or setgid file beneath `top` (a setgid folder is no privilege)."""
    found = []
    for folder, _dirs, files in os.walk(top):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(os.path.join(folder, name))
    return found


@needs_landlock
def test_setuid_and_setgid_modes_are_refused_by_the_kernel_or_denied_by_the_gate(make_ws, tmp_path):
    """Landlock has no right for chmod, and a specialist of a root supervisor is root: its own copy
    of a program, chmod 4755, is one any user runs as root. The seccomp filter refuses the mode
    everywhere, in folders the gate never reads too (the attempt folder is kept after the run);
    without it the gate denies such a mode in the working copy."""
    a = Attack(make_ws, tmp_path, '''
import shutil
attempt("setuid", lambda: os.chmod("src/login.py", 0o4755))
write("src/new.py", mode="w")
attempt("setgid", lambda: os.chmod("src/new.py", 0o2755))
kept = shutil.copy(sys.executable, os.path.join(os.environ["TMPDIR"], "python"))
attempt("setuid-attempt-folder", lambda: os.chmod(kept, 0o4755))
attempt("setuid-sandbox-writable", lambda: os.open(os.path.join(PROBE, "sh"), os.O_CREAT | os.O_WRONLY, 0o4755))
''', files=("webapp/src/**",))
    if GUARD:
        assert refusals(a.rec, a.log) == dict.fromkeys(
            ("setuid", "setgid", "setuid-attempt-folder", "setuid-sandbox-writable"), "refused EPERM"), a.log
        assert a.rec.status == "done", a.rec.report  # the new file, without the mode, lands
        assert setid_files(tmp_path) == []
    else:
        assert "setuid: DONE" in a.log and "setgid: DONE" in a.log
        a.assert_denied("src/login.py", "src/new.py")
        assert all("setuid" in line for line in a.offending)
    assert stat.S_IMODE(os.lstat(a.repo / "src" / "login.py").st_mode) & stat.S_ISUID == 0


@needs_guard
def test_a_specialist_cannot_lease_the_supervisors_files_and_still_runs_git(make_ws, tmp_path):
    """A read lease on a file of state/ made every write of the supervisor to it wait 45 s."""
    a = Attack(make_ws, tmp_path, '''
import fcntl, signal, subprocess
signal.signal(signal.SIGIO, signal.SIG_IGN)
for label, path in (("lease-reflog", "state/.git/logs/HEAD"), ("lease-record", "state/orders/atk/record.json"),
                    ("lease-config", "coordinator.yaml")):
    attempt(label, lambda: fcntl.fcntl(os.open(os.path.join(WS, path), os.O_RDONLY), fcntl.F_SETLEASE,
                                       fcntl.F_RDLCK))
status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
print("git-status: exit", status.returncode, status.stderr)
write("src/login.py")
''', files=("webapp/src/**",))
    assert refusals(a.rec, a.log) == dict.fromkeys(("lease-reflog", "lease-record", "lease-config"),
                                                   "refused EPERM"), a.log
    assert "git-status: exit 0" in a.log, a.log
    assert a.rec.status == "done", a.rec.report


@needs_landlock
def test_a_fifo_in_an_allowed_folder_is_denied_without_hanging_the_supervisor(make_ws, tmp_path):
    a = Attack(make_ws, tmp_path, '''
os.mkfifo("src/pipe.py")
attempt("socket", lambda: __import__("socket").socket(__import__("socket").AF_UNIX).bind("src/sock.py"))
''', files=("webapp/src/**",))
    a.assert_denied("src/pipe.py", "src/sock.py")
    assert any("special" in line and "fifo" in line for line in a.offending)
    # Where it may write: no write outside its permission, but a change none allows.
    summary = a.rec.report["summary"]
    assert "made a change no permission allows" in summary and "outside" not in summary, summary


@needs_landlock
def test_a_change_inside_writes_but_outside_files_is_denied(make_ws, tmp_path):
    # src/new/ does not exist yet, so the kernel grants src/; the gate holds the line at `files`.
    a = Attack(make_ws, tmp_path, '''
os.makedirs("src/new")
write("src/new/feature.py", mode="w")
write("src/login.py")
''', files=("webapp/src/new/feature.py",), writes=("webapp/src/**",))
    a.assert_denied("src/login.py")
    assert [line for line in a.offending if "src/login.py" in line][0].endswith("outside the order's files")
    assert not any("feature.py" in line for line in a.offending)  # the allowed part is not blamed


@needs_landlock
def test_a_change_inside_files_but_outside_writes_is_denied(make_ws, tmp_path):
    # Intake checks files against writes, so this arises when the team's config narrows `writes`
    # while the order waits in the queue: the order still names src/b.py, the agent may no longer write it.
    files = ("webapp/src/new/x.py", "webapp/src/b.py")
    code = 'os.makedirs("src/new")\nwrite("src/new/x.py", mode="w")\nwrite("src/b.py", mode="w")\n'
    wide = {"role": "specialist", "writes": ["webapp/src/**"], "command": attacker(code)}
    ws = make_ws({"chip": dict(wide)})
    drop(ws, "chip", "atk.md", order_md("Attack", files=files, id="atk"))
    with Supervisor(ws) as sup:  # intake only: the order is accepted and waits in the queue
        sup.step_commit()
        sup._intake_step()
        sup.step_commit()
    assert record(ws, "atk").status == "queued"
    main = git(ws.repos / "webapp", "rev-parse", "main")
    ws = make_ws({"chip": {**wide, "writes": ["webapp/src/new/**"]}})
    run(ws)
    rec = record(ws, "atk")
    assert rec.status == "denied", rec.report
    assert rec.report["offending"] == ["webapp/src/b.py: added (file) — outside the agent's writes"]
    assert git(ws.repos / "webapp", "rev-parse", "main") == main
    assert not (ws.repos / "webapp" / "src" / "b.py").exists() and rec.commit is None


# -- acceptance checks: run in the same sandbox, and nothing they write is kept -------------------


@needs_landlock
def test_what_a_check_writes_in_the_working_copy_is_discarded_never_committed(make_ws, tmp_path):
    # The check overwrites the specialist's file, adds one, and plants a fake git dir whose
    # config would run a command if the supervisor's git ever read it.
    evil = tmp_path / "evil-check.sh"
    evil.write_text(f'''set -e
echo "from the check" > src/greeting.py
echo sneaky > src/sneaky.py
echo sneaky > top-level.txt
rm .git && mkdir .git && printf 'ref: refs/heads/main\\n' > .git/HEAD
printf '[core]\\n\\tfsmonitor = touch {tmp_path}/probe/pwned\\n' > .git/config
''')
    acc = (f"`sh {evil}` passes", "The greeting exists", "Nothing else changed")
    a = Attack(make_ws, tmp_path, 'write("src/greeting.py", "def greet():\\n    return 1\\n", mode="w")\n',
               files=("webapp/**",), acceptance=acc)
    assert a.rec.status == "done", a.rec.report
    assert git(a.repo, "show", "main:src/greeting.py") == "def greet():\n    return 1"
    assert (a.repo / "src" / "greeting.py").read_text() == "def greet():\n    return 1\n"
    assert git(a.repo, "show", "--stat", "--format=", "main").split("|")[0].strip() == "src/greeting.py"
    assert not (a.repo / "src" / "sneaky.py").exists() and not (a.repo / "top-level.txt").exists()
    assert not (a.probe / "pwned").exists()


@needs_landlock
def test_a_check_writing_above_the_working_copy_is_refused_and_fails(make_ws, tmp_path):
    acc = ("`echo x > ../../something` passes", "The greeting exists", "Nothing else changed")
    b = Attack(make_ws, tmp_path, 'write("src/greeting.py", "x = 1\\n", mode="w")\n',
               files=("webapp/**",), acceptance=acc)
    assert b.rec.status == "blocked"
    assert "check `echo x > ../../something` failed" in b.rec.failures[0]
    assert OUTSIDE_TEXT in b.rec.failures[0]
    assert not (b.ws.runtime / "work" / "something").exists()
    b.assert_untouched()


# -- process trees: nothing of an attempt outlives it ---------------------------------------------

GRANDCHILD = '''
write("src/greeting.py", "v1\\n", mode="w")
os.mkfifo(os.path.join(PROBE, "go"))
# Detached (new session), outliving the specialist, it writes once the test lets it.
script = ('read x < "$PROBE/go"; '
          'echo late >> src/greeting.py; echo late >> "$PROBE/allowed.txt"')
env = {**os.environ, "PROBE": PROBE}
if HIDE:  # also drop the attempt's mark from its environment
    del env["COORD_ATTEMPT"]
pid = os.fork()
if pid == 0:
    os.setsid()
    os.execvpe("sh", ["sh", "-c", script], env)
# The specialist names it (the grandchild may be killed before it could say anything itself).
write(os.path.join(PROBE, "gc.pid"), f"{pid}\\n", mode="w")
print("specialist exits", flush=True)
os._exit(0)  # at once: the grandchild is never seen inside the specialist's tree
'''


def _release_grandchild(probe: Path) -> bool:
    """If the grandchild still lives, let it write and wait for it to end; True when it was alive."""
    deadline = time.monotonic() + 10.0
    while not (probe / "gc.pid").exists() or not (probe / "gc.pid").read_text().endswith("\n"):
        assert time.monotonic() < deadline, "the specialist never named its grandchild"
        time.sleep(0.01)  # another process writes it; there is no event to wait on
    pid = int((probe / "gc.pid").read_text())
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        try:
            fd = os.open(probe / "go", os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:  # ENXIO: nobody reads the fifo any more
            assert e.errno == errno.ENXIO
            return False
        os.write(fd, b"go\n")
        os.close(fd)
        select.select([pidfd], [], [], 10.0)  # its exit, or give up: the assertions say what happened
        return True
    finally:
        os.close(pidfd)


def _grandchild_attack(make_ws: Any, tmp_path: Path, *, hide: bool) -> None:
    alive: list[bool] = []
    a = Attack(make_ws, tmp_path, f"HIDE = {hide}\n" + GRANDCHILD, files=("webapp/src/**",),
               while_open=lambda a: alive.append(_release_grandchild(a.probe)))
    assert a.rec.status == "done", a.rec.report
    assert not (a.probe / "allowed.txt").exists()
    assert git(a.repo, "show", "main:src/greeting.py") == "v1"
    assert (a.repo / "src" / "greeting.py").read_text() == "v1\n"
    assert alive == [False], "a process of the attempt outlived the order"


@needs_landlock
def test_a_detached_grandchild_cannot_write_after_the_specialist_exits(make_ws, tmp_path):
    _grandchild_attack(make_ws, tmp_path, hide=False)


@needs_landlock
def test_a_detached_grandchild_that_hides_its_mark_cannot_write_after_the_order(make_ws, tmp_path):
    _grandchild_attack(make_ws, tmp_path, hide=True)


# -- several orders in one repository ---------------------------------------------------------------


PARALLEL = '''
import time
me = os.environ["COORD_ORDER_ID"]
other = "two" if me == "one" else "one"
attempts = os.path.dirname(os.path.dirname(os.path.dirname(os.environ["COORD_RESULT"])))
stamp = lambda what: write(os.path.join(PROBE, "times"), me + " " + what + " " + str(time.monotonic_ns()) + "\\n")
stamp("start")
while not os.path.isdir(os.path.join("..", "..", other, "webapp", "src")):
    time.sleep(0.01)  # the other order is running too: try to reach into its attempt
attempt("other-result", lambda: write(os.path.join(attempts, other, "1", "result.yaml"), "outcome: blocked\\n"))
attempt("other-outbox", lambda: write(os.path.join(attempts, other, "1", "outbox", "forged.md")))
attempt("other-copy", lambda: write(os.path.join("..", "..", other, "webapp", "src", me + ".py")))
time.sleep(0.5)
write("src/" + me + ".py", "done = True\\n", mode="w")
stamp("end")
'''


@needs_landlock
def test_two_orders_on_different_files_run_at_once_and_both_land(make_ws, tmp_path):
    probe = tmp_path / "probe"
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"], "max_parallel": 2,
                           "command": attacker(f"PROBE = {str(probe)!r}\n" + PARALLEL)}}, max_parallel=2)
    main = git(ws.repos / "webapp", "rev-parse", "main")
    for oid in ("one", "two"):
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} lands", files=(f"webapp/src/{oid}.py",), id=oid))
    run(ws)
    recs = Store(ws.state).load_all()
    for oid in ("one", "two"):
        assert recs[oid].status == "done", recs[oid].report
        # Neither could reach into the other's result, outbox or working copy.
        assert refusals(recs[oid]) == dict.fromkeys(("other-result", "other-outbox", "other-copy"),
                                                    OUTSIDE), recs[oid].report
        assert recs[oid].report["changed"] == [f"webapp/src/{oid}.py"] and not recs[oid].children
    times = {(o, what): int(t) for o, what, t in (line.split() for line in (probe / "times").read_text().splitlines())}
    assert times[("one", "start")] < times[("two", "end")] and times[("two", "start")] < times[("one", "end")]
    repo = ws.repos / "webapp"
    for oid in ("one", "two"):
        assert git(repo, "show", f"main:src/{oid}.py") == "done = True"
        assert (repo / "src" / f"{oid}.py").read_text() == "done = True\n"
        assert git(repo, "merge-base", "--is-ancestor", recs[oid].commit, "main") == ""
    assert git(repo, "merge-base", "--is-ancestor", main, "main") == ""
    assert git(repo, "status", "--porcelain") == ""


# -- the orchestrator: it routes, it never writes ---------------------------------------------------


ORCHESTRATOR_WRITES = '''
attempt("copy", lambda: write("src/login.py"))
attempt("new", lambda: write("src/new.py", mode="x"))
attempt("main", lambda: write(os.path.join(WS, "repos/webapp/src/login.py")))
attempt("state", lambda: write(os.path.join(WS, "state/orders/plan/record.json")))
'''


def _orchestrator_ws(make_ws: Any, tmp_path: Path, *, quiet: bool = False) -> Workspace:
    code = f"WS = {str(tmp_path / 'ws')!r}\n" + ORCHESTRATOR_WRITES
    if quiet:  # tries every write, says nothing about it
        code = code.replace("attempt(", "quietly(")
        code = "def quietly(label, fn):\n    try:\n        fn()\n    except OSError:\n        pass\n" + code
    return make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "command": attacker(code)},
                    "chip": {"role": "specialist", "writes": ["webapp/**"], "command": ["true"]}},
                   orchestrator="walt")


@needs_landlock
def test_the_orchestrator_cannot_write_the_files_it_routes(make_ws, tmp_path):
    ws = _orchestrator_ws(make_ws, tmp_path)
    repo = ws.repos / "webapp"
    main, checkout = git(repo, "rev-parse", "main"), Attack.files_of(repo)
    drop(ws, "walt", "plan.md", order_md("Plan the login work", files=("webapp/src/login.py",), id="plan"))
    run(ws)
    rec = record(ws, "plan")
    # Outside its throw-away copy the kernel refuses; inside it, the gate denies every change.
    refused = refusals(rec, (ws.runtime / "logs" / "plan" / "1" / "output.log").read_text())
    assert refused == {"copy": "DONE", "new": "DONE", "main": OUTSIDE, "state": OUTSIDE}, rec.report
    assert rec.status == "denied"
    assert {line.split(":")[0] for line in rec.report["offending"]} == {"webapp/src/login.py", "webapp/src/new.py"}
    assert rec.commit is None and git(repo, "rev-parse", "main") == main
    assert Attack.files_of(repo) == checkout
    assert "pwned" not in (ws.state / "orders" / "plan" / "record.json").read_text()


@needs_landlock
@pytest.mark.parametrize("quiet", [False, True])
def test_an_orchestrator_trying_to_write_is_recorded_as_artifact(make_ws, tmp_path, quiet):

    ws = _orchestrator_ws(make_ws, tmp_path, quiet=quiet)
    drop(ws, "walt", "plan.md", order_md("Plan the login work", files=("webapp/src/login.py",), id="plan"))
    run(ws)
    assert [s.kind for s in signals.load(ws.state) if s.agent == "walt"] == ["artifact"]
    assert record(ws, "plan").commit is None


# -- holes found while writing this battery: each test states the promise it checks ----------------


@pytest.mark.parametrize("where", ["workspace-parent", "state", "repo-checkout", "orchestrator-repo"])
def test_sandbox_writable_never_exposes_protected_paths(make_ws, tmp_path, where):
    """A grant over the workspace's config, state or repositories stops the team from loading,
    with the key, the grant and what it would expose: no order runs under it."""
    from coordinator.errors import ConfigError

    root = tmp_path / "ws"
    exposed = {"workspace-parent": tmp_path, "state": root / "state", "repo-checkout": root / "repos" / "webapp",
               "orchestrator-repo": root / "repos"}[where]
    agent = {"command": ["true"], "sandbox": {"writable": [str(exposed), str(tmp_path / "probe")]}}
    chip = {"role": "specialist", "writes": ["webapp/**"], "command": ["true"]}
    if where == "orchestrator-repo":
        who, agents = "walt", {"walt": {"role": "orchestrator", "sends_to": ["chip"], **agent}, "chip": chip}
    else:
        who, agents = "chip", {"chip": {**chip, **agent}}
    with pytest.raises(ConfigError, match=rf"agents\.{who}\.sandbox\.writable\.0: {re.escape(str(exposed))} "
                                          r"would make /\S+ writable; grant a narrower folder"):
        make_ws(agents)


@pytest.mark.parametrize("where", ["path-before-git", "git-config", "python-imports", "path-after-git"])
def test_sandbox_writable_never_covers_what_the_supervisor_runs(make_ws, tmp_path, monkeypatch, where):
    """A grant such as ~/.local or ~/.cargo (where Claude Code or cargo keep their files) also
    holds ~/.local/bin or ~/.cargo/bin: a `git` the agent put there ran as the supervisor, as
    did a filter named in ~/.config/git/config or a module where its Python imports from. Such a
    grant stops the team from loading; a folder on PATH after git's is never where git is run from."""
    from coordinator.errors import ConfigError

    grant = tmp_path / "tools"
    inner = {"path-before-git": grant / "bin", "git-config": grant / "git", "python-imports": grant / "lib",
             "path-after-git": grant / "bin"}[where]
    inner.mkdir(parents=True)
    (tmp_path / "probe").mkdir()
    if where == "path-before-git":
        monkeypatch.setenv("PATH", f"{inner}{os.pathsep}{os.environ['PATH']}")
    elif where == "path-after-git":
        monkeypatch.setenv("PATH", f"{os.environ['PATH']}{os.pathsep}{inner}")
    elif where == "git-config":
        monkeypatch.setenv("XDG_CONFIG_HOME", str(grant))
    else:
        monkeypatch.syspath_prepend(str(inner))
    chip = {"role": "specialist", "writes": ["webapp/**"], "command": ["true"],
            "sandbox": {"writable": [str(tmp_path / "probe"), str(grant)]}}
    if where == "path-after-git":
        make_ws({"chip": chip})
        return
    with pytest.raises(ConfigError, match=rf"agents\.chip\.sandbox\.writable\.1: {re.escape(str(grant))} would make "
                                          rf"{re.escape(str(inner))} writable, .*: what the agent put there would run "
                                          r"as the supervisor, outside any sandbox; grant a narrower folder"):
        make_ws({"chip": chip})


def test_a_package_planted_where_the_supervisor_was_started_never_runs(make_ws, tmp_path, monkeypatch):
    """A `coordinator/` an agent left in a folder its grant covers (/tmp, say) was imported by the
    fork server, unsandboxed, at the next start from that folder: it ran in place of the real one."""
    started_in = tmp_path / "probe"
    planted = started_in / "coordinator"
    planted.mkdir(parents=True)
    proof = tmp_path / "proof"
    (planted / "__init__.py").write_text(f"open({str(proof)!r}, 'w').write('ran as the fork server')\n")
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/**"], "command": ["true"],
                           "sandbox": {"writable": [str(started_in)]}}})
    monkeypatch.chdir(started_in)
    drop(ws, "chip", "a.md", order_md("Run from a folder the agent may write", id="a"))
    run(ws)
    assert not proof.exists()
    assert record(ws, "a").status == "done"


# The agent makes its attempt folder (kept for a person to read: a report names its outbox) a
# repository with a core.fsmonitor, which git runs at `git status` anywhere in it; also one
# shaped so at its top, one deeper down, and a `.GIT`.
PLANT = """
A = os.path.dirname(os.environ["COORD_RESULT"])
def repo(folder, name="config"):
    os.makedirs(os.path.join(folder, "objects"), exist_ok=True)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    write(os.path.join(folder, "HEAD"), "ref: refs/heads/main\\n", mode="w")
    write(os.path.join(folder, name), "[core]\\n\\tfsmonitor = " + os.path.join(PROBE, "fsmonitor") + "\\n", mode="w")
repo(os.path.join(A, ".git"))
repo(A)
repo(os.path.join(A, "tmp", "deep", "x"))
repo(os.path.join(A, "outbox", ".GIT"))
os.makedirs(os.path.join(A, "outbox", "nobody"))
write(os.path.join(A, "outbox", "nobody", "note.md"), "objective: kept for the sender\\n", mode="w")
if not os.path.exists(os.path.join(PROBE, "restarted")):
    write(os.path.join(PROBE, "planted"), mode="w")
    if ENDING == "crash":
        __import__("time").sleep(60)
    sys.exit(3 if ENDING == "failed" else 0)
"""


@needs_landlock
@pytest.mark.parametrize("ending", ["done", "failed", "crash"])
def test_an_attempt_folder_kept_to_read_runs_nothing_of_the_agents_when_git_is_run_there(make_ws, tmp_path, ending):
    probe = tmp_path / "probe"
    ws = make_ws({"chip": {**WIDE, "command": attacker(f"ENDING = {ending!r}\nPROBE = {str(probe)!r}\n" + PLANT),
                           "max_failures": 1 if ending == "failed" else 2}})
    ran = probe / "ran"
    hook = probe / "fsmonitor"
    hook.write_text(f"#!/bin/sh\ntouch {ran}\n")
    hook.chmod(0o755)
    drop(ws, "chip", "atk.md", order_md("Plant", files=("webapp/src/**",), id="atk"))
    if ending == "crash":
        class Crash(Exception):
            pass

        with pytest.raises(Crash), Supervisor(ws) as sup:  # left as a crash leaves it
            step_until(sup, lambda: (probe / "planted").exists(), "the repositories to be planted")
            raise Crash
        (probe / "restarted").touch()
    run(ws)
    assert record(ws, "atk").status == {"done": "done", "failed": "blocked", "crash": "done"}[ending]
    attempt = ws.runtime / "attempts" / "atk" / "1"
    assert (attempt / "outbox" / "nobody" / "note.md").exists()  # what the sender is told is kept, is
    for where in (attempt, attempt / "outbox" / "nobody", attempt / "tmp" / "deep"):
        subprocess.run(["git", "status"], cwd=where, capture_output=True, check=False)
    assert not ran.exists(), "a person's git ran the agent's program"
    assert not (attempt / ".git").exists() and not (attempt / "outbox" / ".GIT").exists()


def _defused_as_a_user(top: Path, locked: str, mode: int) -> str:
    """Plant a repository with a core.fsmonitor at tmp/x of an attempt folder under `top`, lock
    `locked` (a path under it) with `mode`, take what git would run out of it (`runner.defuse`),
    then run `git status` in tmp/x as a person would: what happened, as the supervisor's user
    (not root, whose reads and writes no mode stops; as root, nobody is taken on)."""
    from coordinator import runner

    def plant_defuse_look() -> str:
        attempt = top / "attempt"
        inner = attempt / "tmp" / "x"
        for sub in ("objects", "refs"):
            (inner / ".git" / sub).mkdir(parents=True)
        (inner / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (inner / ".git" / "config").write_text(f"[core]\n\tfsmonitor = touch {top / 'ran'}\n")
        os.chmod(attempt / locked, mode)
        try:
            runner.defuse(attempt)
        except OSError as e:
            return f"defuse failed: {e}"
        subprocess.run(["git", "status"], cwd=inner, capture_output=True, check=False)
        return "the agent's program ran" if (top / "ran").exists() else "nothing ran"

    if os.geteuid() != 0:
        return plant_defuse_look()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it never returns
        said = "child failed"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            said = plant_defuse_look()
        finally:
            os.write(write, said.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    return said


@pytest.mark.parametrize(("locked", "mode"), [("tmp/x", 0o100), (".", 0o100), ("tmp/x", 0o500)])
def test_a_folder_the_agent_locked_in_its_attempt_folder_keeps_no_git_of_its_own(locked, mode):
    """A folder made enterable but not listable (0o100), or not writable (0o500), kept the
    `.git` in it for a supervisor that is not root: a person's `git status` there ran it."""
    import tempfile

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as top:  # pytest's are closed to other users
        Path(top).chmod(0o777)
        said = _defused_as_a_user(Path(top), locked, mode)
    assert said == "nothing ran"


@needs_landlock
def test_a_symlink_planted_where_a_check_log_goes_is_not_followed(make_ws, tmp_path):
    root = tmp_path / "ws"
    code = f'''
folder = os.path.dirname(os.environ["COORD_RESULT"])
os.symlink({str(root / "coordinator.yaml")!r}, os.path.join(folder, "check-0.log"))
os.symlink(os.path.join(OUTSIDE, "target.txt"), os.path.join(folder, "check-1.log"))
'''
    acc = ("`echo overwritten` passes", "`echo overwritten` passes", "Nothing else changed")
    a = Attack(make_ws, tmp_path, code, files=("webapp/src/**",), acceptance=acc)
    a.assert_untouched()


@needs_landlock
def test_an_outbox_replaced_by_a_symlink_moves_nothing_from_elsewhere(make_ws, tmp_path):
    (tmp_path / "outside" / "chip").mkdir(parents=True)
    (tmp_path / "outside" / "chip" / "notes.md").write_text("someone else's notes\n")
    a = Attack(make_ws, tmp_path, '''
box = os.environ["COORD_OUTBOX"]
os.rmdir(box)
os.symlink(OUTSIDE, box)
''', files=("webapp/src/**",))
    assert (tmp_path / "outside" / "chip" / "notes.md").exists()
    a.assert_untouched()


@needs_landlock
@pytest.mark.parametrize("name", ["result.yaml", "output.log"])
def test_a_fifo_in_the_attempt_folder_does_not_hang_the_supervisor(make_ws, tmp_path, name):
    import threading

    code = f'''
path = os.path.join(os.path.dirname(os.environ["COORD_RESULT"]), {name!r})
if os.path.exists(path):
    os.unlink(path)  # the log: the spawn server keeps writing to the old file
os.mkfifo(path)
'''
    result: list[Attack] = []
    crashed: list[BaseException] = []

    def supervise() -> None:
        try:
            result.append(Attack(make_ws, tmp_path, code, files=("webapp/src/**",)))
        except BaseException as e:  # the supervisor crashing is as bad as hanging: say which
            crashed.append(e)

    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    fifo = tmp_path / "ws" / ".coordinator" / "attempts" / "atk" / "1" / name
    hung = False
    deadline = time.monotonic() + 60.0
    # Either the run ends, or somebody (only the supervisor can) sits blocked opening the fifo:
    # then feed it, as often as it asks, so the test can end.
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.05)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # not there yet, not a fifo, or nobody reading it
            continue
        hung = True
        with contextlib.suppress(OSError):
            os.write(fd, b"outcome: done\nsummary: unblocked by the test\n")
        os.close(fd)
    assert not hung, f"the supervisor blocked opening a fifo the specialist left as {name}"
    assert not crashed, f"the supervisor crashed on a fifo the specialist left as {name}: {crashed[0]!r}"
    assert result and result[0].rec.status in ("done", "blocked")


# -- what would stop or stall the supervisor: trees thousands deep, a huge sparse file -----------

# `mkdir a; cd a` 1,500 times (Python 3.11's os.walk and shutil.rmtree die of RecursionError at
# about 1,000), a file at the bottom.
NEST = """
def nest(folder, depth=1500):
    here = os.getcwd()
    os.chdir(folder)
    for _ in range(depth):
        os.mkdir("a")
        os.chdir("a")
    write("bottom.md", "to: chip\\n", mode="w")
    os.chdir(here)
"""
DEEP = "/".join(["src"] + ["a"] * (gate.MAX_DEPTH - 1))  # as deep as the gate walks in src/


def status(sup: Supervisor, order_id: str) -> str | None:
    rec = sup.records.get(order_id)
    return rec.status if rec is not None else None


@needs_landlock
def test_folders_nested_thousands_deep_are_denied_and_the_supervisor_goes_on(make_ws, deep_ok):
    code = NEST + 'if os.environ["COORD_ORDER_ID"] == "deep":\n    nest("src")\n' \
                  'else:\n    write("src/" + os.environ["COORD_ORDER_ID"] + ".py", mode="w")\n'
    ws = make_ws({"chip": {**WIDE, "command": attacker(code)}})
    drop(ws, "chip", "deep.md", order_md("Deep", files=("webapp/src/**",), id="deep"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: status(sup, "deep") == "denied", "the deep tree to be denied")
        drop(ws, "chip", "next.md", order_md("Next", files=("webapp/src/**",), id="next"))
        step_until(sup, lambda: status(sup, "next") == "done", "the next order to land")
    rec = record(ws, "deep")
    assert rec.report["offending"] == [
        f"webapp/{DEEP}: too-deep (created, holds more than {gate.MAX_DEPTH} levels down) — "
        + gate.ALWAYS_DENIED["too-deep"]]
    assert rec.commit is None
    with Supervisor(ws) as sup:  # a restart beside the kept deep copy
        drop(ws, "chip", "after.md", order_md("After", files=("webapp/src/**",), id="after"))
        step_until(sup, lambda: status(sup, "after") == "done", "an order after the restart to land")
    assert git(ws.repos / "webapp", "show", "--name-only", "--format=", "main~1") == "src/next.py"


@needs_landlock
def test_a_restart_after_a_crash_beside_a_deep_tree_removes_it_and_starts(make_ws, deep_ok):
    """The supervisor dies while the specialist sits beside its tree: recovery removes the
    working copy (with the tree in it) and the order runs again."""
    code = NEST + """
nest("src")
probe = os.environ["PROBE"]
if not os.path.exists(os.path.join(probe, "restarted")):
    write(os.path.join(probe, "made"), mode="w")
    __import__("time").sleep(60)
"""
    ws = make_ws({"chip": {**WIDE, "command": attacker(code), "max_failures": 2}})
    probe = deep_ok / "probe"
    drop(ws, "chip", "deep.md", order_md("Deep", files=("webapp/src/**",), id="deep"))

    class Crash(Exception):
        pass

    with pytest.raises(Crash), Supervisor(ws) as sup:  # left as a crash leaves it: not clean
        step_until(sup, lambda: (probe / "made").exists(), "the tree to be made")
        raise Crash
    assert record(ws, "deep").status == "running"
    (probe / "restarted").touch()
    with Supervisor(ws) as sup:
        step_until(sup, lambda: status(sup, "deep") == "denied", "the second attempt to be denied")
    rec = record(ws, "deep")
    assert rec.attempts == 2 and "interrupted" in rec.failures[0], rec.failures


@needs_landlock
@pytest.mark.parametrize("where", ["outbox", "scratch"])
def test_folders_nested_thousands_deep_in_the_outbox_or_scratch_end_the_order(make_ws, deep_ok, where):
    folder = 'os.environ["COORD_OUTBOX"]' if where == "outbox" else '"."'
    a = Attack(make_ws, deep_ok, NEST + f"nest({folder})\n", files=())  # no files: it runs in scratch/
    assert a.rec.status == "done", a.rec.report
    attempt = a.ws.runtime / "attempts" / "atk" / "1"
    if where == "outbox":  # the sender learns what was not read
        assert [line for line in a.rec.report["undelivered"] if f"over {gate.MAX_DEPTH} folders deep" in line]
        assert (attempt / "outbox" / "a").is_dir()  # left for the sender to look at
    else:
        assert not (attempt / "scratch").exists()
    a.assert_untouched()


@needs_landlock
def test_a_huge_sparse_file_is_denied_quickly_with_its_size(make_ws, tmp_path):
    start = time.monotonic()
    # 2 GiB of nothing, no disk used: 2 s to hash, and git would then read and compress it all.
    a = Attack(make_ws, tmp_path, 'with open("src/big.bin", "wb") as f:\n    f.truncate(2 << 30)\n',
               files=("webapp/src/**",))
    elapsed = time.monotonic() - start
    a.assert_denied("src/big.bin", scope=False)
    assert a.offending == ["webapp/src/big.bin: too-large (created, 2147483648 bytes = 2.0 GiB) — "
                           + gate.ALWAYS_DENIED["too-large"]]
    assert elapsed < 15.0


# A root specialist trying to take the read-only layer off: clear the flag on every mount, make a
# writable copy of one (both need CAP_SYS_ADMIN, which it must not have), or fchmod the /dev/null
# it was given as stdin (which must be on its read-only mounts, not the machine's).
UNDO_READONLY = '''
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
class MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns")]
def sys(*args):
    if libc.syscall(*args) < 0:
        raise OSError(ctypes.get_errno(), "syscall")
attempt("undo-remount-rw", lambda: sys(442, -100, b"/", 0x8000, ctypes.byref(MountAttr(0, 1, 0, 0)), 32))
attempt("undo-clone", lambda: sys(428, -100, WS.encode(), 1 | 0x8000))
attempt("undo-stdin", lambda: os.fchmod(0, 0o600))
'''


def metadata(path: Path) -> tuple[int, int, int, int, list[str]]:
    """What chmod, chown, utime and setxattr change: mode, owner, group, mtime, attribute names."""
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, sorted(os.listxattr(path, follow_symlinks=False))


@needs_landlock
@needs_readonly
def test_metadata_of_protected_paths_cannot_be_changed(make_ws, tmp_path):
    """Landlock has no right for chmod/chown/utime/setxattr: the read-only mounts refuse them."""
    root = tmp_path / "ws"
    targets = [root / "coordinator.yaml", root / "state" / ".git" / "HEAD", root / "repos" / "webapp" / "Makefile",
               tmp_path / "outside" / "target.txt"]
    code = UNDO_READONLY + f"for t in {[str(t) for t in targets]!r}:\n" + '''
    attempt("chmod " + t, lambda: os.chmod(t, 0o4777))
    attempt("chown " + t, lambda: os.chown(t, 4321, 4321))
    attempt("utime " + t, lambda: os.utime(t, (0, 0)))
    attempt("setxattr " + t, lambda: os.setxattr(t, "user.planted", b"1"))
allowed = "src/login.py"
os.chmod(allowed, 0o755)  # inside the order's files: allowed, and judged by the gate
print("CHMOD-INSIDE-OK")
'''
    seen: dict[Path, Any] = {}
    a = Attack(make_ws, tmp_path, code, files=("webapp/src/**",),
               before=lambda a: seen.update({t: metadata(t) for t in targets}))
    assert {t: metadata(t) for t in targets} == seen, a.log
    assert "CHMOD-INSIDE-OK" in a.log
    assert {k: v for k, v in refusals(a.rec, a.log).items() if k.startswith("undo")} == {
        "undo-remount-rw": "refused EPERM", "undo-clone": "refused EPERM", "undo-stdin": "refused EROFS"}, a.log


@needs_landlock
def test_writing_outside_then_failing_is_still_denied(make_ws, tmp_path):
    a = Attack(make_ws, tmp_path, 'os.mkfifo("src/pipe.py")\nsys.exit(3)\n', files=("webapp/src/**",))
    a.assert_denied("src/pipe.py")


@needs_landlock
def test_a_specialist_cannot_signal_or_reach_into_the_supervisor(make_ws, tmp_path):
    a = Attack(make_ws, tmp_path, '''
import signal
who = {"server": os.getppid(), "supervisor": int(open(os.path.join(WS, ".coordinator", "supervisor.pid")).read())}
attempt("kill-server", lambda: os.kill(who["server"], signal.SIGKILL))
attempt("kill-supervisor", lambda: os.kill(who["supervisor"], signal.SIGTERM))
for name, pid in who.items():
    # Their open files (logs of other attempts, state/ files, sockets), and their memory.
    for fd in os.listdir("/proc/%d/fd" % pid):
        attempt("fd-%s-%s" % (name, fd), lambda: os.open("/proc/%d/fd/%s" % (pid, fd), os.O_WRONLY | os.O_APPEND))
    attempt("mem-" + name, lambda: os.open("/proc/%d/mem" % pid, os.O_RDWR))
''', files=("webapp/src/**",))
    seen = refusals(a.rec, a.log)
    assert seen["kill-server"] == "refused EPERM" and seen["kill-supervisor"] == "refused EPERM", a.log
    assert len([k for k in seen if k.startswith("fd-supervisor-")]) > 3 and "mem-server" in seen, a.log
    assert {k: v for k, v in seen.items() if v not in DENIED} == {}, a.log
    assert a.rec.status == "done"
    a.assert_untouched()


@pytest.mark.parametrize("swap", ["content", "link", "repository", "gone"])
def test_what_changes_after_the_gate_judged_it_is_never_committed(make_ws, tmp_path, monkeypatch, swap):
    """A process that outlived its attempt writes between the gate's verdict and the commit:
    git would stage what is there then. What git staged is compared with what the gate
    judged, and a difference commits nothing."""
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"], "max_failures": 1,
                           "command": attacker("write('src/greeting.py', 'GREETING = 1\\n', 'w')\n")}})
    judge = gate.judge

    def judge_then_tamper(changes, **kw):  # type: ignore[no-untyped-def]
        verdict = judge(changes, **kw)
        target = ws.root / ".coordinator" / "work" / "swap" / "webapp" / "src" / "greeting.py"
        target.unlink()
        if swap == "link":
            target.symlink_to("/etc/passwd")
        elif swap == "repository":  # git would record a submodule pointer
            target.mkdir()
            subprocess.run(["git", "init", "-q", str(target)], check=True)
        elif swap == "content":
            target.write_text("import os; os.system('curl evil')\n")
        return verdict

    monkeypatch.setattr(gate, "judge", judge_then_tamper)
    repo = ws.repos / "webapp"
    main_before = git(repo, "rev-parse", "main")
    drop(ws, "chip", "s.md", order_md("The greeting is one", id="swap", files=("webapp/src/greeting.py",)))
    run(ws)
    rec = record(ws, "swap")
    assert rec.status == "blocked", rec.failures
    assert "src/greeting.py changed after the permission gate judged it; nothing was committed" in rec.failures[0]
    assert rec.commit is None and git(repo, "rev-parse", "main") == main_before
    assert "curl evil" not in git(repo, "log", "-p", "--all") and "passwd" not in git(repo, "log", "-p", "--all")


def test_what_the_gate_judged_is_committed_byte_for_byte(make_ws):
    """The check that git staged what the gate judged has no false alarm for CRLF text, binary
    bytes, an executable file or a link inside the copy."""
    body = '''
with open("src/crlf.txt", "wb") as f: f.write(b"a\\r\\nb\\r\\n")
with open("src/bin.dat", "wb") as f: f.write(bytes(range(256)) * 3)
with open("src/run.sh", "w") as f: f.write("#!/bin/sh\\necho hi\\n")
os.chmod("src/run.sh", 0o755)
os.symlink("greeting.py", "src/alias.py")
'''
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"], "command": attacker(body)}})
    drop(ws, "chip", "k.md", order_md("Four files land", id="keep", files=("webapp/src/**",)))
    run(ws)
    rec = record(ws, "keep")
    assert rec.status == "done", (rec.failures, rec.report)
    repo = ws.repos / "webapp"
    listed = git(repo, "ls-tree", "-r", "main", "--", "src/crlf.txt", "src/bin.dat", "src/run.sh", "src/alias.py")
    assert sorted(line.split()[0] for line in listed.splitlines()) == ["100644", "100644", "100755", "120000"]
    crlf = subprocess.run(["git", "-C", str(repo), "show", "main:src/crlf.txt"], capture_output=True, check=True)
    assert crlf.stdout == b"a\r\nb\r\n"


def test_git_converting_line_endings_on_staging_is_no_change_after_the_gate(make_ws):
    """`* text=auto` (and filters like it) make git stage other bytes than the file holds:
    the check that nothing changed after the gate looks at the file, so this lands."""
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"], "command": attacker(
        'with open("src/crlf.txt", "wb") as f: f.write(b"one\\r\\ntwo\\r\\n")\n')}})
    repo = ws.repos / "webapp"
    (repo / ".gitattributes").write_text("* text=auto\n")
    git(repo, "add", ".gitattributes")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "text=auto")
    drop(ws, "chip", "c.md", order_md("Text lands", id="crlf", files=("webapp/src/**",)))
    run(ws)
    rec = record(ws, "crlf")
    assert rec.status == "done", (rec.failures, rec.report)
    staged = subprocess.run(["git", "-C", str(repo), "show", "main:src/crlf.txt"], capture_output=True, check=True)
    assert staged.stdout == b"one\ntwo\n"  # as git normalizes it


@needs_landlock
def test_a_denied_path_that_is_not_utf8_or_holds_a_newline_is_reported_on_one_line(make_ws, tmp_path):
    # The name is the specialist's to choose: not UTF-8, it stopped the supervisor with an
    # internal error (the signal's line could not be encoded); with a newline it forged lines
    # of the report.
    a = Attack(make_ws, tmp_path, '''
os.mkfifo(b"src/bad\\xff.py")
os.mkfifo("src/a\\nWO-0007 chip: running -> done")
''', files=("webapp/src/**",))
    assert a.rec.status == "denied", a.rec.report
    assert sorted(a.offending) == [
        "webapp/src/a\\x0aWO-0007 chip: running -> done: special (created, fifo) — " + gate.ALWAYS_DENIED["special"],
        "webapp/src/bad\\xff.py: special (created, fifo) — " + gate.ALWAYS_DENIED["special"]]
    a.assert_untouched()
    assert [s.kind for s in signals.load(a.ws.state)] == ["scope"]


@pytest.mark.parametrize("value", [None, "explicit", "all"])
def test_doctor_says_whether_the_users_git_takes_a_planted_repository_for_one(tmp_path, monkeypatch, value):
    # The gate keeps such folders out of changes; the user's own git is the other half.
    from coordinator import doctor
    config = tmp_path / "gitconfig"
    config.write_text(f"[safe]\n\tbareRepository = {value}\n" if value else "")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_SYSTEM", str(tmp_path / "none"))  # and not the machine's
    [shown] = [line for line in doctor.report(None) if line.strip().startswith("safe.bareRepository:")]
    if value == "explicit":
        assert shown.strip().startswith("safe.bareRepository: explicit")
        assert "runs its config" not in shown
    else:
        assert shown.strip().startswith(f"safe.bareRepository: {value or 'not set'} — your git takes any folder")
        assert "`git config --global safe.bareRepository explicit`" in shown


@needs_landlock
@pytest.mark.parametrize("how, lands", [
    ("sed -i 's/def /def  /' src/login.py", True),  # a temp file beside it, renamed over it
    ("printf 'x = 1\\n' > src/.login.py.new && mv src/.login.py.new src/login.py", True),  # an atomic save
    ("rm src/login.py", True),
    ("printf 'x = 1\\n' >> src/login.py && printf 'y = 2\\n' > src/other.py", False),  # a sibling: the gate's
])
def test_an_order_naming_one_file_may_replace_or_remove_it_and_nothing_beside_it(make_ws, how, lands):
    # Granted alone, the file could be written in place but neither replaced nor removed: the
    # order could not be carried out with `sed -i`, an editor's atomic save or `rm`.
    ws = make_ws({"chip": {"role": "specialist", "command": ["sh", "-c", how], "writes": ["webapp/src/**"],
                           "max_failures": 1}})
    repo = ws.repos / "webapp"
    main = git(repo, "rev-parse", "main")
    drop(ws, "chip", "one.md", order_md("login.py changes", id="one", files=("webapp/src/login.py",)))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    rec = record(ws, "one")
    if lands:
        assert rec.status == "done", rec.report
        assert git(repo, "diff", "--name-only", main, "main").split() == ["src/login.py"]
    else:
        assert rec.status == "denied" and rec.report["offending"][0].startswith("webapp/src/other.py: ")
        assert git(repo, "rev-parse", "main") == main


@needs_landlock
def test_an_order_naming_a_file_too_long_for_any_file_system_is_refused_and_the_supervisor_goes_on(make_ws):
    # A name over 255 bytes, as an agent's outbox may send one: the supervisor stopped with an
    # internal error ("File name too long") at its grant, and again at every start. No file
    # system holds such a file: the order is refused when taken in, with the reason.
    long_name = "webapp/src/" + "a" * 300 + ".py"
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"],
                           "command": ["/bin/sh", "-c", "echo hi >> src/login.py; echo tried"]}})
    drop(ws, "chip", "long.md", order_md("Name a long file", files=(long_name, "webapp/src/login.py"), id="WO-1"))
    drop(ws, "chip", "next.md", order_md("Edit login", files=("webapp/src/login.py",), id="WO-2"))
    run(ws)
    refused = record(ws, "WO-1")
    assert refused.status == "rejected" and "a file name is at most 255" in refused.errors[0]
    assert record(ws, "WO-2").status == "done"
    assert git(ws.repos / "webapp", "show", "HEAD:src/login.py").endswith("hi")


# The first order leaves a link that stays inside through the folder a/b/c; the second makes
# a/b/c a link that itself stays inside, and with it the first link leads out of the repository.
REPOINT = '''
if [ ! -L src/l ]; then
  mkdir -p src/a/b/c && echo x > src/a/b/keep.py && ln -s a/b/c/../../../.. src/l
else
  ln -s ../../.. src/a/b/c
fi
'''


@needs_landlock
def test_a_link_made_to_lead_out_by_a_later_change_never_lands(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"], "command": ["/bin/sh", "-c", REPOINT]}})
    checkout = ws.repos / "webapp"
    drop(ws, "chip", "one.md", order_md("Add the link", files=("webapp/src/**",), id="WO-1"))
    run(ws)
    assert record(ws, "WO-1").status == "done"
    assert os.path.realpath(checkout / "src" / "l") == str(checkout.resolve())  # inside, as judged
    head = git(checkout, "rev-parse", "HEAD")
    drop(ws, "chip", "two.md", order_md("Re-point the folder", files=("webapp/src/**",), id="WO-2"))
    run(ws)
    rec = record(ws, "WO-2")
    assert rec.status == "denied"
    assert any(line.startswith("webapp/src/l: symlink") for line in rec.report["offending"])
    assert git(checkout, "rev-parse", "HEAD") == head
    assert not (checkout / "src" / "a" / "b" / "c").is_symlink()
    assert os.path.realpath(checkout / "src" / "l") == str(checkout.resolve())


@needs_landlock
def test_a_folder_an_order_replaces_by_a_link_lands(make_ws):
    # The folder's files are gone from the copy, though the link leads where files of those
    # names are: the commit refused them as "beyond a symbolic link", or as changed after the
    # gate, and the order was blocked after its retries.
    script = ('if [ -d src/vendor ] && [ ! -L src/vendor ]; then rm -r src/vendor && ln -s . src/vendor; '
              'else mkdir -p src/vendor && echo x > src/vendor/login.py; fi')
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"], "command": ["/bin/sh", "-c", script]}})
    checkout = ws.repos / "webapp"
    drop(ws, "chip", "one.md", order_md("Vendor the module", files=("webapp/src/**",), id="WO-1"))
    run(ws)
    assert record(ws, "WO-1").status == "done" and (checkout / "src" / "vendor" / "login.py").is_file()
    drop(ws, "chip", "two.md", order_md("Use our own module", files=("webapp/src/**",), id="WO-2"))
    run(ws)
    rec = record(ws, "WO-2")
    assert rec.status == "done", rec.report
    assert rec.report["changed"] == ["webapp/src/vendor", "webapp/src/vendor/login.py"]
    assert os.readlink(checkout / "src" / "vendor") == "."
    assert git(checkout, "status", "--porcelain") == ""


@needs_landlock
@pytest.mark.parametrize("entry", ["", "."], ids=["empty", "dot"])
def test_a_git_in_the_working_copy_never_runs_as_the_supervisor(make_ws, tmp_path, monkeypatch, entry):
    # With an empty or `.` entry first on the supervisor's PATH, git run in a working copy was
    # looked up there: the agent's `./git` ran as the supervisor, outside any sandbox.
    marker = tmp_path / "ran-as-supervisor"
    fake = f"#!/bin/sh\necho pwned > {marker}\nexec {shutil.which('git')} \"$@\"\n"
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/**"],
                           "command": ["/bin/sh", "-c", f"printf '%s' '{fake}' > git && chmod +x git"]}})
    monkeypatch.setenv("PATH", f"{entry}{os.pathsep}{os.environ['PATH']}")
    drop(ws, "chip", "git.md", order_md("Add a git wrapper", files=("webapp/**",), id="WO-1"))
    run(ws)
    assert record(ws, "WO-1").status == "done"
    assert "echo pwned" in (ws.repos / "webapp" / "git").read_text()  # the change landed, never run
    assert not marker.exists()


@needs_landlock
def test_a_denial_for_size_says_so_not_that_the_agent_wrote_outside_its_permission(make_ws, tmp_path):
    # A 200 MB file where the agent may write was reported as "chip wrote outside its
    # permission": it did not. The summary says what it was; with a path outside too, both.
    a = Attack(make_ws, tmp_path, 'with open("src/big.bin", "wb") as f:\n    f.truncate(200 << 20)\n',
               files=("webapp/src/**",))
    a.assert_denied("src/big.bin", scope=False)  # where it may write: no `scope` signal
    assert a.rec.report["summary"] == "chip wrote a file too large to commit; every change was discarded"
    # ... and so does the brief of a fresh orchestrator that had sent it.
    brief = fresh_brief({a.rec.id: a.rec}, 2, orchestrator=a.rec.sender, now=datetime.now(UTC))
    assert "why: wrote a file too large to commit: webapp/src/big.bin" in brief
    assert "outside its permission" not in brief
    from coordinator.endings import _denied_for
    big, outside = gate.Change("src/big.bin", "too-large"), gate.Change("README.md", "added")
    mine = ("webapp/src/**",), ("webapp/**",)  # the order's files, the agent's writes
    assert _denied_for(gate.Verdict((big,), ((big, ""), (outside, ""))), "webapp", *mine) == (
        "wrote outside its permission and wrote a file too large to commit")
    many = gate.Change("src", "too-many", kind="dir")
    assert _denied_for(gate.Verdict((many,), ((many, ""),)), "webapp", *mine) == (
        "added more files and folders than one change may")
    setuid = gate.Change("src/tool", "setuid")  # where it may write, but never allowed
    assert _denied_for(gate.Verdict((setuid,), ((setuid, ""), (big, ""))), "webapp", *mine) == (
        "made a change no permission allows and wrote a file too large to commit")


def test_a_file_too_large_outside_its_files_is_still_a_scope_signal(make_ws, tmp_path):
    # Too large is no write outside its files where it may write (above); outside them it is.
    a = Attack(make_ws, tmp_path, 'with open("src/big.bin", "wb") as f:\n    f.truncate(200 << 20)\n',
               files=("webapp/src/login.py",))
    a.assert_denied("src/big.bin", scope=True)
    [signal] = signals.load(a.ws.state)
    assert signal.evidence.startswith("webapp/src/big.bin: too-large")


@contextlib.contextmanager
def reading_as_a_user() -> Any:
    """A root supervisor reads every file whatever its mode; this one, like any other user's,
    cannot read a file of mode 000: the calling thread's effective capabilities lose
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (the threads and processes it starts inherit that),
    and get them back after."""
    if os.geteuid() != 0:
        yield
        return
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("cannot read this process's capabilities")
    saved = data[0].effective
    data[0].effective &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("cannot drop this process's capabilities")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(Header(0x20080522, 0)), data)


@needs_landlock
def test_a_denial_for_a_file_it_left_unreadable_says_so_not_a_write_outside_its_permission(make_ws, tmp_path):
    # A file the agent may write, made mode 000: the supervisor (not root) cannot read it, so the
    # change is denied. It was reported as "chip wrote outside its permission", with a `scope`
    # signal: the report, the denial and the orchestrator's next brief now say what it was.
    with reading_as_a_user():
        a = Attack(make_ws, tmp_path, 'write("src/login.py")\nos.chmod("src/login.py", 0)\n',
                   files=("webapp/src/**",))
    a.assert_denied("src/login.py", scope=False)
    assert a.rec.report["summary"] == "chip left a file the supervisor could not read; every change was discarded"
    assert a.offending == ["webapp/src/login.py: unreadable (changed, mode 0000) — " + gate.ALWAYS_DENIED["unreadable"]]
    brief = fresh_brief({a.rec.id: a.rec}, 2, orchestrator=a.rec.sender, now=datetime.now(UTC))
    assert "why: left a file the supervisor could not read: webapp/src/login.py: unreadable" in brief
    assert "outside its permission" not in brief
    from coordinator.endings import _denied_for
    folder = gate.Change("src/sub", "unreadable", kind="dir")
    two = gate.Change("src/a.py", "unreadable"), gate.Change("src/b.py", "unreadable")
    verdict = gate.Verdict((folder, *two), ((folder, ""), (two[0], ""), (two[1], "")))
    assert _denied_for(verdict, "webapp", ("webapp/src/**",), ("webapp/**",)) == (
        "left 2 files and a folder the supervisor could not read")


@pytest.mark.parametrize(("glob", "named"), [
    ("webapp/.gi?/**", ".git"), ("webapp/src/.[Gg]it/hooks/*", ".git"), ("webapp/.gitmodules", ".gitmodules"),
    ("webapp/git~1/*", "git~1"), ("webapp/.git./config", ".git.")])
def test_a_writes_glob_that_can_only_mean_git_internals_is_refused_at_its_key(make_ws, glob, named):
    # Accepted, it promised the agent a permission the gate never grants: every change to such
    # a path was denied (and the agent signalled) whatever the glob said.
    import yaml
    from click.testing import CliRunner

    from coordinator.cli import cli

    ws = make_ws({"chip": {"role": "specialist", "command": ["true"], "writes": ["webapp/src/**"]}})
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg["agents"]["chip"]["writes"] = ["webapp/src/**", glob]
    ws.config_path.write_text(yaml.safe_dump(cfg))
    said = CliRunner().invoke(cli, ["-w", str(ws.root), "board"])
    assert said.exit_code == 2, said.output
    assert said.output == (f"coordinator: coordinator.yaml: agents.chip.writes.1: {glob!r} matches {named}: git "
                           "internals (.git, .gitmodules) are never writable, whatever writes says; name the files "
                           "and folders the agent may write\n")


def test_a_repository_wide_writes_glob_stays_valid_and_doctor_says_git_internals_stay_denied(make_ws):
    from click.testing import CliRunner

    from coordinator.cli import cli

    ws = make_ws({"chip": {"role": "specialist", "command": ["true"], "writes": ["webapp/**", "webapp/src/????"]},
                  "rex": {"role": "specialist", "command": ["true"], "writes": ["webapp/src/**"]}})
    said = CliRunner().invoke(cli, ["-w", str(ws.root), "doctor"])
    assert said.exit_code == 0, said.output
    notes = [line.strip() for line in said.output.splitlines() if line.strip().startswith("note: writes")]
    assert notes == ["note: writes webapp/** also matches .git and .gitmodules: those are never writable, "
                     "whatever the glob says (a change to them is denied)"]  # chip's; rex's never reach them


@needs_landlock
def test_a_working_copy_made_unreadable_whole_is_denied_as_that_not_as_deletions(make_ws, tmp_path):
    # `chmod 000 .` in its working copy: a supervisor that is not root can list nothing in it.
    # Every file of the copy read as deleted: the order was denied for deleting README.md,
    # Makefile and the .git pointer, which it never touched, and signalled as a scope violation.
    with reading_as_a_user():
        a = Attack(make_ws, tmp_path, 'write("src/login.py")\nos.chmod(".", 0)\n', files=("webapp/src/**",))
    a.assert_denied(".", scope=False)
    assert a.offending == ["webapp/.: unreadable (changed, mode 0000) — " + gate.ALWAYS_DENIED["unreadable"]]
    assert a.rec.report["summary"] == "chip left a folder the supervisor could not read; every change was discarded"



def test_the_folder_holding_the_working_copy_made_unreadable_is_denied_not_a_stop(tmp_path):
    # Without the read-only mounts (a supervisor that is not root) chmod is no right the kernel
    # refuses: `chmod 000 ..` locked the order's folder, and the supervisor stopped at the gate
    # ("permission denied: .coordinator/work/<id>/webapp"), every order with it. Now the change
    # is denied as unreadable, the copy judged as a whole.
    copy = tmp_path / "work" / "atk" / "webapp"
    (copy / "src").mkdir(parents=True)
    (copy / "src" / "login.py").write_text("x = 1\n")
    before = gate.snapshot(copy)
    (copy / "src" / "login.py").write_text("x = 2\n")
    copy.parent.chmod(0)
    try:
        with reading_as_a_user():
            changes = gate.diff(before, gate.snapshot(copy, since=before))
    finally:
        copy.parent.chmod(0o755)
    verdict = gate.judge(changes, repo="webapp", files=("webapp/src/**",), writes=("webapp/**",))
    assert [f"{gate.describe(c)} — {why}" for c, why in verdict.offending] == [
        ".: unreadable (the folder holding the working copy was made unreadable) — " + gate.ALWAYS_DENIED["unreadable"]]
    assert verdict.commit_paths() == ()


@needs_landlock
def test_a_change_inside_a_submodule_it_may_write_is_no_scope_violation_and_says_what_it_was(make_ws, tmp_path):
    # `webapp/**` holds vendor/sub/x.py: the change is denied (git could never commit it here),
    # but it was reported as "chip wrote outside its permission", with a `scope` signal.
    from test_gate import add_submodule

    def with_submodule(a: Attack) -> None:
        add_submodule(a.repo, "vendor/sub", tmp_path / "sub")
        a.main, a.checkout = git(a.repo, "rev-parse", "main"), a.files_of(a.repo)

    a = Attack(make_ws, tmp_path, 'write("vendor/sub/x.py")\n', files=("webapp/**",), before=with_submodule)
    a.assert_denied("vendor/sub/x.py", scope=False)
    assert a.rec.report["summary"] == ("chip changed a submodule's files, which only its own repository can commit; "
                                       "every change was discarded")
    assert a.offending == ["webapp/vendor/sub/x.py: added (file) — inside the submodule vendor/sub: change it in "
                           "its own repository"]
