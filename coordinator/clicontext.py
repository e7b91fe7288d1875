"""What every command of the command line is given: the `Context` that finds and opens
the workspace once (`pass_ctx`), the `Command` class whose usage errors name the
command, the parameter types (seconds, days, tokens), JSON output, and requests to
the supervisor (`submit`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import select
import signal
import sys
from typing import Any

import click

from .budget import MAX_LINE, MAX_TOKENS_ADDED
from .errors import UsageError
from .workspace import Workspace


class _NamedInErrors:
    """Usage errors name the command they are about (`See coordinator budget add -h`): click's
    parser raises some (an option with no value) with no context, which named only the top."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc, no-any-return]
        except click.UsageError as e:
            if e.ctx is None:
                e.ctx = ctx
            raise


class Command(_NamedInErrors, click.Command):
    """A subcommand (see `_NamedInErrors`)."""


class Group(_NamedInErrors, click.Group):
    """A group of subcommands (`budget`, `audit`); theirs are `Command`s too."""

    command_class = Command


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


class Tokens(click.IntRange):
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


class Bounded(click.types.StringParamType):
    """UTF-8 text from the command line, at most `most` characters: an order id or agent name of
    100,000 characters was echoed whole in its one-line error, and a `budget add --note` past
    the ledger's line was cut at it without a word."""

    name = "text"

    def __init__(self, most: int, what: str) -> None:
        self.most, self.what = most, what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from .inboxfiles import printable

        text = super().convert(value, param, ctx)
        if len(text) > self.most:
            self.fail(f"'{printable(text[:20])}…' is {len(text):,} characters; {self.what} is at most "
                      f"{self.most:,}", param, ctx)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are no UTF-8 were said as Python's '\udcff'
            self.fail(f"'{printable(text)}' is not UTF-8 text, as {self.what} must be", param, ctx)
        return text


ORDER_ID = Bounded(64, "an order id (like WO-0001)")
AGENT = Bounded(32, "an agent name")
NOTE = Bounded(MAX_LINE, "a note (it is one line of the ledger)")


def on_terminal() -> bool:
    """Whether stdout is a terminal (not when there is none: `coordinator board >&-`)."""
    return sys.stdout is not None and sys.stdout.isatty()


def stdin_hint() -> None:
    """`send -` or `validate -` typed at a terminal waited without a word: say what it waits for."""
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no stdin, or a closed one
        if sys.stdin is not None and sys.stdin.isatty():
            interruptible()  # before the hint: a Ctrl-C pressed as soon as it shows must count
            click.echo("reading the work order from the terminal: type or paste it, then Ctrl-D on a line of its "
                       "own (Ctrl-C gives up)", err=True)


def interruptible() -> None:
    """Make Ctrl-C stop this command even when it was started as a background job: a shell
    starts those with SIGINT ignored, and Python leaves it so (a `kill -INT` did nothing)."""
    with contextlib.suppress(ValueError):  # not the main thread (an embedding caller)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def redraws() -> bool:
    """Whether stdout is a terminal that can be cleared and redrawn: not a dumb one (TERM=dumb:
    an editor's shell buffer, a serial console), which shows the escape codes as text."""
    return on_terminal() and os.environ.get("TERM") != "dumb"


def colours() -> bool:
    """Whether to colour the output: on a terminal that can show colour, unless the user asked
    for none with NO_COLOR (any non-empty value, as no-color.org has it)."""
    return redraws() and not os.environ.get("NO_COLOR")


def reader_gone() -> bool:
    """Whether no one reads stdout any more: it is closed, or it is a pipe whose reader ended
    (`| head -1`). Only a write would find that out, and a watch writes only on a change."""
    if sys.stdout is None:
        return True
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (a test's buffer)
        return False
    poller = select.poll()
    poller.register(fd, 0)  # errors and hang-ups are reported whatever is asked for
    return any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, events in poller.poll(0))


def echo_done(text: str, *, done: str, again: str) -> None:
    """Print `text`, the outcome of a change made (`done` says it in words). Output that cannot be
    written (`> /dev/full`) is a usage error that says the change was made: said as "cannot write
    the output" alone, it looked undone, and was made again (an order sent twice)."""
    try:
        click.echo(text)
        if sys.stdout is not None:  # none at all: `>&-`
            sys.stdout.flush()
    except OSError as e:
        if e.errno == errno.EPIPE:  # the reader went away on purpose: said nowhere, as for every command
            raise
        with contextlib.suppress(OSError, ValueError):  # what is still buffered would fail again at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise UsageError(f"{done}, but that could not be written to the output ({e.strerror}): do not {again}") \
            from None


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def submit(c: Context, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """A request to the supervisor (or served here when none runs); what it found on the way
    (a hand edit it put back) is said on stderr."""
    from . import control
    from .board import supervisor
    from .errors import SupervisorError

    sup = supervisor(c.ws)
    if sup.get("stopped"):  # it answers nothing until resumed: said now, not after the 15 s a request waits
        raise SupervisorError(f"the supervisor (pid {sup['pid']}) is stopped (suspended: Ctrl-Z?), so nothing was "
                              f"done; resume it (`fg` in its terminal, or `kill -CONT {sup['pid']}`) and run this "
                              "again")

    drift = sup.get("config_changed")  # `supervisor` looked (`control.config_drift`)
    if drift:  # what it answers comes from its own team, not from the file as it is now
        click.echo(f"warning: {drift}", err=True)
    result = control.submit(c.ws, action, args)
    for note in result.get("notes", ()):
        click.echo(f"coordinator: signal {note}", err=True)
    return result
