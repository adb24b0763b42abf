"""The services' event-loop lag (``huiying_loop_lag_seconds``, services/common/base.py) between
two scrapes of their /metrics, summed up for a benchmark's report."""

import requests
from prometheus_client.parser import text_string_to_metric_families


def read(samples) -> dict:
    """``{le: cumulative count, "sum": seconds}`` of the loop lag among a scrape's samples."""
    found = {}
    for sample in samples:
        if sample.name == "huiying_loop_lag_seconds_bucket":
            found[float(sample.labels["le"])] = sample.value
        elif sample.name == "huiying_loop_lag_seconds_sum":
            found["sum"] = sample.value
    return found


def scrape(base_url: str) -> dict:
    """``read`` of a service's /metrics at ``base_url``."""
    text = requests.get(base_url + "/metrics", timeout=10).text
    return read(sample for family in text_string_to_metric_families(text) for sample in family.samples)


def summary(before: dict, after: dict) -> dict:
    """The probes between two ``read``s, and the lag's mean, p99, p99.9 and largest, in ms; the
    percentiles as the upper bound of their bucket ("over 5000" past the last)."""
    counts = sorted((le, count - before.get(le, 0)) for le, count in after.items() if le != "sum")
    total = counts[-1][1] if counts else 0
    if not total:
        return {}
    mean = (after.get("sum", 0) - before.get("sum", 0)) / total

    def upper_bound(share):
        le = next(le for le, count in counts if count >= share * total)
        return "over 5000" if le == float("inf") else round(le * 1000)

    return {
        "probes": int(total),
        "mean": round(mean * 1000, 1),
        "p99": upper_bound(0.99),
        "p99.9": upper_bound(0.999),
        "max_under": upper_bound(1),
    }
