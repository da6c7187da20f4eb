"""Parsing of rate-limit response headers: ``retry-after-ms``, ``retry-after`` and ``x-ratelimit-*``.

Formats (as OpenAI and compatible servers send them):

- ``retry-after-ms: 1234`` — milliseconds (OpenAI's SDK reads it first);
- ``retry-after: 7`` — seconds, or an HTTP date (RFC 9110 §10.2.3) such as ``Wed, 21 Oct 2026 07:28:00 GMT``;
- ``x-ratelimit-reset-requests: 1s`` / ``x-ratelimit-reset-tokens: 6m0s`` — Go-style durations
  (``1h2m3.5s``, ``20ms``, ``150us``);
- ``x-ratelimit-limit-{requests,tokens}`` and ``x-ratelimit-remaining-{requests,tokens}`` — integers;
- ``RateLimit-Policy: 100;w=10`` (or ``"default";q=100;w=10``) — a quota over a window of ``w`` seconds, as the IETF
  draft "RateLimit header fields for HTTP" (draft-ietf-httpapi-ratelimit-headers) writes it: read for its window.

A 429 whose headers say nothing may still say it in its message (:func:`parse_rate_limit_message`): OpenAI's "Rate
limit reached for gpt-4o on tokens per min (TPM): Limit 30000, Used 29500, Requested 1200. Please try again in
1.4s." (also "in 6m0s", "in 120ms"), Azure OpenAI's "… have exceeded call rate limit of your current OpenAI S0 pricing
tier. Please retry after 17 seconds."
"""

from __future__ import annotations

import datetime
import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping

from .chat import RateLimitHeaders

__all__ = ["parse_duration", "parse_rate_limit_headers", "parse_rate_limit_message", "parse_retry_after"]

_NONE = RateLimitHeaders()
_NAMES = tuple(
    f"x-ratelimit-{kind}-{unit}" for kind in ("remaining", "limit", "reset") for unit in ("requests", "tokens")
)
_NAMES_ALL = (*_NAMES, "ratelimit-policy", "x-ratelimit-policy")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_POLICY_WINDOW = re.compile(r";\s*w\s*=\s*(\d+(?:\.\d+)?)")
# "try again in 2.7s" / "in 6m0s" / "in 120ms" (OpenAI), "retry after 17 seconds" / "try again in 20 seconds" (Azure)
_WAIT = re.compile(
    r"(?:try again|retry)\s+(?:in|after)\s+"
    r"(?:(?P<go>(?:\d+(?:\.\d+)?(?:ms|us|µs|ns|h|m|s))+)\b|(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[a-zµ]+))",
    re.IGNORECASE,
)
_WORD_UNIT = {
    **{w: 1e-3 for w in ("ms", "msec", "msecs", "millisecond", "milliseconds")},
    **{w: 1.0 for w in ("s", "sec", "secs", "second", "seconds")},
    **{w: 60.0 for w in ("min", "mins", "minute", "minutes")},
    **{w: 3600.0 for w in ("h", "hr", "hrs", "hour", "hours")},
}
# "on requests per min (RPM): Limit 3, Used 3, Requested 1" (OpenAI); "exceeded call rate limit" /
# "exceeded token rate limit" (Azure OpenAI)
_OPENAI_LIMIT = re.compile(
    r"on (?P<kind>requests|tokens) per min\w*(?: \((?:RPM|TPM)\))?:\s*Limit (?P<limit>\d+)", re.IGNORECASE
)
_AZURE_LIMIT = re.compile(r"exceeded (?P<kind>call|token) rate limit", re.IGNORECASE)


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
    if all(get(name) is None for name in _NAMES_ALL):  # most servers send none: skip the parsing
        return _NONE
    return RateLimitHeaders(
        limit_requests=_int(get("x-ratelimit-limit-requests")),
        limit_tokens=_int(get("x-ratelimit-limit-tokens")),
        remaining_requests=_int(get("x-ratelimit-remaining-requests")),
        remaining_tokens=_int(get("x-ratelimit-remaining-tokens")),
        reset_requests=parse_duration(get("x-ratelimit-reset-requests")),
        reset_tokens=parse_duration(get("x-ratelimit-reset-tokens")),
        window=parse_window(headers),
    )


def parse_window(headers: Mapping[str, str]) -> float | None:
    """The shortest window, in seconds, of a ``RateLimit-Policy`` (or ``x-ratelimit-policy``) header when it is
    under a minute (a limit enforced over 1 or 10 seconds), else None."""
    policy = headers.get("ratelimit-policy") or headers.get("x-ratelimit-policy")
    if not policy:
        return None
    windows = [float(w) for w in _POLICY_WINDOW.findall(policy)]
    short = [w for w in windows if 0 < w < 60]
    return min(short) if short else None


def parse_rate_limit_message(message: str) -> tuple[float | None, RateLimitHeaders]:
    """What a 429's message says when its headers do not: the wait in seconds (None when it gives none) and the
    limit that ran out (``limit_*`` of that kind when stated, and ``remaining_*`` 0 — what is left is too little for
    the call; the rest None).

    Examples::

        "… on tokens per min (TPM): Limit 30000, Used 29500, Requested 1200. Please try again in 1.4s."
            → (1.4, RateLimitHeaders(limit_tokens=30000, remaining_tokens=0))
        "… have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 17 seconds."
            → (17.0, RateLimitHeaders(remaining_requests=0))
    """
    wait: float | None = None
    for match in _WAIT.finditer(message):
        if match.group("go"):
            wait = parse_duration(match.group("go"))
        elif (unit := _WORD_UNIT.get(match.group("unit").lower())) is not None:
            wait = float(match.group("n")) * unit
        if wait is not None:
            break
    if (found := _OPENAI_LIMIT.search(message)) is not None:  # remaining 0: what is left is too little for the call
        limit = int(found.group("limit"))
        if found.group("kind").lower() == "requests":
            return wait, RateLimitHeaders(limit_requests=limit, remaining_requests=0)
        return wait, RateLimitHeaders(limit_tokens=limit, remaining_tokens=0)
    if (azure := _AZURE_LIMIT.search(message)) is not None:
        if azure.group("kind").lower() == "call":
            return wait, RateLimitHeaders(remaining_requests=0)
        return wait, RateLimitHeaders(remaining_tokens=0)
    return wait, _NONE


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
