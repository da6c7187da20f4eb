"""polytask: run many small structured LLM tasks over every sentence of every document, under rate limits.

Example::

    import polytask as pt

    backend = pt.OpenAIBackend(model="gpt-4o-mini", rpm=500, tpm=200_000)
    async with pt.Orchestrator(backend, tasks=[pt.Sentiment(), pt.Entities()]) as orch:
        async for doc in orch.stream(["Hello from Paris.", "这是一段文本。"]):
            print(doc.id, doc.results["sentiment"].label, doc.results["entities"].entities)

``import polytask`` never imports torch: :class:`TransformersBackend` is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._analyze import analyze, analyze_sync
from ._version import __version__
from .backends._batch import BatchOptions
from .backends.base import Backend, BackendSettings, ChatRequest, ChatResponse, RateLimitHeaders
from .backends.function import FunctionBackend
from .backends.openai import OpenAIBackend
from .cache import RequestCache
from .costs import Budget, Prices, prices_for
from .documents import Document, DocumentResult, ErrorInfo, PairResult, Sentence, Usage
from .dry_run import DryRun
from .exceptions import (
    AnswerError,
    AnswerValidationError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BackendClosedError,
    BackendError,
    BadRequestError,
    BudgetExceededError,
    CircuitOpenError,
    ConfigurationError,
    DeadlineExceededError,
    InputError,
    LengthLimitError,
    LimiterUnavailableError,
    MalformedResponseError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    PolytaskError,
    QuotaExceededError,
    RateLimitError,
    RefusalError,
    RequestTooLargeError,
    RetryLaterError,
    RunStopped,
    ServerDownError,
    ServerError,
    ServerUnreachableError,
    UnprocessableEntityError,
    WorkerLostError,
)
from .limits import Clock, MonotonicClock, RateLimiter
from .orchestrator import Orchestrator, RunStats, run_sync
from .retry import RetryPolicy
from .segment import segment
from .tasks import (
    Classify,
    DocumentEntities,
    DocumentLabels,
    DocumentSentiment,
    Entities,
    Entity,
    Sentiment,
    Task,
)
from .tools import AnalyzeTool
from .traces import CallEvent, JsonlTrace

if TYPE_CHECKING:
    from .backends.transformers import TransformersBackend
    from .ray_runner import RayOrchestrator
    from .redis_limiter import RedisRateLimiter


__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AnalyzeTool",
    "AnswerError",
    "AnswerValidationError",
    "AuthenticationError",
    "Backend",
    "BackendClosedError",
    "BackendError",
    "BackendSettings",
    "BadRequestError",
    "BatchOptions",
    "Budget",
    "BudgetExceededError",
    "CallEvent",
    "ChatRequest",
    "ChatResponse",
    "CircuitOpenError",
    "Classify",
    "Clock",
    "ConfigurationError",
    "DeadlineExceededError",
    "Document",
    "DocumentEntities",
    "DocumentLabels",
    "DocumentResult",
    "DocumentSentiment",
    "DryRun",
    "Entities",
    "Entity",
    "ErrorInfo",
    "FunctionBackend",
    "InputError",
    "JsonlTrace",
    "LengthLimitError",
    "LimiterUnavailableError",
    "MalformedResponseError",
    "ModelNotFoundError",
    "MonotonicClock",
    "NotFoundError",
    "OpenAIBackend",
    "Orchestrator",
    "PairResult",
    "PermissionDeniedError",
    "PolytaskError",
    "Prices",
    "QuotaExceededError",
    "RateLimitError",
    "RateLimitHeaders",
    "RateLimiter",
    "RayOrchestrator",
    "RedisRateLimiter",
    "RefusalError",
    "RequestCache",
    "RequestTooLargeError",
    "RetryLaterError",
    "RetryPolicy",
    "RunStats",
    "RunStopped",
    "Sentence",
    "Sentiment",
    "ServerDownError",
    "ServerError",
    "ServerUnreachableError",
    "Task",
    "TransformersBackend",
    "UnprocessableEntityError",
    "Usage",
    "WorkerLostError",
    "__version__",
    "analyze",
    "analyze_sync",
    "prices_for",
    "run_sync",
    "segment",
]


def __getattr__(name: str) -> Any:
    if name == "RedisRateLimiter":  # imports redis-py only when asked for
        from .redis_limiter import RedisRateLimiter

        return RedisRateLimiter
    if name == "RayOrchestrator":  # imports ray only when it runs
        from .ray_runner import RayOrchestrator

        return RayOrchestrator
    if name == "TransformersBackend":
        from .backends.transformers import TransformersBackend

        return TransformersBackend
    raise AttributeError(f"module 'polytask' has no attribute {name!r}")
