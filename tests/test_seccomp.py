"""The setuid/lease guard on real processes: sandboxed children of the real Spawner try it."""

from __future__ import annotations

import json
import os
import secrets
import select
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import landlock, seccomp
from coordinator.errors import SandboxError
from coordinator.landlock import Ruleset
from coordinator.spawner import Spawner, SpawnRequest

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(ROOT)}
pytestmark = pytest.mark.skipif(landlock.abi_version() < 1 or not seccomp.supported(),
                                reason="the guard comes with Landlock, on a machine the filter knows")
FCHMODAT = {"x86_64": 268, "aarch64": 53}.get(os.uname().machine, -1)

# Runs the operations of argv[1] (Python statements) in order, prints {name: "ok" | errno name}.
PROBE = r"""
import ctypes, errno, fcntl, json, mmap, os, signal, stat, subprocess, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)  # as a lease holder would, to outlive a lease break
libc = ctypes.CDLL(None, use_errno=True)
def raw(nr, *args):
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    if libc.syscall(ctypes.c_long(nr), *args) < 0:
        raise OSError(ctypes.get_errno(), "syscall")
def int80(nr, a=0, b=0):
    # A 32-bit (i386) call from this 64-bit process: code and path in the low 4 GiB.
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if isinstance(a, str):
        m[64:65 + len(a)] = a.encode() + b"\0"
        a = base + 64
    code = (b"\x53\xb8" + nr.to_bytes(4, "little") + b"\xbb" + a.to_bytes(4, "little")
            + b"\xb9" + b.to_bytes(4, "little") + b"\xcd\x80\x5b\xc3")  # push rbx ... int 0x80; pop rbx; ret
    m[:len(code)] = code
    result = ctypes.CFUNCTYPE(ctypes.c_int)(base)()
    if result < 0:
        raise OSError(-result, "int 0x80")
def shell(script):
    if subprocess.run(["sh", "-c", script]).returncode != 0:
        raise OSError(errno.EPERM, script)
def ok(proc):
    if proc.returncode != 0:
        raise OSError(errno.EIO, proc.stdout + proc.stderr)
out = {}
for name, statement in json.loads(sys.argv[1]).items():
    try:
        exec(statement)  # the fds it opens stay open: the names are kept until the end
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e))
print(json.dumps(out), flush=True)
if len(sys.argv) > 2:  # keep every fd open while the test looks
    open(sys.argv[2] + ".tmp", "w").write(json.dumps(out))
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    __import__("time").sleep(60)
"""


@pytest.fixture
def sp() -> Iterator[Spawner]:
    spawner = Spawner()
    yield spawner
    spawner.close(grace=0.5)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder the sandbox may write, with a file of mode 0644 in it (root's, as the child is)."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mine").write_text("mine\n")
    os.chmod(tmp_path / "work" / "mine", 0o644)
    return tmp_path / "work"


def run(sp: Spawner, work: Path, ops: dict[str, str], *, hold: Path | None = None) -> tuple[str, dict[str, str]]:
    """Run PROBE on `ops` in a sandboxed child writing only `work`; its token and results."""
    token = "seccomp-" + secrets.token_hex(3)
    argv = (sys.executable, "-c", PROBE, json.dumps(ops), *((str(hold),) if hold else ()))
    log = work.parent / f"{token}.log"
    sp.spawn(SpawnRequest(argv, ENV, str(work), str(log), token, Ruleset((str(work),))))
    deadline = time.monotonic() + 60
    while not (hold and hold.exists()):
        exits = sp.poll()
        if exits:
            assert exits[0].returncode == 0, log.read_text()
            break
        assert time.monotonic() < deadline, log.read_text()
        select.select([sp], [], [], 0.05)
    text = hold.read_text() if hold else log.read_text()
    return token, json.loads(text.splitlines()[-1])


def ia32_available() -> bool:
    """Whether this process can make i386 calls (x86_64 with IA32 emulation), asked outside the sandbox."""
    if os.uname().machine != "x86_64":
        return False
    code = PROBE.split("out = {}")[0] + "int80(20)\n"  # getpid
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0


def test_a_sandboxed_child_cannot_make_a_setuid_or_setgid_file(sp: Spawner, work: Path) -> None:
    """A root specialist without capabilities could still chmod 4755 its own copy of a program,
    in a folder kept after the run; any user would run it as root. Plain modes still work."""
    mine = str(work / "mine")
    refused = {
        "chmod u+s": f"os.chmod({mine!r}, 0o4755)",
        "chmod g+s": f"os.chmod({mine!r}, 0o2644)",
        "fchmod": f"os.fchmod(os.open({mine!r}, os.O_RDONLY), 0o4755)",
        "fchmodat": "os.chmod('mine', 0o6755, dir_fd=os.open('.', os.O_RDONLY))",
        # The kernel reads only the low 16 bits of a mode: high bits must not hide the rest.
        "fchmodat, high bits set": f"raw({FCHMODAT}, -100, b'mine', (1 << 32) | 0o4755)",
        "fchmodat2": "raw(452, -100, b'mine', 0o4755, 0)",
        "cp and chmod 4755": "shell('cp /bin/sh planted && chmod 4755 planted')",
        "open O_CREAT 4755": "os.open('new-suid', os.O_CREAT | os.O_WRONLY, 0o4755)",
        "open O_CREAT|O_EXCL 2755": "os.open('new-sgid', os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o2755)",
        "O_TMPFILE 4755": "os.open('.', os.O_TMPFILE | os.O_WRONLY, 0o4755)",
        "mknod 4755": "os.mknod('new-node', stat.S_IFREG | 0o4755)",
    }
    if os.uname().machine == "x86_64":  # aarch64 has no creat
        refused["creat 4755"] = "raw(85, b'new-creat', 0o4755)"
    if ia32_available():
        refused["i386 chmod 4755"] = f"int80(15, {mine!r}, 0o4755)"
    allowed = {
        "chmod 755": "os.chmod('planted', 0o755)",  # after the refused chmod 4755 of it
        "chmod +x": "shell('touch script && chmod +x script')",
        "create 644": "fd = os.open('plain', os.O_CREAT | os.O_WRONLY, 0o644)",
        "chmod 600": "os.chmod('plain', 0o600)",
        "open without O_CREAT, any mode": f"os.open({mine!r}, os.O_WRONLY | os.O_APPEND, 0o4755)",
        "mkdir": "os.mkdir('sub', 0o755)",
    }
    _token, result = run(sp, work, refused | allowed)
    assert {name: result[name] for name in refused} == dict.fromkeys(refused, "EPERM"), result
    assert {name: result[name] for name in allowed} == dict.fromkeys(allowed, "ok"), result
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in work.iterdir()}
    assert modes == {"mine": 0o644, "planted": 0o755, "script": 0o755, "plain": 0o600, "sub": 0o755}, modes


def test_a_sandboxed_child_cannot_take_a_lease_that_would_stall_the_supervisor(
        sp: Spawner, work: Path, tmp_path: Path) -> None:
    """A read lease on a file the supervisor appends to made each of its writes wait 45 s."""
    target = tmp_path / "signals.jsonl"  # root's, readable, not writable by the child
    target.write_text("{}\n")
    refused = {
        "read lease": f"fcntl.fcntl(os.open({str(target)!r}, os.O_RDONLY), fcntl.F_SETLEASE, fcntl.F_RDLCK)",
        "write lease": "fcntl.fcntl(os.open('mine', os.O_RDWR), fcntl.F_SETLEASE, fcntl.F_WRLCK)",
        "delegation": f"fcntl.fcntl(os.open({str(target)!r}, os.O_RDONLY), 1040, bytes(16))",  # F_SETDELEG
    }
    allowed = {
        "read": f"open({str(target)!r}).read()",
        "flock": f"fcntl.flock(os.open({str(target)!r}, os.O_RDONLY), fcntl.LOCK_SH)",
        "F_SETLK": "fcntl.lockf(os.open('mine', os.O_RDWR), fcntl.LOCK_EX)",
        "F_GETLEASE": f"fcntl.fcntl(os.open({str(target)!r}, os.O_RDONLY), fcntl.F_GETLEASE)",
    }
    token, result = run(sp, work, refused | allowed, hold=work / "held")
    try:
        assert {name: result[name] for name in refused} == dict.fromkeys(refused, "EPERM"), result
        assert {name: result[name] for name in allowed} == dict.fromkeys(allowed, "ok"), result
        began = time.monotonic()  # the child still holds its fds open: what durable.append_line does
        fd = os.open(target, os.O_WRONLY | os.O_APPEND)
        os.close(fd)
        assert time.monotonic() - began < 5
    finally:
        sp.kill_tree(token, grace=0.2)


def test_a_sandboxed_child_runs_python_and_git_but_not_openat2_or_io_uring(sp: Spawner, work: Path) -> None:
    git = "['git', '-c', 'user.name=t', '-c', 'user.email=t@example.com', '-C', 'repo']"
    result = run(sp, work, {
        "python": "ok(subprocess.run([sys.executable, '-c', 'import json, sqlite3; print(1)'], capture_output=True))",
        "git init": "ok(subprocess.run(['git', 'init', '-q', 'repo'], capture_output=True, text=True))",
        "git commit": f"shell('echo x > repo/a'); ok(subprocess.run({git} + ['add', 'a'], capture_output=True, "
                      f"text=True)); ok(subprocess.run({git} + ['commit', '-qm', 'a'], capture_output=True, text=True))",
        "git status": f"ok(subprocess.run({git} + ['status', '--porcelain'], capture_output=True, text=True))",
        # Its mode sits behind a pointer: refused as if the kernel had no openat2 (libc falls back).
        "openat2": "raw(437, -100, b'mine', ctypes.create_string_buffer(24), 24)",
        # io_uring's operations would pass no filter.
        "io_uring_setup": "raw(425, 1, ctypes.create_string_buffer(120))",
    })[1]
    assert result == {"python": "ok", "git init": "ok", "git commit": "ok", "git status": "ok",
                      "openat2": "ENOSYS", "io_uring_setup": "ENOSYS"}, result
    assert (work / "repo" / ".git").is_dir()


def test_every_sandboxed_child_has_the_filter_and_no_trusted_command_or_the_server_has(
        sp: Spawner, work: Path) -> None:
    """Sandboxed children inherit it from the server thread that makes their launcher threads,
    every one of them; a trusted command (no sandbox) and the server's own thread never have it."""
    seen = []
    for i, sandbox in enumerate((Ruleset((str(work),)), None, Ruleset((str(work),)))):
        token = f"filtered-{i}-" + secrets.token_hex(3)
        log = work.parent / f"{token}.log"
        sp.spawn(SpawnRequest(("/bin/sh", "-c", "grep '^Seccomp:' /proc/self/status"), ENV, str(work), str(log),
                              token, sandbox))
        deadline = time.monotonic() + 60
        while not sp.poll():
            assert time.monotonic() < deadline
            select.select([sp], [], [], 0.05)
        seen.append(log.read_text().split())
    assert seen == [["Seccomp:", "2"], ["Seccomp:", "0"], ["Seccomp:", "2"]]
    with open(f"/proc/{sp.server_pid}/status") as f:
        assert "Seccomp:\t0\n" in f.read()


def test_a_filter_the_kernel_refuses_fails_the_start_with_one_line(monkeypatch) -> None:
    """Never a start without the filter: its error is what the spawn raises and logs."""
    monkeypatch.setattr(seccomp, "_fprog", lambda: (seccomp._SockFprog(0, None), None))
    raised: list[BaseException] = []

    def attempt() -> None:  # a throwaway thread: a filter that did install would stay on it
        try:
            seccomp.install()
        except SandboxError as e:
            raised.append(e)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    assert [str(e) for e in raised] == ["cannot install the seccomp filter (setuid files, file leases): "
                                        "Invalid argument; refusing to start without it"]
