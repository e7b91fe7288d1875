"""Fault injection: a full disk, hands in repos/ and state/, a dying watcher thread.

Each fault is real: a size-limited tmpfs filled to the brim, `git commit` run by hand in a
repository while the supervisor works in it, a state file edited with no supervisor running,
watchdog's observer thread stopped behind the supervisor's back. After each: no order lost or
done twice, the fault recorded where the user will look (`signals`, `audit verify`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import drop, order_md, sh, step_until, wait_until
from coordinator.demo.repo import init_demo_repo

from bench.harness import probe_of
from coordinator import durable, signals
from coordinator.audit import StateRepo
from coordinator.errors import SupervisorError
from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.verify import verify
from coordinator.watcher import InboxWatcher
from coordinator.workspace import Workspace

COORDINATOR = Path(sys.executable).with_name("coordinator")
WAIT = 60.0




def git(path: Path, *args: str, **env: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout


def hand_commit(repo: Path, name: str) -> str:
    """A commit made by a person (no work order) on the checked-out default branch."""
    (repo / name).write_text(f"edited by hand: {name}\n")
    git(repo, "add", name)
    who = {"GIT_AUTHOR_NAME": "mallory", "GIT_AUTHOR_EMAIL": "m@example.invalid",
           "GIT_COMMITTER_NAME": "mallory", "GIT_COMMITTER_EMAIL": "m@example.invalid"}
    git(repo, "-c", "core.hooksPath=/dev/null", "commit", "-q", "-m", f"hand edit {name}", **who)
    return git(repo, "rev-parse", "HEAD").strip()


def silent_signals(ws: Workspace) -> list[signals.Signal]:
    return [s for s in signals.load(ws.state) if s.kind == "silent"]


def supervise_once(ws: Workspace) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"],
                          capture_output=True, text=True, timeout=180)


# -- 4. disk full while writing state ---------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted afterwards; skipped only where mounting is impossible."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, *, leave: int) -> Path:
    """Fill the file system until `leave` bytes are free; the filler file."""
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


@pytest.mark.parametrize("leave_kib", [0, 200])
def test_disk_full_while_writing_state_loses_no_order(small_disk, leave_kib):
    """30 orders, then the disk fills. The supervisor stops with one clear line; once space is
    freed, a restart files every order exactly once and `audit verify` is clean."""
    root = small_disk / "ws"
    root.mkdir()
    # chip comes first: an order whose recipient is forgotten must not end up with chip.
    cfg = {"version": 1, "orchestrator": "walt",
           "agents": {"chip": {"role": "specialist", "command": ["true"], "writes": ["webapp/src/**"]},
                      "walt": {"role": "orchestrator", "sends_to": ["chip"]}}}
    (root / "coordinator.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ws = Workspace(root)
    ws.ensure_layout()
    StateRepo.ensure(ws.state)
    init_demo_repo(ws.repos / "webapp")
    assert supervise_once(ws).returncode == 0  # the workspace as a supervisor leaves it
    names = [f"o{i}" for i in range(30)]
    for oid in names:  # walt has no command: its orders stay queued
        drop(ws, "walt", f"{oid}.md", order_md(f"Order {oid} is kept", id=oid))
    filler = fill(small_disk, leave=leave_kib * 1024)

    full = supervise_once(ws)

    lines = [line for line in full.stderr.splitlines() if line.strip()]
    if full.returncode != 0:
        errors = [line for line in lines if line.startswith("coordinator:")]
        assert len(errors) == 1 and "space" in errors[0].lower(), full.stderr
        assert "internal error" not in errors[0] and full.returncode == 2, full.stderr  # the environment's fault
        assert "Traceback" not in full.stderr
    # Nothing is lost while the disk is full: each order is in the inbox, in intake or filed.
    seen = [p.name for p in ws.inbox("walt").iterdir()]
    seen += [p.name.split("-", 1)[1] for p in (ws.state / "intake").rglob("*") if p.is_file()]
    seen += [f"{p.name}.md" for p in (ws.state / "orders").iterdir()] if (ws.state / "orders").is_dir() else []
    assert sorted(seen) == sorted(f"{oid}.md" for oid in names)

    filler.unlink()
    again = supervise_once(ws)
    assert again.returncode == 0, again.stderr

    recs = Store(ws.state).load_all()
    assert sorted(recs) == sorted(names)
    assert {(r.to, r.status) for r in recs.values()} == {("walt", "queued")}
    for oid in names:
        assert len(list(Store(ws.state).folder(oid).glob("original.*"))) == 1
    assert list(ws.inbox("walt").iterdir()) == []
    findings = verify(ws)
    assert findings == [], "\n".join(map(str, findings))


def test_a_full_disk_never_leaves_a_cut_line_in_the_journal(small_disk, tmp_path):
    """The journal's disk fills while a path is noted: the journal keeps whole lines only, and
    the note fails, so the write it announced is never made, and leaves no temp file (a cut
    line once made recovery take an order's original for a hand edit and remove it)."""
    root = tmp_path / "state"
    root.mkdir()
    journal = small_disk / "journal"
    durable.open_journal(root, journal)
    try:
        durable.note(root / "first")
        filler = fill(small_disk, leave=0)
        failed = None
        for i in range(10_000):  # ~40 lines fill the journal's last page
            try:
                durable.note(root / "orders" / f"o{i}" / "original.md")
            except OSError as e:
                failed = e
                break
        assert failed is not None and failed.errno == 28, "the disk never filled"
        lines = journal.read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(re.fullmatch(rb"\d+ (first|orders/o\d+/original\.md)", x) for x in lines[:-1])
        assert lines[-2].endswith(f"o{i - 1}/original.md".encode())
        with pytest.raises(OSError):
            durable.write_json(root / ("record-" * 12 + ".json"), {"status": "done"})  # a line longer than any before
        assert list(root.iterdir()) == []
        filler.unlink()
        durable.note(root / "after")
        assert durable.read_journal(journal) is not None and "after" in durable.read_journal(journal)
    finally:
        durable.close_journal(root)


def test_a_write_that_waited_for_git_on_a_full_disk_is_never_taken_for_a_hand_edit(small_disk, tmp_path,
                                                                                     monkeypatch):
    """A record is rewritten while the committer's git reads it: the rename waits, longer than
    the journal's slack. The journal's disk fills meanwhile. The write must either fail, or be
    in the journal with a time that covers its rename: a write said done but noted only before
    its wait was taken for a hand edit at the next start, and put back from git."""
    monkeypatch.setattr(durable, "JOURNAL_SLACK_NS", 200_000_000)  # the wait below is longer
    root = tmp_path / "state"
    target = root / "orders" / "o1" / "record.json"
    target.parent.mkdir(parents=True)
    journal = small_disk / "journal"
    durable.open_journal(root, journal)
    durable.guard(root)
    filler = None
    outcome: list[object] = []
    try:
        durable.write_json(target, {"status": "running"})
        writer = threading.Thread(target=lambda: outcome.append(
            _raised(lambda: durable.write_json(target, {"status": "done"}))))
        with durable.staging([target]):
            writer.start()
            time.sleep(0.5)  # the write waits at its rename
            filler = fill(small_disk, leave=0)
            with contextlib.suppress(OSError):  # and the journal's last page
                for i in range(10_000):
                    durable.note(root / "orders" / f"other{i}")
        writer.join(WAIT)
        (error,) = outcome
        written = durable.read_journal(journal)
        assert written is not None
        if error is None:
            assert json.loads(target.read_text()) == {"status": "done"}
            assert durable.written_by_journal("orders/o1/record.json", root, written)
        else:
            assert json.loads(target.read_text()) == {"status": "running"}
    finally:
        durable.guard(root, on=False)
        durable.close_journal(root)
        if filler is not None:
            filler.unlink()


def _raised(call: Callable[[], object]) -> OSError | None:
    try:
        call()
    except OSError as e:
        return e
    return None


# -- an inbox folder on another file system -----------------------------------------------------
def test_an_inbox_on_another_file_system_is_taken_in_by_copy(inbox_mount):
    ws, mnt = inbox_mount
    drop(ws, "chip", "a.md", order_md("Something is done", id="a"))
    os.symlink("/etc/hostname", mnt / "b.md")  # the link is taken, never what it points to
    for _ in range(2):  # and a restart finds nothing left to trip on
        done = supervise_once(ws)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    recs = Store(ws.state).load_all()
    assert {r.status for r in recs.values()} == {"done", "rejected"} and recs["a"].status == "done"
    link = next(r for r in recs.values() if r.status == "rejected")
    assert link.errors == ["inbox/chip/b.md: is a symbolic link (to /etc/hostname); a link in an inbox is "
                           "never followed: drop the file itself"]
    assert os.listdir(mnt) == [] and list((ws.state / "intake").rglob("*.md")) == []
    assert len(list(Store(ws.state).folder("a").glob("original.*"))) == 1


def test_an_inbox_file_that_cannot_be_taken_is_said_once_and_stays(inbox_mount):
    ws, mnt = inbox_mount
    drop(ws, "chip", "a.md", order_md("Something is done", id="a"))
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    kept = supervise_once(ws)
    assert kept.returncode == 0, kept.stderr
    said = [line.split(" ", 1)[1] for line in kept.stderr.splitlines() if "inbox/chip/a.md" in line]
    assert said == ["WARNING: inbox/chip/a.md cannot be taken in (Read-only file system); it stays in the "
                    "inbox and is tried again at the next rescan"], kept.stderr
    assert os.listdir(mnt) == ["a.md"] and list((ws.state / "intake").rglob("*.md")) == []
    assert _status(ws, "a") is None
    subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
    assert supervise_once(ws).returncode == 0
    assert _status(ws, "a") == "done" and os.listdir(mnt) == []


# -- 5. hands in repos/ and state/ -------------------------------------------------------------
GATED = sh('while [ ! -e "$PROBE/go.$COORD_ORDER_ID" ]; do sleep 0.05; done; '
           'printf "x = 1\\n" > "src/$COORD_ORDER_ID.py"')


def chip_team(make_ws: Callable[..., Workspace]) -> Workspace:
    return make_ws({"chip": {"role": "specialist", "command": GATED, "writes": ["webapp/src/**"],
                             "max_parallel": 2}})


def test_a_commit_made_by_hand_while_an_order_runs_is_a_silent_signal(make_ws):
    """Someone commits on webapp's main while g1 runs; g1 then merges on top of it. The hand
    commit must not be absorbed into the supervisor's own history: it is signalled `silent`
    and `audit verify` lists it; g1 still lands exactly once."""
    ws = chip_team(make_ws)
    webapp = ws.repos / "webapp"
    drop(ws, "chip", "g1.md", order_md("Order g1 lands", id="g1", files=("webapp/src/g1.py",)))
    with Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("g1") is not None and sup.records["g1"].status == "running",
                   "g1 to run")
        sha = hand_commit(webapp, "NOTES.md")
        (probe_of(ws) / "go.g1").touch()
        sup.run_once(limit=WAIT)
        assert sup.records["g1"].status == "done"
    with Supervisor(ws) as sup:  # a restart looks again
        sup.run_once(limit=WAIT)
    assert [s for s in silent_signals(ws) if "repos/webapp" in s.evidence], signals.load(ws.state)
    findings = verify(ws)
    assert [f.kind for f in findings] == ["repo-commit"], findings
    assert sha[:10] in findings[0].where and "mallory" in findings[0].detail
    trailers = git(webapp, "log", "--no-merges", "-F", "--grep=Work-Order: g1", "--format=%H", "main").split()
    assert len(trailers) == 1


def test_a_commit_made_by_hand_while_no_supervisor_runs_is_signalled_at_start(make_ws):
    ws = chip_team(make_ws)
    (probe_of(ws) / "go.a1").touch()
    drop(ws, "chip", "a1.md", order_md("Order a1 lands", id="a1", files=("webapp/src/a1.py",)))
    with Supervisor(ws) as sup:
        sup.run_once(limit=WAIT)
    assert verify(ws) == [] and silent_signals(ws) == []
    sha = hand_commit(ws.repos / "webapp", "NOTES.md")
    with Supervisor(ws) as sup:
        sup.run_once(limit=WAIT)
    (sig,) = silent_signals(ws)
    assert "repos/webapp" in sig.evidence and sha[:10] in sig.evidence
    findings = verify(ws)
    assert len(findings) == 1 and sha[:10] in findings[0].where
    assert StateRepo(ws.state).dirty() == []  # the signal itself is committed


RACE = 3.0  # seconds of committing by hand while orders merge


@pytest.mark.slow  # some 6 s: `make test-slow`, and CI, run it
def test_commits_racing_a_live_supervisor_lose_nothing(make_ws, tmp_path):
    """A live `coordinator supervise` merges six orders while a person commits on main in a
    tight loop in the same checkout. An order may fail its merge (and be blocked after
    retries), but nothing is lost or misattributed: every kept change stays on main under
    its agent's name, every hand commit stays on main holding only what the person wrote,
    and `audit verify` lists exactly the hand commits."""
    ws = chip_team(make_ws)
    webapp = ws.repos / "webapp"
    with Supervisor(ws):
        pass  # the supervisor has seen webapp's main: from here on every hand commit counts
    ids = [f"r{i}" for i in range(8)]
    for oid in ids:
        (probe_of(ws) / f"go.{oid}").touch()
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} lands", id=oid, files=(f"webapp/src/{oid}.py",)))
    log = open(tmp_path / "supervise.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(COORDINATOR), "-w", str(ws.root), "supervise"], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    hand: dict[str, str] = {}  # sha -> the file its author added
    ended = lambda: all(_status(ws, oid) in ("done", "blocked") for oid in ids)  # noqa: E731
    try:
        n, race_until = 0, time.monotonic() + RACE
        while not ended() and time.monotonic() < race_until:
            name = f"hand-{n}.txt"
            with contextlib.suppress(subprocess.CalledProcessError):  # index.lock: the supervisor is in
                hand[hand_commit(webapp, name)] = name
            n += 1
        wait_until(ended, "every order to end")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert hand
    recs = Store(ws.state).load_all()
    for oid in ids:
        rec = recs[oid]
        if rec.status == "blocked":  # gave up merging against a moving branch: allowed
            assert "merge" in rec.failures[-1], rec.failures
            continue
        mine = git(webapp, "log", "--no-merges", "-F", f"--grep=Work-Order: {oid}", "--format=%H %an", "main").split("\n")
        assert [line.split()[1] for line in mine if line] == ["chip"], (oid, mine)
        assert git(webapp, "show", f"main:src/{oid}.py") == "x = 1\n", f"{oid}'s kept change is gone from main"
    for sha, name in hand.items():
        assert subprocess.run(["git", "-C", str(webapp), "merge-base", "--is-ancestor", sha, "main"]).returncode == 0, \
            f"hand commit {name} was dropped from main"
        # Only hand files (an earlier failed commit may have left one staged), no agent's.
        touched = git(webapp, "diff-tree", "--no-commit-id", "--name-only", "-r", sha).split()
        assert name in touched and all(t.startswith("hand-") for t in touched), \
            f"the hand commit {name} holds {touched}"
    findings = verify(ws)
    assert {f.where.split("@", 1)[1] for f in findings if f.kind == "repo-commit"} == {s[:10] for s in hand}
    assert not [f for f in findings if f.kind != "repo-commit"], findings
    assert [line for line in git(webapp, "status", "--porcelain").splitlines() if "hand-" not in line] == []


def _status(ws: Workspace, oid: str) -> str | None:
    with contextlib.suppress(Exception):
        return Store(ws.state).load(oid).status
    return None


def test_a_hand_edit_of_state_is_restored_at_start_and_signalled(make_ws):
    ws = make_ws({"walt": {"role": "orchestrator"}})
    drop(ws, "walt", "h.md", order_md("Order h is queued", id="h"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=WAIT)
    record = Store(ws.state).record_path("h")
    honest = record.read_text()
    forged = json.loads(honest)
    forged["status"] = "done"
    record.write_text(json.dumps(forged))
    (ws.state / "orders" / "forged").mkdir()
    (ws.state / "orders" / "forged" / "record.json").write_text(json.dumps({**forged, "id": "forged"}))
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        assert sup.records["h"].status == "queued"
        assert "forged" not in sup.records
        sup.run_once(limit=WAIT)
    assert record.read_text() == honest
    assert not (ws.state / "orders" / "forged").exists()
    (sig,) = silent_signals(ws)
    assert "orders/h/record.json" in sig.evidence and "orders/forged/record.json" in sig.evidence
    assert any("signal silent" in line for line in said)
    assert verify(ws) == []




def test_an_order_folder_removed_by_hand_while_the_order_runs_is_put_back_when_it_ends(make_ws):
    """`rm -rf state/orders/g1` while g1 ran, its end before the tamper watch looked: the report
    was written into a folder that was gone, and the supervisor stopped with an internal error."""
    ws = chip_team(make_ws)
    drop(ws, "chip", "g1.md", order_md("Order g1 lands", id="g1", files=("webapp/src/g1.py",)))
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        step_until(sup, lambda: sup.records.get("g1") is not None and sup.records["g1"].status == "running",
                   "g1 to run")
        step_until(sup, lambda: Store(ws.state).record_path("g1").exists(), "g1 placed")
        shutil.rmtree(Store(ws.state).folder("g1"))
        (probe_of(ws) / "go.g1").touch()
        sup.run_once(limit=WAIT)
    rec = Store(ws.state).load("g1")
    assert rec.status == "done" and [h["to"] for h in rec.history] == ["queued", "running", "done"]
    assert {p.name for p in Store(ws.state).folder("g1").iterdir()} >= {"order.json", "original.md", "report.md"}
    assert any("state/orders/g1/ was removed; put back from git" in s.evidence for s in silent_signals(ws)), said
    assert StateRepo(ws.state).dirty() == [] and verify(ws) == []



def test_a_workspace_moved_away_while_the_supervisor_runs_says_so_and_is_picked_up_where_it_is(make_ws):
    """`mv team team-old` while an order ran: the supervisor's next write found no folder, and
    it stopped with "internal error: FileNotFoundError ... please report this"."""
    ws = chip_team(make_ws)
    drop(ws, "chip", "g1.md", order_md("Order g1 lands", id="g1", files=("webapp/src/g1.py",)))
    moved = ws.root.with_name("moved")
    with pytest.raises(SupervisorError) as e, Supervisor(ws) as sup:
        step_until(sup, lambda: sup.records.get("g1") is not None and sup.records["g1"].status == "running",
                   "g1 to run")
        os.rename(ws.root, moved)
        (probe_of(ws) / "go.g1").touch()
        sup.run_once(limit=WAIT)
    assert str(e.value) == (f"the workspace {ws.root} was moved or removed while the supervisor ran: start it "
                            "again where the workspace is now (what was under way is picked up there)")
    there = Workspace(moved)
    with Supervisor(there) as sup:
        sup.run_once(limit=WAIT)
    assert Store(there.state).load("g1").status == "done"
    assert verify(there) == []


@contextlib.contextmanager
def state_index_held(ws: Workspace) -> Iterator[Callable[[], None]]:
    """state/'s index.lock held by a live git process, as a person's `git commit -a` holds it
    while its editor is open: the supervisor's git waits for it, then gives up (a live git's
    lock is never cleared). Yields `release`."""
    lock = ws.state / ".git" / "index.lock"
    holder = subprocess.Popen(["git", "cat-file", "--batch"], cwd=ws.state, stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
    end = time.monotonic() + WAIT
    while True:  # taken between two of the supervisor's gits, as git takes it
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            break
        except FileExistsError:
            assert time.monotonic() < end, "state/'s index.lock never came free"
            time.sleep(0.005)
    mine = os.fstat(fd).st_ino
    os.close(fd)

    def release() -> None:
        # Only this lock, once: released, the name is the supervisor's git's next (removing
        # that one mid-write failed its commit with "Unable to write new index file").
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(lock).st_ino == mine:
                lock.unlink()
        if holder.poll() is None:
            holder.communicate(b"")

    try:
        yield release
    finally:
        release()


@pytest.mark.slow  # some 3 s: `make test-slow`, and CI, run it
def test_a_person_holding_states_index_lock_past_the_wait_costs_no_order(make_ws, monkeypatch):
    """While orders run, a git in state/ holds index.lock longer than a commit waits for it.
    The batch that met it was lost, the batches after it too, and the journal forgot their
    files: the next start took the supervisor's own uncommitted writes for hand edits and
    deleted every order. Now the failure is said, what it held is committed with a later
    batch, the run goes on, and a restart finds every order done, nothing blamed on anyone."""
    from coordinator import trail
    from coordinator.errors import CoordinatorError

    monkeypatch.setattr(trail, "LOCK_WAIT", 0.3)  # what a commit waits for a lock (5 s otherwise)
    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 0.4"), "writes": ["webapp/src/**"]}})
    ids = [f"o{i}" for i in range(6)]
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} runs", id=oid))
    said: list[str] = []
    failed = "WARNING: could not commit state/"
    over = threading.Event()

    def person() -> None:
        wait_until(lambda: "o0 chip: queued -> running" in git(ws.state, "log", "--format=%B"), "o0 to start")
        with state_index_held(ws) as release:
            wait_until(lambda: over.is_set() or any(line.startswith(failed) for line in said), "a commit to fail")
            release()

    hand = threading.Thread(target=person)
    hand.start()
    stopped: CoordinatorError | None = None
    try:
        with Supervisor(ws, log=said.append) as sup:
            sup.run_once(limit=WAIT)
    except CoordinatorError as e:
        stopped = e
    finally:
        over.set()
        hand.join()

    again = supervise_once(ws)

    assert again.returncode == 0, again.stderr
    recs = Store(ws.state).load_all()
    assert {oid: recs[oid].status for oid in ids} == dict.fromkeys(ids, "done"), again.stderr
    for oid in ids:
        assert [e.new for e in StateRepo(ws.state).entries(oid)] == ["queued", "running", "done"], oid
    assert silent_signals(ws) == [], again.stderr
    assert verify(ws) == []
    assert stopped is None  # the run went on past the failure
    (warning,) = [line for line in said if line.startswith(failed)]
    assert "index.lock" in warning and warning.endswith("kept, to be committed with the next batch")
    assert "recovery:" not in again.stderr  # it had stopped cleanly: nothing left to commit


@pytest.mark.slow  # some 6 s: `make test-slow`, and CI, run it
def test_state_commits_failing_in_a_row_stop_the_supervisor_and_a_restart_loses_nothing(make_ws, monkeypatch):
    """Every state/ commit fails once the loop runs. After a few tries the supervisor stops
    with one line saying why and that nothing is lost; what it wrote is on disk and in its
    journal, and a restart commits it and finds every order where it was, nothing blamed on
    a person."""
    from coordinator import audit
    from coordinator.errors import CoordinatorError, GitError, SupervisorError

    ws = make_ws({"chip": {"role": "specialist", "command": sh("sleep 0.8"), "writes": ["webapp/src/**"]},
                  "walt": {"role": "orchestrator"}})
    written = audit.StateRepo.write
    failing = threading.Event()

    def write(self: StateRepo, batch: audit.Batch) -> int:
        if failing.is_set():
            raise GitError("git update-index failed in state/: error: unable to write the object")
        return written(self, batch)

    monkeypatch.setattr(audit.StateRepo, "write", write)
    ids = [f"o{i}" for i in range(6)]  # running for longer than the loop's tries take
    for oid in ids:
        drop(ws, "chip", f"{oid}.md", order_md(f"Order {oid} runs", id=oid))
    drop(ws, "walt", "w.md", order_md("Order w waits in walt's queue", id="w"))
    said: list[str] = []
    with pytest.raises(CoordinatorError) as stopped, Supervisor(ws, log=said.append) as sup:
        failing.set()
        sup.run_once(limit=WAIT)
    assert set(Store(ws.state).load_all()) == {*ids, "w"}
    assert StateRepo(ws.state).dirty()  # nothing the loop wrote is committed
    monkeypatch.setattr(audit.StateRepo, "write", written)

    again = supervise_once(ws)

    assert again.returncode == 0, again.stderr
    assert "recovery: committed state/orders/o0/record.json" in again.stderr
    recs = Store(ws.state).load_all()
    assert {oid: recs[oid].status for oid in ids} == dict.fromkeys(ids, "done"), again.stderr
    assert recs["w"].status == "queued"
    for oid in ids:
        assert len(list(Store(ws.state).folder(oid).glob("original.*"))) == 1
        assert [e.new for e in StateRepo(ws.state).entries(oid)][-1] == "done"
    assert silent_signals(ws) == [], again.stderr
    assert verify(ws) == []
    assert isinstance(stopped.value, SupervisorError), stopped.value
    assert str(stopped.value) == ("state/ takes no commits (git update-index failed in state/: error: unable to "
                                  "write the object); stopped after 3 tries: nothing is lost, the next start "
                                  "commits what was written")
    assert len([line for line in said if line.startswith("WARNING: could not commit state/")]) == 2


def test_a_command_that_cannot_commit_while_no_supervisor_runs_keeps_its_change(make_ws, monkeypatch):
    """`coordinator cancel` with no supervisor running, while a git in state/ holds index.lock:
    the command says it could not commit. The next start took its change for a hand edit (the
    order came back queued, and a person was blamed); it commits it now, as the command's."""
    from coordinator import control, trail
    from coordinator.errors import CoordinatorError, SupervisorError

    monkeypatch.setattr(trail, "LOCK_WAIT", 0.3)
    ws = make_ws({"walt": {"role": "orchestrator"}})  # walt has no command: its orders stay queued
    drop(ws, "walt", "c.md", order_md("Order c is cancelled", id="c"))
    with Supervisor(ws) as sup:
        sup.run_once(limit=WAIT)
    with state_index_held(ws), pytest.raises(CoordinatorError) as failed:
        control.submit(ws, "cancel", {"id": "c"})
    assert Store(ws.state).load("c").status == "cancelled"

    again = supervise_once(ws)

    assert again.returncode == 0, again.stderr
    assert Store(ws.state).load("c").status == "cancelled"
    assert [e.new for e in StateRepo(ws.state).entries("c")] == ["queued", "cancelled"]
    assert silent_signals(ws) == [], again.stderr
    assert verify(ws) == []
    assert isinstance(failed.value, SupervisorError)  # one line: why, and that nothing is lost
    assert re.fullmatch(r"state/ takes no commits \(git .*index\.lock.*\): nothing is lost, the next start "
                        r"commits what was written", str(failed.value)), failed.value

# -- 6. the watcher thread dies ---------------------------------------------------------------
def test_files_are_still_processed_after_the_watcher_thread_dies(make_ws):
    """watchdog's observer is stopped behind the supervisor's back while `run()` is live; the
    supervisor restarts it and files dropped meanwhile are filed all the same."""
    ws = make_ws({"walt": {"role": "orchestrator"}})
    sup = Supervisor(ws)
    sup.open()
    stops = [0]
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            sup.run(should_stop=lambda: stops[0])
        except BaseException as e:
            crashed.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        drop(ws, "walt", "before.md", order_md("Filed before the watcher died", id="before"))
        wait_until(lambda: Store(ws.state).exists("before"), "the first file to be filed")
        observer = sup.watcher.observer
        assert observer is not None
        observer.stop()
        observer.join(10)
        assert not observer.is_alive()
        names = [f"after{i}" for i in range(5)]
        for oid in names:
            drop(ws, "walt", f"{oid}.md", order_md(f"Filed after the watcher died {oid}", id=oid))
        wait_until(lambda: crashed or all((Store(ws.state).folder(o) / "record.json").exists() for o in names),
                   "files dropped after the watcher died to be filed", timeout=30)
        assert not crashed, crashed  # the loop itself died: say with what, not as a timeout
        assert sup.watcher.restarts >= 1
        assert sup.watcher.observer is not None and sup.watcher.observer.is_alive()
    finally:
        stops[0] = 1
        thread.join(WAIT)
        sup.close()
    assert not crashed, crashed
    recs = Store(ws.state).load_all()
    assert sorted(recs) == sorted(["before", *names])
    assert {r.status for r in recs.values()} == {"queued"}
    assert os.listdir(ws.inbox("walt")) == []
    assert verify(ws) == []


@pytest.mark.slow  # 2-3 s: `make test-slow`, and CI, run it
def test_a_watcher_that_raises_in_the_pump_thread_is_said_and_the_pump_goes_on(make_ws, monkeypatch):
    """Anything the watcher raises in the thread that wakes the loop is one warning line, not
    a thread traceback and a pump gone for good (drops left to the loop's idle timeout)."""
    ws = make_ws({"walt": {"role": "orchestrator"}})
    watcher = InboxWatcher([ws.inbox("walt")])
    real_wait, raised = watcher.wait, [0]

    def wait(timeout: float) -> bool:
        if raised[0] < 3:  # three times in a row: said once
            raised[0] += 1
            raise RuntimeError("watchdog broke\nin two lines")
        return real_wait(timeout)

    monkeypatch.setattr(watcher, "wait", wait)
    uncaught: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: uncaught.append(a.thread))
    said: list[str] = []
    sup = Supervisor(ws, log=said.append, watcher=watcher)
    sup.open()
    stops = [0]
    thread = threading.Thread(target=lambda: sup.run(should_stop=lambda: stops[0]), daemon=True)
    thread.start()
    try:
        wait_until(lambda: raised[0] == 3, "the watcher to raise in the pump three times")
        drop(ws, "walt", "after.md", order_md("Filed after the pump's watcher raised", id="after"))
        wait_until(lambda: Store(ws.state).exists("after"), "the file dropped after it to be filed")
        assert [t.is_alive() for t in sup._pumps] == [True]
    finally:
        stops[0] = 1
        thread.join(WAIT)
        sup.close()
    assert not [t for t in uncaught if t is not None and t.name == "watch_pump"]
    assert [line for line in said if "watcher failed" in line] == [
        "WARNING: the inbox watcher failed (watchdog broke in two lines); the inboxes are still rescanned"]


# -- stopping `supervise --once` ------------------------------------------------------------
def test_supervise_once_stops_on_a_second_sigterm_and_loses_nothing(make_ws):
    """Ctrl-C twice (or SIGTERM twice) stops `supervise --once` too, as it stops `supervise`:
    its running attempt is killed and re-queued at the next start, not lost and not left
    running for ever, and not counted as a failure of its agent (which blocked the order at
    `max_failures`)."""
    ws = chip_team(make_ws)
    drop(ws, "chip", "z1.md", order_md("Order z1 waits for ever", id="z1", files=("webapp/src/z1.py",)))
    proc = subprocess.Popen([str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_until(lambda: _status(ws, "z1") == "running", "z1 to run")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # not a sync: two signals sent back to back may merge into one
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("`supervise --once` ignored two SIGTERMs")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert json.loads((ws.runtime / "cut-by-stop.json").read_text()) == ["z1"]
    (probe_of(ws) / "go.z1").touch()
    again = supervise_once(ws)
    assert again.returncode == 0, again.stderr
    rec = Store(ws.state).load("z1")
    # The stop was the supervisor's, not the agent's failure: with max_failures 1 it was blocked.
    assert (rec.status, rec.attempts, rec.failures) == ("done", 2, [])
    assert any("attempt 1 was cut off when the supervisor stopped; not counted as a failure" in e.line
               for e in StateRepo(ws.state).entries("z1"))
    assert not (ws.runtime / "cut-by-stop.json").exists()
    assert verify(ws) == []


def test_a_supervisor_started_with_no_inotify_instance_free_takes_orders_in_by_rescans(
        make_ws: Callable[..., Workspace], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Other programs hold every inotify instance the user may have: the supervisor stopped at
    start ("inotify instance limit reached"), taking in nothing. It now says so once, takes
    orders in by its rescans, and watches again once an instance is free."""
    from coordinator import watcher as watcher_mod

    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    real = watcher_mod._InotifyObserver
    used_up = [True]

    def observer(*callbacks: Callable[[], None]) -> object:  # inotify_init1 as the kernel refuses it
        if used_up[0]:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(*callbacks)

    monkeypatch.setattr(watcher_mod, "_InotifyObserver", observer)
    monkeypatch.setattr(watcher_mod, "RETRY_EVERY", 0.2)
    with Supervisor(ws) as sup:
        drop(ws, "chip", "a.md", order_md("Say ok once"))
        sup.run_once(limit=WAIT)
        used_up[0] = False  # the other programs ended
        drop(ws, "chip", "b.md", order_md("Say ok twice"))
        sup.run_once(limit=WAIT)
        watcher = sup.watcher
        assert isinstance(watcher, InboxWatcher)

        def watching() -> bool:
            watcher.wait(0.0)  # its health check tries the restart
            return watcher.broken is None

        wait_until(watching, "the watcher to watch again")
    said = [r.getMessage() for r in caplog.records if "inotify instance limit" in r.getMessage()]
    assert len(said) == 1 and "rescanned every" in said[0]
    assert any("watches every inbox again" in r.getMessage() for r in caplog.records)
    records = Store(ws.state).load_all()
    assert sorted(r.status for r in records.values()) == ["done", "done"]


def test_a_descriptor_limit_too_low_for_any_order_is_refused_at_start(make_ws: Callable[..., Workspace]) -> None:
    """Under `ulimit -n 20` the supervisor took every order in and blocked each one after
    max_failures refusals ("too many open files"); under 16 it stopped with an internal error."""
    import resource

    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    drop(ws, "chip", "a.md", order_md("Say ok"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = subprocess.run([str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"], capture_output=True,
                          text=True, timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (20, hard)))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "coordinator: this process may open only 20 files (`ulimit -n`); the supervisor needs 32 or more to "
        "run an order: raise the limit and start it again")
    assert not Store(ws.state).load_all()  # nothing taken in, so nothing blocked
    assert (ws.inbox("chip") / "a.md").exists()


def test_a_supervisor_out_of_descriptors_says_so_and_the_next_start_goes_on(make_ws: Callable[..., Workspace],
                                                                              tmp_path: Path) -> None:
    """Its descriptors used up while it ran (its limit lowered under it, as `prlimit` does): it
    stopped with "internal error: OSError: [Errno 24] Too many open files (please report
    this …)". It now says what ran short and what to do; the next start does the order once."""
    import resource

    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok")}})
    log = tmp_path / "supervise.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(COORDINATOR), "-w", str(ws.root), "supervise"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: b"Ctrl-C to stop" in log.read_bytes(), "the supervisor to start")
            held = len(os.listdir(f"/proc/{proc.pid}/fd"))
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (held, hard))
            drop(ws, "chip", "a.md", order_md("Say ok", id="a"))
            assert proc.wait(60) == 2
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("coordinator: too many open files: the supervisor may open ") and "ulimit -n" in last
    assert "internal error" not in log.read_text()
    assert supervise_once(ws).returncode == 0
    assert Store(ws.state).load_all()["a"].status == "done"
    assert verify(ws) == []


@pytest.mark.slow
def test_a_full_disk_under_repos_stops_the_supervisor_instead_of_blocking_the_order(
        make_ws: Callable[..., Workspace]) -> None:
    """repos/ on a disk of its own that fills: git could not make the order's working copy, which
    failed the attempt and its retry at once, and the order was blocked (and escalated) for a
    disk. Now the supervisor stops, saying to make room; after that the order runs, once."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok > src/kept.py"),
                           "writes": ["webapp/src/**"]}})
    webapp = ws.repos / "webapp"
    saved = ws.root / "webapp.saved"
    shutil.copytree(webapp, saved, symlinks=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(ws.repos)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        shutil.copytree(saved, webapp, symlinks=True)
        with Supervisor(ws):
            pass  # the supervisor has seen webapp's main
        drop(ws, "chip", "a.md", order_md("Keep it", id="a", files=("webapp/src/kept.py",)))
        filler = fill(ws.repos, leave=0)

        full = supervise_once(ws)
        assert full.returncode == 2, full.stderr
        said = full.stderr.strip().splitlines()[-1]
        assert said.startswith("coordinator: No space left on device") and "make room and run it again" in said
        rec = Store(ws.state).load_all()["a"]
        assert rec.status == "queued" and rec.failures == []

        filler.unlink()
        assert supervise_once(ws).returncode == 0
        rec = Store(ws.state).load_all()["a"]
        assert rec.status == "done" and rec.attempts == 1
        assert verify(ws) == []
    finally:
        subprocess.run(["umount", "-l", str(ws.repos)], check=False)


def entering(group: Path) -> Callable[[], None]:
    """A `preexec_fn` that moves the child into cgroup `group` before it runs."""
    procs = str(group / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    return enter


@pytest.fixture
def pids_cgroup(tmp_path: Path) -> Iterator[Path]:
    """A cgroup of the pids controller (v1) of its own: its pids.max caps the processes and
    threads of what is moved into it, root's included (`ulimit -u` does not bind root)."""
    group = Path("/sys/fs/cgroup/pids") / f"coordinator-test-{os.getpid()}-{tmp_path.name}"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a pids cgroup here (needs root and cgroup v1 pids): {e}")
    try:
        yield group
    finally:
        wait_until(lambda: not (group / "cgroup.procs").read_text().strip(), "the cgroup to empty", timeout=30)
        group.rmdir()


@pytest.mark.slow
def test_a_supervisor_out_of_processes_says_so_and_the_next_start_goes_on(
        make_ws: Callable[..., Workspace], pids_cgroup: Path) -> None:
    """Under a process limit (`ulimit -u` of a user, the pids limit of a container) that counts
    threads, the watcher could not start its thread per inbox: "internal error: RuntimeError:
    can't start new thread"; a git command it could not fork: "internal error:
    BlockingIOError". Now the watcher falls back to rescans, saying so, and a supervisor that
    cannot fork stops saying what ran short; nothing is lost and the next start ends it all."""
    agents = {f"a{i}": {"role": "specialist", "command": sh("sleep 0.2; echo ok > src/$COORD_ORDER_ID.py"),
                        "writes": ["webapp/src/**"]} for i in range(8)}
    ws = make_ws(agents, max_parallel=8)
    ids = [f"o{i}" for i in range(16)]
    for i, oid in enumerate(ids):
        drop(ws, f"a{i % 8}", f"{oid}.md", order_md(f"Write {oid}", id=oid, files=(f"webapp/src/{oid}.py",)))
    (pids_cgroup / "pids.max").write_text("10")
    enter = entering(pids_cgroup)

    short = subprocess.run([str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"], capture_output=True,
                           text=True, timeout=180, preexec_fn=enter)
    assert "internal error" not in short.stderr and "Traceback" not in short.stderr, short.stderr
    assert "the file watcher cannot start its threads" in short.stderr and "`ulimit -u`" in short.stderr
    if short.returncode != 0:
        assert short.returncode == 2
        assert short.stderr.strip().splitlines()[-1].startswith("coordinator: no process or thread could be made")

    again = supervise_once(ws)
    assert again.returncode == 0, again.stderr
    recs = Store(ws.state).load_all()
    assert sorted(recs) == sorted(ids) and {r.status for r in recs.values()} == {"done"}, (
        f"first run (exit {short.returncode}):\n{short.stderr}\nsecond run:\n{again.stderr}")
    assert verify(ws) == []


def test_a_git_command_that_cannot_fork_is_the_process_limit_not_the_orders_failure(
        make_ws: Callable[..., Workspace], pids_cgroup: Path, tmp_path: Path) -> None:
    """git itself could not fork its helpers ("cannot fork() for branch"): that was a GitError,
    so the order's attempt failed, its retry at once too, and the order was blocked for the
    machine's process limit. It is the refused fork it is, which stops the supervisor saying so."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true")}})
    (pids_cgroup / "pids.max").write_text("2")  # this Python and one git: none of git's helpers
    code = ("import os, sys\n"
            "from pathlib import Path\n"
            "from coordinator.gitrepo import run_git\n"
            "with open(sys.argv[1], 'w') as f: f.write(str(os.getpid()))\n"
            "try:\n"
            "    run_git(['worktree', 'add', '-b', 'wo/x', sys.argv[3], 'HEAD'], git_dir=Path(sys.argv[2]),"
            " cwd=Path(sys.argv[2]))\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, getattr(e, 'errno', None), e)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code, str(pids_cgroup / "cgroup.procs"),
                          str(ws.repos / "webapp" / ".git"), str(tmp_path / "copy")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.startswith(f"BlockingIOError {errno.EAGAIN} "), out.stdout + out.stderr
    assert "git worktree" in out.stdout and "cannot fork" in out.stdout


@pytest.mark.slow
def test_supervise_under_a_process_limit_never_ends_in_an_internal_error(
        make_ws: Callable[..., Workspace], pids_cgroup: Path, tmp_path: Path) -> None:
    """At some limits the thread that wakes the loop could not be started: "internal error:
    RuntimeError: can't start new thread". Whatever thread or process is refused, it is said."""
    ws = make_ws({name: {"role": "specialist", "command": sh("true")} for name in ("a", "b")})
    enter = entering(pids_cgroup)

    for limit in range(3, 9):
        (pids_cgroup / "pids.max").write_text(str(limit))
        log = tmp_path / f"supervise-{limit}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(COORDINATOR), "-w", str(ws.root), "supervise"], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=enter)
            try:
                proc.wait(8)
            except subprocess.TimeoutExpired:  # it runs at this limit: fine too
                proc.terminate()
                proc.wait(30)
        said = log.read_text()
        assert "internal error" not in said and "Traceback" not in said, f"pids.max {limit}: {said}"
        if proc.returncode == 2:
            assert said.strip().splitlines()[-1].startswith("coordinator: no process or thread could be made")


def run_at_the_process_limit(ws: Workspace, pids_cgroup: Path) -> str:
    """Open a supervisor on `ws` in a process of its own, then hold that process to the threads
    and processes it has (the pids limit of its cgroup set to what it holds) and run it once:
    what it said, and how it ended."""
    code = ("import os, sys\n"
            "from pathlib import Path\n"
            "from coordinator.supervisor import Supervisor\n"
            "from coordinator.workspace import Workspace\n"
            "group = Path(sys.argv[2])\n"
            "try:\n"
            "    with Supervisor(Workspace(Path(sys.argv[1])), log=print) as sup:\n"
            "        with open(group / 'cgroup.procs', 'w') as f: f.write(str(os.getpid()))\n"
            "        (group / 'pids.max').write_text((group / 'pids.current').read_text())\n"
            "        sup.run_once(limit=20)\n"
            "except Exception as e:\n"
            "    print('ended:', type(e).__name__, e)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code, str(ws.root), str(pids_cgroup)], capture_output=True,
                         text=True, timeout=60, env=env)
    return out.stdout + out.stderr


@pytest.mark.slow
def test_a_commit_thread_refused_at_the_process_limit_loses_no_order(
        make_ws: Callable[..., Workspace], pids_cgroup: Path) -> None:
    """The supervisor stopped at a process limit when its commit thread could not start: "no
    process or thread could be made", as it should. But what it had filed was dropped from its
    journal of writes, so the next start took those orders for hand edits of state/: it deleted
    them (records and the dropped files alike), signalled a false `silent`, and exited 0 with
    no order left. Now the next start commits them, and every order is there."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true")}})
    for i in range(3):
        drop(ws, "chip", f"o{i}.md", "not a work order\n")
    # A file still being written keeps `--once` going after the three are filed: the commit
    # that follows goes to the commit thread, which the limit refuses.
    with open(ws.inbox("chip") / "later.md", "w"):
        said = run_at_the_process_limit(ws, pids_cgroup)
    assert "ended: SupervisorError no process or thread could be made" in said, said
    (ws.inbox("chip") / "later.md").unlink()
    filed = sorted(Store(ws.state).load_all())
    assert len(filed) == 3, said

    again = supervise_once(ws)
    assert again.returncode == 0, again.stderr
    assert sorted(Store(ws.state).load_all()) == filed, f"first run:\n{said}\nsecond run:\n{again.stderr}"
    assert "changed by hand" not in again.stderr and silent_signals(ws) == [], again.stderr
    assert verify(ws) == []


@pytest.mark.slow
def test_a_last_commit_refused_at_the_process_limit_is_said_not_an_internal_error(
        make_ws: Callable[..., Workspace], pids_cgroup: Path) -> None:
    """`supervise --once` that had filed everything could not fork git for its last commit:
    "internal error: BlockingIOError" (exit 70) instead of the process limit it met. Now it
    says so in one line (exit 2), and the next start commits what it wrote."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true")}})
    for i in range(3):
        drop(ws, "chip", f"o{i}.md", "not a work order\n")
    said = run_at_the_process_limit(ws, pids_cgroup)
    assert "ended: SupervisorError no process or thread could be made" in said, said
    filed = sorted(Store(ws.state).load_all())
    assert len(filed) == 3, said

    again = supervise_once(ws)
    assert again.returncode == 0, again.stderr
    assert sorted(Store(ws.state).load_all()) == filed and silent_signals(ws) == [], again.stderr
    assert verify(ws) == []


def test_a_spawn_server_that_cannot_start_its_thread_says_the_process_limit(
        make_ws: Callable[..., Workspace], pids_cgroup: Path) -> None:
    """With room for the supervisor and its spawn server and not one thread more, the spawn
    server's traceback ("RuntimeError: can't start new thread") came on the screen, then
    "the spawn server stopped (exit 1); restart the supervisor", which no restart mends. Now
    the one line says what ran short."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("true")}})
    drop(ws, "chip", "a.md", order_md("Anything", id="a"))
    (pids_cgroup / "pids.max").write_text("2")
    enter = entering(pids_cgroup)

    short = subprocess.run([str(COORDINATOR), "-w", str(ws.root), "supervise", "--once"], capture_output=True,
                           text=True, timeout=60, preexec_fn=enter)
    assert short.returncode == 2, short.stderr
    assert "Traceback" not in short.stderr and "restart the supervisor" not in short.stderr, short.stderr
    assert short.stderr.strip().splitlines()[-1].startswith("coordinator: no process or thread could be made")
    again = supervise_once(ws)
    assert again.returncode == 0, again.stderr
    assert [r.status for r in Store(ws.state).load_all().values()] == ["done"]


@pytest.mark.slow
def test_a_full_disk_under_the_working_copies_stops_the_supervisor_instead_of_blocking_the_order(
        make_ws: Callable[..., Workspace]) -> None:
    """The working copies (.coordinator/work/) on a disk of their own that fills: git could not
    check the order's copy out ("Could not reset index file", nothing about space), and the
    order was blocked after two instant failures. Now the supervisor stops naming that disk."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh("echo ok > src/kept.py"),
                           "writes": ["webapp/src/**"]}})
    work = ws.runtime / "work"
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(work)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        drop(ws, "chip", "a.md", order_md("Keep it", id="a", files=("webapp/src/kept.py",)))
        filler = fill(work, leave=0)

        full = supervise_once(ws)
        assert full.returncode == 2, full.stderr
        said = full.stderr.strip().splitlines()[-1]
        assert said.startswith("coordinator: No space left on device") and f"writing {work}" in said
        rec = Store(ws.state).load_all()["a"]
        assert rec.status == "queued" and rec.failures == []

        filler.unlink()
        assert supervise_once(ws).returncode == 0
        assert Store(ws.state).load_all()["a"].status == "done"
        assert verify(ws) == []
    finally:
        subprocess.run(["umount", "-l", str(work)], check=False)
