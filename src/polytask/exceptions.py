"""The polytask error tree.

Errors from the layer below (openai, httpx2, transformers) are translated at the backend seam into these,
most specific first, so callers never catch a third-party exception type::

    PolytaskError
    ├── ConfigurationError          bad settings (a negative RPM, an unknown task name, …): stops the run
    │   └── ModelNotFoundError      the local model is not on disk (never downloaded)
    ├── InputError                  a bad input document; names the line / field
    ├── RequestTooLargeError        one call needs more tokens than the TPM limit ever allows; fails fast
    ├── RunStopped                  a pair not done because the run stopped (quota, a rejected key, …)
    ├── DeadlineExceededError       a pair not done by the caller's ``deadline``: its call was cancelled
    ├── LimiterUnavailableError     the shared rate limit (Redis) cannot be reached: stops the run
    ├── BudgetExceededError         the next call could take the run past its budget (USD): stops the run
    ├── WorkerLostError             a batch of documents lost its Ray worker more than ``max_retries`` times: stops
    ├── BackendError                the call did not produce an answer
    │   ├── BackendClosedError      the backend was closed: stops the run          (never retried)
    │   ├── CircuitOpenError        held by the open circuit breaker; a probe failed (retried)
    │   ├── ServerDownError         the server failed everything for ``max_outage`` s: stops the run
    │   ├── APIConnectionError      the connection failed or was reset            (retried)
    │   │   ├── APITimeoutError     no answer within the timeout                   (retried)
    │   │   └── ServerUnreachableError  refused / no such host, and no answer ever came: stops the run
    │   ├── APIStatusError          the server answered 4xx / 5xx; ``status_code``
    │   │   ├── BadRequestError           400                                      (never retried)
    │   │   ├── AuthenticationError       401                                      (never retried)
    │   │   ├── PermissionDeniedError     403                                      (never retried)
    │   │   ├── NotFoundError             404                                      (never retried)
    │   │   ├── UnprocessableEntityError  422                                      (never retried)
    │   │   ├── RateLimitError            429; ``retry_after`` seconds             (retried)
    │   │   │   ├── QuotaExceededError    429 ``insufficient_quota``: stops the run (never retried)
    │   │   │   └── RetryLaterError       429 asking to wait past ``max_retry_after``: stops the run
    │   │   └── ServerError               408, 409, 5xx                            (retried)
    │   └── MalformedResponseError  a 200 whose body is not a chat completion       (retried)
    └── AnswerError                 an answer arrived but cannot be used
        ├── LengthLimitError        ``finish_reason == "length"``: truncated        (never "repaired")
        ├── RefusalError            the model refused                              (never retried)
        └── AnswerValidationError   invalid for the task's schema after one re-ask

What each error means for a run is decided here and nowhere else: every class says whether another attempt could
succeed (``retryable``), whether no later call could (``fatal_to_run``: the run stops), whether the server or the
way to it failed (``server_failure``: the circuit breaker counts it) and whether it is a sign of an outage
(``outage_sign``: ``max_outage`` counts it). The retry policy, the caller, the orchestrator and the CLI ask through
:func:`is_retryable`, :func:`is_fatal_to_run`, :func:`is_server_failure` and :func:`is_outage_sign`, which answer
False for any exception that is not a :class:`PolytaskError`.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from .chat import RateLimitHeaders

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AnswerError",
    "AnswerValidationError",
    "AuthenticationError",
    "BackendClosedError",
    "BackendError",
    "BadRequestError",
    "BudgetExceededError",
    "CircuitOpenError",
    "ConfigurationError",
    "InputError",
    "LengthLimitError",
    "MalformedResponseError",
    "ModelNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "PolytaskError",
    "QuotaExceededError",
    "RateLimitError",
    "RefusalError",
    "RequestTooLargeError",
    "RetryLaterError",
    "RunStopped",
    "ServerDownError",
    "ServerError",
    "ServerUnreachableError",
    "UnprocessableEntityError",
    "WorkerLostError",
    "is_fatal_to_run",
    "is_outage_sign",
    "is_retryable",
    "is_server_failure",
]


class PolytaskError(Exception):
    """Base class of every error polytask raises; its class attributes say what the error means for a run."""

    retryable: ClassVar[bool] = False
    """Another attempt of the same call could succeed."""
    fatal_to_run: ClassVar[bool] = False
    """No later call could succeed either (a closed backend, a rejected key, no quota): the run stops."""
    server_failure: ClassVar[bool] = False
    """The server, or the connection to it, failed the call: the circuit breaker counts it."""
    outage_sign: ClassVar[bool] = False
    """A sign the server is down: counts toward the orchestrator's ``max_outage``."""


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt could succeed where this one failed."""
    return isinstance(exc, PolytaskError) and exc.retryable


def is_fatal_to_run(exc: BaseException) -> bool:
    """Whether no later call could succeed either, so the run stops."""
    return isinstance(exc, PolytaskError) and exc.fatal_to_run


def is_server_failure(exc: BaseException) -> bool:
    """Whether the server (or the way to it) failed the call: what the circuit breaker counts."""
    return isinstance(exc, PolytaskError) and exc.server_failure


def is_outage_sign(exc: BaseException) -> bool:
    """Whether the error is a sign the server is down: what ``max_outage`` counts."""
    return isinstance(exc, PolytaskError) and exc.outage_sign


class ConfigurationError(PolytaskError, ValueError):
    """A setting is invalid (the message names it). Met by a call (a transport that cannot run on this event loop),
    it stops the run: every later call would meet it too."""

    fatal_to_run = True


class InputError(PolytaskError, ValueError):
    """An input document is invalid.

    Attributes:
        line: 1-based line number in the input file, when read from a file.
        field: the offending field name, when one is to blame.
    """

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        where = []
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.line = line
        self.field = field


class ModelNotFoundError(ConfigurationError):
    """The local model is not on disk; polytask never downloads one at run time.

    Attributes:
        model: the path or hub id that was asked for.
    """

    def __init__(self, model: str, hint: str) -> None:
        super().__init__(f"local model {model!r} is not on disk: {hint}")
        self.model = model


class RequestTooLargeError(PolytaskError):
    """One call needs more tokens than the TPM bucket can ever hold, so waiting would never help.

    Attributes:
        tokens: the tokens the call reserves (prompt estimate + max completion tokens).
        tpm: the tokens-per-minute limit.
    """

    def __init__(self, tokens: int, tpm: float) -> None:
        super().__init__(
            f"a single call needs {tokens} tokens but the TPM limit is {tpm:g} tokens per minute; "
            "shorten the input (max_sentence_chars), lower max_tokens, or raise tpm"
        )
        self.tokens = tokens
        self.tpm = tpm


class RunStopped(PolytaskError):
    """A pair was not sent because the run stopped (a 429 ``insufficient_quota``, a 401); the work done is kept."""


class DeadlineExceededError(PolytaskError):
    """A pair was not done by the caller's ``deadline`` (:meth:`~polytask.Orchestrator.process`,
    :func:`~polytask.analyze`): its call was cancelled (a request at the server included, so the answer is not
    waited for) and the document came back partial, with what finished."""


class LimiterUnavailableError(PolytaskError):
    """The shared rate limit (:class:`~polytask.RedisRateLimiter`'s Redis) cannot be reached: no call may be sent
    without it (sending unlimited would draw 429s for every client of the key), so the run stops, keeping the work
    done; rerun once Redis is back, or give the limiter a ``fallback_share``."""

    fatal_to_run = True


class WorkerLostError(PolytaskError):
    """A batch of documents run on Ray (:mod:`polytask.ray_runner`) could not be finished: its worker died (or the
    task failed in Ray itself) on every one of its ``max_retries + 1`` tries. The run stops; the documents finished
    are kept, and a rerun (with the request cache) pays only for the rest.

    Attributes:
        batch: the batch's index (0-based, in input order).
        documents: the ids of the documents in it.
    """

    fatal_to_run = True

    def __init__(self, message: str, *, batch: int = -1, documents: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.batch = batch
        self.documents = documents


class BudgetExceededError(PolytaskError):
    """A call was not sent: its worst-case cost (prompt estimate + ``max_tokens``, at the run's prices) could take
    the run past its budget (:class:`~polytask.costs.Budget`). No later call may be sent either, so the run stops
    (every finished document is kept; with the request cache a rerun with a higher budget pays only for the rest).

    Attributes:
        limit_usd: the budget, USD.
        spent_usd: what the run had spent, USD.
        reserved_usd: the worst case of the calls in flight, USD.
        worst_case_usd: the worst case of the call that was not sent, USD.
    """

    fatal_to_run = True

    def __init__(
        self, message: str, *, limit_usd: float, spent_usd: float, reserved_usd: float, worst_case_usd: float
    ) -> None:
        super().__init__(message)
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.reserved_usd = reserved_usd
        self.worst_case_usd = worst_case_usd


class BackendError(PolytaskError):
    """The backend did not produce an answer."""


class BackendClosedError(BackendError):
    """The backend was closed (its ``aclose()``, which an :class:`~polytask.Orchestrator` calls when its
    ``async with`` block ends unless ``close_backend=False``): no later call can succeed, so the run stops."""

    fatal_to_run = True


class APIConnectionError(BackendError):
    """The connection failed, was refused or reset before a response arrived.

    Attributes:
        connected: whether a connection to the server was made at all: False when it was refused or its host name
            did not resolve (nothing answered at the address), True otherwise (a reset, a timeout, a TLS failure).
    """

    retryable = True
    server_failure = True
    outage_sign = True

    def __init__(self, message: str = "", *, connected: bool = True) -> None:
        super().__init__(message)
        self.connected = connected


class APITimeoutError(APIConnectionError):
    """No response arrived within the call's timeout."""


class ServerUnreachableError(APIConnectionError):
    """Nothing listens at the base URL (connection refused, no such host) and nothing there has answered this
    backend yet, even after a couple of quick retries: a configuration error (a wrong ``--base-url`` or port, a
    server not started), not an outage, so the run stops at once instead of retrying for ``max_outage``. Once the
    server has answered, a refused connection is an :class:`APIConnectionError` again (a server restarting).

    Attributes:
        base_url: the URL nothing listens at.
    """

    retryable = False
    fatal_to_run = True
    server_failure = False
    outage_sign = False

    def __init__(self, message: str, *, base_url: str) -> None:
        super().__init__(message, connected=False)
        self.base_url = base_url


class CircuitOpenError(BackendError):
    """Not sent: the server failed the calls before this one and the probe sent after the circuit breaker's cooldown
    (see :class:`~polytask.concurrency.CircuitBreaker`). Retried like a server error, one cooldown later."""

    retryable = True
    outage_sign = True


class ServerDownError(BackendError):
    """The server failed every call, and every probe of the circuit breaker, for the orchestrator's ``max_outage``
    seconds: the run stops (documents taken in are kept, unfinished pairs end ``RunStopped``) instead of turning
    every remaining pair into an error one cooldown at a time."""

    fatal_to_run = True


class APIStatusError(BackendError):
    """The server answered with an error status.

    Attributes:
        status_code: the HTTP status.
        code: the provider's error code from the body (``"rate_limit_exceeded"``, …), if any.
        request_id: the ``x-request-id`` header, if any.
        retry_after: seconds the server asked to wait (``retry-after-ms``, ``retry-after`` in seconds or as an HTTP
            date, or ``x-ratelimit-reset-*``), or None when it said nothing.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    """400: the request itself is wrong; retrying cannot help."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""

    fatal_to_run = True


class PermissionDeniedError(APIStatusError):
    """403: the key may not use this model or endpoint."""


class NotFoundError(APIStatusError):
    """404: unknown model or endpoint."""


class UnprocessableEntityError(APIStatusError):
    """422: the server understood the request and refused it."""


class RateLimitError(APIStatusError):
    """429: over the provider's RPM or TPM limit; ``retry_after`` says for how long, when the server said.

    Attributes:
        retry_after: seconds to wait, from the headers or, when they say nothing, from the message ("Please try
            again in 2.7s", "retry after 17 seconds").
        rate_limits: what the 429 says of the limits (:class:`~polytask.RateLimitHeaders`, from its ``x-ratelimit-*``
            headers or its message: "on tokens per min (TPM): Limit 30000, Used 29500"), so the limiter can learn
            the limit and which bucket ran out; None when it says nothing.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 429,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        rate_limits: RateLimitHeaders | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, code=code, request_id=request_id, retry_after=retry_after)
        self.rate_limits = rate_limits


class QuotaExceededError(RateLimitError):
    """429 with code ``insufficient_quota``: the account is out of credit. Stops the run; work done is kept."""

    retryable = False
    fatal_to_run = True


class RetryLaterError(RateLimitError):
    """429 whose Retry-After is longer than the retry policy's ``max_retry_after`` (a daily quota spent): no call
    could succeed before then, so the run stops instead of every call meeting the same 429 in turn; rerun after
    ``resume_at``. Raised by the caller (which knows the policy) from the server's :class:`RateLimitError`, its
    ``__cause__``.

    Attributes:
        retry_after: seconds the server asked to wait.
        resume_at: when that wait ends, in UTC (the wall clock when the 429 arrived + ``retry_after``), or None when
            the wait is too long to be a date.
    """

    retryable = False
    fatal_to_run = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 429,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float,
        resume_at: datetime | None,
    ) -> None:
        super().__init__(message, status_code=status_code, code=code, request_id=request_id, retry_after=retry_after)
        self.retry_after: float = retry_after
        self.resume_at = resume_at


class ServerError(APIStatusError):
    """408, 409 or 5xx: a transient failure on the server's side."""

    retryable = True
    server_failure = True
    outage_sign = True


class MalformedResponseError(BackendError):
    """The server answered 200 but the body is not a chat completion (truncated or invalid JSON)."""

    retryable = True
    server_failure = True
    outage_sign = True


class AnswerError(PolytaskError):
    """An answer arrived but cannot be used for the task.

    Attributes:
        content: what the model wrote (its answer text, as it came), or None when it wrote nothing; shown,
            truncated, in the pair's :class:`~polytask.ErrorInfo`. Only ever the model's text, never the request's.
    """

    content: str | None = None


class LengthLimitError(AnswerError):
    """The answer was cut off (``finish_reason == "length"``). Never repaired into a shorter valid answer.

    Attributes:
        content: the cut-off text, or None.
    """

    def __init__(self, message: str, *, content: str | None = None) -> None:
        super().__init__(message)
        self.content = content


class RefusalError(AnswerError):
    """The model refused to answer. Attributes: ``refusal`` (also ``content``), the model's refusal text."""

    def __init__(self, refusal: str) -> None:
        super().__init__(f"the model refused: {refusal}")
        self.refusal = refusal
        self.content = refusal


class AnswerValidationError(AnswerError):
    """The answer did not match the task's schema, even after one re-ask with the validation error.

    Attributes:
        content: the last answer text received (truncated to 2,000 characters).
    """

    def __init__(self, message: str, *, content: str) -> None:
        super().__init__(message)
        self.content = content[:2000]
