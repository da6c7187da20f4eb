"""What each call did: one :class:`CallEvent` per call attempt, for hooks, a JSON Lines trace and OpenTelemetry.

Three ways to see them, all fed by the caller (:mod:`polytask._caller`) as each attempt ends:

- a hook: ``Orchestrator(on_call=fn, on_document=fn)``, called with each :class:`CallEvent` and each finished
  :class:`~polytask.DocumentResult` (for a metrics system; an exception in a hook is logged, never raised into the
  run);
- a file: :class:`JsonlTrace` (``polytask run --trace calls.jsonl``), one JSON object per line;
- OpenTelemetry: with ``opentelemetry-api`` installed (the ``otel`` extra) and a tracer provider configured, a span
  ``polytask.document`` per document with a child span per call (named ``chat {model}`` with the attributes of the
  OpenTelemetry semantic conventions for generative AI: ``gen_ai.operation.name``, ``gen_ai.request.model``,
  ``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``, …, plus ``polytask.*``), under whatever span is
  current where the document was submitted; without the package, nothing (no import, no cost).

API keys never appear in any of them: an event holds counts, times, names and the server's error message, which the
backend has already redacted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["CallEvent", "JsonlTrace", "OtelTracer", "otel_tracer"]

logger = logging.getLogger("polytask")

Status = Literal["ok", "invalid", "error", "cached"]


@dataclass(slots=True)
class CallEvent:
    """One call attempt (or one answer from the request cache).

    Attributes:
        document_id: the document's id.
        sentence: the sentence's index in the document (0-based), or None outside a document; for a fused or packed
            call (:mod:`polytask.packing`), its first sentence's.
        task: the task's name; for a fused or packed call, its schema's name (``answers_<task>_<task>…``).
        attempt: 1 for the first attempt of a question, 2 for its first retry, …; a re-ask after an invalid answer
            goes on counting; 0 for an answer from the cache.
        status: ``"ok"`` (a valid answer), ``"invalid"`` (an answer that failed validation: re-asked or failed),
            ``"error"`` (no usable answer: see ``error_type``), ``"cached"`` (from the request cache, no call).
        started_at: when the attempt began to wait for a call slot, UNIX seconds (wall clock).
        queue_wait: seconds waiting for a call slot (the concurrency limit, the circuit breaker).
        rate_limit_wait: seconds waiting on the rate limiter (RPM / TPM buckets, a 429's pause).
        latency: seconds from sending the request to its answer or error.
        prompt_tokens, completion_tokens, cached_tokens: usage the server reported (0 when none; cached tokens
            are the part of the prompt served from the provider's prompt cache).
        cost: USD at the run's prices; None when they are unknown (0 for an answer from the cache).
        http_status: the HTTP status of an error answer, else None (200 for an answer).
        error_type: the polytask error class (``RateLimitError``, ``AnswerValidationError``, …), or None.
        error: the error's message (at most 300 characters), or None.
        request_id: the server's request id (``x-request-id``) of the answer or error, when it gave one.
        retry_after: the seconds a 429 or 503 asked to wait (Retry-After, or the wait its message gave), honoured
            by the retry that follows; None when it said nothing.
        model: the backend's name (``openai:gpt-4o-mini``).
    """

    document_id: str
    sentence: int | None
    task: str
    attempt: int
    status: Status
    started_at: float
    queue_wait: float = 0.0
    rate_limit_wait: float = 0.0
    latency: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: float | None = 0.0
    http_status: int | None = None
    error_type: str | None = None
    error: str | None = None
    request_id: str | None = None
    retry_after: float | None = None
    model: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        """The event as JSON-ready types (seconds rounded to microseconds)."""
        data = asdict(self)
        for key in ("started_at", "queue_wait", "rate_limit_wait", "latency"):
            data[key] = round(data[key], 6)
        return data


class JsonlTrace:
    """Writes each :class:`CallEvent` as one JSON line to ``path`` (created or truncated; a line is written whole and
    flushed, so a killed run leaves whole lines). Use it as ``on_call``; close it (or use ``with``) at the end.

    Raises:
        OSError: the file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: IO[str] = self.path.open("w", encoding="utf-8")
        self._lock = threading.Lock()
        self.written = 0

    def __call__(self, event: CallEvent) -> None:
        line = json.dumps(event.to_json_dict(), ensure_ascii=False) + "\n"
        with self._lock:
            if self._file.closed:
                return
            self._file.write(line)
            self._file.flush()
            self.written += 1

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> JsonlTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class OtelTracer:
    """Turns a finished document and its call events into OpenTelemetry spans (made at the document's end, with the
    calls' own start and end times, under the span current where the document was submitted).

    Attributes:
        tracer: an ``opentelemetry.trace.Tracer``.
        follows_global: the tracer is the global provider's: record only once an SDK's provider is set (until then
            OpenTelemetry would drop the spans, and making them would cost every call a few microseconds).
    """

    tracer: Any
    follows_global: bool = False
    _trace: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from opentelemetry import trace

        self._trace = trace

    def enabled(self) -> bool:
        """Whether spans would go anywhere: a tracer given explicitly, or a real global tracer provider."""
        if not self.follows_global:
            return True
        provider = self._trace.get_tracer_provider()
        return not isinstance(provider, self._trace.ProxyTracerProvider | self._trace.NoOpTracerProvider)

    def document(
        self, document_id: str, events: list[CallEvent], started_at: float, ended_at: float, **attrs: Any
    ) -> None:
        """Record one document: ``started_at`` / ``ended_at`` in UNIX seconds, ``attrs`` its ``polytask.*`` figures."""
        span = self.tracer.start_span(
            "polytask.document",
            start_time=_ns(started_at),
            attributes={"polytask.document.id": document_id, **{f"polytask.{k}": v for k, v in attrs.items()}},
        )
        context = self._trace.set_span_in_context(span)
        for event in events:
            start = event.started_at + event.queue_wait + event.rate_limit_wait
            child = self.tracer.start_span(
                f"chat {event.model.partition(':')[2] or event.model}",
                context=context,
                start_time=_ns(start),
                attributes=_span_attributes(event),
            )
            if event.status == "error":
                child.set_status(self._trace.Status(self._trace.StatusCode.ERROR, event.error or event.error_type))
            child.end(end_time=_ns(start + event.latency))
        if attrs.get("partial"):
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, "some pairs failed"))
        span.end(end_time=_ns(max(ended_at, started_at)))


def otel_tracer() -> OtelTracer | None:
    """An :class:`OtelTracer` on the global tracer provider when ``opentelemetry-api`` is installed, else None."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    from ._version import __version__

    return OtelTracer(trace.get_tracer("polytask", __version__), follows_global=True)


def call_hook(hook: Callable[[Any], None] | None, value: Any, what: str) -> None:
    """Call a user's hook; what it raises is logged (``what``: the hook's name), never raised into the run."""
    if hook is None:
        return
    try:
        hook(value)
    except Exception:
        logger.exception("the %s hook raised; the run goes on", what)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _span_attributes(event: CallEvent) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": event.model.partition(":")[2] or event.model,
        "gen_ai.usage.input_tokens": event.prompt_tokens,
        "gen_ai.usage.output_tokens": event.completion_tokens,
        "polytask.task": event.task,
        "polytask.attempt": event.attempt,
        "polytask.status": event.status,
        "polytask.queue_wait_s": event.queue_wait,
        "polytask.rate_limit_wait_s": event.rate_limit_wait,
        "polytask.cached_tokens": event.cached_tokens,
    }
    optional = {
        "polytask.cost_usd": event.cost,
        "polytask.sentence": event.sentence,
        "http.response.status_code": event.http_status,
        "error.type": event.error_type,
        "gen_ai.response.id": event.request_id,
        "polytask.retry_after_s": event.retry_after,
    }
    attributes.update({k: v for k, v in optional.items() if v is not None})
    return attributes
