"""The workspace library: finding one (-w, $COORDINATOR_WORKSPACE, upward), making one, its paths."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from coordinator import config
from coordinator.errors import ConfigError, CoordinatorError, UsageError, WorkspaceError
from coordinator.workspace import ENV_VAR, NO_WORKSPACE, RUNTIME, Workspace, example_config, init


@pytest.fixture
def made(tmp_path: Path) -> Workspace:
    ws, _ = init(tmp_path / "team")
    return ws


def test_init_makes_config_inboxes_state_repository_and_demo_repository(tmp_path: Path) -> None:
    ws, lines = init(tmp_path / "new" / "team")  # missing parents are made too
    assert ws.root == (tmp_path / "new" / "team").resolve()
    assert ws.config_path.read_text() == example_config()
    assert sorted(p.name for p in ws.inbox_root.iterdir()) == sorted(ws.config.agents)
    assert (ws.state / ".git").is_dir() and (ws.repos / "webapp" / ".git").exists()
    assert (ws.root / ".gitignore").read_text() == f"{RUNTIME}/\n"
    assert lines[0] == "wrote coordinator.yaml"
    assert "initialised state/ (git repository, first commit)" in lines
    assert "created repos/webapp (demo repository)" in lines


def test_init_never_overwrites_a_config_without_force(made: Workspace) -> None:
    made.config_path.write_text("version: 1\nagents: {}\n")
    with pytest.raises(CoordinatorError, match="already exists; pass --force to overwrite it"):
        init(made.root)
    assert made.config_path.read_text() == "version: 1\nagents: {}\n"
    ws, lines = init(made.root, force=True)
    assert ws.config_path.read_text() == example_config()
    assert lines == ["wrote coordinator.yaml"]  # everything else was already there: nothing redone


def test_init_refuses_a_file_where_the_folder_should_be(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UsageError, match="is not a folder"):
        init(tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "a file"
    with pytest.raises(UsageError, match="cannot make .*/taken/sub: Not a directory"):
        init(tmp_path / "taken" / "sub")  # a file where a parent folder should be


def test_init_inside_a_git_repository_leaves_its_ignore_file_alone(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    init(tmp_path)
    assert not (tmp_path / ".gitignore").exists()


def test_the_example_config_is_the_offline_demo_team(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text(example_config())
    team = config.load(path)
    assert team.orchestrator == "walt"
    assert {n: a.role for n, a in team.agents.items()} == {"walt": "orchestrator", "chip": "specialist",
                                                           "rex": "specialist"}
    assert all(a.runnable or a.is_orchestrator for a in team.agents.values())


TEAM = """version: 1
agents:
  chip:
    role: specialist
    command: ["true"]
    writes: ["webapp/src/**"]
"""


@pytest.mark.parametrize(("line", "key"), [
    ('    sandbox: {writable: ["/tmp/a\\0b"]}\n', "agents.chip.sandbox.writable.0"),
    ('    env: {A: "x\\0y"}\n', "agents.chip.env.A"),
    ('    description: "a\\0"\n', "agents.chip.description"),
])
def test_a_nul_written_as_an_escape_in_the_config_is_refused_at_its_key(made: Workspace, line: str,
                                                                        key: str) -> None:
    made.config_path.write_text(TEAM + line)
    with pytest.raises(ConfigError, match=rf"^coordinator.yaml: {key}: holds a NUL character") as e:
        _ = Workspace(made.root).config  # a sandbox path stopped every command with an internal error
    assert "\n" not in str(e.value)
    made.config_path.write_text(TEAM.replace('["true"]', '["true", "a\\0b"]'))
    with pytest.raises(ConfigError, match=r"agents.chip.command.1: holds a NUL character"):
        config.load(made.config_path)


@pytest.mark.parametrize(("change", "said"), [
    (('["true"]', '[""]'), "agents.chip.command.0: is empty; the first entry is the program to run"),
    (('["true"]', '["true"]\n    env: {"A=B": x}'),
     "agents.chip.env: 'A=B' is not an environment variable name (not empty, no '=')"),
    (('["true"]', '["true"]\n    env: {"": x}'),
     "agents.chip.env: '' is not an environment variable name (not empty, no '=')"),
])
def test_a_command_or_environment_no_attempt_could_start_with_is_refused_at_its_key(
        made: Workspace, change: tuple[str, str], said: str) -> None:
    # Taken, each made every attempt of the agent fail ("illegal environment variable name").
    made.config_path.write_text(TEAM.replace(*change))
    with pytest.raises(ConfigError) as e:
        config.load(made.config_path)
    assert str(e.value) == f"coordinator.yaml: {said}"
    made.config_path.write_text(TEAM.replace('["true"]', '["true", ""]\n    env: {"a.b-c": ""}'))
    assert config.load(made.config_path).agents["chip"].command == ("true", "")  # an empty argument is one


def test_escalating_to_an_agent_that_cannot_run_orders_is_refused(made: Workspace) -> None:
    # Taken, each blocked order filed an investigation to it that intake rejected at once.
    made.config_path.write_text(TEAM + "  idle: {role: specialist}\nescalate_to: idle\n")
    with pytest.raises(ConfigError) as e:
        config.load(made.config_path)
    assert str(e.value) == ("coordinator.yaml: escalate_to: idle has no `command` or `llm`, so the investigation "
                            "orders it gets could never run; give it one, or escalate to another agent")
    made.config_path.write_text(TEAM + "  walt: {role: orchestrator}\nescalate_to: walt\n")
    assert config.load(made.config_path).escalate_to == "walt"  # an external orchestrator reads its queue


def test_find_prefers_w_then_the_environment_then_the_nearest_folder_upward(
        made: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other, _ = init(tmp_path / "other")
    monkeypatch.setenv(ENV_VAR, str(other.root))
    assert Workspace.find(str(made.root)).root == made.root
    assert Workspace.find(None, cwd=made.repos).root == other.root
    monkeypatch.delenv(ENV_VAR)
    deep = made.repos / "webapp" / "src"
    assert Workspace.find(None, cwd=deep).root == made.root
    assert Workspace.find(None, cwd=made.root).root == made.root


def test_find_relative_w_and_tilde(made: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(made.root.parent)
    assert Workspace.find(made.root.name).root == made.root
    monkeypatch.setenv("HOME", str(made.root.parent))
    assert Workspace.find(f"~/{made.root.name}").root == made.root


def test_a_tilde_that_names_no_home_folder_is_said_not_taken_for_another_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty HOME made `-w '~/team'` the root's /team; an unknown user's `~nosuchuser-ws/team`
    stopped the command with an internal error (or init made a folder named `~nosuchuser-ws`)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "")
    with pytest.raises(WorkspaceError) as e:
        Workspace.find("~/team")
    assert str(e.value) == "-w: ~/team: HOME is empty, so ~ names no home folder; give the folder's absolute path"
    assert e.value.exit_code == 2
    with pytest.raises(WorkspaceError, match=r"^~/team: HOME is empty"):
        init(Path("~/team"))
    for attempt in (lambda: Workspace.find("~nosuchuser-ws/team"), lambda: init(Path("~nosuchuser-ws/team"))):
        with pytest.raises(WorkspaceError, match="no user 'nosuchuser-ws' on this system, so ~nosuchuser-ws "
                                                 "names no home folder; give the folder's absolute path"):
            attempt()
    assert list(tmp_path.iterdir()) == []  # no folder named "~nosuchuser-ws" made here


def test_find_says_what_to_do_when_there_is_no_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WorkspaceError) as e:
        Workspace.find(None, cwd=tmp_path)
    assert str(e.value) == NO_WORKSPACE and e.value.exit_code == 2
    with pytest.raises(WorkspaceError, match=rf"^-w: {tmp_path} has no coordinator.yaml; run `coordinator init"):
        Workspace.find(str(tmp_path))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(WorkspaceError, match=rf"^\${ENV_VAR}: {tmp_path / 'gone'} has no coordinator.yaml"):
        Workspace.find(None, cwd=tmp_path)


def test_a_config_folder_named_like_the_file_is_not_a_workspace(tmp_path: Path) -> None:
    (tmp_path / "coordinator.yaml").mkdir()
    with pytest.raises(WorkspaceError, match="^no workspace"):
        Workspace.find(None, cwd=tmp_path)


def test_a_w_that_is_no_workspace_is_told_what_it_is_so_the_advice_works(made: Workspace, tmp_path: Path) -> None:
    root = made.root
    cases = {
        root / "coordinator.yaml": f"-w: {root / 'coordinator.yaml'} is the config file; pass its folder: -w {root}",
        root / "inbox" / "chip": f"-w: {root / 'inbox' / 'chip'} is inside the workspace {root}; pass -w {root}",
    }
    (tmp_path / "odd" / "coordinator.yaml").mkdir(parents=True)
    cases[tmp_path / "odd"] = (f"-w: {tmp_path / 'odd' / 'coordinator.yaml'} is not a regular file; the "
                               "workspace's config must be one")
    for given, said in cases.items():
        with pytest.raises(WorkspaceError) as e:
            Workspace.find(str(given))
        assert str(e.value) == said and e.value.exit_code == 2


def test_paths_are_shown_relative_to_the_workspace(made: Workspace, tmp_path: Path) -> None:
    assert made.rel(made.inbox("chip") / "fix.md") == "inbox/chip/fix.md"
    outside = tmp_path / "elsewhere.md"
    assert made.rel(outside) == str(outside)


def test_paths_resolve_through_links_as_realpath_does(tmp_path: Path) -> None:
    from coordinator.paths import real

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for p in ("link/b", "link/b/../b", "link/missing/x", "dangling", "loop", "a", "."):
        assert real(tmp_path / p) == os.path.realpath(tmp_path / p), p
    assert real(tmp_path / "link" / "b") == str(tmp_path.resolve() / "a" / "b")


def test_the_agent_of_an_inbox_file(made: Workspace, tmp_path: Path) -> None:
    assert made.agent_of_inbox(made.inbox("chip") / "fix.md") == "chip"
    assert made.agent_of_inbox(made.inbox("chip") / "sub" / "fix.md") is None
    assert made.agent_of_inbox(made.root / "fix.md") is None
    assert made.agent_of_inbox(tmp_path / "inbox" / "chip" / "fix.md") is None  # another folder's inbox


def test_ensure_layout_makes_only_what_is_missing(made: Workspace) -> None:
    assert made.ensure_layout() == []
    (made.inbox("rex")).rmdir()
    assert made.ensure_layout() == ["inbox/rex"]
    assert made.inbox("rex").is_dir()



@pytest.mark.parametrize(("was", "now", "said"), [
    ("on_ceiling: rotate", "on_ceiling: no",  # in quotes it is no choice either: what YAML did is said
     "budget.on_ceiling: must be one of rotate, fresh, warn, not false; `on_ceiling: no` was read by YAML as false"),
    ("orchestrator: walt", "orchestrator: no",  # `no` is a name: in quotes it is one
     "orchestrator: must be an agent name (a lowercase letter, then up to 31 lowercase letters, digits, '-' or '_'), "
     'not false; `orchestrator: no` was read by YAML as false: put it in quotes ("no")'),
    ("  rex:", "  no:",
     "agents: 'false' is not an agent name (a lowercase letter, then up to 31 lowercase letters, digits, '-' or "
     "'_'); the key `no:` was read by YAML as false: put it in quotes (\"no\":)"),
])
def test_a_config_value_yaml_read_as_true_or_false_says_so_as_an_order_does(made: Workspace, was: str, now: str,
                                                                             said: str) -> None:
    """`on_ceiling: no` was refused as "not false", an agent named `no` as "'false' is not an
    agent name": the user was left to guess where a false came from."""
    made.config_path.write_text(made.config_path.read_text().replace(was, now, 1))
    with pytest.raises(ConfigError) as refused:
        config.load(made.config_path)
    assert str(refused.value) == f"coordinator.yaml: {said}"


def test_a_writable_folder_of_an_unknown_users_home_says_so(made: Workspace) -> None:
    """`~nosuchuser/x` was refused with "must be absolute or start with ~": it does start with ~."""
    made.config_path.write_text(made.config_path.read_text().replace(
        "    sends_to: [chip]\n", "    sends_to: [chip]\n    sandbox: {writable: ['~nosuchuser-cli/x']}\n", 1))
    with pytest.raises(ConfigError) as refused:
        config.load(made.config_path)
    assert str(refused.value) == ("coordinator.yaml: agents.rex.sandbox.writable.0: '~nosuchuser-cli/x': no user "
                                  "'nosuchuser-cli' on this system, so ~nosuchuser-cli names no home folder; write "
                                  "the folder's absolute path")


def test_a_config_that_is_not_utf8_says_the_line_of_the_first_odd_byte(made: Workspace) -> None:
    """Said as "is not UTF-8 text" alone, a Latin-1 "é" in one description left the user searching."""
    text = made.config_path.read_text()
    line = text[:text.index("Coder.")].count("\n") + 1
    made.config_path.write_bytes(text.replace("Coder.", "Cod\xe9r.", 1).encode("latin-1"))
    with pytest.raises(ConfigError) as refused:
        config.load(made.config_path)
    assert str(refused.value) == f"coordinator.yaml: is not UTF-8 text (line {line}: byte 0xe9); save it as UTF-8"


@pytest.mark.parametrize(("was", "now", "hint"), [
    ('writes: ["webapp/docs/reviews/**"]', "writes: [*.md]",
     'a value that starts with * is read by YAML as an alias (*name): put it in quotes ("*.md")'),
    ('writes: ["webapp/docs/reviews/**"]', "writes: [`x`]", "a value cannot start with ` in YAML: put it in quotes"),
    ("description: Coder.", "description: Coder: the one",
     'a value with ": " in it must be in quotes (description: "Coder: the one Edits the webapp\'s source and '
     'tests.")'),
])
def test_a_config_value_yaml_cannot_read_unquoted_says_to_quote_it(made: Workspace, was: str, now: str,
                                                                   hint: str) -> None:
    """PyYAML's words ("did not find expected alphabetic or numeric character") named neither the
    glob read as an alias nor the quotes that fix it."""
    made.config_path.write_text(made.config_path.read_text().replace(was, now, 1))
    with pytest.raises(ConfigError) as refused:
        config.load(made.config_path)
    assert str(refused.value).startswith("coordinator.yaml: is not valid YAML at line ")
    assert str(refused.value).endswith(f"; {hint}")
    made.config_path.write_text(made.config_path.read_text().replace("    role: specialist\n", "   role: specialist\n",
                                                                     1).replace(now, was, 1))
    with pytest.raises(ConfigError) as misindented:  # the ": " of a key is no value's: no hint
        config.load(made.config_path)
    assert str(misindented.value).endswith(": mapping values are not allowed in this context")


def test_a_workspace_named_by_a_path_too_long_is_said_in_one_line(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """-w or $COORDINATOR_WORKSPACE with a name past the file system's 255 bytes was "internal
    error: OSError: [Errno 36] File name too long", with the whole path after it."""
    long = tmp_path / ("a" * 300)
    with pytest.raises(WorkspaceError) as refused:
        Workspace.find(long)
    said = str(refused.value)
    assert said.startswith(f"-w: {str(long)[:100]}…") and said.endswith("a: File name too long; pass the workspace's "
                                                                         "folder")
    assert len(said) < 300
    monkeypatch.setenv(ENV_VAR, str(long))
    with pytest.raises(WorkspaceError, match=r"^\$COORDINATOR_WORKSPACE: .*: File name too long"):
        Workspace.find(None)


def test_a_workspace_under_a_file_is_said_to_be_impossible_not_to_need_init(tmp_path: Path) -> None:
    """`-w notes.md/team` was told "run `coordinator init …`", which then refused: "Not a directory"."""
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(WorkspaceError) as refused:
        Workspace.find(tmp_path / "notes.md" / "team")
    assert str(refused.value) == (f"-w: {tmp_path / 'notes.md' / 'team'} cannot be a folder: {tmp_path / 'notes.md'} "
                                  "is a file")


@pytest.mark.parametrize("inside", ["state", "inbox/chip", "repos/team", ".coordinator/team"])
def test_init_refuses_a_folder_another_workspace_owns(made: Workspace, inside: str) -> None:
    # Made there, the new config and folders were uncommitted changes in the audit trail
    # (`audit verify` failed) or files in chip's inbox, taken for work orders.
    target = made.root / inside
    with pytest.raises(UsageError, match=f"{inside.split('/')[0]}/ of the workspace {made.root}"):
        init(target)
    assert not (target / "coordinator.yaml").exists()
    assert not (made.state / "coordinator.yaml").exists()
    assert sorted(p.name for p in made.inbox("chip").iterdir()) == []
    ws, _ = init(made.root / "docs" / "team")  # elsewhere under it is the user's to choose
    assert ws.config_path.is_file()


@pytest.mark.parametrize(("variable", "said"), [
    ("TMPDIR", "each attempt gets a private TMPDIR (in its attempt folder), so a value here is never seen"),
    ("COORD_RESULT", "the COORD_ variables are the supervisor's, set for every attempt, so a value here is never"),
    ("PYTHONDONTWRITEBYTECODE", "the supervisor sets it for every attempt"),
])
def test_an_environment_variable_the_supervisor_sets_over_the_agents_is_refused(
        made: Workspace, variable: str, said: str) -> None:
    # Taken, `env: {TMPDIR: /var/tmp}` was dropped unsaid: every attempt ran with the supervisor's.
    made.config_path.write_text(TEAM.replace('["true"]', f'["true"]\n    env: {{{variable}: /var/tmp}}'))
    with pytest.raises(ConfigError) as e:
        _ = Workspace(made.root).config
    assert str(e.value).startswith(f"coordinator.yaml: agents.chip.env.{variable}: {said}")
    assert "remove it" in str(e.value)


@pytest.mark.parametrize(("llm", "key", "said"), [
    ('{base_url: "http://127.0.0.1:11434/v1#api-version=1", model: m}', "llm.base_url",
     "has a #fragment, which is never sent"),
    ('{base_url: "http://h/v1", model: m, fallback: [{model: n, base_url: "https://h/v1#x"}]}',
     "llm.fallback.0.base_url", "has a #fragment"),
    ('{base_url: "http://", model: m}', "llm.base_url", "names no host"),
    ('{base_url: "http://local host:8000/v1", model: m}', "llm.base_url", "holds a space"),
    ('{base_url: "http://u:secret@h:99999/v1", model: m}', "llm.base_url", "is not a URL (Port out of range"),
    # A gateway's key in the query is never said either (the error may go to a kept log).
    ('{base_url: "https://h:99999/v1?api-version=1&api-key=secret", model: m}', "llm.base_url",
     "'https://h:99999/v1?api-version=…&api-key=…' is not a URL"),
    ('{base_url: "https://h/v1?key=secret#top", model: m}', "llm.base_url", "'https://h/v1?key=…#top' has a #fragment"),
])
def test_a_base_url_no_call_could_reach_is_refused_at_its_key(made: Workspace, llm: str, key: str, said: str) -> None:
    # Taken, each of these failed every call, and every order of the agent was blocked (a
    # fragment was dropped unsaid). A query is kept: a gateway's api-version is sent with each call.
    made.config_path.write_text(TEAM.replace('command: ["true"]', f"llm: {llm}"))
    with pytest.raises(ConfigError) as e:
        _ = Workspace(made.root).config
    assert str(e.value).startswith(f"coordinator.yaml: agents.chip.{key}: ")
    assert said in str(e.value) and "secret" not in str(e.value)
    made.config_path.write_text(TEAM.replace('command: ["true"]', 'llm: {base_url: "http://[::1]:8000/v1/", model: m}'))
    assert Workspace(made.root).config.agents["chip"].llm.primary.base_url == "http://[::1]:8000/v1"  # type: ignore[union-attr]
    made.config_path.write_text(TEAM.replace('command: ["true"]', 'llm: {base_url: "https://h/v1?api-version=1", model: m}'))
    assert Workspace(made.root).config.agents["chip"].llm.primary.base_url == "https://h/v1?api-version=1"  # type: ignore[union-attr]


def test_init_refuses_a_state_folder_that_is_not_a_workspaces_audit_trail(tmp_path: Path) -> None:
    # Taken in, a folder of the user's own had its files committed into the audit trail (where
    # every agent may read them), and a repository of theirs failed `audit verify` at once.
    mine = tmp_path / "mine"
    (mine / "state").mkdir(parents=True)
    (mine / "state" / "terraform.tfstate").write_text("secret\n")
    with pytest.raises(UsageError, match=r"state holds files and is no audit trail of a workspace"):
        init(mine)
    assert not (mine / "coordinator.yaml").exists() and not (mine / "state" / ".git").exists()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "state").symlink_to(mine / "state")  # reached through a link, it is the same folder
    with pytest.raises(UsageError, match=r"state holds files and is no audit trail of a workspace"):
        init(linked)
    theirs = tmp_path / "theirs"
    (theirs / "state").mkdir(parents=True)
    git = ["git", "-C", str(theirs / "state"), "-c", "user.name=me", "-c", "user.email=me@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "mine"], check=True)
    with pytest.raises(UsageError, match=r"state is a git repository the supervisor did not make"):
        init(theirs)
    assert not (theirs / "coordinator.yaml").exists()
    ws, _ = init(tmp_path / "team")  # the supervisor's own state/ is taken again, config lost or not
    ws.config_path.unlink()
    again, _ = init(ws.root)
    assert again.config_path.is_file()


@pytest.mark.parametrize(("key", "said"), [
    ("yes", "'true' is not an environment variable name; the key `yes:` was read by YAML as true: put it in quotes "
            '("yes":)'),
    ("1", "'1' is not an environment variable name: YAML read the key as the number 1; put it in quotes to mean text"),
    ("2026-01-01", "'2026-01-01' is not an environment variable name: YAML read the key as the date 2026-01-01 "
                   "(put it in quotes to mean text)"),
    ("~", "'null' is not an environment variable name: YAML read the key as null; put it in quotes to mean text"),
])
def test_an_environment_key_yaml_reads_as_no_text_is_refused_at_its_key(made: Workspace, key: str, said: str) -> None:
    # Unquoted, each stopped every command with "internal error: TypeError" (exit 70).
    made.config_path.write_text(TEAM.replace('["true"]', f'["true"]\n    env: {{{key}: x}}'))
    with pytest.raises(ConfigError) as e:
        config.load(made.config_path)
    assert str(e.value) == f"coordinator.yaml: agents.chip.env: {said}"
    made.config_path.write_text(TEAM.replace('["true"]', f'["true"]\n    env: {{"{key}": x}}'))
    assert config.load(made.config_path).agents["chip"].env == ((key, "x"),)


@pytest.mark.parametrize(("line", "key", "said"), [
    ("    timeout: 1:30\n", "agents.chip.timeout",
     "`1:30` was read by YAML as 90 (base 60, as a time of day); write a duration such as 90m or 1.5h"),
    ("    max_failures: 010\n", "agents.chip.max_failures", "`010` was read by YAML as 8 (octal, for its leading 0); "
                                                          "write 10"),
    ("    env: {DELAY: 1:30}\n", "agents.chip.env.DELAY", "or put it in quotes if it is text"),
])
def test_a_number_yaml_reads_in_base_60_or_octal_is_refused_at_its_key(
        made: Workspace, line: str, key: str, said: str) -> None:
    # Taken, `timeout: 1:30` killed every attempt after 90 seconds, and `max_failures: 010`
    # allowed 8 failures, with nothing said.
    made.config_path.write_text(TEAM + line)
    with pytest.raises(ConfigError) as e:
        _ = Workspace(made.root).config
    assert str(e.value).startswith(f"coordinator.yaml: {key}: ") and said in str(e.value)
    made.config_path.write_text(TEAM + "    timeout: 90m\n    max_failures: 10\n    env: {DELAY: \"1:30\"}\n")
    chip = Workspace(made.root).config.agents["chip"]
    assert (chip.timeout, chip.max_failures, chip.env) == (5400.0, 10, (("DELAY", "1:30"),))


def test_two_writes_globs_in_one_entry_are_refused_at_their_key(made: Workspace) -> None:
    # Taken as one glob holding ", ": neither folder was writable, and every order for them refused.
    made.config_path.write_text(TEAM.replace('["webapp/src/**"]', '["webapp/src/**, webapp/tests/**"]'))
    with pytest.raises(ConfigError) as e:
        config.load(made.config_path)
    assert str(e.value) == ("coordinator.yaml: agents.chip.writes.0: 'webapp/src/**, webapp/tests/**' reads as 2 "
                            "paths in one entry; give each path an entry of its own")
