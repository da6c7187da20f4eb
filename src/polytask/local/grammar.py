"""JSON-schema grammars for constrained decoding (xgrammar), compiled once per schema and reused.

Why xgrammar: of the four libraries the issue names it was the one that compiled polytask's strict schemas,
produced only schema-valid answers with random weights, and fills a whole batch's token bitmask in one C++ call
(``BatchGrammarMatcher``) — see ``benchmarks/local_grammar_compare.py`` for the comparison.

Grammars are compact JSON (``any_whitespace=False``): a small model given free whitespace pretty-prints until it
runs out of tokens.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import numpy as np

__all__ = ["GrammarCache", "accept_tokens", "grammar_schema", "unpack_bits"]

_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ", re.MULTILINE)  # "[07:00:12] /project/cpp/x.cc:94: "


class GrammarCache:
    """Compiled grammars keyed by the schema's canonical JSON text; thread-safe.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: the model's logits width (``config.vocab_size``; may exceed the tokenizer's size).
        stop_token_ids: the token ids that end an answer once the grammar is complete.
        mask_width: the grammar's vocabulary size (default: the tokenizer's, at most ``vocab_size``).
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], *, mask_width: int | None = None
    ) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        known = max(tokenizer.get_vocab().values(), default=-1) + 1
        self.vocab_size = mask_width or min(vocab_size, max(known, max(stop_token_ids, default=-1) + 1))
        """The bitmasks' width: token ids past the tokenizer's (a model's padded vocabulary: 151,936 logits for
        151,665 Qwen2.5 tokens) are never allowed, and leaving them out of the grammar's vocabulary keeps xgrammar
        fast (it treats every id without a token string as special: with 100k of them a batch's bitmask fill +
        token accept took ≈ 10× longer, ``benchmarks/grammar_fill.py``)."""
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=stop_token_ids
        )
        self._compiler = xgr.GrammarCompiler(self.info, cache_enabled=True)
        ends = np.zeros(self.vocab_size, dtype=bool)
        for text, i in tokenizer.get_vocab().items():  # byte-level BPE and SentencePiece keep "}" / "]" as is
            if i < self.vocab_size and ("}" in text or "]" in text):
                ends[i] = True
        self.answer_ends = ends
        """Per token id: whether its text holds a ``}`` or ``]``, so it can end a JSON answer
        (:class:`~polytask.local.engine.Engine`'s ``answer_ends``)."""
        self._cache: dict[str, Any] = {}
        self._keys: dict[int, tuple[dict[str, Any], str]] = {}  # id(schema) → (schema, key); the schema kept alive
        self._lock = threading.Lock()
        self.compiles = 0
        """How many schemas were compiled (for tests: each schema once)."""

    def get(self, schema: dict[str, Any]) -> Any:
        """The compiled grammar for ``schema`` (an ``xgrammar.CompiledGrammar``), compiling it on first use; a
        schema that does not compile fails the same way every time, without compiling again.

        A cached grammar is returned without taking the lock, so a long compile (a 10,000-label enum takes
        seconds) holds up only the calls that need that grammar.

        Raises:
            ValueError: the schema cannot be compiled (xgrammar's reason, without its log prefix).
        """
        key = self._key(schema)
        hit = self._cache.get(key)
        if hit is None:
            with self._lock:
                hit = self._cache.get(key)
                if hit is None:
                    try:
                        hit = self._compiler.compile_json_schema(
                            json.dumps(grammar_schema(schema), separators=(",", ":")),
                            any_whitespace=False,
                            separators=(",", ":"),
                            strict_mode=True,
                        )
                    except Exception as exc:  # xgrammar raises RuntimeError / ValueError with a C++ log prefix
                        hit = ValueError(_LOG_PREFIX.sub("", str(exc)).strip() or type(exc).__name__)
                    self._cache[key] = hit
                    self.compiles += 1
        if isinstance(hit, ValueError):
            raise hit
        return hit

    def cached(self, schema: dict[str, Any]) -> bool:
        """Whether ``schema`` was compiled already (or failed to)."""
        return self._key(schema) in self._cache

    def _key(self, schema: dict[str, Any]) -> str:
        """The schema's canonical JSON text (property order matters: it is the answer's order), remembered per
        schema object: a task passes the same dict with every call, and a 10,000-label enum is slow to serialise."""
        seen = self._keys.get(id(schema))
        if seen is not None and seen[0] is schema:
            return seen[1]
        key = json.dumps(schema, separators=(",", ":"))
        if len(self._keys) >= 1024:  # callers that build a new dict per call: keep the memo small
            self._keys.clear()
        self._keys[id(schema)] = (schema, key)
        return key

    def matcher(self, compiled: Any) -> Any:
        """A fresh ``xgrammar.GrammarMatcher`` for one answer."""
        return self._xgr.GrammarMatcher(compiled)


def grammar_schema(schema: Any) -> Any:
    """``schema`` as the grammar is compiled from: string lengths (``minLength`` / ``maxLength``) left out.

    xgrammar 0.2 compiles a length-bounded string as m to n of any character but a quote, a backslash or a line
    break, which lets raw control characters through (invalid JSON) and forbids every escape; without the bounds
    the string follows JSON's own rules, and pydantic still checks the length (an answer past it is re-asked once,
    like any invalid answer).
    """
    if isinstance(schema, list):
        return [grammar_schema(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    drop = ("minLength", "maxLength") if schema.get("type") == "string" else ()
    return {k: grammar_schema(v) for k, v in schema.items() if k not in drop}


def unpack_bits(packed: Any, width: int) -> Any:
    """xgrammar's packed bitmask ``(n, words)`` int32 → ``(n, width)`` bool tensor (bit j of word w allows token
    ``32 w + j``), by a 256-entry byte table: one gather, no 32× int32 temporary."""
    import torch

    table = _BIT_TABLES.get(packed.device)
    if table is None:
        table = _BIT_TABLES[packed.device] = (
            (torch.arange(256, device=packed.device)[:, None] >> torch.arange(8, device=packed.device)) & 1
        ).bool()
    as_bytes = packed.contiguous().view(torch.uint8).long()
    return table[as_bytes].view(packed.shape[0], -1)[:, :width]


_BIT_TABLES: dict[Any, Any] = {}


def accept_tokens(matchers: list[Any], tokens: list[int]) -> None:
    """Advance each matcher by its token, in one C++ call, without building the accepted-or-not list.

    ``xgrammar.BatchGrammarMatcher.batch_accept_token`` turns its result into Python bools one FFI call per row
    (≈ 1.7 ms of the ≈ 2.5 ms it takes for 1,024 rows here), host time inside every decode step; the engine never
    reads it (it only feeds tokens the bitmask allowed). Falls back to the public call if xgrammar's internals move.
    """
    global _RAW_ACCEPT
    if _RAW_ACCEPT is None:
        import xgrammar.matcher

        core = getattr(xgrammar.matcher, "_core", None)
        _RAW_ACCEPT = getattr(getattr(core, "BatchGrammarMatcher", None), "batch_accept_token", False)
    if _RAW_ACCEPT:
        try:
            _RAW_ACCEPT([m._handle for m in matchers], tokens, False)
            return
        except (AttributeError, TypeError):
            _RAW_ACCEPT = False
    import xgrammar as xgr

    xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)


_RAW_ACCEPT: Any = None
