"""The CPU the fork server's children start on.

The kernel places a new process on whichever CPU looks idlest at its fork. The fork server's
launcher thread forks each child (vfork, then exec) and waits: its own CPU looks busy, and the
child often went to the CPU the supervisor's loop was about to run on, while the server's went
idle. A quick specialist's start, run and exit then crossed CPUs and queued behind the loop:
one order at a time ran some 15% slower than with every child started on the server's CPU.

So the server keeps its threads to one CPU of those it may use (`Cpus.here`, before it makes
any other thread: they inherit it), each child starts there by inheriting that too, and is
freed at once (`Cpus.free`): the child, each thread and process it made before it was freed,
may use every CPU the server may. A process that gives itself exactly the server's CPU in its
first moments is freed as well (it cannot be told from one that inherited it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

FREE_LIMIT = 1000  # processes and threads `free` looks at for one start (a fork bomb: the rest keeps the CPU)


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
        if len(allowed) < 2:
            return cls(allowed, None)
        home = frozenset({max(allowed)})
        try:
            os.sched_setaffinity(0, home)
        except OSError:
            return cls(allowed, None)
        return cls(allowed, home)

    def free(self, pid: int) -> None:
        """Let the child `pid` use every CPU, with each thread and process it made while it was
        held to `home` (made after it was freed, they are free already): each is freed before
        its children are listed, so none made meanwhile is missed."""
        if self.home is None:
            return
        stack, looked = [pid], 0
        while stack and looked < FREE_LIMIT:
            proc = stack.pop()
            try:
                tids = os.listdir(f"/proc/{proc}/task")
            except OSError:  # gone already
                continue
            for tid in tids:
                looked += 1
                with contextlib.suppress(OSError, ValueError):  # gone, or not ours to change
                    if os.sched_getaffinity(int(tid)) != self.home:
                        continue  # made after it was freed (or it chose for itself)
                    os.sched_setaffinity(int(tid), self.allowed)
                    stack.extend(_children(proc, tid))


def _children(pid: int, tid: str) -> list[int]:
    """The processes thread `tid` of `pid` forked that still run."""
    try:
        fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return [int(p) for p in os.read(fd, 65536).split()]
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)
