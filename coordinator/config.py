"""coordinator.yaml: the team, loaded and validated once into frozen dataclasses.

Example:
    >>> cfg = load(Path("coordinator.yaml"))
    >>> cfg.agents["chip"].timeout
    1200.0
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from . import gate, paths, schemas, yamlbounds
from .errors import ConfigError

CONFIG_NAME = "coordinator.yaml"
# Senders that are not agents, and why an agent may not take their name: an order from an
# agent so named would pass for the user's, and its commits for the supervisor's own.
RESERVED_NAMES = {
    "user": "the sender of orders dropped by hand",
    "coordinator": "the supervisor's own name in the audit trail",
}
SYSTEM_SENDERS = tuple(RESERVED_NAMES)
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 32  # nesting; the deepest a config needs is agents.<name>.llm.prices.input
MAX_CONFIG_VALUES = 20_000  # once aliases are expanded; a team of 100 agents has a few thousand

# Every default is a named constant (rq's habit): one place to read them.
DEFAULT_TIMEOUT = 30 * 60.0
DEFAULT_STALE_AFTER = 10 * 60.0
DEFAULT_MAX_FAILURES = 2
DEFAULT_AGENT_PARALLEL = 1
DEFAULT_WORKSPACE_PARALLEL = 4
DEFAULT_CEILING = 7000
DEFAULT_BANDS = (2000, 7000, 15000)
DEFAULT_ON_CEILING = "rotate"
DEFAULT_LLM_TIMEOUT = 120.0
DEFAULT_LLM_RETRIES = 2

# Variables the supervisor sets in every attempt's environment over what `env:` gives.
SUPERVISOR_VARIABLES = {
    "TMPDIR": "each attempt gets a private TMPDIR (in its attempt folder)",
    "PYTHONDONTWRITEBYTECODE": "the supervisor sets it for every attempt (bytecode caches would be changes "
                               "outside the order's files)",
}

# The longest wall time or quiet spell a duration may give: longer is a slip (`99999h`), and
# `.inf` or `.nan` would mean no limit at all while reading like one.
MAX_DURATION = 30 * 24 * 3600.0

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds in `value`: ``"20m"``, ``"90s"``, ``"1.5h"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number with a unit, like 20m")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is no duration; write e.g. 90s, 20m or 1h")
        if value <= 0:
            raise ValueError("a duration must be positive")
        return _at_most(float(value), value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
            if seconds > 0:
                return _at_most(seconds, value)
            raise ValueError(f"{value!r} is no time at all; give a duration above 0, e.g. 90s, 20m or 1h")
    raise ValueError(f"{value!r} is not a duration; write e.g. 90s, 20m or 1h")


def _at_most(seconds: float, value: object) -> float:
    if seconds > MAX_DURATION:
        raise ValueError(f"{value!r} is longer than {MAX_DURATION / 86400:.0f} days; give a duration "
                         "up to 720h")
    return seconds


@dataclass(frozen=True)
class Prices:
    input: float = 0.0  # USD per million tokens
    output: float = 0.0


@dataclass(frozen=True)
class Endpoint:
    """One model reachable at one OpenAI-compatible base URL."""

    model: str
    base_url: str
    api_key_env: str | None = None
    prices: Prices = Prices()


@dataclass(frozen=True)
class LLMSettings:
    primary: Endpoint
    fallback: tuple[Endpoint, ...] = ()
    timeout: float = DEFAULT_LLM_TIMEOUT
    max_retries: int = DEFAULT_LLM_RETRIES
    temperature: float | None = None
    max_tokens: int | None = None
    json_mode: bool = True

    @property
    def chain(self) -> tuple[Endpoint, ...]:
        return (self.primary, *self.fallback)


@dataclass(frozen=True)
class Agent:
    name: str
    role: str  # "orchestrator" | "specialist"
    command: tuple[str, ...] | None = None
    llm: LLMSettings | None = None
    writes: tuple[str, ...] = ()
    sends_to: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    stale_after: float = DEFAULT_STALE_AFTER
    max_failures: int = DEFAULT_MAX_FAILURES
    max_parallel: int = DEFAULT_AGENT_PARALLEL
    sandbox_writable: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    description: str = ""
    spend_limit: float | None = None

    @property
    def is_orchestrator(self) -> bool:
        return self.role == "orchestrator"

    @property
    def runnable(self) -> bool:
        return self.command is not None or self.llm is not None


@dataclass(frozen=True)
class Budget:
    ceiling: int = DEFAULT_CEILING
    bands: tuple[int, int, int] = DEFAULT_BANDS
    on_ceiling: str = DEFAULT_ON_CEILING


@dataclass(frozen=True)
class Config:
    agents: dict[str, Agent]
    orchestrator: str | None = None
    escalate_to: str | None = None
    max_parallel: int = DEFAULT_WORKSPACE_PARALLEL
    budget: Budget = field(default_factory=Budget)
    spend_limit: float | None = None
    path: Path | None = None
    digest: str = ""  # sha256 of the file read: tells a running supervisor's team from an edited one

    def agent(self, name: str) -> Agent:
        return self.agents[name]

    def may_send(self, sender: str, recipient: str) -> bool:
        """`user` (and the supervisor itself, `coordinator`) may send to anyone; an agent only
        to its `sends_to`."""
        if sender in SYSTEM_SENDERS:
            return True
        a = self.agents.get(sender)
        return a is not None and recipient in a.sends_to


class _Repeated(yaml.YAMLError):
    def __init__(self, key: str, first: int, again: int) -> None:
        super().__init__(f"given twice (lines {first} and {again}); keep one")
        self.key = key


class _Unbounded(yaml.YAMLError):
    pass


class _Misread(yaml.YAMLError):
    """A plain number YAML 1.1 reads in a base the user did not mean: `timeout: 1:30` is 90
    (base 60, as a time of day) and `max_failures: 010` is 8 (octal)."""

    def __init__(self, key: str, written: str, read: object, base: str) -> None:
        meant = "a duration such as 90m or 1.5h" if ":" in written else str(int(written.replace("_", ""), 10))
        super().__init__(f"`{written}` was read by YAML as {read} ({base}); write {meant}, or put it in quotes "
                         "if it is text")
        self.key = key


_BASE_60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


def _bounded(text: str) -> None:
    """Refuse an alias bomb (billion laughs), an alias inside the value it names, or deep
    nesting before anything is built (`yamlbounds`): validating what they expand to would
    never end, and building deep nesting ends in a RecursionError."""
    found = yamlbounds.excess(text, values=MAX_CONFIG_VALUES, chars=MAX_CONFIG_BYTES, depth=MAX_CONFIG_DEPTH)
    if found is None:
        return
    line = found.mark.line + 1 if found.mark is not None else "?"
    if found.kind == "loop":
        raise _Unbounded(f"uses the YAML alias *{found.anchor} at line {line} inside the value it names "
                         "(a loop); write the values out in full")
    if found.kind == "expands":
        raise _Unbounded(f"uses the YAML alias *{found.anchor} at line {line}, which makes it expand past "
                         f"{MAX_CONFIG_VALUES} values or 1 MiB; write the values out in full")
    if found.kind == "depth":
        raise _Unbounded(f"nests deeper than {MAX_CONFIG_DEPTH} levels at line {line}; a team config needs a few")
    raise _Unbounded(f"holds more than {MAX_CONFIG_VALUES} values (line {line}); a team config needs far fewer")


def _safe_load(text: str) -> Any:
    """Safe YAML that refuses a key given twice in one mapping: YAML keeps the last one
    silently, so a second `chip:` under `agents:` would replace the first agent unseen."""
    _bounded(text)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_repeats(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_repeats(node: yaml.Node, path: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: already walked (and a recursive one would never end)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            where = path
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                where = f"{path}.{key.value}" if path else key.value
                if key.value in lines:
                    raise _Repeated(where, lines[key.value], key.start_mark.line + 1)
                lines[key.value] = key.start_mark.line + 1
            _refuse_repeats(value, where, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_repeats(item, f"{path}.{i}", seen)
    elif isinstance(node, yaml.ScalarNode) and node.style is None and node.tag in (_INT, _FLOAT):
        if _BASE_60.match(node.value):
            raise _Misread(path or "(top level)", node.value, yaml.safe_load(node.value), "base 60, as a time of day")
        if _OCTAL.match(node.value):
            raise _Misread(path or "(top level)", node.value, yaml.safe_load(node.value), "octal, for its leading 0")


def load(path: Path) -> Config:
    """Read, validate and freeze the config at `path`; ConfigError names the key."""
    shown = path.name
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("not found; run `coordinator init` to make one", path=shown) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", path=shown) from None
    if len(raw_bytes) > MAX_CONFIG_BYTES:
        raise ConfigError("larger than 1 MiB; this is not a team config", path=shown)
    text = ""
    try:
        text = raw_bytes.decode("utf-8-sig")
        data = _safe_load(text)
    except UnicodeDecodeError as e:
        # Said with no place, a Latin-1 "é" in one description left the user searching the file.
        row = raw_bytes.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"is not UTF-8 text (line {row}: byte 0x{raw_bytes[e.start]:02x}); save it as UTF-8",
                          path=shown) from None
    except (_Repeated, _Misread) as e:
        raise ConfigError(str(e), path=shown, key=e.key) from None
    except _Unbounded as e:
        raise ConfigError(str(e), path=shown) from None
    except yaml.reader.ReaderError as e:
        # PyYAML says this in two lines, the second about "<unicode string>": one line, at its line.
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError(f"is not valid YAML at line {text.count(chr(10), 0, e.position) + 1}: it holds U+{code:04X}, "
                          "a character YAML does not allow (a config is plain text): remove it", path=shown) from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        if line is not None and _tab_indented(text, line):
            # PyYAML says "found character that cannot start any token", which names no tab.
            raise ConfigError(f"is not valid YAML{where}: it is indented with a tab; YAML indents with spaces",
                              path=shown) from None
        raise ConfigError(f"is not valid YAML{where}: {getattr(e, 'problem', e)}{_syntax_hint(e, text)}",
                          path=shown) from None
    try:
        cfg = from_mapping(data, path=path)
    except ConfigError as e:
        raise _with_yaml_hint(e, text) from None
    return dataclasses.replace(cfg, digest=hashlib.sha256(raw_bytes).hexdigest())


def _with_yaml_hint(e: ConfigError, text: str) -> ConfigError:
    """`e`, saying what YAML did when the value it is about was read as no text, as a work
    order says it: `on_ceiling: no` was refused as "not false", and an agent named `no` as
    "'false' is not an agent name", leaving the user to guess where a false came from."""
    from ._orderfields import _KIND_PROBLEM, _SAID_QUOTES, _yaml_hint, plain_scalars

    prefix = f"{e.path or CONFIG_NAME}: {e.key}: "
    if not e.key or not str(e).startswith(prefix):
        return e
    message = str(e).removeprefix(prefix)
    node = yaml.compose(text, Loader=yamlbounds.LOADER)  # bounded and loaded once already: it composes
    hint = None
    written = plain_scalars(node).get(e.key) if _KIND_PROBLEM.search(message) else None
    if written and message.startswith(("must be a string", "must be an agent name")):
        # Text is wanted: quoted, the value is that text (a date is said to be quoted already).
        hint = None if _SAID_QUOTES.search(message) else _yaml_hint(e.key, *written)
    elif written and written[1] in ("true", "false"):  # in quotes it is still no rotate, list or duration
        key = e.key.rsplit(".", 1)[-1]
        hint = f"`{written[0] if key.isdigit() else f'{key}: {written[0]}'}` was read by YAML as {written[1]}"
    if hint is None:  # a key of the mapping `e` is about: `no:` under agents
        hint = next((h for kind, h in _key_hints(node, e.key.split(".")) if f"'{kind}'" in message), None)
    return ConfigError(f"{message}; {hint}", path=e.path, key=e.key) if hint else e


def _key_hints(node: Any, parts: list[str]) -> list[tuple[str, str]]:
    """For each unquoted key of the mapping at `parts` under `node` that YAML reads as true or
    false, the hint that says so (`no:` read as false). A number is no name in quotes either."""
    for part in parts:
        if not isinstance(node, yaml.MappingNode):
            return []
        node = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
    if not isinstance(node, yaml.MappingNode):
        return []
    hints = []
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and not key.style and key.tag == "tag:yaml.org,2002:bool":
            kind = "true" if key.value.lower() in ("yes", "true", "on") else "false"
            hints.append((kind, f"the key `{key.value[:40]}:` was read by YAML as {kind}: put it in quotes "
                         f"(\"{key.value[:40]}\":)"))
    return hints


def _syntax_hint(e: yaml.YAMLError, text: str) -> str:
    """What to do about the YAML syntax a config's values run into most, which PyYAML's words do
    not say: a glob that starts with * (`writes: [*.md]`: an alias), a value that starts with @, `
    or %, a description with ": " in it."""
    mark = getattr(e, "problem_mark", None)
    rows = text.splitlines()
    if mark is None or not 0 <= mark.line < len(rows):
        return ""
    row, problem, context = rows[mark.line], str(getattr(e, "problem", "")), str(getattr(e, "context", ""))
    if "alias" in context:
        start = getattr(e, "context_mark", None)
        column = start.column if start is not None and start.line == mark.line else row.find("*")
        word = re.split(r"[,\]}\s]", row[max(column, 0):])[0][:60]
        return f"; a value that starts with * is read by YAML as an alias (*name): put it in quotes (\"{word}\")"
    if "cannot start any token" in problem and mark.column < len(row) and row[mark.column] in "@`%":
        return f"; a value cannot start with {row[mark.column]} in YAML: put it in quotes"
    if "mapping values are not allowed" in problem and -1 < row.find(": ") < mark.column:  # not the key's own
        key, _, value = row.partition(": ")
        value = re.split(r"\s#", value)[0].strip()[:60]
        return f"; a value with \": \" in it must be in quotes ({key.strip()}: {json.dumps(value, ensure_ascii=False)})"
    return ""


def _tab_indented(text: str, line: int) -> bool:
    rows = text.splitlines()
    if not 0 <= line < len(rows):
        return False
    row = rows[line]
    return "\t" in row[: len(row) - len(row.lstrip(" \t"))]


def from_mapping(data: Any, *, path: Path | None = None) -> Config:
    shown = path.name if path else CONFIG_NAME
    if not isinstance(data, dict):
        raise ConfigError("must be a mapping with `version: 1` and `agents:`", path=shown)
    for where, value in _non_finite(data, ""):
        # YAML's .inf and .nan pass every bound of the schema (nan compares false to all), and
        # were taken: `timeout: .nan` ran attempts with no time limit and wrote NaN into state/.
        raise ConfigError(f"{value} is not a finite number; write one such as 20, or leave the key out",
                          path=shown, key=where)
    for where in _nul_bytes(data, ""):
        # A double-quoted "\0" passes the check of the file's characters; no path, argument or
        # variable can hold it: a `sandbox.writable` one stopped every command with an internal
        # error, one in a `command` or `env` failed every attempt of the agent.
        raise ConfigError('holds a NUL character (written "\\0"), which no path, argument or variable '
                          "can hold; remove it", path=shown, key=where)
    for err in schemas.errors("config", data):
        raise ConfigError(schemas.describe(err), path=shown, key=schemas.field_of(err))

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(message, path=shown, key=key)

    defaults = data.get("defaults", {}) or {}
    agents: dict[str, Agent] = {}
    for name, spec in data["agents"].items():
        if name in RESERVED_NAMES:
            raise fail(f"agents.{name}", f"{name!r} is reserved ({RESERVED_NAMES[name]}); pick another name")
        agents[name] = _agent(name, spec, defaults, fail)

    for name, a in agents.items():
        for target in a.sends_to:
            if target not in agents:
                raise fail(f"agents.{name}.sends_to", f"unknown agent {target!r}; agents: {', '.join(agents)}")
            if target == name:
                raise fail(f"agents.{name}.sends_to", "an agent cannot send to itself")
    orchestrator = data.get("orchestrator")
    if orchestrator is not None:
        if orchestrator not in agents:
            raise fail("orchestrator", f"unknown agent {orchestrator!r}")
        if agents[orchestrator].role != "orchestrator":
            raise fail("orchestrator", f"{orchestrator!r} must have `role: orchestrator`")
    escalate = data.get("escalate_to")
    if escalate is not None and escalate not in agents:
        raise fail("escalate_to", f"unknown agent {escalate!r}")
    if escalate is not None and not (agents[escalate].runnable or agents[escalate].is_orchestrator):
        # Taken, every order that was blocked filed an investigation that intake then rejected.
        raise fail("escalate_to", f"{escalate} has no `command` or `llm`, so the investigation orders it gets "
                                  "could never run; give it one, or escalate to another agent")
    orchestrators = [n for n, a in agents.items() if a.role == "orchestrator"]
    if len(orchestrators) > 1:
        raise fail("agents", f"one orchestrator per team; found {', '.join(orchestrators)}")
    if orchestrators and orchestrator is None:
        orchestrator = orchestrators[0]

    b = data.get("budget", {}) or {}
    bands = tuple(b.get("bands", DEFAULT_BANDS))
    if list(bands) != sorted(bands) or len(set(bands)) != 3:
        raise fail("budget.bands", "must be three increasing numbers, e.g. [2000, 7000, 15000]")
    budget = Budget(
        ceiling=int(b.get("ceiling", DEFAULT_CEILING)),
        bands=(int(bands[0]), int(bands[1]), int(bands[2])),
        on_ceiling=str(b.get("on_ceiling", DEFAULT_ON_CEILING)),
    )
    if budget.ceiling > budget.bands[2]:
        # Taken, the mode went `executor` long before the ceiling, and on_ceiling never acted in time.
        where = "budget.ceiling" if "ceiling" in b else "budget.bands"
        raise fail(where, f"a ceiling of {budget.ceiling:,} hot tokens is past the last band "
                          f"({budget.bands[2]:,}, where the orchestrator is an executor): the ceiling would act "
                          f"only after that; set the ceiling from {budget.bands[0]:,} to {budget.bands[2]:,}, "
                          "or raise the bands")
    return Config(
        agents=agents,
        orchestrator=orchestrator,
        escalate_to=escalate,
        max_parallel=int(data.get("max_parallel", DEFAULT_WORKSPACE_PARALLEL)),
        budget=budget,
        spend_limit=data.get("spend_limit"),
        path=path,
    )


def _non_finite(value: Any, where: str) -> list[tuple[str, float]]:
    """Every .inf and .nan in the loaded config, with its dotted key (the config is bounded
    by `_bounded`, so this walk is too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(where or "(top level)", value)]
    found: list[tuple[str, float]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found += _non_finite(inner, f"{where}.{key}" if where else str(key))
    return found


def _nul_bytes(value: Any, where: str) -> list[str]:
    """The dotted key of every key or text in the loaded config that holds a NUL."""
    found: list[str] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        at = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and "\0" in key:
            found.append(where or "(top level)")
        elif isinstance(inner, str) and "\0" in inner:
            found.append(at)
        else:
            found += _nul_bytes(inner, at)
    return found


def _agent(name: str, spec: dict[str, Any], defaults: dict[str, Any], fail: Any) -> Agent:
    def duration(key: str, fallback: float) -> float:
        value = spec.get(key, defaults.get(key))
        if value is None:
            return fallback
        try:
            return parse_duration(value)
        except ValueError as e:
            where = f"agents.{name}.{key}" if key in spec else f"defaults.{key}"
            raise fail(where, str(e)) from None

    role = spec["role"]
    writes = tuple(spec.get("writes", ()))
    if role == "orchestrator" and writes:
        raise fail(f"agents.{name}.writes", "an orchestrator never writes; it sends work orders")
    for i, w in enumerate(writes):
        problem = paths.several_problem(w) or paths.path_problem(w) or paths.brace_problem(w) or git_glob_problem(w)
        if problem:
            raise fail(f"agents.{name}.writes.{i}", problem)
    written = tuple((spec.get("sandbox", {}) or {}).get("writable", ()))
    writable = tuple(os.path.expanduser(p) for p in written)
    for i, p in enumerate(writable):
        if p.startswith("~"):  # left as written: "must be absolute or start with ~" said of a path that did
            tilde = p.split("/")[0]
            raise fail(f"agents.{name}.sandbox.writable.{i}", f"{p!r}: no user {tilde[1:]!r} on this system, so "
                       f"{tilde} names no home folder; write the folder's absolute path")
        home = os.environ.get("HOME", "")
        if "HOME" in os.environ and not home and str(written[i]).split("/")[0] == "~":
            # ~ became the root: `~/.claude` granted /.claude (and `~` all of /).
            raise fail(f"agents.{name}.sandbox.writable.{i}", f"{written[i]!r}: HOME is empty, so ~ names no "
                       "folder; set HOME to your home folder, or write the folder's absolute path")
        if not os.path.isabs(p) and str(written[i]).split("/")[0] == "~" and not os.path.isabs(home):
            # "must be absolute or start with ~" was said of a path that started with ~.
            raise fail(f"agents.{name}.sandbox.writable.{i}", f"{written[i]!r}: HOME is the relative path "
                       f"{home!r}, so ~ names no folder; set HOME to an absolute path, or write the folder's "
                       "absolute path")
        if not os.path.isabs(p):
            raise fail(f"agents.{name}.sandbox.writable.{i}", f"{p!r} must be absolute or start with ~")
        too_long = _too_long(p)
        if too_long:  # doctor and the supervisor's start stopped with "internal error: OSError"
            raise fail(f"agents.{name}.sandbox.writable.{i}", too_long)
    command = spec.get("command")
    if command is not None and not command[0]:
        raise fail(f"agents.{name}.command.0", "is empty; the first entry is the program to run")
    for key in spec.get("env") or {}:
        if not isinstance(key, str):  # `yes:` or `1:` unquoted: it stopped every command with an internal error
            what = schemas._what(key)
            read = "" if isinstance(key, bool) else f": YAML read the key as {what}" + (
                "" if "quotes" in what else "; put it in quotes to mean text")
            raise fail(f"agents.{name}.env", f"{schemas._key(key)!r} is not an environment variable name{read}")
        if not key or "=" in key:
            # The kernel takes no such name: every attempt would fail to start.
            raise fail(f"agents.{name}.env", f"{key!r} is not an environment variable name (not empty, no '=')")
        if key.startswith("COORD_") or key in SUPERVISOR_VARIABLES:
            # Set over the agent's own for every attempt: a TMPDIR given here was dropped unsaid.
            why = SUPERVISOR_VARIABLES.get(key, "the COORD_ variables are the supervisor's, set for every attempt")
            raise fail(f"agents.{name}.env.{key}", f"{why}, so a value here is never seen by the agent; remove it")
    return Agent(
        name=name,
        role=role,
        command=tuple(command) if command is not None else None,
        llm=_llm(name, spec["llm"], fail) if "llm" in spec else None,
        writes=writes,
        sends_to=tuple(spec.get("sends_to", ())),
        timeout=duration("timeout", DEFAULT_TIMEOUT),
        stale_after=duration("stale_after", DEFAULT_STALE_AFTER),
        max_failures=int(spec.get("max_failures", defaults.get("max_failures", DEFAULT_MAX_FAILURES))),
        max_parallel=int(spec.get("max_parallel", defaults.get("max_parallel", DEFAULT_AGENT_PARALLEL))),
        sandbox_writable=writable,
        env=tuple(sorted((spec.get("env") or {}).items())),
        description=str(spec.get("description", "")),
        spend_limit=spec.get("spend_limit"),
    )


# Names git keeps for itself, in the cases a glob might match (the gate compares them in any case).
_GIT_NAMES = tuple(n for name in (".git", ".gitmodules", "git~1") for n in (name, name.upper(), name.title()))
_GLOB_SETS = re.compile(r"\[[^\]]*\]")


def budget_warning(cfg: Config) -> str | None:
    """A ceiling below the first band is taken (it rotates early), but said: the orchestrator is
    rotated while it still only routes, every few orders."""
    b = cfg.budget
    if cfg.orchestrator is None or b.ceiling >= b.bands[0]:
        return None
    return (f"budget.ceiling: {b.ceiling:,} hot tokens is below the first band ({b.bands[0]:,}): "
            f"{cfg.orchestrator} is rotated while it still only routes, every few orders; the bands put a "
            f"ceiling from {b.bands[0]:,} to {b.bands[2]:,}")


def git_glob_problem(entry: str, *, advice: str = "name the files and folders the agent may write") -> str | None:
    """Why a `writes` entry (or an order's `files` entry) promises what the gate never grants: a
    component naming git internals (`.gitmodules`, `git~1`), or one spelling them with `?` or a
    set (`.gi?`, `.[g]it`). A `*`, `**` or `????` matches them too, and much else: it stays, the
    gate refusing those paths whatever the glob says."""
    for part in entry.split("/")[1:]:
        shown = part if gate.is_git_path(part) else None
        spelt = _GLOB_SETS.sub("", part).replace("?", "")  # its own letters, not its wildcards'
        if shown is None and spelt and "*" not in part and paths.has_glob(part):
            shown = next((n for n in _GIT_NAMES if paths.matches(part, n)), None)
        if shown is not None:
            return (f"{entry!r} matches {shown}: git internals (.git, .gitmodules) are never writable, "
                    f"whatever writes says; {advice}")
    return None


def git_writes_note(agent: Agent) -> str | None:
    """What `coordinator doctor` says of an agent whose `writes` match a repository's own git
    internals (`webapp/**`, `webapp/*`): valid, but those paths stay denied. None otherwise."""
    wide = [w for w in agent.writes
            if any(paths.matches(w, f"{paths.repo_of(w)}/{n}") for n in (".git/config", ".gitmodules"))]
    if not wide:
        return None
    return (f"writes {', '.join(wide)} also match{'es' if len(wide) == 1 else ''} .git and .gitmodules: those "
            "are never writable, whatever the glob says (a change to them is denied)")


def _base_url_problem(url: str) -> str | None:
    """Why `url` cannot be the base of an endpoint's address, or None. `/chat/completions` is
    added to its path (`llm.completions_url`: a query stays the query); a #fragment would be
    dropped unsaid, no host or a bad port failed every call and every order of the agent."""
    # A password in it, or a query's values (a gateway's `?api-key=...`), are never said: the
    # error goes where the supervisor's output may be kept (a service's log, a CI job's).
    shown = repr(re.sub(r"([?&][^=&#]*=)[^&#]*", r"\1…", re.sub(r"//[^/?#]*@", "//…@", url))[:80])
    if re.search(r"\s", url):
        return f"{shown} holds a space or line break; write the endpoint's address without one"
    try:
        parts = urlsplit(url)
        port = parts.port  # out of range or not a number: ValueError
    except ValueError as e:
        return f"{shown} is not a URL ({e}); write it like http://127.0.0.1:11434/v1"
    if not parts.hostname:
        return f"{shown} names no host; write it like http://127.0.0.1:11434/v1"
    if port == 0:
        return f"{shown} names port 0, which no server listens on"
    if parts.fragment or url.endswith("#"):
        return (f"{shown} has a #fragment, which is never sent (/chat/completions is added to the path, and a "
                "?query such as a gateway's api-version is kept); give the address without it")
    return None


PATH_MAX = 4096  # bytes in a path the kernel takes, its final NUL included


def _too_long(path: str) -> str | None:
    """Why no file system could hold `path` (a name or the whole path too long), or None."""
    size = len(os.fsencode(path))
    if size >= PATH_MAX:
        return f"is {size} bytes long ({path[:40]!r}…); a path is at most {PATH_MAX - 1}"
    long = next((part for part in path.split("/") if len(os.fsencode(part)) > paths.NAME_MAX), None)
    if long is not None:
        return f"has a name of {len(os.fsencode(long))} bytes ({long[:24]!r}…); a file name is at most {paths.NAME_MAX}"
    return None


def _llm(name: str, spec: dict[str, Any], fail: Any) -> LLMSettings:
    def prices(p: dict[str, Any] | None, inherit: Prices = Prices()) -> Prices:
        if not p:
            return inherit
        return Prices(input=float(p.get("input", 0.0)), output=float(p.get("output", 0.0)))

    for where, endpoint in (("llm", spec), *((f"llm.fallback.{i}", e) for i, e in enumerate(spec.get("fallback", ()))
                                             if isinstance(e, dict))):
        problem = _base_url_problem(endpoint["base_url"]) if "base_url" in endpoint else None
        if problem:
            raise fail(f"agents.{name}.{where}.base_url", problem)
    primary = Endpoint(
        model=spec["model"],
        base_url=spec["base_url"].rstrip("/"),
        api_key_env=spec.get("api_key_env"),
        prices=prices(spec.get("prices")),
    )
    chain: list[Endpoint] = []
    for item in spec.get("fallback", ()):
        if isinstance(item, str):
            # A bare model name shares the primary's endpoint and key, not its prices.
            chain.append(Endpoint(model=item, base_url=primary.base_url, api_key_env=primary.api_key_env))
        else:
            base_url = str(item.get("base_url", primary.base_url)).rstrip("/")
            # A key goes only where it was meant to: another host gets none unless the entry
            # names its own variable; `api_key_env: null` means no key at all.
            if "api_key_env" in item:
                key_env = item["api_key_env"]
            else:
                key_env = primary.api_key_env if base_url == primary.base_url else None
            chain.append(Endpoint(model=item["model"], base_url=base_url, api_key_env=key_env,
                                  prices=prices(item.get("prices"))))
    timeout = spec.get("timeout")
    try:
        seconds = parse_duration(timeout) if timeout is not None else DEFAULT_LLM_TIMEOUT
    except ValueError as e:
        raise fail(f"agents.{name}.llm.timeout", str(e)) from None
    return LLMSettings(
        primary=primary,
        fallback=tuple(chain),
        timeout=seconds,
        max_retries=int(spec.get("max_retries", DEFAULT_LLM_RETRIES)),
        temperature=spec.get("temperature"),
        max_tokens=spec.get("max_tokens"),
        json_mode=bool(spec.get("json_mode", True)),
    )
