import anyio
import pytest

from polytask import ConfigurationError, RateLimiter, RequestTooLargeError
from polytask.chat import RateLimitHeaders
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
    limiter = RateLimiter(rpm=60, tpm=None, clock=clock, headroom=0)  # 1 request per second, 60 at once
    for _ in range(60):
        await limiter.acquire(0)
    assert clock.time == 0.0
    await limiter.acquire(0)
    assert clock.time == pytest.approx(1.0)


async def test_tpm_reservation_and_settle():
    clock = FakeClock()
    limiter = RateLimiter(tpm=6000, clock=clock, headroom=0)  # 100 tokens per second
    reservation = await limiter.acquire(5000)
    # real prompt 300 instead of estimated 4000 (+1000 max tokens): 3700 tokens come back
    limiter.settle(reservation, prompt_tokens=300, completion_tokens=20, max_tokens=1000)
    assert limiter.tokens.level(clock.now()) == pytest.approx(6000 - 1300)
    limiter.settle(reservation, prompt_tokens=300, completion_tokens=20, max_tokens=1000)  # idempotent
    assert limiter.tokens.level(clock.now()) == pytest.approx(6000 - 1300)


async def test_usage_accounting_settles_completion_tokens():
    limiter = RateLimiter(tpm=6000, clock=FakeClock(), accounting="usage", headroom=0)
    reservation = await limiter.acquire(5000)
    limiter.settle(reservation, prompt_tokens=300, completion_tokens=20, max_tokens=1000)
    assert limiter.tokens.level(0.0) == pytest.approx(6000 - 320)


async def test_call_larger_than_tpm_fails_fast():
    limiter = RateLimiter(tpm=1000, clock=FakeClock(), headroom=0)
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
    limiter = RateLimiter(tpm=600, clock=clock, headroom=0)  # 10 tokens per second
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


async def test_headroom_delays_once_and_keeps_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, clock=clock, headroom=0.01)  # 10 per second, 6 requests kept back
    for _ in range(594):
        await limiter.acquire(0)
    assert clock.time == 0.0
    await limiter.acquire(0)
    assert clock.time == pytest.approx(0.1)
    for _ in range(100):
        await limiter.acquire(0)
    assert clock.time == pytest.approx(10.1)  # then 10 per second, the full rate


async def test_learning_sends_one_probe_then_follows_the_headers():
    from polytask.backends.base import RateLimitHeaders

    clock = FakeClock()
    limiter = RateLimiter(clock=clock, learn=True, headroom=0)
    await limiter.acquire(100)  # the probe goes at once
    started = []

    async def call(i):
        await limiter.acquire(100)
        started.append((i, clock.now()))

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(call, i)
        await anyio.lowlevel.checkpoint()
        assert started == []  # everyone waits for the probe's answer
        limiter.observe(
            RateLimitHeaders(limit_requests=60, remaining_requests=2, limit_tokens=1000, remaining_tokens=900)
        )
    assert limiter.rpm == 60 and limiter.tpm == 1000
    # 2 requests were left: two go at once, the third waits one second for a refill
    assert started == [(0, 0.0), (1, 0.0), (2, pytest.approx(1.0))]


async def test_a_first_call_that_never_reaches_the_server_hands_the_probe_on():
    # the first call (the probe) is cancelled while it waits in the limiter: the calls waiting for its answer
    # must not wait for good; the next one goes as the new probe
    limiter = RateLimiter(clock=FakeClock(), learn=True)
    probe = anyio.CancelScope()
    got = []

    async def first():
        with probe:
            await limiter.acquire(10)

    async def second():
        await limiter.acquire(10)
        got.append("second")

    with anyio.fail_after(5):  # the old limiter waited for good here
        async with anyio.create_task_group() as tg:
            await limiter._lock.acquire()  # held here, so the probe waits for it
            tg.start_soon(first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            assert got == []  # waiting for the probe's answer
            probe.cancel()
            await anyio.wait_all_tasks_blocked()
            limiter._lock.release()
    assert probe.cancelled_caught and got == ["second"] and limiter._probing


async def test_learned_limits_are_capped_by_configured_ones_and_resync():
    from polytask.backends.base import RateLimitHeaders

    clock = FakeClock()
    limiter = RateLimiter(rpm=100, clock=clock, learn=True, headroom=0)
    limiter.observe(RateLimitHeaders(limit_requests=500, limit_tokens=10_000, remaining_tokens=4_000))
    assert limiter.rpm == 100 and limiter.tpm == 10_000
    assert limiter.tokens.level(0.0) == 4_000  # the server said less is left: follow it
    limiter.observe(RateLimitHeaders(limit_tokens=20_000, remaining_tokens=9_000))
    assert limiter.tpm == 20_000 and limiter.tokens.level(0.0) == pytest.approx(9_000)


async def test_failed_probe_releases_the_waiters():
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, learn=True)
    await limiter.acquire(1)
    limiter.observe(None)  # the probe got no response; nothing learned, nobody stuck
    await limiter.acquire(1)
    assert limiter.rpm is None and limiter.tpm is None


async def test_waiting_call_fails_when_a_learned_tpm_shrinks_below_it():
    from polytask.backends.base import RateLimitHeaders

    class ShrinkingClock(FakeClock):
        async def sleep(self, seconds):  # while the call waits, a response teaches a smaller limit
            limiter.observe(RateLimitHeaders(limit_tokens=150, remaining_tokens=150))
            await super().sleep(seconds)

    limiter = RateLimiter(clock=ShrinkingClock(), learn=True, headroom=0)
    await limiter.acquire(100)
    limiter.observe(RateLimitHeaders(limit_tokens=12_000, remaining_tokens=0))
    with anyio.fail_after(5), pytest.raises(RequestTooLargeError) as info:
        await limiter.acquire(1000)  # used to wait for good: 1,000 tokens never fit a 150-token bucket
    assert info.value.tpm == 150


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rpm": 0}, "rpm"),
        ({"tpm": -5}, "tpm"),
        ({"rpm": float("nan")}, "rpm"),
        ({"tpm": float("inf")}, "tpm"),
        ({"rpm": 60, "headroom": 1.5}, "headroom"),
        ({"rpm": 60, "headroom": float("nan")}, "headroom"),
        ({"rpm": 60, "accounting": "tokens"}, "accounting"),
    ],
)
def test_bad_limiter_settings_name_themselves(kwargs, name):
    with pytest.raises(ConfigurationError, match=name):
        RateLimiter(**kwargs)


async def test_learned_tpm_shrink_fails_the_waiting_call_within_seconds_not_its_whole_wait():
    from polytask.backends.base import RateLimitHeaders

    class Clock(FakeClock):
        async def sleep(self, seconds):  # a response teaches a smaller limit while the call sleeps
            await super().sleep(seconds)
            limiter.observe(RateLimitHeaders(limit_tokens=6_000, remaining_tokens=0))

    clock = Clock()
    limiter = RateLimiter(clock=clock, learn=True, headroom=0)
    await limiter.acquire(100)
    limiter.observe(RateLimitHeaders(limit_tokens=60_000, remaining_tokens=0))  # 1,000 tokens per second
    with pytest.raises(RequestTooLargeError):
        await limiter.acquire(30_000)  # a 30 s wait at the old limit
    assert clock.now() <= 5.0  # it looked again after at most 5 s


async def _start_times(limiter, clock, calls, tokens=0):
    """When each of ``calls`` concurrent acquisitions got through, in virtual seconds."""
    times = []

    async def one():
        await limiter.acquire(tokens)
        times.append(round(clock.now(), 6))

    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(one)
    return times


async def test_calls_waiting_on_a_pause_resume_paced_not_all_at_once():
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, clock=clock, headroom=0)  # 10 a second; the bucket believes 600 are left
    limiter.pause(2.0)  # a 429 asked to wait 2 s: the server's bucket is empty now
    times = await _start_times(limiter, clock, 50)
    # one goes as the pause ends, then one per 0.1 s: the server's refill, not a wave of 50 at 2.0 s
    assert times[0] == pytest.approx(2.0)
    assert times == pytest.approx([2.0 + 0.1 * i for i in range(50)])


async def test_a_pause_empties_only_the_bucket_the_429_names():
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, tpm=60_000, clock=clock, headroom=0)
    limiter.pause(1.0, RateLimitHeaders(remaining_tokens=0))  # a TPM 429: requests were not the problem
    assert limiter.requests.level(clock.now()) == 600
    assert limiter.tokens.level(clock.now()) == pytest.approx(-1000)  # empty as the pause ends
    limiter.pause(1.0, RateLimitHeaders(remaining_requests=0))
    assert limiter.requests.level(clock.now()) == pytest.approx(1 - 10)


async def test_a_short_window_caps_the_burst_and_keeps_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(rpm=600, clock=clock, headroom=0, window=1)  # 10 at once, then 10 a second
    assert limiter.rpm == 600 and limiter.requests.capacity == 10
    times = await _start_times(limiter, clock, 30)
    assert times[:10] == [0.0] * 10
    assert times[10:] == pytest.approx([0.1 * i for i in range(1, 21)])


async def test_a_short_window_is_learned_from_ratelimit_policy():
    clock = FakeClock()
    limiter = RateLimiter(rpm=1200, clock=clock, headroom=0)
    limiter.observe(RateLimitHeaders(limit_requests=1200, remaining_requests=1199, window=1.0))
    assert limiter.window == 1.0 and limiter.requests.capacity == 20 and limiter.rpm == 1200
    told = RateLimiter(rpm=1200, clock=clock, headroom=0, window=10)
    told.observe(RateLimitHeaders(window=1.0))
    assert told.requests.capacity == 200  # a configured window is kept


@pytest.mark.parametrize("window", [0, -1, 61, float("nan"), "10"])
def test_a_bad_window_is_refused_by_name(window):
    with pytest.raises(ConfigurationError, match="window"):
        RateLimiter(rpm=60, window=window)  # type: ignore[arg-type]


def test_a_per_day_limit_in_the_headers_is_not_learned_as_per_minute():
    """Groq's x-ratelimit-*-requests count requests per day: their reset is hours, not under a minute."""
    limiter = RateLimiter(clock=FakeClock(), learn=True)
    limiter.observe(
        RateLimitHeaders(
            limit_requests=14400, remaining_requests=14399, reset_requests=6.0, limit_tokens=6000, remaining_tokens=5900
        )
    )
    assert limiter.rpm == 14400  # a reset under a minute: per minute
    daily = RateLimiter(clock=FakeClock(), learn=True)
    daily.observe(
        RateLimitHeaders(limit_requests=14400, remaining_requests=14399, reset_requests=179.56, limit_tokens=6000)
    )
    assert daily.rpm is None and daily.tpm == 6000
