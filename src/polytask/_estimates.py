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
import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._prompts import estimate_tokens
from .chat import Message

__all__ = ["CompletionBudget", "PromptEstimator", "cached_tiktoken_counter"]


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
