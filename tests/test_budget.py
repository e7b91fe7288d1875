"""The orchestrator's hot-token ledger: counting, modes, rotation, fresh generations."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator import budget
from coordinator.budget import Ledger, estimate_tokens, mode_for
from coordinator.config import Budget
from coordinator.errors import StateError, UsageError

BANDS = (2000, 7000, 15000)
T0 = datetime(2025, 3, 1, 9, 0, 0, tzinfo=UTC)




def order_text(n: int, words: int = 300) -> str:
    return f"Objective: task {n}\n" + " ".join(f"word{i}" for i in range(words))


# --- counting -----------------------------------------------------------------------------


def test_estimate_follows_the_documented_rule() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("x" * 400) == 100  # one long word: the character rule wins
    assert estimate_tokens("a b c d e f") == 8  # six short words: the word rule wins (6*4/3)
    assert estimate_tokens("Route the login bug to chip.") == 8
    assert estimate_tokens("x") == 2  # one word is 4/3 of a token, rounded up


def test_a_brief_in_chinese_or_japanese_is_not_counted_at_a_quarter_of_its_tokens() -> None:
    # Once 190 tokens for these 760 characters: a tokenizer makes 700 or more of them.
    zh = "请把登录页面的错误修复好，然后为它写一个单元测试，并确保所有的测试都能通过。" * 20
    assert estimate_tokens(zh) == len(zh) == 760
    ja = "ログインページのバグを直して、ユニットテストを書いてください。"  # kana and kanji: wide
    assert estimate_tokens(ja) == len(ja)
    assert estimate_tokens("Fix 登录 now") == 2 + 2  # 8 narrow characters, 2 wide
    assert estimate_tokens("café au lait, s'il vous plaît") == 8  # accented Latin is narrow


@given(st.text(), st.text())
def test_more_text_never_costs_fewer_tokens(a: str, b: str) -> None:
    assert estimate_tokens(a + b) >= estimate_tokens(a)


def test_add_counts_the_text_unless_usage_is_reported(state_dir: Path) -> None:
    ledger = Ledger.load(state_dir)
    text = order_text(1)
    estimated = ledger.add("WO-0001", "order", text, now=T0)
    reported = ledger.add("WO-0001", "report", "ignored", tokens=1234, note="reply", now=T0)
    assert (estimated.tokens, estimated.source) == (estimate_tokens(text), "estimate")
    assert (reported.tokens, reported.source) == (1234, "usage")
    assert ledger.hot_tokens() == estimate_tokens(text) + 1234
    assert estimated.status == "in-flight"
    assert estimated.added == "2025-03-01T09:00:00Z"


def test_a_note_never_sends_escape_sequences_to_the_terminal(state_dir: Path) -> None:
    """`budget add 3 --note "$(cat name)"` with an escape sequence in it set the terminal's title
    and cleared its screen each time `coordinator budget` listed the items."""
    from coordinator import board

    ledger = Ledger.load(state_dir)
    item = ledger.add("manual-1", "manual", tokens=3, note="ok\x1b]0;PWNED\x07\x1b[2Jcleared", now=T0)
    assert item.note == "ok ]0;PWNED [2Jcleared"
    # An item written before (or by hand) is shown the same way.
    data = ledger.as_json(agent="walt", ceiling=7000, bands=BANDS)
    data["items"][0]["note"] = "old\x1b[2J\x9bnote"
    shown = board.render_budget(data, bands=BANDS)
    assert shown.splitlines()[1].endswith("manual-1  old [2J note")
    assert all(c.isprintable() for c in shown.replace("\n", ""))


def test_the_items_line_up_whatever_their_counts(state_dir: Path) -> None:
    """A manual item of 10,000,000 tokens pushed its line two columns right of the others."""
    from coordinator import board

    ledger = Ledger.load(state_dir)
    ledger.add("manual-1", "manual", tokens=10_000_000, now=T0)
    ledger.add("WO-0001", "order", tokens=12, now=T0)
    items = board.render_budget(ledger.as_json(agent="walt", ceiling=7000, bands=BANDS), bands=BANDS).splitlines()[1:]
    assert items == ["  10,000,000  manual    in-flight  manual-1", "          12  order     in-flight  WO-0001"]


def test_a_negative_manual_count_is_refused_with_advice(state_dir: Path) -> None:
    with pytest.raises(UsageError, match="whole number"):
        Ledger.load(state_dir).add("manual-1", "manual", tokens=-5, now=T0)


# --- modes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "mode"),
    [
        (0, "routing"),
        (1999, "routing"),
        (2000, "mixed"),
        (6999, "mixed"),
        (7000, "drift"),
        (14999, "drift"),
        (15000, "executor"),
        (40000, "executor"),
    ],
)
def test_mode_at_each_band_edge(tokens: int, mode: str, state_dir: Path) -> None:
    assert mode_for(tokens, BANDS) == mode
    ledger = Ledger.load(state_dir)
    ledger.add("manual", "manual", tokens=tokens, now=T0)
    assert ledger.mode(BANDS) == mode


def test_a_mode_change_is_reported_once_and_survives_a_restart(state_dir: Path) -> None:
    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", tokens=6000, now=T0)
    assert ledger.update_mode(BANDS) == ("routing", "mixed")
    assert ledger.update_mode(BANDS) is None
    ledger.save()

    again = Ledger.load(state_dir)
    assert again.last_mode == "mixed"
    again.add("WO-0001", "report", tokens=1120, now=T0)
    change = again.update_mode(BANDS)
    assert change == ("mixed", "drift")
    message = budget.mode_change_message("walt", *change, again.hot_tokens())
    assert message == "walt: mixed -> drift (7,120 hot tokens)"


# --- persistence --------------------------------------------------------------------------


def test_a_missing_ledger_is_an_empty_first_generation(state_dir: Path) -> None:
    ledger = Ledger.load(state_dir)
    assert (ledger.generation, ledger.items, ledger.hot_tokens()) == (1, [], 0)


def test_save_and_load_round_trip_as_readable_json(state_dir: Path) -> None:
    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", order_text(1), now=T0)
    ledger.add("WO-0001", "report", tokens=50, note="done: fixed login", now=T0)
    ledger.complete("WO-0001")
    ledger.save()

    path = state_dir / "orchestrator" / "ledger.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["generation"] == 1
    assert [i["status"] for i in on_disk["items"]] == ["completed", "completed"]
    lines = path.read_text().splitlines()
    assert sum('"ref": "WO-0001"' in line for line in lines) == 2  # one line per item: diffs stay small
    assert any(line.startswith('  "generation": 1') for line in lines)
    again = Ledger.load(state_dir)
    assert again.items == ledger.items
    assert again.generation == 1


def test_a_damaged_ledger_says_how_to_recover(state_dir: Path) -> None:
    path = state_dir / "orchestrator" / "ledger.json"
    path.parent.mkdir()
    path.write_text('{"generation": 1, "items": [{"ref": 3')
    with pytest.raises(
        StateError, match=r"state/orchestrator/ledger.json: not a valid ledger.*git"
    ):
        Ledger.load(state_dir)
    path.write_text('{"generation": 1, "items": [{"ref": "a", "kind": "gossip"}]}')
    with pytest.raises(StateError, match="not a valid ledger"):
        Ledger.load(state_dir)
    for items, kind in (("{}", "dict"), ("null", "NoneType"), ('"abc"', "str")):
        path.write_text(f'{{"generation": 1, "items": {items}}}')
        with pytest.raises(StateError, match=rf"not a valid ledger \(items is {kind}, not a list\)"):
            Ledger.load(state_dir)


# --- complete and rotate ------------------------------------------------------------------


def test_complete_marks_every_item_of_the_order(state_dir: Path) -> None:
    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", "fix the login", now=T0)
    ledger.add("WO-0002", "order", "review the login", now=T0)
    ledger.add("WO-0001", "report", "fixed", now=T0)
    assert ledger.complete("WO-0001") == 2
    assert ledger.complete("WO-0001") == 0  # nothing left to change
    assert ledger.complete("WO-9999") == 0
    assert [(i.ref, i.status) for i in ledger.items] == [
        ("WO-0001", "completed"),
        ("WO-0002", "in-flight"),
        ("WO-0001", "completed"),
    ]


def test_rotate_drops_only_completed_items(state_dir: Path) -> None:
    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", tokens=1000, now=T0)
    ledger.add("WO-0002", "order", tokens=2000, now=T0)
    ledger.add("WO-0003", "rejection", tokens=300, now=T0)
    ledger.add("WO-0001", "report", tokens=400, now=T0)
    ledger.complete("WO-0001")
    ledger.complete("WO-0003")

    dropped = ledger.rotate()
    assert sorted((i.ref, i.kind) for i in dropped) == [
        ("WO-0001", "order"),
        ("WO-0001", "report"),
        ("WO-0003", "rejection"),
    ]
    assert [(i.ref, i.status) for i in ledger.items] == [("WO-0002", "in-flight")]
    assert ledger.hot_tokens() == 2000
    assert ledger.rotate() == []


# --- fresh generations ----------------------------------------------------------------------


IN_FLIGHT = [
    {
        "id": "WO-0007",
        "to": "chip",
        "status": "running",
        "objective": "Reject passwords over 64 characters",
        "waiting_on": [],
    },
    {
        "id": "WO-0008",
        "to": "rex",
        "status": "waiting",
        "objective": "Review the login length check",
        "waiting_on": ["WO-0007"],
    },
    {
        "id": "WO-0009",
        "to": "chip",
        "status": "waiting",
        "objective": "Add a\nmigration",
        "waiting_on": ["the API decision"],
    },
]
REJECTIONS = [
    {
        "id": "WO-0005",
        "to": "chip",
        "objective": "Rewrite the hashing",
        "reason": "files outside chip's writes: db/schema.sql",
    },
]


def test_fresh_archives_and_starts_the_next_generation_from_the_brief(state_dir: Path) -> None:
    ledger = Ledger.load(state_dir)
    for n in range(1, 6):
        ledger.add(f"WO-000{n}", "order", order_text(n), now=T0)
    ledger.complete("WO-0001")
    before = [i.as_dict() for i in ledger.items]
    brief = budget.render_brief(IN_FLIGHT, REJECTIONS, generation=2, now=T0)

    assert ledger.fresh(brief, now=T0 + timedelta(minutes=5)) == 2

    archive = json.loads((state_dir / "orchestrator" / "generations" / "1.json").read_text())
    assert archive["generation"] == 1
    assert archive["items"] == before
    assert (state_dir / "orchestrator" / "brief.md").read_text() == brief
    again = Ledger.load(state_dir)  # fresh saved the new generation itself
    assert again.generation == 2
    assert [(i.kind, i.status, i.tokens) for i in again.items] == [
        ("brief", "in-flight", estimate_tokens(brief))
    ]

    assert ledger.fresh(brief, now=T0) == 3
    assert (state_dir / "orchestrator" / "generations" / "2.json").exists()


# A fresh start killed (kill -9) between writing the next brief and writing the ledger.
_KILLED_FRESH = """
import os, signal, sys
from datetime import UTC, datetime
from pathlib import Path
from coordinator import budget

def killed(self):
    os.kill(os.getpid(), signal.SIGKILL)

ledger = budget.Ledger.load(Path(sys.argv[1]))
budget.Ledger.save = killed
ledger.fresh(budget.render_brief([], [], generation=ledger.generation + 1, now=datetime.now(UTC)),
             now=datetime.now(UTC))
"""


def test_a_fresh_start_killed_before_its_ledger_is_written_is_finished_by_the_next_reader(
        state_dir: Path) -> None:
    import signal
    import subprocess
    import sys

    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", order_text(1), now=T0)
    ledger.add("manual-1", "manual", tokens=900, now=T0)
    ledger.save()

    killed = subprocess.run([sys.executable, "-c", _KILLED_FRESH, str(state_dir)], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    brief = (state_dir / "orchestrator" / "brief.md").read_text()
    assert brief.startswith("# Orchestrator brief: generation 2\n")

    # The brief the orchestrator is given is generation 2's: so is what the ledger says.
    again = Ledger.load(state_dir)
    assert again.generation == 2
    assert [(i.kind, i.tokens) for i in again.items] == [("brief", estimate_tokens(brief))]
    assert json.loads((state_dir / "orchestrator" / "generations" / "1.json").read_text())["items"][1]["tokens"] == 900
    again.add("manual-2", "manual", tokens=5, now=T0)
    again.save()
    assert Ledger.load(state_dir).hot_tokens() == estimate_tokens(brief) + 5

    # Killed before its brief was written: the old generation stays in charge, all of it.
    (state_dir / "orchestrator" / "generations" / "2.json").write_text(json.dumps(again.as_dict()))
    assert Ledger.load(state_dir).generation == 2


def test_the_brief_lists_exactly_the_in_flight_orders_given() -> None:
    brief = budget.render_brief(IN_FLIGHT, REJECTIONS, generation=4, now=T0)
    listed = re.findall(r"^- (WO-\d+) -> (\w+) \[(\w+)\]", brief, flags=re.M)
    assert listed == [
        ("WO-0007", "chip", "running"),
        ("WO-0008", "rex", "waiting"),
        ("WO-0009", "chip", "waiting"),
    ]
    assert "generation 4" in brief
    assert "WO-0008 -> rex [waiting]: Review the login length check (waits on WO-0007)" in brief
    assert "Add a migration (waits on the API decision)" in brief  # one line per order
    assert (
        "WO-0005 -> chip: Rewrite the hashing; why: files outside chip's writes: db/schema.sql"
        in brief
    )
    assert "references" in brief  # tells the new instance how to repeat a rejected order


def test_a_brief_with_nothing_in_flight_says_so_and_stays_short() -> None:
    brief = budget.render_brief([], [], generation=2, now=T0)
    assert "Nothing is in flight." in brief
    assert "rejections" not in brief
    assert estimate_tokens(brief) < 100


def test_only_the_recent_rejections_go_into_the_brief() -> None:
    many = [
        {"id": f"WO-{n:04d}", "to": "chip", "objective": f"task {n}", "reason": "denied"}
        for n in range(25)
    ]
    brief = budget.render_brief([], many, generation=2, now=T0)
    assert "WO-0024" in brief and "WO-0015" in brief
    assert "WO-0014" not in brief
    assert "15 earlier" in brief


# --- at the ceiling -------------------------------------------------------------------------


def brief_of(ledger: Ledger) -> str:
    in_flight = [
        {
            "id": i.ref,
            "to": "chip",
            "status": "running",
            "objective": f"task {i.ref}",
            "waiting_on": [],
        }
        for i in ledger.items
        if i.kind == "order" and i.status == "in-flight"
    ]
    return budget.render_brief(in_flight, [], generation=ledger.generation + 1, now=T0)


def test_rotate_keeps_the_ledger_under_the_ceiling_once_work_completes(state_dir: Path) -> None:
    policy = Budget(ceiling=7000, bands=BANDS, on_ceiling="rotate")
    ledger = Ledger.load(state_dir)
    rotations = 0
    for n in range(1, 41):
        ledger.add(f"WO-{n:04d}", "order", order_text(n), now=T0)
        if n > 2:  # two orders stay in flight; the one sent before them reports and ends
            done = f"WO-{n - 2:04d}"
            ledger.add(done, "report", tokens=600, note="done", now=T0)
            ledger.complete(done)
        lines = budget.on_ceiling(ledger, policy, brief=lambda: brief_of(ledger), now=T0)
        rotations += bool(lines)
        assert ledger.hot_tokens() < policy.ceiling
    assert rotations >= 5
    assert ledger.generation == 1  # completed work was enough to drop; no hand-over needed
    saved = Ledger.load(state_dir)  # each rotation was saved
    assert 0 < saved.hot_tokens() < policy.ceiling
    assert all(i.status == "in-flight" for i in saved.items)


def test_rotate_goes_fresh_when_everything_is_in_flight(state_dir: Path) -> None:
    policy = Budget(ceiling=7000, bands=BANDS, on_ceiling="rotate")
    ledger = Ledger.load(state_dir)
    n = 0
    while ledger.hot_tokens() < policy.ceiling:
        n += 1
        ledger.add(f"WO-{n:04d}", "order", order_text(n), now=T0)
    ledger.update_mode(BANDS)

    lines = budget.on_ceiling(ledger, policy, brief=lambda: brief_of(ledger), now=T0)

    assert ledger.generation == 2
    assert ledger.hot_tokens() < policy.ceiling
    assert any("no completed items" in line for line in lines)
    assert any(line.startswith("fresh: generation 1 archived") for line in lines)
    assert any(line.startswith("mode: drift -> ") for line in lines)
    brief = (state_dir / "orchestrator" / "brief.md").read_text()
    assert re.findall(r"^- (WO-\d+)", brief, flags=re.M) == [f"WO-{k:04d}" for k in range(1, n + 1)]
    assert (state_dir / "orchestrator" / "generations" / "1.json").exists()


def test_fresh_policy_hands_over_even_with_completed_work(state_dir: Path) -> None:
    policy = Budget(ceiling=3000, bands=BANDS, on_ceiling="fresh")
    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", tokens=2000, now=T0)
    ledger.add("WO-0002", "order", tokens=1500, now=T0)
    ledger.complete("WO-0001")
    budget.on_ceiling(ledger, policy, brief=lambda: brief_of(ledger), now=T0)
    assert ledger.generation == 2
    assert [i.kind for i in ledger.items] == ["brief"]
    assert "WO-0002" in (state_dir / "orchestrator" / "brief.md").read_text()


def test_warn_changes_nothing(state_dir: Path) -> None:
    policy = Budget(ceiling=1000, bands=BANDS, on_ceiling="warn")
    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", tokens=900, now=T0)
    ledger.add("WO-0001", "report", tokens=300, now=T0)
    ledger.complete("WO-0001")
    ledger.save()
    on_disk = sorted(p.relative_to(state_dir) for p in state_dir.rglob("*"))
    ledger_bytes = (state_dir / "orchestrator" / "ledger.json").read_bytes()
    items = list(ledger.items)

    lines = budget.on_ceiling(ledger, policy, brief=lambda: "unused", now=T0)

    assert "coordinator rotate" in lines[-1]
    assert ledger.items == items and ledger.generation == 1
    assert sorted(p.relative_to(state_dir) for p in state_dir.rglob("*")) == on_disk
    assert (state_dir / "orchestrator" / "ledger.json").read_bytes() == ledger_bytes


def test_under_the_ceiling_nothing_happens(state_dir: Path) -> None:
    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", tokens=6999, now=T0)
    ledger.complete("WO-0001")
    assert budget.on_ceiling(ledger, Budget(), brief=lambda: "unused", now=T0) == []
    assert len(ledger.items) == 1


def test_no_endless_fresh_generations_when_the_brief_itself_is_too_big(state_dir: Path) -> None:
    policy = Budget(ceiling=100, bands=(50, 100, 200), on_ceiling="fresh")
    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", tokens=150, now=T0)
    huge = "word " * 400
    assert budget.on_ceiling(ledger, policy, brief=lambda: huge, now=T0)[1].startswith(
        "fresh skipped"
    )
    assert ledger.generation == 1


# --- reporting ------------------------------------------------------------------------------


def test_as_json_is_the_spec_shape_with_the_largest_item_first(state_dir: Path) -> None:
    ledger = Ledger.load(state_dir)
    ledger.add("WO-0001", "order", tokens=100, now=T0)
    ledger.add("WO-0002", "order", tokens=3000, now=T0)
    ledger.add("manual-1", "manual", tokens=500, note="pasted a log", now=T0)
    doc = ledger.as_json(agent="walt", ceiling=7000, bands=BANDS)
    assert list(doc) == ["agent", "hot_tokens", "ceiling", "mode", "generation", "items"]
    assert doc["agent"] == "walt"
    assert (doc["hot_tokens"], doc["ceiling"], doc["mode"], doc["generation"]) == (
        3600,
        7000,
        "mixed",
        1,
    )
    assert [i["tokens"] for i in doc["items"]] == [3000, 500, 100]
    assert set(doc["items"][0]) == {"ref", "kind", "tokens", "status", "note", "source", "added"}
    assert json.loads(json.dumps(doc)) == doc


def test_gauge_is_one_line_showing_tokens_ceiling_and_mode() -> None:
    half = budget.gauge(3500, 7000, BANDS, width=10)
    assert half == "[█████░░░░░] 3,500 / 7,000 hot tokens, mixed"
    empty = budget.gauge(0, 7000, BANDS, width=30)
    assert "\n" not in empty and empty.count("│") == 1  # the routing/mixed edge is marked
    over = budget.gauge(9000, 7000, BANDS, width=20)
    assert over.startswith("[" + "█" * 20 + "]")
    assert over.endswith("drift, 2,000 over the ceiling")


def test_only_the_recent_blocked_or_halted_orders_go_into_the_brief() -> None:
    stopped = [
        {"id": f"WO-{n:04d}", "to": "chip", "status": "blocked" if n % 2 else "halted",
         "objective": f"task {n}", "reason": f"note {n}"}
        for n in range(14)
    ]
    brief = budget.render_brief([], [], generation=2, now=T0, stopped=stopped)
    assert "## Blocked or halted: waiting for your decision (14)" in brief
    assert "- WO-0013 -> chip [blocked]: task 13; why: note 13" in brief
    assert "- WO-0004 -> chip [halted]: task 4; why: note 4" in brief
    assert "WO-0003" not in brief and "4 earlier" in brief
    assert "`coordinator retry ID`" in brief
    assert "waiting for your decision" not in budget.render_brief([], [], generation=2, now=T0)


# --- a fresh start in a running team ------------------------------------------------------


def test_a_fresh_brief_names_the_requests_the_orchestrator_is_working_on(make_ws) -> None:
    """A request to the orchestrator stays running until the orders it sent end, and its brief
    was in the context `rotate --fresh` retired: the clean brief listed only the orders it had
    sent, so a fresh orchestrator did not know which requests it was serving."""
    from conftest import PRINT_REVIEW, drop, order_md, sh, step_until

    from coordinator.supervisor import Supervisor

    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"],
                           "command": sh(f'mkdir -p "$COORD_OUTBOX/chip"; {PRINT_REVIEW} > "$COORD_OUTBOX/chip/a.yaml"')},
                  "chip": {"role": "specialist", "command": sh("sleep 30")}},
                 orchestrator="walt")
    drop(ws, "walt", "r.md", order_md("The login page remembers the user", id="req"))
    drop(ws, "walt", "q.md", order_md("The logout page says goodbye", id="later", blocked_by=["req"]))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: any(r.to == "chip" and r.status == "running" for r in sup.records.values()),
                   "walt's order to run")
        sent = next(r.id for r in sup.records.values() if r.to == "chip")
        sup.handle("rotate", {"fresh": True})
        assert sup.records["req"].status == "running"
    brief = (ws.state / "orchestrator" / "brief.md").read_text()
    assert f"- {sent} -> chip [running]" in brief
    assert "## Requests you are working on (1)" in brief
    assert f"- req from user [running]: The login page remembers the user (waits on {sent})" in brief
    assert "later" not in brief  # not started: never in its context


def test_a_fresh_brief_says_an_order_waits_only_on_what_is_not_done(make_ws) -> None:
    """An order whose dependency is done is queued, no longer waiting: the clean brief still
    said "(waits on A)" of it, A long done, as if the work were stuck behind it."""
    from conftest import drop, order_md, sh, step_until

    from coordinator.supervisor import Supervisor

    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"]},
                  "chip": {"role": "specialist", "max_parallel": 1,
                           "command": sh('test "$COORD_ORDER_ID" = first || sleep 30')}},
                 orchestrator="walt")
    drop(ws, "chip", "a.md", order_md("The first thing", id="first", sender="walt"))
    drop(ws, "chip", "b.md", order_md("The second thing", id="second", sender="walt", blocked_by=["first"]))
    drop(ws, "chip", "c.md", order_md("The third thing", id="third", sender="walt", blocked_by=["second"]))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("second") is not None and sup.records["second"].status == "running",
                   "the second order to run")
        sup.handle("rotate", {"fresh": True})
    brief = (ws.state / "orchestrator" / "brief.md").read_text()
    assert "- second -> chip [running]: The second thing\n" in brief
    assert "- third -> chip [waiting]: The third thing (waits on second)\n" in brief
    assert "first" not in brief
