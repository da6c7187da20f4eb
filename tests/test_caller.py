"""The Caller on its own: one question through breaker → slot → limiter → backend → validation, with retries, the
one re-ask and the typed errors, against a FunctionBackend in virtual time (FakeClock: no real sleeps)."""

import json

import pytest
from pydantic import BaseModel

import polytask as pt
from polytask._caller import AskError, Caller, CallStats
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


async def test_a_429_asking_longer_than_max_retry_after_fails_without_pausing_the_others():
    clock = FakeClock()
    limiter = pt.RateLimiter(clock=clock)
    limited = pt.RateLimitError("x", status_code=429, retry_after=3600)
    retry = pt.RetryPolicy(attempts=4, wait_jitter=0, max_retry_after=60)
    caller, backend, _ = make_caller(scripted(limited, GOOD), clock=clock, limiter=limiter, retry=retry)
    task, messages = question()
    with pytest.raises(AskError) as info:
        await caller.ask(task, messages, pt.Usage(), "doc")
    assert info.value.error is limited and info.value.attempts == 1
    assert backend.calls == 1
    assert limiter.wait_time(1) == 0


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
