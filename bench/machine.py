"""How fast this (shared, noisy) machine is at the moment of a run: the same single-core Python
work timed before and after it, and the share of the run's CPU time the hypervisor gave to other
machines (steal), so that runs of different days can be compared. Between 1 and 2 Dec nearly the
same code's p99 at 200 cases/s went from 224 ms to 2.5 s, and the raw broker from 1,754 to 449
confirmed messages/s, as the machine changed: a run's figures mean little without these."""

import os
import time
from pathlib import Path

LOOP = 5_000_000  # additions: 0.2-0.35 s on this machine (2 Dec)


def python_loop_ms(repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of a fixed pure-Python loop, in milliseconds (the fastest:
    what the core can do when nothing else takes it)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        total = 0
        for i in range(LOOP):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def cpu_jiffies() -> dict[str, int]:
    """The machine's CPU time so far by kind, from /proc/stat (Linux)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = open("/proc/stat").readline().split()[1 : 1 + len(names)]
    return dict(zip(names, map(int, values), strict=True))


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user and system), from /proc/PID/stat; 0 once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # the process has gone (a postgres backend that closed)
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steal_share(before: dict[str, int], after: dict[str, int]) -> float:
    """The share of the time between two ``cpu_jiffies`` that the hypervisor gave this virtual
    machine's cores to others (``steal``): the neighbours' part in a slow run."""
    elapsed = {kind: after[kind] - before[kind] for kind in before}
    total = sum(elapsed.values())
    return round(elapsed["steal"] / total, 3) if total else 0.0
