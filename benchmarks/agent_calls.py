"""Agent calls: what one ``orch.process(text)`` costs, alone and 1,000 at once, beside one ``run`` of the same work.

Workload: a ``FunctionBackend`` that answers at once (no network, so the figures are polytask's own overhead),
the sentiment task, documents of one or two sentences, one orchestrator per ``max_concurrency`` setting. Prints, per
setting: milliseconds per sequential ``process()`` (two sentences), seconds for 1,000 concurrent ``process()`` calls
(one sentence each), and seconds for one ``run()`` of those 1,000 documents.

    PYTHONPATH=src python benchmarks/agent_calls.py
    PYTHONPATH=src python benchmarks/agent_calls.py --compare /tmp/old/src   # beside another checkout, one run

``--compare`` runs the same measurement under another checkout's ``src`` in a subprocess, then this one, one after
the other, and prints the ratios (e.g. ``git worktree add /tmp/old <commit>``). Figures in BENCHMARKS.md.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="concurrent process() calls")
    parser.add_argument("--compare", help="another checkout's src folder, measured first in a subprocess")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
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
