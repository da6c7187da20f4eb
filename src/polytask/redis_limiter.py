"""One rate limit for every process on an API key: :class:`RedisRateLimiter`, the RPM / TPM buckets held in Redis.

A provider's limit belongs to the key, not to a process: four ``polytask run`` processes (or Ray workers, or the
replicas of a web service) on one key each believing they own the whole limit draw 429s. Here every client of one
``key`` draws on the same buckets, kept in one Redis hash and changed only by Lua scripts, so each change is atomic
and reads Redis' own clock (``TIME``): the clients' clocks never matter.

The buckets are those of :class:`~polytask.RateLimiter` (continuously refilling, starting full, ``headroom`` kept
unused, an optional short RPM ``window``), written in the form of the Generic Cell Rate Algorithm (GCRA; ITU-T
I.371, the "virtual scheduling" form): each bucket is one number, its theoretical arrival time ``tat`` — the time at
which it would be full again — and a call of cost ``c`` may start once ``tat - (capacity - c) / rate`` is past. A
call *reserves* the earliest such time in one round trip, then sleeps until it locally: reservations are made in the
order the calls reach Redis, so clients are served first come, first served (no client starves, a large call is not
overtaken by small ones), and no client polls.

What a response teaches is shared the same way: its real usage (:meth:`settle`), a 429's Retry-After (:meth:`pause`:
every client waits, and the bucket that ran out resumes at its refill rate), the limits learned from
``x-ratelimit-*`` headers (:meth:`observe`, capped by the limits configured here).

Redis that goes away mid-run raises :class:`~polytask.LimiterUnavailableError` (it stops the run, keeping the work
done), never unlimited sending; with ``fallback_share`` set, the client goes on under that share of the limits
locally (a :class:`~polytask.RateLimiter`), and tries Redis again every ``retry_every`` seconds.

Needs the ``redis`` extra (``pip install 'polytask[redis]'``: redis-py's asyncio client).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio

from ._checks import check_positive
from .chat import RateLimitHeaders
from .exceptions import ConfigurationError, LimiterUnavailableError, RequestTooLargeError
from .limits import Clock, MonotonicClock, RateLimiter, Reservation, check_limits, drained, shared_observation

__all__ = ["RedisRateLimiter"]

logger = logging.getLogger("polytask")

# Shared by the scripts: the hash's fields are tat_r, tat_t (seconds, Redis time), paused (until, Redis time),
# rpm, tpm (learned limits). ARGV[1..5] of each script: configured rpm, configured tpm (0: none), headroom, window
# (seconds, for the RPM bucket), ttl (seconds the hash outlives its last use).
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tat_r', 'tat_t', 'paused', 'rpm', 'tpm')
local cfg_r, cfg_t = tonumber(ARGV[1]), tonumber(ARGV[2])
local headroom, window, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rpm = cfg_r > 0 and cfg_r or (tonumber(s[4]) or 0)
local tpm = cfg_t > 0 and cfg_t or (tonumber(s[5]) or 0)
local tat_r, tat_t = tonumber(s[1]) or now, tonumber(s[2]) or now
local paused = tonumber(s[3]) or 0
local cap_r, rate_r = rpm * window / 60, rpm / 60
local cap_t, rate_t = tpm, tpm / 60
local function save()
  redis.call('HSET', KEYS[1], 'tat_r', tostring(tat_r), 'tat_t', tostring(tat_t), 'paused', tostring(paused))
  redis.call('EXPIRE', KEYS[1], ttl)
end
"""

# ARGV[6]: the call's tokens. Returns {status, seconds to wait, rpm, tpm}; status 'ok' or 'too_large'.
_ACQUIRE = (
    _PRELUDE
    + """
local tokens = tonumber(ARGV[6])
if tpm > 0 and tokens > cap_t * (1 - headroom) then
  return {'too_large', '0', tostring(rpm), tostring(tpm)}
end
local go = math.max(now, paused)
if rpm > 0 then go = math.max(go, tat_r - (cap_r - 1 - headroom * cap_r) / rate_r) end
if tpm > 0 then go = math.max(go, tat_t - (cap_t - tokens - headroom * cap_t) / rate_t) end
if rpm > 0 then tat_r = math.max(tat_r, go) + 1 / rate_r end
if tpm > 0 then tat_t = math.max(tat_t, go) + tokens / rate_t end
save()
return {'ok', tostring(go - now), tostring(rpm), tostring(tpm)}
"""
)

# ARGV[6]: tokens to add to the TPM bucket's use (negative: give back). Returns nothing.
_SETTLE = (
    _PRELUDE
    + """
local delta = tonumber(ARGV[6])
if tpm > 0 then
  if delta > 0 then tat_t = math.max(tat_t, now) + delta / rate_t
  else tat_t = math.max(now, tat_t + delta / rate_t) end
  save()
end
return 0
"""
)

# ARGV[6]: seconds to pause; ARGV[7], ARGV[8]: 1 to empty the requests / tokens bucket as of the pause's end.
_PAUSE = (
    _PRELUDE
    + """
local seconds = tonumber(ARGV[6])
local ends = now + seconds
paused = math.max(paused, ends)
if rpm > 0 and ARGV[7] == '1' then tat_r = math.max(tat_r, ends + (cap_r - 1 - headroom * cap_r) / rate_r) end
if tpm > 0 and ARGV[8] == '1' then tat_t = math.max(tat_t, ends + (cap_t - headroom * cap_t) / rate_t) end
save()
return 0
"""
)

# ARGV[6..9]: learned limit of requests, of tokens (0: none), remaining requests, tokens (-1: not said).
_OBSERVE = (
    _PRELUDE
    + """
local limit_r, limit_t = tonumber(ARGV[6]), tonumber(ARGV[7])
if cfg_r <= 0 and limit_r > 0 then rpm = limit_r; redis.call('HSET', KEYS[1], 'rpm', tostring(rpm)) end
if cfg_t <= 0 and limit_t > 0 then tpm = limit_t; redis.call('HSET', KEYS[1], 'tpm', tostring(tpm)) end
cap_r, rate_r = rpm * window / 60, rpm / 60
cap_t, rate_t = tpm, tpm / 60
local left_r, left_t = tonumber(ARGV[8]), tonumber(ARGV[9])
if rpm > 0 and left_r >= 0 then tat_r = math.max(tat_r, now + (cap_r - left_r) / rate_r) end
if tpm > 0 and left_t >= 0 then tat_t = math.max(tat_t, now + (cap_t - left_t) / rate_t) end
save()
return 0
"""
)


def shown_url(url: str) -> str:
    """``url`` as it may be shown: scheme, host, port and path only (no ``user:password@``, no query such as
    ``?password=…``)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    hidden = "***@" if "@" in parts.netloc else ""
    return urlunsplit((parts.scheme, hidden + host, parts.path, "***" if parts.query else "", ""))


class RedisRateLimiter:
    """RPM and TPM limits shared, through Redis, by every client that names the same ``key``.

    Use it where a :class:`~polytask.RateLimiter` goes: ``Orchestrator(backend, tasks, limiter=limiter)``, one per
    process (or Ray worker), all with the same ``url`` and ``key``.

    Args:
        url: the Redis URL (``redis://127.0.0.1:6379/0``; ``rediss://`` for TLS; a password in it is never logged).
        key: the name of the shared limit, e.g. the API key's name or the organisation (not the API key itself);
            the buckets live in the Redis hash ``polytask:limit:{key}``.
        rpm, tpm: the requests- / tokens-per-minute limits; None to learn it from response headers (shared by all
            clients; a configured limit caps it).
        clock: the local time source for sleeping (Redis' own clock decides every time).
        headroom, window: as :class:`~polytask.RateLimiter` (the share of each bucket kept unused; the seconds the
            RPM is enforced over).
        fallback_share: when Redis cannot be reached: None (default) raises
            :class:`~polytask.LimiterUnavailableError`; a share in (0, 1] goes on under that share of the limits in
            this process (e.g. 0.25 for one of four workers), trying Redis again every ``retry_every`` seconds.
        retry_every: seconds between tries to reach Redis again while falling back.
        timeout: seconds a Redis command may take before Redis counts as unreachable.
        client: a ``redis.asyncio.Redis`` to use instead of one made from ``url`` (then ``url`` is only shown).

    Raises:
        ConfigurationError: the ``redis`` package is missing, or a bad setting.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        key: str,
        rpm: float | None = None,
        tpm: float | None = None,
        clock: Clock | None = None,
        headroom: float = 0.01,
        window: float | None = None,
        fallback_share: float | None = None,
        retry_every: float = 5.0,
        timeout: float = 2.0,
        client: Any = None,
    ) -> None:
        check_limits(rpm, tpm, headroom, window)
        check_positive("retry_every", retry_every, allow_none=False)
        check_positive("timeout", timeout, allow_none=False)
        if fallback_share is not None and not 0 < fallback_share <= 1:
            raise ConfigurationError(f"fallback_share must be a share in (0, 1], got {fallback_share!r}")
        if not key or not isinstance(key, str):
            raise ConfigurationError("key must name the shared limit (e.g. your organisation), a non-empty string")
        try:
            import redis.asyncio as aioredis
            from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError
        except ImportError:
            raise ConfigurationError("RedisRateLimiter needs redis-py: pip install 'polytask[redis]'") from None
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        self.url = url
        self.key = key
        self.hash = f"polytask:limit:{key}"
        self.clock: Clock = clock or MonotonicClock()
        self.headroom = headroom
        self.window = window or 60.0
        self._caps = (rpm, tpm)
        self.learning = rpm is None or tpm is None
        self._rpm, self._tpm = rpm, tpm  # as the last script said (learned ones included)
        try:
            self._redis = client or aioredis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
            )
        except ValueError as error:  # not a redis:// / rediss:// / unix:// URL
            raise ConfigurationError(f"the Redis URL {shown_url(url)} cannot be used: {error}") from None
        self._refused: tuple[type[BaseException], ...] = (AuthenticationError, AuthorizationError, ResponseError)
        self._owns_client = client is None
        self._scripts: dict[str, Any] = {}
        self.fallback_share = fallback_share
        self.retry_every = retry_every
        self._fallback: RateLimiter | None = None
        self._down_since = -math.inf

    # -- what the orchestrator reads ---------------------------------------------------------------------------

    @property
    def rpm(self) -> float | None:
        """The requests-per-minute limit in force for this key (configured or learned), or None."""
        return self._rpm or None

    @property
    def tpm(self) -> float | None:
        """The tokens-per-minute limit in force for this key (configured or learned), or None."""
        return self._tpm or None

    def _args(self) -> list[str]:
        rpm, tpm = self._caps
        return [repr(float(rpm or 0)), repr(float(tpm or 0)), repr(self.headroom), repr(self.window), "86400"]

    async def _run(self, name: str, source: str, *extra: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self._redis.register_script(source)
        return await script(keys=[self.hash], args=[*self._args(), *extra])

    def _shown_url(self) -> str:
        return shown_url(self.url)

    def _unavailable(self, error: BaseException) -> LimiterUnavailableError:
        return LimiterUnavailableError(
            f"the shared rate limit {self.key!r} at {self._shown_url()} cannot be reached ({type(error).__name__}: "
            f"{error}); no call is sent without it. Start Redis again and rerun (the work done is kept), or (in "
            "Python) give RedisRateLimiter a fallback_share= to go on under a share of the limit in this process"
        )

    def _use_fallback(self, error: BaseException) -> RateLimiter:
        """The local limiter to go on with while Redis is away (``fallback_share``), or raise."""
        if isinstance(error, self._refused):  # a wrong password or ACL: settings, not an outage — never fall back
            raise LimiterUnavailableError(
                f"Redis at {self._shown_url()} refused the shared rate limit {self.key!r} ({type(error).__name__}: "
                f"{error}): check the URL's credentials and the user's rights (EVALSHA, HSET, EXPIRE on "
                f"{self.hash!r})"
            ) from error
        if self.fallback_share is None:
            raise self._unavailable(error) from error
        if self._fallback is None:
            rpm, tpm = (x * self.fallback_share if x else None for x in (self._rpm, self._tpm))
            logger.warning(
                "the shared rate limit %r at %s cannot be reached (%s): going on under %g of it in this process",
                self.key,
                self._shown_url(),
                type(error).__name__,
                self.fallback_share,
            )
            self._fallback = RateLimiter(rpm, tpm, clock=self.clock, headroom=self.headroom, window=self.window)
        self._down_since = self.clock.now()
        return self._fallback

    def _redis_worth_trying(self) -> bool:
        return self._fallback is None or self.clock.now() - self._down_since >= self.retry_every

    # -- the limiter's interface -------------------------------------------------------------------------------

    async def acquire(self, tokens: int) -> Reservation:
        """Reserve one request and ``tokens`` tokens at the earliest time the shared buckets allow, then wait until
        then.

        Raises:
            RequestTooLargeError: ``tokens`` exceeds the TPM limit (no wait could do).
            LimiterUnavailableError: Redis cannot be reached and no ``fallback_share`` was given.
        """
        if self._redis_worth_trying():
            try:
                status, wait, rpm, tpm = await self._run("acquire", _ACQUIRE, str(int(tokens)))
            except self._errors as error:
                local = self._use_fallback(error)
                return await local.acquire(tokens)
            if self._fallback is not None:
                logger.warning("the shared rate limit %r is reachable again", self.key)
                self._fallback = None
            self._rpm, self._tpm = float(rpm), float(tpm)
            if status == "too_large":
                raise RequestTooLargeError(tokens, self._tpm)
            seconds = float(wait)
            if seconds > 0:
                await self.clock.sleep(seconds)
            return Reservation(tokens)
        assert self._fallback is not None
        return await self._fallback.acquire(tokens)

    def settle(
        self, reservation: Reservation, *, prompt_tokens: int, completion_tokens: int, max_tokens: int
    ) -> Awaitable[None] | None:
        """Correct the shared TPM bucket with the response's real usage (as :meth:`RateLimiter.settle`). Idempotent.
        Returns an awaitable (the round trip to Redis), which the caller awaits."""
        if reservation.settled:
            return None
        reservation.settled = True
        if prompt_tokens <= 0:
            return None
        delta = prompt_tokens + max_tokens - reservation.tokens
        return self._quietly("settle", _SETTLE, repr(float(delta)))

    def pause(self, seconds: float, limits: RateLimitHeaders | None = None) -> Awaitable[None] | None:
        """Every client of the key waits ``seconds`` (a 429's Retry-After); the bucket that ran out (both when the
        429 does not say) resumes at its refill rate. Returns the round trip to Redis, to await."""
        drain_r, drain_t = ("1" if drain else "0" for drain in drained(limits))
        if self._fallback is not None:
            self._fallback.pause(seconds, limits)
        return self._quietly("pause", _PAUSE, repr(max(0.0, float(seconds))), drain_r, drain_t)

    def observe(self, limits: RateLimitHeaders | None) -> Awaitable[None] | None:
        """Share what a response's ``x-ratelimit-*`` headers say: the limits (when learning) and what is left."""
        values = shared_observation(limits, self.learning)
        if values is None:
            return None
        return self._quietly("observe", _OBSERVE, *(repr(v) for v in values))

    async def _quietly(self, name: str, source: str, *extra: str) -> None:
        """Run an update script; while Redis is away the update is dropped (the next acquire says so, or falls
        back): a lost correction must not fail the call that carried it."""
        if not self._redis_worth_trying():
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._run(name, source, *extra)
            except self._errors as error:
                logger.debug("shared rate limit %r: %s update not sent (%s)", self.key, name, error)

    async def reset(self) -> None:
        """Forget this key's shared state (buckets full, no pause, nothing learned) — for tests and new keys."""
        await self._redis.delete(self.hash)

    async def aclose(self) -> None:
        """Close the connection to Redis (when this limiter made it)."""
        if self._owns_client:
            await self._redis.aclose()
