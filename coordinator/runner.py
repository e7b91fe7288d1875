"""One attempt of one order: its folders, brief, command line, environment and sandbox.

    .coordinator/attempts/<id>/<n>/
        order.json    the normalized order        ({order}, $COORD_ORDER)
        brief.md      the order for reading, plus why the last attempt failed  ({brief})
        result.yaml   written by the specialist    ({result}, $COORD_RESULT)
        outbox/       new work orders from the specialist ($COORD_OUTBOX)
        scratch/      the current folder of an order with no files
        heartbeat     touch it to say "still working" ($COORD_HEARTBEAT)
    .coordinator/logs/<id>/<n>/      output.log and check-<i>.log: stdout and stderr, capped
    <n>.before-restart-<k>/          (beside both) a run of attempt <n> cut short by a crash
    .coordinator/work/<id>/<repo>/   the working copy (a git worktree on wo/<id>)
    .coordinator/spare/              empty attempt and log folders made while idle, renamed
                                     into place on the drop-to-spawn path (`make_spares`)

The attempt folder is writable by the specialist; everything the supervisor or the
fork server writes or reads with trust (logs) lives outside it, and what it must read
from it (result, outbox) is read without following links and with a size cap.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import re
import secrets
import shutil
import site
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import durable, gate, orders, paths
from .config import Agent
from .errors import SandboxError
from .inboxfiles import printable
from .landlock import Ruleset
from .orders import WorkOrder
from .workspace import Workspace

PLACEHOLDERS = ("id", "order", "brief", "brief_text", "workdir", "result", "python", "workspace")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
# A word in braces (`${VAR}` is the shell's): warned of when it is close to a placeholder
# ({breif}, {Brief}, {work-dir}); {print} in awk, {name} in jq or {x} in an f-string are not.
_BRACED_WORD = re.compile(r"(?<![$\w{])\{([A-Za-z_-]+)\}(?!\})")
TAIL_BYTES = 4000
# In an attempt folder (see the module's doc).
ORDER_FILE, BRIEF, RESULT, OUTBOX, TMP, SCRATCH, HEARTBEAT = (
    "order.json", "brief.md", "result.yaml", "outbox", "tmp", "scratch", "heartbeat")


@dataclass(frozen=True)
class Attempt:
    """One run of an order. Its paths are worked out once each (they are asked for some 25
    times an attempt, on the path from drop to spawn)."""

    order_id: str
    number: int
    folder: Path
    workdir: Path
    repo: str | None
    nonce: str = field(default_factory=lambda: secrets.token_hex(8), compare=False)
    # The brief as the supervisor wrote it: what is passed and counted is never read back from
    # a folder the specialist can write (a FIFO put there would stall the loop).
    brief_text: str = field(default="", compare=False, repr=False)

    @property
    def token(self) -> str:
        # The secret part: a process of another attempt cannot name this one to hide in it
        # (Landlock keeps each attempt from reading another's environment in /proc).
        return f"{self.order_id}.{self.number}.n{self.nonce}"

    @functools.cached_property
    def named(self) -> dict[str, str]:
        """Its paths as text, joined as strings: what every attempt passes and opens (its
        command line, environment and spawn request, its log and result) took some 15 us as
        a Path each. `logs` is `log_folder`'s (the folder's runtime is its third parent)."""
        folder = str(self.folder)
        logs = f"{folder.rsplit('/', 3)[0]}/logs/{self.order_id}/{self.number}"
        return {"folder": folder, "workdir": str(self.workdir), "order": f"{folder}/{ORDER_FILE}",
                "brief": f"{folder}/{BRIEF}", "result": f"{folder}/{RESULT}", "outbox": f"{folder}/{OUTBOX}",
                "tmp": f"{folder}/{TMP}", "scratch": f"{folder}/{SCRATCH}", "heartbeat": f"{folder}/{HEARTBEAT}",
                "logs": logs, "log": f"{logs}/{OUTPUT_LOG}"}

    @functools.cached_property
    def brief(self) -> Path:
        return self.folder / BRIEF

    @functools.cached_property
    def order_file(self) -> Path:
        return self.folder / ORDER_FILE

    @functools.cached_property
    def result(self) -> Path:
        return self.folder / RESULT

    @functools.cached_property
    def outbox(self) -> Path:
        return self.folder / OUTBOX

    @functools.cached_property
    def scratch(self) -> Path:
        return self.folder / SCRATCH

    @functools.cached_property
    def logs(self) -> Path:
        return Path(self.named["logs"])

    @functools.cached_property
    def log(self) -> Path:
        return Path(self.named["log"])

    def check_log(self, index: int) -> Path:
        return self.logs / f"check-{index}.log"

    @functools.cached_property
    def heartbeat(self) -> Path:
        return self.folder / HEARTBEAT

    def as_json(self) -> dict[str, object]:
        named = self.named
        return {"number": self.number, "folder": named["folder"], "workdir": named["workdir"],
                "repo": self.repo, "token": self.token}


def order_folders(ws: Workspace, order_id: str) -> tuple[Path, Path]:
    """An order's attempts folder and logs folder: each of its attempts has one in both."""
    return ws.runtime / "attempts" / order_id, ws.runtime / "logs" / order_id


def attempt_folder(ws: Workspace, order_id: str, number: int) -> Path:
    return order_folders(ws, order_id)[0] / str(number)


def log_folder(ws: Workspace, order_id: str, number: int) -> Path:
    """Where attempt `number` of an order logs (`Attempt.logs`); kept when the attempt folder goes."""
    return order_folders(ws, order_id)[1] / str(number)


OUTPUT_LOG = "output.log"  # in `log_folder`: the specialist's output, opened before it starts


def work_folder(ws: Workspace, order_id: str) -> Path:
    return ws.runtime / "work" / order_id


SPARES = 2  # empty attempt folders kept ready


def prepare(ws: Workspace, order: WorkOrder, number: int, failures: list[str],
            order_json: bytes | None = None) -> Attempt:
    """Make the attempt's folders and write its order (`order_json`: its bytes, when they are
    at hand) and brief (not the working copy)."""
    assert order.id is not None
    # Text, not Paths: this is on the drop-to-spawn path, and a Path join is some 1 us.
    runtime = str(ws.runtime)
    attempts, logged = f"{runtime}/attempts/{order.id}", f"{runtime}/logs/{order.id}"
    folder, logs = f"{attempts}/{number}", f"{logged}/{number}"
    # One mkdir each (an order's folders are new at its first attempt; the runtime's are there
    # but after a hand clean-up). In a folder just made no earlier run of this attempt number
    # can be: only in one that was there is it looked for.
    ran: bool | None = None  # whether an earlier start of this number ran: the fork server opens its log first
    for parent, old in ((attempts, folder), (logged, logs)):
        if not _mkdir_under(parent) and Path(old).exists():  # an earlier run (a crash): kept aside, start clean
            if ran is None:
                ran = os.path.lexists(f"{logs}/{OUTPUT_LOG}")
            if ran:
                _set_aside(Path(old))
            else:  # prepared and never started (armed, or cut off before its start): only ours in it
                durable.remove_tree(Path(old))
    if not _take_spare(ws, folder, logs):
        _mkdirs(folder, f"{folder}/{OUTBOX}", f"{folder}/{TMP}", f"{folder}/{SCRATCH}", logs)
    repo = order.repo
    workdir = work_folder(ws, order.id) / repo if repo else Path(f"{folder}/{SCRATCH}")
    brief = brief_text(order, number, failures).encode("utf-8", "backslashreplace")
    attempt = Attempt(order.id, number, Path(folder), workdir, repo, brief_text=brief.decode("utf-8"))
    named = attempt.named
    if order_json is None:
        order_json = durable.dumps(order.to_dict()).encode("utf-8", "backslashreplace")
    durable.create(named["order"], order_json)
    durable.create(named["brief"], brief)
    return attempt


def unprepare(ws: Workspace, order_id: str, number: int) -> None:
    """Undo `prepare` of an attempt that never ran (nothing but the supervisor wrote in its
    folders): they go, and the order's own folders when nothing else is in them."""
    for parent, folder in zip(order_folders(ws, order_id), (attempt_folder(ws, order_id, number),
                                                            log_folder(ws, order_id, number)), strict=True):
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            parent.rmdir()


def defuse(folder: Path) -> None:
    """Take out of an attempt folder, kept for a person to read, what git would run for them
    there (`gate.planted`): a report sends them to its outbox, and a `.git` the agent wrote in
    it with a core.fsmonitor ran as them at their first `git status` (or their prompt's).
    Unlocked first, as a kept working copy is: in a folder the agent made 0o100 (enterable, not
    listable) or 0o500 (nothing removable), a `.git` stayed for a supervisor that is not root."""
    unreadable: list[str] = []
    if not gate.planted(str(folder), unreadable=unreadable) and not unreadable:
        return  # the common case: one look, nothing to unlock (a walk that chmods costs 0.1 ms)
    durable.unlock_tree(folder)
    for path in gate.planted(str(folder)):
        durable.remove_tree(Path(path))


def _set_aside(folder: Path) -> Path:
    """Rename `folder` to `<name>.before-restart-<k>` (the first free k): what a run cut short
    by a crash wrote (its log, result, outbox leftovers) stays there to be read."""
    k = 1
    while True:
        target = folder.with_name(f"{folder.name}.before-restart-{k}")
        try:
            os.rename(folder, target)  # fails on a non-empty target: never merged into another
            return target
        except OSError:
            if not target.exists():
                raise
            k += 1


# The keys of the complete spares, per spare folder, as this process made and took them: the
# folder is listed once, not twice per attempt. Only the supervisor (one per workspace) makes
# and takes spares; a key whose folders went meanwhile is skipped when taken.
_pool: dict[str, list[str]] = {}


def _known(spare: str) -> list[str]:
    if spare not in _pool:
        _pool[spare] = sorted(_spares(spare))
    return _pool[spare]


def make_spares(ws: Workspace, count: int = SPARES) -> int:
    """Make empty attempt folders (outbox/, tmp/, scratch/) and log folders ahead of time,
    each complete before it is renamed into the pool; returns how many were made."""
    spare = f"{ws.runtime}/spare"
    pool = _known(spare)
    made = 0
    remade = False
    while len(pool) < count:
        # The attempt folder is built under a temp name; the log folder is empty, its mkdir is
        # whole. No staging folder around both: every folder made and removed for nothing
        # slows each later mkdir on an ext4 without a journal (see bench/harness.py run_dir).
        key = f"{os.getpid()}-{time.monotonic_ns()}"
        new = f"{spare}/.new-attempt-{key}"
        try:
            os.mkdir(f"{spare}/log-{key}")
        except FileNotFoundError:  # the first spare, or the folder was cleaned away by hand
            if remade:
                raise
            remade = True
            os.makedirs(spare, exist_ok=True)
            pool[:] = sorted(_spares(spare))
            continue
        _mkdirs(new, f"{new}/{OUTBOX}", f"{new}/{TMP}", f"{new}/{SCRATCH}")
        os.rename(new, f"{spare}/attempt-{key}")
        pool.append(key)
        made += 1
    return made


def clear_spares(ws: Workspace) -> None:
    """Drop what a crash left half made or half taken (complete pairs are kept for use)."""
    spare = f"{ws.runtime}/spare"
    keep = set(_spares(spare))
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(spare):
            if entry.name.partition("-")[2] not in keep:
                shutil.rmtree(entry.path, ignore_errors=True)
    _pool[spare] = sorted(keep)


def _spares(spare: str) -> list[str]:
    """Keys of complete spares: an attempt folder and a log folder."""
    try:
        names = {e.name for e in os.scandir(spare)}
    except FileNotFoundError:
        return []
    return [n[len("attempt-"):] for n in names if n.startswith("attempt-") and f"log-{n[len('attempt-'):]}" in names]


def _take_spare(ws: Workspace, folder: str, logs: str) -> bool:
    spare = f"{ws.runtime}/spare"
    pool = _known(spare)
    while pool:
        key = pool.pop(0)
        try:
            os.rename(f"{spare}/log-{key}", logs)
        except OSError:
            continue
        try:
            os.rename(f"{spare}/attempt-{key}", folder)
        except OSError:
            os.rmdir(logs)
            continue
        return True
    return False


def _mkdirs(*folders: str) -> None:
    for folder in folders:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)


def _mkdir_under(folder: str) -> bool:
    """`folder`, made in one system call when its parent is there (it nearly always is); False
    when it was there already."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        return False
    except FileNotFoundError:  # its parent too was gone: nothing was in it
        os.makedirs(folder, exist_ok=True)
    return True


def brief_text(order: WorkOrder, number: int, failures: list[str]) -> str:
    """The order rendered for reading, plus why earlier attempts failed."""
    text = orders.render(order)
    if failures:
        text += f"\n## Attempt {number}: why the last attempt failed\n\n"
        text += "\n".join(f"- {line}" for line in failures[-1].splitlines() if line.strip()) + "\n"
        if len(failures) > 1:
            text += f"\n(This order has failed {len(failures)} times so far.)\n"
    text += (
        "\n## How to answer\n\n"
        "Write your result to $COORD_RESULT as YAML: `outcome:` done | halt-with-note | route-to |"
        " requeue-with-blocker | blocked, `summary:` one paragraph, plus `agent:` (route-to) or"
        " `blocker:` (requeue-with-blocker). Change only the files listed above. To send new work,"
        " write work-order files into $COORD_OUTBOX.\n"
    )
    return text


def argv(agent: Agent, attempt: Attempt, ws: Workspace) -> tuple[str, ...]:
    """The agent's command with every placeholder replaced."""
    assert agent.command is not None
    named = attempt.named
    values = {
        "id": attempt.order_id,
        "order": named["order"],
        "brief": named["brief"],
        "brief_text": attempt.brief_text,
        "workdir": named["workdir"],
        "result": named["result"],
        "python": sys.executable,
        "workspace": str(ws.root),
    }
    out = []
    for arg in agent.command:
        # One pass: a value put in (the brief's text) is never searched for placeholders again.
        out.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg))
    return tuple(out)


def command_missing(agent: Agent) -> str | None:
    """The agent's program, shown, when it is not on PATH (nor where an absolute path says);
    None when it is found, or is looked up only in the attempt's own folder (`./run.sh`)."""
    if not agent.command or agent.command[0].startswith("{"):
        return None
    program = agent.command[0]
    if "/" in program and not os.path.isabs(program):
        return None
    if shutil.which(program) is not None:
        return None
    return printable(program)


def agent_warnings(agent: Agent) -> list[str]:
    """Mistakes in an agent's entry that only show when an order runs (doctor and the
    supervisor's start say them)."""
    found: list[str] = []
    for i, arg in enumerate(agent.command or ()):
        for m in _BRACED_WORD.finditer(arg):
            meant = _placeholder_meant(m.group(1))
            if meant is not None:
                found.append(f"command.{i}: {m.group(0)} is not a placeholder and is passed as is; "
                             f"did you mean {{{meant}}}? (the placeholders: "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
    for folder in agent.sandbox_writable:
        if not Path(folder).exists():
            found.append(f"sandbox.writable: {folder} does not exist; its orders cannot start until it does")
    if agent.runnable and agent.stale_after >= agent.timeout:
        found.append(f"stale_after: {_seconds(agent.stale_after)} is not shorter than its timeout "
                     f"({_seconds(agent.timeout)}): an attempt is killed before it could be flagged stale; "
                     "make stale_after shorter")
    if agent.llm is not None:
        from .llm import in_clear, shown_url  # httpx is loaded only for a team with llm agents

        for i, endpoint in enumerate(agent.llm.chain):
            var = endpoint.api_key_env
            if var and in_clear(endpoint.base_url):
                where = "llm.base_url" if i == 0 else f"llm.fallback.{i - 1}"
                found.append(f"{where}: {printable(shown_url(endpoint.base_url))} is plain http:// across the network, so the "
                             f"key in {printable(var)} is never sent there and model {printable(endpoint.model)} is "
                             "never asked; use the endpoint's https:// address")
            elif var and not (os.environ.get(var) or "").strip():
                where = "llm.api_key_env" if i == 0 else f"llm.fallback.{i - 1}"
                found.append(f"{where}: {printable(var)} is not set here, and model {printable(endpoint.model)} "
                             "is asked with the key it holds: each call to it fails until it is exported (or "
                             "set api_key_env: null for a server that needs no key)")
    return found


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _placeholder_meant(word: str) -> str | None:
    """The placeholder a braced word not among them was likely meant to be, or None."""
    if word in PLACEHOLDERS:
        return None
    plain = word.lower().replace("-", "_")
    if plain in PLACEHOLDERS:
        return plain
    if len(plain) < 5:  # {idx}, {pid}, {kid}: words of their own, not a slip on {id}
        return None
    close = difflib.get_close_matches(plain, PLACEHOLDERS, n=1, cutoff=0.8)
    return close[0] if close else None


# Handles on the user's credential agents: a specialist has no business signing or logging in
# elsewhere as the user (its own `env:` can give one back on purpose).
WITHHELD = frozenset({"SSH_AUTH_SOCK", "SSH_AGENT_PID", "GPG_AGENT_INFO"})


def inherited_environment() -> dict[str, str]:
    """What a specialist inherits of this process's environment: all but the variables of
    another coordinator or git and the user's credential agents."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("COORD_", "GIT_")) and k not in WITHHELD}


def environment(agent: Agent, attempt: Attempt, ws: Workspace,
                inherited: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an attempt's commands. `inherited`: `inherited_environment()` as
    the supervisor took it at start (decoding every variable again cost some 50 us a start)."""
    env = dict(inherited_environment() if inherited is None else inherited)
    env.update(dict(agent.env))
    named = attempt.named
    env.update({
        "COORD_ORDER_ID": attempt.order_id,
        "COORD_AGENT": agent.name,
        "COORD_ORDER": named["order"],
        "COORD_BRIEF": named["brief"],
        "COORD_WORKDIR": named["workdir"],
        "COORD_RESULT": named["result"],
        "COORD_OUTBOX": named["outbox"],
        "COORD_WORKSPACE": str(ws.root),
        "COORD_HEARTBEAT": named["heartbeat"],
        "COORD_ATTEMPT": attempt.token,
        # Bytecode caches written by a test run would count as changes outside the order's files.
        "PYTHONDONTWRITEBYTECODE": "1",
        "TMPDIR": named["tmp"],
    })
    return env


@functools.lru_cache(maxsize=32)
def _protected(root: Path) -> tuple[tuple[str, ...], str | None]:
    """What no sandbox grant may cover: the team's config, state, inboxes, repositories and
    runtime; and the home folder (None when there is none to find: no $HOME, no passwd entry)."""
    ws = Workspace(root)
    found = [ws.config_path, ws.state, ws.inbox_root, ws.repos, ws.runtime]
    try:
        home: str | None = paths.real(Path.home())
    except RuntimeError:
        home = None
    return tuple(paths.real(p) for p in found) + ((home,) if home else ()), home


_ON_PATH = "a folder the supervisor finds git in (or before it on its PATH)"
_IMPORTS = "a folder the supervisor's Python imports from"
_GIT_CONFIG = "git's own config, which the supervisor's git reads (a filter named there runs)"


@functools.lru_cache(maxsize=8)
def _trusted(search: str, imports: tuple[str, ...], cwd: str, home: str, xdg: str) -> tuple[tuple[str, str], ...]:
    """What the supervisor runs or obeys outside any sandbox, each with what it is: the folders
    a `git` put there would be run from, the folders its Python imports from, git's global and
    system config. A grant covering one is an agent's program run as the supervisor: a `git`
    in ~/.local/bin or ~/.cargo/bin, a filter in ~/.config/git/config."""
    found: dict[str, str] = {}

    def add(path: str, what: str) -> None:
        if os.path.isabs(path):
            found.setdefault(paths.real(path), what)

    # An empty or relative entry is looked up from the current folder, as the supervisor's would be.
    folders = [os.path.join(cwd, f) for f in search.split(os.pathsep)]
    git = next((i for i, f in enumerate(folders) if os.path.isfile(os.path.join(f, "git"))), len(folders) - 1)
    for folder in folders[:git + 1]:  # after git's folder, a planted `git` is never the one run
        add(folder, _ON_PATH)
    for entry in imports:
        add(os.path.join(cwd, entry), _IMPORTS)
    add(os.path.join(home, ".gitconfig"), _GIT_CONFIG)
    add(os.path.join(xdg or os.path.join(home, ".config"), "git"), _GIT_CONFIG)
    add("/etc/gitconfig", _GIT_CONFIG)
    return tuple(found.items())


def _trusted_now() -> tuple[tuple[str, str], ...]:
    imports = list(sys.path)
    if site.ENABLE_USER_SITE:  # imported from at the next start once it exists, and a grant could make it
        imports.append(site.getusersitepackages())
    try:
        cwd = os.getcwd()
    except OSError:  # removed since the supervisor started in it: nothing is looked up there
        cwd = ""
    return _trusted(os.environ.get("PATH", os.defpath), tuple(imports), cwd, os.path.expanduser("~"),
                    os.environ.get("XDG_CONFIG_HOME", ""))


def check_writable(agent: Agent, ws: Workspace) -> None:
    """Refuse a `sandbox.writable` entry that would expose a protected path (fail closed), or
    cover what the supervisor runs outside any sandbox (`_trusted`).
    Resolved again for every attempt: a link swapped in since the last must not slip through."""
    if not agent.sandbox_writable:
        return
    guarded, home = _protected(ws.root)
    trusted = _trusted_now()
    for i, entry in enumerate(agent.sandbox_writable):
        exposed = _exposed(paths.real(entry), guarded, home, trusted)
        if exposed is None:
            continue
        p, what = exposed
        if what is None:
            raise SandboxError(
                f"agents.{agent.name}.sandbox.writable.{i}: {entry} would make {p} writable; "
                "grant a narrower folder outside the workspace and not your whole home")
        raise SandboxError(
            f"agents.{agent.name}.sandbox.writable.{i}: {entry} would make {p} writable, {what}: "
            "what the agent put there would run as the supervisor, outside any sandbox; grant a "
            "narrower folder")


@functools.lru_cache(maxsize=64)
def _exposed(granted: str, guarded: tuple[str, ...], home: str | None,
             trusted: tuple[tuple[str, str], ...]) -> tuple[str, str | None] | None:
    """The first protected path (with None) or trusted one (with what it is) a grant of the
    real folder `granted` would make writable; None when none. Remembered by the paths it is
    of (each attempt compared its grant with some 25 paths, the same ones every time)."""
    for p in guarded:
        if paths.within(p, granted) or (paths.within(granted, p) and p != home):
            return p, None
    for p, what in trusted:
        if paths.within(p, granted):
            return p, what
    return None


def ruleset(agent: Agent, order: WorkOrder, attempt: Attempt, ws: Workspace | None = None) -> Ruleset:
    """Write access only beneath the narrowest folders the order's files ∩ the agent's writes need.

    Landlock grants on existing inodes and cannot carve a read-only hole in a
    writable tree, so each grant is the deepest existing folder of a `files`
    entry that the agent's `writes` also cover; the gate then checks every path.
    """
    if ws is not None:
        check_writable(agent, ws)
    writable: set[str] = {attempt.named["folder"]}
    writable.update(agent.sandbox_writable)
    unsealed = set(writable) | ({attempt.named["workdir"]} if attempt.repo is not None else set())
    if attempt.repo is not None and agent.is_orchestrator:
        # Its copy is a throw-away: let it write there so the gate sees (and denies) every try.
        writable.add(str(attempt.workdir))
    elif attempt.repo is not None:
        for entry in order.files:
            if not paths.covered(entry, agent.writes) and not any(
                    paths.matches(w, entry) for w in agent.writes):
                continue
            rel = entry.split("/", 1)[1] if "/" in entry else ""
            prefix = paths.literal_prefix(rel) if paths.has_glob(rel) else rel
            target = attempt.workdir / prefix if prefix else attempt.workdir
            grant = _deepest_existing(target, attempt.workdir)
            # A folder of the copy may be a link (a file the repository tracks, or one an
            # earlier attempt left): the kernel grants where it leads, so it must lead inside.
            if paths.within(paths.real(grant), paths.real(attempt.workdir)):
                writable.add(str(grant))
    return Ruleset(writable=tuple(sorted(writable)), mounts_writable=tuple(sorted(unsealed)))


def _deepest_existing(target: Path, root: Path) -> Path:
    """The folder itself when it exists, else the nearest existing folder it is in, inside `root`.

    A file is granted through its folder (SPEC §7: the directories under which the order may
    write): granted alone, it could be written in place but neither replaced nor removed, so
    `sed -i`, an editor's atomic save and `rm` all failed with EACCES on the very file the
    order names. What else the folder then lets the agent write, the gate judges.
    """
    if _is_folder(target, follow=False):
        return target
    probe = target.parent
    while probe != root and not _is_folder(probe, follow=True):
        probe = probe.parent
    return probe


def _is_folder(path: Path, *, follow: bool) -> bool:
    """Is `path` a folder? Not when it cannot be looked at: a name over 255 bytes in the
    order's `files` (which no file system holds) stopped the supervisor at every start."""
    try:
        return stat.S_ISDIR(os.stat(path, follow_symlinks=follow).st_mode)
    except (OSError, ValueError):
        return False


class NotRegularFile(Exception):
    """What is at a path read with `read_untrusted(strict=True)` is no regular file to read."""


def read_untrusted(path: Path | str, limit: int, *, within: Path | None = None, strict: bool = False) -> bytes | None:
    """A regular file the specialist could have tampered with: never through a link, never a fifo,
    at most `limit` + 1 bytes. None when it is absent or not a regular file. With `within`, no
    folder on the way from there is followed through a link either (`durable.open_beneath`).
    `strict`: None only when nothing is there, NotRegularFile when something else is (told
    from the failed open, not by looking the path up again: an attempt's result is read so)."""
    folder = None
    try:
        if within is None:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            folder, fd = durable.open_beneath(within, Path(path))
    except FileNotFoundError:
        return None
    except OSError:
        if strict and os.path.lexists(path):
            raise NotRegularFile(str(path)) from None
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            if strict:
                raise NotRegularFile(str(path))
            return None
        return durable.read_fd(fd, limit + 1)
    finally:
        os.close(fd)
        if folder is not None:
            os.close(folder)


def tail(path: Path | str, limit: int = TAIL_BYTES) -> str:
    """The last `limit` bytes of a log, decoded leniently."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    try:  # four system calls: this is read after every attempt
        data = durable.read_fd(fd, limit, max(0, os.fstat(fd).st_size - limit))
    finally:
        os.close(fd)
    # Control characters (a NUL, a colour code's ESC, a C1 CSI, a bidirectional override) go:
    # the tail is quoted in briefs, notes, commit messages and the summary `show` prints, and a
    # NUL in a command's argument cannot be passed at all.
    return paths.CONTROL_IN_TEXT.sub("", data.decode("utf-8", "replace")).strip()




def last_activity(attempt: Attempt, started: float) -> float:
    """When the attempt last printed or touched its heartbeat."""
    latest = started
    for p in (attempt.log, attempt.heartbeat):
        with contextlib.suppress(OSError):
            latest = max(latest, p.stat().st_mtime)
    return latest
