"""The CPU the fork server's children start on.

The kernel places a new process on whichever CPU looks idlest at its fork. The fork server's
launcher thread forks each child (vfork, then exec) and waits: its own CPU looks busy, and the
child often went to the CPU the supervisor's loop was about to run on, while the server's went
idle. A quick specialist's start, run and exit then crossed CPUs and queued behind the loop:
one order at a time ran some 15% slower than with every child started on the server's CPU.

So the server keeps its threads to one CPU of those it may use (`Cpus.here`, before it makes
any other thread: they inherit it), each child starts there by inheriting that too, and is
freed right after its exec (`Cpus.free`): the child, and each thread and process it made
while it was held, may use every CPU the server may. One made in the moment between (a fork
under way while it was freed) is freed at the server's next look at the attempt's processes,
within a second: every process that is new then, held to exactly the server's CPU and started
within FREE_WINDOW of its attempt (it cannot be told from one that chose that CPU itself so
early); a process that chooses it later keeps its choice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

FREE_LIMIT = 1000  # threads `free` looks at for one start (a fork bomb: the rest are left to later looks)
FREE_WINDOW = 0.1  # seconds after its attempt's start: a process held to the server's CPU then inherited it
PASSES = 3  # looks at one process's threads: a thread still held may make another meanwhile


def home_of(allowed: frozenset[int]) -> int | None:
    """The CPU the server keeps to among `allowed`: the highest; none with fewer than two."""
    return max(allowed) if len(allowed) >= 2 else None


def described() -> str:
    """One line for `coordinator doctor`: the CPUs this process may use, and the server's."""
    try:
        allowed = frozenset(os.sched_getaffinity(0))
    except OSError as e:
        return f"cpus: cannot be read ({e.strerror}); the spawn server keeps to none"
    home = home_of(allowed)
    usable = f"cpus: {len(allowed)} usable ({_ranges(allowed)})"
    if home is None:
        return f"{usable}; the spawn server and every specialist share it"
    return (f"{usable}; the spawn server keeps to CPU {home} and starts each specialist there, which may "
            "use them all from its exec on")


def _ranges(cpus: frozenset[int]) -> str:
    out: list[tuple[int, int]] = []
    for cpu in sorted(cpus):
        if out and out[-1][1] == cpu - 1:
            out[-1] = (out[-1][0], cpu)
        else:
            out.append((cpu, cpu))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


@dataclass(frozen=True)
class Cpus:
    """The CPUs the server may use (`allowed`), and the one it keeps to (`home`: none with one
    CPU, or when the affinity cannot be read or set)."""

    allowed: frozenset[int]
    home: frozenset[int] | None

    @classmethod
    def here(cls) -> Cpus:
        """Keep the calling thread (and the threads and processes it makes from now on) to one
        of the CPUs it may use: the highest, away from CPU 0, where interrupts often land."""
        try:
            allowed = frozenset(os.sched_getaffinity(0))
        except OSError:
            return cls(frozenset(), None)
        chosen = home_of(allowed)
        if chosen is None:
            return cls(allowed, None)
        home = frozenset({chosen})
        try:
            os.sched_setaffinity(0, home)
        except OSError:
            return cls(allowed, None)
        return cls(allowed, home)

    @property
    def window(self) -> int:
        """FREE_WINDOW in clock ticks, the unit of a process's start time."""
        return round(FREE_WINDOW * os.sysconf("SC_CLK_TCK"))

    def held(self, pid: int) -> bool:
        """Whether `pid` (its main thread) is kept to the server's CPU."""
        try:
            return self.home is not None and os.sched_getaffinity(pid) == self.home
        except OSError:
            return False

    def free(self, pid: int) -> None:
        """Let `pid` use every CPU, with each thread and process it made while it was held to
        `home` (made after it was freed, they are free already). Each thread is freed before its
        children are listed, so none it forks meanwhile is missed, and the threads are looked at
        again until none is found held (one still held may have made another)."""
        if self.home is None:
            return
        stack, looked = [pid], 0
        while stack and looked < FREE_LIMIT:
            proc = stack.pop()
            for _ in range(PASSES):
                try:
                    tids = os.listdir(f"/proc/{proc}/task")
                except OSError:  # gone already
                    break
                freed = []
                for tid in tids:
                    looked += 1
                    with contextlib.suppress(OSError, ValueError):  # gone, or not ours to change
                        if os.sched_getaffinity(int(tid)) == self.home:
                            os.sched_setaffinity(int(tid), self.allowed)
                            freed.append(tid)
                if not freed:
                    break
                for tid in freed:
                    stack.extend(_children(proc, tid))


def _children(pid: int, tid: str) -> list[int]:
    """The processes thread `tid` of `pid` forked that still run (read whole: the file comes
    a page at a time, and a short read would cut a pid in two)."""
    try:
        fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return [int(p) for p in b"".join(chunks).split()]
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)
