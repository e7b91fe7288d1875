"""One model conversation of an attempt of an agent with `llm:` (SPEC §11), and what it cost.

The HTTP conversation runs in a worker thread (the loop never blocks on a
model), with a heartbeat so a model that thinks for minutes is not taken for a
stale attempt; what it hands back (`Outcome`) is picked up by the loop thread.
The worker reads only what was captured for it at the start, so it never races
the loop over records. Afterwards each call is recorded with the order, in the
attempt's output.log and, for the orchestrator, in its context budget.

Money: every attempt gets its own `Client`; a `SpendMeter` per supervisor adds
what was recorded in `state/` to what calls in flight have spent, and is the
spend guard each client consults before every HTTP call: once an agent or the
workspace reaches its `spend_limit`, no call goes out and the order is blocked
with the limit named (no retry can bypass it: the meter is asked again).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import audit, budget, costs, llmagent
from .config import Agent, Config
from .errors import CoordinatorError, LLMError
from .llm import Call, Client
from .runner import log_folder
from .store import Record

if TYPE_CHECKING:
    from .attempts import Active, AttemptRunner
    from .supervisor import Supervisor

LOG_REPLY_CHARS = 4000       # of each model reply kept in the attempt's output.log
USAGE_NOTE = "model conversation"  # ledger items of a request's own calls carry this note
# In the attempt's log folder: each call as it is made, so a crash (kill -9) in the middle of a
# conversation cannot lose calls that were made and paid for (see `recover_usage`).
CALLS_JOURNAL = "calls.jsonl"
# The brief's last section tells a command how to write $COORD_RESULT; a model answers in JSON.
HOW_TO_ANSWER = "\n## How to answer"


@dataclass
class Outcome:
    """What the worker thread hands back to the loop."""

    kind: str  # "specialist" | "plan" | "synthesis"
    client: Client
    ledger_text: str = ""  # the part of the prompt the budget ledger already counts
    value: Any = None
    error: CoordinatorError | None = None
    replies: list[str] = field(default_factory=list)


# -- money ------------------------------------------------------------------------------------------


class SpendMeter:
    """USD spent by each agent and the workspace: recorded calls plus calls still in flight."""

    def __init__(self, records: Iterable[Record]) -> None:
        self._lock = threading.Lock()
        self._by_agent: dict[str, float] = {}
        self._total = 0.0
        self._live: dict[int, tuple[str, Client]] = {}
        for rec in records:
            for call in rec.usage:
                found = costs.figures(call)  # a call changed by hand is no money, and no crash
                if found is not None:
                    self._add(str(call.get("agent") or rec.to), found[2])

    def _add(self, agent: str, usd: float) -> None:
        self._by_agent[agent] = self._by_agent.get(agent, 0.0) + usd
        self._total += usd

    def track(self, agent: str, client: Client) -> None:
        with self._lock:
            self._live[id(client)] = (agent, client)

    def settle(self, client: Client) -> None:
        """The client's calls are now in `state/`: count them as recorded."""
        with self._lock:
            entry = self._live.pop(id(client), None)
            if entry is not None:
                self._add(entry[0], entry[1].spent)

    def spent(self, agent: str | None = None) -> float:
        with self._lock:
            live = sum(c.spent for a, c in self._live.values() if agent is None or a == agent)
            return live + (self._total if agent is None else self._by_agent.get(agent, 0.0))

    def guard(self, agent: Agent, config: Config) -> Callable[[], str | None]:
        """The circuit breaker a client asks before every HTTP call."""

        def check() -> str | None:
            if agent.spend_limit is not None:
                used = self.spent(agent.name)
                if used >= agent.spend_limit:
                    return (f"spend limit reached: {agent.name} has spent ${used:.4f} of its "
                            f"${agent.spend_limit:.2f} (agents.{agent.name}.spend_limit); no more "
                            "model calls: raise the limit in coordinator.yaml, then `coordinator retry`")
            if config.spend_limit is not None:
                used = self.spent()
                if used >= config.spend_limit:
                    return (f"spend limit reached: the workspace has spent ${used:.4f} of its "
                            f"${config.spend_limit:.2f} (spend_limit); no more model calls: raise the "
                            "limit in coordinator.yaml, then `coordinator retry`")
            return None

        return check


_meters: weakref.WeakKeyDictionary[AttemptRunner, SpendMeter] = weakref.WeakKeyDictionary()


def meter_for(runner: AttemptRunner) -> SpendMeter:
    """One meter per supervisor, seeded from what `state/` recorded when it first was needed."""
    meter = _meters.get(runner)
    if meter is None:
        meter = _meters[runner] = SpendMeter(runner.sup.records.values())
    return meter


def new_client(runner: AttemptRunner, act: Active) -> Client:
    """A client for one attempt (or one review): its calls are exactly this attempt's calls."""
    agent = act.agent
    assert agent.llm is not None
    meter = meter_for(runner)
    limit = meter.guard(agent, runner.sup.config)
    heartbeat = act.attempt.heartbeat

    def guard() -> str | None:
        # Asked before every HTTP call: a sign of life for the stale check, as a command's output is.
        with contextlib.suppress(OSError):
            heartbeat.touch()
        return limit()

    journal, log = act.attempt.logs / CALLS_JOURNAL, act.attempt.log
    key = secrets.token_hex(6)
    made = itertools.count()
    number = act.attempt.number

    def noted(call: Call) -> None:
        entry = _usage_entry(call, agent.name, number, f"{key}-{next(made)}")
        with contextlib.suppress(OSError), open(journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        # In the log as it happens: a slow conversation (retries, re-asks) shows its progress.
        with contextlib.suppress(OSError), open(log, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(_call_line(call) + "\n")

    client = Client(agent.llm, transport=runner.sup.http_transport, spend_guard=guard, on_call=noted)
    _journal_keys[client] = key
    meter.track(agent.name, client)
    return client


_journal_keys: weakref.WeakKeyDictionary[Client, str] = weakref.WeakKeyDictionary()


def _usage_entry(call: Call, agent: str, attempt: int, key: str | None) -> dict[str, Any]:
    """A call as it is recorded with its order; `key` names it in the attempt's journal."""
    return {**call.as_dict(), "agent": agent, "attempt": attempt, **({"call": key} if key else {})}


def recover_usage(sup: Supervisor, rec: Record, number: int) -> None:
    """Record the calls of attempt `number` that a crash kept from being recorded with the
    order (they were made, and are billed): read back from the attempt's journal."""
    path = log_folder(sup.ws, rec.id, number) / CALLS_JOURNAL
    try:
        lines = path.read_text("utf-8", errors="replace").splitlines()
    except OSError:
        return
    sup.whole(rec)
    known = {u.get("call") for u in rec.usage}
    found: list[dict[str, Any]] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the line the crash cut off
        if _journal_entry(entry) and entry["call"] not in known:
            known.add(entry["call"])
            found.append(entry)
    if not found:
        return
    rec.usage.extend(found)
    # After a stop the supervisor chose (Ctrl-C, `coordinator stop`), "after a crash" alarmed for nothing.
    cause = "the supervisor stopped" if rec.id in getattr(sup.attempts, "cut", ()) else "a crash"
    line = (f"{len(found)} model call(s) of attempt {number} recorded after {cause}, "
            f"${sum(e['cost'] for e in found):.4f}")
    sup.event(rec, line)
    sup.say(f"recovery: {rec.id}: {line}")


def _journal_entry(entry: Any) -> bool:
    """Whether a journal line is a call as `_usage_entry` wrote it (what `cost` can add up)."""
    return (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("call", "model", "agent"))
            and costs.figures(entry) is not None)


# -- the worker thread --------------------------------------------------------------------------------


HEARTBEAT_EVERY = 5.0  # seconds between signs of life while a model call is under way


def launch(act: Active, out: Outcome, ask: Callable[[], Any], name: str,
           wake: Callable[[], None] | None = None, *, left: float | None = None) -> None:
    """Run `ask` in a thread of its own; `left`: seconds until the order's timeout, after which
    the call under way ends (see `Client.stop`, used by a cancel too)."""
    if left is not None:
        out.client.deadline = time.monotonic() + max(0.0, left)
    heartbeat = act.attempt.heartbeat
    alive = threading.Event()

    def beat() -> None:
        # A healthy model can think for minutes before its first byte: not silent, not stale.
        while not alive.wait(HEARTBEAT_EVERY):
            with contextlib.suppress(OSError):
                heartbeat.touch()

    def work() -> None:
        beating = threading.Thread(target=beat, daemon=True, name=f"{name}-heartbeat")
        beating.start()
        try:
            out.value = ask()
            out.replies = [r.text for r in out.value[1]]
        except llmagent.LLMReplyError as e:
            out.error = e
            out.replies = [r.text for r in e.replies]
        except CoordinatorError as e:
            out.error = e
        except Exception as e:  # noqa: BLE001 - whatever a reply does, the supervisor goes on
            # A bug or a reply nobody foresaw fails this attempt with one line; it never
            # kills the loop (a thread's exception would be lost, and its value is None).
            out.value = None
            out.error = LLMError(out.client.redact(
                f"the model call ended unexpectedly ({type(e).__name__}: {one_line(str(e), 160)})"))
        finally:
            alive.set()
            if wake is not None:
                wake()  # the loop picks the reply up now, not at its next idle timeout

    act.thread_outcome = out
    act.thread = threading.Thread(target=work, daemon=True, name=name)
    act.thread.start()


def model_brief(brief: str) -> str:
    """The brief without the section on $COORD_RESULT: the model answers in JSON instead."""
    return brief.split(HOW_TO_ANSWER, 1)[0].rstrip() + "\n"


# -- usage ----------------------------------------------------------------------------------------------


def record_usage(runner: AttemptRunner, act: Active, out: Outcome) -> None:
    """Each call with the order (for `coordinator cost`); the orchestrator's in its budget."""
    sup, rec = runner.sup, act.rec
    sup.whole(rec)  # it may have been cancelled (ended, written) while the model thought
    calls = out.client.calls
    runner_meter = meter_for(runner)
    key = _journal_keys.get(out.client)
    for n, call in enumerate(calls):
        rec.usage.append(_usage_entry(call, act.agent.name, act.attempt.number,
                                      f"{key}-{n}" if key else None))
    _log_conversation(act, out, calls)
    if calls:
        sup.store.save(rec, sync=False)
        sup.audit.stage(audit.SUPERVISOR, f"{rec.id} {rec.to}: {len(calls)} model call(s), "
                        f"${sum(c.cost for c in calls):.4f}")
    runner_meter.settle(out.client)
    if act.agent.is_orchestrator and act.agent.name == sup.config.orchestrator:
        _budget_usage(runner, rec, out, calls)


def _budget_usage(runner: AttemptRunner, rec: Record, out: Outcome, calls: tuple[Call, ...]) -> None:
    """The request's conversation as the model counted it, minus what the ledger already holds.

    The model keeps nothing between calls: what sits in its context is the last prompt (the
    ledger's items, the team, the request, any re-asks) and its answer. The ledger counts its
    own items already, so the request's item is the rest, and replaces the one of its last call.
    """
    answered = [c for c in calls if c.usage is not None and c.error is None]
    if not answered:
        return
    usage = answered[-1].usage
    assert usage is not None
    held = budget.estimate_tokens(out.ledger_text)
    tokens = max(0, usage.prompt_tokens - held) + usage.completion_tokens
    sup = runner.sup
    sup.ledger.items = [i for i in sup.ledger.items
                        if not (i.ref == rec.id and i.kind == "brief" and i.note.startswith(USAGE_NOTE))]
    sup.ledger.add(rec.id, "brief", tokens=tokens, now=sup.wall_now(),
                   note=f"{USAGE_NOTE} of {rec.id}: {len(calls)} call(s), {usage.prompt_tokens} prompt + "
                        f"{usage.completion_tokens} completion tokens reported")
    if rec.terminal:
        # Cancelled while the model thought: its items were completed then, before this one came;
        # left in flight, no rotation would ever drop it.
        sup.ledger.complete(rec.id)
    change = sup.ledger.update_mode(sup.config.budget.bands)
    sup.ledger.save()
    if change:
        sup.say("budget: " + budget.mode_change_message(rec.to, change[0], change[1],
                                                          sup.ledger.hot_tokens()))


def _log_conversation(act: Active, out: Outcome, calls: tuple[Call, ...]) -> None:
    """Replies (and calls, unless each was logged as it was made) into the attempt's output.log,
    as a command's output would be."""
    lines = [] if _journal_keys.get(out.client) else [_call_line(c) for c in calls]
    for n, text in enumerate(out.replies, 1):
        lines.append(f"--- reply {n} ({out.kind})\n{out.client.redact(text, LOG_REPLY_CHARS)}")
    if out.error is not None:
        lines.append(f"--- failed: {out.error}")
    if lines:
        # backslashreplace: a lone surrogate a model sent is logged as its escape, not a crash.
        with open(act.attempt.log, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write("\n".join(lines) + "\n")


def _call_line(c: Call) -> str:
    return (f"model call {c.model} at {c.base_url}: {c.error or f'HTTP {c.status}'}"
            + (f", {c.usage.prompt_tokens}+{c.usage.completion_tokens} tokens" if c.usage else "")
            + f", {c.latency:.2f}s, ${c.cost:.4f}")


def one_line(text: str, n: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"
