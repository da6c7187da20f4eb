"""The simulator's rate limits: continuously refilling token buckets, and OpenAI-shaped 429 messages, headers.

A bucket holds at most ``limit`` units (requests or tokens), starts full, and refills at ``limit / 60`` units
per second, continuously. A call is admitted only when both the RPM bucket has 1 request and the TPM bucket
has its charge (prompt-token estimate + max completion tokens, OpenAI's formula); then both are debited.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Clock", "Decision", "RateLimiter", "TokenBucket", "format_duration"]

Clock = Callable[[], float]
"""A clock: returns monotonic seconds (``time.monotonic`` by default; a fake one in tests)."""


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*`` headers.

    ``"20ms"``, ``"1s"``, ``"1.234s"``, ``"6m0s"``, ``"1h2m3s"``: under a second, whole milliseconds (rounded
    up); otherwise seconds with up to three decimals, trailing zeros dropped.
    """
    seconds = max(0.0, seconds)
    if seconds < 1.0:
        return f"{math.ceil(round(seconds * 1000, 6))}ms"
    ms = math.ceil(round(seconds * 1000, 6))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return out + f"{secs}s"


class TokenBucket:
    """A continuously refilling bucket.

    Args:
        limit: capacity, in units per minute (requests or tokens); the bucket starts full.
        clock: monotonic seconds.

    Refill is ``limit / 60`` units per second, never above ``limit``.
    """

    def __init__(self, limit: float, clock: Clock = time.monotonic) -> None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        self.limit = float(limit)
        self.rate = self.limit / 60.0
        self._clock = clock
        self._level = self.limit
        self._stamp = clock()

    def level(self) -> float:
        """Units available now."""
        now = self._clock()
        self._level = min(self.limit, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._level

    def wait_time(self, amount: float) -> float:
        """Seconds until ``amount`` units are available (0 if they are now; ``inf`` if over capacity)."""
        if amount > self.limit:
            return math.inf
        return max(0.0, (amount - self.level()) / self.rate)

    def reset_time(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.limit - self.level()) / self.rate

    def take(self, amount: float) -> None:
        """Debit ``amount`` units (callers check :meth:`wait_time` first)."""
        self.level()
        self._level -= amount


@dataclass(frozen=True)
class Decision:
    """The rate limiter's verdict on one call.

    Attributes:
        allowed: the call was admitted (and charged).
        kind: what ran out, ``"requests"`` or ``"tokens"``, when not allowed.
        retry_after: seconds until the call would fit (``inf`` when it never can).
        requested: units asked of the exhausted bucket.
        message: OpenAI's 429 error message, when not allowed.
        headers: the ``x-ratelimit-*`` headers (after the charge, when allowed).
    """

    allowed: bool
    kind: str | None
    retry_after: float
    requested: int
    message: str
    headers: dict[str, str]


class RateLimiter:
    """RPM and TPM buckets for one model.

    Args:
        rpm: requests per minute, or None for no limit.
        tpm: tokens per minute, or None for no limit.
        clock: monotonic seconds.
    """

    def __init__(self, rpm: float | None, tpm: float | None, clock: Clock = time.monotonic) -> None:
        self.requests = TokenBucket(rpm, clock) if rpm else None
        self.tokens = TokenBucket(tpm, clock) if tpm else None

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers for the current state."""
        out: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            out[f"x-ratelimit-limit-{name}"] = str(int(bucket.limit))
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level())))
            out[f"x-ratelimit-reset-{name}"] = format_duration(bucket.reset_time())
        return out

    def check(self, tokens: int, model: str) -> Decision:
        """Admit and charge one call of ``tokens`` tokens, or say why not.

        A call over the TPM capacity is refused first ("Request too large", ``retry_after`` = ``inf``);
        then the RPM bucket is checked, then the TPM bucket.
        """
        checks = [("requests", self.requests, 1), ("tokens", self.tokens, tokens)]
        if self.tokens is not None and tokens > self.tokens.limit:
            checks.reverse()
        for kind, bucket, amount in checks:
            if bucket is None:
                continue
            wait = bucket.wait_time(amount)
            if wait > 0:
                unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
                if math.isinf(wait):
                    message = (
                        f"Request too large for {model} on {unit}: Limit {int(bucket.limit)}, "
                        f"Requested {amount}. The input or output tokens must be reduced in order to run "
                        "successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
                    )
                else:
                    used = max(0, math.ceil(bucket.limit - bucket.level()))
                    message = (
                        f"Rate limit reached for {model} on {unit}: Limit {int(bucket.limit)}, Used {used}, "
                        f"Requested {amount}. Please try again in {format_duration(wait)}. Visit "
                        "https://platform.openai.com/account/rate-limits to learn more."
                    )
                return Decision(False, kind, wait, amount, message, self.headers())
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(tokens)
        return Decision(True, None, 0.0, 0, "", self.headers())
