"""The partial file of ``polytask run -o FILE``, and how a run resumes from it.

Every finished document's output record is appended to a hidden file beside the output (``.FILE.partial``) the moment
it is done, in completion order, and flushed (fsync'd at most once a second): a run killed in any way (kill -9, OOM,
power loss, Ctrl-C) leaves every document it finished there. The file's first line names the job — a fingerprint of
the tasks (their rendered prompts and schemas), the backend's identity (base URL and model, or the local model), the
options that change an answer, and the input file's SHA-256 — so a later run of the *same* command resumes from it,
and a different job refuses to (``--restart`` discards it on purpose).

Resuming: a record is kept when its document is finished — every pair answered, or failed for a reason a rerun would
meet again (an invalid answer, a refusal, a 400); a document that is not (not started, stopped mid-way, a failure a
rerun could get past) is run again, its answered pairs coming from the request cache. A last line cut off by a death
mid-write is dropped and its document redone. Once every document has its record the output is assembled, one line
per input line in input order (records are found again by their byte offset: memory is 12 bytes per input line,
whatever the records' size), and renamed over ``FILE``; the partial file is then removed unless the run stopped
early (exit 2: a quota, a budget, …), when it stays for the rerun.

Two runs writing one output at once would interleave: the partial file is locked (``flock``) while a run writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .. import exceptions
from .._prompts import build_messages
from ..exceptions import ConfigurationError, PolytaskError, RunStopped
from ..tasks import Task

__all__ = ["Journal", "JournalError", "job_fingerprint", "redo"]

FORMAT = "polytask-partial/1"
FSYNC_EVERY = 1.0  # seconds between fsyncs: a power loss costs at most this much finished work


class JournalError(ConfigurationError):
    """The partial file cannot be used (another job's, locked by a running job, unreadable)."""


def job_fingerprint(tasks: Sequence[Task[Any]], backend: str, input: Path | None, **options: Any) -> str:
    """A SHA-256 hex digest naming one job, the same for the same job on any machine: the tasks (each one's
    rendered prompt, schema and ``max_tokens``), the backend's identity, the input (a regular file's SHA-256; a
    pipe or standard input by name only: its documents are then checked by id as they are read), and ``options``
    (JSON-ready: the settings that change an answer, never limits, budgets or prices)."""
    if input is not None and input.is_file():
        with input.open("rb") as f:
            source = hashlib.file_digest(f, "sha256").hexdigest()
    else:
        source = f"stream:{input or '-'}"
    parts = {
        "tasks": [
            {"name": t.name, "messages": build_messages(t, ""), "schema": t.json_schema(), "max": t.max_tokens}
            for t in tasks
        ],
        "backend": backend,
        "input": source,
        "options": options,
    }
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _could_succeed(error: dict[str, Any] | None) -> bool:
    """Whether a rerun could get past this error: the run stopped before it was done, or it was a failure of the
    server or the way to it rather than of the answer (asked of the exception classes, by name)."""
    if not isinstance(error, dict):
        return False
    kind = getattr(exceptions, str(error.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, PolytaskError)):
        return False  # a task's own code failed: it would again
    return issubclass(kind, RunStopped) or kind.retryable or kind.fatal_to_run


def redo(record: dict[str, Any]) -> bool:
    """Whether a document's output record must be run again on resume (see the module docstring)."""
    if "error" in record:  # an invalid input line (read again anyway) or a document never started
        return True
    pairs = record.get("pairs")
    if not isinstance(pairs, list):
        return True
    return any(_could_succeed(p.get("error")) for p in pairs if isinstance(p, dict))


def _id_hash(doc_id: Any) -> int:
    return zlib.crc32(str(doc_id).encode("utf-8", "surrogatepass"))


class Journal:
    """The partial file of one output: finished documents appended in completion order; one record per input line
    (the last one written wins) assembled in input order at the end.

    Used as the run's writer: ``put(seq, record)``, ``flush(invalid)``, ``drain(invalid)``, ``written``.

    Raises:
        JournalError: the partial file belongs to another job, another run is writing it, or it cannot be read.
    """

    def __init__(self, output: Path, job: str, *, restart: bool = False) -> None:
        self.output = output
        self.path = output.with_name(f".{output.name}.partial")
        self.job = job
        self.written = 0  # records written by this run
        self.resumed = 0  # documents taken from an earlier run
        self.dropped = 0  # bytes of a torn last line dropped
        self._offsets = array("q")  # input line number → byte offset of its latest record, -1: none
        self._done = bytearray()  # input line number → 1 when that record is finished
        self._ids = array("L")  # input line number → crc32 of the record's id
        self._last_sync = time.monotonic()
        self.mismatch = False  # the input changed under an earlier run's records: nothing may be assembled
        self._file: IO[bytes] | None = None
        self._open(restart)

    # -- opening ---------------------------------------------------------------------------------------------------

    def _open(self, restart: bool) -> None:
        try:
            f = self.path.open("a+b")
        except OSError as error:
            raise JournalError(f"cannot write the partial file {self.path}: {error.strerror or error}") from None
        try:
            self._lock(f)
            if restart:
                f.truncate(0)
            f.seek(0)
            self._load(f)
            if f.tell() == 0:
                f.write(json.dumps({"format": FORMAT, "job": self.job}).encode() + b"\n")
                f.flush()
        except BaseException:
            f.close()
            raise
        self._file = f

    def _lock(self, f: IO[bytes]) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one run per output is then the user's to keep
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalError(
                f"another polytask run is writing {self.output} (its partial file {self.path} is locked): "
                "wait for it, or choose another output"
            ) from None

    def _load(self, f: IO[bytes]) -> None:
        """Index an earlier run's records; a torn last line (and anything after it) is cut off."""
        offset = 0
        good = 0
        for raw in iter(f.readline, b""):
            start, offset = offset, offset + len(raw)
            record = self._parse(raw)
            if record is None:
                break  # torn: died mid-write (or garbage after a power loss); redone
            if start == 0:
                self._check_header(record)
            else:
                self._index(record, start, keep=not redo(record))
            good = offset
        size = f.seek(0, os.SEEK_END)
        if size > good:
            self.dropped = size - good
            f.truncate(good)
        f.seek(good)

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any] | None:
        if not raw.endswith(b"\n"):
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def _check_header(self, header: dict[str, Any]) -> None:
        if header.get("format") != FORMAT:
            raise JournalError(
                f"{self.path} is not a polytask partial file of this version: move it away, or pass --restart"
            )
        if header.get("job") != self.job:
            raise JournalError(
                f"{self.path} holds an unfinished run of a different job (another input, tasks, model or "
                f"options) for {self.output}: rerun that job to finish it, pass --restart to discard it, or "
                "choose another output"
            )

    def _index(self, record: dict[str, Any], offset: int, keep: bool) -> None:
        line = record.get("line")
        if not isinstance(line, int) or line < 1:
            return
        if line >= len(self._offsets):
            grow = line + 1 - len(self._offsets)
            self._offsets.extend([-1] * grow)
            self._ids.extend([0] * grow)
            self._done.extend(bytes(grow))
        self._offsets[line] = offset
        self._ids[line] = _id_hash(record.get("id"))
        self._done[line] = 1 if keep else 0

    # -- resuming ----------------------------------------------------------------------------------------------------

    @property
    def finished(self) -> int:
        """Documents of earlier runs that need no new call."""
        return sum(self._done)

    def done(self, line: int, doc_id: str) -> bool:
        """Whether input line ``line`` (document ``doc_id``) was finished by an earlier run.

        Raises:
            JournalError: the earlier run's record for that line is another document's (the input changed).
        """
        if line >= len(self._done) or not self._done[line]:
            return False
        if self._ids[line] != _id_hash(doc_id):
            self.mismatch = True
            raise JournalError(
                f"line {line} of the input is document {doc_id!r}, not the one {self.path} finished there: the "
                "input changed since that run; pass --restart to start over"
            )
        self.resumed += 1
        return True

    # -- writing -----------------------------------------------------------------------------------------------------

    def put(self, seq: int, record: dict[str, Any]) -> None:
        """Append one document's record (``seq`` is not needed: records carry their input line)."""
        assert self._file is not None
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        offset = self._file.tell()
        self._file.write(data)
        self._index(record, offset, keep=not redo(record))
        self.written += 1

    def flush(self, invalid: dict[int, dict[str, Any]]) -> None:
        """Append the invalid input lines read so far, and hand everything to the OS (fsync at most once a
        second)."""
        for seq in sorted(invalid):
            self.put(seq, invalid.pop(seq))
        assert self._file is not None
        self._file.flush()
        now = time.monotonic()
        if now - self._last_sync >= FSYNC_EVERY:
            os.fsync(self._file.fileno())
            self._last_sync = now

    drain = flush

    def assemble(self) -> int:
        """Write the output: the latest record of every input line, in input order, to a file beside it renamed
        over it. Returns the number of lines."""
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        staging = self.output.with_name(f".{self.output.name}.assembling")
        lines = 0
        with self.path.open("rb") as source, staging.open("wb") as out:
            for offset in self._offsets:
                if offset >= 0:
                    source.seek(offset)
                    out.write(source.readline())
                    lines += 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, self.output)
        return lines

    def close(self, *, remove: bool) -> None:
        """Release the lock; ``remove``: the output is complete, the partial file has done its job."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.flush()
            os.fsync(self._file.fileno())
        if remove:
            self.path.unlink(missing_ok=True)
        self._file.close()  # (closing releases the flock)
        self._file = None
