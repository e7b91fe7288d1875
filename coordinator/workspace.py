"""The workspace: where the team's config, inboxes, repositories and state live.

    <workspace>/
      coordinator.yaml     the team
      inbox/<agent>/       drop work orders here
      repos/<repo>/        git repositories the specialists work in
      state/               the supervisor's git repository: the audit trail
      .coordinator/        runtime scratch (working copies, attempt folders, pid file); never audited

Example:
    >>> ws = Workspace.find(None)          # -w, $COORDINATOR_WORKSPACE, or upward search
    >>> ws.inbox("chip")
    PosixPath('/home/me/team/inbox/chip')
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

from . import config as config_mod
from .config import CONFIG_NAME, Config
from .errors import ConfigError, CoordinatorError, UsageError, WorkspaceError
from .paths import real

ENV_VAR = "COORDINATOR_WORKSPACE"
RUNTIME = ".coordinator"
NO_WORKSPACE = "no workspace: run `coordinator init` or pass -w"
GONE = ("the current folder no longer exists (removed or moved away since this shell entered it): cd into a "
        "folder that exists, or pass -w and absolute paths")


RUNTIME_FILES = ("supervisor.pid", "state-journal", "state-head", "state-foreign", "state-lost", "running",
                 "supervisor.config", "cut-by-stop.json")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def find(cls, explicit: str | os.PathLike[str] | None, *, cwd: Path | None = None) -> Workspace:
        """The workspace from `-w`, else $COORDINATOR_WORKSPACE, else the nearest folder upward."""
        if explicit is not None:
            return cls._at(given_folder(explicit), "-w")
        env = os.environ.get(ENV_VAR)
        if env:
            return cls._at(Path(env), f"${ENV_VAR}")
        here = (cwd or current_folder()).resolve()
        for folder in (here, *here.parents):
            if (folder / CONFIG_NAME).is_file():
                _check_utf8(folder)
                return cls(folder)
        raise WorkspaceError(NO_WORKSPACE)

    @classmethod
    def _at(cls, path: Path, source: str) -> Workspace:
        path = _resolved(path, source)
        _check_utf8(path, source)
        try:
            config = path / CONFIG_NAME
            if config.is_file():
                return cls(path)
            # Say what the path is, so that the advice given works.
            if path.name == CONFIG_NAME and not path.is_dir():
                raise WorkspaceError(f"{source}: {path} is the config file; pass its folder: -w {path.parent}")
            if path.exists() and not path.is_dir():  # a FIFO or a device too: init there would refuse it
                raise WorkspaceError(f"{source}: {path} is a file, not a workspace folder")
            if config.exists():
                raise WorkspaceError(f"{source}: {config} is not a regular file; the workspace's config must be one")
            outer = next((f for f in path.parents if (f / CONFIG_NAME).is_file()), None)
            if outer is not None:
                raise WorkspaceError(f"{source}: {path} is inside the workspace {outer}; pass -w {outer}")
            under = next((f for f in path.parents if f.exists()), None)
            if under is not None and not under.is_dir():  # init would refuse it: "cannot make … Not a directory"
                raise WorkspaceError(f"{source}: {path} cannot be a folder: {under} is a file")
            raise WorkspaceError(f"{source}: {path} has no {CONFIG_NAME}; run `coordinator init {path}`")
        except OSError as e:  # a name too long, a path too deep: it was "internal error: OSError"
            raise WorkspaceError(f"{source}: {_cut(str(path))}: {e.strerror}; pass the workspace's folder") from None

    @cached_property
    def config(self) -> Config:
        from .runner import check_writable

        cfg = config_mod.load(self.config_path)
        for agent in cfg.agents.values():  # a grant over the workspace stops every command, not each order
            try:
                check_writable(agent, self)
            except CoordinatorError as e:
                raise ConfigError(str(e)) from None
        return cfg

    # The folders are made once per workspace: a Path join is some 2 us, and an order asks
    # for them a few dozen times on its way through the loop.
    @cached_property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @cached_property
    def inbox_root(self) -> Path:
        return self.root / "inbox"

    def inbox(self, agent: str) -> Path:
        return self.inbox_root / agent

    @cached_property
    def repos(self) -> Path:
        return self.root / "repos"

    @cached_property
    def state(self) -> Path:
        return self.root / "state"

    @cached_property
    def runtime(self) -> Path:
        return self.root / RUNTIME

    @cached_property
    def state_head(self) -> Path:
        """The head of the supervisor's last commit in state/, kept where a reset of state/
        cannot take it along."""
        return self.runtime / "state-head"

    @cached_property
    def state_journal(self) -> Path:
        """What the supervisor (or a command served with none running) wrote in state/ and has
        not committed yet: lines left in it after it ended say it did not finish."""
        return self.runtime / "state-journal"

    def rel(self, path: Path) -> str:
        """`path` as shown to users: relative to the workspace when inside it. A link is shown
        where it is, not where it points."""
        path = Path(os.path.abspath(path if os.path.isabs(path) else current_folder() / path))
        try:
            return str((Path(real(path.parent)) / path.name).relative_to(self.root))
        except ValueError:
            return str(path)

    def agent_of_inbox(self, file: Path) -> str | None:
        """The agent whose inbox folder holds `file`, if any."""
        parent = Path(real(file)).parent  # a link loop is no error here: reading it says so
        if parent.parent == Path(real(self.inbox_root)):
            return parent.name
        return None

    def inbox_is_link(self, agent: str) -> bool:
        """Is `agent`'s inbox folder a symbolic link? Nothing in it is ever taken in: the
        supervisor never follows one (it would take files from wherever the link points)."""
        return os.path.islink(self.inbox(agent))

    def check_layout(self) -> None:
        """WorkspaceError when something stands where the layout needs a folder (or a file):
        said once, before any command trips over it."""
        folders = (self.state, self.inbox_root, self.repos, self.runtime, *(self.inbox(a) for a in self.config.agents))
        for folder in folders:
            if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
                raise WorkspaceError(f"{self.rel(folder)} is not a folder; the workspace needs a folder there: "
                                     "move it away (`coordinator supervise` makes what is missing)")
        # The files the supervisor keeps in .coordinator/: a folder at one stopped it with an
        # internal error (state-journal), or silently turned off what it records (state-head).
        for name in RUNTIME_FILES:
            if (self.runtime / name).is_dir():
                raise WorkspaceError(f"{self.rel(self.runtime / name)} is a folder; remove it (the supervisor "
                                     "writes a file there)")

    def ensure_layout(self) -> list[str]:
        """Create missing inbox folders and runtime folders; returns what was created."""
        made: list[str] = []
        for folder in (self.inbox_root, self.repos, self.runtime,
                       *(self.inbox(a) for a in self.config.agents)):
            if not folder.is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                made.append(self.rel(folder))
        return made


def current_folder() -> Path:
    """The current folder; WorkspaceError when it was removed (or moved away) since the shell
    entered it: every command run there stopped with "internal error: FileNotFoundError"."""
    try:
        return Path.cwd()
    except FileNotFoundError:
        raise WorkspaceError(GONE) from None


def given_folder(explicit: str | os.PathLike[str]) -> Path:
    """The folder `-w` names; WorkspaceError when it names none."""
    if not os.fspath(explicit):  # `-w "$TEAM"` with TEAM unset: "here" may be another team
        raise WorkspaceError("-w: no folder given (an empty argument: an unset variable?); pass the "
                             "workspace folder, or leave -w out to use the one around you")
    return Path(explicit)


def example_config() -> str:
    """The example team shipped with the package (the offline demo team)."""
    return resources.files("coordinator.demo").joinpath("coordinator.yaml").read_text("utf-8")


def init(target: Path, *, force: bool = False) -> tuple[Workspace, list[str]]:
    """Make a workspace at `target`: config, inboxes, `state/` repository, the demo repository.

    Never overwrites an existing coordinator.yaml unless `force`.
    Returns the workspace and the lines to tell the user.
    """
    from . import audit  # git-backed pieces are only needed here and by the supervisor
    from .demo.repo import init_demo_repo

    target = _home_expanded(target, None)
    given = target / CONFIG_NAME  # said as the user wrote it
    target = _resolved(target, None)
    _check_utf8(target)
    cfg_path = target / CONFIG_NAME
    if _config_there(cfg_path, shown=given) and not force:
        raise CoordinatorError(f"{given} already exists; pass --force to overwrite it")  # SPEC §1: exit 1
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is not a folder")
    _refuse_inside_a_workspace(target, given.parent)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a parent folder should be, a read-only disk
        raise UsageError(f"cannot make {target}: {e.strerror}") from None
    _refuse_what_is_in_the_way(target, given.parent)
    _refuse_a_state_of_another(target / "state", given.parent / "state")
    lines: list[str] = []
    try:
        cfg_path.write_text(example_config(), encoding="utf-8")
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # the command line says what to do about a full or read-only disk
        # A folder that takes no files (/proc, /sys): said as "internal error", or as "run it as the
        # user who owns the workspace" to root, for whom there was no workspace yet.
        raise UsageError(f"cannot write {given}: {e.strerror}: make the workspace in a folder of a disk this "
                         "user may write in") from None
    lines.append(f"wrote {CONFIG_NAME}")
    ws = Workspace(target)
    cfg = ws.config  # validates what we just wrote
    for made in ws.ensure_layout():
        lines.append(f"created {made}/")
    if audit.StateRepo.ensure(ws.state):
        lines.append("initialised state/ (git repository, first commit)")
    demo = ws.repos / "webapp"
    if _uses_repo(cfg, "webapp") and not demo.exists():
        init_demo_repo(demo)
        lines.append("created repos/webapp (demo repository)")
    elif _uses_repo(cfg, "webapp") and not (demo / ".git").exists():
        # Left alone (it is the user's), but said: every order of the example team names it.
        lines.append("left repos/webapp as it was: it is not a git repository, so the example team's orders "
                     "are refused until it is one (move it away and run init --force for the demo repository)")
    ignore = target / ".gitignore"
    if not ignore.exists() and not (target / ".git").exists():
        ignore.write_text(f"{RUNTIME}/\n", encoding="utf-8")
    return ws, lines


def _cut(text: str, most: int = 200) -> str:
    """A path as said in one line: its start and end when it is longer than `most` characters."""
    return text if len(text) <= most else f"{text[:most // 2]}…{text[-most // 2:]}"


def _home_expanded(path: Path, source: str | None) -> Path:
    """`path` with a leading `~` or `~user` made the home folder it names; WorkspaceError when
    it names none (an empty HOME made `~/x` the root's /x; an unknown user's `~user/x` was an
    internal error, and taken as written it would be a folder named `~user` in the current one)."""
    first = path.parts[0] if path.parts else ""
    if not first.startswith("~"):
        return path
    said = f"{source + ': ' if source else ''}{path}"
    if first == "~" and os.environ.get("HOME") == "":
        raise WorkspaceError(f"{said}: HOME is empty, so ~ names no home folder; give the folder's absolute path")
    expanded = Path(os.path.expanduser(path))  # Path.expanduser raises RuntimeError for an unknown user
    if expanded.parts and expanded.parts[0].startswith("~"):
        raise WorkspaceError(f"{said}: no user {first[1:]!r} on this system, so {first} names no home folder; "
                             "give the folder's absolute path")
    return expanded


def _resolved(path: Path, source: str | None) -> Path:
    """`path` made absolute with its links followed; WorkspaceError when they lead back to
    themselves (a traceback-free "internal error: RuntimeError: Symlink loop" before)."""
    path = _home_expanded(path, source)
    if not path.is_absolute():  # said as a link loop when the current folder was gone
        path = current_folder() / path
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # RuntimeError up to Python 3.12, OSError (ELOOP) after
        raise WorkspaceError(f"{source + ': ' if source else ''}{path}: a symbolic link on the way leads back "
                             "to itself; pass a folder reached through no such link") from None


# The folders of a workspace that hold what its supervisor takes in, commits or runs: another
# workspace made in one is taken for orders (inbox/), for changes by hand to the audit trail
# (state/), or for a repository the team works in (repos/).
_OWNED = {"state": "its audit trail, which only its supervisor writes",
          "inbox": "its inboxes, where every file is taken for a work order",
          "repos": "the repositories its agents work in",
          RUNTIME: "its supervisor's runtime folder"}


def _refuse_inside_a_workspace(target: Path, shown: Path) -> None:
    """UsageError when `target` lies in a folder another workspace's supervisor owns: init
    there wrote a config and folders into that workspace's state/ (`audit verify` then failed)
    or into an agent's inbox (taken for orders)."""
    for outer in target.parents:
        if not (outer / CONFIG_NAME).is_file():
            continue
        parts = target.relative_to(outer).parts
        if parts[0] in _OWNED:
            where = f"{'is' if len(parts) == 1 else 'is inside'} {parts[0]}/ of the workspace {outer}"
            raise UsageError(f"{shown} {where} ({_OWNED[parts[0]]}); make the new workspace outside it")


def _refuse_what_is_in_the_way(target: Path, shown: Path) -> None:
    """UsageError, before anything is written, when something that is no folder stands where
    init makes one (a file `inbox`, a dangling link `state`): it was "internal error:
    FileExistsError", with the config already written and a second init refused for it."""
    import yaml

    agents = yaml.safe_load(example_config())["agents"]
    for name in ("state", "inbox", "repos", RUNTIME, *(f"inbox/{a}" for a in agents)):
        folder = target / name
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise UsageError(f"{shown / name} is not a folder; the workspace needs a folder there: move it away "
                             "and run init again")


def _refuse_a_state_of_another(state: Path, shown: Path) -> None:
    """UsageError when `state` holds what the supervisor did not make: init took a folder of the
    user's own in as the audit trail, its files committed in it (and readable by every agent),
    or a git repository of theirs, which `audit verify` then failed for its commits."""
    from .gitrepo import run_git
    from .orders import SUPERVISOR_NAME

    if not state.is_dir():
        return  # nothing there yet, or refused as no folder already
    if not (state / ".git").exists():
        if next(os.scandir(state), None) is None:
            return
        raise UsageError(f"{shown} holds files and is no audit trail of a workspace: init would commit them into "
                         "it (every agent may read state/); move it away and run init again")
    roots = run_git(["log", "--max-parents=0", "--format=%an", "HEAD"], git_dir=state / ".git", cwd=state,
                    check=False).stdout.split("\n")
    if SUPERVISOR_NAME not in roots:
        raise UsageError(f"{shown} is a git repository the supervisor did not make (its audit trail would hold "
                         "commits that are not its own); move it away and run init again")


def _check_utf8(root: Path, source: str | None = None) -> None:
    """WorkspaceError when the workspace's path is not UTF-8: git's files (a working copy's
    `gitdir:`), every brief and state/ hold it as UTF-8, so an order would stop the supervisor."""
    try:
        str(root).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(root).decode("utf-8", "backslashreplace")
        raise WorkspaceError(f"{source + ': ' if source else ''}{shown} is not a UTF-8 path; the workspace's path is "
                             "written into git's files and every brief: use a folder whose path is UTF-8") from None


def _config_there(path: Path, *, shown: Path) -> bool:
    """Whether a config file is at `path`; UsageError when something that is none is: writing
    over a folder fails, over a FIFO waits for a reader forever, through a link loop fails."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False  # nothing there (or not even the folder: said next)
    except OSError:
        st = None  # a link to itself
    if st is None or not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{shown} is not a regular file; move it away (init writes the workspace's config there)")
    return True


def _uses_repo(cfg: Config, repo: str) -> bool:
    return any(w.split("/", 1)[0] == repo for a in cfg.agents.values() for w in a.writes)
