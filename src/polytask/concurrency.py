"""How many calls may be in flight: adaptive concurrency (AIMD) and a circuit breaker.

:class:`AdaptiveConcurrency` is additive-increase / multiplicative-decrease, TCP's congestion control (Jacobson,
"Congestion Avoidance and Control", SIGCOMM 1988): each success adds ``1 / limit`` (about one more call per round of
calls); overload signals (a 503, a 429 the known limits do not explain, a timeout, latency several times its best)
shrink it multiplicatively, at most once per round trip so one burst of failures counts once.

:class:`CircuitBreaker` (Nygard, "Release It!", 2007): after ``threshold`` consecutive failed calls it opens and
holds every call for ``cooldown`` seconds, then lets a single probe through (half-open); the probe's success closes
it, its failure opens it again for twice as long (up to ``max_cooldown``). A dead server costs one call per
cooldown instead of a storm of retries, and a recovered one is noticed at once.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import anyio

from .exceptions import CircuitOpenError
from .limits import Clock, MonotonicClock

__all__ = ["AdaptiveConcurrency", "CircuitBreaker"]

logger = logging.getLogger("polytask")


class AdaptiveConcurrency:
    """A concurrency limit that shrinks on overload and grows back.

    Overload signals are counted over the last ``window`` calls; the limit shrinks when ``votes`` of them were
    overload signals, at most once per smoothed round trip, so a few random 503s in a healthy run change nothing.
    It shrinks to ``decrease`` × the calls in flight at that moment (or × the limit, if fewer are in flight): a
    server that refuses calls past a hidden cap N answers 503 when about N + 1 are in flight, so one step lands near
    N instead of halving down from a far larger limit.

    Args:
        maximum: the most calls in flight (the configured ``max_concurrency``).
        minimum: the fewest (default 1).
        decrease: factor applied on overload, in (0, 1]; 1 turns adaptation off (default 0.9).
        latency_factor: a smoothed latency above this many times its best counts as an overload signal
            (default 4; None to ignore latency).
        window, votes: overload signals needed among the last ``window`` calls (default 3 of 20).
        initial: the limit to start from (default 8): it grows by one per success, doubling every round trip
            (TCP's slow start), until the first overload signal or ``maximum``; after that, by ``1 / limit``. A run
            against a server with an unknown capacity then does not open with a burst of ``maximum`` calls.
        clock: time source.

    Attributes:
        limiter: the ``anyio.CapacityLimiter`` to hold while a call is in flight.
        decreases: how many times the limit shrank.
    """

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        decrease: float = 0.9,
        latency_factor: float | None = 4.0,
        window: int = 20,
        votes: int = 3,
        initial: int = 8,
        clock: Clock | None = None,
    ) -> None:
        self.maximum = maximum
        self.minimum = max(1, min(minimum, maximum))
        self.decrease = decrease
        self.latency_factor = latency_factor
        self.votes = votes
        self.clock: Clock = clock or MonotonicClock()
        self._slow_start = decrease < 1 and initial < maximum
        self._limit = float(min(maximum, initial) if self._slow_start else maximum)
        self.limiter = anyio.CapacityLimiter(int(self._limit))
        self._signals: deque[bool] = deque(maxlen=window)
        self._last_decrease = -math.inf
        self._latency: float | None = None  # smoothed (EWMA, alpha 0.1) latency, seconds
        self._best: float | None = None  # the lowest smoothed latency after the first 20 calls
        self._samples = 0
        self.decreases = 0

    @property
    def limit(self) -> int:
        """The current limit on calls in flight."""
        return int(self._limit)

    def _apply(self) -> None:
        self.limiter.total_tokens = max(self.minimum, int(self._limit))

    def on_success(self, latency: float) -> None:
        """A call succeeded after ``latency`` seconds."""
        self._latency = latency if self._latency is None else 0.9 * self._latency + 0.1 * latency
        self._samples += 1
        if self._samples >= 20:
            self._best = self._latency if self._best is None else min(self._best, self._latency)
        if self.latency_factor and self._best and self._latency > self.latency_factor * self._best:
            self.on_overload()  # sustained latency far above its best: the server is queueing our calls
            return
        self._signals.append(False)
        if self._limit < self.maximum:
            step = 1.0 if self._slow_start else 1.0 / self._limit
            self._limit = min(float(self.maximum), self._limit + step)
            self._apply()

    def on_overload(self) -> None:
        """The server signalled overload (a 503, a timeout, a 429 no known limit explains)."""
        self._signals.append(True)
        now = self.clock.now()
        if self.decrease >= 1 or sum(self._signals) < self.votes or now - self._last_decrease < (self._latency or 0):
            return
        self._last_decrease = now
        self._slow_start = False
        self._signals.clear()
        in_flight = self.limiter.borrowed_tokens
        self._limit = max(float(self.minimum), min(self._limit, float(in_flight or self._limit)) * self.decrease)
        self.decreases += 1
        self._apply()


class CircuitBreaker:
    """Stops calling a failing server, then probes it with one call.

    After ``threshold`` consecutive failures the circuit opens: calls wait out the cooldown, then one goes as the
    probe while the others wait for its outcome. A successful probe closes the circuit; a failed one reopens it
    for twice the cooldown (at most ``max_cooldown``) and each call that waited for it fails with
    :class:`~polytask.CircuitOpenError` (one attempt of its retry policy), so a dead server fails every call after
    about ``attempts`` cooldowns instead of holding them one probe at a time.

    Args:
        threshold: consecutive failures that open the circuit (default 10).
        cooldown: seconds the circuit stays open the first time (default 2).
        max_cooldown: the longest it stays open, seconds (default 60).
        clock: time source.
    """

    def __init__(
        self, threshold: int = 10, cooldown: float = 2.0, max_cooldown: float = 60.0, clock: Clock | None = None
    ) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.clock: Clock = clock or MonotonicClock()
        self.state = "closed"
        self.failures = 0
        self.opened = 0
        self._cooldown = cooldown
        self._last_cooldown = cooldown
        self._last_error = "unknown"
        self._down_since: float | None = None  # when the circuit opened after being closed
        self._next_report = 600.0  # seconds of outage at which a failed probe is logged again
        self._open_until = 0.0
        self._probe_done = anyio.Event()
        self._probing = False
        self._probes = 0

    async def wait(self) -> int:
        """Return when a call may go out: at once while closed; after the cooldown, one probe at a time.

        Returns:
            0, or a probe number when this call is the probe: its caller passes that number to :meth:`on_failure`
            / :meth:`on_other` (only the probe's own verdict reopens the circuit or lets the next call probe) and
            calls :meth:`on_other` with it on any other ending (cancelled, failed before it reached the server).

        Raises:
            CircuitOpenError: a probe failed while this call waited.
        """
        opened = self.opened
        while self.state != "closed":
            if self.opened != opened:  # a probe failed while this call waited: it fails now instead of queueing
                raise CircuitOpenError(  # behind the next probes (a dead server would hold every call for hours)
                    f"the server failed {self.failures} calls in a row and the probe after a {self._last_cooldown:g} s"
                    f" cooldown (last: {self._last_error})"
                )
            if self.state == "open":
                remaining = self._open_until - self.clock.now()
                if remaining > 0:
                    await self.clock.sleep(remaining)
                    continue
                self.state = "half-open"
            if not self._probing:
                self._probing = True
                self._probe_done = anyio.Event()
                self._probes += 1
                return self._probes
            await self._probe_done.wait()
        return 0

    def on_success(self) -> None:
        """A call succeeded (any call: the server answers): close the circuit."""
        if self.state != "closed":
            logger.warning("circuit closed: the server answers again")
        self._down_since = None
        self.failures = 0
        self._cooldown = self.base_cooldown
        self.state = "closed"
        self._end_probe()

    def on_failure(self, error: BaseException | None = None, probe: int = 0) -> None:
        """A call failed in a way that says the server is unwell (5xx, timeout, connection error): ``error``;
        ``probe``: the number :meth:`wait` gave it (0 for a call that was not the probe). While half-open, only the
        probe's failure reopens the circuit: calls sent before it opened say nothing about the server now."""
        self.failures += 1
        if error is not None:
            self._last_error = f"{type(error).__name__}: {error}"
        reopen = self.state == "half-open" and self._is_probe(probe)
        if reopen or (self.state == "closed" and self.failures >= self.threshold):
            self._last_cooldown = self._cooldown
            if reopen:
                self._cooldown = min(self.max_cooldown, self._cooldown * 2)
            if self._down_since is None:
                self._down_since = self.clock.now()
            self.state = "open"
            self.opened += 1
            self._open_until = self.clock.now() + self._cooldown
            self._end_probe()
            down = self.outage()
            if not reopen or self._cooldown != self._last_cooldown or down >= self._next_report:
                # the one sign a dead server gives before calls fail: on opening, while the cooldown grows, then
                # once every 10 minutes
                self._next_report = (down // 600 + 1) * 600
                logger.warning(
                    "circuit open: %s; calls wait %g s, then one probe (last: %s)",
                    f"the probe failed, {down:.0f} s after it opened"
                    if reopen
                    else f"the server failed {self.failures} calls in a row",
                    self._cooldown,
                    self._last_error,
                )

    def outage(self) -> float:
        """Seconds since the circuit opened with no call succeeding since (0 while closed)."""
        return 0.0 if self._down_since is None else self.clock.now() - self._down_since

    @property
    def last_error(self) -> str:
        """The last failure it was told of, as ``"Type: message"``."""
        return self._last_error

    def on_other(self, probe: int = 0) -> None:
        """A call ended in a way that says nothing about the server's health (cancelled, a 429, a bad answer);
        when it was the probe (``probe`` as :meth:`wait` gave it), the next call probes."""
        if self._is_probe(probe):
            self._end_probe()

    def _is_probe(self, probe: int) -> bool:
        return bool(probe) and probe == self._probes and self._probing

    def _end_probe(self) -> None:
        if self._probing:
            self._probing = False
            self._probe_done.set()
