"""The Caller on its own: one question through breaker → slot → limiter → backend → validation, with retries, the
one re-ask and the typed errors, against a FunctionBackend in virtual time (FakeClock: no real sleeps)."""

import json
from datetime import UTC, datetime

import anyio
import pytest
from pydantic import BaseModel

import polytask as pt
from polytask._caller import AskError, Caller, CallStats, Flight
from polytask._estimates import PromptEstimator
from polytask._prompts import build_messages, reask_messages
from polytask.concurrency import AdaptiveConcurrency, CircuitBreaker
from polytask.testing.clock import FakeClock

pytestmark = pytest.mark.anyio

GOOD = {"label": "positive", "score": 0.75}
BAD = {"label": "ecstatic", "score": 0.75}


class Topic(BaseModel):
    topic: str


def make_caller(fn, *, clock=None, limiter=None, retry=None, breaker=None):
    clock = clock or FakeClock()
    backend = pt.FunctionBackend(fn)
    caller = Caller(
        backend,
        retry=retry or pt.RetryPolicy(attempts=4, wait_jitter=0),
        limiter=limiter,
        concurrency=AdaptiveConcurrency(4, clock=clock),
        breaker=breaker or CircuitBreaker(clock=clock),
        estimator=PromptEstimator(),
        clock=clock,
        temperature=0.0,
        stats=CallStats(),
    )
    return caller, backend, clock


def scripted(*steps, seen=None):
    """A backend function playing ``steps`` in order (an exception is raised, anything else returned); the requests
    it got are appended to ``seen``."""
    steps = list(steps)

    def fn(request):
        if seen is not None:
            seen.append(request)
        step = steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    return fn


def question(task=None, sentence="I love this."):
    task = task or pt.Sentiment()
    return task, build_messages(task, sentence)


async def test_a_valid_answer_comes_back_at_the_first_attempt():
    seen = []
    caller, backend, clock = make_caller(scripted(GOOD, seen=seen))
    task, messages = question()
    attempts = []
    answer = await caller.ask(task, messages, pt.Usage(), "doc-1", on_attempt=lambda: attempts.append(1))
    assert answer.value == task.parse(json.dumps(GOOD))
    assert answer.attempts == 1 and not answer.reasked
    assert backend.calls == 1 and len(attempts) == 1
    (request,) = seen
    assert request.messages == messages
    assert request.schema_name == task.name
    assert request.json_schema == task.json_schema()
    assert request.max_tokens == task.max_tokens
    assert request.prompt_tokens_estimate > 0
    stats = caller.stats
    assert (stats.requests, stats.retries, stats.reasks, stats.rate_limited) == (1, 0, 0, 0)
    assert clock.sleeps == []


async def test_usage_is_added_to_the_usage_passed_in():
    response = pt.ChatResponse(content=json.dumps(GOOD), prompt_tokens=120, completion_tokens=9)
    caller, _, _ = make_caller(scripted(response, response))
    task, messages = question()
    usage = pt.Usage(prompt_tokens=1000, completion_tokens=50, requests=3)
    await caller.ask(task, messages, usage, "doc")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.requests) == (1120, 59, 4)
    await caller.ask(task, messages, usage, "doc")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.requests) == (1240, 68, 5)
    assert (caller.stats.prompt_tokens, caller.stats.completion_tokens) == (240, 18)


async def test_usage_counts_every_attempt_and_the_tokens_of_each_answer():
    errors = [pt.ServerError("x", status_code=503)]
    bad = pt.ChatResponse(content=json.dumps(BAD), prompt_tokens=100, completion_tokens=10)
    good = pt.ChatResponse(content=json.dumps(GOOD), prompt_tokens=130, completion_tokens=10)
    caller, _, _ = make_caller(scripted(*errors, bad, good))
    task, messages = question()
    usage = pt.Usage()
    answer = await caller.ask(task, messages, usage, "doc")
    assert answer.attempts == 3 and answer.reasked
    assert (usage.prompt_tokens, usage.completion_tokens, usage.requests) == (230, 20, 3)


@pytest.mark.parametrize(
    "error",
    [
        pt.ServerError("x", status_code=503),
        pt.ServerError("x", status_code=500),
        pt.RateLimitError("x", status_code=429),
        pt.APIConnectionError("reset"),
        pt.APITimeoutError("slow"),
        pt.MalformedResponseError("not json"),
    ],
)
async def test_a_retryable_error_then_success_is_retried(error):
    caller, backend, clock = make_caller(scripted(error, error, GOOD))
    task, messages = question()
    retried = []
    answer = await caller.ask(task, messages, pt.Usage(), "doc", on_retry=retried.append)
    assert answer.value == task.parse(json.dumps(GOOD))
    assert answer.attempts == 3 and not answer.reasked
    assert backend.calls == 3
    assert caller.stats.retries == 2 and caller.stats.requests == 3
    assert retried == [error, error]
    assert len(clock.sleeps) == 2 and all(s > 0 for s in clock.sleeps)  # backoff waited in virtual time


async def test_retries_stop_when_the_policy_is_spent():
    error = pt.ServerError("x", status_code=503)
    caller, backend, _ = make_caller(scripted(*[error] * 10), retry=pt.RetryPolicy(attempts=3, wait_jitter=0))
    task, messages = question()
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    assert info.value.error is error
    assert info.value.attempts == 3 and not info.value.reasked
    assert backend.calls == 3 and caller.stats.retries == 2


@pytest.mark.parametrize(
    "error",
    [
        pt.BadRequestError("x", status_code=400),
        pt.AuthenticationError("x", status_code=401),
        pt.NotFoundError("x", status_code=404),
        pt.UnprocessableEntityError("x", status_code=422),
        pt.QuotaExceededError("x", status_code=429, code="insufficient_quota"),
    ],
)
async def test_a_non_retryable_error_fails_at_once(error):
    caller, backend, clock = make_caller(scripted(error, GOOD))
    task, messages = question()
    retried = []
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc", on_retry=retried.append)
    assert info.value.error is error
    assert info.value.attempts == 1 and not info.value.reasked
    assert backend.calls == 1 and caller.stats.retries == 0 and retried == []
    assert clock.sleeps == []


async def test_an_invalid_answer_is_reasked_once_with_the_validation_error():
    seen = []
    caller, backend, _ = make_caller(scripted(BAD, GOOD, seen=seen))
    task, messages = question()
    answer = await caller.ask(task, messages, pt.Usage(), "doc")
    assert answer.value == task.parse(json.dumps(GOOD))
    assert answer.attempts == 2 and answer.reasked
    assert caller.stats.reasks == 1 and backend.calls == 2
    first, second = seen
    assert first.messages == messages
    expected = reask_messages(messages, json.dumps(BAD), "the validation error")
    assert len(second.messages) == len(expected)
    assert second.messages[:-1] == expected[:-1]  # the question, then the bad answer as the assistant's
    assert second.messages[-1]["role"] == "user"
    assert "label" in second.messages[-1]["content"]  # the field that failed is named
    assert second.messages[-1] != messages[-1]


async def test_an_answer_that_is_not_json_is_reasked_too():
    seen = []
    caller, _, _ = make_caller(scripted("Sure! The sentiment is positive.", GOOD, seen=seen))
    task, messages = question()
    answer = await caller.ask(task, messages, pt.Usage(), "doc")
    assert answer.reasked and answer.attempts == 2
    assert seen[1].messages[len(messages)] == {"role": "assistant", "content": "Sure! The sentiment is positive."}


async def test_an_answer_invalid_after_the_reask_ends_in_answer_validation_error():
    still_bad = {"label": "positive", "score": 7}
    caller, backend, _ = make_caller(scripted(BAD, still_bad, GOOD))
    task, messages = question()
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    error = info.value.error
    assert isinstance(error, pt.AnswerValidationError)
    assert error.content == json.dumps(still_bad)
    assert "score" in str(error)
    assert info.value.attempts == 2 and info.value.reasked
    assert backend.calls == 2 and caller.stats.reasks == 1


async def test_a_retryable_error_during_the_reask_is_retried():
    error = pt.ServerError("x", status_code=503)
    seen = []
    caller, _, _ = make_caller(scripted(BAD, error, GOOD, seen=seen))
    task, messages = question()
    answer = await caller.ask(task, messages, pt.Usage(), "doc")
    assert answer.attempts == 3 and answer.reasked
    assert caller.stats.retries == 1 and caller.stats.reasks == 1
    assert seen[1].messages == seen[2].messages and len(seen[2].messages) == len(messages) + 2


async def test_a_cut_off_answer_is_a_length_limit_error_and_never_repaired():
    cut = pt.ChatResponse(content='{"label": "posi', finish_reason="length", completion_tokens=32)
    caller, backend, _ = make_caller(scripted(cut, GOOD, GOOD))
    task, messages = question()
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    assert isinstance(info.value.error, pt.LengthLimitError)
    assert info.value.attempts == 1 and not info.value.reasked
    assert backend.calls == 1 and caller.stats.reasks == 0 and caller.stats.retries == 0


async def test_a_cut_off_answer_with_valid_json_is_still_a_length_limit_error():
    cut = pt.ChatResponse(content=json.dumps(GOOD), finish_reason="length")
    caller, backend, _ = make_caller(scripted(cut, GOOD))
    task, messages = question()
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    assert isinstance(info.value.error, pt.LengthLimitError)
    assert backend.calls == 1


async def test_a_cut_off_under_a_learned_cap_is_asked_again_with_the_task_max_tokens():
    task = pt.Task("topic", Topic, "Name the topic.", max_tokens=500)
    seen = []
    answer_text = json.dumps({"topic": "travel"})

    def fn(request):
        seen.append(request)
        if len(seen) == 100:  # one long answer once the cap is learned from short ones
            return pt.ChatResponse(content='{"topic": "a very lo', finish_reason="length", completion_tokens=10)
        return pt.ChatResponse(content=answer_text, completion_tokens=5)

    caller, _, _ = make_caller(fn)
    messages = build_messages(task, "Rome in May.")
    for _ in range(99):
        await caller.ask(task, messages, pt.Usage(), "doc")
    assert seen[-1].max_tokens < task.max_tokens  # learned from the short answers
    answer = await caller.ask(task, messages, pt.Usage(), "doc")
    assert answer.value == Topic(topic="travel")
    assert answer.attempts == 2 and not answer.reasked
    assert seen[-2].max_tokens < task.max_tokens and seen[-1].max_tokens == task.max_tokens


async def test_a_refusal_is_a_refusal_error():
    refused = pt.ChatResponse(content=None, refusal="I can't help with that.")
    caller, backend, _ = make_caller(scripted(refused, GOOD, GOOD))
    task, messages = question()
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    assert isinstance(info.value.error, pt.RefusalError)
    assert info.value.error.refusal == "I can't help with that."
    assert info.value.attempts == 1 and not info.value.reasked
    assert backend.calls == 1 and caller.stats.reasks == 0


async def test_a_429_with_retry_after_pauses_the_shared_limiter():
    clock = FakeClock()
    limiter = pt.RateLimiter(clock=clock)  # no limits: any wait is the pause
    sent_at = []
    limited = pt.RateLimitError("x", status_code=429, retry_after=7)

    def fn(request):
        sent_at.append(clock.now())
        if len(sent_at) == 1:
            raise limited
        return GOOD

    caller, _, _ = make_caller(fn, clock=clock, limiter=limiter)
    task, messages = question()
    paused = []
    answer = await caller.ask(task, messages, pt.Usage(), "doc", on_retry=lambda e: paused.append(limiter.wait_time(1)))
    assert answer.attempts == 2
    assert paused == [pytest.approx(7.0)]  # every call sharing the limiter is held, not just this one
    assert sent_at[1] - sent_at[0] >= 7.0
    assert caller.stats.rate_limited == 1 and caller.stats.retries == 1


RECEIVED = datetime(2026, 12, 4, 20, 40, 30, tzinfo=UTC)  # the wall clock when the long 429 arrives


async def test_a_429_asking_longer_than_max_retry_after_is_a_retry_later_error_that_says_when_to_resume():
    clock = FakeClock()
    limiter = pt.RateLimiter(clock=clock)
    limited = pt.RateLimitError(
        "on requests per day (RPD)", status_code=429, code="rate_limit_exceeded", retry_after=86_400
    )
    caller, backend, _ = make_caller(scripted(limited, GOOD), clock=clock, limiter=limiter)
    caller.wall_clock = RECEIVED.timestamp
    task, messages = question()
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    error = info.value.error
    assert isinstance(error, pt.RetryLaterError) and isinstance(error, pt.RateLimitError)
    assert pt.exceptions.is_fatal_to_run(error) and error.__cause__ is limited
    assert (error.status_code, error.code, error.retry_after) == (429, "rate_limit_exceeded", 86_400)
    assert error.resume_at == datetime(2026, 12, 5, 20, 40, 30, tzinfo=UTC)
    assert str(error).startswith(
        "HTTP 429: the server asks to wait 86400 s (Retry-After), longer than max_retry_after=300 s: the run stopped; "
        "resume after 2026-12-05 20:41 UTC (rerun the same command)."  # rounded up to the minute: never early
    )
    assert "on requests per day (RPD)" in str(error)  # what the server said, too
    assert info.value.attempts == 1 and backend.calls == 1 and clock.sleeps == []
    assert limiter.wait_time(1) == 0  # nothing waits for it: the run stops
    assert caller.stats.rate_limited == 1 and caller.stats.retries == 0


async def test_a_retry_after_at_max_retry_after_is_still_waited_and_infinity_has_no_date():
    retry = pt.RetryPolicy(attempts=4, wait_jitter=0, max_retry_after=60)
    at_most = pt.RateLimitError("x", status_code=429, retry_after=60)
    caller, _, clock = make_caller(scripted(at_most, GOOD), retry=retry)
    task, messages = question()
    assert (await caller.ask(task, messages, pt.Usage(), "doc")).attempts == 2 and clock.sleeps == [60]
    forever = pt.RateLimitError("x", status_code=429, retry_after=float("inf"))
    caller, _, _ = make_caller(scripted(forever), retry=retry)
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    error = info.value.error
    assert isinstance(error, pt.RetryLaterError) and error.resume_at is None
    assert "it gave no time to resume" in str(error)


@pytest.mark.parametrize(
    "error",
    [
        pt.QuotaExceededError("x", status_code=429, code="insufficient_quota", retry_after=86_400),
        pt.ServerError("maintenance", status_code=503, retry_after=86_400),
    ],
)
async def test_only_a_rate_limit_429_becomes_a_retry_later_error(error):
    # out of credit stays QuotaExceededError; a 503 asking a day fails its call, as before (not retried)
    caller, backend, clock = make_caller(scripted(error, GOOD))
    task, messages = question()
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    assert info.value.error is error and backend.calls == 1 and clock.sleeps == []


async def test_a_call_larger_than_the_tpm_limit_never_reaches_the_backend():
    clock = FakeClock()
    limiter = pt.RateLimiter(tpm=100, clock=clock)
    caller, backend, _ = make_caller(scripted(GOOD), clock=clock, limiter=limiter)
    task, messages = question(pt.Task("topic", Topic, "Name the topic.", max_tokens=500))
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    assert isinstance(info.value.error, pt.RequestTooLargeError)
    assert info.value.attempts == 0 and backend.calls == 0


async def test_server_failures_open_the_breaker_and_4xx_answers_do_not():
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, clock=clock)
    bad_request = pt.BadRequestError("x", status_code=400)
    caller, _, _ = make_caller(scripted(*[bad_request] * 5), clock=clock, breaker=breaker)
    task, messages = question()
    for _ in range(5):
        with pytest.raises(AskError):
            await caller.ask(task, messages, pt.Usage(), "doc")
    assert breaker.state == "closed"

    breaker = CircuitBreaker(threshold=3, clock=clock)
    down = pt.ServerError("x", status_code=503)
    caller, _, _ = make_caller(
        scripted(*[down] * 3), clock=clock, breaker=breaker, retry=pt.RetryPolicy(attempts=3, wait_jitter=0)
    )
    with pytest.raises(AskError):
        await caller.ask(task, messages, pt.Usage(), "doc")
    assert breaker.state == "open"


# --- a question stopped through its Flight (the orchestrator's stop) --------------------------------------------


def stopped_at_the_server(flight, *steps):
    """A backend function playing ``steps`` in order, the run stopping (``flight.stop``) while the first request is
    at the server."""
    play = scripted(*steps)

    def fn(request):
        if not flight.stopped_by:
            assert flight.sending  # at the server: the stop lets it finish
            flight.stop("QuotaExceededError")
        return play(request)

    return fn


async def ask_in(caller, flight, task, messages):
    with flight.scope:
        return await caller.ask(task, messages, pt.Usage(), "doc", flight=flight)


async def test_an_answer_that_arrives_after_the_stop_is_kept_and_cached(tmp_path):
    flight = Flight()
    caller, backend, _ = make_caller(stopped_at_the_server(flight, GOOD))
    caller.cache = pt.RequestCache(tmp_path / "c.sqlite")
    task, messages = question()
    answer = await ask_in(caller, flight, task, messages)
    assert answer.value == task.parse(json.dumps(GOOD)) and answer.attempts == 1
    assert not flight.scope.cancel_called and backend.calls == 1
    assert len(caller.cache) == 1  # paid for: a rerun asks nothing


CUT = pt.ChatResponse(content='{"topic": "a very lo', finish_reason="length", completion_tokens=23)


@pytest.mark.parametrize(
    ("reply", "what"),
    [
        (BAD, "not re-asked after an invalid answer (label: "),
        (pt.ServerError("overloaded", status_code=503), "not retried after ServerError (HTTP 503: overloaded)"),
        (pt.APIConnectionError("reset"), "not retried after APIConnectionError (reset)"),
        (CUT, "not asked again in full after an answer cut off at max_tokens=23"),
    ],
)
async def test_after_the_stop_nothing_new_is_sent_for_a_call_that_was_at_the_server(reply, what):
    flight = Flight()
    caller, backend, clock = make_caller(stopped_at_the_server(flight, reply, GOOD, GOOD))
    task, messages = question()
    if reply is CUT:  # answered under a learned completion cap of 23 tokens, not the task's 500
        task, messages = question(pt.Task("topic", Topic, "Name the topic.", max_tokens=500))
        for _ in range(20):
            caller.budget(task).observe(5)
    with pytest.raises(AskError) as info:
        await ask_in(caller, flight, task, messages)
    error = info.value.error
    assert isinstance(error, pt.RunStopped)
    assert str(error).startswith(what) and str(error).endswith(": the run stopped (QuotaExceededError)")
    assert info.value.attempts == 1 and not info.value.reasked  # the attempt made counts; none was added
    assert backend.calls == 1 and clock.sleeps == []  # no second request, no backoff waited
    assert (caller.stats.retries, caller.stats.reasks) == (0, 0)


async def test_a_retry_at_the_server_when_the_run_stops_is_not_retried_again():
    # the stop comes during the second attempt (tenacity's loop, not the first attempt's own path)
    flight = Flight()
    down = pt.ServerError("overloaded", status_code=503)
    play = scripted(down, down, GOOD)

    def fn(request):
        if backend.calls == 2:
            flight.stop("QuotaExceededError")
        return play(request)

    caller, backend, clock = make_caller(fn)
    task, messages = question()
    with pytest.raises(AskError) as info:
        await ask_in(caller, flight, task, messages)
    assert isinstance(info.value.error, pt.RunStopped) and info.value.error.__cause__ is down
    assert info.value.attempts == 2 and backend.calls == 2
    assert len(clock.sleeps) == 1 and caller.stats.retries == 1  # the backoff before the second attempt only


async def test_a_re_send_made_before_the_stop_is_counted_and_its_answer_kept():
    # cut off under the learned cap, asked again in full; the run stops while that second request is at the server
    task, messages = question(pt.Task("topic", Topic, "Name the topic.", max_tokens=500))
    flight = Flight()
    seen = []

    def fn(request):
        seen.append(request.max_tokens)
        if len(seen) == 1:
            return CUT
        flight.stop("QuotaExceededError")
        return {"topic": "travel"}

    caller, _, _ = make_caller(fn)
    for _ in range(20):
        caller.budget(task).observe(5)
    answer = await ask_in(caller, flight, task, messages)
    assert answer.value == Topic(topic="travel") and answer.attempts == 2 and seen == [23, 500]


async def test_a_stopped_call_waiting_on_the_limiter_ends_at_once_and_never_reaches_the_backend():
    clock = FakeClock()
    limiter = pt.RateLimiter(clock=clock)
    limiter.pause(3600)  # every acquisition waits (a FakeClock sleep would jump it: stopped first, below)
    waiting = anyio.Event()

    async def held(seconds):
        waiting.set()
        await anyio.sleep_forever()

    clock.sleep = held
    caller, backend, _ = make_caller(scripted(GOOD), clock=clock, limiter=limiter)
    task, messages = question()
    flight = Flight()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ask_in, caller, flight, task, messages)
        await waiting.wait()
        assert not flight.sending
        flight.stop("QuotaExceededError")
    assert flight.scope.cancelled_caught and backend.calls == 0 and caller.stats.requests == 0
