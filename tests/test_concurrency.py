"""AIMD concurrency and the circuit breaker, driven by an injected clock."""

import collections
import heapq
import itertools
import math
import random

import anyio
import pytest

import polytask as pt
from polytask import CircuitOpenError
from polytask.concurrency import AdaptiveConcurrency, CircuitBreaker
from polytask.testing import FakeClock
from polytask.testing.pytest_plugin import simulator as simulator  # the plugin's fixture, if not installed

pytestmark = pytest.mark.anyio


def test_slow_start_doubles_then_additive_increase():
    ac = AdaptiveConcurrency(64, initial=4, clock=FakeClock())
    assert ac.limit == 4 and ac.limiter.total_tokens == 4
    for _ in range(4):
        ac.on_success(0.1)
    assert ac.limit == 8  # one round of 4 successes doubled it
    for _ in range(56):
        ac.on_success(0.1)
    assert ac.limit == 64  # capped at the maximum


def test_random_faults_do_not_shrink_but_repeated_overload_does():
    clock = FakeClock()
    ac = AdaptiveConcurrency(32, initial=32, clock=clock)
    for i in range(200):  # one 503 in 40 calls: noise, never 3 votes in a window of 20
        ac.on_overload() if i % 40 == 0 else ac.on_success(0.1)
    assert ac.limit == 32 and ac.decreases == 0
    for _ in range(3):
        ac.on_overload()
    assert ac.decreases == 1 and ac.limit == int(32 * 0.9)


async def test_decrease_lands_near_calls_in_flight():
    clock = FakeClock()
    ac = AdaptiveConcurrency(128, initial=128, clock=clock)
    holders = []

    async def hold():
        async with ac.limiter:
            holders.append(1)
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        for _ in range(17):  # a server with a hidden cap of 16 refuses the 17th call in flight
            tg.start_soon(hold)
        await anyio.wait_all_tasks_blocked()
        for _ in range(3):
            ac.on_overload()
        assert ac.limit == int(17 * 0.9)  # one step from 128 to about the cap
        tg.cancel_scope.cancel()


def test_one_decrease_per_round_trip():
    clock = FakeClock()
    ac = AdaptiveConcurrency(100, initial=100, clock=clock)
    for _ in range(25):
        ac.on_success(0.5)
    for _ in range(9):
        ac.on_overload()
    assert ac.decreases == 1  # a burst of failures within one round trip counts once
    clock.advance(0.6)
    for _ in range(3):
        ac.on_overload()
    assert ac.decreases == 2


def drive(ac, clock, calls, latency, *, slots=None, sigma=0.0, seed=0, slower_at=None):
    """Send ``calls`` calls through ``ac`` (as many at once as its limit allows) in virtual time and tell it each
    answer's latency. The server works on ``slots`` calls at a time and queues the rest, first in first out, each
    taking ``latency`` seconds; with ``slots`` None it works on every call at once, each taking a lognormal draw
    (median ``latency``, ``sigma``), three times as long from ``slower_at`` seconds on. Returns one
    ``(time, latency, limit, calls at the server)`` per answer."""
    rng = random.Random(seed)
    events = []  # (time, order, kind, sent at)
    order = itertools.count()
    sent = in_flight = busy = 0
    queue = collections.deque()
    answers = []

    def service():
        slower = 3.0 if slower_at is not None and clock.time >= slower_at else 1.0
        return slower * latency * math.exp(sigma * rng.gauss(0.0, 1.0))

    def send():
        nonlocal sent, in_flight
        while sent < calls and in_flight < ac.limiter.total_tokens:
            sent += 1
            in_flight += 1
            if slots is None:
                heapq.heappush(events, (clock.time + service(), next(order), "answer", clock.time))
            else:
                queue.append(clock.time)
                serve()

    def serve():
        nonlocal busy
        while busy < slots and queue:
            busy += 1
            heapq.heappush(events, (clock.time + service(), next(order), "served", queue.popleft()))

    send()
    while events:
        clock.time, _, kind, sent_at = heapq.heappop(events)
        if kind == "served":
            busy -= 1
            serve()
        in_flight -= 1
        ac.on_success(clock.time - sent_at)
        answers.append((clock.time, clock.time - sent_at, ac.limit, in_flight + 1))
        send()
    return answers


@pytest.mark.parametrize(("slots", "maximum"), [(1, 64), (4, 64), (1, 8)])
def test_latency_alone_finds_what_a_queueing_server_serves_at_once(slots, maximum):
    # a local server working on `slots` requests at a time, 0.5 s each, queueing the rest: no 429, no 503
    clock = FakeClock()
    ac = AdaptiveConcurrency(maximum, clock=clock)
    answers = drive(ac, clock, 600, 0.5, slots=slots)
    capacity = slots / 0.5  # answers a second
    assert len(answers) / clock.time >= 0.95 * capacity  # the server was kept busy
    assert max(latency for _, latency, _, _ in answers) <= 0.5 * maximum / slots  # never queued past the limit
    assert max(latency for _, latency, _, _ in answers) < 60  # OpenAIBackend's timeout: no call timed out
    late = answers[len(answers) // 3 :]
    assert ac.latency_decreases >= 1
    assert max(at_server for *_, at_server in late) <= 2 * slots + 3  # converged near what it serves at once
    assert max(latency for _, latency, _, _ in late) <= (2 * slots + 3) * 0.5 / slots
    assert min(limit for _, _, limit, _ in late) >= slots  # and never under it for long


@pytest.mark.parametrize("sigma", [0.3, 0.5, 1.0])
def test_latency_noise_on_a_parallel_server_does_not_shrink_the_limit(sigma):
    clock = FakeClock()
    ac = AdaptiveConcurrency(64, clock=clock)
    answers = drive(ac, clock, 3000, 0.2, sigma=sigma, seed=1)
    assert ac.latency_decreases == 0 and ac.decreases == 0
    assert all(limit == 64 for _, _, limit, _ in answers[300:])


def test_a_server_slower_for_everyone_is_learned_not_chased():
    # latency triples at 5 s whatever the calls in flight: a probe at a lower limit finds it no faster, so the limit
    # goes back up and the baseline moves to the new latency
    clock = FakeClock()
    ac = AdaptiveConcurrency(64, clock=clock)
    answers = drive(ac, clock, 4000, 0.2, sigma=0.3, slower_at=5.0)
    assert ac.limit == 64 and ac.latency_decreases <= 1
    assert ac.baseline() == pytest.approx(0.6, rel=0.25)
    assert sum(limit == 64 for *_, limit, _ in answers[-2000:]) >= 1950


def test_latency_is_ignored_without_adaptation_or_a_measure():
    clock = FakeClock()
    off = AdaptiveConcurrency(8, decrease=1.0, clock=clock)
    drive(off, clock, 200, 0.5, slots=1)
    assert off.limit == 8 and off.decreases == 0
    unmeasured = AdaptiveConcurrency(64, clock=clock)
    for _ in range(200):
        clock.advance(0.5)
        unmeasured.on_success(0.0)  # a backend that does not time its calls
    assert unmeasured.limit == 64 and unmeasured.decreases == 0


async def test_loopback_simulator_serving_one_at_a_time(simulator):
    # the simulator's serve_at_once mode: one completion at a time, 20 ms each, the rest queued; polytask with the
    # default max_concurrency (64) must settle near 1 in flight from latency alone, with no error and no timeout
    sim = simulator(serve_at_once=1, latency=0.02)
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="sk-test", timeout=10)
    async with pt.Orchestrator(backend, [pt.Sentiment()]) as orch:
        first = await orch.run([f"Review {i}: fine." for i in range(120)])
        sim.stats.max_in_flight = sim.stats.in_flight
        second = await orch.run([f"Review {i}: good." for i in range(80)])
    pairs = [p for d in [*first, *second] for p in d.pairs]
    assert all(p.error is None for p in pairs) and len(pairs) == 200
    assert sim.stats.outcomes == {"ok": 200} and sim.stats.abandoned == 0
    assert orch.stats.retries == 0 and orch.concurrency.latency_decreases >= 1
    assert sim.stats.max_in_flight <= 5  # after convergence: near the 1 it serves at once (64 before)


def test_adaptation_off():
    ac = AdaptiveConcurrency(10, decrease=1.0, clock=FakeClock())
    for _ in range(10):
        ac.on_overload()
    assert ac.limit == 10 and ac.decreases == 0


async def test_breaker_opens_waits_probes_and_closes():
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown=2.0, clock=clock)
    for _ in range(3):
        await breaker.wait()
        breaker.on_failure()
    assert breaker.state == "open"
    probe = await breaker.wait()  # held for the cooldown, then let through as the probe
    assert probe and clock.time == pytest.approx(2.0) and breaker.state == "half-open"
    outcomes = []

    async def other():
        try:
            await breaker.wait()
            outcomes.append(("probe", clock.now()))
        except CircuitOpenError as error:
            outcomes.append(("failed", clock.now(), str(error)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await anyio.wait_all_tasks_blocked()
        assert outcomes == []  # only one probe at a time
        breaker.on_failure(pt.ServerError("old", status_code=500))  # a call sent before it opened: no verdict
        assert breaker.state == "half-open" and outcomes == []
        breaker.on_other()  # nor does another call's ending end the probe
        await anyio.wait_all_tasks_blocked()
        assert outcomes == []
        breaker.on_failure(pt.ServerError("boom", status_code=500), probe)  # the probe failed: open, twice as long
        assert breaker.state == "open"
    # the caller that waited for the probe fails at once instead of queueing behind the next probe
    assert outcomes == [
        (
            "failed",
            pytest.approx(2.0),
            "the server failed 5 calls in a row and the probe after a 2 s cooldown (last: ServerError: HTTP 500: boom)",
        )
    ]
    assert await breaker.wait() and clock.time == pytest.approx(6.0)  # the next probe: after 2 s + 4 s
    breaker.on_success()
    assert breaker.state == "closed" and await breaker.wait() == 0


async def test_breaker_says_when_it_opens_and_closes(caplog):
    caplog.set_level("WARNING", logger="polytask")
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, cooldown=2.0, clock=clock)
    for _ in range(2):
        breaker.on_failure(pt.APIConnectionError("connection refused"))
    probe = await breaker.wait()
    breaker.on_failure(pt.APIConnectionError("connection refused"), probe)
    probe = await breaker.wait()
    breaker.on_success()
    breaker.on_success()  # already closed: nothing more to say
    assert [r.getMessage() for r in caplog.records] == [
        "circuit open: the server failed 2 calls in a row; calls wait 2 s, then one probe "
        "(last: APIConnectionError: connection refused)",
        "circuit open: the probe failed, 2 s after it opened; calls wait 4 s, then one probe "
        "(last: APIConnectionError: connection refused)",
        "circuit closed: the server answers again",
    ]


async def test_a_long_outage_is_logged_every_ten_minutes_not_every_probe(caplog):
    caplog.set_level("WARNING", logger="polytask")
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=2.0, max_cooldown=60.0, clock=clock)
    breaker.on_failure(pt.APIConnectionError("refused"))
    while clock.now() < 3600:  # an hour down: probes every 60 s once the cooldown stops growing
        probe = await breaker.wait()
        breaker.on_failure(pt.APIConnectionError("refused"), probe)
    assert breaker.outage() >= 3600
    lines = [r.getMessage() for r in caplog.records]
    assert 10 <= len(lines) <= 14  # opening, 5 growing cooldowns, then one line per 10 minutes (≈ 60 probes)


async def test_breaker_probe_that_says_nothing_lets_the_next_one_probe():
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=clock)
    breaker.on_failure()
    probe = await breaker.wait()
    breaker.on_other(probe)  # the probe was cancelled
    assert await breaker.wait() == probe + 1  # the next caller probes instead of waiting forever
    assert breaker.state == "half-open"
