"""`coordinator audit verify` and the tamper watch: is every change explained?

Explained means: a commit on a repository's default branch carries a
`Work-Order:` trailer of an order that ended `done` (or is a merge the
supervisor made for one, or was there before the supervisor first saw the
repository); every change in `state/` was committed by the supervisor; every
transition an order record lists is in `state/`'s git history.

    state/repos.json   {"webapp": {"baseline": sha, "head": sha, "branch": "main"}}

`branch` is the default branch, as first seen checked out: orders start from it and merge
into it whatever a person checks out later. Renamed, it follows the checkout's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import audit, durable, trail
from .committer import Look
from .errors import CoordinatorError, GitError
from .inboxfiles import printable
from .store import Record, Store
from .workspace import Workspace

if TYPE_CHECKING:
    from .repos import Repo
    from .supervisor import Supervisor

TRAILER = re.compile(r"^Work-Order:\s*(\S+)\s*$", re.MULTILINE)
HEADS = "repos.json"


@dataclass(frozen=True)
class Finding:
    kind: str  # "repo-commit" | "state-uncommitted" | "state-foreign" | "history-missing"
    where: str
    detail: str

    def __str__(self) -> str:
        # One line, whatever a hand-made file name or a person's author name holds: a newline
        # in one printed a finding of its own, an escape sequence could hide or rewrite a
        # line on the terminal (`audit clean: …` over the finding). Escapes as text.
        return f"{self.kind}: {printable(self.where)}: {printable(self.detail)}"

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "where": self.where, "detail": self.detail}


def heads_path(ws: Workspace) -> Path:
    return ws.state / HEADS


def load_heads(ws: Workspace) -> dict[str, dict[str, str]]:
    """What repos.json says of each repository; what is not as the supervisor writes it (a
    folder in its place, a list, an entry that is no object: changed by hand, and listed by
    `audit verify` as such) is left out: `audit verify` stopped on it with an internal error."""
    try:
        data = json.loads(heads_path(ws).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {name: {k: v for k, v in entry.items() if isinstance(v, str)}
            for name, entry in data.items() if isinstance(entry, dict)}


def save_heads(ws: Workspace, heads: dict[str, dict[str, str]]) -> None:
    durable.write_json(heads_path(ws), heads, sync=False)


def repo_dirs(ws: Workspace) -> list[Path]:
    if not ws.repos.is_dir():
        return []
    return [p for p in sorted(ws.repos.iterdir()) if (p / ".git").exists()]


# A running supervisor commits what it wrote about once a second (FLUSH_EVERY in the
# supervisor), so a check beside it sees its last second of writes not yet committed. Such
# a finding counts only if it is still there, unchanged, after two more of its commits (or
# after a quiet spell with none: an idle supervisor has committed everything).
IN_FLIGHT = frozenset({"state-uncommitted", "history-missing"})
SETTLE_COMMITS = 2
SETTLE_QUIET = 2.5  # seconds without a commit: nothing more is on its way
SETTLE_MAX = 15.0
CLAIMED = "state/intake/"


def verify(ws: Workspace, *, say: Callable[[str], None] | None = None) -> list[Finding]:
    """Every change no order explains; beside a running supervisor, only what stays so."""
    from .control import supervisor_running

    found = _verify_once(ws)
    if not any(f.kind in IN_FLIGHT for f in found) or not supervisor_running(ws):
        return found
    # Claimed files (state/intake/) are its queue, never committed: filed in their turn.
    found = [f for f in found if not f.where.startswith(CLAIMED)]
    seen = {f: _content(ws, f) for f in found if f.kind in IN_FLIGHT}
    if not seen:
        return found
    if say is not None:
        say(f"a supervisor is running: checking {len(seen)} finding(s) again after its next commits")
    _settle(trail.Trail(ws.state))
    return [f for f in _verify_once(ws) if not f.where.startswith(CLAIMED) and (
        f.kind not in IN_FLIGHT or (f in seen and _content(ws, f) == seen[f]))]


def _settle(state: trail.Trail) -> None:
    """Wait for SETTLE_COMMITS commits in state/, or SETTLE_QUIET seconds without one."""
    head, commits = state.head(), 0
    now = time.monotonic()
    last, end = now, now + SETTLE_MAX
    while commits < SETTLE_COMMITS and now - last < SETTLE_QUIET and now < end:
        time.sleep(0.1)
        now = time.monotonic()
        current = state.head()
        if current != head:
            head, commits, last = current, commits + 1, now


def _content(ws: Workspace, finding: Finding) -> bytes | None:
    """What an uncommitted file holds now (None: gone, or not a file finding)."""
    if finding.kind != "state-uncommitted":
        return None
    try:
        return (ws.root / finding.where).read_bytes()
    except OSError:
        return None


def _verify_once(ws: Workspace) -> list[Finding]:
    if not (ws.state / ".git").exists():
        return [Finding("state-uncommitted", "state/", "not a git repository; run `coordinator supervise` once")]
    try:
        findings = _state_findings(ws, trail.Trail(ws.state, record=ws.state_head))
    except GitError as e:  # a corrupt object, a broken ref: a history nobody can check is no clean one
        findings = [Finding("state-foreign", "state/", f"its history cannot be read: {e}")]
    return findings + _repo_commits(ws)


def _state_findings(ws: Workspace, state: trail.Trail) -> list[Finding]:
    findings: list[Finding] = []
    written: dict[str, int] = durable.read_journal(ws.state_journal) or {}
    for path in state.dirty(optional_locks=False):  # beside a running supervisor: never in its way
        findings.append(Finding("state-uncommitted", f"state/{path}", _uncommitted(ws, path, written)))
    for line in state.foreign_commits():
        findings.append(Finding("state-foreign", "state/", f"commit not made by the supervisor: {line}"))
    rewound = state.rewound()
    if rewound is not None:
        findings.append(Finding("state-foreign", "state/", rewound))
    elif not _maybe_busy(ws):
        for line in state.named_as_supervisor():
            findings.append(Finding("state-foreign", "state/",
                                    f"commit made in the supervisor's name after its last one: {line}"))
    findings += [Finding("state-foreign", "state/", why) for why in _replaced(state.git)]
    for kept, head in state.lost():
        findings.append(Finding(
            "state-foreign", "state/",
            f"the supervisor's commit {kept[:10]} is gone from state/ (found at {head[:10]} instead: its history "
            "rewritten and pruned, or state/ removed and made anew): the orders and transitions it held cannot "
            f"be checked, and their commits in repos/ pass unexplained; `.coordinator/{trail.LOST}` keeps this"))
    findings += _history_gaps(ws, state, written)
    return findings


def _uncommitted(ws: Workspace, path: str, written: dict[str, int]) -> str:
    """What an uncommitted change in state/ is, as far as can be told: the supervisor's own
    write it noted in its journal (a crash came before the commit), a file gone, or changed."""
    if audit.own_change(path, ws.state, written):
        return "written by the supervisor, not committed yet (it stopped before its commit): its next start commits it"
    if not os.path.lexists(ws.state / path):
        return "deleted, and not by the supervisor"
    return "changed but not committed by the supervisor"


def _maybe_busy(ws: Workspace) -> bool:
    """Whether the supervisor may have committed past the head it kept: it runs, or it did
    not stop cleanly (a crash between a commit and keeping its head). A command served with
    no supervisor running (`coordinator retry`) and cut off there (Ctrl-C, a kill) leaves no
    marker, only its journal: as the next start does, that counts as a crash too."""
    from .control import supervisor_running
    from .recovery import stopped_cleanly

    journal = durable.read_journal(ws.state_journal)
    return ((ws.runtime / "running").exists() and not stopped_cleanly(ws, journal)) or bool(journal) \
        or supervisor_running(ws)


def _history_gaps(ws: Workspace, state: trail.Trail, written: dict[str, int]) -> list[Finding]:
    seen: Counter[tuple[str, str, str]] = Counter()
    for e in state.entries():
        if e.order and e.old and e.new:
            seen[(e.order, e.old, e.new)] += 1
    found: list[Finding] = []
    store = Store(ws.state)
    for rec in store.load_all().values():
        wanted: Counter[tuple[str, str, str]] = Counter(
            (rec.id, h["from"], h["to"]) for h in rec.history)
        mine = durable.written_by_journal(os.path.relpath(store.record_path(rec.id), ws.state), ws.state, written)
        for key, n in wanted.items():
            if seen[key] < n:
                found.append(Finding("history-missing", f"state/orders/{rec.id}",
                                     f"{key[1]} -> {key[2]} is in the record but not in state/'s git history"
                                     + ("; the supervisor wrote it and stopped before its commit: its next start "
                                        "commits it" if mine else "")))
    return found


def _repo_commits(ws: Workspace) -> list[Finding]:
    from .gitrepo import DetachedHead
    from .repos import Repo

    done = {r.id: r for r in Store(ws.state).load_all().values() if r.status == "done"}
    heads = load_heads(ws)
    found: list[Finding] = []
    for path in repo_dirs(ws):
        try:
            repo = Repo(path, branch=heads.get(path.name, {}).get("branch"))
            branch = repo.default_branch()
        except DetachedHead as e:  # a person's state, not damage: said as what to do
            found.append(Finding("repo-commit", f"repos/{path.name}", "not checked: its checkout is on a detached "
                                 f"HEAD, so the branch orders land on is not known; {e.hint}"))
            continue
        except CoordinatorError as e:
            found.append(Finding("repo-commit", f"repos/{path.name}", f"unreadable: {e}"))
            continue
        found += [Finding("repo-commit", f"repos/{path.name}", why) for why in _replaced(repo.git)]
        baseline = heads.get(path.name, {}).get("baseline")
        span = f"{baseline}..{branch}" if baseline else branch
        try:
            commits = trail.log_records(repo.git("log", "-z", "--format=%H%x00%an%x00%cn%x00%P%x00%B", span),
                                        5, f"repos/{path.name}")
        except CoordinatorError as e:
            found.append(Finding("repo-commit", f"repos/{path.name}", f"cannot read history: {e}"))
            continue
        for sha, author, committer, parents, body in commits:
            ids = TRAILER.findall(body)
            if baseline is None and not ids and committer == audit.SUPERVISOR and " " not in parents.strip():
                continue  # the demo repository's first commit, made by `coordinator init`
            if any(i in done and _lands(done[i], sha, parents, repo) for i in ids):
                continue
            subject = trail.one_line(body.strip().split("\n")[0])
            ended = [i for i in ids if i in done]
            why = (f"names {', '.join(ended)}, which landed another commit" if ended
                   else f"names {', '.join(ids)}, which did not end done" if ids
                   else "has no Work-Order trailer")
            found.append(Finding("repo-commit", f"repos/{path.name}@{sha[:10]}",
                                 f"{author}: {subject!r} {why}"))
        found += _gone(path.name, branch, done.values(), {c[0] for c in commits})
    return found


def _gone(name: str, branch: str, done: Iterable[Record], on_branch: set[str]) -> list[Finding]:
    """Done orders whose landed commit the default branch no longer holds: a `git reset --hard`
    or a force-push took the agents' work off it, with no commit left to list."""
    found = []
    for rec in done:
        changed = rec.report.get("changed") if isinstance(rec.report, dict) else None
        ours = isinstance(changed, list) and any(str(p).startswith(f"{name}/") for p in changed)
        if ours and rec.commit and rec.commit not in on_branch:
            found.append(Finding("repo-commit", f"repos/{name}@{rec.commit[:10]}",
                                 f"{rec.id} ended done with this commit, which {branch} no longer holds"))
    return found


def _replaced(git: Callable[..., str]) -> list[str]:
    """Commits `git replace` shows as other ones: `git log` by hand would show forged history
    under their ids (the supervisor and verify read past it)."""
    try:
        out = git("for-each-ref", "--format=%(refname)", "refs/replace/")
    except CoordinatorError:
        return []
    return [f"`git replace` shows commit {ref.rsplit('/', 1)[-1][:10]} as another one; "
            f"`git replace -d {ref.rsplit('/', 1)[-1][:10]}` there undoes it" for ref in out.split()]


def _lands(rec: Record, sha: str, parents: str, repo: Repo) -> bool:
    """Whether `sha` is what done order `rec` landed: the agent's commit, or the merge of it.
    A trailer is text anyone can write: a commit naming a done order by hand is no more
    explained than one naming none. A merge the record does not name (one that landed just
    before a crash) counts only when it holds exactly what merging its parents makes: a merge
    made by hand of an order's commit, already landed, brought in any change it liked."""
    merge = rec.report.get("merge") if isinstance(rec.report, dict) else None
    if not rec.commit:
        return False
    if sha in (rec.commit, merge):
        return True
    both = parents.split()
    return rec.commit in both[1:] and _faithful_merge(repo, sha, both)


def _faithful_merge(repo: Repo, sha: str, parents: list[str]) -> bool:
    """Whether merge commit `sha` of two `parents` holds what git's merge of them makes, and
    nothing else."""
    if len(parents) != 2:
        return False
    first, second = parents
    try:
        if repo.in_memory_merge:
            made = repo.git("merge-tree", "--write-tree", "--no-messages", first, second).split("\n")[0]
            return made == repo.git("rev-parse", f"{sha}^{{tree}}")
        # Older git: every path it changes from its first parent is one the merged side changed.
        base = repo.git("merge-base", first, second)
        changed = set(repo.git("diff", "--name-only", "-z", "--no-renames", first, sha).split("\0"))
        brought = set(repo.git("diff", "--name-only", "-z", "--no-renames", base, second).split("\0"))
        return changed <= brought
    except CoordinatorError:  # a conflict, a missing parent: no merge the supervisor made
        return False


def moved_heads(ws: Workspace, heads: dict[str, dict[str, str]],
                repo: Callable[[Path], Repo] | None = None) -> list[tuple[str, str, str]]:
    """Repositories whose default branch moved without the supervisor: (name, recorded, now).
    `repo`: the supervisor's own Repo of a folder (opening one is two git processes)."""
    from .repos import Repo

    moved = []
    for path in repo_dirs(ws):
        with contextlib.suppress(CoordinatorError):
            known = heads.get(path.name)
            r = repo(path) if repo else Repo(path, branch=(known or {}).get("branch"))
            head = r.tip()
            if known is None:
                heads[path.name] = known = {"baseline": head, "head": head}
            elif known.get("head") != head:
                moved.append((path.name, known.get("head", ""), head))
            branch = r.default_branch()  # the pinned one, or (first seen, renamed) the checkout's
            if known.get("branch") != branch:
                known["branch"] = r.pinned = branch
    return moved


def tally(findings: list[Finding]) -> str:
    """One line that counts `findings` by kind: the last line said after a long list."""
    kinds = Counter(f.kind for f in findings)
    return f"{len(findings):,} finding(s): " + ", ".join(f"{k} {n:,}" for k, n in sorted(kinds.items()))


def summary(findings: list[Finding]) -> dict[str, Any]:
    return {"clean": not findings, "findings": [f.as_json() for f in findings]}


# -- the tamper watch (run by the supervisor at start and every few seconds) --------------------------
def watch_state(sup: Supervisor) -> None:
    """Hand-made changes in state/ are put back from git and recorded as `silent`, looked for
    in the calling thread (the running loop has its committer thread look instead and acts on
    what it found later, see `act_on_look`)."""
    sup.drain_commits()  # only what the supervisor has committed is compared
    act_on_look(sup, Look(moved=sup.audit.moved_by_others(), dirty=sup.audit.dirty()))


def act_on_look(sup: Supervisor, look: Look) -> None:
    """Record what `look` found: commits nobody explains, and every changed path that the
    supervisor has not written since its last commit, put back from git first."""
    if look.error is not None:
        raise look.error
    for line in look.moved:
        sup.signal("silent", agent=None, order=None, evidence=f"a commit in state/ the supervisor did not make: {line}")
    written = durable.peek_journal(sup.ws.state) | look.taken
    mine = {os.path.relpath(p, sup.ws.state) for p in written}
    foreign = [p for p in look.dirty if durable.noted_at(p, mine) is None and not p.startswith("intake/")]
    if not foreign:
        return
    sup.drain_commits()  # git is the committer's meanwhile
    sup.audit.restore(foreign)
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    sup.signal("silent", agent=None, order=None, evidence=f"state/ changed by hand (restored from git): {shown}")


def watch_repos(sup: Supervisor) -> None:
    """A default branch that moved without the supervisor is reported as `silent`."""
    before = json.dumps(sup.heads, sort_keys=True)
    for name, old, new in moved_heads(sup.ws, sup.heads, lambda path: sup.attempts.repo(path.name)):
        sup.signal("silent", agent=None, order=None,
                   evidence=f"repos/{name} default branch moved {old[:10]}..{new[:10]} with no work order")
        sup.heads[name]["head"] = new
    if json.dumps(sup.heads, sort_keys=True) != before:
        save_heads(sup.ws, sup.heads)
        sup.audit.stage(audit.SUPERVISOR, "repos: recorded default-branch heads")
