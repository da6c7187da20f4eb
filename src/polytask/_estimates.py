"""Token estimates that track what the server actually counts.

- Prompt tokens: tiktoken when it is installed and the model's encoding file is already in its local cache (it is
  never downloaded), otherwise :func:`polytask._prompts.estimate_tokens`; either way scaled by a ratio calibrated from
  the ``usage.prompt_tokens`` the server returns (the 90th percentile of recent actual / estimated ratios, so the
  estimate errs high, by little).
- Completion tokens: per task, a cap learned from what that task's answers used (the largest of the last 200, plus
  a quarter and 16 tokens), never above the task's ``max_tokens``. The cap is sent as the request's ``max_tokens``,
  so the server's TPM charge (prompt + ``max_tokens``, OpenAI's formula) shrinks with it; an answer cut off by a
  learned cap is asked again with the task's full ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._prompts import estimate_tokens
from .chat import Message

__all__ = ["CompletionBudget", "PromptEstimator", "cached_tiktoken_counter", "typical_answer_chars"]


def cached_tiktoken_counter(model: str) -> Callable[[str], int] | None:
    """A ``len(encode(text))`` function for ``model`` if tiktoken is installed and the encoding's file is in
    tiktoken's local cache (``$TIKTOKEN_CACHE_DIR``, ``$DATA_GYM_CACHE_DIR`` or the temp folder); else None."""
    try:
        import tiktoken
        import tiktoken.registry
    except ImportError:
        return None
    try:
        name = tiktoken.encoding_name_for_model(model)
        constructor = tiktoken.registry.ENCODING_CONSTRUCTORS or {}
        if not constructor:
            tiktoken.registry._find_constructors()  # populates the table without any download
            constructor = tiktoken.registry.ENCODING_CONSTRUCTORS or {}
        url = _bpe_url(constructor[name])
    except Exception:  # unknown model, a tiktoken without these internals: no tokenizer
        return None
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache = cache or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if url is None or not os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())):
        return None
    encoding = tiktoken.get_encoding(name)
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def _bpe_url(constructor: Callable[[], Any]) -> str | None:
    """The download URL an encoding constructor would fetch, read from its source without calling it."""
    import inspect
    import re

    match = re.search(r"\"(https://[^\"]+\.tiktoken)\"", inspect.getsource(constructor))
    return match.group(1) if match else None


class PromptEstimator:
    """Prompt-token estimates calibrated against the server's ``usage.prompt_tokens``.

    Args:
        count: a text → tokens function (tiktoken's, say); None for the character heuristic.
        window: how many recent calls the calibration looks at (default 200).
        warmup: calls observed before the calibration is used (default 10).
    """

    def __init__(self, count: Callable[[str], int] | None = None, *, window: int = 200, warmup: int = 10) -> None:
        self._count = count
        self._ratios: deque[float] = deque(maxlen=window)
        self._warmup = warmup
        self._seen = 0
        self.ratio = 1.0

    def raw(self, messages: Sequence[Message]) -> int:
        """The uncalibrated estimate: tokens of every message's content, plus 4 per message and 3 for priming."""
        if self._count is None:
            return estimate_tokens(messages)
        return 3 + sum(4 + self._count(m.get("content") or "") for m in messages)

    def estimate(self, raw: int) -> int:
        """The calibrated estimate for a prompt whose :meth:`raw` estimate is ``raw``."""
        return math.ceil(raw * self.ratio)

    def observe(self, raw: int, actual: int) -> None:
        """Record what the server counted (``actual``) for a prompt estimated at ``raw``."""
        if raw <= 0 or actual <= 0:
            return
        self._ratios.append(actual / raw)
        self._seen += 1
        # re-read the percentile at the end of the warm-up and every 32 calls after (a sort of 200 is not free)
        if self._seen >= self._warmup and (self._seen == self._warmup or self._seen % 32 == 0):
            ordered = sorted(self._ratios)
            self.ratio = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


class CompletionBudget:
    """A per-task completion cap learned from the task's answers.

    Args:
        max_tokens: the task's own ``max_tokens``: the cap never exceeds it.
        window: how many recent answers count (default 200).
        warmup: answers observed before a smaller cap is used (default 20).
    """

    def __init__(self, max_tokens: int, *, window: int = 200, warmup: int = 20) -> None:
        self.max_tokens = max_tokens
        self._used: deque[int] = deque(maxlen=window)
        self._warmup = warmup

    @property
    def cap(self) -> int:
        """The ``max_tokens`` to send now."""
        if len(self._used) < self._warmup:
            return self.max_tokens
        return min(self.max_tokens, math.ceil(max(self._used) * 1.25) + 16)

    def observe(self, completion_tokens: int) -> None:
        """Record the completion tokens of a finished (not cut off) answer."""
        if completion_tokens > 0:
            self._used.append(completion_tokens)


def typical_answer_chars(schema: dict[str, Any]) -> float:
    """The length in characters of a typical compact JSON answer to ``schema``: every property present, one item in
    each array, an average enum value, 8-character strings, 3-character numbers. A dry run's completion estimate
    (the answer a run would get is unknown until it is asked)."""

    def size(node: Any, depth: int = 0) -> float:
        if not isinstance(node, dict) or depth > 8:
            return 4.0
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = schema
            for part in ref[2:].split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            return size(target, depth + 1)
        if "const" in node:
            return float(len(json.dumps(node["const"])))
        if isinstance(node.get("enum"), list) and node["enum"]:
            return sum(len(json.dumps(v)) for v in node["enum"]) / len(node["enum"])
        for key in ("anyOf", "oneOf"):
            options = [o for o in node.get(key) or [] if isinstance(o, dict) and o.get("type") != "null"]
            if options:
                return sum(size(o, depth + 1) for o in options) / len(options)
        kind = node.get("type")
        kind = next((k for k in kind if k != "null"), "null") if isinstance(kind, list) else kind
        if kind == "object" or "properties" in node:
            properties = node.get("properties") or {}
            fields = sum(len(json.dumps(name)) + 1 + size(sub, depth + 1) for name, sub in properties.items())
            return 2 + fields + max(0, len(properties) - 1)
        if kind == "array":
            return 2 + size(node.get("items"), depth + 1)
        return {"string": 10.0, "number": 3.0, "integer": 1.0, "boolean": 4.5}.get(str(kind), 4.0)

    return size(schema)
