"""Requests from the CLI to the supervisor: only the supervisor writes `state/`.

When a supervisor runs, the CLI drops a request file into
`.coordinator/requests/` and waits for the answer file; the supervisor serves
requests at every loop step. When none runs, the CLI opens the workspace itself
(taking the same lock) and serves the request directly.

A request is done at most once and the command says which: the supervisor takes a
request by renaming it (`X.request.json` -> `X.taken.json`) before it acts, and a
command that gives up withdraws its request by removing it. Whichever comes first
wins: a withdrawn request is never done, a taken one is answered.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import audit, durable, errors
from .budget import MAX_TOKENS_ADDED, orchestrator_of
from .errors import CoordinatorError, NotFoundError, StateError, SupervisorError, UsageError
from .store import Record, dependency_done, ended_undone, route_end, via_route
from .workspace import Workspace

if TYPE_CHECKING:
    from .supervisor import Supervisor

ANSWER_TIMEOUT = 15.0
TAKEN_GRACE = 15.0  # a request taken just before the command gave up: this much longer for its answer
LIVENESS_EVERY = 0.5  # how often a waiting command checks that the supervisor still runs
UNREAD_ANSWER_KEPT = 3600.0
REQUEST, TAKEN, ANSWER = ".request.json", ".taken.json", ".answer.json"
# Blocked and halted orders have ended but `retry` could bring them back: cancelling ends them for good.
CANCELLABLE = ("queued", "waiting", "running", "blocked", "halted")


def requests_dir(ws: Workspace) -> Path:
    return ws.runtime / "requests"


# After the pid in supervisor.pid: the lock is held by a command serving itself (no
# supervisor runs), not by a supervisor.
COMMAND_MARK = "command"


def supervisor_running(ws: Workspace) -> bool:
    """Whether a supervisor holds the workspace now (a command serving itself is none)."""
    import fcntl

    path = ws.runtime / "supervisor.pid"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return not lock_holder(fd)[1]
    finally:
        os.close(fd)
    return False


def lock_holder(fd: int) -> tuple[str, bool]:
    """Who holds the lock of supervisor.pid (open as `fd`): its pid ("?" if unsaid) and whether
    it is a command serving itself rather than a supervisor."""
    words = os.pread(fd, 64, 0).decode(errors="replace").split()
    return (words[0] if words else "?"), words[1:] == [COMMAND_MARK]


def config_seen_path(ws: Workspace) -> Path:
    return ws.runtime / "supervisor.config"


_DRIFT = ("the running supervisor started with an older coordinator.yaml and acts on that one (its agents, "
          "ceiling and bands) until it is restarted")


def config_drift(ws: Workspace) -> str | None:
    """A warning when a supervisor runs on `ws` with another coordinator.yaml than the one there
    now: it keeps the team (ceiling, bands, agents) it started with until it is restarted."""
    return _DRIFT if _drifted(ws) is not None else None


def _drifted(ws: Workspace) -> list[str] | None:
    """What the running supervisor wrote of its team (the digest of its coordinator.yaml, then,
    on a line of their own, its agents' names) when it runs with another coordinator.yaml than
    the one there now; else None."""
    if not supervisor_running(ws):
        return None
    try:
        seen = config_seen_path(ws).read_text("utf-8").split("\n")
    except (OSError, ValueError):
        return None
    return seen if seen and seen[0] != ws.config.digest else None


def _lacks(seen: list[str], agent: str) -> bool:
    agents = seen[1].split() if len(seen) > 1 else []
    return bool(agents) and agent not in agents


def drift_for(ws: Workspace, agent: str) -> str | None:
    """`config_drift`, told of an order just sent to `agent`: one the running supervisor does
    not know (added to coordinator.yaml since it started) waits in its inbox until a restart,
    and `send` said only its id."""
    seen = _drifted(ws)
    if seen is None:
        return None
    if _lacks(seen, agent):
        return (f"the running supervisor started before {agent} was in coordinator.yaml, so it does not take "
                f"in inbox/{agent}/: the order waits there until the supervisor is restarted")
    return _DRIFT


def started_without(ws: Workspace, agent: str) -> bool:
    """Whether a supervisor runs that started before `agent` was in coordinator.yaml: it does
    not take in inbox/<agent>/ until it is restarted."""
    seen = _drifted(ws)
    return seen is not None and _lacks(seen, agent)


def submit(ws: Workspace, action: str, args: dict[str, Any], *, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """Have the supervisor do `action`; returns its answer or raises its error."""
    if not supervisor_running(ws):
        try:
            return _serve_offline(ws, action, args)
        except _StartedMeanwhile:
            pass  # asked of it, as of any supervisor that runs
    folder = requests_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}"
    request, answer = folder / f"{name}{REQUEST}", folder / f"{name}{ANSWER}"
    durable.write_json(request, {"action": action, "args": args})
    try:
        return _await(ws, request, answer, action, args, timeout)
    except KeyboardInterrupt:  # Ctrl-C: take the request back if it was not taken yet
        if _withdraw(request):
            raise
        raise SupervisorError("interrupted after the supervisor took the request; it may have been done: check "
                              "with `coordinator board` before asking again") from None


def _await(ws: Workspace, request: Path, answer: Path, action: str, args: dict[str, Any],
           timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = _read_answer(answer, until=min(deadline, time.monotonic() + LIVENESS_EVERY))
        if data is not None:
            return _answered(data)
        stopped = not supervisor_running(ws)
        if not stopped and time.monotonic() < deadline:
            continue
        if _withdraw(request):  # not taken: it will never be done unless done here
            if stopped:
                try:
                    return _serve_offline(ws, action, args)
                except _StartedMeanwhile:  # another started as this one stopped: asked of it
                    return submit(ws, action, args, timeout=timeout)
            raise SupervisorError(f"the supervisor did not answer within {timeout:.0f}s, so nothing was done; "
                                  "is it stuck? (`coordinator doctor`)")
        break
    # Taken: being done now, or done by a supervisor that died before it answered.
    data = _read_answer(answer, until=time.monotonic() + (0 if stopped else TAKEN_GRACE))
    if data is not None:
        return _answered(data)
    waited = "" if stopped else f" within {timeout + TAKEN_GRACE:.0f}s"
    raise SupervisorError(f"the supervisor took the request but {'stopped before it answered' if stopped else 'did not answer'}"
                          f"{waited}; it may have been done: check with `coordinator board` before asking again")


def _read_answer(answer: Path, *, until: float) -> dict[str, Any] | None:
    """The answer, once it is there (removed when read); None if it is not there by `until`."""
    while True:
        try:
            data: dict[str, Any] = durable.read_json(answer)
        except FileNotFoundError:
            if time.monotonic() >= until:
                return None
            time.sleep(0.02)
            continue
        answer.unlink(missing_ok=True)
        return data


def _answered(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("error"):
        # Of its kind, as if it were served here: an order not found is explained by the command
        # (`explain_missing`: still in an inbox), and was "no order" only when a supervisor ran.
        kind = getattr(errors, str(data.get("kind") or ""), None)
        if not (isinstance(kind, type) and issubclass(kind, CoordinatorError)
                and kind.__init__ is CoordinatorError.__init__):
            kind = CoordinatorError
        error = kind(str(data["error"]))
        error.exit_code = int(data.get("exit_code") or 1)
        raise error
    return dict(data.get("result") or {})


def _withdraw(request: Path) -> bool:
    """Take back a request the supervisor has not taken; False if it has."""
    try:
        request.unlink()
    except FileNotFoundError:
        return False
    return True


class _StartedMeanwhile(Exception):
    """A supervisor started between the look and the command's own open: it holds the workspace."""


def _serve_offline(ws: Workspace, action: str, args: dict[str, Any]) -> dict[str, Any]:
    from .supervisor import Supervisor
    from .watcher import NullWatcher

    # Opening the workspace puts back what was changed by hand (a signal, said to the user too).
    opened = False
    try:
        with Supervisor(ws, watcher=NullWatcher(), offline=True) as sup:
            opened = True
            result = sup.handle(action, args)
            sup.step_commit()
    except SupervisorError:
        # A start that took the lock first: nothing was done here, and "another supervisor is
        # running; stop it first" told the user to stop the supervisor that can do it.
        if not opened and supervisor_running(ws):
            raise _StartedMeanwhile from None
        raise
    notes = sup.signals_told
    return {**result, "notes": notes} if notes else result


def pending(ws: Workspace) -> list[tuple[Path, dict[str, Any]]]:
    """Requests waiting for the supervisor, oldest first, each taken (renamed to `.taken.json`)
    so that its command can no longer withdraw it; answer each with `answer`.

    A taken request found here was taken by a supervisor that died before it answered: it
    may or may not have been done, so it is not done again (its command has said so). An
    answer nobody read for an hour is removed.
    """
    found: list[tuple[Path, dict[str, Any]]] = []
    try:
        entries = sorted(os.scandir(requests_dir(ws)), key=lambda e: e.name)
    except FileNotFoundError:
        return found
    for entry in entries:
        path = Path(entry.path)
        if entry.name.endswith(TAKEN):
            path.unlink(missing_ok=True)
        elif entry.name.endswith(ANSWER):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - entry.stat().st_mtime > UNREAD_ANSWER_KEPT:
                    path.unlink()
        elif entry.name.endswith(REQUEST):
            taken = path.with_name(entry.name[: -len(REQUEST)] + TAKEN)
            try:
                os.rename(path, taken)
            except FileNotFoundError:
                continue  # withdrawn by its command a moment ago
            try:
                found.append((taken, durable.read_json(taken)))
            except (OSError, ValueError):
                taken.unlink(missing_ok=True)
    return found


def answer(taken: Path, *, result: dict[str, Any] | None = None, error: CoordinatorError | None = None) -> None:
    target = taken.with_name(taken.name.replace(TAKEN, ANSWER))
    durable.write_json(target, {"result": result, "error": str(error) if error else None,
                                "kind": type(error).__name__ if error else None,
                                "exit_code": error.exit_code if error else 0}, sync=False)
    taken.unlink(missing_ok=True)


# -- what the supervisor does for each request --------------------------------------------------
def handle(sup: Supervisor, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Do what a CLI command asked: cancel, retry, rotate, budget-add."""
    if action == "cancel":
        result = cancel(sup, str(args["id"]), str(args.get("by", "user")), None)
        assert result is not None  # nothing is left to be answered later without a request
        return result
    if action == "retry":
        result = retry(sup, str(args["id"]), str(args.get("by", "user")), None)
        assert result is not None  # nothing is left to be answered later without a request
        return result
    if action == "rotate":
        orchestrator_of(sup.config)
        return rotate(sup, fresh=bool(args.get("fresh")))
    if action == "budget-add":
        orchestrator = orchestrator_of(sup.config)
        tokens = int(args["tokens"])
        if not 1 <= tokens <= MAX_TOKENS_ADDED:
            raise UsageError(f"budget add takes 1 to {MAX_TOKENS_ADDED:,} tokens, not {tokens:,}")
        note = str(args.get("note") or "")
        ref = f"manual-{time.time_ns()}"
        sup.ledger.add(ref, "manual", note, tokens=tokens, note=note, now=sup.wall_now())
        sup.ledger.save()
        change = sup.ledger.update_mode(sup.config.budget.bands)
        sup.ledger.save()
        sup.audit.stage(audit.SUPERVISOR, f"budget {orchestrator}: +{tokens} manual"
                         + (f" ({note[:80]})" if note else ""))
        out: dict[str, Any] = {"hot_tokens": sup.ledger.hot_tokens(),
                               "mode": sup.ledger.mode(sup.config.budget.bands)}
        if change:
            out["mode_change"] = list(change)
        if out["hot_tokens"] >= sup.config.budget.ceiling:
            out["at_ceiling"] = {"ceiling": sup.config.budget.ceiling, "on_ceiling": sup.config.budget.on_ceiling,
                                 "supervisor_running": not sup.offline}
        return out
    raise UsageError(f"unknown request {action!r}")


def serve(sup: Supervisor, action: str, args: dict[str, Any], taken: Path) -> dict[str, Any] | None:
    """`handle` the request a command waits on at `taken`; None when it is answered later: the
    cancel of running attempts (an order's, the work it sent), once no process of them is left
    (`AttemptRunner.cancel_soon`), while the loop goes on with the other orders."""
    if action == "cancel" and not sup.offline:
        return cancel(sup, str(args.get("id")), str(args.get("by", "user")), taken)
    if action == "retry" and not sup.offline:
        return retry(sup, str(args.get("id")), str(args.get("by", "user")), taken)
    return sup.handle(action, args)


@dataclass
class CancelAnswer:
    """A `cancel` command that waits for the processes of several orders to be gone: the order
    it named and the work that order sent. Answered (`taken`) once the last of them (`left`)
    has ended."""

    taken: Path
    result: dict[str, Any]
    left: set[str] = field(default_factory=set)
    waited: set[str] = field(default_factory=set)  # the orders waiting when the cancel began

    def ended(self, sup: Supervisor, rec: Record, warning: str | None) -> None:
        self.left.discard(rec.id)
        _said(self.result, rec, warning)
        if not self.left:
            _blocked_with(sup, self.result, self.waited)
            answer(self.taken, result=self.result)


def _said(result: dict[str, Any], rec: Record, warning: str | None) -> None:
    """What a cancel's answer says of `rec`, one of its orders, now that it has ended."""
    if rec.id == result["id"]:
        result["status"] = rec.status
    for entry in result.get("with", ()):
        if entry["id"] == rec.id:
            entry["status"] = rec.status
    if warning:
        said = result.get("warning")
        result["warning"] = f"{said}; {warning}" if said else warning


def cancel(sup: Supervisor, order_id: str, by: str, taken: Path | None) -> dict[str, Any] | None:
    """Cancel `order_id` and, with it, the work it sent that has not ended: its children (the
    orders its outbox or its model's plan sent), each followed along its route, and theirs,
    however deep, and the investigations its block (or theirs) escalated (`live_work`). A running one is killed in the background when a supervisor
    runs (`AttemptRunner.cancel_soon`): then None, and the command waiting on `taken` is
    answered once no process of any of them is left. Else the answer: the order, its status
    and the orders cancelled with it (`with`), each with the status it had."""
    rec = _record(sup, order_id)
    if rec.status not in CANCELLABLE:
        # A route hands the same work on: the order to cancel is the one the work went on to.
        # Not cancelled with it: a routed order has ended, and the user names what they cancel.
        route = route_end(sup.records, rec.id) if rec.status == "routed" else None
        went_on = ""
        if route is not None and route.id != rec.id:
            went_on = f"; its work went on as {route.id}, which is {route.status}"
            went_on += ": cancel that one" if route.status in CANCELLABLE else ""
        raise StateError(f"{rec.id} is {rec.status}; only queued, waiting, running, blocked or halted orders "
                         f"can be cancelled{went_on}")
    escalated: set[str] = set()
    work = live_work(sup.records, rec, escalated=escalated)  # before anything moves
    result: dict[str, Any] = {"id": rec.id, "status": rec.status}
    if work:
        result["with"] = [{"id": child.id, "was": child.status, "status": child.status,
                           **({"investigated": parent} if child.id in escalated else {})} for child, parent in work]
    waited = {r.id for r in sup.records.values() if r.status == "waiting"}
    # Answered when the last of them has ended: never while they are being cancelled here.
    pending = CancelAnswer(taken, result, waited=waited) if taken is not None else None
    _cancel_one(sup, rec, by, "", pending, result, first=True)

    def why(child: Record, parent: str) -> str:
        if child.id in escalated:  # nothing is left to investigate: a cancelled order never runs again
            return (f"it investigated why {parent} was blocked, and {parent} was cancelled by {by}" if parent == rec.id
                    else f"it investigated why {parent} was blocked, and {parent} was cancelled with {rec.id} by {by}")
        return (f"its request {rec.id} was cancelled by {by}" if parent == rec.id
                else f"sent by {parent} for {rec.id}, which was cancelled by {by}")

    return _cancel_work(sup, work, by, why, pending, result, waited)


def retry(sup: Supervisor, order_id: str, by: str, taken: Path | None) -> dict[str, Any] | None:
    """Re-queue the blocked or halted `order_id` (or clear its free-text blocker), and cancel
    the investigations its blocks escalated that have not ended, with the work they sent: a
    running one in the background when a supervisor runs (then None, and the command waiting
    on `taken` is answered once no process of them is left, as `cancel`'s is)."""
    rec = _record(sup, order_id)
    if rec.status == "waiting" and not rec.blocker:
        waits = [via_route(d, route_end(sup.records, d)) for d in rec.blocked_by
                 if not dependency_done(sup.records, d)]
        raise StateError(f"{rec.id} is waiting for {', '.join(waits) or 'its dependencies'}; it runs once "
                         "they are done")
    if rec.status not in ("blocked", "halted") and not (rec.status == "waiting" and rec.blocker):
        raise StateError(f"{rec.id} is {rec.status}; only blocked or halted orders (or one waiting on a "
                         "blocker) can be retried")
    dead = ended_undone(sup.records, rec.blocked_by)
    if dead is not None:
        named, last = dead
        raise StateError(f"{rec.id} depends on {via_route(named, last)}, which ended {last.status}: retried, it "
                         f"would wait forever; send it again without {named} in blocked_by")
    rec.failures = []
    rec.blocker = None
    status = "queued" if all(dependency_done(sup.records, d) for d in rec.blocked_by) else "waiting"
    asked = _investigations(sup, rec)  # before it moves
    sup.move(rec, status, by, note="retry")
    if rec.sender == sup.config.orchestrator:
        if sup.ledger.reopen(rec.id):
            sup.ledger.save()  # in flight again: a rotation must not drop it
        elif not any(i.ref == rec.id and i.kind != "report" for i in sup.ledger.items):
            # A rotation dropped its items: the order is back in the orchestrator's context.
            from .orders import render
            sup.ledger_add(rec.id, "order", render(sup.store.load_order(rec.id)))
    result: dict[str, Any] = {"id": rec.id, "status": rec.status}
    if rec.to not in sup.config.agents:  # said "queued", it never ran and nothing said why
        result["warning"] = (f"{rec.to} is no longer in coordinator.yaml, so {rec.id} waits until it is back "
                             f"(`coordinator cancel {rec.id}` drops it)")
    # What the investigation asks (what would unblock it) the person has answered by retrying it:
    # left going, it ran beside the order and a block again filed a second one. Cancelled, each
    # with the work it sent; listed, each with the status it had.
    work = [pair for inv in asked for pair in [(inv, rec.id), *live_work(sup.records, inv)]]
    if not work:
        return result
    result["with"] = [{"id": child.id, "was": child.status, "status": child.status,
                       **({"investigated": rec.id} if parent == rec.id else {})} for child, parent in work]
    waited = {r.id for r in sup.records.values() if r.status == "waiting"}
    pending = CancelAnswer(taken, result, waited=waited) if taken is not None else None

    def why(child: Record, parent: str) -> str:
        return (f"it investigated why {rec.id} was blocked, and {rec.id} was retried by {by}" if parent == rec.id
                else f"sent by {parent}, an investigation of why {rec.id} was blocked, and {rec.id} was retried by {by}")

    return _cancel_work(sup, work, by, why, pending, result, waited)


def _cancel_work(sup: Supervisor, work: list[tuple[Record, str]], by: str, why: Callable[[Record, str], str],
                 pending: CancelAnswer | None, result: dict[str, Any], waited: set[str]) -> dict[str, Any] | None:
    """Cancel each of `work` (an order, the id of the one it is cancelled with) that has not
    ended meanwhile, those others wait for first, saying `why`; then what waited for them is
    blocked. None while processes of them are still being stopped (`pending` answers later)."""
    for child, parent in _dependents_first(sup.records, work):
        child = sup.whole(child)
        if child.status not in CANCELLABLE:  # ended meanwhile: not cancelled here, nor said to be
            result["with"] = [e for e in result["with"] if e["id"] != child.id]
            continue
        _cancel_one(sup, child, by, why(child, parent), pending, result, first=False)
    if pending is not None and pending.left:
        return None
    _blocked_with(sup, result, waited)
    return result


def _investigations(sup: Supervisor, rec: Record) -> list[Record]:
    """The investigations the blocks of `rec` escalated that have not ended (an ended one has
    answered), oldest first."""
    found = [sup.records.get(i) for i in _escalations(sup.records).get(rec.id, [])]
    return [r for r in found if r is not None and r.status in ("queued", "waiting", "running")]


def _blocked_with(sup: Supervisor, result: dict[str, Any], waited: set[str]) -> None:
    """Say in `result` which orders (not cancelled with it) waited for the ones cancelled and
    are blocked now: cancelled, what they waited for can never be done (SPEC §3), and the
    command said nothing of them. Each with the order it waited for; in the order of a chain."""
    ended = {str(result["id"]), *(str(e["id"]) for e in result.get("with", ()))}
    blocked: list[dict[str, str]] = []
    todo = sorted((sup.records[i] for i in waited if i in sup.records and sup.records[i].status == "blocked"),
                  key=lambda r: r.seq)
    while todo:
        left = []
        for rec in todo:
            dead = ended_undone(sup.records, rec.dependencies)
            if dead is not None and dead[1].id in ended:
                blocked.append({"id": rec.id, "waited_for": dead[0]})
                ended.add(rec.id)
            else:
                left.append(rec)
        if len(left) == len(todo):
            break
        todo = left
    if blocked:
        result["blocked"] = blocked


def _cancel_one(sup: Supervisor, rec: Record, by: str, why: str, pending: CancelAnswer | None,
                result: dict[str, Any], *, first: bool) -> None:
    """Cancel `rec`: in the background when its processes can be killed so (`pending` then
    waits for it), else at once. `first`: the order the command named; a cancel of it
    already under way is an error, one of the work it sent is waited for."""
    if rec.status == "running" and pending is not None and sup.attempts.cancel_soon(
            rec, by, pending, why=why, join=not first):
        pending.left.add(rec.id)
        return
    # A kill that failed is said, and the order is cancelled all the same: left running, it
    # would run again after the next start.
    warning = sup.attempts.cancel(rec) if rec.status == "running" else None
    _cancel(sup, rec, by, warning, why=why)
    _said(result, rec, warning)


def _dependents_first(records: dict[str, Record], work: list[tuple[Record, str]]) -> list[tuple[Record, str]]:
    """`work` in an order that cancels each order before those it waits for: cancelled first,
    what it waited for would block it (`dependency ended cancelled`) before its turn came."""
    place = {child.id: n for n, (child, _) in enumerate(work)}
    ids = place.keys()
    waits = {child.id: {getattr(route_end(records, d), "id", d) for d in child.dependencies} & ids - {child.id}
             for child, _ in work}
    dependents = {child.id: 0 for child, _ in work}
    for on in waits.values():
        for d in on:
            dependents[d] += 1
    by_id = {child.id: (child, parent) for child, parent in work}
    ready = [child.id for child, _ in work if not dependents[child.id]]
    ordered: list[tuple[Record, str]] = []
    while ready:
        oid = ready.pop(0)
        ordered.append(by_id.pop(oid))
        for d in sorted(waits[oid], key=place.__getitem__):
            dependents[d] -= 1
            if not dependents[d]:
                ready.append(d)
    return ordered + list(by_id.values())  # a cycle (never filed): the rest as found


def live_work(records: dict[str, Record], rec: Record, *,
              escalated: set[str] | None = None) -> list[tuple[Record, str]]:
    """The orders sent for `rec`'s work that have not ended for good (blocked and halted ones
    too: `retry` would bring them back), each with the order it was sent for: its children, each followed along its route (a route's follow-up carries the same
    work on), and their children in turn, however deep; an ended one's too (a done order's
    outbox sent work for the same request). The investigations that the blocks of `rec`, and
    of each order found, escalated are its work too: one asks what would unblock an order
    that, cancelled, can never run again. Their ids (and their follow-ups') go in `escalated`."""
    found: list[tuple[Record, str]] = []
    seen, todo = {rec.id}, [rec]
    investigations = _escalations(records)
    while todo:
        node = todo.pop(0)
        # Only of an order cancelled here (one that ended for good keeps its own).
        asked = investigations.get(node.id, []) if node is rec or node.status in CANCELLABLE else []
        for child_id, by_escalation in [*((c, False) for c in node.children), *((e, True) for e in asked)]:
            link = records.get(child_id)
            while link is not None and link.id not in seen:
                seen.add(link.id)
                if by_escalation and escalated is not None:
                    escalated.add(link.id)
                if link.status in CANCELLABLE:  # blocked or halted too: `retry` would revive it
                    found.append((link, link.parent if link.parent in seen else node.id))
                todo.append(link)
                link = records.get(link.routed_to) if link.status == "routed" and link.routed_to else None
    return found


ESCALATION_SOURCE = "escalation of "


def _escalations(records: dict[str, Record]) -> dict[str, list[str]]:
    """The investigations filed for each blocked order (the supervisor files them, `escalation
    of ID/...`), oldest first: a retried order blocked again has one for each block."""
    found: dict[str, list[str]] = {}
    for r in sorted(records.values(), key=lambda r: r.seq):
        if r.sender == "coordinator" and r.source.startswith(ESCALATION_SOURCE):
            found.setdefault(r.source[len(ESCALATION_SOURCE):].split("/", 1)[0], []).append(r.id)
    return found


def cancelled(sup: Supervisor, rec: Record, by: str, waiting: list[CancelAnswer], *,
              warning: str | None = None, why: str = "") -> None:
    """The attempt of `rec`, cancelled by `by` (`why`: for the work of an order so cancelled),
    has ended (or could not be killed: `warning`): the order is cancelled, and each command
    waiting for it (`waiting`) told so once the last order it waits for has ended."""
    if rec.status == "running":
        _cancel(sup, rec, by, warning, why=why)
    sup._write_state()  # on disk before the command hears it: it may read the records next
    for pending in waiting:
        pending.ended(sup, rec, warning)


def _cancel(sup: Supervisor, rec: Record, by: str, warning: str | None, *, why: str = "") -> dict[str, Any]:
    summary = f"cancelled: {why}" if why else f"cancelled by {by}"
    before = (rec.report or {}).get("summary") if rec.status in ("blocked", "halted") else None
    # An ended order keeps why it ended: the sender reads both in the report.
    rec.report = {"summary": f"{summary}; it was {rec.status}: {before}" if before else summary}
    sup.move(rec, "cancelled", by, note=why or None)
    return {"id": rec.id, "status": rec.status, **({"warning": warning} if warning else {})}


def rotate(sup: Supervisor, *, fresh: bool) -> dict[str, Any]:
    before = sup.ledger.hot_tokens()
    if fresh:
        generation = sup.ledger.fresh(sup.fresh_brief(), now=sup.wall_now())
        line = f"rotate --fresh: generation {generation}, {before:,} -> {sup.ledger.hot_tokens():,} hot tokens"
    else:
        dropped = sup.ledger.rotate()
        sup.ledger.save()
        line = f"rotate: dropped {len(dropped)} completed item(s), {before:,} -> {sup.ledger.hot_tokens():,} hot tokens"
    sup.ledger.update_mode(sup.config.budget.bands)
    sup.ledger.save()
    sup.audit.stage(audit.SUPERVISOR, f"budget {sup.config.orchestrator or '-'}: {line}")
    return {"message": line, "hot_tokens": sup.ledger.hot_tokens(), "generation": sup.ledger.generation,
            "before": before}


def _record(sup: Supervisor, order_id: str) -> Record:
    rec = sup.records.get(order_id)
    if rec is None:
        sup.store.load(order_id)  # a record file that is there but is no record says so
        raise NotFoundError(f"no order {order_id!r}; `coordinator board` lists them")
    return sup.whole(rec)  # whole again before a command changes it
