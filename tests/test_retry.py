import random

import anyio
import pytest

from polytask import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    LengthLimitError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    RefusalError,
    RequestTooLargeError,
    RetryPolicy,
    ServerError,
    UnprocessableEntityError,
)
from polytask.retry import is_retryable
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "error",
    [
        RateLimitError("slow down", status_code=429),
        ServerError("boom", status_code=500),
        ServerError("timeout", status_code=408),
        ServerError("conflict", status_code=409),
        APIConnectionError("reset"),
        MalformedResponseError("bad json"),
    ],
)
def test_transient_errors_are_retryable(error):
    assert is_retryable(error)


@pytest.mark.parametrize(
    "error",
    [
        BadRequestError("bad", status_code=400),
        AuthenticationError("key", status_code=401),
        PermissionDeniedError("no", status_code=403),
        NotFoundError("model", status_code=404),
        UnprocessableEntityError("no", status_code=422),
        QuotaExceededError("pay", status_code=429, code="insufficient_quota"),
        RefusalError("no"),
        LengthLimitError("cut"),
        RequestTooLargeError(10, 5),
    ],
)
def test_permanent_errors_are_not_retryable(error):
    assert not is_retryable(error)


def test_backoff_grows_and_never_undercuts_retry_after():
    policy = RetryPolicy(wait_initial=0.5, wait_max=4, wait_jitter=0)
    assert [policy.backoff(n, None) for n in (1, 2, 3, 4, 5)] == [0.5, 1, 2, 4, 4]
    error = RateLimitError("slow", status_code=429, retry_after=7.5)
    assert policy.backoff(1, error) == 7.5
    assert policy.backoff(5, RateLimitError("slow", status_code=429, retry_after=0.1)) == 4


def test_jitter_stays_within_bounds():
    policy = RetryPolicy(wait_initial=1, wait_jitter=0.5)
    rng = random.Random(1)
    waits = [policy.backoff(1, None, rng) for _ in range(200)]
    assert min(waits) >= 1 and max(waits) <= 1.5 and len(set(waits)) > 100


async def test_retries_until_success_with_server_wait():
    clock = FakeClock()
    calls = []

    async def attempt():
        calls.append(clock.now())
        if len(calls) < 3:
            raise RateLimitError("slow", status_code=429, retry_after=2.0)
        return "ok"

    seen = []
    policy = RetryPolicy(wait_initial=0.1, wait_jitter=0)
    assert await policy.call(attempt, sleep=clock.sleep, on_retry=lambda e, w: seen.append(w)) == "ok"
    assert calls == [0.0, 2.0, 4.0] and seen == [2.0, 2.0]


async def test_non_retryable_error_is_raised_at_once():
    clock = FakeClock()
    calls = 0

    async def attempt():
        nonlocal calls
        calls += 1
        raise BadRequestError("bad", status_code=400)

    with pytest.raises(BadRequestError):
        await RetryPolicy().call(attempt, sleep=clock.sleep)
    assert calls == 1 and clock.sleeps == []


async def test_gives_up_after_attempts_and_reraises_last_error():
    clock = FakeClock()
    calls = 0

    async def attempt():
        nonlocal calls
        calls += 1
        raise ServerError(f"boom {calls}", status_code=503)

    with pytest.raises(ServerError, match="boom 3"):
        await RetryPolicy(attempts=3, wait_jitter=0).call(attempt, sleep=clock.sleep)
    assert calls == 3 and len(clock.sleeps) == 2


async def test_cancellation_is_never_retried():
    calls = 0

    async def attempt():
        nonlocal calls
        calls += 1
        await anyio.sleep(10)

    with anyio.move_on_after(0.05):
        await RetryPolicy().call(attempt, sleep=anyio.sleep)
    assert calls == 1


async def test_timeout_is_a_bound_no_wait_ends_past_it():
    clock = FakeClock()
    calls = []

    async def attempt():
        calls.append(clock.now())
        clock.advance(0.4)  # each attempt takes 0.4 s
        raise ServerError("boom", status_code=503)

    policy = RetryPolicy(attempts=50, timeout=1.0, wait_initial=0.1, wait_exp_base=1, wait_jitter=0)
    with pytest.raises(ServerError):
        await policy.call(attempt, sleep=clock.sleep, now=clock.now)
    # 0 → 0.4 + 0.1 → 0.9 + 0.1 would start a third attempt at 1.0 that ends at 1.4: not started
    assert calls == [0.0, pytest.approx(0.5)] and clock.time <= 1.0


async def test_retry_after_past_the_timeout_is_not_waited():
    clock = FakeClock()
    calls = 0

    async def attempt():
        nonlocal calls
        calls += 1
        raise RateLimitError("slow", status_code=429, retry_after=3.0)

    with pytest.raises(RateLimitError):
        await RetryPolicy(timeout=1.0).call(attempt, sleep=clock.sleep, now=clock.now)
    assert calls == 1 and clock.sleeps == []


@pytest.mark.parametrize("retry_after", [float("inf"), 1e9, 301.0])
async def test_retry_after_longer_than_max_retry_after_fails_at_once(retry_after):
    clock = FakeClock()
    calls = 0

    async def attempt():
        nonlocal calls
        calls += 1
        raise RateLimitError("slow", status_code=429, retry_after=retry_after)

    with pytest.raises(RateLimitError):
        await RetryPolicy().call(attempt, sleep=clock.sleep, now=clock.now)
    assert calls == 1 and clock.sleeps == []
    if retry_after == float("inf"):
        return  # never waited, whatever max_retry_after says
    # within it, the server's wait is honoured
    calls = 0
    with pytest.raises(RateLimitError):
        await RetryPolicy(attempts=2, max_retry_after=retry_after).call(attempt, sleep=clock.sleep, now=clock.now)
    assert calls == 2 and clock.sleeps == [retry_after]


async def test_attempt_running_at_the_timeout_is_cancelled():
    calls = 0

    async def attempt():
        nonlocal calls
        calls += 1
        await anyio.sleep_forever()

    with anyio.fail_after(5):
        with pytest.raises(APITimeoutError, match=r"timeout of 0\.05 s"):
            await RetryPolicy(timeout=0.05).call(attempt, sleep=anyio.sleep)
    assert calls == 1
