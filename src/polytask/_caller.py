"""One (sentence, task) question, asked until it has a validated answer or a typed error.

With a request cache (:mod:`polytask.cache`), a question answered before is answered from it: no call, no rate-limit
budget, no tokens; a newly validated answer is stored under the question's key.

A call goes: circuit breaker → concurrency slot → spending budget (reserve the call's worst-case cost; a call that
could take the run past it is not sent: :class:`~polytask.BudgetExceededError`) → rate limiter (reserve estimated
tokens) → backend → settle both reservations with the real usage and its cost, feed the limits learned from
headers, the token calibration, the concurrency controller and the breaker → validate; retried by the
:class:`~polytask.RetryPolicy` (each retry goes back through the breaker, the slot, the budget and the limiter), and
re-asked once with the validation error when the answer is invalid — unless what it holds can be read without
guessing (:meth:`~polytask.Task.recover`: a code fence, prose around the JSON, an enum value's case or spaces).

A 429 asking to wait longer than the policy's ``max_retry_after`` (a daily quota) becomes a
:class:`~polytask.RetryLaterError`, which stops the run: converted here, the one place that knows the policy.

A question may be stopped through its :class:`Flight` (the orchestrator does when the run stops): while it waits it
ends at once; while its request is at the server the answer is let arrive (it is paid for) and kept when valid, but
nothing new is sent for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from pydantic import ValidationError

from ._estimates import CompletionBudget, PromptEstimator
from ._prompts import reask_messages
from .backends.base import Backend
from .cache import RequestCache
from .chat import ChatRequest, ChatResponse, Message
from .concurrency import AdaptiveConcurrency, CircuitBreaker
from .costs import Budget, BudgetReservation, Prices
from .documents import Usage
from .exceptions import (
    AnswerValidationError,
    APIStatusError,
    APITimeoutError,
    LengthLimitError,
    QuotaExceededError,
    RateLimitError,
    RefusalError,
    RetryLaterError,
    RunStopped,
    ServerError,
    is_server_failure,
)
from .limits import Clock, Limiter
from .retry import RetryPolicy
from .tasks.base import Task
from .traces import CallEvent, Status

__all__ = ["Answer", "CallStats", "Caller", "Flight"]

logger = logging.getLogger("polytask")


@dataclass
class CallStats:
    """Counters over every call (for progress bars and summaries); ``cost`` in USD at the run's prices (0 when they
    are unknown), ``cached_tokens`` the prompt tokens served from the provider's prompt cache."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: float = 0.0
    rate_limited: int = 0
    retries: int = 0
    reasks: int = 0
    cache_hits: int = 0
    recovered: int = 0
    """Answers accepted after :meth:`~polytask.Task.recover` read them from a code fence, prose around the JSON or
    loosely written enum values, with no re-ask: how loosely the server answers."""


@dataclass
class Answer:
    """A validated answer and what it took."""

    value: Any
    attempts: int
    reasked: bool


class AskError(Exception):
    """Carries the attempts made for a question that failed with ``error``."""

    def __init__(self, error: Exception, attempts: int, reasked: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
        self.reasked = reasked


@dataclass
class _Question:
    """What one question's call events say of it; ``pending``: the event of the attempt whose answer is being
    validated (its status is known only then)."""

    emit: Callable[[CallEvent], None]
    document_id: str
    sentence: int | None
    task: str
    model: str
    attempt: int = 0
    pending: CallEvent | None = None

    def event(self, status: Status, started_at: float, **fields: Any) -> CallEvent:
        return CallEvent(
            self.document_id, self.sentence, self.task, self.attempt, status, started_at, model=self.model, **fields
        )

    def settle(self, status: Status, error: BaseException | None = None) -> None:
        """Emit the pending attempt's event with the status its answer's validation gave."""
        event, self.pending = self.pending, None
        if event is not None:
            event.status = status
            if error is not None:
                event.error_type, event.error = type(error).__name__, str(error)[:300]
            self.emit(event)


@dataclass(eq=False)
class Flight:
    """One question's way through :meth:`Caller.ask`, as whoever may stop it sees it (the orchestrator: one per pair).

    :meth:`stop` ends a question that is waiting (on the circuit breaker, a concurrency slot, the rate limiter, a
    retry's backoff) at once, by cancelling ``scope``. A question whose request is at the server (``sending``) is let
    finish, since its answer is paid for: a valid answer is kept (and cached); but nothing new is sent for it — no
    retry of a failed attempt, no re-ask of an invalid answer, no re-send of a cut-off one — and the question ends
    :class:`~polytask.RunStopped` instead. Cancellation from outside (Ctrl-C) still reaches a request at the server.

    Attributes:
        scope: the cancel scope the question runs in (whoever calls ``ask`` enters it around the call).
        sending: a request of the question is at the backend now (set by the caller around ``backend.complete``).
        stopped_by: why the run stopped (named in the pair's error), once :meth:`stop` was called; else None.
        expired: :meth:`expire` was called: the caller's deadline passed.
    """

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    sending: bool = False
    stopped_by: str | None = None
    expired: bool = False

    def expire(self) -> None:
        """The caller's deadline passed: end the question at once, a request at the server included."""
        self.expired = True
        self.scope.cancel()

    def stop(self, why: str) -> None:
        """The run stopped (``why``: what stopped it): end the question at once, or after its answer arrives."""
        self.stopped_by = why
        if not self.sending:
            self.scope.cancel()

    def check(self, what: str, cause: BaseException | None = None) -> None:
        """Called before anything new is sent for the question; ``what`` says what is then not done
        (``"not re-asked after …"``), ``cause`` what led to it.

        Raises:
            RunStopped: the question was stopped.
        """
        if self.stopped_by is not None:
            raise RunStopped(f"{what}: the run stopped ({self.stopped_by})") from cause


async def _done(update: Awaitable[None] | None) -> None:
    """Await a limiter's update when it is one (a shared limiter's round trip); a local limiter's is None."""
    if update is not None:
        await update


def _short(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in error.errors()[:10])


class Caller:
    """Asks a backend questions under shared limits (one per orchestrator)."""

    def __init__(
        self,
        backend: Backend,
        *,
        retry: RetryPolicy,
        limiter: Limiter | None,
        concurrency: AdaptiveConcurrency,
        breaker: CircuitBreaker,
        estimator: PromptEstimator,
        clock: Clock,
        temperature: float,
        stats: CallStats,
        cache: RequestCache | None = None,
        identity: str = "",
        prices: Prices | None = None,
        spending: Budget | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.prices = prices
        self.spending = spending  # needs prices (the orchestrator checks)
        self.cache = cache
        self.identity = identity
        self.backend = backend
        self.retry = retry
        self.limiter = limiter
        self.concurrency = concurrency
        self.breaker = breaker
        self.estimator = estimator
        self.clock = clock
        self.temperature = temperature
        self.stats = stats
        self._budgets: dict[tuple[str, int], CompletionBudget] = {}
        self.wall_clock = wall_clock  # seconds since the epoch: when a RetryLaterError says to resume

    def budget(self, task: Task[Any]) -> CompletionBudget:
        key = (task.name, task.max_tokens)  # a bundle's name is shared by its sizes (packing.Bundle)
        if key not in self._budgets:
            self._budgets[key] = CompletionBudget(task.max_tokens)
        return self._budgets[key]

    def cache_key(self, task: Task[Any], messages: list[Message]) -> str | None:
        """The request cache's key of a question (None without a cache)."""
        if self.cache is None:
            return None
        return self.cache.key(self.identity, task.name, task.json_schema(), task.max_tokens, messages, self.temperature)

    def is_cached(self, task: Task[Any], messages: list[Message]) -> bool:
        """Whether the request cache holds an answer to this question (a dry run's count of free pairs)."""
        key = self.cache_key(task, messages)
        return key is not None and self.cache is not None and self.cache.get(key) is not None

    async def ask(
        self,
        task: Task[Any],
        messages: list[Message],
        usage: Usage,
        label: str,
        on_attempt: Callable[[], None] | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
        *,
        flight: Flight | None = None,
        sentence: int | None = None,
        on_call: Callable[[CallEvent], None] | None = None,
    ) -> Answer:
        """A validated answer to ``messages`` for ``task``; ``on_attempt`` is called as each attempt is sent,
        ``on_retry`` with the error of each failed attempt that will be retried; ``flight``: how the question may be
        stopped (see :class:`Flight`; the caller of ``ask`` enters its ``scope``). Every response's tokens and cost
        are added to ``usage`` as it arrives (an answer from the cache adds nothing). ``on_call`` gets a
        :class:`~polytask.traces.CallEvent` per attempt (and per answer from the cache), ``sentence`` and ``label``
        (the document id) naming where it belongs.

        Raises:
            AskError: wrapping the polytask error the question ended with, and the attempts made:
                :class:`~polytask.RunStopped` when ``flight`` was stopped before a new attempt,
                :class:`~polytask.RetryLaterError` for a 429 asking to wait past the policy's ``max_retry_after``.
        """
        flight = flight or Flight()
        attempts = 0
        reasked = False
        key = self.cache_key(task, messages)
        if key is not None and self.cache is not None:
            try:
                hit = self.cache.get(key)
            except Exception as error:
                raise AskError(error, 0, False) from error
            if hit is not None:
                try:
                    value = task.parse(hit.content)
                except ValidationError:  # no longer valid (the task's parsing changed): asked again below
                    pass
                else:
                    self.stats.cache_hits += 1
                    if on_call is not None:
                        on_call(
                            CallEvent(
                                label, sentence, task.name, 0, "cached", self.wall_clock(), model=self.backend.name
                            )
                        )
                    return Answer(value, 0, False)
        question = _Question(on_call, label, sentence, task.name, self.backend.name) if on_call is not None else None

        def count() -> None:
            nonlocal attempts
            attempts += 1
            if question is not None:
                question.attempt = attempts
            if on_attempt is not None:
                on_attempt()

        try:
            response = await self._call(task, messages, usage, count, label, on_retry, flight, question)
            try:
                value, content = self._validated(task, response.content or "")
            except ValidationError as error:
                if question is not None:
                    invalid = AnswerValidationError(
                        f"invalid answer, re-asked: {_short(error)}", content=response.content or ""
                    )
                    question.settle("invalid", invalid)
                flight.check(f"not re-asked after an invalid answer ({_short(error)})", error)
                reasked = True
                self.stats.reasks += 1
                again = reask_messages(messages, response.content or "", _short(error))
                response = await self._call(task, again, usage, count, label, on_retry, flight, question)
                try:
                    value, content = self._validated(task, response.content or "")
                except ValidationError as error2:
                    invalid = AnswerValidationError(
                        f"invalid answer after one re-ask: {_short(error2)}", content=response.content or ""
                    )
                    if question is not None:
                        question.settle("invalid", invalid)
                    raise invalid from None
            if question is not None:
                question.settle("ok")
            if key is not None and self.cache is not None:  # under the question's own key, re-asked or not
                self.cache.put(key, content, response.prompt_tokens, response.completion_tokens)
        except Exception as error:
            raise AskError(error, attempts, reasked) from error
        return Answer(value, attempts, reasked)

    def _validated(self, task: Task[Any], content: str) -> tuple[Any, str]:
        """The answer ``content`` holds and the text it was read from: ``content`` itself, or what
        :meth:`~polytask.Task.recover` read from it without guessing (counted in ``stats.recovered``).

        Raises:
            ValidationError: no valid answer in it; the error of the recovered text when there was one (it names
                what is still wrong, e.g. an enum value, rather than the fence around it).
        """
        try:
            return task.parse(content), content
        except ValidationError:
            recovered = task.recover(content)
            if recovered is None or recovered == content:
                raise
        value = task.parse(recovered)
        self.stats.recovered += 1
        return value, recovered

    async def _call(
        self,
        task: Task[Any],
        messages: list[Message],
        usage: Usage,
        count: Callable[[], None],
        label: str,
        retrying: Callable[[BaseException], None] | None = None,
        flight: Flight | None = None,
        question: _Question | None = None,
    ) -> ChatResponse:
        flight = flight or Flight()
        raw = self.estimator.raw(messages)
        budget = self.budget(task)
        full = False  # after a cut-off under a learned cap, ask with the task's whole max_tokens

        def request() -> ChatRequest:
            return ChatRequest(
                messages=messages,
                schema_name=task.name,
                json_schema=task.json_schema(),
                max_tokens=task.max_tokens if full else budget.cap,
                temperature=self.temperature,
                prompt_tokens_estimate=self.estimator.estimate(raw),
            )

        async def attempt() -> ChatResponse:
            req = request()
            probe = await self.breaker.wait() if self.breaker.state != "closed" else 0
            try:
                return await sent(req, probe)
            except BaseException:
                self.breaker.on_other(probe)  # e.g. too large for the TPM limit, or cancelled while queued
                raise

        async def sent(req: ChatRequest, probe: int) -> ChatResponse:
            nonlocal full
            slots = self.concurrency.limiter
            began, wall = self.clock.now(), self.wall_clock()
            try:
                slots.acquire_nowait()  # no scheduling round trip when a slot is free and nobody waits
            except anyio.WouldBlock:
                await slots.acquire()
            queued = self.clock.now()
            try:
                hold = self._reserve(req)  # before the rate limiter: a call over budget takes no TPM budget
                try:
                    reservation = await self.limiter.acquire(req.reserved_tokens) if self.limiter else None
                    flight.check("not sent")  # the last moment before the request goes out
                    count()
                    self.stats.requests += 1
                    usage.requests += 1
                    flight.sending = True
                    sending = self.clock.now()
                    try:
                        response = await self.backend.complete(req)
                    except BaseException as error:
                        for update in self._failed(error, probe):
                            await update
                        later = self._retry_later(error)
                        if question is not None and isinstance(error, Exception):
                            question.emit(
                                question.event(
                                    "error",
                                    wall,
                                    queue_wait=queued - began,
                                    rate_limit_wait=sending - queued,
                                    latency=self.clock.now() - sending,
                                    http_status=getattr(error, "status_code", None),
                                    error_type=type(later or error).__name__,
                                    error=str(error)[:300],
                                    request_id=getattr(error, "request_id", None),
                                    retry_after=getattr(error, "retry_after", None),
                                    cost=0.0 if self.prices is not None else None,
                                )
                            )
                        if later is not None:
                            raise later from error
                        raise
                    finally:
                        flight.sending = False
                except BaseException:
                    if hold is not None and self.spending is not None:
                        self.spending.release(hold)  # no response, no usage: nothing to pay
                    raise
            finally:
                slots.release()
            cost = self._cost(response)
            if question is not None:
                question.pending = question.event(
                    "ok",
                    wall,
                    queue_wait=queued - began,
                    rate_limit_wait=sending - queued,
                    latency=response.latency or self.clock.now() - sending,
                    prompt_tokens=response.prompt_tokens,
                    completion_tokens=response.completion_tokens,
                    cached_tokens=response.cached_tokens,
                    cost=cost if self.prices is not None else None,
                    http_status=200,
                    request_id=response.request_id,
                )
            if hold is not None and self.spending is not None:
                self.spending.settle(hold, cost)
            await _done(self._succeeded(response, cost))
            usage.add(
                response.prompt_tokens, response.completion_tokens, 0, cost=cost, cached_tokens=response.cached_tokens
            )
            if reservation is not None and self.limiter is not None:
                await _done(
                    self.limiter.settle(
                        reservation,
                        prompt_tokens=response.prompt_tokens,
                        completion_tokens=response.completion_tokens,
                        max_tokens=req.max_tokens,
                    )
                )
            self.estimator.observe(raw, response.prompt_tokens)
            if response.finish_reason == "length":
                if req.max_tokens < task.max_tokens:
                    if question is not None:
                        cut = LengthLimitError(
                            f"cut off at the learned max_tokens={req.max_tokens}; asked again in full"
                        )
                        question.settle("error", cut)
                    flight.check(f"not asked again in full after an answer cut off at max_tokens={req.max_tokens}")
                    full = True  # the learned cap was too small for this answer: not the answer's fault
                    return await attempt()
                after = f"after {response.completion_tokens} tokens " if response.completion_tokens else ""
                length = LengthLimitError(
                    f"the answer was cut off {after}(max_tokens={req.max_tokens})", content=response.content
                )
                if question is not None:
                    question.settle("error", length)
                raise length
            if response.refusal:
                refusal = RefusalError(response.refusal)
                if question is not None:
                    question.settle("error", refusal)
                raise refusal
            budget.observe(response.completion_tokens)
            return response

        def on_retry(error: BaseException, wait: float) -> None:
            flight.check(f"not retried after {type(error).__name__} ({error})", error)  # nor waits for the backoff
            self.stats.retries += 1
            logger.debug("retrying %s/%s in %.2fs after %s: %s", label, task.name, wait, type(error).__name__, error)
            if retrying is not None:
                retrying(error)

        return await self.retry.call(attempt, sleep=self.clock.sleep, on_retry=on_retry, now=self.clock.now)

    def _reserve(self, request: ChatRequest) -> BudgetReservation | None:
        """Hold the call's worst-case cost (its prompt estimate and all of ``max_tokens``) in the spending budget.

        Raises:
            BudgetExceededError: the call could take the run past its budget; it must not be sent.
        """
        if self.spending is None or self.prices is None:
            return None
        return self.spending.reserve(self.prices.cost(request.prompt_tokens_estimate, request.max_tokens))

    def _cost(self, response: ChatResponse) -> float:
        """USD for the usage the server reported (0 with unknown prices)."""
        if self.prices is None:
            return 0.0
        return self.prices.cost(response.prompt_tokens, response.completion_tokens, response.cached_tokens)

    def _succeeded(self, response: ChatResponse, cost: float) -> Awaitable[None] | None:
        """Count a response; returns the limiter's update (an awaitable for a shared limiter), if any."""
        self.stats.prompt_tokens += response.prompt_tokens
        self.stats.completion_tokens += response.completion_tokens
        self.stats.cached_tokens += response.cached_tokens
        self.stats.cost += cost
        self.breaker.on_success()
        self.concurrency.on_success(response.latency)
        if self.limiter is not None:
            return self.limiter.observe(response.rate_limits)
        return None

    def _failed(self, error: BaseException, probe: int) -> list[Awaitable[None]]:
        """Feed a failed call (``probe``: its probe number, 0 if it was none) to the limiter, the breaker and the
        concurrency controller; returns the limiter's updates to await (a shared limiter's round trips)."""
        updates: list[Awaitable[None]] = []
        if self.limiter is not None:  # a 429 states limits (headers or message): learn them; else just wake waiters
            seen = self.limiter.observe(error.rate_limits if isinstance(error, RateLimitError) else None)
            if seen is not None:
                updates.append(seen)
        if isinstance(error, RateLimitError):
            self.stats.rate_limited += 1
            self.breaker.on_other(probe)
            if isinstance(error, QuotaExceededError):
                return updates
            wait = error.retry_after or 0.0
            if self.limiter is not None and wait <= self.retry.max_retry_after:
                # every call waits the pause out, then goes paced (a longer one stops the run: _retry_later)
                paused = self.limiter.pause(wait, error.rate_limits)
                if paused is not None:
                    updates.append(paused)
            known = self.limiter is not None and (self.limiter.rpm is not None or self.limiter.tpm is not None)
            if not known:  # a 429 no known limit explains: the server is overloaded
                self.concurrency.on_overload()
        elif is_server_failure(error):
            self.breaker.on_failure(error, probe)
            overloaded = isinstance(error, APITimeoutError) or (
                isinstance(error, ServerError) and error.status_code in (502, 503, 504)
            )
            if overloaded:
                self.concurrency.on_overload()
        elif isinstance(error, APIStatusError):
            self.breaker.on_success()  # a 4xx answer: the server is up
        else:
            self.breaker.on_other(probe)
        return updates

    def _retry_later(self, error: BaseException) -> RetryLaterError | None:
        """``error`` as the :class:`~polytask.RetryLaterError` that stops the run when it is a 429 asking to wait
        longer than the policy's ``max_retry_after`` (the wait is dated by ``wall_clock`` now, as it arrives); else
        None."""
        if not isinstance(error, RateLimitError) or isinstance(error, QuotaExceededError | RetryLaterError):
            return None
        wait, most = error.retry_after, self.retry.max_retry_after
        if wait is None or wait <= most:
            return None
        resume_at: datetime | None = None
        when = "it gave no time to resume"
        with contextlib.suppress(OverflowError, OSError, ValueError):  # a wait too long to be a date
            resume_at = datetime.fromtimestamp(self.wall_clock() + wait, UTC)
            shown = resume_at.replace(second=0, microsecond=0)
            shown += timedelta(minutes=1) if shown != resume_at else timedelta()  # rounded up: never too early
            when = f"resume after {shown:%Y-%m-%d %H:%M} UTC (rerun the same command)"
        said = str(error).removeprefix(f"HTTP {error.status_code}: ")[:300]
        return RetryLaterError(
            f"the server asks to wait {wait:.0f} s (Retry-After), longer than max_retry_after={most:g} s: the run "
            f"stopped; {when}. The server said: {said}",
            status_code=error.status_code,
            code=error.code,
            request_id=error.request_id,
            retry_after=wait,
            resume_at=resume_at,
        )
