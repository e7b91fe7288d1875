"""The permission attack battery (SPEC §7, issue 4): real sandboxed specialists try to break out.

Every attack runs as one real specialist process under the real supervisor loop
(`Supervisor(ws).run_once()`), in its own workspace. Each test checks both
halves of the promise: the attempt was refused (the errno the kernel gave the
specialist, or the order `denied` with the path in the report) *and* the
target is unchanged on disk (content, mode, mtime, inode), with the
repository's default branch where it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import drop, order_md

from coordinator import landlock
from coordinator.store import Record, Store
from coordinator.supervisor import Supervisor
from coordinator.workspace import Workspace

needs_landlock = pytest.mark.skipif(landlock.abi_version() < 1, reason="this kernel has no Landlock")

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


def refusals(rec: Record) -> dict[str, str]:
    """label -> 'refused EACCES' | 'DONE', from what the specialist printed (the report's summary)."""
    out = {}
    for line in str((rec.report or {}).get("summary", "")).splitlines():
        label, sep, what = line.partition(": ")
        if sep and (what.startswith("refused ") or what == "DONE"):
            out[label] = what
    return out


# -- the kernel layer: writes outside the working copy fail the moment they are attempted ----------

DENIED = ("refused EACCES", "refused EPERM", "refused EXDEV")
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
                                  "git-config", "config", "fake-home", "absolute", "via-dotdot"])
def test_writes_outside_the_working_copy_are_refused_by_the_kernel(make_ws, tmp_path: Path, name: str) -> None:
    from coordinator.repos import init_demo_repo

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
    assert len(seen) >= 4 and {k: v for k, v in seen.items() if v not in DENIED} == {}, rec.report
    after = {k: fingerprint(p) for k, p in where.items()}
    # state/ records legitimately change as the order moves; its record's *content* is the supervisor's.
    before.pop("state-record")
    after.pop("state-record")
    assert after == before
    assert rec.status == "done" and rec.commit is None  # nothing was written, so nothing was committed
    assert git(ws.repos / "webapp", "rev-parse", "main") == main
