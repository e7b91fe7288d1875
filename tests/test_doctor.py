"""`coordinator doctor`: says truthfully which protection layers this machine has (SPEC §7, issue 4)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import sh

from coordinator import landlock, seccomp
from coordinator.cli import cli
from coordinator.supervisor import Supervisor
from coordinator.workspace import Workspace


def doctor(ws: Workspace) -> list[str]:
    result = CliRunner().invoke(cli, ["-w", str(ws.root), "doctor"])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def line(lines: list[str], prefix: str) -> str:
    found = [x for x in lines if x.strip().startswith(prefix)]
    assert len(found) == 1, (prefix, lines)
    return found[0]


@pytest.fixture
def ws(make_ws) -> Workspace:
    return make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"]},
                    "chip": {"role": "specialist", "writes": ["webapp/**"], "command": sh("true")},
                    "ghost": {"role": "specialist", "command": ["no-such-agent-program", "-p"]}},
                   orchestrator="walt")


@pytest.mark.skipif(landlock.abi_version() < 1, reason="this kernel has no Landlock")
def test_doctor_reports_the_kernel_layer_this_machine_really_has(ws: Workspace) -> None:
    lines = doctor(ws)
    status = landlock.status()
    assert line(lines, "landlock:").startswith(f"landlock: ABI {status['abi']}, enforced")
    handled = line(lines, "filesystem rights handled:").split(":", 1)[1].split(", ")
    assert [h.strip() for h in handled] == status["enforced"]
    scopes = line(lines, "scopes:")
    if status["abi"] >= 6:
        assert "signal" in scopes and "abstract_unix_socket" in scopes
    assert not any("gate-only" in x for x in lines)
    assert line(lines, "gate:").startswith("gate: after every run")


def test_doctor_reports_watcher_limits_git_and_the_team(ws: Workspace) -> None:
    lines = doctor(ws)
    assert line(lines, "watcher:")
    for name in ("max_user_watches", "max_queued_events", "max_user_instances"):
        proc = Path("/proc/sys/fs/inotify") / name
        if proc.exists():
            assert line(lines, f"inotify {name}:").split(":")[1].strip() == proc.read_text().strip()
    version = subprocess.run(["git", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert line(lines, "git:") == f"git: {version}"
    assert line(lines, "team:").startswith("team: 3 agent(s)") and "orchestrator walt" in line(lines, "team:")
    assert "WARNING: no-such-agent-program not found on PATH" in line(lines, "ghost:")
    assert "WARNING" not in line(lines, "chip:")


def test_doctor_says_which_cpu_the_spawn_server_keeps_to(ws: Workspace) -> None:
    """The CPUs doctor names are the ones the spawn server really picks from (`Cpus.here`): the
    highest it may use; with one CPU, none. Run as `coordinator doctor` under each affinity."""
    import os
    import sys

    allowed = sorted(os.sched_getaffinity(0))
    said = line(doctor(ws), "cpus:")
    if len(allowed) >= 2:
        assert said.startswith(f"cpus: {len(allowed)} usable") and f"keeps to CPU {allowed[-1]} " in said
    one = subprocess.run(
        [sys.executable, "-c", f"import os, sys; os.sched_setaffinity(0, {{{allowed[0]}}}); "
         "from coordinator.cli import main; sys.argv = ['coordinator', '-w', sys.argv[1], 'doctor']; main()",
         str(ws.root)], capture_output=True, text=True)
    assert line(one.stdout.splitlines(), "cpus:") == (
        f"cpus: 1 usable ({allowed[0]}); the spawn server and every specialist share it")
    here = subprocess.run(  # what the server itself chooses, in a process of the same affinity
        [sys.executable, "-c", "from coordinator.cpus import Cpus; print(Cpus.here().home)"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert here == (f"frozenset({{{allowed[-1]}}})" if len(allowed) >= 2 else "None")


def test_without_landlock_the_gate_only_fallback_is_said_loudly(ws: Workspace, monkeypatch) -> None:
    # A kernel without Landlock cannot be booted here; pretend the syscall reports none.
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    lines = doctor(ws)
    assert line(lines, "landlock:").startswith("landlock: NOT AVAILABLE — gate-only mode")
    assert not any(x.strip().startswith("filesystem rights handled") for x in lines)
    said: list[str] = []
    with Supervisor(ws, log=said.append):
        pass
    assert any(x.startswith("WARNING: this kernel has no Landlock") and "doctor" in x for x in said), said


@pytest.mark.skipif(landlock.abi_version() < 1 or not seccomp.supported(),
                    reason="the setuid/lease guard needs Landlock and a machine the filter knows")
def test_doctor_says_the_setuid_and_lease_guard_is_active(ws: Workspace) -> None:
    assert line(doctor(ws), "setuid/lease guard:").startswith("setuid/lease guard: active (seccomp)")


def test_on_a_machine_the_filter_does_not_know_doctor_says_the_guard_is_not_active(ws: Workspace,
                                                                                    monkeypatch) -> None:
    monkeypatch.setattr(seccomp, "MACHINES", ())
    guard = line(doctor(ws), "setuid/lease guard:")
    assert guard.startswith("setuid/lease guard: NOT ACTIVE on this machine (the filter does not know "
                            "this machine's system calls"), guard
    monkeypatch.setattr(landlock, "abi_version", lambda: 0)
    assert "which this kernel lacks" in line(doctor(ws), "setuid/lease guard:")


def test_before_abi_6_doctor_says_signals_are_not_scoped(ws: Workspace, monkeypatch) -> None:
    monkeypatch.setattr(landlock, "abi_version", lambda: 5)
    lines = doctor(ws)
    assert line(lines, "landlock:").startswith("landlock: ABI 5")
    assert "signals are not scoped" in line(lines, "scopes:")
    assert "ioctl_dev" in line(lines, "filesystem rights handled:")


def test_a_misspelt_placeholder_and_a_missing_sandbox_folder_are_warned_of(make_ws, tmp_path) -> None:
    gone = tmp_path / "not-made-yet"
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/**"],
                           "command": ["/bin/sh", "-c", 'home=1; echo "${home}" {id} | awk "{print}"', "{breif}",
                                       "{brief}", "{Work-Dir}", "{name}", 'python -c \'print(f"{x}")\'', "{idx}{pid}{ID}"],
                           "sandbox": {"writable": [str(gone)]}}})
    lines = doctor(ws)
    warnings = [x.strip() for x in lines if x.strip().startswith("WARNING: ")]
    assert warnings == [
        "WARNING: command.3: {breif} is not a placeholder and is passed as is; did you mean {brief}? "
        "(the placeholders: {id}, {order}, {brief}, {brief_text}, {workdir}, {result}, {python}, {workspace})",
        "WARNING: command.5: {Work-Dir} is not a placeholder and is passed as is; did you mean {workdir}? "
        "(the placeholders: {id}, {order}, {brief}, {brief_text}, {workdir}, {result}, {python}, {workspace})",
        "WARNING: command.8: {ID} is not a placeholder and is passed as is; did you mean {id}? "
        "(the placeholders: {id}, {order}, {brief}, {brief_text}, {workdir}, {result}, {python}, {workspace})",
        f"WARNING: sandbox.writable: {gone} does not exist; its orders cannot start until it does",
    ]
    said: list[str] = []
    with Supervisor(ws, log=said.append):
        pass
    assert [s for s in said if s.startswith("WARNING: agents.chip.")] == [
        "WARNING: agents.chip." + w.removeprefix("WARNING: ") for w in warnings]


def test_stale_after_no_shorter_than_the_timeout_is_warned_of(make_ws) -> None:
    """Such an attempt is killed at its timeout before it could ever be flagged stale: the flag
    the user set up never shows, and nothing said so."""
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/**"], "command": ["true"],
                           "timeout": "5m", "stale_after": "10h"},
                  "rex": {"role": "specialist", "writes": ["webapp/**"], "command": ["true"],
                          "timeout": "5m", "stale_after": "1m"}})
    warned = "stale_after: 36000s is not shorter than its timeout (300s): an attempt is killed before it could " \
             "be flagged stale; make stale_after shorter"
    assert [x.strip() for x in doctor(ws) if "WARNING" in x] == [f"WARNING: {warned}"]
    said: list[str] = []
    with Supervisor(ws, log=said.append):
        pass
    assert [s for s in said if s.startswith("WARNING: agents.")] == [f"WARNING: agents.chip.{warned}"]


def test_a_multi_line_command_is_shown_on_one_line(make_ws) -> None:
    script = 'set -e\necho "working on $COORD_ORDER_ID"\n\tprintf done > "$COORD_RESULT"\n'
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/**"], "command": sh(script)}})
    lines = doctor(ws)
    assert not any(x.startswith(("echo", "\tprintf", "printf")) for x in lines), lines
    assert line(lines, "chip:") == ('  chip: specialist, command: /bin/sh -c set -e\\necho "working on '
                                    '$COORD_ORDER_ID"\\n\\tprintf done > "$COORD_RESULT"\\n')
    preset = ["claude", "-p", "--permission-mode", "acceptEdits", "--output-format", "json", "{brief_text}"]
    flags = make_ws({"chip": {"role": "specialist", "writes": ["webapp/**"], "command": preset}})
    assert line(doctor(flags), "chip:").startswith(
        "  chip: specialist, command: claude -p --permission-mode acceptEdits --output-format json {brief_text}")
    long = make_ws({"chip": {"role": "specialist", "writes": ["webapp/**"], "command": sh("true\n" * 100)}})
    shown = line(doctor(long), "chip:").removeprefix("  chip: specialist, command: ")
    assert shown == ("/bin/sh -c " + "true\\n" * 100)[:119] + "…"


def test_doctor_says_what_in_the_workspace_stops_every_command(ws: Workspace) -> None:
    """A file where an inbox folder belongs stops every other command; doctor said all was well."""
    shutil.rmtree(ws.inbox("chip"))
    ws.inbox("chip").write_text("not a folder\n")
    result = CliRunner().invoke(cli, ["-w", str(ws.root), "doctor"])
    assert result.exit_code == 2
    said = ("inbox/chip is not a folder; the workspace needs a folder there: move it away (`coordinator "
            "supervise` makes what is missing)")
    assert f"workspace: PROBLEM — {said}" in result.stdout.splitlines()
    assert result.stderr == f"coordinator: {said}\n"


def test_doctor_warns_of_a_repository_the_team_writes_that_orders_cannot_use(ws: Workspace) -> None:
    webapp = ws.repos / "webapp"
    assert not [x for x in doctor(ws) if x.startswith("repos/")]
    shutil.rmtree(webapp / ".git")  # a folder of the user's own, not a repository
    until = "; until then every order naming webapp/… is refused or fails"
    assert [x for x in doctor(ws) if x.startswith("repos/")] == [
        "repos/webapp: WARNING: is not a git repository: clone the repository there, or `git init` it and make "
        "a first commit" + until]
    subprocess.run(["git", "init", "-q", str(webapp)], check=True)  # no commit yet: every attempt fails
    assert [x for x in doctor(ws) if x.startswith("repos/")] == [
        "repos/webapp: WARNING: has no commit yet: make a first commit on its default branch" + until]
    shutil.rmtree(webapp)
    assert [x for x in doctor(ws) if x.startswith("repos/")] == [
        "repos/webapp: WARNING: does not exist: clone the repository there, or `git init` it and make a first "
        "commit" + until]
    subprocess.run(["git", "init", "-q", "--bare", str(webapp)], check=True)  # was said to be no repository at all
    assert [x for x in doctor(ws) if x.startswith("repos/")] == [
        "repos/webapp: WARNING: is a bare repository, with no checkout for orders to land in; move it away and put "
        "a clone of it there (git clone <it> repos/webapp)" + until]


def test_doctor_says_when_the_open_files_limit_is_below_what_supervise_needs(ws: Workspace) -> None:
    """`ulimit -n 20`: `supervise` refuses to start, and doctor showed "open files 20/20" as fine."""
    import sys

    coordinator = str(Path(sys.executable).with_name("coordinator"))
    low = subprocess.run(["prlimit", "--nofile=20", coordinator, "-w", str(ws.root), "doctor"],
                         capture_output=True, text=True, timeout=60)
    assert ("limits: open files 20/20 — PROBLEM: `supervise` needs 32 or more to run an order; raise "
            "`ulimit -n`") in low.stdout.splitlines()
    refused = subprocess.run(["prlimit", "--nofile=20", coordinator, "-w", str(ws.root), "supervise", "--once"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "`ulimit -n`" in refused.stderr
    fine = subprocess.run([coordinator, "-w", str(ws.root), "doctor"], capture_output=True, text=True, timeout=60)
    assert not [line for line in fine.stdout.splitlines() if line.startswith("limits:") and "PROBLEM" in line]


def test_an_llm_agents_model_is_shown_on_one_line_with_no_escape(make_ws) -> None:
    """The model is shown as the config has it: a line break in it ran doctor's line over two, and
    an escape sequence reached the terminal (one that clears the screen cleared it)."""
    from coordinator.doctor import report

    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/**"],
                           "llm": {"base_url": "http://127.0.0.1:9/", "model": "m\x1b[2Jodel\nx"}}})
    assert line(report(ws), "chip:") == "  chip: specialist, llm m\\x1b[2Jodel\\nx"


def test_an_llm_agents_key_variable_that_is_not_set_is_said_by_doctor_and_at_start(make_ws, monkeypatch):
    """Every call of such an agent failed ("SOME_KEY is not set"), each order after max_failures
    attempts; neither doctor nor the supervisor's start had said a word."""
    monkeypatch.delenv("MISSING_TEST_KEY", raising=False)
    monkeypatch.setenv("PRESENT_TEST_KEY", "sk-test-0123456789abcdef")
    ws = make_ws({"qwen": {"role": "specialist", "llm": {
        "base_url": "http://127.0.0.1:9/v1", "model": "qwen3-coder", "api_key_env": "MISSING_TEST_KEY",
        "fallback": [{"model": "backup", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "PRESENT_TEST_KEY"}]}}})
    warning = ("llm.api_key_env: MISSING_TEST_KEY is not set here, and model qwen3-coder is asked with the key it "
               "holds: each call to it fails until it is exported (or set api_key_env: null for a server that "
               "needs no key)")
    out = CliRunner().invoke(cli, ["-w", str(ws.root), "doctor"]).output
    assert f"    WARNING: {warning}" in out.splitlines()
    assert "PRESENT_TEST_KEY" not in out
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        sup.run_once(limit=10)
    assert [line for line in said if "api_key_env" in line or "fallback" in line] == [
        f"WARNING: agents.qwen.{warning}"]


@pytest.mark.parametrize("long", ["a" * 256, "a/" * 2100])
def test_a_sandbox_folder_no_file_system_could_hold_is_a_config_error_doctor_says(make_ws, tmp_path, long) -> None:
    # Taken, doctor (and the supervisor's start) stopped with "internal error: OSError: File
    # name too long" while every other command ran on.
    ws = make_ws({"chip": {"role": "specialist", "writes": ["webapp/**"], "command": sh("true")}})
    team = yaml.safe_load(ws.config_path.read_text())
    team["agents"]["chip"]["sandbox"] = {"writable": [f"{tmp_path}/{long}"]}
    ws.config_path.write_text(yaml.safe_dump(team))
    said = CliRunner().invoke(cli, ["-w", str(ws.root), "doctor"])
    assert said.exit_code == 2, said.output
    assert "team: CANNOT BE READ — coordinator.yaml: agents.chip.sandbox.writable.0: " in said.output
    assert ("a file name is at most 255" if "/" not in long else "a path is at most 4095") in said.output
    board = CliRunner().invoke(cli, ["-w", str(ws.root), "board"])
    assert board.exit_code == 2 and "agents.chip.sandbox.writable.0: " in board.output


def test_an_llm_endpoint_a_key_would_reach_over_plain_http_is_said_by_doctor_and_at_start(make_ws, monkeypatch):
    """base_url: http://api.openai.com/v1 (one letter short of https) with a key set: the model is
    never asked (the key would cross the network in clear), yet doctor said nothing and the start
    neither; the user learnt it only from orders blocked or answered by the fallback."""
    monkeypatch.setenv("PRESENT_TEST_KEY", "sk-test-0123456789abcdef")
    ws = make_ws({"qwen": {"role": "specialist", "llm": {
        "base_url": "http://api.openai.com/v1", "model": "gpt-5-mini", "api_key_env": "PRESENT_TEST_KEY",
        "fallback": [{"model": "local", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "PRESENT_TEST_KEY"}]}}})
    warning = ("llm.base_url: http://api.openai.com/v1 is plain http:// across the network, so the key in "
               "PRESENT_TEST_KEY is never sent there and model gpt-5-mini is never asked; use the endpoint's "
               "https:// address")
    out = CliRunner().invoke(cli, ["-w", str(ws.root), "doctor"]).output
    assert f"    WARNING: {warning}" in out.splitlines()
    assert "local" not in "\n".join(x for x in out.splitlines() if "WARNING" in x)  # loopback may carry a key
    assert "sk-test-0123456789abcdef" not in out
    said: list[str] = []
    with Supervisor(ws, log=said.append) as sup:
        sup.run_once(limit=10)
    assert [x for x in said if "plain http" in x] == [f"WARNING: agents.qwen.{warning}"]
