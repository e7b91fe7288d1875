"""Requests from the CLI to the supervisor: only the supervisor writes `state/`.

When a supervisor runs, the CLI drops a request file into
`.coordinator/requests/` and waits for the answer file; the supervisor serves
requests at every loop step. When none runs, the CLI opens the workspace itself
(taking the same lock) and serves the request directly.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from . import durable
from .errors import CoordinatorError, SupervisorError
from .workspace import Workspace

ANSWER_TIMEOUT = 15.0


def requests_dir(ws: Workspace) -> Path:
    return ws.runtime / "requests"


def supervisor_running(ws: Workspace) -> bool:
    import fcntl

    path = ws.runtime / "supervisor.pid"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def submit(ws: Workspace, action: str, args: dict[str, Any], *, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """Have the supervisor do `action`; returns its answer or raises its error."""
    if not supervisor_running(ws):
        return _serve_offline(ws, action, args)
    folder = requests_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}"
    durable.write_json(folder / f"{name}.request.json", {"action": action, "args": args})
    answer = folder / f"{name}.answer.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer.exists():
            data: dict[str, Any] = durable.read_json(answer)
            answer.unlink()
            if data.get("error"):
                raise CoordinatorError(str(data["error"]))
            return dict(data.get("result") or {})
        time.sleep(0.02)
    raise SupervisorError(f"the supervisor did not answer within {timeout:.0f}s; is it stuck? "
                          "(`coordinator doctor`)")


def _serve_offline(ws: Workspace, action: str, args: dict[str, Any]) -> dict[str, Any]:
    from .supervisor import Supervisor
    from .watcher import NullWatcher

    with Supervisor(ws, watcher=NullWatcher(), offline=True) as sup:
        result = sup.handle(action, args)
        sup.step_commit()
        return result


def pending(ws: Workspace) -> list[tuple[Path, dict[str, Any]]]:
    """Requests waiting for the supervisor, oldest first."""
    found: list[tuple[Path, dict[str, Any]]] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.scandir(requests_dir(ws)), key=lambda e: e.name):
            if entry.name.endswith(".request.json"):
                path = Path(entry.path)
                try:
                    found.append((path, durable.read_json(path)))
                except (OSError, ValueError):
                    path.unlink(missing_ok=True)
    return found


def answer(request: Path, *, result: dict[str, Any] | None = None, error: str | None = None) -> None:
    target = request.with_name(request.name.replace(".request.json", ".answer.json"))
    durable.write_json(target, {"result": result, "error": error}, sync=False)
    request.unlink(missing_ok=True)
