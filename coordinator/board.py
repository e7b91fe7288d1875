"""The board: orders by status, as a terminal kanban or JSON.

Example:
    $ coordinator board
    3 order(s): queued 1  done 1  blocked 1
    supervisor: running (pid 4242)
    ...
    BLOCKED (1)
      WO-0003  chip  user → Add a footer
               ↳ failed 3 time(s); last: exit 1 (escalated to rex as WO-0004)
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import budget, signals
from .errors import NotFoundError, StateError
from .inboxfiles import printable, stray_folders, survey
from .store import STATUSES, Record, RecordCache, Store, dependency_done, route_end, via_route
from .workspace import Workspace

COLOURS = {"queued": "cyan", "waiting": "yellow", "running": "blue", "done": "green",
           "halted": "magenta", "routed": "magenta", "blocked": "red", "rejected": "red",
           "denied": "red", "cancelled": "white"}
ACTIVE = ("queued", "waiting", "running")
ENDED_SHOWN = 8  # ended orders shown per column; the count says how many there are
LEFTOVER_AFTER = 300.0  # seconds: a download or an editor's file younger than this may still be in use
LEFTOVERS_NAMED = 3     # leftovers named per inbox; the count says how many there are
LEFTOVER_NAME = 48      # characters of a leftover's name shown
FAILURE_SHOWN = 4000    # characters of one failure's reason `show` prints (a stored one is cut there too)


def records(ws: Workspace, cache: RecordCache | None = None) -> list[Record]:
    """Every order, oldest first; a record file that is not one is said on stderr, not shown."""
    import click

    unreadable: list[str] = []
    found = Store(ws.state).load_all(unreadable=unreadable, cache=cache)
    for line in unreadable:
        click.echo(f"warning: {line}", err=True)
    return sorted(found.values(), key=lambda r: r.seq)


def as_json(ws: Workspace) -> dict[str, Any]:
    recs = records(ws)
    index = {r.id: r for r in recs}
    found = surveys(ws)
    return {"orders": [r.board_row() | {"stale": r.stale, "reason": reason(r, index)} for r in recs],
            "supervisor": supervisor(ws), "inboxes": inboxes(ws, found), "never_taken_in": leftovers(ws, found=found)}


Surveys = dict[str, tuple[list[Path], list[os.DirEntry[str]]]]


def surveys(ws: Workspace) -> Surveys:
    """Each agent's inbox listed once (`inboxfiles.survey`): what waits in it, and what never
    will be taken in. The board listed every inbox twice, once for each."""
    return {agent: survey(ws.inbox(agent)) for agent in ws.config.agents}


def inboxes(ws: Workspace, found: Surveys | None = None) -> dict[str, int]:
    """How many files wait in each agent's inbox, not taken in yet (orders the board cannot
    show until the supervisor files them)."""
    found = surveys(ws) if found is None else found
    return {agent: len(found[agent][0]) for agent in ws.config.agents}


def leftovers(ws: Workspace, *, now: float | None = None, ages: bool = True, found: Surveys | None = None) -> list[str]:
    """A line for each agent's inbox holding what is never taken in, though it sat there for
    LEFTOVER_AFTER: an unfinished download (`b.md.crdownload`), an editor's file (`b.md~`), a
    folder; an inbox that is a symbolic link; then the folders of inbox/ no agent has that hold
    files (`_strays`). Dot-files are left unsaid (files being written, or a system's own).
    `ages=False` leaves out how long each has sat there (a watch adds a board only on a change)."""
    now = time.time() if now is None else now
    found = surveys(ws) if found is None else found
    lines = []
    for agent in ws.config.agents:
        if ws.inbox_is_link(agent):  # an order dropped through it would wait there for ever
            lines.append(f"inbox/{agent} is a symbolic link: nothing in it is taken in (never through a link); "
                         "replace it with a folder")
            continue
        kept: list[tuple[float, str]] = []
        for entry in found[agent][1]:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # gone since the listing
                continue
            if now - st.st_mtime < LEFTOVER_AFTER:
                continue
            name = printable(entry.name)
            name = name if len(name) <= LEFTOVER_NAME else name[:LEFTOVER_NAME - 1] + "…"
            age = f" ({_age(now - st.st_mtime)})" if ages else ""
            kept.append((st.st_mtime, f"{name}{'/' if entry.is_dir(follow_symlinks=False) else ''}{age}"))
        if not kept:
            continue
        kept.sort()
        named = ", ".join(text for _, text in kept[:LEFTOVERS_NAMED])
        more = f" and {len(kept) - LEFTOVERS_NAMED} more" if len(kept) > LEFTOVERS_NAMED else ""
        lines.append(f"inbox/{agent}: {len(kept)} file(s) never taken in: {named}{more} (partial downloads, "
                     "editor files and folders are skipped)")
    return lines + _strays(ws)


def _strays(ws: Workspace) -> list[str]:
    """A line for each folder of inbox/ that is no agent's inbox and holds something: a typo
    (`inbox/Chip/`) or an agent since removed from coordinator.yaml. Nothing in it is taken in."""
    lines = []
    for folder in stray_folders(ws.inbox_root, ws.config.agents):
        try:
            held = sum(1 for e in os.scandir(folder.path) if not e.name.startswith("."))
        except OSError:
            continue
        if held:
            lines.append(f"inbox/{printable(folder.name)[:LEFTOVER_NAME]}/: {held} file(s) never taken in: no "
                         f"agent in coordinator.yaml has this inbox (the agents: "
                         f"{', '.join(sorted(ws.config.agents))})")
    if len(lines) > LEFTOVERS_NAMED:
        lines[LEFTOVERS_NAMED:] = [f"inbox/: {len(lines) - LEFTOVERS_NAMED} more folder(s) of no agent hold files "
                                   "never taken in"]
    return lines


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def supervisor(ws: Workspace) -> dict[str, Any]:
    """Whether a supervisor runs on `ws` now, and its pid."""
    from .control import config_drift, supervisor_running

    if not supervisor_running(ws):
        return {"running": False, "pid": None}
    try:
        pid: int | None = int((ws.runtime / "supervisor.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    drift = config_drift(ws)
    return {"running": True, "pid": pid, "stopped": pid is not None and _stopped(pid),
            **({"config_changed": drift} if drift else {})}


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (Ctrl-Z in its terminal, SIGSTOP): it holds its lock and
    looks alive, but takes nothing in and answers no request. Any of its threads stopped says so:
    a thread inside a long write to disk stops only when that returns, seconds later on a busy
    disk, and the request then waited for nothing."""
    from .spawner import proc_fields

    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        threads = [str(pid)]
    for tid in threads:
        fields = proc_fields(f"/proc/{pid}/task/{tid}/stat")
        if fields and fields[0] in (b"T", b"t"):
            return True
    return False


def supervisor_line(sup: dict[str, Any]) -> str:
    """The board's (and doctor's) line about the supervisor of `supervisor()`."""
    if not sup["running"]:
        return "supervisor: not running — `coordinator supervise` starts it"
    pid = sup["pid"] or "?"
    if sup.get("stopped"):
        return (f"supervisor: STOPPED (pid {pid}, suspended: Ctrl-Z?) — it takes nothing in and runs nothing "
                f"until resumed: `fg` in its terminal, or `kill -CONT {pid}`")
    return (f"supervisor: running (pid {pid})"
            + (f" — WARNING: {sup['config_changed']}" if sup.get("config_changed") else ""))


def reason(rec: Record, records: dict[str, Record]) -> str | None:
    """Why `rec` is where it is, in a line (None when its status says it all)."""
    # Records are read back from disk, where a hand edit may have left any shape: never fail on one.
    report = rec.report if isinstance(rec.report, dict) else {}
    follow = report.get("follow_up")
    planned = ({"id": str(follow.get("id") or "?"), "to": str(follow.get("to") or "?")}
               if isinstance(follow, dict) else None)
    if rec.status == "waiting":
        waits = [_awaited(d, records) for d in rec.dependencies if not dependency_done(records, d)]
        return f"waits for {', '.join(waits)}" if waits else None
    if rec.status == "routed":
        if planned:
            return f"to {planned['to']} as {planned['id']}"
        return f"as {rec.routed_to}" if rec.routed_to else None
    if rec.status == "rejected":
        return _first_line(rec.errors[0]) if rec.errors else None
    offending = report.get("offending")
    if rec.status == "denied" and isinstance(offending, list) and offending:
        return _first_line(offending[0])
    if rec.status in ("blocked", "halted", "denied") and report.get("summary"):
        escalated = f" (escalated to {planned['to']} as {planned['id']})" if planned and rec.status == "blocked" else ""
        return _first_line(report["summary"]) + escalated
    if rec.status in ("queued", "running") and rec.failures:
        return f"failed {len(rec.failures)} time(s); last: {_first_line(rec.failures[-1])}"
    return None


def _first_line(text: object) -> str:
    return next(iter(str(text).splitlines()), "")


def _awaited(order_id: str, records: dict[str, Record]) -> str:
    """A dependency as a waiting order's reason names it: one that halted or was blocked will not
    end done by itself, and the user is told what would move it."""
    last = route_end(records, order_id)
    if last is None or not last.terminal:
        return order_id
    return f"{via_route(order_id, last)} ({last.status}: `coordinator retry {last.id}`, or cancel it)"


def render(ws: Workspace, *, colour: bool = False, width: int | None = None,
           cache: RecordCache | None = None, ages: bool = True) -> str:
    import click

    recs = records(ws, cache)
    index = {r.id: r for r in recs}
    by_status: dict[str, list[Record]] = {s: [] for s in STATUSES}
    for r in recs:
        by_status.setdefault(r.status, []).append(r)
    width = width or shutil.get_terminal_size((120, 40)).columns
    # Columns as wide as the longest id and agent name (within reason), so rows line up.
    id_w = min(max((len(r.id) for r in recs), default=7), 24)
    to_w = min(max((len(r.to) for r in recs), default=4), 16)
    from_w = min(max((len(r.sender) for r in recs), default=4), 16)
    lines: list[str] = []
    summary = "  ".join(f"{s} {len(by_status[s])}" for s in STATUSES if by_status[s])
    found = surveys(ws)
    arrived = {agent: n for agent, n in inboxes(ws, found).items() if n}
    none = "none filed yet" if arrived else "none yet — drop a work order into inbox/<agent>/"
    lines.append(f"{len(recs)} order(s): {summary or none}")
    sup = supervisor(ws)
    if not sup["running"] and by_status["running"]:
        lines.append("supervisor: NOT RUNNING — the RUNNING orders below were cut off; "
                     "`coordinator supervise` re-queues them")
    else:
        lines.append(supervisor_line(sup))
    if arrived:
        lines.append(f"inboxes: {sum(arrived.values())} file(s) not taken in yet "
                     f"({', '.join(f'{agent} {n}' for agent, n in arrived.items())})"
                     + ("" if sup["running"] else " — `coordinator supervise` takes them in"))
    lines += leftovers(ws, ages=ages, found=found)
    stale = [r for r in by_status["running"] if r.stale]
    if stale:
        lines.append(f"stale: {', '.join(r.id for r in stale)} (no output or heartbeat)")
    lines.append(_budget_line(ws))
    try:
        counts = signals.counts(signals.load(ws.state))
    except StateError as e:
        lines.append(f"signals: {e}")
        counts = {}
    if any(counts.values()):
        lines.append("signals: " + "  ".join(f"{k} {v}" for k, v in counts.items() if v))
    for status in STATUSES:
        group = by_status[status]
        if not group:
            continue
        title = f"{status.upper()} ({len(group)})"
        lines.append("")
        lines.append(click.style(title, fg=COLOURS[status], bold=True) if colour else title)
        shown = group if status in ACTIVE else group[-ENDED_SHOWN:]
        if len(shown) < len(group):
            lines.append(f"  … {len(group) - len(shown)} older")
        for r in shown:
            flag = " [stale]" if r.stale else ""
            attempts = f" x{r.attempts}" if r.attempts > 1 else ""
            head = f"  {r.id:<{id_w}}  {r.to:<{to_w}}  {r.sender:>{from_w}} → "
            room = max(10, width - len(head) - len(flag) - len(attempts) - 1)
            # A rejected order keeps the objective its file had, escape sequences and all: shown
            # raw, one dropped file could retitle or clear the user's terminal.
            objective = printable(str(r.objective))
            obj = objective if len(objective) <= room else objective[: room - 1] + "…"
            text = f"{head}{obj}{attempts}{flag}"
            if colour and r.stale:
                text = click.style(text, fg="yellow")
            lines.append(text)
            why = reason(r, index)
            if why:
                indent = " " * (4 + id_w)
                room = max(10, width - len(indent) - 2)
                why = printable(" ".join(why.split()))
                lines.append(f"{indent}↳ {why if len(why) <= room else why[: room - 1] + '…'}")
    return "\n".join(lines)


def _budget_line(ws: Workspace) -> str:
    cfg = ws.config
    if not cfg.orchestrator:
        return "budget: no orchestrator configured"
    try:
        ledger = budget.Ledger.load(ws.state)
    except StateError as e:
        # One damaged file must not hide the orders: the board says it in its budget line.
        return f"budget: {e}"
    b = cfg.budget
    return (f"budget: {cfg.orchestrator} {ledger.hot_tokens():,}/{b.ceiling:,} hot tokens, "
            f"{ledger.mode(b.bands)}, generation {ledger.generation}")


def budget_data(ws: Workspace) -> dict[str, Any]:
    """The `budget --json` document of SPEC §10: agent, hot_tokens, ceiling, mode, generation, items."""
    cfg = ws.config
    agent = budget.orchestrator_of(cfg)
    ledger = budget.Ledger.load(ws.state)
    return ledger.as_json(agent=agent, ceiling=cfg.budget.ceiling, bands=cfg.budget.bands)


def render_budget(data: dict[str, Any], *, bands: tuple[int, int, int], gauge: bool = False) -> str:
    """`coordinator budget`: the totals, a gauge on a terminal, then the items, largest first."""
    lines = [f"{data['agent']}: {data['hot_tokens']:,} / {data['ceiling']:,} hot tokens, mode {data['mode']}, "
             f"generation {data['generation']}"]
    if gauge:
        lines.append(budget.gauge(data["hot_tokens"], data["ceiling"], bands))
    # As wide as the largest count (`budget add` takes up to 10,000,000), so the columns line up.
    width = max([7] + [len(f"{item['tokens']:,}") for item in data["items"]])
    for item in data["items"]:
        note = f"  {budget.one_line(str(item['note']))}" if item.get("note") else ""
        ref = printable(str(item["ref"]))  # a ledger edited by hand: an escape in a ref reached the terminal
        lines.append(f"  {item['tokens']:>{width},}  {item['kind']:<9} {item['status']:<10} {ref}{note}")
    return "\n".join(lines)


def removed_by_hand(ws: Workspace, order_id: str) -> str | None:
    """What happened to an order whose record is gone from state/orders/ though state/'s git
    history has it (its folder deleted by hand): "no order" left the user looking for an order
    `coordinator log` still lists. None when git never had it (an unknown id)."""
    from .errors import GitError
    from .orders import ID_PATTERN
    from .trail import Trail

    if not ID_PATTERN.fullmatch(order_id) or not (ws.state / ".git").exists():
        return None
    rel = f"orders/{order_id}/record.json"
    trail = Trail(ws.state)
    try:
        last = trail.git("log", "-1", "--format=%H", "--", rel, literal=True).strip()
        if not last:
            return None
        in_head = bool(trail.git("ls-tree", "--name-only", "HEAD", "--", rel, literal=True).strip())
    except GitError:
        return None
    gone = f"state/orders/{order_id}/" if not Store(ws.state).folder(order_id).exists() else f"state/{rel}"
    if in_head:
        return (f"{order_id}: {gone} was deleted by hand, not by the supervisor (`coordinator audit verify` "
                f"lists it); its last state is in state/'s git: `git -C state checkout HEAD -- orders/{order_id}` "
                f"puts it back")
    # The supervisor never removes a recorded order: the commit that did is someone's by hand.
    return (f"{order_id}: {gone} was removed by commit {last[:10]}, made by hand, not by the supervisor "
            f"(`coordinator audit verify` lists it); `git -C state checkout {last[:10]}~ -- orders/{order_id}` "
            "puts it back")


def show(ws: Workspace, order_id: str) -> dict[str, Any]:
    """One order: fields, status, attempts, report, history (`show ID --json`)."""
    from .trail import Trail

    store = Store(ws.state)
    try:
        rec = store.load(order_id)
    except NotFoundError:
        said = removed_by_hand(ws, order_id)
        if said is None:
            raise
        raise NotFoundError(f"{said}; `coordinator log {order_id}` shows its history") from None
    out: dict[str, Any] = rec.board_row()
    try:
        out["order"] = store.load_order(order_id).to_dict()
    except (NotFoundError, OSError, ValueError, KeyError):  # a rejected order has no normalized form
        out["order"] = None
    out["report"] = rec.report
    out["errors"] = rec.errors
    out["failures"] = rec.failures
    out["blocked_by"] = rec.blocked_by
    out["blocker"] = rec.blocker
    out["parent"] = rec.parent
    out["children"] = rec.children
    out["commit"] = rec.commit
    out["stale"] = rec.stale
    trail = [e.as_json() for e in Trail(ws.state).entries(order_id)]
    out["history"] = trail or rec.history
    return out


def render_show(data: dict[str, Any]) -> str:
    """`coordinator show`: every text that came from a file or an agent goes through
    `printable` (a rejected order keeps its file's text as it was, escape sequences and all)."""
    lines = [f"{data['id']}  {data['status']}  {data['from']} → {data['to']}  "
             f"attempts {data['attempts']}  updated {data['updated']}",
             f"objective: {printable(str(data['objective']))}"]
    order = data.get("order")
    if order:
        lines.append("acceptance:")
        for a in order["acceptance"]:
            check = f"  [check: {a['check']}]" if a.get("check") else ""
            lines.append(f"  - {a['text']}{check}")
        lines.append("files: " + (", ".join(order["files"]) or "(none: read-only work)"))
        lines.append("branching: " + "; ".join(
            f"{b['action']}{'-' + b['agent'] if b.get('agent') else ''} if {b['when']}" for b in order["branching"]))
    for e in data.get("errors") or []:
        lines.append(f"error: {printable(str(e))}")
    if data.get("blocker"):
        lines.append(f"blocker: {printable(str(data['blocker']))}")
    for f in data.get("failures") or []:
        # Whole, each line indented under it: a failing check's reason is its output's tail on the
        # lines after "output:", and only the first line was shown (the output, not at all).
        f = str(f)
        cut = f"… ({len(f) - FAILURE_SHOWN:,} characters more left out)" if len(f) > FAILURE_SHOWN else ""
        lines.append("failure: " + "\n  ".join(map(printable, (f[:FAILURE_SHOWN] + cut).split("\n"))))
    report = data.get("report") or {}
    if report.get("summary") and report["summary"] != "; ".join(data.get("errors") or []):
        # A rejection's summary only repeats its errors. A summary may run over lines: each is kept.
        lines.append("report: " + "\n".join(map(printable, str(report["summary"]).split("\n"))))
    for key in ("changed", "offending", "checks", "undelivered"):
        for x in report.get(key) or []:
            lines.append(f"  {key}: {printable(str(x))}")
    if data.get("commit"):
        lines.append(f"commit: {data['commit']}")
    if data.get("children"):
        lines.append("children: " + ", ".join(data["children"]))
    lines.append("history:")
    for h in data.get("history") or []:
        # A commit in state/ made by hand is history too: its author and subject are anyone's
        # text, and an escape sequence in them reached the terminal.
        if "line" in h:
            lines.append(f"  {h['at']}  {printable(str(h['author'])):<12} {printable(str(h['line']))}")
        else:
            lines.append(printable(f"  {h['at']}  {h['actor']:<12} {h['from']} -> {h['to']}"))
    return "\n".join(lines)
