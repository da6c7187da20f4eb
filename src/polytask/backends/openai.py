"""The OpenAI-compatible chat-completions backend (OpenAI, Azure-compatible gateways, vLLM, llama.cpp, …).

polytask owns retries and rate limits, so the backend sends each call once. By default it posts the JSON itself
(:mod:`polytask._http`) through a pooled aiohttp session under asyncio, and through httpx2 under trio (aiohttp runs
on asyncio only): the openai SDK's per-request path costs 5–9 ms of CPU per call, which caps a client near 200
calls/s (BENCHMARKS.md). ``http="sdk"`` sends through ``openai.AsyncOpenAI`` (``max_retries=0``) instead. Every
path sends inside :func:`polytask._http.translate_transport_errors`, so the same errors come out, translated into
:mod:`polytask.exceptions`.

What it learns of a server that is only partly OpenAI-compatible (the ``response_format`` each task can use, the
field the completion cap must travel in) is kept in :mod:`polytask.backends._quirks`; whether the server has ever
answered, here: a refused connection before that is a wrong base URL (:class:`~polytask.ServerUnreachableError`).

With ``batch=True`` the calls go through OpenAI's Batch API instead (:mod:`polytask.backends._batch`): collected,
submitted as batches, polled, and each answered by its batch's line, read as a live answer is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import anyio
import openai

from .. import exceptions as exc
from .._checks import check_count, check_positive
from .._headers import parse_duration, parse_rate_limit_headers, parse_rate_limit_message, parse_retry_after
from .._http import (
    AiohttpClient,
    HTTPClient,
    Httpx2Client,
    ServerEvents,
    async_library,
    is_event_stream,
    translate_transport_errors,
)
from .._prompts import add_schema_to_system
from .._version import __version__
from ..chat import ChatRequest, ChatResponse, RateLimitHeaders
from ..costs import Prices, batch_prices, prices_for
from ..exceptions import ConfigurationError
from ._batch import Batcher, BatchesAPI, BatchOptions, custom_id, is_batch_failure
from ._quirks import CapField, CapParam, StructuredMode, StructuredModes, may_be_capability, simpler_modes
from ._stream import StreamedCompletion
from .base import BackendSettings, SettingsAttributes

if TYPE_CHECKING:
    import httpx2

logger = logging.getLogger("polytask")

__all__ = ["OpenAIBackend"]

HTTPMode = Literal["aiohttp", "httpx2", "sdk"]
_UNREACHABLE_RETRIES = (0.5, 1.0)
"""Seconds waited before each new try of a connection refused before the server ever answered (a server starting
at the same moment); when the last is refused too, :class:`~polytask.ServerUnreachableError`."""
_DEFAULT_BASE_URL = "https://api.openai.com/v1"
_BY_STATUS: dict[int, type[exc.APIStatusError]] = {
    400: exc.BadRequestError,
    401: exc.AuthenticationError,
    403: exc.PermissionDeniedError,
    404: exc.NotFoundError,
    422: exc.UnprocessableEntityError,
}


class OpenAIBackend(SettingsAttributes):
    """Chat completions over any OpenAI-compatible HTTP API.

    Args:
        model: the model name (``"gpt-4o-mini"``).
        base_url: the API's base URL (``http://127.0.0.1:8000/v1``); default ``$OPENAI_BASE_URL`` or OpenAI's.
        api_key: default ``$OPENAI_API_KEY``; servers given by ``base_url`` may need none. Never logged or shown.
        rpm: requests-per-minute limit to keep under, or None (then learned from ``x-ratelimit-*`` headers).
        tpm: tokens-per-minute limit to keep under, or None (likewise).
        timeout: seconds allowed for one HTTP call before it counts as a timeout (default 60).
        structured_outputs: ``"json_schema"`` (strict structured outputs; default), ``"json_object"`` (JSON mode,
            schema in the prompt) or ``"none"`` (schema in the prompt). A task (its schema name) falls back to the
            next simpler mode for the rest of the run, with a warning naming it, the other tasks keeping theirs, on
            the server's capability answer: a 400 that names ``response_format``, or any other error status (not
            401, 403, 404, 429) that its mode met twice identically before ever answering while the same request
            in a simpler mode answered (a server that answers 500 to a ``response_format`` it does not know). A
            failure the simpler mode meets too is an outage (retried as usual), and a mode that answered once is
            kept. ``backend.mode`` stays the configured mode; ``backend.structured_modes`` maps every task asked to
            the mode its calls use now, ``backend.fallbacks`` each task that fell back to its mode now.
        max_tokens_param: the request field for the completion cap (``max_tokens``, in tokens):
            ``"max_completion_tokens"`` (OpenAI's current name), ``"max_tokens"`` (what older vLLM, llama.cpp,
            Ollama and many gateways read; they ignore the other), or ``"auto"`` (default): send
            ``max_completion_tokens`` and switch to ``max_tokens`` for the rest of the run, with a warning, once an
            answer's completion tokens exceed the cap sent (the server ignored it) or a 400 says the server does
            not know the field (that call is sent again at once). ``backend.max_tokens_field`` is the field sent
            now.
        http: ``"aiohttp"`` (fastest; asyncio only), ``"httpx2"`` (asyncio or trio), or ``"sdk"`` (through
            ``openai.AsyncOpenAI``). Unset (None, the default): aiohttp when the call runs under asyncio, httpx2
            under trio. ``"aiohttp"`` asked for by name under trio raises :class:`~polytask.ConfigurationError`
            on the first call.
        max_connections: HTTP connection pool size (default 512).
        http_client: an ``httpx2.AsyncClient`` to send through (implies ``http="httpx2"`` unless ``"sdk"``);
            tests inject one with ``httpx2.MockTransport``.
        organization, project: sent as ``OpenAI-Organization`` / ``OpenAI-Project``; default
            ``$OPENAI_ORG_ID`` / ``$OPENAI_PROJECT_ID``, as the openai SDK reads them.
        extra_body: extra JSON fields sent with every request.
        cache_identity: what tells this server's answers apart in a request cache (default: the base URL, the
            model and ``extra_body``; never the API key). Give one that stays the same where the URL does not
            (a gateway that moves, a server on a new port).
        prices: what its tokens cost, USD per million tokens (default: genai-prices' for ``model`` at ``base_url``,
            via :func:`~polytask.costs.prices_for`; None there, for a model or server it does not know, leaves the
            cost unknown). ``settings.prices`` holds them.
        stream: ask for each answer as a stream of server-sent events (``"stream": true`` with
            ``"stream_options": {"include_usage": true}``; default False), on every ``http`` path (the SDK path
            through the SDK's own streaming). The pieces of ``delta.content`` (and ``delta.refusal``) are joined
            and the answer is returned whole once the stream ends (``data: [DONE]``): nothing is parsed before.
            ``finish_reason`` is the last a chunk gave, the tokens those of the final chunk's ``usage`` (0 where
            the server sent none), ``request_id`` the ``x-request-id`` header or else the chunks' ``id``, and
            ``latency`` the seconds to the last chunk. A stream cut off before ``[DONE]`` and before any
            ``finish_reason`` (the connection closed, or its last chunk is not whole JSON) raises
            :class:`~polytask.APIConnectionError`, retried as a reset connection is, never read as an answer; an
            ``{"error": …}`` chunk raises the error of its ``code`` (a status; else a retried
            :class:`~polytask.ServerError`). An error status before the stream starts is the same error as
            without ``stream``, and a server that ignores ``stream`` and answers one JSON completion is read as
            one. ``timeout`` bounds the whole stream under aiohttp, and each wait for the next piece under httpx2
            and the SDK.
        batch: send the calls through the Batch API (``True``, or a :class:`~polytask.BatchOptions` for its limits
            and timings; default False): each call's request (the body sent today, as one line of a JSON Lines
            file) waits while the calls are collected; they are submitted as one batch once ``max_requests``
            (50,000) or ``max_bytes`` (200 MB) are reached, or no new call came for ``flush_after`` (0.5 s), the
            batch is polled until it ends, and each call gets its own line back, read as a live answer (an error
            line raises the error its status raises live, so retries and re-asks work as always, going out in a
            follow-up batch). Answers take as long as the batch (OpenAI: up to 24 hours). ``settings`` then declare
            10,000 calls in flight (at most ``max_requests``), no adaptive concurrency, no RPM / TPM and none learned
            (the Batch API has its own queue), and the batch prices (genai-prices' where it lists them, else half
            the live ones; ``prices`` given here are the live prices, halved). Not with ``stream``, ``rpm`` or
            ``tpm``.
        batch_state: with ``batch``: a SQLite file (made if missing) where each batch submitted is recorded with the
            requests it holds, so a run killed mid-batch and run again waits for those batches instead of paying
            for them twice (see :mod:`polytask.backends._batch`). None (default): none.

    ``aclose()`` closes the connections it opened; used again, it opens new ones. An ``http_client`` you pass in
    is never closed by it (a client you closed raises :class:`~polytask.BackendClosedError`).

    A connection refused (or a host name that does not resolve) before the server has ever answered this backend
    is tried twice more within 1.5 s (a server starting at that moment), then raises
    :class:`~polytask.ServerUnreachableError` naming the URL, which stops a run (exit 2 in the CLI) instead of
    being retried as an outage; once the server has answered, a refused connection is a retried
    :class:`~polytask.APIConnectionError` (a server restarting).

    Raises:
        ConfigurationError: no API key for OpenAI's own endpoint, credentials in ``base_url`` (``user:pass@``), an
            unknown ``http`` or ``max_tokens_param``, a ``stream`` that is not a bool, or
            a bad number (the message names it); from a call, ``http="aiohttp"`` used under trio.
    """

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        timeout: float = 60.0,
        structured_outputs: StructuredMode = "json_schema",
        max_tokens_param: CapParam = "auto",
        http: HTTPMode | None = None,
        max_connections: int = 512,
        http_client: httpx2.AsyncClient | None = None,
        organization: str | None = None,
        project: str | None = None,
        extra_body: dict[str, Any] | None = None,
        cache_identity: str | None = None,
        prices: Prices | None = None,
        stream: bool = False,
        batch: bool | BatchOptions = False,
        batch_state: str | os.PathLike[str] | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = (api_key or os.environ.get("OPENAI_API_KEY") or "").strip() or None
        if api_key is not None and not all(0x20 < ord(c) < 0x7F for c in api_key):
            raise ConfigurationError(  # never the key itself: it is a secret
                "the API key (api_key= or OPENAI_API_KEY) contains a space, a control character or a non-ASCII "
                "character (a pasted '…'?), so it cannot be sent as a header; check how it was set"
            )
        if api_key is None:
            if base_url is None:
                raise ConfigurationError(
                    "no API key: set OPENAI_API_KEY (or pass api_key=), or point base_url at a server that needs none"
                )
            api_key = "not-needed"
        if base_url is not None and "@" in urlsplit(base_url).netloc:
            parts = urlsplit(base_url)
            shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
            raise ConfigurationError(  # never the credentials themselves: they are a secret
                f"base_url {shown} carries credentials (user:password@): polytask sends the API key as a Bearer "
                "Authorization header, which cannot go with them; take them out of the URL and pass the key as "
                "api_key (or OPENAI_API_KEY)"
            )
        if http is not None and http not in ("aiohttp", "httpx2", "sdk"):
            raise ConfigurationError(f"http must be 'aiohttp', 'httpx2' or 'sdk', got {http!r}")
        if max_tokens_param not in ("auto", "max_completion_tokens", "max_tokens"):
            raise ConfigurationError(
                f"max_tokens_param must be 'auto', 'max_completion_tokens' or 'max_tokens', got {max_tokens_param!r}"
            )
        if structured_outputs not in ("json_schema", "json_object", "none"):
            raise ConfigurationError(
                f"structured_outputs must be 'json_schema', 'json_object' or 'none', got {structured_outputs!r}"
            )
        if not isinstance(stream, bool):
            raise ConfigurationError(f"stream must be True or False, got {stream!r}")
        options = _batch_options(batch, batch_state, stream=stream, rpm=rpm, tpm=tpm)
        check_positive("rpm", rpm)
        check_positive("tpm", tpm)
        check_positive("timeout", timeout, allow_none=False)
        check_count("max_connections", max_connections, allow_none=False)
        if http_client is not None and http != "sdk":
            http = "httpx2"
        self.model = model
        self.name = f"openai:{model}"
        self.mode: StructuredMode = structured_outputs
        self._modes = StructuredModes(structured_outputs)
        self.max_tokens_param: CapParam = max_tokens_param
        self.http: HTTPMode | None = http  # None: chosen per call by the running async library
        self.timeout = timeout
        self.stream = stream
        self.base_url = (base_url or _DEFAULT_BASE_URL).rstrip("/")
        self._cap = CapField(max_tokens_param, self.base_url)
        self._answered = False  # the server has answered (any status) at least once
        self._unreachable = False  # a ServerUnreachableError was raised: later refusals are not tried again
        if cache_identity is None:
            extra = json.dumps(extra_body, sort_keys=True, default=str) if extra_body else ""
            cache_identity = f"openai {self.base_url} {model} {extra}".strip()
        if prices is not None and not isinstance(prices, Prices):
            raise ConfigurationError(f"prices must be a polytask.Prices, got {type(prices).__name__}")
        if options is None:
            self.settings = BackendSettings(
                rpm=rpm,
                tpm=tpm,
                token_model=model,
                identity=cache_identity,
                prices=prices if prices is not None else prices_for(model, base_url=self.base_url),
            )
        else:  # the Batch API: many calls waiting at once, its own queue limits, its own prices
            self.settings = BackendSettings(
                concurrency=min(options.max_requests, _MOST_IN_FLIGHT),
                adaptive_concurrency=False,
                learn_limits=False,  # no x-ratelimit-* headers, and no first answer to wait for before the rest
                token_model=model,
                identity=cache_identity,
                prices=batch_prices(prices)
                if prices is not None
                else prices_for(model, base_url=self.base_url, batch=True),
            )
        self._url = self.base_url + "/chat/completions"
        self._secret = api_key
        self._extra_body = extra_body or {}
        organization = organization or os.environ.get("OPENAI_ORG_ID")
        project = project or os.environ.get("OPENAI_PROJECT_ID")
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"polytask/{__version__}",
            **({"OpenAI-Organization": organization} if organization else {}),
            **({"OpenAI-Project": project} if project else {}),
        }
        self._sdk: openai.AsyncOpenAI | None = None
        self._lean: HTTPClient | None = None  # the client under asyncio (and under trio unless http is unset)
        self._lean_trio: Httpx2Client | None = None  # http unset, under trio: made there on first use
        self._max_connections = max_connections
        if http == "sdk":
            transport = Httpx2Client(http_client, max_connections=max_connections)

            def sdk() -> openai.AsyncOpenAI:
                return openai.AsyncOpenAI(
                    api_key=api_key,
                    base_url=self.base_url,
                    organization=organization,
                    project=project,
                    max_retries=0,
                    timeout=timeout,
                    http_client=transport.reopen(),
                )

            self._sdk = sdk()
            self._new_sdk = sdk
            self._transport = transport
        elif http == "httpx2":
            self._lean = Httpx2Client(http_client, max_connections=max_connections)
        else:
            self._lean = AiohttpClient(max_connections=max_connections)
        self.batch: BatchOptions | None = options
        self._batcher: Batcher | None = None
        if options is not None:
            api = BatchesAPI(self.base_url, self._headers, self._batch_client, timeout, self._status_error)
            api.answered = self._server_answered
            self._batcher = Batcher(api, options, batch_state)

    @property
    def structured_modes(self) -> dict[str, StructuredMode]:
        """Every task (schema name) asked so far → the ``response_format`` mode its calls use now."""
        return self._modes.modes

    @property
    def fallbacks(self) -> dict[str, StructuredMode]:
        """Each task (schema name) that fell back from the configured mode → its mode now."""
        return self._modes.fallbacks

    @property
    def max_tokens_field(self) -> Literal["max_completion_tokens", "max_tokens"]:
        """The request field the completion cap is sent in now (see ``max_tokens_param``)."""
        return self._cap.field

    def __repr__(self) -> str:
        batch = ", batch=True" if self.batch is not None else ""
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, http={self.http!r}{batch})"

    @property
    def batches_submitted(self) -> int:
        """Batches this backend created (batch mode; 0 otherwise), not counting those a rerun waited for again."""
        return self._batcher.submitted if self._batcher is not None else 0

    def _server_answered(self) -> None:
        self._answered = True

    def _batch_client(self) -> HTTPClient:
        """The client the Batch API's requests go through: the lean one, or with ``http="sdk"`` the SDK's own."""
        if self._lean is None:
            self._transport.reopen()
            return self._transport
        return self._lean_client()

    async def aclose(self) -> None:
        """Close the connections it opened (an ``http_client`` you passed in stays open: yours to close), and the
        batch state file."""
        if self._batcher is not None:
            self._batcher.close()
        if self._sdk is not None and self._transport.owned and not self._transport.loop_changed:
            await self._sdk.close()
        for lean in (self._lean, self._lean_trio):
            if lean is not None:
                await lean.aclose()

    async def complete(self, request: ChatRequest, /) -> ChatResponse:
        """One chat call, in the mode its task uses now (see ``structured_outputs``); never retries a failure, but a
        call the server answers with a capability answer is sent again in the simpler mode at once.

        Raises:
            PolytaskError: an error of :mod:`polytask.exceptions` (never an openai or HTTP one), among them
                :class:`~polytask.ServerUnreachableError` when nothing listens at ``base_url`` and nothing has
                answered yet.
        """
        task = request.schema_name
        mode = self._modes.mode(task)
        while True:
            try:
                response = await self._send(request, mode)
            except exc.APIStatusError as error:
                if is_batch_failure(error):  # the batch's, not this request's: says nothing of its mode
                    raise
                if isinstance(error, exc.BadRequestError | exc.UnprocessableEntityError):
                    now = self._modes.refused(task, mode, error)
                    if now is not None:  # a 400 naming response_format: the capability answer itself
                        mode = now
                        continue
                if may_be_capability(error):
                    await self._modes.probe_ended(task)  # another call of the task is finding out what works
                    now = self._modes.mode(task)
                    if now != mode:  # the task fell back while this call was out: sent again in its mode
                        mode = now
                        continue
                if not self._modes.should_probe(task, mode, error):
                    raise
                return await self._probe(request, mode, error)
            self._modes.answered(task, mode)
            return response

    async def _probe(self, request: ChatRequest, mode: StructuredMode, error: exc.APIStatusError) -> ChatResponse:
        """``request`` failed in ``mode`` as it did before (``error``): send it in each simpler mode until one
        answers (the task falls back to it; its answer is this call's) or fails otherwise; raises ``error`` when
        none answered."""
        worked: StructuredMode | None = None
        try:
            for simpler in simpler_modes(mode):
                try:
                    response = await self._send(request, simpler)
                except exc.APIStatusError as failure:
                    if may_be_capability(failure):
                        continue
                    break
                worked = simpler
                return response
        finally:
            self._modes.probed(request.schema_name, mode, error, worked)
        raise error

    async def _send(self, request: ChatRequest, mode: StructuredMode) -> ChatResponse:
        """One call in ``mode``; sent again with ``max_tokens`` when the server does not know
        ``max_completion_tokens`` (``max_tokens_param="auto"``), and tried again shortly when nothing listens
        before the server ever answered.

        Raises:
            ServerUnreachableError: the connection was refused (or the host name did not resolve) on every try and
                the server has never answered this backend.
        """
        delays: Iterator[float] | None = None  # made at the first refusal: most calls never meet one
        tries = 0
        while True:
            field = self._cap.field
            tries += 1
            try:
                response = await self._complete(request, mode, field)
            except exc.APIConnectionError as error:
                if error.connected or self._answered:
                    raise
                if delays is None:
                    delays = iter(() if self._unreachable else _UNREACHABLE_RETRIES)
                delay = next(delays, None)
                if delay is None:
                    self._unreachable = True
                    raise self._nothing_listening(error, tries) from error
                await anyio.sleep(delay)
                continue
            except (exc.BadRequestError, exc.UnprocessableEntityError) as error:
                if not is_batch_failure(error) and self._cap.refused(field, error):
                    continue
                raise
            self._cap.observe(field, request.max_tokens, response.completion_tokens)
            return response

    def _nothing_listening(self, error: exc.APIConnectionError, tries: int) -> exc.ServerUnreachableError:
        parts = urlsplit(self.base_url)
        shown = self.base_url
        if "@" in parts.netloc:  # credentials in the URL are never shown
            shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
        waited = sum(_UNREACHABLE_RETRIES) if tries > 1 else 0.0
        return exc.ServerUnreachableError(
            f"nothing is listening at {shown}: check --base-url (or OPENAI_BASE_URL; base_url= in Python) and that "
            f"the server is running ({tries} connection(s) refused over {waited:g} s; {error})",
            base_url=shown,
        )

    def _body(self, request: ChatRequest, mode: StructuredMode, field: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "temperature": request.temperature,
            field: request.max_tokens,
        }
        if mode == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.json_schema, "strict": True},
            }
        else:
            body["messages"] = add_schema_to_system(request.messages, request.json_schema)
            if mode == "json_object":
                body["response_format"] = {"type": "json_object"}
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(self._extra_body)
        return body

    async def _complete(self, request: ChatRequest, mode: StructuredMode, field: str) -> ChatResponse:
        """One HTTP call, the completion cap in ``field`` (batch mode: one line of a batch)."""
        body = self._body(request, mode, field)
        started = time.perf_counter()
        if self._batcher is not None:
            line = await self._batcher.complete(custom_id(self.model, request, self._extra_body), body)
            said = {"x-request-id": line.request_id} if line.request_id else {}
            if line.status >= 400:
                raise self._status_error(line.status, line.body, said)
            if not (isinstance(line.body, dict) and isinstance(line.body.get("choices"), list)):
                came = f"a batch line that is not a chat completion: {line.body!r}"[:500]
                raise exc.MalformedResponseError(self._redact(came))
            return self._response(line.body, said, time.perf_counter() - started)
        if self._sdk is not None:
            status, headers, data = await self._send_sdk(body)
        else:
            payload = json.dumps(body, ensure_ascii=False).encode()
            client = self._lean_client()
            sent: bytes | ServerEvents
            if self.stream:
                status, headers, sent = await client.post_stream(self._url, self._headers, payload, self.timeout)
            else:
                status, headers, sent = await client.post(self._url, self._headers, payload, self.timeout)
            self._answered = True
            if isinstance(sent, ServerEvents):  # a 2xx text/event-stream, read to its end
                data = self._joined(sent, headers)
            else:
                content = sent
                data = _json(content)
                if status >= 400:
                    raise self._status_error(status, data if data is not None else content, headers)
                if not (isinstance(data, dict) and isinstance(data.get("choices"), list)):
                    raise exc.MalformedResponseError(self._redact(_what_came_back(status, headers, content, data)))
        return self._response(data, headers, time.perf_counter() - started)

    @staticmethod
    def _response(data: Any, headers: Mapping[str, str], latency: float) -> ChatResponse:
        """The :class:`ChatResponse` a ``chat.completion`` object stands for (``latency`` in seconds).

        Raises:
            MalformedResponseError: it is not one.
        """
        try:
            choice = data["choices"][0]
            message = choice["message"]
            usage = data.get("usage") or {}
            details = usage.get("prompt_tokens_details")  # optional, and absent from many servers' answers
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            return ChatResponse(
                content=message.get("content"),
                finish_reason=choice.get("finish_reason"),
                refusal=message.get("refusal"),
                prompt_tokens=usage.get("prompt_tokens") or 0,
                completion_tokens=usage.get("completion_tokens") or 0,
                cached_tokens=cached if isinstance(cached, int) else 0,
                rate_limits=parse_rate_limit_headers(headers),
                latency=latency,
                request_id=headers.get("x-request-id") or (str(data["id"]) if data.get("id") else None),
            )
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
            raise exc.MalformedResponseError(f"not a chat completion: {type(error).__name__}: {error}"[:500]) from None

    def _lean_client(self) -> HTTPClient:
        """The lean client for this call: with ``http`` unset, httpx2 under trio (aiohttp is asyncio-only)."""
        assert self._lean is not None
        if self.http is None and async_library() == "trio":
            if self._lean_trio is None:
                self._lean_trio = Httpx2Client(max_connections=self._max_connections)
            return self._lean_trio
        return self._lean

    async def _send_sdk(self, body: dict[str, Any]) -> tuple[int, Mapping[str, str], Any]:
        assert self._sdk is not None
        if self._sdk.is_closed() or self._transport.loop_changed:  # closed, or made in an ended event loop:
            self._sdk = self._new_sdk()  # made anew, as the other clients are
        else:
            self._transport.reopen()  # notes the event loop it is used in
        named = ("model", "messages", "temperature", "response_format", "stream", "stream_options")
        fields = {k: v for k, v in body.items() if k in named}
        extra = {k: v for k, v in body.items() if k not in fields}
        with translate_transport_errors(self.timeout, redact=self._redact):
            try:
                if fields.get("stream") is True:
                    return await self._stream_sdk(fields, extra)
                raw = await self._sdk.chat.completions.with_raw_response.create(**fields, extra_body=extra)
                self._answered = True
                content = raw.http_response.content
                data = _json(content)
                if not (isinstance(data, dict) and isinstance(data.get("choices"), list)):  # HTML, [], "x", null
                    came = _what_came_back(raw.http_response.status_code, raw.headers, content, data)
                    raise exc.MalformedResponseError(self._redact(came))
                parsed = raw.parse()
                return raw.http_response.status_code, raw.headers, parsed.model_dump()
            except openai.APIStatusError as error:
                self._answered = True
                raise self._status_error(error.status_code, error.body, error.response.headers) from None
            except (openai.APIResponseValidationError, ValueError) as error:
                raise exc.MalformedResponseError(self._redact(f"invalid response body: {error}"[:500])) from None

    async def _stream_sdk(self, fields: dict[str, Any], extra: dict[str, Any]) -> tuple[int, Mapping[str, str], Any]:
        """The SDK's own streaming (``create(..., stream=True)``): its chunks joined; inside ``_send_sdk``'s
        translation of transport and status errors."""
        assert self._sdk is not None
        stream = await self._sdk.chat.completions.create(**fields, extra_body=extra)
        self._answered = True
        response = stream.response
        status, headers = response.status_code, response.headers
        try:
            if not is_event_stream(status, headers):  # a server that ignores "stream": one JSON completion
                content = await response.aread()
                data = _json(content)
                if not (isinstance(data, dict) and isinstance(data.get("choices"), list)):
                    raise exc.MalformedResponseError(self._redact(_what_came_back(status, headers, content, data)))
                return status, headers, data
            joined = StreamedCompletion()
            try:
                async for chunk in stream:
                    joined.add(chunk.model_dump())
            except openai.APIConnectionError:
                raise  # translated by translate_transport_errors
            except openai.APIError as error:  # an {"error": …} chunk
                raise self._stream_error(error.body, error.message, headers) from None
            except ValueError as error:  # a chunk that is not JSON: the SDK stops at it
                raise self._cut_off(joined, f"a chunk that is not JSON ({error})") from None
            if not joined.finished:  # the SDK ends quietly on a body that ends without [DONE]
                raise self._cut_off(joined, "the stream ended before any finish_reason")
            return status, headers, joined.completion()
        finally:
            await stream.close()

    def _joined(self, events: ServerEvents, headers: Mapping[str, str]) -> dict[str, Any]:
        """The ``chat.completion`` a stream's chunks stand for (lean path).

        Raises:
            APIConnectionError: the stream was cut off: it ended before ``[DONE]`` and before any ``finish_reason``,
                or its last chunk is not whole JSON.
            MalformedResponseError: a chunk before the last is not JSON, a chunk is not a chunk, or no chunk came.
            APIStatusError: an ``{"error": …}`` chunk (see :meth:`_stream_error`).
        """
        joined = StreamedCompletion()
        last = len(events.data) - 1
        for i, text in enumerate(events.data):
            try:
                chunk = json.loads(text)
            except ValueError:
                if i == last and not events.done:
                    raise self._cut_off(joined, f"its last chunk is not whole JSON: {text[:80]!r}") from None
                raise exc.MalformedResponseError(
                    self._redact(f"a streamed chunk that is not JSON: {text[:200]!r}")
                ) from None
            if isinstance(chunk, dict) and chunk.get("error"):
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else None
                raise self._stream_error(error, str(message or error), headers)
            joined.add(chunk)
        if not events.done and (events.broken or not joined.finished):
            why = "the connection closed mid-chunk" if events.broken else "it ended before [DONE] or a finish_reason"
            raise self._cut_off(joined, why)
        if joined.chunks == 0:
            raise exc.MalformedResponseError("a stream with no chunk before [DONE]")
        return joined.completion()

    @staticmethod
    def _cut_off(joined: StreamedCompletion, why: str) -> exc.APIConnectionError:
        return exc.APIConnectionError(f"stream cut off after {joined.chunks} chunk(s): {why}"[:500], connected=True)

    def _stream_error(self, error: Any, message: str, headers: Mapping[str, str]) -> exc.APIStatusError:
        """The error an ``{"error": …}`` chunk stands for: that of its ``code`` when it is an HTTP status (vLLM's),
        else a server error (500)."""
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599 else 500
        body = {"error": {**(error if isinstance(error, dict) else {}), "message": f"error in the stream: {message}"}}
        return self._status_error(status, body, headers)

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if len(self._secret) >= 8 else text

    def _status_error(self, status: int, body: Any, headers: Mapping[str, str]) -> exc.APIStatusError:
        """The polytask error for an HTTP error status; ``body`` is the decoded JSON (or the raw bytes)."""
        if isinstance(body, list) and body and isinstance(body[0], dict):
            body = body[0]  # Gemini's OpenAI-compatible endpoint wraps its error object in an array
        error = body.get("error", body) if isinstance(body, dict) else {}
        if not isinstance(error, dict):
            error = {"message": str(error)}
        if isinstance(body, bytes | str):
            text = body.decode(errors="replace") if isinstance(body, bytes) else body
            message = " ".join(text.split())[:300] or f"HTTP {status}"
        else:
            message = str(error.get("message") or f"HTTP {status}")
        code = error.get("code")
        kwargs: dict[str, Any] = {
            "status_code": status,
            "code": str(code) if code is not None else None,
            "request_id": headers.get("x-request-id"),
            "retry_after": parse_retry_after(headers),
        }
        message = self._redact(message)[:1000]
        if kwargs["retry_after"] is None:  # Google's RetryInfo detail: {"retryDelay": "37s"}
            kwargs["retry_after"] = _retry_delay(error.get("details"))
        if status == 429:
            if kwargs["code"] == "insufficient_quota":
                return exc.QuotaExceededError(message, **kwargs)
            limits = _what_429_says(message, headers, kwargs)  # may set kwargs["retry_after"] from the message
            return exc.RateLimitError(message, **kwargs, rate_limits=limits)
        if status in (408, 409) or status >= 500:
            return exc.ServerError(message, **kwargs)
        return _BY_STATUS.get(status, exc.APIStatusError)(message, **kwargs)


_MOST_IN_FLIGHT = 10_000
"""Calls in flight a backend in batch mode declares: the orchestrator's most (``MAX_CONCURRENCY``), so a batch holds
up to 10,000 of a run's calls (fewer with a smaller ``BatchOptions.max_requests``)."""


def _batch_options(
    batch: bool | BatchOptions,
    state: str | os.PathLike[str] | None,
    *,
    stream: bool,
    rpm: float | None,
    tpm: float | None,
) -> BatchOptions | None:
    """The batch mode's options (None: off), after checking what goes with it.

    Raises:
        ConfigurationError: ``batch`` is neither a bool nor a :class:`BatchOptions`; ``batch_state`` without
            ``batch``; ``batch`` with ``stream``, ``rpm`` or ``tpm``.
    """
    if not isinstance(batch, bool | BatchOptions):
        raise ConfigurationError(f"batch must be True, False or a polytask.BatchOptions, got {batch!r}")
    if batch is False:
        if state is not None:
            raise ConfigurationError(f"batch_state={str(state)!r} needs batch=True (the Batch API mode)")
        return None
    if stream:
        raise ConfigurationError("batch and stream cannot go together: a Batch API answer is never streamed")
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None:
            raise ConfigurationError(
                f"{name} does not apply with batch=True: the Batch API is not limited per minute (it has its own "
                "queue limits, waited out by resubmitting)"
            )
    return batch if isinstance(batch, BatchOptions) else BatchOptions()


def _retry_delay(details: Any) -> float | None:
    """Seconds of a ``google.rpc.RetryInfo`` detail's ``retryDelay`` (``"37s"``) in an error's ``details``, or None."""
    if not isinstance(details, list):
        return None
    for detail in details:
        if isinstance(detail, dict) and isinstance(delay := detail.get("retryDelay"), str):
            return parse_duration(delay)
    return None


def _what_429_says(message: str, headers: Mapping[str, str], kwargs: dict[str, Any]) -> RateLimitHeaders | None:
    """The limits a 429 states, from its ``x-ratelimit-*`` headers and, where they are silent, its message; sets
    ``kwargs["retry_after"]`` from the message ("Please try again in 2.7s") when no header gave one."""
    limits = parse_rate_limit_headers(headers)
    wait, said = parse_rate_limit_message(message)
    if kwargs["retry_after"] is None:
        kwargs["retry_after"] = wait
    merged = {
        field.name: getattr(limits, field.name)
        if getattr(limits, field.name) is not None
        else getattr(said, field.name)
        for field in dataclasses.fields(RateLimitHeaders)
    }
    for name in ("remaining_requests", "remaining_tokens"):  # the message names the limit that ran out for this call
        if getattr(said, name) == 0:
            merged[name] = 0
    return RateLimitHeaders(**merged) if any(v is not None for v in merged.values()) else None


def _what_came_back(status: int, headers: Mapping[str, str], content: bytes, data: Any) -> str:
    """Why a 2xx body is not a chat completion, naming what it is: its content type and first bytes (an HTML login
    page of a proxy, a gateway's plain-text error, a JSON object of another API)."""
    kind = headers.get("content-type") or headers.get("Content-Type") or "no content type"
    start = " ".join(content[:200].decode("utf-8", "replace").split())
    if data is None:
        what = "an empty body" if not content.strip() else "a body that is not JSON"
    elif isinstance(data, dict):
        what = f"a JSON object without 'choices' (keys: {', '.join(sorted(map(str, data))[:8]) or 'none'})"
    else:
        what = f"a JSON {type(data).__name__}, not an object"
    return (
        f"HTTP {status} answered with {what} ({kind}), not a chat completion: {start!r}"
        "; is --base-url the server's OpenAI-compatible API root (usually ending in /v1)?"
    )[:600]


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None
