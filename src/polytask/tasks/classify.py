"""Classification of each sentence into the caller's labels, merged into per-label shares per document."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, create_model

from ..documents import Sentence
from ..exceptions import ConfigurationError
from .base import Task

__all__ = ["Classify", "DocumentLabels"]


class DocumentLabels(BaseModel):
    """A document's classification.

    Attributes:
        shares: label → share of the classified sentences carrying it, in [0, 1].
        top: the label(s) with the highest share (ties all listed; empty when nothing was classified).
            With ``multi_label``, every label carried by at least half the sentences, or the top one.
        coverage: share of sentences classified successfully.
    """

    shares: dict[str, float]
    top: list[str]
    coverage: float


class Classify(Task[BaseModel]):
    """Classify each sentence into one of ``labels`` (or several, with ``multi_label=True``).

    Args:
        labels: the label set (a list of at least two distinct, non-blank strings).
        multi_label: allow several labels per sentence (then zero labels is allowed too).
        name: result key (default ``"classify"``).
        instruction: replaces the default instruction (the label list is appended, as a JSON array).
        max_tokens: the most completion tokens an answer may use (default: enough for the longest label, or for
            every label with ``multi_label``, counting one token per UTF-8 byte, which no byte-level BPE exceeds).

    Raises:
        ConfigurationError: fewer than two labels, labels that are not strings, blank, or that differ only in
            case, Unicode form or surrounding spaces (the model could not tell them apart).
    """

    def __init__(
        self,
        labels: Sequence[str],
        *,
        multi_label: bool = False,
        name: str = "classify",
        instruction: str | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if isinstance(labels, str | bytes) or not isinstance(labels, Sequence):  # a set: no stable order
            raise ConfigurationError(f"Classify needs a list of labels, got {labels!r}")
        labels = list(labels)
        bad = [x for x in labels if not isinstance(x, str) or not x.strip()]
        if bad:
            raise ConfigurationError(f"Classify labels must be non-blank strings, got {bad[0]!r}")
        seen: dict[str, str] = {}
        for label in labels:
            key = unicodedata.normalize("NFKC", label).casefold().strip()
            if key in seen:
                raise ConfigurationError(
                    f"Classify labels {seen[key]!r} and {label!r} differ only in case, Unicode form or spaces"
                )
            seen[key] = label
        if len(labels) < 2:
            raise ConfigurationError(f"Classify needs at least two labels, got {labels!r}")
        self.labels = labels
        self.multi_label = multi_label
        choice: Any = Literal.__getitem__(tuple(labels))
        fields: dict[str, Any] = {"labels": (list[choice], ...)} if multi_label else {"label": (choice, ...)}
        answer = create_model("ClassifyAnswer", __config__=ConfigDict(extra="forbid"), **fields)
        if multi_label:
            default = "Give every label that applies to the sentence (possibly none)."
        else:
            default = "Give the one label that best fits the sentence."
        if max_tokens is None:
            sizes = [len(json.dumps(label, ensure_ascii=False).encode()) for label in labels]
            max_tokens = 24 + (sum(sizes) + len(sizes) if multi_label else max(sizes))  # room for a code fence
        super().__init__(
            name,
            answer,
            f"{instruction or default} Labels: {json.dumps(labels, ensure_ascii=False)}.",
            max_tokens=max_tokens,
        )

    def merge(self, document_text: str, sentences: Sequence[Sentence], answers: Sequence[Any]) -> DocumentLabels:
        known = [a for a in answers if a is not None]
        counts = dict.fromkeys(self.labels, 0)
        for a in known:
            for label in set(a.labels) if self.multi_label else {a.label}:
                counts[label] += 1
        n = len(known)
        shares = {label: round(c / n, 4) if n else 0.0 for label, c in counts.items()}
        best = max(counts.values()) if n else 0
        top = [label for label, c in counts.items() if best and c == best]
        if self.multi_label and n:
            top = [label for label, s in shares.items() if s >= 0.5] or top
        coverage = n / len(sentences) if sentences else 1.0
        return DocumentLabels(shares=shares, top=top, coverage=round(coverage, 4))
