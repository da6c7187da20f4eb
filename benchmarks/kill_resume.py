"""kill -9 a ``polytask run`` at random points of a job, rerun the same command each time, and count what it cost.

Workload: ``--docs`` documents of 2–6 sentences (every sentence different, so every pair is its own question) ×
sentiment and entities, against the built-in simulator (latency ``--latency`` s, lognormal sigma 0.5; no limits)
run in this process, ``polytask run`` in a subprocess with ``--concurrency`` calls in flight and its request cache
on. The process is killed with SIGKILL once its partial file holds a random number of finished documents (``--kills``
points, increasing), and the same command is run again; the last run finishes.

Printed per kill: documents finished at the kill, the calls in flight then (received by the server from that run,
their answers not in the request cache when it died: on the wire, at the server, or read but not yet stored), and
whether the rerun found a torn last line. At the end: output lines lost, duplicated or out of input order, and the
calls paid twice — every request the server received over all runs, less the distinct questions (the cache's rows
at the end: one paid answer each) — against the sum of the calls in flight at the kills. Target (issue 11): 0 lost,
0 duplicated, paid twice ≤ in flight (only what was in flight at a death is paid again).

    PYTHONPATH=src python benchmarks/kill_resume.py --docs 1000 --kills 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from polytask.testing import SimulatorConfig, run_in_thread

ROOT = Path(__file__).resolve().parent.parent


def make_input(path: Path, n: int, rng: random.Random) -> None:
    cities = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Pune"]
    with path.open("w") as f:
        for i in range(n):
            sentences = [
                f"Order {i}-{j} from {rng.choice(cities)} was {rng.choice(['late', 'fine', 'great', 'lost'])}."
                for j in range(rng.randint(2, 6))
            ]
            f.write(json.dumps({"id": f"doc{i}", "text": " ".join(sentences)}) + "\n")


def finished_in(partial: Path) -> int:
    try:
        return max(0, partial.read_bytes().count(b"\n") - 1)  # the first line names the job
    except FileNotFoundError:
        return 0


def cached(cache: Path) -> int:
    if not cache.exists():
        return 0
    with sqlite3.connect(cache) as db:
        return db.execute("SELECT count(*) FROM answers").fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill_resume_"))
    source, out, cache = work / "in.jsonl", work / "out.jsonl", work / "cache.sqlite"
    partial = work / f".{out.name}.partial"
    make_input(source, args.docs, rng)
    points = sorted(rng.sample(range(args.docs // 20, args.docs - args.docs // 20), args.kills))
    config = SimulatorConfig(latency=args.latency, latency_sigma=0.5 if args.latency else 0.0, seed=args.seed)
    env = {**os.environ, "OPENAI_API_KEY": "sk-kill-resume", "PYTHONPATH": str(ROOT / "src")}
    with run_in_thread(config) as sim:
        command = [
            sys.executable, "-m", "polytask", "run", str(source), "-o", str(out), "-t", "sentiment", "-t",
            "entities", "--base-url", sim.base_url, "--model", "sim-model", "--concurrency",
            str(args.concurrency), "--cache", str(cache), "--no-progress",
        ]  # fmt: skip

        def received() -> int:
            return sim.stats.received

        def drained() -> None:  # the calls of a killed client still end at the server
            while sim.stats.in_flight:
                time.sleep(0.01)

        print(f"{args.docs} documents, kills after {points} finished documents; simulator latency {args.latency} s")
        print(f"{'kill':>4} {'finished':>8} {'in flight':>9} {'torn line':>9}")
        rows = []
        started = time.perf_counter()
        stderr_of_last = ""
        for k, point in enumerate([*points, None]):
            received_before, rows_before = received(), cached(cache)
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if point is None:
                _, stderr_of_last = proc.communicate()
                if k:
                    rows[-1]["torn"] = "cut off" in stderr_of_last
                break
            while finished_in(partial) < point and proc.poll() is None:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            _, stderr = proc.communicate()
            if k:
                rows[-1]["torn"] = "cut off" in stderr
            drained()
            in_flight = (received() - received_before) - (cached(cache) - rows_before)
            rows.append({"finished": finished_in(partial), "in_flight": in_flight})
        elapsed = time.perf_counter() - started
        for k, row in enumerate(rows, 1):
            torn = "yes" if row.get("torn") else "no"
            print(f"{k:>4} {row['finished']:>8} {row['in_flight']:>9} {torn:>9}")
        ids = [json.loads(line)["id"] for line in out.open()]
        want = [f"doc{i}" for i in range(args.docs)]
        counts = Counter(ids)
        lost = sum(1 for i in want if i not in counts)
        duplicated = sum(c - 1 for c in counts.values() if c > 1)
        pairs = sum(len(r["pairs"]) for r in map(json.loads, out.open()))
        questions = cached(cache)
        paid_twice, in_flight = received() - questions, sum(r["in_flight"] for r in rows)
        print(f"final run exit {proc.returncode}; {elapsed:.1f} s in all")
        print(f"lines lost {lost}, duplicated {duplicated}, in input order: {ids == want}")
        print(f"requests received {received()} for {pairs} pairs ({questions} distinct questions, all answered)")
        print(f"paid twice {paid_twice}, in flight at the kills {in_flight}")
        met = lost == 0 and duplicated == 0 and ids == want and paid_twice <= in_flight
        print(f"target (0 lost, 0 duplicated, paid twice <= in flight at the kills): {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
