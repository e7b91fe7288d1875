"""The command line as a user runs it: exit codes, exact messages, files on disk.

Most cases go through click's CliRunner against `coordinator.cli.cli`, whose group does
the same error handling as the installed script; the cases that prove no traceback ever
reaches stderr, and the ones that need a supervisor, run the real `coordinator` program.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner, Result

import coordinator
from coordinator.cli import cli
from coordinator.store import RecordCache, Store

COORDINATOR = str(Path(sys.executable).with_name("coordinator"))
DEMO_ORDERS = resources.files("coordinator.demo").joinpath("example-orders")
NO_WORKSPACE = "coordinator: no workspace: run `coordinator init` or pass -w\n"
BOARD_KEYS = {"id", "to", "from", "status", "objective", "attempts", "updated"}
BUDGET_KEYS = {"agent", "hot_tokens", "ceiling", "mode", "generation", "items"}


def run(*args: str | Path, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env)
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def program(*args: str | Path, cwd: Path | None = None, input: bytes | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed `coordinator` script as a real process."""
    done = subprocess.run([COORDINATOR, *map(str, args)], cwd=cwd, input=input.decode() if input else None,
                          capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "COORDINATOR_WORKSPACE"})
    assert "Traceback" not in done.stderr, done.stderr
    return done


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout


def inbox_entries(ws: Path, agent: str) -> list[str]:
    return sorted(os.listdir(ws / "inbox" / agent))  # dot-files included: none may be left


def order(objective: str, *, files: tuple[str, ...] = ("webapp/src/greeting.py",),
          branching: tuple[str, ...] = ("halt-with-note if the greeting already exists",),
          **front: object) -> str:
    head = "---\n" + yaml.safe_dump(front) + "---\n" if front else ""
    return (head + f"**Objective:** {objective}\n\n**Acceptance:**\n- The first thing holds\n"
            "- The second thing holds\n- `make test` passes\n\n**Files:**\n"
            + "".join(f"- {f}\n" for f in files) + "\n**Branching:**\n"
            + "".join(f"- {b}\n" for b in branching))


def statuses(ws: Path) -> dict[str, str]:
    data = json.loads(run("-w", ws, "board", "--json").stdout)
    return {o["id"]: o["status"] for o in data["orders"]}


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A fresh workspace made by `coordinator init`, with the demo team."""
    root = tmp_path / "team"
    assert run("init", root).exit_code == 0
    return root


@pytest.fixture(scope="module")
def worked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace where the supervisor has run two orders: WO-0001 done, WO-0002 halted."""
    root = tmp_path_factory.mktemp("worked") / "team"
    assert run("init", root).exit_code == 0
    assert run("-w", root, "send", "-", "--to", "chip",
               input=DEMO_ORDERS.joinpath("greeting.md").read_bytes()).stdout == "WO-0001\n"
    assert run("-w", root, "send", "-", "--to", "chip",
               input=order("The greeting already exists in the webapp")).stdout == "WO-0002\n"
    done = program("-w", root, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    return root


# -- init and the workspace -------------------------------------------------------------------------
def test_init_makes_the_workspace_layout(tmp_path: Path) -> None:
    root = tmp_path / "team"
    result = run("init", root)
    assert result.exit_code == 0
    assert "workspace ready at" in result.stdout
    assert (root / "coordinator.yaml").read_text().startswith("# coordinator.yaml")
    assert sorted(p.name for p in (root / "inbox").iterdir()) == ["chip", "rex", "walt"]
    assert git(root / "state", "rev-list", "--count", "HEAD").strip() == "1"
    assert git(root / "state", "status", "--porcelain") == ""
    assert git(root / "repos" / "webapp", "log", "--format=%s").strip()


def test_init_suggests_a_command_that_works_for_a_folder_with_a_space(tmp_path: Path) -> None:
    made = run("init", tmp_path / "my team")
    assert made.stdout.splitlines()[-1].endswith(f"next: `coordinator -w '{tmp_path / 'my team'}' supervise`")


@pytest.mark.parametrize(("args", "said"), [
    (("new", "--to"), "coordinator new: Option '--to' requires an argument. See `coordinator new -h`.\n"),
    (("gc", "--days", "abc"), "coordinator gc: Invalid value for '--days': 'abc' is not a valid number. See "
                              "`coordinator gc -h`.\n"),
    (("budget", "add", "5", "--note"),
     "coordinator budget add: Option '--note' requires an argument. See `coordinator budget add -h`.\n"),
    (("audit", "verify", "--bogus"),
     "coordinator audit verify: No such option '--bogus'. See `coordinator audit verify -h`.\n"),
])
def test_a_usage_error_names_the_command_and_what_was_expected(ws: Path, args: tuple[str, ...], said: str) -> None:
    refused = run("-w", ws, *args)
    assert (refused.exit_code, refused.stderr) == (2, said)


def test_init_refuses_an_existing_workspace_unless_forced(ws: Path) -> None:
    (ws / "coordinator.yaml").write_text("version: 1\nagents: {}\n")
    again = run("init", ws)
    assert again.exit_code == 1
    assert again.stderr == f"coordinator: {ws / 'coordinator.yaml'} already exists; pass --force to overwrite it\n"
    assert (ws / "coordinator.yaml").read_text() == "version: 1\nagents: {}\n"
    forced = run("init", ws, "--force")
    assert forced.exit_code == 0
    assert "walt" in (ws / "coordinator.yaml").read_text()


def test_a_workspace_whose_path_is_not_utf8_is_refused_up_front(ws: Path, tmp_path: Path) -> None:
    """Its path is written into git's files and each brief as UTF-8: supervise took an order in,
    started it, and stopped with an internal error (UnicodeEncodeError), the order left running."""
    odd = os.fsdecode(bytes(tmp_path) + b"/team-\xff")
    shown = f"{tmp_path}/team-\\xff"
    made = program("init", odd)
    assert (made.returncode, made.stderr) == (
        2, f"coordinator: {shown} is not a UTF-8 path; the workspace's path is written into git's files and every "
           "brief: use a folder whose path is UTF-8\n")
    assert not os.path.exists(odd)
    os.rename(ws, odd)
    for args in (("board",), ("supervise", "--once"), ("send", "-", "--to", "chip")):
        refused = program("-w", odd, *args, input=order("The webapp greets a user by name").encode())
        assert (refused.returncode, refused.stderr) == (2, "coordinator: -w: " + made.stderr.removeprefix(
            "coordinator: ")), args
    assert os.listdir(os.path.join(odd, "inbox", "chip")) == []


@pytest.mark.parametrize("kind", ["folder", "fifo", "loop"])
def test_init_over_a_config_that_is_no_file_says_so_in_one_line_forced_or_not(tmp_path: Path, kind: str) -> None:
    """--force over a folder was an internal error, over a FIFO it waited forever, and a link to
    itself was an internal error either way."""
    root = tmp_path / "team"
    root.mkdir()
    spot = root / "coordinator.yaml"
    {"folder": spot.mkdir, "fifo": lambda: os.mkfifo(spot), "loop": lambda: spot.symlink_to(spot.name)}[kind]()
    for force in ((), ("--force",)):
        refused = program("init", root, *force, timeout=30)
        assert (refused.returncode, refused.stderr) == (
            2, f"coordinator: {spot} is not a regular file; move it away (init writes the workspace's config "
               "there)\n"), force
    assert sorted(os.listdir(root)) == ["coordinator.yaml"]


def test_init_where_no_file_can_be_written_says_so_in_one_line(tmp_path: Path) -> None:
    """`-w /proc/self init` (a kernel's folder that takes no files) was "internal error:
    FileNotFoundError", and a link loop on the way "internal error: RuntimeError"."""
    refused = program("-w", "/proc/self", "init")
    assert (refused.returncode, refused.stderr) == (
        2, "coordinator: cannot write /proc/self/coordinator.yaml: No such file or directory: make the workspace "
           "in a folder of a disk this user may write in\n")
    (tmp_path / "loop").symlink_to("loop")
    said = (f"{tmp_path / 'loop' / 'team'}: a symbolic link on the way leads back to itself; pass a folder "
            "reached through no such link\n")
    assert program("init", tmp_path / "loop" / "team").stderr == "coordinator: " + said
    for args in (("init",), ("board",)):
        refused = program("-w", tmp_path / "loop" / "team", *args)
        assert (refused.returncode, refused.stderr) == (2, "coordinator: " + ("-w: " if args == ("board",) else "")
                                                        + said), args


@pytest.mark.parametrize("spot", ["inbox", "state", "inbox/chip", ".coordinator"])
def test_init_where_a_file_stands_for_a_folder_says_so_and_writes_nothing(tmp_path: Path, spot: str) -> None:
    """It was "internal error: FileExistsError", with coordinator.yaml already written, so that
    init run again after the file was moved refused for it ("already exists")."""
    root = tmp_path / "team"
    (root / spot).parent.mkdir(parents=True)
    (root / spot).write_text("mine")
    refused = run("init", root)
    assert (refused.exit_code, refused.stderr) == (
        2, f"coordinator: {root / spot} is not a folder; the workspace needs a folder there: move it away and run "
           "init again\n")
    assert not (root / "coordinator.yaml").exists() and (root / spot).read_text() == "mine"
    (root / spot).unlink()
    assert run("init", root).exit_code == 0


def test_w_naming_a_fifo_says_it_is_no_folder_rather_than_advising_init_there(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    refused = run("-w", tmp_path / "fifo", "board")
    assert (refused.exit_code, refused.stderr) == (
        2, f"coordinator: -w: {tmp_path / 'fifo'} is a file, not a workspace folder\n")


def test_init_of_an_empty_directory_argument_makes_nothing_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`coordinator init "$TEAM"` with TEAM unset made the workspace in the current folder, and
    advised `coordinator -w '' supervise`, which -w then refused."""
    monkeypatch.chdir(tmp_path)
    refused = run("init", "")
    assert (refused.exit_code, refused.stderr) == (
        2, "coordinator init: DIRECTORY is empty (an unset variable?); name the folder, or leave it out to make the "
           "workspace in the current one. See `coordinator init -h`.\n")
    assert os.listdir(tmp_path) == []


def test_init_without_a_folder_uses_the_current_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run("init").exit_code == 0
    assert (tmp_path / "coordinator.yaml").is_file() and (tmp_path / "inbox" / "chip").is_dir()


def test_workspace_from_w_then_environment_then_upward_search(ws: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run("board").stdout == ""
    assert run("board").stderr == NO_WORKSPACE
    assert run("board").exit_code == 2
    assert run("-w", ws, "board").exit_code == 0
    assert run("board", env={"COORDINATOR_WORKSPACE": str(ws)}).exit_code == 0
    monkeypatch.chdir(ws / "repos" / "webapp" / "src")
    found = run("board", "--json")
    assert found.exit_code == 0 and json.loads(found.stdout) == {
        "orders": [], "supervisor": {"running": False, "pid": None}, "inboxes": {"walt": 0, "chip": 0, "rex": 0},
        "never_taken_in": []}
    missing = run("-w", elsewhere, "board")
    assert missing.exit_code == 2
    assert missing.stderr == (f"coordinator: -w: {elsewhere} has no coordinator.yaml; "
                              f"run `coordinator init {elsewhere}`\n")


def test_an_agent_given_twice_in_the_config_is_refused_not_silently_replaced(ws: Path) -> None:
    config = ws / "coordinator.yaml"
    text = config.read_text()
    first = text.splitlines().index("  chip:") + 1
    config.write_text(text + "  chip:\n    role: specialist\n    command: [\"true\"]\n")
    result = run("-w", ws, "board")
    assert (result.exit_code, result.stderr) == (
        2, f"coordinator: coordinator.yaml: agents.chip: given twice (lines {first} and {len(text.splitlines()) + 1}); "
           "keep one\n")


@pytest.mark.parametrize("name, why", [
    ("user", "the sender of orders dropped by hand"),
    ("coordinator", "the supervisor's own name in the audit trail"),
])
def test_an_agent_may_not_take_a_name_the_coordinator_uses_itself(ws: Path, name: str, why: str) -> None:
    config = ws / "coordinator.yaml"
    config.write_text(config.read_text() + f"  {name}:\n    role: specialist\n    command: [\"true\"]\n")
    said = f"coordinator.yaml: agents.{name}: {name!r} is reserved ({why}); pick another name"
    refused = run("-w", ws, "board")
    assert (refused.exit_code, refused.stdout, refused.stderr) == (2, "", f"coordinator: {said}\n")
    # doctor still reports the machine, says what is wrong with the team, and fails the same way
    diagnosed = run("-w", ws, "doctor")
    assert (diagnosed.exit_code, diagnosed.stderr) == (2, f"coordinator: {said}\n")
    assert diagnosed.stdout.splitlines()[0] == f"workspace: {ws}" and "git: git version" in diagnosed.stdout
    assert diagnosed.stdout.splitlines()[-1] == f"team: CANNOT BE READ — {said}"


@pytest.mark.parametrize("args, refused", [
    (("budget", "add", "99999999999"), "Invalid value for 'TOKENS': 99999999999 is not in the range 1<=x<=10000000"),
    (("budget", "add", "banana"), "Invalid value for 'TOKENS': 'banana' is not a whole number of tokens (like 1800 "
                                  "or 1,800)"),
    (("budget", "add", "1,5"), "'1,5' is not a whole number of tokens"),  # not 15
    (("budget", "add", "1,,8,,00"), "'1,,8,,00' is not a whole number of tokens"),
    (("budget", "add", "\u0661\u0662\u0663"), "is not a whole number of tokens"),  # Arabic-Indic digits
    (("gc", "--days", "-1"), "Invalid value for '--days': -1.0 is not in the range 0<=x<=36500"),
    (("supervise", "--grace", "-5"), "Invalid value for '--grace': -5.0 is not in the range 0<=x<=604800"),
    (("supervise", "--grace", "1e308"), "Invalid value for '--grace': 1e+308 is not in the range 0<=x<=604800"),
])
def test_numbers_out_of_range_are_refused_with_the_range(ws: Path, args: tuple[str, ...], refused: str) -> None:
    done = program("-w", ws, *args, timeout=20)  # a supervise that took -5 would run: the timeout fails it
    assert done.returncode == 2 and refused in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_file_name_with_a_newline_is_said_on_one_line(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ws)
    (ws / "bad\nname.md").write_text("not an order\n")
    result = run("validate", "bad\nname.md", "--to", "chip")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("bad\\x0aname.md") for line in lines), result.stderr
    missing = run("send", "gone\nfile.md", "--to", "chip")
    assert (missing.exit_code, missing.stderr) == (2, "coordinator: gone\\x0afile.md: no such file\n")
    (ws / "inbox" / "chip" / "two\nlines.md").write_text(order("The greeting already exists in the webapp"))
    assert run("supervise", "--once").exit_code == 0
    (rec,) = Store(ws / "state").load_all().values()
    assert rec.source == "inbox/chip/two\\x0alines.md"


def test_an_empty_id_is_no_order_not_all_of_them(ws: Path) -> None:
    for args in (("log", ""), ("show", "")):
        refused = run("-w", ws, *args)
        assert (refused.exit_code, refused.stderr) == (1, "coordinator: no order ''; `coordinator board` lists them\n")


def test_budget_add_reads_thousands_grouped_by_commas_or_underscores(ws: Path) -> None:
    assert run("-w", ws, "budget", "add", "1,800").stdout.startswith("1,800 hot tokens")
    assert run("-w", ws, "budget", "add", "1_200").stdout.startswith("3,000 hot tokens")


def test_show_and_log_take_ids_not_paths_out_of_state(ws: Path) -> None:
    (ws / "state" / "orders").mkdir(exist_ok=True)  # as in any workspace that has run orders
    outside = ws / "elsewhere"  # state/orders/../../elsewhere
    outside.mkdir()
    (outside / "record.json").write_text(json.dumps({
        "id": "planted", "to": "chip", "sender": "user", "status": "done", "objective": "Planted",
        "created": "2026-01-01T00:00:00.000Z", "updated": "2026-01-01T00:00:00.000Z", "seq": 1}))
    for args in (("show", "../../elsewhere"), ("show", "../orders/x"), ("log", "../../elsewhere")):
        result = run("-w", ws, *args)
        assert (result.exit_code, result.stderr) == (1, f"coordinator: no order {args[1]!r}; `coordinator board` "
                                                        "lists them\n")


def test_doctor_outside_a_workspace_checks_the_machine(tmp_path: Path) -> None:
    done = program("doctor", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "workspace: none here (the machine only; `coordinator init` makes one)"
    assert any(line.startswith("landlock: ") for line in lines) and any(line.startswith("git: ") for line in lines)
    assert not any(line.startswith("team: ") for line in lines)
    named = program("-w", tmp_path / "nowhere", "doctor", cwd=tmp_path)  # named on purpose: still an error
    assert named.returncode == 2 and "has no coordinator.yaml" in named.stderr


def test_a_bad_config_stops_every_command_with_one_line_naming_the_key(ws: Path) -> None:
    text = (ws / "coordinator.yaml").read_text()
    (ws / "coordinator.yaml").write_text(text.replace('writes: ["webapp/docs/reviews/**"]', "writes: 5"))
    for args in (["board"], ["send", "x.md", "--to", "chip"], ["budget"], ["new", "--to", "chip"]):
        result = run("-w", ws, *args)
        assert result.exit_code == 2
        assert result.stderr == "coordinator: coordinator.yaml: agents.rex.writes: must be a list, not the number 5\n"


@pytest.mark.parametrize("glob, said", [
    ("[z-a]", "has a bad set '[z-a]' (bad character range z-a)"),
    ("[]", "has an empty set '[]'"),
    ("[!]", "has an empty set '[!]'"),
])
def test_a_malformed_glob_set_in_writes_stops_every_command_with_one_line(ws: Path, glob: str, said: str) -> None:
    text = (ws / "coordinator.yaml").read_text()
    (ws / "coordinator.yaml").write_text(text.replace('writes: ["webapp/docs/reviews/**"]',
                                                      f'writes: ["webapp/docs/{glob}"]'))
    for args in (["board"], ["send", "-", "--to", "chip"], ["validate", "-", "--to", "chip"], ["budget"],
                 ["supervise", "--once"]):
        result = run("-w", ws, *args, input=order("The greeting already exists in the webapp"))
        assert (result.exit_code, result.stderr) == (
            2, f"coordinator: coordinator.yaml: agents.rex.writes.0: 'webapp/docs/{glob}' {said} in a glob; "
               "write a set such as [a-z] or [!0-9]\n"), args


@pytest.mark.parametrize("change, said", [
    ("agents.chip.command = []", "agents.chip.command: must not be empty"),
    ("version = 2", "version: must be 1, not 2"),
    ("budget.bands = [1, 2]", "budget.bands: has 2 entries; it needs at least 3"),
    ("max_parallel = 0", "max_parallel: must be at least 1, not 0"),
    ("agents.chip.sends_to = ['rex', 'rex']", "agents.chip.sends_to: lists 'rex' twice; give each once"),
    ("agents.Chip = agents.chip", "agents: 'Chip' is not an agent name (a lowercase letter, then up to 31 "
                                  "lowercase letters, digits, '-' or '_')"),
    ("agents.chip.description = date", "agents.chip.description: must be a string, not the date 2026-01-01 (put "
                                       "it in quotes to mean text)"),
    ("date = 5", "2026-01-01: unknown key '2026-01-01'; allowed keys: agents, budget, defaults, escalate_to, "
                 "max_parallel, orchestrator, spend_limit, version"),
    # A typo is named with the key it was likely meant to be, as in a work order or a result file.
    ("agents.chip.timout = '5m'", "agents.chip.timout: unknown key 'timout'; did you mean 'timeout'? allowed keys: "
                                  "command, description, env, llm, max_failures, max_parallel, role, sandbox, "
                                  "sends_to, spend_limit, stale_after, timeout, writes"),
    ("budget.celing = 5000", "budget.celing: unknown key 'celing'; did you mean 'ceiling'? allowed keys: bands, "
                             "ceiling, on_ceiling"),
])
def test_config_errors_are_said_in_words_not_jsonschemas(ws: Path, change: str, said: str) -> None:
    import ast
    import datetime

    data = yaml.safe_load((ws / "coordinator.yaml").read_text())
    where, value = change.split(" = ")
    *path, last = where.split(".")
    node = data
    for part in path:
        node = node[part]
    day = datetime.date(2026, 1, 1)
    if last == "date":
        node[day] = 5
    else:
        node[last] = day if value == "date" else data["agents"]["chip"] if value == "agents.chip" else ast.literal_eval(value)
    (ws / "coordinator.yaml").write_text(yaml.safe_dump(data))
    result = run("-w", ws, "board")
    assert (result.exit_code, result.stderr) == (2, f"coordinator: coordinator.yaml: {said}\n")


@pytest.mark.parametrize("key, value, said", [
    ("timeout", ".nan", "agents.chip.timeout: nan is not a finite number; write one such as 20, or leave the key out"),
    ("stale_after", ".inf", "agents.chip.stale_after: inf is not a finite number; write one such as 20, or leave "
                            "the key out"),
    ("spend_limit", ".nan", "agents.chip.spend_limit: nan is not a finite number; write one such as 20, or leave "
                            "the key out"),
    ("timeout", "99999999999999999999h", "agents.chip.timeout: '99999999999999999999h' is longer than 30 days; "
                                         "give a duration up to 720h"),
])
def test_a_duration_or_number_with_no_limit_in_it_is_refused(ws: Path, key: str, value: str, said: str) -> None:
    """`timeout: .nan` passed the schema (nan compares false to every bound): attempts ran with no
    time limit at all, and NaN was written into the order's record in state/."""
    path = ws / "coordinator.yaml"
    path.write_text(path.read_text().replace("    max_parallel: 2\n", f"    max_parallel: 2\n    {key}: {value}\n"))
    for args in (["board"], ["supervise", "--once"]):
        result = run("-w", ws, *args)
        assert (result.exit_code, result.stderr) == (2, f"coordinator: coordinator.yaml: {said}\n"), args


def test_a_config_indented_with_a_tab_is_told_so(ws: Path) -> None:
    """PyYAML's own words were "found character that cannot start any token", naming no tab."""
    path = ws / "coordinator.yaml"
    text = path.read_text()
    path.write_text(text.replace("\n  walt:\n", "\n\twalt:\n"))
    line = text.split("\n  walt:\n")[0].count("\n") + 2
    result = run("-w", ws, "board")
    assert (result.exit_code, result.stderr) == (
        2, f"coordinator: coordinator.yaml: is not valid YAML at line {line}: it is indented with a tab; YAML "
           "indents with spaces\n")


def _alias_bomb(levels: int) -> str:
    rows = ["version: 1", "x0: &a0 [x, x, x, x, x, x, x, x, x]"]
    rows += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(rows) + f"\nagents: {{chip: {{role: specialist, command: *a{levels}}}}}\n"


@pytest.mark.parametrize("text, said", [
    (_alias_bomb(10), "uses the YAML alias *a3 at line 6, which makes it expand past 20000 values or 1 MiB; write "
                      "the values out in full"),
    ("version: 1\nagents: {chip: {role: specialist, command: [x], description: " + "[" * 5000 + "]" * 5000 + "}}\n",
     "nests deeper than 32 levels at line 2; a team config needs a few"),
    ("version: 1\nagents: &team {chip: {role: specialist, command: [x], sends_to: *team}}\n",
     "uses the YAML alias *team at line 2 inside the value it names (a loop); write the values out in full"),
    ("version: 1\nagents: {chip: {role: specialist, command: [x]}}\nx: [" + "1," * 20_000 + "]\n",
     "holds more than 20000 values (line 3); a team config needs far fewer"),
])
def test_a_config_that_would_expand_or_nest_without_end_is_refused_at_once(ws: Path, text: str, said: str) -> None:
    """A billion laughs in coordinator.yaml hung every command, and deep nesting was an internal error."""
    (ws / "coordinator.yaml").write_text(text)
    started = time.monotonic()
    result = program("-w", ws, "board", timeout=30)
    assert (result.returncode, result.stderr) == (2, f"coordinator: coordinator.yaml: {said}\n")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("where", ["state", ".coordinator", "inbox/chip", ".coordinator/supervisor.pid",
                                   ".coordinator/state-journal", ".coordinator/state-head"])
def test_a_file_where_the_workspace_needs_a_folder_stops_every_command_in_one_line(ws: Path, where: str) -> None:
    # (and a folder where it needs a file: at state-journal, "internal error: IsADirectoryError";
    # at state-head, the head it keeps for the tamper watch silently not kept)
    import shutil

    path = ws / where
    if where.startswith(".coordinator/"):
        path.parent.mkdir(exist_ok=True)
        path.unlink(missing_ok=True)
        path.mkdir()
        said = f"coordinator: {where} is a folder; remove it (the supervisor writes a file there)\n"
    else:
        if path.is_dir():
            shutil.rmtree(path)
        path.write_text("in the way\n")
        said = (f"coordinator: {where} is not a folder; the workspace needs a folder there: move it away "
                "(`coordinator supervise` makes what is missing)\n")
    for args in (["board"], ["send", "-", "--to", "chip"], ["supervise", "--once"], ["log"], ["budget", "add", "5"]):
        result = run("-w", ws, *args, input=order("The greeting already exists in the webapp"))
        assert (result.exit_code, result.stderr) == (2, said), (args, result.stderr)


def test_a_sandbox_grant_over_the_workspace_stops_every_command_not_each_order(ws: Path) -> None:
    config = ws / "coordinator.yaml"
    text = config.read_text()
    assert "  chip:\n" in text
    config.write_text(text.replace("  chip:\n", "  chip:\n    sandbox: {writable: [\"/\"]}\n", 1))
    for args in (["board"], ["send", "x.md", "--to", "chip"], ["supervise", "--once"]):
        result = run("-w", ws, *args)
        assert (result.exit_code, result.stderr) == (2, "coordinator: coordinator.yaml: agents.chip.sandbox.writable.0: "
                                                        f"/ would make {os.path.realpath(config)} writable; grant a "
                                                        "narrower folder outside the workspace and not your whole home\n")


def test_an_agent_with_both_a_command_and_a_model_is_told_to_keep_one(ws: Path) -> None:
    config = ws / "coordinator.yaml"
    text = config.read_text()
    assert "  rex:\n" in text
    config.write_text(text.replace("  rex:\n", "  rex:\n    llm: {model: some-model}\n", 1))
    result = run("-w", ws, "board")
    assert (result.exit_code, result.stderr) == (2, "coordinator: coordinator.yaml: agents.rex: has both 'command' "
                                                    "and 'llm'; an agent runs its command or calls its model (llm), "
                                                    "not both: remove one\n")


def test_no_order_sent_or_dropped_passes_for_the_supervisors_own(ws: Path) -> None:
    forged = order("The greeting already exists in the webapp", **{"from": "coordinator"})
    for args in (("validate", "-", "--to", "chip"), ("send", "-", "--to", "chip")):
        refused = run("-w", ws, *args, input=forged)
        assert refused.exit_code == 1 and "from: 'coordinator' is the supervisor's own name" in refused.stderr
    as_it = run("-w", ws, "send", "-", "--to", "chip", "--from", "coordinator", input=order("The footer exists"))
    assert (as_it.exit_code, as_it.stderr) == (2, "coordinator: --from coordinator: that is the supervisor's own "
                                                  "name; send as `user` or as an agent\n")
    ghost = run("-w", ws, "validate", "-", "--to", "chip", "--from", "ghost", input=order("The footer exists"))
    assert ghost.exit_code == 2 and ghost.stderr.startswith("coordinator: --from ghost: unknown agent; use `user`")
    (ws / "inbox" / "chip" / "forged.md").write_text(forged)
    assert run("-w", ws, "supervise", "--once").exit_code == 0
    assert statuses(ws) == {"WO-0001": "rejected"}


@pytest.mark.parametrize("value, said", [
    ("banana", "defaults.timeout: 'banana' is not a duration like 90s, 20m, 1.5h"),
    ("0", "defaults.timeout: 0 is not a number of seconds above 0"),
    ("[5m]", "defaults.timeout: must be a duration like 90s, 20m, 1.5h or a number of seconds above 0, not a list"),
])
def test_a_value_that_fits_none_of_its_forms_says_what_is_expected(ws: Path, value: str, said: str) -> None:
    config = ws / "coordinator.yaml"
    config.write_text(config.read_text().replace("  timeout: 5m ", f"  timeout: {value} ", 1))
    result = run("-w", ws, "board")
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"coordinator: coordinator.yaml: {said}\n")


# -- validate -----------------------------------------------------------------------------------------
def test_validate_several_files_reports_each_problem_with_file_line_and_field(ws: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ws)
    good = ws / "good.md"
    good.write_text(order("The webapp greets a user by name"))
    bad = ws / "inbox" / "chip" / "bad.md"
    bad.write_text(order("The webapp greets", files=("/etc/passwd",)).replace("- The second thing holds\n", ""))
    result = run("validate", "good.md", bad, "--to", "chip")
    assert result.exit_code == 1
    assert result.stdout == "good.md: ok (to chip, 1 check(s))\n"
    assert result.stderr.splitlines() == [
        "inbox/chip/bad.md:3: acceptance: has 2 items; a work order needs 3 to 5 testable items",
        "inbox/chip/bad.md:8: files.0: '/etc/passwd' is absolute; give a path relative to repos/ "
        "(e.g. webapp/src/x.py)",
    ]
    assert run("validate", "good.md", "--to", "chip").exit_code == 0


@pytest.mark.parametrize("text", ["---\nid: x\n---\n", "---\nid: x\n---\n\n", "---\nid: x\n---"])
def test_an_order_of_front_matter_alone_is_told_the_four_sections_at_their_line(ws: Path, text: str) -> None:
    # Read from stdin it was taken for YAML ("but found another document"); from a file, each
    # section was said missing with no line to look at.
    said = [f"{where}:4: {key}: is missing; add the **{key.title()}:** section" for where in ("<stdin>", "fm.md")
            for key in ("objective", "acceptance", "files", "branching")]
    (ws / "fm.md").write_text(text)
    for args, input in ((["-"], text), ([ws / "fm.md"], None)):
        checked = run("-w", ws, "validate", *args, "--to", "chip", input=input)
        assert checked.exit_code == 1
        lines = checked.stderr.replace(str(ws / "fm.md"), "fm.md").splitlines()
        assert [line[:line.index(" section") + 8] for line in lines] == (said[:4] if args == ["-"] else said[4:])
    sent = run("-w", ws, "send", "-", "--to", "chip", input=text)
    assert sent.exit_code == 1 and "found another document" not in sent.stderr
    assert sent.stderr.startswith("<stdin>:4: objective: is missing")
    # Objective alone missing: said where the order begins, the other sections still read.
    partial = "---\nid: x\n---\n" + order("x").split("\n", 2)[2]
    checked = run("-w", ws, "validate", "-", "--to", "chip", input=partial)
    assert checked.stderr.startswith("<stdin>:4: objective: is missing") and checked.stderr.count("\n") == 1


def test_validate_defaults_the_recipient_to_the_inbox_folder_the_file_is_in(ws: Path) -> None:
    for agent in ("chip", "rex"):
        (ws / "inbox" / agent / "o.md").write_text(order("The webapp greets a user by name"))
    assert run("-w", ws, "validate", ws / "inbox" / "chip" / "o.md").exit_code == 0
    as_rex = run("-w", ws, "validate", ws / "inbox" / "rex" / "o.md")
    assert as_rex.exit_code == 1
    assert as_rex.stderr.startswith("inbox/rex/o.md:9: files.0: 'webapp/src/greeting.py' is outside what "
                                    "rex may write (webapp/docs/reviews/**)")
    loose = ws / "loose.md"
    loose.write_text(order("The webapp greets a user by name"))
    nobody = run("-w", ws, "validate", loose)
    assert nobody.exit_code == 1
    assert "loose.md: to: no recipient; drop the file in inbox/<agent>/, pass --to AGENT" in nobody.stderr


def refused_by_validate_and_send(ws: Path, expected: str) -> None:
    """Both commands refuse ws/o.md for chip with `expected` on stderr, and nothing is sent."""
    for command in ("validate", "send"):
        result = run("-w", ws, command, ws / "o.md", "--to", "chip")
        assert (result.exit_code, result.stdout, result.stderr) == (1, "", expected)
    assert inbox_entries(ws, "chip") == []


@pytest.mark.parametrize("glob, said", [
    ("[z-a]", "has a bad set '[z-a]' (bad character range z-a)"),
    ("[]", "has an empty set '[]'"),
    ("x[!]", "has an empty set '[!]'"),
])
def test_validate_and_send_refuse_a_malformed_glob_set_and_a_supervisor_never_sees_it(
        ws: Path, glob: str, said: str) -> None:
    (ws / "o.md").write_text(order("The webapp greets a user by name", files=(f"webapp/src/{glob}",)))
    expected = (f"o.md:9: files.0: 'webapp/src/{glob}' {said} in a glob; write a set such as [a-z] or "
                "[!0-9]\n")
    refused_by_validate_and_send(ws, expected)
    # Dropped by hand, it is rejected at intake and the supervisor goes on.
    (ws / "inbox" / "chip" / "o.md").write_text((ws / "o.md").read_text())
    done = program("-w", ws, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    assert statuses(ws) == {"WO-0001": "rejected"}


@pytest.mark.parametrize("char", ["\x85", "\x9b", "\x07"])
def test_validate_and_send_refuse_a_control_character_in_files_c1_too(ws: Path, char: str) -> None:
    fields = {"objective": "The webapp greets a user by name",
              "acceptance": ["It greets", "It uses the name", "`make test` passes"],
              "files": [f"webapp/src/a{char}b.py"],
              "branching": [{"action": "halt-with-note", "when": "it already greets"}]}
    (ws / "o.json").write_text(json.dumps(fields))
    for command in ("validate", "send"):
        result = run("-w", ws, command, ws / "o.json", "--to", "chip")
        assert (result.exit_code, result.stdout, result.stderr) == (
            1, "", "o.json: files.0: contains a control character\n"), command
    assert inbox_entries(ws, "chip") == []


@pytest.mark.parametrize("bad_id", ["ab..cd", "x.lock", "trailing."])
def test_validate_and_send_refuse_an_id_that_cannot_name_a_branch(ws: Path, bad_id: str) -> None:
    (ws / "o.md").write_text(order("The webapp greets a user by name", id=bad_id))
    expected = (f"o.md:2: id: {bad_id!r} would name the order's git branch wo/{bad_id}, which git refuses "
                "(no '..', no trailing '.' or '.lock'); choose another id\n")
    refused_by_validate_and_send(ws, expected)


def test_validate_json_is_one_document(ws: Path) -> None:
    (ws / "a.md").write_text(order("The webapp greets a user by name"))
    (ws / "b.yaml").write_text("objective: x\n")
    result = run("-w", ws, "validate", ws / "a.md", ws / "b.yaml", "--to", "chip", "--json")
    assert result.exit_code == 1 and result.stderr == ""
    doc = json.loads(result.stdout)
    assert doc["valid"] is False
    assert [(f["file"], f["valid"]) for f in doc["files"]] == [("a.md", True), ("b.yaml", False)]
    assert {"acceptance", "files", "branching"} <= {p["field"] for p in doc["files"][1]["problems"]}
    assert all(p["line"] is None or isinstance(p["line"], int) for p in doc["files"][1]["problems"])


def test_validate_says_a_missing_file_as_send_does_and_exits_2(ws: Path) -> None:
    missing = run("-w", ws, "validate", ws / "nothing.md", "--to", "chip")
    sent = run("-w", ws, "send", ws / "nothing.md", "--to", "chip")
    assert (missing.exit_code, missing.stdout, missing.stderr) == (2, "", "coordinator: nothing.md: no such file\n")
    assert (sent.exit_code, sent.stderr) == (missing.exit_code, missing.stderr)


def test_validate_reports_every_file_and_a_missing_one_outranks_an_invalid_one(ws: Path) -> None:
    (ws / "good.md").write_text(order("The webapp greets a user by name"))
    (ws / "bad.md").write_text(order("The webapp greets a user by name", files=("/etc/passwd",)))
    files = [ws / "good.md", ws / "nothing.md", ws / "bad.md"]
    result = run("-w", ws, "validate", *files, "--to", "chip")
    assert result.exit_code == 2
    assert result.stdout == "good.md: ok (to chip, 1 check(s))\n"
    assert result.stderr.splitlines() == [
        "coordinator: nothing.md: no such file",
        "bad.md:9: files.0: '/etc/passwd' is absolute; give a path relative to repos/ (e.g. webapp/src/x.py)",
    ]
    as_json = run("-w", ws, "validate", *files, "--to", "chip", "--json")
    assert (as_json.exit_code, as_json.stderr) == (2, "")
    doc = json.loads(as_json.stdout)
    assert doc["valid"] is False
    assert [(f["file"], f["valid"], f["readable"]) for f in doc["files"]] == [
        ("good.md", True, True), ("nothing.md", False, False), ("bad.md", False, True)]
    assert doc["files"][1]["problems"][0]["message"] == "nothing.md: no such file"


NOT_REGULAR = "is not a regular file (a FIFO, socket or device); only files are work orders"


def test_validate_checks_every_file_and_says_a_folder_or_fifo_for_that_file(ws: Path) -> None:
    (ws / "good.md").write_text(order("The webapp greets a user by name"))
    (ws / "adir").mkdir()
    os.mkfifo(ws / "pipe.md")
    files = [ws / "good.md", ws / "adir", ws / "pipe.md"]
    # A real process: on a FIFO with no writer, reading would wait forever (the timeout says so).
    result = program("-w", ws, "validate", *files, "--to", "chip", timeout=20)
    assert result.returncode == 2
    assert result.stdout == "good.md: ok (to chip, 1 check(s))\n"
    assert result.stderr.splitlines() == [
        "coordinator: adir: is a folder, not a work order",
        f"coordinator: pipe.md: {NOT_REGULAR}; to send what a program writes, pipe it to `-`"]
    as_json = program("-w", ws, "validate", *files, "--to", "chip", "--json", timeout=20)
    assert (as_json.returncode, as_json.stderr) == (2, "")
    assert [(f["file"], f["valid"], f["readable"]) for f in json.loads(as_json.stdout)["files"]] == [
        ("good.md", True, True), ("adir", False, False), ("pipe.md", False, False)]


def test_send_refuses_a_fifo_or_folder_up_front_and_writes_nothing(ws: Path) -> None:
    (ws / "adir").mkdir()
    os.mkfifo(ws / "pipe.md")
    fifo = program("-w", ws, "send", ws / "pipe.md", "--to", "chip", timeout=20)
    folder = program("-w", ws, "send", ws / "adir", "--to", "chip", timeout=20)
    assert (fifo.returncode, fifo.stderr) == (
        2, f"coordinator: pipe.md: {NOT_REGULAR}; to send what a program writes, pipe it to `-`\n")
    assert (folder.returncode, folder.stderr) == (2, "coordinator: adir: is a folder, not a work order\n")
    assert inbox_entries(ws, "chip") == []


def test_validate_dot_slash_dash_is_the_file_named_dash_not_stdin(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "-").write_text(order("The webapp greets a user by name"))
    monkeypatch.chdir(ws)
    named = run("-w", ws, "validate", "./-", "--to", "chip", input="")
    assert named.stderr == "-: is a file without a suffix; a work order is a .md, .markdown, .yaml, .yml or .json file\n"


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))
HOSTILE = {
    "big.md": (b"a" * (2 * 1024 * 1024), "big.md: is 2.0 MiB; a work order is at most 256 KiB"),
    "binary.md": (bytes(range(256)) * 16, "binary.md: is binary (it holds NUL bytes)"),
    "empty.md": (b"", "empty.md: is empty; write a work order (`coordinator new --to AGENT`"),
    "laughs.yaml": (BILLION_LAUGHS.encode(), "laughs.yaml:4: uses a YAML alias (*c) that makes it expand past 5000 "
                    "values or 256 KiB"),
    "latin1.md": ("**Objective:** caf\xe9".encode("latin-1"), "latin1.md: is not UTF-8 text"),
}


def test_an_order_a_byte_over_the_limit_is_said_to_be_over_it_everywhere(ws: Path) -> None:
    text = order("The webapp greets a user by name")
    data = (text + "\n<!--" + "x" * (256 * 1024 - len(text) - 8) + "-->\n").encode()
    assert len(data) == 256 * 1024 + 1
    said = "is over 256 KiB; a work order is at most 256 KiB: move the details into files it names"
    (ws / "big.md").write_bytes(data)
    checked = run("-w", ws, "validate", ws / "big.md", "--to", "chip")
    assert (checked.exit_code, checked.stderr) == (1, f"big.md: {said}\n")
    piped = run("-w", ws, "send", "-", "--to", "chip", input=data)
    assert (piped.exit_code, piped.stderr) == (1, f"<stdin>: {said}\n")
    (ws / "inbox" / "chip" / "big.md").write_bytes(data)  # dropped by hand: intake says the same
    assert program("-w", ws, "supervise", "--once").returncode == 0
    errors = [line for line in run("-w", ws, "show", "WO-0001").stdout.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: inbox/chip/big.md: {said}"]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_one_line_and_exit_1(ws: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data, message = HOSTILE[name]
    (ws / name).write_bytes(data)
    monkeypatch.chdir(ws)
    result = run("validate", name, "--to", "chip")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    sent = run("send", name, "--to", "chip")
    assert sent.exit_code == 1 and sent.stderr == result.stderr
    assert inbox_entries(ws, "chip") == []


# -- send and new ---------------------------------------------------------------------------------------
def test_a_read_only_inbox_is_said_to_be_read_only_and_uses_up_no_id(ws: Path) -> None:
    """A real read-only mount (a bind mount in a user namespace of its own), not a full disk."""
    (ws / "fix.md").write_text(order("The footer exists"))
    inbox = ws / "inbox" / "chip"
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -w "$3" send "$4" --to chip'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(inbox), COORDINATOR, str(ws),
                           str(ws / "fix.md")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(r"coordinator: read-only file system writing \S+/inbox/chip/\S+: the workspace must be "
                        r"writable; remount it read-write or use a workspace on a writable disk\n", done.stderr)
    assert run("-w", ws, "send", ws / "fix.md", "--to", "chip").stdout == "WO-0001\n"


def test_an_order_too_long_to_pass_in_one_argument_is_refused_before_it_runs(ws: Path) -> None:
    """Linux takes at most 128 KiB in one argument: a brief passed as {brief_text} over that
    could never start (every attempt failed "Argument list too long", then it was escalated)."""
    config = yaml.safe_load((ws / "coordinator.yaml").read_text())
    config["agents"]["chip"]["command"] = ["/bin/sh", "-c", 'test -n "$1"', "sh", "{brief_text}"]
    (ws / "coordinator.yaml").write_text(yaml.safe_dump(config))
    long_item = "The page says " + "very " * 24_000 + "clearly"  # 120 KiB on one line
    (ws / "big.md").write_text(order("The webapp greets a user by name").replace("The first thing holds", long_item))
    (ws / "fits.md").write_text(order("The webapp greets a user by name").replace("The first thing holds",
                                                                                     long_item[:90_000]))
    said = ("big.md: its brief is 117 KiB, passed whole in one argument of chip's command ({brief_text}); "
            "Linux takes at most 128 KiB in one argument, less 16 KiB kept for a retry's notes: shorten the "
            "order, or have the command read the brief from its file ({brief} or $COORD_BRIEF)\n")
    refused = run("-w", ws, "validate", ws / "big.md", ws / "fits.md", "--to", "chip")
    assert (refused.exit_code, refused.stderr) == (1, said)
    assert refused.stdout == "fits.md: ok (to chip, 1 check(s))\n"
    assert run("-w", ws, "send", ws / "big.md", "--to", "chip").stderr == said
    (ws / "inbox" / "chip" / "big.md").write_bytes((ws / "big.md").read_bytes())  # by hand: intake says it
    done = program("-w", ws, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    shown = json.loads(run("-w", ws, "show", "WO-0001", "--json").stdout)
    assert shown["status"] == "rejected" and shown["attempts"] == 0
    config["agents"]["chip"]["command"] = ["/bin/sh", "-c", 'test -s "$1"', "sh", "{brief}"]
    (ws / "coordinator.yaml").write_text(yaml.safe_dump(config))
    again = (ws / "big.md").read_text().replace("a user by name", "a user by nickname")  # no repeat of WO-0001
    assert run("-w", ws, "validate", "-", "--to", "chip", input=again).exit_code == 0


def test_send_prints_the_id_and_leaves_exactly_one_visible_file(ws: Path) -> None:
    (ws / "fix.md").write_text(order("The webapp greets a user by name"))
    result = run("-w", ws, "send", ws / "fix.md", "--to", "chip")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "WO-0001\n", "")
    assert inbox_entries(ws, "chip") == ["WO-0001.md"]
    dropped = (ws / "inbox" / "chip" / "WO-0001.md").read_text()
    assert dropped.startswith("---\n") and "id: WO-0001" in dropped and "from: user" in dropped
    assert run("-w", ws, "validate", ws / "inbox" / "chip" / "WO-0001.md").exit_code == 0
    assert run("-w", ws, "send", ws / "fix.md", "--to", "chip").stdout == "WO-0002\n"
    assert inbox_entries(ws, "chip") == ["WO-0001.md", "WO-0002.md"]


def test_an_invalid_order_is_refused_and_nothing_is_written(ws: Path) -> None:
    (ws / "fix.md").write_text(order("The webapp greets", files=("webapp/../etc/passwd",)))
    result = run("-w", ws, "send", ws / "fix.md", "--to", "chip")
    assert result.exit_code == 1 and result.stdout == ""
    assert "fix.md:9: files.0: 'webapp/../etc/passwd' contains '..'" in result.stderr
    assert inbox_entries(ws, "chip") == []
    unknown = run("-w", ws, "send", ws / "fix.md", "--to", "zed")
    assert unknown.exit_code == 2
    assert unknown.stderr == "coordinator: unknown agent 'zed'; the agents are chip, rex, walt\n"
    # validate says the same, as a usage error too, before reading any file
    checked = run("-w", ws, "validate", ws / "fix.md", ws / "missing.md", "--to", "zed")
    assert (checked.exit_code, checked.stdout, checked.stderr) == (2, "", unknown.stderr)


def test_a_link_to_itself_is_a_file_that_cannot_be_read_not_an_internal_error(ws: Path) -> None:
    (ws / "loop.md").symlink_to("loop.md")
    for args in (("validate", ws / "loop.md"), ("send", ws / "loop.md", "--to", "chip")):
        result = run("-w", ws, *args)
        assert (result.exit_code, result.stderr) == (
            2, "coordinator: loop.md: cannot read: Too many levels of symbolic links\n"), result.stderr


@pytest.mark.parametrize("stdin", ["closed", "write-only"])
def test_dash_with_no_stdin_to_read_is_said_in_one_line(ws: Path, stdin: str) -> None:
    """`coordinator send - <&-` was an internal error (no sys.stdin), and so was a stdin opened only
    for writing (EBADF)."""
    def no_stdin() -> None:
        os.close(0)
        if stdin == "write-only":
            os.set_inheritable(os.open(ws / "scratch", os.O_WRONLY | os.O_CREAT), True)  # takes fd 0

    reason = "standard input is closed" if stdin == "closed" else "cannot read: Bad file descriptor"
    for command in ("send", "validate"):
        done = subprocess.run([COORDINATOR, "-w", str(ws), command, "-", "--to", "chip"], capture_output=True,
                              text=True, timeout=60, preexec_fn=no_stdin)
        assert (done.returncode, done.stderr) == (
            2, f"coordinator: <stdin>: {reason}; pipe the order in, or name its file instead of -\n"), command
    assert inbox_entries(ws, "chip") == []


def test_validate_dash_reads_the_order_from_stdin(ws: Path) -> None:
    draft = run("-w", ws, "new", "--to", "chip").stdout
    unfilled = run("-w", ws, "validate", "-", input=draft)
    assert unfilled.exit_code == 1 and "<stdin>:" in unfilled.stderr
    assert "objective: still holds the template placeholder" in unfilled.stderr
    good = run("-w", ws, "validate", "-", "--to", "chip", input=order("The webapp greets a user by name"))
    assert (good.exit_code, good.stdout) == (0, "<stdin>: ok (to chip, 1 check(s))\n"), good.stderr


@pytest.mark.parametrize("form", ["markdown", "yaml", "yaml-flow", "json"])
def test_send_dash_reads_the_order_from_stdin_in_any_form(ws: Path, form: str) -> None:
    fields = {"objective": "The webapp greets a user by name",
              "acceptance": ["It greets", "It uses the name", "`make test` passes"],
              "files": ["webapp/src/greeting.py"],
              "branching": [{"action": "halt-with-note", "when": "it already greets"}]}
    text = {"markdown": order(str(fields["objective"])), "yaml": yaml.safe_dump(fields),
            "yaml-flow": yaml.safe_dump(fields, default_flow_style=True), "json": json.dumps(fields)}[form]
    assert form != "yaml-flow" or text.startswith("{acceptance: [")
    result = run("-w", ws, "send", "-", "--to", "chip", input=text)
    assert (result.exit_code, result.stdout, result.stderr) == (0, "WO-0001\n", "")
    assert inbox_entries(ws, "chip") == ["WO-0001.md"]
    stdin_error = run("-w", ws, "send", "-", "--to", "chip", input="objective: only this\n")
    assert stdin_error.exit_code == 1
    assert stdin_error.stderr.startswith("<stdin>:")


def test_send_from_stamps_the_sender_and_refuses_one_that_may_not_send(ws: Path) -> None:
    (ws / "fix.md").write_text(order("The webapp greets a user by name"))
    stamped = run("-w", ws, "send", ws / "fix.md", "--to", "chip", "--from", "walt")
    assert stamped.stdout == "WO-0001\n"
    assert "from: walt" in (ws / "inbox" / "chip" / "WO-0001.md").read_text()
    refused = run("-w", ws, "send", ws / "fix.md", "--to", "chip", "--from", "chip")
    assert refused.exit_code == 1
    assert refused.stderr == "fix.md: from: chip may not send to chip (it sends to: rex)\n"
    assert inbox_entries(ws, "chip") == ["WO-0001.md"]


def test_send_takes_the_recipient_from_the_file_when_not_given(ws: Path) -> None:
    (ws / "fix.md").write_text(order("The webapp greets a user by name", to="chip", id="greet"))
    assert run("-w", ws, "send", ws / "fix.md").stdout == "greet\n"
    assert inbox_entries(ws, "chip") == ["greet.md"]
    again = run("-w", ws, "send", ws / "fix.md")
    assert again.exit_code == 1
    assert again.stderr == ("fix.md:2: id: 'greet' is already waiting in inbox/chip/greet.md; pick another id "
                            "or leave it out to get one assigned\n")


def test_two_sends_of_one_id_at_once_never_replace_the_order_placed_first(
        ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both pass validation before either is in the inbox; the second must not rename its file
    over the first's (each was told it was sent, and one order was gone)."""
    from coordinator import durable, sending
    first = order("The webapp greets a user by name", to="chip", id="greet")
    (ws / "fix.md").write_text(order("The webapp greets a user by nickname", to="chip", id="greet"))
    write = durable.write_bytes

    def other_sender_lands_meanwhile(path: Path, data: bytes) -> None:
        (ws / "inbox" / "chip" / "greet.md").write_text(first)
        write(path, data)

    monkeypatch.setattr(sending.durable, "write_bytes", other_sender_lands_meanwhile)
    late = run("-w", ws, "send", ws / "fix.md")
    assert (late.exit_code, late.stdout, late.stderr) == (
        1, "", "fix.md:2: id: 'greet' is already waiting in inbox/chip/greet.md; pick another id or leave it out "
               "to get one assigned\n")
    assert inbox_entries(ws, "chip") == ["greet.md"]
    assert (ws / "inbox" / "chip" / "greet.md").read_text() == first


def test_an_order_sent_right_after_another_may_wait_for_it_before_any_supervisor_ran(ws: Path) -> None:
    assert run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting exists", id="aaa")).stdout == "aaa\n"
    second = run("-w", ws, "send", "-", "--to", "chip", input=order("The footer exists", blocked_by=["aaa"]))
    assert second.exit_code == 0, second.stderr
    assert run("-w", ws, "validate", "-", "--to", "chip",
               input=order("The header exists", blocked_by=["aaa"])).exit_code == 0
    missing = run("-w", ws, "validate", "-", "--to", "chip", input=order("The menu exists", blocked_by=["zzz"]))
    assert missing.exit_code == 1 and "no order 'zzz' in this workspace" in missing.stderr


NEVER_DONE = ("blocked_by.{}: bad ended rejected: it will never be done, so this order would wait forever; "
              "drop it from blocked_by")


def test_validate_of_stdin_named_twice_says_so_not_that_it_is_empty(ws: Path) -> None:
    checked = run("-w", ws, "validate", "-", "-", "--to", "chip", input=order("The footer exists"))
    assert (checked.exit_code, checked.stdout, checked.stderr) == (
        2, "<stdin>: ok (to chip, 1 check(s))\n",
        "coordinator: <stdin>: - is named more than once; standard input holds one order\n")


def test_send_and_validate_refuse_an_order_waiting_on_one_that_ended_rejected(ws: Path) -> None:
    # Validate said ok, send printed an id, and intake then blocked the order at once: it never ran.
    (ws / "inbox" / "chip" / "bad.md").write_text("---\nid: bad\n---\n**Objective:** x\n")
    assert program("-w", ws, "supervise", "--once").returncode == 0
    assert statuses(ws) == {"bad": "rejected"}
    waits = order("The footer exists", blocked_by=["bad"])
    checked = run("-w", ws, "validate", "-", "--to", "chip", input=waits)
    assert (checked.exit_code, checked.stderr) == (1, f"<stdin>:3: {NEVER_DONE.format(0)}\n")
    (ws / "waits.md").write_text(waits)
    sent = run("-w", ws, "send", ws / "waits.md", "--to", "chip")
    assert (sent.exit_code, sent.stdout, sent.stderr) == (1, "", f"waits.md:3: {NEVER_DONE.format(0)}\n")
    assert inbox_entries(ws, "chip") == []
    as_json = json.loads(run("-w", ws, "validate", ws / "waits.md", "--to", "chip", "--json").stdout)
    assert [p["field"] for p in as_json["files"][0]["problems"]] == ["blocked_by.0"]
    # Dropped into an inbox by hand, it is taken in and blocked, as before.
    shutil.move(ws / "waits.md", ws / "inbox" / "chip" / "waits.md")
    assert program("-w", ws, "supervise", "--once").returncode == 0
    assert statuses(ws) == {"bad": "rejected", "WO-0001": "blocked"}


def test_send_never_assigns_an_id_an_order_waiting_in_an_inbox_names_for_itself(ws: Path) -> None:
    (ws / "inbox" / "chip" / "x.md").write_text(order("The greeting exists", id="WO-0001"))
    (ws / "inbox" / "rex" / "j.json").write_text(json.dumps({"id": "WO-0002", "objective": "x"}))
    sent = run("-w", ws, "send", "-", "--to", "chip", input=order("The footer exists"))
    assert sent.exit_code == 0, sent.stderr
    assert sent.stdout == "WO-0003\n"
    done = program("-w", ws, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    assert statuses(ws)["WO-0001"] != "rejected" and statuses(ws)["WO-0003"] != "rejected"


def test_orders_copied_into_an_inbox_together_may_wait_on_each_other_as_validate_says(ws: Path) -> None:
    inbox = ws / "inbox" / "chip"
    (inbox / "a.md").write_text(order("The footer exists", blocked_by=["zz"]))
    (inbox / "b.md").write_text(order("The header exists", id="zz"))
    os.utime(inbox / "a.md", (time.time() - 60, time.time() - 60))  # taken in first
    checked = run("-w", ws, "validate", inbox / "a.md", inbox / "b.md")
    assert (checked.exit_code, checked.stderr) == (0, "")
    done = program("-w", ws, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    assert statuses(ws) == {"WO-0001": "done", "zz": "done"}


CYCLE = "blocked_by: {} is a dependency cycle that would never run; drop one of these"


def test_validate_says_a_blocked_by_cycle_among_orders_waiting_in_inboxes_as_intake_says_it(ws: Path) -> None:
    inbox = ws / "inbox" / "chip"
    (inbox / "a.md").write_text(order("The footer exists", id="a", blocked_by=["b"]))
    (inbox / "b.md").write_text(order("The header exists", id="b", blocked_by=["a"]))
    os.utime(inbox / "a.md", (time.time() - 60, time.time() - 60))  # taken in first
    checked = run("-w", ws, "validate", inbox / "a.md", inbox / "b.md")
    assert (checked.exit_code, checked.stderr) == (1, f"inbox/chip/a.md:2: {CYCLE.format('a -> b -> a')}\n"
                                                      f"inbox/chip/b.md:2: {CYCLE.format('b -> a -> b')}\n")
    assert run("-w", ws, "validate", inbox / "b.md").stderr == f"inbox/chip/b.md:2: {CYCLE.format('b -> a -> b')}\n"
    done = program("-w", ws, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    assert Store(ws / "state").load("b").errors == [f"inbox/chip/b.md:2: {CYCLE.format('b -> a -> b')}"]


def test_send_refuses_an_order_that_closes_a_blocked_by_cycle_with_one_waiting_in_an_inbox(ws: Path) -> None:
    inbox = ws / "inbox" / "chip"
    (inbox / "a.md").write_text(order("The footer exists", id="a", blocked_by=["b"]))  # copied in by hand
    refused = run("-w", ws, "send", "-", "--to", "chip", input=order("The header exists", id="b", blocked_by=["a"]))
    assert (refused.exit_code, refused.stdout, refused.stderr) == (
        1, "", f"<stdin>:2: {CYCLE.format('b -> a -> b')}\n")
    assert inbox_entries(ws, "chip") == ["a.md"]
    # Waiting on it without closing a cycle is fine, as before.
    assert run("-w", ws, "send", "-", "--to", "chip", input=order("The menu exists", id="c",
                                                                   blocked_by=["a"])).exit_code == 0


def test_an_order_for_a_repository_that_is_not_there_is_refused_at_the_line_of_its_entry(ws: Path) -> None:
    shutil.rmtree(ws / "repos" / "webapp")
    said = "files.0: no repository 'webapp' under repos/; the first component of every path names one"
    (ws / "o.md").write_text(order("The greeting exists"))
    for args in (("validate", "-", "--to", "chip"), ("send", "-", "--to", "chip")):
        refused = run("-w", ws, *args, input=order("The greeting exists"))
        assert (refused.exit_code, refused.stderr) == (1, f"<stdin>:9: {said}\n"), refused.stderr
    refused_by_validate_and_send(ws, f"o.md:9: {said}\n")
    (ws / "inbox" / "chip" / "o.md").write_text(order("The greeting exists"))  # as intake says it
    done = program("-w", ws, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    (rec,) = Store(ws / "state").load_all().values()
    assert (rec.status, rec.errors) == ("rejected", [f"inbox/chip/o.md:9: {said}"])


def test_an_inbox_folder_that_is_a_link_is_refused_by_send_and_validate_and_said_by_the_supervisor(
        ws: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (ws / "inbox" / "chip").rmdir()
    (ws / "inbox" / "chip").symlink_to(elsewhere)
    said = ("coordinator: inbox/chip is a symbolic link; the supervisor never takes orders in through one, so an "
            "order sent there would never run: replace it with a folder\n")
    for command in ("validate", "send"):
        refused = run("-w", ws, command, "-", "--to", "chip", input=order("The webapp greets a user by name"))
        assert (refused.exit_code, refused.stdout, refused.stderr) == (2, "", said), command
    assert os.listdir(elsewhere) == []
    assert run("-w", ws, "send", "-", "--to", "rex", input=order(
        "The review is written", files=("webapp/docs/reviews/r.md",))).exit_code == 0  # other inboxes are fine
    (elsewhere / "dropped.md").write_text(order("The webapp greets a user by name"))
    done = program("-w", ws, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    warned = [line.split(" ", 1)[1] for line in done.stderr.splitlines() if "inbox/chip" in line]
    assert warned == ["WARNING: inbox/chip is a symbolic link: nothing in it is taken in (never through a link); "
                      "replace it with a folder"], done.stderr
    assert os.listdir(elsewhere) == ["dropped.md"] and set(statuses(ws).values()) == {"done"}


def test_send_refuses_a_file_that_sits_in_an_inbox_already(ws: Path) -> None:
    dropped = ws / "inbox" / "chip" / "twice.md"
    dropped.write_text(order("The webapp greets a user by name"))
    for extra in ((), ("--to", "rex")):
        result = run("-w", ws, "send", dropped, *extra)
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr == ("coordinator: inbox/chip/twice.md is in chip's inbox already: the supervisor "
                                 "takes it in from there (`coordinator validate` checks it; move it out of the "
                                 "inbox to send it elsewhere)\n")
    assert inbox_entries(ws, "chip") == ["twice.md"] and inbox_entries(ws, "rex") == []
    assert run("-w", ws, "validate", dropped).exit_code == 0


def test_new_prints_a_template_that_validates_once_filled_in(ws: Path) -> None:
    result = run("-w", ws, "new", "--to", "chip")
    assert result.exit_code == 0
    assert result.stdout.endswith("\n") and not result.stdout.endswith("\n\n")
    draft = ws / "fix.md"
    draft.write_text(result.stdout)
    before = run("-w", ws, "validate", draft)  # the recipient comes from the template's `to:`
    assert before.exit_code == 1
    assert "objective: still holds the template placeholder" in before.stderr
    filled = re.sub(r"<replace with the command that tests it>", "make test", result.stdout)
    said = iter(("the greeting shows the name", "the name is escaped", "an empty name is refused",
                 "the page still loads", "the log says who"))
    filled = re.sub(r"<describe [^>]*>", lambda _: next(said), filled)  # a different criterion each
    draft.write_text(filled)
    after = run("-w", ws, "validate", draft)
    assert (after.exit_code, after.stdout) == (0, "fix.md: ok (to chip, 1 check(s))\n"), after.stderr
    assert run("-w", ws, "send", draft).stdout == "WO-0001\n"
    unknown = run("-w", ws, "new", "--to", "zed")
    assert unknown.exit_code == 2 and "unknown agent 'zed'" in unknown.stderr


# -- the board and one order -----------------------------------------------------------------------------
def test_board_shows_orders_by_status(worked: Path) -> None:
    result = run("-w", worked, "board")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "2 order(s): done 1  halted 1"
    assert lines[1] == "supervisor: not running — `coordinator supervise` starts it"
    assert "DONE (1)" in lines and "HALTED (1)" in lines
    done_row = lines[lines.index("DONE (1)") + 1]
    assert re.fullmatch(r"  WO-0001  chip  user → The webapp greets a user by name\.", done_row)
    assert lines[lines.index("DONE (1)") + 2] == ""  # a done order needs no reason
    halted = lines[lines.index("HALTED (1)") + 1:]
    summary = Store(worked / "state").load("WO-0002").report["summary"]
    assert halted[1] == f"           ↳ {summary}"  # under the objective: why it halted


def test_board_counts_what_waits_in_the_inboxes_before_a_supervisor_files_it(ws: Path) -> None:
    """Sent with no supervisor running: the board must not say "none yet — drop a work order"."""
    assert run("-w", ws, "send", "-", "--to", "chip", input=DEMO_ORDERS.joinpath("greeting.md").read_bytes()
               ).stdout == "WO-0001\n"
    assert run("-w", ws, "send", "-", "--to", "chip", input=order("A second one")).stdout == "WO-0002\n"
    lines = run("-w", ws, "board").stdout.splitlines()
    assert lines[:3] == ["0 order(s): none filed yet",
                         "supervisor: not running — `coordinator supervise` starts it",
                         "inboxes: 2 file(s) not taken in yet (chip 2) — `coordinator supervise` takes them in"]
    assert json.loads(run("-w", ws, "board", "--json").stdout)["inboxes"]["chip"] == 2
    assert program("-w", ws, "supervise", "--once").returncode == 0
    board = run("-w", ws, "board").stdout
    assert "inboxes:" not in board and board.startswith("2 order(s): ")


def test_board_names_what_sits_in_an_inbox_and_is_never_taken_in(ws: Path) -> None:
    """A partial download, an editor's file or a folder dropped into an inbox never arrives:
    the board said nothing, and the user waited for an order that was never coming."""
    inbox = ws / "inbox" / "chip"
    hours_ago = time.time() - 3 * 3600
    for minutes, name in enumerate(("b.md.part", "notes.swp", "fix.md~", "fix.md.crdownload")):
        (inbox / name).write_text(order("The footer exists"))
        os.utime(inbox / name, (hours_ago, hours_ago - 60 * minutes))  # named oldest first
    (ws / "inbox" / "rex" / "drafts").mkdir()
    os.utime(ws / "inbox" / "rex" / "drafts", (hours_ago, hours_ago - 2 * 86400))
    (inbox / "new.md.part").write_text("still downloading")  # a minute old at most: may still be in use
    (inbox / ".hidden.md").write_text("a dot-file")
    lines = run("-w", ws, "board").stdout.splitlines()
    assert lines[2:4] == [
        "inbox/chip: 4 file(s) never taken in: fix.md.crdownload (3 h), fix.md~ (3 h), notes.swp (3 h) and 1 more "
        "(partial downloads, editor files and folders are skipped)",
        "inbox/rex: 1 file(s) never taken in: drafts/ (2 days) (partial downloads, editor files and folders are "
        "skipped)"]
    assert "new.md.part" not in run("-w", ws, "board").stdout
    assert json.loads(run("-w", ws, "board", "--json").stdout)["never_taken_in"] == lines[2:4]
    # A file that will be taken in is counted as before, and named in no such line.
    run("-w", ws, "send", "-", "--to", "chip", input=order("The header exists"))
    board = run("-w", ws, "board").stdout
    assert "inboxes: 1 file(s) not taken in yet (chip 1)" in board and "WO-0001" not in board


def test_board_lists_each_inbox_once_for_what_waits_and_what_never_arrives(
        ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The count of files waiting and the names of those never taken in come from one listing
    of each inbox (with thousands of files dropped, `board --watch` listed each one twice a
    second), and one rule, the supervisor's, says which are which."""
    inbox = ws / "inbox" / "chip"
    old = time.time() - 7200
    for name in ("a.md", "b.md.part", "c.md"):
        (inbox / name).write_text(order("The footer exists"))
        os.utime(inbox / name, (old, old))
    (inbox / "d.md").mkdir()  # an order's name on a folder: never taken in, and said so
    os.utime(inbox / "d.md", (old, old))
    listed: list[str] = []
    real = os.scandir

    def counting(path: Any = ".") -> Any:
        listed.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    lines = run("-w", ws, "board").stdout.splitlines()
    assert lines[2:4] == ["inboxes: 2 file(s) not taken in yet (chip 2) — `coordinator supervise` takes them in",
                          "inbox/chip: 2 file(s) never taken in: b.md.part (2 h), d.md/ (2 h) (partial "
                          "downloads, editor files and folders are skipped)"]
    assert sorted(p for p in listed if Path(p).parent == ws / "inbox") == sorted(
        str(ws / "inbox" / agent) for agent in ("chip", "rex", "walt"))


def test_board_names_an_inbox_folder_no_agent_has_when_files_sit_in_it(ws: Path) -> None:
    """`cp fix.md inbox/Chip/`: the order never arrived, and the board said nothing of why."""
    (ws / "inbox" / "Chip").mkdir()
    (ws / "inbox" / "Chip" / "fix.md").write_text(order("The footer exists"))
    (ws / "inbox" / "old").mkdir()  # empty: nothing lost there, nothing said
    lines = run("-w", ws, "board").stdout.splitlines()
    assert lines[2] == ("inbox/Chip/: 1 file(s) never taken in: no agent in coordinator.yaml has this inbox "
                        "(the agents: chip, rex, walt)")
    assert "inbox/old/" not in run("-w", ws, "board").stdout
    for n in range(5):
        (ws / "inbox" / f"x{n}").mkdir()
        (ws / "inbox" / f"x{n}" / "a.md").write_text("x")
    lines = run("-w", ws, "board").stdout.splitlines()
    assert [line.split(":")[0] for line in lines[2:6]] == ["inbox/Chip/", "inbox/x0/", "inbox/x1/", "inbox/"]
    assert lines[5] == "inbox/: 3 more folder(s) of no agent hold files never taken in"


def test_board_says_an_inbox_that_is_a_symbolic_link_takes_nothing_in(ws: Path, tmp_path: Path) -> None:
    """An inbox replaced by a link (to a synced folder, say): what is dropped there never
    arrives, and the board invited the user to drop orders into it."""
    shutil.rmtree(ws / "inbox" / "chip")
    (tmp_path / "synced").mkdir()
    (ws / "inbox" / "chip").symlink_to(tmp_path / "synced")
    (tmp_path / "synced" / "fix.md").write_text(order("The footer exists"))
    lines = run("-w", ws, "board").stdout.splitlines()
    assert lines[2] == ("inbox/chip is a symbolic link: nothing in it is taken in (never through a link); "
                        "replace it with a folder")


def test_board_shows_records_a_hand_edit_left_odd_without_failing(ws: Path) -> None:
    """`board` is where a user looks when something is wrong: a record whose report has an odd
    shape (edited by hand, from an older version) is shown, never a traceback."""
    odd = {"a": ("routed", {"follow_up": {"to": "rex"}}, []), "b": ("blocked", {"summary": "x", "follow_up": {"id": 5}}, []),
           "c": ("denied", {"offending": {"not": "a list"}, "summary": "no"}, []), "d": ("queued", None, [""]),
           "e": ("halted", ["not", "a", "dict"], []), "f": ("halted", "text", [])}
    for i, (oid, (status, report, failures)) in enumerate(odd.items()):
        folder = ws / "state" / "orders" / oid
        folder.mkdir(parents=True)
        (folder / "record.json").write_text(json.dumps({
            "id": oid, "to": "chip", "sender": "user", "status": status, "objective": f"Odd {oid}",
            "created": "2026-01-01T00:00:00.000Z", "updated": "2026-01-01T00:00:00.000Z", "seq": i + 1,
            "report": report, "failures": failures}))
    shown = run("-w", ws, "board")
    assert shown.exit_code == 0, shown.stderr
    doc = json.loads(run("-w", ws, "board", "--json").stdout)
    assert {o["id"]: o["reason"] for o in doc["orders"]} == {
        "a": "to rex as ?", "b": "x (escalated to ? as 5)", "c": "no", "d": "failed 1 time(s); last: ",
        "e": None, "f": None}


@contextlib.contextmanager
def board_watched_into(ws: Path, out: Path) -> Iterator[None]:
    """`coordinator board --watch` writing into `out` while the block runs; then Ctrl-C, which
    ends it with exit 0 and nothing on stderr."""
    with open(out, "w") as f:
        watching = subprocess.Popen([COORDINATOR, "-w", str(ws), "board", "--watch"], stdout=f,
                                    stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        watching.send_signal(signal.SIGINT)
        try:
            _, err = watching.communicate(timeout=30)
        finally:
            watching.kill()  # never left running past a failed test
            watching.wait()
    assert (watching.returncode, err) == (0, "")


def test_board_watch_started_in_the_background_still_stops_on_ctrl_c(ws: Path, tmp_path: Path) -> None:
    """A shell starts a background job (`coordinator board --watch > f &`, a CI script) with
    SIGINT ignored, and Python then leaves Ctrl-C ignored: `kill -INT` never stopped it."""
    out = tmp_path / "board.log"
    with open(out, "w") as f:
        watching = subprocess.Popen([COORDINATOR, "-w", str(ws), "board", "--watch"], stdout=f,
                                    stderr=subprocess.PIPE, text=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: "budget:" in out.read_text(), "the first board")
        watching.send_signal(signal.SIGINT)
        _, err = watching.communicate(timeout=10)
    finally:
        watching.kill()
        watching.wait()
    assert (watching.returncode, err) == (0, "")


@pytest.mark.slow  # some 5 s: `make test-slow`, and CI, run it
def test_board_watch_into_a_file_adds_a_board_only_when_it_changed(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "board.log"
    with board_watched_into(ws, out):
        wait_for(lambda: "budget:" in out.read_text(), "the first board")
        time.sleep(2.5)  # two more rounds, nothing changed: nothing added
        assert out.read_text().count("budget:") == 1
        assert run("-w", ws, "budget", "add", "500").exit_code == 0
        wait_for(lambda: out.read_text().count("budget:") == 2, "the changed board")
        time.sleep(1.5)
    text = out.read_text()
    assert text.count("budget:") == 2 and "walt 500/7,000" in text.split("\n---")[1]
    assert len(re.findall(r"^--- \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ---$", text, re.MULTILINE)) == 1


@pytest.mark.slow
def test_board_watch_into_a_file_adds_no_board_as_a_leftover_in_an_inbox_ages(ws: Path, tmp_path: Path) -> None:
    """A file never taken in is named by the board: its age going from 9 to 10 min is no change."""
    left = ws / "inbox" / "chip" / "fix.md.part"
    left.write_text("half a download")
    then = time.time() - 568  # "9 min" now, "10 min" within two seconds
    os.utime(left, (then, then))
    out = tmp_path / "board.log"
    with board_watched_into(ws, out):
        wait_for(lambda: "budget:" in out.read_text(), "the first board")
        time.sleep(3.5)
    text = out.read_text()
    assert text.count("budget:") == 1
    assert "inbox/chip: 1 file(s) never taken in: fix.md.part (partial downloads" in text


def test_board_watch_redraws_when_an_order_changes_status_or_goes(ws: Path, tmp_path: Path) -> None:
    for objective in ("The greeting already exists in the webapp", "The footer already exists in the webapp"):
        assert run("-w", ws, "send", "-", "--to", "chip", input=order(objective)).exit_code == 0
    assert run("-w", ws, "supervise", "--once").exit_code == 0
    assert statuses(ws) == {"WO-0001": "halted", "WO-0002": "halted"}
    out = tmp_path / "board.log"
    with board_watched_into(ws, out):
        wait_for(lambda: "HALTED (2)" in out.read_text(), "the first board")
        assert run("-w", ws, "retry", "WO-0001").exit_code == 0  # its record is rewritten
        wait_for(lambda: "QUEUED (1)" in out.read_text(), "the retried order on the board")
        shutil.rmtree(ws / "state" / "orders" / "WO-0002")  # an order's folder gone by hand
        wait_for(lambda: out.read_text().rsplit(" ---\n", 1)[-1].startswith("1 order(s): queued 1\n"),
                 "the board without the removed order")


def test_a_record_cache_reads_again_only_the_record_files_that_changed(ws: Path) -> None:
    for objective in ("The greeting already exists in the webapp", "The footer already exists in the webapp"):
        assert run("-w", ws, "send", "-", "--to", "chip", input=order(objective)).exit_code == 0
    assert run("-w", ws, "supervise", "--once").exit_code == 0
    store, cache = Store(ws / "state"), RecordCache()
    first = store.load_all(cache=cache)
    again = store.load_all(cache=cache)
    assert again == first and all(again[i] is first[i] for i in first)  # nothing read twice
    record = ws / "state" / "orders" / "WO-0002" / "record.json"
    data = json.loads(record.read_text())
    with open(record, "r+") as f:  # rewritten in place, as an editor may: same inode
        f.write(json.dumps({**data, "objective": "Changed by hand"}))
        f.truncate()
    changed = store.load_all(cache=cache)
    assert changed["WO-0002"].objective == "Changed by hand" and changed["WO-0001"] is first["WO-0001"]
    assert store.load_all() == changed  # what a read without the cache finds


def test_board_watch_with_json_is_a_usage_error(ws: Path) -> None:
    both = run("-w", ws, "board", "--watch", "--json")
    assert (both.exit_code, both.stdout) == (2, "")
    assert both.stderr == ("coordinator board: --json prints one document and --watch redraws forever; use one of "
                           "them. See `coordinator board -h`.\n")


def test_board_json_has_the_contract_keys(worked: Path) -> None:
    doc = json.loads(run("-w", worked, "board", "--json").stdout)
    assert list(doc) == ["orders", "supervisor", "inboxes", "never_taken_in"]
    assert doc["never_taken_in"] == []
    assert doc["supervisor"] == {"running": False, "pid": None}
    assert set(doc["inboxes"].values()) == {0} and "chip" in doc["inboxes"]
    for row in doc["orders"]:
        assert set(row) == BOARD_KEYS | {"stale", "reason"}  # SPEC §10 keys, plus two (added)
    assert [o["reason"] for o in doc["orders"]] == [None, Store(worked / "state").load("WO-0002").report["summary"]]
    assert [(o["id"], o["status"], o["from"], o["to"], o["attempts"]) for o in doc["orders"]] == [
        ("WO-0001", "done", "user", "chip", 1), ("WO-0002", "halted", "user", "chip", 1)]


def test_show_prints_one_order_with_report_and_history(worked: Path) -> None:
    text = run("-w", worked, "show", "WO-0001")
    assert text.exit_code == 0
    assert text.stdout.startswith("WO-0001  done  user → chip  attempts 1")
    assert "  checks: `make test` passed" in text.stdout
    assert text.stdout.rstrip().endswith("WO-0001 chip: running -> done (commit "
                                         + Store(worked / "state").load("WO-0001").commit[:10] + ")")
    doc = json.loads(run("-w", worked, "show", "WO-0001", "--json").stdout)
    assert BOARD_KEYS | {"report", "history"} <= set(doc)
    assert doc["report"]["changed"] == ["webapp/src/greeting.py"]
    assert [h["line"] for h in doc["history"]][0] == "WO-0001 chip: new -> queued"
    missing = run("-w", worked, "show", "WO-9999")
    assert (missing.exit_code, missing.stderr) == (1, "coordinator: no order 'WO-9999'; `coordinator board` "
                                                      "lists them\n")


def test_an_order_whose_folder_was_deleted_by_hand_is_said_so_not_no_order(ws: Path) -> None:
    assert run("-w", ws, "send", "-", "--to", "chip",
               input=DEMO_ORDERS.joinpath("greeting.md").read_bytes()).stdout == "WO-0001\n"
    assert program("-w", ws, "supervise", "--once").returncode == 0
    shutil.rmtree(ws / "state" / "orders" / "WO-0001")
    shown = run("-w", ws, "show", "WO-0001")
    assert shown.exit_code == 1
    assert shown.stderr.startswith("coordinator: WO-0001: state/orders/WO-0001/ was deleted by hand")
    assert "`git -C state checkout HEAD -- orders/WO-0001` puts it back" in shown.stderr
    assert "`coordinator audit verify` lists it" in shown.stderr
    # Its history is state/'s git, still there: shown, with what happened to its folder.
    logged = run("-w", ws, "log", "WO-0001")
    assert logged.exit_code == 0
    assert logged.stderr.startswith("warning: WO-0001: state/orders/WO-0001/ was deleted by hand")
    assert [line.split(None, 3)[3] for line in logged.stdout.splitlines()][0] == "WO-0001 chip: new -> queued"
    assert git(ws / "state", "checkout", "HEAD", "--", "orders/WO-0001") == ""  # the way back it names works
    assert run("-w", ws, "show", "WO-0001").stdout.startswith("WO-0001  done")
    # Removed by a commit made by hand: that commit is named, and how to put it back from it.
    git(ws / "state", "rm", "-rq", "orders/WO-0001")
    git(ws / "state", "-c", "user.name=someone", "-c", "user.email=s@x", "commit", "-qm", "tidy up")
    sha = git(ws / "state", "rev-parse", "HEAD")[:10]
    shown = run("-w", ws, "show", "WO-0001")
    assert shown.exit_code == 1 and f"was removed by commit {sha}, made by hand" in shown.stderr
    assert run("-w", ws, "show", "WO-0002").stderr == "coordinator: no order 'WO-0002'; `coordinator board` lists them\n"


def test_a_long_multi_line_failure_in_the_history_is_cut_with_an_ellipsis(ws: Path) -> None:
    # Cut at 160 characters mid-word ("failed with exit cod"), the line read as the whole reason.
    check = "python3 -c \"import sys; [print('line', i, 'of the check output') for i in range(40)]; sys.exit(1)\""
    text = order("The webapp greets a user by name.").replace("`make test` passes", f"`{check}` passes")
    assert run("-w", ws, "send", "-", "--to", "chip", input=text).stdout == "WO-0001\n"
    assert program("-w", ws, "supervise", "--once").returncode == 0
    lines = [line.split(None, 3)[3] for line in run("-w", ws, "log", "WO-0001").stdout.splitlines()]
    failed = next(line for line in lines if line.startswith("WO-0001 chip: running -> queued"))
    note = failed[failed.index("(") + 1:-1]
    assert note.startswith("attempt 1 failed: check `python3") and note.endswith("…") and len(note) == 160
    assert "\n" not in failed
    whole = Store(ws / "state").load("WO-0001").failures[0]
    assert "line 39 of the check output" in whole  # the record keeps it whole: `show` prints it
    assert " ".join(whole.split()).startswith(note.removeprefix("attempt 1 failed: ")[:-1])


def test_show_a_rejected_order_lists_each_error_once(ws: Path) -> None:
    (ws / "inbox" / "chip" / "bad.md").write_text("**Objective:** Something vague\n")  # not via `send`
    assert program("-w", ws, "supervise", "--once").returncode == 0
    assert statuses(ws) == {"WO-0001": "rejected"}
    shown = run("-w", ws, "show", "WO-0001").stdout.splitlines()
    assert shown[0].startswith("WO-0001  rejected  user → chip  attempts 0")
    errors = [line for line in shown if line.startswith("error: ")]
    assert [e.split(": ")[2] for e in errors] == ["acceptance", "files", "branching"]
    assert not any(line.startswith("report: ") for line in shown)
    assert json.loads(run("-w", ws, "show", "WO-0001", "--json").stdout)["order"] is None


def test_show_prints_a_failing_checks_whole_reason_each_line_under_it(ws: Path) -> None:
    """A failing check's reason is its output's tail, on the lines after "output:": `show` printed
    only the first line of each failure, the output (what the user needed) not at all."""
    check = "printf 'expected 3\\ngot 4\\033[31m\\n' && false"
    text = order("The webapp greets a user by name").replace("- `make test` passes", f"- `{check}` passes")
    sent = run("-w", ws, "send", "-", "--to", "chip", input=text)
    assert sent.stdout == "WO-0001\n", sent.stderr
    assert program("-w", ws, "supervise", "--once").returncode == 0
    shown = run("-w", ws, "show", "WO-0001").stdout.splitlines()
    first = shown.index(f"failure: check `{check}` failed with exit code 1; output:")
    assert shown[first + 1:first + 3] == ["  expected 3", "  got 4[31m"]  # no escape reaches the terminal


def test_a_hand_commit_in_state_shows_its_escape_sequences_as_text(ws: Path) -> None:
    """Its author and subject went to the terminal as they were: an escape sequence in them set
    the terminal's title or cleared its screen in `show` and `log`."""
    (ws / "inbox" / "chip" / "bad.md").write_text("**Objective:** Something vague\n")
    assert program("-w", ws, "supervise", "--once").returncode == 0
    with (ws / "state" / "orders" / "WO-0001" / "report.md").open("a") as f:
        f.write("\nseen\n")
    subprocess.run(["git", "-C", str(ws / "state"), "-c", "user.name=ed\x1b[2J", "-c", "user.email=ed@example.org",
                    "commit", "-qam", "WO-0001 chip: noted \x1b]0;title\x07 by hand"], check=True)
    for args in (("show", "WO-0001"), ("log", "WO-0001")):
        shown = CliRunner().invoke(cli, ["-w", str(ws), *args], color=True)  # as on a terminal: escapes kept
        assert shown.exit_code == 0 and "\x1b" not in shown.output and "\x07" not in shown.output, args
        last = shown.output.splitlines()[-1]
        assert "  ed\\x1b[2J  " in last and last.endswith("  WO-0001 chip: noted \\x1b]0;title\\x07 by hand"), args


@pytest.mark.parametrize("args", [("log",), ("doctor",), ("board",)])
def test_a_reader_that_stops_reading_is_no_error(worked: Path, args: tuple[str, ...]) -> None:
    """`coordinator log | head -1`: the reader has seen enough; exit 0, nothing said."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the first write: every write meets a closed pipe
    try:
        done = subprocess.run([COORDINATOR, "-w", str(worked), *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("args", [("board",), ("budget",), ("board", "--watch"), ("log",)])
def test_a_closed_stdout_is_no_internal_error(worked: Path, args: tuple[str, ...]) -> None:
    """`coordinator board >&-`: nothing can be shown, as with `> /dev/null`; exit 0 as git does,
    and a watch has no one to redraw for. board and budget asked the missing stdout for a tty."""
    done = subprocess.run([COORDINATOR, "-w", str(worked), *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=30, preexec_fn=lambda: os.close(1))
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("args", [("board",), ("log",)])
def test_output_into_a_full_device_says_so_not_the_state_advice(worked: Path, args: tuple[str, ...]) -> None:
    """`coordinator board > /dev/full`: the output could not be written; the advice for a full
    disk under state/ ("what was claimed stays in state/") would send the user to the wrong disk."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([COORDINATOR, "-w", str(worked), *args], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=30)
    assert (done.returncode, done.stderr) == (2, "coordinator: cannot write the output: No space left on device\n")


def test_send_into_a_full_device_says_the_order_was_sent(ws: Path) -> None:
    """`coordinator send fix.md > /dev/full` said only "cannot write the output": the order looked
    unsent, and sending it again filed it twice."""
    (ws / "fix.md").write_text(order("The footer exists"))
    with open("/dev/full", "w") as full:
        done = subprocess.run([COORDINATOR, "-w", str(ws), "send", str(ws / "fix.md"), "--to", "chip"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (2, "coordinator: WO-0001 was sent, but that could not be written to "
                                                 "the output (No space left on device): do not send it again\n")
    assert inbox_entries(ws, "chip") == ["WO-0001.md"]


def test_budget_add_into_a_full_device_says_the_tokens_were_added(ws: Path) -> None:
    """Said as "cannot write the output" alone, the tokens looked unadded, and were added twice."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([COORDINATOR, "-w", str(ws), "budget", "add", "1,500"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=30)
    assert (done.returncode, done.stderr) == (2, "coordinator: 1,500 hot tokens were added, but that could not be "
                                                 "written to the output (No space left on device): do not add them "
                                                 "again\n")
    assert json.loads(run("-w", ws, "budget", "--json").stdout)["hot_tokens"] == 1500


def test_a_watch_into_a_pipe_stops_when_the_reader_goes_though_the_board_never_changes(worked: Path) -> None:
    """`coordinator board --watch | head -1`: a board is added only when it changed, so no write
    ever met the closed pipe and the watch went on forever."""
    watch = subprocess.Popen([COORDINATOR, "-w", str(worked), "board", "--watch"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline() == "2 order(s): done 1  halted 1\n"
        watch.stdout.close()  # head -1 has its line
        assert watch.wait(timeout=15) == 0
        assert watch.stderr is not None and watch.stderr.read() == ""
    finally:
        watch.kill()
        watch.wait()


def test_ctrl_c_while_the_commands_are_still_being_imported_is_no_traceback(tmp_path: Path) -> None:
    """Importing the commands takes most of a short command's start (jsonschema, yaml): a Ctrl-C
    then was a KeyboardInterrupt traceback, as `coordinator.cli` imported them before `main` ran."""
    script = ("import sys\n"
              "class Interrupt:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'coordinator.ordercommands':\n"
              "            raise KeyboardInterrupt\n"
              "sys.meta_path.insert(0, Interrupt())\n"
              "from coordinator.cli import main\n"
              "main(['board'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert (done.returncode, done.stderr.strip()) == (130, "interrupted")


def test_log_prints_the_audit_history(worked: Path) -> None:
    everything = run("-w", worked, "log").stdout.splitlines()
    assert "state: initialise the audit trail" in everything[0]
    one = run("-w", worked, "log", "WO-0002").stdout.splitlines()
    assert [line.split(None, 3)[3] for line in one] == [  # time, commit, author, line
        "WO-0002 chip: new -> queued", "WO-0002 chip: queued -> running (attempt 1)",
        "WO-0002 chip: running -> halted (Nothing to do: the greeting already exists.)"]
    assert set(one) <= set(everything)
    assert run("-w", worked, "log", "nope").exit_code == 1


def test_log_json_before_state_is_a_repository_is_an_empty_list(ws: Path) -> None:
    shutil.rmtree(ws / "state")
    ws.joinpath("state").mkdir()
    result = run("-w", ws, "log", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert result.stderr.startswith("no history yet")
    assert run("-w", ws, "log").stdout == ""


def test_a_sent_order_not_yet_taken_in_is_explained(ws: Path) -> None:
    run("-w", ws, "send", "-", "--to", "chip", input=order("The webapp greets a user by name"))
    for command in ("show", "cancel", "retry", "log"):
        result = run("-w", ws, command, "WO-0001")
        assert result.exit_code == 1
        assert result.stderr == ("coordinator: WO-0001 is still in inbox/chip/WO-0001.md, not yet taken in; "
                                 "start `coordinator supervise` (or delete the file to withdraw it)\n")


def test_an_order_in_a_folder_of_no_agent_is_said_never_to_be_taken_in(ws: Path) -> None:
    """`cp fix.md inbox/Chip/WO-0042.md`: show said "start `coordinator supervise`", which never
    takes it in, and an order waiting on it passed validate and send, then was rejected."""
    (ws / "inbox" / "Chip").mkdir()
    (ws / "inbox" / "Chip" / "WO-0042.md").write_text(order("The footer exists", id="WO-0042"))
    for command in ("show", "cancel", "log"):
        result = run("-w", ws, command, "WO-0042")
        assert (result.exit_code, result.stderr) == (
            1, "coordinator: WO-0042 is in inbox/Chip/WO-0042.md, but no agent in coordinator.yaml has that inbox, "
               "so it is never taken in: move it into the inbox of one of chip, rex, walt\n")
    waits = run("-w", ws, "send", "-", "--to", "chip", input=order("The header exists", blocked_by=["WO-0042"]))
    assert (waits.exit_code, waits.stdout) == (1, "")
    assert "blocked_by.0: no order 'WO-0042' in this workspace" in waits.stderr


def test_an_order_still_being_written_beside_a_running_supervisor_is_explained(
        ws: Path, supervisor: subprocess.Popen[str]) -> None:
    """"start `coordinator supervise`" was said with one running: it takes the file in once written."""
    with open(ws / "inbox" / "chip" / "WO-0007.md", "w") as writing:
        writing.write(order("The footer exists"))
        writing.flush()
        result = run("-w", ws, "show", "WO-0007")
    assert (result.exit_code, result.stderr) == (
        1, "coordinator: WO-0007 is still in inbox/chip/WO-0007.md, not yet taken in; the running supervisor takes "
           "it in once nothing writes it any more (or delete the file to withdraw it)\n")


# -- cancel and retry ------------------------------------------------------------------------------------
def test_cancel_and_retry_with_no_supervisor_running(ws: Path) -> None:
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting already exists in the webapp"))
    assert program("-w", ws, "supervise", "--once").returncode == 0
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting says hello", blocked_by=["WO-0001"]))
    assert program("-w", ws, "supervise", "--once").returncode == 0
    assert statuses(ws) == {"WO-0001": "halted", "WO-0002": "waiting"}

    assert run("-w", ws, "cancel", "WO-0002").stdout == "WO-0002: cancelled\n"
    assert run("-w", ws, "retry", "WO-0001").stdout == "WO-0001: queued\n"
    assert statuses(ws) == {"WO-0001": "queued", "WO-0002": "cancelled"}
    assert git(ws / "state", "log", "-2", "--format=%s").splitlines() == [
        "WO-0001 chip: halted -> queued (retry)", "WO-0002 chip: waiting -> cancelled"]
    again = run("-w", ws, "cancel", "WO-0002")
    assert (again.exit_code, again.stderr) == (1, "coordinator: WO-0002 is cancelled; only queued, waiting, "
                                                  "running, blocked or halted orders can be cancelled\n")
    assert run("-w", ws, "retry", "WO-9999").exit_code == 1


def test_gc_on_a_read_only_workspace_says_so_and_not_to_remove_files_by_hand(ws: Path) -> None:
    """It said "cannot remove X: cannot remove X/1/result.yaml: Read-only file system; remove it
    by hand": the path twice, and advice no hand could follow."""
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting already exists in the webapp"))
    assert program("-w", ws, "supervise", "--once").returncode == 0
    runtime = ws / ".coordinator"
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -w "$3" gc --days 0'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(runtime), COORDINATOR, str(ws)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (2, "coordinator: read-only file system: the workspace must be "
                                                 "writable; remount it read-write or use a workspace on a writable "
                                                 "disk\n")
    assert (runtime / "attempts" / "WO-0001").is_dir()


def test_gc_says_ended_orders_dated_ahead_of_the_clock_and_days_0_removes_them(ws: Path) -> None:
    # The clock set back (or records written while it ran ahead): an order that ended "next
    # year" was never old enough for gc, not even `--days 0`, and gc said nothing of it.
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting already exists in the webapp"))
    assert program("-w", ws, "supervise", "--once").returncode == 0
    path = ws / "state" / "orders" / "WO-0001" / "record.json"
    record = json.loads(path.read_text())
    record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() + 30 * 86400))
    path.write_text(json.dumps(record))
    attempts = ws / ".coordinator" / "attempts" / "WO-0001"
    kept = run("-w", ws, "gc", "--days", "1")
    assert kept.stdout == "removed 0 working copies\n" and attempts.is_dir()
    assert kept.stderr == ("warning: kept the attempt folders and logs of 1 ended order (WO-0001) that ended after "
                           "this machine's clock says it is now (the clock set back?), so their age is unknown; "
                           "`coordinator gc --days 0` removes them\n")
    removed = run("-w", ws, "gc", "--days", "0")
    assert removed.stdout == "removed 0 working copies, and the attempt folders and logs of 1 ended order\n"
    assert removed.stderr == "" and not attempts.exists()
    assert run("-w", ws, "gc", "--days", "1").stderr == ""  # nothing left to say


def test_gc_clears_the_attempt_folders_and_logs_of_ended_orders_only(ws: Path) -> None:
    # Every order left its attempt folder (brief, order, outbox, scratch) and its log in
    # .coordinator/ for good: some seven folders and files an order, overnight.
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting already exists in the webapp"))
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting says hello", blocked_by=["WO-0001"]))
    assert program("-w", ws, "supervise", "--once").returncode == 0
    assert statuses(ws) == {"WO-0001": "halted", "WO-0002": "waiting"}
    runtime = ws / ".coordinator"
    assert (runtime / "attempts" / "WO-0001" / "1" / "brief.md").exists()
    assert (runtime / "logs" / "WO-0001" / "1").is_dir()
    (runtime / "attempts" / "WO-0002").mkdir(parents=True)  # as a crash before its start leaves it
    (runtime / "work" / "WO-0001").mkdir(parents=True, exist_ok=True)  # left empty when its copy went

    assert run("-w", ws, "gc").stdout == "removed 0 working copies\n"  # ended today, kept a week
    assert run("-w", ws, "gc", "--days", "0").stdout == (
        "removed 0 working copies, and the attempt folders and logs of 1 ended order\n")
    assert not (runtime / "attempts" / "WO-0001").exists() and not (runtime / "logs" / "WO-0001").exists()
    assert not (runtime / "work" / "WO-0001").exists()
    assert (runtime / "attempts" / "WO-0002").is_dir()  # not ended: kept
    assert "halted" in run("-w", ws, "show", "WO-0001").stdout  # its record and report stay
    assert run("-w", ws, "retry", "WO-0001").stdout == "WO-0001: queued\n"
    assert program("-w", ws, "supervise", "--once").returncode == 0
    assert (runtime / "attempts" / "WO-0001" / "2" / "brief.md").exists()  # a retry starts anew
    assert statuses(ws)["WO-0001"] == "halted"


@pytest.fixture
def supervisor(ws: Path) -> Iterator[subprocess.Popen[str]]:
    """`coordinator supervise` running on `ws`, with an extra agent `slow` that sleeps."""
    config = yaml.safe_load((ws / "coordinator.yaml").read_text())
    config["agents"]["slow"] = {"role": "specialist", "command": ["sleep", "120"]}
    (ws / "coordinator.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([COORDINATOR, "-w", str(ws), "supervise"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "COORDINATOR_WORKSPACE"})
    try:
        wait_for(lambda: (ws / ".coordinator" / "running").exists(), "the supervisor to start")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.parametrize("text", ["{}", "[]", "null", "not json", '{"id": "X"}'])
def test_a_record_file_changed_by_hand_is_said_in_one_line_and_put_back(ws: Path, text: str) -> None:
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting already exists in the webapp"))
    run("-w", ws, "send", "-", "--to", "chip", input=order("The footer already exists in the webapp"))
    assert run("-w", ws, "supervise", "--once").exit_code == 0
    record = ws / "state" / "orders" / "WO-0001" / "record.json"
    kept = record.read_bytes()
    record.write_text(text)
    said = "state/orders/WO-0001/record.json is not an order record ("
    board = run("-w", ws, "board", "--json")
    assert board.exit_code == 0 and said in board.stderr
    assert [o["id"] for o in json.loads(board.stdout)["orders"]] == ["WO-0002"]  # the others still shown
    for args in (("show", "WO-0001"), ("log", "WO-0001")):
        refused = run("-w", ws, *args)
        assert refused.exit_code == 1 and refused.stderr.startswith(f"coordinator: {said}"), (args, refused.stderr)
        assert refused.stderr.count("\n") == 1 and "puts it back from git" in refused.stderr
    # A command that changes state, served with no supervisor running, puts it back first and says so.
    retried = run("-w", ws, "retry", "WO-0001")
    assert retried.exit_code == 0 and retried.stdout == "WO-0001: queued\n"
    assert retried.stderr == ("coordinator: signal silent: - state/ changed by hand (restored from git): "
                              "orders/WO-0001/record.json\n")
    assert json.loads(record.read_bytes())["history"][:-1] == json.loads(kept)["history"]  # then the retry
    assert statuses(ws) == {"WO-0001": "queued", "WO-0002": "halted"}


def test_a_record_file_made_a_folder_by_hand_is_said_in_one_line(ws: Path) -> None:
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting already exists in the webapp"))
    assert run("-w", ws, "supervise", "--once").exit_code == 0
    record = ws / "state" / "orders" / "WO-0001" / "record.json"
    record.unlink()
    record.mkdir()
    for args in (("show", "WO-0001"), ("log", "WO-0001")):
        refused = run("-w", ws, *args)
        assert (refused.exit_code, refused.stderr) == (
            1, "coordinator: state/orders/WO-0001/record.json is not an order record ([Errno 21] Is a directory); "
               "changed by hand? `coordinator supervise` puts it back from git\n"), args


def test_a_record_field_of_the_wrong_kind_is_no_record(ws: Path) -> None:
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting already exists in the webapp"))
    assert run("-w", ws, "supervise", "--once").exit_code == 0
    record = ws / "state" / "orders" / "WO-0001" / "record.json"
    data = json.loads(record.read_text())
    for field, value in (("attempts", "x"), ("running", [1]), ("history", 5), ("children", [3]),
                         ("history", [{"at": "x"}])):
        record.write_text(json.dumps({**data, field: value}))
        shown = run("-w", ws, "show", "WO-0001")
        assert (shown.exit_code, shown.stderr) == (1, "coordinator: state/orders/WO-0001/record.json is not an "
                                                      f"order record ({field} of the wrong kind); changed by hand? "
                                                      "`coordinator supervise` puts it back from git\n")
        shown_board = run("-w", ws, "board")
        assert (shown_board.exit_code, shown_board.stderr) == (0, "warning: " + shown.stderr.removeprefix("coordinator: "))
        assert run("-w", ws, "audit", "verify").exit_code == 1  # uncommitted, said in a line
    record.write_text(json.dumps({**data, "report": [1]}))  # an odd report is shown as none, never refused
    odd = run("-w", ws, "show", "WO-0001")
    assert odd.exit_code == 0 and odd.stdout.startswith("WO-0001  halted")


def test_cancel_and_retry_through_a_running_supervisor(ws: Path, supervisor: subprocess.Popen[str]) -> None:
    run("-w", ws, "send", "-", "--to", "slow", input=order("The slow agent thinks it over", files=()))
    run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting already exists in the webapp"))
    wait_for(lambda: statuses(ws) == {"WO-0001": "running", "WO-0002": "halted"}, "one running, one halted")

    assert run("-w", ws, "cancel", "WO-0001").stdout == "WO-0001: cancelled\n"
    assert statuses(ws)["WO-0001"] == "cancelled"
    assert run("-w", ws, "retry", "WO-0002").stdout == "WO-0002: queued\n"
    wait_for(lambda: Store(ws / "state").load("WO-0002").attempts == 2, "the retried order to run again")
    refused = run("-w", ws, "cancel", "WO-0001")
    assert refused.exit_code == 1 and "WO-0001 is cancelled" in refused.stderr

    supervisor.send_signal(signal.SIGTERM)
    _, err = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 0
    assert "Traceback" not in err and "stopped: nothing running" in err
    assert "WO-0001 slow: running -> cancelled" in git(ws / "state", "log", "--format=%B")


def test_budget_and_board_say_when_the_running_supervisor_keeps_an_older_config(
        ws: Path, supervisor: subprocess.Popen[str]) -> None:
    """With the ceiling lowered in coordinator.yaml while the supervisor ran, `budget` showed
    465 / 100 hot tokens and nothing rotated: the supervisor keeps the team it started with and
    said so only in its own log. The commands beside it now say so too."""
    drift = ("the running supervisor started with an older coordinator.yaml and acts on that one (its agents, "
             "ceiling and bands) until it is restarted")
    assert run("-w", ws, "budget").stderr == ""
    path = ws / "coordinator.yaml"
    kept = path.read_text()
    path.write_text(kept.replace("ceiling: 7000", "ceiling: 100"))
    shown = run("-w", ws, "budget")
    assert (shown.exit_code, shown.stderr) == (0, f"warning: {drift}\n")
    assert shown.stdout.startswith("walt: 0 / 100 hot tokens")
    added = run("-w", ws, "budget", "add", "200")
    assert added.exit_code == 0 and added.stderr.startswith(f"warning: {drift}\n")
    assert f"— WARNING: {drift}" in run("-w", ws, "board").stdout.splitlines()[1]
    assert json.loads(run("-w", ws, "board", "--json").stdout)["supervisor"]["config_changed"] == drift
    path.write_text(kept)  # the same team again: nothing to say
    assert run("-w", ws, "budget").stderr == ""
    assert "config_changed" not in json.loads(run("-w", ws, "board", "--json").stdout)["supervisor"]


def send_to_a_newbie(ws: Path) -> Result:
    """`newbie` added to coordinator.yaml (after the running supervisor started), then an order
    sent to it: WO-0001, taken by `send`."""
    path = ws / "coordinator.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["agents"]["newbie"] = {"role": "specialist", "command": ["true"]}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sent = run("-w", ws, "send", "-", "--to", "newbie", input=order("The newbie says hello", files=()))
    assert sent.exit_code == 0 and sent.stdout == "WO-0001\n"
    return sent


def test_send_to_an_agent_added_after_the_supervisor_started_says_the_order_waits_for_a_restart(
        ws: Path, supervisor: subprocess.Popen[str]) -> None:
    """`send` said only the id, and the order sat in an inbox the running supervisor does not
    watch (its team is the one it started with) until someone wondered why."""
    sent = send_to_a_newbie(ws)
    assert sent.stderr == ("warning: the running supervisor started before newbie was in coordinator.yaml, so it does "
                           "not take in inbox/newbie/: the order waits there until the supervisor is restarted\n")
    known = run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting already exists in the webapp"))
    assert known.exit_code == 0 and known.stderr.startswith("warning: the running supervisor started with an older")


def test_a_running_supervisor_answers_errors_with_the_exit_code_they_would_have_here(
        ws: Path, supervisor: subprocess.Popen[str]) -> None:
    from coordinator import control
    from coordinator.errors import CoordinatorError
    from coordinator.workspace import Workspace

    assert control.supervisor_running(Workspace(ws))
    with pytest.raises(CoordinatorError) as usage:
        control.submit(Workspace(ws), "budget-add", {"tokens": -5})
    assert usage.value.exit_code == 2 and str(usage.value) == "budget add takes 1 to 10,000,000 tokens, not -5"  # a usage error
    with pytest.raises(CoordinatorError) as missing:
        control.submit(Workspace(ws), "retry", {"id": "WO-9999"})
    assert missing.value.exit_code == 1 and "no order 'WO-9999'" in str(missing.value)  # the thing asked about


# -- budget, rotation, signals, audit ------------------------------------------------------------------
def test_a_ledger_that_is_not_utf8_is_said_as_a_damaged_ledger_not_an_internal_error(ws: Path) -> None:
    ledger = ws / "state" / "orchestrator" / "ledger.json"
    ledger.parent.mkdir(exist_ok=True)
    ledger.write_bytes(b'{"generation": 1, "items": [], "note": "caf\xe9"}\n')
    damaged = ("state/orchestrator/ledger.json: not a valid ledger (not UTF-8 text at byte 43); restore it with "
               "`git -C state checkout orchestrator/ledger.json` or delete it to start over")
    for args in (["budget"], ["budget", "--json"]):
        result = program("-w", ws, *args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", f"coordinator: {damaged}\n")
    # The board still shows the orders (it was one line of an error and nothing else): its budget
    # line says what is wrong with the ledger.
    assert run("-w", ws, "send", "-", "--to", "chip", input=order("The greeting exists")).exit_code == 0
    board = program("-w", ws, "board")
    assert board.returncode == 0 and f"budget: {damaged}" in board.stdout.splitlines()
    assert "inboxes: 1 file(s) not taken in yet (chip 1)" in board.stdout


def test_a_folder_in_place_of_the_signals_file_is_one_line_not_an_internal_error(ws: Path) -> None:
    """`board` and `signals` were `internal error: IsADirectoryError` (exit 70), and so was the
    supervisor at its first signal."""
    from datetime import UTC, datetime

    from coordinator import signals

    (ws / "state" / "signals.jsonl").mkdir()
    said = ("state/signals.jsonl: is a directory; signals are appended to a file there: move it away "
            "(`git -C state log -- signals.jsonl` has what was recorded)")
    for args in (["signals"], ["signals", "--json"], ["supervise", "--once"]):
        result = program("-w", ws, *args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", f"coordinator: {said}\n"), args
    board = program("-w", ws, "board")
    assert board.returncode == 0 and f"signals: {said}" in board.stdout.splitlines()
    # Once the signals were committed, a folder put in their place is put back from git.
    (ws / "state" / "signals.jsonl").rmdir()
    signals.record(ws / "state", "silent", agent=None, order=None, evidence="seen", now=datetime.now(UTC))
    git(ws / "state", "add", "signals.jsonl")
    git(ws / "state", "-c", "user.name=me", "-c", "user.email=me@example.org", "commit", "-qm", "by hand")
    (ws / "state" / "signals.jsonl").unlink()
    (ws / "state" / "signals.jsonl").mkdir()
    assert program("-w", ws, "supervise", "--once").returncode == 0
    assert (ws / "state" / "signals.jsonl").is_file()
    assert "silent" in run("-w", ws, "signals").stdout


def test_budget_shows_a_hand_edited_items_ref_with_its_escapes_as_text(ws: Path) -> None:
    """The note was made one printable line, the ref went to the terminal as the file had it."""
    assert run("-w", ws, "budget", "add", "5").exit_code == 0
    ledger = ws / "state" / "orchestrator" / "ledger.json"
    data = json.loads(ledger.read_text())
    data["items"][0]["ref"] = "read\x1b[2J"
    ledger.write_text(json.dumps(data))
    shown = CliRunner().invoke(cli, ["-w", str(ws), "budget"], color=True)  # as on a terminal: escapes kept
    assert shown.exit_code == 0 and "\x1b" not in shown.output
    assert shown.output.splitlines()[-1].split() == ["5", "manual", "in-flight", "read\\x1b[2J"]


def test_budget_add_and_rotate(ws: Path) -> None:
    doc = json.loads(run("-w", ws, "budget", "--json").stdout)
    assert set(doc) == BUDGET_KEYS
    assert (doc["agent"], doc["hot_tokens"], doc["ceiling"], doc["mode"], doc["generation"], doc["items"]) == (
        "walt", 0, 7000, "routing", 1, [])
    added = run("-w", ws, "budget", "add", "2500", "--note", "read the API spec")
    assert added.stdout == "2,500 hot tokens, mode mixed\n"
    assert added.stderr == "warning: mode changed routing -> mixed\n"
    text = run("-w", ws, "budget").stdout.splitlines()
    assert text[0] == "walt: 2,500 / 7,000 hot tokens, mode mixed, generation 1"
    assert text[1].split() == ["2,500", "manual", "in-flight", text[1].split()[3], "read", "the", "API", "spec"]
    assert run("-w", ws, "budget", "add", "0").exit_code == 2

    assert run("-w", ws, "rotate").stdout == "rotate: dropped 0 completed item(s), 2,500 -> 2,500 hot tokens\n"
    fresh = run("-w", ws, "rotate", "--fresh")
    assert fresh.exit_code == 0 and fresh.stdout.startswith("rotate --fresh: generation 2, 2,500 -> ")
    brief = (ws / "state" / "orchestrator" / "brief.md").read_text()
    assert brief.startswith("# Orchestrator brief: generation 2")
    assert json.loads(run("-w", ws, "budget", "--json").stdout)["generation"] == 2
    assert git(ws / "state", "log", "-1", "--format=%s").startswith("budget walt: rotate --fresh: generation 2")
    assert git(ws / "state", "status", "--porcelain") == ""


def test_rotate_fresh_that_raises_the_hot_tokens_says_so(ws: Path) -> None:
    """A fresh brief longer than the context it replaced raised the hot tokens (5 -> 62), said
    only in a line that read as success: "rotate" is asked for to lower them."""
    assert run("-w", ws, "budget", "add", "5").exit_code == 0
    fresh = run("-w", ws, "rotate", "--fresh")
    after = json.loads(run("-w", ws, "budget", "--json").stdout)["hot_tokens"]
    assert after > 5
    assert (fresh.exit_code, fresh.stdout) == (0, f"rotate --fresh: generation 2, 5 -> {after:,} hot tokens\n")
    assert fresh.stderr == (f"warning: the fresh generation starts with more hot tokens ({after:,}) than the context "
                            "it replaced (5): its brief, state/orchestrator/brief.md, is the longer; a fresh start "
                            "lowers them once the context has outgrown that brief\n")
    assert run("-w", ws, "rotate", "--fresh").stderr == ""  # no more than before: nothing to warn of


def test_signals_and_audit_verify_notice_a_hand_commit(ws: Path) -> None:
    assert run("-w", ws, "signals").stdout == "no signals recorded\n"
    assert json.loads(run("-w", ws, "signals", "--json").stdout) == {
        "counts": {"artifact": 0, "feedback": 0, "scope": 0, "silent": 0}, "signals": []}
    assert program("-w", ws, "supervise", "--once").returncode == 0  # it notes the default branches
    clean = run("-w", ws, "audit", "verify")
    assert (clean.exit_code, clean.stdout) == (0, "audit clean: every commit and state change is explained\n")

    webapp = ws / "repos" / "webapp"
    (webapp / "hand.txt").write_text("made by hand\n")
    git(webapp, "add", "hand.txt")
    git(webapp, "-c", "user.name=me", "-c", "user.email=me@example.org", "commit", "-qm", "by hand")
    dirty = run("-w", ws, "audit", "verify")
    assert dirty.exit_code == 1
    assert re.fullmatch(r"repo-commit: repos/webapp@[0-9a-f]{10}: me: 'by hand' has no Work-Order trailer\n",
                        dirty.stdout)
    assert json.loads(run("-w", ws, "audit", "verify", "--json").stdout)["clean"] is False

    assert program("-w", ws, "supervise", "--once").returncode == 0  # its tamper watch sees the move
    doc = json.loads(run("-w", ws, "signals", "--json").stdout)
    assert doc["counts"]["silent"] == 1
    assert "repos/webapp default branch moved" in doc["signals"][0]["evidence"]
    listed = run("-w", ws, "signals").stdout
    assert "silent" in listed and listed.endswith("total: artifact 0, feedback 0, scope 0, silent 1\n")


def test_doctor_cost_gc_and_version(ws: Path) -> None:
    doctor = run("-w", ws, "doctor")
    assert doctor.exit_code == 0
    assert {line.split(":")[0] for line in doctor.stdout.splitlines() if not line.startswith(" ")} >= {
        "workspace", "landlock", "read-only mounts", "gate", "watcher", "git", "team"}
    assert run("-w", ws, "cost").stdout == "no LLM calls recorded\n"
    assert json.loads(run("-w", ws, "cost", "--json").stdout)["total"]["calls"] == 0
    assert run("-w", ws, "gc").stdout == "removed 0 working copies\n"
    assert run("--version").stdout == f"coordinator, version {coordinator.__version__}\n"


def test_cost_shows_a_model_name_with_escapes_as_text_not_to_the_terminal(ws: Path) -> None:
    # A model's name is coordinator.yaml's (any string) or what a record says: an escape sequence
    # in it retitled or cleared the user's terminal, and a line break broke the table.
    assert run("-w", ws, "send", "-", "--to", "chip",
               input=DEMO_ORDERS.joinpath("greeting.md").read_bytes()).stdout == "WO-0001\n"
    assert program("-w", ws, "supervise", "--once").returncode == 0
    path = ws / "state" / "orders" / "WO-0001" / "record.json"
    record = json.loads(path.read_text())
    record["usage"] = [{"agent": "chip", "model": "m\x1b]0;owned\x07\x1b[2J\nx", "cost": 0.5,
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5}}]
    path.write_text(json.dumps(record))
    shown = run("-w", ws, "cost")
    assert shown.exit_code == 0 and "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    lines = shown.stdout.splitlines()
    assert len(lines) == 6  # heading, two titles, two rows, total: the name breaks no line
    assert lines[4].startswith("  m\\x1b]0;owned\\x07\\x1b[2J\\x0ax ") and len(lines[4]) == len(lines[0])
    assert json.loads(run("-w", ws, "cost", "--json").stdout)["by_model"] == {
        "m\x1b]0;owned\x07\x1b[2J\nx": {"calls": 1, "prompt_tokens": 10, "completion_tokens": 5, "cost": 0.5}}


def test_the_fresh_brief_names_a_halted_order_however_many_orders_were_sent_since(ws: Path) -> None:
    # Blocked and halted orders were looked for among the orchestrator's last 200 orders only: an
    # older one, still waiting for its decision, left the fresh brief without a word.
    (ws / "inbox" / "chip" / "first.md").write_text(order("The greeting already exists in the webapp",
                                                          **{"from": "walt"}))
    assert program("-w", ws, "supervise", "--once").returncode == 0
    for n in range(205):  # rejected at intake: no attempt runs
        (ws / "inbox" / "chip" / f"r{n}.md").write_text(f"---\nfrom: walt\n---\n**Objective:** Thing {n}\n")
    assert program("-w", ws, "supervise", "--once").returncode == 0
    assert statuses(ws)["WO-0001"] == "halted" and len(statuses(ws)) == 206
    assert run("-w", ws, "rotate", "--fresh").exit_code == 0
    brief = (ws / "state" / "orchestrator" / "brief.md").read_text()
    assert "## Blocked or halted: waiting for your decision (1)\n\n- WO-0001 -> chip [halted]: The greeting " \
           "already exists in the webapp; why: " in brief


def test_python_dash_m_coordinator_is_the_coordinator_command(ws: Path) -> None:
    ran = subprocess.run([sys.executable, "-m", "coordinator", "-w", str(ws), "board", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and json.loads(ran.stdout) == json.loads(program("-w", ws, "board", "--json").stdout)
    missing = subprocess.run([sys.executable, "-m", "coordinator", "-w", str(ws / "nowhere"), "board"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr


def test_demo_intro_sets_up_the_demo_repository_and_says_what_to_do(ws: Path) -> None:
    import shutil

    shutil.rmtree(ws / "repos" / "webapp")
    intro = run("-w", ws, "demo-intro")
    assert intro.exit_code == 0
    assert intro.stdout.splitlines()[0] == "created repos/webapp (the demo repository)"
    assert "coordinator send demo/example-orders/greeting.md --to chip" in intro.stdout
    assert git(ws / "repos" / "webapp", "log", "--format=%s").strip()


def test_the_demo_orchestrators_orders_take_its_requests_priority(ws: Path) -> None:
    """An urgent request to the demo's walt filed its code and review orders `normal`: they waited
    behind every normal order of chip and rex, the request's urgency lost on the way."""
    request = DEMO_ORDERS.joinpath("request.md").read_text("utf-8")
    assert run("-w", ws, "send", "-", "--to", "walt", input="---\npriority: urgent\n---\n" + request).exit_code == 0
    done = program("-w", ws, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    for child in ("WO-0001-code", "WO-0001-review"):
        shown = json.loads(run("-w", ws, "show", child, "--json").stdout)
        assert (shown["status"], shown["order"]["priority"]) == ("done", "urgent")

def test_the_demos_example_orders_name_only_files_of_the_demo_repository(ws: Path) -> None:
    """review.md asked rex to review webapp/src/app.py, a module the demo repository never had:
    the order ended done, reviewing a file that is not there."""
    import re

    for example in DEMO_ORDERS.iterdir():
        text = example.read_text("utf-8")
        files = {line[2:] for line in text.split("**Files:**")[1].split("**Branching:**")[0].splitlines()
                 if line.startswith("- ")}
        for named in re.findall(r"webapp/[\w./-]+\w", text):
            assert named in files or (ws / "repos" / named).exists(), (example.name, named)

def test_the_demo_orchestrator_takes_a_request_with_a_64_character_id(ws: Path) -> None:
    """An id may be 64 characters long; the demo's walt named its orders `<id>-code` and
    `<id>-review`, over the limit: both were rejected and the request blocked and escalated."""
    long_id = "r" * 64
    request = DEMO_ORDERS.joinpath("request.md").read_text("utf-8")
    assert run("-w", ws, "send", "-", "--to", "walt", input=f"---\nid: {long_id}\n---\n" + request).exit_code == 0
    done = program("-w", ws, "supervise", "--once")
    assert done.returncode == 0, done.stderr
    shown = json.loads(run("-w", ws, "show", long_id, "--json").stdout)
    assert shown["status"] == "done", shown["report"]
    assert [statuses(ws)[child] for child in shown["children"]] == ["done", "done"]

# -- usage errors, help, docs ----------------------------------------------------------------------------
def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    ctx = click.Context(group)
    for name in sorted(group.list_commands(ctx)):  # the top-level group imports its commands when asked
        command = group.get_command(ctx, name)
        assert command is not None
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


ALL_COMMANDS = [path for path, _ in _commands(cli)]


@pytest.mark.parametrize("path", [(), *ALL_COMMANDS], ids=lambda p: " ".join(p) or "coordinator")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = run(*path, "-h")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: {' '.join(('coordinator', *path))} ")
    assert "Example:" in result.stdout


def test_every_command_is_documented_with_an_example() -> None:
    undocumented = [" ".join(path) for path, command in [((), cli), *_commands(cli)]
                    if "Example:" not in (command.help or "")
                    or "coordinator " not in (command.help or "").split("Example:")[1]]
    assert undocumented == []
    assert {"init", "validate", "send", "new", "supervise", "board", "show", "log", "cancel", "retry", "budget",
            "budget add", "rotate", "signals", "audit verify", "doctor", "cost"} <= {" ".join(p) for p in ALL_COMMANDS}


def test_cancel_and_gc_help_say_when_a_cancel_is_answered_and_what_days_0_does() -> None:
    cancel = " ".join(run("cancel", "-h").stdout.split())
    assert "A running order's cancel is answered once its processes are gone" in cancel
    assert "coordinator cancel WO-0007" in cancel
    gc = " ".join(run("gc", "-h").stdout.split())
    assert "`--days 0` removes them all, whatever their age" in gc
    assert "coordinator gc --days 2" in gc and "coordinator gc --days 0" in gc


def test_usage_errors_name_the_command_and_exit_2(ws: Path) -> None:
    missing = run("-w", ws, "new")
    assert (missing.exit_code, missing.stderr) == (2, "coordinator new: Missing option '--to'. See "
                                                      "`coordinator new -h`.\n")
    unknown = run("xyzzy")
    assert (unknown.exit_code, unknown.stderr) == (2, "coordinator: No such command 'xyzzy'. See "
                                                      "`coordinator -h`.\n")
    typo = run("boad")
    assert typo.stderr == "coordinator: No such command 'boad'. Did you mean 'board'? See `coordinator -h`.\n"
    bare = run()
    assert bare.exit_code == 2 and bare.stderr.startswith("Usage: coordinator [OPTIONS] COMMAND")


# -- as real processes: never a traceback -----------------------------------------------------------------
def test_errors_from_the_real_program_are_one_line_with_the_right_exit_code(ws: Path, tmp_path: Path) -> None:
    bad_config = tmp_path / "bad"
    bad_config.mkdir()
    (bad_config / "coordinator.yaml").write_text("version: [1\n")
    (ws / "big.md").write_bytes(b"x" * (2 * 1024 * 1024))
    (ws / "bin.md").write_bytes(os.urandom(4096) + b"\0")
    (ws / "laughs.yaml").write_text(BILLION_LAUGHS)
    cases = [
        ((["board"], tmp_path), 2, NO_WORKSPACE),
        ((["-w", bad_config, "board"], None), 2, "coordinator: coordinator.yaml: is not valid YAML at line 2"),
        ((["-w", ws, "validate", ws / "big.md", "--to", "chip"], None), 1, "big.md: is 2.0 MiB"),
        ((["-w", ws, "validate", ws / "bin.md", "--to", "chip"], None), 1, "bin.md: is binary"),
        ((["-w", ws, "send", ws / "laughs.yaml", "--to", "chip"], None), 1, "laughs.yaml:4: uses a YAML alias (*c)"),
        ((["-w", ws, "send", ws / "nothing.md", "--to", "chip"], None), 2, "coordinator: nothing.md: no such file"),
        ((["-w", ws, "show", "WO-4242"], None), 1, "coordinator: no order 'WO-4242'"),
        ((["-w", ws, "init", ws], None), 1, "coordinator: "),
        ((['-w', ws, 'budget', 'add', 'many'], None), 2, "coordinator budget add: Invalid value for 'TOKENS'"),
    ]
    for (args, cwd), code, start in cases:
        done = program(*args, cwd=cwd)
        assert (done.returncode, done.stdout) == (code, ""), (args, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(start), (args, done.stderr)
    assert inbox_entries(ws, "chip") == []


def test_a_reader_that_goes_away_is_not_an_error(worked: Path) -> None:
    done = subprocess.run(f"'{COORDINATOR}' -w '{worked}' log | head -c 10", shell=True, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and len(done.stdout) == 10
    assert done.stderr == ""


def test_end_to_end_as_a_new_user(tmp_path: Path) -> None:
    assert program("init", "team", cwd=tmp_path).returncode == 0
    team = tmp_path / "team"
    greeting = tmp_path / "greeting.md"
    greeting.write_bytes(DEMO_ORDERS.joinpath("greeting.md").read_bytes())
    sent = program("send", greeting, "--to", "chip", cwd=team)
    assert (sent.returncode, sent.stdout) == (0, "WO-0001\n"), sent.stderr
    supervised = program("supervise", "--once", cwd=team)
    assert supervised.returncode == 0, supervised.stderr
    assert "WO-0001 chip: running -> done" in supervised.stderr
    board = program("board", cwd=team / "inbox")
    assert "DONE (1)" in board.stdout and "WO-0001" in board.stdout
    head = git(team / "repos" / "webapp", "log", "-1", "--format=%an <%ae>%n%s%n%b")
    assert head.startswith("chip <chip@agents.coordinator>\nThe webapp greets a user by name.\n")
    assert "Work-Order: WO-0001" in head and "Agent: chip" in head
    assert program("audit", "verify", cwd=team).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the command as another user: needs root")
def test_a_workspace_this_user_may_not_write_gives_one_line_not_an_internal_error() -> None:
    with tempfile.TemporaryDirectory() as top:  # pytest's own folders are closed to other users
        Path(top).chmod(0o755)
        _another_user_sends_into(Path(top) / "team")


def _another_user_sends_into(root: Path) -> None:
    assert program("init", root).returncode == 0
    (root / "fix.md").write_text(order("The webapp greets a user by name"))
    for p in (root, *root.rglob("*")):
        p.chmod(p.stat().st_mode | 0o055)  # readable by everyone, writable only by its owner
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", COORDINATOR, "-w",
                           str(root), "send", str(root / "fix.md"), "--to", "chip"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"coordinator: permission denied: {root / '.coordinator' / 'ids'}")
    assert done.stderr.endswith(": run it as the user who owns the workspace (or give this user access to it)\n")
    assert "internal error" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert os.listdir(root / "inbox" / "chip") == []


def test_budget_add_that_reaches_the_ceiling_says_what_happens_next(ws: Path) -> None:
    added = run("-w", ws, "budget", "add", "7500")
    assert added.exit_code == 0 and added.stdout == "7,500 hot tokens, mode drift\n"
    assert added.stderr.splitlines()[-1] == ("warning: at the ceiling of 7,000 hot tokens; on_ceiling is rotate: "
                                             "the supervisor rotates the context when it next runs")


def test_cancel_of_an_order_for_an_agent_added_after_the_supervisor_started_says_it_waits_for_a_restart(
        ws: Path, supervisor: subprocess.Popen[str]) -> None:
    """`cancel`/`retry` of an order still in the inbox of an agent the running supervisor does
    not know (added to coordinator.yaml after it started) said the supervisor "takes it in once
    nothing writes it any more": it never does until it is restarted."""
    send_to_a_newbie(ws)
    said = ("coordinator: WO-0001 is still in inbox/newbie/WO-0001.md, not yet taken in; the running supervisor "
            "started before newbie was in coordinator.yaml, so it takes it in only once it is restarted (or "
            "delete the file to withdraw it)\n")
    for command in ("cancel", "retry"):
        asked = run("-w", ws, command, "WO-0001")
        assert (asked.exit_code, asked.stderr.splitlines(keepends=True)[-1]) == (1, said), asked.stderr
    assert (ws / "inbox" / "newbie" / "WO-0001.md").exists()


def test_the_callers_git_variables_never_reach_state_s_git(ws: Path, tmp_path: Path):
    """Run from a git hook or a shell set up for another repository, GIT_DIR made every commit
    in state/ fail and GIT_INDEX_FILE would have staged into another index: the supervisor's
    git ignores the caller's GIT_* variables, as the repositories' git always did."""
    other = tmp_path / "other.git"
    subprocess.run(["git", "init", "-q", "--bare", str(other)], check=True)
    assert run("-w", ws, "send", "-", "--to", "chip",
               input=DEMO_ORDERS.joinpath("greeting.md").read_bytes()).stdout == "WO-0001\n"
    env = {k: v for k, v in os.environ.items() if k != "COORDINATOR_WORKSPACE"}
    env |= {"GIT_DIR": str(other), "GIT_WORK_TREE": str(tmp_path), "GIT_INDEX_FILE": str(tmp_path / "index")}
    done = subprocess.run([COORDINATOR, "-w", str(ws), "supervise", "--once"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0 and "failed" not in done.stderr, done.stderr
    assert statuses(ws)["WO-0001"] == "done"
    assert "WO-0001 chip: running -> done" in git(ws / "state", "log", "--format=%B")
    assert run("-w", ws, "audit", "verify").exit_code == 0
    assert subprocess.run(["git", "--git-dir", str(other), "rev-parse", "-q", "--verify", "HEAD"],
                          capture_output=True).returncode != 0  # nothing went to the other repository
    assert not (tmp_path / "index").exists()
