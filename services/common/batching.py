"""Queue entrypoints that hand one worker every message already waiting, not one worker each.

nameko spawns a worker per message: a worker, a transaction and a commit for every event, which
was most of what a case cost (bench/e2e.py). A batching entrypoint collects what its queue
consumer has received and, as soon as that consumer waits for more, gives it to one worker as a
list (at most ``max_batch`` items). When messages trickle in, a batch is one item and nothing
waits; in a burst, a batch is whatever arrived while the previous one was handled. By default no
timer holds a message back; ``HUIYING_BATCH_GATHER_MS`` makes a batch wait for more, up to that
long but no longer than the previous batch took to handle (config.batch_gather_seconds).

A message may carry several items (``items_of``: events travel several to a message, see
events.py). Each message is settled on its own, once all its items are handled: acknowledged
when they all were. When a worker raises, its items are tried again one per worker, so that the
ones that can be handled are and only the one that cannot goes on to be retried later or parked
(``handle_message_processed`` for a message of one item, ``handle_items_failed`` for the failed
items of a message of several). Handlers must be idempotent — they are already, since delivery
is at least once — because an item of a failed batch is handled again.
"""

import logging
import threading
import time
from contextlib import contextmanager
from functools import partial

import eventlet
from nameko.exceptions import ContainerBeingKilled
from nameko.extensions import DependencyProvider

from services.common import metrics

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 200
# One batch at a time per entrypoint: what arrives meanwhile makes the next batch, so batches grow
# with the load and nothing waits when it is light. Two in flight made smaller batches for little
# overlap on two cores (bench/e2e.py, 30 Nov, p99 at 200 cases/s with 17,000 cases open: 428 → 341
# ms with HUIYING_BATCH_GATHER_MS=50; 947 → 1,028 ms without, within a run's noise; 10 cases/s
# unchanged).
MAX_BATCHES_IN_FLIGHT = 1
# The gather of a queue that no case waits on (notify's, intake's view of routing's statuses): a
# quarter of a second of a steady flow makes one batch, a transaction or two, instead of many of
# a few messages each (bench/e2e.py at 200 cases/s: notify's CPU per case 1.51 → 1.16 ms).
GATHER_OFF_THE_CASES_WAY = 0.25


class SomeFailed(Exception):
    """Raised by a batch handler that handled part of its batch: the items at the positions in
    ``errors`` go on to be retried or parked, each with its own error; the others count as
    handled. (Raising anything else fails the whole batch.)"""

    def __init__(self, errors: dict[int, BaseException]):
        super().__init__(f"{len(errors)} of the batch failed: " + "; ".join(f"{e!r}"[:100] for e in errors.values()))
        self.errors = errors


class _Tally:
    """What is left to settle of one message."""

    __slots__ = ("items", "remaining", "failed")

    def __init__(self, items: int):
        self.items, self.remaining, self.failed = items, items, []


class Batching:
    """Mixin for a nameko ``Consumer`` entrypoint (before it in the bases). With ``max_batch`` 1
    the method gets one item, as nameko's own consumers get one body; above 1, a list of items.
    The subclass's ``handle_message_processed(message, result, exc_info)`` settles a message."""

    # How long a batch took, and the wait for more: the unit tests drive them by hand.
    clock = staticmethod(time.monotonic)
    sleep = staticmethod(eventlet.sleep)

    def __init__(
        self,
        *args,
        max_batch: int = 1,
        gather_seconds: float | None = None,
        batches_in_flight: int = MAX_BATCHES_IN_FLIGHT,
        expected_exceptions=(),
        **kwargs,
    ):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if batches_in_flight < 1:
            raise ValueError("batches_in_flight must be at least 1")
        self.max_batch = max_batch
        # For a handler that hands its batch to a Coalesced run (supervision's projection): the
        # run merges what several batches hold, so a batch goes to it at once (gather 0), without
        # waiting for the previous batch's run to end.
        self.batches_in_flight = batches_in_flight
        # For a queue no case waits on (GATHER_OFF_THE_CASES_WAY): every batch waits this long for more,
        # whatever HUIYING_BATCH_GATHER_MS says, so that a steady trickle comes in a few batches.
        self.fixed_gather_seconds = gather_seconds
        # SomeFailed is how a handler hands some items on to be retried: not a crash
        expected = expected_exceptions if isinstance(expected_exceptions, tuple) else (expected_exceptions,)
        super().__init__(*args, expected_exceptions=(*expected, SomeFailed), **kwargs)

    @property
    def prefetch_count(self) -> int:
        """Unacknowledged messages RabbitMQ may hand this consumer: enough for a full batch in
        flight and the next one filling."""
        return self.max_batch * (self.batches_in_flight + 1)

    def items_of(self, body) -> list:
        """The items a message body carries (here: the body itself)."""
        return [body]

    def handle_items_failed(self, message, failed: list) -> None:
        """Settle a message of several items of which ``failed`` — ``(item, exc_info)`` — could
        not be handled; the others were. Here the whole message fails (its other items are handled
        again when it comes back: handlers are idempotent); events.py retries just the failed."""
        self.handle_message_processed(message, None, failed[0][1])

    def setup(self):
        super().setup()
        # HUIYING_BATCH_GATHER_MS: under a sustained load, waiting a moment for more makes fewer,
        # larger batches — fewer transactions and messages per case (bench/e2e.py, bench/README.md).
        self._gather_seconds = self.container.config.get("BATCH_GATHER_SECONDS", 0)
        self._waiting = []  # (item, message): received, not yet given to a worker
        self._alone = []  # items of a failed batch, each to be tried in a worker of its own
        self._tallies: dict = {}  # message → _Tally
        self._in_flight = 0
        self._flush_scheduled = False
        self._last_batch_seconds = 0.0  # how long the previous batch took to handle

    def stop(self):
        super().stop()  # the consumer is cancelled: nothing more arrives
        # A message no worker has taken an item of goes back to the queue now (another replica
        # may take it) rather than when the connection closes. One that a worker is handling
        # part of stays unacknowledged: RabbitMQ redelivers it whole when the connection closes.
        left, self._waiting, self._alone = self._waiting + self._alone, [], []
        untouched = {}
        for _item, message in left:
            untouched[message] = untouched.get(message, 0) + 1
        for message, count in untouched.items():
            if self._tallies.get(message) is not None and self._tallies[message].remaining == count:
                self.queue_consumer.requeue_message(message)

    def handle_message(self, body, message):
        """Called by the queue consumer for each message it receives; never blocks."""
        items = self.items_of(body)
        if not items:
            return self.handle_message_processed(message, None, None)
        self._tallies[message] = _Tally(len(items))
        self._waiting.extend((item, message) for item in items)
        self._schedule_flush()

    def _schedule_flush(self):
        if self._flush_scheduled or self._in_flight >= self.batches_in_flight:
            return
        if not (self._waiting or self._alone):
            return
        self._flush_scheduled = True
        # The new greenthread runs once the consumer's thread waits for the socket, i.e. after
        # it has passed on every message already received: those make up the batch.
        self.container.spawn_managed_thread(self._flush, identifier=f"{type(self).__name__}.flush")

    def gather_for(self) -> float:
        """How long the next batch waits for more: the gather time, but no longer than the
        previous batch took to handle. Under a sustained load a batch's handling grows with it
        and the wait with it, up to the gather time; a queue whose batches are quick, or a quiet
        one, makes its messages wait little (bench/e2e.py with 50 ms: routing's hop at 200
        cases/s took p50 49 ms when every batch waited the whole 50 ms, 18-25 ms now; at 10
        cases/s the whole way took p99 190 ms, now 64-83 ms). An entrypoint given its own
        ``gather_seconds`` always waits that long."""
        if self.fixed_gather_seconds is not None:
            return self.fixed_gather_seconds
        return min(self._gather_seconds, self._last_batch_seconds)

    def _flush(self):
        gather = self.gather_for()
        if gather and len(self._waiting) < self.max_batch:
            self.sleep(gather)
        self._flush_scheduled = False
        while self._in_flight < self.batches_in_flight and (self._waiting or self._alone):
            if self._alone:
                batch = [self._alone.pop(0)]
            else:
                batch = self._waiting[: self.max_batch]
                del self._waiting[: len(batch)]
            self._spawn(batch)

    def _spawn(self, batch: list):
        items = [item for item, _message in batch]
        args = (items,) if self.max_batch > 1 else (items[0],)
        self._in_flight += 1
        started = self.clock()
        try:
            # blocks while the container's workers are all busy: that is the back-pressure
            self.container.spawn_worker(
                self,
                args,
                {},
                context_data=self.unpack_message_headers(batch[0][1]),
                handle_result=partial(self._batch_handled, batch, started),
            )
        except ContainerBeingKilled:
            self._in_flight -= 1
            for message in dict.fromkeys(message for _item, message in batch):
                self._tallies.pop(message, None)
                self.queue_consumer.requeue_message(message)

    def _batch_handled(self, batch, started, worker_ctx, result=None, exc_info=None):
        self._in_flight -= 1
        self._last_batch_seconds = self.clock() - started
        metrics.observe_run(f"{self.method_name} batch", self._last_batch_seconds, len(batch))
        if exc_info is not None and isinstance(exc_info[1], SomeFailed):
            errors = exc_info[1].errors
            outcomes = [errors.get(position) for position in range(len(batch))]
            outcomes = [None if e is None else (type(e), e, e.__traceback__) for e in outcomes]
        elif exc_info is None or len(batch) == 1:
            outcomes = [exc_info] * len(batch)
        else:
            log.warning(
                "%s: a batch of %s failed (%s: %s); trying each on its own",
                self.method_name,
                len(batch),
                exc_info[0].__name__,
                str(exc_info[1])[:200],
            )
            self._alone.extend(batch)
            outcomes = []
        for (item, message), failure in zip(batch, outcomes):
            self._settle(item, message, result, failure)
        self._schedule_flush()
        return result, exc_info

    def _settle(self, item, message, result, failure):
        tally = self._tallies.get(message)
        if tally is None:  # requeued while a worker held one of its items (the container stopping)
            return
        tally.remaining -= 1
        if failure is not None:
            tally.failed.append((item, failure))
        if tally.remaining:
            return
        del self._tallies[message]
        if tally.items == 1 or not tally.failed:
            self.handle_message_processed(message, result, tally.failed[0][1] if tally.failed else None)
        else:
            self.handle_items_failed(message, tally.failed)


class Coalesced:
    """Runs ``function(items)`` one run at a time for the workers of a process that hand it items
    at about the same time: the items handed over while a run goes on are run together next, by
    whichever of their workers comes first (each hands over the same function, bound to itself).

    Work that each worker would otherwise do on its own — supervision evaluating the clusters of
    the cases its batch changed, intake storing one HTTP submission — is then done once for all
    of them, in one transaction, and no two runs race each other for the same rows. Each caller
    gets the results of its own items (``function`` returns one per item, in order, or None) once
    a run has included them: its message or request is answered only after the work, as if it had
    done it alone. When a run of several callers' items fails, each caller's items are run again
    on their own, and only a caller whose own run fails raises, with that run's own error: a
    ticket's retry and a parked event's reason name it."""

    def __init__(self, what: str = "coalesced run"):
        self.what = what  # the run's name in the metrics (huiying_run_seconds)
        self._lock = threading.Lock()  # green once eventlet has patched threading
        self._waiting: list[_Handed] = []

    def __call__(self, items: list, function) -> list | None:
        handed = _Handed(list(items))
        self._waiting.append(handed)
        while not handed.finished:
            with self._lock:
                if handed.finished:  # the run before ours took our items
                    break
                run, self._waiting = self._waiting, []
                items = [item for each in run for item in each.items]
                started = time.monotonic()
                try:
                    results = function(items)
                    metrics.observe_run(self.what, time.monotonic() - started, len(items))
                except Exception as exc:
                    if len(run) == 1:
                        run[0].finished, run[0].error = True, exc
                        continue
                    # One caller's bad item must not fail the others: each runs on its own.
                    log.warning("a run of %s callers failed (%s); running each on its own", len(run), exc)
                    for each in run:
                        try:
                            each.results = function(each.items)
                        except Exception as exc:  # this caller raises it
                            each.error = exc
                        each.finished = True
                    continue
                start = 0
                for each in run:
                    end = start + len(each.items)
                    each.finished = True
                    each.results = None if results is None else results[start:end]
                    start = end
        if handed.error is not None:
            raise handed.error
        return handed.results


class _Handed:
    __slots__ = ("items", "finished", "error", "results")

    def __init__(self, items: list):
        self.items, self.finished, self.error, self.results = items, False, None, None


class InBackground:
    """Runs ``function(items)`` for the items workers hand it, in a greenthread of its own: the
    workers do not wait for it. A run starts ``gather_seconds`` after the first item arrives, with
    every item handed over by then; items handed over during a run go in the next. What a failed
    run held is logged and dropped: for work that something else catches up on (supervision's
    evaluation after events, which the periodic sweep repeats).

    ``at_most_share`` keeps the runs to that share of the time when they grow long: the next run
    gathers for at least ``(1 / share - 1)`` times as long as the previous one took. Under load,
    runs then take more items each instead of running back to back and taking the CPU from the
    work that waits on them; when they are quick, ``gather_seconds`` rules.

    ``spawn`` starts the greenthread: in a service, the container's ``spawn_managed_thread``
    (``BackgroundRuns``), so that the runs end with the container (``stop``)."""

    def __init__(
        self,
        what: str,
        gather_seconds: float = 0.0,
        at_most_share: float = 1.0,
        clock=time.monotonic,
        spawn=eventlet.spawn,
    ):
        if not 0 < at_most_share <= 1:
            raise ValueError("at_most_share must be in (0, 1]")
        self.what, self.gather_seconds, self.at_most_share, self.clock = what, gather_seconds, at_most_share, clock
        self.spawn = spawn
        self._items: list = []
        self._thread = None  # the greenthread that gathers and runs, while there is one
        self._in_run = False
        self._stopped = False
        self._took = 0.0  # the previous run's time

    def __call__(self, items, function) -> None:
        if self._stopped:
            self._leave(items)
            return
        self._items.extend(items)
        if self._thread is None:
            self._thread = self.spawn(partial(self._run, function))

    def gather_for(self) -> float:
        """How long the next run gathers its items."""
        return max(self.gather_seconds, self._took * (1 / self.at_most_share - 1))

    def stop(self, wait_for_the_run: bool = True) -> None:
        """No run starts any more. A run going on is waited for (unless told not to: then whoever
        spawned it kills it); one still gathering is not started, and its items are dropped with a
        log line: they are left to catch up on, as after a failed run."""
        self._stopped = True
        thread = self._thread
        if thread is not None:
            if not self._in_run:
                thread.kill()
            elif wait_for_the_run:
                try:
                    thread.wait()
                except Exception:  # _run logs its own failures; this is only the wait's
                    pass
        if self._items:
            self._leave(self._items)
            self._items = []

    def _leave(self, items: list) -> None:
        log.info("%s stopped: %s item(s) left to catch up on", self.what, len(items))

    def _run(self, function):
        try:
            while self._items and not self._stopped:
                eventlet.sleep(self.gather_for())
                if self._stopped:
                    return
                items, self._items = self._items, []
                self._in_run = True
                started = self.clock()
                try:
                    function(items)
                except Exception:
                    log.exception("%s of %s item(s) failed; left to catch up on", self.what, len(items))
                finally:
                    self._in_run = False
                self._took = self.clock() - started
                metrics.observe_run(self.what, self._took, len(items))
        finally:
            self._thread = None


class BackgroundRuns(DependencyProvider):
    """An ``InBackground`` whose greenthread the service container manages: stopping the
    container waits for the run going on and starts no other; killing it kills the run.

    Left to a bare greenthread, a run outlived its container. The tests showed it: a killed
    supervision's evaluation, still gathering, ran after the next test had emptied the database
    and wrote its agenda items there."""

    def __init__(self, what: str, gather_seconds: float = 0.0, at_most_share: float = 1.0):
        self.what, self.gather_seconds, self.at_most_share = what, gather_seconds, at_most_share

    def setup(self):
        self.runs = InBackground(
            self.what,
            self.gather_seconds,
            self.at_most_share,
            spawn=partial(self.container.spawn_managed_thread, identifier=self.what),
        )

    def stop(self):
        self.runs.stop()

    def kill(self):
        self.runs.stop(wait_for_the_run=False)  # the container kills the run's thread next

    def get_dependency(self, worker_ctx):
        return self.runs


class GiveWay:
    """Lets work that cases wait on go first within one process. Such work (supervision's
    projection runs) runs ``inside()``; background work (sweeps, evaluations after events) calls
    ``pause()`` at its cooperative yields, which waits while such work runs, for ``at_most``
    seconds, then yields once.

    Why: eventlet runs one greenthread at a time and switches only when one waits. Each time a
    projection run waits for PostgreSQL, a CPU-bound sweep can take the process for a whole slice
    of cases (10–20 ms) before the run goes on, and a run waits on the database several times. In
    bench/e2e.py at 200 cases/s, a sweep of 6,382 cases in the window went with a supervision hop
    p99 of 921 ms against a p50 of 46 ms; twelve runs with and without this did not yet show a
    gain above the machine's noise (bench/README.md). Background work is never held up for
    longer than ``at_most`` per pause, so a sweep under a steady load still ends."""

    def __init__(self, at_most: float = 0.05, poll: float = 0.002, clock=time.monotonic):
        self.at_most, self.poll, self.clock = at_most, poll, clock
        self._inside = 0

    @contextmanager
    def inside(self):
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1

    def pause(self) -> None:
        deadline = self.clock() + self.at_most
        while self._inside and self.clock() < deadline:
            eventlet.sleep(self.poll)
        eventlet.sleep(0)
