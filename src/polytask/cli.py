"""The ``polytask`` command: ``polytask run`` for JSON Lines batch jobs, ``polytask simulate`` for a local server.

Exit status of ``run``: 0 when every document succeeded; 1 when any document is partial (unless
``--allow-partial``) or any input line was invalid (its output line says why); 2 when the run stopped early
(insufficient quota, a rejected API key, a server that failed everything for ``--max-outage`` seconds) or could
not start; 130 when interrupted (143 on SIGTERM; the documents
finished by then are kept in the partial file it names, or were already printed with ``-o -``); 141 when the reader
of ``-o -`` went away.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, TextIO

import anyio
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .backends.base import Backend
from .documents import Document, DocumentResult, id_problem, surrogate_problem
from .exceptions import AuthenticationError, PolytaskError, QuotaExceededError, ServerDownError
from .orchestrator import Orchestrator, RunStats
from .retry import RetryPolicy
from .tasks import Classify, Entities, Sentiment, Task

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run structured LLM tasks on every sentence.")
err = Console(stderr=True)


class _ConsoleLog(logging.Handler):
    """polytask's warnings (a circuit opening, a task's own code failing) on stderr, above the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        colour = "red" if record.levelno >= logging.ERROR else "yellow"
        err.print(f"[{colour}]{record.levelname.lower()}:[/] {escape(record.getMessage())}", soft_wrap=True)


def _show_warnings() -> None:
    log = logging.getLogger("polytask")
    if not any(isinstance(h, _ConsoleLog) for h in log.handlers):
        log.addHandler(_ConsoleLog(logging.WARNING))  # (Python's last-resort handler then stays quiet)


TASK_HELP = (
    "sentiment | entities | classify=LABEL1,LABEL2[,…] | classify-multi=LABEL1,LABEL2[,…] "
    "(repeatable; default: sentiment and entities; results are keyed by these names)"
)


def parse_task(spec: str) -> Task[Any]:
    """A built-in task from its CLI spelling (``sentiment``, ``entities``, ``classify=a,b``)."""
    name, _, arg = spec.partition("=")
    name = name.strip().lower()
    if name == "sentiment" and not arg:
        return Sentiment()
    if name == "entities" and not arg:
        return Entities()
    if name in ("classify", "classify-multi") and arg:
        labels = [x.strip() for x in arg.split(",") if x.strip()]
        return Classify(labels, multi_label=name == "classify-multi", name=name)  # both can run at once
    raise typer.BadParameter(f"unknown task {spec!r}; expected {TASK_HELP}", param_hint="--task")


_RESERVED = "_polytask_"
_SEQ, _LINE = "_polytask_seq", "_polytask_line"  # kept in a document's metadata while it runs, then taken out


class _Input:
    """Reads a JSON Lines file lazily; invalid lines become error records that keep their place in the output."""

    def __init__(self, path: Path | None, text_field: str, id_field: str) -> None:
        """``path`` None: standard input."""
        self.path, self.text_field, self.id_field = path, text_field, id_field
        self.invalid: dict[int, dict[str, Any]] = {}  # sequence number → output record not yet written
        self.invalid_count = 0
        self.read = 0  # documents (valid or not) read so far

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """``(line number, bytes)`` of every line that is not blank (a UTF-8 byte order mark on line 1 dropped)."""
        with self.path.open("rb") if self.path is not None else contextlib.nullcontext(sys.stdin.buffer) as f:
            for number, raw in enumerate(f, start=1):
                if number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # Windows tools write one
                if raw.strip():
                    yield number, raw

    def count(self) -> int | None:
        """Documents in the file, or None when it can be read only once (a pipe)."""
        if self.path is None or not self.path.is_file():
            return None
        return sum(1 for _ in self._lines())

    def _record(self, number: int, raw: bytes) -> Document | dict[str, Any]:
        def invalid(message: str, doc_id: str | None = None) -> dict[str, Any]:
            error = {"type": "InputError", "message": f"line {number}: {message}"}
            return {"id": doc_id, "line": number, "error": error}

        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return invalid(f"not UTF-8 text (byte 0x{raw[error.start]:02x} at byte {error.start + 1})")
        try:
            data = json.loads(line)
        except ValueError as error:
            return invalid(f"invalid JSON: {error}")
        if not isinstance(data, dict):
            return invalid("not a JSON object")
        problem = surrogate_problem(data) if "\\u" in line else None  # only a \uXXXX escape makes one
        if problem is not None:
            return invalid(problem)
        doc_id = data.get(self.id_field)
        problem = id_problem(doc_id)
        if problem is not None:
            return invalid(f"field {self.id_field!r} {problem}")
        doc_id = str(number) if doc_id is None else str(doc_id)
        reserved = sorted(k for k in data if k.startswith(_RESERVED))
        if reserved:
            return invalid(f"field names starting with {_RESERVED!r} are reserved: {', '.join(reserved)}", doc_id)
        text = data.get(self.text_field)
        if not isinstance(text, str):
            if self.text_field not in data:
                return invalid(f"field {self.text_field!r} is missing", doc_id)
            return invalid(f"field {self.text_field!r} must be a string, got {type(text).__name__}", doc_id)
        metadata = {k: v for k, v in data.items() if k not in (self.text_field, self.id_field)}
        return Document(id=doc_id, text=text, metadata=metadata)

    def documents(self) -> Iterator[Document]:
        for number, raw in self._lines():
            seq = self.read
            self.read += 1
            record = self._record(number, raw)
            if isinstance(record, Document):
                yield record.model_copy(update={"metadata": {**record.metadata, _SEQ: seq, _LINE: number}})
            else:
                err.print(f"[yellow]skipped[/] {escape(record['error']['message'])}", soft_wrap=True)
                self.invalid[seq] = record
                self.invalid_count += 1


async def _in_thread(items: Iterator[Document]) -> AsyncIterator[Document]:
    """``items``, each one taken on a worker thread (a blocking read does not hold up the event loop)."""
    while (item := await anyio.to_thread.run_sync(next, items, None)) is not None:
        yield item


class _Writer:
    """Writes records in input order (a reorder buffer keyed by sequence number)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.buffer: dict[int, dict[str, Any]] = {}
        self.next = 0
        self.written = 0

    def put(self, seq: int, record: dict[str, Any]) -> None:
        self.buffer[seq] = record

    def flush(self, invalid: dict[int, dict[str, Any]]) -> None:
        while True:
            if self.next in invalid:
                self.buffer[self.next] = invalid.pop(self.next)
            if self.next not in self.buffer:
                break
            self.out.write(json.dumps(self.buffer.pop(self.next), ensure_ascii=False) + "\n")
            self.next += 1
            self.written += 1
        self.out.flush()

    def drain(self, invalid: dict[int, dict[str, Any]]) -> None:
        """Write whatever is still buffered, in order, even across a gap (nothing buffered is ever dropped)."""
        self.buffer.update(invalid)
        invalid.clear()
        for seq in sorted(self.buffer):
            self.out.write(json.dumps(self.buffer.pop(seq), ensure_ascii=False) + "\n")
            self.written += 1
        self.out.flush()


def _result_record(result: DocumentResult) -> dict[str, Any]:
    data = result.to_json_dict()
    data["metadata"].pop(_SEQ, None)
    return {"id": data.pop("id"), "line": data["metadata"].pop(_LINE, None), **data}


def _summary(stats: RunStats, elapsed: float, written: int, invalid: int) -> Table:
    table = Table(title="polytask run", show_header=False)
    rows = [
        ("lines written", f"{written}"),
        (
            "documents complete / partial",
            f"{stats.documents_done - stats.documents_partial} / {stats.documents_partial}",
        ),
        ("invalid input lines", f"{invalid}"),
        ("pairs ok / failed", f"{stats.pairs_done - stats.pairs_failed} / {stats.pairs_failed}"),
        (
            "requests",
            f"{stats.requests} ({stats.requests / elapsed:.1f}/s)" if elapsed else f"{stats.requests}",
        ),
        ("prompt / completion tokens", f"{stats.prompt_tokens:,} / {stats.completion_tokens:,}"),
        ("429s / retries / re-asks", f"{stats.rate_limited} / {stats.retries} / {stats.reasks}"),
        ("elapsed", f"{elapsed:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


async def _run(orch: Orchestrator, source: _Input, writer: _Writer, progress: bool, allow_partial: bool) -> int:
    total = source.count()
    started = time.perf_counter()
    code = 0
    async with orch:
        bar = Progress(
            TextColumn("[bold]documents"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[line]}"),
            TimeRemainingColumn(),
            console=err,
            disable=not progress,
            transient=False,
        )

        def refresh() -> None:
            s = orch.stats
            rate = s.requests / max(1e-9, time.perf_counter() - started)
            line = (
                f"{rate:6.1f} req/s  {s.prompt_tokens + s.completion_tokens:,} tok  "
                f"429s {s.rate_limited}  retries {s.retries}  errors {s.pairs_failed}"
            )
            bar.update(task_id, completed=writer.written, line=line)

        with bar:
            task_id = bar.add_task("run", total=total, line="")
            documents = source.documents()
            # a pipe's next line may be long in coming: read it on a worker thread, so calls go on meanwhile
            reading = documents if total is not None else _in_thread(documents)
            stopped: PolytaskError | None = None
            try:
                async for result in orch.stream(reading):
                    writer.put(result.metadata[_SEQ], _result_record(result))
                    writer.flush(source.invalid)
                    if result.partial and not allow_partial:
                        code = 1
                    refresh()
            except (QuotaExceededError, AuthenticationError, ServerDownError) as error:
                err.print(f"[red]stopped:[/] {escape(str(error))}", soft_wrap=True)
                stopped, code = error, 2
            finally:  # also when interrupted: every finished document is written
                writer.flush(source.invalid)
                if stopped is not None and total is not None:  # what was never started still gets its output line
                    message = f"not started: the run stopped ({type(stopped).__name__})"
                    for doc in documents:
                        record = {"id": doc.id, "line": doc.metadata[_LINE]}
                        writer.put(doc.metadata[_SEQ], {**record, "error": {"type": "RunStopped", "message": message}})
                    writer.flush(source.invalid)
                writer.drain(source.invalid)
            refresh()
    if source.invalid_count or (total is not None and writer.written < total):
        code = max(code, 1)
    err.print(_summary(orch.stats, time.perf_counter() - started, writer.written, source.invalid_count))
    return code


@app.command()
def run(
    input: Annotated[str, typer.Argument(help="JSON Lines input, one document per line; - for standard input.")],
    output: Annotated[
        str,
        typer.Option("--output", "-o", help="JSON Lines output, one line per input document; - for standard output."),
    ],
    task: Annotated[list[str] | None, typer.Option("--task", "-t", help=TASK_HELP)] = None,
    backend: Annotated[str, typer.Option(help="openai | local")] = "openai",
    model: Annotated[str | None, typer.Option(help="Model name (openai) or local path (local).")] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL).")
    ] = None,
    rpm: Annotated[float | None, typer.Option(help="Requests-per-minute limit.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens-per-minute limit.")] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Most calls in flight (default 64; local: 2 × the batch size).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per HTTP call.")] = 60.0,
    attempts: Annotated[int, typer.Option(help="Most attempts per call.")] = 6,
    max_outage: Annotated[
        float,
        typer.Option(help="Stop the run after the server failed every call for this many seconds (0: never)."),
    ] = 300.0,
    context: Annotated[int, typer.Option(help="Neighbouring sentences passed as context on each side.")] = 0,
    text_field: Annotated[str, typer.Option(help="Input field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="Input field holding the document id.")] = "id",
    simulate: Annotated[
        bool,
        typer.Option(help="Run against the built-in simulator (no API key, no network); implied by --simulate-*."),
    ] = False,
    simulate_oracle: Annotated[
        Path | None, typer.Option(help="Gold JSONL the simulator answers entities from.")
    ] = None,
    simulate_faults: Annotated[float, typer.Option(help="Share of simulated calls that fail transiently.")] = 0.0,
    simulate_latency: Annotated[float, typer.Option(help="Median simulated latency, seconds.")] = 0.0,
    progress: Annotated[bool, typer.Option(help="Show a live progress bar.")] = True,
    allow_partial: Annotated[
        bool, typer.Option(help="Exit 0 when every document was written, even if some pairs failed (partial).")
    ] = False,
) -> None:
    """Run tasks on every sentence of every document in INPUT and write one merged result per line to OUTPUT."""
    _check_numbers(
        rpm=rpm,
        tpm=tpm,
        timeout=timeout,
        concurrency=concurrency,
        attempts=attempts,
        max_outage=max_outage,
        context=context,
        simulate_faults=simulate_faults,
        simulate_latency=simulate_latency,
    )
    if backend == "local":
        given = {
            "--base-url": base_url,
            "--rpm": rpm,
            "--tpm": tpm,
            "--timeout": timeout != 60.0 or None,
            "--simulate": simulate or None,
            "--simulate-oracle": simulate_oracle,
            "--simulate-faults": simulate_faults or None,
            "--simulate-latency": simulate_latency or None,
        }
        ignored = [name for name, value in given.items() if value is not None]
        if ignored:
            _fail(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to --backend local")
    try:
        tasks = [parse_task(spec) for spec in (task or ["sentiment", "entities"])]
    except PolytaskError as error:
        _fail(str(error))
    in_path = None if input == "-" else Path(input)  # standard input ("./-" is a file named "-")
    if in_path is not None and not in_path.exists():
        _fail(f"the input {in_path} does not exist")
    if in_path is not None and in_path.is_dir():
        _fail(f"the input {in_path} is a folder: name a JSON Lines file")
    out_path = Path(output)
    to_stdout = output == "-"
    if not to_stdout:
        if in_path is not None and out_path.exists() and out_path.resolve() == in_path.resolve():
            _fail(f"the output {output} is the input file: choose another path (the input would be overwritten)")
        if out_path.is_dir():
            _fail(f"the output {output} is a folder: name a file")
        if not out_path.parent.is_dir():
            _fail(f"the output folder {out_path.parent} does not exist")
    if simulate_oracle is not None and not simulate_oracle.is_file():
        _fail(f"the simulator's gold file {simulate_oracle} does not exist")
    global _TERMINATED
    _TERMINATED = False
    _show_warnings()
    stack = contextlib.ExitStack()
    with stack:
        if threading.current_thread() is threading.main_thread():
            stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, _on_sigterm))
        if simulate or simulate_oracle is not None or simulate_faults or simulate_latency:
            from .testing import run_in_thread

            config = _simulator_config(rpm, tpm, simulate_latency, simulate_oracle, simulate_faults)
            base_url = stack.enter_context(run_in_thread(config)).base_url
        try:
            the_backend = _make_backend(backend, model, base_url, rpm, tpm, timeout)  # a local model loads here
        except KeyboardInterrupt:
            why, code = _interruption()
            err.print(f"[red]{why}:[/] nothing was written", soft_wrap=True)
            raise typer.Exit(code) from None
        try:
            orch = Orchestrator(
                the_backend,
                tasks,
                max_concurrency=concurrency,
                retry=RetryPolicy(attempts=attempts),
                max_outage=max_outage or None,
                context_sentences=context,
            )
        except PolytaskError as error:
            _fail(str(error))
        source = _Input(in_path, text_field, id_field)
        show = progress and sys.stderr.isatty()
        if to_stdout:  # each line as soon as it is in order; an interrupted run keeps what was printed
            try:
                code = anyio.run(_run, orch, source, _Writer(sys.stdout), show, allow_partial)
            except BaseException as error:
                if _holds(error, KeyboardInterrupt):
                    raise typer.Exit(_interruption()[1]) from None
                if _holds(error, BrokenPipeError):  # the reader went away (`| head`): stop quietly, as on SIGPIPE
                    sys.stdout = open(os.devnull, "w")  # Python flushes stdout at exit: not into the closed pipe
                    raise typer.Exit(141) from None
                raise
            raise typer.Exit(code)
        # written beside OUTPUT and renamed over it at the end: an earlier OUTPUT survives a run that does not finish
        partial_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
        writer: _Writer | None = None
        try:
            with partial_path.open("w", encoding="utf-8") as out:
                writer = _Writer(out)
                code = anyio.run(_run, orch, source, writer, show, allow_partial)
        except BaseException as error:
            _keep_partial(partial_path, writer, out_path, error)
            raise
        os.replace(partial_path, out_path)
    raise typer.Exit(code)


def _holds(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error`` is a ``kind``, or an exception group holding one."""
    return isinstance(error, kind) or (isinstance(error, BaseExceptionGroup) and error.subgroup(kind) is not None)


def _interruption() -> tuple[str, int]:
    """How an interrupted run is named and exits: SIGTERM 143, Ctrl-C 130."""
    return ("terminated", 143) if _TERMINATED else ("interrupted", 130)


def _keep_partial(path: Path, writer: _Writer | None, output: Path, error: BaseException) -> None:
    """The run did not finish: keep the documents already written (and say where), or leave nothing behind."""
    interrupted = _holds(error, KeyboardInterrupt)
    why = _interruption()[0] if interrupted else f"failed ({type(error).__name__})"
    if writer is not None and writer.written:
        err.print(
            f"[red]{why}:[/] {writer.written} finished document(s) kept in {escape(str(path))} ({escape(str(output))} "
            "was not written)",
            soft_wrap=True,
        )
    else:
        path.unlink(missing_ok=True)
        err.print(f"[red]{why}:[/] nothing was written", soft_wrap=True)
    if interrupted:
        raise typer.Exit(_interruption()[1]) from None


_TERMINATED = False


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, ``timeout``, a scheduler) ends the run as Ctrl-C does, finished documents kept; exit 143.

    It raises SIGINT rather than ``KeyboardInterrupt`` itself: inside the event loop asyncio turns SIGINT into the
    main task's cancellation, while an exception raised at an arbitrary line could land in the middle of anyio's
    or aiohttp's own bookkeeping."""
    global _TERMINATED
    _TERMINATED = True
    signal.raise_signal(signal.SIGINT)


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _check_numbers(**values: float | None) -> None:
    """Reject impossible settings before anything is opened or started (exit status 2, no traceback)."""
    positive = ("rpm", "tpm", "timeout", "concurrency", "attempts")
    for name, value in values.items():
        if value is None:
            continue
        if not math.isfinite(value):
            _fail(f"--{name.replace('_', '-')} must be a finite number, got {value:g}")
        if name in positive and not value > 0:
            _fail(f"--{name.replace('_', '-')} must be greater than 0, got {value:g}")
        if not value >= 0:
            _fail(f"--{name.replace('_', '-')} must be 0 or more, got {value:g}")
    faults = values.get("simulate_faults") or 0
    if faults > 1:
        _fail(f"--simulate-faults is a share of calls, from 0 to 1, got {faults:g}")


def _make_backend(
    kind: str, model: str | None, base_url: str | None, rpm: float | None, tpm: float | None, timeout: float
) -> Backend:
    try:
        if kind == "openai":
            from .backends.openai import OpenAIBackend

            return OpenAIBackend(model or "gpt-4o-mini", base_url=base_url, rpm=rpm, tpm=tpm, timeout=timeout)
        if kind == "local":
            from .backends.transformers import TransformersBackend

            return TransformersBackend(model)
    except PolytaskError as error:
        _fail(str(error))
    raise typer.BadParameter(f"unknown backend {kind!r}; expected openai or local", param_hint="--backend")


@app.command()
def simulate(
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    rpm: Annotated[float | None, typer.Option(help="Requests-per-minute limit to enforce.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens-per-minute limit to enforce.")] = None,
    latency: Annotated[float, typer.Option(help="Median latency, seconds.")] = 0.0,
    oracle: Annotated[Path | None, typer.Option(help="Gold JSONL to answer entities from.")] = None,
    faults: Annotated[float, typer.Option(help="Share of calls failing transiently (429/500/503/reset).")] = 0.0,
) -> None:
    """Serve the OpenAI-compatible simulator until Ctrl-C."""
    from .testing import serve

    serve(_simulator_config(rpm, tpm, latency, oracle, faults), host, port)


def _simulator_config(rpm: float | None, tpm: float | None, latency: float, oracle: Path | None, faults: float) -> Any:
    """A simulator configuration whose transient faults (429, 500, 503, connection reset) add up to ``faults``."""
    from .testing import FaultRates, SimulatorConfig

    share = faults / 4
    return SimulatorConfig(
        rpm=rpm,
        tpm=tpm,
        latency=latency,
        latency_sigma=0.5 if latency else 0.0,
        gold_path=oracle,
        faults=FaultRates(rate_limit=share, server_error=share, unavailable=share, reset=share),
    )


def main() -> None:
    app()
