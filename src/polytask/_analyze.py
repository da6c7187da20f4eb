"""One document, one call: :func:`analyze` (and :func:`analyze_sync`), the entry point an agent's tool calls.

An agent app analyses one text per turn, many turns at once. Building an :class:`~polytask.Orchestrator` per turn
would give each turn its own rate limiter, cache and connection pool, so concurrent turns would together overrun the
provider's limit; pass one long-lived orchestrator instead and every turn shares them::

    orch = pt.Orchestrator(pt.OpenAIBackend(model="gpt-4o-mini", rpm=500), [pt.Sentiment(), pt.Entities()])
    result = await pt.analyze("Ada Lovelace met Babbage in London.", orchestrator=orch, deadline=10)

With no orchestrator, one is made for the call (from ``backend`` and ``tasks``) and closed after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import anyio

from .backends.base import Backend
from .documents import DocumentResult
from .exceptions import ConfigurationError
from .orchestrator import DocumentInput, Orchestrator
from .tasks import Entities, Sentiment
from .tasks.base import Task

__all__ = ["analyze", "analyze_sync"]


async def analyze(
    document: DocumentInput,
    *,
    tasks: Sequence[Task[Any]] | None = None,
    backend: Backend | None = None,
    orchestrator: Orchestrator | None = None,
    deadline: float | None = None,
) -> DocumentResult:
    """Run tasks on every sentence of one document and return its merged result.

    Args:
        document: the text, or any :data:`~polytask.orchestrator.DocumentInput` (a dict with ``text`` and ``id``,
            a :class:`~polytask.Document`, …).
        tasks: the tasks to run (default: :class:`~polytask.Sentiment` and :class:`~polytask.Entities`); with an
            ``orchestrator``, leave it unset (its tasks run) or give the same tasks.
        backend: where calls go, when no ``orchestrator`` is given (default: an
            :class:`~polytask.OpenAIBackend` configured from ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``, closed after
            the call; a backend you pass is left open for your next call).
        orchestrator: a long-lived orchestrator to run in, shared by concurrent calls: one rate limit, one cache,
            one connection pool (used inside or outside its ``async with``).
        deadline: seconds after which the result comes back with what finished: pairs not done end
            :class:`~polytask.DeadlineExceededError` (their calls cancelled) and the result is ``partial``;
            None (default): wait for every pair.

    Returns:
        The document's :class:`~polytask.DocumentResult`; a pair that failed carries a typed error in ``pairs``
        (the result is then ``partial``).

    Raises:
        ConfigurationError: both ``orchestrator`` and ``backend``, ``tasks`` other than the orchestrator's, no API
            key for the default backend, or a bad ``deadline``.
        InputError: a document of no accepted shape.
        QuotaExceededError, AuthenticationError, BudgetExceededError, …: what stops a run (see
            :meth:`~polytask.Orchestrator.stream`), with the finished result on the error's ``results``.
    """
    if orchestrator is not None:
        if backend is not None:
            raise ConfigurationError("pass either orchestrator= or backend=, not both: the orchestrator has a backend")
        theirs = [t.name for t in orchestrator.tasks]
        if tasks is not None and [t.name for t in tasks] != theirs:
            raise ConfigurationError(
                f"tasks {[t.name for t in tasks]} differ from the orchestrator's {theirs}: leave tasks unset to run "
                "the orchestrator's, or make an orchestrator for these tasks"
            )
        return await orchestrator.process(document, deadline=deadline)
    owned = backend is None
    if backend is None:
        from .backends.openai import OpenAIBackend

        backend = OpenAIBackend()
    tasks = list(tasks) if tasks is not None else [Sentiment(), Entities()]
    orch = Orchestrator(backend, tasks, close_backend=owned)
    try:
        return await orch.process(document, deadline=deadline)
    finally:
        await orch.aclose()


def analyze_sync(
    document: DocumentInput,
    *,
    tasks: Sequence[Task[Any]] | None = None,
    backend: Backend | None = None,
    deadline: float | None = None,
) -> DocumentResult:
    """:func:`analyze` for scripts and synchronous agent frameworks: a plain ``anyio.run``, so call it where no event
    loop is running (no shared orchestrator: one lives only inside one event loop).

    Raises:
        RuntimeError: called inside a running event loop: ``await pt.analyze(...)`` there.
        As :func:`analyze` does.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # none running: the normal case
        return anyio.run(lambda: analyze(document, tasks=tasks, backend=backend, deadline=deadline))
    raise RuntimeError(
        "analyze_sync cannot run inside a running event loop (an agent framework's async tool, Jupyter): there, use "
        "`await pt.analyze(...)`"
    )
