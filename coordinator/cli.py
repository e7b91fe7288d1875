"""The command line: parse, open the workspace, call one library function, print.

Exit codes: 0 success, 1 the thing asked about is wrong, 2 usage or environment.
Errors are one line on stderr, never a traceback (`COORDINATOR_DEBUG=1` shows one).
The handling lives in `CoordinatorGroup.main`, so `CliRunner` tests see exactly
what a user sees. The commands live in `ordercommands` and `teamcommands`; the group
here registers them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from . import __version__
from .errors import CoordinatorError, OrderError

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

        _no_unprintable_crash()
        sys.exit(_guarded(invoke))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            # Past click's main, which turns EPIPE into a silent exit 1: a closed stdout
            # (`coordinator log | head -1`) is the reader having seen enough, not a failure.
            raise _StdoutClosed from e
        except OSError as e:
            setattr(e, _COMMAND, ctx.invoked_subcommand)  # what to advise depends on the command
            raise

    # The commands are imported when first asked for, inside `main`'s guard: importing them
    # (yaml, jsonschema) is most of a short command's start, and a Ctrl-C then was a traceback.
    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        _register(self)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        _register(self)
        return super().list_commands(ctx)


def _no_unprintable_crash() -> None:
    """Characters stdout's encoding lacks are written as escapes (`\\u2192`): on a terminal set to
    Latin-1, the arrow of `board` and `show` was "internal error: UnicodeEncodeError". stderr
    does so already."""
    with contextlib.suppress(AttributeError, ValueError):  # no stdout, or one that is no text stream
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]


def _register(group: click.Group) -> None:
    if group.commands:
        return
    from . import ordercommands, teamcommands
    from .clicontext import Command

    group.command_class = Command
    for command in (ordercommands.new, ordercommands.validate, ordercommands.send, ordercommands.show,
                    ordercommands.cancel, ordercommands.retry,
                    teamcommands.init, teamcommands.supervise, teamcommands.board, teamcommands.log,
                    teamcommands.budget, teamcommands.rotate, teamcommands.signals_cmd, teamcommands.audit,
                    teamcommands.doctor, teamcommands.cost, teamcommands.gc, teamcommands.demo_intro):
        group.add_command(command)


_COMMAND = "coordinator_command"  # the attribute naming the command an OSError stopped


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
        if e.filename is None and _stdout_full():  # `board > /dev/full`: the output, not state/
            click.echo(f"coordinator: cannot write the output: {e.strerror}", err=True)
            with contextlib.suppress(OSError, ValueError):  # what is still buffered would fail at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_ENVIRONMENT
        where = f" writing {e.filename}" if e.filename else ""
        if e.errno == errno.EROFS:  # no room to make: the mount itself refuses writes
            click.echo(f"coordinator: read-only file system{where}: the workspace must be writable; remount "
                       "it read-write or use a workspace on a writable disk", err=True)
            return EXIT_ENVIRONMENT
        # Said of `send` or `budget add` too, "what was claimed stays in state/" was about nothing
        # they do: only the supervisor claims.
        kept = {"supervise": " (what was claimed stays in state/ and is picked up at the next start)",
                "init": " with --force, which finishes the workspace"}.get(getattr(e, _COMMAND, None) or "", "")
        click.echo(f"coordinator: {e.strerror}{where}: make room and run it again{kept}", err=True)
        return EXIT_ENVIRONMENT
    except Exception as e:  # last resort: still one line, never a traceback
        return _internal(e)


def _stdout_full() -> bool:
    """Whether stdout is where no byte more fits: /dev/full, or a file on a full file system."""
    try:
        fd = sys.stdout.fileno()
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode):
            return st.st_rdev == os.makedev(1, 7)  # /dev/full
        return stat.S_ISREG(st.st_mode) and os.fstatvfs(fd).f_bavail == 0
    except (AttributeError, ValueError, OSError):  # no real stdout
        return False


def _internal(e: Exception) -> int:
    if os.environ.get(DEBUG_VAR):
        raise e
    click.echo(f"coordinator: internal error: {type(e).__name__}: {e} (please report this; "
               f"{DEBUG_VAR}=1 shows where)", err=True)
    return EXIT_INTERNAL


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
    from .clicontext import Context

    ctx.obj = Context(workspace)


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the `coordinator` script: one clean line and an exit code for every error."""
    _forget_git_variables()
    cli.main(args=argv, prog_name="coordinator")


def _forget_git_variables() -> None:
    """The caller's GIT_* variables belong to the repository they were set for, not to the
    git coordinator runs: exported by a hook or a shell in another repository, GIT_DIR made
    every commit in state/ fail ("must be run in a work tree") and GIT_INDEX_FILE or
    GIT_OBJECT_DIRECTORY sent its objects elsewhere. The repositories' git and the specialists
    never had them; state/'s git (through GitPython, which adds the process's environment to
    what it is given) had them all. GitPython's own (GIT_PYTHON_*) stay: they are not git's."""
    for key in [k for k in os.environ if k.startswith("GIT_") and not k.startswith("GIT_PYTHON_")]:
        del os.environ[key]
