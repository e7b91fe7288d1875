"""The orchestrator stays a router: its hot-token ledger, rotation, and every fire-able signal in a real scenario."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import drop, intake_all, order_md, sh, step_until, wait_until

from coordinator import budget, orders, runner, signals
from coordinator.store import Store
from coordinator.supervisor import Supervisor


def run(ws):
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
        return sup


def ledger(ws):
    return json.loads((ws.state / "orchestrator" / "ledger.json").read_text())


def team(make_ws, *, walt_command=None, ceiling=7000, on_ceiling="rotate", chip=None):
    walt = {"role": "orchestrator", "sends_to": ["chip"]}
    if walt_command:
        walt["command"] = walt_command
    return make_ws({"walt": walt,
                    "chip": chip or {"role": "specialist", "command": sh("echo done: $COORD_ORDER_ID"),
                                     "writes": ["webapp/src/**"], "max_failures": 1}},
                   orchestrator="walt", budget={"ceiling": ceiling, "on_ceiling": on_ceiling})


def test_orders_sent_and_reports_received_are_counted_from_their_text(make_ws):
    ws = team(make_ws, chip={"role": "specialist", "command": sh('test "$COORD_ORDER_ID" = short || exit 0; '
                                                                 'echo ok')})
    long_objective = "The login page explains " + "very " * 40 + "clearly"
    drop(ws, "chip", "a.md", order_md("Short", id="short", sender="walt"))
    drop(ws, "chip", "b.md", order_md(long_objective, id="long", sender="walt"))
    run(ws)
    items = {(i["ref"], i["kind"]): i for i in ledger(ws)["items"]}
    short, long_ = items[("short", "order")], items[("long", "order")]
    assert long_["tokens"] > short["tokens"] + 40  # counts follow the text
    rendered = orders.render(Store(ws.state).load_order("short"))
    assert short["source"] == "estimate" and short["tokens"] == budget.estimate_tokens(rendered)
    assert items[("short", "report")]["status"] == "completed"
    report = (ws.state / "reports" / "walt" / "short.md").read_text()
    assert items[("short", "report")]["tokens"] == budget.estimate_tokens(report)


def test_a_specialist_cannot_fill_the_orchestrators_context_with_one_enormous_report(make_ws):
    """A report delivered to walt counts as hot tokens: chip's report listing the 300 orders its
    outbox sent, and a summary of 30,000 characters, was 16,000 tokens, twice the ceiling, from
    one order. Each list and the summary are cut, saying how much more `show` has. (150 orders
    here: one attempt sends at most 200.)"""
    spam = ('mkdir -p "$COORD_OUTBOX/rex" && for i in $(seq 1 150); do '
            'printf "**Objective:** Spam %s.\\n" $i > "$COORD_OUTBOX/rex/o$i.md"; done; '
            'printf "outcome: done\\nsummary: %s\\n" "$(printf "word %.0s" $(seq 1 6000))" > "$COORD_RESULT"')
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"]},
                  "chip": {"role": "specialist", "command": sh(spam), "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")}},
                 orchestrator="walt", budget={"ceiling": 7000, "on_ceiling": "warn"})
    drop(ws, "chip", "a.md", order_md("Send the reviews", id="big", sender="walt"))
    run(ws)
    rec = Store(ws.state).load("big")
    assert (rec.status, len(rec.children)) == ("done", 150)
    report = (ws.state / "reports" / "walt" / "big.md").read_text()
    assert report.count("\n- WO-") == 20
    assert "- … and 130 more: `coordinator show big` lists them all\n" in report
    assert "characters more: `coordinator show big`)" in report
    item = next(i for i in ledger(ws)["items"] if (i["ref"], i["kind"]) == ("big", "report"))
    assert item["tokens"] == budget.estimate_tokens(report) < 2000


def test_rotation_at_the_ceiling_keeps_the_ledger_under_it_once_work_completes(make_ws):
    ws = team(make_ws, ceiling=900, on_ceiling="rotate")
    for i in range(12):
        drop(ws, "chip", f"o{i}.md", order_md(f"Order number {i} is carried out well", id=f"o{i}", sender="walt"))
    run(ws)
    data = ledger(ws)
    hot = sum(i["tokens"] for i in data["items"])
    assert hot < 900
    log = subprocess.run(["git", "-C", str(ws.state), "log", "--format=%B"], capture_output=True, text=True).stdout
    # The supervisor rotated on its own, and said so in the audit trail.
    assert "budget walt: hot tokens" in log and "reached the ceiling of 900" in log
    assert "rotated: dropped" in log


def test_rotate_drops_only_completed_items_and_fresh_writes_a_brief_of_what_is_in_flight(make_ws):
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("Finished work", id="fin", sender="walt"))
    run(ws)
    # Two orders stay in flight: taken in, not run (the second waits for the first).
    drop(ws, "chip", "c.md", order_md("Prerequisite", id="fin2", sender="walt",
                                      branching=("requeue-with-blocker if the API is undecided",)))
    drop(ws, "chip", "b.md", order_md("Blocked work", id="later", sender="walt", blocked_by=["fin2"]))
    with Supervisor(ws) as sup:
        intake_all(sup)
        sup.step_commit()
        assert (sup.records["fin2"].status, sup.records["later"].status) == ("queued", "waiting")
        before = {i.ref for i in sup.ledger.items}
        out = sup.handle("rotate", {"fresh": False})
        sup.step_commit()
        after = {i.ref for i in sup.ledger.items}
        assert "fin" in before and "fin" not in after and {"later", "fin2"} <= after
        assert "dropped" in out["message"]
        gen = sup.ledger.generation
        sup.handle("rotate", {"fresh": True})
        sup.step_commit()
        assert sup.ledger.generation == gen + 1
    brief = (ws.state / "orchestrator" / "brief.md").read_text()
    assert "later" in brief and "fin2" in brief and "fin " not in brief.replace("fin2", "")
    assert (ws.state / "orchestrator" / "generations" / f"{gen}.json").exists()
    assert [i["kind"] for i in ledger(ws)["items"]] == ["brief"]


def test_feedback_signal_a_repeat_without_reference_is_rejected(make_ws):
    ws = team(make_ws, chip={"role": "specialist", "command": sh("exit 1"), "max_failures": 1})
    drop(ws, "chip", "a.md", order_md("The export runs nightly", id="first", sender="walt"))
    run(ws)
    assert Store(ws.state).load("first").status == "blocked"
    drop(ws, "chip", "b.md", order_md("The export runs nightly", id="again", sender="walt"))
    drop(ws, "chip", "c.md", order_md("The export runs nightly", id="fixed", sender="walt", references=["first"]))
    run(ws)
    recs = Store(ws.state).load_all()
    assert recs["again"].status == "rejected" and "this repeats first" in recs["again"].errors[0]
    assert recs["fixed"].status != "rejected", recs["fixed"].errors
    fb = [s for s in signals.load(ws.state) if s.kind == "feedback"]
    assert len(fb) == 1 and fb[0].agent == "walt" and fb[0].order == "again"


def test_scope_signal_a_specialist_writing_outside_its_files_is_denied(make_ws):
    ws = team(make_ws, chip={"role": "specialist", "writes": ["webapp/src/**"],
                             "command": sh("echo a > src/mine.py; echo b > src/extra.py")})
    drop(ws, "chip", "a.md", order_md("Only mine changes", id="a", files=("webapp/src/mine.py",)))
    run(ws)
    rec = Store(ws.state).load("a")
    assert rec.status == "denied"
    assert any("src/extra.py" in line for line in rec.report["offending"])
    scope = [s for s in signals.load(ws.state) if s.kind == "scope"]
    assert len(scope) == 1 and scope[0].agent == "chip" and "extra.py" in scope[0].evidence
    assert not (ws.repos / "webapp" / "src" / "mine.py").exists()


def test_artifact_signal_the_orchestrator_cannot_write_a_specialists_files(make_ws):
    target = "src/login.py"
    ws = team(make_ws, walt_command=sh(f"echo 'SELECT 1;' >> {target}; echo routed"))
    before = (ws.repos / "webapp" / target).read_bytes()
    drop(ws, "walt", "a.md", order_md("Login limit is enforced", id="req", files=("webapp/src/login.py",)))
    run(ws)
    art = [s for s in signals.load(ws.state) if s.kind == "artifact"]
    assert len(art) == 1 and art[0].agent == "walt" and "src/login.py" in art[0].evidence
    assert (ws.repos / "webapp" / target).read_bytes() == before
    assert Store(ws.state).load("req").status == "denied"


def test_silent_signal_a_commit_with_no_order_behind_it(make_ws):
    ws = team(make_ws)
    run(ws)
    repo = ws.repos / "webapp"
    (repo / "hotfix.txt").write_text("x")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=walt", "-c", "user.email=w@x", "commit", "-qm",
                    "quick fix at 2 AM"], check=True)
    run(ws)
    silent = [s for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(silent) == 1 and "repos/webapp" in silent[0].evidence


def test_budget_add_and_mode_bands_through_the_supervisor(make_ws):
    ws = team(make_ws)
    with Supervisor(ws) as sup:
        out = sup.handle("budget-add", {"tokens": 1999, "note": "read the spec"})
        assert out["mode"] == "routing"
        out = sup.handle("budget-add", {"tokens": 1, "note": ""})
        assert out["mode"] == "mixed" and out["mode_change"] == ["routing", "mixed"]
        sup.step_commit()
    data = ledger(ws)
    assert sum(i["tokens"] for i in data["items"]) == 2000
    assert any(i["note"] == "read the spec" and i["kind"] == "manual" for i in data["items"])


@pytest.mark.parametrize("ending", ["done", "halted"])
def test_a_command_orchestrators_request_is_judged_at_the_end_of_its_childs_route(make_ws, tmp_path, ending):
    """walt delegates one order to chip, which routes it to rex: walt's request waits for rex's
    follow-up, not for chip's routed order, and ends as the follow-up ends."""
    rex = sh('printf "outcome: halt-with-note\\nsummary: not for me\\n" > "$COORD_RESULT"') if ending == "halted" \
        else sh("echo reviewed")
    ws = make_ws({
        "walt": {"role": "orchestrator", "sends_to": ["chip"], "command": sh(
            'mkdir -p "$COORD_OUTBOX/chip" && cp "$PROBE/kid.md" "$COORD_OUTBOX/chip/kid.md" && '
            'printf "outcome: done\\nsummary: delegated\\n" > "$COORD_RESULT"')},
        "chip": {"role": "specialist", "sends_to": ["rex"], "command": sh(
            'printf "outcome: route-to\\nagent: rex\\nsummary: a review\\n" > "$COORD_RESULT"')},
        "rex": {"role": "specialist", "command": rex},
    }, orchestrator="walt")
    (tmp_path / "probe" / "kid.md").write_text(order_md(
        "The greeting is reviewed", id="kid", branching=("route-to-rex if it needs a review",)))
    drop(ws, "walt", "req.md", order_md("The team reviews the greeting", id="req"))
    run(ws)
    recs = Store(ws.state).load_all()
    assert recs["req"].children == ["kid"] and recs["kid"].status == "routed"
    follow = recs[recs["kid"].routed_to]
    assert (follow.to, follow.status) == ("rex", ending)
    # The request's report says what it sent and how that ended, at the end of its route.
    report = (ws.state / "orders" / "req" / "report.md").read_text()
    assert f"**Orders it sent:**\n\n- kid to chip: routed, routed on to {follow.id} (rex): {ending}\n" in report
    if ending == "done":
        assert recs["req"].status == "done"
    else:
        assert recs["req"].status == "blocked"
        assert recs["req"].report["summary"].startswith(
            f"delegated orders did not finish: kid (routed to {follow.id}) halted")


@pytest.mark.parametrize("how", ["directly", "through another order"])
def test_an_order_a_command_orchestrator_sends_that_waits_for_its_own_request_is_blocked(make_ws, tmp_path, how):
    """walt's request waits for the orders walt sent; one of them that waits (blocked_by) for
    that request waited for ever, and so did the request, `running` on the board long after
    `supervise --once` had said it was done. As a model's plan may not, it is blocked at once,
    saying why, and the request ends as when any order it sent fails."""
    ws = make_ws({
        "walt": {"role": "orchestrator", "sends_to": ["chip"], "command": sh(
            'mkdir -p "$COORD_OUTBOX/chip" && cp "$PROBE/kid.md" "$COORD_OUTBOX/chip/kid.md" && '
            'printf "outcome: done\\nsummary: delegated\\n" > "$COORD_RESULT"')},
        "chip": {"role": "specialist", "command": sh("echo done")},
    }, orchestrator="walt")
    if how == "directly":
        waits_on = "req"
    else:
        waits_on = "middle"
        drop(ws, "chip", "m.md", order_md("The middle step is done", id="middle", blocked_by=["req"]))
    (tmp_path / "probe" / "kid.md").write_text(order_md("The greeting is written", id="kid",
                                                         blocked_by=[waits_on]))
    drop(ws, "walt", "req.md", order_md("The team writes the greeting", id="req"))
    run(ws)
    recs = Store(ws.state).load_all()
    assert recs["kid"].status == "blocked", recs["kid"].history
    assert "req" in recs["kid"].report["summary"] and "wait for ever" in recs["kid"].report["summary"]
    assert recs["req"].status == "blocked"
    assert recs["req"].report["summary"].startswith("delegated orders did not finish: kid blocked")


# -- the ledger follows every end and every return ---------------------------------------------------
def test_a_rejected_order_is_completed_and_a_retried_one_is_in_flight_again(make_ws):
    ws = team(make_ws, chip={"role": "specialist", "command": sh("exit 1"), "max_failures": 1})
    drop(ws, "chip", "bad.md", order_md("Too few items", id="bad", sender="walt", acceptance=("one item",)))
    drop(ws, "chip", "fails.md", order_md("This fails once", id="fails", sender="walt"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        assert sup.records["bad"].status == "rejected" and sup.records["fails"].status == "blocked"
        status = {(i.ref, i.kind): i.status for i in sup.ledger.items}
        assert status[("bad", "rejection")] == "completed"
        assert status[("fails", "order")] == "completed"
        sup.handle("retry", {"id": "fails"})
        status = {(i.ref, i.kind): i.status for i in sup.ledger.items}
        assert status[("fails", "order")] == "in-flight" and status[("fails", "report")] == "completed"
        sup.handle("rotate", {"fresh": False})
        assert {(i.ref, i.kind) for i in sup.ledger.items} == {("fails", "order")}


def test_the_fresh_brief_holds_only_the_orchestrators_own_work_and_why_a_denial_happened(make_ws):
    ws = team(make_ws, chip={"role": "specialist", "writes": ["webapp/src/**"], "command": sh(
        'case "$COORD_ORDER_ID" in deny) echo x > src/other.py;; *) sleep 30;; esac')})
    drop(ws, "chip", "d.md", order_md("Only mine changes", id="deny", sender="walt", files=("webapp/src/mine.py",)))
    drop(ws, "chip", "u.md", order_md("The user's own order", id="users"))
    drop(ws, "chip", "w.md", order_md("Walt's order in flight", id="walts", sender="walt"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=1)
        intake_all(sup)
        for _ in range(3):
            sup.step()
        brief = sup.fresh_brief()
    assert "walts" in brief and "users" not in brief
    assert "- deny -> chip: Only mine changes; why: wrote outside its permission: webapp/src/other.py" in brief


def test_at_the_ceiling_a_warning_is_said_once_per_crossing_not_at_every_step(make_ws):
    ws = team(make_ws, ceiling=100, on_ceiling="warn")
    with Supervisor(ws) as sup:
        sup.handle("budget-add", {"tokens": 150})
        for _ in range(20):
            sup.step()
        sup.step_commit()
        sup.handle("budget-add", {"tokens": 10})
        for _ in range(5):
            sup.step()
        sup.step_commit()
        assert sup.ledger.hot_tokens() == 160
    log = subprocess.run(["git", "-C", str(ws.state), "log", "--format=%B"], capture_output=True, text=True).stdout
    assert log.count("reached the ceiling of 100") == 1


def test_a_command_orchestrators_brief_is_in_its_context_until_the_request_ends(make_ws):
    ws = team(make_ws, walt_command=sh("test -s \"$COORD_BRIEF\" && sleep 0.5"))
    drop(ws, "walt", "r.md", order_md("Plan the login work", id="req"))
    with Supervisor(ws) as sup:
        sup._intake_step()
        sup.step()
        items = [(i.ref, i.kind, i.status) for i in sup.ledger.items]
        assert items == [("req", "brief", "in-flight")]
        brief = (sup.attempts.active[next(iter(sup.attempts.active))].attempt.brief).read_text()
        assert sup.ledger.items[0].tokens == budget.estimate_tokens(brief)
        sup.run_once(limit=30)
        assert sup.records["req"].status == "done"
        assert [(i.ref, i.kind, i.status) for i in sup.ledger.items] == [("req", "brief", "completed")]


def test_an_orchestrator_that_rewrites_its_brief_at_once_is_counted_for_the_brief_it_was_given(make_ws):
    """The brief lies in the attempt's folder, which the orchestrator's command may write. One
    that replaced it before the supervisor looked got its own text counted (a FIFO there
    would stall the loop): what was given is counted, never read back from that folder."""
    ws = team(make_ws, walt_command=sh('printf "%s" "$(head -c 200000 /dev/zero | tr "\\0" x)" > "$COORD_BRIEF"; '
                                       'touch "$COORD_BRIEF.done"; sleep 0.5'))
    drop(ws, "walt", "r.md", order_md("Plan the login work", id="req"))
    with Supervisor(ws) as sup:
        real_start = sup.spawner.start

        def start_then_lose_the_race(req):  # the command runs before the supervisor looks
            real_start(req)
            done = Path(req.env["COORD_BRIEF"] + ".done")
            wait_until(done.exists, "the orchestrator to rewrite its brief")

        sup.spawner.start = start_then_lose_the_race
        sup._intake_step()
        sup.step()
        act = sup.attempts.active[next(iter(sup.attempts.active))]
        given = runner.brief_text(act.order, 1, [])
        assert [(i.ref, i.kind) for i in sup.ledger.items] == [("req", "brief")]
        assert sup.ledger.items[0].tokens == budget.estimate_tokens(given) < 10_000
        sup.run_once(limit=30)


def test_an_orchestrators_output_that_only_mentions_a_refusal_is_no_artifact(make_ws):
    ws = team(make_ws, walt_command=sh("echo \"chip's report says: Permission denied was fixed in login\""))
    drop(ws, "walt", "r.md", order_md("Read the report", id="req"))
    run(ws)
    assert Store(ws.state).load("req").status == "done"
    assert [s for s in signals.load(ws.state) if s.kind == "artifact"] == []


def test_budget_commands_need_an_orchestrator(make_ws):
    from coordinator import control
    from coordinator.errors import UsageError

    ws = make_ws({"chip": {"role": "specialist", "command": sh("true")}})
    for action, args in (("budget-add", {"tokens": 10}), ("rotate", {"fresh": True})):
        with pytest.raises(UsageError, match="this team has no orchestrator"):
            control.submit(ws, action, args)
    assert not (ws.state / "orchestrator").exists()


def test_the_fresh_brief_names_blocked_and_halted_orders_that_wait_for_the_orchestrator(make_ws):
    """After `rotate --fresh` the brief listed neither a blocked order nor a halted one: the new
    orchestrator did not know they waited for its decision. Now each is named with why it
    stopped and how to go on."""
    ws = team(make_ws, chip={"role": "specialist", "max_failures": 1, "command": sh(
        'case "$COORD_ORDER_ID" in halts) printf "outcome: halt-with-note\\nsummary: the API key is missing\\n" '
        '> "$COORD_RESULT";; *) exit 3;; esac')})
    drop(ws, "chip", "f.md", order_md("Fix the login page", id="fails", sender="walt"))
    drop(ws, "chip", "h.md", order_md("Add the signup page", id="halts", sender="walt"))
    drop(ws, "chip", "u.md", order_md("The user's own order that fails", id="users"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        assert {sup.records[i].status for i in ("fails", "halts", "users")} == {"blocked", "halted"}
        sup.handle("rotate", {"fresh": True})
        sup.step_commit()
    brief = (ws.state / "orchestrator" / "brief.md").read_text()
    assert "- halts -> chip [halted]: Add the signup page; why: the API key is missing" in brief
    assert "- fails -> chip [blocked]: Fix the login page; why: failed 1 time(s); last: exited with code 3" in brief
    assert "`coordinator retry ID`" in brief
    assert "users" not in brief  # not the orchestrator's order


@pytest.mark.parametrize("fresh", [False, True])
def test_an_order_retried_after_a_rotation_dropped_it_is_counted_in_flight_again(make_ws, fresh):
    """`retry` after `rotate` (or `rotate --fresh`) re-ran the order, but the ledger had no item
    for it any more: the hot tokens left it out while it ran. Its text counts again, in flight."""
    ws = team(make_ws, chip={"role": "specialist", "command": sh("exit 1"), "max_failures": 1})
    drop(ws, "chip", "f.md", order_md("This fails once", id="fails", sender="walt"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        assert sup.records["fails"].status == "blocked"
        sup.handle("rotate", {"fresh": fresh})
        assert "fails" not in {i.ref for i in sup.ledger.items}
        before = sup.ledger.hot_tokens()
        sup.handle("retry", {"id": "fails"})
        sup.step_commit()
        text = orders.render(sup.store.load_order("fails"))
        assert [(i.ref, i.kind, i.status) for i in sup.ledger.items if i.ref == "fails"] == [
            ("fails", "order", "in-flight")]
        assert sup.ledger.hot_tokens() == before + budget.estimate_tokens(text)
        sup.handle("rotate", {"fresh": False})
        assert "fails" in {i.ref for i in sup.ledger.items}  # in flight: a rotation keeps it
    assert any(i["ref"] == "fails" and i["status"] == "in-flight" for i in ledger(ws)["items"])


def _llm_team(fake, chip_command, **top):
    walt = {"role": "orchestrator", "sends_to": ["chip"],
            "llm": {"base_url": fake.base_url, "model": "m", "api_key_env": "FAKE_KEY", "max_retries": 0,
                    "timeout": "10s"}}
    return {"walt": walt, "chip": {"role": "specialist", "writes": ["webapp/src/**"], "sends_to": ["rex"],
                                   "command": sh(chip_command), "max_parallel": 1},
            "rex": {"role": "specialist", "command": sh("echo rex: " + "reviewed " * 300)}}


def _kid(objective, **extra):
    return {"to": "chip", "objective": objective, "files": [],
            "acceptance": ["The work is done", "Nothing else changes", "The report says so"],
            "branching": [{"action": "halt-with-note", "when": "the work is already done"}], **extra}


@pytest.mark.parametrize("how", ["rotated before the review", "routed on to rex"])
def test_the_review_call_counts_the_reports_it_was_sent_that_the_ledger_does_not_hold(make_ws, monkeypatch, how):
    """The review of an orchestrator model's request subtracted from its reported usage every report
    it was sent, as if the ledger held them: one a rotation had dropped, or the report of the order
    a child was routed on to (delivered to the child's agent, never to the orchestrator), was counted
    nowhere, and the hot tokens were under what the model had just been sent."""
    from fakellm import FakeLLM

    monkeypatch.setenv("FAKE_KEY", "sk-test")
    with FakeLLM() as fake:
        if how == "routed on to rex":
            chip = "printf 'outcome: route-to\\nagent: rex\\nsummary: rex should look\\n' > \"$COORD_RESULT\""
            kids = [_kid("Look at the greeting",
                         branching=[{"action": "route-to", "agent": "rex", "when": "a review is needed"}])]
        else:
            chip = "sleep 0.3; echo chip: " + "implemented " * 300
            kids = [_kid("First piece of work"), _kid("Second piece of work")]
        ws = make_ws(_llm_team(fake, chip), orchestrator="walt",
                     budget={"ceiling": 100000, "bands": [50000, 100000, 150000]})
        fake.script(content=json.dumps({"summary": "chip works", "orders": kids}))
        fake.script(content=json.dumps({"summary": "All done.", "orders": []}))
        drop(ws, "walt", "req.md", order_md("The greeting is looked at", id="req"))
        with Supervisor(ws) as sup:
            if how == "rotated before the review":
                step_until(sup, lambda: "req" in sup.records and any(
                    sup.records[c].status == "done" for c in sup.records["req"].children), "the first child done")
                sup.handle("rotate", {})
                assert not [i for i in sup.ledger.items if i.kind == "report"]  # the first report is dropped
            step_until(sup, lambda: "req" in sup.records and sup.records["req"].status == "done", "the request done")
            hot = sup.ledger.hot_tokens()
            review = sup.records["req"].usage[-1]["usage"]
    # What the model was just sent, and answered, is all in the orchestrator's hot tokens.
    assert hot >= review["prompt_tokens"] + review["completion_tokens"]


def test_the_ledger_the_brief_and_signals_take_the_supervisors_clock(make_ws):
    """Ledger items, the fresh brief and signals were stamped with the machine's clock, not the
    clock the supervisor is given: its statuses and its budget told two different times."""
    import time
    from datetime import UTC, datetime

    base, started = datetime(2020, 6, 15, 12, 0, tzinfo=UTC).timestamp(), time.time()

    def clock():
        return base + time.time() - started

    ws = team(make_ws, chip={"role": "specialist", "command": sh("exit 1"), "max_failures": 1})
    drop(ws, "chip", "a.md", order_md("The export runs nightly", id="first", sender="walt"))
    with Supervisor(ws, clock=clock) as sup:
        sup.run_once(limit=30)
        drop(ws, "chip", "b.md", order_md("The export runs nightly", id="again", sender="walt"))
        sup.run_once(limit=30)
        sup.handle("budget-add", {"tokens": 5, "note": "a file read"})
        sup.handle("rotate", {"fresh": True})
        sup.step_commit()
        assert sup.records["again"].status == "rejected"
        history = sup.store.with_detail(sup.records["first"]).history
    assert history[-1]["at"].startswith("2020-06-15T12:0")
    assert all(i["added"].startswith("2020-06-15T12:0") for i in ledger(ws)["items"])
    archived = json.loads((ws.state / "orchestrator" / "generations" / "1.json").read_text())
    assert {i["added"][:15] for i in archived["items"]} == {"2020-06-15T12:0"}
    assert "Written 2020-06-15T12:0" in (ws.state / "orchestrator" / "brief.md").read_text()
    (feedback,) = [s for s in signals.load(ws.state) if s.kind == "feedback"]
    assert feedback.at.startswith("2020-06-15T12:0")


def test_retrying_an_order_that_waits_on_a_blocker_does_not_count_its_text_twice(make_ws):
    ws = team(make_ws, chip={"role": "specialist", "writes": ["webapp/src/**"], "command": sh(
        'printf "outcome: requeue-with-blocker\\nsummary: no API yet\\nblocker: the API decision\\n" '
        '> "$COORD_RESULT"')})
    drop(ws, "chip", "w.md", order_md("Use the new API", id="waits", sender="walt",
                                      branching=("requeue-with-blocker if the API is undecided",)))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        assert (sup.records["waits"].status, sup.records["waits"].blocker) == ("waiting", "the API decision")
        before = sup.ledger.hot_tokens()
        sup.handle("retry", {"id": "waits"})
        assert [(i.kind, i.status) for i in sup.ledger.items if i.ref == "waits"] == [("order", "in-flight")]
        assert sup.ledger.hot_tokens() == before


def test_an_order_that_waits_for_a_request_above_the_one_that_sent_it_is_blocked(make_ws, tmp_path):
    """walt's request sent chip `kid`, which chip routed back to walt: a request of its own, that
    sent `kid2`, waiting (blocked_by) for the first request. That one ends only after kid's
    route, which ends only after kid2: all three waited for ever, `running` and `waiting` after
    `supervise --once` said nothing was left to run. kid2 is blocked at once, saying why."""
    ws = make_ws({
        "walt": {"role": "orchestrator", "sends_to": ["chip"], "command": sh(
            'mkdir -p "$COORD_OUTBOX/chip"; if grep -q "Route me" "$COORD_BRIEF"; '
            'then cp "$PROBE/kid2.md" "$COORD_OUTBOX/chip/"; else cp "$PROBE/kid.md" "$COORD_OUTBOX/chip/"; fi; '
            'printf "outcome: done\\nsummary: delegated\\n" > "$COORD_RESULT"')},
        "chip": {"role": "specialist", "sends_to": ["walt"], "command": sh(
            'if grep -q "Route me" "$COORD_BRIEF"; then printf "outcome: route-to\\nagent: walt\\n'
            'summary: for walt\\n" > "$COORD_RESULT"; fi; echo done')},
    }, orchestrator="walt")
    (tmp_path / "probe" / "kid.md").write_text(order_md("Route me", id="kid", branching=("route-to-walt if walt decides",)))
    (tmp_path / "probe" / "kid2.md").write_text(order_md("The greeting is written", id="kid2", blocked_by=["req"]))
    drop(ws, "walt", "req.md", order_md("The team writes the greeting", id="req"))
    run(ws)
    recs = Store(ws.state).load_all()
    assert all(r.terminal for r in recs.values()), [(r.id, r.status) for r in recs.values()]
    assert recs["kid2"].status == "blocked", recs["kid2"].history
    assert "req" in recs["kid2"].report["summary"] and "wait for ever" in recs["kid2"].report["summary"]
    assert recs["req"].status == "blocked"
