"""How ``polytask run`` talks to the terminal and ends: the stderr console, settings errors (exit 2), interruption by
Ctrl-C (130) or SIGTERM (143), and the partial file an unfinished run leaves behind."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ..exceptions import PolytaskError, is_fatal_to_run

__all__ = [
    "INTERRUPTED",
    "INVALID",
    "OK",
    "PIPE_CLOSED",
    "STOPPED",
    "TERMINATED",
    "Signals",
    "err",
    "fail",
    "holds",
    "keep_partial",
    "show_warnings",
    "signals",
    "stops",
]

OK = 0
"""Every document succeeded."""
INVALID = 1
"""A document is partial (without ``--allow-partial``), or an input line was invalid."""
STOPPED = 2
"""The run stopped early (an error every later call would meet too) or could not start (a bad setting)."""
INTERRUPTED = 130
"""Ctrl-C."""
TERMINATED = 143
"""SIGTERM."""
PIPE_CLOSED = 141
"""The reader of ``-o -`` went away."""

err = Console(stderr=True)


class ConsoleLog(logging.Handler):
    """polytask's warnings (a circuit opening, a task's own code failing) on stderr, above the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        colour = "red" if record.levelno >= logging.ERROR else "yellow"
        err.print(f"[{colour}]{record.levelname.lower()}:[/] {escape(record.getMessage())}", soft_wrap=True)


def show_warnings() -> None:
    log = logging.getLogger("polytask")
    if not any(isinstance(h, ConsoleLog) for h in log.handlers):
        log.addHandler(ConsoleLog(logging.WARNING))  # (Python's last-resort handler then stays quiet)


def fail(message: str) -> NoReturn:
    """A setting or path that cannot work: say so on stderr and exit 2 (no traceback)."""
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(STOPPED)


def stops(error: BaseException) -> bool:
    """Whether ``error`` ends a run with exit 2 (asked of :mod:`polytask.exceptions`, like the orchestrator)."""
    return isinstance(error, PolytaskError) and is_fatal_to_run(error)


def holds(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error`` is a ``kind``, or an exception group holding one."""
    return isinstance(error, kind) or (isinstance(error, BaseExceptionGroup) and error.subgroup(kind) is not None)


class Signals:
    """Whether the run was ended by SIGTERM rather than Ctrl-C (one per process: signal handlers are)."""

    def __init__(self) -> None:
        self.terminated = False

    @contextlib.contextmanager
    def handling_sigterm(self) -> Iterator[None]:
        """SIGTERM ends the run inside as Ctrl-C does (finished documents kept), exit 143; the previous handler is
        restored after. Only the main thread can set signal handlers (elsewhere this does nothing)."""
        self.terminated = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = signal.signal(signal.SIGTERM, self.on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, before)

    def on_sigterm(self, signum: int, frame: Any) -> None:
        """SIGTERM (``kill``, ``timeout``, a scheduler) ends the run as Ctrl-C does.

        It raises SIGINT rather than ``KeyboardInterrupt`` itself: inside the event loop asyncio turns SIGINT into
        the main task's cancellation, while an exception raised at an arbitrary line could land in the middle of
        anyio's or aiohttp's own bookkeeping."""
        self.terminated = True
        signal.raise_signal(signal.SIGINT)

    def interruption(self) -> tuple[str, int]:
        """How an interrupted run is named and exits: SIGTERM 143, Ctrl-C 130."""
        return ("terminated", TERMINATED) if self.terminated else ("interrupted", INTERRUPTED)


signals = Signals()


def keep_partial(path: Path, kept: int, output: Path, error: BaseException) -> None:
    """The run did not finish: keep the ``kept`` finished documents in the partial file ``path`` (and say where, and
    that the same command resumes), or leave nothing behind; an interruption then exits 130 / 143."""
    interrupted = holds(error, KeyboardInterrupt)
    why = signals.interruption()[0] if interrupted else f"failed ({type(error).__name__})"
    if kept:
        err.print(
            f"[red]{why}:[/] {kept} finished document(s) kept in {escape(str(path))} ({escape(str(output))} "
            "was not written): rerun the same command to finish the rest without paying twice",
            soft_wrap=True,
        )
    else:
        path.unlink(missing_ok=True)
        err.print(f"[red]{why}:[/] nothing was written", soft_wrap=True)
    if interrupted:
        raise typer.Exit(signals.interruption()[1]) from None
