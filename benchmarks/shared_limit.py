"""Four clients on one API key: one shared limit in Redis against four that each believe the limit is theirs.

The rate-fidelity workload (``rate_fidelity.py``: prompts of 100–2,000 characters, ``max_tokens`` 50, lognormal
latency median 0.3 s, σ 0.5; the simulator enforcing RPM 1,200 and TPM 120,000, so TPM-bound) split between 4
client processes (every 4th call each), all released at once against ONE simulator, i.e. one key:

    polytask, shared limit   4 × Orchestrator(limiter=RedisRateLimiter(redis, key="bench", rpm, tpm))
    polytask, 4 independent  4 × Orchestrator(rpm=1200, tpm=120000): today's behaviour before a shared limiter
    LiteLLM Router + Redis   4 × litellm.Router(rpm, tpm, redis_host/port): LiteLLM's shared usage (when litellm is
                             importable by ``--litellm-python``, a separate interpreter; skipped otherwise)

A ``redis-server`` (Debian's) is started on a free loopback port for the run. The bound is the rate-fidelity bound of
the whole workload (``_bench.ideal_rate_schedule``: an ideal single client; the clients add nothing it could use).
"of bound" = bound / makespan (the last client's end); 429s are the simulator's.

    python benchmarks/shared_limit.py --calls 600
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench
from _bench import (
    SimProcess,
    fidelity_prompts,
    ideal_rate_schedule,
    latency_draws,
    print_table,
    request_charges,
    run_contenders,
    write_json,
)


def redis_server() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian: apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.02)
    return proc, f"redis://127.0.0.1:{port}/0"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rpm", type=float, default=1200)
    parser.add_argument("--tpm", type=float, default=120_000)
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight per client")
    parser.add_argument("--litellm-python", help="an interpreter with litellm and polytask importable")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    texts = fidelity_prompts(args.calls, 0)
    charges = request_charges(texts, 50)
    bound = ideal_rate_schedule(charges, args.rpm, args.tpm, latency_draws(args.calls, args.latency, args.sigma, 0))[
        "makespan_s"
    ]
    base = {
        "workload": "fidelity",
        "calls": args.calls,
        "seed": 0,
        "max_tokens": 50,
        "concurrency": args.concurrency,
        "rpm": args.rpm,
        "tpm": args.tpm,
    }
    server, url = redis_server()
    modes: list[tuple[str, dict[str, Any]]] = [
        ("polytask, shared limit (Redis)", {"contender": "polytask", "redis": url, "redis_key": "bench"}),
        ("polytask, 4 independent limiters", {"contender": "polytask"}),
    ]
    if args.litellm_python:
        modes.append(("LiteLLM Router + Redis", {"contender": "litellm", "redis": url, "python": args.litellm_python}))
    sim_config = {"rpm": args.rpm, "tpm": args.tpm, "latency": args.latency, "latency_sigma": args.sigma, "seed": 0}
    rows, results = [], []
    try:
        for label, mode in modes:
            specs = [
                {**base, **mode, "label": f"{label} #{i}", "slice": [i, args.clients]} for i in range(args.clients)
            ]
            with SimProcess(sim_config) as sim:
                started = time.monotonic()
                out = run_contenders(specs, [sim.base_url] * args.clients, 3 * bound + 120)
                wall = time.monotonic() - started
                stats = sim.stats()
            ok = sum(r.get("ok", 0) for r in out)
            limited = stats.get("outcomes", {}).get("rate_limited", 0)
            makespan = max((r.get("wall_s") or 0) for r in out) or wall
            errors = [r["error"][:80] for r in out if "error" in r]
            share = limited / stats.get("received", 1)
            rows.append([label, ok, args.calls - ok, makespan, bound / makespan, limited, share, "; ".join(errors)])
            results.append({"label": label, "clients": out, "simulator": stats, "makespan_s": makespan})
    finally:
        server.kill()
    print_table(
        f"{args.clients} clients on one key: {args.calls} calls (every {args.clients}th each), RPM {args.rpm:,.0f}, "
        f"TPM {args.tpm:,.0f}, latency {args.latency} s; bound {bound:.1f} s",
        ["contender", "ok", "failed", "makespan s", "of bound", "429s", "429 share", "errors"],
        rows,
    )
    data = {"benchmark": "shared_limit", "machine": _bench.machine(), "bound_s": bound, "results": results}
    write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
