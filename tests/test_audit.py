"""The audit trail: every transition is a commit in state/ with the right author, and verify proves it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest
from conftest import drop, intake_all, order_md, sh
from hypothesis import given
from hypothesis import strategies as st

from bench.harness import LiveSupervisor
from coordinator import control, signals, verify
from coordinator.audit import Batch, StateRepo
from coordinator.errors import GitError
from coordinator.store import Store
from coordinator.supervisor import Supervisor

OUTCOMES = sh(
    'case "$COORD_ORDER_ID" in '
    'halt) printf "outcome: halt-with-note\\nsummary: nothing to do\\n" > "$COORD_RESULT";; '
    'route) printf "outcome: route-to\\nagent: rex\\nsummary: for rex\\n" > "$COORD_RESULT";; '
    'fail) exit 1;; '
    'deny) echo x > src/other.py;; '
    'wait) test -e "$PROBE/unblocked" || printf "outcome: requeue-with-blocker\\nblocker: the API is undecided'
    '\\nsummary: waiting\\n" > "$COORD_RESULT";; '
    'code) printf "x = 1\\n" > src/new.py;; '
    'esac')


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout


def run(ws):
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)


def team(make_ws):
    return make_ws({
        "chip": {"role": "specialist", "command": OUTCOMES, "writes": ["webapp/src/**"], "sends_to": ["rex"],
                 "max_failures": 1},
        "rex": {"role": "specialist", "command": sh("echo reviewed")},
    })


def test_every_status_path_is_in_state_history_with_its_actor(make_ws):
    ws = team(make_ws)
    branching = ("halt-with-note if done already", "route-to-rex if it is a review",
                 "requeue-with-blocker if the API is undecided")
    for oid in ("halt", "route", "fail", "wait", "cancelme"):
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} ends", branching=branching, id=oid))
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    drop(ws, "chip", "deny.md", order_md("Denied write", files=("webapp/src/x.py",), id="deny"))
    drop(ws, "chip", "bad.md", order_md("Rejected", acceptance=("one",), id="bad", sender="rex"))
    with Supervisor(ws) as sup:
        intake_all(sup)
        sup.handle("cancel", {"id": "cancelme", "by": "user"})
        sup.run_once(limit=60)
    recs = Store(ws.state).load_all()
    expected = {"halt": "halted", "route": "routed", "fail": "blocked", "wait": "waiting", "cancelme": "cancelled",
                "code": "done", "deny": "denied"}
    for oid, status in expected.items():
        assert recs[oid].status == status, (oid, recs[oid].report)
    state = StateRepo(ws.state)
    for rec in recs.values():
        trail = state.entries(rec.id)
        assert [(e.old, e.new) for e in trail] == [(h["from"], h["to"]) for h in rec.history], rec.id
        assert [e.author for e in trail] == [h["actor"] for h in rec.history], rec.id
    authors = {rec.id: [e.author for e in state.entries(rec.id)] for rec in recs.values()}
    assert authors["code"] == ["user", "coordinator", "chip"]
    assert authors["halt"][-1] == "chip" and authors["route"][-1] == "chip" and authors["wait"][-1] == "chip"
    assert authors["fail"][-1] == "coordinator" and authors["deny"][-1] == "coordinator"
    assert authors["cancelme"][-1] == "user"
    rejected = next(r for r in recs.values() if r.status == "rejected")
    assert authors[rejected.id] == ["rex"]
    chip_lines = git(ws.state, "log", "--author=chip", "--format=%B")
    assert "code chip: running -> done" in chip_lines and "halt chip: running -> halted" in chip_lines
    assert "cancelme" not in chip_lines
    assert subprocess.run(["git", "-C", str(ws.state), "fsck", "--strict"], capture_output=True).returncode == 0
    assert subprocess.run(["git", "-C", str(ws.repos / "webapp"), "fsck"], capture_output=True).returncode == 0
    assert not state.dirty()
    # The code commit is named by the order's record and carries the attempt.
    body = git(ws.repos / "webapp", "log", "-1", "--format=%B", recs["code"].commit)
    assert "Work-Order: code" in body and "Attempt: 1" in body


def hand_commit_after_code_lands(make_ws, *, name: str, email: str, message: str):
    """`code` lands on webapp's main, verify is clean; then a person commits a file there."""
    ws = team(make_ws)
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    run(ws)
    assert verify.verify(ws) == []
    repo = ws.repos / "webapp"
    (repo / "src" / "sneaky.py").write_text("print('no order')\n")
    git(repo, "add", "-A")
    subprocess.run(["git", "-C", str(repo), "-c", f"user.name={name}", "-c", f"user.email={email}", "commit",
                    "-qm", message], check=True)
    return ws


def test_verify_is_clean_then_catches_a_hand_commit_and_a_hand_edit(make_ws):
    ws = hand_commit_after_code_lands(make_ws, name="mallory", email="m@x", message="sneak")
    record = Store(ws.state).record_path("code")
    record.write_text(record.read_text().replace('"done"', '"queued"'))
    findings = verify.verify(ws)
    kinds = {f.kind for f in findings}
    assert "repo-commit" in kinds and "state-uncommitted" in kinds
    assert any("mallory" in f.detail and "no Work-Order trailer" in f.detail for f in findings)
    # The next supervisor start restores state/ from git and records both as `silent`.
    run(ws)
    assert Store(ws.state).load("code").status == "done"
    silent = [s for s in signals.load(ws.state) if s.kind == "silent"]
    assert any("state/ changed by hand" in s.evidence for s in silent)
    assert any("repos/webapp default branch moved" in s.evidence for s in silent)
    assert {f.kind for f in verify.verify(ws)} == {"repo-commit"}  # the hand commit stays reported


def test_a_hand_commit_with_the_trailers_of_a_done_order_is_still_reported(make_ws):
    """A trailer is text: a person's commit on the default branch naming an order that ended
    done, authored as its agent, is explained by nothing that order landed."""
    ws = hand_commit_after_code_lands(make_ws, name="chip", email="chip@agents.coordinator",
                                      message="Code lands\n\nWork-Order: code\nAgent: chip")
    [found] = verify.verify(ws)
    assert found.kind == "repo-commit" and "names code, which landed another commit" in found.detail


def test_git_replace_in_state_cannot_swap_a_commit_under_the_supervisor(make_ws):
    """`git replace` shows another commit under a commit's id: the trail is read past it, the
    record it changed is put back, and verify names the replacement."""
    ws = team(make_ws)
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    run(ws)
    record = Store(ws.state).record_path("code")
    record.write_text(record.read_text().replace('"done"', '"cancelled"'))
    git(ws.state, "add", "-A")
    forged = git(ws.state, "commit-tree", git(ws.state, "write-tree").strip(), "-p", "HEAD~1",
                 "-m", git(ws.state, "log", "-1", "--format=%B")).strip()
    head = git(ws.state, "rev-parse", "HEAD").strip()
    git(ws.state, "replace", head, forged)
    git(ws.state, "reset", "-q", "--hard")
    assert git(ws.state, "status", "--porcelain") == ""  # to git by hand, nothing changed
    found = [f.detail for f in verify.verify(ws) if f.kind == "state-foreign"]
    assert any(f"`git replace -d {head[:10]}`" in d for d in found)
    run(ws)
    assert Store(ws.state).load("code").status == "done"
    assert any("orders/code/record.json" in s.evidence for s in signals.load(ws.state) if s.kind == "silent")


def test_git_replace_in_a_repository_is_reported(make_ws):
    ws = team(make_ws)
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    run(ws)
    repo = ws.repos / "webapp"
    landed = Store(ws.state).load("code").commit
    forged = git(repo, "commit-tree", f"{landed}^{{tree}}", "-p", f"{landed}^", "-m", "Code lands").strip()
    git(repo, "replace", landed, forged)
    [found] = verify.verify(ws)
    assert found.kind == "repo-commit" and f"`git replace -d {landed[:10]}`" in found.detail


def test_a_corrupt_object_in_state_fails_verify_with_one_finding(make_ws):
    ws = team(make_ws)
    run(ws)
    head = git(ws.state, "rev-parse", "HEAD").strip()
    loose = ws.state / ".git" / "objects" / head[:2] / head[2:]
    assert loose.exists()  # commits are written loose, rolled into packs only later
    loose.chmod(0o644)
    loose.write_bytes(b"garbage")
    [found] = verify.verify(ws)
    assert found.kind == "state-foreign" and found.detail.startswith("its history cannot be read: git ")


def test_a_corrupt_object_in_state_is_said_with_what_to_do(make_ws):
    """A damaged object in state/.git stopped the supervisor, and failed `audit verify` and
    `coordinator log`, with git's words alone (`inflate: data stream error`): what to do is said."""
    from coordinator.errors import CoordinatorError

    ws = team(make_ws)
    run(ws)
    head = git(ws.state, "rev-parse", "HEAD").strip()
    loose = ws.state / ".git" / "objects" / head[:2] / head[2:]
    loose.chmod(0o644)
    loose.write_bytes(b"garbage")
    advice = "state/'s git repository is damaged: `git -C state fsck` names what is broken"
    with pytest.raises(CoordinatorError) as e:
        run(ws)
    assert advice in str(e.value)
    [found] = verify.verify(ws)
    assert advice in found.detail


def test_a_reset_of_a_default_branch_that_drops_a_done_orders_commit_is_reported(make_ws):
    """A force-push-like `git reset --hard` leaves no commit to list: the done order whose
    commit the branch lost is."""
    ws = team(make_ws)
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    run(ws)
    landed = Store(ws.state).load("code").commit
    git(ws.repos / "webapp", "reset", "-q", "--hard", f"{landed}^")
    [found] = verify.verify(ws)
    assert found.where == f"repos/webapp@{landed[:10]}"
    assert found.detail == "code ended done with this commit, which main no longer holds"


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_hand_made_merge_of_a_done_orders_commit_cannot_bring_in_a_change(make_ws, monkeypatch, in_memory):
    """A merge commit made by hand, naming a done order and merging its (already landed) commit,
    passed as that order's merge whatever else it held: a change no order explains, with
    `audit verify` clean. An honest merge of it (holding what git's merge makes) still passes."""
    from coordinator.repos import Repo

    if not in_memory:  # a git before 2.38: no `merge-tree --write-tree`
        monkeypatch.setattr(Repo, "git_version", lambda self: (2, 30))
    ws = make_ws({"chip": {"role": "specialist", "command": sh('echo x > "src/$COORD_ORDER_ID.py"'),
                           "writes": ["webapp/src/**"]}})
    for oid in ("code", "later"):  # the branch moves on past code's commit
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} lands", files=(f"webapp/src/{oid}.py",), id=oid))
        run(ws)
    webapp = ws.repos / "webapp"
    landed = Store(ws.state).load("code").commit
    assert git(webapp, "rev-parse", "HEAD").strip() != landed

    def merge_by_hand(tree: str) -> str:
        msg = "Merge wo/code into main\n\nWork-Order: code\n"
        sha = subprocess.run(["git", "-C", str(webapp), "commit-tree", tree.strip(), "-p", "HEAD", "-p", landed],
                             input=msg, capture_output=True, text=True, check=True).stdout.strip()
        git(webapp, "update-ref", "refs/heads/main", sha)
        git(webapp, "reset", "-q", "--hard")
        return sha

    merge_by_hand(git(webapp, "rev-parse", "HEAD^{tree}"))  # brings in nothing: what a merge of it makes
    assert verify.verify(ws) == []
    (webapp / "README.md").write_text("anything at all\n")
    git(webapp, "add", "README.md")
    evil = merge_by_hand(git(webapp, "write-tree"))
    [found] = verify.verify(ws)
    assert found.where == f"repos/webapp@{evil[:10]}"
    assert "'Merge wo/code into main' names code, which landed another commit" in found.detail
    assert Store(ws.state).load("later").status == "done"


@pytest.mark.parametrize("away", ["switch -q -c feature", "checkout -q --detach"])
def test_orders_land_on_the_default_branch_while_a_person_has_the_checkout_elsewhere(make_ws, away):
    """A person's `git switch` in repos/webapp took the orders' work onto their branch (main
    never got it, verify then said so); a detached HEAD failed every attempt."""
    ws = team(make_ws)
    run(ws)  # the supervisor has seen main checked out
    git(ws.repos / "webapp", *away.split())
    theirs = git(ws.repos / "webapp", "rev-parse", "HEAD")
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    run(ws)
    rec = Store(ws.state).load("code")
    assert rec.status == "done", rec.report
    assert git(ws.repos / "webapp", "rev-parse", "main").strip() == rec.commit
    assert git(ws.repos / "webapp", "rev-parse", "HEAD") == theirs
    assert not (ws.repos / "webapp" / "src" / "new.py").exists()
    assert verify.verify(ws) == []
    assert not [s for s in signals.load(ws.state) if s.kind == "silent"]
    git(ws.repos / "webapp", "switch", "-q", "main")
    run(ws)
    assert (ws.repos / "webapp" / "src" / "new.py").exists()
    assert verify.verify(ws) == [] and not [s for s in signals.load(ws.state) if s.kind == "silent"]


def test_verify_ends_a_long_list_of_findings_with_what_they_come_to(make_ws):
    """Thousands of finding lines (a deleted orders/ folder) ended with no total: an auditor
    had to count them. A last line on stderr counts them by kind; stdout stays one per finding."""
    from bench.harness import child_env, coordinator_argv

    ws = team(make_ws)
    for oid in ("a", "b"):
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} ends", id=oid))
    run(ws)
    shutil.rmtree(ws.state / "orders" / "a")
    (ws.repos / "webapp" / "README.md").write_text("by hand\n")
    git(ws.repos / "webapp", "commit", "-qam", "by hand")
    proc = subprocess.run(coordinator_argv(ws, "audit", "verify"), capture_output=True, text=True, env=child_env())
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    uncommitted = [line for line in lines if line.startswith("state-uncommitted: state/orders/a/")]
    assert uncommitted and len(lines) == len(uncommitted) + 1
    assert proc.stderr.splitlines()[-1] == \
        f"audit verify: {len(lines)} finding(s): repo-commit 1, state-uncommitted {len(uncommitted)}"


def test_verify_shows_a_hand_made_name_with_control_characters_as_text_on_its_own_line(make_ws):
    """A file made by hand in state/ whose name holds a line break printed a second line that
    read as a finding of its own (or as `audit clean: ...`), and a person's author name with a
    carriage return or an escape sequence could rewrite the finding on the terminal: each
    finding is one line, such characters shown as escapes."""
    from bench.harness import child_env, coordinator_argv

    ws = team(make_ws)
    run(ws)
    (ws.state / "x\naudit clean: every commit and state change is explained").write_text("by hand")
    (ws.repos / "webapp" / "README.md").write_text("by hand\n")
    subprocess.run(["git", "-C", str(ws.repos / "webapp"), "-c", "user.name=eve\rmallory\x1b]0;t\x07",
                    "-c", "user.email=e@x", "commit", "-qam", "by hand"], check=True)
    proc = subprocess.run(coordinator_argv(ws, "audit", "verify"), capture_output=True, text=True, env=child_env())
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "state-uncommitted: state/x\\x0aaudit clean: every commit and state change is explained: "
        "changed but not committed by the supervisor",
        proc.stdout.splitlines()[1]]
    assert proc.stdout.splitlines()[1].startswith("repo-commit: repos/webapp@")
    assert "mallory\\x1b]0;t: 'by hand' has no Work-Order trailer" in proc.stdout
    assert not [c for c in proc.stdout if c != "\n" and not c.isprintable()]


@pytest.mark.parametrize("broken", ["[]", '{"webapp": 5}', '{"webapp": {"baseline": 7}}', "a folder"])
def test_verify_reports_a_repos_json_broken_by_hand_instead_of_stopping(make_ws, broken):
    """state/repos.json made a list, an entry made a number, or a folder put in its place:
    `audit verify` stopped with "internal error: AttributeError" (or IsADirectoryError)."""
    ws = team(make_ws)
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    run(ws)
    heads = ws.state / "repos.json"
    heads.unlink()
    if broken == "a folder":
        heads.mkdir()
        (heads / "x").write_text("by hand")
    else:
        heads.write_text(broken)
    found = verify.verify(ws)
    assert found and {f.kind for f in found} == {"state-uncommitted"}
    assert all(f.where.startswith("state/repos.json") for f in found)
    run(ws)  # put back
    assert verify.verify(ws) == []


def test_a_commit_made_by_hand_in_state_is_foreign(make_ws):
    ws = team(make_ws)
    (ws.state / "note.txt").write_text("hand")
    git(ws.state, "add", "note.txt")
    subprocess.run(["git", "-C", str(ws.state), "-c", "user.name=eve", "-c", "user.email=e@x", "commit", "-qm", "x"],
                   check=True)
    assert any(f.kind == "state-foreign" and "eve" in f.detail for f in verify.verify(ws))


def test_a_reset_of_state_while_no_supervisor_runs_is_reported_and_signalled(make_ws):
    """`git reset --hard` in state/ takes orders and their history along; nothing in state/
    can show it, so the supervisor keeps its last head outside (in .coordinator/)."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    assert verify.verify(ws) == []
    before_a = git(ws.state, "log", "--format=%H", "--grep", "a chip: new -> queued").split()[0]
    moved = git(ws.state, "rev-parse", f"{before_a}^").strip()
    git(ws.state, "reset", "-q", "--hard", moved)
    assert "a" not in Store(ws.state).load_all()  # the order is gone, history and all
    [rewound] = [f for f in verify.verify(ws) if f.kind == "state-foreign"]
    assert "does not contain the supervisor's last commit" in rewound.detail
    run(ws)  # the next start puts the branch and the order back, and says it
    said = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert "while none ran" in said[0] and "does not contain" in said[0] and "put back" in said[0]
    assert "orders/a/record.json" in said[1]
    assert Store(ws.state).load("a").status == "done"
    assert git(ws.state, "rev-parse", f"refs/coordinator/set-aside/{moved}").strip() == moved
    assert verify.verify(ws) == []
    run(ws)
    assert len([s for s in signals.load(ws.state) if s.kind == "silent"]) == 2  # not said again


@pytest.mark.parametrize("wipe", ["state/ removed", "reset, reflog expired and pruned"])
def test_a_trail_wiped_while_no_supervisor_runs_is_never_clean_again(make_ws, wipe):
    """state/ removed (or reset to its first commit with the old commits pruned) while no
    supervisor ran: the next start could put nothing back, went on from what it found and
    recorded the repositories' heads anew, so `audit verify` said "audit clean" with every
    order gone and the agents' commits unexplained. That the supervisor's last commit is
    gone is kept outside state/ and listed by every verify."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    assert verify.verify(ws) == []
    last = git(ws.state, "rev-parse", "HEAD").strip()
    if wipe == "state/ removed":
        shutil.rmtree(ws.state)
    else:
        first = git(ws.state, "rev-list", "--max-parents=0", "HEAD").strip()
        git(ws.state, "reset", "-q", "--hard", first)
        git(ws.state, "reflog", "expire", "--expire=now", "--all")
        git(ws.state, "gc", "-q", "--prune=now")
    for _ in range(2):  # not only until the next start
        run(ws)
        assert "a" not in Store(ws.state).load_all()
        [lost] = [f for f in verify.verify(ws) if f.kind == "state-foreign"]
        assert f"the supervisor's commit {last[:10]} is gone from state/" in lost.detail
    said = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(said) == 1 and "does not contain the supervisor's last commit" in said[0]


def test_a_reset_of_state_beside_a_running_supervisor_loses_no_order(make_ws):
    """The branch is put back before the next batch lands on it, the files at the next look."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        before_a = git(ws.state, "log", "--format=%H", "--grep", "a chip: new -> queued").split()[0]
        git(ws.state, "reset", "-q", "--hard", f"{before_a}^")
        assert "a" not in Store(ws.state).load_all()
        drop(ws, "chip", "b.md", order_md("Second order", id="b"))
        sup.run_once(limit=30)
        verify.watch_state(sup)
    assert {r.id: r.status for r in Store(ws.state).load_all().values()} == {"a": "done", "b": "done"}
    said = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(said) == 2 and "put back" in said[0] and "orders/a/record.json" in said[1]
    assert verify.verify(ws) == []
    assert [e.new for e in StateRepo(ws.state).entries("a")] == ["queued", "running", "done"]


def hand_branch(ws, name: str = "other") -> str:
    """`git checkout -b <name>` in state/ and a commit there by hand; the commit's id."""
    git(ws.state, "checkout", "-q", "-b", name)
    (ws.state / "note.txt").write_text("hand\n")
    git(ws.state, "add", "note.txt")
    subprocess.run(["git", "-C", str(ws.state), "-c", "user.name=eve", "-c", "user.email=e@x", "commit", "-qm",
                    "a note"], check=True)
    return git(ws.state, "rev-parse", "HEAD").strip()


def assert_back_on_main(ws, hand: str) -> None:
    assert git(ws.state, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    assert git(ws.state, "rev-parse", f"refs/coordinator/set-aside/{hand}").strip() == hand
    assert not (ws.state / "note.txt").exists()
    assert {r.id: r.status for r in Store(ws.state).load_all().values()} == {"a": "done", "b": "done"}
    assert [e.new for e in StateRepo(ws.state).entries("b")] == ["queued", "running", "done"]
    assert verify.verify(ws) == []


def test_a_branch_switch_in_state_beside_a_running_supervisor_is_put_back(make_ws):
    """`git checkout -b other` and a commit there: the supervisor goes on committing on its own
    branch, not on theirs; what they did is kept aside, and said once."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        hand = hand_branch(ws)
        drop(ws, "chip", "b.md", order_md("Second order", id="b"))
        sup.run_once(limit=30)
        verify.watch_state(sup)
        verify.watch_state(sup)
    assert git(ws.state, "rev-parse", "other").strip() == hand  # their branch is theirs
    said = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(said) == 2, said
    assert "switched from main to other: put back on main" in said[0]
    assert hand[:10] in said[0] and "note.txt" in said[1]
    assert_back_on_main(ws, hand)


def test_a_branch_switch_in_state_while_no_supervisor_runs_is_put_back_at_start(make_ws):
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    hand = hand_branch(ws)
    assert any("switched from main to other" in f.detail for f in verify.verify(ws))
    drop(ws, "chip", "b.md", order_md("Second order", id="b"))
    run(ws)
    said = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert "while none ran" in said[0] and "switched from main to other: put back on main" in said[0], said
    assert_back_on_main(ws, hand)
    run(ws)
    assert len([s for s in signals.load(ws.state) if s.kind == "silent"]) == len(said)  # not said again


@pytest.mark.parametrize("switch", [("branch", "-m", "main", "other"), ("checkout", "-q", "--detach")])
def test_a_renamed_branch_or_a_detached_head_in_state_is_put_back(make_ws, switch):
    """The supervisor's branch renamed away, or HEAD detached at its commit: the next batch
    lands on `main` all the same, and that is said once."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        git(ws.state, *switch)
        drop(ws, "chip", "b.md", order_md("Second order", id="b"))
        sup.run_once(limit=30)
        verify.watch_state(sup)
    said = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(said) == 1 and "put back on main" in said[0], said
    assert git(ws.state, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    assert [e.new for e in StateRepo(ws.state).entries("b")] == ["queued", "running", "done"]
    assert verify.verify(ws) == []


HIDDEN = ("note.txt", "orders/a/extra.txt", "new/inside.txt")  # at the top, in a folder, in a new folder


@pytest.mark.parametrize("hide", ["info/exclude", "core.excludesFile", "global excludesFile",
                                  "status.showUntrackedFiles", "a .gitignore of their own"])
def test_files_hidden_from_git_in_state_by_hand_are_still_reported_and_put_back(make_ws, tmp_path, monkeypatch, hide):
    """Files made by hand in state/ that a person's git was told to ignore (state/.git/info/exclude,
    core.excludesFile in state/'s config or the user's, status.showUntrackedFiles=no): the
    supervisor's git still sees them, so `audit verify` lists them and the tamper watch puts
    them back."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    ignore = tmp_path / "ignore"
    ignore.write_text("*.txt\n")
    if hide == "info/exclude":
        (ws.state / ".git" / "info").mkdir(exist_ok=True)
        with (ws.state / ".git" / "info" / "exclude").open("a") as f:
            f.write("*.txt\n")
    elif hide == "core.excludesFile":
        git(ws.state, "config", "core.excludesFile", str(ignore))
    elif hide == "global excludesFile":
        home = tmp_path / "home"
        home.mkdir()
        (home / ".gitconfig").write_text(f"[core]\n\texcludesFile = {ignore}\n")
        monkeypatch.setenv("HOME", str(home))
        for name in ("XDG_CONFIG_HOME", "GIT_CONFIG_GLOBAL"):
            monkeypatch.delenv(name, raising=False)
    elif hide == "status.showUntrackedFiles":
        git(ws.state, "config", "status.showUntrackedFiles", "no")
    hidden = HIDDEN
    for rel in hidden:
        (ws.state / rel).parent.mkdir(exist_ok=True)
        (ws.state / rel).write_text("hand\n")
    if hide == "a .gitignore of their own":  # `*` ignores the .gitignore itself too
        hidden += tuple(f"{os.path.dirname(rel)}/.gitignore" for rel in HIDDEN[1:])
        for rel in hidden[len(HIDDEN):]:
            (ws.state / rel).write_text("*\n")
    found = {f.where for f in verify.verify(ws)}
    assert {f"state/{rel}" for rel in hidden} <= found, found
    run(ws)  # its start looks at state/ as the tamper watch does
    assert not [rel for rel in hidden if (ws.state / rel).exists()]
    [said] = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert all(rel in said for rel in hidden[:5]), said
    assert verify.verify(ws) == []


@pytest.mark.parametrize("mark", ["--assume-unchanged", "--skip-worktree"])
def test_a_record_edited_by_hand_behind_an_index_mark_is_still_reported_and_put_back(make_ws, mark):
    """`git update-index --assume-unchanged` (or `--skip-worktree`) in state/ makes git stop
    looking at a file: a record edited by hand then is still found, and put back."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    record = Store(ws.state).record_path("a")
    git(ws.state, "update-index", mark, "orders/a/record.json")
    record.write_text(record.read_text().replace('"done"', '"cancelled"'))
    assert "state/orders/a/record.json" in {f.where for f in verify.verify(ws)}
    run(ws)
    assert Store(ws.state).load("a").status == "done"
    [said] = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert said == "state/ changed by hand (restored from git): orders/a/record.json"
    assert git(ws.state, "ls-files", "-v", "orders/a/record.json").startswith("H ")
    assert verify.verify(ws) == []


def test_a_users_core_ignorestat_marks_nothing_for_the_tamper_watch(make_ws, monkeypatch, tmp_path):
    """`core.ignoreStat` in a person's git config (for a file system where lstat is slow) has
    git mark every file it stages `assume-unchanged`: the supervisor's own files must not
    look like files hidden by hand, to `audit verify` or the tamper watch."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[core]\n\tignoreStat = true\n")
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CONFIG_HOME", "GIT_CONFIG_GLOBAL"):
        monkeypatch.delenv(name, raising=False)
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    assert Store(ws.state).load("a").status == "done"
    assert verify.verify(ws) == []
    run(ws)
    assert [s for s in signals.load(ws.state) if s.kind == "silent"] == []


@pytest.mark.parametrize("how", ["git rm --cached", "git add"])
def test_a_hand_change_staged_in_state_is_put_back_as_the_last_commit_has_it(make_ws, how):
    """`git rm --cached` of a record (the file stays) or `git add` of a file made by hand: the
    index no longer says what is committed. The record is put back, never deleted (its order
    would be filed and run again), and the new file goes; the supervisor starts all the same."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    if how == "git rm --cached":
        git(ws.state, "rm", "-q", "--cached", "orders/a/record.json")
        changed = "orders/a/record.json"
    else:
        (ws.state / "orders" / "a" / "hand.json").write_text("{}\n")
        git(ws.state, "add", "orders/a/hand.json")
        changed = "orders/a/hand.json"
    assert f"state/{changed}" in {f.where for f in verify.verify(ws)}
    run(ws)
    assert Store(ws.state).load("a").status == "done"
    assert git(ws.state, "log", "--format=%s").count("a chip: queued -> running") == 1
    assert not (ws.state / "orders" / "a" / "hand.json").exists()
    [said] = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert said == f"state/ changed by hand (restored from git): {changed}"
    assert git(ws.state, "status", "--porcelain") == ""
    assert verify.verify(ws) == []


def test_a_hand_commit_in_the_supervisors_name_is_foreign_after_a_clean_stop(make_ws):
    """`git -c user.name=coordinator commit` in state/ while no supervisor runs: the committer's
    name is anyone's, the head the supervisor kept is not."""
    ws = team(make_ws)
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    run(ws)
    record = Store(ws.state).record_path("code")
    record.write_text(record.read_text().replace('"done"', '"cancelled"'))
    subprocess.run(["git", "-C", str(ws.state), "-c", "user.name=coordinator", "-c",
                    "user.email=coordinator@agents.coordinator", "commit", "-qam", "code chip: done -> cancelled"],
                   check=True)
    [found] = [f.detail for f in verify.verify(ws) if f.kind == "state-foreign"]
    assert "in the supervisor's name" in found and "by coordinator: code chip: done -> cancelled" in found
    run(ws)
    [said] = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert "while none ran" in said and "by coordinator: code chip: done -> cancelled" in said


def test_the_supervisors_own_commit_past_its_kept_head_after_a_crash_is_not_foreign(make_ws):
    """A crash between a commit and keeping its head: that commit is the supervisor's."""
    ws = team(make_ws)
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    run(ws)
    ws.state_head.write_text(git(ws.state, "rev-parse", "HEAD~1"))
    (ws.runtime / "running").touch()  # it did not stop cleanly
    assert verify.verify(ws) == []
    run(ws)
    assert [s for s in signals.load(ws.state) if s.kind == "silent"] == []


def test_a_commands_own_commit_cut_off_before_its_head_was_kept_is_not_foreign(make_ws, monkeypatch):
    """`coordinator retry` served with no supervisor running, interrupted (Ctrl-C) between its
    commit and keeping its head: its commit is the supervisor's, for verify as for the next start."""
    ws = team(make_ws)
    drop(ws, "chip", "fail.md", order_md("Fails", id="fail"))
    run(ws)
    assert Store(ws.state).load("fail").status == "blocked"
    write, once = StateRepo.write, [True]

    def cut_off(self: StateRepo, batch: Batch) -> int:
        if once:  # the retry's commit only
            once.pop()
            monkeypatch.setattr(self, "own", lambda head: (_ for _ in ()).throw(KeyboardInterrupt()))
        return write(self, batch)

    monkeypatch.setattr(StateRepo, "write", cut_off)
    with pytest.raises(KeyboardInterrupt):
        control.submit(ws, "retry", {"id": "fail"})
    assert "fail chip: blocked -> queued" in git(ws.state, "log", "-1", "--format=%s")
    assert verify.verify(ws) == []
    run(ws)
    assert [s for s in signals.load(ws.state) if s.kind == "silent"] == []


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen to sign a commit with")
def signing_person(home: Path, monkeypatch, *, name: str, email: str) -> None:
    """A person (their HOME) whose git signs commits with an ssh key and shows signatures in `log`."""
    home.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / "k")], check=True)
    (home / "allowed").write_text(f"{email} {(home / 'k.pub').read_text()}")
    (home / ".gitconfig").write_text(
        f"[gpg]\n\tformat = ssh\n[gpg \"ssh\"]\n\tallowedSignersFile = {home / 'allowed'}\n"
        f"[user]\n\tsigningkey = {home / 'k.pub'}\n\tname = {name}\n\temail = {email}\n"
        "[log]\n\tshowSignature = true\n")
    monkeypatch.setenv("HOME", str(home))
    for variable in ("XDG_CONFIG_HOME", "GIT_CONFIG_GLOBAL"):
        monkeypatch.delenv(variable, raising=False)


def test_a_signed_hand_commit_is_foreign_when_the_persons_git_shows_signatures(make_ws, tmp_path, monkeypatch):
    signing_person(tmp_path / "home", monkeypatch, name="eve", email="e@x")
    ws = team(make_ws)
    subprocess.run(["git", "-C", str(ws.state), "commit", "-q", "-S", "--allow-empty", "-m", "signed by hand"],
                   check=True)
    assert "Good" in git(ws.state, "log", "-1")  # the person's git shows the signature
    foreign = [f.detail for f in verify.verify(ws) if f.kind == "state-foreign"]
    assert len(foreign) == 1 and foreign[0].endswith("by eve: signed by hand")
    run(ws)  # a start reads state/'s history as before
    assert [f.detail for f in verify.verify(ws) if f.kind == "state-foreign"] == foreign


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen to sign a commit with")
def test_a_persons_signed_commit_in_a_repository_is_listed_when_their_git_shows_signatures(make_ws, tmp_path,
                                                                                           monkeypatch):
    """A person who signs their commits and has git show signatures commits on repos/<repo>:
    verify lists that commit, as any other, instead of finding the history unreadable (and
    checking none of its commits)."""
    signing_person(tmp_path / "home", monkeypatch, name="pat", email="p@x")
    ws = team(make_ws)
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    run(ws)
    repo = ws.repos / "webapp"
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "-S", "--allow-empty", "-m", "signed by hand"], check=True)
    assert "Good" in git(repo, "log", "-1")  # the person's git shows the signature
    found = [f.detail for f in verify.verify(ws)]
    assert len(found) == 1 and found[0] == "pat: 'signed by hand' has no Work-Order trailer", found


def test_a_batch_of_thousands_of_transitions_is_one_commit_that_keeps_every_line(tmp_path):
    """A specialist's outbox of 2,000 orders made one batch of thousands of lines: passed to
    git as one argument, its message passed the system's limit (128 KiB) and the supervisor
    stopped with an internal error. The message goes to git as a file; each line is kept, and
    a message exactly as small ones were (no line cut, nothing added)."""
    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    (repo.path / "a.json").write_text("a\n")
    lines = [f"WO-{i:04d}-{'x' * 40} chip: new -> queued (from the outbox of WO-0001)" for i in range(3000)]
    for line in lines:
        repo.stage("chip", line)
    assert repo.flush({str(repo.path / "a.json")}) == 1
    assert git(repo.path, "log", "-1", "--format=%B") == "\n".join(lines) + "\n\n"
    repo.stage("coordinator", "one line  ")
    repo.flush(set())
    raw = git(repo.path, "cat-file", "commit", "HEAD")
    assert raw.endswith("\n\none line\n") and git(repo.path, "log", "-1", "--format=%an") == "coordinator\n"


def test_a_batch_stages_exactly_what_was_written_gone_swapped_or_linked(tmp_path):
    """Files go to git by exact path; deletions, a file where a folder was (and back), links
    and folders end in the commit as `git add -A` would put them there; temp names never."""
    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    root = repo.path
    (root / "a.json").write_text("a\n")
    (root / "d").mkdir()
    (root / "d" / "x.json").write_text("x\n")
    (root / "f").write_text("file\n")
    repo.stage("coordinator", "first")
    assert repo.flush({str(root / "a.json"), str(root / "d" / "x.json"), str(root / "f")}) == 1
    (root / "a.json").unlink()
    shutil.rmtree(root / "d")
    (root / "d").write_text("now a file\n")
    (root / "f").unlink()
    (root / "f").mkdir()
    (root / "f" / "y.json").write_text("y\n")
    (root / "link").symlink_to("d")
    (root / "new").mkdir()
    (root / "new" / "z.json").write_text("z\n")
    (root / "w.tmp").write_text("half written\n")
    repo.stage("coordinator", "second")
    written = {"a.json", "d", "f", "link", "new", "w.tmp"}
    with pytest.raises(GitError):  # a temp name is refused loudly, as `git add` refuses it
        repo.flush({str(root / p) for p in written})
    (root / "w.tmp").unlink()
    repo.stage("coordinator", "second")
    assert repo.flush({str(root / p) for p in written - {"w.tmp"}}) == 1
    files = sorted(git(root, "ls-tree", "-r", "--name-only", "HEAD").split())
    assert files == [".gitignore", "README.md", "d", "f/y.json", "link", "new/z.json"]
    assert git(root, "show", "HEAD:d") == "now a file\n" and git(root, "cat-file", "-p", "HEAD:link") == "d"
    assert git(root, "status", "--porcelain") == ""


def test_batches_write_packs_that_are_rolled_up_and_records_still_diff_as_text(tmp_path, monkeypatch):
    """A batch's files go into one pack, not a loose object each; the packs of many batches
    are rolled up as the batches are written, so state/ keeps a few; `git log -p` still shows
    records as text."""
    from coordinator import audit

    monkeypatch.setattr(audit, "PACK_LIMIT", 4)
    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    root = repo.path
    packs = root / ".git" / "objects" / "pack"
    first_blobs = _loose(root, "blob")
    assert len(first_blobs) == 2
    most = 0
    for batch in range(9):
        written = set()
        for i in range(5):
            (root / f"o{i}").mkdir(exist_ok=True)
            (root / f"o{i}" / "record.json").write_text(f'{{"order": {i}, "batch": {batch}}}\n')
            written.add(str(root / f"o{i}" / "record.json"))
        repo.stage("coordinator", f"batch {batch}")
        assert repo.flush(written) == 1
        assert _loose(root, "blob") <= first_blobs  # README.md and .gitignore, from `init`
        most = max(most, len(list(packs.glob("pack-*.pack"))))
    assert most < 4 and repo.notes == []  # rolled up by the batches themselves
    assert git(root, "fsck", "--strict", "--no-dangling") == ""
    assert git(root, "status", "--porcelain") == ""
    assert git(root, "show", "HEAD:o3/record.json") == '{"order": 3, "batch": 8}\n'
    assert '+{"order": 3, "batch": 8}' in git(root, "log", "-p", "-1", "--", "o3/record.json")
    assert len(git(root, "log", "--format=%s").splitlines()) == 10  # each batch once, and init


def without_room_to_repack(repo: StateRepo) -> None:
    """`repo`'s roll-ups fail as on a full disk; everything else git does in it works."""
    real = repo.git

    def git_without_room(*args: str, **kwargs: object) -> str:
        if args and args[0] == "repack":
            raise GitError("git repack failed in state/: No space left on device")
        return real(*args, **kwargs)

    repo.git = git_without_room  # type: ignore[method-assign]


def test_a_roll_up_that_fails_is_said_and_the_batch_is_committed_once(tmp_path, monkeypatch):
    """A repack that fails (a full disk, say) after the batch's commits landed: the batch is in
    the history once, the failure is a note for the supervisor to say, nothing is raised."""
    from coordinator import audit

    monkeypatch.setattr(audit, "PACK_LIMIT", 1)
    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    without_room_to_repack(repo)
    (repo.path / "r.json").write_text("{}\n")
    repo.stage("coordinator", "WO-0001 chip: running -> done")
    assert repo.flush({str(repo.path / "r.json")}) == 1
    assert git(repo.path, "log", "--format=%s").splitlines() == [
        "WO-0001 chip: running -> done", "state: initialise the audit trail"]
    assert repo.notes == ["could not roll up state/'s 1 packs (they are kept): "
                          "git repack failed in state/: No space left on device"]


def test_the_supervisor_says_a_failed_roll_up_and_goes_on(make_ws, monkeypatch):
    from coordinator import audit

    monkeypatch.setattr(audit, "PACK_LIMIT", 1)
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        without_room_to_repack(sup.audit)
        for i in range(2):
            drop(ws, "chip", f"o{i}.md", order_md(f"Order {i} is done", id=f"o{i}"))
            sup.run_once(limit=30)
    assert [Store(ws.state).load(f"o{i}").status for i in range(2)] == ["done", "done"]
    assert any(line.startswith("could not roll up state/'s") and "No space left on device" in line
               for line in said), said


def _loose(root: Path, kind: str) -> set[str]:
    objects = root / ".git" / "objects"
    found = "".join(d.name + f.name + "\n" for d in objects.iterdir() if len(d.name) == 2 for f in d.iterdir())
    out = subprocess.run(["git", "cat-file", "--batch-check"], cwd=root, input=found, capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()[1] == kind}


@pytest.mark.slow  # 2-3 s: `make test-slow`, and CI, run it
def test_a_record_rewritten_while_the_committer_reads_it_is_never_committed_cut_short(tmp_path):
    """The loop rewrites a record (each version longer: its history grows) while the committer
    thread's git reads the last one. Every version git committed is a whole JSON document, no
    batch fails, and the index ends in step with the file."""
    import json
    import threading

    from coordinator import durable
    from coordinator.audit import Batch
    from coordinator.committer import Committer

    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    record = repo.path / "record.json"
    durable.guard(repo.path)
    committer = Committer(repo)
    stop = threading.Event()

    def rewrite() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            durable.write_json(record, {"history": list(range(n))}, sync=False)

    try:
        durable.write_json(record, {"history": []}, sync=False)
        writer = threading.Thread(target=rewrite)
        writer.start()
        try:
            for i in range(100):
                committer.submit(Batch([("coordinator", [f"batch {i}"], [])], {str(record)}))
            committer.drain()
        finally:
            stop.set()
            writer.join()
        committer.submit(Batch([("coordinator", ["last"], [])], {str(record)}))
        committer.stop()
    finally:
        durable.guard(repo.path, on=False)
    versions = git(repo.path, "log", "--format=%H", "--", "record.json").split()
    assert len(versions) > 10
    for sha in versions:
        json.loads(git(repo.path, "show", f"{sha}:record.json"))  # whole, not cut short
    assert git(repo.path, "status", "--porcelain") == ""


def test_while_git_reads_a_batch_only_renames_onto_its_paths_wait(tmp_path):
    """The loop is not held up by the committer for records git is not reading: a rename onto
    a path of the batch (or into one of its folders) waits until git is done, others go on."""
    import threading

    from coordinator import durable

    state = tmp_path / "state"
    (state / "orders" / "a").mkdir(parents=True)
    (state / "orders" / "b").mkdir(parents=True)
    (state / "new").mkdir()
    outside = tmp_path / "elsewhere.json"
    durable.guard(state)
    try:
        with durable.staging([state / "orders" / "a" / "record.json", state / "new"]):
            writes = {name: threading.Thread(target=durable.write_json, args=(path, {"v": 2}), kwargs={"sync": False})
                      for name, path in {"a": state / "orders" / "a" / "record.json",
                                         "in-new": state / "new" / "x.json",
                                         "b": state / "orders" / "b" / "record.json", "outside": outside}.items()}
            for t in writes.values():
                t.start()
            for name in ("b", "outside"):
                writes[name].join(30)
                assert not writes[name].is_alive(), f"{name} waited for git"
            writes["a"].join(0.3)
            writes["in-new"].join(0.3)
            assert writes["a"].is_alive() and writes["in-new"].is_alive()  # held while git reads
            assert not (state / "orders" / "a" / "record.json").exists() and not (state / "new" / "x.json").exists()
        for name in ("a", "in-new"):
            writes[name].join(30)
            assert not writes[name].is_alive()
        assert durable.read_json(state / "orders" / "a" / "record.json") == {"v": 2}
        # Two stagings at once (two supervisors in one process): the one that ends first does
        # not free the other's paths, and a rename off a path being read waits too.
        busy = state / "orders" / "b" / "record.json"
        with durable.staging([busy]):
            with durable.staging([state / "orders" / "a" / "record.json"]):
                pass
            moving = threading.Thread(target=durable.move, args=(busy, state / "moved.json"), kwargs={"sync": False})
            moving.start()
            moving.join(0.3)
            assert moving.is_alive() and busy.exists()
        moving.join(30)
        assert not moving.is_alive() and (state / "moved.json").exists()
    finally:
        durable.guard(state, on=False)


def test_a_record_staged_from_memory_holds_up_no_rewrite_while_git_reads_the_rest(tmp_path, monkeypatch):
    """The committer thread stages a batch while the loop rewrites records. What the batch
    stages from memory git never reads from the disk, so a rewrite of it goes on at once (a
    guard over the whole batch held the loop for as long as the blobs took to pack, tens of ms
    with a few thousand records); a rename into what git does read waits until it is done."""
    from coordinator import durable

    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    record = repo.path / "orders" / "a" / "record.json"
    record.parent.mkdir(parents=True)
    (repo.path / "new").mkdir()
    durable.guard(repo.path)
    durable.open_journal(repo.path)
    seen: dict[str, bool] = {}
    started: list[threading.Thread] = []
    original = StateRepo._add_from_disk

    def add_from_disk(self: StateRepo, root: str, rel: list[str]) -> None:
        rewrite = threading.Thread(target=durable.write_json, args=(record, {"v": 2}), kwargs={"sync": False})
        into_new = threading.Thread(target=durable.write_json, args=(repo.path / "new" / "x.json", {"v": 1}),
                                    kwargs={"sync": False})
        rewrite.start()
        into_new.start()
        rewrite.join(10)
        into_new.join(0.3)
        seen["rewritten"], seen["held"] = not rewrite.is_alive(), into_new.is_alive()
        started.extend((rewrite, into_new))
        original(self, root, rel)

    monkeypatch.setattr(StateRepo, "_add_from_disk", add_from_disk)
    try:
        durable.write_json(record, {"v": 1}, sync=False)
        written = durable.take_journal(repo.path)
        repo.write(Batch([("coordinator", ["a: queued"], [])], {str(record), str(repo.path / "new")}, written))
    finally:
        for thread in started:
            thread.join(30)
        durable.close_journal(repo.path)
        durable.guard(repo.path, on=False)
    assert seen == {"rewritten": True, "held": True}
    assert json.loads(git(repo.path, "show", "HEAD:orders/a/record.json")) == {"v": 1}  # as the batch wrote it
    assert durable.read_json(record) == {"v": 2}


def test_a_batch_lands_on_top_of_a_commit_made_meanwhile_and_keeps_its_authors(tmp_path):
    """The supervisor's commits go on whatever the branch holds when they are written: a hand
    commit made since the last batch stays in the history (to be flagged), it is not dropped."""
    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    (repo.path / "note.txt").write_text("hand")
    git(repo.path, "add", "note.txt")
    subprocess.run(["git", "-C", str(repo.path), "-c", "user.name=eve", "-c", "user.email=e@x", "commit", "-qm",
                    "by hand"], check=True)
    hand = git(repo.path, "rev-parse", "HEAD").strip()
    (repo.path / "a.json").write_text("{}\n")
    repo.stage("walt", "a walt: new -> queued")
    repo.stage("coordinator", "a walt: queued -> running   ")  # kept as `git commit -m` keeps it: trimmed
    assert repo.flush({str(repo.path / "a.json")}) == 2
    log = git(repo.path, "log", "--format=%an|%cn|%s", "-3").splitlines()
    assert log == ["coordinator|coordinator|a walt: queued -> running", "walt|coordinator|a walt: new -> queued",
                   "eve|eve|by hand"]
    assert git(repo.path, "merge-base", "--is-ancestor", hand, "HEAD") == ""
    assert git(repo.path, "show", "HEAD~1:a.json") == "{}\n"  # the files are in the first commit of the batch
    assert git(repo.path, "status", "--porcelain") == ""


def test_a_change_staged_by_hand_stays_out_of_the_supervisors_commit(make_ws):
    """`git add` of a hand edit in state/ puts it in the index the supervisor's commits are
    written from: it was committed as the supervisor's, out of the tamper watch's sight."""
    ws = team(make_ws)
    drop(ws, "chip", "code.md", order_md("Code lands", files=("webapp/src/new.py",), id="code"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        record = Store(ws.state).record_path("code")
        record.write_text(record.read_text().replace('"done"', '"cancelled"'))
        (ws.state / "orders" / "forged").mkdir()
        (ws.state / "orders" / "forged" / "record.json").write_text("{}\n")
        git(ws.state, "add", "-A")
        drop(ws, "chip", "b.md", order_md("Another order", id="b"))
        sup.run_once(limit=30)
        assert '"done"' in git(ws.state, "show", "HEAD:orders/code/record.json")
        assert "orders/forged" not in git(ws.state, "ls-tree", "-r", "--name-only", "HEAD")
        verify.watch_state(sup)
    assert Store(ws.state).load("code").status == "done"
    assert not (ws.state / "orders" / "forged").exists()
    [said] = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert "orders/code/record.json" in said and "orders/forged/record.json" in said
    assert verify.verify(ws) == []


def test_a_commit_racing_a_batch_keeps_its_files_and_the_batch_lands_on_it(tmp_path):
    """Someone commits in state/ after the supervisor wrote its tree and before it moved the
    branch: the batch is made again on the new head, with a tree that still holds their file."""
    class Racing(StateRepo):
        raced = False

        def git(self, *args: str, actor: str = "coordinator", stdin: BinaryIO | None = None) -> str:
            if args[0] == "update-ref" and not self.raced:
                self.raced = True
                (self.path / "hand.txt").write_text("hand")
                git(self.path, "add", "hand.txt")
                subprocess.run(["git", "-C", str(self.path), "-c", "user.name=eve", "-c", "user.email=e@x",
                                "commit", "-qm", "by hand"], check=True)
            return super().git(*args, actor=actor, stdin=stdin)

    repo = Racing(tmp_path / "state")
    StateRepo.ensure(repo.path)
    (repo.path / "a.json").write_text("{}\n")
    repo.stage("walt", "a walt: new -> queued")
    assert repo.flush({str(repo.path / "a.json")}) == 1 and repo.raced
    assert git(repo.path, "log", "--format=%an|%s", "-2").splitlines() == ["walt|a walt: new -> queued",
                                                                          "eve|by hand"]
    assert git(repo.path, "show", "HEAD:hand.txt") == "hand" and git(repo.path, "show", "HEAD:a.json") == "{}\n"
    assert git(repo.path, "status", "--porcelain") == ""


def test_group_commit_shares_commits_under_load_and_loses_no_line(make_ws):
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": []}})
    for i in range(60):
        drop(ws, "walt", f"o{i}.md", order_md(f"Request {i} is answered", id=f"o{i}"))
    run(ws)
    state = StateRepo(ws.state)
    lines = [e.line for e in state.entries() if e.order]
    assert sorted(lines) == sorted(f"o{i} walt: new -> queued" for i in range(60))
    commits = int(git(ws.state, "rev-list", "--count", "HEAD"))
    assert commits < 30  # 60 transitions, far fewer commits


def test_a_line_never_moves_before_a_line_that_names_its_order_or_that_it_names():
    from coordinator.audit import _group

    pending = [("chip", "WO-1 chip: running -> done"),
               ("coordinator", "WO-2 rex: waiting -> queued (WO-1 done)"),
               ("chip", "WO-3 chip: running -> done"),      # about neither: joins chip's first commit
               ("chip", "WO-2 rex: queued -> running"),     # about WO-2: after the line that freed it
               ("coordinator", "WO-12 chip: queued -> running"),
               ("chip", "WO-4 chip: running -> done (follow-up WO-5.)"),
               ("coordinator", "WO-5 rex: new -> queued"),
               ("rex", "WO-6 rex: running -> failed (no src/WO-7-notes.md)"),
               ("coordinator", "WO-7 rex: queued -> running")]
    assert [(actor, lines) for actor, lines, _ in _group(pending)] == [
        ("chip", ["WO-1 chip: running -> done", "WO-3 chip: running -> done"]),
        ("coordinator", ["WO-2 rex: waiting -> queued (WO-1 done)", "WO-12 chip: queued -> running"]),
        ("chip", ["WO-2 rex: queued -> running", "WO-4 chip: running -> done (follow-up WO-5.)"]),
        ("coordinator", ["WO-5 rex: new -> queued"]),
        ("rex", ["WO-6 rex: running -> failed (no src/WO-7-notes.md)"]),
        ("coordinator", ["WO-7 rex: queued -> running"]),
    ]


def test_a_crash_between_a_state_write_and_its_commit_is_repaired_at_start(make_ws):
    ws = team(make_ws)
    drop(ws, "chip", "halt.md", order_md("Order halt ends", id="halt",
                                         branching=("halt-with-note if done already",)))
    with Supervisor(ws) as sup:
        sup._intake_step()
        # Written to disk (as at the end of a step), not yet committed: where a kill -9 would hit.
        sup._write_state()
        sup.audit._pending.clear()
        (ws.runtime / "running").touch()
        sup._opened = False  # simulate death: no final flush, marker left behind
        sup.close()
    (ws.runtime / "running").touch()
    assert StateRepo(ws.state).dirty()
    run(ws)
    msgs = git(ws.state, "log", "--format=%s")
    assert "recovery: commit state written before a crash" in msgs
    assert Store(ws.state).load("halt").status == "halted"
    assert not StateRepo(ws.state).dirty()


def test_verify_after_a_crash_tells_the_supervisors_uncommitted_writes_from_hand_changes(make_ws):
    """After a kill -9, `audit verify` listed the dead supervisor's own writes (which its next
    start commits) exactly as it listed a hand edit or a deleted record: "changed but not
    committed by the supervisor", an auditor could not tell a crash from tampering."""
    ws = team(make_ws)
    drop(ws, "chip", "done.md", order_md("Order done ends", id="done"))
    run(ws)
    drop(ws, "chip", "halt.md", order_md("Order halt ends", id="halt", branching=("halt-with-note if done already",)))
    with Supervisor(ws) as sup:
        sup._intake_step()
        sup._write_state()  # written (and journaled), not yet committed: where a kill -9 would hit
        sup.audit._pending.clear()
        sup._opened = False  # dies: no final commit, its journal left behind
        sup.close()
    (ws.runtime / "running").touch()
    (ws.state / "README.md").write_text("edited by hand\n")
    report = ws.state / "orders" / "done" / "report.md"
    report.unlink()
    found = {f.where: f.detail for f in verify.verify(ws)}
    assert found["state/README.md"] == "changed but not committed by the supervisor"
    assert found["state/orders/done/report.md"] == "deleted, and not by the supervisor"
    record = found["state/orders/halt/record.json"]
    assert record.startswith("written by the supervisor, not committed yet") and "next start commits it" in record
    assert "stopped before its commit" in found["state/orders/halt"]


def test_dirty_lists_every_file_changed_or_added_by_hand_however_deep_and_no_temp_file(make_ws):
    """New folders are named by git once and then listed file by file: the tamper watch
    restores exactly these paths, and never a temp file."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    state = StateRepo(ws.state)
    assert state.dirty() == [] and state.dirty() == []
    nested = ws.state / "orders" / "zz" / "deep" / "deeper"
    nested.mkdir(parents=True)
    (nested / "x.json").write_text("{}")
    (ws.state / "orders" / "zz" / "y.md").write_text("y")
    (ws.state / "orders" / "zz" / ".tmp-record.json.1").write_text("a crash's temp file")
    (ws.state / "orders" / "a" / "planted.txt").write_text("beside the supervisor's files")
    record = Store(ws.state).record_path("a")
    record.write_text(record.read_text().replace('"done"', '"queued"'))
    assert sorted(state.dirty()) == ["orders/a/planted.txt", "orders/a/record.json",
                                     "orders/zz/deep/deeper/x.json", "orders/zz/y.md"]
    assert sorted(state.dirty(optional_locks=False)) == sorted(state.dirty())


# -- audit verify beside a running supervisor -----------------------------------------------------------
@pytest.mark.slow  # some 6 s: `make test-slow`, and CI, run it
def test_verify_beside_a_busy_supervisor_lists_nothing_it_is_about_to_commit(make_ws):
    """A busy supervisor commits its writes about once a second: a check in between sees them
    uncommitted, and the records' newest transitions not yet in the history. Those are checked
    again after its next commits, so a check while orders flow is clean."""
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"], "max_parallel": 4}})
    stop = threading.Event()
    dropped = [0]

    def keep_dropping() -> None:
        while not stop.is_set():
            drop(ws, "chip", f"o{dropped[0]}.md", order_md(f"Order {dropped[0]} is done"))
            dropped[0] += 1
            time.sleep(0.005)

    dropping = threading.Thread(target=keep_dropping)
    with LiveSupervisor(ws) as sup:
        try:
            dropping.start()
            said: list[str] = []
            for _ in range(3):
                time.sleep(0.3)
                assert verify.verify(ws, say=said.append) == []
            assert said  # there was something in flight to look at again
        finally:
            stop.set()
            if dropping.is_alive():
                dropping.join(timeout=30)
    assert sup.proc is not None and sup.proc.returncode == 0, list(sup.lines)
    assert not any("Traceback" in line for line in sup.lines)
    assert dropped[0] > 100
    assert verify.verify(ws) == []


@pytest.mark.slow  # 2-3 s: `make test-slow`, and CI, run it
def test_verify_beside_a_running_supervisor_still_reports_what_stays_uncommitted(make_ws):
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"]}})
    with Supervisor(ws):  # running (it holds the workspace), committing nothing more
        (ws.state / "notes.txt").write_text("written by hand\n")
        said: list[str] = []
        found = verify.verify(ws, say=said.append)
    assert [str(f) for f in found] == ["state-uncommitted: state/notes.txt: changed but not committed by the supervisor"]
    assert said == ["a supervisor is running: checking 1 finding(s) again after its next commits"]


# -- another git in state/ ---------------------------------------------------------------------------------
def test_a_commit_waits_for_another_gits_index_lock_instead_of_failing(tmp_path):
    """`git status` in state/ (a person's, or `audit verify` beside the supervisor) takes
    index.lock to refresh the index; staging then found the lock taken and the supervisor
    stopped. It now waits for the lock to go."""
    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    lock = repo.path / ".git" / "index.lock"
    lock.write_bytes(b"")
    threading.Timer(0.5, lock.unlink).start()  # the other git is done half a second later
    (repo.path / "notes.json").write_text("{}\n")
    repo.stage("coordinator", "notes: written")
    repo.flush()
    assert git(repo.path, "log", "-1", "--format=%s").strip() == "notes: written"
    assert git(repo.path, "status", "--porcelain") == ""


def test_a_lock_left_by_a_dead_git_is_cleared_after_the_wait_and_the_commit_made(tmp_path, monkeypatch):
    from coordinator import trail

    monkeypatch.setattr(trail, "LOCK_WAIT", 0.3)
    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    lock = repo.path / ".git" / "index.lock"
    lock.write_bytes(b"")
    long_ago = time.time() - 60
    os.utime(lock, (long_ago, long_ago))  # no git process holds it: a killed one left it
    (repo.path / "notes.json").write_text("{}\n")
    repo.stage("coordinator", "notes: written")
    repo.flush()
    assert not lock.exists()
    assert git(repo.path, "log", "-1", "--format=%s").strip() == "notes: written"


def test_a_branch_lock_a_killed_git_left_in_state_is_cleared_at_start_and_the_trail_goes_on(make_ws):
    """A kill -9 of the supervisor during its `update-ref` (or of a `git commit` in state/) leaves
    refs/heads/main.lock: every start after it stopped on "File exists", with the orders' ends
    written but never committed. The start now clears it, says so, and commits as before."""
    ws = team(make_ws)
    lock = ws.state / ".git" / "refs" / "heads" / "main.lock"
    lock.write_bytes(b"")
    long_ago = time.time() - 60
    os.utime(lock, (long_ago, long_ago))
    drop(ws, "chip", "halt.md", order_md("Order halt ends", id="halt", branching=("halt-with-note if done already",)))
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        sup.run_once(limit=60)
    assert not lock.exists()
    assert any("refs/heads/main.lock" in line for line in said), said
    assert "halt chip: running -> halted" in git(ws.state, "log", "--format=%B")
    assert verify.verify(ws) == []


def test_a_lock_held_all_along_is_an_error_naming_the_git_command(tmp_path, monkeypatch):
    from coordinator import trail

    monkeypatch.setattr(trail, "LOCK_WAIT", 0.3)
    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    (repo.path / ".git" / "index.lock").write_bytes(b"")  # fresh: taken for a live git's
    (repo.path / "notes.json").write_text("{}\n")
    repo.stage("coordinator", "notes: written")
    with pytest.raises(GitError, match=r"^git add failed in state/: .*index\.lock'?: File exists"):
        repo.flush()


def test_verify_leaves_the_index_to_the_supervisor(make_ws):
    """verify's `git status` writes no index (it would hold index.lock while it does, in the
    way of a running supervisor's commit), even when the index is out of date."""
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"]}})
    run(ws)
    record = next((ws.state / "orders").glob("*/record.json"), None) or ws.state / ".gitignore"
    later = time.time() + 5
    os.utime(record, (later, later))  # same content, new time: a status would refresh the index
    index = ws.state / ".git" / "index"
    before = index.stat().st_mtime_ns
    assert verify.verify(ws) == []
    assert index.stat().st_mtime_ns == before


def test_a_follow_up_is_committed_after_the_ending_that_made_it(make_ws):
    """The block is the agent's line and the escalation's filing the supervisor's: grouped by
    author into one batch, the filing could land in an earlier commit than its cause. It names
    its cause now, and comes after it in the history."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
                     'printf "outcome: blocked\\nsummary: stuck\\n" > "$COORD_RESULT"')},
                  "rex": {"role": "specialist", "command": sh("true")}}, escalate_to="rex")
    drop(ws, "chip", "o.md", order_md("It works", id="o"))
    run(ws)
    follow = Store(ws.state).load("o").report["follow_up"]["id"]
    lines = git(ws.state, "log", "--reverse", "--format=%B").splitlines()
    blocked = next(i for i, line in enumerate(lines) if line.startswith("o chip: running -> blocked"))
    filed = next(i for i, line in enumerate(lines) if line.startswith(f"{follow} rex: new -> queued"))
    assert blocked < filed, lines
    assert lines[filed] == f"{follow} rex: new -> queued (escalation of o)"


# -- hand edits are never committed as the supervisor's (SPEC §7.5) ---------------------------------
def status(ws) -> str:
    """`git status` of state/ without git's untracked cache, which may still list a folder
    emptied within the same clock tick as its last look (the README says so)."""
    return git(ws.state, "-c", "core.untrackedCache=false", "status", "--porcelain")


def test_a_command_served_with_no_supervisor_running_puts_a_hand_edit_back(make_ws):
    """`budget add`, `rotate`, `cancel` and `retry` with no supervisor running open the
    workspace themselves: a hand edit found then is put back and recorded, not committed
    with the command's own change."""
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"]},
                  "chip": {"role": "specialist", "command": sh("true"), "writes": ["webapp/src/**"]}},
                 orchestrator="walt")
    drop(ws, "chip", "a.md", order_md("Counted work", id="a", sender="walt"))
    run(ws)
    ledger = ws.state / "orchestrator" / "ledger.json"
    kept = ledger.read_text()
    ledger.write_text('{"generation": 1, "items": []}\n')
    from coordinator import control
    control.submit(ws, "budget-add", {"tokens": 5, "note": "after the edit"})
    assert status(ws) == ""
    items = {(i["ref"], i["kind"]) for i in __import__("json").loads(ledger.read_text())["items"]}
    assert ("a", "order") in items and len(items) == len(__import__("json").loads(kept)["items"]) + 1
    last = git(ws.state, "log", "-1", "-p", "--format=%s", "--", "orchestrator/ledger.json")
    assert "+5 manual" in last and '-  "items": [\n' not in last  # the command's change, not the edit's
    silent = [s for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(silent) == 1 and "orchestrator/ledger.json" in silent[0].evidence


def test_after_a_crash_the_supervisors_own_writes_are_committed_and_a_later_hand_edit_is_put_back(make_ws):
    from test_recovery import abandon

    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    sup = Supervisor(ws)
    sup.open()
    drop(ws, "chip", "b.md", order_md("Second order", id="b"))
    sup._intake_step()
    sup._write_state()  # on disk, not committed: then the supervisor dies
    abandon(sup)
    assert "record.json" in git(ws.state, "status", "--porcelain", "--untracked-files=all")
    record_a = Store(ws.state).record_path("a")
    record_a.write_text(record_a.read_text().replace('"done"', '"queued"'))  # by hand, after the crash
    (ws.state / "planted.txt").write_text("by hand")
    run(ws)
    assert Store(ws.state).load("a").status == "done"  # put back, never run again
    assert not (ws.state / "planted.txt").exists()
    assert Store(ws.state).load("b").status == "done"
    recovery = git(ws.state, "log", "--format=%B", "--grep=recovery: commit state")
    assert "orders/b/" in recovery and "orders/a/" not in recovery and "planted" not in recovery
    silent = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(silent) == 1 and "orders/a/record.json" in silent[0] and "planted.txt" in silent[0]


def test_a_hand_commit_in_state_beside_a_running_supervisor_is_signalled_once(make_ws):
    ws = team(make_ws)
    with Supervisor(ws) as sup:
        sup.run_once(limit=10)
        (ws.state / "README.md").write_text("changed\n")
        git(ws.state, "add", "README.md")
        subprocess.run(["git", "-C", str(ws.state), "-c", "user.name=eve", "-c", "user.email=e@x", "commit",
                        "-qm", "tidy the readme"], check=True)
        verify.watch_state(sup)
        verify.watch_state(sup)  # said once
        drop(ws, "chip", "a.md", order_md("After the hand commit", id="a"))
        sup.run_once(limit=30)
    silent = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(silent) == 1 and "by eve: tidy the readme" in silent[0]
    assert Store(ws.state).load("a").status == "done"


def hand_commit(ws, message: str, *, name: str = "eve", email: str = "e@x") -> None:
    report = ws.state / "orders" / "a" / "report.md"
    report.write_text(report.read_text() + "\nApproved by the boss.\n")
    subprocess.run(["git", "-C", str(ws.state), "-c", f"user.name={name}", "-c", f"user.email={email}", "commit",
                    "-qam", message], check=True)


def test_a_hand_commit_in_state_just_before_the_supervisor_stops_is_still_signalled(make_ws):
    """The tamper watch looks every few seconds; a hand commit its last batches landed on, with
    no look after it before the stop, was never signalled (and its head was kept past it)."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First", id="a"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        hand_commit(ws, "a chip: report amended")
        drop(ws, "chip", "b.md", order_md("Second", id="b"))
        sup.run_once(limit=30)
    silent = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(silent) == 1 and "by eve: a chip: report amended" in silent[0], silent
    assert Store(ws.state).load("b").status == "done"


def test_a_hand_commit_in_the_supervisors_name_stays_foreign_once_it_went_on_past_it(make_ws):
    """`git -c user.name=coordinator commit` in state/ beside a running supervisor (or while none
    ran, then a start): it was signalled once, then `audit verify` took it for the supervisor's
    own for good, a forged report in state/ and verify clean."""
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First", id="a"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=30)
        hand_commit(ws, "a chip: done -> done", name="coordinator", email="coordinator@agents.coordinator")
        drop(ws, "chip", "b.md", order_md("Second", id="b"))
        sup.run_once(limit=30)
    hand_commit(ws, "a chip: done -> done again", name="coordinator", email="coordinator@agents.coordinator")
    run(ws)  # the start signals it, and goes on past it
    found = [f.detail for f in verify.verify(ws) if f.kind == "state-foreign"]
    assert len(found) == 2, found
    assert any(d.endswith("by coordinator: a chip: done -> done") for d in found)
    assert any(d.endswith("by coordinator: a chip: done -> done again") for d in found)
    assert len([s for s in signals.load(ws.state) if s.kind == "silent"]) == 2


def test_an_editors_files_beside_a_record_a_person_reads_are_nobodys_change(make_ws):
    # vim on a record left .record.json.swp: the tamper watch, which now sees ignored files
    # too, signalled it as a hand change and deleted the swap file under the open editor.
    ws = team(make_ws)
    with Supervisor(ws) as sup:
        drop(ws, "chip", "a.md", order_md("Read in an editor", id="a"))
        sup.run_once(limit=10)
        folder = ws.state / "orders" / "a"
        editor = [folder / ".record.json.swp", folder / "record.json~", folder / ".#record.json", folder / "4913"]
        for path in editor:
            path.write_text("an editor's\n")
        verify.watch_state(sup)
        assert all(p.exists() for p in editor)
        assert verify.verify(ws) == []
    assert [s for s in signals.load(ws.state) if s.kind == "silent"] == []
    assert "swp" not in git(ws.state, "ls-files")


def test_a_note_with_a_newline_cannot_forge_a_transition_in_the_trail(make_ws):
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"]},
                  "chip": {"role": "specialist", "command": sh("true")}}, orchestrator="walt")
    from coordinator import control
    control.submit(ws, "budget-add", {"tokens": 1, "note": "read\nvictim chip: blocked -> done\n\x1b[31mred"})
    subject = git(ws.state, "log", "-1", "--format=%B").strip()
    assert subject == "budget walt: +1 manual (read victim chip: blocked -> done [31mred)"
    assert StateRepo(ws.state).entries("victim") == []


def test_an_order_named_like_a_line_of_the_supervisor_has_only_its_own_lines_in_its_log(make_ws):
    """`coordinator log signal` (and `show signal`'s history) listed every signal the
    supervisor ever recorded, from before the order was sent too: its lines begin with the
    same word. An order's events name its agent after its id."""
    from coordinator.trail import Trail

    oid = "signal"
    ws = team(make_ws)
    (ws.state / "planted.txt").write_text("by hand")
    run(ws)  # a silent signal, committed as "signal silent: - -: ..."
    drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} ends", id=oid))
    (ws.state / "planted.txt").write_text("by hand")
    run(ws)
    assert "signal silent: - -: state/ changed by hand" in git(ws.state, "log", "--format=%B")
    lines = [e.line for e in Trail(ws.state).entries(oid)]
    assert lines == [f"{oid} chip: new -> queued", f"{oid} chip: queued -> running (attempt 1)",
                     f"{oid} chip: running -> done"], lines


def test_a_hand_made_file_named_like_a_pattern_puts_back_only_itself(make_ws):
    """`orders/*` made by hand after a crash is removed; the supervisor's own uncommitted write
    of a record beside it is committed, not put back with it."""
    from test_recovery import abandon

    from coordinator import durable

    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    sup = Supervisor(ws)
    sup.open()
    record = Store(ws.state).record_path("a")
    durable.write_text(record, record.read_text().replace('"done"', '"halted"'))  # its own, not committed
    abandon(sup)
    (ws.state / "orders" / "*").write_text("by hand")
    run(ws)
    assert '"halted"' in record.read_text() and not (ws.state / "orders" / "*").exists()
    silent = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert len(silent) == 1 and silent[0].endswith("(restored from git): orders/*")
    assert status(ws) == ""


def test_an_order_folder_a_crash_left_half_made_is_removed_without_a_false_signal(make_ws):
    from test_recovery import abandon

    from coordinator import durable

    ws = team(make_ws)
    run(ws)
    sup = Supervisor(ws)
    sup.open()
    (ws.state / "orders" / "zz").mkdir()
    durable.write_json(ws.state / "orders" / "zz" / "intake.json", {"to": "chip"}, sync=False)
    abandon(sup)  # killed before the original moved in
    with Supervisor(ws) as sup:
        sup.run_once(limit=10)
        verify.watch_state(sup)
    assert not (ws.state / "orders" / "zz").exists()
    assert [s for s in signals.load(ws.state) if s.kind == "silent"] == []
    assert status(ws) == ""


@pytest.mark.parametrize("journal", ["\u00b2 orders/x\n", "garbage\nmore garbage\n"])
def test_a_journal_that_cannot_be_read_is_no_journal(make_ws, journal):
    """A start after a crash with a journal this code did not write commits what it finds, as
    before there was a journal: nothing is put back on no evidence."""
    ws = team(make_ws)
    run(ws)
    (ws.runtime / "running").touch()
    (ws.runtime / "state-journal").write_text(journal)
    record = ws.state / "orders" / "extra.json"
    record.write_text("{}\n")
    with Supervisor(ws) as sup:
        sup.run_once(limit=10)
    assert record.exists() and status(ws) == ""


def test_the_running_loops_look_at_state_finds_a_hand_edit_and_none_of_its_own_writes(make_ws):
    """In the running loop the committer thread looks at state/ while orders keep moving: the
    records written meanwhile are the supervisor's own, never reported; a hand edit is put
    back and reported once."""
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/true"], "max_parallel": 4}}, max_parallel=4)
    ids = [f"o{i:03d}" for i in range(120)]
    for oid in ids[:60]:
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} is done", id=oid))
    with Supervisor(ws) as sup:
        steps = 0
        while not all(oid in sup.records and sup.records[oid].status == "done" for oid in ids):
            steps += 1
            if steps % 5 == 0:
                sup._last_watch = float("-inf")  # look again: many looks, each racing the writes
            if steps == 40:
                (ws.state / "planted.txt").write_text("by hand")
                for oid in ids[60:]:  # more orders to move while the look that finds it runs
                    drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} is done", id=oid))
            if not sup.step(paced=True):
                sup._wait(0.02)
            assert steps < 20_000, "the orders did not end"
        while (ws.state / "planted.txt").exists():
            sup._last_watch = float("-inf")
            sup.step(paced=True)
            sup._wait(0.02)
    silent = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert silent == ["state/ changed by hand (restored from git): planted.txt"]
    # As the tamper watch sees it (a plain `git status` may name a folder emptied within the
    # same clock tick as git's untracked cache looked at it: nothing is in it).
    assert StateRepo(ws.state).dirty() == []
    assert {r.status for r in Store(ws.state).load_all().values()} == {"done"}


def test_a_hand_commit_whose_message_holds_a_record_separator_is_listed_never_a_crash(make_ws):
    """A message with \\x1e in it (in state/ and in a repository) once split the log where it
    stood: `audit verify` and `log` died with an internal error, and so did every start after
    a crash. Now verify lists both commits, `log` prints the trail, a start goes on, and the
    text after the \\x1e is no transition."""
    import sys

    coordinator = str(Path(sys.executable).with_name("coordinator"))
    ws = team(make_ws)
    drop(ws, "chip", "a.md", order_md("First order", id="a"))
    run(ws)
    for repo, message in ((ws.state, "innocent\x1ea chip: done -> queued"),
                          (ws.repos / "webapp", "tidy\x1eup\x1fthe\x1crepo")):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=eve", "-c", "user.email=e@x", "commit", "-q",
                        "--allow-empty", "-m", message], check=True)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([coordinator, "-w", str(ws.root), *args], capture_output=True, text=True,
                              timeout=120)
        assert "internal error" not in done.stderr, done.stderr
        return done

    found = cli("audit", "verify")
    assert found.returncode == 1, found.stderr
    listed = found.stdout.splitlines()
    assert len(listed) == 2, listed
    assert re.fullmatch(r"state-foreign: state/: commit not made by the supervisor: [0-9a-f]{10} by eve: "
                        r"innocent a chip: done -> queued", listed[0]), listed
    assert re.fullmatch(r"repo-commit: repos/webapp@[0-9a-f]{10}: eve: 'tidy up the repo' has no Work-Order "
                        r"trailer", listed[1]), listed
    trail = cli("log", "a")
    assert trail.returncode == 0, trail.stderr
    assert trail.stdout.splitlines()[-1].endswith("a chip: running -> done"), trail.stdout
    (ws.runtime / "running").touch()  # as a crash leaves it: the start repairs the history
    started = cli("supervise", "--once")
    assert started.returncode == 0, started.stderr
    assert Store(ws.state).load("a").status == "done"
    assert [e.new for e in StateRepo(ws.state).entries("a")] == ["queued", "running", "done"]



@pytest.mark.slow  # some 3.5 s: `make test-slow`, and CI, run it
def test_a_busy_supervisors_journal_keeps_only_what_is_not_committed_yet(make_ws, monkeypatch):
    """The crash journal (a line for each state write, read at the start after a crash) was
    compacted only when a commit found nothing new staged: while orders kept coming, never,
    some eight lines per order run. It now drops what the state committer has committed, as
    it goes."""
    from coordinator import supervisor

    monkeypatch.setattr(supervisor, "FLUSH_EVERY", 0.2)  # more commits in the few seconds this runs
    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 0.05"), "max_parallel": 2}}, max_parallel=2)
    journal = ws.runtime / "state-journal"
    ids = [f"o{i:03d}" for i in range(120)]
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} is done", id=oid))
    lines: list[int] = []
    with Supervisor(ws) as sup:

        def should_stop() -> int:
            if all(oid in sup.records and sup.records[oid].status == "done" for oid in ids):
                lines.append(journal.read_text().count("\n"))  # as the last order ended, still busy
                return 1
            return 0

        sup.run(should_stop=should_stop)
    assert lines and lines[0] < len(ids), lines  # fewer than a line per order run: it was some 8
    assert not journal.exists()  # a clean stop: everything is committed
    assert StateRepo(ws.state).dirty() == []


# -- the state files' format ---------------------------------------------------------------------

_JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@given(st.dictionaries(st.text(max_size=12), _JSON, max_size=8))
def test_a_state_file_reads_back_as_written_one_key_per_line(record):
    """What `git diff` shows of state/ is one line per changed key: each top-level key on its
    own line, sorted, and the file reads back as the very value written (also text that is
    not all Unicode, kept as its escape)."""
    from coordinator import durable

    text = durable.dumps(record)
    assert json.loads(text) == record
    if record:
        rows = text.split("\n")  # not splitlines: a key may hold U+0085 or U+2028
        assert rows[0] == "{" and rows[-2:] == ["}", ""]
        tops = [row for row in rows[1:-2] if row.startswith('  "')]
        assert [json.JSONDecoder().raw_decode(row, 2)[0] for row in tops] == sorted(record)
        for row, key in zip(tops, sorted(record), strict=True):
            if not row.endswith("["):  # a list of objects: one line per object, below
                same = json.dumps({key: record[key]}, sort_keys=True, ensure_ascii=False)[1:-1]
                assert row.removesuffix(",") == "  " + same


def test_a_git_version_that_could_not_be_told_once_is_asked_again(monkeypatch, tmp_path):
    # A `git --version` refused once (a process limit, git not on PATH for a moment) must not
    # stand for the whole run: every later batch would stage one loose object per file.
    from coordinator import audit

    monkeypatch.setattr(audit, "_git_version", None)
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no git here
    assert audit.git_version() == (0, 0)
    monkeypatch.setenv("PATH", path)
    found = audit.git_version()
    assert found >= (2, 0)
    assert audit.packed() == (audit._PACKED if found >= (2, 37) else ())


@pytest.mark.parametrize("hand", ["edit", "remove", "replace"])
def test_a_hand_change_right_after_the_supervisors_write_is_never_committed_as_its_own(make_ws, hand):
    """The supervisor commits the paths it wrote about once a second: a record changed by hand
    (or removed: the order was gone from the board) between its write and that commit went
    into the supervisor's commit as its own, and the tamper watch never saw it. Now the commit
    holds what the supervisor wrote; the hand change is put back and said, as a later one is."""
    ws = team(make_ws)
    with Supervisor(ws) as sup:
        drop(ws, "chip", "a.md", order_md("Done at once", id="a"))
        sup._intake_step()
        sup._write_state()  # on disk and noted, its commit still to come
        record = Store(ws.state).record_path("a")
        written = record.read_text()
        if hand == "edit":  # in place: same file, same size
            with open(record, "r+") as f:
                f.write(written.replace('"queued"', '"done!!"'))
        elif hand == "remove":
            record.unlink()
        else:  # an editor's save: a new file renamed over it
            other = record.with_name("edited")
            other.write_text(written.replace('"queued"', '"done"'))
            os.rename(other, record)
        sup._flush()
        assert git(ws.state, "show", "HEAD:orders/a/record.json") == written  # the supervisor's own
        verify.watch_state(sup)
        assert record.read_text() == written  # put back: the order is on the board as it was
        sup.run_once(limit=30)
    assert Store(ws.state).load("a").status == "done"
    assert "done!!" not in git(ws.state, "log", "-p", "--", "orders/a/record.json")
    silent = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert silent == ["state/ changed by hand (restored from git): orders/a/record.json"]


def test_a_signal_taken_out_by_hand_right_after_it_was_recorded_stays_in_the_trail(make_ws):
    """Signals are appended to state/signals.jsonl and committed with the next batch: a line
    cut out by hand before that commit (hiding the signal of one's own tampering) went into
    the supervisor's commit as its own, and the signal was gone from the file and from git.
    Now the commit holds the lines the supervisor appended; the file is put back, and said."""
    ws = team(make_ws)
    with Supervisor(ws) as sup:
        sup.run_once(limit=10)
        (ws.state / "README.md").write_text("changed\n")
        verify.watch_state(sup)  # puts it back and appends a signal, committed with the next batch
        path = signals.signals_path(ws.state)
        lines = path.read_text().splitlines(keepends=True)
        assert "README.md" in lines[-1]
        path.write_text("".join(lines[:-1]))  # by hand, before the commit
        sup._flush()
        assert git(ws.state, "show", "HEAD:signals.jsonl") == "".join(lines)
        verify.watch_state(sup)
    evidence = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert evidence == ["state/ changed by hand (restored from git): README.md",
                        "state/ changed by hand (restored from git): signals.jsonl"]
    assert git(ws.state, "status", "--porcelain") == ""


def test_signals_of_two_batches_a_lock_kept_from_their_commits_are_both_committed_after(make_ws, monkeypatch):
    """Two batches handed to the committer thread while a person's git holds state/'s index:
    both come back to be committed with the next one. The signals appended in each went
    with it: taken back, the later batch's lines stood for both, and the commit after left
    the first signal out (and the tamper watch then cut it from the file)."""
    from test_faults import state_index_held

    from coordinator import trail

    monkeypatch.setattr(trail, "LOCK_WAIT", 0.3)  # what a commit waits for a lock (5 s otherwise)
    ws = team(make_ws)
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        sup.run_once(limit=10)
        with state_index_held(ws) as release:
            sup.signal("silent", agent=None, order=None, evidence="the first one")
            sup._flush(background=True)  # its commit waits for the lock, then fails
            sup.signal("silent", agent=None, order=None, evidence="the second one")
            sup._flush(background=True)  # handed over behind it: passed over
            assert sup._committer is not None
            sup._committer.drain()
            release()
        sup.drain_commits(stop=False)  # both taken back, to go with the next batch
        assert any(line.startswith("WARNING: could not commit state/") for line in said)
        sup.audit.stage("coordinator", "the next batch")
        sup._flush()
        committed = git(ws.state, "show", "HEAD:signals.jsonl")
        assert "the first one" in committed and "the second one" in committed
        verify.watch_state(sup)
    evidence = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert evidence == ["the first one", "the second one"]
    assert git(ws.state, "status", "--porcelain") == ""


def test_an_edit_in_place_that_leaves_the_record_as_stat_sees_it_is_never_committed_as_the_supervisors(make_ws):
    """git read a written record from disk after the supervisor had looked at it: an edit in
    place made in between (`echo x >> record.json` a millisecond after the look), or one that
    leaves size and time as they were, went into the supervisor's commit. Its bytes are now
    staged from memory: the commit holds what it wrote, the edit is put back and said."""
    ws = team(make_ws)
    with Supervisor(ws) as sup:
        drop(ws, "chip", "a.md", order_md("Done at once", id="a"))
        sup._intake_step()
        sup._write_state()  # on disk and noted, its commit still to come
        record = Store(ws.state).record_path("a")
        written = record.read_text()
        before = os.stat(record)
        with open(record, "r+") as f:  # same file, same size, same time: as git would find it
            f.write(written.replace('"queued"', '"done!!"'))
        os.utime(record, ns=(before.st_atime_ns, before.st_mtime_ns))
        sup._flush()
        assert git(ws.state, "show", "HEAD:orders/a/record.json") == written  # the supervisor's own
        verify.watch_state(sup)
        assert record.read_text() == written  # put back
        sup.run_once(limit=30)
    assert Store(ws.state).load("a").status == "done"
    assert "done!!" not in git(ws.state, "log", "-p", "--", "orders/a/record.json")
    assert git(ws.state, "fsck", "--strict", "--no-dangling") == ""
    silent = [s.evidence for s in signals.load(ws.state) if s.kind == "silent"]
    assert silent == ["state/ changed by hand (restored from git): orders/a/record.json"]


@pytest.mark.slow  # 3-5 s: `make test-slow`, and CI, run it
def test_a_record_appended_to_in_a_tight_loop_never_lands_in_a_supervisor_commit(tmp_path):
    """A process appends to a record in place, as fast as it can, while the supervisor
    rewrites and commits it batch after batch: no commit holds a line it appended (one in
    some sixty batches did, when it landed between the supervisor's look and git's read)."""
    from coordinator import durable

    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    record = repo.path / "record.json"
    durable.write_json(record, {"batch": -1})
    loop = subprocess.Popen(["/bin/sh", "-c", "while :; do echo HANDEDIT >> record.json; done"], cwd=repo.path)
    durable.open_journal(repo.path)
    try:
        for i in range(150):
            durable.write_json(record, {"batch": i}, sync=False)
            repo.stage("coordinator", f"batch {i}")
            assert repo.flush(durable.take_journal(repo.path)) == 1
    finally:
        durable.close_journal(repo.path)
        loop.kill()
        loop.wait()
    assert "HANDEDIT" not in git(repo.path, "log", "-p", "--", "record.json")
    assert git(repo.path, "show", "HEAD:record.json") == durable.dumps({"batch": 149})
    assert git(repo.path, "fsck", "--strict", "--no-dangling") == ""


def test_a_record_appended_to_in_a_loop_is_put_back_without_stopping_the_supervisor(tmp_path):
    """The tamper watch put a changed record back with `git checkout`, which removes the file
    and creates it anew: a process appending to it by hand in a loop (`echo x >> record.json`)
    made it again in between, the checkout failed with "File exists" and the supervisor
    stopped. The record is now put back whatever the loop does, and the loop's lines are
    found again at the next look."""
    repo = StateRepo(tmp_path / "state")
    StateRepo.ensure(repo.path)
    record = repo.path / "record.json"
    record.write_text('{"status": "done"}\n')
    repo.stage("coordinator", "WO-0001 chip: running -> done")
    repo.flush({str(record)})
    loop = subprocess.Popen(["/bin/sh", "-c", "while :; do echo HANDEDIT >> record.json; done"], cwd=repo.path)
    try:
        for _ in range(40):
            repo.restore(["record.json"])
        # The loop's next lines, for the next look (on a busy machine the loop may not have
        # run again yet the moment the last put-back ends).
        deadline = time.monotonic() + 10
        while repo.dirty() != ["record.json"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert repo.dirty() == ["record.json"]
    finally:
        loop.kill()
        loop.wait()
    repo.restore(repo.dirty())
    assert record.read_text() == '{"status": "done"}\n'
    assert repo.dirty() == [] and git(repo.path, "status", "--porcelain") == ""


def test_a_state_repository_of_sha256_objects_takes_the_supervisors_commits(make_ws, monkeypatch):
    """With `GIT_DEFAULT_HASH=sha256` when state/ was made, the batches' blobs, written as a
    pack of SHA-1 objects, were refused ("malformed index info"): state/ took no commit at all."""
    monkeypatch.setenv("GIT_DEFAULT_HASH", "sha256")
    ws = team(make_ws)
    assert git(ws.state, "rev-parse", "--show-object-format").strip() == "sha256"
    drop(ws, "chip", "a.md", order_md("Done at once", id="a"))
    run(ws)
    assert Store(ws.state).load("a").status == "done"
    assert "a chip: running -> done" in git(ws.state, "log", "--format=%s")
    assert git(ws.state, "status", "--porcelain") == ""
    assert git(ws.state, "fsck", "--strict", "--no-dangling") == ""
