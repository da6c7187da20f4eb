"""Agent calls: what one ``orch.process(text)`` costs, alone and 1,000 at once, beside one ``run`` of the same work.

Workload: a ``FunctionBackend`` that answers at once (no network, so the figures are polytask's own overhead),
the sentiment task, documents of one or two sentences, one orchestrator per ``max_concurrency`` setting. Prints, per
setting: milliseconds per sequential ``process()`` (two sentences), seconds for 1,000 concurrent ``process()`` calls
(one sentence each), and seconds for one ``run()`` of those 1,000 documents.

    PYTHONPATH=src python benchmarks/agent_calls.py
    PYTHONPATH=src python benchmarks/agent_calls.py --compare /tmp/old/src   # beside another checkout, one run

``--compare`` runs the same measurement under another checkout's ``src`` in a subprocess, then this one, one after
the other, and prints the ratios (e.g. ``git worktree add /tmp/old <commit>``). Figures in BENCHMARKS.md.

``--turns 100`` measures agent turns instead: 100 concurrent turns, each analysing one short document (sentiment
and entities) with ``pt.analyze`` against the simulator (latency 0.1 s) under an RPM limit it enforces over 1 s
(``--rpm 3000``: 50 at once, then 50 a second), side by side: one shared orchestrator for every turn (told the
RPM and the window) against each turn building its own (told the same, so each thinks the whole limit is its own).
Prints per contender the 429s the server sent, p50 / p99 seconds per turn, and the wall time::

    PYTHONPATH=src python benchmarks/agent_calls.py --turns 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import anyio

SETTINGS = (8, 64, 1000)


def measure(n: int) -> dict[str, dict[str, float]]:
    import polytask as pt

    def answer(request: object) -> dict[str, object]:
        return {"label": "neutral", "score": 0.0}

    async def main() -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for mc in SETTINGS:
            async with pt.Orchestrator(pt.FunctionBackend(answer), [pt.Sentiment()], max_concurrency=mc) as orch:
                await orch.process("Warm up.")
                t = time.perf_counter()
                for _ in range(50):
                    await orch.process("One sentence. Two sentences.")
                one = (time.perf_counter() - t) / 50
                t = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(orch.process, f"Document {i}.")
                many = time.perf_counter() - t
                t = time.perf_counter()
                await orch.run([f"Document {i}." for i in range(n)])
                batch = time.perf_counter() - t
            out[str(mc)] = {"process_ms": one * 1e3, "concurrent_s": many, "run_s": batch}
        return out

    return anyio.run(main)


def turns(n: int, rpm: float) -> list[list[object]]:
    """``n`` concurrent agent turns through ``pt.analyze``: shared orchestrator vs one per turn (see the module doc)."""
    import statistics

    import polytask as pt
    from polytask.testing import Simulator, SimulatorConfig

    texts = [f"Agent turn {i}: Ada Lovelace wrote to Babbage from London." for i in range(n)]

    async def contender(shared: bool) -> list[object]:
        config = SimulatorConfig(rpm=rpm, rpm_window=1, latency=0.1, seed=1)
        async with Simulator(config) as sim:

            def backend() -> pt.OpenAIBackend:
                return pt.OpenAIBackend("sim-model", base_url=sim.base_url, api_key="sk-bench", rpm=rpm)

            orch = pt.Orchestrator(backend(), [pt.Sentiment(), pt.Entities()], rate_window=1) if shared else None
            times: list[float] = []
            failed = 0

            async def turn(text: str) -> None:
                nonlocal failed
                t = time.perf_counter()
                if orch is not None:
                    result = await pt.analyze(text, orchestrator=orch)
                else:
                    async with pt.Orchestrator(backend(), [pt.Sentiment(), pt.Entities()], rate_window=1) as own:
                        result = await pt.analyze(text, orchestrator=own)
                times.append(time.perf_counter() - t)
                failed += result.partial

            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for text in texts:
                    tg.start_soon(turn, text)
            wall = time.perf_counter() - started
            if orch is not None:
                await orch.aclose()
            limited = sim.stats.outcomes.get("rate_limited", 0)
        p99 = statistics.quantiles(times, n=100)[98] if len(times) > 1 else times[0]
        label = "one shared orchestrator" if shared else "an orchestrator per turn"
        return [label, n, failed, limited, statistics.median(times), p99, wall]

    async def both() -> list[list[object]]:
        return [await contender(True), await contender(False)]

    return anyio.run(both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="concurrent process() calls")
    parser.add_argument("--turns", type=int, default=0, help="measure this many concurrent agent turns instead")
    parser.add_argument("--rpm", type=float, default=3000, help="the simulator's RPM (--turns), enforced over 1 s")
    parser.add_argument("--compare", help="another checkout's src folder, measured first in a subprocess")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.turns:
        rows = turns(args.turns, args.rpm)
        print(f"{args.turns} agent turns, 2 calls each, server RPM {args.rpm:g} over 1 s, latency 0.1 s")
        print(f"{'contender':<26} {'turns':>5} {'partial':>7} {'429s':>5} {'p50 s':>6} {'p99 s':>6} {'wall s':>6}")
        for label, n, failed, limited, p50, p99, wall in rows:
            print(f"{label:<26} {n:>5} {failed:>7} {limited:>5} {p50:>6.2f} {p99:>6.2f} {wall:>6.2f}")
        return
    if args.json:
        print(json.dumps(measure(args.calls)))
        return
    runs: list[tuple[str, dict[str, dict[str, float]]]] = []
    if args.compare:
        env = {**os.environ, "PYTHONPATH": args.compare}
        cmd = [sys.executable, __file__, "--json", "--calls", str(args.calls)]
        done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        runs.append((f"compare ({args.compare})", json.loads(done.stdout.splitlines()[-1])))
    runs.append(("this checkout", measure(args.calls)))
    print(f"{'checkout':<34} {'max_concurrency':>15} {'process() ms':>13} {args.calls} concurrent s {'run() s':>8}")
    for name, figures in runs:
        for mc, f in figures.items():
            print(f"{name:<34} {mc:>15} {f['process_ms']:>13.2f} {f['concurrent_s']:>17.2f} {f['run_s']:>8.2f}")
    if len(runs) == 2:
        (_, old), (_, new) = runs
        for mc in old:
            a, b = old[mc], new[mc]
            print(
                f"max_concurrency {mc}: process() {a['process_ms'] / b['process_ms']:.1f}x faster, "
                f"{args.calls} concurrent {a['concurrent_s'] / b['concurrent_s']:.1f}x faster"
            )


if __name__ == "__main__":
    main()
