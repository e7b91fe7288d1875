"""Soak: a live supervisor under steady drops for a long time; memory, descriptors and children stay flat.

`python -m bench.soak --minutes 60` (what `make soak` runs) drops orders at a steady rate
into a live `coordinator supervise` and samples the supervisor every `--sample` seconds:
resident memory, open file descriptors, threads, live descendant processes (zombies
counted apart) and the orders still in flight. The mix of orders walks every common path:

    most   done           (the specialist exits 0)
    1/20   route-to       (a follow-up order to rex, which ends done)
    1/20   outbox         (the specialist sends a new order to rex through $COORD_OUTBOX)
    1/20   failing        (exit 3 twice: blocked, and an investigation order to rex)
    1/20   invalid        (rejected at intake, original bytes kept)

At the end every dropped order and every follow-up must have ended, and the
trends must be flat: after a warm-up, the last quarter of the samples against the
first quarter. Prints one table and writes bench/results/soak.json; exits 1 when an
order was lost or a figure grew.

Example:
    python -m bench.soak --minutes 2 --rate 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.errors import CoordinatorError
from coordinator.spawner import _processes as processes
from coordinator.store import TERMINAL, Store

from .harness import BenchError, LiveSupervisor, drop, order_md, temp_workspace

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"

# The specialist: what it does is decided by the order id, so the mix is reproducible.
CHIP = r"""
case "$COORD_ORDER_ID" in
  *-fail) echo "failing on purpose" >&2; exit 3 ;;
  *-route) printf 'outcome: route-to\nagent: rex\nsummary: Over to rex for a look.\n' > "$COORD_RESULT" ;;
  *-out) printf -- '---\nid: %s-sent\nto: rex\n---\n**Objective:** Review what %s did\n\n**Acceptance:**\n- It is reviewed\n- Its tests pass\n- Its notes are filed\n\n**Files:**\n\n**Branching:**\n- halt-with-note if nothing to review\n' \
           "$COORD_ORDER_ID" "$COORD_ORDER_ID" > "$COORD_OUTBOX/.next.tmp" && mv "$COORD_OUTBOX/.next.tmp" "$COORD_OUTBOX/next.md"
         echo "sent one order to rex" ;;
  *) echo "did $COORD_ORDER_ID" ;;
esac
"""

TEAM: dict[str, Any] = {
    "chip": {"role": "specialist", "command": ["sh", "-c", CHIP], "sends_to": ["rex"], "max_parallel": 2,
             "max_failures": 2},
    "rex": {"role": "specialist", "command": ["sh", "-c", 'echo "reviewed $COORD_ORDER_ID"'], "max_parallel": 2},
}

# Allowed growth between the first and the last quarter of the samples (after warm-up).
FD_SLACK = 8
THREAD_SLACK = 2
RSS_SLACK_MB = 5.0  # MB of growth that is always fine (allocator noise, caches warming up)
RSS_SLACK_PER_1000 = 2.0  # MB per 1,000 ended orders: the index of every order seen, and no more
CHILD_SLACK = 6  # live descendants: the fork server and the attempts running at a sampling moment
ZOMBIE_SLACK = 1  # a child that exited between a sample and its reaping is a zombie for that moment
IN_FLIGHT_SLACK = 50
DRAIN_S = 120.0  # seconds the last orders may take after the drops stop


@dataclass
class Sample:
    t: float
    dropped: int
    ended: int
    rss_mb: float
    fds: int
    threads: int
    children: int
    zombies: int

    def row(self) -> str:
        return (f"{self.t / 60:7.1f} {self.dropped:8d} {self.ended:7d} {self.dropped - self.ended:9d} "
                f"{self.rss_mb:7.1f} {self.fds:5d} {self.threads:7d} {self.children:8d} {self.zombies:7d}")


HEADER = "minute  dropped   ended  in-flight  rss-MB   fds threads children zombies"


def kind_of(n: int) -> str:
    return {3: "route", 8: "out", 13: "fail", 18: "bad"}.get(n % 20, "ok")


def order_text(n: int, oid: str) -> str:
    if kind_of(n) == "bad":
        return f"---\nid: {oid}\n---\n**Objective:** \n\nno acceptance, no files, no branching\n"
    text = order_md(f"Soak order {n} is {kind_of(n)}", id=oid)
    return text + "- route-to-rex if it is a review\n" if kind_of(n) == "route" else text


def follow_ups(kind: str) -> int:
    """Orders the supervisor files because of one order of this kind (a route, a sent order,
    an investigation of a blocked one); they get ids of their own and must end too."""
    return 1 if kind in ("route", "out", "fail") else 0


def proc_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def descendants(root: int) -> tuple[int, int]:
    """(live descendants, zombies among them) of process `root`."""
    table = processes()
    live = zombies = 0
    for proc in table.values():
        p = proc.ppid
        while p and p != root:
            p = table[p].ppid if p in table else 0
        if p == root:
            zombies += proc.zombie
            live += not proc.zombie
    return live, zombies


def sample(pid: int, t: float, dropped: int, ended: int) -> Sample:
    status = proc_status(pid)
    children, zombies = descendants(pid)
    return Sample(t, dropped, ended, int(status["VmRSS"].split()[0]) / 1024, len(os.listdir(f"/proc/{pid}/fd")),
                  int(status["Threads"]), children, zombies)


class Ended:
    """Counts ended orders by reading records in drop order (cheap: stops at the first unfinished)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: list[str] = []
        self.count = 0

    def add(self, ids: list[str]) -> None:
        self.pending += ids

    def poll(self) -> int:
        still: list[str] = []
        for i, oid in enumerate(self.pending):
            try:
                status = self.store.load(oid).status
            except (CoordinatorError, OSError, ValueError):  # not filed yet: look again next time
                status = ""
            if status in TERMINAL:
                self.count += 1
            else:
                still.append(oid)
            if len(still) > 200:  # far behind: the rest are surely not done yet either
                still += self.pending[i + 1:]
                break
        self.pending = still
        return self.count


def trend(samples: list[Sample]) -> dict[str, Any]:
    """First quarter against last quarter of the samples after the first fifth (warm-up).

    Memory is judged per order: the supervisor keeps a small index entry for every order it
    has seen (about 1.3 KB once the order has ended), so its memory may grow by that much and
    no more; everything else must not grow at all."""
    body = samples[len(samples) // 5:]
    q = max(1, len(body) // 4)
    first, last = body[:q], body[-q:]

    def avg(part: list[Sample], key: str) -> float:
        return sum(getattr(s, key) for s in part) / len(part)

    out: dict[str, Any] = {}
    orders = avg(last, "ended") - avg(first, "ended")
    grew = avg(last, "rss_mb") - avg(first, "rss_mb")
    per_1000 = grew / orders * 1000 if orders > 0 else 0.0
    out["rss_mb"] = {"first": round(avg(first, "rss_mb"), 1), "last": round(avg(last, "rss_mb"), 1),
                     "growth": round(grew, 1), "orders_between": round(orders),
                     "mb_per_1000_orders": round(per_1000, 2), "slack_mb_per_1000": RSS_SLACK_PER_1000,
                     "flat": grew <= RSS_SLACK_MB or per_1000 <= RSS_SLACK_PER_1000}
    for key, slack in (("fds", FD_SLACK), ("threads", THREAD_SLACK), ("children", CHILD_SLACK), ("zombies", ZOMBIE_SLACK)):
        a, b = avg(first, key), avg(last, key)
        out[key] = {"first": round(a, 1), "last": round(b, 1), "growth": round(b - a, 1), "slack": slack,
                    "flat": b - a <= slack}
    in_flight = [s.dropped - s.ended for s in body]
    out["in_flight"] = {"max": max(in_flight), "last": in_flight[-1], "slack": IN_FLIGHT_SLACK,
                        "flat": in_flight[-1] <= IN_FLIGHT_SLACK}
    return out


def soak(minutes: float, rate: float, every: float, out: Path) -> int:
    started = time.monotonic()
    samples: list[Sample] = []
    with temp_workspace(TEAM, max_parallel=4, escalate_to="rex") as ws, LiveSupervisor(ws) as sup:
        assert sup.proc is not None
        ended = Ended(Store(ws.state))
        print(HEADER, flush=True)
        n = dropped = extra = 0
        next_drop = next_sample = time.monotonic()
        end_at = started + minutes * 60
        while time.monotonic() < end_at:
            now = time.monotonic()
            if now >= next_drop:
                oid = f"soak-{n:06d}-{kind_of(n)}"
                drop(ws, "chip", f"{oid}.md", order_text(n, oid))
                ended.add([oid])
                dropped += 1
                extra += follow_ups(kind_of(n))
                n += 1
                next_drop += 1.0 / rate
            if now >= next_sample:
                if not sup.alive():
                    raise BenchError("the supervisor died:\n" + "\n".join(list(sup.lines)[-20:]))
                samples.append(sample(sup.proc.pid, now - started, dropped, ended.poll()))
                print(samples[-1].row(), flush=True)
                next_sample += every
            time.sleep(max(0.0, min(next_drop, next_sample) - time.monotonic()))
        drain_until = time.monotonic() + DRAIN_S
        while ended.poll() < dropped and time.monotonic() < drain_until:
            time.sleep(0.5)
        samples.append(sample(sup.proc.pid, time.monotonic() - started, dropped, ended.count))
        print(samples[-1].row(), flush=True)
        if ended.pending:
            print(f"not ended after 120 s of drain: {', '.join(ended.pending[:5])}", flush=True)
        recs = Store(ws.state).load_all()
        stuck = sorted(r.id for r in recs.values() if r.status not in TERMINAL)
        wrong = sorted(r.id for r in recs.values() if r.id.startswith("soak-") and r.status != _expected(r.id))
    figures = trend(samples)
    lost = dropped - ended.count
    missing = n + extra - len(recs)  # follow-ups never filed
    verdict = all(v["flat"] for v in figures.values()) and not lost and not stuck and not wrong and not missing
    doc = {"minutes": minutes, "rate_per_s": rate, "orders_dropped": n, "orders_ended": ended.count,
           "records": len(recs), "records_expected": n + extra, "not_ended": stuck[:20], "wrong_status": wrong[:20],
           "trend": figures, "flat": verdict,
           "samples": [s.__dict__ for s in samples]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"\n{n} orders dropped over {minutes:g} min, {ended.count} ended as expected ({len(wrong)} otherwise); "
          f"{len(recs)} records with follow-ups ({n + extra} expected), {len(stuck)} not ended")
    for key, v in figures.items():
        shown = {k: v[k] for k in v if k != "flat"}
        print(f"  {key:10s} {'flat' if v['flat'] else 'GREW'}  {shown}")
    print(f"results: {os.path.relpath(out)}")
    return 0 if verdict else 1


def _expected(oid: str) -> str:
    if oid.endswith("-sent"):  # what an -out order sent to rex through its outbox
        return "done"
    return {"ok": "done", "route": "routed", "out": "done", "fail": "blocked", "bad": "rejected"}[oid.rsplit("-", 1)[1]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to drop orders (default 60)")
    parser.add_argument("--rate", type=float, default=4.0, help="orders dropped per second (default 4)")
    parser.add_argument("--sample", type=float, default=30.0, metavar="SECONDS",
                        help="seconds between samples (default 30)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.sample <= 0:
        parser.error("--minutes, --rate and --sample must be positive")
    try:
        return soak(args.minutes, args.rate, args.sample, args.out)
    except (BenchError, OSError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
