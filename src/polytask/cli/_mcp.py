"""``polytask mcp``: polytask as a Model Context Protocol server over stdio, on the official ``mcp`` SDK (2.x,
``MCPServer``), for Claude Desktop, IDEs and agent frameworks. Two tools:

- ``analyze_text(text, id?)``: one text → the compact result of :class:`~polytask.AnalyzeTool` (per task its merged
  result, the sentences, the pairs that failed);
- ``analyze_file(input_path, output_path, restart?)``: the job ``polytask run INPUT -o OUTPUT`` runs — the same JSON
  Lines reading (an invalid line becomes an error record in its place), records, partial file and resume, output in
  input order — and a summary of it (:class:`FileSummary`).

Every tool call runs in one orchestrator made at start-up and entered for the server's lifetime: one rate limiter,
request cache, budget and connection pool for all of them, however many calls a client makes at once.

Standard output is the protocol: nothing of polytask's is ever printed there (progress and warnings go to stderr,
which MCP clients log). API keys come from the environment and never appear in a tool's result or error.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import anyio
from pydantic import BaseModel, Field

from ..documents import DocumentResult
from ..exceptions import ConfigurationError, PolytaskError, is_fatal_to_run
from ..orchestrator import Orchestrator
from ..tasks import Task
from ..tools import ID_HELP, TEXT_HELP, AnalyzeTool
from ._journal import Journal, job_fingerprint
from ._jsonl import LINE, SEQ, Input, result_record

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

__all__ = ["FileJob", "FileSummary", "build_server", "check_sdk", "run_file", "serve"]

INSTRUCTIONS = (
    "polytask runs structured language tasks (sentiment, named entities, classification, or custom ones) on every "
    "sentence of a text and merges the answers per text. Use analyze_text for a text in the conversation, "
    "analyze_file for a JSON Lines file of many documents on this machine."
)


class FileSummary(BaseModel):
    """What ``analyze_file`` did.

    Attributes:
        input, output: the files' absolute paths.
        lines: lines in the output, one per non-blank input line.
        complete, partial: documents with every pair answered / with some failed.
        invalid_lines: input lines that could not be read (their output line says why).
        not_started: documents never started because the run stopped.
        resumed: documents an earlier, unfinished run of the same job had finished (kept, not asked again).
        pairs_ok, pairs_failed: (sentence, task) outcomes of this call.
        requests, prompt_tokens, completion_tokens: what this call used (answers from the cache use nothing).
        cost: USD this call spent, or None when the model's prices are unknown.
        stopped: why the run stopped early (a quota, the budget, a rejected key), or None; calling again with the
            same paths resumes it.
        exit_status: what ``polytask run`` would exit with: 0 all complete, 1 partial documents or invalid lines,
            2 stopped.
    """

    input: str
    output: str
    lines: int
    complete: int
    partial: int
    invalid_lines: int
    not_started: int
    resumed: int
    pairs_ok: int
    pairs_failed: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    stopped: str | None
    exit_status: int


@dataclass(frozen=True)
class FileJob:
    """What makes an ``analyze_file`` job the one ``polytask run`` would run (its partial file's fingerprint)."""

    tasks: list[Task[Any]]
    backend_identity: str
    context: int = 0
    text_field: str = "text"
    id_field: str = "id"


class ToolFailure(Exception):
    """A tool call that cannot be done, with the message the client is shown (raised as the SDK's ToolError)."""


def _paths(
    input_path: str, output_path: str, *, cache: Path | None = None, overwrite: bool = False
) -> tuple[Path, Path]:
    """Both paths, absolute, after the checks ``polytask run`` makes (standard input and output are the protocol
    here, so ``-`` is refused), and two more, since a model names them: the output is never the server's request
    cache (``cache``), and an existing file is replaced only with ``overwrite`` (or when it is this job's own
    unfinished output, whose partial file sits beside it).

    Raises:
        ToolFailure: naming the path and what is wrong with it.
    """
    if input_path.strip() == "-" or output_path.strip() == "-":
        raise ToolFailure("standard input and output carry the MCP protocol here: name files, not '-'")
    source, output = Path(input_path).expanduser().absolute(), Path(output_path).expanduser().absolute()
    if not source.exists():
        raise ToolFailure(f"the input {source} does not exist (relative paths start at {Path.cwd()})")
    if not source.is_file():
        raise ToolFailure(f"the input {source} is not a file: name a JSON Lines file")
    if output.is_dir():
        raise ToolFailure(f"the output {output} is a folder: name a file")
    if output.exists() and output.resolve() == source.resolve():
        raise ToolFailure(f"the output {output} is the input file: choose another path")
    if cache is not None and output.resolve() in {Path(f"{cache.resolve()}{end}") for end in ("", "-wal", "-shm")}:
        raise ToolFailure(f"the output {output} is the server's request cache: choose another path")
    resuming = output.with_name(f".{output.name}.partial").exists()
    if output.exists() and output.stat().st_size > 0 and not (overwrite or resuming):
        raise ToolFailure(f"the output {output} exists: pass overwrite=true to replace it, or choose another path")
    if not output.parent.is_dir():
        raise ToolFailure(f"the output folder {output.parent} does not exist")
    return source, output


@dataclass
class _Tally:
    complete: int = 0
    partial: int = 0
    invalid: int = 0
    not_started: int = 0
    pairs_ok: int = 0
    pairs_failed: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def add(self, record: dict[str, Any]) -> None:
        error = record.get("error")
        if error is not None:
            if error.get("type") == "InputError":
                self.invalid += 1
            else:
                self.not_started += 1
            return
        self.partial += bool(record["partial"])
        self.complete += not record["partial"]
        failed = sum(1 for p in record["pairs"] if p.get("error") is not None)
        self.pairs_failed += failed
        self.pairs_ok += len(record["pairs"]) - failed
        usage = record["usage"]
        self.requests += usage["requests"]
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.cost += usage["cost"]


class _TallyingJournal(Journal):
    """The run's partial file, counting each record this call writes."""

    def __init__(self, output: Path, job: str, *, restart: bool) -> None:
        super().__init__(output, job, restart=restart)
        self.tally = _Tally()

    def put(self, seq: int, record: dict[str, Any]) -> None:
        super().put(seq, record)
        self.tally.add(record)


async def run_file(
    orch: Orchestrator,
    job: FileJob,
    input_path: str,
    output_path: str,
    *,
    restart: bool = False,
    overwrite: bool = False,
) -> FileSummary:
    """Run every document of the JSON Lines file ``input_path`` through ``orch`` (entered with ``async with``) and
    write one record per input line to ``output_path``, as ``polytask run`` does: through the output's partial file,
    so a stopped or interrupted call resumes when made again (``restart``: discard what an earlier one left).

    Raises:
        ToolFailure: a path that cannot work, a file that is not JSON Lines, another job's partial file, an output
            that cannot be written; what an error other than a stop raised.
    """
    cache = orch.cache.path if orch.cache is not None else None
    source_path, out_path = _paths(input_path, output_path, cache=cache, overwrite=overwrite)
    source = Input(source_path, job.text_field, job.id_field)
    problem = source.format_problem()
    if problem is not None:  # without the line it quotes: a model asked, and the file may hold anything
        raise ToolFailure(problem.split(" (line ")[0].split(": '")[0])
    fingerprint = job_fingerprint(
        job.tasks,
        job.backend_identity,
        source_path,
        context=job.context,
        text_field=job.text_field,
        id_field=job.id_field,
    )
    try:
        journal = _TallyingJournal(out_path, fingerprint, restart=restart)
    except PolytaskError as error:
        raise ToolFailure(str(error)) from None
    stopped: PolytaskError | None = None
    finished = False
    try:
        documents = source.documents()
        if journal.finished:  # what an earlier call (or `polytask run`) finished is not asked again
            documents = (d for d in documents if not journal.done(d.metadata[LINE], d.id))
        try:
            stream = cast(AsyncGenerator[DocumentResult, None], orch.stream(documents))  # an async generator
            async with contextlib.aclosing(stream) as results:  # closed at once if writing fails
                async for result in results:
                    journal.put(result.metadata[SEQ], result_record(result))
                    journal.flush(source.invalid)
        except PolytaskError as error:
            if not is_fatal_to_run(error):
                raise ToolFailure(f"{type(error).__name__}: {error}") from None
            stopped = error
        journal.flush(source.invalid)
        if stopped is not None:  # what was never started gets its line too
            message = f"not started: the run stopped ({type(stopped).__name__})"
            for doc in documents:
                error_record = {"type": "RunStopped", "message": message}
                journal.put(doc.metadata[SEQ], {"id": doc.id, "line": doc.metadata[LINE], "error": error_record})
            journal.flush(source.invalid)
        journal.drain(source.invalid)
        if journal.mismatch:
            raise ToolFailure(str(stopped))
        try:
            await anyio.to_thread.run_sync(journal.assemble)
        except OSError as error:
            raise ToolFailure(
                f"could not write {out_path}: {error.strerror or error}; every finished document stays in "
                f"{journal.path}: fix the cause and call again (nothing is asked again)"
            ) from None
        finished = True
    finally:
        journal.close(remove=finished and stopped is None)
    tally = journal.tally
    code = 2 if stopped is not None else 1 if tally.partial or tally.invalid else 0
    return FileSummary(
        input=str(source_path),
        output=str(out_path),
        lines=journal.written + journal.resumed,
        complete=tally.complete,
        partial=tally.partial,
        invalid_lines=tally.invalid,
        not_started=tally.not_started,
        resumed=journal.resumed,
        pairs_ok=tally.pairs_ok,
        pairs_failed=tally.pairs_failed,
        requests=tally.requests,
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        cost=round(tally.cost, 6) if orch.stats.prices is not None else None,
        stopped=f"{type(stopped).__name__}: {stopped}" if stopped is not None else None,
        exit_status=code,
    )


def check_sdk() -> None:
    """Raises ConfigurationError, saying how to install it, when the MCP SDK 2.x is not installed."""
    try:
        importlib.import_module("mcp.server.mcpserver")
    except ModuleNotFoundError as error:
        if error.name not in ("mcp", "mcp.server", "mcp.server.mcpserver"):
            raise
        raise ConfigurationError(
            "polytask mcp needs the MCP Python SDK 2.x (mcp.server.mcpserver), which is not installed: "
            "pip install 'polytask[mcp]'"
        ) from None


def build_server(tool: AnalyzeTool, job: FileJob) -> MCPServer[Any]:
    """The MCP server with ``analyze_text`` (``tool``, in its orchestrator) and ``analyze_file`` (the same
    orchestrator, which must be entered while the server runs).

    Raises:
        ConfigurationError: the ``mcp`` SDK is not installed.
    """
    from .._version import __version__

    check_sdk()
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server: MCPServer[Any] = MCPServer("polytask", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")

    async def analyze_text(
        text: Annotated[str, Field(description=TEXT_HELP)],
        id: Annotated[str | None, Field(description=ID_HELP)] = None,
    ) -> dict[str, Any]:
        try:
            return await tool.run(text, id)
        except PolytaskError as error:
            raise ToolError(f"{type(error).__name__}: {error}") from None

    analyze_text.__annotations__["return"] = tool.result_model  # the structured output's schema, and its check
    server.add_tool(analyze_text, name=tool.name, description=tool.description)

    async def analyze_file(
        input_path: Annotated[
            str, Field(description="A JSON Lines file on the server's machine: one {'id', 'text'} object per line.")
        ],
        output_path: Annotated[str, Field(description="Where to write one JSON result per input line.")],
        restart: Annotated[
            bool, Field(description="Discard what an unfinished earlier call left for this output, not resume it.")
        ] = False,
        overwrite: Annotated[
            bool, Field(description="Replace an existing output file (refused otherwise, unless it is being resumed).")
        ] = False,
    ) -> FileSummary:
        try:
            return await run_file(tool.orchestrator, job, input_path, output_path, restart=restart, overwrite=overwrite)
        except ToolFailure as error:
            raise ToolError(str(error)) from None

    server.add_tool(
        analyze_file,
        description=(
            "Run the same tasks as analyze_text on every document of a JSON Lines file, as `polytask run INPUT -o "
            "OUTPUT` does, and return a summary (documents complete / partial, pairs ok / failed, requests, tokens, "
            "cost, the output path). Each output line is one document's full result, in input order; a line that "
            "could not be read says why. A call that stopped early (a quota, the budget) resumes when made again "
            f"with the same paths, paying nothing twice. Relative paths start at {Path.cwd()}."
        ),
    )
    return server


def serve(tool: AnalyzeTool, job: FileJob) -> None:
    """Serve ``tool`` and ``analyze_file`` over stdio until the client closes the connection; the orchestrator is
    entered for the whole time and closed at the end.

    Raises:
        ConfigurationError: the ``mcp`` SDK is not installed.
    """
    server = build_server(tool, job)

    async def main() -> None:
        async with tool.orchestrator:
            await server.run_stdio_async()

    anyio.run(main)
