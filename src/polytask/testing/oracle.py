"""Gold answers for the simulator's oracle mode, from JSON Lines documents with gold entities.

Each line of the gold file is ``{"id", "text", "sentences": [{"start", "end"}], "entities": [{"start",
"end", "label", "text"}]}`` (offsets are ``str`` indices into ``text``, end exclusive). A request's sentence
is looked up first among the gold sentence texts (a dict), then as an exact substring of any document text
(first occurrence). The gold answer is the entities lying wholly inside that occurrence, by start offset.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._prompts import user_value
from .schema_fill import fill_schema, resolve_ref

__all__ = ["GoldEntity", "GoldIndex", "oracle_answer", "packed_answer", "packed_sentences"]


@dataclass(frozen=True)
class GoldEntity:
    """One gold entity: its surface ``text`` (taken from the document) and ``label``; offsets into the doc."""

    text: str
    label: str
    start: int
    end: int


@dataclass(frozen=True)
class _Doc:
    text: str
    entities: tuple[GoldEntity, ...]


class GoldIndex:
    """The gold documents, indexed by sentence text.

    Args:
        path: a JSON Lines gold file (see the module docstring).

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not a JSON object with ``text``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._docs: list[_Doc] = []
        self._sentences: dict[str, tuple[int, int, int]] = {}  # text -> (doc index, start, end)
        self._lookups: dict[str, tuple[int, int, int] | None] = {}
        with self.path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    text = data["text"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{self.path}:{lineno}: not a gold document: {exc}") from exc
                ents = sorted(
                    (
                        GoldEntity(text[e["start"] : e["end"]], str(e["label"]), int(e["start"]), int(e["end"]))
                        for e in data.get("entities") or []
                    ),
                    key=lambda e: (e.start, e.end),
                )
                index = len(self._docs)
                self._docs.append(_Doc(text, tuple(ents)))
                for s in data.get("sentences") or []:
                    start, end = int(s["start"]), int(s["end"])
                    self._sentences.setdefault(text[start:end], (index, start, end))

    def __len__(self) -> int:
        """The number of gold documents."""
        return len(self._docs)

    def _locate(self, sentence: str) -> tuple[int, int, int] | None:
        if sentence in self._lookups:
            return self._lookups[sentence]
        found = self._sentences.get(sentence)
        if found is None and sentence:
            for index, doc in enumerate(self._docs):
                pos = doc.text.find(sentence)
                if pos >= 0:
                    found = (index, pos, pos + len(sentence))
                    break
        if len(self._lookups) < 100_000:
            self._lookups[sentence] = found
        return found

    def __contains__(self, sentence: object) -> bool:
        """Whether ``sentence`` occurs in some gold document."""
        return isinstance(sentence, str) and self._locate(sentence) is not None

    def entities(self, sentence: str) -> list[GoldEntity]:
        """The gold entities wholly inside ``sentence``'s occurrence, by start offset; [] when not found."""
        found = self._locate(sentence)
        if found is None:
            return []
        index, start, end = found
        return [e for e in self._docs[index].entities if start <= e.start and e.end <= end]


def _entity_items(schema: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The item schema of the root ``entities`` array when its items have ``text`` and ``label``."""
    root = resolve_ref(schema, schema)
    prop = (root.get("properties") or {}).get("entities")
    if not isinstance(prop, Mapping):
        return None
    prop = resolve_ref(prop, schema)
    kind = prop.get("type")
    if "array" not in (kind if isinstance(kind, list) else [kind]):
        # nullable arrays come as anyOf [array, null]
        options = [resolve_ref(o, schema) for o in prop.get("anyOf") or []]
        prop = next((o for o in options if o.get("type") == "array"), {})
    items = prop.get("items")
    if not isinstance(items, Mapping):
        return None
    items = resolve_ref(items, schema)
    props = items.get("properties") or {}
    return items if "text" in props and "label" in props else None


def oracle_answer(schema: Mapping[str, Any], sentence: str, gold: GoldIndex, rng: random.Random) -> Any:
    """The answer for ``sentence`` under ``schema``, with gold entities where the schema asks for them.

    When the root object has an ``entities`` array whose items have ``text`` and ``label`` properties, it is
    set to the gold entities inside the sentence (text = the surface text from the document, label = the gold
    label; other item properties are filled from the schema). Everything else is filled by
    :func:`~polytask.testing.schema_fill.fill_schema`.
    """
    answer = fill_schema(schema, rng)
    items = _entity_items(schema)
    if items is None or not isinstance(answer, dict):
        return answer
    out = []
    for ent in gold.entities(sentence):
        item = fill_schema(items, rng, root=schema)
        if not isinstance(item, dict):
            item = {}
        item["text"] = ent.text
        item["label"] = ent.label
        out.append(item)
    answer["entities"] = out
    return answer


def packed_sentences(schema: Mapping[str, Any], messages: Sequence[Mapping[str, str]]) -> list[tuple[int, str]] | None:
    """The numbered sentences of a fused or packed request (:mod:`polytask.packing`): ``[(n, sentence), ...]``
    from the last user message's ``"sentences"``, when ``schema`` asks for ``{"1": {...}, "2": {...}}``; else None."""
    properties = schema.get("properties") or {}
    if not properties or not all(isinstance(key, str) and key.isdigit() for key in properties):
        return None
    listed = user_value(messages, "sentences")
    if not isinstance(listed, list):
        return None
    return [
        (s["n"], s["sentence"])
        for s in listed
        if isinstance(s, dict) and isinstance(s.get("n"), int) and isinstance(s.get("sentence"), str)
    ]


def packed_answer(
    schema: Mapping[str, Any],
    sentences: Sequence[tuple[int, str]],
    answer: Callable[[Mapping[str, Any], str], Any],
) -> dict[str, Any]:
    """The answer to a fused or packed request: one entry per ``(n, sentence)`` under ``str(n)``, each task's part
    ``answer(task_schema, sentence)`` — the answer a request for that sentence and task alone gets."""
    out: dict[str, Any] = {}
    for n, sentence in sentences:
        entry = resolve_ref((schema.get("properties") or {}).get(str(n)) or {}, schema)
        out[str(n)] = {
            name: answer({**sub, "$defs": schema["$defs"]} if schema.get("$defs") else sub, sentence)
            for name, sub in (entry.get("properties") or {}).items()
        }
    return out
