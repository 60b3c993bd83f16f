"""Did other work take this process's CPUs while it timed?

On a shared 2-core host one busy neighbour (a test run, another sweep, a compiler) makes a
2-thread kernel wait for its descheduled thread: a fidelity run on an AVX512 EPYC had ATen's
decode median at 6.6 ms in one process and 0.35-0.48 ms in the three others, and the paired
ratios of that process decided nothing (DESIGN, fidelity). The A/A control does not see it when
the whole process is slowed alike. Two counters do, for the timed window only:

- run-queue wait: the nanoseconds this process's threads were runnable but not running
  (`/proc/self/task/*/schedstat`, second field; the scheduler's own accounting), as a share
  of the window times the problem's thread count;
- steal: the ticks the hypervisor ran something else on the CPUs this process may run on
  (`/proc/stat`, eighth field), as a share of the window times those CPUs.

Both are about this process, not the host: a 1-thread neighbour pinned elsewhere, or a
parallel worker on its own core, costs nothing and counts nothing. Where the counters are not
readable (not Linux, schedstat compiled out) the figures are None and nothing is decided on them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

HOW = ("run-queue wait of this process's threads (/proc/self/task/*/schedstat) over the timed window "
       "times its thread count, and hypervisor steal on its CPUs (/proc/stat) over the window times those CPUs")


@dataclass(frozen=True)
class Snapshot:
    wall_ns: int
    wait_ns: int | None  # summed over the process's threads
    steal_ticks: int | None  # summed over the CPUs this process may run on
    cpus: int


def _wait_ns() -> int | None:
    total, read = 0, 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
            read += 1
        except (OSError, IndexError, ValueError):
            continue  # a thread that exited meanwhile
    return total if read else None  # none readable: schedstat compiled out


def _steal_ticks(cpus: set[int]) -> int | None:
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus and len(fields) >= 8:
            total += int(fields[7])
    return total


def snapshot() -> Snapshot:
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    return Snapshot(time.perf_counter_ns(), _wait_ns(), _steal_ticks(cpus), len(cpus))


def shares(before: Snapshot, after: Snapshot, threads: int) -> dict:
    """The window's run-queue wait and steal, each as a share of the CPU time the timing was owed."""
    wall = max(after.wall_ns - before.wall_ns, 1)
    wait = steal = None
    if before.wait_ns is not None and after.wait_ns is not None:
        wait = max(after.wait_ns - before.wait_ns, 0) / (wall * max(threads, 1))
    if before.steal_ticks is not None and after.steal_ticks is not None:
        tick_ns = 1e9 / os.sysconf("SC_CLK_TCK")
        steal = max(after.steal_ticks - before.steal_ticks, 0) * tick_ns / (wall * after.cpus)
    return {"runqueue_wait": wait, "steal": steal, "window_s": wall / 1e9}


def lost_share(figures: dict | None) -> float | None:
    """The share of the owed CPU time other work took (wait plus steal), None when unknown."""
    if not figures or figures.get("runqueue_wait") is None:
        return None
    return figures["runqueue_wait"] + (figures.get("steal") or 0.0)
