"""The pipeline end to end against the simulator in oracle mode: are the merged entities the gold entities?

Runs ``polytask run`` over a gold JSON Lines file (default ``examples/ewt_dev.jsonl``) against the built-in simulator,
which answers each sentence's entities from the gold annotations, with a share of calls failing transiently; then
compares every output line with gold. Prints: documents in / written / partial, how many documents' sentences equal
the gold sentences, and among those (and overall) how many have merged entities exactly equal to gold.

Example::

    python benchmarks/oracle_entities.py --faults 0.05
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spans(items: list[dict]) -> list[tuple]:
    return sorted((e["start"], e["end"], e.get("label")) for e in items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gold", type=Path, default=ROOT / "examples" / "ewt_dev.jsonl")
    parser.add_argument("--faults", type=float, default=0.05, help="share of calls failing transiently")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "polytask",
            "run",
            str(args.gold),
            "-o",
            str(out),
            "--no-progress",
            "--simulate-oracle",
            str(args.gold),
            "--simulate-faults",
            str(args.faults),
            "-t",
            "entities",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        lines = [json.loads(line) for line in out.read_text().splitlines()]
    gold = [json.loads(line) for line in args.gold.read_text().splitlines() if line.strip()]
    by_id = {g["id"]: g for g in gold}
    same_sentences = equal_among = equal_all = partial = 0
    for r in lines:
        g = by_id[r["id"]]
        partial += bool(r.get("partial"))
        ents = [e for e in r["results"]["entities"]["entities"] if e["aligned"]]
        equal = spans(ents) == spans(g["entities"]) and len(ents) == len(r["results"]["entities"]["entities"])
        equal_all += equal
        if [(s["start"], s["end"]) for s in r["sentences"]] == [(s["start"], s["end"]) for s in g["sentences"]]:
            same_sentences += 1
            equal_among += equal
    print(f"exit status {run.returncode}; documents in {len(gold)}, written {len(lines)}, partial {partial}")
    print(
        f"documents whose sentences equal gold: {same_sentences}; of those with entities equal to gold: "
        f"{equal_among} ({equal_among / max(1, same_sentences):.1%})"
    )
    print(
        f"all documents with entities equal to gold: {equal_all} of {len(lines)} ({equal_all / max(1, len(lines)):.1%})"
    )


if __name__ == "__main__":
    main()
