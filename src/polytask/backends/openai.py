"""The OpenAI-compatible chat-completions backend (OpenAI, Azure-compatible gateways, vLLM, llama.cpp, …).

Uses ``openai.AsyncOpenAI`` with ``max_retries=0``: polytask owns retries and rate limits. openai's exceptions are
translated here into :mod:`polytask.exceptions`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import httpx2
import openai

from .. import exceptions as exc
from ..exceptions import ConfigurationError
from ..headers import parse_rate_limit_headers, parse_retry_after
from ..prompts import add_schema_to_system
from .base import ChatRequest, ChatResponse

__all__ = ["OpenAIBackend"]

StructuredMode = Literal["json_schema", "json_object", "none"]
_FALLBACK: dict[StructuredMode, StructuredMode] = {"json_schema": "json_object", "json_object": "none"}


class OpenAIBackend:
    """Chat completions over any OpenAI-compatible HTTP API.

    Args:
        model: the model name (``"gpt-4o-mini"``).
        base_url: the API's base URL (``http://127.0.0.1:8000/v1``); default ``$OPENAI_BASE_URL`` or OpenAI's.
        api_key: default ``$OPENAI_API_KEY``; servers given by ``base_url`` may need none.
        rpm: requests-per-minute limit to keep under, or None.
        tpm: tokens-per-minute limit to keep under, or None.
        timeout: seconds allowed for one HTTP call before it counts as a timeout (default 60).
        structured_outputs: ``"json_schema"`` (strict structured outputs; default), ``"json_object"`` (JSON mode,
            schema in the prompt) or ``"none"`` (schema in the prompt). When the server rejects the mode with a
            400 that names ``response_format``, the backend falls back to the next mode for the rest of the run.
        max_tokens_param: the request field for the completion cap: ``"max_completion_tokens"`` (OpenAI's current
            name) or ``"max_tokens"`` (older servers).
        max_connections: HTTP connection pool size (default 512).
        http_client: an ``httpx2.AsyncClient`` to use instead (tests inject one with a mock transport).
        extra_body: extra JSON fields sent with every request.

    Raises:
        ConfigurationError: no API key for OpenAI's own endpoint.
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
        max_tokens_param: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens",
        max_connections: int = 512,
        http_client: httpx2.AsyncClient | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        if api_key is None:
            if base_url is None:
                raise ConfigurationError(
                    "no API key: set OPENAI_API_KEY (or pass api_key=), or point base_url at a server that needs none"
                )
            api_key = "not-needed"
        self.model = model
        self.rpm = rpm
        self.tpm = tpm
        self.name = f"openai:{model}"
        self.mode: StructuredMode = structured_outputs
        self.max_tokens_param = max_tokens_param
        self._secret = api_key
        self._extra_body = extra_body or {}
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout,
            http_client=http_client
            or openai.DefaultAsyncHttpxClient(
                limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            ),
        )

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={str(self._client.base_url)!r})"

    async def aclose(self) -> None:
        await self._client.close()

    async def complete(self, request: ChatRequest, /) -> ChatResponse:
        """One chat call. Raises a :mod:`polytask.exceptions` error (never an openai one); never retries."""
        while True:
            mode = self.mode
            try:
                return await self._complete(request, mode)
            except exc.BadRequestError as error:
                fallback = _FALLBACK.get(mode)
                if fallback is None or "response_format" not in str(error):
                    raise
                if self.mode == mode:  # another call may have fallen back already
                    self.mode = fallback

    async def _complete(self, request: ChatRequest, mode: StructuredMode) -> ChatResponse:
        messages: list[Any] = request.messages
        body: dict[str, Any] = {self.max_tokens_param: request.max_tokens, **self._extra_body}
        if mode == "json_schema":
            response_format: Any = {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.json_schema, "strict": True},
            }
        else:
            messages = add_schema_to_system(request.messages, request.json_schema)
            response_format = {"type": "json_object"} if mode == "json_object" else openai.omit
        started = time.perf_counter()
        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=messages,
                response_format=response_format,
                temperature=request.temperature,
                extra_body=body,
            )
            completion = raw.parse()
        except openai.APIStatusError as error:
            raise self._status_error(error) from None
        except openai.APITimeoutError:
            raise exc.APITimeoutError("no response within the timeout") from None
        except openai.APIConnectionError as error:
            raise exc.APIConnectionError(self._redact(f"connection failed: {error.__cause__ or error}")) from None
        except (openai.APIResponseValidationError, ValueError) as error:
            raise exc.MalformedResponseError(self._redact(f"invalid response body: {error}"[:500])) from None
        latency = time.perf_counter() - started
        if not completion.choices:
            raise exc.MalformedResponseError("the response has no choices")
        choice = completion.choices[0]
        usage = completion.usage
        return ChatResponse(
            content=choice.message.content,
            finish_reason=choice.finish_reason,
            refusal=getattr(choice.message, "refusal", None),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            rate_limits=parse_rate_limit_headers(raw.headers),
            latency=latency,
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if len(self._secret) >= 8 else text

    def _status_error(self, error: openai.APIStatusError) -> exc.APIStatusError:
        status = error.status_code
        body = error.body if isinstance(error.body, dict) else {}
        message = self._redact(str(body.get("message") or error.message))[:1000]
        code = error.code
        rid = error.request_id
        kwargs: dict[str, Any] = {
            "status_code": status,
            "code": code,
            "request_id": rid,
            "retry_after": parse_retry_after(error.response.headers),
        }
        if status == 429:
            if code == "insufficient_quota":
                return exc.QuotaExceededError(message, **kwargs)
            return exc.RateLimitError(message, **kwargs)
        if status in (408, 409) or status >= 500:
            return exc.ServerError(message, **kwargs)
        cls: type[exc.APIStatusError] = {
            400: exc.BadRequestError,
            401: exc.AuthenticationError,
            403: exc.PermissionDeniedError,
            404: exc.NotFoundError,
            422: exc.UnprocessableEntityError,
        }.get(status, exc.APIStatusError)
        return cls(message, **kwargs)
