"""Documents → sentences → (sentence, task) calls → validated answers → merged documents, streamed.

One run ("job") is a producer and ``max_concurrency`` workers in an anyio task group:

- the producer reads documents lazily (at most ``max_pending_documents`` unfinished at a time, so input of any
  length streams in bounded memory), splits them into sentences and queues one pair per (sentence, task);
- each worker takes pairs first in, first out, so earlier documents finish first; a pair goes through the rate
  limiter, the backend, the retry policy and validation (one re-ask on an invalid answer) and always ends as a
  validated answer or a typed error;
- the worker that completes a document's last pair merges it and emits it.

A 429 ``insufficient_quota``, a 429 asking to wait past the retry policy's ``max_retry_after`` (a daily quota), a
401, a closed backend, a server that failed everything for ``max_outage`` seconds, or a call that could take the
run past its ``budget`` (USD) stops the run: queued pairs, and
calls still waiting (the circuit breaker, a concurrency slot, the rate limiter, a retry's backoff), end ``RunStopped``
at once; calls in flight at the server are let finish, since their answers are paid for: a valid answer is kept (and
cached), but nothing new is sent for them (no retry, no re-ask, no re-send of a cut-off answer: ``RunStopped``).
Every document already taken in is then emitted (partial where a pair did not finish), and the error is raised.
Nothing that was done, or paid for, is lost. Cancellation from outside (Ctrl-C) still ends calls in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._caller import Answer, AskError, Caller, CallStats, Flight
from ._checks import check_count, check_positive
from ._estimates import PromptEstimator, cached_tiktoken_counter
from ._prompts import build_messages, neighbours
from .backends.base import Backend, settings_of
from .cache import RequestCache
from .chat import Message
from .concurrency import AdaptiveConcurrency, CircuitBreaker
from .costs import Budget, Prices
from .documents import Document, DocumentResult, ErrorInfo, PairResult, Sentence, Usage, id_problem, surrogate_problem
from .dry_run import DryRun, Planner
from .exceptions import (
    AnswerValidationError,
    BadRequestError,
    ConfigurationError,
    DeadlineExceededError,
    InputError,
    LengthLimitError,
    PolytaskError,
    RefusalError,
    RequestTooLargeError,
    RunStopped,
    ServerDownError,
    is_fatal_to_run,
    is_outage_sign,
)
from .limits import Clock, Limiter, MonotonicClock, RateLimiter
from .packing import Packer, Unit
from .retry import RetryPolicy
from .segment import segment
from .tasks.base import Task
from .traces import CallEvent, call_hook, otel_tracer

__all__ = ["DocumentInput", "Orchestrator", "RunStats", "run_sync"]

logger = logging.getLogger("polytask")

DocumentInput = str | tuple[str | int, str] | list[Any] | Document | dict[str, Any]
"""A document as callers may pass it: its text, an ``(id, text)`` pair (or a two-item list), a :class:`Document`,
or a dict with ``text`` (and optionally ``id``; other keys become metadata)."""


@dataclass
class RunStats(CallStats):
    """Live counters of a run, for progress bars and summaries (all counts since the orchestrator was created).

    ``cost`` is USD at ``prices``, the run's prices; ``prices`` None means they are unknown, and ``cost`` (0) then
    says nothing about what the run cost.
    """

    prices: Prices | None = None
    documents_in: int = 0
    documents_done: int = 0
    documents_partial: int = 0
    pairs_done: int = 0
    pairs_failed: int = 0
    asked_alone: int = 0
    """Pairs of a fused or packed call (``fuse``, ``pack``) whose part of the answer was missing or invalid, or
    whose call's answer stayed unreadable, asked again alone."""


@dataclass
class _DocState:
    position: int
    document: Document
    sentences: list[Sentence]
    tasks: Sequence[Task[Any]]
    pairs: dict[tuple[int, str], PairResult] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    started: float | None = None
    events: list[CallEvent] = field(default_factory=list)  # its calls', kept for its OpenTelemetry spans

    @property
    def total(self) -> int:
        return len(self.sentences) * len(self.tasks)


@dataclass
class _Pair:
    state: _DocState
    sentence: Sentence
    task: Task[Any]


@dataclass
class _Work:
    """One call's worth of a document's pairs (:class:`~polytask.packing.Unit`), as the workers take them."""

    state: _DocState
    unit: Unit


MAX_CONCURRENCY = 10_000  # each call slot has two worker tasks; far past any provider's limits


@dataclass
class _Job:
    out: MemoryObjectSendStream[tuple[int, DocumentResult]]
    pending: anyio.Semaphore
    fatal: BaseException | None = None
    input_error: Exception | None = None  # a bad document, or what reading / segmenting the input raised
    stop_reading: bool = False
    calls: set[Flight] = field(default_factory=set)  # the pairs' calls still running
    deadline: float | None = None  # seconds, when the caller gave one and it has passed: pairs end DeadlineExceeded

    def expire(self, deadline: float) -> None:
        """The caller's deadline (``deadline`` seconds) passed: every pair not done ends at once with
        :class:`~polytask.DeadlineExceededError`, its call cancelled even at the server; the documents come back
        partial, and the run does not raise."""
        self.deadline = deadline
        for flight in list(self.calls):
            flight.expire()

    def stop(self, error: BaseException) -> None:
        """No later call could succeed (``error``): read no more, end every call still waiting (in a retry's backoff,
        on the rate limiter, …) at once, and let calls at the server finish with nothing new sent for them (see
        :class:`~polytask._caller.Flight`); pairs not answered end ``RunStopped``."""
        self.fatal = self.fatal or error
        self.stop_reading = True
        why = type(self.fatal).__name__
        for flight in self.calls:
            flight.stop(why)


def _late(deadline: float | None) -> str:
    return f"the caller's deadline of {deadline:g} s passed"


def coerce_document(item: Any, position: int) -> Document:
    """``item`` (any :data:`DocumentInput`) as the :class:`Document` an orchestrator makes of it at ``position``
    (0-based; the id of a document given without one). Raises :class:`~polytask.InputError` as a run would."""
    return _coerce(item, position)


def _coerce(item: Any, position: int) -> Document:
    document = _document(item, position)
    problem = surrogate_problem(document.text)
    if problem is not None:
        raise InputError(f"document {position}: 'text' {problem}", field="text")
    return document


def _document_id(value: Any, position: int) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise InputError(f"document {position}: 'id' {problem}", field="id")
    return str(position) if value is None else str(value)


def _document(item: Any, position: int) -> Document:
    if isinstance(item, Document):
        return item
    if isinstance(item, str):
        return Document(id=str(position), text=item)
    if isinstance(item, tuple | list) and len(item) == 2:  # (id, text), or [id, text] as JSON decodes it
        doc_id, text = item
        if not isinstance(text, str):
            raise InputError(f"document {position}: text must be a string, got {type(text).__name__}", field="text")
        return Document(id=_document_id(doc_id, position), text=text)
    if isinstance(item, dict):
        text = item.get("text")
        if not isinstance(text, str):
            raise InputError(f"document {position}: 'text' must be a string, got {type(text).__name__}", field="text")
        rest = {k: v for k, v in item.items() if k not in ("id", "text")}
        return Document(id=_document_id(item.get("id"), position), text=text, metadata=rest)
    raise InputError(
        f"document {position}: expected a str, an (id, text) pair, a Document or a dict with 'text', got "
        f"{type(item).__name__}"
    )


def _own_copy(error: BaseException) -> BaseException:
    """A shallow copy of ``error`` (type, args, attributes, cause, traceback) without calling its ``__init__``."""
    try:
        clone = type(error).__new__(type(error), *error.args)
        clone.__dict__.update(error.__dict__)
    except Exception:  # an exception type that cannot be copied this way: the original
        return error
    clone.__cause__, clone.__context__ = error.__cause__, error.__context__
    clone.__suppress_context__ = error.__suppress_context__
    return clone.with_traceback(error.__traceback__)


def _check_sentences(sentences: Any, text: str, position: int) -> None:
    """A custom segmenter's output: sentences numbered 0, 1, … in order, each ``text[start:end]``.

    Raises:
        ConfigurationError: naming the document and the first sentence that is not.
    """
    if not isinstance(sentences, list):
        raise ConfigurationError(f"document {position}: the segmenter returned {type(sentences).__name__}, not a list")
    for i, s in enumerate(sentences):
        ok = isinstance(s, Sentence) and s.index == i and 0 <= s.start <= s.end <= len(text)
        if not ok or text[s.start : s.end] != s.text:
            raise ConfigurationError(
                f"document {position}: the segmenter's sentence {i} is not Sentence(index={i}, start, end, "
                f"text=text[start:end]): {s!r}"
            )


async def _aiter(documents: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(documents, AsyncIterable):
        async for item in documents:
            yield item
    else:
        for item in documents:
            yield item


class Orchestrator:
    """Runs every task on every sentence of every document through one backend.

    Args:
        backend: where calls go (:class:`~polytask.OpenAIBackend`, the transformers backend, …).
        tasks: the tasks to run on every sentence (names must be unique).
        max_concurrency: the most calls in flight, at most 10,000 (default: the backend's
            ``settings.concurrency`` if it declares one — the local backend's is 2 × its batch size, so finished rows
            always find a waiting call — else 64).
        retry: the retry policy (default :class:`~polytask.RetryPolicy`).
        rpm, tpm: override the backend's requests- / tokens-per-minute limits (None: its ``settings.rpm`` /
            ``settings.tpm``, else learned).
        limiter: a :class:`~polytask.RateLimiter` to share between orchestrators, or a
            :class:`~polytask.RedisRateLimiter` to share with every process on the API key (overrides rpm / tpm).
        rate_window: the seconds over which the server enforces its RPM, in (0, 60] (Azure OpenAI: 1 or 10): the
            limiter's requests bucket holds ``rpm × rate_window / 60``, so no opening burst the server refuses
            (default: 60, or what the server's ``RateLimit-Policy`` header says; see :class:`~polytask.RateLimiter`).
        context_sentences: neighbouring sentences passed as context on each side (default 0).
        fuse: ask all the tasks of a sentence in one call, their schemas side by side (default False); each task's
            part of the answer is validated alone and, when invalid, asked again alone (see :mod:`polytask.packing`).
        pack: the most consecutive sentences of a document asked in one call (default 1: one call per sentence), as
            many as fit ``pack_tokens``; each sentence's answer is validated alone and, when missing or invalid,
            asked again alone. With ``fuse``, one call asks ``k`` sentences × every task. Entity offsets stay exact
            (aligned per sentence).
        pack_tokens: the most estimated tokens of one packed call, prompt + expected answer (default 2,048): a
            pack holds fewer sentences when they, or their answers, are long.
        max_sentence_chars: sentences longer than this many characters are split (default 1,000).
        max_pending_documents: documents read ahead of the slowest unfinished one (default ``max(64, 2 ×
            max_concurrency)``): bounds memory for input of any length.
        temperature: sampling temperature of every call (default 0).
        adaptive_concurrency: shrink the calls in flight on overload signals (503, timeouts, unexplained 429s) and
            to what the server works on at once when latency shows it queueing them (a local llama.cpp or Ollama),
            and grow them back (AIMD and TCP Vegas, :class:`~polytask.concurrency.AdaptiveConcurrency`); the
            current limit is ``orch.concurrency.limit`` (default: the backend's
            ``settings.adaptive_concurrency`` — False for the local backend, whose latency grows with its batch, not
            with overload — else True).
        learn_limits: learn RPM / TPM limits left unset from ``x-ratelimit-*`` headers (default True; never for a
            backend whose ``settings.learn_limits`` is False, the Batch API's).
        max_outage: seconds the server may fail every call and every circuit-breaker probe before the run stops
            with :class:`~polytask.ServerDownError` (default 300; None never stops). A dead server otherwise costs
            each remaining pair its retries, one cooldown (up to 60 s) each: hours for a large job.
        close_backend: close the backend when the ``async with`` block ends (default True).
        cache: a :class:`~polytask.cache.RequestCache`, or the path of one (opened here, closed with the
            orchestrator), or None (default): a question answered before — same backend identity, task, messages
            and temperature — is answered from it with no call, no rate-limit budget and no tokens
            (``stats.cache_hits``); every newly validated answer is stored.
        prices: what tokens cost, USD per million tokens (:class:`~polytask.Prices`), for the cost of every pair,
            document and run (``PairResult.cost``, ``DocumentResult.usage.cost``, ``stats.cost``); default: the
            backend's ``settings.prices`` (genai-prices' for a known model at a known provider, $0 for the local
            backend), else unknown (costs stay 0 and ``stats.prices`` is None).
        budget: a spending cap for the run, USD (> 0), or a :class:`~polytask.costs.Budget` to share between
            orchestrators, or None (default). Before each attempt the call's worst case (prompt estimate +
            ``max_tokens``, at ``prices``) is reserved; a call that could take the run past the cap is not sent and
            the run stops with :class:`~polytask.BudgetExceededError` (every finished document kept). Needs prices.
        clock: time source for the limiter, backoff waits and per-document time (tests inject a fake).
        segmenter: ``segmenter(text, max_chars=...) -> list[Sentence]`` (default :func:`polytask.segment`).
        on_call: a plain function, called with a :class:`~polytask.traces.CallEvent` as each call attempt ends (and
            for each answer from the cache): document, sentence, task, attempt, waits, latency, tokens, cost, status,
            error, request id, Retry-After (e.g. a :class:`~polytask.traces.JsonlTrace`, or your metrics). What it
            raises is logged.
        on_document: a plain function, called with each :class:`~polytask.DocumentResult` as it is finished. What
            it raises is logged.
            With ``opentelemetry-api`` installed (the ``otel`` extra), each document also becomes a span with a child
            span per call (see :mod:`polytask.traces`).

    Use it as an async context manager; ``stream`` needs it, ``run`` and ``process`` work either way (without it,
    ``await orch.aclose()`` at the end closes the backend's connections)::

        async with pt.Orchestrator(backend, tasks=[pt.Sentiment(), pt.Entities()]) as orch:
            async for doc in orch.stream(documents):
                print(doc.id, doc.results["sentiment"].label)

    Leaving an ``async for`` over :meth:`stream` early (``break``) ends the stream's run once the generator is
    closed: at the end of the ``async with`` block, or at once with ``contextlib.aclosing(orch.stream(...))``.

    Raises:
        ConfigurationError: no tasks, duplicate task names, a bad number, a ``budget`` without known prices, or an
            ``async`` hook.
    """

    def __init__(
        self,
        backend: Backend,
        tasks: Sequence[Task[Any]],
        *,
        max_concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        limiter: Limiter | None = None,
        rate_window: float | None = None,
        context_sentences: int = 0,
        fuse: bool = False,
        pack: int = 1,
        pack_tokens: int = 2048,
        max_sentence_chars: int = 1000,
        max_pending_documents: int | None = None,
        temperature: float = 0.0,
        adaptive_concurrency: bool | None = None,
        learn_limits: bool = True,
        max_outage: float | None = 300.0,
        close_backend: bool = True,
        clock: Clock | None = None,
        segmenter: Callable[..., list[Sentence]] = segment,
        cache: RequestCache | str | os.PathLike[str] | None = None,
        prices: Prices | None = None,
        budget: float | Budget | None = None,
        on_call: Callable[[CallEvent], None] | None = None,
        on_document: Callable[[DocumentResult], None] | None = None,
    ) -> None:
        tasks = list(tasks)
        if not tasks:
            raise ConfigurationError("at least one task is needed")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"task names must be unique, got {names}")
        declared = settings_of(backend)
        if max_concurrency is None:
            max_concurrency = declared.concurrency or 64
        if adaptive_concurrency is None:
            adaptive_concurrency = declared.adaptive_concurrency
        check_count("max_concurrency", max_concurrency, maximum=MAX_CONCURRENCY, allow_none=False)
        check_count("context_sentences", context_sentences, minimum=0, allow_none=False)
        check_count("max_sentence_chars", max_sentence_chars, allow_none=False)
        check_count("max_pending_documents", max_pending_documents)
        if prices is None:
            prices = declared.prices
        if prices is not None and not isinstance(prices, Prices):
            raise ConfigurationError(f"prices must be a polytask.Prices, got {type(prices).__name__}")
        if budget is not None and not isinstance(budget, Budget):
            budget = Budget(budget)  # ConfigurationError unless a finite number > 0
        if budget is not None and prices is None:
            raise ConfigurationError(
                f"budget needs prices, and none are known for {backend.name} (a model genai-prices does not list "
                "at that server, or a backend that declares none): pass prices=Prices(input=..., output=...) in USD "
                "per million tokens (--price-in/--price-out in the CLI)"
            )
        self.prices = prices
        self.budget = budget
        self.backend = backend
        self.tasks = tasks
        self.max_concurrency = max_concurrency
        self.retry = retry or RetryPolicy()
        self.clock: Clock = clock or (limiter.clock if limiter else MonotonicClock())
        where_rpm = "rpm" if rpm is not None else f"{type(backend).__name__}.rpm"
        where_tpm = "tpm" if tpm is not None else f"{type(backend).__name__}.tpm"
        rpm = rpm if rpm is not None else declared.rpm
        tpm = tpm if tpm is not None else declared.tpm
        check_positive(where_rpm, rpm)  # checked once, named where it came from
        check_positive(where_tpm, tpm)
        check_positive("max_outage", max_outage)
        self.max_outage = max_outage
        if limiter is not None and rate_window is not None:
            raise ConfigurationError("rate_window applies to the limiter made here: pass window= to your RateLimiter")
        learn_limits = learn_limits and declared.learn_limits
        if limiter is None and (rpm is not None or tpm is not None or learn_limits):
            limiter = RateLimiter(rpm, tpm, clock=self.clock, learn=learn_limits, window=rate_window)
        self.limiter = limiter
        self.context_sentences = context_sentences
        self.max_sentence_chars = max_sentence_chars
        self.max_pending_documents = max_pending_documents or max(64, 2 * max_concurrency)
        self.segmenter = segmenter
        self.stats = RunStats(prices=prices)
        self.concurrency = AdaptiveConcurrency(
            max_concurrency, clock=self.clock, decrease=0.9 if adaptive_concurrency else 1.0
        )
        self.breaker = CircuitBreaker(clock=self.clock)
        counter = cached_tiktoken_counter(declared.token_model) if declared.token_model else None
        self._owns_cache = cache is not None and not isinstance(cache, RequestCache)
        self.cache = RequestCache(cache) if cache is not None and not isinstance(cache, RequestCache) else cache
        self.caller = Caller(
            backend,
            retry=self.retry,
            limiter=self.limiter,
            concurrency=self.concurrency,
            breaker=self.breaker,
            estimator=PromptEstimator(counter),
            clock=self.clock,
            temperature=temperature,
            stats=self.stats,
            cache=self.cache,
            identity=declared.identity or backend.name,
            prices=prices,
            spending=budget,
        )
        self.packer = Packer(
            tasks,
            fuse=fuse,
            pack=pack,
            pack_tokens=pack_tokens,
            context_sentences=context_sentences,
            prompt_tokens=self.caller.estimator.raw,
        )
        self.close_backend = close_backend
        for name, hook in (("on_call", on_call), ("on_document", on_document)):
            if hook is not None and (
                inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(type(hook).__call__)
            ):
                raise ConfigurationError(
                    f"{name} must be a plain (synchronous) function: it is called as each call or document ends, "
                    "and a coroutine would never be awaited; hand the value to your async code through a queue "
                    "(e.g. an anyio memory object stream's send_nowait)"
                )
        self.on_call = on_call
        self.on_document = on_document
        self._otel = otel_tracer()
        self._tg: TaskGroup | None = None

    async def aclose(self) -> None:
        """Close the backend (when ``close_backend``), as the end of ``async with`` does: for an orchestrator used
        without ``async with`` (``run`` / ``process`` only), so its connections are not left open."""
        if self._owns_cache and self.cache is not None:
            self.cache.close()
        if self.close_backend:
            with anyio.CancelScope(shield=True):
                await self.backend.aclose()

    async def __aenter__(self) -> Orchestrator:
        if self._tg is not None:
            raise RuntimeError("this Orchestrator is already in use by an `async with` block; enter it once")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        tg, self._tg = self._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        try:
            return await tg.__aexit__(*exc_info)
        except BaseExceptionGroup as group:
            if exc_info[1] is not None and all(e is exc_info[1] for e in group.exceptions):
                return False  # only the block's own error: raise it as itself, not wrapped in a group
            raise
        finally:
            await self.aclose()

    # -- public API --------------------------------------------------------------------------------------------

    async def stream(
        self, documents: Iterable[DocumentInput] | AsyncIterable[DocumentInput], *, ordered: bool = False
    ) -> AsyncIterator[DocumentResult]:
        """Each document's merged result as soon as the document is complete.

        Args:
            documents: any iterable or async iterable of :data:`DocumentInput`, of any length (read lazily).
            ordered: yield in input order instead of completion order (later documents wait in a buffer).

        Yields:
            :class:`DocumentResult`, one per input document.

        Raises:
            QuotaExceededError, RetryLaterError, AuthenticationError, BackendClosedError, ServerDownError: no later
                call could succeed (``insufficient_quota``, a 429 asking to wait past ``max_retry_after``, a 401, a
                closed backend, a server down for ``max_outage``), so the run stops: raised after yielding every
                document taken in (their pairs still waiting end ``RunStopped`` at once, also those waiting out a
                retry's backoff; calls at the server are let finish and their answers kept, with nothing new sent).
            BudgetExceededError: the next call could take the run past its ``budget``; the run stops the same way.
            InputError: a document is not of an accepted shape; raised after the documents before it are yielded.
            Exception: whatever iterating ``documents`` (or the segmenter) raised, likewise after the documents
                before it are yielded.
            RuntimeError: used outside ``async with``, or read on after that block ended.
        """
        if self._tg is None:
            raise RuntimeError("use `async with Orchestrator(...) as orch:` around orch.stream(...)")
        send, receive = anyio.create_memory_object_stream[tuple[int, DocumentResult]](self.max_pending_documents)
        scope = anyio.CancelScope()
        job = _Job(out=send, pending=anyio.Semaphore(self.max_pending_documents))
        done = anyio.Event()

        finished = False

        async def run_job() -> None:
            nonlocal finished
            with scope:
                try:
                    await self._run_job(documents, job)
                    finished = True
                except Exception as error:  # delivered to the consumer, not to the orchestrator's task group
                    job.fatal = job.fatal or error
                finally:
                    send.close()
                    done.set()

        self._tg.start_soon(run_job)
        try:
            async with receive:
                if ordered:
                    buffer: dict[int, DocumentResult] = {}
                    want = 0
                    async for position, result in receive:
                        buffer[position] = result
                        while want in buffer:
                            yield buffer.pop(want)
                            want += 1
                    for position in sorted(buffer):
                        yield buffer.pop(position)
                else:
                    async for _, result in receive:
                        yield result
            await done.wait()
            if job.fatal is not None:
                raise job.fatal
            if not finished:  # cancelled from outside: the `async with` block ended while this stream was read
                raise RuntimeError("the Orchestrator was closed before this stream ended; later documents were lost")
        finally:
            scope.cancel()

    async def run(self, documents: Iterable[DocumentInput] | AsyncIterable[DocumentInput]) -> list[DocumentResult]:
        """Every document's result, in input order.

        Raises:
            As :meth:`stream` does; the error then carries the documents finished before it, in input order, as its
            ``results`` attribute (a stopped run loses nothing that was done).
        """
        return await self._collect(documents)

    async def _collect(
        self, documents: Iterable[DocumentInput] | AsyncIterable[DocumentInput], deadline: float | None = None
    ) -> list[DocumentResult]:
        """:meth:`run`, with the caller's ``deadline`` in seconds (None: none)."""
        send, receive = anyio.create_memory_object_stream[tuple[int, DocumentResult]](math.inf)
        job = _Job(out=send, pending=anyio.Semaphore(self.max_pending_documents))
        results: dict[int, DocumentResult] = {}

        async def expire_at_deadline(seconds: float) -> None:
            await self.clock.sleep(seconds)
            job.expire(seconds)

        async with send, receive:
            if deadline is None:
                await self._run_job(documents, job)
            else:
                async with anyio.create_task_group() as timer:
                    timer.start_soon(expire_at_deadline, deadline)
                    await self._run_job(documents, job)
                    timer.cancel_scope.cancel()
            send.close()
            async for position, result in receive:
                results[position] = result
        done = [results[i] for i in sorted(results)]
        if job.fatal is not None:
            error = _own_copy(job.fatal)  # this run's own: a backend may raise one error object in many runs
            with contextlib.suppress(AttributeError):  # an exception type with __slots__ cannot carry them
                error.results = done  # type: ignore[attr-defined]
            raise error
        return done

    def dry_run(self, documents: Iterable[DocumentInput]) -> DryRun:
        """What running ``documents`` would take, before any call: documents, sentences, calls (pairs not already in
        the request cache), estimated prompt and completion tokens, dollars, and the time the known RPM / TPM limits
        allow. Reads, checks and segments every document; sends nothing (see :mod:`polytask.dry_run`).

        Raises:
            InputError: a document is not of an accepted shape.
        """
        asked: set[int] = set()  # with a cache, a question asked twice in one job is paid once (hashes: 8 bytes)

        def cached(task: Task[Any], messages: list[Message]) -> bool:
            key = self.caller.cache_key(task, messages)
            if key is None:
                return False
            seen = hash(key)
            if seen in asked:
                return True
            asked.add(seen)
            return self.caller.is_cached(task, messages)

        cost = self.prices.cost if self.prices is not None else None
        planner = Planner(self.packer, prompt_tokens=self.caller.estimator.raw, cached=cached, cost=cost)
        for position, item in enumerate(documents):
            document = _coerce(item, position)
            sentences = self.segmenter(document.text, max_chars=self.max_sentence_chars)
            if self.segmenter is not segment:
                _check_sentences(sentences, document.text, position)
            planner.add(sentences)
        result = planner.result
        if self.limiter is not None:
            result.rpm, result.tpm = self.limiter.rpm, self.limiter.tpm
        return result

    async def process(self, document: DocumentInput, *, deadline: float | None = None) -> DocumentResult:
        """One document's result. Cancellation-safe: cancelling the caller cancels its calls and nothing else.

        Args:
            document: a :data:`DocumentInput`.
            deadline: seconds (on the orchestrator's clock) after which the result comes back with what finished:
                every pair not done by then ends :class:`~polytask.DeadlineExceededError` (its call cancelled, a
                request at the server included) and the result is ``partial``; None (default): no deadline.

        Raises:
            As :meth:`run` does; ConfigurationError: a deadline that is not a number > 0.
        """
        check_positive("deadline", deadline)
        return (await self._collect([document], deadline))[0]

    # -- the job -----------------------------------------------------------------------------------------------

    async def _run_job(self, documents: Iterable[Any] | AsyncIterable[Any], job: _Job) -> None:
        send, receive = anyio.create_memory_object_stream[_Work](self.max_concurrency)
        # twice as many workers as call slots (a worker waiting out a retry's backoff holds no slot), started as
        # pairs arrive: one document's call (`process`) starts a task per pair, not 2 × max_concurrency
        most = 2 * self.max_concurrency
        workers = 0

        def one_more() -> None:
            nonlocal workers
            if workers < most:
                workers += 1
                tg.start_soon(self._worker, receive.clone(), job)

        async with anyio.create_task_group() as tg:
            try:
                async with send:
                    await self._produce(documents, send, job, one_more)
            finally:
                receive.close()
        if job.fatal is None and job.input_error is not None:
            job.fatal = job.input_error

    async def _produce(
        self,
        documents: Iterable[Any] | AsyncIterable[Any],
        send: MemoryObjectSendStream[_Work],
        job: _Job,
        one_more: Callable[[], None],
    ) -> None:
        position = 0
        items = _aiter(documents)
        while not job.stop_reading:  # checked before each read: an item read after a stop would be lost
            try:
                item = await anext(items)
                document = _coerce(item, position)
                sentences = self.segmenter(document.text, max_chars=self.max_sentence_chars)
                if self.segmenter is not segment:
                    _check_sentences(sentences, document.text, position)
            except StopAsyncIteration:
                break
            except Exception as error:  # the documents taken in so far still finish; then it is raised
                job.input_error = error
                break
            await job.pending.acquire()
            state = _DocState(position, document, sentences, self.tasks)
            self.stats.documents_in += 1
            position += 1
            if state.total == 0:
                await self._finish(state, job)
                continue
            for unit in self.packer.units(sentences):
                one_more()  # a worker for this call (until there are 2 × max_concurrency)
                await send.send(_Work(state, unit))

    async def _worker(self, receive: MemoryObjectReceiveStream[_Work], job: _Job) -> None:
        async with receive:
            async for work in receive:
                state, unit = work.state, work.unit
                if state.started is None:
                    state.started = self.clock.now()
                pairs = [_Pair(state, s, t) for s in unit.sentences for t in unit.tasks]
                unsent = self._not_sent(job)
                if unsent is not None:
                    results = [self._failed(pair, unsent, 0) for pair in pairs]
                elif unit.bundle is None:
                    results = [await self._run_pair(pairs[0], job)]
                else:
                    results = await self._run_bundle(work, pairs, job)
                for result in results:
                    state.pairs[(result.sentence, result.task)] = result
                    self.stats.pairs_done += 1
                    if result.error is not None:
                        self.stats.pairs_failed += 1
                if len(state.pairs) == state.total:
                    await self._finish(state, job)

    def _check_outage(self, error: BaseException, job: _Job) -> None:
        """After a failed attempt (or a pair's last one): stop the job once the server has failed every call and
        probe for ``max_outage`` seconds."""
        if self.max_outage is None or job.fatal is not None:
            return
        if not is_outage_sign(error):
            return
        down = self.breaker.outage()
        if down >= self.max_outage:
            job.stop(
                ServerDownError(
                    f"the server has failed every call for {down:.0f} s (max_outage={self.max_outage:g} s); "
                    f"last: {self.breaker.last_error}"
                )
            )

    @staticmethod
    def _not_sent(job: _Job) -> PolytaskError | None:
        """Why nothing new may be sent now (the run stopped, the caller's deadline passed), or None."""
        if job.fatal is not None:
            return RunStopped(f"not sent: the run stopped ({type(job.fatal).__name__})")
        if job.deadline is not None:
            return DeadlineExceededError(f"not sent: {_late(job.deadline)}")
        return None

    def _failed(self, pair: _Pair, error: BaseException, attempts: int, reasked: bool = False) -> PairResult:
        return PairResult(
            sentence=pair.sentence.index,
            task=pair.task.name,
            error=ErrorInfo.from_exception(error, attempts),
            attempts=attempts,
            reasked=reasked,
        )

    async def _run_pair(self, pair: _Pair, job: _Job) -> PairResult:
        """The pair's outcome, its cost in ``PairResult.cost``; what its calls spent is added to its document's usage
        (so a document's usage is the sum of its pairs', whatever each pair ended with)."""
        usage = Usage()
        try:
            result = await self._ask_pair(pair, job, usage)
        finally:
            pair.state.usage.merge(usage)
        result.cost = usage.cost
        return result

    async def _ask_pair(self, pair: _Pair, job: _Job, usage: Usage) -> PairResult:
        task, sentence, state = pair.task, pair.sentence, pair.state
        before, after = neighbours(state.sentences, sentence.index, self.context_sentences)
        try:
            messages = build_messages(task, sentence.text, context_before=before, context_after=after)
        except Exception as broken:  # a user's task subclass building its prompt: the pair fails, not the run
            logger.warning("task %s failed on document %s: %r", task.name, state.document.id, broken)
            return self._failed(pair, broken, 0)
        attempts = 0

        def count() -> None:
            nonlocal attempts
            attempts += 1

        try:
            answer = await self._ask(task, messages, usage, state, sentence.index, job, count)
            if isinstance(answer, PolytaskError):  # stopped or past the deadline while it waited
                return self._failed(pair, answer, attempts)
            value = task.postprocess(state.document.text, sentence, answer.value)
        except AskError as failure:
            self._ask_failed(failure.error, task.name, state, job)
            return self._failed(pair, failure.error, failure.attempts, failure.reasked)
        except Exception as error:  # a task's postprocess failed: the pair ends as a typed error all the same
            logger.warning("task %s failed on document %s: %r", task.name, state.document.id, error)
            return self._failed(pair, error, attempts, answer.reasked if isinstance(answer, Answer) else False)
        return PairResult(
            sentence=sentence.index,
            task=task.name,
            answer=value,
            error=None,
            attempts=answer.attempts,
            reasked=answer.reasked,
        )

    async def _ask(
        self,
        task: Task[Any],
        messages: list[Message],
        usage: Usage,
        state: _DocState,
        sentence: int,
        job: _Job,
        count: Callable[[], None],
    ) -> Answer | PolytaskError:
        """The caller's answer to one call, or the error it ends with when the run stopped or the caller's deadline
        passed while it waited (its flight cancelled).

        Raises:
            AskError: as :meth:`~polytask._caller.Caller.ask` does.
        """

        def outage(error: BaseException) -> None:  # each failed attempt: has the server been down too long?
            self._check_outage(error, job)

        flight = Flight()
        with flight.scope:
            job.calls.add(flight)
            try:
                return await self.caller.ask(
                    task,
                    messages,
                    usage,
                    state.document.id,
                    on_attempt=count,
                    on_retry=outage,
                    flight=flight,
                    sentence=sentence,
                    on_call=self._call_events(state),
                )
            finally:
                job.calls.discard(flight)
        if flight.expired:
            return DeadlineExceededError(f"cancelled: {_late(job.deadline)}")
        return RunStopped(f"not completed: the run stopped ({type(job.fatal).__name__})")

    def _ask_failed(self, error: Exception, task: str, state: _DocState, job: _Job) -> None:
        """What a call that ended with ``error`` means for the run: stop it when no later call could succeed."""
        if is_fatal_to_run(error):  # no later call could succeed either
            job.stop(error)
        elif not isinstance(error, PolytaskError):
            logger.warning("task %s failed on document %s: %r", task, state.document.id, error)
        else:
            self._check_outage(error, job)

    async def _run_bundle(self, work: _Work, pairs: list[_Pair], job: _Job) -> list[PairResult]:
        """A fused or packed call's pairs (``pairs``, sentence-major as ``unit.sentences`` × ``unit.tasks``): each
        valid part of its answer kept; each missing or invalid part, and every pair when the answer stays unreadable,
        asked again alone. The call's cost is shared evenly by its pairs (``PairResult.cost``); a pair asked alone
        adds its own call's."""
        state, unit = work.state, work.unit
        bundle = unit.bundle
        assert bundle is not None
        usage = Usage()
        attempts = 0

        def count() -> None:
            nonlocal attempts
            attempts += 1

        parts: dict[tuple[int, str], Any] = {}
        reasked = False
        try:
            messages = self.packer.messages(unit, state.sentences)
            answer = await self._ask(bundle, messages, usage, state, unit.sentences[0].index, job, count)
            if isinstance(answer, PolytaskError):
                return self._shared([self._failed(pair, answer, attempts) for pair in pairs], usage)
            parts = bundle.split(answer.value, len(unit.sentences))
            reasked = answer.reasked
        except AskError as failure:
            attempts, reasked = failure.attempts, failure.reasked
            alone_may_help = (
                AnswerValidationError | LengthLimitError | RefusalError | BadRequestError | RequestTooLargeError
            )
            if not isinstance(failure.error, alone_may_help):
                # not the call's size or answer (a spent budget, a server down, retries exhausted): alone won't help
                self._ask_failed(failure.error, bundle.name, state, job)
                return self._shared([self._failed(pair, failure.error, attempts, reasked) for pair in pairs], usage)
            logger.debug("document %s: a %d-pair call failed (%s); asked alone", state.document.id, len(pairs), failure)
        except Exception as error:  # a user's task building its examples into the prompt
            logger.warning("a fused or packed call failed on document %s: %r", state.document.id, error)
        finally:
            state.usage.merge(usage)
        first = unit.sentences[0].index
        results: dict[tuple[int, str], PairResult] = {}
        alone: list[_Pair] = []
        for pair in pairs:
            part = parts.get((pair.sentence.index - first, pair.task.name))
            if part is None or isinstance(part, Exception):
                alone.append(pair)
                continue
            try:
                value = pair.task.postprocess(state.document.text, pair.sentence, part)
            except Exception as error:
                logger.warning("task %s failed on document %s: %r", pair.task.name, state.document.id, error)
                results[(pair.sentence.index, pair.task.name)] = self._failed(pair, error, attempts, reasked)
                continue
            results[(pair.sentence.index, pair.task.name)] = PairResult(
                sentence=pair.sentence.index, task=pair.task.name, answer=value, attempts=attempts, reasked=reasked
            )

        async def ask_alone(pair: _Pair) -> None:
            unsent = self._not_sent(job)
            result = self._failed(pair, unsent, 0) if unsent is not None else await self._run_pair(pair, job)
            result.attempts += attempts
            results[(pair.sentence.index, pair.task.name)] = result

        if alone:
            self.stats.asked_alone += len(alone)
            async with anyio.create_task_group() as tg:
                for pair in alone:
                    tg.start_soon(ask_alone, pair)
        return self._shared([results[(pair.sentence.index, pair.task.name)] for pair in pairs], usage)

    @staticmethod
    def _shared(results: list[PairResult], usage: Usage) -> list[PairResult]:
        """``results`` each with an even share of what their call cost (``usage.cost``)."""
        for result in results:
            result.cost += usage.cost / len(results)
        return results

    def _call_events(self, state: _DocState) -> Callable[[CallEvent], None] | None:
        """Where a pair's call events go: the ``on_call`` hook, and the document's list for its OpenTelemetry spans."""
        spans = self._otel is not None and self._otel.enabled()
        if self.on_call is None and not spans:
            return None  # nobody listens: no event is made

        def record(event: CallEvent) -> None:
            if spans:
                state.events.append(event)
            call_hook(self.on_call, event, "on_call")

        return record

    def _traced(self, state: _DocState, result: DocumentResult, now: float) -> None:
        """The finished document to the ``on_document`` hook and, with OpenTelemetry, as spans."""
        call_hook(self.on_document, result, "on_document")
        if self._otel is None or not self._otel.enabled():
            return
        ended = time.time()
        try:
            self._otel.document(
                result.id,
                state.events,
                ended - (now - state.started) if state.started is not None else ended,
                ended,
                sentences=len(result.sentences),
                pairs=len(result.pairs),
                partial=result.partial,
                prompt_tokens=result.usage.prompt_tokens,
                completion_tokens=result.usage.completion_tokens,
                cost_usd=result.usage.cost,
            )
        except Exception:  # a tracer's failure must not lose the document
            logger.exception("recording the OpenTelemetry spans of document %s failed", result.id)
        state.events = []

    async def _finish(self, state: _DocState, job: _Job) -> None:
        pairs = [state.pairs[(s.index, t.name)] for s in state.sentences for t in self.tasks]
        results: dict[str, Any] = {}
        for task in self.tasks:
            answers = [state.pairs[(s.index, task.name)].answer for s in state.sentences]
            try:
                results[task.name] = task.merge(state.document.text, state.sentences, answers)
            except Exception as error:  # a user's merge must not lose the document
                logger.warning("merge of task %s failed on document %s: %r", task.name, state.document.id, error)
                results[task.name] = None
                pairs.append(PairResult(sentence=-1, task=task.name, error=ErrorInfo.from_exception(error)))
        partial = any(p.error is not None for p in pairs)
        now = self.clock.now()
        result = DocumentResult(
            id=state.document.id,
            text=state.document.text,
            metadata=state.document.metadata,
            sentences=state.sentences,
            results=results,
            pairs=pairs,
            partial=partial,
            usage=state.usage,
            elapsed=round(now - state.started, 6) if state.started is not None else 0.0,
        )
        self.stats.documents_done += 1
        self.stats.documents_partial += int(partial)
        self._traced(state, result, now)
        job.pending.release()
        await job.out.send((state.position, result))


def run_sync(
    backend: Backend,
    tasks: Sequence[Task[Any]],
    documents: Iterable[DocumentInput],
    **options: Any,
) -> list[DocumentResult]:
    """Run every task on every document and return the results in input order; for scripts.

    A thin ``anyio.run`` wrapper (no nest_asyncio): call it where no event loop is running. ``options`` go to
    :class:`Orchestrator`. The backend is closed afterwards.

    Raises:
        RuntimeError: called inside a running asyncio event loop (Jupyter): use ``await orch.run(...)`` there.
    """

    async def main() -> list[DocumentResult]:
        async with Orchestrator(backend, tasks, **options) as orch:
            return await orch.run(documents)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # none running: the normal case
        return anyio.run(main)
    raise RuntimeError(
        "run_sync cannot run inside a running event loop (Jupyter, an async web framework): there, use "
        "`async with pt.Orchestrator(backend, tasks) as orch: results = await orch.run(documents)`"
    )
