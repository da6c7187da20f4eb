"""The body of ``polytask run`` once its options are checked: stream the documents through the orchestrator with a
progress bar, write each result in input order, and end with a summary and an exit status — to standard output
(each line as soon as it is in order) or to a file (written beside it, renamed over it at the end, so an earlier
output survives a run that does not finish)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..costs import format_usd
from ..exceptions import PolytaskError
from ..orchestrator import Orchestrator, RunStats
from . import _jsonl
from ._exits import INVALID, PIPE_CLOSED, STOPPED, err, holds, keep_partial, signals, stops
from ._jsonl import LINE, SEQ, Input, Writer, in_thread

__all__ = ["run_job", "summary", "write_file", "write_stdout"]


def summary(stats: RunStats, elapsed: float, written: int, invalid: int) -> Table:
    """The table printed at the end of a run."""
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
        ("answers from the cache", f"{stats.cache_hits}"),
        # never "$0.00" for a model whose prices nobody knows
        ("cost", format_usd(stats.cost) if stats.prices is not None else "unknown (pass --price-in/--price-out)"),
        *([("price per million tokens", stats.prices.describe())] if stats.prices is not None else []),
        ("elapsed", f"{elapsed:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


async def run_job(orch: Orchestrator, source: Input, writer: Writer, progress: bool, allow_partial: bool) -> int:
    """Run every document of ``source`` and write its result; returns the exit status (0, 1 or 2)."""
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
                + (f"  {format_usd(s.cost)}" if s.prices is not None else "")
            )
            bar.update(task_id, completed=writer.written, line=line)

        with bar:
            task_id = bar.add_task("run", total=total, line="")
            documents = source.documents()
            # a pipe's next line may be long in coming: read it on a worker thread, so calls go on meanwhile
            reading = documents if total is not None else in_thread(documents)
            stopped: PolytaskError | None = None
            try:
                async for result in orch.stream(reading):
                    writer.put(result.metadata[SEQ], _jsonl.result_record(result))
                    writer.flush(source.invalid)
                    if result.partial and not allow_partial:
                        code = INVALID
                    refresh()
            except PolytaskError as error:
                if not stops(error):
                    raise
                err.print(f"[red]stopped:[/] {escape(str(error))}", soft_wrap=True)
                stopped, code = error, STOPPED
            finally:  # also when interrupted: every finished document is written
                writer.flush(source.invalid)
                if stopped is not None and total is not None:  # what was never started still gets its output line
                    message = f"not started: the run stopped ({type(stopped).__name__})"
                    for doc in documents:
                        record = {"id": doc.id, "line": doc.metadata[LINE]}
                        writer.put(doc.metadata[SEQ], {**record, "error": {"type": "RunStopped", "message": message}})
                    writer.flush(source.invalid)
                writer.drain(source.invalid)
            refresh()
    if source.invalid_count or (total is not None and writer.written < total):
        code = max(code, INVALID)
    err.print(summary(orch.stats, time.perf_counter() - started, writer.written, source.invalid_count))
    return code


def write_stdout(orch: Orchestrator, source: Input, show: bool, allow_partial: bool) -> int:
    """Each line as soon as it is in order; an interrupted run keeps what was printed."""
    try:
        return anyio.run(run_job, orch, source, Writer(sys.stdout), show, allow_partial)
    except BaseException as error:
        if holds(error, KeyboardInterrupt):
            raise typer.Exit(signals.interruption()[1]) from None
        if holds(error, BrokenPipeError):  # the reader went away (`| head`): stop quietly, as on SIGPIPE
            sys.stdout = open(os.devnull, "w")  # Python flushes stdout at exit: not into the closed pipe
            raise typer.Exit(PIPE_CLOSED) from None
        raise


def write_file(orch: Orchestrator, source: Input, out_path: Path, show: bool, allow_partial: bool) -> int:
    """Written beside ``out_path`` and renamed over it at the end: an earlier output survives a run that does not
    finish, and an unfinished run's documents stay in the partial file it names."""
    partial_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    writer: Writer | None = None
    try:
        with partial_path.open("w", encoding="utf-8") as out:
            writer = Writer(out)
            code = anyio.run(run_job, orch, source, writer, show, allow_partial)
    except BaseException as error:
        keep_partial(partial_path, writer.written if writer is not None else 0, out_path, error)
        raise
    os.replace(partial_path, out_path)
    return code
