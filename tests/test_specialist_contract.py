"""The specialist contract (SPEC §6) as a buggy or hostile specialist plays it: real processes,
real workspaces, the real supervisor."""

from __future__ import annotations

from conftest import drop, order_md, sh

from coordinator.store import Store
from coordinator.supervisor import Supervisor


def run(ws, **kw):
    with Supervisor(ws, **kw) as sup:
        sup.run_once(limit=60)
        return sup


def test_output_that_becomes_the_summary_holds_no_c1_control_or_bidi_override(make_ws):
    """With no result file the tail of the output is the summary `show` prints: a C1 CSI
    (U+009B, what a terminal reads as ESC [) or a right-to-left override must not reach it."""
    ws = make_ws({"chip": {"role": "specialist", "command": sh(
        r"printf 'plain \302\23331mRED\302\233m \342\200\256desrever\342\200\254 end\n'")}})
    drop(ws, "chip", "o.md", order_md("It is done", id="o"))
    run(ws)
    rec = Store(ws.state).load("o")
    assert rec.status == "done"
    assert rec.report["summary"] == "plain 31mREDm desrever end"
