"""The kernel sandbox, on the real kernel: a probe process restricts itself and tries to escape."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator import landlock
from coordinator.errors import SandboxError
from coordinator.landlock import Ruleset

ROOT = Path(__file__).resolve().parents[1]
ABI = landlock.abi_version()
needs_landlock = pytest.mark.skipif(ABI < 1, reason="this kernel has no Landlock")
needs_scopes = pytest.mark.skipif(ABI < 6, reason="signal and socket scoping need Landlock ABI 6")

# Restricts itself with the rules in argv[1], runs the operations in argv[2], prints
# {name: "ok" | errno name}. A separate process: restricting is for good.
PROBE = r"""
import errno, json, os, signal, socket, stat, sys
from coordinator import landlock
landlock.restrict_self(landlock.Ruleset(tuple(json.loads(sys.argv[1]))))
out = {}
for name, (op, *args) in json.loads(sys.argv[2]).items():
    try:
        if op == "write":
            with open(args[0], "a") as f:
                f.write("sandboxed\n")
        elif op == "rename":
            os.rename(args[0], args[1])
        elif op == "link":
            os.link(args[0], args[1])
        elif op == "symlink":
            os.symlink(args[0], args[1])
        elif op == "unlink":
            os.unlink(args[0])
        elif op == "mkdir":
            os.mkdir(args[0])
        elif op == "mknod":
            os.mknod(args[0], 0o600 | stat.S_IFBLK, os.makedev(7, 0))
        elif op == "kill":
            os.kill(int(args[0]), signal.SIGTERM)
        elif op == "kill-own-child":
            pid = os.fork()
            if pid == 0:
                signal.pause()
                os._exit(0)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        elif op == "connect":
            s = socket.socket(socket.AF_UNIX)
            s.connect("\0" + args[0])
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
print(json.dumps(out))
"""

DENIED = {"EACCES", "EPERM", "EXDEV"}


def probe(writable: list[str], ops: dict[str, list[str]]) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(writable), json.dumps(ops)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, str] = json.loads(proc.stdout)
    return result


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/w (writable, with a file and a symlink pointing out), tmp/other/f, tmp/beside."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "mine").write_text("mine\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("original\n")
    (tmp_path / "beside").write_text("original\n")
    (tmp_path / "w" / "out-link").symlink_to(tmp_path / "other" / "f")
    return tmp_path


@needs_landlock
def test_writes_land_only_beneath_writable_entries(tree: Path) -> None:
    w, other = tree / "w", tree / "other"
    result = probe([str(w)], {
        "inside": ["write", str(w / "new")],
        "subdir": ["mkdir", str(w / "sub")],
        "other dir": ["write", str(other / "f")],
        "file beside": ["write", str(tree / "beside")],
        "new file beside": ["write", str(tree / "created")],
        "dot-dot": ["write", f"{w}/../beside"],
        "symlink out": ["write", str(w / "out-link")],
        "rename out": ["rename", str(w / "mine"), str(other / "stolen")],
        "rename in": ["rename", str(other / "f"), str(w / "taken")],
        "hard link in": ["link", str(other / "f"), str(w / "hl")],
        "dev null": ["write", "/dev/null"],
    })
    assert result["inside"] == "ok" and result["subdir"] == "ok" and result["dev null"] == "ok"
    for name in ("other dir", "file beside", "new file beside", "dot-dot", "symlink out",
                 "rename out", "rename in", "hard link in"):
        assert result[name] in DENIED, (name, result[name])
    # Nothing outside changed on disk.
    assert (other / "f").read_text() == "original\n"
    assert (tree / "beside").read_text() == "original\n"
    assert not (tree / "created").exists() and not (other / "stolen").exists()
    assert (w / "mine").read_text() == "mine\n" and not (w / "hl").exists()
    assert (w / "new").read_text() == "sandboxed\n"


@needs_landlock
def test_a_writable_file_can_be_written_but_not_replaced_or_removed(tree: Path) -> None:
    target = tree / "other" / "f"
    result = probe([str(target)], {
        "write": ["write", str(target)],
        "sibling": ["write", str(tree / "other" / "g")],
        "remove": ["unlink", str(target)],
        "replace": ["rename", str(tree / "beside"), str(target)],
    })
    assert result["write"] == "ok"
    assert {result["sibling"], result["remove"], result["replace"]} <= DENIED
    assert target.read_text() == "original\nsandboxed\n"


@needs_landlock
def test_device_nodes_cannot_be_made_even_by_root_under_a_writable_dir(tree: Path) -> None:
    result = probe([str(tree / "w")], {"mknod": ["mknod", str(tree / "w" / "disk")]})
    assert result["mknod"] in DENIED
    assert not (tree / "w" / "disk").exists()


@needs_scopes
def test_a_sandboxed_process_cannot_signal_outside_its_domain(tree: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        result = probe([str(tree / "w")], {
            "outside": ["kill", str(sleeper.pid)],
            "parent": ["kill", str(os.getpid())],
            "own child": ["kill-own-child"],
        })
        assert result["outside"] == "EPERM" and result["parent"] == "EPERM"
        assert result["own child"] == "ok"
        assert sleeper.poll() is None  # still running
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_scopes
def test_a_sandboxed_process_cannot_reach_abstract_sockets_outside(tree: Path) -> None:
    name = f"coordinator-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("\0" + name)
        server.listen()
        result = probe([str(tree / "w")], {"connect": ["connect", name]})
    assert result["connect"] == "EPERM"


def test_ruleset_refuses_relative_and_sandbox_undoing_paths() -> None:
    with pytest.raises(SandboxError, match="relative"):
        Ruleset(writable=("tmp/x",))
    for path in ("/", "/proc", "/dev", "/sys/"):
        with pytest.raises(SandboxError, match="would undo the sandbox"):
            Ruleset(writable=(path,))


@needs_landlock
def test_a_missing_writable_path_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="create it or remove it"):
        landlock.prepare(Ruleset(writable=(str(tmp_path / "missing"),)))


@needs_landlock
def test_the_fork_servers_prepare_refuses_what_ruleset_and_prepare_refuse(tmp_path: Path) -> None:
    """It opens each path once and checks where that descriptor leads: the same refusals, in the
    same order, and the real paths the read-only mounts need."""
    (tmp_path / "ok").mkdir()
    (tmp_path / "f").write_text("")
    (tmp_path / "root").symlink_to("/")
    missing = str(tmp_path / "missing")
    cases = [["rel"], [missing], [str(tmp_path / "root")], [missing + "/.."], [missing, "/"], ["/missing/.."],
             [str(tmp_path / "ok"), "rel"], [str(tmp_path / "ok"), str(tmp_path / "ok"), str(tmp_path / "f")]]

    def outcome(prepare: Callable[..., int], *args: Any) -> str:
        try:
            os.close(prepare(*args))
        except SandboxError as e:
            return str(e)
        return "ok"

    def old_way(case: list[str]) -> int:
        return landlock.prepare(Ruleset(tuple(case)), ABI)

    for case in cases:
        resolved: dict[str, str] = {}
        assert outcome(landlock.prepare_paths, case, ABI, resolved) == outcome(old_way, case), case
    assert resolved == {str(tmp_path / name): os.path.realpath(tmp_path / name) for name in ("ok", "f")}


def test_without_landlock_prepare_refuses() -> None:
    with pytest.raises(SandboxError, match="no Landlock"):
        landlock.prepare(Ruleset(), abi=0)


def test_handled_rights_grow_with_the_abi() -> None:
    assert landlock.handled_fs_rights(0) == 0
    assert landlock.handled_fs_rights(1) == (1 << 13) - 1
    assert landlock.handled_fs_rights(2) == (1 << 14) - 1  # + refer
    assert landlock.handled_fs_rights(3) == (1 << 15) - 1  # + truncate
    assert landlock.handled_fs_rights(4) == landlock.handled_fs_rights(3)
    assert landlock.handled_fs_rights(5) == (1 << 16) - 1  # + ioctl_dev
    assert landlock.handled_fs_rights(7) == landlock.handled_fs_rights(5)
    assert landlock.handled_scopes(5) == 0 and landlock.handled_scopes(6) == 3


def test_status_says_what_is_enforced() -> None:
    info = landlock.status()
    assert info["abi"] == ABI
    json.dumps(info)  # doctor prints it
    if ABI >= 1:
        assert info["landlock"] is True and info["fallback"] is None
        assert "write_file" in info["enforced"] and "execute" in info["enforced"]
        assert ("signal" in info["scopes"]) == (ABI >= 6)
    else:
        assert info["landlock"] is False and info["fallback"]


def test_restrict_self_leaves_the_caller_alone_when_it_fails(tmp_path: Path) -> None:
    # A failure while preparing never restricts: this test process can still write anywhere.
    with pytest.raises(SandboxError):
        landlock.restrict_self(Ruleset(writable=(str(tmp_path / "missing"),)))
    (tmp_path / "still-writable").write_text("x")
    assert (tmp_path / "still-writable").read_text() == "x"
