"""One 429 pause, many waiters: are there 429s after it? And a short-window RPM: is the first burst refused?

Every scenario runs polytask (``Orchestrator``, one Sentiment call per one-sentence document, 64 calls in flight)
against a fresh in-process simulator and counts the 429s the server sent, split at the end of the first pause
(the first 429's arrival + the wait it asked): "first wave" are the calls already on their way when the first 429
came back (no client can call those back), "after the pause" are the ones a client sent into a server that had just
said wait — the second wave this benchmark is about (target 0 where the limit is known or learned).

    known limit            another client on the key has just spent the server's minute (its RPM bucket is
                           empty); polytask is told the RPM (``rpm=``)
    learned (headers)      the same, polytask told nothing: it learns the RPM from ``x-ratelimit-*`` headers
    learned (message)      the same, the server sends no rate-limit headers: the wait and the limit are only in the
                           429's message ("Limit 1200 … Please try again in 50ms")
    short window, told     a fresh server enforcing its RPM over 1 s (Azure OpenAI's way), polytask told the RPM
                           without the window: a full minute's burst at start
    short window, window=1 the same, told ``rate_window=1``
    short window, learned  the same, the server announces ``RateLimit-Policy: 20;w=1``; polytask told the RPM only

The naive row is what a client without a limiter does: ``asyncio.Semaphore(64)`` around aiohttp, sleeping the
Retry-After of each 429 it meets and trying again (each call on its own, as the OpenAI SDK's retries do).

Example::

    python benchmarks/pause_wave.py --calls 300 --rpm 1200
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import print_table

import polytask as pt
from polytask._prompts import build_messages
from polytask.testing import Simulator, SimulatorConfig


class Recorder:
    """The server's rate-limit decisions, with their arrival times and the waits they asked."""

    def __init__(self, sim: Simulator) -> None:
        self.refused: list[tuple[float, float]] = []  # (arrival, retry_after)
        check = sim.limiter.check

        def recorded(tokens: int, model: str) -> Any:
            decision = check(tokens, model)
            if not decision.allowed:
                self.refused.append((time.monotonic(), decision.retry_after))
            return decision

        sim.limiter.check = recorded  # type: ignore[method-assign]

    def waves(self) -> tuple[int, int]:
        """429s (before the first pause ended, after it)."""
        if not self.refused:
            return 0, 0
        first, wait = self.refused[0]
        end = first + wait
        before = sum(1 for at, _ in self.refused if at <= end)
        return before, len(self.refused) - before


def documents(calls: int) -> list[dict[str, str]]:
    return [{"id": f"d{i}", "text": f"Review number {i} says the service was fine."} for i in range(calls)]


async def polytask_run(base_url: str, calls: int, **orch: Any) -> dict[str, Any]:
    backend = pt.OpenAIBackend(model="sim-model", base_url=base_url, api_key="sk-bench")
    started = time.monotonic()
    async with pt.Orchestrator(backend, [pt.Sentiment()], max_concurrency=64, **orch) as o:
        results = await o.run(documents(calls))
    failed = sum(len(r.errors) for r in results)
    return {"wall_s": time.monotonic() - started, "failed": failed, "client_429s": o.stats.rate_limited}


async def naive_run(base_url: str, calls: int) -> dict[str, Any]:
    """Semaphore(64) + aiohttp, each call sleeping the Retry-After of its own 429s (at most 100 tries)."""
    gate = asyncio.Semaphore(64)
    task = pt.Sentiment()
    failed = 0

    async def one(session: aiohttp.ClientSession, doc: dict[str, str]) -> None:
        nonlocal failed
        body = {
            "model": "sim-model",
            "messages": build_messages(task, doc["text"]),
            "max_completion_tokens": 64,
        }
        async with gate:
            for _ in range(100):
                async with session.post(base_url + "/chat/completions", json=body) as response:
                    await response.read()
                    if response.status != 429:
                        return
                    await asyncio.sleep(float(response.headers.get("retry-after-ms", "1000")) / 1000)
            failed += 1

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, d) for d in documents(calls)))
    return {"wall_s": time.monotonic() - started, "failed": failed}


async def scenario(label: str, config: SimulatorConfig, calls: int, drained: bool, run: Any) -> list[Any]:
    async with Simulator(config) as sim:
        recorder = Recorder(sim)
        if drained:  # another client on the key spent the server's minute just now
            sim.limiter.requests.charge(sim.limiter.requests.capacity, time.monotonic())  # type: ignore[union-attr]
        assert sim.base_url is not None
        result = await run(sim.base_url, calls)
        first, after = recorder.waves()
        ok = sim.stats.outcomes.get("ok", 0)
    return [label, ok, result["failed"], first, after, result["wall_s"]]


async def main_async(args: argparse.Namespace) -> list[list[Any]]:
    rpm, calls = args.rpm, args.calls
    drained = SimulatorConfig(rpm=rpm, seed=1, latency=args.latency)
    silent = SimulatorConfig(rpm=rpm, seed=1, latency=args.latency, rate_limit_headers=False)
    short = SimulatorConfig(rpm=rpm, seed=1, latency=args.latency, rpm_window=1)
    announced = SimulatorConfig(rpm=rpm, seed=1, latency=args.latency, rpm_window=1, announce_window=True)

    def pt_run(**orch: Any) -> Any:
        return lambda url, n: polytask_run(url, n, **orch)

    told = {"rpm": rpm, "learn_limits": False, "adaptive_concurrency": False}  # 64 at once, no header learning
    plan = [
        ("known limit (rpm=, no learning)", drained, True, pt_run(**told)),
        ("learned (headers)", drained, True, pt_run()),
        ("learned (message only)", silent, True, pt_run()),
        ("naive (Retry-After per call)", drained, True, naive_run),
        ("short window 1 s, told rpm only", short, False, pt_run(**told)),
        ("short window 1 s, rate_window=1", short, False, pt_run(**told, rate_window=1)),
        ("short window 1 s, announced", announced, False, pt_run(**told)),
        ("short window 1 s, naive", short, False, naive_run),
    ]
    return [await scenario(label, config, calls, drain, run) for label, config, drain, run in plan]


def main(argv: list[str] | None = None) -> list[list[Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rpm", type=float, default=1200.0)
    parser.add_argument("--latency", type=float, default=0.2, help="the server's latency, seconds")
    args = parser.parse_args(argv)
    rows = asyncio.run(main_async(args))
    print_table(
        f"429 waves: {args.calls} calls, 64 in flight, server RPM {args.rpm:g}, latency {args.latency:g} s",
        ["scenario", "ok", "failed", "429s 1st wave", "429s after pause", "wall s"],
        rows,
    )
    return rows


if __name__ == "__main__":
    main()
