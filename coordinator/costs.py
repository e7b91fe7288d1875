"""`coordinator cost`: LLM calls, tokens and money by agent and model (SPEC §11).

Every call an LLM agent makes is recorded with its order (`record.usage`); this
module only adds them up, and answers the spend guard's question: how much has
an agent, and the workspace, spent so far?
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .store import Record, Store
from .workspace import Workspace


def _blank() -> dict[str, Any]:
    return {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}


def totals(records: Iterable[Record]) -> dict[str, Any]:
    by_agent: dict[str, dict[str, Any]] = {}
    by_model: dict[str, dict[str, Any]] = {}
    total = _blank()
    for rec in records:
        for call in rec.usage:
            agent = str(call.get("agent") or rec.to)
            model = str(call.get("model") or "?")
            usage = call.get("usage") or {}
            for bucket in (by_agent.setdefault(agent, _blank()), by_model.setdefault(model, _blank()), total):
                bucket["calls"] += 1
                bucket["prompt_tokens"] += int(usage.get("prompt_tokens", 0) or 0)
                bucket["completion_tokens"] += int(usage.get("completion_tokens", 0) or 0)
                bucket["cost"] += float(call.get("cost", 0.0) or 0.0)
    # Rounded once, at the end: rounded at each call, thousands of cheap calls summed to $0.
    for bucket in (*by_agent.values(), *by_model.values(), total):
        bucket["cost"] = round(bucket["cost"], 6)
    return {"total": total, "by_agent": by_agent, "by_model": by_model}


def summary(ws: Workspace) -> dict[str, Any]:
    return totals(Store(ws.state).load_all().values())


def spent(records: Iterable[Record], agent: str | None = None) -> float:
    """USD spent so far, by one agent or by the whole workspace."""
    return sum(float(c.get("cost", 0.0) or 0.0) for r in records for c in r.usage
               if agent is None or (c.get("agent") or r.to) == agent)


def render(data: dict[str, Any]) -> str:
    total = data["total"]
    if not total["calls"]:
        return "no LLM calls recorded"
    # As wide as the longest name (an OpenRouter model is "anthropic/claude-sonnet-4.5"), so the
    # figures stay under their headings.
    width = max([20, *(len(name) + 1 for key in ("by_agent", "by_model") for name in data[key])])
    lines = [f"{'':<{width + 2}}{'calls':>7}{'prompt':>11}{'completion':>12}{'USD':>11}"]
    for title, key in (("by agent", "by_agent"), ("by model", "by_model")):
        lines.append(title)
        for name, b in sorted(data[key].items()):
            lines.append(f"  {name:<{width}}{b['calls']:>7}{b['prompt_tokens']:>11,}"
                         f"{b['completion_tokens']:>12,}{b['cost']:>11.4f}")
    lines.append(f"{'total':<{width + 2}}{total['calls']:>7}{total['prompt_tokens']:>11,}"
                 f"{total['completion_tokens']:>12,}{total['cost']:>11.4f}")
    return "\n".join(lines)
