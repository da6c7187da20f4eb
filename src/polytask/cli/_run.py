"""The body of ``polytask run`` once its options are checked: stream the documents through the orchestrator with a
progress bar, write each result, and end with a summary and an exit status — to standard output (each line as soon
as it is in input order) or to a file (through its partial file, :mod:`._journal`: a run that does not finish
leaves its finished documents there for the rerun, and an earlier output survives it)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import anyio
import typer
from rich.markup import escape
from rich.table import Table

from ..costs import format_usd
from ..dry_run import DryRun
from ..exceptions import PolytaskError
from ..orchestrator import Orchestrator, RunStats
from ..ray_runner import RayOrchestrator
from . import _jsonl
from ._exits import INVALID, PIPE_CLOSED, STOPPED, err, fail, holds, keep_partial, signals, stops
from ._journal import Journal
from ._jsonl import LINE, SEQ, Input, Writer, in_thread
from ._progress import Reporter, duration

__all__ = ["Progress", "dry_run_table", "run_job", "summary", "write_file", "write_stdout"]


@dataclass(frozen=True)
class Progress:
    """How a run shows its progress: ``bar`` on a terminal; else a line every ``every`` seconds (None: never)."""

    bar: bool
    every: float | None


def summary(stats: RunStats, elapsed: float, written: int, invalid: int, resumed: int = 0) -> Table:
    """The table printed at the end of a run."""
    table = Table(title="polytask run", show_header=False)
    rows = [
        ("lines written", f"{written}"),
        ("documents finished by an earlier run", f"{resumed}"),
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
        ("loose answers recovered (no re-ask)", f"{stats.recovered}"),
        ("answers from the cache", f"{stats.cache_hits}"),
        # never "$0.00" for a model whose prices nobody knows
        ("cost", format_usd(stats.cost) if stats.prices is not None else "unknown (pass --price-in/--price-out)"),
        *([("price per million tokens", stats.prices.describe())] if stats.prices is not None else []),
        ("elapsed", f"{elapsed:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def dry_run_table(plan: DryRun, invalid: int) -> Table:
    """The table ``polytask run --dry-run`` prints."""
    table = Table(title="polytask dry run (no call was made)", show_header=False)
    seconds = plan.seconds
    limits = " / ".join(
        f"{value:,.0f} {name}" for name, value in (("RPM", plan.rpm), ("TPM", plan.tpm)) if value is not None
    )
    rows = [
        ("documents", f"{plan.documents:,}" + (f" (and {invalid} invalid input lines)" if invalid else "")),
        ("sentences", f"{plan.sentences:,}"),
        ("pairs (sentence × task)", f"{plan.pairs:,}"),
        ("answered in the cache (free)", f"{plan.cached:,}"),
        ("calls to make", f"{plan.calls:,} (before re-asks and retries)"),
        ("prompt / completion tokens", f"≈ {plan.prompt_tokens:,} / ≈ {plan.completion_tokens:,}"),
        ("cost", "unknown (pass --price-in/--price-out)" if plan.cost is None else f"≈ {format_usd(plan.cost)}"),
        (
            "time the rate limits allow",
            f"≥ {duration(seconds)} at {limits}" if seconds is not None else "no RPM / TPM limit given (--rpm, --tpm)",
        ),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


async def run_job(
    orch: Orchestrator | RayOrchestrator,
    source: Input,
    writer: Writer | Journal,
    progress: Progress,
    allow_partial: bool,
) -> int:
    """Run every document of ``source`` (but those an earlier run finished, with a :class:`Journal`) and write its
    result; returns the exit status (0, 1 or 2). The summary is printed at the end, also when interrupted."""
    total = source.count()
    journal = writer if isinstance(writer, Journal) else None
    earlier = journal.finished if journal is not None else 0
    started = time.perf_counter()
    code = 0
    try:
        async with orch, anyio.create_task_group() as watching:
            with Reporter(orch.stats, total, earlier, bar=progress.bar, every=progress.every) as reporter:
                watching.start_soon(reporter.watch)
                documents = source.documents()
                if journal is not None and earlier:  # what an earlier run finished is not asked again
                    documents = (d for d in documents if not journal.done(d.metadata[LINE], d.id))
                # a pipe's next line may be long in coming: read it on a worker thread, so calls go on meanwhile
                reading = documents if total is not None else in_thread(documents)
                stopped: PolytaskError | None = None
                try:
                    async for result in orch.stream(reading):
                        writer.put(result.metadata[SEQ], _jsonl.result_record(result))
                        writer.flush(source.invalid)
                        if result.partial and not allow_partial:
                            code = INVALID
                        reporter.update(writer.written)
                except PolytaskError as error:
                    if not stops(error):
                        raise
                    err.print(f"[red]stopped:[/] {escape(str(error))}", soft_wrap=True)
                    stopped, code = error, STOPPED
                finally:  # also when interrupted: every finished document is written
                    writer.flush(source.invalid)
                    if stopped is not None and total is not None:  # what was never started gets its line too
                        message = f"not started: the run stopped ({type(stopped).__name__})"
                        for doc in documents:
                            record = {"id": doc.id, "line": doc.metadata[LINE]}
                            error_record = {"type": "RunStopped", "message": message}
                            writer.put(doc.metadata[SEQ], {**record, "error": error_record})
                        writer.flush(source.invalid)
                    writer.drain(source.invalid)
                reporter.update(writer.written, log=False)
                if progress.every is not None:  # the last line says where the run ended
                    reporter.log()
                watching.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the watcher never fails: the body's own error, not wrapped in a group
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:  # also on Ctrl-C / SIGTERM: what the run did
        resumed = journal.resumed if journal is not None else 0
        if source.read == 0 and code != STOPPED:
            where = source.path if source.path is not None else "standard input"
            err.print(f"[yellow]warning:[/] {escape(str(where))} holds no documents (it is empty, or blank lines only)")
        err.print(summary(orch.stats, time.perf_counter() - started, writer.written, source.invalid_count, resumed))
    if source.invalid_count or (total is not None and writer.written + resumed < total):
        code = max(code, INVALID)
    return code


def write_stdout(orch: Orchestrator | RayOrchestrator, source: Input, show: Progress, allow_partial: bool) -> int:
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


def write_file(
    orch: Orchestrator | RayOrchestrator, source: Input, journal: Journal, show: Progress, allow_partial: bool
) -> int:
    """Through ``journal`` (the output's partial file): the output is assembled once every document has its line;
    the partial file stays for the rerun when the run stopped early (exit 2), was interrupted or died."""
    try:
        code = anyio.run(run_job, orch, source, journal, show, allow_partial)
    except BaseException as error:
        journal.close(remove=False)
        keep_partial(journal.path, journal.finished, journal.output, error)  # this run's and earlier runs'

        raise
    if journal.mismatch:  # the input is not the one the partial file was written for: nothing is assembled
        journal.close(remove=False)
        return code
    try:
        journal.assemble()
    except OSError as error:  # a full disk, a folder made read-only meanwhile: the work stays in the partial file
        journal.close(remove=False)
        fail(
            f"could not write {journal.output}: {error.strerror or error}; every finished document stays in "
            f"{journal.path}: fix the cause and rerun the same command (nothing is asked again)"
        )
    journal.close(remove=code != STOPPED)
    if code == STOPPED:
        err.print(
            f"{escape(str(journal.output))} has every line, those not finished saying why; the finished documents "
            f"stay in {escape(str(journal.path))}: rerun the same command to finish the rest without paying twice",
            soft_wrap=True,
        )
    return code
