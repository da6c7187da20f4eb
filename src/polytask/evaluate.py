"""How good a run is against gold annotations: sentence boundaries, entities, sentiment — what ``polytask eval``
prints.

Gold is JSON Lines in the format of ``examples/ewt_dev.jsonl``: per document ``id``, ``text`` and, each optional,
``sentences`` (``[{"start", "end"}]``, character offsets), ``entities`` (``[{"start", "end", "label"}]``, labels
PER / ORG / LOC / MISC) and ``sentiment`` (a document label: positive / negative / neutral / mixed).

Scores are micro-averaged over all documents (counts summed, then precision = tp / (tp + fp), recall = tp / (tp + fn),
F1 their harmonic mean). Sentence boundaries: a boundary is a sentence's end offset moved back past trailing
whitespace, the document's final one left out (the definition of ``benchmarks/segment_f1.py``, so a split is scored
once, not as two wrong spans). Entities: CoNLL-2003's exact match — a predicted entity counts only when its start, end
and label all equal a gold one's; unaligned predicted entities (no offsets) count as false positives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .documents import DocumentResult

__all__ = ["Counts", "EvalScores", "boundaries", "score"]


@dataclass
class Counts:
    """True positives, false positives and false negatives of one kind of span."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, predicted: Iterable[Any], gold: Iterable[Any]) -> None:
        """Count one document's predicted and gold items (hashable: ``(start, end)`` or ``(start, end, label)``)."""
        p, g = Counter(predicted), Counter(gold)
        both = sum((p & g).values())
        self.tp += both
        self.fp += sum(p.values()) - both
        self.fn += sum(g.values()) - both

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class EvalScores:
    """A run's quality against gold.

    Attributes:
        documents: documents scored (those with a result and a gold record).
        sentences: sentence boundaries (documents whose gold has ``sentences``).
        entities: entities, exact ``(start, end, label)`` (documents whose gold has ``entities``).
        entities_by_label: the same per gold / predicted label.
        sentiment_correct, sentiment_total: document sentiment labels equal to gold's (documents whose gold has
            ``sentiment``); ``sentiment_accuracy`` their share (None without any).
    """

    documents: int = 0
    sentences: Counts = field(default_factory=Counts)
    entities: Counts = field(default_factory=Counts)
    entities_by_label: dict[str, Counts] = field(default_factory=dict)
    sentiment_correct: int = 0
    sentiment_total: int = 0

    @property
    def sentiment_accuracy(self) -> float | None:
        return self.sentiment_correct / self.sentiment_total if self.sentiment_total else None


def score(gold: Mapping[str, Mapping[str, Any]], results: Iterable[DocumentResult]) -> EvalScores:
    """Score ``results`` against ``gold`` (document id → gold record); results of documents without gold are skipped.

    Raises:
        ValueError: a gold record whose ``sentences`` or ``entities`` items lack integer ``start`` / ``end`` (named).
    """
    scores = EvalScores()
    for result in results:
        record = gold.get(result.id)
        if record is None:
            continue
        scores.documents += 1
        if "sentences" in record:
            ends = boundaries(result.text, [(s.start, s.end) for s in result.sentences])
            gold_ends = boundaries(result.text, [_span(s, result.id, "sentences") for s in record["sentences"]])
            scores.sentences.add(ends, gold_ends)
        entities = result.results.get("entities")
        if "entities" in record and entities is not None:
            found = [(e.start, e.end, e.label) for e in entities.entities]
            wanted = [(*_span(e, result.id, "entities"), e.get("label")) for e in record["entities"]]
            scores.entities.add(found, wanted)
            for label in {x[2] for x in found} | {x[2] for x in wanted}:
                per = scores.entities_by_label.setdefault(str(label), Counts())
                per.add([x for x in found if x[2] == label], [x for x in wanted if x[2] == label])
        sentiment = result.results.get("sentiment")
        if "sentiment" in record and sentiment is not None:
            scores.sentiment_total += 1
            scores.sentiment_correct += int(sentiment.label == record["sentiment"])
    return scores


def boundaries(text: str, spans: Iterable[tuple[int, int]]) -> set[int]:
    """Sentence ends moved back past trailing whitespace, without the document's final one."""
    ends = set()
    for start, end in spans:
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            ends.add(end)
    ends.discard(len(text.rstrip()))
    return ends


def _span(item: Mapping[str, Any], doc_id: str, what: str) -> tuple[int, int]:
    start, end = item.get("start"), item.get("end")
    if not isinstance(start, int) or not isinstance(end, int):
        raise ValueError(f"gold document {doc_id!r}: an item of {what!r} lacks integer 'start' / 'end': {dict(item)}")
    return start, end
