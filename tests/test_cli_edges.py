"""The command line as a careless user meets it: odd terminals, odd workspaces, odd input.

These run the real `coordinator` program (on a pseudo-terminal where the terminal matters),
and assert what the user sees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from coordinator.cli import cli

COORDINATOR = str(Path(sys.executable).with_name("coordinator"))


def run(*args: str | Path, input: str | bytes | None = None) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "team"
    assert run("init", root).exit_code == 0
    return root


def on_terminal(*args: str | Path, env: dict[str, str], seconds: float, until: bytes | None = None,
                sigint_ignored: bool = False) -> bytes:
    """What `coordinator ARGS` writes to a 24x100 terminal in `seconds`, or until it wrote
    `until` (then Ctrl-C; killed, and the test failed, if that does not end it within 10 s).
    `sigint_ignored`: started as a shell starts a background job, with Ctrl-C ignored."""
    import fcntl
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: the program, with the terminal as its stdout
        if sigint_ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.execve(COORDINATOR, [COORDINATOR, *map(str, args)], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    out = b""
    end = time.monotonic() + seconds
    done = interrupted = False
    while not done:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the program ended and its terminal closed
                chunk = b""
            out += chunk
            done = not chunk
        if (time.monotonic() > end or (until is not None and until in out)) and not done:
            if until is None and interrupted:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(fd)
                raise AssertionError(f"Ctrl-C did not end `coordinator {' '.join(map(str, args))}` within 10 s")
            until, interrupted = None, True
            os.kill(pid, signal.SIGINT)
            end = time.monotonic() + 10
    os.waitpid(pid, 0)
    os.close(fd)
    return out


def term_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COORDINATOR_WORKSPACE", "NO_COLOR", "TERM")}
    return env | {"TERM": "xterm"} | extra


def test_board_on_a_terminal_is_coloured_unless_no_color_is_set(ws: Path) -> None:
    greeting = resources.files("coordinator.demo").joinpath("example-orders", "greeting.md").read_bytes()
    assert run("-w", ws, "send", "-", "--to", "chip", input=greeting).exit_code == 0
    subprocess.run([COORDINATOR, "-w", ws, "supervise", "--once"], capture_output=True, check=True, timeout=120)
    assert b"\x1b[" in on_terminal("-w", ws, "board", env=term_env(), seconds=30)
    plain = on_terminal("-w", ws, "board", env=term_env(NO_COLOR="1"), seconds=30)
    assert b"DONE (1)" in plain
    assert b"\x1b" not in plain


@pytest.mark.slow  # 2-3 s: `make test-slow`, and CI, run it
def test_board_watch_on_a_dumb_terminal_sends_no_escape_codes(ws: Path) -> None:
    out = on_terminal("-w", ws, "board", "--watch", env=term_env(TERM="dumb"), seconds=2.5)
    assert b"0 order(s)" in out
    assert b"\x1b" not in out  # no colour, no clear-screen: a dumb terminal shows them as text
    assert out.count(b"0 order(s)") == 1  # nothing changed: the board is not printed again


ORDER = ("**Objective:** The webapp greets a user by name.\n\n**Acceptance:**\n- It says hello\n"
         "- It says the name\n- `make test` passes\n\n**Files:**\n- webapp/src/greeting.py\n\n"
         "**Branching:**\n- halt-with-note if the greeting already exists\n")


def test_init_beside_a_repos_webapp_of_ones_own_says_it_was_left_and_send_says_why(tmp_path: Path) -> None:
    """init left a repos/webapp that is no repository without a word, and every order then said
    "no repository 'webapp' under repos/" of a folder that is plainly there."""
    root = tmp_path / "team"
    (root / "repos" / "webapp").mkdir(parents=True)
    (root / "repos" / "webapp" / "notes.txt").write_text("mine\n")
    made = run("init", root)
    assert made.exit_code == 0
    assert ("left repos/webapp as it was: it is not a git repository, so the example team's orders are refused "
            "until it is one (move it away and run init --force for the demo repository)") in made.stdout.splitlines()
    assert (root / "repos" / "webapp" / "notes.txt").read_text() == "mine\n"
    refused = run("-w", root, "send", "-", "--to", "chip", input=ORDER)
    assert (refused.exit_code, refused.stderr) == (
        1, "<stdin>:9: files.0: repos/webapp is not a git repository; clone the repository there, or `git init` "
           "it and make a first commit\n")


@pytest.mark.parametrize("text, line, code", [
    (b"version: 1\n# a \x01 note\n", 2, "0001"),
    (b"version: 1\nagents:\n  chip: \x1b[31mred\n", 3, "001B"),
    (b"\xef\xbb\xbfversion: 1\x7f\n", 1, "007F"),
])
def test_a_config_with_a_control_character_is_said_in_one_line_with_its_line(ws: Path, text: bytes, line: int,
                                                                             code: str) -> None:
    """PyYAML's message took two lines, the second naming "<unicode string>" and a position."""
    (ws / "coordinator.yaml").write_bytes(text)
    result = run("-w", ws, "board")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (f"coordinator: coordinator.yaml: is not valid YAML at line {line}: it holds U+{code}, "
                             "a character YAML does not allow (a config is plain text): remove it\n")


@contextlib.contextmanager
def live_supervisor(ws: Path) -> Iterator[subprocess.Popen[str]]:
    """`coordinator supervise` on `ws` as a child, once the board says it runs; resumed (it may
    have been suspended) and stopped after."""
    env = {k: v for k, v in os.environ.items() if k != "COORDINATOR_WORKSPACE"}
    sup = subprocess.Popen([COORDINATOR, "-w", str(ws), "supervise"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while f"running (pid {sup.pid})" not in run("-w", ws, "board").stdout:
            assert time.monotonic() < deadline, "the supervisor did not start"
            time.sleep(0.1)
        yield sup
    finally:
        os.kill(sup.pid, signal.SIGCONT)
        sup.send_signal(signal.SIGTERM)
        sup.communicate(timeout=60)


def suspend(pid: int) -> None:
    """SIGSTOP `pid`, as Ctrl-Z does, and wait until the kernel has stopped one of its threads (a
    thread in a long write to disk stops only when it returns)."""
    def stopped() -> bool:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                state = Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):  # a thread that ended meanwhile
                continue
            if state in ("T", "t"):
                return True
        return False

    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while not stopped():
        assert time.monotonic() < deadline, f"{pid} did not stop"
        time.sleep(0.01)


def test_a_suspended_supervisor_is_said_by_board_and_doctor(ws: Path) -> None:
    """Ctrl-Z on `supervise` left it holding its lock: the board said "running", requests waited 15 s
    and sent the user to `coordinator doctor`, which said nothing about the supervisor."""
    with live_supervisor(ws) as sup:
        assert f"supervisor: running (pid {sup.pid})" in run("-w", ws, "doctor").stdout.splitlines()
        suspend(sup.pid)
        said = (f"supervisor: STOPPED (pid {sup.pid}, suspended: Ctrl-Z?) — it takes nothing in and runs nothing "
                f"until resumed: `fg` in its terminal, or `kill -CONT {sup.pid}`")
        assert said in run("-w", ws, "board").stdout.splitlines()
        assert said in run("-w", ws, "doctor").stdout.splitlines()
        assert json.loads(run("-w", ws, "board", "--json").stdout)["supervisor"]["stopped"] is True
        os.kill(sup.pid, signal.SIGCONT)
        assert f"supervisor: running (pid {sup.pid})" in run("-w", ws, "board").stdout.splitlines()


def test_a_request_to_a_suspended_supervisor_is_refused_at_once(ws: Path) -> None:
    """`cancel` or `budget add` beside a supervisor stopped by Ctrl-Z waited 15 s, then asked
    whether it was stuck: the board already knew it was suspended."""
    with live_supervisor(ws) as sup:
        suspend(sup.pid)
        for args in (("cancel", "WO-0001"), ("budget", "add", "5")):
            started = time.monotonic()
            refused = run("-w", ws, *args)
            assert time.monotonic() - started < 5
            assert (refused.exit_code, refused.stderr) == (
                2, f"coordinator: the supervisor (pid {sup.pid}) is stopped (suspended: Ctrl-Z?), so nothing was "
                   f"done; resume it (`fg` in its terminal, or `kill -CONT {sup.pid}`) and run this again\n")
        os.kill(sup.pid, signal.SIGCONT)
        assert run("-w", ws, "budget", "add", "5").stdout == "5 hot tokens, mode routing\n"


def test_init_makes_the_workspace_that_w_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`coordinator -w myteam init`, as every other command is written, made the workspace in the
    current folder (a home, a project's checkout) and left myteam unmade."""
    here, team = tmp_path / "here", tmp_path / "myteam"
    here.mkdir()
    monkeypatch.chdir(here)
    made = run("-w", team, "init")
    assert made.exit_code == 0, made.output
    assert (team / "coordinator.yaml").is_file() and (team / "state" / ".git").is_dir()
    assert os.listdir(here) == []
    both = run("-w", team, "init", tmp_path / "other")
    assert (both.exit_code, both.stderr) == (
        2, f"coordinator init: -w names {team} and DIRECTORY names {tmp_path / 'other'}; give one of them. "
           "See `coordinator init -h`.\n")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("command", [("board",), ("doctor",), ("init",), ("send", "-", "--to", "chip")])
def test_an_empty_w_is_refused_not_taken_for_the_workspace_around(ws: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  command: tuple[str, ...]) -> None:
    """`-w "$TEAM"` with TEAM unset acted on whatever workspace was around the current folder."""
    monkeypatch.chdir(ws)
    result = run("-w", "", *command, input=ORDER)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == ("coordinator: -w: no folder given (an empty argument: an unset variable?); pass the "
                             "workspace folder, or leave -w out to use the one around you\n")
    assert os.listdir(ws / "inbox" / "chip") == []


def test_a_rejected_orders_escape_sequences_never_reach_the_terminal(ws: Path) -> None:
    """A rejected order keeps the objective its file had: board and show printed it raw, so one
    file dropped in an inbox could retitle (OSC 0) or clear the user's terminal."""
    evil = ORDER.replace("The webapp greets a user by name.", "Hi \x1b]0;owned\x07\x1b[2J there")
    (ws / "inbox" / "chip" / "evil.md").write_text("---\nid: evil\n---\n" + evil)
    subprocess.run([COORDINATOR, "-w", ws, "supervise", "--once"], capture_output=True, check=True, timeout=120)
    board = run("-w", ws, "board")
    assert "\x1b" not in board.stdout and "\x07" not in board.stdout
    assert "evil  chip  user → Hi \\x1b]0;owned\\x07\\x1b[2J there" in board.stdout
    shown = run("-w", ws, "show", "evil")
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "objective: Hi \\x1b]0;owned\\x07\\x1b[2J there" in shown.stdout.splitlines()
    assert json.loads(run("-w", ws, "show", "evil", "--json").stdout)["objective"] == (
        "Hi \x1b]0;owned\x07\x1b[2J there")  # JSON escapes it: kept as it was


def sent_and_done_while_it_runs(ws: Path, sup: subprocess.Popen[bytes]) -> None:
    """An order sent now ends done, and the supervisor `sup` runs on throughout."""
    assert run("-w", ws, "send", "-", "--to", "chip", input=ORDER).stdout == "WO-0001\n"
    deadline = time.monotonic() + 60
    while not any(o["status"] == "done" for o in json.loads(run("-w", ws, "board", "--json").stdout)["orders"]):
        assert sup.poll() is None, "the supervisor stopped"
        assert time.monotonic() < deadline, "WO-0001 was not done"
        time.sleep(0.2)
    assert sup.poll() is None


def test_the_supervisor_keeps_working_when_the_reader_of_its_log_goes_away(ws: Path) -> None:
    """`coordinator supervise 2>&1 | tee log`, and tee ended: the next log line stopped the
    supervisor, with exit 0 and not a word, and the orders sent after it waited for nobody."""
    env = {k: v for k, v in os.environ.items() if k != "COORDINATOR_WORKSPACE"}
    sup = subprocess.Popen([COORDINATOR, "-w", str(ws), "supervise"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env=env)
    try:
        assert sup.stderr is not None
        assert b"supervising" in sup.stderr.readline()
        sup.stderr.close()  # the reader is gone
        sent_and_done_while_it_runs(ws, sup)
    finally:
        sup.send_signal(signal.SIGINT)
        assert sup.wait(timeout=60) == 0


def test_the_supervisor_keeps_working_when_the_terminal_of_its_log_goes_away(ws: Path) -> None:
    """`coordinator supervise &`, `disown`, and the terminal closed (an ssh session that
    dropped): a log line written to a terminal that hung up fails with EIO, not EPIPE, and
    the first one stopped the supervisor; the orders sent after it waited for nobody."""
    env = {k: v for k, v in os.environ.items() if k != "COORDINATOR_WORKSPACE"}
    main, sub = pty.openpty()
    # A session of its own: the closed terminal is not its controlling one (no SIGHUP), as
    # for a job the shell was told to forget.
    sup = subprocess.Popen([COORDINATOR, "-w", str(ws), "supervise"], stdin=subprocess.DEVNULL, stdout=sub,
                           stderr=sub, env=env, start_new_session=True)
    os.close(sub)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"supervising" not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([main], [], [], 0.5)[0]:
                seen += os.read(main, 4096)
        os.close(main)  # the terminal goes away
        sent_and_done_while_it_runs(ws, sup)
    finally:
        sup.send_signal(signal.SIGINT)
        assert sup.wait(timeout=60) == 0


@pytest.mark.parametrize("command", [("send", "-", "--to", "chip"), ("validate", "-", "--to", "chip")])
@pytest.mark.parametrize("background", [False, True], ids=["foreground", "started-with-ctrl-c-ignored"])
def test_reading_an_order_from_a_terminal_says_so_and_ctrl_c_sends_nothing(ws: Path, command: tuple[str, ...],
                                                                           background: bool) -> None:
    """`coordinator send -` typed at a terminal waited for input without a word; and started
    from a script as a background job (Ctrl-C ignored), the "Ctrl-C gives up" it says was untrue."""
    out = on_terminal("-w", ws, *command, env=term_env(), seconds=10, until=b"(Ctrl-C gives up)\r\n",
                      sigint_ignored=background)
    assert out.startswith(b"reading the work order from the terminal: type or paste it, then Ctrl-D on a line of "
                          b"its own (Ctrl-C gives up)\r\n")
    assert os.listdir(ws / "inbox" / "chip") == []
    assert run("-w", ws, "send", "-", "--to", "chip", input=ORDER).stderr == ""  # not said when piped


def test_a_full_disk_under_send_says_no_more_than_what_send_does(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`send` on a full disk said "what was claimed stays in state/ and is picked up at the next
    start": the supervisor's story, not send's. (A full disk needs a mount of its own, which a test
    cannot make: the disk's answer is given here.)"""
    from coordinator import durable

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durable, "write_bytes", full)
    refused = run("-w", ws, "send", "-", "--to", "chip", input=ORDER)
    assert (refused.exit_code, refused.stdout) == (2, "")
    assert refused.stderr == "coordinator: No space left on device: make room and run it again\n"
    assert os.listdir(ws / "inbox" / "chip") == []


def test_without_git_on_path_each_command_says_so_in_one_line(ws: Path, tmp_path: Path) -> None:
    """With no git on PATH, GitPython's import failed with 20 lines about its own variables:
    board, log, init, supervise all ended in an "internal error" (exit 70)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "COORDINATOR_WORKSPACE"} | {"PATH": str(empty)}
    no_git = "coordinator: git is not installed or not on PATH; install git 2.25 or newer\n"
    for args in (("-w", ws, "board"), ("-w", ws, "log"), ("-w", ws, "supervise", "--once"),
                 ("init", tmp_path / "other")):
        done = subprocess.run([sys.executable, "-m", "coordinator", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", no_git), args
    assert not (tmp_path / "other").exists()
    doctor = subprocess.run([sys.executable, "-m", "coordinator", "-w", str(ws), "doctor"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert doctor.returncode == 0, doctor.stderr
    assert "git: NOT FOUND — install git; the audit trail and working copies need it" in doctor.stdout.splitlines()


@pytest.mark.parametrize(("args", "said"), [
    (("show", "x" * 100_000), "coordinator show: Invalid value for 'ID': 'xxxxxxxxxxxxxxxxxxxx…' is 100,000 "
                              "characters; an order id (like WO-0001) is at most 64. See `coordinator show -h`.\n"),
    (("send", "-", "--to", "\x1b]0;" + "x" * 50), "coordinator send: Invalid value for '--to': '\\x1b]0;xxxxxxxxxxxxxxxx…'"
     " is 54 characters; an agent name is at most 32. See `coordinator send -h`.\n"),
    (("budget", "add", "5", "--note", "n" * 201),
     "coordinator budget add: Invalid value for '--note': 'nnnnnnnnnnnnnnnnnnnn…' is 201 characters; a note (it is "
     "one line of the ledger) is at most 200. See `coordinator budget add -h`.\n"),
])
def test_an_overlong_id_name_or_note_is_refused_in_one_short_line(ws: Path, args: tuple[str, ...], said: str) -> None:
    """An id or agent name of 100,000 characters was echoed whole in its "one line" of error, and
    a note past the ledger's 200 characters was cut there without a word."""
    refused = run("-w", ws, *args, input="")
    assert (refused.exit_code, refused.stderr) == (2, said)
    assert not os.path.exists(ws / "state" / "orchestrator" / "ledger.json")
    assert run("-w", ws, "budget", "add", "5", "--note", "n" * 200).exit_code == 0
    assert json.loads(run("-w", ws, "budget", "--json").stdout)["items"][0]["note"] == "n" * 200


@pytest.mark.parametrize(("args", "said"), [
    (("show", os.fsdecode(b"WO-\xff")), "coordinator show: Invalid value for 'ID': 'WO-\\xff' is not UTF-8 text, as an "
                                        "order id (like WO-0001) must be. See `coordinator show -h`.\n"),
    (("new", "--to", os.fsdecode(b"ch\xffip")), "coordinator new: Invalid value for '--to': 'ch\\xffip' is not UTF-8 "
                                                "text, as an agent name must be. See `coordinator new -h`.\n"),
])
def test_an_id_or_name_that_is_not_utf8_is_said_as_its_bytes(ws: Path, args: tuple[str, ...], said: str) -> None:
    """Said as Python's own escape of the byte ('ch\\udcffip'), in "unknown agent" or "no order"."""
    refused = run("-w", ws, *args)
    assert (refused.exit_code, refused.stderr) == (2, said)


def test_an_output_encoding_without_the_arrow_gets_an_escape_not_an_internal_error(ws: Path) -> None:
    """On a terminal set to Latin-1, `board` (its "—") and `show` (its "→") stopped with
    "internal error: UnicodeEncodeError"; characters Latin-1 has are still written as such."""
    env = {k: v for k, v in os.environ.items() if k != "COORDINATOR_WORKSPACE"} | {"PYTHONIOENCODING": "latin-1"}
    board = subprocess.run([COORDINATOR, "-w", str(ws), "board"], capture_output=True, env=env, timeout=60)
    assert (board.returncode, board.stderr) == (0, b"")
    assert b"supervisor: not running \\u2014 `coordinator supervise` starts it\n" in board.stdout


def test_send_refuses_a_hard_link_of_a_file_waiting_in_an_inbox(ws: Path, tmp_path: Path) -> None:
    # Sent, the order was filed twice: once from the name in the inbox, once as the new id.
    waiting = ws / "inbox" / "chip" / "greet.md"
    waiting.write_text(ORDER)
    link = tmp_path / "greet.md"
    os.link(waiting, link)
    for to in ("chip", "rex"):
        refused = run("-w", ws, "send", link, "--to", to)
        assert refused.exit_code == 2
        assert refused.stderr == (f"coordinator: {link} is the same file as inbox/chip/greet.md (a hard link), which "
                                  "is in chip's inbox already: the supervisor takes it in from there (copy the file "
                                  "to send it as another order)\n")
    assert sorted(p.name for p in (ws / "inbox" / "chip").iterdir()) == ["greet.md"]
    copy = tmp_path / "copy.md"
    copy.write_text(ORDER)
    assert run("-w", ws, "send", copy, "--to", "chip").exit_code == 0  # a copy is an order of its own


def test_commands_in_a_current_folder_that_was_removed_say_so(ws: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A shell left in a folder removed since (an old workspace deleted from another terminal):
    # board stopped with "internal error: FileNotFoundError", validate of a relative name too,
    # and init said a symbolic link led back to itself.
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    said = ("coordinator: the current folder no longer exists (removed or moved away since this shell entered it): "
            "cd into a folder that exists, or pass -w and absolute paths\n")
    for args in (("board",), ("init",), ("init", "team"), ("-w", ws, "validate", "x.md", "--to", "chip"),
                 ("-w", ws, "send", "x.md", "--to", "chip")):
        result = run(*args)
        assert (result.exit_code, result.stderr) == (2, said), args
    order = tmp_path / "order.md"
    order.write_text(ORDER)
    assert run("-w", ws, "validate", order, "--to", "chip").exit_code == 0  # absolute paths still work


def test_doctor_in_a_current_folder_that_was_removed_says_so(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # doctor said "workspace: none here" there, as if no workspace had ever been; it still
    # checks the machine, then fails as every other command does there.
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    monkeypatch.delenv("COORDINATOR_WORKSPACE", raising=False)
    result = run("doctor")
    assert result.stdout.splitlines()[0] == "workspace: unknown (the current folder no longer exists)"
    assert any(line.startswith("git: ") for line in result.stdout.splitlines())
    assert (result.exit_code, result.stderr) == (2, "coordinator: the current folder no longer exists (removed or "
                                                    "moved away since this shell entered it): cd into a folder "
                                                    "that exists, or pass -w and absolute paths\n")


def test_a_writable_folder_under_a_relative_home_says_home_is_relative(ws: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # `~/.claude` with HOME=rel/home was refused with "'rel/home/.claude' must be absolute or
    # start with ~", of a path that did start with ~.
    config = ws / "coordinator.yaml"
    config.write_text(config.read_text().replace(
        "    sends_to: [chip]\n", "    sends_to: [chip]\n    sandbox: {writable: ['~/.claude']}\n", 1))
    monkeypatch.setenv("HOME", "rel/home")
    result = run("-w", ws, "board")
    assert (result.exit_code, result.stderr) == (2, "coordinator: coordinator.yaml: agents.rex.sandbox.writable.0: "
                                                    "'~/.claude': HOME is the relative path 'rel/home', so ~ names "
                                                    "no folder; set HOME to an absolute path, or write the folder's "
                                                    "absolute path\n")


@pytest.mark.parametrize("written", ["~/.claude", "~"])
def test_a_writable_folder_under_an_empty_home_says_home_is_empty(ws: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  written: str) -> None:
    # With HOME= (set, empty) `~/.claude` was taken as /.claude: a folder at the root granted.
    config = ws / "coordinator.yaml"
    config.write_text(config.read_text().replace(
        "    sends_to: [chip]\n", f"    sends_to: [chip]\n    sandbox: {{writable: ['{written}']}}\n", 1))
    monkeypatch.setenv("HOME", "")
    result = run("-w", ws, "board")
    assert (result.exit_code, result.stderr) == (2, f"coordinator: coordinator.yaml: agents.rex.sandbox.writable.0: "
                                                    f"'{written}': HOME is empty, so ~ names no folder; set HOME to "
                                                    "your home folder, or write the folder's absolute path\n")


def test_a_yaml_set_in_the_config_is_said_as_a_set_and_what_is_expected(ws: Path) -> None:
    # `writes: !!set {...}` was refused as "must be a list, not a value": a set is a value.
    config = ws / "coordinator.yaml"
    config.write_text(config.read_text().replace(
        '    writes: ["webapp/docs/reviews/**"]\n', '    writes: !!set {"webapp/docs/reviews/**": null}\n', 1))
    result = run("-w", ws, "board")
    assert (result.exit_code, result.stderr) == (2, "coordinator: coordinator.yaml: agents.rex.writes: must be a "
                                                    "list, not a set (YAML's !!set)\n")


def _order(order_id: str, objective: str) -> str:
    return (f"---\nid: {order_id}\n---\n**Objective:** {objective}\n\n**Acceptance:**\n- It is done\n"
            "- It is checked\n- It is said\n\n**Files:**\n- webapp/src/greeting.py\n\n**Branching:**\n"
            "- halt-with-note if it is done already\n")


def test_an_order_id_used_in_another_case_is_refused_by_send_and_by_intake(ws: Path, tmp_path: Path) -> None:
    """`Login-Fix` and `login-fix` would share one order folder and one branch on a
    case-insensitive file system (macOS, a mounted volume): the second is refused, naming the
    first, whether sent or dropped by hand, and an assigned id never takes a used one's place."""
    first, second = tmp_path / "first.md", tmp_path / "second.md"
    first.write_text(_order("Login-Fix", "The webapp greets a user"))
    second.write_text(_order("login-fix", "The webapp welcomes a user"))
    assert run("-w", ws, "send", first, "--to", "chip").output == "Login-Fix\n"
    refused = run("-w", ws, "send", second, "--to", "chip")
    assert refused.exit_code == 1
    assert "id: 'login-fix' is 'Login-Fix', already used in this workspace, in another case" in refused.output
    (ws / "inbox" / "chip" / "by-hand.md").write_text(second.read_text())
    (ws / "inbox" / "chip" / "mine.md").write_text(_order("wo-0001", "The webapp thanks a user"))
    assert run("-w", ws, "supervise", "--once").exit_code == 0
    board = {o["id"]: o for o in json.loads(run("-w", ws, "board", "--json").output)["orders"]}
    assert {i.lower() for i in board} == {"login-fix", "wo-0001", "wo-0002"}  # three folders on any file system
    assert board["Login-Fix"]["status"] == "done" and board["wo-0001"]["status"] == "done"
    assert board["WO-0002"]["status"] == "rejected"


def test_a_budget_ceiling_past_the_last_band_is_refused_and_one_below_the_first_is_warned(ws: Path) -> None:
    # A ceiling of 50,000 was taken: at 20,000 hot tokens the orchestrator was an executor and
    # on_ceiling had not acted, nor would it until 50,000.
    config = ws / "coordinator.yaml"
    text = config.read_text()
    config.write_text(text.replace("  ceiling: 7000 ", "  ceiling: 50000", 1))
    result = run("-w", ws, "budget")
    assert (result.exit_code, result.stderr) == (2, "coordinator: coordinator.yaml: budget.ceiling: a ceiling of "
                                                    "50,000 hot tokens is past the last band (15,000, where the "
                                                    "orchestrator is an executor): the ceiling would act only after "
                                                    "that; set the ceiling from 2,000 to 15,000, or raise the bands\n")
    config.write_text(text.replace("  ceiling: 7000 ", "  ceiling: 500  ", 1))
    assert run("-w", ws, "budget").exit_code == 0  # rotating early is a choice: taken, and said
    warned = ("WARNING: budget.ceiling: 500 hot tokens is below the first band (2,000): walt is rotated while it "
              "still only routes, every few orders")
    assert warned in run("-w", ws, "doctor").output
    assert warned in run("-w", ws, "supervise", "--once").output


def test_an_id_chosen_at_the_top_of_the_assigned_range_leaves_later_orders_an_id(ws: Path, tmp_path: Path) -> None:
    # After an order named WO-999…9 (64 characters), every order sent without an id was given
    # WO-1000…0 (65 characters), which intake then rejected: nothing sent could run any more.
    top = "WO-" + "9" * 61
    chosen, later = tmp_path / "chosen.md", tmp_path / "later.md"
    chosen.write_text(_order(top, "The webapp greets a user"))
    later.write_text(_order("x", "The webapp thanks a user").replace("id: x\n", ""))
    assert run("-w", ws, "send", chosen, "--to", "chip").output == f"{top}\n"
    assert run("-w", ws, "supervise", "--once").exit_code == 0
    sent = run("-w", ws, "send", later, "--to", "chip")
    assert (sent.exit_code, sent.output) == (0, "WO-0001\n")
    assert run("-w", ws, "supervise", "--once").exit_code == 0
    board = {o["id"]: o["status"] for o in json.loads(run("-w", ws, "board", "--json").output)["orders"]}
    assert board == {top: "done", "WO-0001": "done"}
