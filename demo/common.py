"""What every demo agent does: read its order, write its result."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def order() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(os.environ["COORD_ORDER"]).read_text("utf-8"))
    return data


def result(outcome: str, summary: str, **extra: str) -> None:
    lines = [f"outcome: {outcome}", f"summary: {json.dumps(summary)}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    Path(os.environ["COORD_RESULT"]).write_text("\n".join(lines) + "\n", encoding="utf-8")


def may(o: dict[str, Any], action: str) -> dict[str, Any] | None:
    for b in o["branching"]:
        if b["action"] == action:
            return dict(b)
    return None


def local(path: str) -> Path:
    """A repos-relative order path (webapp/src/x.py) inside the working copy."""
    return Path.cwd() / path.split("/", 1)[1]
