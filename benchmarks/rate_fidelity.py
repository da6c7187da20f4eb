"""Rate fidelity: how much of the allowed rate each client uses, and how many 429s it draws on the way.

Workload (issue 4): the simulator enforces RPM = 1,200 and TPM = 120,000, charging each call its prompt-token
estimate + ``max_tokens`` (OpenAI's formula); 1,500 calls with prompts of 100–2,000 characters (fixed seed),
``max_tokens`` 50, lognormal latency with median 0.3 s (sigma 0.5). Each contender gets its own fresh simulator
(buckets full, the same seed, so the same latency draws) in its own process; by default all contenders run side by
side, released at the same instant (``--sequential`` runs them one after another).

The bound: an ideal client sends call k the first instant both server buckets (full at the start, refilling at
limit / 60 per second) hold its exact charge (``polytask.testing.simulator.estimate_tokens`` of the very messages
every contender sends, + ``max_tokens``); the server gives the k-th admitted call its k-th latency draw; the bound
is ``max_k(t_k + latency_k)``. "of bound" = bound / makespan for a contender that answers every call; for one that
loses calls, the time an ideal client needs for as many answers (sending the cheapest calls first) / makespan, so
finishing early by losing calls earns nothing. polytask may send less than ``max_tokens`` (a completion cap learned
from its answers), so the server charges it less: its bound ("own bound") is computed from the charges of the
requests it actually sent, recorded at the backend seam; "of workload bound" compares it with the common bound.
"429s" counts the simulator's 429 answers from its buckets; "429 share" = 429s / requests the simulator received.

    polytask (limits set)     Orchestrator(..., rpm=RPM, tpm=TPM)
    polytask (learned)        Orchestrator without rpm / tpm (limits learned from x-ratelimit-* headers, if it can)
    naive (SDK retries)       AsyncOpenAI + gather + Semaphore, the SDK's own retries (max_retries 2)
    aiolimiter (RPM)          naive + aiolimiter.AsyncLimiter(RPM, 60)
    aiolimiter (RPM+TPM)      naive + an RPM and a TPM AsyncLimiter (weighted by the exact charge)
    LiteLLM Router            litellm.Router, the deployment's rpm / tpm set, usage-based-routing-v2, default retries
    (optional, via --contenders) naive (10 retries), LiteLLM Router (10 retries)

Contenders whose library is missing (litellm, aiolimiter) are skipped with a note.

Example::

    python benchmarks/rate_fidelity.py --json rate_fidelity.json
    python benchmarks/rate_fidelity.py --calls 60 --latency 0.05 --contenders "polytask (limits set)"   # smoke

Targets (issue 4): ≥ 0.99 of the bound with zero 429s with limits set; ≥ 0.95 with ≤ 1 % 429s when learned.
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
    available,
    fidelity_prompts,
    ideal_rate_schedule,
    latency_draws,
    machine,
    print_table,
    request_charges,
    run_contenders,
    write_json,
)

CONTENDERS: dict[str, dict[str, Any]] = {
    "polytask (limits set)": {"contender": "polytask", "limits": True, "record_charges": True},
    "polytask (learned)": {"contender": "polytask", "limits": False, "record_charges": True},
    "naive (SDK retries)": {"contender": "naive", "limits": False},
    "aiolimiter (RPM)": {"contender": "aiolimiter", "limits": "rpm"},
    "aiolimiter (RPM+TPM)": {"contender": "aiolimiter", "limits": True},
    "LiteLLM Router": {"contender": "litellm", "limits": True},
    "naive (10 retries)": {"contender": "naive", "limits": False, "max_retries": 10},
    "LiteLLM Router (10 retries)": {"contender": "litellm", "limits": True, "max_retries": 10},
}
DEFAULT = [k for k in CONTENDERS if "10 retries" not in k]
NEEDS = {"aiolimiter": "aiolimiter", "litellm": "litellm"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--rpm", type=float, default=1200)
    parser.add_argument("--tpm", type=float, default=120_000)
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="divide calls, rpm and tpm by this: the same duration with fewer calls (use --calls for a short run)",
    )
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.3, help="median latency, seconds")
    parser.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of the latency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (every contender)")
    parser.add_argument("--contenders", default=",".join(DEFAULT), help=f"comma-separated, from {list(CONTENDERS)}")
    parser.add_argument("--sequential", action="store_true", help="run contenders one after another")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    calls = max(1, round(args.calls / args.scale))
    rpm, tpm = args.rpm / args.scale, args.tpm / args.scale
    labels = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in labels if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    skipped = {
        label: f"{NEEDS[CONTENDERS[label]['contender']]} is not installed"
        for label in labels
        if CONTENDERS[label]["contender"] in NEEDS and not available(NEEDS[CONTENDERS[label]["contender"]])
    }
    labels = [label for label in labels if label not in skipped]

    texts = fidelity_prompts(calls, args.seed)
    charges = request_charges(texts, args.max_tokens)
    lat = latency_draws(calls, args.latency, args.sigma, args.seed)
    ideal = ideal_rate_schedule(charges, rpm, tpm, lat)
    ideal.pop("finish_times")
    bound = ideal["makespan_s"]
    sim_config = {"rpm": rpm, "tpm": tpm, "latency": args.latency, "latency_sigma": args.sigma, "seed": args.seed}
    base = {
        "workload": "fidelity",
        "calls": calls,
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
    }
    specs = []
    for label in labels:
        c = dict(CONTENDERS[label])
        limits = c.pop("limits")
        spec = {**base, **c, "label": label}
        if limits:
            spec["rpm"] = rpm
        if limits is True:
            spec["tpm"] = tpm
        specs.append(spec)
    timeout = 3 * bound + 120
    print(
        f"{calls:,} calls, RPM {rpm:,.0f}, TPM {tpm:,.0f}, {sum(charges):,} tokens charged in all "
        f"(mean {sum(charges) / calls:.1f} per call), bound {bound:.1f} s; running {len(specs)} contenders "
        f"{'one after another' if args.sequential else 'side by side'}…",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    groups = [[s] for s in specs] if args.sequential else [specs]
    for group in groups:
        sims = [SimProcess(sim_config) for _ in group]
        try:
            for sim in sims:
                sim.__enter__()
            out = run_contenders(group, [s.base_url for s in sims], timeout)
            for r, sim in zip(out, sims, strict=True):
                r["simulator"] = sim.stats()
            results.extend(out)
        finally:
            for sim in sims:
                sim.__exit__()

    rows = []
    for r in results:
        outcomes = r["simulator"].get("outcomes", {})
        r429 = outcomes.get("rate_limited", 0)
        r["http_429"] = r429
        r["requests_received"] = r["simulator"].get("received", 0)
        if "error" in r:
            rows.append([r["label"], "—", "—", "—", "—", "—", "—", "—", r429, "—", "crashed: " + str(r["error"])[:60]])
            continue
        own = r.pop("charges", None)
        r["bound_s"] = bound
        if own and len(own) == calls and own != charges:
            r["bound_s"] = ideal_rate_schedule(own, rpm, tpm, lat)["makespan_s"]
            r["tokens_charged"] = sum(own)
        if r["ok"] == calls:
            ideal_ok = r["bound_s"]
        elif r["ok"]:  # the cheapest `ok` calls first: the earliest any client can have that many answers
            cheapest = sorted(charges)[: r["ok"]]
            ideal_ok = ideal_rate_schedule(cheapest, rpm, tpm, lat[: r["ok"]])["makespan_s"]
        else:
            ideal_ok = 0.0
        r["fraction_of_bound"] = ideal_ok / r["wall_s"] if r["wall_s"] else None
        r["fraction_of_workload_bound"] = (
            (bound if r["ok"] == calls else ideal_ok) / r["wall_s"] if r["wall_s"] else None
        )
        r["share_429"] = r429 / r["requests_received"] if r["requests_received"] else 0.0
        other = {k: v for k, v in r["errors"].items()}
        rows.append(
            [
                r["label"],
                r["ok"],
                r["failed"],
                r["wall_s"],
                r["ok"] / r["wall_s"],
                r["bound_s"] if r["bound_s"] != bound else "",
                r["fraction_of_bound"],
                r["fraction_of_workload_bound"],
                r429,
                f"{100 * r['share_429']:.1f} %",
                ", ".join(f"{k}×{v}" for k, v in other.items()) or "",
            ]
        )
    print_table(
        f"Rate fidelity: {calls:,} calls, RPM {rpm:,.0f}, TPM {tpm:,.0f}, max_tokens {args.max_tokens}, latency "
        f"median {args.latency} s (sigma {args.sigma}), {args.concurrency} in flight; bound {bound:.1f} s = "
        f"{calls / bound:.2f} calls/s",
        [
            *("contender", "ok", "failed", "makespan s", "ok calls/s", "own bound s", "of bound"),
            *("of workload bound", "429s", "429 share", "errors"),
        ],
        rows,
    )
    print(
        f"bound: last admission {ideal['last_admission_s']:.2f} s (order-free lower bound "
        f"{ideal['order_free_last_admission_s']:.2f} s) + the tail of the latency draws → {bound:.2f} s"
    )
    for label, why in skipped.items():
        print(f"skipped {label}: {why}")
    data = {
        "benchmark": "rate_fidelity",
        "machine": machine(),
        "config": {**vars(args), "calls_run": calls, "rpm_run": rpm, "tpm_run": tpm},
        "bound": {**ideal, "calls_per_s": calls / bound, "tokens_charged": sum(charges)},
        "results": results,
        "skipped": skipped,
        "targets": {
            "limits set": {"fraction": 0.99, "share_429": 0.0},
            "learned": {"fraction": 0.95, "share_429": 0.01},
        },
        "elapsed_s": time.monotonic() - started,
    }
    write_json(args.json, data)
    return data


if __name__ == "__main__":
    main()
