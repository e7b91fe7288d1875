"""Fuzzing intake: hostile file names and contents never crash the supervisor, lose a file or
leave it undecided.

Hypothesis drops generated files into an orchestrator's inbox (it has no command, so nothing
runs) and drives the real supervisor with `Supervisor.step()`. After each example: every
candidate file ended `queued`, `waiting` or `rejected` (a rejection with its reasons), its bytes
kept once as the order's original; nothing is left in the inbox or in `state/intake`; and names
the inbox ignores by design (dot-files, editor temp files) were left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import BIDI_CONTROLS, order_md
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.audit import StateRepo
from coordinator.inboxfiles import is_candidate
from coordinator.orders import MAX_ORDER_BYTES
from coordinator.store import Store
from coordinator.supervisor import Supervisor
from coordinator.verify import verify
from coordinator.workspace import Workspace

EXAMPLES = 40
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
NAME_MAX = 255
STEP_LIMIT = 30.0  # seconds one example may take to settle

# -- file names -------------------------------------------------------------------------------
SUFFIX = st.sampled_from([b".md", b".yaml", b".yml", b".json", b".txt", b"", b".MD"])
RAW = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
UNICODE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
                  min_size=1, max_size=30).map(os.fsencode)
SPECIAL = st.sampled_from([b"-rf", b"--help", b"-", b"a\nb", b"\n", b"line\r\nbreak", b" leading space",
                           b"trailing space ", b"\xff\xfe", b"caf\xe9", b"\xed\xa0\x80", b"*", b"?",
                           b"$(touch pwned)", b"`id`", b"..md", b"~x", b"#x#", b"4913", b"CON"])


@st.composite
def file_name(draw: st.DrawFn) -> bytes:
    stem = draw(st.one_of(RAW, UNICODE, SPECIAL, st.integers(1, NAME_MAX).map(lambda n: b"n" * n)))
    name = (stem + draw(SUFFIX))[-NAME_MAX:]
    if draw(st.booleans()):  # a name as long as the file system allows
        name = (b"L" * NAME_MAX + name)[-NAME_MAX:]
    return name if name not in (b".", b"..") else b"dots"


# -- contents ---------------------------------------------------------------------------------
LINE = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters=BIDI_CONTROLS),
               min_size=1, max_size=60)


@st.composite
def valid_order(draw: st.DrawFn) -> bytes:
    objective = draw(LINE.map(str.strip).filter(bool).filter(lambda s: "`" not in s))
    acceptance = tuple(f"Item {i} holds: {draw(LINE)}".replace("`", "'").strip() for i in range(draw(st.integers(3, 5))))
    front = draw(st.fixed_dictionaries({}, optional={
        "priority": st.sampled_from(["low", "normal", "high", "urgent"]),
        "id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True),
    }))
    text = order_md(objective, acceptance=acceptance, **front)
    if draw(st.booleans()):
        return text.encode()
    data = {"objective": objective, "acceptance": list(acceptance), "files": [],
            "branching": [{"action": "halt-with-note", "when": "nothing to do"}], **front}
    return (json.dumps(data) if draw(st.booleans()) else yaml.safe_dump(data)).encode()


BOMB = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n".encode()
    for p, c in zip("abcdefgh", "bcdefghi", strict=True))

BROKEN = st.one_of(
    st.binary(max_size=300),
    st.just(b""),
    st.just(b"\xef\xbb\xbf" + order_md("A BOM in front is tolerated").encode()),
    st.just(order_md("Too few items", acceptance=("only one",)).encode()),
    st.just(b"---\nid: [unclosed\n---\n**Objective:** x\n"),
    st.just(BOMB),
    st.just(b"x" * (MAX_ORDER_BYTES + 1)),
    st.just("**Objective:** caf\xe9\n".encode("latin-1")),
    st.just(b'{"objective": "json", "acceptance": 3}'),
    st.just(b"objective: !!python/object/apply:os.system ['touch pwned']\n"),
    st.just(order_md("Unknown key", typo_key="x").encode()),
    st.just(order_md("Depends on nothing known", blocked_by=["no-such-order"]).encode()),
    valid_order().map(lambda b: b[: len(b) // 2]),
)
CONTENT = st.one_of(valid_order(), BROKEN)


# -- the supervisor under test ----------------------------------------------------------------
@pytest.fixture
def ws(make_ws) -> Workspace:
    return make_ws({"walt": {"role": "orchestrator", "sends_to": ["chip"]},
                    "chip": {"role": "specialist", "command": ["true"], "writes": ["webapp/src/**"]}},
                   orchestrator="walt", budget={"ceiling": 10**9, "bands": [10**9, 10**9 + 1, 10**9 + 2]})


class Rescanning:
    """A watcher that asks for a full rescan at every step: the examples test intake, not the
    watcher (whose inotify hints arrive in batches half a second apart)."""

    kind = "rescan"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def drain(self) -> tuple[set[Path], bool]:
        return set(), True

    def wait(self, timeout: float) -> bool:
        return True

    def add_folder(self, folder: Path) -> None:
        pass


class Driven:
    """One supervisor for many examples; reopened (which runs crash recovery) after a crash."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.sup: Supervisor | None = None

    def get(self) -> Supervisor:
        if self.sup is None:
            sup = Supervisor(self.ws, watcher=Rescanning())
            sup.open()
            self.sup = sup
        return self.sup

    def crashed(self) -> None:
        """After a crash: close what is left, take away the files that may have caused it (so
        the next example starts clean), and let a new supervisor recover the rest."""
        if self.sup is not None:
            with contextlib.suppress(Exception):
                self.sup.close()
            self.sup = None
        inbox = inbox_b(self.ws)
        for name in os.listdir(inbox):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(inbox, name))
        with contextlib.suppress(Exception):
            self.get()

    def close(self) -> None:
        if self.sup is not None:
            self.sup.close()
            self.sup = None


@pytest.fixture
def driven(ws: Workspace) -> Iterator[Driven]:
    d = Driven(ws)
    yield d
    if d.sup is not None:
        with contextlib.suppress(Exception):
            d.sup.close()


def inbox_b(ws: Workspace) -> bytes:
    return os.fsencode(ws.inbox("walt"))


def settle(d: Driven) -> None:
    """Step until no candidate file is left in the inbox and a step does nothing."""
    sup = d.get()
    end = time.monotonic() + STEP_LIMIT
    while True:
        progress = sup.step()
        left = [n for n in os.listdir(inbox_b(d.ws)) if is_candidate(os.fsdecode(n))]
        if not left and not progress:
            return
        if time.monotonic() > end:
            pytest.fail(f"files never taken from the inbox: {left[:5]}")
        if not progress:
            time.sleep(0.01)  # a file still open for writing: give the writer a moment


def check_example(d: Driven, files: dict[bytes, bytes]) -> None:
    ws = d.ws
    before = set(Store(ws.state).load_all())
    inbox = inbox_b(ws)
    for name, data in files.items():
        with open(os.path.join(inbox, name), "wb") as f:
            f.write(data)
    try:
        settle(d)
    except BaseException:
        d.crashed()
        raise
    ignored = {n for n in files if not is_candidate(os.fsdecode(n))}
    taken = {n: data for n, data in files.items() if n not in ignored}
    assert set(os.listdir(inbox)) == ignored  # the ignored ones are left alone, the rest taken
    for n in ignored:
        os.unlink(os.path.join(inbox, n))
    assert not [p for p in (ws.state / "intake").rglob("*") if p.is_file()]
    recs = Store(ws.state).load_all()
    new = [recs[i] for i in set(recs) - before]
    assert len(new) == len(taken), [(r.id, r.source, r.status) for r in new]
    originals: Counter[bytes] = Counter()
    for rec in new:
        assert rec.status in ("queued", "waiting", "rejected"), (rec.id, rec.status)
        if rec.status == "rejected":
            assert rec.errors and all(e.strip() for e in rec.errors), rec.id
        else:
            assert rec.errors == []
        (original,) = Store(ws.state).folder(rec.id).glob("original.*")
        originals[original.read_bytes()] += 1
    assert originals == Counter(taken.values())
    assert StateRepo(ws.state).dirty() == []


@pytest.mark.parametrize("kind", ["names", "contents"])
def test_hostile_inputs_end_queued_waiting_or_rejected(ws, driven, kind):
    order = order_md("A plain valid order").encode()
    if kind == "names":
        files = st.dictionaries(file_name(), st.just(order), min_size=1, max_size=4)
    else:
        files = st.dictionaries(st.integers(0, 10**6).map(lambda i: f"f{i}.md".encode()),
                                CONTENT, min_size=1, max_size=4)

    @SETTINGS
    @given(files)
    def example(dropped: dict[bytes, bytes]) -> None:
        check_example(driven, dropped)

    example()
    driven.close()
    findings = verify(ws)
    assert findings == [], findings[:5]


def test_the_known_hostile_names_one_by_one(ws, driven):
    """The names the issue lists, each on its own: non-UTF-8 bytes, a newline, leading dashes,
    a 255-byte name, unicode."""
    order = order_md("A plain valid order").encode()
    for name in (b"\xff\xfe-not-utf8.md", b"new\nline.md", b"--leading-dashes.md", b"-.md",
                 b"x" * (NAME_MAX - 3) + b".md", "ünïcødé ☃ 名前.md".encode(), b"a" * NAME_MAX):
        check_example(driven, {name: order})
    driven.close()
    assert verify(ws) == []
