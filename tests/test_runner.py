"""Attempt folders: spares made ahead of time, taken whole, cleared after a crash; scratch cleanup."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from conftest import drop, order_md, sh

from bench.harness import probe_of
from coordinator import orders, runner
from coordinator.store import Store
from coordinator.supervisor import Supervisor


def test_spares_are_complete_pairs_and_prepare_takes_one_whole(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"]}})
    assert runner.make_spares(ws, 2) == 2
    assert runner.make_spares(ws, 2) == 0  # the pool is full
    spare = ws.runtime / "spare"
    names = sorted(os.listdir(spare))
    assert [n.split("-")[0] for n in names] == ["attempt", "attempt", "log", "log"]
    for n in names:
        if n.startswith("attempt-"):
            assert sorted(os.listdir(spare / n)) == ["outbox", "scratch", "tmp"]
    order = orders.load(order_md("Spares are used", id="sp-1").encode(), path="o.md", to="chip",
                        config=ws.config, history=orders.EmptyHistory())
    attempt = runner.prepare(ws, order, 1, [])
    assert sorted(os.listdir(attempt.folder)) == ["brief.md", "order.json", "outbox", "scratch", "tmp"]
    assert attempt.logs.is_dir() and "Spares are used" in attempt.brief.read_text()
    assert len(os.listdir(spare)) == 2  # one pair taken, whole
    drop(ws, "chip", "a.md", order_md("Another runs", id="sp-2"))
    give_up = time.monotonic() + 30

    def refilled() -> int:  # the loop took the last pair for sp-2 and makes two more when idle
        done = "sp-2" in sup.records and sup.records["sp-2"].status == "done"
        return 2 if (done and len(os.listdir(spare)) == 4) or time.monotonic() > give_up else 0

    with Supervisor(ws) as sup:
        sup.run(should_stop=refilled)
    assert sup.records["sp-2"].status == "done"
    assert sorted(n.split("-")[0] for n in os.listdir(spare)) == ["attempt", "attempt", "log", "log"]


def test_clear_spares_drops_what_a_crash_left_half_made_and_keeps_whole_pairs(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"]}})
    runner.make_spares(ws, 1)
    spare = ws.runtime / "spare"
    (whole,) = [n for n in os.listdir(spare) if n.startswith("attempt-")]
    # A crash while making a spare: the log folder made, the attempt folder still under its temp name.
    (spare / "log-9-1").mkdir()
    (spare / ".new-attempt-9-1").mkdir()
    (spare / ".new-attempt-9-1" / "outbox").mkdir()
    # A crash while taking one: its log folder already gone.
    (spare / "attempt-9-2").mkdir()
    runner.clear_spares(ws)
    assert sorted(os.listdir(spare)) == sorted([whole, "log-" + whole.removeprefix("attempt-")])

def test_spares_and_runtime_folders_removed_by_hand_are_made_again(make_ws):
    """The pool of spares is remembered, not listed per attempt: a hand clean-up of
    .coordinator/ while the supervisor runs must neither break the next attempt nor stop
    spares being made."""
    import shutil

    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"]}})
    assert runner.make_spares(ws, 2) == 2
    shutil.rmtree(ws.runtime)
    order = orders.load(order_md("Runs after a clean-up", id="cl-1").encode(), path="o.md", to="chip",
                        config=ws.config, history=orders.EmptyHistory())
    attempt = runner.prepare(ws, order, 1, [])
    assert sorted(os.listdir(attempt.folder)) == ["brief.md", "order.json", "outbox", "scratch", "tmp"]
    assert attempt.logs.is_dir()
    assert runner.make_spares(ws, 2) == 2
    assert sorted(n.split("-")[0] for n in os.listdir(ws.runtime / "spare")) == ["attempt", "attempt", "log", "log"]
    taken = runner.prepare(ws, order, 2, ["the first failed"])
    assert "the first failed" in taken.brief.read_text() and len(os.listdir(ws.runtime / "spare")) == 2



def test_scratch_is_removed_after_the_attempt_when_the_specialist_left_files_in_it(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        'if [ "$COORD_ORDER_ID" = messy ]; then mkdir -p junk && echo x > junk/file; fi')}})
    drop(ws, "chip", "messy.md", order_md("Leaves files behind", id="messy"))
    drop(ws, "chip", "tidy.md", order_md("Leaves nothing", id="tidy"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    store = Store(ws.state)
    assert store.load("messy").status == "done" and store.load("tidy").status == "done"
    assert not (runner.attempt_folder(ws, "messy", 1) / "scratch").exists()
    tidy = runner.attempt_folder(ws, "tidy", 1) / "scratch"
    assert tidy.is_dir() and not os.listdir(tidy)


def test_placeholders_are_put_in_once_and_the_brief_text_is_not_searched_again(make_ws):
    ws = make_ws({"chip": {"role": "specialist",
                           "command": ["/bin/sh", "-c", 'printf "%s|%s" "$1" "$2" > "$PROBE/args"', "sh",
                                       "{id}", "{brief_text}"]}})
    drop(ws, "chip", "a.md", order_md("Mention {workspace} and {python} literally", id="lit"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
    assert Store(ws.state).load("lit").status == "done"
    first, brief = (probe_of(ws) / "args").read_text().split("|", 1)
    assert first == "lit"
    assert "Mention {workspace} and {python} literally" in brief


def test_the_readme_names_every_placeholder_a_command_may_use():
    readme = (Path(__file__).parent.parent / "README.md").read_text("utf-8")
    contract = readme.split("## The specialist contract", 1)[1].split("Its environment has", 1)[0]
    named = re.findall(r"`\{([a-z_]+)\}`", contract)
    assert named == list(runner.PLACEHOLDERS)


def test_a_folder_of_the_copy_that_is_a_link_out_of_it_is_never_granted(make_ws, tmp_path):
    """`files: webapp/src/lib/new.py` when src/lib is a link to a folder outside the copy: the
    kernel would grant where the link leads. No grant may resolve outside the working copy."""
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"], "writes": ["webapp/src/**"]}})
    outside = tmp_path / "outside"
    outside.mkdir()
    order = orders.load(order_md("Lib grows", id="lk-1", files=("webapp/src/lib/new.py",)).encode(), path="o.md",
                        to="chip", config=ws.config, history=orders.EmptyHistory())
    attempt = runner.prepare(ws, order, 1, [])
    attempt.workdir.mkdir(parents=True)
    (attempt.workdir / "src").mkdir()
    (attempt.workdir / "src" / "lib").symlink_to(outside)
    rules = runner.ruleset(ws.config.agents["chip"], order, attempt, ws)
    assert not [w for w in rules.writable if os.path.realpath(w).startswith(str(outside))], rules.writable
    assert set(rules.writable) == {str(attempt.folder), *ws.config.agents["chip"].sandbox_writable}  # no other grant


def test_the_tail_of_a_log_quoted_elsewhere_holds_no_control_characters(tmp_path):
    log = tmp_path / "output.log"
    log.write_bytes(b"ok\n\x1b[31mFAILED\x1b[0m a\x00b\tc\r\n")
    assert runner.tail(log) == "ok\n[31mFAILED[0m ab\tc"


def test_the_users_credential_agents_are_not_handed_to_a_specialist(make_ws, monkeypatch):
    for name in runner.WITHHELD:
        monkeypatch.setenv(name, "/tmp/agent.sock")
    monkeypatch.setenv("SOME_TOOL_HOME", "/opt/tool")
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"], "env": {"EXTRA": "1"}}})
    order = orders.load(order_md("Env is clean", id="env-1").encode(), path="o.md", to="chip",
                        config=ws.config, history=orders.EmptyHistory())
    env = runner.environment(ws.config.agents["chip"], runner.prepare(ws, order, 1, []), ws)
    assert {"SSH_AUTH_SOCK", "SSH_AGENT_PID", "GPG_AGENT_INFO"} == runner.WITHHELD and not runner.WITHHELD & set(env)
    assert env["SOME_TOOL_HOME"] == "/opt/tool" and env["EXTRA"] == "1"


def test_an_attempts_token_has_a_part_no_other_attempt_can_guess(make_ws):
    """The token marks every process of the attempt; one that could name another running
    attempt's token could hide among its processes when its own attempt is killed."""
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"]}})
    order = orders.load(order_md("Tokens differ", id="tk-1").encode(), path="o.md", to="chip",
                        config=ws.config, history=orders.EmptyHistory())
    first, again = runner.prepare(ws, order, 1, []), runner.prepare(ws, order, 1, [])
    assert first.token.startswith("tk-1.1.n") and len(first.token) >= len("tk-1.1.n") + 16
    assert first.token != again.token


def test_a_machine_where_no_home_folder_can_be_found_still_loads_the_team(make_ws, monkeypatch, tmp_path):
    """No $HOME and no passwd entry (an arbitrary uid in a container): Path.home() raises, and
    every command failed once an agent had a sandbox.writable entry."""
    def no_home(cls: type) -> Path:
        raise RuntimeError("Could not determine home directory.")

    writable = tmp_path / "cache"
    writable.mkdir()
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"], "sandbox": {"writable": [str(writable)]}}})
    runner._protected.cache_clear()
    monkeypatch.setattr(Path, "home", classmethod(no_home))
    try:
        assert runner.check_writable(ws.config.agents["chip"], ws) is None
    finally:
        runner._protected.cache_clear()


def test_the_tail_of_a_log_holds_no_c1_control_nor_bidirectional_override(tmp_path):
    log = tmp_path / "output.log"
    log.write_text("a\u009b31mb\u0085c \u202eabc\u202c \u2067x\u2069\n", encoding="utf-8")
    assert runner.tail(log) == "a31mbc abc x"


def test_a_result_read_strictly_tells_nothing_there_from_something_that_is_no_file(tmp_path):
    """None only when nothing is there; a link, a FIFO or a folder in its place is said to be no
    regular file, as the failed attempt's reason says (`_after_specialist`)."""
    (tmp_path / "file").write_text("outcome: done\n")
    assert runner.read_untrusted(tmp_path / "file", 100, strict=True) == b"outcome: done\n"
    assert runner.read_untrusted(tmp_path / "none", 100, strict=True) is None
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "none")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    for name in ("link", "dangling", "fifo", "folder"):
        assert runner.read_untrusted(tmp_path / name, 100) is None
        with pytest.raises(runner.NotRegularFile):
            runner.read_untrusted(tmp_path / name, 100, strict=True)
