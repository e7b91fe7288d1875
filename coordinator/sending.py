"""Validating and sending work orders from the command line, and workspace chores.

`send` validates against the team and the workspace's history, reserves an id
when the order has none, and drops the file atomically: a dot-file in the inbox,
fsync, rename, fsync the folder. An invalid order writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from . import durable, orders
from .errors import OrderError, UsageError
from .store import History, Store
from .workspace import Workspace

RESERVED = "ids"


def history(ws: Workspace) -> History:
    store = Store(ws.state)
    return History(store.load_all(), store)


def validate_files(ws: Workspace, files: list[Path], *, to: str | None, sender: str | None) -> list[dict[str, Any]]:
    """Each file's verdict: valid, recipient, number of checks, problems."""
    hist = history(ws)
    report: list[dict[str, Any]] = []
    for path in files:
        shown = ws.rel(path)
        recipient = to or ws.agent_of_inbox(path)
        entry: dict[str, Any] = {"file": shown, "to": recipient, "valid": False, "checks": 0, "problems": []}
        try:
            if recipient is None:
                raise UsageError(f"{shown}: not in an inbox folder; say who it is for with --to AGENT")
            data = _read(path)
            order = orders.load(data, path=shown, to=recipient, config=ws.config, history=hist, sender=sender)
            entry.update(valid=True, checks=len(order.checks), id=order.id)
        except OrderError as e:
            entry["problems"] = [p.as_dict() | {"text": str(p)} for p in e.problems]
        except UsageError as e:
            entry["problems"] = [{"path": shown, "line": None, "field": "", "message": str(e), "text": str(e)}]
        report.append(entry)
    return report


def send(ws: Workspace, data: bytes, *, name: str, to: str, sender: str | None) -> str:
    """Validate, then drop atomically into `inbox/<to>/`; returns the order's id."""
    cfg = ws.config
    if to not in cfg.agents:
        raise UsageError(f"unknown agent {to!r}; agents: {', '.join(cfg.agents)}")
    shown = name
    order = orders.load(data, path=shown, to=to, config=cfg, history=history(ws), sender=sender)
    inbox = ws.inbox(to)
    inbox.mkdir(parents=True, exist_ok=True)
    if order.id is None or sender is not None:
        order = dataclasses.replace(order, id=order.id or reserve_id(ws))
        data = orders.render(order).encode("utf-8")
        name = f"{order.id}.md"
    assert order.id is not None
    target = _free_name(inbox, name)
    tmp = inbox / f".{target.name}.tmp"
    durable.write_bytes(tmp, data)
    os.rename(tmp, target)
    durable.fsync_dir(inbox)
    return order.id


def reserve_id(ws: Workspace) -> str:
    """The next WO-NNNN, reserved so that neither `send` nor intake hands it out twice."""
    folder = ws.runtime / RESERVED
    folder.mkdir(parents=True, exist_ok=True)
    top = Store(ws.state).max_assigned()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            m = orders_id_number(entry.name)
            top = max(top, m)
    n = top + 1
    while True:
        candidate = f"WO-{n:04d}"
        try:
            os.close(os.open(folder / candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return candidate
        except FileExistsError:
            n += 1


def orders_id_number(name: str) -> int:
    if name.startswith("WO-") and name[3:].isdigit():
        return int(name[3:])
    return 0


def _free_name(folder: Path, name: str) -> Path:
    base = Path(name).name.lstrip(".") or "order.md"
    target = folder / base
    n = 1
    while target.exists():
        stem, suffix = os.path.splitext(base)
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(orders.MAX_ORDER_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a work order") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None


def gc(ws: Workspace, days: float) -> list[str]:
    from .repos import Repo, gc_worktrees

    repos = [Repo(p) for p in sorted(ws.repos.iterdir()) if (p / ".git").exists()] if ws.repos.is_dir() else []
    return gc_worktrees(ws.runtime / "work", repos, keep_days=days, now=time.time())


def demo_intro(ws: Workspace) -> list[str]:
    """Set up the embedded demo (its repository) and say how to drive it."""
    from .repos import init_demo_repo

    lines = []
    demo = ws.repos / "webapp"
    if not demo.exists():
        init_demo_repo(demo)
        lines.append("created repos/webapp (the demo repository)")
    agents = ", ".join(f"{n} ({a.role})" for n, a in ws.config.agents.items())
    lines += [
        f"demo team: {agents}",
        "In another terminal, drop a demo order and watch it run:",
        "  .venv/bin/coordinator send demo/example-orders/greeting.md --to chip",
        "  .venv/bin/coordinator send demo/example-orders/request.md --to walt",
        "  .venv/bin/coordinator board",
        "  git -C repos/webapp log --format='%h %an: %s%n%b' -3",
        "Stop with Ctrl-C (once: drain; twice: stop now).",
    ]
    return lines
