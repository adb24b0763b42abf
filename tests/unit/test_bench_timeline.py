"""bench.e2e's ``by_second``: a steady run's cases by the second they were sent, beside the cores
each process used in that second (pure logic; the sampler itself runs in the benchmark)."""

from bench.e2e import by_second


def test_cases_fall_into_the_second_they_were_sent_beside_that_seconds_samples():
    start = 100.0
    scheduled = {"a": 100.1, "b": 100.9, "c": 101.2, "d": 102.5}
    latency = {"a": 0.050, "b": 0.150, "c": 0.300, "d": 0.020}  # "d" only: no sample covers second 2
    samples = [
        (100.5, {"intake": 0.2, "postgresql": 0.4}),
        (101.0, {"intake": 0.4, "postgresql": 0.2}),  # at the second's end: still the first second
        (101.5, {"intake": 0.9}),
    ]
    rows = by_second(start, scheduled, latency, samples)
    assert rows[0] == {
        "second": 0,
        "cases": 2,
        "p50_ms": 150,
        "max_ms": 150,
        "cores": {"intake": 0.3, "postgresql": 0.3},
    }
    assert rows[1] == {"second": 1, "cases": 1, "p50_ms": 300, "max_ms": 300, "cores": {"intake": 0.9}}
    assert rows[2] == {"second": 2, "cases": 1, "p50_ms": 20, "max_ms": 20, "cores": {}}
