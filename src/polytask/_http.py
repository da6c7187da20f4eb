"""The HTTP clients the OpenAI backend posts through; the only module that imports aiohttp or httpx2.

Two lean clients do one thing, POST a JSON body and hand back ``(status, headers, body bytes)``, and translate
transport failures into :class:`~polytask.exceptions.APIConnectionError` and
:class:`~polytask.exceptions.APITimeoutError`. ``timeout`` is per request, in seconds, enforced by the library:

- :class:`AiohttpClient` (the default): measured ≈ 2,000 requests/s per core here, against ≈ 300–500 for httpx2 and
  ≈ 150–220 for the openai SDK's own request path (BENCHMARKS.md);
- :class:`Httpx2Client`: wraps an ``httpx2.AsyncClient``, so tests and users can inject a transport
  (``httpx2.MockTransport``) or their own proxies and certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Protocol

import aiohttp
import httpx2

from .exceptions import APIConnectionError, APITimeoutError, BackendClosedError

__all__ = ["AiohttpClient", "HTTPClient", "Httpx2Client"]


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

    async def aclose(self) -> None: ...


class AiohttpClient:
    """A pooled aiohttp session, created on first use inside the running event loop (asyncio only).

    Args:
        max_connections: the connection pool size.
    """

    def __init__(self, max_connections: int = 512) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
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
        session = self._open()
        limit = self._timeouts.get(timeout)
        if limit is None:
            limit = self._timeouts[timeout] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with session.post(url, data=body, headers=headers, timeout=limit) as response:
                return response.status, response.headers, await response.read()
        except TimeoutError:  # aiohttp raises asyncio's, which is the builtin TimeoutError on 3.11+
            raise APITimeoutError(f"no response within {timeout:g} s") from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as error:
            raise APIConnectionError(f"connection failed: {type(error).__name__}: {error}"[:500]) from None

    async def aclose(self) -> None:
        if self._session is not None:
            if self._loop is asyncio.get_running_loop():
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
        self._loop: asyncio.AbstractEventLoop | None = None

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
        try:
            response = await client.post(url, content=body, headers=dict(headers), timeout=timeout)
        except httpx2.TimeoutException:
            raise APITimeoutError(f"no response within {timeout:g} s") from None
        except (httpx2.TransportError, OSError) as error:
            raise APIConnectionError(f"connection failed: {type(error).__name__}: {error}"[:500]) from None
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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
