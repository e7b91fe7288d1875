"""The command line: parse, open the workspace, call one library function, print.

Exit codes: 0 success, 1 the thing asked about is wrong, 2 usage or environment.
Errors are one line on stderr, never a traceback (`COORDINATOR_DEBUG=1` shows one).
The handling lives in `CoordinatorGroup.main`, so `CliRunner` tests see exactly
what a user sees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .budget import MAX_TOKENS_ADDED
from .config import CONFIG_NAME
from .errors import CoordinatorError, OrderError, WorkspaceError
from .workspace import ENV_VAR, Workspace

DEBUG_VAR = "COORDINATOR_DEBUG"  # set it to see the traceback of an internal error
EXIT_INTERNAL = 70               # EX_SOFTWARE: a bug, not something the user did
EXIT_ENVIRONMENT = 2             # SPEC: usage or environment error (e.g. the disk is full)
EXIT_INTERRUPTED = 130


class CoordinatorGroup(click.Group):
    """The top-level group: every error becomes one line on stderr and an exit code."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> NoReturn:
        def invoke() -> Any:
            return super(CoordinatorGroup, self).main(args, prog_name or "coordinator", complete_var,
                                                      standalone_mode=False, **extra)

        sys.exit(_guarded(invoke))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            # Past click's main, which turns EPIPE into a silent exit 1: a closed stdout
            # (`coordinator log | head -1`) is the reader having seen enough, not a failure.
            raise _StdoutClosed from e


class _Command(click.Command):
    """A subcommand whose usage errors name it (`See coordinator new -h`): click's parser
    raises some (an option with no value) with no context, which named only the group."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            if e.ctx is None:
                e.ctx = ctx
            raise


CoordinatorGroup.command_class = _Command


class _StdoutClosed(Exception):
    """The reader of stdout went away."""


def _guarded(invoke: Callable[[], Any]) -> int:
    """Run the command; turn whatever it raises into (one line on stderr, exit code)."""
    try:
        rv = invoke()
        with contextlib.suppress(AttributeError, ValueError):  # no stdout, or closed by the caller
            sys.stdout.flush()  # here, not at exit: a reader gone by now is no error either
        return rv if isinstance(rv, int) else 0  # an int only from click's own Exit (help, version)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.format_message(), err=True)  # a group with no command: its help
        return 2
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "coordinator"
        text = e.format_message()
        text = text if text.endswith((".", "?")) else text + "."
        click.echo(f"{where}: {text} See `{where} -h`.", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"coordinator: {e.format_message()}", err=True)
        return 2
    except OrderError as e:  # every broken rule, one line each: file:line: field: what to do
        for p in e.problems:
            click.echo(str(p), err=True)
        return e.exit_code
    except CoordinatorError as e:
        click.echo(f"coordinator: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (BrokenPipeError, _StdoutClosed):
        # The reader went away (`coordinator log | head`): stop quietly with 0, as git does, and
        # keep the interpreter from complaining when it flushes stdout on the way out.
        with contextlib.suppress(OSError, ValueError):  # no real stdout (an embedding caller)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM) and e.filename and not os.environ.get(DEBUG_VAR):
            click.echo(f"coordinator: {(e.strerror or 'permission denied').lower()}: {e.filename}: run it as "
                       "the user who owns the workspace (or give this user access to it)", err=True)
            return EXIT_ENVIRONMENT
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or os.environ.get(DEBUG_VAR):
            return _internal(e)
        where = f" writing {e.filename}" if e.filename else ""
        if e.errno == errno.EROFS:  # no room to make: the mount itself refuses writes
            click.echo(f"coordinator: read-only file system{where}: the workspace must be writable; remount "
                       "it read-write or use a workspace on a writable disk", err=True)
            return EXIT_ENVIRONMENT
        click.echo(f"coordinator: {e.strerror}{where}: make room and run it again "
                   "(what was claimed stays in state/ and is picked up at the next start)", err=True)
        return EXIT_ENVIRONMENT
    except Exception as e:  # last resort: still one line, never a traceback
        return _internal(e)


def _internal(e: Exception) -> int:
    if os.environ.get(DEBUG_VAR):
        raise e
    click.echo(f"coordinator: internal error: {type(e).__name__}: {e} (please report this; "
               f"{DEBUG_VAR}=1 shows where)", err=True)
    return EXIT_INTERNAL


class Context:
    def __init__(self, workspace: str | None) -> None:
        self.explicit = workspace
        self._ws: Workspace | None = None

    @property
    def ws(self) -> Workspace:
        if self._ws is None:
            self._ws = Workspace.find(self.explicit)
            _ = self._ws.config  # a bad config stops every command with the key and reason
            self._ws.check_layout()  # so does a file where a folder of the workspace belongs
        return self._ws


pass_ctx = click.make_pass_decorator(Context)


class _Amount(click.FloatRange):
    """Seconds or days: a finite number from 0 to `most` (FloatRange lets nan and inf through)."""

    name = "number"  # said as "'abc' is not a valid number", not "… float range"

    def __init__(self, most: float) -> None:
        super().__init__(min=0, max=most)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


SECONDS = _Amount(most=7 * 24 * 3600)  # a grace of a week is already no limit
DAYS = _Amount(most=100 * 365)


class _Tokens(click.IntRange):
    """A whole number of tokens, 1 to MAX_TOKENS_ADDED; 1,800 and 1_800 are read as 1800."""

    name = "tokens"

    def __init__(self) -> None:
        super().__init__(min=1, max=MAX_TOKENS_ADDED)

    # Digits 0-9 only (int() would take other scripts' digits too), grouped by threes if at all:
    # "1,5" is not read as 15, nor "1,,8" as 18.
    _NUMBER = re.compile(r"[0-9]+|[0-9]{1,3}(?:,[0-9]{3})+|[0-9]{1,3}(?:_[0-9]{3})+")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if not self._NUMBER.fullmatch(text):
                self.fail(f"{value!r} is not a whole number of tokens (like 1800 or 1,800)", param, ctx)
            value = int(text.replace(",", "").replace("_", ""))
        return super().convert(value, param, ctx)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@click.group("coordinator", cls=CoordinatorGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-w", "--workspace", metavar="DIR", help="Workspace folder (default: $COORDINATOR_WORKSPACE, "
              "else the nearest folder upward with coordinator.yaml).")
@click.version_option(__version__, "--version", prog_name="coordinator")
@click.pass_context
def cli(ctx: click.Context, workspace: str | None) -> None:
    """A filesystem-inbox coordinator for multi-agent AI teams, with enforced permissions.

    \b
    Example:
        coordinator init myteam && cd myteam
        coordinator new --to chip > fix.md     # fill it in
        coordinator send fix.md --to chip
        coordinator supervise
    """
    ctx.obj = Context(workspace)


# -- workspace & orders ------------------------------------------------------------------------------
@cli.command()
@click.argument("directory", required=False, default=".", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing coordinator.yaml.")
def init(directory: str, force: bool) -> None:
    """Make a workspace: config, inboxes, state/ repository, demo repository.

    \b
    Example:
        coordinator init myteam
        coordinator init myteam --force     # start over with the example config
    """
    from .workspace import init as do_init

    existing = Path(directory).expanduser() / CONFIG_NAME
    if existing.exists() and not force:  # the thing asked about is wrong (SPEC §1): exit 1
        raise CoordinatorError(f"{existing} already exists; pass --force to overwrite it")
    ws, lines = do_init(Path(directory), force=force)
    for line in lines:
        click.echo(line)
    click.echo(f"workspace ready at {ws.root}; next: `coordinator -w {shlex.quote(directory)} supervise`")


@cli.command()
# Any path: a folder, a FIFO, a missing file is said for that file, and the others still checked.
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("--to", "to", metavar="AGENT", help="Recipient (default: the inbox folder the file is in, "
              "else the file's `to:`).")
@click.option("--from", "sender", metavar="AGENT", help="Sender (default: the file's `from`, else user).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document with every file's result.")
@pass_ctx
def validate(c: Context, files: tuple[str, ...], to: str | None, sender: str | None, as_json: bool) -> None:
    """Check work orders without sending them; exit 1 if any is invalid, 2 if a file cannot be
    read (every file is still checked and reported).

    `-` reads an order from stdin (Markdown, YAML or JSON; the format is recognized).

    \b
    Example:
        coordinator validate inbox/chip/fix.md
        coordinator validate draft.yaml other.md --to chip --json
        coordinator new --to chip | coordinator validate -
    """
    from . import sending

    report = sending.validate_files(c.ws, list(files), to=to, sender=sender)
    if as_json:
        emit_json({"valid": all(r["valid"] for r in report), "files": report})
    else:
        for r in report:
            if r["valid"]:
                click.echo(f"{r['file']}: ok (to {r['to']}, {r['checks']} check(s))")
            else:
                prefix = "" if r["readable"] else "coordinator: "  # said as `send` says it
                for p in r["problems"]:
                    click.echo(prefix + p["text"], err=True)
    code = sending.verdict(report)
    if code:
        raise click.exceptions.Exit(code)


@cli.command()
@click.argument("file", type=click.Path(allow_dash=True))
@click.option("--to", "to", metavar="AGENT", help="Recipient agent (default: the file's `to:`).")
@click.option("--from", "sender", metavar="AGENT", help="Sender (default: the file's `from`, else user).")
@pass_ctx
def send(c: Context, file: str, to: str | None, sender: str | None) -> None:
    """Validate a work order, then drop it atomically into the agent's inbox; prints its id.

    `-` reads the order from stdin (Markdown, YAML or JSON; the format is recognized).

    \b
    Example:
        coordinator send fix.md --to chip
        cat order.yaml | coordinator send - --to chip --from walt
    """
    from . import sending
    from .watcher import printable

    if file == "-":
        data = sending.read_stream(sys.stdin.buffer)
        order_id = sending.send(c.ws, data, name=sending.STDIN, to=to, sender=sender, kind=sending.sniff(data))
    else:
        path = Path(file)
        shown = printable(c.ws.rel(path))
        sending.refuse_inbox_file(c.ws, path, shown=shown)
        data = sending.read_file(path, shown=shown)
        order_id = sending.send(c.ws, data, name=shown, to=to, sender=sender)
    click.echo(order_id)


def _submit(c: Context, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """A request to the supervisor (or served here when none runs); what it found on the way
    (a hand edit it put back) is said on stderr."""
    from . import control

    result = control.submit(c.ws, action, args)
    for note in result.get("notes", ()):
        click.echo(f"coordinator: signal {note}", err=True)
    return result


@cli.command()
@click.option("--to", "to", required=True, metavar="AGENT", help="Recipient agent.")
@pass_ctx
def new(c: Context, to: str) -> None:
    """Print a work-order template to fill in; it validates once every <…> is replaced.

    \b
    Example:
        coordinator new --to chip > fix.md
        $EDITOR fix.md && coordinator send fix.md
    """
    from . import orders

    click.echo(orders.template(to, c.ws.config), nl=False)


# -- the supervisor ----------------------------------------------------------------------------------
@cli.command()
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

    def log(line: str) -> None:
        # One line per event, whatever it quotes: an agent's summary or a file name could
        # otherwise start lines of its own or send escape sequences to the terminal.
        click.echo(f"{time.strftime('%H:%M:%S')} {one_line(line)}", err=True)

    received = [0]

    def on_signal(signum: int, frame: object) -> None:
        received[0] += 1  # handlers only set a flag; the loop acts on it

    before = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    lines = _LogLines(log)
    logging.getLogger().addHandler(lines)
    try:
        with Supervisor(c.ws, poll=poll, log=log, stop_grace=grace) as sup:
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


@cli.command()
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
    terminal = sys.stdout.isatty()
    if not watch:
        click.echo(b.render(c.ws, colour=terminal))
        return
    from .store import RecordCache

    shown = None
    drawn = 0
    try:
        while True:
            if drawn % 60 == 0:
                cache = RecordCache()  # a full read each minute, whatever a file's times say
            drawn += 1
            text = b.render(c.ws, colour=terminal, cache=cache)
            if terminal:
                click.clear()
                click.echo(text)
            elif text != shown:
                # Not a terminal (a file, a pipe): nothing to redraw, so a board is added only
                # when it changed, after the time it was seen.
                if shown is not None:
                    click.echo(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} ---")
                click.echo(text)
                sys.stdout.flush()
                shown = text
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("order_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@pass_ctx
def show(c: Context, order_id: str, as_json: bool) -> None:
    """One order: fields, status, attempts, report, history.

    \b
    Example:
        coordinator show WO-0001
    """
    from . import board as b
    from .sending import explain_missing

    with explain_missing(c.ws, order_id):
        data = b.show(c.ws, order_id)
    if as_json:
        emit_json(data)
    else:
        click.echo(b.render_show(data))


@cli.command()
@click.argument("order_id", metavar="[ID]", required=False)
@click.option("--json", "as_json", is_flag=True, help="A JSON list of entries.")
@pass_ctx
def log(c: Context, order_id: str | None, as_json: bool) -> None:
    """The audit history from state/'s git log (of one order, or all).

    \b
    Example:
        coordinator log WO-0001
    """
    from .audit import StateRepo
    from .sending import explain_missing
    from .store import Store

    if order_id is not None:  # "" too: an empty id is no order, not "all of them"
        with explain_missing(c.ws, order_id):
            Store(c.ws.state).load(order_id)  # unknown id: exit 1
    if not (c.ws.state / ".git").exists():
        click.echo("no history yet: state/ is made by `coordinator init` or the first `coordinator supervise`",
                   err=True)
        if as_json:  # still one JSON document: an empty history
            emit_json([])
        return
    entries = StateRepo(c.ws.state).entries(order_id)
    if as_json:
        emit_json([e.as_json() for e in entries])
        return
    for e in entries:
        click.echo(f"{e.at}  {e.commit[:10]}  {e.author:<12} {e.line}")


@cli.command()
@click.argument("order_id", metavar="ID")
@pass_ctx
def cancel(c: Context, order_id: str) -> None:
    """Cancel a queued, waiting or running order (its processes are killed).

    A blocked or halted order can be cancelled too: it ends for good and
    `retry` no longer brings it back.

    \b
    Example:
        coordinator cancel WO-0007
    """
    from .sending import explain_missing

    with explain_missing(c.ws, order_id):
        r = _submit(c, "cancel", {"id": order_id})
    if r.get("warning"):
        click.echo(f"coordinator: {r['warning']}", err=True)
    click.echo(f"{r['id']}: {r['status']}")


@cli.command()
@click.argument("order_id", metavar="ID")
@pass_ctx
def retry(c: Context, order_id: str) -> None:
    """Re-queue a blocked or halted order (or clear a free-text blocker).

    \b
    Example:
        coordinator retry WO-0007
    """
    from .sending import explain_missing

    with explain_missing(c.ws, order_id):
        r = _submit(c, "retry", {"id": order_id})
    click.echo(f"{r['id']}: {r['status']}")


# -- budget, signals, audit ----------------------------------------------------------------------------
@cli.group(invoke_without_command=True)
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

    ws = ctx.ensure_object(Context).ws
    data = b.budget_data(ws)
    if as_json:
        emit_json(data)
    else:
        click.echo(b.render_budget(data, bands=ws.config.budget.bands, gauge=sys.stdout.isatty()))


@budget.command("add")
@click.argument("tokens", type=_Tokens())
@click.option("--note", default="", help="What the tokens were (a file read, a chat).")
@pass_ctx
def budget_add(c: Context, tokens: int, note: str) -> None:
    """Add hot tokens the supervisor cannot see (an external orchestrator's reading).

    \b
    Example:
        coordinator budget add 1800 --note "read docs/api.md"
    """
    from .budget import orchestrator_of

    orchestrator_of(c.ws.config)  # no orchestrator, no budget: said before anything is opened
    r = _submit(c, "budget-add", {"tokens": tokens, "note": note})
    click.echo(f"{r['hot_tokens']:,} hot tokens, mode {r['mode']}")
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


@cli.command()
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
    r = _submit(c, "rotate", {"fresh": fresh})
    click.echo(r["message"])


@cli.command("signals")
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


@cli.group()
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
        if not findings:
            click.echo("audit clean: every commit and state change is explained")
    if findings:
        sys.exit(1)


@cli.command()
@pass_ctx
def doctor(c: Context) -> None:
    """What this machine supports: Landlock ABI, watcher, git, limits.

    Outside a workspace it checks the machine only; in one, also the team.

    \b
    Example:
        coordinator doctor
    """
    from . import doctor as d

    try:
        ws: Workspace | None = Workspace.find(c.explicit)  # a broken config is reported, not refused
    except WorkspaceError:
        if c.explicit or os.environ.get(ENV_VAR):
            raise  # a workspace named on purpose that is not one
        ws = None
    for line in d.report(ws):
        click.echo(line)
    if ws is not None:
        _ = ws.config  # a config it could not read: its error, once more, as the exit


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@pass_ctx
def cost(c: Context, as_json: bool) -> None:
    """LLM calls, tokens and money by agent and model.

    \b
    Example:
        coordinator cost --json
    """
    from . import costs

    data = costs.summary(c.ws)
    if as_json:
        emit_json(data)
    else:
        click.echo(costs.render(data))


@cli.command()
@click.option("--days", default=7.0, show_default=True, type=DAYS, help="Remove kept working copies older than this.")
@pass_ctx
def gc(c: Context, days: float) -> None:
    """Remove working copies kept for inspection (denied orders) older than --days.

    \b
    Example:
        coordinator gc --days 2
    """
    from . import sending

    removed = sending.gc(c.ws, days)
    click.echo(f"removed {len(removed)} working cop{'y' if len(removed) == 1 else 'ies'}")


@cli.command("demo-intro", hidden=True)
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


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the `coordinator` script: one clean line and an exit code for every error."""
    cli.main(args=argv, prog_name="coordinator")
