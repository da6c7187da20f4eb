"""Retry policy by failure kind, on tenacity.

Retried (exponential backoff with full jitter added, never shorter than the server's Retry-After): 408, 409,
429 (except ``insufficient_quota``), 5xx, timeouts, connection errors, malformed 200 bodies and calls held back by
an open circuit breaker.
Never retried: 400, 401, 403, 404, 422, ``insufficient_quota``, refusals, ``finish_reason == "length"``,
requests larger than the TPM limit, and cancellation (tenacity only sees ``Exception``; anyio's cancellation is a
``BaseException`` and passes straight through).

Backoff after attempt *n* (1-based): ``min(wait_max, wait_initial · wait_exp_base^(n-1)) + U(0, wait_jitter)``
seconds, then raised to the server's ``retry_after`` if that is longer (the scheme of tenacity's
``wait_exponential_jitter`` and stamina). A call is not retried when the server asks for more than
``max_retry_after`` seconds (such a 429 stops a run: :class:`~polytask.RetryLaterError`), nor when the wait would
end past the policy's ``timeout``; an attempt still running at the ``timeout`` is cancelled.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from .exceptions import APITimeoutError, is_retryable

__all__ = ["RetryPolicy", "is_retryable"]

T = TypeVar("T")


class RetryPolicy(BaseModel):
    """How often and how long to retry one call.

    Attributes:
        attempts: the most attempts per call, the first included (default 6).
        timeout: the most seconds spent on one call across its attempts and waits, or None (default None): no
            retry whose wait would end past it, and an attempt still running then is cancelled
            (:class:`~polytask.APITimeoutError`).
        max_retry_after: the longest server-requested wait (Retry-After) honoured, seconds (default 300); a call
            the server asks to wait longer is not retried: it fails with its error (a misconfigured server), and
            in a run a 429 asking that (a daily quota) stops the run (:class:`~polytask.RetryLaterError`, raised
            by the caller) instead of every later call meeting it in turn.
        wait_initial: the first backoff, seconds (default 0.25).
        wait_max: the largest backoff before jitter, seconds (default 30).
        wait_exp_base: growth factor per attempt (default 2).
        wait_jitter: the most random seconds added to each backoff (default 0.5).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    attempts: int = Field(default=6, ge=1)
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_retry_after: float = Field(default=300.0, ge=0)
    wait_initial: float = Field(default=0.25, ge=0)
    wait_max: float = Field(default=30.0, ge=0)
    wait_exp_base: float = Field(default=2.0, ge=1)
    wait_jitter: float = Field(default=0.5, ge=0)

    def backoff(self, attempt: int, exc: BaseException | None, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based) that raised ``exc``."""
        wait = min(self.wait_max, self.wait_initial * self.wait_exp_base ** (attempt - 1))
        wait += (rng or random).uniform(0, self.wait_jitter)
        server = getattr(exc, "retry_after", None)
        return max(wait, server) if server is not None else wait

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        sleep: Callable[[float], Awaitable[None]],
        on_retry: Callable[[BaseException, float], None] | None = None,
        rng: random.Random | None = None,
        now: Callable[[], float] = time.monotonic,
    ) -> T:
        """Run ``fn`` until it succeeds, fails with a non-retryable error, or the policy is spent.

        Args:
            fn: one attempt.
            sleep: how to wait (an injected clock's sleep in tests).
            on_retry: called with the error and the backoff in seconds before each wait.
            rng: the random source of the jitter.
            now: the clock ``timeout`` is measured on, seconds (the injected clock's ``now`` in tests; an attempt
                is cut at the timeout by anyio's own clock).

        Returns:
            ``fn``'s result.

        Raises:
            The last attempt's error; :class:`~polytask.APITimeoutError` when the ``timeout`` cut an attempt short.
        """
        deadline = now() + self.timeout if self.timeout is not None else math.inf

        async def attempt() -> T:
            if deadline == math.inf:
                return await fn()
            with anyio.move_on_after(max(0.0, deadline - now())):
                return await fn()
            raise APITimeoutError(f"no answer within the retry policy's timeout of {self.timeout:g} s")

        def worth_waiting(error: BaseException, wait: float) -> bool:
            server = getattr(error, "retry_after", None)
            return (server is None or server <= self.max_retry_after) and now() + wait < deadline

        # The first attempt runs outside tenacity: most calls succeed at once, and tenacity's per-call set-up
        # costs about 0.1 ms of CPU, a tenth of the whole pipeline's budget per call.
        try:
            return await attempt()
        except Exception as error:
            if not is_retryable(error) or self.attempts == 1:
                raise
            first = error
        wait_first = self.backoff(1, first, rng)
        if not worth_waiting(first, wait_first):
            raise first
        if on_retry:
            on_retry(first, wait_first)
        await sleep(wait_first)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.backoff(state.attempt_number + 1, exc, rng)

        def stop(state: RetryCallState) -> bool:  # tenacity ≥ 9 computes the wait first: upcoming_sleep
            exc = state.outcome.exception() if state.outcome else None
            spent = state.attempt_number + 1 >= self.attempts
            return spent or exc is None or not worth_waiting(exc, state.upcoming_sleep)

        def before_sleep(state: RetryCallState) -> None:
            if on_retry and state.outcome and state.next_action:
                exc = state.outcome.exception()
                if exc is not None:
                    on_retry(exc, state.next_action.sleep)

        retrying = AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(is_retryable),
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return await retrying(attempt)
