"""`coordinator doctor`: what this machine supports, and which protection layers are active."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

from . import board, cpus, landlock, mounts, seccomp
from .config import Config, budget_warning, git_writes_note
from .errors import ConfigError, GitError, WorkspaceError
from .gitrepo import GitRepo, foreign_checkout, run_git
from .runner import agent_warnings, command_missing
from .workspace import Workspace

MAX_SHOWN_COMMAND = 120  # characters of an agent's command shown: enough to recognize it
# Control characters shown as escapes, so a multi-line `sh -c` script keeps to its line.
_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F)} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def report(ws: Workspace | None) -> list[str]:
    """What this machine supports, then the team of `ws` (None: no workspace here, the machine only)."""
    where = str(ws.root) if ws is not None else "none here (the machine only; `coordinator init` makes one)"
    lines = [f"workspace: {where}", f"system: {platform.system()} {platform.release()}, "
             f"Python {platform.python_version()}"]
    st = landlock.status()
    abi = int(st.get("abi", 0) or 0)
    if abi > 0:
        lines.append(f"landlock: ABI {abi}, enforced: kernel refuses writes outside an order's files")
        rights = st.get("rights") or st.get("enforced") or []
        if rights:
            lines.append(f"  filesystem rights handled: {', '.join(map(str, rights))}")
        scopes = st.get("scopes") or []
        lines.append(f"  scopes: {', '.join(map(str, scopes)) or 'none (ABI < 6: signals are not scoped)'}")
        lines.append("  not covered by Landlock: network, named unix sockets; chmod/chown/utime/xattrs: see below")
    else:
        lines.append("landlock: NOT AVAILABLE — gate-only mode: writes outside the working copy are detected "
                     "after the run, not refused")
    why_not = mounts.status()
    if why_not is None:
        lines.append("read-only mounts: active: chmod, chown, utime and xattrs fail outside an order's "
                     "writable folders (a mount namespace per specialist)")
    else:
        lines.append(f"read-only mounts: NOT AVAILABLE ({why_not}; needs root) — chmod/chown/utime of files "
                     "outside the working copy are not refused (the gate checks modes inside it)")
    # The filter is installed with the Landlock ruleset, in the thread that set no_new_privs for it.
    why_not = seccomp.status() if abi > 0 else "it comes with the Landlock ruleset, which this kernel lacks"
    if why_not is None:
        lines.append("setuid/lease guard: active (seccomp): a specialist can neither make a setuid or "
                     "setgid file nor take a file lease")
    else:
        lines.append(f"setuid/lease guard: NOT ACTIVE on this machine ({why_not}) — a root specialist can "
                     "leave a setuid file in a folder it may write outside the working copy, and a file "
                     "lease can make the supervisor's writes wait")
    lines.append("gate: after every run (manifest of the working copy: type, mode, hash, links, .git entries)")
    lines.append(f"watcher: {'inotify (watchdog)' if platform.system() == 'Linux' else 'platform observer'}; "
                 "`supervise --poll` for network file systems")
    for name in ("max_user_watches", "max_queued_events", "max_user_instances"):
        p = Path("/proc/sys/fs/inotify") / name
        if p.exists():
            lines.append(f"  inotify {name}: {p.read_text().strip()}")
    git = shutil.which("git")
    if git:
        version = subprocess.run([git, "--version"], capture_output=True, text=True).stdout.strip()
        lines.append(f"git: {version}")
        lines.append(_bare_repositories(git, version))
    else:
        lines.append("git: NOT FOUND — install git; the audit trail and working copies need it")
    try:
        import resource

        from .spawner import MIN_OPEN_FILES

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        short = soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES
        lines.append(f"limits: open files {soft}/{hard}" + (
            f" — PROBLEM: `supervise` needs {MIN_OPEN_FILES} or more to run an order; raise `ulimit -n`"
            if short else ""))
    except (ImportError, ValueError):
        pass
    lines.append(cpus.described())
    if ws is None:
        return lines
    try:
        cfg = ws.config
    except ConfigError as e:
        lines.append(f"team: CANNOT BE READ — {e}")
        return lines
    lines.append(f"team: {len(cfg.agents)} agent(s), max_parallel {cfg.max_parallel}, "
                 f"orchestrator {cfg.orchestrator or '-'}")
    for name, a in cfg.agents.items():
        shown = command_line(a.command) if a.command else ""
        # The model is the config's text, escapes and line breaks too: on one line, as a command is.
        how = ("llm " + command_line((a.llm.primary.model,)) if a.llm
               else (f"command: {shown}" if a.command else "external (no command)"))
        program = command_missing(a)
        missing = f"  (WARNING: {program} not found on PATH)" if program is not None else ""
        lines.append(f"  {name}: {a.role}, {how}{missing}")
        lines += [f"    WARNING: {w}" for w in agent_warnings(a)]
        note = git_writes_note(a)
        lines += [f"    note: {note}"] if note else []
    low = budget_warning(cfg)
    lines += [f"  WARNING: {low}"] if low else []
    lines += _workspace_problems(ws, cfg, git=git is not None)
    if git:  # without it, nothing of the workspace's git can be looked at (said above)
        lines.append(board.supervisor_line(board.supervisor(ws)))
    return lines


def _workspace_problems(ws: Workspace, cfg: Config, *, git: bool) -> list[str]:
    """What in the workspace stops commands or refuses orders, though the machine and team are
    fine: something that is no folder where one belongs, a repository the team writes that is none."""
    lines: list[str] = []
    try:
        ws.check_layout()
    except WorkspaceError as e:
        lines.append(f"workspace: PROBLEM — {e}")
    if not git:
        return lines
    from .verify import load_heads  # the default branches the supervisor has pinned

    repos = sorted({w.split("/", 1)[0] for a in cfg.agents.values() for w in a.writes})
    heads = load_heads(ws)
    for repo in repos:
        known = heads.get(repo) if isinstance(heads, dict) else None
        pinned = known.get("branch") if isinstance(known, dict) else None
        problem = _repository_problem(ws.repos / repo, pinned if isinstance(pinned, str) else None)
        if problem:
            lines.append(f"repos/{repo}: WARNING: {problem}; until then every order naming {repo}/… is refused "
                         "or fails")
    return lines


def _repository_problem(folder: Path, branch: str | None) -> str | None:
    """Why orders cannot work in the repository at `folder` (default branch `branch` when the
    supervisor has seen it), or None when they can."""
    odd = foreign_checkout(folder)
    if odd is not None:
        return odd
    if not (folder / ".git").exists():
        return (f"{'is not a git repository' if folder.exists() else 'does not exist'}: clone the repository "
                "there, or `git init` it and make a first commit")
    try:
        repo = GitRepo(folder, branch=branch)
        if branch is None and not run_git(["rev-parse", "-q", "--verify", "HEAD^{commit}"], git_dir=repo.git_dir,
                                          cwd=repo.git_dir, check=False).stdout.strip():
            return "has no commit yet: make a first commit on its default branch"
        repo.head()
    except GitError as e:
        return str(e).removeprefix(f"repos/{folder.name}").lstrip(": ")
    return None


def _bare_repositories(git: str, version: str) -> str:
    """Does this user's git take a folder shaped like a repository (HEAD, objects/, refs/) for
    one, and run its config? Git honours the setting only in the user's and the machine's
    config, never in a repository's."""
    value = ""
    for scope in ("--global", "--system"):  # the user's setting wins over the machine's
        r = subprocess.run([git, "config", scope, "--get", "safe.bareRepository"], capture_output=True, text=True)
        if value := r.stdout.strip():
            break
    if value.lower() == "explicit":
        if tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < (2, 38):
            return f"  safe.bareRepository: explicit, IGNORED — {version} predates it (git 2.38)"
        return "  safe.bareRepository: explicit — your git uses no repository it merely finds in a folder"
    return (f"  safe.bareRepository: {value or 'not set'} — your git takes any folder shaped like a repository "
            "for one and runs its config (the gate refuses such folders in a change; "
            "`git config --global safe.bareRepository explicit` refuses them everywhere)")


def command_line(command: tuple[str, ...]) -> str:
    """An agent's command on one line (newlines shown as \\n), shortened to MAX_SHOWN_COMMAND
    characters with a "…" (a flag cut from its value would read as a different command)."""
    text = _one_line(" ".join(command).replace("{python}", "python"))
    return text if len(text) <= MAX_SHOWN_COMMAND else text[:MAX_SHOWN_COMMAND - 1] + "…"


def _one_line(text: str) -> str:
    return text.translate(_ESCAPES)
