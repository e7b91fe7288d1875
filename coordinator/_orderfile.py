"""Reading work-order and result files: untrusted bytes to a normalized dict.

Private to `orders` and `results`. Everything here assumes hostile input: size,
encoding, YAML alias bombs and nesting are refused before anything is built, and
every broken rule becomes a `Problem` with the field (and, where the file has
one, the line) it is about. Here the text (Markdown, YAML or JSON) is read into a
mapping, with the line of each key and item; `_orderfields` shapes and checks it.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml

from . import yamlbounds
from ._orderfields import KEYS, MAX_PROBLEMS, SECTIONS, Lines, kind_of, shape
from .errors import OrderError, Problem

MAX_ORDER_BYTES = 256 * 1024
MAX_YAML_DEPTH = 32  # nesting; libyaml slows quadratically on deep flow nesting
MAX_YAML_NODES = 5000  # values; a full order has a few hundred, building 100,000 takes a second
MAX_YAML_CHARS = 256 * 1024  # characters once aliases are expanded: no more than a whole order
KINDS = {".md": "markdown", ".markdown": "markdown", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}

_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*))?")
_BOLD = re.compile(r" {0,3}\*\*([^*\n]{1,60}?)(?::\*\*|\*\*[ \t]*:)(.*)")
_ITEM = re.compile(r"\s*(?:[-*+]|\d{1,9}[.)])(?:\s+(.*))?")
_CHECKBOX = re.compile(r"\[[ xX]\]\s+")
_YAML_LOADER: Any = yamlbounds.LOADER


# --- reading untrusted text (shared with results.py) --------------------------------------


def fail(path: str | None, message: str, line: int | None = None) -> NoReturn:
    """Refuse a whole file: one problem, no field."""
    raise OrderError([Problem("", message, path, line)])


def read_text(data: bytes, *, path: str, limit: int, what: str, empty_hint: str) -> str:
    """`data` as text, or OrderError if it is too big, binary, not UTF-8 or empty."""
    if len(data) > limit:
        fail(path, too_big(len(data), limit, what))
    if b"\x00" in data:
        if _utf16(data):
            fail(path, f"is UTF-16 text (as Windows PowerShell's `>` writes it); {what} is UTF-8: save it "
                       "as UTF-8 (`Out-File -Encoding utf8`)")
        fail(path, f"is binary (it holds NUL bytes); {what} is UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        fail(path, f"is not UTF-8 text (byte {e.start}); save it as UTF-8")
    if not text.strip():
        fail(path, f"is empty; {empty_hint}")
    return text.replace("\r\n", "\n")


def _utf16(data: bytes) -> bool:
    """Whether `data` reads as UTF-16 text: a byte-order mark, or every other byte of its
    start NUL (ASCII text written two bytes a character)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True
    head = data[:64]
    return len(head) >= 8 and (head[1::2].count(0) == len(head) // 2 or head[0::2].count(0) == len(head) // 2)


def too_big(size: int, limit: int, what: str) -> str:
    # A size just past the limit rounds to the limit ("is 256 KiB; … at most 256 KiB"): "over" it.
    shown = _size(size) if _size(size) != _size(limit) else f"over {_size(limit)}"
    return f"is {shown}; {what} is at most {_size(limit)}: move the details into files it names"


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"


def load_yaml(text: str, *, path: str, offset: int = 0, aliases: bool = False) -> tuple[Any, dict[str, int]]:
    """Safe YAML with bounded nesting, plus the line of each top-level key and of each item of
    a top-level list (`files.2`). `offset`: lines before `text` in the file. `aliases`: allow
    `*name` as long as what they expand to stays small (else any alias is refused)."""
    plain = _plain_mapping(text, offset)
    if plain is not None:
        return plain
    try:
        # A first pass over events refuses alias bombs (billion laughs), deep nesting and sheer
        # bulk before anything is built, so a hostile file costs milliseconds and no memory.
        _bounded(text, path=path, offset=offset, aliases=aliases)
        loader = _YAML_LOADER(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except OrderError:
        raise
    except yaml.MarkedYAMLError as e:
        fail(path, f"is not valid YAML: {e.problem or e.context}",
             _line(e.problem_mark or e.context_mark, offset))
    except Exception as e:  # the YAML library on hostile input: any failure means "not YAML"
        reason = str(e).split(";")[0].splitlines()[0][:100] if str(e).strip() else type(e).__name__
        fail(path, f"is not valid YAML: {reason}")
    lines = Lines(node if isinstance(node, yaml.MappingNode) else None)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            line = key.start_mark.line + 1 + offset
            if key.value in lines:
                fail(path, f"{key.value!r} is given twice (lines {lines[key.value]} and {line}); "
                           "keep one", line)
            lines[key.value] = line
            if isinstance(value, yaml.SequenceNode):
                for i, item in enumerate(value.value):
                    lines[f"{key.value}.{i}"] = item.start_mark.line + 1 + offset
    return data, lines


# A word YAML reads as the same text, unquoted: no number, true/false, null or date can start
# with a letter but these words (`render` writes such words as they are, too).
PLAIN_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
NOT_TEXT_WORDS = frozenset({"y", "Y", "n", "N", "yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE",
                            "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF", "null", "Null",
                            "NULL"})
_PLAIN_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*): ([A-Za-z_][A-Za-z0-9_.-]*)")
_PLAIN_LINES = 64  # far within MAX_YAML_NODES: more is read by PyYAML, which counts them


def _plain_mapping(text: str, offset: int) -> tuple[dict[str, str], Lines] | None:
    """`text` read as `load_yaml` reads it when each of its lines is `key: word`, both words
    YAML takes as text, each key once (the usual front matter, `id: WO-0007`); None for
    anything else. PyYAML's two passes over it were a fifth of reading an order."""
    rows = text.split("\n")
    if len(rows) > _PLAIN_LINES:
        return None
    data: dict[str, str] = {}
    lines = Lines()
    for i, row in enumerate(rows):
        m = _PLAIN_LINE.fullmatch(row)
        if m is None:
            return None
        key, value = m.groups()
        if key in data or key in NOT_TEXT_WORDS or value in NOT_TEXT_WORDS:
            return None
        data[key] = value
        lines[key] = i + 1 + offset
    return data, lines


def _bounded(text: str, *, path: str, offset: int, aliases: bool) -> None:
    """Refuse the text when, with its aliases expanded, it passes MAX_YAML_NODES values or
    MAX_YAML_CHARS characters, or nests deeper than MAX_YAML_DEPTH (`yamlbounds`)."""
    found = yamlbounds.excess(text, values=MAX_YAML_NODES, chars=MAX_YAML_CHARS, depth=MAX_YAML_DEPTH,
                              aliases=aliases)
    if found is None:
        return
    line = _line(found.mark, offset)
    if found.kind == "alias":
        fail(path, "uses a YAML alias (*name); write every value out in full", line)
    if found.kind == "loop":
        fail(path, f"uses the YAML alias *{found.anchor} inside the value it names (a loop); write the "
                   "values out in full", line)
    if found.kind == "expands":
        fail(path, f"uses a YAML alias (*{found.anchor}) that makes it expand past {MAX_YAML_NODES} "
                   f"values or {MAX_YAML_CHARS // 1024} KiB; write the values out in full", line)
    if found.kind == "depth":
        fail(path, f"nests deeper than {MAX_YAML_DEPTH} levels; flatten it", line)
    fail(path, f"holds more than {MAX_YAML_NODES} values; far more than a work order needs", line)


def _line(mark: Any, offset: int) -> int | None:
    return mark.line + 1 + offset if mark is not None else None


# --- parse: the file alone ---------------------------------------------------------------


@dataclass
class Draft:
    """A file read as far as it goes: normalized fields, their lines, what is wrong."""

    fields: dict[str, Any]
    lines: dict[str, int]
    problems: list[Problem]


def read_order(data: bytes, *, path: str, to: str | None, sender: str | None, kind: str | None,
               priority: str = "normal") -> Draft:
    """Read `data` as a work order as far as it goes; file-level refusals raise OrderError.
    `priority`: the order's when it gives none."""
    if kind is None:
        name = path.rsplit("/", 1)[-1]
        suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
        kind = KINDS.get(suffix)
        if kind is None:
            shown = f"a {suffix} file" if suffix else "a file without a suffix"
            fail(path, f"is {shown}; a work order is a .md, .markdown, .yaml, .yml or .json file")
    text = read_text(data, path=path, limit=MAX_ORDER_BYTES, what="a work order",
                     empty_hint="write a work order (`coordinator new --to AGENT` prints a template)")
    problems: list[Problem] = []
    if kind == "markdown":
        raw, lines = _markdown(text, path, problems)
    elif kind == "yaml":
        raw, lines = load_yaml(text, path=path, aliases=True)
    else:
        raw, lines = load_json(text, path), {}
    if not isinstance(raw, dict):
        fail(path, f"must be a mapping of keys ({', '.join(SECTIONS)}, …), not {kind_of(raw)}")
    fields = shape(raw, path=path, to=to, sender=sender, kind=kind, problems=problems, priority=priority)
    return Draft(fields, lines, problems)


# How every JSON document opens: `{` then a quoted key or `}`, or `[`.
_LOOKS_JSON = re.compile(r"\s*(?:\{\s*[\"}]|\[)")


def flow_kind(text: str) -> str:
    """"json" or "yaml" for text no file name tells (stdin, a result file): YAML in flow
    style (`{outcome: done, summary: all good}`) is YAML, which SPEC §2 and §6 allow as
    well. Text that opens as JSON does is read as JSON, so a broken one gets JSON's message
    (a missing comma would pass as YAML, read as one odd value)."""
    return "json" if _LOOKS_JSON.match(text) else "yaml"


def load_json(text: str, path: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                fail(path, f"{key!r} is given twice; keep one")
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        fail(path, f"is not valid JSON: {e.msg}", e.lineno)
    except (ValueError, RecursionError) as e:  # digits past int's limit, absurd nesting
        fail(path, f"is not valid JSON: {str(e)[:100] or type(e).__name__}")
    # "\ud800" alone is half of a character: no file or message could hold it (YAML refuses it too).
    if "\\ud" in text.lower():
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            fail(path, f"is not valid JSON text: {e.object[e.start:e.end].encode('unicode_escape').decode()} "
                       "is half of a character (a lone surrogate); write the character itself")
    return data


def _markdown(text: str, path: str, problems: list[Problem]) -> tuple[dict[Any, Any], dict[str, int]]:
    """The seed's format: optional YAML front matter, then labelled sections."""
    rows = text.split("\n")
    data: dict[Any, Any] = {}
    lines: dict[str, int] = {}
    start = 0
    if rows[0].rstrip() == "---":
        end = next((i for i in range(1, len(rows)) if rows[i].rstrip() in ("---", "...")), None)
        if end is None:
            fail(path, "the front matter opened by --- on line 1 never ends; close it with a --- line", 1)
        front, lines = load_yaml("\n".join(rows[1:end]), path=path, offset=1, aliases=True)
        if front is not None and not isinstance(front, dict):
            fail(path, "the front matter must be `key: value` lines", 2)
        data.update(front or {})
        start = end + 1
    section: str | None = None  # "" while skipping a section already reported
    stray = False
    blank = False  # the row before was blank: a paragraph that is no item ends a list
    comment = False  # inside an HTML comment: read as nothing, as Markdown renders it
    for i in range(start, len(rows)):
        row, n = rows[i], i + 1
        stripped = row.strip()
        if comment or stripped.startswith("<!--"):
            comment = "-->" not in row[row.find("<!--") + 4 if not comment else 0:]
            continue
        if not stripped:
            blank = True
            continue
        after_blank, blank = blank, False
        label = _label(row)
        if label is not None:
            name, rest, level = label
            key = name.lower()
            if key in SECTIONS and key in data:
                problems.append(Problem(key, f"is given twice (lines {lines.get(key, '?')} and {n}); "
                                             "keep one", path, n))
                section = ""
            elif key in SECTIONS:
                section, lines[key] = key, n
                data[key] = _section_start(key, rest, n, path, problems)
            elif level == 1 and section is None:
                continue  # a title above the order
            else:
                problems.append(_unknown_section(name, path, n, suggest=len(problems) < MAX_PROBLEMS))
                section = ""
            stray = False
        elif section is None:
            if not stray:
                problems.append(Problem("", "text before the first section; start the order with "
                                            "**Objective:**", path, n))
            stray = True
        elif section == "objective":
            data[section] = f"{data[section]}\n{stripped}" if data[section] else stripped
        elif section and after_blank and data[section] and not _ITEM.fullmatch(row) and not row.startswith(
                ("  ", "\t")):
            # Markdown: a blank line, then a paragraph, ends the list. Glued to the last item it
            # made a one-line item look like two; dropped, the agent would never read it.
            problems.append(Problem(section, f"{_short(row.strip())!r} follows the list after a blank line, so it "
                                             "belongs to no item; make it an item (`- …`), move it into the "
                                             "objective, or make it a comment (<!-- … -->)", path, n))
            section = ""
        elif section:
            _list_row(section, row, n, data, lines, path, problems)
    # A section that is missing is said at the line where it goes (SPEC §2's file:line): the
    # objective where the order's body begins, the others after its last line. An order of
    # front matter alone was told "is missing" with no line to look at.
    missing = [key for key in SECTIONS if key not in data]
    if missing:
        last = max((i + 1 for i in range(start, len(rows)) if rows[i].strip()), default=start) + 1
        for key in missing:
            lines.setdefault(key, start + 1 if key == "objective" else last)
    return data, lines


def front_matter(text: str) -> bool:
    """Does `text` (an order no file name tells the format of: stdin) open with Markdown's
    front matter, a `---` line closed by another? One YAML document it never is: read as YAML,
    an order of front matter alone was told "found another document"."""
    rows = text.lstrip("\ufeff").split("\n")
    return rows[0].rstrip() == "---" and any(row.rstrip() == "---" for row in rows[1:])


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:39] + "…"


def _label(row: str) -> tuple[str, str, int] | None:
    """(name, text after it, heading level or 0) of a `**Name:**` or `## Name` line."""
    m = _HEADING.fullmatch(row)
    if m:
        raw = (m.group(2) or "").strip()
        head, _, rest = raw.partition(":")
        if head.strip(" \t*_#").lower() in SECTIONS:
            return head.strip(" \t*_#"), rest.strip(" \t*"), len(m.group(1))
        name = raw.strip(" \t*_#:")
        return (name, "", len(m.group(1))) if name else None
    m = _BOLD.fullmatch(row)
    return (m.group(1).strip(), m.group(2).strip(), 0) if m else None


def _unknown_section(name: str, path: str, line: int, *, suggest: bool) -> Problem:
    key = name.lower()
    if key in KEYS:
        return Problem(key, f"goes in the front matter: a `{key}: …` line between --- lines at the "
                            "top", path, line)
    close = difflib.get_close_matches(key, SECTIONS, n=1, cutoff=0.6) if suggest else []
    hint = f"did you mean {close[0].title()!r}? " if close else ""
    return Problem("", f"unknown section {name[:60]!r}; {hint}the sections are Objective, "
                       "Acceptance, Files, Branching", path, line)


def _section_start(key: str, rest: str, line: int, path: str, problems: list[Problem]) -> Any:
    if key == "objective":
        return rest
    if key == "files" and rest.strip("(). ").lower() == "none":
        return []  # `**Files:** none`: read-only work
    if rest:
        problems.append(Problem(key, "write the entries as a list under the label, one `- ` item "
                                     "per line", path, line))
    return []


def _list_row(section: str, row: str, n: int, data: dict[Any, Any], lines: dict[str, int],
              path: str, problems: list[Problem]) -> None:
    items: list[str] = data[section]
    m = _ITEM.fullmatch(row)
    if m:
        text = (m.group(1) or "").strip()
        text = md_acceptance_text(text) if section == "acceptance" else text
        text = md_file(text) if section == "files" else text
        lines[f"{section}.{len(items)}"] = n
        items.append(text)
    elif items:
        items[-1] += "\n" + row.strip()  # a wrapped item; reported as not one line
    else:
        problems.append(Problem(section, "write each entry as a list item starting with '- '", path, n))


def md_acceptance_text(text: str) -> str:
    box = _CHECKBOX.match(text)  # `- [ ] item` reads as `- item`
    return text[box.end():] if box else text


def md_file(text: str) -> str:
    return text[1:-1].strip() if len(text) >= 2 and text[0] == text[-1] == "`" else text
