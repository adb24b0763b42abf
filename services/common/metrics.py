"""Prometheus metrics, served by every service at ``GET /metrics`` (one registry per process).

What is measured, and where:
- ``huiying_events_published_total{service, event_type}``: every event a service got out of its
  outbox (outbox.py). Cases received are intake's ``case_received``, cases routed routing's
  ``case_referred`` and ``case_needs_triage``, escalations supervision's ``case_escalated``.
- ``huiying_cases_received_total{source}``, ``huiying_cases_routed_total{outcome}`` (referred or
  triage), ``huiying_cases_escalated_total{action}``: the same events, counted as what they mean.
- ``huiying_event_lag_seconds{service, event_type}``: from an event's occurrence to its handler
  starting in this service — how far behind its queue is (events.py).
- ``huiying_rule_evaluation_seconds{ruleset}``: one durable_rules evaluation (rules/ruleset.py;
  answers remembered for repeated facts are not evaluations).
- ``huiying_notification_failures_total{channel, outcome}``: a delivery that failed and will be
  retried, or was parked after its last attempt (notify).
- ``huiying_run_seconds{run}`` and ``huiying_run_items{run}``: each run of work taken together —
  a queue's batch (``<handler> batch``, batching.py), supervision's projection run and its
  background runs (``Coalesced``, ``InBackground``) — how long it took and how many items it
  held. Their sums over a minute say how busy each is: a projection run busy nearly all the time
  is what a case waits behind (bench/e2e.py reports them per run of the benchmark).
- ``huiying_loop_lag_seconds``: how late the service's event loop wakes a greenthread that asked
  to sleep 50 ms (base.LoopLagProbe). Every greenthread of a service shares one OS thread: code
  that computes for 50 ms without yielding holds every other one (a projection run's next
  statement, an HTTP request) that long, as does a process waiting for a core.
"""

from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from services.common.timeutil import now

EVENTS_PUBLISHED = Counter(
    "huiying_events_published_total", "Events published from a service's outbox", ["service", "event_type"]
)
EVENT_LAG = Histogram(
    "huiying_event_lag_seconds",
    "From an event's occurrence to its handler starting",
    ["service", "event_type"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
RULE_EVALUATION = Histogram(
    "huiying_rule_evaluation_seconds",
    "One durable_rules evaluation",
    ["ruleset"],
    buckets=(0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
)
CASES_RECEIVED = Counter("huiying_cases_received_total", "Cases intake stored (new, not resent)", ["source"])
CASES_ROUTED = Counter(
    "huiying_cases_routed_total", "Routing decisions: referred, or put on the triage list", ["outcome"]
)
CASES_ESCALATED = Counter("huiying_cases_escalated_total", "Escalation actions taken, per case", ["action"])
RUN_SECONDS = Histogram(
    "huiying_run_seconds",
    "How long each run of work taken together took (a queue's batch, a projection run, a background run)",
    ["run"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RUN_ITEMS = Histogram(
    "huiying_run_items",
    "How many items (events, tickets, deliveries, cases) a run of work took together",
    ["run"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
)
LOOP_LAG = Histogram(
    "huiying_loop_lag_seconds",
    "How much later than asked a 50 ms sleep of the service's event loop woke (base.LoopLagProbe)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
)
NOTIFICATION_FAILURES = Counter(
    "huiying_notification_failures_total", "Deliveries that failed: retried or parked", ["channel", "outcome"]
)


def count_published(service: str, event: dict) -> None:
    """Count an event its service has published, and the case-level counters it stands for."""
    event_type = event["event_type"]
    EVENTS_PUBLISHED.labels(service, event_type).inc()
    if event_type == "case_received":
        CASES_RECEIVED.labels(event.get("source") or "?").inc()
    elif event_type in ("case_referred", "case_needs_triage"):
        CASES_ROUTED.labels("referred" if event_type == "case_referred" else "triage").inc()
    elif event_type == "case_escalated":
        CASES_ESCALATED.labels(event.get("action") or "?").inc()


def observe_lag(service: str, event: dict) -> None:
    """Record how long ago ``event`` occurred; an event without a readable time is not counted."""
    try:
        occurred = datetime.fromisoformat(event["occurred_at"])
    except (KeyError, TypeError, ValueError):
        return
    lag = (now() - occurred).total_seconds()  # the demo's clock, if it is moved
    EVENT_LAG.labels(service, event.get("event_type", "?")).observe(max(0.0, lag))


def observe_run(run: str, seconds: float, items: int) -> None:
    RUN_SECONDS.labels(run).observe(seconds)
    RUN_ITEMS.labels(run).observe(items)


def respond():
    from werkzeug.wrappers import Response

    return Response(generate_latest(), status=200, content_type=CONTENT_TYPE_LATEST)
