"""Fewer, cheaper calls per document: task fusion and sentence packing against one call per (sentence, task) pair.

Three measurements, each side by side in one run (issue 13):

1. **Calls, tokens and quality** on ``examples/ewt_dev.jsonl`` (318 documents, sentiment + entities) against the
   simulator's oracle, which answers every request — a single pair, or a fused / packed one, part by part — from the
   gold: calls and prompt / completion tokens per document, and entity P / R / F1 against gold
   (:func:`polytask.evaluate.score`), for one call per pair, fusion only, packing only, and both.
   Targets: ≥ 8× fewer calls and ≥ 2× fewer prompt tokens per document, entity F1 within 0.005.
2. **Makespan under a tight RPM limit**: the same job (``--rpm-docs`` documents) against a simulator enforcing
   ``--rpm`` (TPM unlimited) over ``--rpm-window`` seconds (1 by default, so neither run is mostly an opening burst),
   the orchestrator told the limit as a user would (``--rpm``, ``--rate-window``). Target: ≥ 5× faster.
3. **Pairs per second** through the whole pipeline, fused and packed, against the zero-latency simulator in its own
   process, next to the raw aiohttp loop's calls per second on the same simulator (``overhead.py``'s ceiling),
   interleaved over ``--reps``. Target: ≥ 2× the raw loop's call rate, in pairs.

Example::

    python benchmarks/packing.py --json packing.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import SimProcess, machine, median, print_table, run_one, write_json

import polytask as pt
from polytask.evaluate import score
from polytask.testing import SimulatorConfig
from polytask.testing.simulator import run_in_thread

EWT = Path(__file__).resolve().parents[1] / "examples" / "ewt_dev.jsonl"
CONFIGS: dict[str, dict[str, Any]] = {
    "one call per pair": {},
    "fused": {"fuse": True},
    "packed (pack=8)": {"pack": 8},
    "fused + packed (pack=8)": {"fuse": True, "pack": 8},
}


def gold() -> list[dict[str, Any]]:
    return [json.loads(line) for line in EWT.read_text(encoding="utf-8").splitlines() if line.strip()]


async def run_job(base_url: str, documents: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    backend = pt.OpenAIBackend("sim-model", base_url=base_url, api_key="sk-bench-not-a-real-key")
    started = time.perf_counter()
    async with pt.Orchestrator(backend, [pt.Sentiment(), pt.Entities()], max_concurrency=64, **options) as orch:
        results = await orch.run([{"id": d["id"], "text": d["text"]} for d in documents])
    wall = time.perf_counter() - started
    s = orch.stats
    return {
        "results": results,
        "wall_s": wall,
        "calls": s.requests,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "cached_tokens": s.cached_tokens,
        "asked_alone": s.asked_alone,
        "rate_limited": s.rate_limited,
        "pairs_failed": s.pairs_failed,
    }


def quality(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    by_id = {r["id"]: r for r in records}
    with run_in_thread(SimulatorConfig(gold_path=EWT)) as sim:
        for label, options in CONFIGS.items():
            run = anyio.run(run_job, sim.base_url, records, options)
            scores = score(by_id, run.pop("results"))
            run["entity_f1"] = scores.entities.f1
            run["entity_p"], run["entity_r"] = scores.entities.precision, scores.entities.recall
            out[label] = run
            print(f"  quality {label}: {run['calls']:,} calls, F1 {run['entity_f1']:.4f}", file=sys.stderr)
    return out


def makespan(records: list[dict[str, Any]], rpm: float, window: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label in ("one call per pair", "fused + packed (pack=8)"):
        with run_in_thread(SimulatorConfig(gold_path=EWT, rpm=rpm, rpm_window=window)) as sim:
            options = {**CONFIGS[label], "rpm": rpm, "rate_window": window}
            run = anyio.run(run_job, sim.base_url, records, options)
            run.pop("results")
            out[label] = run
            print(f"  makespan {label}: {run['wall_s']:.1f} s, {run['rate_limited']} 429s", file=sys.stderr)
    return out


def throughput(documents: int, calls: int, reps: int) -> dict[str, Any]:
    specs = {
        "raw aiohttp (calls/s)": {"contender": "raw-aiohttp", "workload": "short", "calls": calls, "warmup": 100},
        "polytask fused + packed (pairs/s)": {
            "contender": "polytask",
            "workload": "ewt",
            "calls": documents,
            "warmup": 20,
            "tasks": "sentiment,entities",
            "orchestrator": {"fuse": True, "pack": 8},
        },
        "polytask one call per pair (pairs/s)": {
            "contender": "polytask",
            "workload": "ewt",
            "calls": documents,
            "warmup": 20,
            "tasks": "sentiment,entities",
        },
    }
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in specs}
    with SimProcess({"gold_path": str(EWT)}) as sim:  # entities from the gold, so they align as real ones do
        for rep in range(reps):
            for label, spec in specs.items():
                result = run_one({**spec, "concurrency": 64, "label": label}, sim.base_url, 300)
                runs[label].append(result)
                print(f"  rate rep {rep + 1}/{reps} {label}: {result.get('ok_per_s', 0):,.0f}/s", file=sys.stderr)
    return {
        label: {
            "per_s": median([r["ok_per_s"] for r in rs if "error" not in r]),
            "failed": sum(r.get("failed", 0) for r in rs),
            "runs": rs,
        }
        for label, rs in runs.items()
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=0, help="documents for the quality run (0: all 318)")
    parser.add_argument("--rpm", type=float, default=500.0, help="the RPM limit of the makespan run")
    parser.add_argument("--rpm-docs", type=int, default=50, help="documents of the makespan run")
    parser.add_argument(
        "--rpm-window",
        type=float,
        default=1.0,
        help="seconds the RPM is enforced over (server and client); 60 lets a minute's burst through at once, which "
        "a small packed job fits in whole",
    )
    parser.add_argument("--rate-docs", type=int, default=600, help="documents per pairs-per-second run")
    parser.add_argument("--rate-calls", type=int, default=4000, help="calls per raw aiohttp run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the rate runs, interleaved (median)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: quality, makespan, rate")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    records = gold()
    data: dict[str, Any] = {"benchmark": "packing", "machine": machine(), "config": vars(args)}

    if "quality" not in skip:
        q = quality(records[: args.docs] if args.docs else records)
        n = len(records[: args.docs] if args.docs else records)
        base = q["one call per pair"]
        rows = []
        for label, r in q.items():
            rows.append(
                [
                    label,
                    f"{r['calls'] / n:.2f}",
                    f"{base['calls'] / r['calls']:.1f}×",
                    f"{r['prompt_tokens'] / n:,.0f}",
                    f"{base['prompt_tokens'] / r['prompt_tokens']:.1f}×",
                    f"{r['completion_tokens'] / n:,.0f}",
                    f"{r['entity_p']:.3f} / {r['entity_r']:.3f} / {r['entity_f1']:.4f}",
                    r["asked_alone"],
                ]
            )
        print_table(
            f"Calls and tokens per document, {n} documents × (sentiment, entities), simulator oracle",
            [
                "configuration",
                "calls/doc",
                "fewer calls",
                "prompt tok/doc",
                "fewer prompt tok",
                "completion tok/doc",
                "entity P / R / F1",
                "asked alone",
            ],
            rows,
        )
        best = q["fused + packed (pack=8)"]
        calls_x, prompt_x = base["calls"] / best["calls"], base["prompt_tokens"] / best["prompt_tokens"]
        f1_gap = abs(best["entity_f1"] - base["entity_f1"])
        for name, value, target, ok in (
            ("fewer calls", calls_x, "≥ 8×", calls_x >= 8),
            ("fewer prompt tokens", prompt_x, "≥ 2×", prompt_x >= 2),
            ("entity F1 gap", f1_gap, "≤ 0.005", f1_gap <= 0.005),
        ):
            print(f"{name} = {value:.4g} ({'meets' if ok else 'misses'} the target {target})")
        data["quality"] = q

    if "makespan" not in skip:
        m = makespan(records[: args.rpm_docs], args.rpm, args.rpm_window)
        plain, packed = m["one call per pair"], m["fused + packed (pack=8)"]
        print_table(
            f"Makespan at {args.rpm:g} RPM (enforced over {args.rpm_window:g} s), {args.rpm_docs} documents × "
            "(sentiment, entities)",
            ["configuration", "calls", "wall s", "429s", "failed pairs"],
            [[k, v["calls"], f"{v['wall_s']:.1f}", v["rate_limited"], v["pairs_failed"]] for k, v in m.items()],
        )
        speedup = plain["wall_s"] / packed["wall_s"]
        print(f"speed-up = {speedup:.1f}× ({'meets' if speedup >= 5 else 'misses'} the target ≥ 5×)")
        data["makespan"] = m

    if "rate" not in skip:
        t = throughput(args.rate_docs, args.rate_calls, args.reps)
        raw = t["raw aiohttp (calls/s)"]["per_s"]
        print_table(
            f"Pairs per second vs the raw aiohttp loop's calls per second, zero-latency simulator, {args.reps} reps",
            ["contender", "per second (median)", "× raw aiohttp calls/s", "failed"],
            [[k, f"{v['per_s']:,.0f}", f"{v['per_s'] / raw:.2f}", v["failed"]] for k, v in t.items()],
        )
        ratio = t["polytask fused + packed (pairs/s)"]["per_s"] / raw
        print(f"packed pairs/s ÷ raw calls/s = {ratio:.2f} ({'meets' if ratio >= 2 else 'misses'} the target ≥ 2)")
        data["rate"] = t
    write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
