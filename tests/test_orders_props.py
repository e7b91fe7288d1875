"""Properties of the order parser: what render writes, parse reads back; no input breaks it."""

from __future__ import annotations

import json
import unicodedata

import yaml
from conftest import BIDI_CONTROLS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator import orders
from coordinator.errors import OrderError
from coordinator.orders import Acceptance, Branch, WorkOrder

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text a user may write on one line: no control characters (bidi overrides included), no line
# or paragraph separators, and something that shows (a line of only invisible characters, a
# soft hyphen or a zero-width space, is empty).
CHARACTER = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters=BIDI_CONTROLS)
LINE = (st.text(CHARACTER, min_size=1, max_size=40)
        .map(str.strip)
        .filter(lambda s: any(not c.isspace() and unicodedata.category(c) != "Cf" for c in s)
                and len(s.splitlines()) == 1 and "<describe" not in s and "<replace" not in s))
PLAIN = LINE.filter(lambda s: "`" not in s)  # cannot read as `cmd` passes
AGENT = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
ORDER_ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True)
PART = st.one_of(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_. -]{0,8}[A-Za-z0-9_]", fullmatch=True),
    st.sampled_from(["*", "**", "*.py", "?x", "[ab].ts", "src"]),
).filter(lambda p: p.lower() != ".git")
REPO = st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True)


@st.composite
def acceptance(draw: st.DrawFn) -> Acceptance:
    kind = draw(st.sampled_from(["plain", "check", "explicit"]))
    if kind == "plain":
        return Acceptance(draw(PLAIN))
    command = draw(PLAIN)
    if kind == "check":
        return Acceptance(f"`{command}` passes", command)
    return Acceptance(draw(PLAIN), command)  # a check markdown cannot carry: front matter


@st.composite
def branch(draw: st.DrawFn) -> Branch:
    action = draw(st.sampled_from(orders.ACTIONS))
    return Branch(action, draw(LINE), draw(AGENT) if action == "route-to" else None)


@st.composite
def work_order(draw: st.DrawFn) -> WorkOrder:
    repo = draw(REPO)
    files = draw(st.lists(st.lists(PART, min_size=1, max_size=3).map(lambda ps: "/".join([repo, *ps])),
                          max_size=4))
    return WorkOrder(
        id=draw(st.none() | ORDER_ID),
        sender=draw(st.just("user") | AGENT),
        to=draw(AGENT),
        objective=draw(LINE),
        # Distinct, as intake wants them (the same criterion twice is refused).
        acceptance=tuple(draw(st.lists(acceptance(), min_size=3, max_size=5,
                                       unique_by=lambda a: (" ".join(a.text.split()).casefold(),
                                                            (a.check or "").strip())))),
        files=tuple(files),
        branching=tuple(draw(st.lists(branch(), min_size=1, max_size=10))),
        priority=draw(st.sampled_from(orders.PRIORITIES)),
        blocked_by=tuple(draw(st.lists(ORDER_ID, max_size=3))),
        references=tuple(draw(st.lists(ORDER_ID, max_size=3))),
        timeout=draw(st.none() | st.sampled_from(["20m", "90s", "1.5h", "250ms", "3600"])),
        parent=draw(st.none() | ORDER_ID),
    )


@SETTINGS
@given(work_order())
def test_render_then_parse_gives_the_order_back(order: WorkOrder) -> None:
    assert orders.parse(orders.render(order).encode(), path="inbox/x/o.md") == order


@SETTINGS
@given(work_order())
def test_normalized_json_and_yaml_parse_to_the_same_order(order: WorkOrder) -> None:
    as_dict = order.to_dict()
    assert orders.parse(json.dumps(as_dict).encode(), path="o.json") == order
    as_yaml = yaml.safe_dump(as_dict, allow_unicode=True, sort_keys=False)
    assert orders.parse(as_yaml.encode(), path="o.yml") == order
    assert WorkOrder.from_dict(json.loads(json.dumps(as_dict))) == order


@SETTINGS
@given(st.binary(max_size=2048), st.sampled_from(["o.md", "o.yaml", "o.json", "o.txt", "o"]))
def test_random_bytes_give_an_order_error_or_an_order(data: bytes, path: str) -> None:
    try:
        orders.parse(data, path=path, to="chip")
    except OrderError as e:
        assert e.problems


FRAGMENTS = st.sampled_from([
    "---", "id: x", "from: walt", "priority: high", "blocked_by: [a, b]", "**Objective:** Fix it.",
    "**Objective:**", "## Objective", "# Title", "**Acceptance:**", "## acceptance", "**Files:**",
    "**Files:** none", "**Branching:**", "- `make test` passes", "- an item", "* [ ] box", "1. first",
    "- webapp/src/**", "- /etc/passwd", "- route-to-rex if it is hard", "- halt-with-note: stop",
    "- requeue-with-blocker when blocked", "", "   continued", "**Notes:** x", "&a [1]", "*a",
    "- [", "{", "\t- tab", "**Objective** : odd", "- ../x", "- `webapp/x`", "- <describe it>",
])


@SETTINGS
@given(st.lists(FRAGMENTS | st.text(max_size=20), max_size=40))
def test_random_markdown_gives_an_order_error_or_an_order(lines: list[str]) -> None:
    try:
        orders.parse("\n".join(lines).encode(), path="o.md", to="chip")
    except OrderError as e:
        assert e.problems


@SETTINGS
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from([*orders.KEYS, "text", "check", "action",
                                                       "agent", "when", "x"]), inner, max_size=6),
                    max_leaves=30))
def test_any_json_shape_gives_an_order_error_or_an_order(value: object) -> None:
    try:
        orders.parse(json.dumps(value).encode(), path="o.json", to="chip")
    except OrderError as e:
        assert e.problems
