import anyio
import pytest

from polytask import ConfigurationError, RateLimiter, RequestTooLargeError
from polytask.limits import TokenBucket
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio


def test_bucket_starts_full_and_refills_continuously():
    bucket = TokenBucket(600, now=0.0)  # 10 per second
    assert bucket.level(0.0) == 600
    bucket.charge(600, 0.0)
    assert bucket.level(0.0) == 0
    assert bucket.level(1.5) == pytest.approx(15)
    assert bucket.wait_time(30, 1.5) == pytest.approx(1.5)
    assert bucket.level(1000.0) == 600  # never above capacity


def test_bucket_rejects_non_positive_limit():
    with pytest.raises(ConfigurationError):
        TokenBucket(0, now=0.0)


async def test_acquire_waits_exactly_for_refill():
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=None, clock=clock)  # 1 request per second, 60 at once
    for _ in range(60):
        await limiter.acquire(0)
    assert clock.time == 0.0
    await limiter.acquire(0)
    assert clock.time == pytest.approx(1.0)


async def test_tpm_reservation_and_settle():
    clock = FakeClock()
    limiter = RateLimiter(tpm=6000, clock=clock)  # 100 tokens per second
    reservation = await limiter.acquire(5000)
    # real prompt 300 instead of estimated 4000 (+1000 max tokens): 3700 tokens come back
    limiter.settle(reservation, prompt_tokens=300, completion_tokens=20, max_tokens=1000)
    assert limiter.tokens.level(clock.now()) == pytest.approx(6000 - 1300)
    limiter.settle(reservation, prompt_tokens=300, completion_tokens=20, max_tokens=1000)  # idempotent
    assert limiter.tokens.level(clock.now()) == pytest.approx(6000 - 1300)


async def test_usage_accounting_settles_completion_tokens():
    limiter = RateLimiter(tpm=6000, clock=FakeClock(), accounting="usage")
    reservation = await limiter.acquire(5000)
    limiter.settle(reservation, prompt_tokens=300, completion_tokens=20, max_tokens=1000)
    assert limiter.tokens.level(0.0) == pytest.approx(6000 - 320)


async def test_call_larger_than_tpm_fails_fast():
    limiter = RateLimiter(tpm=1000, clock=FakeClock())
    with pytest.raises(RequestTooLargeError) as info:
        await limiter.acquire(1001)
    assert info.value.tokens == 1001 and "1000" in str(info.value)


async def test_pause_holds_every_caller_until_it_ends():
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, clock=clock)
    limiter.pause(2.5)
    limiter.pause(1.0)  # never shortens
    await limiter.acquire(0)
    assert clock.time == pytest.approx(2.5)


async def test_waiters_are_served_first_in_first_out():
    clock = FakeClock()
    limiter = RateLimiter(tpm=600, clock=clock)  # 10 tokens per second
    await limiter.acquire(600)
    order = []

    async def call(name, tokens):
        await limiter.acquire(tokens)
        order.append((name, round(clock.now(), 6)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "big", 500)
        await anyio.lowlevel.checkpoint()
        tg.start_soon(call, "small", 10)
    # the small call does not overtake the big one, and each waits only for its own refill
    assert order == [("big", 50.0), ("small", 51.0)]
