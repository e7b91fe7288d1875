"""The commands of the team and its state: make a workspace (`init`), run the supervisor
(`supervise`), look at the board, the audit log, signals, costs and the orchestrator's
budget, rotate its context, verify the audit trail, check the machine (`doctor`) and
remove old working copies (`gc`). Each parses its arguments, opens the workspace, calls
one library function and prints.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shlex
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from .clicontext import (
    DAYS,
    NOTE,
    ORDER_ID,
    SECONDS,
    Command,
    Context,
    Group,
    Tokens,
    colours,
    echo_done,
    emit_json,
    interruptible,
    on_terminal,
    pass_ctx,
    reader_gone,
    redraws,
    submit,
)
from .errors import WorkspaceError
from .workspace import ENV_VAR, GONE, Workspace


@click.command(cls=Command)
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing coordinator.yaml.")
@pass_ctx
def init(c: Context, directory: str | None, force: bool) -> None:
    """Make a workspace: config, inboxes, state/ repository, demo repository.

    It is made in DIRECTORY, else in the folder -w names, else in the current folder.

    \b
    Example:
        coordinator init myteam
        coordinator init myteam --force     # start over with the example config
    """
    from .workspace import given_folder
    from .workspace import init as do_init

    if directory == "":  # `init "$TEAM"` with TEAM unset made the workspace in the current folder
        raise click.UsageError("DIRECTORY is empty (an unset variable?); name the folder, or leave it out to make "
                               "the workspace in the current one")
    if c.explicit is not None:  # `coordinator -w myteam init` made the workspace here, not in myteam
        named = given_folder(c.explicit)
        # os.path's expanduser: Path's raises RuntimeError for an unknown user (`init` then says why).
        if directory is not None and \
                Path(os.path.expanduser(directory)).resolve() != Path(os.path.expanduser(named)).resolve():
            raise click.UsageError(f"-w names {c.explicit} and DIRECTORY names {directory}; give one of them")
        directory = directory if directory is not None else str(named)
    directory = directory if directory is not None else "."
    ws, lines = do_init(Path(directory), force=force)
    for line in lines:
        click.echo(line)
    click.echo(f"workspace ready at {ws.root}; next: `coordinator -w {shlex.quote(directory)} supervise`")


@click.command(cls=Command)
@click.option("--once", is_flag=True, help="Process everything runnable now, then exit.")
@click.option("--poll", is_flag=True, help="Use a polling watcher (network file systems).")
@click.option("--grace", default=30.0, show_default=True, metavar="SECONDS", type=SECONDS,
              help="How long running attempts may finish after the first SIGTERM/SIGINT.")
@pass_ctx
def supervise(c: Context, once: bool, poll: bool, grace: float) -> None:
    """Run the supervisor: intake, run, verify, commit. Ctrl-C once to drain, twice to stop now.

    \b
    Example:
        coordinator supervise            # foreground, until Ctrl-C
        coordinator supervise --once     # process what is there, then exit
    """
    from .supervisor import Supervisor
    from .trail import one_line

    held = _HeldLines(sys.stderr, lambda text: echo(text))

    def log(line: str) -> None:
        # One line per event, whatever it quotes: an agent's summary or a file name could
        # otherwise start lines of its own or send escape sequences to the terminal.
        held.write(f"{time.strftime('%H:%M:%S')} {one_line(line)}")

    def echo(text: str) -> None:
        try:
            # color=True: nothing to strip (`one_line` left no escape character), so click need
            # not ask the stream whether it is a terminal, a system call for every line.
            click.echo(text, err=True, color=True)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.EIO):
                # The log's reader went away (`supervise 2>&1 | tee log` and tee ended: EPIPE; the
                # terminal of a `supervise &` closed: EIO): that stopped the supervisor. The
                # team's work goes on; only the log is gone.
                _to_nowhere(sys.stderr)
                return
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The log's disk is full (`supervise 2>> sup.log`): this line is lost, the work is not.
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()

    received = [0]

    def on_signal(signum: int, frame: object) -> None:
        received[0] += 1  # handlers only set a flag; the loop acts on it

    # SIGHUP too (the terminal of a `supervise &` closed, an ssh session dropped): by default it
    # killed the supervisor without a word, and each attempt it cut off counted as a failure.
    before = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    lines = _LogLines(log)
    logging.getLogger().addHandler(lines)
    try:
        with Supervisor(c.ws, poll=poll, log=log, log_step=held.step, stop_grace=grace) as sup:
            if once:
                # Ctrl-C once drains, twice stops, as for `supervise`.
                sup.run_once(should_stop=lambda: received[0])
                if not received[0]:
                    log("done: nothing runnable left")
            else:
                log(f"supervising {c.ws.root} ({len(c.ws.config.agents)} agents); Ctrl-C to stop")
                sup.run(should_stop=lambda: received[0])
    finally:  # an in-process caller (a test, an embedding program) gets its handlers back
        logging.getLogger().removeHandler(lines)
        for signum, handler in before.items():
            signal.signal(signum, handler)
        held.flush(HELD_WAIT)


HELD_LINES = 10_000  # log lines kept while the log's reader does not read; past them, counted only
HELD_WAIT = 2.0  # seconds the end of `supervise` waits for that reader to take what is kept


class _HeldLines:
    """The supervisor's log lines, never written while the log's reader is not reading (a
    `supervise 2>&1 | less` paused, Ctrl-S on the terminal): the write waited for it, and the
    whole loop with it, attempts past their timeout and drops untaken. Such lines are kept
    (HELD_LINES) and go out, in order, with the next line once there is room again.

    The lines the loop says in one step go out together at its end (`step`): a write, a look
    for room and a wake of the reader per line were some three an order."""

    def __init__(self, stream: Any, emit: Callable[[str], None]) -> None:
        self.stream, self.emit = stream, emit
        self.lines: deque[str] = deque()
        self.dropped = 0
        self.lock = threading.Lock()  # library warnings come from other threads too
        self.poller: Any = None
        self.stepping: int | None = None  # the thread whose step is under way (`step`)
        self.step_lines: list[str] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Keep what the calling thread says until the block is left, however it is left; a
        line of another thread meanwhile goes out at once, after what was kept (in order)."""
        with self.lock:
            self.stepping = threading.get_ident()
        try:
            yield
        finally:
            with self.lock:
                self.stepping = None
                self._put()

    def write(self, text: str) -> None:
        with self.lock:
            self.step_lines.append(text)
            if self.stepping != threading.get_ident():
                self._put()

    def _put(self) -> None:
        """Send the lines of `step_lines`: joined into writes of at most PIPE_BUF bytes while
        there is room (what a reader's room is known to take whole, as one line was), else
        kept."""
        said, self.step_lines = self.step_lines, []
        while said and not self.lines and self._room(0.0):
            size, n = len(said[0]), 1
            while n < len(said) and size + len(said[n]) + 1 <= select.PIPE_BUF:
                size += len(said[n]) + 1
                n += 1
            self.emit("\n".join(said[:n]))
            del said[:n]
        for text in said:
            if len(self.lines) < HELD_LINES:
                self.lines.append(text)
            else:
                self.dropped += 1
        if said:
            self._send(0.0)

    def flush(self, wait: float) -> None:
        """Send what is kept, waiting up to `wait` seconds for the reader in all."""
        with self.lock:
            self._send(wait)

    def _send(self, wait: float) -> None:
        end = time.monotonic() + wait
        while self.lines and self._room(max(0.0, end - time.monotonic())):
            self.emit(self.lines.popleft())
        if self.dropped and not self.lines and self._room(0.0):
            self.emit(f"{time.strftime('%H:%M:%S')} WARNING: {self.dropped:,} log line(s) were left out while "
                      "the log's reader did not read (the work went on)")
            self.dropped = 0

    def _room(self, wait: float) -> bool:
        """Whether a line can be written now without waiting for the reader (a pipe or a
        terminal that has room, a file, nothing at all)."""
        try:
            if self.poller is None:  # made once: the log's descriptor stays the same (`_to_nowhere` reuses it)
                poller = select.poll()
                poller.register(self.stream.fileno(), select.POLLOUT)
                self.poller = poller
            return bool(self.poller.poll(int(wait * 1000)))
        except (AttributeError, ValueError, OSError):  # no stream, or one without a descriptor
            return True


def _to_nowhere(stream: object) -> None:
    """Send what is still to be written to `stream`, and all that follows, to /dev/null."""
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no real file under it
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())  # type: ignore[attr-defined]
        os.close(null)


class _LogLines(logging.Handler):
    """Library warnings (LLM retries, inotify overflow) as supervisor log lines, not bare text."""

    # watchdog logs this when its reader thread sees the inotify fd closed at shutdown: harmless.
    NOISE = ("called when the thread is inactive",)

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.name.startswith("watchdog") and any(n in text for n in self.NOISE):
            return
        self.say(f"{record.levelname.lower()}: {text}")


@click.command(cls=Command)
@click.option("--json", "as_json", is_flag=True, help='{"orders": [...]} on stdout.')
@click.option("--watch", is_flag=True, help="Redraw every second until Ctrl-C (not on a terminal: print the "
              "board again each time it changes).")
@pass_ctx
def board(c: Context, as_json: bool, watch: bool) -> None:
    """The kanban: orders by status, stale flags, budget and signals.

    \b
    Example:
        coordinator board
        coordinator board --json | jq '.orders[] | select(.status=="blocked")'
    """
    from . import board as b

    if as_json and watch:
        raise click.UsageError("--json prints one document and --watch redraws forever; use one of them")
    if as_json:
        emit_json(b.as_json(c.ws))
        return
    colour, redraw = colours(), redraws()
    if not watch:
        click.echo(b.render(c.ws, colour=colour))
        return
    from .store import RecordCache

    shown = None
    drawn = 0
    interruptible()  # "until Ctrl-C", also when started as a background job
    try:
        while not reader_gone():
            if drawn % 60 == 0:
                cache = RecordCache()  # a full read each minute, whatever a file's times say
            drawn += 1
            # Not redrawn, a board is added on a change: not each minute a leftover's age goes up.
            text = b.render(c.ws, colour=colour, cache=cache, ages=redraw)
            if redraw:
                click.clear()
                click.echo(text)
            elif text != shown:
                # Not a terminal that redraws (a file, a pipe, TERM=dumb): a board is added only
                # when it changed, after the time it was seen.
                if shown is not None:
                    click.echo(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} ---")
                click.echo(text)
                sys.stdout.flush()
                shown = text
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass


@click.command(cls=Command)
@click.argument("order_id", metavar="[ID]", required=False, type=ORDER_ID)
@click.option("--json", "as_json", is_flag=True, help="A JSON list of entries.")
@pass_ctx
def log(c: Context, order_id: str | None, as_json: bool) -> None:
    """The audit history from state/'s git log (of one order, or all).

    \b
    Example:
        coordinator log WO-0001
    """
    from .board import removed_by_hand
    from .errors import NotFoundError
    from .sending import explain_missing
    from .store import Store
    from .trail import Trail

    if order_id is not None:  # "" too: an empty id is no order, not "all of them"
        with explain_missing(c.ws, order_id):
            try:
                Store(c.ws.state).load(order_id)  # unknown id: exit 1
            except NotFoundError:
                # Its folder deleted by hand: its history is still state/'s, and shown, with what happened.
                gone = removed_by_hand(c.ws, order_id)
                if gone is None:
                    raise
                click.echo(f"warning: {gone}", err=True)
    if not (c.ws.state / ".git").exists():
        click.echo("no history yet: state/ is made by `coordinator init` or the first `coordinator supervise`",
                   err=True)
        if as_json:  # still one JSON document: an empty history
            emit_json([])
        return
    entries = Trail(c.ws.state).entries(order_id)
    if as_json:
        emit_json([e.as_json() for e in entries])
        return
    from .inboxfiles import printable

    for e in entries:  # a hand commit's author and subject are anyone's text: escapes as text
        click.echo(f"{e.at}  {e.commit[:10]}  {printable(e.author):<12} {printable(e.line)}")


@click.group(cls=Group, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@click.pass_context
def budget(ctx: click.Context, as_json: bool) -> None:
    """The orchestrator's hot-token budget: tokens, ceiling, mode, generation, items.

    \b
    Example:
        coordinator budget
        coordinator budget add 1200 --note "read the API spec"
    """
    if ctx.invoked_subcommand is not None:
        return
    from . import board as b
    from .control import config_drift

    ws = ctx.ensure_object(Context).ws
    data = b.budget_data(ws)
    drift = config_drift(ws)
    if drift:  # the ceiling and bands shown are the file's; the supervisor acts on its own
        click.echo(f"warning: {drift}", err=True)
    if as_json:
        emit_json(data)
    else:
        click.echo(b.render_budget(data, bands=ws.config.budget.bands, gauge=on_terminal()))


@budget.command("add")
@click.argument("tokens", type=Tokens())
@click.option("--note", default="", type=NOTE, help="What the tokens were (a file read, a chat).")
@pass_ctx
def budget_add(c: Context, tokens: int, note: str) -> None:
    """Add hot tokens the supervisor cannot see (an external orchestrator's reading).

    \b
    Example:
        coordinator budget add 1800 --note "read docs/api.md"
    """
    from .budget import orchestrator_of

    orchestrator_of(c.ws.config)  # no orchestrator, no budget: said before anything is opened
    r = submit(c, "budget-add", {"tokens": tokens, "note": note})
    echo_done(f"{r['hot_tokens']:,} hot tokens, mode {r['mode']}", done=f"{tokens:,} hot tokens were added",
              again="add them again")
    if r.get("mode_change"):
        click.echo(f"warning: mode changed {r['mode_change'][0]} -> {r['mode_change'][1]}", err=True)
    ceiling = r.get("at_ceiling")
    if ceiling:
        when = "now" if ceiling["supervisor_running"] else "when it next runs"
        act = {"rotate": f"the supervisor rotates the context {when}",
               "fresh": f"the supervisor starts a fresh generation {when}",
               }.get(ceiling["on_ceiling"], "run `coordinator rotate` or `coordinator rotate --fresh`")
        click.echo(f"warning: at the ceiling of {ceiling['ceiling']:,} hot tokens; on_ceiling is "
                   f"{ceiling['on_ceiling']}: {act}", err=True)


@click.command(cls=Command)
@click.option("--fresh", is_flag=True, help="Archive the ledger, write state/orchestrator/brief.md, new generation.")
@pass_ctx
def rotate(c: Context, fresh: bool) -> None:
    """Rotate the orchestrator's context: drop completed items (or start fresh from a brief).

    \b
    Example:
        coordinator rotate
        coordinator rotate --fresh && cat state/orchestrator/brief.md
    """
    from .budget import orchestrator_of

    orchestrator_of(c.ws.config)
    r = submit(c, "rotate", {"fresh": fresh})
    echo_done(r["message"], done="a fresh generation was started" if fresh else "the context was rotated",
              again="rotate it again")
    before = r.get("before")  # none from a supervisor started before it was answered
    if isinstance(before, int) and r["hot_tokens"] > before:
        # "rotate" reads as "fewer hot tokens": a fresh brief longer than the context it replaced
        # raised them, and was said only as "10 -> 62" in a line that looked like success.
        click.echo(f"warning: the fresh generation starts with more hot tokens ({r['hot_tokens']:,}) than the "
                   f"context it replaced ({before:,}): its brief, state/orchestrator/brief.md, is the longer; a "
                   "fresh start lowers them once the context has outgrown that brief", err=True)


@click.command("signals", cls=Command)
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@pass_ctx
def signals_cmd(c: Context, as_json: bool) -> None:
    """Fire-able signals seen: artifact, feedback, scope, silent.

    \b
    Example:
        coordinator signals
    """
    from . import signals as s

    found = s.load(c.ws.state)
    if as_json:
        emit_json(s.as_json(found))
    else:
        click.echo(s.render(found), nl=False)


@click.group(cls=Group)
def audit() -> None:
    """The audit trail: `git log` in state/ and repos/, checked by `audit verify`.

    \b
    Example:
        coordinator audit verify || echo "something changed without a work order"
    """


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@pass_ctx
def audit_verify(c: Context, as_json: bool) -> None:
    """Exit 1 listing every change no order explains; 0 when the trail is complete.

    Beside a running supervisor, what it has not committed yet is looked at again after its
    next commits (a few seconds): only what stays uncommitted is listed.

    \b
    Example:
        coordinator audit verify
    """
    from . import verify

    findings = verify.verify(c.ws, say=lambda line: click.echo(f"audit verify: {line}", err=True))
    if as_json:
        emit_json({"clean": not findings, "findings": [f.as_json() for f in findings]})
    else:
        for f in findings:
            click.echo(str(f))
        if findings:  # after thousands of lines, what they come to (on stderr: stdout stays one per finding)
            click.echo(f"audit verify: {verify.tally(findings)}", err=True)
        else:
            click.echo("audit clean: every commit and state change is explained")
    if findings:
        sys.exit(1)


@click.command(cls=Command)
@pass_ctx
def doctor(c: Context) -> None:
    """What this machine supports: Landlock ABI, watcher, git, limits.

    Outside a workspace it checks the machine only; in one, also the team.

    \b
    Example:
        coordinator doctor
    """
    from . import doctor as d

    gone: WorkspaceError | None = None
    try:
        ws: Workspace | None = Workspace.find(c.explicit)  # a broken config is reported, not refused
    except WorkspaceError as e:
        if c.explicit is not None or os.environ.get(ENV_VAR):
            raise  # a workspace named on purpose that is not one
        ws = None
        if str(e) == GONE:  # not "none here": the folder it was run from was deleted
            gone = e
    lines = d.report(ws)
    if gone is not None:
        lines[0] = "workspace: unknown (the current folder no longer exists)"
    for line in lines:
        click.echo(line)
    if gone is not None:
        raise gone  # the machine checked; then the error every other command gives there
    if ws is not None:
        _ = ws.config  # a config it could not read: its error, once more, as the exit
        ws.check_layout()  # so does what stops every other command


@click.command(cls=Command)
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@pass_ctx
def cost(c: Context, as_json: bool) -> None:
    """LLM calls, tokens and money by agent and model.

    \b
    Example:
        coordinator cost --json
    """
    from . import costs

    damaged: list[str] = []
    data = costs.summary(c.ws, damaged)
    for line in damaged:
        click.echo(f"warning: {line}", err=True)
    if as_json:
        emit_json(data)
    else:
        click.echo(costs.render(data))


@click.command(cls=Command)
@click.option("--days", default=7.0, show_default=True, type=DAYS,
              help="Remove what is older than this (kept copies; orders ended this long ago).")
@pass_ctx
def gc(c: Context, days: float) -> None:
    """Remove working copies kept for inspection (denied orders) older than --days, and the
    attempt folders and logs of orders that ended more than --days ago (their records and
    reports in state/ stay).

    `--days 0` removes them all, whatever their age: every kept working copy,
    and the attempt folders and logs of every ended order (also of those dated
    ahead of this machine's clock). Orders not ended (queued, waiting, running)
    keep theirs.

    \b
    Example:
        coordinator gc --days 2
        coordinator gc --days 0
    """
    from . import sending

    copies, ended, ahead = sending.gc(c.ws, days)
    line = f"removed {len(copies)} working cop{'y' if len(copies) == 1 else 'ies'}"
    if ended:
        line += f", and the attempt folders and logs of {len(ended)} ended order{'' if len(ended) == 1 else 's'}"
    click.echo(line)
    if ahead:
        named = ", ".join(ahead[:5]) + (f" and {len(ahead) - 5} more" if len(ahead) > 5 else "")
        click.echo(f"warning: kept the attempt folders and logs of {len(ahead)} ended order"
                   f"{'' if len(ahead) == 1 else 's'} ({named}) that ended after this machine's clock says it is "
                   "now (the clock set back?), so their age is unknown; `coordinator gc --days 0` removes them",
                   err=True)


@click.command("demo-intro", cls=Command, hidden=True)
@pass_ctx
def demo_intro(c: Context) -> None:
    """Set up the embedded demo and say how to drive it (`make run` prints this first).

    \b
    Example:
        coordinator -w . demo-intro && coordinator -w . supervise
    """
    from . import sending

    for line in sending.demo_intro(c.ws):
        click.echo(line)
