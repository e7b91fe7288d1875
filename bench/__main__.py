"""`python -m bench`: run the benchmarks, print one table, write bench/results/latest.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coordinator.durable import holds_freed_inodes
from coordinator.errors import CoordinatorError

from . import backlog, budgetsim, harness, live, parts
from .harness import BenchError, Figure, table

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
BUDGET_S = 600.0  # `make bench` must finish within 10 minutes on 2 cores

# name -> (what it measures, how to run it at full or quick size)
SUITES: dict[str, tuple[str, Callable[[bool], list[Figure]]]] = {
    "latency": ("drop-to-spawn latency on a live supervisor",
                lambda q: live.latency(live.QUICK if q else live.Sizes())),
    "throughput": ("end-to-end throughput with /bin/true",
                   lambda q: live.throughput(live.QUICK if q else live.Sizes())),
    "intake": ("intake-only throughput", lambda q: live.intake(live.QUICK if q else live.Sizes())),
    "backlog": ("10,000-order backlog", lambda q: backlog.backlog(backlog.QUICK if q else backlog.Sizes())),
    "parts": ("sandbox, gate and state-commit costs",
              lambda q: parts.all_parts(parts.QUICK if q else parts.Sizes())),
    "budget": ("orchestrator budget simulation",
               lambda q: budgetsim.budget_sim(budgetsim.QUICK if q else budgetsim.Sizes())),
}


def machine() -> dict[str, Any]:
    from coordinator.landlock import abi_version

    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    fs = subprocess.run(["df", "--output=fstype", str(harness.WORK_DIR)], capture_output=True,
                        text=True).stdout.split()[1:]
    work_fs = fs[0] if fs else "?"
    if work_fs == "ext4" and holds_freed_inodes(harness.WORK_DIR):
        work_fs = "ext4 without a journal"  # new inodes slow after removals: see harness.run_dir
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "git": git, "landlock_abi": abi_version(), "work_fs": work_fs,
            "work_dir": os.path.relpath(harness.WORK_DIR), "loadavg_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the benchmarks run")
    parser.add_argument("--only", nargs="+", choices=sorted(SUITES), metavar="SUITE",
                        help=f"run only these suites: {', '.join(SUITES)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    parser.add_argument("--dir", type=Path, default=None, metavar="DIR",
                        help="make the workspaces in a new folder inside DIR (default: bench/.work-PID, "
                             "the project's file system; made afresh for each run)")
    args = parser.parse_args(argv)
    with harness.run_dir(args.dir):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    info = machine()
    info["started"] = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"coordinator benchmarks: {info['cpus']} CPUs, Linux {info['kernel']}, Python {info['python']}, "
          f"{info['git']}, Landlock ABI {info['landlock_abi']}, workspaces on {info['work_fs']} "
          f"({info['work_dir']}), "
          f"load {info['loadavg_start'][0]:.2f}{' (quick sizes)' if args.quick else ''}", flush=True)
    figures: list[Figure] = []
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    for name in args.only or list(SUITES):
        what, run = SUITES[name]
        print(f"  {name}: {what} ...", end="", flush=True)
        t0 = time.monotonic()
        try:
            figures += run(args.quick)
        except (BenchError, CoordinatorError, OSError, subprocess.SubprocessError) as e:
            failures[name] = str(e)
            print(f" FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)
            continue
        timings[name] = round(time.monotonic() - t0, 1)
        print(f" {timings[name]:.0f} s", flush=True)
    total = time.monotonic() - started
    info |= {"loadavg_end": list(os.getloadavg()), "seconds": round(total, 1), "suite_seconds": timings,
             "quick": args.quick}
    print()
    print(table(figures))
    print(f"\neach figure is the median over what the measured column says; {total:.0f} s in all"
          f"{'' if total < BUDGET_S else f' (over the {BUDGET_S:.0f} s budget)'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "figures": [f.as_json() for f in figures], "failures": failures}
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"results: {os.path.relpath(args.out)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
