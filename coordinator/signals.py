"""Fire-able signals (SPEC §8, seed 001): evidence that an agent left its role.

    artifact  the orchestrator tried to write a specialist's files
    feedback  a repeat order without a reference to the rejection it repeats
    scope     a specialist wrote outside its order's files
    silent    a change in repos/ or state/ with no work order behind it

Each signal seen is one JSON line appended to `state/signals.jsonl` (append-only, so a
crash costs at most the line being written, and `git diff` shows exactly what was seen).
Committing it is the caller's job. `coordinator signals` prints `render(load(state_dir))`.

Example:
    >>> record(state_dir, "scope", agent="chip", order="WO-0042",
    ...        evidence="wrote webapp/README.md, outside files", now=now)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import durable
from .errors import StateError
from .inboxfiles import printable

KINDS = ("artifact", "feedback", "scope", "silent")
SIGNALS_NAME = "signals.jsonl"
# The table stays one line per signal on a normal terminal; the file keeps the whole text.
MAX_EVIDENCE = 100


@dataclass(frozen=True)
class Signal:
    kind: str  # one of KINDS
    agent: str | None  # who left its role, when known
    order: str | None  # the work order involved, when there is one
    evidence: str  # what was seen: paths, order ids, the commit
    at: str  # ISO time, UTC

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def signals_path(state_dir: Path) -> Path:
    return state_dir / SIGNALS_NAME


def record(
    state_dir: Path,
    kind: str,
    *,
    agent: str | None,
    order: str | None,
    evidence: str,
    now: datetime,
) -> Signal:
    """Append one signal durably to `state/signals.jsonl` and return it."""
    if kind not in KINDS:
        raise ValueError(f"signal kind {kind!r} is not one of {', '.join(KINDS)}")
    signal = Signal(kind=kind, agent=agent, order=order, evidence=evidence, at=_iso(now))
    path = signals_path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        if _ends_torn(path):
            # A crash mid-append left a line without its newline; end it first, or this signal
            # would be glued onto the fragment and both would be unreadable.
            durable.append_line(path, "")
        durable.append_line(path, json.dumps(signal.as_dict(), ensure_ascii=False, sort_keys=True))
    except IsADirectoryError as e:  # was an internal error that stopped the supervisor
        raise _unusable(state_dir, e) from None
    return signal


def check(state_dir: Path) -> None:
    """StateError when a folder stands where signals are appended (the supervisor checks at
    start, after putting back from git what it can: it would stop at the first signal)."""
    path = signals_path(state_dir)
    if path.is_dir() and not path.is_symlink():
        raise _unusable(state_dir, IsADirectoryError(21, "Is a directory"))


def _unusable(state_dir: Path, e: OSError) -> StateError:
    return StateError(f"{state_dir.name}/{SIGNALS_NAME}: {(e.strerror or 'unusable').lower()}; signals are appended to a "
                      f"file there: move it away (`git -C {state_dir.name} log -- {SIGNALS_NAME}` has what was "
                      "recorded)")


def load(state_dir: Path) -> list[Signal]:
    """Every signal recorded, oldest first.

    Lines that do not parse are skipped: a torn last line after a crash, or such a line
    ended by a later `record`. Anything else odd in the file shows in `git log` of state/.
    StateError when the file is there but cannot be read.
    """
    try:
        raw = signals_path(state_dir).read_text("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as e:  # a folder in its place (an internal error, exit 70, in `board` too)
        raise _unusable(state_dir, e) from None
    out: list[Signal] = []
    for line in raw.splitlines():
        signal = _parse(line)
        if signal is not None:
            out.append(signal)
    return out


def counts(signals: list[Signal]) -> dict[str, int]:
    """How many of each kind, every kind present (0 when none), in KINDS order."""
    tally = dict.fromkeys(KINDS, 0)
    for s in signals:
        tally[s.kind] = tally.get(s.kind, 0) + 1
    return tally


def render(signals: list[Signal]) -> str:
    """The `coordinator signals` table: a header, one line per signal in the order they were
    recorded (`load` reads them so, the file being append-only), newest last, and the totals.
    Never sorted by `at`: after the clock was stepped back, the newest signal would not be last."""
    if not signals:
        return "no signals recorded\n"
    rows = [("TIME", "KIND", "AGENT", "ORDER", "EVIDENCE")]
    rows += [(s.at, s.kind, s.agent or "-", s.order or "-", _one_line(s.evidence)) for s in signals]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    tally = counts(signals)
    lines.append("total: " + ", ".join(f"{k} {n}" for k, n in tally.items()))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def as_json(signals: list[Signal]) -> dict[str, Any]:
    """The `coordinator signals --json` document: counts and every signal, oldest first."""
    return {"counts": counts(signals), "signals": [s.as_dict() for s in signals]}


def _parse(line: str) -> Signal | None:
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        return None
    agent, order, evidence, at = (data.get(k) for k in ("agent", "order", "evidence", "at"))
    if not isinstance(evidence, str) or not isinstance(at, str):
        return None
    if not (agent is None or isinstance(agent, str)) or not (
        order is None or isinstance(order, str)
    ):
        return None
    return Signal(kind=data["kind"], agent=agent, order=order, evidence=evidence, at=at)


def _ends_torn(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return False
            f.seek(-1, 2)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _iso(now: datetime) -> str:
    # Same format as the budget ledger: UTC to the second.
    if now.tzinfo is not None:
        now = now.astimezone(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(text: str) -> str:
    # Evidence quotes what a person or an agent named (a file made by hand in state/, a
    # commit's subject): an escape sequence in it went to the terminal as it was.
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= MAX_EVIDENCE else flat[: MAX_EVIDENCE - 3] + "..."
