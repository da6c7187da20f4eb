"""One agent tool from the configured tasks: :class:`AnalyzeTool`, and the shapes agent frameworks take it in.

An agent calls ``analyze_text(text, id?)`` and gets back a compact JSON object: per task its merged result (the
sentiment's label and score, the entities with their labels and character offsets, the classification's shares), the
sentences with their offsets, and the pairs that failed. Every call runs in one shared orchestrator (one rate limit,
one cache, one connection pool for all the agent's concurrent turns)::

    orch = pt.Orchestrator(pt.OpenAIBackend(model="gpt-4o-mini", rpm=500), [pt.Sentiment(), pt.Entities()])
    tool = pt.AnalyzeTool(orch, deadline=20)
    tools = [tool.openai_function()]              # Chat Completions; or tool.openai_responses_tool()
    agent = pydantic_ai.Agent(model, tools=[tool.pydantic_ai_tool()])
    agent = agents.Agent(name="analyst", tools=[tool.openai_agents_tool()])
    result = await tool.run("Ada Lovelace met Babbage in London.")

The framework packages are optional (``pip install 'polytask[agents]'``): each exporter imports its own only when it
is called, so ``import polytask`` never imports them.
"""

from __future__ import annotations

import importlib
import json
import re
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model
from pydantic_core import to_jsonable_python

from ._analyze import analyze
from ._checks import check_positive
from .backends.base import Backend
from .documents import DocumentResult, id_problem
from .exceptions import ConfigurationError, InputError
from .orchestrator import Orchestrator
from .tasks import Classify, DocumentEntities, Entities, Sentiment
from .tasks.base import Task

if TYPE_CHECKING:
    from agents import FunctionTool
    from agents.tool_context import ToolContext
    from pydantic_ai import Tool

__all__ = ["AnalyzeTool", "CompactEntities", "CompactEntity", "CompactError", "CompactSentence"]

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # what OpenAI, Anthropic and MCP clients all accept

TEXT_HELP = "The text to analyse, of any length: it is split into sentences and every task runs on each."
ID_HELP = "An identifier of your choosing, echoed in the result as `id` (optional)."


class CompactSentence(BaseModel):
    """A sentence of the text: text[start:end] (offsets in Unicode code points, end exclusive)."""

    index: int
    start: int
    end: int
    text: str


class CompactEntity(BaseModel):
    """A named entity: text[start:end] of the analysed text (offsets in code points, end exclusive); start and end
    are null when the model named text that is not in the sentence (kept, never dropped)."""

    text: str
    label: Literal["PER", "ORG", "LOC", "MISC"] = Field(
        description="PER person, ORG organization, LOC location, MISC another proper name"
    )
    start: int | None
    end: int | None


class CompactEntities(BaseModel):
    """The text's entities in order of their offsets (unaligned ones last); coverage: the share of sentences whose
    entities are known, from 0 to 1."""

    entities: list[CompactEntity]
    coverage: float


class CompactError(BaseModel):
    """A (sentence, task) pair that has no answer: that task's result covers the other sentences only."""

    sentence: int = Field(description="the sentence's index (-1: the task's merge failed)")
    task: str
    type: str = Field(description="the polytask error class, e.g. DeadlineExceededError, AnswerValidationError")
    message: str


def _merged_type(task: Task[Any]) -> Any:
    """The type of ``task``'s merged result, read from its ``merge``'s return annotation (Any when it has none, or
    one pydantic cannot describe); :class:`~polytask.DocumentEntities` is given compactly."""
    try:
        kind = typing.get_type_hints(type(task).merge).get("return", Any)
        TypeAdapter(kind).json_schema()
    except Exception:  # an annotation that does not resolve, or that has no JSON schema
        return Any
    return CompactEntities if kind is DocumentEntities else kind


def _describe(task: Task[Any]) -> str:
    if isinstance(task, Sentiment):
        return (
            "the text's sentiment: label positive / negative / neutral / mixed, score from -1 (very negative) to "
            "1 (very positive), weighted by sentence length; coverage: the share of the text it is known for"
        )
    if isinstance(task, Entities):
        return (
            "named entities (PER person, ORG organization, LOC location, MISC other names), each with its "
            "character offsets start / end in the text"
        )
    if isinstance(task, Classify):
        labels = json.dumps(task.labels, ensure_ascii=False)
        each = "every label that applies to" if task.multi_label else "one label for"
        return f"{each} each sentence, from {labels}: shares (label → share of sentences) and top labels"
    return f"asked of every sentence: {task.instruction!r}; merged over the text"


def _compact_value(value: Any) -> Any:
    if isinstance(value, DocumentEntities):
        entities = [CompactEntity(text=e.text, label=e.label, start=e.start, end=e.end) for e in value.entities]
        return CompactEntities(entities=entities, coverage=value.coverage)
    return value


class AnalyzeTool:
    """An agent tool that runs the configured tasks on one text and returns a compact JSON result.

    Args:
        target: the :class:`~polytask.Orchestrator` every call runs in (shared by concurrent calls: one rate limit,
            one cache, one connection pool), or a :class:`~polytask.Backend` to make one for (left open: close
            your backend yourself).
        tasks: with a backend, the tasks to run (default :class:`~polytask.Sentiment` and
            :class:`~polytask.Entities`); with an orchestrator, leave unset (its tasks run).
        name: the tool's name (``[a-zA-Z0-9_-]``, at most 64 characters; default ``analyze_text``).
        description: what the model is told the tool does (default: written from the tasks).
        deadline: seconds after which a call returns what finished, the pairs not done listed in ``errors`` as
            ``DeadlineExceededError`` (None, the default: wait for every pair).

    Raises:
        ConfigurationError: a bad name or deadline, ``tasks`` given with an orchestrator, or what
            :class:`~polytask.Orchestrator` raises for the tasks (none, duplicate names).

    A call's result (:meth:`result_schema` is its JSON schema)::

        {"id": "turn-7" | null,
         "results": {"sentiment": {"label": "positive", "score": 0.62, "coverage": 1.0, "sentences": 2},
                     "entities": {"entities": [{"text": "Ada Lovelace", "label": "PER", "start": 0, "end": 12}],
                                  "coverage": 1.0}},
         "sentences": [{"index": 0, "start": 0, "end": 35, "text": "Ada Lovelace met Babbage in London."}],
         "errors": [],          # [{"sentence", "task", "type", "message"}]: pairs that failed
         "partial": false}      # true when errors is not empty
    """

    def __init__(
        self,
        target: Orchestrator | Backend,
        *,
        tasks: Sequence[Task[Any]] | None = None,
        name: str = "analyze_text",
        description: str | None = None,
        deadline: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigurationError(f"tool name {name!r} must match [a-zA-Z0-9_-]{{1,64}}")
        check_positive("deadline", deadline)
        if isinstance(target, Orchestrator):
            if tasks is not None:
                raise ConfigurationError(
                    "tasks= applies to a backend: an orchestrator runs its own tasks (make one for these tasks)"
                )
            self.orchestrator = target
        else:
            self.orchestrator = Orchestrator(
                target, list(tasks) if tasks is not None else [Sentiment(), Entities()], close_backend=False
            )
        self.name = name
        self.deadline = deadline
        self.tasks: list[Task[Any]] = list(self.orchestrator.tasks)
        self.description = description if description is not None else self._default_description()
        self.result_model = self._make_result_model()

    def __repr__(self) -> str:
        return f"AnalyzeTool(name={self.name!r}, tasks={[t.name for t in self.tasks]})"

    # -- what the model sees -------------------------------------------------------------------------------------

    def _default_description(self) -> str:
        lines = [f"- {t.name}: {_describe(t)}" for t in self.tasks]
        return (
            "Analyse a text sentence by sentence and return, per task, its result for the whole text:\n"
            + "\n".join(lines)
            + "\nAlso returns the sentences with their character offsets, and `errors`: any (sentence, task) that "
            "failed, whose task's result then covers the other sentences only (`partial` is true)."
        )

    def _make_result_model(self) -> type[BaseModel]:
        fields: dict[str, Any] = {}
        for i, task in enumerate(self.tasks):
            kind = _merged_type(task)  # or null, when the task's merge failed (its error is then in `errors`)
            fields[f"task_{i}"] = (
                kind if kind is Any else kind | None,
                Field(alias=task.name, description=_describe(task)),
            )
        results = create_model("AnalyzeResults", __config__=ConfigDict(extra="forbid"), **fields)
        return create_model(
            "AnalyzeResult",
            __config__=ConfigDict(extra="forbid"),
            id=(str | None, Field(description="the id given with the text, else null")),
            results=(results, Field(description="task name → its result over the whole text")),
            sentences=(list[CompactSentence], ...),
            errors=(list[CompactError], Field(description="the (sentence, task) pairs that failed")),
            partial=(bool, Field(description="true when any pair failed")),
        )

    def parameters_schema(self, *, strict: bool = False) -> dict[str, Any]:
        """The JSON schema of the arguments: ``{"text": string, "id"?: string}``.

        Args:
            strict: the form OpenAI's strict mode takes: every property required, ``id`` nullable.
        """
        if strict:
            text_id: dict[str, Any] = {"type": ["string", "null"], "description": ID_HELP}
            return {
                "type": "object",
                "properties": {"text": {"type": "string", "description": TEXT_HELP}, "id": text_id},
                "required": ["text", "id"],
                "additionalProperties": False,
            }
        return {
            "type": "object",
            "properties": {
                "text": {"type": "string", "description": TEXT_HELP},
                "id": {"type": "string", "description": ID_HELP},
            },
            "required": ["text"],
            "additionalProperties": False,
        }

    def result_schema(self) -> dict[str, Any]:
        """The JSON schema of a call's result (per task the type its ``merge`` returns; any JSON value for a
        task whose ``merge`` says none)."""
        return self.result_model.model_json_schema(by_alias=True)

    # -- calling it --------------------------------------------------------------------------------------------------

    async def run(self, text: str, id: str | None = None) -> dict[str, Any]:
        """Run the tasks on ``text`` in the shared orchestrator.

        Returns:
            The compact result (JSON-ready; see the class docstring and :meth:`result_schema`). A pair that failed
            (a deadline, an invalid answer) is in ``errors``, not raised.

        Raises:
            InputError: ``text`` is not a string (or holds an unpaired surrogate), ``id`` not a string.
            QuotaExceededError, AuthenticationError, BudgetExceededError, …: what stops a run (see
                :meth:`~polytask.Orchestrator.stream`); no later call could succeed either.
        """
        if not isinstance(text, str):
            raise InputError(f"argument 'text' must be a string, got {type(text).__name__}")
        problem = id_problem(id)
        if problem is not None:
            raise InputError(f"argument 'id' {problem}")
        document: str | dict[str, Any] = text if id is None else {"id": str(id), "text": text}
        result = await analyze(document, orchestrator=self.orchestrator, deadline=self.deadline)
        return self.compact(result, given_id=None if id is None else str(id))

    __call__ = run

    async def call_json(self, arguments: str | Mapping[str, Any]) -> str:
        """Run the tool on the arguments a model sent (the JSON text of a tool call, or its parsed object) and
        return the result as JSON text, what a tool message carries.

        Raises:
            InputError: the arguments are not a JSON object of ``text`` (a string) and optionally ``id`` (a string
                or null), naming what is wrong; as :meth:`run` does.
        """
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as error:
                raise InputError(f"the tool's arguments are not JSON: {error}") from None
        if not isinstance(arguments, Mapping):
            raise InputError(f"the tool's arguments must be a JSON object, got {type(arguments).__name__}")
        unknown = sorted(set(arguments) - {"text", "id"})
        if unknown:
            raise InputError(f"unknown argument(s) {', '.join(map(repr, unknown))}: expected 'text' and 'id'")
        if "text" not in arguments:
            raise InputError("argument 'text' is missing")
        result = await self.run(arguments["text"], arguments.get("id"))
        return json.dumps(result, ensure_ascii=False)

    def compact(self, result: DocumentResult, *, given_id: str | None = None) -> dict[str, Any]:
        """``result`` in the tool's compact, JSON-ready shape (validated against :attr:`result_model`)."""
        data = {
            "id": given_id,
            "results": {name: _compact_value(value) for name, value in result.results.items()},
            "sentences": [s.model_dump() for s in result.sentences],
            "errors": [
                {"sentence": p.sentence, "task": p.task, "type": p.error.type, "message": p.error.message}
                for p in result.pairs
                if p.error is not None
            ],
            "partial": result.partial,
        }
        model = self.result_model.model_validate(to_jsonable_python(data))
        dumped: dict[str, Any] = model.model_dump(mode="json", by_alias=True)
        return dumped

    # -- the shapes frameworks take ----------------------------------------------------------------------------

    def openai_function(self, *, strict: bool = True) -> dict[str, Any]:
        """The tool for OpenAI's Chat Completions ``tools=[...]`` (and servers speaking its API):
        ``{"type": "function", "function": {"name", "description", "parameters", "strict"}}``.

        Run a tool call the model made with ``await tool.call_json(call.function.arguments)`` and send the text back
        as ``{"role": "tool", "tool_call_id": call.id, "content": ...}``.

        Args:
            strict: strict mode (the model's arguments always match the schema; ``id`` is then sent as null).
        """
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters_schema(strict=strict),
                "strict": strict,
            },
        }

    def openai_responses_tool(self, *, strict: bool = True) -> dict[str, Any]:
        """The tool for OpenAI's Responses API ``tools=[...]``:
        ``{"type": "function", "name", "description", "parameters", "strict"}``; answer a ``function_call`` item
        with ``{"type": "function_call_output", "call_id": ..., "output": await tool.call_json(item.arguments)}``."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters_schema(strict=strict),
            "strict": strict,
        }

    def pydantic_ai_tool(self, **options: Any) -> Tool[Any]:
        """A ``pydantic_ai.Tool`` for ``Agent(tools=[...])``: its arguments validated by pydantic-ai, a bad text
        sent back to the model as a retry (``ModelRetry``).

        Args:
            options: passed on to ``pydantic_ai.Tool`` (``max_retries``, ``strict``, ``timeout``, …).

        Raises:
            ConfigurationError: pydantic-ai is not installed (``pip install 'polytask[agents]'``).
        """
        _require("pydantic_ai", "pydantic_ai_tool()", "pydantic-ai (pydantic-ai-slim)")
        from pydantic_ai import ModelRetry, Tool

        async def analyze_text(
            text: Annotated[str, Field(description=TEXT_HELP)],
            id: Annotated[str | None, Field(description=ID_HELP)] = None,
        ) -> dict[str, Any]:
            try:
                return await self.run(text, id)
            except InputError as error:
                raise ModelRetry(str(error)) from error

        return Tool(analyze_text, name=self.name, description=self.description, takes_ctx=False, **options)

    def openai_agents_tool(self, *, strict: bool = True) -> FunctionTool:
        """A ``FunctionTool`` for the OpenAI Agents SDK's ``Agent(tools=[...])``. Arguments that are not valid are
        answered with an error text the model can correct; an error that stops the run (a rejected key, no quota)
        is raised.

        Raises:
            ConfigurationError: the OpenAI Agents SDK is not installed (``pip install 'polytask[agents]'``).
        """
        _require("agents", "openai_agents_tool()", "the OpenAI Agents SDK (openai-agents)")
        from agents import FunctionTool

        async def invoke(context: ToolContext[Any], arguments: str) -> str:
            try:
                return await self.call_json(arguments)
            except InputError as error:
                return f"error: {error}"

        return FunctionTool(
            name=self.name,
            description=self.description,
            params_json_schema=self.parameters_schema(strict=strict),
            on_invoke_tool=invoke,
            strict_json_schema=strict,
        )


def _require(module: str, what: str, package: str) -> None:
    """Import ``module``, or raise ConfigurationError naming ``package`` and the extra that installs it (only for
    the package itself missing: an import error inside an installed package is raised as it is)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != module:
            raise
        raise ConfigurationError(
            f"{what} needs {package}, which is not installed: pip install 'polytask[agents]'"
        ) from None
