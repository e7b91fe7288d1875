"""LLM agents end to end: the real supervisor talking to a real OpenAI-compatible server on loopback.

Issue 7's acceptance: a specialist model's edits land as its commit; fallback past a 429 and a
dead endpoint; broken replies re-asked; an orchestrator model decomposes a request, its children
run, its review becomes the report; usage in the budget and in `coordinator cost`; the key
nowhere; the spend limit stops calls; rotation shrinks what the orchestrator model is sent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import drop, order_md, sh, step_until, wait_until
from fakellm import FakeLLM, Response

from coordinator import costs, signals
from coordinator.cli import cli
from coordinator.conversation import meter_for
from coordinator.llmagent import ORCHESTRATOR_ROLE, SYNTHESIS_ROLE
from coordinator.store import Record, Store
from coordinator.supervisor import Supervisor

KEY = "sk-live-4f3e2d1c0b9a-DO-NOT-LEAK"
GREETING = "def greet(name: str) -> str:\n    return f\"Hello, {name}\"\n"
CHECKED = ("`grep -q Hello src/greeting.py` passes", "greet returns a greeting", "Nothing else changes")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLM]:
    monkeypatch.setenv("FAKE_KEY", KEY)
    with FakeLLM() as server:
        yield server


def llm(fake: FakeLLM, **extra: Any) -> dict[str, Any]:
    return {"base_url": fake.base_url, "model": "m", "api_key_env": "FAKE_KEY", "max_retries": 0,
            "timeout": "10s", **extra}


def coder(fake: FakeLLM, **extra: Any) -> dict[str, Any]:
    return {"role": "specialist", "writes": ["webapp/src/**"], "llm": llm(fake), **extra}


def reply(*edits: dict[str, Any], outcome: str = "done", summary: str = "Wrote the greeting.") -> str:
    return json.dumps({"outcome": outcome, "summary": summary, "edits": list(edits)})


def write(path: str, content: str = GREETING) -> dict[str, str]:
    return {"path": path, "content": content}


def run(ws: Any, lines: list[str] | None = None) -> None:
    with Supervisor(ws, log=(lines.append if lines is not None else None)) as sup:
        sup.run_once(limit=30)


def load(ws: Any, order_id: str) -> Record:
    return Store(ws.state).load(order_id)


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                          check=True).stdout

def kept_in(ws: Any, secret: str, *also: Path) -> list[str]:
    """Where `secret` was written: files under state/, .coordinator/ (and `also`), and state/'s
    git history (every commit's diff). Empty: nowhere a person or an agent could read it."""
    found = []
    for root in (ws.state, ws.runtime, *also):
        found += subprocess.run(["grep", "-rlaF", secret, str(root)], capture_output=True, text=True).stdout.splitlines()
    if secret in git(ws.state, "log", "-p", "--all"):
        found.append("state/ git history")
    return found



def user_message(body: dict[str, Any], index: int = 0) -> str:
    return [m["content"] for m in body["messages"] if m["role"] == "user"][index]


def last_user_message(body: dict[str, Any]) -> str:
    return [m["content"] for m in body["messages"] if m["role"] == "user"][-1]


def cost_json(ws: Any) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["-w", str(ws.root), "cost", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# -- specialists --------------------------------------------------------------------------------------


def test_a_specialist_models_edits_land_as_its_commit_with_trailers_and_checks_run(make_ws, fake):
    ws = make_ws({"chip": coder(fake)})
    fake.script(content=reply(write("webapp/src/greeting.py"),
                              write("webapp/src/login.py", "# rewritten\n")),
                usage={"prompt_tokens": 900, "completion_tokens": 60})
    drop(ws, "chip", "g.md", order_md("The app greets people by name", id="g", acceptance=CHECKED,
                                       files=("webapp/src/greeting.py", "webapp/src/login.py")))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "done", rec.report
    repo = ws.repos / "webapp"
    assert (repo / "src" / "greeting.py").read_text() == GREETING
    assert (repo / "src" / "login.py").read_text() == "# rewritten\n"
    log = git(repo, "log", "-1", "--format=%an <%ae>%n%s%n%b")
    assert log.startswith("chip <chip@agents.coordinator>\nThe app greets people by name")
    assert "Work-Order: g" in log and "Agent: chip" in log
    assert rec.report["checks"] == ["`grep -q Hello src/greeting.py` passed"]
    assert rec.report["summary"] == "Wrote the greeting."
    # The model saw the brief and the current text of the order's files, not the $COORD_RESULT how-to.
    (body,) = fake.chat_bodies()
    sent = user_message(body)
    assert "The app greets people by name" in sent
    assert "def password_problem" in sent and '<file path="webapp/src/greeting.py" missing="true"/>' in sent
    assert "COORD_RESULT" not in sent
    assert body["model"] == "m" and body["response_format"] == {"type": "json_object"}
    assert [(u["model"], u["usage"]["prompt_tokens"], u["agent"]) for u in rec.usage] == [("m", 900, "chip")]


def test_fallback_past_a_dead_endpoint_and_a_429_inside_a_supervised_order(make_ws, fake, dead_url):
    settings = llm(fake, base_url=dead_url, model="local", max_retries=1,
                   fallback=[{"model": "busy", "base_url": fake.base_url},
                             {"model": "backup", "base_url": fake.base_url,
                              "prices": {"input": 2.0, "output": 10.0}}])
    ws = make_ws({"chip": coder(fake, llm=settings)})
    for _ in range(2):  # "busy" answers 429 to the request and to its one retry
        fake.script(status=429, json={"error": {"message": "rate limited"}}, headers={"Retry-After": "0"})
    fake.script(content=reply(write("webapp/src/greeting.py")),
                usage={"prompt_tokens": 1000, "completion_tokens": 100})
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "done", rec.report
    assert (ws.repos / "webapp" / "src" / "greeting.py").read_text() == GREETING
    assert [b["model"] for b in fake.chat_bodies()] == ["busy", "busy", "backup"]
    calls = [(u["model"], u["status"]) for u in rec.usage]
    assert calls == [("local", None), ("local", None), ("busy", 429), ("busy", 429), ("backup", 200)]
    assert "cannot connect" in rec.usage[0]["error"] and "rate limited" in rec.usage[2]["error"]
    money = cost_json(ws)
    assert money["by_model"]["backup"] == {"calls": 1, "prompt_tokens": 1000, "completion_tokens": 100,
                                           "cost": pytest.approx(0.003)}
    assert money["by_model"]["local"]["calls"] == 2 and money["by_model"]["local"]["cost"] == 0
    assert money["by_agent"]["chip"]["calls"] == 5


def test_a_reply_that_is_not_json_is_sent_back_then_accepted(make_ws, fake):
    ws = make_ws({"chip": coder(fake)})
    fake.script(content="Sure! I changed the greeting for you.")
    fake.script(content=reply(write("webapp/src/greeting.py")))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    run(ws)

    assert load(ws, "g").status == "done"
    first, second = fake.chat_bodies()
    assert second["messages"][: len(first["messages"])] == first["messages"]
    assert "Sure! I changed" in second["messages"][-2]["content"]
    assert "the reply is not JSON" in last_user_message(second)
    assert load(ws, "g").attempts == 1


def test_edits_that_need_a_path_to_be_file_and_folder_go_back_to_the_model(make_ws, fake):
    ws = make_ws({"chip": coder(fake)})
    fake.script(content=reply(write("webapp/src/greeting.py"), write("webapp/src/greeting.py/x.py")))
    fake.script(content=reply(write("webapp/src/greeting.py")))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", acceptance=CHECKED,
                                       files=("webapp/src/**",)))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "done" and rec.attempts == 1 and rec.failures == []
    assert "which another edit writes as a file" in last_user_message(fake.chat_bodies()[1])


def test_an_edit_outside_the_files_ends_denied_with_each_path_and_a_scope_signal(make_ws, fake):
    # SPEC §7: a change outside the permission is denied, as the gate denies a command's.
    fake.script(content=reply(write("webapp/src/greeting.py"), write("webapp/tests/test_login.py", "hacked\n"),
                              {"path": "webapp/README.md", "delete": True}))
    ws = make_ws({"chip": coder(fake, writes=["webapp/**"], max_failures=2)})
    head = git(ws.repos / "webapp", "rev-parse", "main")
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "denied" and rec.attempts == 1
    assert len(fake.chat_bodies()) == 1  # a well-formed path is not argued about: it is denied
    assert rec.report["offending"] == [
        "webapp/tests/test_login.py: modified (asked for by the model; not applied) — outside the order's files",
        "webapp/README.md: deleted (asked for by the model; not applied) — outside the order's files"]
    scope = [s for s in signals.load(ws.state) if s.kind == "scope"]
    assert len(scope) == 1 and scope[0].agent == "chip" and scope[0].order == "g"
    assert "tests/test_login.py" in scope[0].evidence
    assert git(ws.repos / "webapp", "rev-parse", "main") == head
    assert "hacked" not in (ws.repos / "webapp" / "tests" / "test_login.py").read_text()
    assert not (ws.repos / "webapp" / "src" / "greeting.py").exists()  # nothing of it applied


def test_an_edit_of_another_repository_is_still_sent_back(make_ws, fake):
    fake.script(content=reply(write("other/src/x.py")))
    fake.script(content=reply(write("webapp/src/greeting.py")))
    ws = make_ws({"chip": coder(fake)})
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    run(ws)
    assert load(ws, "g").status == "done"
    assert "outside what this order may write" in last_user_message(fake.chat_bodies()[1])


def test_parallel_attempts_of_one_agent_each_count_only_their_own_calls(make_ws, fake):
    ws = make_ws({"chip": coder(fake, max_parallel=2, llm=llm(fake, prices={"input": 10.0, "output": 0.0}))})
    # Both calls are in flight at once: neither attempt may count the other's.
    fake.responder = lambda body: Response(content=reply(), delay=0.3,
                                           usage={"prompt_tokens": 1000, "completion_tokens": 1})
    drop(ws, "chip", "a.md", order_md("Order a is handled", id="a"))
    drop(ws, "chip", "b.md", order_md("Order b is handled", id="b"))
    run(ws)

    assert [len(load(ws, o).usage) for o in ("a", "b")] == [1, 1]
    assert cost_json(ws)["total"] == {"calls": 2, "prompt_tokens": 2000, "completion_tokens": 2,
                                      "cost": pytest.approx(0.02)}


def test_an_order_cancelled_while_its_model_thinks_lands_nothing_but_its_call_is_counted(make_ws, fake):
    ws = make_ws({"chip": coder(fake)})
    fake.script(content=reply(write("webapp/src/greeting.py")), delay=0.5)
    head = git(ws.repos / "webapp", "rev-parse", "main")
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    with Supervisor(ws) as sup:
        for _ in range(10_000):
            if "g" in sup.records and sup.records["g"].status == "running":
                break
            sup.step()
        wait_until(lambda: len(fake.requests) == 1, "the model to be asked")
        sup.handle("cancel", {"id": "g"})
        sup.run_once(limit=30)

    rec = load(ws, "g")
    assert rec.status == "cancelled"
    assert git(ws.repos / "webapp", "rev-parse", "main") == head
    assert not (ws.repos / "webapp" / "src" / "greeting.py").exists()
    assert [(u["status"], u["error"]) for u in rec.usage] == [(None, "cancelled")]  # asked, then let go


def test_each_model_call_is_in_the_log_as_it_is_made_and_once(make_ws, fake):
    # The log was written when the conversation ended: a model re-asked for minutes showed
    # an empty output.log all that time.
    ws = make_ws({"chip": coder(fake)})
    fake.script(content="Thinking aloud, no JSON.", usage={"prompt_tokens": 300, "completion_tokens": 40})
    fake.script(content=reply(), delay=1.0, usage={"prompt_tokens": 400, "completion_tokens": 20})
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g"))
    log = ws.runtime / "logs" / "g" / "1" / "output.log"
    with Supervisor(ws) as sup:
        step_until(sup, lambda: len(fake.requests) == 2, "the re-ask to be under way")
        assert sup.records["g"].status == "running"
        assert log.read_text().splitlines()[0].startswith(f"model call m at {fake.base_url}: HTTP 200, 300+40 tokens")
        sup.run_once(limit=30)

    assert load(ws, "g").status == "done"
    lines = log.read_text().splitlines()
    assert [line.split(",")[1] for line in lines if line.startswith("model call")] == [" 300+40 tokens",
                                                                                      " 400+20 tokens"]
    assert lines[2] == "--- reply 1 (specialist)"


# -- the orchestrator ---------------------------------------------------------------------------------


def child(to: str, objective: str, *, files: list[str], acceptance: list[str] | None = None) -> dict[str, Any]:
    return {"to": to, "objective": objective, "files": files,
            "acceptance": acceptance or ["The work is done", "Nothing else changes", "The report says so"],
            "branching": [{"action": "halt-with-note", "when": "the work is already done"}]}


def team(fake: FakeLLM, **walt: Any) -> dict[str, Any]:
    return {
        "walt": {"role": "orchestrator", "sends_to": ["chip", "rex"], "llm": llm(fake), **walt},
        "chip": {"role": "specialist", "writes": ["webapp/src/**"], "description": "Writes Python code",
                 "command": sh(f"printf '{GREETING}' > src/greeting.py && echo greeting written")},
        "rex": {"role": "specialist", "description": "Reviews changes; writes nothing",
                "command": sh("echo looks good to rex")},
    }


def test_an_orchestrator_model_decomposes_a_request_its_children_run_and_its_review_is_the_report(
        make_ws, fake):
    ws = make_ws(team(fake), orchestrator="walt",
                 budget={"ceiling": 100000, "bands": [50000, 100000, 150000]})
    invalid = child("chip", "Write the greeting", files=["webapp/src/greeting.py"], acceptance=["only one"])
    code = child("chip", "Write the greeting", files=["webapp/src/greeting.py"],
                 acceptance=list(CHECKED))
    review = child("rex", "Review the greeting", files=[])
    fake.script(content=json.dumps({"summary": "chip writes, rex reviews", "orders": [invalid, review]}))
    fake.script(content=json.dumps({"summary": "chip writes, rex reviews", "orders": [code, review]}),
                usage={"prompt_tokens": 1500, "completion_tokens": 200})
    fake.script(content=json.dumps({"summary": "The greeting shipped and rex approved it.", "orders": []}),
                usage={"prompt_tokens": 2500, "completion_tokens": 40})
    drop(ws, "walt", "req.md", order_md("The app greets people by name", id="req",
                                         files=("webapp/src/**",)))
    run(ws)

    rec = load(ws, "req")
    assert rec.status == "done", rec.report
    assert rec.report["summary"] == "The greeting shipped and rex approved it."
    assert "The greeting shipped" in (ws.state / "orders" / "req" / "report.md").read_text()
    kids = [load(ws, c) for c in rec.children]
    assert [(k.to, k.sender, k.parent, k.status) for k in kids] == [
        ("chip", "walt", "req", "done"), ("rex", "walt", "req", "done")]
    assert (ws.repos / "webapp" / "src" / "greeting.py").read_text() == GREETING
    assert kids[0].report["checks"] == ["`grep -q Hello src/greeting.py` passed"]

    plan, again, synthesis = fake.chat_bodies()
    assert ORCHESTRATOR_ROLE in plan["messages"][0]["content"]
    assert "- chip | writes: webapp/src/** | routes to: none | Writes Python code" in user_message(plan)
    assert "orders.0 (to chip): acceptance" in last_user_message(again)
    assert SYNTHESIS_ROLE in synthesis["messages"][0]["content"]
    assert "greeting written" in user_message(synthesis) and "looks good to rex" in user_message(synthesis)

    # Usage lands with the request (for `cost`) and in the orchestrator's budget.
    assert [u["usage"]["prompt_tokens"] for u in rec.usage][-1] == 2500
    assert cost_json(ws)["by_agent"]["walt"]["calls"] == 3
    ledger = json.loads((ws.state / "orchestrator" / "ledger.json").read_text())
    used = [i for i in ledger["items"] if i["ref"] == "req" and i["source"] == "usage"]
    assert len(used) == 1 and used[0]["status"] == "completed"
    assert 40 <= used[0]["tokens"] <= 2540  # the reported conversation, less what the ledger holds
    assert {(i["ref"], i["kind"]) for i in ledger["items"]} >= {(kids[0].id, "order"), (kids[0].id, "report")}


def test_a_planned_order_may_wait_on_another_of_its_plan_and_runs_after_it(make_ws, fake):
    ws = make_ws(team(fake), orchestrator="walt")
    review = dict(child("rex", "Review the greeting", files=[]), blocked_by=["greet"])
    code = dict(child("chip", "Write the greeting", files=["webapp/src/greeting.py"]), id="greet")
    unknown = dict(child("rex", "Review the rest", files=[]), blocked_by=["nowhere"])
    fake.script(content=json.dumps({"summary": "review first?", "orders": [review, code, unknown]}))
    fake.script(content=json.dumps({"summary": "rex reviews after chip", "orders": [review, code]}))
    fake.script(content=json.dumps({"summary": "Written, then reviewed.", "orders": []}))
    drop(ws, "walt", "req.md", order_md("The app greets people", id="req", files=("webapp/src/**",)))
    run(ws)

    rec = load(ws, "req")
    assert rec.status == "done", rec.report
    assert "orders.2 (to rex): blocked_by.0: no order 'nowhere'" in last_user_message(fake.chat_bodies()[1])
    kids = {load(ws, c).to: load(ws, c) for c in rec.children}
    assert kids["rex"].blocked_by == [kids["chip"].id] != ["greet"]  # the name was the plan's own
    assert kids["chip"].status == kids["rex"].status == "done"
    done_at = next(h["at"] for h in kids["chip"].history if h["to"] == "done")
    started_at = next(h["at"] for h in kids["rex"].history if h["to"] == "running")
    assert [h["to"] for h in kids["rex"].history][0] == "waiting" and started_at >= done_at

    # The next plan may use the same name: it names an order of that plan, not the old one.
    fake.script(content=json.dumps({"summary": "again", "orders": [review, code]}))
    fake.script(content=json.dumps({"summary": "Again written, then reviewed.", "orders": []}))
    drop(ws, "walt", "req2.md", order_md("The app greets people again", id="req2", files=("webapp/src/**",)))
    run(ws)
    again = load(ws, "req2")
    assert again.status == "done" and len(fake.chat_bodies()) == 5  # no re-ask for the reused name
    kids2 = {load(ws, c).to: load(ws, c) for c in again.children}
    assert kids2["rex"].blocked_by == [kids2["chip"].id] and kids2["chip"].id != kids["chip"].id


def test_the_orders_an_urgent_requests_plan_files_are_urgent_and_run_before_normal_work(make_ws, fake):
    """A plan's orders were filed `normal` whatever the request's priority: an urgent request's
    work waited behind every normal order of the agent. Now they take the request's priority,
    unless the plan gives one of its own."""
    from bench.harness import probe_of

    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "llm": llm(fake)},
                  "chip": {"role": "specialist", "max_parallel": 1,
                           "command": sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran"; sleep 0.25')}},
                 orchestrator="walt")
    fake.script(content=json.dumps({"summary": "chip fixes it", "orders": [
        child("chip", "Stop the outage", files=[]),
        dict(child("chip", "Tidy up after the outage", files=[]), priority="low")]}))
    fake.script(content=json.dumps({"summary": "The outage is over.", "orders": []}))
    for n in range(1, 4):
        drop(ws, "chip", f"n{n}.md", order_md(f"Routine work number {n}", id=f"n{n}"))
    drop(ws, "walt", "req.md", order_md("The outage ends now", id="req", priority="urgent"))
    run(ws)

    rec = load(ws, "req")
    assert rec.status == "done", rec.report
    urgent, tidy = rec.children
    store = Store(ws.state)
    assert store.load_order(urgent).priority == "urgent" and store.load_order(tidy).priority == "low"
    ran = (probe_of(ws) / "ran").read_text().split()
    assert sorted(ran) == sorted(["n1", "n2", "n3", urgent, tidy]), ran
    assert ran.index(urgent) < ran.index("n3") and ran[-1] == tidy, ran


def test_a_finished_requests_summary_stays_in_the_orchestrators_context(make_ws, fake):
    ws = make_ws(team(fake), orchestrator="walt")
    fake.script(content=json.dumps({"summary": "Nothing to send: the greeting exists.", "orders": []}))
    drop(ws, "walt", "r1.md", order_md("The app greets people", id="r1"))
    run(ws)
    fake.script(content=json.dumps({"summary": "Nothing here either.", "orders": []}))
    drop(ws, "walt", "r2.md", order_md("The app says goodbye", id="r2"))
    run(ws)  # a new supervisor: r1 ended before it started, so only its file holds the report
    assert load(ws, "r2").status == "done"
    context = user_message(fake.chat_bodies()[-1])
    assert "request r1 [done]: The app greets people -> Nothing to send: the greeting exists." in context


def test_a_request_cancelled_while_its_model_is_re_asked_leaves_nothing_rotation_cannot_drop(make_ws, fake):
    # Once its conversation came in after the cancel, in flight for good: `coordinator rotate`
    # dropped nothing and the 3,500 tokens of a cancelled request stayed in the budget.
    ws = make_ws(team(fake), orchestrator="walt")
    fake.script(content="Let me think first. Not JSON.", usage={"prompt_tokens": 3000, "completion_tokens": 500})
    fake.script(content=json.dumps({"summary": "Nothing to send.", "orders": []}), delay=5)
    drop(ws, "walt", "req.md", order_md("The app greets people", id="req"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: len(fake.requests) == 2, "the re-ask to be under way")
        sup.handle("cancel", {"id": "req"})
        sup.run_once(limit=30)
        assert sup.records["req"].status == "cancelled"
        held = [i for i in sup.ledger.items if i.ref == "req"]
        assert [(i.tokens, i.status) for i in held] == [(3500, "completed")]
        sup.handle("rotate", {})
        assert sup.ledger.hot_tokens() == 0


def test_an_orchestrator_context_too_large_for_its_model_says_to_rotate(make_ws, fake):
    # Once only "check the endpoints or add a fallback model": the endpoint was fine, the
    # context the supervisor builds from the ledger had outgrown the model.
    ws = make_ws(team(fake), orchestrator="walt")
    full = {"error": {"message": "This model's maximum context length is 8192 tokens. However, your "
                                 "messages resulted in 9120 tokens.", "code": "context_length_exceeded"}}
    fake.responder = lambda body: Response(status=400, json=full)
    drop(ws, "walt", "req.md", order_md("The app greets people", id="req"))
    run(ws)

    rec = load(ws, "req")
    assert rec.status == "blocked"
    assert "too large for this model: `coordinator rotate --fresh` shrinks it" in rec.report["summary"]
    assert "a lower budget.ceiling (now 7,000) keeps it small" in rec.failures[0]


def test_a_specialists_files_too_large_for_its_model_say_so(make_ws, fake):
    # Once only "check the endpoints or add a fallback model", each attempt failing the same way:
    # the endpoint was fine, the order's files were more than the model's context holds.
    ws = make_ws({"chip": coder(fake, max_failures=1)})
    full = {"error": {"message": "This model's maximum context length is 8192 tokens. However, your "
                                 "messages resulted in 9120 tokens.", "code": "context_length_exceeded"}}
    fake.responder = lambda body: Response(status=400, json=full)
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "blocked"
    assert "too large for this model's context: name fewer or smaller files" in rec.report["summary"]


def test_a_failed_review_is_asked_again_without_redoing_the_work(make_ws, fake):
    ws = make_ws(team(fake), orchestrator="walt")
    fake.script(content=json.dumps({"summary": "rex reviews", "orders": [child("rex", "Review it", files=[])]}))
    for _ in range(3):  # the review and both re-asks are not JSON: that review fails
        fake.script(content="All good, nothing more to do.")
    fake.script(content=json.dumps({"summary": "Reviewed: all good.", "orders": []}))
    drop(ws, "walt", "req.md", order_md("The code is reviewed", id="req"))
    run(ws)

    rec = load(ws, "req")
    assert rec.status == "done" and rec.report["summary"] == "Reviewed: all good."
    assert len(rec.children) == 1 and rec.attempts == 1
    assert "broke the contract 3 times" in rec.failures[0]
    roles = [SYNTHESIS_ROLE in b["messages"][0]["content"] for b in fake.chat_bodies()]
    assert roles == [False, True, True, True, True]  # one plan, two reviews: the work was not redone


def test_a_model_that_keeps_sending_orders_is_stopped_after_a_few_rounds(make_ws, fake):
    rounds = iter(range(100))
    fake.responder = lambda body: Response(content=json.dumps(
        {"summary": "one more pass", "orders": [child("rex", f"Review pass {next(rounds)}", files=[])]}))
    ws = make_ws(team(fake), orchestrator="walt")
    drop(ws, "walt", "req.md", order_md("The code is reviewed", id="req"))
    run(ws)

    rec = load(ws, "req")
    assert rec.status == "blocked" and "after 4 rounds" in rec.report["summary"]
    assert [load(ws, c).status for c in rec.children] == ["done"] * 4
    assert len(fake.chat_bodies()) == 5


def test_rotation_shrinks_what_the_orchestrator_model_is_sent(make_ws, fake):
    ws = make_ws(team(fake), orchestrator="walt",
                 budget={"ceiling": 100000, "bands": [50000, 100000, 150000]})
    for rid in ("ra", "rb"):
        drop(ws, "walt", f"{rid}.md", order_md(f"Request {rid} is handled", id=rid,
                                                files=("webapp/src/**",)))
        run(ws)
    with Supervisor(ws) as sup:
        before = sup.ledger.hot_tokens()
        sup.handle("rotate", {})
        after = sup.ledger.hot_tokens()
    drop(ws, "walt", "rc.md", order_md("Request rc is handled", id="rc", files=("webapp/src/**",)))
    run(ws)

    assert [load(ws, r).status for r in ("ra", "rb", "rc")] == ["done"] * 3
    plans = [b for b in fake.chat_bodies() if ORCHESTRATOR_ROLE in b["messages"][0]["content"]]
    assert len(plans) == 3
    _, b_plan, c_plan = (user_message(p) for p in plans)
    first_child = load(ws, "ra").children[0]
    assert f"Report on {first_child}" in b_plan  # ra's work sat in the context of rb
    assert "Report on" not in c_plan
    assert len(c_plan) < len(b_plan)
    assert after < before


def test_a_hand_edited_brief_that_is_not_utf8_does_not_stop_the_supervisor(make_ws, fake):
    # Once "internal error: UnicodeDecodeError" and the supervisor was gone, its request running.
    ws = make_ws(team(fake), orchestrator="walt")
    with Supervisor(ws) as sup:
        sup.handle("rotate", {"fresh": True})  # generation 2 starts from state/orchestrator/brief.md
    fake.script(content=json.dumps({"summary": "Nothing to send.", "orders": []}))
    drop(ws, "walt", "req.md", order_md("The app greets people", id="req"))
    with Supervisor(ws) as sup:
        (ws.state / "orchestrator" / "brief.md").write_bytes(b"# Brief\n\xff\xfe written by hand\n")
        sup.run_once(limit=30)

    assert load(ws, "req").status == "done"
    assert "\ufffd\ufffd written by hand" in user_message(fake.chat_bodies()[0])

    # A huge one is cut, never read whole into the prompt.
    fake.script(content=json.dumps({"summary": "Nothing to send.", "orders": []}))
    drop(ws, "walt", "req2.md", order_md("The app greets people again", id="req2"))
    with Supervisor(ws) as sup:
        (ws.state / "orchestrator" / "brief.md").write_text("in flight: many things\n" * 200_000)
        sup.run_once(limit=30)
    assert load(ws, "req2").status == "done"
    sent = user_message(fake.chat_bodies()[-1])
    assert "… (cut at 1,048,576 bytes)" in sent and len(sent) < 1_100_000


def test_a_damaged_record_of_an_ended_request_does_not_stop_the_supervisor(make_ws, fake):
    # Its summary is quoted in the orchestrator's context: once "state/orders/r1/record.json is
    # not an order record" ended the supervisor itself, the next request left running.
    ws = make_ws(team(fake), orchestrator="walt")
    for n in (1, 2):
        fake.script(content=json.dumps({"summary": f"Nothing to send for r{n}.", "orders": []}))
    drop(ws, "walt", "r1.md", order_md("The app greets people", id="r1"))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("r1") is not None and sup.records["r1"].status == "done",
                   "r1 to end")
        (ws.state / "orders" / "r1" / "record.json").write_text('{"id": "r1", "bro')
        drop(ws, "walt", "r2.md", order_md("The app says goodbye", id="r2"))
        sup.run_once(limit=30)
        assert sup.records["r2"].status == "done"
    assert "request r1 [done]: The app greets people" in user_message(fake.chat_bodies()[-1])


# -- money and secrets ----------------------------------------------------------------------------------


def test_the_api_key_is_sent_but_appears_nowhere_in_state_runtime_or_logs(make_ws, fake, caplog):
    caplog.set_level(logging.DEBUG)
    ws = make_ws({"chip": coder(fake, llm=llm(fake, fallback=["second"])),
                  "rex": coder(fake, llm=llm(fake, model="locked"))})

    def respond(body: dict[str, Any]) -> Response:
        # A hostile or careless server echoes the key in its errors; none of it may be kept.
        if body["model"] == "m":
            return Response(status=429, json={"error": {"message": f"slow down, {KEY}"}})
        if body["model"] == "locked":
            return Response(status=401, json={"error": {"message": f"invalid key {KEY}"}})
        return Response(content=reply(write("webapp/src/greeting.py")))

    fake.responder = respond
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    drop(ws, "rex", "r.md", order_md("The app greets loudly", id="r", files=("webapp/src/**",)))
    lines: list[str] = []
    run(ws, lines)

    assert load(ws, "g").status == "done"
    locked = load(ws, "r")
    assert locked.status == "blocked" and locked.attempts == 1  # a bad key is not retried
    assert "HTTP 401" in locked.report["summary"] and "FAKE_KEY" in locked.report["summary"]
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    assert kept_in(ws, KEY) == []
    assert lines and not any(KEY in line for line in lines)
    assert not any(KEY in m for m in caplog.messages)


def test_a_password_in_the_base_url_is_sent_but_never_kept_nor_shown_to_the_model(make_ws, fake, caplog):
    # Once: the URL was written as is into each call's record and failure (state/, its git
    # history), the attempt's log and the next attempt's brief, which goes to the model.
    secret = "hunter2-proxy-pass"
    url = fake.base_url.replace("http://", f"http://proxyuser:{secret}@")
    ws = make_ws({"chip": coder(fake, llm=llm(fake, base_url=url))})
    fake.script(status=500, json={"error": {"message": f"upstream said no to proxyuser:{secret}"}})
    fake.script(content=reply(write("webapp/src/greeting.py")))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    lines: list[str] = []
    run(ws, lines)

    rec = load(ws, "g")
    assert rec.status == "done" and rec.attempts == 2
    assert fake.requests[0].headers["authorization"].startswith("Basic ")
    assert "m at http://***@127.0.0.1:" in rec.failures[0]
    assert kept_in(ws, secret) == []
    assert not any(secret in text for text in [*lines, *caplog.messages, json.dumps(fake.chat_bodies())])


@pytest.mark.parametrize("folder", ["webapp/src", "webapp"])
def test_a_folder_in_the_orders_files_sends_the_model_the_files_in_it(make_ws, fake, folder):
    # Once: files: [webapp/src] (a folder covers what lies under it) sent the model
    # <file path="webapp/src" missing="true"/> and none of the folder's files; files: [webapp]
    # (the whole repository) sent <file path="webapp/." missing="true"/>.
    ws = make_ws({"chip": coder(fake, writes=["webapp/**"])})
    fake.script(content=reply(write("webapp/src/greeting.py")))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=(folder,)))
    run(ws)

    assert load(ws, "g").status == "done"
    sent = user_message(fake.chat_bodies()[0])
    assert '<file path="webapp/src/login.py">' in sent and "def password_problem" in sent
    assert "missing" not in sent
    assert (ws.repos / "webapp" / "src" / "greeting.py").read_text() == GREETING


def test_a_symbolic_link_in_the_orders_files_is_said_to_be_one_not_missing(make_ws, fake):
    # Once: <file path="webapp/src/auth.py" missing="true"/>, so the model wrote it anew and
    # was refused for writing through a link it had never been told of, three times.
    ws = make_ws({"chip": coder(fake)})
    repo = ws.repos / "webapp"
    os.symlink("login.py", repo / "src" / "auth.py")
    git(repo, "add", "src/auth.py")
    git(repo, "-c", "user.name=u", "-c", "user.email=u@example.invalid", "commit", "-qm", "auth is login")
    fake.script(content=reply(outcome="halt-with-note", summary="src/auth.py is a link to login.py."))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/auth.py",)))
    run(ws)

    assert load(ws, "g").status == "halted"
    sent = user_message(fake.chat_bodies()[0])
    assert '<file path="webapp/src/auth.py" omitted="true" note="not sent: it is a symbolic link;' in sent
    assert "missing" not in sent


def test_a_key_in_the_base_urls_query_is_sent_but_never_kept_nor_shown(make_ws, fake, caplog):
    # Once: a gateway's ?api-key=... was written as is into each call's record and failure
    # (state/, its git history), the attempt's log and journal, and the next attempt's brief.
    secret = "gw-query-secret-77aa"
    url = f"{fake.base_url}?api-version=2024-06-01&api-key={secret}"
    ws = make_ws({"chip": coder(fake, llm=llm(fake, base_url=url, api_key_env=None))})
    fake.script(status=500, json={"error": {"message": f"upstream refused {url}"}})
    fake.script(content=reply(write("webapp/src/greeting.py")))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    lines: list[str] = []
    run(ws, lines)

    rec = load(ws, "g")
    assert rec.status == "done" and rec.attempts == 2
    assert fake.requests[0].path == f"/v1/chat/completions?api-version=2024-06-01&api-key={secret}"
    assert "/v1?api-version=***&api-key=***: HTTP 500" in rec.failures[0]
    assert kept_in(ws, secret) == []
    assert not any(secret in text for text in [*lines, *caplog.messages, json.dumps(fake.chat_bodies())])


def test_calls_of_an_attempt_a_stop_cut_off_are_recorded_once_and_not_called_a_crash(make_ws, fake):
    # The model's calls of an attempt the supervisor's own stop cut off are recorded at the next
    # start from the attempt's journal: once each, and said as after a stop (it was said "after a
    # crash", for a Ctrl-C).
    ws = make_ws({"chip": coder(fake, llm=llm(fake, prices={"input": 1.0, "output": 1.0}))})
    fake.script(content="not JSON at all", usage={"prompt_tokens": 1000, "completion_tokens": 10})
    fake.script(content=reply(), delay=30)  # still thinking when the supervisor stops
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: len(fake.requests) >= 2, "the model to be asked again")
    lines: list[str] = []
    run(ws, lines)

    rec = load(ws, "g")
    assert rec.status == "done" and rec.failures == []
    answered = [u for u in rec.usage if u["attempt"] == 1 and u["status"] == 200]
    assert [u["usage"]["prompt_tokens"] for u in answered] == [1000]
    assert len({u["call"] for u in rec.usage}) == len(rec.usage)
    assert any("model call(s) of attempt 1 recorded after the supervisor stopped" in line for line in lines), lines
    assert not any("after a crash" in line for line in lines)
    assert cost_json(ws)["total"]["calls"] == len(rec.usage)


def test_a_reply_that_echoes_the_key_is_sent_back_and_never_kept(make_ws, fake):
    # A hostile endpoint has the key (it was sent to it) and writes it into the reply: into the
    # summary (the report, in state/), an edit (a commit), or escaped so no text search finds it.
    ws = make_ws({"chip": coder(fake, max_failures=1)})
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY)
    fake.script(content=reply(write("webapp/src/greeting.py"), summary=f"Wrote it with {KEY}"))
    fake.script(content=reply(write("webapp/src/greeting.py", f"KEY = '{KEY}'\n")))
    fake.script(content=reply(write("webapp/src/greeting.py")).replace("Wrote the greeting.", escaped))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "blocked" and "holds the API key" in rec.failures[0]
    assert kept_in(ws, KEY, ws.repos) == []
    # Nor is it sent back in the re-asks (which a fallback on another host could receive).
    assert all(KEY not in json.dumps(body) for body in fake.chat_bodies())


def test_a_placeholder_key_a_reply_may_say_as_a_word_does_not_refuse_it(make_ws, fake, monkeypatch):
    """A local server's key is often a placeholder ("ollama"): a reply naming the program is no leak."""
    monkeypatch.setenv("FAKE_KEY", "ollama")
    ws = make_ws({"chip": coder(fake)})
    fake.script(content=reply(write("webapp/src/greeting.py", "# served by ollama\n" + GREETING),
                              summary="Wrote the greeting; ollama served the model."))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    run(ws)
    rec = load(ws, "g")
    assert (rec.status, rec.report["summary"]) == ("done", "Wrote the greeting; ollama served the model.")


def test_the_spend_limits_stop_further_calls_with_a_status_naming_the_limit(make_ws, fake):
    priced = {"prices": {"input": 1000.0, "output": 0.0}}  # 100 prompt tokens cost $0.10
    ws = make_ws({"chip": coder(fake, llm=llm(fake, **priced), spend_limit=0.05),
                  "rex": coder(fake, llm=llm(fake, **priced))},
                 spend_limit=0.15, max_parallel=1)
    fake.responder = lambda body: Response(content=reply(), usage={"prompt_tokens": 100, "completion_tokens": 5})
    for n, (agent, oid) in enumerate((("chip", "c1"), ("chip", "c2"), ("rex", "r1"), ("rex", "r2"))):
        drop(ws, agent, f"{n}-{oid}.md", order_md(f"Order {oid} is handled", id=oid))
        run(ws)

    statuses = {o: load(ws, o).status for o in ("c1", "c2", "r1", "r2")}
    assert statuses == {"c1": "done", "c2": "blocked", "r1": "done", "r2": "blocked"}
    assert len(fake.chat_bodies()) == 2  # c1 and r1: nothing was sent once a limit was reached
    assert "spend limit reached" in load(ws, "c2").report["summary"]
    assert "agents.chip.spend_limit" in load(ws, "c2").report["summary"]
    assert "the workspace has spent $0.2000 of its $0.15" in load(ws, "r2").report["summary"]
    assert load(ws, "c2").usage == [] and load(ws, "c2").attempts == 1

    # No retry gets past the breaker.
    with Supervisor(ws) as sup:
        sup.handle("retry", {"id": "c2"})
        sup.run_once(limit=30)
    assert load(ws, "c2").status == "blocked" and len(fake.chat_bodies()) == 2
    assert cost_json(ws)["total"]["cost"] == pytest.approx(0.2)


def test_cost_adds_up_thousands_of_cheap_calls_to_what_the_spend_limit_counts(make_ws):
    # Once rounded to six places at every call: 2,000 calls of $0.0000005 summed to $0.0000,
    # and 2,000 of $0.0005104 to $1.0200 while the spend limit counted $1.0208.
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"], "command": sh("true")}})
    store = Store(ws.state)
    for n, (model, cost) in enumerate((("tiny", 0.0000005), ("small", 0.0005104))):
        store.folder(f"o{n}").mkdir(parents=True)
        calls = [{"model": model, "agent": "chip", "status": 200, "error": None, "cost": cost,
                  "usage": {"prompt_tokens": 30, "completion_tokens": 10}} for _ in range(2000)]
        store.save(Record(id=f"o{n}", to="chip", sender="user", status="done", objective="cheap calls",
                          created="2026-01-01T00:00:00.000Z", updated="2026-01-01T00:00:00.000Z", seq=n,
                          usage=calls))
    money = cost_json(ws)
    assert money["by_model"]["tiny"]["cost"] == pytest.approx(0.001)
    assert money["by_model"]["small"]["cost"] == pytest.approx(1.0208)
    assert money["total"]["cost"] == pytest.approx(1.0218)
    assert costs.spent(store.load_all().values()) == pytest.approx(money["total"]["cost"], abs=1e-6)
    shown = CliRunner().invoke(cli, ["-w", str(ws.root), "cost"]).output
    assert "  tiny                   2000     60,000      20,000     0.0010" in shown
    assert shown.splitlines()[-1].endswith("1.0218")


def test_cost_keeps_its_columns_under_their_headings_with_a_long_model_name(make_ws, fake):
    # An OpenRouter name pushed its row's figures right of their headings.
    ws = make_ws({"chip": coder(fake, llm=llm(fake, model="anthropic/claude-sonnet-4.5"))})
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g"))
    run(ws)
    shown = CliRunner().invoke(cli, ["-w", str(ws.root), "cost"]).output.splitlines()
    header, rows = shown[0], [line for line in shown if line[-1].isdigit()]
    assert any("anthropic/claude-sonnet-4.5" in row for row in rows) and len(rows) == 3
    for row in rows:  # each figure ends where its heading ends
        assert len(row) == len(header), shown
        assert row[:header.index("calls") + 5].endswith("1")


def test_cost_says_which_recorded_call_it_cannot_read_and_counts_the_rest(make_ws, fake):
    # A record edited by hand ("cost": "abc", a usage that is a list) was an internal error.
    ws = make_ws({"chip": coder(fake), "rex": coder(fake)})
    fake.responder = lambda body: Response(content=reply(), usage={"prompt_tokens": 100, "completion_tokens": 5})
    drop(ws, "chip", "a.md", order_md("Order a is handled", id="a"))
    drop(ws, "rex", "b.md", order_md("Order b is handled", id="b"))
    run(ws)
    path = ws.state / "orders" / "a" / "record.json"
    data = json.loads(path.read_text())
    data["usage"] = [{**data["usage"][0], "cost": "abc"}, {**data["usage"][0], "usage": [1]}]
    path.write_text(json.dumps(data))

    result = CliRunner().invoke(cli, ["-w", str(ws.root), "cost", "--json"])
    assert result.exit_code == 0, result.output
    money = json.loads(result.stdout)
    assert money["total"]["calls"] == 1 and money["by_agent"]["rex"]["prompt_tokens"] == 100
    warned = result.stderr.splitlines()
    assert len(warned) == 2 and warned[0].startswith(
        "warning: state/orders/a/record.json: usage.0 is not a model call as recorded")
    assert "git -C state checkout orders/a/record.json" in warned[0]
    with Supervisor(ws) as sup:  # the spend meter reads them too: the supervisor starts
        assert meter_for(sup.attempts).spent() == pytest.approx(costs.spent(Store(ws.state).load_all().values()))


@pytest.mark.slow
def test_model_calls_made_before_a_kill_9_are_still_counted_in_the_cost(make_ws, fake):
    # Once lost: a call is recorded with its order only when the conversation ends, so a kill -9
    # during the re-ask left the first, billed call nowhere (no `cost`, no spend limit).
    ws = make_ws({"chip": coder(fake, llm=llm(fake, prices={"input": 3.0, "output": 15.0}))})
    fake.script(content="Not JSON at all.", usage={"prompt_tokens": 5000, "completion_tokens": 2000})
    fake.script(content=reply(), delay=30)  # the re-ask: the supervisor is killed while it waits
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g"))
    with open(ws.root.parent / "supervise.log", "wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("coordinator")), "-w", str(ws.root),
                                 "supervise"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: len(fake.chat_bodies()) == 2, "the re-ask to be under way")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert cost_json(ws)["total"]["calls"] == 0  # nothing was recorded with the order yet

    fake.script(content=reply())
    lines: list[str] = []
    run(ws, lines)

    rec = load(ws, "g")
    assert rec.status == "done", rec.report
    first = [u for u in rec.usage if u["attempt"] == 1]
    assert [(u["usage"]["prompt_tokens"], u["cost"]) for u in first] == [(5000, pytest.approx(0.045))]
    assert cost_json(ws)["total"]["cost"] == pytest.approx(0.045 + sum(u["cost"] for u in rec.usage
                                                                       if u["attempt"] == 2))
    assert any("g: 1 model call(s) of attempt 1 recorded after a crash, $0.0450" in line for line in lines)
    run(ws)  # a second start records nothing twice
    assert len(load(ws, "g").usage) == len(rec.usage)


# -- replies that once crashed the supervisor ---------------------------------------------------------


def test_replies_that_once_crashed_the_supervisor_fail_or_re_ask_and_the_board_still_shows(make_ws, fake):
    ws = make_ws({"chip": coder(fake, max_failures=3)})
    surrogate_edit = json.dumps({"outcome": "done", "summary": "s",
                                 "edits": [write("webapp/src/greeting.py", "x = '\ud800'\n")]},
                                ensure_ascii=False)
    # Attempt 1: a 200 whose body is not the gzip it claims to be (max_retries 0: the attempt fails).
    fake.script(json=b"not gzip", headers={"Content-Encoding": "gzip"})
    # Attempt 2: absurd nesting, then a raw lone surrogate in an edit (re-asked, the echo is sent),
    # then a lone surrogate in the blocker: three broken replies, the attempt fails.
    fake.script(content="[" * 100_000 + "]" * 100_000)
    fake.script(content=surrogate_edit)
    fake.script(content=reply(outcome="requeue-with-blocker", summary="API \ud800 undecided"))
    # Attempt 3: a good reply.
    fake.script(content=reply(write("webapp/src/greeting.py")))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",),
                                       branching=("requeue-with-blocker if the API is undecided",)))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "done", rec.report
    assert rec.attempts == 3
    assert "could not be decoded" in rec.failures[0] and "\n" not in rec.failures[0]
    assert "broke the contract 3 times" in rec.failures[1] and "lone surrogate" in rec.failures[1]
    assert (ws.repos / "webapp" / "src" / "greeting.py").read_text() == GREETING
    for command in (["board"], ["show", "g"]):
        result = CliRunner().invoke(cli, ["-w", str(ws.root), *command])
        assert result.exit_code == 0, result.output


def test_an_unforeseen_error_in_the_model_thread_fails_the_attempt_with_one_line(make_ws, fake, monkeypatch):
    from coordinator import llmagent

    def broken(text: str) -> Any:
        raise RuntimeError("a bug nobody foresaw\nwith a second line")

    monkeypatch.setattr(llmagent, "parse_object", broken)
    ws = make_ws({"chip": coder(fake, max_failures=1)})
    fake.script(content=reply())
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g"))
    run(ws)  # the supervisor goes on

    rec = load(ws, "g")
    assert rec.status == "blocked"
    assert "ended unexpectedly (RuntimeError: a bug nobody foresaw with a second line)" in rec.failures[0]
    assert [u["status"] for u in rec.usage] == [200]  # the call was made and is counted


def test_not_even_the_start_of_the_key_reaches_state_when_an_error_is_cut(make_ws, fake):
    ws = make_ws({"chip": coder(fake, max_failures=1)})
    fake.script(status=500, json={"error": {"message": "x" * 190 + KEY}})  # cut at 200: the key's start
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g"))
    run(ws)

    assert load(ws, "g").status == "blocked"
    assert "***" in load(ws, "g").failures[0]
    assert kept_in(ws, KEY[:8]) == []


def commit_all(repo: Path) -> None:
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True, capture_output=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm",
                    "files for the test"], check=True)


def test_a_file_too_large_to_send_whole_is_never_cut_off_by_the_models_whole_text(make_ws, fake):
    ws = make_ws({"chip": coder(fake, max_failures=1)})
    repo = ws.repos / "webapp"
    big = "".join(f"line {n:05d} " + "x" * 40 + "\n" for n in range(1800))  # ~93,600 characters
    small = "# small\n" * 10
    (repo / "src" / "big.py").write_text(big)
    (repo / "src" / "small.py").write_text(small)
    commit_all(repo)
    head = git(repo, "rev-parse", "main")

    def respond(body: dict[str, Any]) -> Response:
        # The model rewrites "the whole file" from what it was shown: the first part of it.
        shown = user_message(body).split('<file path="webapp/src/big.py"', 1)[1].split("\n", 1)[1]
        return Response(content=reply(write("webapp/src/big.py", shown.split("\n</file>", 1)[0] + "\n# more\n")))

    fake.responder = respond
    drop(ws, "chip", "g.md", order_md("The big module gets a line", id="g",
                                       files=("webapp/src/big.py", "webapp/src/small.py")))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "blocked"
    assert "webapp/src/big.py': was not sent to you whole (too large" in rec.failures[0]
    sent = user_message(fake.chat_bodies()[0])
    assert '<file path="webapp/src/big.py" truncated="true"' in sent
    assert '<file path="webapp/src/small.py">\n' + small in sent
    assert git(repo, "rev-parse", "main") == head
    assert (repo / "src" / "big.py").read_text() == big


def test_a_file_behind_a_link_out_of_the_working_copy_is_never_sent_to_the_model(make_ws, fake, tmp_path):
    # Once: a link committed in the repository (src/ext -> a private folder) put the private
    # file's text into the prompt, by its path or by a glob, off to the model's endpoint.
    private = tmp_path / "private"
    private.mkdir()
    (private / "id_rsa").write_text("PRIVATE-KEY-MATERIAL\n")
    ws = make_ws({"chip": coder(fake)})
    repo = ws.repos / "webapp"
    (repo / "src" / "ext").symlink_to(private)
    sh_git = ["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@example.invalid"]
    subprocess.run([*sh_git, "add", "-A"], check=True)
    subprocess.run([*sh_git, "commit", "-qm", "a link"], check=True)
    fake.script(content=reply())
    fake.script(content=reply())
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/ext/id_rsa",)))
    drop(ws, "chip", "h.md", order_md("The app greets people again", id="h", files=("webapp/src/*/*",)))
    run(ws)

    assert load(ws, "g").status == "done" and load(ws, "h").status == "done"
    for body in fake.chat_bodies():
        sent = user_message(body)
        assert "PRIVATE-KEY-MATERIAL" not in sent
        assert '<file path="webapp/src/ext/id_rsa" omitted="true"' in sent
        assert "behind the symbolic link src/ext" in sent


def test_a_folder_glob_sends_the_model_every_file_below_it(make_ws, fake):
    """files: webapp/src/** (the usual order): the model was sent no file at all, only the folder
    was found, and rewrote src/login.py from nothing but its name."""
    ws = make_ws({"chip": coder(fake)})
    repo = ws.repos / "webapp"
    (repo / "src" / "deep").mkdir()
    (repo / "src" / "deep" / "util.py").write_text("def helper():\n    return 41\n")
    commit_all(repo)
    fake.script(content=reply())
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    run(ws)

    assert load(ws, "g").status == "done"
    sent = user_message(fake.chat_bodies()[0])
    assert '<file path="webapp/src/login.py">\n' in sent and "def password_problem" in sent
    assert '<file path="webapp/src/deep/util.py">\ndef helper():' in sent
    assert "this order names no files" not in sent


def test_files_past_the_total_are_marked_omitted_and_may_not_be_edited(make_ws, fake):
    ws = make_ws({"chip": coder(fake, max_failures=1)})
    repo = ws.repos / "webapp"
    for n in range(5):  # 5 x 55,000 characters: the last passes the 240,000 of an order
        (repo / "src" / f"part{n}.py").write_text(f"# part {n}\n" + "y" * 55_000)
    commit_all(repo)
    fake.responder = lambda body: Response(content=reply(write("webapp/src/part4.py", "# part 4\n")))
    drop(ws, "chip", "g.md", order_md("The parts get a line", id="g", files=("webapp/src/part*.py",)))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "blocked"
    assert "webapp/src/part4.py': was not sent to you whole (not sent: the order's files pass" in rec.failures[0]
    sent = user_message(fake.chat_bodies()[0])
    assert '<file path="webapp/src/part4.py" omitted="true"' in sent
    assert '<file path="webapp/src/part3.py">' in sent


def test_an_orchestrator_models_request_runs_its_own_checks_before_it_is_done(make_ws, fake):
    ws = make_ws(team(fake, max_failures=1), orchestrator="walt")
    # Nothing sent and nothing written: its check `grep -q Hello src/greeting.py` fails.
    fake.script(content=json.dumps({"summary": "Nothing to do: the greeting exists.", "orders": []}))
    drop(ws, "walt", "lazy.md", order_md("The app greets people", id="lazy", acceptance=CHECKED,
                                          files=("webapp/src/**",)))
    run(ws)
    rec = load(ws, "lazy")
    assert rec.status == "blocked", rec.report
    assert "check `grep -q Hello src/greeting.py` failed" in rec.failures[0]

    # Its children wrote the greeting, the review sends nothing more: the check passes.
    fake.script(content=json.dumps({"summary": "chip writes it", "orders": [
        child("chip", "Write the greeting", files=["webapp/src/greeting.py"])]}))
    fake.script(content=json.dumps({"summary": "The greeting shipped.", "orders": []}))
    drop(ws, "walt", "req.md", order_md("The app greets people by name", id="req", acceptance=CHECKED,
                                         files=("webapp/src/**",)))
    run(ws)
    rec = load(ws, "req")
    assert rec.status == "done", rec.report
    assert rec.report["summary"] == "The greeting shipped."
    assert rec.report["checks"] == ["`grep -q Hello src/greeting.py` passed"]


def test_a_planned_order_may_not_wait_on_its_own_request(make_ws, fake):
    ws = make_ws(team(fake), orchestrator="walt")
    deadlock = dict(child("rex", "Review the greeting", files=[]), blocked_by=["req"])
    fake.script(content=json.dumps({"summary": "rex reviews after the request", "orders": [deadlock]}))
    fake.script(content=json.dumps({"summary": "rex reviews", "orders": [child("rex", "Review the greeting",
                                                                                 files=[])]}))
    fake.script(content=json.dumps({"summary": "Reviewed.", "orders": []}))
    drop(ws, "walt", "req.md", order_md("The greeting is reviewed", id="req"))
    run(ws)

    rec = load(ws, "req")
    assert rec.status == "done", rec.report
    assert ("orders.0 (to rex): blocked_by.0: 'req' is the request this plan is for, which ends only after "
            "this order; it would wait forever") in last_user_message(fake.chat_bodies()[1])
    assert [load(ws, c).blocked_by for c in rec.children] == [[]]


def test_a_planned_order_for_a_repository_not_under_repos_goes_back_to_the_model(make_ws, fake):
    ws = make_ws(team(fake), orchestrator="walt")
    fake.script(content=json.dumps({"summary": "chip writes", "orders": [child("chip", "Write the greeting",
                                                                                files=["shop/src/greeting.py"])]}))
    fake.script(content=json.dumps({"summary": "chip writes", "orders": [child("chip", "Write the greeting",
                                                                                files=["webapp/src/greeting.py"])]}))
    fake.script(content=json.dumps({"summary": "Written.", "orders": []}))
    drop(ws, "walt", "req.md", order_md("The app greets people", id="req"))
    run(ws)

    rec = load(ws, "req")
    assert rec.status == "done", rec.report
    assert "files.0: no repository 'shop' under repos/" in last_user_message(fake.chat_bodies()[1])
    assert [load(ws, c).status for c in rec.children] == ["done"]  # never filed to be rejected


def test_an_unset_key_variable_blocks_the_order_at_once_naming_it(make_ws, fake, monkeypatch):
    monkeypatch.delenv("FAKE_KEY")
    ws = make_ws({"chip": coder(fake, max_failures=3)})
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g"))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "blocked" and rec.attempts == 1  # no retries burnt
    assert "the environment variable FAKE_KEY is not set" in rec.report["summary"]
    assert fake.requests == []


def test_the_review_sees_the_report_of_a_routed_childs_follow_up(make_ws, fake):
    agents = team(fake)
    agents["chip"] = {"role": "specialist", "writes": ["webapp/src/**"], "sends_to": ["rex"],
                      "command": sh("printf 'outcome: route-to\\nagent: rex\\nsummary: rex should look\\n' "
                                    "> \"$COORD_RESULT\"")}
    agents["rex"]["command"] = sh("echo rex found the greeting fine")
    ws = make_ws(agents, orchestrator="walt")
    routed = dict(child("chip", "Look at the greeting", files=[]),
                  branching=[{"action": "route-to", "agent": "rex", "when": "a review is needed"}])
    fake.script(content=json.dumps({"summary": "chip looks", "orders": [routed]}))
    fake.script(content=json.dumps({"summary": "Reviewed by rex.", "orders": []}))
    drop(ws, "walt", "req.md", order_md("The greeting is looked at", id="req"))
    run(ws)

    rec = load(ws, "req")
    assert rec.status == "done", rec.report
    (kid,) = rec.children
    follow = load(ws, kid).routed_to
    assert load(ws, kid).status == "routed" and load(ws, follow).status == "done"
    review = user_message(fake.chat_bodies()[-1])
    assert SYNTHESIS_ROLE in fake.chat_bodies()[-1]["messages"][0]["content"]
    assert f"{kid} was routed; its route ended in {follow} (rex, done)" in review
    assert "rex found the greeting fine" in review


# -- a call under way ends with its attempt ---------------------------------------------------------
class Trickle:
    """A model server that answers one byte every 0.2 s for a minute: each read comes in time,
    so only an end of the whole call can stop it."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.stopping = threading.Event()
        stopping = self.stopping

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                for _ in range(300):
                    if stopping.wait(0.2):
                        return
                    try:
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    except OSError:
                        return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("end", ["timeout", "cancel"])
def test_a_model_that_trickles_its_answer_is_stopped_by_the_orders_timeout_or_a_cancel(make_ws, end):
    import time

    trickle = Trickle()
    try:
        chip = {"role": "specialist", "writes": ["webapp/src/**"], "max_failures": 1,
                "llm": {"base_url": trickle.base_url, "model": "m", "max_retries": 2, "timeout": "10s"}}
        ws = make_ws({"chip": chip})
        drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",),
                                          timeout="2s" if end == "timeout" else None))
        with Supervisor(ws) as sup:
            started = time.monotonic()
            for _ in range(10_000):
                if "g" in sup.records and sup.records["g"].status == "running":
                    break
                sup.step()
            if end == "cancel":
                time.sleep(0.5)
                sup.handle("cancel", {"id": "g"})
            sup.run_once(limit=60)
            took = time.monotonic() - started
    finally:
        trickle.close()
    rec = load(ws, "g")
    assert took < 8, took  # not the minute the server would trickle on, nor its retries
    if end == "cancel":
        assert rec.status == "cancelled"
        assert [(u["status"], u["error"]) for u in rec.usage] == [(None, "cancelled")]  # one call, cut
    else:
        assert rec.status == "blocked"
        assert "did not answer within the order's timeout" in rec.report["summary"], rec.report
        assert [u["status"] for u in rec.usage] == [None]  # cut at the deadline, never retried


def test_a_model_cut_by_the_orders_timeout_says_how_long_and_what_to_raise(make_ws, fake):
    """No fallback configured, and the order's timeout cut the only model: the report said
    "check the endpoints or add a fallback model", advice for another failure."""
    fake.script(delay=30, content=reply())  # answered only when the server stops
    chip = coder(fake, max_failures=1)
    ws = make_ws({"chip": chip})
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",), timeout="1s"))
    run(ws)

    rec = load(ws, "g")
    assert rec.status == "blocked"
    summary = rec.report["summary"]
    assert "chip's model did not answer within the order's timeout (1s)" in summary, summary
    assert "raise the order's `timeout:` or agents.chip.timeout" in summary
    assert "fallback" not in summary and "check the endpoints" not in summary
    (call,) = rec.usage  # cut at the deadline, never retried
    # Said by the call's own deadline ("timed out after 1.0s, when ...") or by the supervisor's
    # timeout, which stops the call: whichever comes first by a millisecond.
    assert call["status"] is None and "the order's timeout ran out" in call["error"], call["error"]


def test_a_model_that_trickles_its_answer_is_cut_at_llm_timeout_and_the_fallback_answers(make_ws, fake):
    """A proxy that sends keep-alive whitespace for a hung model: every read comes in time, but
    the call is over at llm.timeout, and the fallback model does the work (not the order's
    timeout, minutes later, with no fallback ever asked)."""
    import time

    trickle = Trickle()
    try:
        chip = coder(fake)
        chip["llm"] = {"base_url": trickle.base_url, "model": "hung", "max_retries": 0, "timeout": "1s",
                       "fallback": [{"model": "m", "base_url": fake.base_url}]}
        ws = make_ws({"chip": chip})
        fake.script(content=reply(write("webapp/src/greeting.py")))
        drop(ws, "chip", "g.md", order_md("The app greets people", id="g", acceptance=CHECKED,
                                          files=("webapp/src/greeting.py",)))
        started = time.monotonic()
        run(ws)
        took = time.monotonic() - started
    finally:
        trickle.close()
    rec = load(ws, "g")
    assert rec.status == "done", rec.report
    assert took < 20, took  # not the minute the server trickles on
    assert [(u["model"], u["status"]) for u in rec.usage] == [("hung", None), ("m", 200)]
    assert "timed out after 1s" in rec.usage[0]["error"]


def test_a_cancel_lets_go_of_a_model_still_thinking_and_frees_the_agents_slot(make_ws, fake):
    """A server that sends nothing for 30 s (a model thinking, no streaming): a cancel ends
    the call at once, and the next order of the agent starts."""
    import time

    ws = make_ws({"chip": coder(fake, max_parallel=1)})
    fake.script(content=reply(write("webapp/src/greeting.py")), delay=30)
    fake.script(content=reply(write("webapp/src/greeting.py")))
    drop(ws, "chip", "g.md", order_md("The app greets people", id="g", files=("webapp/src/**",)))
    with Supervisor(ws) as sup:
        for _ in range(10_000):
            if "g" in sup.records and sup.records["g"].status == "running":
                break
            sup.step()
        wait_until(lambda: len(fake.requests) == 1, "the model to be asked")
        drop(ws, "chip", "h.md", order_md("The app says hello", id="h", files=("webapp/src/**",)))
        started = time.monotonic()
        sup.handle("cancel", {"id": "g"})
        sup.run_once(limit=25)
        took = time.monotonic() - started
    assert took < 10, took  # not the 30 s the model would think
    assert load(ws, "g").status == "cancelled" and load(ws, "h").status == "done"
    assert [(u["status"], u["error"]) for u in load(ws, "g").usage] == [(None, "cancelled")]


def test_an_agent_that_answers_every_planned_order_with_a_request_to_the_orchestrator_stops_after_max_chain(
        make_ws, fake):
    """chip answers every order with a request to walt through its outbox; walt's model plans
    each into an order for chip. A plan's orders started the count of orders in a row afresh,
    so the bound never came: the two sent each other work for ever."""
    from coordinator import outbox

    ask = sh('mkdir -p "$COORD_OUTBOX/walt"; printf "objective: Answer it\\nacceptance: [a is true, b is true, '
             'c is true]\\nfiles: []\\nbranching: [{action: halt-with-note, when: not}]\\n" '
             '> "$COORD_OUTBOX/walt/ask.yaml"; echo asked')
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "llm": llm(fake)},
                  "chip": {"role": "specialist", "sends_to": ["walt"], "command": ask}},
                 orchestrator="walt", budget={"ceiling": 10_000_000, "bands": [5_000_000, 10_000_000, 15_000_000]})
    drop(ws, "chip", "o.md", order_md("Start asking", id="o"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60, should_stop=lambda: int(len(sup.records) > 60))
    recs = Store(ws.state).load_all()
    assert len(recs) == 1 + outbox.MAX_CHAIN, len(recs)
    last = max(recs.values(), key=lambda r: r.seq)
    assert last.to == "chip" and last.status == "done" and last.children == []
    [line] = last.report["undelivered"]
    assert f"{last.id} came at the end of {outbox.MAX_CHAIN} orders in a row sent from an outbox, a route, an escalation or a plan" in line


def test_an_agent_that_routes_every_planned_order_back_to_the_orchestrator_stops_after_max_chain(make_ws, fake):
    """chip routes every order back to walt; walt's model plans each into an order for chip
    that allows that route. No outbox was ever delivered, where alone the bound was looked at:
    a route and a plan taking turns filed orders for ever (`supervise --once` never ended)."""
    from coordinator import outbox

    back = {**child("chip", "Answer it", files=[]),
            "branching": [{"action": "route-to", "agent": "walt", "when": "walt should decide"}]}
    fake.responder = lambda body: Response(content=json.dumps(
        {"summary": "chip answers", "orders": [] if SYNTHESIS_ROLE in body["messages"][0]["content"] else [back]}))
    route = sh('printf "outcome: route-to\\nagent: walt\\nsummary: walt decides\\n" > "$COORD_RESULT"')
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "llm": llm(fake)},
                  "chip": {"role": "specialist", "sends_to": ["walt"], "command": route}},
                 orchestrator="walt", budget={"ceiling": 10_000_000, "bands": [5_000_000, 10_000_000, 15_000_000]})
    drop(ws, "walt", "req.md", order_md("Start asking", id="req"))
    lines: list[str] = []
    with Supervisor(ws, log=lines.append) as sup:
        sup.run_once(limit=60, should_stop=lambda: int(len(sup.records) > 60))
    recs = Store(ws.state).load_all()
    assert len(recs) == 1 + outbox.MAX_CHAIN, len(recs)
    assert all(r.terminal for r in recs.values()), [(r.id, r.status) for r in recs.values()]
    last = max(recs.values(), key=lambda r: r.seq)
    assert last.to == "walt" and last.status == "blocked" and last.children == []
    said = f"{last.id} came at the end of {outbox.MAX_CHAIN} orders in a row sent from an outbox, a route, an escalation or a plan"
    assert "walt's model was not asked for a plan: no order it planned could be filed: " + said in last.report["summary"]
    assert last.usage == []
    assert any(said in line for line in lines)


ANSWER_IT = ('printf "objective: Answer it\\nacceptance: [a is true, b is true, c is true]\\nfiles: []\\n'
             'branching: [{action: halt-with-note, when: not}]\\n"')


def _ask_and_delegate_for_ever(make_ws: Any, fake: FakeLLM, walt_runs: str) -> tuple[Any, dict[str, Record]]:
    """chip answers every order with a request to walt, who delegates each back to chip (by its
    outbox, or by its model's plan); a person's request to walt starts it. The workspace and its records."""
    delegate = sh(f'mkdir -p "$COORD_OUTBOX/chip"; {ANSWER_IT} > "$COORD_OUTBOX/chip/do.yaml"; echo delegated')
    walt = {"command": delegate} if walt_runs == "command" else {"llm": llm(fake)}
    ask = sh(f'mkdir -p "$COORD_OUTBOX/walt"; {ANSWER_IT} > "$COORD_OUTBOX/walt/ask.yaml"; echo asked')
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], **walt},
                  "chip": {"role": "specialist", "sends_to": ["walt"], "command": ask}},
                 orchestrator="walt", budget={"ceiling": 10_000_000, "bands": [5_000_000, 10_000_000, 15_000_000]})
    drop(ws, "walt", "req.md", order_md("Start asking", id="req"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60, should_stop=lambda: int(len(sup.records) > 60))
    return ws, Store(ws.state).load_all()


@pytest.mark.parametrize("walt_runs", ["command", "llm"])
def test_an_orchestrators_request_at_the_end_of_max_chain_orders_is_blocked_saying_so_however_it_runs(
        make_ws, fake, walt_runs):
    """chip answers every order with a request to walt; walt delegates each back to chip. The
    request at the end of the chain cannot send its orders: a command orchestrator's ended
    `done` with nothing sent (its outbox kept), an LLM orchestrator's `blocked`. Both are
    blocked now, the chain limit named, and a command's outbox kept and listed."""
    from coordinator import outbox

    ws, recs = _ask_and_delegate_for_ever(make_ws, fake, walt_runs)
    assert len(recs) == 1 + outbox.MAX_CHAIN, len(recs)
    last = max(recs.values(), key=lambda r: r.seq)
    assert last.to == "walt" and last.status == "blocked" and last.children == [], (last.status, last.report)
    said = f"{last.id} came at the end of {outbox.MAX_CHAIN} orders in a row sent from an outbox"
    assert said in last.report["summary"] and "a retry would end the same" in last.report["summary"]
    assert all(r.status == "done" for r in recs.values() if r.id != last.id)
    if walt_runs == "command":
        [line] = last.report["undelivered"]
        assert line.startswith(f"do.yaml: not delivered: {said}")
        assert (ws.runtime / "attempts" / last.id / "1" / "outbox" / "chip" / "do.yaml").exists()


def test_a_request_at_the_end_of_max_chain_orders_is_blocked_before_its_model_is_asked(make_ws, fake):
    """No order its model plans could be filed: the model was asked all the same (money, tokens,
    hot tokens) and its plan thrown away. Now the request is blocked first, and says so."""
    from coordinator import outbox

    _, recs = _ask_and_delegate_for_ever(make_ws, fake, "llm")
    last = max(recs.values(), key=lambda r: r.seq)
    assert last.to == "walt" and last.status == "blocked" and last.usage == [], last.usage
    assert last.report["summary"].startswith("walt's model was not asked for a plan: no order it planned could "
                                             f"be filed: {last.id} came at the end of {outbox.MAX_CHAIN} orders")
    requests = sum(1 for r in recs.values() if r.to == "walt")
    assert len(fake.chat_bodies()) == 2 * (requests - 1)  # a plan and a review for each of the others


def test_a_route_at_the_end_of_max_chain_orders_fails_the_attempt_and_the_order_is_escalated(make_ws, fake):
    """The same two, started with an order to chip: the order at the end of the chain is chip's,
    whose route is refused as the outbox of such an order is kept; blocked, it is escalated
    once, and the investigation's plan is not filed either."""
    from coordinator import outbox

    asked = iter(range(100))
    fake.responder = lambda body: Response(content=json.dumps({"summary": "chip answers", "orders": [] if (
        SYNTHESIS_ROLE in body["messages"][0]["content"]) else [{**child("chip", f"Answer it {next(asked)}", files=[]),
        "branching": [{"action": "route-to", "agent": "walt", "when": "walt should decide"}]}]}))
    route = sh('printf "outcome: route-to\\nagent: walt\\nsummary: walt decides\\n" > "$COORD_RESULT"')
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "llm": llm(fake)},
                  "chip": {"role": "specialist", "sends_to": ["walt"], "command": route}},
                 orchestrator="walt", escalate_to="walt",
                 budget={"ceiling": 10_000_000, "bands": [5_000_000, 10_000_000, 15_000_000]})
    drop(ws, "chip", "o.md", order_md("Start asking", id="o", branching=("route-to-walt if walt should decide",)))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60, should_stop=lambda: int(len(sup.records) > 60))
    recs = Store(ws.state).load_all()
    assert len(recs) == 2 + outbox.MAX_CHAIN, len(recs)
    assert all(r.terminal for r in recs.values()), [(r.id, r.status) for r in recs.values()]
    chained = sorted(recs.values(), key=lambda r: r.seq)
    last, investigation = chained[-2:]
    assert last.to == "chip" and last.status == "blocked" and last.routed_to is None
    said = f"{last.id} came at the end of {outbox.MAX_CHAIN} orders in a row sent from an outbox, a route, an escalation or a plan"
    assert last.failures and all(f.startswith(f"route-to walt cannot be taken: {said}") for f in last.failures)
    assert investigation.to == "walt" and investigation.source.startswith(f"escalation of {last.id}")
    assert investigation.status == "blocked" and investigation.children == []
    assert "no order it planned could be filed" in investigation.report["summary"]


def test_a_requeue_on_a_request_above_the_one_that_sent_the_order_is_a_failed_attempt(make_ws, fake):
    """big's child was routed to walt, a request of its own (under big) that sent chip `wait`;
    chip requeued `wait` on big, which ends only after its child's route, which ends only after
    `wait`: each waited for the other, and `supervise --once` ended with all three stuck."""
    from fakellm import _section

    def answer(body: dict[str, Any]) -> Response:
        if SYNTHESIS_ROLE in body["messages"][0]["content"]:
            return Response(content=json.dumps({"summary": "Done.", "orders": []}))
        routed = "Route me" in _section(user_message(body), "Request")
        order = child("chip", "Wait on big" if routed else "Route me", files=[])
        order["branching"] = [{"action": "requeue-with-blocker", "when": "big is not done"} if routed else
                              {"action": "route-to", "agent": "walt", "when": "walt should decide"}]
        return Response(content=json.dumps({"summary": "chip", "orders": [order]}))

    fake.responder = answer
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "llm": llm(fake)},
                  "chip": {"role": "specialist", "sends_to": ["walt"], "max_failures": 2, "command": sh(
                      'if grep -q "why the last attempt failed" "$COORD_BRIEF"; then echo did it; exit 0; fi; '
                      'if grep -q "Route me" "$COORD_BRIEF"; then printf "outcome: route-to\\nagent: walt\\n'
                      'summary: walt\\n" > "$COORD_RESULT"; else printf "outcome: requeue-with-blocker\\n'
                      'summary: waits\\nblocker: big\\n" > "$COORD_RESULT"; fi')}},
                 orchestrator="walt", budget={"ceiling": 10_000_000, "bands": [5_000_000, 10_000_000, 15_000_000]})
    drop(ws, "walt", "big.md", order_md("Big request", id="big"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    recs = Store(ws.state).load_all()
    assert all(r.terminal for r in recs.values()), [(r.id, r.objective, r.status) for r in recs.values()]
    [wait] = [r for r in recs.values() if r.objective == "Wait on big"]
    assert wait.status == "done" and wait.attempts == 2
    assert wait.failures[0].startswith("requeue-with-blocker: big is a request that ends only after the orders it sent")
    assert recs["big"].status == "done"
