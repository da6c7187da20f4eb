"""The HTTP clients the OpenAI backend posts through, and the one place transport errors become polytask's.

Two lean clients do one thing, POST a JSON body and hand back ``(status, headers, body bytes)`` (``post``), or, for a
streamed answer (``post_stream``), a 2xx ``text/event-stream`` read to its ``data: [DONE]`` as :class:`ServerEvents`
(``send``: any other request, the Batch API's uploads, polls and downloads);
``timeout`` is per request, in seconds, enforced by the library:

- :class:`AiohttpClient` (the default under asyncio): measured ≈ 2,000 requests/s per core here, against ≈ 300–500
  for httpx2 and ≈ 150–220 for the openai SDK's own request path (BENCHMARKS.md); aiohttp runs on asyncio only;
- :class:`Httpx2Client`: wraps an ``httpx2.AsyncClient`` (anyio-based, so it runs on asyncio and on trio, and the
  default under trio), so tests and users can inject a transport (``httpx2.MockTransport``) or their own proxies and
  certificates.

:func:`translate_transport_errors` is the seam, as httpx has one at its transport: both clients and the backend's
openai-SDK path send inside it, and it turns the transport failures of aiohttp, httpx2 and the openai SDK into
:class:`~polytask.exceptions.APITimeoutError` and :class:`~polytask.exceptions.APIConnectionError`, with one wording.
A connection that was never made (refused, a host name that does not resolve) is told apart from one that failed
later (reset, closed): ``APIConnectionError.connected`` is False for it, so the backend can tell a wrong base URL
from a server that went away.
This is the only module that imports aiohttp or makes an httpx2 client (the backend names ``httpx2.AsyncClient``
only as the type of the ``http_client`` it is given, and hands the SDK a client made here).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import anyio
import httpx2
import openai

from .exceptions import APIConnectionError, APITimeoutError, BackendClosedError, ConfigurationError

__all__ = [
    "AiohttpClient",
    "HTTPClient",
    "Httpx2Client",
    "ServerEvents",
    "async_library",
    "is_event_stream",
    "translate_transport_errors",
]

# aiohttp raises asyncio's TimeoutError, which is the builtin one on 3.11+; the openai SDK wraps httpx2's errors in
# its own (the original is the ``__cause__``), and its APITimeoutError is an APIConnectionError
_TIMEOUTS = (TimeoutError, httpx2.TimeoutException, openai.APITimeoutError)
_CONNECTION_FAILURES = (
    aiohttp.ClientError,
    OSError,
    asyncio.IncompleteReadError,
    httpx2.TransportError,
    openai.APIConnectionError,
)
# no connection was made: refused, or the host name did not resolve (a TLS failure means something answered)
_NOT_CONNECTED = (aiohttp.ClientConnectorError, httpx2.ConnectError, ConnectionRefusedError, socket.gaierror)
_TLS = (ssl.SSLError, aiohttp.ClientSSLError)


def _unchanged(text: str) -> str:
    return text


@contextlib.contextmanager
def translate_transport_errors(timeout: float, redact: Callable[[str], str] = _unchanged) -> Iterator[None]:
    """Turn a transport failure raised inside into polytask's; anything else passes through untouched.

    Args:
        timeout: the request's timeout in seconds, named in the timeout's message.
        redact: applied to the connection error's message (the backend removes its API key with it).

    Raises:
        APITimeoutError: ``no response within {timeout} s``.
        APIConnectionError: ``connection failed: {the error's type}: {the error}`` (at most 500 characters); for
            the openai SDK's wrapper, the error it wraps. ``connected`` is False when no connection was made at all
            (refused, no such host).
    """
    try:
        yield
    except _TIMEOUTS:
        raise APITimeoutError(f"no response within {timeout:g} s") from None
    except _CONNECTION_FAILURES as error:
        cause = error.__cause__ if isinstance(error, openai.APIConnectionError) and error.__cause__ else error
        message = redact(f"connection failed: {type(cause).__name__}: {cause}"[:500])
        raise APIConnectionError(message, connected=not _never_connected(cause)) from None


def _never_connected(error: BaseException) -> bool:
    """Whether ``error`` says no connection was made (refused, no such host); a TLS failure anywhere in its chain
    says something answered."""
    seen: BaseException | None = error
    for _ in range(8):  # the chain of causes, which a library may make long (never a cycle followed forever)
        if seen is None:
            break
        if isinstance(seen, _TLS):
            return False
        seen = seen.__cause__ or seen.__context__
    return isinstance(error, _NOT_CONNECTED)


def async_library() -> str | None:
    """``"asyncio"`` or ``"trio"``: the async library running this task; None outside one."""
    loop = _running_loop()
    return None if loop is None else "asyncio" if isinstance(loop, asyncio.AbstractEventLoop) else "trio"


_DRAIN_AFTER_DONE = 1.0
"""Seconds the rest of a stream's body (its end, right after ``data: [DONE]``) is read for before the connection is
let go instead of kept for the next call (a server that holds the stream open after it)."""


@dataclass(slots=True)
class ServerEvents:
    """A ``text/event-stream`` body, read until ``data: [DONE]`` or until it ended.

    Attributes:
        data: each event's ``data`` (its ``data:`` lines joined by newlines), in order, ``[DONE]`` left out.
        done: ``data: [DONE]`` arrived (nothing after it is read).
        broken: the body ended inside a line (the connection closed mid-event); that part line is left out.
    """

    data: list[str] = field(default_factory=list)
    done: bool = False
    broken: bool = False
    _pending: list[str] = field(default_factory=list, repr=False)
    _rest: bytes = field(default=b"", repr=False)

    def feed(self, piece: bytes) -> bool:
        """Take the next bytes of the body; True once ``data: [DONE]`` has arrived (read no further)."""
        buffer = self._rest + piece if self._rest else piece
        start = 0
        while not self.done:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            self._line(buffer[start:end].rstrip(b"\r").decode("utf-8", "replace"))
            start = end + 1
        self._rest = b"" if self.done else buffer[start:]
        return self.done

    def end(self) -> ServerEvents:
        """The body has ended: an event whose lines all arrived counts (no blank line after it is needed), a line
        cut off sets ``broken``."""
        if not self.done:
            self.broken = bool(self._rest.strip())
            self._line("")
        self._rest = b""
        return self

    def _line(self, line: str) -> None:
        if not line:  # the blank line that ends an event
            if self._pending:
                self.data.append("\n".join(self._pending))
                self._pending = []
            return
        name, _, value = line.partition(":")
        if name != "data":  # a comment (": keep-alive"), event:, id:, retry:
            return
        value = value[1:] if value.startswith(" ") else value
        if value.strip() == "[DONE]":  # ends the stream, with or without the blank line before it
            self._line("")
            self.done = True
        else:
            self._pending.append(value)


def is_event_stream(status: int, headers: Mapping[str, str]) -> bool:
    """Whether a response is a stream of server-sent events: a 2xx with ``Content-Type: text/event-stream``."""
    kind = headers.get("content-type") or headers.get("Content-Type") or ""
    return 200 <= status < 300 and kind.split(";")[0].strip().lower() == "text/event-stream"


class HTTPClient(Protocol):
    async def post(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Mapping[str, str], bytes]:
        """POST ``body``; return the status, headers (case-insensitive) and body. ``timeout`` in seconds."""
        ...

    async def post_stream(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Mapping[str, str], bytes | ServerEvents]:
        """POST ``body`` asking for a stream; return the status, headers and, for a 2xx ``text/event-stream``, its
        :class:`ServerEvents` read to ``[DONE]`` (or to its end), else the body as ``post`` does (an error status,
        or a server that answered in one piece). ``timeout`` in seconds."""
        ...

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Any request (``GET``, a multipart ``POST``: the batch API's files and batches); ``body`` None for none;
        return the status, headers and body. ``timeout`` in seconds."""
        ...

    async def aclose(self) -> None: ...


class AiohttpClient:
    """A pooled aiohttp session, created on first use inside the running event loop (asyncio only).

    Args:
        max_connections: the connection pool size.

    Its ``post`` raises :class:`~polytask.exceptions.ConfigurationError` when no asyncio loop runs it (under trio).
    """

    def __init__(self, max_connections: int = 512) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._loop: object | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        """The ``ClientTimeout`` of ``seconds`` in all (made once per value)."""
        limit = self._timeouts.get(seconds)
        if limit is None:
            limit = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return limit

    def _open(self) -> aiohttp.ClientSession:
        loop = _running_loop()
        if not isinstance(loop, asyncio.AbstractEventLoop):  # the backend chooses httpx2 under trio; yours not
            raise ConfigurationError(
                "http='aiohttp' runs on asyncio only, and this is not asyncio (trio?): pass http='httpx2' or 'sdk' "
                "to OpenAIBackend, or leave http unset to have the transport chosen per async library"
            )
        if self._session is None or self._session.closed or self._loop is not loop:
            self._abandon()
            connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",))
            self._loop = loop
        return self._session

    async def post(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Mapping[str, str], bytes]:
        session, limit = self._open(), self._timeout(timeout)
        with translate_transport_errors(timeout):
            async with session.post(url, data=body, headers=headers, timeout=limit) as response:
                return response.status, response.headers, await response.read()

    async def post_stream(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Mapping[str, str], bytes | ServerEvents]:
        session, limit = self._open(), self._timeout(timeout)
        with translate_transport_errors(timeout):
            async with session.post(url, data=body, headers=headers, timeout=limit) as response:
                if not is_event_stream(response.status, response.headers):
                    return response.status, response.headers, await response.read()
                events = ServerEvents()
                async for piece in response.content.iter_any():
                    if events.feed(piece):
                        with anyio.move_on_after(_DRAIN_AFTER_DONE):  # the body's end: the connection is kept
                            await response.read()
                        break
                return response.status, response.headers, events.end()

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Mapping[str, str], bytes]:
        session, limit = self._open(), self._timeout(timeout)
        with translate_transport_errors(timeout):
            async with session.request(method, url, data=body, headers=headers, timeout=limit) as response:
                return response.status, response.headers, await response.read()

    async def aclose(self) -> None:
        if self._session is not None:
            if self._loop is _running_loop():
                await self._session.close()
            else:
                self._abandon()
            self._session = None

    def _abandon(self) -> None:
        """Let go of a session made in an event loop that has ended (``asyncio.run`` per call): nothing of it can
        be awaited in this loop; its connector is marked closed so it does not report itself unclosed."""
        session = self._session
        if session is None or session.closed:
            return
        connector = session.connector
        session.detach()
        if connector is not None:
            with contextlib.suppress(Exception):
                connector._close()  # aiohttp's synchronous close; with the loop gone it only marks it closed


class Httpx2Client:
    """Posts through an ``httpx2.AsyncClient`` (yours, or a new pooled one)."""

    def __init__(self, client: httpx2.AsyncClient | None = None, max_connections: int = 512) -> None:
        self.max_connections = max_connections
        self.owned = client is None  # a client of its own is made anew after aclose() or in a new loop; yours not
        self.client = client or self._new()
        self._loop: object | None = None

    def _new(self) -> httpx2.AsyncClient:
        n = self.max_connections
        return httpx2.AsyncClient(limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n))

    def reopen(self) -> httpx2.AsyncClient:
        """The client, made anew if it was its own and closed, or made in an event loop that has ended.

        Raises:
            BackendClosedError: the client passed in was closed.
        """
        loop = _running_loop()
        if self.client.is_closed:
            if not self.owned:
                raise BackendClosedError("the http_client given to the backend is closed")
            self.client = self._new()
        elif self.owned and loop is not None and self._loop is not None and self._loop is not loop:
            self.client = self._new()  # its pooled connections belong to the old loop
        if loop is not None:
            self._loop = loop
        return self.client

    async def post(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Mapping[str, str], bytes]:
        client = self.reopen()
        with translate_transport_errors(timeout):
            response = await client.post(url, content=body, headers=dict(headers), timeout=timeout)
        return response.status_code, response.headers, response.content

    async def post_stream(
        self,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Mapping[str, str], bytes | ServerEvents]:
        client = self.reopen()
        with translate_transport_errors(timeout):
            async with client.stream("POST", url, content=body, headers=dict(headers), timeout=timeout) as response:
                if not is_event_stream(response.status_code, response.headers):
                    return response.status_code, response.headers, await response.aread()
                events = ServerEvents()
                async with contextlib.aclosing(response.aiter_bytes()) as pieces:
                    async for piece in pieces:
                        if events.feed(piece):
                            with anyio.move_on_after(_DRAIN_AFTER_DONE):  # the body's end: the connection is kept
                                async for _ in pieces:
                                    pass
                            break
                return response.status_code, response.headers, events.end()

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[int, Mapping[str, str], bytes]:
        client = self.reopen()
        with translate_transport_errors(timeout):
            response = await client.request(method, url, content=body, headers=dict(headers), timeout=timeout)
        return response.status_code, response.headers, response.content

    @property
    def loop_changed(self) -> bool:
        """Whether the client was made in another event loop than the running one."""
        loop = _running_loop()
        return self._loop is not None and loop is not None and self._loop is not loop

    async def aclose(self) -> None:
        """Close the client if it is its own (yours stays open: you close it) and of the running event loop."""
        if self.owned and not self.loop_changed:  # a client of an ended loop cannot be closed from another
            await self.client.aclose()


def _running_loop() -> object | None:
    """The running event loop: asyncio's loop, or trio's run (its token); None outside one.

    Connections pooled in one loop cannot be used from another, so the clients note the loop they were made in.
    """
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")  # imported by whoever runs trio; polytask does not depend on it
    if trio is not None:
        with contextlib.suppress(RuntimeError):
            return trio.lowlevel.current_trio_token()  # type: ignore[no-any-return]
    return None
