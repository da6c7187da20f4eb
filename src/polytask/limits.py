"""Client-side rate limiting: RPM and TPM token buckets with weighted acquire, settle and a shared pause.

The buckets follow the provider's model (OpenAI documents continuously refilling limits): a bucket holds at most
its per-minute limit, refills at ``limit / 60`` per second, and starts full. A call reserves its estimated tokens
(prompt estimate + ``max_tokens``, the formula OpenAI's limiter charges) before it is sent and settles after the
response with the real prompt tokens. A 429 pauses the whole limiter for the time the server asked, so waiting
calls are released one by one as capacity returns instead of all waking on the same Retry-After.

Waiters are served first in, first out (``anyio.Lock`` is fair), so a large call is not starved by small ones.
Time comes from an injectable :class:`Clock`, so tests drive it without sleeping.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio

from .exceptions import ConfigurationError, RequestTooLargeError

__all__ = ["Clock", "MonotonicClock", "RateLimiter", "Reservation", "TokenBucket"]


class Clock(Protocol):
    """A source of time in seconds and a way to wait."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``anyio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class TokenBucket:
    """A continuously refilling bucket of ``per_minute`` capacity that starts full.

    The level may go below zero after :meth:`charge` (usage above the reservation is a debt repaid by refill).

    Args:
        per_minute: capacity and refill per minute (requests or tokens); must be > 0.
        now: the current clock reading, seconds.
    """

    def __init__(self, per_minute: float, now: float) -> None:
        if not per_minute > 0:
            raise ConfigurationError(f"a rate limit must be > 0 per minute, got {per_minute!r}")
        self.capacity = float(per_minute)
        self.rate = self.capacity / 60.0
        self._level = self.capacity
        self._at = now

    def level(self, now: float) -> float:
        """Units available at ``now`` (may be negative)."""
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
            self._at = now
        return self._level

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` units are available (0 when they are)."""
        missing = amount - self.level(now)
        return 0.0 if missing <= 0 else missing / self.rate

    def charge(self, amount: float, now: float) -> None:
        """Take ``amount`` units (a negative amount gives units back, up to the capacity)."""
        self._level = min(self.capacity, self.level(now) - amount)


@dataclass(slots=True)
class Reservation:
    """What one call took from the limiter: ``tokens`` reserved at acquire time."""

    tokens: int
    settled: bool = False


class RateLimiter:
    """RPM and TPM limits shared by every call of a backend.

    Args:
        rpm: requests per minute, or None for no request limit.
        tpm: tokens per minute, or None for no token limit.
        clock: time source (default: the monotonic clock).
        accounting: how a call's tokens are settled after its response. ``"max_tokens"`` (default): real prompt
            tokens + the call's ``max_tokens``, as OpenAI's limiter charges, so the client never runs ahead of the
            server; ``"usage"``: real prompt + completion tokens, for servers that charge what was generated.

    Raises:
        ConfigurationError: a limit ≤ 0.
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        clock: Clock | None = None,
        accounting: Literal["max_tokens", "usage"] = "max_tokens",
    ) -> None:
        self.clock: Clock = clock or MonotonicClock()
        now = self.clock.now()
        self.requests = TokenBucket(rpm, now) if rpm is not None else None
        self.tokens = TokenBucket(tpm, now) if tpm is not None else None
        self.accounting = accounting
        self._paused_until = -math.inf
        self._lock = anyio.Lock()

    @property
    def rpm(self) -> float | None:
        return self.requests.capacity if self.requests else None

    @property
    def tpm(self) -> float | None:
        return self.tokens.capacity if self.tokens else None

    def pause(self, seconds: float) -> None:
        """Hold every acquisition for ``seconds`` from now (extends, never shortens, a pause in force)."""
        self._paused_until = max(self._paused_until, self.clock.now() + max(0.0, seconds))

    def wait_time(self, tokens: int) -> float:
        """Seconds until a call of ``tokens`` could start, ignoring calls already waiting."""
        now = self.clock.now()
        wait = self._paused_until - now
        if self.requests:
            wait = max(wait, self.requests.wait_time(1, now))
        if self.tokens:
            wait = max(wait, self.tokens.wait_time(tokens, now))
        return max(0.0, wait)

    async def acquire(self, tokens: int) -> Reservation:
        """Wait (first in, first out) until one request and ``tokens`` tokens are available, then take them.

        Args:
            tokens: the call's reservation, prompt-token estimate + max completion tokens.

        Raises:
            RequestTooLargeError: ``tokens`` exceeds the TPM limit, so no amount of waiting would do.
        """
        if self.tokens and tokens > self.tokens.capacity:
            raise RequestTooLargeError(tokens, self.tokens.capacity)
        async with self._lock:
            while (wait := self.wait_time(tokens)) > 0:
                await self.clock.sleep(wait)
            now = self.clock.now()
            if self.requests:
                self.requests.charge(1, now)
            if self.tokens:
                self.tokens.charge(tokens, now)
        return Reservation(tokens)

    def settle(self, reservation: Reservation, *, prompt_tokens: int, completion_tokens: int, max_tokens: int) -> None:
        """Correct the TPM bucket once the response's usage is known (see ``accounting``). Idempotent."""
        if reservation.settled:
            return
        reservation.settled = True
        if not self.tokens or prompt_tokens <= 0:
            return
        actual = prompt_tokens + (completion_tokens if self.accounting == "usage" else max_tokens)
        self.tokens.charge(actual - reservation.tokens, self.clock.now())
