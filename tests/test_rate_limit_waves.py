"""After a 429 pause the calls that waited go out paced, not in a second wave; a short-window RPM gets no burst.

The server is the simulator's own rate limiter (:class:`~polytask.testing.ratelimit.ServerRateLimiter`: its buckets,
its 429 messages and headers) answering through an in-process transport, so the server and the client read one
virtual clock at the same instants: deterministic, and no sleeps. Each 429 is recorded with its arrival time. These
tests fail on a limiter that only pauses (the waiters then go at once into the server's empty bucket) and on one that
ignores a short window (a full minute's bucket opens with a burst the server refuses).
"""

import contextvars
import json

import anyio.lowlevel
import httpx2
import pytest

import polytask as pt
from polytask.testing.clock import FakeClock
from polytask.testing.ratelimit import ServerRateLimiter

pytestmark = pytest.mark.anyio

SENT_AT: contextvars.ContextVar[float] = contextvars.ContextVar("sent_at")  # when the limiter let the call go
LATENCY = 200  # scheduler turns an answer takes (no virtual time passes): 64 calls start before the first answer
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": '{"label": "neutral", "score": 0}'},
        }
    ],
    "usage": {"prompt_tokens": 17, "completion_tokens": 9, "total_tokens": 26},
}


class Server:
    """An OpenAI-shaped server in front of a ServerRateLimiter; ``refused`` holds (arrival, wait) per 429."""

    def __init__(self, clock, *, rpm, headers=True, **limiter):
        self.clock = clock
        self.limiter = ServerRateLimiter(rpm, None, clock.now, **limiter)
        self.headers = headers
        self.refused: list[tuple[float, float]] = []
        self.answered = 0

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        decision = self.limiter.check(100 + body.get("max_completion_tokens", 0), "m")
        headers = dict(decision.headers) if self.headers else {}
        if decision.allowed:
            self.answered += 1
            for _ in range(LATENCY):  # every other call gets its turn before this answer: calls overlap
                await anyio.lowlevel.checkpoint()
            return httpx2.Response(200, json=ANSWER, headers=headers)
        self.refused.append((SENT_AT.get(), decision.retry_after))
        if self.headers:
            headers["retry-after-ms"] = str(int(decision.retry_after * 1000) + 1)
        error = {"message": decision.message, "type": "requests", "param": None, "code": "rate_limit_exceeded"}
        return httpx2.Response(429, json={"error": error}, headers=headers)

    def after_first_pause(self) -> list[float]:
        """Arrival times of the 429s that came after the first 429's wait ended: the second wave."""
        first, wait = self.refused[0]
        return [at for at, _ in self.refused if at > first + wait + 1e-9]


def orchestrator(server, clock, http, **kwargs):
    """An orchestrator whose calls carry the virtual time the limiter let them go (``SENT_AT``): the fake clock jumps
    by other calls' backoffs while a request is on its way, which real time does not."""
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(server.handle))
    backend = pt.OpenAIBackend("m", base_url="http://test/v1", api_key="sk-test-123456", http_client=client, http=http)
    retry = pt.RetryPolicy(attempts=20, wait_jitter=0)
    orch = pt.Orchestrator(backend, [pt.Sentiment()], clock=clock, max_concurrency=64, retry=retry, **kwargs)
    acquire = orch.limiter.acquire

    async def stamped(tokens):
        reservation = await acquire(tokens)
        SENT_AT.set(clock.now())  # seen by the transport: it runs in this call's task
        return reservation

    orch.limiter.acquire = stamped
    return orch


@pytest.fixture(params=["httpx2", "sdk"])
def http(request):
    return request.param


@pytest.mark.parametrize(
    ("headers", "kwargs"),
    [
        (True, {"rpm": 600, "learn_limits": False, "adaptive_concurrency": False}),  # the limit is known
        (True, {}),  # learned from the x-ratelimit-* headers
        (False, {}),  # learned from the 429's message only: "Limit 600 … Please try again in 100ms"
    ],
    ids=["known", "learned-from-headers", "learned-from-message"],
)
async def test_no_second_wave_of_429s_after_a_pause(http, headers, kwargs):
    clock = FakeClock()
    server = Server(clock, rpm=600, headers=headers)  # 10 a second
    server.limiter.requests.charge(600, clock.now())  # another client on the key has just spent the minute
    async with orchestrator(server, clock, http, **kwargs) as orch:
        results = await orch.run([f"Sentence {i}." for i in range(80)])
    assert [r for r in results if r.partial] == [] and server.answered == 80
    assert server.refused and server.after_first_pause() == []  # the 80 waiting calls went out paced


@pytest.mark.parametrize("how", ["rate_window", "announced"])
async def test_a_short_window_server_gets_no_opening_burst(http, how):
    clock = FakeClock()
    server = Server(clock, rpm=600, rpm_window=1, announce_window=how == "announced")  # 10 at once, then 10 a second
    kwargs = {"rpm": 600, "learn_limits": how == "announced", "adaptive_concurrency": False}
    if how == "rate_window":
        kwargs["rate_window"] = 1
    async with orchestrator(server, clock, http, **kwargs) as orch:
        await orch.run([f"Sentence {i}." for i in range(40)])
    assert server.answered == 40 and server.refused == [] and orch.stats.rate_limited == 0
