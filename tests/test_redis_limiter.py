"""RedisRateLimiter against a real redis-server: one limit for every client of a key (the shared burst, the shared
pause, shared learning, FIFO reservations), Redis' clock not the clients', and a Redis that goes away."""

from __future__ import annotations

import time

import anyio
import pytest

import polytask as pt
from polytask import redis_limiter
from polytask.chat import RateLimitHeaders

pytestmark = pytest.mark.anyio


def limiter(server, **kwargs):
    kwargs.setdefault("key", "org-test")
    kwargs.setdefault("headroom", 0)
    return pt.RedisRateLimiter(server.url, **kwargs)


async def starts(limiters, calls_each, tokens=0):
    """Seconds after the start at which each acquisition got through, over all ``limiters`` at once (each limiter's
    connection and scripts made first, so the first round trip is not counted)."""
    for lim in limiters:  # connected, and a script loaded (a settle of 0 tokens changes nothing)
        await lim._run("settle", redis_limiter._SETTLE, "0")
    began = time.monotonic()
    times: list[float] = []

    async def one(lim):
        await lim.acquire(tokens)
        times.append(time.monotonic() - began)

    async with anyio.create_task_group() as tg:
        for lim in limiters:
            for _ in range(calls_each):
                tg.start_soon(one, lim)
    return sorted(times)


async def test_two_clients_share_one_burst_and_one_rate(redis_server):
    a, b = (limiter(redis_server, rpm=3000, window=0.5) for _ in range(2))  # 25 at once, then 50 a second
    times = await starts([a, b], 25)
    # by any time t, at most the burst of 25 and 50 a second since (two local limiters: 50 at once)
    assert all(t >= (i + 1 - 25) / 50 - 0.01 for i, t in enumerate(times)), times
    assert sum(1 for t in times if t - times[0] < 0.15) >= 20
    assert times[-1] < 0.5 + 0.4  # and no slower than the rate allows (with slack for a loaded machine)
    await a.aclose(), await b.aclose()


async def test_a_429_pause_holds_every_client_and_the_drained_bucket_resumes_paced(redis_server):
    a, b = limiter(redis_server, rpm=600), limiter(redis_server, rpm=600)  # 10 a second
    await a.pause(0.4, RateLimitHeaders(remaining_requests=0))  # client a met a 429 asking 0.4 s
    times = await starts([b], 3)
    assert 0.38 <= times[0] < 0.8  # client b waited the pause it never saw
    assert times[2] - times[0] >= 0.18  # then 10 a second, not a wave
    await a.aclose(), await b.aclose()


async def test_usage_settled_by_one_client_is_seen_by_the_other(redis_server):
    a, b = limiter(redis_server, tpm=6000), limiter(redis_server, tpm=6000)  # 100 tokens a second
    reservation = await a.acquire(5000)
    await a.settle(reservation, prompt_tokens=100, completion_tokens=0, max_tokens=100)  # used 200, not 5000
    times = await starts([b], 1, tokens=5000)
    assert times[0] < 0.1  # 5,800 left: b's 5,000 go at once
    big = await b.acquire(1000)  # 800 left now: 1,000 wait about 2 s
    started = time.monotonic()
    await b.settle(big, prompt_tokens=1, completion_tokens=0, max_tokens=1)
    assert time.monotonic() - started < 0.5
    await a.aclose(), await b.aclose()


async def test_limits_learned_by_one_client_bind_the_others(redis_server):
    a, b = limiter(redis_server), limiter(redis_server)
    await a.observe(RateLimitHeaders(limit_requests=600, remaining_requests=0, limit_tokens=100_000))
    times = await starts([b], 2)
    assert b.rpm == 600 and b.tpm == 100_000
    assert 0.08 <= times[0] < 0.5 and times[1] - times[0] >= 0.08  # 10 a second
    assert a.observe(RateLimitHeaders(limit_requests=14_400, reset_requests=3600.0)) is None  # per day: not RPM
    await b.acquire(0)
    assert b.rpm == 600
    await a.aclose(), await b.aclose()


async def test_a_call_larger_than_the_tpm_fails_fast(redis_server):
    lim = limiter(redis_server, tpm=1000)
    with pytest.raises(pt.RequestTooLargeError):
        await lim.acquire(1001)
    await lim.aclose()


async def test_the_clients_clocks_do_not_matter(redis_server):
    class Skewed(pt.MonotonicClock):  # five minutes ahead
        def now(self):
            return super().now() + 300.0

    a = limiter(redis_server, rpm=3000, window=0.5, clock=Skewed())
    b = limiter(redis_server, rpm=3000, window=0.5)
    times = await starts([a, b], 25)
    assert all(t >= (i + 1 - 25) / 50 - 0.01 for i, t in enumerate(times)), times
    assert times[-1] < 0.5 + 0.4
    await a.aclose(), await b.aclose()


async def test_redis_gone_is_a_clear_error_or_with_fallback_a_local_share(redis_server):
    strict = limiter(redis_server, rpm=600, timeout=0.5)
    lenient = limiter(redis_server, rpm=600, timeout=0.5, fallback_share=0.5, retry_every=0.2)
    await strict.acquire(0)
    redis_server.stop()
    with pytest.raises(pt.LimiterUnavailableError) as info:
        await strict.acquire(0)
    assert "org-test" in str(info.value) and str(redis_server.port) in str(info.value)
    await lenient.acquire(0)  # goes on locally under 300 RPM
    assert lenient._fallback is not None and lenient._fallback.rpm == 300
    redis_server.start()
    await anyio.sleep(0.25)
    await lenient.acquire(0)
    assert lenient._fallback is None  # back on the shared limit
    await strict.aclose(), await lenient.aclose()


async def test_two_orchestrators_on_one_key_draw_no_429s_from_a_short_window_server(redis_server, simulator):
    sim = simulator(rpm=600, rpm_window=1)  # 10 at once, then 10 a second

    async def run(lim):
        backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="sk-test-123456")
        async with pt.Orchestrator(backend, [pt.Sentiment()], limiter=lim, max_concurrency=32) as orch:
            return await orch.run([f"Sentence {i}." for i in range(15)])

    shared = [limiter(redis_server, rpm=600, window=1, headroom=0.05) for _ in range(2)]
    done = []

    async def run_into(lim):
        done.append(await run(lim))

    async with anyio.create_task_group() as tg:
        for lim in shared:
            tg.start_soon(run_into, lim)
    assert len(done) == 2 and all(not r.partial for run_results in done for r in run_results)
    assert sim.stats.outcomes.get("rate_limited", 0) == 0 and sim.stats.outcomes.get("ok", 0) == 30
    for lim in shared:
        await lim.aclose()


async def test_redis_stopped_mid_run_stops_the_run_keeping_the_work_done(redis_server, simulator):
    sim = simulator(latency=0.01)
    lim = limiter(redis_server, rpm=6000, timeout=0.5)
    backend = pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="sk-test-123456")
    seen = []

    def on_document(result):
        seen.append(result)
        if len(seen) == 5:
            redis_server.stop()

    async with pt.Orchestrator(
        backend, [pt.Sentiment()], limiter=lim, max_concurrency=2, on_document=on_document
    ) as orch:
        with pytest.raises(pt.LimiterUnavailableError) as info:
            await orch.run([f"Sentence {i}." for i in range(50)])
    kept = info.value.results
    assert len(kept) >= 5 and all(not r.partial for r in kept[:5])
    assert sim.stats.outcomes.get("ok", 0) < 50  # nothing sent without the limit
    await lim.aclose()


async def test_the_fallback_keeps_the_short_window_and_a_password_is_never_shown():
    from polytask.testing.clock import FakeClock

    clock = FakeClock()
    url = "redis://127.0.0.1:1/0?password=s3cret-pw"  # nothing listens on port 1
    lim = pt.RedisRateLimiter(url, key="fb", rpm=600, window=1, headroom=0, fallback_share=0.5, clock=clock)
    times = []
    for _ in range(10):
        await lim.acquire(0)
        times.append(round(clock.now(), 6))
    assert times[:5] == [0.0] * 5 and times[5:] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 5 at once, 5 a second
    strict = pt.RedisRateLimiter(url, key="fb", rpm=600, timeout=0.5)
    with pytest.raises(pt.LimiterUnavailableError) as info:
        await strict.acquire(0)
    assert "s3cret" not in str(info.value) and "redis://127.0.0.1:1/0" in str(info.value)
    with pytest.raises(pt.ConfigurationError, match="cannot be used") as bad:
        pt.RedisRateLimiter("http://user:s3cret@example/0", key="fb")
    assert "s3cret" not in str(bad.value)
    await lim.aclose(), await strict.aclose()
