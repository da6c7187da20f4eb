"""Tail: makespan under heavy-tailed latency and transient faults, against the ideal.

Workload: ``--calls`` calls (short one-sentence documents, Sentiment), at most ``--concurrency`` in flight, no rate
limits; the simulator's latency is lognormal with median ``--latency`` and sigma 0.99 (p99 ≈ 10 × the median), and
5 % of requests fail after their latency: 2 % 500, 1 % 502 (HTML body), 1 % 503, 1 % connection reset. Each
contender gets its own fresh simulator (same seed) and runs alone.

With no limits and no injected 429s the simulator draws one fault number and one latency per request in arrival
order, whoever sends it, so the draws a run consumes are known in advance: R requests are needed for ``calls``
answers. Two references, both printed:

    lower bound   max(sum of the R latencies / concurrency, the longest of them): no client that keeps at most
                  ``concurrency`` calls in flight and sends no extra requests can finish sooner.
    ideal client  the makespan of a zero-overhead client that keeps ``concurrency`` calls in flight, re-sends a failed
                  call at once (no backoff) and takes requests in order (list scheduling over the same draws).

"× bound" (the issue's target, ≤ 1.10) is makespan / lower bound; "× ideal" is makespan / ideal client.

    polytask              Orchestrator(OpenAIBackend, [Sentiment()], max_concurrency=concurrency), default retries
    naive (SDK retries)   AsyncOpenAI + gather + Semaphore(concurrency), max_retries 2 (for reference)

Example::

    python benchmarks/tail.py --json tail.json
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

FAULTS = {"server_error": 0.02, "bad_gateway": 0.01, "unavailable": 0.01, "reset": 0.01}
CONTENDERS: dict[str, dict[str, Any]] = {
    "polytask": {"contender": "polytask", "probe": True},
    "naive (SDK retries)": {"contender": "naive"},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.2, help="median latency, seconds")
    parser.add_argument("--sigma", type=float, default=0.99, help="lognormal sigma (0.99: p99 ≈ 10 × median)")
    parser.add_argument("--fault-scale", type=float, default=1.0, help="multiply the 5 %% fault mix by this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, from {list(CONTENDERS)}")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    labels = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in labels if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")

    faults = {k: v * args.fault_scale for k, v in FAULTS.items()}
    sim_config = {"latency": args.latency, "latency_sigma": args.sigma, "seed": args.seed, "faults": faults}
    draws = fault_draws(args.calls, sim_config)
    latencies = [lat for _, lat in draws]
    lower = max(sum(latencies) / args.concurrency, max(latencies))
    ideal = ideal_concurrency_schedule(draws, args.calls, args.concurrency)
    n_faults = sum(f is not None for f, _ in draws)
    print(
        f"{args.calls:,} calls need {len(draws):,} requests ({n_faults} faulted); lower bound {lower:.2f} s, "
        f"ideal client {ideal:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    spec = {"workload": "short", "calls": args.calls, "seed": args.seed, "concurrency": args.concurrency}
    started = time.monotonic()
    results = []
    for label in labels:
        with SimProcess(sim_config) as sim:
            r = run_one({**spec, **CONTENDERS[label], "label": label}, sim.base_url, 10 * ideal + 120)
            r["simulator"] = sim.stats()
        results.append(r)

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["label"], "—", "—", "—", "—", "—", "—", "—", "crashed: " + str(r["error"])[:60]])
            continue
        r["x_bound"] = r["wall_s"] / lower
        r["x_ideal"] = r["wall_s"] / ideal
        conc = r.get("concurrency") or {}
        rows.append(
            [
                r["label"],
                r["ok"],
                r["failed"],
                r["simulator"].get("received", 0),
                r["wall_s"],
                r["x_bound"],
                r["x_ideal"],
                conc.get("limit_median") if conc else None,
                ", ".join(f"{k}×{v}" for k, v in r["errors"].items()),
            ]
        )
    print_table(
        f"Tail: {args.calls:,} calls, {args.concurrency} in flight, latency lognormal median {args.latency} s "
        f"sigma {args.sigma} (p99 ≈ {args.latency * 2.718281828 ** (2.326 * args.sigma):.2f} s), "
        f"{100 * sum(faults.values()):.0f} % transient faults; lower bound {lower:.2f} s, ideal client {ideal:.2f} s",
        ["contender", "ok", "failed", "requests", "makespan s", "× bound", "× ideal", "conc. limit", "errors"],
        rows,
    )
    print(
        f"lower bound = max(Σ latency / {args.concurrency}, max latency) over the {len(draws):,} requests "
        f"{args.calls:,} answers need = {lower:.2f} s; ideal client (no overhead, no backoff) {ideal:.2f} s. "
        "Target: polytask ≤ 1.10 × bound."
    )
    data = {
        "benchmark": "tail",
        "machine": machine(),
        "config": {**vars(args), "faults": faults},
        "bound": {
            "lower_bound_s": lower,
            "ideal_client_s": ideal,
            "requests_needed": len(draws),
            "faults_drawn": n_faults,
            "latency_sum_s": sum(latencies),
            "latency_max_s": max(latencies),
        },
        "results": results,
        "target": {"x_bound": 1.10},
        "elapsed_s": time.monotonic() - started,
    }
    write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
