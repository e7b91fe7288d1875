"""LLM specialists and orchestrators: replies checked, re-asked, applied (against tests/fakellm.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakellm import FakeLLM

from coordinator import paths
from coordinator.config import Endpoint, LLMSettings, from_mapping
from coordinator.llm import Client
from coordinator.llmagent import (
    Edit,
    LLMReplyError,
    Unseen,
    apply_edits,
    plan,
    roster_text,
    run_specialist,
    specialist_messages,
    synthesize,
)

TESTS = Path(__file__).parent
OUTCOMES = {"done", "halt-with-note", "blocked"}
BRIEF = "**Objective:** Reject passwords over 64 characters.\n\n**Files:**\n- webapp/src/login.ts"


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def client_for(fake: FakeLLM, *models: str) -> Client:
    chain = [Endpoint(m, fake.base_url) for m in models or ("coder",)]
    return Client(LLMSettings(primary=chain[0], fallback=tuple(chain[1:]), max_retries=0),
                  sleep=lambda s: None)


def in_src(path: str) -> bool:
    return paths.matches("webapp/src/**", path)


def done(*edits: dict[str, Any], outcome: str = "done", **extra: Any) -> str:
    return json.dumps({"outcome": outcome, "summary": "Added the length check.", "edits": list(edits),
                       **extra})


def last_user_message(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


# -- specialists ----------------------------------------------------------


def test_the_model_sees_the_brief_and_the_current_files(fake: FakeLLM) -> None:
    fake.script(content=done({"path": "webapp/src/login.ts", "content": "export const MAX = 64;\n"}))
    files = {"webapp/src/login.ts": "export const MAX = 0;\n", "webapp/src/new.ts": None}
    reply, replies = run_specialist(client_for(fake), BRIEF, files, allowed=in_src,
                                    outcomes_allowed=OUTCOMES)

    assert reply.outcome == "done"
    assert reply.edits == (Edit("webapp/src/login.ts", "export const MAX = 64;\n"),)
    assert len(replies) == 1
    sent = fake.chat_bodies()[0]["messages"]
    assert sent[0]["role"] == "system" and '"edits"' in sent[0]["content"]
    assert "Reject passwords over 64 characters" in sent[1]["content"]
    assert "export const MAX = 0;" in sent[1]["content"]
    assert '<file path="webapp/src/new.ts" missing="true"/>' in sent[1]["content"]


def test_a_reply_that_is_not_json_is_sent_back_then_accepted(fake: FakeLLM) -> None:
    fake.script(content="Sure! I will add the check to the login form.")
    fake.script(content="```json\n" + done() + "\n```")
    reply, replies = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src,
                                    outcomes_allowed=OUTCOMES)
    assert reply.summary == "Added the length check."
    assert len(replies) == 2
    second = fake.chat_bodies()[1]["messages"]
    assert second[-2] == {"role": "assistant", "content": "Sure! I will add the check to the login form."}
    assert "not JSON" in second[-1]["content"]


def test_a_wrong_shape_is_sent_back_twice_then_the_attempt_fails(fake: FakeLLM) -> None:
    for _ in range(3):
        fake.script(content=json.dumps({"outcome": "done", "edits": [], "notes": "x"}))
    with pytest.raises(LLMReplyError) as info:
        run_specialist(client_for(fake), BRIEF, {}, allowed=in_src, outcomes_allowed=OUTCOMES)
    assert len(fake.chat_bodies()) == 3  # one ask, two re-asks
    assert "coder's specialist reply broke the contract 3 times" in str(info.value)
    assert any("'summary'" in e for e in info.value.errors)
    assert any("'notes'" in e for e in info.value.errors)
    assert len(info.value.replies) == 3
    correction = last_user_message(fake.chat_bodies()[2])
    assert "missing required key 'summary'" in correction and "unknown key 'notes'" in correction


def test_a_reply_cut_off_at_the_token_limit_says_so_not_just_that_it_is_not_json(fake: FakeLLM) -> None:
    # Once: "the reply is not JSON (Unterminated string ...)", three times over, and the user
    # went hunting the model when the fix was one line of coordinator.yaml.
    cut = {"choices": [{"message": {"content": '{"outcome": "done", "summary": "Added the le'},
                        "finish_reason": "length"}]}
    for _ in range(3):
        fake.script(json=cut)
    client = Client(LLMSettings(primary=Endpoint("coder", fake.base_url), max_retries=0, max_tokens=50))
    with pytest.raises(LLMReplyError) as info:
        run_specialist(client, BRIEF, {}, allowed=in_src, outcomes_allowed=OUTCOMES)
    assert "cut off at the agent's llm.max_tokens (50)" in str(info.value)
    assert "raise llm.max_tokens" in last_user_message(fake.chat_bodies()[1])


def test_a_reply_cut_in_its_second_edit_says_it_was_cut_not_that_outcome_is_missing(fake: FakeLLM) -> None:
    # The first edit of a cut reply is a whole JSON object: it was taken for the reply, and the
    # model was told "missing required key 'outcome'" three times, the user too.
    text = ('{"outcome": "done", "summary": "Added it.", "edits": [{"path": "webapp/src/a.py", '
            '"content": "x = 1\\n"}, {"path": "webapp/src/b.py", "content": "def f():\\n    retu')
    for _ in range(3):
        fake.script(json={"choices": [{"message": {"content": text}, "finish_reason": "length"}]})
    client = Client(LLMSettings(primary=Endpoint("coder", fake.base_url), max_retries=0, max_tokens=60))
    with pytest.raises(LLMReplyError) as info:
        run_specialist(client, BRIEF, {}, allowed=in_src, outcomes_allowed=OUTCOMES)
    assert "cut off at the agent's llm.max_tokens (60)" in str(info.value)
    assert "outcome" not in str(info.value)
    assert "raise llm.max_tokens" in last_user_message(fake.chat_bodies()[1])
    assert "missing required key" not in last_user_message(fake.chat_bodies()[1])


def test_an_edit_outside_what_the_order_allows_is_sent_back(fake: FakeLLM) -> None:
    fake.script(content=done({"path": "webapp/config/secrets.env", "content": "X=1\n"}))
    fake.script(content=done({"path": "webapp/src/login.ts", "content": "ok\n"}))
    reply, _ = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src, outcomes_allowed=OUTCOMES)
    assert [e.path for e in reply.edits] == ["webapp/src/login.ts"]
    correction = last_user_message(fake.chat_bodies()[1])
    assert "edits.0.path 'webapp/config/secrets.env': outside what this order may write" in correction


@pytest.mark.parametrize(("edit", "expected"), [
    ({"path": "webapp/src/../../etc/passwd", "content": "x"}, "contains '..'"),
    ({"path": "/etc/passwd", "content": "x"}, "is absolute"),
    ({"path": "webapp/.git/hooks/pre-commit", "content": "x"}, ".git"),
    ({"path": "webapp/src/*.ts", "content": "x"}, "not a glob"),
    ({"path": "webapp/src/a.ts"}, "either \"content\""),
    ({"path": "webapp/src/a.ts", "content": "x", "delete": True}, "either \"content\""),
])
def test_unsafe_or_malformed_edits_are_sent_back(fake: FakeLLM, edit: dict[str, Any],
                                                 expected: str) -> None:
    fake.script(content=done(edit))
    fake.script(content=done())
    run_specialist(client_for(fake), BRIEF, {}, allowed=lambda p: True, outcomes_allowed=OUTCOMES)
    assert expected in last_user_message(fake.chat_bodies()[1])


@pytest.mark.parametrize(("edits", "expected"), [
    # Once applied in turn: a write failed half-way with the working copy's path, and the
    # attempt failed without the model ever hearing why.
    ([{"path": "webapp/src/a.ts", "content": "x"}, {"path": "webapp/src/a.ts/b.ts", "content": "y"}],
     "'webapp/src/a.ts/b.ts' is inside 'webapp/src/a.ts', which another edit writes as a file"),
    ([{"path": "webapp/src/login.ts/b.ts", "content": "y"}], "src/login.ts is a file, not a folder"),
    ([{"path": "webapp/src", "content": "x"}], "is a folder; an edit replaces one file"),
])
def test_edits_the_working_copy_cannot_take_are_sent_back(fake: FakeLLM, worktree: Path,
                                                          edits: list[dict[str, Any]], expected: str) -> None:
    fake.script(content=done(*edits))
    fake.script(content=done({"path": "webapp/src/login.ts", "content": "new\n"}))
    reply, _ = run_specialist(client_for(fake), BRIEF, {}, allowed=lambda p: True,
                              outcomes_allowed=OUTCOMES, repo="webapp", workdir=worktree)
    assert expected in last_user_message(fake.chat_bodies()[1])
    assert apply_edits(worktree, "webapp", reply.edits) == ["src/login.ts"]


def test_an_outcome_the_branching_does_not_allow_is_sent_back(fake: FakeLLM) -> None:
    fake.script(content=done(outcome="route-to", agent="rex"))
    fake.script(content=done(outcome="halt-with-note"))
    reply, _ = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src, outcomes_allowed=OUTCOMES)
    assert reply.outcome == "halt-with-note" and reply.agent is None
    assert "'route-to' to 'rex' is not allowed" in last_user_message(fake.chat_bodies()[1])


def test_route_to_and_requeue_carry_agent_and_blocker(fake: FakeLLM) -> None:
    fake.script(content=done(outcome="route-to"))  # no agent: sent back
    fake.script(content=done(outcome="route-to", agent="rex"))
    reply, _ = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src,
                              outcomes_allowed={"route-to"})
    assert (reply.outcome, reply.agent, reply.blocker) == ("route-to", "rex", None)
    assert "missing required key 'agent'" in last_user_message(fake.chat_bodies()[1])

    fake.script(content=done(outcome="requeue-with-blocker", blocker="WO-0040"))
    reply, _ = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src,
                              outcomes_allowed={"requeue-with-blocker"})
    assert (reply.outcome, reply.blocker) == ("requeue-with-blocker", "WO-0040")


def test_route_to_may_be_limited_to_the_agents_the_branching_names(fake: FakeLLM) -> None:
    fake.script(content=done(outcome="route-to", agent="walt"))
    fake.script(content=done(outcome="route-to", agent="rex"))
    reply, _ = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src,
                              outcomes_allowed={"done", "route-to-rex"})
    assert reply.agent == "rex"
    assert "'route-to' to 'walt' is not allowed" in last_user_message(fake.chat_bodies()[1])


def test_a_broken_reply_goes_back_to_the_model_that_wrote_it(fake: FakeLLM) -> None:
    fake.script(status=503, json={"error": {"message": "overloaded"}})
    fake.script(content="not json")  # written by the fallback
    fake.script(content=done())
    reply, replies = run_specialist(client_for(fake, "primary", "backup"), BRIEF, {},
                                    allowed=in_src, outcomes_allowed=OUTCOMES)
    assert [b["model"] for b in fake.chat_bodies()] == ["primary", "backup", "backup"]
    assert [r.model for r in replies] == ["backup", "backup"]
    assert reply.outcome == "done"


# -- applying edits -------------------------------------------------------


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    root = tmp_path / "wt"
    (root / "src").mkdir(parents=True)
    (root / "src" / "login.ts").write_text("old\n")
    (root / "src" / "gone.ts").write_text("bye\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    return root


def test_edits_write_whole_files_create_folders_and_delete(worktree: Path) -> None:
    touched = apply_edits(worktree, "webapp", [
        Edit("webapp/src/login.ts", "new\n"),
        Edit("webapp/src/deep/er/util.ts", "export {};\n"),
        Edit("webapp/src/gone.ts", None),
        Edit("webapp/src/never-was.ts", None),
        Edit("webapp/run.sh", "#!/bin/sh\necho hi\n"),
    ])
    assert touched == ["src/login.ts", "src/deep/er/util.ts", "src/gone.ts", "run.sh"]
    assert (worktree / "src" / "login.ts").read_text() == "new\n"
    assert (worktree / "src" / "deep" / "er" / "util.ts").read_text() == "export {};\n"
    assert not (worktree / "src" / "gone.ts").exists()
    assert os.stat(worktree / "run.sh").st_mode & 0o777 == 0o755  # an edit keeps the mode


def test_edits_never_leave_the_working_copy(worktree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("precious\n")
    (worktree / "linkdir").symlink_to(outside)
    (worktree / "src" / "link.ts").symlink_to(outside / "target.txt")
    bad = [
        Edit("webapp/../outside/target.txt", "x"),
        Edit("/etc/passwd", "x"),
        Edit("other/src/login.ts", "x"),
        Edit("webapp/linkdir/target.txt", "x"),
        Edit("webapp/src/link.ts", "x"),
        Edit("webapp/.git/config", "x"),
        Edit("webapp/src", "x"),
    ]
    for edit in bad:
        with pytest.raises(LLMReplyError):
            apply_edits(worktree, "webapp", [Edit("webapp/src/login.ts", "changed\n"), edit])
    assert (outside / "target.txt").read_text() == "precious\n"
    assert (worktree / "src" / "login.ts").read_text() == "old\n"  # all or nothing
    # Deleting a link removes the link, never what it points at.
    assert apply_edits(worktree, "webapp", [Edit("webapp/src/link.ts", None)]) == ["src/link.ts"]
    assert (outside / "target.txt").exists()


# -- orchestrators --------------------------------------------------------

ORDER = {"to": "chip", "objective": "Reject passwords over 64 characters",
         "acceptance": ["A 65-character password is refused", "64 characters still log in",
                        "`make test` passes"],
         "files": ["webapp/src/login.ts"],
         "branching": [{"action": "halt-with-note", "when": "the limit exists already"}]}


def test_a_plan_is_validated_order_by_order_and_sent_back_with_the_errors(fake: FakeLLM) -> None:
    bad = dict(ORDER, files=["webapp/db/schema.sql"])
    fake.script(content=json.dumps({"summary": "chip fixes login", "orders": [ORDER, bad]}))
    fake.script(content=json.dumps({"summary": "chip fixes login", "orders": [ORDER]}))

    def validate(order: dict[str, Any], siblings: dict[str, tuple[str, ...]]) -> list[str]:
        return [f"files: {f!r} is outside chip's writes" for f in order["files"]
                if not paths.matches("webapp/src/**", f)]

    result, replies = plan(client_for(fake), "nothing in flight", "- chip | writes: webapp/src/**",
                           "Limit password length", validate=validate)
    assert result.orders == (ORDER,)
    assert result.summary == "chip fixes login"
    assert len(replies) == 2
    correction = last_user_message(fake.chat_bodies()[1])
    assert "orders.1 (to chip): files: 'webapp/db/schema.sql' is outside chip's writes" in correction


def test_a_plans_orders_see_each_other_and_may_not_share_an_id(fake: FakeLLM) -> None:
    first, second = dict(ORDER, id="limit"), dict(ORDER, id="limit", blocked_by=["limit"])
    fake.script(content=json.dumps({"summary": "twice", "orders": [first, second]}))
    fake.script(content=json.dumps({"summary": "in turn", "orders": [first, dict(second, id="docs")]}))
    seen: list[dict[str, tuple[str, ...]]] = []

    def validate(order: dict[str, Any], siblings: dict[str, tuple[str, ...]]) -> list[str]:
        seen.append(siblings)
        return []

    result, _ = plan(client_for(fake), "", "", "Limit password length", validate=validate)
    assert [o["id"] for o in result.orders] == ["limit", "docs"]
    assert "orders.1: id 'limit' is also the id of orders.0" in last_user_message(fake.chat_bodies()[1])
    assert seen[-2:] == [{"docs": ("limit",)}, {"limit": ()}]  # each sees the others, not itself


def test_a_plan_with_the_wrong_shape_fails_after_two_re_asks(fake: FakeLLM) -> None:
    for _ in range(3):
        fake.script(content=json.dumps({"orders": "chip should do it"}))
    with pytest.raises(LLMReplyError) as info:
        plan(client_for(fake), "", "", "Limit password length", validate=lambda o, s: [])
    assert "orders: must be a list" in str(info.value)
    assert len(fake.chat_bodies()) == 3


def test_synthesis_with_no_orders_means_done(fake: FakeLLM) -> None:
    fake.script(content=json.dumps({"summary": "Passwords are limited to 64.", "orders": []}))
    result, _ = synthesize(client_for(fake), "", "- chip | writes: webapp/src/**",
                           "Limit password length", "WO-0002 done: added the check",
                           validate=lambda o, s: ["never called"])
    assert result.orders == ()
    assert result.summary == "Passwords are limited to 64."
    assert "WO-0002 done: added the check" in fake.chat_bodies()[0]["messages"][1]["content"]


# -- the demo server ------------------------------------------------------

TEAM = {
    "version": 1,
    "agents": {
        "walt": {"role": "orchestrator", "sends_to": ["chip", "rex"]},
        "chip": {"role": "specialist", "writes": ["webapp/src/**", "webapp/tests/**"],
                 "sends_to": ["rex"], "description": "Writes the web app."},
        "rex": {"role": "specialist", "description": "Reviews."},
    },
}


def test_the_demo_server_plans_from_the_roster_and_finishes(fake: FakeLLM) -> None:
    config = from_mapping(TEAM)
    roster = roster_text(config, "walt")
    assert roster.splitlines() == [
        "- chip | writes: webapp/src/**, webapp/tests/** | routes to: rex | Writes the web app.",
        "- rex | writes: none | routes to: none | Reviews.",
    ]
    chip = config.agents["chip"]

    def validate(order: dict[str, Any], siblings: dict[str, tuple[str, ...]]) -> list[str]:
        agent = config.agents.get(order["to"])
        if agent is None or order["to"] not in config.agents["walt"].sends_to:
            return [f"to: walt may not send to {order['to']!r}"]
        return [f"files: {f!r} is outside {agent.name}'s writes" for f in order["files"]
                if not paths.covered(f, agent.writes)]

    client = client_for(fake)
    result, _ = plan(client, "", roster, "Limit password length to 64", validate=validate)
    (order,) = result.orders
    assert order["to"] == "chip" and order["files"] == ["webapp/src/**"]
    assert 3 <= len(order["acceptance"]) <= 5

    reply, _ = run_specialist(client, "brief", {}, allowed=lambda p: paths.matches_any(chip.writes, p),
                              outcomes_allowed={"done"})
    assert (reply.outcome, reply.edits) == ("done", ())

    final, _ = synthesize(client, "", roster, "Limit password length to 64", "WO-0001 done",
                          validate=validate)
    assert final.orders == ()


def test_the_fake_server_runs_as_a_program_with_a_script(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([{"content": '{"scripted": 1}',
                                   "usage": {"prompt_tokens": 7, "completion_tokens": 2}}]))
    proc = subprocess.Popen([sys.executable, str(TESTS / "fakellm.py"), "--port", "0",
                             "--script", str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        client = Client(LLMSettings(primary=Endpoint("any", url)))
        first = client.chat([{"role": "user", "content": "hi"}])
        assert first.text == '{"scripted": 1}' and first.usage.prompt_tokens == 7
        second = client.chat(specialist_messages("brief", {}))
        assert json.loads(second.text)["outcome"] == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


# -- replies that once crashed the supervisor ---------------------------------------------------------


def test_a_reply_nested_too_deeply_is_not_json_and_is_sent_back(fake: FakeLLM) -> None:
    fake.script(content="[" * 100_000 + "]" * 100_000)
    fake.script(content=done())
    reply, replies = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src,
                                    outcomes_allowed=OUTCOMES)
    assert reply.outcome == "done" and len(replies) == 2
    assert "nested too deeply" in last_user_message(fake.chat_bodies()[1])


@pytest.mark.parametrize("escaped", [True, False])
@pytest.mark.parametrize("extra", [
    {"outcome": "requeue-with-blocker", "blocker": "API \ud800 undecided"},
    {"summary": "done \udc00"},
])
def test_a_lone_surrogate_anywhere_in_a_reply_is_sent_back_with_where_it_is(
        fake: FakeLLM, extra: dict[str, Any], escaped: bool) -> None:
    # Escaped, the JSON text carries "\ud800"; raw, the reply's text holds the half character
    # itself. Either way it decodes to half a character no file or record can hold.
    text = done(**extra) if escaped else json.dumps(
        {"outcome": "done", "summary": "s", "edits": [], **extra}, ensure_ascii=False)
    fake.script(content=text)
    fake.script(content=done())
    reply, _ = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src,
                              outcomes_allowed=OUTCOMES | {"requeue-with-blocker"})
    assert reply.summary == "Added the length check."
    correction = last_user_message(fake.chat_bodies()[1])
    field = "blocker" if "blocker" in extra else "summary"
    assert f"{field}: holds \\u" in correction and "lone surrogate" in correction
    # The re-ask itself was sent (the half character of the echoed reply as U+FFFD), not a crash.
    echoed = fake.chat_bodies()[1]["messages"][-2]["content"]
    assert ("\\u" in echoed) if escaped else ("\ufffd" in echoed)


def test_an_edit_holding_a_lone_surrogate_is_sent_back_and_never_written(fake: FakeLLM,
                                                                         worktree: Path) -> None:
    fake.script(content=done({"path": "webapp/src/login.ts", "content": "x = '\ud800'\n"}))
    fake.script(content=done({"path": "webapp/src/login.ts", "content": "x = 1\n"}))
    reply, _ = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src, outcomes_allowed=OUTCOMES)
    assert "edits.0.content: holds \\ud800" in last_user_message(fake.chat_bodies()[1])
    with pytest.raises(LLMReplyError, match="lone surrogate"):
        apply_edits(worktree, "webapp", [Edit("webapp/src/login.ts", "x = '\ud800'\n")])
    assert (worktree / "src" / "login.ts").read_text() == "old\n"
    apply_edits(worktree, "webapp", reply.edits)
    assert (worktree / "src" / "login.ts").read_text() == "x = 1\n"


def test_a_plan_whose_summary_holds_a_lone_surrogate_is_sent_back(fake: FakeLLM) -> None:
    fake.script(content=json.dumps({"summary": "plan \ud83d", "orders": []}))
    fake.script(content=json.dumps({"summary": "plan", "orders": []}))
    result, _ = plan(client_for(fake), "", "", "Limit password length", validate=lambda o, s: [])
    assert result.summary == "plan"
    assert "summary: holds \\ud83d" in last_user_message(fake.chat_bodies()[1])


def test_a_file_not_sent_whole_is_marked_and_an_edit_of_it_is_sent_back(fake: FakeLLM) -> None:
    unseen = {"webapp/src/big.ts": Unseen("too large: only its first 10 characters are shown",
                                          start="// big fil"),
              "webapp/src/late.ts": Unseen("not sent: the order's files pass 240000 characters in all")}
    fake.script(content=done({"path": "webapp/src/big.ts", "content": "// big fil\n"},
                             {"path": "webapp/src/late.ts", "delete": True}))
    fake.script(content=done({"path": "webapp/src/login.ts", "content": "ok\n"}))
    reply, _ = run_specialist(client_for(fake), BRIEF, {"webapp/src/login.ts": "x\n"}, allowed=in_src,
                              outcomes_allowed=OUTCOMES, unseen=unseen)
    assert [e.path for e in reply.edits] == ["webapp/src/login.ts"]
    first, second = fake.chat_bodies()
    shown = first["messages"][1]["content"]
    assert '<file path="webapp/src/big.ts" truncated="true" note="too large: only its first 10' in shown
    assert "// big fil\n</file>" in shown
    assert '<file path="webapp/src/late.ts" omitted="true" note="not sent: the order' in shown
    assert "you may not edit or delete it" in shown
    correction = last_user_message(second)
    assert ("edits.0.path 'webapp/src/big.ts': was not sent to you whole (too large: only its first 10 "
            "characters are shown)") in correction
    assert "edits.1.path 'webapp/src/late.ts': was not sent to you whole" in correction


@pytest.mark.parametrize("wrapped", [
    "<think>I must answer with {outcome, summary} and {edits}.</think>\n\nREPLY",
    "I will reply with {outcome, summary} as asked:\nREPLY\nThat is all.",
    '<THINKING>{"outcome": "blocked"} no, better:</THINKING>\n```json\nREPLY\n```',
    # Once: the small object in the prose was taken for the reply, and the model re-asked (and paid).
    'The file had {"strict": false}; I set it to true. My reply:\nREPLY',
])
def test_a_valid_reply_after_thinking_or_prose_with_braces_is_accepted(fake: FakeLLM, wrapped: str) -> None:
    fake.script(content=wrapped.replace("REPLY", done()))
    reply, replies = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src, outcomes_allowed=OUTCOMES)
    assert reply.summary == "Added the length check." and len(replies) == 1


@pytest.mark.parametrize(("extra", "error"), [
    ({"summary": "Done.\x1b]0;owned\x07\x1b[2J"}, "summary: contains a control character"),
    ({"summary": "Done.\x00"}, "summary: contains a control character"),
    ({"summary": "   "}, "summary: is empty"),
    ({"summary": "x" * (64 * 1024 + 1)}, "summary: is longer than 65536 bytes"),
    ({"outcome": "requeue-with-blocker", "blocker": "API\x1b[31m undecided"},
     "blocker: contains a control character"),
])
def test_a_summary_or_blocker_a_result_file_could_not_hold_is_sent_back(
        fake: FakeLLM, extra: dict[str, Any], error: str) -> None:
    # What a command's result file may not say (SPEC §6), a model may not say either: a
    # terminal escape would be printed by `coordinator show`, a huge summary fill every context.
    fake.script(content=done(**extra))
    fake.script(content=done())
    result, replies = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src,
                                     outcomes_allowed=OUTCOMES | {"requeue-with-blocker"})
    assert result.summary == "Added the length check." and len(replies) == 2
    assert error in last_user_message(fake.chat_bodies()[1])


def test_a_plan_or_review_summary_a_report_could_not_hold_is_sent_back(fake: FakeLLM) -> None:
    fake.script(content=json.dumps({"summary": "All done\x1b]8;;http://x.invalid\x07", "orders": []}))
    fake.script(content=json.dumps({"summary": "All done.", "orders": []}))
    result, _ = synthesize(client_for(fake), "", "", "Limit password length", "WO-1: done",
                           validate=lambda o, s: [])
    assert result.summary == "All done."
    assert "summary: contains a control character" in last_user_message(fake.chat_bodies()[1])


def test_a_query_value_of_base_url_refuses_a_reply_only_when_it_is_named_a_secret(fake: FakeLLM) -> None:
    """A gateway's ?api-version=2024-08-01-preview is no secret: a reply setting that version in
    the code was refused three times as "holding the API key"; its ?api-key= value still is one."""
    version = "2024-08-01-preview"
    secret = "gw-0123456789abcdef"
    edit = {"path": "webapp/src/az.py", "content": f'API_VERSION = "{version}"\n'}
    fake.script(content=done(edit))
    url = f"{fake.base_url}?api-version={version}&api-key={secret}"
    client = Client(LLMSettings(primary=Endpoint("coder", url), max_retries=0), sleep=lambda s: None)
    reply, _ = run_specialist(client, BRIEF, {"webapp/src/az.py": None}, allowed=in_src,
                              outcomes_allowed=OUTCOMES)
    assert reply.edits == (Edit("webapp/src/az.py", f'API_VERSION = "{version}"\n'),)

    for _ in range(3):
        fake.script(content=done({"path": "webapp/src/az.py", "content": f'KEY = "{secret}"\n'}))
    with pytest.raises(LLMReplyError, match="holds the API key"):
        run_specialist(client, BRIEF, {"webapp/src/az.py": None}, allowed=in_src, outcomes_allowed=OUTCOMES)


def test_a_reply_missing_two_keys_is_told_of_each(fake: FakeLLM) -> None:
    # Once: "missing required key 'outcome'" twice, and 'summary' never named, so the model's
    # next try still missed it and a re-ask was spent on it.
    fake.script(content=json.dumps({"edits": []}))
    fake.script(content=done())
    reply, _ = run_specialist(client_for(fake), BRIEF, {}, allowed=in_src, outcomes_allowed=OUTCOMES)
    assert reply.outcome == "done"
    told = last_user_message(fake.chat_bodies()[1])
    assert "- reply: missing required key 'outcome'\n- reply: missing required key 'summary'\n" in told
