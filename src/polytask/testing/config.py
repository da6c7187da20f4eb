"""The simulator's settings (:class:`SimulatorConfig`, :class:`FaultRates`) and counters."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["FAULT_KINDS", "FaultRates", "SimulatorConfig", "SimulatorStats"]

FAULT_KINDS = (
    "rate_limit",
    "insufficient_quota",
    "server_error",
    "bad_gateway",
    "unavailable",
    "hang",
    "reset",
    "malformed",
    "length",
    "refusal",
    "invalid_answer",
    "loose_answer",
    "cut_stream",
)
"""Fault names, in the order a request's random draw is matched against their rates."""


class FaultRates(BaseModel):
    """Per-request probabilities (0–1, summing to at most 1) of each injected fault.

    Attributes:
        rate_limit: 429 ``rate_limit_exceeded`` with ``retry-after`` and ``x-ratelimit-*`` headers.
        insufficient_quota: 429 with code ``insufficient_quota`` (``x-ratelimit-*`` headers, no
            ``retry-after``).
        server_error: 500 with an OpenAI ``server_error`` body.
        bad_gateway: 502 with an HTML body (``text/html``), as a proxy sends.
        unavailable: 503 with an OpenAI "overloaded" body.
        hang: no response for ``hang_seconds`` (past a client's timeout), then a normal answer.
        reset: the TCP connection is aborted with no response.
        malformed: 200 whose JSON body is cut in half.
        length: 200, ``finish_reason: "length"``, content cut in half, ``completion_tokens = max_tokens``.
        refusal: 200, ``content: null``, ``message.refusal`` set.
        invalid_answer: 200 with valid JSON that violates the schema (see
            :func:`~polytask.testing.schema_fill.violate_schema`).
        loose_answer: 200 with a valid answer written loosely, as servers without structured outputs do: in a code
            fence, inside prose, or with enum values in another case (see
            :func:`~polytask.testing.schema_fill.loosen_answer`).
        cut_stream: 200, then the connection is aborted mid-answer: a streamed answer (``"stream": true``) after
            its role chunk and half its content pieces, before any ``finish_reason`` or ``[DONE]``; any other after
            half its body (a ``Content-Length`` it never reaches).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_limit: float = Field(default=0.0, ge=0, le=1)
    insufficient_quota: float = Field(default=0.0, ge=0, le=1)
    server_error: float = Field(default=0.0, ge=0, le=1)
    bad_gateway: float = Field(default=0.0, ge=0, le=1)
    unavailable: float = Field(default=0.0, ge=0, le=1)
    hang: float = Field(default=0.0, ge=0, le=1)
    reset: float = Field(default=0.0, ge=0, le=1)
    malformed: float = Field(default=0.0, ge=0, le=1)
    length: float = Field(default=0.0, ge=0, le=1)
    refusal: float = Field(default=0.0, ge=0, le=1)
    invalid_answer: float = Field(default=0.0, ge=0, le=1)
    loose_answer: float = Field(default=0.0, ge=0, le=1)
    cut_stream: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_at_most_one(self) -> Self:
        total = sum(getattr(self, k) for k in FAULT_KINDS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total:g}; they must sum to at most 1")
        return self


class SimulatorConfig(BaseModel):
    """How the simulator behaves.

    Attributes:
        model: the model name ``GET /v1/models`` lists (requests may name any model; it is echoed back).
        rpm: requests per minute, or None for unlimited.
        tpm: tokens per minute, or None for unlimited. A call is charged prompt estimate + max tokens.
        latency: median seconds before an answer (0 = answer at once).
        latency_sigma: the lognormal sigma around ``latency`` (0 = always exactly ``latency``).
        seed: seeds answers (per sentence), the fault draws and the latency draws.
        faults: :class:`FaultRates` (a dict of rates is accepted).
        hang_seconds: how long a ``hang`` fault keeps the request open, in seconds.
        fault_retry_after: seconds an injected ``rate_limit`` 429 asks the client to wait.
        default_max_tokens: the max tokens assumed when a request gives none (for TPM charging).
        supports_json_schema: when False, ``response_format: json_schema`` gets a ``json_schema_status`` error;
            ``json_object`` still works.
        json_schema_status: the status a ``json_schema`` request gets when ``supports_json_schema`` is False: 400
            (default), an OpenAI error naming ``response_format`` (as vLLM / older servers do), or any other, a bare
            status with its reason phrase as a plain-text body (500: a server that crashes on it).
        reads_max_completion_tokens: when False, the server reads the completion cap from ``max_tokens`` only and
            ignores ``max_completion_tokens`` (older vLLM, llama.cpp, Ollama): answers run to their full length.
        max_concurrency: a hidden cap: a completion arriving while this many are in flight gets a 503 with no
            rate-limit headers. None = no cap.
        serve_at_once: a server that works on at most this many completions at once and queues the rest, first in
            first out, never refusing one (a local llama.cpp or Ollama with N slots): each takes its ``latency`` draw
            once its turn comes, so ``L`` calls in flight wait about ``L / serve_at_once`` latencies. A request whose
            client went away (a timeout) is still served when its turn comes, as those servers do, and holds up the
            ones behind it. None (default) = every request is served at once.
        daily_quota: completion requests let through before a daily quota is spent (it never refills): every later
            one gets a 429 ``rate_limit_exceeded`` on requests per day (RPD) asking to wait
            ``daily_quota_retry_after``. None = no daily quota.
        daily_quota_retry_after: seconds a spent ``daily_quota`` asks the client to wait (``retry-after``).
        rpm_window: the seconds over which ``rpm`` is enforced (Azure OpenAI evaluates RPM over 1 or 10 seconds): at
            most ``rpm × rpm_window / 60`` requests at once, refilled at ``rpm / 60`` a second; 60 (default) is the
            whole minute.
        announce_window: send ``RateLimit-Policy: {burst};w={rpm_window}`` (the IETF draft's header) on every
            response, so a client can learn the short window; only with ``rpm_window`` < 60.
        rate_limit_headers: when False, no ``x-ratelimit-*``, ``retry-after`` or ``retry-after-ms`` header on any
            response: a 429 says how long to wait only in its message ("Please try again in 1.2s"), as some gateways
            do.
        gold_path: a gold JSON Lines file for oracle answers (see :mod:`polytask.testing.oracle`), or None.
        batch_delay: seconds of the simulator's clock from a batch's creation until it is ``completed`` (its lines
            answered at its first retrieval after that; see :mod:`polytask.testing.batches`).
        batch_error_rate: the share of batch lines (0–1, a seeded draw) that fail: half with a 500 response, half
            with a ``batch_expired`` error and no response.
        batch_max_requests: the most requests in one batch's input file (OpenAI: 50,000): creating a batch over
            more gets a 400.
        batch_max_bytes: the largest input file, bytes (OpenAI: 200 MB): a larger upload gets a 400.
        batch_max_in_progress: the most batches unfinished at once: a batch created past it is ``failed`` at once
            with a ``token_limit_exceeded`` error (OpenAI's enqueued-token limit); None = no limit.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "sim-model"
    rpm: float | None = Field(default=None, gt=0)
    tpm: float | None = Field(default=None, gt=0)
    latency: float = Field(default=0.0, ge=0)
    latency_sigma: float = Field(default=0.0, ge=0)
    seed: int = 0
    faults: FaultRates = FaultRates()
    hang_seconds: float = Field(default=30.0, ge=0)
    fault_retry_after: float = Field(default=1.0, ge=0)
    default_max_tokens: int = Field(default=4096, gt=0)
    supports_json_schema: bool = True
    json_schema_status: int = Field(default=400, ge=400, le=599)
    reads_max_completion_tokens: bool = True
    max_concurrency: int | None = Field(default=None, gt=0)
    serve_at_once: int | None = Field(default=None, gt=0)
    daily_quota: int | None = Field(default=None, ge=0)
    daily_quota_retry_after: float = Field(default=86_400.0, ge=0)
    rpm_window: float = Field(default=60.0, gt=0, le=60)
    announce_window: bool = False
    rate_limit_headers: bool = True
    gold_path: Path | None = None
    batch_delay: float = Field(default=0.0, ge=0)
    batch_error_rate: float = Field(default=0.0, ge=0, le=1)
    batch_max_requests: int = Field(default=50_000, gt=0)
    batch_max_bytes: int = Field(default=200_000_000, gt=0)
    batch_max_in_progress: int | None = Field(default=None, gt=0)


class SimulatorStats(BaseModel):
    """Counters since start.

    Attributes:
        received: completion requests received.
        outcomes: count per outcome: ``"ok"``, ``"rate_limited"`` (429 from the buckets), ``"over_capacity"``
            (503 from ``max_concurrency``), ``"daily_quota"`` (429 once ``daily_quota`` is spent), ``"bad_request"``
            (400), ``"json_schema_refused"`` (``json_schema_status`` other than 400), and each fault name.
        in_flight: completion requests being handled now (with ``serve_at_once``: being served or queued, their
            client still waiting).
        max_in_flight: the most ever handled at once.
        queued: with ``serve_at_once``: completions waiting for their turn now (abandoned ones included).
        max_queued: the most ever waiting at once.
        max_queue_wait: the longest a completion waited for its turn, seconds.
        abandoned: completions whose client went away before the answer (a timeout) while queued or being served:
            they were served all the same.
        files_uploaded: files uploaded to ``/v1/files``.
        batches_created: batches created (``/v1/batches``), not counting those refused for ``batch_max_in_progress``.
        batches_refused: batches created ``failed`` for ``batch_max_in_progress``.
        batch_lines: batch lines answered (successful or failed).
    """

    received: int = 0
    outcomes: dict[str, int] = Field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    queued: int = 0
    max_queued: int = 0
    max_queue_wait: float = 0.0
    abandoned: int = 0
    files_uploaded: int = 0
    batches_created: int = 0
    batches_refused: int = 0
    batch_lines: int = 0

    def count(self, outcome: str) -> None:
        """Add one to ``outcomes[outcome]``."""
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
