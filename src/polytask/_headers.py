"""Parsing of rate-limit response headers: ``retry-after-ms``, ``retry-after`` and ``x-ratelimit-*``.

Formats (as OpenAI and compatible servers send them):

- ``retry-after-ms: 1234`` — milliseconds (OpenAI's SDK reads it first);
- ``retry-after: 7`` — seconds, or an HTTP date (RFC 9110 §10.2.3) such as ``Wed, 21 Oct 2026 07:28:00 GMT``;
- ``x-ratelimit-reset-requests: 1s`` / ``x-ratelimit-reset-tokens: 6m0s`` — Go-style durations
  (``1h2m3.5s``, ``20ms``, ``150us``);
- ``x-ratelimit-limit-{requests,tokens}`` and ``x-ratelimit-remaining-{requests,tokens}`` — integers.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping

from .chat import RateLimitHeaders

__all__ = ["parse_duration", "parse_rate_limit_headers", "parse_retry_after"]

_NONE = RateLimitHeaders()
_NAMES = tuple(
    f"x-ratelimit-{kind}-{unit}" for kind in ("remaining", "limit", "reset") for unit in ("requests", "tokens")
)
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Seconds in a Go-style duration (``"6m0s"`` → 360.0, ``"20ms"`` → 0.02, ``"1.5"`` → 1.5), or None if invalid."""
    if value is None:
        return None
    text = value.strip().lower()
    if not text:
        return None
    try:
        return _seconds(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 and math.isfinite(total) else None


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except (ValueError, OverflowError):  # "abc", "inf", "nan", "1e400"
        return None


def _seconds(value: str) -> float | None:
    """A finite number of seconds ≥ 0 (negatives read as 0), or None."""
    number = float(value)
    return max(0.0, number) if math.isfinite(number) else None


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders:
    """The ``x-ratelimit-*`` headers of a response (header names are case-insensitive; pass an httpx2 ``Headers``
    or a dict with lower-case keys). Absent or unparsable values are None."""
    get = headers.get
    if all(get(name) is None for name in _NAMES):  # most servers send none: skip the parsing
        return _NONE
    return RateLimitHeaders(
        limit_requests=_int(get("x-ratelimit-limit-requests")),
        limit_tokens=_int(get("x-ratelimit-limit-tokens")),
        remaining_requests=_int(get("x-ratelimit-remaining-requests")),
        remaining_tokens=_int(get("x-ratelimit-remaining-tokens")),
        reset_requests=parse_duration(get("x-ratelimit-reset-requests")),
        reset_tokens=parse_duration(get("x-ratelimit-reset-tokens")),
    )


def parse_retry_after(headers: Mapping[str, str], *, wall_clock: Callable[[], float] = time.time) -> float | None:
    """Seconds the server asks to wait before the next request, or None when it does not say.

    Order: ``retry-after-ms``, then ``retry-after`` (seconds or HTTP date, against ``wall_clock``), then the
    ``x-ratelimit-reset-*`` of the exhausted bucket(s) (the longest of those; the shortest reset when no bucket
    reports zero remaining).
    """
    get = headers.get
    ms = get("retry-after-ms")
    if ms is not None:
        try:
            seconds = _seconds(ms)
            if seconds is not None:
                return seconds / 1000.0
        except ValueError:
            pass
    ra = get("retry-after")
    if ra is not None:
        try:
            seconds = _seconds(ra)
            if seconds is not None:
                return seconds
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(ra)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None:
                if when.tzinfo is None:  # "-0000" or no zone: RFC 9110 dates are UTC, never the local time
                    when = when.replace(tzinfo=datetime.UTC)
                return max(0.0, when.timestamp() - wall_clock())
    limits = parse_rate_limit_headers(headers)
    resets = {
        "requests": (limits.remaining_requests, limits.reset_requests),
        "tokens": (limits.remaining_tokens, limits.reset_tokens),
    }
    exhausted = [reset for remaining, reset in resets.values() if remaining == 0 and reset is not None]
    if exhausted:
        return max(exhausted)
    known = [reset for _, reset in resets.values() if reset is not None]
    return min(known) if known else None
