"""What a running ``polytask run`` shows: a live bar on a terminal; off one (cron, ``nohup``, a CI log, a pipe) a
plain line every ``every`` seconds — documents done / total, rate, ETA, tokens, 429s, errors — so a long job is
never silent."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

import anyio
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..costs import format_usd
from ..orchestrator import RunStats
from ._exits import err

__all__ = ["Reporter", "compact", "duration", "status"]


def status(stats: RunStats, elapsed: float) -> str:
    """The run's counters in one line: request rate, tokens, dollars (when prices are known), 429s, retries, failed
    pairs."""
    rate = stats.requests / elapsed if elapsed > 0 else 0.0
    cost = f" · {format_usd(stats.cost)}" if stats.prices is not None else ""  # never $0 for unknown prices
    return (
        f"{rate:.1f} req/s · {stats.prompt_tokens + stats.completion_tokens:,} tok{cost} · "
        f"429s {stats.rate_limited} · retries {stats.retries} · errors {stats.pairs_failed}"
    )


def compact(stats: RunStats, elapsed: float) -> str:
    """The bar's counters, short enough for an 80-column terminal: pairs answered (they move while a long document
    is still running), request rate, dollars when known, 429s, failed pairs."""
    rate = stats.requests / elapsed if elapsed > 0 else 0.0
    cost = f" {format_usd(stats.cost)}" if stats.prices is not None else ""
    return f"{stats.pairs_done:,} pairs {rate:.0f}/s{cost} 429s {stats.rate_limited} err {stats.pairs_failed}"


def duration(seconds: float) -> str:
    """``3h02m``, ``4m05s``, ``12s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Reporter:
    """Shows the progress of a run: a bar (``bar``: stderr is a terminal) or a log line every ``every`` seconds
    (None: none), counting ``done_before`` documents finished by an earlier run as done.

    ``update(done)`` after each written document; ``await watch()`` (in the run's task group) logs a line even when
    no document finishes for a while (a long Retry-After, a slow server)."""

    def __init__(
        self,
        stats: RunStats,
        total: int | None,
        done_before: int = 0,
        *,
        bar: bool,
        every: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats, self.total, self.done_before, self.every, self.clock = stats, total, done_before, every, clock
        self.started = self.last = clock()
        self.done = 0
        self.bar = Progress(
            TextColumn("[bold]docs"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[line]}"),
            TimeRemainingColumn(),
            console=err,
            disable=not bar,
            transient=False,
        )
        self.task = self.bar.add_task("run", total=total, line="")
        self.shows_bar = bar

    def __enter__(self) -> Reporter:
        self.bar.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.bar.__exit__(kind, error, tb)

    def update(self, done: int, *, log: bool = True) -> None:
        """``done``: documents written by this run so far; ``log``: a line if one is due."""
        self.done = done
        now = self.clock()
        self.refresh(now)
        if log and self.every is not None and now - self.last >= self.every:
            self.log()

    def refresh(self, now: float | None = None) -> None:
        """Redraw the bar (a no-op off a terminal)."""
        now = self.clock() if now is None else now
        line = compact(self.stats, now - self.started)
        self.bar.update(self.task, completed=self.done_before + self.done, line=line)

    def log(self) -> None:
        now = self.clock()
        self.last = now
        elapsed = now - self.started
        done = self.done_before + self.done
        if self.total:
            share = f"{done:,} / {self.total:,} documents ({100 * done / self.total:.1f}%)"
            left = self.total - done
            eta = f" · ETA {duration(left * elapsed / self.done)}" if self.done and left > 0 else ""
        else:
            share, eta = f"{done:,} documents", ""
        err.print(f"progress: {share} · {escape(status(self.stats, elapsed))}{eta}", soft_wrap=True, highlight=False)

    async def watch(self) -> None:
        """Redraw the bar twice a second (pairs move while documents run), or log a line whenever ``every`` seconds
        pass without one (runs until cancelled)."""
        if self.shows_bar:
            while True:
                await anyio.sleep(0.5)
                self.refresh()
        if not self.every:  # None: no lines; 0: a line per document, from update()
            return
        while True:
            await anyio.sleep(max(0.0, self.last + self.every - self.clock()) or self.every)
            if self.clock() - self.last >= self.every:
                self.log()
