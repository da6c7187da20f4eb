"""The simulator's Batch API: ``/v1/files`` and ``/v1/batches`` in memory, in OpenAI's shapes (``FileObject``,
``Batch``, the output and error files' lines), so polytask's batch mode and the official SDK can both read them.

* ``POST /v1/files`` (multipart: ``purpose=batch``, ``file``) → a ``file`` object; a file over
  ``batch_max_bytes`` gets a 400 (``File is too large``). ``GET /v1/files/{id}`` → the object;
  ``GET /v1/files/{id}/content`` → its bytes.
* ``POST /v1/batches`` (``input_file_id``, ``endpoint`` ``/v1/chat/completions``, ``completion_window`` ``24h``) →
  a ``batch`` object, ``validating``. Its input is checked at once (400 naming the line: not JSON, no
  ``custom_id``, a repeated one, another ``method`` / ``url``, over ``batch_max_requests`` lines). With
  ``batch_max_in_progress`` batches unfinished, a new one is created ``failed`` with a ``token_limit_exceeded``
  error, as OpenAI fails a batch over the organisation's enqueued-token limit.
* ``GET /v1/batches/{id}`` → the batch: ``in_progress`` from its first retrieval, ``completed`` once
  ``batch_delay`` seconds of the simulator's clock have passed since its creation (the lines are answered then).
  ``POST /v1/batches/{id}/cancel`` → ``cancelled`` (every line in the error file, ``batch_cancelled``);
  ``GET /v1/batches`` → the list, newest first.

Each line is answered as ``POST /v1/chat/completions`` answers its body (:meth:`Simulator.answer_body`: the same
validation, the same deterministic or gold answer). A share ``batch_error_rate`` of lines (a seeded draw) fails:
half with a 500 response, half with an ``{"code": "batch_expired"}`` error and no response. Successful lines go to
the output file, the others to the error file, each as ``{"id", "custom_id", "response": {"status_code",
"request_id", "body"} | null, "error": {"code", "message"} | null}``.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .config import SimulatorConfig, SimulatorStats

__all__ = ["BatchStore"]

_ENDPOINT = "/v1/chat/completions"
_TERMINAL = ("completed", "failed", "expired", "cancelled")


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return web.json_response(body, status=status)


class BatchStore:
    """The files and batches of one simulator, in memory.

    Args:
        config: the simulator's configuration (``batch_*``, ``seed``).
        stats: the simulator's counters (``files_uploaded``, ``batches_created``, …).
        answer: a request body → ``(status, JSON body, outcome)``, as the simulator answers a completion
            (:meth:`~polytask.testing.Simulator.answer_body`).
        clock: monotonic seconds (the simulator's), on which ``batch_delay`` runs.

    Attributes:
        files: file id → (its ``file`` object, its bytes).
        batches: batch id → its ``batch`` object.
        custom_ids: batch id → the custom_ids of its input, in order (what a test checks was submitted).
    """

    def __init__(
        self,
        config: SimulatorConfig,
        stats: SimulatorStats,
        answer: Callable[[Any], tuple[int, dict[str, Any], str]],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.stats = stats
        self.answer = answer
        self.clock = clock
        self.files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.custom_ids: dict[str, list[str]] = {}
        self._lines: dict[str, list[dict[str, Any]]] = {}
        self._created: dict[str, float] = {}
        self._rng = random.Random(config.seed + 2)

    def add_routes(self, app: web.Application, prefix: str) -> None:
        """Mount the endpoints under ``prefix`` (``/v1`` or ``""``)."""
        app.router.add_post(prefix + "/files", self._upload)
        app.router.add_get(prefix + "/files/{id}", self._file)
        app.router.add_get(prefix + "/files/{id}/content", self._content)
        app.router.add_post(prefix + "/batches", self._create)
        app.router.add_get(prefix + "/batches", self._list)
        app.router.add_get(prefix + "/batches/{id}", self._retrieve)
        app.router.add_post(prefix + "/batches/{id}/cancel", self._cancel)

    # -- files -------------------------------------------------------------------------------------------------------

    def _store(self, data: bytes, name: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.files[file_id] = (obj, data)
        return obj

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(upload, web.FileField):
            return _error(400, "Missing required parameter: 'file'.", param="file")
        if purpose != "batch":
            return _error(400, f"The simulator takes files of purpose 'batch' only, got {purpose!r}.", param="purpose")
        data = upload.file.read()
        most = self.config.batch_max_bytes
        if len(data) > most:
            return _error(400, f"File is too large: {len(data):,} bytes, the limit is {most:,} bytes.", param="file")
        self.stats.files_uploaded += 1
        return web.json_response(self._store(data, upload.filename or "upload.jsonl", "batch"))

    async def _file(self, request: web.Request) -> web.Response:
        found = self.files.get(request.match_info["id"])
        if found is None:
            return _error(404, f"No such File object: {request.match_info['id']}", param="id")
        return web.json_response(found[0])

    async def _content(self, request: web.Request) -> web.Response:
        found = self.files.get(request.match_info["id"])
        if found is None:
            return _error(404, f"No such File object: {request.match_info['id']}", param="id")
        return web.Response(body=found[1], content_type="application/octet-stream")

    # -- batches -----------------------------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body must be JSON.")
        if not isinstance(body, dict):
            return _error(400, "The body must be a JSON object.")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or file_id not in self.files:
            return _error(400, f"Cannot find file {file_id}.", param="input_file_id")
        if body.get("endpoint") != _ENDPOINT:
            return _error(400, f"The simulator serves endpoint {_ENDPOINT} only.", param="endpoint")
        if body.get("completion_window") != "24h":
            return _error(400, "completion_window must be '24h'.", param="completion_window")
        lines, problem = self._read_input(self.files[file_id][1])
        if problem is not None:
            return _error(400, problem, param="input_file_id")
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        batch: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": _ENDPOINT,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86_400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else None,
            "model": (lines[0].get("body") or {}).get("model") if lines else None,
        }
        most = self.config.batch_max_in_progress
        unfinished = sum(1 for b in self.batches.values() if b["status"] not in _TERMINAL)
        if most is not None and unfinished >= most:
            message = (
                f"Enqueued token limit reached for {batch['model']} in organization org-simulator. Limit: "
                f"{most} batches in progress. Please try again once some in_progress batches have been completed."
            )
            error = {"code": "token_limit_exceeded", "line": None, "message": message, "param": None}
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [error]})
            self.stats.batches_refused += 1
        else:
            self.stats.batches_created += 1
            self.custom_ids[batch_id] = [line["custom_id"] for line in lines]
            self._lines[batch_id] = lines
        self.batches[batch_id] = batch
        self._created[batch_id] = self.clock()
        return web.json_response(batch)

    def _read_input(self, data: bytes) -> tuple[list[dict[str, Any]], str | None]:
        """The input file's lines, or the first problem found (naming its line)."""
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(data.splitlines(), 1):
            try:
                line = json.loads(raw)
            except ValueError:
                return [], f"Line {number} is not valid JSON."
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                return [], f"Line {number} has no custom_id."
            if line["custom_id"] in seen:
                return [], f"Line {number}: the custom_id {line['custom_id']} is used more than once."
            if line.get("method") != "POST" or line.get("url") != _ENDPOINT:
                return [], f"Line {number}: method and url must be POST {_ENDPOINT}."
            seen.add(line["custom_id"])
            lines.append(line)
        most = self.config.batch_max_requests
        if len(lines) > most:
            return [], f"The batch input file holds {len(lines):,} requests; the limit is {most:,}."
        if not lines:
            return [], "The batch input file is empty."
        return lines, None

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, f"No batch found with id '{request.match_info['id']}'.", param="id")
        if batch["status"] == "validating":
            batch.update(status="in_progress", in_progress_at=int(time.time()))
        elif batch["status"] == "in_progress":
            if self.clock() - self._created[batch["id"]] >= self.config.batch_delay:
                self._run(batch)
        return web.json_response(batch)

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, f"No batch found with id '{request.match_info['id']}'.", param="id")
        if batch["status"] not in _TERMINAL:
            self._run(batch, cancelled=True)
        return web.json_response(batch)

    async def _list(self, request: web.Request) -> web.Response:
        try:
            limit = max(1, min(100, int(request.query.get("limit", "20"))))
        except ValueError:
            return _error(400, "limit must be a whole number.", param="limit")
        newest = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [b["id"] for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        page = newest[:limit]
        return web.json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(newest) > limit,
            }
        )

    def _run(self, batch: dict[str, Any], *, cancelled: bool = False) -> None:
        """Answer every line of ``batch`` (or, ``cancelled``, none) and write its output and error files."""
        output: list[bytes] = []
        errors: list[bytes] = []
        usage = {"input_tokens": 0, "output_tokens": 0}
        rate = self.config.batch_error_rate
        for line in self._lines.pop(batch["id"], []):
            record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line["custom_id"]}
            request_id = f"req_{uuid.uuid4().hex}"
            if cancelled:
                record.update(response=None, error={"code": "batch_cancelled", "message": "The batch was cancelled."})
            elif rate and self._rng.random() < rate:
                if self._rng.random() < 0.5:
                    message = "The server had an error while processing your request. Sorry about that!"
                    error = {"message": message, "type": "server_error", "param": None, "code": None}
                    record.update(response={"status_code": 500, "request_id": request_id, "body": {"error": error}})
                    record["error"] = None
                else:
                    message = "This request could not be executed before the completion window expired."
                    record.update(response=None, error={"code": "batch_expired", "message": message})
            else:
                status, body, _ = self.answer(line.get("body"))
                record.update(response={"status_code": status, "request_id": request_id, "body": body}, error=None)
                if status == 200:
                    usage["input_tokens"] += body["usage"]["prompt_tokens"]
                    usage["output_tokens"] += body["usage"]["completion_tokens"]
            self.stats.batch_lines += 1
            ok = isinstance(record.get("response"), dict) and record["response"]["status_code"] == 200
            (output if ok else errors).append(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        now = int(time.time())
        if output:
            batch["output_file_id"] = self._store(b"".join(output), f"{batch['id']}_output.jsonl", "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._store(b"".join(errors), f"{batch['id']}_error.jsonl", "batch_output")["id"]
        batch["request_counts"] = {"total": len(output) + len(errors), "completed": len(output), "failed": len(errors)}
        batch["usage"] = {
            **usage,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["input_tokens"] + usage["output_tokens"],
        }
        if cancelled:
            batch.update(status="cancelled", cancelling_at=now, cancelled_at=now)
        else:
            batch.update(status="completed", finalizing_at=now, completed_at=now)
