"""Attempts of agents with `llm:`: the supervisor itself talks to the model (SPEC §11).

An attempt starts the model's conversation (see `conversation`): a specialist
model is sent the current text of its order's files, an orchestrator model its
context and the team. When the worker thread ends, everything after it (edits,
gate, checks, commit, filing orders, statuses, usage) happens in the loop
thread: a specialist's reply edits the working copy, then the usual gate and
checks decide; an orchestrator's plan is filed by `orchestration`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import gate, llmagent, paths, results
from .conversation import Outcome, launch, model_brief, new_client, one_line, record_usage
from .errors import CoordinatorError, LLMAuthError
from .llm import LLMTimeout, SpendLimitReached, duration
from .orchestration import (
    blocked_at_chain_end,
    file_plan,
    orchestrator_context,
    order_validator,
    review_failed,
)

if TYPE_CHECKING:
    from .attempts import Active, AttemptRunner

MAX_FILE_CHARS = 60_000      # per file sent to a specialist model
# How servers say a prompt is longer than the model's context (OpenAI, vLLM, llama.cpp, Anthropic).
CONTEXT_FULL = re.compile(r"context[ _](length|window|size)|maximum context|prompt is too long|"
                          r"exceeds? the (available )?context", re.I)
MAX_TOTAL_CHARS = 240_000    # all files of one order
MAX_GLOB_FILES = 40


# -- starting -----------------------------------------------------------------------------------------


def start_llm_attempt(runner: AttemptRunner, act: Active) -> None:
    agent = act.agent
    if agent.is_orchestrator and blocked_at_chain_end(runner, act):
        return
    client = new_client(runner, act)
    brief = model_brief(act.attempt.brief.read_text("utf-8"))
    if agent.is_orchestrator:
        context = orchestrator_context(runner, current=act.rec.id)
        roster = llmagent.roster_text(runner.sup.config, agent.name)
        validate = order_validator(runner, agent, request=act.rec.id)
        out = Outcome("plan", client, ledger_text=context)

        def ask() -> Any:
            return llmagent.plan(client, context, roster, brief, validate=validate)
    else:
        files, unseen = current_files(act)
        order = act.order

        def allowed(path: str) -> bool:
            return paths.matches_any(order.files, path) and paths.matches_any(agent.writes, path)

        outcomes = {"done", "blocked"} | {
            f"{b.action}-{b.agent}" if b.agent else b.action for b in order.branching}
        out = Outcome("specialist", client)

        def ask() -> Any:
            return llmagent.run_specialist(client, brief, files, allowed=allowed,
                                           outcomes_allowed=outcomes, unseen=unseen,
                                           repo=act.repo.name if act.repo is not None else None,
                                           workdir=act.attempt.workdir if act.repo is not None else None)

    launch(act, out, ask, f"llm-{act.token}", runner.sup.wake, left=act.deadline - runner.timer())


# -- finishing --------------------------------------------------------------------------------------


def finish_llm_attempt(runner: AttemptRunner, act: Active) -> None:
    """The worker ended: record usage, then judge like any specialist, or file the plan."""
    out: Outcome = act.thread_outcome
    record_usage(runner, act, out)
    _judge(runner, act, out)  # an end completes the request's ledger items (Supervisor._on_terminal)


def _judge(runner: AttemptRunner, act: Active, out: Outcome) -> None:
    if act.cancelled:
        return runner._end_cancelled(act)
    reason = None
    if act.timed_out or isinstance(out.error, LLMTimeout):
        # What to change, not "add a fallback model": no model of any chain answers in no time.
        reason = (f"{act.agent.name}'s model did not answer within the order's timeout "
                  f"({duration(act.deadline - act.began)}); if it needs longer, raise the order's "
                  f"`timeout:` or agents.{act.agent.name}.timeout in coordinator.yaml")
    elif out.error is not None:
        if isinstance(out.error, SpendLimitReached | LLMAuthError):
            # Retrying cannot help: the same limit or the same key stops the next attempt too.
            runner._finish(act)
            act.rec.failures.append(str(out.error))
            return runner.block(act.rec, str(out.error))
        reason = f"{act.agent.name}'s model failed: {out.error}"
        if out.kind != "specialist" and CONTEXT_FULL.search(str(out.error)):
            # Not the endpoint's fault ("check the endpoints" sent the user hunting there): the
            # context the supervisor builds from the budget ledger has outgrown the model.
            budget = runner.sup.config.budget
            reason += (f"; the orchestrator's context ({runner.sup.ledger.hot_tokens():,} hot tokens) is "
                       "too large for this model: `coordinator rotate --fresh` shrinks it; a lower "
                       f"budget.ceiling (now {budget.ceiling:,}) keeps it small")
        elif CONTEXT_FULL.search(str(out.error)):
            # Every attempt sends the same files: retried as is, it fails the same way each time.
            reason += ("; the brief and the text of the order's files are too large for this model's "
                       "context: name fewer or smaller files in the order's files, or use a model with "
                       "a larger context")
    elif out.value is None:
        reason = f"{act.agent.name}'s model call ended without an answer"
    if reason is not None:
        if out.kind == "synthesis":
            return review_failed(runner, act, reason)
        return runner.fail(act, reason)
    if out.kind == "specialist":
        reply, _ = out.value
        if act.repo is not None and reply.outside:
            return _deny_outside(runner, act, reply.outside)
        if act.repo is not None and reply.edits:
            try:
                llmagent.apply_edits(act.attempt.workdir, act.repo.name, reply.edits)
            except CoordinatorError as e:
                return runner.fail(act, f"edits refused: {e}")
            except (OSError, ValueError) as e:  # a name too long, a full disk: the copy is dropped
                return runner.fail(act, f"edits could not be written: {one_line(str(e), 200)}")
        result = results.Result(outcome=reply.outcome, summary=reply.summary, agent=reply.agent,
                                blocker=reply.blocker)
        return runner.conclude(act, result)
    plan, _ = out.value
    file_plan(runner, act, plan)


def _deny_outside(runner: AttemptRunner, act: Active, outside: Iterable[llmagent.Edit]) -> None:
    """Edits outside the order's files or the agent's writes: nothing is applied and the order
    is denied with each path and a `scope` signal, as the gate denies a command's change."""
    assert act.repo is not None
    prefix = act.repo.name + "/"
    offending: list[tuple[gate.Change, str]] = []
    for edit in outside:
        rel = edit.path[len(prefix):]
        exists = os.path.lexists(act.attempt.workdir / rel)
        what = "deleted" if edit.content is None else "modified" if exists else "added"
        change = gate.Change(rel, what, detail="asked for by the model; not applied")
        # The gate's own words, so a model's denial reads like a command's.
        why = gate.outside(edit.path, act.order.files, act.agent.writes) or "outside its permission"
        offending.append((change, why))
    act.verdict = gate.Verdict(changes=tuple(c for c, _ in offending), offending=tuple(offending))
    runner._deny(act, act.verdict)


# -- what the model is sent ---------------------------------------------------------------------------


def current_files(act: Active) -> tuple[dict[str, str | None], dict[str, llmagent.Unseen]]:
    """The current text of the order's files for the model (None: not there yet), bounded; and
    each file not sent whole (too large, over the total, past the glob's count, not UTF-8
    text) with why: the model is told, and an edit of one is refused."""
    out: dict[str, str | None] = {}
    unseen: dict[str, llmagent.Unseen] = {}
    if act.repo is None:
        return out, unseen
    root = act.attempt.workdir
    total = 0
    for entry in act.order.files:
        rel = entry.split("/", 1)[1] if "/" in entry else ""
        # A folder named without a glob covers what lies under it (`paths.matches`): its files
        # are sent, as for folder/**. Once the model was told the folder was a missing file.
        # The repository's name alone (webapp) is its whole tree: it was told "webapp/." was missing.
        folder = not paths.has_glob(rel) and (root / rel).is_dir() and not (root / rel).is_symlink()
        if paths.has_glob(rel) or folder:
            # A trailing ** finds folders only (before Python 3.13): src/** sent the model no file
            # and told it the work was read-only. **/* is every file below, on every version.
            below = f"{rel}/**/*" if rel else "**/*"
            pattern = below if folder else f"{rel}/*" if rel.split("/")[-1] == "**" else rel
            found = [p for p in sorted(root.glob(pattern)) if p.is_file() and not p.is_symlink()
                     and ".git" not in p.relative_to(root).parts]
            targets = found[:MAX_GLOB_FILES]
            for path in found[MAX_GLOB_FILES:]:
                unseen.setdefault(f"{act.repo.name}/{path.relative_to(root).as_posix()}", llmagent.Unseen(
                    f"not sent: {entry} matches more than {MAX_GLOB_FILES} files"))
        else:
            targets = [root / rel]
        for path in targets:
            key = f"{act.repo.name}/{path.relative_to(root).as_posix()}"
            if key in out or key in unseen:
                continue
            link = _link_above(root, path)
            if link is not None:
                # It may lie outside the working copy (a link to ~/.ssh): never sent to a model.
                unseen[key] = llmagent.Unseen(f"not sent: it lies behind the symbolic link {link}")
                continue
            if path.is_symlink():
                # It may point outside the working copy: never sent, nor written through. Told
                # "missing", the model wrote it anew, three times refused.
                unseen[key] = llmagent.Unseen("not sent: it is a symbolic link")
                continue
            if not path.is_file():
                out[key] = None
                continue
            text, why = _file_text(path)
            if why is not None:
                unseen[key] = why
            elif total + len(text) > MAX_TOTAL_CHARS:
                unseen[key] = llmagent.Unseen(f"not sent: the order's files pass {MAX_TOTAL_CHARS} "
                                              "characters in all")
            else:
                total += len(text)
                out[key] = text
    return out, unseen


def _link_above(root: Path, path: Path) -> str | None:
    """The first folder between `root` and `path` that is a symbolic link, or None."""
    here = root
    for part in path.relative_to(root).parts[:-1]:
        here = here / part
        try:
            if here.is_symlink():
                return here.relative_to(root).as_posix()
        except OSError:
            return None
    return None


def _file_text(path: Path) -> tuple[str, llmagent.Unseen | None]:
    """A file's whole text, or why it cannot be sent whole (with its start, when that helps)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            # A character is at most 4 bytes: more than this many bytes is too many characters.
            data = f.read(MAX_FILE_CHARS * 4 + 1)
    except OSError as e:
        return "", llmagent.Unseen(f"not sent: it cannot be read ({e.strerror})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if size <= MAX_FILE_CHARS * 4:
            return "", llmagent.Unseen("not sent: it is not UTF-8 text")
        text = data.decode("utf-8", "ignore")  # a character cut at the end of what was read
    if size > MAX_FILE_CHARS * 4 or len(text) > MAX_FILE_CHARS:
        return "", llmagent.Unseen(f"too large: only its first {MAX_FILE_CHARS} characters (of "
                                   f"{size} bytes) are shown", start=text[:MAX_FILE_CHARS])
    return text, None
