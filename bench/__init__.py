"""The benchmarks behind `make bench`: speed figures measured on this machine, one table.

    python -m bench            every figure (under 10 minutes on 2 cores)
    python -m bench --quick    small sizes, to check the benchmarks themselves run
    python -m bench --only latency throughput

Modules: `harness` (temp workspaces, a live supervisor, statistics, the table), `live`
(drop-to-spawn latency, end-to-end and intake throughput), `backlog` (a 10,000-order
backlog: recovery, board, memory), `parts` (sandbox per spawn, gate per attempt, state
commits) and `budgetsim` (the orchestrator budget simulation). Results are also written
as JSON to bench/results/latest.json (git-ignored).
"""
