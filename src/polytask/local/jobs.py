"""What the local engine is asked and answers: :class:`GenRequest`, :class:`GenResult`, and the :class:`Job` /
:class:`JobSource` protocols :meth:`Engine.serve <polytask.local.engine.Engine.serve>` takes its work through."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["GenRequest", "GenResult", "Job", "JobSource"]


@dataclass
class GenRequest:
    """One prompt to answer.

    Attributes:
        prompt_ids: the prompt's token ids (chat template applied).
        grammar: an ``xgrammar.CompiledGrammar`` the answer must match, or None for free text.
        max_new_tokens: the most tokens to generate (≥ 1).
        temperature: 0 for greedy, else the sampling temperature.
        repetition_penalty: > 1 discourages tokens this answer already generated (1 = off): their logits are
            divided by it when positive, multiplied when negative (Keskar et al., 2019, "CTRL", §4.1; as
            transformers' ``repetition_penalty``, but over the answer only, so copying from the prompt is free).
        ignore_eos: keep generating through stop tokens until ``max_new_tokens`` (benchmarks only).
    """

    prompt_ids: list[int]
    grammar: Any = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False


@dataclass
class GenResult:
    """One answer: ``token_ids`` (without the stop token), ``finish_reason`` (``"stop"``, ``"length"``, or
    ``"cancelled"`` for a job cancelled mid-answer)."""

    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int = field(default=0)


class Job(Protocol):
    """A request handed to :meth:`Engine.serve`: its ``request``, a ``cancelled`` flag the engine polls every step
    (a cancelled job's row is freed without an answer), and ``finish``, called once from the engine's thread."""

    request: GenRequest
    cancelled: bool

    def finish(self, outcome: GenResult | BaseException) -> None: ...


class JobSource(Protocol):
    """Where :meth:`Engine.serve` takes its jobs from; called from the engine's thread only."""

    def waiting(self) -> int:
        """How many jobs wait (a hint for growing the batch)."""
        ...

    def take(self, n: int) -> Sequence[Any]:
        """Up to ``n`` waiting :class:`Job` s, oldest first ([] when none)."""
        ...

    def idle(self) -> bool:
        """Called when no row is busy and nothing was taken: True ends :meth:`Engine.serve`. Atomic with job
        arrival: a job that arrives after True must start a new ``serve``."""
        ...
