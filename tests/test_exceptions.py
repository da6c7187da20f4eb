"""What each error means for a run, decided in one place (``polytask.exceptions``) and asked by the retry policy,
the caller, the orchestrator and the CLI: every class of the error tree walked through it."""

from __future__ import annotations

import inspect

import pytest

from polytask import exceptions

# (retryable, fatal_to_run, server_failure, outage_sign), as the tree in the module docstring draws it
EXPECTED = {
    "PolytaskError": (False, False, False, False),
    "ConfigurationError": (False, True, False, False),
    "ModelNotFoundError": (False, True, False, False),
    "InputError": (False, False, False, False),
    "RequestTooLargeError": (False, False, False, False),
    "RunStopped": (False, False, False, False),
    "BudgetExceededError": (False, True, False, False),
    "WorkerLostError": (False, True, False, False),
    "BackendError": (False, False, False, False),
    "BackendClosedError": (False, True, False, False),
    "CircuitOpenError": (True, False, False, True),
    "ServerDownError": (False, True, False, False),
    "APIConnectionError": (True, False, True, True),
    "APITimeoutError": (True, False, True, True),
    "APIStatusError": (False, False, False, False),
    "BadRequestError": (False, False, False, False),
    "AuthenticationError": (False, True, False, False),
    "PermissionDeniedError": (False, False, False, False),
    "NotFoundError": (False, False, False, False),
    "UnprocessableEntityError": (False, False, False, False),
    "RateLimitError": (True, False, False, False),
    "QuotaExceededError": (False, True, False, False),
    "RetryLaterError": (False, True, False, False),
    "ServerError": (True, False, True, True),
    "ServerUnreachableError": (False, True, False, False),
    "MalformedResponseError": (True, False, True, True),
    "AnswerError": (False, False, False, False),
    "LengthLimitError": (False, False, False, False),
    "RefusalError": (False, False, False, False),
    "AnswerValidationError": (False, False, False, False),
}
ASK = (exceptions.is_retryable, exceptions.is_fatal_to_run, exceptions.is_server_failure, exceptions.is_outage_sign)


def instance(cls: type[Exception]) -> Exception:
    """One instance of ``cls``, whatever its constructor takes."""
    params = inspect.signature(cls.__init__).parameters
    if "resume_at" in params:
        return cls("x", retry_after=86_400.0, resume_at=None)
    if "status_code" in params:
        return cls("x", status_code=500)
    if "content" in params:
        return cls("x", content="{}")
    if "tpm" in params:
        return cls(10, 5.0)
    if "base_url" in params:
        return cls("x", base_url="http://127.0.0.1:9/v1")
    if "hint" in params:
        return cls("m", "h")
    if "worst_case_usd" in params:
        return cls("x", limit_usd=1.0, spent_usd=0.9, reserved_usd=0.0, worst_case_usd=0.2)
    return cls("x")


def test_every_exception_class_is_classified_as_the_tree_says() -> None:
    classes = {n: getattr(exceptions, n) for n in exceptions.__all__ if inspect.isclass(getattr(exceptions, n))}
    assert set(classes) == set(EXPECTED)  # a new error class must be placed in the table (and the tree)
    for name, cls in classes.items():
        got = tuple(ask(instance(cls)) for ask in ASK)
        assert got == EXPECTED[name], name


@pytest.mark.parametrize("error", [ValueError("x"), KeyboardInterrupt(), TimeoutError()])
def test_foreign_exceptions_are_never_retried_nor_stop_the_run(error: BaseException) -> None:
    assert not any(ask(error) for ask in ASK)


def test_the_retry_policy_asks_the_same_question() -> None:
    from polytask.retry import is_retryable

    assert is_retryable is exceptions.is_retryable


def test_retry_later_is_a_rate_limit_error_that_stops_the_run() -> None:
    # `except RateLimitError` still catches it; what it means for a run is its own
    error = exceptions.RetryLaterError("wait", retry_after=86_400.0, resume_at=None)
    assert isinstance(error, exceptions.RateLimitError) and error.status_code == 429
    assert error.retry_after == 86_400.0 and error.resume_at is None
    assert exceptions.is_fatal_to_run(error) and not exceptions.is_retryable(error)
