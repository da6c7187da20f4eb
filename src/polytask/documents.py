"""Values that flow through a run: input documents, sentences, per-call usage and per-document results.

Offsets everywhere are Python ``str`` indices (code points), end exclusive: ``text[start:end]``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .exceptions import AnswerError

__all__ = [
    "Document",
    "DocumentResult",
    "ErrorInfo",
    "PairResult",
    "Sentence",
    "Usage",
    "id_problem",
    "surrogate_problem",
]


def id_problem(value: Any) -> str | None:
    """What is wrong with ``value`` as a document id, or None when it is one: a string, or an integer that is not a
    bool (used as its string); None means "none given" (the caller then numbers the document). One rule for the
    Python API and the CLI."""
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return None
    return f"must be a string or an integer, got {type(value).__name__}"


def surrogate_problem(value: Any) -> str | None:
    """What is wrong with ``value`` (a string, or JSON data holding strings) as Unicode text, or None: a lone
    surrogate (``"\\ud800"``, which a JSON escape decodes to) cannot be encoded, written or sent. The message names
    the code point and, for a string, its offset."""
    try:
        if isinstance(value, str):
            value.encode("utf-8")
        else:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        where = f" at offset {error.start}" if isinstance(value, str) else ""
        return f"holds an unpaired surrogate {error.object[error.start]!r}{where}, which is not Unicode text"
    return None


class Document(BaseModel):
    """One input document.

    Args:
        id: caller's identifier, echoed in the result (defaults to the input position as a string).
        text: the document text.
        metadata: anything the caller wants carried to the result untouched.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class Sentence(BaseModel):
    """A sentence of a document: ``document.text[start:end] == text``."""

    model_config = ConfigDict(frozen=True)

    index: int
    start: int
    end: int
    text: str


class Usage(BaseModel):
    """What was spent: tokens as the server reported them, the HTTP attempts, and their cost.

    Every response the server returned counts: answers that failed validation, re-asks, answers cut off at
    ``max_tokens`` and sent again. A failed call with no response (a 429, a 5xx, a timeout) counts as a request
    only; an answer from the request cache counts nothing.

    Attributes:
        prompt_tokens, completion_tokens: as the server reported them.
        cached_tokens: the part of ``prompt_tokens`` served from the provider's prompt cache.
        requests: HTTP attempts.
        cost: USD, at the run's prices (:class:`~polytask.costs.Prices`); 0 when the prices are unknown (then
            ``RunStats.prices`` is None) or the model costs nothing (a local one).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    cost: float = 0.0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        requests: int = 1,
        *,
        cost: float = 0.0,
        cached_tokens: int = 0,
    ) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.requests += requests
        self.cost += cost
        self.cached_tokens += cached_tokens

    def merge(self, other: Usage) -> None:
        """Add ``other``'s counts and cost to these (a pair's usage into its document's)."""
        self.add(
            other.prompt_tokens,
            other.completion_tokens,
            other.requests,
            cost=other.cost,
            cached_tokens=other.cached_tokens,
        )


_CONTENT_CHARS = 500  # the most characters of the model's answer an ErrorInfo keeps
_TRUNCATED = f" … [truncated to {_CONTENT_CHARS} characters]"


class ErrorInfo(BaseModel):
    """Why one (sentence, task) pair has no answer.

    Attributes:
        type: the polytask exception class name (``RateLimitError``, ``AnswerValidationError``, …).
        message: its message (never contains an API key).
        status_code: the HTTP status, when there was one.
        attempts: how many calls were made for this pair.
        content: what the model answered, for an answer that could not be used (``AnswerValidationError``: the
            last answer; ``LengthLimitError``: the cut-off text; ``RefusalError``: the refusal), else None. Its first
            500 characters, followed by ``" … [truncated to 500 characters]"`` when there were more. Only the
            model's own text: nothing of the request (the document, the API key) is put there.
    """

    model_config = ConfigDict(frozen=True)

    type: str
    message: str
    status_code: int | None = None
    attempts: int = 0
    content: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, attempts: int = 0) -> ErrorInfo:
        content = exc.content if isinstance(exc, AnswerError) and isinstance(exc.content, str) else None
        if content is not None and len(content) > _CONTENT_CHARS:
            content = content[:_CONTENT_CHARS] + _TRUNCATED
        return cls(
            type=type(exc).__name__,
            message=str(exc)[:1000],
            status_code=getattr(exc, "status_code", None),
            attempts=attempts,
            content=content,
        )


class PairResult(BaseModel):
    """The outcome of one (sentence, task) pair: a validated ``answer`` or an ``error``, never both.

    Attributes:
        sentence: the sentence's index (-1 for a task's merge that failed).
        task: the task's name.
        answer: the validated answer, or None.
        error: why there is no answer, or None.
        attempts: the calls made for this pair.
        reasked: whether it was re-asked once after an invalid answer.
        cost: USD spent on this pair over all its attempts (at the run's prices; 0 for an answer from the cache).
    """

    sentence: int
    task: str
    answer: Any | None = None
    error: ErrorInfo | None = None
    attempts: int = 0
    reasked: bool = False
    cost: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class DocumentResult(BaseModel):
    """Everything polytask produced for one document.

    Attributes:
        id, text, metadata: from the input :class:`Document`.
        sentences: the document's sentences with offsets.
        results: task name → the merged document-level result (a task's ``merge`` output).
        pairs: every (sentence, task) outcome, ordered by sentence then task.
        partial: True when any pair failed; ``results`` then cover only the successful sentences
            (each merged result states its coverage).
        usage: tokens, requests and USD spent on this document (the sum of its pairs').
        elapsed: seconds from the document's first call to its last answer.
    """

    id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    sentences: list[Sentence]
    results: dict[str, Any]
    pairs: list[PairResult]
    partial: bool
    usage: Usage
    elapsed: float

    @property
    def errors(self) -> list[PairResult]:
        """The failed pairs."""
        return [p for p in self.pairs if p.error is not None]

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (answers dumped through their pydantic models)."""
        return self.model_dump(mode="json")
