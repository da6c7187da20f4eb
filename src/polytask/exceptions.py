"""The polytask error tree.

Errors from the layer below (openai, httpx2, transformers) are translated at the backend seam into these,
most specific first, so callers never catch a third-party exception type::

    PolytaskError
    ├── ConfigurationError          bad settings (a negative RPM, an unknown task name, …)
    │   └── ModelNotFoundError      the local model is not on disk (never downloaded)
    ├── InputError                  a bad input document; names the line / field
    ├── RequestTooLargeError        one call needs more tokens than the TPM limit ever allows; fails fast
    ├── RunStopped                  a pair not done because the run stopped (quota, a rejected key, …)
    ├── BackendError                the call did not produce an answer
    │   ├── BackendClosedError      the backend was closed: stops the run          (never retried)
    │   ├── CircuitOpenError        held by the open circuit breaker; a probe failed (retried)
    │   ├── ServerDownError         the server failed everything for ``max_outage`` s: stops the run
    │   ├── APIConnectionError      the connection failed or was reset            (retried)
    │   │   └── APITimeoutError     no answer within the timeout                   (retried)
    │   ├── APIStatusError          the server answered 4xx / 5xx; ``status_code``
    │   │   ├── BadRequestError           400                                      (never retried)
    │   │   ├── AuthenticationError       401                                      (never retried)
    │   │   ├── PermissionDeniedError     403                                      (never retried)
    │   │   ├── NotFoundError             404                                      (never retried)
    │   │   ├── UnprocessableEntityError  422                                      (never retried)
    │   │   ├── RateLimitError            429; ``retry_after`` seconds             (retried)
    │   │   │   └── QuotaExceededError    429 ``insufficient_quota``: stops the run (never retried)
    │   │   └── ServerError               408, 409, 5xx                            (retried)
    │   └── MalformedResponseError  a 200 whose body is not a chat completion       (retried)
    └── AnswerError                 an answer arrived but cannot be used
        ├── LengthLimitError        ``finish_reason == "length"``: truncated        (never "repaired")
        ├── RefusalError            the model refused                              (never retried)
        └── AnswerValidationError   invalid for the task's schema after one re-ask

Retry decisions live in :mod:`polytask.retry`; every error here carries enough to make them.
"""

from __future__ import annotations

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
    "RunStopped",
    "ServerDownError",
    "ServerError",
    "UnprocessableEntityError",
]


class PolytaskError(Exception):
    """Base class of every error polytask raises."""


class ConfigurationError(PolytaskError, ValueError):
    """A setting is invalid (the message names it)."""


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


class BackendError(PolytaskError):
    """The backend did not produce an answer."""


class BackendClosedError(BackendError):
    """The backend was closed (its ``aclose()``, which an :class:`~polytask.Orchestrator` calls when its
    ``async with`` block ends unless ``close_backend=False``): no later call can succeed, so the run stops."""


class APIConnectionError(BackendError):
    """The connection failed, was refused or reset before a response arrived."""


class APITimeoutError(APIConnectionError):
    """No response arrived within the call's timeout."""


class CircuitOpenError(BackendError):
    """Not sent: the server failed the calls before this one and the probe sent after the circuit breaker's cooldown
    (see :class:`~polytask.concurrency.CircuitBreaker`). Retried like a server error, one cooldown later."""


class ServerDownError(BackendError):
    """The server failed every call, and every probe of the circuit breaker, for the orchestrator's ``max_outage``
    seconds: the run stops (documents taken in are kept, unfinished pairs end ``RunStopped``) instead of turning
    every remaining pair into an error one cooldown at a time."""


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


class PermissionDeniedError(APIStatusError):
    """403: the key may not use this model or endpoint."""


class NotFoundError(APIStatusError):
    """404: unknown model or endpoint."""


class UnprocessableEntityError(APIStatusError):
    """422: the server understood the request and refused it."""


class RateLimitError(APIStatusError):
    """429: over the provider's RPM or TPM limit; ``retry_after`` says for how long, when the server said."""


class QuotaExceededError(RateLimitError):
    """429 with code ``insufficient_quota``: the account is out of credit. Stops the run; work done is kept."""


class ServerError(APIStatusError):
    """408, 409 or 5xx: a transient failure on the server's side."""


class MalformedResponseError(BackendError):
    """The server answered 200 but the body is not a chat completion (truncated or invalid JSON)."""


class AnswerError(PolytaskError):
    """An answer arrived but cannot be used for the task."""


class LengthLimitError(AnswerError):
    """The answer was cut off (``finish_reason == "length"``). Never repaired into a shorter valid answer."""


class RefusalError(AnswerError):
    """The model refused to answer. Attributes: ``refusal``, the model's refusal text."""

    def __init__(self, refusal: str) -> None:
        super().__init__(f"the model refused: {refusal}")
        self.refusal = refusal


class AnswerValidationError(AnswerError):
    """The answer did not match the task's schema, even after one re-ask with the validation error.

    Attributes:
        content: the last answer text received (truncated to 2,000 characters).
    """

    def __init__(self, message: str, *, content: str) -> None:
        super().__init__(message)
        self.content = content[:2000]
