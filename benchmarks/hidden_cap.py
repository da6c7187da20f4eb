"""Hidden concurrency cap: the server answers 503 (no rate-limit headers) past N calls in flight.

Workload: ``--calls`` calls (short one-sentence documents, Sentiment), simulator ``max_concurrency = --cap`` and
lognormal latency (median ``--latency``, sigma 0.3). polytask starts with ``max_concurrency`` well above the cap
(``--start``, default 8 × cap) and should settle near the cap without stalling; each contender gets its own fresh
simulator and runs alone, with a hard timeout (a stall shows as "timed out").

The ideal: a client that keeps exactly ``cap`` calls in flight, with no overhead, over the simulator's latency draws
(a 503 is answered before any latency is drawn, so the admitted calls get the draws in order): "of ideal" =
ideal makespan / makespan (for a contender that loses calls, the ideal time for as many answers / makespan).

polytask's concurrency is sampled every 0.1 s: "limit" is the median of its adaptive limit over the second half of
the run (read from ``orch.concurrency.limit`` or a similar attribute, when the orchestrator has one), "in flight" the
median number of calls holding a slot then.

    polytask (start 8×cap)      Orchestrator(max_concurrency=start), adaptive concurrency as shipped
    polytask (max_concurrency=cap)  the same told the cap (reference)
    naive (SDK retries)         AsyncOpenAI + gather + Semaphore(start), max_retries 2 (reference)

Example::

    python benchmarks/hidden_cap.py --json hidden_cap.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import (
    SimProcess,
    fault_draws,
    ideal_concurrency_schedule,
    machine,
    print_table,
    run_one,
    write_json,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--cap", type=int, default=16, help="the simulator's hidden max_concurrency")
    parser.add_argument("--start", type=int, default=0, help="polytask's max_concurrency (default 8 × cap)")
    parser.add_argument("--latency", type=float, default=0.2, help="median latency, seconds")
    parser.add_argument("--sigma", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=0, help="per-contender timeout, s (default 10 × ideal + 60)")
    parser.add_argument("--no-references", action="store_true", help="run polytask (start 8×cap) only")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    start = args.start or 8 * args.cap
    sim_config = {"latency": args.latency, "latency_sigma": args.sigma, "seed": args.seed, "max_concurrency": args.cap}
    draws = fault_draws(args.calls, sim_config)
    ideal = ideal_concurrency_schedule(draws, args.calls, args.cap)
    contenders: list[dict[str, Any]] = [
        {"contender": "polytask", "label": f"polytask (max_concurrency={start})", "concurrency": start, "probe": True}
    ]
    if not args.no_references:
        contenders += [
            {
                "contender": "polytask",
                "label": f"polytask (max_concurrency={args.cap}, told)",
                "concurrency": args.cap,
                "probe": True,
            },
            {"contender": "naive", "label": f"naive (Semaphore {start}, SDK retries)", "concurrency": start},
        ]
    spec = {"workload": "short", "calls": args.calls, "seed": args.seed}
    timeout = args.timeout or 10 * ideal + 60
    print(f"cap {args.cap}, ideal makespan {ideal:.2f} s", file=sys.stderr, flush=True)
    started = time.monotonic()
    results = []
    for c in contenders:
        with SimProcess(sim_config) as sim:
            r = run_one({**spec, **c}, sim.base_url, timeout)
            r["simulator"] = sim.stats()
        results.append(r)

    rows = []
    for r in results:
        sim = r["simulator"]
        r["http_503"] = sim.get("outcomes", {}).get("over_capacity", 0)
        r["server_max_in_flight"] = sim.get("max_in_flight")
        if "error" in r:
            rows.append([r["label"], "—", "—", "—", "—", "—", r["http_503"], "—", "—", str(r["error"])[:60]])
            continue
        # a contender that loses calls is compared with the ideal time for as many answers
        ideal_ok = ideal if r["ok"] == args.calls else ideal_concurrency_schedule(draws, r["ok"], args.cap)
        r["of_ideal"] = ideal_ok / r["wall_s"] if r["wall_s"] else None
        conc = r.get("concurrency") or {}
        rows.append(
            [
                r["label"],
                r["ok"],
                r["failed"],
                r["wall_s"],
                r["ok"] / r["wall_s"],
                r["of_ideal"],
                r["http_503"],
                conc.get("limit_median") if conc else None,
                conc.get("in_flight_median") if conc else None,
                ", ".join(f"{k}×{v}" for k, v in r["errors"].items()),
            ]
        )
    print_table(
        f"Hidden cap: {args.calls:,} calls, server cap {args.cap} in flight (503 past it, no headers), latency median "
        f"{args.latency} s; ideal (exactly {args.cap} in flight) {ideal:.2f} s = {args.calls / ideal:.1f} calls/s",
        ["contender", "ok", "failed", "makespan s", "ok calls/s", "of ideal", "503s", "limit", "in flight", "errors"],
        rows,
    )
    for r in results:
        conc = r.get("concurrency") or {}
        if conc:
            where = conc.get("limit_attribute") or "no adaptive limit found on the orchestrator"
            trace = " ".join(f"{t:g}s:{lim if lim is not None else '-'}" for t, _, lim in conc.get("trace", [])[:20])
            print(f"{r['label']}: limit read from {where}; trace (time:limit) {trace}")
    data = {
        "benchmark": "hidden_cap",
        "machine": machine(),
        "config": {**vars(args), "start": start},
        "ideal": {"makespan_s": ideal, "calls_per_s": args.calls / ideal},
        "results": results,
        "elapsed_s": time.monotonic() - started,
    }
    write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
