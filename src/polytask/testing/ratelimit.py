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

from ..limits import TokenBucket

__all__ = ["Clock", "Decision", "ServerRateLimiter", "format_duration"]

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


class ServerRateLimiter:
    """The server's RPM and TPM buckets for one model: admits or refuses a call, never waits.

    Uses the client's :class:`polytask.limits.TokenBucket` (same refill model), read against ``clock``.

    Args:
        rpm: requests per minute, or None for no limit.
        tpm: tokens per minute, or None for no limit.
        clock: monotonic seconds.
        rpm_window: the seconds over which ``rpm`` is enforced: the requests bucket holds ``rpm × rpm_window / 60``.
        announce_window: add ``ratelimit-policy: {burst};w={rpm_window}`` to the headers (with a window < 60 s).
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        clock: Clock = time.monotonic,
        *,
        rpm_window: float = 60.0,
        announce_window: bool = False,
    ) -> None:
        self.clock = clock
        now = clock()
        self.requests = TokenBucket(rpm, now, window=rpm_window) if rpm else None
        self.tokens = TokenBucket(tpm, now) if tpm else None
        self.announce_window = announce_window and rpm_window < 60

    def _reset_time(self, bucket: TokenBucket) -> float:
        """Seconds until ``bucket`` is full again."""
        return (bucket.capacity - bucket.level(self.clock())) / bucket.rate

    def headers(self) -> dict[str, str]:
        """The ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers for the current state."""
        out: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            out[f"x-ratelimit-limit-{name}"] = str(int(bucket.per_minute))
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level(self.clock()))))
            out[f"x-ratelimit-reset-{name}"] = format_duration(self._reset_time(bucket))
        if self.announce_window and self.requests is not None:
            out["ratelimit-policy"] = f"{int(self.requests.capacity)};w={self.requests.window:g}"
        return out

    def check(self, tokens: int, model: str) -> Decision:
        """Admit and charge one call of ``tokens`` tokens, or say why not.

        A call over the TPM capacity is refused first ("Request too large", ``retry_after`` = ``inf``);
        then the RPM bucket is checked, then the TPM bucket.
        """
        checks = [("requests", self.requests, 1), ("tokens", self.tokens, tokens)]
        if self.tokens is not None and tokens > self.tokens.capacity:
            checks.reverse()
        now = self.clock()
        for kind, bucket, amount in checks:
            if bucket is None:
                continue
            wait = math.inf if amount > bucket.capacity else bucket.wait_time(amount, now)
            if wait > 0:
                unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
                if math.isinf(wait):
                    message = (
                        f"Request too large for {model} on {unit}: Limit {int(bucket.capacity)}, "
                        f"Requested {amount}. The input or output tokens must be reduced in order to run "
                        "successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
                    )
                else:
                    used = max(0, math.ceil(bucket.per_minute - bucket.level(now)))
                    message = (
                        f"Rate limit reached for {model} on {unit}: Limit {int(bucket.per_minute)}, Used {used}, "
                        f"Requested {amount}. Please try again in {format_duration(wait)}. Visit "
                        "https://platform.openai.com/account/rate-limits to learn more."
                    )
                return Decision(False, kind, wait, amount, message, self.headers())
        if self.requests is not None:
            self.requests.charge(1, now)
        if self.tokens is not None:
            self.tokens.charge(tokens, now)
        return Decision(True, None, 0.0, 0, "", self.headers())
