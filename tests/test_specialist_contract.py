"""The specialist contract (SPEC §6) as a buggy or hostile specialist plays it: real processes,
real workspaces, the real supervisor."""

from __future__ import annotations

import os

import pytest
from conftest import drop, order_md, sh

from coordinator.store import Store
from coordinator.supervisor import Supervisor


def run(ws, **kw):
    with Supervisor(ws, **kw) as sup:
        sup.run_once(limit=60)
        return sup


def test_output_that_becomes_the_summary_holds_no_c1_control_or_bidi_override(make_ws):
    """With no result file the tail of the output is the summary `show` prints: a C1 CSI
    (U+009B, what a terminal reads as ESC [) or a right-to-left override must not reach it."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        r"printf 'plain \302\23331mRED\302\233m \342\200\256desrever\342\200\254 end\n'")}})
    drop(ws, "chip", "o.md", order_md("It is done", id="o"))
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "done"
    assert rec.report["summary"] == "plain 31mREDm desrever end"


def test_a_specialist_or_check_killed_by_a_signal_is_reported_by_the_signals_name(make_ws):
    """The fork server reports a death by signal N as -N: "exited with code -11" reads like a
    program's own choice; the user is told the signal, and what a shell's 128+N means."""
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1, "writes": ["webapp/**"], "command": sh(
        'case "$COORD_ORDER_ID" in seg) kill -SEGV $$;; oom) sh -c \'kill -KILL $$\'; exit $?;; esac')}})
    drop(ws, "chip", "seg.md", order_md("It crashes", id="seg"))
    drop(ws, "chip", "oom.md", order_md("Its command is killed", id="oom"))
    drop(ws, "chip", "chk.md", order_md("Its check crashes", id="chk", acceptance=(
        "`kill -ABRT $$` passes", "The second thing is true", "The third thing is true")))
    run(ws)
    recs = Store(ws.state).load_all()
    assert recs["seg"].failures[0].startswith("was killed by signal 11 (SIGSEGV) and wrote no result")
    assert recs["oom"].failures[0].startswith(
        "exited with code 137 (128+9: how a shell reports a command killed by signal 9 (SIGKILL)) and wrote no result")
    assert recs["chk"].failures[0] == "check `kill -ABRT $$` was killed by signal 6 (SIGABRT); no output"


def ping_pong(make_ws):
    """chip and rex, each answering every order with one for the other through its outbox."""
    ping = sh('printf "objective: Answer it\\nto: %s\\nacceptance: [a is true, b is true, c is true]\\n'
              'files: []\\nbranching: [{action: halt-with-note, when: nothing to do}]\\n" "$PEER" '
              '> "$COORD_OUTBOX/ping.yaml"; echo sent')
    return make_ws({"chip": {"role": "specialist", "command": ping, "sends_to": ["rex"], "env": {"PEER": "rex"}},
                    "rex": {"role": "specialist", "command": ping, "sends_to": ["chip"], "env": {"PEER": "chip"}}})


def test_two_agents_that_answer_every_order_with_one_for_the_other_stop_after_max_chain(make_ws):
    """A -> B -> A -> ... through the outbox, each order `done`: without a bound this filed a
    thousand orders a minute and `supervise --once` never returned."""
    from coordinator import outbox

    ws = ping_pong(make_ws)
    drop(ws, "chip", "o.md", order_md("Start answering", id="o"))
    run(ws)
    recs = Store(ws.state).load_all()
    assert len(recs) == 1 + outbox.MAX_CHAIN and all(r.status == "done" for r in recs.values())
    last = max(recs.values(), key=lambda r: r.seq)
    assert last.children == []
    [line] = last.report["undelivered"]
    assert line.startswith(f"ping.yaml: not delivered: {last.id} came at the end of {outbox.MAX_CHAIN} orders in "
                           "a row sent from an outbox (o -> ... -> ")
    assert (ws.runtime / "attempts" / last.id / "1" / "outbox" / "ping.yaml").exists()


def test_each_order_a_person_sends_starts_a_chain_of_its_own(make_ws):
    """Only orders sent from outboxes in a row count: an order a person sends starts afresh."""
    from coordinator import outbox

    ws = ping_pong(make_ws)
    drop(ws, "chip", "a.md", order_md("Start answering", id="a"))
    drop(ws, "rex", "b.md", order_md("Start answering too", id="b"))
    run(ws)
    recs = Store(ws.state).load_all()
    assert len(recs) == 2 * (1 + outbox.MAX_CHAIN)


def test_an_outbox_file_that_goes_to_nobody_is_reported_with_the_real_reason(make_ws):
    """"names no known recipient (give it `to: <agent>`)" was said of a file that had one: it
    lacked a suffix, or named someone not on the team, or sat in a folder naming nobody."""
    order = ('printf "objective: Review it\\nto: rex\\nacceptance: [a is true, b is true, c is true]\\n'
             'files: []\\nbranching: [{action: halt-with-note, when: nothing to do}]\\n"')
    writer = sh(f'cd "$COORD_OUTBOX"; {order} > -rf; {order} > notes.txt; {order} | sed s/rex/bob/ > bob.yaml; '
                f'mkdir rexx; {order} > rexx/r.yaml; {order} | sed /to:/d > lost.yaml; echo sent')
    ws = make_ws({"chip": {"role": "specialist", "command": writer, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    run(ws)
    rec = Store(ws.state).load("o")
    hint = "(give it `to: <agent>` or write it into $COORD_OUTBOX/<agent>/)"
    assert [line.split("; kept in ")[0] for line in rec.report["undelivered"]] == [
        "-rf: is a file without a suffix, not a work order (a .md, .markdown, .yaml, .yml or .json file)",
        f"bob.yaml: names `to: bob`, who is not on the team {hint}",
        f"lost.yaml: names no known recipient {hint}",
        "notes.txt: is a .txt file, not a work order (a .md, .markdown, .yaml, .yml or .json file)",
        f"r.yaml: is in the folder rexx/, which names no agent of the team {hint}",
    ]


def test_a_failed_attempt_that_leaves_thousands_of_outbox_files_gets_a_short_report(make_ws):
    """One line per kept file made a report of 20,000 lines (2 MB in state/, all of it the
    sender's hot tokens) for an attempt that failed with 20,000 files in its outbox."""
    from coordinator import outbox

    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1,
                           "command": sh('cd "$COORD_OUTBOX" && seq -w 1 3000 | xargs touch; exit 1')}})
    drop(ws, "chip", "o.md", order_md("It fails", id="o"))
    run(ws)
    lines = Store(ws.state).load("o").report["undelivered"]
    box = ws.runtime / "attempts" / "o" / "1" / "outbox"
    assert len(lines) == outbox.MAX_LISTED
    assert lines[0] == f"0001: not delivered: attempt 1 failed; kept in {box}"
    assert lines[-1] == f"2981 more file(s) (from 0020 on, by name): not delivered: attempt 1 failed; kept in {box}"
    assert len(list(box.iterdir())) == 3000  # all still there


def test_a_merge_conflict_over_many_paths_names_a_few_and_the_next_attempt_starts(make_ws):
    """Each conflicting path was named: 6,000 generated files made a reason of 170 KB, and the
    next attempt, given it in `{brief_text}`, could not start (E2BIG)."""
    from coordinator import attempts

    write = ('case "$1" in *"Attempt 2"*) echo nothing to do; exit 0;; esac; mkdir -p src/gen && cd src/gen && '
             'for i in $(seq -w 1 45); do echo "$COORD_ORDER_ID" > "f$i"; done; sleep 0.5; echo wrote')
    ws = make_ws({"chip": {"role": "specialist", "command": ["/bin/sh", "-c", write, "sh", "{brief_text}"],
                           "writes": ["webapp/src/**"], "max_parallel": 2, "max_failures": 2}})
    for oid in ("a", "b"):
        drop(ws, "chip", f"{oid}.md", order_md(f"Generate files {oid}", files=("webapp/src/gen/**",), id=oid))
    run(ws)
    recs = Store(ws.state).load_all()
    [second] = [r for r in recs.values() if r.failures]
    assert second.status == "done" and second.attempts == 2
    shown = ", ".join(f"src/gen/f{i:02d}" for i in range(1, attempts.MAX_PATHS_SHOWN + 1))
    assert second.failures == [f"merge conflict with work that landed meanwhile in: {shown} and 25 more path(s)"]


def test_a_failure_reason_is_kept_short_whatever_the_specialist_wrote(make_ws):
    """A result file's 60 KB unknown key was quoted whole in the reason, the record and the brief."""
    from coordinator import endings

    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1, "command": sh(
        'printf \'{"outcome": "done", "summary": "x", "%s": 1}\' "$(head -c 60000 /dev/zero | tr "\\0" k)" '
        '> "$COORD_RESULT"')}})
    drop(ws, "chip", "o.md", order_md("It is done", id="o"))
    run(ws)
    [reason] = Store(ws.state).load("o").failures
    assert reason.startswith("invalid result file: result.yaml: kkk")
    assert len(reason) < endings.MAX_REASON + 100 and reason.endswith("characters more left out)")


@pytest.mark.slow  # some 3 s: `make test-slow`, and CI, run it
def test_attempts_that_time_out_together_are_killed_together(make_ws):
    """Each timeout's kill was waited for in turn: four attempts that ignored SIGTERM stalled
    the supervisor 2 s each, and the last was killed 8 s after its timeout (SPEC §5: within
    the timeout plus a short grace)."""
    import time

    from bench.harness import probe_of

    hang = sh("trap '' TERM; echo $$ >> \"$PROBE/pids\"; sleep 60")
    ws = make_ws({"chip": {"role": "specialist", "command": hang, "timeout": "1s", "max_failures": 1,
                           "max_parallel": 4}}, max_parallel=4)
    for oid in "abcd":
        drop(ws, "chip", f"{oid}.md", order_md(f"Hangs {oid}", id=oid))
    started = time.monotonic()
    run(ws)
    elapsed = time.monotonic() - started
    recs = Store(ws.state).load_all()
    assert all(r.status == "blocked" and r.failures[0].startswith("timed out after 1.0s") for r in recs.values())
    pids = [int(p) for p in (probe_of(ws) / "pids").read_text().split()]
    assert len(pids) == 4 and not any(os.path.exists(f"/proc/{p}") for p in pids)
    assert elapsed < 1 + 2 + 4  # the timeout, one grace, the supervisor's start and stop (8 s more before)


def test_what_a_blocked_specialist_says_blocks_it_reaches_the_report_and_the_escalation(make_ws):
    """`outcome: blocked` with a `blocker:` line was accepted and the blocker dropped: neither
    `show`, the sender's report nor the investigation order said what the specialist was missing."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
                      'printf "outcome: blocked\\nsummary: I could not do it.\\nblocker: the payment API key is '
                      'missing\\n" > "$COORD_RESULT"')},
                  "rex": {"role": "specialist", "command": sh("echo looked")}}, escalate_to="rex")
    drop(ws, "chip", "o.md", order_md("It needs a key", id="o"))
    run(ws)
    recs = Store(ws.state).load_all()
    assert recs["o"].status == "blocked"
    assert "the payment API key is missing" in recs["o"].report["summary"]
    assert "the payment API key is missing" in (ws.state / "orders" / "o" / "report.md").read_text()
    [escalation] = [r for r in recs.values() if r.id != "o"]
    order = Store(ws.state).load_order(escalation.id)
    assert any("the payment API key is missing" in a.text for a in order.acceptance)


def test_a_link_or_fifo_in_the_outbox_is_said_in_the_report_not_dropped_in_silence(make_ws, tmp_path):
    """An order the specialist linked into its outbox (or a FIFO there) stayed behind, and
    neither its report nor `show` said so: the work it meant to send was lost without a word."""
    (tmp_path / "elsewhere.yaml").write_text("objective: Review it\n")
    ws = make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "command": sh(
                      f'mkdir "$COORD_OUTBOX/rex"; ln -s {tmp_path}/elsewhere.yaml "$COORD_OUTBOX/rex/review.yaml"; '
                      'mkfifo "$COORD_OUTBOX/rex/pipe.md"; ln -s /nowhere "$COORD_OUTBOX/.hidden"; echo sent')},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "done" and rec.children == []
    assert sorted(line.split("; kept in ")[0] for line in rec.report["undelivered"]) == [
        "pipe.md: not delivered: is no regular file (a FIFO, a socket or a device); write the order as a file",
        f"review.yaml: not delivered: is a symbolic link (to {tmp_path}/elsewhere.yaml), which an outbox never "
        "follows; write the order file itself",
    ]
    assert (tmp_path / "elsewhere.yaml").read_text() == "objective: Review it\n"
    assert "Not delivered from the outbox" in (ws.state / "orders" / "o" / "report.md").read_text()


@pytest.mark.parametrize(("end", "said"), [("kill -SEGV $$", "was killed by signal 11 (SIGSEGV)"),
                                           ("exit 3", "exited with code 3")])
def test_a_specialist_that_crashes_after_writing_done_lands_nothing(make_ws, end, said):
    """A result file saying `done`, written first, decided the attempt whatever came after: a
    specialist that crashed half-way through its edit landed the half-written file on the
    default branch as done (SPEC §5: a crash or a non-zero exit fails the attempt)."""
    import subprocess

    ws = make_ws({"chip": {"role": "specialist", "max_failures": 1, "writes": ["webapp/**"], "command": sh(
        'printf "outcome: done\\nsummary: all good\\n" > "$COORD_RESULT"; '
        f'printf "half of the chan" > src/half.txt; {end}')}})
    head = subprocess.run(["git", "-C", str(ws.repos / "webapp"), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout
    drop(ws, "chip", "o.md", order_md("It is done", id="o", files=("webapp/src/**",)))
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "blocked" and rec.commit is None
    assert rec.failures[0].startswith(f"{said} after writing `outcome: done`")
    assert subprocess.run(["git", "-C", str(ws.repos / "webapp"), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout == head


def test_a_route_does_not_start_a_new_chain_two_agents_would_send_each_other_work_for_ever(make_ws):
    """chip answers every order with one for rex through its outbox; rex routes each back to
    chip. A route started the count of orders in a row afresh, so the bound never came: 2,000
    orders in 20 s, and `supervise --once` never ended."""
    from coordinator import outbox

    ws = make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "command": sh(
                      'mkdir -p "$COORD_OUTBOX/rex"; printf "objective: Look at it\\nacceptance: [a is true, '
                      'b is true, c is true]\\nfiles: []\\nbranching: [{action: route-to, agent: chip, when: it '
                      'needs code}]\\n" > "$COORD_OUTBOX/rex/r.yaml"; echo sent')},
                  "rex": {"role": "specialist", "sends_to": ["chip"], "command": sh(
                      'printf "outcome: route-to\\nagent: chip\\nsummary: code\\n" > "$COORD_RESULT"')}})
    drop(ws, "chip", "o.md", order_md("Start answering", id="o"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60, should_stop=lambda: int(len(sup.records) > 100))
    recs = Store(ws.state).load_all()
    assert len(recs) == 1 + outbox.MAX_CHAIN
    last = max(recs.values(), key=lambda r: r.seq)
    assert last.status == "done" and last.children == []
    [line] = last.report["undelivered"]
    assert f"{last.id} came at the end of {outbox.MAX_CHAIN} orders in a row" in line


def test_an_escalation_does_not_start_a_new_chain_either(make_ws):
    """chip reports every order blocked; the escalation goes to rex, whose outbox sends chip the
    work again: each escalation started the count afresh, and the two never stopped."""
    from coordinator import outbox

    ws = make_ws({"chip": {"role": "specialist", "command": sh(
                      'printf "outcome: blocked\\nsummary: cannot\\n" > "$COORD_RESULT"')},
                  "rex": {"role": "specialist", "sends_to": ["chip"], "command": sh(
                      'mkdir -p "$COORD_OUTBOX/chip"; printf "objective: Try $COORD_ORDER_ID again\\nacceptance: '
                      '[a is true, b is true, c is true]\\nfiles: []\\nbranching: [{action: halt-with-note, when: '
                      'not}]\\n" > "$COORD_OUTBOX/chip/r.yaml"; echo sent')}}, escalate_to="rex")
    drop(ws, "chip", "o.md", order_md("Start failing", id="o"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60, should_stop=lambda: int(len(sup.records) > 100))
    recs = Store(ws.state).load_all()
    assert len(recs) == 2 + outbox.MAX_CHAIN
    last = max(recs.values(), key=lambda r: r.seq)
    assert last.to == "rex" and last.children == [] and len(last.report["undelivered"]) == 1


def test_show_lists_what_stayed_in_the_outbox(make_ws):
    """The sender's report said which outbox files were not delivered, but `coordinator show`,
    what a person reads, said nothing of them."""
    from click.testing import CliRunner

    from coordinator.cli import cli

    ws = make_ws({"chip": {"role": "specialist", "command": sh('echo x > "$COORD_OUTBOX/notes.txt"; echo ok')}})
    drop(ws, "chip", "o.md", order_md("Work is done", id="o"))
    run(ws)
    out = CliRunner().invoke(cli, ["-w", str(ws.root), "show", "o"])
    assert out.exit_code == 0, out.output
    assert "  undelivered: notes.txt: is a .txt file, not a work order" in out.output


def test_an_outbox_file_that_cannot_be_read_says_why_not_that_it_names_nobody(make_ws):
    """A file naming `to: rex` but over the size limit, in UTF-16, or with broken YAML was
    reported as naming no recipient ("give it `to: <agent>`"): the specialist was told to add
    what was there, never what was wrong."""
    order = ('printf "to: rex\\nobjective: Review it\\nacceptance: [a is true, b is true, c is true]\\n'
             'files: []\\nbranching: [{action: halt-with-note, when: not}]\\n"')
    writer = sh(f'cd "$COORD_OUTBOX"; {{ {order}; seq -f "# padding line %g" 1 30000; }} > big.yaml; '
                f'{order} | iconv -t UTF-16 > wide.yaml; {{ {order}; echo "oops: [unclosed"; }} > broken.yaml; '
                'echo sent')
    ws = make_ws({"chip": {"role": "specialist", "command": writer, "sends_to": ["rex"]},
                  "rex": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    run(ws)
    lines = [line.split("; kept in ")[0] for line in Store(ws.state).load("o").report["undelivered"]]
    assert lines[0].startswith("big.yaml: could not be read for its recipient: is over 256 KiB;"), lines
    assert lines[1].startswith("broken.yaml: could not be read for its recipient: ") and "YAML" in lines[1]
    assert lines[2].startswith("wide.yaml: could not be read for its recipient: ") and "UTF-8" in lines[2]


def test_a_requeue_on_the_request_the_order_was_sent_for_is_a_failed_attempt(make_ws):
    """walt's request waits for the order it sent chip; chip requeued that order on the request:
    each waited for the other, and `supervise --once` ended with the request `running` and the
    order `waiting` for ever. Now it is a failed attempt that says why."""
    walt = sh('mkdir -p "$COORD_OUTBOX/chip"; printf "objective: Do the code\\nacceptance: [a is true, b is true, '
              'c is true]\\nfiles: []\\nbranching: [{action: requeue-with-blocker, when: something is missing}]\\n" '
              '> "$COORD_OUTBOX/chip/c.yaml"; echo delegated')
    ws = make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"], "command": walt},
                  "chip": {"role": "specialist", "max_failures": 2, "command": sh(
                      'if grep -q "why the last attempt failed" "$COORD_BRIEF"; then echo did it; exit 0; fi; '
                      'printf "outcome: requeue-with-blocker\\nsummary: waits\\nblocker: req\\n" > "$COORD_RESULT"')}},
                 orchestrator="walt")
    drop(ws, "walt", "r.md", order_md("A request", id="req"))
    run(ws)
    recs = Store(ws.state).load_all()
    [child] = [r for r in recs.values() if r.id != "req"]
    assert child.status == "done" and child.attempts == 2
    assert child.failures[0].startswith("requeue-with-blocker: req is a request that ends only after the orders it sent, "
                                    "and it sent this one")
    assert recs["req"].status == "done"


def test_an_outbox_order_that_waits_on_another_of_the_same_outbox_is_not_rejected(make_ws):
    """Orders were taken from the outbox by file name: `a.yaml` blocked_by the id that `b.yaml`
    declares was filed first and rejected ("no order 'first-step'"), though it was there."""
    review = ('printf "objective: %s\\n%bacceptance: [a is true, b is true, c is true]\\nfiles: []\\n'
              'branching: [{action: halt-with-note, when: not}]\\n"')
    ws = make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "command": sh(
                      'mkdir "$COORD_OUTBOX/rex"; '
                      f'{review} "Second step" "blocked_by: [first-step]\\n" > "$COORD_OUTBOX/rex/a.yaml"; '
                      f'{review} "First step" "id: first-step\\n" > "$COORD_OUTBOX/rex/b.yaml"; echo sent')},
                  "rex": {"role": "specialist", "command": sh('echo "$COORD_ORDER_ID" >> "$PROBE/ran"')}})
    drop(ws, "chip", "o.md", order_md("Work is handed on", id="o"))
    run(ws)
    from bench.harness import probe_of

    recs = Store(ws.state).load_all()
    assert all(r.status == "done" for r in recs.values()), {r.id: r.errors for r in recs.values()}
    [second] = [r for r in recs.values() if r.objective == "Second step"]
    assert (probe_of(ws) / "ran").read_text().split() == ["first-step", second.id]


def test_the_route_of_an_order_with_the_most_references_is_not_rejected(make_ws):
    """The follow-up of a route references the order it continues: for an order with the most
    references an order may have (100), that made 101, and the routed work was rejected at
    intake ("references: has 101 entries; at most 100") and lost."""
    from coordinator.orders import MAX_IDS

    ws = make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "command": sh(
                      'printf "outcome: route-to\\nagent: rex\\nsummary: for rex\\n" > "$COORD_RESULT"')},
                  "rex": {"role": "specialist", "command": sh("echo reviewed")}})
    earlier = [f"r{i:03d}" for i in range(MAX_IDS)]
    for ref in earlier:  # rejected at intake (rex may write nothing): quick, and an order all the same
        drop(ws, "rex", f"{ref}.md", order_md(f"Earlier {ref}", id=ref, files=("webapp/src/x.ts",)))
    with Supervisor(ws) as sup:
        sup.run_once(limit=60)
        drop(ws, "chip", "o.md", order_md("It goes to rex", id="o", references=earlier,
                                          branching=("route-to-rex if it is a review",)))
        sup.run_once(limit=60)
    recs = Store(ws.state).load_all()
    assert recs["o"].status == "routed"
    follow = recs[recs["o"].routed_to]
    assert follow.status == "done", follow.errors
    order = Store(ws.state).load_order(follow.id)
    assert len(order.references) == MAX_IDS and order.references[-1] == "o"


def test_a_route_to_an_agent_that_may_not_write_the_orders_files_is_a_failed_attempt(make_ws):
    """chip routed an order on webapp/src to rex, who may write only webapp/docs: the order
    ended `routed` and its follow-up was rejected at intake, so the work was dropped. Now the
    route is refused before it is taken: the attempt fails saying why, the order stays chip's."""
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/src/**"], "sends_to": ["rex"], "command": sh(
                      'if grep -q "route-to rex cannot be taken" "$COORD_BRIEF"; then echo did it myself; exit 0; fi; '
                      'printf "outcome: route-to\\nagent: rex\\nsummary: for rex\\n" > "$COORD_RESULT"')},
                  "rex": {"role": "specialist", "writes": ["webapp/docs/**"], "command": sh("echo reviewed")}})
    drop(ws, "chip", "o.md", order_md("It goes to rex", id="o", files=("webapp/src/app.js",),
                                      branching=("route-to-rex if it is a review",)))
    run(ws)
    recs = Store(ws.state).load_all()
    assert list(recs) == ["o"]  # nothing filed for rex, nothing rejected
    assert recs["o"].status == "done" and recs["o"].attempts == 2 and recs["o"].routed_to is None
    assert recs["o"].failures == [
        "route-to rex cannot be taken: the order it would send rex is refused (files.0: 'webapp/src/app.js' is "
        "outside what rex may write (webapp/docs/**); narrow it, or send the order to an agent that may write "
        "there); do the work yourself, halt with a note, or route it to an agent that can take it"]


@pytest.mark.parametrize("ending", ["cancelled", "rejected"])
def test_a_requeue_on_an_order_that_ended_undone_is_a_failed_attempt_its_next_brief_explains(make_ws, ending):
    """chip requeued its order on `gone`, which had ended cancelled (or rejected) and so will
    never be done: the order was blocked at once, chip was never told why, and after a retry
    it requeued on `gone` again. Now it is a failed attempt whose reason the next brief gives."""
    ws = make_ws({"chip": {"role": "specialist", "max_failures": 2, "command": sh(
        'if grep -q "will never be done" "$COORD_BRIEF"; then echo did it without gone; exit 0; fi; '
        'printf "outcome: requeue-with-blocker\\nsummary: needs gone first\\nblocker: gone\\n" > "$COORD_RESULT"')}})
    acceptance = ("Only one item",) if ending == "rejected" else None
    drop(ws, "chip", "a.md", order_md("Never wanted", id="gone", acceptance=acceptance))
    with Supervisor(ws) as sup:
        sup._intake_step()
        if ending == "cancelled":
            sup.handle("cancel", {"id": "gone"})
        assert sup.records["gone"].status == ending
        drop(ws, "chip", "b.md", order_md("Needs gone", id="needs",
                                          branching=("requeue-with-blocker if a dependency is missing",)))
        sup.run_once(limit=60)
    rec = Store(ws.state).load("needs")
    assert rec.status == "done" and rec.attempts == 2, rec.history[-3:]
    assert rec.failures == [f"requeue-with-blocker: gone ended {ending} and will never be done: this order would "
                            "wait for it for ever; do the work, or name what is still missing"]
    assert "waiting" not in [h["to"] for h in rec.history]


def test_a_routes_follow_up_keeps_the_orders_timeout(make_ws):
    """The order said `timeout: 1s`; chip routed it to rex, whose follow-up ran under rex's own
    30 minutes: the time the sender allowed the work was lost on the way."""
    ws = make_ws({"chip": {"role": "specialist", "sends_to": ["rex"], "command": sh(
                      'printf "outcome: route-to\\nagent: rex\\nsummary: for rex\\n" > "$COORD_RESULT"')},
                  "rex": {"role": "specialist", "max_failures": 1, "timeout": "30m", "command": sh("sleep 30")}})
    drop(ws, "chip", "o.md", order_md("It is reviewed", id="o", timeout="1s", priority="high",
                                      branching=("route-to-rex if it is a review",)))
    run(ws)
    recs = Store(ws.state).load_all()
    follow = recs[recs["o"].routed_to]
    order = Store(ws.state).load_order(follow.id)
    assert (order.timeout, order.priority) == ("1s", "high")
    assert follow.status == "blocked" and "timed out" in follow.failures[0], follow.failures
