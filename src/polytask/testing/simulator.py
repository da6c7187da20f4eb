"""An OpenAI-compatible chat-completions server for tests: rate limits, latency and faults on demand.

Endpoints (each also without the ``/v1`` prefix):

* ``POST /v1/chat/completions`` — an OpenAI request (``model``, ``messages``, optional ``response_format``
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` or ``{"type": "json_object"}``,
  ``max_tokens`` / ``max_completion_tokens`` (the latter read first, unless ``reads_max_completion_tokens`` is
  False), ``temperature``) → a ``chat.completion`` object whose content is compact JSON valid for the schema,
  deterministic per (seed, sentence). With ``"stream": true`` the same answer comes as server-sent events: a
  ``chat.completion.chunk`` with the role, the content (or the refusal) in a few pieces, one with the
  ``finish_reason``, a last one with no choices and the ``usage`` when ``stream_options.include_usage`` is true, then
  ``data: [DONE]``.
* ``/v1/files`` and ``/v1/batches`` — OpenAI's Batch API, each line answered as a completion is (see
  :mod:`polytask.testing.batches`).
* ``GET /v1/models`` — the one configured model.
* ``GET /stats`` — :class:`SimulatorStats` as JSON.

Order of checks for a completion: body validation (400), the hidden concurrency cap (503, no rate-limit
headers), a spent daily quota (429 with a day-long ``retry-after``), an injected fault is drawn (injected 429s
answer at once), the RPM/TPM buckets (429 ``rate_limit_exceeded``; the call is charged when admitted), latency (with
``serve_at_once``: the wait for one of its slots first), then the answer or the drawn fault.

Start it with :class:`Simulator` (async), :func:`run_in_thread` (any code) or :func:`serve` (blocking, for a
CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, MutableMapping
from http import HTTPStatus
from typing import Any, Self

from aiohttp import web

from .._prompts import SCHEMA_MARKER, estimate_tokens, extract_sentence
from ..chat import Message
from .batches import BatchStore
from .config import FAULT_KINDS, FaultRates, SimulatorConfig, SimulatorStats
from .oracle import GoldIndex, oracle_answer, packed_answer, packed_sentences
from .ratelimit import Clock, ServerRateLimiter, format_duration
from .schema_fill import answer_rng, fill_schema, loosen_answer, violate_schema

__all__ = [
    "FAULT_KINDS",
    "FaultRates",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "run_in_thread",
    "serve",
]

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
_BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
    "</center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)


_RATE_LIMIT_HEADERS = ("x-ratelimit-", "retry-after", "ratelimit-")


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _count_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 3.6))


class Simulator:
    """The server. ``async with Simulator(config) as sim:`` starts it on 127.0.0.1, a free port.

    Args:
        config: the behaviour (default: :class:`SimulatorConfig` defaults — no limits, no faults).
        clock: monotonic seconds for the rate-limit buckets (inject a fake one for deterministic tests).

    Attributes:
        config: the configuration.
        stats: live :class:`SimulatorStats`.
        limiter: the RPM/TPM :class:`~polytask.testing.ratelimit.ServerRateLimiter`.
        batch_store: the Batch API's files and batches (:class:`~polytask.testing.batches.BatchStore`).
        base_url: ``http://host:port/v1`` once started (else None).
    """

    def __init__(self, config: SimulatorConfig | None = None, *, clock: Clock = time.monotonic) -> None:
        self.config = config or SimulatorConfig()
        self.stats = SimulatorStats()
        self.limiter = ServerRateLimiter(
            self.config.rpm,
            self.config.tpm,
            clock,
            rpm_window=self.config.rpm_window,
            announce_window=self.config.announce_window,
        )
        self.gold = GoldIndex(self.config.gold_path) if self.config.gold_path else None
        self.batch_store = BatchStore(self.config, self.stats, self.answer_body, clock)
        self.base_url: str | None = None
        self._fault_rng = random.Random(self.config.seed)
        self._latency_rng = random.Random(self.config.seed + 1)
        self._answered_today = 0  # completions counted against ``daily_quota``
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None  # serve_at_once: the slots, first come first served
        self._work: set[asyncio.Task[None]] = set()  # serve_at_once: completions queued or being served

    def app(self) -> web.Application:
        """The aiohttp application (for mounting it yourself)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/chat/completions", self._completions)
            app.router.add_get(prefix + "/models", self._models)
            app.router.add_get(prefix + "/stats", self._stats)
            self.batch_store.add_routes(app, prefix)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = a free port). Returns the base URL, ``http://host:port/v1``."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already running")
        self._stopping = asyncio.Event()
        if self.config.serve_at_once is not None:
            self._slots = asyncio.Semaphore(self.config.serve_at_once)
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await runner.setup()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            site = web.SockSite(runner, sock)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        bound = sock.getsockname()[1]
        self.base_url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening; requests still sleeping (latency, hang) are woken and dropped."""
        if self._stopping is not None:
            self._stopping.set()
        if self._work:  # queued completions end at once now (their sleeps return)
            await asyncio.gather(*self._work, return_exceptions=True)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self.base_url = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _serve(self, seconds: float) -> None:
        """Wait for a free slot, then work ``seconds`` (``serve_at_once``). The work goes on if the client goes away
        (the handler is cancelled): an abandoned request keeps its place in the queue and its slot."""
        work = asyncio.ensure_future(self._queue_and_work(seconds))
        self._work.add(work)
        work.add_done_callback(self._work.discard)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            if not work.done():
                self.stats.abandoned += 1
            raise

    async def _queue_and_work(self, seconds: float) -> None:
        assert self._slots is not None
        stats = self.stats
        stats.queued += 1
        stats.max_queued = max(stats.max_queued, stats.queued)
        arrived = time.monotonic()
        try:
            await self._slots.acquire()
        finally:
            stats.queued -= 1
        try:
            stats.max_queue_wait = max(stats.max_queue_wait, time.monotonic() - arrived)
            await self._sleep(seconds)
        finally:
            self._slots.release()

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "polytask"}
        return web.json_response({"object": "list", "data": [model]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.model_dump())

    def _draw_fault(self) -> str | None:
        draw = self._fault_rng.random()
        acc = 0.0
        for kind in FAULT_KINDS:
            rate: float = getattr(self.config.faults, kind)
            acc += rate
            if rate > 0 and draw < acc:
                return kind
        return None

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.received += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        drawn: list[str] = []  # the fault drawn, for counting a request cancelled mid-way
        try:
            outcome, response = await self._handle(request, drawn)
            stats.count(outcome)
            if not response.prepared:  # a stream has sent its headers already (stripped before)
                self._strip_rate_limit_headers(response.headers)
            return response
        except asyncio.CancelledError:  # the client went away (a timeout during latency or a hang)
            stats.count(drawn[0] if drawn else "cancelled")
            raise
        finally:
            stats.in_flight -= 1

    def _strip_rate_limit_headers(self, headers: MutableMapping[str, str]) -> None:
        if not self.config.rate_limit_headers:  # the wait is only in a 429's message
            for name in [n for n in headers if n.lower().startswith(_RATE_LIMIT_HEADERS)]:
                del headers[name]

    def _schema(self, body: dict[str, Any], messages: list[Message]) -> dict[str, Any] | None:
        fmt = body.get("response_format") or {}
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            schema = spec.get("schema") if isinstance(spec, dict) else None
            return schema if isinstance(schema, dict) else {}
        for m in messages:
            content = m.get("content", "")
            if m.get("role") == "system" and SCHEMA_MARKER in content:
                tail = content.split(SCHEMA_MARKER, 1)[1].lstrip()
                with contextlib.suppress(ValueError):
                    schema, _ = json.JSONDecoder().raw_decode(tail)
                    if isinstance(schema, dict):
                        return schema
        return None

    def _answer_alone(self, schema: Mapping[str, Any], sentence: str) -> Any:
        """What a request for ``sentence`` alone, under ``schema``, is answered (oracle or filled)."""
        rng = answer_rng(self.config.seed, sentence)
        return oracle_answer(schema, sentence, self.gold, rng) if self.gold is not None else fill_schema(schema, rng)

    def _daily_quota_spent(self, model: str) -> web.Response:
        """The 429 of a spent ``daily_quota``, as OpenAI words a requests-per-day limit."""
        limit, wait = self.config.daily_quota, self.config.daily_quota_retry_after
        headers = {"retry-after-ms": str(math.ceil(wait * 1000)), "retry-after": str(math.ceil(wait))}
        message = (
            f"Rate limit reached for {model} on requests per day (RPD): Limit {limit}, Used {limit}, Requested 1. "
            f"Please try again in {format_duration(wait)}. Visit https://platform.openai.com/account/rate-limits to "
            "learn more."
        )
        return _error(429, message, "requests", "rate_limit_exceeded", headers=headers)

    def _read(self, body: Any) -> tuple[list[Message], int]:
        """The messages and the completion cap of a chat-completions request body.

        Raises:
            ValueError: the body is not a valid request (the message says why).
        """
        cfg = self.config
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
            raise ValueError("'messages' must be a non-empty array of message objects")
        messages: list[Message] = [{"role": str(m.get("role", "")), "content": _text(m.get("content"))} for m in raw]
        max_tokens = body.get("max_completion_tokens") if cfg.reads_max_completion_tokens else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is None:
            max_tokens = cfg.default_max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError("'max_tokens' must be a positive integer")
        return messages, max_tokens

    def _refused_format(self, body: dict[str, Any]) -> tuple[int, str] | None:
        """``(status, message)`` when the server refuses the body's ``response_format`` (``supports_json_schema``
        False), else None; a status other than 400 comes with its bare reason phrase."""
        cfg = self.config
        fmt = body.get("response_format")
        if cfg.supports_json_schema or not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"):
            return None
        if cfg.json_schema_status != 400:  # a server that fails on it, saying nothing of why
            try:
                return cfg.json_schema_status, HTTPStatus(cfg.json_schema_status).phrase
            except ValueError:  # a status with no name
                return cfg.json_schema_status, "Error"
        return 400, "response_format type 'json_schema' is not supported by this server; use 'json_object'"

    def answer_body(self, body: Any, fault: str | None = None) -> tuple[int, dict[str, Any], str]:
        """One chat-completions request body answered as ``POST /v1/chat/completions`` answers it (the same
        validation, the same deterministic or gold answer), without rate limits, latency or transport faults: the
        Batch API's lines (:mod:`polytask.testing.batches`). ``fault``: an answer fault to apply (``"refusal"``,
        ``"invalid_answer"``, …), or None.

        Returns:
            ``(status, JSON body, outcome)``: 200 and a ``chat.completion`` object, or an error status and an
            OpenAI error object.
        """
        try:
            messages, max_tokens = self._read(body)
        except ValueError as exc:
            error = {"message": f"Invalid request: {exc}", "type": "invalid_request_error", "param": None, "code": None}
            return 400, {"error": error}, "bad_request"
        refused = self._refused_format(body)
        if refused is not None:
            status, message = refused
            error = {"message": message, "type": "BadRequestError", "param": "response_format", "code": None}
            return status, {"error": error}, "bad_request" if status == 400 else "json_schema_refused"
        model = str(body.get("model") or self.config.model)
        outcome, completion = self._answer(body, messages, max_tokens, model, fault)
        return 200, completion, outcome

    async def _handle(self, request: web.Request, drawn: list[str]) -> tuple[str, web.StreamResponse]:
        cfg = self.config
        try:
            body = await request.json()
            messages, max_tokens = self._read(body)
        except ValueError as exc:
            return "bad_request", _error(400, f"Invalid request: {exc}", "invalid_request_error")
        model = str(body.get("model") or cfg.model)
        refused = self._refused_format(body)
        if refused is not None:
            status, message = refused
            if status != 400:
                return "json_schema_refused", web.Response(status=status, text=message)
            return "bad_request", _error(400, message, "BadRequestError", param="response_format")

        if cfg.max_concurrency is not None and self.stats.in_flight > cfg.max_concurrency:
            return "over_capacity", _error(503, "The server is overloaded. Please try again later.", "server_error")

        if cfg.daily_quota is not None:
            if self._answered_today >= cfg.daily_quota:
                return "daily_quota", self._daily_quota_spent(model)
            self._answered_today += 1

        fault = self._draw_fault()
        if fault is not None:
            drawn.append(fault)
        if fault in ("rate_limit", "insufficient_quota"):
            headers = self.limiter.headers()
            if fault == "rate_limit":
                wait = cfg.fault_retry_after
                headers["retry-after-ms"] = str(math.ceil(wait * 1000))
                headers["retry-after"] = str(math.ceil(wait))
                message = (
                    f"Rate limit reached for {model} on requests per min (RPM): Please try again in "
                    f"{wait:g}s. Visit https://platform.openai.com/account/rate-limits to learn more."
                )
                return fault, _error(429, message, "requests", "rate_limit_exceeded", headers=headers)
            message = (
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors."
            )
            return fault, _error(429, message, "insufficient_quota", "insufficient_quota", headers=headers)

        prompt_tokens = estimate_tokens(messages)
        decision = self.limiter.check(prompt_tokens + max_tokens, model)
        if not decision.allowed:
            headers = dict(decision.headers)
            if not math.isinf(decision.retry_after):
                headers["retry-after-ms"] = str(math.ceil(decision.retry_after * 1000))
                headers["retry-after"] = str(max(1, math.ceil(decision.retry_after)))
            type_ = decision.kind or "requests"
            return "rate_limited", _error(429, decision.message, type_, "rate_limit_exceeded", headers=headers)

        seconds = cfg.latency * math.exp(cfg.latency_sigma * self._latency_rng.gauss(0.0, 1.0)) if cfg.latency else 0.0
        if self._slots is not None:
            await self._serve(seconds)
        elif seconds > 0:
            await self._sleep(seconds)

        if fault == "server_error":
            message = "The server had an error while processing your request. Sorry about that!"
            return fault, _error(500, message, "server_error")
        if fault == "bad_gateway":
            return fault, web.Response(status=502, text=_BAD_GATEWAY_HTML, content_type="text/html")
        if fault == "unavailable":
            return fault, _error(503, "The engine is currently overloaded, please try again later.", "server_error")
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            return fault, web.Response(status=200)
        if fault == "hang":
            await self._sleep(cfg.hang_seconds)

        outcome, completion = self._answer(body, messages, max_tokens, model, fault)
        headers = {**decision.headers, "x-request-id": f"req_{uuid.uuid4().hex}"}
        if body.get("stream") is True:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(request, completion, headers, outcome, usage=usage, fault=fault)
        text = json.dumps(completion, ensure_ascii=False)
        if fault == "malformed":
            text = text[: len(text) // 2]
        if fault == "cut_stream":  # the connection closes halfway through the body
            data = text.encode()
            response = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
            response.content_length = len(data)
            return await self._cut(request, response, [data[: len(data) // 2]], outcome)
        return outcome, web.Response(text=text, content_type="application/json", headers=headers)

    def _answer(
        self, body: dict[str, Any], messages: list[Message], max_tokens: int, model: str, fault: str | None
    ) -> tuple[str, dict[str, Any]]:
        """``(outcome, chat.completion object)`` for a valid request: the deterministic (or gold) answer, with the
        answer faults (``invalid_answer``, ``loose_answer``, ``length``, ``refusal``) applied."""
        cfg = self.config
        prompt_tokens = estimate_tokens(messages)
        sentence = extract_sentence(messages)
        if sentence is None:
            sentence = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        rng = answer_rng(cfg.seed, sentence)
        schema = self._schema(body, messages)
        if schema is None:
            answer: Any = {}
        elif fault == "invalid_answer":
            answer = violate_schema(schema, rng)
        elif (packed := packed_sentences(schema, messages)) is not None:  # several sentences / tasks in one call
            answer = packed_answer(schema, packed, self._answer_alone)
        elif self.gold is not None:
            answer = oracle_answer(schema, sentence, self.gold, rng)
        else:
            answer = fill_schema(schema, rng)
        content: str | None = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
        if fault == "loose_answer" and schema is not None:
            content = loosen_answer(answer, schema, rng)
        assert content is not None
        refusal = None
        finish = "stop"
        completion_tokens = _count_tokens(content)
        if fault == "length" or completion_tokens > max_tokens:
            content = content[: max(1, min(len(content) // 2, int(max_tokens * 3.6)))]
            finish, completion_tokens = "length", max_tokens
        elif fault == "refusal":
            content, refusal = None, REFUSAL_TEXT
            completion_tokens = _count_tokens(REFUSAL_TEXT)
        completion = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": refusal},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_polytask_sim",
        }
        outcome = (
            fault
            if fault in ("malformed", "length", "refusal", "invalid_answer", "loose_answer", "hang", "cut_stream")
            else "ok"
        )
        if finish == "length" and fault not in ("length", "cut_stream"):
            outcome = "ok"
        return outcome, completion

    async def _stream(
        self,
        request: web.Request,
        completion: dict[str, Any],
        headers: dict[str, str],
        outcome: str,
        *,
        usage: bool,
        fault: str | None,
    ) -> tuple[str, web.StreamResponse]:
        """``completion`` as server-sent events (``stream: true``): the role, the content (or the refusal) in up to
        four pieces, the ``finish_reason``, the ``usage`` when asked for, ``[DONE]``. A ``malformed`` fault cuts
        one chunk's JSON in half (the stream goes on); ``cut_stream`` closes the connection after half the pieces,
        before any ``finish_reason``."""
        (choice,) = completion["choices"]
        message = choice["message"]
        base = {k: completion[k] for k in ("id", "created", "model", "system_fingerprint")}
        base["object"] = "chat.completion.chunk"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            return {**base, "choices": choices, **({"usage": None} if usage else {})}

        field = "content" if message["content"] is not None else "refusal"
        text: str = message[field] or ""
        size = max(1, math.ceil(len(text) / 4))
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        start = {"role": "assistant", "content": "" if field == "content" else None}
        if field == "refusal":
            start["refusal"] = ""
        chunks = [chunk(start), *(chunk({field: piece}) for piece in pieces), chunk({}, choice["finish_reason"])]
        if usage:
            chunks.append({**base, "choices": [], "usage": completion["usage"]})
        events = [b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in chunks]
        if fault == "malformed":
            middle = len(events) // 2
            events[middle] = events[middle][: len(events[middle]) // 2] + b"\n\n"
        headers = {**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        self._strip_rate_limit_headers(headers)
        response = web.StreamResponse(headers=headers)
        if fault == "cut_stream":
            return await self._cut(request, response, events[: 1 + math.ceil(len(pieces) / 2)], outcome)
        try:
            await response.prepare(request)
            for event in events:
                await response.write(event)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:  # the client went away mid-stream
            return "cancelled", response
        return outcome, response

    async def _cut(
        self, request: web.Request, response: web.StreamResponse, parts: list[bytes], outcome: str
    ) -> tuple[str, web.StreamResponse]:
        """Send the headers and ``parts`` of the body, then abort the connection (a ``cut_stream`` fault)."""
        self._strip_rate_limit_headers(response.headers)
        try:
            await response.prepare(request)
            for part in parts:
                await response.write(part)
        except ConnectionError:
            return "cancelled", response
        if request.transport is not None:
            request.transport.abort()
        return outcome, response


@contextlib.contextmanager
def run_in_thread(
    config: SimulatorConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Clock = time.monotonic,
) -> Iterator[Simulator]:
    """Run a :class:`Simulator` on its own event loop in a daemon thread; yields it (``.base_url`` set).

    Works from synchronous code and from inside another event loop. The server stops when the block exits.
    """
    sim = Simulator(config, clock=clock)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    failure: list[BaseException] = []

    async def _start() -> None:
        try:
            await sim.start(host, port)
        except BaseException as exc:
            failure.append(exc)
        finally:
            ready.set()

    def _run() -> None:
        asyncio.set_event_loop(loop)
        task = loop.create_task(_start())
        loop.run_forever()
        del task

    thread = threading.Thread(target=_run, name="polytask-simulator", daemon=True)
    thread.start()
    ready.wait()
    try:
        if failure:
            raise failure[0]
        yield sim
    finally:
        if not failure:
            asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def serve(config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the simulator in the foreground until interrupted (Ctrl-C); prints the base URL first."""

    async def _main() -> None:
        sim = Simulator(config)
        url = await sim.start(host, port)
        print(f"polytask simulator listening on {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sim.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
