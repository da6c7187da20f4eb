"""The chat vocabulary every layer speaks: a :class:`ChatRequest` goes out, a :class:`ChatResponse` comes back, with
the server's :class:`RateLimitHeaders`. Plain dataclasses with no behaviour beyond a derived figure, imported by the
prompts, the rate limiter, the estimates and every backend; this module imports nothing of polytask's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChatRequest", "ChatResponse", "Message", "RateLimitHeaders"]

Message = dict[str, str]
"""A chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One structured-output chat call (a plain dataclass: built once per call on the hot path).

    Attributes:
        messages: the chat messages.
        schema_name: a name for the answer schema (``[a-zA-Z0-9_-]``, as OpenAI requires).
        json_schema: the JSON schema the answer must match (strict-compatible).
        max_tokens: the most completion tokens to generate.
        temperature: sampling temperature.
        prompt_tokens_estimate: polytask's estimate of the prompt tokens, used for TPM reservation.
    """

    messages: list[Message]
    schema_name: str
    json_schema: dict[str, Any]
    max_tokens: int
    temperature: float = 0.0
    prompt_tokens_estimate: int = 0

    @property
    def reserved_tokens(self) -> int:
        """Tokens a TPM limiter reserves for this call: prompt estimate + max completion tokens (OpenAI's formula)."""
        return self.prompt_tokens_estimate + self.max_tokens


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """The ``x-ratelimit-*`` headers of one response, parsed (None where absent).

    Attributes:
        limit_requests, limit_tokens: the RPM / TPM limits the server applies.
        remaining_requests, remaining_tokens: what is left in the current window.
        reset_requests, reset_tokens: seconds until the bucket is full again.
        window: the span, in seconds, over which the server enforces its per-minute limits when it says so
            (``RateLimit-Policy: 100;w=10``: at most ``limit × window / 60`` at once), else None.
    """

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None
    window: float | None = None


@dataclass(slots=True)
class ChatResponse:
    """The answer to one :class:`ChatRequest`.

    Attributes:
        content: the answer text (JSON for structured outputs); None when the model refused.
        finish_reason: ``"stop"``, ``"length"``, ``"content_filter"``, ``"tool_calls"``, …
        refusal: the refusal text, when the model refused.
        prompt_tokens, completion_tokens: usage as reported by the server (0 when it reported none).
        rate_limits: the parsed ``x-ratelimit-*`` headers.
        latency: seconds from sending the request to the full response.
        cached_tokens: the part of ``prompt_tokens`` the server served from its prompt cache
            (``usage.prompt_tokens_details.cached_tokens``; 0 when it reported none), priced lower.
        request_id: the server's id of the request (``x-request-id``, else the completion's ``id``), what a
            provider's support asks for; None when there is none.
    """

    content: str | None
    finish_reason: str | None = "stop"
    refusal: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limits: RateLimitHeaders = field(default_factory=RateLimitHeaders)
    latency: float = 0.0
    cached_tokens: int = 0
    request_id: str | None = None
