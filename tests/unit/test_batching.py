"""The batching entrypoint's bookkeeping (services/common/batching.py) with a fake container: which
items reach a worker together, and how each message is settled — acknowledged when all its items
were handled, its failed items retried on their own, a failed batch tried item by item. The
interface tests run the same code against RabbitMQ; here every branch is driven on purpose."""

import pytest

from services.common.batching import Batching, Coalesced, SomeFailed
from services.common.outbox import EVENTS_PER_MESSAGE, envelopes


class FakeContainer:
    """Runs a spawned thread when ``run_threads`` is called (the consumer's thread yields), and a
    worker at once: ``handler(items)`` returns, raises, or raises SomeFailed."""

    def __init__(self, handler):
        self.handler, self.threads, self.batches = handler, [], []
        self.config = {}  # the service's nameko config
        self.workers_wait = False  # True: a worker runs as a thread, in turn, as nameko's do

    def spawn_managed_thread(self, fn, identifier=None):
        self.threads.append(fn)

    def run_threads(self):
        while self.threads:
            self.threads.pop(0)()

    def spawn_worker(self, entrypoint, args, kwargs, context_data=None, handle_result=None):
        if self.workers_wait:
            self.threads.append(lambda: self._work(args, handle_result))
        else:
            self._work(args, handle_result)

    def _work(self, args, handle_result):
        self.batches.append(list(args[0]))
        try:
            result, exc_info = self.handler(args[0]), None
        except Exception as exc:
            result, exc_info = None, (type(exc), exc, exc.__traceback__)
        handle_result(None, result, exc_info)


class Base:
    """What the mixin sits on: a nameko Consumer's few attributes."""

    def __init__(self, expected_exceptions=()):
        self.expected_exceptions = expected_exceptions

    def setup(self):
        pass

    def unpack_message_headers(self, message):
        return {}


class Entrypoint(Batching, Base):
    method_name = "handle"

    def __init__(self, handler, max_batch=50, several_per_message=False, gather_seconds=None, batches_in_flight=1):
        super().__init__(max_batch=max_batch, gather_seconds=gather_seconds, batches_in_flight=batches_in_flight)
        self.container = FakeContainer(handler)
        self.several = several_per_message
        self.settled, self.items_failed = [], []

    def items_of(self, body):
        return body if self.several else [body]

    def handle_message_processed(self, message, result=None, exc_info=None):
        self.settled.append((message, None if exc_info is None else str(exc_info[1])))

    def handle_items_failed(self, message, failed):
        self.items_failed.append((message, [(item, str(e[1])) for item, e in failed]))


def entrypoint(handler, **options) -> Entrypoint:
    point = Entrypoint(handler, **options)
    point.setup()
    return point


def test_everything_received_before_the_consumer_yields_is_one_batch_and_each_message_is_acked():
    point = entrypoint(lambda items: None)
    for n in range(5):
        point.handle_message(n, f"m{n}")
    point.container.run_threads()
    assert point.container.batches == [[0, 1, 2, 3, 4]]
    assert point.settled == [(f"m{n}", None) for n in range(5)]


def test_a_batch_is_at_most_max_batch_items():
    point = entrypoint(lambda items: None, max_batch=2)
    for n in range(5):
        point.handle_message(n, f"m{n}")
    point.container.run_threads()
    assert point.container.batches == [[0, 1], [2, 3], [4]]


def test_a_failed_batch_is_tried_item_by_item_and_only_the_failing_one_is_settled_as_failed():
    def handler(items):
        if 2 in items:
            raise ValueError("poison")

    point = entrypoint(handler)
    for n in range(4):
        point.handle_message(n, f"m{n}")
    point.container.run_threads()
    assert point.container.batches == [[0, 1, 2, 3], [0], [1], [2], [3]]
    assert sorted(point.settled) == [("m0", None), ("m1", None), ("m2", "poison"), ("m3", None)]


def test_some_failed_settles_the_others_at_once():
    point = entrypoint(lambda items: (_ for _ in ()).throw(SomeFailed({1: LookupError("not yet")})))
    for n in range(3):
        point.handle_message(n, f"m{n}")
    point.container.run_threads()
    assert point.container.batches == [[0, 1, 2]]  # nothing tried again in this process
    assert point.settled == [("m0", None), ("m1", "not yet"), ("m2", None)]


def test_a_message_of_several_items_is_settled_once_all_are_and_only_its_failed_items_go_on():
    def handler(items):
        if "bad" in items:
            raise SomeFailed({items.index("bad"): ValueError("cannot")})

    point = entrypoint(handler, several_per_message=True)
    point.handle_message(["a", "bad", "c"], "envelope")
    point.handle_message(["d"], "single")
    point.container.run_threads()
    assert point.settled == [("single", None)]
    assert point.items_failed == [("envelope", [("bad", "cannot")])]


def test_an_empty_message_is_acked_at_once():
    point = entrypoint(lambda items: None, several_per_message=True)
    point.handle_message([], "empty")
    assert point.settled == [("empty", None)] and point.container.batches == []


def test_the_default_for_a_failed_item_of_several_is_to_fail_the_whole_message():
    class Plain(Batching, Base):
        method_name = "handle"

        def __init__(self):
            super().__init__(max_batch=10)
            self.container = FakeContainer(lambda items: (_ for _ in ()).throw(SomeFailed({0: ValueError("x")})))
            self.settled = []

        def items_of(self, body):
            return body

        def handle_message_processed(self, message, result=None, exc_info=None):
            self.settled.append((message, exc_info and str(exc_info[1])))

    point = Plain()
    point.setup()
    point.handle_message(["a", "b"], "m")
    point.container.run_threads()
    assert point.settled == [("m", "x")]  # retried whole: its handled item again (handlers are idempotent)


def test_envelopes_group_events_by_type_and_a_single_event_stays_a_plain_payload():
    events = [("a", {"n": 1}), ("b", {"n": 2}), ("a", {"n": 3})]
    assert envelopes(events) == [("a", [{"n": 1}, {"n": 3}]), ("b", {"n": 2})]
    many = [("a", {"n": n}) for n in range(EVENTS_PER_MESSAGE + 1)]
    assert [len(body) if isinstance(body, list) else 1 for _, body in envelopes(many)] == [EVENTS_PER_MESSAGE, 1]


def _hand_over_during_the_first_run(function, first, others, call):
    """``call(items)`` for ``first``, then for each of ``others`` while the run of ``first`` goes
    on: that run waits until all of them have handed their items over. (With sleeps instead, a
    run could end before the others were spawned on a loaded machine, as it did once in CI.)"""
    import eventlet
    from eventlet.event import Event

    gate, handed, pool = Event(), [], eventlet.GreenPool()

    def gated(items):
        if items == first:
            gate.wait()
        return function(items)

    def hand_over(items):
        handed.append(items)  # together() takes them before it can yield
        call(items, gated)

    with eventlet.Timeout(10):
        pool.spawn(hand_over, first)
        while not handed:
            eventlet.sleep(0)
        for items in others:
            pool.spawn(hand_over, items)
        while len(handed) < 1 + len(others):
            eventlet.sleep(0)
        gate.send()
        pool.waitall()


def test_coalesced_runs_together_what_is_handed_over_during_a_run_and_gives_each_its_results():
    together, runs, results = Coalesced(), [], {}

    def double(items):
        runs.append(list(items))
        return [2 * item for item in items]

    def call(items, function):
        results[items[0]] = together(items, function)

    _hand_over_during_the_first_run(double, [1], [[2, 3], [4]], call)
    assert runs == [[1], [2, 3, 4]]
    assert results == {1: [2], 2: [4, 6], 4: [8]}


def test_coalesced_a_failed_run_is_run_again_caller_by_caller_and_only_the_failing_caller_raises():
    together, outcomes, runs = Coalesced(), [], []

    def fails(items):
        runs.append(sorted(items))
        if 9 in items:
            raise ValueError("no")
        return [item * 10 for item in items]

    def call(items, function):
        try:
            outcomes.append((items[0], together(items, function)))
        except ValueError as exc:  # the failing run's own error
            outcomes.append((items[0], f"{type(exc).__name__}: {exc}"))

    _hand_over_during_the_first_run(fails, [1], [[9, 3], [2]], call)
    assert sorted(outcomes) == [(1, [10]), (2, [20]), (9, "ValueError: no")]
    assert runs == [[1], [2, 3, 9], [3, 9], [2]]  # together, then each on its own


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        Entrypoint(lambda items: None, max_batch=0)


def test_with_a_gather_time_a_batch_waits_for_more_but_no_longer_than_the_previous_batch_took():
    def batches(gather_seconds, first_takes, own_gather=None):
        """Message 1 goes at once (no batch before it) and takes ``first_takes`` on the clock; 2
        arrives while it is handled, 3 while the next batch waits for more, if it does. Returns
        the batches and the waits."""
        clock, waits = [0.0], []

        def handle(items):
            if 1 in items:
                point.handle_message(2, "m2")
                clock[0] += first_takes

        def wait_for_more(seconds):
            waits.append(seconds)
            clock[0] += seconds
            if len(waits) == 1:  # 3 arrives during the first wait
                point.handle_message(3, "m3")

        point = Entrypoint(handle, gather_seconds=own_gather)
        point.clock, point.sleep = lambda: clock[0], wait_for_more
        point.container.workers_wait = True
        point.container.config = {"BATCH_GATHER_SECONDS": gather_seconds}
        point.setup()
        point.handle_message(1, "m1")
        point.container.run_threads()
        if not waits:  # nothing waited: 3 arrives after 2's batch
            point.handle_message(3, "m3")
            point.container.run_threads()
        return point.container.batches, waits

    assert batches(0, first_takes=0.2) == ([[1], [2], [3]], [])  # no gathering
    assert batches(0.5, first_takes=0.2) == ([[1], [2, 3]], [0.2])  # [2] waits for more, up to 0.2 s
    assert batches(0.5, first_takes=0) == ([[1], [2], [3]], [])  # a quick batch: no wait
    # a queue no case waits on gathers for its own time, whatever the setting and the last batch:
    # the first message waits too
    assert batches(0, first_takes=0, own_gather=0.2) == ([[1, 3], [2]], [0.2, 0.2])


def test_with_batches_in_flight_a_batch_goes_to_a_worker_while_the_previous_one_is_handled():
    """As supervision's queues of routing's events, whose batches the projection's run merges:
    with two in flight, message 2, arriving while 1 is handled, is handed to a worker then; with
    one, only once 1 is done."""

    def order(batches_in_flight):
        steps = []

        def handle(items):
            steps.append(f"{items[0]} starts")
            if items == [1]:
                point.handle_message(2, "m2")
                point.container.run_threads()  # what the consumer's thread would do meanwhile
            steps.append(f"{items[0]} ends")

        point = entrypoint(handle, gather_seconds=0, batches_in_flight=batches_in_flight)
        point.container.workers_wait = True
        point.handle_message(1, "m1")
        point.container.run_threads()
        assert point.container.batches == [[1], [2]] and sorted(point.settled) == [("m1", None), ("m2", None)]
        assert point.prefetch_count == 50 * (batches_in_flight + 1)
        return steps

    assert order(1) == ["1 starts", "1 ends", "2 starts", "2 ends"]
    assert order(2) == ["1 starts", "2 starts", "2 ends", "1 ends"]
    with pytest.raises(ValueError, match="batches_in_flight"):
        Entrypoint(lambda items: None, batches_in_flight=0)


def test_the_gather_time_setting_is_milliseconds_and_a_bad_value_is_named(monkeypatch):
    from services.common.config import ConfigurationError, batch_gather_seconds

    monkeypatch.delenv("HUIYING_BATCH_GATHER_MS", raising=False)
    assert batch_gather_seconds() == 0
    monkeypatch.setenv("HUIYING_BATCH_GATHER_MS", "50")
    assert batch_gather_seconds() == 0.05
    for bad in ("fast", "-1", "5000"):
        monkeypatch.setenv("HUIYING_BATCH_GATHER_MS", bad)
        with pytest.raises(ConfigurationError, match=f"HUIYING_BATCH_GATHER_MS .* not '{bad}'"):
            batch_gather_seconds()


def test_work_in_the_background_gathers_longer_after_a_long_run():
    """InBackground keeps its runs to ``at_most_share`` of the time: a run that took 2 s is
    followed by one that gathers for 6 s at a quarter; a quick run leaves the gather time as set."""
    import eventlet

    from services.common.batching import InBackground

    moments = iter([0.0, 2.0, 10.0, 10.01, 20.0, 20.01])  # each run's start and end, as the clock gives them
    ran, slept = [], []
    background = InBackground("test", gather_seconds=0.5, at_most_share=0.25, clock=lambda: next(moments))
    real_sleep = eventlet.sleep
    eventlet.sleep = lambda seconds=0: (slept.append(seconds), real_sleep(0))[1]
    try:
        background(["a"], ran.append)
        real_sleep(0)
        real_sleep(0)  # the first run: gathered 0.5 s, took 2 s
        background(["b"], ran.append)
        real_sleep(0)
        real_sleep(0)
        background(["c"], ran.append)
        real_sleep(0)
        real_sleep(0)
    finally:
        eventlet.sleep = real_sleep
    assert ran == [["a"], ["b"], ["c"]]
    assert slept == [0.5, 6.0, 0.5]  # after 2 s: 2 × (1/0.25 − 1); after 0.01 s: the 0.5 s set
    with pytest.raises(ValueError, match="at_most_share"):
        InBackground("test", at_most_share=0)


def test_background_work_gives_way_to_the_work_cases_wait_on_but_not_for_ever():
    """GiveWay: a sweep pausing while a projection run waits on the database goes on only once
    the run has ended; it is never held up longer than ``at_most``; with no run, it goes on."""
    import itertools

    import eventlet
    from eventlet.event import Event

    from services.common.batching import GiveWay

    order, database_answers = [], Event()
    gate = GiveWay(at_most=60, poll=0.001)

    def projection_run():
        with gate.inside():
            order.append("run starts")
            database_answers.wait()  # other greenthreads may run meanwhile
            order.append("run ends")

    def sweep():
        gate.pause()
        order.append("sweep goes on")

    run = eventlet.spawn(projection_run)
    eventlet.sleep(0)
    swept = eventlet.spawn(sweep)
    eventlet.sleep(0.02)
    assert order == ["run starts"]
    database_answers.send()
    run.wait()
    swept.wait()
    assert order == ["run starts", "run ends", "sweep goes on"]

    clock = itertools.chain([0.0, 0.0], itertools.repeat(1.0))  # past the deadline at the second look
    gate = GiveWay(at_most=0.5, poll=0, clock=lambda: next(clock))
    with gate.inside():
        gate.pause()  # returns although the run inside has not ended
    GiveWay().pause()  # nothing inside: returns at once


def test_work_in_the_background_ends_when_stopped():
    """InBackground.stop: a run going on is waited for and none starts after it; items still
    gathering are dropped, as are those handed over after the stop; told not to wait (the
    container kills the thread next), it returns while the run goes on."""
    import eventlet

    from services.common.batching import InBackground

    ran = []

    def slow(items):
        ran.append(("started", items))
        eventlet.sleep(0.05)
        ran.append(("finished", items))

    gathering = InBackground("test", gather_seconds=0.05)
    gathering(["a"], slow)
    eventlet.sleep(0)
    gathering.stop()
    gathering(["b"], slow)
    eventlet.sleep(0.15)
    assert ran == []

    running = InBackground("test")
    running(["c"], slow)
    while not ran:
        eventlet.sleep(0.005)
    running(["d"], slow)  # would make the next run
    running.stop()
    assert ran == [("started", ["c"]), ("finished", ["c"])]
    eventlet.sleep(0.15)
    assert ran == [("started", ["c"]), ("finished", ["c"])]

    ran.clear()
    spawned = []  # the container's managed threads, which it kills after the stop

    def spawn(run):
        spawned.append(eventlet.spawn(run))
        return spawned[-1]

    unwaited = InBackground("test", spawn=spawn)
    unwaited(["e"], slow)
    while not ran:
        eventlet.sleep(0.005)
    unwaited.stop(wait_for_the_run=False)
    assert ran == [("started", ["e"])]
    spawned[0].kill()
    assert ran == [("started", ["e"])]
