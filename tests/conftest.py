"""Shared fixtures: real workspaces in temporary folders, real git, real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests import fakellm and helpers as top-level modules
sys.path.insert(0, str(Path(__file__).parent.parent))  # and the benchmarks' workspace builder

from bench.harness import make_workspace  # noqa: E402
from coordinator.supervisor import Supervisor  # noqa: E402
from coordinator.workspace import Workspace  # noqa: E402

# Bidirectional overrides and isolates: refused in every text field (they make text read
# otherwise than it is), so generated "acceptable text" leaves them out.
BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def sh(script: str) -> list[str]:
    """An agent command that runs a shell script (with $COORD_* in its environment)."""
    return ["/bin/sh", "-c", script]


def order_md(objective: str, *, files: tuple[str, ...] = (), acceptance: tuple[str, ...] | None = None,
             branching: tuple[str, ...] = ("halt-with-note if the work does not apply",),
             **front: Any) -> str:
    """A Markdown work order in the seed's four-line format."""
    acc = acceptance or ("The first thing is true", "The second thing is true", "The third thing is true")
    head = ""
    if front:
        head = "---\n" + yaml.safe_dump({k.replace("sender", "from"): v for k, v in front.items()}) + "---\n"
    body = f"**Objective:** {objective}\n\n**Acceptance:**\n" + "".join(f"- {a}\n" for a in acc)
    body += "\n**Files:**\n" + "".join(f"- {f}\n" for f in files)
    body += "\n**Branching:**\n" + "".join(f"- {b}\n" for b in branching)
    return head + body


def drop(ws: Workspace, agent: str, name: str, text: str) -> Path:
    """Drop a file the way `coordinator send` does: a dot-file renamed into the inbox."""
    inbox = ws.inbox(agent)
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.rename(tmp, inbox / name)
    return inbox / name


@pytest.fixture
def make_ws(tmp_path: Path) -> Callable[..., Workspace]:
    """make_ws(agents={...}, **top) -> a workspace with state/ and the demo repository webapp.

    Specialists get $PROBE, a folder outside the workspace their sandbox may write, for evidence.
    The benchmarks build their workspaces the same way (one builder for both).
    """

    def make(agents: dict[str, Any], **top: Any) -> Workspace:
        return make_workspace(tmp_path, agents, **top)

    return make


@pytest.fixture
def inbox_mount(make_ws) -> Iterator[tuple[Workspace, Path]]:
    """A workspace whose inbox/chip is a tmpfs of its own: no rename reaches state/ from it."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    mnt = ws.inbox("chip")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs on an inbox folder here (needs root): {proc.stderr.strip()}")
    try:
        yield ws, mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def intake_all(sup: Supervisor) -> None:
    """File every order now in the inboxes. One intake step yields after a few milliseconds of
    filing (so attempts get started), which on a loaded machine is before the last of a few."""
    while sup._intake_step():
        pass


def step_until(sup: Supervisor, cond: Callable[[], object], what: str, *, wait: float = 60.0) -> None:
    """Drive the supervisor one step at a time until `cond()` holds (no threads, no sleeps as sync)."""
    end = time.monotonic() + wait
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        if not sup.step():
            sup._wait(0.05)


# A shell command that prints a valid work order (YAML) for rex: what specialists write into their outbox.
PRINT_REVIEW = ('printf "objective: Review it\\nacceptance: [a is true, b is true, c is true]\\nfiles: []\\n'
                'branching: [{action: halt-with-note, when: nothing to do}]\\n"')


def wait_until(cond: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll `cond` (state another process or thread writes) until true; fail saying what never happened."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def deep_ok(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, removed at the end without recursion: pytest clears old temp folders with
    shutil.rmtree, which a tree thousands of levels deep left there (a denied copy is kept)
    would crash."""
    from coordinator import durable

    yield tmp_path
    durable.remove_tree(tmp_path)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An empty `state/` folder (no git): for modules that only read and write files in it."""
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def dead_url() -> str:
    """A loopback port nothing listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(autouse=True)
def _no_workspace_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("COORDINATOR_WORKSPACE", raising=False)
    yield


# Repo.merge in a child that kills itself with SIGKILL right after the git command `step` of
# the checkout's move: exactly what a kill -9 of the supervisor there leaves on disk, its
# index.lock (the move's new index, written through GIT_INDEX_FILE) included.
_MERGE_THEN_DIE = """
import os, signal, sys
from coordinator.repos import Repo

class Dying(Repo):
    def _run(self, args, **kw):
        done = super()._run(args, **kw)
        if args[0] == sys.argv[3]:
            os.kill(os.getpid(), signal.SIGKILL)
        return done

Dying(sys.argv[1]).merge(sys.argv[2])
"""


def merge_killed_after(repo: Path, order_id: str, step: str) -> None:
    """Merge wo/<order_id> into `repo` in a process killed -9 just after git `step` ran in it:
    `read-tree` (the checkout moved, the branch not) or `update-ref` (the branch moved too, the
    index not yet)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-c", _MERGE_THEN_DIE, str(repo), order_id, step],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (repo / ".git" / "index.lock").exists()  # what the kill left: the move's new index
