"""The whole pipeline against the simulator over loopback: every failure kind ends as an answer or a typed error."""

import json
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import polytask as pt
import polytask._http
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

DATA = Path(__file__).parent / "data"
TEXTS = [
    "Ann lives in Rome. She loves it!",
    "这是一段文本。它描述了人工智能的应用场景。",
    "One more. And another. Done.",
]


def backend(sim, **kwargs):
    kwargs.setdefault("timeout", 5.0)
    return pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="test-key-123456", **kwargs)


def orchestrator(sim, tasks=None, clock=None, **kwargs):
    kwargs.setdefault("retry", pt.RetryPolicy(attempts=4, wait_jitter=0))
    return pt.Orchestrator(
        backend(sim, timeout=kwargs.pop("timeout", 5.0)),
        tasks or [pt.Sentiment(), pt.Entities()],
        clock=clock or FakeClock(),
        **kwargs,
    )


def errors_of(results):
    return sorted({p.error.type for r in results for p in r.pairs if p.error})


async def test_run_returns_every_document_in_input_order(simulator):
    sim = simulator(seed=1)
    async with orchestrator(sim) as orch:
        results = await orch.run(TEXTS)
    assert [r.id for r in results] == ["0", "1", "2"]
    assert [len(r.sentences) for r in results] == [2, 2, 3]
    zh = results[1]
    assert [s.text for s in zh.sentences] == ["这是一段文本。", "它描述了人工智能的应用场景。"]
    assert zh.results["sentiment"].label in {"positive", "negative", "neutral", "mixed"}
    assert zh.results["sentiment"].coverage == 1.0
    for r in results:
        assert not r.partial and len(r.pairs) == 2 * len(r.sentences)
        assert r.usage.requests == len(r.pairs) and r.usage.prompt_tokens > 0
        for s in r.sentences:
            assert r.text[s.start : s.end] == s.text


async def test_stream_yields_each_document_once_as_it_completes(simulator):
    sim = simulator(latency=0.01)
    docs = [(f"d{i}", f"Sentence {i} is here. And one more.") for i in range(20)]
    seen = []
    async with orchestrator(sim, max_concurrency=8) as orch:
        async for result in orch.stream(docs):
            seen.append(result.id)
        ordered = [r.id async for r in orch.stream(docs, ordered=True)]
    assert sorted(seen) == sorted(d for d, _ in docs)
    assert ordered == [d for d, _ in docs]


async def test_async_iterable_input_and_document_shapes(simulator):
    sim = simulator()

    async def source():
        yield "plain text."
        yield ("my-id", "a pair.")
        yield pt.Document(id="doc", text="a document.", metadata={"k": 1})
        yield {"id": 7, "text": "a dict.", "lang": "en"}
        yield "   "
        yield ["from-json", "a list, as JSON decodes a pair."]

    async with orchestrator(sim) as orch:
        results = [r async for r in orch.stream(source(), ordered=True)]
    assert [r.id for r in results] == ["0", "my-id", "doc", "7", "4", "from-json"]
    assert results[2].metadata == {"k": 1} and results[3].metadata == {"lang": "en"}
    assert results[4].sentences == [] and not results[4].partial


async def test_bad_input_item_names_it_and_keeps_earlier_work(simulator):
    sim = simulator()
    got = []
    async with orchestrator(sim) as orch:
        with pytest.raises(pt.InputError, match="document 2"):
            async for r in orch.stream(["Fine.", "Also fine.", None, "Never read."]):
                got.append(r.id)
    assert sorted(got) == ["0", "1"]


def _docs_then(error, n=10):
    for i in range(n):
        yield f"Document {i}. It has two sentences."
    raise error


async def _slow_answer(request):
    await anyio.sleep(0.01)
    return {"label": "neutral", "score": 0.0}


async def test_documents_iterable_that_raises_keeps_every_document_taken_in():
    got = []
    async with pt.Orchestrator(pt.FunctionBackend(_slow_answer), [pt.Sentiment()], max_concurrency=4) as orch:
        with pytest.raises(OSError, match="disk read failed"):  # the error itself, not an ExceptionGroup
            async for r in orch.stream(_docs_then(OSError("disk read failed"))):
                got.append(r.id)
        assert sorted(got, key=int) == [str(i) for i in range(10)]
        with pytest.raises(OSError, match="disk read failed"):
            await orch.run(_docs_then(OSError("disk read failed")))
        assert orch.stats.documents_done == 20 and orch.stats.pairs_done == 40


async def test_segmenter_that_raises_stops_the_run_after_earlier_documents():
    def segmenter(text, max_chars):
        if "bad" in text:
            raise ValueError("cannot segment")
        return pt.segment(text, max_chars=max_chars)

    got = []
    async with pt.Orchestrator(pt.FunctionBackend(_slow_answer), [pt.Sentiment()], segmenter=segmenter) as orch:
        with pytest.raises(ValueError, match="cannot segment"):
            async for r in orch.stream(["One. Two.", "Three.", "A bad one.", "Never read."]):
                got.append(r.id)
    assert sorted(got) == ["0", "1"]


@pytest.mark.parametrize("fault", ["rate_limit", "server_error", "bad_gateway", "unavailable", "reset", "malformed"])
async def test_transient_faults_are_retried_to_success(simulator, fault):
    sim = simulator(faults={fault: 0.3}, seed=3)
    clock = FakeClock()
    async with orchestrator(sim, clock=clock, retry=pt.RetryPolicy(attempts=10, wait_jitter=0)) as orch:
        results = await orch.run(TEXTS * 3)
    assert errors_of(results) == []
    assert sim.stats.outcomes.get(fault, 0) > 0
    assert orch.stats.retries == sum(v for k, v in sim.stats.outcomes.items() if k != "ok")
    if fault == "rate_limit":  # the server's Retry-After (1 s) is honoured, in virtual time
        assert orch.stats.rate_limited > 0 and min(clock.sleeps) >= 1.0


async def test_hang_past_timeout_is_retried(simulator):
    sim = simulator(faults={"hang": 0.5}, hang_seconds=30, seed=2)
    async with orchestrator(sim, timeout=0.3, retry=pt.RetryPolicy(attempts=8, wait_jitter=0)) as orch:
        results = await orch.run(["One hang maybe. Another one."])
    assert errors_of(results) == [] and sim.stats.outcomes.get("hang", 0) > 0


async def test_exhausted_retries_end_as_typed_errors_in_partial_documents(simulator):
    sim = simulator(faults={"server_error": 1.0})
    async with orchestrator(sim, retry=pt.RetryPolicy(attempts=3, wait_jitter=0)) as orch:
        results = await orch.run(TEXTS)
    assert len(results) == 3 and all(r.partial for r in results)
    pairs = [p for r in results for p in r.pairs]
    # the last attempt's error: the server's 500, or (once the breaker opened and a probe failed) CircuitOpenError,
    # an attempt that never reached the server (``attempts`` counts the requests sent)
    assert {p.error.type for p in pairs} <= {"ServerError", "CircuitOpenError"}
    assert all(1 <= p.error.attempts <= 3 for p in pairs)
    assert all("500" in p.error.message for p in pairs)  # CircuitOpenError names the server's last error
    assert sim.stats.received <= 3 * len(pairs)
    assert results[0].results["sentiment"].coverage == 0.0


@pytest.mark.parametrize(("fault", "error_type"), [("length", "LengthLimitError"), ("refusal", "RefusalError")])
async def test_length_and_refusal_are_their_own_errors_and_not_retried(simulator, fault, error_type):
    sim = simulator(faults={fault: 1.0})
    async with orchestrator(sim, tasks=[pt.Sentiment()]) as orch:
        results = await orch.run(["Just one sentence."])
    pair = results[0].pairs[0]
    assert pair.error.type == error_type and pair.attempts == 1 and pair.answer is None
    assert sim.stats.received == 1


async def test_invalid_answer_is_reasked_once(simulator):
    sim = simulator(faults={"invalid_answer": 1.0})
    async with orchestrator(sim, tasks=[pt.Sentiment()]) as orch:
        results = await orch.run(["Just one sentence."])
    pair = results[0].pairs[0]
    assert pair.error.type == "AnswerValidationError" and pair.reasked and pair.attempts == 2
    assert sim.stats.received == 2 and orch.stats.reasks == 1


async def test_invalid_answer_then_valid_reask_succeeds():
    answers = iter(['{"label": "great", "score": 3}', '{"label": "positive", "score": 0.7}'])
    seen = []

    def fn(request):
        seen.append(request.messages)
        return next(answers)

    async with pt.Orchestrator(pt.FunctionBackend(fn), [pt.Sentiment()]) as orch:
        result = await orch.process("Nice.")
    assert result.pairs[0].reasked and result.results["sentiment"].label == "positive"
    assert "invalid" in seen[1][-1]["content"] and seen[1][-2]["content"] == '{"label": "great", "score": 3}'


async def test_insufficient_quota_stops_the_run_and_keeps_work(simulator):
    sim = simulator(faults={"insufficient_quota": 1.0})
    got = []
    async with orchestrator(sim, max_concurrency=2) as orch:
        with pytest.raises(pt.QuotaExceededError):
            async for r in orch.stream([f"Doc {i}. Two sentences." for i in range(50)]):
                got.append(r)
    assert got, "documents taken in are returned"
    assert len(got) < 50
    kinds = errors_of(got)
    assert "QuotaExceededError" in kinds
    assert set(kinds) <= {"QuotaExceededError", "RunStopped"}
    assert sim.stats.received <= 4  # no retries, no new calls after the stop


async def test_request_larger_than_tpm_fails_fast(simulator):
    sim = simulator()
    async with orchestrator(sim, tasks=[pt.Entities()], tpm=300) as orch:
        result = await orch.process("A sentence that, with its prompt and max tokens, cannot fit 300 tokens.")
    assert result.pairs[0].error.type == "RequestTooLargeError" and sim.stats.received == 0


async def test_json_schema_unsupported_server_falls_back(simulator):
    sim = simulator(supports_json_schema=False)
    async with orchestrator(sim, tasks=[pt.Sentiment()]) as orch:
        result = await orch.process("Works anyway.")
    assert not result.partial and orch.backend.fallbacks == {"sentiment": "json_object"}


async def test_client_limiter_keeps_under_server_rpm_without_429s(simulator):
    sim = simulator(rpm=600)  # 10/s, bucket of 600
    limiter = pt.RateLimiter(rpm=600)
    async with orchestrator(sim, tasks=[pt.Sentiment()], limiter=limiter, clock=limiter.clock) as orch:
        results = await orch.run([f"Sentence {i}." for i in range(120)])
    assert errors_of(results) == [] and sim.stats.outcomes.get("rate_limit", 0) == 0
    assert orch.stats.rate_limited == 0


async def test_rate_limit_pause_is_shared_by_waiting_calls():
    clock = FakeClock()
    calls = []

    def fn(request):
        calls.append(clock.now())
        if len(calls) == 1:
            raise pt.RateLimitError("slow", status_code=429, retry_after=5.0)
        return {"label": "neutral", "score": 0}

    b = pt.FunctionBackend(fn, rpm=6000)
    async with pt.Orchestrator(
        b,
        [pt.Sentiment()],
        clock=clock,
        max_concurrency=1,
        retry=pt.RetryPolicy(wait_initial=0, wait_jitter=0),
    ) as orch:
        await orch.run(["a.", "b.", "c."])
    # the first call is refused; every later call waits for the pause, none goes out before 5 s
    assert calls[0] == 0 and all(t >= 5.0 for t in calls[1:])


async def test_oracle_entities_equal_gold(simulator):
    sim = simulator(gold_path=DATA / "oracle_sample.jsonl")
    gold = [json.loads(line) for line in (DATA / "oracle_sample.jsonl").read_text().splitlines()]
    gold = [g for g in gold if g["entities"]]
    async with orchestrator(sim, tasks=[pt.Entities()]) as orch:
        results = await orch.run([pt.Document(id=g["id"], text=g["text"]) for g in gold])
    for g, r in zip(gold, results, strict=True):
        ents = [(e.start, e.end, e.label) for e in r.results["entities"].entities]
        assert ents == sorted((e["start"], e["end"], e["label"]) for e in g["entities"])


async def test_cancelling_process_cancels_its_calls_only(simulator):
    sim = simulator(latency=5.0)
    async with orchestrator(sim) as orch:
        with anyio.move_on_after(0.2) as scope:
            await orch.process("Slow sentence.")
        assert scope.cancelled_caught
        fast = pt.Orchestrator(pt.FunctionBackend(lambda r: {"label": "neutral", "score": 0}), [pt.Sentiment()])
        assert not (await fast.process("Still works.")).partial


async def test_stream_requires_context_manager():
    orch = pt.Orchestrator(pt.FunctionBackend(lambda r: "{}"), [pt.Sentiment()])
    with pytest.raises(RuntimeError, match="async with"):
        async for _ in orch.stream(["x"]):
            pass


def test_run_sync_for_scripts():
    results = pt.run_sync(
        pt.FunctionBackend(lambda r: {"label": "positive", "score": 0.9}),
        [pt.Sentiment()],
        ["Good. Very good."],
    )
    assert results[0].results["sentiment"].label == "positive"


def test_configuration_errors():
    b = pt.FunctionBackend(lambda r: "{}")
    with pytest.raises(pt.ConfigurationError):
        pt.Orchestrator(b, [])
    with pytest.raises(pt.ConfigurationError):
        pt.Orchestrator(b, [pt.Sentiment(), pt.Sentiment()])
    with pytest.raises(pt.ConfigurationError):
        pt.Orchestrator(b, [pt.Sentiment()], max_concurrency=0)


def test_concurrency_defaults_come_from_the_backend():
    hosted = pt.Orchestrator(pt.FunctionBackend(lambda r: "{}"), [pt.Sentiment()])
    assert hosted.max_concurrency == 64 and hosted.concurrency.decrease < 1  # AIMD on

    class Batched(pt.FunctionBackend):  # what the local backend declares
        settings = pt.BackendSettings(concurrency=512, adaptive_concurrency=False)

        def __init__(self, fn):
            super().__init__(fn)
            self.settings = Batched.settings

    local = pt.Orchestrator(Batched(lambda r: "{}"), [pt.Sentiment()])
    assert local.max_concurrency == 512 and local.concurrency.limit == 512  # no slow start either
    assert local.concurrency.decrease == 1.0
    told = pt.Orchestrator(Batched(lambda r: "{}"), [pt.Sentiment()], max_concurrency=8, adaptive_concurrency=True)
    assert told.max_concurrency == 8 and told.concurrency.decrease < 1


async def test_limits_learned_from_headers_without_429s(simulator):
    sim = simulator(rpm=300, tpm=200_000)
    async with orchestrator(sim, tasks=[pt.Sentiment()], clock=pt.MonotonicClock()) as orch:
        assert orch.limiter.rpm is None  # nothing configured
        results = await orch.run([f"Sentence {i}." for i in range(80)])
    assert errors_of(results) == []
    assert orch.limiter.rpm == 300 and orch.limiter.tpm == 200_000
    assert sim.stats.outcomes.get("rate_limit", 0) == 0


async def test_learned_completion_cap_and_full_retry_on_cut_off():
    caps = []

    def fn(request):
        caps.append(request.max_tokens)
        long = len(caps) == 30
        needed = 200 if long else 10
        if request.max_tokens < needed:
            return pt.ChatResponse(
                content='{"label": "pos', finish_reason="length", completion_tokens=request.max_tokens
            )
        return pt.ChatResponse(
            content='{"label": "positive", "score": 0.5}', completion_tokens=needed, prompt_tokens=50
        )

    task = pt.Sentiment()
    task.max_tokens = 256
    async with pt.Orchestrator(pt.FunctionBackend(fn), [task], max_concurrency=1) as orch:
        results = await orch.run([f"S{i}." for i in range(31)])
    assert errors_of(results) == []
    assert caps[:20] == [256] * 20  # the task's own max_tokens until 20 answers are seen
    learned = caps[20]
    assert learned == 13 + 16  # then the largest answer seen (10) plus a quarter, plus 16
    assert caps[29] == learned and caps[30] == 256  # cut off under the learned cap: asked again in full
    assert results[29].pairs[0].attempts == 2


async def test_circuit_breaker_stops_hammering_a_dead_server():
    clock = FakeClock()
    calls = []

    def fn(request):
        calls.append(clock.now())
        raise pt.ServerError("down", status_code=500)

    async with pt.Orchestrator(
        pt.FunctionBackend(fn),
        [pt.Sentiment()],
        clock=clock,
        max_concurrency=4,
        retry=pt.RetryPolicy(attempts=3, wait_initial=0, wait_jitter=0),
        max_outage=None,  # the breaker alone (the fake clock adds concurrent waits up past 300 s)
    ) as orch:
        results = await orch.run([f"S{i}." for i in range(20)])
    assert all(r.partial for r in results)
    assert orch.breaker.opened >= 1
    # after ten failures in a row the breaker holds calls for its cooldown and then probes one at a time; a call
    # that waited through a failed probe fails without reaching the server (it used to send all 3 × 20 attempts)
    assert calls[-1] >= 2.0 and len(calls) < 40
    assert {p.error.type for r in results for p in r.pairs} <= {"ServerError", "CircuitOpenError"}


async def _open_breaker(orch):
    for i in range(10):  # ten failures in a row open the breaker
        await orch.process(f"Short {i}.")
    assert orch.breaker.state == "open"


def _failing_first(n, answer=None):
    calls = []

    def fn(request):
        calls.append(request)
        if len(calls) <= n:
            raise pt.ServerError("boom", status_code=500)
        return answer or {"label": "neutral", "score": 0.0}

    return fn, calls


async def test_breaker_probe_refused_by_the_tpm_limit_lets_the_next_call_probe():
    fn, calls = _failing_first(10)
    async with pt.Orchestrator(
        pt.FunctionBackend(fn, tpm=400),
        [pt.Sentiment()],
        clock=FakeClock(),
        max_concurrency=1,
        retry=pt.RetryPolicy(attempts=1),
    ) as orch:
        await _open_breaker(orch)
        big = await orch.process("word " * 190 + "end.")  # the probe: larger than the TPM limit, never sent
        assert big.pairs[0].error.type == "RequestTooLargeError"
        with anyio.fail_after(5):  # used to wait for the dead probe forever
            ok = await orch.process("A normal sentence.")
    assert not ok.partial and orch.breaker.state == "closed" and len(calls) == 11


async def test_breaker_probe_cancelled_while_queued_lets_the_next_call_probe():
    fn, calls = _failing_first(10)
    async with pt.Orchestrator(
        pt.FunctionBackend(fn), [pt.Sentiment()], clock=FakeClock(), retry=pt.RetryPolicy(attempts=1)
    ) as orch:
        await _open_breaker(orch)
        orch.limiter.pause(1e9)  # the probe will wait in the limiter until it is cancelled
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(orch.process, "Cancelled while it waits.")
                while not orch.breaker._probing:
                    await anyio.lowlevel.checkpoint()
                scope.cancel()
        assert not orch.breaker._probing
        orch.limiter._paused_until = 0.0
        with anyio.fail_after(5):
            ok = await orch.process("A normal sentence.")
    assert not ok.partial and orch.breaker.state == "closed" and len(calls) == 11


async def test_a_retry_after_past_max_retry_after_stops_the_run_without_waiting_or_hammering():
    # a daily quota spent: before, that call failed and every other went on to meet the same 429, one by one
    clock = FakeClock()
    calls = []

    def fn(request):
        calls.append(request)
        if len(calls) == 1:
            raise pt.RateLimitError("on requests per day (RPD)", status_code=429, retry_after=86_400)
        return {"label": "neutral", "score": 0.0}

    backend = pt.FunctionBackend(fn)
    async with pt.Orchestrator(backend, [pt.Sentiment()], clock=clock, max_concurrency=1, learn_limits=False) as orch:
        with anyio.fail_after(5), pytest.raises(pt.RetryLaterError, match=r"resume after .* UTC") as info:
            await orch.run(["First.", "Second.", "Third."])
    first, *rest = info.value.results
    assert first.pairs[0].error.type == "RetryLaterError" and first.pairs[0].attempts == 1
    assert "longer than max_retry_after=300 s" in first.pairs[0].error.message
    assert all(r.pairs[0].error.type == "RunStopped" and r.pairs[0].attempts == 0 for r in rest)
    assert len(calls) == 1 and clock.sleeps == []  # no call after it, and nobody waited a day
    assert info.value.retry_after == 86_400 and info.value.resume_at is not None


def _answer(request):
    return {"label": "neutral", "score": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 2.5}, "max_concurrency"),
        ({"max_concurrency": float("nan")}, "max_concurrency"),
        ({"max_concurrency": 10_001}, "max_concurrency must be at most 10,000"),
        ({"max_pending_documents": 0}, "max_pending_documents"),
        ({"max_pending_documents": -1}, "max_pending_documents"),
        ({"max_sentence_chars": 0}, "max_sentence_chars"),
        ({"context_sentences": -1}, "context_sentences"),
        ({"rpm": 0}, "rpm"),
        ({"rpm": 0, "learn_limits": False}, "rpm"),
        ({"tpm": float("nan")}, "tpm"),
    ],
)
def test_bad_orchestrator_settings_name_themselves(kwargs, name):
    with pytest.raises(pt.ConfigurationError, match=name):
        pt.Orchestrator(pt.FunctionBackend(_answer), [pt.Sentiment()], **kwargs)


@pytest.mark.parametrize("kwargs", [{"rpm": 0}, {"tpm": -1}])
def test_bad_backend_limits_name_themselves(kwargs):
    (name,) = kwargs
    with pytest.raises(pt.ConfigurationError, match=name):
        pt.FunctionBackend(_answer, **kwargs)
    with pytest.raises(pt.ConfigurationError, match=name):
        pt.OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", **kwargs)


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_bad_openai_timeout_names_itself(timeout):
    with pytest.raises(pt.ConfigurationError, match="timeout"):
        pt.OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", timeout=timeout)


async def test_stream_read_on_after_the_orchestrator_closed_says_so():
    async with pt.Orchestrator(pt.FunctionBackend(_slow_answer), [pt.Sentiment()], max_concurrency=2) as orch:
        stream = orch.stream([f"Document {i}." for i in range(100)])
        first = await anext(stream)
    assert first.id in {str(i) for i in range(100)}
    with pytest.raises(RuntimeError, match="closed before this stream ended"):
        async for _ in stream:
            pass


async def test_rejected_api_key_stops_the_run_and_keeps_work():
    calls = []

    async def fn(request):
        calls.append(request)
        await anyio.sleep(0.001)
        raise pt.AuthenticationError("invalid api key", status_code=401)

    got = []
    async with pt.Orchestrator(pt.FunctionBackend(fn), [pt.Sentiment()], max_concurrency=2) as orch:
        with pytest.raises(pt.AuthenticationError):
            async for r in orch.stream([f"Doc {i}. Two sentences." for i in range(50)]):
                got.append(r)
    assert got and len(got) < 50 and len(calls) <= 4  # no new calls after the first 401s
    assert set(errors_of(got)) <= {"AuthenticationError", "RunStopped"}


async def test_a_stop_ends_a_call_waiting_out_a_backoff_at_once():
    # one call waits out a 503's 60 s Retry-After when another gets a 401: the run ends at once, that call's pair
    # RunStopped with its attempt counted, and no further attempt is sent
    failed_once = anyio.Event()
    calls = []

    async def fn(request):
        text = request.messages[-1]["content"]
        calls.append(text)
        if "Slow" in text:
            failed_once.set()
            raise pt.ServerError("overloaded", status_code=503, retry_after=60)
        await failed_once.wait()
        raise pt.AuthenticationError("invalid api key", status_code=401)

    got = []
    with anyio.fail_after(10):  # a guard only: the fixed code ends in milliseconds, the old one after 60 s
        backend = pt.FunctionBackend(fn)
        async with pt.Orchestrator(backend, [pt.Sentiment()], max_concurrency=2, learn_limits=False) as orch:
            with pytest.raises(pt.AuthenticationError):
                async for r in orch.stream([("slow", "Slow one."), ("bad", "Bad one.")]):
                    got.append(r)
    slow = next(r for r in got if r.id == "slow")
    assert slow.pairs[0].error.type == "RunStopped" and slow.pairs[0].attempts == 1
    assert "AuthenticationError" in slow.pairs[0].error.message
    assert sum("Slow" in c for c in calls) == 1  # not retried after the stop


SENT = {"label": "positive", "score": 0.5}


async def test_answers_at_the_server_when_the_run_stops_are_kept_cached_and_no_call_is_sent_after(tmp_path):
    # 10 calls at the server, one comes back out of quota: the other 9, answered after the stop, are paid for and
    # kept (before, they were dropped as RunStopped: the server answered 806 calls, polytask kept 757); the pairs
    # still waiting for a call slot end RunStopped at once and never reach the server
    at_server = 0
    all_in, release = anyio.Event(), anyio.Event()

    async def fn(request):
        nonlocal at_server
        at_server += 1
        if at_server == 10:
            all_in.set()
        if "Stop" in request.messages[-1]["content"]:
            await all_in.wait()
            raise pt.QuotaExceededError("quota", status_code=429, code="insufficient_quota")
        await release.wait()
        return SENT

    backend = pt.FunctionBackend(fn)
    cache = pt.RequestCache(tmp_path / "cache.sqlite")
    docs = [("stop", "Stop here.")] + [(f"d{i}", f"Document {i}.") for i in range(14)]
    got = {}
    options = {"max_concurrency": 10, "adaptive_concurrency": False, "learn_limits": False, "cache": cache}
    with anyio.fail_after(5):
        async with pt.Orchestrator(backend, [pt.Sentiment()], clock=FakeClock(), **options) as orch:
            with pytest.raises(pt.QuotaExceededError):
                async for r in orch.stream(docs):
                    got[r.id] = r
                    if r.id == "stop":  # the run has stopped: now the 9 answers come back
                        release.set()
    assert got["stop"].pairs[0].error.type == "QuotaExceededError"
    kept = sorted(i for i, r in got.items() if not r.partial)
    assert kept == [f"d{i}" for i in range(9)]
    assert all(got[i].results["sentiment"].label == "positive" and got[i].pairs[0].attempts == 1 for i in kept)
    waiting = [r.pairs[0] for i, r in got.items() if i not in kept and i != "stop"]  # those read before the stop
    assert waiting and all(p.error.type == "RunStopped" and p.attempts == 0 for p in waiting)
    assert backend.calls == 10 and len(cache) == 9  # every answer paid for is kept, and cached for the rerun
    assert (orch.stats.documents_done, orch.stats.documents_partial) == (len(got), len(got) - 9)
    cache.close()


class HeldClock:
    """Time stands still: a wait on it never ends (until cancelled); ``waiting`` is set once something waits."""

    def __init__(self):
        self.waiting = anyio.Event()

    def now(self):
        return 0.0

    async def sleep(self, seconds):
        self.waiting.set()
        await anyio.sleep_forever()


async def test_a_stop_ends_a_call_waiting_on_the_rate_limiter_before_it_reaches_the_server():
    clock = HeldClock()
    at_server = anyio.Event()
    calls = []

    async def fn(request):
        calls.append(request.messages[-1]["content"])
        at_server.set()
        await clock.waiting.wait()  # the second call waits on the limiter: then the quota runs out
        raise pt.QuotaExceededError("quota", status_code=429, code="insufficient_quota")

    async def documents():
        yield ("stop", "Stop here.")
        await at_server.wait()
        yield ("wait", "Wait here.")

    limiter = pt.RateLimiter(rpm=2, clock=clock)  # one call now, the next one 30 s later
    got = {}
    with anyio.fail_after(5):
        async with pt.Orchestrator(pt.FunctionBackend(fn), [pt.Sentiment()], clock=clock, limiter=limiter) as orch:
            with pytest.raises(pt.QuotaExceededError):
                async for r in orch.stream(documents()):
                    got[r.id] = r
    wait = got["wait"].pairs[0]
    assert wait.error.type == "RunStopped" and wait.attempts == 0
    assert wait.error.message == "not completed: the run stopped (QuotaExceededError)"
    assert len(calls) == 1 and "Stop here." in calls[0]


@pytest.mark.parametrize(
    ("reply", "what"),
    [
        ({"label": "ecstatic", "score": 0.5}, "not re-asked after an invalid answer"),
        (pt.ServerError("overloaded", status_code=503), "not retried after ServerError"),
    ],
)
async def test_a_call_at_the_server_when_the_run_stops_is_neither_retried_nor_re_asked(reply, what):
    at_server, release = anyio.Event(), anyio.Event()
    calls = []

    async def fn(request):
        text = request.messages[1]["content"]
        calls.append(text)
        if "Slow" in text:
            at_server.set()
            await release.wait()
            if isinstance(reply, Exception):
                raise reply
            return reply
        await at_server.wait()
        raise pt.AuthenticationError("invalid api key", status_code=401)

    got = {}
    clock = FakeClock()
    backend = pt.FunctionBackend(fn)
    with anyio.fail_after(5):
        async with pt.Orchestrator(
            backend, [pt.Sentiment()], clock=clock, max_concurrency=2, learn_limits=False
        ) as orch:
            with pytest.raises(pt.AuthenticationError):
                async for r in orch.stream([("slow", "Slow one."), ("bad", "Bad one.")]):
                    got[r.id] = r
                    release.set()  # the run has stopped: the slow call's answer comes back now
    slow = got["slow"].pairs[0]
    assert slow.error.type == "RunStopped" and slow.error.message.startswith(what)
    assert slow.error.message.endswith("the run stopped (AuthenticationError)")
    assert slow.attempts == 1 and not slow.reasked
    assert sum("Slow" in c for c in calls) == 1 and clock.sleeps == []  # nothing sent, nothing waited
    assert (orch.stats.retries, orch.stats.reasks) == (0, 0)


async def test_a_closed_backend_stops_the_run_instead_of_failing_every_pair():
    calls = []

    def fn(request):
        calls.append(request)
        raise pt.BackendClosedError("the backend is closed")

    got = []
    backend = pt.FunctionBackend(fn)
    async with pt.Orchestrator(backend, [pt.Sentiment()], max_concurrency=2, learn_limits=False) as orch:
        with pytest.raises(pt.BackendClosedError):
            async for r in orch.stream([f"Doc {i}. Two sentences." for i in range(50)]):
                got.append(r)
    assert got and len(got) < 50 and len(calls) <= 4
    assert set(errors_of(got)) <= {"BackendClosedError", "RunStopped"}


async def test_one_documents_call_starts_a_worker_per_pair_not_per_call_slot(monkeypatch):
    started = []
    real = pt.Orchestrator._worker

    async def counted(self, receive, job):
        started.append(1)
        await real(self, receive, job)

    monkeypatch.setattr(pt.Orchestrator, "_worker", counted)
    async with pt.Orchestrator(pt.FunctionBackend(_answer), [pt.Sentiment()], max_concurrency=10_000) as orch:
        result = await orch.process("One sentence. Two sentences.")
        assert not result.partial and len(started) == 2
        started.clear()
        results = await orch.run([f"Document {i}." for i in range(300)])
    assert len(results) == 300 and len(started) == 300  # one per pair, up to 2 × max_concurrency


async def test_entering_an_orchestrator_twice_is_a_clear_error():
    orch = pt.Orchestrator(pt.FunctionBackend(_answer), [pt.Sentiment()])
    async with orch:
        with pytest.raises(RuntimeError, match="already in use"):
            async with orch:
                pass
        assert not (await orch.process("Still works.")).partial


async def test_a_segmenter_that_numbers_sentences_wrong_is_named_and_earlier_documents_kept():
    def segmenter(text, max_chars):
        out = pt.segment(text, max_chars=max_chars)
        if "Broken" in text:
            out = [s.model_copy(update={"index": 0}) for s in out]  # every sentence numbered 0
        return out

    got = []
    async with pt.Orchestrator(pt.FunctionBackend(_answer), [pt.Sentiment()], segmenter=segmenter) as orch:
        with pytest.raises(pt.ConfigurationError, match="document 1: the segmenter's sentence 1 is not"):
            async for r in orch.stream(["Fine. Also fine.", "Broken one. Broken two.", "Never read."]):
                got.append(r.id)
    assert got == ["0"]


@pytest.mark.parametrize("http", ["aiohttp", "httpx2", "sdk"])
def test_process_from_several_event_loops_and_aclose(simulator, http):
    # sync agent code calls asyncio.run(orch.process(...)) per turn: each loop gets its own connections
    import asyncio

    sim = simulator()
    orch = pt.Orchestrator(backend(sim, http=http), [pt.Sentiment()])
    for i in range(3):
        result = asyncio.run(orch.process(f"Turn {i} is fine."))
        assert not result.partial, result.pairs
    asyncio.run(orch.aclose())  # from yet another loop: lets go of the old connections, never raises

    async def last_turn():
        result = await orch.process("Last turn.")
        await orch.aclose()
        return result

    assert not asyncio.run(last_turn()).partial and sim.stats.received == 4
    lean = orch.backend._lean
    if isinstance(lean, polytask._http.AiohttpClient):
        assert lean._session is None  # closed by aclose()
    else:
        client = lean.client if lean is not None else orch.backend._sdk._client
        assert client.is_closed


async def test_a_cut_off_answer_says_how_many_tokens_it_got():
    from polytask.backends.base import ChatResponse

    def fn(request):  # a backend whose own cap (30) is below the task's max_tokens
        return ChatResponse(content='{"label": "pos', finish_reason="length", completion_tokens=30)

    async with pt.Orchestrator(pt.FunctionBackend(fn), [pt.Sentiment()], learn_limits=False) as orch:
        result = await orch.process("Cut.")
    error = result.pairs[0].error
    assert error.type == "LengthLimitError" and "after 30 tokens (max_tokens=" in error.message


async def test_a_server_down_for_max_outage_stops_the_run_and_keeps_work():
    # every call fails: the run stops once the circuit has been open for max_outage (virtual) seconds, instead of
    # spending each remaining pair's retries one cooldown at a time
    clock = FakeClock()

    def dead(request):
        raise pt.ServerError("down", status_code=500)

    backend = pt.FunctionBackend(dead)
    got = []
    retry = pt.RetryPolicy(attempts=10)  # long retries: the stop must not wait for a pair to spend them
    orch = pt.Orchestrator(backend, [pt.Sentiment()], clock=clock, max_concurrency=4, max_outage=120, retry=retry)
    async with orch:
        with pytest.raises(pt.ServerDownError, match=r"failed every call for \d+ s \(max_outage=120 s\); last: "):
            async for r in orch.stream([f"Doc {i}. Two sentences." for i in range(500)]):
                got.append(r)
    assert got and len(got) < 500 and all(r.partial for r in got)
    assert set(errors_of(got)) <= {"ServerError", "CircuitOpenError", "RunStopped"}
    assert backend.calls < 100
    assert orch.breaker.outage() <= 120 + 60  # at most one probe cooldown past max_outage


async def test_run_that_stops_hands_back_what_it_finished():
    def fn(request):
        if "Bad" in request.messages[-1]["content"]:
            raise pt.AuthenticationError("invalid api key", status_code=401)
        return {"label": "neutral", "score": 0.0}

    backend = pt.FunctionBackend(fn)
    async with pt.Orchestrator(backend, [pt.Sentiment()], max_concurrency=1, learn_limits=False) as orch:
        with pytest.raises(pt.AuthenticationError) as info:
            await orch.run(["Good one.", "Good two.", "Bad three.", "Never four."])
    kept = info.value.results
    assert [r.id for r in kept][:3] == ["0", "1", "2"] and not kept[0].partial and kept[2].partial
    assert info.value.status_code == 401 and "invalid api key" in str(info.value)  # the error as it was raised


async def test_two_runs_stopped_by_one_error_object_each_get_their_own_results():
    shared = pt.QuotaExceededError("quota", status_code=429, code="insufficient_quota")

    def fn(request):
        if "Stop" in request.messages[-1]["content"]:
            raise shared
        return {"label": "neutral", "score": 0.0}

    async def one(orch, name, got):
        try:
            await orch.run([f"{name} fine.", "Stop here."])
        except pt.QuotaExceededError as error:
            got[name] = [r.text for r in error.results]

    got: dict = {}
    async with pt.Orchestrator(pt.FunctionBackend(fn), [pt.Sentiment()], learn_limits=False) as orch:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, orch, "A", got)
            tg.start_soon(one, orch, "B", got)
    assert got["A"][0] == "A fine." and got["B"][0] == "B fine."


def test_max_outage_is_checked():
    with pytest.raises(pt.ConfigurationError, match="max_outage"):
        pt.Orchestrator(pt.FunctionBackend(_answer), [pt.Sentiment()], max_outage=0)


async def test_an_error_in_the_async_with_block_comes_out_as_itself():
    with pytest.raises(ValueError, match="mine"):
        async with pt.Orchestrator(pt.FunctionBackend(_answer), [pt.Sentiment()]) as orch:
            await orch.process("One.")
            raise ValueError("mine")


def test_a_backend_without_settings_keeps_its_rpm_and_tpm_and_bad_settings_are_named():
    class Old:  # a backend written against polytask 0.1's seam: rpm / tpm attributes, no settings
        name = "old"
        rpm = 120.0
        tpm = 50_000.0

        async def complete(self, request):
            return pt.ChatResponse(content="{}")

        async def aclose(self):
            pass

    orch = pt.Orchestrator(Old(), [pt.Sentiment()])
    assert orch.limiter.rpm == 120.0 and orch.limiter.tpm == 50_000.0

    class Wrong(Old):
        settings = ("rpm", 5)

    with pytest.raises(pt.ConfigurationError, match="BackendSettings"):
        pt.Orchestrator(Wrong(), [pt.Sentiment()])


def test_a_backend_without_settings_that_declares_only_rpm_keeps_it():
    class Old:
        name = "old"
        rpm = 100.0
        preferred_concurrency = 4
        adaptive_concurrency = False

        async def complete(self, request):
            return pt.ChatResponse(content="{}")

        async def aclose(self):
            pass

    orch = pt.Orchestrator(Old(), [pt.Sentiment()])
    assert orch.limiter.rpm == 100.0 and orch.limiter.tpm is None
    assert orch.max_concurrency == 4 and orch.concurrency.decrease == 1.0
