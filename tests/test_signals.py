"""Fire-able signals: recorded durably, read back after a crash, listed as a table."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from coordinator import signals
from coordinator.signals import Signal

T0 = datetime(2025, 3, 1, 9, 0, 0, tzinfo=UTC)




def seen(state_dir: Path) -> list[Signal]:
    return [
        signals.record(
            state_dir,
            "artifact",
            agent="walt",
            order=None,
            evidence="tried to write repos/webapp/src/db.sql",
            now=T0,
        ),
        signals.record(
            state_dir,
            "scope",
            agent="chip",
            order="WO-0042",
            evidence="wrote webapp/README.md, outside its files",
            now=T0 + timedelta(minutes=1),
        ),
        signals.record(
            state_dir,
            "silent",
            agent=None,
            order=None,
            evidence="commit 3f2a1c on webapp main with no work order",
            now=T0 + timedelta(minutes=2),
        ),
    ]


def test_recorded_signals_read_back_in_order(state_dir: Path) -> None:
    recorded = seen(state_dir)
    assert signals.load(state_dir) == recorded
    assert recorded[1] == Signal(
        kind="scope",
        agent="chip",
        order="WO-0042",
        evidence="wrote webapp/README.md, outside its files",
        at="2025-03-01T09:01:00Z",
    )
    lines = (state_dir / "signals.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["artifact", "scope", "silent"]


def test_times_are_stored_in_utc(state_dir: Path) -> None:
    local = datetime(2025, 3, 1, 11, 30, tzinfo=timezone(timedelta(hours=2)))
    s = signals.record(
        state_dir, "feedback", agent="walt", order="WO-0013", evidence="repeats WO-0012", now=local
    )
    assert s.at == "2025-03-01T09:30:00Z"


def test_no_file_means_no_signals(state_dir: Path) -> None:
    assert signals.load(state_dir) == []
    assert signals.render([]) == "no signals recorded\n"


def test_a_torn_last_line_is_tolerated_and_the_next_signal_is_kept(state_dir: Path) -> None:
    recorded = seen(state_dir)
    path = state_dir / "signals.jsonl"
    with path.open("ab") as f:  # a crash in the middle of an append
        f.write(b'{"kind": "scope", "agent": "ch')
    assert signals.load(state_dir) == recorded

    later = signals.record(
        state_dir,
        "feedback",
        agent="walt",
        order="WO-0050",
        evidence="repeats WO-0042 without a reference",
        now=T0 + timedelta(hours=1),
    )
    assert signals.load(state_dir) == [*recorded, later]


def test_unknown_kind_is_refused(state_dir: Path) -> None:
    with pytest.raises(ValueError, match="artifact, feedback, scope, silent"):
        signals.record(state_dir, "override", agent="walt", order=None, evidence="x", now=T0)
    assert not (state_dir / "signals.jsonl").exists()


def test_counts_name_every_kind(state_dir: Path) -> None:
    recorded = seen(state_dir)
    recorded.append(
        signals.record(state_dir, "scope", agent="chip", order="WO-0043", evidence="x", now=T0)
    )
    assert signals.counts(recorded) == {"artifact": 1, "feedback": 0, "scope": 2, "silent": 1}
    assert signals.counts([]) == {"artifact": 0, "feedback": 0, "scope": 0, "silent": 0}


def test_render_is_a_table_one_line_each_newest_last(state_dir: Path) -> None:
    recorded = seen(state_dir)
    recorded.append(
        signals.record(
            state_dir,
            "scope",
            agent="chip",
            order="WO-0044",
            evidence="wrote\nthree\nfiles " + "x" * 300,
            now=T0 - timedelta(days=1),
        )
    )
    table = signals.render(recorded).splitlines()
    assert table[0].split() == ["TIME", "KIND", "AGENT", "ORDER", "EVIDENCE"]
    body = table[1:-1]
    assert len(body) == 4  # multi-line evidence stays on one line
    assert [row.split()[0] for row in body] == [s.at for s in recorded]  # as recorded
    assert body[-2].split()[:4] == ["2025-03-01T09:02:00Z", "silent", "-", "-"]
    assert "wrote three files" in body[-1] and len(body[-1]) < 200
    assert table[-1] == "total: artifact 1, feedback 0, scope 2, silent 1"


def test_as_json_holds_counts_and_every_signal(state_dir: Path) -> None:
    recorded = seen(state_dir)
    doc = signals.as_json(recorded)
    assert doc["counts"]["scope"] == 1
    assert doc["signals"][0] == {
        "kind": "artifact",
        "agent": "walt",
        "order": None,
        "evidence": "tried to write repos/webapp/src/db.sql",
        "at": "2025-03-01T09:00:00Z",
    }
    assert json.loads(json.dumps(doc)) == doc


def test_the_newest_signal_is_last_even_after_the_clock_stepped_back(state_dir: Path) -> None:
    """`coordinator signals` sorted by the time text: a signal recorded after the clock was
    stepped back an hour showed first. The table follows the order they were recorded in."""
    signals.record(state_dir, "scope", agent="chip", order="WO-0001", evidence="before the step", now=T0)
    signals.record(state_dir, "silent", agent=None, order=None, evidence="after the step",
                   now=T0 - timedelta(hours=1))
    body = signals.render(signals.load(state_dir)).splitlines()[1:-1]
    assert "before the step" in body[0] and "after the step" in body[1]
    assert body[1].startswith("2025-03-01T08:00:00Z")  # the time shown is the time recorded
    assert [s["evidence"] for s in signals.as_json(signals.load(state_dir))["signals"]] == [
        "before the step", "after the step"]


def test_render_shows_control_characters_in_evidence_as_text(state_dir: Path) -> None:
    """Evidence quotes names a person chose (a file made by hand in state/): an escape
    sequence in one reached the terminal as it was, and could rewrite the table."""
    signals.record(state_dir, "silent", agent=None, order=None,
                   evidence="state/ changed by hand (restored from git): a\x1b[2K\x1b[1Ab\x9bc", now=T0)
    table = signals.render(signals.load(state_dir))
    assert "a\\x1b[2K\\x1b[1Ab\\u009bc" in table
    assert "\x1b" not in table and "\x9b" not in table


def test_an_order_sent_again_unchanged_after_its_rejection_fires_feedback(make_ws) -> None:
    """The seed's feedback loop: walt sends the order chip may not take, it is rejected, and
    walt sends it again unchanged. Rejected the second time for the same reason first, the
    repeat came second among its problems, and `coordinator signals` said none."""
    from conftest import drop, order_md, sh

    from coordinator.supervisor import Supervisor

    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"]},
                  "chip": {"role": "specialist", "writes": ["webapp/src/**"], "command": sh("true")}},
                 orchestrator="walt")
    order = order_md("The webapp greets a user by name", files=("webapp/README.md",), sender="walt")
    with Supervisor(ws) as sup:
        drop(ws, "chip", "a.md", order)
        sup.run_once(limit=10)
        assert [s.kind for s in signals.load(ws.state)] == []  # a first rejection is no loop
        drop(ws, "chip", "b.md", order)
        sup.run_once(limit=10)
        first, again = sorted(sup.records)
        assert sup.records[again].status == "rejected"
    (fired,) = signals.load(ws.state)
    assert (fired.kind, fired.agent, fired.order) == ("feedback", "walt", again)
    assert f"this repeats {first}, which was rejected" in fired.evidence


def test_long_signal_evidence_is_cut_with_an_ellipsis_in_the_audit_trail_and_the_signal(make_ws) -> None:
    """A denial's evidence was cut mid-word in `git log` of state/ ("keep it out of the") and
    in `coordinator signals` ("are ne"), reading as whole: both now end in "…", as history
    notes do."""
    import subprocess

    from conftest import drop, order_md, sh

    from coordinator.supervisor import Supervisor

    names = " ".join(f"src/f{i:02d}.txt" for i in range(12))
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"],
                           "command": sh(f"touch {names}")}})
    drop(ws, "chip", "a.md", order_md("Touch the files", files=("webapp/src/login.py",), id="WO-1"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=10)
        assert sup.records["WO-1"].status == "denied"
    (fired,) = signals.load(ws.state)
    assert fired.kind == "scope" and len(fired.evidence) == 300 and fired.evidence.endswith("…")
    log = subprocess.run(["git", "-C", str(ws.state), "log", "--format=%B"], capture_output=True, text=True,
                         check=True).stdout
    (line,) = [x for x in log.splitlines() if x.startswith("signal scope: WO-1 chip: ")]
    assert line.endswith("…") and fired.evidence.startswith(line.removeprefix("signal scope: WO-1 chip: ")[:-1])
