"""A backend that calls a Python function: a test double, and a way to plug in any model by hand."""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from .._checks import check_positive
from ..chat import ChatRequest, ChatResponse
from ..costs import Prices
from .base import BackendSettings, SettingsAttributes

__all__ = ["FunctionBackend"]

Answer = ChatResponse | BaseModel | dict[str, Any] | str
"""What the function may return: a full :class:`ChatResponse`, or the answer as a pydantic model, a dict or JSON."""


class FunctionBackend(SettingsAttributes):
    """Answers each call with ``fn(request)``; ``fn`` may be sync or async, and may raise polytask errors.

    Args:
        fn: ``fn(request: ChatRequest) -> ChatResponse | BaseModel | dict | str`` (or an awaitable of one).
        name: shown in logs and progress.
        rpm, tpm: limits for the orchestrator's limiter to enforce (None for none).
        prices: what the tokens it reports cost, USD per million tokens (default None: unknown), for the run's
            dollar cost and budget.

    Raises:
        ConfigurationError: an ``rpm`` / ``tpm`` that is not a finite number > 0.

    Example::

        backend = pt.FunctionBackend(lambda request: {"label": "neutral", "score": 0.0})
    """

    def __init__(
        self,
        fn: Callable[[ChatRequest], Answer | Awaitable[Answer]],
        *,
        name: str = "function",
        rpm: float | None = None,
        tpm: float | None = None,
        prices: Prices | None = None,
    ) -> None:
        check_positive("rpm", rpm)
        check_positive("tpm", tpm)
        self.fn = fn
        self.name = name
        self.settings = BackendSettings(rpm=rpm, tpm=tpm, prices=prices)
        self.calls = 0

    async def complete(self, request: ChatRequest, /) -> ChatResponse:
        self.calls += 1
        result = self.fn(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, ChatResponse):
            return result
        if isinstance(result, BaseModel):
            content = result.model_dump_json(by_alias=True)
        elif isinstance(result, dict):
            content = json.dumps(result)
        else:
            content = str(result)
        return ChatResponse(
            content=content, prompt_tokens=request.prompt_tokens_estimate, completion_tokens=len(content) // 4
        )

    async def aclose(self) -> None:
        return None
