"""Backends: the seam (:class:`Backend`) and its implementations. The transformers backend is imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._batch import BatchOptions
from .base import Backend, BackendSettings, ChatRequest, ChatResponse, RateLimitHeaders
from .function import FunctionBackend
from .openai import OpenAIBackend

if TYPE_CHECKING:
    from .transformers import TransformersBackend

__all__ = [
    "Backend",
    "BackendSettings",
    "BatchOptions",
    "ChatRequest",
    "ChatResponse",
    "FunctionBackend",
    "OpenAIBackend",
    "RateLimitHeaders",
    "TransformersBackend",
]


def __getattr__(name: str) -> Any:
    if name == "TransformersBackend":
        from .transformers import TransformersBackend

        return TransformersBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
