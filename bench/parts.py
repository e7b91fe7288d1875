"""Costs of single parts: the sandbox per spawn, the gate per attempt, state commits.

- sandbox: `coordinator.spawner.Spawner` starts `/bin/true` with no ruleset and with a
  Landlock ruleset of the shape an attempt gets (attempt folder, a working-copy folder,
  an extra writable path), plus the read-only mount namespace where the machine has it;
  per spawn: the `spawn()` round trip (returns once exec succeeded) and the whole cycle
  until the exit is reported. The two modes alternate.
- gate: a git repository of GATE_FILES files and a worktree of it, as an attempt gets;
  per attempt `gate.snapshot` before, one file changed, `snapshot` after, `diff`, `judge`.
- state commits: `audit.StateRepo` on a fresh state repository; per transition a record
  file written (unsynced, as the supervisor does) and a line staged; then either one
  sync + commit per transition, or a sync + commit per GROUP lines (group commit).
"""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator import audit, durable, gate, mounts
from coordinator.errors import CoordinatorError
from coordinator.gitrepo import ident_env, run_git
from coordinator.landlock import Ruleset, abi_version
from coordinator.repos import Repo
from coordinator.spawner import Spawner, SpawnRequest

from .harness import BenchError, Figure, median, percentile, temp_folder

GATE_FILES = 1000
GROUP = 100  # transitions per commit in the group-commit case
SPAWN_WAIT = 10.0


@dataclass(frozen=True)
class Sizes:
    spawns: int = 200  # per mode
    gate_runs: int = 15
    worktree_runs: int = 3
    commit_runs: int = 3
    single_commits: int = 100
    group_commits: int = 1000


QUICK = Sizes(spawns=40, gate_runs=5, worktree_runs=2, commit_runs=2,
              single_commits=20, group_commits=200)


# -- sandbox -----------------------------------------------------------------------------------------


def _spawn_once(sp: Spawner, base: Path, token: str, rules: Ruleset | None) -> tuple[float, float]:
    """(spawn round trip, spawn to exit reported), seconds."""
    t0 = time.perf_counter()
    sp.spawn(SpawnRequest(("/bin/true",), dict(os.environ), str(base), str(base / "log"), token, rules))
    t1 = time.perf_counter()
    deadline = t1 + SPAWN_WAIT
    while True:
        exits = sp.poll()
        if any(e.token == token for e in exits):
            return t1 - t0, time.perf_counter() - t0
        left = deadline - time.perf_counter()
        if left <= 0:
            raise BenchError(f"spawned {token} but never saw it exit")
        select.select([sp], [], [], left)


def sandbox(sizes: Sizes) -> list[Figure]:
    if abi_version() < 1:
        return [Figure("sandbox_per_spawn", "5. sandbox cost per spawn", "no Landlock on this kernel", "-")]
    with temp_folder() as base:
        writable = [base / "attempt", base / "work" / "src", base / "probe"]
        for w in writable:
            w.mkdir(parents=True)
        rules = Ruleset(writable=tuple(str(w) for w in writable))
        results: dict[str, list[tuple[float, float]]] = {"bare": [], "landlock": []}
        n = 0
        with Spawner() as sp:
            _spawn_once(sp, base, "warm-up", rules)
            # Alternate spawn by spawn, so a change in the machine's load hits both modes alike.
            for _ in range(sizes.spawns):
                for mode in ("bare", "landlock"):
                    n += 1
                    results[mode].append(_spawn_once(sp, base, f"s{n}", rules if mode == "landlock" else None))
        py = []
        for _ in range(sizes.spawns):
            t0 = time.perf_counter()
            subprocess.run(["/bin/true"], check=True)
            py.append(time.perf_counter() - t0)

    def med(mode: str, i: int) -> float:
        return median([r[i] for r in results[mode]]) * 1000

    cost = med("landlock", 1) - med("bare", 1)
    floor = med("landlock", 1) / (median(py) * 1000)
    layers = "Landlock" if mounts.status() else "Landlock + read-only mounts"
    return [Figure(
        "sandbox_per_spawn", f"5. sandbox ({layers}) cost per spawn",
        f"+{cost:.2f} ms ({med('landlock', 1):.2f} vs {med('bare', 1):.2f} ms)",
        f"{len(results['bare'])}+{len(results['landlock'])} spawns",
        note=f"Spawner, /bin/true from spawn() to its exit reported, {len(writable)} writable rules; "
             f"spawn() alone {med('landlock', 0):.2f} vs {med('bare', 0):.2f} ms; "
             f"subprocess.run(['/bin/true']) {median(py) * 1000:.2f} ms: a sandboxed start and exit alone "
             f"is {floor:.1f}x a bare spawn, the floor under one-at-a-time throughput (figure 2)",
        data={"cost_ms": round(cost, 3), "landlock_cycle_ms": round(med("landlock", 1), 3),
              "bare_cycle_ms": round(med("bare", 1), 3), "landlock_spawn_call_ms": round(med("landlock", 0), 3),
              "bare_spawn_call_ms": round(med("bare", 0), 3),
              "landlock_cycle_p90_ms": round(percentile([r[1] for r in results["landlock"]], 90) * 1000, 3),
              "subprocess_run_ms": round(median(py) * 1000, 3), "landlock_cycle_vs_subprocess": round(floor, 2),
              "landlock_abi": abi_version(),
              "writable_rules": len(writable), "readonly_mounts": mounts.status() is None})]


# -- gate ------------------------------------------------------------------------------------------


def _make_repo(path: Path, files: int) -> Repo:
    """A repository of `files` source files of 0.5-4 KB in 40 folders, one commit on main."""
    for i in range(files):
        folder = path / "src" / f"pkg{i % 40:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        seed = hashlib.sha256(str(i).encode()).hexdigest()
        lines = 8 + int(seed[:2], 16) % 90
        text = "".join(f"def f{i}_{k}(x):  # {seed}\n    return x + {k}\n" for k in range(lines // 2))
        (folder / f"mod{i:04d}.py").write_text(text, encoding="utf-8")
    run_git(["init", "-q", "-b", "main", str(path)], git_dir=None, cwd=path.parent)
    gd = path / ".git"
    run_git(["add", "-A"], git_dir=gd, work_tree=path, cwd=path)
    run_git(["commit", "-q", "-m", "bench: a repository of many files"], git_dir=gd, work_tree=path, cwd=path,
            env=ident_env("bench", "bench@agents.coordinator"))
    return Repo(path)


def gate_cost(sizes: Sizes) -> list[Figure]:
    with temp_folder() as base:
        repo = _make_repo(base / "repos" / "big", GATE_FILES)
        worktree_s = []
        for i in range(sizes.worktree_runs):
            t0 = time.perf_counter()
            wt = repo.add_worktree(f"gate-{i}", base / "work" / f"gate-{i}" / "big")
            worktree_s.append(time.perf_counter() - t0)
        parts: dict[str, list[float]] = {"snapshot_before": [], "snapshot_after": [], "diff": [], "judge": []}
        totals = []
        target = wt / "src" / "pkg07" / "mod0007.py"
        files = ("big/src/pkg07/**",)
        writes = ("big/src/**",)
        for i in range(sizes.gate_runs):
            t0 = time.perf_counter()
            before = gate.snapshot(wt)
            t1 = time.perf_counter()
            target.write_text(f"# attempt {i}\n" + target.read_text("utf-8"), encoding="utf-8")
            t2 = time.perf_counter()
            after = gate.snapshot(wt, since=before)  # as the supervisor takes it: only what was written is read
            t3 = time.perf_counter()
            changes = gate.diff(before, after)
            t4 = time.perf_counter()
            verdict = gate.judge(changes, repo="big", files=files, writes=writes)
            t5 = time.perf_counter()
            if not verdict.allowed or len(changes) != 1:
                raise BenchError(f"gate bench: expected one allowed change, got {changes}")
            for key, span in (("snapshot_before", t1 - t0), ("snapshot_after", t3 - t2), ("diff", t4 - t3),
                              ("judge", t5 - t4)):
                parts[key].append(span)
            totals.append((t1 - t0) + (t5 - t2))
        entries = len(before)
    total = median(totals) * 1000
    return [Figure(
        "gate_per_attempt", f"5. gate cost per attempt, {GATE_FILES:,} files", f"{total:.1f} ms",
        f"{len(totals)} attempts",
        note=f"snapshot before {median(parts['snapshot_before']) * 1000:.1f} ms + after "
             f"{median(parts['snapshot_after']) * 1000:.1f} ms, diff {median(parts['diff']) * 1000:.2f} ms, "
             f"judge {median(parts['judge']) * 1000:.2f} ms ({entries} entries); not counted: the "
             f"attempt's `git worktree add` {median(worktree_s) * 1000:.0f} ms",
        data={"total_ms": round(total, 3), "entries": entries,
              **{f"{k}_ms": round(median(v) * 1000, 3) for k, v in parts.items()},
              "worktree_add_ms": round(median(worktree_s) * 1000, 1)})]


# -- state commits ----------------------------------------------------------------------------------


def _transitions(state: Path, repo: audit.StateRepo, n: int, per_commit: int, first: int) -> tuple[float, float]:
    """(seconds in all, seconds in sync + commit) to record and commit `n` transitions,
    committing every `per_commit`. Order folders exist already, as they do after intake."""
    oids = [f"WO-{i:05d}" for i in range(first, first + n)]
    for oid in oids:
        (state / "orders" / oid).mkdir(parents=True, exist_ok=True)
    committing = 0.0
    durable.open_journal(state)
    try:
        t0 = time.perf_counter()
        for k, oid in enumerate(oids, 1):
            durable.write_json(state / "orders" / oid / "record.json", {"id": oid, "status": "done"}, sync=False)
            repo.stage("chip", f"{oid} chip: running -> done")
            if k % per_commit == 0 or k == n:
                c0 = time.perf_counter()
                durable.sync_fs(state)  # the supervisor's _flush: one sync, then the commit
                repo.flush(durable.take_journal(state))
                committing += time.perf_counter() - c0
        return time.perf_counter() - t0, committing
    finally:
        durable.close_journal(state)


def state_commits(sizes: Sizes) -> list[Figure]:
    single: list[float] = []
    group: list[float] = []
    commit_ms: dict[str, list[float]] = {"single": [], "group": []}
    with temp_folder() as base:
        for r in range(sizes.commit_runs):
            state = base / f"state-{r}"
            audit.StateRepo.ensure(state)
            repo = audit.StateRepo(state)
            s, sc = _transitions(state, repo, sizes.single_commits, 1, 0)
            g, gc = _transitions(state, repo, sizes.group_commits, GROUP, 100_000)
            single.append(sizes.single_commits / s)
            group.append(sizes.group_commits / g)
            commit_ms["single"].append(sc / sizes.single_commits * 1000)
            commit_ms["group"].append(gc / (sizes.group_commits / GROUP) * 1000)
            lines = repo.git("log", "--format=%s").count("\n")
            if lines != 1 + sizes.single_commits + sizes.group_commits // GROUP:
                raise BenchError(f"state commits: expected one commit per flush, found {lines}")
    one, many = median(single), median(group)
    return [Figure(
        "state_commits", "6. state transitions committed",
        f"{many:,.0f}/s grouped vs {one:.0f}/s one by one ({many / one:.0f}x)",
        f"{len(single)} x ({sizes.group_commits}+{sizes.single_commits})",
        note=f"grouped: {GROUP} transitions per commit; each transition writes its record file, each commit "
             f"is one syncfs + update-index + write-tree, commit-tree, update-ref as in the supervisor: {median(commit_ms['group']):.0f} ms "
             f"per grouped commit, {median(commit_ms['single']):.0f} ms per single one",
        data={"group_per_s": round(many, 1), "single_per_s": round(one, 1), "group_size": GROUP,
              "group_commit_ms": round(median(commit_ms["group"]), 2),
              "single_commit_ms": round(median(commit_ms["single"]), 2),
              "single_runs_per_s": [round(x, 1) for x in single],
              "group_runs_per_s": [round(x, 1) for x in group]})]


def all_parts(sizes: Sizes) -> list[Figure]:
    try:
        figures = sandbox(sizes)
    except CoordinatorError as e:
        figures = [Figure("sandbox_per_spawn", "5. sandbox cost per spawn", f"failed: {e}", "-")]
    return figures + gate_cost(sizes) + state_commits(sizes)
