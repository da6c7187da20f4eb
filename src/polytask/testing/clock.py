"""A virtual clock for tests: ``sleep`` advances time at once instead of waiting."""

from __future__ import annotations

import anyio.lowlevel

__all__ = ["FakeClock"]


class FakeClock:
    """Implements :class:`polytask.limits.Clock` in virtual time.

    ``now()`` returns the virtual time in seconds; ``sleep(s)`` advances it by ``s`` and yields to the event loop
    once, so code that waits on rate limits or backoff runs instantly and deterministically. ``sleeps`` records
    every requested wait, in seconds.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.time = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` without sleeping."""
        self.time += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.time += max(0.0, seconds)
        await anyio.lowlevel.checkpoint()
