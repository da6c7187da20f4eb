"""Overhead: calls per second through the whole polytask pipeline against raw HTTP loops and the openai SDK.

The simulator answers at once (no latency, no limits) in its own process on one core; each contender runs in its own
process on the other core and sends the same ``--calls`` chat-completions requests (Sentiment on short one-sentence
documents, strict ``json_schema``) with ``--concurrency`` in flight, after ``--warmup`` untimed calls. Contenders run
one after another, interleaved over ``--reps`` repetitions; the table shows medians.

    raw aiohttp            aiohttp.ClientSession posting JSON, json.loads (the ceiling)
    raw httpx2             httpx2.AsyncClient, the same loop
    polytask               Orchestrator(OpenAIBackend, [Sentiment()]): segmentation, limiter, retries, validation, merge
    AsyncOpenAI (httpx2)   the naive program: AsyncOpenAI + asyncio.gather + Semaphore, pydantic validation
    AsyncOpenAI (aiohttp)  the same with openai.DefaultAioHttpClient() (openai[aiohttp])
    completions.parse      the same with client.chat.completions.parse(response_format=SentimentAnswer)

CPU ms/call is the client process's ``time.process_time`` per call; "server busy" is the simulator's CPU time over
the run's wall time (near 100 %: the server, not the client, set the pace).

Example::

    python benchmarks/overhead.py --calls 2000 --reps 3 --json overhead.json

Targets (issue 4): polytask ≥ 0.6 × raw aiohttp and ≥ 4 × the naive AsyncOpenAI program.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import SimProcess, machine, median, print_table, run_one, write_json

CONTENDERS: dict[str, dict[str, Any]] = {
    "raw aiohttp": {"contender": "raw-aiohttp"},
    "raw httpx2": {"contender": "raw-httpx2"},
    "polytask": {"contender": "polytask"},
    "AsyncOpenAI (httpx2)": {"contender": "naive"},
    "AsyncOpenAI (aiohttp)": {"contender": "naive", "transport": "aiohttp"},
    "completions.parse": {"contender": "parse"},
}
KEYS = {"raw-aiohttp": "raw aiohttp", "naive": "AsyncOpenAI (httpx2)"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per contender and repetition")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (all contenders)")
    parser.add_argument("--warmup", type=int, default=100, help="untimed calls before each run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, interleaved (median reported)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated labels to run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    labels = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in labels if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    spec = {"workload": "short", "calls": args.calls, "concurrency": args.concurrency, "warmup": args.warmup}
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    with SimProcess({}) as sim:
        for rep in range(args.reps):
            for label in labels:
                cpu0 = sim.cpu_seconds()
                result = run_one({**spec, **CONTENDERS[label], "label": label}, sim.base_url, 60 + args.calls / 10)
                cpu1 = sim.cpu_seconds()
                result["rep"] = rep
                if "wall_s" in result:
                    result["server_busy"] = (cpu1 - cpu0) / result["wall_s"]
                runs.append(result)
                print(f"  rep {rep + 1}/{args.reps} {label}: " + _brief(result), file=sys.stderr, flush=True)
        sim_stats = sim.stats()

    summary: dict[str, dict[str, Any]] = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label and "error" not in r]
        errors = [r["error"] for r in runs if r["label"] == label and "error" in r]
        rates = [r["ok_per_s"] for r in mine]
        summary[label] = {
            "ok_per_s": median(rates),
            "ok_per_s_min": min(rates, default=None),
            "ok_per_s_max": max(rates, default=None),
            "cpu_ms_per_call": median([r["cpu_ms_per_call"] for r in mine]),
            "server_busy": median([r.get("server_busy", float("nan")) for r in mine]),
            "failed": sum(r["failed"] for r in mine),
            "errors": errors,
        }
    ratios: dict[str, float | None] = {}
    if "polytask" in summary:
        for key, other in (("polytask/raw_aiohttp", "raw aiohttp"), ("polytask/naive", "AsyncOpenAI (httpx2)")):
            if other in summary and summary[other]["ok_per_s"] == summary[other]["ok_per_s"]:
                ratios[key] = summary["polytask"]["ok_per_s"] / summary[other]["ok_per_s"]

    base = summary.get("raw aiohttp", {}).get("ok_per_s")
    naive = summary.get("AsyncOpenAI (httpx2)", {}).get("ok_per_s")
    rows = []
    for label, s in summary.items():
        rows.append(
            [
                label,
                round(s["ok_per_s"]),
                f"{s['ok_per_s_min'] or 0:,.0f}–{s['ok_per_s_max'] or 0:,.0f}",
                s["cpu_ms_per_call"],
                f"{100 * s['server_busy']:.0f} %" if s["server_busy"] == s["server_busy"] else "—",
                s["ok_per_s"] / base if base else None,
                s["ok_per_s"] / naive if naive else None,
                s["failed"] if not s["errors"] else f"{s['failed']} + {len(s['errors'])} crashed",
            ]
        )
    print_table(
        f"Overhead: {args.calls:,} calls × {args.reps} reps, {args.concurrency} in flight, zero-latency simulator "
        f"(median of reps)",
        ["contender", "calls/s", "range", "CPU ms/call", "server busy", "× raw aiohttp", "× naive", "failed"],
        rows,
    )
    for key, target in (("polytask/raw_aiohttp", 0.6), ("polytask/naive", 4.0)):
        if key in ratios and ratios[key] is not None:
            verdict = "meets" if ratios[key] >= target else "misses"
            print(f"{key} = {ratios[key]:.2f} ({verdict} the target ≥ {target})")
    for label, s in summary.items():
        for error in s["errors"]:
            print(f"{label} crashed: {error}")
    data = {
        "benchmark": "overhead",
        "machine": machine(),
        "config": vars(args),
        "summary": summary,
        "ratios": ratios,
        "targets": {"polytask/raw_aiohttp": 0.6, "polytask/naive": 4.0},
        "runs": runs,
        "simulator": sim_stats,
        "elapsed_s": time.monotonic() - started,
    }
    write_json(args.json, data)
    return data


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + str(r["error"])[:300]
    return f"{r['ok_per_s']:,.0f} calls/s, {r['cpu_ms_per_call']:.2f} CPU ms/call, {r['failed']} failed"


if __name__ == "__main__":
    main()
