"""The OpenAI Batch API under :class:`~polytask.OpenAIBackend` ``(batch=True)``: calls collected into batches.

Each ``complete(request)`` of a backend in batch mode hands its request body here, under a ``custom_id`` made from
the request's content (:func:`custom_id`), and waits. The requests are collected into a *group*; a group is sealed
when it holds ``max_requests`` requests, when one more would take its input file past ``max_bytes``, or when no new
request came for ``flush_after`` seconds. A sealed group is written as a JSON Lines input file (one line per
request: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``), uploaded (``POST /files``,
``purpose=batch``), submitted (``POST /batches``, ``completion_window`` ``24h``), polled (``GET /batches/{id}``,
every ``poll_every`` seconds, growing 1.5× to ``poll_max``), and once the batch ends its output and error files are
downloaded (``GET /files/{id}/content``) and each waiting call gets its own line back (:class:`LineResult`), in
the order the requests were submitted. The backend reads a line as it reads a live answer, so the caller's
validation, retries and re-asks work unchanged: a re-ask (new messages) or a retry of a failed line is a new
request, collected into the next group — a follow-up batch.

Nobody runs in the background: the first call waiting on a group *drives* it (waits for the flush, submits, polls,
downloads), the others wait for it; a driver that is cancelled hands the group to the next waiter, at the step it
had reached. Creating a batch is shielded from cancellation, so a batch that was created is always recorded.

Resume: with a state file (:mod:`._batch_state`), every upload and batch is recorded with the custom_ids it holds.
A call whose custom_id a recorded batch holds (a run killed mid-batch, then run again) waits for that batch instead
of submitting its request again; a finished batch's lines are read back from its output file. A run that died
between an upload and the batch's creation finds its batch by its input file (``GET /batches``), or creates it.
Within a run a recorded line is used once: a request asked again after its line was delivered (a retry) is sent
anew.

Batch-level failures: a 429 on submitting, or a batch that ``failed`` for a limit (``token_limit_exceeded``: the
organisation's enqueued-token limit), is submitted again after a wait; transient errors of the files and batches
endpoints are retried with backoff; a batch that failed its validation fails each of its calls with a
:class:`~polytask.BadRequestError` naming the reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from .. import exceptions as exc
from .._checks import check_count, check_positive
from .._http import HTTPClient
from ..chat import ChatRequest
from ..limits import Clock, MonotonicClock
from ._batch_state import BatchState, Submission

__all__ = ["BatchOptions", "Batcher", "BatchesAPI", "LineResult", "custom_id", "is_batch_failure"]

logger = logging.getLogger("polytask")

ENDPOINT = "/v1/chat/completions"
_TERMINAL = ("completed", "failed", "expired", "cancelled")
_LIMIT_CODES = ("token_limit_exceeded", "rate_limit_exceeded", "request_limit_exceeded")
_TRANSIENT = (exc.ServerError, exc.APIConnectionError, exc.CircuitOpenError)
_ATTEMPTS = 8  # tries of one files / batches request failing transiently before its calls get the error
_LINE_STATUS = {"batch_expired": 408, "batch_cancelled": 400}
"""The status an error-file line without a response (``{"response": null, "error": {"code": …}}``) is read as:
an expired batch's line is retried (408, a timeout), a cancelled one's is not (someone cancelled it); any other
code is a server error (500, retried)."""


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """How :class:`~polytask.OpenAIBackend` ``(batch=...)`` collects, submits and polls its batches.

    Args:
        max_requests: the most requests in one batch (OpenAI: 50,000).
        max_bytes: the largest input file, bytes (OpenAI: 200 MB); a request whose line alone is larger raises
            :class:`~polytask.BadRequestError` (code ``batch_line_too_large``), as the server would.
        flush_after: seconds without a new request after which the requests collected are submitted (default 0.5).
        poll_every: seconds before the first poll of a batch's status (default 5), growing 1.5× after each poll up
            to ``poll_max`` (default 60); also the first wait before a batch refused for a limit is submitted again.
        completion_window: the batch's ``completion_window`` (OpenAI accepts ``"24h"``).
        clock: the clock the waits run on (default: the real one; tests pass a
            :class:`~polytask.testing.FakeClock`).

    Raises:
        ConfigurationError: a number that is not positive, or a ``max_requests`` that is not a whole number.
    """

    max_requests: int = 50_000
    max_bytes: int = 200_000_000
    flush_after: float = 0.5
    poll_every: float = 5.0
    poll_max: float = 60.0
    completion_window: str = "24h"
    clock: Clock | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_count("max_requests", self.max_requests, allow_none=False)
        check_count("max_bytes", self.max_bytes, allow_none=False)
        for name in ("flush_after", "poll_every", "poll_max"):
            check_positive(name, getattr(self, name), allow_none=False)


@dataclass(frozen=True, slots=True)
class LineResult:
    """One request's line of a finished batch, as the backend reads a live answer.

    Attributes:
        status: the line's HTTP status (200; an error line's ``response.status_code``, or its ``error.code`` read
            as a status, see ``_LINE_STATUS``).
        body: the line's response body: a ``chat.completion`` object, or an ``{"error": …}`` object.
        request_id: the line's ``response.request_id``, else its ``id``.
    """

    status: int
    body: Any
    request_id: str | None = None


def custom_id(model: str, request: ChatRequest, extra_body: Mapping[str, Any] | None = None) -> str:
    """The request's ``custom_id``: ``"pt-"`` and 32 hex digits of the SHA-256 of what makes its answer — the model,
    the messages, the schema (name and JSON schema), the temperature and ``extra_body`` — and not ``max_tokens``
    (a learned completion cap may change it between runs), so a rerun finds the same request in a recorded batch."""
    what = {
        "model": model,
        "messages": request.messages,
        "schema_name": request.schema_name,
        "schema": request.json_schema,
        "temperature": request.temperature,
        "extra": dict(extra_body or {}),
    }
    text = json.dumps(what, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return "pt-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class BatchesAPI:
    """The files and batches endpoints of one OpenAI-compatible server.

    Args:
        base_url: the API root (``https://api.openai.com/v1``).
        headers: the backend's headers (its ``Authorization`` among them; never logged).
        client: the HTTP client to send through (a function: the backend's, chosen per call).
        timeout: seconds per request.
        status_error: the backend's translation of an error status and its decoded body into a polytask error.
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        client: Callable[[], HTTPClient],
        timeout: float,
        status_error: Callable[[int, Any, Mapping[str, str]], exc.APIStatusError],
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        self._client = client
        self.timeout = timeout
        self._status_error = status_error
        self.answered: Callable[[], None] = lambda: None  # told each time the server answers (any status)

    async def _send(self, method: str, path: str, body: bytes | None = None, kind: str | None = None) -> bytes:
        headers = {**self._headers, **({"Content-Type": kind} if kind else {})}
        status, got, content = await self._client().send(method, self.base_url + path, headers, body, self.timeout)
        self.answered()
        if status >= 400:
            raise self._status_error(status, _json(content) if _json(content) is not None else content, got)
        return content

    async def _json(self, method: str, path: str, body: bytes | None = None, kind: str | None = None) -> Any:
        content = await self._send(method, path, body, kind)
        data = _json(content)
        if not isinstance(data, dict):
            start = content[:120].decode("utf-8", "replace")
            raise exc.MalformedResponseError(f"{method} {path} answered with no JSON object: {start!r}")
        return data

    async def upload(self, data: bytes, name: str) -> str:
        """Upload an input file (multipart, ``purpose=batch``); returns its file id."""
        boundary = f"polytask-{uuid.uuid4().hex}"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                "Content-Type: application/jsonl\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        found = await self._json("POST", "/files", body, f"multipart/form-data; boundary={boundary}")
        return _field(found, "id", "an uploaded file")

    async def create(self, file_id: str, window: str, metadata: Mapping[str, str]) -> dict[str, Any]:
        """Create a batch over an uploaded input file; returns the batch object."""
        body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": window, "metadata": metadata}
        found: dict[str, Any] = await self._json("POST", "/batches", json.dumps(body).encode(), "application/json")
        _field(found, "id", "a created batch")
        return found

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        """The batch object now."""
        found: dict[str, Any] = await self._json("GET", f"/batches/{batch_id}")
        return found

    async def find(self, file_id: str) -> dict[str, Any] | None:
        """The batch made over input file ``file_id`` among the 100 newest (``GET /batches``), or None."""
        found = await self._json("GET", "/batches?limit=100")
        for batch in found.get("data") or []:
            if isinstance(batch, dict) and batch.get("input_file_id") == file_id:
                return batch
        return None

    async def content(self, file_id: str) -> bytes:
        """A file's content (a batch's output or error file)."""
        return await self._send("GET", f"/files/{file_id}/content")


def _field(found: dict[str, Any], name: str, what: str) -> str:
    value = found.get(name)
    if not isinstance(value, str) or not value:
        raise exc.MalformedResponseError(f"{what} without an {name!r}: keys {sorted(found)[:8]}")
    return value


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


@dataclass(eq=False)
class _Entry:
    """One request in a group, and the calls waiting for its line."""

    custom_id: str
    line: bytes
    group: _Group
    waiters: int = 0
    result: LineResult | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


@dataclass(eq=False)
class _Group:
    """The requests of one batch, and how far the batch got."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    size: int = 0  # bytes of the input file
    sealed: bool = False
    last_arrival: float = 0.0
    key: int | None = None  # the state file's submission
    file_id: str | None = None
    batch_id: str | None = None
    batch: dict[str, Any] | None = None  # the batch object last seen
    resumed: bool = False  # from the state file: poll at once
    polls: int = 0  # waits before a poll so far (each 1.5× the last)
    done: bool = False
    driving: bool = False
    changed: anyio.Event = field(default_factory=anyio.Event)


class Batcher:
    """Collects calls into batches and hands each its line back (see the module docstring).

    Args:
        api: the server's files and batches endpoints.
        options: limits and timings (:class:`BatchOptions`).
        state: the state file's path, or None for none (a killed run's batches are then not found again).
    """

    def __init__(self, api: BatchesAPI, options: BatchOptions, state: str | os.PathLike[str] | None = None) -> None:
        self.api = api
        self.options = options
        self.clock: Clock = options.clock or MonotonicClock()
        self._state_path = state
        self._state: BatchState | None = None
        self._collecting: _Group | None = None
        self._entries: dict[str, _Entry] = {}  # custom_id → the entry a new call for it joins
        self._loaded: set[int] = set()  # the state's submissions this run has made or taken up
        self.submitted = 0  # batches created by this run (not those resumed)

    @property
    def state(self) -> BatchState | None:
        """The state file, opened on first use (None without one)."""
        if self._state is None and self._state_path is not None:
            self._state = BatchState(self._state_path)
        return self._state

    def close(self) -> None:
        """Close the state file (a later call opens it again)."""
        if self._state is not None:
            self._state.close()
            self._state = None

    async def complete(self, cid: str, body: Mapping[str, Any]) -> LineResult:
        """Submit ``body`` (a chat-completions request body) under ``cid`` in a batch and wait for its line.

        Raises:
            BadRequestError: the request's line alone is over ``max_bytes``.
            PolytaskError: the batch could not be submitted or ended without the line (the error of the files or
                batches endpoint; :class:`~polytask.BadRequestError` for a batch that failed its validation).
        """
        try:
            return await self._complete(cid, body)
        except exc.PolytaskError as error:
            vars(error)[_MARK] = True
            raise

    async def _complete(self, cid: str, body: Mapping[str, Any]) -> LineResult:
        entry = self._join(cid, body)
        entry.waiters += 1
        try:
            while not entry.done:
                group = entry.group
                if group.driving:
                    await group.changed.wait()
                    continue
                group.driving = True
                try:
                    await self._drive(group)
                finally:
                    group.driving = False
                    group.changed.set()
                    group.changed = anyio.Event()
        finally:
            entry.waiters -= 1
            if not entry.done and entry.waiters == 0 and not entry.group.sealed:  # never sent: leave it out
                self._drop(entry)
        if self._entries.get(cid) is entry and entry.waiters == 0:
            del self._entries[cid]  # delivered: a later call for it (a retry) is a new request
        if entry.error is not None:
            raise entry.error
        assert entry.result is not None
        return entry.result

    # -- joining ---------------------------------------------------------------------------------------------------

    def _join(self, cid: str, body: Mapping[str, Any]) -> _Entry:
        """The entry a call for ``cid`` waits on: one already in a group of this run, one of a recorded batch, or a
        new one in the group collecting now."""
        entry = self._entries.get(cid)
        if entry is not None:
            return entry
        resumed = self._resume(cid)
        if resumed is not None:
            return resumed
        line = json.dumps(
            {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}, ensure_ascii=False
        ).encode("utf-8", "surrogatepass")
        line += b"\n"
        if len(line) > self.options.max_bytes:
            raise exc.BadRequestError(  # what the server would answer to its file: never retried
                f"one request's batch line is {len(line):,} bytes, over the batch input file's limit of "
                f"{self.options.max_bytes:,} bytes (BatchOptions.max_bytes)",
                status_code=400,
                code="batch_line_too_large",
            )
        group = self._collecting
        if group is not None and (group.sealed or group.size + len(line) > self.options.max_bytes):
            group.sealed = True
            group = None
        if group is None:
            group = self._collecting = _Group()
        entry = _Entry(cid, line, group)
        group.entries[cid] = entry
        group.size += len(line)
        group.last_arrival = self.clock.now()
        self._entries[cid] = entry
        if len(group.entries) >= self.options.max_requests:
            group.sealed = True
            self._collecting = None
        return entry

    def _drop(self, entry: _Entry) -> None:
        group = entry.group
        if group.entries.pop(entry.custom_id, None) is entry:
            group.size -= len(entry.line)
        if self._entries.get(entry.custom_id) is entry:
            del self._entries[entry.custom_id]

    def _resume(self, cid: str) -> _Entry | None:
        """The entry of ``cid`` in a batch an earlier run recorded (taken up whole, every request of it waiting for
        its line), or None."""
        state = self.state
        if state is None:
            return None
        found = state.latest(cid)
        if found is None or found.key in self._loaded or found.status == "failed":
            return None
        self._loaded.add(found.key)
        group = _Group(sealed=True, key=found.key, file_id=found.file_id, batch_id=found.batch_id, resumed=True)
        if found.status in _TERMINAL:
            group.batch = _recorded(found)
        for other in state.custom_ids(found.key):
            entry = _Entry(other, b"", group)
            group.entries[other] = entry
            self._entries.setdefault(other, entry)
        logger.info(
            "batch API: waiting again for recorded batch %s (%s)", found.batch_id or found.file_id, found.status
        )
        return group.entries[cid]

    # -- driving a group -------------------------------------------------------------------------------------------

    async def _drive(self, group: _Group) -> None:
        """Take ``group`` from where it is to its end: every entry with a line or an error."""
        try:
            while not group.done:
                if not group.sealed:
                    await self._collect(group)
                elif group.batch_id is None:
                    await self._submit(group)
                elif group.batch is None or group.batch.get("status") not in _TERMINAL:
                    await self._poll(group)
                else:
                    await self._finish(group)
        except exc.PolytaskError as error:
            self._fail(group, error)

    async def _collect(self, group: _Group) -> None:
        while not group.sealed:
            if not group.entries:  # every call left before it was sent
                group.done = True
                if self._collecting is group:
                    self._collecting = None
                return
            wait = group.last_arrival + self.options.flush_after - self.clock.now()
            if wait <= 0:
                group.sealed = True
            else:
                await self.clock.sleep(wait)
        if self._collecting is group:
            self._collecting = None

    async def _submit(self, group: _Group) -> None:
        """Upload the group's input file (unless an earlier run did) and create its batch, recording both."""
        state = self.state
        if group.file_id is None:
            data = b"".join(e.line for e in group.entries.values())
            group.file_id = await self._retrying(lambda: self.api.upload(data, "polytask-batch.jsonl"))
            if state is not None:
                group.key = state.uploaded(group.file_id, list(group.entries))
                self._loaded.add(group.key)
        elif group.resumed and group.key is not None:  # an earlier run died around the batch's creation
            found = await self._retrying(lambda: self.api.find(group.file_id or ""))
            if found is not None:
                self._adopt(group, found)
                return
        file_id = group.file_id
        metadata = {"created_by": "polytask"}

        async def create() -> None:
            with anyio.CancelScope(shield=True):  # a batch created is a batch recorded (the waits between tries
                batch = await self.api.create(file_id, self.options.completion_window, metadata)  # are not shielded)
                self.submitted += 1
                self._adopt(group, batch)

        await self._retrying(create, limited=True)
        logger.info("batch API: submitted batch %s with %d request(s)", group.batch_id, len(group.entries))

    def _adopt(self, group: _Group, batch: dict[str, Any]) -> None:
        group.batch_id = str(batch["id"])
        group.batch = batch
        self._record(group)

    def _record(self, group: _Group) -> None:
        state, batch = self.state, group.batch or {}
        if state is not None and group.key is not None:
            state.update(
                group.key,
                batch_id=group.batch_id,
                status=str(batch.get("status") or "validating"),
                output_file_id=batch.get("output_file_id"),
                error_file_id=batch.get("error_file_id"),
            )

    async def _poll(self, group: _Group) -> None:
        """Wait for the batch's next status (at once for a batch taken up from the state file)."""
        if not group.resumed:
            await self.clock.sleep(self._delay(group))
        group.resumed = False
        batch_id = group.batch_id or ""
        group.batch = await self._retrying(lambda: self.api.retrieve(batch_id))
        self._record(group)

    def _delay(self, group: _Group) -> float:
        group.polls += 1
        growth = 1.5 ** min(group.polls - 1, 64)  # (never overflows, however long the batch takes)
        return float(min(self.options.poll_every * growth, self.options.poll_max))

    async def _finish(self, group: _Group) -> None:
        """The batch ended: hand each entry its line (or resubmit a batch refused for a limit)."""
        batch = group.batch or {}
        status = batch.get("status")
        if status == "failed":
            errors = (batch.get("errors") or {}).get("data") or []
            codes = [str(e.get("code")) for e in errors if isinstance(e, dict)]
            said = "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))[:500]
            if any(code in _LIMIT_CODES for code in codes):  # the enqueued-token limit: nothing ran, nothing paid
                logger.warning(
                    "batch API: batch %s refused for a limit (%s); submitting it again later", group.batch_id, said
                )
                await self.clock.sleep(self._delay(group))
                group.batch_id, group.batch = None, None  # the same input file, in a new batch
                return
            raise exc.BadRequestError(
                f"batch {group.batch_id} failed: {said or 'no reason given'}",
                status_code=400,
                code=codes[0] if codes else None,
            )
        lines: dict[str, LineResult] = {}
        for name in ("output_file_id", "error_file_id"):
            file_id = batch.get(name)
            if isinstance(file_id, str) and file_id:
                content = await self._retrying(functools.partial(self.api.content, file_id))
                lines.update(_parse_lines(content))
        missing = exc.ServerError(
            f"batch {group.batch_id} ended {status} without a line for this request", status_code=500
        )
        for cid, entry in group.entries.items():  # in submission order: answers and failures interleave
            line = lines.get(cid)
            if line is None:
                entry.error = missing
            else:
                entry.result = line
        group.done = True

    def _fail(self, group: _Group, error: BaseException) -> None:
        """The group cannot go on: each entry waiting gets ``error``; nothing of it is joined again."""
        for entry in group.entries.values():
            if not entry.done:
                entry.error = error
            if self._entries.get(entry.custom_id) is entry and entry.waiters == 0:
                del self._entries[entry.custom_id]
        group.done = True
        if self._collecting is group:
            self._collecting = None

    async def _retrying(self, step: Callable[[], Awaitable[Any]], *, limited: bool = False) -> Any:
        """``step()``, tried again after a transient failure (a server error, a reset connection; and with
        ``limited``, a 429 for as long as it lasts) with backoff; the error after ``_ATTEMPTS`` tries, or at once for
        any other."""
        tries = 0
        while True:
            try:
                return await step()
            except exc.APIConnectionError as error:
                if not error.connected:  # nothing listening: the backend decides (a wrong base URL)
                    raise
                failure: exc.PolytaskError = error
            except exc.QuotaExceededError:
                raise
            except (exc.RateLimitError, *_TRANSIENT, exc.MalformedResponseError) as error:
                failure = error
            tries += 1
            if tries >= _ATTEMPTS and not (limited and isinstance(failure, exc.RateLimitError)):
                raise failure
            wait = getattr(failure, "retry_after", None) or min(
                self.options.poll_every * 2 ** (tries - 1), self.options.poll_max
            )
            logger.info("batch API: %s; trying again in %.1f s", failure, wait)
            await self.clock.sleep(wait)


_MARK = "polytask_batch_failure"


def is_batch_failure(error: BaseException) -> bool:
    """Whether ``error`` came from the batch itself (its files or batches endpoints, a failed batch), not from a
    request's own line: never a sign of what the server can do with that request (``response_format``, the
    completion cap's field), so the backend does not read it as one."""
    return bool(vars(error).get(_MARK, False))


def _recorded(found: Submission) -> dict[str, Any]:
    """The batch object a finished recorded submission stands for (its files are downloaded again)."""
    return {
        "id": found.batch_id,
        "status": found.status,
        "output_file_id": found.output_file_id,
        "error_file_id": found.error_file_id,
    }


def _parse_lines(content: bytes) -> dict[str, LineResult]:
    """custom_id → its line, from an output or error file (a line that is not JSON, or has no custom_id, is
    skipped: its request then gets the batch's "no line" error, and is retried)."""
    lines: dict[str, LineResult] = {}
    for raw in content.splitlines():
        record = _json(raw) if raw.strip() else None
        if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
            continue
        response = record.get("response")
        line_id = record.get("id") if isinstance(record.get("id"), str) else None
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            request_id = response.get("request_id")
            lines[record["custom_id"]] = LineResult(
                response["status_code"], response.get("body"), request_id if isinstance(request_id, str) else line_id
            )
            continue
        error = record.get("error")
        error = error if isinstance(error, dict) else {"message": str(error or "no response")}
        status = _LINE_STATUS.get(str(error.get("code")), 500)
        lines[record["custom_id"]] = LineResult(status, {"error": error}, line_id)
    return lines
