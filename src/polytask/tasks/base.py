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

from pydantic import BaseModel, ValidationError

from .._recover import recover_answer
from ..documents import Sentence

__all__ = ["MergeFunction", "Task", "strict_json_schema"]

AnswerT = TypeVar("AnswerT", bound=BaseModel)

MergeFunction = Callable[[str, Sequence[Sentence], Sequence[Any]], Any]
"""``merge(document_text, sentences, answers)`` → the document-level result; ``answers[i]`` is sentence i's
(post-processed) answer or None where that pair failed."""

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# keywords whose value is one subschema, a list of subschemas, or a name → subschema mapping
_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
_NAMED = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema (by alias) made valid for OpenAI strict structured outputs.

    Every object gets ``additionalProperties: false`` (unless it is a mapping, whose values are a schema) and lists
    all its properties as required; ``default`` keywords are dropped (strict mode rejects them; a field named
    ``default`` is kept). ``$defs`` references are kept.
    """
    schema = copy.deepcopy(model.model_json_schema(by_alias=True))
    ref = schema.get("$ref")
    defs = schema.get("$defs") or {}
    if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[8:] in defs:
        # a recursive model or a RootModel: pydantic's root is a bare $ref; structured outputs want the object itself
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **copy.deepcopy(defs[ref[8:]])}

    def walk(node: Any) -> None:
        if not isinstance(node, dict):
            return
        node.pop("default", None)
        if node.get("type") == "object" and "properties" in node:
            if not isinstance(node.get("additionalProperties"), dict):
                node["additionalProperties"] = False
            node["required"] = list(node["properties"])
        for key in _ONE:
            walk(node.get(key))
        for key in _MANY:
            for sub in node.get(key) or ():
                walk(sub)
        for key in _NAMED:
            for sub in (node.get(key) or {}).values():
                walk(sub)

    walk(schema)
    return schema


def _dump(answer: BaseModel, by_alias: bool) -> str:
    try:
        return answer.model_dump_json(by_alias=by_alias, exclude_computed_fields=True)
    except TypeError:  # pydantic < 2.12 has no exclude_computed_fields
        return answer.model_dump_json(by_alias=by_alias)


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
        ConfigurationError: a bad name, ``answer`` not a pydantic model whose JSON schema is an object, an
            ``instruction`` that is not text, an example that is not a ``(str, answer)`` pair valid for the model,
            or a non-positive ``max_tokens``; the message names the task and what is wrong.
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

        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigurationError(f"task name {name!r} must match [a-zA-Z0-9_-]{{1,64}}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ConfigurationError(f"task {name!r}: max_tokens must be an integer ≥ 1, got {max_tokens!r}")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ConfigurationError(f"task {name!r}: instruction must be a non-empty string, got {instruction!r}")
        if not (isinstance(answer, type) and issubclass(answer, BaseModel)):
            raise ConfigurationError(
                f"task {name!r}: answer must be a pydantic BaseModel class, got {answer!r} (wrap a list or a dict "
                "in a model's field)"
            )
        if merge is not None and not callable(merge):
            raise ConfigurationError(f"task {name!r}: merge must be callable, got {type(merge).__name__}")
        self.name = name
        self.answer_model = answer
        self.instruction = instruction
        self.max_tokens = max_tokens
        self._merge = merge
        self._schema: dict[str, Any] | None = None
        try:  # the model's own schema (a subclass's json_schema() may need what its __init__ sets afterwards)
            schema = strict_json_schema(answer)
        except Exception as error:  # e.g. a Callable field: pydantic cannot describe it
            raise ConfigurationError(
                f"task {name!r}: no JSON schema for {answer.__name__}: {type(error).__name__}: {error}"
            ) from None
        if schema.get("type") != "object":
            raise ConfigurationError(
                f"task {name!r}: {answer.__name__}'s JSON schema must be an object (structured outputs answer one), "
                f"got {schema.get('type', 'no type')!r}"
            )
        self.examples = tuple(self._example(i, example) for i, example in enumerate(examples))

    def _example(self, index: int, example: Any) -> tuple[str, AnswerT]:
        from ..exceptions import ConfigurationError

        where = f"task {self.name!r}: example {index}"
        if not (isinstance(example, tuple | list) and len(example) == 2 and isinstance(example[0], str)):
            raise ConfigurationError(f"{where} must be a (sentence, answer) pair, got {example!r}")
        sentence, answer = example
        if isinstance(answer, self.answer_model):
            return sentence, answer  # as given: validated when it was made
        try:  # a dict (or another model with the same fields) is checked against the model
            data = answer.model_dump() if isinstance(answer, BaseModel) else answer
            return sentence, self.answer_model.model_validate(data)
        except ValidationError as error:
            model = self.answer_model.__name__
            raise ConfigurationError(f"{where}: the answer does not match {model}: {error}") from None

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

    def recover(self, content: str) -> str | None:
        """The JSON text an answer that failed :meth:`parse` unambiguously holds, or None; asked before a re-ask.

        Recovered: the one JSON object inside a Markdown code fence or with prose before or after it, and enum
        values (``enum`` / ``const`` of :meth:`json_schema`, nested and through ``$defs`` too) written in another
        case or with surrounding spaces (``"Positive "`` → ``"positive"``, ``"per"`` → ``"PER"``). Never guessed:
        two JSON objects, broken or cut-off JSON, a value matching no member (or two) after ``strip`` and
        ``casefold`` — those still go to the re-ask.

        Returns:
            The answer's JSON object as text, given to :meth:`parse` (which decides: it may still be invalid), or
            None when nothing can be read without guessing. Raises nothing.

        Override to recover more for your task, or to return None for no recovery at all; a task that overrides
        :meth:`parse` gets the recovered text there.

        Example::

            >>> pt.Sentiment().recover('```json\n{"label": "Positive", "score": 0.5}\n```')
            '{"label":"positive","score":0.5}'
        """
        return recover_answer(content, self.json_schema())

    def dump_answer(self, answer: AnswerT) -> str:
        """An answer as compact JSON for few-shot examples: by alias, as the schema names the keys, without computed
        fields (an answer does not hold them); by field name when only that form validates."""
        for by_alias in (True, False):
            text = _dump(answer, by_alias)
            try:
                type(answer).model_validate_json(text)
                return text
            except ValidationError:
                continue
        return _dump(answer, True)

    def postprocess(self, document_text: str, sentence: Sentence, answer: AnswerT) -> Any:
        """Turn a validated answer into the per-sentence result kept in :class:`~polytask.PairResult` (default:
        the answer itself). :class:`~polytask.Entities` aligns entity offsets here."""
        return answer

    def merge(self, document_text: str, sentences: Sequence[Sentence], answers: Sequence[Any]) -> Any:
        """The document-level result from per-sentence results (None where a pair failed)."""
        if self._merge is not None:
            return self._merge(document_text, sentences, answers)
        return list(answers)
