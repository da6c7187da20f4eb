"""Serial server: a local server that works on N requests at a time and queues the rest (issue 12).

The simulator's ``serve_at_once`` mode plays a local llama.cpp or Ollama: it works on at most N completions at once,
each taking ``--latency`` seconds (lognormal ``--sigma``, 0 by default: every request the same), and queues the rest
first in first out, never answering 429 or 503; a request whose client gave up (a timeout) is still served when its
turn comes. Its capacity is N / latency answers a second. polytask starts with the default ``max_concurrency`` (64),
so every call past N waits in the server's queue: adaptive concurrency has only latency to go by.

Workload: ``--calls`` calls (short one-sentence documents, Sentiment), for each N in ``--at-once``; each contender
gets its own fresh simulator and runs alone (set-up untimed), with ``OpenAIBackend(timeout=--timeout)`` (60 s, the
default; a smaller one scales down a slower server: 64 calls in flight at 1 s each pass the 60 s default).

    polytask (adaptive)    Orchestrator(max_concurrency=64), adaptive concurrency as shipped
    polytask (fixed 64)    the same with adaptive_concurrency=False: 64 in flight whatever the server does

Columns: "of capacity" = answers a second / (N / latency); "timeouts" = requests the server saw abandoned by their
client (each one retried, and served anyway); 429s and 503s as the server counted them; "limit" = polytask's
concurrency limit (median over the second half of the run, sampled every 0.1 s; last value); "max queue" = the most
requests ever waiting at the server; "queue, 2nd half" = the median waiting there over the second half of the run
(sampled every 0.1 s); "longest wait" = the longest a request waited for its turn, seconds.

Targets: 0 timeouts and ≥ 0.9 of capacity, the limit near N.

Example::

    python benchmarks/serial_server.py --json serial_server.json
    python benchmarks/serial_server.py --latency 0.1 --timeout 3   # 64 × 0.1 s of queue > a 3 s timeout
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import SimProcess, machine, print_table, run_one, write_json

CONTENDERS: dict[str, dict[str, Any]] = {
    "polytask (adaptive)": {"contender": "polytask", "probe": True},
    "polytask (fixed 64)": {"contender": "polytask", "probe": True, "orchestrator": {"adaptive_concurrency": False}},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="calls per run")
    parser.add_argument("--at-once", default="1,4", help="comma-separated N: requests the server works on at once")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds one request takes once served")
    parser.add_argument("--sigma", type=float, default=0.0, help="lognormal sigma of that time")
    parser.add_argument("--concurrency", type=int, default=64, help="polytask's max_concurrency")
    parser.add_argument("--timeout", type=float, default=60.0, help="OpenAIBackend timeout per HTTP call, seconds")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated labels to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    labels = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in labels if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    sizes = [int(n) for n in args.at_once.split(",") if n.strip()]
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    for n in sizes:
        capacity = n / args.latency
        sim_config = {"serve_at_once": n, "latency": args.latency, "latency_sigma": args.sigma, "seed": args.seed}
        # no call should wait longer than the whole job served one at a time, plus its retries
        timeout = 3 * args.calls / capacity + 4 * args.timeout + 60
        for label in labels:
            spec = {
                **CONTENDERS[label],
                "label": label,
                "workload": "short",
                "calls": args.calls,
                "seed": args.seed,
                "concurrency": args.concurrency,
                "backend": {"timeout": args.timeout},
            }
            print(f"N={n}: {label} ...", file=sys.stderr, flush=True)
            with SimProcess(sim_config) as sim:
                done = threading.Event()
                queue: list[tuple[float, int]] = []  # (time, requests waiting at the server), every 0.1 s
                sampler = threading.Thread(target=_sample, args=(sim, done, queue), daemon=True)
                sampler.start()
                r = run_one(spec, sim.base_url, timeout)
                ended = time.monotonic()
                done.set()
                sampler.join()
                r["simulator"] = sim.stats()
            half = ended - r.get("wall_s", 0) / 2  # the run's second half (it ended as its result came back)
            late = [q for t, q in queue if t >= half] or [0]
            r["server_queue_median_2nd_half"] = statistics.median(late)
            r.update(at_once=n, capacity_per_s=capacity)
            results.append(r)
            server = r["simulator"]
            outcomes = server.get("outcomes", {})
            r["timeouts"] = server.get("abandoned", 0)
            r["http_429"] = sum(v for k, v in outcomes.items() if k in ("rate_limited", "rate_limit", "daily_quota"))
            r["http_503"] = sum(v for k, v in outcomes.items() if k in ("over_capacity", "unavailable"))
            r["server_max_queued"] = server.get("max_queued")
            r["server_max_queue_wait_s"] = server.get("max_queue_wait")
            if "error" in r:
                rows.append(
                    [n, label, "—", "—", "—", "—", r["timeouts"], "—", "—", "—", "—", "—", str(r["error"])[:60]]
                )
                continue
            r["of_capacity"] = r["ok"] / r["wall_s"] / capacity if r["wall_s"] else None
            conc = r.get("concurrency") or {}
            limit = f"{_num(conc.get('limit_median'))} / {_num(conc.get('limit_last'))}" if conc else "—"
            rows.append(
                [
                    n,
                    label,
                    r["ok"],
                    r["failed"],
                    r["wall_s"],
                    r["of_capacity"],
                    r["timeouts"],
                    r["http_429"],
                    r["http_503"],
                    limit,
                    r["server_max_queued"],
                    r["server_queue_median_2nd_half"],
                    r["server_max_queue_wait_s"],
                ]
            )
    print_table(
        f"Serial server: {args.calls:,} calls, the server works on N at a time ({args.latency} s each, sigma "
        f"{args.sigma}) and queues the rest; polytask max_concurrency {args.concurrency}, timeout {args.timeout:g} s",
        [
            "N",
            "contender",
            "ok",
            "failed",
            "wall s",
            "of capacity",
            "timeouts",
            "429s",
            "503s",
            "limit (median / last)",
            "max queue",
            "queue, 2nd half",
            "longest wait s",
        ],
        rows,
    )
    for r in results:
        conc = r.get("concurrency") or {}
        if conc:
            trace = " ".join(f"{t:g}s:{lim:g}" for t, _, lim in conc.get("trace", [])[:24] if lim is not None)
            print(f"N={r['at_once']} {r['label']}: limit over time {trace}")
    data = {
        "benchmark": "serial_server",
        "machine": machine(),
        "config": vars(args),
        "results": results,
        "elapsed_s": time.monotonic() - started,
    }
    write_json(args.json, data)
    return data


def _sample(sim: SimProcess, done: threading.Event, queue: list[tuple[float, int]]) -> None:
    while not done.wait(0.1):
        try:
            queue.append((time.monotonic(), sim.stats().get("queued", 0)))
        except OSError:  # gone
            pass


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:g}"


if __name__ == "__main__":
    main()
