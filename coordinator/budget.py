"""The orchestrator's hot-token budget (SPEC §8, seed 001's 7K rule).

Hot tokens are what sits in the orchestrator's working context: its brief, every order it
sent, every report and rejection delivered to it, and whatever `coordinator budget add`
reports. Below the first band it routes; past the ceiling it drifts into doing the work
itself. The supervisor keeps a ledger of those items and, at the ceiling, drops finished
ones (rotate) or hands over to a fresh instance with a clean brief (fresh).

Files, all under the supervisor's `state/` repository and small enough to diff:

    state/orchestrator/ledger.json          generation, last mode, items (oldest first)
    state/orchestrator/brief.md             the clean brief of the current generation
    state/orchestrator/generations/<n>.json the ledger of generation n, archived by `fresh`

Writes go through `durable`; committing them is the caller's job.

Example:
    >>> ledger = Ledger.load(state_dir)
    >>> ledger.add("WO-0042", "order", order_text, now=now)
    >>> change = ledger.update_mode(cfg.budget.bands)
    >>> ledger.save()
    >>> lines = on_ceiling(ledger, cfg.budget, brief=make_brief, now=now)
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import durable
from .config import Budget, Config
from .errors import StateError, UsageError

# More hot tokens than any one reading can be (the largest contexts hold a few million): a typo.
MAX_TOKENS_ADDED = 10_000_000

KINDS = ("brief", "order", "report", "rejection", "manual")
MODES = ("routing", "mixed", "drift", "executor")
STATUSES = ("in-flight", "completed")
SOURCES = ("usage", "estimate")

ORCHESTRATOR_DIR = "orchestrator"
LEDGER_NAME = "ledger.json"
BRIEF_NAME = "brief.md"
GENERATIONS_DIR = "generations"
BRIEF_REF = "brief"
# A fresh brief stays compact: older rejections (and older blocked or halted orders) are
# summarised by a count.
MAX_BRIEF_REJECTIONS = 10
MAX_BRIEF_STOPPED = 10
MAX_LINE = 200
# The first line of a brief `render_brief` wrote: which generation it starts.
_BRIEF_HEAD = re.compile(r"# Orchestrator brief: generation ([0-9]{1,9})\n")


def ledger_path(state_dir: Path) -> Path:
    return state_dir / ORCHESTRATOR_DIR / LEDGER_NAME


def brief_path(state_dir: Path) -> Path:
    return state_dir / ORCHESTRATOR_DIR / BRIEF_NAME


def archive_path(state_dir: Path, generation: int) -> Path:
    return state_dir / ORCHESTRATOR_DIR / GENERATIONS_DIR / f"{generation}.json"


def iso(now: datetime) -> str:
    """`now` as a UTC ISO-8601 string to the second; a naive time is taken as UTC."""
    if now.tzinfo is not None:
        now = now.astimezone(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


# No character below U+0378 is wide: the regex engine skips Latin text, and only the rest is
# looked up one by one (a 2 KB order with one "é" or "…" cost 90 µs at intake, looked up whole).
_MAYBE_WIDE = re.compile("[\u0378-\U0010ffff]")


def wide_chars(text: str) -> int:
    """How many characters of `text` are wide (Chinese, Japanese, Korean): a token each, at least."""
    if text.isascii():
        return 0
    return sum(1 for c in _MAYBE_WIDE.findall(text) if unicodedata.east_asian_width(c) in "WF")


def estimate_tokens(text: str) -> int:
    """Estimated tokens of `text` when no model reported usage:
    ``max(⌈narrow chars/4⌉ + wide chars, ⌈words·4/3⌉)``.

    Four characters per token is the usual figure for English prose and code; a wide (East
    Asian) character is a token or more of its own: counted at a quarter, a brief in Chinese
    or Japanese was a fifth of its real tokens, and rotated far too late. The word rule
    keeps short-word text (lists of ids, terse bullets) from being undercounted. Both round
    up, so any non-empty text costs at least one token. No network, no tokenizer.

    Example:
        >>> estimate_tokens("Route the login bug to chip.")  # 28 chars, 6 words
        8
        >>> estimate_tokens("修复登录错误")  # 6 wide characters
        6
    """
    if not text:
        return 0
    wide = wide_chars(text)
    by_chars = math.ceil((len(text) - wide) / 4) + wide
    by_words = math.ceil(len(text.split()) * 4 / 3)
    return max(by_chars, by_words)


def mode_for(tokens: int, bands: tuple[int, int, int]) -> str:
    """The orchestrator's mode at `tokens`: routing < b0 <= mixed < b1 <= drift < b2 <= executor."""
    b0, b1, b2 = bands
    if not b0 < b1 < b2:
        raise ValueError(f"bands must increase, got {bands}")
    if tokens < b0:
        return "routing"
    if tokens < b1:
        return "mixed"
    if tokens < b2:
        return "drift"
    return "executor"


@dataclass(frozen=True)
class Item:
    """One thing in the orchestrator's context."""

    ref: str  # the order id it belongs to, or a name for briefs and manual items
    kind: str  # one of KINDS
    tokens: int
    status: str  # "in-flight" | "completed"
    note: str
    source: str  # "usage" (reported by the model) | "estimate"
    added: str  # ISO time

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Ledger:
    """The hot-token ledger of one orchestrator generation.

    `add`, `complete`, `rotate` and `update_mode` change memory only; `save` writes.
    `fresh` writes the archive, the brief and the ledger together, as they belong together.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        generation: int = 1,
        items: Iterable[Item] = (),
        last_mode: str = "routing",
    ) -> None:
        self.state_dir = state_dir
        self.generation = generation
        self.items: list[Item] = list(items)
        # The mode the caller last saw, persisted so a change survives restarts and is
        # reported once ("walt: mixed -> drift"), not on every add.
        self.last_mode = last_mode

    @classmethod
    def load(cls, state_dir: Path) -> Ledger:
        """The ledger under `state_dir`; an empty generation 1 when there is none yet."""
        path = ledger_path(state_dir)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(state_dir)
        except OSError as e:
            raise StateError(f"{_shown(path, state_dir)}: cannot read: {e.strerror}") from None
        try:
            ledger = cls._from_dict(state_dir, json.loads(raw.decode("utf-8")))
        except (ValueError, TypeError, KeyError) as e:  # UnicodeDecodeError is a ValueError
            why = (f"missing key {e}" if isinstance(e, KeyError)
                   else f"not UTF-8 text at byte {e.start}" if isinstance(e, UnicodeDecodeError) else str(e))
            raise StateError(
                f"{_shown(path, state_dir)}: not a valid ledger ({why}); restore it with "
                f"`git -C state checkout {ORCHESTRATOR_DIR}/{LEDGER_NAME}` or delete it to start over"
            ) from None
        ledger._finish_fresh()
        return ledger

    @classmethod
    def _from_dict(cls, state_dir: Path, data: Any) -> Ledger:
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        generation = data["generation"]
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
            raise ValueError(f"generation {generation!r} is not a positive whole number")
        last_mode = data.get("last_mode", "routing")
        if last_mode not in MODES:
            raise ValueError(f"last_mode {last_mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(data["items"], list):
            # A mapping was read as its keys ({} as no items at all), null as a Python error.
            raise ValueError(f"items is {type(data['items']).__name__}, not a list")
        items = [_item(raw) for raw in data["items"]]
        return cls(state_dir, generation=generation, items=items, last_mode=last_mode)

    def as_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "last_mode": self.last_mode,
            "items": [i.as_dict() for i in self.items],
        }

    def hot_tokens(self) -> int:
        """Everything still in context: completed items count until a rotation drops them."""
        return sum(i.tokens for i in self.items)

    def mode(self, bands: tuple[int, int, int]) -> str:
        return mode_for(self.hot_tokens(), bands)

    def add(
        self,
        ref: str,
        kind: str,
        text: str = "",
        *,
        tokens: int | None = None,
        note: str = "",
        now: datetime,
    ) -> Item:
        """Put one item in context: `tokens` when the model reported usage, else an estimate of `text`."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        if tokens is not None and (isinstance(tokens, bool) or tokens < 0):
            raise UsageError(f"{tokens} is not a token count; give a whole number of 0 or more")
        item = Item(
            ref=ref,
            kind=kind,
            tokens=tokens if tokens is not None else estimate_tokens(text),
            status="in-flight",
            note=one_line(note),
            source="usage" if tokens is not None else "estimate",
            added=iso(now),
        )
        self.items.append(item)
        return item

    def complete(self, ref: str) -> int:
        """Mark every in-flight item of order `ref` completed; returns how many changed."""
        changed = 0
        for n, item in enumerate(self.items):
            if item.ref == ref and item.status != "completed":
                self.items[n] = replace(item, status="completed")
                changed += 1
        return changed

    def reopen(self, ref: str) -> int:
        """Mark the completed items of order `ref` in flight again (it was retried); returns
        how many changed. Its report stays completed: that attempt is over."""
        changed = 0
        for n, item in enumerate(self.items):
            if item.ref == ref and item.status == "completed" and item.kind != "report":
                self.items[n] = replace(item, status="in-flight")
                changed += 1
        return changed

    def rotate(self) -> list[Item]:
        """Drop completed items from context; returns them."""
        dropped = [i for i in self.items if i.status == "completed"]
        self.items = [i for i in self.items if i.status != "completed"]
        return dropped

    def fresh(self, brief_text: str, *, now: datetime) -> int:
        """Archive this generation, write `brief_text` as the brief, start the next generation.

        The new generation's only item is its brief. Returns the new generation number.
        Written in this order so a crash part-way leaves the old ledger in charge, and a
        second `fresh` simply rewrites the same archive.
        """
        archive = archive_path(self.state_dir, self.generation)
        archive.parent.mkdir(parents=True, exist_ok=True)
        durable.write_json(archive, {**self.as_dict(), "archived": iso(now)})
        durable.write_text(brief_path(self.state_dir), brief_text)
        self.generation += 1
        self.items = []
        self.add(
            BRIEF_REF, "brief", brief_text, note=f"brief of generation {self.generation}", now=now
        )
        self.save()
        return self.generation

    def _finish_fresh(self) -> None:
        """Finish, in memory, a `fresh` cut off (kill -9) after it wrote the next generation's
        brief and before it wrote the ledger: the archive of this generation is there and the
        brief is the next one's. Left as it was, `coordinator budget` said generation N with
        its old brief's tokens while brief.md, which the orchestrator is given, was N+1's; the
        next save writes the finished ledger. A cut before the brief leaves this one in charge."""
        try:
            text = brief_path(self.state_dir).read_text("utf-8")
            archived = json.loads(archive_path(self.state_dir, self.generation).read_bytes())
        except (OSError, ValueError):
            return
        head = _BRIEF_HEAD.match(text)
        if head is None or int(head[1]) != self.generation + 1 or not isinstance(archived, dict):
            return
        self.generation += 1
        self.items = [Item(ref=BRIEF_REF, kind="brief", tokens=estimate_tokens(text), status="in-flight",
                           note=f"brief of generation {self.generation}", source="estimate",
                           added=str(archived.get("archived", "")))]

    def update_mode(self, bands: tuple[int, int, int]) -> tuple[str, str] | None:
        """Record the current mode as `last_mode`; returns (before, after) when it changed."""
        before, after = self.last_mode, self.mode(bands)
        self.last_mode = after
        return (before, after) if before != after else None

    def save(self) -> None:
        path = ledger_path(self.state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_json(path, self.as_dict())

    def as_json(self, *, agent: str, ceiling: int, bands: tuple[int, int, int]) -> dict[str, Any]:
        """The `coordinator budget --json` document (SPEC §10), items largest first."""
        return {
            "agent": agent,
            "hot_tokens": self.hot_tokens(),
            "ceiling": ceiling,
            "mode": self.mode(bands),
            "generation": self.generation,
            "items": [i.as_dict() for i in sorted(self.items, key=lambda i: -i.tokens)],
        }


def orchestrator_of(config: Config) -> str:
    """The team's orchestrator, whose budget the budget commands are about."""
    if not config.orchestrator:
        raise UsageError("this team has no orchestrator; set `orchestrator:` in coordinator.yaml")
    return config.orchestrator


def mode_change_message(agent: str, before: str, after: str, tokens: int) -> str:
    """The one-line warning for a mode change: ``walt: mixed -> drift (7,120 hot tokens)``."""
    return f"{agent}: {before} -> {after} ({tokens:,} hot tokens)"


def _waiting_line(head: str, o: dict[str, Any]) -> str:
    """A brief's line of an order in flight or a request in work, and what it still waits on."""
    line = f"- {head} [{o['status']}]: {one_line(str(o['objective']))}"
    waiting = [one_line(str(w)) for w in o.get("waiting_on") or ()]
    return line + (f" (waits on {', '.join(waiting)})" if waiting else "")


def render_brief(
    in_flight: list[dict[str, Any]],
    rejections: list[dict[str, Any]],
    *,
    generation: int,
    now: datetime,
    stopped: Sequence[dict[str, Any]] = (),
    requests: Sequence[dict[str, Any]] = (),
) -> str:
    """The clean, compact brief a fresh orchestrator starts from.

    `in_flight` dicts have `id`, `to`, `status`, `objective`, `waiting_on` (order ids or
    blocker lines); `rejections` dicts have `id`, `to`, `objective`, `reason`, oldest first
    (only the last MAX_BRIEF_REJECTIONS are listed); `stopped` dicts (blocked or halted
    orders, which wait for the orchestrator's decision) have `id`, `to`, `status`,
    `objective`, `reason`, oldest first (only the last MAX_BRIEF_STOPPED are listed);
    `requests` dicts (the requests sent to the orchestrator that it is working on) have `id`,
    `from`, `status`, `objective`, `waiting_on`, every one listed.
    """
    out = [
        f"# Orchestrator brief: generation {generation}",
        "",
        f"Written {iso(now)} by the supervisor when the last context was retired. You route: "
        "send work orders to specialists, review their reports; never do their work.",
        "",
        f"## In flight ({len(in_flight)})",
        "",
    ]
    if not in_flight:
        out.append("Nothing is in flight.")
    out += [_waiting_line(f"{o['id']} -> {o['to']}", o) for o in in_flight]
    if requests:
        out += ["", f"## Requests you are working on ({len(requests)})", ""]
    out += [_waiting_line(f"{r['id']} from {r['from']}", r) for r in requests]
    out += _listed(
        "Blocked or halted: waiting for your decision", stopped, MAX_BRIEF_STOPPED,
        lambda o: f"{o['id']} -> {o['to']} [{o['status']}]: {one_line(str(o['objective']))}",
        "None of these runs again by itself: `coordinator retry ID` runs it again once what "
        "stopped it is resolved, `coordinator cancel ID` ends it, or send a new order that "
        "lists it in `references`.",
    )
    out += _listed(
        "Recent rejections", rejections, MAX_BRIEF_REJECTIONS,
        lambda r: f"{r['id']} -> {r['to']}: {one_line(str(r['objective']))}",
        "A new order that repeats a rejected one must list it in `references` and say what changed.",
    )
    return "\n".join(out) + "\n"


def _listed(title: str, entries: Sequence[dict[str, Any]], most: int, head: Callable[[dict[str, Any]], str],
            closing: str) -> list[str]:
    """A section of the fresh brief: its last `most` entries, each `head` and why, a count of
    the earlier ones, and what to do about them; nothing when there are none."""
    if not entries:
        return []
    shown = entries[-most:]
    out = ["", f"## {title} ({len(entries)})", ""]
    if len(entries) > len(shown):
        out.append(f"- ... {len(entries) - len(shown)} earlier, see `coordinator board`")
    out += [f"- {head(e)}; why: {one_line(str(e['reason']))}" for e in shown]
    return out + ["", closing]


def on_ceiling(
    ledger: Ledger, budget: Budget, *, brief: Callable[[], str], now: datetime, again: bool = False
) -> list[str]:
    """Do what `budget.on_ceiling` says once hot tokens reach the ceiling; saves the ledger.

    "rotate" drops completed items, then goes fresh if still at or over the ceiling; "fresh"
    goes fresh; "warn" changes nothing. A fresh start is skipped when its brief would not be
    smaller than what is in context now, so an overlong in-flight list cannot churn through
    generations. Returns human lines of what was done (for the log and the commit message);
    none when under the ceiling. `again`: this crossing was already answered, so only a new
    action is said (a warning, or a skipped fresh start, is said once per crossing).
    """
    start = ledger.hot_tokens()
    if start < budget.ceiling:
        return []
    lines = [f"hot tokens {start:,} reached the ceiling of {budget.ceiling:,}"]
    action = budget.on_ceiling
    if action == "warn":
        if again:
            return []
        lines.append(
            "on_ceiling is warn: nothing done; run `coordinator rotate` or `coordinator rotate --fresh`"
        )
        return lines
    if action not in ("rotate", "fresh"):
        raise ValueError(f"on_ceiling {action!r} is not rotate, fresh or warn")
    acted = False
    if action == "rotate":
        dropped = ledger.rotate()
        if dropped:
            acted = True
            lines.append(
                f"rotated: dropped {len(dropped)} completed item(s), "
                f"{sum(i.tokens for i in dropped):,} tokens; {ledger.hot_tokens():,} hot tokens left"
            )
        else:
            lines.append("rotate: no completed items to drop")
    if ledger.hot_tokens() >= budget.ceiling:
        text = brief()
        cost = estimate_tokens(text)
        if cost < ledger.hot_tokens():
            old = ledger.generation
            new = ledger.fresh(text, now=now)
            acted = True
            lines.append(
                f"fresh: generation {old} archived; generation {new} starts from a {cost:,}-token brief"
            )
        else:
            lines.append(
                f"fresh skipped: the brief would be {cost:,} tokens, no smaller than the context; "
                "too much is in flight for one orchestrator"
            )
    if again and not acted:
        return []
    change = ledger.update_mode(budget.bands)
    if change:
        lines.append(f"mode: {change[0]} -> {change[1]} ({ledger.hot_tokens():,} hot tokens)")
    if ledger.hot_tokens() >= budget.ceiling:
        lines.append(f"still {ledger.hot_tokens():,} hot tokens, at or over the ceiling")
    ledger.save()
    return lines


def gauge(tokens: int, ceiling: int, bands: tuple[int, int, int], width: int = 30) -> str:
    """A one-line bar for a TTY, scaled to the ceiling, with the band edges below it marked.

    Example:
        >>> gauge(3500, 7000, (2000, 7000, 15000), width=10)
        '[█████░░░░░] 3,500 / 7,000 hot tokens, mixed'
    """
    if width < 1 or ceiling < 1:
        raise ValueError("width and ceiling must be positive")
    filled = min(width, math.floor(tokens * width / ceiling))
    cells = ["█"] * filled + ["░"] * (width - filled)
    for edge in bands:
        at = math.floor(edge * width / ceiling)
        if 0 < at < width and at >= filled:
            cells[at] = "│"
    text = f"[{''.join(cells)}] {tokens:,} / {ceiling:,} hot tokens, {mode_for(tokens, bands)}"
    if tokens > ceiling:
        text += f", {tokens - ceiling:,} over the ceiling"
    return text


def _item(raw: Any) -> Item:
    if not isinstance(raw, dict):
        raise ValueError("an item is not a JSON object")
    item = Item(
        ref=str(raw["ref"]),
        kind=raw["kind"],
        tokens=raw["tokens"],
        status=raw["status"],
        note=str(raw.get("note", "")),
        source=raw.get("source", "estimate"),
        added=str(raw["added"]),
    )
    if item.kind not in KINDS:
        raise ValueError(f"item kind {item.kind!r} is not one of {', '.join(KINDS)}")
    if item.status not in STATUSES:
        raise ValueError(f"item status {item.status!r} is not one of {', '.join(STATUSES)}")
    if item.source not in SOURCES:
        raise ValueError(f"item source {item.source!r} is not one of {', '.join(SOURCES)}")
    if not isinstance(item.tokens, int) or isinstance(item.tokens, bool) or item.tokens < 0:
        raise ValueError(f"item tokens {item.tokens!r} is not a whole number >= 0")
    return item


def one_line(text: str) -> str:
    """`text` fit for one line of a terminal: every character that is not printable (an escape
    sequence's ESC and BEL: a note given to `budget add` once set the terminal's title and
    cleared its screen in `coordinator budget`) becomes a space, runs of spaces one, cut at MAX_LINE."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= MAX_LINE else flat[: MAX_LINE - 3] + "..."


def _shown(path: Path, state_dir: Path) -> str:
    # Name the file relative to the workspace ("state/orchestrator/ledger.json"), never absolutely.
    return f"{state_dir.name}/{path.relative_to(state_dir).as_posix()}"
