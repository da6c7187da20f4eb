"""Peak memory of ``polytask run`` as the job grows: is it flat from 100k to 1M pairs with the request cache on?

Workload: documents of two sentences × two tasks (sentiment, entities) = 4 pairs each, against the simulator (no
limits, no latency) in its own process (``_simserver.py``), ``polytask run IN -o OUT`` in a subprocess with its
cache in a fresh folder; peak resident memory (``ru_maxrss`` from ``wait4``) of the polytask process alone. Prints,
per size: pairs, documents, wall seconds, pairs per second, peak RSS in MB, and the cache file's size.
Target (issue 11): ≤ 300 MB and flat from 100k to 1M pairs.

    PYTHONPATH=src python benchmarks/memory_pairs.py --pairs 100000,300000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="100000,300000,1000000", help="comma-separated pair counts")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    env = {**os.environ, "OPENAI_API_KEY": "sk-memory", "PYTHONPATH": str(HERE.parent / "src")}
    server = subprocess.Popen(
        [sys.executable, str(HERE / "_simserver.py"), "{}"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"(http://\S+)", line)
        if not match:
            raise SystemExit(f"the simulator did not start: {line!r}")
        base_url = match.group(1)
        print(f"{'pairs':>9} {'documents':>9} {'seconds':>8} {'pairs/s':>8} {'peak RSS MB':>11} {'cache MB':>8}")
        for pairs in (int(p) for p in args.pairs.split(",")):
            work = Path(tempfile.mkdtemp(prefix="memory_pairs_"))
            docs = pairs // 4
            source = work / "in.jsonl"
            with source.open("w") as f:
                for i in range(docs):
                    text = f"Order {i} from Paris was late. The team in Osaka fixed order {i}."
                    f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
            command = [
                sys.executable, "-m", "polytask", "run", str(source), "-o", str(work / "out.jsonl"),
                "--base-url", base_url, "--model", "sim-model", "--concurrency", str(args.concurrency),
                "--cache", str(work / "cache.sqlite"), "--no-progress",
            ]  # fmt: skip
            started = time.perf_counter()
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            assert proc.stderr is not None
            stderr = proc.stderr.read()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            elapsed = time.perf_counter() - started
            if proc.returncode != 0:
                raise SystemExit(f"polytask run exited {proc.returncode}: {stderr.decode()[-2000:]}")
            peak = usage.ru_maxrss / 1024  # kB on Linux
            cache_mb = (work / "cache.sqlite").stat().st_size / 2**20
            print(f"{pairs:>9,} {docs:>9,} {elapsed:>8.1f} {pairs / elapsed:>8.0f} {peak:>11.1f} {cache_mb:>8.1f}")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
