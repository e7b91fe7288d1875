"""Randomised chaos: kill -9 at random moments under a mixed workload, and what it found.

The slow test runs a team of three shell specialists on orders with every kind of ending
(done, failed, blocked and escalated, halted, routed, requeued with a blocker, denied, with
acceptance checks, `blocked_by` chains, outbox sends) while `coordinator cancel` and `retry`
come in, and kills `coordinator supervise` (sometimes its fork server too) with -9 at random
moments, often just after a chosen line of its log. A final `supervise --once` finishes what
can run. Then every order is in exactly one place, none is `running`, none landed twice, the
audit trail verifies and nothing of the workspace still runs. A failure names its seed:
`CHAOS_SEED=<seed> pytest tests/test_chaos.py` replays the same plan (the kill moments
depend on timing, so a replay is likely, not certain, to hit the same window).

The deterministic tests below pin each defect the chaos run found.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import step_until
from test_recovery import Killed, abandon, assert_clean, assert_one_place, restart, review_then_ship

from bench.harness import probe_of
from coordinator.store import Record, Store
from coordinator.supervisor import Supervisor

COORDINATOR = Path(sys.executable).with_name("coordinator")


# -- defects found ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["routed", "blocked"])
def test_a_follow_up_whose_record_a_crash_cut_off_is_filed_once_and_nothing_is_rejected(make_ws, ending):
    """kill -9 after a route's (or an escalation's) follow-up was placed in its order folder,
    before its record was written: the restart files the follow-up under its planned id, and
    its copy in the folder is not taken in as a second order asking for that id (which was
    rejected as a duplicate: a bogus rejection on the board and in the sender's reports)."""
    ws = review_then_ship(make_ws, "route-to\\nagent: rex" if ending == "routed" else "blocked",
                          escalate_to="rex")
    sup = Supervisor(ws)
    sup.open()
    filed = sup._after_filing

    def killed_once_placed(rec: Record, order: Any) -> Record:
        if rec.source.startswith(("route of ", "escalation of ")):
            raise Killed
        return filed(rec, order)

    sup._after_filing = killed_once_placed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        step_until(sup, lambda: False, "the kill")
    follow = Store(ws.state).load("review").report["follow_up"]["id"]
    assert (Store(ws.state).folder(follow) / "original.md").exists()
    assert not Store(ws.state).record_path(follow).exists()
    abandon(sup)
    said = restart(ws)
    recs = Store(ws.state).load_all()
    assert set(recs) == {"review", "ship", follow}, said
    assert not [r for r in recs.values() if r.status == "rejected"], said
    assert recs[follow].status == "done" and recs[follow].to == "rex" and "review" in recs[follow].references
    assert (probe_of(ws) / "ran").read_text().split().count(follow) == 1
    assert_one_place(ws, {"review", "ship", follow})
    assert_clean(ws)
