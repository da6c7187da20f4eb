"""What a job would take, before any call: documents, sentences, calls, tokens, dollars and the time the rate limits
allow (:meth:`polytask.Orchestrator.dry_run`, ``polytask run --dry-run``).

Calls: one per (sentence, task) pair — or per fused / packed group of pairs (:mod:`polytask.packing`) — not already
answered in the request cache, and with a cache, one per distinct
question (a sentence met twice is paid once; re-asks and retries are not foreseen). Prompt tokens: the
orchestrator's own estimate of each call's messages (tiktoken where it is available, else the character
heuristic). Completion tokens: a typical answer to each task's schema (every property, one item per array, an
average enum value; :func:`polytask._estimates.typical_answer_chars`) — an answer's real length is unknown until
it is asked. ``BENCHMARKS.md`` compares the estimate with the real run of ``examples/ewt_dev.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._estimates import typical_answer_chars
from .chat import Message
from .documents import Sentence
from .packing import Packer
from .tasks.base import Task

__all__ = ["DryRun", "Planner"]


@dataclass
class DryRun:
    """What a job would take.

    Attributes:
        documents, sentences, pairs: what the input holds (pairs: sentences × tasks).
        cached: pairs already answered in the request cache (no call, no dollars).
        calls: calls to make (before re-asks, retries and pairs of a fused or packed call asked again alone): one
            per pair, or one per fused / packed group of pairs (``fuse``, ``pack``).
        prompt_tokens, completion_tokens: estimated tokens of those calls.
        cost: estimated USD, or None when the backend's prices are unknown.
        rpm, tpm: the requests- / tokens-per-minute limits known before the run (None: none known).
    """

    documents: int = 0
    sentences: int = 0
    pairs: int = 0
    cached: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    rpm: float | None = None
    tpm: float | None = None

    @property
    def seconds(self) -> float | None:
        """The least time the known limits allow for the calls, in seconds (None: no limit known, so no bound):
        ``60 × max(calls / rpm, tokens / tpm)``."""
        bounds = []
        if self.rpm:
            bounds.append(self.calls / self.rpm)
        if self.tpm:
            bounds.append((self.prompt_tokens + self.completion_tokens) / self.tpm)
        return 60 * max(bounds) if bounds else None


class Planner:
    """Adds up a :class:`DryRun` one document at a time (used by :meth:`polytask.Orchestrator.dry_run`).

    Args:
        packer: what one call asks (:class:`~polytask.packing.Packer`: the tasks, fusion, packing, context).
        prompt_tokens: ``messages -> tokens`` (the orchestrator's estimator).
        cached: ``(task, messages) -> bool``: whether the request cache holds the answer.
        cost: ``(prompt tokens, completion tokens) -> USD``, or None when prices are unknown.
    """

    def __init__(
        self,
        packer: Packer,
        prompt_tokens: Callable[[list[Message]], int],
        cached: Callable[[Task[Any], list[Message]], bool],
        cost: Callable[[int, int], float] | None = None,
    ) -> None:
        self.packer = packer
        self.prompt_tokens, self.cached, self.cost = prompt_tokens, cached, cost
        self.answer_tokens = {t.name: math.ceil(typical_answer_chars(t.json_schema()) / 3.6) for t in packer.tasks}
        self.result = DryRun(cost=0.0 if cost is not None else None)

    def add(self, sentences: Sequence[Sentence]) -> None:
        """One document's sentences."""
        result = self.result
        result.documents += 1
        result.sentences += len(sentences)
        for unit in self.packer.units(sentences):
            result.pairs += unit.pairs
            messages = self.packer.messages(unit, sentences)
            if self.cached(unit.bundle or unit.tasks[0], messages):
                result.cached += unit.pairs
                continue
            prompt = self.prompt_tokens(messages)
            completion = len(unit.sentences) * sum(self.answer_tokens[t.name] for t in unit.tasks)
            result.calls += 1
            result.prompt_tokens += prompt
            result.completion_tokens += completion
            if self.cost is not None and result.cost is not None:
                result.cost += self.cost(prompt, completion)
