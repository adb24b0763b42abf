"""Soak: cases at a steady rate for minutes, half by HTTP and half by AMQP; none lost, and every
service's memory flat once warmed up. CI runs 1,000 cases; ``HUIYING_LONG_TESTS=1`` runs 10,000."""

import statistics
import time

from tests.faults.conftest import LONG
from tests.faults.harness import SERVICES, Sender, assert_nothing_lost_or_doubled, finished, stream

CASES = 10_000 if LONG else 1_000
# Cases per second, offered: steady, and within what the slowest consumer sustains on this
# machine (supervision, which re-evaluates a case's whole cluster on each of its events: about
# 20 events/s once clusters hold hundreds of cases; bench/ measures it).
RATE = 20 if LONG else 50
WARM_UP = 0.3  # the first 30% of the run: caches fill, pools open, code paths are first taken
# How much a service may still grow after warm-up: allocator noise and SQLAlchemy's and kombu's
# pools settle in a few MB; a leak per case (≥1 KB × thousands of cases) shows far above this.
ALLOWED_GROWTH_MB = 15


def test_a_steady_stream_loses_nothing_and_memory_stays_flat(make_stack, capsys):
    stack = make_stack()
    stack.up()
    sender = Sender(stack, stack.keys["hotline"])
    pids = {service: stack.pid(service) for service in SERVICES}
    samples: dict[str, list[tuple[int, float]]] = {service: [] for service in SERVICES}

    def sample(i):
        if i % 50 == 0:
            for service, pid in pids.items():
                samples[service].append((i, stack.rss_mb(pid)))

    started = time.monotonic()
    stream(sender, CASES, RATE, "S", each=sample)
    offered = time.monotonic() - started
    figures = finished(stack, sender, timeout=600, settle_timeout=900)
    drained = time.monotonic() - started
    for service, pid in pids.items():
        samples[service].append((CASES, stack.rss_mb(pid)))

    growth = {}
    for service, points in samples.items():
        warm = [mb for i, mb in points if WARM_UP * CASES <= i < (WARM_UP + 0.1) * CASES]
        last = [mb for i, mb in points if i >= 0.9 * CASES]
        growth[service] = (statistics.median(warm), statistics.median(last))
    with capsys.disabled():
        print(
            f"\nsoak: {CASES} cases offered at {RATE}/s in {offered:.0f}s, all processed after {drained:.0f}s;"
            f" lost {len(figures['lost'])}; RSS MB after warm-up → end: "
            + ", ".join(f"{s} {a:.0f}→{b:.0f}" for s, (a, b) in growth.items())
        )
    assert all(stack.pid(service) == pid for service, pid in pids.items())  # nobody restarted
    assert_nothing_lost_or_doubled(figures, CASES)
    for service, (warm, last) in growth.items():
        assert last - warm <= ALLOWED_GROWTH_MB, f"{service} grew {last - warm:.1f} MB after warm-up"
