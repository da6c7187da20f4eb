"""AIMD concurrency and the circuit breaker, driven by an injected clock."""

import anyio
import pytest

import polytask as pt
from polytask import CircuitOpenError
from polytask.concurrency import AdaptiveConcurrency, CircuitBreaker
from polytask.testing import FakeClock

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


def test_rising_latency_is_an_overload_signal():
    clock = FakeClock()
    ac = AdaptiveConcurrency(50, initial=50, clock=clock)
    for _ in range(40):
        ac.on_success(0.1)
    for _ in range(60):
        clock.advance(1)
        ac.on_success(2.0)  # 20× the best: the server queues our calls
    assert ac.decreases >= 1 and ac.limit < 50


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
