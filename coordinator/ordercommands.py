"""The order commands: write one (`new`), check it (`validate`), send it, look at it
(`show`), cancel it and retry it. Each parses its arguments, opens the workspace, calls
one library function (`orders`, `sending`, `board`, `control`) and prints.
"""

from __future__ import annotations

from pathlib import Path

import click

from .clicontext import (
    AGENT,
    ORDER_ID,
    Command,
    Context,
    echo_done,
    emit_json,
    pass_ctx,
    stdin_hint,
    submit,
)


@click.command(cls=Command)
@click.option("--to", "to", required=True, metavar="AGENT", type=AGENT, help="Recipient agent.")
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


@click.command(cls=Command)
# Any path: a folder, a FIFO, a missing file is said for that file, and the others still checked.
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option("--to", "to", metavar="AGENT", type=AGENT, help="Recipient (default: the inbox folder the file is in, "
              "else the file's `to:`).")
@click.option("--from", "sender", metavar="AGENT", type=AGENT, help="Sender (default: the file's `from`, else user).")
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

    if "-" in files:
        stdin_hint()
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


@click.command(cls=Command)
@click.argument("file", type=click.Path(allow_dash=True))
@click.option("--to", "to", metavar="AGENT", type=AGENT, help="Recipient agent (default: the file's `to:`).")
@click.option("--from", "sender", metavar="AGENT", type=AGENT, help="Sender (default: the file's `from`, else user).")
@pass_ctx
def send(c: Context, file: str, to: str | None, sender: str | None) -> None:
    """Validate a work order, then drop it atomically into the agent's inbox; prints its id.

    `-` reads the order from stdin (Markdown, YAML or JSON; the format is recognized).

    \b
    Example:
        coordinator send fix.md --to chip
        cat order.yaml | coordinator send - --to chip --from walt
    """
    from . import control, sending
    from .inboxfiles import printable

    if file == "-":
        stdin_hint()
        data = sending.read_stdin()
        sent = sending.send(c.ws, data, name=sending.STDIN, to=to, sender=sender, kind=sending.sniff(data))
    else:
        path = Path(file)
        shown = printable(c.ws.rel(path))
        sending.refuse_inbox_file(c.ws, path, shown=shown)
        data = sending.read_file(path, shown=shown)
        sent = sending.send(c.ws, data, name=shown, to=to, sender=sender)
    assert sent.id is not None
    # Said as "cannot write the output" alone, the order looked unsent, and was sent again.
    echo_done(sent.id, done=f"{sent.id} was sent", again="send it again")
    drift = control.drift_for(c.ws, sent.to)
    if drift:
        click.echo(f"warning: {drift}", err=True)


@click.command(cls=Command)
@click.argument("order_id", metavar="ID", type=ORDER_ID)
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


@click.command(cls=Command)
@click.argument("order_id", metavar="ID", type=ORDER_ID)
@pass_ctx
def cancel(c: Context, order_id: str) -> None:
    """Cancel a queued, waiting or running order (its processes are killed),
    and with it the orders it sent that have not ended for good (blocked or
    halted ones too), and the investigations their blocks escalated.

    A running order's cancel is answered once its processes are gone: the
    command waits for that, then says the order is cancelled.

    A blocked or halted order can be cancelled too: it ends for good and
    `retry` no longer brings it back.

    \b
    Example:
        coordinator cancel WO-0007
    """
    from .sending import explain_missing

    with explain_missing(c.ws, order_id):
        r = submit(c, "cancel", {"id": order_id})
    if r.get("warning"):
        click.echo(f"coordinator: {r['warning']}", err=True)
    click.echo(f"{r['id']}: {r['status']}")
    for child in r.get("with") or ():  # the work it sent that had not ended
        # An investigation a block escalated: the order it asks about never runs again.
        of = f"; it investigated why {child['investigated']} was blocked" if child.get("investigated") else ""
        click.echo(f"{child['id']}: {child['status']} with {r['id']} (it was {child['was']}{of})")
    for waiter in r.get("blocked") or ():  # what waited for them can never run now
        click.echo(f"{waiter['id']}: blocked, it waited for {waiter['waited_for']}, which can never be done now")


@click.command(cls=Command)
@click.argument("order_id", metavar="ID", type=ORDER_ID)
@pass_ctx
def retry(c: Context, order_id: str) -> None:
    """Re-queue a blocked or halted order (or clear a free-text blocker).

    The investigation a block of it escalated, if it has not ended, is cancelled
    (the retry answers what it asks: what would unblock the order), and listed.
    A running one is answered once its processes are gone.

    \b
    Example:
        coordinator retry WO-0007
    """
    from .sending import explain_missing

    with explain_missing(c.ws, order_id):
        r = submit(c, "retry", {"id": order_id})
    if r.get("warning"):
        click.echo(f"coordinator: {r['warning']}", err=True)
    click.echo(f"{r['id']}: {r['status']}")
    for child in r.get("with") or ():  # the investigations of its blocks, and the work they sent
        of = (f"it investigated why {r['id']} was blocked, and the retry answers that" if child.get("investigated")
              else f"work an investigation of {r['id']} sent")
        click.echo(f"{child['id']}: {child['status']} with the retry of {r['id']} (it was {child['was']}; {of})")
    for waiter in r.get("blocked") or ():  # what waited for them can never run now
        click.echo(f"{waiter['id']}: blocked, it waited for {waiter['waited_for']}, which can never be done now")
