"""How big a YAML text is once its aliases are expanded, told before anything is built.

An alias bomb (billion laughs) builds a tiny text into billions of values, an alias used
inside the value it names loops, and deep nesting ends in a RecursionError: a work order
and the team's config are both refused before PyYAML builds them. Each `*name` counts
all it names.

Example:
    >>> excess("a: &x [1, 2]\\nb: *x\\n", values=8, chars=100, depth=8).kind
    'expands'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Excess:
    """The first thing in the text past a bound.

    kind: "alias" (any alias, when none is allowed), "loop" (an alias inside the value it
    names), "expands" (an alias takes it past the values or characters), "values" or "chars"
    (past them with no alias), "depth" (nested deeper)."""

    kind: str
    anchor: str | None
    mark: Any  # yaml.Mark of the event, or None


def excess(text: str, *, values: int, chars: int, depth: int, aliases: bool = True) -> Excess | None:
    """The first bound `text` passes, or None when it stays within all of them."""
    n_values = n_chars = 0
    open_: list[list[Any]] = []  # collections being read: [anchor, values, chars]
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> what its value expands to
    for event in yaml.parse(text, Loader=LOADER):
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, n, c = open_.pop()
            if anchor is not None:
                sizes[anchor] = (n, c)
            continue
        if isinstance(event, yaml.AliasEvent):
            if not aliases:
                return Excess("alias", event.anchor, event.start_mark)
            if any(frame[0] == event.anchor for frame in open_):
                return Excess("loop", event.anchor, event.start_mark)
            n, c = sizes.get(event.anchor or "", (1, 0))
        elif isinstance(event, yaml.ScalarEvent):
            n, c = 1, len(event.value)
        elif isinstance(event, yaml.CollectionStartEvent):
            n, c = 1, 0
        else:
            continue
        n_values, n_chars = n_values + n, n_chars + c
        for frame in open_:
            frame[1] += n
            frame[2] += c
        if n_values > values or n_chars > chars:
            if isinstance(event, yaml.AliasEvent):
                return Excess("expands", event.anchor, event.start_mark)
            return Excess("values" if n_values > values else "chars", None, event.start_mark)
        if isinstance(event, yaml.ScalarEvent) and event.anchor is not None:
            sizes[event.anchor] = (n, c)
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(open_) >= depth:
                return Excess("depth", None, event.start_mark)
            open_.append([event.anchor, 1, 0])
    return None
