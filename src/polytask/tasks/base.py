"""A task: what to ask about each sentence, the pydantic model its answer must match, and how answers merge.

Example, a user's own task::

    class Product(BaseModel):
        names: list[str]

    products = pt.Task("products", Product, "List the product names mentioned in the sentence.",
                       examples=[("I love my Kindle.", Product(names=["Kindle"]))])
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from ..documents import Sentence

__all__ = ["MergeFunction", "Task", "strict_json_schema"]

AnswerT = TypeVar("AnswerT", bound=BaseModel)

MergeFunction = Callable[[str, Sequence[Sentence], Sequence[Any]], Any]
"""``merge(document_text, sentences, answers)`` → the document-level result; ``answers[i]`` is sentence i's
(post-processed) answer or None where that pair failed."""

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema made valid for OpenAI strict structured outputs.

    Every object gets ``additionalProperties: false`` and lists all its properties as required; ``default``
    values are dropped (strict mode rejects them). ``$defs`` references are kept.
    """
    schema = copy.deepcopy(model.model_json_schema())

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            node.pop("default", None)
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
                node["required"] = list(node["properties"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


class Task(Generic[AnswerT]):
    """One thing to ask about every sentence.

    Args:
        name: unique name of the task in a run (``[a-zA-Z0-9_-]``, at most 64 characters); keys the results.
        answer: the pydantic model an answer must validate against (structured outputs use its JSON schema).
        instruction: what to do, in plain words; the sentence itself is passed separately as data.
        examples: few-shot ``(sentence, answer)`` pairs.
        merge: ``merge(document_text, sentences, answers)`` → the document-level result. Default: the list of
            per-sentence answers (None where a pair failed).
        max_tokens: the most completion tokens an answer may use.

    Raises:
        ConfigurationError: a bad name or a non-positive ``max_tokens``.
    """

    def __init__(
        self,
        name: str,
        answer: type[AnswerT],
        instruction: str,
        *,
        examples: Sequence[tuple[str, AnswerT]] = (),
        merge: MergeFunction | None = None,
        max_tokens: int = 256,
    ) -> None:
        from ..exceptions import ConfigurationError

        if not _NAME.match(name):
            raise ConfigurationError(f"task name {name!r} must match [a-zA-Z0-9_-]{{1,64}}")
        if max_tokens < 1:
            raise ConfigurationError(f"task {name!r}: max_tokens must be ≥ 1, got {max_tokens}")
        self.name = name
        self.answer_model = answer
        self.instruction = instruction
        self.examples = tuple(examples)
        self.max_tokens = max_tokens
        self._merge = merge
        self._schema: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def json_schema(self) -> dict[str, Any]:
        """The strict JSON schema of the answer model (computed once)."""
        if self._schema is None:
            self._schema = strict_json_schema(self.answer_model)
        return self._schema

    def parse(self, content: str) -> AnswerT:
        """Validate an answer's JSON text. Raises ``pydantic.ValidationError`` when it does not match."""
        return self.answer_model.model_validate_json(content)

    def dump_answer(self, answer: AnswerT) -> str:
        """An answer as compact JSON (for few-shot examples)."""
        return answer.model_dump_json()

    def postprocess(self, document_text: str, sentence: Sentence, answer: AnswerT) -> Any:
        """Turn a validated answer into the per-sentence result kept in :class:`~polytask.PairResult` (default:
        the answer itself). :class:`~polytask.Entities` aligns entity offsets here."""
        return answer

    def merge(self, document_text: str, sentences: Sequence[Sentence], answers: Sequence[Any]) -> Any:
        """The document-level result from per-sentence results (None where a pair failed)."""
        if self._merge is not None:
            return self._merge(document_text, sentences, answers)
        return list(answers)
