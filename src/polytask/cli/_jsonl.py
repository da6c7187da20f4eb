"""JSON Lines in and out for ``polytask run``: :class:`Input` reads documents lazily (an invalid line becomes an
error record that keeps its place), :class:`Writer` writes one record per input line, in input order."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TextIO

import anyio
from rich.markup import escape

from ..documents import Document, DocumentResult, id_problem, surrogate_problem
from ._exits import err

__all__ = ["LINE", "RESERVED", "SEQ", "Input", "Writer", "in_thread", "result_record"]

RESERVED = "_polytask_"
SEQ, LINE = "_polytask_seq", "_polytask_line"  # kept in a document's metadata while it runs, then taken out


class Input:
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

    def format_problem(self) -> str | None:
        """What is wrong with the whole file, judged by its first line, when it is plainly not JSON Lines (a JSON
        array, CSV / TSV); None when it may be (each line is checked as it is read). Standard input: None."""
        if self.path is None or not self.path.is_file():
            return None
        first = next(self._lines(), None)
        if first is None:
            return None
        line = first[1].decode("utf-8", "replace").strip()
        expects = "polytask expects JSON Lines: one JSON object per line"
        if line.startswith("["):
            return f"{self.path} holds a JSON array; {expects} (convert it with: jq -c '.[]' {self.path})"
        if not line.startswith("{") and ("," in line or "\t" in line):
            try:
                json.loads(line)
            except ValueError:
                kind = "TSV" if "\t" in line else "CSV"
                return f"{self.path} looks like {kind} (line 1: {line[:60]!r}); {expects}, such as " + (
                    '{"id": "1", "text": "..."}'
                )
        return None

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
            line = raw.decode("utf-8").rstrip("\r\n")  # a cut-off line's error then names the cut, not the newline
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
        reserved = sorted(k for k in data if k.startswith(RESERVED))
        if reserved:
            return invalid(f"field names starting with {RESERVED!r} are reserved: {', '.join(reserved)}", doc_id)
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
                yield record.model_copy(update={"metadata": {**record.metadata, SEQ: seq, LINE: number}})
            else:
                err.print(f"[yellow]skipped[/] {escape(record['error']['message'])}", soft_wrap=True)
                self.invalid[seq] = record
                self.invalid_count += 1


async def in_thread(items: Iterator[Document]) -> AsyncIterator[Document]:
    """``items``, each one taken on a worker thread (a blocking read does not hold up the event loop)."""
    while (item := await anyio.to_thread.run_sync(next, items, None)) is not None:
        yield item


class Writer:
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


def result_record(result: DocumentResult) -> dict[str, Any]:
    data = result.to_json_dict()
    data["metadata"].pop(SEQ, None)
    return {"id": data.pop("id"), "line": data["metadata"].pop(LINE, None), **data}
