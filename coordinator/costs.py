"""`coordinator cost`: LLM calls, tokens and money by agent and model (SPEC §11).

Every call an LLM agent makes is recorded with its order (`record.usage`); this
module only adds them up, and answers the spend guard's question: how much has
an agent, and the workspace, spent so far?
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .inboxfiles import printable
from .store import Record, Store
from .workspace import Workspace


def _blank() -> dict[str, Any]:
    return {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}


def figures(call: Any) -> tuple[int, int, float] | None:
    """Prompt tokens, completion tokens and USD of one recorded call; None when it is not a
    call as the supervisor records it (a record edited by hand): once an internal error of
    `coordinator cost`."""
    if not isinstance(call, dict):
        return None
    usage = call.get("usage") or {}
    cost = call.get("cost", 0.0) or 0.0
    if not isinstance(usage, dict) or not _number(cost) or not math.isfinite(cost) or cost < 0:
        return None
    prompt, completion = usage.get("prompt_tokens", 0) or 0, usage.get("completion_tokens", 0) or 0
    if not (_whole(prompt) and _whole(completion)) or prompt < 0 or completion < 0:
        return None
    return prompt, completion, float(cost)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def totals(records: Iterable[Record], damaged: list[str] | None = None) -> dict[str, Any]:
    """Calls, tokens and USD by agent, by model and in all; a recorded call that is not one is
    left out and, with `damaged`, said there."""
    by_agent: dict[str, dict[str, Any]] = {}
    by_model: dict[str, dict[str, Any]] = {}
    total = _blank()
    for rec in records:
        for n, call in enumerate(rec.usage):
            found = figures(call)
            if found is None:
                if damaged is not None:
                    damaged.append(f"state/orders/{rec.id}/record.json: usage.{n} is not a model call as "
                                   f"recorded (changed by hand?); not counted: `git -C state checkout "
                                   f"orders/{rec.id}/record.json` puts it back")
                continue
            prompt, completion, cost = found
            agent = str(call.get("agent") or rec.to)
            model = str(call.get("model") or "?")
            for bucket in (by_agent.setdefault(agent, _blank()), by_model.setdefault(model, _blank()), total):
                bucket["calls"] += 1
                bucket["prompt_tokens"] += prompt
                bucket["completion_tokens"] += completion
                bucket["cost"] += cost
    # Rounded once, at the end: rounded at each call, thousands of cheap calls summed to $0.
    for bucket in (*by_agent.values(), *by_model.values(), total):
        bucket["cost"] = round(bucket["cost"], 6)
    return {"total": total, "by_agent": by_agent, "by_model": by_model}


def summary(ws: Workspace, damaged: list[str] | None = None) -> dict[str, Any]:
    """`totals` of every order of the workspace; with `damaged`, a record or a call that cannot
    be read is said there."""
    return totals(Store(ws.state).load_all(unreadable=damaged).values(), damaged)


def spent(records: Iterable[Record], agent: str | None = None) -> float:
    """USD spent so far, by one agent or by the whole workspace."""
    return sum(found[2] for r in records for c in r.usage
               if (found := figures(c)) is not None and (agent is None or (c.get("agent") or r.to) == agent))


def render(data: dict[str, Any]) -> str:
    total = data["total"]
    if not total["calls"]:
        return "no LLM calls recorded"
    # A model's name is what coordinator.yaml or the API's answer said, a record edited by hand
    # any text: an escape sequence or a line break in it reached the terminal. Shown as text.
    # As wide as the longest name (an OpenRouter model is "anthropic/claude-sonnet-4.5"), so the
    # figures stay under their headings.
    width = max([20, *(len(name) + 1 for key in ("by_agent", "by_model") for name in map(printable, data[key]))])
    lines = [f"{'':<{width + 2}}{'calls':>7}{'prompt':>11}{'completion':>12}{'USD':>11}"]
    for title, key in (("by agent", "by_agent"), ("by model", "by_model")):
        lines.append(title)
        for name, b in sorted(data[key].items()):
            lines.append(f"  {printable(name):<{width}}{b['calls']:>7}{b['prompt_tokens']:>11,}"
                         f"{b['completion_tokens']:>12,}{b['cost']:>11.4f}")
    lines.append(f"{'total':<{width + 2}}{total['calls']:>7}{total['prompt_tokens']:>11,}"
                 f"{total['completion_tokens']:>12,}{total['cost']:>11.4f}")
    return "\n".join(lines)
