"""The backend seam: one chat call in, one chat answer out.

A backend turns a :class:`ChatRequest` into a :class:`ChatResponse` or raises an error from
:mod:`polytask.exceptions`. It does not retry, rate-limit or validate: the orchestrator does that, the same for
every backend. Implementations: :class:`~polytask.backends.openai.OpenAIBackend` (any OpenAI-compatible server),
:class:`~polytask.backends.function.FunctionBackend` (a Python function; a test double), and the local
transformers backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..chat import ChatRequest, ChatResponse, Message, RateLimitHeaders
from ..costs import Prices

__all__ = [
    "Backend",
    "BackendSettings",
    "ChatRequest",
    "ChatResponse",
    "Message",
    "RateLimitHeaders",
    "SettingsAttributes",
    "settings_of",
]


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """What a backend declares about itself, for the orchestrator's defaults (each used only where the orchestrator's
    own argument is left unset).

    Attributes:
        rpm: the requests-per-minute limit to keep under, or None for none.
        tpm: the tokens-per-minute limit (prompt + completion tokens) to keep under, or None for none.
        concurrency: calls in flight that keep the backend busy, or None for the orchestrator's default (64); the
            local backend: 2 × its batch size, so a row whose answer is done always finds a waiting call.
        adaptive_concurrency: whether latency and overload signals should lower the calls in flight (AIMD); False
            where there is no server to overload (a local model's latency grows with its batch, not with load).
        token_model: a model name tiktoken knows, for counting prompt tokens before sending (None: estimate
            from characters, calibrated on the server's counts).
        identity: what tells this backend's answers apart from another's for the same request, for the request
            cache (:mod:`polytask.cache`): the server's base URL and model, or the local model and its decoding
            settings. Never a secret. None: the backend's ``name``.
        prices: what its tokens cost (:class:`~polytask.costs.Prices`, USD per million tokens), for the run's
            dollar cost and budget; None when unknown (a model genai-prices does not list, a server it does not
            know). The local backend: ``Prices(input=0, output=0)``, known to cost nothing.
        learn_limits: whether the orchestrator's rate limiter should learn RPM / TPM limits from the answers'
            ``x-ratelimit-*`` headers (letting one call go first to hear them); False where answers carry none
            and the first may take hours (the Batch API: every call goes at once).
    """

    rpm: float | None = None
    tpm: float | None = None
    concurrency: int | None = None
    adaptive_concurrency: bool = True
    token_model: str | None = None
    identity: str | None = None
    prices: Prices | None = None
    learn_limits: bool = True


@runtime_checkable
class Backend(Protocol):
    """What the orchestrator needs from a backend: a ``name``, its :class:`BackendSettings`, one call, and a close.

    Attributes:
        name: a short description for logs and progress (``"openai:gpt-4o-mini"``).
        settings: what the backend declares about its limits and concurrency (:class:`BackendSettings`).
    """

    name: str
    settings: BackendSettings

    async def complete(self, request: ChatRequest, /) -> ChatResponse:
        """Send one call. Raises a :mod:`polytask.exceptions` error on failure; never retries."""
        ...

    async def aclose(self) -> None:
        """Release connections / models."""
        ...


class SettingsAttributes:
    """``rpm`` and ``tpm`` as read-only attributes over ``settings``: polytask 0.1's backends had them."""

    settings: BackendSettings

    @property
    def rpm(self) -> float | None:
        """``settings.rpm``: requests per minute, or None."""
        return self.settings.rpm

    @property
    def tpm(self) -> float | None:
        """``settings.tpm``: tokens per minute, or None."""
        return self.settings.tpm


@runtime_checkable
class _HasRpm(Protocol):
    rpm: float | None


@runtime_checkable
class _HasTpm(Protocol):
    tpm: float | None


@runtime_checkable
class _HasConcurrency(Protocol):
    preferred_concurrency: int | None


@runtime_checkable
class _HasAdaptive(Protocol):
    adaptive_concurrency: bool


@runtime_checkable
class _DeclaresSettings(Protocol):
    settings: BackendSettings


def settings_of(backend: object) -> BackendSettings:
    """``backend.settings``; for a backend that predates :class:`BackendSettings` (``rpm`` / ``tpm`` attributes only)
    settings built from those, so its rate limits still hold; :class:`BackendSettings()` for one with neither.

    Raises:
        ConfigurationError: ``settings`` is not a :class:`BackendSettings`.
    """
    if isinstance(backend, _DeclaresSettings):
        settings = backend.settings
        if not isinstance(settings, BackendSettings):
            from ..exceptions import ConfigurationError

            raise ConfigurationError(
                f"{type(backend).__name__}.settings must be a polytask.BackendSettings, got {type(settings).__name__}"
            )
        return settings
    return BackendSettings(  # each 0.1 attribute on its own: a backend that declared only ``rpm`` keeps it
        rpm=backend.rpm if isinstance(backend, _HasRpm) else None,
        tpm=backend.tpm if isinstance(backend, _HasTpm) else None,
        concurrency=backend.preferred_concurrency if isinstance(backend, _HasConcurrency) else None,
        adaptive_concurrency=backend.adaptive_concurrency if isinstance(backend, _HasAdaptive) else True,
    )
