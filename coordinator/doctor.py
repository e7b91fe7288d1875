"""`coordinator doctor`: what this machine supports, and which protection layers are active."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

from . import landlock, mounts
from .runner import agent_warnings
from .workspace import Workspace


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
    else:
        lines.append("git: NOT FOUND — install git; the audit trail and working copies need it")
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lines.append(f"limits: open files {soft}/{hard}")
    except (ImportError, ValueError):
        pass
    if ws is None:
        return lines
    cfg = ws.config
    lines.append(f"team: {len(cfg.agents)} agent(s), max_parallel {cfg.max_parallel}, "
                 f"orchestrator {cfg.orchestrator or '-'}")
    for name, a in cfg.agents.items():
        shown = " ".join(a.command[:3]).replace("{python}", "python") if a.command else ""
        how = "llm " + a.llm.primary.model if a.llm else (f"command: {shown}" if a.command else "external (no command)")
        missing = ""
        if a.command and not a.command[0].startswith("{") and shutil.which(a.command[0]) is None:
            missing = f"  (WARNING: {a.command[0]} not found on PATH)"
        lines.append(f"  {name}: {a.role}, {how}{missing}")
        lines += [f"    WARNING: {w}" for w in agent_warnings(a)]
    return lines

