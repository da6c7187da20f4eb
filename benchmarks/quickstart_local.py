"""README command 1's job (sentiment + entities on ``examples/quickstart.jsonl``) on the embedded local model, once
per repetition penalty, one after the other in one process: wall time (model load included), partial documents,
failed pairs and completion tokens.

    python benchmarks/quickstart_local.py --penalties 1,1.1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polytask as pt

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--penalties", default="1,1.1", help="comma-separated repetition penalties")
    args = parser.parse_args()
    lines = [json.loads(line) for line in EXAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [{"id": d["id"], "text": d["text"]} for d in lines]
    for penalty in (float(p) for p in args.penalties.split(",")):
        started = time.perf_counter()
        backend = pt.TransformersBackend(repetition_penalty=penalty)
        results = pt.run_sync(backend, [pt.Sentiment(), pt.Entities()], docs)
        failed = [p.error.type for r in results for p in r.pairs if p.error]
        tokens = sum(r.usage.completion_tokens for r in results)
        print(
            f"repetition_penalty={penalty:g}: {time.perf_counter() - started:.1f} s (model load included), "
            f"partial documents {sum(r.partial for r in results)}/{len(results)}, failed pairs {failed}, "
            f"completion tokens {tokens}",
            flush=True,
        )


if __name__ == "__main__":
    main()
