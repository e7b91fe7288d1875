"""Relative POSIX paths and globs of work orders and permissions.

`files` entries of an order and `writes` entries of an agent are globs over the
workspace's `repos/` folder: the first component is a repository name. The same
matcher decides intake (is every `files` entry inside `writes`?) and the gate
(does each changed path match both?), so the two can never disagree.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

GLOB_CHARS = frozenset("*?[")
_SEPARATORS = re.compile(r"\s*,\s*|\s+")  # between paths written on one line
_BRACES = re.compile(r"\{[^{}]*,[^{}]*\}")  # a shell's alternatives, `{src,tests}`
# C0, DEL and C1 (U+0085, U+009B: a terminal's CSI), and the bidirectional overrides and isolates
# (U+202E shows `src/x\u202eyp.ts` as `src/xst.py`): never in a path, and never shown raw.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# The same but tab and line end: what text that may hold lines (a summary, a tail) must not.
CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


NAME_MAX = 255  # bytes in one file or folder name, on every file system a workspace lives on


def path_problem(entry: str) -> str | None:
    """Why `entry` is not an acceptable relative path or glob, or None."""
    if not entry:
        return "is empty"
    if CONTROL.search(entry):
        return "contains a control character"
    if "\\" in entry:
        return "contains a backslash; use forward slashes"
    if entry.startswith("/"):
        return f"{entry!r} is absolute; give a path relative to repos/ (e.g. webapp/src/x.py)"
    if entry.startswith("~"):
        return f"{entry!r} starts with ~; give a path relative to repos/"
    parts = entry.split("/")
    if any(p == "" for p in parts):
        return f"{entry!r} has an empty component (a double or trailing slash)"
    if any(p == ".." for p in parts):
        return f"{entry!r} contains '..'; paths may not leave repos/"
    if any(p == "." for p in parts):
        return f"{entry!r} contains a '.' component; write the path plainly"
    if any(p.lower() == ".git" for p in parts):
        return f"{entry!r} names a .git component; git internals are never writable"
    long = next((p for p in parts if len(p.encode("utf-8", "surrogateescape")) > NAME_MAX), None)
    if long is not None:  # no file system holds it: the work could never land
        size = len(long.encode("utf-8", "surrogateescape"))
        return f"has a name of {size} bytes ('{long[:24]}…'); a file name is at most {NAME_MAX}"
    if any(has_glob(p) for p in parts[:1]):
        return f"{entry!r}: the first component must name a repository, not a glob"
    for p in parts:
        if p.count("[") != p.count("]"):
            return f"{entry!r} has an unbalanced '[' in a glob"
        if "**" in p and p != "**":
            return f"{entry!r}: '**' must be a whole path component"
        bad_set = _set_problem(p)
        if bad_set:
            return f"{entry!r} {bad_set} in a glob; write a set such as [a-z] or [!0-9]"
    return None


def brace_problem(entry: str) -> str | None:
    """Why an order's `files` or an agent's `writes` entry may not hold `{a,b}`, or None.
    Shells and .gitignore-style tools expand such braces; here they are plain characters, so
    an order naming `webapp/src/{a,b}.py` was taken and its agent denied (and signalled) for
    writing what was meant. A file the agent edits may still have such a name."""
    if _BRACES.search(entry):
        return (f"{entry!r} uses braces {{a,b}}, which are no glob here (only *, **, ? and [...]); "
                "give each alternative as an entry of its own")
    return None


def several_problem(entry: str) -> str | None:
    """Why `entry` reads as several paths in one (`webapp/a.py, webapp/b.py`), or None. Taken,
    it was one name holding a comma: the agent's writes to either file were outside it, and a
    file of that odd name was what the order allowed."""
    repo = entry.split("/", 1)[0]
    pieces = [p for p in _SEPARATORS.split(entry) if p]
    if len(pieces) > 1 and any(p == repo or p.startswith(f"{repo}/") for p in pieces[1:]):
        return f"{entry!r} reads as {len(pieces)} paths in one entry; give each path an entry of its own"
    return None


def _set_problem(part: str) -> str | None:
    """Why a `[...]` set in one component would not compile, or None. Checked here, at
    validation, because the matcher compiles the same sets later, in the supervisor."""
    i = part.find("[")
    while i != -1:
        j = part.find("]", i + 1)
        if j == -1:
            return None  # a lone '[' is matched literally
        body = part[i + 1 : j]
        if body in ("", "!"):
            return f"has an empty set {part[i : j + 1]!r}"
        try:
            re.compile(_segment(part[i : j + 1]))
        except re.error as e:
            return f"has a bad set {part[i : j + 1]!r} ({e.msg})"
        i = part.find("[", j + 1)
    return None


def has_glob(text: str) -> bool:
    return any(c in GLOB_CHARS for c in text)


def repo_of(entry: str) -> str:
    return entry.split("/", 1)[0]


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        out.append(_segment(part))
        if not last:
            out.append("/")
    try:
        return re.compile("".join(out) + r"\Z", re.DOTALL)
    except re.error:
        # Validation refuses such a set (path_problem); an order stored before it did must
        # still not stop the supervisor: it matches nothing, so the gate denies its writes.
        return re.compile(r"(?!)")


def _segment(part: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = part.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = part[i + 1 : j]
                neg = body.startswith("!")
                body = body[1:] if neg else body
                body = body.replace("\\", "\\\\").replace("^", "\\^")
                # A set stands for one character of a name: never the '/' between two
                # (`v[!0-9]*` would match all of `v/x.py`, and `[.-0]` spans '/').
                out.append(f"(?!/)[{'^' if neg else ''}{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def matches(pattern: str, path: str) -> bool:
    """Does the repos-relative `path` match the glob `pattern`?

    A pattern that names a folder without a glob also covers what lies under it
    (`webapp/src` covers `webapp/src/a.py`), as users expect of a path list.
    """
    if _compile(pattern).match(path):
        return True
    if not has_glob(pattern):
        return path.startswith(pattern.rstrip("/") + "/")
    return False


def matches_any(patterns: tuple[str, ...] | list[str], path: str) -> bool:
    return any(matches(p, path) for p in patterns)


def covered(entry: str, writes: tuple[str, ...] | list[str]) -> bool:
    """Is every path `entry` can match also matched by some pattern in `writes`?

    Conservative: a glob entry is covered only when a writes pattern covers it
    segment by segment, so intake never accepts an order the gate would deny.
    """
    return any(_covers(w.split("/"), entry.split("/")) for w in writes)


def _covers(w: list[str], e: list[str]) -> bool:
    if not w:
        return not e
    head = w[0]
    if head == "**":
        return any(_covers(w[1:], e[i:]) for i in range(len(e) + 1))
    if not e:
        return False
    seg = e[0]
    if seg == "**":
        return False
    # A glob segment is covered only by itself or by `*`; a literal one by matching.
    ok = head in (seg, "*") if has_glob(seg) else bool(re.fullmatch(_segment(head), seg))
    if not ok:
        return False
    if len(w) == 1 and not has_glob(head) and len(e) > 1:
        return True  # a plain folder covers everything under it
    return _covers(w[1:], e[1:])


def literal_prefix(pattern: str) -> str:
    """The folder part of `pattern` before the first glob component."""
    parts = pattern.split("/")
    fixed: list[str] = []
    for p in parts:
        if has_glob(p):
            break
        fixed.append(p)
    return "/".join(fixed)


def within(path: str, folder: str) -> bool:
    """`path` is `folder` or beneath it; both absolute and resolved (no component match: /a/bc
    is not within /a/b)."""
    return path == folder or path.startswith(folder if folder.endswith("/") else folder + "/")


def real(path: str | os.PathLike[str]) -> str:
    """`os.path.realpath(path)`, resolved by the kernel when the path exists: one open and one
    readlink instead of an lstat per component (four times per order, 40 system calls, on
    the drop-to-spawn path). A path that does not exist, or a system without /proc, falls
    back to `os.path.realpath`."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return os.path.realpath(path)
    try:
        return real_of(fd, path)
    finally:
        os.close(fd)


def real_of(fd: int, path: str | os.PathLike[str]) -> str:
    """`real(path)` for a `path` already open as `fd`: where that descriptor leads."""
    try:
        found = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)
    # Removed meanwhile, or not a path at all (an anonymous inode): the slow way tells.
    if not found.startswith("/") or found.endswith(" (deleted)"):
        return os.path.realpath(path)
    return found
