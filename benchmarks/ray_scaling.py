"""Ray workers on one shared limit: throughput with 1, 2, 4 workers, and what the shared limit costs a call.

Workload: ``--docs`` one-sentence documents × sentiment against the simulator in its own process (latency
``--latency`` s, no limits: the limiter never makes a call wait, so what is measured is the work, not a limit), run by
``pt.RayOrchestrator`` on a local Ray cluster of this machine's CPUs with 1, 2 and 4 workers (batches of 50
documents, 32 calls in flight per worker), the limit held in Redis (``RedisRateLimiter``, a generous RPM / TPM) or
by a Ray actor. Then, in this process: the seconds one ``RedisRateLimiter.acquire`` takes when nothing waits (one
round trip to a loopback Redis), beside the call's latency.

This machine has 2 cores (simulator, Redis, Ray's raylet and the workers share them), so the scaling is bound here;
the figures say where the time goes, not what a cluster does.

    python benchmarks/ray_scaling.py --docs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import SimProcess, print_table
from shared_limit import redis_server

import polytask as pt


async def scaled(base_url: str, docs: int, workers: int, redis: str | None) -> dict[str, Any]:
    factory = functools.partial(pt.OpenAIBackend, "sim-model", base_url=base_url, api_key="sk-bench")
    shared = {"limiter_url": redis, "limiter_key": f"bench-{workers}"} if redis else {}
    texts = [f"Document {i} says the service was fine." for i in range(docs)]
    started = time.perf_counter()
    async with pt.RayOrchestrator(
        factory, [pt.Sentiment()], workers=workers, batch_size=50, rpm=1e6, tpm=1e9, max_concurrency=32, **shared
    ) as orch:
        results = await orch.run(texts)
    wall = time.perf_counter() - started
    return {"ok": sum(not r.partial for r in results), "wall_s": wall}


async def round_trip(url: str, n: int) -> float:
    limiter = pt.RedisRateLimiter(url, key="bench-rtt", rpm=1e6, tpm=1e9)
    await limiter.acquire(10)  # the connection and the script loaded
    started = time.perf_counter()
    for _ in range(n):
        await limiter.acquire(10)
    seconds = (time.perf_counter() - started) / n
    await limiter.aclose()
    return seconds


def main(argv: list[str] | None = None) -> list[list[Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args(argv)
    import ray

    server, url = redis_server()
    rows: list[list[Any]] = []
    try:
        ray.init(include_dashboard=False, log_to_driver=False)
        with SimProcess({"latency": args.latency, "seed": 0}) as sim:
            base: float | None = None
            for holder in ("redis", "actor"):
                for workers in (int(w) for w in args.workers.split(",")):
                    r = asyncio.run(scaled(sim.base_url, args.docs, workers, url if holder == "redis" else None))
                    rate = r["ok"] / r["wall_s"]
                    base = base or rate
                    rows.append([f"{holder}, {workers} worker(s)", r["ok"], r["wall_s"], rate, rate / base])
        rtt = asyncio.run(round_trip(url, 2000))
    finally:
        ray.shutdown()
        server.kill()
    print_table(
        f"{args.docs} documents × sentiment, simulator latency {args.latency} s, no limit reached",
        ["limit held by, workers", "ok", "wall s", "documents/s", "vs redis, 1 worker"],
        rows,
    )
    print(
        f"RedisRateLimiter.acquire with nothing to wait for: {rtt * 1e3:.3f} ms a call (loopback Redis), "
        f"{rtt / args.latency:.1%} of a {args.latency * 1e3:.0f} ms call; median of the table's rates "
        f"{statistics.median(r[3] for r in rows):.0f} documents/s"
    )
    return rows


if __name__ == "__main__":
    main()
