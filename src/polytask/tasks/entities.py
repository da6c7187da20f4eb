"""Named entities (PER / ORG / LOC / MISC) per sentence, aligned to offsets and merged per document."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..documents import Sentence
from .align import align_mentions
from .base import Task

__all__ = ["DocumentEntities", "Entities", "EntitiesAnswer", "Entity", "EntityMention"]

EntityLabel = Literal["PER", "ORG", "LOC", "MISC"]


class EntityMention(BaseModel):
    """An entity as the model names it: its exact text in the sentence and a label."""

    model_config = ConfigDict(extra="forbid")

    text: str
    label: EntityLabel


class EntitiesAnswer(BaseModel):
    """A sentence's entities, in order of appearance."""

    model_config = ConfigDict(extra="forbid")

    entities: list[EntityMention]


class Entity(BaseModel):
    """An entity with offsets.

    Attributes:
        text: ``document_text[start:end]`` when aligned; the model's text when not.
        label: PER (people), ORG (organizations), LOC (places), MISC (other names).
        start, end: document offsets (``str`` indices, end exclusive); None when unaligned.
        sentence: index of the sentence it came from.
        sentence_start, sentence_end: offsets within that sentence; None when unaligned.
        aligned: False when the model's text was not found in the sentence (kept, flagged, never dropped).
        match: ``"exact"`` or ``"normalized"`` (case / Unicode / whitespace-insensitive), None when unaligned.
    """

    model_config = ConfigDict(frozen=True)

    text: str
    label: EntityLabel
    start: int | None
    end: int | None
    sentence: int
    sentence_start: int | None
    sentence_end: int | None
    aligned: bool
    match: Literal["exact", "normalized"] | None


class DocumentEntities(BaseModel):
    """A document's entities: aligned ones sorted by (start, end) with exact duplicates removed, then the unaligned
    ones in sentence order. ``coverage`` is the share of sentences whose entities are known, in [0, 1]."""

    entities: list[Entity]
    coverage: float


_INSTRUCTION = (
    "List the named entities in the sentence, in order of appearance. For each, copy its text exactly as it is "
    "written in the sentence and give a label: PER (person), ORG (organization, company, team, institution), "
    "LOC (location: country, city, region, address, landmark) or MISC (other proper names: nationalities, "
    "events, products, works). Do not include pronouns or common nouns. If there are none, give an empty list."
)


class Entities(Task[EntitiesAnswer]):
    """Named entities per sentence with sentence and document offsets.

    Args:
        name: result key (default ``"entities"``).
        instruction: replaces the default instruction.
        max_tokens: the most completion tokens per answer (default 512: about 40 entities).
    """

    def __init__(self, name: str = "entities", *, instruction: str | None = None, max_tokens: int = 512) -> None:
        super().__init__(name, EntitiesAnswer, instruction or _INSTRUCTION, max_tokens=max_tokens)

    def postprocess(self, document_text: str, sentence: Sentence, answer: EntitiesAnswer) -> list[Entity]:
        spans = align_mentions(sentence.text, [m.text for m in answer.entities])
        out: list[Entity] = []
        for mention, span in zip(answer.entities, spans, strict=True):
            if span.start is None or span.end is None:
                out.append(
                    Entity(
                        text=mention.text,
                        label=mention.label,
                        start=None,
                        end=None,
                        sentence=sentence.index,
                        sentence_start=None,
                        sentence_end=None,
                        aligned=False,
                        match=None,
                    )
                )
                continue
            start, end = sentence.start + span.start, sentence.start + span.end
            out.append(
                Entity(
                    text=document_text[start:end],
                    label=mention.label,
                    start=start,
                    end=end,
                    sentence=sentence.index,
                    sentence_start=span.start,
                    sentence_end=span.end,
                    aligned=True,
                    match=span.match,
                )
            )
        return out

    def merge(self, document_text: str, sentences: Sequence[Sentence], answers: Sequence[Any]) -> DocumentEntities:
        aligned: dict[tuple[int, int, str], Entity] = {}
        unaligned: list[Entity] = []
        for found in answers:
            for e in found or ():
                if e.aligned:
                    aligned.setdefault((e.start, e.end, e.label), e)
                else:
                    unaligned.append(e)
        ordered = [aligned[k] for k in sorted(aligned)]
        known = sum(1 for a in answers if a is not None)
        coverage = known / len(sentences) if sentences else 1.0
        return DocumentEntities(entities=ordered + unaligned, coverage=round(coverage, 4))
