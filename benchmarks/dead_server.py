"""Time to fail: how long a run takes when the server answers every call with a 500 (or is down).

Workload: N documents of two sentences × two tasks (sentiment, entities) = 4 N calls, a ``FunctionBackend`` that
raises ``ServerError(500)`` at once, the default ``RetryPolicy`` (6 attempts) and the default circuit breaker
(threshold 10, cooldown 2 s doubling to 60 s), and the default ``max_outage`` (300 s) where the checkout has one.
Real time, scaled: every wait (backoff, jitter, cooldown, max_outage) is divided by ``--scale`` (default 100) and
the elapsed time multiplied back, so "seconds" below are what the same run takes at full scale. Prints, per N: the
full-scale seconds, the calls that reached the server, the documents that came out (a run stopped by
``max_outage`` raises ``ServerDownError`` after them) and the pairs' final errors.

    PYTHONPATH=src python benchmarks/dead_server.py --docs 1,10,50

Run it against two checkouts (e.g. ``git worktree add /tmp/old <commit>`` and ``PYTHONPATH=/tmp/old/src``) to
compare them; the figures are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import time
from collections import Counter

import anyio

import polytask as pt
import polytask.orchestrator as orchestrator_module
from polytask.concurrency import CircuitBreaker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default="1,10,50", help="comma-separated document counts")
    parser.add_argument("--scale", type=float, default=100.0, help="time compression factor")
    args = parser.parse_args()
    k = args.scale
    logging.getLogger("polytask").setLevel(logging.ERROR)  # the breaker's warnings, at 100× speed

    class ScaledBreaker(CircuitBreaker):
        def __init__(self, clock: object = None) -> None:
            super().__init__(cooldown=2.0 / k, max_cooldown=60.0 / k, clock=clock)  # type: ignore[arg-type]

    orchestrator_module.CircuitBreaker = ScaledBreaker  # type: ignore[attr-defined,assignment]
    defaults = pt.RetryPolicy()
    policy = pt.RetryPolicy(
        attempts=defaults.attempts,
        wait_initial=defaults.wait_initial / k,
        wait_max=defaults.wait_max / k,
        wait_jitter=defaults.wait_jitter / k,
    )

    def dead(request: pt.ChatRequest) -> pt.ChatResponse:
        raise pt.ServerError("down", status_code=500)

    # the default max_outage (300 s), scaled like every other wait, where the checkout has it
    options = {"max_outage": 300.0 / k} if "max_outage" in inspect.signature(pt.Orchestrator).parameters else {}

    async def run(n: int) -> None:
        backend = pt.FunctionBackend(dead)
        started = time.perf_counter()
        stopped = ""
        results: list[pt.DocumentResult] = []
        async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()], retry=policy, **options) as orch:
            try:
                async for result in orch.stream([f"Document {i}. It has two sentences." for i in range(n)]):
                    results.append(result)
            except pt.PolytaskError as error:  # ServerDownError: the run stopped
                stopped = f"  stopped: {type(error).__name__}"
        elapsed = (time.perf_counter() - started) * k
        errors = Counter(p.error.type for r in results for p in r.pairs if p.error)
        print(
            f"{n:>5} docs  {4 * n:>5} pairs  {elapsed:>9.0f} s at full scale  {backend.calls:>5} calls  "
            f"{len(results)} documents out{stopped}",
            dict(errors),
        )

    for n in (int(x) for x in args.docs.split(",")):
        anyio.run(run, n)


if __name__ == "__main__":
    main()
