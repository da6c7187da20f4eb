"""Documents spread over Ray workers, one shared rate limit, results back in input order: :class:`RayOrchestrator`.

The driver (this process) reads the documents lazily and cuts them into batches of ``batch_size``; each batch is one
Ray task, at most ``workers`` at a time. A task builds the backend in its worker from ``backend_factory`` (a backend
holds connections, or a loaded model, and is not sent over the wire), runs its batch through an ordinary
:class:`~polytask.Orchestrator` and sends back the :class:`~polytask.DocumentResult` list and its counters. The
driver yields the documents in input order as batches finish (a finished batch waits for the ones before it).

One limit for every worker: a :class:`~polytask.RedisRateLimiter` on ``limiter_url`` / ``limiter_key`` when given
(shared with anything else on that key, other jobs included), else a Ray actor made for the run (:class:`SharedLimit`,
the same GCRA reservations as the Redis limiter's scripts, on the actor's clock), reached through
:class:`ActorRateLimiter` in each worker.

A worker that dies (killed, out of memory, its node lost) has its batch run again elsewhere by Ray (the task's
``max_retries``); only the attempt that finishes is kept, so no document is written twice, and what the dead one had
already been answered comes from the request cache (``cache``: SQLite, WAL, shared by the workers of one machine; on
several machines give each its own path or accept that each pays once). A batch that loses its worker more than
``max_retries`` times stops the run with :class:`~polytask.WorkerLostError`.

Needs the ``ray`` extra (``pip install 'polytask[ray]'``); ``import polytask`` never imports ray.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio

from ._checks import check_count, check_positive
from .backends.base import Backend
from .chat import RateLimitHeaders
from .documents import Document, DocumentResult
from .exceptions import (
    ConfigurationError,
    LimiterUnavailableError,
    PolytaskError,
    RequestTooLargeError,
    WorkerLostError,
    is_fatal_to_run,
)
from .limits import Clock, MonotonicClock, Reservation, check_limits, check_window, drained, shared_observation
from .orchestrator import DocumentInput, Orchestrator, RunStats, coerce_document
from .tasks.base import Task

__all__ = ["ActorRateLimiter", "RayOrchestrator", "SharedLimit", "run"]

logger = logging.getLogger("polytask")

# Orchestrator options that make no sense per worker (or are given to RayOrchestrator itself)
_REFUSED = {
    "limiter": "the workers share one limiter made by RayOrchestrator: pass rpm / tpm, or limiter_url / limiter_key",
    "clock": "each worker keeps its own time",
    "budget": "a budget would be each worker's own, not the run's: not supported on Ray yet",
    "on_call": "hooks would run in the workers, not here: not supported on Ray",
    "on_document": "hooks would run in the workers: iterate over stream() instead",
    "close_backend": "each worker closes the backend it made (see keep_backend)",
}


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigurationError("running on Ray needs ray: pip install 'polytask[ray]'") from None
    return ray


# -- one limit for every worker: the buckets in an actor -------------------------------------------------------


class SharedLimit:
    """RPM / TPM buckets as :class:`~polytask.RedisRateLimiter` keeps them in Redis, kept in one Python object: each
    bucket is its theoretical arrival time (GCRA), and a call reserves the earliest start the buckets allow. Run as a
    Ray actor (its methods run one at a time, so each change is atomic) by :class:`RayOrchestrator`; plain and
    synchronous, so it is tested without Ray.

    Args:
        rpm, tpm: requests / tokens per minute; None (or 0) to learn it from the responses' headers (:meth:`observe`).
        headroom: the share of each bucket kept unused, in [0, 1).
        window: the seconds the RPM is enforced over, in (0, 60] (default 60).
        clock: monotonic seconds (the actor's own: clients only ever get durations back).

    Raises:
        ConfigurationError: a bad setting.
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        headroom: float = 0.01,
        window: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_limits(rpm, tpm, headroom, window)
        self._cfg = (float(rpm or 0), float(tpm or 0))
        self._learned = (0.0, 0.0)
        self.headroom = headroom
        self.window = window or 60.0
        self._clock = clock
        self._tat_r = self._tat_t = clock()  # full buckets
        self._paused = -math.inf

    def limits(self) -> tuple[float, float]:
        """(rpm, tpm) in force, 0 for none."""
        return (self._cfg[0] or self._learned[0], self._cfg[1] or self._learned[1])

    def _shape(self) -> tuple[float, float, float, float, float, float]:
        rpm, tpm = self.limits()
        return rpm, tpm, rpm * self.window / 60, rpm / 60, tpm, tpm / 60

    def acquire(self, tokens: int) -> tuple[str, float, float, float]:
        """Reserve one request and ``tokens`` tokens: ``("ok", seconds to wait before sending, rpm, tpm)``, or
        ``("too_large", 0, rpm, tpm)`` when ``tokens`` exceeds what the TPM bucket can ever hold."""
        now = self._clock()
        rpm, tpm, cap_r, rate_r, cap_t, rate_t = self._shape()
        if tpm > 0 and tokens > cap_t * (1 - self.headroom):
            return ("too_large", 0.0, rpm, tpm)
        go = max(now, self._paused)
        if rpm > 0:
            go = max(go, self._tat_r - (cap_r - 1 - self.headroom * cap_r) / rate_r)
        if tpm > 0:
            go = max(go, self._tat_t - (cap_t - tokens - self.headroom * cap_t) / rate_t)
        if rpm > 0:
            self._tat_r = max(self._tat_r, go) + 1 / rate_r
        if tpm > 0:
            self._tat_t = max(self._tat_t, go) + tokens / rate_t
        return ("ok", go - now, rpm, tpm)

    def settle(self, delta: float) -> None:
        """Add ``delta`` tokens to the TPM bucket's use (negative: give them back), once a response's usage is known."""
        now = self._clock()
        _, tpm, _, _, _, rate_t = self._shape()
        if tpm <= 0:
            return
        if delta > 0:
            self._tat_t = max(self._tat_t, now) + delta / rate_t
        else:
            self._tat_t = max(now, self._tat_t + delta / rate_t)

    def pause(self, seconds: float, drain_requests: bool, drain_tokens: bool) -> None:
        """Hold every reservation ``seconds`` (a 429's Retry-After); the drained buckets resume at their refill rate."""
        now = self._clock()
        rpm, tpm, cap_r, rate_r, cap_t, rate_t = self._shape()
        ends = now + max(0.0, seconds)
        self._paused = max(self._paused, ends)
        if rpm > 0 and drain_requests:
            self._tat_r = max(self._tat_r, ends + (cap_r - 1 - self.headroom * cap_r) / rate_r)
        if tpm > 0 and drain_tokens:
            self._tat_t = max(self._tat_t, ends + (cap_t - self.headroom * cap_t) / rate_t)

    def observe(self, limit_requests: float, limit_tokens: float, left_requests: float, left_tokens: float) -> None:
        """What a response's headers said: limits learned where none was configured (0: not said), what is left
        (-1: not said) lowers the buckets."""
        now = self._clock()
        learned_r, learned_t = self._learned
        if not self._cfg[0] and limit_requests > 0:
            learned_r = limit_requests
        if not self._cfg[1] and limit_tokens > 0:
            learned_t = limit_tokens
        self._learned = (learned_r, learned_t)
        rpm, tpm, cap_r, rate_r, cap_t, rate_t = self._shape()
        if rpm > 0 and left_requests >= 0:
            self._tat_r = max(self._tat_r, now + (cap_r - left_requests) / rate_r)
        if tpm > 0 and left_tokens >= 0:
            self._tat_t = max(self._tat_t, now + (cap_t - left_tokens) / rate_t)


class ActorRateLimiter:
    """The :class:`~polytask.limits.Limiter` of one worker, drawing on a :class:`SharedLimit` actor: what
    :class:`RayOrchestrator` gives each worker's orchestrator when no Redis is named.

    Args:
        actor: the handle of a ``ray.remote(SharedLimit)`` actor.
        learning: whether limits are learned from headers (no rpm or no tpm configured).
        clock: the local time source for sleeping.

    Raises (from :meth:`acquire`):
        RequestTooLargeError: a call needs more tokens than the TPM limit.
        LimiterUnavailableError: the actor is gone (its node died).
    """

    def __init__(self, actor: Any, *, learning: bool = True, clock: Clock | None = None) -> None:
        self._actor = actor
        self.learning = learning
        self.clock: Clock = clock or MonotonicClock()
        self._rpm = self._tpm = 0.0

    @property
    def rpm(self) -> float | None:
        """The requests-per-minute limit in force (configured or learned), as the last reservation said, or None."""
        return self._rpm or None

    @property
    def tpm(self) -> float | None:
        """The tokens-per-minute limit in force, as the last reservation said, or None."""
        return self._tpm or None

    async def _call(self, method: str, *args: Any) -> Any:
        ray = _ray()
        ref = getattr(self._actor, method).remote(*args)
        try:
            return await anyio.to_thread.run_sync(ray.get, ref)
        except ray.exceptions.RayActorError as error:
            raise LimiterUnavailableError(
                f"the run's shared rate limit (a Ray actor) is gone ({type(error).__name__}); no call is sent without "
                "it: rerun (the work done is kept), or use limiter_url= (Redis)"
            ) from error

    async def acquire(self, tokens: int) -> Reservation:
        """Reserve one request and ``tokens`` tokens at the earliest time the shared buckets allow, then wait."""
        status, wait, rpm, tpm = await self._call("acquire", int(tokens))
        self._rpm, self._tpm = float(rpm), float(tpm)
        if status == "too_large":
            raise RequestTooLargeError(tokens, self._tpm)
        if wait > 0:
            await self.clock.sleep(wait)
        return Reservation(tokens)

    async def _quietly(self, method: str, *args: Any) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._call(method, *args)
            except LimiterUnavailableError as error:  # the next acquire says so; a correction must not fail a call
                logger.debug("shared rate limit: %s update not sent (%s)", method, error)

    def settle(
        self, reservation: Reservation, *, prompt_tokens: int, completion_tokens: int, max_tokens: int
    ) -> Awaitable[None] | None:
        """Correct the shared TPM bucket with the real prompt tokens + ``max_tokens`` (OpenAI's accounting)."""
        if reservation.settled:
            return None
        reservation.settled = True
        if prompt_tokens <= 0:
            return None
        return self._quietly("settle", float(prompt_tokens + max_tokens - reservation.tokens))

    def pause(self, seconds: float, limits: RateLimitHeaders | None = None) -> Awaitable[None] | None:
        """Every worker waits ``seconds``; the bucket that ran out (both when the 429 does not say) resumes paced."""
        return self._quietly("pause", max(0.0, float(seconds)), *drained(limits))

    def observe(self, limits: RateLimitHeaders | None) -> Awaitable[None] | None:
        """Share what a response's ``x-ratelimit-*`` headers say (learned limits, what is left)."""
        values = shared_observation(limits, self.learning)
        return None if values is None else self._quietly("observe", *values)


# -- what runs in a worker -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Limit:
    """How a worker reaches the shared limit: Redis (``url``, ``key``) or the run's actor (``actor``)."""

    rpm: float | None
    tpm: float | None
    window: float | None
    url: str | None = None
    key: str | None = None
    actor: Any = None

    def make(self) -> Any:
        if self.url is not None:
            from .redis_limiter import RedisRateLimiter

            assert self.key is not None
            return RedisRateLimiter(self.url, key=self.key, rpm=self.rpm, tpm=self.tpm, window=self.window)
        return ActorRateLimiter(self.actor, learning=self.rpm is None or self.tpm is None)


@dataclasses.dataclass(frozen=True)
class _Work:
    """Everything a batch's task needs but its documents (sent once per task; small)."""

    run_id: str
    backend_factory: Callable[[], Any]
    tasks: Sequence[Task[Any]]
    limit: _Limit
    cache: str | None
    options: dict[str, Any]
    keep_backend: bool


_KEPT: dict[str, Any] = {}  # run id → the backend this worker process keeps between batches (keep_backend)


def _portable(error: BaseException) -> tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]:
    """An exception as parts that pickle whatever its ``__init__`` takes (keyword-only ones do not round-trip)."""
    return type(error), error.args, {k: v for k, v in vars(error).items() if k != "results"}


def _rebuilt(parts: tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]) -> BaseException:
    kind, args, attributes = parts
    error = kind.__new__(kind, *args)
    error.args = args
    error.__dict__.update(attributes)
    return error


def _backend(work: _Work) -> Any:
    if work.keep_backend and work.run_id in _KEPT:
        return _KEPT[work.run_id]
    backend = work.backend_factory()
    if not isinstance(backend, Backend):
        raise ConfigurationError(
            f"backend_factory must return a backend (e.g. a polytask.OpenAIBackend), got {type(backend).__name__}"
        )
    if work.keep_backend:
        _KEPT.clear()  # one run's backend at a time in a worker: an earlier run's is let go
        _KEPT[work.run_id] = backend
    return backend


async def _run_batch_async(work: _Work, documents: list[Document]) -> dict[str, Any]:
    limiter = work.limit.make()
    orch = Orchestrator(
        _backend(work),
        work.tasks,
        limiter=limiter,
        cache=work.cache,
        close_backend=not work.keep_backend,
        **work.options,
    )
    error: BaseException | None = None
    try:
        try:
            results = await orch.run(documents)
        except PolytaskError as stopped:
            done = getattr(stopped, "results", None)
            if not is_fatal_to_run(stopped) or done is None:
                raise
            results, error = done, stopped
    finally:
        await orch.aclose()
        closing = getattr(limiter, "aclose", None)
        if closing is not None:
            await closing()
    stats = {f.name: getattr(orch.stats, f.name) for f in dataclasses.fields(orch.stats) if f.name != "prices"}
    return {
        "results": results,
        "stats": stats,
        "prices": orch.stats.prices,
        "error": None if error is None else _portable(error),
    }


def _run_batch(work: _Work, documents: list[Document]) -> dict[str, Any]:
    """One batch in a worker (a Ray task): its own event loop, orchestrator and limiter client."""
    return anyio.run(_run_batch_async, work, documents)


# -- the driver ------------------------------------------------------------------------------------------------


async def _items(documents: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(documents, AsyncIterable):
        async for item in documents:
            yield item
    else:
        for item in documents:
            yield item


class RayOrchestrator:
    """Runs every task on every sentence of every document, the documents spread over Ray workers (see the module
    docstring); used like an :class:`~polytask.Orchestrator`: ``async with``, :meth:`stream`, :meth:`run`,
    ``stats``.

    Args:
        backend_factory: a picklable zero-argument callable that makes the backend in each worker, e.g.
            ``functools.partial(pt.OpenAIBackend, "gpt-4o-mini", base_url=...)`` (a backend itself holds
            connections or a loaded model and is refused).
        tasks: the tasks to run on every sentence (picklable: the built-in ones and ``pt.Task`` are).
        workers: batches run at once (each is one Ray task, taking ``num_cpus`` / ``num_gpus``; default: as many as
            the cluster's CPUs hold, at least 1).
        batch_size: documents per batch, the unit that is retried when a worker dies.
        limiter_url, limiter_key: share the limit through Redis (:class:`~polytask.RedisRateLimiter`; both or
            neither); without them a :class:`SharedLimit` actor holds it for this run.
        rpm, tpm: the limits (None: learned from response headers, shared by every worker). A backend's own
            ``rpm`` / ``tpm`` settings are not read: give them here.
        rate_window: the seconds the server enforces its RPM over, in (0, 60].
        cache: the request cache's path (SQLite; every worker of a machine opens the same file), or None.
        address: the Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``); None: the one this process is
            already connected to, else a new local one with this machine's CPUs (shut down by :meth:`aclose`).
        max_retries: times a batch is run again when its worker dies (Ray's task retries), > 0.
        num_cpus, num_gpus: Ray resources of each batch (``num_gpus=1``: one GPU per worker, for the local backend).
        keep_backend: keep the backend a worker process made for the next batch of this run instead of closing it
            (the local backend: load the model once per worker; it must outlive an event loop, as
            ``TransformersBackend`` does).
        options: any other :class:`~polytask.Orchestrator` option (``max_concurrency``, ``retry``,
            ``context_sentences``, ``temperature``, ``prices``, ``max_outage``, …), applied in every worker;
            ``limiter``, ``clock``, ``budget``, ``on_call``, ``on_document`` and ``close_backend`` are refused.

    Raises:
        ConfigurationError: ray is not installed, a bad setting, a refused option, or a factory, task or option that
            cannot be pickled (named).
    """

    def __init__(
        self,
        backend_factory: Callable[[], Any],
        tasks: Sequence[Task[Any]],
        *,
        workers: int | None = None,
        batch_size: int = 16,
        limiter_url: str | None = None,
        limiter_key: str | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        rate_window: float | None = None,
        cache: str | os.PathLike[str] | None = None,
        address: str | None = None,
        max_retries: int = 3,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        keep_backend: bool = False,
        **options: Any,
    ) -> None:
        ray = _ray()
        if not callable(backend_factory) or isinstance(backend_factory, Backend):
            raise ConfigurationError(
                "backend_factory must be a zero-argument callable that makes the backend in each worker, e.g. "
                "functools.partial(pt.OpenAIBackend, 'gpt-4o-mini', base_url=...); got "
                f"{type(backend_factory).__name__} (a backend holds connections or a loaded model and is not sent "
                "to workers)"
            )
        tasks = list(tasks)
        if not tasks:
            raise ConfigurationError("at least one task is needed")
        check_count("workers", workers)
        check_count("batch_size", batch_size, allow_none=False)
        check_count("max_retries", max_retries, minimum=0, allow_none=False)
        check_positive("rpm", rpm)
        check_positive("tpm", tpm)
        check_positive("num_cpus", num_cpus, allow_none=False)
        if not (isinstance(num_gpus, int | float) and num_gpus >= 0):
            raise ConfigurationError(f"num_gpus must be a number >= 0, got {num_gpus!r}")
        if rate_window is not None:
            check_window(rate_window)
        if (limiter_url is None) != (limiter_key is None):
            raise ConfigurationError("limiter_url and limiter_key go together: the Redis URL and the limit's name")
        for name in options:
            if name in _REFUSED:
                raise ConfigurationError(f"{name}= is not taken on Ray: {_REFUSED[name]}")
        for name, value in (("backend_factory", backend_factory), ("tasks", tasks), *options.items()):
            try:
                ray.cloudpickle.dumps(value)
            except Exception as error:
                raise ConfigurationError(
                    f"{name} cannot be sent to Ray workers ({type(error).__name__}: {error}); make it picklable "
                    "(a module-level function or functools.partial, not a closure over a lock, a client or a model)"
                ) from None
        self.backend_factory = backend_factory
        self.tasks = tasks
        self.workers = workers
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.address = address
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.keep_backend = keep_backend
        self.cache = None if cache is None else os.fspath(cache)
        self.options = options
        self._limit = _Limit(rpm, tpm, rate_window, limiter_url, limiter_key)
        self.stats = RunStats(prices=options.get("prices"))
        self._started_ray = False
        self._actor: Any = None

    # -- lifetime ----------------------------------------------------------------------------------------------

    def _start(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING)
            self._started_ray = True
        if self.workers is None:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1) // self.num_cpus))
        if self._limit.url is None and self._actor is None:
            shared = ray.remote(num_cpus=0)(SharedLimit)
            self._actor = shared.remote(self._limit.rpm, self._limit.tpm, window=self._limit.window)

    async def aclose(self) -> None:
        """End the run's limiter actor, and the Ray cluster when this orchestrator started it."""
        ray = _ray()
        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    async def __aenter__(self) -> RayOrchestrator:
        self._start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    # -- the run -----------------------------------------------------------------------------------------------

    async def run(self, documents: Iterable[DocumentInput] | AsyncIterable[DocumentInput]) -> list[DocumentResult]:
        """Every document's result, in input order.

        Raises:
            As :meth:`stream` does; the error then carries the documents finished before it, in input order, as its
            ``results`` attribute.
        """
        done: list[DocumentResult] = []
        try:
            async for result in self.stream(documents):
                done.append(result)
        except PolytaskError as error:
            error.results = done  # type: ignore[attr-defined]
            raise
        return done

    async def stream(
        self, documents: Iterable[DocumentInput] | AsyncIterable[DocumentInput]
    ) -> AsyncIterator[DocumentResult]:
        """Each document's result, in input order, as the batches holding them finish.

        ``documents`` are read lazily (at most ``workers`` batches ahead), as :class:`~polytask.Orchestrator` reads
        them (strings get their position as id, counted over the whole input).

        Raises:
            InputError: a document that is not one (after the documents before it are yielded).
            WorkerLostError: a batch whose worker died more than ``max_retries`` times; its documents are not
                yielded (they are named on the error), every other finished one is.
            PolytaskError: what stopped a worker's run (a quota, a rejected key, a dead server: the orchestrator's
                stop), after every finished document (the stopped batch's partial ones included) is yielded.
        """
        ray = _ray()
        self._start()
        work = _Work(
            run_id=uuid.uuid4().hex,
            backend_factory=self.backend_factory,
            tasks=self.tasks,
            limit=dataclasses.replace(self._limit, actor=self._actor),
            cache=self.cache,
            options=self.options,
            keep_backend=self.keep_backend,
        )
        remote = ray.remote(_run_batch).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries
        )
        work_ref = ray.put(work)
        items = _items(documents).__aiter__()
        position = 0
        index = 0
        pending: dict[Any, tuple[int, list[Document]]] = {}
        finished: dict[int, list[DocumentResult]] = {}
        lost: set[int] = set()
        next_out = 0
        stop: BaseException | None = None
        exhausted = False
        try:
            while True:
                while not exhausted and stop is None and len(pending) < (self.workers or 1):
                    batch: list[Document] = []
                    try:
                        while len(batch) < self.batch_size:
                            item = await items.__anext__()
                            batch.append(coerce_document(item, position))
                            position += 1
                    except StopAsyncIteration:
                        exhausted = True
                    except PolytaskError as error:  # a bad document: what came before it still runs
                        stop = error
                    if batch:
                        pending[remote.remote(work_ref, batch)] = (index, batch)
                        index += 1
                if not pending:
                    break
                ready, _ = await anyio.to_thread.run_sync(lambda: ray.wait(list(pending), num_returns=1, timeout=0.5))
                for ref in ready:
                    number, batch = pending.pop(ref)
                    try:
                        payload = ray.get(ref)
                    except ray.exceptions.RayTaskError as error:  # the batch's own code raised
                        cause = getattr(error, "cause", None)
                        stop = stop or (cause if isinstance(cause, BaseException) else error)
                        lost.add(number)
                        continue
                    except ray.exceptions.RayError as error:  # its worker died on every try
                        stop = stop or WorkerLostError(
                            f"batch {number} ({len(batch)} documents, from id {batch[0].id!r}) lost its Ray worker "
                            f"{self.max_retries + 1} times ({type(error).__name__}); the run stops, every other "
                            "finished document is kept: rerun (with the cache) to finish the rest",
                            batch=number,
                            documents=tuple(d.id for d in batch),
                        )
                        lost.add(number)
                        continue
                    self._count(payload)
                    finished[number] = payload["results"]
                    if payload["error"] is not None:
                        stop = stop or _rebuilt(payload["error"])
                while next_out in finished or next_out in lost:
                    for result in finished.pop(next_out, ()):
                        yield result
                    next_out += 1
            if stop is not None:
                raise stop
        finally:
            for ref in pending:  # an early exit (break, Ctrl-C): no batch goes on for nobody
                ray.cancel(ref, force=True)

    def _count(self, payload: dict[str, Any]) -> None:
        for name, value in payload["stats"].items():
            setattr(self.stats, name, getattr(self.stats, name) + value)
        if self.stats.prices is None:
            self.stats.prices = payload["prices"]


def run(
    documents: Iterable[DocumentInput],
    *,
    backend_factory: Callable[[], Any],
    tasks: Sequence[Task[Any]],
    **options: Any,
) -> list[DocumentResult]:
    """Every document's result in input order, the documents spread over Ray workers: a script's one call
    (``anyio.run`` of :meth:`RayOrchestrator.run`; ``options`` go to :class:`RayOrchestrator`)::

        results = polytask.ray_runner.run(
            documents, backend_factory=functools.partial(pt.OpenAIBackend, "gpt-4o-mini"), tasks=[pt.Sentiment()],
            workers=4, rpm=500, cache="answers.sqlite",
        )

    Raises:
        As :meth:`RayOrchestrator.stream`.
    """

    async def main() -> list[DocumentResult]:
        async with RayOrchestrator(backend_factory, tasks, **options) as orch:
            return await orch.run(documents)

    return anyio.run(main)
