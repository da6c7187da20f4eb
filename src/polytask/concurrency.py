"""How many calls may be in flight: adaptive concurrency (AIMD and queueing latency) and a circuit breaker.

:class:`AdaptiveConcurrency` is additive-increase / multiplicative-decrease, TCP's congestion control (Jacobson,
"Congestion Avoidance and Control", SIGCOMM 1988): each success adds ``1 / limit`` (about one more call per round of
calls); overload signals (a 503, a 429 the known limits do not explain, a timeout) shrink it multiplicatively, at most
once per round trip so one burst of failures counts once. A server that queues calls instead of refusing them (a
local llama.cpp or Ollama working on N requests at a time) is found from latency alone, as TCP Vegas finds a queue
in the network: see the class.

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
    """A concurrency limit that shrinks on overload or on queueing latency, and grows back.

    **Overload signals** (AIMD) are counted over the last ``window`` calls; the limit shrinks when ``votes`` of them
    were overload signals, at most once per smoothed round trip, so a few random 503s in a healthy run change nothing.
    It shrinks to ``decrease`` × the calls in flight at that moment (or × the limit, if fewer are in flight): a
    server that refuses calls past a hidden cap N answers 503 when about N + 1 are in flight, so one step lands near
    N instead of halving down from a far larger limit. The answers to calls sent before a decrease do not grow the
    limit back: they tell of the old limit, not the new one.

    **Queueing latency.** A server that works on N calls at a time and queues the rest (a local llama.cpp or Ollama)
    answers each of ``L`` calls in flight after about ``L / N`` service times: its answers a second stop growing at N
    while the latency grows with ``L``, and it never says so with a 429 or a 503. This is TCP Vegas's view (Brakmo &
    Peterson, "TCP Vegas: End to End Congestion Avoidance on a Global Internet", IEEE JSAC 1995: the calls queued are
    ``L × (1 − base latency / latency)``; keep them few), with the limit set by Little's law as BBR sets its window
    (Cardwell et al., "BBR: Congestion-Based Congestion Control", ACM Queue 2016: answers a second × the no-queue
    latency). Netflix's concurrency-limits library (its Vegas and Gradient2 limits) applies the same ideas to services.
    Answers are judged in rounds, leaving out the calls sent before the last decrease and the first round trip after
    it (the first answers back are the fast ones):

    - *During slow start* (rounds of ``limit`` answers: one round trip, while the limit doubles), a round is
      saturated when it brought under 1.25 × the best answers a second so far while its median latency grew by half
      (BBR's full-pipe test). Two saturated rounds in a row, or one whose fastest answer was slower than the last
      round's median (the whole spread moved up, as a queue moves it; a heavy tail leaves fast answers in every
      round), drop the limit to answers a second × the fastest answer (the run's first answers came from an idle
      server).
    - *After slow start* (rounds of at least ``round_samples`` answers, judged by their median, which a heavy tail
      does not move), the no-queue baseline is the lower quartile of the round medians since the last probe (at most
      40). One round with a median at ``tolerance`` × the baseline or more (and over it by ``min_queue_delay``) holds
      growth; two in a row drop the limit to answers a second × the fastest answer since the last probe.
    - Each such drop is a *probe*, held for one round: if the latency fell with the limit (by √``tolerance`` from the
      round that set it off), the queue was ours: the limit becomes answers a second × the probe's median (the calls
      the server works on at once) and the baseline starts over from it. If it did not, the server got slower for
      everyone: the limit goes back to where it was (slow start included) and the baseline starts over from the
      probe, so a lasting change is learned instead of chased.
    - A run without slow start (``maximum`` ≤ ``initial``) opened with all its calls at once: if its first round's
      median is over ``tolerance``² × its very first answer, the limit is halved for a round, and again while the
      latency halves with it.

        Args:
        maximum: the most calls in flight (the configured ``max_concurrency``).
        minimum: the fewest (default 1).
        decrease: factor applied on overload, in (0, 1]; 1 turns adaptation off, latency included (default 0.9).
        tolerance: a round median over this many times the baseline counts as queueing (default 2: 2 × the
            server's parallel slots in flight at most; lognormal latency noise with sigma up to 1 stays under it);
            None ignores latency.
        min_queue_delay: seconds a round median must also be over the baseline (and over the last round's, in slow
            start) for queueing (default 0.01): below that, latency is the client's own scheduling.
        round_samples: the fewest answers a round is judged on after slow start (default 32).
        window, votes: overload signals needed among the last ``window`` calls (default 3 of 20).
        initial: the limit to start from (default 8): it grows by one per success, doubling every round trip
            (TCP's slow start), until the first overload signal, saturation or ``maximum``; after that, by one per
            round of answers. A run against a server with an unknown capacity then does not open with a burst of
            ``maximum`` calls.
        clock: time source, seconds (a success's latency must be on the same scale: it dates when the call was sent).

    Attributes:
        limiter: the ``anyio.CapacityLimiter`` to hold while a call is in flight.
        decreases: how many times the limit shrank (overload and latency).
        latency_decreases: how many of them were for queueing latency (probes).
    """

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        decrease: float = 0.9,
        tolerance: float | None = 2.0,
        min_queue_delay: float = 0.01,
        round_samples: int = 32,
        window: int = 20,
        votes: int = 3,
        initial: int = 8,
        clock: Clock | None = None,
    ) -> None:
        self.maximum = maximum
        self.minimum = max(1, min(minimum, maximum))
        self.decrease = decrease
        self.tolerance = tolerance if decrease < 1 else None
        self.min_queue_delay = min_queue_delay
        self.round_samples = round_samples
        self.votes = votes
        self.clock: Clock = clock or MonotonicClock()
        self._slow_start = decrease < 1 and initial < maximum
        self._opened_full = not self._slow_start  # no slow start: the first round trip had all ``maximum`` calls
        self._limit = float(min(maximum, initial) if self._slow_start else maximum)
        self.limiter = anyio.CapacityLimiter(int(self._limit))
        self._signals: deque[bool] = deque(maxlen=window)
        self._last_decrease = -math.inf
        self._latency: float | None = None  # smoothed (EWMA, alpha 0.1) latency, seconds
        self.decreases = 0
        self.latency_decreases = 0
        # latency rounds
        self._cut = -math.inf  # clock time of the last decrease: calls sent before say nothing of the new limit
        self._skip = 0 if self._slow_start else int(self._limit)  # answers to leave out (a first round trip)
        self._round: list[float] = []  # latencies of the round in progress, seconds
        self._round_size = int(self._limit)  # answers in the round in progress
        self._round_start: float | None = None  # clock time it began (the last round's end), seconds
        self._fastest = math.inf  # the fastest answer judged since the last probe, seconds
        self._medians: deque[float] = deque(maxlen=40)  # round median latencies since the last probe, seconds
        self._queued = 0  # rounds in a row that looked queued
        self._round_fastest = math.inf  # the last round's fastest answer, seconds
        self._first = math.inf  # the first answer's latency, seconds
        # slow start: the best answers a second, the last round's median, rounds in a row that looked saturated
        self._start: tuple[float, float, int] = (0.0, math.inf, 0)
        # during a probe: the median that set it off, the answers a second then, the limit before, in slow start?,
        # halving?
        self._probe: tuple[float, float, float, bool, bool] | None = None

    @property
    def limit(self) -> int:
        """The current limit on calls in flight."""
        return int(self._limit)

    def baseline(self) -> float | None:
        """The latency with no queue, seconds: the lower quartile of the round medians since the last probe (None
        before a round after slow start)."""
        if not self._medians:
            return None
        ordered = sorted(self._medians)
        return ordered[(len(ordered) - 1) // 4]

    def _set(self, limit: float) -> None:
        self._limit = min(float(self.maximum), max(float(self.minimum), limit))
        self.limiter.total_tokens = max(self.minimum, int(self._limit))

    def on_success(self, latency: float) -> None:
        """A call succeeded after ``latency`` seconds (0: not measured)."""
        self._latency = latency if self._latency is None else 0.9 * self._latency + 0.1 * latency
        self._signals.append(False)
        now = self.clock.now()
        if now - latency < self._cut:
            return  # sent before the last decrease: neither its latency nor its success speaks for the new limit
        if self.tolerance and latency > 0:
            self._observe(latency, now)
        if self._queued or self._probe is not None:
            return  # the server looks queued, or a probe runs at a fixed limit: no growth
        if self._limit < self.maximum:
            step = 1.0 if self._slow_start else 1.0 / max(self._limit, self.round_samples)
            self._set(self._limit + step)

    def _observe(self, latency: float, now: float) -> None:
        """Add one latency to the round; judge the round once it is complete."""
        if self._round_start is None:
            self._round_start = now - latency  # the first round: since the first call went out
            self._first = latency  # the first answer of all came from an idle server
        if self._skip:
            self._skip -= 1
            self._round_start = now
            return
        self._round.append(latency)
        if len(self._round) < self._round_size:
            return
        ordered = sorted(self._round)
        median = ordered[len(ordered) // 2]
        self._round_fastest = ordered[0]
        self._fastest = min(self._fastest, ordered[0])
        rate = len(ordered) / (now - self._round_start) if now > self._round_start else math.inf  # answers a second
        self._round = []
        self._round_start = now
        if self._probe is not None:
            self._end_probe(median)
        elif self._slow_start:
            self._judge_start(median, rate, now)
        else:
            self._judge(median, rate, now)
        if self._probe is None:
            size = int(self._limit)
            self._round_size = size if self._slow_start else max(size, self.round_samples)

    def _judge_start(self, median: float, rate: float, now: float) -> None:
        """A slow-start round: two in a row that look saturated (or one whose answers were all slow) drop the limit
        to answers a second × the fastest answer (the first answers came from an idle server)."""
        best, last, saturated = self._start
        grew = rate >= 1.25 * best or median < 1.5 * last or median - last <= self.min_queue_delay
        saturated = 0 if grew else saturated + 1
        self._start = (max(best, rate), median, saturated)
        # one such round is enough when even its fastest answer was slower than the last round's median: the whole
        # spread moved up, as a queue moves it (a heavy tail leaves fast answers in every round)
        if saturated >= 2 or (saturated and self._round_fastest > last):
            self._start_probe(median, best, best * self._fastest, now)
        elif self._limit >= self.maximum:
            self._slow_start = False
            self._skip = int(self._limit)  # the first round trip at the maximum

    def _judge(self, median: float, rate: float, now: float) -> None:
        """A round after slow start: two in a row at ``tolerance`` × the baseline or more drop the limit to answers a
        second × the fastest answer since the last probe."""
        assert self.tolerance is not None
        base = self.baseline()
        self._medians.append(median)
        if base is None:
            if self._opened_full and median > self.tolerance**2 * self._first + self.min_queue_delay:
                # the run opened with all its calls at once (no slow start) and is far slower than its first answer:
                # the server may queue them; halve the limit while that halves the latency
                self._start_probe(median, rate, self._limit / 2, now, halving=True)
            return
        queued = median >= self.tolerance * base and median - base > self.min_queue_delay
        self._queued = self._queued + 1 if queued else 0
        if self._queued >= 2:
            self._queued = 0
            self._start_probe(median, rate, rate * self._fastest, now)

    def _start_probe(self, median: float, rate: float, target: float, now: float, halving: bool = False) -> None:
        """Drop the limit to ``target`` for one round (the probe); ``median`` and ``rate`` are the round's that set
        it off. A ``halving`` probe that finds the latency halved halves again."""
        if not math.isfinite(target):
            return  # no time passed over the round (a fake clock): no rate to size the limit by
        target = max(float(self.minimum), float(round(target)))
        if target >= self._limit:
            return
        self._probe = (median, rate, self._limit, self._slow_start, halving)
        self._slow_start = False
        self.latency_decreases += 1
        self._shrink(target, now)
        self._round_size = max(int(self._limit), 8)

    def _end_probe(self, median: float) -> None:
        """The probe round is over: the latency fell with the limit (the queue was ours: keep a limit by Little's
        law) or it did not (the server got slower: back to the limit before)."""
        assert self._probe is not None and self.tolerance is not None
        trigger, rate, before, slow_start, halving = self._probe
        self._probe = None
        self._medians.clear()
        self._medians.append(median)  # the probe saw the server without our queue: the baseline starts over
        self._fastest = self._round_fastest
        if median * math.sqrt(self.tolerance) > trigger:
            self._set(before)
            if slow_start:
                self._slow_start = True
                self._start = (0.0, math.inf, 0)
        elif halving:
            self._start_probe(median, rate, self._limit / 2, self.clock.now(), halving=True)
        else:
            self._set(max(self._limit, float(round(rate * median))))

    def _shrink(self, limit: float, now: float) -> None:
        self._last_decrease = self._cut = now
        self._round = []
        self._round_start = now
        self.decreases += 1
        self._set(limit)
        self._skip = int(self._limit)

    def on_overload(self) -> None:
        """The server signalled overload (a 503, a timeout, a 429 no known limit explains)."""
        self._signals.append(True)
        now = self.clock.now()
        if self.decrease >= 1 or sum(self._signals) < self.votes or now - self._last_decrease < (self._latency or 0):
            return
        self._slow_start = False
        self._signals.clear()
        self._probe = None
        self._queued = 0
        in_flight = self.limiter.borrowed_tokens
        self._shrink(max(float(self.minimum), min(self._limit, float(in_flight or self._limit)) * self.decrease), now)
        self._round_size = max(int(self._limit), self.round_samples)


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
