"""Queue entrypoints that hand one worker every message already waiting, not one worker each.

nameko spawns a worker per message: a worker, a transaction and a commit for every event, which
was most of what a case cost (bench/e2e.py). A batching entrypoint collects the messages its
queue consumer has received and, as soon as that consumer waits for more, gives them to one
worker as a list (at most ``max_batch``). When messages trickle in, a batch is one message and
nothing waits; in a burst, a batch is whatever arrived while the previous one was handled. No
timer holds a message back.

Each message is settled on its own, as before: when the worker returns, every message of its
batch is acknowledged. When it raises, the messages are tried again one per worker, so that the
ones that can be handled are, and only the one that cannot goes on to be retried later or
parked (the entrypoint's ``handle_message_processed``). Handlers must be idempotent — they are
already, since delivery is at least once — because a message of a failed batch is handled again.
"""

import logging
import threading
from functools import partial

from nameko.exceptions import ContainerBeingKilled

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 200
MAX_BATCHES_IN_FLIGHT = 2  # per entrypoint: one batch prepared while another waits for the database


class SomeFailed(Exception):
    """Raised by a batch handler that handled part of its batch: the messages at the positions
    in ``errors`` go on to be retried or parked, each with its own error; the others are
    acknowledged. (Raising anything else fails the whole batch.)"""

    def __init__(self, errors: dict[int, BaseException]):
        super().__init__(f"{len(errors)} of the batch failed: " + "; ".join(f"{e!r}"[:100] for e in errors.values()))
        self.errors = errors


class Batching:
    """Mixin for a nameko ``Consumer`` entrypoint (before it in the bases). With ``max_batch`` 1
    the method gets one message body, as nameko's own consumers do; above 1, a list of bodies.
    The subclass's ``handle_message_processed(message, result, exc_info)`` settles one message."""

    def __init__(self, *args, max_batch: int = 1, expected_exceptions=(), **kwargs):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        # SomeFailed is how a handler hands some messages on to be retried: not a crash
        expected = expected_exceptions if isinstance(expected_exceptions, tuple) else (expected_exceptions,)
        super().__init__(*args, expected_exceptions=(*expected, SomeFailed), **kwargs)

    @property
    def prefetch_count(self) -> int:
        """Unacknowledged messages RabbitMQ may hand this consumer: enough for a full batch in
        flight and the next one filling."""
        return self.max_batch * (MAX_BATCHES_IN_FLIGHT + 1)

    def setup(self):
        super().setup()
        self._waiting = []  # (body, message): received, not yet given to a worker
        self._alone = []  # messages of a failed batch, each to be tried in a worker of its own
        self._in_flight = 0
        self._flush_scheduled = False

    def stop(self):
        super().stop()  # the consumer is cancelled: nothing more arrives
        # What no worker took goes back to the queue now (another replica may take it) rather
        # than when the connection closes.
        waiting, self._waiting, self._alone = self._waiting + self._alone, [], []
        for _body, message in waiting:
            self.queue_consumer.requeue_message(message)

    def handle_message(self, body, message):
        """Called by the queue consumer for each message it receives; never blocks."""
        self._waiting.append((body, message))
        self._schedule_flush()

    def _schedule_flush(self):
        if self._flush_scheduled or self._in_flight >= MAX_BATCHES_IN_FLIGHT:
            return
        if not (self._waiting or self._alone):
            return
        self._flush_scheduled = True
        # The new greenthread runs once the consumer's thread waits for the socket, i.e. after
        # it has passed on every message already received: those make up the batch.
        self.container.spawn_managed_thread(self._flush, identifier=f"{type(self).__name__}.flush")

    def _flush(self):
        self._flush_scheduled = False
        while self._in_flight < MAX_BATCHES_IN_FLIGHT and (self._waiting or self._alone):
            if self._alone:
                batch = [self._alone.pop(0)]
            else:
                batch = self._waiting[: self.max_batch]
                del self._waiting[: len(batch)]
            self._spawn(batch)

    def _spawn(self, batch: list):
        bodies = [body for body, _message in batch]
        args = (bodies,) if self.max_batch > 1 else (bodies[0],)
        self._in_flight += 1
        try:
            # blocks while the container's workers are all busy: that is the back-pressure
            self.container.spawn_worker(
                self,
                args,
                {},
                context_data=self.unpack_message_headers(batch[0][1]),
                handle_result=partial(self._batch_handled, batch),
            )
        except ContainerBeingKilled:
            self._in_flight -= 1
            for _body, message in batch:
                self.queue_consumer.requeue_message(message)

    def _batch_handled(self, batch, worker_ctx, result=None, exc_info=None):
        self._in_flight -= 1
        if exc_info is not None and isinstance(exc_info[1], SomeFailed):
            errors = exc_info[1].errors
            for position, (_body, message) in enumerate(batch):
                error = errors.get(position)
                failure = None if error is None else (type(error), error, error.__traceback__)
                self.handle_message_processed(message, result, failure)
        elif exc_info is None or len(batch) == 1:
            for _body, message in batch:
                self.handle_message_processed(message, result, exc_info)
        else:
            log.warning(
                "%s: a batch of %s failed (%s: %s); trying each message on its own",
                self.method_name,
                len(batch),
                exc_info[0].__name__,
                str(exc_info[1])[:200],
            )
            self._alone.extend(batch)
        self._schedule_flush()
        return result, exc_info


class RunFailed(Exception):
    """The run that included a caller's items failed (the error is its cause)."""


class Coalesced:
    """Runs ``function(items)`` one run at a time for the workers of a process that hand it items
    at about the same time: the items handed over while a run goes on are run together next, by
    whichever of their workers comes first (each hands over the same function, bound to itself).

    Work that each worker would otherwise do on its own — supervision evaluating the clusters of
    the cases its batch changed, intake storing one HTTP submission — is then done once for all
    of them, in one transaction, and no two runs race each other for the same rows. Each caller
    gets the results of its own items (``function`` returns one per item, in order, or None) once
    a run has included them, and raises ``RunFailed`` if that run failed: its message or request
    is answered only after the work, as if it had done it alone."""

    def __init__(self):
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
                results, error = None, None
                try:
                    results = function([item for each in run for item in each.items])
                except Exception as exc:  # each caller of this run raises it
                    error = exc
                start = 0
                for each in run:
                    end = start + len(each.items)
                    each.finished, each.error = True, error
                    each.results = None if results is None else results[start:end]
                    start = end
        if handed.error is not None:
            raise RunFailed(f"{type(handed.error).__name__}: {handed.error}") from handed.error
        return handed.results


class _Handed:
    __slots__ = ("items", "finished", "error", "results")

    def __init__(self, items: list):
        self.items, self.finished, self.error, self.results = items, False, None, None
