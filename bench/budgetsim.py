"""The orchestrator budget simulation (issue 6): a session of ORDERS routing decisions.

Each routing decision, in the supervisor's order of events:
1. reports due now arrive: the order is marked completed and its report added completed,
   exactly as `Supervisor._on_terminal` / `_deliver_report` do (`Ledger.complete`, `add`);
2. the orchestrator reads its whole context: the decision costs `hot_tokens()` tokens read;
3. it sends one order: `orders.render` of a work order of ~150-400 tokens goes in-flight;
   its report (`reports.render`, ~200-600 tokens) arrives 2-5 decisions later;
4. the supervisor's budget check runs: `budget.on_ceiling` with the policy under test.
With rotation the policy is `rotate` at a 7,000-token ceiling (fresh brief from the real
`budget.render_brief` when dropping completed items is not enough); without it, `warn`,
which changes nothing. Cumulative tokens are the sum of what every decision read.
Texts and delays come from a seeded generator: several seeds, median quoted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from coordinator import budget, orders
from coordinator.config import Budget
from coordinator.orders import Acceptance, Branch, WorkOrder
from coordinator.reports import render as render_report
from coordinator.store import Record, iso

from .harness import Figure, median, temp_folder

ORDERS = 200
CEILING = 7000
REPORT_DELAY = (2, 5)  # decisions between sending an order and its report
WORDS = ("login", "form", "password", "length", "limit", "message", "test", "route", "handler",
         "cache", "index", "schema", "field", "migration", "retry", "timeout", "queue", "worker",
         "branch", "review", "summary", "change", "module", "function", "error", "request",
         "response", "header", "token", "session", "user", "account", "setting", "flag", "value",
         "config", "build")


@dataclass(frozen=True)
class Sizes:
    seeds: int = 5


QUICK = Sizes(seeds=3)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize()


def _order(rng: random.Random, n: int) -> str:
    """A rendered work order of about 150-400 tokens."""
    acceptance = tuple(Acceptance(_sentence(rng, 12, 28)) for _ in range(rng.randint(3, 5)))
    branching = tuple(Branch("halt-with-note", _sentence(rng, 8, 22)) for _ in range(rng.randint(1, 3)))
    files = tuple(f"webapp/src/{rng.choice(WORDS)}_{k}.py" for k in range(rng.randint(0, 4)))
    order = WorkOrder(id=f"WO-{n:04d}", sender="walt", to=rng.choice(("chip", "rex")),
                      objective=_sentence(rng, 10, 30)[:280], acceptance=acceptance, files=files,
                      branching=branching)
    return orders.render(order)


def _report(rng: random.Random, n: int, now: datetime) -> str:
    """A rendered report of about 200-600 tokens."""
    summary = ". ".join(_sentence(rng, 10, 20) for _ in range(rng.randint(6, 18))) + "."
    stamp = iso(now.timestamp())
    rec = Record(id=f"WO-{n:04d}", to="chip", sender="walt", status="done", objective=_sentence(rng, 8, 20),
                 created=stamp, updated=stamp, seq=n, attempts=1,
                 report={"summary": summary, "changed": [f"webapp/src/{rng.choice(WORDS)}.py"], "checks": []})
    return render_report(rec)


def simulate(state_dir: Path, *, seed: int, policy: str) -> dict[str, Any]:
    """One session; the context size at every decision and what was done to the ledger."""
    rng = random.Random(seed)
    cfg = Budget(ceiling=CEILING, bands=(2000, CEILING, 15000), on_ceiling=policy)
    ledger = budget.Ledger(state_dir)
    now = datetime(2025, 1, 1, tzinfo=UTC)
    due: dict[int, list[int]] = {}
    in_flight: dict[int, str] = {}
    context: list[int] = []
    order_tokens: list[int] = []
    report_tokens: list[int] = []
    rotations = freshes = 0

    def brief() -> str:
        rows = [{"id": f"WO-{k:04d}", "to": "chip", "status": "running", "objective": obj, "waiting_on": []}
                for k, obj in sorted(in_flight.items())]
        return budget.render_brief(rows, [], generation=ledger.generation + 1, now=now)

    def check() -> None:
        nonlocal rotations, freshes
        generation = ledger.generation
        lines = budget.on_ceiling(ledger, cfg, brief=brief, now=now)
        rotations += any(line.startswith("rotated:") for line in lines)
        freshes += ledger.generation - generation

    for n in range(1, ORDERS + 1):
        now += timedelta(minutes=1)
        for k in due.pop(n, []):
            text = _report(rng, k, now)
            report_tokens.append(budget.estimate_tokens(text))
            ledger.complete(f"WO-{k:04d}")
            ledger.add(f"WO-{k:04d}", "report", text, now=now)
            ledger.complete(f"WO-{k:04d}")
            in_flight.pop(k, None)
            check()
        context.append(ledger.hot_tokens())
        text = _order(rng, n)
        order_tokens.append(budget.estimate_tokens(text))
        ledger.add(f"WO-{n:04d}", "order", text, now=now)
        in_flight[n] = text.split("**Objective:** ", 1)[-1].split("\n", 1)[0]
        due.setdefault(n + rng.randint(*REPORT_DELAY), []).append(n)
        check()
    return {"context": context, "cumulative": sum(context), "max": max(context),
            "median": median([float(c) for c in context]), "rotations": rotations, "fresh": freshes,
            "order_tokens": (min(order_tokens), max(order_tokens)),
            "report_tokens": (min(report_tokens), max(report_tokens)) if report_tokens else (0, 0)}


def budget_sim(sizes: Sizes) -> list[Figure]:
    runs: list[dict[str, Any]] = []
    with temp_folder() as base:
        for seed in range(sizes.seeds):
            rot = simulate(base / f"rot-{seed}", seed=seed, policy="rotate")
            none = simulate(base / f"none-{seed}", seed=seed, policy="warn")
            runs.append({"seed": seed, "rotate": rot, "none": none,
                         "ratio": none["cumulative"] / rot["cumulative"]})
    mid = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    rot, none = mid["rotate"], mid["none"]
    every = 20
    series = {"decision": list(range(1, ORDERS + 1, every)),
              "rotate": rot["context"][::every], "none": none["context"][::every]}
    return [Figure(
        "budget_simulation", f"7. orchestrator tokens, {ORDERS} orders, rotate at {CEILING:,}",
        f"{mid['ratio']:.1f}x fewer ({rot['cumulative'] / 1e6:.2f}M vs {none['cumulative'] / 1e6:.2f}M)",
        f"{len(runs)} seeds",
        note=f"context per routing decision: median {rot['median']:,.0f} tokens (max {rot['max']:,}) with "
             f"rotation vs {none['median']:,.0f} (max {none['max']:,}) without; {rot['rotations']} rotations, "
             f"{rot['fresh']} fresh; ratio per seed " + ", ".join(f"{r['ratio']:.1f}" for r in runs)
             + f"\n     context (K tokens) at decisions {', '.join(map(str, series['decision']))}:"
             + "\n     rotate " + " ".join(f"{c / 1000:5.1f}" for c in series["rotate"])
             + "\n     none   " + " ".join(f"{c / 1000:5.1f}" for c in series["none"]),
        data={"ratio": round(mid["ratio"], 2), "ratios": [round(r["ratio"], 2) for r in runs],
              "cumulative_rotate": rot["cumulative"], "cumulative_none": none["cumulative"],
              "max_rotate": rot["max"], "max_none": none["max"], "rotations": rot["rotations"],
              "fresh_generations": rot["fresh"], "order_tokens_range": rot["order_tokens"],
              "report_tokens_range": rot["report_tokens"], "context_every_20_decisions": series,
              "context_rotate": rot["context"], "context_none": none["context"]})]
