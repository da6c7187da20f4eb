"""Values that flow through a run: input documents, sentences, per-call usage and per-document results.

Offsets everywhere are Python ``str`` indices (code points), end exclusive: ``text[start:end]``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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
    """Token usage as the server reported it (prompt / completion tokens) and the number of HTTP attempts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.requests += requests


class ErrorInfo(BaseModel):
    """Why one (sentence, task) pair has no answer.

    Attributes:
        type: the polytask exception class name (``RateLimitError``, ``AnswerValidationError``, …).
        message: its message (never contains an API key).
        status_code: the HTTP status, when there was one.
        attempts: how many calls were made for this pair.
    """

    model_config = ConfigDict(frozen=True)

    type: str
    message: str
    status_code: int | None = None
    attempts: int = 0

    @classmethod
    def from_exception(cls, exc: BaseException, attempts: int = 0) -> ErrorInfo:
        return cls(
            type=type(exc).__name__,
            message=str(exc)[:1000],
            status_code=getattr(exc, "status_code", None),
            attempts=attempts,
        )


class PairResult(BaseModel):
    """The outcome of one (sentence, task) pair: a validated ``answer`` or an ``error``, never both."""

    sentence: int
    task: str
    answer: Any | None = None
    error: ErrorInfo | None = None
    attempts: int = 0
    reasked: bool = False

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
        usage: tokens and requests spent on this document.
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
