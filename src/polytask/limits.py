"""Client-side rate limiting: RPM and TPM token buckets with weighted acquire, settle and a shared pause.

The buckets follow the provider's model (OpenAI documents continuously refilling limits): a bucket holds at most
its per-minute limit, refills at ``limit / 60`` per second, and starts full (so a 60 s window may see up to twice
the limit: a full bucket, then a minute of refill — what the provider's own bucket admits, not a fixed window).
A call reserves its estimated tokens (prompt estimate + ``max_tokens``, the formula OpenAI's limiter charges) before
it is sent and settles after the response with the real prompt tokens. A 429 pauses the whole limiter for the time
the server asked and empties the bucket that ran out as of the pause's end, so the calls that waited are released at
the refill rate instead of all waking on the same Retry-After into a second wave of 429s. A server that enforces its
RPM over a short window (Azure OpenAI: 1 or 10 seconds) gets a requests bucket that holds only that window's share
(``window``), so no burst it would refuse.

Limits left unset are learned from the ``x-ratelimit-limit-*`` / ``-remaining-*`` headers of every response
(configured limits cap what is learned; a limit whose ``x-ratelimit-reset-*`` is over a minute is a per-day one, as
Groq's request headers are, and is not learned as a per-minute limit): until the first response arrives only one call
goes out, then each response creates or resizes the bucket and lowers its level to the server's ``remaining`` when
the server says less is left (other clients sharing the key, or an estimate that ran low). Servers that send no such
headers get no limit.

Waiters are served first in, first out (``anyio.Lock`` is fair), so a large call is not starved by small ones.
Time comes from an injectable :class:`Clock`, so tests drive it without sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio

from ._checks import check_positive
from .chat import RateLimitHeaders
from .exceptions import ConfigurationError, RequestTooLargeError

__all__ = [
    "Clock",
    "Limiter",
    "MonotonicClock",
    "RateLimiter",
    "Reservation",
    "TokenBucket",
    "check_limits",
    "check_window",
    "drained",
    "shared_observation",
]

_RECHECK = 5.0  # seconds: the longest a waiting call sleeps before it looks at learned limits again


class Clock(Protocol):
    """A source of time in seconds and a way to wait."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class Limiter(Protocol):
    """What the caller needs of a rate limiter: :class:`RateLimiter` (this process) or
    :class:`~polytask.RedisRateLimiter` (every process on one key). ``settle``, ``pause`` and ``observe`` may return
    an awaitable (a round trip to a shared store), which the caller awaits."""

    clock: Clock

    @property
    def rpm(self) -> float | None: ...

    @property
    def tpm(self) -> float | None: ...

    async def acquire(self, tokens: int) -> Reservation: ...

    def settle(
        self, reservation: Reservation, *, prompt_tokens: int, completion_tokens: int, max_tokens: int
    ) -> Awaitable[None] | None: ...

    def pause(self, seconds: float, limits: RateLimitHeaders | None = None) -> Awaitable[None] | None: ...

    def observe(self, limits: RateLimitHeaders | None) -> Awaitable[None] | None: ...


def check_limits(rpm: float | None, tpm: float | None, headroom: float, window: float | None) -> None:
    """The settings every rate limiter takes (:class:`RateLimiter`, :class:`~polytask.RedisRateLimiter`, the Ray
    runner's shared limit), checked alike.

    Raises:
        ConfigurationError: a limit that is not a finite number > 0, a headroom outside [0, 1), a window outside
            (0, 60].
    """
    check_positive("rpm", rpm)
    check_positive("tpm", tpm)
    if window is not None:
        check_window(window)
    if not 0 <= headroom < 1:
        raise ConfigurationError(f"headroom must be a share in [0, 1), got {headroom!r}")


def drained(limits: RateLimitHeaders | None) -> tuple[bool, bool]:
    """Which buckets a 429 says ran out, ``(requests, tokens)``: the one(s) it reports with 0 remaining, both when it
    does not say (what a shared limiter's pause empties)."""
    said = limits is not None and (limits.remaining_requests == 0 or limits.remaining_tokens == 0)
    if not said or limits is None:
        return True, True
    return limits.remaining_requests == 0, limits.remaining_tokens == 0


def shared_observation(limits: RateLimitHeaders | None, learning: bool) -> tuple[float, float, float, float] | None:
    """What a shared limiter stores of one response's headers: ``(rpm, tpm, remaining requests, remaining tokens)``,
    a limit 0 where it is not learned (not learning, not said, or a per-day limit: its reset is over a minute), a
    remaining -1 where not said; None when there is nothing to store."""
    if limits is None:
        return None
    rpm = limits.limit_requests if learning and (limits.reset_requests or 0) <= 60 else None
    tpm = limits.limit_tokens if learning and (limits.reset_tokens or 0) <= 60 else None
    left_r, left_t = limits.remaining_requests, limits.remaining_tokens
    if rpm is None and tpm is None and left_r is None and left_t is None:
        return None
    return float(rpm or 0), float(tpm or 0), -1.0 if left_r is None else left_r, -1.0 if left_t is None else left_t


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``anyio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class TokenBucket:
    """A continuously refilling bucket that refills ``per_minute`` units a minute and starts full.

    It holds at most ``per_minute × window / 60`` units: the whole minute's limit by default, a short window's share
    for a server that enforces its per-minute limit over 1 or 10 seconds (Azure OpenAI), so a full bucket's burst
    is one the server admits. The level may go below zero after :meth:`charge` (usage above the reservation is a
    debt repaid by refill).

    Args:
        per_minute: refill per minute (requests or tokens); must be > 0.
        now: the current clock reading, seconds.
        window: the span, in seconds, the limit is enforced over (0 < window ≤ 60; default 60).
    """

    def __init__(self, per_minute: float, now: float, *, window: float = 60.0) -> None:
        if not per_minute > 0:
            raise ConfigurationError(f"a rate limit must be > 0 per minute, got {per_minute!r}")
        check_window(window)
        self.per_minute = float(per_minute)
        self.window = float(window)
        self.capacity = self.per_minute * self.window / 60.0
        self.rate = self.per_minute / 60.0
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
        # a rounding residue is no shortfall: waiting it out could add nothing to the clock and never end
        return 0.0 if missing <= 1e-9 * self.capacity else missing / self.rate

    def charge(self, amount: float, now: float) -> None:
        """Take ``amount`` units (a negative amount gives units back, up to the capacity)."""
        self._level = min(self.capacity, self.level(now) - amount)

    def resize(self, per_minute: float, now: float, *, window: float | None = None) -> None:
        """Change the limit (and the window, when given), keeping the units already used."""
        used = self.capacity - self.level(now)
        self.per_minute = float(per_minute)
        self.window = float(window) if window is not None else self.window
        self.capacity = self.per_minute * self.window / 60.0
        self.rate = self.per_minute / 60.0
        self._level = self.capacity - used

    def sync(self, remaining: float, now: float) -> None:
        """Lower the level to what the server says is ``remaining`` (never raises it)."""
        self._level = min(self.level(now), remaining)


def check_window(window: float) -> None:
    """Raise :class:`~polytask.ConfigurationError` unless ``window`` is a number of seconds in (0, 60]."""
    if not (isinstance(window, int | float) and 0 < window <= 60):
        raise ConfigurationError(
            f"window must be the seconds a per-minute limit is enforced over, in (0, 60], got {window!r}"
        )


@dataclass(slots=True)
class Reservation:
    """What one call took from the limiter: ``tokens`` reserved at acquire time."""

    tokens: int
    settled: bool = False


class RateLimiter:
    """RPM and TPM limits shared by every call of a backend.

    Args:
        rpm: requests per minute; None to learn it from response headers (or to have none, if the server sends none).
        tpm: tokens per minute; None to learn it likewise.
        clock: time source (default: the monotonic clock).
        learn: learn the limits left unset from response headers (see :meth:`observe`); the orchestrator turns
            this on.
        headroom: the share of each bucket kept unused (default 0.01): the client admits a call only while that
            much would be left, absorbing small drifts between its bucket and the server's (requests reaching the
            server out of order, clock skew). It delays the first wait by ``headroom × 60`` seconds, once, and does
            not lower the sustained rate.
        accounting: how a call's tokens are settled after its response. ``"max_tokens"`` (default): real prompt
            tokens + the call's ``max_tokens``, as OpenAI's limiter charges, so the client never runs ahead of the
            server; ``"usage"``: real prompt + completion tokens, for servers that charge what was generated.
        window: the seconds over which the server enforces its RPM limit, in (0, 60]: the requests bucket holds at
            most ``rpm × window / 60``, so the burst at the start (or after an idle spell) is one the server admits.
            Azure OpenAI evaluates RPM over 1 or 10 seconds ("Understanding rate limits", Azure OpenAI docs); at
            600 RPM and ``window=10``, 100 calls go at once, then 10 a second. The TPM bucket keeps the minute.
            None (default): 60, or what a response's ``RateLimit-Policy`` header says.

    Raises:
        ConfigurationError: a limit that is not a finite number > 0, a headroom outside [0, 1), an unknown
            accounting, a window outside (0, 60].
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        clock: Clock | None = None,
        accounting: Literal["max_tokens", "usage"] = "max_tokens",
        learn: bool = False,
        headroom: float = 0.01,
        window: float | None = None,
    ) -> None:
        check_limits(rpm, tpm, headroom, window)
        if accounting not in ("max_tokens", "usage"):
            raise ConfigurationError(f"accounting must be 'max_tokens' or 'usage', got {accounting!r}")
        self.clock: Clock = clock or MonotonicClock()
        now = self.clock.now()
        self._window = window  # configured: never changed by headers
        self.window = window or 60.0
        self.requests = TokenBucket(rpm, now, window=self.window) if rpm is not None else None
        self.tokens = TokenBucket(tpm, now) if tpm is not None else None
        self.accounting = accounting
        self._caps = (rpm, tpm)
        self.headroom = headroom
        self.learning = learn and (rpm is None or tpm is None)
        self._heard = anyio.Event()  # set by the first observe(): the server's limits are known (or absent)
        self._probing = False
        self._wake = anyio.Event()  # set by the first answer, or when the first call left without one
        self._paused_until = -math.inf
        self._lock = anyio.Lock()

    @property
    def rpm(self) -> float | None:
        """The requests-per-minute limit in force (configured or learned), or None."""
        return self.requests.per_minute if self.requests else None

    @property
    def tpm(self) -> float | None:
        """The tokens-per-minute limit in force (configured or learned), or None."""
        return self.tokens.per_minute if self.tokens else None

    def pause(self, seconds: float, limits: RateLimitHeaders | None = None) -> None:
        """Hold every acquisition for ``seconds`` from now (extends, never shortens, a pause in force), as a 429's
        Retry-After asks.

        The bucket that ran out (the one ``limits``, what the 429 said, reports with 0 remaining; both when it does
        not say) is emptied as of the pause's end, so the calls that waited on the pause go out at the bucket's
        refill rate when it ends, not all at once into a second wave of 429s.
        """
        seconds = max(0.0, seconds)
        now = self.clock.now()
        self._paused_until = max(self._paused_until, now + seconds)
        said = limits is not None and (limits.remaining_requests == 0 or limits.remaining_tokens == 0)
        for bucket, remaining, first in (
            (self.requests, limits.remaining_requests if limits else None, 1.0),  # one call goes as the pause ends
            (self.tokens, limits.remaining_tokens if limits else None, 0.0),
        ):
            if bucket is not None and (remaining == 0 or not said):
                bucket.sync(first + self.headroom * bucket.capacity - seconds * bucket.rate, now)

    def wait_time(self, tokens: int) -> float:
        """Seconds until a call of ``tokens`` could start, ignoring calls already waiting."""
        now = self.clock.now()
        wait = self._paused_until - now
        if self.requests:
            wait = max(wait, self.requests.wait_time(1 + self.headroom * self.requests.capacity, now))
        if self.tokens:
            wait = max(wait, self.tokens.wait_time(tokens + self.headroom * self.tokens.capacity, now))
        return max(0.0, wait)

    async def acquire(self, tokens: int) -> Reservation:
        """Wait (first in, first out) until one request and ``tokens`` tokens are available, then take them.

        Args:
            tokens: the call's reservation, prompt-token estimate + max completion tokens.

        Raises:
            RequestTooLargeError: ``tokens`` exceeds the TPM limit (also one learned while this call waited), so no
                amount of waiting would do.
        """
        self._check_size(tokens)
        probe = False
        while self.learning and not self._heard.is_set():
            if not self._probing:
                self._probing = probe = True  # this call goes first and tells us the limits
                break
            await self._wake.wait()
            self._check_size(tokens)
        try:
            if not self._lock.locked() and self.wait_time(tokens) <= 0:
                self._take(tokens)  # the common case: no waiter ahead, capacity now (no scheduling round trip)
                return Reservation(tokens)
            async with self._lock:
                while (wait := self.wait_time(tokens)) > 0:
                    self._check_size(tokens)  # a limit learned while this call waited may have shrunk below it
                    # learned limits change under a waiting call: look again every few seconds (configured never do)
                    await self.clock.sleep(min(wait, _RECHECK) if self.learning else wait)
                self._check_size(tokens)
                self._take(tokens)
            return Reservation(tokens)
        except BaseException:
            if probe and not self._heard.is_set():  # it never reached the server: the next waiting call goes
                self._probing = False
                wake, self._wake = self._wake, anyio.Event()
                wake.set()
            raise

    def _check_size(self, tokens: int) -> None:
        if self.tokens and tokens > self.tokens.capacity * (1 - self.headroom):
            raise RequestTooLargeError(tokens, self.tokens.capacity)

    def _take(self, tokens: int) -> None:
        now = self.clock.now()
        if self.requests:
            self.requests.charge(1, now)
        if self.tokens:
            self.tokens.charge(tokens, now)

    def settle(self, reservation: Reservation, *, prompt_tokens: int, completion_tokens: int, max_tokens: int) -> None:
        """Correct the TPM bucket once the response's usage is known (see ``accounting``). Idempotent."""
        if reservation.settled:
            return
        reservation.settled = True
        if not self.tokens or prompt_tokens <= 0:
            return
        actual = prompt_tokens + (completion_tokens if self.accounting == "usage" else max_tokens)
        self.tokens.charge(actual - reservation.tokens, self.clock.now())

    def observe(self, limits: RateLimitHeaders | None) -> None:
        """Keep the buckets in step with one response's ``x-ratelimit-*`` headers (None: the call got no response,
        which still lets waiting calls go on after a failed first call)."""
        self._heard.set()
        self._wake.set()
        if limits is None:
            return
        now = self.clock.now()
        if limits.window is not None and self._window is None and limits.window != self.window:
            self.window = limits.window  # the server enforces its RPM over a short window: so does the bucket
            if self.requests is not None:
                self.requests.resize(self.requests.per_minute, now, window=self.window)
        if not self.learning:
            self._sync(limits)
            return
        for attr, limit, cap, reset in (
            ("requests", limits.limit_requests, self._caps[0], limits.reset_requests),
            ("tokens", limits.limit_tokens, self._caps[1], limits.reset_tokens),
        ):
            if limit is None or limit <= 0:
                continue
            if reset is not None and reset > 60:  # refills over more than a minute: a per-day limit (Groq's
                continue  # x-ratelimit-*-requests), not the per-minute one this bucket keeps
            capacity = min(limit, cap) if cap is not None else limit
            bucket: TokenBucket | None = getattr(self, attr)
            if bucket is None:
                window = self.window if attr == "requests" else 60.0
                setattr(self, attr, TokenBucket(capacity, now, window=window))
            elif bucket.per_minute != capacity:
                bucket.resize(capacity, now)
        self._sync(limits)

    def _sync(self, limits: RateLimitHeaders) -> None:
        now = self.clock.now()
        if self.requests and limits.remaining_requests is not None:
            self.requests.sync(limits.remaining_requests, now)
        if self.tokens and limits.remaining_tokens is not None:
            self.tokens.sync(limits.remaining_tokens, now)
