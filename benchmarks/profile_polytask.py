"""Where polytask spends its CPU per call: cProfile of the overhead benchmark's polytask run.

Runs the polytask contender of ``overhead.py`` (zero-latency simulator in its own process, the same requests)
under cProfile for the timed part only, then prints the functions with the most own time (``tottime``), the
polytask functions by cumulative time, and the share of time per package.

Example::

    python benchmarks/profile_polytask.py --calls 3000 --out polytask.prof
"""

from __future__ import annotations

import argparse
import collections
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import SimProcess, run_one


def _package(filename: str) -> str:
    if "/polytask/" in filename:
        return "polytask"
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins (C)"
    return "stdlib: " + Path(filename).stem if "/lib/python" in filename else Path(filename).stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="keep the .prof file here")
    args = parser.parse_args()
    out = args.out or str(Path(tempfile.mkdtemp()) / "polytask.prof")
    spec = {
        "contender": "polytask",
        "workload": "short",
        "calls": args.calls,
        "concurrency": args.concurrency,
        "warmup": 100,
        "profile": out,
    }
    with SimProcess({}) as sim:
        result = run_one(spec, sim.base_url, 600)
    if "error" in result:
        raise SystemExit(f"the run failed: {result['error']}\n{result.get('stderr', '')}")
    print(
        f"{result['ok']:,} calls in {result['wall_s']:.2f} s under cProfile "
        f"({result['cpu_ms_per_call']:.2f} CPU ms/call)"
    )
    stats = pstats.Stats(out)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    by_package: collections.Counter[str] = collections.Counter()
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        by_package[_package(filename)] += tottime
    print(f"\nOwn time by package (total {total:.2f} s = {1000 * total / args.calls:.3f} ms per call)")
    for name, seconds in by_package.most_common(15):
        print(
            f"  {name:32s} {seconds:7.2f} s  {100 * seconds / total:5.1f} %  {1000 * seconds / args.calls:.3f} ms/call"
        )
    print("\nTop functions by own time")
    stats.sort_stats("tottime").print_stats(args.top)
    print("polytask functions by cumulative time")
    stats.sort_stats("cumulative").print_stats("/polytask/", args.top)


if __name__ == "__main__":
    main()
