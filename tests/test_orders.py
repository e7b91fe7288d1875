"""Work orders: every rule of SPEC §2 as a user meets it (the Problem's field, line, message)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from coordinator import config, orders
from coordinator.errors import OrderError, Problem, UsageError
from coordinator.orders import Acceptance, Branch, WorkOrder

TEAM = {
    "version": 1,
    "orchestrator": "walt",
    "agents": {
        "walt": {"role": "orchestrator", "sends_to": ["chip", "rex"]},
        "chip": {"role": "specialist", "command": ["true"], "sends_to": ["rex"],
                 "writes": ["webapp/src/**", "webapp/tests/**"]},
        "rex": {"role": "specialist", "command": ["true"], "writes": ["webapp/**", "api/**"]},
        "idle": {"role": "specialist", "writes": ["webapp/**"]},
    },
}

# SPEC §2's Markdown example, verbatim.
SPEC_EXAMPLE = """\
---
id: login-length          # optional; assigned when absent
from: walt                # optional; "user" when absent
priority: high            # low | normal (default) | high | urgent
blocked_by: [WO-0007]     # optional: orders that must be done first
references: [WO-0005]     # optional: earlier orders this one follows up
timeout: 20m              # optional: overrides the agent's timeout
---
**Objective:** The login form rejects passwords over 64 characters with a clear message.

**Acceptance:**
- Submitting a 65-character password shows "Password too long"
- Passwords of 64 characters or fewer still log in
- `make test` passes

**Files:**
- webapp/src/login.ts
- webapp/tests/test_login.py

**Branching:**
- halt-with-note if the form already enforces the limit
- route-to-rex if the change touches password hashing
- requeue-with-blocker if the API contract for passwords is undecided
"""

SPEC_NORMALIZED = {
    "id": "login-length", "from": "walt", "to": "chip",
    "objective": "The login form rejects passwords over 64 characters with a clear message.",
    "acceptance": [{"text": 'Submitting a 65-character password shows "Password too long"'},
                   {"text": "Passwords of 64 characters or fewer still log in"},
                   {"text": "`make test` passes", "check": "make test"}],
    "files": ["webapp/src/login.ts", "webapp/tests/test_login.py"],
    "branching": [{"action": "halt-with-note", "when": "the form already enforces the limit"},
                  {"action": "route-to", "agent": "rex", "when": "the change touches password hashing"},
                  {"action": "requeue-with-blocker",
                   "when": "the API contract for passwords is undecided"}],
    "priority": "high", "blocked_by": ["WO-0007"], "references": ["WO-0005"], "timeout": "20m",
    "parent": None,
}

BODY = """\
**Objective:** The login form rejects long passwords.

**Acceptance:**
- A 65-character password shows "Password too long"
- A 64-character password still logs in
- `make test` passes

**Files:**
- webapp/src/login.ts

**Branching:**
- halt-with-note if the form already enforces the limit
"""


@dataclass
class History:
    """A workspace's earlier orders, in memory: id -> (blocked_by, sender, to, objective, status)."""

    orders: dict[str, tuple[tuple[str, ...], str, str, str, str]] = field(default_factory=dict)

    def add(self, oid: str, *, blocked_by: tuple[str, ...] = (), sender: str = "user", to: str = "chip",
            objective: str = "", status: str = "done") -> History:
        self.orders[oid] = (blocked_by, sender, to, objective, status)
        return self

    def exists(self, order_id: str) -> bool:
        return order_id in self.orders

    def same_id(self, order_id: str) -> str | None:
        return next((o for o in self.orders if o.lower() == order_id.lower() and o != order_id), None)

    def waiting(self, order_id: str) -> str | None:
        return None

    def blocked_by_of(self, order_id: str) -> tuple[str, ...]:
        return self.orders[order_id][0] if order_id in self.orders else ()

    def ended(self, sender: str, to: str, objective: str) -> list[tuple[str, str]]:
        key = orders.objective_key(objective)
        return [(oid, o[4]) for oid, o in self.orders.items()
                if (o[1], o[2]) == (sender, to) and orders.objective_key(o[3]) == key
                and o[4] in orders.FEEDBACK_STATUSES]


@pytest.fixture
def team() -> config.Config:
    return config.from_mapping(TEAM)


def problems_of(data: str | bytes, path: str = "inbox/chip/fix.md", to: str | None = "chip") -> list[Problem]:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(OrderError) as info:
        orders.parse(raw, path=path, to=to)
    return info.value.problems


def only(problems: list[Problem], field: str) -> Problem:
    found = [p for p in problems if p.field == field]
    assert len(found) == 1, problems
    return found[0]


def load_problems(data: str, team: config.Config, history: orders.History | None = None, *,
                  to: str = "chip", path: str = "inbox/chip/fix.md", sender: str | None = None,
                  ) -> list[Problem]:
    with pytest.raises(OrderError) as info:
        orders.load(data.encode(), path=path, to=to, config=team,
                    history=history or orders.EmptyHistory(), sender=sender)
    return info.value.problems


def with_front(front: str, body: str = BODY) -> str:
    return f"---\n{front}\n---\n{body}"


# --- the three formats -------------------------------------------------------------------


def test_spec_markdown_example_gives_the_spec_normalized_form() -> None:
    order = orders.parse(SPEC_EXAMPLE.encode(), path="inbox/chip/login.md", to="chip")
    assert order.to_dict() == SPEC_NORMALIZED
    assert list(order.to_dict()) == list(SPEC_NORMALIZED)  # stable key order
    assert order.checks == ("make test",)
    assert order.repo == "webapp"
    assert WorkOrder.from_dict(json.loads(json.dumps(order.to_dict()))) == order


def test_spec_example_is_accepted_by_the_team_rules(team: config.Config) -> None:
    history = History().add("WO-0007").add("WO-0005")
    order = orders.load(SPEC_EXAMPLE.encode(), path="inbox/chip/login.md", to="chip", config=team,
                        history=history)
    assert order.sender == "walt" and order.priority == "high"


def test_yaml_and_json_forms_give_the_same_order() -> None:
    md = orders.parse(SPEC_EXAMPLE.encode(), path="a.md", to="chip")
    as_json = json.dumps(SPEC_NORMALIZED).encode()
    assert orders.parse(as_json, path="a.json") == md
    as_yaml = textwrap.dedent("""\
        id: login-length
        from: walt
        priority: high
        blocked_by: [WO-0007]
        references: [WO-0005]
        timeout: 20m
        objective: The login form rejects passwords over 64 characters with a clear message.
        acceptance:
          - Submitting a 65-character password shows "Password too long"
          - Passwords of 64 characters or fewer still log in
          - "`make test` passes"
        files: [webapp/src/login.ts, webapp/tests/test_login.py]
        branching:
          - {action: halt-with-note, when: the form already enforces the limit}
          - route-to-rex if the change touches password hashing
          - action: requeue-with-blocker
            when: the API contract for passwords is undecided
        """)
    assert orders.parse(as_yaml.encode(), path="inbox/chip/a.yml", to="chip") == md
    assert orders.parse(as_yaml.encode(), path="A.YAML", to="chip") == md


def test_explicit_check_key_in_yaml() -> None:
    text = textwrap.dedent("""\
        objective: Speed up the build.
        acceptance:
          - {text: The build takes under a minute, check: ./timed-build.sh}
          - text: Nothing else changes
          - {text: "`make lint` passes"}
        files: []
        branching: [halt-with-note if the build is already fast]
        """)
    order = orders.parse(text.encode(), path="o.yaml", to="chip")
    assert order.acceptance == (Acceptance("The build takes under a minute", "./timed-build.sh"),
                                Acceptance("Nothing else changes"),
                                Acceptance("`make lint` passes"))  # a mapping item: explicit only
    assert order.files == () and order.repo is None


def test_a_check_and_its_text_with_different_problems_are_both_reported() -> None:
    text = textwrap.dedent("""\
        objective: Speed up the build.
        acceptance:
          - {text: "The build takes <describe how long>", check: "./timed-build.sh <replace with a limit>"}
          - Nothing else changes
          - The logs stay quiet
        files: []
        branching: [halt-with-note if the build is already fast]
        """)
    found = problems_of(text, path="o.yaml")
    assert [(p.field, p.message) for p in found] == [
        ("acceptance.0", "still holds the template placeholder <describe how long>; replace it"),
        ("acceptance.0.check", "still holds the template placeholder <replace with a limit>; replace it")]


def test_an_item_of_the_wrong_kind_says_both_forms_it_can_take() -> None:
    text = textwrap.dedent("""\
        objective: Speed up the build.
        acceptance: [a is true, b is true, 5]
        files: []
        branching: [7]
        """)
    assert [(p.field, p.message) for p in problems_of(text, path="o.yaml")] == [
        ("acceptance.2", "must be a line of text, or a mapping with `text` (and `check`), not the number 5; "
                         '`5` was read by YAML as a number: put it in quotes ("5")'),
        ("branching.0", "must be a line like `halt-with-note if ...`, or a mapping with `action`, `when` "
                        '(and `agent`), not the number 7; `7` was read by YAML as a number: put it in quotes ("7")')]


def test_markdown_headings_any_case_other_bullets_and_objective_on_next_line() -> None:
    text = textwrap.dedent("""\
        # Login limits

        ## OBJECTIVE
        The login form rejects long passwords.

        ### acceptance
        * [ ] A 65-character password shows an error
        1. A 64-character password still logs in
        2) `npm test -- login` still passes.

        ## Files
        - `webapp/src/login.ts`

        ## Branching:
        - halt-with-note when the form already enforces the limit
        - route-to-rex: the change touches hashing
        """)
    order = orders.parse(text.encode(), path="x.markdown", to="chip")
    assert order.objective == "The login form rejects long passwords."
    assert [a.text for a in order.acceptance][0] == "A 65-character password shows an error"
    assert order.acceptance[2].check == "npm test -- login"
    assert order.files == ("webapp/src/login.ts",)
    assert order.branching == (Branch("halt-with-note", "the form already enforces the limit"),
                               Branch("route-to", "the change touches hashing", "rex"))
    assert "- route-to-rex if the change touches hashing" in orders.render(order)


def test_bom_and_crlf_are_tolerated() -> None:
    data = b"\xef\xbb\xbf" + SPEC_EXAMPLE.replace("\n", "\r\n").encode()
    assert orders.parse(data, path="a.md", to="chip").to_dict() == SPEC_NORMALIZED


def test_defaults_when_front_matter_is_absent() -> None:
    order = orders.parse(BODY.encode(), path="a.md", to="chip")
    assert (order.id, order.sender, order.priority, order.timeout, order.parent) == (
        None, "user", "normal", None, None)
    assert order.blocked_by == () and order.references == ()


def test_unknown_extension_names_the_allowed_kinds() -> None:
    p = only(problems_of(BODY, path="inbox/chip/fix.txt"), "")
    assert "is a .txt file; a work order is a .md, .markdown, .yaml, .yml or .json file" in p.message
    assert orders.parse(BODY.encode(), path="-", to="chip", kind="markdown").objective


# --- objective ---------------------------------------------------------------------------


@pytest.mark.parametrize(("objective", "message"), [
    ("", "is empty; say in one sentence what will be true when the work is done"),
    ("x" * 281, "is 281 characters; keep it to one sentence of at most 280"),
    ("Fix the \x1b[31mlogin\x1b[0m form.", "contains a control character; remove it"),
    ("Fix the login form\u202e.enod", "contains a control character; remove it"),  # shown reversed
])
def test_objective_rules(objective: str, message: str) -> None:
    text = json.dumps({**SPEC_NORMALIZED, "objective": objective})
    p = only(problems_of(text, path="inbox/chip/fix.json"), "objective")
    assert p.message == message and p.path == "inbox/chip/fix.json"


def test_objective_of_280_characters_is_fine() -> None:
    text = json.dumps({**SPEC_NORMALIZED, "objective": "x" * 280})
    assert len(orders.parse(text.encode(), path="a.json").objective) == 280


def test_objective_on_two_lines_is_refused_at_its_line() -> None:
    text = "**Objective:** The login form\nrejects long passwords.\n\n" + BODY.split("\n\n", 1)[1]
    p = only(problems_of(text), "objective")
    assert str(p) == ("inbox/chip/fix.md:1: objective: must be one line; join the lines or split it "
                      "into several items")


# --- acceptance --------------------------------------------------------------------------


def test_two_acceptance_items_gives_the_spec_message() -> None:
    text = textwrap.dedent("""\
        # Fix the login form

        **Objective:**
        The login form rejects long passwords.


        **Acceptance:**
        - A 65-character password shows an error
        - `make test` passes

        **Files:**
        - webapp/src/login.ts

        **Branching:**
        - halt-with-note if the form already enforces the limit
        """)
    assert [str(p) for p in problems_of(text)] == [
        "inbox/chip/fix.md:7: acceptance: has 2 items; a work order needs 3 to 5 testable items"]


def test_the_same_criterion_twice_is_refused_where_it_repeats() -> None:
    """Three copies of one criterion passed the count of three: it is one criterion."""
    text = BODY.replace("- A 64-character password still logs in", "- a 65-character password  shows \"PASSWORD too long\"")
    assert [str(p) for p in problems_of(text)] == [
        "inbox/chip/fix.md:5: acceptance.1: repeats item 1; a work order needs 3 to 5 different testable items"]
    # The same words with another check are another criterion.
    yaml_text = ("objective: The tests pass\nacceptance:\n  - {text: The suite is green, check: make test}\n"
                 "  - {text: The suite is green, check: make lint}\n  - The form says why\n"
                 "files: [webapp/src/login.ts]\nbranching: [halt-with-note if it already does]\n")
    assert len(orders.parse(yaml_text.encode(), path="o.yaml", to="chip").acceptance) == 3


def test_six_acceptance_items_and_empty_or_wrapped_items() -> None:
    items = "\n".join(f"- result {i}" for i in range(6))
    text = BODY.replace('- A 65-character password shows "Password too long"', items)
    assert only(problems_of(text), "acceptance").message.startswith("has 8 items;")
    text = BODY.replace("- A 64-character password still logs in", "-\n- wrapped\n  onto a second line")
    found = problems_of(text)
    assert (only(found, "acceptance.1").message, only(found, "acceptance.1").line) == (
        "is empty; write a result anyone can check", 5)
    assert only(found, "acceptance.2").message.startswith("must be one line")
    assert not [p for p in found if p.field == "acceptance"]  # 4 items is fine


def test_a_paragraph_after_a_blank_line_ends_the_list_and_is_said_at_its_own_line() -> None:
    """Glued onto the last item, a note made a one-line item read as two lines."""
    found = problems_of(BODY + "\nNote: ask chip first.\n")
    assert [(p.field, p.line, p.message) for p in found] == [
        ("branching", BODY.count("\n") + 2, "'Note: ask chip first.' follows the list after a blank line, so "
         "it belongs to no item; make it an item (`- …`), move it into the objective, or make it a comment "
         "(<!-- … -->)")]


@pytest.mark.parametrize("comment", ["\n<!-- ask chip first -->\n", "<!--\nask chip\nfirst\n-->\n",
                                     "\n<!-- one --> \n"])
def test_an_html_comment_after_the_list_is_read_as_nothing(comment: str) -> None:
    assert orders.parse((BODY + comment).encode(), path="fix.md", to="chip").branching == \
        orders.parse(BODY.encode(), path="fix.md", to="chip").branching


@pytest.mark.parametrize(("item", "check"), [
    ("`make test` passes", "make test"),
    ("`pytest -q tests/test_login.py` still passes.", "pytest -q tests/test_login.py"),
    ("Running `make test` passes", None),  # must begin with the command
    ("`make test` is green", None),  # must end with `passes`
])
def test_check_is_taken_from_backticks_and_passes(item: str, check: str | None) -> None:
    order = orders.parse(BODY.replace("- `make test` passes", f"- {item}").encode(), path="a.md", to="chip")
    assert order.acceptance[2] == Acceptance(item.strip(), check)


# --- files -------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "words"), [
    ("webapp/../../etc/passwd", "contains '..'"),
    ("/etc/passwd", "is absolute"),
    ("~/notes.md", "starts with ~"),
    ("webapp\\src\\x.ts", "backslash"),
    ("webapp/.git/config", ".git component"),
    ("webapp/.GIT/hooks/pre-commit", ".git component"),
    ("webapp/src/.Git", ".git component"),
    ("webapp//src/x.ts", "empty component"),
    ("webapp/src/x\x07.ts", "control character"),
    ("webapp/src/x\x9b31m.ts", "control character"),  # C1: a terminal's CSI
    ("webapp/src/x\u202eyp.ts", "control character"),  # shown as webapp/src/xst.py
    ("*/src/x.ts", "must name a repository"),
    # No file system holds it: taken, working out its sandbox grant stopped the supervisor.
    ("webapp/src/" + "a" * 256 + ".ts", "a file name is at most 255"),
    ("webapp/" + "é" * 128 + "/x.ts", "has a name of 256 bytes"),
])
def test_hostile_file_entries_are_refused_with_their_line(entry: str, words: str) -> None:
    text = BODY.replace("- webapp/src/login.ts", f"- webapp/src/login.ts\n- {entry}")
    p = only(problems_of(text), "files.1")
    assert words in p.message and p.line == 10


@pytest.mark.parametrize(("entry", "shown"), [
    ("webapp/.gitmodules", ".gitmodules"),
    ("webapp/src/.Gitmodules", ".Gitmodules"),
    ("webapp/git~1", "git~1"),
    ("webapp/GIT~1/config", "GIT~1"),
    ("webapp/.gi?modules", ".gitmodules"),
])
def test_file_entries_naming_git_internals_are_refused_as_a_writes_glob_is(entry: str, shown: str) -> None:
    # Taken, the order ran and the gate denied whatever it changed there: it could never be done.
    text = BODY.replace("- webapp/src/login.ts", f"- webapp/src/login.ts\n- {entry}")
    p = only(problems_of(text), "files.1")
    assert p.message == (f"{entry!r} matches {shown}: git internals (.git, .gitmodules) are never writable, "
                         "whatever writes says; name the files the work changes")
    assert p.line == 10
    fine = BODY.replace("- webapp/src/login.ts", "- webapp/src/gitmodules.ts\n- webapp/**")
    assert orders.parse(fine.encode(), path="a.md", to="chip").files == ("webapp/src/gitmodules.ts", "webapp/**")


@pytest.mark.parametrize("entry", ["webapp/src/a.ts, webapp/src/b.ts", "webapp/src/a.ts,webapp/tests/b.py",
                                   "webapp/src/a.ts webapp/src/b.ts", "webapp/src/**, webapp"])
def test_two_paths_on_one_line_are_refused_not_taken_as_one_name(entry: str) -> None:
    # Taken as one file named `a.ts, webapp/src/b.ts`: the agent's writes to either were outside it.
    text = BODY.replace("- webapp/src/login.ts", f"- {entry}")
    p = only(problems_of(text), "files.0")
    assert p.message == f"{entry!r} reads as 2 paths in one entry; give each path an entry of its own"
    fine = BODY.replace("- webapp/src/login.ts", "- webapp/docs/my notes, v2.md")
    assert orders.parse(fine.encode(), path="a.md", to="chip").files[0] == "webapp/docs/my notes, v2.md"


def test_more_than_200_files_and_read_only_orders() -> None:
    many = "\n".join(f"- webapp/src/f{i}.ts" for i in range(201))
    p = only(problems_of(BODY.replace("- webapp/src/login.ts", many)), "files")
    assert p.message.startswith("has 201 entries; at most 200") and p.line == 8
    order = orders.parse(BODY.replace("**Files:**\n- webapp/src/login.ts", "**Files:** none").encode(),
                         path="a.md", to="chip")
    assert order.files == ()


def test_missing_sections_say_what_to_add() -> None:
    found = problems_of("**Objective:** Fix it.\n")
    assert only(found, "files").message == ("is missing; add the **Files:** section with the files it "
                                            "may change (none for read-only work)")
    assert only(found, "acceptance").message.startswith("is missing; add the **Acceptance:** section")
    p = only(problems_of('{"objective": "Fix it."}', path="a.json"), "branching")
    assert p.message.startswith("is missing; add the `branching` key with 1 to 10 rules")


def test_files_outside_the_recipients_writes(team: config.Config) -> None:
    text = BODY.replace("- webapp/src/login.ts", "- webapp/src/login.ts\n- webapp/docs/**")
    p = only(load_problems(text, team), "files.1")
    assert str(p) == ("inbox/chip/fix.md:10: files.1: 'webapp/docs/**' is outside what chip may write "
                      "(webapp/src/**, webapp/tests/**); narrow it, or send the order to an agent that "
                      "may write there")


def test_files_and_writes_with_a_shells_braces_are_refused(team: config.Config, tmp_path: Path) -> None:
    # Taken as plain characters: the agent that wrote webapp/src/a.ts was denied and signalled.
    text = BODY.replace("- webapp/src/login.ts", "- webapp/src/{login,logout}.ts")
    p = only(load_problems(text, team), "files.0")
    assert str(p) == ("inbox/chip/fix.md:9: files.0: 'webapp/src/{login,logout}.ts' uses braces {a,b}, which are "
                      "no glob here (only *, **, ? and [...]); give each alternative as an entry of its own")
    assert orders.load(BODY.replace("login.ts", "{login}.ts").encode(), path="o.md", to="chip", config=team,
                       history=orders.EmptyHistory())  # one name in braces is a name
    path = tmp_path / "coordinator.yaml"
    path.write_text("version: 1\nagents:\n  chip: {role: specialist, writes: ['webapp/{src,tests}/**']}\n")
    with pytest.raises(config.ConfigError, match=r"^coordinator.yaml: agents.chip.writes.0: 'webapp/\{src,tests\}/\*\*' "
                                                 r"uses braces \{a,b\}, which are no glob here"):
        config.load(path)


def test_files_in_two_repositories(team: config.Config) -> None:
    text = BODY.replace("- webapp/src/login.ts", "- webapp/src/login.ts\n- api/auth.py")
    p = only(load_problems(text, team, to="rex", path="inbox/rex/x.md"), "files")
    assert p.message.startswith("names 2 repositories (api, webapp); an order works in one repository")


def test_an_order_to_the_orchestrator_stays_inside_its_agents_writes(team: config.Config) -> None:
    order = orders.load(BODY.encode(), path="inbox/walt/a.md", to="walt", config=team,
                        history=orders.EmptyHistory())
    assert order.to == "walt"
    text = BODY.replace("webapp/src/login.ts", "docs/readme.md")
    p = only(load_problems(text, team, to="walt", path="inbox/walt/a.md"), "files.0")
    assert "outside what walt's agents (chip, rex) may write" in p.message


# --- branching ---------------------------------------------------------------------------


def test_branching_counts_and_unknown_rules() -> None:
    assert only(problems_of(BODY.replace("- halt-with-note if the form already enforces the limit", "")),
                "branching").message.startswith("has 0 rules; give 1 to 10")
    eleven = "\n".join(f"- halt-with-note if case {i}" for i in range(11))
    assert only(problems_of(BODY.replace("- halt-with-note if the form already enforces the limit",
                                         eleven)), "branching").message.startswith("has 11 rules")
    p = only(problems_of(BODY + "- escalate if it is hard\n"), "branching.1")
    assert p.line == 13 and "'escalate if it is hard' is not a rule" in p.message
    p = only(problems_of(BODY + "- route-to if it is hard\n"), "branching.1.agent")
    assert p.message == "route-to needs an agent: write route-to-<agent> if …" and p.line == 13
    p = only(problems_of(BODY + "- halt-with-note if\n"), "branching.1")
    assert "is not a rule" in p.message


def test_yaml_branching_rules() -> None:
    base = {**SPEC_NORMALIZED}
    base["branching"] = [{"action": "halt-with-note", "agent": "rex", "when": "done already"},
                         {"action": "escalate", "when": "hard"}, {"action": "route-to", "when": " "}]
    found = problems_of(json.dumps(base), path="a.json")
    assert only(found, "branching.0").message == "only route-to names an agent; remove it from halt-with-note"
    assert only(found, "branching.1.action").message.startswith("unknown action 'escalate'; use")
    assert only(found, "branching.2.agent").message.startswith("route-to needs an agent")
    assert only(found, "branching.2.when").message == "is empty; say when to take this branch"


@pytest.mark.parametrize("invisible", ["\u200b", "\u2060\ufeff", " \u200b "])
def test_an_objective_or_item_of_only_invisible_characters_is_empty(invisible: str) -> None:
    # Taken, the board showed the order with a blank objective, and a blank item counted as testable.
    text = BODY.replace("The login form rejects long passwords.", invisible)
    text = text.replace("- A 64-character password still logs in", f"- {invisible}")
    found = problems_of(text)
    assert only(found, "objective").message.startswith("is empty; say in one sentence")
    assert only(found, "acceptance.1").message.startswith("is empty")


def test_a_route_to_agent_that_is_no_agent_name_is_said_as_for_from() -> None:
    # It was "'Rex' is not in the form this key takes (^[a-z][a-z0-9_-]{0,31}$)": a pattern, no words.
    base = {**SPEC_NORMALIZED, "branching": [{"action": "route-to", "agent": "Rex", "when": "it is hard"}]}
    p = only(problems_of(json.dumps(base), path="a.json"), "branching.0.agent")
    assert p.message == "'Rex' is not an agent name (lowercase letters, digits, '-', '_')"


def test_route_to_an_agent_the_recipient_may_not_send_to(team: config.Config) -> None:
    order = orders.load((BODY + "- route-to-rex if it touches hashing\n").encode(), path="a.md",
                        to="chip", config=team, history=orders.EmptyHistory())
    assert order.branching[1] == Branch("route-to", "it touches hashing", "rex")
    p = only(load_problems(BODY + "- route-to-walt if it is a plan\n", team), "branching.1.agent")
    assert p.message == "chip may not route work to walt (it sends to: rex)" and p.line == 13
    # An agent that runs nothing: the follow-up a route filed was rejected at once, the work lost.
    idle = config.from_mapping({**TEAM, "agents": {**TEAM["agents"], "chip": {
        **TEAM["agents"]["chip"], "sends_to": ["rex", "idle"]}}})
    p = only(load_problems(BODY + "- route-to-idle if it is for later\n", idle), "branching.1.agent")
    assert p.message == ("idle has no `command` or `llm` in coordinator.yaml, so nothing could run the order "
                         "this route files; route to another agent") and p.line == 13


# --- keys, ids, senders, recipients --------------------------------------------------------


def test_unknown_keys_suggest_the_closest() -> None:
    p = only(problems_of(with_front("priorty: high")), "priorty")
    assert p.line == 2 and p.message.startswith("unknown key; did you mean 'priority'? the keys are:")
    p = only(problems_of(json.dumps({**SPEC_NORMALIZED, "zzz": 1}), path="a.json"), "zzz")
    assert "did you mean" not in p.message
    p = only(problems_of(BODY + "\n**Acceptence:**\n- x\n"), "")
    assert p.message.startswith("unknown section 'Acceptence'; did you mean 'Acceptance'?")
    p = only(problems_of(BODY + "\n**Priority:** high\n"), "priority")
    assert p.message.startswith("goes in the front matter")


def test_an_unknown_key_with_a_line_break_is_one_line_of_the_rejection() -> None:
    """`send` printed such a key raw: its error ran over lines, one reading as a heading."""
    [p] = problems_of(with_front('"prio\\n## Objective": high'))
    assert str(p).startswith("inbox/chip/fix.md:2: prio\\x0a## Objective: unknown key;")
    assert len(str(p).splitlines()) == 1


def test_sections_given_twice_and_text_before_the_first() -> None:
    p = only(problems_of(with_front("objective: Another one."), ), "objective")
    assert p.message == "is given twice (lines 2 and 4); keep one" and p.line == 4
    p = only(problems_of("Hello team,\nplease do this.\n\n" + BODY), "")
    assert p.line == 1 and p.message.startswith("text before the first section")


@pytest.mark.parametrize(("front", "field_name", "words"), [
    ("id: -bad", "id", "is not an order id"),
    ("id: 42", "id", 'must be text, not a number; `id: 42` was read by YAML as a number: put it in quotes ("42")'),
    ("priority: hgih", "priority", "must be one of low, normal, high, urgent"),
    ("timeout: soon", "timeout", "is not a duration; write e.g. 90s, 20m or 1h"),
    ("timeout: 0s", "timeout", "'0s' is no time at all; give a duration above 0, e.g. 90s, 20m or 1h"),
    ("blocked_by: [WO 7]", "blocked_by.0", "is not an order id"),
    ("from: Walt", "from", "is not an agent name"),
    ("to: no", "to", "must be text, not true/false"),
])
def test_front_matter_values(front: str, field_name: str, words: str) -> None:
    p = only(problems_of(with_front(front), to=None if field_name == "to" else "chip"), field_name)
    assert words in p.message and p.line == 2


def test_duplicate_id_is_rejected(team: config.Config) -> None:
    p = only(load_problems(with_front("id: WO-0003"), team, History().add("WO-0003")), "id")
    assert str(p) == ("inbox/chip/fix.md:2: id: 'WO-0003' is already used in this workspace; pick "
                      "another id or leave it out to get one assigned")


def test_an_id_used_in_another_case_is_rejected_as_a_duplicate_naming_the_first(team: config.Config) -> None:
    """`Login-Fix` and `login-fix` would share state/orders/<id>/ and wo/<id> on a case-insensitive
    file system: the second is refused as a duplicate; an id that differs otherwise is not."""
    history = History().add("Login-Fix")
    p = only(load_problems(with_front("id: login-fix"), team, history), "id")
    assert str(p) == ("inbox/chip/fix.md:2: id: 'login-fix' is 'Login-Fix', already used in this workspace, in "
                      "another case (on a case-insensitive file system the two would share one folder); pick "
                      "another id or leave it out to get one assigned")
    p = only(load_problems(with_front("blocked_by: [login-fix]"), team, history), "blocked_by.0")
    assert p.message == "no order 'login-fix' in this workspace; there is 'Login-Fix': write the id in its case"
    order = orders.load(with_front("id: login-fix-2").encode(), path="inbox/chip/fix.md", to="chip", config=team,
                        history=history)
    assert order.id == "login-fix-2"


def test_blocked_by_must_exist_and_not_form_a_cycle(team: config.Config) -> None:
    p = only(load_problems(with_front("blocked_by: [WO-0009]"), team), "blocked_by.0")
    assert p.message.startswith("no order 'WO-0009' in this workspace") and p.line == 2
    p = only(load_problems(with_front("id: a\nblocked_by: [a]"), team), "blocked_by.0")
    assert p.message == "an order cannot wait on itself"
    history = History().add("b", blocked_by=("c",)).add("c", blocked_by=("a",))
    p = only(load_problems(with_front("id: a\nblocked_by: [b]"), team, history), "blocked_by")
    assert p.message.startswith("a -> b -> c -> a is a dependency cycle")


def test_a_repository_not_under_repos_is_said_at_the_line_of_the_entry_that_names_it(
        team: config.Config, tmp_path: Path) -> None:
    (tmp_path / "webapp" / ".git").mkdir(parents=True)
    yaml_order = textwrap.dedent("""\
        objective: The API and the webapp agree on the password limit.
        acceptance: [A 65-character password is refused, A 64-character one is not, "`make test` passes"]
        files:
          - webapp/src/login.ts
          - api/limits.py
        branching: ["halt-with-note if they agree already"]
        """)
    with pytest.raises(OrderError) as info:
        orders.load(yaml_order.encode(), path="o.yaml", to="rex", config=team, history=orders.EmptyHistory(),
                    repos=tmp_path)
    assert [str(p) for p in info.value.problems] == [
        "o.yaml:3: files: names 2 repositories (api, webapp); an order works in one repository: send one "
        "order per repository",
        "o.yaml:5: files.1: no repository 'api' under repos/; the first component of every path names one"]
    markdown = BODY.replace("webapp/", "api/")
    with pytest.raises(OrderError) as info:
        orders.load(markdown.encode(), path="o.md", to="rex", config=team, history=orders.EmptyHistory(),
                    repos=tmp_path)
    assert [str(p) for p in info.value.problems] == [
        "o.md:9: files.0: no repository 'api' under repos/; the first component of every path names one"]
    # Without a repos/ to look in (pure validation), where the repositories are is not judged.
    assert orders.load(markdown.encode(), path="o.md", to="rex", config=team, history=orders.EmptyHistory())


@pytest.mark.parametrize("kind", ["bare", "separate git dir"])
def test_files_in_a_repository_with_no_checkout_of_its_own_are_refused_at_once(team: config.Config, tmp_path: Path,
                                                                              kind: str) -> None:
    # Taken, such an order failed every attempt ("could not prepare the working copy") and was blocked.
    source = tmp_path / "source"
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    repos = tmp_path / "repos"
    if kind == "bare":
        subprocess.run(["git", "clone", "-q", "--bare", str(source), str(repos / "webapp")], check=True)
        said = ("repos/webapp is a bare repository, with no checkout for orders to land in; move it away and put "
                "a clone of it there (git clone <it> repos/webapp)")
    else:
        subprocess.run(["git", "clone", "-q", f"--separate-git-dir={tmp_path / 'gitdir'}", str(source),
                        str(repos / "webapp")], check=True)  # fmt: skip
        said = ("repos/webapp is not a git repository with its own .git folder; put a normal clone there (not a "
                "worktree, submodule or bare repository)")
    with pytest.raises(OrderError) as info:
        orders.load(BODY.encode(), path="o.md", to="chip", config=team, history=orders.EmptyHistory(),
                    repos=repos)
    assert [str(p) for p in info.value.problems] == [f"o.md:9: files.0: {said}"]


def test_feedback_loop_needs_a_reference(team: config.Config) -> None:
    history = History().add("WO-0012", sender="walt", to="chip", status="denied",
                            objective="the LOGIN form   rejects long passwords.")
    found = load_problems(with_front("from: walt"), team, history)
    p = only(found, "references")
    assert p.message == "this repeats WO-0012, which was denied: reference it and say what changed"
    assert orders.is_feedback(p)
    order = orders.load(with_front("from: walt\nreferences: [WO-0012]").encode(), path="a.md", to="chip",
                        config=team, history=history)
    assert order.references == ("WO-0012",)
    # another sender's repeat is not this sender's loop
    assert orders.load(BODY.encode(), path="a.md", to="chip", config=team, history=history)


def test_who_may_send(team: config.Config) -> None:
    assert orders.load(with_front("from: walt").encode(), path="a.md", to="chip", config=team,
                       history=orders.EmptyHistory()).sender == "walt"
    p = only(load_problems(with_front("from: rex"), team), "from")
    assert p.message == "rex may not send to chip (it sends to: nobody)" and p.line == 2
    p = only(load_problems(with_front("from: zed"), team), "from")
    assert p.message.startswith("unknown agent 'zed'; use `user` or one of")
    # the supervisor stamps outbox files: the file's own `from` does not count
    order = orders.load(with_front("from: rex").encode(), path="outbox/x.md", to="chip", config=team,
                        history=orders.EmptyHistory(), sender="walt")
    assert order.sender == "walt"
    assert only(load_problems(BODY, team, sender="rex"), "from").message.startswith("rex may not send")


def test_recipients(team: config.Config) -> None:
    p = only(problems_of(with_front("to: rex")), "to")
    assert p.message.startswith("says 'rex' but the order is for 'chip' (its inbox)")
    assert orders.parse(with_front("to: chip").encode(), path="a.md", to="chip").to == "chip"
    assert orders.parse(with_front("to: rex").encode(), path="a.md").to == "rex"
    p = only(problems_of(BODY, to=None), "to")
    assert p.message.startswith("no recipient; drop the file in inbox/<agent>/")
    p = only(load_problems(BODY, team, to="zed", path="inbox/zed/a.md"), "to")
    assert p.message == "unknown agent 'zed'; the agents are chip, idle, rex, walt"
    p = only(load_problems(BODY, team, to="idle", path="inbox/idle/a.md"), "to")
    assert "has no `command` or `llm`" in p.message


def test_load_reports_file_and_team_problems_together(team: config.Config) -> None:
    body = BODY.replace("- A 64-character password still logs in\n", "").replace(
        "webapp/src/login.ts", "api/x.py")
    found = load_problems(with_front("from: rex", body), team)
    assert [(p.field, p.line) for p in found] == [("from", 2), ("acceptance", 6), ("files.0", 11)]


def test_check_alone_judges_a_built_order(team: config.Config) -> None:
    order = WorkOrder(id=None, sender="walt", to="rex", objective="Review the login change.",
                      acceptance=(Acceptance("a"), Acceptance("b"), Acceptance("c")),
                      files=("api/auth.py",), branching=(Branch("halt-with-note", "nothing to review"),))
    assert orders.check(order, team, orders.EmptyHistory()) == []
    found = orders.check(replace(order, sender="chip", files=("docs/x.md",)), team,
                         orders.EmptyHistory(), path="p.md")
    assert [(p.field, p.path, p.line) for p in found] == [("files.0", "p.md", None)]


# --- hostile input -------------------------------------------------------------------------


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True))


@pytest.mark.parametrize(("name", "data", "words"), [
    ("big.md", b"- x\n" * (512 * 1024), "is 2.0 MiB; a work order is at most 256 KiB"),
    ("bin.md", b"\x7fELF\x02\x01\x01\x00\x00\x00", "is binary"),
    ("ps.md", "**Objective:** Say hello\n".encode("utf-16"), "is UTF-16 text"),  # with a byte-order mark
    ("ps.yaml", "objective: Say hello\n".encode("utf-16-le"), "save it as UTF-8"),  # without one
    ("latin.md", "**Objective:** caf\xe9".encode("latin-1"), "is not UTF-8 text"),
    ("empty.md", b"", "is empty; write a work order"),
    ("blank.yaml", b"  \n\n", "is empty"),
    ("laughs.yaml", BILLION_LAUGHS.encode(), "uses a YAML alias"),
    ("laughs.md", ("---\n" + BILLION_LAUGHS + "---\n" + BODY).encode(), "uses a YAML alias"),
    ("deep.yaml", b"[" * 200_000, "nests deeper than 32 levels"),
    ("deep.json", b"[" * 200_000, "is not valid JSON"),
    ("list.yaml", b"- objective: x\n", "must be a mapping of keys"),
    ("list.json", b"[1, 2]", "must be a mapping of keys"),
    ("text.json", b'"just text"', "must be a mapping of keys"),
    ("bad.json", b'{"objective": "x",\n "files": [}', "is not valid JSON"),
    ("dup.json", b'{"objective": "x", "objective": "y"}', "'objective' is given twice"),
    ("dup.yaml", b"objective: x\nfiles: []\nobjective: y\n", "given twice (lines 1 and 3)"),
    ("bad.yaml", b"objective: [x\nfiles: y\n", "is not valid YAML"),
    ("tag.yaml", b"objective: !!python/object:os.system x\n", "is not valid YAML"),
    ("fm.md", b"---\nid: x\n**Objective:** x\n", "front matter opened by --- on line 1 never ends"),
    ("big.yaml", b"x: " + b"9" * 10_000 + b"\n", "is not valid YAML: Exceeds the limit"),
    ("bulk.yaml", b"files:\n" + b"  - webapp/x\n" * 6000, "holds more than 5000 values"),
])
def test_hostile_files_are_refused_with_a_clear_reason(name: str, data: bytes, words: str) -> None:
    found = problems_of(data, path=f"inbox/chip/{name}")
    assert any(words in str(p) for p in found), found


@pytest.mark.parametrize("value", ["!!binary aGVsbG8=", "!!set {a, b}", "2001-12-14", "!!float 1e400",
                                   "{a: 1}", "[1, [2, [3]]]", "null", "~", ".nan", "!!timestamp 2001-13-40"])
@pytest.mark.parametrize("key", ["objective", "acceptance", "files", "branching", "id", "priority",
                                 "blocked_by", "timeout", "to"])
def test_odd_yaml_values_only_ever_give_order_errors(key: str, value: str) -> None:
    text = json.dumps({k: v for k, v in SPEC_NORMALIZED.items() if k != key})[:-1] + f', "{key}": 0}}'
    data = text.replace(f'"{key}": 0', f'"{key}": {value}')
    try:
        orders.parse(data.encode(), path="o.yaml")
    except OrderError as e:  # the only way a bad value may show
        assert e.problems and all(isinstance(p, Problem) for p in e.problems)


def test_billion_laughs_costs_neither_time_nor_memory() -> None:
    # A child with 256 MiB of address space: building the expansion would die, not refuse.
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20))
        from coordinator import orders
        from coordinator.errors import OrderError
        try:
            orders.parse({BILLION_LAUGHS.encode()!r}, path="x.yaml", to="chip")
        except OrderError as e:
            print(e)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ("x.yaml:4: uses a YAML alias (*c) that makes it expand past 5000 values or 256 KiB; write the values "
            "out in full") in out.stdout


def test_a_yaml_alias_that_stays_small_is_read_as_the_value_it_names() -> None:
    """SPEC §2 refuses only aliases that expand past a small bound."""
    text = ("objective: &o The login form rejects long passwords\n"
            "acceptance:\n  - A 64-character password still logs in\n  - *o\n  - The form says why\n"
            "files: &f [webapp/src/login.ts]\nbranching: [halt-with-note if the form already enforces it]\n")
    order = orders.parse(text.encode(), path="o.yaml", to="chip")
    assert [a.text for a in order.acceptance] == ["A 64-character password still logs in",
                                                  "The login form rejects long passwords", "The form says why"]
    front = "---\nblocked_by: &b [WO-0007]\nreferences: *b\n---\n"  # in Markdown's front matter too
    assert orders.parse((front + BODY).encode(), path="o.md", to="chip").references == ("WO-0007",)


@pytest.mark.parametrize(("text", "said"), [
    ("a: &a [1, *a]\n", "o.yaml:1: uses the YAML alias *a inside the value it names (a loop)"),
    ("x: &x " + "y" * 60_000 + "\nz: [*x, *x, *x, *x, *x]\n", "o.yaml:2: uses a YAML alias (*x) that makes it "
                                                                "expand past 5000 values or 256 KiB"),
])
def test_a_yaml_alias_that_loops_or_expands_past_the_bound_is_refused(text: str, said: str) -> None:
    assert any(said in str(p) for p in problems_of(text.encode(), path="o.yaml"))


def test_problems_are_capped_and_in_file_order() -> None:
    many = "\n".join(f"- /abs/{i}" for i in range(150))
    found = problems_of(BODY.replace("- webapp/src/login.ts", many))
    assert len(found) == 51
    assert found[-1].message.startswith("100 more problems not shown")
    lines = [p.line for p in found[:-1]]
    assert lines == sorted(lines)  # type: ignore[type-var]


def test_order_error_message_is_one_line_with_a_count() -> None:
    with pytest.raises(OrderError) as info:
        orders.parse(b'{"objective": ""}', path="inbox/chip/x.json", to="chip")
    assert str(info.value).startswith("inbox/chip/x.json: objective: is empty; say in one sentence")
    assert str(info.value).endswith("(and 3 more)")


# --- render and template ---------------------------------------------------------------------


def test_render_round_trips_values_markdown_cannot_carry() -> None:
    order = WorkOrder(
        id="WO-0042", sender="walt", to="chip", objective="Tidy up.",
        acceptance=(Acceptance("Lint is clean", "make lint"), Acceptance("`make test` passes"),
                    Acceptance("[x] boxes stay")),
        files=("`odd`/x",), branching=(Branch("route-to", "hashing", "rex"),), parent="WO-0041")
    text = orders.render(order)
    assert orders.parse(text.encode(), path="x.md") == order
    assert "acceptance:" in text and "**Acceptance:**" not in text


def test_render_keeps_characters_beyond_the_basic_plane_readable() -> None:
    """A brief is read by an agent: an emoji in a value that goes to the YAML head stays an
    emoji, not a \\U0001F680 escape."""
    order = WorkOrder(id="WO-7", sender="walt", to="chip", objective="Ship it \U0001F680",
                      acceptance=(Acceptance("[x] boxes stay \U0001F680"), Acceptance("Lint is clean", "make lint"),
                                  Acceptance("Tests pass")),
                      files=("`odd`/x",), branching=(Branch("route-to", "hashing", "rex"),))
    text = orders.render(order)
    assert "acceptance:" in text  # the item went to the YAML head, where the emitter matters
    assert text.count("\U0001F680") == 2 and "\\U0001F680" not in text
    assert orders.parse(text.encode(), path="x.md") == order


def test_render_is_the_seed_format() -> None:
    order = orders.parse(SPEC_EXAMPLE.encode(), path="a.md", to="chip")
    text = orders.render(order)
    assert text.startswith("---\nid: login-length\nfrom: walt\nto: chip\npriority: high\n")
    assert SPEC_EXAMPLE.split("---\n", 2)[2] in text


def test_template_validates_once_its_placeholders_are_replaced(team: config.Config) -> None:
    text = orders.template("chip", team)
    found = problems_of(text, path="inbox/chip/new.md")
    # the check's placeholder is also in its item's text: said once, at the check
    assert [p.field for p in found] == ["objective", "acceptance.0", "acceptance.1", "acceptance.2.check",
                                        "branching.1.when"]
    assert all("template placeholder" in p.message for p in found)
    filled = (text.replace("<describe the outcome in one present-tense sentence>", "Login rejects long passwords.")
              .replace("<describe a result anyone can check without asking you>", "65 characters fail")
              .replace("<describe another checkable result>", "64 characters pass")
              .replace("<replace with the command that tests it>", "make test")
              .replace("<describe when the work belongs to rex>", "it touches hashing"))
    order = orders.load(filled.encode(), path="inbox/chip/new.md", to="chip", config=team,
                        history=orders.EmptyHistory())
    assert order.files == ("webapp/src/**", "webapp/tests/**") and order.checks == ("make test",)


@pytest.mark.parametrize("agent", ["walt", "rex", "idle"])
def test_templates_for_every_kind_of_agent(agent: str, team: config.Config) -> None:
    text = orders.template(agent, team)
    assert f"to: {agent}" in text and ("route-to-" in text) == (agent == "walt")
    filled = text.replace("<replace with the command that tests it>", "make test")
    for n, line in enumerate(filled.splitlines()):
        if "<describe" in line:  # filled as a person would: a different criterion each
            filled = filled.replace(line, line.split("<describe")[0] + f"something checkable number {n}", 1)
    if agent == "idle":  # the file is fine; idle has no command to run it
        assert orders.parse(filled.encode(), path="n.md").to == "idle"
    else:
        assert orders.load(filled.encode(), path="n.md", to=None, config=team,
                           history=orders.EmptyHistory()).to == agent
    with pytest.raises(UsageError, match="unknown agent 'zed'"):
        orders.template("zed", team)


def test_priorities_rank_urgent_highest() -> None:
    assert sorted(orders.PRIORITIES, key=orders.PRIORITY_RANK.__getitem__, reverse=True)[0] == "urgent"
    assert orders.PRIORITY_RANK["low"] < orders.PRIORITY_RANK["normal"] < orders.PRIORITY_RANK["high"]


def test_render_writes_a_lone_surrogate_as_an_escape_instead_of_failing() -> None:
    """A JSON order may carry "\\ud800"; its brief is still written (libyaml's emitter refuses it)."""
    order = WorkOrder(id="WO-8", sender="walt", to="chip", objective="It works \ud800",
                      acceptance=(Acceptance("[x] boxes \ud800"), Acceptance("Lint is clean", "make lint"),
                                  Acceptance("Tests pass")),
                      files=(), branching=(Branch("halt-with-note", "it is unclear"),))
    text = orders.render(order)
    assert "acceptance:" in text and "\\uD800" in text


@pytest.mark.parametrize(("value", "field_name", "said"), [
    ("when: no", "branching.0.when", 'must be a string, not false; `when: no` was read by YAML as false: put it in '
                                     'quotes ("no")'),
    ("when: 12:30", "branching.0.when", "must be a string, not the number 750; `when: 12:30` was read by YAML as a "
                                        'number: put it in quotes ("12:30")'),
    ("when: 2026-01-02", "branching.0.when", "must be a string, not the date 2026-01-02; `when: 2026-01-02` was read "
                                             'by YAML as a date: put it in quotes ("2026-01-02")'),
])
def test_a_value_yaml_read_as_no_text_says_what_yaml_made_of_the_words_written(
        value: str, field_name: str, said: str) -> None:
    """`when: no` said "must be a string, not false" and `when: 12:30` "not the number 750": the
    user wrote words, and was not told that YAML had turned them into a boolean or a number."""
    text = textwrap.dedent(f"""\
        objective: yes
        acceptance: [a is true, b is true, c is true]
        files: []
        branching:
          - action: halt-with-note
            {value}
        """)
    found = {p.field: p for p in problems_of(text, path="o.yaml")}
    assert found[field_name].message == said and found[field_name].line == 5
    assert found["objective"].message == ('must be text, not true/false; `objective: yes` was read by YAML as true: '
                                          'put it in quotes ("yes")')
    quoted = text.replace("objective: yes", 'objective: "yes"').replace(value, value.replace(": ", ": '") + "'")
    assert orders.parse(quoted.encode(), path="o.yaml", to="chip").branching[0].when == value.split(": ")[1]
