"""Sentiment: a label and a score per sentence, merged into a length-weighted document sentiment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..documents import Sentence
from .base import Task

__all__ = ["DocumentSentiment", "Sentiment", "SentimentAnswer"]

SentimentLabel = Literal["positive", "negative", "neutral", "mixed"]


class SentimentAnswer(BaseModel):
    """One sentence's sentiment: ``score`` in [-1, 1] (-1 most negative, 1 most positive)."""

    model_config = ConfigDict(extra="forbid")

    label: SentimentLabel
    score: float = Field(ge=-1.0, le=1.0)


class DocumentSentiment(BaseModel):
    """A document's sentiment.

    Attributes:
        label: ``mixed`` when at least one sentence is clearly positive and one clearly negative
            (score ≥ ``clear`` / ≤ -``clear``); otherwise positive / negative / neutral by the score.
        score: mean of sentence scores weighted by sentence length in characters, in [-1, 1]; None when no
            sentence succeeded.
        coverage: share of the document's sentence characters whose sentiment is known, in [0, 1].
        sentences: how many sentences contributed.
    """

    label: SentimentLabel | None
    score: float | None
    coverage: float
    sentences: int


class Sentiment(Task[SentimentAnswer]):
    """Sentence sentiment merged per document.

    Args:
        name: result key (default ``"sentiment"``).
        threshold: a document score above ``threshold`` is positive, below ``-threshold`` negative (default 0.25).
        clear: a sentence with ``|score| ≥ clear`` counts as clearly positive / negative for ``mixed`` (default 0.5).
    """

    def __init__(self, name: str = "sentiment", *, threshold: float = 0.25, clear: float = 0.5) -> None:
        super().__init__(
            name,
            SentimentAnswer,
            "Classify the sentiment the sentence expresses. label: positive, negative, neutral (no opinion or "
            "emotion) or mixed (both). score: a number from -1 (very negative) through 0 (neutral) to 1 "
            "(very positive).",
            max_tokens=32,
        )
        self.threshold = threshold
        self.clear = clear

    def merge(self, document_text: str, sentences: Sequence[Sentence], answers: Sequence[Any]) -> DocumentSentiment:
        total = sum(s.end - s.start for s in sentences)
        known = [(s, a) for s, a in zip(sentences, answers, strict=True) if a is not None]
        weight = sum(s.end - s.start for s, _ in known)
        coverage = weight / total if total else 1.0
        if not known:
            return DocumentSentiment(label=None, score=None, coverage=coverage, sentences=0)
        score = sum((s.end - s.start) * a.score for s, a in known) / weight
        positive = any(a.score >= self.clear for _, a in known)
        negative = any(a.score <= -self.clear for _, a in known)
        label: SentimentLabel
        if positive and negative:
            label = "mixed"
        elif score > self.threshold:
            label = "positive"
        elif score < -self.threshold:
            label = "negative"
        else:
            label = "neutral"
        return DocumentSentiment(label=label, score=round(score, 4), coverage=round(coverage, 4), sentences=len(known))
