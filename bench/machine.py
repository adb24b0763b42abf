"""How fast this (shared, noisy) machine is at the moment of a run: the same single-core Python
work timed before and after it, so that runs on different days can be compared. On 2 Dec the
same code's p99 at 200 cases/s ranged from 224 ms to 2.2 s as the machine's speed changed; a
run's figures mean little without this one."""

import time

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
