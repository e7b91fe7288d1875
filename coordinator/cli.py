"""The command line: parse, open the workspace, call one library function, print.

Exit codes: 0 success, 1 the thing asked about is wrong, 2 usage or environment.
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .errors import CoordinatorError, OrderError, UsageError
from .workspace import Workspace


class Context:
    def __init__(self, workspace: str | None) -> None:
        self.explicit = workspace
        self._ws: Workspace | None = None

    @property
    def ws(self) -> Workspace:
        if self._ws is None:
            self._ws = Workspace.find(self.explicit)
            _ = self._ws.config  # a bad config stops every command with the key and reason
        return self._ws


pass_ctx = click.make_pass_decorator(Context)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    """
    from .workspace import init as do_init

    ws, lines = do_init(Path(directory), force=force)
    for line in lines:
        click.echo(line)
    click.echo(f"workspace ready at {ws.root}; next: `coordinator -w {directory} supervise`")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--to", "to", metavar="AGENT", help="Recipient (default: the inbox folder the file is in).")
@click.option("--from", "sender", metavar="AGENT", help="Sender (default: the file's `from`, else user).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document with every file's result.")
@pass_ctx
def validate(c: Context, files: tuple[str, ...], to: str | None, sender: str | None, as_json: bool) -> None:
    """Check work orders without sending them; exit 1 if any is invalid.

    \b
    Example:
        coordinator validate inbox/chip/fix.md
        coordinator validate draft.yaml --to chip --json
    """
    from . import sending

    report = sending.validate_files(c.ws, [Path(f) for f in files], to=to, sender=sender)
    if as_json:
        emit_json({"valid": all(r["valid"] for r in report), "files": report})
    else:
        for r in report:
            if r["valid"]:
                click.echo(f"{r['file']}: ok (to {r['to']}, {r['checks']} check(s))")
            else:
                for p in r["problems"]:
                    click.echo(p["text"], err=True)
    if not all(r["valid"] for r in report):
        sys.exit(1)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--to", "to", required=True, metavar="AGENT", help="Recipient agent.")
@click.option("--from", "sender", metavar="AGENT", help="Sender (default: the file's `from`, else user).")
@pass_ctx
def send(c: Context, file: str, to: str, sender: str | None) -> None:
    """Validate a work order, then drop it atomically into the agent's inbox; prints its id.

    \b
    Example:
        coordinator send fix.md --to chip
        cat order.yaml | coordinator send - --to chip --from walt
    """
    from . import sending

    data = sys.stdin.buffer.read() if file == "-" else _read(Path(file))
    name = "stdin.md" if file == "-" else Path(file).name
    if file == "-" and data.lstrip()[:1] in (b"{",):
        name = "stdin.json"
    elif file == "-" and not data.lstrip().startswith((b"---", b"**", b"#")):
        name = "stdin.yaml"
    click.echo(sending.send(c.ws, data, name=name, to=to, sender=sender))


@cli.command()
@click.option("--to", "to", required=True, metavar="AGENT", help="Recipient agent.")
@pass_ctx
def new(c: Context, to: str) -> None:
    """Print a work-order template to fill in.

    \b
    Example:
        coordinator new --to chip > fix.md
    """
    from . import orders

    if to not in c.ws.config.agents:
        raise UsageError(f"unknown agent {to!r}; agents: {', '.join(c.ws.config.agents)}")
    click.echo(orders.template(to, c.ws.config), nl=False)


# -- the supervisor ----------------------------------------------------------------------------------
@cli.command()
@click.option("--once", is_flag=True, help="Process everything runnable now, then exit.")
@click.option("--poll", is_flag=True, help="Use a polling watcher (network file systems).")
@click.option("--grace", default=30.0, show_default=True, metavar="SECONDS",
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

    def log(line: str) -> None:
        click.echo(f"{time.strftime('%H:%M:%S')} {line}", err=True)

    received = [0]

    def on_signal(signum: int, frame: object) -> None:
        received[0] += 1  # handlers only set a flag; the loop acts on it

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with Supervisor(c.ws, poll=poll, log=log, stop_grace=grace) as sup:
        if once:
            sup.run_once()
            log("done: nothing runnable left")
        else:
            log(f"supervising {c.ws.root} ({len(c.ws.config.agents)} agents); Ctrl-C to stop")
            sup.run(should_stop=lambda: received[0])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help='{"orders": [...]} on stdout.')
@click.option("--watch", is_flag=True, help="Redraw every second until Ctrl-C.")
@pass_ctx
def board(c: Context, as_json: bool, watch: bool) -> None:
    """The kanban: orders by status, stale flags, budget and signals.

    \b
    Example:
        coordinator board
        coordinator board --json | jq '.orders[] | select(.status=="blocked")'
    """
    from . import board as b

    if as_json:
        emit_json(b.as_json(c.ws))
        return
    colour = sys.stdout.isatty()
    if not watch:
        click.echo(b.render(c.ws, colour=colour))
        return
    try:
        while True:
            click.clear()
            click.echo(b.render(c.ws, colour=colour))
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
    from .store import Store

    if order_id:
        Store(c.ws.state).load(order_id)  # unknown id: exit 1
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

    \b
    Example:
        coordinator cancel WO-0007
    """
    from . import control

    r = control.submit(c.ws, "cancel", {"id": order_id})
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
    from . import control

    r = control.submit(c.ws, "retry", {"id": order_id})
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
    from . import budget as b

    ws = ctx.find_object(Context).ws
    cfg = ws.config
    if not cfg.orchestrator:
        raise UsageError("this team has no orchestrator; set `orchestrator:` in coordinator.yaml")
    ledger = b.Ledger.load(ws.state)
    data = ledger.as_json(agent=cfg.orchestrator, ceiling=cfg.budget.ceiling, bands=cfg.budget.bands)
    if as_json:
        emit_json(data)
        return
    click.echo(f"{data['agent']}: {data['hot_tokens']:,} / {data['ceiling']:,} hot tokens, mode {data['mode']}, "
               f"generation {data['generation']}")
    if sys.stdout.isatty():
        click.echo(b.gauge(data["hot_tokens"], data["ceiling"], cfg.budget.bands))
    for item in data["items"]:
        note = f"  {item['note']}" if item.get("note") else ""
        click.echo(f"  {item['tokens']:>7,}  {item['kind']:<9} {item['status']:<10} {item['ref']}{note}")


@budget.command("add")
@click.argument("tokens", type=int)
@click.option("--note", default="", help="What the tokens were (a file read, a chat).")
@pass_ctx
def budget_add(c: Context, tokens: int, note: str) -> None:
    """Add hot tokens the supervisor cannot see (an external orchestrator's reading).

    \b
    Example:
        coordinator budget add 1800 --note "read docs/api.md"
    """
    from . import control

    r = control.submit(c.ws, "budget-add", {"tokens": tokens, "note": note})
    click.echo(f"{r['hot_tokens']:,} hot tokens, mode {r['mode']}")
    if r.get("mode_change"):
        click.echo(f"warning: mode changed {r['mode_change'][0]} -> {r['mode_change'][1]}", err=True)


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
    from . import control

    r = control.submit(c.ws, "rotate", {"fresh": fresh})
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
        click.echo(s.render(found))


@cli.group()
def audit() -> None:
    """The audit trail (see `audit verify`)."""


@audit.command("verify")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@pass_ctx
def audit_verify(c: Context, as_json: bool) -> None:
    """Exit 1 listing every change no order explains; 0 when the trail is complete.

    \b
    Example:
        coordinator audit verify
    """
    from . import verify

    findings = verify.verify(c.ws)
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

    \b
    Example:
        coordinator doctor
    """
    from . import doctor as d

    for line in d.report(c.ws):
        click.echo(line)


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
@click.option("--days", default=7.0, show_default=True, help="Remove kept working copies older than this.")
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
    """Printed by `make run` before the supervisor starts."""
    from . import sending

    for line in sending.demo_intro(c.ws):
        click.echo(line)


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(2 * 1024 * 1024)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a work order") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: one clean line and an exit code for every error."""
    try:
        cli.main(args=argv, prog_name="coordinator", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"coordinator: {e.format_message()}", err=True)
        sys.exit(2 if e.exit_code != 1 else 2)
    except OrderError as e:
        for p in e.problems:
            click.echo(str(p), err=True)
        sys.exit(e.exit_code)
    except CoordinatorError as e:
        click.echo(f"coordinator: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # last resort: still one line, never a traceback
        click.echo(f"coordinator: internal error: {type(e).__name__}: {e} (please report this)", err=True)
        sys.exit(70)
    sys.exit(0)
